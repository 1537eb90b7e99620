"""The kit's tiny mask predictor: a ``transformers`` ModernBERT masked LM (bidirectional attention)
over the kit tokenizer, whose ``<|mask|>`` token is the diffusion mask.

Layout the predictor is trained on and decoded with (one row)::

    [pad ... pad] prompt_of(question) | answer <|im_end|> <|im_end|> ... (response_length tokens)

Prompts of a batch are left-padded with ``<|endoftext|>`` (the model learns to ignore them, so
``model(tokens)`` needs no attention mask); the response is the answer, ``<|im_end|>``, and more
``<|im_end|>`` up to ``response_length`` (LLaDA's SFT fill). ``pretrained.trained_mask_predictor()``
finds the kit's trained predictor (training it once, deterministically, if the shipped copy is
missing); ``python -m entropy_guided_generation.diffusion.train --out DIR`` writes a copy anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.kit.train_base import save_trained_checkpoint

CARD_FILENAME = "predictor_card.json"
PathLike = Union[str, Path]


@dataclass(frozen=True)
class PredictorSizes:
    """Shape of the ModernBERT mask predictor (``intermediate_size`` is the GLU width; the first
    projection is twice as wide). ``mlp_dropout`` is what ``tta_use_dropout`` perturbs."""

    num_layers: int = 3
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    mlp_dropout: float = 0.1


@dataclass(frozen=True)
class TokenIds:
    """The kit tokenizer ids the predictor's layout uses."""

    mask_id: int
    pad_id: int
    eos_id: int
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int) -> "TokenIds":
        """Read the ids off the kit tokenizer (torchtune ``Qwen2_5Tokenizer``); the mask by its string."""
        if kit.MASK_TOKEN not in tokenizer.special_tokens:
            raise KeyError(f"the tokenizer has no {kit.MASK_TOKEN!r} special token; the mask predictor needs one")
        return cls(tokenizer.special_tokens[kit.MASK_TOKEN], tokenizer.pad_id, tokenizer.eos_id, vocab_size)


def predictor_config(ids: TokenIds, sizes: PredictorSizes):
    """The ``transformers.ModernBertConfig`` of a predictor: every layer attends globally (no
    sliding window), dropout only in the MLPs, tied input/output embeddings; ``mask_token_id`` (as
    LLaDA's config has it) names the diffusion mask, so decoders need no ``mask_id`` argument."""
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=ids.vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        global_attn_every_n_layers=1,
        local_attention=sizes.max_position_embeddings,
        mlp_dropout=sizes.mlp_dropout,
        embedding_dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=ids.pad_id,
        eos_token_id=ids.eos_id,
        mask_token_id=ids.mask_id,
        bos_token_id=None,
        cls_token_id=ids.pad_id,
        sep_token_id=ids.eos_id,
        tie_word_embeddings=True,
        dtype="float32",
    )


def build_mask_predictor(ids: TokenIds, sizes: PredictorSizes = PredictorSizes(), seed: int = 0):
    """A freshly initialised ``ModernBertForMaskedLM`` (fp32, train mode); same seed, same weights."""
    from transformers import ModernBertForMaskedLM

    torch.manual_seed(seed)
    return ModernBertForMaskedLM(predictor_config(ids, sizes)).to(torch.float32)


# ---------------------------------------------------------------- the training layout


def encode_problem(tokenizer: Any, question: str, answer: str, response_length: int) -> tuple[list[int], list[int]]:
    """Prompt ids of ``prompt_of(question)`` and the response: answer ids, then eos up to
    ``response_length`` tokens (at least one eos).

    Raises:
        ValueError: if the answer and its eos do not fit in ``response_length``.
    """
    prompt = tokenizer.encode(kit.prompt_of(question), add_bos=False, add_eos=False)
    answer_ids = tokenizer.encode(answer, add_bos=False, add_eos=False)
    if len(answer_ids) + 1 > response_length:
        raise ValueError(f"answer of {len(answer_ids)} tokens + eos does not fit response_length {response_length}: {answer!r}")
    return prompt, answer_ids + [tokenizer.eos_id] * (response_length - len(answer_ids))


def response_text(tokenizer: Any, response: Sequence[int], ids: TokenIds) -> str:
    """The text of generated ids up to the first eos / pad / mask (excluded)."""
    stops = {ids.eos_id, ids.pad_id, ids.mask_id}
    cut = next((i for i, t in enumerate(response) if t in stops), len(response))
    return tokenizer.decode(list(response[:cut]))


# ---------------------------------------------------------------- saving (loading: pretrained.py)


def save_mask_predictor(model: Any, out_dir: PathLike, card: dict[str, Any]) -> Path:
    """Write ``model`` (fp32 safetensors + ``config.json``), the kit tokenizer files and the card."""
    return save_trained_checkpoint(model, out_dir, card, CARD_FILENAME)


__all__ = [
    "CARD_FILENAME",
    "PredictorSizes",
    "TokenIds",
    "build_mask_predictor",
    "encode_problem",
    "predictor_config",
    "response_text",
    "save_mask_predictor",
]
