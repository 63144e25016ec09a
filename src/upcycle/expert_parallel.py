"""Expert parallelism: each MoE layer's experts are split over groups of N ranks, and tokens travel to their experts.

With `train.expert_parallel: N` the W ranks form a 2-D device mesh of shape (W / N, N):

    dim "expert"            N ranks that together hold all E experts of every MoE layer, E / N each (contiguous
                            ranks, so on GPUs one group sits inside a node, on its fast links)
    dim "expert_replicate"  W / N groups holding the same experts; their expert gradients are summed (all-reduce)

Every rank still reads its own share of the global batch (data parallelism over all W ranks). In each MoE layer a rank
routes its tokens, sorts the (token, slot) pairs by expert, sends each pair's row to the rank that holds its expert and
gets the results back, both with `all_to_all_single` on variable split sizes:

    route -> sort by expert -> [all-to-all: counts] -> [all-to-all: rows] -> regroup by local expert
          -> local experts' FFN -> un-regroup -> [all-to-all: rows back] -> unsort -> weighted sum over the k slots

The split sizes are read on the host (one synchronization per layer and direction; a collective with variable splits
needs them). Both row all-to-alls are autograd functions whose backward is the reverse all-to-all.

Everything that is not an expert weight (attention, norms, embeddings, routers, shared experts) stays under FSDP2 over
all W ranks; the local expert weights are plain parameters that FSDP ignores. Gradients: FSDP averages its parameters
over W ranks; an expert's gradient already holds the contributions of all N ranks of its group (the all-to-all's
backward brings them), so it is summed over the W / N replicas and divided by W: the same average over the global
batch as one process computes. Gradient clipping takes the norm over both kinds (`clip_grad_norm`).

Checkpoints keep our single full-tensor format: `gather_full_experts` collects every expert's weights and optimizer
state on rank 0 when saving, `keep_local_experts` slices a full checkpoint when loading, so a run saved with N = 2
resumes with N = 1 and the other way round, and export reads it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from upcycle.errors import UpcycleError

# The label of every all-to-all (counts and rows) in torch.profiler traces; benchmarks/expert_parallel.py sums it.
ALL_TO_ALL_LABEL = "upcycle::expert_all_to_all"


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds and whom it exchanges tokens with."""

    group: dist.ProcessGroup  # the N ranks that hold all experts between them
    replicate_group: dist.ProcessGroup | None  # the W / N ranks that hold the same experts as this one (None: W == N)
    size: int  # N
    rank: int  # position in `group`
    replica: int  # position in `replicate_group` (0 when there is none)
    num_experts: int  # E: experts of one MoE layer, all ranks together
    world_size: int  # W

    @property
    def num_local(self) -> int:
        return self.num_experts // self.size

    @property
    def local_slice(self) -> slice:
        return slice(self.rank * self.num_local, (self.rank + 1) * self.num_local)


@dataclass
class ExpertParallel:
    """The expert shard plus the local expert parameters, by their names in the unwrapped model."""

    shard: ExpertShard
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    def is_expert(self, param: nn.Parameter) -> bool:
        return any(param is p for p in self.params.values())


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
    replicas = world_size // degree
    return ExpertShard(group=mesh.get_group("expert"),
                       replicate_group=mesh.get_group("expert_replicate") if replicas > 1 else None,
                       size=degree, rank=rank % degree, replica=rank // degree, num_experts=num_experts,
                       world_size=world_size)


def _clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (activation checkpointing, torch.compile), as in checkpoints."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def shard_experts(model: nn.Module, shard: ExpertShard) -> ExpertParallel:
    """Keep only this rank's experts in every MoE layer of `model` (built with all of them) and route through `shard`.

    Returns the local expert parameters by name; FSDP must ignore them and the trainer reduces their gradients.
    """
    from upcycle.moe import MoE

    parallel = ExpertParallel(shard)
    for module_name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if module.num_experts != shard.num_experts:
            raise UpcycleError(f"MoE layer {module_name} has {module.num_experts} experts, the shard expects "
                               f"{shard.num_experts}")
        for param_name in ("gate_up_ED2F", "down_EFD"):
            full = getattr(module, param_name)
            local = nn.Parameter(full.detach()[shard.local_slice].clone(), requires_grad=full.requires_grad)
            setattr(module, param_name, local)
            parallel.params[_clean_name(f"{module_name}.{param_name}")] = local
        module.expert_shard = shard
    return parallel


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


def reduce_expert_grads(parallel: ExpertParallel) -> None:
    """Turn each local expert gradient (the sum over its group's tokens) into the global-batch average: sum over the
    replicas, divide by W. Call once per optimizer step, after the last micro-batch's backward."""
    grads = [p.grad for p in parallel.params.values() if p.grad is not None]
    if not grads:
        return
    if parallel.shard.replicate_group is not None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=parallel.shard.replicate_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    torch._foreach_div_(grads, float(parallel.shard.world_size))


def clip_grad_norm(model: nn.Module, max_norm: float, parallel: ExpertParallel) -> float:
    """Global gradient norm over the FSDP parameters and the expert shards (each expert counted once), and every
    gradient scaled by max_norm / norm when that is below 1, like torch.nn.utils.clip_grad_norm_."""
    others = [p.grad for p in model.parameters() if p.grad is not None and not parallel.is_expert(p)]
    experts = [p.grad for p in parallel.params.values() if p.grad is not None]
    other_norm = torch.nn.utils.get_total_norm(others) if others else torch.zeros(())
    if hasattr(other_norm, "full_tensor"):  # a DTensor under FSDP2: the norm over all ranks' shards
        other_norm = other_norm.full_tensor()
    expert_sq = torch.zeros((), dtype=torch.float64, device=experts[0].device if experts else "cpu")
    for grad in experts:
        expert_sq += grad.double().pow(2).sum()
    dist.all_reduce(expert_sq, group=parallel.shard.group)  # replicas are equal: summing over the group covers all E
    total = float((float(other_norm) ** 2 + float(expert_sq)) ** 0.5)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for grads in (others, experts):  # DTensors and plain tensors cannot share one foreach call
            if grads:
                torch._foreach_mul_(grads, coef)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: full tensors on disk, local shards in memory


def gather_full_experts(parallel: ExpertParallel, optimizer: torch.optim.Optimizer, model_state: dict,
                        optim_state: dict) -> None:
    """Put every expert's weights and optimizer state, gathered from the group, into rank 0's full state dicts.

    A collective over the first expert group (the one holding global rank 0); other groups hold equal replicas and
    skip it. Other ranks' dicts are left as they are."""
    shard = parallel.shard
    if shard.replica != 0:
        return
    if shard.rank == 0:
        _merge_param_groups(optim_state, order=list(model_state))
    for name, param in parallel.params.items():
        model_state_value = _gather(param.detach(), shard)
        state = optimizer.state.get(param, {})
        gathered = {key: _gather(value, shard) if _is_per_expert(value, param) else value
                    for key, value in sorted(state.items())}
        if shard.rank == 0:
            model_state[name] = model_state_value
            optim_state["state"][name] = {key: value.detach().cpu() if isinstance(value, Tensor) else value
                                          for key, value in gathered.items()}


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
    """The group's local tensors concatenated along dim 0 on the group's rank 0 (None elsewhere)."""
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
