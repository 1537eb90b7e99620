"""Confidence tokens a vocabulary lacks: added to the tokenizer, grown into the model's rows.

Most real vocabularies (SmolLM, Mistral, Gemma, Phi) have no reserved tokens to repurpose.
``confidence.tokens: {add: [...]}`` appends the confidence tokens as new special tokens; the model's
input embedding and output projection (tied or not) get one row per new id, initialized by
``interleaving.init_confidence_embeddings`` (``mean`` when unset: a row that was never trained has no
value of its own). The exported checkpoint carries the grown rows, a ``config.json`` whose
``vocab_size`` says so and the tokenizer with the added tokens, so the eval recipe, the decoders and
``transformers.from_pretrained`` load the finetune as it was trained.

Works on torchtune ``TransformerDecoder``s (``tok_embeddings`` + ``output``, a ``TiedLinear`` when tied)
before their weights are loaded: on the meta device under FSDP2 too.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from torchtune.modules import TiedLinear

from entropy_guided_generation.confidence import resolve_token_ids, tokens_to_add
from entropy_guided_generation.modeling import vocab_size_of

# torchtune state-dict keys of the input embedding and of an untied output projection.
EMBEDDING_KEY = "tok_embeddings.weight"
OUTPUT_KEY = "output.weight"


def add_confidence_tokens(confidence_cfg: Optional[Mapping[str, Any]], tokenizer: Any) -> list[int]:
    """Add the tokens ``confidence.tokens: {add: ...}`` names to ``tokenizer`` (those it already has as
    single tokens keep their ids) and return the ids of all of them, in order; ``[]`` without ``add``.

    Raises:
        TypeError: when some are missing and the tokenizer cannot add special tokens (it has no
            ``add_special_tokens``).
    """
    strings = tokens_to_add(confidence_cfg, tokenizer)
    if not strings:
        return []
    try:
        return resolve_token_ids(strings, tokenizer)  # every one exists already (a finetune's own tokenizer)
    except ValueError:
        pass
    if not callable(getattr(tokenizer, "add_special_tokens", None)):
        raise TypeError(
            f"confidence.tokens.add needs a tokenizer that can add special tokens; {type(tokenizer).__name__} cannot. "
            "Use tokenizer._component_=entropy_guided_generation.tokenizing.hf_model_tokenizer over the model's HF "
            "tokenizer folder, or name existing tokens (confidence.tokens: [...] / {preset: ...} / token_ids)"
        )
    return [int(i) for i in tokenizer.add_special_tokens(list(strings))]


def rows_needed(token_ids: list[int], current_rows: int) -> int:
    """Rows the model's vocabulary needs so that every id in ``token_ids`` has one (never fewer than now)."""
    return max([current_rows, *[i + 1 for i in token_ids]])


def grow_state_dict(state_dict: Dict[str, torch.Tensor], num_rows: int) -> list[int]:
    """Append rows to a torchtune state dict's ``tok_embeddings.weight`` (and an untied
    ``output.weight``) until each has ``num_rows``, in place. New rows hold the mean of the trained
    rows (float32 mean, cast back), so a new token starts as an input the model treats as typical.

    Returns:
        The new row ids (empty when nothing grew).

    Raises:
        KeyError: without ``tok_embeddings.weight``. ValueError: when ``num_rows`` is below the rows
            the state dict has (a vocabulary never shrinks).
    """
    if EMBEDDING_KEY not in state_dict:
        raise KeyError(f"no {EMBEDDING_KEY!r} in the model state dict (keys start {sorted(state_dict)[:5]})")
    current = int(state_dict[EMBEDDING_KEY].shape[0])
    if num_rows < current:
        raise ValueError(f"cannot shrink the vocabulary from {current} to {num_rows} rows")
    for key in (EMBEDDING_KEY, OUTPUT_KEY):
        weight = state_dict.get(key)
        if weight is None or int(weight.shape[0]) >= num_rows:
            continue
        mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
        state_dict[key] = torch.cat([weight, mean.expand(num_rows - int(weight.shape[0]), -1)], dim=0)
    return list(range(current, num_rows))


def _embedding_of(model: nn.Module) -> nn.Embedding:
    embedding = getattr(model, "tok_embeddings", None)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no tok_embeddings nn.Embedding (a torchtune TransformerDecoder has)")
    return embedding


def fit_model_vocabulary(model: nn.Module, num_rows: int) -> None:
    """Give a torchtune decoder ``num_rows`` vocabulary rows before its weights are loaded: a new
    ``tok_embeddings`` (and ``output``: re-tied to it when tied, a new ``nn.Linear`` otherwise) on the
    same device and dtype (the meta device under FSDP2). A model that already has ``num_rows`` (any
    model, a torchtune decoder or not) is left as it is. The caller loads a state dict of that size next.

    Raises:
        TypeError: when ``model`` is not shaped like a torchtune ``TransformerDecoder``.
    """
    if vocab_size_of(model) == num_rows:
        return
    embedding = _embedding_of(model)
    weight = embedding.weight
    grown = nn.Embedding(num_rows, embedding.embedding_dim, padding_idx=embedding.padding_idx, device=weight.device, dtype=weight.dtype)
    output = model.output
    model.tok_embeddings = grown
    if isinstance(output, TiedLinear):
        model.output = TiedLinear(grown)
    elif isinstance(output, nn.Linear):
        model.output = nn.Linear(output.in_features, num_rows, bias=output.bias is not None, device=output.weight.device, dtype=output.weight.dtype)
    else:
        raise TypeError(f"cannot grow an output projection of type {type(output).__name__}; expected nn.Linear or TiedLinear")


def grow_model(model: nn.Module, num_rows: int) -> nn.Module:
    """A loaded torchtune decoder grown to ``num_rows`` vocabulary rows in place (new rows: the mean of
    the trained ones, as :func:`grow_state_dict` starts a finetune that added tokens). Returns ``model``."""
    if vocab_size_of(model) == num_rows:
        return model
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    grow_state_dict(state, num_rows)
    fit_model_vocabulary(model, num_rows)
    model.load_state_dict(state)
    return model


def state_dict_rows(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Vocabulary rows of a torchtune state dict (None when it has no input embedding)."""
    weight = state_dict.get(EMBEDDING_KEY)
    return None if weight is None else int(weight.shape[0])


__all__ = [
    "EMBEDDING_KEY",
    "OUTPUT_KEY",
    "add_confidence_tokens",
    "fit_model_vocabulary",
    "grow_model",
    "grow_state_dict",
    "rows_needed",
    "state_dict_rows",
]
