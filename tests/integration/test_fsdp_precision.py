"""FSDP2 with the bf16 mixed-precision policy on CPU (2 ranks, gloo): bf16 compute with fp32 master weights, alone,
with activation checkpointing per block, and with checkpointing plus a compiled block, each trains like one fp32
process within bf16 tolerance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import free_port
from upcycle.model.transformer import ModelConfig, Transformer

pytestmark = pytest.mark.slow
STEPS = 4
BATCH, SEQ = 4, 16
VARIANTS = {"mp": (False, False), "mp+ac": (True, False), "mp+ac+compile": (True, True)}
CONFIG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, num_experts=4, top_k=2,
              max_seq_len=SEQ)


def batches() -> list[torch.Tensor]:
    """The same global batch every step, so the loss must fall."""
    ids = torch.randint(CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return [ids] * STEPS


def train(model: torch.nn.Module, rows: slice, reduce=None) -> list[float]:
    """STEPS AdamW steps on this rank's rows of each global batch; returns the global mean loss per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for ids in batches():
        ids = ids[rows]
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(reduce(loss.detach()) if reduce else loss.item())
    return losses


def fresh_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CONFIG))


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from upcycle.train.distributed import init_distributed, parallelize, shutdown

    world = init_distributed()
    per_rank = BATCH // world_size
    results = {}
    for name, (checkpointing, compiled) in VARIANTS.items():
        torch._dynamo.reset()
        model = fresh_model()
        seen = []  # the dtype the first block's q projection computes with
        model.layers[0].attn.q.register_forward_pre_hook(lambda module, args: seen.append(str(module.weight.dtype)))
        routers = []  # the dtype of the first MoE layer's router weight as its layer computes
        model.layers[0].ffn.register_forward_pre_hook(lambda module, args: routers.append(
            str(module.router.weight.dtype)))
        for index, block in enumerate(model.layers):  # as the trainer does: checkpoint, then compile, then shard
            if checkpointing:
                model.layers[index] = block = checkpoint_wrapper(block, preserve_rng_state=False)
            if compiled:
                block.compile()
        model = parallelize(model, model.layers, mode="fsdp", world=world, precision="bf16")

        def mean_over_ranks(loss: torch.Tensor) -> float:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            return float(loss) / world_size

        losses = train(model, slice(rank * per_rank, (rank + 1) * per_rank), mean_over_ranks)
        master = sorted({str(p.dtype) for p in model.parameters()})
        results[name] = {"losses": losses, "compute_dtypes": sorted(set(seen)), "master_dtypes": master,
                         "router_dtypes": sorted(set(routers))}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    shutdown(world)


def test_bf16_mixed_precision_with_checkpointing_and_compile_matches_one_fp32_process(tmp_path):
    import torch.multiprocessing as mp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train(fresh_model(), slice(None))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "fsdp.json"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    results = json.loads(out.read_text())
    assert set(results) == set(VARIANTS)
    for name, result in results.items():
        assert result["compute_dtypes"] == ["torch.bfloat16"], name  # the policy casts parameters for compute ...
        assert result["master_dtypes"] == ["torch.float32"], name  # ... and keeps fp32 master weights
        # routers are FSDP units of their own in fp32: routing on N ranks chooses as one process does
        assert result["router_dtypes"] == ["torch.float32"], name
        # bf16 compute moves the loss by ~1e-3 relative; training must follow the fp32 run step for step
        assert result["losses"] == pytest.approx(reference, rel=2e-2), name
    assert reference[-1] < reference[0] - 0.1  # the steps did train
