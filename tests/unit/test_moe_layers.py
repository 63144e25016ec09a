"""--moe-layers: only the named layers become MoE, the others keep the dense FFN. Qwen2-MoE and Qwen3-MoE hold this
(mlp_only_layers, honoured by transformers on load); Mixtral cannot (one-line error). Our model, export and analyze
handle mixed dense/MoE stacks."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (assert_convert_refused, assert_export_round_trip, logits, make_data_dir, read_config,
                     save_dense)
from upcycle.convert.check import check
from upcycle.convert.conversion import MANIFEST_NAME, convert, load_redrawn
from upcycle.errors import UpcycleError
from upcycle.model.hf import load_model
from upcycle.convert.options import parse_moe_layers

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


def test_layer_specs():
    assert parse_moe_layers("0-3,8", 10) == (0, 1, 2, 3, 8)
    assert parse_moe_layers("every:2", 5) == (1, 3)
    assert parse_moe_layers("every:1", 3) == (0, 1, 2)
    assert parse_moe_layers("all", 3) == (0, 1, 2)
    for bad, message in (("2-1", "cannot read"), ("x", "cannot read"), ("every:0", "cannot read"),
                         ("0,4", "names layer 4, but the model has layers 0-3")):
        with pytest.raises(UpcycleError, match=message):
            parse_moe_layers(bad, 4)


@pytest.mark.parametrize("family, fmt, tied", [("qwen2", "qwen2_moe", True), ("qwen3", "qwen3_moe", False),
                                               ("llama", "qwen2_moe", False)])
def test_partial_moe_is_the_dense_function_in_transformers_and_round_trips_through_our_trainer(tmp_path, family, fmt,
                                                                                               tied):
    dense = save_dense(tmp_path / "dense", family, tied=tied, num_hidden_layers=4)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=4, top_k=2, granularity=2,
                  moe_layers="0,2-3", format=fmt)
    assert read_config(out)["mlp_only_layers"] == [1]
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    kinds = [type(layer.mlp).__name__ for layer in hf_model.model.layers]
    assert "SparseMoeBlock" not in kinds[1] and all("SparseMoeBlock" in kinds[i] for i in (0, 2, 3)), kinds
    assert check(str(out), str(dense)).max_abs_logit_diff <= 1e-4
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [entry["layer"] for entry in manifest["layers"]] == [0, 2, 3]
    assert not load_redrawn(out)[1].any()

    model = load_model(out)
    assert model.config.moe_layer_ids == (0, 2, 3) and model.config.ffn_dim == 48
    with torch.no_grad():
        output = model(IDS)
    assert len(output.router_logits) == 3 and output.expert_counts.shape == (3, 4)
    torch.testing.assert_close(output.logits, logits(dense, IDS), atol=1e-4, rtol=0)
    # auto: qwen2_moe/qwen3_moe, mixtral cannot hold dense layers
    assert assert_export_round_trip(model, tmp_path / "export", IDS)["mlp_only_layers"] == [1]


def test_analyze_reports_only_the_moe_layers(tmp_path):
    from upcycle.eval.analyze import analyze

    dense = save_dense(tmp_path / "dense", "qwen3", num_hidden_layers=4)
    out = convert(dense, tmp_path / "moe", progress=False, num_experts=4, top_k=2, moe_layers="every:2")
    result = analyze(out, make_data_dir(tmp_path / "data"), tmp_path / "analysis", seq_len=16, max_sequences=4,
                     plots=False)
    assert [entry["layer"] for entry in result["layers"]] == [1, 3]
    assert result["plot_layers"] == [1, 3]
    assert "drift" in result["layers"][0]
    with pytest.raises(UpcycleError, match="MoE layers 1,3"):
        analyze(out, tmp_path / "data", tmp_path / "analysis2", layers=[0], plots=False)


@pytest.mark.parametrize("family, args, message", [
    ("llama", ["--moe-layers", "0"], "mixtral has an MoE FFN in every layer and cannot keep dense layers; use --format "
                                     "qwen2_moe"),
    ("qwen2", ["--moe-layers", "0-2"], "names layer 2, but the model has layers 0-1"),
    ("qwen2", ["--moe-layers", "1-0"], "cannot read --moe-layers"),
])
def test_bad_moe_layers_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, family, args, message):
    dense = save_dense(tmp_path / "dense", family)
    assert_convert_refused(capsys, dense, tmp_path / "out", *args, message=message)


def test_online_upcycling_with_every_new_option_starts_at_the_dense_loss(tmp_path, llama_dir):
    """The train config's init section has the same options (one declaration): granular experts, a dense shared
    expert and a dense layer, upcycled online, start at the dense model's loss."""
    from helpers import read_metrics, tiny_config
    from upcycle.train.trainer import run_training
    from upcycle.train.config import config_from_dict

    data_dir = make_data_dir(tmp_path / "data")
    def first_ce(name: str, init: dict) -> float:
        values = tiny_config(data_dir, model=None, init=init, train={"max_steps": 1, "eval_every": 0})
        run_training(config_from_dict(values), tmp_path / name)
        return read_metrics(tmp_path / name)[0]["ce"]

    dense = first_ce("dense", {"source": str(llama_dir)})
    moe = first_ce("moe", {"source": str(llama_dir), "method": "naive", "num_experts": 4, "top_k": 2,
                           "granularity": 3, "shared_expert": "dense", "moe_layers": "1", "format": "qwen2_moe"})
    assert moe == pytest.approx(dense, rel=1e-6, abs=1e-6)


def test_eval_of_a_mixed_stack_with_a_shared_expert_equals_the_dense_models(tmp_path):
    from upcycle.eval.evaluate import evaluate

    data = make_data_dir(tmp_path / "data")
    dense = save_dense(tmp_path / "dense", "qwen2", num_hidden_layers=3)
    moe = convert(dense, tmp_path / "moe", progress=False, method="naive", num_experts=4, top_k=2, granularity=3,
                  shared_expert="dense", moe_layers="every:2")
    dense_eval = evaluate(dense, data, seq_len=16, max_sequences=8)
    moe_eval = evaluate(moe, data, seq_len=16, max_sequences=8)
    assert moe_eval["overall"]["loss"] == pytest.approx(dense_eval["overall"]["loss"], abs=1e-5)
