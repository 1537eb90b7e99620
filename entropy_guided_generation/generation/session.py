"""A decode session: a model fed column by column, the one protocol every decode loop steps through.

:class:`DecodeSession` is what a loop asks of a model: prefill left-padded prompts, feed one token
per row, and forget a row's last columns (budget forcing's suppressed delimiter). Every row takes
one column per feed, real or padding; padding columns are masked out and never advance positions,
which count real tokens only. :func:`open_session` picks the implementation by the model's flavour:

- :class:`~entropy_guided_generation.modeling.KVSession`: a torchtune decoder's static KV cache (it
  also feeds several columns at once, as the interleaved decoders' ``[x_t, c_t]`` steps need; it
  lives in ``modeling`` because the fixed point in ``layout`` steps through one too);
- :class:`HFSession`: a Hugging Face causal LM's ``DynamicCache``;
- :class:`PrefixSession`: any other tokens -> logits module, re-run on the whole prefix (no cache).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional, Protocol

import torch

from entropy_guided_generation.modeling import (
    KVSession,
    is_hf_model,
    is_torchtune_decoder,
    kv_session,
    logits_of,
    positions_from_padding,
)


class DecodeSession(Protocol):
    """A model with a cache fed column by column (one column per feed for every row)."""

    def prefill(self, prompt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed ``prompt`` ``[b, p]`` (left-padded; ``valid`` ``[b, p]`` True on real tokens) and
        return the logits ``[b, v]`` after each row's last column."""

    def step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed one token ``[b]`` per row (``valid`` ``[b]`` False: a padding column); next logits ``[b, v]``."""

    def drop_last(self, rows: torch.Tensor, n: int) -> None:
        """Forget the last ``n`` columns of ``rows`` ``[b]`` bool: masked out from now on, and the
        row's next position rewound by the real tokens among them."""


# ------------------------------------------------------------------ Hugging Face
class HFSession:
    """A transformers causal LM and its ``DynamicCache``.

    The attention mask grows by one column per step; padding and dropped columns are 0 there,
    and position ids count real tokens only (as ``generate`` does for left-padded batches).
    """

    def __init__(self, model: Any):
        from transformers import DynamicCache  # transformers loads with the first HF session, not on import

        self.model = model
        self.cache = DynamicCache(config=model.config)
        # transformers >= 5.2x names the argument ``cache``; older releases ``past_key_values``.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.mask: Optional[torch.Tensor] = None
        self.next_pos: Optional[torch.Tensor] = None

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{self._cache_arg: self.cache},
        )
        return out.logits[:, -1].float()

    def prefill(self, prompt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.mask = valid.long()
        self.next_pos = self.mask.sum(1)
        return self._logits(prompt, positions_from_padding(valid))

    def step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, valid.long().unsqueeze(1)], dim=1)
        logits = self._logits(tokens.unsqueeze(1), self.next_pos.unsqueeze(1))
        self.next_pos = self.next_pos + valid.long()
        return logits

    def drop_last(self, rows: torch.Tensor, n: int) -> None:
        last = slice(self.mask.shape[1] - n, None)
        dropped = self.mask[:, last] * rows.long().unsqueeze(1)
        self.mask[:, last] -= dropped
        self.next_pos = self.next_pos - dropped.sum(1)


# ------------------------------------------------------------------ any tokens -> logits module
class PrefixSession:
    """Any tokens -> logits module: the whole prefix is re-run at every feed (no cache)."""

    def __init__(self, model: Any):
        self.model = model
        self.tokens: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None

    def _last_logits(self) -> torch.Tensor:
        return logits_of(self.model, self.tokens, padding_mask=self.valid)[:, -1]

    def prefill(self, prompt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.tokens, self.valid = prompt, valid
        return self._last_logits()

    def step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens.unsqueeze(1)], dim=1)
        self.valid = torch.cat([self.valid, valid.unsqueeze(1)], dim=1)
        return self._last_logits()

    def drop_last(self, rows: torch.Tensor, n: int) -> None:
        self.valid = self.valid.clone()
        self.valid[:, self.valid.shape[1] - n :] &= ~rows.unsqueeze(1)


@contextlib.contextmanager
def open_session(model: Any, batch_size: int, cache_len: int) -> Iterator[DecodeSession]:
    """The :class:`DecodeSession` for ``model``'s flavour, for ``batch_size`` rows of at most
    ``cache_len`` columns (prompt and every feed): :func:`kv_session` for torchtune decoders, an
    :class:`HFSession` for Hugging Face models, a :class:`PrefixSession` for anything else."""
    if is_torchtune_decoder(model):
        with kv_session(model, batch_size, cache_len) as session:
            yield session
    elif is_hf_model(model):
        yield HFSession(model)
    else:
        yield PrefixSession(model)


__all__ = ["DecodeSession", "HFSession", "KVSession", "PrefixSession", "kv_session", "open_session"]
