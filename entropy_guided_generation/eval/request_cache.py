"""Answered lm-eval requests, kept in ``output_dir`` one by one as they finish, so that a rerun of an
interrupted eval (``kill -9``, SIGTERM, a preempted job) recomputes only the requests still unanswered.

One SQLite file per rank: ``<output_dir>/request_cache/<identity>/rank<r>-of-<W>.sqlite``. The
identity is a hash of what fixes the answers (the checkpoint's weight files, the eval settings that change
outputs, the tasks), so another model, config or task never reads them. Inside, a request is keyed
as lm-eval's ``--use_cache`` keys it (``hash_args(request_type, args)``); the value is its response
and its confidence trace (JSON), so a resumed run writes the same samples, traces and calibration as
an uninterrupted one. Each answer is committed on its own (WAL journal): a process killed at any
point loses at most the requests in flight. Requests that sample (``do_sample``) are neither read nor
written, as with ``--use_cache``; budget-forced requests (whose samples log what forcing did) are
never stored, so always recomputed.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lm_eval.api.model import hash_args
from torchtune import utils

log = utils.get_logger("INFO")

REQUEST_CACHE_DIRNAME = "request_cache"
IDENTITY_LENGTH = 16
# Eval settings that do not change any answer: where results go, how many documents, how metrics are summarized.
NOT_IN_IDENTITY = ("output_dir", "limit", "bootstrap_iters", "log_level")
# What identifies a checkpoint folder's weights (any checkpointer's file layout, shards included).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CHECKPOINT_METADATA_FILES = ("config.json", "confidence.json")
# Trace fields that say where a request came from: set from the request being answered, not stored.
TRACE_ORIGIN_FIELDS = ("task", "doc_id", "request_index")


def checkpoint_fingerprint(checkpoint_dir: Path) -> list:
    """The folder's path and ``[name, bytes, mtime_ns]`` of each weight file in it (and of its
    ``config.json`` and ``confidence.json``): weights replaced in place (another size or modification
    time) make another identity; results written beside them do not."""
    folder = Path(checkpoint_dir).resolve()
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name in CHECKPOINT_METADATA_FILES):
            stat = path.stat()
            entries.append([path.name, stat.st_size, stat.st_mtime_ns])
    return [str(folder), entries]


def cache_identity(checkpoint: list, settings: Mapping[str, Any], tasks: Any) -> str:
    """A short hash of the checkpoint fingerprint, the eval settings (less :data:`NOT_IN_IDENTITY`)
    and the task specs: the name of the folder holding this eval's answers."""
    kept = {key: value for key, value in settings.items() if key not in NOT_IN_IDENTITY}
    text = json.dumps([checkpoint, kept, tasks], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:IDENTITY_LENGTH]


def cache_path(output_dir: Path, identity: str, rank: int, world_size: int) -> Path:
    """Rank ``rank``'s answers file: ranks answer disjoint shares, each resumes its own."""
    return Path(output_dir) / REQUEST_CACHE_DIRNAME / identity / f"rank{rank}-of-{world_size}.sqlite"


def is_sampled(request_type: str, args: Sequence[Any]) -> bool:
    """True for a generation request that samples (lm-eval's ``CachingLM`` rule: ``do_sample``)."""
    return request_type == "generate_until" and bool(dict(args[1] or {}).get("do_sample", False))


@dataclass(frozen=True)
class Answer:
    """A stored answer: lm-eval's response and the trace fields other than where it came from."""

    response: Any
    trace: Optional[dict]


def _response_from_json(request_type: str, value: Any) -> Any:
    """lm-eval's response type back from JSON: loglikelihood answers are ``(logprob, is_greedy)`` tuples."""
    return tuple(value) if request_type == "loglikelihood" else value


class RequestCache:
    """One rank's answered requests in one SQLite file (created with its folders when missing).

    Args:
        path: the file (see :func:`cache_path`).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None)  # autocommit: every write is its own commit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a commit survives the process being killed
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.reused = 0
        self.stored = 0

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def lookup(self, request_type: str, args: Sequence[Any]) -> Optional[Answer]:
        """The stored answer of a request, or None (never for a sampled one)."""
        if is_sampled(request_type, args):
            return None
        row = self._db.execute("SELECT value FROM answers WHERE key = ?", (hash_args(request_type, args),)).fetchone()
        if row is None:
            return None
        value = json.loads(row[0])
        return Answer(_response_from_json(request_type, value["response"]), value["trace"])

    def store(self, request_type: str, args: Sequence[Any], response: Any, trace: Optional[Any] = None) -> None:
        """Commit one answer now (a sampled request is not stored)."""
        if is_sampled(request_type, args):
            return
        fields = None
        if trace is not None:
            fields = {k: v for k, v in trace.to_dict().items() if k not in TRACE_ORIGIN_FIELDS}
        value = json.dumps({"response": response, "trace": fields})
        self._db.execute("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)", (hash_args(request_type, args), value))
        self.stored += 1

    def close(self) -> None:
        self._db.close()


def split_answered(cache: Optional[RequestCache], request_type: str, requests: Sequence[Any]) -> tuple[list, list]:
    """``(answered, rest)``: ``(position, request, Answer)`` for the requests ``cache`` holds and
    ``(position, request)`` for the others, positions in ``requests``. With a cache, logs
    ``<type>: A of N requests answered by an earlier run (<file>); computing R``."""
    answered, rest = [], []
    for position, request in enumerate(requests):
        answer = cache.lookup(request_type, request.args) if cache is not None else None
        if answer is None:
            rest.append((position, request))
        else:
            answered.append((position, request, answer))
    if cache is not None:
        log.info(f"{request_type}: {len(answered)} of {len(requests)} requests answered by an earlier run ({cache.path}); computing {len(rest)}")
    return answered, rest


__all__ = [
    "NOT_IN_IDENTITY",
    "REQUEST_CACHE_DIRNAME",
    "Answer",
    "RequestCache",
    "cache_identity",
    "cache_path",
    "checkpoint_fingerprint",
    "is_sampled",
    "split_answered",
]
