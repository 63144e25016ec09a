"""`upcycle experiment`: the paper's comparison as one command. Several arms that differ only in how the MoE is
initialized are trained with one recipe, on the same data in the same order, for the same token budget, measured at the
same evaluation points, and compared in OUT/results.json, OUT/report.md and PNG figures.

Run:

    upcycle experiment --config experiments/tiny.yaml --out runs/tiny
    upcycle experiment --config experiments/tiny.yaml --out runs/tiny --parallel 2     # two arms at once
    upcycle experiment --config experiments/tiny.yaml --out runs/tiny --only naive     # one arm, no report

Layout of OUT (everything is written atomically; re-running the same command resumes):

    experiment.yaml           the resolved config; a different config on the same OUT is refused (added arms are not)
    data/                     the tokenized data, when the config gives raw `sources`
    arms/NAME/init/           the arm's model before training (upcycle convert's output; not for `dense`)
    arms/NAME/run/            an ordinary `upcycle train` run directory (config.yaml, metrics.jsonl, checkpoints/)
    arms/NAME/measure/        one JSON per evaluation point (validation loss, routing, expert similarity)
    arms/NAME/branches/       btx only: one dense run per domain and its HF export
    arms/NAME/arm.json        written last: the arm is done (a re-run skips it)
    results.json, report.md, loss_curves.png, specialization.png, similarity.png, routing_NAME.png

Every arm is trained in segments that end at the evaluation points (`train.max_steps` raised segment by segment, with
`schedule.decay_steps` fixed to the whole budget, so the learning rate and every update are those of one
uninterrupted run: the trainer resumes bit-exactly). After each segment the newest checkpoint is measured and the
previous one deleted (checkpoint.keep = 1), so an arm never holds more than one checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from upcycle.errors import UpcycleError

CONFIG_FILE = "experiment.yaml"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
ARM_DONE_FILE = "arm.json"
ARM_KINDS = ("dense", "fs", "naive", "noise", "drop", "btx", "grow", "continue")
MOE_KINDS = ("fs", "naive", "noise", "drop", "btx", "grow", "continue")
# Kinds that start from another arm's trained model (from_arm) instead of the seed.
FROM_ARM_KINDS = ("grow", "continue")
INDEX_MODES = ("independent", "shared")
# What each arm kind is called by `upcycle convert --method`.
CONVERT_METHOD = {"fs": "scratch", "naive": "naive", "noise": "noise", "drop": "drop", "btx": "btx"}
# Recipe fields the experiment sets itself, with the config field that decides them instead.
OWNED_RECIPE_FIELDS = {
    "train.max_steps": "budget_tokens",
    "train.eval_every": "eval.points",
    "train.eval_sequences": "eval.sequences",
    "train.seed": "seed",
    "checkpoint.keep": "(one checkpoint per arm is kept; measured ones are deleted)",
}
RECIPE_SECTIONS = ("optim", "schedule", "train", "checkpoint", "logging")


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ArmSpec:
    """One arm of the comparison.

    Attributes:
        name: Unique name (a directory name: letters, digits, '.', '-', '_').
        kind: dense (the seed trained on: the compute reference), fs (MoE from scratch), naive (every expert a copy),
            noise (random-noise upcycling), drop (Drop-Upcycling), btx (Branch-Train-MiX), grow (`upcycle grow` of
            another arm's trained MoE) or continue (another arm's trained model as it is: the control for grow).
        ratio: r in [0, 1] for drop, noise and grow (default 0.5); not used by the other kinds.
        index_mode: drop/noise/grow: independent (a fresh neuron set per matrix, the authors' released code; default)
            or shared (one set per expert, the paper's Figure 1).
        from_arm: grow and continue: the arm (listed earlier) whose final model this arm starts from; it is trained
            again for budget_tokens with the same recipe (a fresh schedule).
        factor: grow: every expert becomes factor experts (default 2).
        top_k: grow: experts per token after growing (default factor * the source's top-k, which keeps r = 0 the
            source's function).
        branch_tokens: btx: training tokens of each dense branch (a whole number of steps).
        domains: btx: the domains that get a branch (default: every domain of the data; at least 2).
        include_seed: btx: the seed itself is one more source, as in the paper (default true).
        convert: MoE arms: further `upcycle convert` options for this arm's initial model, by their field names in
            `ConvertOptions` (e.g. {router_init: data, calibration: FILE}, {granularity: 2}); the fields the
            experiment itself sets (method, ratio, index_mode, num_experts, top_k, seed, dtype, btx_sources) are not
            allowed. Paths are relative to the working directory.
    """

    name: str
    kind: str
    ratio: float | None = None
    index_mode: str | None = None
    branch_tokens: int | None = None
    domains: list[str] | None = None
    include_seed: bool | None = None
    convert: dict[str, Any] | None = None
    from_arm: str | None = None
    factor: int | None = None
    top_k: int | None = None


# ConvertOptions fields an arm's `convert` mapping may not set: the experiment sets them from the arm and the config.
EXPERIMENT_CONVERT_FIELDS = ("method", "ratio", "index_mode", "num_experts", "top_k", "seed", "dtype", "btx_sources")


@dataclass
class DataSpec:
    """The data every arm trains and is evaluated on: `path` (prepared) or `sources` (+ `val_sources`, `tokenizer`).

    Attributes:
        path: A directory written by `upcycle data prepare`.
        sources: Raw text per domain {name: [file or directory, ...]}, tokenized once into OUT/data.
        val_sources: Held-out text per domain (optional); domains without it split `val_fraction` off `sources`.
        tokenizer: Tokenizer directory for `sources` (default: the seed model's directory).
        val_fraction: Share of documents held out per domain when a domain has no `val_sources`.
        seq_len: Tokens per training and validation sequence.
        weights: Domain sampling weights {name: weight}; empty: proportional to size (the paper).
    """

    path: str | None = None
    sources: dict[str, list[str]] | None = None
    val_sources: dict[str, list[str]] | None = None
    tokenizer: str | None = None
    val_fraction: float = 0.01
    seq_len: int = 256
    weights: dict[str, float] | None = None


@dataclass
class ExperimentConfig:
    """A whole experiment: the YAML file's top-level fields."""

    seed_model: str
    arms: list[ArmSpec]
    budget_tokens: int
    data: DataSpec
    recipe: dict
    num_experts: int = 8
    top_k: int = 2
    eval_points: int | list[int] = 6
    eval_sequences: int = 32
    seed: int = 0
    domains: list[str] = field(default_factory=list)  # filled in by validation, from the data


TOP_LEVEL = ("seed_model", "seed", "data", "moe", "arms", "budget_tokens", "eval", "recipe")


def config_help() -> str:
    """The experiment YAML's fields, for `upcycle experiment --help` (docs/experiments.md says more)."""
    return """experiment config (YAML; every field is documented in docs/experiments.md):
  seed_model: DIR              dense HF checkpoint every arm starts from (e.g. assets/seed)   [required]
  seed: INT                    data order, upcycling draws, torch RNG of every arm              [default 0]
  data:                        exactly one of path / sources
    path: DIR                  prepared data directory (upcycle data prepare)
    sources: {DOMAIN: [PATH]}  raw text per domain, tokenized once into OUT/data
    val_sources: {DOMAIN: [PATH]}  held-out text per domain (optional)
    tokenizer: DIR             tokenizer for sources                                            [default seed_model]
    val_fraction: FLOAT        held-out share for domains without val_sources                   [default 0.01]
    seq_len: INT               tokens per sequence                                              [default 256]
    weights: {DOMAIN: FLOAT}   sampling weights; empty: proportional to size                    [default empty]
  moe: {num_experts: INT, top_k: INT}                                                           [default 8, 2]
  budget_tokens: INT           training tokens of every arm (whole steps of global_batch_tokens) [required]
  eval:
    points: INT | [TOKENS]     N log-spaced evaluation steps up to the budget, or a token list   [default 6]
    sequences: INT             validation sequences per domain at each point                    [default 32]
  arms: list of {name, kind, ...}                                                               [required]
    kind dense | fs | naive    no further fields
    kind noise                 ratio (0.5), index_mode (independent)
    kind drop                  ratio (0.5), index_mode (independent | shared)
    kind btx                   branch_tokens (required), domains (all), include_seed (true)
    kind grow                  from_arm (required: an earlier MoE arm), factor (2), ratio (0.5), index_mode,
                               top_k (factor * the source's)
    kind continue              from_arm (required): that arm's final model trained again (the control for grow)
  recipe:                      ONE training recipe for every arm: the optim, schedule, train, checkpoint and
                               logging sections of an `upcycle train` config (see upcycle train --help), except
                               train.max_steps, train.eval_every, train.eval_sequences, train.seed, checkpoint.keep"""


def _fail(field_name: str, message: str) -> UpcycleError:
    return UpcycleError(f"{field_name}: {message}")


def _mapping(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(name, f"must be a mapping, got {type(value).__name__}")
    return value


def _int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(name, f"must be >= {minimum}, got {value}")
    return value


def _unknown(values: dict, known, name: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{name}.{unknown[0]}" if name else unknown[0]
        raise _fail(where, f"unknown field; {name or 'the experiment'} accepts: {', '.join(known)}")


def _paths(value: Any, name: str) -> dict[str, list[str]] | None:
    if value is None:
        return None
    value = _mapping(value, name)
    out = {}
    for domain, paths in value.items():
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise _fail(f"{name}.{domain}", "must be a path or a list of paths")
        for p in paths:
            if not Path(p).exists():
                raise _fail(f"{name}.{domain}", f"{p} does not exist")
        out[str(domain)] = [str(Path(p).resolve()) for p in paths]
    return out


def _parse_data(values: Any, seed_model: str) -> DataSpec:
    values = _mapping(values, "data")
    _unknown(values, [f.name for f in dataclasses.fields(DataSpec)], "data")
    spec = DataSpec(**values)
    if (spec.path is None) == (spec.sources is None):
        raise _fail("data", "set exactly one of data.path (a prepared directory) or data.sources (raw text)")
    if spec.path is not None:
        if not (Path(spec.path) / "data.json").is_file():
            raise _fail("data.path", f"{spec.path} is not a prepared data directory (no data.json)")
        if spec.val_sources or spec.tokenizer:
            raise _fail("data.path", "val_sources and tokenizer belong to data.sources, not to a prepared data.path")
        spec.path = str(Path(spec.path).resolve())
    else:
        spec.sources = _paths(spec.sources, "data.sources")
        spec.val_sources = _paths(spec.val_sources, "data.val_sources")
        extra = sorted(set(spec.val_sources or {}) - set(spec.sources))
        if extra:
            raise _fail("data.val_sources", f"domain {extra[0]} has no data.sources entry")
        spec.tokenizer = str(Path(spec.tokenizer or seed_model).resolve())
        if not (Path(spec.tokenizer) / "tokenizer.json").is_file():
            raise _fail("data.tokenizer", f"{spec.tokenizer} has no tokenizer.json")
        if isinstance(spec.val_fraction, bool) or not isinstance(spec.val_fraction, (int, float)) \
                or not 0 <= spec.val_fraction < 1:
            raise _fail("data.val_fraction", f"must lie in [0, 1), got {spec.val_fraction!r}")
    _int(spec.seq_len, "data.seq_len", 1)
    if spec.weights is not None:
        weights = _mapping(spec.weights, "data.weights")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights.values()):
            raise _fail("data.weights", f"every weight must be a number >= 0, got {weights}")
        spec.weights = {str(k): float(v) for k, v in weights.items()}
    return spec


def _check_data_fits_seed(spec: DataSpec, seed_config: dict) -> None:
    """Token ids and sequence length the seed model can take (checked here, before any work)."""
    if spec.path is not None:
        vocab_size, where = json.loads((Path(spec.path) / "data.json").read_text())["vocab_size"], "data.path"
    else:
        from upcycle.data import load_tokenizer

        tokenizer, _ = load_tokenizer(spec.tokenizer)
        vocab_size, where = tokenizer.get_vocab_size(with_added_tokens=True), "data.tokenizer"
    if vocab_size > seed_config.get("vocab_size", 0):
        raise _fail(where, f"has {vocab_size} token ids but seed_model's vocab_size is {seed_config.get('vocab_size')}; "
                    "use the seed's tokenizer")
    max_positions = seed_config.get("max_position_embeddings")
    if max_positions is not None and spec.seq_len > max_positions:
        raise _fail("data.seq_len", f"{spec.seq_len} exceeds seed_model's max_position_embeddings {max_positions}")


def _data_domains(spec: DataSpec) -> list[str]:
    if spec.path is not None:
        return sorted(json.loads((Path(spec.path) / "data.json").read_text())["domains"])
    return sorted(spec.sources)


def _parse_arm(values: Any, index: int, domains: list[str], num_experts: int) -> ArmSpec:
    where = f"arms[{index}]"
    values = _mapping(values, where)
    _unknown(values, [f.name for f in dataclasses.fields(ArmSpec)], where)
    name = values.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in ".-_" for c in name) \
            or name.startswith("."):
        raise _fail(f"{where}.name", f"must be a directory name of letters, digits, '.', '-', '_', got {name!r}")
    where = f"arms[{index}] ({name})"
    kind = values.get("kind")
    if kind not in ARM_KINDS:
        raise _fail(f"{where}.kind", f"must be one of {', '.join(ARM_KINDS)}, got {kind!r}")
    arm = ArmSpec(**values)
    allowed = {"dense": (), "fs": (), "naive": (), "noise": ("ratio", "index_mode"), "drop": ("ratio", "index_mode"),
               "btx": ("branch_tokens", "domains", "include_seed"),
               "grow": ("ratio", "index_mode", "from_arm", "factor", "top_k"), "continue": ("from_arm",)}[kind]
    for f in ("ratio", "index_mode", "branch_tokens", "domains", "include_seed", "from_arm", "factor", "top_k"):
        if getattr(arm, f) is not None and f not in allowed:
            raise _fail(f"{where}.{f}", f"is not used by kind {kind}; remove it")
    if kind in FROM_ARM_KINDS:
        if not isinstance(arm.from_arm, str):
            raise _fail(f"{where}.from_arm", f"{kind} starts from another arm's trained model: name it")
        if arm.convert is not None:
            raise _fail(f"{where}.convert", f"a {kind} arm is not converted from the seed; remove it")
    if kind == "grow":
        arm.factor = 2 if arm.factor is None else _int(arm.factor, f"{where}.factor", 2)
        if arm.top_k is not None:
            _int(arm.top_k, f"{where}.top_k", 1)
    if kind in ("noise", "drop", "grow"):
        arm.ratio = 0.5 if arm.ratio is None else arm.ratio
        if isinstance(arm.ratio, bool) or not isinstance(arm.ratio, (int, float)) or not 0 <= arm.ratio <= 1:
            raise _fail(f"{where}.ratio", f"must lie in [0, 1], got {arm.ratio!r}")
        arm.ratio = float(arm.ratio)
        arm.index_mode = arm.index_mode or "independent"
        if arm.index_mode not in INDEX_MODES:
            raise _fail(f"{where}.index_mode", f"must be independent or shared, got {arm.index_mode!r}")
    if kind == "btx":
        if arm.branch_tokens is None:
            raise _fail(f"{where}.branch_tokens", "btx needs the training tokens of each dense branch")
        _int(arm.branch_tokens, f"{where}.branch_tokens", 1)
        arm.domains = list(domains) if arm.domains is None else arm.domains
        if not isinstance(arm.domains, list) or not all(isinstance(d, str) for d in arm.domains):
            raise _fail(f"{where}.domains", f"must be a list of domain names, got {arm.domains!r}")
        unknown = sorted(set(arm.domains) - set(domains))
        if unknown:
            raise _fail(f"{where}.domains", f"unknown domain {unknown[0]}; the data has {', '.join(domains)}")
        if len(set(arm.domains)) != len(arm.domains):
            raise _fail(f"{where}.domains", "lists a domain twice")
        if len(arm.domains) < 2:
            raise _fail(f"{where}.domains", f"btx needs at least 2 domains to branch on, got {arm.domains}")
        arm.include_seed = True if arm.include_seed is None else arm.include_seed
        if not isinstance(arm.include_seed, bool):
            raise _fail(f"{where}.include_seed", f"must be true or false, got {arm.include_seed!r}")
        sources = len(arm.domains) + int(arm.include_seed)
        if num_experts % sources:
            raise _fail(f"{where}", f"btx gives each of its {sources} sources (branches"
                        f"{' + seed' if arm.include_seed else ''}) num_experts / sources experts, but "
                        f"moe.num_experts = {num_experts} is not divisible by {sources}")
    if arm.convert is not None:
        arm.convert = _parse_convert_options(arm, f"{where}.convert")
    return arm


def arm_moe_shape(arms: list[ArmSpec], name: str, num_experts: int, top_k: int) -> tuple[int, int]:
    """(experts, top-k) of arm `name`'s model: moe.num_experts/top_k, grown by each grow arm on its from_arm chain."""
    arm = next(a for a in arms if a.name == name)
    if arm.kind not in FROM_ARM_KINDS:
        return num_experts, top_k
    experts, k = arm_moe_shape(arms, arm.from_arm, num_experts, top_k)
    if arm.kind == "continue":
        return experts, k
    return arm.factor * experts, arm.top_k if arm.top_k is not None else arm.factor * k


def _check_from_arms(arms: list[ArmSpec], num_experts: int, top_k: int) -> None:
    """A from_arm names an earlier arm (so arms run in order), an MoE one for grow; a grow arm's top_k fits."""
    for index, arm in enumerate(arms):
        if arm.kind not in FROM_ARM_KINDS:
            continue
        where = f"arms[{index}] ({arm.name}).from_arm"
        earlier = {a.name: a for a in arms[:index]}
        if arm.from_arm not in earlier:
            raise _fail(where, f"{arm.from_arm!r} is not an arm listed before this one; list the arm it starts from "
                        "first")
        if arm.kind == "grow" and earlier[arm.from_arm].kind == "dense":
            raise _fail(where, f"{arm.from_arm} is the dense arm; grow needs an MoE arm")
        if arm.kind == "grow":
            source_experts, _ = arm_moe_shape(arms, arm.from_arm, num_experts, top_k)
            experts, k = arm_moe_shape(arms, arm.name, num_experts, top_k)
            if not 1 <= k <= experts:
                raise _fail(f"arms[{index}] ({arm.name}).top_k", f"must lie in [1, {experts}] (factor "
                            f"{arm.factor} x {source_experts} experts), got {k}")


def _display_convert(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """An arm's extra convert options as results.json records them (paths relative to the working directory)."""
    if not options:
        return None
    from upcycle.experiment_report import display_path

    return {k: display_path(v) if k == "calibration" and isinstance(v, str) else v for k, v in options.items()}


def _parse_convert_options(arm: ArmSpec, where: str) -> dict[str, Any]:
    """An arm's extra convert options, checked by ConvertOptions itself before any work (paths made absolute)."""
    from upcycle.convert import ConvertOptions

    if arm.kind == "dense":
        raise _fail(where, "the dense arm is not converted; remove it")
    values = dict(_mapping(arm.convert, where))
    fields = [f.name for f in dataclasses.fields(ConvertOptions) if f.name not in EXPERIMENT_CONVERT_FIELDS]
    for key in values:
        if key in EXPERIMENT_CONVERT_FIELDS:
            raise _fail(f"{where}.{key}", "is set by the experiment (from the arm's kind, ratio, index_mode and the "
                        "moe/seed sections); remove it")
    _unknown(values, fields, where)
    if isinstance(values.get("calibration"), str):
        if not Path(values["calibration"]).is_file():
            raise _fail(f"{where}.calibration", f"{values['calibration']} is not a file")
        values["calibration"] = str(Path(values["calibration"]).resolve())
    try:
        ConvertOptions(method=CONVERT_METHOD[arm.kind], **values).validate()
    except (TypeError, UpcycleError) as exc:
        raise _fail(where, str(exc)) from None
    return values


def _check_calibration_text(arm: ArmSpec, seed_model: str, where: str) -> None:
    """An arm's calibration file holds text the seed's tokenizer reads: tokenized now (up to the arm's
    calibration_tokens, a fraction of a second) rather than when the arm converts, possibly hours into the run."""
    if not arm.convert or not arm.convert.get("calibration"):
        return
    from upcycle.calibration import calibration_token_ids
    from upcycle.convert import ConvertOptions

    tokens = arm.convert.get("calibration_tokens", ConvertOptions.calibration_tokens)
    try:
        calibration_token_ids(arm.convert["calibration"], seed_model, tokens)
    except UpcycleError as exc:
        raise _fail(where, str(exc)) from None


def eval_steps(points: int | list[int], total_steps: int, tokens_per_step: int) -> list[int]:
    """Optimizer steps at which every arm is measured (the end of the budget always among them).

    An integer N gives N steps spaced evenly on a log scale from step 1 to the last step (duplicates after rounding
    merged); a list gives token counts, each a whole number of steps.
    """
    if isinstance(points, int):
        steps = np.unique(np.round(np.geomspace(1, total_steps, num=max(points, 1))).astype(int)).tolist()
    else:
        steps = sorted({t // tokens_per_step for t in points})
    if not steps or steps[-1] != total_steps:
        steps.append(total_steps)
    return [int(s) for s in steps]


def parse_config(values: Any) -> ExperimentConfig:
    """An ExperimentConfig from a parsed YAML mapping, validated completely (files included) before any work."""
    if not isinstance(values, dict):
        raise UpcycleError("an experiment config must be a YAML mapping (seed_model, data, moe, arms, recipe, ...)")
    _unknown(values, TOP_LEVEL, "")
    seed_model = values.get("seed_model")
    if not isinstance(seed_model, str) or not (Path(seed_model) / "config.json").is_file():
        raise _fail("seed_model", f"must be a dense HF checkpoint directory (with config.json), got {seed_model!r}")
    seed_config = json.loads((Path(seed_model) / "config.json").read_text())
    if seed_config.get("num_local_experts") or seed_config.get("num_experts"):
        raise _fail("seed_model", f"{seed_model} is an MoE model; the experiment starts from a dense checkpoint")
    seed_model = str(Path(seed_model).resolve())
    seed = _int(values.get("seed", 0), "seed", 0)
    data = _parse_data(values.get("data"), seed_model)
    domains = _data_domains(data)
    _check_data_fits_seed(data, seed_config)
    if data.weights is not None:
        unknown = sorted(set(data.weights) - set(domains))
        if unknown:
            raise _fail("data.weights", f"unknown domain {unknown[0]}; the data has {', '.join(domains)}")

    moe = _mapping(values.get("moe"), "moe")
    _unknown(moe, ("num_experts", "top_k"), "moe")
    num_experts = _int(moe.get("num_experts", 8), "moe.num_experts", 1)
    top_k = _int(moe.get("top_k", 2), "moe.top_k", 1)
    if top_k > num_experts:
        raise _fail("moe.top_k", f"must lie in [1, moe.num_experts={num_experts}], got {top_k}")

    arms_values = values.get("arms")
    if not isinstance(arms_values, list) or not arms_values:
        raise _fail("arms", "give a non-empty list of arms, e.g. [{name: naive, kind: naive}]")
    arms = [_parse_arm(a, i, domains, num_experts) for i, a in enumerate(arms_values)]
    for index, arm in enumerate(arms):
        _check_calibration_text(arm, seed_model, f"arms[{index}] ({arm.name}).convert.calibration")
    names = [a.name for a in arms]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise _fail("arms", f"two arms are named {duplicate!r}; names must be unique")
    _check_from_arms(arms, num_experts, top_k)

    recipe = _mapping(values.get("recipe"), "recipe")
    _unknown(recipe, RECIPE_SECTIONS, "recipe")
    for dotted, decided_by in OWNED_RECIPE_FIELDS.items():
        section, key = dotted.split(".")
        if key in _mapping(recipe.get(section), f"recipe.{section}"):
            raise _fail(f"recipe.{dotted}", f"is set by the experiment ({decided_by}); remove it")
    recipe = copy.deepcopy(recipe)

    evaluation = _mapping(values.get("eval"), "eval")
    _unknown(evaluation, ("points", "sequences"), "eval")
    points = evaluation.get("points", 6)
    eval_sequences = _int(evaluation.get("sequences", 32), "eval.sequences", 1)
    budget_tokens = _int(values.get("budget_tokens"), "budget_tokens", 1)
    config = ExperimentConfig(seed_model=seed_model, arms=arms, budget_tokens=budget_tokens, data=data, recipe=recipe,
                              num_experts=num_experts, top_k=top_k, eval_points=points,
                              eval_sequences=eval_sequences, seed=seed, domains=domains)

    # The recipe's sections are parsed (and finally validated) by the trainer itself, as one arm's config.
    try:
        template = _recipe_as_train_config(config)
    except UpcycleError as exc:
        raise UpcycleError(f"recipe: {exc}") from None
    tokens_per_step, warmup = template.train.global_batch_tokens, template.schedule.warmup_steps
    _validate_train_config(train_config_dict(config, init_source=seed_model, max_steps=max(1, warmup)), "recipe")
    if tokens_per_step < 1:
        raise _fail("recipe.train.global_batch_tokens", f"must be >= 1, got {tokens_per_step}")
    if config.budget_tokens % tokens_per_step:
        raise _fail("budget_tokens", f"{config.budget_tokens} is not a whole number of steps of "
                    f"recipe.train.global_batch_tokens = {tokens_per_step}")
    total_steps = config.budget_tokens // tokens_per_step
    if isinstance(points, bool) or not isinstance(points, (int, list)) or (isinstance(points, int) and points < 1):
        raise _fail("eval.points", f"must be a count >= 1 or a list of token counts, got {points!r}")
    if isinstance(points, list):
        for t in points:
            _int(t, "eval.points", 1)
            if t % tokens_per_step or t > config.budget_tokens:
                raise _fail("eval.points", f"{t} is not a whole number of steps of {tokens_per_step} tokens within "
                            f"budget_tokens = {config.budget_tokens}")
    if warmup > total_steps:
        raise _fail("recipe.schedule.warmup_steps", f"{warmup} exceeds the budget's {total_steps} steps")
    for index, arm in enumerate(arms):
        if arm.kind == "btx":
            where = f"arms[{index}] ({arm.name}).branch_tokens"
            if arm.branch_tokens % tokens_per_step:
                raise _fail(where, f"{arm.branch_tokens} is not a whole number of steps of "
                            f"recipe.train.global_batch_tokens = {tokens_per_step}")
            branch_steps = arm.branch_tokens // tokens_per_step
            if warmup > branch_steps:
                raise _fail(where, f"{branch_steps} steps are fewer than recipe.schedule.warmup_steps = {warmup}")
            branch = train_config_dict(config, init_source=seed_model, max_steps=branch_steps,
                                       weights={arm.domains[0]: 1.0})
            _validate_train_config(branch, f"arms[{index}] ({arm.name}) branch")
    _validate_train_config(train_config_dict(config, init_source=seed_model, max_steps=total_steps), "recipe")
    return config


def _recipe_as_train_config(config: ExperimentConfig):
    """The recipe as the trainer reads it (sections parsed and type-checked, defaults filled in; not yet validated)."""
    from upcycle.train import config_from_dict

    return config_from_dict(train_config_dict(config, init_source=config.seed_model, max_steps=1))


def steps_tokens(config: ExperimentConfig) -> int:
    """Training tokens per optimizer step of every arm (the recipe's train.global_batch_tokens, or its default)."""
    return _recipe_as_train_config(config).train.global_batch_tokens


def _validate_train_config(values: dict, where: str) -> None:
    from upcycle.train import config_from_dict, validate_config

    try:
        validate_config(config_from_dict(copy.deepcopy(values)))
    except UpcycleError as exc:
        raise UpcycleError(f"{where}: {exc}") from None


def load_experiment(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise UpcycleError(f"experiment config {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UpcycleError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(values)


def config_record(config: ExperimentConfig) -> dict:
    """The resolved config as plain data: what OUT/experiment.yaml holds and what a re-run is compared against."""
    record = dataclasses.asdict(config)
    record["arms"] = [{k: v for k, v in arm.items() if v is not None} for arm in record["arms"]]
    return record


def train_config_dict(config: ExperimentConfig, *, init_source: str, max_steps: int, data_path: str | None = None,
                      weights: dict[str, float] | None = None) -> dict:
    """The `upcycle train` config of one run of the experiment: the shared recipe plus what the experiment decides."""
    recipe = copy.deepcopy(config.recipe)
    sections = {name: dict(recipe.get(name) or {}) for name in RECIPE_SECTIONS}
    data = {"seq_len": config.data.seq_len, "seed": config.seed,
            "weights": weights if weights is not None else config.data.weights}
    if data_path is not None:
        data["path"] = data_path
    elif config.data.path is not None:
        data["path"] = config.data.path
    else:  # validation before the data is prepared: the trainer checks the sources
        data.update(sources=config.data.sources, tokenizer=config.data.tokenizer)
    sections["train"].update(max_steps=max_steps, seed=config.seed, eval_every=0)
    sections["schedule"].setdefault("decay_steps", None)
    if sections["schedule"]["decay_steps"] is None:
        sections["schedule"]["decay_steps"] = max_steps
    sections["checkpoint"]["keep"] = 1
    sections["logging"].setdefault("tensorboard", False)
    return {"init": {"source": init_source}, "data": data, **sections}


# ---------------------------------------------------------------------------------------------------------------------
# Pure math of the derived numbers


def training_flops(active_params: int, tokens: int) -> int:
    """Training FLOPs by the usual estimate: 6 x parameters used per token x tokens (forward 2, backward 4)."""
    return 6 * int(active_params) * int(tokens)


def tokens_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """Training tokens at which a loss curve first reaches `target` (loss <= target), or None if it never does.

    `curve` is [(tokens, loss)] in increasing tokens. Between the two evaluation points around the first crossing the
    loss is interpolated linearly in tokens (the true curve between points is not known).
    """
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return int(tokens)
            t0, l0 = previous
            return int(round(t0 + (tokens - t0) * (l0 - target) / (l0 - loss)))
        previous = (tokens, loss)
    return None


def gap_to_reference(curve: list[dict], reference: list[dict], key: str = "mean") -> list[dict]:
    """An arm's loss minus the reference arm's at every evaluation point both measured (same tokens): negative where
    the arm is ahead. Both curves are lists of {"tokens", key: loss}."""
    at = {p["tokens"]: p[key] for p in reference}
    return [{"tokens": p["tokens"], key: p[key] - at[p["tokens"]]} for p in curve if p["tokens"] in at]


def mean_offdiagonal(similarity_EE: np.ndarray) -> float:
    """Mean pairwise cosine similarity between experts: the mean of the off-diagonal entries (1.0 for copies)."""
    similarity_EE = np.asarray(similarity_EE, dtype=np.float64)
    E = similarity_EE.shape[0]
    if E < 2:
        return 1.0
    return float((similarity_EE.sum() - np.trace(similarity_EE)) / (E * (E - 1)))


def mean_or_none(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------------------------------------
# Measuring a model at an evaluation point


def measure_model(model, val_sets: dict) -> dict:
    """Validation CE per domain (token-weighted over that domain's fixed sequences) and their mean; for an MoE also the
    routing shares per layer and domain, the domain specialization (mean pairwise JSD, averaged over layers) and the
    expert similarity (mean pairwise cosine of a layer's experts, averaged over layers). fp32, one pass per batch."""
    import torch

    from upcycle.analyze import add_sums, expert_matrices, expert_similarity, mean_pairwise_jsd, routing_stats, \
        routing_sums
    from upcycle.hf_model import OUR_DOWN, OUR_GATE_UP
    from upcycle.losses import cross_entropy

    config = model.config
    model.eval()
    device = next(model.parameters()).device
    val, sums = {}, {}
    with torch.no_grad():
        for domain, batches in val_sets.items():
            total, count, per_layer = 0.0, 0, [None] * config.num_layers
            for batch_BT in batches:
                batch_BT = batch_BT.to(device)
                output = model(batch_BT[:, :-1])
                n = batch_BT[:, 1:].numel()
                total += float(cross_entropy(logits_BTV=output.logits, labels_BT=batch_BT[:, 1:])) * n
                count += n
                for i, logits_TE in enumerate(output.router_logits):
                    per_layer[i] = add_sums(per_layer[i], routing_sums(logits_TE, top_k=config.top_k,
                                                                       renormalize=config.renormalize))
            if count:
                val[domain] = total / count
                if per_layer[0] is not None:
                    sums[domain] = per_layer
    result: dict[str, Any] = {"val": val, "mean": float(np.mean(list(val.values())))}
    if config.is_moe:
        shares = [{d: routing_stats(per_layer[i])["share"] for d, per_layer in sums.items()}
                  for i in range(config.num_layers)]
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        cosines = [mean_offdiagonal(expert_similarity(expert_matrices(state[f"layers.{i}.{OUR_GATE_UP}"],
                                                                      state[f"layers.{i}.{OUR_DOWN}"])))
                   for i in range(config.num_layers)]
        jsd_layers = [mean_pairwise_jsd({d: np.array(s) for d, s in layer.items()}) for layer in shares]
        result.update(routing=shares, jsd_layers=jsd_layers, jsd=mean_or_none(jsd_layers), cosine_layers=cosines,
                      cosine=float(np.mean(cosines)))
    return result


def _write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (or a re-run after a kill) sees the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# One arm


@dataclass
class _Context:
    config: ExperimentConfig
    out: Path
    data_dir: Path
    tokens_per_step: int
    total_steps: int
    steps: list[int]  # evaluation steps


def _log(message: str) -> None:
    print(f"upcycle experiment: {message}", file=sys.stderr, flush=True)


def _load(path: str | Path):
    """A model (ours or HF) for measuring, on the GPU when there is one."""
    import torch

    from upcycle.hf_model import load_model

    return load_model(path).to("cuda" if torch.cuda.is_available() else "cpu")


def _latest_step(run: Path) -> int:
    from upcycle.checkpoint import list_checkpoints

    found = list_checkpoints(run / "checkpoints") if (run / "checkpoints").is_dir() else []
    return found[-1][0] if found else 0


def _checkpoint(run: Path, step: int) -> Path:
    from upcycle.checkpoint import CHECKPOINT_DIR, step_dir_name

    return run / CHECKPOINT_DIR / step_dir_name(step)


def _train_to(ctx: _Context, train_dict: dict, run: Path, step: int, label: str) -> None:
    """Train run `run` up to `step` (resuming from its newest checkpoint); the trainer writes its checkpoint there."""
    from upcycle.train import config_from_dict, run_training

    if _latest_step(run) >= step:
        return
    values = copy.deepcopy(train_dict)
    values["train"]["max_steps"] = step
    _log(f"{label}: training to step {step} ({step * ctx.tokens_per_step:,} tokens)")
    run_training(config_from_dict(values), run)
    if _latest_step(run) != step:
        raise UpcycleError(f"{label}: training stopped before step {step} (SIGTERM?); re-run the same command to "
                           "resume")


def _read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _dense_params(seed_model: str) -> int:
    from upcycle.hf_model import load_model

    return load_model(seed_model).num_params()


def _btx_branches(ctx: _Context, arm: ArmSpec, arm_dir: Path) -> tuple[list[str], dict]:
    """Train one dense branch per domain from the seed on that domain only, export each as an HF checkpoint."""
    from upcycle.hf_model import export_hf, load_model

    steps = arm.branch_tokens // ctx.tokens_per_step
    exports, info = [], {"tokens_per_branch": arm.branch_tokens, "domains": list(arm.domains), "data_sha256": {}}
    for domain in arm.domains:
        run = arm_dir / "branches" / domain
        export = arm_dir / "branches" / f"{domain}-hf"
        if not export.is_dir():
            train = train_config_dict(ctx.config, init_source=ctx.config.seed_model, max_steps=steps,
                                      data_path=str(ctx.data_dir), weights={domain: 1.0})
            _train_to(ctx, train, run, steps, f"{arm.name} branch {domain}")
            model = load_model(_checkpoint(run, steps))
            export_hf(model, model.config, export, tokenizer=ctx.config.seed_model)
            shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the export holds the weights
        info["data_sha256"][domain] = _read_metrics(run)[-1]["data_sha256"]
        exports.append(str(export))
    return exports, info


def _from_arm_model(ctx: _Context, arm: ArmSpec) -> Path:
    """The final checkpoint of the arm that `arm` starts from, which must be finished."""
    if not (ctx.out / "arms" / arm.from_arm / ARM_DONE_FILE).is_file():
        raise UpcycleError(f"{arm.name} starts from arm {arm.from_arm}, which has not finished; run it first (a run "
                           "without --only runs the arms in order)")
    return _checkpoint(ctx.out / "arms" / arm.from_arm / "run", ctx.total_steps)


def _initial_model_dir(ctx: _Context, arm: ArmSpec, arm_dir: Path) -> tuple[str, dict | None]:
    """The arm's model before training: the seed itself (dense), an `upcycle convert` output in arm_dir/init, or for
    grow and continue the final model of another arm (grown into arm_dir/init, or as it is)."""
    from upcycle.convert import convert

    if arm.kind == "dense":
        return ctx.config.seed_model, None
    if arm.kind == "continue":
        return str(_from_arm_model(ctx, arm)), None
    if arm.kind == "grow":
        from upcycle.grow import grow

        init = arm_dir / "init"
        if not init.is_dir():  # grow publishes atomically: a directory that exists is complete
            _log(f"{arm.name}: upcycle grow --factor {arm.factor} --ratio {arm.ratio:g} (from {arm.from_arm})")
            grow(_from_arm_model(ctx, arm), init, factor=arm.factor, ratio=arm.ratio, index_mode=arm.index_mode,
                 top_k=arm.top_k, seed=ctx.config.seed, dtype="float32", progress=False)
        return str(init), None
    branches = None
    options: dict[str, Any] = dict(method=CONVERT_METHOD[arm.kind], num_experts=ctx.config.num_experts,
                                   top_k=ctx.config.top_k, seed=ctx.config.seed, dtype="float32", progress=False)
    source = ctx.config.seed_model
    if arm.kind in ("drop", "noise"):
        options.update(ratio=arm.ratio, index_mode=arm.index_mode)
    options.update(arm.convert or {})
    if arm.kind == "btx":
        exports, branches = _btx_branches(ctx, arm, arm_dir)
        sources = exports + ([ctx.config.seed_model] if arm.include_seed else [])
        source, options["btx_sources"] = sources[0], sources[1:]
    init = arm_dir / "init"
    if not init.is_dir():  # convert publishes atomically: a directory that exists is complete
        _log(f"{arm.name}: upcycle convert --method {options['method']}")
        convert(source, init, **options)
    return str(init), branches


def run_arm(ctx: _Context, arm: ArmSpec) -> dict:
    """Initialize, train segment by segment, measure every evaluation point; write arms/NAME/arm.json last."""
    from upcycle.data import validation_batches
    from upcycle.hf_model import load_model

    arm_dir = ctx.out / "arms" / arm.name
    done = arm_dir / ARM_DONE_FILE
    if done.is_file():
        _log(f"{arm.name}: already done, skipped")
        return json.loads(done.read_text())
    arm_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    init_dir, branches = _initial_model_dir(ctx, arm, arm_dir)
    run, measure_dir = arm_dir / "run", arm_dir / "measure"
    measure_dir.mkdir(exist_ok=True)
    train = train_config_dict(ctx.config, init_source=init_dir, max_steps=ctx.total_steps,
                              data_path=str(ctx.data_dir))
    val_sets = validation_batches(ctx.data_dir, seq_len=ctx.config.data.seq_len,
                                  # only the speed of measuring depends on the batch size (empty: the trainer picks)
                                  batch_size=_recipe_as_train_config(ctx.config).train.micro_batch_size or 8,
                                  max_sequences=ctx.config.eval_sequences)

    def measured(step: int) -> Path:
        return measure_dir / f"step_{step:08d}.json"

    if not measured(0).is_file():
        model = _load(init_dir)
        _write_json(measured(0), {"step": 0, "tokens": 0, **measure_model(model, val_sets)})
    for step in ctx.steps:
        if measured(step).is_file():
            continue
        _train_to(ctx, train, run, step, arm.name)
        record = measure_model(_load(_checkpoint(run, step)), val_sets)
        _write_json(measured(step), {"step": step, "tokens": step * ctx.tokens_per_step, **record})
        _log(f"{arm.name}: step {step}: mean validation CE {record['mean']:.4f}")

    points = [json.loads(measured(s).read_text()) for s in [0, *ctx.steps]]
    model = load_model(_checkpoint(run, ctx.total_steps))
    metrics = _read_metrics(run)
    result = _arm_result(ctx, arm, points, metrics, model, branches)
    result["seconds"] = round(time.perf_counter() - started, 1)  # this invocation's time (not counting killed ones)
    _write_json(done, result)
    _log(f"{arm.name}: done")
    return result


def _arm_result(ctx: _Context, arm: ArmSpec, points: list[dict], metrics: list[dict], model, branches) -> dict:
    domains = ctx.config.domains
    tokens = ctx.total_steps * ctx.tokens_per_step
    active = model.num_active_params()
    flops = training_flops(active, tokens)
    result = {
        "name": arm.name, "method": arm.kind, "ratio": arm.ratio, "index_mode": arm.index_mode,
        "convert": _display_convert(arm.convert),
        **({"from_arm": arm.from_arm, "num_experts": model.config.num_experts, "top_k": model.config.top_k}
           if arm.kind in FROM_ARM_KINDS else {}),
        "tokens": tokens, "steps": ctx.total_steps, "active_params": active, "total_params": model.num_params(),
        "flops": flops,
        "final": {**{d: points[-1]["val"][d] for d in domains}, "mean": points[-1]["mean"]},
        "curve": [{"tokens": p["tokens"], "mean": p["mean"], **{d: p["val"][d] for d in domains}} for p in points],
        "specialization": [{"tokens": p["tokens"], "jsd": p["jsd"]} for p in points if "jsd" in p],
        "similarity": [{"tokens": p["tokens"], "cosine": p["cosine"]} for p in points if "cosine" in p],
        "routing_final": points[-1].get("routing"),
        "data_sha256": metrics[-1]["data_sha256"] if metrics else None,
        "data_sha256_by_step": {str(r["step"]): r["data_sha256"] for r in metrics if r["step"] in ctx.steps},
    }
    if branches is not None:
        dense = _dense_params(ctx.config.seed_model)
        branch_tokens = branches["tokens_per_branch"] * len(branches["domains"])
        branches.update(tokens=branch_tokens, flops=training_flops(dense, branch_tokens))
        result["branches"] = branches
        result["flops"] = flops + branches["flops"]
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The whole experiment


@contextlib.contextmanager
def _exclusive(path: Path, what: str, wait: bool = False):
    """An advisory lock held while this process lives (the OS drops it on any exit, SIGKILL included)."""
    import fcntl

    handle = open(path, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UpcycleError(f"{what} is in use by another upcycle experiment process; wait for it or stop it "
                               "first") from None
        yield
    finally:
        handle.close()


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


def config_change(saved: dict, record: dict) -> str | None:
    """The first field in which config `record` differs from the config `saved` an OUT was made with, or None if it
    may run there: the same config, or the same with arms added (every saved arm still present and unchanged)."""
    difference = _first_difference({k: v for k, v in saved.items() if k != "arms"},
                                   {k: v for k, v in record.items() if k != "arms"})
    if difference:
        return difference
    arms = {arm["name"]: arm for arm in record["arms"]}
    for arm in saved["arms"]:
        if arm["name"] not in arms:
            return f"arms ({arm['name']} was removed)"
        if arms[arm["name"]] != arm:
            return f"arms ({arm['name']}).{_first_difference(arm, arms[arm['name']])}"
    return None


def _check_out(config: ExperimentConfig, out: Path) -> None:
    """OUT must be new, empty, or hold an experiment with this config or this config minus some arms (then the
    run resumes, and runs the added arms)."""
    saved_path = out / CONFIG_FILE
    if saved_path.is_file():
        change = config_change(yaml.safe_load(saved_path.read_text()), config_record(config))
        if change:
            raise UpcycleError(f"--out {out} holds an experiment with a different config (first difference: "
                               f"{change}); re-run with the same config (arms may be added) to resume, or use a new "
                               "--out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UpcycleError(f"--out {out} exists and is not an experiment directory (no {CONFIG_FILE}); choose a new "
                           "or empty directory")


def _setup(config: ExperimentConfig, out: Path) -> Path:
    """Record the config in OUT (new, or with arms added) and prepare the data once (both atomic); returns the data
    directory."""
    saved_path = out / CONFIG_FILE
    record = config_record(config)
    if not saved_path.is_file() or yaml.safe_load(saved_path.read_text()) != record:
        tmp = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
        tmp.write_text(yaml.safe_dump(record, sort_keys=False))
        os.replace(tmp, saved_path)
    if config.data.path is not None:
        return Path(config.data.path)
    from upcycle.data import METADATA_FILE, prepare

    data_dir = out / "data"
    if not (data_dir / METADATA_FILE).is_file():
        _log("tokenizing the data sources once for every arm")
        prepare(config.data.sources, data_dir, config.data.tokenizer, val_fraction=config.data.val_fraction,
                seed=config.seed, val_sources=config.data.val_sources, force=True, progress=False)
    return data_dir


def _die_with_parent():
    """A preexec_fn for an arm process: be killed when the experiment process dies (even by SIGKILL), so a re-run never
    races an orphan still training the same arm. Linux only (elsewhere the arm's lock refuses the race instead). The
    libc function is looked up here, in the parent: the child only calls it."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _run_parallel(config_path: str, out: Path, arms: list[ArmSpec], parallel: int, threads: int) -> None:
    """N arms at once, each `python -m upcycle experiment --only ARM` with threads // N torch threads."""
    per_child = max(1, threads // parallel)
    env = dict(os.environ, OMP_NUM_THREADS=str(per_child))
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pending, running, failed = list(arms), {}, []
    preexec = _die_with_parent()

    def ready(arm: ArmSpec) -> bool:  # grow and continue wait for the arm they start from
        return arm.from_arm is None or (out / "arms" / arm.from_arm / ARM_DONE_FILE).is_file()

    try:
        while pending or running:
            for arm in [a for a in pending if a.from_arm in failed]:  # never startable: its source failed
                pending.remove(arm)
                failed.append(arm.name)
            while len(running) < parallel and any(ready(a) for a in pending):
                arm = next(a for a in pending if ready(a))
                pending.remove(arm)
                log = open(out / "arms" / arm.name / "log.txt", "a")
                command = [sys.executable, "-m", "upcycle", "experiment", "--config", config_path, "--out", str(out),
                           "--only", arm.name, "--threads", str(per_child)]
                _log(f"{arm.name}: started in a separate process ({per_child} thread(s)), log in "
                     f"{out / 'arms' / arm.name / 'log.txt'}")
                running[arm.name] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                      preexec_fn=preexec), log)
            time.sleep(0.2)
            for name, (process, log) in list(running.items()):
                if process.poll() is not None:
                    log.close()
                    del running[name]
                    if process.returncode != 0:
                        failed.append(name)
                        _log(f"{name}: failed (exit {process.returncode}), see {out / 'arms' / name / 'log.txt'}")
                    else:
                        _log(f"{name}: done")
    finally:
        for process, log in running.values():
            process.kill()
            process.wait()
            log.close()
    if failed:
        raise UpcycleError(f"arm(s) {', '.join(failed)} failed; see arms/NAME/log.txt under {out}, fix the cause and "
                           "re-run the same command (finished arms are kept)")


def run_experiment(config: ExperimentConfig, out: str | Path, *, config_path: str, parallel: int = 1,
                   only: list[str] | None = None, threads: int | None = None) -> dict | None:
    """Run every unfinished arm, then write results.json, report.md and the figures; returns the results
    (None with `only`, which runs the named arms and writes no report)."""
    import torch

    if parallel < 1:
        raise UpcycleError(f"--parallel must be >= 1, got {parallel}")
    if threads is not None and threads < 1:
        raise UpcycleError(f"--threads must be >= 1, got {threads}")
    names = [arm.name for arm in config.arms]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise UpcycleError(f"--only {unknown[0]}: no such arm; the config has {', '.join(names)}")
    out = Path(out)
    _check_out(config, out)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    step_tokens = steps_tokens(config)
    total_steps = config.budget_tokens // step_tokens
    selected = [arm for arm in config.arms if only is None or arm.name in only]

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if only is None:  # one full run per OUT at a time; its --only children run under it
            stack.enter_context(_exclusive(out / ".experiment.lock", f"--out {out}"))
        with _exclusive(out / ".setup.lock", f"--out {out}", wait=True):
            data_dir = _setup(config, out)
        ctx = _Context(config, out, data_dir, step_tokens, total_steps,
                       eval_steps(config.eval_points, total_steps, step_tokens))
        todo = [arm for arm in selected if not (out / "arms" / arm.name / ARM_DONE_FILE).is_file()]
        for arm in selected:
            if arm not in todo:
                _log(f"{arm.name}: already done, skipped")
            (out / "arms" / arm.name).mkdir(parents=True, exist_ok=True)
        if parallel > 1 and len(todo) > 1:
            _run_parallel(config_path, out, todo, parallel, threads)
        else:
            for arm in todo:
                with _exclusive(out / "arms" / arm.name / ".lock", f"arm {arm.name} of --out {out}"):
                    run_arm(ctx, arm)
    if only is not None:
        return None
    from upcycle.experiment_report import write_outputs

    arms = [json.loads((out / "arms" / arm.name / ARM_DONE_FILE).read_text()) for arm in config.arms]
    return write_outputs(out, config, arms, tokens_per_step=step_tokens, threads=threads)


def experiment_command(
    *,
    config: str,
    out: str,
    parallel: int = 1,
    only: list[str] | None = None,
    threads: int | None = None,
) -> None:
    """Train a set of arms (dense, fs, naive, noise, drop, btx) with one recipe and compare them; resumable.

    Writes OUT/results.json, OUT/report.md and PNG figures (loss curves per domain, specialization and expert similarity
    over training, routing per arm). Re-running the same command after a kill finishes the unfinished arm from its last
    checkpoint and skips finished arms. See docs/experiments.md.

    Args:
        config: Experiment YAML (see experiments/tiny.yaml and the fields below).
        out: Experiment directory; re-running on it resumes. A different config on an existing OUT is refused.
        parallel: Arms trained at once, each in its own process with threads / parallel torch threads.
        only: Run only these arms (no results.json or report; a run without --only writes them).
        threads: Torch threads in all (default: torch's default, one per core).
    """
    experiment = load_experiment(config)
    results = run_experiment(experiment, out, config_path=str(Path(config).resolve()), parallel=parallel, only=only,
                             threads=threads)
    if results is not None:
        reference = results["reference"]["arm"]
        width = max(20, *(len(arm["name"]) + 2 for arm in results["arms"]))
        print(f"{'arm':<{width}}{'final mean loss':>16}  tokens to {reference or 'naive'}'s final")
        for arm in results["arms"]:
            reach = arm["tokens_to_naive_final"]
            reach_text = "-" if reference is None else ("not reached" if reach is None else f"{reach:,}")
            print(f"{arm['name']:<{width}}{arm['final']['mean']:>16.4f}  {reach_text}")
        _log(f"wrote {Path(out) / RESULTS_FILE}, {Path(out) / REPORT_FILE} and the figures")


experiment_command.help_epilog = config_help
