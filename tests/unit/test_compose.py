"""`upcycle compose`: an MoE from several dense models with routers from prompts. Composing N copies of one model
with r = 0 is that model in every format; router hidden/embed route each expert's prompts to it (measured on the
finished model, in the manifest and by `upcycle check`); `--method btx` is the special case average + uniform."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import logits, read_config, save_dense, subprocess_env, write_tokenizer
from upcycle.convert.check import check
from upcycle.convert.compose import compose
from upcycle.convert.conversion import MANIFEST_NAME, convert, load_redrawn


def _tensors(directory):
    return {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}


def _dense(path, family="llama", **kw):
    directory = save_dense(path, family, **kw)
    write_tokenizer(directory)
    return directory


def _spec(path, **values):
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _words(lo, hi, n=6, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(lo, hi, (length,), generator=g)) for _ in range(n)]


IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(6))
PROBE = " ".join(f"w{(7 * i) % 90}" for i in range(64))  # what the word-level tokenizer reads
PROMPTS = [{"positive": _words(0, 30, seed=1)}, {"positive": _words(30, 60, seed=2)},
           {"positive": _words(60, 90, seed=3), "negative": _words(0, 30, n=2, seed=4)}]


@pytest.mark.parametrize("family, values", [
    ("llama", {}),
    ("llama", {"format": "granitemoeshared", "granularity": 2, "top_k": 2, "shared_expert": "dense"}),
    ("qwen2", {"granularity": 3, "top_k": 4, "shared_expert": "dense", "moe_layers": "1"}),
    ("qwen3", {"average": True, "router": "embed"}),
    ("mistral", {"format": "granitemoeshared", "shared_expert": {"source": "SAME"}, "router": "uniform"}),
    ("qwen3", {"format": "glm4_moe", "granularity": 2, "top_k": 2, "shared_expert": "dense", "moe_layers": "1"}),
    ("llama", {"format": "glm4_moe", "shared_expert": {"source": "SAME"}}),
])
def test_copies_of_one_model_at_r0_are_that_model(tmp_path, family, values):
    dense = _dense(tmp_path / "dense", family)
    copy = tmp_path / "copy"  # a second directory with the same weights: counts as the same model
    import shutil

    shutil.copytree(dense, copy)
    if values.get("shared_expert", None) == {"source": "SAME"}:
        values["shared_expert"] = {"source": str(copy)}
    base = {} if values.get("average") else {"base": str(dense)}
    experts = [{"source": str(d), **p} for d, p in zip([dense, copy, dense], PROMPTS)]
    spec = _spec(tmp_path / "spec.yaml", **base, experts=experts, **values)
    out = compose(spec, tmp_path / "moe", progress=False)
    # (compared directly: transformers 5 reads this word-level tokenizer as Qwen2's, which `check` would use)
    torch.testing.assert_close(logits(out, IDS), logits(dense, IDS), atol=1e-4, rtol=0)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["options"]["command"] == "compose" and manifest["function_preserving"] is True
    assert len(manifest["sources"]) == 2 and manifest["sources"][0]["sha256"] == manifest["sources"][1]["sha256"]


def _three_sources(tmp_path):
    base = _dense(tmp_path / "base", "llama", num_hidden_layers=3)
    return base, [_dense(tmp_path / f"ft{i}", "llama", num_hidden_layers=3, seed=i + 1) for i in range(3)]


def test_hidden_router_sends_each_experts_prompts_to_it(tmp_path):
    base, sources = _three_sources(tmp_path)
    experts = [{"source": str(s), **p, "ratio": 0.5 if i == 1 else 0.0} for i, (s, p) in enumerate(zip(sources,
                                                                                                      PROMPTS))]
    shares = {}
    for router in ("hidden", "uniform"):  # uniform: the same composition with random rows, the control
        spec = _spec(tmp_path / f"{router}.yaml", base=str(base), experts=experts, router=router, top_k=1)
        out = compose(spec, tmp_path / router, progress=False)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert [r["layer"] for r in manifest["prompt_routing"]] == [0, 1, 2]
        shares[router] = [r["top1_share"] for r in manifest["prompt_routing"]]
    # Chance is 1/3. These random tiny models mix tokens in attention, so not every prompt token goes home (the
    # measured shares were 0.42-0.94 per expert and layer), but every expert's prompts go home more often than by
    # chance in every layer, and on average far more often than with random rows (0.01-0.56 here).
    for hidden, uniform in zip(shares["hidden"], shares["uniform"]):
        assert min(hidden) > 0.4 and sum(hidden) / 3 > sum(uniform) / 3 + 0.25, (hidden, uniform)
    out = tmp_path / "hidden"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["function_preserving"] is False and manifest["options"]["router"] == "hidden"
    assert manifest["prompts"][2]["negative"] == PROMPTS[2]["negative"]
    # upcycle check measures the same through transformers on the same tokens
    report = check(str(out), str(base), text=PROBE)
    for ours, theirs in zip(manifest["prompt_routing"], report.prompt_routing, strict=True):
        assert ours["layer"] == theirs["layer"]
        assert ours["top1_share"] == pytest.approx(theirs["top1_share"], abs=1 / 72)  # at most one token apart
    # each expert is its own source's FFN, attention is the base's; only expert 1 was re-drawn
    m, s0, b = _tensors(out), _tensors(sources[0]), _tensors(base)
    assert torch.equal(m["model.layers.0.block_sparse_moe.experts.0.w1.weight"],
                       s0["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(m["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    redrawn = load_redrawn(out)
    assert not redrawn[:, 0].any() and not redrawn[:, 2].any() and (redrawn[:, 1].sum(-1) == 24).all()


def test_embed_router_rows_are_the_prompts_mean_embedding_directions(tmp_path):
    from upcycle.convert.calibration import rows_from_centroids

    base, sources = _three_sources(tmp_path)
    experts = [{"source": str(s), **p} for s, p in zip(sources, PROMPTS)]
    spec = _spec(tmp_path / "spec.yaml", base=str(base), experts=experts, router="embed", router_std=0.05)
    out = compose(spec, tmp_path / "moe", progress=False)
    embed = _tensors(base)["model.embed_tokens.weight"].double()

    def direction(texts):
        ids = torch.tensor([int(w[1:]) for text in texts for w in text.split()])
        unit = embed[ids] / embed[ids].norm(dim=1, keepdim=True)
        return unit.mean(dim=0)

    rows = [direction(p["positive"]) - (direction(p["negative"]) if "negative" in p else 0) for p in PROMPTS]
    expected = rows_from_centroids(torch.stack(rows), std=0.05).float()
    router = _tensors(out)["model.layers.2.block_sparse_moe.gate.weight"]
    torch.testing.assert_close(router, expected, atol=1e-6, rtol=1e-5)
    assert router.norm(dim=1).tolist() == pytest.approx([0.05 * 32 ** 0.5] * 3)


def test_btx_is_compose_with_average_and_uniform_routers(tmp_path):
    a, b = _dense(tmp_path / "a", "qwen2"), _dense(tmp_path / "b", "qwen2", seed=7)
    btx = convert(a, tmp_path / "btx", progress=False, method="btx", btx_sources=[str(b)], num_experts=4, top_k=2)
    spec = _spec(tmp_path / "spec.yaml", average=True, router="uniform", top_k=2,
                 experts=[{"source": str(s)} for s in (a, a, b, b)])
    composed = compose(spec, tmp_path / "composed", progress=False)
    t, c = _tensors(btx), _tensors(composed)
    assert t.keys() == c.keys() and all(torch.equal(t[k], c[k]) for k in t)
    assert read_config(btx) == read_config(composed)


@pytest.mark.parametrize("case, message", [
    ("mismatched", "does not match"),
    ("empty prompt", "tokenizes to nothing; give it some text"),
    ("top_k", "top_k must lie in [1, num_experts=3], got 4"),
    ("shared in mixtral", "shared_expert needs format qwen2_moe, granitemoeshared or glm4_moe"),
    ("no prompts", "has no positive prompts, which router hidden needs for every expert"),
    ("base and average", "give either base (a dense checkpoint) or average: true, exactly one of them"),
    ("unknown field", "spec.yaml: num_experts: unknown field; a compose spec accepts: average, base, calibration, "),
])
def test_bad_spec_is_one_line_exit_2_and_nothing_written(tmp_path, case, message):
    base = _dense(tmp_path / "base", "llama")
    other = _dense(tmp_path / "other", "llama", intermediate_size=64) if case == "mismatched" else base
    experts = [{"source": str(base), **PROMPTS[0]}, {"source": str(other), **PROMPTS[1]},
               {"source": str(base), **PROMPTS[2]}]
    values = {"base": str(base), "experts": experts}
    if case == "empty prompt":
        experts[1]["positive"] = ["w3 w4", "  "]
    if case == "top_k":
        values["top_k"] = 4
    if case == "shared in mixtral":
        values.update(granularity=2, top_k=2, shared_expert="dense")
    if case == "no prompts":
        del experts[2]["positive"]
    if case == "base and average":
        values["average"] = True
    if case == "unknown field":
        values["num_experts"] = 6
    spec = _spec(tmp_path / "spec.yaml", **values)
    result = subprocess.run([sys.executable, "-m", "upcycle", "compose", str(spec), str(tmp_path / "out")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_docs_tables_are_the_generated_ones():
    from helpers import generated_table
    from upcycle.cli import options_table
    from upcycle.convert.compose import ComposeSpec, ExpertSpec

    for cls in (ComposeSpec, ExpertSpec):
        table = generated_table("docs/convert.md", f"upcycle.convert.compose.{cls.__name__}, as_fields=True")
        assert table == options_table(cls, as_fields=True), "regenerate with upcycle.cli.options_table"
