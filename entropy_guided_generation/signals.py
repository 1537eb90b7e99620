"""Uncertainty signals of a predictive distribution, computed from logits.

Every function reduces over the last (vocabulary) dimension of ``logits`` and works for any
leading shape (``[v]``, ``[b, v]``, ``[b, s, v]``). Entropies are in **nats**; divide by
``math.log(2)`` for bits. ``exclude_ids`` removes tokens from the distribution (their logits are
set to -inf before the softmax), which is how confidence tokens are kept out of the signal.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

LN2 = math.log(2.0)

IdsLike = Union[torch.Tensor, Sequence[int], None]


def assert_finite(logits: torch.Tensor, what: str = "logits") -> None:
    """Raise if any entry of ``logits`` is NaN or +-inf.

    Args:
        logits: ``[..., v]`` scores.
        what: name used in the error message.

    Raises:
        FloatingPointError: naming the index of the first bad distribution (batch row and
            position for ``[b, s, v]`` inputs) and the bad value.
    """
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()[0].tolist()
    index, vocab_id = bad[:-1], bad[-1]
    value = logits[tuple(bad)].item()
    names = {1: ["row"], 2: ["row", "position"]}.get(len(index), [f"dim{i}" for i in range(len(index))])
    where = ", ".join(f"{n} {i}" for n, i in zip(names, index)) or "the only distribution"
    raise FloatingPointError(
        f"{what} contain a non-finite value ({value}) at {where}, vocab id {vocab_id}; "
        "a confidence signal needs finite logits"
    )


def log_probs(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_ids: IdsLike = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Log-probabilities of softmax(logits / temperature) with ``exclude_ids`` removed.

    Args:
        logits: ``[..., v]``.
        temperature: tau > 0 dividing the logits.
        exclude_ids: token ids given probability 0 (log-prob -inf).
        dtype: computation dtype (float32 or float64); the result has this dtype.

    Returns:
        ``[..., v]`` log-probabilities in ``dtype``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"signal dtype must be torch.float32 or torch.float64, got {dtype}")
    z = logits.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    if exclude_ids is not None:
        ids = torch.as_tensor(exclude_ids, dtype=torch.long, device=z.device)
        if ids.numel():
            z = z.index_fill(-1, ids, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def entropy_from_log_probs(lp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) ``[...]`` from log-probabilities ``[..., v]`` that may hold -inf (excluded ids)."""
    p = lp.exp()
    # Excluded tokens have p = 0 and log p = -inf; their term is 0, not NaN.
    return -torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(-1)


def entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_ids: IdsLike = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Shannon entropy H = -sum p log p of softmax(logits / temperature), in nats.

    Returns:
        ``[...]`` entropies (``logits`` without its last dimension), dtype ``dtype``.
    """
    return entropy_from_log_probs(log_probs(logits, temperature=temperature, exclude_ids=exclude_ids, dtype=dtype))


def max_prob(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_ids: IdsLike = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Largest probability of softmax(logits / temperature): ``[...]`` in [0, 1]."""
    return log_probs(logits, temperature=temperature, exclude_ids=exclude_ids, dtype=dtype).amax(-1).exp()


def varentropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_ids: IdsLike = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Variance of the surprisal -log p under p: sum p (log p + H)^2, in nats^2."""
    lp = log_probs(logits, temperature=temperature, exclude_ids=exclude_ids, dtype=dtype)
    p = lp.exp()
    h = entropy_from_log_probs(lp)
    sq = (lp + h.unsqueeze(-1)) ** 2
    return torch.where(p > 0, p * sq, torch.zeros_like(sq)).sum(-1)


def entropy_and_varentropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_ids: IdsLike = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and varentropy (nats^2) from one softmax."""
    lp = log_probs(logits, temperature=temperature, exclude_ids=exclude_ids, dtype=dtype)
    p = lp.exp()
    # Excluded tokens (p = 0, log p = -inf) contribute 0 to both sums.
    safe = torch.where(p > 0, lp, 0.0)
    h = -(p * safe).sum(-1)
    centred = safe + h.unsqueeze(-1)
    return h, (p * centred * centred).sum(-1)


__all__ = [
    "LN2",
    "assert_finite",
    "entropy",
    "entropy_and_varentropy",
    "entropy_from_log_probs",
    "log_probs",
    "max_prob",
    "varentropy",
]
