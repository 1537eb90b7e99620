"""Decode sessions: a model fed column by column, the one protocol every decode loop steps through.

:class:`DecodeSession` is what a loop asks of a model: prefill left-padded prompts, feed one token
per row, and forget a row's last columns (budget forcing's suppressed delimiter). Every row takes
one column per feed, real or padding; padding columns are masked out and never advance positions,
which count real tokens only. :func:`open_session` picks the implementation by the model's flavour:

- :class:`KVSession`: a torchtune decoder's static KV cache (it also feeds several columns at once,
  as the interleaved decoders' ``[x_t, c_t]`` steps and the fixed point's stepping need);
- :class:`HFSession`: a Hugging Face causal LM's ``DynamicCache``;
- :class:`PrefixSession`: any other tokens -> logits module, re-run on the whole prefix (no cache).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional, Protocol

import torch
from torch import nn

from entropy_guided_generation.modeling import (
    hidden_states,
    is_hf_model,
    is_torchtune_decoder,
    logits_at,
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


# ------------------------------------------------------------------ torchtune KV cache
class KVSession:
    """A torchtune decoder's static KV cache, filled column by column.

    ``key_valid[b, j]`` says whether cache column j holds a real token of row b; ``next_pos[b]``
    is the position id the row's next position-advancing token gets (positions count real tokens
    only, so training's right-padded layout and left-padded decoding see the same positions; under
    ``interleaving.positions: shared`` a confidence token does not advance and takes the position
    of the content token before it).
    """

    def __init__(self, model: Any, batch_size: int, cache_len: int, device: torch.device):
        self.model = model
        self.cache_len = cache_len
        self.key_valid = torch.zeros(batch_size, cache_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.filled = 0
        self._block_width = 0  # widest row block fed since the last end_row_blocks
        self._cols = torch.arange(cache_len, device=device)

    def _mask(self, k: int) -> torch.Tensor:
        """``[b, k, cache_len]``: query column ``filled + i`` sees the real keys at or before it."""
        query_cols = self.filled + self._cols[:k]
        causal = self._cols.unsqueeze(0) <= query_cols.unsqueeze(1)  # [k, cache_len]
        # A padding query still sees itself, so no attention row is empty.
        itself = self._cols.unsqueeze(0) == query_cols.unsqueeze(1)
        return (self.key_valid.unsqueeze(1) & causal.unsqueeze(0)) | itself.unsqueeze(0)

    def feed(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        use_col: torch.Tensor,
        advances: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Append ``tokens`` ``[b, k]`` (``valid`` marks real ones) and return the logits ``[b, v]``
        at column ``use_col[b]`` of this feed. ``advances`` ``[b, k]`` marks the tokens that move the
        position on (default: every real token); one that does not repeats the position before it."""
        k = tokens.shape[1]
        if self.filled + k > self.cache_len:
            raise RuntimeError(f"KV cache of {self.cache_len} columns is full ({self.filled} used, {k} more asked)")
        self.key_valid[:, self.filled : self.filled + k] = valid
        advances = valid if advances is None else advances
        if k == 1:
            pos = self.next_pos.unsqueeze(1)
        else:
            pos = (self.next_pos.unsqueeze(1) + advances.long().cumsum(1) - 1).clamp(min=0)
        logits = logits_at(self.model, tokens, use_col, mask=self._mask(k), input_pos=pos)
        self.next_pos += advances.long().sum(1)
        self.filled += k
        return logits

    def feed_rows(
        self, rows: slice, tokens: torch.Tensor, valid: torch.Tensor, advances: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Feed ``tokens`` ``[r, k]`` to the row block ``rows`` alone (a forward of those rows only)
        into columns ``filled .. filled + k``; :meth:`end_row_blocks` then closes those columns for
        every row (the columns past a block's width stay masked in its rows). A plain twin of each
        row and its interleaved row fill their prompts this way at the cost of their own widths.

        Returns:
            the last layer's output ``[r, k, d]`` (before the final norm; see :func:`project_hidden`).
        """
        if self.filled + tokens.shape[1] > self.cache_len:
            raise RuntimeError(
                f"KV cache of {self.cache_len} columns is full ({self.filled} used, {tokens.shape[1]} more asked)"
            )
        attention = _cached_attention(self.model)
        caches = [m.kv_cache for m in attention]
        try:
            for m, cache in zip(attention, caches):
                m.kv_cache = _RowBlockCache(cache, rows)
            hidden = self._forward_rows(rows, tokens, valid, advances)
        finally:
            for m, cache in zip(attention, caches):
                m.kv_cache = cache
        self._block_width = max(self._block_width, tokens.shape[1])
        return hidden

    def end_row_blocks(self) -> None:
        """Close the columns the row blocks fed since the last call: later feeds go on after the widest."""
        width = self._block_width
        for m in _cached_attention(self.model):
            m.kv_cache.cache_pos.add_(width)
        self.filled += width
        self._block_width = 0

    def _forward_rows(
        self, rows: slice, tokens: torch.Tensor, valid: torch.Tensor, advances: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """One forward of ``rows``' ``tokens`` ``[r, k]`` from column ``filled`` on (their caches set
        to row blocks); the last layer's output ``[r, k, d]``."""
        k = tokens.shape[1]
        self.key_valid[rows, self.filled : self.filled + k] = valid
        advances = valid if advances is None else advances
        pos = (self.next_pos[rows].unsqueeze(1) + advances.long().cumsum(1) - 1).clamp(min=0)
        h = hidden_states(self.model, tokens, mask=self._mask(k)[rows], input_pos=pos)
        self.next_pos[rows] += advances.long().sum(1)
        return h

    def prefill(self, prompt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed the left-padded ``prompt`` ``[b, p]``; the logits ``[b, v]`` after its last column."""
        last = torch.full((prompt.shape[0],), prompt.shape[1] - 1, dtype=torch.long, device=prompt.device)
        return self.feed(prompt, valid, last)

    def step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed one token ``[b]`` per row; the next logits ``[b, v]``."""
        return self.feed(tokens.unsqueeze(1), valid.unsqueeze(1), torch.zeros_like(tokens))

    def drop_last(self, rows: torch.Tensor, n: int) -> None:
        """Forget the last ``n`` columns of ``rows`` ``[b]`` bool: masked out from now on, and the
        row's next position rewound by the real tokens among them."""
        dropped = self.key_valid[:, self.filled - n : self.filled] & rows.unsqueeze(1)
        self.key_valid[:, self.filled - n : self.filled] &= ~dropped
        self.next_pos -= dropped.long().sum(1)


class _RowBlockCache(nn.Module):
    """A torchtune ``KVCache`` over rows ``rows`` of another's: its key and value buffers are views
    of those rows, written from the other's next column on, so a forward of those rows alone fills
    their part of the shared cache (the other's position counter is not moved)."""

    def __init__(self, cache: nn.Module, rows: slice):
        super().__init__()
        self.k_cache, self.v_cache = cache.k_cache[rows], cache.v_cache[rows]
        self.cache_pos = cache.cache_pos.clone()
        self.batch_size = self.k_cache.shape[0]

    @property
    def size(self) -> int:
        return int(self.cache_pos[0])

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = k_val.shape[2]
        self.k_cache[:, :, self.cache_pos[:seq_len]] = k_val
        self.v_cache[:, :, self.cache_pos[:seq_len]] = v_val
        self.cache_pos.add_(seq_len)
        return self.k_cache, self.v_cache


def _cached_attention(model: Any) -> list[nn.Module]:
    """The attention modules of a torchtune decoder that hold a KV cache."""
    return [m for m in model.modules() if isinstance(getattr(m, "kv_cache", None), nn.Module)]


@contextlib.contextmanager
def caches_set_aside(model: Any) -> Iterator[Any]:
    """Yield ``model`` as if its KV caches had never been set up, and put them back untouched after.

    Whole-sequence forwards (the fixed point's passes, teacher forcing) then attend causally with
    no cache, and a :func:`kv_session` opened inside sets up caches of its own size (the fixed
    point's sequential fallback). Models without torchtune caches pass through.
    """
    if not (is_torchtune_decoder(model) and model.caches_are_setup()):
        yield model
        return
    attention = _cached_attention(model)
    saved = [(m, m.kv_cache, m.cache_enabled) for m in attention]
    max_cache_len = getattr(model, "decoder_max_cache_seq_len", None)
    for m in attention:
        m.kv_cache, m.cache_enabled = None, False
    try:
        yield model
    finally:
        for m, cache, enabled in saved:
            m.kv_cache, m.cache_enabled = cache, enabled
        model.decoder_max_cache_seq_len = max_cache_len


@contextlib.contextmanager
def kv_session(model: Any, batch_size: int, cache_len: int) -> Iterator[KVSession]:
    """A :class:`KVSession` over ``model``'s caches: reuses caches the caller set up (same batch
    size, long enough; reset first), else sets them up for this call and deletes them after."""
    from torchtune.modules.common_utils import local_kv_cache

    if not is_torchtune_decoder(model):
        raise TypeError(
            f"decoders need a torchtune TransformerDecoder (with setup_caches), got {type(model).__name__}"
        )
    param = next(model.parameters())
    if model.caches_are_setup():
        cache = model.layers[0].attn.kv_cache
        have_len = int(cache.k_cache.shape[2])
        if cache.batch_size != batch_size or have_len < cache_len:
            raise ValueError(
                f"the model's KV caches are set up for batch {cache.batch_size} x {have_len} positions, but this "
                f"call needs batch {batch_size} x {cache_len}; pad the batch or set up larger caches"
            )
        model.reset_caches()
        yield KVSession(model, batch_size, have_len, param.device)
        return
    with local_kv_cache(
        model, batch_size=batch_size, device=param.device, dtype=param.dtype, decoder_max_seq_len=cache_len
    ):
        yield KVSession(model, batch_size, cache_len, param.device)



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


__all__ = [
    "DecodeSession",
    "HFSession",
    "KVSession",
    "PrefixSession",
    "caches_set_aside",
    "kv_session",
    "open_session",
]
