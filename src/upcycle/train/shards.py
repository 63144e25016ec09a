"""Which piece of every full tensor this rank holds, and filling those pieces from scratch: the trainer's side of
tensor_sources.py (the Sources they are filled from, and `fill_from_sources`, sit there, below the model).

Under FSDP2 and expert parallelism each rank holds a piece of every parameter (and of its optimizer state): a box of
the full tensor, e.g. rows 512:1024 of an embedding, or experts 2:4 and columns 0:2048 of an expert stack. The model is
built on the meta device and parallelized there; `model.to_empty` then allocates only these pieces, and they are
filled:

    piece_of / model_pieces
                 a rank's local values, the box they occupy and the full shape (tensor_sources.Piece), of one plain
                 tensor or DTensor, or of every parameter of a (sharded) model
    global_views every parameter (and saved buffer) as a tensor of the full shape (a DTensor where this rank holds a
                 piece)
    tensor_sources.fill_from_sources / fill_from_scratch
                 fill every piece, one full tensor (at most) at a time.

So no rank ever holds the whole model: at most its own pieces plus one full tensor in flight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from upcycle.train import expert_parallel
from upcycle.train.distributed import reshard, unwrap
from upcycle.model.transformer import fill_initial
from upcycle.formats.tensor_sources import Piece, full_box


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
    """Every parameter and saved buffer by its checkpoint name, as a tensor whose shape is the full tensor's: the
    parameter itself (plain, or FSDP's DTensor), a buffer (whole on every rank), or for an expert weight under expert
    parallelism a DTensor over the expert mesh that places this rank's experts among all E
    (expert_parallel.ExpertParallel.global_view). What checkpoints save and load. A DDP wrapper is looked through, so
    its names carry no "module." prefix."""
    model = unwrap(model)
    reshard(model)
    experts = expert_parallel.find(model)
    expert_params = experts.params if experts is not None else {}
    views = {}
    for name, param in model.named_parameters():
        name = expert_parallel.clean_name(name)
        views[name] = experts.global_view(param) if name in expert_params else param
    for name, buffer in saved_buffers(model):  # the MoE layers' balancing biases: whole on every rank
        views[expert_parallel.clean_name(name)] = buffer
    return views


def saved_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The model's persistent buffers (the state dict's non-parameters: the MoE layers' balancing biases), by name.
    Checkpoints save and load them with the parameters; no optimizer holds them."""
    return [(f"{module_name}.{name}" if module_name else name, buffer)
            for module_name, module in model.named_modules() for name, buffer in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set]


def model_pieces(model: nn.Module) -> dict[str, Piece]:
    """This rank's piece of every parameter, by checkpoint name."""
    return {name: piece_of(view) for name, view in global_views(model).items()}


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
