"""One-shot GPU check of the MoE path: correctness of every kernel, layer timing, and a short training run with MFU.

    PYTHONPATH=src python benchmarks/gpu_check.py                 # on one CUDA GPU, about 3-5 minutes, at most ~7
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --tiny   # smoke test with tiny shapes (seconds)

Parts, each in its own try/except so one failure still reports the others, all under one time budget (--budget-s):
  (a) correctness: every MoE implementation in upcycle.model.moe against the per-expert reference loop, outputs and all
      gradients, with fp32 weights, bf16 weights and fp32 weights under bf16 autocast; on CUDA also whether the
      "auto" kernel's forward+backward synchronizes with the host (torch.cuda.set_sync_debug_mode).
  (b) layer timing, bf16, fwd+bwd at the 8x1.5B shape (D=2048, F=7168, E=8, k=2, 16384 tokens): ours against an
      equal-FLOP dense SwiGLU (ffn_dim = k*F) and transformers' MixtralSparseMoeBlock with its grouped_mm experts
      backend; CUDA events, warm-up, interleaved shuffled repeats, medians.
  (c) training: 20 AdamW steps of an 8x152M-shaped MoE (D 512, 12 layers, F 2048, 8 heads, 8 experts top-2) through
      upcycle.model.transformer.Transformer under bf16 autocast, eager and then with each block compiled; tokens/s and
      MFU.
  (d) one JSON line (the last line of stdout) with every figure, the torch and CUDA versions and the GPU name.

MFU = model FLOPs / time / the GPU's dense bf16 peak (looked up from the device name: H100 SXM 989 TFLOP/s, H100 PCIe
756, H100/H200 NVL 835, H200 989, A100 312; --peak-tflops overrides). Model FLOPs per token = 6 x active parameters
(the input embedding table excluded: a lookup is no matmul) + 12 x layers x attention width x sequence length
(attention scores and values, forward and backward, no causal discount: the PaLM convention).
Imports: torch, transformers and this repository's package only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import upcycle  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from upcycle.hardware import cpu_description, resolve_precision  # noqa: E402
from upcycle.train.losses import cross_entropy, load_balancing_loss  # noqa: E402
from upcycle.model.transformer import FeedForward, ModelConfig, Transformer  # noqa: E402
from upcycle.model.moe import IMPLEMENTATIONS, MoE, expert_ffn_sorted, resolve_impl, sort_by_expert  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; first match wins.
BF16_PEAKS = (
    ("H100 PCIE", 756.0, "H100 PCIe"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H200 NVL", 835.0, "H200 NVL"),
    ("H200", 989.0, "H200 (SXM)"),
    ("H100", 989.0, "H100 SXM"),
    ("A100", 312.0, "A100"),
)


class OutOfTime(Exception):
    """The global time budget ran out inside a part."""


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def bf16_peak(device_name: str) -> tuple[float | None, str]:
    upper = device_name.upper()
    for key, tflops, label in BF16_PEAKS:
        if key in upper:
            return tflops, label
    return None, "unknown GPU: pass --peak-tflops for MFU"


class Clock:
    """Times callables: CUDA events on a GPU (no host sync inside the timed region), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def interleaved(self, steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                    deadline: float) -> dict[str, float]:
        """name -> median milliseconds; each repeat runs every step once, in a shuffled order."""
        for _ in range(warmup):
            for step in steps.values():
                step()
        self.sync()
        times: dict[str, list[float]] = {name: [] for name in steps}
        order, rng = list(steps), random.Random(0)
        for repeat in range(repeats):
            if repeat >= 2 and time.monotonic() > deadline:
                log(f"  stopping after {repeat} repeats (time budget)")
                break
            rng.shuffle(order)
            if self.device.type == "cuda":
                events = []
                for name in order:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    steps[name]()
                    end.record()
                    events.append((name, start, end))
                torch.cuda.synchronize(self.device)
                for name, start, end in events:
                    times[name].append(start.elapsed_time(end))
            else:
                for name in order:
                    t0 = time.perf_counter()
                    steps[name]()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------------------------------------------------- (a)

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in fp64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def moe_results(moe: MoE, impl: str, x_TD: torch.Tensor, grad_TD: torch.Tensor, autocast: bool) -> dict:
    """Output and every gradient of one forward+backward with kernel `impl`."""
    moe.zero_grad(set_to_none=True)
    moe.impl = impl
    x = x_TD.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = moe(x)
    (out.out_TD.float() * grad_TD).sum().backward()
    result = {"out": out.out_TD.detach().float(), "x.grad": x.grad.float()}
    result.update({f"{name}.grad": p.grad.float() for name, p in moe.named_parameters()})
    result["counts"] = out.counts_E
    return result


def part_correctness(device: torch.device, tiny: bool) -> dict:
    T, D, F, E, K = (32, 16, 24, 4, 2) if tiny else (2048, 256, 512, 8, 2)
    torch.manual_seed(0)
    base = MoE(D, F, E, K).to(device)
    base.init_weights(0.05)
    with torch.no_grad():  # the last expert never wins: the kernels must handle an empty expert
        base.router.weight[-1] = -10.0 * base.router.weight[:-1].abs().sum(dim=0)
    x_TD = torch.randn(T, D, device=device).abs()
    grad_TD = torch.randn(T, D, device=device)
    impls = [impl for impl in IMPLEMENTATIONS if impl != "reference"]
    modes = {"fp32": (torch.float32, False), "bf16_weights": (torch.bfloat16, False),
             "fp32_weights_bf16_autocast": (torch.float32, True)}
    report: dict = {"shape": dict(T=T, D=D, F=F, E=E, K=K),
                    "auto_resolves_to": resolve_impl("auto", device, torch.bfloat16),
                    "cases": {}, "failures": []}
    for mode, (dtype, autocast) in modes.items():
        moe = MoE(D, F, E, K).to(device=device, dtype=dtype)
        moe.load_state_dict(base.state_dict())
        x = x_TD.to(dtype)
        # the truth: the fp32 reference loop on exact fp32 copies of these (possibly bf16) weights and inputs
        truth_moe = MoE(D, F, E, K).to(device)
        truth_moe.load_state_dict({k: v.float() for k, v in moe.state_dict().items()})
        truth = moe_results(truth_moe, "reference", x.float(), grad_TD, autocast=False)
        low_precision = dtype == torch.bfloat16 or autocast
        baseline = None
        if low_precision:  # the reference loop in the same precision: how far rounding alone moves it
            ref_same = moe_results(moe, "reference", x, grad_TD, autocast=autocast)
            baseline = {k: rel_err(v, truth[k]) for k, v in ref_same.items() if k != "counts"}
        for impl in impls:
            key = f"{mode}/{impl}"
            try:
                got = moe_results(moe, impl, x, grad_TD, autocast=autocast)
                errors = {k: rel_err(v, truth[k]) for k, v in got.items() if k != "counts"}
                if low_precision:
                    limits = {k: max(2e-2, 3 * baseline[k]) for k in errors}
                else:
                    limits = {k: 1e-5 for k in errors}
                ok = all(errors[k] <= limits[k] for k in errors) and torch.equal(got["counts"], truth["counts"])
                report["cases"][key] = {"ok": ok, "max_rel_err": max(errors.values()),
                                        "worst": max(errors, key=lambda k: errors[k] / limits[k]),
                                        "reference_same_precision_max_rel_err":
                                            max(baseline.values()) if baseline else None}
                if not ok:
                    report["failures"].append(key)
                log(f"  (a) {key:38s} {'ok  ' if ok else 'FAIL'} max rel err {max(errors.values()):.2e}"
                    + (f" (reference loop in this precision: {max(baseline.values()):.2e})" if baseline else ""))
            except OutOfTime:
                raise
            except Exception as exc:  # noqa: BLE001 - report every kernel, whatever fails
                report["cases"][key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
                report["failures"].append(key)
                log(f"  (a) {key:38s} ERROR {type(exc).__name__}: {str(exc)[:300]}")
    if device.type == "cuda":
        try:
            report["auto_host_syncs"] = host_sync_check(base, x_TD.to(torch.bfloat16), grad_TD)
        except OutOfTime:
            raise
        except Exception as exc:  # noqa: BLE001 - informative only, not a correctness failure
            report["auto_host_syncs"] = f"check failed: {type(exc).__name__}: {exc}"[:300]
        log(f"  (a) auto ({report['auto_resolves_to']}) fwd+bwd host syncs: {report['auto_host_syncs']}")
    report["ok"] = not report["failures"]
    return report


def host_sync_check(base: MoE, x_TD: torch.Tensor, grad_TD: torch.Tensor) -> str:
    """'none' when forward+backward of impl "auto" in bf16 runs with torch's sync debug mode set to error."""
    moe = MoE(base.router.in_features, base.down_EFD.shape[1], base.num_experts, base.top_k).to(x_TD.device)
    moe.load_state_dict(base.state_dict())
    moe = moe.to(torch.bfloat16)
    moe_results(moe, "auto", x_TD, grad_TD, autocast=False)  # warm-up: lazy inits may sync once
    torch.cuda.synchronize()
    x = x_TD.detach().clone().requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe(x).out_TD
        out.backward(grad_TD.to(out.dtype))
        return "none"
    except RuntimeError as exc:
        return f"synchronizes: {str(exc).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------------------------------------------------- (b)

def hf_block(moe: MoE, impl: str) -> torch.nn.Module:
    """transformers' MixtralSparseMoeBlock holding the same weights as `moe`, with experts backend `impl`
    (what from_pretrained(experts_implementation=...) sets), as in benchmarks/moe_layer.py."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, D, F2 = moe.gate_up_ED2F.shape
    config = MixtralConfig(hidden_size=D, intermediate_size=F2 // 2, num_local_experts=E, num_experts_per_tok=moe.top_k)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config).to(device=moe.gate_up_ED2F.device, dtype=moe.gate_up_ED2F.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.gate_up_ED2F.transpose(1, 2))
        block.experts.down_proj.copy_(moe.down_EFD.transpose(1, 2))
    return block


def part_layer(device: torch.device, tiny: bool, dtype: torch.dtype, deadline: float, clock: Clock) -> dict:
    T, D, F, E, K = (128, 32, 64, 8, 2) if tiny else (16384, 2048, 7168, 8, 2)
    repeats, warmup = (2, 1) if tiny else (30, 3)
    torch.manual_seed(0)
    moe = MoE(D, F, E, K).to(device)
    moe.init_weights(0.02)
    moe = moe.to(dtype)
    dense = FeedForward(D, K * F).to(device)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = dense.to(dtype)
    x_TD = torch.randn(T, D, device=device, dtype=dtype)
    grad_TD = torch.randn(T, D, device=device, dtype=dtype)
    auto = resolve_impl("auto", device, torch.bfloat16)

    def fwd_bwd(module: torch.nn.Module, call: Callable, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            call(module, x.detach().requires_grad_(True)).backward(grad)
        return step

    def ours(impl: str) -> Callable:
        def call(m: MoE, x: torch.Tensor) -> torch.Tensor:
            m.impl = impl
            return m(x).out_TD
        return call

    steps = {"dense": fwd_bwd(dense, lambda m, x: m(x), x_TD, grad_TD)}
    for impl in dict.fromkeys((auto, "grouped_mm", "fused")):
        steps[f"ours_{impl}"] = fwd_bwd(moe, ours(impl), x_TD, grad_TD)
    # the floor: expert matmuls + SwiGLU alone on rows already sorted by expert
    with torch.no_grad():
        ids_TK = moe(x_TD).router_logits_TE.topk(K, dim=-1).indices
    order_S, counts_E = sort_by_expert(ids_TK, E)
    x_SD = x_TD[order_S // K].contiguous()
    grad_SD = torch.randn_like(x_SD)
    steps[f"experts_only_{auto}"] = fwd_bwd(
        moe, lambda m, x: expert_ffn_sorted(x, counts_E, m.gate_up_ED2F, m.down_EFD, impl=auto), x_SD, grad_SD)
    report: dict = {"shape": dict(T=T, D=D, F=F, E=E, K=K), "dtype": str(dtype).removeprefix("torch."),
                    "auto": auto, "repeats": repeats, "warmup": warmup}
    def hf_call(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = m(x)
        return out[0] if isinstance(out, tuple) else out  # (hidden, router logits) in some transformers versions

    try:
        hf = hf_block(moe, "grouped_mm")
        report["hf_experts_backend"] = "grouped_mm"
        hf_step = fwd_bwd(hf, hf_call, x_TD.view(1, T, D), grad_TD.view(1, T, D))
        hf_step()  # fails here, not inside the timing loop, if this transformers version differs
        steps["hf_grouped_mm"] = hf_step
    except Exception as exc:  # noqa: BLE001 - still time ours against dense
        report["hf_error"] = f"{type(exc).__name__}: {exc}"[:500]
        log(f"  (b) transformers' block unavailable: {report['hf_error']}")
    ms = clock.interleaved(steps, repeats, warmup, deadline)
    flops = 6 * T * K * 3 * D * F  # the expert (and equal-FLOP dense) matmuls, forward and backward
    for name, value in ms.items():
        log(f"  (b) {name:24s} {value:9.2f} ms  {value / ms['dense']:5.2f}x dense  "
            f"{flops / value / 1e9:7.1f} TFLOP/s (matmul FLOPs)")
    report["ms"] = {k: round(v, 3) for k, v in ms.items()}
    ours_ms = ms[f"ours_{auto}"]
    report["moe_vs_dense"] = round(ours_ms / ms["dense"], 3)
    report["routing_overhead_share"] = round((ours_ms - ms[f"experts_only_{auto}"]) / ours_ms, 3)
    report["ours_tflops"] = round(flops / ours_ms / 1e9, 1)
    report["dense_tflops"] = round(flops / ms["dense"] / 1e9, 1)
    if "hf_grouped_mm" in ms:
        report["speedup_vs_hf_grouped_mm"] = round(ms["hf_grouped_mm"] / ours_ms, 3)
    log(f"  (b) ours ({auto}) = {report['moe_vs_dense']}x dense, "
        f"{report.get('speedup_vs_hf_grouped_mm', 'n/a')}x faster than transformers' grouped_mm block, "
        f"routing overhead {report['routing_overhead_share']:.0%}")
    return report


# ---------------------------------------------------------------------------------------------------------- (c)

def model_flops_per_token(model: Transformer, seq_len: int) -> float:
    c = model.config
    active = model.num_active_params() - model.tok_embeddings.weight.numel()
    attention = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len
    return 6 * active + attention


def part_train(device: torch.device, tiny: bool, args: argparse.Namespace, precision: str, compile_blocks: bool,
               peak_tflops: float | None, deadline: float, clock: Clock) -> dict:
    if tiny:
        config = ModelConfig(vocab_size=128, dim=32, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=64,
                             num_experts=8, top_k=2, max_seq_len=32)
        batch, seq, steps, warmup = 2, 32, 2, 1
    else:
        config = ModelConfig(vocab_size=args.vocab, dim=512, num_layers=12, num_heads=8, num_kv_heads=8,
                             ffn_dim=2048, num_experts=8, top_k=2, max_seq_len=args.seq)
        batch, seq, steps, warmup = args.batch, args.seq, args.steps, 3
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    if compile_blocks:
        for block in model.layers:
            block.compile()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)
    generator = torch.Generator(device=device).manual_seed(0)
    bf16 = precision == "bf16"

    def step() -> torch.Tensor:
        ids_BT = torch.randint(config.vocab_size, (batch, seq + 1), device=device, generator=generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(ids_BT[:, :-1])
        loss = (cross_entropy(logits_BTV=out.logits, labels_BT=ids_BT[:, 1:])
                + 0.01 * load_balancing_loss(router_logits=out.router_logits, top_k=config.top_k))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.monotonic()
    for i in range(warmup):
        first_loss = step()
        clock.sync()
        if i == 0:
            log(f"  (c) first step done in {time.monotonic() - t0:.1f} s (compile={compile_blocks})")
    if time.monotonic() > deadline:
        raise OutOfTime("no time left after the warm-up steps")
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        done = 0
        for done in range(1, steps + 1):
            losses.append(step())
            if done >= 5 and time.monotonic() > deadline:
                break
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        t1 = time.perf_counter()
        done = 0
        for done in range(1, steps + 1):
            losses.append(step())
        seconds = time.perf_counter() - t1
    tokens = done * batch * seq
    tokens_per_s = tokens / seconds
    flops_per_token = model_flops_per_token(model, seq)
    achieved = flops_per_token * tokens_per_s / 1e12
    report = {
        "config": dict(vocab=config.vocab_size, dim=config.dim, layers=config.num_layers, heads=config.num_heads,
                       ffn_dim=config.ffn_dim, experts=config.num_experts, top_k=config.top_k),
        "batch": batch, "seq": seq, "steps_timed": done, "precision": precision, "compiled_blocks": compile_blocks,
        "moe_impl": resolve_impl("auto", device, torch.bfloat16),
        "params": model.num_params(), "active_params": model.num_active_params(),
        "flops_per_token": flops_per_token, "tokens_per_s": round(tokens_per_s, 1),
        "ms_per_step": round(seconds / done * 1e3, 2), "model_tflops": round(achieved, 2),
        "mfu": round(achieved / peak_tflops, 4) if peak_tflops else None,
        "loss_first": round(float(first_loss), 4), "loss_last": round(float(losses[-1]), 4),
        "setup_and_warmup_s": round(time.monotonic() - t0 - seconds, 1),
    }
    if device.type == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if not math.isfinite(report["loss_last"]):
        raise RuntimeError(f"training loss is not finite: {report['loss_last']}")
    mfu = f"{report['mfu']:.1%}" if report["mfu"] is not None else "n/a (unknown peak)"
    log(f"  (c) compile={compile_blocks}: {report['tokens_per_s']:,.0f} tokens/s, {report['ms_per_step']} ms/step, "
        f"{report['model_tflops']} TFLOP/s, MFU {mfu}, loss {report['loss_first']} -> {report['loss_last']}")
    return report


# ---------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test that runs in seconds")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="time budget for all parts (default 360 s); a watchdog ends the run 45 s after it")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, TFLOP/s")
    parser.add_argument("--vocab", type=int, default=8192, help="training vocabulary (ours 8192, the paper 99584)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="sequences per training step")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (after 3 warm-up steps)")
    parser.add_argument("--no-compile", action="store_true", help="skip the training run with compiled blocks")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    results: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
                     "tiny": args.tiny, "errors": {}}
    printed = threading.Event()

    def emit() -> None:
        if not printed.is_set():
            printed.set()
            results["elapsed_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(results, default=str), flush=True)

    log(f"torch {torch.__version__}, torch.version.cuda {torch.version.cuda}, python {sys.version.split()[0]}")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = (f"CUDA is not available (torch {torch.__version__}, torch.version.cuda {torch.version.cuda}, "
                      f"{torch.cuda.device_count()} devices): install a CUDA build of torch and check nvidia-smi, "
                      "or run the CPU smoke test with --device cpu --tiny")
            log(f"ERROR: {reason}")
            results["errors"]["setup"] = reason
            emit()
            return 2
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        results.update(gpu=name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1))
        peak, source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else bf16_peak(name)
        log(f"GPU {name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{results['memory_gib']} GiB); bf16 dense peak {peak} TFLOP/s ({source})")
        precision = "bf16"
    else:
        results["cpu"] = cpu_description()
        peak, source = args.peak_tflops, "--peak-tflops" if args.peak_tflops else "none for CPUs"
        choice = resolve_precision("auto", device, dim=32 if args.tiny else 512, ffn_dim=64 if args.tiny else 2048)
        precision = choice.precision
        log(f"CPU {results['cpu']}; precision {precision}: {choice.reason}")
    results.update(peak_tflops_bf16=peak, peak_source=source, precision=precision)
    layer_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if layer_dtype != torch.bfloat16:
        log("note: precision auto is fp32 on this CPU, so the layer timing runs in fp32 (a smoke test only)")

    # The time guard: SIGALRM interrupts a part at the budget (it then reports what it has); a watchdog thread
    # prints the JSON gathered so far and exits if the process is stuck in a call that never returns to Python.
    def on_alarm(signum, frame):
        raise OutOfTime(f"time budget of {args.budget_s:.0f} s used up")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s)

    def watchdog() -> None:
        if not finished.wait(args.budget_s + 45):
            log("watchdog: still running 45 s after the budget; printing what was measured and exiting")
            results["errors"]["watchdog"] = "killed by the watchdog"
            emit()
            os._exit(3)

    finished = threading.Event()
    threading.Thread(target=watchdog, daemon=True).start()
    clock = Clock(device)

    parts: list[tuple[str, Callable[[], dict], float]] = [
        ("correctness", lambda: part_correctness(device, args.tiny), 0),
        ("layer", lambda: part_layer(device, args.tiny, layer_dtype, deadline - 0.45 * args.budget_s, clock), 0),
        ("train", lambda: part_train(device, args.tiny, args, precision, False, peak,
                                     deadline - 0.3 * args.budget_s, clock), 0.15),
        ("train_compiled", lambda: part_train(device, args.tiny, args, precision, True, peak, deadline, clock), 0.25),
    ]
    if args.no_compile:
        parts.pop()
    try:
        for name, run, min_left_share in parts:
            left = deadline - time.monotonic()
            if left < min_left_share * args.budget_s or left <= 0:
                results["errors"][name] = f"skipped: {left:.0f} s of the budget left"
                log(f"skipping {name}: {left:.0f} s of the budget left")
                continue
            log(f"part {name} ...")
            t0 = time.monotonic()
            try:
                results[name] = run()
            except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
                results["errors"][name] = f"{type(exc).__name__}: {exc}"[:1000]
                log(f"part {name} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stdout)
                sys.stdout.flush()
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(f"part {name} took {time.monotonic() - t0:.1f} s")
    except OutOfTime as exc:  # the alarm fired between parts
        results["errors"]["budget"] = str(exc)
        log(f"stopped: {exc}")
    signal.setitimer(signal.ITIMER_REAL, 0)
    finished.set()
    ok = results.get("correctness", {}).get("ok", False) and not {
        k for k in results["errors"] if k != "train_compiled"}
    results["ok"] = ok
    emit()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
