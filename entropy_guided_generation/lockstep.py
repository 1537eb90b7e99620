"""FSDP2 lockstep: forwards that every rank of a sharded model must run alike.

An FSDP2-sharded module all-gathers its parameters in each forward (a collective), so every rank
must call it equally often, at widths that make its chunked output project the same number of
chunks. The fixed point's data-dependent passes and the loss step keep to that with these helpers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_fsdp_sharded(model: Any) -> bool:
    """True for a module sharded by FSDP2 (``fully_shard``): only its own ``forward`` gathers the
    parameters, so its submodules must not be called one by one."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(model, FSDPModule)


def forwards_in_lockstep(model: Any) -> bool:
    """True when every rank of the default process group must run the same number of forwards of
    ``model``: it is FSDP2-sharded, so each forward all-gathers its parameters (a collective)."""
    return is_fsdp_sharded(model) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lockstep_width(model: Any, width: int) -> int:
    """The sequence width a forward over ``width`` columns must run at so that, under
    :func:`forwards_in_lockstep`, every rank calls each sharded module equally often.

    torchtune's chunked output (``num_output_chunks`` n > 0) projects ``hidden.chunk(n)``: fewer
    than n chunks for some widths (10 columns make 5), so two ranks with other widths would call
    a separately sharded ``output`` (``custom_sharded_layers``) a different number of times and
    hang in its all-gathers. A multiple of n always makes exactly n chunks."""
    chunks = int(getattr(model, "num_output_chunks", 0) or 0)
    if chunks <= 1 or not forwards_in_lockstep(model):
        return width
    return max(1, -(-width // chunks)) * chunks


def pad_columns(tensor: torch.Tensor, width: int, value: Any = None) -> torch.Tensor:
    """``tensor`` ``[b, s, ...]`` right-padded to ``width`` columns with ``value`` (default: a copy
    of its last column)."""
    extra = width - tensor.shape[1]
    if extra <= 0:
        return tensor
    if value is None:
        fill = tensor[:, -1:].expand(-1, extra, *tensor.shape[2:])
    else:
        fill = torch.full((tensor.shape[0], extra, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, fill], dim=1)


def wanted_anywhere(model: Any, wanted: bool, device: torch.device) -> bool:
    """Whether some rank wants a forward this round: ``wanted`` (this rank's wish) itself, or under
    :func:`forwards_in_lockstep` a collective MAX of it over ranks. Every rank must call it once per
    round, in the same order."""
    if not forwards_in_lockstep(model):
        return wanted
    flag = torch.tensor([int(wanted)], dtype=torch.long, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


__all__ = ["forwards_in_lockstep", "is_fsdp_sharded", "lockstep_width", "pad_columns", "wanted_anywhere"]
