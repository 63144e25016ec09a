"""`upcycle grow`: an MoE with E experts -> one with m * E. Each expert is kept and joined by m - 1 copies of itself,
made diverse by Drop-Upcycling (a fraction r of each copy's neurons re-drawn from the statistics of that expert's own
matrices); each router row is copied to the expert's copies.

Why r = 0 with top-k = m * k (the default) is the source's function exactly: the m copies of expert e share its
router row, so a softmax over the m * E logits gives each copy p_e / m (p the source's softmax), and the top m * k
logits are the m copies of each of the source's top k experts (equal values rank together). Renormalized (Mixtral,
Granite, Qwen-MoE with norm_topk_prob), each copy weighs p_e / (m * P), P the sum of the k chosen p_e, and the m copies
of e add up to p_e / P, the source's weight; without renormalization each weighs p_e / m and the copies add up to p_e.
Either way every token gets the source's mixture. The shared expert (Qwen2-MoE, Granite), attention, norms, embeddings
and dense layers are copied as they are.

Streaming like `upcycle convert`: the output layout is planned first, then one expert at a time is read (one slice of
a tensor that holds every expert, for Granite and transformers' fused layout), copied and written.

Run: `upcycle grow MOE OUT --factor 2 --ratio 0.5`; `upcycle check OUT --dense MOE` compares the two.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from upcycle.formats import hf_formats as hf
from upcycle.convert.conversion import (
    Entry,
    check_fits,
    copy_tokenizer_files,
    fused_expert_slice,
    layout,
    single_thread,
    source_record,
    write_manifest,
    write_shards,
)
from upcycle.convert.options import Estimate, GrowOptions
from upcycle.errors import UpcycleError
from upcycle.files import check_output, publish_dir, sha256_file
from upcycle.model.hf import check_model_dir, is_our_checkpoint, load_model, state_dict_to_hf
from upcycle.model.transformer import ModelConfig
from upcycle.formats.safetensors_io import DTYPE_NAMES, CheckpointReader, PlannedTensor, dtype_name
from upcycle.convert.upcycling import MATRICES, upcycle_expert


# --------------------------------------------------------------------------------------------------------------------
# The source: an HF MoE checkpoint (read lazily) or one of our checkpoints (in memory, as HF tensors)


@dataclass
class _Source:
    tensors: Mapping[str, torch.Tensor]
    cfg: dict  # HF config.json of the source (for ours: what `upcycle export` would write)
    directory: Path
    record: dict  # the manifest's entry for it
    dtype: torch.dtype
    memory_bytes: int  # what the source holds in memory (ours: the whole model)


def _open_source(path: str | os.PathLike, opts: GrowOptions) -> _Source:
    directory = check_model_dir(path)
    if is_our_checkpoint(directory):
        model = load_model(directory)
        if not model.config.is_moe:
            raise UpcycleError(f"{directory} is a dense model; grow needs an MoE (make one with upcycle convert)")
        cfg, tensors = state_dict_to_hf(model.state_dict(), model.config, opts.format, dtype="float32")
        files = sorted(p for p in directory.iterdir() if p.is_file())
        record = {"path": str(directory.absolute()), "model_type": "upcycle checkpoint",
                  "sha256": {p.name: sha256_file(p) for p in files}}
        return _Source(tensors, cfg, directory, record, torch.float32,
                       sum(t.numel() * t.element_size() for t in tensors.values()))
    reader = CheckpointReader(directory)
    family = reader.config.get("model_type")
    if family in hf.DENSE_FAMILIES:
        raise UpcycleError(f"{directory} is a dense {family} model; grow needs an MoE (make one with upcycle convert)")
    if family not in hf.MOE_FORMATS:
        raise UpcycleError(f"unsupported model_type {family!r} in {directory}/config.json; grow reads "
                           f"{', '.join(hf.MOE_FORMATS)} and our own checkpoints")
    if opts.format not in ("auto", family):
        raise UpcycleError(f"grow keeps an HF source's format ({family}); leave out --format, and change the format "
                           "afterwards by training or loading it and running upcycle export --format")
    hf.check_config_types(reader.config)
    return _Source(reader, reader.config, directory, source_record(reader), reader.dtype(hf.EMBED_KEY), 0)


@dataclass(frozen=True)
class _Shape:
    """What the grown model's layout depends on, read from the source's config."""

    fmt: str
    shapes: hf.Shapes  # ffn_dim: the dense layers' FFN size
    num_experts: int
    top_k: int
    expert_dim: int
    shared_dim: int
    moe_layers: tuple[int, ...]


def _read_shape(cfg: dict) -> _Shape:
    fields = hf.read_model_fields(cfg)
    config = ModelConfig(**fields)
    shapes = dataclasses.replace(hf.read_shapes(cfg), ffn_dim=config.ffn_dim)
    return _Shape(cfg["model_type"], shapes, config.num_experts, config.top_k, config.expert_dim,
                  hf.shared_expert_dim(cfg), config.moe_layer_ids)


def _layout(shape: _Shape, num_experts: int) -> list[Entry]:
    entries = layout(shape.shapes, shape.fmt, num_experts, shape.shared_dim, shape.expert_dim, shape.moe_layers)
    # grow never changes tying: a tied source (a transformers-saved Qwen2-MoE may be) keeps no lm_head
    return [e for e in entries if e.kind != "lm_head" or not shape.shapes.tie_embeddings]


class _Experts:
    """Reads expert e of a layer from whichever layout the source holds: per-expert keys, transformers' fused
    in-memory layout (`mlp.experts.gate_up_proj`), or Granite's stored fused tensors. One slice at a time."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], fmt: str, layer: int, num_experts: int, dim: int,
                 ffn_dim: int):
        self.tensors, self.ffn_dim = tensors, ffn_dim
        stored = hf.stored_experts(fmt, layer, num_experts, dim, ffn_dim)
        fused_router, fused_gate_up, fused_down = hf.fused_expert_keys(layer)
        router = hf.router_key(fmt, layer)
        self.router = router if router in tensors or stored[0][2] == -1 else fused_router
        self.expected = {self.router: (num_experts, dim)}
        if stored[0][2] == -1:  # Granite's only layout
            (self.gate_up, _, _, _), (self.down, _, _, _) = stored
            self.per_expert = None
        elif fused_gate_up in tensors:
            self.gate_up, self.down, self.per_expert = fused_gate_up, fused_down, None
        else:
            self.per_expert = {(e, m): key for key, _, e, m in stored}
            self.expected.update({key: shape for key, shape, _, _ in stored})
        if self.per_expert is None:
            self.expected.update({self.gate_up: (num_experts, 2 * ffn_dim, dim),
                                  self.down: (num_experts, dim, ffn_dim)})

    def _row(self, name: str, e: int) -> torch.Tensor:
        if isinstance(self.tensors, CheckpointReader):
            return self.tensors.get(name, slice(e, e + 1))[0]
        return self.tensors[name][e]

    def __call__(self, e: int) -> dict[str, torch.Tensor]:
        if self.per_expert is not None:
            return {m: self.tensors[self.per_expert[(e, m)]] for m in MATRICES}
        gate_up = self._row(self.gate_up, e)
        return {"gate": gate_up[:self.ffn_dim], "up": gate_up[self.ffn_dim:], "down": self._row(self.down, e)}


def _shape_of(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return tensors.shape(name) if isinstance(tensors, CheckpointReader) else tuple(tensors[name].shape)


def _check_source(source: _Source, shape: _Shape) -> dict[int, _Experts]:
    """Every tensor the config implies present with its shape, nothing unknown, before anything is written."""
    tensors = source.tensors
    experts = {i: _Experts(tensors, shape.fmt, i, shape.num_experts, shape.shapes.dim, shape.expert_dim)
               for i in shape.moe_layers}
    expected = {e.name: e.shape for e in _layout(shape, shape.num_experts) if e.kind not in ("router", "expert",
                                                                                             "experts")}
    for reader in experts.values():
        expected.update(reader.expected)
    for name, wanted in expected.items():
        if name not in tensors:
            raise UpcycleError(f"{source.directory} lacks tensor {name}; the checkpoint is incomplete or not the "
                               f"{shape.fmt} model its config.json describes")
        if _shape_of(tensors, name) != tuple(wanted):
            raise UpcycleError(f"{name} in {source.directory} has shape {list(_shape_of(tensors, name))}, config.json "
                               f"implies {list(wanted)}; config and weights disagree")
    unknown = sorted(n for n in tensors if n not in expected and not n.endswith(hf.IGNORED_SUFFIXES)
                     and not (n == hf.LM_HEAD_KEY and shape.shapes.tie_embeddings))
    if unknown:
        raise UpcycleError(f"{source.directory} has tensors a {shape.fmt} model does not ({', '.join(unknown[:3])}"
                           f"{', ...' if len(unknown) > 3 else ''}); not supported")
    return experts


def _grown_config(cfg: dict, num_experts: int, top_k: int, dtype: str) -> dict:
    out = {k: v for k, v in cfg.items() if k != "transformers_version"}
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):  # Mixtral, Granite; Qwen-MoE; GLM-4-MoE
        if key in out:
            out[key] = num_experts
    out["num_experts_per_tok"] = top_k
    out["dtype"] = dtype
    out.pop("torch_dtype", None)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Producing the grown tensors


class _Grower:
    """Computes each output tensor (fp32) when its entry comes up."""

    def __init__(self, source: _Source, shape: _Shape, experts: dict[int, _Experts], opts: GrowOptions):
        self.source, self.shape, self.experts, self.opts = source, shape, experts, opts
        self.upcycle_opts = opts.upcycle_options()
        self.layers: dict[int, dict] = {}
        self.redrawn_LEMF = np.zeros((shape.shapes.num_layers, opts.factor * shape.num_experts, len(MATRICES),
                                      shape.expert_dim), dtype=bool)
        self._source_expert = None  # (layer, e, tensors): read once for its m copies
        self._expert = None  # (layer, n, tensors) while the matrices of output expert n are written
        self._held_down: dict[int, torch.Tensor] = {}

    def _read(self, name: str) -> torch.Tensor:
        tensor = self.source.tensors[name]
        if not torch.isfinite(tensor).all():
            raise UpcycleError(f"{name} in {self.source.directory} holds NaN or Inf values; the source checkpoint is "
                               "damaged, re-save or re-download it")
        return tensor.float()

    def expert_tensors(self, layer: int, n: int) -> dict[str, torch.Tensor]:
        """Output expert n of `layer`: copy n % m of source expert n // m (copy 0 is the expert itself)."""
        if self._expert is None or self._expert[:2] != (layer, n):
            e, copy = divmod(n, self.opts.factor)
            if self._source_expert is None or self._source_expert[:2] != (layer, e):
                tensors = {m: t.float() for m, t in self.experts[layer](e).items()}
                if not all(torch.isfinite(t).all() for t in tensors.values()):
                    raise UpcycleError(f"expert {e} of layer {layer} in {self.source.directory} holds NaN or Inf "
                                       "values; the source checkpoint is damaged, re-save or re-download it")
                self._source_expert = (layer, e, tensors)
            src = self._source_expert[2]
            opts = self.upcycle_opts if copy else dataclasses.replace(self.upcycle_opts, method="naive")
            x = upcycle_expert(src["gate"], src["up"], src["down"], layer=layer, expert=n, opts=opts)
            self.layers[layer]["experts"].append({"expert": n, "from": e, "copy": copy, **x.records})
            self.redrawn_LEMF[layer, n] = x.redrawn_MF.numpy()
            self._expert = (layer, n, {"gate": x.gate_FD, "up": x.up_FD, "down": x.down_DF})
        return self._expert[2]

    def __call__(self, entry: Entry) -> torch.Tensor:
        if entry.kind == "router":  # each row copied to the expert's m copies
            self.layers[entry.layer] = {"layer": entry.layer, "experts": []}
            rows = self._read(self.experts[entry.layer].router)
            return rows.repeat_interleave(self.opts.factor, dim=0)
        if entry.kind == "router_bias":  # glm4_moe: each expert's balancing bias goes with its copies
            return self._read(entry.name).repeat_interleave(self.opts.factor, dim=0)
        if entry.kind == "expert":
            return self.expert_tensors(entry.layer, entry.expert)[entry.role]
        return self._read(entry.name)


def _estimate(entries: list[Entry], shape: _Shape, source: _Source, value_bytes: int, factor: int) -> Estimate:
    """Output size and peak memory, from the planned layout (nothing is allocated)."""
    sizes = [PlannedTensor(e.name, e.shape, torch.float32).nbytes // 4 for e in entries]
    expert = 3 * shape.shapes.dim * shape.expert_dim
    L, grown = shape.shapes.num_layers, factor * shape.num_experts
    output = sum(sizes) * value_bytes + 200 * len(entries) + L * grown * (3 * (shape.expert_dim // 8 + 1) + 800)
    fused = shape.fmt in hf.GRANITE_FORMATS
    memory = (3 * 4 * max(sizes) + 3 * 4 * expert + (grown * expert // 3 * value_bytes if fused else 0)
              + L * grown * (3 * shape.expert_dim + 4096) + source.memory_bytes)
    return Estimate(output_bytes=output, memory_bytes=memory)


def grow(source: str | os.PathLike, output: str | os.PathLike, *, force: bool = False, progress: bool = True,
         **options) -> Path:
    """Grow the MoE at `source` (an HF MoE checkpoint or one of ours) into `output`; returns the output path.

    `options` are the fields of `GrowOptions`. Everything is validated before anything is written, and the output is
    published atomically as by `upcycle convert`."""
    opts = GrowOptions(**options)
    opts.validate()
    output = check_output(output, force=force, inputs=[source])
    src = _open_source(source, opts)
    shape = _read_shape(src.cfg)
    top_k = opts.resolved_top_k(shape.num_experts, shape.top_k)
    experts = _check_source(src, shape)
    out_dtype = src.dtype if opts.dtype == "auto" else DTYPE_NAMES[opts.dtype]
    grown = opts.factor * shape.num_experts
    entries = _layout(shape, grown)
    check_fits(_estimate(entries, shape, src, torch.empty((), dtype=out_dtype).element_size(), opts.factor), output,
               "use a smaller --factor")
    cfg = _grown_config(src.cfg, grown, top_k, dtype_name(out_dtype))
    produce = _Grower(src, shape, experts, opts)

    def tensors() -> Iterator[tuple[Entry, torch.Tensor]]:
        bar = tqdm(total=shape.shapes.num_layers, desc="grow", unit="layer", disable=not progress)
        for entry in entries:
            if entry.kind == "experts":
                for n in range(grown):
                    yield entry, fused_expert_slice(entry, n, produce.expert_tensors, produce._held_down,
                                                    out_dtype).to(out_dtype)
            else:
                yield entry, produce(entry).to(out_dtype)
            if entry.role == "down" and entry.kind != "shared" and entry.expert in (-1, grown - 1):
                bar.update(1)
        bar.close()

    options = {**asdict(opts), "top_k": top_k, "format": shape.fmt, "dtype": dtype_name(out_dtype),
               "source_experts": shape.num_experts, "source_top_k": shape.top_k}
    with single_thread(), publish_dir(output, force=force, inputs=[source]) as tmp:
        shards = write_shards(tmp, entries, tensors(), out_dtype, opts.max_shard_size)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(src.directory, tmp)
        # what `upcycle check OUT --dense SOURCE` holds the result to: the source's function, when r = 0 and top-k
        # grew with the experts
        preserving = opts.ratio == 0 and top_k == opts.factor * shape.top_k
        write_manifest(tmp, [src.record], {"command": "grow", **options}, produce.layers, produce.redrawn_LEMF,
                       shards, {"function_preserving": preserving})
    return output
