"""Resumable step checkpoints, and the Hugging Face checkpoint (+ ``confidence.json``) of each epoch.

Step checkpoints live in ``<output_dir>/step_checkpoints/step_<NNNNNNNN>/``:

- ``model.pt``: full torchtune-format model state dict;
- ``optimizer.pt``: full optimizer state (in-backward optimizers: their wrapper's state);
- ``progress.json``: where training stands (global step, epochs run, steps into the current
  epoch, seed, confidence codec) -- together with the per-epoch seeded sampler this fixes the
  data position exactly;
- ``rank_<r>.pt``: each rank's RNG states (torch, CUDA, Python, NumPy).

A save is atomic: files go into ``step_<N>.partial/`` and the folder is renamed when complete, so a
crash mid-save leaves the previous checkpoint as the latest one. Only complete folders are loaded; a
complete folder whose files cannot be read (a disk fault, a truncated copy) is skipped on resume for
the previous one and renamed ``step_<N>.corrupt``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchtune import training, utils

from entropy_guided_generation.confidence import ConfidenceCodec, write_confidence_json
from entropy_guided_generation.vocabulary import state_dict_rows

STEP_CHECKPOINTS_DIRNAME = "step_checkpoints"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
PARTIAL_SUFFIX = ".partial"
CORRUPT_SUFFIX = ".corrupt"

log = utils.get_logger("INFO")


class UnreadableCheckpointError(RuntimeError):
    """A complete step checkpoint folder with a missing, truncated or corrupt file."""


@dataclass
class TrainingProgress:
    """Where a run stands after ``global_step`` optimizer steps.

    Attributes:
        global_step: optimizer steps taken so far.
        epochs_run: epochs completed.
        steps_in_epoch: optimizer steps taken in the current, unfinished epoch.
        seed: the run's seed (the sampler's shuffle depends on it and on the epoch).
        mode: the interleaving mode trained.
        world_size, batch_size, gradient_accumulation_steps, max_steps_per_epoch: the settings
            that fix the data position; a resume with other values is refused.
        confidence: the codec as ``confidence.json`` metadata (fitted quantile edges survive).
        config_hash: names the run (``run_dir.config_hash`` of its config); None in older checkpoints.
        run_config: the hashed part of the config, to name what changed when a resume is refused.
    """

    global_step: int
    epochs_run: int
    steps_in_epoch: int
    seed: int
    mode: str
    world_size: int
    batch_size: int
    gradient_accumulation_steps: int
    max_steps_per_epoch: Optional[int]
    confidence: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    config_hash: Optional[str] = None
    run_config: Optional[Dict[str, Any]] = None


@dataclass
class StepCheckpoint:
    """A loaded step checkpoint (``rank_state`` is this rank's)."""

    path: Path
    model_state: Dict[str, Any]
    optimizer_state: Dict[str, Any]
    progress: TrainingProgress
    rank_state: Dict[str, Any]


def rng_state() -> Dict[str, Any]:
    """This process's random-number-generator states (torch CPU and CUDA, Python, NumPy)."""
    mt, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def save_step_checkpoint(
    root: Path,
    progress: TrainingProgress,
    *,
    parallel: Any,
    model_state: Dict[str, Any],
    optimizer_state: Dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a step checkpoint atomically (every rank calls this; rank 0 writes the shared files).

    Args:
        root: ``<output_dir>/step_checkpoints``.
        progress: the run's position.
        parallel: the parallelism object (rank, barrier).
        model_state, optimizer_state: full states (used on rank 0 only).
        keep_last: complete checkpoints to keep; older ones are deleted after this one is in place.

    Returns:
        The final folder ``root/step_<N>``.
    """
    final = root / step_dir_name(progress.global_step)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if parallel.is_rank_zero:
        if partial.exists():  # left by an earlier crash
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    parallel.barrier()
    _save(rng_state(), partial / rank_file(parallel.rank))
    if parallel.is_rank_zero:
        _save(model_state, partial / MODEL_FILE)
        _save(optimizer_state, partial / OPTIMIZER_FILE)
        (partial / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
        _fsync_file(partial / PROGRESS_FILE)
    parallel.barrier()
    if parallel.is_rank_zero:
        _fsync_dir(partial)
        if final.exists():  # the same step saved twice (e.g. an epoch end that is also a save step)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        prune_step_checkpoints(root, keep_last, just_written=final)
    parallel.barrier()
    return final


def remove_step_checkpoints(output_dir: Path) -> None:
    """Delete ``output_dir``'s step checkpoints (complete, partial and set aside), once nothing will
    resume from them; the run's ``epoch_*`` checkpoints stay."""
    root = Path(output_dir) / STEP_CHECKPOINTS_DIRNAME
    if root.is_dir():
        shutil.rmtree(root)


def complete_step_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoint folders under ``root``, oldest first (partial saves are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_step_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete step checkpoint under ``root``, or None."""
    found = complete_step_checkpoints(root)
    return found[-1] if found else None


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def prune_step_checkpoints(root: Path, keep_last: int, just_written: Optional[Path] = None) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints.

    With ``just_written``, that one is always kept and counted among the ``keep_last``; folders
    with a higher step number (not this run's timeline: it just wrote an older step) are left in
    place with a warning, never deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = complete_step_checkpoints(root)
    if just_written is not None:
        newer = [p for p in found if _step_of(p) > _step_of(just_written)]
        if newer:
            log.warning(f"step checkpoints {[p.name for p in newer]} are newer than the one just written ({just_written.name}); left in place")
        found = [p for p in found if _step_of(p) <= _step_of(just_written)]
    for old in found[:-keep_last]:
        shutil.rmtree(old)


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """``reader(path)``, any failure re-raised as :class:`UnreadableCheckpointError` naming the file."""
    try:
        return reader(path)
    except Exception as err:  # a corrupt file fails in many ways (EOFError, zip, pickle, JSON, fields)
        raise UnreadableCheckpointError(f"step checkpoint file {path} is unreadable ({type(err).__name__}: {err})") from err


def _torch_file(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _progress_file(path: Path) -> TrainingProgress:
    return TrainingProgress(**json.loads(path.read_text()))


def load_step_checkpoint(path: Path, rank: int, world_size: Optional[int] = None) -> StepCheckpoint:
    """Load a complete step checkpoint folder for ``rank``.

    Args:
        world_size: this run's number of ranks; a checkpoint saved by another number is refused.

    Raises:
        ValueError: naming the saved and the current world size when they differ.
        UnreadableCheckpointError: naming a missing or unreadable file.
    """
    path = Path(path)
    if not (path / PROGRESS_FILE).is_file():
        raise UnreadableCheckpointError(f"step checkpoint {path} lacks {PROGRESS_FILE}")
    progress = _read(path / PROGRESS_FILE, _progress_file)
    if world_size is not None and progress.world_size != world_size:
        raise ValueError(
            f"cannot resume {path}: it was saved by {progress.world_size} rank(s) and this run has {world_size}; "
            f"resume with {progress.world_size} process(es) (the data order and RNG states are per rank)"
        )
    missing = [name for name in (MODEL_FILE, OPTIMIZER_FILE, rank_file(rank)) if not (path / name).is_file()]
    if missing:
        raise UnreadableCheckpointError(f"step checkpoint {path} lacks {', '.join(missing)}")
    return StepCheckpoint(
        path=path,
        model_state=_read(path / MODEL_FILE, _torch_file),
        optimizer_state=_read(path / OPTIMIZER_FILE, _torch_file),
        progress=progress,
        rank_state=_read(path / rank_file(rank), _torch_file),
    )


def load_newest_readable(
    root: Path, rank: int, world_size: int, all_ranks: Callable[[bool], bool] = lambda ok: ok
) -> Tuple[StepCheckpoint, List[Tuple[Path, str]]]:
    """The newest complete step checkpoint under ``root`` that every rank can read.

    Every rank calls this, trying the same folders newest first; ``all_ranks(ok)`` (a collective
    on several ranks) says whether every rank read the folder, so all ranks settle on the same one.

    Returns:
        The loaded checkpoint and the newer folders skipped, each with why.

    Raises:
        FileNotFoundError: when no complete checkpoint is readable (naming each and why).
        ValueError: on a world-size change (see :func:`load_step_checkpoint`).
    """
    skipped: List[Tuple[Path, str]] = []
    for path in reversed(complete_step_checkpoints(root)):
        try:
            loaded, why = load_step_checkpoint(path, rank, world_size), ""
        except UnreadableCheckpointError as err:
            loaded, why = None, str(err)
        if all_ranks(loaded is not None):
            return loaded, skipped
        skipped.append((path, why or "unreadable on another rank"))
    if not skipped:
        raise FileNotFoundError(f"resume_from_checkpoint is True but there is no complete step checkpoint under {root}")
    reasons = "; ".join(f"{path.name}: {why}" for path, why in skipped)
    raise FileNotFoundError(f"resume_from_checkpoint is True but no step checkpoint under {root} is readable: {reasons}")


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint folder to ``<name>.corrupt`` (kept for inspection; never
    loaded or pruned) and return the new path."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    if target.exists():
        shutil.rmtree(target)
    os.replace(path, target)
    return target


def save_hf_checkpoint(
    checkpointer: Any,
    model_state: Dict[str, Any],
    *,
    epoch: int,
    output_dir: Path,
    codec: Optional[ConfidenceCodec],
    mode: str,
    marker: Optional[str],
    positions: str = "sequential",
    tokenizer: Any = None,
) -> Path:
    """Write ``<output_dir>/epoch_<epoch>/`` through torchtune's checkpointer (HF format for
    ``FullModelHFCheckpointer``) and ``confidence.json`` beside the weights (every mode: without a
    codec it records the mode, codec fields null).

    The checkpointer copies the base folder's ``config.json`` and tokenizer files; when the run grew
    the vocabulary (added confidence tokens) the copy's ``vocab_size`` is set to the saved rows, and a
    ``tokenizer`` that can ``save_pretrained`` (an HF model tokenizer) writes its files, added tokens
    included, so that ``transformers`` and the eval recipe load the folder as trained.

    Returns:
        The epoch folder.
    """
    checkpointer.save_checkpoint({training.MODEL_KEY: model_state}, epoch=epoch, intermediate_checkpoint=False)
    folder = Path(output_dir) / f"epoch_{epoch}"
    write_confidence_json(folder, codec, mode, marker, positions=positions)
    rows = state_dict_rows(model_state)
    config_path = folder / "config.json"
    if rows is not None and config_path.is_file():
        hf_config = json.loads(config_path.read_text())
        if hf_config.get("vocab_size") != rows:
            hf_config["vocab_size"] = rows
            config_path.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(folder)
    return folder


__all__ = [
    "CORRUPT_SUFFIX",
    "PARTIAL_SUFFIX",
    "STEP_CHECKPOINTS_DIRNAME",
    "StepCheckpoint",
    "TrainingProgress",
    "UnreadableCheckpointError",
    "complete_step_checkpoints",
    "latest_step_checkpoint",
    "load_newest_readable",
    "load_step_checkpoint",
    "prune_step_checkpoints",
    "remove_step_checkpoints",
    "rng_state",
    "save_hf_checkpoint",
    "save_step_checkpoint",
    "set_aside",
    "set_rng_state",
]
