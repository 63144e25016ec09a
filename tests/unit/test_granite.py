"""--format granitemoeshared: a dense Llama/Mistral/Qwen2 becomes fine-grained routed experts plus Granite's ungated
shared expert; r = 0 is the dense function in transformers (Granite's multipliers written so that they compute what
the dense model computes) and in our model, which also trains it and exports it back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_line_error, logits, read_config, run_cli, save_dense, subprocess_env
from upcycle.convert.check import check
from upcycle.convert.conversion import MANIFEST_NAME, convert
from upcycle.model.hf import export_hf, load_model

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))


def _tensors(directory):
    return {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family, tied, options", [
    ("llama", False, dict(num_experts=4, top_k=2)),  # coarse experts, no shared expert
    ("llama", True, dict(num_experts=6, top_k=3, granularity=4, shared_expert="dense")),
    ("mistral", False, dict(num_experts=8, top_k=4, granularity=2)),
    ("qwen2", True, dict(num_experts=4, top_k=2, granularity=3, shared_expert="dense")),
    ("qwen2", False, dict(num_experts=4, top_k=2, shared_expert_dim=16)),  # a zero shared expert, biases kept
])
def test_naive_granite_output_is_the_dense_function_in_transformers(tmp_path, family, tied, options):
    dense = save_dense(tmp_path / "dense", family, tied=tied)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", format="granitemoeshared", **options)
    cfg = read_config(out)
    assert cfg["model_type"] == "granitemoeshared" and cfg["architectures"] == ["GraniteMoeSharedForCausalLM"]
    assert cfg["attention_multiplier"] == pytest.approx(cfg["head_dim"] ** -0.5)
    assert cfg["embedding_multiplier"] == cfg["residual_multiplier"] == cfg["logits_scaling"] == 1.0
    assert cfg["attention_bias"] == (family == "qwen2")
    granularity = options.get("granularity", 1)
    expected_shared = (48 // granularity if options.get("shared_expert") == "dense"
                       else options.get("shared_expert_dim", 0))
    assert cfg["shared_intermediate_size"] == expected_shared and cfg["intermediate_size"] == 48 // granularity
    report = check(str(out), str(dense))
    assert report.max_abs_logit_diff <= 1e-4, report
    assert report.equivalent is True
    # our model computes the same function from the same checkpoint
    model = load_model(out)
    assert model.config.shared_expert_dim == (expected_shared if options.get("shared_expert") == "dense" else 0)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits(dense, IDS), atol=1e-4, rtol=0)


def test_granite_keys_hold_the_dense_segments_and_drop_leaves_the_shared_expert_intact(tmp_path):
    dense = save_dense(tmp_path / "dense", "llama")
    out = convert(dense, tmp_path / "moe", progress=False, method="drop", ratio=0.5, num_experts=6, top_k=3,
                  granularity=4, shared_expert="dense", format="granitemoeshared", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()  # the fused expert tensors stream across shards too
    d, m = _tensors(dense), _tensors(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for layer in range(2):
        record = manifest["layers"][layer]
        p = f"model.layers.{layer}."
        shared_idx = torch.tensor(record["segments"][0])
        gate_up = m[p + "shared_mlp.input_linear.weight"]
        assert torch.equal(gate_up[:12], d[p + "mlp.gate_proj.weight"][shared_idx])
        assert torch.equal(gate_up[12:], d[p + "mlp.up_proj.weight"][shared_idx])
        assert torch.equal(m[p + "shared_mlp.output_linear.weight"], d[p + "mlp.down_proj.weight"][:, shared_idx])
        assert record["shared_expert"] == {"segment": 0, "down_scale": 1.0}
        assert m[p + "block_sparse_moe.input_linear.weight"].shape == (6, 24, 32)
        assert m[p + "block_sparse_moe.output_linear.weight"].shape == (6, 32, 12)
        # expert 0 is segment 1 of copy 0: its untouched neurons are the dense ones (down scaled by G - 1 = 3)
        seg = torch.tensor(record["segments"][1])
        gate0 = m[p + "block_sparse_moe.input_linear.weight"][0, :12]
        kept = (gate0 == d[p + "mlp.gate_proj.weight"][seg]).all(dim=1)
        assert kept.sum() == 12 - 6  # floor(0.5 * 12) rows re-drawn
    moe = load_model(out)
    assert moe.config.shared_expert_gated is False and moe.config.shared_expert_dim == 12


def test_our_trainer_trains_granite_and_exports_it_back(tmp_path):
    dense = save_dense(tmp_path / "dense", "qwen2", tied=True)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=4, top_k=2, granularity=3,
                  shared_expert="dense", format="granitemoeshared")
    model = load_model(out)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).logits.flatten(0, 1), IDS[:, 1:].flatten())
    loss.backward()
    assert model.layers[0].shared.down.weight.grad.abs().sum() > 0
    opt.step()
    export_hf(model, model.config, tmp_path / "export")
    assert read_config(tmp_path / "export")["model_type"] == "granitemoeshared"
    with torch.no_grad():
        torch.testing.assert_close(logits(tmp_path / "export", IDS), model(IDS).logits, atol=1e-5, rtol=0)
    assert load_model(tmp_path / "export").config == model.config


@pytest.mark.parametrize("family, args, message", [
    ("qwen3", [], "qwen3 has q/k norms, which only qwen3_moe and glm4_moe hold; use --format qwen3_moe"),
    ("mistral", ["--moe-layers", "0"], "granitemoeshared has an MoE FFN in every layer and cannot keep dense layers"),
    ("llama", ["--shared-expert", "dense"], "use --granularity 2 or more"),
])
def test_what_granite_cannot_hold_is_one_line_exit_2_and_nothing_written(tmp_path, family, args, message):
    dense = save_dense(tmp_path / "dense", family)
    result = subprocess.run([sys.executable, "-m", "upcycle", "convert", str(dense), str(tmp_path / "out"),
                             "--format", "granitemoeshared", *args],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["dense"]


def test_a_sliding_window_is_refused_for_granite(tmp_path):
    from upcycle.errors import UpcycleError

    dense = save_dense(tmp_path / "dense", "mistral", sliding_window=16)
    with pytest.raises(UpcycleError, match="sliding window of 16 tokens, which granitemoeshared cannot hold"):
        convert(dense, tmp_path / "out", progress=False, format="granitemoeshared")
    assert not (tmp_path / "out").exists()


def test_trainer_eval_analyze_and_export_handle_granite(tmp_path):
    """The whole path of the other formats: online-free training from the Granite checkpoint, `upcycle eval`,
    `upcycle analyze` (with the convert manifest's dense parent) and `upcycle export`."""
    from helpers import make_data_dir, tiny_config
    from upcycle.train import checkpoint as ckpt
    from upcycle.eval.analyze import analyze
    from upcycle.commands import export_command
    from upcycle.eval.evaluate import evaluate
    from upcycle.train.trainer import run_training
    from upcycle.train.config import config_from_dict

    dense = save_dense(tmp_path / "dense", "llama")
    out = convert(dense, tmp_path / "moe", progress=False, method="drop", ratio=0.5, num_experts=6, top_k=3,
                  granularity=4, shared_expert="dense", format="granitemoeshared")
    data = make_data_dir(tmp_path / "data")
    values = tiny_config(data, model=None, init={"source": str(out)}, train={"max_steps": 4, "eval_every": 2})
    run_training(config_from_dict(values), tmp_path / "run")
    step = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    trained = load_model(step)
    assert trained.config.shared_expert_gated is False and trained.config.shared_expert_dim == 12
    before = load_model(out)
    assert not torch.equal(trained.layers[0].shared.down.weight, before.layers[0].shared.down.weight)  # it trained
    result = evaluate(step, data, seq_len=32, max_sequences=4)
    assert set(result["domains"]) == {"code", "english"} and result["overall"]["loss"] > 0
    report = analyze(out, data, tmp_path / "analysis", seq_len=32, max_sequences=4, plots=False)
    assert len(report["layers"]) == 2
    export_command(str(step), str(tmp_path / "export"))
    assert read_config(tmp_path / "export")["model_type"] == "granitemoeshared"
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logits(tmp_path / "export", ids), trained(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, options", [
    ("llama", dict(num_experts=4, top_k=2)),
    ("qwen2", dict(num_experts=6, top_k=3, granularity=3)),  # q/k/v biases kept (a zero o bias)
])
def test_granitemoe_is_granite_without_the_shared_expert(tmp_path, family, options):
    from helpers import assert_export_round_trip

    dense = save_dense(tmp_path / "dense", family)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", format="granitemoe", **options)
    cfg = read_config(out)
    assert cfg["model_type"] == "granitemoe" and cfg["architectures"] == ["GraniteMoeForCausalLM"]
    assert "shared_intermediate_size" not in cfg and cfg["intermediate_size"] == 48 // options.get("granularity", 1)
    assert not any("shared" in key for key in _tensors(out))
    report = check(str(out), str(dense))
    assert report.max_abs_logit_diff <= 1e-4 and report.equivalent is True, report
    model = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits(dense, IDS), atol=1e-4, rtol=0)
    assert assert_export_round_trip(model, tmp_path / "back", IDS, fmt="granitemoe")["model_type"] == "granitemoe"
    if family == "llama":  # grow reads and writes it too
        from upcycle.convert.grow import grow

        grown = grow(out, tmp_path / "grown", progress=False, factor=2, ratio=0.0)
        assert read_config(grown)["num_local_experts"] == 8
        assert check(str(grown), str(dense)).max_abs_logit_diff <= 1e-4


def test_what_granitemoe_cannot_hold_is_refused(tmp_path, capsys):
    from helpers import assert_convert_refused

    dense = save_dense(tmp_path / "dense", "llama")
    (tmp_path / "out").mkdir()
    assert_convert_refused(capsys, dense, tmp_path / "out" / "moe", "--format", "granitemoe",
                           "--shared-expert-dim", "16",
                           message="--shared-expert-dim sizes a shared expert, which granitemoe does not have")
    moe = convert(dense, tmp_path / "shared", progress=False, method="naive", format="granitemoeshared",
                  num_experts=4, top_k=2, granularity=2, shared_expert="dense")
    code, err = run_cli(capsys, "export", str(moe), str(tmp_path / "out" / "hf"), "--format", "granitemoe")
    assert_one_line_error(code, err, "an ungated shared expert, which only granitemoeshared holds")
