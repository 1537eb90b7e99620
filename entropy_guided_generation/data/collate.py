"""Right-padding collate for training batches that keeps the masks the layouts need."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


def _padded(rows: Sequence[Sequence[Any]], value: Any, dtype: torch.dtype) -> torch.Tensor:
    return pad_sequence([torch.tensor(list(r), dtype=dtype) for r in rows], batch_first=True, padding_value=value)


def padded_collate_with_response_mask(
    batch: List[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    Examples carry ``tokens`` and ``labels`` (unshifted) and, from our datasets, ``response_mask``.
    Examples from torchtune's own datasets have no response mask: there the response is taken to be
    the labelled tokens (exact with ``train_on_input=False``, except that chat role headers count as
    response; use ``entropy_guided_generation.data`` datasets for an exact mask).

    Returns:
        ``tokens`` ``[b, n]`` long (padding = ``padding_idx``), ``labels`` ``[b, n]`` long
        (padding = ``ignore_idx``), ``response_mask`` ``[b, n]`` bool, ``valid_mask`` ``[b, n]``
        bool (True on real tokens).

    Raises:
        ValueError: when some examples have a response mask and others do not, or a field's
            length differs from the example's token count.
    """
    has_mask = ["response_mask" in x for x in batch]
    if any(has_mask) and not all(has_mask):
        raise ValueError("some examples in the batch have a response_mask and others do not; use one dataset kind")
    for i, x in enumerate(batch):
        for key in ("labels", "response_mask"):
            if key in x and len(x[key]) != len(x["tokens"]):
                raise ValueError(f"example {i}: {key} has length {len(x[key])} but tokens have length {len(x['tokens'])}")
    tokens = _padded([x["tokens"] for x in batch], padding_idx, torch.long)
    labels = _padded([x["labels"] for x in batch], ignore_idx, torch.long)
    valid = _padded([[True] * len(x["tokens"]) for x in batch], False, torch.bool)
    if all(has_mask):
        response = _padded([x["response_mask"] for x in batch], False, torch.bool)
    else:
        response = labels != ignore_idx
    return {"tokens": tokens, "labels": labels, "response_mask": response, "valid_mask": valid}


__all__ = ["padded_collate_with_response_mask"]
