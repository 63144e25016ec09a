"""Expert parallelism (train.expert_parallel): experts sharded over ranks, tokens exchanged by all-to-all.

The layer test spawns gloo ranks in-process; the training tests launch `torchrun -m upcycle train` as a user would and
compare with one process: the same losses, the same checkpoint format, resumable across expert-parallel degrees.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import helpers
from helpers import (REPO, free_port, make_data_dir, run_train, subprocess_env, tiny_config, torchrun_train,
                     train_one_process, write_config)
from upcycle.train import checkpoint as ckpt
from upcycle.errors import UpcycleError
from upcycle.train.expert_parallel import check_degree, regroup_order
from upcycle.train.trainer import run_training
from upcycle.train.config import TrainLoopConfig, load_config

STEPS = 6
REL = 1e-5  # the issue asks for 1e-4; fp32 all-to-all exchanges rows exactly, so the runs agree far closer


# ---- pure parts and refusals ----------------------------------------------------------------------------------------


def test_regroup_order_takes_source_blocks_to_expert_blocks():
    # rows from rank 0: 2 for local expert 0, 1 for expert 1; from rank 1: 0 for expert 0, 3 for expert 1
    counts_NL = torch.tensor([[2, 1], [0, 3]])
    # received order: [r0e0, r0e0, r0e1, r1e1, r1e1, r1e1] -> expert 0's rows, then expert 1's, source order kept
    assert regroup_order(counts_NL).tolist() == [0, 1, 2, 3, 4, 5]
    counts_NL = torch.tensor([[1, 2], [2, 1]])
    # received: [r0e0, r0e1, r0e1, r1e0, r1e0, r1e1] -> e0: 0, 3, 4; e1: 1, 2, 5
    assert regroup_order(counts_NL).tolist() == [0, 3, 4, 1, 2, 5]


@pytest.mark.parametrize("degree, world, experts, fix", [
    (2, 2, 0, "dense"),
    (2, 3, 4, "must divide the number of ranks"),
    (4, 4, 6, "must divide the model's 6 experts"),
])
def test_degrees_that_cannot_shard_are_refused(degree, world, experts, fix):
    with pytest.raises(UpcycleError, match=fix):
        check_degree(degree, world_size=world, num_experts=experts)
    check_degree(1, world_size=world, num_experts=experts)  # off: always fine


@pytest.mark.parametrize("fields, fix", [
    ({"expert_parallel": 0}, "must be >= 1"),
    ({"expert_parallel": 2, "parallel": "ddp"}, "needs train.parallel: fsdp"),
])
def test_config_refuses_bad_expert_parallel(fields, fix):
    with pytest.raises(UpcycleError, match=fix):
        TrainLoopConfig(**fields).validate()


def test_single_process_with_expert_parallel_is_one_line_and_writes_nothing(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data")))
    result = run_train(config, tmp_path / "out", "--train.expert_parallel", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "launch with torchrun --nproc_per_node a multiple of 2, or lower train.expert_parallel")
    assert not (tmp_path / "out").exists()


# ---- the layer: 2 gloo ranks against the full layer in one process -------------------------------------------------


def _layer_worker(rank: int, world_size: int, port: int, out: str, top_k: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from upcycle.train.distributed import init_distributed, shutdown
    from upcycle.train.expert_parallel import shard_experts
    from upcycle.model.moe import MoE

    world = init_distributed()

    def layer() -> MoE:
        torch.manual_seed(0)
        moe = MoE(16, 24, num_experts=4, top_k=top_k)
        moe.init_weights(0.3)
        return moe

    tokens = 6  # per rank: with top-1 some experts get no row from a rank
    x_TD = torch.randn(world_size * tokens, 16, generator=torch.Generator().manual_seed(1))
    g_TD = torch.randn(world_size * tokens, 16, generator=torch.Generator().manual_seed(2))
    full = layer()
    x_ref = x_TD.clone().requires_grad_()
    out_ref = full(x_ref).out_TD
    (out_ref * g_TD).sum().backward()

    sharded = layer()
    shard = shard_experts(sharded, world_size, world).shard
    rows = slice(rank * tokens, (rank + 1) * tokens)
    x = x_TD[rows].clone().requires_grad_()
    result = sharded(x)
    (result.out_TD * g_TD[rows]).sum().backward()
    router_grad = sharded.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # each rank holds its rows' share of the router gradient
    local = shard.local_slice
    diffs = {
        "out": (result.out_TD - out_ref[rows]).abs().max().item(),
        "grad_x": (x.grad - x_ref.grad[rows]).abs().max().item(),
        "grad_router": (router_grad - full.router.weight.grad).abs().max().item(),
        "grad_gate_up": (sharded.gate_up_ED2F.grad - full.gate_up_ED2F.grad[local]).abs().max().item(),
        "grad_down": (sharded.down_EFD.grad - full.down_EFD.grad[local]).abs().max().item(),
        "local_experts": sharded.gate_up_ED2F.shape[0],
        "counts_match": bool(torch.equal(result.counts_E, torch.bincount(
            torch.topk(full.router(x_TD[rows]), top_k).indices.reshape(-1), minlength=4))),
    }
    Path(f"{out}.{rank}").write_text(json.dumps(diffs))
    shutdown(world)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sharded_layer_matches_the_full_layer(tmp_path, top_k):
    import torch.multiprocessing as mp

    mp.spawn(_layer_worker, args=(2, free_port(), str(tmp_path / "diffs"), top_k), nprocs=2, join=True)
    for rank in range(2):
        diffs = json.loads((tmp_path / f"diffs.{rank}").read_text())
        assert diffs.pop("local_experts") == 2
        assert diffs.pop("counts_match")
        for name, value in diffs.items():
            assert value < 1e-5, (rank, name, value)


# ---- training with torchrun ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 1-process reference run and a 2-rank expert-parallel run (4 experts, 2 per rank), checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("ep")
    data_dir = make_data_dir(root / "data")
    config = write_config(root / "c.yaml", tiny_config(data_dir, train={"max_steps": STEPS, "eval_every": 3},
                                                       checkpoint={"every": 3, "keep": 5}))
    train_one_process(config, root / "single")
    torchrun_train(config, root / "ep2", "--train.expert_parallel", "2")
    return {"config": config, "single": root / "single", "ep2": root / "ep2", "root": root}


def assert_same_training(got: Path, expected: Path, steps: range, rel: float = REL, same_routing: bool = True) -> None:
    helpers.assert_same_training(got, expected, steps, total_steps=STEPS, rel=rel, same_routing=same_routing)


@pytest.mark.slow
def test_two_ranks_with_two_way_expert_parallelism_train_like_one_process(runs):
    assert_same_training(runs["ep2"], runs["single"], range(1, STEPS + 1))


@pytest.mark.slow
def test_expert_parallel_checkpoints_hold_the_full_tensors_each_rank_writing_its_own_experts(runs):
    step = ckpt.step_dir_name(STEPS)
    single, ep2 = runs["single"] / "checkpoints" / step, runs["ep2"] / "checkpoints" / step
    expected, got = ckpt.CheckpointTensors(single), ckpt.CheckpointTensors(ep2)
    assert list(got) == list(expected)
    for key in expected:
        assert got.shape(key) == expected.shape(key), key  # full expert tensors, not one rank's shard
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    assert json.loads((ep2 / ckpt.OPTIMIZER_META).read_text()) == json.loads((single / ckpt.OPTIMIZER_META).read_text())
    # no gather: each rank's file holds its 2 of the 4 experts (weights and both AdamW moments), nobody all 4
    files = sorted((ep2 / ckpt.STATE_DIR).glob("*.safetensors"))
    assert len(files) == 2
    for file in files:
        with safe_open(str(file), "pt") as f:
            stacks = [key for key in f.keys() if "gate_up_ED2F" in key and not key.endswith("/step")]
            assert len(stacks) == 2 * 3  # 2 MoE layers: weights, exp_avg, exp_avg_sq
            assert all(f.get_slice(key).get_shape()[0] == 2 for key in stacks)


def _rewind(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / ckpt.step_dir_name(STEPS))
    return target


@pytest.mark.slow
def test_expert_parallel_checkpoint_resumes_on_one_process_and_back(runs, tmp_path, capsys):
    out = _rewind(runs["ep2"], tmp_path / "to-one")
    run_training(load_config(runs["config"]), out)
    assert "step_00000003 (step 3, written by 2 rank(s))" in capsys.readouterr().err
    assert_same_training(out, runs["single"], range(4, STEPS + 1))

    out = _rewind(runs["single"], tmp_path / "to-ep2")
    assert "written by 1 rank(s)" in torchrun_train(runs["config"], out, "--train.expert_parallel", "2")
    assert_same_training(out, runs["single"], range(4, STEPS + 1))


@pytest.mark.slow
def test_four_ranks_two_expert_groups_shard_experts_over_replicas_and_sum_their_gradients(runs, tmp_path):
    # 4 ranks, degree 2: two groups hold the same experts, so expert gradients are also summed across the groups
    # (FSDP sums them), and each rank stores a quarter of the expert weights: its 2 experts, sharded over 2 replicas
    out = tmp_path / "ep2x2"
    log = torchrun_train(runs["config"], out, "--train.expert_parallel", "2", nproc=4)
    assert "2 group(s) of 2 ranks, 2 of 4 experts per rank" in log
    assert "stores 9,216 of 36,864 expert weights (1/4)" in log
    assert_same_training(out, runs["single"], range(1, STEPS + 1))


@pytest.mark.slow
def test_expert_parallel_in_bf16_with_activation_checkpointing_follows_one_process(runs, tmp_path):
    bf16 = ("--train.precision", "bf16")
    reference = tmp_path / "single-bf16"
    torchrun_train(runs["config"], reference, *bf16, nproc=1)
    ep2 = ("--train.expert_parallel", "2", "--train.activation_checkpointing", "true")
    # 2 ranks: one replica, plain expert parameters under autocast, compiled blocks
    out = tmp_path / "ep2-bf16"
    torchrun_train(runs["config"], out, *bf16, *ep2, "--train.compile", "true")
    assert_same_training(out, reference, range(1, STEPS + 1), rel=2e-3, same_routing=False)  # bf16 rounding
    # 4 ranks: experts sharded over 2 replicas under FSDP's bf16 policy
    out = tmp_path / "ep2x2-bf16"
    torchrun_train(runs["config"], out, *bf16, *ep2, nproc=4)
    assert_same_training(out, reference, range(1, STEPS + 1), rel=2e-3, same_routing=False)


@pytest.mark.slow
def test_export_of_an_expert_parallel_checkpoint_equals_the_one_process_export(runs, tmp_path):
    step = ckpt.step_dir_name(STEPS)
    exported = {}
    for name in ("single", "ep2"):
        result = subprocess.run([sys.executable, "-m", "upcycle", "export", str(runs[name] / "checkpoints" / step),
                                 str(tmp_path / name)], env=subprocess_env(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        exported[name] = {f.name: load_file(f) for f in sorted((tmp_path / name).glob("*.safetensors"))}
    assert exported["ep2"].keys() == exported["single"].keys()
    for file, tensors in exported["single"].items():
        assert exported["ep2"][file].keys() == tensors.keys()
        for key, tensor in tensors.items():
            torch.testing.assert_close(exported["ep2"][file][key], tensor, rtol=1e-4, atol=1e-6)


def multi_node_command(config: Path, out: Path, port: int) -> list[str]:
    """docs/training.md's multi-node launch, scaled to this machine: NODE0_HOST -> 127.0.0.1, one rank per node,
    expert parallel over the 2 "nodes", the test's config and output directory."""
    from test_documented_commands import documented_train_commands

    [(_, command)] = documented_train_commands(multi_node=True)
    words = shlex.split(command)
    replace = {"CFG": str(config), "--nproc_per_node=8": "--nproc_per_node=1",
               "--rdzv_endpoint=NODE0_HOST:29500": f"--rdzv_endpoint=127.0.0.1:{port}"}
    words = [replace.get(w, w) for w in words]
    assert words != shlex.split(command) and "--nnodes=2" in words
    words[words.index("--out") + 1] = str(out)
    words[words.index("--train.expert_parallel") + 1] = "2"
    return [sys.executable, "-m", "torch.distributed.run", *words[1:]]


@pytest.mark.slow
def test_the_documented_multi_node_launch_trains_expert_parallel(runs, tmp_path):
    # two single-rank "nodes" on this machine meeting through the c10d rendezvous, as the docs launch them
    out = tmp_path / "nodes"
    command = multi_node_command(runs["config"], out, free_port())
    nodes = [subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert_same_training(out, runs["single"], range(1, STEPS + 1))


@pytest.mark.slow
def test_benchmark_runs_and_reports_the_exchange(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "expert_parallel.py"), "--quick", "--shapes",
                             "tiny"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tiny"]["ep1"]["all_to_all_s"] == 0  # no exchange without expert parallelism
    assert 0 < figures["tiny"]["ep2"]["all_to_all_share"] < 1
    assert figures["tiny"]["ep2"]["tokens_per_s"] > 0 and "flags" in figures["cpu"]
