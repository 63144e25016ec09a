"""Conversion benchmark: peak memory for a 4- vs a 16-layer model of the same width, and conversion time against a
plain copy of the output bytes. Not a test: it prints what it measures, side by side in one run.

Each conversion runs in its own subprocess so its peak resident memory (VmHWM) is its own; the baseline is the
same subprocess importing torch, transformers' safetensors and upcycle without converting anything.

Run: `python benchmarks/convert.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from this (large) parent would report the parent's
# resident set as its own peak.
CHILD = r"""
import sys, time, json, re
from upcycle.convert.conversion import convert
mode, src, out = sys.argv[1:4]
start = time.perf_counter()
if mode == "convert":
    convert(src, out, method="drop", ratio=0.5, num_experts=8, top_k=2, progress=False)
peak_kb = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_kb / 1024}))
"""


def save_dense(directory: Path, layers: int, dim: int, ffn_dim: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=dim, intermediate_size=ffn_dim, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)


def run_child(mode: str, src: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller width")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn-dim", type=int, default=1408)
    args = parser.parse_args(argv)
    dim, ffn_dim = (256, 704) if args.quick else (args.dim, args.ffn_dim)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = run_child("baseline", tmp, tmp / "none")["peak_mb"]
        for layers in (4, 16):
            src = tmp / f"dense{layers}"
            save_dense(src, layers, dim, ffn_dim)
            out = tmp / f"moe{layers}"
            converted = run_child("convert", src, out)
            size = directory_bytes(out)
            start = time.perf_counter()
            shutil.copytree(out, tmp / f"copy{layers}")  # read + write the same bytes: the floor for a conversion
            copy_seconds = time.perf_counter() - start
            results[layers] = dict(peak_mb=converted["peak_mb"], above_import_mb=converted["peak_mb"] - baseline,
                                   seconds=converted["seconds"], copy_seconds=copy_seconds, output_mb=size / 1e6)
            shutil.rmtree(tmp / f"copy{layers}")
            shutil.rmtree(out)
    from upcycle.hardware import cpu_description

    print(f"CPU: {cpu_description()}")
    print(f"width dim={dim} ffn_dim={ffn_dim}, 8 experts, drop r=0.5; import-only peak {baseline:.0f} MB")
    print(f"{'layers':>6}{'output MB':>11}{'peak MB':>9}{'above import':>14}{'convert s':>11}{'copy s':>8}{'ratio':>7}")
    for layers, r in results.items():
        print(f"{layers:>6}{r['output_mb']:>11.0f}{r['peak_mb']:>9.0f}{r['above_import_mb']:>14.0f}"
              f"{r['seconds']:>11.2f}{r['copy_seconds']:>8.2f}{r['seconds'] / r['copy_seconds']:>7.2f}")
    summary = {
        "peak_mb_4_layers": round(results[4]["peak_mb"], 1),
        "peak_mb_16_layers": round(results[16]["peak_mb"], 1),
        "peak_ratio_16_vs_4": round(results[16]["peak_mb"] / results[4]["peak_mb"], 3),
        "output_ratio_16_vs_4": round(results[16]["output_mb"] / results[4]["output_mb"], 3),
        "convert_vs_copy_16_layers": round(results[16]["seconds"] / results[16]["copy_seconds"], 2),
        "cpu": cpu_description(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
