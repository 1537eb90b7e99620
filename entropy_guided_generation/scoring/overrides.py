"""Parameter overrides theta + eta * v for ``torch.func.functional_call``.

A mapping holds one entry per *distinct* parameter, under the name ``model.named_parameters()``
gives it. Tied weights are one parameter: torchtune's ``TiedLinear`` output reads the embedding
module's weight, and a Hugging Face ``lm_head.weight`` that is the embedding's ``Parameter`` is
the same object; ``functional_call`` (``tie_weights=True``) then applies the single override in
every place the weight is used. A direction ``v`` may name a tied weight by any of its names.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from entropy_guided_generation.scoring.precision import OverrideProfile, dtype_of

ParamsMapping = dict[str, torch.Tensor]
BuffersMapping = Mapping[str, torch.Tensor]


def unwrap_model(model: Any) -> Any:
    """The module whose parameter names overrides use: DDP's ``.module``; other wrappers (LoRA,
    PEFT) are kept, their parameters are the model's."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class ParamsOverrideBuilder:
    """Builds params-only mappings theta + eta * v for one model.

    The eta = 0 mapping (detached parameters, cast per the profile) is cached and rebuilt only when
    a parameter was replaced or modified in place since (tracked by tensor version counters).
    """

    def __init__(self, model: Any, profile: Optional[OverrideProfile] = None):
        self.model = unwrap_model(model)
        self.profile = profile or OverrideProfile()
        self._params = dict(self.model.named_parameters())
        by_identity = {id(p): name for name, p in self._params.items()}
        self._canonical = {
            alias: by_identity[id(p)] for alias, p in self.model.named_parameters(remove_duplicate=False)
        }
        self._zero: Optional[ParamsMapping] = None
        self._zero_key: Optional[tuple] = None

    @property
    def tied_names(self) -> dict[str, str]:
        """``{alias: canonical name}`` for every parameter name that is not its canonical name."""
        return {alias: name for alias, name in self._canonical.items() if alias != name}

    def _base(self, param: torch.Tensor) -> torch.Tensor:
        base = param.detach()
        return base.to(dtype_of(self.profile.dtype)) if self.profile.cast_params else base

    def _fingerprint(self) -> tuple:
        current = dict(self.model.named_parameters())
        return tuple((name, id(p), p._version, p.dtype, p.device) for name, p in current.items())

    def zero(self) -> ParamsMapping:
        """The eta = 0 mapping: every parameter detached (and cast when ``cast_params``), cached."""
        key = self._fingerprint()
        if self._zero is None or key != self._zero_key:
            self._params = dict(self.model.named_parameters())
            self._zero = {name: self._base(p) for name, p in self._params.items()}
            self._zero_key = key
        return self._zero

    def resolve_direction(self, v_named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``v`` keyed by canonical parameter names (a tied weight may be given under any alias).

        Raises:
            KeyError: for a name that is no parameter of the model.
            ValueError: for a shape that differs from the parameter's, or for two aliases of one
                tied weight given different tensors.
        """
        direction: dict[str, torch.Tensor] = {}
        given_as: dict[str, str] = {}
        for name, tensor in v_named.items():
            if name not in self._canonical:
                raise KeyError(f"v names {name!r}, which is no parameter of the model (e.g. {next(iter(self._params))!r})")
            canonical = self._canonical[name]
            expected = self._params[canonical].shape
            if tuple(tensor.shape) != tuple(expected):
                raise ValueError(f"v[{name!r}] has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
            if canonical in direction and not torch.equal(direction[canonical], tensor):
                raise ValueError(
                    f"v gives different tensors for {given_as[canonical]!r} and {name!r}, which are one tied weight"
                )
            direction[canonical], given_as[canonical] = tensor, name
        return direction

    def build(self, v_named: Mapping[str, torch.Tensor], eta: float) -> ParamsMapping:
        """The mapping theta + eta * v (parameters absent from ``v_named`` keep theta).

        Args:
            v_named: direction tensors by parameter name (canonical or tied alias).
            eta: step size; 0 returns the cached zero mapping.

        Returns:
            ``{canonical name: tensor}`` with no graph to the live parameters (gradients flow only
            into ``v`` when it requires them).
        """
        direction = self.resolve_direction(v_named)
        zero = self.zero()
        if eta == 0:
            return zero
        out = dict(zero)
        for name, v in direction.items():
            base = zero[name]
            out[name] = base + eta * v.to(device=base.device, dtype=base.dtype)
        return out


def check_buffers_override(model: Any, buffers: BuffersMapping) -> None:
    """Check that every name of ``buffers`` is a buffer of ``model`` (as ``named_buffers()`` names it)
    with the buffer's shape.

    Raises:
        KeyError: for a name that is no buffer of the model.
        ValueError: for a shape that differs from the buffer's.
    """
    live = dict(unwrap_model(model).named_buffers())
    for name, tensor in buffers.items():
        if name not in live:
            known = ", ".join(sorted(live)[:5]) or "none"
            raise KeyError(f"buffers_override names {name!r}, which is no buffer of the model (its buffers: {known}, ...)")
        if tuple(tensor.shape) != tuple(live[name].shape):
            raise ValueError(f"buffers_override[{name!r}] has shape {tuple(tensor.shape)}, expected {tuple(live[name].shape)}")


__all__ = ["BuffersMapping", "ParamsMapping", "ParamsOverrideBuilder", "check_buffers_override", "unwrap_model"]
