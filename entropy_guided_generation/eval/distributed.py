"""Data-parallel lm-eval across the processes of a torchrun (or ``accelerate launch``) launch.

lm-eval's evaluator splits each task's documents by ``lm.rank`` / ``lm.world_size`` (rank r gets
documents r, r + W, r + 2W, ... of the limited set), runs every rank's share, then gathers logged
samples and per-sample metrics to rank 0 with ``lm.gather_object``; only rank 0 gets results.
:class:`DataParallelLM` gives our lm-eval models those hooks from ``torch.distributed`` (gloo on CPU,
NCCL on GPU) and two repairs that make a W-rank run equal the one-process run:

- gathered samples and metrics come back in the one-process document order (lm-eval would chain
  rank 0's share, then rank 1's, ..., which changes summation order and bootstrap resampling);
- lm-eval pads a short rank's request list with copies of its last request (so that ranks run the
  same number of batches) and appends their responses to that request. Our models need no such
  lock-step: a copy gets its original's response without any compute and leaves no trace, and the
  extra responses are dropped at the barrier lm-eval calls right after appending them.

Under lm-eval's ``--use_cache``, :class:`PaddingAwareCachingLM` (in place of lm-eval's ``CachingLM``
while :func:`padding_aware_use_cache` is active, as in our CLI) tells the model about the padding
copies even when the cache answers them, so a cached rerun writes the same samples.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import lm_eval.api.model
import torch
import torch.distributed as dist
from lm_eval.api.model import CachingLM
from torchtune import training

REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def launched_world_size() -> int:
    """Processes the launcher started (torchrun's and accelerate's ``WORLD_SIZE``; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device: torch.device) -> bool:
    """Initialize the default process group when launched with more than one process and none exists
    yet (backend for ``device``: gloo on CPU, NCCL on CUDA; rendezvous from the launcher's env vars).

    Returns:
        True when this call initialized it (the caller then owns it and leaves it when done).
    """
    if launched_world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend=training.get_distributed_backend(device.type))
        return True
    return False


def leave_process_group() -> None:
    """Destroy the default process group if one is initialized (a clean exit under NCCL)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_to_rank_zero(obj: Any) -> Optional[list]:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks.
    Without a process group: ``[obj]``."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def rank_results_in_document_order(per_rank: Sequence[Sequence[Any]]) -> list:
    """Per-document items of each rank back in document order: rank r held documents r, r + W, ...
    (lm-eval's split), so item i of rank r is document i * W + r."""
    longest = max((len(items) for items in per_rank), default=0)
    return [items[i] for i in range(longest) for items in per_rank if i < len(items)]


def _is_samples(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(s, dict) and "filter" in s and "doc_id" in s for s in values)


def in_document_order(per_rank: Sequence[Any]) -> Optional[dict]:
    """One object in the one-process order from lm-eval's per-rank ``{task: logged samples}`` or
    ``{task: {(metric, filter): per-document values}}``; None for any other shape.

    Logged samples are listed filter by filter, each filter's samples in document order; metric
    values are one per document.
    """
    if not all(isinstance(obj, dict) for obj in per_rank):
        return None
    merged: dict = {}
    for task in per_rank[0]:
        parts = [obj.get(task) for obj in per_rank]
        if all(isinstance(p, dict) for p in parts):
            keys = list(dict.fromkeys(key for p in parts for key in p))
            merged[task] = {key: rank_results_in_document_order([p.get(key, []) for p in parts]) for key in keys}
        elif all(_is_samples(p) for p in parts):
            filters = list(dict.fromkeys(s["filter"] for p in parts for s in p))
            merged[task] = [s for f in filters for s in rank_results_in_document_order([[s for s in p if s["filter"] == f] for p in parts])]
        else:
            return None
    return merged


def _repeats(request: Any) -> int:
    """How many responses lm-eval asks of a request (``Instance.repeats``; 1 when unset)."""
    return getattr(request, "repeats", None) or 1


def split_padding(requests: Sequence[Any]) -> tuple[list, list[int], list]:
    """``(served, source, padded)``: the requests without lm-eval's padding copies; for every request
    the index in ``served`` of the one whose response it gets; the requests that had copies.

    A request object occurs ``repeats`` times in lm-eval's list (once per sample it asks for); any
    further occurrence is a padding copy.
    """
    seen: dict[int, int] = {}
    first: dict[int, int] = {}
    served: list = []
    source: list[int] = []
    padded: dict[int, Any] = {}
    for request in requests:
        key = id(request)
        count = seen.get(key, 0)
        seen[key] = count + 1
        if count < _repeats(request):
            first.setdefault(key, len(served))
            source.append(len(served))
            served.append(request)
        else:
            source.append(first[key])
            padded[key] = request
    return served, source, list(padded.values())


class DataParallelLM:
    """Mixin for an lm-eval ``LM``: rank, world size and collectives from ``torch.distributed``.

    A subclass calls :meth:`join_ranks` at the end of its ``__init__`` (after any process group is
    initialized) and routes each request method through :meth:`serve_once`.
    """

    def join_ranks(self) -> None:
        """Take rank and world size from the default process group (``(0, 1)`` without one)."""
        self._rank, self._world_size = rank_and_world_size()

    def serve_once(self, requests: list, serve: Callable[[list], list]) -> list:
        """``serve(requests)`` with lm-eval's padding copies left out; each copy gets its original's response."""
        served, source, padded = split_padding(requests)
        if not padded:
            return serve(requests)
        self._drop_padding_at_barrier(padded)
        responses = serve(served)
        return [responses[i] for i in source]

    def note_padding(self, requests: list) -> None:
        """Have the next :meth:`barrier` drop the responses lm-eval appends for the padding copies
        in ``requests`` (for a wrapper that answers requests without calling :meth:`serve_once`)."""
        self._drop_padding_at_barrier(split_padding(requests)[2])

    def _drop_padding_at_barrier(self, padded: list) -> None:
        self.__dict__.setdefault("_padded_requests", []).extend(padded)

    # lm-eval's distributed hooks (LM's defaults are single-process no-ops)
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 (a scalar counts as ``[1]``)."""
        if self._world_size == 1:
            return tensor
        flat = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(flat) for _ in range(self._world_size)]
        dist.all_gather(parts, flat)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
        """lm-eval's gather of samples and metrics to ``dst``: a one-element list holding them merged
        in the one-process order (:func:`in_document_order`) on ``dst``, None elsewhere; objects of
        another shape come back as the per-rank list."""
        if self._world_size == 1:
            return [obj]
        gathered = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        if gathered is None:
            return None
        merged = in_document_order(gathered)
        return gathered if merged is None else [merged]

    def barrier(self) -> None:
        """Drop the responses lm-eval appended for padding copies, then wait for every rank."""
        for request in self.__dict__.pop("_padded_requests", []):
            del request.resps[_repeats(request) :]
        if self._world_size > 1:
            dist.barrier()


class PaddingAwareCachingLM(CachingLM):
    """lm-eval's ``CachingLM`` (``--use_cache``) that, before each request method, tells a
    :class:`DataParallelLM` which requests are lm-eval's padding copies: a rank whose share the cache
    answers then drops their responses at the barrier, as when it serves them. Other models see
    lm-eval's behaviour unchanged."""

    def __getattr__(self, attr: str) -> Any:
        method = super().__getattr__(attr)
        if attr not in REQUEST_METHODS or not isinstance(self.lm, DataParallelLM):
            return method

        def serve(requests: list) -> list:
            self.lm.note_padding(requests)
            return method(requests)

        return serve


@contextlib.contextmanager
def padding_aware_use_cache() -> Iterator[None]:
    """While active, lm-eval's ``--use_cache`` / ``simple_evaluate(use_cache=...)`` wraps models in
    :class:`PaddingAwareCachingLM` (lm-eval's evaluator builds ``lm_eval.api.model.CachingLM``)."""
    original = lm_eval.api.model.CachingLM
    lm_eval.api.model.CachingLM = PaddingAwareCachingLM
    try:
        yield
    finally:
        lm_eval.api.model.CachingLM = original


__all__ = [
    "DataParallelLM",
    "PaddingAwareCachingLM",
    "gather_to_rank_zero",
    "in_document_order",
    "join_process_group",
    "launched_world_size",
    "leave_process_group",
    "padding_aware_use_cache",
    "rank_and_world_size",
    "rank_results_in_document_order",
    "split_padding",
]
