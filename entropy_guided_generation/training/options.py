"""What a finetune config asks for, read and checked once: the interleaving mode (from the entry
point or ``interleaving.mode``), its options, and the training loop's settings.

Every bad value raises an error naming the key, the value and what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from omegaconf import DictConfig

from entropy_guided_generation.interleaving_config import SHARED_KEYS, InterleavingConfig, check_section_keys
from entropy_guided_generation.modes import MODES, check_mode

INTERLEAVING_KEYS = SHARED_KEYS + ("reference_checkpoint", "init_confidence_embeddings", "min_marker_fraction")
EMBEDDING_INITS = (None, "mean", "keep")
DEFAULT_MAX_PASSES = None  # iterate until no bin changes: the bins decoding produces
# Mode marker: setup fails when fewer of the first training examples hold the marker in their response.
DEFAULT_MIN_MARKER_FRACTION = 0.5


@dataclass(frozen=True)
class InterleavingOptions(InterleavingConfig):
    """The ``interleaving`` section of a finetune: the shared keys
    (:class:`~entropy_guided_generation.interleaving_config.InterleavingConfig`: mode, marker,
    positions, max_passes; a capped batch that has not converged is warned about and counted in the
    metrics) and the training-only ones.

    Attributes:
        reference_checkpoint: where bins come from: None = the model being trained (no grad);
            a checkpoint folder (str) or a checkpointer config = a frozen reference model.
        init_confidence_embeddings: ``"mean"`` resets the embedding rows of the confidence tokens,
            before training starts (never on resume), to the mean embedding of the other tokens (see
            ``training.embeddings``); ``"keep"`` keeps the checkpoint's rows; None (default) is
            ``mean`` in an interleaving mode unless the starting checkpoint was finetuned with these
            tokens (its ``confidence.json`` records the same ids), else ``keep``. Tokens a base model
            never trained (Llama-3 reserved tokens, repurposed unused specials, added tokens) otherwise
            enter with arbitrary vectors that the pre-norm layers blow up to full scale, and the
            exact bins take many more fixed-point passes.
        min_marker_fraction: modes that read a marker: the least share of the first training
            examples whose response holds the marker (as the tokenizer encodes it in context);
            below it setup fails, since a row without its marker is interleaved whole. 0 disables.
    """

    reference_checkpoint: Any = None
    init_confidence_embeddings: Optional[str] = None
    min_marker_fraction: float = DEFAULT_MIN_MARKER_FRACTION


def resolve_mode(entry_mode: Optional[str], config_mode: Optional[str]) -> str:
    """The mode to train: the entry point's, the config's, and an error when they disagree.

    Raises:
        ValueError: when both are given and differ, when neither is given, or on an unknown mode.
    """
    if entry_mode is not None and config_mode is not None and entry_mode != config_mode:
        raise ValueError(
            f"this entry point trains interleaving.mode {entry_mode!r} but the config sets interleaving.mode "
            f"{config_mode!r}; remove interleaving.mode from the config or run the {config_mode!r} entry point"
        )
    mode = entry_mode if entry_mode is not None else config_mode
    if mode is None:
        raise ValueError(
            f"no interleaving mode: set interleaving.mode to one of {', '.join(MODES)} or run a mode's entry point"
        )
    return check_mode(mode)


def interleaving_options(cfg: DictConfig, entry_mode: Optional[str] = None) -> InterleavingOptions:
    """Read and check ``cfg.interleaving`` (optional when the entry point fixes the mode)."""
    section = cfg.get("interleaving", None) or {}
    check_section_keys(section, INTERLEAVING_KEYS)
    shared = InterleavingConfig.checked(
        resolve_mode(entry_mode, section.get("mode", None)),
        marker=section.get("marker", None),
        positions=section.get("positions", None),
        max_passes=section.get("max_passes", DEFAULT_MAX_PASSES),
    )
    init_embeddings = section.get("init_confidence_embeddings", None)
    if init_embeddings not in EMBEDDING_INITS:
        raise ValueError(
            f"unknown interleaving.init_confidence_embeddings {init_embeddings!r}; expected null (mean unless the "
            "checkpoint was finetuned with these tokens) or one of "
            f"{', '.join(repr(k) for k in EMBEDDING_INITS if k is not None)}"
        )
    min_marker_fraction = section.get("min_marker_fraction", DEFAULT_MIN_MARKER_FRACTION)
    if isinstance(min_marker_fraction, bool) or not isinstance(min_marker_fraction, (int, float)) or not 0 <= min_marker_fraction <= 1:
        raise ValueError(f"interleaving.min_marker_fraction must be a number in [0, 1], got {min_marker_fraction!r}")
    return InterleavingOptions(
        **{field.name: getattr(shared, field.name) for field in fields(InterleavingConfig)},
        reference_checkpoint=section.get("reference_checkpoint", None),
        init_confidence_embeddings=init_embeddings,
        min_marker_fraction=float(min_marker_fraction),
    )


def config_bool(cfg: DictConfig, key: str, default: bool, *, section: str = "") -> bool:
    """``cfg[key]`` as a real boolean (unset or null: ``default``); ``section`` prefixes the key in errors.

    Raises:
        ValueError: on anything else, e.g. the string ``"False"``, which Python would count as True.
    """
    value = cfg.get(key, None)
    if value is None:
        return default
    if not isinstance(value, bool):
        name = f"{section}.{key}" if section else key
        raise ValueError(f"{name} must be True or False, got {value!r} (a {type(value).__name__}); write it unquoted, e.g. {name}=True")
    return value


def _positive_int(cfg: DictConfig, key: str, default: Any, *, allow_none: bool = False) -> Optional[int]:
    value = cfg.get(key, default)
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        expected = "an int >= 1" + (" or null" if allow_none else "")
        raise ValueError(f"{key} must be {expected}, got {value!r}")
    return value


@dataclass(frozen=True)
class LoopOptions:
    """The training loop's settings (torchtune's names and meanings, plus step checkpoints).

    Attributes:
        save_every_n_steps: write a resumable step checkpoint every n optimizer steps (and always
            at the end of an epoch); None: only at epoch ends.
        keep_last_n_checkpoints: step checkpoints kept on disk (older ones are deleted).
        stop_after_steps: end the run after this global step (a step checkpoint is written), e.g.
            to fit a job's time limit; the run resumes with ``resume_from_checkpoint=True``.
        run_val_every_n_steps: validation loss on ``dataset_val`` every n steps; it also runs at
            every epoch end when ``dataset_val`` is set.
    """

    epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    max_steps_per_epoch: Optional[int]
    clip_grad_norm: Optional[float]
    optimizer_in_bwd: bool
    compile: bool
    enable_activation_checkpointing: bool
    enable_activation_offloading: bool
    shuffle: bool
    log_every_n_steps: int
    log_peak_memory_stats: bool
    resume_from_checkpoint: bool
    save_every_n_steps: Optional[int]
    keep_last_n_checkpoints: int
    stop_after_steps: Optional[int]
    run_val_every_n_steps: Optional[int]
    max_val_batches: Optional[int]


def loop_options(cfg: DictConfig) -> LoopOptions:
    """Read and check the loop settings of ``cfg``.

    Raises:
        ValueError: on a bad value, on ``optimizer_in_bwd`` with gradient accumulation or clipping
            (as in torchtune), or on activation offloading without activation checkpointing.
    """
    clip = cfg.get("clip_grad_norm", None)
    if clip is not None:
        clip = float(clip)
        if not clip > 0:
            raise ValueError(f"clip_grad_norm must be > 0 (or 'inf' to only log the norm), got {clip}")
    options = LoopOptions(
        epochs=_positive_int(cfg, "epochs", None),
        batch_size=_positive_int(cfg, "batch_size", None),
        gradient_accumulation_steps=_positive_int(cfg, "gradient_accumulation_steps", 1),
        max_steps_per_epoch=_positive_int(cfg, "max_steps_per_epoch", None, allow_none=True),
        clip_grad_norm=clip,
        optimizer_in_bwd=config_bool(cfg, "optimizer_in_bwd", False),
        compile=config_bool(cfg, "compile", False),
        enable_activation_checkpointing=config_bool(cfg, "enable_activation_checkpointing", False),
        enable_activation_offloading=config_bool(cfg, "enable_activation_offloading", False),
        shuffle=config_bool(cfg, "shuffle", True),
        log_every_n_steps=_positive_int(cfg, "log_every_n_steps", 1),
        log_peak_memory_stats=config_bool(cfg, "log_peak_memory_stats", False),
        resume_from_checkpoint=config_bool(cfg, "resume_from_checkpoint", False),
        save_every_n_steps=_positive_int(cfg, "save_every_n_steps", None, allow_none=True),
        keep_last_n_checkpoints=_positive_int(cfg, "keep_last_n_checkpoints", 2),
        stop_after_steps=_positive_int(cfg, "stop_after_steps", None, allow_none=True),
        run_val_every_n_steps=_positive_int(cfg, "run_val_every_n_steps", None, allow_none=True),
        max_val_batches=_positive_int(cfg, "max_val_batches", None, allow_none=True),
    )
    if options.optimizer_in_bwd and options.gradient_accumulation_steps > 1:
        raise ValueError(
            f"optimizer_in_bwd steps the optimizer inside backward, so gradient_accumulation_steps must be 1, "
            f"got {options.gradient_accumulation_steps}"
        )
    if options.optimizer_in_bwd and options.clip_grad_norm is not None:
        raise ValueError(f"optimizer_in_bwd cannot clip gradients; set clip_grad_norm: null (got {options.clip_grad_norm})")
    if options.enable_activation_offloading and not options.enable_activation_checkpointing:
        raise ValueError("enable_activation_offloading needs enable_activation_checkpointing: True")
    if cfg.get("profiler", None) is not None and config_bool(cfg.profiler, "enabled", False, section="profiler"):
        raise ValueError("profiler.enabled is not supported by these recipes; remove the profiler section")
    return options


__all__ = [
    "DEFAULT_MAX_PASSES",
    "DEFAULT_MIN_MARKER_FRACTION",
    "INTERLEAVING_KEYS",
    "InterleavingOptions",
    "LoopOptions",
    "config_bool",
    "interleaving_options",
    "loop_options",
    "resolve_mode",
]
