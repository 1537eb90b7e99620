"""Train the kit's tiny mask predictor with the masked-diffusion objective, deterministically on CPU.

    python -m entropy_guided_generation.diffusion.train --out DIR  # train and write DIR

``pretrained.trained_mask_predictor()`` calls ``cached_predictor(TrainSettings())``: the same build,
once, into the kit cache.

Objective (LLaDA's SFT loss): per example draw a mask ratio t in (eps, 1] (stratified over the
batch), mask each response token with probability t, and minimise
sum over masked positions of -log p(x_i | noisy) / t, divided by the number of response tokens.
The prompt is never masked. Data: the kit's training-split arithmetic word problems.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from entropy_guided_generation import kit
from entropy_guided_generation.kit import data as kit_data
from entropy_guided_generation.kit import optim as kit_optim
from entropy_guided_generation.kit import tokenizer as kit_tokenizer
from entropy_guided_generation.kit.cache import cached_folder
from entropy_guided_generation.kit.optim import EpochBatches, adamw_decaying_matrices, optimizer_step, warmup_cosine_lr
from entropy_guided_generation.diffusion import mask_predictor
from entropy_guided_generation.diffusion.decoding import generate
from entropy_guided_generation.diffusion.experiments import heldout_problems, solve
from entropy_guided_generation.diffusion.mask_predictor import (
    PredictorSizes,
    TokenIds,
    build_mask_predictor,
    encode_problem,
    save_mask_predictor,
)
from entropy_guided_generation.generation import left_pad


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained weights (with the torch version and thread count)."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_problems: int = 20_000
    response_length: int = 40
    max_extra_padding: int = 4
    mask_eps: float = 1e-3
    sizes: PredictorSizes = field(default_factory=PredictorSizes)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    return warmup_cosine_lr(step, lr=settings.lr, warmup_steps=settings.warmup_steps, total_steps=settings.steps,
                            min_lr_ratio=settings.min_lr_ratio)


def stratified_mask_ratios(batch_size: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``[b]`` mask ratios in (eps, 1]: one uniform offset shared by b evenly spaced strata, so each
    batch covers the noise levels evenly (lower variance than b independent draws)."""
    offset = torch.rand((), generator=generator)
    t = (offset + torch.arange(batch_size) / batch_size) % 1.0
    return eps + (1 - eps) * (1 - t)  # 1 - t lies in (0, 1]


def mask_responses(responses: torch.Tensor, ratios: torch.Tensor, mask_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token of ``responses`` ``[b, r]`` with probability ``ratios[b]``: returns the noisy
    responses and the ``[b, r]`` boolean mask of masked positions."""
    is_masked = torch.rand(responses.shape, generator=generator) < ratios.unsqueeze(1)
    return responses.masked_fill(is_masked, mask_id), is_masked


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, is_masked: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """LLaDA's loss: sum over masked positions of cross-entropy / mask ratio, divided by the number
    of response tokens ``b * r`` (nats per token).

    Args:
        logits: ``[b, r, v]`` predictions at the response positions.
        targets: ``[b, r]`` clean response tokens.
        is_masked: ``[b, r]`` which positions were masked.
        ratios: ``[b]`` the mask ratio t of each row.
    """
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    weights = is_masked.float() / ratios.unsqueeze(1)
    return (ce * weights).sum() / targets.numel()


@dataclass
class EncodedProblems:
    """Training problems as token ids: prompts (variable length) and fixed-length responses ``[n, r]``."""

    prompts: list[list[int]]
    responses: torch.Tensor


def encode_training_set(tokenizer: Any, settings: TrainSettings) -> EncodedProblems:
    problems = kit.word_problems(settings.num_problems, settings.seed, "train")
    pairs = [encode_problem(tokenizer, p.question, p.answer, settings.response_length) for p in problems]
    return EncodedProblems([p for p, _ in pairs], torch.tensor([r for _, r in pairs], dtype=torch.long))


def batch_tokens(data: EncodedProblems, chosen: Sequence[int], extra_padding: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompts [b, w], responses [b, r])``: prompts left-padded to the longest chosen one plus
    ``extra_padding`` pads, so the predictor learns to ignore any amount of left padding."""
    prompts = [data.prompts[i] for i in chosen]
    width = max(len(p) for p in prompts) + extra_padding
    return left_pad(prompts, pad_id, width=width), data.responses[list(chosen)]


def train(settings: TrainSettings, log_every: int = 100, progress: bool = True):
    """Train a fresh predictor; returns ``(model, tokenizer, ids, seconds)`` (model in eval mode).

    Batches come from a ``random.Random(seed)`` shuffle, noise from a ``torch.Generator(seed)``:
    the run is a pure function of ``settings`` on a given thread count.
    """
    tokenizer = kit.load_tokenizer()
    ids = TokenIds.from_tokenizer(tokenizer, kit.vocab_size_of())
    model = build_mask_predictor(ids, settings.sizes, settings.seed)
    data = encode_training_set(tokenizer, settings)
    order_rng = random.Random(settings.seed)  # batch order and the per-batch extra padding
    batches = EpochBatches(len(data.prompts), settings.batch_size, order_rng)
    noise = torch.Generator().manual_seed(settings.seed)
    optimizer = adamw_decaying_matrices(model, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(settings.steps), desc="train mask predictor", disable=not progress, mininterval=10):
        chosen = batches.next()
        prompts, responses = batch_tokens(data, chosen, order_rng.randint(0, settings.max_extra_padding), ids.pad_id)
        ratios = stratified_mask_ratios(len(chosen), settings.mask_eps, noise)
        noisy, is_masked = mask_responses(responses, ratios, ids.mask_id, noise)
        logits = model(torch.cat([prompts, noisy], dim=1)).logits[:, prompts.shape[1] :]
        loss = masked_diffusion_loss(logits, responses, is_masked, ratios)
        optimizer_step(model, optimizer, loss, lr=learning_rate(step, settings), grad_clip=settings.grad_clip)
        if log_every and (step % log_every == 0 or step == settings.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {learning_rate(step, settings):.2e}  {time.perf_counter() - start:.0f}s", flush=True)
    return model.eval(), tokenizer, ids, time.perf_counter() - start


# Baseline decoding the card's held-out accuracy is measured with (one token per step, blocks of 8).
EVAL_DECODING = {"steps": 40, "gen_length": 40, "block_length": 8, "remasking": "low_confidence"}


def build_predictor(out_dir: Path, settings: TrainSettings, threads: int, eval_n: int = 200, log_every: int = 100) -> dict[str, Any]:
    """Train, measure held-out accuracy with baseline decoding and write the folder (replaced whole)."""
    torch.set_num_threads(threads)
    model, tokenizer, ids, seconds = train(settings, log_every)
    result = solve(model, tokenizer, ids, heldout_problems(eval_n), generate, **EVAL_DECODING)
    card = {
        "settings": asdict(settings),
        "token_ids": asdict(ids),
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "torch": torch.__version__,
        "heldout_accuracy": result.accuracy,
        "heldout_problems": eval_n,
        "eval_decoding": EVAL_DECODING,
        "layout": "left-padded prompt_of(question) with <|endoftext|>, then answer + <|im_end|> fill to response_length",
    }
    with tempfile.TemporaryDirectory(prefix="egg-predictor-") as scratch:
        staged = save_mask_predictor(model, Path(scratch) / "predictor", card)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staged, out_dir)
    return card


BUILD_THREADS = 2  # the weights depend on the thread count; the shipped predictor was built with 2.
# On a CPU shared with other jobs, --threads 1 avoids two threads contending with them (README, "The offline kit").


def cached_predictor(settings: TrainSettings, eval_n: int = 200) -> Path:
    """``<kit cache>/mask-predictor-<hash>``, trained with ``BUILD_THREADS`` threads on first use.

    The hash covers ``settings``, ``eval_n``, the torch version and the source files of training,
    the predictor and the kit data/tokenizer. The caller's torch thread count and RNG state are restored.
    """
    spec = {"settings": asdict(settings), "eval_n": eval_n, "threads": BUILD_THREADS, "torch": torch.__version__}
    # What determines the weights; the card's accuracy is a record of the decoding code at build time.
    sources = tuple(Path(m.__file__) for m in (sys.modules[__name__], mask_predictor, kit_data, kit_optim, kit_tokenizer))

    def build(folder: Path) -> None:
        threads = torch.get_num_threads()
        try:
            with torch.random.fork_rng():
                build_predictor(folder, settings, BUILD_THREADS, eval_n, log_every=0)
        finally:
            torch.set_num_threads(threads)

    return cached_folder("mask-predictor", spec, build, sources)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced as a whole)")
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--threads", type=int, default=BUILD_THREADS, help="torch CPU threads (results are reproducible per thread count)")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems for the accuracy")
    args = parser.parse_args(argv)
    card = build_predictor(args.out, TrainSettings(seed=args.seed, steps=args.steps, batch_size=args.batch_size), args.threads, args.eval_n)
    print(f"trained in {card['train_seconds']:.0f}s; held-out accuracy {card['heldout_accuracy']:.3f} on {args.eval_n} problems -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
