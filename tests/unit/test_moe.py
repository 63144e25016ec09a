"""The MoE layer (grouped path vs the per-expert reference loop, dense equivalence, parity with transformers' Mixtral
block) and the routing losses (against transformers' load_balancing_loss_func and hand examples)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from upcycle.errors import UpcycleError
from upcycle.train.losses import cross_entropy, load_balancing_loss, router_z_loss
from upcycle.model.moe import MoE, expert_ffn_sorted, experts_grouped, resolve_impl, route, sort_by_expert

T, D, FFN, E, K = 24, 16, 12, 4, 2


def make_moe(seed: int = 0, num_experts: int = E, top_k: int = K, renormalize: bool = True) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(D, FFN, num_experts, top_k, renormalize)
    moe.init_weights(0.3)  # large enough that routing is decisive and the outputs are far from zero
    return moe


def forward_backward(moe: MoE, impl: str, x_TD: torch.Tensor, grad_TD: torch.Tensor):
    moe.zero_grad()
    x = x_TD.clone().requires_grad_(True)
    moe.impl = impl
    out_TD, logits_TE, counts_E, _ = moe(x)
    # A contiguous random upstream gradient: grouped_mm's backward rejects the stride-0 gradient of .sum().
    (out_TD * grad_TD).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    return out_TD.detach(), x.grad.clone(), grads, counts_E


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop"])
def test_fast_path_matches_reference_outputs_and_gradients(impl):
    moe = make_moe()
    torch.manual_seed(1)
    x_TD, grad_TD = torch.randn(T, D), torch.randn(T, D)
    ref = forward_backward(moe, "reference", x_TD, grad_TD)
    fast = forward_backward(moe, impl, x_TD, grad_TD)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-6)
    assert set(fast[2]) == {"router.weight", "gate_up_ED2F", "down_EFD"}
    for name in fast[2]:
        assert fast[2][name].abs().sum() > 0, name
        torch.testing.assert_close(fast[2][name], ref[2][name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(fast[3], ref[3])


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop"])
def test_fast_path_handles_empty_experts(impl):
    moe = make_moe(num_experts=6, top_k=2)
    with torch.no_grad():  # experts 2..5 can never win: every token goes to experts 0 and 1
        moe.router.weight[2:] = -moe.router.weight[:2].abs().sum() - 10.0
    torch.manual_seed(2)
    x_TD, grad_TD = torch.randn(T, D).abs(), torch.randn(T, D)
    moe.router.weight.data[:2] = moe.router.weight.data[:2].abs()
    ref = forward_backward(moe, "reference", x_TD, grad_TD)
    fast = forward_backward(moe, impl, x_TD, grad_TD)
    assert fast[3].tolist() == [T, T, 0, 0, 0, 0]
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-6)
    for name in ("router.weight", "gate_up_ED2F", "down_EFD"):
        torch.testing.assert_close(fast[2][name], ref[2][name], rtol=1e-5, atol=1e-6, msg=name)
    # experts without tokens get exact zero gradients (not uninitialized memory)
    assert torch.equal(fast[2]["gate_up_ED2F"][2:], torch.zeros_like(fast[2]["gate_up_ED2F"][2:]))
    assert torch.equal(fast[2]["down_EFD"][2:], torch.zeros_like(fast[2]["down_EFD"][2:]))


def test_fused_expert_ffn_matches_autograd_on_sorted_rows():
    """The hand-written backward of the fused Function against autograd through the plain loop, with an empty
    expert in the middle, only some inputs requiring grad, and a stride-0 upstream gradient (from .sum())."""
    torch.manual_seed(9)
    counts_E = torch.tensor([5, 0, 7, 3])
    x_SD = torch.randn(int(counts_E.sum()), D, dtype=torch.float64)
    gate_up_ED2F = torch.randn(4, D, 2 * FFN, dtype=torch.float64) * 0.3
    down_EFD = torch.randn(4, FFN, D, dtype=torch.float64) * 0.3
    grad_SD = torch.randn(x_SD.shape[0], D, dtype=torch.float64)
    for needs in [(True, True, True), (False, True, True), (True, False, False)]:
        results = {}
        for impl in ("fused", "loop"):
            leaves = [t.clone().requires_grad_(r) for t, r in zip((x_SD, gate_up_ED2F, down_EFD), needs)]
            y_SD = expert_ffn_sorted(leaves[0], counts_E, leaves[1], leaves[2], impl=impl)
            (y_SD * grad_SD).sum().backward()
            results[impl] = [y_SD.detach()] + [t.grad for t in leaves]
        for got, want in zip(results["fused"], results["loop"]):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    leaves = [t.clone().requires_grad_() for t in (x_SD, gate_up_ED2F, down_EFD)]
    expert_ffn_sorted(leaves[0], counts_E, leaves[1], leaves[2], impl="fused").sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    assert torch.equal(leaves[1].grad[1], torch.zeros_like(leaves[1].grad[1]))


def test_fused_path_under_cpu_autocast_runs_experts_in_bf16_with_fp32_grads():
    moe = make_moe()
    moe.impl = "fused"
    torch.manual_seed(10)
    x_TD = torch.randn(T, D)
    expected = moe(x_TD).out_TD.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_TD = moe(x_TD).out_TD
    assert out_TD.dtype == torch.bfloat16
    torch.testing.assert_close(out_TD.float(), expected, rtol=0.05, atol=0.05)
    out_TD.float().square().sum().backward()
    assert moe.gate_up_ED2F.grad.dtype == torch.float32 and moe.gate_up_ED2F.grad.abs().sum() > 0


def test_every_kernel_under_cpu_autocast_matches_the_reference_and_keeps_the_router_in_fp32():
    """Under autocast the expert kernels run in bf16 (the operands are cast as `x @ w` would be) while the router
    logits stay fp32 (an autocast F.linear would otherwise compute them in bf16 and could flip top-k choices)."""
    moe = make_moe()
    torch.manual_seed(11)
    x_TD = torch.randn(T, D)
    results = {}
    for impl in ("reference", "fused", "grouped_mm", "loop"):
        moe.impl = impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe(x_TD)
        assert out.router_logits_TE.dtype == torch.float32, impl
        assert out.out_TD.dtype == torch.bfloat16, impl
        results[impl] = out
    fp32_logits = F.linear(x_TD, moe.router.weight)
    torch.testing.assert_close(results["fused"].router_logits_TE, fp32_logits, rtol=1e-6, atol=1e-6)
    for impl in ("fused", "grouped_mm", "loop"):
        torch.testing.assert_close(results[impl].out_TD.float(), results["reference"].out_TD.float(), rtol=2e-2,
                                   atol=2e-2, msg=impl)


def test_auto_picks_grouped_mm_only_where_it_is_one_kernel():
    assert resolve_impl("auto", torch.device("cpu")) == "fused"
    # resolving needs no GPU: grouped_mm only where it is one kernel (bf16 on sm90/sm100), fused elsewhere
    assert resolve_impl("auto", "cuda", torch.bfloat16, capability=(9, 0)) == "grouped_mm"
    assert resolve_impl("auto", "cuda", torch.bfloat16, capability=(10, 0)) == "grouped_mm"
    assert resolve_impl("auto", "cuda", torch.float32, capability=(9, 0)) == "fused"  # compile's meta refuses fp32
    assert resolve_impl("auto", "cuda", torch.bfloat16, capability=(8, 0)) == "fused"  # A100: a per-expert loop
    assert resolve_impl("auto", "cpu", torch.bfloat16) == "fused"
    assert resolve_impl("loop", "cuda") == "loop"
    with pytest.raises(UpcycleError, match="unknown MoE implementation"):
        resolve_impl("fast", "cpu")


def test_experts_grouped_defaults_to_the_same_kernel_as_the_module():
    """experts_grouped's default is "auto" like MoE's, not a different kernel: same numbers as the module's path."""
    moe = make_moe()
    torch.manual_seed(12)
    x_TD = torch.randn(T, D)
    weights_TK, ids_TK = route(F.linear(x_TD, moe.router.weight), top_k=K, renormalize=True)
    out_TD, counts_E = experts_grouped(x_TD, weights_TK, ids_TK, moe.gate_up_ED2F, moe.down_EFD)
    moe.impl = "auto"
    assert torch.equal(out_TD, moe(x_TD).out_TD)
    with pytest.raises(UpcycleError, match="experts_reference"):
        experts_grouped(x_TD, weights_TK, ids_TK, moe.gate_up_ED2F, moe.down_EFD, impl="reference")


@pytest.mark.parametrize("num_experts", [1, 4, 9])
def test_sort_by_expert_is_a_stable_counting_sort(num_experts):
    torch.manual_seed(13)
    ids_TK = torch.randint(num_experts, (37, min(2, num_experts)))
    ids_TK[:, 0] = ids_TK[:, 0].clamp(max=num_experts - 2) if num_experts > 2 else ids_TK[:, 0]  # some expert empty
    order_S, counts_E = sort_by_expert(ids_TK, num_experts)
    ids_S = ids_TK.reshape(-1)
    assert torch.equal(order_S, torch.argsort(ids_S, stable=True))
    assert torch.equal(counts_E, torch.bincount(ids_S, minlength=num_experts))
    assert counts_E.dtype == torch.int64 and order_S.dtype == torch.int64


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
def test_compiled_block_has_no_graph_break_and_matches_eager(impl):
    """The fused kernel is a torch.library custom op with a fake implementation, and routing has static shapes
    (no bincount, no host read of the counts), so a whole MoE block compiles as one graph (fullgraph=True raises on a
    break). aot_eager runs dynamo and AOTAutograd (fake tensors, the registered backward) without a C++ compiler.
    grouped_mm only traces in bf16, as its fake implementation requires: it runs under autocast here."""
    from upcycle.model.transformer import ModelConfig, Transformer

    torch.manual_seed(14)
    model = Transformer(ModelConfig(vocab_size=32, dim=D, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=FFN,
                                    num_experts=E, top_k=K, max_seq_len=12))
    block = model.layers[0]
    block.ffn.impl = impl
    x_BTD = torch.randn(2, 12, D)
    cos, sin = model.rope_cos_sin(12, torch.float32)
    grad_BTD = torch.randn(2, 12, D)
    autocast = impl == "grouped_mm"
    results = []
    torch._dynamo.reset()
    for module in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        block.zero_grad(set_to_none=True)
        x = x_BTD.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden, logits_TE, counts_E, _ = module(x, cos, sin)
        (hidden.float() * grad_BTD).sum().backward()
        results.append((hidden.detach().float(), counts_E, x.grad, block.ffn.gate_up_ED2F.grad.clone()))
    torch._dynamo.reset()
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_bf16_paths_agree_with_fp32_reference():
    moe = make_moe()
    torch.manual_seed(3)
    x_TD = torch.randn(T, D)
    expected = moe(x_TD).out_TD
    moe_bf16 = make_moe().to(torch.bfloat16)
    for impl in ("fused", "grouped_mm", "loop", "auto"):
        moe_bf16.impl = impl
        out = moe_bf16(x_TD.to(torch.bfloat16))
        assert out.out_TD.dtype == torch.bfloat16 and out.router_logits_TE.dtype == torch.float32
        torch.testing.assert_close(out.out_TD.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 1), (4, 2), (8, 3)])
def test_identical_experts_reproduce_the_dense_ffn(num_experts, top_k):
    """Naive upcycling invariant: a dense FFN in every expert + renormalized top-k = the dense FFN, values and grads."""
    torch.manual_seed(4)
    gate, up, down = torch.randn(FFN, D) * 0.3, torch.randn(FFN, D) * 0.3, torch.randn(D, FFN) * 0.3
    moe = make_moe(num_experts=num_experts, top_k=top_k)
    with torch.no_grad():
        moe.gate_up_ED2F.copy_(torch.cat([gate, up], dim=0).T.expand(num_experts, D, 2 * FFN))
        moe.down_EFD.copy_(down.T.expand(num_experts, FFN, D))
    x_TD, grad_TD = torch.randn(T, D, requires_grad=True), torch.randn(T, D)
    dense_TD = F.linear(F.silu(F.linear(x_TD, gate)) * F.linear(x_TD, up), down)
    (gx_dense,) = torch.autograd.grad((dense_TD * grad_TD).sum(), x_TD)
    for impl in ("fused", "grouped_mm", "loop", "reference"):
        moe.impl = impl
        out_TD = moe(x_TD).out_TD
        torch.testing.assert_close(out_TD, dense_TD, rtol=1e-5, atol=1e-6)
        (gx,) = torch.autograd.grad((out_TD * grad_TD).sum(), x_TD)
        torch.testing.assert_close(gx, gx_dense, rtol=1e-5, atol=1e-6)


def test_without_renormalization_output_is_scaled_by_the_kept_probability():
    """Qwen-MoE norm_topk_prob=False: identical experts give dense * (sum of the top-k probabilities)."""
    moe = make_moe(renormalize=False)
    with torch.no_grad():
        moe.gate_up_ED2F.copy_(moe.gate_up_ED2F[:1].expand_as(moe.gate_up_ED2F))
        moe.down_EFD.copy_(moe.down_EFD[:1].expand_as(moe.down_EFD))
    torch.manual_seed(5)
    x_TD = torch.randn(T, D)
    out = moe(x_TD)
    kept_T1 = torch.softmax(out.router_logits_TE, -1).topk(K, dim=-1).values.sum(-1, keepdim=True)
    assert (kept_T1 < 0.999).all()
    dense_TD = (F.silu(x_TD @ moe.gate_up_ED2F[0, :, :FFN]) * (x_TD @ moe.gate_up_ED2F[0, :, FFN:])) @ moe.down_EFD[0]
    torch.testing.assert_close(out.out_TD, dense_TD * kept_T1, rtol=1e-5, atol=1e-6)


def test_route_is_fp32_topk_of_softmax():
    torch.manual_seed(6)
    logits_TE = torch.randn(T, E, dtype=torch.bfloat16)
    weights_TK, ids_TK = route(logits_TE, top_k=K, renormalize=True)
    assert weights_TK.dtype == torch.float32
    probs_TE = torch.softmax(logits_TE.float(), -1)
    assert torch.equal(ids_TK, probs_TE.topk(K, dim=-1).indices)
    torch.testing.assert_close(weights_TK.sum(-1), torch.ones(T))
    raw_TK, _ = route(logits_TE, top_k=K, renormalize=False)
    torch.testing.assert_close(raw_TK, probs_TE.gather(1, ids_TK))


def test_counts_and_router_logits_are_returned():
    moe = make_moe()
    x_TD = torch.randn(T, D)
    out = moe(x_TD)
    assert out.router_logits_TE.shape == (T, E) and out.router_logits_TE.requires_grad
    torch.testing.assert_close(out.router_logits_TE, x_TD @ moe.router.weight.T)
    assert out.counts_E.sum() == T * K and not out.counts_E.requires_grad
    assert torch.equal(out.counts_E, torch.bincount(out.router_logits_TE.topk(K, -1).indices.flatten(), minlength=E))


def test_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    moe = make_moe()
    config = MixtralConfig(hidden_size=D, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=K)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.gate_up_ED2F.transpose(1, 2))
        block.experts.down_proj.copy_(moe.down_EFD.transpose(1, 2))
    x_BTD = torch.randn(2, T // 2, D)
    torch.testing.assert_close(moe(x_BTD.view(T, D)).out_TD, block(x_BTD).view(T, D), rtol=1e-5, atol=1e-6)


def test_bad_routing_config_is_refused():
    with pytest.raises(UpcycleError, match="top_k"):
        MoE(D, FFN, num_experts=2, top_k=3)
    moe = make_moe()
    moe.impl = "magic"
    with pytest.raises(UpcycleError, match="implementation"):
        moe(torch.randn(T, D))


# ---- losses ----

def layer_logits(seed: int, layers: int = 3, tokens: int = 40, experts: int = E) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Different layers get different biases so that pooling and per-layer averaging really differ.
    return [torch.randn(tokens, experts, generator=g) * 2 + torch.randn(experts, generator=g) * 2
            for _ in range(layers)]


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_equals_transformers(top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = layer_logits(7)
    ours = load_balancing_loss(router_logits=logits, top_k=top_k)
    theirs = load_balancing_loss_func(tuple(logits), num_experts=E, top_k=top_k)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    per_layer = load_balancing_loss(router_logits=logits, top_k=top_k, per_layer=True)
    expected = torch.stack([load_balancing_loss_func((x,), num_experts=E, top_k=top_k) for x in logits]).mean()
    torch.testing.assert_close(per_layer, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(per_layer, ours)


def test_load_balancing_loss_is_top_k_at_perfect_balance_and_grads_flow_through_probs():
    # 4 tokens, 4 experts: each token prefers a different pair, so f_e = 2/4 and P_e = 1/4 for every expert.
    logits = torch.tensor([[2.0, 1.0, 0, 0], [0, 2.0, 1.0, 0], [0, 0, 2.0, 1.0], [1.0, 0, 0, 2.0]], requires_grad=True)
    loss = load_balancing_loss(router_logits=[logits], top_k=2)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_router_z_loss_hand_example():
    logits = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    # logsumexp: log 2 and log 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(router_logits=logits), torch.tensor(expected))


def test_cross_entropy_and_empty_inputs():
    torch.manual_seed(8)
    logits_BTV, labels_BT = torch.randn(2, 5, 11, dtype=torch.bfloat16), torch.randint(0, 11, (2, 5))
    labels_BT[0, 0] = -100
    expected = F.cross_entropy(logits_BTV.float().view(10, 11), labels_BT.view(10), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits_BTV=logits_BTV, labels_BT=labels_BT), expected)
    with pytest.raises(UpcycleError):
        load_balancing_loss(router_logits=[], top_k=2)
    with pytest.raises(UpcycleError):
        load_balancing_loss(router_logits=layer_logits(0), top_k=E + 1)


@pytest.mark.parametrize("impl", ["fused", "loop"])
def test_dispatch_and_combine_gradients_pass_gradcheck(impl):
    """The token gather and the unsort are autograd Functions whose backward is a gather through the inverse
    permutation (no scatter-add): checked against finite differences for x, the routing weights and both weights."""
    torch.manual_seed(15)
    T_, D_, F_, E_, K_ = 7, 4, 3, 3, 2
    x_TD = torch.randn(T_, D_, dtype=torch.float64, requires_grad=True)
    ids_TK = torch.stack([torch.tensor([0, 2, 2, 1, 0, 2, 1]), torch.tensor([1, 0, 1, 2, 2, 0, 0])], dim=1)
    weights_TK = torch.rand(T_, K_, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(E_, D_, 2 * F_, dtype=torch.float64, requires_grad=True)
    down = torch.randn(E_, F_, D_, dtype=torch.float64, requires_grad=True)

    def layer(x, w, gu, dn):
        return experts_grouped(x, w, ids_TK, gu, dn, impl=impl)[0]

    assert torch.autograd.gradcheck(layer, (x_TD, weights_TK, gate_up, down))


def test_no_tokens_gives_an_empty_output_and_gradients():
    moe = make_moe()
    for impl in ("fused", "grouped_mm", "loop"):
        moe.zero_grad(set_to_none=True)
        moe.impl = impl
        x_TD = torch.randn(0, D, requires_grad=True)
        out = moe(x_TD)
        assert out.out_TD.shape == (0, D) and out.counts_E.tolist() == [0] * E, impl
        out.out_TD.sum().backward()
        assert x_TD.grad.shape == (0, D), impl
