"""Interleaving modes as values: which plain positions get a confidence token.

A *slot* is a plain position t whose token x_t is followed by its confidence token c_t in the
interleaved sequence. Which positions are slots is the only thing that differs between modes, and
one :class:`Mode` per name in the :data:`MODES` table says it; :class:`Interleaving` binds a mode to
a tokenizer's stop and marker ids and a position rule, and gives training its slot rule
(:meth:`Interleaving.slots`), decoding its online step policy (:meth:`Interleaving.step_policy`) and
eval its position budget. The registered modes:

- ``none``: no slots.
- ``answer``: every response token.
- ``full``: every real token after the row's first (prompt included).
- ``marker``: response tokens up to and including the first occurrence of the marker ids inside
  the response; if the marker never occurs in the response, every response token (the marker is
  matched on token ids, so a marker that BPE merges differently in context counts as absent).

Stop tokens (EOS) never get a slot, nor does a row's first token (nothing produced it).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from entropy_guided_generation.confidence import encode_text
from entropy_guided_generation.positions import SEQUENTIAL, PositionRule, position_rule


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
        positions: the :class:`~entropy_guided_generation.positions.PositionRule`.
    """

    mode: Mode
    stop_ids: Tuple[int, ...] = ()
    marker_ids: Optional[Tuple[int, ...]] = None
    positions: PositionRule = SEQUENTIAL

    @classmethod
    def of(
        cls,
        mode: Any,
        *,
        stop_ids: Sequence[int] = (),
        marker_ids: Optional[Sequence[int]] = None,
        positions: Any = SEQUENTIAL,
    ) -> "Interleaving":
        """Bind ``mode`` (a name or a :class:`Mode`) to its ids and position rule (a
        :class:`~entropy_guided_generation.positions.PositionRule` or its config name).

        Raises:
            ValueError: on an unknown mode or position rule, or a marker mode without marker ids
                (an empty marker included).
        """
        mode = mode_named(mode)
        rule = position_rule(positions)
        if mode.needs_marker:
            if marker_ids is None:
                raise ValueError(
                    f"mode {mode.name!r} needs marker ids (marker=..., the tokenized interleaving.marker), got none"
                )
            if len(marker_ids) == 0:
                raise ValueError("the marker must tokenize to at least one id; got an empty marker")
        marker = tuple(int(i) for i in marker_ids) if mode.needs_marker else None
        return cls(mode, tuple(int(i) for i in stop_ids), marker, rule)

    @classmethod
    def for_tokenizer(
        cls, mode: Any, tokenizer: Any, marker: Optional[str] = None, positions: Any = SEQUENTIAL
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
        """:meth:`PositionRule.advances <entropy_guided_generation.positions.PositionRule.advances>` under this interleaving's rule."""
        return self.positions.advances(valid_mask, is_confidence)

    def position_ids(self, valid_mask: torch.Tensor, is_confidence: torch.Tensor) -> torch.Tensor:
        """:meth:`PositionRule.position_ids <entropy_guided_generation.positions.PositionRule.position_ids>` under this interleaving's rule."""
        return self.positions.position_ids(valid_mask, is_confidence)

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
        return self.positions.positions_per_token(self.columns_per_content_token)

    def prompt_positions(self, tokens: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """``[b]`` position ids the prompt rows ``tokens`` ``[b, p]`` take once laid out for decoding:
        their real tokens, plus their confidence tokens in a prompt-interleaving mode under
        ``sequential`` positions."""
        real = valid_mask.long().sum(1)
        if not (self.interleaves_prompt and self.positions.confidence_advances):
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


__all__ = [
    "ANSWER",
    "FULL",
    "MARKER",
    "MODES",
    "NONE",
    "PLAIN",
    "EveryResponseToken",
    "Interleaving",
    "MarkerTracker",
    "Mode",
    "ResponseRule",
    "UntilMarker",
    "check_mode",
    "first_real_position",
    "marker_end_positions",
    "mode_named",
    "register_mode",
    "tokenizer_stop_ids",
]
