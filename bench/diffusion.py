"""Masked-diffusion decoding: baseline (LLaDA) vs TTA uncertainty remasking, side by side in one run,
on the kit's trained mask predictor and held-out kit arithmetic problems.

Prints, for baseline and for TTA with tta_k in 3, 5, 7 and each perturbation kind (temperature only,
dropout, input re-masking): accuracy, NFE and seconds per sample. Then two step-time ratios:

- temperature-only TTA step / baseline step (same canvas; target <= 1.10): the K views share one forward;
- one forward of 5 x B rows / 5 sequential forwards of B rows (target <= 0.75 on this CPU).

    .venv/bin/python bench/diffusion.py [--samples 50] [--repeats 5] [--plot tta.png] [--predictor DIR]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.diffusion import generate, generate_with_tta_uncertainty, heldout_problems, run_benchmark, summarize
from entropy_guided_generation.diffusion.pretrained import load_mask_predictor, trained_mask_predictor
from entropy_guided_generation.diffusion.train import EVAL_DECODING
from entropy_guided_generation.generation import left_pad

LAYOUT = {key: EVAL_DECODING[key] for key in ("steps", "gen_length", "block_length")}  # LLaDA low_confidence baseline
PERTURBATIONS = {"temperature": {}, "dropout": {"tta_use_dropout": True}, "input-remask": {"tta_mask_ratio": 0.2}}


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_ratio(numerator: Callable[[], object], denominator: Callable[[], object], repeats: int) -> float:
    """Median over ``repeats`` rounds of time(numerator) / time(denominator), the two alternating
    (noise from a shared CPU hits both alike); one warm-up call each first."""
    numerator(), denominator()
    return statistics.median(seconds(numerator) / seconds(denominator) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50, help="held-out problems per run")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per step-time ratio")
    parser.add_argument("--plot", default=None, help="PNG of entropy and disagreement per step")
    parser.add_argument("--predictor", default=None, help="mask predictor folder (default: the kit's trained one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer, ids = load_mask_predictor(args.predictor or trained_mask_predictor())
    print(f"decoding {LAYOUT}; {args.samples} held-out problems; torch threads {torch.get_num_threads()}")

    warm_up = left_pad([tokenizer.encode(kit.prompt_of(p.question), add_bos=False, add_eos=False) for p in heldout_problems(2)], ids.pad_id)
    generate(model, warm_up, mask_id=ids.mask_id, **LAYOUT)  # the first timed run is not a cold start
    results = {}
    for kind, extra in PERTURBATIONS.items():
        runs = run_benchmark(model, tokenizer, thresholds=(3, 5, 7), samples=args.samples, ids=ids, decode_kwargs=LAYOUT, experimental_kwargs=extra, progress=False)
        if not results:
            results["baseline"] = runs["baseline"]
        results.update({f"{name} {kind}": r for name, r in runs.items() if name != "baseline"})
    print(summarize(results, args.plot))

    prompts = [tokenizer.encode(kit.prompt_of(p.question), add_bos=False, add_eos=False) for p in heldout_problems(args.samples)]
    prompt = left_pad(prompts, ids.pad_id)
    layout = dict(LAYOUT, mask_id=ids.mask_id)
    baseline = lambda: generate(model, prompt, **layout)  # noqa: E731
    tta = lambda: generate_with_tta_uncertainty(model, prompt, tta_k=5, seed=0, **layout)  # noqa: E731
    step_ratio = interleaved_ratio(tta, baseline, args.repeats)
    print(f"temperature-only TTA (K=5) / baseline, per step, batch {prompt.shape[0]}: {step_ratio:.3f}  (target <= 1.10)")

    canvas = torch.cat([prompt, torch.full((prompt.shape[0], LAYOUT["gen_length"]), ids.mask_id)], dim=1)
    with torch.no_grad():
        for rows in (1, 8, canvas.shape[0]):
            x = canvas[:rows]
            batched = lambda: model(x.repeat(5, 1))  # noqa: E731
            sequential = lambda: [model(x) for _ in range(5)]  # noqa: E731
            ratio = interleaved_ratio(batched, sequential, args.repeats)
            print(f"K=5 batched forward / 5 sequential forwards, B={rows}: {ratio:.3f}  (target <= 0.75)")


if __name__ == "__main__":
    main()
