"""Exact prompt bins of earlier calls, reused by later prompts that start with the same tokens.

In modes that interleave the prompt (``full``), the prefill finds every prompt slot's bin by the
exact fixed point (:func:`~entropy_guided_generation.layout.compute_bins`). A slot's bin depends
only on the tokens before it and the bins of earlier slots, so two prompts that share their first
L tokens share every bin of a slot among those L tokens. Prompts that open alike are where it pays:
fixed few-shot exemplars (lm-eval tasks with ``fewshot_config: {sampler: first_n}``, chain-of-thought
exemplar sets), a shared system prompt or instructions. After the first batch only each prompt's own
tokens need passes. (lm-eval's ``gsm8k`` draws other shots for every document: little is shared there.)

The cache belongs to one model, codec and interleaving (the eval LM holds one for its lifetime);
nothing in it is checked against the model's weights.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class PromptBinsCache:
    """Bins and signals of the real tokens of prompts seen before, most recent ``capacity`` kept.

    Args:
        capacity: prompts kept (least recently used dropped first).
    """

    def __init__(self, capacity: int = 64):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        # tokens (1-D, real tokens only) -> (bins, signal) per real token (-1 / NaN where no slot)
        self._entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.reused_slots = 0
        """Slots whose bins came from the cache, over the cache's lifetime."""

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, prompt: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bins, signal)``, each ``[b, p]`` like ``prompt``: for each row, the cached bins of its slots
        that lie in the longest prefix of real tokens it shares with a cached prompt (-1 / NaN elsewhere).

        Args:
            prompt: ``[b, p]`` ids, real tokens where ``valid`` (left- or right-padded).
            valid: ``[b, p]`` True on real tokens.
            slots: ``[b, p]`` the interleaving's slots of ``prompt``.
        """
        bins = torch.full_like(prompt, -1)
        signal = torch.full(prompt.shape, float("nan"), dtype=torch.float64, device=prompt.device)
        if not self._entries:
            return bins, signal
        for row in range(prompt.shape[0]):  # once per prompt row and call, not per token
            columns = valid[row].nonzero().squeeze(1)
            tokens = prompt[row, columns]
            shared, best = 0, None
            for key, (cached_tokens, cached_bins, cached_signal) in self._entries.items():
                n = min(tokens.numel(), cached_tokens.numel())
                differ = (tokens[:n] != cached_tokens[:n].to(tokens.device)).nonzero()
                length = int(differ[0]) if differ.numel() else n
                if length > shared:
                    shared, best = length, key
            if best is None:
                continue
            self._entries.move_to_end(best)
            _, cached_bins, cached_signal = self._entries[best]
            here = columns[:shared]
            take = slots[row, here] & (cached_bins[:shared].to(prompt.device) >= 0)
            bins[row, here[take]] = cached_bins[:shared].to(prompt.device)[take]
            signal[row, here[take]] = cached_signal[:shared].to(prompt.device)[take]
            self.reused_slots += int(take.sum())
        return bins, signal

    def add(self, prompt: torch.Tensor, valid: torch.Tensor, bins: torch.Tensor, signal: torch.Tensor) -> None:
        """Remember each row's exact ``bins`` and ``signal`` (``[b, p]``, as ``compute_bins`` returns them)."""
        for row in range(prompt.shape[0]):
            columns = valid[row].nonzero().squeeze(1)
            tokens = prompt[row, columns].cpu()
            key = tuple(tokens.tolist())
            self._entries[key] = (tokens, bins[row, columns].cpu(), signal[row, columns].double().cpu())
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


__all__ = ["PromptBinsCache"]
