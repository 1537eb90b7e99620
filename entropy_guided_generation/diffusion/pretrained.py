"""A trained mask predictor on disk: the kit's (the shipped copy, else trained once into the kit
cache), its training card, and loading any predictor folder as ``(model, tokenizer, ids)``.

Above ``train.py``: finding the kit's predictor may train it, and training imports the predictor's
architecture and layout from ``mask_predictor.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.diffusion.mask_predictor import CARD_FILENAME, PathLike, TokenIds
from entropy_guided_generation.diffusion.train import TrainSettings, cached_predictor

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "kit" / "assets" / "mask_predictor"
SHIPPED_FILES = ("config.json", "model.safetensors", CARD_FILENAME, "vocab.json", "merges.txt", "tokenizer.json")


def trained_mask_predictor() -> Path:
    """The folder of the kit's trained mask predictor.

    The shipped copy (``kit/assets/mask_predictor/``, 2.3 MB; read-only by contract) when it is
    complete; else trained on first use (README's "The offline kit" says how long) and cached in
    ``<kit cache>/mask-predictor-<hash>``, where the hash covers the training settings and the
    sources of the training code, the predictor and the kit's data. The folder holds
    ``model.safetensors``, ``config.json``, the kit tokenizer files and ``predictor_card.json``
    (settings, seconds, held-out accuracy). Rebuild the shipped copy with
    ``python -m entropy_guided_generation.diffusion.train --out entropy_guided_generation/kit/assets/mask_predictor``.
    """
    if all((SHIPPED_DIR / name).is_file() for name in SHIPPED_FILES):
        return SHIPPED_DIR
    return cached_predictor(TrainSettings())


def predictor_card(folder: Optional[PathLike] = None) -> dict[str, Any]:
    """The training record of a predictor folder (default: ``trained_mask_predictor()``): settings,
    token ids, seconds, held-out accuracy."""
    return json.loads((Path(folder or trained_mask_predictor()) / CARD_FILENAME).read_text())


def card_token_ids(card: Any, path: PathLike) -> TokenIds:
    """The ``token_ids`` a predictor card records (mask, pad, eos ids and vocabulary size).

    Raises:
        ValueError: naming the card file and the missing or unexpected keys.
    """
    expected = tuple(TokenIds.__dataclass_fields__)
    ids = card.get("token_ids") if isinstance(card, dict) else None
    if not isinstance(ids, dict):
        raise ValueError(f"{path} has no token_ids; expected a mapping with {', '.join(expected)} (diffusion.train writes it)")
    missing, unknown = sorted(set(expected) - set(ids)), sorted(set(ids) - set(expected))
    if missing or unknown:
        found = "; ".join(part for part in (missing and f"missing {missing}", unknown and f"unknown {unknown}") if part)
        raise ValueError(f"{path}: token_ids {found}; expected exactly {', '.join(expected)}")
    return TokenIds(**{key: int(ids[key]) for key in expected})


def load_mask_predictor(folder: Optional[PathLike] = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, ids)`` of a predictor folder (default: ``trained_mask_predictor()``), model in eval mode.

    ``model(tokens [b, s]).logits`` is ``[b, s, v]``; ``tokenizer`` is the kit's torchtune tokenizer
    read from the folder; ``ids`` the mask / pad / eos ids recorded on the card.
    """
    from transformers import ModernBertForMaskedLM  # transformers' model code loads on use (seconds)

    folder = Path(folder) if folder is not None else trained_mask_predictor()
    card = predictor_card(folder)
    model = ModernBertForMaskedLM.from_pretrained(str(folder), dtype=dtype).eval()
    tokenizer = kit.load_tokenizer(folder=folder)
    ids = card_token_ids(card, folder / CARD_FILENAME)
    if ids != TokenIds.from_tokenizer(tokenizer, model.config.vocab_size):
        raise ValueError(f"{folder}: the card's token ids {ids} disagree with the tokenizer's {TokenIds.from_tokenizer(tokenizer, model.config.vocab_size)}")
    return model, tokenizer, ids


__all__ = ["SHIPPED_DIR", "SHIPPED_FILES", "card_token_ids", "load_mask_predictor", "predictor_card", "trained_mask_predictor"]
