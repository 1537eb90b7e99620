"""The lm-eval recipe, through lm-eval's own evaluator: every mode on the kit's generate_until,
multiple_choice and rolling-perplexity tasks; mode none against lm-eval's ``hf`` model; interleaved
scoring against a direct fixed-point forward; decode traces against teacher forcing; config errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import write_confidence_json
from entropy_guided_generation.eleuther_eval import SUMMARY_FILENAME, EleutherEvalRecipeDirect
from entropy_guided_generation.eval import from_config
from entropy_guided_generation.eval.lm import TorchtuneLM
from entropy_guided_generation.generation import DECODERS, generate_plain, register_decoder
from entropy_guided_generation.layout import compute_bins, confidence_slots

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "full", "answer", "marker")
TASKS = ("kit_gsm8k", "kit_arith_choice", "kit_perplexity")
LIMIT = 3
GEN_KWARGS = {"max_gen_toks": 12}
SUMMARY_KEYS = {
    "mode", "marker", "decoder", "task", "filter", "metric", "accuracy", "ece", "auroc", "mean_confidence",
    "num_samples", "decode_tokens", "decode_seconds", "decode_tokens_per_s", "eval_seconds", "calibration",
    "lm_eval_results",
}


def tiny_eval_config(mode: str, output_dir: Path, **overrides):
    """configs/tiny/eval_<mode>.yaml with a small limit and short generations."""
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / f"eval_{mode}.yaml")
    cfg.merge_with({"output_dir": str(output_dir), "limit": LIMIT, "batch_size": 4, "gen_kwargs": GEN_KWARGS,
                    "bootstrap_iters": 0, **overrides})
    return cfg


def run_recipe(cfg) -> tuple[EleutherEvalRecipeDirect, dict]:
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    return recipe, recipe.evaluate()


# The kit's mixed-format base (trained, confidence tokens seen in pretraining) with edges that spread
# its entropies: bins vary, so the comparisons of bins below compare more than one value.
SPREAD_EDGES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5]


@pytest.fixture(scope="module")
def checkpoint(kit_cache) -> Path:
    from entropy_guided_generation.kit.train_base import mixed_format_base

    return mixed_format_base("sequential")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint):
    """One recipe run per mode on the kit's mixed-format base (the model each run loads is shared by
    the tests below through ``recipe.lm``)."""
    return {
        mode: run_recipe(tiny_eval_config(
            mode, tmp_path_factory.mktemp(f"eval_{mode}"), checkpointer={"checkpoint_dir": str(checkpoint)},
            confidence={"edges": {"scheme": "explicit", "values": SPREAD_EDGES}, "tokens": {"preset": "kit"}},
        ))
        for mode in MODES
    }


@pytest.fixture(scope="module")
def kit_tokenizer(kit_cache):
    return kit.load_tokenizer()


# ---------------------------------------------------------------- every mode through lm-eval


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_serves_generation_choice_and_rolling_tasks(runs, mode):
    recipe, summary = runs[mode]
    results = summary["lm_eval"]
    assert set(results["results"]) == set(TASKS)
    for task in TASKS:  # one logged sample per document and filter
        assert {s["doc_id"] for s in results["samples"][task]} == set(range(LIMIT)), task
    assert "bits_per_byte,none" in results["results"]["kit_perplexity"]
    assert 0.0 <= results["results"]["kit_arith_choice"]["acc,none"] <= 1.0
    for sample in results["samples"]["kit_gsm8k"]:
        assert "<|conf_" not in sample["resps"][0][0], "a confidence token reached the returned text"
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == mode and summary["decoder"] == mode
    assert summary["decode_tokens"] > 0 and summary["decode_tokens_per_s"] > 0
    written = json.loads((recipe.output_dir / SUMMARY_FILENAME).read_text())
    assert written["mode"] == mode and written["accuracy"] == summary["accuracy"] and written["ece"] == summary["ece"]
    for task in TASKS:
        assert list(recipe.output_dir.glob(f"confidence_traces_{task}_*.jsonl")), task
        assert list(recipe.output_dir.glob(f"samples_{task}_*.jsonl")), task


@pytest.mark.parametrize("mode", MODES)
def test_calibration_accuracy_is_lm_evals_own_metric(runs, mode):
    _, summary = runs[mode]
    rows = summary["calibration"]
    assert {row["task"] for row in rows} == {"kit_gsm8k", "kit_arith_choice"}
    for row in rows:
        lm_eval_value = summary["lm_eval_results"][row["task"]][f"{row['metric']},{row['filter']}"]
        assert row["accuracy"] == pytest.approx(lm_eval_value), row
        assert row["num_samples"] == LIMIT and 0.0 <= row["ece"] <= 1.0
    assert summary["accuracy"] == rows[0]["accuracy"] and summary["ece"] == rows[0]["ece"]


@pytest.mark.parametrize("mode", MODES)
def test_generation_traces_equal_teacher_forced_scores_of_the_generated_text(runs, mode):
    """What the decoder recorded for each answer (bins, token log-probs) is what exact interleaved
    teacher forcing of the same prompt + tokens gives: decoding and scoring see one layout."""
    recipe, summary = runs[mode]
    lm = recipe.lm
    contexts = {s["doc_id"]: s["arguments"][0][0] for s in summary["lm_eval"]["samples"]["kit_gsm8k"]}
    traces = [t for t in lm.traces if t.task == "kit_gsm8k" and t.request_type == "generate_until"]
    assert len(traces) == LIMIT
    scored = lm._score([(lm.tok_encode(contexts[t.doc_id]), t.tokens) for t in traces], disable_tqdm=True)
    for trace, score in zip(traces, scored):
        assert score.bins.tolist() == trace.bins
        torch.testing.assert_close(score.token_logprobs, torch.tensor(trace.logprob, dtype=torch.float32), atol=2e-4, rtol=0)
        if mode == "none":
            assert set(trace.bins) == {-1}
        elif mode in ("full", "answer"):
            is_stop = torch.isin(torch.tensor(trace.tokens), torch.tensor(lm.stop_ids))
            assert all(b >= 0 for b, stop in zip(trace.bins, is_stop.tolist()) if not stop)
    if mode != "none":
        assert len({b for trace in traces for b in trace.bins if b >= 0}) >= 3, "bins barely vary: the comparison would be weak"


# ---------------------------------------------------------------- mode none == lm-eval's hf model


def test_mode_none_equals_lm_evals_hf_model_on_the_same_checkpoint(runs, checkpoint):
    """lm-eval's own ``--model hf`` (HFLM on the kit's HF checkpoint and tokenizer files) gives the same
    generations, log-likelihoods and metrics as our mode none."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _, ours = runs["none"]
    hf = HFLM(pretrained=str(checkpoint), device="cpu", dtype="float32", batch_size=4, max_length=512)
    theirs = simple_evaluate(
        model=hf, tasks=list(TASKS), limit=LIMIT, gen_kwargs=GEN_KWARGS, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(kit.tasks_dir()), include_defaults=False),
    )
    mine = ours["lm_eval"]
    for task in TASKS:
        a = sorted(mine["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        for x, y in zip(a, b):
            assert x["arguments"] == y["arguments"]
            if task == "kit_gsm8k":
                assert x["resps"] == y["resps"]
            elif task == "kit_arith_choice":
                for (ll_x, greedy_x), (ll_y, greedy_y) in ((r[0], s[0]) for r, s in zip(x["resps"], y["resps"])):
                    assert ll_x == pytest.approx(ll_y, abs=1e-3) and greedy_x == greedy_y
            else:
                assert x["resps"][0][0] == pytest.approx(y["resps"][0][0], abs=1e-3)
        for key, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert mine["results"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)


# ---------------------------------------------------------------- interleaved scoring == direct forward


def direct_loglikelihood(model, lm: TorchtuneLM, context: list[int], continuation: list[int]) -> float:
    """Sum of the continuation's content-token log-probs from one forward over the fixed-point
    interleaved sequence (compute_bins run to convergence), confidence ids masked from the softmax."""
    tokens = torch.tensor([context + continuation])
    response = torch.arange(tokens.shape[1]).unsqueeze(0) >= len(context)
    slots = confidence_slots(tokens, mode=lm.mode, response_mask=response, stop_ids=lm.stop_ids, marker_ids=lm.marker_ids)
    fixed = compute_bins(model, tokens, codec=lm.codec, slots=slots, max_passes=int(slots.sum()) + 1)
    assert fixed.converged
    seq = fixed.interleaved.tokens[0]
    with torch.no_grad():
        logits = model(seq.unsqueeze(0))[0]
    content = (~lm.codec.is_confidence_token(seq)).nonzero().squeeze(1)  # positions of plain tokens
    total = 0.0
    for position in content[len(context):].tolist():
        lp = torch.log_softmax(lm.codec.mask_confidence_logits(logits[position - 1]), dim=-1)
        total += float(lp[seq[position]])
    return total


@pytest.mark.parametrize("mode", ["full", "answer", "marker"])
def test_interleaved_loglikelihood_equals_direct_fixed_point_forward(kit_tokenizer, mode):
    # A random model with sharp distributions (the kit's tiny checkpoint is near uniform: one bin).
    from helpers import tiny_decoder

    from entropy_guided_generation.confidence import ConfidenceCodec

    vocab = kit.vocab_size_of()
    codec = ConfidenceCodec.from_config({"edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, kit_tokenizer)
    lm = TorchtuneLM(tiny_decoder(vocab, seed=1, weight_scale=4.0), kit_tokenizer, mode=mode, codec=codec,
                     marker="####" if mode == "marker" else None, batch_size=4, max_seq_length=256)
    reference_model = tiny_decoder(vocab, seed=1, weight_scale=4.0)
    problems = kit.gsm8k_examples(4, seed=3)
    requests = [
        Instance("loglikelihood", {}, (kit.prompt_of(p["question"]), p["answer"]), 0, ("t", i, 1))
        for i, p in enumerate(problems)
    ]
    # Mixed lengths in one batch, one with the answer split after its "####" marker.
    requests[1] = Instance("loglikelihood", {}, (requests[1].args[0] + problems[1]["answer"].split("####")[0] + "####",
                                                  problems[1]["answer"].split("####")[1]), 0, ("t", 1, 1))
    batched = lm.loglikelihood(requests, disable_tqdm=True)
    for request, (logprob, _) in zip(requests, batched):
        context, continuation = lm._encode_request(*request.args)
        expected = direct_loglikelihood(reference_model, lm, context, continuation)
        assert logprob == pytest.approx(expected, abs=5e-4, rel=0)
    traces = [t for t in lm.traces if t.task == "t"]
    assert any(len(set(b for b in t.bins if b >= 0)) > 1 for t in traces), "bins never vary: the test would be weak"


@pytest.mark.parametrize("mode", ["full", "answer", "marker"])
def test_generation_decodes_with_the_checkpoints_position_rule(kit_tokenizer, mode):
    from helpers import tiny_decoder

    from entropy_guided_generation.confidence import ConfidenceCodec
    from entropy_guided_generation.generation import decode
    from entropy_guided_generation.layout import Interleaving

    codec = ConfidenceCodec.from_config({"edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, kit_tokenizer)
    model = tiny_decoder(kit.vocab_size_of(), seed=1, weight_scale=4.0)
    marker = "####" if mode == "marker" else None
    questions = [kit.prompt_of(p["question"]) for p in kit.gsm8k_examples(2, seed=3)]
    requests = [Instance("generate_until", {}, (q, {"until": ["\n\n"], "max_gen_toks": 8}), 0) for q in questions]
    texts = {}
    for positions in ("sequential", "shared"):
        lm = TorchtuneLM(model, kit_tokenizer, mode=mode, codec=codec, marker=marker, positions=positions,
                         batch_size=2, max_seq_length=256, enable_kv_cache=False)
        texts[positions] = lm.generate_until(requests, disable_tqdm=True)
        interleaving = Interleaving.for_tokenizer(mode, kit_tokenizer, marker, positions)
        for question, text in zip(questions, texts[positions]):
            prompt = torch.tensor([kit_tokenizer.encode(question, add_bos=False, add_eos=False)])
            direct = decode(model, prompt, interleaving=interleaving, max_generated_tokens=8, pad_id=kit_tokenizer.pad_id,
                            temperature=0.0, stop_tokens=list(interleaving.stop_ids), codec=codec, marker=interleaving.marker_ids)
            content = direct.content[0, : int(direct.generated_lengths[0])].tolist()
            assert text == lm.tok_decode(content).split("\n\n")[0]
    assert texts["sequential"] != texts["shared"], "the position rule changes nothing here: the test would be weak"


# ---------------------------------------------------------------- samplers plug in for mode none


def test_sampler_section_calls_the_registered_decoder_with_sampler_config(kit_tokenizer):
    calls = []

    def recording_sampler(model, prompt, *, sampler_config, **kwargs):
        calls.append(sampler_config)
        return generate_plain(model, prompt, **kwargs)

    if "test_recording_sampler" not in DECODERS:
        register_decoder("test_recording_sampler", recording_sampler)
    model = kit.load_torchtune_model(kit.build_tiny_checkpoint("qwen2"), max_seq_len=512)
    requests = [Instance("generate_until", {}, (kit.prompt_of(q), {"until": ["\n\n"], "max_gen_toks": 6}), 0) for q in ("1 + 2 = ?", "Ann has 3 bags.")]
    plain = TorchtuneLM(model, kit_tokenizer, batch_size=2, max_seq_length=512).generate_until(requests, disable_tqdm=True)
    lm = TorchtuneLM(model, kit_tokenizer, sampler={"name": "test_recording_sampler", "alpha": 0.5}, batch_size=2, max_seq_length=512)
    assert lm.decoder_name == "test_recording_sampler"
    assert lm.generate_until(requests, disable_tqdm=True) == plain
    assert calls == [{"alpha": 0.5}]


def test_bad_sampler_sections_fail_clearly(kit_tokenizer):
    model = kit.load_torchtune_model(kit.build_tiny_checkpoint("qwen2"), max_seq_len=512)
    with pytest.raises(ValueError, match="unknown interleaving.mode 'no_such_sampler'; expected one of none"):
        TorchtuneLM(model, kit_tokenizer, sampler={"name": "no_such_sampler"}, max_seq_length=512, enable_kv_cache=False)
    with pytest.raises(ValueError, match="needs a 'name'"):
        TorchtuneLM(model, kit_tokenizer, sampler={"temperature": 0.5}, max_seq_length=512, enable_kv_cache=False)
    with pytest.raises(ValueError, match="max_seq_length 4096 exceeds the model's max_seq_len 512"):
        TorchtuneLM(model, kit_tokenizer, max_seq_length=4096, enable_kv_cache=False)


# ---------------------------------------------------------------- config errors before model work


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(from_config, "load_model", refuse)


def checkpoint_with_confidence_json(folder: Path, tokenizer, mode: str) -> Path:
    """The kit's tiny checkpoint files (linked) plus a confidence.json for ``mode``."""
    from entropy_guided_generation.confidence import ConfidenceCodec

    source = kit.build_tiny_checkpoint("qwen2")
    folder.mkdir(parents=True)
    for file in source.iterdir():
        (folder / file.name).symlink_to(file)
    codec = ConfidenceCodec.from_config({"edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, tokenizer)
    write_confidence_json(folder, codec, mode, None)
    return folder


def test_config_contradicting_confidence_json_fails_before_model_work(tmp_path, kit_tokenizer, no_model_loading):
    folder = checkpoint_with_confidence_json(tmp_path / "ckpt", kit_tokenizer, "answer")
    cfg = tiny_eval_config("full", tmp_path / "out")
    cfg.checkpointer.checkpoint_dir = str(folder)
    recipe = EleutherEvalRecipeDirect(cfg)
    with pytest.raises(ValueError, match=r"'full'.*'answer'|'answer'.*'full'"):
        recipe.setup(cfg)


def test_unknown_mode_and_unknown_keys_fail_before_model_work(tmp_path, no_model_loading):
    cfg = tiny_eval_config("answer", tmp_path / "out")
    cfg.interleaving.mode = "answr"
    with pytest.raises(ValueError, match="unknown interleaving.mode 'answr'; expected one of none, full, answer, marker"):
        EleutherEvalRecipeDirect(cfg).setup(cfg)
    cfg = tiny_eval_config("answer", tmp_path / "out", interleaving={"mode": "answer", "decoder": "x"})
    with pytest.raises(ValueError, match=r"unknown interleaving keys \['decoder'\]"):
        EleutherEvalRecipeDirect(cfg).setup(cfg)
    cfg = tiny_eval_config("answer", tmp_path / "out", sampler={"name": "entropix"})
    with pytest.raises(ValueError, match="selects a decoder for mode none; interleaving.mode is 'answer'"):
        EleutherEvalRecipeDirect(cfg).setup(cfg)
    cfg = tiny_eval_config("answer", tmp_path / "out", max_seq_lenght=3)
    with pytest.raises(ValueError, match=r"unknown eval config keys \['max_seq_lenght'\]"):
        EleutherEvalRecipeDirect(cfg)


# ---------------------------------------------------------------- lm-eval's own gsm8k, tune run (the shipped
# real-model configs: tests/test_real_configs.py)


def test_lm_evals_own_gsm8k_task_runs_on_the_shared_test_file(tmp_path, shared_data):
    """A task YAML that includes lm-eval's installed gsm8k.yaml, pointed at ../shared/data/gsm8k."""
    from entropy_guided_generation.eval.tasks import lm_eval_tasks_dir

    include = tmp_path / "tasks"
    include.mkdir()
    data = shared_data / "gsm8k"
    (include / "gsm8k_shared.yaml").write_text(
        f"include: {json.dumps(str(lm_eval_tasks_dir() / 'gsm8k' / 'gsm8k.yaml'))}\n"
        "task: gsm8k_shared\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {json.dumps(str(data / 'train.jsonl'))}\n    test: {json.dumps(str(data / 'test.jsonl'))}\n"
    )
    cfg = tiny_eval_config("answer", tmp_path / "out", include_path=str(include), tasks=["gsm8k_shared"], num_fewshot=1, limit=2)
    _, summary = run_recipe(cfg)
    samples = summary["lm_eval"]["samples"]["gsm8k_shared"]
    first = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    assert samples[0]["doc"]["question"] == first["question"]
    assert samples[0]["arguments"][0][0].endswith(f"Question: {first['question']}\nAnswer:")
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(summary["lm_eval_results"]["gsm8k_shared"])
    assert summary["task"] == "gsm8k_shared" and summary["num_samples"] == 2


@pytest.mark.slow
def test_tune_run_eval_recipe_on_the_tiny_answer_config(tmp_path, subprocess_env):
    out = tmp_path / "out"
    command = ["tune", "run", "recipes/eleuther_eval.py", "--config", "configs/tiny/eval_answer.yaml",
               f"output_dir={out}", "limit=2", "max_gen_toks=8", "bootstrap_iters=0"]
    env = {**subprocess_env, "PYTHONPATH": "."}
    tune = Path(sys.executable).with_name("tune")
    done = subprocess.run([str(tune), *command[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["mode"] == "answer" and summary["decode_tokens"] > 0
    assert set(summary["lm_eval_results"]) == set(TASKS)
    assert "ECE (10 bins)" in done.stdout + done.stderr
