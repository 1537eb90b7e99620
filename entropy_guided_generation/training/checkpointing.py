"""Resumable step checkpoints, and the Hugging Face checkpoint (+ ``confidence.json``) of each epoch.

Step checkpoints live in ``<output_dir>/step_checkpoints/step_<NNNNNNNN>/``:

- ``model.pt``: full torchtune-format model state dict;
- ``optimizer.pt``: full optimizer state (in-backward optimizers: their wrapper's state);
- ``progress.json``: where training stands (global step, epochs run, steps into the current
  epoch, seed, confidence codec) -- together with the per-epoch seeded sampler this fixes the
  data position exactly;
- ``rank_<r>.pt``: each rank's RNG states (torch, CUDA, Python, NumPy).

A save is atomic: files go into ``step_<N>.partial/`` and the folder is renamed when complete, so a
crash mid-save leaves the previous checkpoint as the latest one. Only complete folders are loaded.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torchtune import training

from entropy_guided_generation.confidence import ConfidenceCodec, write_confidence_json

STEP_CHECKPOINTS_DIRNAME = "step_checkpoints"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
PARTIAL_SUFFIX = ".partial"


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
        prune_step_checkpoints(root, keep_last)
    parallel.barrier()
    return final


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


def prune_step_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    for old in complete_step_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)


def load_step_checkpoint(path: Path, rank: int) -> StepCheckpoint:
    """Load a complete step checkpoint folder for ``rank``.

    Raises:
        FileNotFoundError: naming a missing file (e.g. a folder saved with fewer ranks).
    """
    path = Path(path)
    needed = [MODEL_FILE, OPTIMIZER_FILE, PROGRESS_FILE, rank_file(rank)]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"step checkpoint {path} lacks {', '.join(missing)}")
    progress = TrainingProgress(**json.loads((path / PROGRESS_FILE).read_text()))
    return StepCheckpoint(
        path=path,
        model_state=torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True),
        optimizer_state=torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        progress=progress,
        rank_state=torch.load(path / rank_file(rank), map_location="cpu", weights_only=True),
    )


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
) -> Path:
    """Write ``<output_dir>/epoch_<epoch>/`` through torchtune's checkpointer (HF format for
    ``FullModelHFCheckpointer``) and ``confidence.json`` beside the weights.

    Returns:
        The epoch folder.
    """
    checkpointer.save_checkpoint({training.MODEL_KEY: model_state}, epoch=epoch, intermediate_checkpoint=False)
    folder = Path(output_dir) / f"epoch_{epoch}"
    if codec is not None:
        write_confidence_json(folder, codec, mode, marker, positions=positions)
    return folder


__all__ = [
    "PARTIAL_SUFFIX",
    "STEP_CHECKPOINTS_DIRNAME",
    "StepCheckpoint",
    "TrainingProgress",
    "complete_step_checkpoints",
    "latest_step_checkpoint",
    "load_step_checkpoint",
    "prune_step_checkpoints",
    "rng_state",
    "save_hf_checkpoint",
    "save_step_checkpoint",
    "set_rng_state",
]
