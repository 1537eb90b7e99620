"""Calibration read from the interleaved trace itself, and a token-level view of the bins.

- :func:`bin_probabilities`: each bin of a codec mapped to a probability: the midpoint of the bin's
  signal interval, as a probability (max-prob: itself; entropy H: exp(-H), the probability of a
  uniform choice among e^H tokens).
- :func:`trace_confidence`: a sample's confidence from the bins it was fed: the geometric mean of
  its bins' probabilities (exp of the mean log), the bin-level twin of exp(mean token log-prob);
  or the least confident bin's (``min``: an answer is only as sure as its weakest token).
- :func:`digit_tokens`: which generated tokens hold digits of a computed result (``a op b = c`` lines
  and the final ``#### n``), and whether each is right: checked character by character against the
  line's true result (or the target), so a wrong digit is where the arithmetic went wrong.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec

RESULT_LINE = re.compile(r"\(?(-?\d+) ([+\-*]) (-?\d+)\)? = (-?\d+)")
FINAL_ANSWER = re.compile(r"#### (-?\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def bin_signal_bounds(codec: ConfidenceCodec) -> torch.Tensor:
    """``[K + 1]`` float64 bounds of each bin's signal interval, in signal units: 0, the edges
    (divided by the codec's scale), then an upper end (1 for max-prob; for entropy the last edge
    plus the width of the bin before it)."""
    edges = codec.edges.to(torch.float64) / codec.scale
    if codec.signal == "max_prob":
        top = torch.tensor([1.0], dtype=torch.float64)
    else:
        width = edges[-1] - edges[-2] if edges.numel() > 1 else edges[-1]
        top = (edges[-1] + width).reshape(1)
    return torch.cat([torch.zeros(1, dtype=torch.float64), edges.clamp(min=0.0), top])


def bin_probabilities(codec: ConfidenceCodec) -> torch.Tensor:
    """``[K]`` probability each bin stands for: the midpoint s of its signal interval, as p = s
    (max-prob) or p = exp(-s) (entropy, nats)."""
    bounds = bin_signal_bounds(codec)
    mid = (bounds[:-1] + bounds[1:]) / 2
    return mid if codec.signal == "max_prob" else torch.exp(-mid)


TRACE_REDUCTIONS = ("mean", "min")


def trace_confidence(bins: torch.Tensor, probabilities: torch.Tensor, reduce: str = "mean") -> Optional[float]:
    """The confidence of a sample read from its fed bins ``[T]`` (entries < 0, no confidence token,
    skipped): exp(mean log p_bin) (``mean``) or min p_bin (``min``); None when the sample was fed no
    confidence token.

    Raises:
        ValueError: on a bin outside ``probabilities`` or an unknown ``reduce``.
    """
    if reduce not in TRACE_REDUCTIONS:
        raise ValueError(f"unknown trace reduction {reduce!r}; expected one of {', '.join(TRACE_REDUCTIONS)}")
    fed = bins[bins >= 0].long()
    if fed.numel() == 0:
        return None
    if int(fed.max()) >= probabilities.numel():
        raise ValueError(f"bin {int(fed.max())} outside the codec's {probabilities.numel()} bins")
    chosen = probabilities.to(torch.float64)[fed]
    return float(chosen.log().mean().exp() if reduce == "mean" else chosen.min())


@dataclass(frozen=True)
class DigitToken:
    """A generated token holding digits of a computed result: its index in the sample's tokens
    and whether all of its checked digits are right."""

    index: int
    right: bool


def _checked_digits(text: str, target: Optional[str]) -> dict[int, bool]:
    """Character offset -> right, for every digit of a computed result in ``text``."""
    checked: dict[int, bool] = {}

    def mark(start: int, written: str, truth: str) -> None:
        for j, char in enumerate(written):
            if char.isdigit():
                checked[start + j] = j < len(truth) and truth[j] == char

    for line in RESULT_LINE.finditer(text):
        a, op, b = int(line.group(1)), line.group(2), int(line.group(3))
        mark(line.start(4), line.group(4), str(_OPS[op](a, b)))
    if target is not None:
        for final in FINAL_ANSWER.finditer(text):
            mark(final.start(1), final.group(1), target)
    return checked


def digit_tokens(pieces: Sequence[str], target: Optional[str] = None) -> list[DigitToken]:
    """The tokens (by their text ``pieces``, in order) holding digits of computed results.

    A result is the ``c`` of an ``a op b = c`` line (checked against ``a op b``) or the ``n`` of
    ``#### n`` (checked against ``target``, when given). A digit is right when it equals the true
    result's digit at the same place; a token is right when all its checked digits are.
    """
    text = "".join(pieces)
    checked = _checked_digits(text, target)
    out, start = [], 0
    for index, piece in enumerate(pieces):
        marks = [checked[c] for c in range(start, start + len(piece)) if c in checked]
        if marks:
            out.append(DigitToken(index, all(marks)))
        start += len(piece)
    return out


def mean_or_none(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


def finite_or_none(value: float) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


__all__ = [
    "TRACE_REDUCTIONS",
    "DigitToken",
    "bin_probabilities",
    "bin_signal_bounds",
    "digit_tokens",
    "finite_or_none",
    "mean_or_none",
    "trace_confidence",
]
