"""Log-likelihood of a continuation under a mask predictor: LLaDA's Monte-Carlo estimate.

A masked-diffusion model has no left-to-right factorisation; ``log p(target | prefix)`` is bounded
below by ``E_t E_mask [ sum over masked target positions of log p(x_i | noisy) / t ]``. LLaDA
(``get_log_likelihood.py``) estimates it with ``mc_num`` draws: each batch of ``b`` copies masks
``x_j`` of the ``n`` target tokens, the counts ``x_j`` evenly spread over 1..n from one random start
(stratified, low variance), the masked positions a random subset; the prefix is never masked.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from entropy_guided_generation.diffusion.decoding import guided_logits


def stratified_mask_counts(batch_size: int, target_len: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[b]`` long numbers of target tokens to mask, in 1..n: ``round(k + j n / b)`` wrapped into
    1..n for rows j, with ``k`` uniform in 1..n (LLaDA's ``_forward_process``)."""
    k = int(torch.randint(1, target_len + 1, (), generator=generator))
    counts = torch.round(torch.linspace(float(k), k + (batch_size - 1) * (target_len / batch_size), steps=batch_size)).long()
    return (counts - 1) % target_len + 1


def random_target_masks(counts: torch.Tensor, target_len: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[b, n]`` bool: ``counts[j]`` target positions of row j, a uniformly random subset."""
    ranks = torch.rand(counts.shape[0], target_len, generator=generator).argsort(dim=1)  # a random permutation per row
    return ranks < counts.unsqueeze(1)


@torch.no_grad()
def monte_carlo_loglikelihood(
    model: Any,
    prefix: torch.Tensor,
    target: torch.Tensor,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> float:
    """LLaDA's Monte-Carlo estimate of ``log p(target | prefix)`` in nats (a lower bound, in expectation).

    Args:
        model: mask predictor ``model(tokens [b, s]) -> logits [b, s, v]`` (or ``.logits``).
        prefix: ``[p]`` token ids (may be empty).
        target: ``[n]`` token ids, n >= 1.
        mask_id: the predictor's mask id (neither prefix nor target may contain it).
        mc_num: number of masked copies drawn, a multiple of ``batch_size``.
        batch_size: copies per forward.
        cfg_scale: unsupervised classifier-free guidance (the prompt-masked copy runs in the same forward).
        generator: source of the mask draws (default: torch's global generator).

    Returns:
        The mean over ``mc_num / batch_size`` batches of ``-sum(CE / t) / batch_size``, with t the
        masked share of the target in each copy.

    Raises:
        ValueError: on an empty target, a mask id in the input, or ``mc_num`` not a multiple of ``batch_size``.
    """
    if target.dim() != 1 or prefix.dim() != 1 or target.numel() == 0:
        raise ValueError(f"prefix and target must be 1-D token id tensors with a non-empty target, got shapes {tuple(prefix.shape)} and {tuple(target.shape)}")
    if batch_size < 1 or mc_num < batch_size or mc_num % batch_size:
        raise ValueError(f"mc_num {mc_num} must be a positive multiple of batch_size {batch_size}")
    sequence = torch.cat([prefix, target]).long()
    if bool((sequence == mask_id).any()):
        raise ValueError(f"prefix + target contain the mask id {mask_id}; expected plain tokens")
    p, n = prefix.numel(), target.numel()
    rows = sequence.unsqueeze(0).repeat(batch_size, 1)
    estimates = []
    for _ in range(mc_num // batch_size):
        counts = stratified_mask_counts(batch_size, n, generator)
        masked = torch.cat([torch.zeros(batch_size, p, dtype=torch.bool), random_target_masks(counts, n, generator)], dim=1).to(rows.device)
        noisy = rows.masked_fill(masked, mask_id)
        logits = guided_logits(model, noisy, p, cfg_scale, mask_id)
        ce = F.cross_entropy(logits[masked], rows[masked], reduction="none")
        ratios = (counts.to(rows.device).double() / n).unsqueeze(1).expand(-1, p + n)[masked]
        estimates.append(-(ce.double() / ratios).sum().item() / batch_size)
    return sum(estimates) / len(estimates)


__all__ = ["monte_carlo_loglikelihood", "random_target_masks", "stratified_mask_counts"]
