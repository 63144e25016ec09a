"""HF checkpoints <-> our model: logits parity with transformers 5.24 in both directions for every family and
format (per-expert and fused expert keys, tied/untied, GQA, biases, q/k norms, rope scaling), plus loud failures."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from upcycle.commands import export_command
from upcycle.errors import UpcycleError
from upcycle.model.hf import export_hf, load_hf, load_model, save_model
from upcycle.model.transformer import Transformer

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    # name: (config, export format written by `auto`)
    "llama_gqa_llama3": (lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, rope_parameters=LLAMA3),
                         "llama"),
    "llama_tied_bias_linear": (lambda: transformers.LlamaConfig(
        **TINY, tie_word_embeddings=True, attention_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}), "llama"),
    "mistral": (lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None), "llama"),
    "qwen2_tied": (lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True), "qwen2"),
    "qwen3_head_dim": (lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16), "qwen3"),
    "mixtral": (lambda: transformers.MixtralConfig(**TINY, **MOE, num_key_value_heads=2, num_local_experts=4),
                "mixtral"),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(
        **TINY, **MOE, num_key_value_heads=2, num_experts=4, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, norm_topk_prob=True), "qwen2_moe"),
    "qwen3_moe_tied_no_renorm": (lambda: transformers.Qwen3MoeConfig(
        **TINY, **MOE, num_key_value_heads=2, num_experts=4, moe_intermediate_size=24, norm_topk_prob=False,
        tie_word_embeddings=True, rope_parameters=LLAMA3), "qwen3_moe"),
    # every multiplier away from 1 and a live (ungated) shared expert, so each one's mapping matters
    "granitemoeshared_multipliers": (lambda: transformers.GraniteMoeSharedConfig(
        **TINY, **MOE, num_key_value_heads=2, num_local_experts=4, shared_intermediate_size=40, attention_bias=True,
        embedding_multiplier=2.5, residual_multiplier=0.6, attention_multiplier=0.3, logits_scaling=1.5),
        "granitemoeshared"),
    "granitemoeshared_tied_no_shared": (lambda: transformers.GraniteMoeSharedConfig(
        **TINY, **MOE, num_key_value_heads=2, num_local_experts=4, shared_intermediate_size=0,
        tie_word_embeddings=True), "granitemoeshared"),
}


def build_hf(config) -> transformers.PreTrainedModel:
    """A tiny HF model with every parameter random (biases and norms too), so each tensor's mapping matters."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        for name, p in model.named_parameters():
            if "shared_expert.down_proj" in name:  # our model has no shared expert: the converter writes zeros
                p.zero_()
    return model


def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def our_logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    make_config, fmt = CASES[request.param]
    model = build_hf(make_config())
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory, fmt


def test_hf_to_ours_logits_match(saved):
    name, hf_model, directory, _ = saved
    config, state_dict = load_hf(directory)
    ours = Transformer(config)
    ours.load_state_dict(state_dict, strict=True)
    expected = hf_logits(hf_model)
    assert expected.abs().max() > 1.0  # a meaningful signal, not near-zero logits
    assert (our_logits(ours) - expected).abs().max() <= 1e-4
    if config.rope_scaling is not None:  # the scaling must matter at this length, or the test would prove nothing
        plain = Transformer(dataclasses.replace(config, rope_scaling=None))
        plain.load_state_dict(state_dict)
        assert (our_logits(plain) - expected).abs().max() > 1e-3


def test_ours_to_hf_logits_match(saved, tmp_path):
    name, _, directory, fmt = saved
    ours = load_model(directory)
    out = export_hf(ours, ours.config, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == fmt
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (hf_logits(reloaded) - our_logits(ours)).abs().max() <= 1e-4


def test_fused_expert_keys_load(tmp_path):
    """transformers' in-memory layout (mlp.experts.gate_up_proj / down_proj, mlp.gate) is accepted too."""
    make_config, _ = CASES["mixtral"]
    model = build_hf(make_config())
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model.config.to_json_file(tmp_path / "config.json")
    ours = load_model(tmp_path)
    assert (our_logits(ours) - hf_logits(model)).abs().max() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    model = build_hf(CASES["qwen3_moe_tied_no_renorm"][0]())
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (our_logits(load_model(tmp_path)) - hf_logits(model)).abs().max() <= 1e-4


def test_live_qwen2_shared_expert_is_loaded_and_exported_back(tmp_path):
    model = build_hf(CASES["qwen2_moe"][0]())
    with torch.no_grad():
        model.model.layers[1].mlp.shared_expert.down_proj.weight.normal_(0.0, 0.15)
    model.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.shared_expert_dim == 40
    assert (our_logits(ours) - hf_logits(model)).abs().max() <= 1e-4
    export_hf(ours, ours.config, tmp_path / "out")
    assert (our_logits(ours) - hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
            ).abs().max() <= 1e-5
    with pytest.raises(UpcycleError, match="shared expert, which only qwen2_moe holds"):
        export_hf(ours, ours.config, tmp_path / "mixtral", fmt="mixtral")


def test_unknown_or_misshaped_tensors_are_refused(tmp_path):
    model = build_hf(CASES["llama_gqa_llama3"][0]())
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    model.config.to_json_file(tmp_path / "config.json")
    save_file({**tensors, "model.layers.0.mystery.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UpcycleError, match="does not know: model.layers.0.mystery.weight"):
        load_hf(tmp_path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UpcycleError, match="k_proj.weight has shape"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(UpcycleError, match="never unpickles"):
        load_hf(tmp_path)


def test_our_checkpoint_round_trip_and_export_command(tmp_path, capsys):
    model = build_hf(CASES["qwen3_moe_tied_no_renorm"][0]())
    model.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model"]["renormalize"] is False
    again = load_model(tmp_path / "ours")
    assert again.config == ours.config
    assert torch.equal(our_logits(again), our_logits(ours))
    export_command(str(tmp_path / "ours"), str(tmp_path / "bf16"), dtype="bfloat16")
    assert "wrote" in capsys.readouterr().out
    exported = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert exported["dtype"] == "bfloat16" and exported["norm_topk_prob"] is False
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # bf16 rounding can flip a routing choice, so compare against our model holding the same rounded weights
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert (hf_logits(reloaded) - our_logits(load_model(tmp_path / "bf16"))).abs().max() <= 1e-4


def test_export_refusals(tmp_path):
    ours = load_model(_save(CASES["mixtral"][0](), tmp_path / "src"))
    with pytest.raises(UpcycleError, match="renormalizes"):  # mixtral cannot express norm_topk_prob=False
        export_hf(ours, dataclasses.replace(ours.config, renormalize=False), tmp_path / "a", fmt="mixtral")
    ours = load_model(_save(CASES["qwen3_moe_tied_no_renorm"][0](), tmp_path / "src2"))
    with pytest.raises(UpcycleError, match="q/k norms"):
        export_hf(ours, ours.config, tmp_path / "b", fmt="qwen2_moe")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(UpcycleError, match="already exists.*--force"):
        export_hf(ours, ours.config, tmp_path / "busy")
    assert not list(tmp_path.glob(".*tmp-*"))  # nothing half-written left behind
    export_hf(ours, ours.config, tmp_path / "busy", force=True)  # the same policy as every other command
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["config.json", "model.safetensors"]


def test_llama_without_biases_exports_as_qwen2_moe_with_zero_biases(tmp_path):
    ours = load_model(_save(CASES["mixtral"][0](), tmp_path / "src"))
    out = export_hf(ours, ours.config, tmp_path / "q", fmt="qwen2_moe")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    assert (hf_logits(reloaded) - our_logits(ours)).abs().max() <= 1e-4


def test_tied_moe_exported_as_qwen2_moe_gets_an_untied_head_and_a_nonzero_shared_gate(tmp_path):
    """What llama.cpp's qwen2moe needs (see hf_formats.untied_head and upcycling.init_shared_expert)."""
    from safetensors.torch import load_file

    ours = load_model(_save(transformers.MixtralConfig(**TINY, **MOE, num_key_value_heads=2, num_local_experts=4,
                                                       tie_word_embeddings=True), tmp_path / "src"))
    assert ours.config.tie_embeddings
    out = export_hf(ours, ours.config, tmp_path / "q", fmt="qwen2_moe")
    tensors = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    gate = tensors["model.layers.0.mlp.shared_expert_gate.weight"]
    assert torch.count_nonzero(gate) == gate.numel()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (hf_logits(reloaded) - our_logits(ours)).abs().max() <= 1e-4


def _save(config, directory):
    build_hf(config).save_pretrained(directory)
    return directory


def test_export_format_names_what_fits_the_checkpoint(tmp_path):
    moe = load_model(_save(CASES["mixtral"][0](), tmp_path / "moe"))
    with pytest.raises(UpcycleError, match=r"--format llama writes a dense model, but this checkpoint is an MoE"):
        export_hf(moe, moe.config, tmp_path / "a", fmt="llama")
    dense = load_model(_save(CASES["llama_gqa_llama3"][0](), tmp_path / "dense"))
    with pytest.raises(UpcycleError, match=r"--format mixtral writes an MoE, but this checkpoint is dense"):
        export_hf(dense, dense.config, tmp_path / "b", fmt="mixtral")
    with pytest.raises(UpcycleError, match=r"unknown --format 'gpt2'; choose auto, mixtral"):
        export_hf(dense, dense.config, tmp_path / "c", fmt="gpt2")
    assert not list(tmp_path.glob("[abc]"))


def test_export_and_save_model_write_byte_identical_world_readable_files(tmp_path):
    """Users compare hashes: two exports of one checkpoint are byte-identical, and every file is 0644 like the rest
    of a checkpoint directory (safetensors' own writer made model.safetensors 0600)."""
    import hashlib
    import os
    import stat

    model = build_hf(CASES["qwen3_moe_tied_no_renorm"][0]())
    model.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    for name in ("a", "b"):
        export_command(str(tmp_path / "ours"), str(tmp_path / name))
    umask = os.umask(0)
    os.umask(umask)
    for directory in ("ours", "a"):
        for path in (tmp_path / directory).iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    digest = {n: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / n).iterdir()} for n in "ab"}
    assert digest["a"] == digest["b"]


def test_a_model_without_renormalization_exports_where_llama_cpp_computes_it_too(tmp_path):
    """Llama attention, renormalize=False (trained after `convert --no-renormalize --format qwen2_moe`): auto picks
    qwen2_moe with norm_topk_prob false (mixtral cannot skip renormalization), the function llama.cpp's qwen2moe
    graph computes, so no engine note applies."""
    from upcycle.formats import hf_formats as hf

    src = load_model(_save(CASES["mixtral"][0](), tmp_path / "src"))
    ours = Transformer(dataclasses.replace(src.config, renormalize=False))
    ours.load_state_dict(src.state_dict())
    out = export_hf(ours.eval(), ours.config, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["norm_topk_prob"] is False and hf.engine_note(cfg) is None
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (hf_logits(reloaded) - our_logits(ours)).abs().max() <= 1e-4
