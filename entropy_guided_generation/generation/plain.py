"""Mode ``none``: plain generation, token for token what ``torchtune.generation.generate`` gives."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.generation.common import DecodeResult, decode


def generate_plain(
    model: Any,
    prompt: torch.Tensor,
    *,
    max_generated_tokens: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    rng: Optional[torch.Generator] = None,
    codec: Optional[ConfidenceCodec] = None,
    progress: bool = False,
) -> DecodeResult:
    """Generate without confidence tokens.

    Args:
        model: a torchtune ``TransformerDecoder``. KV caches the caller set up are reused (batch
            size must match; they are reset first); otherwise caches are set up for this call.
        prompt: ``[b, p]`` or ``[p]`` prompt ids, left-padded with ``pad_id``.
        max_generated_tokens: content tokens to generate at most (confidence tokens not counted).
        pad_id: padding id (prompt padding, and content after a row stopped).
        temperature: sampling temperature of content tokens; 0 means greedy.
        top_k, top_p: optional top-k / nucleus filters on content tokens.
        stop_tokens: ids that end a row (the stop token is kept; it gets no confidence token).
        rng: ``torch.Generator`` for reproducible sampling.
        codec: optional; when given, confidence ids are never sampled and the result's
            ``entropies`` use the codec's signal distribution (confidence ids masked, tau_H).
        progress: show a progress bar over decode steps.

    Returns:
        :class:`DecodeResult` (``interleaved`` equals ``tokens``; ``bins`` are all -1).
    """
    return decode(
        model, prompt, interleaving="none", max_generated_tokens=max_generated_tokens, pad_id=pad_id,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, rng=rng, codec=codec,
        progress=progress,
    )
