"""Decode throughput, side by side in one run, on the kit's tiny Qwen2 and/or a real model (same weights everywhere).

Prints content tokens/s for our plain decoder, torchtune.generation.generate (KV-cached), Hugging
Face generate, and each interleaved mode, at batch 1 and 8; and the limit ratio: the cost of a
KV-cached 2-token step over a 1-token step, which bounds what interleaving can cost. ``full/plain``
and ``answer/plain`` are the modes under ``confidence.context: plain`` (a plain twin per row on the
same session; mode full's prompt bins from the twin's prompt forward).

``--model kit`` (default): the kit's trained base, one short word problem. ``--model smollm2``: the
kit's SmolLM2-135M-Instruct (dequantized from Q4_1) on real GSM8K prompts in lm-eval's format
(``--shots`` train examples, then a test question per row, left-padded), the confidence tokens its
unused specials 3..13 with their rows at the mean embedding; ``--model kit smollm2`` prints both.

Targets (issue 4): interleaved / plain <= 1.05 x limit; our none <= 0.9 x torchtune's time. Issue 32:
full/plain <= 2.5 x none on SmolLM2, 5-shot GSM8K prompts, batch 4, 48 tokens.

    .venv/bin/python bench/decode.py [--tokens 64] [--repeats 3] [--checkpoint HF_DIR]
        [--model kit smollm2] [--batch 1 8] [--shots 5] [--decoders none full full/plain ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import torch

import real_model
from entropy_guided_generation import kit
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.generation import get_decoder, kv_session
from entropy_guided_generation.generation.padding import left_pad


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


@dataclass
class DecodeCase:
    """One model measured: the torchtune decoder and the HF model with the same weights, its codec and
    pad id, and ``prompt(batch)`` giving a left-padded ``[batch, n]`` prompt."""

    name: str
    model: Any
    hf_model: Any
    codec: ConfidenceCodec
    pad_id: int
    prompt: Callable[[int], torch.Tensor]


def kit_case(checkpoint: str | None) -> DecodeCase:
    """The kit's trained base (or ``checkpoint``), one short word problem repeated over the batch."""
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint or kit.trained_base()
    tokenizer = kit.load_tokenizer()
    codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}}, tokenizer=tokenizer)
    question = "Tom has 12 apples and buys 7 more. How many apples does he have now?\n"
    prompt_ids = tokenizer.encode(question, add_bos=False, add_eos=False)
    return DecodeCase(
        "kit", kit.load_torchtune_model(ckpt).eval(), AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(),
        codec, tokenizer.pad_id, lambda batch: torch.tensor([prompt_ids] * batch),
    )


def smollm2_case(shots: int) -> DecodeCase:
    """SmolLM2-135M-Instruct, row i a ``shots``-shot lm-eval GSM8K prompt ending in test question i."""
    tokenizer = real_model.smollm2_tokenizer()
    codec = real_model.smollm2_codec(tokenizer)

    def prompt(batch: int) -> torch.Tensor:
        rows = [tokenizer.encode(text, add_bos=False, add_eos=False) for text in real_model.few_shot_prompts(shots, batch)]
        return left_pad(rows, tokenizer.pad_id)

    return DecodeCase(
        real_model.SMOLLM2, real_model.load_smollm2(codec), real_model.load_smollm2_hf(codec), codec, tokenizer.pad_id, prompt
    )


DECODERS = ("none", "torchtune", "hf", "answer", "full", "marker", "answer/plain", "full/plain")
"""Decoders measured: ours per mode (``<mode>/plain``: under ``confidence.context: plain``), torchtune's
and Hugging Face's generate."""


def measure(
    case: DecodeCase, batch: int, T: int, repeats: int, decoders: Tuple[str, ...] = DECODERS
) -> List[Tuple[str, int, int, str, float, float]]:
    """Rows ``(model, batch, prompt tokens, decoder, content tokens/s, ratio)`` of one model at one batch."""
    from torchtune.generation import generate as torchtune_generate
    from torchtune.modules.common_utils import delete_kv_caches

    model, pad_id = case.model, case.pad_id
    prompt = case.prompt(batch)
    never = [-1]  # a marker that is never generated: marker mode stays interleaved, like answer

    def ours(name: str) -> Callable[[], object]:
        mode, _, context = name.partition("/")
        extra = {"codec": dataclasses.replace(case.codec, context=context or "interleaved")} if mode != "none" else {}
        if mode == "marker":
            extra["marker"] = never
        return lambda: get_decoder(mode)(model, prompt, max_generated_tokens=T, pad_id=pad_id, temperature=0.0, **extra)

    def tt() -> object:
        model.setup_caches(batch, torch.float32, decoder_max_seq_len=prompt.shape[1] + T)
        try:
            return torchtune_generate(model, prompt, max_generated_tokens=T, pad_id=pad_id, temperature=1e-6, top_k=1)
        finally:
            delete_kv_caches(model)

    def hf() -> object:
        return case.hf_model.generate(
            prompt, attention_mask=(prompt != pad_id).long(), max_new_tokens=T, min_new_tokens=T, do_sample=False,
            pad_token_id=pad_id,
        )

    named = {"torchtune": ("torchtune generate", tt), "hf": ("HF generate", hf)}
    runs = [named[name] if name in named else (f"ours {name}", ours(name)) for name in ("none", *decoders)]
    with torch.inference_mode():
        times = {label: timed(fn, repeats) for label, fn in runs}
        limit = step_cost_ratio(model, batch, prompt.shape[1], T, repeats)
    base = times["ours none"]
    n = int((prompt != pad_id).sum(1).max())
    rows = [(case.name, batch, n, name, batch * T / seconds, seconds / base) for name, seconds in times.items()]
    rows.append((case.name, batch, n, "limit: 2-token / 1-token step", float("nan"), limit))
    for mode in ("answer", "full", "marker", "answer/plain", "full/plain"):
        if f"ours {mode}" in times:
            rows.append((case.name, batch, n, f"{mode} / none over limit", float("nan"), times[f"ours {mode}"] / base / limit))
    if "torchtune generate" in times:
        rows.append((case.name, batch, n, "ours none / torchtune", float("nan"), base / times["torchtune generate"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="content tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=None, help="HF checkpoint folder for --model kit (default: the kit's trained base)")
    parser.add_argument("--model", nargs="+", default=["kit"], choices=real_model.MODELS, help="models measured, one after another")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shots", type=int, default=5, help="GSM8K train examples before each question (--model smollm2)")
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=DECODERS,
                        help="decoders measured beside ours none (every ratio is to it)")
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = []
    for name in args.model:
        case = kit_case(args.checkpoint) if name == "kit" else smollm2_case(args.shots)
        for batch in args.batch:
            rows += measure(case, batch, args.tokens, args.repeats, tuple(d for d in args.decoders if d != "none"))

    print(f"\n{args.tokens} content tokens per row, greedy; prompt = longest prompt row in tokens")
    if real_model.SMOLLM2 in args.model:
        print(f"{real_model.SMOLLM2_ABOUT}; prompts: {args.shots}-shot lm-eval GSM8K, test question i in row i")
    print(f"{'model':<8} {'batch':>5} {'prompt':>6}  {'decoder':<32} {'tokens/s':>10} {'ratio':>8}")
    for model_name, batch, n, name, tps, ratio in rows:
        tps_s = f"{tps:10.1f}" if tps == tps else " " * 10
        print(f"{model_name:<8} {batch:>5} {n:>6}  {name:<32} {tps_s} {ratio:8.3f}")


if __name__ == "__main__":
    main()
