"""`make demo`: the main job on the embedded default.

Builds a small Llama-style dense model at run time (random weights, saved as an HF checkpoint), upcycles it naively and
with Drop-Upcycling in both index modes, and checks each conversion against the dense parent through transformers.
Outputs go to runs/demo/. Run: `python -m upcycle.demo [--out DIR]`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from upcycle.check import check
from upcycle.convert import convert


def build_dense(directory: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (replaced)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dense = build_dense(out / "dense")
    print(f"dense model: {dense}")
    rows = []
    for name, options in [("naive", dict(method="naive")),
                          ("drop r=0.5 independent", dict(method="drop", ratio=0.5, index_mode="independent")),
                          ("drop r=0.5 shared", dict(method="drop", ratio=0.5, index_mode="shared"))]:
        target = out / name.replace(" ", "_").replace("=", "")
        convert(dense, target, num_experts=8, top_k=2, **options)
        report = check(str(target), str(dense))
        rows.append((name, report))
    print(f"\n{'conversion':<26}{'max |logit diff|':>18}{'top-1 agree':>13}{'ppl dense':>11}{'ppl MoE':>11}")
    for name, r in rows:
        print(f"{name:<26}{r.max_abs_logit_diff:>18.3e}{r.top1_agreement:>13.4f}{r.dense_perplexity:>11.2f}"
              f"{r.moe_perplexity:>11.2f}")
    naive = rows[0][1]
    if not naive.equivalent:
        raise SystemExit("naive upcycling did not reproduce the dense model: this is a bug, please report it")
    print("\nnaive upcycling reproduces the dense model exactly; Drop-Upcycling moves it by the amounts above.")


if __name__ == "__main__":
    main()
