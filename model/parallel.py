"""Scaling the transformer trainer: torch.compile per block, DDP or FSDP2 per trained component,
gradient-sync control for accumulation, and full state dicts for checkpoints.

One code path for both data-parallel modes (and a single process, where nothing is wrapped):
- `compile_blocks` replaces each transformer block by `torch.compile(block)` (torchtitan's
  per-block compile: one graph, reused by every layer of a stack);
- `parallelize` wraps a component in DDP, or shards it with FSDP2: `fully_shard` on every block,
  then on the component (its embeddings, heads and norms), bf16 parameters in compute and float32
  gradient reduction;
- checkpoints hold full, unsharded state dicts (`torch.distributed.checkpoint.state_dict` with
  full_state_dict and cpu_offload: gathered to rank 0's CPU) so a run resumes with any number
  of GPUs, in either mode, and the file is the same as a single-process one.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import Callable, Iterable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .training import all_reduce_mean


T = TypeVar("T")


def long_barrier() -> None:
    """Wait for every rank however long the slowest takes (a gloo group with a day's timeout: the
    default NCCL timeout would kill a long download or encoding). No-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        dist.barrier(group=group)
        dist.destroy_process_group(group)


def rank0_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the other ranks: what rank 0 downloads, the others find in place."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        long_barrier()
        return fn()
    try:
        return fn()
    finally:  # on an error too: the other ranks then meet it themselves
        long_barrier()


def blocks_of(component: nn.Module) -> Optional[nn.ModuleList]:
    """The transformer blocks of a component (LM, resynthesizer), or None (quantizer)."""
    if hasattr(component, "layers"):
        return component.layers
    if hasattr(component, "stack"):
        return component.stack.layers
    return None


def compile_blocks(component: nn.Module) -> None:
    """Replace every block by its compiled version (parameter names gain `_orig_mod.`, which the
    state-dict functions below remove)."""
    # All blocks of both stacks share one code object, and dynamo keeps a bounded number of graphs
    # per code object: (training, evaluation) x (LM, resynthesizer lower half, upper half at 2x batch).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    blocks = blocks_of(component)
    for i, block in enumerate(blocks if blocks is not None else []):
        blocks[i] = torch.compile(block)


def parallelize(component: nn.Module, mode: str, device: torch.device, world_size: int,
                dtype: torch.dtype = torch.float32, mesh=None) -> nn.Module:
    """What the training step calls for `component`: itself (one process), DDP(component), or
    the component sharded in place with FSDP2 (`mode="fsdp"`; `mesh` a 1-D device mesh)."""
    if world_size <= 1:
        return component
    if mode == "ddp":
        return DDP(component, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
        for block in blocks_of(component) or []:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(component, mesh=mesh, mp_policy=mp)
        return component
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {mode!r}")


def inner(module: nn.Module) -> nn.Module:
    """The component inside a DDP wrapper (FSDP2 shards in place: the same module)."""
    return module.module if isinstance(module, DDP) else module


@contextmanager
def gradient_sync(modules: Iterable[nn.Module], enabled: bool):
    """Reduce gradients across ranks in this backward (`enabled`) or only accumulate them
    (earlier micro-batches of a gradient-accumulation step)."""
    from torch.distributed.fsdp import FSDPModule
    with ExitStack() as stack:
        for m in modules:
            if isinstance(m, DDP) and not enabled:
                stack.enter_context(m.no_sync())
            elif isinstance(m, FSDPModule):
                m.set_requires_gradient_sync(enabled)
        yield


def broadcast_parameters(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module), for a
    module whose gradients are averaged by `average_gradients`; nothing in one process."""
    if dist.is_initialized():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(module: nn.Module) -> None:
    """Average `module`'s gradients over the ranks (one flat `all_reduce_mean`); nothing in one
    process. For a module trained outside DDP: every rank must have run a backward into each parameter."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def full_state_dicts(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
    """(model state, optimizer state), unsharded, on the CPU, keyed by the model's own parameter
    names. A collective under FSDP: every rank calls it; rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def load_full_state_dicts(model: nn.Module, model_state: dict, optimizer: Optional[torch.optim.Optimizer] = None,
                          optim_state: Optional[dict] = None) -> None:
    """Load full state dicts (as `full_state_dicts` returns them) into a possibly sharded model
    and its optimizer; every rank passes the full dicts (memory-mapped: pages are shared)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
