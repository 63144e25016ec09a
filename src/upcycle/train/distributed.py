"""Process-group setup and data parallelism applied from outside the model (the model is written for one device).

Launch with torchrun; a plain `python` run is a world of one and skips every collective:

    torchrun --nproc_per_node=2 -m upcycle train --config configs/tiny-moe.yaml --out runs/tiny

Backends: gloo on CPU (each rank then runs with OMP_NUM_THREADS=1, which torchrun sets), nccl when CUDA is present.
FSDP2 (`fully_shard`) wraps every transformer block, then the root, so parameters are gathered one block at a time and
the root group (embeddings, final norm, LM head) last; DDP is the simpler alternative for models that fit on a rank.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard

from upcycle.train import expert_parallel
from upcycle.errors import UpcycleError
from upcycle.hardware import die_with_parent
from upcycle.model.moe import MoE
from upcycle.train.config import PARALLEL_MODES
PRECISIONS = ("fp32", "bf16")  # what parallelize accepts; "auto" is resolved before (upcycle.hardware)


@dataclass(frozen=True)
class World:
    """Where this process sits: rank among world_size processes, and the device it computes on.

    `host_group` is a gloo group over all ranks for host-side coordination (barriers around one rank's work, broadcast
    of Python objects, checkpoint collectives on CPU tensors), with its own, longer timeout: waiting for rank 0 to
    tokenize data or for a large checkpoint to reach the disk is not a lost rank. None in a world of one, and where
    the caller built the World by hand: host collectives then fall back to the default group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    host_group: Any = field(default=None, compare=False, repr=False)
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)
    host_timeout_s: float | None = None  # the host group's timeout (None: torch's default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def process_group_backend(device_type: str) -> str:
    """The backend string of the default process group: on CUDA a CPU backend (gloo) beside NCCL, so a collective on a
    CPU tensor is served instead of failing with "No backend type associated with device type cpu"; gloo alone on
    CPU."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU this rank computes on: its LOCAL_RANK among the visible GPUs, or the only visible one (SLURM and other
    launchers that give each task one GPU through CUDA_VISIBLE_DEVICES). Refused where neither fits."""
    if device_count == 1:
        return 0
    if 0 <= local_rank < device_count:
        return local_rank
    raise UpcycleError(f"LOCAL_RANK {local_rank} has no GPU: {device_count} are visible to this process; launch at "
                       f"most {device_count} ranks per node (torchrun --nproc_per_node), or give each rank one GPU "
                       "through CUDA_VISIBLE_DEVICES")


def _loopback(address: str | None) -> bool:
    return address is not None and (address.startswith("127.") or address == "::1")


def gloo_interface_problem(*, multi_node: bool, host_address: str | None, master_address: str | None,
                           env: Mapping[str, str]) -> str | None:
    """Why gloo cannot reach the other nodes, or None: it binds to the address this host's name resolves to, and a
    name that resolves to loopback (127.x, common in /etc/hosts) makes every cross-node connection fail or hang, unless
    every "node" is this machine (the master's address is loopback too) or GLOO_SOCKET_IFNAME names the interface."""
    if not multi_node or env.get("GLOO_SOCKET_IFNAME") or _loopback(master_address):
        return None
    if host_address is None or _loopback(host_address):
        return (f"this node's host name resolves to {host_address or 'nothing'}, so gloo (checkpoint and host "
                "collectives) cannot reach the other nodes; set GLOO_SOCKET_IFNAME to the network interface the nodes "
                "share (e.g. GLOO_SOCKET_IFNAME=eth0; `ip -br addr` lists them)")
    return None


def _resolve(name: str | None) -> str | None:
    import socket

    if not name:
        return None
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def init_distributed(timeout_s: float | None = None, host_timeout_s: float | None = None) -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

    Without those variables, or with WORLD_SIZE=1, no process group is created: single-process runs need none, and
    creating one would require a free port for nothing (a group the caller already created is used, with a host group
    beside it: benchmarks/cuda_path_check.py runs the multi-rank code paths on one GPU that way). `timeout_s` bounds
    every training collective: a rank that stops answering (frozen, or on a dead node) makes the others fail with a
    timeout instead of waiting forever. `host_timeout_s` bounds the host group's collectives (World.host_group), which
    wait on one rank's longer work. On CUDA the default group has a gloo backend for CPU tensors beside NCCL and is
    bound to this rank's GPU (`device_id`: NCCL's communicator is created at once, on the right device). Under torchrun
    each worker also asks the kernel for SIGTERM when its launcher dies (`_die_with_launcher`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _die_with_launcher()
    host_group = None
    if world_size > 1 or dist.is_initialized():  # a group the caller created is used, whatever its size
        import socket

        problem = gloo_interface_problem(multi_node=world_size > local_world_size,
                                         host_address=_resolve(socket.gethostname()),
                                         master_address=_resolve(os.environ.get("MASTER_ADDR")), env=os.environ)
        if problem:
            raise UpcycleError(problem)
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
            dist.init_process_group(backend=process_group_backend(device.type), timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        host_timeout = datetime.timedelta(seconds=host_timeout_s) if host_timeout_s else None
        host_group = dist.new_group(backend="gloo", timeout=host_timeout)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device, host_group=host_group,
                 local_world_size=local_world_size, host_timeout_s=host_timeout_s)


def _die_with_launcher() -> None:
    """SIGTERM this worker when its parent (the torchrun launcher) dies, e.g. by SIGKILL: otherwise the workers go on
    training as orphans, holding the run directory. SIGTERM, not SIGKILL: every worker of the launcher gets it at once,
    so they stop together at the end of the step, saving a checkpoint, as on any SIGTERM (Linux only; elsewhere a
    no-op)."""
    import signal

    arm = die_with_parent(signal.SIGTERM, parent=os.getppid())
    if arm is not None:
        arm()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank, on the host group (gloo: no device involved, the host group's timeout)."""
    if world.distributed:
        dist.barrier(group=world.host_group)


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks in place (identity for a world of one); returns the tensor for chaining."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard_placement(param: nn.Parameter, ways: int) -> Shard:
    """The dimension FSDP shards `param` on over `ways` ranks: dim 0 where it splits evenly (or nothing else does), else
    the first dimension that does. An expert stack [E, D, 2F] over more ranks than experts is then split along D, so
    every rank stores an equal share instead of some ranks holding whole experts and others none (FSDP pads uneven
    dim-0 shards; other dims must split evenly)."""
    shape = param.shape
    if not shape or shape[0] % ways == 0:
        return Shard(0)
    return Shard(next((d for d in range(1, len(shape)) if shape[d] % ways == 0), 0))


def expert_placement(param: nn.Parameter, ways: int) -> Shard:
    """Where FSDP splits a rank's expert stack over the `ways` replicas: along the experts (dim 0) where they divide
    evenly, so each replica keeps whole experts and gathering them needs no reordering (measured on the memory
    benchmark's 4-rank expert-parallel run: 2.25 GB peak against 2.57 GB split along dim 1); else along the first
    later dimension that divides (fewer local experts than replicas would leave some replicas holding nothing).
    Refused in one line where no dimension divides."""
    if param.shape[0] % ways == 0:
        return Shard(0)
    for dim in range(1, param.dim()):
        if param.shape[dim] % ways == 0:
            return Shard(dim)
    raise UpcycleError(f"expert weights of shape {tuple(param.shape)} cannot be split evenly over {ways} replicas "
                       "(none of their dimensions divides); choose train.expert_parallel so that ranks / "
                       "expert_parallel divides the model's dim")


def parallelize(model: nn.Module, blocks: Iterable[nn.Module], *, mode: str, world: World,
                precision: str = "fp32", replicate: int = 1) -> nn.Module:
    """Apply data parallelism to `model` and return the module to train (the same object for FSDP2, a wrapper for DDP).

    `blocks` are the transformer blocks (`model.layers`): FSDP2 shards each one as its own group so only one block's
    full parameters exist at a time, then shards the root for the remaining parameters. A world of one returns the model
    untouched, so single-process runs take exactly the code path a user would write by hand. FSDP2 works on a model
    built on the meta device: the shards are then allocated by `model.to_empty(...)` afterwards, each rank only its own.
    Each parameter is sharded along `shard_placement`'s dimension.

    precision "bf16" with FSDP2: every group (each block and the root) gets a mixed-precision policy: parameters are
    all-gathered and computed in bf16, gradients are reduce-scattered in fp32 and the sharded master weights (and so
    the optimizer state) stay fp32. "fp32" shards and computes in fp32. DDP and a world of one ignore `precision`:
    there the trainer's bf16 autocast does the casting. Activation checkpointing and torch.compile, applied per block
    before this call (checkpoint_wrapper, then `block.compile()`), compose with either policy.

    Every MoE router is an FSDP2 unit of its own, kept in fp32 whatever the policy (routing is computed in fp32 from
    fp32 weights, as in one process: a router gathered in bf16 would choose other experts on N ranks than on one).
    With expert parallelism applied first (expert_parallel.shard_experts; FSDP2 only), the MoE layers' local experts
    become FSDP2 units of their own on their own meshes (`_fully_shard_experts`).

    `replicate` > 1 (HSDP): the ranks form a (replicate, W / replicate) mesh; each group of W / replicate consecutive
    ranks (a node, under torchrun) shards the weights among itself, and the groups hold replicas whose gradients FSDP2
    all-reduces across groups once per step.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, not {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if not world.distributed:
        return model
    experts = expert_parallel.find(model)
    if experts is not None and mode != "fsdp":
        raise ValueError("expert parallelism runs under fsdp only")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    mesh, ways = data_parallel_mesh(world, replicate)
    placement = functools.partial(shard_placement, ways=ways)
    for router in _routers(model):
        # the router stays fp32 whatever the policy: routing is computed in fp32 (see moe.MoE.forward)
        fully_shard(router, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
                    shard_placement_fn=placement)
    ignored = _fully_shard_experts(experts, policy) if experts is not None else None
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored or None, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored or None, shard_placement_fn=placement)
    return model


def data_parallel_mesh(world: World, replicate: int):
    """(the device mesh FSDP2 shards the non-expert weights over, the number of ranks that share one copy): all ranks
    (None: FSDP2's default mesh), or with `replicate` > 1 a (replicate, W / replicate) mesh for HSDP."""
    if replicate == 1:
        return None, world.world_size
    if world.world_size % replicate:
        raise UpcycleError(f"train.data_parallel_replicate {replicate} must divide the number of ranks "
                           f"({world.world_size})")
    from torch.distributed.device_mesh import init_device_mesh

    shard = world.world_size // replicate
    return init_device_mesh(world.device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")), shard


def _routers(model: nn.Module) -> list[nn.Module]:
    return [module.router for module in model.modules() if isinstance(module, MoE)]


def _fully_shard_experts(parallel: expert_parallel.ExpertParallel, mp_policy) -> set[nn.Parameter]:
    """FSDP2 units for the MoE layers' experts, before the blocks' own: with W / N > 1 replicas each layer's local
    experts over them with `mp_policy` (FSDP averages their gradients over the replicas;
    expert_parallel.finish_expert_grads completes the average). With one replica the experts stay plain parameters (an
    FSDP unit over one rank would only add work); the returned set is what the blocks' fully_shard must then ignore."""
    from torch.distributed.fsdp import fully_shard

    replicas = parallel.shard.replicate_mesh.size()
    for module in parallel.layers.values():
        if replicas > 1:
            fully_shard(module, mesh=parallel.shard.replicate_mesh, mp_policy=mp_policy,
                        shard_placement_fn=functools.partial(expert_placement, ways=replicas))
    return set() if replicas > 1 else set(parallel.params.values())


def reshard(model: nn.Module) -> None:
    """Make every FSDP2 unit of `model` hold its sharded parameters again. A forward without backward (validation)
    leaves the root's parameters unsharded (it does not reshard after forward), and then `named_parameters()` would
    return the full, unsharded tensors instead of this rank's shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """DDP: skip the gradient all-reduce on all but the last micro-batch of an accumulation window (`enabled` False),
    so gradients are all-reduced once per optimizer step; DDP holds full gradients anyway, so this costs no memory.

    FSDP2: gradients are reduce-scattered after every micro-batch, whatever `enabled` says, and the sharded gradients
    accumulate. Skipping the reduce-scatter would make FSDP2 keep every unit's unsharded gradient (in fp32 under a
    bf16 policy) until the last micro-batch: the whole model's gradients on every rank, which on an 8B x 8 MoE is tens
    of GiB per GPU beyond what `upcycle plan` sizes. The price is one reduce-scatter per micro-batch instead of one
    per step (the same volume per micro-batch as the last one).
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    yield


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (DDP prefixes every parameter name with "module."), or `model` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def broadcast_object(value, world: World):
    """Rank 0's `value` on every rank (pickled over the process group; identity for a world of one)."""
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=world.host_group)  # pickled on the CPU, over the host group
    return holder[0]


def all_gather_object(value, world: World) -> list:
    """Every rank's `value`, in rank order, over the host group ([value] for a world of one)."""
    if not world.distributed:
        return [value]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, value, group=world.host_group)
    return gathered
