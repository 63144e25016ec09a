"""The outputs of `upcycle experiment` (and of `--rescore` and `--merge`), made from the finished runs' arm.json files
alone, so they are cheap to rewrite: results.json, documents.json (the per-document losses every interval is computed
from), report.md and the figures; `recompute` rebuilds them from results.json and documents.json alone

    loss_curves.png      validation loss against training tokens: each budget's end-of-schedule value (markers, solid)
                         and the mid-schedule points of the longest run (dashed); seed mean and 95% interval
    gap_to_naive.png     each arm's mean loss minus naive's, paired by seed, at the budgets' ends (with intervals) and
                         mid-schedule (dashed)
    specialization.png   domain specialization of the routing (mean pairwise JSD), MoE arms
    similarity.png       mean pairwise cosine similarity of a layer's experts, MoE arms
    routing_NAME.png     per-domain share of top-k assignments per expert at the end of MoE arm NAME's longest run
                         (its first seed)

The statistics are experiment.stats' functions; nothing here trains or measures.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from upcycle.experiment import stats as stats
from upcycle.eval.analyze import default_plot_layers, plot_routing, pyplot
from upcycle.errors import UpcycleError
from upcycle.experiment.config import FROM_ARM_FIELDS, MOE_KINDS
from upcycle.files import atomic_path, atomic_write

RESULTS_FILE = "results.json"
DOCUMENTS_FILE = "documents.json"  # beside results.json: the per-document losses every interval is computed from
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


class _Documents:
    """The validation documents every interval's document error is computed over: their token counts per domain and
    the weights of each key (a mean over domains, or one domain)."""

    def __init__(self, validation: dict):
        self.tokens = {d: np.asarray(v.get("doc_tokens", ()), dtype=np.float64)
                       for d, v in validation["domains"].items()}
        self.weights = {"mean": {d: 1.0 for d in self.tokens}, "mixture": validation["mixture_weights"],
                        **{d: {d: 1.0} for d in self.tokens}}

    def intervals(self, per_seed: list[dict], doc_sums: list[dict] | None, keys: Sequence[str]) -> dict:
        """{key: stats.gap_interval} of per-seed values `per_seed` ({key: value} per seed), with the document error of
        the seed mean of `doc_sums` ({domain: per-document sums} per seed; None: the seeds' spread alone)."""
        mean_sums = None if doc_sums is None else {d: np.mean([sums[d] for sums in doc_sums], axis=0)
                                                   for d in self.tokens}
        out = {}
        for key in keys:
            error = (0.0, math.inf)
            if mean_sums is not None:
                domains = [d for d in self.weights[key] if d in mean_sums]
                error = stats.document_error({d: mean_sums[d] for d in domains}, self.tokens, self.weights[key])
            out[key] = stats.gap_interval([values[key] for values in per_seed], *error)
        return out


def _kept(points: list[dict]) -> bool:
    """Whether every point holds its per-document losses (results of the harness before they were kept do not: their
    intervals can only be made across seeds)."""
    return all("doc_loss" in p for p in points)


def _doc_sums(point: dict) -> dict[str, np.ndarray]:
    """A measurement's per-document loss sums at the precision results keep them in (float32, `encode_losses`), so an
    interval recomputed from the kept sums is the one first reported."""
    return {d: np.asarray(v, dtype=np.float32).astype(np.float64) for d, v in point["doc_loss"].items()}


def _losses(docs: _Documents, points: list[dict], keys: Sequence[str]) -> dict:
    """Each key's seed mean and its one 95% interval (seeds and validation documents)."""
    intervals = docs.intervals(points, [_doc_sums(p) for p in points] if _kept(points) else None, keys)
    return {key: {k: v for k, v in interval.items() if k != "p"} for key, interval in intervals.items()}


def _gaps(docs: _Documents, points: list[dict], ref_points: list[dict], keys: Sequence[str],
          ref_weights: Sequence[np.ndarray] | None = None) -> dict:
    """Each key's gap to the reference, paired by seed: its seed mean and one 95% interval. With `ref_weights` (one
    per seed) the reference is read at a weighted combination of its points (interpolation) instead of one point."""
    per_seed, doc_sums = [], []
    kept = _kept(points) and _kept([r for refs in ref_points for r in (refs if ref_weights is not None else [refs])])
    for i, point in enumerate(points):
        refs = ref_points[i] if ref_weights is not None else [ref_points[i]]
        w = ref_weights[i] if ref_weights is not None else np.ones(1)
        per_seed.append({k: point[k] - float(sum(wj * r[k] for wj, r in zip(w, refs))) for k in keys})
        if kept:
            mine, theirs = _doc_sums(point), [_doc_sums(r) for r in refs]
            doc_sums.append({d: mine[d] - sum(wj * t[d] for wj, t in zip(w, theirs)) for d in mine})
    return docs.intervals(per_seed, doc_sums if kept else None, keys)


def _verdict(interval: dict, role: str) -> dict:
    """An end-of-schedule gap's call from its one interval: `role` exploratory (the interval alone) or primary (its
    Holm-adjusted p-value too, set by `_primary_family`); one seed makes it provisional."""
    return {**interval, "role": role, "verdict": stats.call(interval)}


def _seed_values(points: list[dict], key: str) -> dict | None:
    """A quantity measured without a per-document error (routing), across seeds; None where a seed lacks it."""
    values = [p.get(key) for p in points]
    return stats.seed_interval(values) if values and all(v is not None for v in values) else None


def _reach(found: list[tuple[float | None, str]]) -> dict:
    """Per-seed token counts where each seed got there (None and why where it did not), and the geometric mean with
    its interval when every seed did."""
    out = {"per_seed": [None if v is None else round(v) for v, _ in found], "status": [s for _, s in found],
           "located": sum(s == stats.LOCATED for _, s in found), "of": len(found)}
    if out["located"] == out["of"]:
        out.update({k: (round(v) if isinstance(v, float) else v)
                    for k, v in stats.log_scale_interval([v for v, _ in found]).items()})
    return out


def _equal_flops(docs: _Documents, arm_units: list[dict], ref_units: list[dict], index: int) -> dict:
    """The arm's end-of-schedule loss at budget `index` minus the reference's at the same training FLOPs, the
    reference's end-of-schedule losses read piecewise linear in log FLOPs between its budgets (its per-document sums
    with the same weights); out of range where the arm's FLOPs lie outside the reference's measured budgets."""
    flops = arm_units[0]["budgets"][index]["flops"]
    ref_flops = [b["flops"] for b in ref_units[0]["budgets"]]
    weights = stats.log_interpolation_weights(ref_flops, flops)
    if weights is None:
        return {"out_of_range": True, "flops": flops, "reference_flops": [ref_flops[0], ref_flops[-1]]}
    gaps = _gaps(docs, [u["budgets"][index] for u in arm_units], [u["budgets"] for u in ref_units], MEANS,
                 ref_weights=[weights] * len(arm_units))
    return {key: _verdict(interval, "exploratory") for key, interval in gaps.items()}


def _end_curve(unit: dict, key: str) -> list[tuple[int, float]]:
    """Every budget's end-of-schedule value: the curve that crossing points and tokens to a loss are read from
    (never mid-schedule points, which mix schedule phases, nor the untrained model, which log tokens cannot place)."""
    return [(b["tokens"], b[key]) for b in unit["budgets"]]


def _budget_entry(docs: _Documents, arm_units: list[dict], ref_units: list[dict] | None, index: int,
                  keys: Sequence[str], is_reference: bool) -> dict:
    """One budget of one arm: end-of-schedule losses, gaps (with their exploratory calls), the gap at equal FLOPs,
    the training split's loss and its gap to the validation loss, specialization with its chance level and its gap to
    the reference, similarity."""
    first = arm_units[0]["budgets"][index]
    points = [u["budgets"][index] for u in arm_units]
    entry = {"tokens": first["tokens"], "flops": first["flops"], "loss": _losses(docs, points, keys)}
    if all(p.get("train") for p in points):
        entry["train_loss"] = {k: stats.seed_interval([p["train"][k] for p in points]) for k in keys}
        entry["generalization_gap"] = {k: stats.seed_interval([p[k] - p["train"][k] for p in points]) for k in keys}
    for key in ("jsd", "jsd_chance", "cosine"):
        entry[key] = _seed_values(points, key)
    if ref_units is not None:
        ref_points = [u["budgets"][index] for u in ref_units]
        gaps = _gaps(docs, points, ref_points, keys)
        entry["gap"] = {k: _verdict(v, "exploratory") if k in MEANS else v for k, v in gaps.items()}
        if is_reference:
            entry["gap"] = {k: {**v, "verdict": None, "role": "reference"} if k in MEANS else v
                            for k, v in entry["gap"].items()}
        entry["gap_equal_flops"] = None if is_reference else _equal_flops(docs, arm_units, ref_units, index)
        jsd = [(p.get("jsd"), r.get("jsd")) for p, r in zip(points, ref_points)]
        entry["jsd_gap"] = stats.seed_interval([a - b for a, b in jsd]) \
            if all(a is not None and b is not None for a, b in jsd) else None
    return entry


def _curve_entry(docs: _Documents, points: list[dict], ref_points: list[dict] | None, keys: Sequence[str]) -> dict:
    """A point along the longest run (mid-schedule, or the untrained model): numbers with intervals, no verdict."""
    entry = {"tokens": points[0]["tokens"], "loss": _losses(docs, points, keys)}
    for key in ("jsd", "jsd_chance", "cosine"):
        entry[key] = _seed_values(points, key)
    if ref_points is not None:
        entry["gap"] = _gaps(docs, points, ref_points, keys)
    return entry


def _primary_family(arms: list[dict], primary: dict | None) -> list[dict] | None:
    """The declared primary comparison: each primary arm's gap at the primary budget on the declared mean, with its
    p-value adjusted by Holm over the family, and the verdict from the interval and the adjusted p-value together.
    Marks those gaps primary in `arms`."""
    if not primary:
        return None
    entries = {}
    for arm in arms:
        if arm["name"] in primary["arms"]:
            budget = next(b for b in arm["budgets"] if b["tokens"] == primary["budget"])
            entries[arm["name"]] = budget["gap"][primary["mean"]]
    adjusted = stats.holm({name: gap["p"] if gap["p"] is not None else 1.0 for name, gap in entries.items()})
    family = []
    for name in primary["arms"]:
        gap = entries[name]
        gap.update(role="primary", p_holm=adjusted[name], verdict=stats.call(gap, p_adjusted=adjusted[name]))
        family.append({"arm": name, "tokens": primary["budget"], "mean": primary["mean"], **gap})
    return family


def build_results(units: list[dict], validation: dict, *, header: dict, arm_names: list[str]) -> dict:
    """results.json from every (arm, seed) run's arm.json: per arm, each seed's run and the aggregates across its seeds
    (end-of-schedule losses per budget, the gaps to the reference with one interval each and a call, the primary
    family under Holm's correction, gaps at equal FLOPs, tokens to the reference's loss and the crossing point, the
    training split's loss, specialization with its chance level; the mid-schedule curve without calls)."""
    domains, keys = header["domains"], (*MEANS, *header["domains"])
    weights = validation["mixture_weights"]
    docs = _Documents(validation)
    by_arm = {name: sorted((u for u in units if u["name"] == name), key=lambda u: u["seed"]) for name in arm_names}
    for arm_units in by_arm.values():
        for unit in arm_units:
            for point in unit["budgets"] + unit["curve"]:
                point.update(_point_means(point["val"], weights))
                if point.get("train"):
                    point["train"] = _point_means({d: point["train"][d] for d in domains}, weights)
    reference = header["reference"]
    ref_by_seed = {u["seed"]: u for u in by_arm[reference]} if reference else None
    out_arms = []
    for name in arm_names:
        arm_units = by_arm[name]
        first = arm_units[0]
        ref_units = [ref_by_seed[u["seed"]] for u in arm_units] if reference else None
        arm = {key: first.get(key) for key in ("name", "method", "ratio", "index_mode", "convert")}
        arm.update({key: first[key] for key in FROM_ARM_FIELDS if key in first})  # grow and continue
        arm.update(active_params=first.get("active_params"), total_params=first.get("total_params"))
        arm["budgets"] = [_budget_entry(docs, arm_units, ref_units, i, keys, name == reference)
                          for i in range(len(header["budgets"]))]
        arm["curve"] = [_curve_entry(docs, [u["curve"][j] for u in arm_units],
                                     [u["curve"][j] for u in ref_units] if ref_units else None, keys)
                        for j in range(len(first["curve"]))]
        if ref_units is not None and name != reference:
            arm["tokens_to_naive"] = _reach([stats.first_crossing(_end_curve(u, "mean"), r["budgets"][-1]["mean"])
                                             for u, r in zip(arm_units, ref_units)])
            arm["crossing"] = _reach([stats.first_crossing([(t, a - b) for (t, a), (_, b) in
                                                            zip(_end_curve(u, "mean"), _end_curve(r, "mean"))],
                                                           stats.GAP_RESOLUTION)
                                      for u, r in zip(arm_units, ref_units)])
        arm["seeds"] = [_seed_record(u) for u in arm_units]
        out_arms.append(arm)
    same_order = {}
    for seed in header["seeds"]:
        hashes = {u["budgets"][-1].get("data_sha256") for arm_units in by_arm.values() for u in arm_units
                  if u["seed"] == seed}
        same_order[str(seed)] = len(hashes) == 1
    return {**header, "validation": {k: v for k, v in validation.items() if k != "domains"}
            | {"domains": {d: {k: v for k, v in info.items() if k != "doc_tokens"}
                           for d, info in validation["domains"].items()}},
            "confidence": stats.CONFIDENCE,
            "documents": DOCUMENTS_FILE if _kept([p for u in units for p in u["budgets"] + u["curve"]]) else None,
            "same_data_order": same_order,
            "primary_family": _primary_family(out_arms, header.get("primary")), "arms": out_arms}


def _seed_record(unit: dict) -> dict:
    """One seed's run as results.json keeps it: every measured value but the per-document sums (in DOCUMENTS_FILE),
    the per-layer lists and the routing shares (kept once, at the end of the largest budget, as routing_final)."""
    def plain(point: dict) -> dict:
        return {k: v for k, v in point.items() if k not in ("doc_loss", "val", "routing", "jsd_layers",
                                                             "cosine_layers")}

    record = {k: v for k, v in unit.items() if k not in ("budgets", "curve", "name", "method", "ratio", "index_mode",
                                                         "convert", *FROM_ARM_FIELDS)}
    record["budgets"] = [plain(b) for b in unit["budgets"]]
    record["curve"] = [plain(p) for p in unit["curve"]]
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The per-document losses beside results.json, and recomputing from the two


def encode_losses(values: Sequence[float]) -> str:
    """Per-document loss sums as results keep them: float32 little-endian, zlib, base64 (a few bytes a document)."""
    return base64.b64encode(zlib.compress(np.asarray(values, dtype="<f4").tobytes(), 9)).decode("ascii")


def decode_losses(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<f4").astype(np.float64)


def documents_record(units: list[dict], validation: dict) -> dict:
    """DOCUMENTS_FILE: every measurement's per-document loss sums, by arm, seed, budget (end of schedule) and curve
    point (tokens), with the validation documents' token counts: with results.json, all an interval is made of."""
    runs: dict = {}
    for unit in units:
        runs.setdefault(unit["name"], {})[str(unit["seed"])] = {
            part: {str(p["tokens"]): {d: encode_losses(v) for d, v in sorted(p["doc_loss"].items())}
                   for p in unit[part]} for part in ("budgets", "curve")}
    return {"format": "per-document summed next-token loss (nats) of each validation document, in the order of "
                      "doc_tokens; every array float32 little-endian, zlib-compressed, base64",
            "doc_tokens": {d: info["doc_tokens"] for d, info in validation["domains"].items()}, "runs": runs}


def units_from_results(results: dict, documents: dict | None) -> tuple[list[dict], dict]:
    """The runs (as arm.json holds them, to what build_results reads) and the validation record, from results.json
    and DOCUMENTS_FILE alone: what --recompute rebuilds the report from. Without DOCUMENTS_FILE (results whose
    per-document losses were not kept), runs without them."""
    domains = results["domains"]
    units = []
    for arm in results["arms"]:
        fields = {k: arm[k] for k in ("name", "method", "ratio", "index_mode", "convert", "active_params",
                                      "total_params", *FROM_ARM_FIELDS) if k in arm}
        for run in arm["seeds"]:
            sums = documents["runs"][arm["name"]][str(run["seed"])] if documents is not None else None

            def point(p: dict, part: str) -> dict:
                if sums is None:
                    return {**p, "val": {d: p[d] for d in domains}}
                return {**p, "val": {d: p[d] for d in domains},
                        "doc_loss": {d: decode_losses(v) for d, v in sums[part][str(p["tokens"])].items()}}

            units.append({**fields, **run, "budgets": [point(b, "budgets") for b in run["budgets"]],
                          "curve": [point(p, "curve") for p in run["curve"]]})
    validation = {**results["validation"], "domains": {
        d: {**info, **({"doc_tokens": documents["doc_tokens"][d]} if documents is not None else {})}
        for d, info in results["validation"]["domains"].items()}}
    return units, validation


HEADER_FIELDS = ("title", "seed_model", "seeds", "num_experts", "top_k", "domains", "budgets", "tokens_per_step",
                 "schedule", "reference", "primary", "recipe", "rescored_on")


def recompute(directory: str | Path) -> dict:
    """Rebuild results.json's aggregates, report.md and the figures of `directory` (an experiment's OUT or a rescore
    of it) from its results.json and DOCUMENTS_FILE alone: no training, no evaluation."""
    directory = Path(directory)
    if not (directory / RESULTS_FILE).is_file():
        raise UpcycleError(f"--recompute: {directory} has no {RESULTS_FILE}; pass a directory that upcycle experiment "
                           "(or --rescore, or --merge) wrote")
    results = json.loads((directory / RESULTS_FILE).read_text())
    documents = None
    if results.get("documents") is not None:  # null: results whose per-document losses were not kept
        if not (directory / DOCUMENTS_FILE).is_file():
            raise UpcycleError(f"--recompute: {directory} has no {DOCUMENTS_FILE}, which its {RESULTS_FILE} names; "
                               "copy it beside results.json")
        documents = json.loads((directory / DOCUMENTS_FILE).read_text())
    units, validation = units_from_results(results, documents)
    header = {k: results[k] for k in HEADER_FIELDS if k in results}
    rebuilt = build_results(units, validation, header=header, arm_names=[arm["name"] for arm in results["arms"]])
    return write_outputs(directory, rebuilt, units=units, validation=validation)


def write_outputs(out: Path, results: dict, *, units: list[dict], validation: dict) -> dict:
    """results.json, DOCUMENTS_FILE (the per-document losses of `units` on `validation`'s documents), report.md and the
    figures into directory `out`."""
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
    if results["documents"] is not None:
        atomic_write(out / DOCUMENTS_FILE, json.dumps(documents_record(units, validation), indent=1) + "\n")
    atomic_write(out / REPORT_FILE, report_markdown(results))
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
                 f"seed means over up to {len(results['seeds'])} seed(s), 95% intervals "
                 f"({'seeds and documents' if results['documents'] else 'across seeds only'})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, plt, path)


def plot_gap_to_naive(results: dict, path: Path) -> Path:
    """Each arm's mean loss minus naive's, paired by seed: at the end of each budget's schedule (markers, with the
    95% interval as error bars) and mid-schedule along the longest run (dashed). Symmetric-log loss axis, so
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
    ax.set_title("end of schedule (markers, 95% interval) and mid-schedule (dashed)", fontsize=9)
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


def _call_text(gap: dict) -> str:
    """A gap's verdict as printed: bold only for a primary gap with more than one seed; a one-seed verdict is marked
    provisional; no verdict, no text (mid-schedule points, the reference)."""
    verdict = gap.get("verdict")
    if verdict is None:
        return ""
    if gap.get("provisional"):
        return f"{verdict} (provisional: one seed)"
    return f"**{verdict}**" if gap.get("role") == "primary" else verdict


def _gap_text(gap: dict | None) -> str:
    if gap is None:
        return "-"
    if gap.get("out_of_range"):
        return "out of range"
    call = _call_text(gap)
    return _interval_text(gap, signed=True) + (f" {call}" if call else "")


def _over_domains(equal_flops: dict | None) -> dict | None:
    """The mean over domains of a gap at equal FLOPs (or that it is out of range)."""
    return equal_flops if equal_flops is None or equal_flops.get("out_of_range") else equal_flops["mean"]


def _reach_text(reach: dict | None) -> str:
    """Tokens (every seed's geometric mean and interval, or one seed's), or "not located" with each seed's reading."""
    if reach is None:
        return "-"
    if reach["located"] == reach["of"]:
        if reach["of"] == 1:
            return f"{reach['per_seed'][0]:,}"
        return f"{reach['mean']:,} [{reach['low']:,}, {reach['high']:,}]"
    seeds = ", ".join(status if value is None else f"{value:,}"
                      for value, status in zip(reach["per_seed"], reach["status"]))
    return f"not located ({seeds})"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, the separator and one line per row (cells already text)."""
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [row(headers), "|" + " --- |" * len(headers), *map(row, rows)]


def report_markdown(results: dict) -> str:
    """report.md, section by section: the design, the validation tokens and how intervals are made, the
    end-of-schedule losses, the primary comparison, the exploratory gaps to the reference arm and the mid-schedule
    readings, training against validation loss, the loss curves, specialization and similarity, routing, the data
    order and the wall times."""
    moe = [arm for arm in results["arms"] if is_moe(arm)]
    sections = [_design_section(results), _loss_section(results), _primary_section(results), _gap_section(results),
                _train_section(results), _curves_section(), _specialization_section(results, moe),
                _routing_section(moe), _data_order_section(results), _times_section(results)]
    return "\n".join(line for section in sections for line in section)


INTERVALS = ("Every interval is 95% and one per quantity: the seed mean, plus or minus a Student-t quantile times "
             "sqrt(se_seed^2 + se_doc^2), where se_seed is the standard error of the per-seed values (gaps paired by "
             "seed: each seed's arm minus the same seed's reference) and se_doc the jackknife standard error over the "
             "validation documents (within each domain, combined with the weights of the mean), with "
             "Welch-Satterthwaite degrees of freedom (seeds - 1; each domain's effective documents - 1). This method "
             "because, in simulation at 10 and 17 documents per domain, it kept at least 92% coverage of the nominal "
             "95% in every noise regime tried, where a percentile bootstrap over documents undercovered "
             "(tests/unit/test_experiment_stats.py). With one seed se_seed is unknown: the interval holds the document "
             "error only and a verdict drawn from it is provisional. Routing statistics, token counts and the gap "
             "between training and validation loss have intervals across seeds only.")


SEED_INTERVALS = ("**The per-document losses of these runs were not kept** (they were made by an earlier version of "
                  "the harness), so no interval here includes the validation documents' sampling error: every "
                  "interval is a Student-t interval across seeds alone (gaps paired by seed), narrower than the one "
                  "interval the harness now reports (seeds and documents together), and the calls drawn from them "
                  "are weaker evidence than they look. Recomputed from results.json alone; a re-run would give the "
                  "full intervals.")


def _design_section(results: dict) -> list[str]:
    """The title, what was trained (seed model, MoE shape, seeds, budgets, schedule, domains), what was scored with
    which mixture weights, how intervals are made, and the recipe."""
    schedule, validation, per_step = results["schedule"], results["validation"], results["tokens_per_step"]
    from_arm = (" (grow and continue arms: as their init says; they start from another arm's final model at the same "
                "seed and are trained for every budget from there)" if any(a.get("from_arm") for a in results["arms"])
                else "")
    if schedule["kind"] == "wsd":
        schedules = ("warmup-stable-decay, every budget a decay branch (over the last "
                     f"{schedule['decay_fraction']:.0%} of its steps) taken off one stable run per arm and seed.")
    else:
        schedules = "a cosine schedule of the budget's length, one run per budget."
    fewer = [f"{arm['name']} {', '.join(str(run['seed']) for run in arm['seeds'])}" for arm in results["arms"]
             if len(arm["seeds"]) < len(results["seeds"])]
    some = f" (some arms at some of them: {'; '.join(fewer)})" if fewer else " (every arm at every seed)"
    design = (f"Seed model `{results['seed_model']}`; MoE arms have {results['num_experts']} experts, "
              f"top-{results['top_k']}{from_arm}. Seeds: {', '.join(map(str, results['seeds']))}{some}; a seed sets "
              "the data order, the upcycling draws, the router init and the from-scratch init. "
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
    lines = [f"# {results['title']}", "", design, "",
             f"Validation: {scored}{extent}, the same for every arm, seed and point. Mixture weights: {weights} "
             f"({validation['mixture_source']}).", "", INTERVALS if results["documents"] else SEED_INTERVALS, ""]
    if results.get("recipe") is not None:
        lines += [f"Recipe: `{json.dumps(results['recipe'], sort_keys=True)}`.", ""]
    return lines


def _loss_section(results: dict) -> list[str]:
    """Every arm's end-of-schedule loss at every budget: per domain and both means."""
    domains = results["domains"]
    rows = [[arm["name"], _arm_label(arm), f"{budget['tokens']:,}", f"{budget['flops']:.3g}",
             *[_interval_text(budget["loss"][d]) for d in (*domains, *MEANS)]]
            for arm in results["arms"] for budget in arm["budgets"]]
    return [
        "## End-of-schedule validation loss (nats per token; seed mean [95% interval])",
        "",
        *markdown_table(["arm", "init", "budget (tokens)", "training FLOPs", *domains,
                         *(MEAN_LABEL[m] for m in MEANS)], rows),
        "",
        "Loss: token-weighted cross-entropy per domain; the mean over domains weights the domains equally, the "
        "mixture-weighted mean by the mixture weights above. FLOPs: 6 x parameters active per token x training "
        "tokens (btx adds its dense branches; grow and continue count their own training, not their source arm's). "
        "End-of-schedule values are measured on the kept bf16 models "
        "(`arms/NAME/seed_S/final/TOKENS`), so `upcycle experiment --rescore` reproduces them.",
        "",
    ]


def _primary_section(results: dict) -> list[str]:
    """The declared primary comparison, with Holm-adjusted p-values and its verdicts (or that none was declared)."""
    if results["reference"] is None:
        return []
    family = results.get("primary_family")
    if not family:
        return ["## Primary comparison", "", "None declared (`primary` in the experiment config): every gap below is "
                "exploratory.", ""]
    rows = [[entry["arm"], f"{entry['tokens']:,}", _interval_text(entry, signed=True),
             "-" if entry["p"] is None else f"{entry['p']:.3g}", f"{entry['p_holm']:.3g}", _call_text(entry)]
            for entry in family]
    primary = results["primary"]
    return [
        "## Primary comparison (declared in the config, Holm-corrected)",
        "",
        f"The gaps to `{results['reference']}` of {', '.join(f'`{a}`' for a in primary['arms'])} at "
        f"{primary['budget']:,} tokens, {MEAN_LABEL[primary['mean']]} (nats; negative: ahead). A verdict is ahead or "
        f"behind where the 95% interval excludes zero and the p-value, adjusted by Holm's method over these "
        f"{len(family)} gaps, is below {1 - results['confidence']:.2f}; level otherwise.",
        "",
        *markdown_table(["arm", "budget (tokens)", "gap [95% interval]", "p", "Holm-adjusted p", "verdict"], rows),
        "",
    ]


def _gap_section(results: dict) -> list[str]:
    """Each arm's gap to the reference arm at every budget's end (one interval each; exploratory calls), at equal
    FLOPs, the tokens it takes to reach the reference's final loss and the crossing; then the gaps mid-schedule;
    nothing without a reference arm."""
    reference, domains = results["reference"], results["domains"]
    if reference is None:
        return []
    others = [arm for arm in results["arms"] if arm["name"] != reference]
    gaps = [[arm["name"], f"{budget['tokens']:,}", *(_gap_text(budget["gap"][m]) for m in MEANS),
             *[_interval_text(budget["gap"][d], signed=True) for d in domains],
             _gap_text(_over_domains(budget["gap_equal_flops"]))]
            for arm in others for budget in arm["budgets"]]
    reach = [[arm["name"], _reach_text(arm["tokens_to_naive"]), _reach_text(arm["crossing"])] for arm in others]
    return [
        f"## Gaps to `{reference}` at the end of each budget's schedule (nats; negative: ahead)",
        "",
        ("Exploratory, except the primary comparison's gaps (bold verdicts, above)" if results.get("primary_family")
         else "Exploratory") + ": a call of ahead or behind here "
        "only says that the gap's own 95% interval excludes zero, with no correction for the many gaps read. At "
        f"equal FLOPs: the arm's mean loss minus `{reference}`'s end-of-schedule loss at the arm's training FLOPs, "
        f"read piecewise linear in log FLOPs between `{reference}`'s budgets"
        + (" (per document too, for the interval)" if results["documents"] else "") + "; "
        f"out of range where the arm's FLOPs lie outside `{reference}`'s measured budgets.",
        "",
        *markdown_table(["arm", "budget (tokens)", "gap, mean over domains", "gap, mixture-weighted",
                         *(f"gap {d}" for d in domains), "gap at equal FLOPs, mean over domains"], gaps),
        "",
        f"From end-of-schedule values only, read piecewise linear in log tokens between budgets: the tokens at which "
        f"the arm's mean loss reaches `{reference}`'s at the largest budget, and where a positive gap to "
        f"`{reference}` falls to zero. Where every seed gets there between two budgets: the geometric mean and its "
        f"95% interval across seeds; otherwise not located, with each seed's reading (at the first budget: already "
        f"there, so where is not measured; not reached: not within the budgets).",
        "",
        *markdown_table(["arm", f"tokens to {reference}'s end-of-schedule loss at {results['budgets'][-1]:,}",
                         "crossing of the gap"], reach),
        "",
        "![gap to naive](gap_to_naive.png)",
        "",
        *_mid_schedule_gaps(others),
    ]


def _mid_schedule_gaps(others: list[dict]) -> list[str]:
    """The gaps (mean over domains) at the longest run's measuring points, or before training only: numbers with
    their intervals, no verdicts."""
    if not any(arm["curve"] for arm in others):
        return []
    tokens = [p["tokens"] for p in others[0]["curve"]]
    if any(tokens):
        heading = ["### Mid-schedule gaps along the longest run (mean over domains, nats; no verdicts)", "",
                   "Inside one schedule: the learning rate is still high at these points (and annealing later moves "
                   "gaps), so they are readings along the way, not end-of-schedule comparisons, and no verdict is "
                   "drawn from them.", ""]
    else:
        heading = ["### Gaps before training (mean over domains, nats)", ""]
    rows = [[f"{t:,}{' (untrained)' if t == 0 else ''}",
             *[_interval_text(arm["curve"][j]["gap"]["mean"], signed=True) if j < len(arm["curve"]) else "-"
               for arm in others]]
            for j, t in enumerate(tokens)]
    return [*heading, *markdown_table(["tokens", *(arm["name"] for arm in others)], rows), ""]


def _epochs(results: dict, tokens: int) -> float:
    """Passes over the training split a budget makes, in the domain the mixture samples most often per token."""
    domains = results["validation"]["domains"]
    weights = results["validation"]["mixture_weights"]
    return max(tokens * weights[d] / info["training_tokens"] for d, info in domains.items()
               if info.get("training_tokens"))


def _train_section(results: dict) -> list[str]:
    """Training against validation loss at every budget's end (mean over domains), with the gap across seeds."""
    rows = [[arm["name"], f"{budget['tokens']:,}", f"{_epochs(results, budget['tokens']):.2f}",
             _interval_text(budget["train_loss"]["mean"]), _interval_text(budget["loss"]["mean"]),
             _interval_text(budget["generalization_gap"]["mean"], signed=True)]
            for arm in results["arms"] for budget in arm["budgets"] if budget.get("train_loss")]
    if not rows:
        return []
    tokens = results["validation"].get("train_tokens_per_domain")
    return [
        "## Training against validation loss at each budget's end (mean over domains, nats)",
        "",
        f"Training loss: about {tokens:,} tokens per domain of the training split, in sequences spread evenly over "
        "it (text the run has seen once it has made a pass over the split), scored on the kept model. Epochs: "
        "passes over the training split at the budget, in the domain the mixture samples most per token. A "
        "validation loss well above the training loss means the model has started to learn its training text "
        "by heart, which repeated epochs invite.",
        "",
        *markdown_table(["arm", "budget (tokens)", "epochs", "training loss", "validation loss",
                         "validation minus training"], rows),
        "",
    ]


def _curves_section() -> list[str]:
    return ["## Validation loss against training tokens", "", "![loss curves](loss_curves.png)", ""]


def _specialization_section(results: dict, moe: list[dict]) -> list[str]:
    """The MoE arms' domain specialization (JSD) with its chance level and its gap to the reference, paired by seed,
    and expert similarity (cosine), before training and at the end of the largest budget."""
    if not moe:
        return []

    def mean(value: dict | None) -> str:
        return "-" if value is None else f"{value['mean']:.4f}"

    reference = results["reference"]
    rows = []
    for arm in moe:
        before = arm["curve"][0] if arm["curve"] and arm["curve"][0]["tokens"] == 0 else None
        end = arm["budgets"][-1]
        rows.append([arm["name"], mean(before and before["jsd"]), _interval_text(end["jsd"], digits=4),
                     mean(end["jsd_chance"]),
                     "-" if arm["name"] == reference else _interval_text(end.get("jsd_gap"), digits=4, signed=True),
                     mean(before and before["cosine"]), mean(end["cosine"])])
    return [
        "## Domain specialization and expert similarity",
        "",
        "Specialization: per MoE layer, the mean Jensen-Shannon divergence (base 2, 0..1) between the domains' "
        "distributions of top-k assignments over experts, averaged over layers; 0: every domain routed alike. On "
        "finitely many tokens it reads above 0 even then: its chance level is the same JSD with the scored sequences "
        "shuffled between the domains (each keeping its number of sequences; the mean over "
        "20 shuffles). Sequences, not documents, are shuffled, so where a document's sequences route alike the "
        "chance level is somewhat understated. The gap to the reference is paired by seed, with its 95% interval "
        "across seeds. Similarity: per layer, the mean pairwise cosine similarity of the experts' flattened weights, "
        "averaged over layers; naive upcycling starts at 1.0. Seed means, before training and at the end of the "
        "largest budget.",
        "",
        *markdown_table(["arm", "JSD before", "JSD at the end [95% interval]", "chance level at the end",
                         f"JSD minus {reference}'s at the end", "cosine before", "cosine at the end"], rows),
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
    rows = []
    for arm in results["arms"]:
        runs = {run["seed"]: run for run in arm["seeds"]}
        rows.append([arm["name"], *(f"`{(runs[s]['budgets'][-1].get('data_sha256') or '-')[:16]}`" if s in runs
                                    else "-" for s in results["seeds"])])
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
