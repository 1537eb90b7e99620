"""Where exactness costs on a real model: every way to find a training micro-batch's exact confidence bins,
side by side in one run, on SmolLM2-135M-Instruct and real GSM8K train rows (mode answer), with raw and
mean-initialized confidence rows, at step 0 and along a short real finetune.

The ways (each must give the same bins as the first; the run fails at its end, after the tables, if not):

- ``default``: ``compute_bins`` as the recipe calls it (the model in train mode): passes, each computing
  every slot after each row's settled prefix (a signal costs SmolLM2 less than a token's forward), until the
  token-forwards they took reach what stepping from the settled prefix would take; then KV-cached stepping.
- ``passes``: the same passes, never stepping, until no bin changes.
- ``lazy``: lazy passes (each row's signals stop at its first changed bin, a window of new slots per pass:
  what every pass did before the signal's cost was weighed), never stepping.
- ``step@0``: KV-cached stepping through each row right after the plain pass 0.
- ``plain ctx``: the bins under ``confidence.context: plain`` (one plain forward; another signal by
  definition, so its bins are not compared with the others').
- ``jacobi`` (added here): full passes over the whole batch (every slot's signal from every pass, no
  early stop per row) until one changes nothing; listed when that happens within ``--jacobi-passes``.
- ``jacobi{k}+step`` (added here): up to k full passes (fewer when one changes nothing), which also tell
  each row's settled prefix (the slots up to and including the first one the last pass changed are final),
  then ``compute_bins(known_bins=...)`` stepping from there.

Three tables: (1) per way: passes, sequential forwards, token-forwards (rows x positions forwarded, padding
included), output projections (signals), wall time and its ratio to one stock forward + backward of mode
none at the same interleaved width; (2) full passes from the plain one on: the share of bins still unlike
the exact ones and the mean settled prefix per row after each pass; (3) the share a single plain-context
pass (upstream's training) gets wrong, and passes, along the finetune.

    PYTHONPATH=. EGG_KIT_CACHE=.kit_cache .venv/bin/python bench/fixed_point.py [--rows 4] [--seq-len 128]
        [--steps 8] [--measure-every 4] [--train-batch 2] [--lr 5e-5] [--inits raw mean]
        [--finetune-inits raw mean] [--jacobi-passes 16] [--hybrid-passes 2 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402

from entropy_guided_generation import fixed_point as solver_module, kit  # noqa: E402
from entropy_guided_generation.confidence import ConfidenceCodec  # noqa: E402
from entropy_guided_generation.fixed_point import FixedPointBins, compute_bins
from entropy_guided_generation.interleaved import IGNORE_INDEX, interleave
from entropy_guided_generation.modes import Interleaving
from entropy_guided_generation.modeling import PositionLogits  # noqa: E402
from entropy_guided_generation.training.loss_step import ConfidenceLayout, ModelBatch, summed_token_loss  # noqa: E402

MODEL = real_model.SMOLLM2
# Held-out rows come from this far into the train split, past any row the short finetune trains on.
HELD_OUT_START = 7000


# --------------------------------------------------------------------- data
def gsm8k_batch(tokenizer, rows: Sequence[Dict[str, str]], seq_len: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """A right-padded plain batch of lm-eval GSM8K rows ``"Question: ..\\nAnswer: <answer>"``, cut at
    ``seq_len`` tokens: ``tokens``, ``labels`` (response tokens only, unshifted), ``response_mask``,
    ``valid_mask``, all ``[b, <= seq_len]``."""
    ids, response = [], []
    for row in rows:
        prompt = tokenizer.encode(real_model.PROMPT.format(question=row["question"]), add_bos=True, add_eos=False)
        answer = tokenizer.encode(" " + row["answer"], add_bos=False, add_eos=True)
        ids.append((prompt + answer)[:seq_len])
        response.append(([False] * len(prompt) + [True] * len(answer))[:seq_len])
    width = max(map(len, ids))
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros(len(ids), width, dtype=torch.bool)
    valid_mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, (row_ids, row_response) in enumerate(zip(ids, response)):
        tokens[i, : len(row_ids)] = torch.tensor(row_ids)
        response_mask[i, : len(row_ids)] = torch.tensor(row_response)
        valid_mask[i, : len(row_ids)] = True
    labels = torch.where(response_mask, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return {"tokens": tokens, "labels": labels, "response_mask": response_mask, "valid_mask": valid_mask}


# --------------------------------------------------------------------- counting
@contextlib.contextmanager
def counted_forwards(model) -> Iterator[Dict[str, int]]:
    """Count the model's forwards and token-forwards (``[r, k]`` ids embedded: r x k) while inside; every
    forward (whole-row passes, KV-cached feeds, training) embeds its ids exactly once."""
    tally = {"forwards": 0, "token_forwards": 0}

    def hook(module, args):
        tally["forwards"] += 1
        tally["token_forwards"] += int(args[0].numel())

    handle = model.tok_embeddings.register_forward_pre_hook(hook)
    try:
        yield tally
    finally:
        handle.remove()


@contextlib.contextmanager
def lazy_passes(step_at_0: bool = False) -> Iterator[None]:
    """Make ``compute_bins`` run lazy passes whatever a signal costs, and (``step_at_0``) step right after
    pass 0 whatever its CPU rule says."""
    with mock.patch.object(solver_module, "_signals_are_cheap", lambda model: False), \
            mock.patch.object(solver_module, "_stepping_is_cheaper", lambda *args: step_at_0):
        yield


def in_train_mode(model) -> contextlib.AbstractContextManager:
    """The model in train mode for the block (as the recipe computes its bins), eval mode after."""

    @contextlib.contextmanager
    def block():
        model.train()
        try:
            yield
        finally:
            model.eval()

    return block()


class Stopwatch:
    """Wall and process CPU seconds since it was made (CPU time: the machine may be shared, and a busy
    machine slows wall time unevenly)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


@dataclass
class Way:
    """One way's cost on one micro-batch and the bins it found."""

    name: str
    passes: int
    forwards: int
    token_forwards: int
    signals: int
    stepped: int
    seconds: float
    cpu: float
    bins: torch.Tensor
    converged: bool


def timed_bins(name: str, model, batch, codec, slots, known_bins=None, **kwargs) -> tuple[Way, FixedPointBins]:
    """``compute_bins`` on ``batch`` with its cost."""
    with counted_forwards(model) as tally:
        clock = Stopwatch()
        result = compute_bins(
            model, batch["tokens"], codec=codec, slots=slots, labels=batch["labels"], valid_mask=batch["valid_mask"],
            known_bins=known_bins, **kwargs,
        )
        seconds, cpu = clock.read()
    way = Way(
        name, result.passes, tally["forwards"], tally["token_forwards"], sum(result.pass_slots) + result.stepped_slots,
        result.stepped_slots, seconds, cpu, result.bins, result.converged,
    )
    return way, result


# --------------------------------------------------------------------- full passes
@torch.no_grad()
def full_pass(model, batch, slots: torch.Tensor, codec: ConfidenceCodec, bins: Optional[torch.Tensor]) -> torch.Tensor:
    """Bins ``[b, n]`` (-1 off slots) of every slot from one forward over the whole batch interleaved with
    ``bins`` (the plain batch when None: pass 0)."""
    tokens, valid = batch["tokens"], batch["valid_mask"]
    if bins is None:
        laid = interleave(tokens, torch.zeros_like(slots), tokens, valid_mask=valid)
    else:
        laid = interleave(tokens, slots, codec.token_ids_for_bins(bins.clamp(min=0)), valid_mask=valid)
    rows, t = slots.nonzero(as_tuple=True)
    # bins[r, t] describes the distribution that produced token t: the logits one column before it.
    logits = PositionLogits(model, laid.tokens)(rows, laid.plain_index[rows, t] - 1)
    out = torch.full_like(tokens, -1)
    out[rows, t] = codec.bins_from_signal(codec.signal_from_logits(logits))
    return out


def leading(slots: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """``[b]``: each row's slots (in order) before its first ``stop`` slot (all when none)."""
    hit = (stop & slots).long()
    return (slots & (hit.cumsum(1) == 0)).sum(1)


@dataclass
class PassProfile:
    """Full passes from the plain one on: after pass k (k = 1 is the plain pass), ``wrong[k-1]`` is the share
    of bins unlike the exact ones and ``settled[k-1]`` the mean per row of leading slots equal to them;
    ``final[k-1]`` ``[b]`` the leading slots the passes themselves prove final; ``bins[k-1]`` the bins;
    ``seconds[k-1]``, ``cpu[k-1]`` and ``token_forwards[k-1]`` that pass's cost."""

    wrong: List[float]
    settled: List[float]
    final: List[torch.Tensor]
    bins: List[torch.Tensor]
    seconds: List[float]
    cpu: List[float]
    token_forwards: List[int]
    converged: bool


def pass_profile(model, batch, slots, codec, exact: torch.Tensor, max_passes: int) -> PassProfile:
    """Run full passes until no bin changes or ``max_passes``, comparing each to the ``exact`` bins."""
    profile = PassProfile([], [], [], [], [], [], [], False)
    bins = None
    total = int(slots.sum())
    for _ in range(max_passes):
        with counted_forwards(model) as tally:
            clock = Stopwatch()
            new = full_pass(model, batch, slots, codec, bins)
            seconds, cpu = clock.read()
        profile.seconds.append(seconds)
        profile.cpu.append(cpu)
        profile.token_forwards.append(tally["token_forwards"])
        changed = slots if bins is None else (new != bins) & slots
        # A row's slots up to and including the first one this pass changed saw final bins only.
        proven = torch.minimum(leading(slots, changed) + 1, slots.sum(1))
        profile.final.append(proven)
        profile.bins.append(new)
        profile.wrong.append(int(((new != exact) & slots).sum()) / total)
        profile.settled.append(float(leading(slots, new != exact).float().mean()))
        if bins is not None and not bool(changed.any()):
            profile.converged = True
            break
        bins = new
    return profile


# --------------------------------------------------------------------- stock step
def stock_seconds(model, tokens: torch.Tensor, labels: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Wall and CPU seconds, each the fastest of ``repeats`` plain (mode none) forward + backward over ``tokens`` ``[b, L]``: the loss step
    training runs after the bins, at the same interleaved width."""
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    batch = ModelBatch(tokens, labels, torch.zeros_like(tokens, dtype=torch.bool))
    was_training = model.training
    model.train()
    wall = cpu = float("inf")
    for _ in range(repeats):
        clock = Stopwatch()
        summed_token_loss(model, loss_fn, batch).loss.backward()
        seconds, used = clock.read()
        wall, cpu = min(wall, seconds), min(cpu, used)
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return wall, cpu


# --------------------------------------------------------------------- one measurement
@dataclass
class Measurement:
    init: str
    step: int
    ways: List[Way]
    stock: float
    stock_cpu: float
    width: int
    profile: PassProfile
    mismatches: Dict[str, int]
    slots_per_row: float
    row_spread: float


def measure(model, batch, slots, codec, init: str, step: int, args) -> Measurement:
    """Every way on one micro-batch (model in eval mode), the full-pass profile and the stock step."""
    model.eval()
    with in_train_mode(model):
        default, _ = timed_bins("default", model, batch, codec, slots)
    passes, result = timed_bins("passes", model, batch, codec, slots, sequential_fallback=False)
    with lazy_passes():
        lazy, _ = timed_bins("lazy", model, batch, codec, slots, sequential_fallback=False)
    with lazy_passes(step_at_0=True):
        stepped, _ = timed_bins("step@0", model, batch, codec, slots)
    plain_ctx, _ = timed_bins("plain ctx", model, batch, dataclasses.replace(codec, context="plain"), slots)
    ways = [default, passes, lazy, stepped]
    exact = passes.bins
    profile = pass_profile(model, batch, slots, codec, exact, args.jacobi_passes)
    if profile.converged:
        n = len(profile.seconds)
        ways.append(Way(
            "jacobi", n, n, sum(profile.token_forwards), n * int(slots.sum()), 0, sum(profile.seconds), sum(profile.cpu),
            profile.bins[-1], True,
        ))
    for k in args.hybrid_passes:
        if k > len(profile.bins) and not profile.converged:
            continue
        # Up to k full passes (fewer when one changes nothing: every bin is then final), then stepping.
        ran = min(k, len(profile.bins))
        final = profile.final[ran - 1] if ran < len(profile.bins) or not profile.converged else slots.sum(1)
        order = slots.long().cumsum(1)  # slot number (1-based) of each slot position
        known = torch.where(slots & (order <= final.unsqueeze(1)), profile.bins[ran - 1], torch.full_like(slots, -1, dtype=torch.long))
        with lazy_passes(step_at_0=True):
            way, _ = timed_bins(f"jacobi{k}+step", model, batch, codec, slots, known_bins=known)
        way.passes += ran
        way.forwards += ran
        way.token_forwards += sum(profile.token_forwards[:ran])
        way.signals += ran * int(slots.sum())
        way.seconds += sum(profile.seconds[:ran])
        way.cpu += sum(profile.cpu[:ran])
        ways.append(way)
    mismatches = {w.name: int(((w.bins != exact) & slots).sum()) for w in ways}
    ways.append(plain_ctx)
    laid = result.interleaved
    stock, stock_cpu = stock_seconds(model, laid.tokens, laid.labels, args.repeats)
    model.eval()
    slots_per_row = float(slots.sum(1).float().mean())
    return Measurement(
        init, step, ways, stock, stock_cpu, int(laid.tokens.shape[1]), profile, mismatches, slots_per_row,
        confidence_row_spread(model.tok_embeddings.weight, codec.token_ids),
    )


@torch.no_grad()
def confidence_row_spread(weight: torch.Tensor, token_ids: torch.Tensor) -> float:
    """Mean distance of the confidence rows of ``weight`` ``[V, d]`` from their own mean, over the mean norm
    of all rows: 0 when they are all alike (mean-initialized: a bin then cannot change the context)."""
    rows = weight[token_ids.long()].float()
    return float((rows - rows.mean(0)).norm(dim=1).mean() / weight.float().norm(dim=1).mean())


# --------------------------------------------------------------------- finetune
def load_model(codec: ConfidenceCodec, init: str):
    """SmolLM2 as a torchtune decoder in eval mode; ``mean``: confidence rows at the mean embedding (the
    shipped configs), ``raw``: their pretrained rows (code-repository markers)."""
    model = kit.load_torchtune_model(real_model.smollm2_folder()).eval()
    if init == "mean":
        real_model.set_mean_confidence_rows(model.tok_embeddings, codec)
    return model


def train_step(model, optimizer, confidence: ConfidenceLayout, batch) -> float:
    """One optimizer step of mode answer: exact bins (found by stepping, the model in eval mode: the bins
    the recipe's passes would find), then the recipe's loss on the interleaved batch; the mean token loss."""
    model.eval()
    with lazy_passes(step_at_0=True):
        built = confidence.build(model, batch)
    model.train()
    step = summed_token_loss(model, torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), built)
    (step.loss / step.num_tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(step.loss.detach() / step.num_tokens)


# --------------------------------------------------------------------- tables
def print_ways(measurements: List[Measurement], rows: int, seq_len: int, out=None) -> None:
    print(
        f"\n1) every way to the exact bins of one held-out micro-batch ({rows} rows x <= {seq_len} plain tokens, mode answer): "
        "passes, sequential forwards, token-forwards (rows x positions, padding included), output projections, "
        "wall time (one run each), x stock = wall time over the fastest stock fwd+bwd (mode none) at the same interleaved "
        "width, cpu x = the same ratio of process CPU times (steadier on a shared machine), step x = an exact CaC "
        "micro-batch (these bins, then the stock fwd+bwd) over the stock one, by CPU time; bins != passes: bins unlike "
        "the passes' (must be 0)",
        file=out or sys.stdout,
    )
    print(
        f"{'model':<8} {'init':<5} {'step':>4} {'width':>5} {'way':<14} {'passes':>6} {'forwards':>8} {'tok-fwd':>8} "
        f"{'signals':>7} {'stepped':>7} {'s':>7} {'stock s':>7} {'x stock':>7} {'cpu x':>6} {'step x':>6} {'bins != passes':>14}",
        file=out or sys.stdout,
    )
    for m in measurements:
        for w in m.ways:
            print(
                f"{MODEL:<8} {m.init:<5} {m.step:>4} {m.width:>5} {w.name:<14} {w.passes:>6} {w.forwards:>8} "
                f"{w.token_forwards:>8} {w.signals:>7} {w.stepped:>7} {w.seconds:7.2f} {m.stock:7.2f} "
                f"{w.seconds / m.stock:7.2f} {w.cpu / m.stock_cpu:6.2f} {1 + w.cpu / m.stock_cpu:6.2f} {m.mismatches.get(w.name, '-'):>14}",
                file=out or sys.stdout,
            )


def print_profiles(measurements: List[Measurement], shown: Sequence[int]) -> None:
    print(
        "\n2) full passes over the whole micro-batch, pass 1 = the plain-context pass (upstream's training): after pass k, "
        "wrong = % of bins unlike the exact ones, settled = mean leading slots per row equal to them (of 'slots'); "
        "'-' = converged earlier"
    )
    head = " ".join(f"{f'k={k}':>11}" for k in shown)
    print(f"{'':<8} {'':<5} {'':>4} {'':>9} {'':>18} | wrong% / settled after full pass k")
    print(f"{'model':<8} {'init':<5} {'step':>4} {'slots/row':>9} {'full passes to fp':>18} | {head}")
    for m in measurements:
        p = m.profile
        to_fixed = str(len(p.wrong)) if p.converged else f">{len(p.wrong)}"
        cells = []
        for k in shown:
            if k <= len(p.wrong):
                cells.append(f"{100 * p.wrong[k - 1]:5.1f}/{p.settled[k - 1]:5.1f}")
            else:
                cells.append(f"{'-':>11}")
        print(f"{MODEL:<8} {m.init:<5} {m.step:>4} {m.slots_per_row:9.1f} {to_fixed:>18} | {' '.join(f'{c:>11}' for c in cells)}")


def print_finetune(measurements: List[Measurement], losses: Dict[str, List[float]]) -> None:
    print(
        "\n3) along the finetune (held-out rows): the last training step's loss (mean over answer tokens, interleaved), "
        "spread = mean distance of the confidence embedding rows from their mean over the mean row norm (0: all alike), "
        "share of bins a single plain-context pass gets wrong, passes the lazy fixed point needed, and each way's CPU "
        "time over the stock step's"
    )
    names = list(dict.fromkeys(w.name for m in measurements for w in m.ways))
    print(f"{'':<8} {'':<5} {'':>4} {'':>6} {'':>6} {'':>12} {'':>6} | cpu x stock:")
    print(
        f"{'model':<8} {'init':<5} {'step':>4} {'loss':>6} {'spread':>6} {'plain wrong%':>12} {'passes':>6} | "
        + " ".join(f"{n:>14}" for n in names)
    )
    for m in measurements:
        by_name = {w.name: w.cpu / m.stock_cpu for w in m.ways}
        loss = losses[m.init][m.step - 1] if m.step else float("nan")
        cells = " ".join(f"{by_name[n]:14.2f}" if n in by_name else f"{'-':>14}" for n in names)
        print(
            f"{MODEL:<8} {m.init:<5} {m.step:>4} {loss:6.3f} {m.row_spread:6.3f} {100 * m.profile.wrong[0]:12.1f} "
            f"{m.ways[0].passes:>6} | {cells}"
        )


# --------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="rows of the held-out micro-batch measured")
    parser.add_argument("--seq-len", type=int, default=128, help="plain tokens per row (longer rows are cut)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of the short finetune (0: step 0 only)")
    parser.add_argument("--measure-every", type=int, default=4, help="measure after every this many steps")
    parser.add_argument("--train-batch", type=int, default=2, help="rows per optimizer step of the finetune")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of the finetune")
    parser.add_argument("--inits", nargs="+", default=["raw", "mean"], choices=["raw", "mean"],
                        help="confidence rows measured at step 0: pretrained (raw) or the mean embedding")
    parser.add_argument("--finetune-inits", nargs="*", default=["raw", "mean"], choices=["raw", "mean"],
                        help="the inits also finetuned for --steps and measured along the way")
    parser.add_argument("--jacobi-passes", type=int, default=16, help="most full passes profiled (table 2)")
    parser.add_argument("--hybrid-passes", type=int, nargs="*", default=[2, 4], help="k of the jacobi{k}+step ways")
    parser.add_argument("--repeats", type=int, default=2, help="stock fwd+bwd repeats (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = real_model.smollm2_tokenizer()
    codec = real_model.smollm2_codec(tokenizer)
    interleaving = Interleaving.for_tokenizer("answer", tokenizer)
    confidence = ConfidenceLayout(interleaving, codec, pad_id=tokenizer.pad_id)
    held_out = gsm8k_batch(
        tokenizer, real_model.gsm8k_rows("train", HELD_OUT_START + args.rows)[HELD_OUT_START:], args.seq_len, tokenizer.pad_id
    )
    slots = confidence.slots(held_out)
    if not bool(slots.sum(1).all()):
        raise ValueError(f"--seq-len {args.seq_len} cuts some held-out rows before their answer (slots per row {slots.sum(1).tolist()}); raise it")
    train_rows = real_model.gsm8k_rows("train", args.steps * args.train_batch)
    train_batches = [
        gsm8k_batch(tokenizer, train_rows[i * args.train_batch : (i + 1) * args.train_batch], args.seq_len, tokenizer.pad_id)
        for i in range(args.steps)
    ]

    measurements: List[Measurement] = []
    losses: Dict[str, List[float]] = {}
    start = time.perf_counter()
    for init in args.inits:
        model = load_model(codec, init)
        for p in model.parameters():
            p.requires_grad_(True)
        m = measure(model, held_out, slots, codec, init, 0, args)
        measurements.append(m)
        print(f"[{time.perf_counter() - start:6.0f} s] measured {init} at step 0", file=sys.stderr, flush=True)
        print_ways([m], args.rows, args.seq_len, out=sys.stderr)
        losses[init] = []
        if init not in args.finetune_inits or not args.steps:
            continue
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        for step, batch in enumerate(train_batches, start=1):
            losses[init].append(train_step(model, optimizer, confidence, batch))
            print(f"[{time.perf_counter() - start:6.0f} s] {init} step {step} loss {losses[init][-1]:.3f}", file=sys.stderr, flush=True)
            if step % args.measure_every == 0 or step == args.steps:
                m = measure(model, held_out, slots, codec, init, step, args)
                measurements.append(m)
                print(f"[{time.perf_counter() - start:6.0f} s] measured {init} at step {step}", file=sys.stderr, flush=True)
                print_ways([m], args.rows, args.seq_len, out=sys.stderr)
        del model, optimizer

    print(
        f"\n{real_model.SMOLLM2_ABOUT}; real GSM8K train rows (held-out: rows {HELD_OUT_START}..{HELD_OUT_START + args.rows - 1}; "
        f"finetune: rows 0..{len(train_rows) - 1}), lm-eval format, mode answer, {codec.num_bins} bins (entropy_round on ids 3..13); "
        f"fp32 CPU, {args.threads} torch threads; finetune: AdamW lr {args.lr}, batch {args.train_batch}, grad clip 1.0, "
        "bins found exactly (by stepping) for every training step"
    )
    print(f"held-out slots per row: {slots.sum(1).tolist()}, plain width {held_out['tokens'].shape[1]}")
    print_ways(measurements, args.rows, args.seq_len)
    shown = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if k <= args.jacobi_passes]
    print_profiles(measurements, shown)
    print_finetune(measurements, losses)
    bad = {(m.init, m.step, name): n for m in measurements for name, n in m.mismatches.items() if n}
    if bad:
        raise AssertionError(f"ways disagree with the passes' bins (init, step, way): bins differing {bad}")
    print("\nbins equal across every way at every measurement: yes")


if __name__ == "__main__":
    main()
