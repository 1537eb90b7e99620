"""The position rule of an interleaved sequence (``interleaving.positions``) as a value.

Does a confidence token advance the position id? ``sequential`` (default, as the public CaC code):
yes, every real token does. ``shared``: no, a confidence token takes the position of the content
token it follows, so content keeps the plain model's relative positions under RoPE. Training,
decoding and eval ask the rule, never its name: :func:`position_rule` turns the config's string into
one at the boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch


@dataclass(frozen=True)
class PositionRule:
    """One ``interleaving.positions`` value.

    Attributes:
        name: the config value (``sequential`` | ``shared``).
        confidence_advances: a confidence token moves the position id on.
    """

    name: str
    confidence_advances: bool

    def __str__(self) -> str:
        return self.name

    @property
    def is_default(self) -> bool:
        """Every real token advances: the positions a model (or a padding mask) gives by itself, so a
        caller need not pass explicit position ids."""
        return self.confidence_advances

    def advances(self, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
        """``[b, L]`` bool: the tokens of an interleaved sequence that move the position id on (real
        tokens; confidence tokens only when the rule says so)."""
        if self.confidence_advances:
            return valid_mask
        return valid_mask & ~is_confidence

    def position_ids(self, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
        """Position id ``[b, L]`` of each token of an interleaved sequence (any padding side): 0 at the
        row's first real token (padding before it gets 0 and is never attended)."""
        return (self.advances(valid_mask, is_confidence).long().cumsum(1) - 1).clamp(min=0)

    def positions_per_token(self, columns: int) -> int:
        """Position ids a token taking ``columns`` sequence columns (itself and its confidence token)
        takes: all of them when confidence tokens advance, else 1."""
        return columns if self.confidence_advances else 1


SEQUENTIAL = PositionRule("sequential", confidence_advances=True)
SHARED = PositionRule("shared", confidence_advances=False)
RULES: Dict[str, PositionRule] = {rule.name: rule for rule in (SEQUENTIAL, SHARED)}
"""The position rules by config name."""
POSITION_RULES = tuple(RULES)
"""The accepted ``interleaving.positions`` strings (argparse ``choices``, error messages)."""


def position_rule(value: Any) -> PositionRule:
    """The :class:`PositionRule` named ``value`` (a rule passes through): the config boundary.

    Raises:
        ValueError: ``unknown interleaving.positions 'x'; expected one of sequential, shared``.
    """
    if isinstance(value, PositionRule):
        return value
    if value not in RULES:
        raise ValueError(f"unknown interleaving.positions {value!r}; expected one of {', '.join(POSITION_RULES)}")
    return RULES[value]


def check_position_rule(positions: Any) -> str:
    """The config name of ``positions`` (a name or a rule), after checking it (see :func:`position_rule`)."""
    return position_rule(positions).name


def advances_position(rule: Any, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
    """:meth:`PositionRule.advances` of the rule ``rule`` names."""
    return position_rule(rule).advances(valid_mask, is_confidence)


def position_ids(rule: Any, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
    """:meth:`PositionRule.position_ids` of the rule ``rule`` names."""
    return position_rule(rule).position_ids(valid_mask, is_confidence)


__all__ = [
    "POSITION_RULES",
    "RULES",
    "SEQUENTIAL",
    "SHARED",
    "PositionRule",
    "advances_position",
    "check_position_rule",
    "position_ids",
    "position_rule",
]
