"""Train the kit's tiny base model on its arithmetic word problems, deterministically on CPU.

The result is a Hugging Face ``Qwen2ForCausalLM`` checkpoint (fp32 safetensors + the kit tokenizer's
files) that solves a measurable share of held-out problems with greedy decoding. A copy ships in
``entropy_guided_generation/kit/assets/``; this module rebuilds it::

    python -m entropy_guided_generation.kit.train_base            # writes kit/assets/
    python -m entropy_guided_generation.kit.train_base --out DIR  # anywhere else

Training sequence: ``prompt_of(question)`` tokens (no loss) then ``answer`` tokens + eos
(``<|im_end|>``), cross-entropy on the response only; right padding with ``<|endoftext|>``.

A *mixed-format* base (``--confidence-rows P``, not the shipped one) also sees a share P of its rows
with random confidence tokens ``<|conf_k|>`` inserted (k uniform, never a target): after every
response token in half of them, after every token but the first in the other half (the layouts of
modes answer and full). The bins carry no information; the model only learns that such tokens
occur and how to predict the next content token across one. ``confidence_positions`` is the
position rule of the inserted tokens (``sequential``, or ``shared``: the position of the token
they follow).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from entropy_guided_generation.kit import data
from entropy_guided_generation.kit import tokenizer as kit_tokenizer
from entropy_guided_generation.kit.cache import cached_folder
from entropy_guided_generation.kit.models import hf_config
from entropy_guided_generation.kit.optim import EpochBatches, adamw_decaying_matrices, optimizer_step, warmup_cosine_lr
from entropy_guided_generation.positions import POSITION_RULES, check_position_rule, position_rule

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CARD_FILENAME = "base_card.json"
IGNORE_INDEX = -100
PathLike = Union[str, Path]


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained weights (with the torch version and thread count)."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_problems: int = 40_000
    confidence_rows: float = 0.0
    confidence_positions: str = "sequential"
    sizes: dict[str, Any] = field(
        default_factory=lambda: {
            "num_layers": 3,
            "hidden_size": 128,
            "num_heads": 4,
            "num_kv_heads": 4,
            "intermediate_size": 384,
            "max_seq_len": 512,  # positions only: the rotary table does not depend on it
            "tie_word_embeddings": True,
        }
    )


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + eos, and labels (``IGNORE_INDEX`` on the prompt).

    Prompt and response are encoded separately, as torchtune's dataset transforms do, so the
    boundary tokens equal those a user's prompt encodes to at inference.
    """
    prompt = tokenizer.encode(data.prompt_of(question), add_bos=False, add_eos=False)
    response = tokenizer.encode(answer, add_bos=False, add_eos=False) + [tokenizer.eos_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def insert_random_confidence(
    tokens: list[int], labels: list[int], prompt_len: int, conf_ids: Sequence[int], rng: random.Random, whole_row: bool
) -> tuple[list[int], list[int], list[bool]]:
    """``tokens``/``labels`` with a random confidence id after every response token but the last
    (eos), or after every token but the first and the eos when ``whole_row``; returns them and a mask
    of the inserted tokens (their label is ``IGNORE_INDEX``)."""
    out_t, out_l, is_conf = [], [], []
    last = len(tokens) - 1
    for i, (t, l) in enumerate(zip(tokens, labels)):
        out_t.append(t)
        out_l.append(l)
        is_conf.append(False)
        if i < last and (i >= prompt_len or (whole_row and i > 0)):
            out_t.append(rng.choice(conf_ids))
            out_l.append(IGNORE_INDEX)
            is_conf.append(True)
    return out_t, out_l, is_conf


def position_ids(is_conf: torch.Tensor, rule: str) -> torch.Tensor:
    """``[b, s]`` position ids of unpadded rows under the position rule named ``rule``
    (:class:`~entropy_guided_generation.positions.PositionRule`): ``sequential`` counts every token;
    ``shared`` gives an inserted confidence token the position of the token it follows."""
    return position_rule(rule).position_ids(torch.ones_like(is_conf, dtype=torch.bool), is_conf)


def pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """``[b, max_len]`` long tensor of ``rows`` right-padded with ``value``."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    return warmup_cosine_lr(step, lr=settings.lr, warmup_steps=settings.warmup_steps, total_steps=settings.steps,
                            min_lr_ratio=settings.min_lr_ratio)


def _new_model(settings: TrainSettings, tokenizer, vocab_size: int):
    from transformers import Qwen2ForCausalLM

    config = hf_config("qwen2", vocab_size, tokenizer.eos_id, tokenizer.pad_id, **settings.sizes)
    torch.manual_seed(settings.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = [tokenizer.eos_id, tokenizer.pad_id]
    model.generation_config.pad_token_id = tokenizer.pad_id
    return model


def mix_confidence_rows(examples: list[tuple[list[int], list[int]]], tokenizer, settings: TrainSettings) -> list[tuple[list[int], list[int], list[bool]]]:
    """``(tokens, labels, is_conf)`` per example: a ``confidence_rows`` share of them (drawn by their
    own seeded generator, so the batch order is that of the plain base) with random confidence tokens
    inserted (see the module docstring)."""
    if not 0.0 <= settings.confidence_rows <= 1.0:
        raise ValueError(f"confidence_rows must lie in [0, 1], got {settings.confidence_rows!r}")
    position_ids(torch.zeros(1, 1, dtype=torch.bool), settings.confidence_positions)  # checks the rule's name
    rng = random.Random(f"confidence-rows-{settings.seed}")
    conf_ids = [tokenizer.special_tokens[name] for name in kit_tokenizer.CONFIDENCE_TOKENS]
    mixed = []
    for tokens, labels in examples:
        prompt_len = sum(1 for label in labels if label == IGNORE_INDEX)
        if settings.confidence_rows and rng.random() < settings.confidence_rows:
            mixed.append(insert_random_confidence(tokens, labels, prompt_len, conf_ids, rng, whole_row=rng.random() < 0.5))
        else:
            mixed.append((tokens, labels, [False] * len(tokens)))
    return mixed


def train(settings: TrainSettings, log_every: int = 100):
    """Train a fresh base model; returns ``(model, tokenizer, seconds)``.

    Batches are drawn by a ``random.Random(seed)`` shuffle of the encoded training problems (one
    epoch after another), so the run is a pure function of ``settings`` on a given thread count.
    """
    tokenizer = kit_tokenizer.load_tokenizer()
    model = _new_model(settings, tokenizer, kit_tokenizer.vocab_size_of())
    examples = [encode_example(tokenizer, p.question, p.answer) for p in data.word_problems(settings.num_problems, settings.seed, "train")]
    examples = mix_confidence_rows(examples, tokenizer, settings)
    batches = EpochBatches(len(examples), settings.batch_size, random.Random(settings.seed))
    optimizer = adamw_decaying_matrices(model, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        chosen = [examples[i] for i in batches.next()]
        tokens = pad_right([e[0] for e in chosen], tokenizer.pad_id)
        labels = pad_right([e[1] for e in chosen], IGNORE_INDEX)
        is_conf = pad_right([e[2] for e in chosen], 0).bool()
        # Right padding under a causal mask: real tokens never see pads, pad labels are ignored.
        loss = model(input_ids=tokens, labels=labels, position_ids=position_ids(is_conf, settings.confidence_positions)).loss
        optimizer_step(model, optimizer, loss, lr=learning_rate(step, settings), grad_clip=settings.grad_clip)
        if log_every and (step % log_every == 0 or step == settings.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {learning_rate(step, settings):.2e}  {time.perf_counter() - start:.0f}s", flush=True)
    return model.eval(), tokenizer, time.perf_counter() - start


def save_trained_checkpoint(model, out_dir: PathLike, card: dict[str, Any], card_filename: str) -> Path:
    """Save a kit-trained transformers ``model`` (fp32 safetensors + config), the kit tokenizer files
    and its training card (``card_filename``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    kit_tokenizer.copy_tokenizer_files(kit_tokenizer.build_tokenizer(), out_dir)
    (out_dir / card_filename).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out_dir


def save_base(model, out_dir: PathLike, card: dict[str, Any]) -> Path:
    """Save the base ``model``, the kit tokenizer files and ``base_card.json`` into ``out_dir``."""
    return save_trained_checkpoint(model, out_dir, card, CARD_FILENAME)


# ---------------------------------------------------------------- held-out accuracy


@torch.no_grad()
def greedy_responses(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy continuations (HF ``generate``, left-padded batches) of ``prompt_of(q)`` for each question,
    decoded up to the first eos / pad (excluded)."""
    stops = {tokenizer.eos_id, tokenizer.pad_id}
    responses = []
    for begin in range(0, len(questions), batch_size):
        prompts = [tokenizer.encode(data.prompt_of(q), add_bos=False, add_eos=False) for q in questions[begin : begin + batch_size]]
        width = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)
        attention = torch.zeros_like(tokens)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=tokens, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_id,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            responses.append(tokenizer.decode(row[:cut]))
    return responses


def answer_or_none(response: str) -> Optional[int]:
    """The ``#### n`` answer of a generated response, or None when it has none."""
    try:
        return data.final_answer(response)
    except ValueError:
        return None


def heldout_accuracy(checkpoint_dir: PathLike, n: int = 200, seed: int = 1) -> float:
    """Share of ``n`` held-out (test-split) kit problems whose greedy ``#### n`` answer is right.

    Args:
        checkpoint_dir: HF checkpoint folder with the kit tokenizer files (e.g. ``trained_base()``).
        n: number of test problems.
        seed: which test problems.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
    tokenizer = kit_tokenizer.load_tokenizer(folder=Path(checkpoint_dir))
    problems = data.word_problems(n, seed, "test")
    responses = greedy_responses(model, tokenizer, [p.question for p in problems])
    return sum(answer_or_none(r) == p.result for r, p in zip(responses, problems)) / n


# ---------------------------------------------------------------- the shipped base and the mixed-format base

MIXED_CONFIDENCE_ROWS = 0.5
MIXED_BUILD_VERSION = 1


def trained_base() -> Path:
    """The HF checkpoint folder of the kit's trained base model (``kit/assets/``, shipped).

    The folder is read-only by contract: write finetunes elsewhere. Rebuild it with
    ``python -m entropy_guided_generation.kit.train_base``.

    Raises:
        FileNotFoundError: if the shipped files are missing (rebuild them with the command above).
    """
    required = ("config.json", "model.safetensors", CARD_FILENAME, *kit_tokenizer.TOKENIZER_FILES)
    missing = [name for name in required if not (ASSETS_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the trained base in {ASSETS_DIR} lacks {', '.join(missing)}; "
            "rebuild it with `python -m entropy_guided_generation.kit.train_base`"
        )
    return ASSETS_DIR


def mixed_format_base(positions: str = "sequential", log=print) -> Path:
    """The kit's mixed-format base for inserted tokens at ``positions``: a base trained like the
    shipped one (same steps, data and seed) whose rows carry random confidence tokens with probability
    ``MIXED_CONFIDENCE_ROWS`` (see the module docstring). Read from ``kit/assets/mixed_base_<positions>/``
    when shipped there, else trained once on one thread (as long as the shipped base; README's "The
    offline kit" says how long) and cached in ``$EGG_KIT_CACHE``.

    Raises:
        ValueError: on an unknown position rule.
    """
    positions = check_position_rule(positions)
    shipped = ASSETS_DIR / f"mixed_base_{positions}"
    if (shipped / "model.safetensors").is_file():
        return shipped
    settings = TrainSettings(confidence_rows=MIXED_CONFIDENCE_ROWS, confidence_positions=positions)

    def build(folder: Path) -> None:
        log(f"training the kit's mixed-format base ({positions} positions) once, on one thread: minutes")
        threads = torch.get_num_threads()
        try:
            card = build_base(folder, settings, threads=1, log_every=200)
        finally:
            torch.set_num_threads(threads)
        log(f"mixed-format base trained in {card['train_seconds']:.0f}s; plain held-out accuracy {card['heldout_accuracy']:.3f}")

    spec = {"settings": asdict(settings), "version": MIXED_BUILD_VERSION, "torch": torch.__version__}
    return cached_folder("mixed-base", spec, build)


def base_card(checkpoint_dir: Optional[PathLike] = None) -> dict[str, Any]:
    """The training record of a base checkpoint (settings, seconds, held-out accuracy)."""
    return json.loads((Path(checkpoint_dir or trained_base()) / CARD_FILENAME).read_text())


def build_base(out_dir: PathLike, settings: TrainSettings, threads: int, eval_n: int = 200, log_every: int = 100) -> dict[str, Any]:
    """Train, measure held-out accuracy and write the checkpoint into ``out_dir`` (replaced as a whole)."""
    torch.set_num_threads(threads)
    model, tokenizer, seconds = train(settings, log_every)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="egg-base-") as scratch:
        staged = save_base(model, Path(scratch) / "base", {})
        accuracy = heldout_accuracy(staged, n=eval_n)
        card = {
            "settings": asdict(settings),
            "train_seconds": round(seconds, 1),
            "threads": threads,
            "torch": torch.__version__,
            "heldout_accuracy": accuracy,
            "heldout_problems": eval_n,
            "prompt_format": "prompt_of(question) = question + '\\n'; response = answer + <|im_end|>",
        }
        (staged / CARD_FILENAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staged, out_dir)
    return card


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output folder (default: the shipped kit/assets/)")
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results are reproducible per thread count)")
    parser.add_argument("--confidence-rows", type=float, default=TrainSettings.confidence_rows,
                        help="share of rows with random confidence tokens inserted (a mixed-format base; 0: the shipped plain base)")
    parser.add_argument("--confidence-positions", default=TrainSettings.confidence_positions, choices=POSITION_RULES,
                        help="position rule of the inserted confidence tokens")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems for the accuracy")
    args = parser.parse_args(argv)
    settings = TrainSettings(seed=args.seed, steps=args.steps, confidence_rows=args.confidence_rows,
                             confidence_positions=args.confidence_positions)
    card = build_base(args.out, settings, args.threads, args.eval_n)
    print(f"trained in {card['train_seconds']:.0f}s; held-out accuracy {card['heldout_accuracy']:.3f} on {args.eval_n} problems -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
