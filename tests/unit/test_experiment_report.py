"""experiment_report's report.md: rendered from results.json alone, byte for byte the committed reports of the CPU
demonstration (docs/experiments/cpu-demo: 4 arms, 3 seeds, wsd budgets, the naive reference, MoE arms; and its
rescore), so a change of wording or layout shows here and the committed reports are re-rendered with it."""

from __future__ import annotations

import json

import pytest
from helpers import REPO
from upcycle.experiment.report import markdown_table, recompute, report_markdown

DEMO = REPO / "docs" / "experiments" / "cpu-demo"


def test_a_markdown_table_is_a_header_a_separator_and_a_line_per_row():
    assert markdown_table(["arm", "loss"], [["naive", "1.0"], ["drop", "0.9"]]) == [
        "| arm | loss |", "| --- | --- |", "| naive | 1.0 |", "| drop | 0.9 |"]
    assert markdown_table(["arm"], []) == ["| arm |", "| --- |"]


@pytest.mark.parametrize("directory", [DEMO, DEMO / "rescore"], ids=["experiment", "rescore"])
def test_the_committed_reports_are_rendered_byte_for_byte_from_their_results(directory):
    """report.md is made from results.json alone (its title and recipe included)."""
    results = json.loads((directory / "results.json").read_text())
    assert report_markdown(results) == (directory / "report.md").read_text()


@pytest.mark.parametrize("directory", [DEMO, DEMO / "rescore"], ids=["experiment", "rescore"])
def test_the_committed_demo_recomputes_to_itself_and_says_its_intervals_lack_the_documents(directory, tmp_path):
    """The CPU demo ran before per-document losses were kept (its results were upgraded from the old format by
    scripts/upgrade_legacy_results.py): --recompute from its results.json alone gives the same results and report,
    whose intervals are across seeds alone, as the report says; the rescore is weighted by the training mixture."""
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_bytes((directory / "results.json").read_bytes())
    rebuilt = recompute(copy)
    assert rebuilt == json.loads((directory / "results.json").read_text())
    assert (copy / "report.md").read_text() == (directory / "report.md").read_text()
    assert rebuilt["documents"] is None and not (copy / "documents.json").exists()
    assert "**The per-document losses of these runs were not kept**" in (copy / "report.md").read_text()
    gap = rebuilt["arms"][-1]["budgets"][-1]["gap"]["mean"]
    assert gap["se_doc"] == 0.0 and gap["n"] == 3
    if "rescored_on" in rebuilt:
        trained = json.loads((DEMO / "results.json").read_text())["validation"]["mixture_weights"]
        weights = rebuilt["validation"]["mixture_weights"]
        total = trained["code"] + trained["english"]
        assert weights == pytest.approx({"code": trained["code"] / total, "english": trained["english"] / total})
        assert "the experiment's training mixture" in rebuilt["validation"]["mixture_source"]


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
