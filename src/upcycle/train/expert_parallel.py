"""Expert parallelism (`train.expert_parallel: N`): each MoE layer's experts are split over groups of N ranks, and
tokens travel to their experts and back.

    route -> sort by expert -> [all-to-all: counts] -> [all-to-all: rows] -> regroup by local expert
          -> local experts' FFN -> un-regroup -> [all-to-all: rows back] -> unsort -> weighted sum over the k slots

The W ranks form a (W / N, N) mesh ("expert_replicate", "expert"). `shard_experts` applies this from outside, as FSDP
is applied, by swapping each layer's `expert_compute` for an `ExchangedExperts` (`find` reads it back);
`finish_expert_grads` turns the exchanged gradients into the global-batch average; `ExpertParallel.global_view` places
a rank's experts in the full [E, ...] tensors for checkpoints. The design, sharding and tests: docs/training.md,
"Expert parallelism"."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from upcycle.errors import UpcycleError
from upcycle.model.moe import MoE, PermuteRows, expert_ffn_sorted, inverse_permutation

# The label of every all-to-all (counts and rows) in torch.profiler traces; benchmarks/expert_parallel.py sums it.
ALL_TO_ALL_LABEL = "upcycle::expert_all_to_all"


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds and whom it exchanges tokens with."""

    group: dist.ProcessGroup  # the N ranks that hold all experts between them
    mesh: DeviceMesh  # the (W / N, N) mesh, dims ("expert_replicate", "expert")
    expert_major_mesh: DeviceMesh  # the same ranks as an (N, W / N) mesh, dims ("expert", "expert_replicate")
    size: int  # N
    rank: int  # position in `group`
    replica: int  # position along "expert_replicate"
    num_experts: int  # E: experts of one MoE layer, all ranks together
    world_size: int  # W

    @property
    def replicate_mesh(self) -> DeviceMesh:
        """The W / N ranks that hold the same experts as this one (FSDP shards them over it)."""
        return self.mesh["expert_replicate"]

    @property
    def num_local(self) -> int:
        return self.num_experts // self.size

    @property
    def local_slice(self) -> slice:
        return slice(self.rank * self.num_local, (self.rank + 1) * self.num_local)


EXPERT_WEIGHTS = ("gate_up_ED2F", "down_EFD")


class ExchangedExperts:
    """An MoE layer's expert computation under expert parallelism (it replaces `moe.expert_ffn_sorted` as the layer's
    `expert_compute`): each row goes to the rank of the group that holds its expert and comes back computed."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard

    def __call__(self, x_SD: Tensor, counts_E: Tensor, gate_up_LD2F: Tensor, down_LFD: Tensor, *,
                 impl: str) -> Tensor:
        return exchange_and_compute(x_SD, counts_E, gate_up_LD2F, down_LFD, shard=self.shard, impl=impl)


@dataclass
class ExpertParallel:
    """The expert shard and the MoE layers whose experts it splits (by their names in the unwrapped model)."""

    shard: ExpertShard
    layers: dict[str, nn.Module] = field(default_factory=dict)  # MoE module name -> MoE module

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The local expert weights by parameter name, read from the modules each time (FSDP replaces them by
        sharded DTensor parameters)."""
        return {f"{name}.{weight}": getattr(module, weight) for name, module in self.layers.items()
                for weight in EXPERT_WEIGHTS}

    def others(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's parameters that are not expert weights (FSDP's over all ranks), in model order."""
        expert_ids = {id(p) for p in self.params.values()}
        return [p for p in model.parameters() if id(p) not in expert_ids]

    def global_view(self, tensor: Tensor) -> DTensor:
        """This rank's piece of an expert weight, or of a state tensor shaped like one (AdamW's moments), as a DTensor
        of the full [E, ...] tensor over the (W / N, N) mesh: experts split over "expert", and FSDP's shard over
        "expert_replicate" where FSDP shards them (else replicated there). Shares the local storage."""
        shape = torch.Size((self.shard.num_experts, *tensor.shape[1:]))
        if not isinstance(tensor, DTensor):  # one replica: plain local experts
            mesh, placements, local = self.shard.mesh, [Replicate(), Shard(0)], tensor
        else:  # an FSDP shard over the replicas
            (placement,) = tensor.placements
            local = tensor.to_local()
            if placement.dim == 0:  # the rank's experts split again: along "expert" first, then "expert_replicate"
                mesh, placements = self.shard.expert_major_mesh, [Shard(0), placement]
            else:
                mesh, placements = self.shard.mesh, [placement, Shard(0)]
        return DTensor.from_local(local, mesh, placements, shape=shape, stride=_contiguous_strides(shape))

    def describe(self) -> str:
        """One line for the log: the layout, and the share of all expert weights this rank stores."""
        shard = self.shard
        stored = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.params.values())
        total = sum(p.numel() // shard.num_local * shard.num_experts for p in self.params.values())  # global shapes
        rank = shard.replica * shard.size + shard.rank
        return (f"expert parallelism: {shard.world_size // shard.size} group(s) of {shard.size} ranks, "
                f"{shard.num_local} of {shard.num_experts} experts per rank in each MoE layer; rank {rank} stores "
                f"{stored:,} of {total:,} expert weights (1/{round(total / stored) if stored else 0})")


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def find(model: nn.Module) -> ExpertParallel | None:
    """The expert parallelism `shard_experts` applied to `model`, read off its MoE layers; None without it."""
    layers = {clean_name(name): module for name, module in model.named_modules()
              if isinstance(getattr(module, "expert_compute", None), ExchangedExperts)}
    if not layers:
        return None
    return ExpertParallel(next(iter(layers.values())).expert_compute.shard, layers)


def check_degree(degree: int, *, world_size: int, num_experts: int) -> None:
    """Refuse an expert-parallel degree that cannot shard this model over this world, naming the fix."""
    if degree == 1:
        return
    if num_experts == 0:
        raise UpcycleError(f"train.expert_parallel {degree} needs an MoE model; this one is dense "
                           "(set train.expert_parallel: 1)")
    if world_size % degree:
        raise UpcycleError(f"train.expert_parallel {degree} must divide the number of ranks ({world_size}); launch "
                           f"with torchrun --nproc_per_node a multiple of {degree}, or lower train.expert_parallel")
    if num_experts % degree:
        raise UpcycleError(f"train.expert_parallel {degree} must divide the model's {num_experts} experts; pick a "
                           f"divisor of {num_experts}")


def make_shard(degree: int, *, world_size: int, rank: int, num_experts: int, device: torch.device) -> ExpertShard:
    """The (W / N, N) device mesh and this rank's place in it. Every rank must call this (it creates groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    check_degree(degree, world_size=world_size, num_experts=num_experts)
    mesh = init_device_mesh(device.type, (world_size // degree, degree),
                            mesh_dim_names=("expert_replicate", "expert"))
    # the same layout with its dimensions swapped, to describe experts split along dim 0 twice (by expert
    # parallelism, then by FSDP within a rank's experts) as one DTensor in checkpoints
    expert_major = DeviceMesh(device.type, mesh.mesh.t().contiguous(), mesh_dim_names=("expert", "expert_replicate"))
    return ExpertShard(group=mesh.get_group("expert"), mesh=mesh, expert_major_mesh=expert_major, size=degree,
                       rank=rank % degree, replica=rank // degree, num_experts=num_experts, world_size=world_size)


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (activation checkpointing, torch.compile), as in checkpoints."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def shard_experts(model: nn.Module, degree: int, world) -> ExpertParallel:
    """Keep only this rank's experts in every MoE layer of `model`, `degree` ranks to a group of the
    distributed.World `world`, and route tokens through the group (each layer's `expert_compute` becomes an
    ExchangedExperts). Works on a model built on the meta device (nothing is allocated then). Every rank must call it
    (it creates the mesh); call before FSDP (distributed.parallelize) and before building the optimizer."""
    layers = [module for module in model.modules() if isinstance(module, MoE)]
    shard = make_shard(degree, world_size=world.world_size, rank=world.rank,
                       num_experts=layers[0].num_experts if layers else 0, device=world.device)
    for module_name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if module.num_experts != shard.num_experts:
            raise UpcycleError(f"MoE layer {module_name} has {module.num_experts} experts, the shard expects "
                               f"{shard.num_experts}")
        for weight in EXPERT_WEIGHTS:
            full = getattr(module, weight)
            setattr(module, weight, nn.Parameter(full.detach()[shard.local_slice].clone(),
                                                 requires_grad=full.requires_grad))
        module.expert_compute = ExchangedExperts(shard)
    return find(model)


# ---------------------------------------------------------------------------------------------------------------------
# The token exchange


class _AllToAll(torch.autograd.Function):
    """Rows of x sent in blocks of `send_splits` to the group's ranks, blocks of `recv_splits` received; the backward
    sends the gradient the way back."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, recv_splits: list[int], send_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        return _all_to_all_rows(x_SD, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        recv_splits, send_splits = ctx.splits
        return _all_to_all_rows(grad_RD, send_splits, recv_splits, ctx.group), None, None, None


def _all_to_all_rows(x_SD: Tensor, recv_splits: list[int], send_splits: list[int], group) -> Tensor:
    out_RD = x_SD.new_empty(sum(recv_splits), *x_SD.shape[1:])
    with torch.profiler.record_function(ALL_TO_ALL_LABEL):
        dist.all_to_all_single(out_RD, x_SD.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
    return out_RD


def regroup_order(recv_counts_NL: Tensor, rows: int | None = None) -> Tensor:
    """The permutation that takes received rows, in blocks (source rank n, local expert l), to blocks (l, n): each
    local expert's rows contiguous, in source-rank order. Pure; counts_NL[n, l] rows came from n for expert l.
    `rows`, the total of the counts when the caller knows it, spares a device-to-host read on a GPU."""
    N, L = recv_counts_NL.shape
    expert_R = torch.arange(L, device=recv_counts_NL.device).repeat(N).repeat_interleave(
        recv_counts_NL.reshape(-1), output_size=rows)
    return torch.sort(expert_R, stable=True).indices


@torch.compiler.disable  # host-read split sizes and collectives: run eagerly inside a compiled block
def exchange_and_compute(x_SD: Tensor, counts_E: Tensor, gate_up_LD2F: Tensor, down_LFD: Tensor, *,
                         shard: ExpertShard, impl: str) -> Tensor:
    """The expert FFN of every (token, slot) row of x_SD, rows sorted by global expert (counts_E rows each), computed
    by the ranks that hold the experts. Returns (S, D) in the same order, as `expert_ffn_sorted` would."""
    N, L = shard.size, shard.num_local
    send_counts_NL = counts_E.view(N, L)
    recv_counts_NL = torch.empty_like(send_counts_NL)
    with torch.profiler.record_function(ALL_TO_ALL_LABEL):
        dist.all_to_all_single(recv_counts_NL, send_counts_NL.contiguous(), group=shard.group)
    # the split sizes, read on the host once for both directions (a collective with variable splits needs them)
    splits = torch.stack([send_counts_NL.sum(1), recv_counts_NL.sum(1)]).tolist()
    send_splits, recv_splits = splits
    x_RD = _AllToAll.apply(x_SD, recv_splits, send_splits, shard.group)
    perm_R = regroup_order(recv_counts_NL, rows=sum(recv_splits))
    inverse_R = inverse_permutation(perm_R)
    x_local_RD = PermuteRows.apply(x_RD, perm_R, inverse_R)
    y_local_RD = expert_ffn_sorted(x_local_RD, recv_counts_NL.sum(0), gate_up_LD2F, down_LFD, impl=impl)
    y_RD = PermuteRows.apply(y_local_RD, inverse_R, perm_R)
    return _AllToAll.apply(y_RD, send_splits, recv_splits, shard.group)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients


def finish_expert_grads(parallel: ExpertParallel) -> None:
    """Complete the global-batch average of the expert gradients: FSDP averaged each over the W / N replicas, and it
    already held the sum over its group's N ranks' tokens, so one more division by N. Once per optimizer step, after
    the last micro-batch's backward, before clipping. (FSDP's own gradient divide factor would do this inside the
    reduction, but it needs a pre-multiplied sum that gloo lacks.)"""
    grads = [p.grad for p in parallel.params.values() if p.grad is not None]
    if grads:
        torch._foreach_div_(grads, float(parallel.shard.size))


def _total_norm(grads: list[Tensor]) -> float:
    """The 2-norm of `grads` as one float; DTensor gradients (FSDP shards) are reduced over their mesh."""
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def clip_grad_norm(model: nn.Module, max_norm: float, parallel: ExpertParallel) -> float:
    """Global gradient norm over the non-expert parameters and the expert shards (each expert counted once), and every
    gradient scaled by max_norm / norm when that is below 1, like torch.nn.utils.clip_grad_norm_. The two kinds live on
    different device meshes, so their norms are taken apart and combined."""
    others = [p.grad for p in parallel.others(model) if p.grad is not None]
    experts = [p.grad for p in parallel.params.values() if p.grad is not None]
    # on the group's device even where this rank has no expert gradient: an NCCL group takes no CPU tensor
    device = torch.device(parallel.shard.mesh.device_type)
    # the norm of this rank's experts (over their replica shards), summed in squares over the expert group: all E
    expert_sq = torch.tensor([_total_norm(experts) ** 2], dtype=torch.float64, device=device)
    dist.all_reduce(expert_sq, group=parallel.shard.group)
    total = (_total_norm(others) ** 2 + float(expert_sq)) ** 0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for grads in (others, experts):  # tensors of different meshes cannot share one foreach call
            if grads:
                torch._foreach_mul_(grads, coef)
    return total
