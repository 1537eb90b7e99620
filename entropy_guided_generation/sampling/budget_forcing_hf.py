"""Budget forcing on a Hugging Face causal LM: the budget-forcing loop over one ``DynamicCache``
(an :class:`~entropy_guided_generation.sessions.HFSession`; rounds never re-prefill). lm-eval's
``--model hf-guided`` (:mod:`~entropy_guided_generation.eval.hf_guided`) serves requests with it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation.sampling.budget_forcing import BudgetForcedOutput, run_budget_forcing


def hf_stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids that end generation: the tokenizer's EOS and the generation config's ``eos_token_id``(s)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@torch.no_grad()
def budget_force_hf(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    gen_kwargs: dict,
    *,
    max_length: int,
    default_max_gen_toks: int = 256,
    stop_tokens: Optional[Sequence[int]] = None,
    rng: Optional[torch.Generator] = None,
    progress: bool = False,
) -> list[BudgetForcedOutput]:
    """Budget forcing on a transformers causal LM (one ``DynamicCache``, no re-prefill).

    Args:
        model: a transformers causal LM (eval mode).
        tokenizer: its tokenizer (``encode(text, add_special_tokens=False)``, ``decode``).
        prompts: token ids per prompt (without the thinking start).
        gen_kwargs: lm-eval gen_kwargs (budget forcing keys, ``max_gen_toks``, ``until``, sampling).
        max_length: the context length.
        stop_tokens: ids that end the answer (default: :func:`hf_stop_ids`).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return run_budget_forcing(
        model, prompts, gen_kwargs,
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos_text=tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) if tokenizer.eos_token_id is not None else None,
        default_max_gen_toks=default_max_gen_toks, max_length=max_length, pad_id=int(pad_id),
        stop_tokens=stop_tokens if stop_tokens is not None else hf_stop_ids(model, tokenizer),
        device=next(model.parameters()).device, rng=rng, progress=progress,
    )


__all__ = ["budget_force_hf", "hf_stop_ids"]
