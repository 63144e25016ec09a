"""`make demo` end to end on a tiny seed: every stage runs and the report has its table and plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from upcycle.demo import REPO, main

pytestmark = pytest.mark.slow


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
