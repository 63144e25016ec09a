"""`upcycle bench`: what an upcycled MoE costs to serve, measured in transformers against its dense parent.

Prefill and decode throughput and memory of both models, side by side in one process: untimed warm-up rounds, then
rounds that run every (model, measurement) once in a shuffled order, so drifting clocks and other load fall on both
alike; medians and their MoE / dense ratios are reported. What each measure is and what the numbers do and do not say
about other engines: docs/eval.md, "`upcycle bench`"."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.model.hf import load_transformers

QUICK = dict(prompt_lengths=[32], batch_sizes=[1], decode_tokens=4, repeats=2, warmup=1)


@dataclass
class ModelCost:
    """What one model costs: medians in tokens per second, and memory."""

    path: str
    params: int
    active_params: int | None
    weight_bytes: int
    kv_cache_bytes: int  # at the longest prompt, batch 1
    prefill_tokens_per_s: dict[str, float] = field(default_factory=dict)  # prompt length -> tokens/s
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)  # batch size -> tokens/s
    peak_memory_bytes: int | None = None


def load_causal_lm(path: Path, dtype: torch.dtype, device: torch.device):
    """A model directory (HF, or one of our checkpoints exported on the fly by the caller) through transformers."""
    return load_transformers(path, dtype).to(device=device)


def _count_params(model) -> tuple[int, int | None]:
    """(all parameters, parameters used per token): expert stacks [E, ...] or per-expert modules count top_k / E."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) \
        or getattr(config, "n_routed_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        return total, total
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name
                 and "shared" not in name)
    return total, total - routed + routed * top_k // experts


def _kv_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * element


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _prefill(model, ids: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    model(ids, use_cache=True)
    _sync(device)
    return time.perf_counter() - started


@torch.inference_mode()
def _decode(model, prompt: torch.Tensor, steps: int, device: torch.device) -> float:
    """Seconds for `steps` one-token steps with the KV cache after a prefill of `prompt` (not timed)."""
    out = model(prompt, use_cache=True)
    # transformers 5.24 names the KV cache `cache`; earlier 5.x releases (5.17 on this project's GPU machines) named it
    # `past_key_values`, in the output and as the argument
    name = "cache" if "cache" in out else "past_key_values"
    cache, token = out[name], out.logits[:, -1:].argmax(-1)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, **{name: cache})
        cache, token = out[name], out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - started


def measure(paths: dict[str, Path], *, prompt_lengths: list[int], batch_sizes: list[int], decode_tokens: int,
            repeats: int, warmup: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
            progress=None) -> dict[str, ModelCost]:
    """Both (or one) models loaded, every measurement interleaved over repeats in a shuffled order; medians."""
    models, costs = {}, {}
    for name, path in paths.items():
        model = load_causal_lm(path, dtype, device)
        models[name] = model
        total, active = _count_params(model)
        costs[name] = ModelCost(path=str(path), params=total, active_params=active,
                                weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                                kv_cache_bytes=_kv_bytes(model.config, max(prompt_lengths), dtype))
    vocab = min(m.config.vocab_size for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    prompts = {length: torch.randint(vocab, (1, length), generator=generator).to(device) for length in prompt_lengths}
    decode_prompt = {batch: torch.randint(vocab, (batch, 16), generator=generator).to(device)
                     for batch in batch_sizes}
    jobs = [(name, "prefill", length) for name in models for length in prompt_lengths]
    jobs += [(name, "decode", batch) for name in models for batch in batch_sizes]

    def run(job) -> float:
        name, kind, size = job
        if kind == "prefill":
            return size / _prefill(models[name], prompts[size], device)
        return size * decode_tokens / _decode(models[name], decode_prompt[size], decode_tokens, device)

    for _ in range(warmup):
        for job in jobs:
            run(job)
    samples: dict[tuple, list[float]] = {job: [] for job in jobs}
    order, rng = list(jobs), random.Random(seed)
    for repeat in range(repeats):
        rng.shuffle(order)
        for job in order:
            samples[job].append(run(job))
        if progress:
            progress(repeat + 1)
    for (name, kind, size), values in samples.items():
        target = costs[name].prefill_tokens_per_s if kind == "prefill" else costs[name].decode_tokens_per_s
        target[str(size)] = statistics.median(values)
    if device.type == "cuda":
        for name, model in models.items():
            torch.cuda.reset_peak_memory_stats(device)
            run((name, "prefill", max(prompt_lengths)))
            run((name, "decode", max(batch_sizes)))
            costs[name].peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return costs


def child_peak_rss(path: Path, *, prompt_length: int, batch: int, decode_tokens: int, dtype: str) -> int | None:
    """Peak resident bytes of a child process that loads `path` and runs one prefill and one decode (CPU)."""
    code = ("import sys, torch; from pathlib import Path; from upcycle.eval import bench;"
            "m = bench.load_causal_lm(Path(sys.argv[1]), getattr(torch, sys.argv[5]), torch.device('cpu'));"
            "v = m.config.vocab_size; bench._prefill(m, torch.randint(v, (1, int(sys.argv[2]))), torch.device('cpu'));"
            "bench._decode(m, torch.randint(v, (int(sys.argv[3]), 16)), int(sys.argv[4]), torch.device('cpu'));"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, str(path), str(prompt_length), str(batch),
                             str(decode_tokens), dtype], capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        return None
    return int(result.stdout.strip().splitlines()[-1]) * 1024


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def format_table(costs: dict[str, ModelCost]) -> str:
    names = list(costs)
    header = ["measure", *names] + (["moe / dense"] if "dense" in costs and len(names) == 2 else [])
    rows = []

    def add(label: str, values: list[float | None], fmt, ratio: bool = True) -> None:
        row = [label, *(fmt(v) if v is not None else "-" for v in values)]
        if len(header) > len(names) + 1:
            moe, dense = values[0], values[1]
            row.append(f"{moe / dense:.2f}x" if ratio and moe and dense else "-")
        rows.append(row)

    first = costs[names[0]]
    for length in first.prefill_tokens_per_s:
        add(f"prefill tokens/s, prompt {length}", [costs[n].prefill_tokens_per_s[length] for n in names], _rate)
    for batch in first.decode_tokens_per_s:
        add(f"decode tokens/s, batch {batch}", [costs[n].decode_tokens_per_s[batch] for n in names], _rate)
    add("parameters", [costs[n].params for n in names], lambda v: f"{v:,}")
    add("active parameters per token", [costs[n].active_params for n in names], lambda v: f"{v:,}")
    add("weights", [costs[n].weight_bytes for n in names], lambda v: f"{v / 2**20:,.1f} MiB")
    add("KV cache at the longest prompt", [costs[n].kv_cache_bytes for n in names], lambda v: f"{v / 2**20:,.2f} MiB")
    add("peak memory", [costs[n].peak_memory_bytes for n in names], lambda v: f"{v / 2**20:,.0f} MiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def run_bench(model: str, *, dense: str | None, settings: dict, device: str, dtype: str,
              output: str | None) -> dict[str, ModelCost]:
    """Load MODEL (and DENSE), measure them (`measure`; on a CPU also each one's peak resident memory in a child
    process), print the table, write the JSON record to `output`. `settings`: prompt_lengths, batch_sizes,
    decode_tokens, repeats, warmup (already checked)."""
    import tempfile

    from upcycle.model.hf import as_hf_directory, check_model_dir, model_tensors

    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype)
    named = {"moe" if dense else "model": check_model_dir(model)}
    if dense:
        named["dense"] = check_model_dir(dense)
    for path in named.values():  # the validation of every command that reads a model (config, tensors, checksums)
        model_tensors(path)
    with tempfile.TemporaryDirectory() as tmp:  # a subfolder each: two checkpoints of ours may share a name
        paths = {name: as_hf_directory(path, Path(tmp) / name) for name, path in named.items()}
        for name, path in paths.items():
            if not (path / "config.json").is_file():
                raise UpcycleError(f"{named[name]} is not a model directory (no config.json); pass a checkpoint "
                                   "directory")
        print(f"upcycle bench: {device}, {dtype}, {torch.get_num_threads()} threads; "
              f"{settings['repeats']} rounds after {settings['warmup']} warm-up", file=sys.stderr)
        costs = measure(paths, device=torch_device, dtype=torch_dtype, **settings,
                        progress=lambda r: print(f"  round {r}/{settings['repeats']}", file=sys.stderr))
        if torch_device.type == "cpu":
            for name, path in paths.items():
                costs[name].peak_memory_bytes = child_peak_rss(
                    path, prompt_length=max(settings["prompt_lengths"]), batch=max(settings["batch_sizes"]),
                    decode_tokens=settings["decode_tokens"], dtype=dtype)
    print(format_table(costs))
    if output:
        from upcycle.hardware import cpu_description

        record = {"device": device, "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "cpu": cpu_description(), "gpu": torch.cuda.get_device_name(torch_device) if device == "cuda"
                  else None, "settings": settings, "models": {n: asdict(c) for n, c in costs.items()}}
        if "dense" in costs:
            moe, ref = costs["moe"], costs["dense"]
            record["ratios"] = {
                **{f"prefill_{k}": moe.prefill_tokens_per_s[k] / ref.prefill_tokens_per_s[k]
                   for k in moe.prefill_tokens_per_s},
                **{f"decode_batch_{k}": moe.decode_tokens_per_s[k] / ref.decode_tokens_per_s[k]
                   for k in moe.decode_tokens_per_s}}
        Path(output).write_text(json.dumps(record, indent=1) + "\n")
    return costs
