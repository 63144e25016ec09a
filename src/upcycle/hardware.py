"""What this machine computes fast: whether the CPU has native bf16, and what `precision: auto` resolves to.

bf16 matmuls are fast only where the hardware has bf16 instructions (x86: avx512_bf16 or AMX; Arm: the bf16
extension). Elsewhere torch emulates them: on an AVX2-only CPU a bf16 matmul ran ~70x slower than fp32. So `auto`
means bf16 on CUDA and on CPUs with native bf16, fp32 on every other CPU.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

# /proc/cpuinfo flags that mean bf16 dot products in hardware: x86 AVX-512 BF16, x86 AMX tiles, Arm's BF16 extension.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# The flags worth printing beside a CPU benchmark figure: what decides fp32 and bf16 matmul speed.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16", "sve")


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU listed in /proc/cpuinfo's text (x86 "model name"/"flags", Arm
    "Model name"/"Features")."""
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's first CPU; (the platform's name, {}) where there is no /proc/cpuinfo."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return platform.processor() or "unknown", frozenset()
    return parse_cpuinfo(path.read_text(errors="replace"))


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU has bf16 arithmetic in hardware (see NATIVE_BF16_FLAGS)."""
    flags = cpu_info()[1] if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def cpu_description(info: tuple[str, frozenset[str]] | None = None) -> str:
    """One line for benchmark output: the CPU model and the flags that decide matmul speed (of this machine, or of
    `info` as `cpu_info` returns it)."""
    model, flags = cpu_info() if info is None else info
    present = [flag for flag in REPORTED_FLAGS if flag in flags]
    return f"{model}; flags: {' '.join(present) if present else 'none of ' + ' '.join(REPORTED_FLAGS)}"


def resolve_precision(requested: str, device: torch.device, *,
                      flags: frozenset[str] | None = None) -> tuple[str, str | None]:
    """The precision to train in ("fp32" or "bf16") for `requested` ("auto", "fp32" or "bf16") on `device`, and a
    warning to print once (or None): bf16 asked for on a CPU without native bf16 is honoured but warned about."""
    if requested == "fp32":
        return "fp32", None
    if device.type != "cpu":
        return "bf16", None
    if cpu_has_native_bf16(flags):
        return "bf16", None
    if requested == "auto":
        return "fp32", None
    return "bf16", (f"precision bf16 on a CPU without native bf16 ({cpu_description()}): torch emulates bf16 "
                    "matmuls there, measured ~70x slower than fp32 on an AVX2-only CPU; use precision fp32 or auto")
