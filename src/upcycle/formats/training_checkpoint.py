"""The on-disk format of our training checkpoints, and reading it without the trainer: names, listing, health,
verification, and the model weights as a TensorSource (export, eval, analyze, convert's consumers). Writing, resuming
and loading into a live (sharded) model are checkpoint.py's, which builds on this; nothing here imports
torch.distributed: the sharded files' headers are read directly.

Layout of one checkpoint (`OUT/checkpoints/step_00001000/`):

    state/                 torch.distributed.checkpoint in safetensors files (HuggingFaceStorageWriter), one per rank
                           that holds something: `shard-0000R-model-00001-of-00001.safetensors` holds rank R-1's
                           pieces of the model weights ("model/{name}") and the AdamW state ("optim/{name}/{field}");
                           each file's header records where every piece sits in the full tensor
    config.json            {"format": "upcycle", "model": ModelConfig fields, "step": N}:
                           `upcycle export` / `eval` / `analyze` / `hf_model.load_model` read a checkpoint directly
    optimizer.json         the optimizer's hyper-parameters (one param group) and parameter names
    trainer_state.json     step, tokens seen, data loader position, anything else the trainer needs (JSON), and
                           "health": unverified when written; good or suspect once the step after it ran
    rng_rank{R}.json       RNG states of rank R: python, numpy, torch CPU, CUDA (byte states in base64)
    train_config.yaml      the resolved training config of the run
    checksums.json         sha256 of every file under state/, each computed by the rank that wrote it

Every reader checks what it reads: `verify_checkpoint` (every file there, every JSON file parsed and holding values of
the right kinds, the safetensors headers against their sizes) and `verify_checksums` (every state file against
checksums.json) run before any tensor is read, by resume (the ranks sharing the hashing) and by `CheckpointTensors`
(export, eval, analyze, check, grow, the experiment), with the same one-line messages.

Health: the weights of checkpoint s are only tested by step s + 1 (its loss and gradient norm). The trainer then marks
the checkpoint good, or suspect when that step was non-finite or a spike; `last_good_checkpoint` names the newest good
one. Checkpoints written before health existed are good.

The one-file format of earlier versions (model.safetensors + optimizer.safetensors, written whole by rank 0) is still
read: `one_file_sources` gives its tensors under this version's keys.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from upcycle.errors import UpcycleError
from upcycle.files import sha256_file
from upcycle.formats.safetensors_io import CODE_DTYPES, CheckpointReader, TensorInfo, read_header, tensor_infos
from upcycle.formats.tensor_sources import NamedTensors, Rows, Source

CHECKPOINT_DIR = "checkpoints"
STATE_DIR = "state"
MODEL_CONFIG = "config.json"
OPTIMIZER_META = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
TRAIN_CONFIG = "train_config.yaml"
CHECKSUMS = "checksums.json"
MODEL_FORMAT = "upcycle"
SHARDED = "sharded"
# The one-file format of upcycle <= 0.1: full tensors written by rank 0.
ONE_FILE_WEIGHTS = "model.safetensors"
ONE_FILE_OPTIMIZER = "optimizer.safetensors"
MODEL_PREFIX, OPTIM_PREFIX = "model/", "optim/"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# Where torch.distributed.checkpoint's HuggingFaceStorageWriter records each piece's offsets in the full tensor: a
# JSON object {key: {"saved_offsets": [...]}} under this key of a state file's safetensors metadata (the names of
# torch.distributed.checkpoint._hf_utils; tests/integration/test_resume.py checks they still match).
SHARDING_INFO_KEY, SAVED_OFFSETS_KEY = "DCP_SHARDING_INFO", "saved_offsets"


def model_config_record(model_config: dict, **extra) -> dict:
    """config.json of our model format: {"format": "upcycle", "model": ModelConfig fields, ...}; every writer of the
    format (training checkpoints, hf_model.save_model) writes it through this."""
    return {"format": MODEL_FORMAT, "model": model_config, **extra}


def model_config_of(path: str | os.PathLike) -> dict:
    """The ModelConfig fields a training checkpoint (or our saved model) records in its config.json."""
    return json.loads((Path(path) / MODEL_CONFIG).read_text())["model"]


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Published checkpoints under `root`, oldest first, as (step, path); temp directories are not checkpoints. A
    checkpoint is published whole (one rename), so a step directory that lacks a file was damaged afterwards: it is
    listed, and `verify_checkpoint` names what it lacks (resume then falls back to the previous one, saying so)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def checkpoint_format(path: str | os.PathLike) -> str:
    """"sharded" (this version) or "one-file" (upcycle <= 0.1); anything else is refused with one line."""
    path = Path(path)
    if (path / STATE_DIR).is_dir():
        return SHARDED
    if (path / ONE_FILE_WEIGHTS).is_file():
        return "one-file"
    raise UpcycleError(f"{path} is not a training checkpoint of a known format (no {STATE_DIR}/ directory and no "
                       f"{ONE_FILE_WEIGHTS}); pass a step_XXXXXXXX directory written by `upcycle train`")


# ---------------------------------------------------------------------------------------------------------------------
# Health


HEALTH_UNVERIFIED, HEALTH_GOOD, HEALTH_SUSPECT = "unverified", "good", "suspect"


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def health(path: str | os.PathLike) -> str:
    """good, suspect or unverified (see the module docstring); checkpoints written before health existed are good."""
    try:
        return read_trainer_state(path).get("health", HEALTH_GOOD)
    except (OSError, ValueError):
        return HEALTH_SUSPECT  # unreadable: never the one to trust


def last_good_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose next step had a finite, spike-free loss and gradient norm."""
    good = [path for _, path in list_checkpoints(root) if health(path) == HEALTH_GOOD]
    return good[-1] if good else None


# ---------------------------------------------------------------------------------------------------------------------
# Verifying


def state_files(path: Path) -> list[Path]:
    """The safetensors files under a sharded checkpoint's state/ directory, sorted by name."""
    return sorted((path / STATE_DIR).glob("*.safetensors"))


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is one of our training checkpoints (either format), not a model saved alone (hf.save_model:
    model.safetensors + config.json only)."""
    path = Path(path)
    return (path / STATE_DIR).is_dir() or any((path / name).exists()
                                               for name in (TRAINER_STATE, OPTIMIZER_META, ONE_FILE_OPTIMIZER))


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise UpcycleError naming the file if checkpoint `path` is incomplete, truncated or unreadable (every JSON file
    parsed and holding values of the right kinds, one RNG file per rank that wrote it, the headers and sizes of its
    safetensors files), without reading any tensor. `verify_checksums` then checks the state files' contents."""
    path = Path(path)
    fmt = checkpoint_format(path)
    required = [MODEL_CONFIG, OPTIMIZER_META, TRAINER_STATE]
    required += [CHECKSUMS] if fmt == SHARDED else [ONE_FILE_WEIGHTS, ONE_FILE_OPTIMIZER]
    for name in required:
        if not (path / name).is_file():
            raise UpcycleError(f"checkpoint {path} has no {name}; it is incomplete or not a training checkpoint")
    files = [*(path / name for name in required if name.endswith(".json")), *sorted(path.glob("rng_rank*.json"))]
    parsed = {}
    for file in files:
        try:
            parsed[file.name] = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise UpcycleError(f"{file} is truncated or not JSON") from None
    state = _check_trainer_state(path, parsed[TRAINER_STATE])
    for rank in range(int(state.get("world_size", 1))):
        name = f"rng_rank{rank}.json"
        if name not in parsed:
            raise UpcycleError(f"checkpoint {path} has no {name} (written by {state.get('world_size', 1)} rank(s)); "
                               "it is incomplete")
    for name, value in parsed.items():
        if name.startswith("rng_rank"):
            try:
                rng_states(value)
            except Exception as exc:  # noqa: BLE001 (python, numpy and torch each raise their own kinds)
                raise UpcycleError(f"{path / name} holds no valid RNG state ({type(exc).__name__}: {exc}); the "
                                   "checkpoint is damaged") from None
    tensor_files = state_files(path) if fmt == SHARDED else [path / ONE_FILE_WEIGHTS, path / ONE_FILE_OPTIMIZER]
    if fmt == SHARDED:
        listed = parsed[CHECKSUMS]
        if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
            raise UpcycleError(f"{path / CHECKSUMS} does not map state files to sha256 digests; the checkpoint is "
                               "damaged")
        found = {file.name for file in tensor_files}
        if set(listed) != found:
            raise UpcycleError(f"checkpoint {path}: {STATE_DIR}/ holds {sorted(found)} but {CHECKSUMS} lists "
                               f"{sorted(listed)}; files were added or removed after it was written")
    for file in tensor_files:
        read_header(file)


def _check_trainer_state(path: Path, state: Any) -> dict:
    """trainer_state.json holds an object whose step is this directory's and whose world size is a count of ranks."""
    file = path / TRAINER_STATE
    if not isinstance(state, dict):
        raise UpcycleError(f"{file} holds {type(state).__name__}, not a JSON object; the checkpoint is damaged")
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise UpcycleError(f"{file}: step must be a count of steps, got {step!r}; the checkpoint is damaged")
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != step:
        raise UpcycleError(f"{file} records step {step} in {path.name}; it belongs to another checkpoint")
    world_size = state.get("world_size", 1)
    if type(world_size) is not int or world_size < 1:
        raise UpcycleError(f"{file}: world_size must be a count of ranks, got {world_size!r}; the checkpoint is "
                           "damaged")
    if not isinstance(state.get("data", {}), dict):
        raise UpcycleError(f"{file}: data must be the data loader's state (a JSON object), got "
                           f"{type(state['data']).__name__}; the checkpoint is damaged")
    return state


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def rng_states(state: dict[str, Any]) -> dict[str, Any]:
    """An rng_rank*.json record (checkpoint.capture_rng_state) as the objects the generators take: "python" (for
    random.setstate), "numpy" (np.random.set_state), "torch_cpu" (torch.set_rng_state), "cuda_device" (this rank's
    GPU) or "cuda" (every visible GPU's, upcycle <= 0.1) when recorded. Each is checked by setting it on a generator
    of its own, so a record that parses but holds wrong values raises here (whatever the generator raises: KeyError,
    IndexError, ValueError, RuntimeError, ...), before anything is restored."""
    py, npy = state["python"], state["numpy"]
    out: dict[str, Any] = {
        "python": (py["version"], tuple(py["state"]), py["gauss_next"]),
        "numpy": (npy["kind"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                  npy["cached_gaussian"]),
        "torch_cpu": torch.frombuffer(bytearray(_unb64(state["torch_cpu"])), dtype=torch.uint8),
    }
    random.Random().setstate(out["python"])
    np.random.RandomState().set_state(out["numpy"])
    torch.Generator().set_state(out["torch_cpu"])
    if "cuda_device" in state:
        out["cuda_device"] = torch.frombuffer(bytearray(_unb64(state["cuda_device"])), dtype=torch.uint8)
    elif "cuda" in state:
        out["cuda"] = [torch.frombuffer(bytearray(_unb64(s)), dtype=torch.uint8) for s in state["cuda"]]
    return out


def checksums_mismatched(path: Path, names: list[str]) -> list[str]:
    """Which of the state files `names` differ from their sha256 in checksums.json (sha256 at about 1 GB/s)."""
    expected = json.loads((path / CHECKSUMS).read_text())
    return [name for name in names if sha256_file(path / STATE_DIR / name) != expected[name]]


def checksum_error(path: Path, name: str) -> UpcycleError:
    """The one message for a state file that does not match checksums.json (resume and every other reader)."""
    return UpcycleError(f"{path / STATE_DIR / name} does not match its sha256 in {CHECKSUMS}: the checkpoint was "
                        "modified or damaged after it was written")


def verify_checksums(path: str | os.PathLike) -> None:
    """Check every state file of a sharded checkpoint against checksums.json in this process (the trainer shares the
    work among its ranks: checkpoint.verify_checksums); raise UpcycleError naming the first file that differs."""
    path = Path(path)
    if checkpoint_format(path) != SHARDED:
        return  # the one-file format recorded none
    bad = checksums_mismatched(path, sorted(json.loads((path / CHECKSUMS).read_text())))
    if bad:
        raise checksum_error(path, bad[0])


_VERIFIED: set[tuple] = set()  # checkpoints verified in this process, by fingerprint (verify_once)


def verify_once(path: str | os.PathLike) -> None:
    """`verify_checkpoint` and `verify_checksums`, skipped when this process already verified the checkpoint with
    every file as it is now (path, names, sizes and modification times): `check` reads a checkpoint up to three
    times (validation, export for transformers, the NaN scan), and hashing reads every state file."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    key = (str(path.resolve()), tuple((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                                      for f in files))
    if key in _VERIFIED:
        return
    verify_checkpoint(path)
    verify_checksums(path)
    _VERIFIED.add(key)


def sharded_keys(path: Path) -> set[str]:
    """Every key stored in a sharded checkpoint's state files ("model/{name}", "optim/{name}/{field}")."""
    keys: set[str] = set()
    for file in state_files(path):
        header, _ = read_header(file)
        keys.update(k for k in header if k != "__metadata__")
    return keys


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def one_file_sources(path: Path) -> dict[str, Source]:
    """The one-file format's tensors as Sources under this version's keys (rows read only where needed)."""
    reader = CheckpointReader(path)
    sources: dict[str, Source] = {}
    for key in reader:
        source = Rows(reader.shape(key), lambda rows, key=key: reader.get(key, rows))
        if key.startswith("state/"):  # "state/{name}/{field}"
            sources[OPTIM_PREFIX + key[len("state/"):]] = source
        else:
            sources[MODEL_PREFIX + key] = source
    return sources


def _sharded_pieces(path: Path, prefix: str) -> dict[str, list[tuple[tuple[int, ...], TensorInfo]]]:
    """Key (without `prefix`) -> every stored piece of it: (its offsets in the full tensor, where it lies), from the
    state files' headers. A file without sharding metadata holds whole tensors (offsets 0), as
    torch.distributed.checkpoint's HuggingFaceStorageReader reads it."""
    pieces: dict[str, list[tuple[tuple[int, ...], TensorInfo]]] = {}
    for file in state_files(path):
        infos, metadata = tensor_infos(file)  # a truncated file: one line naming it, not safetensors' traceback
        offsets = json.loads(metadata[SHARDING_INFO_KEY]) if metadata.get(SHARDING_INFO_KEY) else {}
        for key, info in infos.items():
            if key.startswith(prefix):
                offset = tuple(offsets[key][SAVED_OFFSETS_KEY]) if offsets else (0,) * len(info.shape)
                pieces.setdefault(key[len(prefix):], []).append((offset, info))
    return pieces


class CheckpointTensors(NamedTensors):
    """The model weights of a training checkpoint (either format) as a read-only mapping name -> full tensor, read
    one tensor at a time when looked up, in one process without torch.distributed (export, eval, analyze).
    `shape(name)` answers from the file headers."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if is_training_checkpoint(self.path):  # a model saved alone has no checksums or trainer state to check
            verify_once(self.path)
        if checkpoint_format(self.path) != SHARDED:
            reader = CheckpointReader(self.path)
            self._shapes = {k: reader.shape(k) for k in reader if not k.startswith("state/")}
            self._dtypes = {k: reader.dtype(k) for k in self._shapes}
            self._read = lambda name: reader.get(name)
            return
        self._chunks = _sharded_pieces(self.path, MODEL_PREFIX)
        # the full tensor spans every piece; its dtype is the stored pieces'
        self._shapes = {name: tuple(max(offset[d] + info.shape[d] for offset, info in chunks)
                                    for d in range(len(chunks[0][1].shape)))
                        for name, chunks in self._chunks.items()}
        self._dtypes = {name: CODE_DTYPES[chunks[0][1].dtype] for name, chunks in self._chunks.items()}
        self._read = self._assemble

    def _assemble(self, name: str) -> torch.Tensor:
        full = torch.empty(self._shapes[name], dtype=self._dtypes[name])
        for offsets, info in self._chunks[name]:
            piece = info.read(name=name)
            full[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))] = piece
        return full

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        return self._read(name)

    def _names(self) -> Mapping[str, object]:
        return self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]
