"""Training throughput with and without expert parallelism, on 2 CPU ranks (gloo), side by side in one run.

    python benchmarks/expert_parallel.py            # the tiny and the demo MoE shapes, EP = 1 and EP = 2
    python benchmarks/expert_parallel.py --quick    # fewer rounds
    python benchmarks/expert_parallel.py --quick --shapes tiny   # the test suite's smoke run

Two ranks are spawned (one thread each, as torchrun sets on CPU). For each shape both set-ups are built in the same
processes: EP = 1 (FSDP2 over both ranks, every rank computes all experts for its own tokens) and EP = 2 (each rank
holds half the experts; tokens go to their expert's rank and back by all-to-all). One optimizer step is exactly the
trainer's: `upcycle.train.trainer.forward_backward` over the rank's share of the global batch, the expert-gradient
reduction and clipping, the fused AdamW step. The two set-ups alternate round by round so load drift hits both; each
round times STEPS steps after a warm-up. Then one profiled step per set-up sums the time spent inside the all-to-alls
(`upcycle.train.expert_parallel.ALL_TO_ALL_LABEL`: count exchange and both row exchanges, forward and backward), which
includes waiting for the slower rank.

Shapes (each rank gets half of the global batch; tokens are uniform random ids, so routing is roughly balanced):
    tiny  configs/tiny-moe.yaml: dim 64, 2 layers, 4 experts top-2, vocab 8192, 8 x 128 tokens per step
    demo  the demo's MoE: the committed seed (dim 256, 4 layers, FFN 768, vocab 8192) with 8 experts top-2,
          16 x 256 tokens per step (configs/demo-moe.yaml), fp32

The last line is one JSON object with every figure and the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def shapes() -> dict[str, dict]:
    from upcycle.formats.hf_formats import read_model_fields

    tiny = yaml.safe_load((REPO / "configs" / "tiny-moe.yaml").read_text())
    demo = yaml.safe_load((REPO / "configs" / "demo-moe.yaml").read_text())
    seed = read_model_fields(json.loads((REPO / "assets" / "seed" / "config.json").read_text()))
    return {
        "tiny": {"model": tiny["model"], "seq_len": tiny["data"]["seq_len"],
                 "global_batch_tokens": tiny["train"]["global_batch_tokens"]},
        "demo": {"model": {**seed, "num_experts": 8, "top_k": 2}, "seq_len": demo["data"]["seq_len"],
                 "global_batch_tokens": demo["train"]["global_batch_tokens"]},
    }


def _setup(model_fields: dict, degree: int, world):
    """(model, optimizer) as upcycle.train.trainer.setup builds them for `degree`-way expert parallelism (from
    scratch)."""
    import dataclasses

    from upcycle.model.transformer import ModelConfig
    from upcycle.train.shards import fill_from_scratch, model_pieces
    from upcycle.train.trainer import build_model, build_optimizer
    from upcycle.train.config import OptimConfig, TrainLoopConfig

    def from_scratch(model) -> None:
        torch.manual_seed(0)
        fill_from_scratch(model_pieces(model), model.init_plan(), std=model.config.init_std)

    loop = dataclasses.replace(TrainLoopConfig(), expert_parallel=degree, precision="fp32")
    model, _ = build_model(ModelConfig(**model_fields), loop, world, from_scratch)
    return model, build_optimizer(model, OptimConfig())


def _step(model, optimizer, batch_BT, loop) -> None:
    from upcycle.train.trainer import clip_gradients, forward_backward

    config = model.config
    forward_backward(model, batch_BT, loop=loop, top_k=config.top_k, num_moe=len(config.moe_layer_ids),
                     num_experts=config.num_experts, autocast=contextlib.nullcontext)
    clip_gradients(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _all_to_all_seconds(model, optimizer, batch_BT, loop) -> tuple[float, float]:
    """(seconds inside the all-to-alls, seconds of the whole step) of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    from upcycle.train.expert_parallel import ALL_TO_ALL_LABEL

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, batch_BT, loop)
    step_s = time.perf_counter() - started
    # record_function spans appear once per call; cpu_time_total is in microseconds
    inside = sum(event.cpu_time_total for event in prof.events() if event.name == ALL_TO_ALL_LABEL) / 1e6
    return inside, step_s


def _worker(rank: int, world_size: int, port: int, out: str, rounds: int, steps: int, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from upcycle.train.distributed import barrier, init_distributed, shutdown
    from upcycle.train.config import TrainLoopConfig
    from upcycle.train.config import micro_batch_size_for

    world = init_distributed()
    results = {}
    for name, shape in shapes().items():
        if name not in names:
            continue
        sequences = shape["global_batch_tokens"] // shape["seq_len"] // world_size
        loop = TrainLoopConfig(micro_batch_size=micro_batch_size_for(sequences, None))
        generator = torch.Generator().manual_seed(100 + rank)
        batch_BT = torch.randint(shape["model"]["vocab_size"], (sequences, shape["seq_len"] + 1), generator=generator)
        setups = {degree: _setup(shape["model"], degree, world) for degree in (1, world_size)}
        times = {degree: [] for degree in setups}
        for degree, parts in setups.items():  # warm-up
            _step(*parts, batch_BT, loop)
        for r in range(rounds):
            order = list(setups) if r % 2 == 0 else list(reversed(setups))
            for degree in order:
                barrier(world)
                started = time.perf_counter()
                for _ in range(steps):
                    _step(*setups[degree], batch_BT, loop)
                barrier(world)
                times[degree].append((time.perf_counter() - started) / steps)
        tokens_per_step = shape["global_batch_tokens"]
        results[name] = {}
        for degree in setups:
            a2a_s, profiled_s = _all_to_all_seconds(*setups[degree], batch_BT, loop)
            step_s = statistics.median(times[degree])
            results[name][f"ep{degree}"] = {"step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
                                            "all_to_all_s": a2a_s, "all_to_all_share": a2a_s / profiled_s}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    shutdown(world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps instead of 5 rounds of 4")
    parser.add_argument("--shapes", nargs="+", choices=("tiny", "demo"), default=["tiny", "demo"],
                        help="which model shapes to run (default: both)")
    args = parser.parse_args()
    rounds, steps = (3, 2) if args.quick else (5, 4)
    import torch.multiprocessing as mp

    from upcycle.hardware import cpu_description

    print(f"CPU: {cpu_description()}; 2 ranks x 1 thread (gloo); {rounds} rounds x {steps} steps, medians",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        mp.spawn(_worker, args=(2, free_port(), str(out), rounds, steps, args.shapes), nprocs=2, join=True)
        results = json.loads(out.read_text())
    for name, by_degree in results.items():
        one, two = by_degree["ep1"], by_degree["ep2"]
        print(f"{name:5s} EP=1 {one['tokens_per_s']:8.0f} tok/s  |  EP=2 {two['tokens_per_s']:8.0f} tok/s "
              f"(all-to-all {two['all_to_all_s'] * 1e3:6.1f} ms/step, {two['all_to_all_share']:.0%} of the step)  "
              f"|  EP=2 / EP=1 throughput {two['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    print(json.dumps({"cpu": cpu_description(), "rounds": rounds, "steps": steps, **results}))


if __name__ == "__main__":
    main()
