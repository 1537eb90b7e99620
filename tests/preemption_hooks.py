"""Test seams for ``test_preemption.py``, imported by the recipe subprocesses (``tests/`` is put on
their ``PYTHONPATH``): points where a test can send a real signal and know what the run was doing.

- :class:`PausingDiskLogger`: torchtune's ``DiskLogger`` that, once it has logged step
  ``pause_at_step``, writes ``<log_dir>/paused`` and waits for ``<log_dir>/go``; the test sends its
  signal in between, so the run is stopped right after that step (one device).
- :func:`run_signalling_mid_save`: runs a recipe module as ``python -m`` would, and sends the process
  ``signum`` right after the final save (the one a stop signal starts) has written ``model.pt``.
- run as a script (``python`` or ``tune run --nproc_per_node N``), this file is the eval recipe with
  each rank halting for good once it has committed a chosen number of answers to its request cache
  (:func:`pause_after_answers`), where the test kills it.
"""
from __future__ import annotations

import os
import runpy
import signal
import time
from pathlib import Path
from typing import Any, Mapping

from torchtune.training.metric_logging import DiskLogger

PAUSED_FILE = "paused"
GO_FILE = "go"


class PausingDiskLogger(DiskLogger):
    """``DiskLogger`` that pauses after logging step ``pause_at_step`` until ``<log_dir>/go`` exists.

    Args:
        log_dir: as ``DiskLogger``.
        pause_at_step: the step after which to pause.
        timeout_s: give up waiting (and go on) after this long, so a broken test cannot hang.
    """

    def __init__(self, log_dir: str, pause_at_step: int, timeout_s: float = 120.0, **kwargs: Any):
        super().__init__(log_dir, **kwargs)
        self.pause_at_step = int(pause_at_step)
        self.timeout_s = float(timeout_s)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        super().log_dict(payload, step)
        if step != self.pause_at_step:
            return
        (self.log_dir / PAUSED_FILE).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout_s
        while not (self.log_dir / GO_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # a signal arriving here runs its handler between two sleeps


def run_signalling_mid_save(module: str, signum: int = signal.SIGINT) -> None:
    """``python -m module`` (argv as given), sending this process ``signum`` once the final save
    that a stop signal starts has written the model file (its optimizer state and progress not yet)."""
    from entropy_guided_generation.training import checkpointing, preemption

    saving = {"final": False}
    begin_saving = preemption.StopSignals.begin_saving
    save = checkpointing._save

    def mark_final_save(self: Any) -> None:
        saving["final"] = True
        begin_saving(self)

    def save_then_signal(obj: Any, path: Path) -> None:
        save(obj, path)
        if saving["final"] and Path(path).name == checkpointing.MODEL_FILE:
            os.kill(os.getpid(), signum)

    preemption.StopSignals.begin_saving = mark_final_save
    checkpointing._save = save_then_signal
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def pause_after_answers(answers: int, paused_file: str) -> None:
    """Make this process stop computing once ``answers`` requests are committed to its request cache:
    it writes ``paused_file`` (``{rank}`` filled in) and waits there until killed."""
    from entropy_guided_generation.eval import request_cache
    from entropy_guided_generation.eval.distributed import rank_and_world_size

    store = request_cache.RequestCache.store
    committed = {"count": 0}

    def store_then_pause(self: Any, *args: Any, **kwargs: Any) -> None:
        store(self, *args, **kwargs)
        committed["count"] += 1
        if committed["count"] == answers:
            Path(paused_file.format(rank=rank_and_world_size()[0])).write_text(str(os.getpid()))
            while True:
                time.sleep(1)

    request_cache.RequestCache.store = store_then_pause


if __name__ == "__main__":
    # ``[tune run [--nproc_per_node N]] tests/preemption_hooks.py --config <eval yaml> ...``: the eval
    # recipe, each rank halting after $EGG_TEST_PAUSE_AFTER answers (writing $EGG_TEST_PAUSED_FILE).
    import sys

    pause_after_answers(int(os.environ["EGG_TEST_PAUSE_AFTER"]), os.environ["EGG_TEST_PAUSED_FILE"])
    from entropy_guided_generation.eleuther_eval import recipe_main

    sys.exit(recipe_main())
