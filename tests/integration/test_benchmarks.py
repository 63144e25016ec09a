"""The CPU benchmark scripts run end to end at a toy shape and print their JSON summary (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
    assert summary["auto_precision"] in ("fp32", "bf16") and summary["matmul_gflops_fp32"] > 0
    assert summary["sigmoid_bias_vs_softmax_fp32"] > 0 and summary["capacity_1.25_vs_dropless_fp32"] > 0


def test_train_throughput_benchmark_reports_both_models_and_what_auto_picks():
    summary = run_script("train_throughput.py", "--dim", "32", "--layers", "1", "--ffn-dim", "48", "--experts", "4",
                         "--vocab", "128", "--seq-len", "16", "--batch", "2", "--rounds", "1", "--steps", "1",
                         "--force-bf16")  # both dtypes (the default), bf16 even where it is emulated
    for precision in ("fp32", "bf16"):
        assert summary[f"ours_tokens_per_s_{precision}"] > 0 and summary[f"transformers_tokens_per_s_{precision}"] > 0
    assert summary["ours_bf16_speedup"] == pytest.approx(summary["ours_tokens_per_s_bf16"]
                                                         / summary["ours_tokens_per_s_fp32"], rel=1e-2)
    assert summary["auto_precision"] in ("fp32", "bf16") and "flags" in summary["cpu"]


def test_expert_gemm_benchmark_times_the_split_and_the_packed_gemms_against_dense():
    summary = run_script("expert_gemm.py", "--tokens", "64", "--dim", "32", "--ffn-dim", "48", "--experts", "4",
                         "--repeats", "1")  # the script checks that the packed GEMMs compute the same products
    assert summary["dense_vs_dense"] == 1.0 and summary["experts_vs_dense"] > 0 and summary["one_expert_vs_dense"] > 0
    assert summary["experts_mkl_packed_vs_dense"] > 0 or not torch.backends.mkl.is_available()


@pytest.mark.slow
def test_memory_benchmark_measures_every_phase_of_every_rank(tmp_path):
    # one sharded layout (2 ranks; the 4-rank ones cost a minute on 2 cores, and their sharding is tested in
    # test_sharded.py): every phase measured on every rank is what this checks of the script
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--quick", "--layouts", "2 FSDP2",
                             "--work", str(tmp_path / "work"), "--json", str(tmp_path / "memory.json")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "memory.json").read_text())["results"]
    assert list(results) == ["2 FSDP2"]
    for name, layout in results.items():
        assert set(layout["phases"]) == {"build", "steps", "save", "resume", "save-2"}
        for phase in layout["phases"].values():
            assert len(phase["peak_rss"]) == layout["world"] and min(phase["peak_rss"]) > 50e6
        assert layout["checkpoint_bytes"] > 0 and layout["estimate"] > 0
    assert "peak RSS in GB" in result.stdout
