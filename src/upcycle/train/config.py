"""The training config: one dataclass per YAML section, each checking its own fields in `validate()`, built and read
by `upcycle.config` (as every config of ours); `section.field=value` overrides and the field list `upcycle train --help`
shows.

A config is data only: nothing here touches the output directory, the data or the model weights. `TrainConfig.validate`
runs every check that needs no more than the config and the file system, before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.config import build, check_values, fields_help, load_yaml, read_yaml, to_dict
from upcycle.convert.options import METHODS, ConvertOptions
from upcycle.data.prepare import check_weights
from upcycle.errors import UpcycleError
from upcycle.files import not_an_input
from upcycle.formats.hf_formats import AUTO_FORMAT
from upcycle.model.config import ModelConfig, check_routing
from upcycle.train.schedule import SCHEDULE_KINDS
from upcycle.validation import check_fields

PARALLEL_MODES = ("fsdp", "ddp")  # train.parallel; distributed.parallelize applies them
# train.micro_batch_size: empty picks the largest divisor of the per-rank sequences up to this many.
AUTO_MICRO_BATCH_MAX = 8
BALANCE_SCOPES = ("micro_batch", "global_batch", "sequence")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: upcycle.hardware.resolve_precision decides per device and width
WHAT = "a training config"  # how messages name the file


@dataclass(frozen=True)
class InitConfig(ConvertOptions):
    """Where the weights come from. Empty `source`: from scratch, built from the `model` section.

    Every other field is an option of `upcycle convert`, inherited from ConvertOptions (documented there and in
    docs/convert.md's option table), used for online upcycling; only `method` differs: empty by default.

    Attributes:
        source: Checkpoint directory to start from: a Hugging Face model (dense or MoE; llama, mistral, qwen2, qwen3,
            mixtral, qwen2_moe, qwen3_moe, granitemoeshared, granitemoe, glm4_moe) or one of ours (a training
            checkpoint step_XXXXXXXX). The architecture then comes from the checkpoint: the `model` section may only
            set the routing fields (router_activation, routed_scaling, capacity_factor).
        method: Online upcycling of a dense `source` into an MoE before training, as `upcycle convert --method`.
            Empty: load `source` as it is.
    """

    method: str | None = field(default=None, metadata={"choices": METHODS})
    source: str | None = None

    def option_name(self, field_name: str) -> str:
        return f"init.{field_name}"

    def convert_options(self) -> ConvertOptions:
        """The upcycling fields of this section as the options of `upcycle convert`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ConvertOptions)}
        values["btx_sources"] = tuple(values["btx_sources"] or ())
        return ConvertOptions(**values)

    def validate(self) -> None:
        if self.source is not None and not Path(self.source).is_dir():
            raise not_an_input("init.source", self.source, "a checkpoint directory")
        if self.method is None:
            return
        if self.source is None:
            raise UpcycleError("init.method needs init.source (the dense checkpoint to upcycle)")
        super().validate()  # convert's checks, its messages naming init fields (option_name)
        family = _model_type(Path(self.source))
        if family in AUTO_FORMAT:  # a dense source: the format is known now, before any work
            self.check_format(AUTO_FORMAT[family] if self.format == "auto" else self.format)


def _model_type(checkpoint: Path) -> str | None:
    """The model_type of a checkpoint's config.json, or None where there is none to read (conversion names why)."""
    try:
        cfg = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) else None


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
    sources: dict[str, list[str] | str] | None = None
    tokenizer: str | None = None
    val_fraction: float = 0.01
    weights: dict[str, float] | None = None
    seq_len: int = 512
    seed: int = 0

    def validate(self) -> None:
        if (self.path is None) == (self.sources is None):
            raise UpcycleError("data: set exactly one of data.path (a prepared directory) or data.sources (raw text)")
        if self.path is not None and not (Path(self.path) / "data.json").is_file():
            raise UpcycleError(f"data.path {self.path} is not a prepared data directory (no data.json); run "
                               "`upcycle data prepare` or use data.sources")
        if self.sources is not None:
            if not self.tokenizer:
                raise UpcycleError("data.tokenizer is required with data.sources (a directory holding tokenizer.json)")
            if not (Path(self.tokenizer).is_dir() or Path(self.tokenizer).is_file()):
                raise not_an_input("data.tokenizer", self.tokenizer, "a tokenizer directory or tokenizer.json")
            for name, paths in self.sources.items():
                for p in [paths] if isinstance(paths, str) else paths:
                    if not (Path(p).is_file() or Path(p).is_dir()):
                        raise not_an_input(f"data.sources.{name}:", p)
        if self.seq_len < 1:
            raise UpcycleError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.weights is not None:
            check_weights(self.weights, "data.weights")


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

    def validate(self) -> None:
        if self.lr <= 0:
            raise UpcycleError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UpcycleError(f"optim.min_lr must lie in [0, optim.lr={self.lr}], got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UpcycleError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UpcycleError("optim.eps must be > 0, optim.weight_decay and optim.grad_clip >= 0")


@dataclass
class ScheduleConfig:
    """Learning rate: linear warmup from `warmup_start_lr` to optim.lr, then cosine or warmup-stable-decay down to
    optim.min_lr (upcycle.train.schedule).

    Attributes:
        kind: cosine (cosine decay from the end of warmup to decay_steps; the paper) or wsd (warmup-stable-decay:
            optim.lr held, then a linear decay over the last decay_fraction of decay_steps, reaching optim.min_lr on
            its last step).
        warmup_steps: Optimizer steps of linear warmup.
        decay_steps: Step at which the schedule reaches optim.min_lr (counted from step 0, warmup included); empty:
            train.max_steps. The learning rate stays at optim.min_lr afterwards.
        warmup_start_lr: Learning rate of the first step; empty: optim.min_lr (the paper warms up from 2e-5).
        decay_fraction: wsd only: share of decay_steps spent decaying (round(decay_fraction * decay_steps) steps,
            never into the warmup), in (0, 1].
    """

    kind: str = field(default="cosine", metadata={"choices": SCHEDULE_KINDS})
    warmup_steps: int = 2000
    decay_steps: int | None = None
    warmup_start_lr: float | None = None
    decay_fraction: float = 0.2

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise UpcycleError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            raise UpcycleError(f"schedule.decay_steps ({self.decay_steps}) must be >= schedule.warmup_steps "
                               f"({self.warmup_steps})")
        if self.warmup_start_lr is not None and self.warmup_start_lr < 0:
            raise UpcycleError("schedule.warmup_start_lr must be >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise UpcycleError(f"schedule.decay_fraction must lie in (0, 1], got {self.decay_fraction}")


@dataclass
class TrainLoopConfig:
    """The training loop.

    Attributes:
        max_steps: Optimizer steps to train for (the run ends there; resuming continues up to it).
        global_batch_tokens: Tokens per optimizer step over all ranks; a multiple of data.seq_len * number of ranks
            (and of data.seq_len * micro_batch_size * ranks when micro_batch_size is set).
        micro_batch_size: Sequences per forward/backward pass on one rank; gradients of the micro-batches of one step
            are accumulated. Empty (default): auto, the largest divisor of the rank's sequences per step that is at
            most 8, so the same config runs on any number of ranks that divides its sequences.
        seed: Seed of the from-scratch model init and of torch's RNG.
        precision: auto (default: bf16 on CUDA; on a CPU, bf16 only where it has native bf16 and a start-up probe,
            cached per machine, measures bf16 at least 1.2x faster than fp32 at the model's width, else fp32), fp32
            (exact and reproducible on CPU) or bf16 (autocast; master weights and optimizer stay fp32, routing and
            losses are computed in fp32). An explicit fp32 or bf16 is kept, with a warning where the probe finds it
            more than 1.2x slower. The start-up log says what was chosen and why; every metrics.jsonl record says
            which precision the run used.
        activation_checkpointing: Recompute each block's activations in backward instead of storing them.
        compile: torch.compile each transformer block (needs a C++ compiler on CPU).
        parallel: With several ranks: fsdp (FSDP2 fully_shard per block, then the root) or ddp.
        expert_parallel: Split every MoE layer's experts over groups of this many ranks (expert parallelism; 1: off).
            Must divide the number of ranks and the number of experts, and needs parallel: fsdp. Tokens travel to
            their experts' ranks and back by all-to-all; see docs/training.md for choosing it.
        aux_coef: Weight of the Switch load-balancing loss (MoE only; the paper: 0.02).
        aux_per_layer: false: router logits of all layers pooled into one matrix (the paper, HF Mixtral);
            true: the loss of each layer on its own, averaged over layers.
        balance_scope: Over which tokens the load-balancing loss counts expert assignments. micro_batch (default,
            the paper's recipe: HF Mixtral's loss on each forward pass): each micro-batch of each rank balances its
            own tokens, so the loss depends on how the global batch is split (micro_batch_size, number of ranks).
            global_batch: the assignment counts are summed over every micro-batch and rank of the step before the
            loss is formed, so results do not depend on the split, and a micro-batch of one domain need not spread
            over all experts; costs one extra forward pass per micro-batch (no gradients) when a rank has several.
            sequence: DeepSeek-V3's sequence-wise loss: f and P of each sequence, averaged over the sequences; every
            sequence balances itself (DeepSeek-V3 pairs it, at a small aux_coef such as 1e-4, with bias_update_rate).
        bias_update_rate: gamma of DeepSeek-V3's aux-loss-free balancing; 0 (default) is off. After every optimizer
            step each MoE layer's per-expert bias b, which is added to the router scores for the choice of experts
            only, moves by gamma * sign(mean load - load_e), the loads counted over the whole global batch (every
            micro-batch and rank). DeepSeek-V3 used 1e-3 (with sigmoid routers, model.router_activation); it works
            with softmax routers too. The bias is saved in checkpoints and exported as glm4_moe's
            e_score_correction_bias.
        z_coef: Weight of the router z-loss (the paper: 0, it is logged anyway).
        eval_every: Per-domain validation loss every this many steps and at the end; 0 disables validation.
        eval_sequences: Validation sequences per domain (fixed, evenly spread over the held-out documents).
        tf32: On CUDA with precision fp32, let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and
            newer: several times the fp32 rate, 10-bit mantissas in the products, fp32 accumulation), as PyTorch's
            own training recipes do; false keeps full fp32 products. Ignored on CPUs and with bf16.
        data_parallel_replicate: With FSDP, shard the weights within groups of ranks / this many ranks and replicate
            them across the groups (HSDP): with one group per node, FSDP's all-gathers and reduce-scatters stay on
            the node's fast links and only one gradient all-reduce per step crosses nodes, at the price of holding
            the node's share instead of 1/ranks. 1 (default): shard over all ranks. Must divide the number of ranks.
        collective_timeout_s: With several ranks, how long a rank waits in a training collective for the others before
            the run fails with a timeout (a frozen or lost rank).
        host_timeout_s: With several ranks, how long ranks wait for host-side work of one rank before failing: rank 0
            tokenizing data.sources or calibrating routers at start-up, writing and verifying checkpoints. These
            waits run on a CPU (gloo) group of their own, so a long save does not count against
            collective_timeout_s.
    """

    max_steps: int = 1000
    global_batch_tokens: int = 65536
    micro_batch_size: int | None = None
    seed: int = 0
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    activation_checkpointing: bool = False
    compile: bool = False
    parallel: str = field(default="fsdp", metadata={"choices": PARALLEL_MODES})
    expert_parallel: int = 1
    aux_coef: float = 0.02
    aux_per_layer: bool = False
    balance_scope: str = field(default="micro_batch", metadata={"choices": BALANCE_SCOPES})
    bias_update_rate: float = 0.0
    z_coef: float = 0.0
    eval_every: int = 200
    eval_sequences: int = 64
    tf32: bool = True
    data_parallel_replicate: int = 1
    collective_timeout_s: float = 900.0
    host_timeout_s: float = 7200.0

    def validate(self) -> None:
        for name in ("collective_timeout_s", "host_timeout_s"):
            if not getattr(self, name) > 0:
                raise UpcycleError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name, off, why in (("data_parallel_replicate", "shard over all ranks",
                                "HSDP shards within groups and replicates across them"),
                               ("expert_parallel", "no expert parallelism",
                                "the non-expert weights are sharded by FSDP2")):
            degree = getattr(self, name)
            if degree < 1:
                raise UpcycleError(f"train.{name} must be >= 1 (1: {off}), got {degree}")
            if degree > 1 and self.parallel != "fsdp":
                raise UpcycleError(f"train.{name} {degree} needs train.parallel: fsdp ({why}), not {self.parallel}")
        if self.max_steps < 1:
            raise UpcycleError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise UpcycleError(f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.aux_coef < 0 or self.z_coef < 0:
            raise UpcycleError("train.aux_coef and train.z_coef must be >= 0")
        if not self.bias_update_rate >= 0:
            raise UpcycleError(f"train.bias_update_rate must be >= 0 (0: off; DeepSeek-V3 used 1e-3), got "
                               f"{self.bias_update_rate}")
        if self.eval_every < 0 or self.eval_sequences < 1:
            raise UpcycleError("train.eval_every must be >= 0 and train.eval_sequences >= 1")


@dataclass
class CheckpointConfig:
    """Checkpoints under OUT/checkpoints/step_XXXXXXXX (see checkpoint.py for what each holds).

    Attributes:
        every: Save every this many optimizer steps, and always at the end; 0: only at the end (and on SIGTERM).
        keep: Keep the newest this many checkpoints, delete older ones.
        async_save: Write each checkpoint's state in a background thread while the next steps train (each rank first
            copies its share of the state in memory); the checkpoint appears, complete, once every rank has written
            its part. false: training waits for the write.
    """

    every: int = 500
    keep: int = 3
    async_save: bool = False

    def validate(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise UpcycleError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {self.every}, "
                               f"{self.keep}")


@dataclass
class WandbConfig:
    """A Weights & Biases run beside metrics.jsonl (rank 0 only): the same records, and the resolved config once.
    `WANDB_MODE=offline` writes it under OUT/wandb with no network (`wandb sync` uploads it later). A resumed run
    continues the same W&B run (its id is kept in OUT/wandb_run.json).

    Attributes:
        project: The W&B project.
        name: The run's name (default: W&B's own).
        entity: The W&B team or user (default: the logged-in user's).
        tags: Tags of the run.
        group: Groups runs in the W&B UI (`upcycle experiment` sets it to the experiment's output directory name).
        job_type: What kind of run this is (`upcycle experiment`: main, decay, branch).
    """

    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    job_type: str | None = None

    def validate(self) -> None:
        import importlib.util

        if not self.project.strip():
            raise UpcycleError("logging.wandb.project must not be empty")
        if importlib.util.find_spec("wandb") is None:
            raise UpcycleError("logging.wandb needs the wandb package: pip install 'upcycle[wandb]'")


@dataclass
class LoggingConfig:
    """What is reported besides OUT/metrics.jsonl (always written, one JSON object per optimizer step).

    Attributes:
        progress: Show a tqdm progress bar.
        tensorboard: Also write TensorBoard events to OUT/tensorboard when the tensorboard package is installed.
        wandb: Also log to Weights & Biases (a section: project, name, entity, tags, group, job_type); empty: off.
    """

    progress: bool = True
    tensorboard: bool = True
    wandb: WandbConfig | None = None

    def validate(self) -> None:
        if self.wandb is not None:
            self.wandb.validate()


SECTIONS: dict[str, type] = {"model": ModelConfig, "init": InitConfig, "data": DataConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "train": TrainLoopConfig, "checkpoint": CheckpointConfig,
                             "logging": LoggingConfig}


@dataclass
class TrainConfig:
    """A whole training run: the YAML file's top-level sections.

    Attributes:
        model: The architecture, to train from scratch. With init.source the architecture is the checkpoint's, and
            this section may only set the routing fields (router_activation, routed_scaling, capacity_factor), which
            then replace the checkpoint's.
        init: Where the weights come from, and online upcycling.
        data: Training and validation tokens.
        optim: AdamW.
        schedule: The learning rate schedule.
        train: The training loop.
        checkpoint: Checkpoints under OUT/checkpoints.
        logging: What is reported besides OUT/metrics.jsonl.
    """

    model: ModelConfig | None = None
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # with init.source: the model section's routing fields (ModelConfig.ROUTING_FIELDS), set over the checkpoint's
    model_routing: dict[str, Any] | None = field(default=None, metadata={"derived": True})

    def validate(self) -> None:
        """Every field's type, then each section's own checks, then the checks that span sections."""
        for name in SECTIONS:
            section = getattr(self, name)
            if section is None:  # only `model` may be absent
                continue
            check_fields(section, lambda field_name, section_name=name: f"{section_name}.{field_name}")
            if name != "model":  # ModelConfig checks itself when built
                section.validate()
        if self.init.source is None and self.model is None:
            raise UpcycleError("model: give the architecture (vocab_size, dim, num_layers, ...) to train from scratch, "
                               "or set init.source to start from a checkpoint")
        if self.init.source is not None and self.model is not None:
            raise UpcycleError("model: leave this section out when init.source is set; the architecture comes from "
                               "the checkpoint")
        if self.model_routing:
            try:
                check_routing(**self.model_routing)
            except UpcycleError as exc:
                raise UpcycleError(f"model.{exc}") from None
        if self.model is not None and self.data.seq_len > self.model.max_seq_len:
            raise UpcycleError(f"data.seq_len {self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        loop = self.train
        rows = self.data.seq_len * (loop.micro_batch_size or 1)
        if loop.global_batch_tokens < 1 or loop.global_batch_tokens % rows:
            what = "data.seq_len * train.micro_batch_size" if loop.micro_batch_size else "data.seq_len"
            raise UpcycleError(f"train.global_batch_tokens ({loop.global_batch_tokens}) must be a positive multiple of "
                               f"{what} = {rows}")


def micro_batch_size_for(sequences_per_rank: int, requested: int | None) -> int:
    """The micro-batch size a rank uses: `requested`, or (None, auto) the largest divisor of its sequences per step
    that is at most AUTO_MICRO_BATCH_MAX, so the rest is gradient accumulation and no micro-batch is ragged."""
    if requested is not None:
        return requested
    return max(d for d in range(1, min(sequences_per_rank, AUTO_MICRO_BATCH_MAX) + 1) if sequences_per_rank % d == 0)


def validate_config(config: TrainConfig) -> None:
    """Check every setting before any work starts; each error names the field and says what to do."""
    config.validate()


# ---------------------------------------------------------------------------------------------------------------------
# dict <-> config


def config_to_dict(config: TrainConfig) -> dict:
    """Plain YAML-safe dict (tuples become lists) of a config, for OUT/config.yaml and checkpoints (routing fields set
    over a checkpoint's are its model section, as they were given)."""
    values = to_dict(config)
    routing = values.pop("model_routing")
    if routing:
        values["model"] = routing
    return values


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a parsed YAML mapping (`upcycle.config.build`: unknown sections or fields are errors that
    name them, every value's type is checked). With init.source, a model section of routing fields only
    (ModelConfig.ROUTING_FIELDS) is kept as `model_routing`, to be set over the checkpoint's model."""
    if not isinstance(values, dict):
        raise UpcycleError("a training config must be a YAML mapping of sections (model, init, data, ...)")
    init, model, routing = values.get("init"), values.get("model"), None
    if isinstance(init, dict) and init.get("source") is not None and isinstance(model, dict):
        fixed = sorted(set(model) - set(ModelConfig.ROUTING_FIELDS))
        if fixed:
            raise UpcycleError(f"model.{fixed[0]}: with init.source the architecture comes from the checkpoint; the "
                               f"model section may only set {', '.join(ModelConfig.ROUTING_FIELDS)} (or leave it out)")
        routing = check_values(ModelConfig, model, "model", accepted=ModelConfig.ROUTING_FIELDS)
        values = {**values, "model": None}
    config = build(TrainConfig, values, what=WHAT)
    config.model_routing = routing
    return config


# ---------------------------------------------------------------------------------------------------------------------
# YAML and overrides


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UpcycleError(f"override {text!r} must look like section.field=value, e.g. optim.lr=1e-3")
    return key.strip().split("."), load_yaml(raw, f"override {text!r}", WHAT)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set each `section.field=value` (value read as YAML) in the parsed config mapping `values`, in place."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UpcycleError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return values


def read_yaml_config(path: str | Path) -> dict:
    """The parsed mapping of a YAML training config file (aliases and duplicate keys refused)."""
    return read_yaml(path, WHAT)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML training config and apply `section.field=value` overrides (values parsed as YAML), then validate.

    This is the Python-API twin of the CLI's `--config FILE --section.field VALUE`.
    """
    values = read_yaml_config(path)
    if not isinstance(values, dict):
        raise UpcycleError(f"{path}: a training config must be a YAML mapping of sections (model, init, data, ...), "
                           f"not a {type(values).__name__}")
    config = config_from_dict(apply_overrides(values, list(overrides)))
    validate_config(config)
    return config


def config_fields_help() -> str:
    """Every overridable field with its type, default and doc, for `upcycle train --help`."""
    return fields_help(TrainConfig, "config fields (override any with --section.field VALUE; each is documented in "
                       "docs/training.md):", flags=True)
