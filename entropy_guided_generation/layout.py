"""The interleaved layout's public names in one import: modes, position rules, the sequence
transforms and the fixed-point bins.

Each concept lives in its own module; this one gathers their public names for users and configs
(``from entropy_guided_generation.layout import Interleaving, compute_bins``):

- :mod:`~entropy_guided_generation.modes`: :class:`Mode`, the :data:`MODES` table, :class:`Interleaving`;
- :mod:`~entropy_guided_generation.positions`: :class:`PositionRule` (``interleaving.positions``);
- :mod:`~entropy_guided_generation.interleaved`: :func:`interleave`, :func:`strip_confidence`, :class:`Interleaved`;
- :mod:`~entropy_guided_generation.fixed_point`: :func:`compute_bins`, :class:`FixedPointBins`.
"""
from __future__ import annotations

from entropy_guided_generation.fixed_point import FixedPointBins, compute_bins
from entropy_guided_generation.interleaved import IGNORE_INDEX, Interleaved, confidence_slots, interleave, strip_confidence
from entropy_guided_generation.modes import (
    ANSWER,
    FULL,
    MARKER,
    MODES,
    NONE,
    PLAIN,
    EveryResponseToken,
    Interleaving,
    MarkerTracker,
    Mode,
    ResponseRule,
    UntilMarker,
    check_mode,
    first_real_position,
    marker_end_positions,
    mode_named,
    register_mode,
    tokenizer_stop_ids,
)
from entropy_guided_generation.positions import (
    POSITION_RULES,
    PositionRule,
    advances_position,
    check_position_rule,
    position_ids,
    position_rule,
)

__all__ = [
    "ANSWER",
    "FULL",
    "IGNORE_INDEX",
    "MARKER",
    "MODES",
    "NONE",
    "PLAIN",
    "POSITION_RULES",
    "EveryResponseToken",
    "FixedPointBins",
    "Interleaved",
    "Interleaving",
    "MarkerTracker",
    "Mode",
    "PositionRule",
    "ResponseRule",
    "UntilMarker",
    "check_mode",
    "check_position_rule",
    "advances_position",
    "position_ids",
    "position_rule",
    "compute_bins",
    "confidence_slots",
    "first_real_position",
    "interleave",
    "marker_end_positions",
    "mode_named",
    "register_mode",
    "strip_confidence",
    "tokenizer_stop_ids",
]
