"""One run per ``output_dir`` at a time, for finetunes and evals alike.

A run holds an exclusive ``fcntl.flock`` on ``<output_dir>/.run.lock`` for its lifetime and writes
its process id, host and command into the file, so a second run started into the same folder is
refused naming the holder. The kernel drops the lock when its process dies (``kill -9`` included),
so a lock file left by a dead process is taken over, with a warning naming that process.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from torchtune import utils

log = utils.get_logger("INFO")

LOCK_FILENAME = ".run.lock"


class OutputDirInUseError(RuntimeError):
    """Another live process holds the lock on the ``output_dir``."""


def _holder_text(record: dict) -> str:
    """``process 123 on host (command) since <time>`` from a lock file's record."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"])) if "started" in record else "an unknown time"
    return f"process {record.get('pid', '?')} on {record.get('host', '?')} ({record.get('command', '?')}) since {since}"


def _read_record(fd: int) -> Optional[dict]:
    """The holder record in an open lock file (None when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", errors="replace").strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def _write_record(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500], "started": time.time()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)


class RunLock:
    """The held lock on one ``output_dir``; :meth:`release` (or the process's end) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: Optional[int] = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the holder record and unlock (an emptied file means "left cleanly", not stale)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:
        self.release()  # a run object dropped without cleanup frees its folder too

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output_dir(output_dir: Path, what: str = "run") -> RunLock:
    """Take the run lock of ``output_dir`` (created if missing) for this process.

    Args:
        output_dir: the run's folder.
        what: the kind of run, for messages (``finetune``, ``eval``).

    Returns:
        The held :class:`RunLock`.

    Raises:
        OutputDirInUseError: naming the process that holds the lock and the ways on.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        record = _read_record(fd)
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        holder = _holder_text(record) if record else "another process"
        raise OutputDirInUseError(
            f"output_dir {output_dir} is in use by {holder} (lock {path}); one {what} per output_dir at a time: "
            "wait for that run to end, stop it, or pick another output_dir"
        ) from None
    stale = _read_record(fd)
    if stale is not None:
        log.warning(f"{path}: taking over the lock left by {_holder_text(stale)}, which is no longer running")
    _write_record(fd)
    return RunLock(path, fd)


__all__ = ["LOCK_FILENAME", "OutputDirInUseError", "RunLock", "lock_output_dir"]
