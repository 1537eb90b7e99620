"""Budget forcing's cost over plain generation, side by side in one run, on both paths.

A random kit Qwen2 (same weights for torchtune and transformers) thinks greedily; the thinking
delimiter is a token it says again and again (the first candidate that gives every row 3 rounds),
so forcing suppresses it twice ("Wait") and the trace has 3 thinking rounds plus the answer
(the same prompt in every row of the batch). Each path then generates the same total number of
tokens plainly (our torchtune ``generate_plain``; Hugging Face ``generate``) and the wall-time
ratio forced / plain is printed. Targets (issue 11): <= 1.10 torchtune, <= 1.25 HF.

    OMP_NUM_THREADS=1 .venv/bin/python bench/budget_forcing.py [--batch 4] [--tokens 192] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from typing import Callable

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.generation import generate_plain
from entropy_guided_generation.sampling.budget_forcing import budget_force_torchtune
from entropy_guided_generation.sampling.budget_forcing_hf import budget_force_hf

PROMPT = "Ann has 3 bags with 4 shells each. How many?\n"


def timed_pair(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall times (seconds) of ``first`` and ``second``, run alternately ``repeats`` times
    after one warm-up each, so that drifting machine load hits both alike."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def recurring_tokens(hf, tokenizer, prompts: list[list[int]], tokens: int, pad_id: int) -> list[str]:
    """Single-id, non-special tokens that every row greedily says often after its first quarter
    (highest minimum count over rows first): candidate delimiters, as strings."""
    width = max(len(p) for p in prompts)
    batch = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    out = hf.generate(batch, attention_mask=(batch != pad_id).long(), max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    counts = [Counter(row[width + tokens // 4 :].tolist()) for row in out]
    ranked = sorted(set().union(*counts), key=lambda t: -min(c[t] for c in counts))
    texts = [tokenizer.decode([t]) for t in ranked if t not in tokenizer.all_special_ids]
    return [text for text in texts if len(tokenizer.encode(text, add_special_tokens=False)) == 1]


def three_round_kwargs(candidates: list[str], tokens: int, run: Callable[[dict], list]) -> dict:
    """gen_kwargs with the first candidate delimiter that gives every row 3 thinking rounds
    (2 suppressed delimiters), else the candidate with the most rounds in total."""
    best, best_rounds = None, -1
    for delimiter in candidates[:12]:
        gen_kwargs = dict(max_gen_toks=tokens, max_tokens_thinking=tokens - 16, thinking_n_ignore=2, thinking_end=delimiter, until=[])
        rounds = [len(o.rounds) for o in run(gen_kwargs)]
        if min(rounds) == 3:
            return gen_kwargs
        if sum(rounds) > best_rounds:
            best, best_rounds = gen_kwargs, sum(rounds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=192, help="max_gen_toks of the forced run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = kit.build_tiny_checkpoint(seed=args.seed, hidden_size=256, num_layers=4, intermediate_size=512, init_std=0.3, max_seq_len=1024)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tt, ttok = kit.load_torchtune_model(folder), kit.load_tokenizer()
    # One prompt in every row, so that every row has the same 3 rounds (a random model's rounds
    # depend on its text); the cost per step does not depend on the text.
    prompts = [tok.encode(PROMPT, add_special_tokens=False)] * args.batch
    start = tok.convert_tokens_to_ids(kit.THINK_START)
    candidates = recurring_tokens(hf, tok, [p + [start] for p in prompts], args.tokens, ttok.pad_id)
    run_tt = lambda kw: budget_force_torchtune(tt, ttok, prompts, kw, pad_id=ttok.pad_id, stop_tokens=[], max_length=1024)  # noqa: E731
    gen_kwargs = three_round_kwargs(candidates, args.tokens, run_tt)
    delimiter = gen_kwargs["thinking_end"]

    forced_hf = lambda: budget_force_hf(hf, tok, prompts, gen_kwargs, max_length=1024, stop_tokens=[])  # noqa: E731
    forced_tt = lambda: run_tt(gen_kwargs)  # noqa: E731
    outputs = forced_tt()
    same = [o.tokens for o in outputs] == [o.tokens for o in forced_hf()]
    steps = max(len(o.tokens) for o in outputs)  # every row feeds one column per step
    rounds = [len(o.rounds) for o in outputs]

    width = max(len(p) + 1 for p in prompts)
    padded = torch.tensor([[ttok.pad_id] * (width - len(p) - 1) + p + [start] for p in prompts])
    mask = (padded != ttok.pad_id).long()
    plain_tt = lambda: generate_plain(tt, padded, max_generated_tokens=steps, pad_id=ttok.pad_id, temperature=0.0, stop_tokens=None)  # noqa: E731
    plain_hf = lambda: hf.generate(  # noqa: E731
        padded, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=ttok.pad_id, eos_token_id=None
    )

    t_forced_tt, t_plain_tt = timed_pair(forced_tt, plain_tt, args.repeats)
    t_forced_hf, t_plain_hf = timed_pair(forced_hf, plain_hf, args.repeats)
    print(f"model: kit qwen2 hidden 256 x 4 layers; batch {args.batch}; delimiter {delimiter!r}; rounds per row {rounds}; "
          f"steps {steps}; torchtune trace == HF trace: {same}; stop reasons {[o.log_record()['end_reasons'] for o in outputs]}")
    print(f"{'path':<10} {'forced s':>9} {'plain s':>9} {'ratio':>7} {'target':>7}")
    for name, forced, plain, target in (("torchtune", t_forced_tt, t_plain_tt, 1.10), ("HF", t_forced_hf, t_plain_hf, 1.25)):
        print(f"{name:<10} {forced:>9.3f} {plain:>9.3f} {forced / plain:>7.3f} {target:>7.2f}")


if __name__ == "__main__":
    main()
