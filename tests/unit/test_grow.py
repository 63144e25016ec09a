"""`upcycle grow`: E experts -> m * E, each expert kept and joined by m - 1 Drop-Upcycled copies, router rows copied.
At r = 0 with top-k = m * k the grown model is the source's function, in every format we read (with and without
norm_topk_prob, shared experts kept) and from our own checkpoints; r > 0 re-draws only the copies, from each expert's
own statistics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import logits, read_config, save_dense, save_moe, subprocess_env, tiny_moe
from upcycle.convert.check import check
from upcycle.convert.conversion import MANIFEST_NAME, convert, load_redrawn
from upcycle.convert.grow import grow
from upcycle.model.hf import load_model, save_model
from upcycle.convert.upcycling import mean_std

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(4))


def _tensors(directory):
    return {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family, overrides, factor", [
    ("mixtral", {}, 2),
    ("qwen2_moe", {"norm_topk_prob": True}, 2),
    ("qwen2_moe", {"norm_topk_prob": False, "tie_word_embeddings": True}, 3),
    ("qwen3_moe", {"norm_topk_prob": True}, 3),
    ("qwen3_moe", {"norm_topk_prob": False}, 2),
    ("granitemoeshared", {}, 2),
])
def test_r0_grown_hf_moe_is_the_source_function(tmp_path, family, overrides, factor):
    source = save_moe(tmp_path / "src", family, **overrides)
    out = grow(source, tmp_path / "grown", progress=False, factor=factor, ratio=0.0)
    cfg, src_cfg = read_config(out), read_config(source)
    assert cfg.get("num_local_experts", cfg.get("num_experts")) == factor * 4
    assert cfg["num_experts_per_tok"] == factor * 2
    assert cfg.get("norm_topk_prob") == src_cfg.get("norm_topk_prob")
    report = check(str(out), str(source))
    assert report.equivalent is True and report.max_abs_logit_diff <= 1e-4, report
    assert report.method == "grow"
    # our model reads the grown checkpoint and computes the same function
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(IDS).logits, logits(source, IDS), atol=1e-4, rtol=0)


def test_r0_grown_convert_output_with_shared_expert_and_dense_layers(tmp_path):
    dense = save_dense(tmp_path / "dense", "qwen2", num_hidden_layers=3)
    moe = convert(dense, tmp_path / "moe", progress=False, method="drop", ratio=0.5, num_experts=4, top_k=2,
                  granularity=2, shared_expert="dense", moe_layers="0,2")
    out = grow(moe, tmp_path / "grown", progress=False, factor=2, ratio=0.0)
    assert check(str(out), str(moe)).max_abs_logit_diff <= 1e-4
    m, g = _tensors(moe), _tensors(out)
    for key in m:  # everything but routers and experts is copied bit for bit
        if ".experts." not in key and not key.endswith("mlp.gate.weight"):
            assert torch.equal(g[key], m[key]), key
    assert "model.layers.1.mlp.gate_proj.weight" in g  # the dense layer stays dense


def test_transformers_fused_layout_is_read_one_expert_at_a_time(tmp_path):
    import transformers
    from safetensors.torch import save_file

    source = save_moe(tmp_path / "src", "mixtral")
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    fused = tmp_path / "fused"
    fused.mkdir()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    save_file(tensors, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((source / "config.json").read_text())
    out = grow(fused, tmp_path / "grown", progress=False, factor=2, ratio=0.0)
    assert check(str(out), str(source)).max_abs_logit_diff <= 1e-4


def test_our_checkpoint_grows_and_keeps_its_function(tmp_path):
    model = tiny_moe(num_experts=4, top_k=2, renormalize=False, qk_norm=True)
    save_model(model, tmp_path / "ours")
    out = grow(tmp_path / "ours", tmp_path / "grown", progress=False, factor=2, ratio=0.0, format="qwen3_moe")
    assert read_config(out)["model_type"] == "qwen3_moe" and read_config(out)["norm_topk_prob"] is False
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(logits(out, ids), model(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_model(out)(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_drop_redraws_only_the_copies_from_each_experts_own_statistics(tmp_path):
    source = save_moe(tmp_path / "src", "qwen3_moe")
    out = grow(source, tmp_path / "grown", progress=False, factor=3, ratio=0.5, index_mode="shared")
    s, g = _tensors(source), _tensors(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    redrawn = load_redrawn(out)  # (L, 12, 3, 24)
    assert manifest["function_preserving"] is False and manifest["options"]["top_k"] == 6
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        router_s, router_g = s[p + "gate.weight"], g[p + "gate.weight"]
        assert torch.equal(router_g, router_s.repeat_interleave(3, dim=0))
        for n, record in enumerate(manifest["layers"][layer]["experts"]):
            e, copy = divmod(n, 3)
            assert (record["expert"], record["from"], record["copy"]) == (n, e, copy)
            src = {m: s[f"{p}experts.{e}.{m}_proj.weight"] for m in ("gate", "up", "down")}
            new = {m: g[f"{p}experts.{n}.{m}_proj.weight"] for m in ("gate", "up", "down")}
            if copy == 0:  # the expert itself, untouched
                assert all(torch.equal(new[m], src[m]) for m in new) and not redrawn[layer, n].any()
                continue
            rows = redrawn[layer, n, 0]
            assert rows.sum() == 12 and torch.equal(redrawn[layer, n, 0], redrawn[layer, n, 2])  # shared index set
            assert torch.equal(new["gate"][~rows], src["gate"][~rows]) and not torch.equal(new["gate"], src["gate"])
            mu, sigma = mean_std(src["gate"][rows])  # statistics of this expert's own slice
            assert record["gate"]["mean"] == pytest.approx(mu) and record["gate"]["std"] == pytest.approx(sigma)
    assert not torch.equal(g["model.layers.0.mlp.experts.1.up_proj.weight"],
                           g["model.layers.0.mlp.experts.2.up_proj.weight"])  # two copies of one expert differ


def test_keeping_top_k_is_another_function(tmp_path):
    source = save_moe(tmp_path / "src", "mixtral")
    out = grow(source, tmp_path / "grown", progress=False, factor=2, ratio=0.0, top_k=2)
    report = check(str(out), str(source))
    assert report.equivalent is None and report.max_abs_logit_diff > 1e-2


def test_grown_output_is_byte_reproducible(tmp_path):
    import hashlib

    source = save_moe(tmp_path / "src", "granitemoeshared")
    for name in ("a", "b"):
        grow(source, tmp_path / name, progress=False, factor=2, ratio=0.5, max_shard_size="30KB")
    digest = {n: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / n).iterdir()} for n in "ab"}
    assert digest["a"] == digest["b"] and len(digest["a"]) > 4  # several shards


@pytest.mark.parametrize("make, args, message", [
    ("moe", ["--factor", "1"], "--factor must be an integer of at least 2"),
    ("moe", ["--top-k", "9"], "--top-k must lie in [1, 8] (the grown model's experts), got 9"),
    ("moe", ["--top-k", "0"], "--top-k must lie in [1, 8]"),
    ("moe", ["--ratio", "1.5"], "ratio must lie in [0, 1]"),
    ("moe", ["--format", "qwen3_moe"], "grow keeps an HF source's format (mixtral)"),
    ("dense", [], "is a dense llama model; grow needs an MoE (make one with upcycle convert)"),
])
def test_bad_grow_input_is_one_line_exit_2_and_nothing_written(tmp_path, make, args, message):
    source = save_moe(tmp_path / "src", "mixtral") if make == "moe" else save_dense(tmp_path / "src", "llama")
    result = subprocess.run([sys.executable, "-m", "upcycle", "grow", str(source), str(tmp_path / "out"), *args],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_every_grow_option_is_a_flag_and_a_docs_row():
    import dataclasses

    from helpers import generated_table
    from upcycle.cli import build_parser, options_table
    from upcycle.convert.options import GrowOptions

    assert generated_table("docs/convert.md", "upcycle.convert.options.GrowOptions") == options_table(GrowOptions)
    help_text = build_parser().parse_args.__self__._subparsers._group_actions[0].choices["grow"].format_help()
    for f in dataclasses.fields(GrowOptions):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
