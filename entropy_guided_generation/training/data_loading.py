"""A finetune's data: map-style datasets as right-padded batches per rank, the validation set (when
on), the first training examples in order (quantile edges, the marker check) and the batch keys the
loss step reads."""
from __future__ import annotations

from functools import partial
from typing import Any, Dict

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.datasets import ConcatDataset

from entropy_guided_generation.training.parallelism import Parallelism

DEFAULT_COLLATE = "entropy_guided_generation.data.padded_collate_with_response_mask"
BATCH_KEYS = ("tokens", "labels", "response_mask", "valid_mask")


def validation_dataset_config(cfg: DictConfig) -> Any:
    """``cfg.dataset_val``, or None when validation is off: the key absent or null, or a dataset
    whose ``_component_`` is null (what ``dataset_val=null`` on torchtune's command line makes of
    a YAML dataset: it sets ``dataset_val._component_``)."""
    section = cfg.get("dataset_val", None)
    if section is None or (isinstance(section, DictConfig) and section.get("_component_", None) is None):
        return None
    return section


def build_dataloader(
    cfg_dataset: Any,
    tokenizer: Any,
    *,
    parallel: Parallelism,
    batch_size: int,
    shuffle: bool,
    seed: int,
    collate_name: str,
    ignore_index: int,
) -> DataLoader:
    """Map-style dataset(s) -> right-padded batches of ``batch_size`` per rank (last partial batch dropped).

    Raises:
        ValueError: when the dataset gives no full batch on each rank.
    """
    if isinstance(cfg_dataset, ListConfig):
        dataset = ConcatDataset([config.instantiate(c, tokenizer) for c in cfg_dataset])
    else:
        dataset = config.instantiate(cfg_dataset, tokenizer)
    sampler = StatefulDistributedSampler(dataset, num_replicas=parallel.world_size, rank=parallel.rank, shuffle=shuffle, seed=seed)
    collate = _get_component_from_path(collate_name)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=partial(collate, padding_idx=tokenizer.pad_id, ignore_idx=ignore_index),
        drop_last=True,
    )
    if len(loader) == 0:
        raise ValueError(
            f"a dataset of {len(dataset)} examples gives no full batch of batch_size {batch_size} "
            f"on each of {parallel.world_size} rank(s)"
        )
    return loader


def first_examples(loader: DataLoader, num_examples: int, batch_size: int) -> DataLoader:
    """Batches of the first ``num_examples`` examples of ``loader``'s dataset, in order (the same on every rank)."""
    dataset = loader.dataset
    first = list(range(min(num_examples, len(dataset))))
    return DataLoader(torch.utils.data.Subset(dataset, first), batch_size=batch_size, collate_fn=loader.collate_fn)


def batch_to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """``batch`` moved to ``device`` (in place), after checking it holds :data:`BATCH_KEYS`.

    Raises:
        KeyError: naming the keys the collate function left out.
    """
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"the collate function must return {', '.join(BATCH_KEYS)}; missing {', '.join(missing)}")
    utils.batch_to_device(batch, device)
    return batch


__all__ = ["BATCH_KEYS", "DEFAULT_COLLATE", "batch_to_device", "build_dataloader", "first_examples", "validation_dataset_config"]
