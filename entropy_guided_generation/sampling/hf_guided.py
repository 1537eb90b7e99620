"""``--model hf-guided``: lm-eval's Hugging Face model with budget forcing.

:class:`HFGuidedLM` is lm-eval's ``HFLM`` (same ``model_args``); its ``generate_until`` serves
requests whose gen_kwargs name budget forcing (``max_tokens_thinking``, ``thinking_n_ignore``,
``thinking_n_ignore_str``, ``thinking_start``, ``thinking_end``, ``thinking_answer_prefix``,
``scale_func_name`` and the scaling function's options) with the budget-forcing loop over the
model's ``past_key_values`` (an :class:`~entropy_guided_generation.generation.HFSession`; rounds
never re-prefill); every other request goes to ``HFLM`` unchanged, so without those gen_kwargs it
is exactly ``--model hf``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from lm_eval.models.huggingface import HFLM

from entropy_guided_generation.sampling.budget_forcing import BudgetForcedOutput, run_budget_forcing, serve_generate_until

MODEL_NAME = "hf-guided"


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


class HFGuidedLM(HFLM):
    """lm-eval's ``hf`` model whose ``generate_until`` also serves budget-forcing gen_kwargs."""

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        batch_size = self.batch_size if isinstance(self.batch_size, int) else 1
        return serve_generate_until(
            self, requests, plain=lambda reqs: super(HFGuidedLM, self).generate_until(reqs, disable_tqdm),
            force=self._force, batch_size=batch_size, disable_tqdm=disable_tqdm,
        )

    def _force(self, contexts: list[str], gen_kwargs: dict) -> list[BudgetForcedOutput]:
        if self.backend != "causal":
            raise ValueError(f"budget forcing needs a causal LM; this model's backend is {self.backend!r}")
        return budget_force_hf(
            self.model, self.tokenizer, [self.tok_encode(c) for c in contexts], gen_kwargs,
            max_length=self.max_length, default_max_gen_toks=self.max_gen_toks,
        )


__all__ = ["MODEL_NAME", "HFGuidedLM", "budget_force_hf", "hf_stop_ids"]
