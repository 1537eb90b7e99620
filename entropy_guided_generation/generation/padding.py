"""Left-padded batches: token-id rows right-aligned in one tensor, ``pad_id`` before each, the
layout every decoder (autoregressive or masked-diffusion) takes its prompts in."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, *, width: Optional[int] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """``[b, width]`` long tensor of ``rows`` (token ids), each right-aligned after ``pad_id``s.

    Args:
        rows: b sequences of token ids (a row may be empty).
        pad_id: the id filling the left of shorter rows.
        width: columns of the result (default: the longest row).
        device: where the result lives (default: CPU).

    Raises:
        ValueError: when a row is longer than ``width``.
    """
    longest = max((len(r) for r in rows), default=0)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a row of {longest} tokens does not fit width {width}")
    return torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device).view(len(rows), width)


def left_padded_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[b, width]`` bool, True on the real tokens of left-padded rows of ``lengths`` ``[b]`` tokens
    (read from the lengths, not from the ids, so a row may hold the pad id itself)."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) >= (width - lengths).unsqueeze(1)


__all__ = ["left_pad", "left_padded_mask"]
