"""`precision: auto` and the bf16 warning follow the CPU's flags: bf16 only where it runs in hardware."""

from __future__ import annotations

import torch

from upcycle.hardware import cpu_description, cpu_has_native_bf16, resolve_precision

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


def test_cpu_description_names_the_flags_of_this_machine():
    line = cpu_description()
    assert "flags:" in line and line.split("flags:")[0].strip()
