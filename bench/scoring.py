"""Teacher-forced scoring throughput of SequenceProcessor vs a bare forward, side by side in one run.

On one batch of generated sequences (B prompts x G responses, left-padded prompts), prints scored
response tokens/s and the time ratio over a bare no-grad forward of the same rows in the same
batches (``model(tokens, mask=..., input_pos=...)``, full logits, nothing else) for:

- ``teacher_force_logprobs`` (log p, log q);
- ``... compute_rb=True`` (plus RB entropies under the policy);
- ``teacher_force_logprobs_with_diagnostics(compute_rb=True)`` (plus every per-step and
  per-sequence diagnostic) — the target: <= 1.2 x the bare forward;
- the same through a parameter override (``functional_call`` with the cached eta = 0 mapping).

Models: the kit's trained base when it is built, and kit tiny Qwen2 checkpoints (4 layers, hidden
256, the kit vocabulary) at two init scales: near-uniform distributions (the worst case for the
nucleus: every row needs a full sort) and peaked ones. Timings: best of ``--repeats`` rounds, the
paths interleaved round by round.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scoring.py [--prompts 4] [--G 4] [--tokens 96] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.modeling import causal_mask_from_padding, positions_from_padding
from entropy_guided_generation.scoring import GenerationConfig, SequenceProcessor


def timed_side_by_side(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time (seconds) of each run over ``repeats`` rounds after one warm-up round. Runs are
    interleaved round by round, so load from other processes hits every path alike."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


SIZES = dict(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=512)


def models():
    """[(description, model)]: the trained base when it is built, and tiny random kit checkpoints
    at two init scales: near-uniform distributions (every nucleus needs the full sort, the worst
    case) and peaked ones (closer to a trained model)."""
    out = []
    try:
        out.append(("kit trained base", kit.load_torchtune_model(kit.trained_base()).eval()))
    except FileNotFoundError:
        pass
    for init_std, regime in ((0.02, "near-uniform q"), (0.3, "peaked q")):
        ckpt = kit.build_tiny_checkpoint("qwen2", seed=0, init_std=init_std, **SIZES)
        out.append((f"kit tiny qwen2 4x256, init_std {init_std} ({regime})", kit.load_torchtune_model(ckpt).eval()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="B")
    parser.add_argument("--G", type=int, default=4, help="responses per prompt")
    parser.add_argument("--tokens", type=int, default=96, help="max new tokens per response")
    parser.add_argument("--tf-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = kit.load_tokenizer()
    for what, model in models():
        bench_one(what, model, tokenizer, args)
        print()


def bench_one(what: str, model, tokenizer, args) -> None:
    config = GenerationConfig(
        temperature=0.8, top_p=0.9, max_new_tokens=args.tokens, tf_batch_size=args.tf_batch_size,
        gen_batch_size=args.prompts * args.G, stop_strings=(),
    )
    sp = SequenceProcessor(model, tokenizer, config, progress=False)
    questions = [row["question"] for row in kit.gsm8k_examples(args.prompts, seed=1, split="test")]
    seqs = sp.generate_batched([kit.prompt_of(q) for q in questions], G=args.G, seed=0)
    scored = sum(sum(row) for row in seqs.gen_lens)
    B, G, L = seqs.sequences.shape

    rows = seqs.sequences.reshape(B * G, L)
    valid = seqs.attention_masks.reshape(B * G, L).bool()
    batches = [
        (rows[i : i + args.tf_batch_size], causal_mask_from_padding(valid[i : i + args.tf_batch_size]),
         positions_from_padding(valid[i : i + args.tf_batch_size]))
        for i in range(0, B * G, args.tf_batch_size)
    ]

    @torch.no_grad()
    def bare() -> None:
        for tokens, mask, pos in batches:
            model(tokens, mask=mask, input_pos=pos)

    zero = sp.build_params_override({}, 0.0)
    runs = {
        "bare forward (full logits)": bare,
        "teacher_force_logprobs": lambda: sp.teacher_force_logprobs(seqs),
        "  + compute_rb": lambda: sp.teacher_force_logprobs(seqs, compute_rb=True),
        "  + diagnostics (target <= 1.2)": lambda: sp.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True),
        "  + diagnostics, params override": lambda: sp.teacher_force_logprobs_with_diagnostics(
            seqs, compute_rb=True, params_override=zero
        ),
    }
    times = timed_side_by_side(runs, args.repeats)
    base = times["bare forward (full logits)"]
    _, diags = sp.teacher_force_logprobs_with_diagnostics(seqs)
    packs = [p for row in diags.diagnostics for p in row]
    mean_h = statistics.mean(p.sequence.rb_entropy.mean for p in packs)
    mean_support = statistics.mean(p.sequence.eff_support.mean for p in packs)

    print(f"model: {what}; vocab {sp._vocab_size()}; torch threads {torch.get_num_threads()}")
    print(f"batch: B={B} x G={G} rows of width {L} (prompt {seqs.prompt_length}), {scored} scored tokens, "
          f"tf_batch_size {args.tf_batch_size}, policy T=0.8 top_p=0.9; mean H(q) {mean_h:.2f} nats, "
          f"mean exp(H) {mean_support:.1f} tokens")
    print(f"{'path':<36} {'ms':>9} {'tokens/s':>10} {'x bare':>7}")
    for name, seconds in times.items():
        print(f"{name:<36} {seconds * 1e3:9.1f} {scored / seconds:10.0f} {seconds / base:7.2f}")


if __name__ == "__main__":
    main()
