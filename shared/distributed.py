"""torch.distributed under torchrun: process group set-up, model wrapping, reductions.

Launch with torchrun, never a home-made launcher:

    torchrun --nproc_per_node 2 --no-python polymae pretrain CONFIG [overrides]
    torchrun --nnodes 2 --node_rank R --rdzv-endpoint HOST:29500 --nproc_per_node 8 --no-python polymae pretrain ...

The backend follows the device: nccl on CUDA, gloo on CPU. Only rank 0
writes checkpoints, pictures and logs; metrics are averaged across ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistributedContext:
    """Join the process group torchrun describes in the environment (a no-op without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size == 1:
        return DistributedContext(device=target)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, target)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, context: DistributedContext, strategy: str) -> nn.Module:
    """DDP (replicated parameters) or FSDP (sharded parameters) around a model on its device."""
    if not context.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in [*getattr(model, "blocks", []), *getattr(model, "decoder_blocks", [])]:
            fully_shard(block)
        return fully_shard(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum, mean, min or max across ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    values = values.clone()
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                 "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(values, op=reduce_op)
    return values / dist.get_world_size() if op == "mean" else values


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
