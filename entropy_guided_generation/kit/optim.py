"""The optimization pieces the kit's deterministic trainers share (the base model and the mask
predictor): AdamW with decay on matrices only, warmup + cosine learning rate, and seeded epoch
shuffles that hand out batches of example indices."""
from __future__ import annotations

import math
import random

import torch


def warmup_cosine_lr(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate at optimizer ``step`` (0-based): linear warmup to ``lr`` over ``warmup_steps``,
    then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw_decaying_matrices(model: torch.nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.98) with ``weight_decay`` on parameters of 2+ dimensions and none on
    vectors (norm scales, biases)."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, *, lr: float, grad_clip: float) -> None:
    """One step on ``loss`` at learning rate ``lr``, gradients clipped to norm ``grad_clip``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


class EpochBatches:
    """Batches of example indices: each epoch is a ``random.Random(seed)`` shuffle of all examples,
    and batches run across epoch boundaries (so a run is a pure function of the seed)."""

    def __init__(self, num_examples: int, batch_size: int, rng: random.Random):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"need >= 1 example and batch size >= 1, got {num_examples} examples, batch size {batch_size}")
        self.num_examples, self.batch_size, self.rng = num_examples, batch_size, rng
        self._order: list[int] = []

    def next(self) -> list[int]:
        """The next ``batch_size`` example indices."""
        if len(self._order) < self.batch_size:
            epoch = list(range(self.num_examples))
            self.rng.shuffle(epoch)
            self._order.extend(epoch)
        chosen, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return chosen


__all__ = ["EpochBatches", "adamw_decaying_matrices", "optimizer_step", "warmup_cosine_lr"]
