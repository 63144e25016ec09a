"""`precision: auto` and the bf16 warning follow the CPU's flags: bf16 only where it runs in hardware."""

from __future__ import annotations

from pathlib import Path

import torch

from upcycle.hardware import (REPORTED_FLAGS, cpu_description, cpu_has_native_bf16, cpu_info, parse_cpuinfo,
                              resolve_precision)

AVX2_ONLY = frozenset({"avx2", "fma", "f16c"})
AVX512_BF16 = frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})
CPU = torch.device("cpu")


def test_native_bf16_needs_a_bf16_flag():
    assert not cpu_has_native_bf16(AVX2_ONLY)
    assert cpu_has_native_bf16(AVX512_BF16)
    assert cpu_has_native_bf16(frozenset({"amx_tile", "amx_bf16"}))
    assert cpu_has_native_bf16(frozenset({"asimd", "bf16"}))  # Arm's Features line


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_bf16_elsewhere():
    assert resolve_precision("auto", CPU, flags=AVX2_ONLY) == ("fp32", None)
    assert resolve_precision("auto", CPU, flags=AVX512_BF16) == ("bf16", None)
    assert resolve_precision("auto", torch.device("cuda"), flags=AVX2_ONLY) == ("bf16", None)


def test_explicit_bf16_without_native_support_is_kept_with_a_warning_naming_the_fix():
    precision, warning = resolve_precision("bf16", CPU, flags=AVX2_ONLY)
    assert precision == "bf16"
    assert "without native bf16" in warning and "precision fp32 or auto" in warning
    assert resolve_precision("bf16", CPU, flags=AVX512_BF16) == ("bf16", None)
    assert resolve_precision("fp32", CPU, flags=AVX512_BF16) == ("fp32", None)


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd sve bf16 i8mm
CPU implementer\t: 0x41
Model name\t: Neoverse-V1
"""


def test_cpuinfo_is_read_for_the_first_cpu_on_x86_and_arm():
    assert parse_cpuinfo(X86) == ("Intel(R) Xeon(R) Processor", frozenset(
        "fpu sse2 avx2 fma f16c avx512f avx512_bf16 amx_tile amx_bf16 amx_int8".split()))
    assert parse_cpuinfo(ARM) == ("Neoverse-V1", frozenset("fp asimd sve bf16 i8mm".split()))
    assert parse_cpuinfo("") == ("unknown", frozenset())


def test_cpu_description_lists_exactly_the_reported_flags_in_order():
    assert cpu_description(parse_cpuinfo(X86)) == ("Intel(R) Xeon(R) Processor; flags: avx2 fma f16c avx512f "
                                                   "avx512_bf16 amx_tile amx_bf16")
    assert cpu_description(parse_cpuinfo(ARM)) == "Neoverse-V1; flags: bf16 sve"
    assert cpu_description(("Old CPU", frozenset({"sse2"}))) == "Old CPU; flags: none of " + " ".join(REPORTED_FLAGS)


def test_this_machines_description_matches_its_cpuinfo():
    text = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").is_file() else ""
    model, flags = parse_cpuinfo(text) if text else cpu_info()
    assert cpu_info() == (model, flags)
    present = [flag for flag in REPORTED_FLAGS if flag in flags]
    assert cpu_description().startswith(model + "; flags: ")
    assert cpu_description().endswith(" ".join(present) if present else " ".join(REPORTED_FLAGS))
