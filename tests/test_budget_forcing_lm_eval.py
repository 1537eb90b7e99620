"""Budget forcing through lm-eval: ``python -m entropy_guided_generation.lm_eval --model hf`` (or
``hf-guided``) and ``lm_eval.simple_evaluate`` on built tiny models with a local generate_until task;
without budget-forcing gen_kwargs our ``hf`` writes what lm-eval's own writes, byte for byte."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval.api.registry import get_model
from lm_eval.loggers import EvaluationTracker
from lm_eval.models.huggingface import HFLM

from entropy_guided_generation import kit
from entropy_guided_generation.lm_eval import register_models
from entropy_guided_generation.eval.hf_guided import HFGuidedLM
from test_budget_forcing import ends_at_once_checkpoint, entropy_checkpoint, never_ends_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = "bf_toy"
QUESTIONS = ["Ann has 3 bags. How many?", "7 + 5 =", "Bo has 2 hats and 2 more. How many?"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local generate_until task over three JSONL rows (answer 4 or 12)."""
    folder = tmp_path_factory.mktemp("bf-task")
    rows = [{"question": q, "answer": "4"} for q in QUESTIONS]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'test.jsonl'))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}\\n"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  do_sample: false\n  max_gen_toks: 32\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf-lm-eval-models")
    return {
        "once": ends_at_once_checkpoint(root / "once"),
        "never": never_ends_checkpoint(root / "never"),
        "entropy": entropy_checkpoint(root / "entropy")[0],
        "random": kit.build_tiny_checkpoint(init_std=0.5),
    }


def _evaluate(model: str, checkpoint: Path, task_dir: Path, gen_kwargs: str | None) -> list[dict]:
    """In-process ``simple_evaluate``; the logged samples in document order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    register_models()
    results = lm_eval.simple_evaluate(
        model=model, model_args=f"pretrained={checkpoint},dtype=float32", tasks=[TASK], batch_size=2, device="cpu",
        gen_kwargs=gen_kwargs, log_samples=True, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), bootstrap_iters=0,
    )
    return sorted(results["samples"][TASK], key=lambda s: s["doc_id"])


def _record(sample: dict) -> dict:
    """The one forcing record of a logged sample (in memory: ``arguments`` is a list of
    ``(context, gen_kwargs)``; in the samples file: ``{"gen_args_0": {"arg_0", "arg_1"}}``)."""
    arguments = sample["arguments"]
    gen_kwargs = [a[1] for a in arguments] if isinstance(arguments, list) else [a["arg_1"] for a in arguments.values()]
    (records,) = [g["budget_forcing"] for g in gen_kwargs]
    (record,) = records
    return record


@pytest.mark.slow
def test_cli_model_that_ends_at_once_gets_exactly_n_continuations_then_answers(models, task_dir, tmp_path, subprocess_env):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "entropy_guided_generation.lm_eval",
        "--model", "hf", "--model_args", f"pretrained={models['once']},dtype=float32",  # seed 003's name
        "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "2",
        "--gen_kwargs", "max_gen_toks=32,max_tokens_thinking=auto,thinking_n_ignore=3,thinking_n_ignore_str=Wait,scale_func_name=default",
        "--log_samples", "--output_path", str(out),
    ]
    run = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (samples_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        assert sample["resps"] == [["WaitWaitWait</think>4"]]
        record = _record(sample)
        assert record["continuations"] == 3 and record["rounds"] == 4
        assert record["end_reasons"] == ["delimiter"] * 4
        assert record["answer_tokens"] == 2  # "4" and EOS


def test_model_that_never_ends_stops_at_the_budget_and_answers(models, task_dir):
    samples = _evaluate("hf-guided", models["never"], task_dir, "max_tokens_thinking=5,thinking_n_ignore=2")
    for sample in samples:
        assert sample["resps"] == [["aaaaa</think>4"]]
        record = _record(sample)
        assert record["thinking_tokens"] == 5 and record["end_reasons"] == ["budget"]


def test_entropy_thresholding_through_gen_kwargs(models, task_dir):
    # Rounds have entropies ~[6.1, 6.1, 0, 0]: the whole round is unsure, its last half is not.
    unsure = _evaluate("hf-guided", models["entropy"], task_dir, "thinking_n_ignore=2,scale_func_name=entropy_thresholding,threshold=2.5,max_gen_toks=40")
    sure = _evaluate("hf-guided", models["entropy"], task_dir, "thinking_n_ignore=2,scale_func_name=entropy_thresholding,threshold=2.5,last_k=0.5,max_gen_toks=40")
    assert [_record(s)["continuations"] for s in unsure] == [2] * len(QUESTIONS)
    assert [_record(s)["end_reasons"] for s in sure] == [["scaler"]] * len(QUESTIONS)


def test_hf_guided_without_budget_forcing_kwargs_equals_hf(models, task_dir):
    register_models()
    assert get_model("huggingface") is HFLM  # lm-eval's own class
    plain = _evaluate("huggingface", models["random"], task_dir, None)
    for name in ("hf", "hf-guided"):
        guided = _evaluate(name, models["random"], task_dir, None)
        assert [s["resps"] for s in guided] == [s["resps"] for s in plain]
        assert all("budget_forcing" not in args[1] for s in guided for args in s["arguments"])
    assert any(s["resps"][0][0] for s in plain)  # the comparison is not between empty strings


def _kit_run(model: str, out: Path) -> tuple[dict, dict[str, bytes]]:
    """lm-eval's evaluator on the kit's trained base model over a kit generate_until task and a kit
    multiple-choice task (3 documents each, batches of 2), saved as lm-eval's CLI saves them; the
    per-task results and each task's ``--log_samples`` file."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tracker = EvaluationTracker(output_path=str(out))
    results = lm_eval.simple_evaluate(
        model=model, model_args=f"pretrained={kit.trained_base()},dtype=float32", tasks=["kit_gsm8k", "kit_arith_choice"],
        limit=3, batch_size=2, device="cpu", gen_kwargs="max_gen_toks=48", log_samples=True, bootstrap_iters=0,
        evaluation_tracker=tracker, task_manager=TaskManager(include_path=str(kit.tasks_dir()), include_defaults=False),
    )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    files = {path.name.split("_20")[0]: path.read_bytes() for path in out.rglob("samples_*.jsonl")}
    assert sorted(files) == ["samples_kit_arith_choice", "samples_kit_gsm8k"]
    return results["results"], files


def test_our_hf_without_budget_forcing_kwargs_writes_lm_evals_own_samples_byte_for_byte(tmp_path):
    register_models()
    assert get_model("hf") is HFGuidedLM and get_model("huggingface") is HFLM
    theirs_results, theirs = _kit_run("huggingface", tmp_path / "theirs")
    ours_results, ours = _kit_run("hf", tmp_path / "ours")
    assert ours == theirs
    assert ours_results == theirs_results
    assert b"####" in theirs["samples_kit_gsm8k"]  # the model answers: the comparison is not between empty strings


def test_max_tokens_answer_through_gen_kwargs_gives_the_answer_its_own_budget(models, task_dir):
    # max_gen_toks 6, auto: shared, thinking 4 + "</think>" + 1 answer token; with max_tokens_answer, thinking
    # takes 6 - 1 and the answer has room for "4" and EOS.
    shared = _evaluate("hf", models["never"], task_dir, "max_gen_toks=6,max_tokens_thinking=auto")
    own = _evaluate("hf", models["never"], task_dir, "max_gen_toks=6,max_tokens_thinking=auto,max_tokens_answer=4")
    for sample in shared:
        assert sample["resps"] == [["aaaa</think>4"]]
        assert _record(sample)["thinking_tokens"] == 4 and _record(sample)["answer_tokens"] == 1
    for sample in own:
        assert sample["resps"] == [["aaaaa</think>4"]]
        assert _record(sample)["thinking_tokens"] == 5 and _record(sample)["answer_tokens"] == 2  # "4" and EOS


@pytest.mark.parametrize(
    "gen_kwargs, message",
    [
        ("max_tokens_thinking=5,max_tokens_answer=lots", "max_tokens_answer must be an int >= 1, got 'lots'"),
        ("max_tokens_thinking=5,thinking_n_ignor=2", r"unsupported gen_kwargs \['thinking_n_ignor'\] with budget forcing; expected some of .*thinking_n_ignore"),
    ],
)
def test_bad_gen_kwargs_are_named_through_lm_eval(models, task_dir, gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        _evaluate("hf", models["never"], task_dir, gen_kwargs)


def test_torchtune_model_honors_the_same_gen_kwargs_through_our_eval_adapter(models, task_dir):
    """``TorchtuneLM`` (our eval recipe's lm-eval model) with static KV caches and a short last
    batch gives what ``hf-guided`` gives on the same weights."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from entropy_guided_generation.eval.lm import TorchtuneLM

    gen_kwargs = "max_tokens_thinking=6,thinking_n_ignore=1,max_gen_toks=24"
    lm = TorchtuneLM(kit.load_torchtune_model(models["random"]), kit.load_tokenizer(), batch_size=2, max_seq_length=128, max_gen_toks=24)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], gen_kwargs=gen_kwargs, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    torchtune_samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    hf_samples = _evaluate("hf-guided", models["random"], task_dir, gen_kwargs)
    assert [s["resps"] for s in torchtune_samples] == [s["resps"] for s in hf_samples]
    exact = lambda record: {k: v for k, v in record.items() if k != "round_mean_entropy"}  # noqa: E731
    assert [exact(_record(s)) for s in torchtune_samples] == [exact(_record(s)) for s in hf_samples]
    for t, h in zip(torchtune_samples, hf_samples):
        assert _record(t)["round_mean_entropy"] == pytest.approx(_record(h)["round_mean_entropy"], abs=1e-4)
    assert all(_record(s)["thinking_tokens"] <= 6 for s in torchtune_samples)
