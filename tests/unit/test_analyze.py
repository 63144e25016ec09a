"""Tests for upcycle.eval.analyze: the routing math on known distributions, a router forced onto two experts, drift and
re-drawn shares against naive and drop conversions of a tiny HF Llama, figures, and input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, make_prepared, run_cli, save_dense, tiny_moe
from upcycle.eval.analyze import (
    analyze,
    dead_experts,
    entropy,
    expert_similarity,
    jensen_shannon,
    load_imbalance,
    mean_pairwise_jsd,
    plot_routing,
    routing_stats,
    routing_sums,
)
from upcycle.commands import analyze_command
from upcycle.convert.conversion import convert
from upcycle.errors import UpcycleError
from upcycle.model.hf import load_model
from upcycle.model.hf import save_model

SEQ_LEN = 32
FFN_DIM = 48  # conftest's tiny Llama


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("analyze_data"))[0]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return save_dense(tmp_path_factory.mktemp("dense") / "llama", "llama", vocab_size=320)


def _run(model_dir, data, out, **kwargs) -> dict:
    return analyze(model_dir, data, out, **{"seq_len": SEQ_LEN, "max_sequences": 4, **kwargs})


# ---- pure math ---------------------------------------------------------------------------------------------------


def test_jsd_entropy_imbalance_dead():
    p = np.array([0.5, 0.5, 0.0, 0.0])
    q = np.array([0.0, 0.0, 0.5, 0.5])
    assert jensen_shannon(p, p) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon(p, q) == pytest.approx(1.0)  # disjoint supports: the maximum, 1 bit
    assert 0 < jensen_shannon(p, np.full(4, 0.25)) < 1
    assert jensen_shannon(p, q) == jensen_shannon(q, p)
    assert mean_pairwise_jsd({"a": p, "b": p, "c": p}) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_jsd({"a": p, "b": p, "c": q}) == pytest.approx(2 / 3)
    assert mean_pairwise_jsd({"a": p}) is None
    assert entropy(np.full(8, 1 / 8)) == pytest.approx(math.log(8))
    assert load_imbalance(np.full(4, 0.25)) == pytest.approx((1.0, 0.0))
    assert load_imbalance(p) == pytest.approx((2.0, 1.0))
    assert dead_experts(p) == [2, 3]
    assert dead_experts(np.array([0.5, 0.499, 0.001, 0.0])) == [2, 3]  # 0.001 is below 0.01 * 1/4
    assert dead_experts(np.array([0.5, 0.499, 0.001, 0.0]), threshold=0.001) == [3]


def test_routing_sums_and_stats():
    # top-2 of each token: {0, 1}, {1, 2}, {2, 3}
    logits_TE = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 5.0, 4.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    sums = routing_sums(logits_TE, top_k=2)
    assert sums["tokens"] == 3 and sums["counts_E"].tolist() == [1, 2, 2, 1]
    stats = routing_stats(sums)
    assert stats["share"] == pytest.approx([1 / 6, 2 / 6, 2 / 6, 1 / 6])
    assert sum(stats["mean_prob"]) == pytest.approx(1.0)
    probs = torch.softmax(logits_TE, -1).double()
    token_h = float(-(probs * probs.log()).sum(-1).mean()) / math.log(4)
    assert stats["token_entropy"] == pytest.approx(token_h)
    assert stats["prob_entropy"] == pytest.approx(entropy(probs.mean(0).numpy()) / math.log(4))
    assert stats["token_entropy"] < stats["prob_entropy"] <= 1.0  # averaging probabilities raises entropy


def test_expert_similarity_of_copies_and_negation():
    w = {"gate": torch.randn(1, 6, 4), "up": torch.randn(1, 6, 4), "down": torch.randn(1, 4, 6)}
    experts = {m: torch.cat([t, 2 * t, -t]) for m, t in w.items()}
    sim = expert_similarity(experts)
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(sim, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-12)


# ---- a model whose router is forced onto experts 0 and 1 ---------------------------------------------------------


def _forced_model():
    """Hidden dimension 0 is a constant 10 in every token at every layer (set in the embedding; attention and experts
    never write to it), and the router scores +5 * x_0 for experts 0, 1 and -5 * x_0 for the rest: every token of
    every domain goes to experts 0 and 1."""
    model = tiny_moe(seed=1)
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 10.0
        for layer in model.layers:
            layer.attn.o.weight[0, :] = 0.0
            layer.ffn.down_EFD[:, :, 0] = 0.0
            router = torch.zeros_like(layer.ffn.router.weight)
            router[:2, 0], router[2:, 0] = 5.0, -5.0
            layer.ffn.router.weight.copy_(router)
    return model


def test_forced_router(data, tmp_path):
    model_dir = save_model(_forced_model(), tmp_path / "forced")
    analysis = _run(model_dir, data, tmp_path / "out")
    assert analysis["domains"] == ["code", "english", "japanese"]
    for entry in analysis["layers"]:
        for domain, r in entry["routing"].items():
            assert r["share"] == [0.5, 0.5, 0.0, 0.0]
            assert r["dead_experts"] == [2, 3]
            assert r["load_imbalance"] == pytest.approx(2.0)
            assert r["share_cv"] == pytest.approx(1.0)
        assert entry["specialization_jsd"] == pytest.approx(0.0, abs=1e-12)
        assert entry["all_domains"]["tokens"] == sum(r["tokens"] for r in entry["routing"].values())
        assert "drift" not in entry and "redrawn_share" not in entry  # no parent known


def test_random_router_shares_jsd_and_figures(data, tmp_path):
    model_dir = save_model(tiny_moe(seed=2), tmp_path / "random")
    out = tmp_path / "out"
    analyze_command(str(model_dir), data=str(data), out=str(out), layers=[0, 2], seq_len=SEQ_LEN, max_sequences=4)
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["plot_layers"] == [0, 2] and len(analysis["layers"]) == 3
    for entry in analysis["layers"]:
        for r in entry["routing"].values():
            assert sum(r["share"]) == pytest.approx(1.0)
            assert r["tokens"] == 4 * SEQ_LEN
            assert 0 < r["token_entropy"] <= r["prob_entropy"] <= 1
        # a random router still routes different token distributions differently
        assert entry["specialization_jsd"] > 1e-4
        sim = np.array(entry["expert_similarity"])
        np.testing.assert_allclose(np.diag(sim), 1.0, rtol=1e-9)
        assert np.abs(sim - np.eye(4)).max() < 0.5  # independent random experts are nearly orthogonal
    for name in ("routing.png", "layers.png", "expert_similarity.png"):
        assert (out / name).stat().st_size > 5_000
    # the plotting function works on the saved JSON alone (the demo report reuses it)
    again = plot_routing(analysis, tmp_path / "again.png", layers=[1])
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- drift and re-drawn shares against real conversions -----------------------------------------------------------


def test_naive_conversion_has_no_drift(dense_dir, data, tmp_path):
    moe = convert(dense_dir, tmp_path / "naive", method="naive", num_experts=4, top_k=2, progress=False)
    analysis = _run(moe, data, tmp_path / "out", layers=[1])
    assert analysis["dense"] == str(Path(dense_dir).absolute())  # found through the manifest
    for entry in analysis["layers"]:
        for expert in entry["drift"]:
            for m in ("gate", "up", "down"):
                assert expert[m]["rel_distance"] == 0.0
                assert expert[m]["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert all(s == {"gate": 0.0, "up": 0.0, "down": 0.0, "any": 0.0} for s in entry["redrawn_share"])
        np.testing.assert_allclose(entry["expert_similarity"], np.ones((4, 4)), atol=1e-12)


@pytest.mark.parametrize("index_mode", ["independent", "shared"])
def test_drop_conversion_redrawn_share_and_drift(dense_dir, data, tmp_path, index_mode):
    ratio = 0.3
    moe = convert(dense_dir, tmp_path / "drop", method="drop", ratio=ratio, num_experts=4, top_k=2,
                  index_mode=index_mode, progress=False)
    # as for a training checkpoint: our format, no manifest beside it; the conversion is named explicitly
    ours = save_model(load_model(moe), tmp_path / "ours")
    analysis = _run(ours, data, tmp_path / "out", manifest_dir=moe)
    expected = math.floor(ratio * FFN_DIM) / FFN_DIM
    for entry in analysis["layers"]:
        for share, drift in zip(entry["redrawn_share"], entry["drift"]):
            for m in ("gate", "up", "down"):
                assert share[m] == pytest.approx(expected)
                assert drift[m]["rel_distance"] > 0.05 and drift[m]["cosine"] < 0.99
            if index_mode == "shared":
                assert share["any"] == pytest.approx(expected)
            else:
                assert expected < share["any"] <= min(1.0, 3 * expected)
        off_diagonal = np.array(entry["expert_similarity"])[~np.eye(4, dtype=bool)]
        assert off_diagonal.max() < 1 - 1e-3 and off_diagonal.min() > 0.3  # diverged, yet still mostly the parent


# ---- input errors -----------------------------------------------------------------------------------------------


def test_input_errors(dense_dir, data, tmp_path):
    with pytest.raises(UpcycleError, match="no MoE layers"):
        _run(dense_dir, data, tmp_path / "out")
    moe_dir = save_model(tiny_moe(), tmp_path / "moe")
    with pytest.raises(UpcycleError, match="no data.json"):
        _run(moe_dir, tmp_path, tmp_path / "out")
    with pytest.raises(UpcycleError, match="out of range"):
        _run(moe_dir, data, tmp_path / "out", layers=[3])
    with pytest.raises(UpcycleError, match="has no upcycle_manifest.json"):
        _run(moe_dir, data, tmp_path / "out", manifest_dir=tmp_path)
    with pytest.raises(UpcycleError, match="not the parent"):
        _run(moe_dir, data, tmp_path / "out", dense_path=dense_dir)  # 3 layers vs the parent's 2
    with pytest.raises(UpcycleError, match="does not exist"):
        _run(tmp_path / "missing", data, tmp_path / "out")
    small_vocab = save_model(tiny_moe(vocab_size=64), tmp_path / "small_vocab")
    with pytest.raises(UpcycleError, match="prepare the data with the model's tokenizer"):
        _run(small_vocab, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the output directory: one policy (refuse without --force), published whole or not at all ---------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_existing_output_is_refused_without_force(data, tmp_path, capsys):
    model_dir = save_model(tiny_moe(seed=2), tmp_path / "moe")
    out = tmp_path / "out"
    _run(model_dir, data, out, plots=False)
    before = _files(out)
    with pytest.raises(UpcycleError, match="already exists; choose another --out or pass --force"):
        _run(model_dir, data, out, plots=False, max_sequences=2)
    code, err = run_cli(capsys, "analyze", str(model_dir), "--data", str(data), "--out", str(out), "--seq-len",
                        str(SEQ_LEN))
    assert_one_line_error(code, err, "pass --force")
    assert _files(out) == before
    with pytest.raises(UpcycleError, match="--out .* contains the input"):  # --force must not delete the model
        _run(model_dir, data, tmp_path, force=True)


def test_force_replaces_the_whole_directory(data, tmp_path, capsys):
    from upcycle.cli import main

    model_dir = save_model(tiny_moe(seed=2), tmp_path / "moe")
    out = tmp_path / "out"
    _run(model_dir, data, out, layers=[0])
    assert sorted(_files(out)) == ["analysis.json", "expert_similarity.png", "layers.png", "routing.png"]
    main(["analyze", str(model_dir), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ_LEN),
          "--max-sequences", "2", "--force"])
    assert json.loads((out / "analysis.json").read_text())["max_sequences"] == 2
    _run(model_dir, data, out, plots=False, force=True)
    assert sorted(_files(out)) == ["analysis.json"]  # no stale figures of the previous analysis
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "out"]  # no temporary directory left


def test_a_failed_run_leaves_the_previous_analysis_intact(data, tmp_path, monkeypatch):
    import errno

    import upcycle.eval.analyze

    model_dir = save_model(tiny_moe(seed=2), tmp_path / "moe")
    out = tmp_path / "out"
    _run(model_dir, data, out, layers=[0])
    before = _files(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(upcycle.eval.analyze, "plot_similarity", disk_full)  # the last file written
    with pytest.raises(UpcycleError, match="No space left on device; nothing was written"):
        _run(model_dir, data, out, layers=[1], max_sequences=2, force=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "out"]


def test_analyze_does_not_import_evaluate():
    """analyze and evaluate share the checkpoint and data checks through hf_model and data, not through each other."""
    import ast

    import upcycle.eval.analyze

    tree = ast.parse(Path(upcycle.eval.analyze.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "upcycle.eval.evaluate" not in imported


def _sigmoid_moe_with_a_bias():
    """A tiny sigmoid-router MoE whose balancing bias differs per layer (so it changes choices), and 3 batches."""
    from helpers import tiny_moe

    model = tiny_moe(seed=1, router_activation="sigmoid", expert_bias=True)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.ffn.expert_bias_E.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]) * (i + 1))
    return model, [torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def test_routing_of_a_sigmoid_model_with_a_bias_counts_what_the_model_computed():
    """analyze (and the experiments' routing_final) count the assignments the model made: sigmoid scores plus its
    balancing bias, not a softmax of the logits."""
    from upcycle.eval.analyze import collect_routing

    model, batches = _sigmoid_moe_with_a_bias()
    with torch.no_grad():
        sums = collect_routing(model, {"text": batches})["text"]
        counts_LE = sum(model(b[:, :-1]).expert_counts for b in batches)
    assert [list(s["counts_E"]) for s in sums] == counts_LE.tolist()
    plain = routing_sums(model(batches[0][:, :-1]).router_logits[2], top_k=2)  # softmax without the bias
    assert list(plain["counts_E"]) != list(routing_sums(model(batches[0][:, :-1]).router_logits[2], top_k=2,
                                                        activation="sigmoid", bias_E=model.layers[2].ffn.expert_bias_E)
                                            ["counts_E"])


def test_per_sequence_routing_counts_are_the_models_own_assignments_split_by_sequence():
    """The experiment's specialization and its chance level are computed from per-sequence counts: summed over the
    sequences they are the assignments the model made (sigmoid scores plus its balancing bias), and each row counts
    one sequence's tokens x top-k."""
    from upcycle.eval.analyze import sequence_routing_counts

    model, batches = _sigmoid_moe_with_a_bias()
    with torch.no_grad():
        per_sequence = sequence_routing_counts(model, {"text": batches})["text"]
        counts_LE = sum(model(b[:, :-1]).expert_counts for b in batches)
    assert [layer.sum(0).tolist() for layer in per_sequence] == counts_LE.tolist()
    assert all(layer.shape == (6, 4) and (layer.sum(1) == 16 * model.config.top_k).all() for layer in per_sequence)
