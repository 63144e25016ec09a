"""Expert parallelism: each MoE layer's experts are split over groups of N ranks, and tokens travel to their experts.

With `train.expert_parallel: N` the W ranks form a 2-D device mesh of shape (W / N, N):

    dim "expert"            N ranks that together hold all E experts of every MoE layer, E / N each (contiguous
                            ranks, so on GPUs one group sits inside a node, on its fast links)
    dim "expert_replicate"  W / N groups ("replicas") holding the same experts, which FSDP2 shards over them

Every rank still reads its own share of the global batch (data parallelism over all W ranks). In each MoE layer a rank
routes its tokens, sorts the (token, slot) pairs by expert, sends each pair's row to the rank that holds its expert and
gets the results back, both with `all_to_all_single` on variable split sizes:

    route -> sort by expert -> [all-to-all: counts] -> [all-to-all: rows] -> regroup by local expert
          -> local experts' FFN -> un-regroup -> [all-to-all: rows back] -> unsort -> weighted sum over the k slots

The split sizes are read on the host (one synchronization per layer and direction; a collective with variable splits
needs them). Both row all-to-alls are autograd functions whose backward is the reverse all-to-all.

Sharding: everything that is not an expert weight (attention, norms, embeddings, shared experts) stays under FSDP2
over all W ranks, each router is an FSDP2 unit of its own over all W ranks too (in fp32), and with more than one
replica each MoE layer's local experts are an FSDP2 unit over the W / N replicas, so a rank stores 1 / W of all expert
weights, gradients and optimizer state (with one replica they are plain parameters that FSDP ignores). Gradients: an expert's gradient already holds the contributions of all N ranks of its group (the
all-to-all's backward brings them); FSDP averages it over the W / N replicas and `finish_expert_grads` divides by N:
the same average over the global batch as one process computes. Gradient clipping takes the norm over both kinds
(`clip_grad_norm`).

Checkpoints keep our single full-tensor format: `gather_full_experts` collects every expert's weights and optimizer
state on rank 0 when saving, `keep_local_experts` slices a full checkpoint when loading, so a run saved with N = 2
resumes with N = 1 and the other way round, and export reads it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from upcycle.errors import UpcycleError

# The label of every all-to-all (counts and rows) in torch.profiler traces; benchmarks/expert_parallel.py sums it.
ALL_TO_ALL_LABEL = "upcycle::expert_all_to_all"


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds and whom it exchanges tokens with."""

    group: dist.ProcessGroup  # the N ranks that hold all experts between them
    replicate_mesh: DeviceMesh  # the W / N ranks that hold the same experts as this one (FSDP shards them over it)
    size: int  # N
    rank: int  # position in `group`
    replica: int  # position in `replicate_mesh`
    num_experts: int  # E: experts of one MoE layer, all ranks together
    world_size: int  # W

    @property
    def num_local(self) -> int:
        return self.num_experts // self.size

    @property
    def local_slice(self) -> slice:
        return slice(self.rank * self.num_local, (self.rank + 1) * self.num_local)


EXPERT_WEIGHTS = ("gate_up_ED2F", "down_EFD")


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

    def describe(self) -> str:
        """One line for the log: the layout, and the share of all expert weights this rank stores."""
        shard = self.shard
        stored = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.params.values())
        total = sum(p.numel() // shard.num_local * shard.num_experts for p in self.params.values())  # global shapes
        rank = shard.replica * shard.size + shard.rank
        return (f"expert parallelism: {shard.world_size // shard.size} group(s) of {shard.size} ranks, "
                f"{shard.num_local} of {shard.num_experts} experts per rank in each MoE layer; rank {rank} stores "
                f"{stored:,} of {total:,} expert weights (1/{round(total / stored) if stored else 0})")


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
    return ExpertShard(group=mesh.get_group("expert"), replicate_mesh=mesh["expert_replicate"], size=degree,
                       rank=rank % degree, replica=rank // degree, num_experts=num_experts, world_size=world_size)


def _clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (activation checkpointing, torch.compile), as in checkpoints."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def shard_experts(model: nn.Module, degree: int, world) -> ExpertParallel:
    """Keep only this rank's experts in every MoE layer of `model` (built with all of them), `degree` ranks to a group
    of the distributed.World `world`, and route tokens through the group. Every rank must call it (it creates the
    mesh); call before `fully_shard_experts` (FSDP) and before building the optimizer."""
    from upcycle.moe import MoE

    layers = [module for module in model.modules() if isinstance(module, MoE)]
    shard = make_shard(degree, world_size=world.world_size, rank=world.rank,
                       num_experts=layers[0].num_experts if layers else 0, device=world.device)
    parallel = ExpertParallel(shard)
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
        module.expert_shard = shard
        parallel.layers[_clean_name(module_name)] = module
    return parallel


def fully_shard_experts(parallel: ExpertParallel, mp_policy) -> set[nn.Parameter]:
    """FSDP2 units for the MoE layers, before the blocks' own: each router over all ranks (in fp32), and with W / N > 1
    replicas each layer's local experts over them with `mp_policy` (FSDP averages their gradients over the replicas;
    `finish_expert_grads` completes the average). With one replica the experts stay plain parameters (an FSDP unit
    over one rank would only add work); the returned set is what the blocks' fully_shard must then ignore."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    replicated = parallel.shard.replicate_mesh.size() > 1
    for module in parallel.layers.values():
        # the router stays fp32 whatever the policy: routing is computed in fp32 (see moe.MoE.forward)
        fully_shard(module.router, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
        if replicated:
            fully_shard(module, mesh=parallel.shard.replicate_mesh, mp_policy=mp_policy)
    return set() if replicated else set(parallel.params.values())


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


def regroup_order(recv_counts_NL: Tensor) -> Tensor:
    """The permutation that takes received rows, in blocks (source rank n, local expert l), to blocks (l, n): each
    local expert's rows contiguous, in source-rank order. Pure; counts_NL[n, l] rows came from n for expert l."""
    N, L = recv_counts_NL.shape
    expert_R = torch.arange(L, device=recv_counts_NL.device).repeat(N).repeat_interleave(recv_counts_NL.reshape(-1))
    return torch.sort(expert_R, stable=True).indices


@torch.compiler.disable  # host-read split sizes and collectives: run eagerly inside a compiled block
def exchange_and_compute(x_SD: Tensor, counts_E: Tensor, gate_up_LD2F: Tensor, down_LFD: Tensor, *,
                         shard: ExpertShard, impl: str) -> Tensor:
    """The expert FFN of every (token, slot) row of x_SD, rows sorted by global expert (counts_E rows each), computed
    by the ranks that hold the experts. Returns (S, D) in the same order, as `expert_ffn_sorted` would."""
    from upcycle.moe import PermuteRows, expert_ffn_sorted, inverse_permutation

    N, L = shard.size, shard.num_local
    send_counts_NL = counts_E.view(N, L)
    recv_counts_NL = torch.empty_like(send_counts_NL)
    with torch.profiler.record_function(ALL_TO_ALL_LABEL):
        dist.all_to_all_single(recv_counts_NL, send_counts_NL.contiguous(), group=shard.group)
    send_splits = send_counts_NL.sum(1).tolist()
    recv_splits = recv_counts_NL.sum(1).tolist()
    x_RD = _AllToAll.apply(x_SD, recv_splits, send_splits, shard.group)
    perm_R = regroup_order(recv_counts_NL)
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
    device = experts[0].device if experts else torch.device("cpu")
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


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: full tensors on disk, local shards in memory


def gather_full_experts(parallel: ExpertParallel, optimizer: torch.optim.Optimizer, model_state: dict,
                        optim_state: dict) -> None:
    """Put every expert's weights and optimizer state, gathered from all ranks, into rank 0's full state dicts.

    A collective: every rank must call it. Each rank first assembles its experts from their replica shards, then the
    first expert group (the one holding global rank 0) gathers them on rank 0; the other groups hold equal copies.
    Other ranks' dicts are left as they are."""
    shard = parallel.shard
    if shard.rank == 0 and shard.replica == 0:
        _merge_param_groups(optim_state, order=list(model_state))
    for name, param in parallel.params.items():
        weights = _gather(_full(param.detach()), shard)
        state = optimizer.state.get(param, {})
        gathered = {key: _gather(_full(value), shard) if _is_per_expert(value, param) else value
                    for key, value in sorted(state.items())}
        if shard.rank == 0 and shard.replica == 0:
            model_state[name] = weights
            optim_state["state"][name] = {key: value.detach().cpu() if isinstance(value, Tensor) else value
                                          for key, value in gathered.items()}


def _full(tensor: Tensor) -> Tensor:
    """This rank's experts whole: a DTensor sharded over the replicas is all-gathered (a collective over them)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _merge_param_groups(optim_state: dict, order: list[str]) -> None:
    """The trainer's two param groups (others, experts; equal settings) as the one group a run without expert
    parallelism saves, its parameter names in model order, so checkpoints are the same whatever the degree."""
    groups = optim_state["param_groups"]
    settings = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    if any(s != settings[0] for s in settings[1:]):
        raise UpcycleError("expert and non-expert parameters have different optimizer settings; a checkpoint holds "
                           "one param group")
    position = {name: i for i, name in enumerate(order)}
    names = sorted((name for group in groups for name in group["params"]), key=lambda n: position.get(n, len(order)))
    optim_state["param_groups"] = [{**settings[0], "params": names}]


def _is_per_expert(value, param: nn.Parameter) -> bool:
    return isinstance(value, Tensor) and value.shape == param.shape


def _gather(local: Tensor, shard: ExpertShard) -> Tensor | None:
    """In the first expert group: the group's local tensors concatenated along dim 0 on its rank 0 (None elsewhere)."""
    if shard.replica != 0:
        return None
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(shard.size)] if shard.rank == 0 else None
    dist.gather(local, gather_list=parts, group_dst=0, group=shard.group)
    return torch.cat(parts).cpu() if parts is not None else None


def keep_local_experts(parallel: ExpertParallel, model_state: dict, optim_state: dict) -> None:
    """Slice this rank's experts out of full (checkpoint) state dicts, in place, before they are loaded."""
    local = parallel.shard.local_slice
    for name, param in parallel.params.items():
        full_shape = (parallel.shard.num_experts, *param.shape[1:])
        if name in model_state:
            if tuple(model_state[name].shape) != full_shape:
                raise UpcycleError(f"checkpoint tensor {name} has shape {tuple(model_state[name].shape)}, expected "
                                   f"{full_shape}")
            model_state[name] = model_state[name][local]
        entries = optim_state["state"].get(name, {})
        for key, value in entries.items():
            if isinstance(value, Tensor) and tuple(value.shape) == full_shape:
                entries[key] = value[local]
