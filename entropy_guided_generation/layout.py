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

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.modeling import (
    PositionLogits,
    is_fsdp_sharded,
    is_torchtune_decoder,
    kv_session,
    vocab_size_of,
)

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
        passes: batched forwards run (pass 0 is the plain forward; each later one runs only the
            rows whose bins are not all final yet).
        changed_fraction: fraction of slot bins the last pass changed (0.0 when converged, NaN
            after a single pass that did not settle every bin).
        converged: True when every bin is final, i.e. exactly what sequential decoding produces.
        interleaved: the batch interleaved with the final bins.
        unconverged_rows: rows holding a bin that is not final (0 when converged; more only when
            ``max_passes`` stopped the iteration).
        pass_rows: rows each pass forwarded (``pass_rows[0]`` is the batch size).
        pass_slots: slot signals each pass computed (pass 0: every slot).
        recomputed_fraction: over the passes after the first, the mean share of a full pass's
            ``b x L`` positions that each forwarded (NaN when a single pass ran).
        stepped_slots: slots whose bins came from KV-cached sequential stepping after the passes
            made little progress (0 when none did).
    """

    bins: torch.Tensor
    signal: torch.Tensor
    passes: int
    changed_fraction: float
    converged: bool
    interleaved: Interleaved
    unconverged_rows: int = 0
    pass_rows: tuple[int, ...] = ()
    pass_slots: tuple[int, ...] = ()
    recomputed_fraction: float = math.nan
    stepped_slots: int = 0


# Step sequentially once the slowest unconverged row, at the progress of the last pass, would
# need more than this many further passes (each pass forwards the row's whole width).
_STEP_AFTER_PASSES = 4


def _check_max_passes(max_passes: Optional[int]) -> None:
    if max_passes is None:
        return
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be None (iterate until no bin changes) or an int >= 1, got {max_passes!r}")


def _slots_in_order(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, in_row)``, both ``[b, m]`` with m the most slots in a row: ``order[r, i]`` is the
    plain position of row r's i-th slot (0 where ``in_row`` is False, i >= the row's slot count)."""
    b, n = slots.shape
    positions = torch.arange(n, device=slots.device).expand(b, n)
    counts = slots.sum(1)
    m = int(counts.max())
    order = torch.where(slots, positions, positions + n).sort(1).values[:, :m]
    in_row = torch.arange(m, device=slots.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(in_row, order, torch.zeros_like(order)), in_row


# Logits per chunk of a pass, at most this many values ([positions, vocabulary]): small enough to
# stay in cache through the signal's elementwise steps (and to bound memory),
# and lets a pass stop at each row's first changed slot without projecting the rest.
_CHUNK_LOGITS = 1 << 20


def _chunk_slots(model: Any, rows: int, most: int) -> int:
    """Slots per row in one chunk of ``rows`` rows (``most``, all of them, when the vocabulary is unknown)."""
    vocab = vocab_size_of(model)
    return min(most, max(1, _CHUNK_LOGITS // (vocab * rows))) if vocab else most


def _run_pass(
    model: Any,
    layout: Interleaved,
    active: torch.Tensor,
    start: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    bins: torch.Tensor,
    signal: torch.Tensor,
    codec: ConfidenceCodec,
    guessed: torch.Tensor,
    *,
    left_pad: bool,
    lazy: bool,
) -> tuple[torch.Tensor, int, int]:
    """One pass: a forward over ``active`` rows of ``layout`` (whole rows, the columns a full pass
    sees), then the signal of each row's slots from slot index ``start[r]`` on, a chunk of slots at
    a time. Writes ``bins`` and ``signal``, and ``guessed`` (``[b]``: leading slots that hold a
    computed bin, final or not).

    A slot without a bin yet counts as changed (it is final if it comes first, a guess after).
    With ``lazy`` a row stops at the first bin it changes, and computes at most
    ``max(chunk, start)`` slots that had no bin (the window grows as the row settles): with a large
    vocabulary, guessing a whole row's bins costs about as much as stepping through it.

    Returns:
        ``(settled, computed, changed)``: per active row the number of leading slots now final
        (those before and including the first changed one), the signals computed, the bins changed.
    """
    logits_at = PositionLogits(model, layout.tokens[active], padding_mask=layout.valid_mask[active] if left_pad else None)
    count = counts[active]
    slot_index = torch.arange(order.shape[1], device=order.device).unsqueeze(0)
    chunk = _chunk_slots(model, active.numel(), order.shape[1])
    first_change = torch.full_like(count, -1)
    had = guessed[active]
    stop = torch.minimum(count, had + start.clamp(min=chunk)) if lazy else count
    refuted = torch.zeros_like(count, dtype=torch.bool)  # a bin computed before changed
    start = start.clone()
    computed = changed = 0
    while True:
        pending = (start < stop) & ~refuted if lazy else start < stop
        if not bool(pending.any()):
            break
        todo = pending.unsqueeze(1) & (slot_index >= start.unsqueeze(1)) & (slot_index < (start + chunk).clamp(max=stop).unsqueeze(1))
        local, i = todo.nonzero(as_tuple=True)
        rows = active[local]
        t = order[rows, i]
        producing = (layout.plain_index[rows, t] - 1).clamp(min=0)
        new_signal = codec.signal_from_logits(logits_at(local, producing))
        new_bins = codec.bins_from_signal(new_signal)
        moved = torch.zeros_like(todo)
        fresh = i >= had[local]
        moved[local, i] = (new_bins != bins[rows, t]) | fresh
        refuted |= (moved & (slot_index < had.unsqueeze(1))).any(1)
        bins[rows, t], signal[rows, t] = new_bins, new_signal
        guessed[rows] = torch.maximum(guessed[rows], i + 1)
        first_change = torch.where(moved.any(1) & (first_change < 0), moved.long().argmax(1), first_change)
        start = start + chunk
        computed += int(local.numel())
        changed += int(moved.sum())
    settled = torch.where(first_change >= 0, first_change + 1, stop)
    return settled, computed, changed


def _can_step(model: Any) -> bool:
    """Whether the fixed point may finish by KV-cached stepping: a torchtune decoder in eval mode
    that is not FSDP-sharded and has no caches of its own (they are set up for the call only)."""
    return (
        is_torchtune_decoder(model)
        and not model.training
        and not is_fsdp_sharded(model)
        and not model.caches_are_setup()
    )


def _step_to_the_end(
    model: Any,
    layout: Interleaved,
    rows: torch.Tensor,
    order: torch.Tensor,
    final: torch.Tensor,
    counts: torch.Tensor,
    bins: torch.Tensor,
    signal: torch.Tensor,
    codec: ConfidenceCodec,
) -> None:
    """Bins of ``rows``' slots from their first non-final one on, as a decoder finds them: prefill
    the final prefix into a KV cache, then one forward per slot feeding the content token, its
    new confidence token and any plain tokens up to the next slot. Writes ``bins`` and ``signal``."""
    tokens = layout.tokens[rows].clone()
    valid = layout.valid_mask[rows]
    first, count = final[rows], counts[rows]
    content_col = layout.plain_index[rows].gather(1, order[rows])  # [r, m]: column of slot i's token
    steps = int((count - first).max())
    # The prefill ends at the column that produces the row's first non-final slot.
    start = content_col.gather(1, first.unsqueeze(1)).squeeze(1)
    prefill_width = int(start.max())
    # Step j feeds, per row, columns [content_col[i], content_col[i + 1]) with i = first + j - 1.
    index = first.unsqueeze(1) + torch.arange(steps + 1, device=rows.device).unsqueeze(0)  # [r, steps + 1]
    live = index < count.unsqueeze(1)
    at = content_col.gather(1, index.clamp(max=content_col.shape[1] - 1))
    widths = torch.where(live[:, 1:], at[:, 1:] - at[:, :-1], torch.zeros_like(at[:, 1:]))  # [r, steps]
    cache_len = prefill_width + int(widths.amax(0)[: steps - 1].sum())
    local = torch.arange(rows.shape[0], device=rows.device)
    slot_plain = order[rows].gather(1, index.clamp(max=order.shape[1] - 1))  # plain position of slot first + j
    conf_ids = codec.token_ids.to(tokens.device)
    with kv_session(model, rows.shape[0], cache_len) as session:
        cols = torch.arange(prefill_width, device=rows.device)
        logits = session.feed(tokens[:, :prefill_width], valid[:, :prefill_width] & (cols < start.unsqueeze(1)), start - 1)
        for j in range(steps):
            now = live[:, j]
            new_signal = codec.signal_from_logits(logits[now])
            new_bins = codec.bins_from_signal(new_signal)
            bins[rows[now], slot_plain[now, j]] = new_bins
            signal[rows[now], slot_plain[now, j]] = new_signal
            tokens[local[now], at[now, j] + 1] = conf_ids[new_bins].to(tokens.dtype)
            if j == steps - 1:
                break
            k = int(widths[:, j].max())
            feed_cols = (at[:, j].unsqueeze(1) + torch.arange(k, device=rows.device)).clamp(max=tokens.shape[1] - 1)
            feed_valid = torch.arange(k, device=rows.device).unsqueeze(0) < widths[:, j].unsqueeze(1)
            logits = session.feed(tokens.gather(1, feed_cols), feed_valid, (widths[:, j] - 1).clamp(min=0))


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
    max_passes: Optional[int] = None,
    left_pad: bool = False,
    sequential_fallback: bool = True,
) -> FixedPointBins:
    """Exact bins of every slot by fixed-point iteration, and the batch interleaved with them.

    Pass 0 takes each slot's signal from a plain forward; pass k recomputes the signals on the
    batch interleaved with pass k-1's bins. A row's slots up to and including the first one a
    pass changes are final (their context holds final bins only), so each later pass forwards
    only the rows not yet final and computes signals only from each row's first non-final slot
    on; every pass settles at least one slot per such row, so at most ``max_b(slots[b].sum())``
    passes reach the fixed point, which is what sequential decoding produces. The bins equal
    those of full passes over the whole batch bit for bit (a row's forward does not depend on
    the other rows, and the output projection runs per position).

    With ``sequential_fallback``, when the slowest row's last pass settled so few slots that
    more than a few passes would remain, the remaining slots are found as a decoder finds them,
    by KV-cached stepping from each row's first non-final slot (torchtune decoders in eval mode
    without caches set up; exact, but like any decoder not bit-identical to a full forward).

    Args:
        model: a causal LM (see :mod:`entropy_guided_generation.modeling`); run without grad. With
            torchtune KV caches enabled, call it inside ``disable_kv_cache``.
        tokens: ``[b, n]`` plain ids; right-padded, or left-padded with ``left_pad=True``.
        codec: the confidence codec.
        slots: ``[b, n]`` from :func:`confidence_slots`.
        labels: optional plain labels, carried into the interleaved batch.
        valid_mask: ``[b, n]`` True on real tokens (default: ``tokens != pad_id`` when left-padded, else all).
        max_passes: None (default) iterates until every bin is final (exact); an int >= 1 caps the
            passes (the bins may then be approximate: see ``converged`` and ``unconverged_rows``).
        sequential_fallback: allow the stepping described above (only when ``max_passes`` is None).

    Returns:
        :class:`FixedPointBins`.

    Raises:
        ValueError: when ``max_passes`` is neither None nor an int >= 1.
    """
    _check_max_passes(max_passes)
    if valid_mask is None:
        valid_mask = (tokens != pad_id) if left_pad else torch.ones_like(tokens, dtype=torch.bool)
    b = tokens.shape[0]
    no_bins = torch.full_like(tokens, -1)

    def build(bins: torch.Tensor) -> Interleaved:
        conf = codec.token_ids_for_bins(bins.clamp(min=0))
        return interleave(tokens, slots, conf, labels=labels, pad_id=pad_id, valid_mask=valid_mask, left_pad=left_pad)

    signal = torch.full(tokens.shape, float("nan"), dtype=codec.compute_dtype, device=tokens.device)
    if not bool(slots.any()):
        return FixedPointBins(no_bins, signal, 0, 0.0, True, build(no_bins))
    bins = no_bins.clone()

    order, in_row = _slots_in_order(slots)
    counts = in_row.sum(1)
    everyone = torch.arange(b, device=tokens.device)
    # Pass 0: the plain sequence. A row's first slot is final at once (no confidence token precedes it).
    plain = interleave(tokens, torch.zeros_like(slots), tokens, pad_id=pad_id, valid_mask=valid_mask, left_pad=left_pad)
    zeros = torch.zeros_like(counts)
    guessed = torch.zeros_like(counts)  # [b] leading slots of each row that hold a computed bin
    lazy = max_passes is None
    _, computed, _ = _run_pass(
        model, plain, everyone, zeros, order, counts, bins, signal, codec, guessed, left_pad=left_pad, lazy=lazy
    )
    final = counts.clamp(max=1)  # [b] leading slots of each row whose bins are final
    passes, pass_rows, pass_slots = 1, [b], [computed]
    changed = math.nan
    stepped = 0
    # Each pass settles >= 1 slot of every row it runs, so m passes always reach the fixed point.
    limit = order.shape[1] if max_passes is None else min(max_passes, order.shape[1])
    min_progress = _chunk_slots(model, b, order.shape[1])
    while passes < limit and bool((final < counts).any()):
        active = (final < counts).nonzero().squeeze(1)
        settled, computed, n_changed = _run_pass(
            model, build(bins), active, final[active], order, counts, bins, signal, codec, guessed,
            left_pad=left_pad, lazy=lazy,
        )
        progress = settled - final[active]
        final[active] = settled
        passes += 1
        pass_rows.append(int(active.numel()))
        pass_slots.append(computed)
        changed = n_changed / int(counts.sum())
        # Slow: at this progress more than a few passes would remain, and the pass settled fewer
        # slots than a chunk (lazy passes of a large vocabulary settle at most their window).
        slow = bool(((counts[active] - settled > _STEP_AFTER_PASSES * progress) & (progress < min_progress)).any())
        if max_passes is None and sequential_fallback and slow and _can_step(model):
            behind = (final < counts).nonzero().squeeze(1)
            _step_to_the_end(model, build(bins), behind, order, final, counts, bins, signal, codec)
            stepped = int((counts - final)[behind].sum())
            final[behind] = counts[behind]
    unconverged = int((final < counts).sum())
    if max_passes is None and unconverged:
        raise RuntimeError(
            f"the fixed point left {unconverged} rows unsettled after {passes} passes, more than its bound allows"
        )
    converged = unconverged == 0
    if converged:
        changed = 0.0
    later = pass_rows[1:]
    recomputed = sum(later) / (len(later) * b) if later else math.nan
    return FixedPointBins(
        bins, signal, passes, changed, converged, build(bins),
        unconverged_rows=unconverged, pass_rows=tuple(pass_rows), pass_slots=tuple(pass_slots),
        recomputed_fraction=recomputed, stepped_slots=stepped,
    )


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
