"""The Entropix sampler's settings: thresholds that pick a regime and each regime's coefficients.

Defaults are entropix's classic sampler (xjdr-alt/entropix ``SamplerConfig``); its hard-coded
constants (the temperature caps, the explore regime's top-k floor and agreement factor, the clamps
of the adaptive regime) are fields here too. Entropies are in bits, varentropies in bits^2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union


@dataclass(frozen=True)
class EntropixConfig:
    """Settings of the Entropix-style sampler.

    Regime of a step (entropy ``H`` in bits, varentropy ``V`` in bits^2 of the next-token
    distribution), checked in this order:

    1. ``H < low_ent_thresh and V < low_vent_thresh``: argmax.
    2. ``H > high_ent_thresh and V < low_vent_thresh``: emit the clarifying token, unless the
       previous token is that token (then sample at a raised temperature: regime ``careful``).
    3. ``H < high_ent_thresh and V > high_vent_thresh``: explore (temperature from interaction
       strength, top-k from agreement).
    4. ``H > med_ent_thresh and V > high_vent_thresh``: resample (temperature up, top-p down).
    5. otherwise: adaptive multi-candidate sampling.

    Attributes:
        temp, top_p, top_k, min_p: base sampling parameters every regime adjusts.
        low_ent_thresh, med_ent_thresh, high_ent_thresh: entropy thresholds (bits), ascending.
        low_vent_thresh, high_vent_thresh: varentropy thresholds (bits^2), ascending.
        clarifying_token: the string emitted by regime 2 (resolved through the tokenizer to one
            id); None: regime 2 always samples as ``careful``.
        helv_*: regime 2's temperature ``min(helv_max_temp, temp * (offset + coef * attn_entropy))``.
        lehv_*: regime 3's temperature ``min(lehv_max_temp, temp * (offset + coef * interaction))``
            and top-k ``max(lehv_min_top_k, int(top_k * (1 + lehv_agreement_coef * (1 - agreement))))``.
        hehv_*: regime 4's temperature ``max(hehv_min_temp, temp * (offset + coef * attn_varentropy))``
            and top-p ``max(hehv_min_top_p, top_p - hehv_attn_ent_coef * attn_entropy)``.
        n_adaptive_samples: candidates drawn (in one batched draw) by the adaptive regime.
        ada_*: the adaptive regime's temperature, top-p, top-k and min-p coefficients and clamps,
            and the weights of its candidate score (log-prob + weighted confidence).
    """

    temp: float = 0.666
    top_p: float = 0.90
    top_k: int = 27
    min_p: float = 0.03

    low_ent_thresh: float = 0.1
    low_vent_thresh: float = 0.1
    med_ent_thresh: float = 3.0
    high_ent_thresh: float = 5.0
    high_vent_thresh: float = 5.0

    clarifying_token: Optional[str] = None

    helv_attn_ent_offset: float = 1.3
    helv_attn_ent_coef: float = 0.2
    helv_max_temp: float = 1.5

    lehv_interaction_strength_offset: float = 1.2
    lehv_interaction_strength_coef: float = 0.3
    lehv_max_temp: float = 1.5
    lehv_agreement_coef: float = 0.5
    lehv_min_top_k: int = 5

    hehv_attn_ent_coef: float = 0.2
    hehv_attn_vent_offset: float = 2.0
    hehv_attn_vent_coef: float = 0.5
    hehv_min_temp: float = 2.0
    hehv_min_top_p: float = 0.5

    n_adaptive_samples: int = 5
    ada_temp_logits: float = 0.3
    ada_temp_attn: float = 0.2
    ada_temp_agree: float = 0.2
    ada_top_p: float = 0.1
    ada_top_p_min: float = 0.1
    ada_top_p_max: float = 1.0
    ada_top_k_int: float = 0.3
    ada_top_k_agree: float = 0.2
    ada_top_k_min: int = 1
    ada_top_k_max: int = 100
    ada_min_p: float = 0.5
    ada_min_p_min: float = 0.01
    ada_min_p_max: float = 0.5
    ada_score_logits_ent: float = 0.1
    ada_score_attn_ent: float = 0.2
    ada_score_logits_vent: float = 0.3
    ada_score_attn_vent: float = 0.4
    ada_score_agree: float = 0.5
    ada_score_int: float = 0.6

    def __post_init__(self) -> None:
        if not self.low_ent_thresh < self.med_ent_thresh < self.high_ent_thresh:
            raise ValueError(
                "entropy thresholds must ascend, low_ent_thresh < med_ent_thresh < high_ent_thresh; got "
                f"{self.low_ent_thresh} / {self.med_ent_thresh} / {self.high_ent_thresh}"
            )
        if not self.low_vent_thresh < self.high_vent_thresh:
            raise ValueError(
                "varentropy thresholds must ascend, low_vent_thresh < high_vent_thresh; got "
                f"{self.low_vent_thresh} / {self.high_vent_thresh}"
            )
        if not self.temp > 0:
            raise ValueError(f"temp must be > 0, got {self.temp}")
        for name in ("top_p", "hehv_min_top_p", "ada_top_p_min", "ada_top_p_max"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        for name in ("min_p", "ada_min_p_min", "ada_min_p_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("top_k", "lehv_min_top_k", "ada_top_k_min", "ada_top_k_max", "n_adaptive_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.ada_top_k_min > self.ada_top_k_max or self.ada_top_p_min > self.ada_top_p_max or self.ada_min_p_min > self.ada_min_p_max:
            raise ValueError(
                "adaptive clamps must satisfy min <= max; got top_k "
                f"[{self.ada_top_k_min}, {self.ada_top_k_max}], top_p [{self.ada_top_p_min}, {self.ada_top_p_max}], "
                f"min_p [{self.ada_min_p_min}, {self.ada_min_p_max}]"
            )
        if self.clarifying_token is not None and (not isinstance(self.clarifying_token, str) or not self.clarifying_token):
            raise ValueError(f"clarifying_token must be a non-empty string or None, got {self.clarifying_token!r}")

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> "EntropixConfig":
        """A config from a mapping (e.g. a YAML section); unknown keys are an error naming them."""
        values = _plain(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown entropix sampler settings {unknown}; expected some of {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "EntropixConfig":
        """A config from a YAML file holding a mapping of field names to values."""
        from omegaconf import OmegaConf

        return cls.from_dict(OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True))

    @classmethod
    def coerce(cls, config: Union["EntropixConfig", Mapping[str, Any], None]) -> "EntropixConfig":
        """``config`` as an :class:`EntropixConfig` (None: the defaults)."""
        if isinstance(config, cls):
            return config
        if config is None or isinstance(config, Mapping) or hasattr(config, "items"):
            return cls.from_dict(config)
        raise TypeError(f"sampler_config must be an EntropixConfig, a mapping or None, got {type(config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _plain(values: Any) -> dict[str, Any]:
    """A plain dict from a mapping or an omegaconf DictConfig."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(values, DictConfig):
            return dict(OmegaConf.to_container(values, resolve=True))
    except ImportError:  # omegaconf ships with torchtune; plain mappings work without it
        pass
    return dict(values)


__all__ = ["EntropixConfig"]
