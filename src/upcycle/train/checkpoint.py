"""Writing training checkpoints, resuming from them and loading them into a live (sharded) model: everything needed
to continue a run bit for bit, without pickle. The format itself (the layout of a checkpoint directory, its names,
verification, health, and reading the model weights in one process) is checkpoint_format.py's; its names are
imported here too, so `checkpoint.X` serves the trainer whichever of the two defines X.

No gather: every rank writes only its own pieces (FSDP2 shards are DTensors; expert-parallel experts are presented as
DTensors over the expert mesh by expert_parallel), so saving costs each rank its share of the state, not the model.
Reading at another world size or expert-parallel degree works because every piece is stored with its offsets in the
full tensor: each rank reads the parts of the files that overlap what it now holds (4 -> 2, 1 -> 4, EP 2 -> 1, ...).

Atomicity: everything is written into `.tmp-step_XXXXXXXX` (each rank its state file, fsynced), then rank 0 writes
the JSON files, fsyncs them and the directory, and renames it to `step_XXXXXXXX` (a rename within one file system is
atomic), then fsyncs the parent. A run killed at any moment leaves either the complete new checkpoint or none, never a
partial one that looks valid; leftover `.tmp-*` directories are removed by the next save. With `checkpoint.async`
the state files are written by a background thread (on a copy of the state, over a process group of its own) while
training goes on; rank 0 publishes the checkpoint once every rank's file and checksum are on disk, at the latest
before the next save or when training ends.

Health: the weights of checkpoint s are only tested by step s + 1 (its loss and gradient norm). The trainer then marks
the checkpoint good, or suspect when that step was non-finite or a spike (`mark_health`, an atomic rewrite of its
trainer_state.json). `keep` never deletes the newest good checkpoint, so while newer ones are unverified or suspect the
last one known to be healthy survives; `last_good_checkpoint` names it, and resuming skips suspect checkpoints.
Resuming also checks every state file against checksums.json (the ranks share the reading), so weights or optimizer
state swapped in from another run, or damaged on disk, are named and skipped like any damaged checkpoint.

The one-file format of earlier versions (model.safetensors + optimizer.safetensors, written whole by rank 0) is still
read: it resumes (each rank reads only the rows it keeps) and exports. Each rank writes its own RNG file; all ranks
must see the same file system (one node, or a shared disk).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import random
import shutil
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.tensor import DTensor
from torch.futures import Future

from upcycle.train import expert_parallel
from upcycle.formats.training_checkpoint import (  # noqa: F401 (the format's names, for `checkpoint.X` callers)
    CHECKPOINT_DIR,
    CHECKSUMS,
    HEALTH_GOOD,
    HEALTH_SUSPECT,
    HEALTH_UNVERIFIED,
    MODEL_CONFIG,
    MODEL_FORMAT,
    MODEL_PREFIX,
    ONE_FILE_OPTIMIZER,
    ONE_FILE_WEIGHTS,
    OPTIM_PREFIX,
    OPTIMIZER_META,
    SHARDED,
    STATE_DIR,
    TRAIN_CONFIG,
    TRAINER_STATE,
    CheckpointTensors,
    checkpoint_format,
    checksum_error,
    checksums_mismatched,
    health,
    last_good_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    model_config_of,
    model_config_record,
    one_file_sources,
    read_trainer_state,
    rng_states,
    sharded_keys,
    step_dir_name,
    verify_checkpoint,
)
from upcycle.train.distributed import World, barrier, unwrap
from upcycle.errors import UpcycleError
from upcycle.files import atomic_write_json, fsync_path, wait_for_file
from upcycle.formats.safetensors_io import TensorInfo, save_tensors, tensor_infos
from upcycle.train.shards import global_views, piece_of
from upcycle.formats.tensor_sources import Piece, fill_from_sources

# ---------------------------------------------------------------------------------------------------------------------
# Health


def mark_health(path: str | os.PathLike, value: str, reason: str | None = None) -> None:
    """Record whether the step after checkpoint `path` was healthy: rewrite its trainer_state.json atomically."""
    path = Path(path)
    state = read_trainer_state(path)
    state["health"] = value
    if reason:
        state["health_reason"] = reason
    atomic_write_json(path / TRAINER_STATE, state, indent=1)


# ---------------------------------------------------------------------------------------------------------------------
# Verifying


def verify_checksums(path: str | os.PathLike, world: World) -> None:
    """Check every state file of a sharded checkpoint against checksums.json, the ranks sharing the reading (a
    collective when distributed); raise UpcycleError naming the first file that differs (the message of every other
    reader: training_checkpoint.checksum_error)."""
    path = Path(path)
    if checkpoint_format(path) != SHARDED:
        return  # the one-file format recorded none
    names = sorted(json.loads((path / CHECKSUMS).read_text()))
    bad = checksums_mismatched(path, names[world.rank::world.world_size])
    flags = torch.zeros(len(names), dtype=torch.float64)  # on the CPU, reduced over the host group (gloo)
    for name in bad:
        flags[names.index(name)] = 1.0
    if world.distributed:
        dist.all_reduce(flags, group=world.host_group)
    if flags.any():
        raise checksum_error(path, names[int(flags.nonzero()[0])])


def resumable_checkpoint(root: str | os.PathLike, world: World, log=print) -> Path | None:
    """The newest checkpoint to resume from: complete, readable and matching its checksums (a damaged one is named
    through `log` and the previous one is taken) and not suspect (its next step diverged or spiked: resuming there
    would diverge again). Every rank must call it (the checksums are verified together); all get the same answer."""
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
        try:
            verify_checksums(path, world)
        except UpcycleError as exc:
            log(f"cannot resume from {path.name}: {exc}; falling back to the previous checkpoint")
            continue
        return path
    return None


# ---------------------------------------------------------------------------------------------------------------------
# RNG states


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's GPU only: every other visible GPU belongs to another rank (or to nobody)
        state["cuda_device"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every RNG from an rng_rank*.json record (read and checked by training_checkpoint.rng_states)."""
    states = rng_states(state)
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    if "cuda_device" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda_device"])
    elif "cuda" in states and torch.cuda.is_available():  # written by upcycle <= 0.1: every visible GPU's state
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# The state: model weights and optimizer state as full-shaped tensors (plain or DTensor), by checkpoint key


def _param_names(model: nn.Module) -> dict[int, str]:
    """Parameter id -> checkpoint name (no wrapper prefixes: activation checkpointing, torch.compile, DDP)."""
    return {id(p): expert_parallel.clean_name(name) for name, p in unwrap(model).named_parameters()}


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors, zero, as its first step would, so that a checkpoint can be loaded into
    them. Adam and AdamW: created directly, as torch's Adam creates them at its first step (step, exp_avg, exp_avg_sq,
    max_exp_avg_sq with amsgrad; step on the parameter's device when fused or capturable), since running a step over
    every parameter costs seconds at a few hundred million parameters. Any other optimizer: one step on zero
    gradients at learning rate 0, which changes no parameter."""
    if optimizer.state:
        return
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                on_device = group["fused"] or group["capturable"]
                state = optimizer.state[p]
                state["step"] = (torch.zeros((), dtype=torch.float32 if group["fused"] else scalar, device=p.device)
                                 if on_device else torch.tensor(0.0, dtype=scalar))
                for name in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"] else ())):
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    optimizer.zero_grad(set_to_none=True)


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """What a checkpoint holds, by key: "model/{name}" for every parameter and "optim/{name}/{field}" for every
    optimizer state tensor, each shaped like the full tensor (a DTensor where this rank holds a piece of it; expert
    shards through expert_parallel's global view). They share storage with the live model and optimizer, so loading
    into them restores the run."""
    views = global_views(model)
    state = {MODEL_PREFIX + name: view for name, view in views.items()}
    if optimizer is None:
        return state
    names = _param_names(model)
    experts = expert_parallel.find(model)
    expert_params = experts.params if experts is not None else {}
    for param, entries in optimizer.state.items():
        name = names[id(param)]
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise UpcycleError(f"optimizer state {name}/{key} is not a tensor; checkpoints hold tensors only")
            per_param = value.shape == param.shape
            state[f"{OPTIM_PREFIX}{name}/{key}"] = (experts.global_view(value) if name in expert_params and per_param
                                                   else value)
    return state


def optimizer_meta(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's hyper-parameters as one param group with parameter names (the trainer's groups differ only in
    which parameters they hold: expert parallelism puts the expert shards in a group of their own)."""
    names = _param_names(model)
    settings = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"}
                for group in optimizer.param_groups]
    if any(s != settings[0] for s in settings[1:]):
        raise UpcycleError("the optimizer's param groups have different settings; a checkpoint holds one group")
    order = {name: i for i, name in enumerate(names.values())}
    params = sorted((names[id(p)] for group in optimizer.param_groups for p in group["params"]), key=order.get)
    return {"param_groups": [{**settings[0], "params": params}]}


def _restore_hyperparameters(optimizer: torch.optim.Optimizer, meta: dict) -> None:
    (saved,) = meta["param_groups"]
    for group in optimizer.param_groups:
        for key, value in saved.items():
            if key != "params":
                group[key] = tuple(value) if key == "betas" else value


def _staged_copy(tensor: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """A CPU copy of a state tensor, for a background write while the live tensor keeps training: into `buffer` when
    given (a reused, pinned host buffer: the copy from a GPU is then asynchronous; the caller synchronizes), else into
    a new CPU tensor. A DTensor stays a DTensor of the same mesh and placements whose local values are on the CPU, as
    torch.distributed.checkpoint's own staging keeps them (DTensor.from_local would move them back to the mesh's
    device: a second GPU copy of the whole state)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if buffer is None:
        copy = local.detach().to("cpu", copy=True)
    else:
        copy = buffer.copy_(local.detach(), non_blocking=True)
    if isinstance(tensor, DTensor):
        return DTensor(copy, tensor._spec, requires_grad=False)
    return copy


def _staging_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked host buffer shaped like `tensor`'s local values, for asynchronous copies from the GPU."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return torch.empty(local.shape, dtype=local.dtype, pin_memory=True)


# ---------------------------------------------------------------------------------------------------------------------
# Saving


@dataclass
class _Pending:
    """A checkpoint being written: its temporary and final directories and what rank 0 writes when publishing."""

    tmp: Path
    final: Path
    files: dict[str, Any]  # file name -> JSON data (or text for the YAML) rank 0 writes at publish
    thread: threading.Thread | None = None
    error: BaseException | None = None  # this rank's failure, or another rank's as an UpcycleError naming it
    sums: dict[str, str] | None = None  # every rank's state file -> sha256, once all ranks have written theirs
    health: tuple[str, str | None] | None = None  # set by mark_health before it is published
    published: bool = False

    @property
    def done(self) -> bool:
        """Every rank has written its part (or some rank failed): nothing more will happen in the background."""
        return (self.sums is not None or self.error is not None) and (self.thread is None or
                                                                       not self.thread.is_alive())


@dataclass
class Checkpointer:
    """Writes the checkpoints of one run under `root`, keeping the newest `keep` (and the last good one).

    Every collective of a save runs on a gloo group (the world's host group, or with `asynchronous` a group of the
    background writer's own), on CPU tensors and Python objects, with the host group's long timeout: a large save is
    not a lost rank. After each rank has written its state file, one all-gather tells every rank every file's sha256
    and every rank's failure: rank 0 publishes from it (no polling for files that a network file system's cache may
    hide), and a failure on any rank fails the save on all of them together (`failed`, then `finish` raises)."""

    root: Path
    world: World
    keep: int
    asynchronous: bool = False
    _pending: _Pending | None = None
    _group: Any = field(default=None, repr=False)
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # pinned staging buffers (CUDA)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._group = self.world.host_group
        if self.asynchronous and self.world.distributed:
            # the background writer's collectives run on a group of their own, never interleaved with the main
            # thread's host collectives; it shares the host group's timeout
            timeout = self.world.host_timeout_s
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout) if timeout
                                         else None)

    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer, model_config: dict,
             trainer_state: dict, train_config: dict) -> Path:
        """Checkpoint `step` (every rank calls this). Returns its final path; with `asynchronous` the state files are
        still being written then, and the checkpoint appears there once they are (`poll`, `finish`)."""
        self.finish()  # at most one checkpoint in flight
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale)  # left by a run killed while saving; never a valid checkpoint
            (tmp / STATE_DIR).mkdir(parents=True)
        barrier(self.world)
        state = state_tensors(model, optimizer)
        files = {
            MODEL_CONFIG: model_config_record(model_config, step=step),
            OPTIMIZER_META: optimizer_meta(model, optimizer),
            TRAINER_STATE: {"health": HEALTH_UNVERIFIED, **trainer_state, "step": step,
                            "world_size": self.world.world_size},
            TRAIN_CONFIG: yaml.safe_dump(train_config, sort_keys=False),
        }
        try:
            rng_file = tmp / f"rng_rank{self.world.rank}.json"
            atomic_write_json(rng_file, capture_rng_state(), indent=1)
        except OSError as exc:
            raise _naming(exc, tmp) from None
        pending = self._pending = _Pending(tmp, final, files)
        if self.asynchronous:
            staged = self._stage(state)
            pending.thread = threading.Thread(target=self._write_state, args=(pending, staged), daemon=True,
                                              name=f"upcycle-checkpoint-{step}")
            pending.thread.start()
        else:
            self._write_state(pending, state)
            self.finish()
        return final

    def _stage(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A CPU copy of the state for the background writer. From a GPU: into page-locked buffers kept for the next
        save (allocating pinned memory is slow; `upcycle plan` counts them as held for the rest of the run), copied
        asynchronously, then one synchronization. On a CPU: plain copies, freed once written."""
        on_gpu = any((v.to_local() if isinstance(v, DTensor) else v).device.type == "cuda" for v in state.values())
        if not on_gpu:
            return {key: _staged_copy(value) for key, value in state.items()}
        staged = {}
        for key, value in state.items():
            local = value.to_local() if isinstance(value, DTensor) else value
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
                buffer = self._buffers[key] = _staging_buffer(value)
            staged[key] = _staged_copy(value, buffer)
        torch.cuda.synchronize()  # the copies are complete before training changes the live tensors
        return staged

    def _write_state(self, pending: _Pending, state: dict[str, torch.Tensor]) -> None:
        """This rank's state file, then one all-gather of every rank's (file, sha256) or failure. Sets pending.sums,
        or pending.error where any rank failed; never raises (the main thread raises: `finish`)."""
        import torch.distributed.checkpoint as dcp

        sums: dict[str, str] = {}
        error: BaseException | None = None
        try:
            directory = pending.tmp / STATE_DIR
            writer = _StreamingWriter(str(directory), save_distributed=True)
            with _quiet_single_process():
                dcp.save(state, storage_writer=writer, process_group=self._group, no_dist=not self.world.distributed)
            sums = dict([writer.written]) if writer.written else {}  # a rank whose pieces were all deduplicated: none
        except BaseException as exc:  # noqa: BLE001 (raised again in the main thread)
            error = exc
        report = (sums, None if error is None else _describe(error))
        try:
            reports = self._all_gather(report)
        except BaseException as exc:  # noqa: BLE001 (a lost rank: the collective timed out)
            pending.error = error or exc
            return
        failures = [(rank, text) for rank, (_, text) in enumerate(reports) if text is not None]
        if error is not None:
            pending.error = error
        elif failures:
            rank, text = failures[0]
            pending.error = UpcycleError(f"checkpoint {pending.final.name}: rank {rank} failed to write its state "
                                         f"({text}); it was not published")
        else:
            pending.sums = {name: digest for rank_sums, _ in reports for name, digest in rank_sums.items()}

    def _all_gather(self, value) -> list:
        if not self.world.distributed:
            return [value]
        gathered = [None] * self.world.world_size
        dist.all_gather_object(gathered, value, group=self._group)
        return gathered

    def mark_health(self, path: Path, value: str, reason: str | None = None) -> None:
        """As the module-level mark_health, for a checkpoint that may still be in flight (rank 0)."""
        pending = self._pending
        if pending is not None and pending.final == path and not pending.published:
            pending.health = (value, reason)
        else:
            mark_health(path, value, reason)

    def failed(self) -> bool:
        """Whether the checkpoint in flight failed on some rank (every rank learns it from the same all-gather, so
        the trainer reduces this flag with its step and all ranks call `finish`, which raises, at the same step)."""
        pending = self._pending
        return pending is not None and pending.done and pending.error is not None

    def poll(self) -> None:
        """Between steps, on rank 0: publish the checkpoint in flight once every rank has written its part. A failure
        is raised by `finish` (on every rank at once), not here."""
        pending = self._pending
        if pending is not None and self.world.is_main and not pending.published and pending.done \
                and pending.error is None:
            self._publish(pending)

    def finish(self) -> None:
        """Wait for the checkpoint in flight and publish it; raise its failure on every rank. Every rank calls this
        (it ends with a barrier), at the start of every save and when training ends."""
        pending = self._pending
        if pending is not None:
            if pending.thread is not None:
                pending.thread.join()
            self._raise_failed(pending)
            if self.world.is_main and not pending.published:
                self._publish(pending)
            self._pending = None
        barrier(self.world)

    def _raise_failed(self, pending: _Pending) -> None:
        if pending.error is not None:
            error = _unwrapped(pending.error)
            self._pending = None
            if self.world.is_main:
                shutil.rmtree(pending.tmp, ignore_errors=True)  # e.g. a full disk: free what was written
            if isinstance(error, OSError):
                raise _naming(error, pending.tmp) from None
            raise error

    def _publish(self, pending: _Pending) -> None:
        """Rank 0: the small files, the merged checksums, fsync, rename into place, prune old checkpoints."""
        tmp = pending.tmp
        sums = dict(pending.sums or {})
        try:
            missing = [name for name in sorted(sums) if not wait_for_file(tmp / STATE_DIR / name)]
            if missing:
                raise UpcycleError(f"checkpoint {pending.final.name}: the ranks reported {missing} written, but "
                                   f"{tmp / STATE_DIR} does not show them; it was not published (do all ranks see "
                                   "the same file system?)")
            files = dict(pending.files)
            if pending.health is not None:
                value, reason = pending.health
                files[TRAINER_STATE] = {**files[TRAINER_STATE], "health": value,
                                        **({"health_reason": reason} if reason else {})}
            files[CHECKSUMS] = sums
            for name, data in files.items():
                if isinstance(data, str):
                    (tmp / name).write_text(data)
                else:
                    atomic_write_json(tmp / name, data, indent=1)
            for path in tmp.iterdir():
                if path.is_file():
                    fsync_path(path)
            fsync_path(tmp / STATE_DIR)
            fsync_path(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _naming(exc, tmp) from None
        final = pending.final
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(self.root)
        pending.published = True
        protected = last_good_checkpoint(self.root)  # while newer ones are unverified or suspect, the last healthy one
        for _, old in list_checkpoints(self.root)[:-self.keep] if self.keep > 0 else []:
            if old != protected:
                shutil.rmtree(old)


def _describe(error: BaseException) -> str:
    """One line for another rank's message: the exception's type and first line."""
    error = _unwrapped(error)
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _unwrapped(error: BaseException) -> BaseException:
    """The first rank's own exception inside torch.distributed.checkpoint's CheckpointException (e.g. the OSError of a
    full disk), so it is reported as itself, in one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        first = error.failures[min(error.failures)]
        return first[0] if isinstance(first, tuple) else first
    return error


def _infos(path: str | Path) -> dict[str, TensorInfo]:
    return tensor_infos(Path(path))[0]


class _StreamingWriter(HuggingFaceStorageWriter):
    written: tuple[str, str] | None = None  # (file name, sha256) of the file this rank wrote
    """torch.distributed.checkpoint's HuggingFaceStorageWriter (one safetensors file per rank, each piece's offsets in
    the header's DCP_SHARDING_INFO), writing the file one tensor at a time. The stock writer first builds the whole file
    in memory (safetensors.torch.save), which held the rank's whole share twice more at every save (one process of the
    benchmark's 250M-parameter MoE: 9.6 GB at save against 4.9 GB while training)."""

    def write_data(self, plan, planner) -> Future:
        from torch.distributed.checkpoint._hf_utils import (
            CUSTOM_METADATA_KEY,
            DCP_VERSION_KEY,
            FORMAT_KEY,
            FORMAT_VALUE,
            HF_DCP_VERSION,
            _gen_file_name,
        )
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.storage import WriteResult

        done: Future = Future()
        if not plan.items:
            done.set_result([])
            return done
        name = _gen_file_name(1, 1, plan.storage_data["shard_index"])
        tensors, offsets = {}, {}
        for item in plan.items:
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):
                raise UpcycleError(f"checkpoint entry {item.index.fqn} is not a tensor; checkpoints hold tensors only")
            tensors[item.index.fqn] = data.detach()
            offsets[item.index.fqn] = {"saved_offsets": list(item.tensor_data.chunk.offsets)}
        metadata = {CUSTOM_METADATA_KEY: json.dumps(offsets), DCP_VERSION_KEY: str(HF_DCP_VERSION),
                    FORMAT_KEY: FORMAT_VALUE}
        path = Path(self.path) / name
        self.written = (name, save_tensors(path, tensors, metadata))  # one tensor at a time; fsynced; its sha256
        infos = _infos(path)
        done.set_result([WriteResult(index=item.index, size_in_bytes=infos[item.index.fqn].end -
                                     infos[item.index.fqn].start,
                                     storage_data=_StorageInfo(name, infos[item.index.fqn].start,
                                                               infos[item.index.fqn].end - infos[item.index.fqn].start))
                         for item in plan.items])
        return done


class _PositionedReader(HuggingFaceStorageReader):
    """torch.distributed.checkpoint's HuggingFaceStorageReader, reading each requested piece with a positioned read of
    the rows it spans instead of through a memory map, whose pages would stay in the process's resident memory."""

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for file, items in per_file.items():
            infos = _infos(file)
            for item in items:
                info = infos[item.storage_index.fqn]
                first, *rest = [slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths)] or [None]
                piece = info.read(first, name=item.storage_index.fqn)
                if rest:
                    piece = piece[(slice(None), *rest)]
                target = planner.resolve_tensor(item).detach()
                target.copy_(piece)
                planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every call in one process that it assumes one process: that is the intent
    here (a world of one), not news for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _naming(exc: OSError, path: Path) -> OSError:
    """The OSError with a file name: a failed write() names none, so name the checkpoint being written."""
    if exc.filename is None:
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _load_state(path: Path, state: dict[str, torch.Tensor], world: World, *, partial: bool) -> None:
    """Read the checkpoint's values into `state` (keys as `state_tensors`), each rank only the boxes its tensors hold.
    `partial`: only these keys are wanted (the checkpoint may hold more, e.g. the optimizer's)."""
    if checkpoint_format(path) == SHARDED:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        stored = sharded_keys(path)
        missing = sorted(set(state) - stored)
        if missing or (not partial and stored - set(state)):
            extra = sorted(stored - set(state))
            raise UpcycleError(f"checkpoint {path} does not match this model and optimizer: it lacks "
                               f"{missing[:3]} and holds {extra[:3]} besides; resume with the same model and init")
        with _quiet_single_process():
            dcp.load(state, storage_reader=_PositionedReader(str(path / STATE_DIR)),
                     planner=DefaultLoadPlanner(allow_partial_load=partial), no_dist=not world.distributed)
        return
    sources = one_file_sources(path)
    pieces: dict[str, Piece] = {key: piece_of(tensor) for key, tensor in state.items()}
    if partial:
        sources = {key: source for key, source in sources.items() if key in pieces}
    try:
        fill_from_sources(pieces, sources)
    except ValueError as exc:
        raise UpcycleError(f"checkpoint {path} does not match this model and optimizer ({exc}); resume with the same "
                           "model and init") from None


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    world: World) -> dict:
    """Load weights, optimizer state and this rank's RNG states from checkpoint `path` (either format); return the
    trainer state. Each rank reads only the pieces it holds, so the number of ranks and the expert-parallel degree may
    differ from the run that wrote the checkpoint."""
    path = Path(path)
    verify_checkpoint(path)
    init_optimizer_state(optimizer)
    _load_state(path, state_tensors(model, optimizer), world, partial=False)
    _restore_hyperparameters(optimizer, json.loads((path / OPTIMIZER_META).read_text()))
    trainer_state = read_trainer_state(path)
    # Same world size: each rank continues its own RNG streams. Different world size: the streams cannot all carry
    # over; rank r takes saved rank r mod W_saved so every rank still gets a saved, deterministic state.
    saved_world = int(trainer_state.get("world_size", 1))
    restore_rng_state(json.loads((path / f"rng_rank{world.rank % saved_world}.json").read_text()))  # verified there
    return trainer_state


def load_model_weights(path: str | os.PathLike, model: nn.Module, world: World, absent=()) -> None:
    """Only the model weights of a training checkpoint (either format) into `model`'s pieces (init.source pointing at
    one of our checkpoints), after checking it as resume does (every rank calls this: the checksums are verified
    together); `absent`: names of the model's that the checkpoint does not hold (a balancing bias the run adds), left
    as they are."""
    path = Path(path)
    verify_checkpoint(path)
    verify_checksums(path, world)
    state = {key: value for key, value in state_tensors(model, None).items()
             if key.removeprefix(MODEL_PREFIX) not in absent}
    _load_state(path, state, world, partial=True)
