"""Entropix sampler overhead, side by side in one run on kit tiny Qwen2 checkpoints (same weights
for every decoder of a size).

Prints content tokens/s at batch 1 and 8 for
- Hugging Face ``generate`` with ``HookBasedEntropySampler`` vs plain sampling (temperature 0.666,
  top-k 27, top-p 0.9: the sampler's base settings), and
- our torchtune decoder ``generate_entropix`` vs our plain decoder ``generate_plain`` (same settings),
and each sampler / plain time ratio. Target (issue 10): <= 1.15 both.

The sampler adds a fixed amount of work per step (about a hundred small tensor ops for the metrics,
the regime and the candidate draw), so its ratio depends on how long the model's own step takes:
by default the run covers the kit's smallest checkpoint (hidden 64, 2 layers: a 0.7 ms step on one
CPU thread) and the 4 x 256 checkpoint bench/scoring.py uses.

    OMP_NUM_THREADS=1 .venv/bin/python bench/entropix.py [--tokens 64] [--repeats 5] [--sizes 64x2,256x4]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.generation import generate_plain
from entropy_guided_generation.sampling import HookBasedEntropySampler, generate_entropix

BASE = dict(temperature=0.666, top_k=27, top_p=0.9)


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (seconds) of each function over ``repeats`` rounds, after one warm-up round;
    each round runs every function once in turn, so load from other processes hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="content tokens generated per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="64x2,256x4", help="comma-separated HIDDENxLAYERS checkpoints")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        hidden, layers = (int(part) for part in size.lower().split("x"))
        bench_size(hidden, layers, args.tokens, args.repeats)
        print()


def bench_size(hidden: int, layers: int, T: int, repeats: int) -> None:
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    sizes = {} if (hidden, layers) == (64, 2) else {"hidden_size": hidden, "num_layers": layers, "intermediate_size": 2 * hidden}
    ckpt = kit.build_tiny_checkpoint("qwen2", **sizes)
    tokenizer = kit.load_tokenizer()
    model = kit.load_torchtune_model(ckpt).eval()
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_id
    prompt_ids = tokenizer.encode("Tom has 12 apples and buys 7 more. How many apples does he have now?\n", add_bos=False, add_eos=False)
    print(f"kit tiny Qwen2: hidden {hidden}, {layers} layers, vocab {kit.vocab_size_of()}; "
          f"{T} tokens per row, median of {repeats}; torch threads {torch.get_num_threads()}")

    rows = []
    for batch in (1, 8):
        prompt = torch.tensor([prompt_ids] * batch)
        mask = torch.ones_like(prompt)

        def hf_plain() -> object:
            return hf_model.generate(prompt, attention_mask=mask, max_new_tokens=T, min_new_tokens=T, do_sample=True,
                                     pad_token_id=pad_id, eos_token_id=None, **BASE)

        def hf_entropix() -> object:
            with HookBasedEntropySampler(hf_model, tokenizer, None, None) as sampler:
                return hf_model.generate(prompt, attention_mask=mask, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                                         pad_token_id=pad_id, eos_token_id=None, logits_processor=[sampler])

        def ours_plain() -> object:
            return generate_plain(model, prompt, max_generated_tokens=T, pad_id=pad_id, **BASE)

        def ours_entropix() -> object:
            return generate_entropix(model, prompt, max_generated_tokens=T, pad_id=pad_id)

        with torch.inference_mode():
            times = timed_interleaved({
                "HF generate, plain sampling": hf_plain, "HF generate + entropix": hf_entropix,
                "ours plain": ours_plain, "ours entropix": ours_entropix,
            }, repeats)
        for name, seconds in times.items():
            rows.append((batch, name, batch * T / seconds, float("nan")))
        rows.append((batch, "HF entropix / plain time", float("nan"), times["HF generate + entropix"] / times["HF generate, plain sampling"]))
        rows.append((batch, "ours entropix / plain time", float("nan"), times["ours entropix"] / times["ours plain"]))

    print(f"{'batch':>5}  {'decoder':<30} {'tokens/s':>10} {'ratio':>8}")
    for batch, name, tps, ratio in rows:
        tps_s = f"{tps:10.1f}" if tps == tps else " " * 10
        ratio_s = f"{ratio:8.3f}" if ratio == ratio else ""
        print(f"{batch:>5}  {name:<30} {tps_s} {ratio_s}")


if __name__ == "__main__":
    main()
