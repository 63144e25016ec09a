"""The outputs of `upcycle experiment` (and of `--rescore`), made from the finished runs' arm.json files alone, so
they are cheap to rewrite: results.json, report.md and the figures

    loss_curves.png      validation loss against training tokens: each budget's end-of-schedule value (markers, solid)
                         and the mid-schedule points of the longest run (dashed); seed mean, 95% interval across seeds
    gap_to_naive.png     each arm's mean loss minus naive's, paired by seed, at the budgets' ends (with intervals) and
                         mid-schedule (dashed)
    specialization.png   domain specialization of the routing (mean pairwise JSD), MoE arms
    similarity.png       mean pairwise cosine similarity of a layer's experts, MoE arms
    routing_NAME.png     per-domain share of top-k assignments per expert at the end of MoE arm NAME's longest run
                         (its first seed)

The statistics are experiment_stats' functions; nothing here trains or measures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from upcycle.experiment import stats as stats
from upcycle.eval.analyze import default_plot_layers, plot_routing, pyplot
from upcycle.experiment.config import FROM_ARM_FIELDS, MOE_KINDS
from upcycle.files import atomic_path, atomic_write

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
MEANS = ("mean", "mixture")  # over domains: equal weights; weighted by the training mixture
MEAN_LABEL = {"mean": "mean over domains", "mixture": "mixture-weighted mean"}


def display_path(path: str) -> str:
    """A path relative to the current directory when it lies below it (results read the same on every machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


# ---------------------------------------------------------------------------------------------------------------------
# results.json


def _point_means(val: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """A measurement's per-domain losses plus both means."""
    mean = float(np.mean([val[d] for d in sorted(val)]))
    total = sum(weights[d] for d in val)
    mixture = float(sum(val[d] * weights[d] for d in val) / total) if total else mean
    return {**val, "mean": mean, "mixture": mixture}


class _Bootstrap:
    """One paired resample of the validation documents for the whole report, applied to any per-document gap."""
    def __init__(self, validation: dict, resamples: int):
        self.doc_tokens = {d: np.asarray(v["doc_tokens"], dtype=np.float64) for d, v in validation["domains"].items()}
        self.weights = validation["mixture_weights"]
        self.counts = stats.bootstrap_counts({d: len(t) for d, t in self.doc_tokens.items()}, resamples)

    def gap_intervals(self, doc_gaps: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
        """The 95% bootstrap intervals of a (seed-mean) gap's mean over domains and mixture-weighted mean, from its
        per-document loss-sum differences {domain: (documents,)}."""
        per_domain = {d: stats.domain_estimates(self.counts[d], doc_gaps[d][:, None], self.doc_tokens[d])[:, 0]
                      for d in doc_gaps}
        out = {}
        for key, weights in (("mean", {d: 1.0 for d in per_domain}), ("mixture", self.weights)):
            low, high = stats.percentile_interval(stats.weighted_over_domains(per_domain, weights))
            out[key] = (float(low), float(high))
        return out


def _gap_entry(arm_points: list[dict], ref_points: list[dict], boot: _Bootstrap | None, domains: list[str]) -> dict:
    """The gap to the reference at one point, paired by seed: per key its seed mean and 95% interval across seeds, the
    bootstrap interval over documents, and the verdict (ahead / behind / level)."""
    entry = {}
    doc_gaps = None
    if boot is not None and all("doc_loss" in p for p in arm_points + ref_points):
        doc_gaps = {d: np.mean([np.asarray(a["doc_loss"][d]) - np.asarray(r["doc_loss"][d])
                                for a, r in zip(arm_points, ref_points)], axis=0) for d in domains}
        boot_intervals = boot.gap_intervals(doc_gaps)
    for key in (*MEANS, *domains):
        interval = stats.seed_interval([a[key] - r[key] for a, r in zip(arm_points, ref_points)])
        if key in MEANS:
            low, high = boot_intervals[key] if doc_gaps is not None else (None, None)
            interval.update(bootstrap_low=low, bootstrap_high=high,
                            verdict=stats.verdict([(interval["low"], interval["high"]), (low, high)]))
        entry[key] = interval
    return entry


def _losses(points: list[dict], domains: list[str]) -> dict:
    return {key: stats.seed_interval([p[key] for p in points]) for key in (*MEANS, *domains)}


def _optional_interval(values: list[float | None]) -> dict | None:
    known = [v for v in values if v is not None]
    return stats.seed_interval(known) if len(known) == len(values) and known else None


def _reach(per_seed: list[int | None]) -> dict:
    """Per-seed token counts (None: not reached) with their interval when every seed reached."""
    known = [v for v in per_seed if v is not None]
    out = {"per_seed": per_seed, "reached": len(known), "of": len(per_seed)}
    if known and len(known) == len(per_seed):
        out.update(stats.seed_interval(known))
    return out


def build_results(units: list[dict], validation: dict, *, header: dict, arm_names: list[str],
                  resamples: int) -> dict:
    """results.json from every (arm, seed) run's arm.json: per arm, each seed's run and the aggregates across seeds
    (end-of-schedule losses per budget, mid-schedule curve, gaps to naive with both intervals and a verdict, tokens to
    reach naive's end-of-schedule loss and the crossing point from end-of-schedule values only, gaps at equal FLOPs)."""
    domains = header["domains"]
    weights = validation["mixture_weights"]
    by_arm = {name: sorted((u for u in units if u["name"] == name), key=lambda u: u["seed"]) for name in arm_names}
    for arm_units in by_arm.values():
        for unit in arm_units:
            for point in unit["budgets"] + unit["curve"]:
                point.update(_point_means(point["val"], weights))
    reference = next((name for name in arm_names if by_arm[name][0]["method"] == "naive"), None)
    ref_units = by_arm[reference] if reference else None
    boot = _Bootstrap(validation, resamples)
    out_arms = []
    for name in arm_names:
        arm_units = by_arm[name]
        first = arm_units[0]
        arm = {key: first.get(key) for key in ("name", "method", "ratio", "index_mode", "convert")}
        arm.update({key: first[key] for key in FROM_ARM_FIELDS if key in first})  # grow and continue
        arm.update(active_params=first.get("active_params"), total_params=first.get("total_params"))
        budgets = []
        for i, tokens in enumerate(header["budgets"]):
            points = [u["budgets"][i] for u in arm_units]
            entry = {"tokens": tokens, "flops": first["budgets"][i]["flops"], "loss": _losses(points, domains),
                     "jsd": _optional_interval([p.get("jsd") for p in points]),
                     "cosine": _optional_interval([p.get("cosine") for p in points])}
            if ref_units is not None:
                ref_points = [u["budgets"][i] for u in ref_units]
                entry["gap"] = _gap_entry(points, ref_points, boot, domains)
                entry["gap_equal_flops"] = _optional_interval([
                    _gap_at_equal_flops(u, r, i) for u, r in zip(arm_units, ref_units)])
            budgets.append(entry)
        arm["budgets"] = budgets
        curve = []
        for j, point in enumerate(first["curve"]):
            points = [u["curve"][j] for u in arm_units]
            entry = {"tokens": point["tokens"], "loss": _losses(points, domains),
                     "jsd": _optional_interval([p.get("jsd") for p in points]),
                     "cosine": _optional_interval([p.get("cosine") for p in points])}
            if ref_units is not None:
                entry["gap"] = _gap_entry(points, [u["curve"][j] for u in ref_units], boot, domains)
            curve.append(entry)
        arm["curve"] = curve
        if ref_units is not None:
            arm["tokens_to_naive"] = _reach([stats.tokens_to_target(_end_curve(u, "mean"),
                                                                    r["budgets"][-1]["mean"])
                                             for u, r in zip(arm_units, ref_units)])
            arm["crossing"] = _reach([stats.crossing([(t, a - b) for (t, a), (_, b) in
                                                      zip(_end_curve(u, "mean"), _end_curve(r, "mean"))])
                                      for u, r in zip(arm_units, ref_units)])
        arm["seeds"] = [_seed_record(u, domains) for u in arm_units]
        out_arms.append(arm)
    same_order = {}
    for index, seed in enumerate(header["seeds"]):
        hashes = {by_arm[name][index]["budgets"][-1].get("data_sha256") for name in arm_names}
        same_order[str(seed)] = len(hashes) == 1
    return {**header, "validation": {k: v for k, v in validation.items() if k != "domains"}
            | {"domains": {d: {k: v for k, v in info.items() if k != "doc_tokens"}
                           for d, info in validation["domains"].items()}},
            "confidence": stats.CONFIDENCE, "bootstrap_resamples": resamples, "reference": reference,
            "same_data_order": same_order, "arms": out_arms}


def _untrained(unit: dict) -> dict | None:
    curve = unit["curve"]
    return curve[0] if curve and curve[0]["tokens"] == 0 else None


def _end_curve(unit: dict, key: str) -> list[tuple[int, float]]:
    """The untrained model and every budget's end-of-schedule value: the curve that crossing points and tokens to a
    loss are read from (never from mid-schedule points, which mix schedule phases)."""
    start = [(0, _untrained(unit)[key])] if _untrained(unit) else []
    return start + [(b["tokens"], b[key]) for b in unit["budgets"]]


def _gap_at_equal_flops(unit: dict, ref: dict, index: int) -> float | None:
    """The arm's end-of-schedule mean loss at budget `index` minus naive's at the same training FLOPs, naive's
    end-of-schedule values interpolated linearly in FLOPs between its budgets; None outside them (below naive's
    first budget the curve is not known well enough to interpolate). Both of the same seed."""
    curve = [(b["flops"], b["mean"]) for b in ref["budgets"]]
    at = stats.interpolate([x for x, _ in curve], [y for _, y in curve], unit["budgets"][index]["flops"])
    return None if at is None else unit["budgets"][index]["mean"] - at


def _seed_record(unit: dict, domains: list[str]) -> dict:
    """One seed's run as results.json keeps it (no per-document sums)."""
    def plain(point: dict) -> dict:
        return {k: v for k, v in point.items() if k not in ("doc_loss", "val", "routing", "jsd_layers",
                                                             "cosine_layers")}

    record = {k: v for k, v in unit.items() if k not in ("budgets", "curve", "name", "method", "ratio", "index_mode",
                                                         "convert", *FROM_ARM_FIELDS)}
    record["budgets"] = [plain(b) for b in unit["budgets"]]
    record["curve"] = [plain(p) for p in unit["curve"]]
    return record


def write_outputs(out: Path, results: dict, *, title: str = "upcycle experiment", recipe: dict | None = None
                  ) -> dict:
    """results.json, report.md and the figures into directory `out`."""
    figures = [plot_loss_curves(results, out / "loss_curves.png")]
    if results["reference"] is not None:
        figures.append(plot_gap_to_naive(results, out / "gap_to_naive.png"))
    moe = [arm for arm in results["arms"] if is_moe(arm)]
    if moe:
        figures.append(plot_over_training(results, out / "specialization.png", "jsd",
                                          "domain specialization (mean pairwise JSD of routing)"))
        figures.append(plot_over_training(results, out / "similarity.png", "cosine",
                                          "expert similarity (mean pairwise cosine)"))
        for arm in moe:
            routing = arm["seeds"][0].get("routing_final")
            if routing:
                figures.append(plot_arm_routing(arm, routing, results, out / f"routing_{arm['name']}.png"))
    atomic_write(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    atomic_write(out / REPORT_FILE, report_markdown(results, title=title, recipe=recipe))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def is_moe(arm: dict) -> bool:
    """An MoE arm's results (a continue arm is one when the arm it starts from is)."""
    return arm["method"] in MOE_KINDS or bool(arm.get("num_experts"))


def _style(arm: dict, index: int) -> dict:
    if arm["method"] == "dense":
        return {"color": "black", "marker": "."}
    return {"color": f"C{index % 10}", "marker": "o", "markersize": 3}


def _save(fig, plt, path: Path) -> Path:
    """savefig written atomically (files.atomic_path), naming `path` if the write fails."""
    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


def _band(ax, points: list[tuple[float, dict]], style: dict, label: str | None, linestyle: str) -> None:
    """Seed means joined by a line, with the 95% interval across seeds as a band where there is one."""
    points = [(t, v) for t, v in points if t > 0 and v is not None]
    if not points:
        return
    xs = [t for t, _ in points]
    ax.plot(xs, [v["mean"] for _, v in points], linestyle=linestyle, label=label, **style)
    if all(v["low"] is not None for _, v in points):
        ax.fill_between(xs, [v["low"] for _, v in points], [v["high"] for _, v in points], color=style["color"],
                        alpha=0.15, linewidth=0)


def plot_loss_curves(results: dict, path: Path) -> Path:
    """Fig. 3 style, one panel per mean and per domain: each budget's end-of-schedule loss (solid, markers) and the
    longest run's mid-schedule points (dashed), against training tokens on a log axis."""
    plt = pyplot()
    panels = [*MEANS, *results["domains"]]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 3.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for index, arm in enumerate(results["arms"]):
            style = _style(arm, index)
            _band(ax, [(b["tokens"], b["loss"][panel]) for b in arm["budgets"]], style, arm["name"], "-")
            _band(ax, [(p["tokens"], p["loss"][panel]) for p in arm["curve"]], {**style, "marker": None}, None, "--")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(MEAN_LABEL.get(panel, panel), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(max(len(labels), 1), 8), fontsize=8)
    fig.suptitle("validation loss: end of each budget's schedule (solid) and mid-schedule (dashed); "
                 f"{len(results['seeds'])} seed(s), 95% interval across seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, plt, path)


def plot_gap_to_naive(results: dict, path: Path) -> Path:
    """Each arm's mean loss minus naive's, paired by seed: at the end of each budget's schedule (markers, with the
    interval across seeds as error bars) and mid-schedule along the longest run (dashed). Symmetric-log loss axis, so
    early gaps of nats and late ones of hundredths are both readable; below 0 the arm is ahead of naive."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for index, arm in enumerate(results["arms"]):
        if arm["name"] == results["reference"]:
            continue
        style = _style(arm, index)
        ends = [(b["tokens"], b["gap"]["mean"]) for b in arm["budgets"]]
        ax.plot([t for t, _ in ends], [g["mean"] for _, g in ends], label=arm["name"], **style)
        if all(g["low"] is not None for _, g in ends):
            ax.errorbar([t for t, _ in ends], [g["mean"] for _, g in ends],
                        yerr=[[g["mean"] - g["low"] for _, g in ends], [g["high"] - g["mean"] for _, g in ends]],
                        fmt="none", ecolor=style["color"], capsize=3)
        mid = [(p["tokens"], p["gap"]["mean"]["mean"]) for p in arm["curve"] if p["tokens"] > 0]
        if mid:
            ax.plot(*zip(*mid), linestyle="--", color=style["color"], alpha=0.5)
    ax.axhline(0.0, color="gray", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"mean loss minus {results['reference']}'s (nats; symlog)")
    ax.set_title("end of schedule (markers, 95% interval across seeds) and mid-schedule (dashed)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_over_training(results: dict, path: Path, key: str, ylabel: str) -> Path:
    """A per-arm quantity (seed mean) against training tokens, the untrained model (0 tokens) included: the longest
    run's points (dashed) and each budget's end (solid)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    first = min([p["tokens"] for arm in results["arms"] for p in arm["curve"] if p["tokens"] > 0]
                + [b for b in results["budgets"]])
    for index, arm in enumerate(results["arms"]):
        style = _style(arm, index)
        mid = [(p["tokens"], p[key]["mean"]) for p in arm["curve"] if p.get(key)]
        ends = [(b["tokens"], b[key]["mean"]) for b in arm["budgets"] if b.get(key)]
        if mid:
            ax.plot(*zip(*mid), linestyle="--", color=style["color"], alpha=0.6)
        if ends:
            ax.plot(*zip(*ends), label=arm["name"], **style)
    ax.set_xscale("symlog", linthresh=first)
    ax.set_xlim(left=0)
    ax.set_xlabel("training tokens (0 = before training; log scale above the first point)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_arm_routing(arm: dict, routing: list[dict], results: dict, path: Path) -> Path:
    """Fig. 5 style, through analyze's routing figure: share of each domain's top-k assignments per expert."""
    domains = results["domains"]
    analysis = {"num_experts": arm.get("num_experts") or results["num_experts"], "num_layers": len(routing),
                "domains": domains,
                "layers": [{"layer": i, "routing": {d: {"share": shares[d]} for d in domains}}
                           for i, shares in enumerate(routing)]}
    with atomic_path(path, keep_suffix=True) as tmp:
        plot_routing(analysis, tmp, default_plot_layers(len(routing)),
                     title=f"{arm['name']} (seed {arm['seeds'][0]['seed']}) after {results['budgets'][-1]:,} tokens")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _arm_label(arm: dict) -> str:
    label = arm["method"]
    if arm["method"] in ("drop", "noise"):
        label = f"{arm['method']} r={arm['ratio']:g} ({arm['index_mode']})"
    shape = f"{arm.get('num_experts')} experts, top-{arm.get('top_k')}" if arm.get("num_experts") else "dense"
    if arm["method"] == "grow":
        label = f"grow of {arm['from_arm']} to {shape}, r={arm['ratio']:g} ({arm['index_mode']})"
    if arm["method"] == "continue":
        label = f"{arm['from_arm']} trained further ({shape})"
    extra = arm.get("convert") or {}
    return label + "".join(f", {key} {value}" for key, value in extra.items())


def _interval_text(interval: dict | None, digits: int = 3, signed: bool = False) -> str:
    if interval is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{interval['mean']:{sign}.{digits}f}"
    if interval.get("low") is not None:
        text += f" [{interval['low']:{sign}.{digits}f}, {interval['high']:{sign}.{digits}f}]"
    return text


def _gap_text(gap: dict) -> str:
    text = _interval_text(gap, signed=True)
    if gap.get("bootstrap_low") is not None:
        text += f" docs [{gap['bootstrap_low']:+.3f}, {gap['bootstrap_high']:+.3f}]"
    return f"{text} **{gap['verdict']}**" if "verdict" in gap else text


def _reach_text(reach: dict | None) -> str:
    """Tokens (one seed's, or the seeds' mean and interval), or in how many seeds it happened and where."""
    if reach is None:
        return "-"
    values = ", ".join("none" if v is None else f"{v:,}" for v in reach["per_seed"])
    if reach["of"] == 1:
        return values
    if reach["reached"] < reach["of"]:
        return f"in {reach['reached']} of {reach['of']} seeds ({values})"
    return f"{reach['mean']:,.0f} [{reach['low']:,.0f}, {reach['high']:,.0f}]"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, the separator and one line per row (cells already text)."""
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [row(headers), "|" + " --- |" * len(headers), *map(row, rows)]


def report_markdown(results: dict, *, title: str = "upcycle experiment", recipe: dict | None = None) -> str:
    """report.md, section by section: the design and the validation tokens, the end-of-schedule losses, the gaps to
    the reference arm, the loss curves, specialization and similarity, routing, the data order and the wall times."""
    moe = [arm for arm in results["arms"] if is_moe(arm)]
    sections = [_design_section(results, title, recipe), _loss_section(results), _gap_section(results),
                _curves_section(), _specialization_section(moe), _routing_section(moe), _data_order_section(results),
                _times_section(results)]
    return "\n".join(line for section in sections for line in section)


def _design_section(results: dict, title: str, recipe: dict | None) -> list[str]:
    """The title, what was trained (seed model, MoE shape, seeds, budgets, schedule, domains), what was scored, and
    the recipe."""
    schedule, validation, per_step = results["schedule"], results["validation"], results["tokens_per_step"]
    from_arm = (" (grow and continue arms: as their init says; they start from another arm's final model at the same "
                "seed and are trained for every budget from there)" if any(a.get("from_arm") for a in results["arms"])
                else "")
    if schedule["kind"] == "wsd":
        schedules = ("warmup-stable-decay, every budget a decay branch (over the last "
                     f"{schedule['decay_fraction']:.0%} of its steps) taken off one stable run per arm and seed.")
    else:
        schedules = "a cosine schedule of the budget's length, one run per budget."
    design = (f"Seed model `{results['seed_model']}`; MoE arms have {results['num_experts']} experts, "
              f"top-{results['top_k']}{from_arm}. Seeds: {', '.join(map(str, results['seeds']))} (every arm at every "
              "seed; a seed sets the data order, the upcycling draws, the router init and the from-scratch init). "
              f"Budgets: {', '.join(f'{t:,}' for t in results['budgets'])} tokens "
              f"({', '.join(str(t // per_step) for t in results['budgets'])} steps of {per_step:,} tokens), each "
              f"ending its own learning-rate schedule: {schedules} Domains: {', '.join(results['domains'])}.")
    scored = ", ".join(f"{d} {v['tokens']:,} tokens ({v['documents']:,} documents, {v['sequences']:,} sequences)"
                       for d, v in validation["domains"].items())
    extent = " (the whole validation split)"
    if (asked := validation["tokens_per_domain"]) is not None:
        # whole sequences are scored (runner.validation_set): eval.tokens is rounded up to a multiple of seq_len
        seq_len = validation["seq_len"]
        measured = -(-asked // seq_len) * seq_len
        extent = (f" (up to {asked:,} tokens per domain)" if measured == asked else
                  f" (up to {measured:,} tokens per domain: eval.tokens {asked:,} rounded up to whole sequences of "
                  f"{seq_len:,})")
    weights = ", ".join(f"{d} {w:.3f}" for d, w in validation["mixture_weights"].items())
    lines = [f"# {title}", "", design, "",
             f"Validation: {scored}{extent}, the same for every arm, seed and point. Mixture weights (the training "
             f"mixture): {weights}.", ""]
    if recipe is not None:
        lines += [f"Recipe: `{json.dumps(recipe, sort_keys=True)}`.", ""]
    return lines


def _loss_section(results: dict) -> list[str]:
    """Every arm's end-of-schedule loss at every budget: per domain and both means."""
    domains = results["domains"]
    across = " [95% interval across seeds]" if len(results["seeds"]) > 1 else ""
    rows = [[arm["name"], _arm_label(arm), f"{budget['tokens']:,}", f"{budget['flops']:.3g}",
             *[_interval_text(budget["loss"][d]) for d in (*domains, *MEANS)]]
            for arm in results["arms"] for budget in arm["budgets"]]
    return [
        f"## End-of-schedule validation loss (nats per token; seed mean{across})",
        "",
        *markdown_table(["arm", "init", "budget (tokens)", "training FLOPs", *domains,
                         *(MEAN_LABEL[m] for m in MEANS)], rows),
        "",
        "Loss: token-weighted cross-entropy per domain; the mean over domains weights the domains equally, the "
        "mixture-weighted mean by the training mixture. FLOPs: 6 x parameters active per token x training tokens "
        "(btx adds its dense branches; grow and continue count their own training, not their source arm's). "
        "End-of-schedule values are measured on the kept bf16 models "
        "(`arms/NAME/seed_S/final/TOKENS`), so `upcycle experiment --rescore` reproduces them.",
        "",
    ]


def _gap_section(results: dict) -> list[str]:
    """Each arm's gap to the reference arm at every budget (with intervals and a verdict), the tokens it takes to
    reach the reference's final loss, and the gaps mid-schedule; nothing without a reference arm."""
    reference, domains = results["reference"], results["domains"]
    if reference is None:
        return []
    others = [arm for arm in results["arms"] if arm["name"] != reference]
    intervals = ("Intervals are 95%: `[low, high]` across seeds (Student t, paired by seed for gaps)"
                 if len(results["seeds"]) > 1 else "One seed, so there is no interval across seeds")
    gaps = [[arm["name"], f"{budget['tokens']:,}", *(_gap_text(budget["gap"][m]) for m in MEANS),
             *[f"{budget['gap'][d]['mean']:+.3f}" for d in domains],
             _interval_text(budget["gap_equal_flops"], signed=True)]
            for arm in others for budget in arm["budgets"]]
    reach = [[arm["name"], _reach_text(arm["tokens_to_naive"]), _reach_text(arm["crossing"])] for arm in others]
    return [
        f"## Gap to `{reference}` at the end of each budget's schedule (nats; negative: ahead)",
        "",
        f"{intervals}; `docs [low, high]`: paired bootstrap over validation documents "
        f"({results['bootstrap_resamples']} resamples of the documents of each domain, the same for every arm and "
        "seed). The verdict is ahead or behind only where every interval excludes zero, level otherwise. At equal "
        f"FLOPs: the arm's mean loss minus `{reference}`'s end-of-schedule loss interpolated linearly in FLOPs "
        "between its budgets, at the arm's FLOPs (`-` outside them).",
        "",
        *markdown_table(["arm", "budget (tokens)", "gap, mean over domains", "gap, mixture-weighted",
                         *(f"gap {d}" for d in domains), "gap at equal FLOPs"], gaps),
        "",
        f"From end-of-schedule values only (the untrained model and each budget's end, interpolated linearly in "
        f"tokens between them): the tokens at which the arm's mean loss reaches `{reference}`'s at the largest "
        f"budget, and where a positive gap to `{reference}` first falls to zero (none: never behind, or never "
        "caught up).",
        "",
        *markdown_table(["arm", f"tokens to {reference}'s end-of-schedule loss at {results['budgets'][-1]:,}",
                         "crossing of the gap"], reach),
        "",
        "![gap to naive](gap_to_naive.png)",
        "",
        *_mid_schedule_gaps(others),
    ]


def _mid_schedule_gaps(others: list[dict]) -> list[str]:
    """The gaps (mean over domains) at the longest run's measuring points, or before training only."""
    if not any(arm["curve"] for arm in others):
        return []
    tokens = [p["tokens"] for p in others[0]["curve"]]
    if any(tokens):
        heading = ["### Mid-schedule gaps along the longest run (mean over domains, nats)", "",
                   "Inside one schedule: the learning rate is still high at these points (and annealing later moves "
                   "gaps), so they are not end-of-schedule comparisons.", ""]
    else:
        heading = ["### Gaps before training (mean over domains, nats)", ""]
    rows = [[f"{t:,}{' (untrained)' if t == 0 else ''}",
             *[_gap_text(arm["curve"][j]["gap"]["mean"]) if j < len(arm["curve"]) else "-" for arm in others]]
            for j, t in enumerate(tokens)]
    return [*heading, *markdown_table(["tokens", *(arm["name"] for arm in others)], rows), ""]


def _curves_section() -> list[str]:
    return ["## Validation loss against training tokens", "", "![loss curves](loss_curves.png)", ""]


def _specialization_section(moe: list[dict]) -> list[str]:
    """The MoE arms' domain specialization (JSD) and expert similarity (cosine), before training and at the end."""
    if not moe:
        return []

    def mean(value: dict | None) -> str:
        return "-" if value is None else f"{value['mean']:.4f}"

    rows = []
    for arm in moe:
        before = arm["curve"][0] if arm["curve"] and arm["curve"][0]["tokens"] == 0 else None
        end = arm["budgets"][-1]
        rows.append([arm["name"], mean(before and before["jsd"]), mean(end["jsd"]), mean(before and before["cosine"]),
                     mean(end["cosine"])])
    return [
        "## Domain specialization and expert similarity",
        "",
        "Specialization: per MoE layer, the mean Jensen-Shannon divergence (base 2, 0..1) between the domains' "
        "distributions of top-k assignments over experts, averaged over layers; 0: every domain routed alike. "
        "Similarity: per layer, the mean pairwise cosine similarity of the experts' flattened weights, averaged "
        "over layers; naive upcycling starts at 1.0. Seed means, before training and at the end of the largest "
        "budget.",
        "",
        *markdown_table(["arm", "JSD before", "JSD at the end", "cosine before", "cosine at the end"], rows),
        "",
        "![specialization](specialization.png)",
        "",
        "![similarity](similarity.png)",
        "",
    ]


def _routing_section(moe: list[dict]) -> list[str]:
    if not moe:
        return []
    lines = ["## Routing at the end of the longest run (first seed; share of top-k assignments per expert and domain; "
             "dashed: uniform 1/E)", ""]
    for arm in moe:
        lines += [f"![routing {arm['name']}](routing_{arm['name']}.png)", ""]
    return lines


def _data_order_section(results: dict) -> list[str]:
    """The running hash of the tokens each run consumed, per arm and seed: equal within a seed."""
    same = results["same_data_order"]
    verdict = ("Every seed's arms consumed the identical stream." if all(same.values())
               else "**Some seed's arms did not consume the same stream: "
               + ", ".join(seed for seed, equal in same.items() if not equal) + ".**")
    rows = [[arm["name"], *(f"`{(run['budgets'][-1].get('data_sha256') or '-')[:16]}`" for run in arm["seeds"])]
            for arm in results["arms"]]
    return [
        "## Data order",
        "",
        "Running SHA-256 of the token ids each run consumed (logged by the trainer), at the end of the largest "
        "budget; equal values mean the same tokens in the same order. Within a seed every arm consumes the same "
        f"stream; seeds differ. {verdict}",
        "",
        *markdown_table(["arm", *(f"seed {s}" for s in results["seeds"])], rows),
        "",
    ]


def _times_section(results: dict) -> list[str]:
    times = [f"{arm['name']} seed {run['seed']} {run['seconds']:.0f} s ({run.get('threads')} thread(s))"
             for arm in results["arms"] for run in arm["seeds"] if run.get("seconds") is not None]
    return ["Wall time of the last (re)start of each run: " + ", ".join(times) + ".", ""] if times else []
