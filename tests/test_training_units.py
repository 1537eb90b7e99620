"""Finetune pieces in-process: datasets keep the response mask, config options, ``kit:`` paths, the
loss step's labels and loss, step checkpoints, confidence metrics, and the shipped configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from entropy_guided_generation.confidence import ConfidenceCodec, encode_text
from entropy_guided_generation.data import (
    BIGBENCH_MISTAKE_TASKS,
    bigbench_mistake_dataset,
    gsm8k_dataset,
    instruct_dataset,
    padded_collate_with_response_mask,
    tokenize_messages_with_response,
    tokenize_prompt_response,
    trace_response,
)
from entropy_guided_generation.layout import FixedPointBins, Interleaved, Interleaving
from entropy_guided_generation.training import checkpointing
from entropy_guided_generation.training.kit_paths import resolve_kit_reference, resolve_kit_references
from entropy_guided_generation.training.loss_step import (
    ConfidenceLayout,
    LossStep,
    check_no_confidence_ids,
    shifted_labels,
    summed_token_loss,
)
from entropy_guided_generation.training.metrics import ConfidenceStats
from entropy_guided_generation.training.config_keys import check_finetune_keys
from entropy_guided_generation.training.data_checks import check_marker_fraction, count_marker_rows
from entropy_guided_generation.training.options import interleaving_options, loop_options, resolve_mode
from entropy_guided_generation.training.parallelism import SingleDevice, parallelism_from_config
from entropy_guided_generation.training.run_dir import config_hash, output_dir_options

from helpers import tiny_decoder

REPO = Path(__file__).resolve().parents[1]
IGNORE = CROSS_ENTROPY_IGNORE_IDX


@pytest.fixture(scope="module")
def tokenizer(kit_cache):
    from entropy_guided_generation.kit.tokenizer import load_tokenizer

    return load_tokenizer(max_seq_len=256)


@pytest.fixture(scope="module")
def codec(tokenizer):
    return ConfidenceCodec.from_config({"edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, tokenizer)


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    from entropy_guided_generation.kit import data

    return data.write_gsm8k_jsonl(tmp_path_factory.mktemp("gsm8k") / "train.jsonl", 6, seed=3, split="train")


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


# ------------------------------------------------------------------ datasets


def test_prompt_response_sample_trains_on_the_response_only(tokenizer):
    sample = tokenize_prompt_response("What is 2 + 3?\n", "2 + 3 = 5\n#### 5", tokenizer)
    prompt = encode_text("What is 2 + 3?\n", tokenizer)
    response = encode_text("2 + 3 = 5\n#### 5", tokenizer) + [tokenizer.eos_id]
    assert sample["tokens"] == prompt + response
    assert sample["response_mask"] == [False] * len(prompt) + [True] * len(response)
    assert sample["labels"] == [IGNORE] * len(prompt) + response
    with_input = tokenize_prompt_response("What is 2 + 3?\n", "5", tokenizer, train_on_input=True)
    assert with_input["labels"] == with_input["tokens"]


def test_chat_response_mask_is_the_assistant_body_not_its_header(tokenizer):
    messages = [
        Message(role="user", content="Ann has 3 pens. She buys 2 more.", masked=True),
        Message(role="assistant", content="3 + 2 = 5\n#### 5", masked=False),
    ]
    sample = tokenize_messages_with_response(messages, tokenizer)
    tokens, masked = tokenizer.tokenize_messages(messages)
    assert sample["tokens"] == tokens
    assert sample["labels"] == [IGNORE if m else t for t, m in zip(tokens, masked)]
    response = [t for t, r in zip(tokens, sample["response_mask"]) if r]
    assert response == encode_text("3 + 2 = 5\n#### 5", tokenizer)
    # The role header "<|im_start|>assistant\n" is trained on (torchtune's labels) but is prompt for the layout.
    header = tokenizer.special_tokens["<|im_start|>"]
    first_response = sample["response_mask"].index(True)
    assert header in tokens[:first_response] and sample["labels"][first_response - 1] != IGNORE


@pytest.mark.parametrize("train_on_input", [False, True])
def test_instruct_dataset_has_torchtunes_tokens_and_labels(tmp_path, tokenizer, train_on_input):
    from torchtune.datasets import instruct_dataset as torchtune_instruct_dataset

    rows = [{"question": f"What is {a} + {b}?", "solution": f"{a} + {b} = {a + b}"} for a, b in [(1, 2), (13, 29), (7, 0)]]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    kwargs = dict(source="json", data_files=str(path), column_map={"input": "question", "output": "solution"}, train_on_input=train_on_input)
    ours = instruct_dataset(tokenizer, **kwargs)
    theirs = torchtune_instruct_dataset(tokenizer, **kwargs)
    assert len(ours) == len(theirs) == 3
    for i, row in enumerate(rows):
        assert ours[i]["tokens"] == theirs[i]["tokens"]
        assert ours[i]["labels"] == theirs[i]["labels"]
        response = [t for t, r in zip(ours[i]["tokens"], ours[i]["response_mask"]) if r]
        assert decode(tokenizer, response) == row["solution"]


def test_gsm8k_dataset_introduces_the_answer_with_the_configured_marker(tokenizer, gsm8k_file):
    plain = gsm8k_dataset(tokenizer, data_files=str(gsm8k_file))
    marked = gsm8k_dataset(tokenizer, data_files=str(gsm8k_file), marker="The answer is:")
    row = json.loads(gsm8k_file.read_text().splitlines()[0])
    text = decode(tokenizer, [t for t, r in zip(marked[0]["tokens"], marked[0]["response_mask"]) if r])
    assert text == " " + row["answer"].replace("####", "The answer is:") + "<|im_end|>"
    assert decode(tokenizer, plain[0]["tokens"]).startswith(f"Question: {row['question']}\nAnswer: ")


def test_gsm8k_answer_without_final_line_is_refused(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(ValueError, match="####"):
        gsm8k_dataset(tokenizer, data_files=str(path))[0]


def test_empty_training_file_is_an_error_naming_it(tmp_path, tokenizer, gsm8k_file):
    """datasets' JSON reader gives a bare StopIteration on a file without rows."""
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"data file {empty} is empty"):
        gsm8k_dataset(tokenizer, data_files=str(empty))
    with pytest.raises(ValueError, match=rf"data file {empty} is empty"):
        instruct_dataset(tokenizer, source="json", data_files={"train": [str(gsm8k_file), str(empty)]})
    with pytest.raises(ValueError, match=rf"data_files \['{gsm8k_file}'\], split 'train'\) has no rows after filter_fn"):
        gsm8k_dataset(tokenizer, data_files=str(gsm8k_file), filter_fn=lambda row: False)


def test_bigbench_mistake_reads_the_five_task_files(shared_data):
    from entropy_guided_generation.kit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(max_seq_len=None)  # whole traces, no truncation
    folder = shared_data / "bigbench_mistake"
    dataset = bigbench_mistake_dataset(tokenizer, data_dir=str(folder), marker="So the answer is:")
    line_counts = {task: len((folder / f"{task}.jsonl").read_text().splitlines()) for task in BIGBENCH_MISTAKE_TASKS}
    assert len(dataset) == sum(line_counts.values())
    first = json.loads((folder / "dyck_languages.jsonl").read_text().splitlines()[0])
    sample = dataset[0]
    response = decode(tokenizer, [t for t, r in zip(sample["tokens"], sample["response_mask"]) if r])
    assert response == trace_response(first["steps"], first["answer"], "So the answer is:") + "<|im_end|>"
    assert response.startswith("Thought 1: ") and "\nThought 2: " in response
    target = bigbench_mistake_dataset(tokenizer, data_dir=str(folder), tasks=["dyck_languages"], answer_field="target")
    assert decode(tokenizer, target[0]["tokens"]).endswith(f"So the answer is: {first['target']}<|im_end|>")
    with pytest.raises(ValueError, match="unknown BIG-Bench Mistake tasks"):
        bigbench_mistake_dataset(tokenizer, data_dir=str(folder), tasks=["dyck"])


def test_collate_right_pads_and_keeps_the_masks():
    batch = padded_collate_with_response_mask(
        [
            {"tokens": [5, 6, 7], "labels": [IGNORE, 6, 7], "response_mask": [False, True, True]},
            {"tokens": [8], "labels": [8], "response_mask": [True]},
        ],
        padding_idx=0,
    )
    assert batch["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["response_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert batch["valid_mask"].tolist() == [[True, True, True], [True, False, False]]
    stock = padded_collate_with_response_mask([{"tokens": [5, 6], "labels": [IGNORE, 6]}])
    assert stock["response_mask"].tolist() == [[False, True]]
    with pytest.raises(ValueError, match="some examples"):
        padded_collate_with_response_mask([{"tokens": [1], "labels": [1]}, {"tokens": [1], "labels": [1], "response_mask": [True]}])


# ------------------------------------------------------------------ options and kit paths


def test_entry_point_and_config_modes_must_agree():
    assert resolve_mode("answer", None) == "answer"
    assert resolve_mode(None, "full") == "full"
    assert resolve_mode("marker", "marker") == "marker"
    with pytest.raises(ValueError, match="entry point trains interleaving.mode 'answer'.*sets interleaving.mode 'full'"):
        resolve_mode("answer", "full")
    with pytest.raises(ValueError, match="no interleaving mode"):
        resolve_mode(None, None)
    with pytest.raises(ValueError, match="unknown interleaving.mode 'answr'"):
        resolve_mode(None, "answr")


def test_interleaving_section_is_checked():
    cfg = OmegaConf.create({"interleaving": {"mode": "marker", "max_passes": 3}})
    with pytest.raises(ValueError, match="needs interleaving.marker"):
        interleaving_options(cfg)
    with pytest.raises(ValueError, match=r"unknown interleaving keys \['passes'\]"):
        interleaving_options(OmegaConf.create({"interleaving": {"passes": 2}}), "full")
    with pytest.raises(ValueError, match="max_passes must be null .* or an int >= 1, got 0"):
        interleaving_options(OmegaConf.create({"interleaving": {"max_passes": 0}}), "full")
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        loop_options(OmegaConf.create({"epochs": 1, "batch_size": 2, "optimizer_in_bwd": True, "gradient_accumulation_steps": 2}))


@pytest.mark.parametrize("value", ["False", "true", 0, 1])
def test_booleans_must_be_real_booleans(value):
    """``resume_from_checkpoint="False"`` would count as True under ``bool()``."""
    base = {"epochs": 1, "batch_size": 2}
    for key in ("resume_from_checkpoint", "shuffle", "compile", "optimizer_in_bwd"):
        with pytest.raises(ValueError, match=rf"{key} must be True or False, got {value!r} \(a {type(value).__name__}\)"):
            loop_options(OmegaConf.create({**base, key: value}))
    with pytest.raises(ValueError, match=rf"overwrite_output_dir must be True or False, got {value!r}"):
        output_dir_options(OmegaConf.create({"overwrite_output_dir": value}))
    with pytest.raises(ValueError, match=rf"fsdp_cpu_offload must be True or False, got {value!r}"):
        parallelism_from_config(OmegaConf.create({"device": "cpu", "fsdp_cpu_offload": value}), distributed=True)
    assert loop_options(OmegaConf.create({**base, "resume_from_checkpoint": False, "shuffle": None})).shuffle is True


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValueError, match="resume_from_checkpoint=True continues .* overwrite_output_dir=True deletes it"):
        output_dir_options(OmegaConf.create({"resume_from_checkpoint": True, "overwrite_output_dir": True}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused_not_replaced_by_the_cpu():
    for distributed in (False, True):
        with pytest.raises(ValueError, match=r"device 'cuda' is not available on this machine"):
            parallelism_from_config(OmegaConf.create({"device": "cuda"}), distributed=distributed)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        parallelism_from_config(OmegaConf.create({"device": "gpu"}), distributed=False)


def test_misspelled_top_level_key_is_refused_naming_it():
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "answer_single_device.yaml")
    cfg.epoch = 3
    with pytest.raises(ValueError, match=r"unknown finetune config keys 'epoch' \(did you mean 'epochs'\?\)"):
        check_finetune_keys(cfg)
    from entropy_guided_generation.training import run_recipe

    with pytest.raises(ValueError, match="unknown finetune config keys 'epoch'"):
        run_recipe(cfg)  # refused before anything is built


def test_overwrite_deletes_only_the_previous_runs_checkpoints(tmp_path):
    from entropy_guided_generation.training.run_dir import OutputDirOptions, claim_output_dir

    for name in ("step_checkpoints/step_00000002", "step_checkpoints/step_00000003.partial", "epoch_0", "logs"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "step_checkpoints" / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"holds another run's checkpoints \(step_checkpoints/step_00000002, step_checkpoints/step_00000003.partial, step_checkpoints/stray.txt, epoch_0\)"):
        claim_output_dir(tmp_path, OutputDirOptions(), is_rank_zero=True, barrier=lambda: None)
    deleted = claim_output_dir(tmp_path, OutputDirOptions(overwrite=True), is_rank_zero=True, barrier=lambda: None)
    assert len(deleted) == 4 and sorted(p.name for p in tmp_path.rglob("*")) == ["logs", "step_checkpoints"]
    assert claim_output_dir(tmp_path, OutputDirOptions(), is_rank_zero=True, barrier=lambda: None) == []


def test_config_hash_ignores_where_and_when_to_save_but_not_what_is_trained():
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "answer_single_device.yaml")
    same = OmegaConf.merge(cfg, {"output_dir": "/elsewhere", "resume_from_checkpoint": True, "stop_after_steps": 3,
                                 "save_every_n_steps": 1, "metric_logger": {"log_dir": "/logs"}})
    assert config_hash(same) == config_hash(cfg) and config_hash(cfg).startswith("cfg-")
    assert config_hash(OmegaConf.merge(cfg, {"optimizer": {"lr": 0.5}})) != config_hash(cfg)


def test_marker_fraction_below_the_minimum_names_marker_and_counts(tokenizer, plain_batch, codec):
    """Counted on collated batches as the recipe does: '####' introduces every GSM8K answer line,
    'The answer is' occurs in no response."""
    for marker, expected in (("####", 4), ("The answer is", 0)):
        layout = ConfidenceLayout(Interleaving.of("marker", stop_ids=tokenizer.stop_tokens, marker_ids=encode_text(marker, tokenizer)), codec, pad_id=tokenizer.pad_id)
        assert count_marker_rows([plain_batch, plain_batch], layout.marker_found) == (2 * expected, 8)
    check_marker_fraction(4, 8, marker="####", marker_ids=[1], min_fraction=0.5)
    check_marker_fraction(0, 8, marker="####", marker_ids=[1], min_fraction=0.0)
    with pytest.raises(ValueError, match=r"interleaving.marker 'Answer:' \(token ids \[7, 8\]\) occurs in the response of only 3 of the first 8 training examples \(38%\), below interleaving.min_marker_fraction 0.5"):
        check_marker_fraction(3, 8, marker="Answer:", marker_ids=[7, 8], min_fraction=0.5)
    with pytest.raises(ValueError, match=r"interleaving.marker must be a string, got \{'So the answer is': None\}"):
        interleaving_options(OmegaConf.from_dotlist(["interleaving.mode=marker", "interleaving.marker=So the answer is:"]))
    with pytest.raises(ValueError, match=r"min_marker_fraction must be a number in \[0, 1\], got 2"):
        interleaving_options(OmegaConf.create({"interleaving": {"mode": "marker", "marker": "####", "min_marker_fraction": 2}}))


def test_kit_references_resolve_to_built_files(kit_cache):
    cfg = OmegaConf.create({"tokenizer": {"path": "kit:tokenizer/vocab.json"}, "out": "${tokenizer.path}", "other": "plain"})
    resolved = resolve_kit_references(cfg)
    assert Path(resolved.tokenizer.path).is_file() and resolved.tokenizer.path.endswith("vocab.json")
    assert resolved.out == resolved.tokenizer.path and resolved.other == "plain"
    with pytest.raises(ValueError, match="unknown kit artifact 'nope'"):
        resolve_kit_reference("kit:nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_kit_reference("kit:tokenizer/missing.txt")


# ------------------------------------------------------------------ the loss step


@pytest.fixture(scope="module")
def plain_batch(tokenizer, gsm8k_file):
    dataset = gsm8k_dataset(tokenizer, data_files=str(gsm8k_file), prompt_template="{question}\n", response_template="{answer}")
    return padded_collate_with_response_mask([dataset[i] for i in range(4)], padding_idx=tokenizer.pad_id)


@pytest.fixture(scope="module")
def sharp_model(tokenizer):
    from entropy_guided_generation.kit.tokenizer import vocab_size_of

    return tiny_decoder(vocab_size_of(), seed=1, weight_scale=4.0)


def layout_for(mode, codec, tokenizer, max_passes=4):
    interleaving = Interleaving.of(
        mode, stop_ids=tokenizer.stop_tokens, marker_ids=encode_text("####", tokenizer) if mode == "marker" else None
    )
    return ConfidenceLayout(interleaving, codec, pad_id=tokenizer.pad_id, max_passes=max_passes)


@pytest.mark.parametrize("mode", ["full", "answer", "marker"])
def test_interleaved_labels_never_target_a_confidence_token(mode, tokenizer, codec, sharp_model, plain_batch):
    built = layout_for(mode, codec, tokenizer).build(sharp_model, plain_batch)
    conf_ids = codec.token_ids
    targets = shifted_labels(built.labels)
    assert not torch.isin(targets, conf_ids).any()
    assert (built.labels[built.is_confidence] == IGNORE).all()
    assert torch.isin(built.tokens[built.is_confidence], conf_ids).all()
    # The plain sequence and its labels survive interleaving unchanged, target for target.
    interleaved: Interleaved = built.bins.interleaved
    assert torch.equal(interleaved.strip(), plain_batch["tokens"])
    moved_labels = built.labels.gather(1, interleaved.plain_index)
    assert torch.equal(moved_labels, plain_batch["labels"])
    assert int((targets != IGNORE).sum()) == int((shifted_labels(plain_batch["labels"]) != IGNORE).sum())
    # Each confidence token sits right after a slot and encodes that slot's bin.
    slot_rows, slot_cols = built.slots.nonzero(as_tuple=True)
    after = interleaved.plain_index[slot_rows, slot_cols] + 1
    assert torch.equal(built.tokens[slot_rows, after], codec.token_ids_for_bins(built.bins.bins[slot_rows, slot_cols]))
    if mode == "answer":
        stops = torch.isin(plain_batch["tokens"], torch.tensor(tokenizer.stop_tokens))
        assert torch.equal(built.slots, plain_batch["response_mask"] & plain_batch["valid_mask"] & ~stops)
    assert len(set(built.bins.bins[built.slots].tolist())) > 1, "the sharp model should spread bins"


def test_summed_loss_equals_cross_entropy_over_targets(tokenizer, codec, sharp_model, plain_batch):
    built = layout_for("answer", codec, tokenizer).build(sharp_model, plain_batch)
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    chunked = CEWithChunkedOutputLoss(num_output_chunks=2)
    sharp_model.set_num_output_chunks(2)
    try:
        ours = summed_token_loss(sharp_model, chunked, built)
    finally:
        sharp_model.set_num_output_chunks(0)
    logits = sharp_model(built.tokens)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), built.labels[:, 1:].reshape(-1), reduction="sum")
    assert int(ours.num_tokens) == int((built.labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(ours.loss, reference, rtol=1e-5, atol=1e-4)


def test_bins_come_from_the_frozen_reference_when_one_is_given(tokenizer, codec, sharp_model, plain_batch):
    """With a reference model the bins are the reference's, not the trained model's; the loss is
    still the trained model's on that layout."""
    from entropy_guided_generation.kit.tokenizer import vocab_size_of

    trained = tiny_decoder(vocab_size_of(), seed=7, weight_scale=4.0)
    layout = layout_for("answer", codec, tokenizer)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    with_reference = LossStep(layout, loss_fn, reference=sharp_model).model_batch(trained, plain_batch)
    online = LossStep(layout, loss_fn).model_batch(trained, plain_batch)
    from_reference = layout.build(sharp_model, plain_batch)
    assert torch.equal(with_reference.tokens, from_reference.tokens)
    assert not torch.equal(online.bins.bins, from_reference.bins.bins), "the two models should bin differently"
    step = LossStep(layout, loss_fn, reference=sharp_model)(trained, plain_batch)
    assert torch.equal(step.loss, summed_token_loss(trained, loss_fn, from_reference).loss)


def test_a_plain_context_reference_forwards_each_row_once(tokenizer, codec, sharp_model, plain_batch):
    """``confidence.context: plain`` with a frozen reference: a row's bins depend on its plain tokens
    alone, so the reference forwards each distinct row once; a row seen again (the next epoch, or in
    another micro-batch) takes its remembered bins, the same as a fresh forward's."""
    import dataclasses

    from entropy_guided_generation.kit.tokenizer import vocab_size_of

    plain = dataclasses.replace(codec, context="plain")
    layout = layout_for("answer", plain, tokenizer, max_passes=None)
    step = LossStep(layout, torch.nn.CrossEntropyLoss(ignore_index=IGNORE), reference=sharp_model)
    trained = tiny_decoder(vocab_size_of(), seed=7, weight_scale=4.0)
    fresh = layout.build(sharp_model, plain_batch)
    assert fresh.bins.passes == 1 and fresh.bins.converged
    first_two = {k: v[:2] for k, v in plain_batch.items()}
    part = step.model_batch(trained, first_two)
    assert part.bins.passes == 1 and len(step.seen) == 2
    calls = []
    handle = sharp_model.tok_embeddings.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        whole = step.model_batch(trained, plain_batch)  # rows 0-1 seen, rows 2-3 new: one forward of 2 rows
        again = step.model_batch(trained, plain_batch)  # every row seen: no forward
    finally:
        handle.remove()
    assert calls == [2] and len(step.seen) == 4
    assert again.bins.passes == 0
    for built in (whole, again):
        assert torch.equal(built.tokens, fresh.tokens) and torch.equal(built.labels, fresh.labels)
        assert torch.equal(built.bins.bins, fresh.bins.bins)
        assert torch.equal(built.bins.signal.nan_to_num(-1.0), fresh.bins.signal.nan_to_num(-1.0))


def test_plain_text_holding_a_confidence_token_is_refused(codec):
    tokens = torch.tensor([[5, 6, int(codec.token_ids[3]), 7]])
    with pytest.raises(ValueError, match=r"row 0 holds confidence token id \d+ at position 2"):
        check_no_confidence_ids(tokens, torch.ones_like(tokens, dtype=torch.bool), codec)
    check_no_confidence_ids(tokens, torch.tensor([[True, True, False, True]]), codec)  # padding may hold anything


def test_confidence_stats_histogram_and_passes():
    stats = ConfidenceStats(num_bins=3, device=torch.device("cpu"))
    slots = torch.tensor([[False, True, True, True]])
    bins = torch.tensor([[-1, 0, 2, 2]])
    signal = torch.tensor([[float("nan"), 0.5, 2.5, 2.0]])
    dummy = Interleaved(*(torch.zeros(1, 1),) * 5, slots)
    stats.add_batch(FixedPointBins(bins, signal, 3, 0.0, True, dummy), slots)
    stats.add_batch(FixedPointBins(bins, signal, 1, float("nan"), False, dummy), slots)
    out = stats.log_dict()
    assert out["conf/passes_mean"] == 2.0 and out["conf/unconverged_fraction"] == 0.5
    assert out["conf/changed_fraction"] == 0.0  # only the batch with >= 2 passes counts
    assert out["conf/signal_mean"] == pytest.approx(5.0 / 3)
    assert [out[f"conf/bin_{k:02d}"] for k in range(3)] == pytest.approx([1 / 3, 0.0, 2 / 3])


# ------------------------------------------------------------------ step checkpoints


def progress_at(step: int) -> checkpointing.TrainingProgress:
    return checkpointing.TrainingProgress(step, 0, step, 0, "answer", 1, 2, 1, None)


def save(root: Path, step: int, weight: torch.Tensor, keep_last: int = 3) -> Path:
    return checkpointing.save_step_checkpoint(
        root,
        progress_at(step),
        parallel=SingleDevice(torch.device("cpu")),
        model_state={"w": weight},
        optimizer_state={"state": {}, "param_groups": []},
        keep_last=keep_last,
    )


def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    root = tmp_path / "step_checkpoints"
    save(root, 1, torch.arange(4.0))
    real_save = torch.save

    def crash_on_optimizer(obj, path, *args, **kwargs):
        if Path(path).name == checkpointing.OPTIMIZER_FILE:
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        save(root, 2, torch.ones(4))
    assert (root / "step_00000002.partial" / checkpointing.MODEL_FILE).is_file()
    latest = checkpointing.latest_step_checkpoint(root)
    assert latest == root / "step_00000001"
    loaded = checkpointing.load_step_checkpoint(latest, rank=0)
    assert torch.equal(loaded.model_state["w"], torch.arange(4.0)) and loaded.progress.global_step == 1
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    save(root, 2, torch.ones(4))
    assert checkpointing.latest_step_checkpoint(root) == root / "step_00000002"
    assert not (root / "step_00000002.partial").exists()


def test_old_step_checkpoints_are_pruned(tmp_path):
    root = tmp_path / "ckpts"
    for step in range(1, 5):
        save(root, step, torch.zeros(1), keep_last=2)
    assert [p.name for p in checkpointing.complete_step_checkpoints(root)] == ["step_00000003", "step_00000004"]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A higher-numbered folder (another timeline) must not make the new save the oldest one."""
    root = tmp_path / "ckpts"
    for step in (20, 3, 4):
        save(root, step, torch.zeros(1), keep_last=2)
    save(root, 5, torch.zeros(1), keep_last=2)
    assert [p.name for p in checkpointing.complete_step_checkpoints(root)] == ["step_00000004", "step_00000005", "step_00000020"]


def test_world_size_change_on_resume_names_both_sizes(tmp_path):
    path = save(tmp_path / "ckpts", 3, torch.zeros(1))  # saved by 1 rank
    with pytest.raises(ValueError, match=r"saved by 1 rank\(s\) and this run has 2; resume with 1 process"):
        checkpointing.load_step_checkpoint(path, rank=1, world_size=2)


@pytest.mark.parametrize("damage", ["truncate_model", "truncate_progress", "drop_rank_file"])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    root = tmp_path / "ckpts"
    save(root, 2, torch.full((4,), 2.0))
    newest = save(root, 3, torch.full((4,), 3.0))
    if damage == "drop_rank_file":
        (newest / checkpointing.rank_file(0)).unlink()
    else:
        name = checkpointing.MODEL_FILE if damage == "truncate_model" else checkpointing.PROGRESS_FILE
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpointing.UnreadableCheckpointError, match=str(newest)):
        checkpointing.load_step_checkpoint(newest, rank=0, world_size=1)
    loaded, skipped = checkpointing.load_newest_readable(root, rank=0, world_size=1)
    assert loaded.path == root / "step_00000002" and torch.equal(loaded.model_state["w"], torch.full((4,), 2.0))
    assert [path for path, _ in skipped] == [newest]
    moved = checkpointing.set_aside(newest)
    assert moved.name == "step_00000003.corrupt" and checkpointing.latest_step_checkpoint(root) == root / "step_00000002"
    (root / "step_00000002" / checkpointing.MODEL_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no step checkpoint under .* is readable: step_00000002: .*model.pt is unreadable"):
        checkpointing.load_newest_readable(root, rank=0, world_size=1)


def test_rng_state_round_trip_replays_the_same_draws():
    state = checkpointing.rng_state()
    first = (torch.rand(3), torch.randint(0, 10**6, (1,)).item())
    checkpointing.set_rng_state(state)
    assert torch.equal(torch.rand(3), first[0]) and torch.randint(0, 10**6, (1,)).item() == first[1]


# ------------------------------------------------------------------ shipped configs

# Training configs only (the eval configs that share these folders belong to the eval recipe).
REAL_CONFIGS = [
    p
    for folder in ("entropy_intl", "bigbench_mistake")
    for p in sorted((REPO / "configs" / folder).glob("*.yaml"))
    if p.stem.endswith(("_single_device", "_distributed"))
]
TINY_CONFIGS = sorted((REPO / "configs" / "tiny").glob("*_single_device.yaml")) + sorted((REPO / "configs" / "tiny").glob("*_distributed.yaml"))
# The kit's real model (tests/test_real_model.py runs each of them through a user command).
SMOLLM2_CONFIGS = sorted(p for p in (REPO / "configs" / "smollm2").glob("*.yaml") if p.stem.endswith(("_single_device", "_distributed")))


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_uses_only_its_recipes_keys(path):
    """Finetune configs through the finetune recipe's key check, eval configs through the eval
    recipe's: no shipped config is refused."""
    from entropy_guided_generation.eval.from_config import check_recipe_keys

    cfg = OmegaConf.load(path)
    if "eval" in path.stem:
        check_recipe_keys(cfg)
        return
    assert path in REAL_CONFIGS + TINY_CONFIGS + SMOLLM2_CONFIGS
    check_finetune_keys(cfg)
    output_dir_options(cfg)


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_model_configs_are_complete(path):
    from torchtune import config as tt_config

    cfg = OmegaConf.load(path)
    for mode in ("full", "answer", "marker"):
        assert interleaving_options(cfg, mode).name == mode
    loop_options(cfg)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    vocab = model.tok_embeddings.num_embeddings
    tokenizer = None
    if "tokens" in cfg.confidence:  # names (the llama3_reserved preset) resolve through Llama 3's real tokenizer format
        from torchtune.models.llama3 import llama3_tokenizer

        from entropy_guided_generation.kit import llama3_standin

        tokenizer = llama3_tokenizer(str(llama3_standin("llama3_2_1b") / "original" / "tokenizer.model"))
    codec = ConfidenceCodec.from_config(cfg.confidence, tokenizer, vocab_size=vocab)
    assert codec.token_ids.tolist() == list(range(128245, 128256))
    assert cfg.checkpointer.model_type in ("LLAMA3", "LLAMA3_2")


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.name)
def test_tiny_configs_name_their_mode(path):
    cfg = OmegaConf.load(path)
    mode = path.name.split("_")[0]
    assert interleaving_options(cfg).name == mode
    loop_options(cfg)
    assert cfg.device == "cpu" and cfg.checkpointer.checkpoint_dir.startswith("kit:")


@pytest.mark.parametrize("mode", ["full", "answer", "marker"])
def test_tiny_distributed_configs_differ_from_single_device_only_in_sharding(mode):
    """The 2-process recipe test runs the marker pair; this keeps the full and answer pairs in step
    with theirs: same model, data, codec and loop, batch halved per rank, FSDP2 keys added."""
    single = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "tiny" / f"{mode}_single_device.yaml"))
    dist = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "tiny" / f"{mode}_distributed.yaml"))
    assert dist.pop("batch_size") * 2 == single.pop("batch_size")
    assert dist.pop("output_dir").endswith(f"{mode}_distributed") and single.pop("output_dir").endswith(f"{mode}_single_device")
    assert single.pop("optimizer_in_bwd") is False
    assert (dist.pop("fsdp_cpu_offload"), dist.pop("fsdp_reshard_after_forward")) == (False, True)
    assert dist == single


# ------------------------------------------------------------------ confidence embedding init
def test_mean_init_gives_confidence_rows_the_mean_of_the_other_rows():
    from entropy_guided_generation.training.embeddings import init_confidence_embeddings

    weight = torch.randn(12, 4)
    state = {"tok_embeddings.weight": weight.clone(), "norm.scale": torch.ones(4)}
    ids = torch.tensor([3, 7, 11])
    init_confidence_embeddings(state, ids, "mean")
    others = [i for i in range(12) if i not in (3, 7, 11)]
    expected = weight[others].mean(0)
    for i in ids.tolist():
        assert torch.allclose(state["tok_embeddings.weight"][i], expected)
    assert torch.equal(state["tok_embeddings.weight"][others], weight[others])


def test_embedding_init_rejects_bad_schemes_and_ids():
    from entropy_guided_generation.training.embeddings import init_confidence_embeddings

    state = {"tok_embeddings.weight": torch.randn(5, 2)}
    with pytest.raises(ValueError, match="unknown confidence embedding init 'zeros'"):
        init_confidence_embeddings(state, torch.tensor([1]), "zeros")
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        init_confidence_embeddings(state, torch.tensor([5]), "mean")
    with pytest.raises(ValueError, match="init_confidence_embeddings 'zero'"):
        interleaving_options(OmegaConf.create({"interleaving": {"mode": "answer", "init_confidence_embeddings": "zero"}}))
    options = interleaving_options(OmegaConf.create({"interleaving": {"mode": "answer", "init_confidence_embeddings": "mean"}}))
    assert options.init_confidence_embeddings == "mean"
