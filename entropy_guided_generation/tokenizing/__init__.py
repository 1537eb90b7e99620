"""Tokenizers: the flavour functions that ask a torchtune or a Hugging Face tokenizer the same
questions (:mod:`.flavours`), and any Hugging Face tokenizer folder as a torchtune model tokenizer
(:mod:`.hf_model`, the ``hf_model_tokenizer`` YAML component).
"""
from entropy_guided_generation.tokenizing.flavours import encode_ids, eos_id_of, is_hf_tokenizer, pad_id_of, stop_ids_of
from entropy_guided_generation.tokenizing.hf_model import (
    PAD_CANDIDATES,
    HFModelTokenizer,
    choose_pad_id,
    hf_model_tokenizer,
)

__all__ = [
    "PAD_CANDIDATES",
    "HFModelTokenizer",
    "choose_pad_id",
    "encode_ids",
    "eos_id_of",
    "hf_model_tokenizer",
    "is_hf_tokenizer",
    "pad_id_of",
    "stop_ids_of",
]
