"""Routing beyond softmax top-k: sigmoid scores, the per-expert balancing bias (DeepSeek-V3), routed scaling, and the
capacity factor (assignments over an expert's cap dropped), each in every expert kernel against the reference loop,
forward and backward, in fp32 and under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from upcycle.errors import UpcycleError
from upcycle.model.config import ModelConfig
from upcycle.model.moe import (MoE, capacity_keep, choose_experts, combine_weights, expert_capacity, route,
                               router_scores)

T, D, FFN, E, K = 40, 16, 12, 6, 2
KERNELS = ("fused", "grouped_mm", "loop")


def make_moe(seed: int = 0, **kwargs) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(D, FFN, E, K, **kwargs)
    moe.init_weights(0.3)
    if moe.expert_bias_E is not None:  # a bias that changes some choices
        moe.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, E))
    return moe


def run(moe: MoE, impl: str, x_TD: torch.Tensor, grad_TD: torch.Tensor):
    """(out, grad x, parameter grads, counts, dropped) of one forward and backward with kernel `impl`."""
    moe.zero_grad()
    moe.impl = impl
    x = x_TD.clone().requires_grad_(True)
    out = moe(x)
    (out.out_TD.float() * grad_TD).sum().backward()
    return out.out_TD.detach().float(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()}, \
        out.counts_E, out.dropped_E


def assert_same(fast, ref, *, tol: float, what: str) -> None:
    """Elementwise within `tol` in fp32; in bf16 (tol >= 1e-2) within `tol` of the reference's norm, since a sum of
    many bf16 products near zero has no useful elementwise relative error."""
    def close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
        if tol < 1e-2:
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=f"{what}: {name}")
        else:
            assert (got - expected).norm() <= tol * expected.norm(), (what, name)

    close(fast[0], ref[0], "out")
    close(fast[1], ref[1], "grad x")
    for name, grad in ref[2].items():
        assert grad.abs().sum() > 0, (what, name)
        close(fast[2][name], grad, name)
    assert torch.equal(fast[3], ref[3]), what
    assert (fast[4] is None and ref[4] is None) or torch.equal(fast[4], ref[4]), what


SETTINGS = {
    "sigmoid": dict(activation="sigmoid"),
    "sigmoid+bias+scaling": dict(activation="sigmoid", expert_bias=True, scaling=2.5),
    "sigmoid unnormalized": dict(activation="sigmoid", renormalize=False, expert_bias=True),
    "softmax+bias": dict(activation="softmax", expert_bias=True),
    "capacity": dict(capacity_factor=1.0),
    "sigmoid+bias+capacity": dict(activation="sigmoid", expert_bias=True, capacity_factor=0.75),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("impl", KERNELS)
def test_every_kernel_matches_the_reference_loop_in_fp32(setting, impl):
    moe = make_moe(**SETTINGS[setting]).train()
    torch.manual_seed(1)
    x_TD, grad_TD = torch.randn(T, D), torch.randn(T, D)
    ref = run(moe, "reference", x_TD, grad_TD)
    assert_same(run(moe, impl, x_TD, grad_TD), ref, tol=1e-5, what=f"{setting} {impl}")
    if moe.capacity_factor is not None:
        assert ref[4].sum() > 0  # the cap bit: the comparison covers dropped assignments


@pytest.mark.parametrize("setting", ["sigmoid+bias+scaling", "sigmoid+bias+capacity"])
def test_every_kernel_matches_the_reference_loop_under_bf16_autocast(setting):
    moe = make_moe(**SETTINGS[setting]).train()
    torch.manual_seed(2)
    x_TD, grad_TD = torch.randn(T, D), torch.randn(T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(moe, "reference", x_TD, grad_TD)
        for impl in KERNELS:
            fast = run(moe, impl, x_TD, grad_TD)
            assert_same(fast, ref, tol=2e-2, what=f"{setting} {impl} bf16")
            assert all(g.dtype == torch.float32 for g in fast[2].values())


def test_sigmoid_routing_follows_deepseek_v3():
    """Scores are independent sigmoids; the bias steers the choice only; weights are the chosen scores, renormalized,
    times the routed scaling."""
    torch.manual_seed(3)
    logits_TE = torch.randn(T, E)
    bias_E = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0])  # expert 5 always chosen, whatever its score
    weights_TK, ids_TK = route(logits_TE, top_k=K, renormalize=True, activation="sigmoid", bias_E=bias_E,
                               scaling=2.0)
    scores_TE = torch.sigmoid(logits_TE)
    assert (ids_TK == 5).any(dim=-1).all()
    assert torch.equal(ids_TK, torch.topk(scores_TE + bias_E, K, dim=-1).indices)
    chosen_TK = scores_TE.gather(1, ids_TK)
    torch.testing.assert_close(weights_TK, 2.0 * chosen_TK / chosen_TK.sum(-1, keepdim=True))
    unnormalized, same_ids = route(logits_TE, top_k=K, renormalize=False, activation="sigmoid", bias_E=bias_E)
    assert torch.equal(same_ids, ids_TK)
    torch.testing.assert_close(unnormalized, chosen_TK)  # the bias never enters the weights
    with pytest.raises(UpcycleError, match="router activation"):
        router_scores(logits_TE, "tanh")


def test_routing_equals_transformers_glm4_moe_router():
    """Our route against transformers' Glm4MoeTopkRouter (n_group 1), with a bias, renormalization and scaling."""
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    config = Glm4MoeConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=1, topk_group=1,
                           norm_topk_prob=True, routed_scaling_factor=1.7)
    router = Glm4MoeTopkRouter(config)
    torch.manual_seed(4)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.copy_(torch.randn(E) * 0.2)
    x_TD = torch.randn(T, D)
    logits_TE, hf_weights_TK, hf_ids_TK = router(x_TD)
    weights_TK, ids_TK = route(logits_TE, top_k=K, renormalize=True, activation="sigmoid",
                               bias_E=router.e_score_correction_bias, scaling=1.7)
    order = hf_ids_TK.argsort(-1)  # transformers' topk is unsorted
    assert torch.equal(ids_TK.sort(-1).values, hf_ids_TK.gather(1, order))
    torch.testing.assert_close(weights_TK.gather(1, ids_TK.argsort(-1)), hf_weights_TK.gather(1, order))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_identical_experts_are_the_dense_ffn_with_either_activation(activation):
    """Naive upcycling at r = 0: renormalized weights sum to 1, so identical experts compute the dense FFN, whatever
    the scores and the bias."""
    moe = make_moe(activation=activation, expert_bias=True)
    with torch.no_grad():
        moe.gate_up_ED2F.copy_(moe.gate_up_ED2F[:1].expand_as(moe.gate_up_ED2F))
        moe.down_EFD.copy_(moe.down_EFD[:1].expand_as(moe.down_EFD))
    x_TD = torch.randn(T, D)
    dense_TD = (F.silu(x_TD @ moe.gate_up_ED2F[0, :, :FFN]) * (x_TD @ moe.gate_up_ED2F[0, :, FFN:])) @ moe.down_EFD[0]
    for impl in ("reference", *KERNELS):
        moe.impl = impl
        torch.testing.assert_close(moe(x_TD).out_TD, dense_TD, rtol=1e-5, atol=1e-6, msg=impl)


def capacity_keep_reference(ids_TK: torch.Tensor, scores_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """The obvious definition: each expert lists its (token, slot) pairs by score, highest first, the earlier pair first
    among equal scores, and keeps the first `capacity`."""
    keep = torch.zeros_like(ids_TK, dtype=torch.bool)
    pairs = [(t, k) for t in range(ids_TK.shape[0]) for k in range(ids_TK.shape[1])]
    for e in ids_TK.unique().tolist():
        mine = sorted((p for p in pairs if ids_TK[p] == e), key=lambda p: (-float(scores_TK[p]), p))
        for p in mine[:capacity]:
            keep[p] = True
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_capacity_keep_matches_the_obvious_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = 37
    logits_TE = torch.randn(tokens, E, generator=gen) + torch.linspace(0, 1.5, E)  # skewed: some experts overflow
    scores_TE = torch.softmax(logits_TE, -1)
    ids_TK = choose_experts(scores_TE, top_k=K)
    scores_TK = scores_TE.gather(1, ids_TK)
    scores_TK[::5] = 0.25  # ties: decided by the earlier pair
    for factor in (0.5, 1.0, 1.25):
        capacity = expert_capacity(tokens, top_k=K, num_experts=E, factor=factor)
        keep = capacity_keep(ids_TK, scores_TK, num_experts=E, capacity=capacity)
        assert torch.equal(keep, capacity_keep_reference(ids_TK, scores_TK, capacity)), factor
        per_expert = torch.bincount(ids_TK[keep], minlength=E)
        assert per_expert.max() <= capacity
        if factor == 0.5:
            assert (~keep).any()


def test_capacity_formula_and_a_large_factor_drops_nothing():
    assert expert_capacity(40, top_k=2, num_experts=6, factor=1.0) == math.ceil(40 * 2 / 6) == 14
    assert expert_capacity(40, top_k=2, num_experts=6, factor=1.25) == 17
    moe = make_moe(capacity_factor=float(E)).train()  # E x an even share: every expert could take every token
    x_TD = torch.randn(T, D)
    out = moe(x_TD)
    assert out.dropped_E.tolist() == [0] * E
    moe.capacity_factor = None
    torch.testing.assert_close(out.out_TD, moe(x_TD).out_TD, rtol=0, atol=0)


def test_capacity_drops_only_while_training_and_counts_what_it_drops():
    moe = make_moe(capacity_factor=0.5).train()
    torch.manual_seed(5)
    x_TD = torch.randn(T, D)
    out = moe(x_TD)
    capacity = expert_capacity(T, top_k=K, num_experts=E, factor=0.5)
    kept_E = out.counts_E - out.dropped_E
    assert out.counts_E.sum() == T * K and kept_E.max() <= capacity and out.dropped_E.sum() > 0
    assert torch.equal(kept_E, torch.minimum(out.counts_E, torch.full_like(out.counts_E, capacity)))
    moe.eval()
    evaluated = moe(x_TD)
    assert evaluated.dropped_E is None
    moe.capacity_factor = None
    torch.testing.assert_close(evaluated.out_TD, moe(x_TD).out_TD, rtol=0, atol=0)  # eval is dropless


def test_a_dropped_token_keeps_its_other_expert():
    """A token whose first expert is over its cap still gets its second expert's output, weighted as before."""
    moe = make_moe(capacity_factor=0.5).train()
    torch.manual_seed(6)
    x_TD = torch.randn(T, D)
    out = moe(x_TD)
    scores_TE = torch.softmax(out.router_logits_TE, -1)
    ids_TK = choose_experts(scores_TE, top_k=K)
    weights_TK = combine_weights(scores_TE, ids_TK, renormalize=True)
    keep_TK = capacity_keep(ids_TK, scores_TE.gather(1, ids_TK), num_experts=E,
                            capacity=expert_capacity(T, top_k=K, num_experts=E, factor=0.5))
    partly = (keep_TK.sum(-1) == 1).nonzero().flatten()
    assert partly.numel() > 0
    t = int(partly[0])
    k = int(keep_TK[t].int().argmax())
    e = int(ids_TK[t, k])
    h_F = F.silu(x_TD[t] @ moe.gate_up_ED2F[e, :, :FFN]) * (x_TD[t] @ moe.gate_up_ED2F[e, :, FFN:])
    torch.testing.assert_close(out.out_TD[t], weights_TK[t, k] * (h_F @ moe.down_EFD[e]), rtol=1e-5, atol=1e-6)


def test_model_config_refuses_bad_routing_values():
    base = dict(vocab_size=8, dim=8, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=8, num_experts=2, top_k=1)
    for field, value in (("capacity_factor", -1.0), ("capacity_factor", float("nan")), ("routed_scaling", 0.0),
                         ("routed_scaling", float("inf")), ("router_activation", "relu")):
        with pytest.raises(UpcycleError, match=field):
            ModelConfig(**base, **{field: value})
