"""Single device vs. distributed (FSDP2 under torchrun): the only place the two differ.

Both objects answer the same few questions: where a model is built and how its weights are
loaded (``materialize``), how per-rank numbers are summed (``all_reduce_sum``) or maximized (``all_reduce_max``), how a full state
dict is gathered for saving and scattered back on loading. (The fixed point keeps ranks'
collective forwards in step itself: ``modeling.forward_anywhere``.) The loss step, the loop, the logging and the
checkpoint format are written once, against this interface.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchtune import training, utils

from entropy_guided_generation.training.options import config_bool


class SingleDevice:
    """One process on one device (``device: cpu | cuda | ...``)."""

    distributed = False
    world_size = 1
    rank = 0
    is_rank_zero = True

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def init_context(self) -> Iterator[None]:
        """Where a model is instantiated: directly on the training device."""
        with self.device:
            yield

    def materialize(self, model: nn.Module, state_dict: Dict[str, Any]) -> nn.Module:
        """Load a full (torchtune-format) state dict into ``model``, strictly."""
        model.load_state_dict(state_dict)
        return model

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def full_model_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The model's full state dict on CPU (every rank gets it here; rank 0 only when sharded)."""
        return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: Any) -> Dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: Any, state: Dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def barrier(self) -> None:
        """Nothing to wait for."""

    def close(self) -> None:
        """Nothing to tear down."""


class FSDP2:
    """One process per device under torchrun; every model sharded with FSDP2 via
    ``torchtune.training.shard_model`` (each ``layers.i`` plus the root).

    On CPU the process group uses gloo. ``fsdp_cpu_offload`` is refused there: torchtune would ask
    for the backend ``cpu:gloo,cpu:gloo`` ("Duplicate device type cpu").

    Args:
        device_type: ``cfg.device`` (cpu, cuda, ...).
        cpu_offload: FSDP2 CPU offload of parameters, gradients and optimizer state.
        reshard_after_forward: free gathered parameters after each forward (FULL_SHARD).
        custom_sharded_layers: more module names to shard on their own (e.g. ``tok_embeddings``).
    """

    distributed = True

    def __init__(
        self,
        device_type: str,
        *,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        custom_sharded_layers: Optional[List[str]] = None,
    ):
        if cpu_offload and device_type == "cpu":
            raise ValueError("fsdp_cpu_offload: True is meaningless on device cpu (and breaks the gloo backend); set it to False")
        if not dist.is_initialized():
            dist.init_process_group(training.get_distributed_backend(device_type, offload_ops_to_cpu=cpu_offload))
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.device = utils.get_device(device=device_type)
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.custom_sharded_layers = list(custom_sharded_layers) if custom_sharded_layers else None

    @contextlib.contextmanager
    def init_context(self) -> Iterator[None]:
        """Models are instantiated on the meta device and materialized shard by shard."""
        with torch.device("meta"):
            yield

    def materialize(self, model: nn.Module, state_dict: Dict[str, Any]) -> nn.Module:
        """Shard ``model`` with FSDP2, initialise its RoPE buffers on the device and load a full
        state dict into the shards (strict)."""
        conditions = [partial(training.get_shard_conditions, names_to_match=self.custom_sharded_layers)]
        training.shard_model(
            model=model,
            shard_conditions=conditions,
            cpu_offload=self.cpu_offload,
            reshard_after_forward=self.reshard_after_forward,
        )
        with self.device:
            for module in model.modules():
                if hasattr(module, "rope_init"):
                    module.rope_init()
        training.load_from_full_model_state_dict(model, state_dict, self.device, strict=True, cpu_offload=self.cpu_offload)
        training.validate_no_params_on_meta_device(model)
        return model

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns ``tensor``."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks, in place; returns ``tensor``."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def full_model_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The full state dict on CPU, on rank 0 (empty elsewhere); a collective call."""
        return training.gather_cpu_state_dict(model, self.is_rank_zero, device=self.device)

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: Any) -> Dict[str, Any]:
        """The full optimizer state on rank 0 (empty elsewhere); a collective call."""
        return training.get_full_optimizer_state_dict(model, optimizer, self.is_rank_zero, device=self.device)

    def load_optimizer_state(self, model: nn.Module, optimizer: Any, state: Dict[str, Any]) -> None:
        training.load_from_full_optimizer_state_dict(model, optimizer, state, self.device)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


Parallelism = Any  # SingleDevice | FSDP2


def check_device_available(device: Optional[str]) -> None:
    """Raise unless ``device`` (``cfg.device``; None: picked by torchtune) exists on this machine.

    torchtune's ``get_device("cuda")`` on a machine without CUDA returns the CPU, so a run would
    silently train on the CPU.

    Raises:
        ValueError: naming the device, when torch does not know it or its backend is not available.
    """
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: {err}") from err
    if kind == "cpu":
        return
    backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise ValueError(f"device {device!r} is not available on this machine (torch.{kind}.is_available() is False); set device: cpu")


def parallelism_from_config(cfg: Any, distributed: bool) -> Parallelism:
    """``SingleDevice`` or ``FSDP2`` for ``cfg.device`` (and the ``fsdp_*`` keys when distributed).

    Raises:
        ValueError: on a device this machine lacks, a non-boolean flag, or a setting the recipe does not support.
    """
    if not distributed:
        for key in ("fsdp_cpu_offload", "tensor_parallel_dim"):
            if cfg.get(key, None) not in (None, False, 1):
                raise ValueError(f"{key}={cfg.get(key)!r} needs the distributed recipe")
        check_device_available(cfg.get("device", "cpu"))
        return SingleDevice(utils.get_device(device=cfg.get("device", "cpu")))
    if cfg.get("tensor_parallel_dim", 1) != 1:
        raise ValueError(f"tensor_parallel_dim={cfg.get('tensor_parallel_dim')!r} is not supported; these recipes shard with FSDP2 only")
    if config_bool(cfg, "enable_async_checkpointing", False):
        raise ValueError("enable_async_checkpointing is not supported; these recipes write their own step checkpoints")
    check_device_available(cfg.get("device", "cuda"))
    return FSDP2(
        cfg.get("device", "cuda"),
        cpu_offload=config_bool(cfg, "fsdp_cpu_offload", False),
        reshard_after_forward=config_bool(cfg, "fsdp_reshard_after_forward", True),
        custom_sharded_layers=cfg.get("custom_sharded_layers", None),
    )


__all__ = ["FSDP2", "Parallelism", "SingleDevice", "check_device_available", "parallelism_from_config"]
