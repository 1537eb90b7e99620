"""Uncertainty signals of a predictive distribution, computed from logits.

Every function reduces over the last (vocabulary) dimension of ``logits`` and works for any
leading shape (``[v]``, ``[b, v]``, ``[b, s, v]``). Entropies are in **nats**; divide by
``math.log(2)`` for bits. ``exclude_ids`` removes tokens from the distribution (their logits are
set to -inf before the softmax), which is how confidence tokens are kept out of the signal.
Non-finite logits raise ``FloatingPointError`` (naming row and position), never a signal.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

LN2 = math.log(2.0)

IdsLike = Union[torch.Tensor, Sequence[int], None]


def assert_finite(
    logits: torch.Tensor,
    what: str = "logits",
    *,
    rows: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> None:
    """Raise if a distribution in ``logits`` holds a NaN or +inf logit, or no finite logit at all.

    -inf entries are allowed: they are tokens removed from the distribution (confidence ids, a
    sampler's filters). This is the check every decode loop, sampler and signal function shares:
    one reduction (a per-distribution max, which propagates NaN) and one host sync, so loops that
    already sync once per step (to stop finished rows) pay no extra synchronisation for it.

    Args:
        logits: ``[..., v]`` scores.
        what: name used in the error message (e.g. ``"decode step 3 logits"``).
        rows, positions: ``[k]`` each, for ``[k, v]`` logits gathered from a batch: the batch row
            and sequence position each distribution belongs to, named in the error instead of k.

    Raises:
        FloatingPointError: naming the first bad distribution (batch row and position for
            ``[b, s, v]`` inputs, row for ``[b, v]``), and the bad value and its vocab id.
    """
    top = logits.amax(-1)
    if bool(torch.isfinite(top).all()):
        return
    index = (~torch.isfinite(top)).nonzero()[0].tolist()
    if rows is not None and len(index) == 1:
        where = f"row {int(rows[index[0]])}"
        if positions is not None:
            where += f", position {int(positions[index[0]])}"
    else:
        names = {1: ["row"], 2: ["row", "position"]}.get(len(index), [f"dim{i}" for i in range(len(index))])
        where = ", ".join(f"{n} {i}" for n, i in zip(names, index)) or "the only distribution"
    row = logits[tuple(index)]
    bad = (torch.isnan(row) | (row == float("inf"))).nonzero()
    if len(bad):
        vocab_id = int(bad[0])
        found = f"a non-finite value ({row[vocab_id].item()}) at {where}, vocab id {vocab_id}"
    else:
        found = f"no finite value at {where} (every logit is -inf)"
    raise FloatingPointError(
        f"{what} contain {found}; expected finite logits (NaN/inf logits come from NaN weights or inputs, "
        "or an overflow in the model's dtype)"
    )


def log_probs(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_ids: IdsLike = None,
    dtype: torch.dtype = torch.float32,
    what: str = "logits",
) -> torch.Tensor:
    """Log-probabilities of softmax(logits / temperature) with ``exclude_ids`` removed.

    Every signal function of this module goes through here, so each refuses non-finite logits
    (a NaN distribution would otherwise read as entropy -0.0: full confidence).

    Args:
        logits: ``[..., v]``.
        temperature: tau > 0 dividing the logits.
        exclude_ids: token ids given probability 0 (log-prob -inf).
        dtype: computation dtype (float32 or float64); the result has this dtype.
        what: how the error names ``logits`` (e.g. ``"decode step 3 logits"``).

    Returns:
        ``[..., v]`` log-probabilities in ``dtype``.

    Raises:
        FloatingPointError: on NaN/inf logits, naming ``what``, row and position (:func:`assert_finite`).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"signal dtype must be torch.float32 or torch.float64, got {dtype}")
    assert_finite(logits, what)
    z = logits.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    if exclude_ids is not None:
        ids = torch.as_tensor(exclude_ids, dtype=torch.long, device=z.device)
        if ids.numel():
            z = z.index_fill(-1, ids, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def _finite_log_probs(lp: torch.Tensor) -> torch.Tensor:
    """``lp`` with -inf (excluded ids) raised to the dtype's lowest finite value, NaN kept: there
    p = 0, so p * log p is 0 instead of NaN, without a mask and a second pass over ``[..., v]``."""
    return lp.clamp(min=torch.finfo(lp.dtype).min)


def entropy_from_log_probs(lp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) ``[...]`` from log-probabilities ``[..., v]`` that may hold -inf (excluded ids).

    Three passes over the vocabulary (clamp, exp, one fused dot product per distribution): with a
    128,256-token vocabulary this is most of what a confidence signal costs, at every decode step
    and at every position of the fixed point. A NaN log-probability gives a NaN entropy."""
    return -torch.linalg.vecdot(lp.exp(), _finite_log_probs(lp))


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
    return entropy_and_varentropy(logits, temperature=temperature, exclude_ids=exclude_ids, dtype=dtype)[1]


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
    # Excluded tokens (p = 0, log p = -inf) contribute 0 to both sums (0 in place of -inf: a
    # centred lowest-finite value would square to inf).
    safe = torch.where(p > 0, lp, 0.0)
    h = -torch.linalg.vecdot(p, safe)
    centred = safe + h.unsqueeze(-1)
    return h, torch.linalg.vecdot(p, centred * centred)


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
