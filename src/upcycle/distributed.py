"""Process-group setup and data parallelism applied from outside the model (the model is written for one device).

Launch with torchrun; a plain `python` run is a world of one and skips every collective:

    torchrun --nproc_per_node=2 -m upcycle train --config configs/tiny-moe.yaml --out runs/tiny

Backends: gloo on CPU (each rank then runs with OMP_NUM_THREADS=1, which torchrun sets), nccl when CUDA is present.
FSDP2 (`fully_shard`) wraps every transformer block, then the root, so parameters are gathered one block at a time and
the root group (embeddings, final norm, LM head) last; DDP is the simpler alternative for models that fit on a rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("fsdp", "ddp")
PRECISIONS = ("fp32", "bf16")  # what parallelize accepts; "auto" is resolved before (upcycle.hardware)


@dataclass(frozen=True)
class World:
    """Where this process sits: rank among world_size processes, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

    Without those variables, or with WORLD_SIZE=1, no process group is created: single-process runs need none, and
    creating one would require a free port for nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks in place (identity for a world of one); returns the tensor for chaining."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def parallelize(model: nn.Module, blocks: Iterable[nn.Module], *, mode: str, world: World,
                precision: str = "fp32", experts=None) -> nn.Module:
    """Apply data parallelism to `model` and return the module to train (the same object for FSDP2, a wrapper for DDP).

    `blocks` are the transformer blocks (`model.layers`): FSDP2 shards each one as its own group so only one block's
    full parameters exist at a time, then shards the root for the remaining parameters. A world of one returns the model
    untouched, so single-process runs take exactly the code path a user would write by hand.

    precision "bf16" with FSDP2: every group (each block and the root) gets a mixed-precision policy: parameters are
    all-gathered and computed in bf16, gradients are reduce-scattered in fp32 and the sharded master weights (and so
    the optimizer state) stay fp32. "fp32" shards and computes in fp32. DDP and a world of one ignore `precision`:
    there the trainer's bf16 autocast does the casting. Activation checkpointing and torch.compile, applied per block
    before this call (checkpoint_wrapper, then `block.compile()`), compose with either policy.

    `experts` (an expert_parallel.ExpertParallel, FSDP2 only): the MoE layers' routers and local experts become FSDP2
    units of their own first, on their own meshes, or the experts are left out (expert_parallel.fully_shard_experts).
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, not {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if not world.distributed:
        return model
    if experts is not None and mode != "fsdp":
        raise ValueError("expert parallelism runs under fsdp only")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    ignored = None
    if experts is not None:
        from upcycle.expert_parallel import fully_shard_experts

        ignored = fully_shard_experts(experts, policy) or None
    for block in blocks:
        fully_shard(block, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mp_policy=policy, ignored_params=ignored)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulation window.

    Gradients are then reduced once per optimizer step instead of once per micro-batch; the result is the same sum.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        if enabled:
            yield
        else:
            with model.no_sync():
                yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
    yield
