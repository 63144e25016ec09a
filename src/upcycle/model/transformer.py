"""Our compact decoder: Llama/Mistral/Qwen2/Qwen3 attention with a dense SwiGLU FFN or our dropless MoE.

Written for one device; data/expert sharding (FSDP2, DDP) is applied from outside in distributed.py. Numerically it
follows transformers 5.24 (RMSNorm in fp32, rotate-half RoPE, SDPA causal attention), so an HF checkpoint loaded with
hf_model.load_hf gives the same logits (tests/unit/test_hf_model.py checks every family).

Shape legend: B batch, T sequence, D dim, H query heads, G kv heads, Dh head dim, V vocab, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.errors import UpcycleError
from upcycle.model.config import ModelConfig
from upcycle.model.moe import MoE

@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    router_logits: list[Tensor] = field(default_factory=list)  # one (B*T, E) fp32 tensor per MoE layer
    expert_counts: Tensor | None = None  # (L_moe, E) top-k assignments per expert, detached
    dropped_counts: Tensor | None = None  # (L_moe, E) of those dropped by the capacity factor; None when dropless


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


def rope_tables(inv_freq: Tensor, scale: float, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (T, Dh), computed in fp32 like transformers, then cast to the activation dtype."""
    positions_T = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    freqs_TH = positions_T[:, None] * inv_freq.float()[None, :]
    emb_TDh = torch.cat((freqs_TH, freqs_TH), dim=-1)
    return (emb_TDh.cos() * scale).to(dtype), (emb_TDh.sin() * scale).to(dtype)


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
        self.scale = config.attention_multiplier  # None: SDPA's 1/sqrt(head_dim)

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
        out_BHTDh = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
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
            self.ffn = MoE(config.dim, config.expert_dim, config.num_experts, config.top_k, config.renormalize,
                           activation=config.router_activation, scaling=config.routed_scaling,
                           expert_bias=config.expert_bias, capacity_factor=config.capacity_factor)
        else:
            self.ffn = FeedForward(config.dim, config.ffn_dim)
        self.shared = self.shared_gate = None
        if layer in config.moe_layer_ids and config.shared_expert_dim:
            self.shared = FeedForward(config.dim, config.shared_expert_dim)
            if config.shared_expert_gated:
                self.shared_gate = nn.Linear(config.dim, 1, bias=False)
        self.residual_multiplier = config.residual_multiplier

    def _residual(self, x_BTD: Tensor, out_BTD: Tensor) -> Tensor:
        return x_BTD + (out_BTD if self.residual_multiplier == 1.0 else out_BTD * self.residual_multiplier)

    def forward(self, x_BTD: Tensor, cos_TDh: Tensor, sin_TDh: Tensor
                ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Returns (hidden, router logits (B*T, E), expert counts (E,), dropped counts (E,)); None where dense (and
        the dropped counts where dropless)."""
        x_BTD = self._residual(x_BTD, self.attn(self.attn_norm(x_BTD), cos_TDh, sin_TDh))
        h_BTD = self.ffn_norm(x_BTD)
        if isinstance(self.ffn, MoE):
            B, T, D = h_BTD.shape
            # (B, T, D) -> (B*T, D): routing is per token
            out_TD, logits_TE, counts_E, dropped_E = self.ffn(h_BTD.reshape(B * T, D))
            out_BTD = out_TD.view(B, T, D)
            if self.shared is not None:
                shared_BTD = self.shared(h_BTD)
                if self.shared_gate is not None:  # Qwen2-MoE; Granite's shared expert has no gate
                    shared_BTD = torch.sigmoid(self.shared_gate(h_BTD)) * shared_BTD
                out_BTD = out_BTD + shared_BTD
            return self._residual(x_BTD, out_BTD), logits_TE, counts_E, dropped_E
        return self._residual(x_BTD, self.ffn(h_BTD)), None, None, None


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
                if module.expert_bias_E is not None:  # a buffer, saved and filled like a parameter
                    plan.append((prefix + "expert_bias_E", "zeros"))
        return plan

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter (and saved buffer) as `init_plan` says and recompute the RoPE buffer (non-persistent
        buffers are not in checkpoints)."""
        tensors = self.state_dict(keep_vars=True)
        for name, how in self.init_plan():
            fill_initial(tensors[name], how, std=self.config.init_std)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self) -> None:
        inv_freq, self.rope_scale = rope_inv_freq(self.config)
        self.rope_inv_freq.copy_(inv_freq.to(self.rope_inv_freq.device))

    def rope_cos_sin(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_tables(self.rope_inv_freq, self.rope_scale, seq_len, dtype)

    def forward(self, input_ids_BT: Tensor) -> ModelOutput:
        T = input_ids_BT.shape[1]
        if T > self.config.max_seq_len:
            raise UpcycleError(f"sequence of {T} tokens exceeds the model's max_seq_len {self.config.max_seq_len}")
        x_BTD = self.tok_embeddings(input_ids_BT)
        if self.config.embedding_multiplier != 1.0:
            x_BTD = x_BTD * self.config.embedding_multiplier
        cos_TDh, sin_TDh = self.rope_cos_sin(T, x_BTD.dtype)
        router_logits, counts, dropped = [], [], []
        for layer in self.layers:
            x_BTD, logits_TE, counts_E, dropped_E = layer(x_BTD, cos_TDh, sin_TDh)
            if logits_TE is not None:
                router_logits.append(logits_TE)
                counts.append(counts_E)
                dropped.append(dropped_E)
        h_BTD = self.norm(x_BTD)
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits_BTV = F.linear(h_BTD, head)
        if self.config.logits_scaling != 1.0:
            logits_BTV = logits_BTV / self.config.logits_scaling
        return ModelOutput(logits_BTV, router_logits, torch.stack(counts) if counts else None,
                           torch.stack(dropped) if dropped and dropped[0] is not None else None)

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
