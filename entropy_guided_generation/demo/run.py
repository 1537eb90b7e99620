"""The main job (``make demo``): does Confidence-as-Context work here, and why or why not?

Modes ``none``, ``full``, ``answer`` and ``marker`` finetune from one base model on identical budgets
(same data, steps, batch size, learning rate, codec, position rule) through the real recipe; each is
evaluated through the eval recipe (lm-eval's evaluator) on held-out problems, then analysed
(:mod:`entropy_guided_generation.demo_analysis`): the same problems decoded again with every
confidence token fixed or shuffled (does the model read its confidence?), calibration read from
the bins themselves, the bins at right and wrong result digits, train/decode agreement of the bins,
the held-out content loss before and after finetuning. Optional studies: ``--sweep-steps`` (a
learning curve per mode, one finetune per budget) and ``--compare`` (one setting changed for every
mode alike). Nothing is tuned per mode.

Default ("the embedded default"): the kit's trained tiny base model and its GSM8K-format word
problems for every mode (marker: reasoning interleaved up to and including ``####``, the final answer
plain), scored by lm-eval's gsm8k answer extraction.

Outputs in ``--out`` (default ``outputs/demo/``): ``results.json`` (every number), pictures
(``confidence_<mode>``, ``reliability_<mode>``, ``loss_curves``, ``ablation``, ``digit_bins`` and, with
the studies, ``learning_curves``), and per run ``runs/<settings>/<mode>/`` (checkpoint, logs),
``eval/<mode>/`` (lm-eval results, samples, traces), ``analysis/<settings>/<mode>.json``. Re-running
reuses every finished step whose settings did not change.

    python -m entropy_guided_generation.demo                       # the embedded default
    python -m entropy_guided_generation.demo --sweep-steps 240,480,960,1920 --compare codec=entropy_quantile,lr=0.003
    python -m entropy_guided_generation.demo --gsm8k ../shared/data/gsm8k   # real data (GSM8K-format JSONL)
    python -m entropy_guided_generation.demo --checkpoint MY_HF_DIR --model-type QWEN2   # your own model
    python -m entropy_guided_generation.demo --base smollm2 --publish docs/real_model   # the real-model study

``--base smollm2`` starts every mode from the kit's real model (SmolLM2-135M-Instruct) with its own default
budget (:data:`SMOLLM2_DEFAULTS`, about an hour on 2 idle cores) and studies (:data:`SMOLLM2_STUDIES`: a
learning-curve point, the ``context=plain`` row; and the step-0 study of the base through each layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from entropy_guided_generation import visualize
from entropy_guided_generation.demo.configs import eval_config
from entropy_guided_generation.demo.data import on_bigbench, prepare_data, read_jsonl
from entropy_guided_generation.demo.runs import FinishedRun, cpu_seconds, evaluate, fingerprint_of
from entropy_guided_generation.demo.settings import BASES, BBM_TASK_FILE, BaseModel, CODECS, CONTEXTS, DataFiles, DemoSettings, EMBEDDING_INITS, MARKER_TASKS, MODES, POSITION_RULES, REAL_BASES, SMOLLM2_DEFAULTS, SMOLLM2_SIZING, SMOLLM2_STUDIES, kit_base_folder, parse_change
from entropy_guided_generation.demo.studies import Demo, compare_rows, final_loss, study_fields, sweep_points
from entropy_guided_generation.demo.tables import analysis_table, compare_table, digits_table, draw_confidence_example, fixed_point_table, fmt, results_table, step0_table, sweep_table
from entropy_guided_generation.modes import mode_named


def resolve_base(checkpoint: Optional[Path], tokenizer_dir: Optional[Path], model_type: str, base: str = "mixed") -> BaseModel:
    """The demo's base model: ``checkpoint`` (a Hugging Face folder, of ``model_type``), else the kit's
    real model when ``base`` is one (:data:`REAL_BASES`), else the kit's trained base."""
    if checkpoint is not None:
        folder = Path(checkpoint)
    else:
        folder, model_type = kit_base_folder(base if base in REAL_BASES else "plain")
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else folder
    if not (tok / "tokenizer.json").is_file() and not (tok / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"tokenizer folder {tok} holds no tokenizer.json or tokenizer_config.json; expected a Hugging Face tokenizer "
            "folder (Qwen2.5-format vocab.json + merges.txt + tokenizer.json, or any HF tokenizer)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {folder} has no config.json; expected a Hugging Face checkpoint")
    return BaseModel(folder.resolve(), tok.resolve(), model_type)


def example_question(files: DataFiles, mode: str, settings: DemoSettings) -> str:
    if on_bigbench(mode, settings):
        return read_jsonl(files.bbm_test)[0]["input"] + "\n"
    return read_jsonl(files.gsm8k_test)[0]["question"] + "\n"


def headline_row(mode: str, settings: DemoSettings, run: FinishedRun, summary: dict, found: dict) -> dict:
    ablations = found.get("ablations") or {}
    trace = found.get("trace") or {}
    digits = found.get("digits") or {}
    right, wrong = digits.get("right") or {}, digits.get("wrong") or {}
    return {
        "mode": mode,
        "data": "bigbench_mistake" if on_bigbench(mode, settings) else "gsm8k",
        "task": summary["task"], "metric": f"{summary['metric']} ({summary['filter']})",
        "accuracy": summary["accuracy"], "ece": summary["ece"], "auroc": summary["auroc"],
        "mean_confidence": summary["mean_confidence"], "decode_tokens_per_s": summary["decode_tokens_per_s"],
        "num_samples": summary["num_samples"], "checkpoint": str(run.checkpoint),
        "train_seconds": run.train_seconds, "train_cpu_seconds": run.train_cpu_seconds, "eval_seconds": summary.get("seconds"),
        "analysis_seconds": found.get("seconds"),
        "final_train_loss": final_loss(run.loss),
        "analysis_accuracy": found["real"]["accuracy"],
        "base_content_loss": found.get("base_content_loss"), "content_loss": found["content_loss"],
        "trace_ece": trace.get("ece"), "trace_auroc": trace.get("auroc"),
        "trace_min_ece": (found.get("trace_min") or {}).get("ece"), "trace_min_auroc": (found.get("trace_min") or {}).get("auroc"),
        **{f"{name}_change": ablation["accuracy_change"] for name, ablation in ablations.items()},
        "agreement": (found.get("agreement") or {}).get("equal_fraction"),
        **study_fields(run, found),
        "n_right": right.get("n"), "n_wrong": wrong.get("n"),
        "entropy_right": right.get("mean_entropy"), "entropy_wrong": wrong.get("mean_entropy"),
        "bin_right": right.get("mean_own_bin"), "bin_wrong": wrong.get("mean_own_bin"),
        "prev_right": right.get("mean_prev_bin"), "prev_wrong": wrong.get("mean_prev_bin"),
        "auroc_entropy": digits.get("auroc_entropy"), "auroc_bin": digits.get("auroc_bin"),
    }


def run_demo(
    out: Path,
    settings: DemoSettings,
    modes: Sequence[str] = MODES,
    gsm8k_dir: Optional[Path] = None,
    bbm_dir: Optional[Path] = None,
    bbm_tasks: Sequence[str] = (BBM_TASK_FILE,),
    checkpoint: Optional[Path] = None,
    tokenizer_dir: Optional[Path] = None,
    model_type: str = "QWEN2",
    sweep_steps: Sequence[int] = (),
    compare: Sequence[dict] = (),
    publish: Optional[Path] = None,
) -> dict:
    """The whole pipeline; returns what ``results.json`` holds. On the real model (``settings.base``
    ``smollm2``, no ``checkpoint``) also the step-0 study; with ``publish``, ``results.json`` and the
    pictures are copied there (e.g. ``docs/real_model``)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown demo modes {unknown or list(modes)}; expected some of {', '.join(MODES)}")
    started, cpu_started = time.perf_counter(), cpu_seconds()
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(checkpoint, tokenizer_dir, model_type, settings.base)
    files = prepare_data(out, settings, gsm8k_dir, bbm_dir, bbm_tasks)
    demo = Demo(out, settings, base, files, custom_base=checkpoint is not None)
    rows, analyses, curves, examples = [], {}, {}, {}
    # Mode none last: its analysis reads would-be bins with mode answer's codec.
    ordered = sorted(dict.fromkeys(modes), key=lambda m: (mode_named(m).is_plain, MODES.index(m)))
    for mode in ordered:
        run = demo.run(mode, settings)
        eval_dir = out / "eval" / settings.label() / mode
        eval_dir.mkdir(parents=True, exist_ok=True)
        ecfg = eval_config(mode, run.checkpoint, demo.base_for(settings), files, settings, eval_dir)
        summary = evaluate(mode, ecfg, eval_dir, fingerprint_of(OmegaConf.to_container(ecfg), run.fingerprint))
        analyses[mode] = demo.analysis(run, full=True)
        pairs = summary["per_sample"]
        visualize.reliability_diagram(pairs["confidence"], pairs["correct"], out / f"reliability_{mode}.png",
                                      title=f"mode {mode}: ECE {fmt(summary['ece'])}, AUROC {fmt(summary['auroc'])}")
        curves[mode] = run.loss
        examples[mode] = draw_confidence_example(mode, run.checkpoint, demo.base_for(settings), example_question(files, mode, settings), out, settings)
        rows.append(headline_row(mode, settings, run, summary, analyses[mode]))
        if abs(rows[-1]["analysis_accuracy"] - rows[-1]["accuracy"]) > 1e-9 and not on_bigbench(mode, settings):
            print(f"[demo] warning: {mode}: the analysis decode scores {rows[-1]['analysis_accuracy']:.3f}, lm-eval {rows[-1]['accuracy']:.3f}")
    none_accuracy = next((r["accuracy"] for r in rows if mode_named(r["mode"]).is_plain), None)
    for r in rows:
        r["relative_accuracy"] = r["accuracy"] / none_accuracy if none_accuracy else None
    rows.sort(key=lambda r: MODES.index(r["mode"]))

    visualize.loss_curves({m: curves[m] for m in MODES if m in curves}, out / "loss_curves.png",
                          title=f"training loss ({settings.steps} steps each)", log_y=True)
    interleaved = [m for m in MODES if m in analyses and analyses[m].get("ablations")]
    visualize.ablation_bars(
        {m: {"real bins": analyses[m]["real"]["accuracy"], **{k: v["accuracy"] for k, v in analyses[m]["ablations"].items()}} for m in interleaved},
        out / "ablation.png",
    )
    visualize.digit_bins({m: {k: (analyses[m]["digits"].get(k) or {}).get("own_bin_histogram") for k in ("right", "wrong")}
                          for m in interleaved}, out / "digit_bins.png", title="bins of the distributions that produced result digits")
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "base_checkpoint": str(demo.base_for(settings).checkpoint_dir),
        "data": {k: str(v) for k, v in asdict(files).items()},
        "rows": rows,
        "analysis": analyses,
        "loss_curves": curves,
        "examples": examples,
    }
    if sweep_steps:
        results["sweep"] = sweep_points(demo, ordered, sweep_steps)
        visualize.learning_curves(results["sweep"], out / "learning_curves.png",
                                  title=f"one finetune per budget (settings otherwise: {settings.changes()})")
    if settings.base in REAL_BASES and checkpoint is None:
        results["step0"] = demo.step0(settings, ordered)
    if compare:
        results["compare"] = compare_rows(demo, ordered, compare)
        by_mode: dict[str, dict[str, float]] = {}
        for row in results["compare"]:
            by_mode.setdefault(row["mode"], {})[row["change"]] = row["accuracy"]
        visualize.ablation_bars({m: by_mode[m] for m in MODES if m in by_mode}, out / "compare.png",
                                title=f"one setting changed for every mode ({settings.steps} steps)")
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["cpu_seconds"] = round(cpu_seconds() - cpu_started, 1)
    results["threads"] = torch.get_num_threads()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n" + results_table(rows))
    print("\nWhy (held-out content loss of the base (loss@0) and after; calibration of the bins; accuracy change when "
          "every confidence token is fixed or shuffled; share of bins training re-derives equal to the decoded ones):")
    print(analysis_table(rows))
    print("\nResult digits (a op b = c, #### n): entropy (H) of the distribution that wrote them, its bin, the bin read just before:")
    print(digits_table(rows))
    if sweep_steps:
        print("\nLearning curves (held-out accuracy / content loss per budget):\n" + sweep_table(results["sweep"]))
    if compare:
        print("\nOne setting changed for every mode:\n" + compare_table(results["compare"]))
    print("\nFixed point (passes per micro-batch; share of training bins one plain-context pass gets wrong, at step 0 and "
          "at the end):\n" + fixed_point_table(results.get("compare") or rows))  # compare rows hold the default's too
    if results.get("step0"):
        print(f"\nStep 0 (held-out content loss of the base, nats per content token; plain {results['step0']['plain']:.3f}):\n"
              + step0_table(results["step0"]["rows"]))
    if publish is not None:
        publish_results(out, publish)
    print(f"\n[demo] {results['seconds']:.0f}s ({results['cpu_seconds']:.0f} CPU seconds on {results['threads']} threads); "
          f"pictures and results.json in {out}")
    return results


PUBLISHED = ("results.json", "*.png")


def publish_results(out: Path, dest: Path) -> list[Path]:
    """Copy a finished run's ``results.json`` and pictures from ``out`` into ``dest`` (the way
    ``docs/demo`` and ``docs/real_model`` are made); returns the copied files.

    Raises:
        FileNotFoundError: when ``out`` holds no ``results.json``.
    """
    if not (out / "results.json").is_file():
        raise FileNotFoundError(f"{out} holds no results.json; run the demo with --out {out} first")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in PUBLISHED:
        for path in sorted(out.glob(pattern)):
            shutil.copyfile(path, dest / path.name)
            copied.append(dest / path.name)
    print(f"[demo] published {len(copied)} files to {dest}")
    return copied


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from error
    if any(v < 1 for v in values):
        raise ValueError(f"{what} must be integers >= 1, got {text!r}")
    return values


def per_base(name: str) -> str:
    """Help text of a budget option: its default on the kit's bases and on the real model."""
    kit_default = getattr(DemoSettings(), name)
    return f"(default: {kit_default} on the kit's bases, {SMOLLM2_DEFAULTS.get(name, kit_default)} on smollm2)"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="python -m entropy_guided_generation.demo", description=__doc__.split("\n\n")[0],
        epilog=f"--base smollm2 (the kit's real model, SmolLM2-135M-Instruct): {SMOLLM2_SIZING} "
               f"Its default studies: --sweep-steps {SMOLLM2_STUDIES['sweep_steps']} --compare {SMOLLM2_STUDIES['compare']} and the step-0 study.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of none,full,answer,marker")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per finetune, same for every mode {per_base('steps')}")
    parser.add_argument("--batch-size", type=int, default=None, help=per_base("batch_size"))
    parser.add_argument("--lr", type=float, default=None, help=per_base("lr"))
    parser.add_argument("--eval-limit", type=int, default=None, help=f"held-out problems per mode {per_base('eval_limit')}")
    parser.add_argument("--max-gen-toks", type=int, default=None, help=per_base("max_gen_toks"))
    parser.add_argument("--train-rows", type=int, default=None, help=f"kit training rows, kit data only {per_base('train_rows')}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--codec", default=defaults.codec, choices=list(CODECS), help="confidence signal and bins, for every mode")
    parser.add_argument("--positions", default=defaults.positions, choices=POSITION_RULES, help="interleaving.positions, for every mode")
    parser.add_argument("--init-embeddings", default=None, choices=EMBEDDING_INITS,
                        help=f"interleaving.init_confidence_embeddings, for every mode {per_base('init_embeddings')}")
    parser.add_argument("--context", default=defaults.context, choices=CONTEXTS, help="confidence.context of every interleaved finetune")
    parser.add_argument("--base", default=defaults.base, choices=BASES, help="the kit base every mode starts from")
    parser.add_argument("--marker-task", default=defaults.marker_task, choices=MARKER_TASKS, help="the data of mode marker")
    parser.add_argument("--sweep-steps", default=None, help="learning curves: comma-separated budgets, one finetune per mode and budget "
                        f"(e.g. 240,480,960,1920; default: none on the kit's bases, {SMOLLM2_STUDIES['sweep_steps']} on smollm2)")
    parser.add_argument("--compare", default=None, help="comma-separated field=value changes of the settings, each run for every mode "
                        f"(e.g. codec=entropy_quantile,lr=0.003; default: none on the kit's bases, {SMOLLM2_STUDIES['compare']} on smollm2)")
    parser.add_argument("--publish", type=Path, default=None, help="copy results.json and the pictures there after the run (e.g. docs/real_model)")
    parser.add_argument("--gsm8k", type=Path, default=None, help="folder with GSM8K-format train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k)")
    parser.add_argument("--bigbench-mistake", type=Path, default=None, help="folder of BIG-Bench Mistake task files for mode marker (implies --marker-task bigbench_mistake)")
    parser.add_argument("--bigbench-tasks", default=BBM_TASK_FILE, help="comma-separated task files of --bigbench-mistake (the held-out task scores the number after the marker: arithmetic answers)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="your Hugging Face checkpoint folder (default: the kit's trained base)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="a Hugging Face tokenizer folder (Qwen2.5-format files, or any HF tokenizer: then the confidence tokens are added; default: --checkpoint)")
    parser.add_argument("--model-type", default="QWEN2", help="torchtune checkpointer model_type of --checkpoint")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The demo's settings: the options given, the base's defaults (:func:`base_defaults`) for the rest."""
    marker_task = "bigbench_mistake" if args.bigbench_mistake is not None else args.marker_task
    return DemoSettings.for_base(
        args.base, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_limit=args.eval_limit,
        max_gen_toks=args.max_gen_toks, train_rows=args.train_rows, seed=args.seed, codec=args.codec,
        positions=args.positions, init_embeddings=args.init_embeddings, marker_task=marker_task, context=args.context,
    )


def studies_from_args(args: argparse.Namespace) -> tuple[list[int], list[dict]]:
    """``--sweep-steps`` and ``--compare`` as budgets and changes (not given: the base's default studies)."""
    real = args.base in REAL_BASES and args.checkpoint is None
    sweep = args.sweep_steps if args.sweep_steps is not None else (SMOLLM2_STUDIES["sweep_steps"] if real else "")
    compare = args.compare if args.compare is not None else (SMOLLM2_STUDIES["compare"] if real else "")
    return int_list(sweep, "--sweep-steps"), [parse_change(spec.strip()) for spec in compare.split(",") if spec.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    sweep, changes = studies_from_args(args)
    for change in changes:
        dataclasses.replace(settings, **change)  # checks the value before any work
    run_demo(
        args.out, settings, modes=[m.strip() for m in args.modes.split(",") if m.strip()], gsm8k_dir=args.gsm8k,
        bbm_dir=args.bigbench_mistake, bbm_tasks=tuple(t.strip() for t in args.bigbench_tasks.split(",")),
        checkpoint=args.checkpoint, tokenizer_dir=args.tokenizer_dir, model_type=args.model_type,
        sweep_steps=sweep, compare=changes, publish=args.publish,
    )
    return 0


__all__ = ["PUBLISHED", "example_question", "headline_row", "int_list", "main", "parse_args", "per_base", "publish_results", "resolve_base", "run_demo", "settings_from_args", "studies_from_args"]
