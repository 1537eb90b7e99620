"""The nucleus (top-p) rule, shared by the decoders' sampler and the scorer's sampling policy.

Token j of ``softmax(z)`` is kept iff the mass of the tokens with a strictly larger ``z`` is
``< top_p``: the most likely token is always kept, and tokens tied at the boundary are kept or
dropped together (all kept), whatever order a sort puts them in. So a token a decoder samples under
a nucleus is one the scorer's policy, with the same temperature and top-p, can draw.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

NUCLEUS_FIRST_K = 4
NUCLEUS_SECOND_K = 64
SORT_WHOLE_ROWS_MAX_VOCAB = 4096
"""On CPU, rows of at most this many float32/float64 values are sorted whole (numpy's SIMD sort of a
vocabulary row costs less than torch's top-4); longer rows take ``topk`` per stage."""
SEARCH_ALL_ROWS_MAX_BATCH = 64
"""Batches of at most this many rows that are sorted whole (a decode step's) are sorted and searched
in one pass, every row: that costs less than picking out the rows the maximum settles and searching
the others in stages."""


class NucleusSearch(NamedTuple):
    """What finding the nucleus of softmax(z) yields, per row of ``z`` ``[..., v]`` (no gradient).

    Attributes:
        threshold: ``[..., 1]`` the smallest kept value: token j is kept iff ``z_j >= threshold``.
        peak: ``[..., 1]`` max z.
        weights: ``[..., v]`` exp(z - peak), the unnormalized softmax (1 at the maximum).
        log_norm: ``[..., 1]`` logsumexp(z) over the whole vocabulary (= peak + log sum weights).
        second: ``[..., 1]`` the second-largest value of z (ties counted) in every row whose
            threshold is below its peak; elsewhere (the maximum settles the row) -inf or that value.
    """

    threshold: torch.Tensor
    peak: torch.Tensor
    weights: torch.Tensor
    log_norm: torch.Tensor
    second: torch.Tensor


def nucleus_mask(scaled_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens kept by the nucleus of ``softmax(scaled_logits)``: ``[..., v]`` bool.

    Token j is kept iff the mass of tokens with a strictly larger scaled logit is ``< top_p``;
    ties at the boundary are therefore all kept, whatever order a sort puts them in.
    """
    return scaled_logits.detach() >= nucleus_search(scaled_logits, top_p).threshold


def nucleus_search(scaled_logits: torch.Tensor, top_p: float) -> NucleusSearch:
    """The nucleus of ``softmax(scaled_logits)`` (``[..., v]``) as a threshold per row (no gradient);
    see :func:`nucleus_mask` for the rule.

    Implementation: in descending order the inclusive cumulative mass ``c`` is monotone, so the
    kept sorted positions are the first ``m + 1`` where ``m = #{k : c_k < top_p}``; every token
    whose logit is >= the logit at sorted position ``m`` is kept (this adds the boundary's ties).
    Only the head of the order is needed: the maximum alone settles most rows of a peaked
    distribution (``c_0 >= top_p``: threshold = max), the top 4 and then the top 64 values most
    others; only the rest (flat distributions) need the whole row. The 64-stage is skipped for
    rows that cannot reach ``top_p`` in it (64 tokens hold at most 16 x the mass of the top 4).
    Unsettled rows are sorted whole (CPU rows of at most :data:`SORT_WHOLE_ROWS_MAX_VOCAB`
    values) or searched with ``topk`` per stage. A small batch of such CPU rows (at most
    :data:`SEARCH_ALL_ROWS_MAX_BATCH`, e.g. a decode step) is sorted whole and searched in one
    pass instead. Every way gives the same mask.
    """
    shape, v = scaled_logits.shape, scaled_logits.shape[-1]
    flat = scaled_logits.detach().reshape(-1, v)  # the kept set is piecewise constant: no gradient
    peak = flat.amax(-1, keepdim=True)
    weights = (flat - peak).exp()
    log_norm = peak + weights.sum(-1, keepdim=True).log()
    if _sorts_whole_rows(flat) and 1 < v and flat.shape[0] <= SEARCH_ALL_ROWS_MAX_BATCH:
        ordered = sorted_descending(flat)
        threshold, second = _nucleus_threshold(ordered, log_norm, top_p)[0], ordered[:, 1:2]
    else:
        threshold, second = peak.clone(), torch.full_like(peak, float("-inf"))
        pending = ((peak - log_norm).exp() < top_p).view(-1).nonzero().squeeze(-1)
        if pending.numel():
            threshold[pending], second[pending] = _threshold_of_flatter_rows(flat[pending], log_norm[pending], top_p)
    if len(shape) == 2:
        return NucleusSearch(threshold, peak, weights, log_norm, second)
    batch = shape[:-1]
    return NucleusSearch(*(t.view(*batch, 1) for t in (threshold, peak)), weights.view(shape),
                         *(t.view(*batch, 1) for t in (log_norm, second)))


def _threshold_of_flatter_rows(flat: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds ``[r, 1]`` of rows ``[r, v]`` whose maximum alone holds less than ``top_p``, and
    their second-largest values ``[r, 1]`` (v >= 2 in such rows)."""
    v = flat.shape[-1]
    ordered = sorted_descending(flat) if _sorts_whole_rows(flat) else None

    def top_values(rows: Optional[torch.Tensor], k: int) -> torch.Tensor:
        """The k largest values of ``rows`` (all rows when None), descending."""
        if ordered is not None:
            return ordered[:, :k] if rows is None else ordered[rows, :k]
        selected = flat if rows is None else flat[rows]
        return sorted_descending(selected) if k == v else selected.topk(k, dim=-1).values

    first_k = min(NUCLEUS_FIRST_K, v)
    head = top_values(None, first_k)
    threshold, cumulative = _nucleus_threshold(head, log_norm, top_p)
    resolved = cumulative[:, -1] >= top_p
    pending = (~resolved).nonzero().squeeze(-1)
    if pending.numel() and NUCLEUS_SECOND_K < v:
        may_reach = (head[pending] - log_norm[pending]).exp().sum(-1) * (NUCLEUS_SECOND_K / first_k) >= top_p
        rows = pending[may_reach]
        if rows.numel():
            found, cumulative = _nucleus_threshold(top_values(rows, NUCLEUS_SECOND_K), log_norm[rows], top_p)
            done = cumulative[:, -1] >= top_p
            threshold[rows[done]] = found[done]
            resolved[rows[done]] = True
            pending = (~resolved).nonzero().squeeze(-1)
    if pending.numel():
        threshold[pending] = _nucleus_threshold(top_values(pending, v), log_norm[pending], top_p)[0]
    return threshold, head[:, 1:2]


def _nucleus_threshold(sorted_head: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From the k largest scaled logits per row (descending) and each row's full log-normalizer:
    ``(threshold [r, 1], cumulative [r, k])``, the head's inclusive cumulative mass. The threshold
    is exact in rows whose boundary lies inside the head (``cumulative[:, -1] >= top_p``)."""
    cumulative = (sorted_head - log_norm).exp().cumsum(-1)
    k = sorted_head.shape[-1]
    # The cumulative mass is nondecreasing, so the count of entries < top_p is a binary search.
    below = torch.full((cumulative.shape[0], 1), top_p, dtype=cumulative.dtype, device=cumulative.device)
    last_kept = torch.searchsorted(cumulative, below).clamp(max=k - 1)
    return sorted_head.gather(-1, last_kept), cumulative


def sorted_descending(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[r, v]`` sorted along the last dim, largest first (values only, no gradient).

    float32/float64 CPU rows go through numpy's sort (cheaper than torch's CPU sort on rows of a
    vocabulary); every other device and dtype uses ``torch.sort``.
    """
    rows = rows.detach()
    if _numpy_sorts(rows):
        return torch.from_numpy(np.sort(rows.numpy(), axis=-1)[:, ::-1].copy())
    return torch.sort(rows, dim=-1, descending=True).values


def _numpy_sorts(rows: torch.Tensor) -> bool:
    return rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64)


def _sorts_whole_rows(rows: torch.Tensor) -> bool:
    return _numpy_sorts(rows) and rows.shape[-1] <= SORT_WHOLE_ROWS_MAX_VOCAB


__all__ = ["NucleusSearch", "nucleus_mask", "nucleus_search", "sorted_descending"]
