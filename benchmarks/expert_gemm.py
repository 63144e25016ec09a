"""The GEMM floor of the MoE layer on CPU: the matmuls of one forward + backward, dense against split per expert.

    python benchmarks/expert_gemm.py            # T=4096, D=512, F=1408, E=8, k=2 (moe_layer.py's shape), fp32
    python benchmarks/expert_gemm.py --quick    # fewer repeats

An MoE layer with E experts and top-k routing does the matmul FLOPs of a dense SwiGLU of width k*F, but as E GEMMs on
about T*k/E rows each instead of one GEMM on T rows. This times only those GEMMs (the six of a forward + backward,
nothing else), so it says what the split costs by itself, before routing or any elementwise work:

- `dense`: the equal-FLOP dense SwiGLU's GEMMs (gate and up (T, D) @ (D, k*F) each, down, and their backward);
- `one_expert`: the experts' GEMM shapes ((S, D) @ (D, 2F), (S, F) @ (F, D) and their backward) on all S = T*k rows
  at once, as if one expert took every row: same FLOPs and widths as the experts, no split;
- `experts`: the same GEMMs per expert on S/E rows each, into slices of preallocated outputs, as the fused kernel
  (moe.py) runs them;
- `experts_mkl_packed`: as `experts`, with the forward's and grad-input's GEMMs through MKL's packed-weight GEMM
  (torch.ops.mkl._mkl_linear), the weights packed on every call (they change at every optimizer step), to see whether
  a pre-packed weight layout is faster at the split shape.

If `experts` costs more than `dense` by about as much as the layer's distance to its target, no change around the
GEMMs (routing, layout of the activations, fusion of elementwise work) can close it; only a faster GEMM at the split
shape could. Variants are interleaved in a shuffled order every repeat; medians of wall and process CPU time. The last
line is one JSON object with the ratios to `dense`.
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

from upcycle.hardware import cpu_description


def gemm_steps(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """name -> one forward + backward's GEMMs (outputs preallocated, as the fused kernel does)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    N = K * F  # the dense layer's width
    S = T * K  # rows over all experts
    x_TD, dy_TD = rand(T, D), rand(T, D)
    gate_DN, up_DN, down_ND = rand(D, N), rand(D, N), rand(N, D)
    h_TN, dh_TN = rand(T, N), rand(T, N)
    x_SD, dy_SD = rand(S, D), rand(S, D)
    gate_up_ED2F, down_EFD = rand(E, D, 2 * F), rand(E, F, D)
    act_SF, dh_S2F = rand(S, F), rand(S, 2 * F)
    out = {"TN": torch.empty(T, N, dtype=dtype), "TD": torch.empty(T, D, dtype=dtype),
           "DN": torch.empty(D, N, dtype=dtype), "ND": torch.empty(N, D, dtype=dtype),
           "S2F": torch.empty(S, 2 * F, dtype=dtype), "SD": torch.empty(S, D, dtype=dtype),
           "SF": torch.empty(S, F, dtype=dtype), "ED2F": torch.empty(E, D, 2 * F, dtype=dtype),
           "EFD": torch.empty(E, F, D, dtype=dtype)}
    bounds = [(e * S // E, (e + 1) * S // E) for e in range(E)]

    def dense() -> None:
        for w_DN in (gate_DN, up_DN):
            torch.mm(x_TD, w_DN, out=out["TN"])  # forward
            torch.mm(dh_TN, w_DN.T, out=out["TD"])  # grad of x
            torch.mm(x_TD.T, dh_TN, out=out["DN"])  # grad of the weight
        torch.mm(h_TN, down_ND, out=out["TD"])
        torch.mm(dy_TD, down_ND.T, out=out["TN"])
        torch.mm(h_TN.T, dy_TD, out=out["ND"])

    def experts(segments: list[tuple[int, int]], packed: bool) -> Callable[[], None]:
        def run() -> None:
            for e, (a, b) in enumerate(segments):
                gate_up_D2F, down_FD = gate_up_ED2F[min(e, E - 1)], down_EFD[min(e, E - 1)]
                if packed:
                    # _mkl_linear computes x @ W.T for W (out, in): pack W.T of the forward and W of grad-input
                    w_2FD, w_DF = gate_up_D2F.T.contiguous(), down_FD.T.contiguous()
                    rows = b - a
                    out["S2F"][a:b] = torch.ops.mkl._mkl_linear(
                        x_SD[a:b], torch.ops.mkl._mkl_reorder_linear_weight(w_2FD, rows), w_2FD, None, rows)
                    out["SD"][a:b] = torch.ops.mkl._mkl_linear(
                        act_SF[a:b], torch.ops.mkl._mkl_reorder_linear_weight(w_DF, rows), w_DF, None, rows)
                    out["SF"][a:b] = torch.ops.mkl._mkl_linear(
                        dy_SD[a:b], torch.ops.mkl._mkl_reorder_linear_weight(down_FD, rows), down_FD, None, rows)
                    out["SD"][a:b] = torch.ops.mkl._mkl_linear(
                        dh_S2F[a:b], torch.ops.mkl._mkl_reorder_linear_weight(gate_up_D2F, rows), gate_up_D2F,
                        None, rows)
                else:
                    torch.mm(x_SD[a:b], gate_up_D2F, out=out["S2F"][a:b])
                    torch.mm(act_SF[a:b], down_FD, out=out["SD"][a:b])
                    torch.mm(dy_SD[a:b], down_FD.T, out=out["SF"][a:b])
                    torch.mm(dh_S2F[a:b], gate_up_D2F.T, out=out["SD"][a:b])
                target = out["ED2F"][min(e, E - 1)], out["EFD"][min(e, E - 1)]
                torch.mm(x_SD[a:b].T, dh_S2F[a:b], out=target[0])
                torch.mm(act_SF[a:b].T, dy_SD[a:b], out=target[1])

        return run

    steps = {"dense": dense, "one_expert": experts([(0, S)], packed=False), "experts": experts(bounds, packed=False)}
    if dtype == torch.float32 and torch.backends.mkl.is_available():  # MKL's packed GEMM is fp32 only
        steps["experts_mkl_packed"] = experts(bounds, packed=True)
        steps["experts"]()
        written = ("S2F", "SD", "SF", "ED2F", "EFD")
        plain = {name: out[name].clone() for name in written}
        steps["experts_mkl_packed"]()
        for name in written:  # the packed GEMMs compute the same products
            torch.testing.assert_close(out[name], plain[name], rtol=1e-4, atol=1e-4 * plain[name].abs().max().item())
    return steps


def measure(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median wall seconds, median process CPU seconds); one warm-up round, then shuffled rounds."""
    for step in steps.values():
        step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    order, rng = list(steps), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn-dim", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="7 repeats instead of --repeats")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 7 if args.quick else args.repeats
    T, D, F, E, K = args.tokens, args.dim, args.ffn_dim, args.experts, args.top_k
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"T={T} D={D} F={F} E={E} k={K} {args.dtype} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"repeats={repeats} (the GEMMs of one fwd+bwd, median ms)")
    print(f"CPU: {cpu_description()}")
    times = measure(gemm_steps(T, D, F, E, K, dtype), repeats)
    flops = 18 * T * D * K * F
    dense_wall, dense_cpu = times["dense"]
    summary: dict = {"cpu": cpu_description(), "dtype": args.dtype, "threads": torch.get_num_threads()}
    for name, (wall, cpu) in times.items():
        print(f"  {name:20s} wall {wall * 1e3:8.1f} ms {wall / dense_wall:5.3f}x dense   cpu {cpu * 1e3:8.1f} ms "
              f"{cpu / dense_cpu:5.3f}x dense   {flops / wall / 1e9:6.1f} GFLOP/s")
        summary[f"{name}_vs_dense"] = round(wall / dense_wall, 3)
        summary[f"{name}_vs_dense_cpu_time"] = round(cpu / dense_cpu, 3)
    summary["dense_ms"] = round(dense_wall * 1e3, 1)
    summary["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
