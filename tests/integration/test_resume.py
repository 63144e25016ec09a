"""Exact resume: a run SIGKILLed mid-training and restarted with the same command logs the same per-step losses, bit
for bit, as a run that was never interrupted (CPU, fp32, same thread count)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (make_data_dir, read_metrics, run_train, subprocess_env, tiny_config,
                           train_cli, write_config)
from upcycle.train import checkpoint as ckpt

STEPS = 40


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    data_dir = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data_dir, train={"max_steps": STEPS, "eval_every": 10}, checkpoint={"every": 5, "keep": 2}))

    reference = run_train(config, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "interrupted"
    process = subprocess.Popen(train_cli(config, out), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        logged = _wait_for(lambda: _logged_steps(out) >= 13 and ckpt.latest_checkpoint(out / "checkpoints"),
                           process)
        process.send_signal(signal.SIGKILL)  # no handler runs: whatever was not in a checkpoint is lost
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL
    killed_at = _logged_steps(out)
    assert logged and killed_at < STEPS, "the run finished before it could be killed; the test proves nothing"
    resumed_from = ckpt.list_checkpoints(out / "checkpoints")[-1][0]
    assert 5 <= resumed_from <= killed_at and resumed_from % 5 == 0

    resumed = run_train(config, out)
    assert resumed.returncode == 0, resumed.stderr
    # It really continued from the checkpoint (a restart from scratch would also reproduce the losses).
    assert f"step_{resumed_from:08d} (step {resumed_from}," in resumed.stderr

    expected, got = read_metrics(tmp_path / "reference"), read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "aux", "grad_norm", "lr", "data_sha256"):
        assert [r[key] for r in got] == [r[key] for r in expected], key  # exact equality, not approx
    assert [r["val"] for r in got if "val" in r] == [r["val"] for r in expected if "val" in r]
    assert [r["expert_load"] for r in got] == [r["expert_load"] for r in expected]


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


def _wait_for(condition, process: subprocess.Popen, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("trainer did not reach the kill point in time")
