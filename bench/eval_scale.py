"""Data-parallel eval throughput, side by side in one run: the eval recipe on the tiny answer-mode config
(kit_gsm8k generate_until + kit_arith_choice loglikelihood) under torchrun, 1 rank x 1 thread against
2 ranks x 1 thread.

Each rank runs ``EleutherEvalRecipeDirect.setup`` then times ``evaluate()`` (lm-eval's evaluator, the
gathers, calibration and file writing; process start-up and model loading excluded):

- wall: rank 0's wall time; throughput = documents / wall. This is the number the target is about,
  and it needs one idle core per rank: on a shared machine the load average (printed) eats it.
- cpu: the busiest rank's CPU time of the same call; documents / cpu is the throughput each rank would
  reach on a core of its own (waiting at a barrier costs no CPU), a load-independent view of the split.
- serving documents: the busiest rank's wall time inside the LM's request methods, the part that
  splits across ranks; the rest of ``evaluate()`` is per run (lm-eval's task set-up and its
  environment report, which runs ``pip`` and friends in subprocesses on rank 0, the gathers, files).

Each setting runs ``--repeats`` times, alternating; the median counts. The 2-rank results must equal
the 1-rank results (greedy decoding). Target (issue 21): 2 ranks >= 1.7 x 1 rank.

    .venv/bin/python bench/eval_scale.py [--limit 64] [--max-gen-toks 96] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CONFIG = "configs/tiny/eval_answer.yaml"
TASKS = ["kit_gsm8k", "kit_arith_choice"]


def worker(args: argparse.Namespace) -> None:
    """One rank: set up the recipe, time ``evaluate()``, write ``rank<r>.json`` into ``--out``."""
    torch.set_num_threads(1)
    overrides = [
        f"tasks=[{','.join(TASKS)}]", f"limit={args.limit}", f"max_gen_toks={args.max_gen_toks}",
        f"num_fewshot={args.num_fewshot}", "bootstrap_iters=0", f"output_dir={args.out}/eval",
    ]
    cfg = OmegaConf.merge(OmegaConf.load(REPO / CONFIG), OmegaConf.from_dotlist(overrides))
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    work = time_requests(recipe.lm)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = recipe.evaluate()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rank = int(os.environ.get("RANK", "0"))
    record = {"wall": wall, "cpu": cpu, "work": work["seconds"], "results": summary["lm_eval_results"] if summary else None}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record))
    recipe.cleanup()


def time_requests(lm) -> dict:
    """Wrap ``lm``'s request methods (lm-eval calls them with this rank's share of the documents) so
    that ``seconds`` adds up the wall time spent serving documents, the part that splits across ranks."""
    timer = {"seconds": 0.0}
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def timed(*a, _method=method, **k):
            start = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                timer["seconds"] += time.perf_counter() - start

        setattr(lm, name, timed)
    return timer


def run(ranks: int, args: argparse.Namespace, out: Path) -> dict:
    """One torchrun launch of ``ranks`` single-thread workers: rank 0's wall and results, the busiest rank's CPU."""
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [TORCHRUN, "--nproc_per_node", str(ranks), __file__, "--worker", "--out", str(out), "--limit", str(args.limit),
               "--max-gen-toks", str(args.max_gen_toks), "--num-fewshot", str(args.num_fewshot)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}\n{done.stderr[-4000:]}")
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"wall": records[0]["wall"], "cpu": max(r["cpu"] for r in records), "work": max(r["work"] for r in records),
            "results": records[0]["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=64, help="documents per task (the kit's test split has 64)")
    parser.add_argument("--max-gen-toks", type=int, default=96)
    parser.add_argument("--num-fewshot", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    load_before = os.getloadavg()[0]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="egg-bench-eval-") as scratch:
        for repeat in range(args.repeats):
            for ranks in (1, 2):
                runs[ranks].append(run(ranks, args, Path(scratch) / f"r{ranks}_{repeat}"))
    if runs[2][-1]["results"] != runs[1][-1]["results"]:
        raise SystemExit(f"2-rank results differ from 1-rank results:\n{runs[2][-1]['results']}\n{runs[1][-1]['results']}")
    docs = args.limit * len(TASKS)
    wall = {n: statistics.median(r["wall"] for r in runs[n]) for n in runs}
    cpu = {n: statistics.median(r["cpu"] for r in runs[n]) for n in runs}
    print(f"eval recipe, {CONFIG}, tasks {', '.join(TASKS)}: {args.limit} docs each, {args.num_fewshot}-shot, "
          f"max_gen_toks {args.max_gen_toks}; median of {args.repeats}; 2-rank results equal the 1-rank results")
    print(f"{'ranks x threads':>16} {'wall s':>8} {'docs/s':>8} {'speedup':>8} {'cpu s':>8} {'docs/cpu-s':>11} {'speedup':>8}   wall runs (s)")
    for n in (1, 2):
        walls = " ".join(f"{r['wall']:.1f}" for r in runs[n])
        print(f"{f'{n} x 1':>16} {wall[n]:8.2f} {docs / wall[n]:8.2f} {wall[1] / wall[n]:7.2f}x {cpu[n]:8.2f} "
              f"{docs / cpu[n]:11.2f} {cpu[1] / cpu[n]:7.2f}x   {walls}")
    work = {n: statistics.median(r["work"] for r in runs[n]) for n in runs}
    print(f"{'':>16} serving documents (the busiest rank's time inside the LM's request methods): "
          f"{work[1]:.2f} s -> {work[2]:.2f} s, {work[1] / work[2]:.2f}x; the rest of evaluate() on rank 0 "
          f"(task set-up, lm-eval's environment report, gathers, files): {wall[1] - work[1]:.2f} s -> {wall[2] - work[2]:.2f} s")
    print(f"target: 2 x 1 >= 1.70x (wall, one idle core per rank); {os.cpu_count()} cores, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
