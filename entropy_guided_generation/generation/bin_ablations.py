"""Bin ablations (confidence overrides): decode with the confidence token fed back replaced, to ask whether a model
reads its own confidence (an ablation; DESIGN.md's decoders feed the real bin).

An override sees each bin the codec computed and returns the bin to feed instead; the signal,
entropy and log-prob a decode records stay the model's own. Two are built in:

- :class:`FixedBin`: every confidence token is bin k (prompt ones too, in mode full);
- :class:`ShuffledBins`: each row's bins from a reference decode, in a random order (a permutation
  per row), so the model reads the same bins it produced but not where it produced them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


class ConfidenceOverride(Protocol):
    """What :func:`~entropy_guided_generation.generation.common.decode` asks of an override."""

    def prompt_bins(self, bins: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``[b, p]`` bins to feed after the prompt tokens (mode full), given the exact ones
        ``bins`` ``[b, p]`` (-1 off ``slots``) and ``slots`` ``[b, p]`` bool."""

    def step_bins(self, bins: torch.Tensor, step: int) -> torch.Tensor:
        """``[b]`` bins to feed after content step ``step``'s token, given the real ones ``[b]``."""


def permute_within_rows(values: torch.Tensor, mask: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``values`` ``[b, n]`` with the entries under ``mask`` ``[b, n]`` permuted at random within
    each row (uniformly; entries off the mask stay where they are)."""
    b, n = values.shape
    positions = torch.arange(n, device=values.device).expand(b, n)
    keys = torch.rand(b, n, generator=generator, device=values.device)
    # Sorting puts a row's masked positions first: in random order (source) and in order (target);
    # the target's tail lists the unmasked positions, which keep their values.
    source = torch.where(mask, keys, torch.full_like(keys, 2.0)).argsort(1)
    target = torch.where(mask, positions, positions + n).argsort(1)
    inside = positions < mask.sum(1, keepdim=True)
    moved = torch.where(inside, values.gather(1, source), values.gather(1, target))
    return values.clone().scatter_(1, target, moved)


def compact_left(values: torch.Tensor, mask: torch.Tensor, fill: int = -1) -> torch.Tensor:
    """``[b, n]``: each row's entries under ``mask`` moved to the front in order, then ``fill``."""
    b, n = values.shape
    positions = torch.arange(n, device=values.device).expand(b, n)
    order = torch.where(mask, positions, positions + n).argsort(1)
    return torch.where(positions < mask.sum(1, keepdim=True), values.gather(1, order), torch.full_like(values, fill))


@dataclass(frozen=True)
class FixedBin:
    """Feed bin ``bin`` after every content token that gets a confidence token (and every prompt
    slot in mode full)."""

    bin: int

    def __post_init__(self) -> None:
        if not isinstance(self.bin, int) or isinstance(self.bin, bool) or self.bin < 0:
            raise ValueError(f"a fixed confidence bin must be an int >= 0, got {self.bin!r}")

    def prompt_bins(self, bins: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return torch.where(slots, torch.full_like(bins, self.bin), bins)

    def step_bins(self, bins: torch.Tensor, step: int) -> torch.Tensor:
        return torch.full_like(bins, self.bin)


@dataclass(frozen=True)
class ShuffledBins:
    """Feed each row's reference bins in a shuffled order.

    Attributes:
        table: ``[b, m]`` row r's reference response bins, permuted, then -1; content step t of an
            ablated row feeds ``table[r, t mod count[r]]`` (rows run as long as they run: an ablated
            decode that outlasts its reference cycles through the same bins).
        count: ``[b]`` reference bins per row; a row with none feeds its own bins.
        seed: seed of the permutation of prompt bins (mode full), drawn per row among its slots.
    """

    table: torch.Tensor
    count: torch.Tensor
    seed: int = 0

    @classmethod
    def from_reference(cls, bins: torch.Tensor, seed: int = 0) -> "ShuffledBins":
        """The override of a reference decode's ``bins`` ``[b, T]`` (-1 where no confidence token,
        e.g. ``DecodeResult.bins``), permuted per row with ``seed``."""
        if bins.dim() != 2:
            raise ValueError(f"reference bins must be [b, T], got shape {tuple(bins.shape)}")
        mask = bins >= 0
        generator = torch.Generator(device=bins.device).manual_seed(seed)
        shuffled = permute_within_rows(bins, mask, generator)
        return cls(compact_left(shuffled, mask), mask.sum(1), seed)

    def prompt_bins(self, bins: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=bins.device).manual_seed(self.seed + 1)
        return permute_within_rows(bins, slots, generator)

    def step_bins(self, bins: torch.Tensor, step: int) -> torch.Tensor:
        if bins.shape[0] != self.table.shape[0]:
            raise ValueError(f"shuffled bins were built for {self.table.shape[0]} rows, the decode has {bins.shape[0]}")
        has = self.count > 0
        column = torch.remainder(torch.full_like(self.count, step), self.count.clamp(min=1)).unsqueeze(1)
        return torch.where(has, self.table.to(bins.device).gather(1, column.to(bins.device)).squeeze(1), bins)


__all__ = ["ConfidenceOverride", "FixedBin", "ShuffledBins", "compact_left", "permute_within_rows"]
