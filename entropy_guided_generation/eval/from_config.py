"""An lm-eval model from an eval recipe config: the config's ``interleaving`` and ``confidence``
sections reconciled with the checkpoint's ``confidence.json``, tokenizer, codec and weights loaded,
and a :class:`~entropy_guided_generation.eval.lm.TorchtuneLM` built.

Two users: the eval recipe (:mod:`entropy_guided_generation.eleuther_eval`) and lm-eval's CLI
(``--model egg_torchtune --model_args config=<eval recipe YAML>[,key=value...]``, through
:class:`TorchtuneLMFromConfig`, registered in :mod:`entropy_guided_generation.lm_eval`).
"""
from __future__ import annotations

import argparse
import contextlib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from lm_eval.utils import simple_parse_args_string
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from entropy_guided_generation.confidence import (
    ConfidenceCodec,
    ConfidenceMetadata,
    check_config_matches,
    find_confidence_json,
    read_confidence_json,
)
from entropy_guided_generation.eval.distributed import join_process_group
from entropy_guided_generation.eval.lm import MODEL_NAME, TorchtuneLM
from entropy_guided_generation.interleaving_config import SHARED_KEYS, InterleavingConfig, check_section_keys
from entropy_guided_generation.modes import NONE, Mode, mode_named
from entropy_guided_generation.positions import check_position_rule
from entropy_guided_generation.modeling import vocab_size_of
from entropy_guided_generation.training.kit_paths import resolve_kit_references
from entropy_guided_generation.vocabulary import fit_model_vocabulary, state_dict_rows

RECIPE_KEYS = (
    "output_dir", "model", "checkpointer", "tokenizer", "interleaving", "confidence", "tasks", "include_path",
    "limit", "num_fewshot", "batch_size", "max_seq_length", "max_gen_toks", "gen_kwargs", "enable_kv_cache",
    "device", "dtype", "seed", "bootstrap_iters", "log_level", "sampler", "data_dir",
)
INTERLEAVING_KEYS = SHARED_KEYS
DEFAULT_SEED = 1234  # lm-eval's and torchtune's eval default


def plain_container(node: Any) -> Any:
    """A config node as plain Python (dicts, lists, resolved); any other value unchanged."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def check_recipe_keys(cfg: DictConfig) -> None:
    """Raise on a top-level key this recipe does not read (a typo would otherwise be ignored)."""
    unknown = sorted(set(cfg.keys()) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"unknown eval config keys {unknown}; expected some of {', '.join(RECIPE_KEYS)}")


def config_int(cfg: DictConfig, key: str, default: Optional[int], *, minimum: int = 1) -> Optional[int]:
    """``cfg[key]`` as an int >= ``minimum`` (``default`` when absent; null stays None when the
    default is None). A digit string (``batch_size=3`` from model_args or lm-eval's CLI) counts.

    Raises:
        ValueError: naming the key, the value and what was expected (``batch_size=auto`` included).
    """
    value = cfg.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"eval config {key} must be an int >= {minimum}, got {value!r}")
    return value


def check_limit(value: Any) -> Optional[float]:
    """The eval config's ``limit`` as lm-eval reads it: null (every example), an int >= 1 (examples
    per task) or a float in (0, 1) (a fraction of each task); a numeric string counts.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: refused below, named as given
            value = float(value) if any(c in value for c in ".eE") else int(value)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, float) and 0.0 < value < 1.0
    )
    if not ok:
        raise ValueError(
            f"eval config limit must be null, an int >= 1 (examples per task) or a float in (0, 1) (a fraction "
            f"of each task), got {value!r}"
        )
    return value


def checkpoint_metadata(cfg: DictConfig) -> tuple[Optional[ConfidenceMetadata], Optional[Path]]:
    """``confidence.json`` beside the checkpoint (in ``checkpointer.checkpoint_dir`` or its parent), if any."""
    path = find_confidence_json(cfg.checkpointer.checkpoint_dir)
    return (read_confidence_json(path), path) if path is not None else (None, None)


def eval_interleaving(cfg: DictConfig, metadata: Optional[ConfidenceMetadata], source: str = "confidence.json") -> InterleavingConfig:
    """Read ``cfg.interleaving`` and check it against the checkpoint's metadata.

    Raises:
        ValueError: on an unknown key or mode, or a mode/marker that contradicts ``confidence.json``
            (``config interleaving.mode is 'full' but <path> says 'answer'``).
    """
    section = plain_container(cfg.get("interleaving", None)) or {}
    check_section_keys(section, INTERLEAVING_KEYS)
    mode, marker, positions = section.get("mode"), section.get("marker"), section.get("positions")
    if mode is not None:
        mode_named(mode)
    if positions is not None:
        check_position_rule(positions)
    if metadata is not None:
        check_config_matches(metadata, mode=mode, marker=marker, positions=positions, source=source)
        mode = mode if mode is not None else metadata.mode
        marker = marker if marker is not None else metadata.marker
        positions = positions if positions is not None else metadata.positions
    return InterleavingConfig.checked(
        mode if mode is not None else NONE.name, marker=marker, positions=positions, max_passes=section.get("max_passes")
    )


def eval_codec(
    cfg: DictConfig, metadata: Optional[ConfidenceMetadata], tokenizer: Any, mode: Mode, source: str = "confidence.json"
) -> Optional[ConfidenceCodec]:
    """The codec: confidence.json's (a ``confidence`` section, if given, must agree with it), else the
    config's ``confidence`` section; None in a plain mode.

    Raises:
        ValueError: on a contradicting section, or an interleaved mode with no codec anywhere.
    """
    if mode.is_plain:
        return None
    section = cfg.get("confidence", None)
    configured = ConfidenceCodec.from_config(section, tokenizer) if section is not None else None
    if metadata is not None:
        if configured is not None:
            check_config_matches(metadata, codec=configured, source=source)
        return metadata.to_codec()
    if configured is None:
        raise ValueError(
            f"interleaving.mode {mode.name!r} needs a confidence codec: no confidence.json beside checkpoint "
            f"{cfg.checkpointer.checkpoint_dir} and no `confidence` section in the config"
        )
    return configured


def load_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``cfg.model`` with the weights of ``cfg.checkpointer`` loaded (strict), in eval mode.

    A small function the finetune recipes can share: instantiate the checkpointer, build the model
    under the target dtype and device, load the state dict.
    """
    checkpointer = config.instantiate(cfg.checkpointer)
    state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    rows = state_dict_rows(state_dict)
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
        if rows is not None:
            fit_model_vocabulary(model, rows)  # a finetune that added confidence tokens has more rows
    model.load_state_dict(state_dict)
    return model.eval()


def resolve_kit_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``kit:`` references replaced by the paths the offline kit builds."""
    return resolve_kit_references(cfg)


def build_lm(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """The lm-eval model a (kit-resolved) eval config describes, and its interleaving.

    Order: confidence.json and the config are reconciled, then the tokenizer and codec are built,
    and only then the model is loaded, so a contradicting config fails before any model work.
    """
    metadata, source = checkpoint_metadata(cfg)
    interleaving = eval_interleaving(cfg, metadata, str(source))
    sampler = plain_container(cfg.get("sampler", None))
    if sampler and not interleaving.mode.is_plain:
        raise ValueError(f"sampler {sampler!r} selects a decoder for mode none; interleaving.mode is {interleaving.name!r}")
    tokenizer = config.instantiate(cfg.tokenizer)
    codec = eval_codec(cfg, metadata, tokenizer, interleaving.mode, str(source))
    model = load_model(cfg, device, dtype)
    if codec is not None:
        codec.check_vocab(vocab_size_of(model))
    lm = TorchtuneLM(
        model,
        tokenizer,
        mode=interleaving.mode,
        codec=codec,
        marker=interleaving.marker,
        positions=interleaving.positions,
        sampler=sampler,
        batch_size=config_int(cfg, "batch_size", 8),
        max_seq_length=config_int(cfg, "max_seq_length", 4096),
        max_gen_toks=config_int(cfg, "max_gen_toks", 256),
        enable_kv_cache=bool(cfg.get("enable_kv_cache", True)),
        max_passes=interleaving.max_passes,
        seed=int(cfg.get("seed", None) or DEFAULT_SEED),
    )
    return lm, interleaving, metadata


def load_yaml(path: str | Path) -> DictConfig:
    """An eval config file as a ``DictConfig`` (torchtune 0.6.1 has no ``config.load_yaml``)."""
    return OmegaConf.load(path)


def lm_from_config_file(path: str, overrides: Optional[Mapping[str, Any]] = None):
    """The lm-eval model of an eval recipe YAML (``--model egg_torchtune --model_args config=...``);
    ``overrides`` are top-level keys (e.g. ``batch_size``) that replace the file's. Under torchrun it
    joins the process group first, so the model serves its rank's share of the requests."""
    cfg = OmegaConf.merge(load_yaml(path), dict(overrides or {}))
    check_recipe_keys(cfg)
    cfg = resolve_kit_paths(cfg)
    device = utils.get_device(device=cfg.get("device", "cpu"))
    join_process_group(device)
    lm, _, _ = build_lm(cfg, device, training.get_dtype(dtype=cfg.get("dtype", "fp32"), device=device))
    return lm


# lm-eval's run settings that reach a model as ``additional_config`` and name eval config keys.
LM_EVAL_SETTINGS = ("batch_size", "device")
# Which of them lm-eval's command line set explicitly, while its CLI runs (None: not under the CLI).
_CLI_EXPLICIT: ContextVar[Optional[frozenset]] = ContextVar("egg_lm_eval_cli_explicit", default=None)


@contextlib.contextmanager
def lm_eval_cli_settings(args: argparse.Namespace) -> Iterator[frozenset]:
    """While lm-eval's CLI runs ``args`` (its parsed command line), remember which of ``--device`` and
    ``--batch_size`` the user set: on the command line, or in lm-eval's own ``--config`` file.

    lm-eval's CLI fills the others with its defaults (``cuda:0``, 1) before any model sees them, so a
    model cannot tell them apart from a user's choice; :func:`lm_from_model_args` asks here.
    """
    explicit = {key for key in LM_EVAL_SETTINGS if getattr(args, key, None) is not None}
    config_file = getattr(args, "config", None)
    if config_file:
        settings = OmegaConf.to_container(OmegaConf.load(config_file)) or {}
        explicit |= {key for key in LM_EVAL_SETTINGS if isinstance(settings, dict) and settings.get(key) is not None}
    token = _CLI_EXPLICIT.set(frozenset(explicit))
    try:
        yield _CLI_EXPLICIT.get()
    finally:
        _CLI_EXPLICIT.reset(token)


def explicit_lm_eval_settings(additional_config: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The entries of lm-eval's ``additional_config`` a user set (``batch_size``, ``device``).

    Under lm-eval's CLI (:func:`lm_eval_cli_settings`): those given on its command line or in its
    ``--config`` file, never the defaults it fills in. From Python (``simple_evaluate(device=...,
    batch_size=...)``, whose defaults are None): those that are not None.
    """
    explicit = _CLI_EXPLICIT.get()
    return {
        key: value
        for key, value in (additional_config or {}).items()
        if key in LM_EVAL_SETTINGS and value is not None and (explicit is None or key in explicit)
    }


def lm_from_model_args(arg_dict: Mapping[str, Any], additional_config: Optional[Mapping[str, Any]] = None) -> TorchtuneLM:
    """``--model egg_torchtune --model_args config=<eval yaml>[,key=value...]``: the model,
    tokenizer and interleaving of an eval recipe config.

    The YAML decides every setting, ``device``, ``batch_size`` and ``dtype`` included. ``model_args``
    keys override it, and so do lm-eval's ``--device`` / ``--batch_size`` when the user set them
    (:func:`explicit_lm_eval_settings`): lm-eval's defaults (``cuda:0``, batch 1) never replace the
    YAML's (under torchrun that default would also put every rank on GPU 0; with ``device: cuda``
    each rank takes its local GPU). ``--max_batch_size`` is not used.
    """
    args = dict(arg_dict)
    extra = explicit_lm_eval_settings(additional_config)
    if "config" not in args:
        raise ValueError(f"--model {MODEL_NAME} needs model_args config=<eval recipe YAML>, got {sorted(args)}")
    return lm_from_config_file(args.pop("config"), {**args, **extra})


class TorchtuneLMFromConfig(TorchtuneLM):
    """What lm-eval's ``--model egg_torchtune`` names: lm-eval builds models through these two
    class methods, which return the :class:`TorchtuneLM` an eval recipe config describes."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> TorchtuneLM:
        return lm_from_model_args(arg_dict, additional_config)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> TorchtuneLM:
        return lm_from_model_args(simple_parse_args_string(arg_string), additional_config)


__all__ = [
    "DEFAULT_SEED",
    "INTERLEAVING_KEYS",
    "LM_EVAL_SETTINGS",
    "RECIPE_KEYS",
    "TorchtuneLMFromConfig",
    "build_lm",
    "check_limit",
    "check_recipe_keys",
    "checkpoint_metadata",
    "config_int",
    "eval_codec",
    "eval_interleaving",
    "explicit_lm_eval_settings",
    "lm_eval_cli_settings",
    "lm_from_config_file",
    "lm_from_model_args",
    "load_model",
    "load_yaml",
    "plain_container",
    "resolve_kit_paths",
]
