"""`upcycle train`: train a dense or MoE decoder with the Drop-Upcycling recipe, resumably, on 1..N processes.

Run (one process, or torchrun for data parallelism; `python -m upcycle.train` takes the same flags):

    upcycle train --config configs/tiny-moe.yaml --out runs/tiny-moe
    upcycle train --config configs/tiny-moe.yaml --out runs/tiny-moe --optim.lr 1e-3 --train.max_steps 50
    torchrun --nproc_per_node=2 -m upcycle.train --config configs/tiny-moe.yaml --out runs/tiny-moe-2

The config is YAML with the sections below (one dataclass each; every field is documented and shown by `--help`);
any field can be overridden on the command line with its dotted name. Re-running the same command on an OUT that
holds checkpoints resumes from the newest one, bit-exactly (see docs/training.md for the full reference).

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
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from upcycle.errors import UpcycleError
from upcycle.model import ModelConfig

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PREPARED_DATA_DIR = "data"
PRECISIONS = ("fp32", "bf16")
UPCYCLE_METHODS = ("drop", "naive", "noise", "scratch")


# ---------------------------------------------------------------------------------------------------------------------
# Config: one dataclass per YAML section


@dataclass
class InitConfig:
    """Where the weights come from. Empty `source`: from scratch, built from the `model` section.

    Attributes:
        source: Checkpoint directory to start from: a Hugging Face model (dense or MoE; llama, mistral, qwen2, qwen3,
            mixtral, qwen2_moe, qwen3_moe) or one of ours (a training checkpoint step_XXXXXXXX). The `model` section
            must then be empty: the architecture comes from the checkpoint.
        method: Online upcycling of a dense `source` into an MoE before training: drop (Drop-Upcycling), naive (every
            expert a copy), noise (random-noise upcycling) or scratch. Empty: load `source` as it is.
        ratio: Drop-Upcycling re-initialization ratio r in [0, 1]; 0 is naive upcycling.
        index_mode: Which neurons are re-drawn: independent (a fresh set per matrix, the authors' released code and
            every published number; default) or shared (one set per expert, the paper's Figure 1).
        seed: Seed of every upcycling draw (router init, re-drawn neurons).
        num_experts: Experts per MoE layer (online upcycling).
        top_k: Experts per token (online upcycling).
    """

    source: str | None = None
    method: str | None = None
    ratio: float = 0.5
    index_mode: str = "independent"
    seed: int = 1234
    num_experts: int = 8
    top_k: int = 2


@dataclass
class DataConfig:
    """Training and validation tokens. Either `path` (already prepared) or `sources` + `tokenizer` (raw text).

    Attributes:
        path: A directory written by `upcycle data prepare` (holds data.json). Relative paths are relative to the
            current directory.
        sources: Raw text per domain, {name: [file or directory, ...]} (.jsonl with a "text" field or plain files,
            optionally .gz). Tokenized on the first run into OUT/data, so no separate preparation step is needed.
        tokenizer: Tokenizer directory (with tokenizer.json) used to tokenize `sources`.
        val_fraction: Share of each domain's documents held out for validation when tokenizing `sources`.
        weights: Domain sampling weights {name: weight}; empty: proportional to each domain's size (the paper).
        seq_len: Tokens per training sequence (documents are packed, separated by EOS).
        seed: Seed of the data order (which domain and chunk fills each row of each batch) and of the validation
            split when tokenizing `sources`.
    """

    path: str | None = None
    sources: dict[str, list[str]] | None = None
    tokenizer: str | None = None
    val_fraction: float = 0.01
    weights: dict[str, float] | None = None
    seq_len: int = 512
    seed: int = 0


@dataclass
class OptimConfig:
    """AdamW, with the paper's recipe as defaults.

    Attributes:
        lr: Peak learning rate, reached at the end of warmup.
        min_lr: Final learning rate of the cosine decay (and, by default, the first warmup learning rate).
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        weight_decay: Decoupled weight decay, applied to all parameters as in the paper.
        grad_clip: Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged).
    """

    lr: float = 2e-4
    min_lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """Learning rate: linear warmup from `warmup_start_lr` to optim.lr, then cosine decay to optim.min_lr.

    Attributes:
        warmup_steps: Optimizer steps of linear warmup.
        decay_steps: Step at which the cosine reaches optim.min_lr (counted from step 0, warmup included); empty:
            train.max_steps. The learning rate stays at optim.min_lr afterwards.
        warmup_start_lr: Learning rate of the first step; empty: optim.min_lr (the paper warms up from 2e-5).
    """

    warmup_steps: int = 2000
    decay_steps: int | None = None
    warmup_start_lr: float | None = None


@dataclass
class TrainLoopConfig:
    """The training loop.

    Attributes:
        max_steps: Optimizer steps to train for (the run ends there; resuming continues up to it).
        global_batch_tokens: Tokens per optimizer step over all ranks; a multiple of
            data.seq_len * micro_batch_size * number of ranks.
        micro_batch_size: Sequences per forward/backward pass on one rank; gradients of the micro-batches of one step
            are accumulated.
        seed: Seed of the from-scratch model init and of torch's RNG.
        precision: fp32 (default; exact and reproducible on CPU) or bf16 (autocast; master weights and optimizer stay
            fp32, routing and losses are computed in fp32).
        activation_checkpointing: Recompute each block's activations in backward instead of storing them.
        compile: torch.compile each transformer block (needs a C++ compiler on CPU).
        parallel: With several ranks: fsdp (FSDP2 fully_shard per block, then the root) or ddp.
        aux_coef: Weight of the Switch load-balancing loss (MoE only; the paper: 0.02).
        aux_per_layer: false: router logits of all layers pooled into one matrix (the paper, HF Mixtral);
            true: the loss of each layer on its own, averaged over layers.
        z_coef: Weight of the router z-loss (the paper: 0, it is logged anyway).
        eval_every: Per-domain validation loss every this many steps and at the end; 0 disables validation.
        eval_sequences: Validation sequences per domain (fixed, evenly spread over the held-out documents).
    """

    max_steps: int = 1000
    global_batch_tokens: int = 65536
    micro_batch_size: int = 8
    seed: int = 0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    parallel: str = "fsdp"
    aux_coef: float = 0.02
    aux_per_layer: bool = False
    z_coef: float = 0.0
    eval_every: int = 200
    eval_sequences: int = 64


@dataclass
class CheckpointConfig:
    """Checkpoints under OUT/checkpoints/step_XXXXXXXX (see checkpoint.py for what each holds).

    Attributes:
        every: Save every this many optimizer steps, and always at the end; 0: only at the end (and on SIGTERM).
        keep: Keep the newest this many checkpoints, delete older ones.
    """

    every: int = 500
    keep: int = 3


@dataclass
class LoggingConfig:
    """What is reported besides OUT/metrics.jsonl (always written, one JSON object per optimizer step).

    Attributes:
        progress: Show a tqdm progress bar.
        tensorboard: Also write TensorBoard events to OUT/tensorboard when the tensorboard package is installed.
    """

    progress: bool = True
    tensorboard: bool = True


@dataclass
class TrainConfig:
    """A whole training run: the YAML file's top-level sections."""

    model: ModelConfig | None = None
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def config_to_dict(config: TrainConfig) -> dict:
    """Plain YAML-safe dict (tuples become lists) of a config, for OUT/config.yaml and checkpoints."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def _section(cls, values: Any, name: str):
    """Build dataclass `cls` from a dict, naming the offending field of section `name` in errors."""
    if values is None:
        return None if cls is ModelConfig else cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise UpcycleError(f"config section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UpcycleError(f"unknown config field {name}.{unknown[0]}; {name} accepts: {', '.join(sorted(known))}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = dict(values)
    for key, value in values.items():
        if types[key].startswith("float") and isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; accept it as the number it obviously is.
            with contextlib.suppress(ValueError):
                values[key] = float(value)
        _check_type(f"{name}.{key}", types[key], values[key])
    try:
        return cls(**values)
    except TypeError as exc:  # a missing required field (ModelConfig's sizes)
        raise UpcycleError(f"config section {name!r}: {exc}") from None


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a parsed YAML mapping; unknown sections or fields are errors that name them."""
    if not isinstance(values, dict):
        raise UpcycleError("a training config must be a YAML mapping of sections (model, init, data, ...)")
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise UpcycleError(f"unknown config section {unknown[0]!r}; sections are: {', '.join(sections)}")
    classes = {"model": ModelConfig, "init": InitConfig, "data": DataConfig, "optim": OptimConfig,
               "schedule": ScheduleConfig, "train": TrainLoopConfig, "checkpoint": CheckpointConfig,
               "logging": LoggingConfig}
    return TrainConfig(**{name: _section(classes[name], values.get(name), name) for name in sections})


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UpcycleError(f"override {text!r} must look like section.field=value, e.g. optim.lr=1e-3")
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML training config and apply `section.field=value` overrides (values parsed as YAML), then validate.

    This is the Python-API twin of the CLI's `--config FILE --section.field VALUE`.
    """
    path = Path(path)
    if not path.is_file():
        raise UpcycleError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UpcycleError(f"{path} is not valid YAML: {exc}") from None
    for text in overrides:
        keys, value = _parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UpcycleError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    config = config_from_dict(values)
    validate_config(config)
    return config


_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """Reject a value of the wrong scalar type (YAML gives whatever it parsed), naming the field."""
    optional = "None" in annotation
    base = annotation.replace(" | None", "")
    if value is None:
        if not optional:
            raise UpcycleError(f"{name} must be set (got null)")
        return
    if base in _SCALAR_TYPES and (not isinstance(value, _SCALAR_TYPES[base])
                                  or (base != "bool" and isinstance(value, bool))):
        raise UpcycleError(f"{name} must be {base}, got {value!r}")


def _typecheck(config: TrainConfig) -> None:
    for section in ("model", "init", "data", "optim", "schedule", "train", "checkpoint", "logging"):
        obj = getattr(config, section)
        if obj is None:  # only `model` may be absent
            continue
        for f in dataclasses.fields(obj):
            _check_type(f"{section}.{f.name}", str(f.type), getattr(obj, f.name))


def validate_config(config: TrainConfig) -> None:
    """Check every setting before any work starts; each error names the field and says what to do."""
    _typecheck(config)
    init, data, optim, sched, loop, ckpt = (config.init, config.data, config.optim, config.schedule, config.train,
                                            config.checkpoint)
    if init.source is None:
        if config.model is None:
            raise UpcycleError("model: give the architecture (vocab_size, dim, num_layers, ...) to train from scratch, "
                               "or set init.source to start from a checkpoint")
        if init.method is not None:
            raise UpcycleError("init.method needs init.source (the dense checkpoint to upcycle)")
    else:
        if config.model is not None:
            raise UpcycleError("model: leave this section out when init.source is set; the architecture comes from "
                               "the checkpoint")
        if not Path(init.source).exists():
            raise UpcycleError(f"init.source {init.source} does not exist")
    if init.method is not None:
        if init.method not in UPCYCLE_METHODS:
            raise UpcycleError(f"init.method must be one of {', '.join(UPCYCLE_METHODS)} (btx needs several sources: "
                               f"run `upcycle convert` first), got {init.method!r}")
        if not 0.0 <= init.ratio <= 1.0:
            raise UpcycleError(f"init.ratio must lie in [0, 1], got {init.ratio}")
        if init.index_mode not in ("independent", "shared"):
            raise UpcycleError(f"init.index_mode must be independent or shared, got {init.index_mode!r}")
        if init.num_experts < 1:
            raise UpcycleError(f"init.num_experts must be >= 1, got {init.num_experts}")
        if not 1 <= init.top_k <= init.num_experts:
            raise UpcycleError(f"init.top_k must lie in [1, init.num_experts={init.num_experts}], got {init.top_k}")

    if (data.path is None) == (data.sources is None):
        raise UpcycleError("data: set exactly one of data.path (a prepared directory) or data.sources (raw text)")
    if data.path is not None and not (Path(data.path) / "data.json").is_file():
        raise UpcycleError(f"data.path {data.path} is not a prepared data directory (no data.json); run "
                           "`upcycle data prepare` or use data.sources")
    if data.sources is not None:
        if not data.tokenizer:
            raise UpcycleError("data.tokenizer is required with data.sources (a directory holding tokenizer.json)")
        if not Path(data.tokenizer).exists():
            raise UpcycleError(f"data.tokenizer {data.tokenizer} does not exist")
        for name, paths in data.sources.items():
            for p in [paths] if isinstance(paths, str) else paths:
                if not Path(p).exists():
                    raise UpcycleError(f"data.sources.{name}: {p} does not exist")
    if data.seq_len < 1:
        raise UpcycleError(f"data.seq_len must be >= 1, got {data.seq_len}")
    if config.model is not None and data.seq_len > config.model.max_seq_len:
        raise UpcycleError(f"data.seq_len {data.seq_len} exceeds model.max_seq_len {config.model.max_seq_len}")

    if optim.lr <= 0:
        raise UpcycleError(f"optim.lr must be > 0, got {optim.lr}")
    if not 0 <= optim.min_lr <= optim.lr:
        raise UpcycleError(f"optim.min_lr must lie in [0, optim.lr={optim.lr}], got {optim.min_lr}")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise UpcycleError(f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
    if optim.eps <= 0 or optim.weight_decay < 0 or optim.grad_clip < 0:
        raise UpcycleError("optim.eps must be > 0, optim.weight_decay and optim.grad_clip >= 0")
    if sched.warmup_steps < 0:
        raise UpcycleError(f"schedule.warmup_steps must be >= 0, got {sched.warmup_steps}")
    if sched.decay_steps is not None and sched.decay_steps < sched.warmup_steps:
        raise UpcycleError(f"schedule.decay_steps ({sched.decay_steps}) must be >= schedule.warmup_steps "
                           f"({sched.warmup_steps})")
    if sched.warmup_start_lr is not None and sched.warmup_start_lr < 0:
        raise UpcycleError("schedule.warmup_start_lr must be >= 0")

    if loop.max_steps < 1:
        raise UpcycleError(f"train.max_steps must be >= 1, got {loop.max_steps}")
    if loop.micro_batch_size < 1:
        raise UpcycleError(f"train.micro_batch_size must be >= 1, got {loop.micro_batch_size}")
    if loop.global_batch_tokens % (data.seq_len * loop.micro_batch_size):
        raise UpcycleError(f"train.global_batch_tokens ({loop.global_batch_tokens}) must be a multiple of "
                           f"data.seq_len * train.micro_batch_size = {data.seq_len * loop.micro_batch_size}")
    if loop.precision not in PRECISIONS:
        raise UpcycleError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {loop.precision!r}")
    if loop.parallel not in ("fsdp", "ddp"):
        raise UpcycleError(f"train.parallel must be fsdp or ddp, got {loop.parallel!r}")
    if loop.aux_coef < 0 or loop.z_coef < 0:
        raise UpcycleError("train.aux_coef and train.z_coef must be >= 0")
    if loop.eval_every < 0 or loop.eval_sequences < 1:
        raise UpcycleError("train.eval_every must be >= 0 and train.eval_sequences >= 1")
    if ckpt.every < 0 or ckpt.keep < 1:
        raise UpcycleError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {ckpt.every}, {ckpt.keep}")


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the step


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, warmup_start_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from warmup_start_lr to lr over warmup_steps,
    cosine from lr to min_lr until decay_steps, min_lr after."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_of(config: TrainConfig):
    """The config's schedule as a function step -> learning rate."""
    o, s = config.optim, config.schedule
    decay = config.train.max_steps if s.decay_steps is None else s.decay_steps
    start = o.min_lr if s.warmup_start_lr is None else s.warmup_start_lr
    return lambda step: lr_at(step, lr=o.lr, min_lr=o.min_lr, warmup_steps=s.warmup_steps, decay_steps=decay,
                              warmup_start_lr=start)


# ---------------------------------------------------------------------------------------------------------------------
# Building the model


def _model_config_from_dict(values: dict) -> ModelConfig:
    return ModelConfig(**values)


def build_model(config: TrainConfig, *, resume_model_config: dict | None) -> tuple[torch.nn.Module, ModelConfig]:
    """The model with its initial weights: from scratch, from a checkpoint, or upcycled online from a dense one.

    When resuming, the architecture is read from the checkpoint and the initial weights are skipped (the checkpoint
    overwrites them), so an online upcycling is not redone on every restart.
    """
    from upcycle.model import Transformer

    torch.manual_seed(config.train.seed)
    if resume_model_config is not None:
        model_config = _model_config_from_dict(resume_model_config)
        return Transformer(model_config), model_config
    if config.init.source is None:
        model_config = dataclasses.replace(config.model)
        return Transformer(model_config), model_config

    from upcycle import hf_model

    init = config.init
    if init.method is None:
        model = hf_model.load_model(init.source, dtype=torch.float32)
        return model, model.config
    from upcycle.convert import convert_in_memory

    moe_config, hf_state = convert_in_memory(init.source, method=init.method, ratio=init.ratio,
                                             index_mode=init.index_mode, seed=init.seed,
                                             num_experts=init.num_experts, top_k=init.top_k, dtype="float32")
    model_config, state = hf_model.state_dict_from_hf(hf_state, moe_config)
    model = Transformer(model_config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model, model_config


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over every parameter (the paper decays all of them, norms and embeddings included).

    fused=True: one kernel per parameter instead of a chain of foreach ops; on CPU it made the optimizer step ~4x
    faster (18M parameters: 67 ms -> 16 ms), about 7% of a whole training step of a small model.
    """
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=True)


def _apply_activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    # Per block: the block's inputs are kept, everything inside is recomputed in backward. The wrapper's prefix is
    # stripped from state-dict names by torch.distributed.checkpoint.state_dict, so checkpoints are unaffected.
    for index, block in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


# ---------------------------------------------------------------------------------------------------------------------
# One step


def _losses(output, labels_BT: torch.Tensor, loop: TrainLoopConfig, top_k: int) -> dict[str, torch.Tensor]:
    from upcycle import losses

    ce = losses.cross_entropy(logits_BTV=output.logits, labels_BT=labels_BT)
    zero = ce.new_zeros(())
    if output.router_logits:
        aux = losses.load_balancing_loss(router_logits=output.router_logits, top_k=top_k,
                                         per_layer=loop.aux_per_layer)
        z = losses.router_z_loss(router_logits=output.router_logits)
    else:
        aux, z = zero, zero
    # z-loss costs a logsumexp even with z_coef 0; it is kept for the log (routers drifting to large logits show).
    total = ce + loop.aux_coef * aux + (loop.z_coef * z if loop.z_coef else zero)
    return {"loss": total, "ce": ce, "aux": aux, "z": z}


def forward_backward(model: torch.nn.Module, batch_BT: torch.Tensor, *, loop: TrainLoopConfig, top_k: int,
                     num_moe: int, num_experts: int, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's rows of one global batch, in micro-batches of loop.micro_batch_size.

    Gradients accumulate in the parameters, each micro-batch's scaled by 1 / micro-batches so they average; the
    gradient reduction across ranks happens once, on the last micro-batch. Returns the mean [loss, ce, aux, z] over the
    micro-batches (fp64, detached) and the summed expert counts (L_moe, E).
    """
    from upcycle.distributed import gradient_sync

    micro_batches = batch_BT.split(loop.micro_batch_size)
    sums = torch.zeros(4, dtype=torch.float64, device=batch_BT.device)
    counts_LE = torch.zeros(num_moe, max(num_experts, 1), dtype=torch.float64, device=batch_BT.device)
    for index, micro_BT in enumerate(micro_batches):
        with gradient_sync(model, index == len(micro_batches) - 1), autocast():
            output = model(micro_BT[:, :-1])
            parts = _losses(output, micro_BT[:, 1:], loop, top_k)
        (parts["loss"] / len(micro_batches)).backward()
        sums += torch.stack([parts[k].detach().double() for k in ("loss", "ce", "aux", "z")])
        if output.expert_counts is not None:
            counts_LE += output.expert_counts.double()
    return sums / len(micro_batches), counts_LE


class NonFiniteLoss(UpcycleError):
    """The loss or gradient norm became NaN/inf: training stopped without updating or saving."""


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


def _grad_norm_value(norm) -> float:
    # Under FSDP2 the norm is a DTensor; full_tensor() makes it the same replicated number on every rank.
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---------------------------------------------------------------------------------------------------------------------
# Output directory, metrics


def _read_saved_config(out: Path) -> dict | None:
    path = out / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _check_resume_compatible(saved: dict, current: dict) -> None:
    """Sections that decide what the checkpoint's numbers mean must not change between a run and its resumption."""
    for section in ("model", "init", "data"):
        if saved.get(section) != current.get(section):
            changed = sorted(k for k in set(saved.get(section) or {}) | set(current.get(section) or {})
                             if (saved.get(section) or {}).get(k) != (current.get(section) or {}).get(k))
            raise UpcycleError(f"OUT already holds a run whose config differs in {section}."
                               f"{changed[0] if changed else ''}; resuming needs the same model, init and data "
                               "sections (use a new --out for a different run)")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after the checkpoint we resume from: they are redone and would appear twice."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _expert_load(counts_LE: torch.Tensor) -> dict[str, list[float]]:
    """Per MoE layer, the largest and smallest share of the step's top-k assignments (uniform = 1/E)."""
    shares_LE = counts_LE.double() / counts_LE.sum(dim=-1, keepdim=True).clamp_min(1)
    return {"max_share": [round(v, 5) for v in shares_LE.max(dim=-1).values.tolist()],
            "min_share": [round(v, 5) for v in shares_LE.min(dim=-1).values.tolist()]}


class _TensorBoard:
    """TensorBoard scalars when the package is installed; a no-op otherwise (it is an optional extra)."""

    def __init__(self, directory: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(str(directory))

    def log(self, record: dict) -> None:
        if self.writer is None:
            return
        for key in ("loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s"):
            if key in record:
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])
        for domain, value in record.get("val", {}).items():
            self.writer.add_scalar(f"val/{domain}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------------------
# The run


def _prepare_data(config: TrainConfig, out: Path, world) -> Path:
    """The prepared data directory: data.path, or data.sources tokenized once into OUT/data (rank 0; others wait)."""
    from upcycle import data as data_lib
    from upcycle.distributed import barrier

    if config.data.path is not None:
        return Path(config.data.path)
    target = out / PREPARED_DATA_DIR
    if world.is_main and not (target / data_lib.METADATA_FILE).is_file():
        sources = {name: [paths] if isinstance(paths, str) else list(paths)
                   for name, paths in config.data.sources.items()}
        data_lib.prepare(sources, target, config.data.tokenizer, val_fraction=config.data.val_fraction,
                         seed=config.data.seed, force=True, progress=False)
    barrier(world)
    return target


def run_training(config: TrainConfig, out: str | Path) -> int:
    """Train according to `config` into directory `out`, resuming from its newest checkpoint if it has one.

    Returns 0 when max_steps is reached or after a SIGTERM-triggered checkpoint. Raises UpcycleError for bad input,
    and NonFiniteLoss (an UpcycleError) when the loss diverges; completed checkpoints are never touched then.
    """
    from upcycle import checkpoint as ckpt
    from upcycle.distributed import init_distributed, shutdown

    validate_config(config)
    out = Path(out)
    world = init_distributed()
    try:
        loop = config.train
        local_sequences = loop.global_batch_tokens // config.data.seq_len
        if local_sequences % (world.world_size * loop.micro_batch_size):
            raise UpcycleError(f"train.global_batch_tokens ({loop.global_batch_tokens}) must be a multiple of "
                               f"data.seq_len * train.micro_batch_size * ranks = "
                               f"{config.data.seq_len * loop.micro_batch_size * world.world_size}")
        config_dict = config_to_dict(config)
        saved = _read_saved_config(out)
        if saved is None and out.exists() and any(out.iterdir()):
            raise UpcycleError(f"--out {out} exists and is not a training directory (no {CONFIG_FILE}); "
                               "choose a new or empty directory")
        if saved is not None:
            _check_resume_compatible(saved, config_dict)
        ckpt_root = out / ckpt.CHECKPOINT_DIR
        resume_from = ckpt.latest_checkpoint(ckpt_root)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFIG_FILE).write_text(yaml.safe_dump(config_dict, sort_keys=False))
        data_dir = _prepare_data(config, out, world)
        return _run(config, config_dict, out, data_dir, resume_from, world)
    finally:
        shutdown(world)


def _run(config: TrainConfig, config_dict: dict, out: Path, data_dir: Path, resume_from: Path | None, world) -> int:
    from upcycle import checkpoint as ckpt
    from upcycle.data import MixtureLoader, read_metadata, validation_batches
    from upcycle.distributed import all_reduce_sum, parallelize

    loop, data_cfg = config.train, config.data
    resume_model = None
    if resume_from is not None:
        resume_model = json.loads((resume_from / ckpt.MODEL_CONFIG).read_text())["model"]
    model, model_config = build_model(config, resume_model_config=resume_model)
    metadata = read_metadata(data_dir)
    if metadata["vocab_size"] > model_config.vocab_size:
        raise UpcycleError(f"the data's tokenizer has {metadata['vocab_size']} ids but the model's vocab_size is "
                           f"{model_config.vocab_size}; use a matching tokenizer or a larger model.vocab_size")
    if data_cfg.seq_len > model_config.max_seq_len:
        raise UpcycleError(f"data.seq_len {data_cfg.seq_len} exceeds the model's max_seq_len "
                           f"{model_config.max_seq_len}")
    model.to(world.device)
    bare_model = model
    if loop.activation_checkpointing:
        _apply_activation_checkpointing(model)
    if loop.compile:
        for block in model.layers:
            block.compile()
    model = parallelize(model, bare_model.layers, mode=loop.parallel, world=world)
    optimizer = build_optimizer(model, config.optim)
    loader = MixtureLoader(data_dir, seq_len=data_cfg.seq_len, global_batch_size=loop.global_batch_tokens // data_cfg.seq_len,
                           seed=data_cfg.seed, weights=data_cfg.weights, rank=world.rank, world_size=world.world_size)

    start_step = 0
    # A running SHA-256 over the token ids of every batch this rank consumed: two runs that log the same value at a
    # step saw the same data in the same order (what `upcycle experiment` checks across its arms).
    data_sha256 = hashlib.sha256(b"upcycle-data").hexdigest()
    metrics_path = out / METRICS_FILE
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, world=world)
        loader.load_state_dict(state["data"])
        start_step = int(state["step"])
        data_sha256 = state.get("data_sha256", data_sha256)
        if world.is_main:
            print(f"upcycle train: resuming from {resume_from} (step {start_step}, written by "
                  f"{state.get('world_size', 1)} rank(s))", file=sys.stderr)
    if world.is_main:
        _truncate_metrics(metrics_path, start_step)

    # Each rank scores the whole (small, fixed) validation set: FSDP needs every rank to run the same number of
    # forwards, and an uneven split of batches over ranks would not give that.
    val_sets = validation_batches(data_dir, seq_len=data_cfg.seq_len, batch_size=loop.micro_batch_size,
                                  max_sequences=loop.eval_sequences) if loop.eval_every else {}

    lr_of = schedule_of(config)
    autocast = (lambda: torch.autocast(world.device.type, dtype=torch.bfloat16)) if loop.precision == "bf16" \
        else contextlib.nullcontext
    tokens_per_step = loop.global_batch_tokens
    top_k = model_config.top_k
    num_moe = model_config.num_layers if model_config.is_moe else 0
    params = [p for p in model.parameters()]

    def save(step: int) -> Path:
        trainer_state = {"tokens": step * tokens_per_step, "data": loader.state_dict(), "data_sha256": data_sha256}
        return ckpt.save_checkpoint(out / ckpt.CHECKPOINT_DIR, step, model=model, optimizer=optimizer,
                                    model_config=dataclasses.asdict(model_config), trainer_state=trainer_state,
                                    train_config=config_dict, keep=config.checkpoint.keep, world=world)

    def evaluate() -> dict[str, float]:
        model.eval()
        results = {}
        with torch.no_grad(), autocast():
            for domain, batches in val_sets.items():
                total, count = 0.0, 0
                for batch_BT in batches:
                    batch_BT = batch_BT.to(world.device)
                    output = model(batch_BT[:, :-1])
                    n = batch_BT[:, 1:].numel()
                    total += float(_losses(output, batch_BT[:, 1:], loop, top_k)["ce"]) * n
                    count += n
                if count:
                    results[domain] = total / count
        model.train()
        return results

    progress = None
    if world.is_main and config.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=loop.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    board = _TensorBoard(out / "tensorboard", config.logging.tensorboard and world.is_main)
    metrics = open(metrics_path, "a") if world.is_main else None
    stop = _StopRequest()
    last_saved = start_step if resume_from is not None else None
    model.train()
    try:
        with _sigterm_sets(stop):
            for step in range(start_step, loop.max_steps):
                started = time.perf_counter()
                lr = lr_of(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch_BT = loader.next_batch()
                data_sha256 = hashlib.sha256(data_sha256.encode() + batch_BT.numpy().tobytes()).hexdigest()
                batch_BT = batch_BT.to(world.device)
                sums, counts_LE = forward_backward(model, batch_BT, loop=loop, top_k=top_k, num_moe=num_moe,
                                                   num_experts=model_config.num_experts, autocast=autocast)
                flag = torch.tensor([1.0 if stop.signal_name else 0.0], dtype=torch.float64, device=world.device)
                reduced = all_reduce_sum(torch.cat([sums, counts_LE.flatten(), flag]), world)
                loss, ce, aux, z = (reduced[:4] / world.world_size).tolist()
                stop_requested = bool(reduced[-1] > 0)

                max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
                grad_norm = _grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    newest = ckpt.latest_checkpoint(out / ckpt.CHECKPOINT_DIR)
                    raise NonFiniteLoss(
                        f"loss became non-finite at step {step + 1} (loss={loss}, ce={ce}, aux={aux}, z={z}, "
                        f"grad_norm={grad_norm}); stopped before the update, nothing saved. Last good checkpoint: "
                        f"{newest if newest else 'none'}. Lower optim.lr, raise schedule.warmup_steps, keep "
                        "optim.grad_clip > 0, or train in fp32; re-running resumes from that checkpoint")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                elapsed = time.perf_counter() - started

                if metrics is not None:
                    record: dict[str, Any] = {
                        "step": done, "loss": loss, "ce": ce, "aux": aux, "z": z, "lr": lr, "grad_norm": grad_norm,
                        "tokens": done * tokens_per_step, "tokens_per_s": tokens_per_step / elapsed,
                        "step_time_s": elapsed, "data_sha256": data_sha256,
                    }
                    if num_moe:
                        record["expert_load"] = _expert_load(reduced[4:-1].view(num_moe, -1))
                if loop.eval_every and (done % loop.eval_every == 0 or done == loop.max_steps):
                    val = evaluate()
                    if metrics is not None:
                        record["val"] = val
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    board.log(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    progress.update(1)

                every = config.checkpoint.every
                if done == loop.max_steps or stop_requested or (every and done % every == 0):
                    save(done)
                    last_saved = done
                if stop_requested:
                    if world.is_main:
                        print(f"upcycle train: SIGTERM received; saved checkpoint at step {done}, exiting",
                              file=sys.stderr)
                    return 0
        if last_saved != loop.max_steps and start_step >= loop.max_steps and world.is_main:
            print(f"upcycle train: already at train.max_steps={loop.max_steps}; nothing to do", file=sys.stderr)
        return 0
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        board.close()


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def train_command(
    *,
    config: str,
    out: str,
    max_steps: int | None = None,
    save_every: int | None = None,
    override: list[str] | None = None,
) -> int:
    """Train a dense or MoE model (from scratch, a checkpoint, or upcycled online); resumes if OUT has checkpoints.

    Any config field can also be overridden by its dotted name, e.g. `--optim.lr 1e-3 --train.seed 1`
    (values are read as YAML). Every section and field is documented in docs/training.md.

    Args:
        config: YAML config file of sections model, init, data, optim, schedule, train, checkpoint, logging
            (see configs/).
        out: Run directory: config.yaml, metrics.jsonl, checkpoints/. Re-running on it resumes from the newest
            checkpoint.
        max_steps: Shortcut for --train.max_steps.
        save_every: Shortcut for --checkpoint.every.
        override: Overrides as section.field=value, the same as --section.field value.
    """
    overrides = list(override or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if save_every is not None:
        overrides.append(f"checkpoint.every={save_every}")
    return run_training(load_config(config, overrides), out)


def config_fields_help() -> str:
    """Every overridable field with its type and default, for `upcycle train --help`."""
    lines = ["config fields (override any with --section.field VALUE; each is documented in docs/training.md):"]
    for section in dataclasses.fields(TrainConfig):
        cls = ModelConfig if section.name == "model" else section.default_factory
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            flag = f"--{section.name}.{f.name}"
            lines.append(f"  {flag:<36} {str(f.type):<26} default: {default}")
    return "\n".join(lines)


train_command.help_epilog = config_fields_help


def main(argv: list[str] | None = None) -> None:
    """`python -m upcycle.train ...` (what torchrun launches): the same flags as `upcycle train`."""
    from upcycle.cli import run_function

    run_function(train_command, sys.argv[1:] if argv is None else argv, prog="upcycle train")


if __name__ == "__main__":
    main()
