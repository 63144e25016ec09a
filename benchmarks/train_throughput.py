"""Training throughput (tokens/s of forward + backward + AdamW step) of our trainer's step against transformers'
MixtralForCausalLM trained with a plain loop, on the same small MoE config, side by side in one process.

    python benchmarks/train_throughput.py             # dim 256, 4 layers, 8 experts top-2, vocab 8192, 4 x 256 tokens
    python benchmarks/train_throughput.py --quick     # fewer repeats

Ours: `upcycle.train.forward_backward` (the function the trainer runs: our Transformer, CE + 0.02 * pooled
load-balancing loss + the logged z-loss), then grad clipping and the trainer's AdamW (`build_optimizer`, fused),
exactly as in the training loop.
transformers: `MixtralForCausalLM(..., labels=..., output_router_logits=True)` (its CE + 0.02 * aux), `loss.backward()`,
clipping and AdamW; its default experts backend (grouped_mm) and SDPA attention. Both fp32 (or both bf16 autocast
with --precision bf16) on CPU, same batch.
The two are interleaved round by round (alternating which goes first) so machine-load drift hits both alike;
reported times are medians of wall time and of process CPU time (less sensitive to other processes on the cores).
The last line is one JSON object with both throughputs and their ratio (ours / transformers), and the CPU.
--precision bf16 is skipped with a note where the CPU has no native bf16 (upcycle.hardware.cpu_has_native_bf16):
torch emulates bf16 there, ~70x slower than fp32 on an AVX2-only CPU (--force-bf16 runs it anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from upcycle.hardware import cpu_description, cpu_has_native_bf16


def build_ours(args):
    from upcycle.model import ModelConfig, Transformer

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
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: both models under torch.autocast(bfloat16), as train.precision=bf16 does")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every block of both models (ours as train.compile does, HF's layers)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even where the CPU has no native bf16")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_description()}")
    if args.precision == "bf16" and not (cpu_has_native_bf16() or args.force_bf16):
        print("bf16 skipped: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag), so torch emulates "
              "it, measured ~70x slower than fp32 on an AVX2-only CPU; use --precision fp32, or --force-bf16")
        print(json.dumps({"precision": "bf16", "skipped": "no native bf16 on this CPU", "cpu": cpu_description()}))
        return
    if args.quick:
        args.rounds, args.steps = 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from upcycle.train import OptimConfig, TrainLoopConfig, build_optimizer, forward_backward

    torch.manual_seed(0)
    ours, hf = build_ours(args), build_hf(args)
    if args.compile:
        for block in list(ours.layers) + list(hf.model.layers):
            block.compile()
    ours_opt, hf_opt = build_optimizer(ours, OptimConfig()), adamw(hf)
    loop = TrainLoopConfig(micro_batch_size=args.batch, aux_coef=0.02)
    batch_BT = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    tokens = args.batch * args.seq_len

    def autocast():
        if args.precision == "bf16":
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
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    print(f"config: dim {args.dim}, {args.layers} layers, ffn {args.ffn_dim}, {args.experts} experts top-{args.top_k}, "
          f"vocab {args.vocab}, {args.batch} x {args.seq_len} tokens/step, {args.precision}, "
          f"threads {torch.get_num_threads()}")
    print(f"parameters: ours {n_ours:,}, transformers {n_hf:,}")
    for name in steps:
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        print(f"{name:>13}: {medians[name] * 1e3:8.1f} ms/step (range {spread}), {throughput[name]:8.0f} tokens/s; "
              f"cpu {cpu_medians[name] * 1e3:8.1f} ms/step, {cpu_throughput[name]:8.0f} tokens per cpu-second")
    ratio = throughput["ours"] / throughput["transformers"]
    cpu_ratio = cpu_throughput["ours"] / cpu_throughput["transformers"]
    print(f"ratio ours / transformers: {ratio:.2f}x wall, {cpu_ratio:.2f}x cpu time")
    print(json.dumps({"tokens_per_step": tokens, "ours_tokens_per_s": round(throughput["ours"], 1),
                      "transformers_tokens_per_s": round(throughput["transformers"], 1), "ratio": round(ratio, 3),
                      "ratio_cpu_time": round(cpu_ratio, 3), "precision": args.precision, "cpu": cpu_description(),
                      "threads": torch.get_num_threads(), "params": n_ours, "compile": args.compile,
                      "load_average_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
