"""Which piece of every full tensor this rank holds, and filling those pieces from wherever the weights come from.

Under FSDP2 and expert parallelism each rank holds a piece of every parameter (and of its optimizer state): a box of
the full tensor, e.g. rows 512:1024 of an embedding, or experts 2:4 and columns 0:2048 of an expert stack. The model is
built on the meta device and parallelized there; `model.to_empty` then allocates only these pieces, and this module
fills them:

    Piece        a rank's local values, the box they occupy and the full shape (`model_pieces`, `piece_of`)
    Source       something a box of one full tensor can be read from (`read(box)`), without reading the rest:
                 rows of a tensor stored in safetensors (`Rows`), or an expert stack assembled one expert at a time
                 from per-expert matrices (`ExpertStack`). hf_model.hf_sources maps HF checkpoints, upcycle
                 convert's lazy output and old one-file training checkpoints to our parameter names as Sources.
    fill_from_sources / fill_from_scratch
                 fill every piece, one full tensor (at most) at a time.

So no rank ever holds the whole model: at most its own pieces plus one full tensor in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from upcycle import expert_parallel
from upcycle.distributed import reshard, unwrap
from upcycle.model import fill_initial

Box = tuple[slice, ...]


def full_box(shape: Iterable[int]) -> Box:
    return tuple(slice(0, n) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b.stop - b.start for b in box)


@dataclass
class Piece:
    """This rank's part of one full tensor."""

    local: Tensor  # the values this rank holds (shares storage with the parameter or state tensor)
    box: Box  # where they sit in the full tensor
    shape: torch.Size  # the full tensor's shape


def piece_of(tensor: Tensor) -> Piece:
    """The piece a plain tensor (all of it) or a DTensor (its local shard, at its offsets) holds."""
    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                                     tensor.placements)
        box = tuple(slice(o, o + n) for o, n in zip(offsets, local_shape))
        return Piece(tensor.to_local().detach(), box, tensor.shape)
    return Piece(tensor.detach(), full_box(tensor.shape), tensor.shape)


def global_views(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter by its checkpoint name, as a tensor whose shape is the full tensor's: the parameter itself (plain,
    or FSDP's DTensor), or for an expert weight under expert parallelism a DTensor over the expert mesh that places
    this rank's experts among all E (expert_parallel.ExpertParallel.global_view). What checkpoints save and load. A DDP
    wrapper is looked through, so its names carry no "module." prefix."""
    model = unwrap(model)
    reshard(model)
    experts = expert_parallel.find(model)
    expert_params = experts.params if experts is not None else {}
    views = {}
    for name, param in model.named_parameters():
        name = expert_parallel.clean_name(name)
        views[name] = experts.global_view(param) if name in expert_params else param
    return views


def model_pieces(model: nn.Module) -> dict[str, Piece]:
    """This rank's piece of every parameter, by checkpoint name."""
    return {name: piece_of(view) for name, view in global_views(model).items()}


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


@torch.no_grad()
def fill_from_scratch(pieces: Mapping[str, Piece], plan: list[tuple[str, str]], *, std: float) -> None:
    """The from-scratch initialization (`Transformer.init_plan`, drawn from the global CPU generator) for any sharding:
    each full tensor is drawn on the CPU in plan order, as one process draws it, and each rank keeps its piece."""
    for name, how in plan:
        piece = pieces[expert_parallel.clean_name(name)]
        full = torch.empty(piece.shape)
        fill_initial(full, how, std=std)
        if piece.local.numel():
            piece.local.copy_(full[piece.box])
