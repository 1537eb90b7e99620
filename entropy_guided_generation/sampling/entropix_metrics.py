"""Entropix's per-step metrics: the next-token distribution's entropy and varentropy (bits), and
the last layer's attention of the current query over the keys it may see.

Attention metrics take the current query's pre-softmax scores ``[b, h, L]`` (q . k / sqrt(d), one
query, L keys) and a visibility mask ``[b, L]``: masked keys (future cache slots, left padding)
get probability 0 and contribute nothing to any metric, so no padding pattern yields NaN and no
mass lands on future positions (entropix itself averages over the whole key length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from entropy_guided_generation.signals import LN2, entropy_and_varentropy


@dataclass
class EntropixMetrics:
    """One step's metrics, each ``[b]`` float32.

    Attributes:
        entropy: bits, of softmax(logits).
        varentropy: bits^2, variance of the surprisal -log2 p under p.
        attn_entropy: bits, mean over heads of each head's attention entropy.
        attn_varentropy: bits^2, variance across heads of the heads' attention entropies (the
            population variance, mean of squared deviations, as entropix's ``jnp.var``); 0 for one head.
        agreement: mean over heads and visible keys of |p_head - mean over heads of p|.
        interaction_strength: mean over heads and visible keys of |score|.
        attn_entropy_per_head: ``[b, h]`` bits (not part of :meth:`as_dict`).
    """

    entropy: torch.Tensor
    varentropy: torch.Tensor
    attn_entropy: torch.Tensor
    attn_varentropy: torch.Tensor
    agreement: torch.Tensor
    interaction_strength: torch.Tensor
    attn_entropy_per_head: Optional[torch.Tensor] = None

    NAMES = ("entropy", "varentropy", "attn_entropy", "attn_varentropy", "agreement", "interaction_strength")

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The six ``[b]`` metrics by name."""
        return {name: getattr(self, name) for name in self.NAMES}


def logit_metrics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (bits) and varentropy (bits^2) of softmax(logits) ``[..., v]``, float32, shape ``[...]``."""
    h_nats, v_nats = entropy_and_varentropy(logits)
    return h_nats * (1 / LN2), v_nats * (1 / (LN2 * LN2))


def attention_metrics(scores: torch.Tensor, visible: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention metrics of one query per row.

    Args:
        scores: ``[b, h, L]`` pre-softmax attention scores of the current query (any float dtype).
        visible: ``[b, L]`` bool, True on the keys the query may attend to; None when it sees all L.

    Returns:
        ``attn_entropy``, ``attn_varentropy``, ``agreement``, ``interaction_strength`` (each ``[b]``)
        and ``attn_entropy_per_head`` ``[b, h]``; float32.

    Raises:
        ValueError: a row with no visible key, or mismatched shapes.
    """
    if scores.dim() != 3 or (visible is not None and visible.shape != (scores.shape[0], scores.shape[2])):
        raise ValueError(
            f"expected scores [b, h, L] and visible [b, L] or None; got {tuple(scores.shape)} and "
            f"{None if visible is None else tuple(visible.shape)}"
        )
    if visible is not None:
        n_visible = visible.sum(-1)
        if int(n_visible.min()) == 0:
            rows = (n_visible == 0).nonzero().flatten().tolist()
            raise ValueError(f"rows {rows} have no visible key; the current query always sees at least itself")
    elif scores.shape[2] == 0:
        raise ValueError("scores hold no key (L = 0); the current query always sees at least itself")
    return _attention_metrics(scores, visible)


def _attention_metrics(scores: torch.Tensor, visible: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`attention_metrics` without its input checks (every row sees at least one key)."""
    s = scores.float()
    if visible is None:
        p, abs_scores, n_visible = torch.softmax(s, dim=-1), s.abs(), s.shape[2]
    else:
        keep = visible.unsqueeze(1)  # [b, 1, L]
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)  # exactly 0 on masked keys
        abs_scores, n_visible = torch.where(keep, s.abs(), 0.0), visible.sum(-1, keepdim=True).to(s.dtype)
    per_head = torch.special.entr(p).sum(-1) * (1 / LN2)  # entr(0) = 0: masked keys add nothing; [b, h]
    mean_entropy = per_head.mean(1, keepdim=True)
    spread = per_head - mean_entropy
    attn_varentropy = (spread * spread).mean(1)  # population variance, entropix's jnp.var
    # Per head, the mean over visible keys of |p - mean over heads of p| (masked keys have p = 0 in
    # every head, so they add 0) and of |score|; then the mean over heads.
    sums = torch.stack([(p - p.mean(dim=1, keepdim=True)).abs().sum(-1), abs_scores.sum(-1)], dim=-1)  # [b, h, 2]
    agreement, interaction = (sums.mean(1) / n_visible).unbind(-1)
    return {
        "attn_entropy": mean_entropy.squeeze(1),
        "attn_varentropy": attn_varentropy,
        "agreement": agreement,
        "interaction_strength": interaction,
        "attn_entropy_per_head": per_head,
    }


def entropix_metrics(
    logits: torch.Tensor, scores: torch.Tensor, visible: Optional[torch.Tensor], *, validate: bool = True
) -> EntropixMetrics:
    """All of one step's metrics from its logits ``[b, v]`` and the current query's attention
    scores ``[b, h, L]`` over ``visible`` keys ``[b, L]`` (None: all of them).

    ``validate=False`` skips the shape and visible-key checks of :func:`attention_metrics` (and
    their host sync, a stall per step on an accelerator): for visibility read from the model's
    own causal mask, where the current query always sees itself.
    """
    entropy, varentropy = logit_metrics(logits)
    attention = attention_metrics(scores, visible) if validate else _attention_metrics(scores, visible)
    return EntropixMetrics(entropy=entropy, varentropy=varentropy, **attention)


METRIC_NAMES = EntropixMetrics.NAMES

__all__ = ["METRIC_NAMES", "EntropixMetrics", "attention_metrics", "entropix_metrics", "logit_metrics"]
