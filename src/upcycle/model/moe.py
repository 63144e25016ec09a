"""Our Mixture-of-Experts FFN: router -> (capacity) -> sort -> gather -> per-expert matmuls -> weighted scatter.

By default every token is computed by its top-k experts (dropless, nothing dropped), as in Mixtral and the
Drop-Upcycling paper. Routers score the experts by softmax (Mixtral, Qwen-MoE) or sigmoid (DeepSeek-V3, GLM-4.5), a
per-expert bias may steer the choice (DeepSeek-V3's aux-loss-free balancing), and a capacity factor may cap each
expert's assignments while training (Switch Transformer, GShard). The math is in pure functions (`router_scores`,
`choose_experts`, `combine_weights`, `route`, `capacity_keep`, `experts_grouped`, `experts_reference`); the `MoE`
module only owns the weights and the bias and returns the routing results as values (no globals, no hidden state).

Shape legend:
    T tokens (batch and sequence flattened), D model dim (`dim`), F expert hidden dim (`ffn_dim`),
    E experts (`num_experts`), K experts per token (`top_k`), S = T*K (token, slot) pairs.

Expert weight layout (chosen by measurement): `gate_up_ED2F` [E, D, 2F] holding [gate | up] along the last axis,
`down_EFD` [E, F, D]. Both are "input-major", so a grouped matmul reads them without a transpose; for the fused gate_up
grouped matmul (T=4096, D=512, F=1408, E=8, k=2, fwd+bwd, 2 CPU cores) this was 13% (fp32) and 11% (bf16) faster than
transformers' [E, 2F, D] layout read through a transposed view on an idle machine, and equal within noise under load.
hf_model.py converts between the two layouts.

Expert kernels (`impl`): "fused" is a pair of custom ops (`torch.library`, so torch.compile keeps the graph whole)
doing per-expert mm into preallocated buffers with a hand-written backward; "grouped_mm" (one grouped GEMM per matmul,
no host synchronization) and "loop" go through autograd; "reference" is the obvious per-expert loop the tests compare
all of them to. "auto" is "grouped_mm" in bf16 on Hopper and Blackwell GPUs, where it is one grouped GEMM, and "fused"
everywhere else (`resolve_impl`). Measurements are in docs/performance.md.

Run the layer benchmark with `python benchmarks/moe_layer.py --quick`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.errors import UpcycleError
from upcycle.model.config import ROUTER_ACTIVATIONS, check_moe_sizes

IMPLEMENTATIONS = ("auto", "fused", "grouped_mm", "loop", "reference")


class MoEOutput(NamedTuple):
    out_TD: Tensor  # (T, D) in the input dtype
    router_logits_TE: Tensor  # (T, E) fp32, with grad: the losses in losses.py are computed from it
    counts_E: Tensor  # (E,) int64 top-k assignments the router chose per expert, detached
    dropped_E: Tensor | None = None  # (E,) int64 of those dropped by the capacity factor; None when dropless


def router_scores(logits_TE: Tensor, activation: str = "softmax") -> Tensor:
    """Expert scores (T, E) in fp32: softmax over the experts (Mixtral, Qwen-MoE) or an independent sigmoid per expert
    (DeepSeek-V3, GLM-4.5). In fp32 because in bf16 the scores of near-tied experts round to the same value, which
    makes top-k choices (and the load-balancing statistics) noisy; the Switch Transformer and Mixtral keep routing in
    fp32."""
    if activation == "softmax":
        return torch.softmax(logits_TE.float(), dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(logits_TE.float())
    raise UpcycleError(f"unknown router activation {activation!r}; choose one of {', '.join(ROUTER_ACTIVATIONS)}")


def choose_experts(scores_TE: Tensor, *, top_k: int, bias_E: Tensor | None = None) -> Tensor:
    """ids_TK: the top k experts of each token by score, plus the per-expert balancing bias where there is one
    (DeepSeek-V3: the bias only steers the choice; the weights come from the scores alone)."""
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    return torch.topk(choice_TE, top_k, dim=-1).indices


def combine_weights(scores_TE: Tensor, ids_TK: Tensor, *, renormalize: bool, scaling: float = 1.0) -> Tensor:
    """weights_TK fp32: the chosen experts' scores, renormalized to sum to 1 when `renormalize`, times `scaling`.

    renormalize=True is Mixtral (and Qwen-MoE with norm_topk_prob=True, glm4_moe with norm_topk_prob): with identical
    experts the MoE output then equals the dense FFN output exactly, whichever the activation. renormalize=False is
    Qwen-MoE's norm_topk_prob=False. `scaling` is DeepSeek-V3's routed_scaling_factor."""
    weights_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK if scaling == 1.0 else weights_TK * scaling


def route(logits_TE: Tensor, *, top_k: int, renormalize: bool, activation: str = "softmax",
          bias_E: Tensor | None = None, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """Score the experts, choose the top k (with the bias, where there is one), weigh them. Returns (weights_TK fp32,
    ids_TK int64): `router_scores`, `choose_experts`, `combine_weights` in turn."""
    scores_TE = router_scores(logits_TE, activation)
    ids_TK = choose_experts(scores_TE, top_k=top_k, bias_E=bias_E)
    return combine_weights(scores_TE, ids_TK, renormalize=renormalize, scaling=scaling), ids_TK


def expert_capacity(tokens: int, *, top_k: int, num_experts: int, factor: float) -> int:
    """The most assignments one expert takes from `tokens` tokens: ceil(factor * tokens * top_k / num_experts)
    (GShard, Switch Transformer: factor 1 is exactly an even share)."""
    return math.ceil(factor * tokens * top_k / num_experts)


def capacity_keep(ids_TK: Tensor, scores_TK: Tensor, *, num_experts: int, capacity: int) -> Tensor:
    """keep_TK bool: which (token, slot) assignments each expert takes when it takes at most `capacity`: its
    highest-scored ones (ties: the earlier token first), the rest dropped. Sorts, no host synchronization.

    The (token, slot) pairs are ordered by score, highest first, then stably by expert, so each expert's pairs come
    out highest-scored first; a pair is kept when its rank within its expert is below the capacity."""
    ids_S, scores_S = ids_TK.reshape(-1), scores_TK.reshape(-1).float()
    by_score_S = torch.sort(scores_S, descending=True, stable=True).indices
    by_expert_S = torch.sort(ids_S[by_score_S], stable=True)
    order_S = by_score_S[by_expert_S.indices]  # pairs grouped by expert, each group highest score first
    starts_E = torch.searchsorted(by_expert_S.values, torch.arange(num_experts, device=ids_S.device))
    rank_S = torch.arange(ids_S.numel(), device=ids_S.device) - starts_E[by_expert_S.values]
    keep_S = torch.empty_like(ids_S, dtype=torch.bool)
    keep_S[order_S] = rank_S < capacity
    return keep_S.view_as(ids_TK)


def count_ids(ids: Tensor, num_experts: int, where: Tensor | None = None) -> Tensor:
    """(E,) int64: how often each expert id occurs in `ids` (only where `where` is true, when given). A scatter-add
    into E counters: unlike torch.bincount, which on CUDA reads the largest id back to the host to size its output,
    it never synchronizes."""
    flat = ids.reshape(-1)
    ones = torch.ones_like(flat) if where is None else where.reshape(-1).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, ones)


def swiglu(h_S2F: Tensor) -> Tensor:
    """silu(gate) * up for a [gate | up] concatenation along the last axis."""
    gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
    return F.silu(gate_SF) * up_SF


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _aligned_for_grouped_mm(t: Tensor) -> bool:
    """grouped_mm needs 16-byte aligned pointers and strides (e.g. bf16 with an odd multiple of 8 columns fails).

    Under torch.compile only the strides are checked: a data pointer cannot be traced, and the compiler allocates
    aligned buffers."""
    size = t.element_size()
    if not all(s * size % 16 == 0 for s in t.stride() if s != 1):
        return False
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def grouped_matmul(x_SI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """Rows of x_SI sorted by expert; rows offs_E[e-1]:offs_E[e] are multiplied by w_EIO[e]. Returns (S, O).

    One kernel call, with the group ends `offs_E` read on the device (no host synchronization); misaligned operands
    (grouped_mm needs 16-byte aligned strides) fall back to a loop of mm, which reads the sizes on the host.
    """
    if grouped_mm_available() and _aligned_for_grouped_mm(x_SI) and _aligned_for_grouped_mm(w_EIO):
        if hasattr(F, "grouped_mm"):
            return F.grouped_mm(x_SI, w_EIO, offs=offs_E)
        return torch._grouped_mm(x_SI, w_EIO, offs=offs_E)
    bounds = [0] + offs_E.tolist()
    return torch.cat([x_SI[a:b] @ w_EIO[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], dim=0)


# Compute capabilities (major) whose grouped_mm is one grouped GEMM kernel: torch's CUDA grouped GEMM runs on sm90
# (Hopper: H100, H200) and sm100 (B200, GB200) in bf16; elsewhere, and in fp32 everywhere, it falls back to a host read
# of the group sizes and one mm per expert, which is what "fused" does anyway, with its hand-written backward.
GROUPED_MM_MAJORS = (9, 10)


def grouped_mm_is_one_kernel(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs as one grouped GEMM without host synchronization here (see GROUPED_MM_MAJORS)."""
    return (device_type == "cuda" and capability is not None and capability[0] in GROUPED_MM_MAJORS
            and dtype == torch.bfloat16 and grouped_mm_available())


@functools.cache
def _capability(index: int | None) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(index) if torch.cuda.is_available() else None


def resolve_impl(impl: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 capability: tuple[int, int] | None = None) -> str:
    """The expert kernel that `impl` means on `device` for operands of `dtype` (the compute dtype: autocast's where it
    is on). "auto": "grouped_mm" where it is one grouped GEMM with no host synchronization (bf16 on Hopper or
    Blackwell; `grouped_mm_is_one_kernel`), else "fused" (measured fastest on CPU; on other GPUs, and in fp32, torch's
    grouped_mm would itself loop over the experts, and under torch.compile its fp32 meta function refuses to trace).
    `capability` defaults to the device's own (none without a GPU)."""
    if impl not in IMPLEMENTATIONS:
        raise UpcycleError(f"unknown MoE implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    device = torch.device(device)
    if device.type == "cuda" and capability is None:
        capability = _capability(device.index)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return "grouped_mm" if grouped_mm_is_one_kernel(device.type, capability, dtype) else "fused"


def compute_dtype(device: torch.device, weight: Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on for `device`, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def _segments(counts: list[int]) -> list[tuple[int, tuple[int, int]]]:
    """(expert, (start, end)) for every expert with at least one row."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, (start, start + n)))
        start += n
    return out


# The fused expert FFN: a forward and a backward written by hand (per-expert mm into preallocated buffers). Why fused
# at all: on CPU, torch 2.13's grouped_mm is itself a loop of mm, so this does the same matmuls; what it saves is the
# autograd graph around them, notably the `cat` that the backward of `chunk(2)` in `swiglu` runs on (S, 2F). The
# forward returns what the backward needs (x is an input): [gate | up], silu(gate) and the activation, which is what
# autograd would save for the same graph.
# Two bindings of the same two functions: under torch.compile a pair of torch.library custom ops tied together by
# register_autograd (one opaque node with a fake, shape-only implementation, instead of a graph break at the
# per-expert Python loop and the host read of the counts); in eager mode a plain autograd.Function, which skips the
# custom ops' per-call dispatch overhead (a few hundred microseconds of CPU per forward+backward).

def _expert_ffn_forward_impl(x_SD: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor,
                             counts_E: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y_SD, h_S2F, silu_SF, act_SF): per-expert mm into preallocated buffers."""
    S, F_ = x_SD.shape[0], down_EFD.shape[1]
    h_S2F = x_SD.new_empty(S, 2 * F_)
    y_SD = x_SD.new_empty(S, down_EFD.shape[2])
    bounds = _segments(counts_E.tolist())  # one host read of the sizes; the op is opaque to the compiler
    for e, (a, b) in bounds:
        torch.mm(x_SD[a:b], gate_up_ED2F[e], out=h_S2F[a:b])
    gate_SF, up_SF = h_S2F[:, :F_], h_S2F[:, F_:]
    silu_SF = F.silu(gate_SF)
    act_SF = silu_SF * up_SF
    for e, (a, b) in bounds:
        torch.mm(act_SF[a:b], down_EFD[e], out=y_SD[a:b])
    if S == 0:
        y_SD.zero_()
    return y_SD, h_S2F, silu_SF, act_SF


def _expert_ffn_backward_impl(grad_SD: Tensor, x_SD: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, h_S2F: Tensor,
                              silu_SF: Tensor, act_SF: Tensor, counts_E: Tensor, need_x: bool, need_gate_up: bool,
                              need_down: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_gate_up, grad_down), each empty (0 elements) where not needed: 2 mm per matmul, SwiGLU's
    gradient written straight into one (S, 2F) buffer."""
    F_ = down_EFD.shape[1]
    grad_SD = grad_SD.contiguous()  # e.g. the stride-0 gradient of .sum()
    bounds = _segments(counts_E.tolist())
    # experts without tokens get exact zeros; the others are fully overwritten by mm(out=)
    new = torch.empty_like if len(bounds) == gate_up_ED2F.shape[0] else torch.zeros_like
    grad_down_EFD = new(down_EFD) if need_down else x_SD.new_empty(0)  # outputs may not alias: one empty each
    grad_gate_up_ED2F = new(gate_up_ED2F) if need_gate_up else x_SD.new_empty(0)
    grad_act_SF = torch.empty_like(act_SF)
    for e, (a, b) in bounds:
        torch.mm(grad_SD[a:b], down_EFD[e].T, out=grad_act_SF[a:b])
        if need_down:
            torch.mm(act_SF[a:b].T, grad_SD[a:b], out=grad_down_EFD[e])
    # act = silu(gate) * up: d/d up = silu(gate); d/d gate = silu'(gate) * up
    grad_h_S2F = torch.empty_like(h_S2F)
    torch.mul(grad_act_SF, silu_SF, out=grad_h_S2F[:, F_:])
    grad_act_SF.mul_(h_S2F[:, F_:])
    torch.ops.aten.silu_backward.grad_input(grad_act_SF, h_S2F[:, :F_], grad_input=grad_h_S2F[:, :F_])
    grad_x_SD = torch.empty_like(x_SD) if need_x else x_SD.new_empty(0)
    for e, (a, b) in bounds:
        if need_gate_up:
            torch.mm(x_SD[a:b].T, grad_h_S2F[a:b], out=grad_gate_up_ED2F[e])
        if need_x:
            torch.mm(grad_h_S2F[a:b], gate_up_ED2F[e].T, out=grad_x_SD[a:b])
    if need_x and x_SD.shape[0] == 0:
        grad_x_SD.zero_()
    return grad_x_SD, grad_gate_up_ED2F, grad_down_EFD


_expert_ffn_forward = torch.library.custom_op("upcycle::expert_ffn_forward", _expert_ffn_forward_impl,
                                              mutates_args=())
_expert_ffn_backward = torch.library.custom_op("upcycle::expert_ffn_backward", _expert_ffn_backward_impl,
                                               mutates_args=())


@_expert_ffn_forward.register_fake
def _(x_SD, gate_up_ED2F, down_EFD, counts_E):
    S, F_ = x_SD.shape[0], down_EFD.shape[1]
    return (x_SD.new_empty(S, down_EFD.shape[2]), x_SD.new_empty(S, 2 * F_), x_SD.new_empty(S, F_),
            x_SD.new_empty(S, F_))


@_expert_ffn_backward.register_fake
def _(grad_SD, x_SD, gate_up_ED2F, down_EFD, h_S2F, silu_SF, act_SF, counts_E, need_x, need_gate_up, need_down):
    def maybe(t: Tensor, needed: bool) -> Tensor:
        return torch.empty_like(t) if needed else x_SD.new_empty(0)

    return maybe(x_SD, need_x), maybe(gate_up_ED2F, need_gate_up), maybe(down_EFD, need_down)


def _expert_ffn_setup_context(ctx, inputs, output) -> None:
    x_SD, gate_up_ED2F, down_EFD, counts_E = inputs
    _, h_S2F, silu_SF, act_SF = output
    ctx.save_for_backward(x_SD, gate_up_ED2F, down_EFD, h_S2F, silu_SF, act_SF, counts_E)
    ctx.set_materialize_grads(False)  # the saved intermediates get no gradient: don't allocate zeros for them


def _expert_ffn_grads(ctx, grad_SD: Tensor | None, backward) -> tuple[Tensor | None, ...]:
    """The input gradients from the saved tensors, with `backward` the custom op or its plain implementation."""
    x_SD, gate_up_ED2F, down_EFD, h_S2F, silu_SF, act_SF, counts_E = ctx.saved_tensors
    need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]
    if grad_SD is None:  # the output was not used
        return None, None, None, None
    grads = backward(grad_SD, x_SD, gate_up_ED2F, down_EFD, h_S2F, silu_SF, act_SF, counts_E,
                     need_x, need_gate_up, need_down)
    return (*(g if needed else None for g, needed in zip(grads, (need_x, need_gate_up, need_down))), None)


_expert_ffn_forward.register_autograd(lambda ctx, grad_SD, *_: _expert_ffn_grads(ctx, grad_SD, _expert_ffn_backward),
                                      setup_context=_expert_ffn_setup_context)


class _FusedExpertFFN(torch.autograd.Function):
    """The eager binding: the same forward and backward as the custom ops, without their dispatch overhead."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, counts_E: Tensor) -> Tensor:
        output = _expert_ffn_forward_impl(x_SD, gate_up_ED2F, down_EFD, counts_E)
        _expert_ffn_setup_context(ctx, (x_SD, gate_up_ED2F, down_EFD, counts_E), output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        return _expert_ffn_grads(ctx, grad_SD, _expert_ffn_backward_impl)


def _autocast_operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast to the autocast dtype where autocast is on, as it would be for `x @ w`: the expert kernels (mm(out=),
    custom ops, grouped_mm) are not autocast ops. The casts' backward returns grads in the original (fp32) dtype."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def fused_expert_ffn(x_SD: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, counts_E: Tensor) -> Tensor:
    """The fused expert FFN (custom ops under torch.compile, an autograd.Function in eager mode), autocast applied as
    it would be to `x @ w`."""
    x_SD, gate_up_ED2F, down_EFD = _autocast_operands(x_SD, gate_up_ED2F, down_EFD)
    with torch.autocast(x_SD.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return _expert_ffn_forward(x_SD, gate_up_ED2F, down_EFD, counts_E)[0]
        return _FusedExpertFFN.apply(x_SD, gate_up_ED2F, down_EFD, counts_E)


def expert_ffn_sorted(x_SD: Tensor, counts_E: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, *, impl: str) -> Tensor:
    """SwiGLU FFN of expert e on its contiguous segment of rows (counts_E[e] rows). Returns (S, D).

    "fused": one custom op forward and one backward, per-expert mm into preallocated buffers (see the custom ops).
    "grouped_mm": one grouped matmul for gate and up together, SwiGLU, one for down; the counts stay on the device.
    "loop": the whole FFN per expert with plain mm under autograd, concatenating only the (S, D) outputs (not the
    (S, 2F) hidden). All three cast to the autocast dtype where autocast is on.
    """
    if impl == "fused":
        return fused_expert_ffn(x_SD, gate_up_ED2F, down_EFD, counts_E)
    x_SD, gate_up_ED2F, down_EFD = _autocast_operands(x_SD, gate_up_ED2F, down_EFD)
    if impl == "grouped_mm":
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        h_SF = swiglu(grouped_matmul(x_SD, gate_up_ED2F, offs_E))
        return grouped_matmul(h_SF, down_EFD, offs_E)
    segments = x_SD.split(counts_E.tolist())  # one host sync for the segment sizes
    return torch.cat([swiglu(x_ND @ gate_up_ED2F[e]) @ down_EFD[e] for e, x_ND in enumerate(segments)], dim=0)


class ExpertCompute(Protocol):
    """How an MoE layer runs its experts on rows already sorted by expert (counts_E rows each): `expert_ffn_sorted`
    when every expert lives on this rank; expert parallelism swaps in a replacement (expert_parallel.ExchangedExperts)
    from outside, as FSDP is applied from outside."""

    def __call__(self, x_SD: Tensor, counts_E: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, *,
                 impl: str) -> Tensor: ...


def sort_by_expert(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(order_S, counts_E): the (token, slot) pairs in expert order (stable: token order inside each expert) and the
    number of pairs per expert, without a host synchronization and with shapes fixed by the inputs.

    The sort runs on int32 keys (expert ids fit easily) and the counts come from a binary search of the sorted ids
    (E searches) instead of `bincount`, which reads the maximum id on the host and has a data-dependent output size.
    """
    ids_S = ids_TK.reshape(-1).to(torch.int32)
    sorted_S, order_S = torch.sort(ids_S, stable=True)
    ends_E = torch.searchsorted(sorted_S, torch.arange(1, num_experts + 1, dtype=torch.int32, device=ids_S.device))
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    return order_S, counts_E


class _GatherTokens(torch.autograd.Function):
    """x_SD[s] = x_TD[token_S[s]] for the (token, slot) pairs in expert order; the backward is a gather too.

    Autograd's backward of index_select is an index_add (a scatter-add into (T, D), which the CPU runs as a
    scatter_add over an index expanded to (S, D)). Here the pairs are a permutation of the T*K (token, slot) rows, so
    the gradient of token t is the sum of its K rows of grad_x_SD, read in (token, slot) order through the inverse
    permutation: one index_select and a sum over K, both vectorized and parallel, no scatter.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_S: Tensor, inverse_S: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse_S)
        ctx.shape = (x_TD.shape[0], top_k, x_TD.shape[1])
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        (inverse_S,) = ctx.saved_tensors
        # (S, D) in expert order -> (T*K, D) in (token, slot) order -> (T, K, D) -> sum over the K slots
        grad_TKD = grad_SD.index_select(0, inverse_S).view(ctx.shape)
        return grad_TKD.sum(1), None, None, None


class PermuteRows(torch.autograd.Function):
    """out[i] = x[perm[i]] for a permutation `perm` of x's rows; the backward gathers with the inverse permutation
    (autograd's backward of index_select would be a scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def inverse_permutation(perm: Tensor) -> Tensor:
    return torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.shape[0], device=perm.device))


def experts_grouped(
    x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor, *, impl: str = "auto",
    num_experts: int | None = None, compute: ExpertCompute = expert_ffn_sorted, keep_TK: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The fast path: all (token, slot) pairs sorted by expert, each expert's rows one contiguous block of matmuls.
    `impl` as in `MoE` ("auto" resolves on x's device, like everywhere else). `compute` runs the experts on the sorted
    rows: `expert_ffn_sorted` here, or a replacement that sends the rows to the ranks holding the experts (expert
    parallelism; the weights are then this rank's experts only and `num_experts` counts all of them). `keep_TK`
    (capacity_keep): the pairs to compute; the others are never sent to an expert, and their weights must be 0.

    Returns (out_TD, counts_E) with counts_E the (token, slot) pairs computed per expert.
    """
    impl = resolve_impl(impl, x_TD.device, compute_dtype(x_TD.device, gate_up_ED2F))
    if impl == "reference":
        raise UpcycleError("experts_grouped runs the fast kernels; call experts_reference for the reference loop")
    T, K = ids_TK.shape
    num_experts = gate_up_ED2F.shape[0] if num_experts is None else num_experts
    # dropped pairs get the id one past the last expert: they sort after every expert's rows and count for none
    sort_ids_TK = ids_TK if keep_TK is None else ids_TK.masked_fill(~keep_TK, num_experts)
    order_S, counts_E = sort_by_expert(sort_ids_TK, num_experts)
    # inverse_S[p] = the sorted position of (token, slot) pair p = t*K + k
    inverse_S = inverse_permutation(order_S)
    token_S = order_S.div(K, rounding_mode="floor")
    # gather: each pair's token row, in expert order (forward and backward are row gathers, no scatter-add)
    x_SD = _GatherTokens.apply(x_TD, token_S, inverse_S, K)
    if keep_TK is not None:  # only the kept rows go to the experts (one host read of how many there are)
        kept = int(counts_E.sum())
        x_SD = x_SD[:kept]
    # expert compute, here or on the ranks that hold the experts
    y_SD = compute(x_SD, counts_E, gate_up_ED2F, down_EFD, impl=impl)
    if keep_TK is not None:  # the dropped pairs' rows: zeros (their weights are 0 anyway)
        y_SD = torch.cat([y_SD, y_SD.new_zeros(T * K - kept, y_SD.shape[1])])
    # combine: back to (token, slot) order (a gather both ways), then each token's weighted sum of its K slots as one
    # batched (1, K) @ (K, D) product: half the time of a multiply-then-sum and its backward on CPU, which write and
    # read a (T, K, D) temporary. Weights in y's dtype (under autocast the experts return bf16, like F.linear)
    y_TKD = PermuteRows.apply(y_SD, inverse_S, order_S).view(T, K, y_SD.shape[1])
    out_TD = torch.bmm(weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
    return out_TD, counts_E


def experts_reference(
    x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, gate_up_ED2F: Tensor, down_EFD: Tensor,
    keep_TK: Tensor | None = None,
) -> Tensor:
    """The slow, obvious definition: for each expert, find its (kept) tokens, run the SwiGLU FFN, add weighted
    results."""
    out_TD = None  # in the experts' output dtype, as the fast path (under autocast: bf16 from fp32 inputs)
    for e in range(gate_up_ED2F.shape[0]):
        token_N, slot_N = torch.where((ids_TK == e) if keep_TK is None else (ids_TK == e) & keep_TK)
        if token_N.numel() == 0:
            continue
        y_ND = swiglu(x_TD[token_N] @ gate_up_ED2F[e]) @ down_EFD[e]
        if out_TD is None:
            out_TD = y_ND.new_zeros(x_TD.shape)
        out_TD = out_TD.index_add(0, token_N, y_ND * weights_TK[token_N, slot_N, None].to(y_ND.dtype))
    return torch.zeros_like(x_TD) if out_TD is None else out_TD


class MoE(nn.Module):
    """Top-k MoE with SwiGLU experts, dropless unless `capacity_factor` (then only while training). `impl` picks the
    expert kernel; "reference" runs the per-expert loop. `activation`, `scaling` and `renormalize` say how the router
    scores and weighs experts (`route`); `expert_bias` adds the per-expert fp32 buffer `expert_bias_E` that steers the
    choice (zeros until the trainer updates it: DeepSeek-V3's aux-loss-free balancing)."""

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, renormalize: bool = True,
                 impl: str = "auto", *, activation: str = "softmax", scaling: float = 1.0, expert_bias: bool = False,
                 capacity_factor: float | None = None):
        super().__init__()
        check_moe_sizes(num_experts=num_experts, top_k=top_k)
        self.num_experts, self.top_k, self.renormalize, self.impl = num_experts, top_k, renormalize, impl
        self.activation, self.scaling, self.capacity_factor = activation, scaling, capacity_factor
        # the replaceable part: expert parallelism swaps it, and the weights then hold only this rank's experts
        self.expert_compute: ExpertCompute = expert_ffn_sorted
        self.router = nn.Linear(dim, num_experts, bias=False)  # weight [E, D]
        self.gate_up_ED2F = nn.Parameter(torch.empty(num_experts, dim, 2 * ffn_dim))
        self.down_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        # not a parameter: no gradient and no optimizer state; updated between steps, saved with the weights
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32) if expert_bias else None)

    def init_weights(self, std: float) -> None:
        for w in (self.router.weight, self.gate_up_ED2F, self.down_EFD):
            nn.init.normal_(w, mean=0.0, std=std)
        if self.expert_bias_E is not None:
            nn.init.zeros_(self.expert_bias_E)

    def forward(self, x_TD: Tensor) -> MoEOutput:
        # route: logits in fp32 (see `router_scores`), computed from fp32 copies so bf16 rounding cannot flip top-k
        # choices; autocast off here, or it would run this F.linear in bf16 anyway
        with torch.autocast(x_TD.device.type, enabled=False):
            x32_TD, weight = x_TD.float(), self.router.weight
            # through the module where its weight is fp32: under expert parallelism the router is an FSDP unit of its
            # own (fp32), whose hooks gather the weight when the module is called
            logits_TE = self.router(x32_TD) if weight.dtype == torch.float32 else F.linear(x32_TD, weight.float())
        scores_TE = router_scores(logits_TE, self.activation)
        ids_TK = choose_experts(scores_TE, top_k=self.top_k, bias_E=self.expert_bias_E)
        weights_TK = combine_weights(scores_TE, ids_TK, renormalize=self.renormalize, scaling=self.scaling)
        counts_E = count_ids(ids_TK, self.num_experts)
        keep_TK = dropped_E = None
        if self.capacity_factor is not None and self.training:  # on this forward's tokens (a rank's micro-batch)
            capacity = expert_capacity(ids_TK.shape[0], top_k=self.top_k, num_experts=self.num_experts,
                                       factor=self.capacity_factor)
            keep_TK = capacity_keep(ids_TK, scores_TE.detach().gather(1, ids_TK), num_experts=self.num_experts,
                                    capacity=capacity)
            weights_TK = weights_TK * keep_TK
            dropped_E = count_ids(ids_TK, self.num_experts, where=~keep_TK)
        impl = resolve_impl(self.impl, x_TD.device, compute_dtype(x_TD.device, self.gate_up_ED2F))
        local = self.expert_compute is expert_ffn_sorted
        if impl == "reference" and local:
            out_TD = experts_reference(x_TD, weights_TK, ids_TK, self.gate_up_ED2F, self.down_EFD, keep_TK)
        else:
            if impl == "reference":  # the reference loop needs every expert; sharded, the loop kernel is the plain one
                impl = "loop"
            out_TD, _ = experts_grouped(x_TD, weights_TK, ids_TK, self.gate_up_ED2F, self.down_EFD, impl=impl,
                                        num_experts=self.num_experts, compute=self.expert_compute, keep_TK=keep_TK)
        return MoEOutput(out_TD, logits_TE, counts_E, dropped_E)
