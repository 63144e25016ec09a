"""What this machine computes fast, and what `precision: auto` resolves to.

On a CPU with a bf16 flag (avx512_bf16, AMX, Arm bf16) `auto` measures: `probe` times a matmul and a SwiGLU block in
fp32 and bf16 at the model's width with the process's thread count, and picks bf16 only where the block runs at least
BF16_MIN_SPEEDUP times faster; the result is cached per machine (`cache_file()`). Without the flag `auto` is fp32, on
CUDA bf16, neither probed. Why flags alone do not decide, with the figures per CPU kind: docs/performance.md.

Also the host's other facts, each read in one place: usable cores, memory (`host_memory`), byte counts as people read
them (`format_bytes`), and a process dying with its parent (`die_with_parent`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.files import atomic_write_json

if TYPE_CHECKING:  # torch is imported where it is used: `upcycle --help` and the configs load this module without it
    import torch

# /proc/cpuinfo flags that mean bf16 dot products in hardware: x86 AVX-512 BF16, x86 AMX tiles, Arm's BF16 extension.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# The flags worth printing beside a CPU benchmark figure: what decides fp32 and bf16 matmul speed.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16", "sve")

# `auto` picks bf16 only where the probe's SwiGLU block runs at least this many times faster in bf16 than in fp32.
# Why 1.2 and not 1.0: (1) a tie must stay fp32 (exact, reproducible), and a sub-second probe's spread (a few percent
# on an idle machine, more on a busy one) must not flip the choice between runs; (2) a training step is only ~70%
# matmuls (docs/performance.md), so a 1.2x faster block is about 1.13x per step, roughly the least that pays for
# bf16's rounding; (3) it is the factor beyond which an explicit choice is warned about, so `auto` and the warning
# agree. The CPU kinds measured so far are far from it either way (bf16 at 0.7x and 2.1x of fp32).
BF16_MIN_SPEEDUP = 1.2
# An explicit train.precision is kept as configured, with a warning where the probe says it is more than this many
# times slower than the other dtype.
EXPLICIT_SLOWDOWN_WARNING = 1.2

# The probe's shape: PROBE_ROWS rows (each weight element is reused that many times, so both dtypes are compute-bound
# as in training) at the model's width, unless one SwiGLU forward + backward (18 * rows * dim * ffn_dim FLOPs) would
# exceed PROBE_MAX_FLOPS: wider layers are timed at a width scaled down in proportion, in multiples of 64, to keep the
# probe well under a second on a slow CPU (an 8B model's 4096 x 14336 is timed at 512 x 1728).
PROBE_ROWS = 256
PROBE_MAX_FLOPS = 4e9
PROBE_ROUNDS = 3  # timed rounds after one warm-up round; each op's best time counts
PROBE_BUDGET_S = 0.5  # no further round starts after this long (the first timed round always runs)
PROBE_VERSION = 1  # part of the cache key: results of an older probe are measured again
CACHE_FILE_NAME = "precision-probe.json"  # in $XDG_CACHE_HOME/upcycle (default ~/.cache/upcycle)
CACHE_MAX_ENTRIES = 64  # the newest are kept (one per CPU, torch version, thread count and width)
DTYPES = ("fp32", "bf16")  # the precisions the probe times (torch dtypes: torch.float32, torch.bfloat16)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class HostMemory:
    """This machine's memory in bytes, None where the OS does not say."""

    total: int | None  # physical memory (MemTotal): what a plan or a training run may count on at most
    available: int | None  # what can be allocated now without swapping (MemAvailable): for work about to start


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo's fields in bytes ("MemTotal:  16318480 kB" -> {"MemTotal": 16710123520}); lines that are not
    "NAME: NUMBER [kB]" are skipped."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if not parts or not parts[0].isdigit():
            continue
        fields[name.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return fields


def _sysconf_bytes(pages: str) -> int | None:
    try:
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def host_memory(meminfo: str | os.PathLike = "/proc/meminfo") -> HostMemory:
    """This machine's total and available memory: from `meminfo` (Linux), else from sysconf's page counts."""
    try:
        fields = parse_meminfo(Path(meminfo).read_text())
    except OSError:
        fields = {}
    return HostMemory(total=fields.get("MemTotal") or _sysconf_bytes("SC_PHYS_PAGES"),
                      available=fields.get("MemAvailable") or _sysconf_bytes("SC_AVPHYS_PAGES"))


def format_bytes(size: int | float) -> str:
    """A byte count for messages and tables, in binary units: "1.50 GiB" from 256 MiB up, else "12.0 MiB"."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def die_with_parent(sig: int, *, parent: int) -> Callable[[], None] | None:
    """A function that makes the process calling it receive signal `sig` when its parent dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG), so it does not go on as an orphan; where the parent, pid `parent`, has already died
    (before the request was made, so nobody will signal), it sends `sig` to itself at once. None where the OS has no
    prctl (not Linux), and nothing is done.

    Two uses: a process arming itself (`parent=os.getppid()`, then call it), and a subprocess's preexec_fn (called in
    the parent: `parent=os.getpid()`). The libc function is looked up here, before any fork: a preexec_fn should only
    call what is already loaded."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return arm


@contextlib.contextmanager
def host_threads(ranks_on_host: int):
    """torch's intra-op threads raised to this rank's share of the host's cores for a block of host-side work (filling
    the pieces of an upcycled model), then restored. torchrun sets OMP_NUM_THREADS=1 per rank, which suits training on
    GPUs but leaves the drop-upcycling draws of a large model on one core per rank."""
    import torch

    before = torch.get_num_threads()
    share = max(1, usable_cores() // max(1, ranks_on_host))
    torch.set_num_threads(max(before, share))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# ---------------------------------------------------------------------------------------------------------------------
# The probe: fp32 against bf16 on this CPU, measured


def choose_precision(fp32_gflops: float, bf16_gflops: float) -> str:
    """"bf16" where bf16 ran at least BF16_MIN_SPEEDUP times fp32's throughput, else "fp32" (a tie is fp32)."""
    return "bf16" if bf16_gflops >= BF16_MIN_SPEEDUP * fp32_gflops else "fp32"


def probe_width(dim: int, ffn_dim: int) -> tuple[int, int]:
    """The (dim, ffn_dim) the probe times for a model of this width: the same, or scaled down (see PROBE_MAX_FLOPS)."""
    flops = 18 * PROBE_ROWS * dim * ffn_dim
    if flops <= PROBE_MAX_FLOPS:
        return dim, ffn_dim
    scale = math.sqrt(PROBE_MAX_FLOPS / flops)
    return max(64, round(dim * scale / 64) * 64), max(64, round(ffn_dim * scale / 64) * 64)


@dataclass(frozen=True)
class ProbeResult:
    """What `probe` measured: throughputs in GFLOP/s of one matmul (rows x dim @ dim x ffn_dim, operands in that
    dtype) and of one SwiGLU block's forward + backward (fp32 weights; bf16 under autocast, as training runs it)."""

    dim: int  # the width timed (probe_width of the model's)
    ffn_dim: int
    rows: int
    threads: int
    matmul_fp32: float
    matmul_bf16: float
    swiglu_fp32: float
    swiglu_bf16: float
    seconds: float  # how long the probe took, warm-up included
    measured: str  # when, UTC
    load_average: float | None  # 1-minute load average then: other work on the cores widens the probe's spread

    @property
    def bf16_speedup(self) -> float:
        """SwiGLU block throughput in bf16 over fp32: what `auto` decides by."""
        return self.swiglu_bf16 / self.swiglu_fp32

    @property
    def faster(self) -> str:
        """What `auto` picks from this result."""
        return choose_precision(self.swiglu_fp32, self.swiglu_bf16)

    def describe(self) -> str:
        return (f"a SwiGLU block (forward + backward, dim {self.dim}, ffn {self.ffn_dim}, {self.rows} rows, "
                f"{self.threads} thread{'s' if self.threads > 1 else ''}) ran at {self.swiglu_fp32:.0f} GFLOP/s in "
                f"fp32 and {self.swiglu_bf16:.0f} in bf16 ({self.bf16_speedup:.2f}x; a matmul alone: "
                f"{self.matmul_fp32:.0f} and {self.matmul_bf16:.0f} GFLOP/s)")

    @classmethod
    def from_seconds(cls, seconds: dict[str, float], *, dim: int, ffn_dim: int, rows: int, threads: int,
                     elapsed: float, load_average: float | None) -> ProbeResult:
        """From the best time of each op ("matmul_fp32", "matmul_bf16", "swiglu_fp32", "swiglu_bf16")."""
        flops = {"matmul": 2 * rows * dim * ffn_dim, "swiglu": 18 * rows * dim * ffn_dim}  # fwd 3 matmuls, bwd 6
        gflops = {name: flops[name.split("_")[0]] / max(s, 1e-9) / 1e9 for name, s in seconds.items()}
        return cls(dim=dim, ffn_dim=ffn_dim, rows=rows, threads=threads, seconds=round(elapsed, 3),
                   measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   load_average=load_average,
                   **{name: round(gflops[name], 1) for name in ("matmul_fp32", "matmul_bf16", "swiglu_fp32",
                                                                 "swiglu_bf16")})


def measure_seconds(dim: int, ffn_dim: int, rows: int) -> dict[str, float]:
    """Best wall time of each op over PROBE_ROUNDS rounds (dtypes interleaved, the order reversed every other round,
    after one warm-up round that also lets oneDNN build its kernels), on this CPU with torch's current thread count."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x_RD = torch.randn(rows, dim, generator=gen)
    grad_RD = torch.randn(rows, dim, generator=gen)
    gate_FD, up_FD = (torch.randn(ffn_dim, dim, generator=gen) * dim**-0.5 for _ in range(2))
    down_DF = torch.randn(dim, ffn_dim, generator=gen) * ffn_dim**-0.5
    weights = [w.requires_grad_() for w in (gate_FD, up_FD, down_DF)]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    operands = {name: (x_RD.to(dtypes[name]), gate_FD.detach().to(dtypes[name])) for name in DTYPES}

    def matmul(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                F.linear(*operands[name])  # (R, D) @ (D, F), as nn.Linear computes it

        return run

    def swiglu(name: str) -> Callable[[], None]:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()

        def run() -> None:
            for w in weights:
                w.grad = None
            x = x_RD.detach().requires_grad_()
            with autocast:
                y_RD = F.linear(F.silu(F.linear(x, gate_FD)) * F.linear(x, up_FD), down_DF)
            y_RD.backward(grad_RD.to(y_RD.dtype))

        return run

    ops = {f"{kind}_{name}": make(name) for kind, make in (("matmul", matmul), ("swiglu", swiglu)) for name in DTYPES}
    for run in ops.values():
        run()
    best = dict.fromkeys(ops, math.inf)
    start = time.perf_counter()
    for round_index in range(PROBE_ROUNDS):
        for name in list(ops)[:: 1 if round_index % 2 == 0 else -1]:
            t0 = time.perf_counter()
            ops[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
        if time.perf_counter() - start > PROBE_BUDGET_S:
            break
    return best


def cache_file() -> Path:
    """Where probe results are kept: $XDG_CACHE_HOME/upcycle/precision-probe.json, or ~/.cache/upcycle/... when
    XDG_CACHE_HOME is unset or not absolute (as the XDG base directory spec says). Delete it to measure again."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "upcycle" / CACHE_FILE_NAME


def probe_key(dim: int, ffn_dim: int, *, flags: frozenset[str] | None = None, threads: int | None = None) -> dict:
    """What a cached result is valid for: this probe's version, the CPU model and flags, torch's version, the thread
    count and the model's width."""
    import torch

    model, own_flags = cpu_info()
    flags = own_flags if flags is None else flags
    return {"probe": PROBE_VERSION, "cpu": model,
            "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "torch": torch.__version__, "threads": threads or torch.get_num_threads(), "dim": dim, "ffn_dim": ffn_dim}


def _read_cache(path: Path) -> list[dict]:
    """The cache file's entries; none where it is missing or unreadable (a broken file is rewritten at the next
    store)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("key"), dict)
            and isinstance(e.get("result"), dict)]


def _result_of(entry: dict) -> ProbeResult | None:
    """The entry's result, or None where it is not a complete one with positive, finite throughputs."""
    try:
        result = ProbeResult(**entry["result"])
    except TypeError:
        return None
    throughputs = (result.matmul_fp32, result.matmul_bf16, result.swiglu_fp32, result.swiglu_bf16)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in throughputs):
        return None
    return result


def _store(path: Path, key: dict, result: ProbeResult) -> None:
    """Add (or replace) the entry for `key`, written atomically: a concurrent reader sees the old file or the new."""
    entries = [e for e in _read_cache(path) if e["key"] != key][-(CACHE_MAX_ENTRIES - 1):]
    entries.append({"key": key, "cpu": cpu_description(), "result": asdict(result)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"entries": entries}, indent=1)


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _busy(load_average: float | None) -> bool:
    """Whether a 1-minute load average means other work competed for every core (then timings are unreliable)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load_average is not None and load_average >= cores


def probe(dim: int, ffn_dim: int, *, flags: frozenset[str] | None = None,
          measure: Callable[[int, int, int], dict[str, float]] | None = None) -> tuple[ProbeResult, str]:
    """fp32 against bf16 on this CPU for a model of width (dim, ffn_dim): the cached result for this CPU, torch
    version, thread count and width, or a fresh measurement (then cached). Returns it and a note on where it came
    from. `measure` (the timing itself, default measure_seconds) is replaceable so that tests can inject timings.

    A result measured while the machine was busy (a load average of at least one per core) is kept only until the
    machine is quiet: then it is measured again, so that a busy moment does not decide for good."""
    path = cache_file()
    key = probe_key(dim, ffn_dim, flags=flags)
    load = _load_average()  # before the probe adds its own
    for entry in _read_cache(path):
        if entry["key"] == key and (cached := _result_of(entry)) is not None:
            if not _busy(cached.load_average) or _busy(load):
                busy = f" on a busy machine (load average {cached.load_average})" if _busy(cached.load_average) else ""
                return cached, f"measured {cached.measured}{busy}, cached in {path} (delete it to measure again)"
            break
    rows, (width, ffn_width) = PROBE_ROWS, probe_width(dim, ffn_dim)
    start = time.perf_counter()
    seconds = (measure or measure_seconds)(width, ffn_width, rows)
    result = ProbeResult.from_seconds(seconds, dim=width, ffn_dim=ffn_width, rows=rows, threads=key["threads"],
                                      elapsed=time.perf_counter() - start, load_average=load)
    note = f"measured now in {result.seconds:.2f} s"
    if _busy(load):
        note += f" on a busy machine (load average {load}; measured again once it is quiet)"
    try:
        _store(path, key, result)
    except OSError as error:
        return result, f"{note}, not cached ({path}: {error.strerror or error})"
    return result, f"{note}, cached in {path} (delete it to measure again)"


# ---------------------------------------------------------------------------------------------------------------------
# What train.precision resolves to


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" or "bf16": what to train in
    reason: str  # what was chosen and why, one line for the start-up log
    warning: str | None = None  # to print once: the configured precision is the slower one here


# NVIDIA GPUs compute bf16 natively from compute capability 8.0 (Ampere: A100, A10, RTX 30xx) on; V100 (7.0) and T4
# (7.5) emulate it, far slower than fp32 (with TF32 absent there too).
CUDA_BF16_MIN_CAPABILITY = (8, 0)


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None


def cuda_precision(requested: str, capability: tuple[int, int] | None) -> PrecisionChoice:
    """train.precision on a GPU of this compute capability: `auto` is bf16 where the GPU has bf16 arithmetic (8.0 and
    newer), else fp32; an explicit bf16 on an older GPU is kept with a warning."""
    if capability is None:  # planning for a GPU from a machine without one
        return PrecisionChoice("bf16", "auto on CUDA: bf16, assuming a GPU with native bf16 (compute capability 8.0 "
                                       "or newer; older GPUs train in fp32)") if requested == "auto" \
            else PrecisionChoice(requested, "as configured")
    native = tuple(capability) >= CUDA_BF16_MIN_CAPABILITY
    name = f"compute capability {capability[0]}.{capability[1]}"
    if requested == "auto":
        return PrecisionChoice("bf16", f"auto on CUDA ({name}): bf16, not probed") if native else PrecisionChoice(
            "fp32", f"auto on CUDA ({name}): fp32, as bf16 is native only from compute capability 8.0 (Ampere) on")
    warning = None if native or requested == "fp32" else (
        f"precision bf16 on a GPU of {name}: bf16 is emulated there (native from 8.0, Ampere, on) and slower than "
        "fp32; use precision fp32 or auto")
    return PrecisionChoice(requested, "as configured", warning)


def resolve_precision(requested: str, device: torch.device, *, dim: int, ffn_dim: int,
                      flags: frozenset[str] | None = None,
                      measure: Callable[[int, int, int], dict[str, float]] | None = None) -> PrecisionChoice:
    """The precision to train a model of width (dim, ffn_dim; for an MoE, the expert's) in on `device`, for
    train.precision `requested` ("auto", "fp32" or "bf16").

    "auto": bf16 on CUDA and other accelerators, fp32 on a CPU without native bf16 (no probe), and on a CPU with it,
    what `probe` finds faster (see BF16_MIN_SPEEDUP). An explicit "fp32" or "bf16" is never changed, but warned about
    where it is the slower one by more than EXPLICIT_SLOWDOWN_WARNING, or (bf16) where the CPU emulates it."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {requested!r}")
    if device.type == "cuda":
        return cuda_precision(requested, _cuda_capability(device))
    if device.type != "cpu":
        return PrecisionChoice("bf16", f"auto on {device.type}: bf16, not probed") if requested == "auto" \
            else PrecisionChoice(requested, "as configured")
    flags = cpu_info()[1] if flags is None else flags
    described = cpu_description((cpu_info()[0], flags))
    if not cpu_has_native_bf16(flags):
        if requested == "auto":
            return PrecisionChoice("fp32", f"auto on a CPU without native bf16 ({described}): fp32, not probed "
                                           "(torch emulates bf16 there, measured ~70x slower than fp32)")
        warning = None if requested == "fp32" else (
            f"precision bf16 on a CPU without native bf16 ({described}): torch emulates bf16 matmuls there, measured "
            "~70x slower than fp32 on an AVX2-only CPU; use precision fp32 or auto")
        return PrecisionChoice(requested, "as configured", warning)
    try:
        result, source = probe(dim, ffn_dim, flags=flags, measure=measure)
    except RuntimeError as error:  # a torch build without a bf16 kernel the probe needs: train as if no probe said
        failed = f"the fp32/bf16 probe failed on {described} ({str(error).splitlines()[0][:200]})"
        return PrecisionChoice("fp32", f"auto: fp32, as {failed}") if requested == "auto" \
            else PrecisionChoice(requested, f"as configured; {failed}")
    measured = f"{result.describe()} on {described}; {source}"
    if requested == "auto":
        return PrecisionChoice(result.faster, f"auto picked {result.faster}: {measured}; bf16 needs >= "
                                              f"{BF16_MIN_SPEEDUP}x")
    other = "fp32" if requested == "bf16" else "bf16"
    slowdown = result.bf16_speedup if requested == "fp32" else 1 / result.bf16_speedup
    warning = None
    if slowdown > EXPLICIT_SLOWDOWN_WARNING:
        warning = (f"precision {requested} trains {slowdown:.1f}x slower than {other} would on this CPU ({measured}); "
                   f"set precision {other} or auto for speed")
    return PrecisionChoice(requested, f"as configured; {measured}", warning)
