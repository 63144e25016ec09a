"""`upcycle plan`: every rank's share as training places it, the refusal of a plan that cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, free_port, make_data_dir, subprocess_env, tiny_config, write_config
from upcycle.model.transformer import ModelConfig, Transformer
from upcycle.train.plan import activation_values, rank_shares

MODEL = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, max_seq_len=64,
             num_experts=4, top_k=2)


# (expert_parallel, data_parallel_replicate): FSDP2 over all 4 ranks, with expert parallelism, HSDP (2 x 2), and both
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))


def _share_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from upcycle.train.distributed import init_distributed, shutdown
    from upcycle.train.shards import model_pieces
    from upcycle.train.trainer import build_model
    from upcycle.train.config import TrainLoopConfig

    world = init_distributed()
    held = {}
    for degree, replicate in LAYOUTS:
        loop = TrainLoopConfig(expert_parallel=degree, data_parallel_replicate=replicate, precision="fp32")
        _, bare = build_model(ModelConfig(**MODEL), loop, world, fill=None)
        held[f"{degree},{replicate}"] = sum(piece.local.numel() for piece in model_pieces(bare).values())
    Path(f"{out}.{rank}").write_text(json.dumps(held))
    shutdown(world)


@pytest.mark.slow
def test_the_plan_counts_exactly_what_each_of_four_ranks_holds_in_every_layout(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_share_worker, args=(4, free_port(), str(tmp_path / "held")), nprocs=4, join=True)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**MODEL))
    for degree, replicate in LAYOUTS:
        planned = rank_shares(model, world_size=4, expert_parallel=degree, parallel="fsdp", replicate=replicate)
        for rank in range(4):
            held = json.loads((tmp_path / f"held.{rank}").read_text())[f"{degree},{replicate}"]
            assert planned[rank].params == held, (degree, replicate, rank)
    one = rank_shares(model, world_size=1, expert_parallel=1, parallel="fsdp")
    assert one[0].params == model.num_params()


def test_activation_checkpointing_keeps_far_less_and_the_logits_are_counted_in_fp32():
    config = ModelConfig(**MODEL)
    full, full32 = activation_values(config, tokens=256, checkpointing=False)
    kept, kept32 = activation_values(config, tokens=256, checkpointing=True)
    assert kept < full and full32 == kept32 >= 256 * config.vocab_size


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "upcycle", "plan", *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_plan_prints_the_parameters_and_every_rank_and_refuses_what_cannot_fit(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data")))
    result = _plan("--config", str(config), "--ranks", "2", "--train.expert_parallel", "2")
    assert result.returncode == 0, result.stderr
    model = Transformer(ModelConfig(**MODEL))
    assert f"parameters: {model.num_params():,} in all, {model.num_active_params():,} active per token" in \
        result.stdout
    assert "expert_parallel 2" in result.stdout and len([line for line in result.stdout.splitlines()
                                                          if line.strip().startswith(("0 ", "1 "))]) == 2
    result = _plan("--config", str(config), "--ranks", "2", "--device", "cuda", "--device-memory", "1MB")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "use more ranks, train.expert_parallel, train.activation_checkpointing: true or a smaller "
        "train.micro_batch_size")
    result = _plan("--config", str(config), "--host-memory", "10MB")
    assert result.returncode == 2 and "of --host-memory" in result.stderr
    assert not list(tmp_path.glob("out*"))  # a plan writes nothing


def test_plan_resolves_precision_auto_for_the_device_and_says_why(tmp_path):
    values = tiny_config(make_data_dir(tmp_path / "data"), train={"precision": "auto"})
    config = write_config(tmp_path / "c.yaml", values)
    result = _plan("--config", str(config), "--device", "cuda", "--device-memory", "80GB")
    assert result.returncode == 0, result.stderr
    assert "precision bf16: auto on CUDA: bf16, assuming a GPU with native bf16" in result.stdout
    assert "bf16 on cuda" in result.stdout
    result = _plan("--config", str(config), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("precision ")]
    precision = line.split()[1].rstrip(":")
    assert precision in ("fp32", "bf16") and f"{precision} on cpu" in result.stdout
    assert "this machine's CPU" in line and ("auto picked" in line or "without native bf16" in line)
