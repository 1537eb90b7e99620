"""Mode ``full``: every token after the first, prompt included, is followed by its confidence token."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.generation.common import DecodeResult, decode
from entropy_guided_generation.generation.prompt_bins import PromptBinsCache


def generate_full_interleaved(
    model: Any,
    prompt: torch.Tensor,
    *,
    max_generated_tokens: int,
    codec: ConfidenceCodec,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    rng: Optional[torch.Generator] = None,
    max_prompt_passes: Optional[int] = None,
    progress: bool = False,
    positions: str = "sequential",
    prompt_bins: Optional[PromptBinsCache] = None,
) -> DecodeResult:
    """Decode with the prompt interleaved by the training layout's own functions
    (``Interleaving.slots`` + ``compute_bins``), so the same text gives the same tokens as in training.

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
        codec: the confidence codec (from the checkpoint's ``confidence.json``).
        max_prompt_passes: cap on the prompt's fixed-point passes (default: enough to be exact).
        progress: show a progress bar over decode steps.
        positions: the position rule the checkpoint was trained with (``interleaving.positions`` in
            its ``confidence.json``): ``sequential`` or ``shared``.
        prompt_bins: a :class:`~entropy_guided_generation.generation.prompt_bins.PromptBinsCache` kept
            across calls (same model and codec): prompt prefixes seen before keep their exact bins
            instead of being recomputed (few-shot prompts).
    """
    return decode(
        model, prompt, interleaving="full", max_generated_tokens=max_generated_tokens, pad_id=pad_id,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, rng=rng, codec=codec,
        max_prompt_passes=max_prompt_passes, progress=progress, positions=positions,
        prompt_bins=prompt_bins,
    )
