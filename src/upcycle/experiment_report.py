"""The outputs of `upcycle experiment`, made from the finished arms' arm.json files alone (so they are cheap to
rewrite): OUT/results.json, OUT/report.md and the figures

    loss_curves.png      validation loss per domain and mean against training tokens, every arm, log token axis
    specialization.png   domain specialization of the routing (mean pairwise JSD) against training tokens, MoE arms
    similarity.png       mean pairwise cosine similarity of a layer's experts against training tokens, MoE arms
    routing_NAME.png     per-domain share of top-k assignments per expert at the end of MoE arm NAME
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from upcycle.experiment import (MOE_KINDS, RESULTS_FILE, REPORT_FILE, ExperimentConfig, gap_to_reference,
                                 tokens_to_target)

RESULT_FIELDS = ("name", "method", "ratio", "index_mode", "convert", "from_arm", "num_experts", "top_k", "tokens",
                 "steps", "active_params", "total_params",
                 "flops", "final", "curve", "tokens_to_naive_final", "specialization", "similarity", "routing_final",
                 "data_sha256", "data_sha256_by_step", "branches", "seconds")


def display_path(path: str) -> str:
    """A path relative to the current directory when it lies below it (results read the same on every machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_results(config: ExperimentConfig, arms: list[dict], *, tokens_per_step: int) -> dict:
    """results.json: every arm with its curve and the efficiency number, tokens to reach naive's final mean loss."""
    naive = next((arm for arm in arms if arm["method"] == "naive"), None)
    target = naive["final"]["mean"] if naive else None
    out_arms = []
    for arm in arms:
        entry = {key: arm.get(key) for key in RESULT_FIELDS if key in arm or key == "tokens_to_naive_final"}
        entry["tokens_to_naive_final"] = None if target is None else tokens_to_target(
            [(p["tokens"], p["mean"]) for p in arm["curve"]], target)
        entry["gap_to_naive"] = None if naive is None else gap_to_reference(arm["curve"], naive["curve"])
        out_arms.append(entry)
    moe_hashes = {arm["data_sha256"] for arm in arms if arm["method"] in MOE_KINDS}
    return {
        "seed_model": display_path(config.seed_model), "seed": config.seed, "num_experts": config.num_experts,
        "top_k": config.top_k, "domains": config.domains, "budget_tokens": config.budget_tokens,
        "tokens_per_step": tokens_per_step,
        "eval_tokens": [p["tokens"] for p in arms[0]["curve"]] if arms else [],
        "reference": {"arm": naive["name"] if naive else None, "final_mean": target},
        "same_data_order": len(moe_hashes) <= 1,
        "arms": out_arms,
    }


def write_outputs(out: Path, config: ExperimentConfig, arms: list[dict], *, tokens_per_step: int,
                  threads: int) -> dict:
    results = build_results(config, arms, tokens_per_step=tokens_per_step)
    figures = [plot_loss_curves(results, out / "loss_curves.png")]
    if results["reference"]["arm"] is not None:
        figures.append(plot_gap_to_naive(results, out / "gap_to_naive.png"))
    moe = [arm for arm in results["arms"] if arm["method"] in MOE_KINDS]
    if moe:
        figures.append(plot_over_training(results, out / "specialization.png", "specialization", "jsd",
                                          "domain specialization (mean pairwise JSD of routing)"))
        figures.append(plot_over_training(results, out / "similarity.png", "similarity", "cosine",
                                          "expert similarity (mean pairwise cosine)"))
        for arm in moe:
            figures.append(plot_arm_routing(arm, config, out / f"routing_{arm['name']}.png"))
    _atomic_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    _atomic_text(out / REPORT_FILE, report_markdown(results, config, threads=threads))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(arm: dict, index: int) -> dict:
    if arm["method"] == "dense":
        return {"color": "black", "linestyle": ":", "marker": "."}
    return {"color": f"C{index % 10}", "linestyle": "-", "marker": "o", "markersize": 3}


def plot_loss_curves(results: dict, path: Path) -> Path:
    """Fig. 3 style: one panel per domain plus the mean; validation CE against training tokens (log axis)."""
    plt = _pyplot()
    panels = ["mean", *results["domains"]]
    columns = min(len(panels), 2)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 3.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for index, arm in enumerate(results["arms"]):
            points = [(p["tokens"], p[panel]) for p in arm["curve"] if p["tokens"] > 0]
            if points:
                ax.plot(*zip(*points), label=arm["name"], **_style(arm, index))
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("mean of domains" if panel == "mean" else panel, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle("validation loss against training tokens (same recipe, data order and budget)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gap_to_naive(results: dict, path: Path) -> Path:
    """Each arm's mean validation loss minus naive upcycling's at the same tokens: where the loss curves of the arms
    near the end crowd together, this shows who is ahead and whether a gap is closing. Symmetric-log loss axis, so a
    gap of 5 nats early and of 0.01 late are both readable; below 0 the arm is ahead of naive."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, arm in enumerate(results["arms"]):
        if arm["name"] == results["reference"]["arm"] or not arm.get("gap_to_naive"):
            continue
        points = [(p["tokens"], p["mean"]) for p in arm["gap_to_naive"] if p["tokens"] > 0]
        if points:
            ax.plot(*zip(*points), label=arm["name"], **_style(arm, index))
    ax.axhline(0.0, color="gray", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"mean loss minus {results['reference']['arm']}'s (nats; symlog)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_over_training(results: dict, path: Path, key: str, value: str, ylabel: str) -> Path:
    """A per-arm quantity against training tokens, the untrained model (0 tokens) included: symmetric-log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    first = min((t for t in results["eval_tokens"] if t > 0), default=1)
    for index, arm in enumerate(results["arms"]):
        points = [(p["tokens"], p[value]) for p in arm.get(key) or [] if p[value] is not None]
        if points:
            ax.plot(*zip(*points), label=arm["name"], **_style(arm, index))
    ax.set_xscale("symlog", linthresh=first)
    ax.set_xlim(left=0)
    ax.set_xlabel("training tokens (0 = before training; log scale above the first evaluation point)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_arm_routing(arm: dict, config: ExperimentConfig, path: Path) -> Path:
    """Fig. 5 style, through analyze's routing figure: share of each domain's top-k assignments per expert."""
    from upcycle.analyze import default_plot_layers, plot_routing

    routing = arm["routing_final"]
    analysis = {"num_experts": arm.get("num_experts") or config.num_experts, "num_layers": len(routing),
                "domains": config.domains,
                "layers": [{"layer": i, "routing": {d: {"share": shares[d]} for d in config.domains}}
                           for i, shares in enumerate(routing)]}
    return plot_routing(analysis, path, default_plot_layers(len(routing)),
                        title=f"{arm['name']} after {arm['tokens']:,} tokens")


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _arm_label(arm: dict) -> str:
    label = arm["method"]
    if arm["method"] in ("drop", "noise"):
        label = f"{arm['method']} r={arm['ratio']:g} ({arm['index_mode']})"
    if arm["method"] == "grow":
        label = (f"grow of {arm['from_arm']} to {arm['num_experts']} experts, top-{arm['top_k']}, r={arm['ratio']:g} "
                 f"({arm['index_mode']})")
    if arm["method"] == "continue":
        label = f"{arm['from_arm']} trained further ({arm['num_experts']} experts, top-{arm['top_k']})"
    extra = arm.get("convert") or {}
    return label + "".join(f", {key} {value}" for key, value in extra.items())


def _loss_cell(loss: float) -> str:
    return f"{loss:.3f} ({math.exp(loss):.1f})"


def report_markdown(results: dict, config: ExperimentConfig, *, threads: int) -> str:
    domains = results["domains"]
    reference = results["reference"]
    recipe = config.recipe
    lines = [
        "# upcycle experiment",
        "",
        f"Seed model `{results['seed_model']}`; MoE arms have {results['num_experts']} experts, top-{results['top_k']} "
        "(grow arms: as their row says). "
        f"Every arm trains {results['budget_tokens']:,} tokens ({results['budget_tokens'] // results['tokens_per_step']} "
        f"steps of {results['tokens_per_step']:,} tokens) with one recipe, seed {results['seed']}, and is measured at "
        f"{len(results['eval_tokens'])} points (0 = before training): "
        f"{', '.join(f'{t:,}' for t in results['eval_tokens'])} tokens. Domains: {', '.join(domains)}.",
        "",
        f"Recipe: `{json.dumps(recipe, sort_keys=True)}`.",
        "",
        "## Final validation loss (perplexity), training FLOPs, and tokens to reach naive upcycling's final loss",
        "",
        "| arm | init | tokens | FLOPs | " + " | ".join(domains) + " | mean | tokens to naive's final |",
        "|" + " --- |" * (6 + len(domains)),
    ]
    for arm in results["arms"]:
        reach = arm["tokens_to_naive_final"]
        reach_text = "-" if reference["final_mean"] is None else ("not reached" if reach is None else f"{reach:,}")
        tokens = f"{arm['tokens']:,}"
        if arm.get("branches"):
            tokens += f" + {arm['branches']['tokens']:,} in branches"
        cells = [arm["name"], _arm_label(arm), tokens, f"{arm['flops']:.3g}",
                 *[_loss_cell(arm["final"][d]) for d in domains], _loss_cell(arm["final"]["mean"]), reach_text]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Loss: cross-entropy in nats per token on each domain's fixed validation sequences (perplexity = exp(loss)); "
        "mean: the unweighted mean over domains. FLOPs: 6 x parameters active per token (embeddings included, only "
        "top-k experts counted) x training tokens; btx adds its dense branches (6 x dense parameters x branch tokens). "
        + ("Tokens to naive's final: the first training-token count at which the arm's mean validation loss reaches "
           f"`{reference['arm']}`'s final mean ({reference['final_mean']:.4f}), interpolated linearly between the two "
           "evaluation points around the crossing (btx: tokens of its MoE phase, branches not counted)."
           if reference["final_mean"] is not None else "No naive arm, so no efficiency column."),
        "",
        "## Validation loss against training tokens",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    if reference["final_mean"] is not None:
        others = [arm for arm in results["arms"] if arm["name"] != reference["arm"]]
        lines += [
            f"## Gap to `{reference['arm']}` (mean loss minus its, nats; negative: ahead)",
            "",
            "![gap to naive](gap_to_naive.png)",
            "",
            "| tokens | " + " | ".join(arm["name"] for arm in others) + " |",
            "| --- |" + " --- |" * len(others),
        ]
        gaps = [{p["tokens"]: p["mean"] for p in arm["gap_to_naive"]} for arm in others]
        for tokens in results["eval_tokens"]:
            cells = [f"{gap[tokens]:+.3f}" if tokens in gap else "-" for gap in gaps]
            lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
        lines.append("")
    moe = [arm for arm in results["arms"] if arm["method"] in MOE_KINDS]
    if moe:
        lines += [
            "## Domain specialization and expert similarity over training",
            "",
            "Specialization: per MoE layer, the mean Jensen-Shannon divergence (base 2, 0..1) between the domains' "
            "distributions of top-k assignments over experts, averaged over layers; 0 means every domain is routed "
            "alike. Similarity: per layer, the mean pairwise cosine similarity between experts' flattened weights "
            "(gate, up, down), averaged over layers; naive upcycling starts at 1.0 (identical copies).",
            "",
            "![specialization](specialization.png)",
            "",
            "![similarity](similarity.png)",
            "",
            "| arm | JSD before | JSD after | cosine before | cosine after |",
            "| --- | --- | --- | --- | --- |",
        ]
        for arm in moe:
            spec, sim = arm["specialization"], arm["similarity"]
            fmt = (lambda v: "-" if v is None else f"{v:.4f}")
            lines.append(f"| {arm['name']} | {fmt(spec[0]['jsd'])} | {fmt(spec[-1]['jsd'])} | "
                         f"{fmt(sim[0]['cosine'])} | {fmt(sim[-1]['cosine'])} |")
        lines += ["", "## Routing at the end of training (share of top-k assignments per expert and domain; dashed: "
                  "uniform 1/E)", ""]
        for arm in moe:
            lines += [f"![routing {arm['name']}](routing_{arm['name']}.png)", ""]
    lines += [
        "## Data order",
        "",
        "Running SHA-256 of the token ids each arm consumed (logged by the trainer); equal values mean the same "
        "tokens in the same order. "
        + ("Every MoE arm consumed the identical stream." if results["same_data_order"]
           else "**The MoE arms did not consume the same stream.**"),
        "",
        "| arm | data_sha256 |",
        "| --- | --- |",
        *[f"| {arm['name']} | `{arm['data_sha256']}` |" for arm in results["arms"]],
        "",
        f"Wall time of the last (re)start of each arm ({threads} torch thread(s) in all): "
        + ", ".join(f"{arm['name']} {arm['seconds']:.0f} s" for arm in results["arms"] if arm.get("seconds") is not None)
        + ".",
        "",
    ]
    return "\n".join(lines)
