"""Re-render an experiment's committed results made by the harness before issue 26 (results.json with
"bootstrap_resamples" and no per-document losses) with today's statistics, from results.json alone:

    python scripts/upgrade_legacy_results.py docs/experiments/cpu-demo --recipe-from experiments/cpu-demo.yaml
    python scripts/upgrade_legacy_results.py docs/experiments/cpu-demo/rescore --trained-on docs/experiments/cpu-demo

What carries over: every run's per-domain loss at every budget's end and mid-schedule point, routing, JSD, cosine,
data hashes and timings. What cannot: the per-document losses (never kept), so every interval is across seeds alone
and the report says so; the training-split loss and the JSD's chance level (never measured). A rescore's
mixture-weighted mean is re-weighted by the experiment's training mixture (--trained-on: the experiment's directory),
which the old --rescore replaced by the rescore data's own shares. Writes results.json, report.md and the figures in
place; a later `upcycle experiment --recompute` on the directory gives the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from upcycle.experiment.report import HEADER_FIELDS, RESULTS_FILE, build_results, units_from_results, write_outputs


def upgrade(directory: Path, *, recipe: dict | None, trained_on: Path | None) -> dict:
    old = json.loads((directory / RESULTS_FILE).read_text())
    if "bootstrap_resamples" not in old:
        raise SystemExit(f"{directory / RESULTS_FILE} is not in the format before issue 26; nothing to upgrade")
    validation = {**old["validation"], "train_tokens_per_domain": None}
    if trained_on is not None:
        trained = json.loads((trained_on / RESULTS_FILE).read_text())["validation"]["mixture_weights"]
        total = sum(trained.get(d, 0.0) for d in validation["domains"])
        validation["mixture_weights"] = {d: trained.get(d, 0.0) / total for d in validation["domains"]}
        described = ", ".join(f"{d} {w:.3f}" for d, w in sorted(trained.items()))
        validation["mixture_source"] = f"the experiment's training mixture ({described}), over the domains scored here"
        title = f"upcycle experiment, kept models re-scored on {old['rescored_on']}"
    else:
        validation["mixture_source"] = "each domain's share of the training tokens"
        title = "upcycle experiment"
    results = {**old, "title": title, "recipe": recipe, "primary": None, "validation": validation}
    units, validation = units_from_results(results, None)
    header = {k: results[k] for k in HEADER_FIELDS if k in results}
    rebuilt = build_results(units, validation, header=header, arm_names=[arm["name"] for arm in results["arms"]])
    return write_outputs(directory, rebuilt, units=units, validation=validation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--recipe-from", type=Path, help="the experiment config whose recipe the report shows")
    parser.add_argument("--trained-on", type=Path, help="for a rescore: the experiment's directory (its mixture)")
    args = parser.parse_args()
    recipe = yaml.safe_load(args.recipe_from.read_text())["recipe"] if args.recipe_from else None
    upgrade(args.directory, recipe=recipe, trained_on=args.trained_on)
    print(f"upgraded {args.directory / RESULTS_FILE} and re-rendered its report and figures")


if __name__ == "__main__":
    main()
