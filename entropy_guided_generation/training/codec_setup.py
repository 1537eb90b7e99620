"""The recipe's confidence codec: built from the ``confidence`` section, with ``quantile`` edges
fitted on the training data's signals before training when the config gives none.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from omegaconf import DictConfig, OmegaConf

from entropy_guided_generation.confidence import ConfidenceCodec, fit_quantile_edges
from entropy_guided_generation.fixed_point import compute_bins

DEFAULT_FIT_SAMPLES = 256


def needs_quantile_fit(confidence_cfg: Mapping[str, Any]) -> bool:
    """True when ``edges.scheme`` is ``quantile`` and no fitted ``values`` are given."""
    edges = confidence_cfg.get("edges", None) or {}
    return edges.get("scheme", None) == "quantile" and edges.get("values", None) is None


def codec_from_config(confidence_cfg: Mapping[str, Any], tokenizer: Any, vocab_size: int) -> ConfidenceCodec:
    """``ConfidenceCodec.from_config``; a quantile scheme still to be fitted gets placeholder
    uniform edges (replaced by :func:`fit_quantile_codec` before any bin is computed)."""
    cfg = OmegaConf.to_container(confidence_cfg, resolve=True) if isinstance(confidence_cfg, DictConfig) else copy.deepcopy(dict(confidence_cfg))
    if needs_quantile_fit(cfg):
        cfg["edges"] = {"scheme": "uniform", "max": 1.0}
    elif isinstance(cfg.get("edges"), dict):
        cfg["edges"].pop("fit_samples", None)
    return ConfidenceCodec.from_config(cfg, tokenizer, vocab_size=vocab_size)


def fit_samples(confidence_cfg: Mapping[str, Any]) -> int:
    """``confidence.edges.fit_samples``: training examples whose signals fit quantile edges."""
    value = (confidence_cfg.get("edges", None) or {}).get("fit_samples", DEFAULT_FIT_SAMPLES)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"confidence.edges.fit_samples must be an int >= 1, got {value!r}")
    return value


@torch.no_grad()
def fit_quantile_codec(
    codec: ConfidenceCodec,
    bin_model: nn.Module,
    batches: Iterable[dict],
    slots_of: Callable[[dict], torch.Tensor],
    pad_id: int,
) -> ConfidenceCodec:
    """Fit quantile edges on plain-context signals (fixed-point pass 0) at the slots of ``batches``.

    Every rank must pass the same batches (the first examples of the dataset, in order), so every
    rank fits the same edges and makes the same collective forwards.

    Returns:
        ``codec`` with the fitted edges and edge scheme ``quantile``.
    """
    values = []
    for batch in batches:
        slots = slots_of(batch)
        result = compute_bins(
            bin_model, batch["tokens"], codec=codec, slots=slots, valid_mask=batch["valid_mask"], pad_id=pad_id, max_passes=1
        )
        values.append(result.signal[slots].cpu())
    if not values:
        raise ValueError("no training batch to fit quantile edges on")
    return codec.with_edges(fit_quantile_edges(torch.cat(values), codec.num_bins), "quantile")


__all__ = ["DEFAULT_FIT_SAMPLES", "codec_from_config", "fit_quantile_codec", "fit_samples", "needs_quantile_fit"]
