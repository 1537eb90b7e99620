"""The main job (``make demo``): does Confidence-as-Context work here, and why or why not?

Modes ``none``, ``full``, ``answer`` and ``marker`` finetune from one base model on identical budgets
(same data, steps, batch size, learning rate, codec, position rule) through the real recipe; each is
evaluated through the eval recipe (lm-eval's evaluator) on held-out problems, then analysed
(:mod:`entropy_guided_generation.demo_analysis`): the same problems decoded again with every
confidence token fixed or shuffled (does the model read its confidence?), calibration read from
the bins themselves, the bins at right and wrong result digits, train/decode agreement of the bins,
the held-out content loss before and after finetuning. Optional studies: ``--sweep-steps`` (a
learning curve per mode, one finetune per budget) and ``--compare`` (one setting changed for every
mode alike). Nothing is tuned per mode.

Default ("the embedded default"): the kit's trained tiny base model and its GSM8K-format word
problems for every mode (marker: reasoning interleaved up to and including ``####``, the final answer
plain), scored by lm-eval's gsm8k answer extraction.

Outputs in ``--out`` (default ``outputs/demo/``): ``results.json`` (every number), pictures
(``confidence_<mode>``, ``reliability_<mode>``, ``loss_curves``, ``ablation``, ``digit_bins`` and, with
the studies, ``learning_curves``), and per run ``runs/<settings>/<mode>/`` (checkpoint, logs),
``eval/<mode>/`` (lm-eval results, samples, traces), ``analysis/<settings>/<mode>.json``. Re-running
reuses every finished step whose settings did not change.

    python -m entropy_guided_generation.demo                       # the embedded default
    python -m entropy_guided_generation.demo --sweep-steps 240,480,960,1920 --compare codec=entropy_quantile,lr=0.003
    python -m entropy_guided_generation.demo --gsm8k ../shared/data/gsm8k   # real data (GSM8K-format JSONL)
    python -m entropy_guided_generation.demo --checkpoint MY_HF_DIR --model-type QWEN2   # your own model
    python -m entropy_guided_generation.demo --base smollm2 --publish docs/real_model   # the real-model study

``--base smollm2`` starts every mode from the kit's real model (SmolLM2-135M-Instruct) with its own default
budget (:data:`SMOLLM2_DEFAULTS`, about an hour on 2 idle cores) and studies (:data:`SMOLLM2_STUDIES`: a
learning-curve point, the ``context=plain`` row; and the step-0 study of the base through each layout).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from entropy_guided_generation import kit, visualize
from entropy_guided_generation.confidence import (
    ConfidenceCodec,
    find_confidence_json,
    kit_confidence_tokens,
    read_confidence_json,
    resolve_token_ids,
    smollm2_unused_confidence_tokens,
)
from entropy_guided_generation.demo_analysis import analyze_run
from entropy_guided_generation.demo_analysis.heldout import GSM8K
from entropy_guided_generation.demo_analysis.step0 import RowsVariant, step0_study
from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.eval.report import generation_confidence_by_doc
from entropy_guided_generation.generation import decode
from entropy_guided_generation.kit.train_base import mixed_format_base
from entropy_guided_generation.modes import Interleaving
from entropy_guided_generation.modeling import vocab_size_of
from entropy_guided_generation.vocabulary import grow_model, rows_needed
from entropy_guided_generation.training import read_disk_log, run_recipe

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODES = ("none", "full", "answer", "marker")
GSM8K_MARKER = "####"
BBM_MARKER = "So the answer is:"
BBM_TASK_FILE = "multistep_arithmetic"
MARKER_TASKS = ("gsm8k", "bigbench_mistake")
CODECS = {
    "entropy_round": {"signal": "entropy", "edges": {"scheme": "entropy_round"}},
    "entropy_quantile": {"signal": "entropy", "edges": {"scheme": "quantile"}},
    "maxprob_round": {"signal": "max_prob", "edges": {"scheme": "maxprob_round"}},
    "maxprob_quantile": {"signal": "max_prob", "edges": {"scheme": "quantile"}},
}
"""``--codec``: the confidence signal and its bins (11 kit tokens ``<|conf_k|>``); quantile edges are
fitted by the recipe on the base model's signals over the first training examples, then frozen."""
BASES = ("plain", "mixed", "smollm2")
"""``--base``: the kit's shipped base (``plain``: it has only ever seen plain text), the kit's
mixed-format base (pretrained with random confidence tokens in half of its rows, see
``kit.train_base``) or the kit's real pretrained model (``smollm2``: SmolLM2-135M-Instruct,
``kit.smollm2_135m_instruct``, model type LLAMA3_2, the kit's ``<|conf_k|>`` tokens added), for every
mode alike."""
KIT_MODEL_TYPE = "QWEN2"
REAL_BASES = {"smollm2": "LLAMA3_2"}
"""The real pretrained bases and their torchtune checkpointer model types."""
CONTEXTS = ("interleaved", "plain")
"""``--context``: ``confidence.context`` of every interleaved finetune (``interleaved``: the signal over
the interleaved prefix, exact by fixed point; ``plain``: over the plain prefix, one forward, upstream's
training semantics)."""
SMOLLM2_DEFAULTS = {
    "steps": 40, "batch_size": 4, "lr": 1e-4, "eval_limit": 16, "max_gen_toks": 96, "train_rows": 512,
    "init_embeddings": "mean",
}
"""The real model's default budget, sized so that the whole default study (four finetunes, their
evaluations and analyses, the step-0 study, the learning-curve points and the ``context=plain`` row)
finishes in about an hour on 2 idle CPU cores (see :func:`base_defaults`)."""
SMOLLM2_STUDIES = {"sweep_steps": "20", "compare": "context=plain"}
"""The studies a ``--base smollm2`` run adds by default (``--sweep-steps ""`` / ``--compare ""`` drop them)."""
SMOLLM2_SIZING = (
    "Sized from a tiny run of the same study (4 steps, 4 held-out problems, a 2-step curve point, all four modes: "
    "848 s on one thread of this project's 2-core CPU with the other core busy): a SmolLM2 step of 4 kit problems "
    "took ~20 s in mode full, ~12 s in answer, ~13 s in marker, ~5 s in none (exact bins included), plus ~15 s per "
    "finetune to load and save; a full analysis (four decodes, content losses, agreement, single-pass mismatch at "
    "step 0 and the end) ~65-90 s per mode, the step-0 study 64 s for 4 problems. Extrapolated, the default (40 "
    "steps of 4 rows, 16 held-out problems, the step-0 study on 12, the 20-step curve point, the context=plain "
    "row) is ~5,700 s on that one shared thread: about an hour on 2 idle cores. On a GPU raise --steps, "
    "--batch-size and --eval-limit."
)
STEP0_ROWS = 12
"""Held-out problems of the step-0 study (each is scored in 3 modes x 3 row choices x 2 position rules)."""
EMBEDDING_INITS = ("none", "mean")
POSITION_RULES = ("sequential", "shared")
STAMP = "demo_stamp.json"
ANALYSIS_VERSION = 3  # bump when the analysis changes what it measures: saved analyses are redone
MAX_PLAIN_TOKENS = 256
MAX_INTERLEAVED_POSITIONS = 512
# Settings that do not reach mode none (it has no confidence token): a --compare of one of them
# reuses mode none's default run (positions only on the plain base: each mixed-format base was
# pretrained with its own position rule).
CONFIDENCE_ONLY = ("codec", "positions", "init_embeddings", "context")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers, the same for every mode (a run is reused only
    when these match).

    Attributes:
        steps: optimizer steps per finetune.
        batch_size: sequences per step.
        lr: AdamW learning rate (cosine schedule, 2 warmup steps).
        eval_limit: held-out problems scored per mode.
        max_gen_toks: generation budget per answer (content tokens).
        train_rows: training rows (kit data only).
        seed: data split and training seed.
        codec: a key of :data:`CODECS`.
        positions: ``interleaving.positions`` (``sequential`` | ``shared``).
        init_embeddings: ``interleaving.init_confidence_embeddings``: ``none`` keeps the base's rows
            (``keep``), ``mean`` sets them to the mean embedding.
        base: a key of :data:`BASES` (ignored with ``--checkpoint``).
        marker_task: the data of mode marker: ``gsm8k`` (marker ``####``, like every other mode) or
            ``bigbench_mistake`` (arithmetic traces, marker ``So the answer is:``).
    """

    steps: int = 480
    batch_size: int = 16
    lr: float = 1e-3
    eval_limit: int = 100
    max_gen_toks: int = 96
    train_rows: int = 4000
    seed: int = 0
    codec: str = "entropy_round"
    positions: str = "sequential"
    init_embeddings: str = "none"
    base: str = "mixed"
    marker_task: str = "gsm8k"
    context: str = "interleaved"

    @classmethod
    def for_base(cls, base: str, **given: Any) -> "DemoSettings":
        """Settings on ``base`` with its defaults (:func:`base_defaults`) under the ``given`` fields
        (a value None takes the base's default)."""
        return cls(**{**base_defaults(base), **{k: v for k, v in given.items() if v is not None}, "base": base})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_limit", "max_gen_toks", "train_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.lr, float) and self.lr > 0):
            raise ValueError(f"lr must be a float > 0, got {self.lr!r}")
        for name, allowed in (("codec", tuple(CODECS)), ("positions", POSITION_RULES), ("init_embeddings", EMBEDDING_INITS),
                              ("base", BASES), ("marker_task", MARKER_TASKS), ("context", CONTEXTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")

    def label(self) -> str:
        """A folder name for the finetunes of these settings, from every field that decides them (not
        from the defaults, so a run keeps its folder when a default changes)."""
        context = "" if self.context == "interleaved" else f"-context_{self.context}"  # kit runs keep their folders
        return (f"s{self.steps}-b{self.batch_size}-lr{self.lr:g}-{self.codec}-{self.positions}-{self.base}-"
                f"init_{self.init_embeddings}-r{self.train_rows}-g{self.max_gen_toks}-{self.marker_task}-seed{self.seed}{context}")

    def changes(self) -> str:
        """The fields that differ from the defaults of the base (``default`` when none do), for titles."""
        defaults = {**{f.name: f.default for f in dataclasses.fields(self)}, **base_defaults(self.base)}
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if getattr(self, f.name) != defaults[f.name]]
        return ", ".join(changed) or "default"

    def trained_by(self) -> dict[str, Any]:
        """The fields that decide a finetune (not ``eval_limit``; ``context`` only when it is not the
        default, so runs made before the field existed keep their fingerprints)."""
        fields = {k: v for k, v in asdict(self).items() if k != "eval_limit"}
        if self.context == "interleaved":
            del fields["context"]
        return fields


def base_defaults(base: str) -> dict[str, Any]:
    """The default budget of ``base`` that differs from :class:`DemoSettings`' field defaults: none for
    the kit's bases (their runs keep their settings), :data:`SMOLLM2_DEFAULTS` for the real model
    (sized as :data:`SMOLLM2_SIZING` says).

    Raises:
        ValueError: on a base not in :data:`BASES`.
    """
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; expected one of {', '.join(BASES)}")
    return dict(SMOLLM2_DEFAULTS) if base == "smollm2" else {}


def parse_change(spec: str) -> dict[str, Any]:
    """``"field=value"`` (a :class:`DemoSettings` field) as ``{field: typed value}``.

    Raises:
        ValueError: naming the spec, an unknown field, or a value of the wrong type.
    """
    name, sep, raw = spec.partition("=")
    fields = {f.name: f for f in dataclasses.fields(DemoSettings)}
    if not sep or name not in fields:
        raise ValueError(f"--compare entry {spec!r} must be field=value with field one of {', '.join(fields)}")
    kind = type(fields[name].default)
    try:
        value = kind(raw)
    except ValueError as error:
        raise ValueError(f"--compare entry {spec!r}: {raw!r} is not a {kind.__name__}") from error
    return {name: value}


@dataclass(frozen=True)
class DataFiles:
    """JSONL files the demo trains and evaluates on."""

    gsm8k_train: Path
    gsm8k_test: Path
    bbm_train_dir: Optional[Path] = None  # holds <task>.jsonl files, the layout of shared/data/bigbench_mistake
    bbm_tasks: tuple[str, ...] = ()
    bbm_test: Optional[Path] = None


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
    BIG-Bench Mistake (only when mode marker runs on it): the given task files (or the kit's
    arithmetic traces) split by a seeded shuffle into 80% train / 20% held-out; training keeps only
    traces without a mistake (``mistake_index`` null), so the finetune learns correct reasoning; the
    held-out rows keep all traces and are scored against ``target``.
    """
    data = out / "data"
    if gsm8k_dir is not None:
        gsm8k_train = _require_file(gsm8k_dir / "train.jsonl", "GSM8K train file")
        gsm8k_test = _require_file(gsm8k_dir / "test.jsonl", "GSM8K test file")
    else:
        gsm8k_train = kit.write_gsm8k_jsonl(data / "gsm8k" / "train.jsonl", settings.train_rows, seed=settings.seed, split="train")
        gsm8k_test = kit.write_gsm8k_jsonl(data / "gsm8k" / "test.jsonl", 200, seed=settings.seed + 1, split="test")
    if settings.marker_task != "bigbench_mistake":
        return DataFiles(gsm8k_train, gsm8k_test)

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


def on_bigbench(mode: str, settings: DemoSettings) -> bool:
    return mode == "marker" and settings.marker_task == "bigbench_mistake"


def marker_of(mode: str, settings: DemoSettings) -> Optional[str]:
    if mode != "marker":
        return None
    return BBM_MARKER if on_bigbench(mode, settings) else GSM8K_MARKER


# ---------------------------------------------------------------- configs


def _load_config(name: str) -> DictConfig:
    path = REPO_CONFIGS / "tiny" / name
    if not path.is_file():
        raise FileNotFoundError(f"the demo builds on {path}, which is missing: run it from a source checkout")
    return OmegaConf.load(path)


def _tokenizer_section(base: BaseModel, max_seq_len: Optional[int]) -> dict:
    return kit.tokenizer_section(base.tokenizer_dir, max_seq_len)


def confidence_tokens(base: BaseModel) -> dict:
    """The kit's ``<|conf_k|>`` tokens: named when the base's tokenizer has them, else added (any HF model)."""
    tokenizer = kit.load_folder_tokenizer(base.tokenizer_dir)
    try:
        resolve_token_ids(kit_confidence_tokens(), tokenizer)
    except ValueError:
        return {"add": "kit"}
    return {"preset": "kit"}


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


def _training_rows(files: DataFiles, mode: str, settings: DemoSettings) -> int:
    if on_bigbench(mode, settings):
        return sum(len(_read_jsonl(files.bbm_train_dir / f"{task}.jsonl")) for task in files.bbm_tasks)
    return len(_read_jsonl(files.gsm8k_train))


def _interleaving_section(mode: str, settings: DemoSettings) -> dict:
    section: dict[str, Any] = {"positions": settings.positions}
    if mode == "marker":
        section["marker"] = marker_of(mode, settings)
    return section


def train_config(mode: str, base: BaseModel, files: DataFiles, settings: DemoSettings, run_dir: Path) -> DictConfig:
    """The tiny single-device config of ``mode`` pointed at the demo's model, data, codec and budget."""
    bbm = on_bigbench(mode, settings)
    cfg = _load_config("marker_bigbench_single_device.yaml" if bbm else f"{mode}_single_device.yaml")
    if bbm:
        dataset = {
            "_component_": "entropy_guided_generation.data.bigbench_mistake_dataset",
            "data_dir": str(files.bbm_train_dir),
            "tasks": list(files.bbm_tasks),
            "marker": BBM_MARKER,
            "answer_field": "answer",
        }
        val = None
    else:
        dataset = {"_component_": "entropy_guided_generation.data.gsm8k_dataset", "data_files": str(files.gsm8k_train),
                   "prompt_template": "{question}\n", "response_template": "{answer}"}
        val = {**dataset, "data_files": str(files.gsm8k_test)}
    overrides = {
        "output_dir": str(run_dir),
        "checkpointer": {"checkpoint_dir": str(base.checkpoint_dir), "checkpoint_files": weight_files(base.checkpoint_dir),
                         "model_type": base.model_type, "output_dir": str(run_dir)},
        # Interleaving about doubles a response's length: positions for the interleaved sequence.
        "model": {"max_seq_len": MAX_INTERLEAVED_POSITIONS},
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        **epoch_plan(settings.steps, settings.batch_size, _training_rows(files, mode, settings)),
        "gradient_accumulation_steps": 1,
        "optimizer": {"lr": settings.lr},
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(run_dir / "logs")},
    }
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.checkpointer.checkpoint_files = OmegaConf.create(weight_files(base.checkpoint_dir))
    # Replace (not merge) the tokenizer, the datasets and the codec: the config's keys must not leak into another choice.
    cfg.tokenizer = OmegaConf.create(_tokenizer_section(base, MAX_PLAIN_TOKENS))
    cfg.dataset = OmegaConf.create(dataset)
    cfg.dataset_val = OmegaConf.create(val) if val is not None else None
    if mode != "none":
        cfg.confidence = OmegaConf.create({**CODECS[settings.codec], "temperature": 1.0, "tokens": confidence_tokens(base)})
        if settings.context != "interleaved":  # only then: default configs (and their fingerprints) unchanged
            cfg.confidence.context = settings.context
        cfg.interleaving = OmegaConf.merge(cfg.interleaving, _interleaving_section(mode, settings))
        # Explicit either way: unset, the recipe would reset rows the kit's mixed-format base was pretrained with.
        cfg.interleaving.init_confidence_embeddings = "keep" if settings.init_embeddings == "none" else settings.init_embeddings
    return cfg


def _gen_budget(mode: str, settings: DemoSettings) -> int:
    """Content tokens per answer: BIG-Bench-Mistake traces are about twice a word problem's length."""
    return 2 * settings.max_gen_toks if on_bigbench(mode, settings) else settings.max_gen_toks


def eval_config(mode: str, checkpoint: Path, base: BaseModel, files: DataFiles, settings: DemoSettings, eval_dir: Path) -> DictConfig:
    """The tiny eval config of ``mode`` on the finetuned checkpoint and the held-out task (mode,
    marker, positions and codec come from the checkpoint's ``confidence.json``)."""
    cfg = _load_config(f"eval_{mode}.yaml")
    if on_bigbench(mode, settings):
        include, tasks = kit.bigbench_mistake_tasks_dir(files.bbm_test), [kit.BIGBENCH_MISTAKE_TASK]
    else:
        include, tasks = kit.tasks_dir(data=files.gsm8k_test, fewshot_data=files.gsm8k_train), ["kit_gsm8k"]
    overrides = {
        "output_dir": str(eval_dir),
        "checkpointer": {"checkpoint_dir": str(checkpoint), "checkpoint_files": weight_files(checkpoint),
                         "model_type": base.model_type, "output_dir": str(eval_dir)},
        "include_path": str(include),
        "tasks": tasks,
        "limit": settings.eval_limit,
        "max_gen_toks": _gen_budget(mode, settings),
        "gen_kwargs": {"max_gen_toks": _gen_budget(mode, settings)},
        "seed": settings.seed,
    }
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.tasks = OmegaConf.create(tasks)
    cfg.tokenizer = OmegaConf.create(_tokenizer_section(base, None))  # replaced: another tokenizer takes other keys
    cfg.checkpointer.checkpoint_files = OmegaConf.create(weight_files(checkpoint))
    if mode != "none":
        cfg.interleaving = OmegaConf.merge(cfg.interleaving, _interleaving_section(mode, settings))
        cfg.confidence = None  # confidence.json beside the checkpoint holds the (possibly fitted) codec
    return cfg


# ---------------------------------------------------------------- running with reuse


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamp_of(folder: Path, fingerprint: str, required: str) -> Optional[dict]:
    """The stamp of a finished step in ``folder`` with this fingerprint, else None."""
    stamp = folder / STAMP
    if not ((folder / required).exists() and stamp.is_file()):
        return None
    data = json.loads(stamp.read_text())
    return data if data.get("fingerprint") == fingerprint else None


def _write_stamp(folder: Path, fingerprint: str, **extra: Any) -> None:
    (folder / STAMP).write_text(json.dumps({"fingerprint": fingerprint, **extra}) + "\n")


def run_fingerprint(cfg: DictConfig, run_dir: Path, settings: "DemoSettings", files: "DataFiles", mode: str) -> str:
    """What decides a finetune: its config (the run's own folder left out: a finetune is the same
    wherever it is written), the settings and the data files' bytes."""
    trained_by = settings.trained_by()
    portable = json.dumps(OmegaConf.to_container(cfg), sort_keys=True).replace(str(run_dir), "<run_dir>")
    return _fingerprint(portable, trained_by, _file_digest(files, mode, settings))


def final_checkpoint(run_dir: Path) -> Path:
    """The last ``epoch_N`` folder a finetune wrote."""
    epochs = sorted((p for p in run_dir.glob("epoch_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    if not epochs:
        raise FileNotFoundError(f"no epoch_N checkpoint in {run_dir}")
    return epochs[-1]


@dataclass(frozen=True)
class FinishedRun:
    """A finetune's checkpoint, its training-loss history and how long it took (wall and CPU seconds,
    when it ran)."""

    mode: str
    settings: DemoSettings
    checkpoint: Path
    run_dir: Path
    fingerprint: str
    train_seconds: float
    train_cpu_seconds: float
    loss: list[float]


def finetune(mode: str, cfg: DictConfig, run_dir: Path, fingerprint: str) -> tuple[Path, float, float]:
    """Run the recipe (or reuse its finished output); returns the final checkpoint folder and the
    wall and CPU seconds the finetune took (when it first ran)."""
    stamp = _stamp_of(run_dir, fingerprint, "logs")
    if stamp is not None:
        print(f"[demo] {mode}: reusing the finetune in {run_dir}")
        return final_checkpoint(run_dir), float(stamp.get("seconds", math.nan)), float(stamp.get("cpu_seconds", math.nan))
    print(f"[demo] {mode}: finetuning ({cfg.epochs * cfg.max_steps_per_epoch} steps) -> {run_dir}", flush=True)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    # The folder is the demo's own: what an unfinished or outdated earlier demo left there goes.
    run_recipe(OmegaConf.merge(cfg, {"overwrite_output_dir": True}), mode=mode, distributed=False)
    seconds, cpu = round(time.perf_counter() - started, 1), round(_cpu_seconds() - cpu_started, 1)
    _write_stamp(run_dir, fingerprint, seconds=seconds, cpu_seconds=cpu)
    return final_checkpoint(run_dir), seconds, cpu


def evaluate(mode: str, cfg: DictConfig, eval_dir: Path, fingerprint: str) -> dict:
    """Run the eval recipe (or reuse its summary); returns the summary plus per-sample pairs."""
    summary_path = eval_dir / "demo_eval.json"
    if _stamp_of(eval_dir, fingerprint, summary_path.name) is not None:
        print(f"[demo] {mode}: reusing the evaluation in {eval_dir}")
        return json.loads(summary_path.read_text())
    print(f"[demo] {mode}: evaluating on {cfg.limit} held-out problems", flush=True)
    started = time.perf_counter()
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()
    pairs = per_sample_pairs(summary, recipe)
    recipe.cleanup()  # frees eval_dir's run lock and request cache
    kept = {k: v for k, v in summary.items() if k != "lm_eval"}
    kept["per_sample"] = pairs
    kept["seconds"] = round(time.perf_counter() - started, 1)
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


# ---------------------------------------------------------------- the studies


class Demo:
    """The demo's runs, shared by the default table and the studies (a run with the same settings
    is trained once, whichever study asks for it first)."""

    def __init__(self, out: Path, settings: DemoSettings, base: BaseModel, files: DataFiles, custom_base: bool):
        self.out, self.settings, self.files, self.custom_base = out, settings, files, custom_base
        self.plain_base = base
        # (base, positions) -> checkpoint; the base run_demo resolved serves its own name.
        self._bases: dict[tuple[str, str], BaseModel] = {("smollm2" if settings.base == "smollm2" else "plain", ""): base}
        self._runs: dict[tuple[str, DemoSettings], FinishedRun] = {}

    def base_for(self, settings: DemoSettings) -> BaseModel:
        """The base checkpoint of ``settings`` (``--checkpoint`` when given, else the kit base it names)."""
        if self.custom_base:
            return self.plain_base
        # Each mixed-format base was pretrained with its own position rule.
        key = (settings.base, settings.positions if settings.base == "mixed" else "")
        if key not in self._bases:
            if settings.base == "mixed":
                folder = mixed_format_base(settings.positions, log=lambda line: print(f"[demo] {line}", flush=True))
                self._bases[key] = BaseModel(folder, folder, KIT_MODEL_TYPE)
            else:
                folder, model_type = kit_base_folder(settings.base)
                self._bases[key] = BaseModel(folder, folder, model_type)
        return self._bases[key]

    def run(self, mode: str, settings: DemoSettings) -> FinishedRun:
        """Finetune ``mode`` under ``settings`` (or reuse it)."""
        key = (mode, settings)
        if key not in self._runs:
            run_dir = self.out / "runs" / settings.label() / mode
            base = self.base_for(settings)
            cfg = train_config(mode, base, self.files, settings, run_dir)
            fingerprint = run_fingerprint(cfg, run_dir, settings, self.files, mode)
            checkpoint, seconds, cpu = finetune(mode, cfg, run_dir, fingerprint)
            self._runs[key] = FinishedRun(mode, settings, checkpoint, run_dir, fingerprint, seconds, cpu, loss_history(run_dir / "logs"))
        return self._runs[key]

    def analysis(self, run: FinishedRun, *, full: bool) -> dict:
        """:func:`~entropy_guided_generation.demo_analysis.analyze_run` of ``run`` (or its saved result;
        a saved full analysis also serves a short one)."""
        folder = self.out / "analysis" / run.settings.label()
        reference = self.reference_codec(run.settings) if run.mode == "none" and full else None
        fingerprint = _fingerprint(run.fingerprint, run.settings.eval_limit, ANALYSIS_VERSION, reference is not None)
        for kind in ("full",) if full else ("full", "short"):
            path = folder / f"{run.mode}.{kind}.json"
            if path.is_file():
                saved = json.loads(path.read_text())
                serves_short = kind == "full" and not full and saved.get("run") == run.fingerprint
                if saved.get("fingerprint") == fingerprint or (serves_short and saved.get("eval_limit") == run.settings.eval_limit):
                    print(f"[demo] {run.mode}: reusing the analysis in {path}")
                    return saved["analysis"]
        print(f"[demo] {run.mode}: analysing {run.checkpoint} ({'full' if full else 'accuracy and loss'})", flush=True)
        started = time.perf_counter()
        result = analyze_run(
            run.checkpoint, self.base_for(run.settings).checkpoint_dir, self.base_for(run.settings).tokenizer_dir, run.mode,
            heldout_rows(self.files, run.mode, run.settings), marker=marker_of(run.mode, run.settings),
            bigbench=on_bigbench(run.mode, run.settings), max_gen_toks=_gen_budget(run.mode, run.settings),
            max_passes=training_max_passes(run.mode, run.settings), full=full, reference_codec=reference,
            init_embeddings=None if run.settings.init_embeddings == "none" else run.settings.init_embeddings,
        )
        result["seconds"] = round(time.perf_counter() - started, 1)
        path = folder / f"{run.mode}.{'full' if full else 'short'}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": fingerprint, "run": run.fingerprint, "eval_limit": run.settings.eval_limit, "analysis": result}
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        return result

    def reference_codec(self, settings: DemoSettings) -> Any:
        """Mode answer's codec under ``settings``, mode none's stand-in for would-be bins (None when
        mode answer is not part of this demo)."""
        if ("answer", settings) not in self._runs:
            return None
        found = find_confidence_json(self._runs[("answer", settings)].checkpoint)
        return read_confidence_json(found).to_codec() if found else None

    def step0(self, settings: DemoSettings, modes: Sequence[str]) -> Optional[dict]:
        """The step-0 study (:func:`~entropy_guided_generation.demo_analysis.step0.step0_study`) of the base
        of ``settings`` on the first :data:`STEP0_ROWS` held-out problems, for the interleaved ``modes``
        on GSM8K data, with the codec the first of their finetunes trained with (or its saved result).

        Row choices: the finetunes' own tokens (kit tokens added to a real model: appended rows, the mean
        of the trained rows, so raw equals mean there), and, when the base's tokenizer has SmolLM2's
        unused special tokens, those with their pretrained rows (``raw``) and set to the mean (``mean``).
        None when no interleaved mode runs on GSM8K data.
        """
        modes = [m for m in MODES if m in modes and m != "none" and not on_bigbench(m, settings)]
        if not modes:
            return None
        run = self.run(modes[0], settings)
        codec = read_confidence_json(find_confidence_json(run.checkpoint)).to_codec()
        base = self.base_for(settings)
        rows = heldout_rows(self.files, modes[0], settings)[:STEP0_ROWS]
        path = self.out / "analysis" / settings.label() / "step0.json"
        fingerprint = _fingerprint(run.fingerprint, modes, len(rows), ANALYSIS_VERSION)
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
            print(f"[demo] step 0: reusing the study in {path}")
            return json.loads(path.read_text())["study"]
        print(f"[demo] step 0: content loss of the base through each layout ({len(rows)} held-out problems)", flush=True)
        started = time.perf_counter()
        tokenizer = kit.load_folder_tokenizer(base.tokenizer_dir)
        init = "mean" if settings.init_embeddings == "mean" or confidence_tokens(base) == {"add": "kit"} else "raw"
        variants = [RowsVariant("finetune's", codec, init)]
        try:
            unused = resolve_token_ids(smollm2_unused_confidence_tokens(), tokenizer)
        except ValueError:
            unused = None
        if unused is not None:
            own = dataclasses.replace(codec, token_ids=torch.tensor(unused))
            variants += [RowsVariant("smollm2_unused", own, "raw"), RowsVariant("smollm2_unused", own, "mean")]
        with torch.inference_mode():
            model = kit.load_torchtune_model(base.checkpoint_dir)
            model = grow_model(model, rows_needed(codec.token_ids.tolist(), vocab_size_of(model))).eval()
            study = step0_study(model, tokenizer, rows, GSM8K, variants=variants,
                                modes=[(m, marker_of(m, settings)) for m in modes])
        study["seconds"] = round(time.perf_counter() - started, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint, "study": study}, indent=1) + "\n")
        return study



def training_max_passes(mode: str, settings: DemoSettings) -> Optional[int]:
    """The fixed-point pass cap the mode's tiny config trains with (None: until no bin changes)."""
    if mode == "none":
        return None
    name = "marker_bigbench_single_device.yaml" if on_bigbench(mode, settings) else f"{mode}_single_device.yaml"
    return _load_config(name).interleaving.get("max_passes", None)


def heldout_rows(files: DataFiles, mode: str, settings: DemoSettings) -> list[dict]:
    """The rows lm-eval scores (its ``limit`` takes the first ones)."""
    path = files.bbm_test if on_bigbench(mode, settings) else files.gsm8k_test
    return _read_jsonl(path)[: settings.eval_limit]


def passes_per_micro_batch(log_dir: Path) -> Optional[float]:
    """Mean no-grad fixed-point forwards per micro-batch over a finetune's logged steps (``conf/passes_mean``;
    None in mode none, which logs none)."""
    logged = read_disk_log(log_dir)
    found = [m["conf/passes_mean"] for m in logged.values() if "conf/passes_mean" in m]
    return sum(found) / len(found) if found else None


def study_fields(run: FinishedRun, found: dict) -> dict:
    """What the real-model study adds to every row: passes per micro-batch of the finetune, and the
    share of training bins one plain-context pass gets wrong on the base (step 0) and the finetune."""
    return {
        "passes_per_micro_batch": passes_per_micro_batch(run.run_dir / "logs"),
        "single_pass_mismatch_step0": (found.get("base_single_pass_mismatch") or {}).get("share"),
        "single_pass_mismatch": (found.get("single_pass_mismatch") or {}).get("share"),
    }


def loss_history(log_dir: Path) -> list[float]:
    """Training loss per optimizer step, from the recipe's DiskLogger files."""
    logged = read_disk_log(log_dir)
    return [logged[step]["loss"] for step in sorted(logged) if "loss" in logged[step]]


def _final_loss(loss: Sequence[float]) -> Optional[float]:
    """Mean training loss over the last tenth of the steps (at least one)."""
    if not loss:
        return None
    tail = loss[-max(1, len(loss) // 10) :]
    return sum(tail) / len(tail)


def sweep_points(demo: Demo, modes: Sequence[str], steps_list: Sequence[int]) -> dict[str, list[dict]]:
    """Per mode, one finetune per budget in ``steps_list`` (other settings: the demo's), each
    scored on the held-out set: the learning curve."""
    points: dict[str, list[dict]] = {mode: [] for mode in modes}
    for steps in steps_list:
        settings = dataclasses.replace(demo.settings, steps=steps)
        for mode in modes:
            run = demo.run(mode, settings)
            found = demo.analysis(run, full=False)
            points[mode].append({
                "steps": steps, "accuracy": found["real"]["accuracy"], "ece": found["real"]["ece"],
                "auroc": found["real"]["auroc"], "content_loss": found["content_loss"],
                "final_train_loss": _final_loss(run.loss), "train_seconds": run.train_seconds,
                "train_cpu_seconds": run.train_cpu_seconds,
            })
            print(f"[demo] sweep {mode} @ {steps} steps: accuracy {found['real']['accuracy']:.3f}, "
                  f"held-out content loss {found['content_loss']:.3f}", flush=True)
    return points


def compare_rows(demo: Demo, modes: Sequence[str], changes: Sequence[dict]) -> list[dict]:
    """One row per (change, mode): the demo's settings with one field changed, for every mode alike
    (mode none reuses its default run when the change only concerns confidence tokens)."""
    rows = []
    for change in [{}] + list(changes):
        settings = dataclasses.replace(demo.settings, **change)
        label = ", ".join(f"{k}={v}" for k, v in change.items()) or "default"
        for mode in modes:
            unaffected = mode == "none" and change and set(change) <= set(CONFIDENCE_ONLY) and not (
                "positions" in change and settings.base == "mixed"
            )
            run = demo.run(mode, demo.settings if unaffected else settings)
            found = demo.analysis(run, full=True)
            rows.append(summary_row(label, mode, run, found, reused_default=bool(unaffected)))
    return rows


def summary_row(label: str, mode: str, run: FinishedRun, found: dict, reused_default: bool = False) -> dict:
    """The numbers of one analysed run that the comparison table shows."""
    ablations = found.get("ablations") or {}
    trace = found.get("trace") or {}
    return {
        "change": label, "mode": mode, "accuracy": found["real"]["accuracy"], "ece": found["real"]["ece"],
        "auroc": found["real"]["auroc"], "trace_ece": trace.get("ece"), "trace_auroc": trace.get("auroc"),
        "trace_min_auroc": (found.get("trace_min") or {}).get("auroc"),
        "content_loss": found["content_loss"], "base_content_loss": found.get("base_content_loss"),
        "final_train_loss": _final_loss(run.loss),
        **{f"{name}_change": ablation["accuracy_change"] for name, ablation in ablations.items()},
        "agreement": (found.get("agreement") or {}).get("equal_fraction"),
        **study_fields(run, found),
        "train_seconds": run.train_seconds, "train_cpu_seconds": run.train_cpu_seconds, "reused_default_run": reused_default,
    }


# ---------------------------------------------------------------- pictures


def draw_confidence_example(mode: str, checkpoint: Path, base: BaseModel, question: str, out: Path, settings: DemoSettings) -> dict:
    """Decode one held-out question greedily in ``mode`` and write it coloured by confidence bin."""
    tokenizer = kit.load_folder_tokenizer(checkpoint if (checkpoint / "tokenizer.json").is_file() else base.tokenizer_dir)
    model = kit.load_torchtune_model(checkpoint).eval()
    found = find_confidence_json(checkpoint)
    metadata = read_confidence_json(found) if found else None
    # A mode-none finetune records its mode without a codec: show entropy_round bins then (only the edges
    # matter: mode none feeds no confidence token, so the ids are placeholders).
    codec = metadata.to_codec() if metadata is not None and metadata.has_codec else ConfidenceCodec.from_config(
        {**CODECS["entropy_round"], "token_ids": list(range(11))}
    )
    interleaving = Interleaving.for_tokenizer(mode, tokenizer, marker_of(mode, settings), getattr(metadata, "positions", "sequential"))
    prompt = torch.tensor([tokenizer.encode(question, add_bos=False, add_eos=False)])
    with torch.inference_mode():
        result = decode(model, prompt, interleaving=interleaving, max_generated_tokens=_gen_budget(mode, settings),
                        pad_id=tokenizer.pad_id, temperature=0.0, stop_tokens=list(tokenizer.stop_tokens),
                        codec=None if mode == "none" else codec, marker=interleaving.marker_ids)
    n = int(result.generated_lengths[0])
    ids = result.content[0, :n].tolist()
    bins = result.bins[0, :n].tolist()
    # In mode none no confidence token is fed; show the bin an entropy codec would give, for comparison.
    if mode == "none" and codec.signal == "entropy":
        bins = codec.bins_from_signal(result.entropies[0, :n]).tolist()
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    title = f"mode {mode}: {question.strip()}"
    (out / f"confidence_{mode}.html").write_text(visualize.confidence_html(pieces, bins, codec.num_bins, title))
    visualize.confidence_png(pieces, bins, codec.num_bins, out / f"confidence_{mode}.png", title)
    return {"question": question, "answer": "".join(pieces), "bins": bins}


# ---------------------------------------------------------------- tables


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _table(columns: Sequence[tuple[str, str, int, str]], rows: Sequence[dict]) -> str:
    """Fixed-width text table: ``(header, key, width, format)`` per column; strings left-aligned."""
    def cell(row: dict, key: str, width: int, spec: str) -> str:
        value = row.get(key)
        if isinstance(value, str):
            return f"{value:<{width}}"
        return f"{_fmt(value, spec):>{width}}"

    header = " ".join(f"{h:<{w}}" if s == "s" else f"{h:>{w}}" for h, _, w, s in columns)
    lines = [header, "-" * len(header)]
    lines += [" ".join(cell(r, k, w, s) for _, k, w, s in columns) for r in rows]
    return "\n".join(lines)


def results_table(rows: Sequence[dict]) -> str:
    """The headline: lm-eval's accuracy and the eval recipe's calibration, per mode."""
    return _table([
        ("mode", "mode", 7, "s"), ("data", "data", 17, "s"), ("accuracy", "accuracy", 9, ".3f"),
        ("x none", "relative_accuracy", 7, ".2f"), ("ECE", "ece", 6, ".3f"), ("AUROC", "auroc", 6, ".3f"),
        ("mean conf", "mean_confidence", 9, ".3f"), ("decode tok/s", "decode_tokens_per_s", 12, ".1f"),
        ("train CPU s", "train_cpu_seconds", 11, ".0f"), ("n", "num_samples", 4, "d"),
    ], rows)


def analysis_table(rows: Sequence[dict]) -> str:
    """Why: content loss before/after, trace calibration, ablations, agreement."""
    return _table([
        ("mode", "mode", 7, "s"), ("loss@0", "base_content_loss", 7, ".3f"), ("loss", "content_loss", 6, ".3f"),
        ("trace ECE", "trace_ece", 9, ".3f"), ("trace AUROC", "trace_auroc", 11, ".3f"),
        ("min AUROC", "trace_min_auroc", 9, ".3f"), ("d fixed-conf", "fixed_confident_change", 12, "+.3f"),
        ("d fixed-unconf", "fixed_unconfident_change", 14, "+.3f"), ("d shuffled", "shuffled_change", 10, "+.3f"), ("agree", "agreement", 6, ".3f"),
    ], rows)


def digits_table(rows: Sequence[dict]) -> str:
    """Bins and entropies at right vs wrong result digits."""
    return _table([
        ("mode", "mode", 7, "s"), ("right", "n_right", 6, "d"), ("wrong", "n_wrong", 6, "d"),
        ("H right", "entropy_right", 8, ".3f"), ("H wrong", "entropy_wrong", 8, ".3f"),
        ("bin right", "bin_right", 9, ".2f"), ("bin wrong", "bin_wrong", 9, ".2f"),
        ("prev right", "prev_right", 10, ".2f"), ("prev wrong", "prev_wrong", 10, ".2f"),
        ("AUROC H", "auroc_entropy", 8, ".3f"), ("AUROC bin", "auroc_bin", 9, ".3f"),
    ], rows)


def compare_table(rows: Sequence[dict]) -> str:
    return _table([
        ("change", "change", 26, "s"), ("mode", "mode", 7, "s"), ("accuracy", "accuracy", 9, ".3f"),
        ("ECE", "ece", 6, ".3f"), ("trace AUROC", "trace_auroc", 11, ".3f"), ("loss@0", "base_content_loss", 7, ".3f"),
        ("loss", "content_loss", 6, ".3f"), ("d shuffled", "shuffled_change", 10, "+.3f"),
        ("d fixed-unconf", "fixed_unconfident_change", 14, "+.3f"), ("train CPU s", "train_cpu_seconds", 11, ".0f"),
    ], rows)


def fixed_point_table(rows: Sequence[dict]) -> str:
    """Per row (mode and setting): content loss at step 0 and at the end, passes per micro-batch,
    single-pass mismatch at step 0 and at the end, train/decode agreement."""
    labelled = [{**r, "change": r.get("change", "default")} for r in rows if r["mode"] != "none"]
    return _table([
        ("change", "change", 26, "s"), ("mode", "mode", 7, "s"), ("loss@0", "base_content_loss", 7, ".3f"),
        ("loss", "content_loss", 6, ".3f"), ("passes", "passes_per_micro_batch", 7, ".1f"),
        ("1-pass wrong@0", "single_pass_mismatch_step0", 14, ".3f"), ("1-pass wrong", "single_pass_mismatch", 12, ".3f"),
        ("agree", "agreement", 6, ".3f"),
    ], labelled)


def step0_table(rows: Sequence[dict]) -> str:
    """The step-0 study: content loss through each layout, and its excess over plain."""
    return _table([
        ("mode", "mode", 7, "s"), ("tokens", "tokens", 15, "s"), ("rows", "init", 5, "s"), ("positions", "positions", 10, "s"),
        ("loss", "content_loss", 7, ".3f"), ("excess", "excess", 7, "+.3f"),
    ], rows)


def sweep_table(points: dict[str, list[dict]]) -> str:
    steps = sorted({p["steps"] for rows in points.values() for p in rows})
    rows = []
    for mode, found in points.items():
        by_steps = {p["steps"]: p for p in found}
        row: dict[str, Any] = {"mode": mode}
        for s in steps:
            if s in by_steps:
                row[f"a{s}"] = f"{by_steps[s]['accuracy']:.3f} / {by_steps[s]['content_loss']:.3f}"
        rows.append(row)
    return _table([("mode", "mode", 7, "s")] + [(f"{s} steps", f"a{s}", 15, "s") for s in steps], rows)


# ---------------------------------------------------------------- main


def kit_base_folder(base: str) -> tuple[Path, str]:
    """The Hugging Face folder and model type of a kit base that is a plain checkpoint (``plain``: the
    kit's trained base; ``smollm2``: the kit's real model). ``mixed`` is pretrained per position rule
    (:meth:`Demo.base_for`).

    Raises:
        ValueError: on any other base.
    """
    if base == "plain":
        return kit.trained_base(), KIT_MODEL_TYPE
    if base in REAL_BASES:
        return kit.smollm2_135m_instruct(), REAL_BASES[base]
    raise ValueError(f"base {base!r} is not a plain checkpoint; expected plain or {', '.join(REAL_BASES)}")


def resolve_base(checkpoint: Optional[Path], tokenizer_dir: Optional[Path], model_type: str, base: str = "mixed") -> BaseModel:
    """The demo's base model: ``checkpoint`` (a Hugging Face folder, of ``model_type``), else the kit's
    real model when ``base`` is one (:data:`REAL_BASES`), else the kit's trained base."""
    if checkpoint is not None:
        folder = Path(checkpoint)
    else:
        folder, model_type = kit_base_folder(base if base in REAL_BASES else "plain")
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else folder
    if not (tok / "tokenizer.json").is_file() and not (tok / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"tokenizer folder {tok} holds no tokenizer.json or tokenizer_config.json; expected a Hugging Face tokenizer "
            "folder (Qwen2.5-format vocab.json + merges.txt + tokenizer.json, or any HF tokenizer)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {folder} has no config.json; expected a Hugging Face checkpoint")
    return BaseModel(folder.resolve(), tok.resolve(), model_type)


def _file_digest(files: DataFiles, mode: str, settings: DemoSettings) -> str:
    if on_bigbench(mode, settings):
        paths = [files.bbm_train_dir / f"{t}.jsonl" for t in files.bbm_tasks] + [files.bbm_test]
    else:
        paths = [files.gsm8k_train, files.gsm8k_test]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _example_question(files: DataFiles, mode: str, settings: DemoSettings) -> str:
    if on_bigbench(mode, settings):
        return _read_jsonl(files.bbm_test)[0]["input"] + "\n"
    return _read_jsonl(files.gsm8k_test)[0]["question"] + "\n"


def _headline_row(mode: str, settings: DemoSettings, run: FinishedRun, summary: dict, found: dict) -> dict:
    ablations = found.get("ablations") or {}
    trace = found.get("trace") or {}
    digits = found.get("digits") or {}
    right, wrong = digits.get("right") or {}, digits.get("wrong") or {}
    return {
        "mode": mode,
        "data": "bigbench_mistake" if on_bigbench(mode, settings) else "gsm8k",
        "task": summary["task"], "metric": f"{summary['metric']} ({summary['filter']})",
        "accuracy": summary["accuracy"], "ece": summary["ece"], "auroc": summary["auroc"],
        "mean_confidence": summary["mean_confidence"], "decode_tokens_per_s": summary["decode_tokens_per_s"],
        "num_samples": summary["num_samples"], "checkpoint": str(run.checkpoint),
        "train_seconds": run.train_seconds, "train_cpu_seconds": run.train_cpu_seconds, "eval_seconds": summary.get("seconds"),
        "analysis_seconds": found.get("seconds"),
        "final_train_loss": _final_loss(run.loss),
        "analysis_accuracy": found["real"]["accuracy"],
        "base_content_loss": found.get("base_content_loss"), "content_loss": found["content_loss"],
        "trace_ece": trace.get("ece"), "trace_auroc": trace.get("auroc"),
        "trace_min_ece": (found.get("trace_min") or {}).get("ece"), "trace_min_auroc": (found.get("trace_min") or {}).get("auroc"),
        **{f"{name}_change": ablation["accuracy_change"] for name, ablation in ablations.items()},
        "agreement": (found.get("agreement") or {}).get("equal_fraction"),
        **study_fields(run, found),
        "n_right": right.get("n"), "n_wrong": wrong.get("n"),
        "entropy_right": right.get("mean_entropy"), "entropy_wrong": wrong.get("mean_entropy"),
        "bin_right": right.get("mean_own_bin"), "bin_wrong": wrong.get("mean_own_bin"),
        "prev_right": right.get("mean_prev_bin"), "prev_wrong": wrong.get("mean_prev_bin"),
        "auroc_entropy": digits.get("auroc_entropy"), "auroc_bin": digits.get("auroc_bin"),
    }


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
    sweep_steps: Sequence[int] = (),
    compare: Sequence[dict] = (),
    publish: Optional[Path] = None,
) -> dict:
    """The whole pipeline; returns what ``results.json`` holds. On the real model (``settings.base``
    ``smollm2``, no ``checkpoint``) also the step-0 study; with ``publish``, ``results.json`` and the
    pictures are copied there (e.g. ``docs/real_model``)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown demo modes {unknown or list(modes)}; expected some of {', '.join(MODES)}")
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(checkpoint, tokenizer_dir, model_type, settings.base)
    files = prepare_data(out, settings, gsm8k_dir, bbm_dir, bbm_tasks)
    demo = Demo(out, settings, base, files, custom_base=checkpoint is not None)
    rows, analyses, curves, examples = [], {}, {}, {}
    # Mode none last: its analysis reads would-be bins with mode answer's codec.
    ordered = sorted(dict.fromkeys(modes), key=lambda m: (m == "none", MODES.index(m)))
    for mode in ordered:
        run = demo.run(mode, settings)
        eval_dir = out / "eval" / settings.label() / mode
        eval_dir.mkdir(parents=True, exist_ok=True)
        ecfg = eval_config(mode, run.checkpoint, demo.base_for(settings), files, settings, eval_dir)
        summary = evaluate(mode, ecfg, eval_dir, _fingerprint(OmegaConf.to_container(ecfg), run.fingerprint))
        analyses[mode] = demo.analysis(run, full=True)
        pairs = summary["per_sample"]
        visualize.reliability_diagram(pairs["confidence"], pairs["correct"], out / f"reliability_{mode}.png",
                                      title=f"mode {mode}: ECE {_fmt(summary['ece'])}, AUROC {_fmt(summary['auroc'])}")
        curves[mode] = run.loss
        examples[mode] = draw_confidence_example(mode, run.checkpoint, demo.base_for(settings), _example_question(files, mode, settings), out, settings)
        rows.append(_headline_row(mode, settings, run, summary, analyses[mode]))
        if abs(rows[-1]["analysis_accuracy"] - rows[-1]["accuracy"]) > 1e-9 and not on_bigbench(mode, settings):
            print(f"[demo] warning: {mode}: the analysis decode scores {rows[-1]['analysis_accuracy']:.3f}, lm-eval {rows[-1]['accuracy']:.3f}")
    none_accuracy = next((r["accuracy"] for r in rows if r["mode"] == "none"), None)
    for r in rows:
        r["relative_accuracy"] = r["accuracy"] / none_accuracy if none_accuracy else None
    rows.sort(key=lambda r: MODES.index(r["mode"]))

    visualize.loss_curves({m: curves[m] for m in MODES if m in curves}, out / "loss_curves.png",
                          title=f"training loss ({settings.steps} steps each)", log_y=True)
    interleaved = [m for m in MODES if m in analyses and analyses[m].get("ablations")]
    visualize.ablation_bars(
        {m: {"real bins": analyses[m]["real"]["accuracy"], **{k: v["accuracy"] for k, v in analyses[m]["ablations"].items()}} for m in interleaved},
        out / "ablation.png",
    )
    visualize.digit_bins({m: {k: (analyses[m]["digits"].get(k) or {}).get("own_bin_histogram") for k in ("right", "wrong")}
                          for m in interleaved}, out / "digit_bins.png", title="bins of the distributions that produced result digits")
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "base_checkpoint": str(demo.base_for(settings).checkpoint_dir),
        "data": {k: str(v) for k, v in asdict(files).items()},
        "rows": rows,
        "analysis": analyses,
        "loss_curves": curves,
        "examples": examples,
    }
    if sweep_steps:
        results["sweep"] = sweep_points(demo, ordered, sweep_steps)
        visualize.learning_curves(results["sweep"], out / "learning_curves.png",
                                  title=f"one finetune per budget (settings otherwise: {settings.changes()})")
    if settings.base in REAL_BASES and checkpoint is None:
        results["step0"] = demo.step0(settings, ordered)
    if compare:
        results["compare"] = compare_rows(demo, ordered, compare)
        by_mode: dict[str, dict[str, float]] = {}
        for row in results["compare"]:
            by_mode.setdefault(row["mode"], {})[row["change"]] = row["accuracy"]
        visualize.ablation_bars({m: by_mode[m] for m in MODES if m in by_mode}, out / "compare.png",
                                title=f"one setting changed for every mode ({settings.steps} steps)")
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["cpu_seconds"] = round(_cpu_seconds() - cpu_started, 1)
    results["threads"] = torch.get_num_threads()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n" + results_table(rows))
    print("\nWhy (held-out content loss of the base (loss@0) and after; calibration of the bins; accuracy change when "
          "every confidence token is fixed or shuffled; share of bins training re-derives equal to the decoded ones):")
    print(analysis_table(rows))
    print("\nResult digits (a op b = c, #### n): entropy (H) of the distribution that wrote them, its bin, the bin read just before:")
    print(digits_table(rows))
    if sweep_steps:
        print("\nLearning curves (held-out accuracy / content loss per budget):\n" + sweep_table(results["sweep"]))
    if compare:
        print("\nOne setting changed for every mode:\n" + compare_table(results["compare"]))
    print("\nFixed point (passes per micro-batch; share of training bins one plain-context pass gets wrong, at step 0 and "
          "at the end):\n" + fixed_point_table(results.get("compare") or rows))  # compare rows hold the default's too
    if results.get("step0"):
        print(f"\nStep 0 (held-out content loss of the base, nats per content token; plain {results['step0']['plain']:.3f}):\n"
              + step0_table(results["step0"]["rows"]))
    if publish is not None:
        publish_results(out, publish)
    print(f"\n[demo] {results['seconds']:.0f}s ({results['cpu_seconds']:.0f} CPU seconds on {results['threads']} threads); "
          f"pictures and results.json in {out}")
    return results


PUBLISHED = ("results.json", "*.png")


def publish_results(out: Path, dest: Path) -> list[Path]:
    """Copy a finished run's ``results.json`` and pictures from ``out`` into ``dest`` (the way
    ``docs/demo`` and ``docs/real_model`` are made); returns the copied files.

    Raises:
        FileNotFoundError: when ``out`` holds no ``results.json``.
    """
    if not (out / "results.json").is_file():
        raise FileNotFoundError(f"{out} holds no results.json; run the demo with --out {out} first")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in PUBLISHED:
        for path in sorted(out.glob(pattern)):
            shutil.copyfile(path, dest / path.name)
            copied.append(dest / path.name)
    print(f"[demo] published {len(copied)} files to {dest}")
    return copied


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (on a busy machine, what the run would take alone)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from error
    if any(v < 1 for v in values):
        raise ValueError(f"{what} must be integers >= 1, got {text!r}")
    return values


def _per_base(name: str) -> str:
    """Help text of a budget option: its default on the kit's bases and on the real model."""
    kit_default = getattr(DemoSettings(), name)
    return f"(default: {kit_default} on the kit's bases, {SMOLLM2_DEFAULTS.get(name, kit_default)} on smollm2)"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="python -m entropy_guided_generation.demo", description=__doc__.split("\n\n")[0],
        epilog=f"--base smollm2 (the kit's real model, SmolLM2-135M-Instruct): {SMOLLM2_SIZING} "
               f"Its default studies: --sweep-steps {SMOLLM2_STUDIES['sweep_steps']} --compare {SMOLLM2_STUDIES['compare']} and the step-0 study.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of none,full,answer,marker")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per finetune, same for every mode {_per_base('steps')}")
    parser.add_argument("--batch-size", type=int, default=None, help=_per_base("batch_size"))
    parser.add_argument("--lr", type=float, default=None, help=_per_base("lr"))
    parser.add_argument("--eval-limit", type=int, default=None, help=f"held-out problems per mode {_per_base('eval_limit')}")
    parser.add_argument("--max-gen-toks", type=int, default=None, help=_per_base("max_gen_toks"))
    parser.add_argument("--train-rows", type=int, default=None, help=f"kit training rows, kit data only {_per_base('train_rows')}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--codec", default=defaults.codec, choices=list(CODECS), help="confidence signal and bins, for every mode")
    parser.add_argument("--positions", default=defaults.positions, choices=POSITION_RULES, help="interleaving.positions, for every mode")
    parser.add_argument("--init-embeddings", default=None, choices=EMBEDDING_INITS,
                        help=f"interleaving.init_confidence_embeddings, for every mode {_per_base('init_embeddings')}")
    parser.add_argument("--context", default=defaults.context, choices=CONTEXTS, help="confidence.context of every interleaved finetune")
    parser.add_argument("--base", default=defaults.base, choices=BASES, help="the kit base every mode starts from")
    parser.add_argument("--marker-task", default=defaults.marker_task, choices=MARKER_TASKS, help="the data of mode marker")
    parser.add_argument("--sweep-steps", default=None, help="learning curves: comma-separated budgets, one finetune per mode and budget "
                        f"(e.g. 240,480,960,1920; default: none on the kit's bases, {SMOLLM2_STUDIES['sweep_steps']} on smollm2)")
    parser.add_argument("--compare", default=None, help="comma-separated field=value changes of the settings, each run for every mode "
                        f"(e.g. codec=entropy_quantile,lr=0.003; default: none on the kit's bases, {SMOLLM2_STUDIES['compare']} on smollm2)")
    parser.add_argument("--publish", type=Path, default=None, help="copy results.json and the pictures there after the run (e.g. docs/real_model)")
    parser.add_argument("--gsm8k", type=Path, default=None, help="folder with GSM8K-format train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k)")
    parser.add_argument("--bigbench-mistake", type=Path, default=None, help="folder of BIG-Bench Mistake task files for mode marker (implies --marker-task bigbench_mistake)")
    parser.add_argument("--bigbench-tasks", default=BBM_TASK_FILE, help="comma-separated task files of --bigbench-mistake (the held-out task scores the number after the marker: arithmetic answers)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="your Hugging Face checkpoint folder (default: the kit's trained base)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="a Hugging Face tokenizer folder (Qwen2.5-format files, or any HF tokenizer: then the confidence tokens are added; default: --checkpoint)")
    parser.add_argument("--model-type", default="QWEN2", help="torchtune checkpointer model_type of --checkpoint")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The demo's settings: the options given, the base's defaults (:func:`base_defaults`) for the rest."""
    marker_task = "bigbench_mistake" if args.bigbench_mistake is not None else args.marker_task
    return DemoSettings.for_base(
        args.base, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_limit=args.eval_limit,
        max_gen_toks=args.max_gen_toks, train_rows=args.train_rows, seed=args.seed, codec=args.codec,
        positions=args.positions, init_embeddings=args.init_embeddings, marker_task=marker_task, context=args.context,
    )


def studies_from_args(args: argparse.Namespace) -> tuple[list[int], list[dict]]:
    """``--sweep-steps`` and ``--compare`` as budgets and changes (not given: the base's default studies)."""
    real = args.base in REAL_BASES and args.checkpoint is None
    sweep = args.sweep_steps if args.sweep_steps is not None else (SMOLLM2_STUDIES["sweep_steps"] if real else "")
    compare = args.compare if args.compare is not None else (SMOLLM2_STUDIES["compare"] if real else "")
    return _int_list(sweep, "--sweep-steps"), [parse_change(spec.strip()) for spec in compare.split(",") if spec.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    sweep, changes = studies_from_args(args)
    for change in changes:
        dataclasses.replace(settings, **change)  # checks the value before any work
    run_demo(
        args.out, settings, modes=[m.strip() for m in args.modes.split(",") if m.strip()], gsm8k_dir=args.gsm8k,
        bbm_dir=args.bigbench_mistake, bbm_tasks=tuple(t.strip() for t in args.bigbench_tasks.split(",")),
        checkpoint=args.checkpoint, tokenizer_dir=args.tokenizer_dir, model_type=args.model_type,
        sweep_steps=sweep, compare=changes, publish=args.publish,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
