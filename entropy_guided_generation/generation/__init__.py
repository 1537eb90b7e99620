"""Decoders for every interleaving mode, and the registry that maps ``interleaving.mode`` to one.

Beneath them, what every decode loop of the library shares: the decode session a loop steps a
model through (:mod:`~entropy_guided_generation.sessions`), left-padded prompt batches (``padding.py``) and the nucleus
(top-p) rule the decoders sample under and the scorer computes log q under (``nucleus.py``).

>>> from entropy_guided_generation.generation import get_decoder
>>> decoder = get_decoder("answer")   # generate_answer_interleaved
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

from entropy_guided_generation.generation.answer_intl import generate_answer_interleaved
from entropy_guided_generation.generation.common import DecodeResult, decode, has_plain_twin
from entropy_guided_generation.generation.full_intl import generate_full_interleaved
from entropy_guided_generation.generation.marker_intl import generate_answer_interleaved_marker
from entropy_guided_generation.generation.nucleus import nucleus_mask
from entropy_guided_generation.generation.overrides import ConfidenceOverride, FixedBin, ShuffledBins
from entropy_guided_generation.generation.padding import left_pad, left_padded_mask
from entropy_guided_generation.generation.plain import generate_plain
from entropy_guided_generation.generation.prompt_bins import PromptBinsCache
from entropy_guided_generation.generation.sampling import filter_top_k, filter_top_p, sample_next_token
from entropy_guided_generation.sessions import DecodeSession, HFSession, KVSession, PrefixSession, kv_session, open_session
from entropy_guided_generation.modes import MODES

DECODERS: Dict[str, Callable[..., DecodeResult]] = {
    "none": generate_plain,
    "full": generate_full_interleaved,
    "answer": generate_answer_interleaved,
    "marker": generate_answer_interleaved_marker,
}
"""Decoders by name: the modes' public functions (the names users know) and registered samplers.
A mode registered in ``layout.MODES`` without an entry here decodes with :func:`decode` directly."""


def register_decoder(name: str, decoder: Callable[..., DecodeResult]) -> None:
    """Make ``decoder`` selectable as ``get_decoder(name)`` (e.g. a sampler for mode none)."""
    if name in DECODERS and DECODERS[name] is not decoder:
        raise ValueError(f"a decoder named {name!r} is already registered")
    DECODERS[name] = decoder


def get_decoder(mode: str) -> Callable[..., DecodeResult]:
    """The decoder for ``interleaving.mode`` (or another registered name): a registered decoder, else
    :func:`decode` bound to the registered mode of that name."""
    if mode in DECODERS:
        return DECODERS[mode]
    if mode in MODES:
        return functools.partial(decode, interleaving=mode)
    names = list(DECODERS) + [name for name in MODES if name not in DECODERS]
    raise ValueError(f"unknown interleaving.mode {mode!r}; expected one of {', '.join(names)}")


__all__ = [
    "ConfidenceOverride",
    "DECODERS",
    "FixedBin",
    "MODES",
    "DecodeResult",
    "DecodeSession",
    "HFSession",
    "KVSession",
    "PrefixSession",
    "PromptBinsCache",
    "ShuffledBins",
    "decode",
    "filter_top_k",
    "filter_top_p",
    "generate_answer_interleaved",
    "generate_answer_interleaved_marker",
    "generate_full_interleaved",
    "generate_plain",
    "get_decoder",
    "has_plain_twin",
    "kv_session",
    "left_pad",
    "left_padded_mask",
    "nucleus_mask",
    "open_session",
    "register_decoder",
    "sample_next_token",
]
