"""--format glm4_moe: the DeepSeek-V3 MoE layout over ordinary attention (sigmoid routers with a balancing bias, an
ungated shared expert of whole routed experts, dense first layers). r = 0 is the dense function in transformers and in
our model; what the trainer trains with sigmoid routers and a bias exports as glm4_moe and computes the same there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import (assert_convert_refused, assert_one_line_error, logits, make_data_dir, read_config, run_cli,
                     save_dense, tiny_config)
from upcycle.convert.check import check
from upcycle.convert.conversion import convert
from upcycle.model.hf import load_model

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family, options, shared, dense_first", [
    ("llama", dict(num_experts=4, top_k=2), 0, 0),  # coarse experts, no shared expert
    ("llama", dict(num_experts=6, top_k=3, granularity=4, shared_expert="dense"), 1, 0),
    ("qwen3", dict(num_experts=4, top_k=2, moe_layers="1"), 0, 1),  # q/k norms, head_dim 16, a dense first layer
    ("qwen3", dict(num_experts=8, top_k=4, granularity=2, shared_expert_dim=48), 2, 0),  # zero shared expert
    ("qwen2", dict(num_experts=4, top_k=2, granularity=2, shared_expert="dense"), 1, 0),  # q/k/v biases
])
def test_naive_glm4_moe_output_is_the_dense_function_in_transformers(tmp_path, family, options, shared, dense_first):
    dense = save_dense(tmp_path / "dense", family)
    out = convert(dense, tmp_path / "moe", progress=False, method="naive", format="glm4_moe", **options)
    cfg = read_config(out)
    granularity = options.get("granularity", 1)
    assert cfg["model_type"] == "glm4_moe" and cfg["architectures"] == ["Glm4MoeForCausalLM"]
    assert cfg["partial_rotary_factor"] == cfg["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert cfg["head_dim"] == (16 if family == "qwen3" else 8)
    assert cfg["n_routed_experts"] == options["num_experts"] and cfg["moe_intermediate_size"] == 48 // granularity
    assert cfg["n_shared_experts"] == shared and cfg["first_k_dense_replace"] == dense_first
    assert cfg["num_nextn_predict_layers"] == 0 and cfg["norm_topk_prob"] is True
    assert cfg["routed_scaling_factor"] == 1.0 and cfg["use_qk_norm"] == (family == "qwen3")
    assert cfg["attention_bias"] == (family == "qwen2")
    report = check(str(out), str(dense))
    assert report.max_abs_logit_diff <= 1e-4, report
    assert report.equivalent is True
    model = load_model(out)  # our model computes the same function from the same checkpoint
    assert model.config.router_activation == "sigmoid" and model.config.expert_bias
    assert model.config.shared_expert_dim == (48 // granularity if options.get("shared_expert") == "dense" else 0)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits(dense, IDS), atol=1e-4, rtol=0)


def test_refusals_name_a_format_that_fits(tmp_path, capsys):
    llama = save_dense(tmp_path / "llama", "llama")
    out = tmp_path / "out" / "moe"
    out.parent.mkdir()
    base = ("--method", "naive", "--num-experts", "4", "--top-k", "2", "--format", "glm4_moe")
    assert_convert_refused(capsys, llama, out, *base, "--moe-layers", "0",
                           message="glm4_moe keeps dense FFNs only in the first layers, but --moe-layers leaves layer "
                                   "1 dense after MoE layer 0; use --format qwen2_moe or qwen3_moe")
    assert_convert_refused(capsys, llama, out, *base, "--shared-expert-dim", "20",
                           message="glm4_moe's shared expert is a whole number of routed experts' size (48")
    biased = save_dense(tmp_path / "biased", "llama", attention_bias=True)
    assert_convert_refused(capsys, biased, out, *base, message="llama has an o_proj bias, which glm4_moe cannot hold")


def test_growing_a_glm4_moe_keeps_its_function_and_copies_the_bias(tmp_path):
    from upcycle.convert.grow import grow

    dense = save_dense(tmp_path / "dense", "llama")
    moe = convert(dense, tmp_path / "moe", progress=False, method="naive", format="glm4_moe", num_experts=4, top_k=2,
                  shared_expert_dim=48)
    grown = grow(moe, tmp_path / "grown", progress=False, factor=2, ratio=0.0)
    cfg = read_config(grown)
    assert cfg["n_routed_experts"] == 8 and cfg["num_experts_per_tok"] == 4 and cfg["n_shared_experts"] == 1
    assert check(str(grown), str(dense)).max_abs_logit_diff <= 1e-4


def _train_sigmoid(tmp_path, source) -> Path:
    """A few steps from a glm4_moe checkpoint (init.source) with the bias moving; the last checkpoint."""
    from upcycle.train import checkpoint as ckpt
    from upcycle.train.config import config_from_dict
    from upcycle.train.trainer import run_training

    data = make_data_dir(tmp_path / "data")
    values = tiny_config(data, model=None, init={"source": str(source)},
                         train={"max_steps": 4, "eval_every": 0, "aux_coef": 0.0, "bias_update_rate": 0.01})
    run_training(config_from_dict(values), tmp_path / "run")
    return ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")


def test_a_trained_sigmoid_model_exports_as_glm4_moe_with_its_bias(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    dense = save_dense(tmp_path / "dense", "qwen3")
    moe = convert(dense, tmp_path / "moe", progress=False, method="drop", ratio=0.5, format="glm4_moe",
                  num_experts=4, top_k=2, granularity=2, shared_expert="dense")
    trained = _train_sigmoid(tmp_path, moe)  # train reads glm4_moe (init.source)
    ours = load_model(trained)
    biases = [layer.ffn.expert_bias_E for layer in ours.layers]
    assert all(b.abs().sum() > 0 for b in biases)  # the bias moved
    code, err = run_cli(capsys, "export", str(trained), str(tmp_path / "hf"), "--format", "glm4_moe")
    assert code == 0, err
    cfg = read_config(tmp_path / "hf")
    assert cfg["model_type"] == "glm4_moe" and cfg["n_shared_experts"] == 1 and cfg["moe_intermediate_size"] == 24
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for i, bias in enumerate(biases):
        assert torch.equal(exported.model.layers[i].mlp.gate.e_score_correction_bias, bias)
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, ours(IDS).logits, atol=1e-5, rtol=0)
    assert torch.equal(load_model(tmp_path / "hf").layers[0].ffn.expert_bias_E, biases[0])  # and reads back
    for fmt in ("mixtral", "qwen3_moe", "granitemoeshared"):
        code, err = run_cli(capsys, "export", str(trained), str(tmp_path / fmt), "--format", fmt)
        assert_one_line_error(code, err, "only glm4_moe holds", "use --format glm4_moe")
    code, err = run_cli(capsys, "export", str(trained), str(tmp_path / "auto"))
    assert code == 0 and read_config(tmp_path / "auto")["model_type"] == "glm4_moe"


def test_a_softmax_model_with_a_moved_bias_is_not_exported_without_it(tmp_path, capsys):
    from upcycle.train import checkpoint as ckpt
    from upcycle.train.config import config_from_dict
    from upcycle.train.trainer import run_training

    data = make_data_dir(tmp_path / "data")
    values = tiny_config(data, train={"max_steps": 2, "eval_every": 0, "bias_update_rate": 0.01})
    run_training(config_from_dict(values), tmp_path / "run")
    trained = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    code, err = run_cli(capsys, "export", str(trained), str(tmp_path / "hf"))
    assert_one_line_error(code, err, "softmax routers carry a non-zero balancing bias")
    code, err = run_cli(capsys, "export", str(trained), str(tmp_path / "hf"), "--format", "glm4_moe")
    assert_one_line_error(code, err, "glm4_moe routes by sigmoid scores, but this MoE's routers are softmax")
    assert not (tmp_path / "hf").exists()


def test_glm4_moe_outputs_carry_the_llama_cpp_note_and_say_how_to_make_one_that_loads():
    from upcycle.formats.hf_formats import engine_note

    base = {"model_type": "glm4_moe", "hidden_size": 64, "num_attention_heads": 4}
    without = engine_note({**base, "n_shared_experts": 0})
    with_shared = engine_note({**base, "n_shared_experts": 1})
    assert "[gMASK]" in without and "[gMASK]" in with_shared
    assert "--shared-expert zero --shared-expert-dim" in without
    assert "--shared-expert zero" not in with_shared
