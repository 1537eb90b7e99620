"""Embedding rows for confidence tokens that a base model never trained.

A Llama-3 reserved special token or the kit's ``<|conf_k|>`` enters finetuning with whatever vector
its row holds (random init, or decayed to near zero). Pre-norm layers rescale that vector to full
size, so the first interleaved batches see K arbitrary inputs between every two content tokens and
the content loss starts far above the base model's. ``mean`` initialization (as transformers'
``resize_token_embeddings(mean_resizing=True)`` does for new tokens) gives every confidence row the
mean of the trained rows instead: an input the model already treats as typical.
"""
from __future__ import annotations

from typing import Dict

import torch

from entropy_guided_generation.vocabulary import EMBEDDING_KEY


def mean_embedding_rows(weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` ``[V, d]`` whose rows ``token_ids`` ``[K]`` equal the mean of all other rows.

    The mean is taken in float32 and cast back to ``weight``'s dtype.

    Raises:
        ValueError: when an id lies outside ``[0, V)`` or every row would be replaced.
    """
    vocab = weight.shape[0]
    ids = token_ids.to(torch.long).flatten()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"confidence token ids {ids.tolist()} must lie in [0, {vocab}) (embedding rows)")
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[ids] = False
    if not bool(keep.any()):
        raise ValueError("every embedding row is a confidence token: no trained row to take the mean of")
    mean = weight[keep].float().mean(0).to(weight.dtype)
    out = weight.clone()
    out[ids] = mean
    return out


def init_confidence_embeddings(state_dict: Dict[str, torch.Tensor], token_ids: torch.Tensor, scheme: str) -> None:
    """Apply ``scheme`` (``"mean"``) to the input-embedding rows of ``token_ids`` in a torchtune
    model ``state_dict`` (in place). Tied output projections share these rows; an untied output
    projection keeps its rows (confidence tokens are never targets nor sampled as content).

    Raises:
        ValueError: on an unknown scheme; KeyError when the state dict has no ``tok_embeddings.weight``.
    """
    if scheme != "mean":
        raise ValueError(f"unknown confidence embedding init {scheme!r}; expected 'mean'")
    if EMBEDDING_KEY not in state_dict:
        raise KeyError(f"no {EMBEDDING_KEY!r} in the model state dict (keys start {sorted(state_dict)[:5]})")
    state_dict[EMBEDDING_KEY] = mean_embedding_rows(state_dict[EMBEDDING_KEY], token_ids)


__all__ = ["EMBEDDING_KEY", "init_confidence_embeddings", "mean_embedding_rows"]
