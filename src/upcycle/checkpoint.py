"""Atomic training checkpoints: everything needed to continue a run bit for bit, in formats that cannot run code.

Layout of one checkpoint (`OUT/checkpoints/step_00001000/`):

    model.safetensors      full (unsharded) model weights under our parameter names
    config.json            {"format": "upcycle", "model": ModelConfig fields, "step": N}: with model.safetensors this is
                           our model format, so `upcycle export` / `hf_model.load_model` read a checkpoint directly
    optimizer.safetensors  every optimizer state tensor, keyed "state/{param name}/{field}" (AdamW: step, exp_avg, ...)
    optimizer.json         the optimizer's param groups (hyper-parameters, parameter names) and non-tensor state
    trainer_state.json     step, tokens seen, data loader position, anything else the trainer needs (JSON), and
                           "health": unverified when written; good or suspect once the step after it ran (below)
    rng_rank{R}.json       RNG states of rank R: python, numpy, torch CPU, CUDA (byte states in base64)
    train_config.yaml      the resolved training config of the run

Atomicity: everything is written into `.tmp-step_XXXXXXXX`, every file and the directory are fsynced, then the
directory is renamed to `step_XXXXXXXX` (a rename within one file system is atomic) and the parent fsynced. A run killed
at any moment leaves either the complete new checkpoint or none, never a partial one that looks valid; leftover
`.tmp-*` directories are removed by the next save.

Health: the weights of checkpoint s are only tested by step s + 1 (its loss and gradient norm). The trainer then marks
the checkpoint good, or suspect when that step was non-finite or a spike (`mark_health`, an atomic rewrite of its
trainer_state.json). `keep` never deletes the newest good checkpoint, so while newer ones are unverified or suspect the
last one known to be healthy survives; `last_good_checkpoint` names it, and resuming skips suspect checkpoints.

Distributed (FSDP2 / DDP): the weights and optimizer state are gathered to full, unsharded CPU tensors with
torch.distributed.checkpoint.state_dict (`full_state_dict=True, cpu_offload=True`) and written by rank 0, so a
checkpoint is independent of the number of ranks: written by 2 ranks, it resumes on 1, and the other way round.
With expert parallelism the local expert shards are gathered into the same full tensors (and one param group) on
save and sliced per rank on load (expert_parallel.py), so the expert-parallel degree may change between runs too.
Each rank writes its own RNG file; all ranks must see the same file system (one node, or a shared disk).

Nothing here uses pickle: tensors go to safetensors, the rest to JSON / YAML, and no torch.load is involved.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from upcycle.distributed import World, barrier
from upcycle.errors import UpcycleError
from upcycle.files import fsync_path

CHECKPOINT_DIR = "checkpoints"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
TRAIN_CONFIG = "train_config.yaml"
MODEL_FORMAT = "upcycle"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def model_config_record(model_config: dict, **extra) -> dict:
    """config.json of our model format: {"format": "upcycle", "model": ModelConfig fields, ...}; every writer of the
    format (training checkpoints, hf_model.save_model) writes it through this."""
    return {"format": MODEL_FORMAT, "model": model_config, **extra}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first, as (step, path); temp directories are not checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


HEALTH_UNVERIFIED, HEALTH_GOOD, HEALTH_SUSPECT = "unverified", "good", "suspect"


def health(path: str | os.PathLike) -> str:
    """good, suspect or unverified (see the module docstring); checkpoints written before health existed are good."""
    try:
        return read_trainer_state(path).get("health", HEALTH_GOOD)
    except (OSError, ValueError):
        return HEALTH_SUSPECT  # unreadable: never the one to trust


def mark_health(path: str | os.PathLike, value: str, reason: str | None = None) -> None:
    """Record whether the step after checkpoint `path` was healthy: rewrite its trainer_state.json atomically."""
    path = Path(path)
    state = read_trainer_state(path)
    state["health"] = value
    if reason:
        state["health_reason"] = reason
    tmp = path / f".{TRAINER_STATE}.tmp"
    _write_json(tmp, state)
    fsync_path(tmp)
    os.replace(tmp, path / TRAINER_STATE)
    fsync_path(path)


def last_good_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose next step had a finite, spike-free loss and gradient norm."""
    good = [path for _, path in list_checkpoints(root) if health(path) == HEALTH_GOOD]
    return good[-1] if good else None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise UpcycleError naming the file if checkpoint `path` is incomplete, truncated or unreadable (headers and
    sizes of its safetensors files, its JSON files), without loading any tensor."""
    from upcycle.safetensors_io import read_header

    path = Path(path)
    for name in (MODEL_WEIGHTS, MODEL_CONFIG, OPTIMIZER_TENSORS, OPTIMIZER_META, TRAINER_STATE):
        file = path / name
        if not file.is_file():
            raise UpcycleError(f"checkpoint {path} has no {name}; it is incomplete or not a training checkpoint")
        if name.endswith(".json"):
            try:
                json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError):
                raise UpcycleError(f"{file} is truncated or not JSON") from None
        else:
            read_header(file)


def resumable_checkpoint(root: str | os.PathLike, log=print) -> Path | None:
    """The newest checkpoint to resume from: complete and readable (a damaged one is named through `log` and the
    previous one is taken) and not suspect (its next step diverged or spiked: resuming there would diverge again)."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except UpcycleError as exc:
            log(f"cannot resume from {path.name}: {exc}; falling back to the previous checkpoint")
            continue
        if health(path) == HEALTH_SUSPECT:
            log(f"skipping {path.name}: the step after it diverged or spiked "
                f"({read_trainer_state(path).get('health_reason', 'suspect')})")
            continue
        return path
    return None


# ---------------------------------------------------------------------------------------------------------------------
# RNG states


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step could draw from, as JSON-able values."""
    version, mt_state, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {"kind": np_kind, "keys": np_keys.tolist(), "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "torch_cpu": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(torch.frombuffer(bytearray(_unb64(state["torch_cpu"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.frombuffer(bytearray(_unb64(s)), dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer state <-> safetensors + JSON


def _flatten_optimizer_state(optim_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a (full, FQN-keyed) optimizer state dict into tensors for safetensors and JSON-able metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entries in optim_state["state"].items():
        for field, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{field}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[field] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
              for group in optim_state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, rest = key.split("/", 1)
        name, field = rest.rsplit("/", 1)
        state.setdefault(name, {})[field] = value
    for name, entries in meta["scalars"].items():
        state.setdefault(name, {}).update(entries)
    # JSON turned tuples into lists; AdamW's betas are a tuple when built from the config, keep it identical.
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings); give every repeated tensor its own copy.

    Loading assigns the same values to both names, so the tie in the model is unaffected.
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, experts=None) -> tuple[dict, dict]:
    """Full, unsharded CPU copies of the model and optimizer state, keyed by parameter names of the bare model.

    A collective under FSDP2: every rank must call it; only rank 0 receives the tensors (cpu_offload keeps the
    gathered copies off other ranks). Wrapper prefixes (DDP's `module.`, activation checkpointing, torch.compile) are
    stripped, so names match the unwrapped model whatever the training setup. With expert parallelism (`experts`, an
    expert_parallel.ExpertParallel) the expert shards are gathered into full tensors too.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if experts is not None:
        from upcycle.expert_parallel import gather_full_experts

        gather_full_experts(experts, optimizer, model_state, optim_state)
    return model_state, optim_state


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_config: dict,
    trainer_state: dict,
    train_config: dict,
    keep: int,
    world: World,
    experts=None,
) -> Path:
    """Write checkpoint `step` atomically under `root`, then delete all but the newest `keep`. Every rank calls this."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    model_state, optim_state = full_state_dicts(model, optimizer, experts)
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale)  # left by a run killed while saving; never a valid checkpoint
        tmp.mkdir()
    barrier(world)

    rng_file = tmp / f"rng_rank{world.rank}.json"
    _write_json(rng_file, capture_rng_state())
    fsync_path(rng_file)
    barrier(world)

    if world.is_main:
        try:
            _write_files(tmp, step, model_state=model_state, optim_state=optim_state, model_config=model_config,
                         trainer_state=trainer_state, train_config=train_config, world=world)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: free what was written, publish nothing
            raise
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(root)
        protected = last_good_checkpoint(root)  # while newer ones are unverified or suspect, the last healthy one
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            if old != protected:
                shutil.rmtree(old)
    barrier(world)
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as the OSError they are, naming the file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:  # safetensors raises its own SafetensorError, with the OS error only in the text
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _write_files(tmp: Path, step: int, *, model_state: dict, optim_state: dict, model_config: dict,
                 trainer_state: dict, train_config: dict, world: World) -> None:
    """Every file of checkpoint `step` into `tmp`, each fsynced, then the directory."""
    try:
        _save_tensors(_untie(model_state), tmp / MODEL_WEIGHTS, metadata={"format": "pt"})
        _write_json(tmp / MODEL_CONFIG, model_config_record(model_config, step=step))
        optim_tensors, optim_meta = _flatten_optimizer_state(optim_state)
        _save_tensors(optim_tensors, tmp / OPTIMIZER_TENSORS)
        _write_json(tmp / OPTIMIZER_META, optim_meta)
        _write_json(tmp / TRAINER_STATE, {"health": HEALTH_UNVERIFIED, **trainer_state, "step": step,
                                          "world_size": world.world_size})
        (tmp / TRAIN_CONFIG).write_text(yaml.safe_dump(train_config, sort_keys=False))
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the checkpoint being written
            raise OSError(exc.errno, exc.strerror, str(tmp)) from None
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
                    experts=None) -> dict:
    """Load weights, optimizer state and this rank's RNG states from checkpoint `path`; return the trainer state.

    Every rank reads the full tensors and keeps its own shard (set_*_state_dict with full_state_dict=True), so the
    number of ranks may differ from the run that wrote the checkpoint; with expert parallelism (`experts`) each rank
    also keeps only its own experts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    verify_checkpoint(path)
    options = StateDictOptions(full_state_dict=True)
    model_state = load_file(str(path / MODEL_WEIGHTS))
    optim_state = _unflatten_optimizer_state(load_file(str(path / OPTIMIZER_TENSORS)),
                                             json.loads((path / OPTIMIZER_META).read_text()))
    if experts is not None:
        from upcycle.expert_parallel import keep_local_experts

        keep_local_experts(experts, model_state, optim_state)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)

    trainer_state = read_trainer_state(path)
    # Same world size: each rank continues its own RNG streams. Different world size: the streams cannot all carry
    # over; rank r takes saved rank r mod W_saved so every rank still gets a saved, deterministic state.
    saved_world = int(trainer_state.get("world_size", 1))
    rng_file = path / f"rng_rank{world.rank % saved_world}.json"
    if rng_file.is_file():
        restore_rng_state(json.loads(rng_file.read_text()))
    return trainer_state
