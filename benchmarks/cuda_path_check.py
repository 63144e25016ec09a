"""Proof of the trainer's multi-GPU code path on the first GPU at hand: one rank, but every multi-rank code path.

    python benchmarks/cuda_path_check.py                        # one CUDA GPU, a fresh checkout: at most ~8 minutes
    python benchmarks/cuda_path_check.py --device cpu --tiny    # the same parts on CPU with tiny shapes (the test)

A one-rank process group is created (on CUDA with an NCCL and a gloo backend, bound to the GPU, as `upcycle train`
creates it) and `World.distributed` is forced true, so FSDP2, the host group, the checkpoint collectives and expert
parallelism run as on N ranks. Parts, each in its own try/except so one failure still reports the others:

  runtime   what a CUDA process holds before any weight: host RSS, the context's device memory, NCCL's after its first
            collective (the estimates `upcycle plan` uses; one rank has no peers, so NCCL's figure is a lower bound)
  probes    B1 a checkpoint verified through the collectives resume uses (CPU flags on the host group); B2 an async
            save's device memory before, during and after staging (no second GPU copy); B3 no unsharded gradient held
            between micro-batches under FSDP2; B4 which expert kernel `auto` picks in fp32 and bf16, and a compiled
            fp32 MoE layer forward+backward (grouped_mm's fp32 meta function refuses to trace)
  syncs     host synchronizations per training step, by source line (torch.cuda.set_sync_debug_mode("warn"))
  train     a 20-step FSDP2 run of a ~113M-parameter MoE (8 experts, top-2) through `upcycle train`'s own code, bf16,
            4 micro-batches of gradient accumulation, activation checkpointing, async checkpoints at steps 10 and 20:
            loss per step, tokens/s, MFU, peak GiB
  resume    the run resumed from step 10: data hashes equal step for step, loss and gradient norm differences
  ep        expert parallelism at degree 1: the all-to-all path against the local one (outputs and gradients)
  compiled  eager against compiled throughput (if time remains)

The last line of stdout is one JSON object with every figure, the torch/CUDA versions and the GPU's name.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
try:
    import upcycle  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=src or an install
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402

from gpu_check import bf16_peak, model_flops_per_token  # noqa: E402
from upcycle.train import checkpoint as ckpt  # noqa: E402
from upcycle.train import distributed as distributed_lib  # noqa: E402
from upcycle.train.distributed import process_group_backend  # noqa: E402
from upcycle.train.expert_parallel import shard_experts  # noqa: E402
from upcycle.model.transformer import ModelConfig, Transformer  # noqa: E402
from upcycle.model.moe import MoE, resolve_impl  # noqa: E402
from upcycle.train.trainer import _StopRequest, run_training, setup, train_step  # noqa: E402
from upcycle.train.config import load_config  # noqa: E402

EOS = 0


class OutOfTime(Exception):
    """The time budget ran out before a part started."""


def log(message: str) -> None:
    print(f"[cuda_path_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A process group of one rank, as `upcycle train` creates it for N (torch's default group, bound to the GPU), with
    World.distributed forced true so every multi-rank code path runs. The trainer's own shutdown may destroy it."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=60))
    os.environ["MASTER_PORT"] = str(store.port)
    dist.init_process_group(backend=process_group_backend(device.type), store=store, rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def force_distributed() -> None:
    distributed_lib.World.distributed = property(lambda self: True)


def synthetic_data(directory: Path, vocab: int, tokens: int) -> Path:
    """A prepared data directory (data.prepare's format) of two domains, each a noisy rule next = (a*t + b) mod V, so
    the loss falls within a few steps; written in seconds, no tokenizer needed."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    domains = {}
    for name, (a, b) in {"code": (3, 5), "english": (5, 11)}.items():
        entry = {"sources": []}
        for split, count in (("train", tokens), ("val", max(4096, tokens // 20))):
            starts = rng.integers(1, vocab, size=count)
            keep = rng.random(count) > 0.1
            stream = np.empty(count, dtype=np.int64)
            stream[0] = starts[0]
            for i in range(1, count):  # vectorizing the recurrence is not worth it at these sizes
                stream[i] = (a * stream[i - 1] + b) % (vocab - 1) + 1 if keep[i] else starts[i]
            stream[rng.random(count) < 0.01] = EOS
            stream[-1] = EOS
            file = f"{name}.{split}.bin"
            stream.astype(np.uint16 if vocab < 65536 else np.uint32).tofile(directory / file)
            entry[split] = {"file": file, "tokens": count, "documents": int((stream == EOS).sum())}
        domains[name] = entry
    metadata = {"format": 1, "tokenizer": "synthetic", "tokenizer_sha256": None, "vocab_size": vocab, "eos_id": EOS,
                "dtype": "uint16" if vocab < 65536 else "uint32", "val_fraction": 0.05, "seed": 0,
                "text_field": "text", "domains": domains}
    (directory / "data.json").write_text(json.dumps(metadata))
    return directory


def shapes(tiny: bool) -> dict:
    if tiny:
        return {"model": dict(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
                              num_experts=4, top_k=2, max_seq_len=64),
                "seq": 32, "sequences": 8, "micro": 2, "steps": 6, "save_every": 3, "tokens": 40_000}
    return {"model": dict(vocab_size=32768, dim=512, num_layers=6, num_heads=8, num_kv_heads=4, ffn_dim=1024,
                          num_experts=8, top_k=2, max_seq_len=1024),
            "seq": 1024, "sequences": 64, "micro": 16, "steps": 20, "save_every": 10, "tokens": 3_000_000}


def write_config(path: Path, data: Path, sizes: dict, precision: str, **train) -> Path:
    config = {
        "model": sizes["model"],
        "data": {"path": str(data), "seq_len": sizes["seq"]},
        "optim": {"lr": 1e-3, "min_lr": 1e-4},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": sizes["steps"], "global_batch_tokens": sizes["sequences"] * sizes["seq"],
                  "micro_batch_size": sizes["micro"], "precision": precision, "activation_checkpointing": True,
                  "eval_every": 0, **train},
        "checkpoint": {"every": sizes["save_every"], "keep": 5, "async_save": True},
        "logging": {"progress": False, "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------- parts

def part_runtime(device: torch.device) -> dict:
    before = rss_gib()
    report: dict = {"host_rss_before_gib": round(before, 3)}
    if device.type != "cuda":
        return report
    torch.cuda.init()
    torch.empty(1, device=device)
    free, total = torch.cuda.mem_get_info(device)
    report.update(host_rss_after_context_gib=round(rss_gib(), 3),
                  context_device_gib=round((total - free - torch.cuda.memory_reserved(device)) / 2**30, 3))
    with one_rank_group(device):
        free_before, _ = torch.cuda.mem_get_info(device)
        flag = torch.ones(1, device=device)
        dist.all_reduce(flag)
        torch.cuda.synchronize(device)
        free_after, _ = torch.cuda.mem_get_info(device)
        report["nccl_first_collective_device_gib"] = round((free_before - free_after) / 2**30, 3)
        report["host_rss_after_nccl_gib"] = round(rss_gib(), 3)
    return report


def part_probes(device: torch.device, sizes: dict, work: Path) -> dict:
    report: dict = {}
    precision = "bf16" if device.type == "cuda" else "fp32"
    # B4: which kernel `auto` picks, and a compiled fp32 MoE layer (grouped_mm would refuse to trace in fp32)
    report["b4_auto_fp32"] = resolve_impl("auto", device, torch.float32)
    report["b4_auto_bf16"] = resolve_impl("auto", device, torch.bfloat16)
    try:
        torch.manual_seed(0)
        layer = MoE(64, 128, 4, 2).to(device)
        layer.init_weights(0.05)
        compiled = torch.compile(layer)
        x = torch.randn(256, 64, device=device, requires_grad=True)
        compiled(x).out_TD.square().mean().backward()
        report["b4_compiled_fp32_layer"] = "ok"
    except Exception as error:  # noqa: BLE001 (reported)
        report["b4_compiled_fp32_layer"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    with one_rank_group(device):
        world = distributed_lib.init_distributed(timeout_s=120, host_timeout_s=300)
        data = synthetic_data(work / "probe-data", sizes["model"]["vocab_size"], sizes["tokens"] // 10)
        config = load_config(write_config(work / "probe.yaml", data, sizes, precision))
        run = setup(config, work / "probe-run", world)
        try:
            # B3: after a micro-batch that is not the step's last, FSDP2 holds no unsharded gradient
            from torch.distributed.fsdp import FSDPModule

            batch = run.loader.next_batch().to(device)
            with distributed_lib.gradient_sync(run.model, False), run.autocast():
                run.model(batch[: sizes["micro"], :-1]).logits.float().square().mean().backward()
            held = 0
            for module in run.model.modules():
                if isinstance(module, FSDPModule):
                    group = module._get_fsdp_state()._fsdp_param_group
                    for param in (group.fsdp_params if group is not None else []):
                        held += int(param.unsharded_accumulated_grad is not None or (
                            hasattr(param, "_unsharded_param") and param._unsharded_param.grad is not None))
            report["b3_unsharded_grads_held"] = held
            run.optimizer.zero_grad(set_to_none=True)
            # B2: an async save stages on the host: device memory before, at the end of staging, after the write
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) if cuda else 0
            path = run.checkpointer.save(1, model=run.model, optimizer=run.optimizer, model_config={},
                                         trainer_state={}, train_config={})
            during = torch.cuda.max_memory_allocated(device) if cuda else 0
            run.checkpointer.finish()
            after = torch.cuda.memory_allocated(device) if cuda else 0
            report["b2_device_gib"] = {"before": round(before / 2**30, 3),
                                       "peak_while_staging": round(during / 2**30, 3),
                                       "after": round(after / 2**30, 3)}
            report["b2_state_gib"] = round(sum(
                (v.to_local() if hasattr(v, "to_local") else v).numel() * 4
                for v in ckpt.state_tensors(run.model, run.optimizer).values()) / 2**30, 3)
            # B1: the checkpoint verified through resume's collectives (CPU flags on the host group)
            ckpt.verify_checksums(path, world)
            report["b1_verify_checksums"] = "ok"
        finally:
            if run.lock is not None:
                run.lock.close()
    return report


def part_syncs(device: torch.device, sizes: dict, work: Path, steps: int = 3) -> dict:
    """Host synchronizations of `steps` training steps, by the first of our source lines on the stack."""
    if device.type != "cuda":
        return {"skipped": "host synchronizations are a GPU matter"}
    by_line: Counter = Counter()
    with one_rank_group(device):
        world = distributed_lib.init_distributed(timeout_s=120, host_timeout_s=300)
        data = synthetic_data(work / "sync-data", sizes["model"]["vocab_size"], sizes["tokens"] // 10)
        run = setup(load_config(write_config(work / "sync.yaml", data, sizes, "bf16")), work / "sync-run", world)
        try:
            train_step(run, 0, stop=_StopRequest())  # warm-up: allocator, NCCL, autotuning
            torch.cuda.synchronize(device)

            def record(message, category, filename, lineno, file=None, line=None):
                ours = [f for f in traceback.extract_stack()[:-1] if "/upcycle/" in f.filename]
                where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else f"{filename}:{lineno}"
                by_line[where] += 1

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for step in range(1, steps + 1):
                        train_step(run, step, stop=_StopRequest())
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            if run.lock is not None:
                run.lock.close()
    return {"steps": steps, "per_step": round(sum(by_line.values()) / steps, 1),
            "by_line": {line: round(count / steps, 2) for line, count in by_line.most_common()}}


def part_train(device: torch.device, sizes: dict, work: Path, peak_tflops: float | None, *,
               compile_blocks: bool = False, name: str = "train", steps: int | None = None) -> dict:
    precision = "bf16" if device.type == "cuda" else "fp32"
    data = synthetic_data(work / "data", sizes["model"]["vocab_size"], sizes["tokens"])
    overrides = {"compile": compile_blocks}
    if steps is not None:
        overrides["max_steps"] = steps
    config_path = write_config(work / f"{name}.yaml", data, sizes, precision, **overrides)
    out = work / name
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.monotonic()
    with one_rank_group(device):
        result = run_training(load_config(config_path), out)
    wall = time.monotonic() - started
    records = read_metrics(out)
    timed = records[2:] if len(records) > 4 else records  # after warm-up (and compilation)
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = len(timed) * sizes["sequences"] * sizes["seq"]
    with torch.device("meta"):
        model = Transformer(ModelConfig(**sizes["model"]))
    flops_per_token = model_flops_per_token(model, sizes["seq"])
    tokens_per_s = tokens / seconds
    tflops = flops_per_token * tokens_per_s / 1e12
    report = {"params": model.num_params(), "active_params": model.num_active_params(), "precision": precision,
              "steps": len(records), "stopped": result["stopped"], "loss": [round(r["loss"], 4) for r in records],
              "grad_norm": [round(r["grad_norm"], 4) for r in records], "tokens_per_s": round(tokens_per_s, 1),
              "model_tflops": round(tflops, 2), "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None,
              "wall_s": round(wall, 1), "checkpoints": [p.name for _, p in ckpt.list_checkpoints(out / "checkpoints")],
              "compiled_blocks": compile_blocks}
    if device.type == "cuda":
        report["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        report["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    if not all(math.isfinite(v) for v in report["loss"]):
        raise RuntimeError(f"non-finite loss: {report['loss']}")
    log(f"  {name}: {tokens_per_s:,.0f} tokens/s, {report['model_tflops']} TFLOP/s, MFU "
        f"{report['mfu'] if report['mfu'] is not None else 'n/a'}, loss {report['loss'][0]} -> {report['loss'][-1]}")
    return report


def part_resume(device: torch.device, sizes: dict, work: Path) -> dict:
    """The train part's run, resumed from its middle checkpoint, against itself."""
    source = work / "train"
    out = work / "resume"
    shutil.copytree(source, out)
    shutil.rmtree(out / "checkpoints" / ckpt.step_dir_name(sizes["steps"]))
    with one_rank_group(device):
        run_training(load_config(work / "train.yaml"), out)
    first = {r["step"]: r for r in read_metrics(source)}
    again = {r["step"]: r for r in read_metrics(out) if r["step"] > sizes["save_every"]}
    steps = sorted(again)
    return {"steps": steps,
            "data_sha256_equal": all(again[s]["data_sha256"] == first[s]["data_sha256"] for s in steps),
            "max_abs_loss_diff": max(abs(again[s]["loss"] - first[s]["loss"]) for s in steps),
            "max_abs_grad_norm_diff": max(abs(again[s]["grad_norm"] - first[s]["grad_norm"]) for s in steps)}


def part_expert_parallel(device: torch.device, sizes: dict) -> dict:
    """Expert parallelism at degree 1: the rows go through the all-to-all and come back; the result must equal the
    local path's, outputs and gradients."""
    config = ModelConfig(**{**sizes["model"], "num_layers": 2})
    torch.manual_seed(0)
    local = Transformer(config).to(device)
    local.init_weights()
    with one_rank_group(device):
        world = distributed_lib.init_distributed(timeout_s=120, host_timeout_s=300)
        exchanged = Transformer(config).to(device)
        exchanged.load_state_dict(local.state_dict())
        shard_experts(exchanged, 1, world)
        ids = torch.randint(config.vocab_size, (2, min(64, sizes["seq"]) + 1), device=device,
                            generator=torch.Generator(device=device).manual_seed(1))
        results = []
        for model in (local, exchanged):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(ids[:, :-1]).logits.float()
            logits.square().mean().backward()
            results.append((logits.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    worst = max(float((got_grads[n] - g).abs().max()) for n, g in want_grads.items())
    return {"max_abs_logit_diff": float((got - want).abs().max()), "max_abs_grad_diff": worst}


# ---------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: the parts as a smoke test, in seconds")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no part starts after this many seconds (default 420); a watchdog ends the run 60 s "
                             "after it")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, TFLOP/s")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda_path_check: no CUDA device; run with --device cpu --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    started = time.monotonic()
    deadline = started + args.budget_s
    watchdog = threading.Timer(args.budget_s + 60, lambda: os.kill(os.getpid(), signal.SIGKILL))
    watchdog.daemon = True
    watchdog.start()
    summary: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device.type,
                     "tiny": args.tiny, "errors": {}}
    peak = args.peak_tflops
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        summary.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1))
        if peak is None:
            peak, summary["peak_source"] = bf16_peak(props.name)
        summary["peak_tflops_bf16"] = peak
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    force_distributed()
    sizes = shapes(args.tiny)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cuda-path-check-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = [
        ("runtime", lambda: part_runtime(device)),
        ("probes", lambda: part_probes(device, sizes, work)),
        ("syncs", lambda: part_syncs(device, sizes, work)),
        ("train", lambda: part_train(device, sizes, work, peak)),
        ("resume", lambda: part_resume(device, sizes, work)),
        ("expert_parallel", lambda: part_expert_parallel(device, sizes)),
        ("compiled", lambda: part_train(device, sizes, work, peak, compile_blocks=True, name="compiled",
                                        steps=max(4, sizes["steps"] // 2))),
    ]
    try:
        for name, part in parts:
            if time.monotonic() > deadline:
                summary["errors"][name] = "skipped: out of time"
                continue
            log(f"part {name} ...")
            t0 = time.monotonic()
            try:
                summary[name] = part()
            except Exception as error:  # noqa: BLE001 (reported; the other parts still run)
                traceback.print_exc()
                summary["errors"][name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            log(f"part {name} took {time.monotonic() - t0:.1f} s")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    probes = summary.get("probes", {})
    summary["ok"] = (not summary["errors"] and probes.get("b1_verify_checksums") == "ok"
                     and probes.get("b3_unsharded_grads_held") == 0
                     and probes.get("b4_compiled_fp32_layer") == "ok"
                     and summary.get("resume", {}).get("data_sha256_equal") is True)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    watchdog.cancel()
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
