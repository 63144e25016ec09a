"""benchmarks/gpu_check.py as a smoke test on CPU with tiny shapes (the real run needs a CUDA GPU): every part runs,
every kernel passes its correctness check, and the last line is the JSON summary with every figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


def test_tiny_cpu_run_reports_every_part():
    result = run_check("--device", "cpu", "--tiny", "--no-compile")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["errors"] == {}
    assert summary["torch"] == torch.__version__ and "cuda" in summary
    cases = summary["correctness"]["cases"]
    impls = {key.split("/")[1] for key in cases}
    assert impls == {"auto", "fused", "grouped_mm", "loop"}
    assert {key.split("/")[0] for key in cases} == {"fp32", "bf16_weights", "fp32_weights_bf16_autocast"}
    assert all(case["ok"] for case in cases.values())
    layer = summary["layer"]
    assert {"dense", "ours_fused", "ours_grouped_mm", "experts_only_fused", "hf_grouped_mm"} <= set(layer["ms"])
    assert all(ms > 0 for ms in layer["ms"].values())
    train = summary["train"]
    assert train["steps_timed"] == 2 and train["tokens_per_s"] > 0 and train["flops_per_token"] > 0
    assert train["mfu"] is None  # no peak is known for a CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_missing_cuda_is_reported_clearly():
    result = run_check()
    assert result.returncode == 2
    assert "CUDA is not available" in result.stdout and torch.__version__ in result.stdout
    assert "CUDA is not available" in json.loads(result.stdout.strip().splitlines()[-1])["errors"]["setup"]


CUDA_PATH_SCRIPT = REPO / "benchmarks" / "cuda_path_check.py"


@pytest.mark.slow
def test_the_cuda_path_proof_runs_every_part_on_cpu(tmp_path):
    """benchmarks/cuda_path_check.py's CPU subset: a one-rank process group through every multi-rank code path
    (FSDP2, host group, checkpoint collectives, async staging, resume, expert parallelism at degree 1)."""
    result = subprocess.run([sys.executable, str(CUDA_PATH_SCRIPT), "--device", "cpu", "--tiny", "--work",
                             str(tmp_path / "work")], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["errors"] == {}
    probes = summary["probes"]
    assert probes["b1_verify_checksums"] == "ok" and probes["b3_unsharded_grads_held"] == 0
    assert probes["b4_auto_fp32"] == "fused" and probes["b4_compiled_fp32_layer"] == "ok"
    train = summary["train"]
    assert train["steps"] == 6 and train["checkpoints"] == ["step_00000003", "step_00000006"]
    assert train["loss"][-1] < train["loss"][0]
    assert summary["resume"]["data_sha256_equal"] and summary["resume"]["max_abs_loss_diff"] == 0.0  # CPU: exact
    assert summary["expert_parallel"]["max_abs_logit_diff"] == 0.0
    assert summary["compiled"]["compiled_blocks"] is True
