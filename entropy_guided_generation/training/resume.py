"""Resuming a finetune: the newest step checkpoint every rank can read (unreadable newer ones set
aside), and the settings a resumed run must share with the run that wrote it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

from torchtune import utils

from entropy_guided_generation.training import checkpointing, run_dir
from entropy_guided_generation.training.parallelism import Parallelism

log = utils.get_logger("INFO")

# Settings that fix what a saved data position means: a resumed run must keep them.
POSITION_SETTINGS = ("mode", "world_size", "batch_size", "gradient_accumulation_steps", "max_steps_per_epoch")


def load_resume_checkpoint(
    step_root: Path,
    parallel: Parallelism,
    all_ranks: Callable[[bool], bool],
    *,
    config_hash: str,
    run_config: Dict[str, Any],
    output_dir_options: run_dir.OutputDirOptions,
) -> checkpointing.StepCheckpoint:
    """The newest step checkpoint under ``step_root`` every rank can read (unreadable newer ones are
    set aside, with a warning), refused when written by another config or another number of ranks.

    Args:
        all_ranks: ``ok -> bool``, True when ``ok`` holds on every rank (a collective under FSDP2).
    """
    resume, skipped = checkpointing.load_newest_readable(step_root, parallel.rank, parallel.world_size, all_ranks)
    warning = run_dir.check_resumed_run(resume.path, resume.progress, config_hash, run_config, output_dir_options)
    if skipped:
        for path, why in skipped:
            log.warning(f"rank {parallel.rank}: cannot resume from {path}: {why}")
        if parallel.is_rank_zero:
            moved = [checkpointing.set_aside(path) for path, _ in skipped]
            log.warning(
                f"resuming from the previous complete checkpoint {resume.path} instead of {skipped[0][0]}; "
                f"unreadable checkpoints moved to {', '.join(p.name for p in moved)}"
            )
        parallel.barrier()
    if warning is not None and parallel.is_rank_zero:
        log.warning(warning)
    run_name = resume.progress.config_hash or "of unknown config"
    utils.log_rank_zero(log, f"Resuming run {run_name} from step {resume.progress.global_step} ({resume.path}).")
    return resume


def check_same_position_settings(
    path: Path, saved: checkpointing.TrainingProgress, now: checkpointing.TrainingProgress
) -> None:
    """Refuse settings that would change what the saved data position means.

    Raises:
        ValueError: ``cannot resume <path>: it was trained with batch_size=2, this run has batch_size=4``.
    """
    for name in POSITION_SETTINGS:
        if getattr(saved, name) != getattr(now, name):
            raise ValueError(
                f"cannot resume {path}: it was trained with {name}={getattr(saved, name)!r}, "
                f"this run has {name}={getattr(now, name)!r}"
            )


__all__ = ["POSITION_SETTINGS", "check_same_position_settings", "load_resume_checkpoint"]
