"""The eval request cache on its own: what names a cache folder, and what an answer keeps.

Invariants: another checkpoint (weights replaced in place), another setting that changes outputs or
another task list names another folder, while where results go and how many documents run do not;
an answer read back is the response and trace that were stored (exact floats, -inf included, the
loglikelihood tuple), from a fresh connection, as a killed process leaves it; sampled requests are
neither stored nor read. (End to end, kill -9 mid-eval then rerun: ``tests/test_preemption.py``.)
"""
from __future__ import annotations

import os
from pathlib import Path

from entropy_guided_generation.eval.request_cache import RequestCache, cache_identity, cache_path, checkpoint_fingerprint
from entropy_guided_generation.eval.traces import ConfidenceTrace

SETTINGS = {"output_dir": "/out/a", "limit": 10, "batch_size": 8, "max_gen_toks": 64, "interleaving": {"mode": "answer"}}
TASKS = ["kit_gsm8k"]


def checkpoint(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    return folder


def test_identity_changes_with_checkpoint_outputs_settings_and_tasks_only(tmp_path):
    folder = checkpoint(tmp_path / "ckpt")
    base = cache_identity(checkpoint_fingerprint(folder), SETTINGS, TASKS)
    assert cache_identity(checkpoint_fingerprint(folder), {**SETTINGS, "output_dir": "/out/b", "limit": 3}, TASKS) == base
    (folder / "results_2026.json").write_text("{}")  # results written beside the weights
    assert cache_identity(checkpoint_fingerprint(folder), SETTINGS, TASKS) == base

    assert cache_identity(checkpoint_fingerprint(folder), {**SETTINGS, "max_gen_toks": 32}, TASKS) != base
    assert cache_identity(checkpoint_fingerprint(folder), {**SETTINGS, "interleaving": {"mode": "full"}}, TASKS) != base
    assert cache_identity(checkpoint_fingerprint(folder), SETTINGS, ["kit_gsm8k", "kit_arith_choice"]) != base
    stat = (folder / "model.safetensors").stat()
    (folder / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, new contents
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert cache_identity(checkpoint_fingerprint(folder), SETTINGS, TASKS) != base
    assert cache_path(tmp_path, base, 1, 2) == tmp_path / "request_cache" / base / "rank1-of-2.sqlite"


def test_answers_read_back_exactly_from_a_new_connection(tmp_path):
    path = tmp_path / "rank0-of-1.sqlite"
    trace = ConfidenceTrace(
        task="t", doc_id=3, request_index=1, request_type="loglikelihood", mode="answer", tokens=[5, 6],
        bins=[2, -1], signal=[0.1 + 0.2, None], entropy=[1e-300, 2.5], logprob=[-float("inf"), -0.5], sequence_confidence=0.0,
    )
    cache = RequestCache(path)
    cache.store("loglikelihood", ("ctx", " cont"), (-float("inf"), False), trace)
    cache.store("generate_until", ("ctx", {"until": ["\n"]}), "an answer", None)
    cache.store("generate_until", ("ctx", {"do_sample": True}), "a sample", None)
    del cache  # no close(): as a killed process leaves it

    again = RequestCache(path)
    assert len(again) == 2
    answer = again.lookup("loglikelihood", ("ctx", " cont"))
    assert answer.response == (-float("inf"), False) and isinstance(answer.response, tuple)
    stored = {k: v for k, v in trace.to_dict().items() if k not in ("task", "doc_id", "request_index")}
    assert answer.trace == stored
    assert again.lookup("generate_until", ("ctx", {"until": ["\n"]})).response == "an answer"
    assert again.lookup("generate_until", ("ctx", {"do_sample": True})) is None
    assert again.lookup("loglikelihood", ("ctx", " other")) is None
    assert again.lookup("loglikelihood_rolling", ("ctx", " cont")) is None  # the request type is part of the key
    again.close()
