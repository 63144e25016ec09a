"""`upcycle plan`: the memory a training config needs per rank and per node, before any weight exists.

The model is built on the meta device and every parameter is placed by the same functions training uses (which
dimension FSDP2 splits, which experts a rank keeps), so each rank's share is counted, not guessed; gathered blocks,
activations and the CUDA runtime are estimated. How each quantity is computed: docs/training.md, "Memory"."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from upcycle import hardware
from upcycle.train.distributed import World, expert_placement, shard_placement
from upcycle.errors import UpcycleError
from upcycle.train.expert_parallel import check_degree
from upcycle.hardware import format_bytes, resolve_precision
from upcycle.model.transformer import ModelConfig, Transformer
from upcycle.model.moe import MoE
from upcycle.formats.safetensors_io import parse_size
from upcycle.train.trainer import start_point
from upcycle.train.config import TrainConfig, micro_batch_size_for

# Resident memory of one training process before any weight: Python, torch and our modules (measured on this machine
# with torch 2.13 CPU: ~0.45 GB after `import upcycle.train.trainer`; a gloo process group adds little).
RUNTIME_BYTES = 450 * 2**20
# A CUDA process, estimated (no GPU measured it here; cuda_path_check.py reports the real figures): host memory of the
# CUDA libraries torch loads (cuBLAS, cuDNN, NCCL) and their start-up, which the CPU build's RUNTIME_BYTES lacks; the
# CUDA context on the device with lazy kernel loading; NCCL's channel buffers per communicator (several MiB per channel
# and peer, tens of channels on NVLink); and the caching allocator's fragmentation on top of the training peak.
CUDA_HOST_RUNTIME_BYTES = 3 * 2**30
CUDA_CONTEXT_BYTES = 600 * 2**20
NCCL_BYTES_PER_COMMUNICATOR = 1 * 2**30
ALLOCATOR_SLACK = 0.10


def _chunk(size: int, ways: int, index: int) -> int:
    """Length of piece `index` when `size` is split `ways` ways as FSDP2 and DTensor split (torch.chunk)."""
    step = -(-size // ways)
    return max(0, min(step, size - index * step))


@dataclass
class RankShare:
    """What one rank holds of the model, in parameters."""

    rank: int
    params: int = 0  # its shard of every parameter
    largest_piece: int = 0  # its largest single piece (what a save writes at once)
    blocks: list[int] = field(default_factory=list)  # each block's parameters as gathered on this rank (FSDP unit)
    root: int = 0  # the root unit's gathered parameters (embeddings, final norm, LM head)


def representative(config: ModelConfig) -> tuple[ModelConfig, list[int]]:
    """A config with one layer of each kind `config` has (a dense FFN, an MoE FFN: every layer of a kind holds the
    same parameters) and, per layer of `config`, the index of the layer that stands for it. The plan builds and walks
    that small model, so its cost does not grow with num_layers (before, --model.num_layers 100000 took minutes and
    gigabytes to answer)."""
    moe = set(config.moe_layer_ids)
    kinds = sorted({i in moe for i in range(config.num_layers)})  # False (dense) before True (MoE)
    small = dataclasses.replace(config, num_layers=len(kinds),
                                moe_layers=[kinds.index(True)] if len(kinds) == 2 else None)
    return small, [kinds.index(i in moe) for i in range(config.num_layers)]


def rank_shares(model: Transformer, *, world_size: int, expert_parallel: int, parallel: str,
                replicate: int = 1, layer_of: list[int] | None = None) -> list[RankShare]:
    """Every rank's share of `model` (built on the meta device) under FSDP2 (with expert parallelism; with
    `replicate` > 1, HSDP: the non-expert weights sharded within groups of world_size / replicate ranks) or DDP.
    With `layer_of` (`representative`), `model` holds one layer per kind and layer i of the planned model is
    model.layers[layer_of[i]]."""
    ways = world_size // replicate
    shares = [RankShare(rank) for rank in range(world_size)]
    expert_ids = {id(p) for m in model.modules() if isinstance(m, MoE) for p in (m.gate_up_ED2F, m.down_EFD)}
    block_of = {id(p): i for i, block in enumerate(model.layers) for p in block.parameters()}
    layer_of = list(range(len(model.layers))) if layer_of is None else layer_of
    repeats = [layer_of.count(i) for i in range(len(model.layers))]
    for share in shares:
        share.blocks = [0] * len(model.layers)
    for param in model.parameters():
        is_expert = id(param) in expert_ids
        for share in shares:
            if world_size == 1 or parallel == "ddp":
                local, gathered = param.numel(), param.numel()
            elif is_expert and expert_parallel > 1:
                replicas, replica = world_size // expert_parallel, share.rank // expert_parallel
                shape = (param.shape[0] // expert_parallel, *param.shape[1:])
                gathered = math.prod(shape)  # a rank computes only its group's experts
                local = gathered
                if replicas > 1:
                    dim = expert_placement(torch.empty(shape, device="meta"), replicas).dim
                    local = gathered // shape[dim] * _chunk(shape[dim], replicas, replica)
            else:
                dim = shard_placement(param, ways).dim
                local = param.numel() // param.shape[dim] * _chunk(param.shape[dim], ways, share.rank % ways) \
                    if param.dim() else param.numel()
                gathered = param.numel()
            share.params += local * (repeats[block_of[id(param)]] if id(param) in block_of else 1)
            share.largest_piece = max(share.largest_piece, local)
            if id(param) in block_of:
                share.blocks[block_of[id(param)]] += gathered
            else:
                share.root += gathered
    for share in shares:
        share.blocks = [share.blocks[i] for i in layer_of]
    return shares


def activation_values(config: ModelConfig, *, tokens: int, checkpointing: bool) -> tuple[int, int]:
    """(values autograd keeps for backward, of which fp32 regardless of precision) for one micro-batch of `tokens`."""
    D, V, K = config.dim, config.vocab_size, config.top_k
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = 4 * D + 3 * q + 4 * kv  # norm in/out, residual, q k v (before and after RoPE), SDPA out, o in
    per_layer = []
    moe_layers = set(config.moe_layer_ids)
    for layer in range(config.num_layers):
        if layer in moe_layers:
            F = config.expert_dim
            ffn = 3 * D + K * (2 * D + 4 * F)  # norm in/out, combine; per slot: gathered row, [gate|up], silu, product
            if config.shared_expert_dim:
                ffn += 4 * config.shared_expert_dim + 1
        else:
            ffn = 3 * D + 4 * config.ffn_dim
        per_layer.append(attention + ffn)
    routing = 3 * config.num_experts * len(config.moe_layer_ids)  # fp32 logits, probabilities, top-k weights
    head = V  # logits
    if checkpointing:  # each block's input, plus one block recomputed in backward
        kept = D * config.num_layers + max(per_layer)
    else:
        kept = sum(per_layer)
    return tokens * (kept + head + V + routing), tokens * (V + routing)  # + cross-entropy's fp32 log-probabilities


@dataclass
class RankPlan:
    rank: int
    params: int
    weights: int  # bytes
    grads: int
    optimizer: int
    gathered: int  # FSDP's all-gathered blocks and root, and one block's unsharded gradients
    activations: int
    runtime: int  # on the device: CUDA context, NCCL buffers, allocator slack (0 on a CPU: in RUNTIME_BYTES)
    device_total: int
    host_build: int
    host_train: int
    host_save: int


@dataclass
class MemoryPlan:
    total_params: int
    active_params: int
    world_size: int
    ranks_per_node: int
    expert_parallel: int
    precision: str
    device: str
    micro_batch_size: int
    ranks: list[RankPlan]
    checkpoint_bytes: int
    precision_reason: str = "as configured"  # why `precision` (train.precision auto: hardware.resolve_precision's)

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: (r.device_total, r.host_build, r.host_save))

    def node_host_bytes(self, phase: str) -> int:
        """Host memory of the busiest node in `phase` (build, save or train), its ranks' worst plans added up."""
        worst = max(self.ranks, key=lambda r: getattr(r, f"host_{phase}"))
        per_rank = getattr(worst, f"host_{phase}")
        if self.device == "cpu":  # the device is the host: training's memory is there in every phase
            per_rank = max(per_rank, worst.host_train)
        return per_rank * self.ranks_per_node


def make_plan(config, *, world_size: int, ranks_per_node: int, device: str) -> MemoryPlan:
    """The memory plan of a training config (upcycle.train.config.TrainConfig) on `world_size` ranks."""
    loop, seq_len = config.train, config.data.seq_len
    sequences = loop.global_batch_tokens // seq_len
    if sequences % world_size:
        raise UpcycleError(f"train.global_batch_tokens ({loop.global_batch_tokens}) is {sequences} sequences, which "
                           f"{world_size} ranks cannot share evenly; make it a multiple of data.seq_len * ranks")
    micro = micro_batch_size_for(sequences // world_size, loop.micro_batch_size)
    one = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model_config = start_point(config, one, resume_model_config=None).model_config
    precision, precision_reason = loop.precision, "as configured"
    if precision == "auto":
        choice = resolve_precision("auto", torch.device(device), dim=model_config.dim, ffn_dim=model_config.expert_dim)
        precision, precision_reason = choice.precision, choice.reason
        if device == "cpu":
            precision_reason += (f" (this machine's CPU, {torch.get_num_threads()} threads; CPUs of another kind or "
                                 "other thread counts may pick the other: set train.precision to plan for one)")
    check_degree(loop.expert_parallel, world_size=world_size, num_experts=model_config.num_experts)
    small_config, layer_of = representative(model_config)
    with torch.device("meta"):
        model = Transformer(small_config)  # one layer per kind: the rest are counted, not built
    shares = rank_shares(model, world_size=world_size, expert_parallel=loop.expert_parallel, parallel=loop.parallel,
                         replicate=loop.data_parallel_replicate, layer_of=layer_of)
    block_params = [sum(p.numel() for p in block.parameters()) for block in model.layers]
    total_params = model.num_params() - sum(block_params) + sum(block_params[i] for i in layer_of)
    active_params = total_params - (len(model_config.moe_layer_ids) * (model_config.num_experts - model_config.top_k)
                                    * 3 * model_config.dim * model_config.expert_dim if model_config.is_moe else 0)
    compute_bytes = 2 if precision == "bf16" else 4
    values, fp32_values = activation_values(model_config, tokens=micro * seq_len,
                                            checkpointing=loop.activation_checkpointing)
    activations = (values - fp32_values) * compute_bytes + fp32_values * 4
    largest_full = max(p.numel() for p in model.parameters())
    in_flight = 4 * largest_full
    if config.init.source is not None and config.init.method is not None:  # a dense FFN and an expert being made
        in_flight += 4 * 6 * model_config.ffn_dim * model_config.dim
    cuda = device == "cuda"
    host_runtime = RUNTIME_BYTES + (CUDA_HOST_RUNTIME_BYTES if cuda else 0)
    ranks = []
    for share in shares:
        sharded = world_size > 1 and loop.parallel == "fsdp"
        gathered = 0
        if sharded:
            biggest = sorted(share.blocks, reverse=True)[:2]
            gathered = (share.root + sum(biggest)) * compute_bytes + max(share.blocks) * 4
        weights, grads, optimizer = 4 * share.params, 4 * share.params, 8 * share.params
        state = weights + grads + optimizer
        runtime = 0
        if cuda:
            communicators = nccl_communicators(loop, world_size)
            runtime = (CUDA_CONTEXT_BYTES + communicators * NCCL_BYTES_PER_COMMUNICATOR
                       + int(ALLOCATOR_SLACK * (state + gathered + activations)))
        device_total = state + gathered + activations + runtime
        resident = weights if device == "cpu" else 0
        host_build = host_runtime + resident + in_flight
        staged = 12 * share.params if config.checkpoint.async_save else 4 * share.largest_piece
        pinned = staged if cuda and config.checkpoint.async_save else 0  # kept from the first save on
        host_train = host_runtime + (device_total if device == "cpu" else pinned)
        host_save = host_runtime + (state if device == "cpu" else 0) + staged
        ranks.append(RankPlan(share.rank, share.params, weights, grads, optimizer, gathered, activations, runtime,
                              device_total, host_build, host_train, host_save))
    return MemoryPlan(total_params=total_params, active_params=active_params, world_size=world_size,
                      ranks_per_node=ranks_per_node, expert_parallel=loop.expert_parallel, precision=precision,
                      device=device, micro_batch_size=micro, ranks=ranks, checkpoint_bytes=12 * total_params,
                      precision_reason=precision_reason)


def nccl_communicators(loop, world_size: int) -> int:
    """NCCL communicators a rank uses while training: the default group (FSDP2's all-gathers and reduce-scatters, the
    step's all-reduce), with expert parallelism the expert group (its all-to-alls) and, with several replicas, the
    replica group FSDP2 shards the experts over; with HSDP the shard and replicate groups."""
    if world_size == 1:
        return 0
    count = 1
    if loop.expert_parallel > 1:
        count += 1 + (world_size // loop.expert_parallel > 1)
    if loop.data_parallel_replicate > 1:
        count += 2
    return count


def format_plan(plan: MemoryPlan) -> str:
    lines = [f"parameters: {plan.total_params:,} in all, {plan.active_params:,} active per token",
             f"layout: {plan.world_size} rank(s), {plan.ranks_per_node} per node, expert_parallel "
             f"{plan.expert_parallel}, {plan.precision} on {plan.device}, micro-batch {plan.micro_batch_size}",
             f"precision {plan.precision}: {plan.precision_reason}",
             f"checkpoint: {format_bytes(plan.checkpoint_bytes)} on disk (weights + AdamW), each rank writing its "
             "share",
             "", f"{'rank':>5} {'params':>15} {'weights':>11} {'grads':>11} {'AdamW':>11} {'gathered':>11} "
             f"{'activations':>11} {'runtime':>11} {'device':>11} {'host build':>11} {'host train':>11} "
             f"{'host save':>11}"]
    shown = plan.ranks if len(plan.ranks) <= 8 else [*plan.ranks[:2], plan.ranks[-1]]
    if plan.worst not in shown:
        shown.append(plan.worst)
    for r in shown:
        sizes = (r.weights, r.grads, r.optimizer, r.gathered, r.activations, r.runtime, r.device_total, r.host_build,
                 r.host_train, r.host_save)
        lines.append(f"{r.rank:>5} {r.params:>15,} " + " ".join(f"{format_bytes(size):>11}" for size in sizes))
    if len(plan.ranks) > len(shown):
        lines.append(f"  ({len(plan.ranks) - len(shown)} more ranks not shown; the busiest is rank {plan.worst.rank})")
    lines.append("")
    build, train, save = (format_bytes(plan.node_host_bytes(phase)) for phase in ("build", "train", "save"))
    lines.append(f"per node ({plan.ranks_per_node} ranks): host at build {build}, while training {train}, at save "
                 f"{save}")
    if plan.device == "cuda":
        lines.append("runtime and the CUDA host figures are estimates (CUDA context, NCCL buffers, allocator slack, "
                     "the CUDA libraries' host memory), not measured; benchmarks/cuda_path_check.py measures them "
                     "on a GPU")
    return "\n".join(lines)


def check_fits(plan: MemoryPlan, *, device_memory: int | None, host_memory: int | None) -> None:
    """Refuse a plan that cannot fit, naming what to change."""
    fixes = ("more ranks, train.expert_parallel, train.activation_checkpointing: true or a smaller "
             "train.micro_batch_size")
    worst = plan.worst
    if device_memory is not None and plan.device != "cpu" and worst.device_total > device_memory:
        raise UpcycleError(f"rank {worst.rank} needs about {format_bytes(worst.device_total)} of device memory, more "
                           f"than the {format_bytes(device_memory)} of --device-memory; use {fixes}")
    if host_memory is not None:
        for phase in ("build", "train", "save"):
            need = plan.node_host_bytes(phase)
            if need > host_memory:
                raise UpcycleError(f"a node of {plan.ranks_per_node} rank(s) needs about {format_bytes(need)} of host "
                                   f"memory at {phase}, more than the {format_bytes(host_memory)} of --host-memory; "
                                   f"use {fixes}")


def print_plan(train_config: TrainConfig, world_size: int, per_node: int, device: str, device_memory: str | None,
               host_memory: str | None) -> None:
    """`upcycle plan` (commands.plan_command resolves and documents the arguments): print the plan of `train_config`
    for these ranks and refuse one that does not fit the given (or this machine's) memory."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_properties(0).total_memory if device == "cuda" and torch.cuda.is_available() else None
    plan = make_plan(train_config, world_size=world_size, ranks_per_node=per_node, device=device)
    print(format_plan(plan))
    check_fits(plan, device_memory=parse_size(device_memory) if device_memory else gpu,
               host_memory=parse_size(host_memory) if host_memory else hardware.host_memory().total)

