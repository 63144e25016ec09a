"""Where weights are read from, without reading more than is asked for: the two contracts every reader of tensors
fulfils, below the model and the trainer (nothing here knows about ranks, meshes or torch.distributed).

    TensorSource a checkpoint's tensors by name, each read when it is looked up, with `shape(name)` answered without
                 reading: an HF checkpoint directory (safetensors_io.CheckpointReader), the model weights of one of
                 our training checkpoints (checkpoint_format.CheckpointTensors), a conversion's output computed on
                 demand (convert.LazyConversion), our tensors of any checkpoint (hf_model.model_tensors).
    Source       one full tensor of which a box can be read (`read(box)`) without reading the rest: rows of a tensor
                 stored in safetensors (`Rows`), an expert stack assembled one expert at a time from per-expert
                 matrices (`ExpertStack`), or a tensor computed on demand (`Computed`). hf_model.hf_sources maps HF
                 checkpoints, upcycle convert's lazy output and old one-file training checkpoints to our parameter
                 names as Sources.
    Piece        the part of one full tensor a process holds: its values, the box they occupy and the full shape.
                 shards.py makes them for a live (possibly sharded) model; `fill_from_sources` fills them.

So no process ever holds a whole model to load it: at most its own pieces plus one full tensor in flight.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

Box = tuple[slice, ...]


@runtime_checkable
class TensorSource(Protocol):
    """A read-only mapping name -> full tensor whose tensors are read (or computed) one at a time when looked up, never
    all at once. `name in source`, iteration and `len` answer from the names alone, and `shape(name)` from the file
    headers or the plan, so a caller can check a whole checkpoint's names and shapes before reading any tensor.

    Implementations subclass `NamedTensors` (a Mapping, for keys, items, get, ..., whose membership never reads a
    tensor). Functions that only look tensors up also take a plain dict of tensors; those that call `shape` need a
    TensorSource."""

    @abstractmethod
    def __getitem__(self, name: str) -> Tensor: ...

    @abstractmethod
    def __contains__(self, name: object) -> bool: ...

    @abstractmethod
    def __iter__(self) -> Iterator[str]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor `name`, without reading it."""


class NamedTensors(Mapping, TensorSource):
    """The base of our TensorSources: a Mapping whose names are the keys of `_names()` (a dict it already holds),
    so membership, iteration and length never read a tensor. Subclasses define `_names`, `__getitem__` and `shape`."""

    @abstractmethod
    def _names(self) -> Mapping[str, object]: ...

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor to find out
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def full_box(shape: Iterable[int]) -> Box:
    return tuple(slice(0, n) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b.stop - b.start for b in box)


@dataclass
class Piece:
    """A process's part of one full tensor."""

    local: Tensor  # the values this process holds (shares storage with the parameter or state tensor)
    box: Box  # where they sit in the full tensor
    shape: torch.Size  # the full tensor's shape


# ---------------------------------------------------------------------------------------------------------------------
# Sources: a box of a full tensor, read without reading the rest


class Source:
    """A full tensor of `shape` that boxes can be read from."""

    shape: tuple[int, ...]

    def read(self, box: Box) -> Tensor:
        raise NotImplementedError


class Rows(Source):
    """A stored tensor of which whole rows (dim 0, contiguous on disk) can be read; the other dims of a box are cut in
    memory. `read_rows(rows)` returns those rows."""

    def __init__(self, shape: tuple[int, ...], read_rows: Callable[[slice], Tensor]):
        self.shape, self.read_rows = tuple(shape), read_rows

    def read(self, box: Box) -> Tensor:
        rows = self.read_rows(box[0]) if self.shape else self.read_rows(slice(None))
        return rows[(slice(None), *box[1:])] if self.shape else rows


class ExpertStack(Source):
    """An expert stack of ours ([E, D, 2F] gate_up or [E, F, D] down) made one expert at a time by `expert(e)`, which
    returns expert e's matrix in our layout; a box reads only its experts."""

    def __init__(self, shape: tuple[int, ...], expert: Callable[[int], Tensor]):
        self.shape, self.expert = tuple(shape), expert

    def read(self, box: Box) -> Tensor:
        experts = range(box[0].start, box[0].stop)
        if not experts:
            return torch.empty(box_shape(box))
        return torch.stack([self.expert(e)[box[1:]] for e in experts])


class Computed(Source):
    """A full tensor computed on demand (e.g. the tied check's copy), sliced to the box."""

    def __init__(self, shape: tuple[int, ...], compute: Callable[[], Tensor]):
        self.shape, self.compute = tuple(shape), compute

    def read(self, box: Box) -> Tensor:
        return self.compute()[box]


# ---------------------------------------------------------------------------------------------------------------------
# Filling


@torch.no_grad()
def fill_from_sources(pieces: Mapping[str, Piece], sources: Mapping[str, Source]) -> None:
    """Copy each piece's box out of the source of the same name (cast to the piece's dtype). Every piece needs a source
    of the full shape, and every source a piece: a mismatch is a bug or a wrong checkpoint, never silently skipped."""
    missing = sorted(set(pieces) - set(sources))
    extra = sorted(set(sources) - set(pieces))
    if missing or extra:
        raise ValueError(f"sources do not match the model: missing {missing[:5]}, unknown {extra[:5]}")
    for name, piece in pieces.items():
        source = sources[name]
        if tuple(source.shape) != tuple(piece.shape):
            raise ValueError(f"{name}: source shape {tuple(source.shape)}, model shape {tuple(piece.shape)}")
        if piece.local.numel():
            piece.local.copy_(source.read(piece.box))
