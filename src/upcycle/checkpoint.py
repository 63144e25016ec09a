"""Atomic training checkpoints: everything needed to continue a run bit for bit, in formats that cannot run code.

Layout of one checkpoint (`OUT/checkpoints/step_00001000/`):

    model.safetensors      full (unsharded) model weights under our parameter names
    config.json            {"format": "upcycle", "model": ModelConfig fields, "step": N}: with model.safetensors this is
                           our model format, so `upcycle export` / `hf_model.load_model` read a checkpoint directly
    optimizer.safetensors  every optimizer state tensor, keyed "state/{param name}/{field}" (AdamW: step, exp_avg, ...)
    optimizer.json         the optimizer's param groups (hyper-parameters, parameter names) and non-tensor state
    trainer_state.json     step, tokens seen, data loader position, anything else the trainer needs (JSON)
    rng_rank{R}.json       RNG states of rank R: python, numpy, torch CPU, CUDA (byte states in base64)
    train_config.yaml      the resolved training config of the run

Atomicity: everything is written into `.tmp-step_XXXXXXXX`, every file and the directory are fsynced, then the
directory is renamed to `step_XXXXXXXX` (a rename within one file system is atomic) and the parent fsynced. A run killed
at any moment leaves either the complete new checkpoint or none, never a partial one that looks valid; leftover
`.tmp-*` directories are removed by the next save.

Distributed (FSDP2 / DDP): the weights and optimizer state are gathered to full, unsharded CPU tensors with
torch.distributed.checkpoint.state_dict (`full_state_dict=True, cpu_offload=True`) and written by rank 0, so a
checkpoint is independent of the number of ranks: written by 2 ranks, it resumes on 1, and the other way round.
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
from upcycle.files import fsync_dir

CHECKPOINT_DIR = "checkpoints"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
TRAIN_CONFIG = "train_config.yaml"
MODEL_FORMAT = "upcycle"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


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


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full, unsharded CPU copies of the model and optimizer state, keyed by parameter names of the bare model.

    A collective under FSDP2: every rank must call it; only rank 0 receives the tensors (cpu_offload keeps the
    gathered copies off other ranks). Wrapper prefixes (DDP's `module.`, activation checkpointing, torch.compile) are
    stripped, so names match the unwrapped model whatever the training setup.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
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
) -> Path:
    """Write checkpoint `step` atomically under `root`, then delete all but the newest `keep`. Every rank calls this."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    model_state, optim_state = full_state_dicts(model, optimizer)
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale)  # left by a run killed while saving; never a valid checkpoint
        tmp.mkdir()
    barrier(world)

    rng_file = tmp / f"rng_rank{world.rank}.json"
    _write_json(rng_file, capture_rng_state())
    _fsync_file(rng_file)
    barrier(world)

    if world.is_main:
        save_file(_untie(model_state), str(tmp / MODEL_WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / MODEL_CONFIG, {"format": MODEL_FORMAT, "model": model_config, "step": step})
        optim_tensors, optim_meta = _flatten_optimizer_state(optim_state)
        save_file(optim_tensors, str(tmp / OPTIMIZER_TENSORS))
        _write_json(tmp / OPTIMIZER_META, optim_meta)
        _write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step, "world_size": world.world_size})
        (tmp / TRAIN_CONFIG).write_text(yaml.safe_dump(train_config, sort_keys=False))
        for path in tmp.iterdir():
            _fsync_file(path)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier(world)
    return final


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """Load weights, optimizer state and this rank's RNG states from checkpoint `path`; return the trainer state.

    Every rank reads the full tensors and keeps its own shard (set_*_state_dict with full_state_dict=True), so the
    number of ranks may differ from the run that wrote the checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    for name in (MODEL_WEIGHTS, OPTIMIZER_TENSORS, OPTIMIZER_META, TRAINER_STATE):
        if not (path / name).is_file():
            raise UpcycleError(f"checkpoint {path} has no {name}; it is incomplete or not a training checkpoint")
    options = StateDictOptions(full_state_dict=True)
    model_state = load_file(str(path / MODEL_WEIGHTS))
    set_model_state_dict(model, model_state, options=options)
    optim_state = _unflatten_optimizer_state(load_file(str(path / OPTIMIZER_TENSORS)),
                                             json.loads((path / OPTIMIZER_META).read_text()))
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)

    trainer_state = read_trainer_state(path)
    # Same world size: each rank continues its own RNG streams. Different world size: the streams cannot all carry
    # over; rank r takes saved rank r mod W_saved so every rank still gets a saved, deterministic state.
    saved_world = int(trainer_state.get("world_size", 1))
    rng_file = path / f"rng_rank{world.rank % saved_world}.json"
    if rng_file.is_file():
        restore_rng_state(json.loads(rng_file.read_text()))
    return trainer_state
