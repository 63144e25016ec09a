"""A checkpoint write that fails on one rank fails the save on every rank at once (no hang), synchronous and async:
two gloo processes, one of them with a full disk."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
import torch

from helpers import free_port
from upcycle.errors import UpcycleError
from upcycle.model.transformer import ModelConfig, Transformer
from upcycle.train import checkpoint as ckpt

CONFIG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, num_experts=4, top_k=2,
              max_seq_len=16)


def _failing_save_worker(rank: int, port: int, out: str, asynchronous: bool) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from upcycle.train.distributed import init_distributed, shutdown

    world = init_distributed(timeout_s=60, host_timeout_s=60)
    if rank == 1:  # this rank's disk is full
        def full_disk(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device")

        ckpt._StreamingWriter.write_data = full_disk
    checkpointer = ckpt.Checkpointer(Path(out) / "checkpoints", world, keep=2, asynchronous=asynchronous)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters())
    result = {"rank": rank}
    try:
        checkpointer.save(1, model=model, optimizer=optimizer, model_config={}, trainer_state={}, train_config={})
        if asynchronous:
            deadline = time.monotonic() + 60
            while not checkpointer.failed() and time.monotonic() < deadline:
                time.sleep(0.05)
            result["failed_seen"] = checkpointer.failed()
            checkpointer.finish()
        result["error"] = None
    except (UpcycleError, OSError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    shutdown(world)


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_write_failing_on_one_rank_fails_every_rank(tmp_path, asynchronous):
    import torch.multiprocessing as mp

    started = time.monotonic()
    mp.spawn(_failing_save_worker, args=(free_port(), str(tmp_path), asynchronous), nprocs=2, join=True)
    assert time.monotonic() - started < 50  # a hang would run into the 60 s group timeout
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 0 reports rank 1's failure (torch.distributed.checkpoint gathers it; else our all-gather names the rank)
    assert all("No space left on device" in (r["error"] or "") for r in results), results
    if asynchronous:
        assert all(r["failed_seen"] for r in results)  # both learn it, so the trainer stops them at the same step
    assert not list((tmp_path / "checkpoints").glob("step_*"))  # nothing published
