"""`upcycle experiment`: the paper's comparison as one command. Several arms that differ only in how the MoE is
initialized are trained with one recipe, at every seed of the config, on the same data in the same order (per seed),
for the same token budgets, measured at the same points on the same validation tokens, and compared in
OUT/results.json, OUT/report.md and PNG figures (experiment_report.py). The config: experiment_config.py.

Run:

    upcycle experiment --config experiments/tiny.yaml --out runs/tiny
    upcycle experiment --config experiments/tiny.yaml --out runs/tiny --parallel 2          # two runs at once
    upcycle experiment --config experiments/tiny.yaml --out runs/tiny --only naive --seeds 0   # some runs, no report
    upcycle experiment --rescore --data DATA_DIR --out runs/tiny                              # kept models, new data

Layout of OUT (everything is written atomically; re-running the same command resumes):

    experiment.yaml              the resolved config; a different config on the same OUT is refused (added arms are not)
    validation.json              the scored validation tokens: per domain, tokens, documents, tokens per document
    data/                        the tokenized data, when the config gives raw `sources`
    arms/NAME/seed_S/            one run of arm NAME at seed S (RunDir):
        init/                    the model before training (upcycle convert's output, grow: upcycle grow's; not for
                                 `dense`, which starts from the seed model, nor `continue`, which starts from its
                                 from_arm's final checkpoint at the same seed, arms/FROM/seed_S/run/checkpoints/...)
        branches/                btx only: one dense run per domain and its HF export
        run/                     the main run, an ordinary `upcycle train` directory: the largest budget's schedule
        budgets/TOKENS/run/      every other budget (wsd: a decay branch off the main run; cosine: its own run)
        measure/                 step_XXXXXXXX.json along the main run, budget_TOKENS.json at each budget's end
        final/TOKENS/            each budget's final model, a bf16 HF checkpoint (kept: --rescore re-measures these)
        arm.json                 written last: the run is done (a re-run skips it)
    results.json, report.md, loss_curves.png, gap_to_naive.png, specialization.png, similarity.png, routing_NAME.png
    rescore/NAME/                what --rescore --data DIR writes (NAME: DIR's name)

Training in segments: the main run is trained up to each evaluation point and (wsd) each branch point in turn, with
`train.max_steps` raised segment by segment while `schedule.decay_steps` stays the run's own length, so its learning
rates and updates are those of one uninterrupted run (the trainer resumes bit-exactly). Only the newest checkpoint is
kept (checkpoint.keep = 1). A wsd branch is a copy of the main run's directory at the branch point (its checkpoint,
config.yaml and metrics.jsonl), resumed with a schedule that decays to the branch's own budget.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from upcycle.train import checkpoint as ckpt
from upcycle.data import prepare as data_lib
from upcycle.experiment import stats as stats
from upcycle.eval.analyze import expert_matrices, expert_similarity, mean_pairwise_jsd, sequence_routing_counts
from upcycle.convert.conversion import convert
from upcycle.data.prepare import calibration_token_ids
from upcycle.errors import UpcycleError
from upcycle.eval.evaluate import score_domains
from upcycle.experiment.config import (CONFIG_FILE, FROM_ARM_FIELDS, FROM_ARM_KINDS, ArmSpec, ExperimentConfig,
                                       ExperimentPlan, arm_where, check_validation_split, config_change,
                                       config_from_record, config_record, inputs, read_saved_config,
                                       train_config_dict)
from upcycle.experiment.report import RESULTS_FILE, REPORT_FILE, build_results, display_path, write_outputs
from upcycle.files import LockHeld, atomic_write, atomic_write_json, exclusive_lock, publish_dir
from upcycle.convert.grow import grow
from upcycle.hardware import die_with_parent
from upcycle.model.hf import OUR_DOWN, OUR_GATE_UP, export_hf, load_model
from upcycle.train.trainer import run_training
from upcycle.train.config import config_from_dict

ARM_DONE_FILE = "arm.json"
VALIDATION_FILE = "validation.json"
RESCORE_DIR = "rescore"
LOCK_FILES = (".experiment.lock", ".setup.lock")
_STALE_TMP = ".tmp-"


# ---------------------------------------------------------------------------------------------------------------------
# The validation tokens and measuring a model on them


@dataclass
class ValidationSet:
    """Every domain's scored validation sequences and, for each scored token, the index of its document; and the
    training sequences scored at each budget's end."""

    batches: dict[str, list[torch.Tensor]]
    doc_ids: dict[str, np.ndarray]  # per domain: (scored tokens,) document index, in the order score_domains scores
    train_batches: dict[str, list[torch.Tensor]]
    record: dict  # what validation.json holds


# Random re-assignments of sequences to domains for the chance level of the routing's specialization (JSD).
JSD_PERMUTATIONS = 20


def validation_set(data_dir: Path, *, seq_len: int, tokens_per_domain: int | None, batch_size: int,
                   weights: dict[str, float] | None, train_tokens: int = 0,
                   weights_note: str = "the training mixture") -> ValidationSet:
    """The validation sequences of every domain (the whole split, or about `tokens_per_domain` tokens in sequences
    spread evenly over it) and the document of every scored token: documents end at EOS, as `data prepare` wrote
    them, and a token belongs to the document its target position lies in. Also about `train_tokens` per domain of
    the training split, spread evenly over it. Mixture weights: `weights` (over the domains given; the others weigh
    0), else each domain's share of the training tokens; `weights_note` says where they come from."""
    metadata = data_lib.read_metadata(data_dir)
    eos = metadata["eos_id"]
    max_sequences = 1 << 62 if tokens_per_domain is None else max(1, -(-tokens_per_domain // seq_len))
    batches = data_lib.validation_batches(data_dir, seq_len=seq_len, batch_size=batch_size, max_sequences=max_sequences)
    train_batches = data_lib.validation_batches(data_dir, seq_len=seq_len, batch_size=batch_size, split="train",
                                                max_sequences=max(1, -(-train_tokens // seq_len))) \
        if train_tokens else {}
    doc_ids, domains = {}, {}
    for domain in sorted(batches):
        tokens = data_lib.read_tokens(data_dir, domain, "val", metadata)
        chunks = data_lib.validation_chunk_ids(len(tokens), seq_len, max_sequences)
        ends = np.cumsum(np.asarray(tokens) == eos)  # ends[p]: documents ended at or before position p
        # target positions c * seq_len + 1 .. c * seq_len + seq_len lie in document ends[position - 1]
        raw = np.concatenate([ends[c * seq_len:c * seq_len + seq_len] for c in chunks]) if len(chunks) else \
            np.zeros(0, dtype=np.int64)
        documents, compact = np.unique(raw, return_inverse=True)
        doc_ids[domain] = compact
        domains[domain] = {"tokens": int(len(raw)), "sequences": int(len(chunks)), "documents": int(len(documents)),
                           "file": display_path(str(Path(data_dir) / metadata["domains"][domain]["val"]["file"])),
                           "training_tokens": int(metadata["domains"][domain]["train"]["tokens"]),
                           "doc_tokens": np.bincount(compact, minlength=len(documents)).tolist()}
    if weights is None:
        weights, weights_note = {d: float(domains[d]["training_tokens"]) for d in domains}, \
            "each domain's share of the training tokens"
    total = sum(max(0.0, weights.get(d, 0.0)) for d in domains)
    if total > 0:
        mixture = {d: max(0.0, weights.get(d, 0.0)) / total for d in domains}
    else:  # no domain scored here is in the mixture: the mixture-weighted mean is the plain mean
        mixture, weights_note = {d: 1.0 / len(domains) for d in domains}, \
            f"equal: none of these domains is in {weights_note}"
    record = {"data": display_path(str(data_dir)), "seq_len": seq_len, "tokens_per_domain": tokens_per_domain,
              "train_tokens_per_domain": train_tokens or None, "mixture_weights": mixture,
              "mixture_source": weights_note, "domains": domains}
    return ValidationSet(batches=batches, doc_ids=doc_ids, train_batches=train_batches, record=record)


def measure_model(model, val: ValidationSet, *, train: bool = False) -> dict:
    """Per domain: the token-weighted validation loss and each document's summed loss (evaluate.score_domains), and
    with `train` the loss on the training sequences; for an MoE also the routing shares per layer and domain, the
    domain specialization (mean pairwise JSD, averaged over layers) with its chance level (the same JSD with the
    sequences shuffled between domains) and the expert similarity (mean pairwise cosine of a layer's experts,
    averaged over layers), through analyze's functions. fp32."""
    config = model.config
    model.eval()
    device = next(model.parameters()).device
    scores = score_domains(model, val.batches, device=device, per_token=True)
    result: dict[str, Any] = {
        "val": {d: r["loss"] for d, r in scores.items()},
        "doc_loss": {d: np.bincount(val.doc_ids[d], weights=r["token_losses"],
                                    minlength=len(val.record["domains"][d]["doc_tokens"])).tolist()
                     for d, r in scores.items()},
    }
    if train and val.train_batches:
        result["train"] = {d: r["loss"] for d, r in score_domains(model, val.train_batches, device=device).items()}
    if config.is_moe:
        counts = sequence_routing_counts(model, val.batches, device=device)
        layers = range(len(config.moe_layer_ids))

        def specialization(groups: dict[str, np.ndarray]) -> float:
            return mean_pairwise_jsd({d: c.sum(0) / c.sum() for d, c in groups.items()})

        shares = [{d: (per_layer[j].sum(0) / per_layer[j].sum()).tolist() for d, per_layer in counts.items()}
                  for j in layers]
        jsd_layers = [mean_pairwise_jsd({d: np.array(s) for d, s in layer.items()}) for layer in shares]
        null_layers = [stats.permutation_null({d: per_layer[j] for d, per_layer in counts.items()}, specialization,
                                              permutations=JSD_PERMUTATIONS, seed=j) if len(counts) > 1 else None
                       for j in layers]
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        cosines = [stats.mean_offdiagonal(expert_similarity(expert_matrices(state[f"layers.{i}.{OUR_GATE_UP}"],
                                                                            state[f"layers.{i}.{OUR_DOWN}"])))
                   for i in config.moe_layer_ids]
        result.update(routing=shares, jsd_layers=jsd_layers, jsd=stats.mean_or_none(jsd_layers),
                      jsd_chance=stats.mean_or_none(null_layers), cosine_layers=cosines, cosine=float(np.mean(cosines)))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# One run: an arm at a seed


@dataclass(frozen=True)
class RunDir:
    """Where one run, arm NAME at seed S, keeps its files: OUT/arms/NAME/seed_S/ (the layout in the module
    docstring)."""

    path: Path
    done: Path  # arm.json, written last: the run is finished
    init: Path  # the model before training
    main: Path  # the main run, an `upcycle train` directory: the largest budget's schedule
    measure: Path
    log: Path  # a child process's output under --parallel
    lock: Path

    @classmethod
    def of(cls, out: Path, arm: str, seed: int) -> RunDir:
        path = Path(out) / "arms" / arm / f"seed_{seed}"
        return cls(path, done=path / ARM_DONE_FILE, init=path / "init", main=path / "run", measure=path / "measure",
                   log=path / "log.txt", lock=path / ".lock")

    def step_measure(self, step: int) -> Path:
        return self.measure / f"step_{step:08d}.json"

    def budget_measure(self, tokens: int) -> Path:
        return self.measure / f"budget_{tokens}.json"

    def budget_run(self, tokens: int) -> Path:
        """Every budget but the largest: a wsd decay branch off the main run, or a cosine run of its own."""
        return self.path / "budgets" / str(tokens) / "run"

    def final(self, tokens: int) -> Path:
        """The budget's kept model (bf16 HF checkpoint)."""
        return self.path / "final" / str(tokens)

    def branch(self, domain: str) -> Path:
        """btx: the dense run on one domain (its HF export: branch_export)."""
        return self.path / "branches" / domain

    def branch_export(self, domain: str) -> Path:
        return self.path / "branches" / f"{domain}-hf"


@dataclass
class _Context:
    config: ExperimentConfig
    out: Path
    data_dir: Path
    plan: ExperimentPlan
    val: ValidationSet


def _log(message: str) -> None:
    print(f"upcycle experiment: {message}", file=sys.stderr, flush=True)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _latest_step(run: Path) -> int:
    found = ckpt.list_checkpoints(run / ckpt.CHECKPOINT_DIR)
    return found[-1][0] if found else 0


def _checkpoint(run: Path, step: int) -> Path:
    return run / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(step)


def _train_to(ctx: _Context, train_dict: dict, run: Path, step: int, label: str) -> None:
    """Train run `run` up to `step` (resuming from its newest checkpoint); the trainer writes its checkpoint there."""
    if _latest_step(run) >= step:
        return
    values = copy.deepcopy(train_dict)
    values["train"]["max_steps"] = step
    _log(f"{label}: training to step {step} ({step * ctx.plan.tokens_per_step:,} tokens)")
    run_training(config_from_dict(values), run)
    if _latest_step(run) != step:
        raise UpcycleError(f"{label}: training stopped before step {step} (SIGTERM?); re-run the same command to "
                           "resume")


def _read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _data_hash(run: Path, step: int) -> str | None:
    return next((r["data_sha256"] for r in _read_metrics(run) if r["step"] == step), None)


def _tokenizer_dir(config: ExperimentConfig) -> str | None:
    """Where the kept models' tokenizer files come from (the data's tokenizer, else the seed's), if there are any."""
    for candidate in (config.data.tokenizer, config.seed_model):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return candidate
    return None


def _btx_branches(ctx: _Context, arm: ArmSpec, seed: int, unit: RunDir) -> tuple[list[str], dict]:
    """Train one dense branch per domain from the seed on that domain only, export each as an HF checkpoint."""
    steps = arm.branch_tokens // ctx.plan.tokens_per_step
    exports, info = [], {"tokens_per_branch": arm.branch_tokens, "domains": list(arm.domains), "data_sha256": {}}
    for domain in arm.domains:
        run, export = unit.branch(domain), unit.branch_export(domain)
        if not export.is_dir():
            train = train_config_dict(ctx.config, init_source=ctx.config.seed_model, max_steps=steps, seed=seed,
                                      data_path=str(ctx.data_dir), weights={domain: 1.0},
                                      wandb_run=(ctx.out.name, f"{arm.name}/seed{seed}/branch-{domain}", "branch"))
            _train_to(ctx, train, run, steps, f"{arm.name} seed {seed} branch {domain}")
            model = load_model(_checkpoint(run, steps))
            export_hf(model, model.config, export, tokenizer=ctx.config.seed_model)
            shutil.rmtree(run / ckpt.CHECKPOINT_DIR, ignore_errors=True)  # the export holds the weights
        info["data_sha256"][domain] = _data_hash(run, steps)
        exports.append(str(export))
    return exports, info


def source_checkpoint(out: Path, from_arm: str, seed: int, steps: int) -> Path:
    """Where a grow or continue arm at `seed` starts from: arm `from_arm`'s final model at the same seed, the last
    checkpoint of its main run (the largest budget's end, fp32; `steps`: that budget's steps). Kept, as every run's
    main-run checkpoint is, while OUT exists."""
    return _checkpoint(RunDir.of(out, from_arm, seed).main, steps)


def _source_not_finished(arm: ArmSpec, seed: int) -> UpcycleError:
    return UpcycleError(f"{arm.name} seed {seed} starts from arm {arm.from_arm} seed {seed}, which has not finished; "
                        f"run it first (--only {arm.from_arm} --seeds {seed}, or a run without --only and --seeds, "
                        "which runs the arms in order)")


def _from_arm_model(ctx: _Context, arm: ArmSpec, seed: int) -> Path:
    """The model a grow or continue arm starts from at `seed`; its run (from_arm at the same seed) must be finished."""
    source = RunDir.of(ctx.out, arm.from_arm, seed)
    if not source.done.is_file():
        raise _source_not_finished(arm, seed)
    checkpoint = source_checkpoint(ctx.out, arm.from_arm, seed, ctx.plan.budget_steps[-1])
    if not checkpoint.is_dir():
        raise UpcycleError(f"{arm.name} seed {seed} starts from {checkpoint}, the final checkpoint of arm "
                           f"{arm.from_arm} seed {seed}, which is missing; remove {source.path} and re-run to train it "
                           "again")
    return checkpoint


def _initial_model_dir(ctx: _Context, arm: ArmSpec, seed: int, unit: RunDir) -> tuple[str, dict | None]:
    """The model before training: the seed itself (dense), an `upcycle convert` output in unit/init, or for grow and
    continue the final model of arm from_arm at the same seed (grown into unit/init, or as it is)."""
    if arm.kind == "dense":
        return ctx.config.seed_model, None
    if arm.kind == "continue":
        return str(_from_arm_model(ctx, arm, seed)), None
    if arm.kind == "grow":
        init = unit.init
        if not init.is_dir():  # grow publishes atomically: a directory that exists is complete
            _log(f"{arm.name} seed {seed}: upcycle grow --factor {arm.factor} --ratio {arm.ratio:g} --top-k "
                 f"{arm.top_k} (from {arm.from_arm} seed {seed})")
            grow(_from_arm_model(ctx, arm, seed), init, factor=arm.factor, ratio=arm.ratio,
                 index_mode=arm.index_mode, top_k=arm.top_k, seed=seed, dtype="float32", progress=False)
        return str(init), None
    branches = None
    options = dataclasses.asdict(arm.convert_options(ctx.config, seed))
    source = ctx.config.seed_model
    if arm.kind == "btx":
        exports, branches = _btx_branches(ctx, arm, seed, unit)
        sources = exports + ([ctx.config.seed_model] if arm.include_seed else [])
        source, options["btx_sources"] = sources[0], tuple(sources[1:])
    init = unit.init
    if not init.is_dir():  # convert publishes atomically: a directory that exists is complete
        _log(f"{arm.name} seed {seed}: upcycle convert --method {options['method']}")
        convert(source, init, **options, progress=False)
    return str(init), branches


def _seed_branch(main: Path, step: int, branch_run: Path) -> None:
    """A wsd budget's run starts as a copy of the main run at its branch point: the checkpoint, config.yaml and
    metrics.jsonl, published with one rename (a run directory that exists is complete)."""
    branch_run.parent.mkdir(parents=True, exist_ok=True)
    for stale in branch_run.parent.glob(f".run{_STALE_TMP}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = branch_run.parent / f".run{_STALE_TMP}{os.getpid()}"
    (tmp / ckpt.CHECKPOINT_DIR).mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        if (main / name).is_file():
            shutil.copy2(main / name, tmp / name)
    shutil.copytree(_checkpoint(main, step), tmp / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(step))
    os.replace(tmp, branch_run)


def _finish_budget(ctx: _Context, unit: RunDir, run: Path, steps: int, *, flops_per_token: int, extra_flops: int,
                   delete_checkpoints: bool, label: str) -> dict:
    """Keep the budget's final model (bf16 HF checkpoint in unit/final/TOKENS) and measure that kept model."""
    tokens = steps * ctx.plan.tokens_per_step
    measured = unit.budget_measure(tokens)
    if measured.is_file():
        return json.loads(measured.read_text())
    kept = unit.final(tokens)
    if not kept.is_dir():
        model = load_model(_checkpoint(run, steps))
        export_hf(model, model.config, kept, dtype="bfloat16", tokenizer=_tokenizer_dir(ctx.config))
    record = measure_model(load_model(kept).to(_device()), ctx.val, train=True)
    record = {"tokens": tokens, "steps": steps, "flops": flops_per_token * tokens + extra_flops,
              "data_sha256": _data_hash(run, steps), "model": str(kept.relative_to(ctx.out)), **record}
    atomic_write_json(measured, record)
    if delete_checkpoints:
        shutil.rmtree(run / ckpt.CHECKPOINT_DIR, ignore_errors=True)
    _log(f"{label}: {tokens:,} tokens (end of schedule): mean validation loss "
         f"{np.mean(list(record['val'].values())):.4f}")
    return record


def run_unit(ctx: _Context, arm: ArmSpec, seed: int) -> dict:
    """One arm at one seed: initialize, train the main run segment by segment (measuring its evaluation points and,
    with wsd, seeding each budget's decay branch at its branch point), then finish every budget (kept model,
    measurement); write arms/NAME/seed_S/arm.json last."""
    config, plan = ctx.config, ctx.plan
    unit = RunDir.of(ctx.out, arm.name, seed)
    done = unit.done
    if done.is_file():
        _log(f"{arm.name} seed {seed}: already done, skipped")
        return json.loads(done.read_text())
    label = f"{arm.name} seed {seed}"
    unit.measure.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    init_dir, branches = _initial_model_dir(ctx, arm, seed, unit)
    main, largest = unit.main, plan.budget_steps[-1]

    def train_dict(steps: int, decay_steps: int) -> dict:
        # one W&B run per arm and seed (the main run), one per decay branch, grouped by the experiment
        name = f"{arm.name}/seed{seed}" + ("" if steps == largest else f"/budget{steps * plan.tokens_per_step}")
        return train_config_dict(config, init_source=init_dir, max_steps=steps, seed=seed, data_path=str(ctx.data_dir),
                                 decay_steps=decay_steps, arm=arm,
                                 wandb_run=(ctx.out.name, name, "main" if steps == largest else "decay"))

    model = load_model(init_dir).to(_device())
    if not unit.step_measure(0).is_file():
        atomic_write_json(unit.step_measure(0), {"step": 0, "tokens": 0, **measure_model(model, ctx.val)})
    active, total = model.num_active_params(), model.num_params()  # the model's own (grow changes both)
    shape = dict(zip(FROM_ARM_FIELDS, (arm.from_arm, model.config.num_experts or None,
                                       model.config.top_k if model.config.is_moe else None))) \
        if arm.kind in FROM_ARM_KINDS else {}
    flops_per_token = stats.training_flops(active, 1)
    del model
    extra_flops = 0
    if branches is not None:
        dense = load_model(config.seed_model).num_params()
        branches.update(tokens=branches["tokens_per_branch"] * len(branches["domains"]))
        branches["flops"] = stats.training_flops(dense, branches["tokens"])
        extra_flops = branches["flops"]

    branch_runs = {n: unit.budget_run(n * plan.tokens_per_step) for n in plan.budget_steps[:-1]}
    for stop in sorted(set(plan.eval_steps) | set(plan.branch_steps.values())):
        pending = [n for n, b in plan.branch_steps.items() if b == stop and not branch_runs[n].is_dir()
                   and not unit.budget_measure(n * plan.tokens_per_step).is_file()]
        if stop in plan.eval_steps and unit.step_measure(stop).is_file() and not pending:
            continue
        if pending and _latest_step(main) > stop:
            raise UpcycleError(f"{label}: the main run is past step {stop}, where the decay branch of budget "
                               f"{pending[0] * plan.tokens_per_step:,} starts; remove {unit.path} and re-run")
        _train_to(ctx, train_dict(largest, largest), main, stop, label)
        if stop in plan.eval_steps and not unit.step_measure(stop).is_file():
            record = measure_model(load_model(_checkpoint(main, stop)).to(_device()), ctx.val)
            atomic_write_json(unit.step_measure(stop), {"step": stop, "tokens": stop * plan.tokens_per_step, **record})
            _log(f"{label}: step {stop}: mean validation loss {np.mean(list(record['val'].values())):.4f}")
        for n in pending:
            _seed_branch(main, stop, branch_runs[n])
    budgets = {largest: _finish_budget(ctx, unit, main, largest, flops_per_token=flops_per_token,
                                       extra_flops=extra_flops, delete_checkpoints=False, label=label)}
    for n in plan.budget_steps[:-1]:
        run = branch_runs[n]
        if plan.schedule == "wsd" and not unit.budget_measure(n * plan.tokens_per_step).is_file() and not run.is_dir():
            raise UpcycleError(f"{label}: the decay branch of budget {n * plan.tokens_per_step:,} was not taken off "
                               f"the main run at step {plan.branch_steps[n]}; remove {unit.path} and re-run")
        _train_to(ctx, train_dict(n, n), run, n, f"{label} budget {n * plan.tokens_per_step:,}")
        budgets[n] = _finish_budget(ctx, unit, run, n, flops_per_token=flops_per_token, extra_flops=extra_flops,
                                    delete_checkpoints=True, label=label)

    curve = [json.loads(unit.step_measure(s).read_text()) for s in [0, *plan.eval_steps]]
    result = {
        "name": arm.name, "seed": seed, "method": arm.kind, "ratio": arm.ratio, "index_mode": arm.index_mode,
        "convert": _display_convert(arm.convert), **shape, "active_params": active, "total_params": total,
        **({"train": arm.train} if arm.train else {}), **({"model": arm.model} if arm.model else {}),
        "budgets": [_strip(budgets[n]) for n in plan.budget_steps],
        "curve": [_strip(p) for p in curve],
        "routing_final": budgets[largest].get("routing"),
        "data_sha256_by_step": {str(s): _data_hash(main, s) for s in plan.eval_steps},
        "branches": branches,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),  # this invocation's time (not counting killed ones)
    }
    atomic_write_json(done, result)
    _log(f"{label}: done")
    return result


def _strip(point: dict) -> dict:
    """A measurement as arm.json keeps it: without the per-layer lists and the routing shares (kept once, at the end
    of the largest budget, as routing_final)."""
    return {k: v for k, v in point.items() if k not in ("jsd_layers", "cosine_layers", "routing")}


def _display_convert(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """An arm's extra convert options as results.json records them (paths relative to the working directory)."""
    if not options:
        return None
    return {k: display_path(v) if k == "calibration" and isinstance(v, str) else v for k, v in options.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The whole experiment


@contextlib.contextmanager
def _exclusive(path: Path, what: str, wait: bool = False):
    """An advisory lock held while this process lives (the OS drops it on any exit, SIGKILL included). On a file
    system without locks the OSError is raised: the runs of one experiment rely on these locks."""
    try:
        handle, unlocked = exclusive_lock(path, wait=wait)
    except LockHeld:
        raise UpcycleError(f"{what} is in use by another upcycle experiment process; wait for it or stop it "
                           "first") from None
    with handle:
        if unlocked is not None:
            raise unlocked
        yield


def _refuse_inputs_in_out(config: ExperimentConfig, out: Path) -> None:
    """OUT may neither be nor hold anything the experiment reads, nor lie inside a source directory (tokenizing it
    would read OUT's own files)."""
    out_real = out.resolve()
    for where, path in inputs(config):
        real = path.resolve()
        if real == out_real or out_real in real.parents:
            raise UpcycleError(f"{where}: {path} {'is' if real == out_real else 'lies inside'} --out {out}; keep the "
                               "experiment's inputs outside its output directory")
        if where.startswith("data.") and "sources" in where and real.is_dir() and real in out_real.parents:
            raise UpcycleError(f"{where}: --out {out} lies inside the source directory {path}, so its files would be "
                               "read as text; choose an --out outside the sources")


def _check_out(config: ExperimentConfig, out: Path) -> None:
    """Before anything is written: OUT must be new, empty, or hold an experiment with this config (or this config
    minus some arms). Checked again inside the set-up lock, where it counts (another run may be setting up)."""
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out {out} exists and is not a directory; choose a new or empty directory")
    _refuse_inputs_in_out(config, out)
    if (out / CONFIG_FILE).is_file():
        _check_same_config(config, out)
    elif out.exists() and any(p.name not in LOCK_FILES for p in out.iterdir()):
        raise UpcycleError(f"--out {out} exists and is not an experiment directory (no {CONFIG_FILE}); choose a new "
                           "or empty directory")


def _check_same_config(config: ExperimentConfig, out: Path) -> None:
    change = config_change(read_saved_config(out), config_record(config))
    if change:
        raise UpcycleError(f"--out {out} holds an experiment with a different config (first difference: {change}); "
                           "re-run with the same config (arms may be added) to resume, or use a new --out")


def _check_calibration_disjoint(config: ExperimentConfig, data_dir: Path) -> None:
    """Router-init calibration text shares no document with the validation split: an overlap would score the router
    init on the text it was fitted to. Documents are compared as token sequences (the calibration is read with the
    seed's tokenizer, as convert reads it)."""
    arms = [(i, arm) for i, arm in enumerate(config.arms) if (arm.convert or {}).get("calibration")]
    if not arms:
        return
    metadata = data_lib.read_metadata(data_dir)
    eos = metadata["eos_id"]

    def documents(tokens: np.ndarray) -> set[bytes]:
        tokens = np.asarray(tokens, dtype=np.int64)
        cuts = np.flatnonzero(tokens == eos) + 1
        return {piece.tobytes() for piece in np.split(tokens, cuts) if len(piece) > 1}

    val = {d: documents(data_lib.read_tokens(data_dir, d, "val", metadata)) for d in sorted(metadata["domains"])}
    for index, arm in arms:
        options = arm.convert_options(config, config.seeds[0])
        calibration = documents(calibration_token_ids(options.calibration, config.seed_model,
                                                      options.calibration_tokens).numpy())
        for domain, docs in val.items():
            shared = len(calibration & docs)
            if shared:
                info = metadata["domains"][domain]
                where = ", ".join(info.get("val_sources") or []) or str(data_dir / info["val"]["file"])
                raise UpcycleError(f"{arm_where(index, arm)}.convert.calibration: {options.calibration} shares "
                                   f"{shared} document(s) with the validation text of domain {domain} ({where}); "
                                   "calibrate on text outside the validation split")


def _setup(config: ExperimentConfig, out: Path) -> Path:
    """Inside the set-up lock: compare the config with OUT's (again: another run may have set up meanwhile), prepare
    the data once, check what needs the data (calibration text disjoint from validation), then record the config and
    the validation tokens. Returns the data directory."""
    if (out / CONFIG_FILE).is_file():
        _check_same_config(config, out)
    data_dir = Path(config.data.path) if config.data.path is not None else out / "data"
    created = False
    if not (data_dir / data_lib.METADATA_FILE).is_file():
        _log("tokenizing the data sources once for every arm")
        data_lib.prepare(config.data.sources, data_dir, config.data.tokenizer, val_fraction=config.data.val_fraction,
                         seed=config.seeds[0], val_sources=config.data.val_sources, force=True, progress=False)
        created = True
    try:
        if config.data.path is None:
            seed = json.loads((Path(config.seed_model) / "config.json").read_text())  # validated by the config
            data_lib.check_data_fits(data_dir, vocab_size=seed["vocab_size"], seq_len=config.data.seq_len,
                                     max_seq_len=seed.get("max_position_embeddings") or config.data.seq_len,
                                     seq_len_name="data.seq_len")
            check_validation_split(data_dir, config.data.seq_len)
        _check_calibration_disjoint(config, data_dir)
    except UpcycleError:
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    record = config_record(config)
    if read_saved_config(out) != record:
        atomic_write(out / CONFIG_FILE, _yaml(record))
    return data_dir


def _yaml(record: dict) -> str:
    return yaml.safe_dump(record, sort_keys=False)


def _run_parallel(config_path: str, out: Path, units: list[tuple[ArmSpec, int]], parallel: int,
                  threads: int) -> None:
    """N runs at once, each `python -m upcycle experiment --only=ARM --seeds=S` with threads // N torch threads:
    always in child processes, even when a single run is left, so every run has the same thread count as in an
    uninterrupted experiment (and the same floating-point reductions). A grow or continue run starts once its
    from_arm's run at the same seed has finished (its arm.json exists); if that run failed, it fails unstarted."""
    per_child = max(1, threads // parallel)
    env = dict(os.environ, OMP_NUM_THREADS=str(per_child))
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pending, running, failed, unstarted = list(units), {}, [], []
    # each child is killed when this process dies (even by SIGKILL), so a re-run never races an orphan still training
    # the same run; Linux only (elsewhere the run's lock refuses the race instead)
    preexec = die_with_parent(signal.SIGKILL, parent=os.getpid())

    def ready(arm: ArmSpec, seed: int) -> bool:
        return arm.from_arm is None or RunDir.of(out, arm.from_arm, seed).done.is_file()

    try:
        while pending or running:
            for arm, seed in list(pending):
                # never startable: its source failed (or was not started), or is neither running nor pending
                source = (arm.from_arm, seed)
                if arm.from_arm is not None and not ready(arm, seed) and source not in running \
                        and not any((a.name, s) == source for a, s in pending):
                    pending.remove((arm, seed))
                    unstarted.append(f"{arm.name} seed {seed}")
                    _log(f"{arm.name} seed {seed}: not started: arm {arm.from_arm} seed {seed}, which it starts from, "
                         "did not finish")
            while len(running) < parallel and any(ready(a, s) for a, s in pending):
                arm, seed = next((a, s) for a, s in pending if ready(a, s))
                pending.remove((arm, seed))
                unit = RunDir.of(out, arm.name, seed)
                unit.path.mkdir(parents=True, exist_ok=True)
                log = open(unit.log, "a")
                # --flag=VALUE: an arm name is never read as a flag
                command = [sys.executable, "-m", "upcycle", "experiment", f"--config={config_path}", f"--out={out}",
                           f"--only={arm.name}", f"--seeds={seed}", f"--threads={per_child}"]
                _log(f"{arm.name} seed {seed}: started in a separate process ({per_child} thread(s)), log in "
                     f"{unit.log}")
                running[(arm.name, seed)] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                              preexec_fn=preexec), log)
            time.sleep(0.2)
            for key, (process, log) in list(running.items()):
                if process.poll() is not None:
                    log.close()
                    del running[key]
                    name, seed = key
                    if process.returncode != 0:
                        failed.append(f"{name} seed {seed}")
                        _log(f"{name} seed {seed}: failed (exit {process.returncode}), see "
                             f"{RunDir.of(out, name, seed).log}")
                    else:
                        _log(f"{name} seed {seed}: done")
    finally:
        for process, log in running.values():
            process.kill()
            process.wait()
            log.close()
    if failed or unstarted:
        not_started = f"; {', '.join(unstarted)} not started (the run it starts from did not finish)" if unstarted \
            else ""
        raise UpcycleError(f"{', '.join(failed) or 'no run'} failed{not_started}; see arms/NAME/seed_S/log.txt under "
                           f"{out}, fix the cause and re-run the same command (finished runs are kept)")


def _context(config: ExperimentConfig, out: Path, data_dir: Path) -> _Context:
    template = config.train_template()
    val = validation_set(data_dir, seq_len=config.data.seq_len, tokens_per_domain=config.eval.tokens,
                         # only the speed of measuring depends on the batch size (empty: the trainer's auto size)
                         batch_size=template.train.micro_batch_size or 8, weights=config.data.weights,
                         train_tokens=config.eval.train_tokens)
    return _Context(config, out, data_dir, config.plan(), val)


def _header(config: ExperimentConfig, *, title: str = "upcycle experiment", recipe: bool = True) -> dict:
    """What results.json says of the design, besides the arms: everything the report is rendered from."""
    plan, schedule = config.plan(), config.train_template().schedule
    reference = config.reference_arm()
    primary = config.primary
    return {"title": title, "seed_model": display_path(config.seed_model), "seeds": list(config.seeds),
            "num_experts": config.moe.num_experts, "top_k": config.moe.top_k, "domains": config.domains,
            "budgets": list(config.budgets), "tokens_per_step": plan.tokens_per_step,
            "schedule": {"kind": schedule.kind, "decay_fraction": schedule.decay_fraction if schedule.kind == "wsd"
                         else None, "warmup_steps": schedule.warmup_steps},
            "reference": reference.name if reference else None,
            "primary": {"arms": list(primary.arms), "budget": primary.budget or config.budgets[-1],
                        "mean": primary.mean} if primary.arms else None,
            "recipe": config.recipe if recipe else None}


def write_report(config: ExperimentConfig, out: Path, *, header: dict | None = None) -> dict:
    """results.json, the per-document losses, report.md and the figures of OUT from its runs' arm.json files and
    validation.json (every run of the config must have finished)."""
    units = [json.loads(RunDir.of(out, arm.name, seed).done.read_text())
             for arm in config.arms for seed in config.seeds_of(arm)]
    validation = json.loads((out / VALIDATION_FILE).read_text())
    results = build_results(units, validation, header=header or _header(config),
                            arm_names=[arm.name for arm in config.arms])
    return write_outputs(out, results, units=units, validation=validation)


def run_experiment(config: ExperimentConfig, out: str | Path, *, config_path: str, parallel: int = 1,
                   only: list[str] | None = None, seeds: list[int] | None = None,
                   threads: int | None = None) -> dict | None:
    """Run every unfinished (arm, seed), then write results.json, report.md and the figures; returns the results
    (None with `only` or `seeds`, which run those runs and write no report)."""
    if parallel < 1:
        raise UpcycleError(f"--parallel must be >= 1, got {parallel}")
    if threads is not None and threads < 1:
        raise UpcycleError(f"--threads must be >= 1, got {threads}")
    names = [arm.name for arm in config.arms]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise UpcycleError(f"--only {unknown[0]}: no such arm; the config has {', '.join(names)}")
    unknown_seeds = sorted(set(seeds or []) - set(config.seeds))
    if unknown_seeds:
        raise UpcycleError(f"--seeds {unknown_seeds[0]}: not one of the config's seeds "
                           f"{', '.join(map(str, config.seeds))}")
    out = Path(out)
    _check_out(config, out)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    selected = [(arm, seed) for arm in config.arms for seed in config.seeds_of(arm)
                if (only is None or arm.name in only) and (seeds is None or seed in seeds)]
    partial = only is not None or seeds is not None
    chosen = {(arm.name, seed) for arm, seed in selected}
    for arm, seed in selected:  # a grow or continue run needs its source run finished, or run first
        if arm.from_arm is not None and (arm.from_arm, seed) not in chosen \
                and not RunDir.of(out, arm.from_arm, seed).done.is_file():
            raise _source_not_finished(arm, seed)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if not partial:  # one full run per OUT at a time; its --only children run under it
            stack.enter_context(_exclusive(out / ".experiment.lock", f"--out {out}"))
        try:
            with _exclusive(out / ".setup.lock", f"--out {out}", wait=True):
                data_dir = _setup(config, out)
                ctx = _context(config, out, data_dir)
                if not (out / VALIDATION_FILE).is_file():
                    atomic_write_json(out / VALIDATION_FILE, ctx.val.record)
        except UpcycleError:
            if created and all(p.name in LOCK_FILES for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)  # refused before anything was written: leave no OUT behind
            raise
        todo = [(arm, seed) for arm, seed in selected
                if not RunDir.of(out, arm.name, seed).done.is_file()]
        for arm, seed in selected:
            if (arm, seed) not in todo:
                _log(f"{arm.name} seed {seed}: already done, skipped")
        if parallel > 1 and todo:
            _run_parallel(config_path, out, todo, parallel, threads)
        elif todo:
            for arm, seed in todo:
                unit = RunDir.of(out, arm.name, seed)
                unit.path.mkdir(parents=True, exist_ok=True)
                with _exclusive(unit.lock, f"arm {arm.name} seed {seed} of --out {out}"):
                    run_unit(ctx, arm, seed)
    if partial:
        return None
    return write_report(config, out)


# ---------------------------------------------------------------------------------------------------------------------
# Re-scoring the kept models on other data


def rescore_experiment(out: str | Path, data: str | Path, *, threads: int | None = None) -> dict:
    """Re-measure every kept model of a finished experiment (each arm, seed and budget, and each run's untrained model
    when it is still there) on the validation split of another prepared data directory: loss, routing and
    specialization, no training. Writes OUT/rescore/NAME/ (NAME: the data directory's name) with results.json,
    report.md and figures, replacing an earlier rescore of the same name once the new one is complete."""
    out, data_dir = Path(out), Path(data).expanduser()
    saved = read_saved_config(out)
    if saved is None:
        raise UpcycleError(f"--out {out} holds no experiment ({CONFIG_FILE} is missing); pass the --out of a finished "
                           "upcycle experiment")
    data_lib.read_metadata(data_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    recorded = config_from_record(saved)
    runs = [(arm.name, seed) for arm in recorded.arms for seed in recorded.seeds_of(arm)]
    missing = [f"{name} seed {seed}" for name, seed in runs if not RunDir.of(out, name, seed).done.is_file()]
    if missing:
        raise UpcycleError(f"--out {out} is not finished ({missing[0]} has not run); finish it with the same "
                           "upcycle experiment command first")
    seq_len = saved["data"]["seq_len"]
    units_done = [json.loads(RunDir.of(out, name, seed).done.read_text()) for name, seed in runs]
    model_config = load_model(out / units_done[0]["budgets"][-1]["model"]).config
    data_lib.check_data_fits(data_dir, vocab_size=model_config.vocab_size, max_seq_len=model_config.max_seq_len,
                             seq_len=seq_len, seq_len_name="the experiment's data.seq_len")
    check_validation_split(data_dir, seq_len)
    # The mixture-weighted mean weighs the domains as the experiment trained on them, not as this data is made up.
    trained = json.loads((out / VALIDATION_FILE).read_text())["mixture_weights"]
    described = ", ".join(f"{d} {w:.3f}" for d, w in sorted(trained.items()))
    val = validation_set(data_dir, seq_len=seq_len, tokens_per_domain=saved["eval"]["tokens"], batch_size=8,
                         weights=trained, weights_note=f"the experiment's training mixture ({described}), over the "
                         "domains scored here")
    units = []
    for done in units_done:
        label = f"{done['name']} seed {done['seed']}"
        if done["method"] == "dense":
            init = Path(saved["seed_model"])
        elif done["method"] == "continue":  # the model it started from: its source's final checkpoint
            init = source_checkpoint(out, done["from_arm"], done["seed"], done["budgets"][-1]["steps"])
        else:
            init = RunDir.of(out, done["name"], done["seed"]).init
        curve = []
        if (init / "config.json").is_file():
            curve.append({"step": 0, "tokens": 0, **measure_model(load_model(init).to(_device()), val)})
        measured = []
        for budget in done["budgets"]:
            kept = out / budget["model"]
            if not kept.is_dir():
                raise UpcycleError(f"{label}: the kept model {kept} is missing; it cannot be re-scored")
            record = measure_model(load_model(kept).to(_device()), val)
            measured.append({**{k: budget[k] for k in ("tokens", "steps", "flops", "data_sha256", "model")},
                             **record})
            _log(f"{label}: {budget['tokens']:,} tokens re-scored: mean loss "
                 f"{np.mean(list(record['val'].values())):.4f}")
        units.append({**{k: done[k] for k in ("name", "seed", "method", "ratio", "index_mode", "convert",
                                              "active_params", "total_params")},
                      **{k: done[k] for k in FROM_ARM_FIELDS if k in done},
                      "budgets": [_strip(b) for b in measured], "curve": [_strip(p) for p in curve],
                      "routing_final": measured[-1].get("routing")})
    header = {**_header(recorded, title=f"upcycle experiment, kept models re-scored on {display_path(str(data_dir))}",
                        recipe=False), "domains": sorted(val.batches), "rescored_on": display_path(str(data_dir))}
    results = build_results(units, val.record, header=header, arm_names=[arm.name for arm in recorded.arms])
    target = out / RESCORE_DIR / data_dir.resolve().name
    target.parent.mkdir(parents=True, exist_ok=True)
    with publish_dir(target, force=True, inputs=[data_dir], flag="--out") as tmp:
        write_outputs(tmp, results, units=units, validation=val.record)
    _log(f"wrote {target / RESULTS_FILE}, {target / REPORT_FILE} and the figures")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Merging pieces run elsewhere


PIECE_FILE = "piece.json"  # a piece's record of where and when it ran (scripts/gpu_piece.sh writes it)
MERGED_FILE = "merged.json"  # a merged OUT's record of the pieces it was made from


def _portable(value: Any, root: str | None) -> Any:
    """A saved config with every path below `root` (the directory a piece ran in) written relative to it, so that
    pieces run in different places compare equal."""
    if root is None:
        return value
    prefix = root.rstrip("/") + "/"
    if isinstance(value, dict):
        return {k: _portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, root) for v in value]
    return value[len(prefix):] if isinstance(value, str) and value.startswith(prefix) else value


def merge_pieces(pieces: list[str | Path], out: str | Path) -> dict:
    """One experiment's OUT made from pieces of it run elsewhere, each an OUT of the same config where some runs
    finished (`--only ARM --seeds S ...`, e.g. on a GPU machine by scripts/gpu_piece.sh): their runs' arm.json files
    gathered into `out`, which then gets results.json, documents.json, report.md and the figures, as a full run would
    write them. The pieces must record the same config (paths compared relative to the directory each piece ran in,
    which its piece.json names) and the same validation tokens, and hold every run of the config exactly once between
    them. No training, no evaluation, no checkpoint of any piece needed. An earlier merge in `out` is replaced."""
    out = Path(out)
    if out.exists() and not (out / MERGED_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UpcycleError(f"--out {out} exists and was not written by --merge; choose a new directory")
    records, validations, notes = [], [], []
    for piece in map(Path, pieces):
        saved = read_saved_config(piece)
        if saved is None or not (piece / VALIDATION_FILE).is_file():
            raise UpcycleError(f"--merge {piece}: not an experiment directory ({CONFIG_FILE} or {VALIDATION_FILE} is "
                               "missing); pass the --out of each piece")
        note = json.loads((piece / PIECE_FILE).read_text()) if (piece / PIECE_FILE).is_file() else {}
        records.append(_portable(saved, note.get("root")))
        validations.append(json.loads((piece / VALIDATION_FILE).read_text()))
        notes.append({"piece": str(piece), **note})
    for piece, record, validation in zip(pieces[1:], records[1:], validations[1:]):
        change = config_change(records[0], record) or config_change(record, records[0])
        if change:
            raise UpcycleError(f"--merge {piece} was run with another config than {pieces[0]} (first difference: "
                               f"{change}); merge pieces of one experiment")
        if validation != validations[0]:
            raise UpcycleError(f"--merge {piece} scored other validation tokens than {pieces[0]}; merge pieces "
                               "prepared from the same data")
    config = config_from_record(records[0])
    runs, found = [(arm.name, seed) for arm in config.arms for seed in config.seeds_of(arm)], {}
    for piece in map(Path, pieces):
        for name, seed in runs:
            if RunDir.of(piece, name, seed).done.is_file():
                if (name, seed) in found:
                    raise UpcycleError(f"--merge: {name} seed {seed} finished in both {found[(name, seed)]} and "
                                       f"{piece}; merge one of them")
                found[(name, seed)] = piece
    missing = [f"{name} seed {seed}" for name, seed in runs if (name, seed) not in found]
    if missing:
        raise UpcycleError(f"--merge: no piece holds {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                           f"({len(missing)} of {len(runs)} runs missing); run those pieces first")
    with publish_dir(out, force=out.exists(), flag="--out") as tmp:
        atomic_write(tmp / CONFIG_FILE, _yaml(records[0]))
        atomic_write_json(tmp / VALIDATION_FILE, validations[0])
        atomic_write_json(tmp / MERGED_FILE, {"pieces": notes})
        for (name, seed), piece in found.items():
            target = RunDir.of(tmp, name, seed).done
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(RunDir.of(piece, name, seed).done, target)
        results = write_report(config, tmp)
    _log(f"merged {len(runs)} runs from {len(pieces)} piece(s) into {out}")
    return results
