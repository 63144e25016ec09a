"""Our compact decoder: Llama/Mistral/Qwen2/Qwen3 attention with a dense SwiGLU FFN or our dropless MoE.

Written for one device; data/expert sharding (FSDP2, DDP) is applied from outside in distributed.py. Numerically it
follows transformers 5.24 (RMSNorm in fp32, rotate-half RoPE, SDPA causal attention), so an HF checkpoint loaded with
hf_model.load_hf gives the same logits (tests/test_hf_model.py checks every family).

Shape legend: B batch, T sequence, D dim, H query heads, G kv heads, Dh head dim, V vocab, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.errors import UpcycleError
from upcycle.moe import MoE, check_moe_sizes

# RoPE types whose frequencies do not depend on the sequence length (dynamic/longrope rescale at run time).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Everything that fixes the architecture and the parameter shapes. Saved as JSON under "model" in checkpoints."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    """Hidden size of the dense FFN, and of every expert unless expert_ffn_dim says otherwise."""
    head_dim: int | None = None
    """None -> dim // num_heads."""
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF `rope_parameters` minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE."""
    max_seq_len: int = 2048
    """Longest sequence the model accepts (HF max_position_embeddings, or a Mistral sliding window if shorter)."""
    tie_embeddings: bool = False
    """The LM head reuses the token embedding matrix (no separate `output` weight)."""
    qkv_bias: bool = False
    """q, k, v projections carry biases (Qwen2)."""
    o_bias: bool = False
    """The output projection carries a bias (Llama attention_bias=True)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    num_experts: int = 0
    """0 -> dense SwiGLU FFN in every layer; otherwise an MoE FFN in every layer."""
    top_k: int = 2
    """Experts per token."""
    renormalize: bool = True
    """Renormalize the top-k routing weights to sum to 1 (Mixtral; Qwen-MoE's norm_topk_prob)."""
    expert_ffn_dim: int | None = None
    """Hidden size of each expert; None -> ffn_dim (coarse experts, as in the paper). Fine-grained experts
    (upcycle convert --granularity G) have ffn_dim / G."""
    moe_layers: list[int] | None = None
    """Which layers hold the MoE FFN (the others a dense FFN of ffn_dim); None -> every layer. Ignored when dense."""
    shared_expert_dim: int = 0
    """Hidden size of an always-active shared expert in every MoE layer, added as sigmoid(gate . x) * FFN(x) (Qwen2-MoE);
    0 -> none."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights (norms start at 1, biases at 0)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UpcycleError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.head_dim is not None and self.head_dim < 1:
            raise UpcycleError(f"head_dim must be at least 1 (or empty: dim // num_heads), got {self.head_dim}")
        if not (self.norm_eps > 0 and self.rope_theta > 0 and self.init_std >= 0):
            raise UpcycleError(f"norm_eps and rope_theta must be > 0 and init_std >= 0, got {self.norm_eps}, "
                               f"{self.rope_theta}, {self.init_std}")
        if self.num_experts < 0:
            raise UpcycleError(f"num_experts must be >= 0 (0: dense), got {self.num_experts}")
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise UpcycleError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}; set head_dim")
            self.head_dim = self.dim // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise UpcycleError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts:
            check_moe_sizes(num_experts=self.num_experts, top_k=self.top_k)
        if self.shared_expert_dim < 0:
            raise UpcycleError(f"shared_expert_dim must be >= 0, got {self.shared_expert_dim}")
        if self.expert_ffn_dim is not None and self.expert_ffn_dim < 1:
            raise UpcycleError(f"expert_ffn_dim must be at least 1, got {self.expert_ffn_dim}")
        if self.moe_layers is not None:
            layers = list(self.moe_layers)
            if (not layers or len(set(layers)) != len(layers)
                    or not all(type(i) is int and 0 <= i < self.num_layers for i in layers)):
                raise UpcycleError(f"moe_layers must list distinct layers in [0, {self.num_layers - 1}] (at least "
                                   f"one), got {self.moe_layers}")
            self.moe_layers = sorted(layers)
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UpcycleError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The layers with an MoE FFN, ascending (none for a dense model)."""
        if not self.is_moe:
            return ()
        return tuple(range(self.num_layers)) if self.moe_layers is None else tuple(self.moe_layers)

    @property
    def expert_dim(self) -> int:
        """Hidden size of each expert."""
        return self.expert_ffn_dim or self.ffn_dim


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    router_logits: list[Tensor] = field(default_factory=list)  # one (B*T, E) fp32 tensor per MoE layer
    expert_counts: Tensor | None = None  # (L_moe, E) top-k assignments per expert, detached


def rope_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """RoPE inverse frequencies (Dh/2,) and the cos/sin scale, computed by transformers' own functions so that
    every scaling type matches HF bit for bit."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    if params["rope_type"] == "default":
        hd = config.head_dim
        exponent = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
        return 1.0 / (config.rope_theta ** exponent), 1.0
    hf = PretrainedConfig(hidden_size=config.dim, num_attention_heads=config.num_heads, head_dim=config.head_dim,
                          max_position_embeddings=config.max_seq_len, rope_parameters=params)
    inv_freq, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, None)
    return inv_freq.float(), float(scale)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTDh: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> Tensor:
    return x_BHTDh * cos_TDh + rotate_half(x_BHTDh) * sin_TDh


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 (bf16 squares overflow precision), scale in the input dtype, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.dim, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q = nn.Linear(d, config.num_heads * hd, bias=config.qkv_bias)
        self.k = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.v = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.o = nn.Linear(config.num_heads * hd, d, bias=config.o_bias)
        self.q_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None

    def forward(self, x_BTD: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> Tensor:
        B, T, _ = x_BTD.shape
        q_BTHDh = self.q(x_BTD).view(B, T, self.num_heads, self.head_dim)
        k_BTGDh = self.k(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        v_BTGDh = self.v(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BTHDh, k_BTGDh = self.q_norm(q_BTHDh), self.k_norm(k_BTGDh)
        # (B, T, H, Dh) -> (B, H, T, Dh)
        q, k, v = (t.transpose(1, 2) for t in (q_BTHDh, k_BTGDh, v_BTGDh))
        q, k = apply_rope(q, cos_TDh, sin_TDh), apply_rope(k, cos_TDh, sin_TDh)
        out_BHTDh = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                   enable_gqa=self.num_kv_heads != self.num_heads)
        # (B, H, T, Dh) -> (B, T, H*Dh)
        return self.o(out_BHTDh.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """Dense SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, ffn_dim, bias=False)
        self.up = nn.Linear(dim, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if layer in config.moe_layer_ids:
            self.ffn = MoE(config.dim, config.expert_dim, config.num_experts, config.top_k, config.renormalize)
        else:
            self.ffn = FeedForward(config.dim, config.ffn_dim)
        self.shared = self.shared_gate = None
        if layer in config.moe_layer_ids and config.shared_expert_dim:
            self.shared = FeedForward(config.dim, config.shared_expert_dim)
            self.shared_gate = nn.Linear(config.dim, 1, bias=False)

    def forward(self, x_BTD: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Returns (hidden, router logits (B*T, E) or None, expert counts (E,) or None)."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TDh, sin_TDh)
        h_BTD = self.ffn_norm(x_BTD)
        if isinstance(self.ffn, MoE):
            B, T, D = h_BTD.shape
            # (B, T, D) -> (B*T, D): routing is per token
            out_TD, logits_TE, counts_E = self.ffn(h_BTD.reshape(B * T, D))
            out_BTD = out_TD.view(B, T, D)
            if self.shared is not None:
                out_BTD = out_BTD + torch.sigmoid(self.shared_gate(h_BTD)) * self.shared(h_BTD)
            return x_BTD + out_BTD, logits_TE, counts_E
        return x_BTD + self.ffn(h_BTD), None, None


def fill_initial(tensor: Tensor, how: str, *, std: float) -> None:
    """One step of `Transformer.init_plan`: normal(0, std) (drawn from the global generator), zeros or ones."""
    if how == "normal":
        nn.init.normal_(tensor, mean=0.0, std=std)
    elif how == "zeros":
        nn.init.zeros_(tensor)
    elif how == "ones":
        nn.init.ones_(tensor)
    else:
        raise ValueError(f"unknown initialization {how!r}")


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        device = torch.get_default_device()
        # The modules are made on the meta device, then allocated and filled by init_weights alone: their own
        # constructors' initializations would draw from the global generator first, and then this model would hold
        # other weights than a sharded build from the same seed (built on meta, filled by shards.fill_from_scratch).
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
            self.register_buffer("rope_inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.rope_scale = 1.0
        if device.type != "meta":  # built for use: allocate and fill; on meta there is nothing to fill
            self.to_empty(device=device)
            self.init_weights()

    def init_plan(self) -> list[tuple[str, str]]:
        """How every parameter starts, in the order `init_weights` fills them: (name, "normal" | "zeros" | "ones"),
        normal(0, init_std) for linear and embedding weights and the experts, norms 1, biases 0.

        The order is part of the result: the normal draws come one after another from torch's global CPU generator, so
        a sharded build that draws the same full tensors in the same order and keeps its piece of each
        (shards.fill_from_scratch) holds exactly the weights one process builds, for any number of ranks.
        """
        plan = []
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, (nn.Linear, nn.Embedding)):
                plan.append((prefix + "weight", "normal"))
                if getattr(module, "bias", None) is not None:
                    plan.append((prefix + "bias", "zeros"))
            elif isinstance(module, RMSNorm):
                plan.append((prefix + "weight", "ones"))
            elif isinstance(module, MoE):  # its router is an nn.Linear, filled when the walk reaches it
                plan += [(prefix + "gate_up_ED2F", "normal"), (prefix + "down_EFD", "normal")]
        return plan

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter as `init_plan` says and recompute the RoPE buffer (non-persistent buffers are not in
        checkpoints)."""
        for name, how in self.init_plan():
            fill_initial(self.get_parameter(name), how, std=self.config.init_std)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self) -> None:
        inv_freq, self.rope_scale = rope_inv_freq(self.config)
        self.rope_inv_freq.copy_(inv_freq.to(self.rope_inv_freq.device))

    def rope_cos_sin(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin tables (T, Dh), computed in fp32 like transformers, then cast to the activation dtype."""
        positions_T = torch.arange(seq_len, device=self.rope_inv_freq.device, dtype=torch.float32)
        freqs_TH = positions_T[:, None] * self.rope_inv_freq.float()[None, :]
        emb_TDh = torch.cat((freqs_TH, freqs_TH), dim=-1)
        return (emb_TDh.cos() * self.rope_scale).to(dtype), (emb_TDh.sin() * self.rope_scale).to(dtype)

    def forward(self, input_ids_BT: Tensor) -> ModelOutput:
        T = input_ids_BT.shape[1]
        if T > self.config.max_seq_len:
            raise UpcycleError(f"sequence of {T} tokens exceeds the model's max_seq_len {self.config.max_seq_len}")
        x_BTD = self.tok_embeddings(input_ids_BT)
        cos_TDh, sin_TDh = self.rope_cos_sin(T, x_BTD.dtype)
        router_logits, counts = [], []
        for layer in self.layers:
            x_BTD, logits_TE, counts_E = layer(x_BTD, cos_TDh, sin_TDh)
            if logits_TE is not None:
                router_logits.append(logits_TE)
                counts.append(counts_E)
        h_BTD = self.norm(x_BTD)
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits_BTV = F.linear(h_BTD, head)
        return ModelOutput(logits_BTV, router_logits, torch.stack(counts) if counts else None)

    def num_params(self) -> int:
        """All parameters, a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters used per token: everything except the experts a token is not routed to."""
        c = self.config
        if not c.is_moe:
            return self.num_params()
        expert_params = 3 * c.dim * c.expert_dim
        return self.num_params() - len(c.moe_layer_ids) * (c.num_experts - c.top_k) * expert_params
