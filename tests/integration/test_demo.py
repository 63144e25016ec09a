"""`make demo` end to end on a tiny seed: every stage runs and the report has its table and plots."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from upcycle.eval.analyze import mean_pairwise_jsd, routing_stats, routing_sums

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "demo.py"


def _load_script():
    """scripts/demo.py as a module: the demo is a script of the checkout, not part of the installed package."""
    spec = importlib.util.spec_from_file_location("upcycle_demo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_script()
DOMAINS, main, write_report = demo.DOMAINS, demo.main, demo.write_report


def test_the_demo_is_a_script_of_the_checkout_not_a_package_module(tmp_path):
    """`python -m upcycle.demo` does not exist (an installed package has no seed model or corpus to run it on), and
    scripts/demo.py finds the checkout's files through its own path, whatever the working directory."""
    assert importlib.util.find_spec("upcycle.demo") is None
    assert demo.REPO == REPO
    for path in (demo.SEED_DIR / "config.json", demo.DEMO_CONFIG, *(demo.SAMPLE_DIR / f"{d}.train.jsonl.gz"
                                                                   for d in DOMAINS)):
        assert path.is_file(), path
    makefile = (REPO / "Makefile").read_text()
    assert "$(PY) scripts/demo.py" in makefile and "upcycle.demo" not in makefile


def _layer(index: int, logits_by_domain: dict[str, torch.Tensor]) -> dict:
    """One layer entry of analysis.json, computed by analyze's own functions from given router logits."""
    sums = {d: routing_sums(logits_TE, top_k=1) for d, logits_TE in logits_by_domain.items()}
    routing = {d: routing_stats(s) for d, s in sums.items()}
    pooled = routing_stats(routing_sums(torch.cat(list(logits_by_domain.values())), top_k=1))
    return {"layer": index, "routing": routing, "all_domains": pooled,
            "specialization_jsd": mean_pairwise_jsd({d: np.array(r["share"]) for d, r in routing.items()})}


def test_report_shows_the_dead_experts_of_the_analysis(tmp_path):
    """analysis.json keeps dead experts under `all_domains` and per domain; the report's table must show them."""
    one_hot = torch.eye(4) * 10.0  # logits that send every token of a row's domain to one expert
    layers = [
        # english -> expert 0, japanese -> 1, code -> 0: expert 2 and 3 are dead everywhere, 1 is dead in two domains
        _layer(0, {"english": one_hot[[0, 0]], "japanese": one_hot[[1, 1]], "code": one_hot[[0, 0]]}),
        _layer(1, {d: one_hot[[0, 1, 2, 3]] for d in DOMAINS}),  # every expert used by every domain
    ]
    analysis = {"layers": layers}
    evals = {"dense seed": {"domains": {d: {"loss": 2.0, "perplexity": 7.4} for d in DOMAINS}}}
    report = write_report(tmp_path, seed_dir=tmp_path, steps=3, tokens=100, evals=evals,
                          analyses={"naive": analysis}, seconds=1.0).read_text()
    assert "[docs/experiments.md](" in report
    link = report.split("[docs/experiments.md](")[1].split(")")[0]
    assert (tmp_path / link).resolve() == REPO / "docs" / "experiments.md"  # relative to the report
    rows = [line for line in report.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert rows[0] == ("| 0 | 0.6667 | [2, 3] | code: [1, 2, 3]; english: [1, 2, 3]; japanese: [0, 2, 3] |")
    assert rows[1] == "| 1 | 0.0000 | none | none |"


@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory) -> Path:
    """A tiny Llama with the repository's tokenizer (vocab 8192), saved as an HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("seed")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    for file in (REPO / "assets" / "tokenizer").iterdir():
        shutil.copy2(file, directory / file.name)
    return directory


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(tiny_seed, tmp_path, capsys):
    out = tmp_path / "demo"
    main(["--seed-model", str(tiny_seed), "--out", str(out), "--steps", "3"])
    report = (out / "report.md").read_text()
    for name in ("loss.png", "routing_naive.png", "routing_drop.png"):
        assert (out / name).stat().st_size > 1000, name
        assert name in report
    rows = [line for line in report.splitlines() if line.startswith(("| dense seed", "| naive", "| drop"))]
    assert len(rows) == 5
    assert "3 optimizer steps" in report and "nothing here tests that claim" in report
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {"dense seed", "naive, before training", "drop, before training", "naive, after training",
                          "drop, after training"}
    # naive upcycling is the dense function: same per-domain losses before training (fp32, up to summation order)
    for domain, result in evals["dense seed"]["domains"].items():
        assert evals["naive, before training"]["domains"][domain]["loss"] == pytest.approx(result["loss"], abs=1e-4)
    for result in evals.values():
        assert set(result["domains"]) == {"english", "japanese", "code"}
    # same data order in both arms, so the first losses differ only because drop re-drew half of each expert
    first = {arm: json.loads((out / f"train-{arm}" / "metrics.jsonl").read_text().splitlines()[0])["ce"]
             for arm in ("naive", "drop")}
    assert first["naive"] != first["drop"]
    manifest = json.loads((out / "drop" / "upcycle_manifest.json").read_text())
    assert manifest["options"]["method"] == "drop" and manifest["options"]["num_experts"] == 8
