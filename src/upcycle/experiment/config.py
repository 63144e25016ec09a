"""The experiment config: one dataclass per YAML section, each checking its own fields in `validate()`, and
`ExperimentConfig.validate` for what spans sections or needs the seed model and the data. Read (aliases and duplicate
keys refused), built and listed for `upcycle experiment --help` by `upcycle.config`, as every config of ours, here and
when OUT/experiment.yaml is read back.

Everything that can be checked from the config, the seed's config.json, the data's metadata and token files and the
calibration text is checked here, before any work: an error is one line that starts with the field's name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from upcycle.data import prepare as data_lib
from upcycle.formats import hf_formats as hf
from upcycle.config import build, check_values, fields_help, read_yaml, refuse_unknown, to_dict
from upcycle.convert.options import ConvertOptions
from upcycle.data.prepare import calibration_token_ids
from upcycle.errors import UpcycleError
from upcycle.hardware import format_bytes, host_memory
from upcycle.train.schedule import wsd_decay_start
from upcycle.train.config import DataConfig, InitConfig, config_from_dict, validate_config
from upcycle.validation import short_repr

CONFIG_FILE = "experiment.yaml"
ARM_KINDS = ("dense", "fs", "naive", "noise", "drop", "btx", "grow", "continue")
# Kinds whose model is always an MoE (a continue arm is one when the arm it starts from is).
MOE_KINDS = ("fs", "naive", "noise", "drop", "btx", "grow")
# Kinds that start from another arm's trained model (from_arm, at the same seed) instead of the seed model.
FROM_ARM_KINDS = ("grow", "continue")
# What arm.json and results.json record for those kinds besides every arm's fields: the source arm, and the model's own
# MoE shape (null for a continue of the dense arm).
FROM_ARM_FIELDS = ("from_arm", "num_experts", "top_k")
INDEX_MODES = ("independent", "shared")
# What each arm kind is called by `upcycle convert --method`.
CONVERT_METHOD = {"fs": "scratch", "naive": "naive", "noise": "noise", "drop": "drop", "btx": "btx"}
# ConvertOptions fields an arm's `convert` mapping may not set: the experiment sets them from the arm and the config.
EXPERIMENT_CONVERT_FIELDS = ("method", "ratio", "index_mode", "num_experts", "top_k", "seed", "dtype", "btx_sources")
RECIPE_SECTIONS = ("optim", "schedule", "train", "checkpoint", "logging")
# Recipe fields the experiment sets itself, with what decides them instead.
OWNED_RECIPE_FIELDS = {
    "train.max_steps": "budgets",
    "train.eval_every": "eval",
    "train.eval_sequences": "eval",
    "train.seed": "seeds",
    "schedule.decay_steps": "budgets: each budget ends its own schedule",
    "checkpoint.keep": "one checkpoint per run is kept; measured ones are deleted",
}
WHAT = "an experiment config"  # how messages name the file
MAX_NAME_LENGTH = 64  # an arm name is a directory name; with OUT's own paths around it, keep it short
MAX_SEED = 2**32 - 1  # every consumer (numpy, torch, convert's derived generators) takes it
CONFIDENCE = 0.95  # every interval the report gives


def _show(value: Any, limit: int = 60) -> str:
    """A value for an error message, shortened: a config may hold a huge value, and the message stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _fail(where: str, message: str) -> UpcycleError:
    return UpcycleError(f"{where}: {message}")


# ---------------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataSection(DataConfig):
    """The data every arm trains and is evaluated on: `path` (prepared) or `sources` (raw text, tokenized once). The
    training config's data section, less its `seed` (the experiment's `seeds` set each run's), plus `val_sources`.

    Attributes:
        path: A directory written by `upcycle data prepare`.
        sources: Raw text per domain {DOMAIN: [file or directory, ...]} (.jsonl with a "text" field or plain text,
            optionally .gz), tokenized once into OUT/data for every arm.
        val_sources: Held-out text per domain (optional); domains without it hold out `val_fraction` of their
            documents.
        tokenizer: Tokenizer directory for `sources` (default: the seed model's directory).
        val_fraction: Share of documents held out per domain when a domain has no `val_sources`.
        seq_len: Tokens per training and validation sequence.
        weights: Domain sampling weights {DOMAIN: weight}; empty: proportional to each domain's training tokens (the
            paper). The mixture-weighted mean loss weights the domains the same way.
    """

    seq_len: int = 256
    val_sources: dict[str, list[str] | str] | None = None

    RENAMED: typing.ClassVar[dict[str, str]] = {"seed": "seeds, at the top level"}

    def __post_init__(self) -> None:
        for group in ("sources", "val_sources"):  # one path may stand for a list of one
            paths = getattr(self, group)
            if isinstance(paths, dict):
                setattr(self, group, {k: [v] if isinstance(v, str) else v for k, v in paths.items()})

    def validate(self) -> None:
        if (self.path is None) == (self.sources is None):
            raise _fail("data", "set exactly one of data.path (a prepared directory) or data.sources (raw text)")
        if self.path is not None:
            if self.val_sources is not None or self.tokenizer is not None:
                raise _fail("data.path", "val_sources and tokenizer belong to data.sources, not to a prepared "
                            "data.path")
            try:
                data_lib.read_metadata(self.path)
            except UpcycleError as exc:
                raise _fail("data.path", str(exc)) from None
        for group in ("sources", "val_sources"):
            for domain, paths in (getattr(self, group) or {}).items():
                where = f"data.{group}.{domain}"
                if not data_lib.valid_domain_name(domain):
                    raise _fail(f"data.{group}", f"domain name {_show(domain)} must be letters, digits, '-' or '_' "
                                "(it becomes a file name)")
                if not paths:
                    raise _fail(where, "give at least one file or directory")
                for p in paths:
                    if not (Path(p).is_file() or Path(p).is_dir()):
                        what = "does not exist" if not os.path.lexists(p) else "is not a regular file or directory"
                        raise _fail(where, f"{p} {what}")
        extra = sorted(set(self.val_sources or {}) - set(self.sources or {}))
        if extra:
            raise _fail("data.val_sources", f"domain {extra[0]} has no data.sources entry")
        if self.tokenizer is not None and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise _fail("data.tokenizer", f"{self.tokenizer} has no tokenizer.json")
        if not 0 <= self.val_fraction < 1:
            raise _fail("data.val_fraction", f"must lie in [0, 1), got {self.val_fraction}")
        if self.seq_len < 1:
            raise _fail("data.seq_len", f"must be >= 1, got {self.seq_len}")
        if self.weights is not None:
            data_lib.check_weights(self.weights, "data.weights")

    def domains(self) -> list[str]:
        if self.path is not None:
            return sorted(data_lib.read_metadata(self.path)["domains"])
        return sorted(self.sources)


@dataclass
class MoESection:
    """The MoE shape of every MoE arm.

    Attributes:
        num_experts: Experts per MoE layer.
        top_k: Experts per token.
    """

    num_experts: int = 8
    top_k: int = 2

    def validate(self) -> None:
        if self.num_experts < 1:
            raise _fail("moe.num_experts", f"must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise _fail("moe.top_k", f"must lie in [1, moe.num_experts={self.num_experts}], got {self.top_k}")


@dataclass
class EvalSection:
    """What every arm is measured on, and where.

    Attributes:
        points: Evaluation points along each arm's longest run (its learning-rate curve included, so these are
            mid-schedule values, reported without verdicts): an integer N (N steps spaced evenly on a log scale from
            step 1 to the largest budget) or a list of token counts (whole steps). The untrained model and every
            budget's end are always measured.
        tokens: Validation tokens per domain, in sequences of data.seq_len spread evenly over the domain's validation
            split; empty: the whole validation split. The same tokens for every arm, seed and point.
        train_tokens: Training tokens per domain (sequences spread evenly over the domain's training split) scored at
            every budget's end, for the gap between training and validation loss.
    """

    points: int | list[int] = 6
    tokens: int | None = None
    train_tokens: int = 16384

    def validate(self) -> None:
        if isinstance(self.points, int) and self.points < 1:
            raise _fail("eval.points", f"must be a count >= 1 or a list of token counts, got {self.points}")
        if isinstance(self.points, list) and (not self.points or any(t < 1 for t in self.points)):
            raise _fail("eval.points", f"a list of token counts must hold positive counts, got {_show(self.points)}")
        if self.tokens is not None and self.tokens < 1:
            raise _fail("eval.tokens", f"must be >= 1 (or empty: the whole validation split), got {self.tokens}")
        if self.train_tokens < 1:
            raise _fail("eval.train_tokens", f"must be >= 1, got {self.train_tokens}")


@dataclass
class PrimarySection:
    """The comparison the study is designed to decide, declared before it runs: the gaps of `arms` to the reference
    arm (the first naive arm) at one budget, over one mean. Their verdicts use Holm-adjusted p-values over this family;
    every other gap of the report is exploratory.

    Attributes:
        arms: The arms of the primary family (empty: no primary comparison, every gap is exploratory).
        budget: The budget (tokens, one of budgets) the primary comparison is read at; empty: the largest.
        mean: Which loss decides: mean (over domains, equal weights) or mixture (weighted by the training mixture).
    """

    arms: list[str] = field(default_factory=list)
    budget: int | None = None
    mean: str = field(default="mean", metadata={"choices": ("mean", "mixture")})


@dataclass
class ArmSpec:
    """One arm of the comparison.

    Attributes:
        name: Unique name, used as a directory name: letters, digits, '.', '-', '_', starting with a letter or digit,
            at most 64 characters.
        kind: dense (the seed trained on: the compute reference), fs (MoE from scratch), naive (every expert a copy),
            noise (random-noise upcycling), drop (Drop-Upcycling), btx (Branch-Train-MiX), grow (`upcycle grow` of
            another arm's trained MoE) or continue (another arm's trained model as it is: the control for grow).
        ratio: drop, noise and grow: r in [0, 1] (default 0.5).
        index_mode: drop, noise and grow: independent (a fresh neuron set per matrix, the authors' released code;
            default) or shared (one set per expert, the paper's Figure 1).
        from_arm: grow and continue: an arm listed earlier; at each seed this arm starts from that arm's final model
            at the same seed (the end of its largest budget's run, fp32) and is trained with the recipe for every
            budget (a fresh schedule). grow needs an MoE arm.
        factor: grow: every expert becomes factor experts (an integer >= 2; default 2).
        top_k: grow: experts per token after growing, in [1, factor x the source's experts] (default factor x the
            source's top-k, which keeps r = 0 the source's function).
        branch_tokens: btx: training tokens of each dense branch (whole steps).
        domains: btx: the domains that get a branch (default: every domain of the data; at least 2).
        include_seed: btx: the seed itself is one more source, as in the paper (default true).
        convert: MoE arms but grow and continue: further `upcycle convert` options for the arm's initial model, by
            their ConvertOptions field names, e.g. {router_init: data, calibration: FILE} or {granularity: 2}; the
            fields the experiment sets (method, ratio, index_mode, num_experts, top_k, seed, dtype, btx_sources) are
            not allowed.
        seeds: The seeds this arm runs at, some of the experiment's seeds (default: all of them). The reference arm
            (the first naive arm) runs at every seed, so every gap is paired by seed.
        train: Any arm: fields of the recipe's train section set for this arm only, by the train config's field
            names, e.g. {bias_update_rate: 1.0e-3, aux_coef: 0} for aux-loss-free balancing; the fields the
            experiment sets (max_steps, eval_every, eval_sequences, seed) are not allowed.
        model: MoE arms: routing fields set over the arm's initial model (router_activation, routed_scaling,
            capacity_factor), e.g. {router_activation: sigmoid}.
    """

    name: str
    kind: str = field(metadata={"choices": ARM_KINDS})
    ratio: float | None = None
    index_mode: str | None = field(default=None, metadata={"choices": INDEX_MODES})
    branch_tokens: int | None = None
    domains: list[str] | None = None
    include_seed: bool | None = None
    convert: dict[str, Any] | None = None
    from_arm: str | None = None
    factor: int | None = None
    top_k: int | None = None
    seeds: list[int] | None = None
    train: dict[str, Any] | None = None
    model: dict[str, Any] | None = None

    KIND_FIELDS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "dense": (), "fs": (), "naive": (), "noise": ("ratio", "index_mode"), "drop": ("ratio", "index_mode"),
        "btx": ("branch_tokens", "domains", "include_seed"),
        "grow": ("from_arm", "factor", "ratio", "index_mode", "top_k"), "continue": ("from_arm",)}
    OPTIONAL_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "ratio", "index_mode", "branch_tokens", "domains", "include_seed", "from_arm", "factor", "top_k")

    @staticmethod
    def config_where(where: str, values: dict) -> str:
        """How messages name the arm at `where` (`arms[2]`): with its name, `arms[2] (drop)`, once the name is valid."""
        name = values.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or not name[0].isalnum() \
                or not all(c.isascii() and (c.isalnum() or c in ".-_") for c in name):
            raise UpcycleError(f"{where}.name must be a directory name of at most {MAX_NAME_LENGTH} letters, digits, "
                               f"'.', '-', '_', starting with a letter or digit, got {short_repr(name)}")
        return f"{where} ({name})"

    def validate(self, where: str, domains: list[str], num_experts: int) -> None:
        """Fill in the kind's defaults and check the fields (convert options are checked by `convert_options`; what
        from_arm names, and a grow arm's top_k, by `ExperimentConfig._check_from_arms`)."""
        for name in self.OPTIONAL_FIELDS:
            if getattr(self, name) is not None and name not in self.KIND_FIELDS[self.kind]:
                raise _fail(f"{where}.{name}", f"is not used by kind {self.kind}; remove it")
        if self.kind in FROM_ARM_KINDS:
            if self.from_arm is None:
                raise _fail(f"{where}.from_arm", f"{self.kind} starts from another arm's trained model: name that "
                            "arm (one listed earlier)")
            if self.convert is not None:
                raise _fail(f"{where}.convert", f"a {self.kind} arm is not converted from the seed model (it starts "
                            f"from arm {self.from_arm}'s model); remove it")
        if self.kind == "grow":
            self.factor = 2 if self.factor is None else self.factor
            if self.factor < 2:
                raise _fail(f"{where}.factor", f"must be an integer >= 2 (E experts become factor x E), got "
                            f"{self.factor}")
        if self.kind in ("noise", "drop", "grow"):
            self.ratio = 0.5 if self.ratio is None else float(self.ratio)
            if not 0 <= self.ratio <= 1:
                raise _fail(f"{where}.ratio", f"must lie in [0, 1], got {self.ratio:g}")
            self.index_mode = self.index_mode or "independent"
        if self.kind == "btx":
            if self.branch_tokens is None:
                raise _fail(f"{where}.branch_tokens", "btx needs the training tokens of each dense branch")
            if self.branch_tokens < 1:
                raise _fail(f"{where}.branch_tokens", f"must be >= 1, got {self.branch_tokens}")
            self.domains = list(domains) if self.domains is None else self.domains
            unknown = sorted(set(self.domains) - set(domains))
            if unknown:
                raise _fail(f"{where}.domains", f"unknown domain {_show(unknown[0])}; the data has "
                            f"{', '.join(domains)}")
            if len(set(self.domains)) != len(self.domains):
                raise _fail(f"{where}.domains", "lists a domain twice")
            if len(self.domains) < 2:
                raise _fail(f"{where}.domains", f"btx needs at least 2 domains to branch on, got {self.domains}")
            self.include_seed = True if self.include_seed is None else self.include_seed
            sources = len(self.domains) + int(self.include_seed)
            if num_experts % sources:
                raise _fail(where, f"btx gives each of its {sources} sources (branches"
                            f"{' + seed' if self.include_seed else ''}) num_experts / sources experts, but "
                            f"moe.num_experts = {num_experts} is not divisible by {sources}")
        if self.convert is not None and self.kind == "dense":
            raise _fail(f"{where}.convert", "the dense arm is not converted; remove it")
        if self.model is not None and self.kind == "dense":
            raise _fail(f"{where}.model", "sets the routing of an MoE, and the dense arm has none; remove it")
        for key in self.train or {}:
            if f"train.{key}" in OWNED_RECIPE_FIELDS:
                decided_by = OWNED_RECIPE_FIELDS[f"train.{key}"]
                raise _fail(f"{where}.train.{key}", f"is set by the experiment ({decided_by}); remove it")
        if (self.train or {}).get("expert_parallel", 1) != 1:
            raise _fail(f"{where}.train.expert_parallel", "every arm trains in one process; remove it (or set 1)")

    def convert_options(self, config: ExperimentConfig, seed: int) -> ConvertOptions:
        """The `upcycle convert` options of this arm's initial model at `seed` (btx: without its sources)."""
        values = dict(method=CONVERT_METHOD[self.kind], num_experts=config.moe.num_experts, top_k=config.moe.top_k,
                      seed=seed, dtype="float32")
        if self.kind in ("drop", "noise"):
            values.update(ratio=self.ratio, index_mode=self.index_mode)
        values.update(self.convert or {})
        return ConvertOptions(**values)


@dataclass(kw_only=True)
class ExperimentConfig:
    """A whole experiment: the YAML file's top-level fields.

    Attributes:
        seed_model: The dense HF checkpoint every arm starts from (e.g. assets/seed).
        seeds: Every arm runs once per seed; a seed sets the data order, the upcycling draws, the router init and the
            from-scratch init. Gaps to naive are paired by seed; with 2 or more seeds the report gives intervals
            across seeds.
        data: The data (its fields below).
        moe: The MoE shape (its fields below).
        budgets: Training tokens (whole steps of recipe.train.global_batch_tokens), in increasing order; every budget
            ends its own learning-rate schedule. With recipe.schedule.kind wsd, one stable run per arm and seed and a
            decay branch off it per budget; with cosine, one run per budget.
        eval: The measurements (its fields below).
        arms: The list of arms (its fields below); names unique.
        primary: The primary comparison, declared before the study runs (its fields below); without it every gap is
            exploratory.
        recipe: One training recipe for every arm: the optim, schedule, train, checkpoint and logging sections of an
            `upcycle train` config (upcycle train --help), except train.max_steps, train.eval_every,
            train.eval_sequences, train.seed, schedule.decay_steps and checkpoint.keep, which the experiment sets.
    """

    seed_model: str
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataSection = field(default_factory=DataSection)
    moe: MoESection = field(default_factory=MoESection)
    budgets: list[int]
    eval: EvalSection = field(default_factory=EvalSection)
    arms: list[ArmSpec]
    primary: PrimarySection = field(default_factory=PrimarySection)
    recipe: dict[str, Any] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list, metadata={"derived": True})  # from the data

    RENAMED: typing.ClassVar[dict[str, str]] = {"seed": "seeds: [N, ...]", "budget_tokens": "budgets: [TOKENS, ...]"}

    def validate(self) -> None:
        """Every check that needs no more than the config, the seed's files, the data and the calibration text."""
        seed_config = _seed_config(self.seed_model)
        self.seed_model = str(Path(self.seed_model).resolve())
        if not self.seeds:
            raise _fail("seeds", "give at least one seed, e.g. [0]")
        for seed in self.seeds:
            if not 0 <= seed <= MAX_SEED:
                raise _fail("seeds", f"every seed must lie in [0, {MAX_SEED}], got {_show(seed)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise _fail("seeds", f"lists a seed twice: {self.seeds}")
        self.data.validate()
        self._resolve_data_paths()
        self.domains = self.data.domains()
        clash = sorted(set(self.domains) & {"mean", "mixture"})
        if clash:
            raise _fail("data", f"a domain may not be named {clash[0]}: the report uses that name for a mean over "
                        "domains; rename it")
        self._check_data_fits(seed_config)
        self.moe.validate()
        shapes = hf.read_shapes(seed_config)
        _check_moe_fits(self, ConvertOptions(method="naive", num_experts=self.moe.num_experts, top_k=self.moe.top_k),
                        "moe.num_experts")
        self.eval.validate()
        if not self.arms:
            raise _fail("arms", "give a non-empty list of arms, e.g. [{name: naive, kind: naive}]")
        for index, arm in enumerate(self.arms):
            arm.validate(arm_where(index, arm), self.domains, self.moe.num_experts)
        names = [arm.name for arm in self.arms]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise _fail("arms", f"two arms are named {duplicate!r}; names must be unique")
        self._check_arm_seeds()
        self._check_from_arms(seed_config, shapes)
        for index, arm in enumerate(self.arms):
            if arm.kind not in ("dense", *FROM_ARM_KINDS):
                self._check_convert(index, arm, seed_config, shapes)
        self._check_recipe_and_budgets()
        self._check_primary()

    def seeds_of(self, arm: ArmSpec) -> list[int]:
        """The seeds `arm` runs at, in the order of `seeds`."""
        return [seed for seed in self.seeds if arm.seeds is None or seed in arm.seeds]

    def reference_arm(self) -> ArmSpec | None:
        """The arm every gap is measured against: the first naive arm (None without one)."""
        return next((arm for arm in self.arms if arm.kind == "naive"), None)

    # -- the parts of validate ----------------------------------------------------------------------------------------

    def _resolve_data_paths(self) -> None:
        d = self.data
        if d.path is not None:
            d.path = str(Path(d.path).resolve())
            return
        d.sources = {k: [str(Path(p).resolve()) for p in v] for k, v in d.sources.items()}
        if d.val_sources is not None:
            d.val_sources = {k: [str(Path(p).resolve()) for p in v] for k, v in d.val_sources.items()}
        d.tokenizer = str(Path(d.tokenizer or self.seed_model).resolve())
        if not (Path(d.tokenizer) / "tokenizer.json").is_file():
            raise _fail("data.tokenizer", f"{d.tokenizer} has no tokenizer.json")

    def _check_data_fits(self, seed_config: dict) -> None:
        """The one "data fits the model" check (data.check_data_fits: vocabulary, every token file's largest id, the
        sequence length), or before raw sources are tokenized, the tokenizer's vocabulary."""
        d, vocab_size = self.data, seed_config["vocab_size"]
        max_positions = seed_config.get("max_position_embeddings") or d.seq_len
        if d.weights is not None:
            unknown = sorted(set(d.weights) - set(self.domains))
            if unknown:
                raise _fail("data.weights", f"unknown domain {_show(unknown[0])}; the data has "
                            f"{', '.join(self.domains)}")
        try:
            data_lib.check_data_fits(d.path, vocab_size=vocab_size, max_seq_len=max_positions, seq_len=d.seq_len,
                                     seq_len_name="data.seq_len", tokenizer=d.tokenizer, tokenizer_name="the tokenizer")
        except UpcycleError as exc:
            raise _fail("data.path" if d.path is not None else "data.tokenizer", f"{exc} (seed_model "
                        f"{self.seed_model})") from None
        if d.path is not None:
            check_validation_split(Path(d.path), d.seq_len)

    def _check_arm_seeds(self) -> None:
        """An arm's seeds are some of the experiment's, each once; the reference arm runs at every seed (gaps are
        paired by seed) and a grow or continue arm only at seeds its from_arm runs at."""
        reference = self.reference_arm()
        for index, arm in enumerate(self.arms):
            if arm.seeds is None:
                continue
            where = f"{arm_where(index, arm)}.seeds"
            unknown = sorted(set(arm.seeds) - set(self.seeds))
            if not arm.seeds or unknown or len(set(arm.seeds)) != len(arm.seeds):
                what = f"{unknown[0]} is not" if unknown else "give each seed once, some" if arm.seeds else "give some"
                raise _fail(where, f"{what} of the experiment's seeds {self.seeds}, got {_show(arm.seeds)}")
            if arm is reference and set(arm.seeds) != set(self.seeds):
                raise _fail(where, "the reference arm (the first naive arm) runs at every seed, so that every gap "
                            "is paired by seed; remove its seeds")
        for index, arm in enumerate(self.arms):
            source = next((a for a in self.arms if a.name == arm.from_arm), None)
            if source is not None and set(self.seeds_of(arm)) - set(self.seeds_of(source)):
                raise _fail(f"{arm_where(index, arm)}.seeds", f"runs at seeds its from_arm {source.name} does not "
                            f"({self.seeds_of(source)}); give it some of those")

    def _check_primary(self) -> None:
        """The primary family names arms of this config, each once, not the reference itself, at one of the budgets."""
        primary, names = self.primary, [arm.name for arm in self.arms]
        if not primary.arms:
            if primary.budget is not None:
                raise _fail("primary.budget", "there is no primary comparison without primary.arms; name its arms")
            return
        reference = self.reference_arm()
        if reference is None:
            raise _fail("primary.arms", "a primary comparison is a gap to the reference arm, the first naive arm; "
                        "add a naive arm")
        for name in primary.arms:
            if name not in names:
                raise _fail("primary.arms", f"{_show(name)} is not an arm; the config has {', '.join(names)}")
            if name == reference.name:
                raise _fail("primary.arms", f"{name} is the reference arm every gap is measured against; remove it")
        if len(set(primary.arms)) != len(primary.arms):
            raise _fail("primary.arms", f"lists an arm twice: {primary.arms}")
        if primary.budget is not None and primary.budget not in self.budgets:
            raise _fail("primary.budget", f"{primary.budget} is not one of the budgets {self.budgets}")

    def _check_from_arms(self, seed_config: dict, shapes: hf.Shapes) -> None:
        """A from_arm names an arm listed earlier (so running the arms in order runs it first); grow's source is an
        MoE (an MoE arm, or a continue or grow of one); a grow arm's top_k (default: factor x the source's) fits its
        experts, and its grown MoE fits this machine's memory for training."""
        for index, arm in enumerate(self.arms):
            if arm.kind not in FROM_ARM_KINDS:
                continue
            where = arm_where(index, arm)
            earlier = [a.name for a in self.arms[:index]]
            if arm.from_arm not in earlier:
                listed = "is this arm itself" if arm.from_arm == arm.name else (
                    "is listed after this arm" if arm.from_arm in [a.name for a in self.arms] else "is not an arm")
                raise _fail(f"{where}.from_arm", f"{_show(arm.from_arm)} {listed}; name an arm listed before this one "
                            f"({', '.join(earlier) or 'there is none'})")
            if arm.kind != "grow":
                continue
            source = arm_moe_shape(self.arms, arm.from_arm, self.moe.num_experts, self.moe.top_k)
            if source is None:
                raise _fail(f"{where}.from_arm", f"{arm.from_arm}'s model is dense; grow needs an MoE arm")
            experts = arm.factor * source[0]
            arm.top_k = arm.factor * source[1] if arm.top_k is None else arm.top_k
            if not 1 <= arm.top_k <= experts:
                raise _fail(f"{where}.top_k", f"must lie in [1, {experts}] (factor {arm.factor} x {source[0]} "
                            f"experts of {arm.from_arm}), got {arm.top_k}")
            root = _root_arm(self.arms, arm)
            options = root.convert_options(self, self.seeds[0])
            options = dataclasses.replace(options, method="naive" if root.kind == "btx" else options.method,
                                          btx_sources=(), num_experts=experts, top_k=arm.top_k)
            _check_moe_fits(self, options, f"{where}.factor")

    def _check_convert(self, index: int, arm: ArmSpec, seed_config: dict, shapes: hf.Shapes) -> None:
        """An arm's convert options: their types, convert's own validation, the checks against the seed's shapes
        (moe_layers, the shared expert's format), the memory the MoE needs, and the calibration text."""
        where = f"{arm_where(index, arm)}.convert"
        values = arm.convert or {}
        for key in values:
            if key in EXPERIMENT_CONVERT_FIELDS:
                raise _fail(f"{where}.{key}", "is set by the experiment (from the arm's kind, ratio, index_mode and "
                            "the moe and seeds fields); remove it")
        known = [f.name for f in dataclasses.fields(ConvertOptions) if f.name not in EXPERIMENT_CONVERT_FIELDS]
        values.update(check_values(ConvertOptions, values, where, accepted=known))
        if isinstance(values.get("calibration"), str):
            if not Path(values["calibration"]).is_file():
                raise _fail(f"{where}.calibration", f"{values['calibration']} is not a file")
            values["calibration"] = str(Path(values["calibration"]).resolve())
        options = arm.convert_options(self, self.seeds[0])
        if arm.kind == "btx":  # its other sources are trained later; the seed stands in for their shapes
            options = dataclasses.replace(options, btx_sources=(self.seed_model,) * (len(arm.domains)
                                                                                       + arm.include_seed - 1))
        try:
            options.validate()
            fmt = hf.resolve_format(seed_config, options.format)
            options.check_source(shapes, fmt)
        except UpcycleError as exc:
            raise _fail(where, str(exc)) from None
        _check_moe_fits(self, options, where)
        if options.calibration is not None:
            try:
                calibration_token_ids(options.calibration, self.seed_model, options.calibration_tokens)
            except UpcycleError as exc:
                raise _fail(f"{where}.calibration", str(exc)) from None

    def _check_recipe_and_budgets(self) -> None:
        recipe = self.recipe
        refuse_unknown(recipe, RECIPE_SECTIONS, "recipe")
        for name in RECIPE_SECTIONS:
            if recipe.get(name) is not None and not isinstance(recipe[name], dict):
                raise UpcycleError(f"recipe.{name} must be a mapping, got {short_repr(recipe[name])}")
        for dotted, decided_by in OWNED_RECIPE_FIELDS.items():
            section, key = dotted.split(".")
            if key in (recipe.get(section) or {}):
                raise _fail(f"recipe.{dotted}", f"is set by the experiment ({decided_by}); remove it")
        if (recipe.get("train") or {}).get("expert_parallel", 1) != 1:
            raise _fail("recipe.train.expert_parallel", "every arm trains in one process, so expert parallelism "
                        "has no ranks to split the experts over; remove it (or set 1)")
        # The recipe's sections are parsed and type-checked by the trainer itself, as one run's config.
        try:
            template = config_from_dict(train_config_dict(self, init_source=self.seed_model, max_steps=1, seed=0))
        except UpcycleError as exc:
            raise UpcycleError(f"recipe: {exc}") from None
        step_tokens, warmup = template.train.global_batch_tokens, template.schedule.warmup_steps
        _validate_train_dict(train_config_dict(self, init_source=self.seed_model, max_steps=max(1, warmup), seed=0),
                             "recipe")
        if not self.budgets:
            raise _fail("budgets", "give at least one training budget in tokens, e.g. [1048576]")
        for tokens in self.budgets:
            if tokens < 1 or tokens % step_tokens:
                raise _fail("budgets", f"{tokens} is not a positive whole number of steps of "
                            f"recipe.train.global_batch_tokens = {step_tokens}")
        if sorted(set(self.budgets)) != self.budgets:
            raise _fail("budgets", f"list each budget once, in increasing order, got {_show(self.budgets)}")
        if warmup > self.budgets[0] // step_tokens:
            raise _fail("recipe.schedule.warmup_steps", f"{warmup} exceeds the smallest budget's "
                        f"{self.budgets[0] // step_tokens} steps")
        if isinstance(self.eval.points, list):
            for t in self.eval.points:
                if t % step_tokens or t > self.budgets[-1]:
                    raise _fail("eval.points", f"{t} is not a whole number of steps of {step_tokens} tokens within "
                                f"the largest budget, {self.budgets[-1]}")
        for tokens in self.budgets:
            _validate_train_dict(train_config_dict(self, init_source=self.seed_model, max_steps=tokens // step_tokens,
                                                   seed=self.seeds[0]), "recipe")
        for index, arm in enumerate(self.arms):  # an arm's own train fields and routing, checked as its runs see them
            if arm.train or arm.model:
                _validate_train_dict(train_config_dict(self, init_source=self.seed_model,
                                                       max_steps=self.budgets[-1] // step_tokens, seed=self.seeds[0],
                                                       arm=arm), arm_where(index, arm))
        for index, arm in enumerate(self.arms):
            if arm.kind != "btx":
                continue
            where = f"{arm_where(index, arm)}.branch_tokens"
            if arm.branch_tokens % step_tokens:
                raise _fail(where, f"{arm.branch_tokens} is not a whole number of steps of "
                            f"recipe.train.global_batch_tokens = {step_tokens}")
            if warmup > arm.branch_tokens // step_tokens:
                raise _fail(where, f"{arm.branch_tokens // step_tokens} steps are fewer than "
                            f"recipe.schedule.warmup_steps = {warmup}")
            branch = train_config_dict(self, init_source=self.seed_model, max_steps=arm.branch_tokens // step_tokens,
                                       seed=self.seeds[0], weights={arm.domains[0]: 1.0})
            _validate_train_dict(branch, f"{arm_where(index, arm)} branch")

    # -- derived ------------------------------------------------------------------------------------------------------

    def train_template(self):
        """The recipe as the trainer reads it (a TrainConfig; the run-specific fields are placeholders)."""
        return config_from_dict(train_config_dict(self, init_source=self.seed_model, max_steps=1, seed=0))

    def plan(self) -> ExperimentPlan:
        template = self.train_template()
        s = template.schedule
        step_tokens = template.train.global_batch_tokens
        budget_steps = [t // step_tokens for t in self.budgets]
        branch = {}
        if s.kind == "wsd":
            branch = {n: wsd_decay_start(n, warmup_steps=s.warmup_steps, decay_fraction=s.decay_fraction)
                      for n in budget_steps[:-1]}
        return ExperimentPlan(tokens_per_step=step_tokens, budget_steps=budget_steps, schedule=s.kind,
                              eval_steps=eval_steps(self.eval.points, budget_steps[-1], step_tokens),
                              branch_steps=branch)


@dataclass(frozen=True)
class ExperimentPlan:
    """What every arm and seed trains and where it is measured, in optimizer steps."""

    tokens_per_step: int
    budget_steps: list[int]  # increasing; the last one is the main run's
    schedule: str  # cosine or wsd
    eval_steps: list[int]  # mid-schedule points along the main run
    branch_steps: dict[int, int]  # wsd: budget -> the main run's step its decay branch starts from


def arm_where(index: int, arm: ArmSpec) -> str:
    return f"arms[{index}] ({arm.name})"


def _root_arm(arms: list[ArmSpec], arm: ArmSpec) -> ArmSpec:
    """The arm at the start of `arm`'s from_arm chain: the one made from the seed model."""
    while arm.kind in FROM_ARM_KINDS:
        arm = next(a for a in arms if a.name == arm.from_arm)
    return arm


def arm_moe_shape(arms: list[ArmSpec], name: str, num_experts: int, top_k: int) -> tuple[int, int] | None:
    """(experts, top-k) of arm `name`'s model, None when it is dense: moe.num_experts and moe.top_k, grown by each
    grow arm on its from_arm chain (the arms validated up to `name`)."""
    arm = next(a for a in arms if a.name == name)
    if arm.kind == "dense":
        return None
    if arm.kind not in FROM_ARM_KINDS:
        return num_experts, top_k
    source = arm_moe_shape(arms, arm.from_arm, num_experts, top_k)
    if arm.kind == "continue" or source is None:
        return source
    return arm.factor * source[0], arm.factor * source[1] if arm.top_k is None else arm.top_k


def eval_steps(points: int | list[int], total_steps: int, tokens_per_step: int) -> list[int]:
    """Optimizer steps at which the main run is measured (its last step always among them).

    An integer N gives N steps spaced evenly on a log scale from step 1 to the last step (duplicates after rounding
    merged; never more than there are steps); a list gives token counts, each a whole number of steps.
    """
    if isinstance(points, int):
        count = min(max(points, 1), total_steps)
        steps = np.unique(np.round(np.geomspace(1, total_steps, num=count)).astype(int)).tolist()
    else:
        steps = sorted({t // tokens_per_step for t in points})
    if not steps or steps[-1] != total_steps:
        steps.append(total_steps)
    return [int(s) for s in steps]


def check_validation_split(data_dir: Path, seq_len: int) -> None:
    """Every domain's validation split holds at least one sequence to score."""
    metadata = data_lib.read_metadata(data_dir)
    for domain, info in sorted(metadata["domains"].items()):
        if data_lib.num_chunks(info["val"]["tokens"], seq_len) == 0:
            raise _fail("data", f"domain {domain} of {data_dir} has {info['val']['tokens']} validation tokens, fewer "
                        f"than one sequence of data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or hold out more")


def _seed_config(seed_model: str) -> dict:
    path = Path(seed_model) / "config.json"
    if not path.is_file():
        raise _fail("seed_model", f"must be a dense HF checkpoint directory (with config.json), got "
                    f"{_show(seed_model)}")
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
        if config.get("num_local_experts") or config.get("num_experts"):
            raise _fail("seed_model", f"{seed_model} is an MoE model; the experiment starts from a dense checkpoint")
        hf.check_dense_config(config)
        hf.read_shapes(config)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _fail("seed_model", f"{path} is not a readable dense config.json ({_show(str(exc))})") from None
    except UpcycleError as exc:
        raise _fail("seed_model", str(exc)) from None
    return config


def moe_training_bytes(config: ExperimentConfig, options: ConvertOptions) -> int | None:
    """The memory one training run of the MoE that `options` make from the seed needs, as `upcycle plan` counts it
    (plan.make_plan: one process on the CPU, the recipe's micro-batch; the fp32 weights, gradients and AdamW state,
    the activations and the process's runtime, at the phase that needs most). Activations are counted in fp32 where
    the recipe says precision auto (no probe runs while a config is checked), and the router as initialized
    uniformly (its init changes no size; the calibration text is checked on its own). None where the recipe or the
    run is refused anyway (train.expert_parallel, say): the check that refuses it names the field."""
    from upcycle.train import plan as plan_lib  # the planner imports the trainer: only where a config is checked

    try:
        template = config_from_dict(train_config_dict(config, init_source=config.seed_model, max_steps=1,
                                                      seed=config.seeds[0]))
        validate_config(template)
        loop = template.train
        sized = dataclasses.replace(options, router_init="uniform", calibration=None)
        planned = dataclasses.replace(
            template, init=InitConfig(**dataclasses.asdict(sized), source=config.seed_model),
            train=dataclasses.replace(loop, precision="fp32" if loop.precision == "auto" else loop.precision))
        plan = plan_lib.make_plan(planned, world_size=1, ranks_per_node=1, device="cpu")
    except UpcycleError:
        return None
    return max(plan.node_host_bytes(phase) for phase in ("build", "train", "save"))


def _check_moe_fits(config: ExperimentConfig, options: ConvertOptions, where: str) -> None:
    """Refuse an MoE that cannot be trained in this machine's memory (moe_training_bytes), before anything is
    converted: 10^6 experts fail here, not hours later."""
    memory = host_memory().total
    need = None if memory is None else moe_training_bytes(config, options)
    if need is not None and need > memory:
        raise _fail(where, f"an MoE of {options.num_experts} experts needs about {format_bytes(need)} to train "
                    f"(upcycle plan's figure: fp32 weights, gradients, AdamW state and activations), more than this "
                    f"machine's {format_bytes(memory)}; use fewer experts")


def train_config_dict(config: ExperimentConfig, *, init_source: str, max_steps: int, seed: int,
                      data_path: str | None = None, weights: dict[str, float] | None = None,
                      decay_steps: int | None = None, wandb_run: tuple[str, str, str] | None = None,
                      arm: ArmSpec | None = None) -> dict:
    """The `upcycle train` config of one run of the experiment: the shared recipe, with `arm`'s own train fields and
    routing (its `train` and `model`) over it, plus what the experiment decides (the seed's data order and torch RNG,
    the run's length and where its schedule ends). With the recipe's logging.wandb, `wandb_run` = (group, name, job
    type) names the run's W&B run: the experiment's group (unless the recipe sets one), "ARM/seedS[/...]", and main,
    decay or branch."""
    recipe = copy.deepcopy(config.recipe)
    sections = {name: dict(recipe.get(name) or {}) for name in RECIPE_SECTIONS}
    if arm is not None:
        sections["train"].update(copy.deepcopy(arm.train or {}))
    data = {"seq_len": config.data.seq_len, "seed": seed,
            "weights": weights if weights is not None else config.data.weights}
    if data_path is not None:
        data["path"] = data_path
    elif config.data.path is not None:
        data["path"] = config.data.path
    else:  # validation before the data is prepared: the trainer checks the sources
        data.update(sources=config.data.sources, tokenizer=config.data.tokenizer)
    sections["train"].update(max_steps=max_steps, seed=seed, eval_every=0)
    sections["schedule"]["decay_steps"] = max_steps if decay_steps is None else decay_steps
    sections["checkpoint"]["keep"] = 1
    sections["logging"].setdefault("tensorboard", False)
    if sections["logging"].get("wandb") and wandb_run is not None:
        group, name, job_type = wandb_run
        wandb = sections["logging"]["wandb"] = dict(sections["logging"]["wandb"])
        wandb.setdefault("group", group)
        wandb.update(name=name, job_type=job_type)
    routing = {"model": dict(arm.model)} if arm is not None and arm.model else {}
    return {"init": {"source": init_source}, "data": data, **sections, **routing}


def _validate_train_dict(values: dict, where: str) -> None:
    try:
        validate_config(config_from_dict(copy.deepcopy(values)))
    except UpcycleError as exc:
        raise UpcycleError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Types, parsing, the saved record


def parse_config(values: Any) -> ExperimentConfig:
    """An ExperimentConfig from a parsed YAML mapping, validated completely (files included) before any work."""
    if not isinstance(values, dict):
        raise UpcycleError("an experiment config must be a YAML mapping (seed_model, seeds, data, moe, budgets, "
                           f"eval, arms, recipe), not a {type(values).__name__}")
    config = build(ExperimentConfig, copy.deepcopy(values), what=WHAT)
    config.validate()
    return config


def config_from_record(record: dict) -> ExperimentConfig:
    """The config an OUT/experiment.yaml records (types checked; the files it names are not checked again: the
    record was validated when it was written)."""
    values = {k: v for k, v in record.items() if k != "domains"}
    config = build(ExperimentConfig, copy.deepcopy(values), what=WHAT)
    config.domains = list(record.get("domains") or [])
    return config


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read (aliases and duplicate keys refused, as in every config of ours) and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise UpcycleError(f"experiment config {path} does not exist")
    return parse_config(read_yaml(path, WHAT))


def read_saved_config(out: Path) -> dict | None:
    """OUT/experiment.yaml as plain data (None when OUT has none); read with the same loader."""
    path = out / CONFIG_FILE
    return read_yaml(path, WHAT) if path.is_file() else None


def config_record(config: ExperimentConfig) -> dict:
    """The resolved config as plain data: what OUT/experiment.yaml holds and what a re-run is compared against."""
    record = to_dict(config)
    record["arms"] = [{k: v for k, v in arm.items() if v is not None} for arm in record["arms"]]
    return record


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{prefix}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (prefix or "(top level)")


def config_change(saved: Any, record: dict) -> str | None:
    """The first field in which config `record` differs from the config `saved` an OUT was made with, or None if it
    may run there: the same config, or the same with arms added (every saved arm still present and unchanged)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("arms"), list):
        return "(not an experiment config)"
    difference = _first_difference({k: v for k, v in saved.items() if k != "arms"},
                                   {k: v for k, v in record.items() if k != "arms"})
    if difference:
        return difference
    arms = {arm["name"]: arm for arm in record["arms"]}
    for arm in saved["arms"]:
        name = arm.get("name") if isinstance(arm, dict) else None
        if name not in arms:
            return f"arms ({name if isinstance(name, str) else _show(name)} was removed)"
        if arms[name] != arm:
            return f"arms ({name}).{_first_difference(arm, arms[name])}"
    return None


def inputs(config: ExperimentConfig) -> list[tuple[str, Path]]:
    """Every path the experiment reads, with the field that names it (OUT may be none of them and hold none)."""
    found = [("seed_model", Path(config.seed_model))]
    d = config.data
    if d.path is not None:
        found.append(("data.path", Path(d.path)))
    for group in ("sources", "val_sources"):
        for domain, paths in (getattr(d, group) or {}).items():
            found += [(f"data.{group}.{domain}", Path(p)) for p in paths]
    if d.sources is not None:
        found.append(("data.tokenizer", Path(d.tokenizer)))
    for index, arm in enumerate(config.arms):
        if (arm.convert or {}).get("calibration"):
            found.append((f"{arm_where(index, arm)}.convert.calibration", Path(arm.convert["calibration"])))
    return found


# ---------------------------------------------------------------------------------------------------------------------
# --help


def config_help() -> str:
    """The experiment YAML's fields, made from the dataclasses above, for `upcycle experiment --help`."""
    return fields_help(ExperimentConfig, "experiment config (YAML; docs/experiments.md has every field and what the "
                       "experiment writes):")
