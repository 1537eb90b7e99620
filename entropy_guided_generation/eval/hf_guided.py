"""``--model hf-guided`` (and ``--model hf`` under ``python -m entropy_guided_generation.lm_eval``):
lm-eval's Hugging Face model with budget forcing.

:class:`HFGuidedLM` is lm-eval's ``HFLM`` (same ``model_args``); its ``generate_until`` serves
requests whose gen_kwargs name budget forcing (``max_tokens_thinking``, ``max_tokens_answer``,
``thinking_n_ignore``, ``thinking_n_ignore_str``, ``thinking_start``, ``thinking_end``,
``thinking_answer_prefix``, ``scale_func_name`` and the scaling function's options) with the
budget-forcing loop over the model's ``past_key_values`` (an
:class:`~entropy_guided_generation.generation.HFSession`; rounds never re-prefill); every other
request goes to ``HFLM.generate_until`` unchanged, so without those gen_kwargs it is exactly
lm-eval's own ``hf``. Under ``accelerate launch`` or torchrun every process serves its share of
the documents, on CPU too and by global rank across nodes (``HFLM`` splits only with more than one
GPU per node, by local rank); ``tp_plan`` (tensor parallel) keeps one logical rank.
"""
from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM

from entropy_guided_generation.eval.distributed import DataParallelLM, join_process_group
from entropy_guided_generation.sampling.budget_forcing import BudgetForcedOutput, serve_generate_until
from entropy_guided_generation.sampling.budget_forcing_hf import budget_force_hf

MODEL_NAME = "hf-guided"


class HFGuidedLM(DataParallelLM, HFLM):
    """lm-eval's ``hf`` model whose ``generate_until`` also serves budget-forcing gen_kwargs."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if kwargs.get("tp_plan") is None:
            join_process_group(self.device)  # accelerate has joined one already, except on CPU under torchrun
            self.join_ranks()

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return self.serve_once(requests, lambda served: super(HFGuidedLM, self).loglikelihood(served, disable_tqdm))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return self.serve_once(requests, lambda served: super(HFGuidedLM, self).loglikelihood_rolling(served, disable_tqdm))

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        return self.serve_once(requests, lambda served: self._generate_until(served, disable_tqdm))

    def _generate_until(self, requests: list, disable_tqdm: bool) -> list[str]:
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
