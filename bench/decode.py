"""Decode throughput, side by side in one run, on the kit's tiny Qwen2 (same weights everywhere).

Prints content tokens/s for our plain decoder, torchtune.generation.generate (KV-cached), Hugging
Face generate, and each interleaved mode, at batch 1 and 8; and the limit ratio: the cost of a
KV-cached 2-token step over a 1-token step, which bounds what interleaving can cost.

Targets (issue 4): interleaved / plain <= 1.05 x limit; our none <= 0.9 x torchtune's time.

    .venv/bin/python bench/decode.py [--tokens 64] [--repeats 3] [--checkpoint HF_DIR]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.generation import get_decoder, kv_session


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_cost_ratio(model, batch: int, prompt_len: int, steps: int, repeats: int) -> float:
    """Time of ``steps`` KV-cached 2-token feeds over ``steps`` 1-token feeds (same model, batch)."""

    def run(width: int) -> None:
        with kv_session(model, batch, prompt_len + width * steps) as session:
            tokens = torch.full((batch, prompt_len), 5, dtype=torch.long)
            valid = torch.ones_like(tokens, dtype=torch.bool)
            session.feed(tokens, valid, torch.full((batch,), prompt_len - 1))
            step = torch.full((batch, width), 7, dtype=torch.long)
            ones = torch.ones_like(step, dtype=torch.bool)
            last = torch.full((batch,), width - 1)
            for _ in range(steps):
                session.feed(step, ones, last)

    return timed(lambda: run(2), repeats) / timed(lambda: run(1), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="content tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=None, help="HF checkpoint folder (default: the kit's trained base)")
    args = parser.parse_args()
    torch.manual_seed(0)

    from torchtune.generation import generate as torchtune_generate
    from transformers import AutoModelForCausalLM

    ckpt = args.checkpoint or kit.trained_base()
    tokenizer = kit.load_tokenizer()
    model = kit.load_torchtune_model(ckpt).eval()
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}}, tokenizer=tokenizer)
    pad_id = tokenizer.pad_id
    question = "Tom has 12 apples and buys 7 more. How many apples does he have now?\n"
    prompt_ids = tokenizer.encode(question, add_bos=False, add_eos=False)
    T = args.tokens
    never = [-1]  # a marker that is never generated: marker mode stays interleaved, like answer

    rows = []
    for batch in (1, 8):
        prompt = torch.tensor([prompt_ids] * batch)

        def ours(mode: str) -> Callable[[], object]:
            extra = {"codec": codec} if mode != "none" else {}
            if mode == "marker":
                extra["marker"] = never
            return lambda: get_decoder(mode)(model, prompt, max_generated_tokens=T, pad_id=pad_id, temperature=0.0, **extra)

        def tt() -> object:
            model.setup_caches(batch, torch.float32, decoder_max_seq_len=prompt.shape[1] + T)
            try:
                return torchtune_generate(model, prompt, max_generated_tokens=T, pad_id=pad_id, temperature=1e-6, top_k=1)
            finally:
                from torchtune.modules.common_utils import delete_kv_caches

                delete_kv_caches(model)

        def hf() -> object:
            return hf_model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=T, min_new_tokens=T, do_sample=False,
                pad_token_id=pad_id,
            )

        with torch.inference_mode():
            times = {name: timed(fn, args.repeats) for name, fn in [
                ("ours none", ours("none")), ("torchtune generate", tt), ("HF generate", hf),
                ("ours answer", ours("answer")), ("ours full", ours("full")), ("ours marker", ours("marker")),
            ]}
            limit = step_cost_ratio(model, batch, prompt.shape[1], T, args.repeats)
        base = times["ours none"]
        for name, seconds in times.items():
            rows.append((batch, name, batch * T / seconds, seconds / base))
        rows.append((batch, "limit: 2-token / 1-token step", float("nan"), limit))
        for mode in ("answer", "full", "marker"):
            rows.append((batch, f"{mode} / none over limit", float("nan"), times[f"ours {mode}"] / base / limit))
        rows.append((batch, "ours none / torchtune", float("nan"), base / times["torchtune generate"]))

    print(f"\n{'batch':>5}  {'decoder':<32} {'tokens/s':>10} {'ratio':>8}")
    for batch, name, tps, ratio in rows:
        tps_s = f"{tps:10.1f}" if tps == tps else " " * 10
        print(f"{batch:>5}  {name:<32} {tps_s} {ratio:8.3f}")


if __name__ == "__main__":
    main()
