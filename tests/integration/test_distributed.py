"""Data parallelism on CPU with torchrun + gloo: 2 ranks train exactly like 1 process with the same global batch, and
checkpoints move freely between world sizes (they hold full, unsharded tensors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import (assert_same_training, make_data_dir, tiny_config, torchrun_train, train_one_process,
                     write_config)
from upcycle.train import checkpoint as ckpt
from upcycle.train.trainer import run_training
from upcycle.train.config import load_config

pytestmark = pytest.mark.slow
STEPS = 8
REL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One 1-process reference run and one 2-rank FSDP2 run of the same config (checkpoints at steps 4 and 8)."""
    root = tmp_path_factory.mktemp("dist")
    data_dir = make_data_dir(root / "data")
    config = write_config(root / "c.yaml", tiny_config(data_dir, train={"max_steps": STEPS},
                                                       checkpoint={"every": 4, "keep": 5}))
    train_one_process(config, root / "single")
    torchrun_train(config, root / "fsdp")
    return {"config": config, "single": root / "single", "fsdp": root / "fsdp", "root": root}


def assert_close_runs(got: Path, expected: Path, steps: range) -> None:
    assert_same_training(got, expected, steps, total_steps=STEPS, rel=REL)


def test_fsdp_two_ranks_match_one_process(runs):
    assert_close_runs(runs["fsdp"], runs["single"], range(1, STEPS + 1))
    assert [step for step, _ in ckpt.list_checkpoints(runs["fsdp"] / "checkpoints")] == [4, 8]
    assert not (runs["fsdp"] / "checkpoints" / "step_00000008" / "rng_rank2.json").exists()
    assert (runs["fsdp"] / "checkpoints" / "step_00000008" / "rng_rank1.json").is_file()


def test_ddp_two_ranks_match_one_process_and_write_portable_checkpoints(runs, tmp_path):
    out = runs["root"] / "ddp"
    torchrun_train(runs["config"], out, "--train.parallel", "ddp")
    assert_close_runs(out, runs["single"], range(1, STEPS + 1))
    # DDP's wrapper prefixes every parameter with "module."; checkpoints carry the bare names, so a DDP checkpoint
    # resumes on one process (and exports, evaluates, resumes under FSDP) like any other
    step_8 = out / "checkpoints" / "step_00000008"
    assert set(ckpt.CheckpointTensors(step_8)) == set(ckpt.CheckpointTensors(runs["single"] / "checkpoints" /
                                                                           "step_00000008"))
    resumed = _rewind_to_step_4(out, tmp_path / "ddp-resume")
    run_training(load_config(runs["config"]), resumed)
    assert_close_runs(resumed, runs["single"], range(5, STEPS + 1))


def _rewind_to_step_4(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step_00000008")
    return target


def test_two_rank_checkpoint_resumes_on_one_process(runs, tmp_path, capsys):
    out = _rewind_to_step_4(runs["fsdp"], tmp_path / "resume")
    run_training(load_config(runs["config"]), out)
    assert "step_00000004 (step 4, written by 2 rank(s))" in capsys.readouterr().err
    assert_close_runs(out, runs["single"], range(5, STEPS + 1))


def test_one_process_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    out = _rewind_to_step_4(runs["single"], tmp_path / "resume")
    assert "step_00000004 (step 4, written by 1 rank(s))" in torchrun_train(runs["config"], out)
    assert_close_runs(out, runs["single"], range(5, STEPS + 1))
