"""experiment_report's report.md: rendered from results.json alone, byte for byte the committed reports of the CPU
demonstration (docs/experiments/cpu-demo: 4 arms, 3 seeds, wsd budgets, the naive reference, MoE arms; and its
rescore), so a change of wording or layout shows here and the committed reports are re-rendered with it."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import REPO
from upcycle.experiment.report import markdown_table, report_markdown

DEMO = REPO / "docs" / "experiments" / "cpu-demo"


def test_a_markdown_table_is_a_header_a_separator_and_a_line_per_row():
    assert markdown_table(["arm", "loss"], [["naive", "1.0"], ["drop", "0.9"]]) == [
        "| arm | loss |", "| --- | --- |", "| naive | 1.0 |", "| drop | 0.9 |"]
    assert markdown_table(["arm"], []) == ["| arm |", "| --- |"]


@pytest.mark.parametrize("directory", [DEMO, DEMO / "rescore"], ids=["experiment", "rescore"])
def test_the_committed_reports_are_rendered_byte_for_byte_from_their_results(directory):
    """`upcycle experiment` writes report.md with the config's recipe; --rescore without one, under a title naming
    the data it scored (experiment.rescore_experiment)."""
    results = json.loads((directory / "results.json").read_text())
    if "rescored_on" in results:
        rendered = report_markdown(results, title=f"upcycle experiment, kept models re-scored on "
                                                  f"{results['rescored_on']}")
    else:
        recipe = yaml.safe_load((REPO / "experiments" / "cpu-demo.yaml").read_text())["recipe"]
        rendered = report_markdown(results, recipe=recipe)
    assert rendered == (directory / "report.md").read_text()


def test_the_report_says_how_many_validation_tokens_it_scored():
    """eval.tokens is rounded up to whole sequences: before, eval.tokens 50 with seq_len 32 scored 64 tokens per domain
    while the report said "up to 50"."""
    results = json.loads((DEMO / "results.json").read_text())
    validation = {**results["validation"], "seq_len": 32, "tokens_per_domain": 50}
    text = report_markdown({**results, "validation": validation})
    assert "(up to 64 tokens per domain: eval.tokens 50 rounded up to whole sequences of 32)" in text
    assert "up to 50 tokens" not in text
    text = report_markdown({**results, "validation": {**validation, "tokens_per_domain": 64}})
    assert "(up to 64 tokens per domain)" in text
