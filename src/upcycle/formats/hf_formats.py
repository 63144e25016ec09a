"""Hugging Face checkpoint layouts, kept as data: which dense families we read, which MoE formats we write, the key
of every tensor in each, and how a dense config becomes an MoE config.

This is the only module that spells Hugging Face names (`hidden_size`, `w1`, `block_sparse_moe`, ...). Everything else
speaks our vocabulary: `dim`, `ffn_dim`, `num_experts`, `top_k`, and the roles below.

Roles (our names for the tensors of one decoder layer):
    attn_norm, ffn_norm, q, k, v, o, q_bias, k_bias, v_bias, o_bias, q_norm, k_norm   (non-FFN, copied by upcycling)
    gate, up, down                                                                    (the dense FFN)
    router, and per expert e: gate, up, down                                          (the MoE FFN)
Shapes: gate/up [F, D], down [D, F], router [E, D] (HF's nn.Linear layout, out_features first).

transformers 5.24 keeps experts fused in memory (`mlp.experts.gate_up_proj` [E, 2F, D], gate rows first;
`mlp.experts.down_proj` [E, D, F]) but saves per-expert keys for Mixtral and Qwen-MoE; we write the per-expert keys
(what `save_pretrained` writes, and what other tools expect) and accept both when reading. Granite-MoE-Shared
checkpoints store every layer's experts as two tensors (`block_sparse_moe.input_linear.weight` [E, 2F, D], gate rows
first, and `output_linear.weight` [E, D, F]); that is the only layout of that format, read and written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import UpcycleError

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoeshared", "granitemoe", "glm4_moe")
# Granite's MoE layout (fused expert tensors, the multipliers), with and without its shared expert
GRANITE_FORMATS = ("granitemoeshared", "granitemoe")
AUTO_FORMAT = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
MOE_ARCHITECTURE = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "granitemoeshared": "GraniteMoeSharedForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}
# Formats with a shared expert beside the routed ones: Qwen2-MoE's is sigmoid-gated, Granite-MoE-Shared's and
# GLM-4-MoE's are not (GLM-4-MoE's is n_shared_experts times the routed experts' size, possibly 0).
SHARED_EXPERT_FORMATS = ("qwen2_moe", "granitemoeshared", "glm4_moe")
GATED_SHARED_EXPERT = {"qwen2_moe": True, "granitemoeshared": False, "glm4_moe": False}
# Formats that can keep dense FFN layers between MoE layers (Qwen-MoE's mlp_only_layers), and those that keep them
# only as the first layers (GLM-4-MoE's first_k_dense_replace).
DENSE_LAYER_FORMATS = ("qwen2_moe", "qwen3_moe")
DENSE_PREFIX_FORMATS = ("glm4_moe",)
# Formats whose routers score by sigmoid with a per-expert balancing bias on the choice (DeepSeek-V3's routing; every
# other format is softmax without a bias).
SIGMOID_FORMATS = ("glm4_moe",)
# The floating dtypes a user names (--dtype of convert, grow and export; config.json's "dtype"), by name only:
# safetensors_io.DTYPE_NAMES maps them to torch dtypes.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Granite's scalar multipliers, in our vocabulary (ModelConfig fields) -> config.json keys. Every other format computes
# them as 1 (attention: 1/sqrt(head_dim)), which is what a conversion writes so that it keeps the dense function.
GRANITE_MULTIPLIERS = {"embedding_multiplier": "embedding_multiplier", "residual_multiplier": "residual_multiplier",
                       "logits_scaling": "logits_scaling", "attention_multiplier": "attention_multiplier"}
FFN_MATRICES = ("gate", "up", "down")

# Non-weight files of an HF checkpoint worth carrying along (tokenizer, chat template, generation defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")

# Buffers some older checkpoints carry; they are recomputed from the config, never weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_ATTN_ROLES = {
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
_DENSE_FFN = {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}
_QWEN_EXPERT = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

EMBED_KEY = "model.embed_tokens.weight"
FINAL_NORM_KEY = "model.norm.weight"
LM_HEAD_KEY = "lm_head.weight"


@dataclass(frozen=True)
class Shapes:
    """Every size a decoder layer's tensors depend on, in our vocabulary."""

    vocab_size: int
    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool  # q, k, v projections carry biases (Qwen2, Llama's attention_bias)
    o_bias: bool  # o projection carries a bias (Llama/Qwen3 attention_bias only)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    tie_embeddings: bool


def read_shapes(cfg: dict) -> Shapes:
    """Shapes of a dense or MoE HF config given as the config.json dictionary."""
    family = cfg.get("model_type")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    attention_bias = bool(cfg.get("attention_bias", False))
    if family in ("qwen2", "qwen2_moe"):
        qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
    elif family == "glm4_moe":  # attention_bias is q/k/v only; o_proj never has one
        qkv_bias, o_bias = attention_bias, False
    else:
        qkv_bias, o_bias = attention_bias, attention_bias
    # Qwen-MoE: the experts' size (intermediate_size is its dense layers'); Mixtral and Granite: intermediate_size
    ffn_dim = (cfg["moe_intermediate_size"] if family in ("qwen2_moe", "qwen3_moe", "glm4_moe")
               else cfg["intermediate_size"])
    return Shapes(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        ffn_dim=ffn_dim,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=family in ("qwen3", "qwen3_moe") or (family == "glm4_moe" and bool(cfg.get("use_qk_norm"))),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def attention_roles(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """Role -> expected shape for the non-FFN tensors of one layer (the same in every family and format)."""
    d, hd = shapes.dim, shapes.head_dim
    q_out, kv_out = shapes.num_heads * hd, shapes.num_kv_heads * hd
    roles: dict[str, tuple[int, ...]] = {
        "attn_norm": (d,),
        "ffn_norm": (d,),
        "q": (q_out, d),
        "k": (kv_out, d),
        "v": (kv_out, d),
        "o": (d, q_out),
    }
    if shapes.qkv_bias:
        roles.update(q_bias=(q_out,), k_bias=(kv_out,), v_bias=(kv_out,))
    if shapes.o_bias:
        roles["o_bias"] = (d,)
    if shapes.qk_norm:
        roles.update(q_norm=(hd,), k_norm=(hd,))
    return roles


def attention_key(layer: int, role: str) -> str:
    return layer_prefix(layer) + _ATTN_ROLES[role]


def dense_ffn_key(layer: int, matrix: str) -> str:
    return layer_prefix(layer) + _DENSE_FFN[matrix]


def ffn_shape(shapes: Shapes, matrix: str) -> tuple[int, int]:
    return (shapes.dim, shapes.ffn_dim) if matrix == "down" else (shapes.ffn_dim, shapes.dim)


def router_key(fmt: str, layer: int) -> str:
    if fmt in GRANITE_FORMATS:
        return f"{layer_prefix(layer)}block_sparse_moe.router.layer.weight"
    block = "block_sparse_moe" if fmt == "mixtral" else "mlp"
    return f"{layer_prefix(layer)}{block}.gate.weight"


def router_bias_key(layer: int) -> str:
    """GLM-4-MoE's per-expert balancing bias (E,), e_score_correction_bias: added to the sigmoid scores for the choice
    of experts only."""
    return f"{layer_prefix(layer)}mlp.gate.e_score_correction_bias"


def expert_key(fmt: str, layer: int, expert: int, matrix: str) -> str:
    if fmt == "mixtral":
        return f"{layer_prefix(layer)}block_sparse_moe.experts.{expert}.{_MIXTRAL_EXPERT[matrix]}.weight"
    if fmt in GRANITE_FORMATS:
        raise AssertionError("granitemoe(shared) stores a layer's experts in two tensors: use stored_experts()")
    return f"{layer_prefix(layer)}mlp.experts.{expert}.{_QWEN_EXPERT[matrix]}.weight"


def stored_experts(fmt: str, layer: int, num_experts: int, dim: int, ffn_dim: int
                   ) -> list[tuple[str, tuple[int, ...], int, str]]:
    """One MoE layer's expert tensors as format `fmt` stores them: (key, shape, expert, matrix), in writing order.

    Per expert and matrix (gate, up, down) for Mixtral and Qwen-MoE; for Granite-MoE-Shared two tensors that hold
    every expert (expert -1): `gate_up` [E, 2F, D], expert e's gate rows then its up rows, and `down` [E, D, F]."""
    if fmt in GRANITE_FORMATS:
        p = f"{layer_prefix(layer)}block_sparse_moe."
        return [(p + "input_linear.weight", (num_experts, 2 * ffn_dim, dim), -1, "gate_up"),
                (p + "output_linear.weight", (num_experts, dim, ffn_dim), -1, "down")]
    shapes = {"gate": (ffn_dim, dim), "up": (ffn_dim, dim), "down": (dim, ffn_dim)}
    return [(expert_key(fmt, layer, e, m), shapes[m], e, m) for e in range(num_experts) for m in FFN_MATRICES]


def fused_expert_keys(layer: int) -> tuple[str, str, str]:
    """transformers' in-memory (and accepted on load) fused layout: router, gate_up [E, 2F, D], down [E, D, F]."""
    p = layer_prefix(layer)
    return f"{p}mlp.gate.weight", f"{p}mlp.experts.gate_up_proj", f"{p}mlp.experts.down_proj"


def shared_expert_shapes(dim: int, shared_dim: int) -> dict[str, tuple[int, int]]:
    """Shapes of Qwen2-MoE's shared expert (size `shared_dim`) and its gate, by the roles of `shared_expert_keys`."""
    return {"shared_gate": (shared_dim, dim), "shared_up": (shared_dim, dim), "shared_down": (dim, shared_dim),
            "shared_expert_gate": (1, dim)}


def shared_expert_layout(fmt: str, layer: int, dim: int, shared_dim: int) -> dict[str, tuple[str, tuple[int, int]]]:
    """role -> (key, shape) of the shared expert of format `fmt` (size `shared_dim`; none when 0).

    Qwen2-MoE: gate, up, down and the sigmoid gate [1, D] (`shared_expert_keys`). Granite-MoE-Shared: no gate, and
    gate and up projections stored as one tensor, `shared_gate_up` [2 * shared_dim, D], gate rows first."""
    if fmt == "qwen2_moe":
        keys, shapes = shared_expert_keys(layer), shared_expert_shapes(dim, shared_dim)
        return {role: (keys[role], shapes[role]) for role in keys}
    if fmt == "granitemoeshared" and shared_dim:
        p = f"{layer_prefix(layer)}shared_mlp."
        return {"shared_gate_up": (p + "input_linear.weight", (2 * shared_dim, dim)),
                "shared_down": (p + "output_linear.weight", (dim, shared_dim))}
    if fmt == "glm4_moe":  # always there, as transformers saves it: [0, D] tensors when n_shared_experts is 0
        p = f"{layer_prefix(layer)}mlp.shared_experts."
        return {"shared_gate": (p + "gate_proj.weight", (shared_dim, dim)),
                "shared_up": (p + "up_proj.weight", (shared_dim, dim)),
                "shared_down": (p + "down_proj.weight", (dim, shared_dim))}
    return {}


def shared_expert_dim(cfg: dict) -> int:
    """The shared expert's size in an MoE config.json (0: none)."""
    if cfg["model_type"] == "qwen2_moe":
        return cfg["shared_expert_intermediate_size"]
    if cfg["model_type"] == "granitemoeshared":
        return cfg.get("shared_intermediate_size") or 0
    if cfg["model_type"] == "glm4_moe":
        return cfg.get("n_shared_experts", 0) * cfg["moe_intermediate_size"]
    return 0


def shared_expert_keys(layer: int) -> dict[str, str]:
    """Qwen2-MoE's always-present shared expert and its sigmoid gate [1, D]."""
    p = layer_prefix(layer) + "mlp."
    return {
        "shared_gate": f"{p}shared_expert.gate_proj.weight",
        "shared_up": f"{p}shared_expert.up_proj.weight",
        "shared_down": f"{p}shared_expert.down_proj.weight",
        "shared_expert_gate": f"{p}shared_expert_gate.weight",
    }


_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_POSITIVE_FLOATS = ("rms_norm_eps", "initializer_range", "rope_theta")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "use_sliding_window", "norm_topk_prob")
# An MoE's sizes, where its format has them (a string or 0 would fail later with a traceback, or be taken as dense)
_MOE_INTS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "decoder_sparse_step")


def check_config_types(cfg: dict) -> None:
    """Refuse config.json values of the wrong type, naming the key: transformers refuses `num_attention_heads: 4.0`
    when it loads the output, and `"4"` would fail halfway through with a traceback."""
    def bad(key: str, what: str) -> UpcycleError:
        return UpcycleError(f"config.json: {key} must be {what}, got {cfg[key]!r}; fix config.json")

    for key in _REQUIRED_INTS + _OPTIONAL_INTS + _MOE_INTS:
        value = cfg.get(key)
        if value is None and key not in _REQUIRED_INTS:
            continue
        if type(value) is not int or value < 1:
            raise bad(key, "a positive integer")
    if cfg.get("shared_intermediate_size") is not None and (type(cfg["shared_intermediate_size"]) is not int
                                                            or cfg["shared_intermediate_size"] < 0):
        raise bad("shared_intermediate_size", "a non-negative integer (0: no shared expert)")
    layers = cfg.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise bad("mlp_only_layers", "a list of layer indices")
    for key in _POSITIVE_FLOATS:
        value = cfg.get(key)
        if value is not None and (type(value) not in (int, float) or not 0 < value < float("inf")):
            raise bad(key, "a positive finite number")
    for key in _BOOLS:
        if cfg.get(key) is not None and type(cfg[key]) is not bool:
            raise bad(key, "true or false")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise bad(key, "a mapping or null")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv_heads:
        raise UpcycleError(f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                           f"({kv_heads}); fix config.json")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        raise UpcycleError(f"config.json: hidden_size ({cfg['hidden_size']}) must be a multiple of "
                           f"num_attention_heads ({heads}) when head_dim is not given; fix config.json")


def check_dense_config(cfg: dict) -> None:
    """Refuse what we cannot upcycle, naming what is supported."""
    family = cfg.get("model_type")
    if family not in DENSE_FAMILIES:
        raise UpcycleError(
            f"unsupported model_type {family!r} in config.json; supported dense families: {', '.join(DENSE_FAMILIES)} "
            "(decoders with a gated SwiGLU FFN)"
        )
    missing = [k for k in _REQUIRED_INTS if k not in cfg]
    if missing:
        raise UpcycleError(f"config.json lacks {', '.join(missing)}; is this a complete {family} config?")
    check_config_types(cfg)
    if cfg.get("mlp_bias"):
        raise UpcycleError("mlp_bias=true is not supported: Mixtral/Qwen-MoE experts have no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UpcycleError(f"hidden_act {act!r} is not supported; MoE formats use SwiGLU (silu)")


def resolve_format(cfg: dict, fmt: str) -> str:
    """Map `auto` to the natural MoE format and check that the dense model's attention fits the format."""
    family = cfg["model_type"]
    if fmt == "auto":
        fmt = AUTO_FORMAT[family]
    if fmt not in MOE_FORMATS:
        raise UpcycleError(f"unknown --format {fmt!r}; choose auto, {', '.join(MOE_FORMATS)}")
    shapes = read_shapes(cfg)
    if fmt == "mixtral" and (shapes.qkv_bias or shapes.o_bias):
        raise UpcycleError(f"{family} has attention biases, which Mixtral cannot hold; use --format qwen2_moe")
    if fmt not in ("qwen3_moe", "glm4_moe") and shapes.qk_norm:
        raise UpcycleError(f"{family} has q/k norms, which only qwen3_moe and glm4_moe hold; use --format qwen3_moe")
    if fmt == "qwen3_moe" and not shapes.qk_norm:
        raise UpcycleError(f"qwen3_moe requires q/k norms, which {family} lacks; use --format mixtral or qwen2_moe")
    if fmt == "qwen2_moe" and shapes.o_bias:
        raise UpcycleError(f"{family} has an o_proj bias, which qwen2_moe cannot hold; use --format mixtral")
    if fmt in (*GRANITE_FORMATS, "glm4_moe") and _sliding_window(cfg):
        raise UpcycleError(f"this {family} model attends through a sliding window of {cfg['sliding_window']} tokens, "
                           f"which {fmt} cannot hold; use --format mixtral")
    if fmt == "glm4_moe" and shapes.o_bias:
        raise UpcycleError(f"{family} has an o_proj bias, which glm4_moe cannot hold; use --format granitemoeshared")
    return fmt


def _sliding_window(cfg: dict) -> int | None:
    """The attention window a model actually uses (None: the whole context), as transformers decides it."""
    window = cfg.get("sliding_window")
    uses = cfg.get("model_type") in ("mistral", "mixtral") or cfg.get("use_sliding_window", False)
    if uses and window is not None and window < cfg.get("max_position_embeddings", window + 1):
        return window
    return None


# Fields that describe the dense FFN or transformers bookkeeping; everything else is carried over verbatim.
_NOT_CARRIED = {"architectures", "model_type", "transformers_version", "mlp_bias", "pretraining_tp", "_name_or_path",
                "auto_map", "qkv_bias", "attention_bias", "quantization_config", "torch_dtype"}


def untied_head(fmt: str, tie_embeddings: bool) -> bool:
    """Whether an MoE of format `fmt` made from a model with tied embeddings gets its own `lm_head.weight` (a copy of
    the embeddings, config tie_word_embeddings false).

    Only qwen2_moe does: llama.cpp's qwen2moe loader requires `output.weight` and has no tied-embedding fallback (its
    mixtral/llama and qwen3moe loaders have one), so a tied Qwen2-MoE does not load there. A copy is the same function
    in every engine; the two matrices are then trained separately."""
    return tie_embeddings and fmt == "qwen2_moe"


# Whether llama.cpp's graph of each format renormalizes the top-k weights. It is fixed per architecture and reads no
# GGUF key for it (src/models/{qwen2moe,qwen3moe}.cpp pass norm_w false and true to build_moe_ffn; Mixtral runs on
# the llama graph with true), so a config.json whose renormalization differs computes another function there.
LLAMA_CPP_RENORMALIZES = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}


def engine_note(cfg: dict) -> str | None:
    """One line for an MoE config.json that llama.cpp will not compute as transformers does, naming the alternative;
    None when the engines agree. Printed by convert and export."""
    fmt = cfg.get("model_type")
    if fmt == "glm4_moe":
        note = ("note: llama.cpp's converter (checked at commit 0c1e5709) reads every glm4_moe tokenizer as GLM's and "
                "stops on a Llama or Qwen one (KeyError '[gMASK]'), so this model does not convert there unchanged")
        if not cfg.get("n_shared_experts"):
            note += ("; nor would it load without a shared expert (llama.cpp's glm4-moe graph always adds one): for "
                     "llama.cpp add --shared-expert zero --shared-expert-dim EXPERT_SIZE, which keeps the function")
        return note + " (see docs/convert.md)"
    if fmt in GRANITE_FORMATS and cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        return ("note: llama.cpp's Granite converter ignores head_dim and uses hidden_size / num_attention_heads, so "
                f"this {fmt} model does not run there (see docs/convert.md, where the output runs)")
    if fmt not in LLAMA_CPP_RENORMALIZES or fmt == "mixtral":
        return None
    renormalize = bool(cfg.get("norm_topk_prob", False))
    if renormalize == LLAMA_CPP_RENORMALIZES[fmt]:
        return None
    if renormalize:  # qwen2_moe
        return ("note: llama.cpp's qwen2moe graph never renormalizes the top-k weights, so there this qwen2_moe model "
                "computes another function; for llama.cpp upcycle with --no-renormalize (naive upcycling is then no "
                "longer exact) or, with Llama/Mistral attention, use --format mixtral (see docs/convert.md)")
    return ("note: llama.cpp's qwen3moe graph always renormalizes the top-k weights, so there this qwen3_moe model "
            "(norm_topk_prob false) computes another function; for llama.cpp keep renormalization (leave out "
            "--no-renormalize; see docs/convert.md)")


def print_engine_note(directory: Path) -> None:
    """engine_note of the MoE just written at `directory` (from its config.json), on stderr, if there is one: what
    convert, compose, grow and export say after writing."""
    if note := engine_note(json.loads((Path(directory) / "config.json").read_text())):
        print(note, file=sys.stderr)


def build_moe_config(
    dense: dict,
    fmt: str,
    *,
    num_experts: int,
    top_k: int,
    router_aux_loss_coef: float = 0.02,
    shared_expert_dim: int | None = None,
    dtype: str | None = None,
    expert_ffn_dim: int | None = None,
    moe_layers: tuple[int, ...] | list[int] | None = None,
    renormalize: bool = True,
    multipliers: dict[str, float] | None = None,
    routed_scaling: float = 1.0,
) -> dict:
    """The MoE config.json as a dictionary: every dense field carried over, then the MoE fields.

    transformers' MoE configs default to other values than the dense ones (Mixtral: rope theta 1e6, eps 1e-5, aux
    coefficient 0.001), so nothing may be left to defaults. Top-k weights are renormalized (Mixtral always does;
    Qwen-MoE via norm_topk_prob) so that naive upcycling reproduces the dense function exactly, unless
    `renormalize` is false (Qwen-MoE only: norm_topk_prob false, as llama.cpp's qwen2moe graph computes).
    `expert_ffn_dim` (default: the dense FFN size) is each expert's size: Mixtral's intermediate_size, Qwen-MoE's
    moe_intermediate_size (intermediate_size there stays the dense size, used by dense layers). `moe_layers` (default:
    every layer) become MoE; Qwen-MoE lists the others in mlp_only_layers, Mixtral and Granite cannot hold dense
    layers. `shared_expert_dim` sizes the shared expert of qwen2_moe (default: the dense FFN size) and
    granitemoeshared (default: none). granitemoeshared gets Granite's `multipliers` (GRANITE_MULTIPLIERS; default:
    1, and 1/sqrt(head_dim) for attention, the values that compute what the dense model computes).

    glm4_moe (`_glm4_moe_fields`): sigmoid routers (their bias is a tensor), `routed_scaling` as
    routed_scaling_factor, a shared expert of n_shared_experts times the experts' size (`shared_expert_dim` default:
    none), dense layers only as the first ones (first_k_dense_replace), rotary embedding over the whole head.
    """
    shapes = read_shapes(dense)
    cfg = {k: v for k, v in dense.items() if k not in _NOT_CARRIED and not k.startswith("_")}
    cfg["model_type"] = fmt
    cfg["architectures"] = [MOE_ARCHITECTURE[fmt]]
    cfg["head_dim"] = shapes.head_dim
    cfg["num_key_value_heads"] = shapes.num_kv_heads
    cfg["num_experts_per_tok"] = top_k
    cfg["router_aux_loss_coef"] = router_aux_loss_coef
    cfg["output_router_logits"] = False
    if dtype is not None:
        cfg["dtype"] = dtype
    expert_ffn_dim = expert_ffn_dim or shapes.ffn_dim
    dense_layers = [i for i in range(shapes.num_layers) if moe_layers is not None and i not in moe_layers]
    if fmt in DENSE_PREFIX_FORMATS:
        check_dense_prefix(fmt, moe_layers, shapes.num_layers, flag="--moe-layers")
    elif fmt not in DENSE_LAYER_FORMATS and dense_layers:
        raise UpcycleError(f"{fmt} has an MoE FFN in every layer and cannot keep dense layers; use --format "
                           "qwen2_moe (or qwen3_moe for a Qwen3 model)")
    if fmt in ("mixtral", *GRANITE_FORMATS) and not renormalize:
        raise UpcycleError(f"{fmt} always renormalizes the top-k weights; use --format qwen2_moe or qwen3_moe")
    if multipliers and fmt not in GRANITE_FORMATS:
        raise AssertionError("only granitemoeshared and granitemoe hold Granite's multipliers")
    if fmt in GRANITE_FORMATS:
        for key in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
            cfg.pop(key, None)  # resolve_format refused a model that uses a window
        cfg["intermediate_size"] = expert_ffn_dim
        cfg["num_local_experts"] = num_experts
        if fmt == "granitemoeshared":
            cfg["shared_intermediate_size"] = shared_expert_dim or 0
        cfg["attention_bias"] = shapes.qkv_bias or shapes.o_bias  # Granite has all four or none; a missing one is 0
        cfg.update({"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                    "attention_multiplier": shapes.head_dim ** -0.5})
        cfg.update({GRANITE_MULTIPLIERS[k]: v for k, v in (multipliers or {}).items() if v is not None})
    elif fmt == "glm4_moe":
        _drop_glm4_moe_carried(cfg)
        cfg.update(_glm4_moe_fields(dense, shapes, num_experts=num_experts, expert_ffn_dim=expert_ffn_dim,
                                    shared_expert_dim=shared_expert_dim or 0, dense_layers=len(dense_layers),
                                    renormalize=renormalize, routed_scaling=routed_scaling))
    elif fmt == "mixtral":
        cfg["intermediate_size"] = expert_ffn_dim
        cfg["num_local_experts"] = num_experts
        cfg["router_jitter_noise"] = 0.0
        if dense.get("model_type") != "mistral":
            cfg["sliding_window"] = None  # Llama attends to the whole context
    else:
        cfg["num_experts"] = num_experts
        cfg["moe_intermediate_size"] = expert_ffn_dim
        cfg["norm_topk_prob"] = renormalize
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = dense_layers
        if fmt == "qwen2_moe":
            cfg["qkv_bias"] = True  # Qwen2-MoE always has q/k/v biases; a Llama source gets zeros
            cfg["shared_expert_intermediate_size"] = shared_expert_dim or shapes.ffn_dim
            if shapes.tie_embeddings:
                cfg["tie_word_embeddings"] = False  # see untied_head()
        else:
            cfg["attention_bias"] = shapes.qkv_bias
    return cfg


def check_dense_prefix(fmt: str, moe_layers, num_layers: int, *, flag: str) -> None:
    """Refuse MoE layers whose dense layers are not the first ones, for a format that keeps dense FFNs only there
    (GLM-4-MoE's first_k_dense_replace)."""
    if moe_layers is None:
        return
    moe = sorted(set(moe_layers))
    if moe != list(range(num_layers - len(moe), num_layers)):
        dense_after = min(i for i in range(num_layers) if i not in moe and i > moe[0])
        raise UpcycleError(f"{fmt} keeps dense FFNs only in the first layers, but {flag} leaves layer {dense_after} "
                           f"dense after MoE layer {moe[0]}; use --format qwen2_moe or qwen3_moe, which accept any "
                           f"pattern of dense layers, or make the dense layers a prefix")


def glm4_shared_experts(shared_expert_dim: int, expert_ffn_dim: int) -> int:
    """GLM-4-MoE's n_shared_experts: its shared expert is that many routed experts' size; one of another size is
    refused."""
    if shared_expert_dim % expert_ffn_dim:
        fit = expert_ffn_dim * max(1, round(shared_expert_dim / expert_ffn_dim))
        raise UpcycleError(f"glm4_moe's shared expert is a whole number of routed experts' size ({expert_ffn_dim}), "
                           f"not {shared_expert_dim}; use --shared-expert-dim {fit} or --format granitemoeshared or "
                           "qwen2_moe")
    return shared_expert_dim // expert_ffn_dim


def _glm4_moe_fields(dense: dict, shapes: Shapes, *, num_experts: int, expert_ffn_dim: int, shared_expert_dim: int,
                     dense_layers: int, renormalize: bool, routed_scaling: float) -> dict:
    """config.json fields of glm4_moe: everything written, nothing left to its defaults (which are GLM-4.5's: a
    shared expert, one dense layer, partial rotary embedding over half of each head, a multi-token-prediction layer)."""
    theta, scaling = read_rope(dense)
    return {
        "n_routed_experts": num_experts, "moe_intermediate_size": expert_ffn_dim,
        "n_shared_experts": glm4_shared_experts(shared_expert_dim, expert_ffn_dim),
        "first_k_dense_replace": dense_layers, "norm_topk_prob": renormalize, "routed_scaling_factor": routed_scaling,
        "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0, "use_qk_norm": shapes.qk_norm,
        "attention_bias": shapes.qkv_bias,
        # transformers reads it from rope_parameters; llama.cpp's converter reads the top-level key and otherwise
        # assumes 0.5 (GLM-4.5 rotates half of each head)
        "partial_rotary_factor": 1.0,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta,
                            "partial_rotary_factor": 1.0},
    }


def _drop_glm4_moe_carried(cfg: dict) -> None:
    """Dense fields glm4_moe has no use for (its attention never slides; resolve_format refused one that does)."""
    for key in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "rope_theta",
                "rope_scaling"):
        cfg.pop(key, None)


# ---- Our model <-> HF config.json (used by hf_model.py; our vocabulary in, HF spellings out) ----

DENSE_ARCHITECTURE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}


def read_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling parameters without rope_theta or None) from 5.x `rope_parameters` or legacy
    `rope_theta` + `rope_scaling` fields."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    params.pop("partial_rotary_factor", None)  # glm4_moe's; read_model_fields accepts only 1.0 (the whole head)
    if "type" in params and "rope_type" not in params:  # pre-4.45 spelling
        params["rope_type"] = params.pop("type")
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def read_model_fields(cfg: dict) -> dict:
    """The fields of our ModelConfig, read from a dense or MoE HF config.json dictionary."""
    family = cfg.get("model_type")
    if family not in DENSE_FAMILIES + MOE_FORMATS:
        raise UpcycleError(f"unsupported model_type {family!r}; supported: {', '.join(DENSE_FAMILIES + MOE_FORMATS)}")
    check_config_types(cfg)
    shapes = read_shapes(cfg)
    theta, scaling = read_rope(cfg)
    max_seq_len = cfg.get("max_position_embeddings", 2048)
    if window := _sliding_window(cfg):
        # We attend to the whole context; within the window that is exactly what the checkpoint computes.
        max_seq_len = window
    fields = dict(
        vocab_size=shapes.vocab_size, dim=shapes.dim, num_layers=shapes.num_layers, num_heads=shapes.num_heads,
        num_kv_heads=shapes.num_kv_heads, ffn_dim=shapes.ffn_dim, head_dim=shapes.head_dim,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=max_seq_len, tie_embeddings=shapes.tie_embeddings, qkv_bias=shapes.qkv_bias,
        o_bias=shapes.o_bias, qk_norm=shapes.qk_norm, init_std=float(cfg.get("initializer_range", 0.02)),
    )
    if family in MOE_FORMATS:
        if family == "mixtral":
            fields.update(num_experts=cfg["num_local_experts"], renormalize=True)
        elif family in GRANITE_FORMATS:  # softmax over the top-k logits: renormalized top-k weights
            fields.update(num_experts=cfg["num_local_experts"], renormalize=True, shared_expert_gated=False)
            fields.update({ours: float(cfg.get(key, 1.0)) for ours, key in GRANITE_MULTIPLIERS.items()})
        elif family == "glm4_moe":
            fields.update(_glm4_moe_model_fields(cfg, shapes))
        else:
            step, dense_only = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
            # transformers' rule: a layer is MoE unless listed in mlp_only_layers, and only every step-th layer
            moe = [i for i in range(shapes.num_layers) if i not in dense_only and (i + 1) % step == 0]
            if not moe:
                raise UpcycleError(f"this {family} config has no MoE layer (decoder_sparse_step {step}, "
                                   f"mlp_only_layers {sorted(dense_only)}); load it as a dense model")
            fields["moe_layers"] = None if len(moe) == shapes.num_layers else moe
            # Qwen3-MoE configs written by transformers 5.x spell it num_local_experts, older ones num_experts
            num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
            fields.update(num_experts=num_experts, renormalize=bool(cfg.get("norm_topk_prob", False)))
            # dense size from intermediate_size, expert size from moe_intermediate_size (None when they agree)
            dense_ffn = cfg.get("intermediate_size", shapes.ffn_dim)
            fields.update(ffn_dim=dense_ffn, expert_ffn_dim=None if dense_ffn == shapes.ffn_dim else shapes.ffn_dim)
        fields["top_k"] = cfg["num_experts_per_tok"]
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise UpcycleError(f"{family} config has hidden_act={cfg.get('hidden_act')!r} mlp_bias={cfg.get('mlp_bias')}; "
                           "only SwiGLU FFNs without biases (silu, mlp_bias=false) are supported")
    return fields


def _glm4_moe_model_fields(cfg: dict, shapes: Shapes) -> dict:
    """Our ModelConfig fields of a glm4_moe config.json (sigmoid routers with their balancing bias); what our model
    does not compute (partial rotary embedding, grouped routing) is refused."""
    # transformers' default, when neither rope_parameters nor the top level says, is GLM-4.5's 0.5
    factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    if factor != 1.0:
        raise UpcycleError(f"this glm4_moe config rotates part of each head (partial_rotary_factor {factor}); only 1.0 "
                           "(the whole head, what upcycle writes) is supported")
    if cfg.get("n_group", 1) != 1 or cfg.get("topk_group", 1) != 1:
        raise UpcycleError(f"this glm4_moe config routes within groups of experts (n_group {cfg.get('n_group')}, "
                           f"topk_group {cfg.get('topk_group')}); only n_group 1 is supported")
    first_dense = cfg.get("first_k_dense_replace", 1)
    num_experts = cfg.get("n_routed_experts", cfg.get("num_local_experts"))
    dense_ffn = cfg.get("intermediate_size", shapes.ffn_dim)
    return dict(
        num_experts=num_experts, renormalize=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=None if first_dense == 0 else list(range(first_dense, shapes.num_layers)),
        ffn_dim=dense_ffn, expert_ffn_dim=None if dense_ffn == shapes.ffn_dim else shapes.ffn_dim,
        shared_expert_gated=False, router_activation="sigmoid", expert_bias=True,
        routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)))


def dense_family_for(*, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> str:
    """The dense HF family that holds exactly these attention features."""
    if qk_norm:
        if qkv_bias != o_bias:
            raise UpcycleError("q/k norms with biases on q/k/v but not o (or the reverse) fit no HF family")
        return "qwen3"
    if qkv_bias and not o_bias:
        return "qwen2"
    if o_bias and not qkv_bias:
        raise UpcycleError("an o bias without q/k/v biases fits no HF family")
    return "llama"


def build_dense_config(
    family: str, *, vocab_size: int, dim: int, num_layers: int, num_heads: int, num_kv_heads: int, ffn_dim: int,
    head_dim: int, norm_eps: float, rope_theta: float, rope_scaling: dict | None, max_seq_len: int,
    tie_embeddings: bool, attention_bias: bool, init_std: float, dtype: str,
) -> dict:
    """A dense config.json dictionary of `family` (llama, qwen2 or qwen3), with nothing left to defaults."""
    cfg = {
        "model_type": family, "architectures": [DENSE_ARCHITECTURE[family]], "vocab_size": vocab_size,
        "hidden_size": dim, "intermediate_size": ffn_dim, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": norm_eps, "max_position_embeddings": max_seq_len,
        "rope_parameters": {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta},
        "tie_word_embeddings": tie_embeddings, "initializer_range": init_std, "attention_dropout": 0.0,
        "use_cache": True, "dtype": dtype,
    }
    if family == "llama":
        cfg.update(attention_bias=attention_bias, mlp_bias=False)
    elif family == "qwen3":
        cfg.update(attention_bias=attention_bias, use_sliding_window=False, sliding_window=None)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None)
    return cfg


def set_moe_routing(cfg: dict, *, renormalize: bool) -> None:
    """Record whether top-k weights are renormalized; Mixtral and Granite always renormalize."""
    if cfg["model_type"] in ("mixtral", *GRANITE_FORMATS):
        if not renormalize:
            raise UpcycleError(f"{cfg['model_type']} always renormalizes the top-k weights; export a "
                               "renormalize=False model as qwen2_moe or qwen3_moe")
    else:
        cfg["norm_topk_prob"] = renormalize
