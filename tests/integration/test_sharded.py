"""Training at scale: the model built on the meta device and filled piece by piece on each rank, sharded checkpoints
(torch.distributed.checkpoint), resuming at another world size, the one-file format of earlier versions, atomicity
under SIGKILL, checksums, the OUT lock.

Multi-rank checks run as gloo processes on this CPU (torch.multiprocessing or torchrun), one thread each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import helpers
from helpers import (free_port, make_data_dir, read_metrics, run_train, save_dense, subprocess_env, tiny_config,
                     torchrun_train, train_one_process, write_config)
from upcycle.train import checkpoint as ckpt
from upcycle.convert.conversion import convert

STEPS = 6
ASSETS = Path(__file__).parents[1] / "assets"


# ---- each rank fills only its pieces, and they are exactly the weights one process would have ----------------------


# (name, init options, train overrides): online upcycling covers every method and option of upcycle convert
UPCYCLING_CASES = [
    ("drop-independent", {"method": "drop", "ratio": 0.5}, {}),
    ("drop-shared", {"method": "drop", "ratio": 0.5, "index_mode": "shared"}, {}),
    ("noise", {"method": "noise", "ratio": 0.5}, {}),
    ("naive", {"method": "naive"}, {}),
    ("scratch", {"method": "scratch"}, {}),
    ("granular-shared-partial", {"method": "drop", "ratio": 0.5, "num_experts": 6, "top_k": 3, "granularity": 4,
                                 "shared_expert": "dense", "moe_layers": "1", "format": "qwen2_moe"}, {}),
    ("router-data", {"method": "drop", "ratio": 0.5, "router_init": "data"}, {}),
    ("btx", {"method": "btx"}, {}),
    ("drop-expert-parallel", {"method": "drop", "ratio": 0.5}, {"expert_parallel": 2}),
]


def _fill_worker(rank: int, world_size: int, port: int, cases: list, out: str) -> None:
    """On each rank: build every case's model sharded, fill it from its start point, and compare each piece with the
    same box of the reference state (torch.equal), counting the bytes read from safetensors files."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import dataclasses

    from upcycle.formats import safetensors_io
    from upcycle.train.distributed import init_distributed, shutdown
    from upcycle.model.hf import load_model
    from upcycle.train.shards import model_pieces
    from upcycle.train.trainer import build_model, start_point
    from upcycle.train.config import config_from_dict

    read = {"bytes": 0}
    original_get = safetensors_io.CheckpointReader.get

    def counting_get(self, name, rows=None):
        tensor = original_get(self, name, rows)
        read["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    safetensors_io.CheckpointReader.get = counting_get
    world = init_distributed()
    results = {}
    for name, values, reference_dir, train in cases:
        config = config_from_dict(values)
        read["bytes"] = 0
        start = start_point(config, world, resume_model_config=None)
        loop = dataclasses.replace(config.train, precision="fp32", **train)
        _, bare = build_model(start.model_config, loop, world, start.fill)
        read_bytes = read["bytes"]
        reference = load_model(reference_dir).state_dict() if reference_dir else None
        if reference is None:  # from scratch: the model one process builds with the same seed
            from upcycle.model.transformer import Transformer

            torch.manual_seed(config.train.seed)
            reference = Transformer(start.model_config).state_dict()
        pieces = model_pieces(bare)
        mismatched = [key for key, piece in pieces.items()
                      if not torch.equal(piece.local, reference[key][piece.box].to(piece.local.dtype))]
        stored = sum(piece.local.numel() for piece in pieces.values())
        results[name] = {"mismatched": mismatched, "keys": sorted(pieces) == sorted(reference),
                         "stored": stored, "total": sum(t.numel() for t in reference.values()),
                         "read_bytes": read_bytes}
    Path(f"{out}.{rank}").write_text(json.dumps(results))
    shutdown(world)


def _spawn_fill(cases: list, out: Path, world_size: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_fill_worker, args=(world_size, free_port(), cases, str(out)), nprocs=world_size, join=True)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    dense_dir = save_dense(root / "dense", tied=False)
    helpers.write_tokenizer(dense_dir, eos=True)
    other = save_dense(root / "other", seed=1)
    calibration = root / "calibration.txt"
    calibration.write_text(" ".join(f"w{(7 * i) % 90}" for i in range(600)))
    return {"root": root, "dense": dense_dir, "other": other, "calibration": calibration}


@pytest.mark.slow
def test_online_upcycling_on_two_ranks_fills_exactly_what_convert_writes(dense, tmp_path):
    cases = []
    for name, options, train in UPCYCLING_CASES:
        options = {"num_experts": 4, "top_k": 2, "seed": 3, **options}
        if options.get("router_init") == "data":
            options["calibration"] = str(dense["calibration"])
        if options["method"] == "btx":
            options["btx_sources"] = [str(dense["other"])]
        expected = convert(dense["dense"], tmp_path / name, progress=False, dtype="float32", **options)
        init = {"source": str(dense["dense"]), **options}
        cases.append((name, {"init": init}, str(expected), train))
    for rank, results in enumerate(_spawn_fill(cases, tmp_path / "results")):
        for name, result in results.items():
            assert result["keys"], (rank, name)
            assert result["mismatched"] == [], (rank, name)
            assert result["stored"] < 0.6 * result["total"], (rank, name)  # about half each, not the whole model


@pytest.mark.slow
def test_from_scratch_and_from_a_checkpoint_each_rank_holds_and_reads_only_its_share(dense, tmp_path):
    moe = convert(dense["dense"], tmp_path / "moe", progress=False, method="drop", ratio=0.5, num_experts=4)
    checkpoint_bytes = sum(f.stat().st_size for f in moe.glob("*.safetensors"))
    model = {"vocab_size": 96, "dim": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_dim": 48,
             "num_experts": 4, "top_k": 2, "max_seq_len": 64}
    cases = [
        ("scratch", {"model": model, "train": {"seed": 5}}, None, {}),
        ("scratch-expert-parallel", {"model": model, "train": {"seed": 5}}, None, {"expert_parallel": 2}),
        # 3 experts per rank over 2 replicas on 4 ranks: FSDP splits them along dim, not along the experts
        ("scratch-expert-parallel-6", {"model": {**model, "num_experts": 6}, "train": {"seed": 5}}, None,
         {"expert_parallel": 2}),
        ("hf-moe", {"init": {"source": str(moe)}}, str(moe), {}),
        ("hf-moe-expert-parallel", {"init": {"source": str(moe)}}, str(moe), {"expert_parallel": 2}),
    ]
    for world_size in (2, 4):
        for rank, results in enumerate(_spawn_fill(cases, tmp_path / f"results{world_size}", world_size)):
            for name, result in results.items():
                assert result["keys"] and result["mismatched"] == [], (world_size, rank, name)
                if name == "hf-moe":  # its rows, its experts: about its share of the checkpoint, not all of it
                    assert result["read_bytes"] < (1.2 / world_size + 0.1) * checkpoint_bytes, (world_size, name)
                if name == "hf-moe-expert-parallel":  # whole experts of its group's half, split further in memory
                    assert result["read_bytes"] < 0.65 * checkpoint_bytes, (world_size, name)


def _roundtrip_worker(rank: int, world_size: int, port: int, root: str) -> None:
    """Save a sharded checkpoint under one expert-parallel layout and load it under another, on the same ranks: the
    weights and AdamW moments land where the reference (one process, same seed) has them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from upcycle.train.distributed import init_distributed, shutdown
    from upcycle.model.transformer import ModelConfig, Transformer
    from upcycle.train.shards import fill_from_scratch, model_pieces, piece_of
    from upcycle.train.trainer import build_model, build_optimizer
    from upcycle.train.config import OptimConfig, TrainLoopConfig

    world = init_distributed()
    results = {}
    for experts, save_degree, load_degree in ((4, 2, 1), (6, 2, 1), (6, 1, 2), (4, 1, 2)):
        config = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
                             num_experts=experts, top_k=2)

        def fill(model) -> None:
            torch.manual_seed(9)
            fill_from_scratch(model_pieces(model), model.init_plan(), std=0.02)

        def moments_of(optimizer, model):  # AdamW's moments, set from the weights: 2w and w * w
            for p, entries in optimizer.state.items():
                entries["exp_avg"].copy_(p.detach() * 2)
                entries["exp_avg_sq"].copy_(p.detach() ** 2)

        out = Path(root) / f"{experts}-{save_degree}-{load_degree}"
        model, _ = build_model(config, TrainLoopConfig(expert_parallel=save_degree, precision="fp32"), world, fill)
        optimizer = build_optimizer(model, OptimConfig())
        ckpt.init_optimizer_state(optimizer)
        moments_of(optimizer, model)
        saver = ckpt.Checkpointer(out, world, keep=1)
        saver.save(1, model=model, optimizer=optimizer, model_config={}, trainer_state={}, train_config={})
        model2, bare2 = build_model(config, TrainLoopConfig(expert_parallel=load_degree, precision="fp32"), world,
                                    None)
        optimizer2 = build_optimizer(model2, OptimConfig())
        ckpt.load_checkpoint(out / "step_00000001", model=model2, optimizer=optimizer2, world=world)
        torch.manual_seed(9)
        reference = Transformer(config).state_dict()
        views = ckpt.state_tensors(model2, optimizer2)
        bad = []
        for key, view in views.items():
            piece = piece_of(view)
            kind, name = key.split("/", 1)
            if kind == "model":
                expected = reference[name]
            elif name.endswith("/exp_avg"):
                expected = reference[name.rsplit("/", 1)[0]] * 2
            elif name.endswith("/exp_avg_sq"):
                expected = reference[name.rsplit("/", 1)[0]] ** 2
            else:
                continue
            if not torch.equal(piece.local, expected[piece.box]):
                bad.append(key)
        results[out.name] = bad
    Path(f"{root}/result.{rank}").write_text(json.dumps(results))
    shutdown(world)


@pytest.mark.slow
def test_checkpoints_of_every_expert_layout_load_into_any_other(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_roundtrip_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    for rank in range(4):
        results = json.loads((tmp_path / f"result.{rank}").read_text())
        assert results == {name: [] for name in results} and len(results) == 4, rank


# ---- sharded checkpoints: resume anywhere, atomic, checked -----------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 1-process reference run and a 4-rank FSDP run of the same config, checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("runs")
    data_dir = make_data_dir(root / "data")
    config = write_config(root / "c.yaml", tiny_config(data_dir, train={"max_steps": STEPS, "eval_every": 3,
                                                                        "micro_batch_size": 1},
                                                       checkpoint={"every": 3, "keep": 5}))
    train_one_process(config, root / "single")
    torchrun_train(config, root / "four", nproc=4)
    return {"config": config, "single": root / "single", "four": root / "four", "root": root, "data": data_dir}


def assert_same_training(got: Path, expected: Path, steps: range, rel: float = 1e-5) -> None:
    helpers.assert_same_training(got, expected, steps, total_steps=STEPS, rel=rel)


def _rewind(source: Path, target: Path) -> Path:
    """A copy of run `source` as it was after step 3 (its last checkpoint and metrics deleted)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / ckpt.step_dir_name(STEPS))
    return target


@pytest.mark.slow
def test_four_ranks_train_like_one_process_and_their_checkpoint_resumes_on_two_and_on_one(runs, tmp_path):
    assert_same_training(runs["four"], runs["single"], range(1, STEPS + 1))
    # the running hash of the tokens consumed does not depend on how many ranks read them
    assert [r["data_sha256"] for r in read_metrics(runs["four"])] == \
        [r["data_sha256"] for r in read_metrics(runs["single"])]
    out = _rewind(runs["four"], tmp_path / "to-two")
    assert "written by 4 rank(s)" in torchrun_train(runs["config"], out, nproc=2)
    assert_same_training(out, runs["single"], range(4, STEPS + 1))
    out = _rewind(runs["four"], tmp_path / "to-one")
    train_one_process(runs["config"], out)
    assert_same_training(out, runs["single"], range(4, STEPS + 1))
    out = _rewind(runs["single"], tmp_path / "to-four")
    torchrun_train(runs["config"], out, nproc=4)
    assert_same_training(out, runs["single"], range(4, STEPS + 1))


@pytest.mark.slow
def test_hsdp_over_two_groups_of_two_trains_like_one_process_and_resumes_on_one(runs, tmp_path):
    out = tmp_path / "hsdp"
    torchrun_train(runs["config"], out, "--train.data_parallel_replicate", "2", nproc=4)
    assert_same_training(out, runs["single"], range(1, STEPS + 1))
    final = out / "checkpoints" / ckpt.step_dir_name(STEPS)
    # each weight is stored once: the two replicas' identical shards are written by one of them
    sizes = sum(f.stat().st_size for f in (final / ckpt.STATE_DIR).glob("*.safetensors"))
    single = runs["four"] / "checkpoints" / ckpt.step_dir_name(STEPS) / ckpt.STATE_DIR
    assert sizes == pytest.approx(sum(f.stat().st_size for f in single.glob("*.safetensors")), rel=0.05)
    resumed = _rewind(out, tmp_path / "hsdp-to-one")
    train_one_process(runs["config"], resumed)
    assert_same_training(resumed, runs["single"], range(4, STEPS + 1))


@pytest.mark.slow
def test_each_of_four_ranks_writes_a_quarter_of_the_state_and_no_rank_gathers(runs):
    final = runs["four"] / "checkpoints" / ckpt.step_dir_name(STEPS)
    files = sorted((final / ckpt.STATE_DIR).glob("*.safetensors"))
    assert len(files) == 4
    sizes = [f.stat().st_size for f in files]
    assert max(sizes) < 0.3 * sum(sizes)  # about a quarter each (plus the few replicated scalars)
    assert set(json.loads((final / ckpt.CHECKSUMS).read_text())) == {f.name for f in files}


@pytest.mark.slow
def test_resuming_in_the_same_world_is_bit_exact(runs, tmp_path):
    out = _rewind(runs["single"], tmp_path / "again")
    train_one_process(runs["config"], out)
    timing = ("tokens_per_s", "step_time_s")

    def numbers(run: Path) -> list[dict]:
        return [{k: v for k, v in record.items() if k not in timing} for record in read_metrics(run)]

    assert numbers(out) == numbers(runs["single"])  # every logged number, the running data hash included


@pytest.mark.slow
def test_async_checkpoints_equal_synchronous_ones(runs, tmp_path):
    out = tmp_path / "async"
    torchrun_train(runs["config"], out, "--checkpoint.async_save", "true", nproc=4)
    assert_same_training(out, runs["single"], range(1, STEPS + 1))
    for step in (3, STEPS):
        name = ckpt.step_dir_name(step)
        got = ckpt.CheckpointTensors(out / "checkpoints" / name)
        expected = ckpt.CheckpointTensors(runs["four"] / "checkpoints" / name)
        assert all(torch.equal(got[key], expected[key]) for key in expected)
        ckpt.verify_checkpoint(out / "checkpoints" / name)
    # and it resumes like any other
    out2 = _rewind(out, tmp_path / "async-resumed")
    torchrun_train(runs["config"], out2, "--checkpoint.async_save", "true", nproc=2)
    assert_same_training(out2, runs["single"], range(4, STEPS + 1))


_KILL_DURING_SAVE = """
import os, signal, sys
from upcycle.train import checkpoint
calls = {"n": 0}
die_at = int(sys.argv[1])
original = checkpoint.save_tensors
def write_then_die(path, tensors, metadata):
    calls["n"] += 1
    digest = original(path, tensors, metadata)
    if calls["n"] == die_at:  # the state file of this save is written, nothing is published yet
        os.kill(os.getpid(), signal.SIGKILL)
    return digest
checkpoint.save_tensors = write_then_die
from upcycle.cli import main
sys.argv = ["upcycle", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", ["false", "true"])
def test_sigkill_while_saving_leaves_the_previous_checkpoint_and_the_rerun_matches(runs, tmp_path, asynchronous):
    out = tmp_path / "killed"
    command = [sys.executable, "-c", _KILL_DURING_SAVE, "2", "train", "--config", str(runs["config"]), "--out",
               str(out), "--checkpoint.async_save", asynchronous]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    root = out / "checkpoints"
    assert [path.name for _, path in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(3)]
    assert (root / f".tmp-{ckpt.step_dir_name(STEPS)}").is_dir()  # the half-written one, never taken for a checkpoint
    ckpt.verify_checkpoint(root / ckpt.step_dir_name(3))
    result = run_train(runs["config"], out, "--checkpoint.async_save", asynchronous)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stderr and ckpt.step_dir_name(3) in result.stderr
    assert not list(root.glob(".tmp-*"))
    assert_same_training(out, runs["single"], range(1, STEPS + 1))


@pytest.mark.slow
def test_a_state_file_swapped_in_from_another_run_is_named_and_skipped(runs, tmp_path):
    out = shutil.copytree(runs["four"], tmp_path / "swapped")
    other = tmp_path / "other"
    torchrun_train(runs["config"], other, "--train.seed", "1", nproc=4)  # same shapes, other weights
    newest, victim = ckpt.step_dir_name(STEPS), "shard-00002-model-00001-of-00001.safetensors"
    shutil.copy(other / "checkpoints" / newest / ckpt.STATE_DIR / victim,
                out / "checkpoints" / newest / ckpt.STATE_DIR / victim)
    result = run_train(runs["config"], out, "--train.max_steps", str(STEPS + 1))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cannot resume from {newest}" in result.stderr and "does not match its sha256" in result.stderr
    assert f"resuming from {out / 'checkpoints' / ckpt.step_dir_name(3)}" in result.stderr


# ---- the one-file format of upcycle <= 0.1 ---------------------------------------------------------------------------


def test_a_checkpoint_of_the_one_file_format_resumes_where_its_run_left_off(tmp_path):
    # tests/assets/one_file_checkpoint: step 3 of the run below, written by upcycle 0.1 (commit cfc4824), and that
    # run's metrics through step 6
    asset = ASSETS / "one_file_checkpoint"
    data_dir = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 6, "eval_every": 3},
                                                          checkpoint={"every": 3, "keep": 2}))
    out = tmp_path / "run"
    shutil.copytree(asset / "step_00000003", out / "checkpoints" / "step_00000003")
    from upcycle.train.config import config_to_dict, load_config

    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(load_config(config)), sort_keys=False))
    train_one_process(config, out)
    old = [json.loads(line) for line in (asset / "metrics.jsonl").read_text().splitlines()]
    new = {record["step"]: record for record in read_metrics(out)}
    for record in old[3:]:
        for key in ("loss", "ce", "aux", "grad_norm", "lr"):
            assert new[record["step"]][key] == pytest.approx(record[key], rel=1e-6), (record["step"], key)
    assert ckpt.checkpoint_format(out / "checkpoints" / "step_00000006") == ckpt.SHARDED


def _as_one_file(sharded: Path, target: Path) -> Path:
    """The same checkpoint in the one-file layout (what upcycle 0.1 wrote), for comparing the two readers."""
    shutil.copytree(sharded, target, ignore=shutil.ignore_patterns(ckpt.STATE_DIR, ckpt.CHECKSUMS))
    tensors = ckpt.CheckpointTensors(sharded)
    save_file({key: tensors[key].contiguous() for key in tensors}, str(target / ckpt.ONE_FILE_WEIGHTS))
    save_file({"state/placeholder/step": torch.zeros(())}, str(target / ckpt.ONE_FILE_OPTIMIZER))
    return target


@pytest.mark.slow
def test_export_of_a_sharded_checkpoint_equals_the_export_of_the_one_file_format(runs, tmp_path):
    from safetensors.torch import load_file

    sharded = runs["four"] / "checkpoints" / ckpt.step_dir_name(STEPS)
    one_file = _as_one_file(sharded, tmp_path / "one-file")
    exported = {}
    for name, path in (("sharded", sharded), ("one-file", one_file)):
        target = tmp_path / f"export-{name}"
        result = subprocess.run([sys.executable, "-m", "upcycle", "export", str(path), str(target),
                                 "--max-shard-size", "40KB"], env=subprocess_env(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        exported[name] = {f.name: load_file(f) for f in sorted(target.glob("*.safetensors"))}
        assert (target / "model.safetensors.index.json").is_file()  # sharded, with an index
    assert exported["sharded"].keys() == exported["one-file"].keys() and len(exported["sharded"]) > 1
    for file, tensors in exported["one-file"].items():
        assert exported["sharded"][file].keys() == tensors.keys()
        assert all(torch.equal(exported["sharded"][file][key], tensor) for key, tensor in tensors.items())


# ---- refusals: one line, exit 2, nothing written ---------------------------------------------------------------------


def test_a_directory_of_no_known_checkpoint_format_is_refused_in_one_line(tmp_path):
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"format": "upcycle", "model": {"vocab_size": 8}}))
    result = subprocess.run([sys.executable, "-m", "upcycle", "export", str(weird), str(tmp_path / "out")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("upcycle: error: ")
    assert "not a training checkpoint of a known format" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_second_trainer_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    import fcntl

    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data")))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        result = run_train(config, out)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "is in use by another `upcycle train` (pid 4242); wait for it to end or stop it, or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_resuming_on_data_prepared_again_in_place_is_refused(tmp_path):
    data_dir = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 2}))
    assert run_train(config, tmp_path / "out").returncode == 0
    make_data_dir(data_dir, seed=1)  # other text, same names and sizes
    result = run_train(config, tmp_path / "out", "--train.max_steps", "4")
    assert result.returncode == 2
    assert "changed since" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_workers_stop_when_their_launcher_is_killed(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data"),
                                                          train={"max_steps": 100000, "eval_every": 0},
                                                          checkpoint={"every": 0}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "upcycle",
               "train", "--config", str(config), "--out", str(out)]
    launcher = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.2)
    workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(workers) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their launcher"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (OSError, IndexError):
        return "zombie"


def test_a_truncated_rng_file_makes_resume_fall_back_in_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data"), train={"eval_every": 0}))
    out = tmp_path / "run"
    assert run_train(config, out).returncode == 0
    rng = out / "checkpoints" / "step_00000008" / "rng_rank0.json"
    rng.write_text(rng.read_text()[:100])
    result = run_train(config, out, "--train.max_steps", "9")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cannot resume from step_00000008: {rng} is truncated or not JSON" in result.stderr
    assert "(step 4," in result.stderr


def test_export_of_a_checkpoint_whose_config_json_is_broken_or_another_models_is_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data"),
                                                          train={"max_steps": 1, "eval_every": 0}))
    assert run_train(config, tmp_path / "run").returncode == 0
    checkpoint = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    record = json.loads((checkpoint / "config.json").read_text())
    for name, text, expected in (
            ("other", json.dumps({**record, "model": {**record["model"], "dim": 64, "head_dim": 16}}),
             "config.json implies"),
            ("truncated", (checkpoint / "config.json").read_text()[:40], "is not valid JSON")):
        broken = shutil.copytree(checkpoint, tmp_path / name)
        (broken / "config.json").write_text(text)
        result = subprocess.run([sys.executable, "-m", "upcycle", "export", str(broken), str(tmp_path / f"hf-{name}")],
                                env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr and not (tmp_path / f"hf-{name}").exists()


@pytest.mark.slow
def test_a_frozen_rank_makes_the_others_fail_after_the_collective_timeout(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data"),
                                                          train={"max_steps": 100000, "eval_every": 0,
                                                                 "collective_timeout_s": 5},
                                                          checkpoint={"every": 0}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "upcycle",
               "train", "--config", str(config), "--out", str(out)]
    launcher = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.2)
    workers = sorted(int(pid) for pid in
                     Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split())
    os.kill(workers[1], signal.SIGSTOP)  # rank 1 freezes; rank 0 waits for it in the next collective
    frozen_at = time.monotonic()

    def gone(pid: int) -> bool:  # exited: no process, or a zombie its launcher has not reaped yet
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    try:
        while not gone(workers[0]) and time.monotonic() - frozen_at < 90:
            time.sleep(0.2)
        rank0_failed_after = time.monotonic() - frozen_at
        # torchrun would wait ~30 s for the frozen rank to honour SIGTERM; kill it so the test does not
        os.kill(workers[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert rank0_failed_after < 60  # the 5 s timeout and start-up of the failure, not gloo's 30 minutes
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-2000:]


def test_check_eval_and_analyze_read_a_sharded_training_checkpoint(dense, tmp_path):
    from upcycle.convert.check import check
    from upcycle.model.hf import load_model

    data_dir = make_data_dir(tmp_path / "data")
    config = tiny_config(data_dir, model=None, init={"source": str(dense["dense"]), "method": "naive",
                                                      "num_experts": 4}, train={"max_steps": 1, "eval_every": 0},
                         optim={"lr": 1e-9, "min_lr": 1e-9})
    config["data"]["seq_len"] = 16
    out = tmp_path / "run"
    train_one_process(write_config(tmp_path / "c.yaml", config), out)
    checkpoint = ckpt.latest_checkpoint(out / "checkpoints")
    assert ckpt.checkpoint_format(checkpoint) == ckpt.SHARDED
    report = check(str(checkpoint), str(dense["dense"]))  # exported on the fly, then loaded by transformers
    assert report.max_abs_logit_diff < 1e-3  # naive upcycling after one step at a learning rate of 1e-9
    model = load_model(checkpoint)
    assert model.config.num_experts == 4
    for command in (["eval", str(checkpoint), "--data", str(data_dir), "--seq-len", "32"],
                    ["analyze", str(checkpoint), "--data", str(data_dir), "--seq-len", "32", "--out",
                     str(tmp_path / "analysis")]):
        result = subprocess.run([sys.executable, "-m", "upcycle", *command], env=subprocess_env(),
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),  # what build_optimizer makes
    lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=False),
    lambda params: torch.optim.AdamW(params, lr=1e-3, amsgrad=True, fused=True),
    lambda params: torch.optim.Adam(params, lr=1e-3),
    lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),  # not Adam: the zero step
])
def test_optimizer_state_is_created_as_the_first_step_creates_it_without_changing_a_parameter(make):
    """init_optimizer_state builds Adam's state directly (no step over every parameter); what it builds must be what
    torch's own first step builds (names, dtypes, devices, shapes), so that a checkpoint loads into it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4, bias=False))
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    direct = make(model.parameters())
    ckpt.init_optimizer_state(direct)
    stepped = make(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    for group in stepped.param_groups:
        group["lr"] = 0.0
    stepped.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(direct.state) == set(stepped.state) == {p for p in model.parameters() if p.requires_grad}
    for p, state in stepped.state.items():
        assert direct.state[p].keys() == state.keys()
        for name, tensor in state.items():
            made = direct.state[p][name]
            assert (made.dtype, made.device, made.shape) == (tensor.dtype, tensor.device, tensor.shape), name
            if name != "step":
                assert not made.any()
