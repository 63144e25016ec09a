"""`upcycle convert`: a dense HF checkpoint -> an HF MoE checkpoint (Mixtral, Qwen2-MoE or Qwen3-MoE).

Streaming: one layer at a time, one expert at a time. Every input tensor is read lazily from the source's safetensors
files and every output tensor is streamed into pre-planned shards, so peak memory is about one dense FFN plus one
expert, whatever the depth of the model.

Output layout, decided before any byte is written (`layout`), is the single source of truth: the shard plan is made
from it and the producer walks it in order, computing each tensor when its turn comes.

Run: `upcycle convert DENSE_DIR OUT_DIR --method drop --ratio 0.5 --num-experts 8 --top-k 2`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import upcycle
from upcycle.formats import hf_formats as hf
from upcycle.convert.calibration import data_router_rows
from upcycle.convert.options import (
    ConversionPlan,
    ConvertOptions,
    Estimate,
    estimate,
    shapes_as_config,
    writes_lm_head,
)
from upcycle.data.prepare import calibration_token_ids
from upcycle.errors import UpcycleError
from upcycle.formats.model_card import write_card
from upcycle.files import check_output, publish_dir
from upcycle.formats.safetensors_io import (
    DTYPE_NAMES,
    CheckpointReader,
    PlannedTensor,
    ShardWriter,
    dtype_name,
    parse_size,
    save_tensors,
)
from upcycle.formats.tensor_sources import NamedTensors
from upcycle.convert.upcycling import (
    MATRICES,
    btx_mean,
    dense_shared_expert,
    derived_generator,
    fine_grained_slice,
    granular_scale,
    init_router,
    init_shared_expert,
    scratch_tensor,
    segment_neurons,
    upcycle_expert,
    virtual_group_router,
)

MANIFEST_NAME = "upcycle_manifest.json"
REDRAWN_NAME = "upcycle_redrawn.safetensors"
COPIED_FILES = hf.TOKENIZER_FILES


# --------------------------------------------------------------------------------------------------------------------
# Validating the source(s)


def _expected_dense_tensors(shapes: hf.Shapes) -> dict[str, tuple[int, ...]]:
    expected = {hf.EMBED_KEY: (shapes.vocab_size, shapes.dim), hf.FINAL_NORM_KEY: (shapes.dim,)}
    if not shapes.tie_embeddings:
        expected[hf.LM_HEAD_KEY] = (shapes.vocab_size, shapes.dim)
    for layer in range(shapes.num_layers):
        for role, shape in hf.attention_roles(shapes).items():
            expected[hf.attention_key(layer, role)] = shape
        for m in MATRICES:
            expected[hf.dense_ffn_key(layer, m)] = hf.ffn_shape(shapes, m)
    return expected


def check_dense_source(reader: CheckpointReader) -> hf.Shapes:
    """Every expected tensor present with its shape, nothing unknown: before any output is written."""
    hf.check_dense_config(reader.config)
    shapes = hf.read_shapes(reader.config)
    expected = _expected_dense_tensors(shapes)
    for name, shape in expected.items():
        if name not in reader.tensors:
            what = "FFN tensor" if ".mlp." in name else "tensor"
            raise UpcycleError(f"{reader.dir} lacks {what} {name}; the checkpoint is incomplete or not a dense "
                               f"{reader.config['model_type']} model")
        if reader.shape(name) != shape:
            raise UpcycleError(f"{name} in {reader.dir} has shape {list(reader.shape(name))}, config.json implies "
                               f"{list(shape)}; config and weights disagree")
        if not reader.dtype(name).is_floating_point:
            raise UpcycleError(f"{name} in {reader.dir} is {reader.dtype(name)}; quantized checkpoints are not "
                               "supported, dequantize to float first")
    ignored = hf.LM_HEAD_KEY if shapes.tie_embeddings else None
    unknown = [n for n in reader.tensors
               if n not in expected and n != ignored and not n.endswith(hf.IGNORED_SUFFIXES)]
    if unknown:
        raise UpcycleError(f"{reader.dir} has tensors a plain {reader.config['model_type']} model does not "
                           f"({', '.join(sorted(unknown)[:3])}{', ...' if len(unknown) > 3 else ''}); not supported")
    return shapes


def _check_btx_sources(first: CheckpointReader, others: list[CheckpointReader], shapes: hf.Shapes) -> None:
    for other in others:
        other_shapes = check_dense_source(other)
        if other.config.get("model_type") != first.config.get("model_type") or other_shapes != shapes:
            raise UpcycleError(f"btx source {other.dir} differs in shape or family from {first.dir}; all btx sources "
                               "must be continued from the same dense seed")


# --------------------------------------------------------------------------------------------------------------------
# The output layout: one ordered list, from which both the shard plan and the producer are made.


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    kind: str  # embed | final_norm | lm_head | attn | dense_ffn | router | router_bias | expert | experts | shared
    layer: int = -1
    role: str = ""  # attention role, FFN matrix (gate_up for a tensor holding gate and up), or shared-expert part
    expert: int = -1  # kind expert; kind experts holds every expert of the layer, written one expert at a time


def layout(shapes: hf.Shapes, fmt: str, num_experts: int, shared_dim: int, expert_dim: int,
            moe_layers: tuple[int, ...] | None = None) -> list[Entry]:
    """The output's tensors in writing order. `shapes` are the dense model's (its FFN size is the dense layers');
    every expert has `expert_dim` neurons, the shared expert `shared_dim` (0: none)."""
    out_shapes = hf.read_shapes({**shapes_as_config(shapes), "model_type": fmt})
    entries = [Entry(hf.EMBED_KEY, (shapes.vocab_size, shapes.dim), "embed")]
    for layer in range(shapes.num_layers):
        for role, shape in hf.attention_roles(out_shapes).items():
            entries.append(Entry(hf.attention_key(layer, role), shape, "attn", layer, role))
        if moe_layers is not None and layer not in moe_layers:  # stays dense: its FFN is copied
            entries += [Entry(hf.dense_ffn_key(layer, m), hf.ffn_shape(shapes, m), "dense_ffn", layer, m)
                        for m in MATRICES]
            continue
        entries.append(Entry(hf.router_key(fmt, layer), (num_experts, shapes.dim), "router", layer))
        if fmt in hf.SIGMOID_FORMATS:  # the balancing bias, zero: it steers nothing until training moves it
            entries.append(Entry(hf.router_bias_key(layer), (num_experts,), "router_bias", layer))
        for key, shape, e, m in hf.stored_experts(fmt, layer, num_experts, shapes.dim, expert_dim):
            entries.append(Entry(key, shape, "expert" if e >= 0 else "experts", layer, m, e))
        for role, (key, shape) in hf.shared_expert_layout(fmt, layer, shapes.dim, shared_dim).items():
            entries.append(Entry(key, shape, "shared", layer, role))
    entries.append(Entry(hf.FINAL_NORM_KEY, (shapes.dim,), "final_norm"))
    if writes_lm_head(shapes, fmt):
        entries.append(Entry(hf.LM_HEAD_KEY, (shapes.vocab_size, shapes.dim), "lm_head"))
    return entries


# --------------------------------------------------------------------------------------------------------------------
# Producing the tensors


@dataclass
class _Record:
    """What the manifest says about the conversion, filled while producing."""

    layers: dict[int, dict] = field(default_factory=dict)  # MoE layer -> its record
    redrawn_LEMF: np.ndarray | None = None  # (L, E, 3, F / G) bool
    calibration: object | None = None  # calibration.RouterCalibration for --router-init data

    def layer(self, index: int) -> dict:
        """The record of MoE layer `index`, started when first needed (a lazy conversion may produce a layer's experts
        without its router)."""
        return self.layers.setdefault(index, {"layer": index, "experts": []})


_ROLE_KIND = {"attn_norm": "norm", "ffn_norm": "norm", "q_norm": "norm", "k_norm": "norm",
              "q_bias": "bias", "k_bias": "bias", "v_bias": "bias", "o_bias": "bias"}


def _finite(reader: CheckpointReader, name: str) -> torch.Tensor:
    tensor = reader.get(name)
    if not torch.isfinite(tensor).all():
        raise UpcycleError(f"{name} in {reader.dir} holds NaN or Inf values; the source checkpoint is damaged, "
                           "re-save or re-download it")
    return tensor


def fused_expert_slice(entry: Entry, e: int, expert_tensors: Callable[[int, int], dict[str, torch.Tensor]],
                       held_down: dict[int, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """Expert e's part [1, ...] of a tensor holding every expert of the layer (Granite: gate_up [E, 2F, D], gate rows
    first, then down [E, D, F]). Each expert is computed once (`expert_tensors(layer, e)`), while gate_up is written;
    its down projection is held in `held_down` (in the output dtype) until the layer's down tensor is written."""
    if entry.role == "down":
        return held_down.pop(e).unsqueeze(0)
    tensors = expert_tensors(entry.layer, e)
    held_down[e] = tensors["down"].to(out_dtype)
    return torch.cat([tensors["gate"], tensors["up"]]).unsqueeze(0)


class _Producer:
    """Computes each output tensor (fp32) when its entry comes up, reading only what that tensor needs."""

    def __init__(self, readers: list[CheckpointReader], shapes: hf.Shapes, opts: ConvertOptions,
                 plan: ConversionPlan, record: _Record, fmt: str, shared_dim: int = 0):
        self.readers = readers
        self.plan = plan
        self.fmt = fmt
        self.shared_dim = shared_dim
        self.shapes = shapes
        self.opts = opts
        self.record = record
        cfg = readers[0].config
        self.init_std = float(cfg.get("initializer_range", 0.02))
        self.pad_id = cfg.get("pad_token_id")
        self.upcycle_opts = opts.upcycle_options(self.init_std)
        # fine-grained experts: expert e is segment e % R of copy e // R, R = opts.routed_segments (segments 1..G-1 when
        # segment 0 is the dense shared expert), its down projection scaled by R (granular_scale); a whole FFN as the
        # shared expert weighs 1/2 against the routed mixture's 1/2
        self.scale = (granular_scale(opts.routed_segments)
                      if opts.granularity > 1 and opts.method != "scratch" else 1.0)
        if plan.shared_source is not None:
            self.scale *= 0.5
        self._segments: tuple[int, torch.Tensor] | None = None  # (layer, (G, F/G) neuron indices)
        self._dense_ffn: dict[tuple[int, int | None], dict[str, torch.Tensor]] = {}  # only the current layer's
        self._expert = None  # (layer, expert, tensors) cache while its matrices are written
        self._held_down: dict[int, torch.Tensor] = {}  # experts' down projections held for a tensor of all experts
        self._shared_cache = None  # (layer, role -> tensor) of the current layer's shared expert

    def _read(self, name: str, source: int | None = None) -> torch.Tensor:
        """The source tensor (or, when `source` is None, the base's: the mean over the base sources when there are
        several), checked finite as it streams (a NaN or Inf fails the conversion, whose output is then never
        published)."""
        if source is not None:
            return _finite(self.readers[source], name).float()
        if len(self.plan.base) > 1:
            return btx_mean([_finite(self.readers[i], name) for i in self.plan.base])
        return _finite(self.readers[self.plan.base[0]], name).float()

    def _copied(self, entry: Entry, kind: str) -> torch.Tensor:
        if self.opts.method == "scratch":
            gen = derived_generator(self.opts.seed, "scratch", entry.name)
            return scratch_tensor(entry.shape, kind, std=self.init_std, generator=gen,
                                  padding_idx=self.pad_id if kind == "embedding" else None)
        if entry.name not in self.readers[self.plan.base[0]].tensors:
            return torch.zeros(entry.shape)  # a bias the target format forces on a source without one
        return self._read(entry.name)

    def _dense(self, layer: int, source: int | None) -> dict[str, torch.Tensor]:
        """A dense FFN of `layer`: of reader `source`, or of the base (None)."""
        if source is None and len(self.plan.base) == 1:
            source = self.plan.base[0]
        key = (layer, source)
        if key not in self._dense_ffn:
            self._dense_ffn = {key: {m: self._read(hf.dense_ffn_key(layer, m), source) for m in MATRICES}}
        return self._dense_ffn[key]

    def _expert_tensors(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """Expert e of `layer` (gate, up, down; fp32), computed once while its matrices are written."""
        if self._expert is None or self._expert[:2] != (layer, e):
            r = self.opts.routed_segments
            copy = self.plan.copies[e // r]
            dense = self._dense(layer, copy.source)
            segment = {}
            matrices = (dense["gate"], dense["up"], dense["down"])
            if self.opts.granularity > 1 or self.scale != 1.0:
                s = e % r + self.opts.shared_dense
                matrices = fine_grained_slice(*matrices, self._segment_neurons(layer)[s], self.scale)
                if self.opts.granularity > 1:
                    segment = {"copy": e // r, "segment": s}
            opts = dataclasses.replace(self.upcycle_opts, method=copy.method, ratio=copy.ratio,
                                       index_mode=copy.index_mode)
            x = upcycle_expert(*matrices, layer=layer, expert=e, opts=opts)
            source = {"source": copy.source} if len(self.readers) > 1 else {}
            self.record.layer(layer)["experts"].append({"expert": e, **source, **segment, **x.records})
            self.record.redrawn_LEMF[layer, e] = x.redrawn_MF.numpy()
            self._expert = (layer, e, {"gate": x.gate_FD, "up": x.up_FD, "down": x.down_DF})
        return self._expert[2]

    def _expert_matrix(self, entry: Entry) -> torch.Tensor:
        return self._expert_tensors(entry.layer, entry.expert)[entry.role]

    def expert_slice(self, entry: Entry, e: int, out_dtype: torch.dtype) -> torch.Tensor:
        return fused_expert_slice(entry, e, self._expert_tensors, self._held_down, out_dtype)

    def experts(self, entry: Entry, indices: range) -> torch.Tensor:
        """Experts `indices` of a tensor that holds every expert (kind experts), stacked: for a lazy conversion, which
        computes what it is asked for in any order (a streamed one writes the slices in turn, expert_slice)."""
        parts = []
        for e in indices:
            tensors = self._expert_tensors(entry.layer, e)
            parts.append(torch.cat([tensors["gate"], tensors["up"]]) if entry.role == "gate_up" else tensors["down"])
        return torch.stack(parts)

    def _segment_neurons(self, layer: int) -> torch.Tensor:
        if self._segments is None or self._segments[0] != layer:
            neurons = segment_neurons(self.shapes.ffn_dim, self.opts.granularity, seed=self.opts.seed, layer=layer)
            if self.opts.granularity > 1:
                self.record.layer(layer)["segments"] = neurons.tolist()
            self._segments = (layer, neurons)
        return self._segments[1]

    def _shared(self, entry: Entry) -> torch.Tensor:
        # The shared expert: contributing exactly nothing at initialization (init_shared_expert); with --shared-expert
        # dense, segment 0 of the base's dense FFN, never re-drawn (dense_shared_expert); or a source's whole FFN
        # weighing 1/2 (compose's shared_expert: {source: ...})
        if self._shared_cache is None or self._shared_cache[0] != entry.layer:
            layer, gated = entry.layer, hf.GATED_SHARED_EXPERT[self.fmt]
            if self.opts.shared_dense or self.plan.shared_source is not None:
                if self.plan.shared_source is not None:
                    dense, neurons, scale = self._dense(layer, self.plan.shared_source), None, 0.5
                    self.record.layer(layer)["shared_expert"] = {"source": self.plan.shared_source}
                else:
                    dense, neurons, scale = self._dense(layer, None), self._segment_neurons(layer)[0], 1.0
                    self.record.layer(layer)["shared_expert"] = {"segment": 0}
                tensors = dense_shared_expert(dense["gate"], dense["up"], dense["down"], neurons, scale=scale,
                                              gated=gated, seed=self.opts.seed, layer=layer)
                self.record.layer(layer)["shared_expert"]["down_scale"] = (2.0 if gated else 1.0) * scale
            else:
                shapes = {role: shape for role, (_, shape) in
                          hf.shared_expert_layout(self.fmt, layer, self.shapes.dim, self.shared_dim).items()}
                if "shared_gate_up" in shapes:  # drawn as gate and up, stored as one tensor
                    half = (shapes["shared_gate_up"][0] // 2, self.shapes.dim)
                    shapes = {"shared_gate": half, "shared_up": half, "shared_down": shapes["shared_down"]}
                tensors = init_shared_expert(shapes, std=self.init_std, seed=self.opts.seed, layer=layer)
            if self.fmt == "granitemoeshared":  # gate and up stored as one tensor, gate rows first
                tensors["shared_gate_up"] = torch.cat([tensors.pop("shared_gate"), tensors.pop("shared_up")])
            self._shared_cache = (layer, tensors)
        return self._shared_cache[1][entry.role]

    def _router(self, layer: int) -> torch.Tensor:
        self.record.layer(layer)
        if self.plan.router_rows is not None:  # computed before the conversion: one row per copy
            router = self.plan.router_rows[layer]
            if self.record.calibration is not None:
                self.record.layer(layer)["router_cluster_sizes"] = self.record.calibration.cluster_sizes[layer]
        else:  # one random row per copy of the dense FFN
            gen = derived_generator(self.opts.seed, layer, "router")
            router = init_router(len(self.plan.copies), self.shapes.dim, kind=self.opts.router_init,
                                 std=self.opts.router_std, generator=gen)
        return virtual_group_router(router, self.opts.routed_segments)

    def __call__(self, entry: Entry) -> torch.Tensor:
        if entry.kind == "embed":
            return self._copied(entry, "embedding")
        if entry.kind in ("final_norm",):
            return self._copied(entry, "norm")
        if entry.kind == "lm_head":
            if self.shapes.tie_embeddings:  # an untied copy of the embeddings (hf_formats.untied_head)
                return self._copied(Entry(hf.EMBED_KEY, entry.shape, "embed"), "embedding")
            return self._copied(entry, "weight")
        if entry.kind in ("attn", "dense_ffn"):
            return self._copied(entry, _ROLE_KIND.get(entry.role, "weight"))
        if entry.kind == "router":
            return self._router(entry.layer)
        if entry.kind == "router_bias":
            return torch.zeros(entry.shape)
        if entry.kind == "expert":
            return self._expert_matrix(entry)
        if entry.kind == "experts":
            return self.experts(entry, range(entry.shape[0]))
        if entry.kind == "shared":
            return self._shared(entry)
        raise AssertionError(entry.kind)


# --------------------------------------------------------------------------------------------------------------------
# The conversion


def _open_sources(source: str | os.PathLike, opts: ConvertOptions) -> tuple[list[CheckpointReader], hf.Shapes, str]:
    opts.validate()
    first = CheckpointReader(source)
    shapes = check_dense_source(first)
    readers = [first]
    if opts.method == "btx":
        readers += [CheckpointReader(s) for s in opts.btx_sources]
        _check_btx_sources(first, readers[1:], shapes)
    fmt = hf.resolve_format(first.config, opts.format)
    opts.check_source(shapes, fmt, dtype_name(_out_dtype(opts, first)))
    if opts.router_init == "data":  # the text is there (cheap, before any work); clustering comes in _generate
        calibration_token_ids(opts.calibration, first.dir, opts.calibration_tokens, vocab_size=shapes.vocab_size)
    return readers, shapes, fmt


# --------------------------------------------------------------------------------------------------------------------
# Whether a conversion fits: its estimate (convert_options.estimate) against the memory and disk at hand


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _free_disk_bytes(path: Path) -> int:
    while not path.exists():  # the nearest existing ancestor: OUTPUT and its parents may not exist yet
        path = path.parent
    return shutil.disk_usage(path).free


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def check_fits(need: Estimate, output: Path | None, smaller: str) -> None:
    """Refuse, before any work, a conversion that cannot fit in memory or (when writing) on disk; `smaller` names how
    to make it smaller (e.g. "use fewer --num-experts")."""
    available = _available_memory_bytes()
    if available is not None and need.memory_bytes > available:
        raise UpcycleError(f"this conversion needs about {_gb(need.memory_bytes)} of memory, {_gb(available)} is "
                           f"available; {smaller}")
    if output is not None:
        free = _free_disk_bytes(output.parent)
        if need.output_bytes > free:
            raise UpcycleError(f"OUTPUT {output} needs about {_gb(need.output_bytes)} of disk, {_gb(free)} is free "
                               f"there; free some space, choose another OUTPUT or {smaller}")


def _out_dtype(opts: ConvertOptions, reader: CheckpointReader) -> torch.dtype:
    if opts.dtype != "auto":
        return DTYPE_NAMES[opts.dtype]
    return reader.dtype(hf.EMBED_KEY)


def check_alignment(readers: list[CheckpointReader], shapes: hf.Shapes, opts: ConvertOptions) -> None:
    """`ConvertOptions.check_alignment` in the dtype the output is written in (--dtype, or the source's)."""
    opts.check_alignment(shapes, dtype_name(_out_dtype(opts, readers[0])))


def _estimate_for(readers, shapes: hf.Shapes, fmt: str, opts: ConvertOptions) -> Estimate:
    value_bytes = torch.empty((), dtype=_out_dtype(opts, readers[0])).element_size()
    return estimate(shapes, fmt, opts, value_bytes, num_sources=len(readers))


def _generate(readers, shapes, fmt, opts: ConvertOptions, plan: ConversionPlan, progress: bool, calibration=None
              ) -> tuple[list[Entry], Iterator, _Record, dict, _Producer]:
    """The output's layout, its tensors (in layout order, computed as they are drawn), the manifest record they fill,
    the config.json and the producer. `calibration`: `router_calibration`'s result when it was computed elsewhere."""
    moe_layers = opts.check_source(shapes, fmt)
    shared_dim = _shared_dim(shapes, fmt, opts, plan)
    out_dtype = _out_dtype(opts, readers[0])
    moe_config = _moe_config(readers, shapes, fmt, opts, plan)
    expert_dim = shapes.ffn_dim // opts.granularity
    entries = layout(shapes, fmt, opts.num_experts, shared_dim, expert_dim, moe_layers)
    record = _Record(redrawn_LEMF=np.zeros((shapes.num_layers, opts.num_experts, len(MATRICES), expert_dim),
                                           dtype=bool))
    if opts.router_init == "data" and plan.router_rows is None:  # runs the dense model once, before any tensor
        record.calibration = calibration or _calibrate(readers, opts, moe_layers, plan)
        plan = dataclasses.replace(plan, router_rows=record.calibration.rows)
    produce = _Producer(readers, shapes, opts, plan, record, fmt, shared_dim)

    def tensors() -> Iterator[tuple[Entry, torch.Tensor]]:
        """(entry, tensor) in layout order; a tensor that holds every expert comes as one slice per expert."""
        bar = tqdm(total=shapes.num_layers, desc="convert", unit="layer", disable=not progress)
        for entry in entries:
            if entry.kind == "experts":
                for e in range(opts.num_experts):
                    yield entry, produce.expert_slice(entry, e, out_dtype).to(out_dtype)
            else:
                yield entry, produce(entry).to(out_dtype)
            if entry.role == "down" and entry.kind != "shared" and entry.expert in (-1, opts.num_experts - 1):
                bar.update(1)
        bar.close()

    return entries, tensors(), record, moe_config, produce


def _collect(tensors: Iterator[tuple[Entry, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The generated tensors by name, the slices of a tensor that holds every expert joined."""
    parts: dict[str, list[torch.Tensor]] = {}
    for entry, tensor in tensors:
        parts.setdefault(entry.name, []).append(tensor)
    return {name: p[0] if len(p) == 1 else torch.cat(p) for name, p in parts.items()}


def _shared_dim(shapes: hf.Shapes, fmt: str, opts: ConvertOptions, plan: ConversionPlan) -> int:
    return shapes.ffn_dim if plan.shared_source is not None else opts.shared_dim(shapes, fmt)


def _moe_config(readers, shapes: hf.Shapes, fmt: str, opts: ConvertOptions, plan: ConversionPlan) -> dict:
    return hf.build_moe_config(
        readers[0].config, fmt, num_experts=opts.num_experts, top_k=opts.top_k,
        router_aux_loss_coef=opts.router_aux_loss_coef,
        shared_expert_dim=_shared_dim(shapes, fmt, opts, plan) or None,
        dtype=dtype_name(_out_dtype(opts, readers[0])), expert_ffn_dim=shapes.ffn_dim // opts.granularity,
        moe_layers=opts.check_source(shapes, fmt), renormalize=opts.renormalize,
    )


def planned_moe_config(source: str | os.PathLike, **options) -> tuple[dict, bool]:
    """(the config.json a conversion of `source` writes, whether its shared expert is live), from the source's config
    and file headers alone: no tensor is produced and no calibration runs. A shared expert is live with
    `--shared-expert dense`; the zero one adds nothing, and loading drops it."""
    opts = _options(options)
    readers, shapes, fmt = _open_sources(source, opts)
    return (_moe_config(readers, shapes, fmt, opts, opts.plan(len(readers))),
            fmt in hf.SHARED_EXPERT_FORMATS and opts.shared_dense)


def _calibrate(readers, opts: ConvertOptions, moe_layers: tuple[int, ...], plan: ConversionPlan):
    return data_router_rows(readers[plan.base[0]].dir, opts.calibration, max_tokens=opts.calibration_tokens,
                            copies=len(plan.copies), layers=moe_layers, seed=opts.seed, std=opts.router_std)


def router_calibration(source: str | os.PathLike, **options):
    """The k-means router rows of `--router-init data` (calibration.RouterCalibration) for this conversion, or None for
    any other router init: computed once (the dense model runs on the calibration text), then handed to `lazy_convert`
    on every rank."""
    opts = _options(options)
    if opts.router_init != "data":
        return None
    readers, shapes, fmt = _open_sources(source, opts)
    return _calibrate(readers, opts, opts.check_source(shapes, fmt), opts.plan(len(readers)))


class LazyConversion(NamedTensors):
    """The output of a conversion as a TensorSource (a read-only mapping HF key -> tensor), each tensor computed when it
    is looked up from the dense tensors it comes from (the same code and seeds as `convert`, so the same values),
    nothing kept. `shape(key)` answers without computing; `read_rows(key, rows)` computes only those rows (of a tensor
    that holds every expert, only those experts)."""

    def __init__(self, entries: list[Entry], produce: _Producer, dtype: torch.dtype):
        self._entries = {entry.name: entry for entry in entries}
        self._produce, self._dtype = produce, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._produce(self._entries[name]).to(self._dtype)

    def read_rows(self, name: str, rows: slice) -> torch.Tensor:
        entry = self._entries[name]
        if entry.kind != "experts":
            return self[name][rows]
        return self._produce.experts(entry, range(entry.shape[0])[rows]).to(self._dtype)

    def _names(self) -> Mapping[str, object]:
        return self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape


def lazy_convert(source: str | os.PathLike, *, router_rows=None, **options) -> tuple[dict, LazyConversion]:
    """The same conversion as `convert`, as (MoE config.json as a dict, LazyConversion): for online upcycling, where
    each rank computes only the tensors (and experts) it keeps. `router_rows`: `router_calibration`'s result, computed
    once and shared; with `--router-init data` and none given, it is computed here."""
    opts = _options(options)
    readers, shapes, fmt = _open_sources(source, opts)
    entries, _, _, moe_config, produce = _generate(readers, shapes, fmt, opts, opts.plan(len(readers)),
                                                   progress=False, calibration=router_rows)
    return moe_config, LazyConversion(entries, produce, _out_dtype(opts, readers[0]))


def _options(options: dict) -> ConvertOptions:
    return ConvertOptions(**{k: tuple(v) if k == "btx_sources" else v for k, v in options.items()})


def convert_in_memory(source: str | os.PathLike, **options) -> tuple[dict, dict[str, torch.Tensor]]:
    """The same conversion as `convert`, kept in memory: (MoE config.json as a dict, HF-keyed state dict).

    For online upcycling in training, where the whole model is in memory anyway.
    """
    opts = ConvertOptions(**{k: tuple(v) if k == "btx_sources" else v for k, v in options.items()})
    readers, shapes, fmt = _open_sources(source, opts)
    need = _estimate_for(readers, shapes, fmt, opts)
    check_fits(Estimate(need.output_bytes, need.memory_bytes + need.output_bytes), None,  # all kept in memory
               _smaller(opts))
    _, tensors, _, moe_config, _ = _generate(readers, shapes, fmt, opts, opts.plan(len(readers)), progress=False)
    return moe_config, _collect(tensors)


def convert(
    source: str | os.PathLike, output: str | os.PathLike, *, force: bool = False, progress: bool = True, **options
) -> Path:
    """Convert the dense checkpoint at `source` into an MoE checkpoint at `output`; returns the output path.

    `options` are the fields of `ConvertOptions`. All inputs are validated before anything is written; the result is
    written into a temporary sibling directory and renamed into place only when complete.
    """
    opts = ConvertOptions(**{k: tuple(v) if k == "btx_sources" else v for k, v in options.items()})
    inputs = [source, *opts.input_paths()]
    output = check_output(output, force=force, inputs=inputs)
    readers, shapes, fmt = _open_sources(source, opts)
    # before the plan, which holds a record per copy: an absurd --num-experts is refused at once, not after
    # building a billion of them
    check_conversion_fits(readers, shapes, fmt, opts, output)
    return write_moe(readers, shapes, fmt, opts, opts.plan(len(readers)), output, force=force, inputs=inputs,
                     progress=progress, options=_manifest_options(opts, fmt))


def write_moe(readers: list[CheckpointReader], shapes: hf.Shapes, fmt: str, opts: ConvertOptions,
              plan: ConversionPlan, output: Path, *, force: bool, inputs: list, progress: bool, options: dict,
              finish: Callable[[Path, dict], dict] | None = None) -> Path:
    """The MoE that `plan` describes, from validated sources, published atomically at `output` (convert and compose).

    `options` go into the manifest as they are; `finish(directory, moe_config)`, called once the weights are written,
    returns more manifest fields (compose measures the routing of the finished model there)."""
    check_conversion_fits(readers, shapes, fmt, opts, output)
    with single_thread(), publish_dir(output, force=force, inputs=inputs) as tmp:
        entries, tensors, record, moe_config, _ = _generate(readers, shapes, fmt, opts, plan, progress)
        shards = write_shards(tmp, entries, tensors, DTYPE_NAMES[moe_config["dtype"]], opts.max_shard_size)
        (tmp / "config.json").write_text(json.dumps(moe_config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(readers[plan.base[0]].dir, tmp)
        extra = finish(tmp, moe_config) if finish is not None else {}
        if record.calibration is not None:
            extra = {"calibration_tokens_used": record.calibration.tokens, **extra}
        write_manifest(tmp, [source_record(r) for r in readers], {**options, "dtype": moe_config["dtype"]},
                       record.layers, record.redrawn_LEMF, shards, extra)
    return output


def check_conversion_fits(readers: list[CheckpointReader], shapes: hf.Shapes, fmt: str, opts: ConvertOptions,
                          output: Path) -> None:
    """Refuse, before any work, a conversion whose experts transformers cannot run in the output dtype
    (`ConvertOptions.check_alignment`), or whose output or peak memory cannot fit (`estimate`)."""
    check_alignment(readers, shapes, opts)
    need = _estimate_for(readers, shapes, fmt, opts)
    check_fits(need, output, _smaller(opts, need, lambda: _estimate_for(
        readers, shapes, fmt, dataclasses.replace(opts, shared_expert_dim=None))))


def _smaller(opts: ConvertOptions, need: Estimate | None = None, without_shared: Callable[[], Estimate] | None = None
             ) -> str:
    """How to make a conversion smaller: fewer experts, or a smaller shared expert where --shared-expert-dim accounts
    for most of `need` (`without_shared`: the estimate at the format's default shared expert)."""
    if opts.shared_expert_dim is not None and need is not None and without_shared is not None:
        base = without_shared()
        if need.memory_bytes > 2 * base.memory_bytes or need.output_bytes > 2 * base.output_bytes:
            return f"use a smaller --shared-expert-dim than {opts.shared_expert_dim}"
    return f"use fewer --num-experts than {opts.num_experts}"


def _manifest_options(opts: ConvertOptions, fmt: str) -> dict:
    """Every option of a conversion, with format resolved and paths made absolute (dtype is resolved by _write)."""
    return {**asdict(opts), "format": fmt, "btx_sources": [str(Path(s).absolute()) for s in opts.btx_sources],
            "calibration": str(Path(opts.calibration).absolute()) if opts.calibration else None}


@contextlib.contextmanager
def single_thread():
    """Conversion is copies, index gathers and sampling over a few MB at a time: memory-bound work that extra intra-op
    threads only slow down. Measured on 2 cores (16 layers, 1.2 GB output): 2.0-2.6 s wall with one thread, 3.7-24.6 s
    with two when another process was busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_shards(directory: Path, entries: list[Entry], tensors: Iterator[tuple[Entry, torch.Tensor]],
                 dtype: torch.dtype, max_shard_size: str) -> list[str]:
    """Stream the tensors, in layout order, into planned shards under `directory`; returns the shard file names."""
    plan = [PlannedTensor(e.name, e.shape, dtype) for e in entries]
    writer = ShardWriter(directory, plan, parse_size(max_shard_size))
    for entry, tensor in tensors:
        writer.write(entry.name, tensor)
    return writer.close()


def copy_tokenizer_files(source: Path, directory: Path) -> None:
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def source_record(reader: CheckpointReader) -> dict:
    """What the manifest says about one input: its path, model_type and the sha256 of its files."""
    return {"path": str(reader.dir.absolute()), "model_type": reader.config.get("model_type"),
            "sha256": reader.sha256()}


def write_manifest(directory: Path, sources: list[dict], options: dict, layers: dict[int, dict],
                   redrawn_LEMF: np.ndarray, shards: list[str], extra: dict) -> None:
    """upcycle_manifest.json and the re-drawn neuron masks (upcycle_redrawn.safetensors), for convert, compose and
    grow alike."""
    packed = np.packbits(redrawn_LEMF, axis=-1)  # (L, E, 3, ceil(F / 8)), bit order big-endian as numpy's default
    save_tensors(directory / REDRAWN_NAME, {"redrawn_packed": torch.from_numpy(packed)},
                 metadata={"ffn_dim": str(redrawn_LEMF.shape[-1]), "matrices": ",".join(MATRICES),
                           "layout": "layer,expert,matrix,neuron bits (numpy.packbits, big-endian)"})
    # Each fact once: every option (method, seed, index_mode, num_experts, ... with format and dtype resolved) under
    # "options", the inputs under "sources", the output files, then what was done per layer and expert.
    manifest = {
        "tool": "upcycle",
        "version": upcycle.__version__,
        "options": options,
        "sources": sources,
        "shards": shards,
        "redrawn_file": REDRAWN_NAME,
        "layers": [layers[i] for i in sorted(layers)],
        **extra,
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    command = options.get("command", "convert")
    method = options.get("method") if command == "convert" else command
    detail = (f"method {options.get('method')}, ratio {options.get('ratio')}, index mode {options.get('index_mode')}, "
              f"seed {options.get('seed')}") if command == "convert" else f"`upcycle {command}`"
    write_card(directory, what=f"A Mixture-of-Experts written by `upcycle {command}` ({detail}) from the sources "
                               "below.", provenance={"options": options, "sources": sources, "method": method})


def load_redrawn(directory: str | os.PathLike) -> torch.Tensor:
    """The re-drawn neuron masks of a conversion: bool (layers, experts, 3 [gate, up, down], expert ffn_dim); with
    --granularity G, neuron j of expert e is dense neuron `segments[s][j]` of the layer's manifest record, s the
    expert's `segment` there."""
    from safetensors import safe_open

    path = Path(directory) / REDRAWN_NAME
    if not path.is_file():
        raise UpcycleError(f"{directory} has no {REDRAWN_NAME}; was it written by upcycle convert?")
    with safe_open(str(path), framework="pt") as f:
        packed = f.get_tensor("redrawn_packed").numpy()
        ffn_dim = int(f.metadata()["ffn_dim"])
    return torch.from_numpy(np.unpackbits(packed, axis=-1, count=ffn_dim).astype(bool))
