"""Plain <-> interleaved sequences for the modes none / full / answer / marker, and exact bins.

A *slot* is a plain position t whose token x_t is followed by its confidence token c_t in the
interleaved sequence. Which positions are slots is the only thing that differs between modes:

- ``none``: no slots.
- ``answer``: every response token.
- ``full``: every real token after the row's first (prompt included).
- ``marker``: response tokens up to and including the first occurrence of the marker ids inside
  the response; if the marker never occurs in the response, every response token (the marker is
  matched on token ids, so a marker that BPE merges differently in context counts as absent).

Stop tokens (EOS) never get a slot, nor does a row's first token (nothing produced it).

c_t describes the distribution that produced x_t: the logits at the interleaved position just
before x_t. Those depend on earlier confidence tokens, so :func:`compute_bins` finds the bins by
fixed-point iteration (DESIGN.md, "Exactness").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.modeling import logits_of

MODES = ("none", "full", "answer", "marker")
IGNORE_INDEX = -100


def check_mode(mode: str) -> str:
    """Return ``mode`` or raise ``unknown interleaving.mode 'x'; expected one of none, full, answer, marker``."""
    if mode not in MODES:
        raise ValueError(f"unknown interleaving.mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def first_real_position(valid_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[b]`` of each row's first real (non-padding) token."""
    return valid_mask.long().argmax(-1)


def marker_end_positions(tokens: torch.Tensor, marker_ids: Sequence[int], allowed: torch.Tensor) -> torch.Tensor:
    """Plain index ``[b]`` of the last token of the first marker occurrence lying wholly inside
    ``allowed`` positions, or -1 where the marker does not occur there.

    Args:
        tokens: ``[b, n]``.
        marker_ids: the marker's token ids (non-empty).
        allowed: ``[b, n]`` bool, positions where an occurrence may lie (the response).
    """
    m = len(marker_ids)
    b, n = tokens.shape
    if m == 0:
        raise ValueError("the marker must be at least one token id; got an empty marker")
    if n < m:
        return torch.full((b,), -1, dtype=torch.long, device=tokens.device)
    marker = torch.as_tensor(list(marker_ids), dtype=tokens.dtype, device=tokens.device)
    windows = tokens.unfold(1, m, 1)  # [b, n - m + 1, m]
    inside = allowed.unfold(1, m, 1).all(-1)
    match = (windows == marker).all(-1) & inside  # [b, n - m + 1], True at occurrence starts
    found = match.any(-1)
    start = match.long().argmax(-1)
    return torch.where(found, start + m - 1, torch.full_like(start, -1))


def confidence_slots(
    tokens: torch.Tensor,
    *,
    mode: str,
    response_mask: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    stop_ids: Sequence[int] = (),
    marker_ids: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Which plain positions get a confidence token: ``[b, n]`` bool.

    Args:
        tokens: ``[b, n]`` plain token ids (any padding side).
        mode: one of :data:`MODES`.
        response_mask: ``[b, n]`` True on response tokens (needed by answer and marker).
        valid_mask: ``[b, n]`` True on real tokens (default: all).
        stop_ids: ids (EOS, end-of-turn) that never get a confidence token.
        marker_ids: the marker's ids (mode marker).
    """
    check_mode(mode)
    if valid_mask is None:
        valid_mask = torch.ones_like(tokens, dtype=torch.bool)
    slots = valid_mask.clone()
    if len(stop_ids):
        slots &= ~torch.isin(tokens, torch.as_tensor(list(stop_ids), dtype=tokens.dtype, device=tokens.device))
    if mode == "none":
        return torch.zeros_like(slots)
    if mode == "full":
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return slots & (positions.unsqueeze(0) != first_real_position(valid_mask).unsqueeze(1))
    if response_mask is None:
        raise ValueError(f"mode {mode!r} needs a response_mask telling prompt from response")
    slots &= response_mask.bool() & valid_mask
    if mode == "marker":
        if marker_ids is None:
            raise ValueError("mode 'marker' needs marker_ids (the tokenized interleaving.marker)")
        end = marker_end_positions(tokens, marker_ids, response_mask.bool() & valid_mask)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        limit = torch.where(end >= 0, end, torch.full_like(end, tokens.shape[1])).unsqueeze(1)
        slots &= positions <= limit
    return slots


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


# --------------------------------------------------------------------- fixed point
@dataclass
class FixedPointBins:
    """Result of :func:`compute_bins`.

    Attributes:
        bins: ``[b, n]`` bin of each slot (-1 elsewhere); bins[b, t] describes the distribution
            that produced plain token t.
        signal: ``[b, n]`` the signal behind each bin (NaN elsewhere), codec dtype.
        passes: forwards run (pass 0 is the plain forward).
        changed_fraction: fraction of slot bins the last pass changed (0.0 when converged, NaN
            after a single pass).
        converged: True when a pass changed no bin, i.e. the bins are exactly what sequential
            decoding would produce.
        interleaved: the batch interleaved with the final bins.
    """

    bins: torch.Tensor
    signal: torch.Tensor
    passes: int
    changed_fraction: float
    converged: bool
    interleaved: Interleaved


def _signals_for_slots(
    model: Any,
    seq_tokens: torch.Tensor,
    seq_valid: torch.Tensor,
    plain_index: torch.Tensor,
    slots: torch.Tensor,
    codec: ConfidenceCodec,
    left_pad: bool,
) -> torch.Tensor:
    """Signal ``[b, n]`` of the distribution producing each plain token (NaN off slots).

    Plain token t sits at ``plain_index[b, t]`` of ``seq_tokens``; the logits that produced it are
    one position earlier.
    """
    logits = logits_of(model, seq_tokens, padding_mask=seq_valid if left_pad else None)
    prev = (plain_index - 1).clamp(min=0)
    # Gather first, then compute the signal only where it is needed.
    picked = logits.gather(1, prev.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    out = torch.full(slots.shape, float("nan"), dtype=codec.compute_dtype, device=seq_tokens.device)
    if bool(slots.any()):
        out[slots] = codec.signal_from_logits(picked[slots])
    return out


@torch.no_grad()
def compute_bins(
    model: Any,
    tokens: torch.Tensor,
    *,
    codec: ConfidenceCodec,
    slots: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    pad_id: int = 0,
    max_passes: int = 4,
    left_pad: bool = False,
) -> FixedPointBins:
    """Bins of every slot by fixed-point iteration, and the batch interleaved with them.

    Pass 0 takes each slot's signal from a plain forward; pass k recomputes all signals on the
    batch interleaved with pass k-1's bins. After k passes the first k slots of each row are
    exact; when a pass changes no bin, all are (the causal system has one fixed point).

    Args:
        model: a causal LM (see :mod:`entropy_guided_generation.modeling`); run without grad. With
            torchtune KV caches enabled, call it inside ``disable_kv_cache``.
        tokens: ``[b, n]`` plain ids; right-padded, or left-padded with ``left_pad=True``.
        codec: the confidence codec.
        slots: ``[b, n]`` from :func:`confidence_slots`.
        labels: optional plain labels, carried into the interleaved batch.
        valid_mask: ``[b, n]`` True on real tokens (default: ``tokens != pad_id`` when left-padded, else all).
        max_passes: at most this many forwards (>= 1).

    Returns:
        :class:`FixedPointBins`.
    """
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    if valid_mask is None:
        valid_mask = (tokens != pad_id) if left_pad else torch.ones_like(tokens, dtype=torch.bool)
    no_bins = torch.full_like(tokens, -1)

    def build(bins: torch.Tensor) -> Interleaved:
        conf = codec.token_ids_for_bins(bins.clamp(min=0))
        return interleave(tokens, slots, conf, labels=labels, pad_id=pad_id, valid_mask=valid_mask, left_pad=left_pad)

    if not bool(slots.any()):
        nan = torch.full(tokens.shape, float("nan"), dtype=codec.compute_dtype, device=tokens.device)
        return FixedPointBins(no_bins, nan, 0, 0.0, True, build(no_bins))

    identity = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    signal = _signals_for_slots(model, tokens, valid_mask, identity, slots, codec, left_pad)
    bins = torch.where(slots, codec.bins_from_signal(signal.nan_to_num(0.0)), no_bins)
    # With a single pass nothing says whether the bins would still move: changed_fraction is NaN.
    passes, changed, converged = 1, float("nan"), False
    layout = build(bins)
    while passes < max_passes:
        signal = _signals_for_slots(model, layout.tokens, layout.valid_mask, layout.plain_index, slots, codec, left_pad)
        new_bins = torch.where(slots, codec.bins_from_signal(signal.nan_to_num(0.0)), no_bins)
        passes += 1
        n_changed = int((new_bins != bins)[slots].sum())
        changed = n_changed / int(slots.sum())
        bins = new_bins
        if n_changed == 0:
            converged = True
            break
        layout = build(bins)
    return FixedPointBins(bins, signal, passes, changed, converged, layout)


__all__ = [
    "IGNORE_INDEX",
    "MODES",
    "FixedPointBins",
    "Interleaved",
    "check_mode",
    "compute_bins",
    "confidence_slots",
    "first_real_position",
    "interleave",
    "marker_end_positions",
    "strip_confidence",
]
