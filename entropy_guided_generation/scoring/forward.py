"""Teacher-forced forwards that return only the logits that score the generated region.

Rows are ``[prompt (left-padded to width P)] [generated tokens, right-padded]``. Generated token
``P + t`` is scored by the logits at position ``P + t - 1``, so the region's logits are positions
``P - 1 .. L - 2``: ``[b, L - P, v]``. For torchtune decoders only those positions go through the
output projection; other models compute all logits and the region is sliced out.

Logits come back in float32, or float64 when the model computes in float64 (low-precision logits
are upcast), so a float64 model keeps its precision through the scoring math.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from entropy_guided_generation.modeling import (
    causal_mask_from_padding,
    hidden_states,
    is_torchtune_decoder,
    logits_of,
    positions_from_padding,
)
from entropy_guided_generation.scoring.overrides import BuffersMapping, ParamsMapping


def _unembed(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + output projection of a torchtune decoder, in the model's dtype (torchtune's own
    ``unembed`` casts to float32, which would drop a float64 model's precision)."""
    h = model.norm(hidden)
    if getattr(model, "num_output_chunks", 0) > 0:
        return torch.cat(list(model.chunked_output(h)), dim=1)
    return model.output(h)


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` unchanged when float32/float64, else upcast to float32."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def region_logits(model: Any, tokens: torch.Tensor, padding_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Logits ``[b, L - P, v]`` (float32, or float64 for a float64 model) whose column t scores token ``P + t``.

    Args:
        model: torchtune decoder, Hugging Face causal LM, or any tokens -> logits module.
        tokens: ``[b, L]`` left-padded prompt (width P) then generated tokens.
        padding_mask: ``[b, L]`` True on real tokens.
        prompt_length: P (>= 1).
    """
    if not 1 <= prompt_length < tokens.shape[1]:
        raise ValueError(f"prompt_length must lie in [1, {tokens.shape[1] - 1}] for rows of width {tokens.shape[1]}, got {prompt_length}")
    if is_torchtune_decoder(model):
        mask = causal_mask_from_padding(padding_mask)
        input_pos = positions_from_padding(padding_mask)
        h = hidden_states(model, tokens, mask=mask, input_pos=input_pos)
        return at_least_fp32(_unembed(model, h[:, prompt_length - 1 : -1]))
    return logits_of(model, tokens, padding_mask=padding_mask)[:, prompt_length - 1 : -1]


class RegionLogits(nn.Module):
    """``region_logits`` as a module, so ``torch.func.functional_call`` can run it with a parameter
    mapping of the wrapped model (keys are prefixed with ``model.`` internally)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        return region_logits(self.model, tokens, padding_mask, prompt_length)

    def with_params(
        self,
        params: Optional[ParamsMapping],
        tokens: torch.Tensor,
        padding_mask: torch.Tensor,
        prompt_length: int,
        buffers: Optional[BuffersMapping] = None,
    ) -> torch.Tensor:
        """Region logits under ``params`` and ``buffers`` (the wrapped model's parameter and buffer
        names); what neither names, and everything when both are None, is the live module's."""
        if params is None and buffers is None:
            return self(tokens, padding_mask, prompt_length)
        prefixed = {f"model.{name}": value for name, value in {**(params or {}), **(buffers or {})}.items()}
        return torch.func.functional_call(self, prefixed, (tokens, padding_mask, prompt_length), tie_weights=True)


__all__ = ["RegionLogits", "at_least_fp32", "region_logits"]
