"""Running with reuse: a finetune or evaluation runs once per fingerprint (its config and inputs); a
finished one is found by its stamp and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from entropy_guided_generation.demo.data import file_digest
from entropy_guided_generation.demo.settings import DataFiles, DemoSettings, STAMP
from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.eval.report import generation_confidence_by_doc
from entropy_guided_generation.training import run_recipe
from entropy_guided_generation.training.checkpointing import remove_step_checkpoints


def fingerprint_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stamp_of(folder: Path, fingerprint: str, required: str) -> Optional[dict]:
    """The stamp of a finished step in ``folder`` with this fingerprint, else None."""
    stamp = folder / STAMP
    if not ((folder / required).exists() and stamp.is_file()):
        return None
    data = json.loads(stamp.read_text())
    return data if data.get("fingerprint") == fingerprint else None


def write_stamp(folder: Path, fingerprint: str, **extra: Any) -> None:
    (folder / STAMP).write_text(json.dumps({"fingerprint": fingerprint, **extra}) + "\n")


def run_fingerprint(cfg: DictConfig, run_dir: Path, settings: "DemoSettings", files: "DataFiles", mode: str) -> str:
    """What decides a finetune: its config (the run's own folder left out: a finetune is the same
    wherever it is written), the settings and the data files' bytes."""
    trained_by = settings.trained_by()
    portable = json.dumps(OmegaConf.to_container(cfg), sort_keys=True).replace(str(run_dir), "<run_dir>")
    return fingerprint_of(portable, trained_by, file_digest(files, mode, settings))


def final_checkpoint(run_dir: Path) -> Path:
    """The last ``epoch_N`` folder a finetune wrote."""
    epochs = sorted((p for p in run_dir.glob("epoch_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    if not epochs:
        raise FileNotFoundError(f"no epoch_N checkpoint in {run_dir}")
    return epochs[-1]


@dataclass(frozen=True)
class FinishedRun:
    """A finetune's checkpoint, its training-loss history and how long it took (wall and CPU seconds,
    when it ran)."""

    mode: str
    settings: DemoSettings
    checkpoint: Path
    run_dir: Path
    fingerprint: str
    train_seconds: float
    train_cpu_seconds: float
    loss: list[float]


def finetune(mode: str, cfg: DictConfig, run_dir: Path, fingerprint: str) -> tuple[Path, float, float]:
    """Run the recipe (or reuse its finished output); returns the final checkpoint folder and the
    wall and CPU seconds the finetune took (when it first ran)."""
    stamp = stamp_of(run_dir, fingerprint, "logs")
    if stamp is not None:
        print(f"[demo] {mode}: reusing the finetune in {run_dir}")
        return final_checkpoint(run_dir), float(stamp.get("seconds", math.nan)), float(stamp.get("cpu_seconds", math.nan))
    print(f"[demo] {mode}: finetuning ({cfg.epochs * cfg.max_steps_per_epoch} steps) -> {run_dir}", flush=True)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    # The folder is the demo's own: what an unfinished or outdated earlier demo left there goes.
    run_recipe(OmegaConf.merge(cfg, {"overwrite_output_dir": True}), mode=mode, distributed=False)
    seconds, cpu = round(time.perf_counter() - started, 1), round(cpu_seconds() - cpu_started, 1)
    write_stamp(run_dir, fingerprint, seconds=seconds, cpu_seconds=cpu)
    # The demo reuses a stamped run's epoch_N and never resumes it; on a real model the resume state
    # (weights and AdamW's two moments) is 3x the checkpoint (1.6 GB on SmolLM2-135M).
    remove_step_checkpoints(run_dir)
    return final_checkpoint(run_dir), seconds, cpu


def evaluate(mode: str, cfg: DictConfig, eval_dir: Path, fingerprint: str) -> dict:
    """Run the eval recipe (or reuse its summary); returns the summary plus per-sample pairs."""
    summary_path = eval_dir / "demo_eval.json"
    if stamp_of(eval_dir, fingerprint, summary_path.name) is not None:
        print(f"[demo] {mode}: reusing the evaluation in {eval_dir}")
        return json.loads(summary_path.read_text())
    print(f"[demo] {mode}: evaluating on {cfg.limit} held-out problems", flush=True)
    started = time.perf_counter()
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()
    pairs = per_sample_pairs(summary, recipe)
    recipe.cleanup()  # frees eval_dir's run lock and request cache
    kept = {k: v for k, v in summary.items() if k != "lm_eval"}
    kept["per_sample"] = pairs
    kept["seconds"] = round(time.perf_counter() - started, 1)
    summary_path.write_text(json.dumps(kept, indent=2, default=str) + "\n")
    write_stamp(eval_dir, fingerprint)
    return kept


def per_sample_pairs(summary: dict, recipe: Any) -> dict:
    """(confidence, correct) per held-out sample of the headline (task, filter, metric)."""
    task, filt, metric = summary.get("task"), summary.get("filter"), summary.get("metric")
    if task is None:
        return {"confidence": [], "correct": []}
    confidence = generation_confidence_by_doc(recipe.lm.traces, task)
    samples = [s for s in summary["lm_eval"]["samples"][task] if s["filter"] == filt]
    return {
        "confidence": [confidence[s["doc_id"]] for s in samples],
        "correct": [float(s[metric]) for s in samples],
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (on a busy machine, what the run would take alone)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


__all__ = ["FinishedRun", "cpu_seconds", "evaluate", "final_checkpoint", "finetune", "fingerprint_of", "per_sample_pairs", "run_fingerprint", "stamp_of", "write_stamp"]
