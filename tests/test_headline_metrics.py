"""The numbers users read, recomputed from what the eval recipe wrote, by the few-line references of
tests/references.py, on the kit's mixed-format base (trained on the kit's problems with random
confidence tokens in its rows: its confidences and bins vary, it solves about half of the problems and
writes GSM8K's "####" marker):

- ECE, AUROC and mean confidence of every calibration row, from the samples and confidence-trace files;
- each generated answer's trace (log-probs, bins) against token-by-token interleaved teacher forcing,
  bins agreeing in exactly 100% of the confidence tokens;
- rolling log-likelihoods of interleaved modes against the reference summed over lm-eval's windows;
- the demo's held-out content loss (``loss@0``, ``loss``) against the same reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

from entropy_guided_generation import kit
from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.kit.train_base import mixed_format_base

from references import auroc, ece, geometric_mean_probability, teacher_force_stepwise

REPO_ROOT = Path(__file__).resolve().parents[1]
LIMIT = 8
# The trained base is sure of most tokens: edges from 1e-3 to 1.5 nats spread its bins.
EDGES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5]


def eval_config(mode: str, output_dir: Path, **overrides):
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / f"eval_{mode}.yaml")
    cfg.merge_with({
        "output_dir": str(output_dir), "limit": LIMIT, "batch_size": 8, "max_gen_toks": 40, "bootstrap_iters": 0,
        "tasks": ["kit_gsm8k", "kit_arith_choice"], "checkpointer": {"checkpoint_dir": str(mixed_format_base("sequential"))},
        "confidence": {"signal": "entropy", "edges": {"scheme": "explicit", "values": EDGES}, "tokens": {"preset": "kit"}},
        **overrides,
    })
    return cfg


@pytest.fixture(scope="module")
def answer_run(tmp_path_factory, kit_cache):
    cfg = eval_config("answer", tmp_path_factory.mktemp("eval_answer_trained"))
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    return recipe, recipe.evaluate()


@pytest.fixture(scope="module")
def base_model(kit_cache):
    return kit.load_torchtune_model(mixed_format_base("sequential"), max_seq_len=512)


def read_jsonl(folder: Path, pattern: str) -> list[dict]:
    (path,) = folder.glob(pattern)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_calibration_rows_equal_the_reference_recomputed_from_the_written_files(answer_run):
    recipe, summary = answer_run
    out = recipe.output_dir
    traces = read_jsonl(out, "confidence_traces_kit_gsm8k_*.jsonl")
    first_trace = {}
    for trace in traces:
        if trace["request_type"] == "generate_until":
            first_trace.setdefault(trace["doc_id"], trace)
    rows = {(r["task"], r["filter"], r["metric"]): r for r in summary["calibration"]}
    checked = 0
    for task in ("kit_gsm8k", "kit_arith_choice"):
        samples = read_jsonl(out, f"samples_{task}_*.jsonl")
        for (row_task, filt, metric), row in rows.items():
            if row_task != task:
                continue
            chosen = sorted((s for s in samples if s["filter"] == filt), key=lambda s: s["doc_id"])
            if task == "kit_gsm8k":
                confidence = [geometric_mean_probability(first_trace[s["doc_id"]]["logprob"]) for s in chosen]
            else:  # the chosen answer's probability under a softmax over the choices' log-likelihoods
                confidence = [max(torch.tensor([float(r[0][0]) for r in s["resps"]], dtype=torch.float64).softmax(0).tolist()) for s in chosen]
            correct = [float(s[metric]) for s in chosen]
            assert len(chosen) == LIMIT and 0 < sum(correct) < LIMIT, (task, filt, metric, correct)  # AUROC is defined
            assert row["num_samples"] == LIMIT
            assert row["accuracy"] == pytest.approx(sum(correct) / LIMIT, abs=1e-12)
            assert row["mean_confidence"] == pytest.approx(sum(confidence) / LIMIT, abs=1e-9)
            assert row["ece"] == pytest.approx(ece(confidence, correct), abs=1e-9)
            assert row["auroc"] == pytest.approx(auroc(confidence, correct), abs=1e-12)
            checked += 1
    assert checked >= 3  # gsm8k's two filters and the choice task
    headline = rows[(summary["task"], summary["filter"], summary["metric"])]
    assert (summary["ece"], summary["auroc"], summary["mean_confidence"]) == (headline["ece"], headline["auroc"], headline["mean_confidence"])
    assert len({round(c, 6) for c in confidence}) > 1


def test_generation_traces_equal_token_by_token_teacher_forcing_with_every_bin_agreeing(answer_run, base_model):
    recipe, summary = answer_run
    lm = recipe.lm
    conf_ids = lm.codec.token_ids.tolist()
    contexts = {s["doc_id"]: s["arguments"][0][0] for s in summary["lm_eval"]["samples"]["kit_gsm8k"]}
    traces = [t for t in lm.traces if t.task == "kit_gsm8k" and t.request_type == "generate_until"]
    assert len(traces) == LIMIT
    equal = total = 0
    for trace in traces:
        ref = teacher_force_stepwise(base_model, lm.tok_encode(contexts[trace.doc_id]), trace.tokens, conf_ids=conf_ids,
                                     edges=EDGES, stop_ids=lm.stop_ids)
        torch.testing.assert_close(torch.tensor(trace.logprob), torch.tensor(ref["logprob"]), atol=2e-4, rtol=0)
        equal += sum(a == b for a, b in zip(trace.bins, ref["bins"]) if b >= 0)
        total += sum(b >= 0 for b in ref["bins"])
    assert total > 0 and equal / total == 1.0
    bins = [b for t in traces for b in t.bins if b >= 0]
    assert len(set(bins)) >= 3, f"bins barely vary ({sorted(set(bins))}): the agreement would be weak"


@pytest.mark.parametrize("mode", ["full", "answer"])
def test_interleaved_rolling_loglikelihood_equals_the_reference_over_lm_evals_windows(base_model, mode, kit_cache):
    """A text that fits one window equals the direct sum of its token log-probs; a longer one, with a
    short max_seq_length, equals the reference summed over lm-eval's disjoint windows."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from entropy_guided_generation.confidence import ConfidenceCodec
    from entropy_guided_generation.eval.lm import TorchtuneLM

    tokenizer = kit.load_tokenizer()
    codec = ConfidenceCodec.from_config({"edges": {"scheme": "explicit", "values": EDGES}, "tokens": {"preset": "kit"}}, tokenizer)
    problem = kit.gsm8k_examples(1, seed=5, split="test")[0]
    text = kit.prompt_of(problem["question"]) + problem["answer"]
    tokens = tokenizer.encode(text, add_bos=False, add_eos=False)
    conf_ids = codec.token_ids.tolist()
    for max_seq_length, windows_expected in ((4 * len(tokens), 1), (41, None)):
        lm = TorchtuneLM(base_model, tokenizer, mode=mode, codec=codec, batch_size=4, max_seq_length=max_seq_length,
                         enable_kv_cache=False)
        (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))], disable_tqdm=True)
        window = (max_seq_length - 1) // 2  # two positions per token once interleaved, one context token
        pairs = [make_disjoint_window(p) for p in get_rolling_token_windows(tokens, lm.prefix_token_id, window, 1)]
        if windows_expected:
            assert len(pairs) == 1
        else:
            assert len(pairs) >= 3
        expected = sum(
            sum(teacher_force_stepwise(base_model, ctx, cont, conf_ids=conf_ids, edges=EDGES, prompt_bins=mode == "full",
                                       stop_ids=lm.stop_ids)["logprob"])
            for ctx, cont in pairs
        )
        assert rolling == pytest.approx(expected, abs=5e-4, rel=0), (mode, max_seq_length)
        if windows_expected:
            direct = teacher_force_stepwise(base_model, [lm.prefix_token_id], tokens, conf_ids=conf_ids, edges=EDGES,
                                            prompt_bins=mode == "full", stop_ids=lm.stop_ids)
            assert rolling == pytest.approx(sum(direct["logprob"]), abs=5e-4, rel=0)
            assert len(set(b for b in direct["bins"] if b >= 0)) >= 3


@pytest.mark.parametrize("mode", ["none", "answer"])
def test_heldout_content_loss_equals_the_reference_mean_nll(base_model, mode, kit_cache):
    """The demo's ``loss@0`` / ``loss``: mean NLL of the reference responses (+ EOS) in the mode's layout."""
    from entropy_guided_generation.confidence import ConfidenceCodec
    from entropy_guided_generation.demo_analysis.heldout import GSM8K, heldout_content_loss
    from entropy_guided_generation.layout import Interleaving

    tokenizer = kit.load_tokenizer()
    rows = kit.gsm8k_examples(3, seed=7, split="test")
    codec = None
    if mode != "none":
        codec = ConfidenceCodec.from_config({"edges": {"scheme": "explicit", "values": EDGES}, "tokens": {"preset": "kit"}}, tokenizer)
    interleaving = Interleaving.for_tokenizer(mode, tokenizer)
    found = heldout_content_loss(base_model, tokenizer, rows, GSM8K, interleaving=interleaving, codec=codec, batch_size=2)
    nll, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.encode(GSM8K.prompt(row), add_bos=False, add_eos=False)
        response = tokenizer.encode(GSM8K.response(row), add_bos=False, add_eos=False) + [tokenizer.eos_id]
        if mode == "none":
            with torch.no_grad():
                logp = torch.log_softmax(base_model(torch.tensor([prompt + response]))[0].double(), dim=-1)
            nll -= sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(response))
        else:
            ref = teacher_force_stepwise(base_model, prompt, response, conf_ids=codec.token_ids.tolist(), edges=EDGES,
                                         stop_ids=list(interleaving.stop_ids))
            nll -= sum(ref["logprob"])
        count += len(response)
    assert found == pytest.approx(nll / count, abs=1e-5, rel=0)
    assert 0.005 < found < 2.0  # a trained model: far below ln(vocab) ~ 6.2


def test_marker_eval_on_a_model_that_writes_the_marker_interleaves_exactly_up_to_it(tmp_path, base_model):
    """configs/tiny/eval_marker.yaml on a model that writes "####": each answer's trace has bins up to
    and including the marker and none after it, as token-by-token teacher forcing with the marker gives."""
    cfg = eval_config("marker", tmp_path, tasks=["kit_gsm8k"])
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()
    lm = recipe.lm
    samples = summary["lm_eval"]["samples"]["kit_gsm8k"]
    contexts = {s["doc_id"]: s["arguments"][0][0] for s in samples}
    with_marker = {s["doc_id"] for s in samples if "####" in s["resps"][0][0]}
    assert len(with_marker) >= LIMIT // 2, "the model rarely writes the marker: the test would be weak"
    traces = [t for t in lm.traces if t.task == "kit_gsm8k" and t.request_type == "generate_until"]
    marker_ids = list(lm.marker_ids)
    plain_after_marker = 0
    for trace in traces:
        ref = teacher_force_stepwise(base_model, lm.tok_encode(contexts[trace.doc_id]), trace.tokens, conf_ids=lm.codec.token_ids.tolist(),
                                     edges=EDGES, stop_ids=lm.stop_ids, marker=marker_ids)
        assert trace.bins == ref["bins"], trace.doc_id
        if trace.doc_id in with_marker:
            end = next(k + len(marker_ids) for k in range(len(trace.tokens)) if trace.tokens[k : k + len(marker_ids)] == marker_ids)
            assert all(b >= 0 for b in trace.bins[:end]) and all(b == -1 for b in trace.bins[end:])
            plain_after_marker += len(trace.tokens) - end
    assert plain_after_marker > 0
