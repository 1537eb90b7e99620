"""Every usage snippet of the seed documents (../shared/seeds/000..004), run as written.

Each test body is its seed's code block, statement for statement (its imports included, inside the
test as in the snippet). What differs is marked on its line with ``# seed: ...``: the kit's models, tokenizers, data and tasks instead of downloaded ones,
this package's import paths, and smaller sizes (tokens, samples, steps). Blocks that are not usage
(seed 001's ``git clone``) are left out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from entropy_guided_generation import generation, kit
from entropy_guided_generation.diffusion import generate_with_tta_uncertainty, trained_mask_predictor
from entropy_guided_generation.scoring import register_gsm8k_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def llama_dir() -> Path:
    """The kit's tiny Llama checkpoint (HF safetensors + the kit tokenizer's files, chat template included)."""
    return kit.build_tiny_checkpoint("llama", **TINY_LLAMA)


# ---------------------------------------------------------------- 000: Confidence-as-Context, eval from Python
def test_seed_000_eval_recipe_from_python_with_the_interleaving_yaml(tmp_path):
    import torch  # noqa: F401  (the seed's imports)
    from torchtune import config, training  # noqa: F401

    from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect

    # YAML example: set interleaving mode in your eval config
    # interleaving:
    #   mode: full   # options: none | full | answer | marker

    # seed: config.load_yaml("entropy_guided_generation/entropy_intl/gsm8k_eval.yaml"); torchtune 0.6.1 has
    # no config.load_yaml, and the kit's offline tiny config stands in for the Llama one
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "eval_answer.yaml")
    cfg.merge_with({"output_dir": str(tmp_path / "out"), "tasks": ["kit_gsm8k"], "limit": 2,  # seed: sizes
                    "gen_kwargs": {"max_gen_toks": 8}, "bootstrap_iters": 0})
    # "Interleaving selection via YAML": the seed's block, as a user pastes it into the eval YAML
    cfg.merge_with(OmegaConf.create("interleaving:\n  mode: answer  # none | full | answer | marker\n"))
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()

    assert summary["mode"] == "answer" and summary["num_samples"] == 2
    # "The evaluation script will automatically select": the seed's decoder names
    assert all(callable(getattr(generation, name)) for name in (
        "generate_full_interleaved", "generate_answer_interleaved", "generate_answer_interleaved_marker"))


# ---------------------------------------------------------------- 001: entropy sampler (transformers)
def test_seed_001_hook_based_entropy_sampler_with_a_chat_template(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from entropy_guided_generation.sampling import HookBasedEntropySampler  # seed: from entropy_sampler import ...

    # Load model and tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))  # seed: "meta-llama/Llama-3.2-3B-Instruct"
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))  # seed: "meta-llama/Llama-3.2-3B-Instruct"

    # Initialize the sampler
    pause_token_id = tokenizer.convert_tokens_to_ids("...")
    clarifying_question_token_id = tokenizer.convert_tokens_to_ids("?")
    entropy_sampler = HookBasedEntropySampler(model, tokenizer, pause_token_id, clarifying_question_token_id)

    # Prepare input
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What number is bigger 9.11 or 9.9?"},
    ]
    # seed: no return_dict; transformers >= 5 returns a BatchEncoding unless return_dict=False (4.x: the default)
    tokenized_chat = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    attention_mask = tokenized_chat.ne(tokenizer.eos_token_id).long()

    # Set up generation config
    generation_config = GenerationConfig(
        max_new_tokens=8,  # seed: 500
        do_sample=True,
        temperature=0.45,
        top_p=0.95,
        num_return_sequences=1,
        no_repeat_ngram_size=3,
        pad_token_id=tokenizer.eos_token_id,
    )

    # Generate output
    output_ids = model.generate(
        tokenized_chat,
        attention_mask=attention_mask,
        generation_config=generation_config,
        logits_processor=[entropy_sampler]
    )

    # Decode and print the result
    print(tokenizer.decode(output_ids[0], skip_special_tokens=False))

    text = tokenizer.decode(tokenized_chat[0], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") and text.endswith("<|im_start|>assistant\n")
    steps = len(entropy_sampler.history)
    assert steps == output_ids.shape[1] - tokenized_chat.shape[1] and steps > 0
    entropy_sampler.remove_hooks()


# ---------------------------------------------------------------- 002: SequenceProcessor
@pytest.fixture
def restore_matmul_precision():
    """The seed's precision section sets a process-wide matmul precision: put it back afterwards."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_seed_002_sequence_processor_with_a_hugging_face_model_and_tokenizer(llama_dir, tmp_path, restore_matmul_precision):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()  # seed: "model, tokenizer are pre-loaded"
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    # seed: its registry's gsm8k_r1_template dataset; here the kit's GSM8K-format rows under that name
    register_gsm8k_jsonl("gsm8k_r1_template", {
        split: kit.write_gsm8k_jsonl(tmp_path / f"{split}.jsonl", 6, seed=0, split=split) for split in ("train", "test")
    }, overwrite=True)
    update_vector_named = {name: torch.randn_like(p) for name, p in model.named_parameters()}

    # Basic initialization with dict config:
    from entropy_guided_generation.scoring import GenerationConfig, SequenceProcessor  # noqa: F401  (seed: entropy_experiments.utils.sequence_processor)

    # model, tokenizer are pre-loaded (LoRA/PEFT kept intact)
    cfg = {
      'generation': {'temperature': 1.0, 'top_p': 1.0, 'max_new_tokens': 4, 'gen_batch_size': 16, 'tf_batch_size': 8},  # seed: max_new_tokens 64
      'precision': {
        'func_override': {'autocast': False, 'dtype': 'float32', 'cast_params': True},
        'tf_nograd': {'autocast': False, 'dtype': 'float32', 'cast_logits_fp32': True},
        'allow_tf32': True, 'matmul_precision': 'high', 'entropy_fp64': False,
      },
    }
    sp = SequenceProcessor(model, tokenizer, logger=None, config=cfg)

    # Generate and score from dataset
    seqs, lps, diags = sp.generate_with_logprobs(
      prompts=None, G=2, dataset_name='gsm8k_r1_template', split='test', num_prompts=3, compute_rb=True  # seed: G=4, num_prompts=8
    )

    # Parameter‑only override (θ + η·v) scoring on existing sequences
    params_mapping = sp._build_params_override(v_named=update_vector_named, eta=1e-6)
    lp_no_grad = sp.teacher_force_logprobs(seqs, with_grad=False, compute_rb=True, params_override=params_mapping)

    assert seqs.sequences.shape[:2] == (3, 2) and lps.rewards is not None and len(diags.diagnostics) == 3
    assert sp.pad_id == tokenizer.pad_token_id
    moved = torch.cat([t for row in lp_no_grad.logprobs for t in row])
    torch.testing.assert_close(moved, torch.cat([t for row in lps.logprobs for t in row]), rtol=0, atol=1e-3)
    # At eta = 1e-6 the scores move below float32 noise, so the closeness above holds whether or not the
    # override is applied: check the mapping holds theta + eta * v, up to float32 rounding of the
    # product and of the sum (at most 2^-24 of each), and that the same call with a visible eta moves
    # the scores.
    params = dict(model.named_parameters())
    overridden = [name for name in params_mapping if name in update_vector_named]
    assert len(overridden) >= len(params) - 1  # tied embeddings: once, under one name
    for name in overridden:
        got, wanted = params_mapping[name].detach().double(), 1e-6 * update_vector_named[name].double()
        error = (got - params[name].detach().double() - wanted).abs()
        assert bool((error <= (got.abs() + wanted.abs()) * 2.0**-23).all()), name
    visible = sp.teacher_force_logprobs(seqs, with_grad=False, params_override=sp._build_params_override(v_named=update_vector_named, eta=0.05))
    shift = (torch.cat([t for row in visible.logprobs for t in row]) - torch.cat([t for row in lps.logprobs for t in row])).abs().max()
    assert float(shift) > 1e-2

    # Replacement sampling (independent draws):
    seqs, lps, diags = sp.generate_with_replacement_sampling(
      total_sequences=4, dataset_name='gsm8k_r1_template', split='train', seed=42, G=1, compute_rb=True  # seed: 32768
    )

    assert seqs.sequences.shape[:2] == (4, 1) and all(r is not None for r in lps.rb_entropies[0])


# ---------------------------------------------------------------- 003: budget forcing on the lm-eval command line
@pytest.mark.slow
def test_seed_003_budget_forcing_command_line(tmp_path, subprocess_env):
    out = tmp_path / "s1.1_1.5B_eval"
    command = [
        # seed: OPENAI_API_KEY=$OPENAI_API_KEY PROCESSOR=$PROCESSOR lm_eval (environment below)
        sys.executable, "-m", "entropy_guided_generation.lm_eval",
        "--model", "hf",
        # seed: pretrained=simplescaling/s1.1-1.5B,dtype=float16,tensor_parallel_size=1; tensor_parallel_size is a vLLM
        # argument that lm-eval's hf model hands to from_pretrained, which refuses it (lm-eval's own hf fails alike)
        "--model_args", f"pretrained={kit.trained_base()},dtype=float16",
        "--tasks", "kit_gsm8k", "--include_path", str(kit.tasks_dir()),  # seed: aime24_nofigures,openai_math
        "--batch_size", "auto",
        "--apply_chat_template",
        "--output_path", str(out),
        "--log_samples",
        "--limit", "2",  # seed: sizes
        "--gen_kwargs", "max_gen_toks=64,max_tokens_thinking=auto,thinking_n_ignore=6,thinking_n_ignore_str=Wait,scale_func_name=default",  # seed: 32768
    ]
    env = {**subprocess_env, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", ""), "PROCESSOR": os.environ.get("PROCESSOR", "")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (samples_file,) = out.glob("*/samples_kit_gsm8k_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert {s["doc_id"] for s in samples} == {0, 1}  # one sample per document and answer filter
    for sample in samples:
        (args,) = sample["arguments"].values()
        assert args["arg_0"].startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")  # the chat template
        (record,) = args["arg_1"]["budget_forcing"]
        assert record["thinking_tokens"] <= record["thinking_budget"] and record["continuations"] <= 6


# ---------------------------------------------------------------- 004: TTA uncertainty remasking
SMALL = dict(steps=8, gen_length=8)  # seed: the decoders' default 128 steps x 128 tokens, where a snippet gives none


@pytest.fixture(scope="module")
def llada():
    """The kit's trained mask predictor and its tokenizer, loaded as the seed loads LLaDA."""
    from transformers import AutoTokenizer
    from transformers import ModernBertForMaskedLM as LLaDAModelLM  # seed: from modeling_llada import LLaDAModelLM

    # Load model
    model = LLaDAModelLM.from_pretrained(str(trained_mask_predictor()))  # seed: "GSAI-ML/LLaDA-8B-Base"
    tokenizer = AutoTokenizer.from_pretrained(str(trained_mask_predictor()))  # seed: "GSAI-ML/LLaDA-8B-Base"
    return model, tokenizer


@pytest.mark.filterwarnings("ignore:FigureCanvasAgg is non-interactive")
def test_seed_004_basic_usage_benchmark_and_logs(llada, tmp_path, capsys):
    from entropy_guided_generation.diffusion import generate_with_tta_uncertainty  # noqa: F811  (seed: from tta_uncertainty_sampling import ...)

    model, tokenizer = llada

    # Prepare prompt
    prompt_text = "The capital of France is"
    prompt_tokens = tokenizer.encode(prompt_text, return_tensors='pt').to(model.device)

    # Generate with TTA
    result, logs = generate_with_tta_uncertainty(
        model=model,
        prompt=prompt_tokens,
        steps=64,
        gen_length=64,
        tta_k=5,  # 5 forward passes per step
        seed=42
    )

    # Decode result
    generated_text = tokenizer.decode(result[0], skip_special_tokens=True)
    print(generated_text)

    assert result.shape == (1, prompt_tokens.shape[1] + 64) and generated_text.startswith(prompt_text)
    assert logs["total_steps"] == 64 and not bool((result == model.config.mask_token_id).any())

    # 2. Benchmark Comparison
    from entropy_guided_generation.diffusion import experiments as experiment_utils  # seed: import experiment_utils

    # Compare Baseline vs TTA Uncertainty
    results = experiment_utils.run_academic_benchmark(
        model=model,
        tokenizer=tokenizer,
        baseline_fn=None,  # Uses default inspect_sampling
        experimental_fn=generate_with_tta_uncertainty,
        thresholds=[3, 5, 7],  # Different tta_k values to test
        samples=2,  # seed: 20
        decode_kwargs=dict(**SMALL, block_length=8),  # seed: sizes (none given: LLaDA's 128 / 128)
    )

    # Analyze
    experiment_utils.analyze_icml_results(results)

    assert list(results) == ["baseline", "tta_k=3", "tta_k=5", "tta_k=7"]
    assert "tta_k=7" in capsys.readouterr().out

    # Logging and Analysis: Access TTA Statistics
    result, logs = generate_with_tta_uncertainty(model, prompt_tokens, tta_k=5, **SMALL)

    # TTA-specific stats
    tta_stats = logs['tta_stats']

    print(f"Avg entropy per step: {tta_stats['avg_entropy_per_step']}")
    print(f"Avg disagreement per step: {tta_stats['avg_disagreement_per_step']}")
    print(f"Remask ratio per step: {tta_stats['remask_ratio_per_step']}")
    print(f"Frozen ratio per step: {tta_stats['frozen_ratio_per_step']}")

    # Standard logs (compatible with existing metrics)
    print(f"Total steps: {logs['total_steps']}")
    print(f"NFE (forward passes): {logs['nfe']}")  # = total_steps * tta_k

    # Visualize Uncertainty Evolution
    import matplotlib
    matplotlib.use("Agg")  # seed: an interactive backend; tests draw off screen
    import matplotlib.pyplot as plt

    entropy_history = logs['tta_stats']['avg_entropy_per_step']
    disagreement_history = logs['tta_stats']['avg_disagreement_per_step']

    plt.figure(figsize=(12, 4))
    plt.subplot(1, 2, 1)
    plt.plot(entropy_history)
    plt.title('Average Entropy per Step')
    plt.xlabel('Step')
    plt.ylabel('Entropy')

    plt.subplot(1, 2, 2)
    plt.plot(disagreement_history)
    plt.title('Average Disagreement per Step')
    plt.xlabel('Step')
    plt.ylabel('Disagreement Rate')

    plt.tight_layout()
    plt.show()

    plt.savefig(tmp_path / "tta.png")
    plt.close("all")

    assert len(entropy_history) == logs["total_steps"] == SMALL["steps"] and (tmp_path / "tta.png").stat().st_size > 0


def test_seed_004_configuration_constraints_and_speed_settings(llada):
    model, tokenizer = llada
    prompt_tokens = tokenizer.encode("The capital of France is", return_tensors='pt').to(model.device)

    # Configuration Parameters: every documented name, passed to the decoder
    tta_k=5                           # Number of forward passes (higher = better uncertainty estimation, slower)
    tta_temperature_range=(0.0, 0.3) # Temperature range for diversity
    tta_use_dropout=False             # Use dropout for TTA (requires model.train())
    alpha_entropy=1.0        # Weight for predictive entropy
    beta_disagreement=0.5    # Weight for disagreement rate
    gamma_violation=0.3      # Weight for constraint violations
    lambda_change=0.2        # Weight for change penalty (prevents oscillation)
    remask_top_k=None        # Fixed number to remask (overrides top_pct)
    remask_top_pct=0.1       # Remask top 10% highest uncertainty tokens
    freeze_window=5          # Track last 5 steps
    freeze_threshold=3       # If token flips 3+ times in window
    freeze_duration=3        # Freeze for 3 steps
    configured, _ = generate_with_tta_uncertainty(
        model, prompt_tokens, tta_k=tta_k, tta_temperature_range=tta_temperature_range, tta_use_dropout=tta_use_dropout,
        alpha_entropy=alpha_entropy, beta_disagreement=beta_disagreement, gamma_violation=gamma_violation,
        lambda_change=lambda_change, remask_top_k=remask_top_k, remask_top_pct=remask_top_pct, freeze_window=freeze_window,
        freeze_threshold=freeze_threshold, freeze_duration=freeze_duration, seed=0, **SMALL,
    )
    defaults, _ = generate_with_tta_uncertainty(model, prompt_tokens, seed=0, **SMALL)
    assert torch.equal(configured, defaults)  # the documented values are the defaults

    # Custom Constraint Functions: the template and the three examples, as written
    def my_constraint_fn(tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: [batch, seq_len] token IDs

        Returns:
            violation_scores: [batch, seq_len] penalty scores (higher = more violation)
        """
        batch_size, seq_len = tokens.shape
        scores = torch.zeros_like(tokens, dtype=torch.float32)

        # Your constraint logic here
        # Example: penalize specific token IDs
        forbidden_tokens = [123, 456, 789]
        for token_id in forbidden_tokens:
            scores[tokens == token_id] += 1.0

        return scores

    def no_repeat_ngrams(tokens: torch.Tensor, n: int = 3) -> torch.Tensor:
        """Penalize repeated n-grams"""
        batch_size, seq_len = tokens.shape
        scores = torch.zeros_like(tokens, dtype=torch.float32)

        for b in range(batch_size):
            seen_ngrams = set()
            for i in range(n-1, seq_len):
                ngram = tuple(tokens[b, i-n+1:i+1].cpu().numpy())
                if ngram in seen_ngrams:
                    scores[b, i] += 1.0
                seen_ngrams.add(ngram)

        return scores

    def json_format_constraint(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
        """Encourage valid JSON structure"""
        scores = torch.zeros_like(tokens, dtype=torch.float32)

        # Decode to check structure
        for b in range(tokens.shape[0]):
            text = tokenizer.decode(tokens[b], skip_special_tokens=True)

            # Simple heuristics
            open_braces = text.count('{')
            close_braces = text.count('}')
            open_brackets = text.count('[')
            close_brackets = text.count(']')

            # Penalize imbalance
            imbalance = abs(open_braces - close_braces) + abs(open_brackets - close_brackets)

            # Apply penalty to last token (could be more sophisticated)
            if imbalance > 0:
                scores[b, -1] = imbalance

        return scores

    def math_constraint(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
        """Penalize invalid math expressions"""
        scores = torch.zeros_like(tokens, dtype=torch.float32)

        for b in range(tokens.shape[0]):
            text = tokenizer.decode(tokens[b], skip_special_tokens=True)

            # Check for common math errors
            violations = 0

            # Division by zero
            if '/0' in text or '/ 0' in text:
                violations += 2.0

            # Unmatched parentheses
            if text.count('(') != text.count(')'):
                violations += 1.0

            # Apply to last few tokens
            if violations > 0:
                scores[b, -3:] = violations

        return scores

    # Use it
    result, logs = generate_with_tta_uncertainty(
        model, prompt_tokens,
        constraint_fn=lambda t: no_repeat_ngrams(t, n=3),
        **SMALL,  # seed: sizes
    )
    for constraint in (my_constraint_fn, lambda t: json_format_constraint(t, tokenizer), lambda t: math_constraint(t, tokenizer)):
        constrained, _ = generate_with_tta_uncertainty(model, prompt_tokens, constraint_fn=constraint, **SMALL)
        assert constrained.shape == result.shape

    # Performance Optimization: Fast, Balanced, High Quality
    # Fast (K=3, ~3x slower than baseline)
    result, logs = generate_with_tta_uncertainty(
        model, prompt_tokens,
        tta_k=3,
        remask_top_pct=0.05,
        **SMALL,  # seed: sizes
    )

    # Balanced (K=5, ~5x slower)
    result, logs = generate_with_tta_uncertainty(
        model, prompt_tokens,
        tta_k=5,
        remask_top_pct=0.1,
        **SMALL,  # seed: sizes
    )

    # High Quality (K=10, ~10x slower)
    result, logs = generate_with_tta_uncertainty(
        model, prompt_tokens,
        tta_k=10,
        remask_top_pct=0.15,
        **SMALL,  # seed: sizes
    )

    assert result.shape == (1, prompt_tokens.shape[1] + SMALL["gen_length"]) and logs["total_steps"] == SMALL["steps"]
