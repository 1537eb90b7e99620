"""Calling a causal LM for logits, whatever its flavour.

The core asks one question of a model: the logits ``[b, s, v]`` for tokens ``[b, s]``, optionally
with padding. Three flavours are accepted without wrappers:

- torchtune ``TransformerDecoder`` (keyword ``mask`` ``[b, s, s_kv]`` and ``input_pos``; chunked
  outputs are concatenated);
- Hugging Face ``PreTrainedModel`` (``attention_mask`` + ``position_ids``; ``.logits``);
- any module ``tokens -> logits`` (called as ``model(tokens)`` when there is no padding).

A torchtune decoder's forward is :func:`hidden_states` (embeddings, then layers) followed by
:func:`project_hidden` (final norm, then output projection); the helpers here that split it compute
logits only at the positions asked for. KV-cached sessions live in
:mod:`~entropy_guided_generation.sessions`, FSDP2 lockstep in :mod:`~entropy_guided_generation.lockstep`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from entropy_guided_generation.lockstep import is_fsdp_sharded, lockstep_width, pad_columns, wanted_anywhere


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


def hidden_states(model: Any, tokens: torch.Tensor, *, mask: Optional[torch.Tensor], input_pos: Optional[torch.Tensor]) -> torch.Tensor:
    """A torchtune decoder's last layer output ``[b, s, d]`` (before the final norm) on ``tokens``
    ``[b, s]``: the embeddings, then every layer under ``mask`` / ``input_pos`` (as in :func:`logits_of`).
    :func:`project_hidden` turns it into logits."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    return h


def logits_of_hidden(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[b, s, v]`` of a torchtune decoder from its last layer's output ``hidden``
    ``[b, s, d]`` (the final norm, then the output projection), as one call at this shape."""
    return model.output(model.norm(hidden)).float()


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
        self.hidden = hidden_states(model, tokens, mask=mask, input_pos=input_pos)

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


def forward_anywhere(model: Any, wanted: bool, tokens: torch.Tensor) -> bool:
    """One round of a data-dependent loop of forwards, kept in step across ranks.

    Returns whether some rank wants a forward this round (``wanted`` is this rank's wish; a
    collective MAX over ranks under :func:`forwards_in_lockstep`, else ``wanted`` itself). When
    another rank wants one and this rank does not, this rank runs an idle no-grad forward of
    ``tokens[:1, :1]`` (``tokens``: any ``[b, s]`` ids) so that every rank joins the same
    parameter all-gathers. Every rank must call it once per round, in the same order.
    """
    anywhere = wanted_anywhere(model, wanted, tokens.device)
    if anywhere and not wanted:
        with torch.no_grad():
            logits_of(model, tokens[:1, :1])
    return anywhere


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
    "MIN_PROJECTED_POSITIONS",
    "PositionLogits",
    "causal_mask_from_padding",
    "forward_anywhere",
    "hidden_states",
    "is_hf_model",
    "is_torchtune_decoder",
    "logits_of",
    "logits_of_hidden",
    "positions_from_padding",
    "project_hidden",
    "vocab_size_of",
]
