"""The models a finetune starts from: the vocabulary grown for added confidence tokens, the
confidence tokens' starting embeddings, the trained model (compiled, checkpointed, sharded) and the
frozen reference model that may give the bins instead."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, modules, training, utils

from entropy_guided_generation.confidence import find_confidence_json, read_confidence_json
from entropy_guided_generation.training.codec_setup import codec_from_config
from entropy_guided_generation.training.embeddings import EMBEDDING_KEY, init_confidence_embeddings
from entropy_guided_generation.training.options import InterleavingOptions, LoopOptions
from entropy_guided_generation.training.parallelism import Parallelism
from entropy_guided_generation.vocabulary import (
    add_confidence_tokens,
    fit_model_vocabulary,
    grow_state_dict,
    rows_needed,
    state_dict_rows,
)

log = utils.get_logger("INFO")


def add_run_confidence_tokens(cfg: DictConfig, tokenizer: Any, base_state: Dict[str, Any]) -> int:
    """Add ``confidence.tokens: {add: ...}`` to ``tokenizer`` and grow ``base_state`` (in place) when
    the added ids lie beyond its rows; return the vocabulary rows every model of this run needs
    (0: the state names no vocabulary rows)."""
    added = add_confidence_tokens(cfg.get("confidence", None), tokenizer)
    base_rows = state_dict_rows(base_state)
    if base_rows is None:
        return 0
    rows = rows_needed(added, base_rows)
    if rows > base_rows:
        grow_state_dict(base_state, rows)
        utils.log_rank_zero(
            log,
            f"confidence tokens added to the vocabulary: ids {added[0]}..{added[-1]}; the model grows from {base_rows} to "
            f"{rows} rows (new rows: the mean of the trained ones)",
        )
    return rows


def checkpoint_confidence_ids(cfg: DictConfig) -> Optional[List[int]]:
    """The confidence token ids the starting checkpoint was finetuned with (its ``confidence.json``), if any."""
    folder = cfg.checkpointer.get("checkpoint_dir", None)
    found = find_confidence_json(folder) if folder else None
    return read_confidence_json(found).token_ids if found is not None else None


def init_starting_embeddings(
    cfg: DictConfig, interleaving: InterleavingOptions, tokenizer: Any, state_dict: Dict[str, Any]
) -> None:
    """Set the confidence tokens' embedding rows of the starting weights ``state_dict`` (in place) as
    ``interleaving.init_confidence_embeddings`` says (fresh runs only; see ``InterleavingOptions``)."""
    scheme = interleaving.init_confidence_embeddings
    section = cfg.get("confidence", None)
    if scheme == "keep" or (scheme is None and (section is None or not interleaving.interleaved)):
        return
    if section is None:
        raise ValueError("interleaving.init_confidence_embeddings needs a confidence section naming the tokens")
    vocab_size = int(state_dict[EMBEDDING_KEY].shape[0]) if EMBEDDING_KEY in state_dict else None
    token_ids = codec_from_config(section, tokenizer, vocab_size).token_ids
    if scheme is None:
        finetuned_with = checkpoint_confidence_ids(cfg)
        if finetuned_with == token_ids.tolist():
            utils.log_rank_zero(log, "confidence token embeddings kept: the checkpoint was finetuned with these tokens")
            return
        scheme = "mean"
    init_confidence_embeddings(state_dict, token_ids, scheme)
    utils.log_rank_zero(
        log, f"confidence token embeddings ({token_ids.numel()} rows) initialized by {scheme!r}"
        + ("" if interleaving.init_confidence_embeddings else " (the default for tokens new to the checkpoint; "
           "interleaving.init_confidence_embeddings: keep keeps its rows)"),
    )


def build_model(
    cfg_model: DictConfig,
    state_dict: Dict[str, Any],
    *,
    vocab_rows: int,
    dtype: torch.dtype,
    parallel: Parallelism,
    loop: LoopOptions,
    trainable: bool,
) -> nn.Module:
    """Instantiate (vocabulary rows grown to ``vocab_rows``, what the run's confidence tokens need),
    compile, wrap activation checkpointing, then shard/load ``state_dict`` through ``parallel``; a
    model that is not ``trainable`` comes back frozen, in eval mode."""
    device = parallel.device
    rows = max(vocab_rows, state_dict_rows(state_dict) or 0)
    if rows:
        grow_state_dict(state_dict, rows)
    with training.set_default_dtype(dtype), parallel.init_context():
        model = config.instantiate(cfg_model)
        if rows:
            fit_model_vocabulary(model, rows)
    if loop.compile:
        training.compile_model(model, verbose=parallel.is_rank_zero)
    if trainable and loop.enable_activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    model = parallel.materialize(model, state_dict)
    training.validate_expected_param_dtype(model.named_parameters(), dtype=dtype)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    if parallel.is_rank_zero and device.type != "cpu":
        training.log_memory_stats(training.get_memory_stats(device=device))
    return model


def reference_state(cfg: DictConfig, reference: Any, output_dir: Path) -> Dict[str, Any]:
    """The weights of the frozen model whose entropies give the bins (``interleaving.reference_checkpoint``).

    A string is a checkpoint folder read by the same checkpointer class as ``checkpointer``
    (its ``*.safetensors`` files, else the same file names); a mapping is a full checkpointer
    config.
    """
    if isinstance(reference, str):
        folder = Path(reference)
        files = sorted(p.name for p in folder.glob("*.safetensors")) or list(cfg.checkpointer.checkpoint_files)
        ref_cfg = OmegaConf.merge(cfg.checkpointer, {"checkpoint_dir": str(folder), "checkpoint_files": files})
    else:
        ref_cfg = OmegaConf.create(reference)
    ref_cfg = OmegaConf.merge(ref_cfg, {"output_dir": str(output_dir / "reference_checkpointer")})
    state = config.instantiate(ref_cfg, should_load_recipe_state=False).load_checkpoint()[training.MODEL_KEY]
    utils.log_rank_zero(log, f"Bins come from the frozen reference model in {ref_cfg.checkpoint_dir}.")
    return state


__all__ = ["add_run_confidence_tokens", "build_model", "checkpoint_confidence_ids", "init_starting_embeddings", "reference_state"]
