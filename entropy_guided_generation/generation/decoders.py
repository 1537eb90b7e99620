"""The decoder registry: ``interleaving.mode`` (or a sampler's name) -> a decoder.

A decoder takes ``(model, prompt, **keywords)`` with :func:`~entropy_guided_generation.generation.common.decode`'s
keywords and returns a :class:`~entropy_guided_generation.generation.common.DecodeResult`. Each
registered mode's public decoder is :func:`decode` with its mode bound (:func:`mode_decoder`), so the
four names users know (``generate_plain``, ``generate_full_interleaved``, ``generate_answer_interleaved``,
``generate_answer_interleaved_marker``) share one signature and one docstring. A decoder declares
at registration the extra keywords it takes beyond the common ones (``tokenizer``, ``prompt_bins``,
``sampler_config``), so a caller such as lm-eval's adapter passes exactly those
(:func:`decoder_extras`).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, FrozenSet, Iterable

from entropy_guided_generation.generation.common import DecodeResult, decode
from entropy_guided_generation.modes import MODES

Decoder = Callable[..., DecodeResult]

MODE_EXTRAS: FrozenSet[str] = frozenset({"prompt_bins"})
"""Extra keywords every mode decoder takes (it is :func:`decode`): a prompt-bins cache for modes that
interleave the prompt."""


def mode_decoder(mode: str) -> Decoder:
    """:func:`decode` with ``interleaving`` bound to the registered mode ``mode`` (see it for the
    keyword arguments)."""
    return functools.partial(decode, interleaving=mode)


generate_plain = mode_decoder("none")
"""Mode ``none``: plain generation, token for token what ``torchtune.generation.generate`` gives."""
generate_full_interleaved = mode_decoder("full")
"""Mode ``full``: the prompt interleaved by the training layout's own functions (``Interleaving.slots``
+ ``compute_bins``), so the same text gives the same tokens as in training, then every generated token."""
generate_answer_interleaved = mode_decoder("answer")
"""Mode ``answer``: ``P r_1 c_1 r_2 c_2 ...``; c_t is the bin of the distribution that produced r_t."""
generate_answer_interleaved_marker = mode_decoder("marker")
"""Mode ``marker``: reasoning interleaved up to and including the marker ids (``marker=``), then a plain answer."""

DECODERS: Dict[str, Decoder] = {
    "none": generate_plain,
    "full": generate_full_interleaved,
    "answer": generate_answer_interleaved,
    "marker": generate_answer_interleaved_marker,
}
"""Decoders by name: the modes' public decoders and registered samplers. A mode registered in
``modes.MODES`` without an entry here decodes with :func:`mode_decoder`."""

_EXTRAS: Dict[str, FrozenSet[str]] = {name: MODE_EXTRAS for name in DECODERS}


def register_decoder(name: str, decoder: Decoder, *, extras: Iterable[str] = ()) -> None:
    """Make ``decoder`` selectable as ``get_decoder(name)`` (e.g. a sampler for mode none).

    Args:
        extras: the keywords beyond :func:`decode`'s common ones (``max_generated_tokens``, ``pad_id``,
            ``temperature``, ``top_k``, ``top_p``, ``stop_tokens``, ``rng``, ``codec``) that
            ``decoder`` takes, e.g. ``("sampler_config", "tokenizer")``.

    Raises:
        ValueError: when another decoder already has the name.
    """
    if name in DECODERS and DECODERS[name] is not decoder:
        raise ValueError(f"a decoder named {name!r} is already registered")
    DECODERS[name] = decoder
    _EXTRAS[name] = frozenset(extras)


def get_decoder(mode: str) -> Decoder:
    """The decoder for ``interleaving.mode`` (or another registered name): a registered decoder, else
    :func:`decode` bound to the registered mode of that name.

    Raises:
        ValueError: on a name neither registered as a decoder nor as a mode, listing both.
    """
    if mode in DECODERS:
        return DECODERS[mode]
    if mode in MODES:
        return mode_decoder(mode)
    names = list(DECODERS) + [name for name in MODES if name not in DECODERS]
    raise ValueError(f"unknown interleaving.mode {mode!r}; expected one of {', '.join(names)}")


def decoder_extras(name: str) -> FrozenSet[str]:
    """The extra keywords the decoder ``name`` declared at registration (a mode's: :data:`MODE_EXTRAS`)."""
    if name in _EXTRAS:
        return _EXTRAS[name]
    return MODE_EXTRAS if name in MODES else frozenset()


__all__ = [
    "DECODERS",
    "MODE_EXTRAS",
    "Decoder",
    "decoder_extras",
    "generate_answer_interleaved",
    "generate_answer_interleaved_marker",
    "generate_full_interleaved",
    "generate_plain",
    "get_decoder",
    "mode_decoder",
    "register_decoder",
]
