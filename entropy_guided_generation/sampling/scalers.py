"""Scaling functions for budget forcing: when the model ends its thinking, should it be made to go on,
and with which continuation tokens?

A scaling function has the signature ``(iteration, seq, entropies, scale_token) -> (continue_scaling,
scale_token)``:

- ``iteration``: how many continuations were forced before this decision (0 at the first one);
- ``seq``: token ids of the round that just ended (the thinking generated since the thinking start
  or since the last continuation string; the end-of-thinking delimiter is not included);
- ``entropies``: entropy (nats) of the distribution that produced each id of ``seq``;
- ``scale_token``: the default continuation ids (``thinking_n_ignore_str`` tokenized, e.g. "Wait").

It returns whether to continue thinking and the continuation ids to append if so.

Functions are made by factories registered by name; ``get_scale_func(name, **options)`` calls the
factory with the options it accepts (for lm-eval, the matching ``gen_kwargs``)::

    @register("long_rounds")
    def long_rounds(min_len: int = 8):
        @should_continue_scaling
        def decide(iteration, seq, entropies):
            return len(seq) < min_len
        return decide
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Dict, Mapping, Sequence

ScaleFunc = Callable[[int, Sequence[int], Sequence[float], Sequence[int]], "tuple[bool, list[int]]"]
ScaleFuncFactory = Callable[..., ScaleFunc]

_FACTORIES: Dict[str, ScaleFuncFactory] = {}


def should_continue_scaling(decide: Callable[[int, Sequence[int], Sequence[float]], bool]) -> ScaleFunc:
    """Wrap ``decide(iteration, seq, entropies) -> bool`` as a scaling function that keeps the
    default continuation ids."""

    @functools.wraps(decide)
    def scale(iteration: int, seq: Sequence[int], entropies: Sequence[float], scale_token: Sequence[int]):
        return bool(decide(iteration, seq, entropies)), list(scale_token)

    return scale


def scale_token_only(choose: Callable[[int, Sequence[int], Sequence[float], Sequence[int]], Sequence[int]]) -> ScaleFunc:
    """Wrap ``choose(iteration, seq, entropies, scale_token) -> ids`` as a scaling function that always
    continues (``thinking_n_ignore`` still caps the number of continuations)."""

    @functools.wraps(choose)
    def scale(iteration: int, seq: Sequence[int], entropies: Sequence[float], scale_token: Sequence[int]):
        return True, list(choose(iteration, seq, entropies, scale_token))

    return scale


def register(name: str, factory: ScaleFuncFactory | None = None, *, replace: bool = False):
    """Register ``factory`` (keyword options -> scaling function) as ``name``; usable as a decorator.

    Raises:
        ValueError: when ``name`` is taken by another factory and ``replace`` is False.
    """

    def add(fn: ScaleFuncFactory) -> ScaleFuncFactory:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a scaling function needs a non-empty string name, got {name!r}")
        if name in _FACTORIES and _FACTORIES[name] is not fn and not replace:
            raise ValueError(f"a scaling function named {name!r} is already registered (pass replace=True)")
        _FACTORIES[name] = fn
        return fn

    return add(factory) if factory is not None else add


def scale_func_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_FACTORIES)


def scale_func_options(name: str) -> list[str]:
    """The keyword options the factory ``name`` accepts (what ``gen_kwargs`` may set)."""
    params = inspect.signature(_factory(name)).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _factory(name: str) -> ScaleFuncFactory:
    if name not in _FACTORIES:
        raise ValueError(f"unknown scale_func_name {name!r}; expected one of {', '.join(scale_func_names())}")
    return _FACTORIES[name]


def get_scale_func(name: str, **options: Any) -> ScaleFunc:
    """The scaling function ``name`` built with ``options``.

    Raises:
        ValueError: unknown name (listing the registered ones) or an option the factory does not take.
    """
    factory = _factory(name)
    accepted = scale_func_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"scaling function {name!r} takes options {accepted or 'none'}, got unknown {unknown}")
    return factory(**options)


def scale_func_from_kwargs(name: str, kwargs: Mapping[str, Any]) -> ScaleFunc:
    """``get_scale_func(name, ...)`` with those entries of ``kwargs`` (e.g. lm-eval ``gen_kwargs``)
    that the factory accepts as options; other entries are ignored."""
    accepted = set(scale_func_options(name))
    return get_scale_func(name, **{k: v for k, v in kwargs.items() if k in accepted})


def checked_decision(result: Any, name: str) -> tuple[bool, list[int]]:
    """A scaling function's return value validated as ``(bool, non-empty list of int ids)``."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"scaling function {name!r} must return (continue_scaling, scale_token), got {result!r}")
    go_on, ids = result
    ids = [ids] if isinstance(ids, int) else list(ids)
    if go_on and (not ids or not all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ValueError(f"scaling function {name!r} returned scale_token {ids!r}; expected a non-empty list of token ids")
    return bool(go_on), ids


# ---------------------------------------------------------------- built-ins


@register("default")
def default() -> ScaleFunc:
    """s1's budget forcing: always continue with the default continuation (until ``thinking_n_ignore``)."""

    @should_continue_scaling
    def always(iteration: int, seq: Sequence[int], entropies: Sequence[float]) -> bool:
        return True

    return always


def last_k_count(last_k: float, n: int) -> int:
    """How many of a round's ``n`` last tokens ``last_k`` selects: -1 all, an int k >= 1 the last k,
    a fraction in (0, 1) the last ceil(last_k * n) (at least one when n > 0)."""
    if last_k == -1:
        return n
    if 0 < last_k < 1:
        return min(n, max(1, math.ceil(last_k * n)))
    if last_k >= 1 and float(last_k).is_integer():
        return min(n, int(last_k))
    raise ValueError(f"last_k must be -1 (all), an int >= 1 or a fraction in (0, 1), got {last_k!r}")


@register("entropy_thresholding")
def entropy_thresholding(threshold: float = 0.5, decay_factor: float = 1.0, last_k: float = -1) -> ScaleFunc:
    """Continue while the model is unsure: the mean entropy (nats) of the last ``last_k`` tokens of
    the round that just ended is at or above ``threshold * decay_factor ** iteration``.

    A round with no tokens (the model ended thinking at once) has no evidence of uncertainty: stop.

    Args:
        threshold: entropy in nats at the first decision.
        decay_factor: multiplies the threshold after each continuation (> 0).
        last_k: -1 all tokens of the round; int k >= 1 the last k; fraction in (0, 1) that share of them.
    """
    threshold, decay_factor = float(threshold), float(decay_factor)
    last_k = float(last_k)
    last_k_count(last_k, 1)  # validates
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number of nats, got {threshold!r}")
    if not decay_factor > 0:
        raise ValueError(f"decay_factor must be > 0, got {decay_factor!r}")

    @should_continue_scaling
    def unsure(iteration: int, seq: Sequence[int], entropies: Sequence[float]) -> bool:
        k = last_k_count(last_k, len(entropies))
        if k == 0:
            return False
        window = list(entropies)[-k:]
        return sum(window) / k >= threshold * decay_factor**iteration

    return unsure


__all__ = [
    "ScaleFunc",
    "checked_decision",
    "default",
    "entropy_thresholding",
    "get_scale_func",
    "last_k_count",
    "register",
    "scale_func_from_kwargs",
    "scale_func_names",
    "scale_func_options",
    "scale_token_only",
    "should_continue_scaling",
]
