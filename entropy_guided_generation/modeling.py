"""Calling a causal LM for logits, whatever its flavour.

The core asks one question of a model: the logits ``[b, s, v]`` for tokens ``[b, s]``, optionally
with padding. Three flavours are accepted without wrappers:

- torchtune ``TransformerDecoder`` (keyword ``mask`` ``[b, s, s_kv]`` and ``input_pos``; chunked
  outputs are concatenated);
- Hugging Face ``PreTrainedModel`` (``attention_mask`` + ``position_ids``; ``.logits``);
- any module ``tokens -> logits`` (called as ``model(tokens)`` when there is no padding).

:class:`KVSession` steps a torchtune decoder through its KV cache (the decoders, and the fixed
point's sequential stepping).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


def is_torchtune_decoder(model: Any) -> bool:
    """True for torchtune-style decoders (they take ``mask=`` / ``input_pos=`` and own KV caches)."""
    return hasattr(model, "caches_are_enabled") and hasattr(model, "tok_embeddings")


def is_hf_model(model: Any) -> bool:
    """True for Hugging Face transformers models (they take ``attention_mask`` / ``position_ids``)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


def causal_mask_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[b, s, s]``: query i sees key j iff j <= i and j is not padding.

    A padding query still sees itself, so no softmax row is empty (its output is never used).

    Args:
        padding_mask: ``[b, s]`` True for real tokens.
    """
    s = padding_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=padding_mask.device).tril()
    mask = causal.unsqueeze(0) & padding_mask.unsqueeze(1)
    return mask | torch.eye(s, dtype=torch.bool, device=padding_mask.device).unsqueeze(0)


def positions_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[b, s]``: 0 at each row's first real token, counting real tokens only."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


def _as_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (list, tuple)):
        # torchtune returns a list of chunks when num_output_chunks > 0.
        return torch.cat(list(output), dim=1)
    raise TypeError(f"cannot read logits from a model output of type {type(output).__name__}")


def logits_of(
    model: Any,
    tokens: torch.Tensor,
    *,
    padding_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    input_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float32 logits ``[b, s, v]`` of ``model`` on ``tokens`` ``[b, s]``.

    Args:
        padding_mask: ``[b, s]`` True for real tokens; builds the causal+padding mask and position
            ids (use it for left padding; right padding needs nothing).
        mask, input_pos: torchtune-style explicit mask ``[b, s, s_kv]`` and positions ``[b, s]``
            (override ``padding_mask``; needed with KV caches).
    """
    width = tokens.shape[1]
    if lockstep_width(model, width) > width:
        return _logits_at_lockstep_width(model, tokens, padding_mask=padding_mask, mask=mask, input_pos=input_pos)
    if padding_mask is not None:
        mask = causal_mask_from_padding(padding_mask) if mask is None else mask
        input_pos = positions_from_padding(padding_mask) if input_pos is None else input_pos
    if is_hf_model(model):
        attention_mask = padding_mask.long() if padding_mask is not None else None
        out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=input_pos, use_cache=False)
    elif mask is None and input_pos is None:
        out = model(tokens)
    else:
        out = model(tokens, mask=mask, input_pos=input_pos)
    return _as_logits(out).float()


def _logits_at_lockstep_width(
    model: Any,
    tokens: torch.Tensor,
    *,
    padding_mask: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    input_pos: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`logits_of` over ``tokens`` right-padded to :func:`lockstep_width` (columns after the
    real ones cannot change them under a causal mask), cut back to ``tokens``' width."""
    if mask is not None:
        raise ValueError("an explicit attention mask cannot be widened for an FSDP2 forward; pass padding_mask")
    width = tokens.shape[1]
    wide = lockstep_width(model, width)
    if padding_mask is not None:
        input_pos = positions_from_padding(padding_mask) if input_pos is None else input_pos
        padding_mask = pad_columns(padding_mask, wide, False)
    if input_pos is not None:
        input_pos = pad_columns(input_pos, wide)
    return logits_of(model, pad_columns(tokens, wide), padding_mask=padding_mask, input_pos=input_pos)[:, :width]


def last_logits_of(
    model: Any,
    tokens: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    input_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float32 logits ``[b, v]`` at the last position only.

    For torchtune decoders the output projection runs on the last position alone (a decode step
    that feeds ``[x_t, c_t]`` needs logits only after ``c_t``); the model's state is not touched.
    """
    if is_torchtune_decoder(model) and not getattr(model, "output_hidden_states", None):
        h = model.tok_embeddings(tokens)
        for layer in model.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        h_last = model.norm(h[:, -1:])
        return model.output(h_last).float()[:, -1]
    return logits_of(model, tokens, mask=mask, input_pos=input_pos)[:, -1]


def logits_at(
    model: Any,
    tokens: torch.Tensor,
    index: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    input_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float32 logits ``[b, v]`` at column ``index[b]`` of each row of ``tokens`` ``[b, s]``.

    For torchtune decoders the output projection runs on those positions alone (a decode step
    that feeds ``[x_t, c_t]`` needs logits at one column per row); the model's state is untouched.
    """
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    if is_torchtune_decoder(model) and not getattr(model, "output_hidden_states", None):
        h = model.tok_embeddings(tokens)
        for layer in model.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        h_used = model.norm(h if h.shape[1] == 1 else h[rows, index].unsqueeze(1))
        return model.output(h_used).float()[:, 0]
    return logits_of(model, tokens, mask=mask, input_pos=input_pos)[rows, index]


def is_fsdp_sharded(model: Any) -> bool:
    """True for a module sharded by FSDP2 (``fully_shard``): only its own ``forward`` gathers the
    parameters, so its submodules must not be called one by one."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(model, FSDPModule)


def forwards_in_lockstep(model: Any) -> bool:
    """True when every rank of the default process group must run the same number of forwards of
    ``model``: it is FSDP2-sharded, so each forward all-gathers its parameters (a collective)."""
    return is_fsdp_sharded(model) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lockstep_width(model: Any, width: int) -> int:
    """The sequence width a forward over ``width`` columns must run at so that, under
    :func:`forwards_in_lockstep`, every rank calls each sharded module equally often.

    torchtune's chunked output (``num_output_chunks`` n > 0) projects ``hidden.chunk(n)``: fewer
    than n chunks for some widths (10 columns make 5), so two ranks with other widths would call
    a separately sharded ``output`` (``custom_sharded_layers``) a different number of times and
    hang in its all-gathers. A multiple of n always makes exactly n chunks."""
    chunks = int(getattr(model, "num_output_chunks", 0) or 0)
    if chunks <= 1 or not forwards_in_lockstep(model):
        return width
    return max(1, -(-width // chunks)) * chunks


def pad_columns(tensor: torch.Tensor, width: int, value: Any = None) -> torch.Tensor:
    """``tensor`` ``[b, s, ...]`` right-padded to ``width`` columns with ``value`` (default: a copy
    of its last column)."""
    extra = width - tensor.shape[1]
    if extra <= 0:
        return tensor
    if value is None:
        fill = tensor[:, -1:].expand(-1, extra, *tensor.shape[2:])
    else:
        fill = torch.full((tensor.shape[0], extra, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, fill], dim=1)


def forward_anywhere(model: Any, wanted: bool, tokens: torch.Tensor) -> bool:
    """One round of a data-dependent loop of forwards, kept in step across ranks.

    Returns whether some rank wants a forward this round (``wanted`` is this rank's wish; a
    collective MAX over ranks under :func:`forwards_in_lockstep`, else ``wanted`` itself). When
    another rank wants one and this rank does not, this rank runs an idle no-grad forward of
    ``tokens[:1, :1]`` (``tokens``: any ``[b, s]`` ids) so that every rank joins the same
    parameter all-gathers. Every rank must call it once per round, in the same order.
    """
    if not forwards_in_lockstep(model):
        return wanted
    flag = torch.tensor([int(wanted)], dtype=torch.long, device=tokens.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    anywhere = bool(flag.item())
    if anywhere and not wanted:
        with torch.no_grad():
            logits_of(model, tokens[:1, :1])
    return anywhere


MIN_PROJECTED_POSITIONS = 16
""":class:`PositionLogits` projects at least this many positions at once (fewer are padded by repeating
the last one): BLAS multiplies a handful of rows by another code path, with another summation order."""


class PositionLogits:
    """One forward over ``tokens`` ``[b, s]``; float32 logits at chosen positions on demand.

    For torchtune decoders (not FSDP-sharded, no ``output_hidden_states``) the forward stops
    before the final norm and output projection, which then run only at the positions asked for:
    the same bits as :func:`logits_of` there (both are per-position maps), at a fraction of the
    cost and memory when the vocabulary is large. Other models run :func:`logits_of` once.

    Args:
        model: see :func:`logits_of`.
        tokens: ``[b, s]``.
        padding_mask, input_pos: as in :func:`logits_of` (``input_pos`` overrides the positions
            ``padding_mask`` implies).
    """

    def __init__(
        self,
        model: Any,
        tokens: torch.Tensor,
        *,
        padding_mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ):
        self.model = model
        self.projects = (
            is_torchtune_decoder(model) and not getattr(model, "output_hidden_states", None) and not is_fsdp_sharded(model)
        )
        if not self.projects:
            self.hidden = logits_of(model, tokens, padding_mask=padding_mask, input_pos=input_pos)
            return
        mask = None
        if padding_mask is not None:
            mask = causal_mask_from_padding(padding_mask)
            input_pos = positions_from_padding(padding_mask) if input_pos is None else input_pos
        h = model.tok_embeddings(tokens)
        for layer in model.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        self.hidden = h

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits ``[k, v]`` at positions ``(rows[i], cols[i])`` (``[k]`` long each)."""
        if not self.projects:
            return self.hidden[rows, cols]
        k = rows.shape[0]
        # BLAS libraries multiply a handful of rows by another code path (another summation order)
        # than many rows: project at least MIN_PROJECTED_POSITIONS positions, repeating the last one.
        if 0 < k < MIN_PROJECTED_POSITIONS:
            pick = torch.arange(MIN_PROJECTED_POSITIONS, device=rows.device).clamp(max=k - 1)
            rows, cols = rows[pick], cols[pick]
        return self.model.output(self.model.norm(self.hidden[rows, cols].unsqueeze(0))).float()[0, :k]


def logits_at_positions(
    model: Any,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float32 logits ``[k, v]`` at positions ``(rows[i], cols[i])`` of a forward over ``tokens``
    ``[b, s]`` (see :class:`PositionLogits`)."""
    return PositionLogits(model, tokens, padding_mask=padding_mask)(rows, cols)


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
        h = self.model.tok_embeddings(tokens)
        mask = self._mask(k)[rows]
        for layer in self.model.layers:
            h = layer(h, mask=mask, input_pos=pos)
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


def project_hidden(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a torchtune decoder from its last layer's output ``[..., d]`` (the final
    norm, then the output projection), as :class:`PositionLogits` computes them: at least
    ``MIN_PROJECTED_POSITIONS`` rows at once."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    k = flat.shape[0]
    if 0 < k < MIN_PROJECTED_POSITIONS:
        flat = flat[torch.arange(MIN_PROJECTED_POSITIONS, device=flat.device).clamp(max=k - 1)]
    logits = model.output(model.norm(flat.unsqueeze(0))).float()[0, :k]
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


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


def vocab_size_of(model: Any) -> Optional[int]:
    """Number of output logits of a torchtune or HF model, when it can be read off the weights."""
    if is_hf_model(model):
        return int(model.get_output_embeddings().weight.shape[0])
    output = getattr(model, "output", None)
    weight = getattr(output, "weight", None)
    if weight is None and hasattr(output, "tied_module"):
        weight = output.tied_module.weight
    if weight is None:
        emb = getattr(model, "tok_embeddings", None)
        weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


__all__ = [
    "KVSession",
    "PositionLogits",
    "caches_set_aside",
    "causal_mask_from_padding",
    "is_fsdp_sharded",
    "is_hf_model",
    "is_torchtune_decoder",
    "kv_session",
    "last_logits_of",
    "logits_at",
    "logits_at_positions",
    "logits_of",
    "positions_from_padding",
    "vocab_size_of",
]
