"""`make demo`: the main job on the embedded default, in about five minutes on 2 CPU cores.

The committed dense seed (assets/seed, a small Llama pretrained on the 3-domain corpus) is upcycled into an 8-expert
top-2 MoE twice, with Drop-Upcycling (r = 0.5) and naively; both are trained for the same short budget on the
committed corpus sample; the dense seed and both MoEs are evaluated per domain; the routing of both MoEs is analysed;
and runs/demo/report.md is written with its plots.

Run: `python scripts/demo.py [--out runs/demo] [--steps N] [--seed-model DIR]` (what `make demo` runs), with the
`upcycle` package installed. The demo is a script of the source checkout, not part of the installed package: it needs
the checkout's committed seed model, corpus sample and config, found beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from upcycle.convert.conversion import convert
from upcycle.data.prepare import prepare
from upcycle.errors import UpcycleError

REPO = Path(__file__).resolve().parents[1]  # scripts/demo.py -> the checkout
SEED_DIR = REPO / "assets" / "seed"
SAMPLE_DIR = REPO / "data" / "sample"
DEMO_CONFIG = REPO / "configs" / "demo-moe.yaml"
EXPERIMENTS = REPO / "docs" / "experiments.md"
DOMAINS = ("english", "japanese", "code")
ARMS = {"naive": dict(method="naive"), "drop": dict(method="drop", ratio=0.5, index_mode="independent")}


class _Stage:
    """Prints what is happening and how long it took, so a long step never looks stuck."""

    def __init__(self, title: str):
        self.title = title

    def __enter__(self):
        print(f"\n== {self.title}", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"   done in {time.perf_counter() - self.start:.1f} s", flush=True)


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _final_checkpoint(run: Path) -> Path:
    from upcycle.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run / "checkpoints")
    if path is None:
        raise UpcycleError(f"training in {run} left no checkpoint")
    return path


def plot_losses(runs: dict[str, Path], path: Path, dense_val: float | None = None,
                initial_val: dict[str, float] | None = None) -> None:
    """Training CE per step (faint) with a 5-step running mean, and validation CE, one colour per arm."""
    from upcycle.eval.analyze import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for color, (name, run) in zip(("tab:blue", "tab:red"), runs.items()):
        records = _read_metrics(run)
        tokens = [r["tokens"] / 1e3 for r in records]
        ce = [r["ce"] for r in records]
        smooth = [sum(ce[max(0, i - 4):i + 1]) / len(ce[max(0, i - 4):i + 1]) for i in range(len(ce))]
        ax.plot(tokens, ce, color=color, alpha=0.25, linewidth=1)
        ax.plot(tokens, smooth, color=color, label=f"{name}: train CE (5-step mean)")
        val = [(r["tokens"] / 1e3, sum(r["val"].values()) / len(r["val"])) for r in records if "val" in r]
        if initial_val and name in initial_val:
            val.insert(0, (0.0, initial_val[name]))
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{name}: validation CE (mean of domains)")
    if dense_val is not None:
        ax.axhline(dense_val, color="gray", linestyle=":", label="dense seed: validation CE")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Naive vs Drop-Upcycling, same data and budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(evals: dict[str, dict]) -> list[str]:
    header = "| model | " + " | ".join(f"{d} loss | {d} ppl" for d in DOMAINS) + " |"
    lines = [header, "|" + " --- |" * (1 + 2 * len(DOMAINS))]
    for name, result in evals.items():
        cells = []
        for d in DOMAINS:
            r = result["domains"][d]
            cells += [f"{r['loss']:.3f}", f"{r['perplexity']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _link(out: Path, target: Path) -> str:
    """`target` relative to the report's directory, so the link works in the checkout and on a forge."""
    return Path(os.path.relpath(target.resolve(), out.resolve())).as_posix()


def dead_expert_cells(layer: dict) -> tuple[str, str]:
    """Two table cells from one layer of analysis.json: the experts no token of any domain reaches (`all_domains`),
    and each domain's own dead experts (`routing.DOMAIN`); "none" where there are none."""
    pooled = layer["all_domains"]["dead_experts"]
    per_domain = [f"{d}: {r['dead_experts']}" for d, r in sorted(layer["routing"].items()) if r["dead_experts"]]
    return (str(pooled) if pooled else "none"), ("; ".join(per_domain) or "none")


def write_report(out: Path, *, seed_dir: Path, steps: int, tokens: int, evals: dict, analyses: dict,
                 seconds: float) -> Path:
    seed_info = json.loads((seed_dir / "upcycle_seed.json").read_text()) if (seed_dir / "upcycle_seed.json").is_file() \
        else {}
    lines = [
        "# upcycle demo: Drop-Upcycling vs naive upcycling, in miniature",
        "",
        f"Dense seed: `{seed_dir.relative_to(REPO) if seed_dir.is_relative_to(REPO) else seed_dir}` "
        f"({seed_info.get('summary', 'a small Llama-style model')}). Both MoEs have 8 experts, "
        "top-2, and were converted with `upcycle convert` (drop: r = 0.5, independent index sets, the authors' "
        "released code) and trained with `upcycle train` on the same data, in the same order, with the same recipe.",
        "",
        f"**How short this run is:** {steps} optimizer steps, {tokens:,} training tokens per arm, on the committed "
        f"corpus sample, in {seconds / 60:.1f} minutes for the whole demo on this machine. The paper trains for "
        "500B tokens. Over a budget this small, naive upcycling is expected to look as good as or better than "
        "Drop-Upcycling: it starts from the dense model's exact function, while Drop-Upcycling first has to recover "
        "from re-drawing half of each expert. The paper's claim is about the long run (Drop-Upcycling overtakes after "
        "tens of billions of tokens); nothing here tests that claim.",
        "",
        f"The paper's long-run claim is tested in the comparison study, "
        f"[docs/experiments.md]({_link(out, EXPERIMENTS)}).",
        "",
        "## Training loss",
        "",
        "![training loss](loss.png)",
        "",
        "## Per-domain validation loss and perplexity (held-out documents of the sample)",
        "",
        *_table(evals),
        "",
        "## Routing (share of top-k assignments per expert, per domain; dashed line: uniform 1/E)",
        "",
    ]
    for arm, analysis in analyses.items():
        lines += [f"### {arm}", "", f"![routing {arm}](routing_{arm}.png)", ""]
        spec = analysis.get("layers", [])
        if spec:
            lines.append("| layer | domain specialization (mean JSD) | dead experts (all domains) | "
                         "dead experts per domain |")
            lines.append("| --- | --- | --- | --- |")
            for layer in spec:
                pooled, per_domain = dead_expert_cells(layer)
                lines.append(f"| {layer['layer']} | {layer['specialization_jsd']:.4f} | {pooled} | {per_domain} |")
            lines.append("")
    lines += [
        "Files: `naive/`, `drop/` (converted checkpoints with their manifests), `train-naive/`, `train-drop/` "
        "(metrics.jsonl, checkpoints), `eval.json`, `analysis-naive/`, `analysis-drop/`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output directory (replaced)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the config's)")
    parser.add_argument("--seed-model", type=Path, default=SEED_DIR, help="dense HF checkpoint to upcycle")
    args = parser.parse_args(argv)
    seed_dir = args.seed_model

    from upcycle.eval.analyze import analyze, plot_routing
    from upcycle.eval.evaluate import evaluate
    from upcycle.train.trainer import run_training
    from upcycle.train.config import load_config

    if not (seed_dir / "config.json").is_file():
        raise SystemExit(f"no seed model in {seed_dir}; is this a complete clone?")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    with _Stage("tokenizing the committed 3-domain sample"):
        data_dir = out / "data"
        prepare({d: [SAMPLE_DIR / f"{d}.train.jsonl.gz"] for d in DOMAINS}, data_dir, seed_dir,
                val_sources={d: [SAMPLE_DIR / f"{d}.val.jsonl.gz"] for d in DOMAINS}, progress=False)

    for arm, options in ARMS.items():
        with _Stage(f"upcycle convert: {arm} (8 experts, top-2)"):
            convert(seed_dir, out / arm, num_experts=8, top_k=2, dtype="float32", progress=False, **options)

    runs = {}
    for arm in ARMS:
        with _Stage(f"upcycle train: {arm}"):
            overrides = [f"init.source={out / arm}", f"data.path={data_dir}"]
            if args.steps is not None:
                overrides.append(f"train.max_steps={args.steps}")
            config = load_config(DEMO_CONFIG, overrides)
            runs[arm] = out / f"train-{arm}"
            run_training(config, runs[arm])
            if _read_metrics(runs[arm])[-1]["step"] != config.train.max_steps:
                # the trainer saved a checkpoint and returned on SIGTERM; a demo cut short must not report
                raise SystemExit(f"training of {arm} stopped early; rerun `make demo`")
    steps = config.train.max_steps
    tokens = _read_metrics(runs["drop"])[-1]["tokens"]

    with _Stage("upcycle eval: dense seed, naive, drop (per domain)"):
        models = {"dense seed": seed_dir,
                  **{f"{arm}, before training": out / arm for arm in ARMS},
                  **{f"{arm}, after training": _final_checkpoint(run) for arm, run in runs.items()}}
        evals = {name: evaluate(path, data_dir, seq_len=config.data.seq_len) for name, path in models.items()}
        (out / "eval.json").write_text(json.dumps(evals, indent=2, default=str))

    analyses = {}
    with _Stage("upcycle analyze: routing per domain and layer"):
        for arm, run in runs.items():
            analyses[arm] = analyze(_final_checkpoint(run), data_dir, out / f"analysis-{arm}", manifest_dir=out / arm,
                                    dense_path=seed_dir, seq_len=config.data.seq_len)
            plot_routing(analyses[arm], out / f"routing_{arm}.png", title=f"{arm} upcycling, after training")
        def mean_loss(name: str) -> float:
            domains = evals[name]["domains"]
            return sum(d["loss"] for d in domains.values()) / len(domains)

        plot_losses(runs, out / "loss.png", dense_val=mean_loss("dense seed"),
                    initial_val={arm: mean_loss(f"{arm}, before training") for arm in ARMS})

    report = write_report(out, seed_dir=seed_dir, steps=steps, tokens=tokens, evals=evals, analyses=analyses,
                          seconds=time.perf_counter() - start)
    print(f"\n{report.read_text()}")
    print(f"report: {report} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
