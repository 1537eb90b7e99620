"""Checks on the training data made once at setup, before any step: in a mode that reads a marker,
the marker must occur in the responses (as the tokenizer encodes it there), or the run would train
whole responses interleaved, i.e. mode answer, without saying so."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

# Examples from the start of the training set whose responses are searched for the marker.
MARKER_CHECK_EXAMPLES = 256


def count_marker_rows(
    batches: Iterable[Dict[str, torch.Tensor]], marker_found: Callable[[Dict[str, torch.Tensor]], torch.Tensor]
) -> Tuple[int, int]:
    """``(rows whose response holds the marker, rows)`` over ``batches``.

    Args:
        batches: collated plain batches (``tokens``, ``response_mask``, ``valid_mask``).
        marker_found: batch -> ``[b]`` bool (``ConfidenceLayout.marker_found``).
    """
    found = total = 0
    for batch in batches:
        hits = marker_found(batch)
        found += int(hits.sum())
        total += int(hits.numel())
    return found, total


def check_marker_fraction(
    found: int, total: int, *, marker: str, marker_ids: Optional[Sequence[int]], min_fraction: float
) -> None:
    """Raise when fewer than ``min_fraction`` of ``total`` checked examples hold the marker.

    Raises:
        ValueError: naming the marker, its ids and the counts.
    """
    if total == 0 or found >= min_fraction * total:
        return
    raise ValueError(
        f"interleaving.marker {marker!r} (token ids {list(marker_ids or [])}) occurs in the response of only {found} of the "
        f"first {total} training examples ({found / total:.0%}), below interleaving.min_marker_fraction {min_fraction}: "
        "a response without its marker is interleaved whole, as in mode answer. Check that the dataset writes this "
        "marker and that it tokenizes to these ids in context (e.g. a leading space changes the ids), or lower "
        "interleaving.min_marker_fraction"
    )


__all__ = ["MARKER_CHECK_EXAMPLES", "check_marker_fraction", "count_marker_rows"]
