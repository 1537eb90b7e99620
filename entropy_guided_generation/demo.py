"""The main job (``make demo``): finetune modes ``none``, ``answer`` and ``marker`` on identical budgets
through the real recipe, evaluate each through the eval recipe on held-out data, print one table and
draw the pictures.

Default ("the embedded default"): the kit's trained tiny base model; ``none`` and ``answer`` finetune
on the kit's GSM8K-format word problems and are scored on lm-eval's gsm8k answer extraction;
``marker`` finetunes on the kit's BIG-Bench-Mistake-format arithmetic traces (``Thought N:`` lines,
then ``So the answer is:`` and the answer; reasoning interleaved, answer plain) and is scored on
held-out traces' correct targets. Every run uses the same optimizer steps, batch size and learning
rate. The numbers are what they are: nothing here is tuned to make a mode win.

Outputs in ``--out`` (default ``outputs/demo/``): ``results.json`` (every number in the table),
``confidence_<mode>.html/.png`` (a decoded held-out answer coloured by confidence bin),
``reliability_<mode>.png``, ``loss_curves.png``, and per run ``runs/<mode>/`` (checkpoint, logs) and
``eval/<mode>/`` (lm-eval results, samples, confidence traces). Re-running reuses every finished
step whose settings did not change.

    python -m entropy_guided_generation.demo                       # the embedded default
    python -m entropy_guided_generation.demo --gsm8k ../shared/data/gsm8k \\
        --bigbench-mistake ../shared/data/bigbench_mistake      # real data (any JSONL in these formats)
    python -m entropy_guided_generation.demo --checkpoint MY_HF_DIR --model-type QWEN2   # your own model
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from entropy_guided_generation import kit, visualize
from entropy_guided_generation.confidence import ConfidenceCodec, find_confidence_json, read_confidence_json
from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.eval.report import generation_confidence_by_doc
from entropy_guided_generation.generation import get_decoder
from entropy_guided_generation.training import read_disk_log, run_recipe

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODES = ("none", "answer", "marker")
BBM_MARKER = "So the answer is:"
BBM_TASK_FILE = "multistep_arithmetic"
STAMP = "demo_stamp.json"
MAX_PLAIN_TOKENS = 256
MAX_INTERLEAVED_POSITIONS = 512
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers (a run is reused only when these match).

    Attributes:
        steps: optimizer steps per finetune (identical for every mode).
        batch_size: sequences per step.
        lr: AdamW learning rate.
        eval_limit: held-out problems scored per mode.
        max_gen_toks: generation budget per answer (content tokens).
        train_rows: training rows per dataset.
        seed: data split and training seed.
    """

    steps: int = 480
    batch_size: int = 16
    lr: float = 1e-3
    eval_limit: int = 100
    max_gen_toks: int = 96
    train_rows: int = 4000
    seed: int = 0


@dataclass(frozen=True)
class DataFiles:
    """JSONL files the demo trains and evaluates on."""

    gsm8k_train: Path
    gsm8k_test: Path
    bbm_train_dir: Path  # holds <task>.jsonl files, the layout of shared/data/bigbench_mistake
    bbm_tasks: tuple[str, ...]
    bbm_test: Path


@dataclass(frozen=True)
class BaseModel:
    """The checkpoint every mode starts from (Hugging Face folder with Qwen2.5-format tokenizer files)."""

    checkpoint_dir: Path
    tokenizer_dir: Path
    model_type: str


# ---------------------------------------------------------------- data


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return path


def prepare_data(out: Path, settings: DemoSettings, gsm8k_dir: Optional[Path], bbm_dir: Optional[Path], bbm_tasks: Sequence[str]) -> DataFiles:
    """Write (or point at) the training and held-out files.

    GSM8K: ``gsm8k_dir/train.jsonl`` and ``test.jsonl`` as given, else the kit's train/test splits.
    BIG-Bench Mistake: the given task files (or the kit's arithmetic traces) split by a seeded
    shuffle into 80% train / 20% held-out; training keeps only traces without a mistake
    (``mistake_index`` null), so the finetune learns correct reasoning; the held-out rows keep all
    traces and are scored against ``target``.
    """
    data = out / "data"
    if gsm8k_dir is not None:
        gsm8k_train = _require_file(gsm8k_dir / "train.jsonl", "GSM8K train file")
        gsm8k_test = _require_file(gsm8k_dir / "test.jsonl", "GSM8K test file")
    else:
        gsm8k_train = kit.write_gsm8k_jsonl(data / "gsm8k" / "train.jsonl", settings.train_rows, seed=settings.seed, split="train")
        gsm8k_test = kit.write_gsm8k_jsonl(data / "gsm8k" / "test.jsonl", 200, seed=settings.seed + 1, split="test")

    if bbm_dir is not None:
        rows = [row for task in bbm_tasks for row in _read_jsonl(_require_file(bbm_dir / f"{task}.jsonl", "BIG-Bench Mistake task file"))]
    else:
        rows = kit.bigbench_mistake_examples(settings.train_rows + 200, seed=settings.seed)
    order = list(range(len(rows)))
    random.Random(settings.seed).shuffle(order)
    cut = int(0.8 * len(rows))
    train_rows = [rows[i] for i in order[:cut] if rows[i].get("mistake_index") is None]
    test_rows = [rows[i] for i in order[cut:]]
    if not train_rows or not test_rows:
        raise ValueError(f"BIG-Bench Mistake data gives {len(train_rows)} correct training traces and {len(test_rows)} held-out rows; need both > 0")
    # One training file under a task name the BIG-Bench Mistake adapter accepts, whatever tasks
    # the rows came from.
    _write_jsonl(data / "bigbench_mistake" / "train" / f"{BBM_TASK_FILE}.jsonl", train_rows)
    bbm_test = _write_jsonl(data / "bigbench_mistake" / "test.jsonl", test_rows)
    return DataFiles(gsm8k_train, gsm8k_test, data / "bigbench_mistake" / "train", (BBM_TASK_FILE,), bbm_test)


# ---------------------------------------------------------------- configs


def _load_config(name: str) -> DictConfig:
    path = REPO_CONFIGS / "tiny" / name
    if not path.is_file():
        raise FileNotFoundError(f"the demo builds on {path}, which is missing: run it from a source checkout")
    return OmegaConf.load(path)


def _tokenizer_section(base: BaseModel, max_seq_len: Optional[int]) -> dict:
    folder = base.tokenizer_dir
    return {
        "_component_": "torchtune.models.qwen2_5.qwen2_5_tokenizer",
        "path": str(folder / "vocab.json"),
        "merges_file": str(folder / "merges.txt"),
        "special_tokens_path": str(folder / "tokenizer.json"),
        "max_seq_len": max_seq_len,
    }


def weight_files(checkpoint: Path) -> list[str]:
    """The safetensors files of a Hugging Face checkpoint folder (names differ: a base has
    ``model.safetensors``, torchtune writes ``model-00001-of-0000N.safetensors``)."""
    files = sorted(p.name for p in Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {checkpoint}")
    return files


def epoch_plan(steps: int, batch_size: int, rows: int) -> dict[str, int]:
    """``epochs`` and ``max_steps_per_epoch`` giving ``steps`` optimizer steps on ``rows`` examples
    (more epochs when one epoch has fewer than ``steps`` batches)."""
    batches = rows // batch_size
    if batches < 1:
        raise ValueError(f"{rows} training rows cannot fill one batch of {batch_size}")
    epochs = math.ceil(steps / batches)
    if steps % epochs:
        raise ValueError(f"{steps} steps do not split into {epochs} equal epochs of at most {batches} batches; "
                         f"pick --steps as a multiple of {epochs} or add training rows")
    return {"epochs": epochs, "max_steps_per_epoch": steps // epochs}


def _training_rows(files: DataFiles, mode: str) -> int:
    if mode == "marker":
        return sum(len(_read_jsonl(files.bbm_train_dir / f"{task}.jsonl")) for task in files.bbm_tasks)
    return len(_read_jsonl(files.gsm8k_train))


def train_config(mode: str, base: BaseModel, files: DataFiles, settings: DemoSettings, run_dir: Path) -> DictConfig:
    """The tiny single-device config of ``mode`` pointed at the demo's model, data and budget."""
    cfg = _load_config("marker_bigbench_single_device.yaml" if mode == "marker" else f"{mode}_single_device.yaml")
    if mode == "marker":
        dataset = {
            "_component_": "entropy_guided_generation.data.bigbench_mistake_dataset",
            "data_dir": str(files.bbm_train_dir),
            "tasks": list(files.bbm_tasks),
            "marker": BBM_MARKER,
            "answer_field": "answer",
        }
        val = None
        cfg.interleaving.marker = BBM_MARKER
    else:
        dataset = {"_component_": "entropy_guided_generation.data.gsm8k_dataset", "data_files": str(files.gsm8k_train),
                   "prompt_template": "{question}\n", "response_template": "{answer}"}
        val = {**dataset, "data_files": str(files.gsm8k_test)}
    overrides = {
        "output_dir": str(run_dir),
        "checkpointer": {"checkpoint_dir": str(base.checkpoint_dir), "checkpoint_files": weight_files(base.checkpoint_dir),
                         "model_type": base.model_type, "output_dir": str(run_dir)},
        "tokenizer": _tokenizer_section(base, MAX_PLAIN_TOKENS),
        # Interleaving about doubles a response's length: positions for the interleaved sequence.
        "model": {"max_seq_len": MAX_INTERLEAVED_POSITIONS},
        "dataset": dataset,
        "dataset_val": val,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        **epoch_plan(settings.steps, settings.batch_size, _training_rows(files, mode)),
        "gradient_accumulation_steps": 1,
        "optimizer": {"lr": settings.lr},
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(run_dir / "logs")},
    }
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.checkpointer.checkpoint_files = OmegaConf.create(weight_files(base.checkpoint_dir))
    # Replace (not merge) the datasets: the config's GSM8K keys must not leak into another adapter.
    cfg.dataset = OmegaConf.create(dataset)
    cfg.dataset_val = OmegaConf.create(val) if val is not None else None
    return cfg


def _gen_budget(mode: str, settings: DemoSettings) -> int:
    """Content tokens per answer: BIG-Bench-Mistake traces are about twice a word problem's length."""
    return 2 * settings.max_gen_toks if mode == "marker" else settings.max_gen_toks


def eval_config(mode: str, checkpoint: Path, base: BaseModel, files: DataFiles, settings: DemoSettings, eval_dir: Path) -> DictConfig:
    """The tiny eval config of ``mode`` on the finetuned checkpoint and the held-out task."""
    cfg = _load_config(f"eval_{mode}.yaml")
    if mode == "marker":
        include, tasks = kit.bigbench_mistake_tasks_dir(files.bbm_test), [kit.BIGBENCH_MISTAKE_TASK]
        cfg.interleaving.marker = BBM_MARKER
    else:
        include, tasks = kit.tasks_dir(data=files.gsm8k_test, fewshot_data=files.gsm8k_train), ["kit_gsm8k"]
    overrides = {
        "output_dir": str(eval_dir),
        "checkpointer": {"checkpoint_dir": str(checkpoint), "checkpoint_files": weight_files(checkpoint),
                         "model_type": base.model_type, "output_dir": str(eval_dir)},
        "tokenizer": _tokenizer_section(base, None),
        "include_path": str(include),
        "tasks": tasks,
        "limit": settings.eval_limit,
        "max_gen_toks": _gen_budget(mode, settings),
        "gen_kwargs": {"max_gen_toks": _gen_budget(mode, settings)},
        "seed": settings.seed,
    }
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.tasks = OmegaConf.create(tasks)
    cfg.checkpointer.checkpoint_files = OmegaConf.create(weight_files(checkpoint))
    return cfg


# ---------------------------------------------------------------- running with reuse


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_current(folder: Path, fingerprint: str, required: str) -> bool:
    stamp = folder / STAMP
    return (folder / required).exists() and stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint


def _write_stamp(folder: Path, fingerprint: str) -> None:
    (folder / STAMP).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def final_checkpoint(run_dir: Path) -> Path:
    """The last ``epoch_N`` folder a finetune wrote."""
    epochs = sorted((p for p in run_dir.glob("epoch_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    if not epochs:
        raise FileNotFoundError(f"no epoch_N checkpoint in {run_dir}")
    return epochs[-1]


def finetune(mode: str, cfg: DictConfig, run_dir: Path, fingerprint: str) -> Path:
    """Run the recipe (or reuse its finished output); returns the final checkpoint folder."""
    if _is_current(run_dir, fingerprint, "logs"):
        print(f"[demo] {mode}: reusing the finetune in {run_dir}")
        return final_checkpoint(run_dir)
    print(f"[demo] {mode}: finetuning ({cfg.epochs * cfg.max_steps_per_epoch} steps) -> {run_dir}", flush=True)
    # The folder is the demo's own: what an unfinished or outdated earlier demo left there goes.
    run_recipe(OmegaConf.merge(cfg, {"overwrite_output_dir": True}), mode=mode, distributed=False)
    _write_stamp(run_dir, fingerprint)
    return final_checkpoint(run_dir)


def evaluate(mode: str, cfg: DictConfig, eval_dir: Path, fingerprint: str) -> dict:
    """Run the eval recipe (or reuse its summary); returns the summary plus per-sample pairs."""
    summary_path = eval_dir / "demo_eval.json"
    if _is_current(eval_dir, fingerprint, summary_path.name):
        print(f"[demo] {mode}: reusing the evaluation in {eval_dir}")
        return json.loads(summary_path.read_text())
    print(f"[demo] {mode}: evaluating on {cfg.limit} held-out problems", flush=True)
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()
    pairs = per_sample_pairs(summary, recipe)
    kept = {k: v for k, v in summary.items() if k != "lm_eval"}
    kept["per_sample"] = pairs
    summary_path.write_text(json.dumps(kept, indent=2, default=str) + "\n")
    _write_stamp(eval_dir, fingerprint)
    return kept


def per_sample_pairs(summary: dict, recipe: Any) -> dict:
    """(confidence, correct) per held-out sample of the headline (task, filter, metric)."""
    task, filt, metric = summary.get("task"), summary.get("filter"), summary.get("metric")
    if task is None:
        return {"confidence": [], "correct": []}
    confidence = generation_confidence_by_doc(recipe.lm.traces, task)
    samples = [s for s in summary["lm_eval"]["samples"][task] if s["filter"] == filt]
    return {
        "confidence": [confidence[s["doc_id"]] for s in samples],
        "correct": [float(s[metric]) for s in samples],
    }


# ---------------------------------------------------------------- pictures


def loss_history(log_dir: Path) -> list[float]:
    """Training loss per optimizer step, from the recipe's DiskLogger files."""
    logged = read_disk_log(log_dir)
    return [logged[step]["loss"] for step in sorted(logged) if "loss" in logged[step]]


def draw_confidence_example(mode: str, checkpoint: Path, base: BaseModel, question: str, out: Path, settings: DemoSettings) -> dict:
    """Decode one held-out question greedily in ``mode`` and write it coloured by confidence bin."""
    tokenizer = kit.load_tokenizer(folder=base.tokenizer_dir)
    model = kit.load_torchtune_model(checkpoint).eval()
    found = find_confidence_json(checkpoint)
    metadata = read_confidence_json(found) if found else None
    # A mode-none finetune records its mode without a codec: show the kit's default bins then.
    codec = metadata.to_codec() if metadata is not None and metadata.has_codec else ConfidenceCodec.from_config(
        {"signal": "entropy", "edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, tokenizer=tokenizer
    )
    prompt = torch.tensor([tokenizer.encode(question, add_bos=False, add_eos=False)])
    extra: dict[str, Any] = {"codec": codec}
    if mode == "marker":
        extra["marker"] = tokenizer.encode(BBM_MARKER, add_bos=False, add_eos=False)
    with torch.inference_mode():
        result = get_decoder(mode)(model, prompt, max_generated_tokens=_gen_budget(mode, settings), pad_id=tokenizer.pad_id,
                                   temperature=0.0, stop_tokens=list(tokenizer.stop_tokens), **extra)
    n = int(result.generated_lengths[0])
    ids = result.content[0, :n].tolist()
    bins = result.bins[0, :n].tolist()
    # In mode none no confidence token is fed; show the bin the codec would give, for comparison.
    if mode == "none":
        bins = codec.bins_from_signal(result.entropies[0, :n] if codec.signal == "entropy" else result.token_logprobs[0, :n].exp()).tolist()
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    title = f"mode {mode}: {question.strip()}"
    (out / f"confidence_{mode}.html").write_text(visualize.confidence_html(pieces, bins, codec.num_bins, title))
    visualize.confidence_png(pieces, bins, codec.num_bins, out / f"confidence_{mode}.png", title)
    return {"question": question, "answer": "".join(pieces), "bins": bins}


# ---------------------------------------------------------------- table


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def results_table(rows: Sequence[dict]) -> str:
    header = f"{'mode':<8} {'data':<18} {'accuracy':>9} {'ECE':>7} {'AUROC':>7} {'mean conf':>10} {'decode tok/s':>13} {'n':>4}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['mode']:<8} {r['data']:<18} {_fmt(r['accuracy']):>9} {_fmt(r['ece']):>7} {_fmt(r['auroc']):>7} "
            f"{_fmt(r['mean_confidence']):>10} {_fmt(r['decode_tokens_per_s'], '.1f'):>13} {r['num_samples'] or 0:>4}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def resolve_base(checkpoint: Optional[Path], tokenizer_dir: Optional[Path], model_type: str) -> BaseModel:
    """The demo's base model: ``checkpoint`` (a Hugging Face folder) or the kit's trained base."""
    folder = Path(checkpoint) if checkpoint is not None else kit.trained_base()
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else folder
    missing = [name for name in TOKENIZER_FILES if not (tok / name).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {tok} lacks {', '.join(missing)} (Qwen2.5-format vocab.json, merges.txt, tokenizer.json expected)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {folder} has no config.json; expected a Hugging Face checkpoint")
    return BaseModel(folder.resolve(), tok.resolve(), model_type)


def run_demo(
    out: Path,
    settings: DemoSettings,
    modes: Sequence[str] = MODES,
    gsm8k_dir: Optional[Path] = None,
    bbm_dir: Optional[Path] = None,
    bbm_tasks: Sequence[str] = (BBM_TASK_FILE,),
    checkpoint: Optional[Path] = None,
    tokenizer_dir: Optional[Path] = None,
    model_type: str = "QWEN2",
) -> dict:
    """The whole pipeline; returns what ``results.json`` holds."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown demo modes {unknown}; expected some of {', '.join(MODES)}")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(checkpoint, tokenizer_dir, model_type)
    files = prepare_data(out, settings, gsm8k_dir, bbm_dir, bbm_tasks)
    rows, curves, examples = [], {}, {}
    for mode in modes:
        run_dir, eval_dir = out / "runs" / mode, out / "eval" / mode
        eval_dir.mkdir(parents=True, exist_ok=True)
        cfg = train_config(mode, base, files, settings, run_dir)
        train_fp = _fingerprint(OmegaConf.to_container(cfg), asdict(settings), _file_digest(files, mode))
        checkpoint_dir = finetune(mode, cfg, run_dir, train_fp)
        ecfg = eval_config(mode, checkpoint_dir, base, files, settings, eval_dir)
        summary = evaluate(mode, ecfg, eval_dir, _fingerprint(OmegaConf.to_container(ecfg), train_fp))
        pairs = summary["per_sample"]
        visualize.reliability_diagram(pairs["confidence"], pairs["correct"], out / f"reliability_{mode}.png",
                                      title=f"mode {mode}: ECE {_fmt(summary['ece'])}, AUROC {_fmt(summary['auroc'])}")
        curves[mode] = loss_history(run_dir / "logs")
        question = _example_question(files, mode)
        examples[mode] = draw_confidence_example(mode, checkpoint_dir, base, question, out, settings)
        rows.append({
            "mode": mode,
            "data": "bigbench_mistake" if mode == "marker" else "gsm8k",
            "task": summary["task"], "metric": f"{summary['metric']} ({summary['filter']})",
            "accuracy": summary["accuracy"], "ece": summary["ece"], "auroc": summary["auroc"],
            "mean_confidence": summary["mean_confidence"], "decode_tokens_per_s": summary["decode_tokens_per_s"],
            "num_samples": summary["num_samples"], "checkpoint": str(checkpoint_dir),
            "final_train_loss": curves[mode][-1] if curves[mode] else None,
        })
    visualize.loss_curves(curves, out / "loss_curves.png", title=f"training loss ({settings.steps} steps each)")
    results = {
        "settings": asdict(settings),
        "base_checkpoint": str(base.checkpoint_dir),
        "data": {k: str(v) for k, v in asdict(files).items()},
        "rows": rows,
        "loss_curves": curves,
        "examples": examples,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n" + results_table(rows))
    print(f"\n[demo] {results['seconds']:.0f}s; pictures and results.json in {out}")
    return results


def _file_digest(files: DataFiles, mode: str) -> str:
    paths = [files.bbm_train_dir / f"{t}.jsonl" for t in files.bbm_tasks] + [files.bbm_test] if mode == "marker" else [files.gsm8k_train, files.gsm8k_test]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _example_question(files: DataFiles, mode: str) -> str:
    if mode == "marker":
        return _read_jsonl(files.bbm_test)[0]["input"] + "\n"
    return _read_jsonl(files.gsm8k_test)[0]["question"] + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="python -m entropy_guided_generation.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of none,answer,marker")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per finetune (same for every mode)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--eval-limit", type=int, default=defaults.eval_limit, help="held-out problems per mode")
    parser.add_argument("--max-gen-toks", type=int, default=defaults.max_gen_toks)
    parser.add_argument("--train-rows", type=int, default=defaults.train_rows, help="kit training rows (kit data only)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--gsm8k", type=Path, default=None, help="folder with GSM8K-format train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k)")
    parser.add_argument("--bigbench-mistake", type=Path, default=None, help="folder of BIG-Bench Mistake task files (e.g. ../shared/data/bigbench_mistake)")
    parser.add_argument("--bigbench-tasks", default=BBM_TASK_FILE, help="comma-separated task files of --bigbench-mistake (the held-out task scores the number after the marker: arithmetic answers)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="your Hugging Face checkpoint folder (default: the kit's trained base)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="folder with Qwen2.5-format tokenizer files (default: --checkpoint)")
    parser.add_argument("--model-type", default="QWEN2", help="torchtune checkpointer model_type of --checkpoint")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    settings = DemoSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_limit=args.eval_limit,
                            max_gen_toks=args.max_gen_toks, train_rows=args.train_rows, seed=args.seed)
    run_demo(
        args.out, settings, modes=[m.strip() for m in args.modes.split(",") if m.strip()], gsm8k_dir=args.gsm8k,
        bbm_dir=args.bigbench_mistake, bbm_tasks=tuple(t.strip() for t in args.bigbench_tasks.split(",")),
        checkpoint=args.checkpoint, tokenizer_dir=args.tokenizer_dir, model_type=args.model_type,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
