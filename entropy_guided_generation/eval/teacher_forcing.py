"""Log-likelihood of a continuation under interleaved teacher forcing.

The plain sequence is context + continuation; the continuation plays the response. Slots come
from :meth:`~entropy_guided_generation.layout.Interleaving.slots` (a prompt-interleaving mode such
as full interleaves the context too), exact bins from :func:`~entropy_guided_generation.layout.compute_bins` run to its
fixed point, and one more forward on the interleaved sequence gives the logits that produced each
content token. Only content tokens of the continuation are scored; confidence tokens never are.

In the interleaved modes a content token's log-probability is taken under the distribution a
decoder samples content from at temperature 1: the logits with every confidence id masked out.
That makes ``loglikelihood`` the log-probability that our decoder emits the continuation, and
``is_greedy`` what greedy decoding would produce. Plain mode (``none``) scores with the plain softmax,
exactly as lm-eval's ``hf`` model and torchtune's eval recipe do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.fixed_point import compute_bins
from entropy_guided_generation.interleaved import Interleaved, interleave
from entropy_guided_generation.modes import Interleaving
from entropy_guided_generation.modeling import logits_of
from entropy_guided_generation.sessions import caches_set_aside


@dataclass
class ContinuationScores:
    """Scores of a right-padded batch ``[b, n]`` of context + continuation rows.

    Attributes:
        logprob: ``[b]`` sum over the continuation's content tokens of log p(token) (nats).
        is_greedy: ``[b]`` True where every continuation token is the argmax of its distribution.
        token_logprobs: ``[b, n]`` log p of each plain token under the confidence distribution
            (confidence ids masked, logits / tau_H; plain softmax without a codec); NaN off the continuation.
        entropies: ``[b, n]`` entropy (nats) of that distribution; NaN off the continuation.
        bins: ``[b, n]`` bin of the confidence token after plain token t (-1 where none).
        signal: ``[b, n]`` the confidence signal behind each bin (NaN where none).
        passes: fixed-point forwards run (0 when nothing is interleaved).
        converged: True when the bins are exactly those sequential decoding would produce.
    """

    logprob: torch.Tensor
    is_greedy: torch.Tensor
    token_logprobs: torch.Tensor
    entropies: torch.Tensor
    bins: torch.Tensor
    signal: torch.Tensor
    passes: int
    converged: bool


def _check_no_confidence_content(tokens: torch.Tensor, scored: torch.Tensor, codec: ConfidenceCodec) -> None:
    clash = codec.first_confidence_token(tokens, scored)
    if clash is not None:
        row, pos, token_id = clash
        raise ValueError(
            f"continuation row {row} holds confidence token id {token_id} at position {pos}; a "
            "confidence token cannot be content in an interleaved mode (the decoder never emits it as content)"
        )


def _interleaved_layout(
    model: Any,
    tokens: torch.Tensor,
    slots: torch.Tensor,
    valid_mask: torch.Tensor,
    *,
    codec: Optional[ConfidenceCodec],
    pad_id: int,
    max_passes: Optional[int],
    positions: str,
) -> tuple[Interleaved, torch.Tensor, torch.Tensor, int, bool]:
    """``(layout, bins, signal, passes, converged)``: the batch interleaved with fixed-point bins
    (the plain batch, unchanged, when no position is a slot)."""
    if not bool(slots.any()):
        layout = interleave(tokens, slots, torch.full_like(tokens, pad_id), pad_id=pad_id, valid_mask=valid_mask)
        nan = torch.full(tokens.shape, float("nan"), device=tokens.device)
        return layout, torch.full_like(tokens, -1), nan, 0, True
    fixed = compute_bins(
        model, tokens, codec=codec, slots=slots, valid_mask=valid_mask, pad_id=pad_id, max_passes=max_passes,
        positions=positions,
    )
    return fixed.interleaved, fixed.bins, fixed.signal, fixed.passes, fixed.converged


@torch.no_grad()
def score_continuations(
    model: Any,
    tokens: torch.Tensor,
    continuation_mask: torch.Tensor,
    *,
    interleaving: Interleaving,
    codec: Optional[ConfidenceCodec] = None,
    valid_mask: Optional[torch.Tensor] = None,
    pad_id: int = 0,
    max_passes: Optional[int] = None,
) -> ContinuationScores:
    """Teacher-forced log-likelihood of each row's continuation under ``interleaving``.

    Args:
        model: a causal LM (torchtune decoder with or without KV caches set up, or HF model).
        tokens: ``[b, n]`` plain context + continuation ids, right-padded with ``pad_id``.
        continuation_mask: ``[b, n]`` True on continuation tokens (the response).
        interleaving: the mode with its stop ids (never a confidence token) and marker ids, as in
            training and decoding.
        codec: the confidence codec (required unless the mode is plain).
        valid_mask: ``[b, n]`` True on real tokens (default: all).
        max_passes: cap on fixed-point forwards (default: enough to be exact).

    Raises:
        ValueError: on a missing codec, or a confidence id inside a continuation.
    """
    if not interleaving.is_plain and codec is None:
        raise ValueError(f"interleaving.mode {interleaving.name!r} needs a confidence codec to score continuations")
    if valid_mask is None:
        valid_mask = torch.ones_like(tokens, dtype=torch.bool)
    scored = continuation_mask.bool() & valid_mask
    content_codec = None if interleaving.is_plain else codec
    if content_codec is not None:
        _check_no_confidence_content(tokens, scored, content_codec)
    slots = interleaving.slots(tokens, response_mask=scored, valid_mask=valid_mask)
    # Static decode caches (if any) are set aside: whole-sequence forwards attend causally.
    with caches_set_aside(model):
        layout, bins, signal, passes, converged = _interleaved_layout(
            model, tokens, slots, valid_mask, codec=content_codec, pad_id=pad_id, max_passes=max_passes,
            positions=interleaving.positions,
        )
        # The last column's logits predict nothing that is scored: feed one column less.
        input_pos = None
        if not interleaving.positions.is_default:
            input_pos = interleaving.position_ids(layout.valid_mask, layout.is_confidence)[:, :-1]
        logits = logits_of(model, layout.tokens[:, :-1], input_pos=input_pos)
    # Plain token t sits at plain_index[:, t]; the logits that produced it one position earlier.
    producing = (layout.plain_index - 1).clamp(min=0)
    rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1)
    picked = logits[rows, producing]  # [b, n, v]
    if content_codec is not None:
        picked = content_codec.mask_confidence_logits(picked)
    score_lp = torch.log_softmax(picked, dim=-1)
    token_lp = score_lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    greedy = picked.argmax(-1) == tokens

    tau = content_codec.temperature if content_codec is not None else 1.0
    trace_lp = score_lp if tau == 1.0 else signals.log_probs(picked, temperature=tau)
    nan = torch.full_like(token_lp, float("nan"))
    return ContinuationScores(
        logprob=torch.where(scored, token_lp, torch.zeros_like(token_lp)).sum(1),
        is_greedy=(greedy | ~scored).all(1),
        token_logprobs=torch.where(scored, trace_lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), nan),
        entropies=torch.where(scored, signals.entropy_from_log_probs(trace_lp), nan),
        bins=bins,
        signal=signal,
        passes=passes,
        converged=converged,
    )


__all__ = ["ContinuationScores", "score_continuations"]
