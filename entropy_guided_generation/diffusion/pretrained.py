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
    complete; else trained on first use (about 3 min on 2 idle CPU cores) and cached in
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
    ids = TokenIds(**card["token_ids"])
    if ids != TokenIds.from_tokenizer(tokenizer, model.config.vocab_size):
        raise ValueError(f"{folder}: the card's token ids {ids} disagree with the tokenizer's {TokenIds.from_tokenizer(tokenizer, model.config.vocab_size)}")
    return model, tokenizer, ids


__all__ = ["SHIPPED_DIR", "SHIPPED_FILES", "load_mask_predictor", "predictor_card", "trained_mask_predictor"]
