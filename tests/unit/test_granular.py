"""Fine-grained (granular) Drop-Upcycling: --granularity G splits the dense FFN into G segments per copy, with
virtual-group routers and scaled down projections, so that r = 0 is the dense function in every format and in our
trainer's MoE layer; with r > 0, drop re-draws a fraction r of every fine-grained expert."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_convert_refused, assert_export_round_trip, logits, read_config, save_dense
from upcycle.convert.check import check
from upcycle.convert.conversion import MANIFEST_NAME, convert, load_redrawn
from upcycle.errors import UpcycleError
from upcycle.model.hf import load_model
from upcycle.convert.upcycling import granular_scale, segment_neurons, virtual_group_router

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
# (family, format, tied, overrides): every family, GQA (the default 2 kv heads for 4 heads) and MHA, tied embeddings
FAMILIES = [("llama", "mixtral", False, {}), ("mistral", "mixtral", True, {}), ("qwen2", "qwen2_moe", True, {}),
            ("qwen3", "qwen3_moe", False, {}), ("llama", "qwen2_moe", False, {"num_key_value_heads": 4})]


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        if f.name != "upcycle_redrawn.safetensors":
            out.update(load_file(f))
    return out


def test_segments_partition_the_neurons_and_depend_on_seed_and_layer():
    seg = segment_neurons(48, 4, seed=1, layer=0)
    assert seg.shape == (4, 12)
    assert sorted(seg.flatten().tolist()) == list(range(48))
    assert all(row.tolist() == sorted(row.tolist()) for row in seg)
    assert not torch.equal(seg, segment_neurons(48, 4, seed=1, layer=1))
    assert not torch.equal(seg, segment_neurons(48, 4, seed=2, layer=0))
    assert torch.equal(seg, segment_neurons(48, 4, seed=1, layer=0))
    assert torch.equal(segment_neurons(48, 1, seed=1, layer=0)[0], torch.arange(48))
    with pytest.raises(UpcycleError, match="not divisible"):
        segment_neurons(48, 5, seed=1, layer=0)


def test_virtual_groups_and_scale_make_the_routed_segments_sum_to_the_dense_ffn():
    # the derivation of granular_scale, on the routing math itself: softmax over all E, top-k, renormalize
    from upcycle.model.moe import route

    G, copies, k = 4, 3, 2
    router = virtual_group_router(torch.randn(copies, 8), G)
    assert torch.equal(router[0], router[G - 1]) and not torch.equal(router[0], router[G])
    weights_TK, ids_TK = route(torch.randn(50, 8) @ router.T, top_k=k * G, renormalize=True)
    for t in range(50):
        copies_chosen = (ids_TK[t] // G).tolist()
        assert all(copies_chosen.count(c) == G for c in set(copies_chosen))  # whole copies
    # every segment weighs the same within a copy, and G * (sum of weights per segment) = 1 over the chosen copies
    total_per_segment = torch.zeros(50, G)
    total_per_segment.scatter_add_(1, ids_TK % G, weights_TK)
    torch.testing.assert_close(total_per_segment * granular_scale(G), torch.ones(50, G))
    # without renormalization the same factor makes every segment weigh P, the top-k probability mass of the coarse
    # MoE (one router row per copy): the fine-grained MoE is then the coarse one, P * dense
    logits_TE = torch.randn(50, 8) @ router.T
    raw_TK, raw_ids_TK = route(logits_TE, top_k=k * G, renormalize=False)
    raw_per_segment = torch.zeros(50, G).scatter_add_(1, raw_ids_TK % G, raw_TK)
    coarse_P = torch.softmax(logits_TE[:, ::G], dim=-1).topk(k, dim=-1).values.sum(dim=-1)  # one logit per copy
    torch.testing.assert_close(raw_per_segment * granular_scale(G), coarse_P[:, None].expand(50, G))


@pytest.mark.parametrize("family, fmt, tied, overrides", FAMILIES)
@pytest.mark.parametrize("granularity", [1, 2, 4])
def test_naive_granular_conversion_is_the_dense_function(tmp_path, family, fmt, tied, overrides, granularity):
    dense = save_dense(tmp_path / "dense", family, tied=tied, **overrides)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=2 * granularity,
                  top_k=granularity, granularity=granularity, format=fmt)
    cfg = read_config(out)
    size_key = "intermediate_size" if fmt == "mixtral" else "moe_intermediate_size"
    assert cfg[size_key] == 48 // granularity
    report = check(str(out), str(dense))
    assert report.max_abs_logit_diff <= 1e-4, report
    assert report.equivalent


def test_granular_experts_hold_the_segments_scaled_and_the_manifest_says_which(tmp_path):
    dense = save_dense(tmp_path / "dense", "llama")
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=8, top_k=4, granularity=4,
                  seed=7)
    d, m = _tensors(dense), _tensors(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["options"]["granularity"] == 4
    for layer in range(2):
        segments = torch.tensor(manifest["layers"][layer]["segments"])
        assert torch.equal(segments, segment_neurons(48, 4, seed=7, layer=layer))
        p = f"model.layers.{layer}."
        router = m[p + "block_sparse_moe.gate.weight"]
        for e in range(8):
            record = manifest["layers"][layer]["experts"][e]
            assert (record["copy"], record["segment"]) == (e // 4, e % 4)
            idx = segments[e % 4]
            x = f"{p}block_sparse_moe.experts.{e}."
            assert torch.equal(m[x + "w1.weight"], d[p + "mlp.gate_proj.weight"][idx])
            assert torch.equal(m[x + "w3.weight"], d[p + "mlp.up_proj.weight"][idx])
            assert torch.equal(m[x + "w2.weight"], d[p + "mlp.down_proj.weight"][:, idx] * 4)
            assert torch.equal(router[e], router[(e // 4) * 4])
        assert not torch.equal(router[0], router[4])


@pytest.mark.parametrize("index_mode", ["independent", "shared"])
def test_granular_drop_redraws_a_fraction_of_every_fine_grained_expert(tmp_path, index_mode):
    dense = save_dense(tmp_path / "dense", "qwen2")
    out = convert(dense, tmp_path / "moe", progress=False, method="drop", ratio=0.5, num_experts=4, top_k=2,
                  granularity=2, index_mode=index_mode)
    d, m = _tensors(dense), _tensors(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    redrawn = load_redrawn(out)
    assert tuple(redrawn.shape) == (2, 4, 3, 24)
    assert (redrawn.sum(-1) == 12).all()  # floor(0.5 * 24) neurons per fine-grained expert and matrix
    if index_mode == "shared":
        assert (redrawn[:, :, 0] == redrawn[:, :, 1]).all() and (redrawn[:, :, 0] == redrawn[:, :, 2]).all()
    else:
        assert not (redrawn[:, :, 0] == redrawn[:, :, 1]).all()
    for layer in range(2):
        segments = torch.tensor(manifest["layers"][layer]["segments"])
        p = f"model.layers.{layer}."
        for e in range(4):
            idx = segments[e % 2]
            record = manifest["layers"][layer]["experts"][e]
            for matrix, dense_key, key in (("gate", "gate_proj", "gate_proj"), ("down", "down_proj", "down_proj")):
                ours = m[f"{p}mlp.experts.{e}.{key}.weight"]
                dense_w = d[f"{p}mlp.{dense_key}.weight"]
                kept = ~redrawn[layer, e, 0 if matrix == "gate" else 2]
                if matrix == "gate":
                    assert torch.equal(ours[kept], dense_w[idx][kept])
                    selected = dense_w[idx][~kept]
                    redrawn_values = ours[~kept]
                else:  # down: columns, scaled by G
                    assert torch.equal(ours[:, kept], dense_w[:, idx][:, kept] * 2)
                    selected = dense_w[:, idx][:, ~kept] * 2
                    redrawn_values = ours[:, ~kept]
                # statistics per fine-grained expert and matrix: of its own selected (scaled) neurons
                assert record[matrix]["redrawn"] == 12
                assert record[matrix]["mean"] == pytest.approx(selected.mean().item(), abs=1e-6)
                assert record[matrix]["std"] == pytest.approx(selected.std().item(), rel=1e-5)
                assert not torch.equal(redrawn_values, selected)
    assert check(str(out), str(dense)).max_abs_logit_diff > 1e-2  # r > 0 moves the function


@pytest.mark.parametrize("fmt, family", [("mixtral", "llama"), ("qwen2_moe", "qwen2"), ("qwen3_moe", "qwen3")])
def test_our_trainer_computes_the_same_function_and_round_trips(tmp_path, fmt, family):
    dense = save_dense(tmp_path / "dense", family, tied=family == "qwen2")
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=8, top_k=4, granularity=4,
                  format=fmt)
    model = load_model(out)
    assert model.config.expert_dim == 12
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits(dense, IDS), atol=1e-4, rtol=0)
    exported = assert_export_round_trip(model, tmp_path / "export", IDS, fmt=fmt)
    assert exported["intermediate_size" if fmt == "mixtral" else "moe_intermediate_size"] == 12


@pytest.mark.parametrize("args, message", [
    (["--granularity", "5", "--num-experts", "10", "--top-k", "5"], "not divisible by --granularity 5; choose one of"),
    (["--granularity", "4", "--num-experts", "6", "--top-k", "4"], "use --num-experts 8"),
    (["--granularity", "4", "--num-experts", "8", "--top-k", "2"], "use --top-k 4"),
    (["--granularity", "0"], "--granularity must be at least 1"),
])
def test_bad_granularity_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    dense = save_dense(tmp_path / "dense", "llama")
    assert_convert_refused(capsys, dense, tmp_path / "out", *args, message=message)


def test_analyze_reads_a_granular_conversion(tmp_path):
    from helpers import make_data_dir
    from upcycle.eval.analyze import analyze

    dense = save_dense(tmp_path / "dense", "llama")
    out = convert(dense, tmp_path / "moe", progress=False, method="drop", num_experts=8, top_k=4, granularity=4)
    result = analyze(out, make_data_dir(tmp_path / "data"), tmp_path / "analysis", seq_len=16, max_sequences=4,
                     plots=False)
    assert result["num_experts"] == 8
    layer = result["layers"][0]
    assert "drift" not in layer and len(layer["redrawn_share"]) == 8
    assert layer["redrawn_share"][0]["gate"] == pytest.approx(0.5)


def test_the_size_estimate_bounds_granular_partial_and_shared_outputs(tmp_path):
    from upcycle.formats import hf_formats as hf
    from upcycle.convert.options import ConvertOptions, estimate

    dense = save_dense(tmp_path / "dense", "qwen2", num_hidden_layers=4)
    options = dict(method="drop", num_experts=6, top_k=3, granularity=4, shared_expert="dense", moe_layers="1-2")
    out = convert(dense, tmp_path / "moe", progress=False, **options)
    written = sum(f.stat().st_size for f in out.iterdir())
    predicted = estimate(hf.read_shapes(read_config(dense)), "qwen2_moe", ConvertOptions(**options), 4).output_bytes
    assert written <= predicted <= 1.5 * written + 20_000, (written, predicted)
