"""Interleaving modes as values, plain <-> interleaved sequences, and exact bins.

A *slot* is a plain position t whose token x_t is followed by its confidence token c_t in the
interleaved sequence. Which positions are slots is the only thing that differs between modes, and
one :class:`Mode` per name in the :data:`MODES` table says it; :class:`Interleaving` binds a mode to
a tokenizer's stop and marker ids and gives training its slot rule (:meth:`Interleaving.slots`),
decoding its online step policy (:meth:`Interleaving.step_policy`) and eval its position budget.
The registered modes:

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

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec, encode_text
from entropy_guided_generation.modeling import (
    MIN_PROJECTED_POSITIONS,
    PositionLogits,
    forward_anywhere,
    forwards_in_lockstep,
    is_fsdp_sharded,
    is_torchtune_decoder,
    kv_session,
    vocab_size_of,
)

IGNORE_INDEX = -100
POSITION_RULES = ("sequential", "shared")
"""``interleaving.positions``: does a confidence token advance the position id (sequential), or take
its content token's (shared)?"""


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


# --------------------------------------------------------------------- modes
class ResponseRule(abc.ABC):
    """Which response tokens of a row get a confidence token, written twice by design over one
    definition: :meth:`slots` for a whole batch at once (training, teacher forcing) and
    :meth:`tracker` online, one content token at a time (decoding). ``tests/test_layout_modes.py``
    checks, for every registered mode, that the two agree token for token.
    """

    @abc.abstractmethod
    def slots(self, tokens: torch.Tensor, response: torch.Tensor, marker_ids: Optional[Sequence[int]]) -> torch.Tensor:
        """``[b, n]`` bool, a subset of ``response``: the response positions that get a slot.

        Args:
            tokens: ``[b, n]`` plain ids.
            response: ``[b, n]`` bool, real response tokens.
            marker_ids: the marker's ids, when the mode reads one.
        """

    @abc.abstractmethod
    def tracker(self, batch_size: int, device: torch.device, marker_ids: Optional[Sequence[int]]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A fresh online rule: called with each generated content token ``[b]`` in turn, it returns
        ``[b]`` bool, whether that token gets a confidence token, and updates its state."""


class EveryResponseToken(ResponseRule):
    """Every response token gets a confidence token (modes full and answer)."""

    def slots(self, tokens, response, marker_ids):
        return response

    def tracker(self, batch_size, device, marker_ids):
        always = torch.ones(batch_size, dtype=torch.bool, device=device)
        return lambda token: always


class UntilMarker(ResponseRule):
    """Response tokens up to and including the first occurrence of the marker ids inside the
    response; all of them when the marker never occurs (mode marker)."""

    def slots(self, tokens, response, marker_ids):
        end = marker_end_positions(tokens, marker_ids, response)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        limit = torch.where(end >= 0, end, torch.full_like(end, tokens.shape[1])).unsqueeze(1)
        return response & (positions <= limit)

    def tracker(self, batch_size, device, marker_ids):
        return MarkerTracker(marker_ids, batch_size, device)


class MarkerTracker:
    """Online :class:`UntilMarker`: interleave until the row's generated content ends with the marker."""

    def __init__(self, marker_ids: Sequence[int], batch_size: int, device: torch.device):
        self.marker = torch.tensor(list(marker_ids), dtype=torch.long, device=device)
        self.recent = torch.full((batch_size, len(marker_ids)), -1, dtype=torch.long, device=device)
        self.interleaving = torch.ones(batch_size, dtype=torch.bool, device=device)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        wants = self.interleaving.clone()
        self.recent = torch.cat([self.recent[:, 1:], token.unsqueeze(1)], dim=1)
        # The marker's last token still gets its confidence token ("up to and including").
        self.interleaving &= ~(self.recent == self.marker).all(-1)
        return wants


@dataclass(frozen=True)
class Mode:
    """What one ``interleaving.mode`` means: the only thing that differs between modes.

    Attributes:
        name: the config value.
        prompt: the prompt is interleaved too (every real token after the row's first).
        response: which response tokens get a confidence token (None: the response stays plain).
        needs_marker: the mode reads ``interleaving.marker``.
        summary: one line for docs and error messages.
    """

    name: str
    prompt: bool
    response: Optional[ResponseRule]
    needs_marker: bool = False
    summary: str = ""

    @property
    def is_plain(self) -> bool:
        """No confidence token anywhere (mode none): decoding is plain generation."""
        return not self.prompt and self.response is None


MODES: Dict[str, Mode] = {}
"""The one table of interleaving modes, by name; :func:`register_mode` adds one."""


def register_mode(mode: Mode) -> Mode:
    """Add ``mode`` to :data:`MODES`: training, decoding (``get_decoder(name)``) and eval accept it at once."""
    if mode.name in MODES and MODES[mode.name] != mode:
        raise ValueError(f"an interleaving mode named {mode.name!r} is already registered")
    MODES[mode.name] = mode
    return mode


def mode_named(name: Any) -> Mode:
    """The registered :class:`Mode` called ``name`` (a :class:`Mode` passes through).

    Raises:
        ValueError: ``unknown interleaving.mode 'x'; expected one of none, full, answer, marker``.
    """
    if isinstance(name, Mode):
        return name
    if name not in MODES:
        raise ValueError(f"unknown interleaving.mode {name!r}; expected one of {', '.join(MODES)}")
    return MODES[name]


def check_mode(mode: str) -> str:
    """Return ``mode`` if it names a registered mode, else raise (see :func:`mode_named`)."""
    return mode_named(mode).name


@dataclass(frozen=True)
class Interleaving:
    """One mode bound to a tokenizer's ids: everything training, decoding and eval need to agree
    on which plain positions get a confidence token.

    Attributes:
        mode: the :class:`Mode`.
        stop_ids: ids that never get a confidence token (EOS, end of turn).
        marker_ids: the tokenized ``interleaving.marker`` (modes that read one, else None).
        positions: the position rule, ``sequential`` or ``shared`` (see :meth:`advances_position`).
    """

    mode: Mode
    stop_ids: Tuple[int, ...] = ()
    marker_ids: Optional[Tuple[int, ...]] = None
    positions: str = "sequential"

    @classmethod
    def of(
        cls,
        mode: Any,
        *,
        stop_ids: Sequence[int] = (),
        marker_ids: Optional[Sequence[int]] = None,
        positions: str = "sequential",
    ) -> "Interleaving":
        """Bind ``mode`` (a name or a :class:`Mode`) to its ids and position rule.

        Raises:
            ValueError: on an unknown mode or position rule, or a marker mode without marker ids
                (an empty marker included).
        """
        mode = mode_named(mode)
        check_position_rule(positions)
        if mode.needs_marker:
            if marker_ids is None:
                raise ValueError(
                    f"mode {mode.name!r} needs marker ids (marker=..., the tokenized interleaving.marker), got none"
                )
            if len(marker_ids) == 0:
                raise ValueError("the marker must tokenize to at least one id; got an empty marker")
        marker = tuple(int(i) for i in marker_ids) if mode.needs_marker else None
        return cls(mode, tuple(int(i) for i in stop_ids), marker, positions)

    @classmethod
    def for_tokenizer(
        cls, mode: Any, tokenizer: Any, marker: Optional[str] = None, positions: str = "sequential"
    ) -> "Interleaving":
        """Bind ``mode`` to a torchtune or transformers tokenizer: its stop tokens and EOS never get a
        confidence token; ``marker`` (a string) is tokenized without BOS/EOS.

        Raises:
            ValueError: on an unknown mode, or a marker mode without a marker string.
        """
        mode = mode_named(mode)
        if mode.needs_marker and not marker:
            raise ValueError(f"interleaving.mode {mode.name!r} needs interleaving.marker (e.g. '####'), got {marker!r}")
        marker_ids = encode_text(marker, tokenizer) if mode.needs_marker else None
        return cls.of(mode, stop_ids=tokenizer_stop_ids(tokenizer), marker_ids=marker_ids, positions=positions)

    @property
    def name(self) -> str:
        return self.mode.name

    @property
    def is_plain(self) -> bool:
        return self.mode.is_plain

    @property
    def interleaves_prompt(self) -> bool:
        return self.mode.prompt

    @property
    def columns_per_content_token(self) -> int:
        """Sequence positions a generated token may take: 2 when it can be followed by its confidence token."""
        return 1 if self.mode.response is None else 2

    @property
    def columns_per_prompt_token(self) -> int:
        return 2 if self.mode.prompt else 1

    def slots(
        self,
        tokens: torch.Tensor,
        *,
        response_mask: Optional[torch.Tensor] = None,
        valid_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Which plain positions get a confidence token: ``[b, n]`` bool (training's slot rule).

        Never a stop token, padding, or a row's first token (nothing produced it); in a
        prompt-interleaving mode every other prompt token; in the response, what the mode's response
        rule says.

        Args:
            tokens: ``[b, n]`` plain token ids (any padding side).
            response_mask: ``[b, n]`` True on response tokens. None means the rows are all prompt,
                which only a prompt-interleaving mode (full) accepts.
            valid_mask: ``[b, n]`` True on real tokens (default: all).

        Raises:
            ValueError: without ``response_mask`` in a mode that interleaves responses only.
        """
        if valid_mask is None:
            valid_mask = torch.ones_like(tokens, dtype=torch.bool)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        eligible = valid_mask & (positions != first_real_position(valid_mask).unsqueeze(1))
        if self.stop_ids:
            eligible &= ~torch.isin(tokens, torch.as_tensor(self.stop_ids, dtype=tokens.dtype, device=tokens.device))
        if response_mask is None:
            if self.mode.response is not None and not self.mode.prompt:
                raise ValueError(f"mode {self.name!r} needs a response_mask telling prompt from response")
            response = torch.zeros_like(eligible)
        else:
            response = response_mask.bool() & valid_mask
        slots = eligible & ~response if self.mode.prompt else torch.zeros_like(eligible)
        if self.mode.response is not None:
            slots |= eligible & self.mode.response.slots(tokens, response, self.marker_ids)
        return slots

    def advances_position(self, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
        """See :func:`advances_position` under this interleaving's rule."""
        return advances_position(self.positions, valid_mask, is_confidence)

    def position_ids(self, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
        """See :func:`position_ids` under this interleaving's rule."""
        return position_ids(self.positions, valid_mask, is_confidence)

    def step_policy(self, batch_size: int, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The decoding side of :meth:`slots`: a fresh callable ``(token [b], active [b]) -> [b]`` bool,
        whether the content token just generated gets a confidence token (active rows only, never a
        stop token). Call it once per content step, in order."""
        if self.mode.response is None:
            never = torch.zeros(batch_size, dtype=torch.bool, device=device)
            return lambda token, active: never
        rule = self.mode.response.tracker(batch_size, device, self.marker_ids)
        stops = torch.as_tensor(self.stop_ids, dtype=torch.long, device=device)

        def policy(token: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            return rule(token) & active & ~torch.isin(token, stops)

        return policy

    # Position budgets: how many plain tokens fit ``max_length`` sequence positions once interleaved.
    @property
    def positions_per_content_token(self) -> int:
        """Position ids a generated token takes at most, with its confidence token: its columns under
        ``sequential`` positions, 1 under ``shared`` (the confidence token repeats its position)."""
        return self.columns_per_content_token if self.positions == "sequential" else 1

    def prompt_positions(self, tokens: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """``[b]`` position ids the prompt rows ``tokens`` ``[b, p]`` take once laid out for decoding:
        their real tokens, plus their confidence tokens in a prompt-interleaving mode under
        ``sequential`` positions."""
        real = valid_mask.long().sum(1)
        if not (self.interleaves_prompt and self.positions == "sequential"):
            return real
        return real + self.slots(tokens, valid_mask=valid_mask).long().sum(1)

    def prompt_budget(self, max_length: int, max_gen_toks: int) -> int:
        """Most plain prompt tokens that fit ``max_length`` cache columns beside ``max_gen_toks``
        content steps (a prompt of p tokens takes up to 2p - 1 columns when interleaved).

        Raises:
            ValueError: when not even one prompt token fits.
        """
        room = max_length - self.columns_per_content_token * max_gen_toks
        budget = (room + 1) // 2 if self.interleaves_prompt else room
        if budget < 1:
            raise ValueError(
                f"max_gen_toks {max_gen_toks} leaves no room for a prompt in max_seq_length {max_length} "
                f"({self.columns_per_content_token} cache columns per generated token in mode {self.name!r}); lower "
                "max_gen_toks or raise max_seq_length"
            )
        return budget

    def scoring_budget(self, max_length: int, continuation_tokens: int) -> int:
        """Most plain context + continuation tokens whose interleaved sequence, less its last
        column (whose logits predict nothing scored), fits ``max_length`` positions."""
        extra = (self.columns_per_content_token - self.columns_per_prompt_token) * continuation_tokens
        return (max_length + 1 - extra) // self.columns_per_prompt_token

    def rolling_window(self, max_length: int) -> int:
        """Plain tokens per rolling log-likelihood window (one context token, the rest scored) that
        fit ``max_length`` positions once interleaved."""
        columns = max(self.columns_per_content_token, self.columns_per_prompt_token)
        return (max_length - (columns - 1)) // columns


NONE = register_mode(Mode("none", prompt=False, response=None, summary="P R, plain"))
FULL = register_mode(
    Mode("full", prompt=True, response=EveryResponseToken(), summary="every token after the first, prompt included")
)
ANSWER = register_mode(
    Mode("answer", prompt=False, response=EveryResponseToken(), summary="every response token; the prompt plain")
)
MARKER = register_mode(
    Mode(
        "marker", prompt=False, response=UntilMarker(), needs_marker=True,
        summary="response tokens up to and including the marker; the answer after it plain",
    )
)
PLAIN = Interleaving(NONE)
"""Mode none bound to no ids: plain generation and plain scoring."""


def advances_position(rule: str, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
    """``[b, L]`` bool: the tokens that move the position id on. ``sequential``: every real token,
    confidence tokens included (as the public CaC code). ``shared``: content tokens only, so a
    confidence token takes the position of the content token it follows and content keeps the
    plain model's relative positions under RoPE."""
    if rule == "shared":
        return valid_mask & ~is_confidence
    return valid_mask


def position_ids(rule: str, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
    """Position id ``[b, L]`` of each token of an interleaved sequence (any padding side) under
    ``rule``: 0 at the row's first real token (padding before it gets 0 and is never attended)."""
    return (advances_position(rule, valid_mask, is_confidence).long().cumsum(1) - 1).clamp(min=0)


def check_position_rule(positions: Any) -> str:
    """Return ``positions`` if it is one of :data:`POSITION_RULES`, else raise naming it."""
    if positions not in POSITION_RULES:
        raise ValueError(f"unknown interleaving.positions {positions!r}; expected one of {', '.join(POSITION_RULES)}")
    return positions


def tokenizer_stop_ids(tokenizer: Any) -> list[int]:
    """Sorted ids that end a row and never get a confidence token: a torchtune tokenizer's
    ``stop_tokens`` and ``eos_id``, or a transformers tokenizer's ``eos_token_id``."""
    ids = set(getattr(tokenizer, "stop_tokens", None) or [])
    for name in ("eos_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return sorted(ids)


def first_real_position(valid_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[b]`` of each row's first real (non-padding) token."""
    return valid_mask.long().argmax(-1)


def confidence_slots(
    tokens: torch.Tensor,
    *,
    mode: Any,
    response_mask: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    stop_ids: Sequence[int] = (),
    marker_ids: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """``Interleaving.of(mode, stop_ids=..., marker_ids=...).slots(tokens, ...)``: ``[b, n]`` bool,
    which plain positions get a confidence token (see :meth:`Interleaving.slots`)."""
    interleaving = Interleaving.of(mode, stop_ids=stop_ids, marker_ids=marker_ids)
    return interleaving.slots(tokens, response_mask=response_mask, valid_mask=valid_mask)


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


def _stepping_cost(model: Any, device: torch.device, final: torch.Tensor, counts: torch.Tensor, width: int) -> float:
    """Token-forwards that stepping every row not final yet to its end would cost: per step and row
    a thin KV-cached forward (``_CPU_STEP_TOKENS`` on a CPU; on an accelerator a step takes about
    as long as a pass over the row's ``width`` columns) plus one signal."""
    behind = final < counts
    rows, steps = int(behind.sum()), int((counts - final).max())
    per_step = (_CPU_STEP_TOKENS if device.type == "cpu" else width) + _signal_cost(model)
    return rows * steps * per_step


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


# Logits per chunk of a pass, about this many values ([positions, vocabulary]): small enough to
# stay in cache through the signal's elementwise steps (and to bound memory), and lets a pass stop
# at each row's first changed slot without projecting the rest ...
_CHUNK_LOGITS = 1 << 20
# ... but at least the positions PositionLogits projects at once anyway (it pads fewer to this
# many, for the bits' sake): with a 128,256-token vocabulary and 8 rows, one slot per row made
# every chunk project and score twice the positions it used.
_MIN_CHUNK_POSITIONS = MIN_PROJECTED_POSITIONS


def _chunk_slots(model: Any, rows: int, most: int) -> int:
    """Slots per row in one chunk of ``rows`` rows (``most``, all of them, when the vocabulary is unknown)."""
    vocab = vocab_size_of(model)
    if not vocab:
        return most
    return min(most, max(1, _CHUNK_LOGITS // (vocab * rows), -(-_MIN_CHUNK_POSITIONS // rows)))


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
    positions: str,
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
    # Sequential positions are the model's own (right padding) or the padding mask's (left padding).
    input_pos = None
    if positions != "sequential":
        input_pos = position_ids(positions, layout.valid_mask[active], layout.is_confidence[active])
    logits_at = PositionLogits(
        model, layout.tokens[active], padding_mask=layout.valid_mask[active] if left_pad else None, input_pos=input_pos
    )
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
    positions: str,
) -> None:
    """Bins of ``rows``' slots from their first non-final one on, as a decoder finds them: prefill
    the final prefix into a KV cache, then one forward per slot feeding the content token, its
    new confidence token and any plain tokens up to the next slot. Writes ``bins`` and ``signal``."""
    tokens = layout.tokens[rows].clone()
    valid = layout.valid_mask[rows]
    advances = advances_position(positions, valid, layout.is_confidence[rows])
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
    positions: str = "sequential",
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
            torchtune KV caches set up, call it inside ``modeling.caches_set_aside``.
        tokens: ``[b, n]`` plain ids; right-padded, or left-padded with ``left_pad=True``.
        codec: the confidence codec.
        slots: ``[b, n]`` from :func:`confidence_slots`.
        labels: optional plain labels, carried into the interleaved batch.
        valid_mask: ``[b, n]`` True on real tokens (default: ``tokens != pad_id`` when left-padded, else all).
        max_passes: None (default) iterates until every bin is final (exact); an int >= 1 caps the
            passes (the bins may then be approximate: see ``converged`` and ``unconverged_rows``).
        sequential_fallback: allow the stepping described above (only when ``max_passes`` is None).
        positions: the position rule of every forward, ``sequential`` or ``shared`` (see
            :func:`advances_position`); training, decoding and eval pass their interleaving's.
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
    _check_max_passes(max_passes)
    check_position_rule(positions)
    if known_bins is not None and known_bins.shape != tokens.shape:
        raise ValueError(f"known_bins must have the shape of tokens {tuple(tokens.shape)}, got {tuple(known_bins.shape)}")
    if valid_mask is None:
        valid_mask = (tokens != pad_id) if left_pad else torch.ones_like(tokens, dtype=torch.bool)
    b = tokens.shape[0]
    no_bins = torch.full_like(tokens, -1)

    def build(bins: torch.Tensor) -> Interleaved:
        conf = codec.token_ids_for_bins(bins.clamp(min=0))
        return interleave(tokens, slots, conf, labels=labels, pad_id=pad_id, valid_mask=valid_mask, left_pad=left_pad)

    signal = torch.full(tokens.shape, float("nan"), dtype=codec.compute_dtype, device=tokens.device)
    # Every pass is a round of forward_anywhere: under FSDP2 a rank with no pass of its own to run
    # joins each pass of the others with an idle forward (pass 0's round included).
    if not bool(slots.any()):
        while forward_anywhere(model, False, tokens):
            pass
        return FixedPointBins(no_bins, signal, 0, 0.0, True, build(no_bins))
    forward_anywhere(model, True, tokens)
    bins = no_bins.clone()

    order, in_row = _slots_in_order(slots)
    counts = in_row.sum(1)
    plain_context = codec.context == "plain"
    lazy = max_passes is None and not plain_context and not _signals_are_cheap(model)
    known = _leading_known(known_bins, slots, order, in_row)
    if bool(known.any()) and not plain_context:
        # Pass 0 starts after each row's known slots, on the batch interleaved with them (bin 0 after).
        if forwards_in_lockstep(model):
            raise ValueError("known_bins cannot be used with an FSDP2-sharded model (its passes must match across ranks)")
        rows, index = (in_row & (torch.arange(order.shape[1], device=order.device) < known.unsqueeze(1))).nonzero(as_tuple=True)
        taken = (rows, order[rows, index])
        bins[taken] = known_bins[taken]
        if known_signal is not None:
            signal[taken] = known_signal[taken].to(signal.dtype)
        guessed = known.clone()  # [b] leading slots of each row that hold a computed bin
        final = known.clone()  # [b] leading slots of each row whose bins are final
        first = (final < counts).nonzero().squeeze(1)
        computed = 0
        if first.numel():
            # A row's first slot without a bin is final once computed (only final bins precede it).
            final[first], computed, _ = _run_pass(
                model, build(bins), first, final[first], order, counts, bins, signal, codec, guessed, left_pad=left_pad,
                lazy=lazy, positions=positions,
            )
        passes, pass_rows = int(first.numel() > 0), [int(first.numel())]
    else:
        # Pass 0: the plain sequence. A row's first slot is final at once (no confidence token precedes it).
        plain = interleave(tokens, torch.zeros_like(slots), tokens, pad_id=pad_id, valid_mask=valid_mask, left_pad=left_pad)
        guessed = torch.zeros_like(counts)
        _, computed, _ = _run_pass(
            model, plain, torch.arange(b, device=tokens.device), torch.zeros_like(counts), order, counts, bins, signal,
            codec, guessed, left_pad=left_pad, lazy=lazy, positions=positions,
        )
        final = counts.clone() if plain_context else counts.clamp(max=1)
        passes, pass_rows = 1, [b]
    pass_slots = [computed]
    changed = math.nan
    stepped = 0

    def step_the_rest() -> int:
        """Step every row not final yet from its first non-final slot to its end; the slots stepped."""
        behind = (final < counts).nonzero().squeeze(1)
        _step_to_the_end(model, build(bins), behind, order, final, counts, bins, signal, codec, positions)
        n = int((counts - final)[behind].sum())
        final[behind] = counts[behind]
        return n

    may_step = max_passes is None and sequential_fallback and _can_step(model)
    rows_behind = int((final < counts).sum())
    if may_step and rows_behind and lazy and _stepping_is_cheaper(model, rows_behind, tokens.device):
        # After pass 0 (each row's first slot without a bin is final), step through the rest.
        stepped = step_the_rest()
    # Each pass settles >= 1 slot of every row it runs, so m passes always reach the fixed point.
    limit = order.shape[1] if max_passes is None else min(max_passes, order.shape[1])
    spent = 0.0  # token-forwards of the passes after pass 0, signals included
    while forward_anywhere(model, (mine := passes < limit and bool((final < counts).any())), tokens):
        if not mine:
            continue  # another rank's pass: this one ran an idle forward with it
        active = (final < counts).nonzero().squeeze(1)
        laid = build(bins)
        settled, computed, n_changed = _run_pass(
            model, laid, active, final[active], order, counts, bins, signal, codec, guessed,
            left_pad=left_pad, lazy=lazy, positions=positions,
        )
        final[active] = settled
        passes += 1
        pass_rows.append(int(active.numel()))
        pass_slots.append(computed)
        changed = n_changed / int(counts.sum())
        width = int(laid.tokens.shape[1])
        spent += active.numel() * width + computed * _signal_cost(model)
        if may_step and bool((final < counts).any()) and spent >= _stepping_cost(model, tokens.device, final, counts, width):
            stepped = step_the_rest()
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
    "ResponseRule",
    "UntilMarker",
    "check_mode",
    "check_position_rule",
    "advances_position",
    "position_ids",
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
