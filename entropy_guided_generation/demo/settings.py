"""Demo settings and constants: the modes' shared budget (:class:`DemoSettings`), the bases, the codecs,
the files a run reads (:class:`DataFiles`) and the base model (:class:`BaseModel`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from entropy_guided_generation import kit
from entropy_guided_generation.modes import ANSWER, FULL, MARKER, NONE
from entropy_guided_generation.positions import POSITION_RULES


REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


MODES = tuple(mode.name for mode in (NONE, FULL, ANSWER, MARKER))  # the built-in modes, in table order


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
    "row) is ~5,700 s on that one shared thread: about an hour on 2 idle cores. The default study then ran in "
    "4,568 s on this CPU's 2 cores (shared with other work part of the time). On a GPU raise --steps, "
    "--batch-size and --eval-limit."
)


STEP0_ROWS = 12
"""Held-out problems of the step-0 study (each is scored in 3 modes x 3 row choices x 2 position rules)."""


EMBEDDING_INITS = ("none", "mean")




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


__all__ = ["ANALYSIS_VERSION", "BASES", "BBM_MARKER", "BBM_TASK_FILE", "BaseModel", "CODECS", "CONFIDENCE_ONLY", "CONTEXTS", "DataFiles", "DemoSettings", "EMBEDDING_INITS", "GSM8K_MARKER", "KIT_MODEL_TYPE", "MARKER_TASKS", "MAX_INTERLEAVED_POSITIONS", "MAX_PLAIN_TOKENS", "MODES", "POSITION_RULES", "REAL_BASES", "REPO_CONFIGS", "SMOLLM2_DEFAULTS", "SMOLLM2_SIZING", "SMOLLM2_STUDIES", "STAMP", "STEP0_ROWS", "base_defaults", "kit_base_folder", "parse_change"]
