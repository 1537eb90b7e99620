"""Training step time and memory of the recipe core, side by side in one run, on kit models and the kit's
data and/or a real model on real GSM8K.

Four tables:

1. Mode ``none`` vs torchtune's stock ``full_finetune_single_device`` recipe on the same config
   (model, data, batch, optimizer, loss): the median wall time between consecutive optimizer
   steps inside each recipe's own ``train()`` loop (data loading, forward, backward, optimizer,
   logging), the faster of alternating repeats. Target: ratio ~1.0.
2. Each mode's ``_train_step`` (bins by fixed-point iteration, layout, forward, backward,
   optimizer) vs its compute bound on the same windows: the no-grad forwards the fixed point
   needed (pass 0 on the plain batch, the later ones on the interleaved batch) plus forward +
   backward on the interleaved batch and the optimizer step, run bare; the two alternate window by
   window, each window's cost is its fastest repeat, and the ratio is the median of the per-window
   ratios. Target: ratio <= ~1.1.
3. Exact bins (``max_passes: null``, the fixed point run until every bin is final) vs the fixed
   point capped at 4 passes vs mode ``none``, each mode's ``_train_step`` on the same windows,
   alternating, with the mean passes per micro-batch, the mean share of a full pass's positions
   that each pass after the first forwarded, and how many micro-batches the cap left unconverged.
   Target (issue 20): exact <= 1.05 x capped, geometric mean over full/answer/marker.
4. Peak memory of one CaC training step (full/answer/marker) over torchtune's stock step at the same
   interleaved width: the stock recipe (mode none config) takes one step on the very interleaved
   tokens and labels the CaC step trained on; each runs in its own fresh process. CUDA:
   ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set size during the step.

    .venv/bin/python bench/train.py [--steps 10] [--repeats 3] [--stock-repeats 4] [--sizes tiny small]
        [--exact-sizes trained small] [--model kit smollm2] [--real-batch 2] [--real-seq-len 128]

``tiny`` is the kit's ``tiny_qwen2`` (the tiny configs' model: hidden 64, 2 layers); ``small`` is a
kit Qwen2 of hidden 256, 4 layers, so that compute rather than Python overhead dominates a step;
``trained`` is the kit's trained base (hidden 128, 3 layers), whose bins settle as a real model's do.
``--model smollm2`` measures (instead of, or with ``--model kit smollm2`` beside, the kit models) the
kit's SmolLM2-135M-Instruct (dequantized from Q4_1) in every table, built from configs/smollm2 (real
GSM8K from the shared data folder, confidence rows at the mean embedding) at a CPU-sized budget.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import io
import logging
import math
import multiprocessing
import re
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import training
from tqdm import tqdm

import real_model
from entropy_guided_generation import kit
from entropy_guided_generation.training.kit_paths import resolve_kit_references
from entropy_guided_generation.training.loss_step import summed_token_loss
from entropy_guided_generation.training.options import interleaving_options
from entropy_guided_generation.training.parallelism import parallelism_from_config
from entropy_guided_generation.training.recipe import CaCFinetuneRecipe

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "full", "answer", "marker")
SIZES = {
    "tiny": {},
    "small": {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 512},
    "trained": None,  # the kit's trained base
}
KIT_BATCH = 8
# A config maker: (mode, model size, output folder) -> the resolved config of that run.
ConfigOf = Callable[[str, str, Path], DictConfig]


def checkpoint_of(size: str) -> Path:
    return kit.trained_base() if SIZES[size] is None else kit.build_tiny_checkpoint("qwen2", **SIZES[size])


def bench_config(mode: str, size: str, out: Path, steps: int, real_batch: int = 2, real_seq_len: int = 128) -> DictConfig:
    """The single-device config of ``mode`` for model ``size``: ``steps`` steps, no validation, no lr
    warm-up, one epoch. Kit sizes: the tiny config on that checkpoint, batch 8. ``smollm2``:
    configs/smollm2 (real GSM8K from the shared data folder), batch ``real_batch``, examples cut
    at ``real_seq_len`` plain tokens."""
    overrides = {
        "output_dir": str(out),
        "metric_logger": {"log_dir": str(out / "logs")},
        "epochs": 1,
        "max_steps_per_epoch": steps,
        "lr_scheduler": None,
    }
    if size == real_model.SMOLLM2:
        cfg = OmegaConf.load(REPO / "configs" / "smollm2" / f"{mode}_single_device.yaml")
        overrides.update(data_dir=str(real_model.GSM8K_DIR), batch_size=real_batch, tokenizer={"max_seq_len": real_seq_len})
        # An example cut short loses its final "#### n" line, and with it the marker: marker mode then
        # interleaves that response whole (as answer does) rather than refusing the data.
        overrides["interleaving"] = {"min_marker_fraction": 0.0}
    else:
        cfg = OmegaConf.load(REPO / "configs" / "tiny" / f"{mode}_single_device.yaml")
        overrides.update(checkpointer={"checkpoint_dir": str(checkpoint_of(size))}, batch_size=KIT_BATCH)
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.pop("dataset_val", None)
    return resolve_kit_references(cfg)


def timed_optimizer_steps(optimizer: torch.optim.Optimizer) -> List[float]:
    """Record the time of every ``optimizer.step()`` call (wraps the bound method)."""
    stamps: List[float] = []
    step = optimizer.step

    def stamped(*args, **kwargs):
        out = step(*args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    optimizer.step = stamped
    return stamps


def median_interval(stamps: List[float], skip: int = 2) -> float:
    """Median seconds between consecutive stamps, after ``skip`` warm-up steps."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    gaps = gaps[min(skip, len(gaps) - 1):]  # a short run keeps its last gap
    return statistics.median(gaps)


def stock_recipe_class():
    """torchtune's ``FullFinetuneRecipeSingleDevice`` (loaded by file: our ``recipes`` package
    shadows torchtune's)."""
    import torchtune

    path = Path(torchtune.__file__).resolve().parents[1] / "recipes" / "full_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("torchtune_stock_full_finetune_single_device", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FullFinetuneRecipeSingleDevice


def our_recipe(cfg: DictConfig) -> CaCFinetuneRecipe:
    recipe = CaCFinetuneRecipe(cfg, parallel=parallelism_from_config(cfg, False), interleaving=interleaving_options(cfg))
    recipe.setup(cfg)
    return recipe


def none_vs_stock(config_of: ConfigOf, size: str, work: Path, repeats: int) -> Dict[str, float]:
    """Step time inside each recipe's own ``train()`` loop (mode none, same config), the two
    recipes run alternately ``repeats`` times; the fastest repeat of each counts."""
    ours_s, stock_s = [], []
    for rep in range(repeats):
        ours = our_recipe(config_of("none", size, work / f"ours{rep}"))
        stamps = timed_optimizer_steps(ours._optimizer)
        ours.train()
        ours.cleanup()
        ours_s.append(median_interval(stamps))
        cfg = config_of("none", size, work / f"stock{rep}")
        stock = stock_recipe_class()(cfg=cfg)
        stock.setup(cfg=cfg)
        stamps = timed_optimizer_steps(stock._optimizer)
        stock.train()
        stock.cleanup()
        stock_s.append(median_interval(stamps))
    return {"ours": min(ours_s), "stock": min(stock_s)}


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU time of this process (one torch thread): a busy machine slows wall time unevenly."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def step_vs_bound(mode: str, config_of: ConfigOf, size: str, work: Path, repeats: int) -> Dict[str, float]:
    """``_train_step`` time and compute-bound time on the same windows, measured alternately
    (bound, step, bound, step, ...) so that a busy machine slows both alike."""
    recipe = our_recipe(config_of(mode, size, work / f"bound_{mode}"))
    windows = [[recipe._to_device(b) for b in w] for w in recipe._accumulation_windows(0)]
    model, loss_step = recipe._model, recipe._loss_step
    # What the fixed point needs per micro-batch (bins from the starting weights; the recipe's
    # step may need a pass more or less as the weights move).
    built = [[loss_step.model_batch(model, b) for b in w] for w in windows]
    if loss_step.stats is not None:
        loss_step.stats.reset()

    def bound(window, model_batches) -> None:
        for batch, mb in zip(window, model_batches):
            with torch.no_grad():
                if mb.bins is not None:
                    model(batch["tokens"])
                    for _ in range(mb.bins.passes - 1):
                        model(mb.tokens)
            summed_token_loss(model, recipe._loss_fn, mb, loss_step.ignore_index).loss.backward()
        recipe._optimizer.step()
        recipe._optimizer.zero_grad(set_to_none=True)

    # times[w] = per-repeat seconds of window w; the fastest repeat of a window is its cost (a busy
    # machine only ever adds time), and the ratio is the median over windows.
    step_s: List[List[float]] = [[] for _ in windows]
    bound_s: List[List[float]] = [[] for _ in windows]
    for rep in range(repeats + 1):  # repeat 0 warms up
        for w, (window, model_batches) in enumerate(zip(windows, built)):
            b = seconds(lambda: bound(window, model_batches))
            s = seconds(lambda: recipe._train_step(window))
            if rep:
                bound_s[w].append(b)
                step_s[w].append(s)
    recipe.cleanup()
    step_best, bound_best = [min(t) for t in step_s], [min(t) for t in bound_s]
    passes = [mb.bins.passes for w in built for mb in w if mb.bins is not None]
    return {
        "step": statistics.median(step_best),
        "bound": statistics.median(bound_best),
        "ratio": statistics.median(a / b for a, b in zip(step_best, bound_best)),
        "passes": statistics.mean(passes) if passes else 0.0,
        "plain_len": statistics.mean(int(b["tokens"].shape[1]) for w in windows for b in w),
        "model_len": statistics.mean(int(mb.tokens.shape[1]) for w in built for mb in w),
    }


def exact_vs_capped(mode: str, config_of: ConfigOf, size: str, work: Path, repeats: int) -> Dict[str, float]:
    """``_train_step`` with exact bins, with the fixed point capped at 4 passes, and in mode none,
    alternating window by window; each window's cost is its fastest repeat, a ratio the median of
    the per-window ratios. Fixed-point statistics are those of the timed steps."""
    recipe = our_recipe(config_of(mode, size, work / f"exact_{mode}"))
    plain = our_recipe(config_of("none", size, work / f"plain_{mode}"))
    windows = [[recipe._to_device(b) for b in w] for w in recipe._accumulation_windows(0)]
    plain_windows = [[plain._to_device(b) for b in w] for w in plain._accumulation_windows(0)]
    layout = recipe._loss_step.layout
    build = layout.build
    caps = {"exact": None, "capped": 4}
    seen: Dict[str, list] = {name: [] for name in caps}
    times: Dict[str, List[List[float]]] = {name: [[] for _ in windows] for name in [*caps, "plain"]}
    for rep in range(repeats + 1):  # repeat 0 warms up
        for w, (window, plain_window) in enumerate(zip(windows, plain_windows)):
            for name, cap in caps.items():
                layout.max_passes = cap
                layout.build = lambda *a, _name=name, **k: _record(seen[_name], build(*a, **k))
                s = cpu_seconds(lambda: recipe._train_step(window))
                if rep:
                    times[name][w].append(s)
            s = cpu_seconds(lambda: plain._train_step(plain_window))
            if rep:
                times["plain"][w].append(s)
    recipe.cleanup()
    plain.cleanup()
    best = {name: [min(t) for t in per_window] for name, per_window in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(best[a], best[b]))

    out = {f"{name}_ms": statistics.median(best[name]) * 1e3 for name in best}
    out.update(exact_vs_capped=ratio("exact", "capped"), exact_vs_plain=ratio("exact", "plain"), capped_vs_plain=ratio("capped", "plain"))
    for name, results in seen.items():
        out[f"{name}_passes"] = statistics.mean(r.passes for r in results)
        later = [r.recomputed_fraction for r in results if r.passes > 1]
        out[f"{name}_recomputed"] = statistics.mean(later) if later else math.nan
        out[f"{name}_unconverged"] = statistics.mean(0.0 if r.converged else 1.0 for r in results)
    return out


def _record(results: list, built):
    results.append(built.bins)
    return built


MIB = 2**20


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_memory_during(fn: Callable[[], object], device: torch.device) -> Tuple[float, float]:
    """``(peak, before)`` MiB of one call of ``fn``. CUDA: ``torch.cuda.max_memory_allocated`` (peak
    reset just before) and the memory allocated before. CPU: the process's peak resident set size
    (``VmHWM``, reset to the current RSS through ``/proc/self/clear_refs`` just before; Linux) and its
    RSS before: everything the process holds (weights, optimizer state, allocator caches), not tensors alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MIB, before / MIB
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return _status_kib("VmHWM") / 1024, before / 1024


def stock_step(stock, window: List[Dict[str, torch.Tensor]]) -> None:
    """One optimizer step of torchtune's stock recipe on ``window``, as its ``train()`` loop takes it:
    ``_loss_step`` x token count, backward, grads scaled by the token count, clip, AdamW step."""
    num_tokens = 0
    for batch in window:
        current = (batch["labels"] != stock._loss_fn.ignore_index).sum()
        num_tokens += current
        (stock._loss_step(dict(batch)) * current).backward()
    training.scale_grads(stock._model, 1 / num_tokens)
    if stock._clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(stock._model.parameters(), max_norm=float(stock._clip_grad_norm))
    stock._optimizer.step()
    stock._optimizer.zero_grad(set_to_none=True)


def cac_step_memory(mode: str, config_of: ConfigOf, size: str, work: Path) -> Dict[str, object]:
    """Run in a fresh process: peak memory of our recipe's ``_train_step`` on its first window (the
    fixed point, layout, forward, backward, optimizer), and the interleaved micro-batches it trained on."""
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        recipe = our_recipe(config_of(mode, size, work / f"memory_{mode}"))
        window = [recipe._to_device(b) for b in next(iter(recipe._accumulation_windows(0)))]
        layout, built = recipe._loss_step.layout, []
        build = layout.build

        def recording_build(*args, **kwargs):
            built.append(build(*args, **kwargs))
            return built[-1]

        layout.build = recording_build
        peak, before = peak_memory_during(lambda: recipe._train_step(window), recipe._device)
    return {
        "peak": peak, "before": before,
        "window": [{"tokens": mb.tokens.cpu(), "labels": mb.labels.cpu()} for mb in built],
        "passes": statistics.mean(mb.bins.passes for mb in built),
        "device": recipe._device.type,
    }


def stock_step_memory(config_of: ConfigOf, size: str, work: Path, window: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Run in a fresh process: peak memory of torchtune's stock recipe (mode none config) taking one
    step on ``window`` (the interleaved tokens and labels a CaC step trained on)."""
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cfg = config_of("none", size, work / "memory_stock")
        stock = stock_recipe_class()(cfg=cfg)
        stock.setup(cfg=cfg)
        window = [{k: v.to(stock._device) for k, v in b.items()} for b in window]
        peak, before = peak_memory_during(lambda: stock_step(stock, window), stock._device)
    return {"peak": peak, "before": before}


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new spawned Python process (its peak memory is its own)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def cac_vs_stock_memory(mode: str, config_of: ConfigOf, size: str, work: Path) -> Dict[str, float]:
    """Peak memory of a CaC step of ``mode`` and of torchtune's stock step on the same interleaved
    micro-batches (so at the same width), each in its own fresh process."""
    cac = in_fresh_process(cac_step_memory, mode, config_of, size, work)
    stock = in_fresh_process(stock_step_memory, config_of, size, work, cac["window"])
    tokens = cac["window"][0]["tokens"]
    return {
        "batch": tokens.shape[0], "width": tokens.shape[1], "passes": cac["passes"], "device": cac["device"],
        "cac_peak": cac["peak"], "stock_peak": stock["peak"],
        "cac_rise": cac["peak"] - cac["before"], "stock_rise": stock["peak"] - stock["before"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each step-vs-bound measurement")
    parser.add_argument("--stock-repeats", type=int, default=4, help="alternating runs of each recipe for table 1")
    parser.add_argument("--model", nargs="+", default=["kit"], choices=real_model.MODELS,
                        help="kit: the --sizes / --exact-sizes models; smollm2: SmolLM2-135M-Instruct on real GSM8K, in every table")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--exact-sizes", nargs="*", default=["trained", "small"], choices=sorted(SIZES))
    parser.add_argument("--real-batch", type=int, default=2, help="micro-batch size on smollm2")
    parser.add_argument("--real-seq-len", type=int, default=128, help="plain tokens per example on smollm2 (longer ones are cut)")
    parser.add_argument("--skip-bound", action="store_true", help="only table 3")
    parser.add_argument("--skip-memory", action="store_true", help="no table 4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)  # the recipes' own set-up logs
    real = [real_model.SMOLLM2] if real_model.SMOLLM2 in args.model else []
    kit_selected = "kit" in args.model
    sizes = (args.sizes if kit_selected else []) + real
    exact_sizes = (args.exact_sizes if kit_selected else []) + real
    config_of = functools.partial(bench_config, steps=args.steps, real_batch=args.real_batch, real_seq_len=args.real_seq_len)
    rows_stock, rows_modes, rows_exact, rows_memory = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="egg-bench-train-") as tmp:
        for size in tqdm([] if args.skip_bound else sizes, desc="model sizes"):
            work = Path(tmp) / size
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                versus = none_vs_stock(config_of, size, work, args.stock_repeats)
                modes = [(mode, step_vs_bound(mode, config_of, size, work, args.repeats)) for mode in MODES]
            rows_stock.append((size, versus["ours"], versus["stock"]))
            rows_modes += [(size, mode, r) for mode, r in modes]
            if not args.skip_memory:
                rows_memory += [(size, mode, cac_vs_stock_memory(mode, config_of, size, work)) for mode in MODES[1:]]
        for size in tqdm(exact_sizes, desc="exact vs capped"):
            work = Path(tmp) / f"exact_{size}"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rows_exact += [(size, mode, exact_vs_capped(mode, config_of, size, work, args.repeats)) for mode in MODES[1:]]
    batches = ([f"batch {KIT_BATCH} (kit models)"] if kit_selected else []) + (
        [f"batch {args.real_batch} x <= {args.real_seq_len} plain tokens (smollm2)"] if real else []
    )
    print(f"\ntorch threads 1, fp32 CPU, {', '.join(batches)}, {args.steps} steps per run; medians over steps")
    if real:
        print(
            f"{real_model.SMOLLM2_ABOUT}: configs/smollm2 on real GSM8K ({real_model.GSM8K_DIR}), confidence rows at the mean "
            "embedding; examples cut short lose their '####' marker, and marker mode interleaves those whole"
        )
    if args.skip_bound:
        print_exact(rows_exact, args.repeats)
        return
    print(f"\n1) mode none: our recipe vs torchtune's full_finetune_single_device (step time inside train(), best of {args.stock_repeats} alternating runs)")
    print(f"{'model':<8} {'ours ms':>9} {'stock ms':>9} {'ours/stock':>11}")
    for size, ours, stock in rows_stock:
        print(f"{size:<8} {ours * 1e3:9.1f} {stock * 1e3:9.1f} {ours / stock:11.3f}")
    print(f"\n2) each mode's step vs its compute bound (no-grad fixed-point forwards + fwd/bwd + optimizer; fastest of {args.repeats} alternating repeats per window, median over windows)")
    print(f"{'model':<8} {'mode':<7} {'plain len':>9} {'model len':>9} {'passes':>6} {'step ms':>8} {'bound ms':>8} {'step/bound':>10}")
    for size, mode, r in rows_modes:
        print(
            f"{size:<8} {mode:<7} {r['plain_len']:9.1f} {r['model_len']:9.1f} {r['passes']:6.2f} "
            f"{r['step'] * 1e3:8.1f} {r['bound'] * 1e3:8.1f} {r['ratio']:10.3f}"
        )
    print_exact(rows_exact, args.repeats)
    print_memory(rows_memory)


def print_memory(rows: list) -> None:
    if not rows:
        return
    cuda = any(r["device"] == "cuda" for _, _, r in rows)
    what = "torch.cuda.max_memory_allocated during the step, and its rise over the memory allocated before" if cuda else (
        "peak RSS of the process during the step (VmHWM reset just before), and its rise over the RSS before"
    )
    print(
        "\n4) peak memory of one training step, each in a fresh process: our CaC _train_step (fixed point, layout, fwd/bwd, "
        "AdamW) vs torchtune's stock step (its _loss_step + backward + clip + AdamW, mode none config) on the same "
        f"interleaved micro-batches (same width); first window; MiB: {what}"
    )
    print(
        f"{'model':<8} {'mode':<7} {'batch':>5} {'width':>5} {'passes':>6} {'CaC peak':>9} {'stock peak':>10} {'CaC/stock':>9} "
        f"{'CaC rise':>8} {'stock rise':>10} {'rise ratio':>10}"
    )
    for size, mode, r in rows:
        print(
            f"{size:<8} {mode:<7} {r['batch']:>5} {r['width']:>5} {r['passes']:6.2f} {r['cac_peak']:9.0f} {r['stock_peak']:10.0f} "
            f"{r['cac_peak'] / r['stock_peak']:9.3f} {r['cac_rise']:8.0f} {r['stock_rise']:10.0f} {r['cac_rise'] / r['stock_rise']:10.3f}"
        )


def print_exact(rows: list, repeats: int) -> None:
    if not rows:
        return
    print(
        f"\n3) exact bins (max_passes null) vs the fixed point capped at 4 passes vs mode none: _train_step CPU time, fastest of "
        f"{repeats} alternating repeats per window, median over windows; passes and recomputed share per micro-batch"
    )
    print(
        f"{'model':<8} {'mode':<7} {'exact ms':>8} {'cap4 ms':>8} {'none ms':>8} {'exact/cap4':>10} {'exact/none':>10} "
        f"{'cap4/none':>9} {'passes':>6} {'cap4 passes':>11} {'recomputed':>10} {'cap4 unconv':>11}"
    )
    for size, mode, r in rows:
        print(
            f"{size:<8} {mode:<7} {r['exact_ms']:8.1f} {r['capped_ms']:8.1f} {r['plain_ms']:8.1f} {r['exact_vs_capped']:10.3f} "
            f"{r['exact_vs_plain']:10.3f} {r['capped_vs_plain']:9.3f} {r['exact_passes']:6.2f} {r['capped_passes']:11.2f} "
            f"{r['exact_recomputed']:10.3f} {r['capped_unconverged']:11.2f}"
        )
    for size in dict.fromkeys(size for size, _, _ in rows):
        ratios = [r["exact_vs_capped"] for s, _, r in rows if s == size]
        print(f"{size:<8} geometric mean exact/cap4 over full, answer, marker: {math.exp(statistics.mean(map(math.log, ratios))):.3f}")


if __name__ == "__main__":
    main()
