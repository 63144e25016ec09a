"""The worked example of docs/convert.md's `upcycle compose` section, on the committed seed and corpus sample, on CPU.

1. three short fine-tunes of the dense seed (assets/seed), one per domain (english, japanese, code), with
   `upcycle train`, each exported as an HF checkpoint;
2. four 3-expert top-2 MoEs of the same shape: `upcycle compose` with prompts from each domain (router hidden) on the
   seed's attention (compose-seed) and on the fine-tunes' average (compose-avg, which differs from BTX only in its
   routers), `upcycle convert --method btx` over the three fine-tunes (BTX's plain merge: averaged attention, random
   routers) and `--method naive` from the seed;
3. each MoE trained with the demo's recipe (configs/demo-moe.yaml) on the domain mix for the same number of tokens;
4. per domain validation loss before and after, and the share of each domain's prompt tokens whose top-1 expert is
   that domain's, per layer, before and after; results.json, report.md and loss.png in OUT.

Run: `python scripts/compose_example.py [--out runs/compose-example] [--steps 30] [--finetune-steps 40]`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from upcycle.convert.compose import Prompts, compose, top1_shares
from upcycle.convert.conversion import convert
from upcycle.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
SEED_DIR = REPO / "assets" / "seed"
SAMPLE_DIR = REPO / "data" / "sample"
CONFIG = REPO / "configs" / "demo-moe.yaml"
DOMAINS = ("english", "japanese", "code")
PROMPTS_PER_DOMAIN = 16
PROMPT_CHARS = 400


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _final_checkpoint(run: Path) -> Path:
    from upcycle.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run / "checkpoints")


def _prompts(out: Path) -> dict[str, Path]:
    """The first documents of each domain's training file, cut to PROMPT_CHARS characters, as JSONL prompt files."""
    files = {}
    for domain in DOMAINS:
        lines = gzip.open(SAMPLE_DIR / f"{domain}.train.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
        docs = [json.loads(line)["text"][:PROMPT_CHARS] for line in lines[:PROMPTS_PER_DOMAIN]]
        files[domain] = out / "prompts" / f"{domain}.jsonl"
        files[domain].parent.mkdir(parents=True, exist_ok=True)
        files[domain].write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return files


@torch.no_grad()
def _routing(model_path: Path, prompts: Prompts) -> list[list[float]]:
    """Per MoE layer, each domain's share of its prompt tokens whose top-1 expert is that domain's expert."""
    from upcycle.model.hf import load_model

    model = load_model(model_path).eval()
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.config.moe_layer_ids]
    for ids in prompts.sequences:
        for j, logits in enumerate(model(ids.unsqueeze(0)).router_logits):
            per_layer[j].append(logits)
    return [top1_shares(logits, prompts.owner, len(DOMAINS), 1) for logits in per_layer]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compose-example")
    parser.add_argument("--steps", type=int, default=30, help="MoE training steps (4,096 tokens each)")
    parser.add_argument("--finetune-steps", type=int, default=40, help="steps of each domain's dense fine-tune")
    args = parser.parse_args(argv)

    from upcycle.eval.evaluate import evaluate
    from upcycle.model.hf import export_hf, load_model
    from upcycle.train.trainer import run_training
    from upcycle.train.config import load_config

    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / "data"
    prepare({d: [SAMPLE_DIR / f"{d}.train.jsonl.gz"] for d in DOMAINS}, data, SEED_DIR,
            val_sources={d: [SAMPLE_DIR / f"{d}.val.jsonl.gz"] for d in DOMAINS}, progress=False)
    seconds = {}

    # 1. one short dense fine-tune of the seed per domain
    finetunes = {}
    for domain in DOMAINS:
        t = time.perf_counter()
        config = load_config(CONFIG, [f"init.source={SEED_DIR}", f"data.path={data}", f"data.weights={{{domain}: 1}}",
                                      f"train.max_steps={args.finetune_steps}", "train.eval_every=0"])
        run_training(config, out / f"finetune-{domain}")
        model = load_model(_final_checkpoint(out / f"finetune-{domain}"))
        finetunes[domain] = export_hf(model, model.config, out / f"ft-{domain}", tokenizer=SEED_DIR)
        seconds[f"finetune {domain}"] = time.perf_counter() - t

    # 2. four MoEs of one shape: 3 experts of the seed's FFN size, top-2
    prompt_files = _prompts(out)
    experts = [{"source": str(finetunes[d]), "positive": str(prompt_files[d])} for d in DOMAINS]
    specs = {"compose-seed": {"base": str(SEED_DIR), "experts": experts, "router": "hidden", "top_k": 2,
                              "dtype": "float32"},
             "compose-avg": {"average": True, "experts": experts, "router": "hidden", "top_k": 2, "dtype": "float32"}}
    moes = {}
    for name, spec in specs.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        moes[name] = compose(out / f"{name}.yaml", out / name, progress=False)
    moes["btx"] = convert(finetunes["english"], out / "btx", method="btx", num_experts=3, top_k=2, dtype="float32",
                          btx_sources=[str(finetunes["japanese"]), str(finetunes["code"])], progress=False)
    moes["naive"] = convert(SEED_DIR, out / "naive", method="naive", num_experts=3, top_k=2, dtype="float32",
                            progress=False)
    texts = json.loads((out / "compose-seed" / "upcycle_manifest.json").read_text())["prompts"]
    prompts = Prompts.tokenize(texts, SEED_DIR)

    # 3. the same training run for each
    results = {"steps": args.steps, "finetune_steps": args.finetune_steps, "domains": list(DOMAINS), "arms": {}}
    evals_dense = {name: evaluate(path, data, seq_len=256) for name, path in
                   {"seed": SEED_DIR, **{f"ft-{d}": p for d, p in finetunes.items()}}.items()}
    results["dense"] = {name: {d: r["domains"][d]["loss"] for d in DOMAINS} for name, r in evals_dense.items()}
    for name, path in moes.items():
        t = time.perf_counter()
        before = evaluate(path, data, seq_len=256)
        routing_before = _routing(path, prompts)
        config = load_config(CONFIG, [f"init.source={path}", f"data.path={data}", f"train.max_steps={args.steps}"])
        run_training(config, out / f"train-{name}")
        final = _final_checkpoint(out / f"train-{name}")
        after = evaluate(final, data, seq_len=256)
        results["arms"][name] = {
            "loss_before": {d: before["domains"][d]["loss"] for d in DOMAINS},
            "loss_after": {d: after["domains"][d]["loss"] for d in DOMAINS},
            "mean_loss_before": sum(before["domains"][d]["loss"] for d in DOMAINS) / 3,
            "mean_loss_after": sum(after["domains"][d]["loss"] for d in DOMAINS) / 3,
            "prompt_top1_share_before": routing_before, "prompt_top1_share_after": _routing(final, prompts),
            "train_tokens": _metrics(out / f"train-{name}")[-1]["tokens"],
            "train_ce": [r["ce"] for r in _metrics(out / f"train-{name}")],
        }
        seconds[f"moe {name}"] = time.perf_counter() - t
    results["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    results["seconds_total"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out / "loss.png")
    print(json.dumps({k: (v["mean_loss_before"], v["mean_loss_after"]) for k, v in results["arms"].items()}))


def _plot(results: dict, path: Path) -> None:
    from upcycle.eval.analyze import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, arm in results["arms"].items():
        ce = arm["train_ce"]
        smooth = [sum(ce[max(0, i - 4):i + 1]) / len(ce[max(0, i - 4):i + 1]) for i in range(len(ce))]
        ax.plot(range(1, len(ce) + 1), smooth, label=f"{name} (train CE, 5-step mean)")
    ax.set_xlabel("step (4,096 tokens each)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
