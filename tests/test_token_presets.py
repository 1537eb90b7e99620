"""Every ``confidence.tokens`` preset on the tokenizer it is for (``kit`` on the kit's tokenizer:
tests/test_kit.py): ``llama3_reserved`` and ``digits`` on Llama-3's vocabulary, through torchtune's tokenizer (the
Llama-3 stand-in's ``original/tokenizer.model``) and through Hugging Face tokenizers that name the
reserved tokens as Llama 3.1+ and Llama 3.0's ``tokenizer.json`` do.

The public CaC code's confidence ids are 128245..128255. torchtune names them
``<|reserved_special_token_234..244|>``, HF's Llama 3.1+ files ``_237..247``, HF's Meta-Llama-3 files
``_240..250``; the preset must resolve to the ids whatever the naming.
"""
from __future__ import annotations

import pytest

from entropy_guided_generation.confidence import LLAMA3_RESERVED_IDS, ConfidenceCodec

PUBLIC_IDS = list(range(128245, 128256))  # the public CaC code's ids, written out independently
ENTROPY_ROUND = {"signal": "entropy", "edges": {"scheme": "entropy_round"}}


def preset_codec(preset: str, tokenizer) -> ConfidenceCodec:
    return ConfidenceCodec.from_config({**ENTROPY_ROUND, "tokens": {"preset": preset}}, tokenizer, vocab_size=128_256)


@pytest.fixture(scope="module")
def torchtune_llama3_tokenizer():
    """torchtune's ``llama3_tokenizer`` on the stand-in's tiktoken file (Llama-3's 128,000 regular ranks)."""
    from torchtune.models.llama3 import llama3_tokenizer

    from entropy_guided_generation.kit.llama3_standin import llama3_standin

    return llama3_tokenizer(str(llama3_standin("llama3_2_1b") / "original" / "tokenizer.model"))


def _hf_llama3_specials(version: str) -> list[str]:
    """The names of ids 128000..128255 in HF's ``tokenizer.json``, in id order (from the hub files)."""
    if version == "3.1":  # Llama 3.1 / 3.2 / 3.3
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first = 3
    else:  # Meta-Llama-3
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|reserved_special_token_4|>", "<|eot_id|>"]
        first = 5
    return named + [f"<|reserved_special_token_{first + k}|>" for k in range(256 - len(named))]


def hf_llama3_tokenizer(version: str):
    """A ``PreTrainedTokenizerFast`` with 128,000 regular tokens and Llama 3.x's 256 specials at 128000..128255."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {str(k): k for k in range(11)}
    vocab.update({f"w{k}": k for k in range(11, 128_000)})
    backend = Tokenizer(WordLevel(vocab, unk_token="w11"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in _hf_llama3_specials(version)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009 and len(tokenizer) == 128_256
    return tokenizer


def test_llama3_reserved_preset_resolves_to_the_public_ids_on_torchtunes_llama3_tokenizer(torchtune_llama3_tokenizer):
    codec = preset_codec("llama3_reserved", torchtune_llama3_tokenizer)
    assert codec.token_ids.tolist() == PUBLIC_IDS
    assert codec.token_strings[0] == "<|reserved_special_token_234|>"
    assert codec.token_strings[-1] == "<|reserved_special_token_244|>"


@pytest.mark.parametrize("version, first, last", [("3.1", 237, 247), ("3.0", 240, 250)])
def test_llama3_reserved_preset_resolves_to_the_public_ids_on_hf_llama3_tokenizers(version, first, last):
    tokenizer = hf_llama3_tokenizer(version)
    codec = preset_codec("llama3_reserved", tokenizer)
    assert codec.token_ids.tolist() == PUBLIC_IDS
    assert codec.token_strings == tuple(f"<|reserved_special_token_{k}|>" for k in range(first, last + 1))
    assert tokenizer.convert_ids_to_tokens(PUBLIC_IDS) == list(codec.token_strings)


def test_llama3_reserved_preset_ids_are_the_public_ids():
    assert list(LLAMA3_RESERVED_IDS) == PUBLIC_IDS


def test_llama3_reserved_preset_on_a_tokenizer_without_them_names_every_naming_tried():
    from entropy_guided_generation.kit import load_tokenizer

    with pytest.raises(ValueError, match=r"preset 'llama3_reserved'.*torchtune.*huggingface_llama3_1.*huggingface_llama3.*token_ids"):
        ConfidenceCodec.from_config({**ENTROPY_ROUND, "tokens": {"preset": "llama3_reserved"}}, load_tokenizer())


def test_digits_preset_gives_eleven_single_digit_tokens_on_llama3(torchtune_llama3_tokenizer):
    codec = preset_codec("digits", torchtune_llama3_tokenizer)
    ids = codec.token_ids.tolist()
    assert len(set(ids)) == 11
    assert [torchtune_llama3_tokenizer.decode([i]) for i in ids] == [str(k) for k in range(11)]


def test_digits_preset_on_hf_llama3_vocabulary():
    codec = preset_codec("digits", hf_llama3_tokenizer("3.1"))
    assert codec.token_ids.tolist() == list(range(11))  # this vocabulary's "0".."10" are ids 0..10
