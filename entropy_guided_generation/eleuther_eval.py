"""The lm-eval (EleutherAI eval harness) recipe: a torchtune checkpoint evaluated in the
interleaving mode its YAML names, with per-sample confidence traces and calibration.

Run it as ``PYTHONPATH=. tune run recipes/eleuther_eval.py --config configs/entropy_intl/gsm8k_eval.yaml``,
``python -m entropy_guided_generation.eleuther_eval --config ...``, or from Python::

    cfg = config.load_yaml("configs/entropy_intl/gsm8k_eval.yaml")
    recipe = EleutherEvalRecipeDirect(cfg); recipe.setup(cfg); results = recipe.evaluate()

Config keys are torchtune's eval recipe's (``model``, ``checkpointer``, ``tokenizer``, ``tasks``,
``limit``, ``num_fewshot``, ``batch_size``, ``max_seq_length``, ``enable_kv_cache``, ``device``,
``dtype``, ``seed``, ``include_path``) plus ``interleaving`` (``mode``, ``marker``, ``max_passes``),
an optional ``confidence`` codec section, an optional ``sampler`` (mode none: ``{name: <registered
decoder, e.g. entropix>, ...its settings}``), ``output_dir``, ``max_gen_toks``, ``gen_kwargs`` and
``bootstrap_iters``. ``tasks`` entries are task names (from ``include_path`` or lm-eval's catalogue)
or inline task configs (see :mod:`entropy_guided_generation.eval.tasks`); ``data_dir`` is a folder
the inline task configs may interpolate (``${data_dir}/test.jsonl``), so ``data_dir=/my/data`` on the
command line moves every task file (a list index in an override, ``tasks[0]...=``, is not supported by
torchtune's override merge). ``confidence.json`` beside
the checkpoint decides the mode and codec; a config that contradicts it fails before any model work
(:mod:`entropy_guided_generation.eval.from_config` reads the config and builds the lm-eval model).

Outputs in ``output_dir``: lm-eval's ``results_<date>.json`` (with a ``confidence_calibration``
entry) and ``samples_<task>_<date>.jsonl``, ``confidence_traces_<task>_<date>.jsonl`` (in document
order, as the samples), and ``eval_summary.json`` (what :meth:`EleutherEvalRecipeDirect.evaluate`
returns, less lm-eval's samples).

Data parallel: ``tune run --nproc_per_node N recipes/eleuther_eval.py --config ...`` (or
``torchrun --nnodes M --nproc_per_node N ...``) starts one process per device; each loads the whole
model, lm-eval splits the documents across ranks, and rank 0 gathers samples, metrics, confidence
traces and decode counts, computes the calibration and writes every file; the other ranks write
only their request cache (below) and exit 0. The results equal a one-process run's (greedy decoding; same seed).

Interrupted evals resume: with an ``output_dir``, every answered request is committed as it finishes
under ``output_dir/request_cache/<identity>/`` (one file per rank; the identity hashes the
checkpoint's weight files, the config less ``output_dir``/``limit``/``bootstrap_iters`` and the tasks), and
rerunning the same command after ``kill -9`` or SIGTERM computes only the requests not answered yet,
with the same results, samples and traces (:mod:`entropy_guided_generation.eval.request_cache`).
One eval per ``output_dir`` at a time: rank 0 holds its run lock (:mod:`entropy_guided_generation.run_lock`).
"""
from __future__ import annotations

import copy
import sys
import time
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from lm_eval.evaluator import simple_evaluate
from lm_eval.loggers import EvaluationTracker
from lm_eval.utils import handle_non_serializable, make_table
from omegaconf import DictConfig
from torchtune import config, training, utils

from entropy_guided_generation.eval.from_config import (
    DEFAULT_SEED,
    build_lm,
    check_limit,
    check_recipe_keys,
    plain_container,
    resolve_kit_paths,
)
from entropy_guided_generation.eval.distributed import (
    gather_to_rank_zero,
    join_process_group,
    leave_process_group,
    rank_and_world_size,
)
from entropy_guided_generation.eval.lm import MODEL_NAME, DecodeStats
from entropy_guided_generation.interleaving_config import InterleavingConfig
from entropy_guided_generation.eval.report import calibration_rows, calibration_table
from entropy_guided_generation.eval.request_cache import RequestCache, cache_identity, cache_path, checkpoint_fingerprint
from entropy_guided_generation.eval.tasks import expand_task_spec, task_manager_for
from entropy_guided_generation.eval.traces import in_document_order, write_traces_jsonl
from entropy_guided_generation.run_lock import OutputDirInUseError, RunLock, lock_output_dir

log = utils.get_logger("INFO")

SUMMARY_FILENAME = "eval_summary.json"


def _json_number(value: Optional[float]) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def run_summary(
    results: dict, rows: list, interleaving: InterleavingConfig, lm: Any, stats: DecodeStats, eval_seconds: float
) -> dict:
    """The numbers of one eval run, JSON-friendly (NaN -> None).

    Headline ``accuracy``, ``ece``, ``auroc``, ``mean_confidence`` and ``num_samples`` are those of
    the first calibration row (first calibrated task in lm-eval's order, its first filter, its first
    0/1 metric, e.g. gsm8k's strict-match exact_match); None when no task yields per-sample
    correctness. ``calibration`` holds every row; ``lm_eval_results`` is lm-eval's ``results``
    (aggregated metrics per task). ``stats``: the decode counts of every rank together.
    """
    headline = rows[0].to_dict() if rows else {}
    return {
        "mode": interleaving.name,
        "marker": interleaving.marker,
        "positions": interleaving.positions,
        "decoder": lm.decoder_name,
        "task": headline.get("task"),
        "filter": headline.get("filter"),
        "metric": headline.get("metric"),
        "accuracy": headline.get("accuracy"),
        "ece": headline.get("ece"),
        "auroc": headline.get("auroc"),
        "mean_confidence": headline.get("mean_confidence"),
        "num_samples": headline.get("num_samples"),
        "decode_tokens": stats.tokens,
        "decode_seconds": stats.seconds,
        "decode_tokens_per_s": _json_number(stats.tokens_per_second),
        "eval_seconds": eval_seconds,
        "calibration": [row.to_dict() for row in rows],
        "lm_eval_results": results["results"],
    }


class EleutherEvalRecipeDirect:
    """Evaluate a torchtune checkpoint with lm-eval in the configured interleaving mode.

    ``__init__`` reads the run settings, ``setup`` builds tokenizer, codec, model and the lm-eval
    model, ``evaluate`` runs lm-eval's evaluator, writes results, samples, traces and the run summary,
    prints lm-eval's table and the calibration table, and returns the summary (see :func:`run_summary`)
    with lm-eval's whole results dict (samples included) under ``"lm_eval"``.

    Launched with more than one process (torchrun), ``__init__`` joins the process group (gloo on
    CPU, NCCL on GPU; or uses the one the caller initialized), the documents are split across ranks,
    and ``evaluate`` returns the results on rank 0 and None elsewhere; ``cleanup`` leaves a process
    group ``__init__`` created.
    """

    def __init__(self, cfg: DictConfig) -> None:
        check_recipe_keys(cfg)
        self.device = utils.get_device(device=cfg.get("device", "cpu"))
        self._owns_process_group = join_process_group(self.device)
        self.dtype = training.get_dtype(dtype=cfg.get("dtype", "fp32"), device=self.device)
        self.seed = training.set_seed(seed=cfg.get("seed", None) if cfg.get("seed", None) is not None else DEFAULT_SEED)
        self.tasks = list(plain_container(cfg.tasks))
        if not self.tasks:
            raise ValueError("tasks is empty; name at least one lm-eval task")
        self.limit = check_limit(cfg.get("limit", None))
        self.num_fewshot = cfg.get("num_fewshot", None)
        self.gen_kwargs = plain_container(cfg.get("gen_kwargs", None))
        self.bootstrap_iters = int(cfg.get("bootstrap_iters", 100000))
        output_dir = cfg.get("output_dir", None)
        self.output_dir = Path(output_dir) if output_dir else None
        self.lm = None
        self._lock: Optional[RunLock] = None

    def _lock_output_dir(self) -> None:
        """Hold ``output_dir``'s run lock on rank 0; every rank raises when another live run holds it.

        Raises:
            OutputDirInUseError: naming the holding process.
        """
        if self.output_dir is None:
            return
        rank, world_size = rank_and_world_size()
        refused: Optional[OutputDirInUseError] = None
        if rank == 0:
            try:
                self._lock = lock_output_dir(self.output_dir, "eval")
            except OutputDirInUseError as err:
                refused = err
        if world_size > 1:
            flag = [refused is not None]
            torch.distributed.broadcast_object_list(flag, src=0)
            if flag[0] and refused is None:
                refused = OutputDirInUseError(f"output_dir {self.output_dir} is in use by another run (rank 0 says which)")
        if refused is not None:
            raise refused

    def setup(self, cfg: DictConfig) -> None:
        """Take ``output_dir``'s run lock, resolve ``kit:`` paths, reconcile the config with
        ``confidence.json``, build the model and open this rank's request cache (a failing setup
        frees the folder again).

        Raises:
            OutputDirInUseError: another live run holds ``output_dir`` (naming its process).
        """
        self._lock_output_dir()
        try:
            self._setup(cfg)
        except BaseException:
            self._release_lock()
            raise

    def _setup(self, cfg: DictConfig) -> None:
        cfg = resolve_kit_paths(cfg)
        self.tasks = list(plain_container(cfg.tasks))  # again: a kit: data_dir is a path now
        self.include_path = plain_container(cfg.get("include_path", None))
        self.checkpoint_dir = str(cfg.checkpointer.checkpoint_dir)
        self.lm, self.interleaving, self.metadata = build_lm(cfg, self.device, self.dtype)
        if self.output_dir is not None:
            self.lm.request_cache = self._open_request_cache(cfg)
        log.info(f"lm-eval model {type(self.lm).__name__} in interleaving mode {self.interleaving.name!r}, decoder {self.lm.decoder_name!r}")

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _open_request_cache(self, cfg: DictConfig) -> RequestCache:
        """This rank's answers file for this checkpoint, config and tasks (see the module docstring)."""
        identity = cache_identity(checkpoint_fingerprint(Path(self.checkpoint_dir)), plain_container(cfg), self.tasks)
        rank, world_size = rank_and_world_size()
        cache = RequestCache(cache_path(self.output_dir, identity, rank, world_size))
        log.info(f"Rank {rank}: answered requests are kept in {cache.path} ({len(cache)} there already)")
        return cache

    def evaluate(self) -> Optional[dict]:
        """Run lm-eval on the tasks; write and print results, samples, traces, calibration and summary.

        Returns:
            :func:`run_summary`'s dict plus ``"lm_eval"``: lm-eval's ``simple_evaluate`` results
            (``results``, ``configs``, ``samples``, ..., and our ``confidence_calibration`` and
            ``interleaving`` entries); None on ranks other than 0.
        """
        if self.lm is None:
            raise RuntimeError("call setup(cfg) before evaluate()")
        specs = [expand_task_spec(spec) for spec in self.tasks]
        manager = task_manager_for(specs, self.include_path)
        tracker = EvaluationTracker(output_path=str(self.output_dir / "results.json")) if self.output_dir else None
        self.lm.traces.clear()
        self.lm.decode_stats = DecodeStats()
        started = time.perf_counter()
        results = simple_evaluate(
            model=self.lm,
            model_args={"model": MODEL_NAME, "checkpoint_dir": self.checkpoint_dir, "mode": self.interleaving.name},
            tasks=specs,
            num_fewshot=self.num_fewshot,
            limit=self.limit,
            log_samples=True,
            evaluation_tracker=tracker,
            gen_kwargs=self.gen_kwargs,
            task_manager=manager,
            bootstrap_iters=self.bootstrap_iters,
            random_seed=self.seed,
            numpy_random_seed=self.seed,
            torch_random_seed=self.seed,
            fewshot_random_seed=self.seed,
        )
        # Every rank joins these gathers; lm-eval has gathered samples and metrics already.
        traces_per_rank = gather_to_rank_zero(self.lm.traces)
        stats_per_rank = gather_to_rank_zero(self.lm.decode_stats)
        eval_seconds = time.perf_counter() - started
        if results is None:  # a rank other than 0
            return None
        log.info(f"Eval completed in {eval_seconds:.02f} seconds.")
        traces = in_document_order([trace for traces in traces_per_rank for trace in traces])
        stats = DecodeStats.across_ranks(stats_per_rank)
        output_types = {task: cfg.get("output_type") for task, cfg in results["configs"].items()}
        rows = calibration_rows(results["samples"], output_types, traces)
        results["confidence_calibration"] = [row.to_dict() for row in rows]
        results["interleaving"] = {
            "mode": self.interleaving.name,
            "marker": self.interleaving.marker,
            "positions": self.interleaving.positions,
            "decoder": self.lm.decoder_name,
            "confidence_json": self.metadata.__dict__ if self.metadata is not None else None,
        }
        summary = run_summary(results, rows, self.interleaving, self.lm, stats, eval_seconds)
        if tracker is not None:
            self._write_outputs(tracker, results, traces, summary)
        self._print_tables(results, rows, summary)
        return {**summary, "lm_eval": results}

    def cleanup(self) -> None:
        """Close the request cache, release the run lock, and leave the process group if
        ``__init__`` created it (one the caller made stays)."""
        if self.lm is not None and self.lm.request_cache is not None:
            self.lm.request_cache.close()
            self.lm.request_cache = None
        self._release_lock()
        if self._owns_process_group:
            leave_process_group()

    def _write_outputs(self, tracker: Any, results: dict, traces: list, summary: dict) -> None:
        """lm-eval's results and samples files (through its tracker), then our traces and summary beside them."""
        samples = results["samples"]
        tracker.save_results_aggregated(results={k: v for k, v in results.items() if k != "samples"}, samples=samples)
        results_file = self.output_dir / f"results_{tracker.date_id}.json"
        if not results_file.is_file():
            raise RuntimeError(f"lm-eval did not write {results_file}; see its warning above")
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=copy.deepcopy(samples.get(task, [])))
            task_traces = [t for t in traces if t.task == task]
            write_traces_jsonl(self.output_dir / f"confidence_traces_{task}_{tracker.date_id}.jsonl", task_traces)
        (self.output_dir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2, default=handle_non_serializable))
        log.info(f"Results, samples, confidence traces and {SUMMARY_FILENAME} written to {self.output_dir}")

    @staticmethod
    def _print_tables(results: dict, rows: list, summary: dict) -> None:
        tables = [make_table(results)]
        if "groups" in results:
            tables.append(make_table(results, "groups"))
        tables.append(calibration_table(rows) if rows else "No task with per-sample correctness: no calibration.")
        speed = summary["decode_tokens_per_s"]
        tables.append(
            f"Decoder {summary['decoder']!r}: {summary['decode_tokens']} content tokens in {summary['decode_seconds']:.2f} s"
            + (f" ({speed:.1f} tokens/s)" if speed is not None else "")
        )
        log.info("\n\n" + "\n\n".join(tables) + "\n")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run recipes/eleuther_eval.py --config X.yaml [key=value ...]``."""
    config.log_config(recipe_name="EleutherEvalRecipeDirect", cfg=cfg)
    recipe = EleutherEvalRecipeDirect(cfg)
    try:
        recipe.setup(cfg)
        recipe.evaluate()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
