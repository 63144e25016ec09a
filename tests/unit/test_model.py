"""Our decoder: parameter counts against hand-computed numbers, init, outputs, and config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.model.transformer import ModelConfig, Transformer

V, D, L, H, G, FFN = 64, 32, 2, 4, 2, 48

BASE = ModelConfig(vocab_size=V, dim=D, num_layers=L, num_heads=H, num_kv_heads=G, ffn_dim=FFN, max_seq_len=32)


def test_dense_param_count_by_hand():
    model = Transformer(BASE)
    hd = D // H  # 8
    attn = D * H * hd + 2 * D * G * hd + H * hd * D  # q, k, v, o = 1024 + 1024 + 1024
    per_layer = attn + 2 * D + 3 * D * FFN  # two norms, gate/up/down
    expected = V * D + L * per_layer + D + V * D  # embeddings, layers, final norm, untied head
    assert expected == 19616
    assert model.num_params() == expected
    assert model.num_active_params() == expected


def test_moe_param_count_by_hand_with_biases_qk_norm_and_tied_head():
    config = dataclasses.replace(BASE, num_experts=4, top_k=2, qkv_bias=True, o_bias=True, qk_norm=True,
                                 tie_embeddings=True)
    model = Transformer(config)
    hd = D // H
    attn = 3072 + (H * hd + 2 * G * hd) + D + 2 * hd  # weights + q/k/v biases + o bias + q/k norms
    expert = 3 * D * FFN  # 4608
    per_layer = attn + 2 * D + 4 * D + 4 * expert  # norms, router [E, D], 4 experts
    total = V * D + L * per_layer + D  # tied: no separate head
    assert model.num_params() == total == 45696
    assert model.num_active_params() == total - L * 2 * expert  # only top_k=2 of 4 experts per token
    assert sum(p.numel() for p in model.state_dict().values()) == total  # no hidden duplicate of the tied head


def test_init_follows_the_contract():
    config = dataclasses.replace(BASE, num_experts=4, qkv_bias=True, init_std=0.05)
    torch.manual_seed(0)
    model = Transformer(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - 0.05) < 0.05 * 0.2, name
            assert abs(p.mean().item()) < 0.01, name


def test_forward_outputs_for_dense_and_moe():
    ids = torch.randint(0, V, (2, 16))
    dense = Transformer(BASE)(ids)
    assert dense.logits.shape == (2, 16, V) and dense.router_logits == [] and dense.expert_counts is None
    model = Transformer(dataclasses.replace(BASE, num_experts=4, top_k=2))
    out = model(ids)
    assert out.logits.shape == (2, 16, V)
    assert len(out.router_logits) == L and all(r.shape == (32, 4) and r.dtype == torch.float32
                                                for r in out.router_logits)
    assert out.expert_counts.shape == (L, 4) and out.expert_counts.sum(1).tolist() == [64, 64]
    out.logits.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causality_and_bf16():
    model = Transformer(dataclasses.replace(BASE, num_experts=4, top_k=2))
    ids = torch.randint(0, V, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    out = model.to(torch.bfloat16)(ids)
    assert out.logits.dtype == torch.bfloat16 and out.router_logits[0].dtype == torch.float32
    torch.testing.assert_close(out.logits.float(), a, atol=0.05, rtol=0.05)


def test_bad_configs_are_refused():
    with pytest.raises(UpcycleError, match="top_k"):
        dataclasses.replace(BASE, num_experts=2, top_k=3)
    with pytest.raises(UpcycleError, match="num_kv_heads"):
        dataclasses.replace(BASE, num_kv_heads=3)
    with pytest.raises(UpcycleError, match="rope_type"):
        dataclasses.replace(BASE, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UpcycleError, match="max_seq_len"):
        Transformer(BASE)(torch.zeros(1, 33, dtype=torch.long))


def test_meta_init_then_materialize():
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(BASE, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    model.to_empty(device="cpu")
    model.init_weights()
    reference = Transformer(dataclasses.replace(BASE, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    torch.testing.assert_close(model.rope_inv_freq, reference.rope_inv_freq)
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long)).logits).all()
