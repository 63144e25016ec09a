"""Our model's configuration: everything that fixes the architecture and the parameter shapes, as plain data (no torch),
so that the training config, `upcycle --help` and anything else that only reads or checks a config need not load the
model. model.py builds the model from it; a checkpoint's config.json holds its fields under "model".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from upcycle.errors import UpcycleError

# RoPE types whose frequencies do not depend on the sequence length (dynamic/longrope rescale at run time).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# How a router turns its logits into expert scores (model.router_activation; moe.router_scores computes them).
ROUTER_ACTIVATIONS = ("softmax", "sigmoid")


def check_moe_sizes(*, num_experts: int, top_k: int) -> None:
    """Refuse routing settings that cannot work, before any weights are built."""
    if num_experts < 1:
        raise UpcycleError(f"num_experts must be >= 1 for an MoE layer, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")


def check_routing(*, router_activation: str = "softmax", routed_scaling: float = 1.0,
                  capacity_factor: float | None = None) -> None:
    """Refuse routing settings (ModelConfig.ROUTING_FIELDS) that cannot work: a whole ModelConfig's, or the ones a run
    from a checkpoint sets over the checkpoint's."""
    if router_activation not in ROUTER_ACTIVATIONS:
        raise UpcycleError(f"router_activation must be one of {', '.join(ROUTER_ACTIVATIONS)}, got "
                           f"{router_activation!r}")
    if not 0 < routed_scaling < math.inf:
        raise UpcycleError(f"routed_scaling must be a positive finite number, got {routed_scaling}")
    if capacity_factor is not None and not 0 < capacity_factor < math.inf:
        raise UpcycleError(f"capacity_factor must be a positive finite number (or empty: dropless), got "
                           f"{capacity_factor}")


@dataclass
class ModelConfig:
    """Everything that fixes the architecture and the parameter shapes. Saved as JSON under "model" in checkpoints.

    Attributes:
        vocab_size: Token ids; must be at least the data's tokenizer vocabulary.
        dim: Model width D.
        num_layers: Transformer blocks.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention when fewer than num_heads).
        ffn_dim: Hidden size of the dense FFN, and of every expert unless expert_ffn_dim says otherwise.
        head_dim: Per-head size; empty: dim // num_heads.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: HF `rope_parameters` minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; empty:
            plain RoPE.
        max_seq_len: Longest sequence the model accepts (HF max_position_embeddings, or a Mistral sliding window if
            shorter).
        tie_embeddings: The LM head reuses the token embedding matrix (no separate `output` weight).
        qkv_bias: q, k, v projections carry biases (Qwen2).
        o_bias: The output projection carries a bias (Llama attention_bias=True).
        qk_norm: Per-head RMSNorm on q and k before RoPE (Qwen3).
        num_experts: 0: a dense SwiGLU FFN in every layer; otherwise an MoE FFN in every layer of moe_layers.
        top_k: Experts per token.
        renormalize: Renormalize the top-k routing weights to sum to 1 (Mixtral; Qwen-MoE's norm_topk_prob).
        router_activation: How a router scores the experts: softmax over the logits (Mixtral, Qwen-MoE, the paper) or
            an independent sigmoid per expert (DeepSeek-V3, GLM-4.5: glm4_moe). The top k scores (plus the balancing
            bias, where there is one) choose the experts; the chosen scores, renormalized when `renormalize`, times
            `routed_scaling`, weigh them.
        routed_scaling: Factor on the routed experts' weights (DeepSeek-V3's and glm4_moe's routed_scaling_factor);
            1 keeps naive upcycling the dense function.
        expert_bias: Every MoE layer holds a per-expert fp32 bias b that is added to the scores for the choice of
            experts only, never to their weights (DeepSeek-V3's aux-loss-free balancing; glm4_moe's
            e_score_correction_bias). The trainer turns it on when train.bias_update_rate > 0 and learns it there.
        capacity_factor: Empty: dropless (every token reaches its k experts). A number c: while training, each expert
            takes at most ceil(c * tokens * top_k / num_experts) assignments of each forward pass (a rank's
            micro-batch), the lowest-scored above the cap are dropped (the token keeps its other experts and the
            residual). Evaluation and inference stay dropless.
        expert_ffn_dim: Hidden size of each expert; empty: ffn_dim (coarse experts, as in the paper). Fine-grained
            experts (upcycle convert --granularity G) have ffn_dim / G.
        moe_layers: Which layers hold the MoE FFN (the others a dense FFN of ffn_dim); empty: every layer. Ignored
            when dense.
        shared_expert_dim: Hidden size of an always-active shared expert in every MoE layer, added as
            sigmoid(gate . x) * FFN(x) (Qwen2-MoE); 0: none.
        shared_expert_gated: The shared expert's output is scaled by its sigmoid gate (Qwen2-MoE); false: added as it
            is (Granite-MoE-Shared).
        embedding_multiplier: Granite: token embeddings are multiplied by this before the first layer.
        residual_multiplier: Granite: each attention and FFN output is multiplied by this before it is added to the
            residual stream.
        attention_multiplier: Granite: the attention logits' scale; empty: 1/sqrt(head_dim).
        logits_scaling: Granite: the output logits are divided by this.
        init_std: Std of the normal init of linear and embedding weights (norms start at 1, biases at 0).
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    top_k: int = 2
    renormalize: bool = True
    router_activation: str = field(default="softmax", metadata={"choices": ROUTER_ACTIVATIONS})
    routed_scaling: float = 1.0
    expert_bias: bool = False
    capacity_factor: float | None = None
    expert_ffn_dim: int | None = None
    moe_layers: list[int] | None = None
    shared_expert_dim: int = 0
    shared_expert_gated: bool = True
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    init_std: float = 0.02

    # The fields that change no parameter shape, only how tokens are routed: a run that starts from a checkpoint
    # (init.source) may set them in its model section, over the checkpoint's own.
    ROUTING_FIELDS: ClassVar[tuple[str, ...]] = ("router_activation", "routed_scaling", "capacity_factor")

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
        check_routing(**{name: getattr(self, name) for name in self.ROUTING_FIELDS})
        if self.shared_expert_dim < 0:
            raise UpcycleError(f"shared_expert_dim must be >= 0, got {self.shared_expert_dim}")
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise UpcycleError(f"{name} must be a positive finite number, got {value}")
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
