"""Forward+backward time of our MoE layer against an equal-FLOP dense SwiGLU and transformers' Mixtral block.

    python benchmarks/moe_layer.py            # T=4096, D=512, F=1408, E=8, k=2, fp32 and bf16
    python benchmarks/moe_layer.py --quick    # fewer repeats (about a minute of fp32 on 2 cores)

bf16 runs only where the CPU has native bf16 (upcycle.hardware.cpu_has_native_bf16: avx512_bf16, AMX or Arm bf16);
elsewhere torch emulates it (~70x slower than fp32 on an AVX2-only CPU) and the bf16 half is skipped with a note
(--force-bf16 runs it anyway). The CPU model and the flags that decide matmul speed are printed first and recorded in
the JSON line, with what `train.precision: auto` picks at this width on this CPU and thread count
(upcycle.hardware.resolve_precision: the cached probe, or a fresh one) and, where both dtypes ran, how much faster
each layer ran in bf16 than in fp32: the check of that choice.

All variants are measured side by side in one process, interleaved (each repeat runs every variant once, in a shuffled
order) so that drift in clock speed or memory state hits every variant alike; each reported time is the median over
repeats. The dense reference has ffn_dim = top_k * F, so it does the same matmul FLOPs as the MoE when routing is
perfectly balanced. `routing_overhead` = our layer minus its expert matmuls alone (on pre-sorted rows): route, sort,
gather, scatter. The plain GEMM (T, D) @ (D, k*F) runs interleaved with them, for the GFLOP/s of each dtype (with the
dense layer's fwd+bwd GFLOP/s).
Two routing variants of the `auto` kernel run beside it: sigmoid scores with a balancing bias
(`sigmoid_bias_vs_softmax`) and a capacity factor of 1.25 (`capacity_1.25_vs_dropless`).
The last line is one JSON object with the ratios. CPU numbers only; nothing here claims GPU behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable

import torch

from upcycle.hardware import cpu_description, cpu_has_native_bf16, resolve_precision
from upcycle.model.transformer import FeedForward
from upcycle.model.moe import MoE, expert_ffn_sorted, resolve_impl, sort_by_expert


def hf_block(moe: MoE, impl: str) -> torch.nn.Module:
    """transformers' MixtralSparseMoeBlock holding the same weights as `moe`, with experts backend `impl`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, D, F2 = moe.gate_up_ED2F.shape
    config = MixtralConfig(hidden_size=D, intermediate_size=F2 // 2, num_local_experts=E, num_experts_per_tok=moe.top_k)
    config._experts_implementation = impl  # what from_pretrained(experts_implementation=...) sets
    block = MixtralSparseMoeBlock(config).to(moe.gate_up_ED2F.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.gate_up_ED2F.transpose(1, 2))
        block.experts.down_proj.copy_(moe.down_EFD.transpose(1, 2))
    return block


def make_step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, call: Callable) -> Callable[[], None]:
    """One forward+backward with a fresh input leaf and a contiguous upstream gradient."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        call(module, xi).backward(grad)

    return step


def experts_only_step(moe: MoE, x_TD: torch.Tensor, impl: str) -> Callable[[], None]:
    """Just the expert matmuls + SwiGLU on rows already sorted by expert: the floor of any dropless MoE."""
    with torch.no_grad():
        ids_TK = moe(x_TD).router_logits_TE.topk(moe.top_k, dim=-1).indices
    order_S, counts_E = sort_by_expert(ids_TK, moe.num_experts)
    x_SD = x_TD[order_S // moe.top_k].contiguous()
    grad_SD = torch.randn_like(x_SD)

    def step() -> None:
        moe.zero_grad(set_to_none=True)
        xs = x_SD.detach().requires_grad_(True)
        expert_ffn_sorted(xs, counts_E, moe.gate_up_ED2F, moe.down_EFD, impl=impl).backward(grad_SD)

    return step


def measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """name -> (median wall seconds, median process CPU seconds). CPU time is reported beside wall time because it
    is far less sensitive to other processes competing for the same cores."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # a fixed order would let one variant's freed buffers systematically help or hurt the next
        for name in order:
            step = steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps}


def run(dtype: torch.dtype, T: int, D: int, F: int, E: int, K: int, repeats: int) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    moe = MoE(D, F, E, K)
    moe.init_weights(0.02)
    dense = FeedForward(D, K * F)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe, dense = moe.to(dtype), dense.to(dtype)
    hf = {impl: hf_block(moe, impl) for impl in ("eager", "grouped_mm")}
    x_TD = torch.randn(T, D, dtype=dtype)
    grad_TD = torch.randn(T, D, dtype=dtype)

    def ours(m, x):
        return m(x).out_TD

    steps = {"dense": make_step(dense, x_TD, grad_TD, lambda m, x: m(x))}
    w_DN = dense.up.weight.detach().T.contiguous()  # (D, k*F)
    steps["matmul"] = lambda: torch.mm(x_TD, w_DN)  # the GEMM alone, for the GFLOP/s figure
    auto = resolve_impl("auto", "cpu")
    steps["ours_auto"] = make_step(moe, x_TD, grad_TD, ours)
    for impl in ("fused", "grouped_mm", "loop"):
        m = MoE(D, F, E, K, impl=impl).to(dtype)
        m.load_state_dict(moe.state_dict())
        if impl != auto:  # ours_auto already is this variant
            steps[f"ours_{impl}"] = make_step(m, x_TD, grad_TD, ours)
        if impl != "loop":
            steps[f"experts_only_{impl}"] = experts_only_step(m, x_TD, impl)
    # routing variants of the `auto` kernel with the same weights: DeepSeek-V3's sigmoid scores with a balancing bias
    # (non-zero, so it changes the choice), and a capacity factor of 1.25 (assignments over each expert's cap dropped)
    variants = {"ours_sigmoid_bias": dict(activation="sigmoid", expert_bias=True),
                "ours_capacity_1.25": dict(capacity_factor=1.25)}
    for variant, options in variants.items():
        m = MoE(D, F, E, K, **options).to(dtype)
        m.load_state_dict(moe.state_dict(), strict=False)
        if m.expert_bias_E is not None:
            m.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E))
        steps[variant] = make_step(m, x_TD, grad_TD, ours)
    for impl, block in hf.items():
        steps[f"hf_{impl}"] = make_step(block, x_TD.view(1, T, D), grad_TD.view(1, T, D), lambda m, x: m(x))
    return measure(steps, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn-dim", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of --repeats")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even where the CPU has no native bf16")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="which halves to run (default both; fp32 alone e.g. with the ISA restricted by "
                             "ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, where bf16 is emulated whatever the flags say)")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"T={args.tokens} D={args.dim} F={args.ffn_dim} E={args.experts} k={args.top_k} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={repeats} (fwd+bwd, median ms)")
    print(f"CPU: {cpu_description()}; ATen kernels: {torch.backends.cpu.get_cpu_capability()}")
    summary: dict[str, float | str] = {"cpu": cpu_description()}
    auto = resolve_precision("auto", torch.device("cpu"), dim=args.dim, ffn_dim=args.ffn_dim)
    print(f"train.precision auto would pick {auto.precision}: {auto.reason}")
    summary["auto_precision"] = auto.precision
    dtypes = [("fp32", torch.float32)] if "fp32" in args.dtypes else []
    if "bf16" not in args.dtypes:
        summary["bf16"] = "skipped: not in --dtypes"
    elif cpu_has_native_bf16() or args.force_bf16:
        dtypes.append(("bf16", torch.bfloat16))
    else:
        print("  bf16 skipped: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag), so torch emulates "
              "it, measured ~70x slower than fp32 on an AVX2-only CPU; --force-bf16 runs it anyway")
        summary["bf16"] = "skipped: no native bf16 on this CPU"
    for name, dtype in dtypes:
        both = run(dtype, args.tokens, args.dim, args.ffn_dim, args.experts, args.top_k, repeats)
        t = {k: v[0] for k, v in both.items()}
        c = {k: v[1] for k, v in both.items()}
        matmul_s, _ = t.pop("matmul"), c.pop("matmul")
        flops = 2 * args.tokens * args.dim * args.top_k * args.ffn_dim  # one (T, D) @ (D, k*F)
        print(f"  {name} matmul {args.tokens}x{args.dim} @ {args.dim}x{args.top_k * args.ffn_dim}: "
              f"{flops / matmul_s / 1e9:.0f} GFLOP/s; dense layer fwd+bwd: {9 * flops / t['dense'] / 1e9:.0f} GFLOP/s")
        summary[f"matmul_gflops_{name}"] = round(flops / matmul_s / 1e9, 1)
        summary[f"dense_gflops_{name}"] = round(9 * flops / t["dense"] / 1e9, 1)
        for variant in t:
            print(f"  {name} {variant:24s} wall {t[variant] * 1e3:8.1f} ms {t[variant] / t['dense']:5.2f}x dense"
                  f"   cpu {c[variant] * 1e3:8.1f} ms {c[variant] / c['dense']:5.2f}x dense")
        best_hf = min(t["hf_eager"], t["hf_grouped_mm"])
        best_hf_cpu = min(c["hf_eager"], c["hf_grouped_mm"])
        impl = resolve_impl("auto", "cpu")
        overhead = t["ours_auto"] - t[f"experts_only_{impl}"]
        overhead_cpu = c["ours_auto"] - c[f"experts_only_{impl}"]
        print(f"  {name} routing overhead (route+sort+gather+scatter) {overhead * 1e3:.1f} ms = "
              f"{overhead / t['ours_auto']:.0%} of our layer (wall), {overhead_cpu * 1e3:.1f} ms = "
              f"{overhead_cpu / c['ours_auto']:.0%} (cpu)")
        summary.update({
            f"moe_vs_dense_{name}": round(t["ours_auto"] / t["dense"], 3),
            f"speedup_vs_hf_{name}": round(best_hf / t["ours_auto"], 3),
            f"moe_vs_dense_cpu_time_{name}": round(c["ours_auto"] / c["dense"], 3),
            f"speedup_vs_hf_cpu_time_{name}": round(best_hf_cpu / c["ours_auto"], 3),
            f"routing_overhead_share_{name}": round(overhead / t["ours_auto"], 3),
            f"routing_overhead_share_cpu_time_{name}": round(overhead_cpu / c["ours_auto"], 3),
            f"sigmoid_bias_vs_softmax_{name}": round(t["ours_sigmoid_bias"] / t["ours_auto"], 3),
            f"capacity_1.25_vs_dropless_{name}": round(t["ours_capacity_1.25"] / t["ours_auto"], 3),
            f"ours_ms_{name}": round(t["ours_auto"] * 1e3, 1),
            f"dense_ms_{name}": round(t["dense"] * 1e3, 1),
            f"hf_best_ms_{name}": round(best_hf * 1e3, 1),
        })
    if "ours_ms_bf16" in summary and "ours_ms_fp32" in summary:
        speedups = {layer: summary[f"{layer}_ms_fp32"] / summary[f"{layer}_ms_bf16"] for layer in ("dense", "ours")}
        print(f"  bf16 over fp32 here: dense {speedups['dense']:.2f}x, ours {speedups['ours']:.2f}x as fast "
              f"(wall); auto picks {auto.precision}")
        summary.update({f"{layer}_bf16_speedup": round(v, 3) for layer, v in speedups.items()})
    summary["impl"] = resolve_impl("auto", "cpu")
    summary["threads"] = torch.get_num_threads()
    summary["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # AVX2 where ATEN_CPU_CAPABILITY=avx2
    summary["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
