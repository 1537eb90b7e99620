"""A tokenizer's ids and text, whatever its flavour.

torchtune tokenizers have ``encode(text, add_bos, add_eos)``, ``eos_id``, ``pad_id`` and
``stop_tokens``; Hugging Face tokenizers have ``encode(text, add_special_tokens)``,
``eos_token_id`` and ``pad_token_id``. The functions here ask either the same questions, so code
that generates or scores takes both without wrappers.
"""
from __future__ import annotations

from typing import Any, Optional


def is_hf_tokenizer(tokenizer: Any) -> bool:
    """True for Hugging Face tokenizers (subclasses of transformers' ``PreTrainedTokenizerBase``)."""
    return any(cls.__name__ == "PreTrainedTokenizerBase" for cls in type(tokenizer).__mro__)


def eos_id_of(tokenizer: Any) -> Optional[int]:
    """End-of-sequence id: torchtune's ``eos_id`` or Hugging Face's ``eos_token_id`` (None when unset)."""
    value = tokenizer.eos_token_id if is_hf_tokenizer(tokenizer) else getattr(tokenizer, "eos_id", None)
    return None if value is None else int(value)


def pad_id_of(tokenizer: Any) -> int:
    """Padding id: torchtune's ``pad_id``, or Hugging Face's ``pad_token_id`` (its ``eos_token_id`` when
    it has no pad token, as ``transformers``' ``generate`` pads).

    Raises:
        ValueError: if the tokenizer has neither.
    """
    if is_hf_tokenizer(tokenizer):
        value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    else:
        value = getattr(tokenizer, "pad_id", None)
    if value is None:
        raise ValueError(
            f"the {type(tokenizer).__name__} has no pad id (torchtune: pad_id; Hugging Face: pad_token_id or "
            "eos_token_id); left padding needs one"
        )
    return int(value)


def stop_ids_of(tokenizer: Any) -> list[int]:
    """Ids that end a response, sorted: torchtune's ``stop_tokens`` when it has them, else the EOS id."""
    stops = getattr(tokenizer, "stop_tokens", None) if not is_hf_tokenizer(tokenizer) else None
    stops = stops or [eos_id_of(tokenizer)]
    return sorted({int(s) for s in stops if s is not None})


def encode_ids(tokenizer: Any, text: str, *, add_bos: bool) -> list[int]:
    """Ids of ``text``. ``add_bos``: a torchtune tokenizer's BOS (never EOS), or a Hugging Face
    tokenizer's special tokens (``add_special_tokens``: what calling it on a prompt adds)."""
    if is_hf_tokenizer(tokenizer):
        return list(tokenizer.encode(text, add_special_tokens=add_bos))
    return list(tokenizer.encode(text, add_bos=add_bos, add_eos=False))


__all__ = ["encode_ids", "eos_id_of", "is_hf_tokenizer", "pad_id_of", "stop_ids_of"]
