"""The CPU benchmark scripts run end to end at a toy shape and print their JSON summary (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, subprocess_env


def run_script(name: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_moe_layer_benchmark_reports_ratios_and_the_cpu():
    summary = run_script("moe_layer.py", "--tokens", "64", "--dim", "32", "--ffn-dim", "48", "--experts", "4",
                         "--repeats", "1", "--dtypes", "fp32")
    assert summary["moe_vs_dense_fp32"] > 0 and summary["speedup_vs_hf_fp32"] > 0
    assert summary["bf16"] == "skipped: not in --dtypes" and "moe_vs_dense_bf16" not in summary
    assert "flags" in summary["cpu"] and summary["aten_cpu_capability"]


def test_train_throughput_benchmark_reports_both_models():
    summary = run_script("train_throughput.py", "--dim", "32", "--layers", "1", "--ffn-dim", "48", "--experts", "4",
                         "--vocab", "128", "--seq-len", "16", "--batch", "2", "--rounds", "1", "--steps", "1",
                         "--precision", "fp32")
    assert summary["ours_tokens_per_s"] > 0 and summary["transformers_tokens_per_s"] > 0
    assert summary["precision"] == "fp32" and "flags" in summary["cpu"]
