"""Samplers that read the model's uncertainty while it generates.

- Entropix-style adaptive sampling (``entropix*`` modules): entropy, varentropy and last-layer
  attention metrics pick a sampling regime per step; a torchtune decoder (``generate_entropix``,
  registered as decoder ``"entropix"``) and a transformers ``LogitsProcessor``
  (``HookBasedEntropySampler``).
- Budget forcing (``budget_forcing``, ``budget_forcing_hf``, ``scalers``): keep a reasoning model thinking
  ("Wait") or stop it under a thinking budget and a registry of scaling functions, on one KV cache,
  for torchtune decoders and (``--model hf`` / ``hf-guided`` under our lm-eval entry point) Hugging Face models.
"""
# entropix-style adaptive sampling
from entropy_guided_generation.sampling.entropix import REGIMES, entropix_step, generate_entropix
from entropy_guided_generation.sampling.entropix_config import EntropixConfig
from entropy_guided_generation.sampling.entropix_hf import HookBasedEntropySampler
from entropy_guided_generation.sampling.entropix_metrics import EntropixMetrics, attention_metrics, entropix_metrics, logit_metrics

# budget forcing (lm-eval's hf-guided model over it is eval.hf_guided)
from entropy_guided_generation.sampling.budget_forcing import (
    BudgetForcedOutput,
    BudgetForcingConfig,
    ThinkingRound,
    budget_force_torchtune,
    budget_forcing_requested,
)
from entropy_guided_generation.sampling.scalers import get_scale_func, register, scale_token_only, should_continue_scaling

__all__ = [
    # entropix
    "REGIMES",
    "EntropixConfig",
    "EntropixMetrics",
    "HookBasedEntropySampler",
    "attention_metrics",
    "entropix_metrics",
    "entropix_step",
    "generate_entropix",
    "logit_metrics",
    # budget forcing
    "BudgetForcedOutput",
    "BudgetForcingConfig",
    "ThinkingRound",
    "budget_force_torchtune",
    "budget_forcing_requested",
    "get_scale_func",
    "register",
    "scale_token_only",
    "should_continue_scaling",
]
