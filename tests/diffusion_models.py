"""Tiny mask predictors for the diffusion tests: a random bidirectional ModernBERT and scripted fakes."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

VOCAB = 24
MASK_ID = VOCAB - 1
PAD_ID = 0


def random_predictor(seed: int = 0, dropout: float = 0.1, weight_scale: float = 25.0):
    """A random ``ModernBertForMaskedLM`` (2 layers, hidden 32, vocab ``VOCAB``, eval mode) with
    peaked distributions (tied embeddings scaled by ``weight_scale``: mean entropy ~1.9 nats at 25)."""
    from entropy_guided_generation.diffusion.mask_predictor import PredictorSizes, TokenIds, build_mask_predictor

    ids = TokenIds(mask_id=MASK_ID, pad_id=PAD_ID, eos_id=1, vocab_size=VOCAB)
    sizes = PredictorSizes(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64, mlp_dropout=dropout)
    model = build_mask_predictor(ids, sizes, seed)
    with torch.no_grad():
        model.model.embeddings.tok_embeddings.weight.mul_(weight_scale)
    return model.eval()


class CountingModel(nn.Module):
    """Wraps a predictor; records the shape and a copy of every input, and each dropout module's
    ``training`` flag during the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []
        self.dropout_modes: list[list[bool]] = []

    def forward(self, tokens: torch.Tensor):
        self.inputs.append(tokens.clone())
        self.dropout_modes.append([m.training for m in self.model.modules() if isinstance(m, nn.Dropout) and m.p > 0])
        return self.model(tokens)


class ScriptedModel(nn.Module):
    """``logits_fn(call_index, tokens [b, s]) -> logits [b, s, v]``; records every input."""

    def __init__(self, logits_fn: Callable[[int, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.logits_fn = logits_fn
        self.inputs: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tokens.clone())
        return self.logits_fn(len(self.inputs) - 1, tokens)
