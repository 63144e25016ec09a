"""Validated, lazy reading of HF checkpoint directories and a streaming safetensors shard writer.

Reading: every header is parsed and checked against the file size before any work starts (the tensors must fill the
data exactly, as the format demands), so a truncated or extended file is reported up front with its name rather than
failing halfway through a conversion. Tensors are then read one at a time with positioned reads at the offsets the
header gives; nothing is ever unpickled.

Writing: the complete list of output tensors (name, shape, dtype) is known before the first byte is written, so each
shard's header is written first and tensor bytes are streamed after it in order. Peak memory is one tensor, whatever
the model's depth or the shard size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.formats import hf_formats as hf
from upcycle.errors import UpcycleError
from upcycle.files import not_an_input, read_json, sha256_file
from upcycle.formats.tensor_sources import NamedTensors

INDEX_NAME = "model.safetensors.index.json"
SIDECAR_PREFIX = "upcycle_"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32",
               torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
# The one table of floating dtypes a user names (--dtype of convert and export, config.json's "dtype"), by their
# names in hf_formats.FLOAT_DTYPES.
DTYPE_NAMES = {name: getattr(torch, name) for name in hf.FLOAT_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """The DTYPE_NAMES name of a torch dtype (float32, bfloat16 or float16)."""
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16"
    start: int  # absolute byte offset of the tensor's data in the file
    end: int

    def read(self, rows: slice | None = None, *, name: str = "") -> torch.Tensor:
        """The tensor, or only its `rows` (a slice of dim 0, stored contiguously), with a plain positioned read: unlike
        a memory map, pages already read do not stay in this process's resident set, so reading a whole model layer
        by layer keeps peak memory flat, and a rank that keeps a few rows reads only those."""
        shape, start, end = self.shape, self.start, self.end
        if rows is not None and shape:
            first, stop, _ = rows.indices(shape[0])
            stop = max(stop, first)
            row_bytes = (end - start) // shape[0] if shape[0] else 0
            start, end = start + first * row_bytes, start + stop * row_bytes
            shape = (stop - first, *shape[1:])
        buffer = bytearray(end - start)
        with open(self.file, "rb") as f:
            f.seek(start)
            if f.readinto(buffer) != len(buffer):
                raise UpcycleError(f"{self.file} ended while reading {name}; the file changed or is truncated")
        if not buffer:
            return torch.empty(shape, dtype=CODE_DTYPES[self.dtype])
        return torch.frombuffer(buffer, dtype=CODE_DTYPES[self.dtype]).reshape(shape)


def tensor_infos(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor of one safetensors file (validated as read_header does), and the file's metadata."""
    header, data_start, metadata = _parse_header(Path(path))
    infos = {}
    for name, meta in header.items():
        if meta.get("dtype") not in CODE_DTYPES:
            raise UpcycleError(f"tensor {name} in {path.name} has unsupported dtype {meta.get('dtype')}")
        begin, end = meta["data_offsets"]
        infos[name] = TensorInfo(Path(path), tuple(meta["shape"]), meta["dtype"], data_start + begin, data_start + end)
    return infos, metadata


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate one safetensors header; raise UpcycleError if the file is truncated or not safetensors.

    Returns the header (tensor name -> dtype, shape, data_offsets) and the absolute offset where the data begins.
    """
    header, data_start, _ = _parse_header(path)
    return header, data_start


def _parse_header(path: Path) -> tuple[dict, int, dict]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UpcycleError(f"{path} is not a safetensors file (too short); re-save or re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise UpcycleError(f"{path} is truncated or not a safetensors file; re-save or re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise UpcycleError(f"{path} has a corrupt safetensors header; re-save or re-download it") from None
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if end > data_len:
        raise UpcycleError(
            f"{path} is truncated ({data_len} data bytes, header needs {end}); re-save or re-download it"
        )
    if end < data_len:  # the format has no holes and no tail (safetensors itself refuses such a file)
        raise UpcycleError(f"{path} holds {data_len - end} bytes after its last tensor ({data_len} data bytes, header "
                           f"needs {end}); it is damaged or not a safetensors file, re-save or re-download it")
    return header, 8 + header_len, metadata


class CheckpointReader(NamedTensors):
    """A local HF checkpoint directory: its config.json and its tensors, read lazily (a TensorSource: a read-only
    mapping name -> tensor; a tensor is read when it is looked up).

    Accepts one `model.safetensors`, several shards with `model.safetensors.index.json`, or several safetensors
    files without an index. Refuses pickle weights (`.bin`/`.pt`) rather than unpickling them.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise UpcycleError(f"{not_an_input('source', self.dir, 'a directory')}; pass a local HF checkpoint "
                               "directory (config.json + safetensors)")
        if not os.access(self.dir, os.R_OK | os.X_OK):
            raise UpcycleError(f"source {self.dir} is not readable; check its permissions")
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        self.files = self._weight_files()
        for file in self.files:
            header, data_start = read_header(file)
            for name, meta in header.items():
                if name in self.tensors:
                    raise UpcycleError(f"tensor {name} appears in both {self.tensors[name].file.name} and {file.name}")
                if meta.get("dtype") not in CODE_DTYPES:
                    raise UpcycleError(f"tensor {name} in {file.name} has unsupported dtype {meta.get('dtype')}")
                begin, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(file, tuple(meta["shape"]), meta["dtype"], data_start + begin,
                                                data_start + end)

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise UpcycleError(f"{self.dir} has no config.json; pass a directory written by save_pretrained")
        try:
            cfg = read_json(path, fix="fix or re-save the config")
        except OSError as exc:
            raise UpcycleError(f"cannot read {path}: {exc.strerror}") from None
        if not isinstance(cfg, dict):
            raise UpcycleError(f"{path} does not hold a JSON object; fix or re-save the config")
        return cfg

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = read_json(index, fix="re-save the checkpoint")["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError
            except (KeyError, TypeError):
                raise UpcycleError(f"{index} is not a valid safetensors index; re-save the checkpoint") from None
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UpcycleError(f"{index.name} lists missing shard(s) {', '.join(missing)}; "
                                   f"copy them into {self.dir}")
            return files
        # upcycle's own sidecar files (the re-drawn neuron masks of a conversion) are not weights
        files = sorted(f for f in self.dir.glob("*.safetensors") if not f.name.startswith(SIDECAR_PREFIX))
        if files:
            return files
        pickles = [p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UpcycleError(
                f"{self.dir} holds only pickle weights ({', '.join(sorted(pickles)[:3])}), which upcycle never "
                "unpickles; re-save with save_pretrained(..., safe_serialization=True)"
            )
        raise UpcycleError(f"{self.dir} has no *.safetensors weight files")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def _names(self) -> Mapping[str, object]:
        return self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return CODE_DTYPES[self.tensors[name].dtype]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Read one tensor, or only its `rows` (TensorInfo.read)."""
        return self.tensors[name].read(rows, name=name)

    def sha256(self) -> dict[str, str]:
        """sha256 of config.json, the index and every weight file, for the manifest (computed once)."""
        if getattr(self, "_sha256", None) is None:
            names = ["config.json", *([INDEX_NAME] if (self.dir / INDEX_NAME).is_file() else []),
                     *(f.name for f in self.files)]
            self._sha256 = {name: sha256_file(self.dir / name) for name in names}
        return dict(self._sha256)


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match:
        raise UpcycleError(f"cannot read size {size!r}; write it like 5GB, 500MB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(number * scale)


def parse_shard_size(size: int | str, flag: str = "--max-shard-size") -> int:
    """A largest shard size (parse_size), refused unless positive: at 0 every tensor would get a file of its own."""
    try:
        value = parse_size(size)
    except UpcycleError as exc:
        raise UpcycleError(f"{flag}: {exc}") from None
    if value < 1:
        raise UpcycleError(f"{flag} must be a positive size such as 5GB or 500MB, got {size!r}")
    return value


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for s in self.shape:
            count *= s
        return count * torch.empty((), dtype=self.dtype).element_size()


def _header_bytes(items: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `items` in this order.

    Written by us rather than by `safetensors.torch.save_file`, whose header order (metadata keys in particular) varies
    from call to call: the same tensors must give the same bytes, since users compare hashes of our outputs.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for item in items:
        header[item.name] = {"dtype": DTYPE_CODES[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data  # reshape: 0-d too


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file byte-reproducibly (tensors in the given order, metadata keys sorted), one tensor at a
    time, with the permissions of any file this process creates (umask), and fsync it. Returns the file's sha256,
    computed from the bytes as they are written (no second read)."""
    items = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    digest = hashlib.sha256()
    # Each chunk is hashed in a second thread while this one writes it (both release the GIL), so the hash costs no
    # time beside a write to disk; one chunk in flight keeps the hashing in order and holds no extra copies.
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as hasher:
        hashed = None
        for chunk in (_header_bytes(items, metadata), *map(_tensor_bytes, tensors.values())):
            if hashed is not None:
                hashed.result()
            hashed = hasher.submit(digest.update, chunk)
            f.write(chunk)
        if hashed is not None:
            hashed.result()
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


class ShardWriter:
    """Writes a planned sequence of tensors into HF-style shards, streaming, in exactly the planned order.

    Shards are filled greedily up to `max_shard_size` bytes (a tensor larger than that gets a shard of its own);
    with more than one shard an index `model.safetensors.index.json` is written, as `save_pretrained` does.
    """

    def __init__(self, directory: Path, plan: list[PlannedTensor], max_shard_size: int):
        self.dir = Path(directory)
        self.plan = plan
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for item in plan:
            if groups[-1] and size + item.nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item.nbytes
        count = len(groups)
        self.shards = [
            ("model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors", group)
            for i, group in enumerate(groups)
        ]
        self._next = 0  # index into plan
        self._rows = 0  # rows (first-dimension slices) of plan[self._next] written so far
        self._shard = -1
        self._left_in_shard = 0
        self._file = None

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._finish_file()
        self._shard += 1
        name, group = self.shards[self._shard]
        self._file = open(self.dir / name, "wb")
        self._file.write(_header_bytes(group, {"format": "pt"}))
        self._left_in_shard = len(group)

    def _finish_file(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor, whole or as consecutive slices along its first dimension (a tensor that
        holds every expert of a layer can then be written one expert at a time)."""
        expected = self.plan[self._next]
        rows, expected_rows = (tensor.shape[0] if tensor.dim() else 1), (expected.shape[0] if expected.shape else 1)
        if (name != expected.name or tuple(tensor.shape[1:]) != expected.shape[1:] or tensor.dtype != expected.dtype
                or tensor.dim() != len(expected.shape) or self._rows + rows > expected_rows):
            raise AssertionError(
                f"writer expected {expected.name} {expected.shape} {expected.dtype} (from row {self._rows}), got "
                f"{name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._rows == 0 and self._left_in_shard == 0:
            self._open_next_shard()
        self._file.write(_tensor_bytes(tensor))
        self._rows += rows
        if self._rows == expected_rows:
            self._rows = 0
            self._left_in_shard -= 1
            self._next += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the shard file names."""
        if self._next != len(self.plan):
            raise AssertionError(f"writer closed after {self._next} of {len(self.plan)} planned tensors")
        if self._file is not None:
            self._finish_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(p.nbytes for p in self.plan)},
                "weight_map": {item.name: name for name, group in self.shards for item in group},
            }
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [name for name, _ in self.shards]
