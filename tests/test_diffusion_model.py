"""The kit's trained mask predictor, LLaDA's Monte-Carlo log-likelihood and the lm-eval model ``diffusion``.

The trained predictor is built once per machine through the kit cache (``trained_mask_predictor()``;
the first build trains it, see ``diffusion/train.py``) and shared by these tests.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from diffusion_models import MASK_ID, ScriptedModel
from entropy_guided_generation import kit
from entropy_guided_generation.diffusion import experiments, generate, heldout_problems, monte_carlo_loglikelihood, solve
from entropy_guided_generation.diffusion.mask_predictor import CARD_FILENAME
from entropy_guided_generation.diffusion.pretrained import load_mask_predictor, trained_mask_predictor
from entropy_guided_generation.diffusion.train import EVAL_DECODING

# Measured (torch 2.13 CPU, the shipped predictor, 2 build threads): 12/128 = 0.094 (the card: 0.105 on 200).
# Uniform guessing among the held-out results scores 1/57 = 0.018; the bound keeps a margin below
# the measurement and stays 3x above that chance level.
MIN_HELDOUT_ACCURACY = 0.06
HELDOUT_N = 128


@pytest.fixture(scope="module")
def trained():
    return load_mask_predictor(trained_mask_predictor())


def test_trained_predictor_is_a_safetensors_folder_that_loads_back(trained):
    folder = trained_mask_predictor()
    assert {"config.json", "model.safetensors", CARD_FILENAME} <= {p.name for p in folder.iterdir()}
    model, tokenizer, ids = trained
    again, _, _ = load_mask_predictor(folder)
    tokens = torch.tensor([tokenizer.encode(kit.prompt_of("Ann has 3 shells. How many shells does she have now?"), add_bos=False, add_eos=False) + [ids.mask_id] * 4])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, again(tokens).logits)
    assert not model.training and ids.mask_id == tokenizer.special_tokens[kit.MASK_TOKEN]


def test_trained_predictor_beats_chance_on_heldout_arithmetic(trained):
    model, tokenizer, ids = trained
    problems = heldout_problems(HELDOUT_N)
    result = solve(model, tokenizer, ids, problems, generate, batch_size=64, **EVAL_DECODING)
    results = Counter(p.result for p in problems)
    chance = 1 / len(results)  # a uniform guess among the results that occur
    constant = results.most_common(1)[0][1] / HELDOUT_N  # always answering the most frequent result
    message = (
        f"held-out accuracy {result.accuracy:.3f} on {HELDOUT_N} problems (uniform-guess chance {chance:.3f}, "
        f"best constant answer {constant:.3f}); responses: {result.responses[:3]}"
    )
    assert result.accuracy >= max(MIN_HELDOUT_ACCURACY, 3 * chance), message
    assert result.nfe_per_sample == EVAL_DECODING["steps"]


# ---------------------------------------------------------------- Monte-Carlo log-likelihood


def fixed_distribution_model(logits_row: torch.Tensor) -> ScriptedModel:
    """Predicts the same distribution at every position whatever the input."""
    return ScriptedModel(lambda call, tokens: logits_row.expand(*tokens.shape, -1).clone())


def test_monte_carlo_loglikelihood_is_exact_when_every_token_costs_the_same():
    # Uniform predictions: each masked token costs log V; a copy with x of n masked gives x log V / (x / n).
    model = fixed_distribution_model(torch.zeros(MASK_ID + 1))
    prefix, target = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8, 9, 10])
    estimate = monte_carlo_loglikelihood(model, prefix, target, MASK_ID, mc_num=8, batch_size=4)
    assert estimate == pytest.approx(-5 * math.log(MASK_ID + 1), rel=1e-6)
    assert len(model.inputs) == 2 and all(x.shape == (4, 8) for x in model.inputs)
    assert all(bool((x[:, :3] == prefix).all()) for x in model.inputs), "the prefix is never masked"


def test_monte_carlo_loglikelihood_is_unbiased_for_independent_predictions():
    logits_row = torch.linspace(-2.0, 2.0, MASK_ID + 1)
    log_q = torch.log_softmax(logits_row, dim=-1)
    target = torch.tensor([1, 5, 9, 20])
    generator = torch.Generator().manual_seed(0)
    estimate = monte_carlo_loglikelihood(fixed_distribution_model(logits_row), torch.tensor([2]), target, MASK_ID, mc_num=2048, batch_size=256, generator=generator)
    assert estimate == pytest.approx(float(log_q[target].sum()), rel=0.03)


def test_monte_carlo_loglikelihood_rejects_bad_arguments():
    model = fixed_distribution_model(torch.zeros(MASK_ID + 1))
    with pytest.raises(ValueError, match="mc_num 10 must be a positive multiple of batch_size 4"):
        monte_carlo_loglikelihood(model, torch.tensor([1]), torch.tensor([2]), MASK_ID, mc_num=10, batch_size=4)
    with pytest.raises(ValueError, match=f"contain the mask id {MASK_ID}"):
        monte_carlo_loglikelihood(model, torch.tensor([1]), torch.tensor([MASK_ID]), MASK_ID, mc_num=4, batch_size=4)


# ---------------------------------------------------------------- lm-eval model ``diffusion``


def check_lm_eval_output(out: dict, decoding: str) -> None:
    assert 0.0 <= out["results"]["kit_gsm8k"]["exact_match,strict-match"] <= 1.0, decoding
    samples = out["samples"]["kit_gsm8k"]  # one entry per document and answer filter
    responses = [s["resps"][0][0] for s in samples]
    assert {s["doc_id"] for s in samples} == set(range(LIMIT)) and all(kit.MASK_TOKEN not in r and kit.EOS_TOKEN not in r for r in responses)
    assert any("####" in r for r in responses), f"{decoding}: no response reached an answer: {responses[:2]}"
    # A response is (logprob, is_greedy); lm-eval's samples JSONL writes both as strings.
    scores = [(float(r[0][0]), str(r[0][1])) for s in out["samples"]["kit_arith_choice"] for r in s["resps"]]
    assert len(scores) == 4 * LIMIT and all(math.isfinite(ll) and ll < 0 and greedy == "False" for ll, greedy in scores)


LIMIT = 6
MODEL_ARGS = "decoding={},tta_k=3,tta_temperature_range=0.0:0.5,mc_num=8,mc_batch_size=8,seed=0"


@pytest.mark.slow
def test_lm_eval_diffusion_model_through_the_evaluator_and_our_cli(tmp_path, subprocess_env):
    """Baseline through lm-eval's evaluator, TTA through ``python -m entropy_guided_generation.lm_eval``."""
    import json
    import subprocess
    import sys

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from entropy_guided_generation.lm_eval import register_models

    register_models()  # "diffusion" among them
    folder, tasks = trained_mask_predictor(), kit.tasks_dir()
    baseline = simple_evaluate(
        model="diffusion", model_args=f"pretrained={folder}," + MODEL_ARGS.format("baseline"),
        tasks=["kit_gsm8k", "kit_arith_choice"], limit=LIMIT, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    )
    check_lm_eval_output(baseline, "baseline")
    command = [
        sys.executable, "-m", "entropy_guided_generation.lm_eval", "--model", "diffusion",
        "--model_args", f"pretrained={folder}," + MODEL_ARGS.format("tta"), "--tasks", "kit_gsm8k,kit_arith_choice",
        "--include_path", str(tasks), "--limit", str(LIMIT), "--log_samples", "--output_path", str(tmp_path / "out"),
        "--device", "cpu",
    ]
    run = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results_file = next((tmp_path / "out").rglob("results_*.json"))
    tta = json.loads(results_file.read_text())
    tta["samples"] = {
        task: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in ("kit_gsm8k", "kit_arith_choice")
    }
    check_lm_eval_output(tta, "tta")
    # Log-likelihood does not depend on the decoding (same seed, same Monte-Carlo draws).
    assert tta["results"]["kit_arith_choice"]["acc,none"] == baseline["results"]["kit_arith_choice"]["acc,none"]


def test_lm_eval_diffusion_model_rejects_unknown_arguments():
    from entropy_guided_generation.diffusion.lm_eval_model import DiffusionLM

    with pytest.raises(ValueError, match="unknown decoding 'ddim'; expected one of baseline, tta"):
        DiffusionLM(pretrained=str(trained_mask_predictor()), decoding="ddim")
    with pytest.raises(ValueError, match="unknown model_args tta_kk"):
        DiffusionLM(pretrained=str(trained_mask_predictor()), tta_kk=3)


def test_run_benchmark_compares_baseline_and_tta_and_summarizes_with_a_plot(trained, tmp_path):
    from entropy_guided_generation.diffusion import run_benchmark, summarize

    model, tokenizer, ids = trained
    layout = dict(steps=8, gen_length=16, block_length=8)
    results = run_benchmark(model, tokenizer, thresholds=(2, 3), samples=4, ids=ids, decode_kwargs=layout, progress=False)
    assert list(results) == ["baseline", "tta_k=2", "tta_k=3"]
    assert results["baseline"].nfe_per_sample == 8 and results["tta_k=3"].nfe_per_sample == 8
    assert len(results["tta_k=2"].step_stats["avg_entropy_per_step"]) == 8 and not results["baseline"].step_stats
    table = summarize(results, tmp_path / "tta.png")
    assert (tmp_path / "tta.png").stat().st_size > 0
    assert table.splitlines()[0].split() == ["run", "accuracy", "nfe", "s/sample"] and len(table.splitlines()) == 4


def test_seed_benchmark_names_read_the_ids_off_a_hugging_face_tokenizer(trained, capsys):
    from transformers import AutoTokenizer

    model, tokenizer, ids = trained
    hf_tokenizer = AutoTokenizer.from_pretrained(str(trained_mask_predictor()))
    assert experiments.token_ids_of(model, hf_tokenizer) == ids == experiments.token_ids_of(model, tokenizer)
    assert experiments.run_academic_benchmark is experiments.run_benchmark
    layout = dict(steps=4, gen_length=8, block_length=4)
    results = experiments.run_academic_benchmark(model, hf_tokenizer, thresholds=[2], samples=3, decode_kwargs=layout, progress=False)
    same = experiments.run_benchmark(model, tokenizer, thresholds=[2], samples=3, ids=ids, decode_kwargs=layout, progress=False)
    assert [r.responses for r in results.values()] == [r.responses for r in same.values()]
    table = experiments.analyze_icml_results(results)
    assert capsys.readouterr().out.strip() == table == experiments.summarize(results)
