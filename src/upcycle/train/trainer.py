"""`upcycle train`: train a dense or MoE decoder with the Drop-Upcycling recipe, resumably, on 1..N processes.

Run (one process, or torchrun for data parallelism):

    upcycle train --config configs/tiny-moe.yaml --out runs/tiny-moe
    upcycle train --config configs/tiny-moe.yaml --out runs/tiny-moe --optim.lr 1e-3 --train.max_steps 50
    torchrun --nproc_per_node=2 -m upcycle train --config configs/tiny-moe.yaml --out runs/tiny-moe-2

The config (sections, validation, YAML, overrides) lives in `train_config.py`, metrics.jsonl / TensorBoard / the
progress bar in `metrics.py`, checkpoints in `checkpoint.py`. This file is the run: `setup` (output directory, model,
optimizer, data, resume), `train_step` (one optimizer step, returning a `StepRecord`) and the loop in `run_training`.

Per optimizer step: one global batch of `train.global_batch_tokens` tokens is split over ranks, each rank's rows into
micro-batches of `train.micro_batch_size` sequences whose gradients accumulate; the loss of one micro-batch is
    CE + aux_coef * load_balancing + z_coef * router_z
and every micro-batch's gradient is scaled by 1 / micro-batches-per-rank, while data parallelism averages over ranks,
so the update depends only on the global batch, not on how it is split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from upcycle.train import checkpoint as ckpt
from upcycle.data import prepare as data_lib
from upcycle.train import expert_parallel
from upcycle.formats import hf_formats
from upcycle.model import hf as hf_model
from upcycle.train import losses
from upcycle.convert.conversion import lazy_convert, planned_moe_config, router_calibration
from upcycle.data.prepare import METADATA_FILE, MixtureLoader, fingerprint, validation_batches
from upcycle.train.distributed import (
    World,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gradient_sync,
    init_distributed,
    parallelize,
    shutdown,
    unwrap,
)
from upcycle.errors import UpcycleError
from upcycle.files import LockHeld, exclusive_lock, wait_for_file
from upcycle.eval.evaluate import score_domains
from upcycle.train.expert_parallel import check_degree, shard_experts
from upcycle.hardware import host_threads, resolve_precision
from upcycle.train.metrics import MetricsLog
from upcycle.model.moe import MoE
from upcycle.model.transformer import ModelConfig, Transformer
from upcycle.formats.safetensors_io import CheckpointReader
from upcycle.train.schedule import schedule_of
from upcycle.train.shards import fill_from_scratch, model_pieces
from upcycle.formats.tensor_sources import fill_from_sources
from upcycle.train.config import (
    OptimConfig,
    TrainConfig,
    TrainLoopConfig,
    config_to_dict,
    micro_batch_size_for,
    read_yaml_config,
    validate_config,
)

CONFIG_FILE = "config.yaml"
PREPARED_DATA_DIR = "data"
LOCK_FILE = ".lock"
# The running data hash starts from this; two runs that log the same value at a step saw the same tokens in order.
DATA_SHA256_SEED = b"upcycle-data"


class NonFiniteLoss(UpcycleError):
    """The loss or gradient norm became NaN/inf: training stopped without updating or saving."""


# ---------------------------------------------------------------------------------------------------------------------
# Model and optimizer


@dataclass
class StartPoint:
    """Where a run's initial weights come from: the architecture, and how to fill a built (sharded) model's pieces."""

    model_config: ModelConfig
    fill: Callable[..., None] | None  # fills the bare model's pieces; None: a checkpoint resumes


def start_point(config: TrainConfig, world: World, *, resume_model_config: dict | None) -> StartPoint:
    """The architecture and initial weights of a run: from scratch, from a checkpoint (ours or HF), or upcycled online
    from a dense one. Nothing big is read or computed here: each rank later fills only the pieces it holds
    (shards.py), so no rank ever holds the whole model.

    When resuming, the architecture is read from the checkpoint and the initial weights are skipped (the checkpoint
    overwrites them), so an online upcycling is not redone on every restart. Otherwise the model section's routing
    fields (with init.source) replace the checkpoint's, and train.bias_update_rate > 0 gives an MoE that has no
    balancing bias yet one that starts at zero.
    """
    if resume_model_config is not None:
        return StartPoint(ModelConfig(**resume_model_config), None)
    start = _initial_weights(config, world)
    changes = dict(config.model_routing or {})
    new_bias = (config.train.bias_update_rate > 0 and start.model_config.is_moe
                and not start.model_config.expert_bias)
    if new_bias:
        changes["expert_bias"] = True
    model_config = dataclasses.replace(start.model_config, **changes)
    if not new_bias or config.init.source is None:  # from scratch: the init plan already zeros the bias
        return StartPoint(model_config, start.fill)
    names = [f"layers.{i}.{hf_model.OUR_EXPERT_BIAS}" for i in model_config.moe_layer_ids]

    def fill_with_zero_bias(model: torch.nn.Module) -> None:
        start.fill(model, absent=names)
        pieces = model_pieces(model)
        for name in names:
            pieces[name].local.zero_()

    return StartPoint(model_config, fill_with_zero_bias)


def _initial_weights(config: TrainConfig, world: World) -> StartPoint:
    """start_point's architecture and weights as the model section or init.source give them. A checkpoint's fill takes
    `absent`: names of the model's (buffers) that the checkpoint does not hold, left for the caller to fill."""
    if config.init.source is None:
        model_config = dataclasses.replace(config.model)
        std = model_config.init_std

        def from_scratch(model: torch.nn.Module) -> None:
            torch.manual_seed(config.train.seed)  # every rank draws the same full tensors and keeps its piece
            fill_from_scratch(model_pieces(model), model.init_plan(), std=std)

        return StartPoint(model_config, from_scratch)
    init = config.init

    def from_sources(sources: dict) -> Callable[..., None]:
        def fill(model: torch.nn.Module, absent: list[str] = ()) -> None:
            pieces = {name: piece for name, piece in model_pieces(model).items() if name not in absent}
            fill_from_sources(pieces, sources)
        return fill

    if init.method is None and hf_model.is_our_checkpoint(init.source):
        return StartPoint(ModelConfig(**ckpt.model_config_of(init.source)),
                          lambda model, absent=(): ckpt.load_model_weights(init.source, model, world, absent=absent))
    if init.method is None:
        reader = CheckpointReader(init.source)
        model_config, sources = hf_model.hf_sources(reader, reader.config)
        return StartPoint(model_config, from_sources(sources))

    options = dataclasses.asdict(init.convert_options())
    if options["dtype"] == "auto":  # training keeps fp32 master weights: no rounding to the source's dtype
        options["dtype"] = "float32"
    moe_config, live_shared = planned_moe_config(init.source, **options)
    fields = hf_formats.read_model_fields(moe_config)
    if live_shared:
        fields["shared_expert_dim"] = hf_formats.shared_expert_dim(moe_config)
    model_config = ModelConfig(**fields)

    def upcycled(model: torch.nn.Module, absent: list[str] = ()) -> None:
        # --router-init data runs the dense model once (rank 0) and every rank uses its router rows
        router_rows = broadcast_object(router_calibration(init.source, **options) if world.is_main else None, world)
        moe_config, lazy = lazy_convert(init.source, router_rows=router_rows, **options)
        converted, sources = hf_model.hf_sources(lazy, moe_config)
        assert converted == model_config, (converted, model_config)
        from_sources(sources)(model, absent)

    return StartPoint(model_config, upcycled)


def build_model(model_config: ModelConfig, loop: TrainLoopConfig, world: World,
                fill: Callable[..., None] | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to train, the bare model inside it): built on the meta device, wrapped (activation checkpointing,
    torch.compile), split (expert parallelism) and sharded (FSDP2) there, then each rank allocates only its own pieces
    on its device and `fill` fills them. No rank ever holds the whole model, and on CUDA the full model never sits on
    one device. DDP wraps a filled model (it broadcasts rank 0's weights when it starts)."""
    check_degree(loop.expert_parallel, world_size=world.world_size, num_experts=model_config.num_experts)
    torch.manual_seed(loop.seed)
    with torch.device("meta"):
        model = Transformer(model_config)
    bare = model
    if loop.activation_checkpointing:
        _apply_activation_checkpointing(model)
    if loop.compile:
        for block in model.layers:
            block.compile()
    if loop.expert_parallel > 1:
        shard_experts(model, loop.expert_parallel, world)
    if loop.parallel == "fsdp":
        model = parallelize(model, bare.layers, mode="fsdp", world=world, precision=loop.precision,
                            replicate=loop.data_parallel_replicate)
    model.to_empty(device=world.device)
    bare.init_rope()
    if fill is not None:
        with host_threads(world.local_world_size if world.distributed else 1):
            fill(bare)
    if loop.parallel == "ddp":
        model = parallelize(model, bare.layers, mode="ddp", world=world, precision=loop.precision)
    return model, bare


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over every parameter (the paper decays all of them, norms and embeddings included).

    fused=True: one kernel per parameter instead of a chain of foreach ops; on CPU it made the optimizer step ~4x
    faster (18M parameters: 67 ms -> 16 ms), about 7% of a whole training step of a small model.
    With expert parallelism the expert shards, DTensors on a device mesh of their own, get a param group of their own
    with the same settings (one fused kernel cannot mix meshes); checkpoints store one group either way.
    """
    experts = expert_parallel.find(model)
    params = model.parameters() if experts is None else [{"params": experts.others(model)},
                                                        {"params": list(experts.params.values())}]
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=True)


def _apply_activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    # Per block: the block's inputs are kept, everything inside is recomputed in backward. The wrapper's prefix is
    # stripped from state-dict names by torch.distributed.checkpoint.state_dict, so checkpoints are unaffected.
    for index, block in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


# ---------------------------------------------------------------------------------------------------------------------
# One step


def loss_parts(output, labels_BT: torch.Tensor, loop: TrainLoopConfig, top_k: int,
               global_counts_LE: torch.Tensor | None = None, activation: str = "softmax") -> dict[str, torch.Tensor]:
    """{"loss", "ce", "aux", "z"} of one micro-batch: loss = ce + aux_coef * aux + z_coef * z. With
    `global_counts_LE` (balance_scope global_batch) the load-balancing loss takes f from the whole global batch; with
    balance_scope sequence it is DeepSeek-V3's sequence-wise loss. `activation`: the routers'."""
    ce = losses.cross_entropy(logits_BTV=output.logits, labels_BT=labels_BT)
    zero = ce.new_zeros(())
    if output.router_logits:
        if loop.balance_scope == "sequence":
            aux = losses.sequence_balancing_loss(router_logits=output.router_logits, top_k=top_k,
                                                 sequences=labels_BT.shape[0], per_layer=loop.aux_per_layer,
                                                 activation=activation)
        else:
            aux = losses.load_balancing_loss(router_logits=output.router_logits, top_k=top_k,
                                             per_layer=loop.aux_per_layer, global_counts_LE=global_counts_LE,
                                             activation=activation)
        z = losses.router_z_loss(router_logits=output.router_logits)
    else:
        aux, z = zero, zero
    # z-loss costs a logsumexp even with z_coef 0; it is kept for the log (routers drifting to large logits show).
    total = ce + loop.aux_coef * aux + (loop.z_coef * z if loop.z_coef else zero)
    return {"loss": total, "ce": ce, "aux": aux, "z": z}


def _global_assignment_counts(model: torch.nn.Module, micro_batches, *, top_k: int, activation: str, autocast,
                              world: World | None) -> torch.Tensor:
    """balance_scope global_batch: the (L, E) expert assignment counts of every micro-batch of every rank, before any
    backward. Routing in layer l depends on every layer below it, so the counts need a forward pass; it runs without
    gradients, over the same weights and inputs as the training forward, so it routes identically."""
    counts_LE = None
    with torch.no_grad(), autocast():
        for micro_BT in micro_batches:
            counts = losses.assignment_counts(router_logits=model(micro_BT[:, :-1]).router_logits, top_k=top_k,
                                              activation=activation)
            counts_LE = counts if counts_LE is None else counts_LE + counts
    return counts_LE if world is None else all_reduce_sum(counts_LE, world)


def forward_backward(model: torch.nn.Module, batch_BT: torch.Tensor, *, loop: TrainLoopConfig, top_k: int,
                     num_moe: int, num_experts: int, autocast, world: World | None = None,
                     activation: str = "softmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward and backward over this rank's rows of one global batch, in micro-batches of loop.micro_batch_size.

    Gradients accumulate in the parameters, each micro-batch's scaled by 1 / micro-batches so they average; the
    gradient reduction across ranks happens once, on the last micro-batch. Returns the mean [loss, ce, aux, z] over the
    micro-batches (fp64, detached), the summed expert counts (L_moe, E) the routers chose, and of those the summed
    counts the capacity factor dropped (None when dropless). With loop.balance_scope global_batch the
    load-balancing loss uses the assignment counts of the whole global batch (summed over `world`'s ranks): from a
    gradient-free forward pass first when this rank has several micro-batches, from the training forward itself when
    it has one. `activation`: the routers' (model.router_activation).
    """
    micro_batches = batch_BT.split(loop.micro_batch_size)
    global_scope = num_moe > 0 and loop.balance_scope == "global_batch"
    global_counts_LE = None
    if global_scope and len(micro_batches) > 1:
        global_counts_LE = _global_assignment_counts(model, micro_batches, top_k=top_k, activation=activation,
                                                     autocast=autocast, world=world)
    sums = torch.zeros(4, dtype=torch.float64, device=batch_BT.device)
    counts_LE = torch.zeros(num_moe, max(num_experts, 1), dtype=torch.float64, device=batch_BT.device)
    dropped_LE = None
    for index, micro_BT in enumerate(micro_batches):
        with gradient_sync(model, index == len(micro_batches) - 1), autocast():
            output = model(micro_BT[:, :-1])
            if global_scope and len(micro_batches) == 1:  # the only forward of this rank: its counts suffice
                global_counts_LE = losses.assignment_counts(router_logits=output.router_logits, top_k=top_k,
                                                            activation=activation)
                if world is not None:
                    all_reduce_sum(global_counts_LE, world)
            parts = loss_parts(output, micro_BT[:, 1:], loop, top_k, global_counts_LE, activation)
        (parts["loss"] / len(micro_batches)).backward()
        sums += torch.stack([parts[k].detach().double() for k in ("loss", "ce", "aux", "z")])
        if output.expert_counts is not None:
            counts_LE += output.expert_counts.double()
        if output.dropped_counts is not None:
            dropped_LE = output.dropped_counts.double() + (0 if dropped_LE is None else dropped_LE)
    return sums / len(micro_batches), counts_LE, dropped_LE


# A step is a spike when its gradient norm exceeds GRAD_SPIKE_FACTOR times, or its loss LOSS_SPIKE_FACTOR times, the
# median of the last HEALTH_WINDOW healthy steps (judged once at least HEALTH_MIN_HISTORY of them are known).
HEALTH_WINDOW, HEALTH_MIN_HISTORY = 50, 10
GRAD_SPIKE_FACTOR, LOSS_SPIKE_FACTOR = 10.0, 2.0


def health_problem(loss: float, grad_norm: float, history: list[tuple[float, float]]) -> str | None:
    """What is wrong with a step's loss and gradient norm (non-finite, or a spike against the running medians of the
    healthy steps in `history`), or None when they look sane."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"non-finite loss {loss} or gradient norm {grad_norm}"
    if len(history) < HEALTH_MIN_HISTORY:
        return None
    median_loss = statistics.median(pair[0] for pair in history)
    median_grad = statistics.median(pair[1] for pair in history)
    if grad_norm > GRAD_SPIKE_FACTOR * median_grad:
        return f"gradient norm {grad_norm:.4g} above {GRAD_SPIKE_FACTOR:g}x the running median {median_grad:.4g}"
    if loss > LOSS_SPIKE_FACTOR * median_loss:
        return f"loss {loss:.4g} above {LOSS_SPIKE_FACTOR:g}x the running median {median_loss:.4g}"
    return None


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """The global gradient norm before clipping, every gradient scaled down to `max_norm` where it exceeds it. Under
    expert parallelism the expert gradients' average is completed first and the norm spans both meshes."""
    experts = expert_parallel.find(model)
    if experts is None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # Under FSDP2 the norm is a DTensor; full_tensor() makes it the same replicated number on every rank.
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    expert_parallel.finish_expert_grads(experts)
    return expert_parallel.clip_grad_norm(model, max_norm, experts)


def expert_load(counts_LE: torch.Tensor, dropped_LE: torch.Tensor | None = None,
                bias_LE: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Per MoE layer, the largest and smallest share of the step's top-k assignments (uniform = 1/E); with a capacity
    factor the share of them dropped (`dropped`), with a balancing bias its smallest and largest value after the
    step (`bias_min`, `bias_max`)."""
    totals_L1 = counts_LE.double().sum(dim=-1, keepdim=True).clamp_min(1)
    shares_LE = counts_LE.double() / totals_L1
    load = {"max_share": [round(v, 5) for v in shares_LE.max(dim=-1).values.tolist()],
            "min_share": [round(v, 5) for v in shares_LE.min(dim=-1).values.tolist()]}
    if dropped_LE is not None:
        load["dropped"] = [round(v, 5) for v in (dropped_LE.double().sum(dim=-1) / totals_L1[:, 0]).tolist()]
    if bias_LE is not None:
        load["bias_min"] = [round(v, 6) for v in bias_LE.min(dim=-1).values.tolist()]
        load["bias_max"] = [round(v, 6) for v in bias_LE.max(dim=-1).values.tolist()]
    return load


def expert_biases(model: torch.nn.Module) -> list[torch.Tensor]:
    """The balancing bias (E,) of every MoE layer that has one, in layer order (the live buffers)."""
    return [module.expert_bias_E for module in unwrap(model).modules()
            if isinstance(module, MoE) and module.expert_bias_E is not None]


@torch.no_grad()
def update_expert_biases(model: torch.nn.Module, counts_LE: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing after an optimizer step (losses.expert_bias_step): every rank moves its
    copy of each bias by the same amount, computed from the same all-reduced counts of the whole global batch."""
    for bias_E, step_E in zip(expert_biases(model), losses.expert_bias_step(counts_LE=counts_LE, rate=rate)):
        bias_E.add_(step_E.to(bias_E.device))


def next_data_sha256(previous: str, batch_BT: torch.Tensor, world: World) -> str:
    """The running hash of every token consumed, after this step's global batch: each row's digest, gathered from all
    ranks in global row order, so the value depends on the tokens and their order only, not on how many ranks read
    them (a collective when distributed)."""
    import torch.distributed as dist

    digests_B32 = torch.tensor([list(hashlib.sha256(row.tobytes()).digest()) for row in batch_BT.numpy()],
                               dtype=torch.uint8).reshape(-1, 32)
    if world.distributed:  # on the CPU, over the host group: no device copy, no device synchronization
        parts = [torch.empty_like(digests_B32) for _ in range(world.world_size)]
        dist.all_gather(parts, digests_B32, group=world.host_group)
        digests_B32 = torch.cat(parts)
    return hashlib.sha256(previous.encode() + digests_B32.numpy().tobytes()).hexdigest()


@dataclass
class StepRecord:
    """What one optimizer step reports (averaged over the whole global batch)."""

    step: int  # optimizer steps done, 1-based
    loss: float
    ce: float
    aux: float
    z: float
    lr: float
    grad_norm: float  # global norm before clipping
    tokens: int  # tokens trained on so far
    step_time_s: float
    data_sha256: str  # running hash of every token consumed so far
    precision: str  # what train.precision resolved to on this device
    expert_load: dict | None  # MoE only
    stop_requested: bool  # some rank got SIGTERM

    def to_json(self) -> dict[str, Any]:
        record = {"step": self.step, "loss": self.loss, "ce": self.ce, "aux": self.aux, "z": self.z, "lr": self.lr,
                  "grad_norm": self.grad_norm, "tokens": self.tokens,
                  "tokens_per_s": self.tokens / self.step / self.step_time_s if self.step_time_s else 0.0,
                  "step_time_s": self.step_time_s, "data_sha256": self.data_sha256, "precision": self.precision}
        if self.expert_load is not None:
            record["expert_load"] = self.expert_load
        return record


@dataclass
class Run:
    """Everything a started run holds between steps."""

    config: TrainConfig  # with config.train's "auto" settings resolved for this world (precision, micro-batch)
    config_dict: dict  # the config as given (OUT/config.yaml), "auto" kept
    out: Path
    world: World
    model: torch.nn.Module
    model_config: ModelConfig
    optimizer: torch.optim.Optimizer
    loader: Any  # data.MixtureLoader
    val_sets: dict[str, list[torch.Tensor]]
    autocast: Callable
    start_step: int
    data_sha256: str
    checkpointer: ckpt.Checkpointer
    data_fingerprint: str  # data.fingerprint of the prepared data: resuming on re-prepared data is refused
    lock: IO | None = None  # rank 0: the held OUT/.lock
    # (loss, grad norm) of the latest healthy steps, the reference for spotting a spike; carried in checkpoints
    health_history: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    unverified: Path | None = None  # the newest checkpoint, until the step after it says whether it is healthy

    @property
    def checkpoints(self) -> Path:
        return self.out / ckpt.CHECKPOINT_DIR


def train_step(run: Run, step: int, *, stop: _StopRequest) -> StepRecord:
    """Optimizer step `step` (0-based): one global batch forward/backward, gradient clipping, the update.

    Raises NonFiniteLoss before the update when the loss or gradient norm is NaN/inf (nothing is changed then).
    """
    config, world = run.config, run.world
    started = time.perf_counter()
    lr = schedule_of(config)(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batch_BT = run.loader.next_batch()
    run.data_sha256 = next_data_sha256(run.data_sha256, batch_BT, world)
    mc = run.model_config
    num_moe = len(mc.moe_layer_ids)
    sums, counts_LE, dropped_LE = forward_backward(
        run.model, to_device(batch_BT, world.device), loop=config.train, top_k=mc.top_k, num_moe=num_moe,
        num_experts=mc.num_experts, autocast=run.autocast, world=world, activation=mc.router_activation)
    # SIGTERM on some rank, and a checkpoint write that failed on some rank, travel with the step's sums, so every
    # rank acts on them at the same step
    flags = torch.tensor([1.0 if stop.signal_name else 0.0, 1.0 if run.checkpointer.failed() else 0.0],
                         dtype=torch.float64, device=world.device)
    parts = [sums, counts_LE.flatten(), *([] if dropped_LE is None else [dropped_LE.flatten()]), flags]
    reduced = all_reduce_sum(torch.cat(parts), world)
    if reduced[-1] > 0:
        run.checkpointer.finish()  # raises the failure on every rank
    loss, ce, aux, z = (reduced[:4] / world.world_size).tolist()
    counts_LE = reduced[4:4 + counts_LE.numel()].view_as(counts_LE)  # the whole global batch's
    if dropped_LE is not None:
        dropped_LE = reduced[4 + counts_LE.numel():-2].view_as(counts_LE)

    max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    grad_norm = clip_gradients(run.model, max_norm)
    unhealthy = health_problem(loss, grad_norm, run.health_history)
    if run.unverified is not None and world.is_main:  # this step tested the newest checkpoint's weights
        run.checkpointer.mark_health(run.unverified, ckpt.HEALTH_SUSPECT if unhealthy else ckpt.HEALTH_GOOD,
                                     f"step {step + 1}: {unhealthy}" if unhealthy else None)
    run.unverified = None
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        good = ckpt.last_good_checkpoint(run.checkpoints)
        raise NonFiniteLoss(
            f"loss became non-finite at step {step + 1} (loss={loss}, ce={ce}, aux={aux}, z={z}, "
            f"grad_norm={grad_norm}); stopped before the update, nothing saved. Last good checkpoint: "
            f"{good if good else 'none'} (the newest whose next step had a finite loss and gradient norm without a "
            "spike). Lower optim.lr, raise schedule.warmup_steps, keep optim.grad_clip > 0, or train in fp32; "
            "re-running resumes from the newest checkpoint not marked suspect")
    if unhealthy is None:
        run.health_history = [*run.health_history, (loss, grad_norm)][-HEALTH_WINDOW:]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if config.train.bias_update_rate and num_moe:
        update_expert_biases(run.model, counts_LE, config.train.bias_update_rate)
    biases = expert_biases(run.model)
    return StepRecord(step=step + 1, loss=loss, ce=ce, aux=aux, z=z, lr=lr, grad_norm=grad_norm,
                      tokens=(step + 1) * config.train.global_batch_tokens,
                      step_time_s=time.perf_counter() - started, data_sha256=run.data_sha256,
                      precision=config.train.precision,
                      expert_load=expert_load(counts_LE, dropped_LE, torch.stack(biases) if biases else None)
                      if num_moe else None,
                      stop_requested=bool(reduced[-2] > 0))


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The batch on the training device: to a GPU through page-locked memory without blocking the host (the copy is
    ordered on the stream before the forward that reads it); on a CPU as it is."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def validation_loss(run: Run) -> dict[str, float]:
    """Per-domain mean next-token loss on the fixed validation sequences, through `upcycle eval`'s scoring.

    Each rank scores the whole (small, fixed) validation set: FSDP needs every rank to run the same number of forwards.
    """
    run.model.eval()
    try:
        results = score_domains(run.model, run.val_sets, device=run.world.device, autocast=run.autocast)
    finally:
        run.model.train()
    return {name: r["loss"] for name, r in results.items() if r["loss"] is not None}


def save(run: Run, record: StepRecord) -> Path:
    """Checkpoint after `record`'s step; it stays unverified until the next step has tested its weights."""
    trainer_state = {"tokens": record.tokens, "data": run.loader.state_dict(), "data_sha256": run.data_sha256,
                     "loss": record.loss, "grad_norm": record.grad_norm, "precision": record.precision,
                     "health_history": [list(pair) for pair in run.health_history]}
    trainer_state["data_fingerprint"] = run.data_fingerprint
    run.unverified = run.checkpointer.save(
        record.step, model=run.model, optimizer=run.optimizer, model_config=dataclasses.asdict(run.model_config),
        trainer_state=trainer_state, train_config=run.config_dict)
    return run.unverified


# ---------------------------------------------------------------------------------------------------------------------
# Set-up


def _read_saved_config(out: Path) -> dict | None:
    path = out / CONFIG_FILE
    return read_yaml_config(path) if path.is_file() else None


def _check_resume_compatible(saved: dict, current: dict) -> None:
    """Sections that decide what the checkpoint's numbers mean must not change between a run and its resumption."""
    for section in ("model", "init", "data"):
        if saved.get(section) != current.get(section):
            changed = sorted(k for k in set(saved.get(section) or {}) | set(current.get(section) or {})
                             if (saved.get(section) or {}).get(k) != (current.get(section) or {}).get(k))
            raise UpcycleError(f"OUT already holds a run whose config differs in {section}."
                               f"{changed[0] if changed else ''}; resuming needs the same model, init and data "
                               "sections (use a new --out for a different run)")


def _prepare_data(config: TrainConfig, out: Path, world: World) -> Path:
    """The prepared data directory: data.path, or data.sources tokenized once into OUT/data (rank 0; others wait)."""
    if config.data.path is not None:
        return Path(config.data.path)
    target = out / PREPARED_DATA_DIR
    if world.is_main and not (target / data_lib.METADATA_FILE).is_file():
        sources = {name: [paths] if isinstance(paths, str) else list(paths)
                   for name, paths in config.data.sources.items()}
        data_lib.prepare(sources, target, config.data.tokenizer, val_fraction=config.data.val_fraction,
                         seed=config.data.seed, force=True, progress=False)
    barrier(world)  # on the host group, whose timeout allows for tokenizing
    if not world.is_main and not wait_for_file(target / data_lib.METADATA_FILE):
        raise UpcycleError(f"rank {world.rank} cannot see {target / data_lib.METADATA_FILE}, which rank 0 wrote; "
                           "every rank must see the same --out (a shared file system)")
    return target


def resolve_loop(config: TrainConfig, world: World) -> TrainLoopConfig:
    """config.train with its micro_batch_size decided for this world (train.precision is decided once the model's
    width is known: resolve_run_precision). Raises when the global batch cannot be split evenly over the ranks."""
    loop, seq_len, ranks = config.train, config.data.seq_len, world.world_size
    sequences = loop.global_batch_tokens // seq_len
    if sequences % ranks:
        raise UpcycleError(f"train.global_batch_tokens ({loop.global_batch_tokens}) is {sequences} sequences of "
                           f"data.seq_len {seq_len}, which {ranks} ranks cannot share evenly; make it a multiple of "
                           f"data.seq_len * ranks = {seq_len * ranks}")
    per_rank = sequences // ranks
    if loop.micro_batch_size is not None and per_rank % loop.micro_batch_size:
        raise UpcycleError(f"train.micro_batch_size {loop.micro_batch_size} does not divide the {per_rank} sequences "
                           f"each of {ranks} ranks gets per step; leave it empty (null: auto) or make "
                           f"train.global_batch_tokens a multiple of data.seq_len * micro_batch_size * ranks = "
                           f"{seq_len * loop.micro_batch_size * ranks}")
    return dataclasses.replace(loop, micro_batch_size=micro_batch_size_for(per_rank, loop.micro_batch_size))


def resolve_run_precision(loop: TrainLoopConfig, model_config: ModelConfig, world: World,
                          log: Callable[[str], None]) -> TrainLoopConfig:
    """loop with train.precision decided by rank 0 for this model's width (hardware.resolve_precision: `auto` probes a
    CPU with native bf16) and used by every rank. Logged once: what `auto` chose and why; for an explicit choice, only
    the probe's warning where there is one (with the measurement behind it), so a run as configured prints nothing."""
    choice = None
    if world.is_main:
        choice = resolve_precision(loop.precision, world.device, dim=model_config.dim, ffn_dim=model_config.expert_dim)
    choice = broadcast_object(choice, world)
    if loop.precision == "auto" or choice.warning:
        log(f"precision {choice.precision} ({loop.precision}): {choice.reason}")
    if choice.warning:
        log(f"warning: {choice.warning}")
    return dataclasses.replace(loop, precision=choice.precision)


def set_tf32(loop: TrainLoopConfig, device: torch.device, log: Callable[[str], None]) -> bool:
    """On CUDA in fp32 with train.tf32: fp32 matmuls and convolutions on TF32 tensor cores (logged). Returns whether
    TF32 is on."""
    enabled = device.type == "cuda" and loop.precision == "fp32" and loop.tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        if enabled:
            log("fp32 matmuls use TF32 tensor cores (train.tf32: true; false keeps full fp32 products)")
    return enabled


def layout_warnings(loop: TrainLoopConfig, world: World) -> list[str]:
    """What in the parallel layout will be slow on this cluster: an expert-parallel group or an FSDP shard group that
    spans nodes sends every MoE layer's tokens, or every block's all-gather, over the inter-node network."""
    warnings = []
    per_node = world.local_world_size
    if world.nodes > 1 and loop.expert_parallel > per_node:
        warnings.append(f"train.expert_parallel {loop.expert_parallel} is more than the {per_node} ranks of a node: "
                        "every MoE layer's all-to-all crosses nodes; keep it at most the ranks per node")
    if world.nodes > 1 and loop.parallel == "fsdp" and world.world_size // loop.data_parallel_replicate > per_node:
        warnings.append(f"FSDP shards over {world.world_size // loop.data_parallel_replicate} ranks across "
                        f"{world.nodes} nodes: every block's all-gather and reduce-scatter crosses nodes; set "
                        f"train.data_parallel_replicate: {world.nodes} (HSDP: shard within a node, replicate across "
                        "nodes) where a node's memory holds the model's share")
    return warnings


def _check_out(out: Path, config_dict: dict) -> None:
    """OUT is new, empty, or a run of this same model/init/data (to resume); checked before anything is written."""
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out {out} exists and is not a directory; choose a new or empty directory")
    saved = _read_saved_config(out)
    if saved is None and out.exists() and any(p.name not in (LOCK_FILE, PREPARED_DATA_DIR) for p in out.iterdir()):
        raise UpcycleError(f"--out {out} exists and is not a training directory (no {CONFIG_FILE}); "
                           "choose a new or empty directory")
    if saved is not None:
        _check_resume_compatible(saved, config_dict)


def _check_data(config: TrainConfig, data_dir: Path | None, model_config: ModelConfig) -> None:
    """The data fits the model (data.check_data_fits): the prepared files, or before raw sources are tokenized, the
    tokenizer's vocabulary."""
    data_lib.check_data_fits(data_dir, vocab_size=model_config.vocab_size, max_seq_len=model_config.max_seq_len,
                             seq_len=config.data.seq_len, seq_len_name="data.seq_len", tokenizer=config.data.tokenizer,
                             tokenizer_name="data.tokenizer")


def _lock_out(out: Path, world: World) -> IO | None:
    """Hold OUT for this run (rank 0 takes an exclusive lock on OUT/.lock, released when the process ends), so a second
    trainer on the same OUT is refused instead of deleting this one's checkpoints. Returns the lock's file (rank 0)."""
    handle, refusal = None, None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            handle, unlocked = exclusive_lock(out / LOCK_FILE)
        except LockHeld as held:
            refusal = (f"--out {out} is in use by another `upcycle train` (pid {held.holder}); wait for it to end or "
                       "stop it, or choose another --out")
        else:
            if unlocked is not None:  # a file system without locks (Lustre without flock: ENOSYS; NFSv3: ENOLCK)
                print(f"upcycle train: warning: cannot lock {out / LOCK_FILE} ({unlocked.strerror}); OUT is not "
                      "protected against a second trainer, so start only one run on it", file=sys.stderr)
    refusal = broadcast_object(refusal, world)
    if refusal:
        raise UpcycleError(refusal)
    return handle


@contextlib.contextmanager
def _out_of_memory_named(world: World):
    """A model (or its optimizer) that cannot be allocated on this rank becomes one line naming the way to size it,
    instead of an allocator traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        what = str(error).strip().splitlines()[0]
        raise UpcycleError(f"rank {world.rank} ran out of memory building the model and optimizer ({what}); size the "
                           "run with `upcycle plan --config CONFIG`, then use more ranks, train.expert_parallel or a "
                           "smaller model") from None


def setup(config: TrainConfig, out: Path, world: World) -> Run:
    """Check everything (output directory, model, data), lock OUT, then prepare raw data, build the model sharded on
    every rank, the optimizer and loaders, restore the newest resumable checkpoint and write OUT/config.yaml. A refusal
    or failure before that leaves a new OUT as it was (removed)."""

    config_dict = config_to_dict(config)
    config = dataclasses.replace(config, train=resolve_loop(config, world))
    _check_out(out, config_dict)
    created = not out.exists()
    lock = _lock_out(out, world)
    try:
        run = _start(config, config_dict, out, world)
    except BaseException:
        if created and world.is_main:
            shutil.rmtree(out, ignore_errors=True)
        if lock is not None:
            lock.close()
        raise
    run.lock = lock
    if world.is_main and not (out / CONFIG_FILE).is_file():
        (out / CONFIG_FILE).write_text(yaml.safe_dump(config_dict, sort_keys=False))
    return run


def _start(config: TrainConfig, config_dict: dict, out: Path, world: World) -> Run:
    loop, data_cfg = config.train, config.data
    log = (lambda message: print(f"upcycle train: {message}", file=sys.stderr)) if world.is_main else (lambda m: None)
    resume_from = ckpt.resumable_checkpoint(out / ckpt.CHECKPOINT_DIR, world, log)
    start = start_point(config, world, resume_model_config=(ckpt.model_config_of(resume_from)
                                                            if resume_from is not None else None))
    model_config = start.model_config
    loop = resolve_run_precision(loop, model_config, world, log)
    config = dataclasses.replace(config, train=loop)
    set_tf32(loop, world.device, log)
    for warning in layout_warnings(loop, world):
        log(f"warning: {warning}")
    prepared = Path(data_cfg.path) if data_cfg.path is not None else out / PREPARED_DATA_DIR
    _check_data(config, prepared if (prepared / METADATA_FILE).is_file() else None, model_config)
    data_dir = _prepare_data(config, out, world)
    if data_cfg.path is None:
        _check_data(config, data_dir, model_config)  # the freshly tokenized files
    data_fingerprint = fingerprint(data_dir)
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from).get("data_fingerprint")
        if saved is not None and saved != data_fingerprint:
            raise UpcycleError(f"the prepared data in {data_dir} changed since {resume_from} was written (re-prepared "
                               "in place?); resuming would continue on other text. Restore the data, or start a new "
                               "run with a new --out")

    with _out_of_memory_named(world):
        model, _ = build_model(model_config, loop, world, start.fill)
        experts = expert_parallel.find(model)
        if experts is not None:
            log(experts.describe())
        optimizer = build_optimizer(model, config.optim)
    loader = MixtureLoader(data_dir, seq_len=data_cfg.seq_len,
                           global_batch_size=loop.global_batch_tokens // data_cfg.seq_len, seed=data_cfg.seed,
                           weights=data_cfg.weights, rank=world.rank, world_size=world.world_size)
    val_sets = validation_batches(data_dir, seq_len=data_cfg.seq_len, batch_size=loop.micro_batch_size,
                                  max_sequences=loop.eval_sequences) if loop.eval_every else {}
    autocast = (lambda: torch.autocast(world.device.type, dtype=torch.bfloat16)) if loop.precision == "bf16" \
        else contextlib.nullcontext
    checkpointer = ckpt.Checkpointer(out / ckpt.CHECKPOINT_DIR, world, keep=config.checkpoint.keep,
                                     asynchronous=config.checkpoint.async_save)
    run = Run(config=config, config_dict=config_dict, out=out, world=world, model=model,
              model_config=model_config, optimizer=optimizer, loader=loader, val_sets=val_sets, autocast=autocast,
              start_step=0, data_sha256=hashlib.sha256(DATA_SHA256_SEED).hexdigest(), checkpointer=checkpointer,
              data_fingerprint=data_fingerprint)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, world=world)
        loader.load_state_dict(state["data"])
        run.start_step = int(state["step"])
        run.data_sha256 = state.get("data_sha256", run.data_sha256)
        run.health_history = [tuple(pair) for pair in state.get("health_history", [])]
        if state.get("health") == ckpt.HEALTH_UNVERIFIED:
            run.unverified = resume_from
        log(f"resuming from {resume_from} (step {run.start_step}, written by {state.get('world_size', 1)} rank(s))")
    return run


# ---------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _StopRequest:
    """Set by the SIGTERM handler; checked between optimizer steps (never mid-step, so state stays consistent)."""

    signal_name: str | None = None


@contextlib.contextmanager
def _sigterm_sets(stop: _StopRequest):
    def handler(signum, _frame):
        stop.signal_name = signal.Signals(signum).name

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a worker thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_training(config: TrainConfig, out: str | Path) -> dict:
    """Train according to `config` into directory `out`, resuming from its newest checkpoint if it has one.

    Returns {"step": last step done, "stopped": "max_steps" or "SIGTERM", "checkpoint": newest checkpoint path}.
    Raises UpcycleError for bad input, and NonFiniteLoss (an UpcycleError) when the loss diverges; completed
    checkpoints are never touched then.
    """
    validate_config(config)
    out = Path(out)
    world = init_distributed(timeout_s=config.train.collective_timeout_s,
                             host_timeout_s=config.train.host_timeout_s)
    run = None
    try:
        run = setup(config, out, world)
        return _loop(run)
    finally:
        if run is not None and run.lock is not None:
            run.lock.close()
        shutdown(world)


def _loop(run: Run) -> dict:
    config, world = run.config, run.world
    loop = config.train
    if run.start_step >= loop.max_steps and world.is_main:
        print(f"upcycle train: already at train.max_steps={loop.max_steps}; nothing to do", file=sys.stderr)
    stop = _StopRequest()
    step = run.start_step
    stopped = "max_steps"
    run.model.train()
    with MetricsLog(run.out, enabled=world.is_main, start_step=run.start_step, max_steps=loop.max_steps,
                    progress=config.logging.progress, tensorboard=config.logging.tensorboard,
                    wandb=config.logging.wandb, config=run.config_dict) as metrics, \
            _sigterm_sets(stop):
        try:
            for step in range(run.start_step + 1, loop.max_steps + 1):
                record = train_step(run, step - 1, stop=stop)
                line = record.to_json()
                if loop.eval_every and (step % loop.eval_every == 0 or step == loop.max_steps):
                    line["val"] = validation_loss(run)
                metrics.log(line)
                every = config.checkpoint.every
                if step == loop.max_steps or record.stop_requested or (every and step % every == 0):
                    save(run, record)
                run.checkpointer.poll()
                if record.stop_requested:
                    stopped = "SIGTERM"
                    if world.is_main:
                        print(f"upcycle train: SIGTERM received; saved checkpoint at step {step}, exiting",
                              file=sys.stderr)
                    break
        except NonFiniteLoss:  # every rank stops here together: the checkpoint in flight still lands
            run.checkpointer.finish()
            raise
        run.checkpointer.finish()
    newest = ckpt.latest_checkpoint(run.checkpoints)
    return {"step": step, "stopped": stopped, "checkpoint": str(newest) if newest else None}
