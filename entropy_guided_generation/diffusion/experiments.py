"""Experiment helpers: solve held-out kit problems with a decoder and compare baseline decoding
with TTA remasking (accuracy, NFE, seconds per sample, uncertainty per step). Seed 004's names
``run_academic_benchmark`` / ``analyze_icml_results`` are :func:`run_benchmark` / :func:`summarize`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.diffusion.decoding import generate, resolve_mask_id
from entropy_guided_generation.diffusion.mask_predictor import TokenIds, response_text
from entropy_guided_generation.diffusion.tta import generate_with_tta_uncertainty
from entropy_guided_generation.generation import left_pad
from entropy_guided_generation.modeling import vocab_size_of
from entropy_guided_generation.tokenizing import encode_ids, eos_id_of, is_hf_tokenizer, pad_id_of
from entropy_guided_generation.visualize import pyplot

DecodeFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]
HELDOUT_SEED = 1


def heldout_problems(n: int, seed: int = HELDOUT_SEED) -> list:
    """``n`` kit word problems of the test split (never in the predictor's training data)."""
    return kit.word_problems(n, seed, "test")


def answer_or_none(response: str) -> Optional[int]:
    """The ``#### n`` answer of a generated response, or None when it has none."""
    try:
        return kit.final_answer(response)
    except ValueError:
        return None


@dataclass
class SolveResult:
    """Outcome of decoding a list of problems.

    Attributes:
        accuracy: share of problems whose ``#### n`` answer equals the result.
        correct: per problem.
        responses: generated text per problem (up to the first eos).
        nfe_per_sample: model evaluations per sequence, averaged over problems.
        seconds_per_sample: wall time of the decoding calls / number of problems.
        step_stats: TTA statistics per step averaged over batches (empty for decoders without them).
    """

    accuracy: float
    correct: list[bool]
    responses: list[str]
    nfe_per_sample: float
    seconds_per_sample: float
    step_stats: dict[str, list[float]] = field(default_factory=dict)


def _mean_per_step(per_batch: list[dict[str, list[float]]], weights: list[int]) -> dict[str, list[float]]:
    if not per_batch:
        return {}
    total = sum(weights)
    return {
        name: [sum(w * stats[name][i] for stats, w in zip(per_batch, weights)) / total for i in range(len(per_batch[0][name]))]
        for name in per_batch[0]
    }


def token_ids_of(model: Any, tokenizer: Any) -> TokenIds:
    """The ids :func:`solve` needs, read off a torchtune or Hugging Face tokenizer and the model.

    The mask is the tokenizer's (Hugging Face ``mask_token_id``; torchtune: the kit's ``<|mask|>``
    special token), else the model's ``config.mask_token_id``; pad and eos are the tokenizer's.

    Raises:
        ValueError: naming ``mask_id`` when neither gives a mask id (see :func:`resolve_mask_id`).
    """
    if is_hf_tokenizer(tokenizer):
        mask_id = tokenizer.mask_token_id
    else:
        mask_id = getattr(tokenizer, "special_tokens", {}).get(kit.MASK_TOKEN)
    vocab_size = vocab_size_of(model) or getattr(getattr(model, "config", None), "vocab_size", None)
    return TokenIds(resolve_mask_id(model, mask_id), pad_id_of(tokenizer), eos_id_of(tokenizer), vocab_size)


def solve(model: Any, tokenizer: Any, ids: TokenIds, problems: Sequence, decode_fn: DecodeFn, *, batch_size: int = 50, **decode_kwargs: Any) -> SolveResult:
    """Decode ``prompt_of(question)`` for every problem in left-padded batches and grade the answers.

    Args:
        tokenizer: torchtune or Hugging Face.
        problems: kit ``WordProblem``s or GSM8K rows ``{"question", "answer"}``.
        decode_fn: ``generate`` or ``generate_with_tta_uncertainty`` (called with ``mask_id=ids.mask_id``).
        batch_size: problems per decoding call.
        **decode_kwargs: passed to ``decode_fn`` (``steps``, ``gen_length``, ``block_length``, ...).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    questions = [p["question"] if isinstance(p, dict) else p.question for p in problems]
    results = [kit.final_answer(p["answer"]) if isinstance(p, dict) else p.result for p in problems]
    responses, nfe, stats, weights, seconds = [], 0.0, [], [], 0.0
    for begin in range(0, len(questions), batch_size):
        chunk = questions[begin : begin + batch_size]
        prompt = left_pad([encode_ids(tokenizer, kit.prompt_of(q), add_bos=False) for q in chunk], ids.pad_id)
        start = time.perf_counter()
        tokens, logs = decode_fn(model, prompt, mask_id=ids.mask_id, **decode_kwargs)
        seconds += time.perf_counter() - start
        responses += [response_text(tokenizer, row, ids) for row in tokens[:, prompt.shape[1] :].tolist()]
        nfe += logs["nfe"] * len(chunk)
        if "tta_stats" in logs:
            stats.append(logs["tta_stats"])
            weights.append(len(chunk))
    correct = [answer_or_none(r) == y for r, y in zip(responses, results)]
    n = max(1, len(problems))
    return SolveResult(sum(correct) / n, correct, responses, nfe / n, seconds / n, _mean_per_step(stats, weights))


def run_benchmark(
    model: Any,
    tokenizer: Any,
    baseline_fn: Optional[DecodeFn] = None,
    experimental_fn: Optional[DecodeFn] = None,
    thresholds: Sequence[int] = (3, 5, 7),
    samples: int = 50,
    *,
    ids: Optional[TokenIds] = None,
    decode_kwargs: Optional[dict[str, Any]] = None,
    experimental_kwargs: Optional[dict[str, Any]] = None,
    batch_size: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, SolveResult]:
    """Baseline decoding against TTA remasking at each ``tta_k`` in ``thresholds`` on the same held-out problems.

    Args:
        baseline_fn: default ``generate``.
        experimental_fn: default ``generate_with_tta_uncertainty``; called with ``tta_k=k``, ``seed``
            and ``experimental_kwargs`` (e.g. ``{"tta_use_dropout": True}``).
        thresholds: the ``tta_k`` values (the seed's name).
        samples: number of held-out problems.
        ids: the predictor's token ids (default: :func:`token_ids_of` the model and tokenizer).
        decode_kwargs: layout shared by every decoder (``steps``, ``gen_length``, ``block_length``;
            default: the decoders' own, LLaDA's 128 / 128 / one block).

    Returns:
        ``{"baseline": ..., "tta_k=3": ..., ...}`` in that order.
    """
    from tqdm.auto import tqdm

    baseline_fn = baseline_fn or generate
    experimental_fn = experimental_fn or generate_with_tta_uncertainty
    ids = ids if ids is not None else token_ids_of(model, tokenizer)
    problems = heldout_problems(samples)
    shared = dict(decode_kwargs or {})
    runs: list[tuple[str, DecodeFn, dict[str, Any]]] = [("baseline", baseline_fn, shared)]
    runs += [(f"tta_k={k}", experimental_fn, {**shared, **(experimental_kwargs or {}), "tta_k": k, "seed": seed}) for k in thresholds]
    results = {}
    for name, fn, kwargs in tqdm(runs, desc="diffusion benchmark", disable=not progress):
        results[name] = solve(model, tokenizer, ids, problems, fn, batch_size=batch_size, **kwargs)
    return results


def summarize(results: dict[str, SolveResult], plot_path: Optional[Union[str, Path]] = None) -> str:
    """A plain-text table (accuracy, NFE and seconds per sample per run) and, with ``plot_path``, a PNG
    of the mean entropy (nats) and disagreement per step of the runs that record them."""
    lines = [f"{'run':<24} {'accuracy':>8} {'nfe':>7} {'s/sample':>9}"]
    lines += [f"{name:<24} {r.accuracy:8.3f} {r.nfe_per_sample:7.1f} {r.seconds_per_sample:9.4f}" for name, r in results.items()]
    if plot_path is not None:
        plt = pyplot()
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name, r in results.items():
            if r.step_stats:
                left.plot(r.step_stats["avg_entropy_per_step"], label=name)
                right.plot(r.step_stats["avg_disagreement_per_step"], label=name)
        left.set(title="mean entropy per step", xlabel="step", ylabel="nats")
        right.set(title="mean disagreement per step", xlabel="step", ylabel="share of views")
        left.legend()
        figure.tight_layout()
        figure.savefig(plot_path)
        plt.close(figure)
    return "\n".join(lines)


# seed 004's names (its ``experiment_utils``)
run_academic_benchmark = run_benchmark


def analyze_icml_results(results: dict[str, SolveResult], plot_path: Optional[Union[str, Path]] = None) -> str:
    """Seed 004's report: print :func:`summarize`'s table (and write its plot with ``plot_path``); return the table."""
    table = summarize(results, plot_path)
    print(table)
    return table
