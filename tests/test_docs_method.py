"""The method is documented in the repository itself: code and docs point to docs/method.md, never to a file users do
not have, and method.md's links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from upcycle.convert.options import UpcycleOptions
from upcycle.convert.upcycling import upcycle_expert

REPO = Path(__file__).resolve().parents[1]


def test_no_reference_to_files_outside_the_repository():
    offenders = [str(p.relative_to(REPO)) for root in ("src", "docs") for p in (REPO / root).rglob("*")
                 if p.suffix in (".py", ".md") and "PAPER.md" in p.read_text(encoding="utf-8")]
    assert offenders == []
    assert "docs/method.md" in (REPO / "src/upcycle/convert/upcycling.py").read_text()
    assert "method.md" in (REPO / "docs/convert.md").read_text()


def test_method_md_links_resolve():
    text = (REPO / "docs/method.md").read_text()
    for target, anchor in re.findall(r"\]\(([^)#:]+\.md)(?:#([^)]+))?\)", text):
        linked = (REPO / "docs" / target).read_text()
        if anchor:
            headings = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", linked, flags=re.M)}
            assert anchor in headings, (target, anchor)


def test_the_intact_fractions_method_md_states():
    """method.md: fully intact neurons are a fraction 1 - r (shared) versus (1 - r)^3 (independent)."""
    F, r = 4000, 0.5
    gate, up, down = torch.randn(F, 8), torch.randn(F, 8), torch.randn(8, F)
    for mode, expected in (("shared", 1 - r), ("independent", (1 - r) ** 3)):
        x = upcycle_expert(gate, up, down, layer=0, expert=0,
                           opts=UpcycleOptions(method="drop", ratio=r, index_mode=mode, seed=3))
        intact = (~x.redrawn_MF.any(dim=0)).float().mean().item()
        assert abs(intact - expected) < 0.03, (mode, intact)
