"""--shared-expert dense (Qwen2-MoE): one segment of the dense FFN becomes the always-active shared expert, never
re-drawn, down projection doubled and sigmoid gate near zero (sigmoid = 1/2), the other G - 1 segments the routed
experts; r = 0 stays the dense function in transformers and in our trainer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_convert_refused, logits, read_config, save_dense
from upcycle.convert.check import check
from upcycle.convert.conversion import MANIFEST_NAME, convert, load_redrawn
from upcycle.model.hf import export_hf, load_model
from upcycle.convert.upcycling import DENSE_SHARED_GATE_STD

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))


def _tensors(directory):
    return {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family, tied, granularity, experts, top_k", [
    ("qwen2", True, 2, 4, 2), ("qwen2", False, 4, 6, 3), ("llama", False, 4, 3, 3), ("mistral", True, 3, 4, 2)])
def test_dense_shared_expert_keeps_the_dense_function(tmp_path, family, tied, granularity, experts, top_k):
    dense = save_dense(tmp_path / "dense", family, tied=tied)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=experts, top_k=top_k,
                  granularity=granularity, shared_expert="dense", format="qwen2_moe")
    cfg = read_config(out)
    assert cfg["shared_expert_intermediate_size"] == cfg["moe_intermediate_size"] == 48 // granularity
    assert check(str(out), str(dense)).max_abs_logit_diff <= 1e-4


def test_shared_expert_holds_segment_0_untouched_and_drop_redraws_only_routed_experts(tmp_path):
    dense = save_dense(tmp_path / "dense", "qwen2")
    out = convert(dense, tmp_path / "moe", progress=False, method="drop", ratio=0.5, num_experts=6, top_k=3,
                  granularity=4, shared_expert="dense")
    d, m = _tensors(dense), _tensors(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for layer in range(2):
        record = manifest["layers"][layer]
        shared_idx = torch.tensor(record["segments"][0])
        p = f"model.layers.{layer}.mlp."
        assert torch.equal(m[p + "shared_expert.gate_proj.weight"], d[p + "gate_proj.weight"][shared_idx])
        assert torch.equal(m[p + "shared_expert.up_proj.weight"], d[p + "up_proj.weight"][shared_idx])
        assert torch.equal(m[p + "shared_expert.down_proj.weight"], d[p + "down_proj.weight"][:, shared_idx] * 2)
        gate = m[p + "shared_expert_gate.weight"]
        assert torch.count_nonzero(gate) == gate.numel() and gate.abs().max() < 10 * DENSE_SHARED_GATE_STD
        assert record["shared_expert"] == {"segment": 0, "down_scale": 2.0}
        # routed experts: segments 1..3 of copies 0 and 1, never segment 0, down scaled by 3
        assert [(e["copy"], e["segment"]) for e in record["experts"]] == [(c, s) for c in range(2) for s in (1, 2, 3)]
        router = m[p + "gate.weight"]
        assert torch.equal(router[0], router[2]) and not torch.equal(router[0], router[3])
    assert (load_redrawn(out).sum(-1) == 6).all()  # floor(0.5 * 12) per routed expert and matrix


def test_our_trainer_computes_the_same_function_with_the_shared_expert_and_round_trips(tmp_path):
    dense = save_dense(tmp_path / "dense", "qwen2", tied=True, num_hidden_layers=3)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=4, top_k=2, granularity=3,
                  shared_expert="dense", moe_layers="0,2")
    model = load_model(out)
    assert model.config.shared_expert_dim == 16 and model.config.moe_layer_ids == (0, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits(dense, IDS), atol=1e-4, rtol=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).logits.flatten(0, 1), IDS[:, 1:].flatten())
    loss.backward()
    assert model.layers[0].shared_gate.weight.grad.abs().sum() > 0  # the gate learns from its near-zero start
    opt.step()
    export_hf(model, model.config, tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(logits(tmp_path / "export", IDS), model(IDS).logits, atol=1e-5, rtol=0)
    assert load_model(tmp_path / "export").config == model.config


@pytest.mark.parametrize("family, args, message", [
    ("llama", ["--granularity", "2", "--num-experts", "2", "--top-k", "1"],
     "--shared-expert dense needs --format qwen2_moe, granitemoeshared or glm4_moe, the formats with a shared "
     "expert (got mixtral)"),
    ("qwen3", ["--granularity", "2", "--num-experts", "2", "--top-k", "1"],
     "--shared-expert dense needs --format qwen2_moe, granitemoeshared or glm4_moe, the formats with a shared "
     "expert (got qwen3_moe)"),
    ("qwen2", [], "use --granularity 2 or more"),
    ("qwen2", ["--granularity", "3", "--num-experts", "3", "--top-k", "2"],
     "--num-experts 3 is not a multiple of --granularity - 1 (one segment is shared) = 2; use --num-experts 4"),
    ("qwen2", ["--granularity", "2", "--num-experts", "2", "--top-k", "1", "--shared-expert-dim", "8"],
     "leave out --shared-expert-dim"),
])
def test_bad_shared_expert_combinations_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, family, args,
                                                                                 message):
    dense = save_dense(tmp_path / "dense", family)
    assert_convert_refused(capsys, dense, tmp_path / "out", "--shared-expert", "dense", *args, message=message)
