"""Plain <-> interleaved sequences: insert each slot's confidence token after its content token, and
take them out again.

c_t describes the distribution that produced x_t: the logits at the interleaved position just before
x_t. Those depend on earlier confidence tokens, so the bins come from the fixed point
(:mod:`~entropy_guided_generation.fixed_point`, DESIGN.md "Exactness"); this module only lays them out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation.modes import Interleaving

IGNORE_INDEX = -100


def confidence_slots(
    tokens: torch.Tensor,
    *,
    mode: Any,
    response_mask: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    stop_ids: Sequence[int] = (),
    marker_ids: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """``Interleaving.of(mode, stop_ids=..., marker_ids=...).slots(tokens, ...)``: ``[b, n]`` bool,
    which plain positions get a confidence token (see :meth:`Interleaving.slots`)."""
    interleaving = Interleaving.of(mode, stop_ids=stop_ids, marker_ids=marker_ids)
    return interleaving.slots(tokens, response_mask=response_mask, valid_mask=valid_mask)


@dataclass
class Interleaved:
    """An interleaved batch.

    Attributes:
        tokens: ``[b, L]`` interleaved ids (padding = pad_id).
        labels: ``[b, L]`` plain labels moved to their tokens' new positions; ignore_index on
            confidence tokens and padding (unshifted, torchtune convention: label i belongs to token i).
        is_confidence: ``[b, L]`` True on confidence tokens.
        valid_mask: ``[b, L]`` True on real tokens (content and confidence).
        plain_index: ``[b, n]`` interleaved position of each plain position (padding included).
        slots: ``[b, n]`` the slots the batch was built with.
    """

    tokens: torch.Tensor
    labels: Optional[torch.Tensor]
    is_confidence: torch.Tensor
    valid_mask: torch.Tensor
    plain_index: torch.Tensor
    slots: torch.Tensor

    def strip(self) -> torch.Tensor:
        """The plain tokens ``[b, n]`` back, padding included (exact inverse of :func:`interleave`)."""
        return self.tokens.gather(1, self.plain_index)


def interleave(
    tokens: torch.Tensor,
    slots: torch.Tensor,
    conf_tokens: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
    valid_mask: Optional[torch.Tensor] = None,
    left_pad: bool = False,
) -> Interleaved:
    """Insert ``conf_tokens[b, t]`` right after ``tokens[b, t]`` wherever ``slots[b, t]``.

    Rows keep their padding side: with ``left_pad`` every row ends at the last column (decode
    prefill), otherwise rows start at column 0 and are right-padded (training).

    Args:
        tokens: ``[b, n]`` plain ids.
        slots: ``[b, n]`` bool, from :func:`confidence_slots`.
        conf_tokens: ``[b, n]`` confidence token id per position (read only at slots).
        labels: ``[b, n]`` optional plain labels (unshifted).
        valid_mask: ``[b, n]`` True on real tokens (default: all).

    Returns:
        :class:`Interleaved` of width ``L = n + max_b(slots[b].sum())``.
    """
    if slots.shape != tokens.shape or conf_tokens.shape != tokens.shape:
        raise ValueError(
            f"tokens {tuple(tokens.shape)}, slots {tuple(slots.shape)} and conf_tokens {tuple(conf_tokens.shape)} "
            "must have the same shape"
        )
    b, n = tokens.shape
    device = tokens.device
    if valid_mask is None:
        valid_mask = torch.ones_like(tokens, dtype=torch.bool)
    s = slots.long()
    counts = s.sum(1)
    width = n + int(counts.max()) if b else n
    # plain position t moves right by the number of slots before it.
    plain_index = torch.arange(n, device=device).unsqueeze(0) + (s.cumsum(1) - s)
    if left_pad:
        plain_index = plain_index + (counts.max() - counts).unsqueeze(1)
    conf_index = plain_index + 1
    rows = torch.arange(b, device=device).unsqueeze(1).expand(b, n)

    out_tokens = torch.full((b, width), pad_id, dtype=tokens.dtype, device=device)
    out_tokens[rows, plain_index] = tokens
    out_tokens[rows[slots], conf_index[slots]] = conf_tokens[slots].to(tokens.dtype)

    is_conf = torch.zeros((b, width), dtype=torch.bool, device=device)
    is_conf[rows[slots], conf_index[slots]] = True
    out_valid = torch.zeros((b, width), dtype=torch.bool, device=device)
    out_valid[rows, plain_index] = valid_mask
    out_valid |= is_conf

    out_labels = None
    if labels is not None:
        out_labels = torch.full((b, width), ignore_index, dtype=labels.dtype, device=device)
        out_labels[rows, plain_index] = torch.where(valid_mask, labels, torch.full_like(labels, ignore_index))
    return Interleaved(out_tokens, out_labels, is_conf, out_valid, plain_index, slots)


def strip_confidence(tokens: torch.Tensor, is_confidence: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Remove confidence tokens from ``tokens`` ``[b, L]``; rows are compacted left and right-padded
    with ``pad_id`` to the longest remaining row."""
    keep = ~is_confidence
    new_pos = keep.long().cumsum(1) - 1
    width = int(keep.sum(1).max()) if tokens.shape[0] else 0
    out = torch.full((tokens.shape[0], width), pad_id, dtype=tokens.dtype, device=tokens.device)
    rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1).expand_as(tokens)
    out[rows[keep], new_pos[keep]] = tokens[keep]
    return out




__all__ = ["IGNORE_INDEX", "Interleaved", "confidence_slots", "interleave", "strip_confidence"]
