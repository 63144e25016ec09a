"""Peak resident memory of every rank, phase by phase, when training a ~250M-parameter MoE on 1, 2 and 4 ranks.

The case: a random dense Llama (hidden 768, 6 layers, FFN 2048, 12 heads / 4 KV heads, the vocabulary of
assets/tokenizer) upcycled online with Drop-Upcycling (r = 0.5, 8 experts, top-2) by `upcycle train`'s `init` section,
fp32, trained 3 steps of 4 x 256 tokens on the committed sample corpus, saved once, then resumed (load + 1 step + save).
Layouts: 1 process, 2 and 4 ranks with FSDP2, 4 ranks with expert_parallel 2; gloo, one thread per rank.

Each rank runs the trainer's own functions (upcycle.train.trainer.setup, train_step, save) and records its peak resident
set size per phase (the kernel's high-water mark, VmHWM, reset at each phase start through /proc/self/clear_refs):

    build    set-up: the model built and filled (or, for the resume, built and loaded from the checkpoint)
    steps    the optimizer steps
    save     writing the checkpoint (the resume's save is reported as save-2)

It prints a table (per layout, the worst rank's peak per phase and the ratio to one process; rank 0 against the median
rank; save and load seconds; checkpoint bytes), `upcycle plan`'s estimate beside the measured training peak, and the
whole result as JSON (--json FILE). With --src DIR the workers import upcycle from another source tree (e.g. a checkout
of an earlier version), so a before/after pair is measured on one machine in one sitting.

    python benchmarks/memory.py                    # ~5-10 min on 2 cores
    python benchmarks/memory.py --quick            # a tiny model, seconds (the test suite's smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [("1", 1, 1), ("2 FSDP2", 2, 1), ("4 FSDP2", 4, 1), ("4 EP2", 4, 2)]
SHAPES = {"full": dict(hidden_size=768, num_hidden_layers=6, intermediate_size=2048, num_attention_heads=12,
                       num_key_value_heads=4),
          "quick": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2)}


# ---- inside each rank ------------------------------------------------------------------------------------------------


def _high_water_mark() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_high_water_mark() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # no reset: the mark only grows, so later phases report at least the earlier peaks
        pass


def worker(config_path: str, out: str, max_steps: int, log: str) -> None:
    import torch

    from upcycle.train.distributed import init_distributed, shutdown
    from upcycle.train.trainer import save, setup, train_step
    from upcycle.train.config import load_config

    torch.set_num_threads(1)
    config = load_config(config_path, [f"train.max_steps={max_steps}"])
    world = init_distributed()
    records = []

    def phase(name: str, started: float) -> None:
        records.append({"rank": world.rank, "phase": name, "peak_rss": _high_water_mark(),
                        "seconds": time.perf_counter() - started})
        _reset_high_water_mark()

    _reset_high_water_mark()
    started = time.perf_counter()
    run = setup(config, Path(out), world)
    phase("build", started)
    stop = type("Stop", (), {"signal_name": None})()
    started = time.perf_counter()
    record = None
    for step in range(run.start_step, max_steps):
        record = train_step(run, step, stop=stop)
    phase("steps", started)
    started = time.perf_counter()
    save(run, record)
    if hasattr(run, "checkpointer"):
        run.checkpointer.finish()
    phase("save", started)
    with open(log, "a") as f:
        for line in records:
            f.write(json.dumps(line) + "\n")
    shutdown(world)


# ---- the driver ------------------------------------------------------------------------------------------------------


def _prepare(work: Path, shape: dict) -> Path:
    """The dense model, the prepared data and the training config, made once under `work`."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from upcycle.data import prepare as data_lib

    dense = work / "dense"
    if not (dense / "config.json").is_file():
        vocab = Tokenizer.from_file(str(REPO / "assets" / "tokenizer" / "tokenizer.json")).get_vocab_size()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, **shape))
        model.save_pretrained(dense)
    data = work / "data"
    if not (data / "data.json").is_file():
        sources = {name: [str(REPO / "data" / "sample" / f"{name}.train.jsonl.gz")]
                   for name in ("english", "japanese", "code")}
        data_lib.prepare(sources, data, str(REPO / "assets" / "tokenizer"), val_fraction=0.01, seed=0, force=True,
                         progress=False)
    config = work / "config.yaml"
    config.write_text(json.dumps({
        "init": {"source": str(dense), "method": "drop", "ratio": 0.5, "num_experts": 8, "top_k": 2},
        "data": {"path": str(data), "seq_len": 256},
        "optim": {"lr": 1e-4, "min_lr": 1e-5},
        "schedule": {"warmup_steps": 1},
        "train": {"max_steps": 3, "global_batch_tokens": 1024, "micro_batch_size": 1, "precision": "fp32",
                  "eval_every": 0},
        "checkpoint": {"every": 0, "keep": 2},
        "logging": {"progress": False, "tensorboard": False},
    }))
    return config


def _launch(config: Path, out: Path, world: int, degree: int, max_steps: int, log: Path, src: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(__file__).resolve()), "--worker", str(config), str(out), str(max_steps), str(log)]
    if degree > 1:
        command[-4] = str(_with_degree(config, degree))
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        errors = log.with_suffix(".stderr")
        errors.write_text(result.stderr)
        ranks = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
        raise SystemExit(f"{world} rank(s), expert_parallel {degree} failed (all of its output: {errors}):\n"
                         + "\n".join(ranks[-30:] or result.stderr.splitlines()[-30:]))


def _with_degree(config: Path, degree: int) -> Path:
    values = json.loads(config.read_text())
    values["train"]["expert_parallel"] = degree
    path = config.with_name(f"config-ep{degree}.yaml")
    path.write_text(json.dumps(values))
    return path


def _estimate(config: Path, world: int, degree: int, src: Path) -> int | None:
    """`upcycle plan`'s busiest-rank training memory for this layout (device + runtime, on a CPU), or None where the
    source tree has no planner."""
    code = ("import json,sys; from upcycle.train.plan import make_plan, RUNTIME_BYTES; "
            "from upcycle.train.config import "
            f"load_config; c = load_config({str(config)!r}, ['train.expert_parallel={degree}']); "
            f"p = make_plan(c, world_size={world}, ranks_per_node={world}, device='cpu'); "
            "print(p.worst.device_total + RUNTIME_BYTES)")
    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return int(result.stdout.split()[-1]) if result.returncode == 0 else None


def measure(work: Path, src: Path, quick: bool, layouts: list[str]) -> dict:
    config = _prepare(work, SHAPES["quick" if quick else "full"])
    results = {}
    for name, world, degree in LAYOUTS:
        if name not in layouts:
            continue
        out, log = work / f"run-{world}-{degree}", work / f"log-{world}-{degree}.jsonl"
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)
        _launch(config, out, world, degree, 3, log, src)
        first = [json.loads(line) for line in log.read_text().splitlines()]
        checkpoint = max((out / "checkpoints").glob("step_*"))
        checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        log.unlink()
        _launch(config, out, world, degree, 4, log, src)  # resume: load the checkpoint, one more step, save
        second = [json.loads(line) for line in log.read_text().splitlines()]
        phases = {}
        for label, records in (("build", first), ("steps", first), ("save", first), ("resume", second),
                               ("save-2", second)):
            source_phase = {"resume": "build", "save-2": "save"}.get(label, label)
            by_rank = {r["rank"]: r for r in records if r["phase"] == source_phase}
            phases[label] = {"peak_rss": [by_rank[rank]["peak_rss"] for rank in range(world)],
                             "seconds": max(r["seconds"] for r in by_rank.values())}
        results[name] = {"world": world, "expert_parallel": degree, "phases": phases,
                         "checkpoint_bytes": checkpoint_bytes, "estimate": _estimate(config, world, degree, src)}
        shutil.rmtree(out)  # its checkpoints: 6 GB at the full shape
    return results


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f}"


def report(results: dict) -> str:
    one = next(iter(results.values()))["phases"]
    lines = ["peak RSS in GB: the busiest rank (rank 0 / median rank where they differ); worst/1 = its worst phase "
             "over the first layout's worst phase",
             f"{'ranks':<9} {'build':>14} {'steps':>14} {'save':>14} {'resume':>14} {'worst/1':>8} {'save s':>7} "
             f"{'load s':>7} {'ckpt GB':>8} {'plan':>6}"]
    single_worst = max(max(p["peak_rss"]) for p in one.values())
    for name, result in results.items():
        cells = []
        for phase in ("build", "steps", "save", "resume"):
            peaks = result["phases"][phase]["peak_rss"]
            cell = _gb(max(peaks))
            if len(peaks) > 1 and abs(peaks[0] - statistics.median(peaks)) > 0.02 * max(peaks):
                cell += f" ({_gb(peaks[0])}/{_gb(statistics.median(peaks))})"
            cells.append(cell)
        worst = max(max(p["peak_rss"]) for p in result["phases"].values())
        estimate = _gb(result["estimate"]) if result["estimate"] else "-"
        lines.append(f"{name:<9} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {cells[3]:>14} "
                     f"{worst / single_worst:>8.2f} {result['phases']['save']['seconds']:>7.1f} "
                     f"{result['phases']['resume']['seconds']:>7.1f} {_gb(result['checkpoint_bytes']):>8} "
                     f"{estimate:>6}")
    lines.append("plan: `upcycle plan`'s estimate of the busiest rank while training (GB), to set beside 'steps'")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (seconds), to check the script runs")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "memory-benchmark",
                        help="working directory (the model, data and runs are kept there)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the upcycle source tree the ranks import")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--layouts", default=",".join(name for name, _, _ in LAYOUTS),
                        help="comma-separated layouts to run, of: " + ", ".join(name for name, _, _ in LAYOUTS))
    parser.add_argument("--worker", nargs=4, metavar=("CONFIG", "OUT", "STEPS", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config, out, steps, log = args.worker
        worker(config, out, int(steps), log)
        return
    from upcycle.hardware import cpu_description

    args.work.mkdir(parents=True, exist_ok=True)
    layouts = [name.strip() for name in args.layouts.split(",")]
    unknown = sorted(set(layouts) - {name for name, _, _ in LAYOUTS})
    if unknown:
        parser.error(f"unknown layout(s) {unknown}")
    results = measure(args.work, args.src.resolve(), args.quick, layouts)
    print(cpu_description())
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_description(), "src": str(args.src), "results": results}, indent=1))


if __name__ == "__main__":
    main()
