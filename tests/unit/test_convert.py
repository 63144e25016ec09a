"""`upcycle convert` end to end: tiny dense checkpoints on disk -> MoE checkpoints loaded by transformers 5.24."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import logits, read_config, save_dense
from upcycle.formats import hf_formats as hf
from upcycle.convert.conversion import MANIFEST_NAME, convert, convert_in_memory, load_redrawn

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        if file.name.startswith("upcycle_"):
            continue
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family, fmt, tied", [
    ("llama", "auto", False), ("llama", "auto", True), ("mistral", "auto", False), ("qwen2", "auto", False),
    ("qwen2", "auto", True), ("qwen3", "auto", False), ("llama", "qwen2_moe", False),
])
def test_naive_upcycling_reproduces_the_dense_logits_through_transformers(tmp_path, family, fmt, tied):
    dense = save_dense(tmp_path / "dense", family, tied=tied)
    out = convert(dense, tmp_path / "moe", method="naive", num_experts=4, top_k=2, format=fmt, progress=False)
    cfg = read_config(out)
    assert cfg["model_type"] == (hf.AUTO_FORMAT[family] if fmt == "auto" else fmt)
    diff = (logits(dense, IDS) - logits(out, IDS)).abs().max().item()
    assert diff <= 1e-4, diff
    if cfg["model_type"] == "qwen2_moe":
        down = _tensors(out)[hf.shared_expert_keys(0)["shared_down"]]
        assert torch.count_nonzero(down) == 0


def test_naive_is_exact_for_sharded_bf16_checkpoints_and_writes_shards(tmp_path):
    dense = save_dense(tmp_path / "dense", "llama", dtype=torch.bfloat16, max_shard_size="20KB")
    assert (dense / "model.safetensors.index.json").is_file()  # the source itself is sharded
    out = convert(dense, tmp_path / "moe", method="naive", num_experts=4, max_shard_size="30KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert read_config(out)["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _tensors(out).values())
    assert (logits(dense, IDS) - logits(out, IDS)).abs().max().item() <= 1e-4


def test_config_fields_carry_over_so_defaults_of_moe_configs_cannot_leak(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}
    dense = save_dense(tmp_path / "dense", "llama", rope_parameters=rope, rms_norm_eps=3e-6, head_dim=16,
                       max_position_embeddings=333, bos_token_id=5, eos_token_id=6, pad_token_id=7)
    out = convert(dense, tmp_path / "moe", method="naive", num_experts=2, top_k=1, progress=False)
    cfg = read_config(out)
    for key in ("rms_norm_eps", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == read_config(dense)[key], key
    assert cfg["rope_parameters"]["rope_theta"] == 20000.0 and cfg["rope_parameters"]["factor"] == 2.0
    assert cfg["router_aux_loss_coef"] == 0.02 and cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1
    assert (logits(dense, IDS) - logits(out, IDS)).abs().max().item() <= 1e-4
    for name in ("tokenizer.json",):
        assert not (out / name).exists()  # nothing invented when the source has no tokenizer


def test_drop_output_inherits_exactly_the_neurons_the_manifest_says(tmp_path, llama_dir):
    out = convert(llama_dir, tmp_path / "moe", method="drop", ratio=0.5, num_experts=4, progress=False)
    dense, moe = _tensors(llama_dir), _tensors(out)
    redrawn = load_redrawn(out)
    assert redrawn.shape == (2, 4, 3, 48)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for layer in range(2):
        for e in range(4):
            record = manifest["layers"][layer]["experts"][e]
            for i, m in enumerate(("gate", "up", "down")):
                axis = 1 if m == "down" else 0
                old = dense[hf.dense_ffn_key(layer, m)]
                new = moe[hf.expert_key("mixtral", layer, e, m)]
                keep = (~redrawn[layer, e, i]).nonzero().flatten()
                assert torch.equal(new.index_select(axis, keep), old.index_select(axis, keep))
                assert record[m]["redrawn"] == int(redrawn[layer, e, i].sum()) == 24
    assert manifest["options"]["index_mode"] == "independent" and manifest["options"]["method"] == "drop"
    assert not {"method", "seed", "index_mode", "format", "num_experts", "top_k"} & set(manifest)  # each fact once
    assert set(manifest["sources"][0]["sha256"]) == {"config.json", "model.safetensors"}
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_same_seed_gives_byte_identical_weights_and_another_seed_does_not(tmp_path, llama_dir):
    a = convert(llama_dir, tmp_path / "a", seed=11, num_experts=4, progress=False)
    b = convert(llama_dir, tmp_path / "b", seed=11, num_experts=4, progress=False)
    c = convert(llama_dir, tmp_path / "c", seed=12, num_experts=4, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    # the in-memory path used by online upcycling produces the same tensors
    _, state = convert_in_memory(llama_dir, seed=11, num_experts=4)
    on_disk = _tensors(a)
    assert state.keys() == on_disk.keys() and all(torch.equal(state[k], on_disk[k]) for k in state)


def test_drop_moves_the_function_and_shared_mode_keeps_more_intact(tmp_path, llama_dir):
    base = logits(llama_dir, IDS)
    diffs = {}
    for mode in ("independent", "shared"):
        out = convert(llama_dir, tmp_path / mode, index_mode=mode, num_experts=4, progress=False)
        diffs[mode] = (logits(out, IDS) - base).abs().mean().item()
        assert json.loads((out / MANIFEST_NAME).read_text())["options"]["index_mode"] == mode
    assert diffs["independent"] > 0 and diffs["shared"] > 0
    assert load_redrawn(tmp_path / "shared")[:, :, 0].equal(load_redrawn(tmp_path / "shared")[:, :, 2])


def test_scratch_reinitialises_everything_like_hf(tmp_path, llama_dir):
    out = convert(llama_dir, tmp_path / "moe", method="scratch", num_experts=2, progress=False)
    moe, dense = _tensors(out), _tensors(llama_dir)
    assert torch.equal(moe["model.norm.weight"], torch.ones(32))
    assert torch.equal(moe["model.layers.0.input_layernorm.weight"], torch.ones(32))
    q = moe["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q, dense["model.layers.1.self_attn.q_proj.weight"])
    everything = torch.cat([t.flatten() for k, t in moe.items() if t.dim() == 2 and "gate.weight" not in k])
    assert abs(everything.std().item() - 0.02) < 0.001 and abs(everything.mean().item()) < 0.001
    assert load_redrawn(out).all()


def test_btx_averages_non_ffn_tensors_and_maps_experts_to_sources(tmp_path):
    sources = [save_dense(tmp_path / f"s{i}", "llama", seed=i) for i in range(2)]
    out = convert(sources[0], tmp_path / "moe", method="btx", btx_sources=[str(sources[1])], num_experts=4,
                  progress=False)
    moe, s0, s1 = _tensors(out), _tensors(sources[0]), _tensors(sources[1])
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight", "model.norm.weight"):
        assert torch.allclose(moe[key], (s0[key] + s1[key]) / 2, atol=1e-7)
    for e, src in enumerate([s0, s0, s1, s1]):
        for m in ("gate", "up", "down"):
            assert torch.equal(moe[hf.expert_key("mixtral", 1, e, m)], src[hf.dense_ffn_key(1, m)])
    records = json.loads((out / MANIFEST_NAME).read_text())["layers"][0]["experts"]
    assert [r["source"] for r in records] == [0, 0, 1, 1]


def test_interrupted_conversion_leaves_no_output_and_force_replaces_only_when_complete(tmp_path, llama_dir,
                                                                                        monkeypatch):
    from upcycle.formats import safetensors_io

    target = tmp_path / "moe"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    calls = {"n": 0}
    original = safetensors_io.ShardWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        convert(llama_dir, target, force=True, num_experts=2, progress=False)
    assert (target / "keep.txt").read_text() == "precious"  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # and no temporary directory is left behind
    monkeypatch.setattr(safetensors_io.ShardWriter, "write", original)
    convert(llama_dir, target, force=True, num_experts=2, progress=False)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_output_file_is_byte_reproducible_and_readable_like_the_rest(tmp_path, llama_dir):
    import hashlib
    import stat

    digests, modes = [], []
    for name in ("a", "b"):
        out = convert(llama_dir, tmp_path / name, seed=5, num_experts=4, progress=False)
        files = sorted(p for p in out.iterdir())
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
        modes.append({p.name: stat.S_IMODE(p.stat().st_mode) for p in files})
    assert "upcycle_redrawn.safetensors" in digests[0] and MANIFEST_NAME in digests[0]
    assert digests[0] == digests[1]
    expected = 0o666 & ~_umask()
    assert set(modes[0].values()) == {expected}, modes[0]


@pytest.mark.parametrize("fmt, tied", [("mixtral", False), ("qwen2_moe", True)])
def test_the_size_estimate_bounds_the_real_output_without_wild_excess(tmp_path, fmt, tied):
    from upcycle.convert.options import ConvertOptions, estimate

    dense = save_dense(tmp_path / "dense", "llama", tied=tied)
    out = convert(dense, tmp_path / "moe", num_experts=6, format=fmt, progress=False)
    written = sum(p.stat().st_size for p in out.iterdir() if p.name not in ("tokenizer.json", "tokenizer_config.json"))
    shapes = hf.read_shapes(read_config(dense))
    predicted = estimate(shapes, fmt, ConvertOptions(num_experts=6, format=fmt), value_bytes=4).output_bytes
    assert written <= predicted <= 1.5 * written


def test_nan_in_a_source_is_named_and_nothing_is_published(tmp_path):
    from safetensors.torch import load_file, save_file

    from upcycle.errors import UpcycleError

    dense = save_dense(tmp_path / "dense", "llama")
    state = load_file(dense / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("inf")
    save_file(state, dense / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match="model.layers.0.self_attn.k_proj.weight in .* NaN or Inf"):
        convert(dense, tmp_path / "moe", num_experts=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_qwen2_moe_output_has_what_llama_cpp_needs_and_stays_the_dense_function(tmp_path, capsys):
    """llama.cpp's qwen2moe loader needs output.weight (no tied fallback) and computes the shared-expert sigmoid as
    silu(x)/x (NaN at 0 for an all-zero gate); the output must satisfy both and still be the dense function."""
    from upcycle.commands import convert_command
    from upcycle.convert.options import ConvertOptions

    dense = save_dense(tmp_path / "dense", "qwen2", tied=True)
    convert_command(str(dense), str(tmp_path / "moe"), ConvertOptions(method="naive", num_experts=4))
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "llama.cpp's qwen2moe graph never renormalizes" in notes[0]
    assert "--no-renormalize" in notes[0]
    out, tensors = tmp_path / "moe", _tensors(tmp_path / "moe")
    assert read_config(out)["tie_word_embeddings"] is False
    assert torch.equal(tensors[hf.LM_HEAD_KEY], tensors[hf.EMBED_KEY])
    for layer in range(2):
        gate = tensors[hf.shared_expert_keys(layer)["shared_expert_gate"]]
        assert torch.count_nonzero(gate) == gate.numel() and torch.isfinite(gate).all()
    assert (logits(dense, IDS) - logits(out, IDS)).abs().max().item() <= 1e-4
    llama = save_dense(tmp_path / "llama", "llama", tied=True)
    convert_command(str(llama), str(tmp_path / "mix"), ConvertOptions(num_experts=2))
    assert "note:" not in capsys.readouterr().err
    assert read_config(tmp_path / "mix")["tie_word_embeddings"] is True  # formats with a tied fallback stay tied


def test_no_renormalize_makes_a_qwen2_moe_that_llama_cpp_computes_as_transformers_at_a_cost(tmp_path, capsys):
    """llama.cpp's qwen2moe graph never renormalizes the top-k weights (its qwen3moe graph always does, mixtral's
    always does): --no-renormalize writes norm_topk_prob false, which transformers and our trainer then compute too.
    The cost: a naive conversion is no longer the dense function, and `check` says so instead of failing."""
    from upcycle.convert.check import check
    from upcycle.cli import main
    from upcycle.commands import convert_command
    from upcycle.convert.options import ConvertOptions
    from upcycle.errors import UpcycleError
    from upcycle.model.hf import load_model

    dense = save_dense(tmp_path / "dense", "qwen2")
    convert_command(str(dense), str(tmp_path / "moe"), ConvertOptions(method="naive", num_experts=4,
                                                                      renormalize=False), quiet=True)
    assert capsys.readouterr().err == ""  # the engines agree: no note
    out = tmp_path / "moe"
    assert read_config(out)["norm_topk_prob"] is False
    assert json.loads((out / MANIFEST_NAME).read_text())["options"]["renormalize"] is False
    ours = load_model(out).eval()
    assert ours.config.renormalize is False
    with torch.no_grad():
        assert (ours(IDS).logits - logits(out, IDS)).abs().max().item() <= 1e-4
    assert (logits(dense, IDS) - logits(out, IDS)).abs().max().item() > 1e-2  # not the dense function any more
    report = check(str(out), str(dense))
    assert report.method == "naive" and report.renormalize is False and report.equivalent is None
    assert main(["check", str(out), "--dense", str(dense)]) in (0, None)
    assert "not exact by design" in capsys.readouterr().out

    qwen3 = save_dense(tmp_path / "qwen3", "qwen3")
    convert_command(str(qwen3), str(tmp_path / "q3"), ConvertOptions(num_experts=2, renormalize=False), quiet=True)
    err = capsys.readouterr().err
    assert "llama.cpp's qwen3moe graph always renormalizes" in err and "leave out --no-renormalize" in err
    llama = save_dense(tmp_path / "llama", "llama")
    with pytest.raises(UpcycleError, match="mixtral always renormalizes.*--no-renormalize.*--format qwen2_moe"):
        convert(llama, tmp_path / "mix", num_experts=2, renormalize=False, progress=False)
    convert(llama, tmp_path / "lq", num_experts=2, renormalize=False, format="qwen2_moe", progress=False)
    assert hf.engine_note(read_config(tmp_path / "lq")) is None
