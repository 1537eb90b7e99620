"""Bad input and faults on the decode and eval side: every case is a clear error that names the bad
value (row, step, key) and what was expected, never a silent or misleading result."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lm_eval.__main__ import HarnessCLI

from diffusion_models import MASK_ID, PAD_ID, ScriptedModel
from diffusion_models import VOCAB as DIFFUSION_VOCAB
from entropy_guided_generation import kit, signals
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.diffusion import generate, generate_with_tta_uncertainty
from entropy_guided_generation.diffusion.lm_eval_model import DiffusionLM
from entropy_guided_generation.diffusion.pretrained import load_mask_predictor, trained_mask_predictor
from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.eval.from_config import load_yaml, lm_eval_cli_settings, lm_from_model_args
from entropy_guided_generation.layout import Interleaving
from entropy_guided_generation.generation import (
    decode,
    generate_answer_interleaved,
    generate_answer_interleaved_marker,
    generate_full_interleaved,
    generate_plain,
)
from entropy_guided_generation.sampling.budget_forcing import budget_force_torchtune, serve_generate_until
from entropy_guided_generation.sampling.entropix import generate_entropix
from entropy_guided_generation.scoring import SamplingPolicy
from entropy_guided_generation.scoring.sampling_loop import sample_with_policy

from helpers import tiny_decoder

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_NONE = REPO_ROOT / "configs" / "tiny" / "eval_none.yaml"
VOCAB = 64
CONF_IDS = list(range(VOCAB - 11, VOCAB))
EOS, PAD = 1, 0
PROMPT = torch.tensor([[PAD, 5, 9, 12], [22, 3, 4, 7]])


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(VOCAB, seed=5, weight_scale=3.0)


@pytest.fixture(scope="module")
def codec():
    return ConfidenceCodec(signal="entropy", edges=torch.linspace(0.5, 3.5, 10), token_ids=torch.tensor(CONF_IDS))


@contextlib.contextmanager
def nan_row(model, row: int):
    """Make ``model``'s embeddings (hence its logits) NaN in batch row ``row``; every logits path
    (whole forward, KV-cached step, projected positions) starts there, and rows never mix."""

    def poison(module, inputs, output):
        output = output.clone()
        output[row] = float("nan")
        return output

    handle = model.tok_embeddings.register_forward_hook(poison)
    try:
        yield model
    finally:
        handle.remove()


# ---------------------------------------------------------------- non-finite logits


@pytest.mark.parametrize("fn", [signals.entropy, signals.max_prob, signals.varentropy, signals.entropy_and_varentropy])
def test_signal_functions_refuse_nan_logits_naming_row_and_position(fn):
    logits = torch.zeros(2, 3, 8)
    logits[1, 2, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"row 1, position 2, vocab id 4"):
        fn(logits)


def test_signal_functions_refuse_inf_logits():
    logits = torch.zeros(2, 8)
    logits[0, 3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite value \(inf\) at row 0"):
        signals.entropy(logits)


def test_excluded_tokens_at_minus_inf_are_not_an_error_but_an_empty_distribution_is():
    logits = torch.zeros(2, 8)
    logits[0, 5:] = float("-inf")  # removed tokens (a sampler's filter, confidence ids)
    assert torch.isfinite(signals.entropy(logits)).all()
    logits[1] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"no finite value at row 1 \(every logit is -inf\)"):
        signals.entropy(logits)


@pytest.mark.parametrize("mode", ["none", "answer", "marker", "full"])
def test_every_public_decoder_refuses_nan_logits_naming_row(mode, model, codec):
    decoders = {
        "none": lambda m: generate_plain(m, PROMPT, max_generated_tokens=4, pad_id=PAD, temperature=0.0),
        "answer": lambda m: generate_answer_interleaved(m, PROMPT, codec=codec, max_generated_tokens=4, pad_id=PAD),
        "marker": lambda m: generate_answer_interleaved_marker(m, PROMPT, codec=codec, marker=[9], max_generated_tokens=4, pad_id=PAD),
        "full": lambda m: generate_full_interleaved(m, PROMPT, codec=codec, max_generated_tokens=4, pad_id=PAD),
    }
    # Mode full meets the NaN in the prompt's fixed point first; the others at decode step 0.
    where = r"fixed-point logits .* at row 1, position \d" if mode == "full" else r"decode step 0 logits .* at row 1"
    with nan_row(model, 1), pytest.raises(FloatingPointError, match=where):
        decoders[mode](model)


def test_nan_logits_are_named_at_the_step_they_appear(model):
    calls = []

    def poison_third_call(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    handle = model.norm.register_forward_hook(poison_third_call)
    try:
        with pytest.raises(FloatingPointError, match=r"decode step 2 logits"):
            generate_plain(model, PROMPT, max_generated_tokens=5, pad_id=PAD, temperature=0.0)
    finally:
        handle.remove()


def test_entropix_refuses_nan_logits(model):
    with nan_row(model, 0), pytest.raises(FloatingPointError, match=r"decode step 0 logits .* at row 0"):
        generate_entropix(model, PROMPT, max_generated_tokens=3, pad_id=PAD)


def test_scorer_sampling_refuses_nan_logits(model):
    with nan_row(model, 1), pytest.raises(FloatingPointError, match=r"sampling step 0 logits .* at row 1"):
        sample_with_policy(model, PROMPT, policy=SamplingPolicy(temperature=1.0), max_new_tokens=3, pad_id=PAD)


def test_budget_forcing_torchtune_path_refuses_nan_logits():
    tokenizer = kit.load_tokenizer()
    model = kit.load_torchtune_model(kit.build_tiny_checkpoint(init_std=0.5))
    prompts = [tokenizer.encode("7 + 5 =\n", add_bos=False, add_eos=False)]
    gen_kwargs = dict(max_gen_toks=12, max_tokens_thinking=6, thinking_n_ignore=1)
    with nan_row(model, 0), pytest.raises(FloatingPointError, match=r"budget forcing step 0 logits .* at row 0"):
        budget_force_torchtune(
            model, tokenizer, prompts, gen_kwargs, pad_id=tokenizer.pad_id, stop_tokens=[tokenizer.eos_id], max_length=128
        )


def nan_predictor(row: int, position: int) -> ScriptedModel:
    def logits(call: int, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, DIFFUSION_VOCAB)
        out[..., 2] = 5.0
        out[row, position] = float("nan")
        return out

    return ScriptedModel(logits)


def test_diffusion_generate_refuses_nan_logits_naming_row_and_position():
    prompt = torch.tensor([[PAD_ID, 5, 9], [3, 4, 7]])
    with pytest.raises(FloatingPointError, match=r"mask predictor logits .* at row 1, position 4"):
        generate(nan_predictor(1, 4), prompt, steps=4, gen_length=4, block_length=4, mask_id=MASK_ID)


def test_diffusion_tta_refuses_nan_logits():
    prompt = torch.tensor([[PAD_ID, 5, 9], [3, 4, 7]])
    with pytest.raises(FloatingPointError, match=r"mask predictor logits .* at row 0, position 3"):
        generate_with_tta_uncertainty(nan_predictor(0, 3), prompt, steps=4, gen_length=4, block_length=4, tta_k=3, seed=0, mask_id=MASK_ID)


# ---------------------------------------------------------------- prompt + generation vs max_seq_len

SHORT = 16  # the short model's max_seq_len
MARKER = [9]


@pytest.fixture(scope="module")
def short_model():
    return tiny_decoder(VOCAB, seed=5, weight_scale=3.0, max_seq_len=SHORT)


def run_mode(mode, model, codec, tokens):
    kwargs = dict(max_generated_tokens=tokens, pad_id=PAD, temperature=0.0)
    if mode == "none":
        return generate_plain(model, PROMPT, **kwargs)
    if mode == "entropix":
        return generate_entropix(model, PROMPT, **kwargs)
    if mode == "marker":
        return generate_answer_interleaved_marker(model, PROMPT, codec=codec, marker=MARKER, **kwargs)
    decoder = generate_answer_interleaved if mode == "answer" else generate_full_interleaved
    return decoder(model, PROMPT, codec=codec, **kwargs)


# (mode, the prompt's positions in row 1 (4 tokens; interleaved in mode full: 4 + 3), positions per token)
FITS = [("none", 4, 1), ("entropix", 4, 1), ("answer", 4, 2), ("marker", 4, 2), ("full", 7, 2)]


@pytest.mark.parametrize("mode, prompt_positions, per_token", FITS)
def test_generation_longer_than_max_seq_len_is_refused_up_front_naming_the_numbers(mode, prompt_positions, per_token, short_model, codec):
    most = (SHORT - prompt_positions) // per_token
    calls = []
    handle = short_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=(
            rf"prompt row 1 needs {prompt_positions + per_token * (most + 1)} positions in mode '\w+': {prompt_positions} "
            rf"for the prompt.* max_generated_tokens {most + 1}.*max_seq_len {SHORT}; lower max_generated_tokens to at "
            rf"most {most}"
        )):
            run_mode(mode, short_model, codec, most + 1)
    finally:
        handle.remove()
    assert not calls, "the length is checked before any forward"


@pytest.mark.parametrize("mode, prompt_positions, per_token", FITS)
def test_the_longest_generation_that_fits_max_seq_len_runs(mode, prompt_positions, per_token, short_model, codec):
    most = (SHORT - prompt_positions) // per_token
    result = run_mode(mode, short_model, codec, most)
    assert result.content.shape == (2, most)


def test_shared_positions_count_a_confidence_token_at_its_content_tokens_position(short_model, codec):
    shared = Interleaving.of("answer", positions="shared")
    result = decode(short_model, PROMPT, interleaving=shared, codec=codec, max_generated_tokens=SHORT - 4, pad_id=PAD, temperature=0.0)
    assert result.content.shape == (2, SHORT - 4)
    with pytest.raises(ValueError, match=rf"needs {SHORT + 1} positions"):
        decode(short_model, PROMPT, interleaving=shared, codec=codec, max_generated_tokens=SHORT - 3, pad_id=PAD)


def test_a_prompt_that_leaves_no_room_says_shorten_the_prompt(short_model):
    prompt = torch.arange(2, 2 + SHORT).unsqueeze(0)
    with pytest.raises(ValueError, match=r"needs 17 positions .*; shorten the prompt$"):
        generate_plain(short_model, prompt, max_generated_tokens=1, pad_id=PAD)


# ---------------------------------------------------------------- empty prompts


@pytest.mark.parametrize("prompt", [torch.tensor([], dtype=torch.long), torch.tensor([[5, 6], [PAD, PAD]])], ids=["empty", "all-pad-row"])
def test_entropix_refuses_an_empty_prompt_naming_the_row(prompt, model):
    row = 0 if prompt.dim() == 1 else 1
    with pytest.raises(ValueError, match=rf"prompt row {row} is empty"):
        generate_entropix(model, prompt, max_generated_tokens=2, pad_id=PAD)


def test_plain_decoder_refuses_an_empty_prompt_naming_the_row(model):
    with pytest.raises(ValueError, match=r"prompt row 0 is empty"):
        generate_plain(model, torch.tensor([], dtype=torch.long), max_generated_tokens=2, pad_id=PAD)


# ---------------------------------------------------------------- egg_torchtune: the YAML's device and batch size


def parsed_cli(monkeypatch, *flags: str):
    """lm-eval's parsed command line for ``--model egg_torchtune ... <flags>``."""
    argv = ["lm-eval", "--model", "egg_torchtune", "--model_args", f"config={EVAL_NONE}", "--tasks", "kit_arith_choice", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    return HarnessCLI().parse_args()


LM_EVAL_DEFAULTS = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what lm-eval's CLI passes unset


def test_lm_eval_cli_defaults_do_not_replace_the_yamls_device_and_batch_size(monkeypatch, kit_cache):
    with lm_eval_cli_settings(parsed_cli(monkeypatch)):
        lm = lm_from_model_args({"config": str(EVAL_NONE)}, LM_EVAL_DEFAULTS)
    assert lm.device == torch.device("cpu") and lm.batch_size == 8  # eval_none.yaml's


def test_a_batch_size_set_on_lm_evals_command_line_overrides_the_yaml(monkeypatch, kit_cache):
    with lm_eval_cli_settings(parsed_cli(monkeypatch, "--batch_size", "3")):
        lm = lm_from_model_args({"config": str(EVAL_NONE)}, {**LM_EVAL_DEFAULTS, "batch_size": "3"})
    assert lm.batch_size == 3 and lm.device == torch.device("cpu")


def test_from_python_settings_that_are_not_none_override_the_yaml(kit_cache):
    lm = lm_from_model_args({"config": str(EVAL_NONE)}, {"batch_size": 2, "max_batch_size": None, "device": None})
    assert lm.batch_size == 2 and lm.device == torch.device("cpu")


@pytest.mark.slow
def test_egg_torchtune_runs_on_cpu_through_lm_evals_cli_without_device(tmp_path, subprocess_env, kit_cache):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "entropy_guided_generation.lm_eval", "--model", "egg_torchtune",
        "--model_args", f"config={EVAL_NONE}", "--tasks", "kit_arith_choice", "--include_path", str(kit.tasks_dir()),
        "--limit", "1", "--output_path", str(out),
    ]
    run = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"]["kit_arith_choice"]["acc,none"] <= 1.0


def test_a_batch_size_lm_eval_cannot_give_egg_torchtune_is_named(kit_cache):
    with pytest.raises(ValueError, match=r"eval config batch_size must be an int >= 1, got 'auto'"):
        lm_from_model_args({"config": str(EVAL_NONE)}, {"batch_size": "auto", "device": None})


# ---------------------------------------------------------------- eval config values


@pytest.mark.parametrize("limit", ["abc", 0, -3, 1.5, True])
def test_eval_limit_that_lm_eval_cannot_read_is_named(limit):
    cfg = load_yaml(EVAL_NONE)
    cfg.limit = limit
    with pytest.raises(ValueError, match=rf"eval config limit must be null, an int >= 1 .* got {limit!r}"):
        EleutherEvalRecipeDirect(cfg)


@pytest.mark.parametrize("limit, read", [(None, None), (8, 8), ("8", 8), (0.5, 0.5), ("0.25", 0.25)])
def test_eval_limit_accepts_a_count_or_a_fraction(limit, read):
    cfg = load_yaml(EVAL_NONE)
    cfg.limit = limit
    assert EleutherEvalRecipeDirect(cfg).limit == read


# ---------------------------------------------------------------- gen_kwargs a model cannot honour


def request(**gen_kwargs):
    return SimpleNamespace(args=("7 + 5 =", {"until": ["\n"], **gen_kwargs}))


BAD_VALUES = [
    ({"temperature": -1}, r"temperature must be >= 0 \(0: greedy\), got -1"),
    ({"do_sample": True, "temperature": "hot"}, r"temperature must be a number, got 'hot'"),
    ({"top_p": 0}, r"top_p must lie in \(0, 1\], got 0"),
    ({"top_k": 2.5}, r"top_k must be an int >= 0 \(0: off\), got 2.5"),
    ({"max_gen_toks": 0}, r"max_gen_toks must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("gen_kwargs, message", BAD_VALUES)
def test_generate_until_of_egg_torchtune_and_hf_guided_refuses_bad_sampling_values_before_generating(gen_kwargs, message):
    # Both models' generate_until is serve_generate_until (hf-guided's plain requests too).
    served = []
    with pytest.raises(ValueError, match=message):
        serve_generate_until(None, [request(**gen_kwargs)], plain=served.append, force=served.append, batch_size=1)
    assert not served


@pytest.fixture(scope="module")
def egg_lm(kit_cache):
    return lm_from_model_args({"config": str(EVAL_NONE)}, {"device": None})


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"nope": 1}, r"unsupported gen_kwargs \['nope'\] for torchtune models; expected some of until, max_gen_toks"),
    *BAD_VALUES,
])
def test_egg_torchtune_refuses_gen_kwargs_it_cannot_honour(gen_kwargs, message, egg_lm):
    with pytest.raises(ValueError, match=message):
        egg_lm.generate_until([request(**gen_kwargs)])


@pytest.fixture(scope="module")
def diffusion_lm():
    return DiffusionLM(decoding="baseline", steps=8, gen_length=8, block_length=8, batch_size=2)


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"scale_func_name": "nope"}, r"unsupported gen_kwargs \['scale_func_name'\] for --model diffusion; expected some of until, max_gen_toks"),
    ({"max_tokens_thinking": -5}, r"unsupported gen_kwargs \['max_tokens_thinking'\]"),
    ({"top_p": 0.9}, r"unsupported gen_kwargs \['top_p'\]"),
    ({"temperature": -1}, r"temperature must be >= 0 \(0: greedy\), got -1"),
    ({"max_gen_toks": -2}, r"max_gen_toks must be an int >= 1, got -2"),
    ({"do_sample": True, "temperature": 0.7}, r"do_sample=True asks for sampling at temperature 0.7; .* set model_args decoding=baseline,temperature=0.7"),
])
def test_diffusion_refuses_gen_kwargs_it_cannot_honour(gen_kwargs, message, diffusion_lm):
    with pytest.raises(ValueError, match=message):
        diffusion_lm.generate_until([request(**gen_kwargs)])


def test_diffusion_honours_greedy_requests_and_max_gen_toks_aliases(diffusion_lm):
    texts = diffusion_lm.generate_until([request(do_sample=False, temperature=0.0, max_new_tokens=8), request()])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# ---------------------------------------------------------------- diffusion mask id


@pytest.mark.parametrize("edit, message", [
    (lambda ids: ids.pop("mask_id"), r"token_ids missing \['mask_id'\]; expected exactly mask_id, pad_id, eos_id, vocab_size"),
    (lambda ids: ids.update(mask=3), r"token_ids unknown \['mask'\]"),
])
def test_a_predictor_card_without_a_mask_id_is_named_on_the_lm_eval_path(edit, message, tmp_path):
    folder = tmp_path / "predictor"
    shutil.copytree(trained_mask_predictor(), folder)
    card_path = folder / "predictor_card.json"
    card = json.loads(card_path.read_text())
    edit(card["token_ids"])
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"predictor_card.json: " + message):
        load_mask_predictor(folder)
    with pytest.raises(ValueError, match=message):
        DiffusionLM(pretrained=str(folder))


def test_a_predictor_without_mask_token_id_needs_mask_id_named():
    model, _, _ = load_mask_predictor()
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match=r"mask_id is required: the ModernBertForMaskedLM has no config.mask_token_id"):
        generate(model, torch.tensor([[5, 6]]), steps=2, gen_length=2, block_length=2)
