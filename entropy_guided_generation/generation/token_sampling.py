"""Choosing the next content token from logits: greedy, temperature, top-k, top-p.

All functions act on ``[b, v]`` logits and return ``[b]`` token ids; ``rng`` (a torch.Generator)
makes sampling reproducible. Confidence ids are removed by the caller before these run.
"""
from __future__ import annotations

from typing import Optional

import torch

from entropy_guided_generation.generation.nucleus import nucleus_search


def filter_top_k(logits: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties at the k-th value kept), others -inf."""
    if top_k is None:
        return logits
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: tokens outside the nucleus of ``softmax(logits)`` set to -inf.

    The rule of :mod:`~entropy_guided_generation.generation.nucleus` (the scorer's too): a token is
    kept when the mass of the tokens with a strictly larger logit is < top_p, so the most likely
    token is always kept and tokens tied at the boundary are all kept.
    """
    if top_p is None or top_p >= 1.0:
        return logits
    if not 0.0 < top_p:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    return logits.masked_fill(logits < nucleus_search(logits, top_p).threshold, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    rng: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids ``[b]`` from ``logits`` ``[b, v]``; ``temperature == 0`` means greedy.

    Sampling uses the exponential-race trick (argmax of p / q with q ~ Exp(1)), as torchtune and
    gpt-fast do, drawing q from ``rng``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    scaled = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = scaled.softmax(-1)
    q = torch.empty_like(probs).exponential_(1, generator=rng)
    return (probs / q).argmax(-1)


__all__ = ["filter_top_k", "filter_top_p", "sample_next_token"]
