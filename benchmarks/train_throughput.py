"""Training throughput (tokens/s of forward + backward + AdamW step) of our trainer's step against transformers'
MixtralForCausalLM trained with a plain loop, on the same small MoE config, side by side in one process.

    python benchmarks/train_throughput.py             # dim 256, 4 layers, 8 experts top-2, vocab 8192, 4 x 256 tokens
    python benchmarks/train_throughput.py --quick     # fewer repeats
    python benchmarks/train_throughput.py --precision fp32    # one dtype only (default: both, fp32 then bf16)

Ours: `upcycle.train.trainer.forward_backward` (the function the trainer runs: our Transformer, CE + 0.02 * pooled
load-balancing loss + the logged z-loss), then grad clipping and the trainer's AdamW (`build_optimizer`, fused),
exactly as in the training loop.
transformers: `MixtralForCausalLM(..., labels=..., output_router_logits=True)` (its CE + 0.02 * aux), `loss.backward()`,
clipping and AdamW; its default experts backend (grouped_mm) and SDPA attention. Both fp32, and both under bf16
autocast (as train.precision=bf16 does), on CPU, same batch.
The two are interleaved round by round (alternating which goes first) so machine-load drift hits both alike;
reported times are medians of wall time and of process CPU time (less sensitive to other processes on the cores).
Beside the measured dtypes it prints what `train.precision: auto` picks for this model's width on this CPU and thread
count (upcycle.hardware.resolve_precision: the cached probe, or a fresh one) and, with both dtypes measured, how much
faster bf16 trained here: the check of that choice.
The last line is one JSON object with both throughputs and their ratio (ours / transformers) per dtype, and the CPU.
bf16 is skipped with a note where the CPU has no native bf16 (upcycle.hardware.cpu_has_native_bf16): torch emulates
bf16 there, ~70x slower than fp32 on an AVX2-only CPU (--force-bf16 runs it anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from upcycle.hardware import cpu_description, cpu_has_native_bf16, resolve_precision


def build_ours(args):
    from upcycle.model.transformer import ModelConfig, Transformer

    config = ModelConfig(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, ffn_dim=args.ffn_dim, max_seq_len=args.seq_len,
                         num_experts=args.experts, top_k=args.top_k)
    return Transformer(config)


def build_hf(args):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.dim, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                           intermediate_size=args.ffn_dim, max_position_embeddings=args.seq_len,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                           router_aux_loss_coef=0.02, output_router_logits=True, tie_word_embeddings=False,
                           rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "sdpa"
    return MixtralForCausalLM(config)


def adamw(model):
    """What a plain training loop writes: torch's default AdamW implementation, the paper's hyper-parameters."""
    return torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds; each times --steps per model")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both",
                        help="bf16: both models under torch.autocast(bfloat16), as train.precision=bf16 does; "
                             "both (default): fp32, then bf16")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every block of both models (ours as train.compile does, HF's layers)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even where the CPU has no native bf16")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}")
    summary: dict = {"tokens_per_step": args.batch * args.seq_len, "cpu": cpu_description(),
                     "threads": torch.get_num_threads(), "compile": args.compile}
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    if "bf16" in precisions and not (cpu_has_native_bf16() or args.force_bf16):
        print("bf16 skipped: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag), so torch emulates "
              "it, measured ~70x slower than fp32 on an AVX2-only CPU; use --precision fp32, or --force-bf16")
        precisions.remove("bf16")
        summary["bf16"] = "skipped: no native bf16 on this CPU"
    auto = resolve_precision("auto", torch.device("cpu"), dim=args.dim, ffn_dim=args.ffn_dim)
    print(f"train.precision auto would pick {auto.precision}: {auto.reason}")
    summary["auto_precision"] = auto.precision

    from upcycle.train.trainer import build_optimizer
    from upcycle.train.config import OptimConfig

    torch.manual_seed(0)
    ours, hf = build_ours(args), build_hf(args)
    if args.compile:
        for block in list(ours.layers) + list(hf.model.layers):
            block.compile()
    optimizers = build_optimizer(ours, OptimConfig()), adamw(hf)
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"config: dim {args.dim}, {args.layers} layers, ffn {args.ffn_dim}, {args.experts} experts top-{args.top_k}, "
          f"vocab {args.vocab}, {args.batch} x {args.seq_len} tokens/step, threads {torch.get_num_threads()}")
    print(f"parameters: ours {n_ours:,}, transformers {sum(p.numel() for p in hf.parameters()):,}")
    summary["params"] = n_ours
    for precision in precisions:
        summary.update({f"{key}_{precision}": value
                        for key, value in measure(args, ours, hf, optimizers, precision).items()})
    if len(precisions) == 2:
        speedup = summary["ours_tokens_per_s_bf16"] / summary["ours_tokens_per_s_fp32"]
        measured = "bf16" if speedup >= 1 else "fp32"
        print(f"ours trained {speedup:.2f}x as fast in bf16 as in fp32 here ({measured} is faster); "
              f"auto picks {auto.precision}")
        summary["ours_bf16_speedup"] = round(speedup, 3)
    summary["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))


def measure(args, ours, hf, optimizers, precision: str) -> dict:
    """Both models' step times in `precision`, interleaved round by round; prints them and returns the figures."""
    from upcycle.train.trainer import forward_backward
    from upcycle.train.config import TrainLoopConfig

    ours_opt, hf_opt = optimizers
    loop = TrainLoopConfig(micro_batch_size=args.batch, aux_coef=0.02)
    batch_BT = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    tokens = args.batch * args.seq_len

    def autocast():
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def our_step():
        forward_backward(ours, batch_BT, loop=loop, top_k=args.top_k, num_moe=args.layers, num_experts=args.experts,
                         autocast=autocast)
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def hf_step():
        # transformers shifts the labels itself: pass the same T+1 window as inputs and labels minus the last token.
        with autocast():
            out = hf(input_ids=batch_BT[:, :-1], labels=batch_BT[:, :-1], output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    steps = {"ours": our_step, "transformers": hf_step}
    for fn in steps.values():  # warm-up: allocator, lazy optimizer state, kernel selection
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        # alternate which model goes first, so neither always runs right after the other's allocations
        for name in list(steps)[:: 1 if round_index % 2 == 0 else -1]:
            fn = steps[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - start) / args.steps)
            cpu_times[name].append((time.process_time() - cpu_start) / args.steps)

    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    throughput = {name: tokens / m for name, m in medians.items()}
    cpu_throughput = {name: tokens / m for name, m in cpu_medians.items()}
    for name in steps:
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        print(f"{precision} {name:>13}: {medians[name] * 1e3:8.1f} ms/step (range {spread}), {throughput[name]:8.0f} "
              f"tokens/s; cpu {cpu_medians[name] * 1e3:8.1f} ms/step, {cpu_throughput[name]:8.0f} tokens per "
              "cpu-second")
    ratio = throughput["ours"] / throughput["transformers"]
    cpu_ratio = cpu_throughput["ours"] / cpu_throughput["transformers"]
    print(f"{precision} ratio ours / transformers: {ratio:.2f}x wall, {cpu_ratio:.2f}x cpu time")
    return {"ours_tokens_per_s": round(throughput["ours"], 1),
            "transformers_tokens_per_s": round(throughput["transformers"], 1), "ratio": round(ratio, 3),
            "ratio_cpu_time": round(cpu_ratio, 3)}


if __name__ == "__main__":
    main()
