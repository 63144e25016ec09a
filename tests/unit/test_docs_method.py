"""The method and the docs hold together: code and docs point to docs/method.md, never to a file users do not have,
and every relative link in the README and docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from upcycle.convert.options import UpcycleOptions
from upcycle.convert.upcycling import upcycle_expert

REPO = Path(__file__).resolve().parents[2]


def test_no_reference_to_files_outside_the_repository():
    offenders = [str(p.relative_to(REPO)) for root in ("src", "docs") for p in (REPO / root).rglob("*")
                 if p.suffix in (".py", ".md") and "PAPER.md" in p.read_text(encoding="utf-8")]
    assert offenders == []
    assert "docs/method.md" in (REPO / "src/upcycle/convert/upcycling.py").read_text()
    assert "method.md" in (REPO / "docs/convert.md").read_text()


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub renders it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves():
    """README.md and every docs/**/*.md: each relative link names a file that exists and, for a Markdown file, an anchor
    one of its headings makes. The count guards the regex: a pattern that matched nothing would pass vacuously."""
    links, broken = 0, []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks are not links
        for target, anchor in re.findall(r"\]\((?!https?:|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)", text):
            links += 1
            path = (page.parent / target).resolve() if target else page
            where = f"{page.relative_to(REPO)} -> {target}#{anchor}"
            if not path.exists():
                broken.append(where)
            elif anchor and path.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)}
                if anchor not in headings:
                    broken.append(where)
    assert links >= 100, links
    assert broken == []


def test_anchor_slugs_follow_github():
    assert _slug("`upcycle bench`: the inference price") == "upcycle-bench-the-inference-price"
    assert _slug("Drop-Upcycling, r = 0.5") == "drop-upcycling-r--05"


def test_the_intact_fractions_method_md_states():
    """method.md: fully intact neurons are a fraction 1 - r (shared) versus (1 - r)^3 (independent)."""
    F, r = 4000, 0.5
    gate, up, down = torch.randn(F, 8), torch.randn(F, 8), torch.randn(8, F)
    for mode, expected in (("shared", 1 - r), ("independent", (1 - r) ** 3)):
        x = upcycle_expert(gate, up, down, layer=0, expert=0,
                           opts=UpcycleOptions(method="drop", ratio=r, index_mode=mode, seed=3))
        intact = (~x.redrawn_MF.any(dim=0)).float().mean().item()
        assert abs(intact - expected) < 0.03, (mode, intact)
