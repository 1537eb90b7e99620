"""Generation settings of a :class:`SequenceProcessor`, and reading its ``{generation, precision}`` config."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Union

import torch

from entropy_guided_generation.scoring.policy import SamplingPolicy
from entropy_guided_generation.scoring.precision import PrecisionConfig, check_config_keys


@dataclass
class GenerationConfig:
    """How sequences are generated and scored.

    Attributes:
        temperature: sampling temperature tau > 0 of the policy.
        top_p: nucleus mass in (0, 1] of the policy (1.0: no truncation).
        max_new_tokens: generated tokens per response at most.
        do_sample: sample from the policy; False decodes greedily (q is then a point mass on the
            argmax and its entropies are 0).
        num_return_sequences: default G, responses per prompt.
        gen_batch_size: rows (prompt x response) generated together.
        tf_batch_size: rows scored together by teacher forcing.
        rb_requires_grad: keep the graph of the RB entropies in the with-grad path.
        stop_strings: a response ends after the token that completes one of these strings.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 200
    do_sample: bool = True
    num_return_sequences: int = 8
    gen_batch_size: int = 32
    tf_batch_size: int = 8
    rb_requires_grad: bool = False
    stop_strings: tuple[str, ...] = ("</answer>",)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_return_sequences", "gen_batch_size", "tf_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"generation.{name} must be a positive int, got {value!r}")
        if isinstance(self.stop_strings, str):
            raise ValueError(f"generation.stop_strings must be a list of strings, got the string {self.stop_strings!r}")
        self.stop_strings = tuple(self.stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"generation.stop_strings must hold non-empty strings, got {list(self.stop_strings)}")
        self.policy(torch.float32)  # validates temperature and top_p

    def policy(self, dtype: torch.dtype) -> SamplingPolicy:
        """The sampling policy these settings describe, computing in ``dtype``."""
        return SamplingPolicy(temperature=self.temperature, top_p=self.top_p, greedy=not self.do_sample, dtype=dtype)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "GenerationConfig":
        """Build from the ``generation`` section of a processor config.

        Raises:
            ValueError: on an unknown key, naming it and the accepted ones.
        """
        check_config_keys("generation", cfg, [f.name for f in fields(cls)])
        return cls(**dict(cfg))


ProcessorConfig = Union[GenerationConfig, Mapping[str, Any], None]


def parse_processor_config(config: ProcessorConfig) -> tuple[GenerationConfig, PrecisionConfig]:
    """``(generation, precision)`` from a :class:`GenerationConfig`, a dict
    ``{generation: {...}, precision: {...}}`` (either section optional), or None (defaults).

    Raises:
        ValueError: on an unknown section or key.
        TypeError: on a config of another type.
    """
    if config is None:
        return GenerationConfig(), PrecisionConfig()
    if isinstance(config, GenerationConfig):
        return config, PrecisionConfig()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a GenerationConfig or a mapping, got {type(config).__name__}")
    check_config_keys("the processor config", config, ["generation", "precision"])
    generation = config.get("generation") or {}
    if not isinstance(generation, GenerationConfig):
        generation = GenerationConfig.from_dict(generation)
    precision = config.get("precision")
    if not isinstance(precision, PrecisionConfig):
        precision = PrecisionConfig.from_dict(precision)
    return generation, precision


__all__ = ["GenerationConfig", "ProcessorConfig", "parse_processor_config"]
