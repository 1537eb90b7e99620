"""The fixed-point solver: exact confidence bins of every slot, as sequential decoding produces them.

H_t depends on c_<t, so one forward cannot give the bins: pass 0 takes each slot's signal from the
plain sequence, each later pass recomputes them on the batch interleaved with the previous pass's
bins, from each row's first non-final slot on (DESIGN.md, "Exactness"). When passes make little
progress, KV-cached stepping finishes the rows as a decoder would; a small cost model picks the way
(see bench/fixed_point.py for its measurements).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.interleaved import Interleaved, interleave
from entropy_guided_generation.lockstep import forwards_in_lockstep, is_fsdp_sharded
from entropy_guided_generation.modeling import (
    MIN_PROJECTED_POSITIONS,
    PositionLogits,
    forward_anywhere,
    is_torchtune_decoder,
    vocab_size_of,
)
from entropy_guided_generation.positions import SEQUENTIAL, PositionRule, position_rule
from entropy_guided_generation.sessions import kv_session


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


# On a CPU, stepping does less work than lazy passes once a signal (an output projection over the
# vocabulary, then its softmax) is dear and enough rows share each step's pass over the output
# matrix (bench/fixed_point.py, bench/prefill.py). Accelerators run a pass's positions in parallel.
_STEP_ON_CPU_FROM_ROWS = 4
_STEP_ON_CPU_FROM_SIGNAL_MACS = 1 << 22

# A KV-cached step of one row on a CPU costs about this many token-forwards of a whole-row pass: it
# feeds 1-3 tokens through matrix products too thin to run at a pass's rate (bench/fixed_point.py).
_CPU_STEP_TOKENS = 8


def _stepping_is_cheaper(model: Any, rows: int, device: torch.device) -> bool:
    """Whether KV-cached stepping finds ``rows`` rows' bins with less work than lazy passes (see
    above): on a CPU, from ``_STEP_ON_CPU_FROM_ROWS`` rows, when a signal's output projection takes
    at least ``_STEP_ON_CPU_FROM_SIGNAL_MACS`` multiply-adds (vocabulary x hidden size)."""
    if device.type != "cpu" or rows < _STEP_ON_CPU_FROM_ROWS:
        return False
    macs = _signal_macs(model)
    return macs is not None and macs >= _STEP_ON_CPU_FROM_SIGNAL_MACS


def _hidden_size(model: Any) -> Optional[int]:
    """The width of ``model``'s token embeddings (torchtune or Hugging Face), None when unknown."""
    embeddings = getattr(model, "tok_embeddings", None)
    if embeddings is None and hasattr(model, "get_input_embeddings"):
        embeddings = model.get_input_embeddings()
    return getattr(embeddings, "embedding_dim", None)


def _signal_macs(model: Any) -> Optional[int]:
    """Multiply-adds of one signal's output projection (vocabulary x hidden size), None when unknown."""
    vocab, hidden = vocab_size_of(model), _hidden_size(model)
    return vocab * hidden if vocab and hidden else None


def _token_macs(model: Any) -> Optional[int]:
    """Multiply-adds of one token's forward through the decoder layers (their parameter count;
    attention over the context left out), None when the layers cannot be found."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    return sum(p.numel() for p in layers.parameters())


def _signal_cost(model: Any) -> float:
    """One signal's cost in token-forwards; 0 when it cannot be told (a model whose forward
    computes every position's logits anyway, e.g. a Hugging Face one)."""
    signal, token = _signal_macs(model), _token_macs(model)
    return signal / token if signal and token else 0.0


def _signals_are_cheap(model: Any) -> bool:
    """Whether a signal costs no more than a token's forward, so a pass may compute every slot's
    signal after the settled prefix (at most doubling its cost) instead of a lazy window: those
    guesses all improve at once, and a real LM's bins settle in a few such passes."""
    return _signal_cost(model) <= 1.0


def _stepping_cost(
    signal_cost: float, device: torch.device, final: torch.Tensor, counts: torch.Tensor, width: int
) -> float:
    """Token-forwards that stepping every row not final yet to its end would cost: per step and row
    a thin KV-cached forward (``_CPU_STEP_TOKENS`` on a CPU; on an accelerator a step takes about
    as long as a pass over the row's ``width`` columns) plus one signal (``signal_cost``, see
    :func:`_signal_cost`)."""
    behind = final < counts
    rows, steps = int(behind.sum()), int((counts - final).max())
    per_step = (_CPU_STEP_TOKENS if device.type == "cpu" else width) + signal_cost
    return rows * steps * per_step


def check_max_passes(max_passes: Any, key: str = "max_passes", none: str = "None") -> Optional[int]:
    """``max_passes`` after checking it: None (iterate until no bin changes) or an int >= 1 (a cap).

    Args:
        key: the name in the error (``interleaving.max_passes`` for a config).
        none: how the error spells "no cap" (``null`` for YAML).

    Raises:
        ValueError: ``interleaving.max_passes must be null (iterate until no bin changes) or an int >= 1, got 0``.
    """
    if max_passes is not None and (isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1):
        raise ValueError(f"{key} must be {none} (iterate until no bin changes) or an int >= 1, got {max_passes!r}")
    return max_passes


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


# Logits per chunk of a pass, about this many values ([positions, vocabulary]): small enough to
# stay in cache through the signal's elementwise steps (and to bound memory), and lets a pass stop
# at each row's first changed slot without projecting the rest ...
_CHUNK_LOGITS = 1 << 20
# ... but at least the positions PositionLogits projects at once anyway (it pads fewer to this
# many, for the bits' sake), so a chunk of few rows does not project positions it never scores.
_MIN_CHUNK_POSITIONS = MIN_PROJECTED_POSITIONS


def _chunk_slots(model: Any, rows: int, most: int) -> int:
    """Slots per row in one chunk of ``rows`` rows (``most``, all of them, when the vocabulary is unknown)."""
    vocab = vocab_size_of(model)
    if not vocab:
        return most
    return min(most, max(1, _CHUNK_LOGITS // (vocab * rows), -(-_MIN_CHUNK_POSITIONS // rows)))


def _leading_known(known_bins: Optional[torch.Tensor], slots: torch.Tensor, order: torch.Tensor, in_row: torch.Tensor) -> torch.Tensor:
    """``[b]``: how many of each row's first slots (in order) ``known_bins`` holds a bin for (>= 0)."""
    if known_bins is None:
        return torch.zeros(slots.shape[0], dtype=torch.long, device=slots.device)
    rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1)
    has = (known_bins[rows, order] >= 0) & in_row
    return has.long().cumprod(1).sum(1)


def _can_step(model: Any) -> bool:
    """Whether the fixed point may finish by KV-cached stepping: a torchtune decoder (in training
    too: without grad it is the same forward) that is not FSDP-sharded (its ranks keep their passes
    in lockstep) and has no caches of its own (they are set up for the call only)."""
    return is_torchtune_decoder(model) and not is_fsdp_sharded(model) and not model.caches_are_setup()


@dataclass(frozen=True)
class _Batch:
    """The plain batch the fixed point lays out: what :func:`interleave` needs besides the bins."""

    tokens: torch.Tensor
    slots: torch.Tensor
    labels: Optional[torch.Tensor]
    valid_mask: torch.Tensor
    pad_id: int
    left_pad: bool
    codec: ConfidenceCodec

    def interleaved(self, bins: torch.Tensor) -> Interleaved:
        """The batch interleaved with ``bins`` ``[b, n]`` (bin 0's token where a slot has none yet)."""
        conf = self.codec.token_ids_for_bins(bins.clamp(min=0))
        return interleave(
            self.tokens, self.slots, conf, labels=self.labels, pad_id=self.pad_id, valid_mask=self.valid_mask,
            left_pad=self.left_pad,
        )

    def plain(self) -> Interleaved:
        """The batch with no confidence token (pass 0's sequence)."""
        return interleave(
            self.tokens, torch.zeros_like(self.slots), self.tokens, pad_id=self.pad_id, valid_mask=self.valid_mask,
            left_pad=self.left_pad,
        )


class _Solver:
    """The fixed point's state over one batch, and the two ways it moves on: a pass
    (:meth:`run_pass`) and KV-cached stepping (:meth:`step_the_rest`).

    Attributes:
        order, in_row: ``[b, m]`` from :func:`_slots_in_order`; ``counts`` ``[b]`` slots per row.
        bins, signal: ``[b, n]`` each slot's current bin and its signal (-1 / NaN before one is computed).
        guessed: ``[b]`` leading slots of each row that hold a computed bin, final or not.
        final: ``[b]`` leading slots of each row whose bins are final.
    """

    def __init__(self, model: Any, batch: _Batch, positions: PositionRule, lazy: bool):
        self.model, self.batch, self.positions, self.lazy = model, batch, positions, lazy
        self.codec = batch.codec
        self.order, self.in_row = _slots_in_order(batch.slots)
        self.counts = self.in_row.sum(1)
        self.bins = torch.full_like(batch.tokens, -1)
        self.signal = torch.full(batch.tokens.shape, float("nan"), dtype=self.codec.compute_dtype, device=batch.tokens.device)
        self.guessed = torch.zeros_like(self.counts)
        self.final = torch.zeros_like(self.counts)

    def behind(self) -> torch.Tensor:
        """``[b]`` bool: rows holding a bin that is not final yet."""
        return self.final < self.counts

    def interleaved(self) -> Interleaved:
        """The batch interleaved with the current bins."""
        return self.batch.interleaved(self.bins)

    def take_known(self, known_bins: torch.Tensor, known_signal: Optional[torch.Tensor], known: torch.Tensor) -> None:
        """Take each row's ``known`` ``[b]`` leading slots' bins (and signals) as final."""
        rows, index = (self.in_row & (torch.arange(self.order.shape[1], device=self.order.device) < known.unsqueeze(1))).nonzero(as_tuple=True)
        taken = (rows, self.order[rows, index])
        self.bins[taken] = known_bins[taken]
        if known_signal is not None:
            self.signal[taken] = known_signal[taken].to(self.signal.dtype)
        self.guessed = known.clone()
        self.final = known.clone()

    def run_pass(self, layout: Interleaved, active: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """One pass: a forward over ``active`` rows of ``layout`` (whole rows, the columns a full pass
        sees), then the signal of each row's slots from slot index ``start[r]`` on, a chunk of slots at
        a time. Writes ``bins``, ``signal`` and ``guessed``.

        A slot without a bin yet counts as changed (it is final if it comes first, a guess after).
        When lazy, a row stops at the first bin it changes, and computes at most
        ``max(chunk, start)`` slots that had no bin (the window grows as the row settles): with a large
        vocabulary, guessing a whole row's bins costs about as much as stepping through it.

        Returns:
            ``(settled, computed, changed)``: per active row the number of leading slots now final
            (those before and including the first changed one), the signals computed, the bins changed.
        """
        model, order, bins, signal, codec, guessed, lazy = (
            self.model, self.order, self.bins, self.signal, self.codec, self.guessed, self.lazy
        )
        # Default positions are the model's own (right padding) or the padding mask's (left padding).
        input_pos = None
        if not self.positions.is_default:
            input_pos = self.positions.position_ids(layout.valid_mask[active], layout.is_confidence[active])
        logits_at = PositionLogits(
            model, layout.tokens[active], padding_mask=layout.valid_mask[active] if self.batch.left_pad else None,
            input_pos=input_pos,
        )
        count = self.counts[active]
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
            logits = logits_at(local, producing)
            # Named by the plain position of the token they produce, as training's bins are.
            signals.assert_finite(logits, "fixed-point logits", rows=rows, positions=t)
            new_signal = codec.signal_from_logits(logits)
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

    def step_the_rest(self) -> int:
        """Step every row not final yet from its first non-final slot to its end (:meth:`step_rows`);
        the slots stepped."""
        behind = self.behind().nonzero().squeeze(1)
        self.step_rows(self.interleaved(), behind)
        n = int((self.counts - self.final)[behind].sum())
        self.final[behind] = self.counts[behind]
        return n

    def step_rows(self, layout: Interleaved, rows: torch.Tensor) -> None:
        """Bins of ``rows``' slots from their first non-final one on, as a decoder finds them: prefill
        the final prefix into a KV cache, then one forward per slot feeding the content token, its
        new confidence token and any plain tokens up to the next slot. Writes ``bins`` and ``signal``."""
        order, bins, signal, codec = self.order, self.bins, self.signal, self.codec
        tokens = layout.tokens[rows].clone()
        valid = layout.valid_mask[rows]
        advances = self.positions.advances(valid, layout.is_confidence[rows])
        first, count = self.final[rows], self.counts[rows]
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
        with kv_session(self.model, rows.shape[0], cache_len) as session:
            cols = torch.arange(prefill_width, device=rows.device)
            in_prefill = cols < start.unsqueeze(1)
            logits = session.feed(
                tokens[:, :prefill_width], valid[:, :prefill_width] & in_prefill, start - 1,
                advances=advances[:, :prefill_width] & in_prefill,
            )
            for j in range(steps):
                now = live[:, j]
                # Rows past their last slot drop out; while every row steps, no [rows, vocabulary] copy.
                step_logits = logits if bool(now.all()) else logits[now]
                signals.assert_finite(step_logits, f"fixed-point step {j} logits", rows=rows[now], positions=slot_plain[now, j])
                new_signal = codec.signal_from_logits(step_logits)
                new_bins = codec.bins_from_signal(new_signal)
                bins[rows[now], slot_plain[now, j]] = new_bins
                signal[rows[now], slot_plain[now, j]] = new_signal
                tokens[local[now], at[now, j] + 1] = conf_ids[new_bins].to(tokens.dtype)
                if j == steps - 1:
                    break
                k = int(widths[:, j].max())
                feed_cols = (at[:, j].unsqueeze(1) + torch.arange(k, device=rows.device)).clamp(max=tokens.shape[1] - 1)
                feed_valid = torch.arange(k, device=rows.device).unsqueeze(0) < widths[:, j].unsqueeze(1)
                logits = session.feed(
                    tokens.gather(1, feed_cols), feed_valid, (widths[:, j] - 1).clamp(min=0),
                    advances=advances.gather(1, feed_cols) & feed_valid,
                )


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
    positions: Any = SEQUENTIAL,
    known_bins: Optional[torch.Tensor] = None,
    known_signal: Optional[torch.Tensor] = None,
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

    What a pass computes depends on what a signal costs against a token's forward: when a signal
    is cheaper (a real LM: its layers outweigh its output projection), every slot after a row's
    settled prefix, so all guesses improve at once; when it is dearer (a large vocabulary on a
    tiny model), a lazy window that stops at the row's first changed bin.

    With ``sequential_fallback``, the remaining slots are found as a decoder finds them, by
    KV-cached stepping from each row's first non-final slot (torchtune decoders, in training too,
    not FSDP-sharded, without caches set up; exact, but like any decoder not bit-identical to a
    full forward). The switch follows the observed progress: passes go on until the token-forwards
    they took since pass 0 reach what stepping from the settled prefix would take (so the bins
    never cost much more than twice the cheaper way); with lazy passes on a CPU, from 4 rows, when
    a signal's output projection takes at least 2**22 multiply-adds, stepping starts right after
    pass 0.

    A codec whose ``context`` is ``plain`` (``confidence.context: plain``) defines each bin as that
    of the model's distribution over the plain prefix: pass 0 gives every bin, final at once.

    Args:
        model: a causal LM (see :mod:`entropy_guided_generation.modeling`); run without grad. With
            torchtune KV caches set up, call it inside ``sessions.caches_set_aside``.
        tokens: ``[b, n]`` plain ids; right-padded, or left-padded with ``left_pad=True``.
        codec: the confidence codec.
        slots: ``[b, n]`` from :func:`~entropy_guided_generation.interleaved.confidence_slots`.
        labels: optional plain labels, carried into the interleaved batch.
        valid_mask: ``[b, n]`` True on real tokens (default: ``tokens != pad_id`` when left-padded, else all).
        max_passes: None (default) iterates until every bin is final (exact); an int >= 1 caps the
            passes (the bins may then be approximate: see ``converged`` and ``unconverged_rows``).
        sequential_fallback: allow the stepping described above (only when ``max_passes`` is None).
        positions: the position rule of every forward, a
            :class:`~entropy_guided_generation.positions.PositionRule` or its name; training, decoding
            and eval pass their interleaving's.
        known_bins: optional ``[b, n]`` bins already known to be final (-1 elsewhere), e.g. those of
            a prompt prefix seen before (:class:`~entropy_guided_generation.generation.prompt_bins.PromptBinsCache`):
            each row's leading slots that hold one are taken as they are, the passes start after them.
            Exact when they are (a slot's bin depends only on the tokens and bins before it).
        known_signal: optional ``[b, n]`` signals behind ``known_bins`` (NaN in ``signal`` otherwise).

    Returns:
        :class:`FixedPointBins`.

    Raises:
        ValueError: when ``max_passes`` is neither None nor an int >= 1.
    """
    check_max_passes(max_passes)
    rule = position_rule(positions)
    if known_bins is not None and known_bins.shape != tokens.shape:
        raise ValueError(f"known_bins must have the shape of tokens {tuple(tokens.shape)}, got {tuple(known_bins.shape)}")
    if valid_mask is None:
        valid_mask = (tokens != pad_id) if left_pad else torch.ones_like(tokens, dtype=torch.bool)
    batch = _Batch(tokens, slots, labels, valid_mask, pad_id, left_pad, codec)
    # Every pass is a round of forward_anywhere: under FSDP2 a rank with no pass of its own to run
    # joins each pass of the others with an idle forward (pass 0's round included).
    if not bool(slots.any()):
        while forward_anywhere(model, False, tokens):
            pass
        no_bins = torch.full_like(tokens, -1)
        signal = torch.full(tokens.shape, float("nan"), dtype=codec.compute_dtype, device=tokens.device)
        return FixedPointBins(no_bins, signal, 0, 0.0, True, batch.interleaved(no_bins))
    forward_anywhere(model, True, tokens)
    plain_context = codec.context == "plain"
    lazy = max_passes is None and not plain_context and not _signals_are_cheap(model)
    solver = _Solver(model, batch, rule, lazy)
    known = _leading_known(known_bins, slots, solver.order, solver.in_row)
    if bool(known.any()) and not plain_context:
        if forwards_in_lockstep(model):
            raise ValueError("known_bins cannot be used with an FSDP2-sharded model (its passes must match across ranks)")
        pass_rows, computed = _first_pass_after_known(solver, known_bins, known_signal, known)
    else:
        pass_rows, computed = _first_pass_plain(solver, plain_context)
    return _iterate(solver, pass_rows, computed, max_passes=max_passes, may_step=(
        max_passes is None and sequential_fallback and _can_step(model)
    ))


def _first_pass_after_known(
    solver: _Solver, known_bins: torch.Tensor, known_signal: Optional[torch.Tensor], known: torch.Tensor
) -> tuple[list[int], int]:
    """Pass 0 when ``known`` ``[b]`` leading slots of each row hold known bins: it starts after them,
    on the batch interleaved with them (bin 0 after). Returns ``(pass_rows, computed)`` (no pass
    when every row is known to its end)."""
    solver.take_known(known_bins, known_signal, known)
    first = solver.behind().nonzero().squeeze(1)
    computed = 0
    if first.numel():
        # A row's first slot without a bin is final once computed (only final bins precede it).
        solver.final[first], computed, _ = solver.run_pass(solver.interleaved(), first, solver.final[first])
    return [int(first.numel())], computed


def _first_pass_plain(solver: _Solver, plain_context: bool) -> tuple[list[int], int]:
    """Pass 0 over the plain sequence: a row's first slot is final at once (no confidence token
    precedes it); under a plain context every slot is. Returns ``(pass_rows, computed)``."""
    b = solver.batch.tokens.shape[0]
    _, computed, _ = solver.run_pass(
        solver.batch.plain(), torch.arange(b, device=solver.batch.tokens.device), torch.zeros_like(solver.counts)
    )
    solver.final = solver.counts.clone() if plain_context else solver.counts.clamp(max=1)
    return [b], computed


def _iterate(
    solver: _Solver, pass_rows: list[int], computed: int, *, max_passes: Optional[int], may_step: bool
) -> FixedPointBins:
    """The passes after pass 0 (``pass_rows`` ``[rows of pass 0]``, ``computed`` its signals), switching to
    stepping when that is the cheaper way to the end (see :func:`compute_bins`); the result."""
    model, tokens, counts = solver.model, solver.batch.tokens, solver.counts
    b = tokens.shape[0]
    passes = 1 if pass_rows[0] > 0 else 0
    pass_slots = [computed]
    changed = math.nan
    stepped = 0
    rows_behind = int(solver.behind().sum())
    if may_step and rows_behind and solver.lazy and _stepping_is_cheaper(model, rows_behind, tokens.device):
        # After pass 0 (each row's first slot without a bin is final), step through the rest.
        stepped = solver.step_the_rest()
    # Each pass settles >= 1 slot of every row it runs, so m passes always reach the fixed point.
    limit = solver.order.shape[1] if max_passes is None else min(max_passes, solver.order.shape[1])
    spent = 0.0  # token-forwards of the passes after pass 0, signals included
    signal_cost = _signal_cost(model)
    while forward_anywhere(model, (mine := passes < limit and bool(solver.behind().any())), tokens):
        if not mine:
            continue  # another rank's pass: this one ran an idle forward with it
        active = solver.behind().nonzero().squeeze(1)
        laid = solver.interleaved()
        settled, computed, n_changed = solver.run_pass(laid, active, solver.final[active])
        solver.final[active] = settled
        passes += 1
        pass_rows.append(int(active.numel()))
        pass_slots.append(computed)
        changed = n_changed / int(counts.sum())
        width = int(laid.tokens.shape[1])
        spent += active.numel() * width + computed * signal_cost
        if may_step and bool(solver.behind().any()) and spent >= _stepping_cost(signal_cost, tokens.device, solver.final, counts, width):
            stepped = solver.step_the_rest()
    unconverged = int(solver.behind().sum())
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
        solver.bins, solver.signal, passes, changed, converged, solver.interleaved(),
        unconverged_rows=unconverged, pass_rows=tuple(pass_rows), pass_slots=tuple(pass_slots),
        recomputed_fraction=recomputed, stepped_slots=stepped,
    )


__all__ = ["FixedPointBins", "check_max_passes", "compute_bins"]
