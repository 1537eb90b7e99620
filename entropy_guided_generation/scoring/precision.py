"""Precision profiles of the scoring forwards and the process-wide matmul knobs.

Three profiles, one per kind of forward:

- ``func_override``: forwards through ``torch.func.functional_call`` with a parameter override
  (theta + eta * v); ``cast_params`` casts the effective parameters to ``dtype`` first.
- ``tf_nograd``: teacher forcing without a graph (scoring, diagnostics).
- ``tf_withgrad``: teacher forcing that keeps the graph (surrogate losses).

``autocast`` runs the forward under ``torch.autocast(dtype)`` (a low-precision dtype). Logits are
always cast to float32 before the policy math, which runs in float32, or float64 with
``entropy_fp64``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Optional

import torch

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
AUTOCAST_DTYPES = ("bfloat16", "float16")
MATMUL_PRECISIONS = ("highest", "high", "medium")


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (one of float32, float64, bfloat16, float16)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_autocast(profile: str, autocast: bool, dtype: str) -> None:
    dtype_of(dtype)
    if autocast and dtype not in AUTOCAST_DTYPES:
        raise ValueError(
            f"precision.{profile}: autocast needs a low-precision dtype, got {dtype!r}; "
            f"expected one of {', '.join(AUTOCAST_DTYPES)} (or autocast: false)"
        )


@dataclass(frozen=True)
class OverrideProfile:
    """Forwards with a parameter override (``functional_call``).

    Attributes:
        autocast: run the forward under ``torch.autocast(dtype)``.
        dtype: the dtype the effective parameters are cast to (``cast_params``) and the autocast dtype.
        cast_params: cast theta + eta * v to ``dtype`` before the forward.
    """

    autocast: bool = False
    dtype: str = "float32"
    cast_params: bool = True

    def __post_init__(self) -> None:
        dtype_of(self.dtype)
        if self.autocast:
            _check_autocast("func_override", self.autocast, self.dtype)


@dataclass(frozen=True)
class ForwardProfile:
    """Teacher-forcing forwards on the live module.

    Attributes:
        autocast: run the forward under ``torch.autocast(dtype)``.
        dtype: the autocast dtype (used only with ``autocast``).
        cast_logits_fp32: cast logits to float32 before the policy math. Must stay True: the
            policy math runs in float32 or float64 only.
    """

    autocast: bool = False
    dtype: str = "float32"
    cast_logits_fp32: bool = True

    def __post_init__(self) -> None:
        _check_autocast("tf_*", self.autocast, self.dtype)
        if not self.cast_logits_fp32:
            raise ValueError(
                "cast_logits_fp32=False is not supported: log-probs and entropies are computed in float32 "
                "(or float64 with entropy_fp64), never in the forward's low-precision dtype"
            )


@dataclass(frozen=True)
class PrecisionConfig:
    """All precision settings of a :class:`SequenceProcessor`.

    Attributes:
        func_override, tf_nograd, tf_withgrad: the three forward profiles.
        allow_tf32: True allows TF32 matmuls (``torch.set_float32_matmul_precision('high')``),
            False forbids them (``'highest'``); None leaves the process setting alone.
        matmul_precision: ``highest | high | medium`` for ``torch.set_float32_matmul_precision``;
            None leaves the process setting alone.
        entropy_fp64: run the policy math (log-softmax, entropies, diagnostics) in float64; the
            forward keeps its own dtype.
    """

    func_override: OverrideProfile = field(default_factory=OverrideProfile)
    tf_nograd: ForwardProfile = field(default_factory=ForwardProfile)
    tf_withgrad: ForwardProfile = field(default_factory=ForwardProfile)
    allow_tf32: Optional[bool] = None
    matmul_precision: Optional[str] = None
    entropy_fp64: bool = False

    def __post_init__(self) -> None:
        if self.matmul_precision is not None and self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"unknown matmul_precision {self.matmul_precision!r}; expected one of {', '.join(MATMUL_PRECISIONS)}"
            )
        if self.allow_tf32 is not None and self.matmul_precision is not None:
            if self.allow_tf32 != (self.matmul_precision != "highest"):
                raise ValueError(
                    f"allow_tf32={self.allow_tf32} contradicts matmul_precision={self.matmul_precision!r} "
                    "('highest' forbids TF32, 'high'/'medium' allow it); set one of them"
                )

    @property
    def entropy_dtype(self) -> torch.dtype:
        """dtype of the policy math: float64 with ``entropy_fp64``, else float32."""
        return torch.float64 if self.entropy_fp64 else torch.float32

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping[str, Any]]) -> "PrecisionConfig":
        """Build from the ``precision`` section of a processor config (missing keys: defaults).

        Raises:
            ValueError: on an unknown key, naming it and the accepted ones.
        """
        cfg = dict(cfg or {})
        check_config_keys("precision", cfg, [f.name for f in fields(cls)])
        profiles = {
            "func_override": OverrideProfile,
            "tf_nograd": ForwardProfile,
            "tf_withgrad": ForwardProfile,
        }
        for name, profile_cls in profiles.items():
            section = dict(cfg.get(name) or {})
            check_config_keys(f"precision.{name}", section, [f.name for f in fields(profile_cls)])
            cfg[name] = profile_cls(**section)
        return cls(**cfg)


def check_config_keys(where: str, cfg: Mapping[str, Any], accepted: list[str]) -> None:
    """Raise ValueError naming any key of ``cfg`` not in ``accepted`` (``where`` names the section)."""
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; expected some of {', '.join(accepted)}")


def apply_global_precision(config: PrecisionConfig) -> None:
    """Apply ``allow_tf32`` / ``matmul_precision`` to the process (both None: nothing changes).

    Only ``torch.set_float32_matmul_precision`` is used: torch >= 2.9 refuses to read the precision
    back once legacy ``allow_tf32`` flags and the new API have both been written.
    """
    if config.matmul_precision is not None:
        torch.set_float32_matmul_precision(config.matmul_precision)
    elif config.allow_tf32 is not None:
        torch.set_float32_matmul_precision("high" if config.allow_tf32 else "highest")


@contextlib.contextmanager
def forward_context(autocast: bool, dtype: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast(device.type, dtype)`` when ``autocast``, else autocast explicitly off."""
    with torch.autocast(device_type=device.type, dtype=dtype_of(dtype) if autocast else None, enabled=autocast):
        yield


__all__ = [
    "DTYPES",
    "ForwardProfile",
    "OverrideProfile",
    "PrecisionConfig",
    "apply_global_precision",
    "check_config_keys",
    "dtype_of",
    "forward_context",
]
