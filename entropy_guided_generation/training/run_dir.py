"""Who owns an ``output_dir``: a fresh run refuses a folder holding another run's checkpoints, and a
resume names the run it continues by its config hash and refuses a checkpoint of another config.

The config hash is a short sha256 of the config with the keys that only say where and how often to
save, log or validate, and when to stop (:data:`RUN_CONTROL_KEYS`), left out: stopping a run and
resuming it with ``resume_from_checkpoint=True`` keeps its hash; changing the learning rate does not.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from entropy_guided_generation.training.checkpointing import STEP_CHECKPOINTS_DIRNAME
from entropy_guided_generation.training.options import config_bool

# Top-level keys that do not change what a run computes (where and how often it saves, logs and
# validates, when it stops, how it claims its folder): left out of the config hash.
RUN_CONTROL_KEYS = (
    "output_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "resume_config_hash",
    "stop_after_steps",
    "save_every_n_steps",
    "keep_last_n_checkpoints",
    "metric_logger",
    "log_every_n_steps",
    "log_peak_memory_stats",
    "run_val_every_n_steps",
    "max_val_batches",
    "dataset_val",
)
EPOCH_DIR_GLOB = "epoch_*"
HASH_LENGTH = 12
# A letter prefix keeps a hash a string on the command line (``resume_config_hash=123e4...`` would parse as a float).
HASH_PREFIX = "cfg-"


@dataclass(frozen=True)
class OutputDirOptions:
    """How a run may use its ``output_dir``.

    Attributes:
        resume: ``resume_from_checkpoint``: continue the run whose step checkpoints are there.
        overwrite: ``overwrite_output_dir``: a fresh run deletes the checkpoints another run left
            there (``step_checkpoints/``, ``epoch_*/``) instead of refusing the folder.
        resume_config_hash: resume a checkpoint written under another config, named by the config
            hash it records (the refusal prints it); None: only a checkpoint of this config.
    """

    resume: bool = False
    overwrite: bool = False
    resume_config_hash: Optional[str] = None


def output_dir_options(cfg: DictConfig) -> OutputDirOptions:
    """Read ``resume_from_checkpoint``, ``overwrite_output_dir`` and ``resume_config_hash``.

    Raises:
        ValueError: on a non-boolean flag, a non-string hash, or a resume and an overwrite asked together.
    """
    resume = config_bool(cfg, "resume_from_checkpoint", False)
    overwrite = config_bool(cfg, "overwrite_output_dir", False)
    if resume and overwrite:
        raise ValueError(
            "resume_from_checkpoint=True continues the run in output_dir and overwrite_output_dir=True deletes it; set one of them"
        )
    accepted = cfg.get("resume_config_hash", None)
    if accepted is not None and not isinstance(accepted, str):
        raise ValueError(f"resume_config_hash must be the hash a refused resume names (a string), got {accepted!r}")
    return OutputDirOptions(resume=resume, overwrite=overwrite, resume_config_hash=accepted)


def hashed_config(cfg: DictConfig) -> Dict[str, Any]:
    """The part of ``cfg`` that fixes what a run computes: interpolations unresolved (so
    ``${output_dir}`` stays a name), :data:`RUN_CONTROL_KEYS` and ``checkpointer.output_dir`` removed."""
    container = OmegaConf.to_container(cfg, resolve=False)
    for key in RUN_CONTROL_KEYS:
        container.pop(key, None)
    if isinstance(container.get("checkpointer"), dict):
        container["checkpointer"].pop("output_dir", None)
    return container


def config_hash(cfg: DictConfig) -> str:
    """A short hash naming the run ``cfg`` describes (see :func:`hashed_config`)."""
    text = json.dumps(hashed_config(cfg), sort_keys=True, default=str)
    return HASH_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (an empty dict is a leaf; lists are leaves)."""
    if isinstance(node, dict):
        flat: Dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(saved: Dict[str, Any], now: Dict[str, Any], limit: int = 8) -> List[str]:
    """``key: saved -> now`` for the first ``limit`` dotted keys whose values differ."""
    old, new = _flatten(saved), _flatten(now)
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key, "<unset>") != new.get(key, "<unset>")]
    lines = [f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}" for key in changed[:limit]]
    if len(changed) > limit:
        lines.append(f"... and {len(changed) - limit} more")
    return lines


def previous_run_files(output_dir: Path) -> List[Path]:
    """What another run left in ``output_dir`` that a fresh run would mix with its own: step
    checkpoints (complete, partial or set aside as corrupt) and ``epoch_*`` checkpoint folders."""
    output_dir = Path(output_dir)
    found = sorted((output_dir / STEP_CHECKPOINTS_DIRNAME).glob("*")) if (output_dir / STEP_CHECKPOINTS_DIRNAME).is_dir() else []
    return found + sorted(p for p in output_dir.glob(EPOCH_DIR_GLOB) if p.is_dir())


def claim_output_dir(output_dir: Path, options: OutputDirOptions, *, is_rank_zero: bool, barrier: Any) -> List[Path]:
    """Make ``output_dir`` this fresh run's: refuse it while it holds another run's checkpoints,
    unless ``overwrite_output_dir`` (rank 0 then deletes them). Every rank calls this.

    Returns:
        The paths deleted (empty unless overwriting).

    Raises:
        FileExistsError: naming the folder, what it holds and the two ways on.
    """
    found = previous_run_files(output_dir)
    if found and not options.overwrite:
        shown = ", ".join(str(p.relative_to(output_dir)) for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise FileExistsError(
            f"output_dir {output_dir} holds another run's checkpoints ({shown}); continue that run with "
            "resume_from_checkpoint=True, start over with overwrite_output_dir=True (deletes them), or pick another output_dir"
        )
    if found and is_rank_zero:
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    barrier()
    return found


def check_resumed_run(
    checkpoint: Path, saved: Any, now_hash: str, now_config: Dict[str, Any], options: OutputDirOptions
) -> Optional[str]:
    """Refuse to resume a checkpoint written under another config, unless ``resume_config_hash``
    names the checkpoint's hash.

    Args:
        checkpoint: the step checkpoint folder.
        saved: its ``TrainingProgress`` (``config_hash`` and ``run_config`` are None in checkpoints
            written before the hash existed).
        now_hash, now_config: this run's :func:`config_hash` and :func:`hashed_config`.

    Returns:
        A warning to log when the checkpoint is resumed unchecked or despite a difference (else None).

    Raises:
        ValueError: naming both hashes, the differing keys and the option that accepts them.
    """
    if options.resume_config_hash is not None and options.resume_config_hash != saved.config_hash:
        raise ValueError(
            f"resume_config_hash is {options.resume_config_hash!r} but {checkpoint} was written by run "
            f"{saved.config_hash!r}; this config's hash is {now_hash!r}"
        )
    if saved.config_hash is None:
        return f"{checkpoint} records no config hash (written by an older version): cannot check that it is this config's run"
    if saved.config_hash == now_hash:
        return None
    changes = "; ".join(config_differences(saved.run_config, now_config)) if saved.run_config is not None else "unknown keys"
    if options.resume_config_hash == saved.config_hash:
        return f"resuming run {saved.config_hash} from {checkpoint} under a changed config (hash {now_hash}): {changes}"
    raise ValueError(
        f"cannot resume {checkpoint}: it was written by run {saved.config_hash!r}, and this config (hash {now_hash!r}) "
        f"differs in {changes}. Resume it anyway with resume_config_hash={saved.config_hash}, or start a new run in "
        "another output_dir (or over this one with overwrite_output_dir=True)"
    )


__all__ = [
    "RUN_CONTROL_KEYS",
    "OutputDirOptions",
    "check_resumed_run",
    "claim_output_dir",
    "config_differences",
    "config_hash",
    "hashed_config",
    "output_dir_options",
    "previous_run_files",
]
