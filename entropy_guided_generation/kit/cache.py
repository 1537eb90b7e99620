"""The kit's on-disk cache: every artifact lives in a folder named by a content hash of what built it.

A build runs in a private temporary folder and is published with one atomic ``os.replace``; a
per-artifact ``fcntl`` lock makes concurrent processes (pytest-xdist workers) wait for the first
build instead of repeating it. A published folder is never modified afterwards.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

CACHE_ENV = "EGG_KIT_CACHE"
# Bump when a builder's output format changes in a way its arguments do not capture.
KIT_FORMAT_VERSION = 1
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_COMPLETE_MARKER = ".complete"


def kit_cache_dir() -> Path:
    """The folder holding every kit artifact: ``$EGG_KIT_CACHE``, else ``<repo>/.kit_cache`` for a
    source checkout, else ``~/.cache/entropy_guided_generation/kit`` for an installed package.
    Created on first use."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        path = Path(configured).expanduser()
    elif (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        path = _PACKAGE_DIR.parent / ".kit_cache"
    else:
        path = Path.home() / ".cache" / "entropy_guided_generation" / "kit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(kind: str, spec: Mapping[str, Any], sources: tuple[Path, ...] = ()) -> str:
    """A short stable hash naming one artifact: its kind, its builder arguments and the text of the
    source files that produce it (so that editing a generator invalidates what it built)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"kind": kind, "version": KIT_FORMAT_VERSION, "spec": spec}, sort_keys=True).encode())
    for source in sources:
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_folder(kind: str, spec: Mapping[str, Any], build: Callable[[Path], None], sources: tuple[Path, ...] = ()) -> Path:
    """Return ``<cache>/<kind>-<hash>``, calling ``build(tmp_folder)`` to fill it the first time.

    Args:
        kind: artifact family, e.g. ``"tokenizer"``; the folder name starts with it.
        spec: JSON-serializable builder arguments; part of the hash.
        build: writes the artifact's files into the (empty, existing) folder it is given.
        sources: files whose bytes are part of the hash.

    Returns:
        The published folder (complete; never modified afterwards).
    """
    cache = kit_cache_dir()
    final = cache / f"{kind}-{content_key(kind, spec, sources)}"
    if (final / _COMPLETE_MARKER).is_file():
        return final
    with _exclusive_lock(cache / f"{final.name}.lock"):
        if (final / _COMPLETE_MARKER).is_file():
            return final
        if final.exists():  # left by a process killed between rename and marker: rebuild
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
        try:
            build(staging)
            (staging / _COMPLETE_MARKER).write_text(json.dumps({"kind": kind, "spec": spec}, sort_keys=True))
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final
