"""The kit's tiny mask predictor: a ``transformers`` ModernBERT masked LM (bidirectional attention)
over the kit tokenizer, whose ``<|mask|>`` token is the diffusion mask.

Layout the predictor is trained on and decoded with (one row)::

    [pad ... pad] prompt_of(question) | answer <|im_end|> <|im_end|> ... (response_length tokens)

Prompts of a batch are left-padded with ``<|endoftext|>`` (the model learns to ignore them, so
``model(tokens)`` needs no attention mask); the response is the answer, ``<|im_end|>``, and more
``<|im_end|>`` up to ``response_length`` (LLaDA's SFT fill). ``trained_mask_predictor()`` trains
the kit's predictor once (deterministic, a few minutes on 2 CPU cores) and caches it under
``kit.kit_cache_dir()``; ``python -m entropy_guided_generation.diffusion.train --out DIR`` writes a
copy anywhere.
"""
from __future__ import annotations

import json
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
    sliding window), dropout only in the MLPs, tied input/output embeddings."""
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


# ---------------------------------------------------------------- saving and loading


def save_mask_predictor(model: Any, out_dir: PathLike, card: dict[str, Any]) -> Path:
    """Write ``model`` (fp32 safetensors + ``config.json``), the kit tokenizer files and the card."""
    return save_trained_checkpoint(model, out_dir, card, CARD_FILENAME)


SHIPPED_DIR = Path(__file__).resolve().parents[1] / "kit" / "assets" / "mask_predictor"
SHIPPED_FILES = ("config.json", "model.safetensors", CARD_FILENAME, "vocab.json", "merges.txt", "tokenizer.json")


def trained_mask_predictor() -> Path:
    """The folder of the kit's trained mask predictor.

    The shipped copy (``kit/assets/mask_predictor/``, 2.3 MB; read-only by contract) when it is
    complete; else trained on first use (about 3 min on 2 idle CPU cores) and cached in
    ``<kit cache>/mask-predictor-<hash>``, where the hash covers the training settings and the
    sources of the training code, the predictor and the kit's data. The folder holds
    ``model.safetensors``, ``config.json``, the kit tokenizer files and ``predictor_card.json``
    (settings, seconds, held-out accuracy). Rebuild the shipped copy with
    ``python -m entropy_guided_generation.diffusion.train --out entropy_guided_generation/kit/assets/mask_predictor``.
    """
    if all((SHIPPED_DIR / name).is_file() for name in SHIPPED_FILES):
        return SHIPPED_DIR
    from entropy_guided_generation.diffusion import train

    return train.cached_predictor(train.TrainSettings())


def predictor_card(folder: Optional[PathLike] = None) -> dict[str, Any]:
    """The training record of a predictor folder (default: ``trained_mask_predictor()``): settings,
    token ids, seconds, held-out accuracy."""
    return json.loads((Path(folder or trained_mask_predictor()) / CARD_FILENAME).read_text())


def load_mask_predictor(folder: Optional[PathLike] = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, ids)`` of a predictor folder (default: ``trained_mask_predictor()``), model in eval mode.

    ``model(tokens [b, s]).logits`` is ``[b, s, v]``; ``tokenizer`` is the kit's torchtune tokenizer
    read from the folder; ``ids`` the mask / pad / eos ids recorded on the card.
    """
    from transformers import ModernBertForMaskedLM

    folder = Path(folder) if folder is not None else trained_mask_predictor()
    card = predictor_card(folder)
    model = ModernBertForMaskedLM.from_pretrained(str(folder), dtype=dtype).eval()
    tokenizer = kit.load_tokenizer(folder=folder)
    ids = TokenIds(**card["token_ids"])
    if ids != TokenIds.from_tokenizer(tokenizer, model.config.vocab_size):
        raise ValueError(f"{folder}: the card's token ids {ids} disagree with the tokenizer's {TokenIds.from_tokenizer(tokenizer, model.config.vocab_size)}")
    return model, tokenizer, ids


__all__ = [
    "CARD_FILENAME",
    "PredictorSizes",
    "TokenIds",
    "build_mask_predictor",
    "encode_problem",
    "load_mask_predictor",
    "predictor_card",
    "predictor_config",
    "response_text",
    "save_mask_predictor",
    "trained_mask_predictor",
]
