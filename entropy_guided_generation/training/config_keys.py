"""The top-level keys a finetune config may hold: what the recipe core reads (torchtune's names for
torchtune's settings, plus ours). Any other key is refused, so a typo never trains silently with a
default; a component from an optional package that is not installed is refused before any work."""
from __future__ import annotations

import difflib
import importlib.util
from typing import Any

from omegaconf import DictConfig

FINETUNE_KEYS = (
    # what to train: torchtune components
    "model", "tokenizer", "checkpointer", "dataset", "dataset_val", "collate_fn", "optimizer", "lr_scheduler",
    "loss", "metric_logger", "profiler",
    # ours: interleaving and the confidence codec
    "interleaving", "confidence",
    # the loop (torchtune's names and meanings)
    "epochs", "batch_size", "gradient_accumulation_steps", "max_steps_per_epoch", "clip_grad_norm",
    "optimizer_in_bwd", "compile", "enable_activation_checkpointing", "enable_activation_offloading", "shuffle",
    "seed", "cudnn_deterministic_mode", "device", "dtype", "log_every_n_steps", "log_peak_memory_stats",
    "run_val_every_n_steps", "max_val_batches",
    # distributed (FSDP2)
    "fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers", "tensor_parallel_dim",
    "enable_async_checkpointing",
    # checkpoints, resume and the output folder
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "resume_config_hash", "save_every_n_steps",
    "keep_last_n_checkpoints", "stop_after_steps",
    # a data folder the dataset paths interpolate (`data_files: ${data_dir}/train.jsonl`), set on the command line
    "data_dir",
)


def check_finetune_keys(cfg: DictConfig) -> None:
    """Raise on a top-level key the finetune recipe does not read.

    Raises:
        ValueError: naming each unknown key (with the closest known key, when one is close).
    """
    unknown = sorted(set(cfg.keys()) - set(FINETUNE_KEYS))
    if not unknown:
        return
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, FINETUNE_KEYS, n=1)
        named.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise ValueError(f"unknown finetune config keys {', '.join(named)}; expected some of {', '.join(sorted(FINETUNE_KEYS))}")


# Packages a config may name that the project installs only as an extra: top-level module -> extra.
OPTIONAL_EXTRAS = {"bitsandbytes": "bnb"}


def check_optional_component(cfg_component: Any, key: str) -> None:
    """Raise when ``cfg_component._component_`` lives in an optional package that is not installed.

    Raises:
        ModuleNotFoundError: naming the component, the extra that installs it and an alternative
            (``optimizer._component_ 'bitsandbytes.optim.PagedAdamW8bit' needs bitsandbytes ...``).
    """
    component = str(cfg_component.get("_component_", ""))
    package = component.split(".", 1)[0]
    if package in OPTIONAL_EXTRAS and importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"{key}._component_ {component!r} needs {package}, which is not installed: "
            f"pip install 'entropy_guided_generation[{OPTIONAL_EXTRAS[package]}]' (or pip install {package}), "
            f"or override it, e.g. {key}._component_=torch.optim.AdamW"
        )


__all__ = ["FINETUNE_KEYS", "OPTIONAL_EXTRAS", "check_finetune_keys", "check_optional_component"]
