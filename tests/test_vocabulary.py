"""Confidence tokens a vocabulary lacks: ``confidence.tokens: {add: ...}``, the rows grown into a model
(tied or untied, before its weights load) and the bad inputs that name their fix."""
from __future__ import annotations

import pytest
import torch

from entropy_guided_generation.confidence import ConfidenceCodec, token_strings_from_config, tokens_to_add
from entropy_guided_generation.vocabulary import add_confidence_tokens, fit_model_vocabulary, grow_state_dict, rows_needed

from helpers import tiny_decoder


@pytest.mark.parametrize("tied", [True, False])
def test_a_grown_model_loads_the_grown_state_and_keeps_every_old_logit(tied):
    model = tiny_decoder(64, seed=3, tie_word_embeddings=tied)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new_ids = grow_state_dict(state, 70)
    assert new_ids == list(range(64, 70))
    keys = ["tok_embeddings.weight"] + ([] if tied else ["output.weight"])
    for key in keys:
        old = model.state_dict()[key]
        assert state[key].shape[0] == 70 and torch.equal(state[key][:64], old)
        assert torch.allclose(state[key][64:], old.float().mean(0).expand(6, -1))  # new rows: the mean row
    grown = tiny_decoder(64, seed=9, tie_word_embeddings=tied)
    fit_model_vocabulary(grown, 70)
    grown.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = model(tokens), grown(tokens)
    assert after.shape[-1] == 70
    assert torch.allclose(after[..., :64], before, atol=1e-6)
    if tied:  # the output projection reads the grown embedding
        assert grown.output.tied_module is grown.tok_embeddings


def test_fitting_a_model_to_its_own_rows_changes_nothing():
    model = tiny_decoder(64, seed=3)
    embedding = model.tok_embeddings
    fit_model_vocabulary(model, 64)
    assert model.tok_embeddings is embedding


def test_a_vocabulary_never_shrinks_and_rows_needed_covers_the_added_ids():
    state = tiny_decoder(64).state_dict()
    with pytest.raises(ValueError, match="cannot shrink the vocabulary from 64 to 60 rows"):
        grow_state_dict(dict(state), 60)
    assert rows_needed([64, 65], 64) == 66
    assert rows_needed([10, 11], 64) == 64  # ids inside spare rows (Qwen2.5's padded vocabulary): no growth


def test_add_names_tokens_by_preset_or_list_and_other_mappings_are_refused():
    assert tokens_to_add({"tokens": {"add": "kit"}}) == [f"<|conf_{k}|>" for k in range(11)]
    assert tokens_to_add({"tokens": {"add": ["<a>", "<b>"]}}) == ["<a>", "<b>"]
    assert tokens_to_add({"tokens": {"preset": "kit"}}) == [] and tokens_to_add(None) == []
    assert token_strings_from_config({"preset": "smollm2_unused"})[:2] == ["<repo_name>", "<reponame>"]
    with pytest.raises(ValueError, match=r"~confidence.tokens.preset"):
        token_strings_from_config({"preset": "kit", "add": "kit"})
    with pytest.raises(ValueError, match="unknown confidence.tokens.add 'kitt'"):
        token_strings_from_config({"add": "kitt"})
    with pytest.raises(ValueError, match="a preset name or a list of non-empty strings"):
        token_strings_from_config({"add": ["<a>", ""]})


def test_adding_tokens_needs_a_tokenizer_that_can_and_the_error_names_one():
    class FixedVocabulary:
        def encode(self, text, add_bos=False, add_eos=False):
            return [1, 2]

    with pytest.raises(TypeError, match="tokenizing.hf_model_tokenizer"):
        add_confidence_tokens({"tokens": {"add": "kit"}}, FixedVocabulary())
    assert add_confidence_tokens({"tokens": {"preset": "kit"}}, FixedVocabulary()) == []


def test_adding_tokens_a_fixed_vocabulary_already_has_takes_their_ids(kit_cache):
    from entropy_guided_generation import kit

    tokenizer = kit.load_tokenizer()  # torchtune's Qwen2.5 tokenizer: it cannot add tokens, but has <|conf_k|>
    assert add_confidence_tokens({"tokens": {"add": "kit"}}, tokenizer) == [tokenizer.special_tokens[f"<|conf_{k}|>"] for k in range(11)]


def test_added_tokens_resolve_in_the_codec_after_adding(kit_cache):
    from entropy_guided_generation import kit
    from entropy_guided_generation.tokenizing import hf_model_tokenizer

    tokenizer = hf_model_tokenizer(kit.build_tokenizer())
    before = tokenizer.vocab_size
    ids = add_confidence_tokens({"tokens": {"add": ["<|new_a|>", "<|new_b|>", "<|conf_3|>"]}}, tokenizer)
    assert ids[:2] == [before, before + 1]  # appended
    assert ids[2] == tokenizer.encode("<|conf_3|>", add_bos=False, add_eos=False)[0] < before  # an existing token keeps its id
    codec = ConfidenceCodec.from_config(
        {"edges": {"scheme": "explicit", "values": [1.0, 2.0]}, "tokens": {"add": ["<|new_a|>", "<|new_b|>", "<|conf_3|>"]}}, tokenizer
    )
    assert codec.token_ids.tolist() == ids
