"""Full mode's eval throughput against answer mode's, side by side in one run, on lm-eval's 5-shot GSM8K.

The shipped ``configs/entropy_intl/gsm8k_eval.yaml`` (lm-eval's own gsm8k task, 5-shot, read from the
kit's GSM8K-format JSONL) evaluates two one-step finetunes of the kit's Llama-3.2-shaped stand-in (the
real tiktoken-format tokenizer and 128,256-token vocabulary, tiny dims) made by
``configs/entropy_intl/1B_single_device.yaml``, one trained in mode ``full`` and one in mode
``answer`` from the same base and data. In full mode every few-shot prompt (about 800 tokens) is
interleaved with confidence tokens by the exact fixed point before the first content token; answer
mode feeds the prompt plain. Each finetune's ``evaluate()`` (lm-eval's evaluator: prefill, decoding,
scoring) is timed, alternating, ``--repeats`` times, each time with a fresh recipe; the median counts.
Full mode finds the shared 5-shot examples' exact bins once per run (the decoder's prompt-bins
cache, :class:`~entropy_guided_generation.generation.prompt_bins.PromptBinsCache`): the first batch
pays for them, later batches only for their questions, so the ratio grows with ``--limit`` (a real
GSM8K run has 1,319 problems).

Prints documents/s and content tokens/s per mode and their ratio full / answer. Target (issue 20):
>= 0.4 (the 4-pass-capped fixed point of before made it about 0.01).

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_modes.py [--limit 32] [--max-gen-toks 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.kit import standin_size_overrides
from entropy_guided_generation.training import run_recipe

REPO = Path(__file__).resolve().parents[1]
STANDIN = "kit:llama3_2_1b_standin"
MODES = ("full", "answer")


def standin() -> list[str]:
    return [f"checkpointer.checkpoint_dir={STANDIN}", f"tokenizer.path={STANDIN}/original/tokenizer.model",
            *standin_size_overrides("llama3_2_1b")]


def finetune(mode: str, out: Path) -> Path:
    """One optimizer step of the shipped 1B config in ``mode`` on the stand-in; its ``epoch_0`` folder."""
    overrides = [
        *standin(), "dataset.data_files=kit:gsm8k/train.jsonl", "dataset_val.data_files=kit:gsm8k/train.jsonl",
        "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "gradient_accumulation_steps=1", "max_val_batches=1",
        "tokenizer.max_seq_len=256", "device=cpu", "dtype=fp32", f"output_dir={out}", f"metric_logger.log_dir={out}/logs",
        f"interleaving.mode={mode}",
    ]
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/entropy_intl/1B_single_device.yaml"), OmegaConf.from_dotlist(overrides))
    run_recipe(cfg, mode=mode)
    return out / "epoch_0"


def eval_recipe(finetune_dir: Path, out: Path, args: argparse.Namespace) -> EleutherEvalRecipeDirect:
    overrides = [
        *standin(), f"checkpointer.checkpoint_dir={finetune_dir}", "data_dir=kit:gsm8k", f"limit={args.limit}",
        f"max_gen_toks={args.max_gen_toks}", f"batch_size={args.batch_size}", "bootstrap_iters=0", "device=cpu",
        "dtype=fp32", f"output_dir={out}",
    ]
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/entropy_intl/gsm8k_eval.yaml"), OmegaConf.from_dotlist(overrides))
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=32, help="GSM8K test problems per run")
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        finetunes = {mode: finetune(mode, root / f"train_{mode}") for mode in MODES}
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        summaries: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for mode in MODES:
                # A fresh recipe each time: its decoder's prompt-bins cache starts empty, as in a real run.
                recipe = eval_recipe(finetunes[mode], root / f"eval_{mode}_{repeat}", args)
                start = time.perf_counter()
                summaries[mode] = recipe.evaluate()
                seconds[mode].append(time.perf_counter() - start)
    print(f"lm-eval gsm8k 5-shot on the Llama-3.2-shaped stand-in (vocabulary 128,256), {args.limit} problems, "
          f"max_gen_toks {args.max_gen_toks}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'mode':8s} {'eval s':>8s} {'docs/s':>8s} {'content tok/s':>14s} {'decode tok/s':>13s}")
    rate = {}
    for mode in MODES:
        s = statistics.median(seconds[mode])
        summary = summaries[mode]
        rate[mode] = args.limit / s
        print(f"{mode:8s} {s:8.2f} {rate[mode]:8.3f} {summary['decode_tokens'] / s:14.1f} {summary['decode_tokens_per_s']:13.1f}")
    print(f"full / answer throughput (docs/s): {rate['full'] / rate['answer']:.3f}   target >= 0.4")


if __name__ == "__main__":
    main()
