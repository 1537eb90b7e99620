"""The ``interleaving`` section of a config, read and checked in one place for training and eval.

:class:`InterleavingConfig` holds the keys both read (``mode``, ``marker``, ``positions``,
``max_passes``); the finetune recipe extends it with its training-only keys
(:class:`~entropy_guided_generation.training.options.InterleavingOptions`). Bound to a tokenizer
(:meth:`InterleavingConfig.for_tokenizer`) it is the :class:`~entropy_guided_generation.modes.Interleaving`
that training, decoding and eval share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from entropy_guided_generation.fixed_point import check_max_passes
from entropy_guided_generation.modes import Interleaving, Mode, mode_named
from entropy_guided_generation.positions import SEQUENTIAL, check_position_rule

SHARED_KEYS = ("mode", "marker", "positions", "max_passes")
"""The ``interleaving`` keys every recipe reads."""


def check_section_keys(section: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Raise on an ``interleaving`` key outside ``keys`` (a typo would otherwise be ignored).

    Raises:
        ValueError: ``unknown interleaving keys ['passes']; expected some of mode, marker, ...``.
    """
    keys = tuple(keys)
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f"unknown interleaving keys {unknown}; expected some of {', '.join(keys)}")


def check_marker(mode: Mode, marker: Any) -> Optional[str]:
    """The marker ``mode`` reads (None for a mode that reads none), after checking it.

    Raises:
        ValueError: a marker mode without a marker, or a marker that is not a string.
    """
    if mode.needs_marker and not marker:
        raise ValueError(f"interleaving.mode {mode.name!r} needs interleaving.marker (e.g. '####'), got none")
    if marker is not None and not isinstance(marker, str):
        # e.g. `interleaving.marker=So the answer is:` on the command line parses as a mapping
        raise ValueError(f"interleaving.marker must be a string, got {marker!r}; quote it on the command line")
    return marker if mode.needs_marker else None


@dataclass(frozen=True)
class InterleavingConfig:
    """The shared keys of the ``interleaving`` section, checked.

    Attributes:
        mode: the interleaving mode (a registered :class:`~entropy_guided_generation.modes.Mode`).
        marker: the string ending the interleaved reasoning (modes that read a marker only).
        positions: ``sequential`` (every token advances the position id, as the public CaC code) or
            ``shared`` (a confidence token takes its content token's position id).
        max_passes: None (default) iterates the fixed point until no bin changes, so the bins are
            exactly decoding's; an int >= 1 caps the passes (each a no-grad forward).
    """

    mode: Mode
    marker: Optional[str] = None
    positions: str = SEQUENTIAL.name
    max_passes: Optional[int] = None

    @classmethod
    def checked(cls, mode: Any, marker: Any = None, positions: Any = None, max_passes: Any = None) -> "InterleavingConfig":
        """The shared keys' values after checking each (``positions`` None: sequential).

        Raises:
            ValueError: on an unknown mode or position rule, a missing or non-string marker, or a bad
                ``max_passes``, naming the key and what it accepts.
        """
        mode = mode_named(mode)
        return InterleavingConfig(
            mode=mode,
            marker=check_marker(mode, marker),
            positions=check_position_rule(positions if positions is not None else SEQUENTIAL),
            max_passes=check_max_passes(max_passes, "interleaving.max_passes", none="null"),
        )

    @property
    def name(self) -> str:
        return self.mode.name

    @property
    def interleaved(self) -> bool:
        return not self.mode.is_plain

    def for_tokenizer(self, tokenizer: Any) -> Interleaving:
        """This config bound to ``tokenizer``'s stop and marker ids (see :meth:`Interleaving.for_tokenizer`)."""
        return Interleaving.for_tokenizer(self.mode, tokenizer, self.marker, self.positions)


__all__ = ["SHARED_KEYS", "InterleavingConfig", "check_marker", "check_section_keys"]
