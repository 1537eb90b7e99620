"""Decoders for every interleaving mode, and the registry that maps ``interleaving.mode`` to one.

Beneath them, what every decode loop of the library shares: the decode session a loop steps a
model through (:mod:`~entropy_guided_generation.sessions`), left-padded prompt batches (``padding.py``) and the nucleus
(top-p) rule the decoders sample under and the scorer computes log q under (``nucleus.py``).

>>> from entropy_guided_generation.generation import get_decoder
>>> decoder = get_decoder("answer")   # generate_answer_interleaved
"""
from __future__ import annotations

from entropy_guided_generation.generation.bin_ablations import ConfidenceOverride, FixedBin, ShuffledBins
from entropy_guided_generation.generation.common import DecodeResult, decode, has_plain_twin
from entropy_guided_generation.generation.decoders import (
    DECODERS,
    decoder_extras,
    generate_answer_interleaved,
    generate_answer_interleaved_marker,
    generate_full_interleaved,
    generate_plain,
    get_decoder,
    mode_decoder,
    register_decoder,
)
from entropy_guided_generation.generation.nucleus import nucleus_mask
from entropy_guided_generation.generation.padding import left_pad, left_padded_mask
from entropy_guided_generation.generation.prompt_bins import PromptBinsCache
from entropy_guided_generation.generation.token_sampling import filter_top_k, filter_top_p, sample_next_token
from entropy_guided_generation.modes import MODES
from entropy_guided_generation.sessions import DecodeSession, HFSession, KVSession, PrefixSession, kv_session, open_session

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
    "decoder_extras",
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
    "mode_decoder",
    "nucleus_mask",
    "open_session",
    "register_decoder",
    "sample_next_token",
]
