"""Preemption: SIGTERM or SIGINT asks a finetune to stop after the optimizer step in flight.

A cluster preempts a job with SIGTERM and kills it a grace period later. :class:`StopSignals` turns
the first SIGTERM/SIGINT into a flag; the training loop reads it after every optimizer step (every
rank agreeing, under FSDP2, through one all-reduce), writes a step checkpoint and raises
:class:`RunPreempted`, which the entry points turn into exit status 128 + signal (143 for SIGTERM,
130 for SIGINT). A repeat of the signal before the save begins is absorbed (a launcher such as
torchrun forwards the signal the job already got); a signal once the save has begun exits at once,
leaving the half-written ``step_<N>.partial`` that resume ignores for the previous complete step.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 128 + signal (143 SIGTERM, 130 SIGINT)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class RunPreempted(RuntimeError):
    """A run stopped on a signal after saving its progress.

    Attributes:
        signum: the signal that stopped it.
        step: the last optimizer step taken (and saved).
        exit_status: what the entry point exits with (:func:`exit_status`).
    """

    def __init__(self, message: str, *, signum: int, step: int):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.exit_status = exit_status(signum)


class StopSignals:
    """Catches SIGTERM and SIGINT while installed (a ``with`` block, main thread only).

    ``received`` is the first signal caught (None before any); :meth:`begin_saving` marks the start
    of the final save, after which any caught signal ends the process at once with
    ``os._exit(128 + signal)``.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._saving = False
        self._previous: Dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._saving:
            message = f"{signal_name(signum)} during the final save: exiting now (resume falls back to the previous complete step checkpoint)"
            os.write(2, f"\n{message}\n".encode())
            os._exit(exit_status(signum))
        if self.received is None:
            self.received = signum
            os.write(2, f"\n{signal_name(signum)} received: stopping after the optimizer step in flight\n".encode())

    def begin_saving(self) -> None:
        """From now on a signal exits at once (the save it interrupts is never renamed complete)."""
        self._saving = True

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; a run in another thread keeps the defaults
        for signum in CAUGHT_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def resume_hint(step: int, signum: int, step_dir: Any) -> str:
    """The log line of a run stopped by ``signum`` after ``step``, saying how to continue it."""
    return (
        f"Stopped by {signal_name(signum)} after step {step}; step checkpoint {step_dir} holds it. "
        "Resume with the same command plus resume_from_checkpoint=True"
    )


__all__ = ["CAUGHT_SIGNALS", "RunPreempted", "StopSignals", "exit_status", "resume_hint", "signal_name"]
