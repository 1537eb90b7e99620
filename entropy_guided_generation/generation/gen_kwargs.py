"""lm-eval's ``generate_until`` requests as batches for our decoders, and their results as text.

- :func:`decode_settings` reads lm-eval's ``gen_kwargs`` (``until``, ``max_gen_toks``, ``do_sample``,
  ``temperature``, ``top_k``, ``top_p``) with lm-eval's own normalization;
- :func:`fill_static_batch` / :func:`first_rows` pad a short last batch to the static KV cache's
  batch size and drop the filler rows again;
- :func:`cut_at_stop` and :func:`tokens_covering` turn content tokens into the returned text and
  say which tokens that text covers (for the confidence trace).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from entropy_guided_generation.generation.common import DecodeResult

GEN_KWARGS = (
    "until",
    "max_gen_toks",
    "max_new_tokens",
    "max_tokens",
    "max_completion_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
)


def check_sampling_values(gen_kwargs: Mapping[str, Any]) -> None:
    """Refuse sampling values no decoder can honour, whatever ``do_sample`` says (a negative
    temperature is a mistake even where greedy decoding would ignore it).

    Raises:
        ValueError: naming the key, its value and what is expected: ``temperature`` a number >= 0,
            ``top_p`` in (0, 1], ``top_k`` an int >= 0, a ``max_gen_toks`` alias an int >= 1.
    """
    def number(key: str) -> Optional[float]:
        value = gen_kwargs.get(key)
        if value is None:
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or number != number:
            raise ValueError(f"gen_kwargs {key} must be a number, got {value!r}")
        return number

    temperature, top_p, top_k = number("temperature"), number("top_p"), number("top_k")
    if temperature is not None and not temperature >= 0:
        raise ValueError(f"gen_kwargs temperature must be >= 0 (0: greedy), got {gen_kwargs['temperature']!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"gen_kwargs top_p must lie in (0, 1], got {gen_kwargs['top_p']!r}")
    if top_k is not None and not (top_k >= 0 and top_k == int(top_k)):
        raise ValueError(f"gen_kwargs top_k must be an int >= 0 (0: off), got {gen_kwargs['top_k']!r}")
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        value = number(key)
        if value is not None and not (value >= 1 and value == int(value)):
            raise ValueError(f"gen_kwargs {key} must be an int >= 1, got {gen_kwargs[key]!r}")


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode one group of requests.

    Attributes:
        until: stop strings; the returned text ends before the first one (EOS text included).
        max_gen_toks: content tokens to generate at most (confidence tokens not counted).
        temperature: sampling temperature of content tokens; 0 means greedy.
        top_k, top_p: optional filters (None: off).
    """

    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]


def decode_settings(
    gen_kwargs: Mapping[str, Any],
    *,
    default_max_gen_toks: int,
    eos_text: Optional[str],
) -> DecodeSettings:
    """Settings from lm-eval ``gen_kwargs``.

    ``do_sample: false`` means greedy whatever the temperature; ``do_sample: true`` without a
    temperature samples at 1.0 (as Hugging Face generate does).

    Raises:
        ValueError: on a gen_kwarg we do not serve (naming it and the accepted ones), or bad values
            (:func:`check_sampling_values`).
    """
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(f"unsupported gen_kwargs {unknown} for torchtune models; expected some of {', '.join(GEN_KWARGS)}")
    check_sampling_values(gen_kwargs)
    kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), default_max_gen_toks))
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
    max_gen_toks = int(kwargs.pop("max_gen_toks"))
    if max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
    sampling = bool(kwargs.get("do_sample"))
    temperature = float(gen_kwargs.get("temperature", 1.0)) if sampling else 0.0
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    top_k = kwargs.get("top_k")
    top_p = kwargs.get("top_p")
    return DecodeSettings(
        until=tuple(until),
        max_gen_toks=max_gen_toks,
        temperature=temperature,
        top_k=int(top_k) if top_k else None,
        top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None,
    )




def fill_static_batch(prompt: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[batch_size, p]``: ``prompt`` ``[b, p]`` followed by copies of its first row.

    Static KV caches are set up for a fixed batch size; the copies decode like row 0 (so they
    stop with it) and are dropped by :func:`first_rows`.
    """
    b = prompt.shape[0]
    if b > batch_size:
        raise ValueError(f"a batch of {b} prompts does not fit KV caches set up for batch size {batch_size}")
    return torch.cat([prompt, prompt[:1].expand(batch_size - b, -1)], dim=0)


def first_rows(result: DecodeResult, rows: int) -> DecodeResult:
    """``result`` restricted to its first ``rows`` rows (every batch-major tensor field)."""
    batch = result.tokens.shape[0]
    sliced = {
        f.name: getattr(result, f.name)[:rows]
        for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), torch.Tensor) and getattr(result, f.name).shape[:1] == (batch,)
    }
    return dataclasses.replace(result, **sliced)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (lm-eval's own post-processing)."""
    from lm_eval.models.utils import postprocess_generated_text

    return postprocess_generated_text(generation=text, stop=list(until), think_end_token=None)


def tokens_covering(num_chars: int, tokens: Sequence[int], decode: Callable[[list[int]], str]) -> int:
    """The fewest leading ``tokens`` whose decoded text has at least ``num_chars`` characters
    (at least 1: an empty answer is still the model's choice of its first token).

    Decoded prefix lengths grow with the prefix, so a binary search needs O(log T) decodes.
    """
    if not tokens:
        raise ValueError("a generated continuation has no content token")
    low, high = 1, len(tokens)
    while low < high:
        mid = (low + high) // 2
        if len(decode(list(tokens[:mid]))) >= num_chars:
            high = mid
        else:
            low = mid + 1
    return low


__all__ = [
    "GEN_KWARGS",
    "DecodeSettings",
    "check_sampling_values",
    "cut_at_stop",
    "decode_settings",
    "fill_static_batch",
    "first_rows",
    "tokens_covering",
]
