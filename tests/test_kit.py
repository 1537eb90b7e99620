"""The offline kit through the real libraries: tokenizers/torchtune/transformers tokenizers agree,
confidence tokens are atomic, HF and torchtune logits match, the checkpointer round-trips, the
trained base solves held-out problems, data follow the real formats, lm-eval runs the kit tasks."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch

from entropy_guided_generation import kit
from entropy_guided_generation.kit import cache, lm_eval_tasks, train_base
from entropy_guided_generation.kit import tokenizer as kit_tokenizer

# The shipped base reaches 0.52 on these 200 held-out problems (base_card.json; chance is ~0); the floor
# leaves margin for a rebuild on another torch build.
BASE_ACCURACY_FLOOR = 0.4
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return kit.load_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(kit.build_tokenizer()))


def _texts() -> list[str]:
    rows = kit.gsm8k_examples(20, seed=3, split="test")
    traces = kit.bigbench_mistake_examples(5, seed=3)
    return (
        [kit.prompt_of(r["question"]) + r["answer"] for r in rows]
        + ["\n".join([t["input"], *t["steps"]]) for t in traces]
        + ["Ünïcödé ✓ 数学 — naïve café", "  leading and trailing spaces  \n\n\tx", "<think>\nWait</think> Answer: 7"]
    )


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_hf_ids_equal_torchtune_ids(tok, hf_tok):
    for text in _texts():
        ids = tok.encode(text, add_bos=False, add_eos=False)
        assert tok.decode(ids) == text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok.decode(ids) == text


def test_every_confidence_token_is_one_id_and_decodes_back(tok, hf_tok):
    ids = [tok.special_tokens[t] for t in kit.CONFIDENCE_TOKENS]
    qwen_specials = len(kit_tokenizer.special_token_strings()) - len(kit.CONFIDENCE_TOKENS) - 1
    assert ids == list(range(ids[0], ids[0] + 11)), "confidence ids are consecutive"
    assert ids[0] == len(tok.encoder) + qwen_specials, "numbered right after the BPE vocab and Qwen2.5's specials"
    for token, token_id in zip(kit.CONFIDENCE_TOKENS + [kit.MASK_TOKEN, kit.THINK_START, kit.THINK_END], ids + [None] * 3):
        for text in (token, f"12{token} +", f"{token}{token}"):
            encoded = tok.encode(text, add_bos=False, add_eos=False)
            assert encoded.count(tok.special_tokens[token]) == text.count(token)
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == encoded
            assert tok.decode(encoded) == text
        if token_id is not None:
            assert tok.decode([token_id]) == token == hf_tok.convert_ids_to_tokens(token_id)


def test_no_plain_text_encodes_to_an_added_token(tok):
    added = {tok.special_tokens[t] for t in kit_tokenizer.added_token_strings()}
    near_misses = ["<|conf_3", "conf_3|>", "<|conf_11|>", "< |conf_0|>", "<|CONF_0|>", "<|mask", "<think", "/think>", "<|im_end"]
    plain = [t for t in _texts() if not any(a in t for a in kit_tokenizer.added_token_strings())]
    for text in plain + near_misses:
        assert not added & set(tok.encode(text, add_bos=False, add_eos=False)), text


def test_kit_codec_preset_resolves_to_the_kit_confidence_ids(tok):
    from entropy_guided_generation.confidence import ConfidenceCodec

    codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, tokenizer=tok)
    assert codec.token_ids.tolist() == [tok.special_tokens[t] for t in kit.CONFIDENCE_TOKENS]


def test_tokenizer_rebuilt_from_scratch_equals_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    rebuilt = kit.build_tokenizer()
    assert rebuilt.parent == tmp_path
    for name in kit_tokenizer.TOKENIZER_FILES:
        assert (rebuilt / name).read_bytes() == (kit.trained_base() / name).read_bytes(), name


def test_hf_chat_template_is_qwen2_5s_and_renders_torchtunes_chat_ids(tok, hf_tok):
    from torchtune.data import Message

    user = "What number is bigger 9.11 or 9.9?"
    text = hf_tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{kit_tokenizer.QWEN2_5_DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
    # With a system message, Hugging Face's template and torchtune's Qwen2.5 chat format (what
    # datasets with chat: True train on) give the same ids: for a prompt, and for a whole conversation
    # (torchtune ends it with eos = <|im_end|>, the template with <|im_end|> and a newline).
    chat = [("system", "You are a helpful assistant."), ("user", user), ("assistant", "9.9 is bigger.")]
    as_dicts = [{"role": r, "content": c} for r, c in chat]
    prompt = hf_tok.apply_chat_template(as_dicts[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    tt_prompt, _ = tok.tokenize_messages([Message(r, c) for r, c in chat[:2]] + [Message("assistant", "")], add_eos=False)
    assert prompt == tt_prompt
    whole = hf_tok.apply_chat_template(as_dicts, tokenize=True, return_dict=False)
    tt_whole, _ = tok.tokenize_messages([Message(r, c) for r, c in chat], add_eos=True)
    assert whole == tt_whole + tok.encode("\n", add_bos=False, add_eos=False)
    assert hf_tok.mask_token_id == tok.special_tokens[kit.MASK_TOKEN]


# ---------------------------------------------------------------- checkpoints: transformers <-> torchtune


def _random_tokens(vocab_size: int, shape=(2, 96), seed=0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize(
    "arch, sizes, builder",
    [
        ("qwen2", {}, "torchtune.models.qwen2.qwen2"),
        ("llama", {}, "torchtune.models.llama3_2.llama3_2"),
        ("llama", {"tie_word_embeddings": False, "num_layers": 3}, "torchtune.models.llama3_1.llama3_1"),
    ],
)
def test_hf_and_torchtune_logits_match(arch, sizes, builder):
    # init_std 0.2 spreads the logits (std ~1), so a wrong permutation or RoPE would show.
    folder = kit.build_tiny_checkpoint(arch, seed=1, init_std=0.2, **sizes)
    assert kit.torchtune_model_config(folder)["_component_"] == builder
    model = kit.load_torchtune_model(folder)
    tokens = _random_tokens(model.tok_embeddings.num_embeddings)
    with torch.no_grad():
        ours = model(tokens)
    reference = _hf_logits(folder, tokens)
    assert reference.std() > 0.5
    assert (ours - reference).abs().max().item() <= LOGITS_ATOL


def test_trained_base_logits_match_between_transformers_and_torchtune(tok):
    folder = kit.trained_base()
    rows = kit.gsm8k_examples(2, seed=5, split="test")
    encoded = [tok.encode(kit.prompt_of(r["question"]) + r["answer"], add_bos=False, add_eos=True) for r in rows]
    width = min(len(e) for e in encoded)
    tokens = torch.tensor([e[:width] for e in encoded])
    with torch.no_grad():
        ours = kit.load_torchtune_model(folder)(tokens)
    assert (ours - _hf_logits(folder, tokens)).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_checkpointer_save_then_transformers_reload_gives_the_saved_weights(arch, tmp_path):
    from torchtune import training

    folder = kit.build_tiny_checkpoint(arch, seed=2)
    model = kit.load_torchtune_model(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move off the source weights so a reload of the originals would fail
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    checkpointer = training.FullModelHFCheckpointer(**{k: v for k, v in kit.checkpointer_config(folder, tmp_path / "out").items() if k != "_component_"})
    checkpointer.load_checkpoint()  # records the weight map that save_checkpoint writes by
    checkpointer.save_checkpoint({training.MODEL_KEY: model.state_dict()}, epoch=0)
    tokens = _random_tokens(model.tok_embeddings.num_embeddings, seed=1)
    with torch.no_grad():
        ours = model(tokens)
    reloaded = _hf_logits(tmp_path / "out" / "epoch_0", tokens)
    assert (ours - reloaded).abs().max().item() <= LOGITS_ATOL
    assert (ours - _hf_logits(folder, tokens)).abs().max().item() > 1.0


def test_real_llama3_2_config_maps_to_scaled_rope(tmp_path):
    config = {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    built = kit.torchtune_model_config(tmp_path, max_seq_len=4096)
    assert built["_component_"] == "torchtune.models.llama3_2.llama3_2"
    assert (built["scale_factor"], built["rope_base"], built["max_seq_len"], built["num_kv_heads"]) == (32.0, 500000.0, 4096, 8)
    config["rope_scaling"]["low_freq_factor"] = 2.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="low_freq_factor"):
        kit.torchtune_model_config(tmp_path)


def test_bad_checkpoint_requests_name_the_bad_value():
    with pytest.raises(ValueError, match="'gpt2'.*qwen2, llama"):
        kit.build_tiny_checkpoint("gpt2")
    with pytest.raises(ValueError, match="hidden_dim"):
        kit.build_tiny_checkpoint("qwen2", hidden_dim=64)
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        kit.build_tiny_checkpoint("qwen2", num_heads=3)


# ---------------------------------------------------------------- the trained base


def test_trained_base_solves_heldout_problems_above_the_floor(tok):
    folder = kit.trained_base()
    card = kit.base_card()
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == kit.vocab_size_of() and config["eos_token_id"] == tok.eos_id
    accuracy = kit.heldout_accuracy(folder, n=card["heldout_problems"])
    print(f"\ntrained base: held-out accuracy {accuracy:.3f} on {card['heldout_problems']} problems "
          f"(card: {card['heldout_accuracy']:.3f}, trained {card['train_seconds']}s on {card['threads']} threads)")
    assert accuracy == pytest.approx(card["heldout_accuracy"], abs=0.02), "the card describes these weights"
    assert accuracy >= BASE_ACCURACY_FLOOR


def test_base_training_is_deterministic_given_the_seed():
    settings = train_base.TrainSettings(
        steps=3, batch_size=8, num_problems=32, warmup_steps=1,
        sizes={"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64},
    )
    first, _, _ = train_base.train(settings, log_every=0)
    second, _, _ = train_base.train(settings, log_every=0)
    other, _, _ = train_base.train(train_base.TrainSettings(**{**settings.__dict__, "seed": 1}), log_every=0)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))


def test_training_labels_cover_exactly_the_response_and_eos(tok):
    row = kit.gsm8k_examples(1, seed=0)[0]
    tokens, labels = train_base.encode_example(tok, row["question"], row["answer"])
    response = [t for t, l in zip(tokens, labels) if l != train_base.IGNORE_INDEX]
    assert tok.decode(response) == row["answer"] + kit.EOS_TOKEN
    assert tok.decode(tokens[: len(tokens) - len(response)]) == kit.prompt_of(row["question"])


def test_mixed_format_rows_insert_untrained_confidence_tokens(tok):
    settings = train_base.TrainSettings(confidence_rows=0.5, confidence_positions="shared")
    rows = kit.gsm8k_examples(40, seed=0)
    examples = [train_base.encode_example(tok, r["question"], r["answer"]) for r in rows]
    mixed = train_base.mix_confidence_rows(examples, tok, settings)
    conf_ids = {tok.special_tokens[name] for name in kit.CONFIDENCE_TOKENS}
    changed = 0
    for (tokens, labels), (new_tokens, new_labels, is_conf) in zip(examples, mixed):
        # Removing the inserted tokens gives the row back; they are never targets and never follow eos.
        assert [t for t, c in zip(new_tokens, is_conf) if not c] == tokens
        assert [l for l, c in zip(new_labels, is_conf) if not c] == labels
        assert all(t in conf_ids and l == train_base.IGNORE_INDEX for t, l, c in zip(new_tokens, new_labels, is_conf) if c)
        assert new_tokens[-1] == tok.eos_id and not is_conf[0]
        changed += any(is_conf)
    assert 10 <= changed <= 30
    is_conf = torch.tensor([[False, False, True, False, True]])
    assert train_base.position_ids(is_conf, "shared").tolist() == [[0, 1, 1, 2, 2]]
    assert train_base.position_ids(is_conf, "sequential").tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="'nearby'"):
        train_base.position_ids(is_conf, "nearby")


# ---------------------------------------------------------------- data formats

_STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def test_gsm8k_rows_have_correct_steps_and_final_answer():
    for row in kit.gsm8k_examples(300, seed=7, split="train"):
        assert set(row) == {"question", "answer"}
        *steps, last = row["answer"].split("\n")
        assert 1 <= len(steps) <= 3 and last.startswith("#### ")
        previous = None
        for line in steps:
            a, op, b, result = _STEP.match(line).groups()
            assert _OPS[op](int(a), int(b)) == int(result) >= 1
            assert previous is None or int(a) == previous, "each step continues from the last result"
            previous = int(result)
        assert kit.final_answer(row["answer"]) == previous


def test_splits_are_disjoint_and_rows_deterministic(tmp_path):
    train = {r["question"] for r in kit.gsm8k_examples(2000, seed=0, split="train")}
    test = kit.gsm8k_examples(200, seed=1, split="test")
    assert not train & {r["question"] for r in test}
    assert len({r["question"] for r in test}) == 200
    path = kit.write_gsm8k_jsonl(tmp_path / "t.jsonl", 200, seed=1, split="test")
    assert kit.read_jsonl(path) == test
    with pytest.raises(ValueError, match="'dev'"):
        kit.gsm8k_examples(3, split="dev")


def _bbm_step_values(steps: list[str]) -> tuple[list[bool], int]:
    """Which steps compute correctly from the values the trace itself states, and its final value."""
    a = re.search(r"A = \((\d+) ([-+*]) (\d+)\) = (-?\d+)\.", steps[1]).groups()
    b = re.search(r"B = \((\d+) ([-+*]) (\d+)\) = (-?\d+)\.", steps[2]).groups()
    op, va, vb, final = re.search(r"A ([-+]) B = (-?\d+) [-+] (-?\d+) = (-?\d+)\.", steps[3]).groups()
    correct = [True]
    correct.append(_OPS[a[1]](int(a[0]), int(a[2])) == int(a[3]))
    correct.append(_OPS[b[1]](int(b[0]), int(b[2])) == int(b[3]))
    assert (int(va), int(vb)) == (int(a[3]), int(b[3])), "the final step carries the stated values"
    correct.append(_OPS[op](int(va), int(vb)) == int(final))
    return correct, int(final)


def test_bigbench_mistake_rows_mark_the_first_wrong_step(tmp_path):
    rows = kit.read_jsonl(kit.write_bigbench_mistake_jsonl(tmp_path / "bbm.jsonl", 200, seed=2))
    assert 0.3 < sum(r["mistake_index"] is not None for r in rows) / len(rows) < 0.7
    for row in rows:
        assert set(row) == {"input", "steps", "answer", "target", "mistake_index"}
        correct, final = _bbm_step_values(row["steps"])
        assert row["answer"] == str(final) and row["steps"][-1].endswith(f"So the answer is {final}")
        if row["mistake_index"] is None:
            assert all(correct) and row["answer"] == row["target"]
        else:
            assert correct.index(False) == row["mistake_index"] and row["answer"] != row["target"]


# ---------------------------------------------------------------- lm-eval tasks


def test_choice_docs_keep_the_reference_and_change_only_the_result():
    row = {"question": "Q?", "answer": "3 * 4 = 12\n12 + 5 = 17\n#### 17"}
    choices, label = kit.answer_choices(row["question"], row["answer"])
    assert choices[label] == row["answer"] and len(set(choices)) == 4
    assert sorted(kit.final_answer(c) for c in choices) == [16, 17, 18, 19]
    assert all(c.startswith("3 * 4 = 12\n12 + 5 = ") for c in choices)


def test_tasks_accept_the_real_gsm8k_file(shared_data):
    from lm_eval.tasks import TaskManager

    real = shared_data / "gsm8k" / "test.jsonl"
    folder = kit.tasks_dir(data=real)
    tasks = TaskManager(include_path=str(folder)).load(["kit_gsm8k", "kit_arith_choice"])
    flat = {name: task for name, task in _leaf_tasks(tasks)}
    docs = list(flat["kit_gsm8k"].test_docs())
    assert len(docs) == len(kit.read_jsonl(real)) and docs[0]["question"].startswith("Janet")
    choice_doc = flat["kit_arith_choice"].test_docs()[0]
    assert choice_doc["choices"][choice_doc["label"]] == docs[0]["answer"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        kit.tasks_dir(data=shared_data / "missing.jsonl")


def _leaf_tasks(tree):
    from lm_eval.api.task import Task

    items = tree.items() if isinstance(tree, dict) else []
    for key, value in items:
        if isinstance(value, Task):
            yield (key if isinstance(key, str) else key.task_name), value
        else:
            yield from _leaf_tasks(value)


def test_lm_eval_evaluator_runs_the_kit_tasks_on_the_trained_base(tok):
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    limit = 8
    MAX_GEN = 96
    folder = kit.trained_base()
    results = evaluator.simple_evaluate(
        model="huggingface",  # lm-eval's own HFLM (our register_models() takes over "hf")
        model_args=f"pretrained={folder},dtype=float32",
        tasks=list(kit.TASK_NAMES),
        task_manager=TaskManager(include_path=str(kit.tasks_dir())),
        limit=limit,
        batch_size=8,
        device="cpu",
        gen_kwargs={"max_gen_toks": MAX_GEN},
    )["results"]
    test_rows = kit.read_jsonl(lm_eval_tasks.default_task_data()[0])[:limit]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    responses = train_base.greedy_responses(model, tok, [r["question"] for r in test_rows], max_new_tokens=MAX_GEN)
    ours = sum(train_base.answer_or_none(g) == kit.final_answer(r["answer"]) for g, r in zip(responses, test_rows)) / limit
    assert results["kit_gsm8k"]["exact_match,strict-match"] == pytest.approx(ours)
    assert 0.0 <= results["kit_arith_choice"]["acc,none"] <= 1.0
    assert 1.0 < results["kit_perplexity"]["byte_perplexity,none"] < 256.0


# ---------------------------------------------------------------- cache


def test_concurrent_builders_build_once_and_share_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    calls, results = [], []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "payload.txt").write_text("built")

    def worker() -> None:
        results.append(cache.cached_folder("demo", {"x": 1}, build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (results[0] / "payload.txt").read_text() == "built"
    assert cache.cached_folder("demo", {"x": 2}, build) != results[0] and len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"
