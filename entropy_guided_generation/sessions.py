"""Decode sessions: a model fed column by column, the one protocol every decode loop steps through.

:class:`DecodeSession` is what a loop asks of a model: prefill left-padded prompts, feed one token
per row, and forget a row's last columns (budget forcing's suppressed delimiter). Every row takes
one column per feed, real or padding; padding columns are masked out and never advance positions,
which count real tokens only. :func:`open_session` picks the implementation by the model's flavour:

- :class:`KVSession`: a torchtune decoder's static KV cache (it also feeds several columns at once,
  as the interleaved decoders' ``[x_t, c_t]`` steps and the fixed point's stepping need); while it
  is open the decoder's attention modules attend over the filled columns only, grouped KV heads
  unexpanded, prompts in chunks (:func:`_session_attention`);
- :class:`HFSession`: a Hugging Face causal LM's ``DynamicCache``;
- :class:`PrefixSession`: any other tokens -> logits module, re-run on the whole prefix (no cache).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from entropy_guided_generation.modeling import (
    hidden_states,
    is_hf_model,
    is_torchtune_decoder,
    logits_of,
    logits_of_hidden,
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

    Opened by :func:`kv_session`, which runs the model's attention modules by
    :func:`_session_attention` meanwhile: a forward of the model inside the session goes through
    :meth:`feed` / :meth:`feed_rows` (or runs with its caches set aside).
    """

    def __init__(self, model: Any, batch_size: int, cache_len: int, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.cache_len = cache_len
        self.key_valid = torch.zeros(batch_size, cache_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.filled = 0
        self.feeding: Optional[SessionFeed] = None  # the forward running now (read by the attention modules)
        self._block_width = 0  # widest row block fed since the last end_row_blocks
        self._cols = torch.arange(cache_len, device=device)
        self._dtype = dtype

    def _feed_at(self, rows: slice, start: int, k: int) -> "SessionFeed":
        """A forward of ``rows`` writing columns ``start .. start + k``: query column ``start + i``
        sees the row's real keys at or before it (the columns past the feed are not read at all)."""
        end = start + k
        cols = self._cols[:end]
        query_cols = start + self._cols[:k]
        causal = cols.unsqueeze(0) <= query_cols.unsqueeze(1)  # [k, end]
        # A padding query still sees itself, so no attention row is empty.
        itself = cols.unsqueeze(0) == query_cols.unsqueeze(1)
        mask = (self.key_valid[rows, :end].unsqueeze(1) & causal.unsqueeze(0)) | itself.unsqueeze(0)
        bias = torch.zeros(mask.shape, dtype=self._dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return SessionFeed(rows, start, mask, bias.unsqueeze(1))

    def _check_room(self, k: int) -> None:
        if self.filled + k > self.cache_len:
            raise RuntimeError(f"KV cache of {self.cache_len} columns is full ({self.filled} used, {k} more asked)")

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
        self._check_room(tokens.shape[1])
        hidden = self._forward_rows(slice(None), tokens, valid, advances)
        self.filled += tokens.shape[1]
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return logits_of_hidden(self.model, hidden[rows, use_col].unsqueeze(1))[:, 0]

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
        self._check_room(tokens.shape[1])
        hidden = self._forward_rows(rows, tokens, valid, advances)
        self._block_width = max(self._block_width, tokens.shape[1])
        return hidden

    def end_row_blocks(self) -> None:
        """Close the columns the row blocks fed since the last call: later feeds go on after the widest."""
        self.filled += self._block_width
        self._block_width = 0

    def _forward_rows(
        self, rows: slice, tokens: torch.Tensor, valid: torch.Tensor, advances: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The last layer's output ``[r, k, d]`` on ``rows``' ``tokens`` ``[r, k]``, written from
        column ``filled`` on (``filled`` itself is left to the caller). A long feed (a prompt) runs
        in chunks of :data:`PREFILL_CHUNK` columns, each attending over the columns up to its own
        end: causal attention without the masked upper triangle of the whole feed."""
        k = tokens.shape[1]
        self.key_valid[rows, self.filled : self.filled + k] = valid
        advances = valid if advances is None else advances
        pos = (self.next_pos[rows].unsqueeze(1) + advances.long().cumsum(1) - 1).clamp(min=0)
        hidden = []
        try:
            for begin in range(0, k, PREFILL_CHUNK):
                end = min(begin + PREFILL_CHUNK, k)
                self.feeding = self._feed_at(rows, self.filled + begin, end - begin)
                hidden.append(hidden_states(self.model, tokens[:, begin:end], mask=None, input_pos=pos[:, begin:end]))
        finally:
            self.feeding = None
        self.next_pos[rows] += advances.long().sum(1)
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden, 1)

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


@dataclass
class SessionFeed:
    """The forward a :class:`KVSession` runs now: its rows are the cache's rows ``rows``, written at
    columns ``start .. start + k`` and attending over columns ``0 .. start + k`` under ``mask``
    ``[r, k, start + k]`` (bool, True where seen), i.e. ``bias`` ``[r, 1, k, start + k]`` (0 where
    seen, -inf elsewhere: made once per forward for every layer; SDPA would convert a bool mask
    in each)."""

    rows: slice
    start: int
    mask: torch.Tensor
    bias: torch.Tensor


PREFILL_CHUNK = 256
"""Columns a session forwards at once: a longer feed (a prompt) runs chunk by chunk, each chunk's
queries attending over the columns up to its end, so a prompt of p columns reads about p^2 / 2
query-key pairs instead of p x p. Linear layers see 256 x rows tokens per call, enough for BLAS."""


SESSION_ATTENTION_OBSERVER = "session_attention_observer"
"""The attribute of an attention module whose callable, when set, observes each session forward
(entropix's attention statistics read the scores this way)."""


def _session_attention(attn: nn.Module, session: KVSession) -> Callable[..., torch.Tensor]:
    """``attn``'s forward inside ``session``: torchtune's projections, rotary embedding and norms,
    keys and values written to ``attn.kv_cache``'s buffers where the session's running forward
    (:attr:`KVSession.feeding`) writes, and attention over the columns filled so far only, grouped query heads
    reading their key/value head in place (SDPA's ``enable_gqa``). torchtune's own forward expands
    the grouped heads into a copy of the whole static cache at every call (rows x cache length x
    heads), which made a decode step's cost grow with the cache's size rather than its filled part.

    The layers pass no mask (the session's feed holds it). A callable set as ``attn``'s
    :data:`SESSION_ATTENTION_OBSERVER` attribute sees each call's rotated, normed queries ``[r, h, k, d]``,
    the filled keys ``[r, h_kv, filled + k, d]`` (grouped, not expanded) and the mask."""
    grouped = attn.num_heads != attn.num_kv_heads

    def forward(x: torch.Tensor, y: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        if attn.kv_cache is None or not attn.cache_enabled:  # a whole-sequence forward, caches set aside
            return type(attn).forward(attn, x, y, **kwargs)
        return cached(x, **kwargs)

    def cached(x: torch.Tensor, *, mask: None, input_pos: torch.Tensor) -> torch.Tensor:
        b, k, _ = x.shape
        q = attn.q_proj(x).view(b, k, attn.num_heads, attn.head_dim)
        keys = attn.k_proj(x).view(b, k, attn.num_kv_heads, attn.head_dim)
        values = attn.v_proj(x).view(b, k, attn.num_kv_heads, attn.head_dim)
        if attn.pos_embeddings is not None:
            q = attn.pos_embeddings(q, input_pos=input_pos)
            keys = attn.pos_embeddings(keys, input_pos=input_pos)
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        if attn.q_norm is not None:
            q = attn.q_norm(q)
        if attn.k_norm is not None:
            keys = attn.k_norm(keys)
        feed = session.feeding
        if feed is None:
            raise RuntimeError(
                f"{type(attn).__name__} ran outside its open KV session's feeds: inside a session, forward the "
                "model through the session (feed / step), or set its caches aside (sessions.caches_set_aside) "
                "for a whole-sequence forward"
            )
        start, end = feed.start, feed.start + k
        k_cache, v_cache = attn.kv_cache.k_cache[feed.rows], attn.kv_cache.v_cache[feed.rows]
        k_cache[:, :, start:end] = keys
        v_cache[:, :, start:end] = values
        observer = getattr(attn, SESSION_ATTENTION_OBSERVER, None)
        if observer is not None:
            observer(q, k_cache[:, :, :end], feed.mask)
        out = F.scaled_dot_product_attention(
            q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=feed.bias,
            dropout_p=attn.attn_dropout if attn.training else 0.0, enable_gqa=grouped,
        )
        return attn.output_proj(out.transpose(1, 2).reshape(b, k, -1))

    return forward


@contextlib.contextmanager
def _attention_over_session(model: Any, session: KVSession) -> Iterator[KVSession]:
    """Run ``model``'s cached attention modules by :func:`_session_attention` while the block lasts."""
    from torchtune.modules import MultiHeadAttention

    attention = _cached_attention(model)
    for m in attention:
        if not isinstance(m, MultiHeadAttention):
            raise TypeError(
                f"KV sessions run torchtune's MultiHeadAttention; {type(m).__name__} holds a KV cache but is not one"
            )
    outer = [m.__dict__.get("forward") for m in attention]  # a session opened inside another's
    try:
        for m in attention:
            m.forward = _session_attention(m, session)
        yield session
    finally:
        for m, forward in zip(attention, outer):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


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
        with _attention_over_session(model, KVSession(model, batch_size, have_len, param.device, param.dtype)) as session:
            yield session
        return
    with local_kv_cache(
        model, batch_size=batch_size, device=param.device, dtype=param.dtype, decoder_max_seq_len=cache_len
    ), _attention_over_session(model, KVSession(model, batch_size, cache_len, param.device, param.dtype)) as session:
        yield session



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
