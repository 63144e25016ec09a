"""Hugging Face checkpoints <-> our model, and the `upcycle export` command.

Reading: dense llama/mistral/qwen2/qwen3 and MoE mixtral/qwen2_moe/qwen3_moe/granitemoeshared/granitemoe/glm4_moe
checkpoints, experts stored per expert (what transformers' save_pretrained writes for Mixtral, Qwen-MoE and GLM-4-MoE)
or fused
(`mlp.experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]; Granite's `input_linear`/`output_linear`).
Files are opened lazily with safetensors (one file or an index of shards); pickles are never loaded. Every tensor is
shape-checked and every key of the checkpoint must be used: unknown keys are errors, not silently dropped.

Writing: a dense model becomes llama/qwen2/qwen3, an MoE mixtral/qwen2_moe/qwen3_moe/glm4_moe (per-expert keys;
glm4_moe with its routers' balancing bias) or granitemoeshared/granitemoe (their fused keys), with a config.json that
transformers 5.24 AutoModelForCausalLM loads. All HF key names come from hf_formats.py.

Our own checkpoints (written by the trainer) are a directory with model.safetensors (our state dict) and config.json
holding our ModelConfig under "model"; `load_model` reads either kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from upcycle.formats import hf_formats as hf
from upcycle.formats.training_checkpoint import CheckpointTensors, model_config_of, model_config_record
from upcycle.config import build
from upcycle.errors import UpcycleError
from upcycle.files import publish_dir, read_json
from upcycle.formats.model_card import write_card
from upcycle.model.transformer import Block, ModelConfig, Transformer, rope_inv_freq, rope_tables
from upcycle.formats.safetensors_io import (
    DTYPE_NAMES,
    CheckpointReader,
    PlannedTensor,
    ShardWriter,
    parse_size,
    save_tensors,
)
from upcycle.formats.tensor_sources import ExpertStack, NamedTensors, Rows, Source, TensorSource, full_box
from upcycle.convert.upcycling import init_shared_expert

# Our state-dict names for the per-layer roles of hf_formats (the only place they are paired).
_OUR_ATTN = {
    "attn_norm": "attn_norm.weight", "ffn_norm": "ffn_norm.weight",
    "q": "attn.q.weight", "k": "attn.k.weight", "v": "attn.v.weight", "o": "attn.o.weight",
    "q_bias": "attn.q.bias", "k_bias": "attn.k.bias", "v_bias": "attn.v.bias", "o_bias": "attn.o.bias",
    "q_norm": "attn.q_norm.weight", "k_norm": "attn.k_norm.weight",
}
_OUR_DENSE_FFN = {"gate": "ffn.gate.weight", "up": "ffn.up.weight", "down": "ffn.down.weight"}
OUR_ROUTER, OUR_GATE_UP, OUR_DOWN = "ffn.router.weight", "ffn.gate_up_ED2F", "ffn.down_EFD"
OUR_EXPERT_BIAS = "ffn.expert_bias_E"  # the per-expert balancing bias (a buffer; glm4_moe's e_score_correction_bias)
# The shared expert (Qwen2-MoE's; Granite-MoE-Shared's has no gate), by the roles of
# hf_formats.shared_expert_layout
_OUR_SHARED = {"shared_gate": "shared.gate.weight", "shared_up": "shared.up.weight",
               "shared_down": "shared.down.weight", "shared_expert_gate": "shared_gate.weight"}


def experts_to_hf(gate_up_ED2F: Tensor, down_EFD: Tensor) -> dict[str, Tensor]:
    """Our fused expert layout -> HF-oriented per-matrix stacks: gate, up [E, F, D] and down [E, D, F] (views).
    With `experts_from_hf`, the one place where [gate | up] is split and joined."""
    F_ = down_EFD.shape[1]
    return {"gate": gate_up_ED2F[:, :, :F_].transpose(1, 2), "up": gate_up_ED2F[:, :, F_:].transpose(1, 2),
            "down": down_EFD.transpose(1, 2)}


def experts_from_hf(gate_EFD: Tensor, up_EFD: Tensor, down_EDF: Tensor) -> tuple[Tensor, Tensor]:
    """HF-oriented stacks -> our layout (gate_up_ED2F [E, D, 2F] holding [gate | up], down_EFD [E, F, D])."""
    gate_up_E2FD = torch.cat([gate_EFD, up_EFD], dim=1)  # also HF's fused gate_up_proj layout, gate rows first
    return gate_up_E2FD.transpose(1, 2).contiguous(), down_EDF.transpose(1, 2).contiguous()


# What `upcycle export --format` writes besides auto (mistral is read, never written: a Llama config holds it).
EXPORT_FORMATS = (*hf.MOE_FORMATS, *(f for f in hf.DENSE_FAMILIES if f != "mistral"))


class _Taker:
    """Takes tensors out of a checkpoint by key as Sources (tensor_sources.Rows: read when a box of them is needed,
    only the rows it spans), checking shapes, and remembers which keys were used. `tensors` is a
    safetensors_io.CheckpointReader (rows read from disk), a TensorSource, or any mapping of full tensors (e.g.
    convert's lazy output, computed when looked up)."""

    def __init__(self, tensors: TensorSource | Mapping[str, Tensor]):
        self.tensors, self.used = tensors, set()
        self._lazy = isinstance(tensors, TensorSource)  # shapes without reading; a plain mapping holds its tensors

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors.shape(key)) if self._lazy else tuple(self.tensors[key].shape)

    def take(self, key: str, shape: tuple[int, ...]) -> Rows:
        if key not in self.tensors:
            raise UpcycleError(f"checkpoint lacks tensor {key}")
        found = self._shape(key)
        if found != tuple(shape):
            raise UpcycleError(f"tensor {key} has shape {found}, expected {tuple(shape)} from config.json")
        self.used.add(key)
        if isinstance(self.tensors, CheckpointReader):
            reader = self.tensors
            return Rows(found, lambda rows: reader.get(key, rows))
        return Rows(found, lambda rows: self.tensors[key][rows])

    def check_all_used(self) -> None:
        unknown = sorted(k for k in self.tensors if k not in self.used and not k.endswith(hf.IGNORED_SUFFIXES))
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise UpcycleError(f"checkpoint has tensors this loader does not know: {', '.join(unknown[:5])}{more}")


def _take_experts(taker: _Taker, fmt: str, layer: int, config: ModelConfig) -> dict[str, Source]:
    """Router [E, D] and the expert stacks in our layout, from per-expert or fused keys, read one expert at a time."""
    E, D, Fd = config.num_experts, config.dim, config.expert_dim
    fused_router, fused_gate_up, fused_down = hf.fused_expert_keys(layer)
    router_key = hf.router_key(fmt, layer)
    # a router under neither key is named by the format's own key (the fused one only where the file uses it)
    router = taker.take(fused_router if fused_router in taker and router_key not in taker else router_key, (E, D))
    stored = hf.stored_experts(fmt, layer, E, D, Fd)
    if stored[0][2] == -1:  # Granite stores a layer's experts in two tensors: input_linear [E, 2F, D], output_linear
        (gate_up_key, _, _, _), (down_key, _, _, _) = stored
        fused_gate_up, fused_down = gate_up_key, down_key
    if fused_gate_up in taker:  # HF's fused layout: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]
        gate_up, down = taker.take(fused_gate_up, (E, 2 * Fd, D)), taker.take(fused_down, (E, D, Fd))
        gate_up_D2F = lambda e: gate_up.read_rows(slice(e, e + 1))[0].T  # noqa: E731
        down_FD = lambda e: down.read_rows(slice(e, e + 1))[0].T  # noqa: E731
    else:
        shapes = {"gate": (Fd, D), "up": (Fd, D), "down": (D, Fd)}
        per = [{m: taker.take(hf.expert_key(fmt, layer, e, m), shapes[m]) for m in hf.FFN_MATRICES} for e in range(E)]

        def gate_up_D2F(e: int) -> Tensor:
            whole = (slice(None),)
            return torch.cat([per[e]["gate"].read(whole).T, per[e]["up"].read(whole).T], dim=1)

        def down_FD(e: int) -> Tensor:
            return per[e]["down"].read((slice(None),)).T
    out = {OUR_ROUTER: router, OUR_GATE_UP: ExpertStack((E, D, 2 * Fd), gate_up_D2F),
           OUR_DOWN: ExpertStack((E, Fd, D), down_FD)}
    if fmt in hf.SIGMOID_FORMATS:  # the balancing bias, as trained (zeros when upcycle convert wrote it)
        out[OUR_EXPERT_BIAS] = taker.take(hf.router_bias_key(layer), (E,))
    return out


def _has_live_shared_expert(tensors: Mapping[str, Tensor], hf_cfg: dict, moe_layers: tuple[int, ...]) -> bool:
    """Whether a Qwen2-MoE or Granite-MoE-Shared checkpoint's shared expert contributes anything (a non-zero down
    projection in some layer). One that contributes exactly nothing (`upcycle convert --shared-expert zero`) is dropped
    on load, as before."""
    fmt, shared_dim = hf_cfg["model_type"], hf.shared_expert_dim(hf_cfg)
    keys = [hf.shared_expert_layout(fmt, i, hf_cfg["hidden_size"], shared_dim)["shared_down"][0]
            for i in moe_layers] if shared_dim else []
    return any(key in tensors and bool(torch.count_nonzero(tensors[key])) for key in keys)


def _row_range(source: Rows, start: int, count: int) -> Rows:
    """Rows start .. start + count - 1 of `source` as a Source of its own (Granite's gate and up halves)."""
    def read_rows(rows: slice) -> Tensor:
        picked = range(start, start + count)[rows]
        return source.read_rows(slice(picked.start, picked.stop, picked.step))
    return Rows((count, *source.shape[1:]), read_rows)


def _take_shared_expert(taker: _Taker, layer: int, config: ModelConfig, hf_cfg: dict) -> dict[str, Source]:
    """The shared expert as our tensors when the model has one (config.shared_expert_dim); otherwise it contributes
    nothing (_has_live_shared_expert: down projection all zeros) and is dropped."""
    shared_dim = hf.shared_expert_dim(hf_cfg)
    layout = hf.shared_expert_layout(hf_cfg["model_type"], layer, config.dim, shared_dim)
    # glm4_moe always has one, [0, D] when n_shared_experts is 0 (what transformers saves; accepted when left out)
    sources = {role: taker.take(key, shape) for role, (key, shape) in layout.items() if shared_dim or key in taker}
    if "shared_gate_up" in sources:  # Granite: gate rows, then up rows
        gate_up = sources.pop("shared_gate_up")
        sources.update(shared_gate=_row_range(gate_up, 0, shared_dim), shared_up=_row_range(gate_up, shared_dim,
                                                                                            shared_dim))
    return {_OUR_SHARED[role]: source for role, source in sources.items()} if config.shared_expert_dim else {}


def model_config_from_hf(tensors: Mapping[str, Tensor], hf_cfg: dict) -> ModelConfig:
    """Our ModelConfig for an HF checkpoint (a shared expert that contributes nothing is left out)."""
    fields = hf.read_model_fields(hf_cfg)
    if _has_live_shared_expert(tensors, hf_cfg, ModelConfig(**fields).moe_layer_ids):
        fields["shared_expert_dim"] = hf.shared_expert_dim(hf_cfg)
    return ModelConfig(**fields)


def _take_layer(taker: _Taker, i: int, config: ModelConfig, hf_cfg: dict) -> dict[str, Source]:
    """Decoder layer i's sources by our names within the layer (attn.q.weight, ffn.router.weight, ...)."""
    shapes = hf.read_shapes(hf_cfg)
    dense_shapes = dataclasses.replace(shapes, ffn_dim=config.ffn_dim)  # the dense layers' FFN (Qwen-MoE: not experts')
    family = hf_cfg["model_type"]
    sd = {_OUR_ATTN[role]: taker.take(hf.attention_key(i, role), shape)
          for role, shape in hf.attention_roles(shapes).items()}
    if i in config.moe_layer_ids:
        sd.update(_take_experts(taker, family, i, config))
        if family in hf.SHARED_EXPERT_FORMATS:
            sd.update(_take_shared_expert(taker, i, config, hf_cfg))
    else:
        for m in hf.FFN_MATRICES:
            sd[_OUR_DENSE_FFN[m]] = taker.take(hf.dense_ffn_key(i, m), hf.ffn_shape(dense_shapes, m))
    return sd


def hf_sources(tensors: Mapping[str, Tensor], hf_cfg: dict) -> tuple[ModelConfig, dict[str, Source]]:
    """Our ModelConfig and, for each of our parameters, where to read it (a tensor_sources.Source, in the checkpoint's
    dtype) from HF tensors (a safetensors_io.CheckpointReader, or any mapping) and the config.json dictionary. Every
    tensor must be used and have the shape the config implies. Nothing big is read: a rank reads the boxes it keeps
    later."""
    config = model_config_from_hf(tensors, hf_cfg)
    taker = _Taker(tensors)
    sd: dict[str, Source] = {"tok_embeddings.weight": taker.take(hf.EMBED_KEY, (config.vocab_size, config.dim)),
                             "norm.weight": taker.take(hf.FINAL_NORM_KEY, (config.dim,))}
    if not config.tie_embeddings:
        sd["output.weight"] = taker.take(hf.LM_HEAD_KEY, (config.vocab_size, config.dim))
    elif hf.LM_HEAD_KEY in taker:
        head = taker.take(hf.LM_HEAD_KEY, (config.vocab_size, config.dim))
        whole = (slice(None),)
        if not torch.equal(head.read(whole), sd["tok_embeddings.weight"].read(whole)):
            raise UpcycleError(f"config.json says tie_word_embeddings but {hf.LM_HEAD_KEY} differs from the embeddings")
    for i in range(config.num_layers):
        sd.update({f"layers.{i}.{k}": v for k, v in _take_layer(taker, i, config, hf_cfg).items()})
    taker.check_all_used()
    return config, sd


def state_dict_from_hf(tensors: Mapping[str, Tensor], hf_cfg: dict) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Our ModelConfig and state dict (checkpoint dtype) from HF tensors (any mapping, e.g.
    safetensors_io.CheckpointReader) and the config.json dictionary: every source of `hf_sources` read whole."""
    config, sources = hf_sources(tensors, hf_cfg)
    return config, {name: source.read(full_box(source.shape)).contiguous() for name, source in sources.items()}


@torch.no_grad()
def layer_by_layer(tensors: Mapping[str, Tensor], hf_cfg: dict, sequences: list[Tensor]
                   ) -> Iterator[tuple[int, list[Tensor], list[Tensor | None]]]:
    """Run an HF checkpoint on `sequences` (1-D token ids, one at a time) one decoder layer at a time, in fp32, holding
    the token embeddings and one layer's weights, never the whole model. Yields, per layer in order: the FFN input of
    each sequence ([T, D], the post-attention norm's output: what a router sees) and its router logits ([T, E] fp32;
    None in a dense layer). For router rows and routing statistics of models of any size."""
    config = model_config_from_hf(tensors, hf_cfg)
    taker = _Taker(tensors)
    embed = taker.take(hf.EMBED_KEY, (config.vocab_size, config.dim)).read(full_box((config.vocab_size, config.dim)))
    xs = [(embed[ids].float() * config.embedding_multiplier).unsqueeze(0) for ids in sequences]  # (1, T, D) each
    del embed
    inv_freq, scale = rope_inv_freq(config)
    for i in range(config.num_layers):
        with torch.device("meta"):
            block = Block(config, i)
        state = {k: v.read(full_box(v.shape)).float() for k, v in _take_layer(taker, i, config, hf_cfg).items()}
        block.load_state_dict(state, strict=True, assign=True)
        inputs: list[Tensor] = []
        handle = block.ffn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, config.dim)))
        logits: list[Tensor | None] = []
        for j, x_BTD in enumerate(xs):
            cos_TDh, sin_TDh = rope_tables(inv_freq, scale, x_BTD.shape[1], torch.float32)
            xs[j], logits_TE, *_ = block(x_BTD, cos_TDh, sin_TDh)
            logits.append(logits_TE)
        handle.remove()
        yield i, inputs, logits


def load_hf(directory: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(ModelConfig, our state dict) from an HF checkpoint directory (config.json + safetensors)."""
    reader = CheckpointReader(directory)  # validates config.json and every safetensors header
    return state_dict_from_hf(reader, reader.config)


def _resolve_export_format(config: ModelConfig, fmt: str) -> tuple[str, str]:
    """(dense family, output model_type) for our config and the requested format."""
    family = hf.dense_family_for(qkv_bias=config.qkv_bias, o_bias=config.o_bias, qk_norm=config.qk_norm)
    if fmt not in ("auto", *EXPORT_FORMATS):
        raise UpcycleError(f"unknown --format {fmt!r}; choose auto, {', '.join(EXPORT_FORMATS)}")
    if config.is_moe and fmt in hf.DENSE_FAMILIES:
        raise UpcycleError(f"--format {fmt} writes a dense model, but this checkpoint is an MoE "
                           f"({config.num_experts} experts); choose auto, {', '.join(hf.MOE_FORMATS)}")
    if not config.is_moe:
        if fmt in hf.MOE_FORMATS:
            raise UpcycleError(f"--format {fmt} writes an MoE, but this checkpoint is dense; choose auto or {family} "
                               "(to make an MoE of it, use upcycle convert)")
        if fmt not in ("auto", family):
            raise UpcycleError(f"a dense model with these attention features exports as {family}; got --format {fmt!r}")
        return family, family
    dense_like = {"model_type": family, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
                  "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
                  "vocab_size": config.vocab_size, "head_dim": config.head_dim,
                  "attention_bias": config.qkv_bias, "qkv_bias": config.qkv_bias}
    if config.router_activation == "sigmoid":
        return family, _sigmoid_format(config, dense_like, fmt)
    if config.routed_scaling != 1.0:
        raise UpcycleError(f"this MoE scales softmax routing weights by {config.routed_scaling}, which no format holds "
                           "(glm4_moe's routers are sigmoid); train it with model.routed_scaling 1.0")
    if fmt in hf.SIGMOID_FORMATS:
        raise UpcycleError(f"{fmt} routes by sigmoid scores, but this MoE's routers are softmax; use --format auto "
                           f"or one of {', '.join(f for f in hf.MOE_FORMATS if f not in hf.SIGMOID_FORMATS)}")
    # What only one format holds: a sigmoid-gated shared expert (qwen2_moe), an ungated one or Granite's multipliers
    # (granitemoeshared)
    only, what = None, ""
    if config.shared_expert_dim and config.shared_expert_gated:
        only, what = "qwen2_moe", "a sigmoid-gated shared expert"
    elif config.shared_expert_dim:
        only, what = "granitemoeshared", "an ungated shared expert"
    elif _granite_multipliers(config):
        only, what = "granitemoeshared", "Granite's embedding/residual/attention/logits multipliers"
        if fmt in hf.GRANITE_FORMATS:  # either Granite format holds them
            only = fmt
    if only is not None:
        if fmt not in ("auto", only):
            raise UpcycleError(f"this MoE has {what}, which only {only} holds; got --format {fmt}, use "
                               f"--format {only}")
        fmt = only
    elif fmt == "auto" and family == "llama" and (config.moe_layers is not None or not config.renormalize):
        # mixtral cannot keep dense layers nor skip renormalization; qwen2_moe holds Llama attention (zero q/k/v biases)
        fmt = "qwen2_moe"
    return family, hf.resolve_format(dense_like, fmt)


def _sigmoid_format(config: ModelConfig, dense_like: dict, fmt: str) -> str:
    """The format of an MoE with sigmoid routers (and its balancing bias): glm4_moe, the one that holds them; what
    glm4_moe cannot hold besides is refused in one line."""
    only = hf.SIGMOID_FORMATS[0]
    if fmt not in ("auto", only):
        raise UpcycleError(f"this MoE routes by sigmoid scores with a balancing bias, which only {only} holds (as "
                           f"e_score_correction_bias); got --format {fmt}, use --format {only}")
    if config.shared_expert_dim and config.shared_expert_gated:
        raise UpcycleError(f"this MoE has sigmoid routers and a sigmoid-gated shared expert, which no format holds "
                           f"together ({only}'s shared expert has no gate)")
    if config.shared_expert_dim % config.expert_dim:
        raise UpcycleError(f"{only}'s shared expert is a whole number of routed experts' size ({config.expert_dim}); "
                           f"this MoE's is {config.shared_expert_dim}, which no format with sigmoid routers holds")
    if _granite_multipliers(config):
        raise UpcycleError("this MoE has sigmoid routers and Granite's multipliers, which no format holds together")
    hf.check_dense_prefix(only, config.moe_layers, config.num_layers, flag="model.moe_layers")
    return hf.resolve_format(dense_like, only)


def _granite_multipliers(config: ModelConfig) -> dict[str, float]:
    """The multipliers of `config` that differ from what every other format computes ({} for a plain model)."""
    plain = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
             "attention_multiplier": None}
    out = {k: getattr(config, k) for k in plain if getattr(config, k) != plain[k]}
    if out.get("attention_multiplier") is not None and math.isclose(out["attention_multiplier"],
                                                                    config.head_dim ** -0.5, rel_tol=1e-12):
        del out["attention_multiplier"]  # 1/sqrt(head_dim) is the default scale
    return out


@dataclass(frozen=True)
class _Planned:
    """One HF tensor of an export: its key and shape, and how to make it (from the state mapping, on demand)."""

    key: str
    shape: tuple[int, ...]
    make: Callable[[], Tensor]
    dtype: torch.dtype  # the written dtype: the export's, or fp32 for a balancing bias


class _Recent:
    """Our tensors by name, fetched from `state` when asked and the two most recent kept: an export asks for one
    layer's gate_up and down stacks expert by expert, alternately, so each stack is read once."""

    def __init__(self, state: Mapping[str, Tensor]):
        self.state, self.kept = state, {}

    def __call__(self, name: str) -> Tensor:
        if name not in self.kept:
            self.kept = {k: v for k, v in list(self.kept.items())[-1:]}
            self.kept[name] = self.state[name]
        return self.kept[name]


def hf_export_plan(state: Mapping[str, Tensor], config: ModelConfig, fmt: str = "auto",
                   dtype: str = "float32") -> tuple[dict, list[_Planned]]:
    """(config.json dictionary, every HF tensor to write, in order, with per-expert keys) for our state dict. Nothing
    is read until a tensor is made, and then only our tensor it comes from (the two most recent are kept), so an
    export from a lazy mapping (a sharded training checkpoint) needs memory for about its two largest tensors.
    fmt: auto, a dense family matching the model (llama/qwen2/qwen3) or an MoE format (hf_formats.MOE_FORMATS)."""
    if dtype not in DTYPE_NAMES:
        raise UpcycleError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPE_NAMES)}")
    family, out_fmt = _resolve_export_format(config, fmt)
    c = config
    hf_cfg = hf.build_dense_config(
        family, vocab_size=c.vocab_size, dim=c.dim, num_layers=c.num_layers, num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads, ffn_dim=c.ffn_dim, head_dim=c.head_dim, norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, max_seq_len=c.max_seq_len,
        tie_embeddings=c.tie_embeddings, attention_bias=c.qkv_bias, init_std=c.init_std, dtype=dtype)
    if c.is_moe:
        hf_cfg = hf.build_moe_config(hf_cfg, out_fmt, num_experts=c.num_experts, top_k=c.top_k, dtype=dtype,
                                     expert_ffn_dim=c.expert_dim, moe_layers=c.moe_layers,
                                     shared_expert_dim=c.shared_expert_dim or None,
                                     multipliers=_granite_multipliers(c) if out_fmt in hf.GRANITE_FORMATS else None,
                                     routed_scaling=c.routed_scaling)
        hf.set_moe_routing(hf_cfg, renormalize=c.renormalize)
    shapes = hf.read_shapes(hf_cfg)
    cast = DTYPE_NAMES[dtype]
    ours = _Recent(state)
    plan: list[_Planned] = []
    if c.expert_bias and out_fmt not in hf.SIGMOID_FORMATS:
        _check_zero_bias(ours, c)

    def put(key: str, shape: tuple[int, ...], make: Callable[[], Tensor], dtype: torch.dtype = cast) -> None:
        plan.append(_Planned(key, tuple(shape), lambda: make().detach().to(device="cpu", dtype=dtype).contiguous(),
                             dtype))

    def copy(key: str, name: str, shape: tuple[int, ...]) -> None:
        put(key, shape, lambda: ours(name))

    V, D = c.vocab_size, c.dim
    copy(hf.EMBED_KEY, "tok_embeddings.weight", (V, D))
    copy(hf.FINAL_NORM_KEY, "norm.weight", (D,))
    if not c.tie_embeddings:
        copy(hf.LM_HEAD_KEY, "output.weight", (V, D))
    elif not hf_cfg["tie_word_embeddings"]:  # a format that needs its own head (hf_formats.untied_head)
        put(hf.LM_HEAD_KEY, (V, D), lambda: ours("tok_embeddings.weight").clone())  # safetensors refuses shared
    dense_shapes = dataclasses.replace(shapes, ffn_dim=c.ffn_dim)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        for role, shape in hf.attention_roles(shapes).items():
            name = p + _OUR_ATTN[role]
            if name in state:
                copy(hf.attention_key(i, role), name, shape)
            else:  # Qwen2-MoE always has q/k/v biases: a model without them gets zeros (the same function)
                put(hf.attention_key(i, role), shape, lambda shape=shape: torch.zeros(shape))
        if i not in c.moe_layer_ids:
            for m in hf.FFN_MATRICES:
                copy(hf.dense_ffn_key(i, m), p + _OUR_DENSE_FFN[m], hf.ffn_shape(dense_shapes, m))
            continue
        copy(hf.router_key(out_fmt, i), p + OUR_ROUTER, (c.num_experts, D))
        Fd, E = c.expert_dim, c.num_experts
        if out_fmt in hf.SIGMOID_FORMATS:  # the learned balancing bias, in fp32 as transformers keeps it
            put(hf.router_bias_key(i), (E,), lambda p=p: ours(p + OUR_EXPERT_BIAS) if c.expert_bias
                else torch.zeros(E), torch.float32)

        def expert_part(p: str, e: int, m: str) -> Tensor:  # expert e (all experts for e = -1), HF-oriented
            rows = slice(None) if e == -1 else slice(e, e + 1)
            per = experts_to_hf(ours(p + OUR_GATE_UP)[rows], ours(p + OUR_DOWN)[rows])
            part = torch.cat([per["gate"], per["up"]], dim=1) if m == "gate_up" else per[m]
            return part if e == -1 else part[0]

        for key, shape, e, m in hf.stored_experts(out_fmt, i, E, D, Fd):
            put(key, shape, lambda p=p, e=e, m=m: expert_part(p, e, m))
        shared_layout = hf.shared_expert_layout(out_fmt, i, D, hf.shared_expert_dim(hf_cfg))
        if c.shared_expert_dim:
            for role, (key, shape) in shared_layout.items():
                if role == "shared_gate_up":  # Granite: gate rows, then up rows
                    put(key, shape, lambda p=p: torch.cat([ours(p + _OUR_SHARED["shared_gate"]),
                                                           ours(p + _OUR_SHARED["shared_up"])]))
                else:
                    copy(key, p + _OUR_SHARED[role], shape)
        else:  # Qwen2-MoE always has one: it then contributes exactly nothing
            shared_shapes = {role: shape for role, (_, shape) in shared_layout.items()}
            for role, (key, shape) in shared_layout.items():
                put(key, shape, lambda i=i, role=role, shared_shapes=shared_shapes: init_shared_expert(
                    shared_shapes, std=c.init_std, seed=0, layer=i)[role])
    return hf_cfg, plan


def _check_zero_bias(ours: Callable[[str], Tensor], config: ModelConfig) -> None:
    """A softmax MoE's balancing bias (train.bias_update_rate) steers which experts compute; no softmax format holds it,
    so one that has moved is refused rather than dropped (the export would compute something else)."""
    for i in config.moe_layer_ids:
        if ours(f"layers.{i}.{OUR_EXPERT_BIAS}").count_nonzero():
            raise UpcycleError(f"this MoE's softmax routers carry a non-zero balancing bias (layer {i}), which no "
                               "format holds (glm4_moe holds one on sigmoid routers); train with "
                               "model.router_activation sigmoid to export it as glm4_moe")


def state_dict_to_hf(
    state_dict: Mapping[str, Tensor], config: ModelConfig, fmt: str = "auto", dtype: str = "float32"
) -> tuple[dict, dict[str, Tensor]]:
    """(config.json dictionary, HF tensors with per-expert keys) for our state dict: `hf_export_plan`, every tensor
    made."""
    hf_cfg, plan = hf_export_plan(state_dict, config, fmt, dtype)
    return hf_cfg, {item.key: item.make() for item in plan}


def export_hf(
    model_or_state_dict: nn.Module | Mapping[str, Tensor], config: ModelConfig, out_dir: str | Path,
    fmt: str = "auto", dtype: str = "float32", tokenizer: str | Path | None = None, *, force: bool = False,
    inputs: tuple[str | Path, ...] = (), max_shard_size: str = "5GB",
) -> Path:
    """Write an HF checkpoint directory (config.json + safetensors shards of at most `max_shard_size`, with an index
    when there is more than one) that AutoModelForCausalLM loads, streaming: one tensor made and written at a time, so
    a lazy mapping (checkpoint.CheckpointTensors) exports with memory for about two of its tensors. With `tokenizer`,
    that directory's tokenizer files are copied in too, so the export is usable on its own. An existing `out_dir` is
    refused unless `force`; `inputs` (the directories read) must not be or lie inside `out_dir`."""
    state_dict = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
                  else model_or_state_dict)
    hf_cfg, plan = hf_export_plan(state_dict, config, fmt, dtype)
    out_dir = Path(out_dir)
    with publish_dir(out_dir, force=force, inputs=inputs, flag="OUT") as tmp:
        writer = ShardWriter(tmp, [PlannedTensor(item.key, item.shape, item.dtype) for item in plan],
                             parse_size(max_shard_size))
        for item in plan:
            writer.write(item.key, item.make())
        writer.close()
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        for name in hf.TOKENIZER_FILES if tokenizer is not None else ():
            if (Path(tokenizer) / name).is_file() and name != "generation_config.json":
                shutil.copy2(Path(tokenizer) / name, tmp / name)
    return out_dir


def is_our_checkpoint(path: str | Path) -> bool:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    config = read_json(config_path, fix="restore it from the run or re-export")
    return isinstance(config, dict) and "model" in config


def check_model_dir(model_path: str | Path) -> Path:
    """The checkpoint directory, or an UpcycleError that says what a checkpoint directory must hold."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise UpcycleError(f"model {path} does not exist; pass a checkpoint directory (ours or Hugging Face)")
    if not (path / "config.json").is_file():
        raise UpcycleError(f"{path} has no config.json; pass a checkpoint directory (ours or Hugging Face)")
    return path


class _SourceTensors(NamedTensors):
    """Our tensors by name, each read whole from its tensor_sources.Source when looked up (nothing kept)."""

    def __init__(self, sources: Mapping[str, Source]):
        self.sources = sources

    def __getitem__(self, name: str) -> Tensor:
        source = self.sources[name]
        return source.read(full_box(source.shape)).contiguous()

    def _names(self) -> Mapping[str, object]:
        return self.sources

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sources[name].shape)


def model_tensors(path: str | Path) -> tuple[ModelConfig, TensorSource]:
    """Our ModelConfig and our tensors of any checkpoint we read: a training checkpoint (sharded or one-file), our
    saved model, or an HF checkpoint, as a mapping that reads one tensor when it is looked up (streaming export).

    The one validation of a model directory, which every command that reads one runs before any work (export, eval,
    analyze, check, grow, the experiment): a training checkpoint's files and checksums (CheckpointTensors); config.json
    with the type and range of every field it sets; every tensor the config implies present with its shape, nothing
    else, and of a floating dtype; all from the config and the file headers, before a tensor is read. Then each tensor
    is checked finite as it is read (one pass over values already in memory; a reader of the whole model, such as
    load_model or an export, thereby checks all of them)."""
    path = Path(path)
    if is_our_checkpoint(path):
        tensors = CheckpointTensors(path)  # refuses a directory of no known format, or a damaged checkpoint, first
        _check_floating(tensors, path)
        config = _our_model_config(path)
        _check_shapes(config, tensors, path)
    else:
        reader = CheckpointReader(path)
        _check_floating(reader, path)
        try:
            config, sources = hf_sources(reader, reader.config)
        except UpcycleError as exc:
            raise UpcycleError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        tensors = _SourceTensors(sources)
    return config, _FiniteTensors(tensors, path)


def _check_shapes(config: ModelConfig, tensors: TensorSource, path: Path) -> None:
    """Every tensor of the model `config` describes is there with its shape, and nothing else (before any is read)."""
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in Transformer(config).state_dict().items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise UpcycleError(f"checkpoint {path} lacks tensor {name} that its config.json implies; the checkpoint "
                               "is incomplete or its config.json belongs to another model")
        if tuple(tensors.shape(name)) != shape:
            raise UpcycleError(f"checkpoint {path}: tensor {name} has shape {tuple(tensors.shape(name))}, config.json "
                               f"implies {shape}; its config.json belongs to another model")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UpcycleError(f"checkpoint {path} has tensors its config.json does not describe: {', '.join(unknown[:3])}")


def _check_floating(tensors: CheckpointReader | CheckpointTensors, path: Path) -> None:
    for name in tensors:
        dtype = tensors.dtype(name)
        if not dtype.is_floating_point:
            raise UpcycleError(f"tensor {name} of {path} is {str(dtype).removeprefix('torch.')}, not a floating dtype; "
                               "quantized or damaged checkpoints are not supported, dequantize to float32, bfloat16 "
                               "or float16 first")


def _our_model_config(path: Path) -> ModelConfig:
    """The ModelConfig a checkpoint of ours records, every field checked against its type (upcycle.config.build)."""
    fields = model_config_of(path)
    try:
        return build(ModelConfig, fields, "model")
    except UpcycleError as exc:
        raise UpcycleError(f"{path / 'config.json'} does not describe a model of ours: {exc}") from None


class _FiniteTensors(NamedTensors):
    """A TensorSource whose tensors are checked finite as they are read: NaN or Inf weights compute no usable function,
    and every command that reads a model refuses them in one line naming the tensor."""

    def __init__(self, tensors: TensorSource, path: Path):
        self.tensors, self.path = tensors, path

    def __getitem__(self, name: str) -> Tensor:
        tensor = self.tensors[name]
        if not torch.isfinite(tensor).all():
            raise UpcycleError(f"tensor {name} of {self.path} holds NaN or Inf values; this checkpoint computes no "
                               "usable function (damaged, or its training diverged): use another one")
        return tensor

    def _names(self) -> Mapping[str, object]:
        return self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors.shape(name)


def as_hf_directory(path: str | Path, tmp: str | Path) -> Path:
    """An HF checkpoint directory of any checkpoint we read, for tools that load through transformers: an HF one as it
    is, one of ours exported (streaming) into `tmp`."""
    path = Path(path)
    if not is_our_checkpoint(path):
        return path
    config, tensors = model_tensors(path)
    return export_hf(tensors, config, Path(tmp) / f"hf-{path.name}")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Our Transformer from either our checkpoint directory (a training checkpoint of either format, or a saved model)
    or an HF one, detected by config.json's "model" key."""
    config, tensors = model_tensors(path)
    model = Transformer(config)
    model.load_state_dict({name: tensors[name] for name in tensors}, strict=True)
    return model.to(dtype)


def save_model(model: Transformer, out_dir: str | Path, *, force: bool = False) -> Path:
    """Our own checkpoint format (model.safetensors + config.json {"model": ModelConfig}); the trainer adds to it.
    An existing `out_dir` is refused unless `force`."""
    out_dir = Path(out_dir)
    with publish_dir(out_dir, force=force, flag="OUT") as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_tensors(tmp / "model.safetensors", tensors, {"format": "pt"})

        (tmp / "config.json").write_text(json.dumps(model_config_record(asdict(model.config)), indent=2) + "\n")
    return out_dir


def load_transformers(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF checkpoint directory as transformers' own model (AutoModelForCausalLM, no remote code), in eval mode: what
    `upcycle check` compares and `upcycle bench` times. What transformers cannot build is one line naming the cause."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UpcycleError(f"{path} has no config.json; pass a checkpoint directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 (transformers raises many types; its first line names the cause)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UpcycleError(f"transformers cannot load {path}: {reason}") from None
    return model.eval()


def export_card(out: Path, checkpoint: str | Path) -> Path:
    """The model card of an `upcycle export`: what the exported checkpoint was (one of our training checkpoints: the
    run's start point, step and tokens; an HF checkpoint: re-exported), written into `out` (already published)."""
    checkpoint = Path(checkpoint)
    facts: dict[str, str] = {"exported from": f"`{checkpoint}`"}
    sources, method = [], None
    if is_our_checkpoint(checkpoint):
        state_path, config_path = checkpoint / "trainer_state.json", checkpoint / "train_config.yaml"
        if state_path.is_file():
            state = read_json(state_path)
            facts["training"] = f"step {state.get('step')}, {state.get('tokens', 0):,} tokens"
        if config_path.is_file():
            import yaml

            train = yaml.safe_load(config_path.read_text()) or {}
            init = train.get("init") or {}
            method = init.get("method")
            if init.get("source"):
                facts["started from"] = f"`{init['source']}`" + (f", upcycled online ({method}, ratio "
                                                                  f"{init.get('ratio')})" if method else "")
                sources = [{"path": init["source"], "model_type": "dense" if method else "checkpoint"}]
    what = "A checkpoint exported by `upcycle export` from one of upcycle's training checkpoints." \
        if is_our_checkpoint(checkpoint) else "A checkpoint re-exported by `upcycle export`."
    return write_card(out, what=what, provenance={"facts": facts, "sources": sources, "method": method or "export"})
