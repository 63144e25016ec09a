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

Health: the weights of checkpoint s are only tested by step s + 1 (its loss and gradient norm). The trainer then marks
the checkpoint good, or suspect when that step was non-finite or a spike; `last_good_checkpoint` names the newest good
one. Checkpoints written before health existed are good.

The one-file format of earlier versions (model.safetensors + optimizer.safetensors, written whole by rank 0) is still
read: `one_file_sources` gives its tensors under this version's keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.formats.safetensors_io import CODE_DTYPES, CheckpointReader, TensorInfo, read_header, tensor_infos
from upcycle.formats.tensor_sources import Rows, Source, TensorSource

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


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise UpcycleError naming the file if checkpoint `path` is incomplete, truncated or unreadable (every JSON file,
    the RNG files included, and the headers and sizes of its safetensors files), without reading any tensor."""
    path = Path(path)
    fmt = checkpoint_format(path)
    required = [MODEL_CONFIG, OPTIMIZER_META, TRAINER_STATE]
    required += [CHECKSUMS] if fmt == SHARDED else [ONE_FILE_WEIGHTS, ONE_FILE_OPTIMIZER]
    for name in required:
        if not (path / name).is_file():
            raise UpcycleError(f"checkpoint {path} has no {name}; it is incomplete or not a training checkpoint")
    for file in [*(path / name for name in required if name.endswith(".json")), *sorted(path.glob("rng_rank*.json"))]:
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UpcycleError(f"{file} is truncated or not JSON") from None
    tensor_files = state_files(path) if fmt == SHARDED else [path / ONE_FILE_WEIGHTS, path / ONE_FILE_OPTIMIZER]
    if fmt == SHARDED:
        listed = set(json.loads((path / CHECKSUMS).read_text()))
        found = {file.name for file in tensor_files}
        if listed != found:
            raise UpcycleError(f"checkpoint {path}: {STATE_DIR}/ holds {sorted(found)} but {CHECKSUMS} lists "
                               f"{sorted(listed)}; files were added or removed after it was written")
    for file in tensor_files:
        read_header(file)


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


class CheckpointTensors(Mapping, TensorSource):
    """The model weights of a training checkpoint (either format) as a read-only mapping name -> full tensor, read
    one tensor at a time when looked up, in one process without torch.distributed (export, eval, analyze).
    `shape(name)` answers from the file headers."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if checkpoint_format(self.path) != SHARDED:
            reader = CheckpointReader(self.path)
            self._shapes = {k: reader.shape(k) for k in reader if not k.startswith("state/")}
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

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]
