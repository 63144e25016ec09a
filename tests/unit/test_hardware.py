"""`precision: auto` decides by measurement where the CPU has native bf16, from the flags alone elsewhere; the probe's
result is cached per machine, thread count and width; an explicit precision is never changed, only warned about.
Timings are injected (no test asserts a speed). And the host's other facts: its memory, byte counts for people, a
process dying with its parent."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import subprocess_env
from upcycle import hardware
from upcycle.hardware import (BF16_MIN_SPEEDUP, PROBE_MAX_FLOPS, PROBE_ROWS, REPORTED_FLAGS, cache_file,
                              HostMemory, choose_precision, cpu_description, cpu_has_native_bf16, cpu_info,
                              format_bytes, host_memory, parse_cpuinfo, parse_meminfo, probe,
                              probe_width, resolve_precision)

AVX2_ONLY = frozenset({"avx2", "fma", "f16c"})
AVX512_BF16 = frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})
CPU = torch.device("cpu")
WIDTH = dict(dim=64, ffn_dim=128)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test here has its own, empty probe cache (injected timings must not reach the session's), on a machine
    that counts as quiet (a real load average could change between two calls of one test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(hardware, "_load_average", lambda: 0.0)


def timings(swiglu_fp32: float, swiglu_bf16: float, matmul_fp32: float = 100.0, matmul_bf16: float = 100.0):
    """A stand-in for hardware.measure_seconds: the seconds that give these throughputs (GFLOP/s); it records the
    shapes it was asked to time in `.calls`."""
    calls = []

    def measure(dim: int, ffn_dim: int, rows: int) -> dict[str, float]:
        calls.append((dim, ffn_dim, rows))
        matmul, swiglu = 2 * rows * dim * ffn_dim / 1e9, 18 * rows * dim * ffn_dim / 1e9
        return {"matmul_fp32": matmul / matmul_fp32, "matmul_bf16": matmul / matmul_bf16,
                "swiglu_fp32": swiglu / swiglu_fp32, "swiglu_bf16": swiglu / swiglu_bf16}

    measure.calls = calls
    return measure


def never_called(*args):
    raise AssertionError("the probe ran where it must not")


# -- flags ------------------------------------------------------------------------------------------------------------


def test_native_bf16_needs_a_bf16_flag():
    assert not cpu_has_native_bf16(AVX2_ONLY)
    assert cpu_has_native_bf16(AVX512_BF16)
    assert cpu_has_native_bf16(frozenset({"amx_tile", "amx_bf16"}))
    assert cpu_has_native_bf16(frozenset({"asimd", "bf16"}))  # Arm's Features line


def test_without_native_bf16_auto_is_fp32_and_explicit_bf16_is_kept_with_the_emulation_warning_without_probing():
    auto = resolve_precision("auto", CPU, **WIDTH, flags=AVX2_ONLY, measure=never_called)
    assert auto.precision == "fp32" and auto.warning is None and "without native bf16" in auto.reason
    bf16 = resolve_precision("bf16", CPU, **WIDTH, flags=AVX2_ONLY, measure=never_called)
    assert bf16.precision == "bf16"
    assert "without native bf16" in bf16.warning and "precision fp32 or auto" in bf16.warning
    assert resolve_precision("fp32", CPU, **WIDTH, flags=AVX2_ONLY, measure=never_called).warning is None


def test_on_cuda_auto_is_bf16_without_probing_and_explicit_choices_stay():
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda, **WIDTH, flags=AVX2_ONLY, measure=never_called).precision == "bf16"
    for requested in ("fp32", "bf16"):
        choice = resolve_precision(requested, cuda, **WIDTH, flags=AVX512_BF16, measure=never_called)
        assert (choice.precision, choice.warning) == (requested, None)
    assert not cache_file().exists()


# -- the decision -----------------------------------------------------------------------------------------------------


def test_the_decision_needs_bf16_faster_by_the_margin_and_a_tie_is_fp32():
    assert choose_precision(100.0, 200.0) == "bf16"
    assert choose_precision(100.0, 70.0) == "fp32"
    assert choose_precision(100.0, 100.0) == "fp32"
    assert choose_precision(100.0, 100.0 * BF16_MIN_SPEEDUP) == "bf16"
    assert choose_precision(100.0, 100.0 * BF16_MIN_SPEEDUP * 0.99) == "fp32"


@pytest.mark.parametrize("fp32, bf16, picked", [(100.0, 250.0, "bf16"), (150.0, 105.0, "fp32"), (120.0, 120.0, "fp32")])
def test_auto_picks_what_the_probe_finds_faster_and_says_why_with_both_throughputs(fp32, bf16, picked):
    measure = timings(fp32, bf16, matmul_fp32=148.0, matmul_bf16=130.0)
    choice = resolve_precision("auto", CPU, **WIDTH, flags=AVX512_BF16, measure=measure)
    assert (choice.precision, choice.warning) == (picked, None)
    assert measure.calls == [(64, 128, PROBE_ROWS)]
    assert choice.reason.startswith(f"auto picked {picked}: ")
    assert f"{fp32:.0f} GFLOP/s in fp32 and {bf16:.0f} in bf16" in choice.reason
    assert "148 and 130 GFLOP/s" in choice.reason and f"bf16 needs >= {BF16_MIN_SPEEDUP}x" in choice.reason
    assert str(cache_file()) in choice.reason


@pytest.mark.parametrize("requested, fp32, bf16, warned", [
    ("fp32", 100.0, 300.0, "precision fp32 trains 3.0x slower than bf16"),
    ("bf16", 150.0, 100.0, "precision bf16 trains 1.5x slower than fp32"),
    ("fp32", 100.0, 115.0, None),  # within EXPLICIT_SLOWDOWN_WARNING: no warning
    ("bf16", 100.0, 300.0, None),
    ("fp32", 150.0, 100.0, None),
])
def test_an_explicit_precision_is_never_changed_and_is_warned_about_only_when_much_slower(requested, fp32, bf16,
                                                                                          warned):
    choice = resolve_precision(requested, CPU, **WIDTH, flags=AVX512_BF16, measure=timings(fp32, bf16))
    assert choice.precision == requested
    if warned is None:
        assert choice.warning is None
    else:
        assert choice.warning.startswith(warned) and f"set precision {'fp32' if requested == 'bf16' else 'bf16'}" \
            in choice.warning


def test_a_probe_that_fails_leaves_auto_at_fp32_and_an_explicit_choice_as_it_is():
    def broken(dim, ffn_dim, rows):
        raise RuntimeError("no bf16 kernel for this op\nsecond line")

    auto = resolve_precision("auto", CPU, **WIDTH, flags=AVX512_BF16, measure=broken)
    assert auto.precision == "fp32" and "probe failed" in auto.reason and "no bf16 kernel" in auto.reason
    assert resolve_precision("bf16", CPU, **WIDTH, flags=AVX512_BF16, measure=broken).precision == "bf16"
    assert not cache_file().exists()


# -- the cache --------------------------------------------------------------------------------------------------------


def test_the_cache_lives_under_xdg_cache_home_or_the_home_directory(monkeypatch, tmp_path):
    assert cache_file() == tmp_path / "xdg" / "upcycle" / "precision-probe.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: a relative path is ignored
    assert cache_file() == tmp_path / "home" / ".cache" / "upcycle" / "precision-probe.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_file() == tmp_path / "home" / ".cache" / "upcycle" / "precision-probe.json"


def test_a_cached_result_is_reused_for_the_same_key_and_any_other_key_measures_again(monkeypatch):
    first = timings(100.0, 250.0)
    result, note = probe(**WIDTH, flags=AVX512_BF16, measure=first)
    assert len(first.calls) == 1 and note.startswith("measured now")
    again, note = probe(**WIDTH, flags=AVX512_BF16, measure=never_called)
    assert again == result and note.startswith(f"measured {result.measured}, cached in {cache_file()}")

    other = timings(100.0, 80.0)
    probe(dim=64, ffn_dim=256, flags=AVX512_BF16, measure=other)  # another width
    probe(**WIDTH, flags=AVX512_BF16 | {"amx_bf16"}, measure=other)  # other flags
    for name, value in [("get_num_threads", lambda: 7), ("__version__", "0.0.0-other")]:  # threads, torch version
        with monkeypatch.context() as patch:
            patch.setattr(torch, name, value)
            probe(**WIDTH, flags=AVX512_BF16, measure=other)
    for name, value in [("cpu_info", lambda: ("Another CPU", AVX512_BF16)),  # another CPU model
                        ("PROBE_VERSION", hardware.PROBE_VERSION + 1)]:  # a changed probe
        with monkeypatch.context() as patch:
            patch.setattr(hardware, name, value)
            probe(**WIDTH, flags=AVX512_BF16, measure=other)
    assert len(other.calls) == 6
    assert probe(**WIDTH, flags=AVX512_BF16, measure=never_called)[0] == result  # the first entry is still there
    entries = json.loads(cache_file().read_text())["entries"]
    assert len(entries) == 7 and len({json.dumps(e["key"], sort_keys=True) for e in entries}) == 7


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"entries": 3}', '{"entries": [{"key": {}}]}', ""])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(content):
    path = cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    measure = timings(100.0, 250.0)
    assert resolve_precision("auto", CPU, **WIDTH, flags=AVX512_BF16, measure=measure).precision == "bf16"
    assert len(measure.calls) == 1
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 1 and entries[0]["result"]["swiglu_bf16"] == 250.0
    assert resolve_precision("auto", CPU, **WIDTH, flags=AVX512_BF16, measure=never_called).precision == "bf16"


def test_a_cached_entry_with_impossible_figures_is_measured_again():
    probe(**WIDTH, flags=AVX512_BF16, measure=timings(100.0, 250.0))
    data = json.loads(cache_file().read_text())
    data["entries"][0]["result"]["swiglu_fp32"] = -1.0
    cache_file().write_text(json.dumps(data))
    measure = timings(100.0, 80.0)
    assert probe(**WIDTH, flags=AVX512_BF16, measure=measure)[0].faster == "fp32" and len(measure.calls) == 1


def test_a_result_measured_on_a_busy_machine_is_measured_again_once_it_is_quiet(monkeypatch):
    cores = len(hardware.os.sched_getaffinity(0))
    monkeypatch.setattr(hardware, "_load_average", lambda: float(cores))
    busy, note = probe(**WIDTH, flags=AVX512_BF16, measure=timings(100.0, 90.0))
    assert "busy machine" in note and busy.load_average == cores
    assert probe(**WIDTH, flags=AVX512_BF16, measure=never_called)[0] == busy  # still busy: reused
    monkeypatch.setattr(hardware, "_load_average", lambda: 0.1)
    quiet = timings(100.0, 250.0)
    result, note = probe(**WIDTH, flags=AVX512_BF16, measure=quiet)
    assert len(quiet.calls) == 1 and result.faster == "bf16" and "busy" not in note
    assert probe(**WIDTH, flags=AVX512_BF16, measure=never_called)[0] == result


def test_an_unwritable_cache_still_gives_a_result_and_says_it_was_not_cached(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    choice = resolve_precision("auto", CPU, **WIDTH, flags=AVX512_BF16, measure=timings(100.0, 250.0))
    assert choice.precision == "bf16" and "not cached" in choice.reason


# -- the probe itself -------------------------------------------------------------------------------------------------


def test_the_probe_times_the_models_width_and_scales_only_widths_beyond_its_budget():
    assert probe_width(512, 1408) == (512, 1408)
    dim, ffn_dim = probe_width(4096, 14336)
    assert dim % 64 == 0 and ffn_dim % 64 == 0 and 18 * PROBE_ROWS * dim * ffn_dim <= 1.1 * PROBE_MAX_FLOPS
    assert 3 < ffn_dim / dim < 4  # the aspect ratio is kept


def test_the_real_measurement_times_all_four_ops_at_the_given_shape():
    seconds = hardware.measure_seconds(16, 32, 8)
    assert set(seconds) == {"matmul_fp32", "matmul_bf16", "swiglu_fp32", "swiglu_bf16"}
    assert all(math.isfinite(s) and s > 0 for s in seconds.values())


# -- /proc/cpuinfo ----------------------------------------------------------------------------------------------------


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


# -- the host: memory, byte counts, processes -------------------------------------------------------------------------

MEMINFO = """MemTotal:       16318480 kB
MemFree:          812344 kB
MemAvailable:    9876540 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
Bogus line
"""


def test_meminfo_is_read_in_bytes_and_host_memory_gives_total_and_available(tmp_path):
    fields = parse_meminfo(MEMINFO)
    assert fields["MemTotal"] == 16318480 * 1024 and fields["HugePages_Total"] == 0  # no unit: a count
    assert "Bogus line" not in fields
    (tmp_path / "meminfo").write_text(MEMINFO)
    assert host_memory(tmp_path / "meminfo") == HostMemory(total=16318480 * 1024, available=9876540 * 1024)


def test_without_meminfo_the_memory_comes_from_sysconf(tmp_path):
    pages = os.sysconf("SC_PAGE_SIZE")
    memory = host_memory(tmp_path / "missing")
    assert memory.total == os.sysconf("SC_PHYS_PAGES") * pages and memory.available > 0


def test_this_machines_memory_is_known_and_available_is_at_most_total():
    memory = host_memory()
    assert 0 < memory.available <= memory.total


def test_byte_counts_read_in_binary_units():
    assert format_bytes(0) == "0.0 MiB" and format_bytes(12 * 2**20) == "12.0 MiB"
    assert format_bytes(2**28 - 1) == "256.0 MiB" and format_bytes(2**28) == "0.25 GiB"
    assert format_bytes(62 * 2**30) == "62.00 GiB"


def _state(pid: int) -> str | None:
    """A process's state letter, None once it is gone (a zombie, Z, has died too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="Linux only (PR_SET_PDEATHSIG)")
def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_killed():
    """As experiment --parallel starts its runs: the child's preexec_fn asks for SIGKILL at its parent's death; the
    parent is then SIGKILLed (no chance to clean up) and the child must not live on as an orphan."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, subprocess, sys, time\n"
         "from upcycle.hardware import die_with_parent\n"
         "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
         "                         preexec_fn=die_with_parent(signal.SIGKILL, parent=os.getpid()))\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    child = int(parent.stdout.readline())
    try:
        assert _state(child) not in (None, "Z")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while _state(child) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(child) in (None, "Z"), "the child outlived its parent"
    finally:
        parent.kill()
        if _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="Linux only (PR_SET_PDEATHSIG)")
def test_a_process_whose_parent_is_already_gone_signals_itself_at_once():
    """The launcher died before the request was made (its pid no longer the parent's): nobody would signal later."""
    done = subprocess.run([sys.executable, "-c", "import signal, time\n"
                           "from upcycle.hardware import die_with_parent\n"
                           "die_with_parent(signal.SIGTERM, parent=-1)()\n"
                           "time.sleep(60)"], env=subprocess_env(), timeout=60)
    assert done.returncode == -signal.SIGTERM
