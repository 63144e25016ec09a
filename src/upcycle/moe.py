"""Our dropless Mixture-of-Experts FFN: router -> sort -> gather -> per-expert matmuls -> weighted scatter.

Every token is computed by its top-k experts (no capacity factor, nothing dropped), as in Mixtral and the
Drop-Upcycling paper. The math is in pure functions (`route`, `experts_grouped`, `experts_reference`); the `MoE`
module only owns the weights and returns the routing results as values (no globals, no hidden state).

Shape legend:
    T tokens (batch and sequence flattened), D model dim (`dim`), F expert hidden dim (`ffn_dim`),
    E experts (`num_experts`), K experts per token (`top_k`), S = T*K (token, slot) pairs.

Expert weight layout (chosen by measurement): `gate_up_ED2F` [E, D, 2F] holding [gate | up] along the last axis,
`down_EFD` [E, F, D]. Both are "input-major", so a grouped matmul reads them without a transpose; for the fused gate_up
grouped matmul (T=4096, D=512, F=1408, E=8, k=2, fwd+bwd, 2 CPU cores) this was 13% (fp32) and 11% (bf16) faster than
transformers' [E, 2F, D] layout read through a transposed view on an idle machine, and equal within noise under load.
hf_model.py converts between the two layouts.

Expert kernels (`impl`): "fused" (the default behind "auto") is one custom autograd Function doing per-expert mm into
preallocated buffers with a hand-written backward; "grouped_mm" and "loop" go through autograd; "reference" is the
obvious per-expert loop the tests compare all of them to. Measurements are in docs/performance.md.

Run the layer benchmark with `python benchmarks/moe_layer.py --quick`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.errors import UpcycleError

IMPLEMENTATIONS = ("auto", "fused", "grouped_mm", "loop", "reference")


class MoEOutput(NamedTuple):
    out_TD: Tensor  # (T, D) in the input dtype
    router_logits_TE: Tensor  # (T, E) fp32, with grad: the losses in losses.py are computed from it
    counts_E: Tensor  # (E,) int64 top-k assignments per expert, detached


def check_moe_sizes(*, num_experts: int, top_k: int) -> None:
    """Refuse routing settings that cannot work, before any weights are built."""
    if num_experts < 1:
        raise UpcycleError(f"num_experts must be >= 1 for an MoE layer, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")


def route(logits_TE: Tensor, *, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over all experts, keep the top k, optionally renormalize the k weights to sum to 1.

    renormalize=True is Mixtral (and Qwen-MoE with norm_topk_prob=True): with identical experts the MoE output then
    equals the dense FFN output exactly. renormalize=False is Qwen-MoE's norm_topk_prob=False.
    Returns (weights_TK fp32, ids_TK int64).
    """
    # Softmax in fp32: in bf16 the probabilities of near-tied experts round to the same value, which makes top-k
    # choices (and the load-balancing statistics) noisy; the Switch Transformer and Mixtral keep routing in fp32.
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


def swiglu(h_S2F: Tensor) -> Tensor:
    """silu(gate) * up for a [gate | up] concatenation along the last axis."""
    gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
    return F.silu(gate_SF) * up_SF


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _aligned_for_grouped_mm(t: Tensor) -> bool:
    """grouped_mm needs 16-byte aligned pointers and strides (e.g. bf16 with an odd multiple of 8 columns fails)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


def grouped_matmul(x_SI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """Rows of x_SI sorted by expert; rows offs_E[e-1]:offs_E[e] are multiplied by w_EIO[e]. Returns (S, O).

    One kernel call; misaligned operands (grouped_mm needs 16-byte aligned strides) fall back to a loop of mm.
    """
    if grouped_mm_available() and _aligned_for_grouped_mm(x_SI) and _aligned_for_grouped_mm(w_EIO):
        if hasattr(F, "grouped_mm"):
            return F.grouped_mm(x_SI, w_EIO, offs=offs_E)
        return torch._grouped_mm(x_SI, w_EIO, offs=offs_E)
    bounds = [0] + offs_E.tolist()
    return torch.cat([x_SI[a:b] @ w_EIO[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], dim=0)


def resolve_impl(impl: str) -> str:
    """Pick the expert-compute kernel; "auto" is "fused" (plain mm on every torch build, and the fastest on CPU)."""
    if impl not in IMPLEMENTATIONS:
        raise UpcycleError(f"unknown MoE implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return "fused" if impl == "auto" else impl


class _FusedExpertFFN(torch.autograd.Function):
    """The whole sorted-expert SwiGLU FFN as one autograd node: per-expert `torch.mm` into preallocated buffers, with a
    hand-written backward (2 mm per matmul, SwiGLU's gradient written straight into one (S, 2F) buffer).

    Why: on CPU, torch 2.13's grouped_mm is itself a loop of mm, so this does the same matmuls; what it saves is the
    autograd graph around them, notably the `cat` that the backward of `chunk(2)` in `swiglu` runs on (S, 2F).
    Saves what autograd would save for the same graph: x, [gate | up], silu(gate) and the activation.
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, counts: list[int]) -> Tensor:
        S, F_ = x_SD.shape[0], down_EFD.shape[1]
        h_S2F = x_SD.new_empty(S, 2 * F_)
        y_SD = x_SD.new_empty(S, down_EFD.shape[2])
        bounds = _segments(counts)
        for e, (a, b) in bounds:
            torch.mm(x_SD[a:b], gate_up_ED2F[e], out=h_S2F[a:b])
        gate_SF, up_SF = h_S2F[:, :F_], h_S2F[:, F_:]
        silu_SF = F.silu(gate_SF)
        act_SF = silu_SF * up_SF
        for e, (a, b) in bounds:
            torch.mm(act_SF[a:b], down_EFD[e], out=y_SD[a:b])
        if S == 0:
            y_SD.zero_()
        ctx.save_for_backward(x_SD, gate_up_ED2F, down_EFD, h_S2F, silu_SF, act_SF)
        ctx.bounds = bounds
        return y_SD

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        x_SD, gate_up_ED2F, down_EFD, h_S2F, silu_SF, act_SF = ctx.saved_tensors
        F_ = down_EFD.shape[1]
        grad_SD = grad_SD.contiguous()  # e.g. the stride-0 gradient of .sum()
        need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]
        # experts without tokens get exact zeros; the others are fully overwritten by mm(out=)
        full = len(ctx.bounds) == gate_up_ED2F.shape[0]
        new = torch.empty_like if full else torch.zeros_like
        grad_down_EFD = new(down_EFD) if need_down else None
        grad_gate_up_ED2F = new(gate_up_ED2F) if need_gate_up else None
        grad_act_SF = torch.empty_like(act_SF)
        for e, (a, b) in ctx.bounds:
            torch.mm(grad_SD[a:b], down_EFD[e].T, out=grad_act_SF[a:b])
            if need_down:
                torch.mm(act_SF[a:b].T, grad_SD[a:b], out=grad_down_EFD[e])
        # act = silu(gate) * up: d/d up = silu(gate); d/d gate = silu'(gate) * up
        grad_h_S2F = torch.empty_like(h_S2F)
        torch.mul(grad_act_SF, silu_SF, out=grad_h_S2F[:, F_:])
        grad_act_SF.mul_(h_S2F[:, F_:])
        torch.ops.aten.silu_backward.grad_input(grad_act_SF, h_S2F[:, :F_], grad_input=grad_h_S2F[:, :F_])
        grad_x_SD = torch.empty_like(x_SD) if need_x else None
        for e, (a, b) in ctx.bounds:
            if need_gate_up:
                torch.mm(x_SD[a:b].T, grad_h_S2F[a:b], out=grad_gate_up_ED2F[e])
            if need_x:
                torch.mm(grad_h_S2F[a:b], gate_up_ED2F[e].T, out=grad_x_SD[a:b])
        if need_x and x_SD.shape[0] == 0:
            grad_x_SD.zero_()
        return grad_x_SD, grad_gate_up_ED2F, grad_down_EFD, None


def _segments(counts: list[int]) -> list[tuple[int, tuple[int, int]]]:
    """(expert, (start, end)) for every expert with at least one row."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, (start, start + n)))
        start += n
    return out


def fused_expert_ffn(x_SD: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, counts: list[int]) -> Tensor:
    """`_FusedExpertFFN` with autocast applied as it would be to `x @ w`: the custom Function's mm(out=) calls are
    not autocast ops, so under CPU autocast the operands are cast here (the casts' backward returns fp32 grads)."""
    if torch.is_autocast_enabled(x_SD.device.type):
        dtype = torch.get_autocast_dtype(x_SD.device.type)
        x_SD, gate_up_ED2F, down_EFD = x_SD.to(dtype), gate_up_ED2F.to(dtype), down_EFD.to(dtype)
    with torch.autocast(x_SD.device.type, enabled=False):
        return _FusedExpertFFN.apply(x_SD, gate_up_ED2F, down_EFD, counts)


def expert_ffn_sorted(x_SD: Tensor, counts_E: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, *, impl: str) -> Tensor:
    """SwiGLU FFN of expert e on its contiguous segment of rows (counts_E[e] rows). Returns (S, D).

    "fused": one custom autograd node, per-expert mm into preallocated buffers (see `_FusedExpertFFN`).
    "grouped_mm": one grouped matmul for gate and up together, SwiGLU, one for down. "loop": the whole FFN per expert
    with plain mm under autograd, concatenating only the (S, D) outputs (not the (S, 2F) hidden).
    """
    if impl == "fused":
        return fused_expert_ffn(x_SD, gate_up_ED2F, down_EFD, counts_E.tolist())  # one host sync for the sizes
    if impl == "grouped_mm":
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        h_SF = swiglu(grouped_matmul(x_SD, gate_up_ED2F, offs_E))
        return grouped_matmul(h_SF, down_EFD, offs_E)
    segments = x_SD.split(counts_E.tolist())  # one host sync for the segment sizes
    return torch.cat([swiglu(x_ND @ gate_up_ED2F[e]) @ down_EFD[e] for e, x_ND in enumerate(segments)], dim=0)


def experts_grouped(
    x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, *, impl: str = "grouped_mm"
) -> tuple[Tensor, Tensor]:
    """The fast path: all (token, slot) pairs sorted by expert, each expert's rows one contiguous block of matmuls.

    Returns (out_TD, counts_E) with counts_E the (token, slot) pairs per expert.
    """
    K = ids_TK.shape[1]
    E = gate_up_ED2F.shape[0]
    # sort: (token, slot) pairs grouped by expert; a stable sort keeps token order inside each expert
    ids_S = ids_TK.reshape(-1)
    order_S = torch.argsort(ids_S, stable=True)
    counts_E = torch.bincount(ids_S, minlength=E)
    token_S = order_S // K
    # gather: each pair's token row, in expert order
    x_SD = x_TD.index_select(0, token_S)
    # expert compute
    y_SD = expert_ffn_sorted(x_SD, counts_E, gate_up_ED2F, down_EFD, impl=impl)
    # scatter: weight each pair's output and add it to its token's row. index_add beat "inverse permutation + bmm
    # over K" by 1.4x (fp32) to 2.3x (bf16) forward+backward on CPU; its backward is a plain gather.
    weights_S = weights_TK.reshape(-1)[order_S].to(y_SD.dtype)
    # in y's dtype: under CPU autocast the experts run in bf16 and, like an autocast F.linear, return bf16
    out_TD = y_SD.new_zeros(x_TD.shape).index_add(0, token_S, y_SD * weights_S[:, None])
    return out_TD, counts_E


def experts_reference(
    x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor
) -> Tensor:
    """The slow, obvious definition: for each expert, find its tokens, run the SwiGLU FFN, add weighted results."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(gate_up_ED2F.shape[0]):
        token_N, slot_N = torch.where(ids_TK == e)
        if token_N.numel() == 0:
            continue
        y_ND = swiglu(x_TD[token_N] @ gate_up_ED2F[e]) @ down_EFD[e]
        out_TD = out_TD.index_add(0, token_N, y_ND * weights_TK[token_N, slot_N, None].to(y_ND.dtype))
    return out_TD


class MoE(nn.Module):
    """Dropless top-k MoE with SwiGLU experts. `impl` picks the expert kernel; "reference" runs the per-expert loop."""

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, renormalize: bool = True,
                 impl: str = "auto"):
        super().__init__()
        check_moe_sizes(num_experts=num_experts, top_k=top_k)
        self.num_experts, self.top_k, self.renormalize, self.impl = num_experts, top_k, renormalize, impl
        self.router = nn.Linear(dim, num_experts, bias=False)  # weight [E, D]
        self.gate_up_ED2F = nn.Parameter(torch.empty(num_experts, dim, 2 * ffn_dim))
        self.down_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))

    def init_weights(self, std: float) -> None:
        for w in (self.router.weight, self.gate_up_ED2F, self.down_EFD):
            nn.init.normal_(w, mean=0.0, std=std)

    def forward(self, x_TD: Tensor) -> MoEOutput:
        # route: logits in fp32 (see `route`), computed from fp32 copies so bf16 rounding cannot flip top-k choices
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        weights_TK, ids_TK = route(logits_TE, top_k=self.top_k, renormalize=self.renormalize)
        impl = resolve_impl(self.impl)
        if impl == "reference":
            out_TD = experts_reference(x_TD, weights_TK, ids_TK, self.gate_up_ED2F, self.down_EFD)
            counts_E = torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
        else:
            out_TD, counts_E = experts_grouped(x_TD, weights_TK, ids_TK, self.gate_up_ED2F, self.down_EFD, impl=impl)
        return MoEOutput(out_TD, logits_TE, counts_E)
