"""README.md model cards in the Hugging Face Hub's form, for every directory we write (convert, compose, grow, export),
and the result of `upcycle check` added to them.

A card is YAML front matter the Hub parses (`base_model` where the source names one, `library_name: transformers`,
`tags` with `moe` and the method, `license` where the source's own card states one), then what the model is (format,
experts, top-k, granularity, shared expert, total and active parameters, counted from the written files' headers), how
it was made (method, ratio, index mode, seed, sources with their sha256, the exact command), how to load it, and the
function check once `upcycle check` has run on it. Only cards we wrote (they carry CARD_MARKER) are ever changed; a
source's own card is named, never copied over ours or overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from upcycle.files import atomic_write

CARD_NAME = "README.md"
CARD_MARKER = "<!-- written by upcycle -->"
CHECK_START, CHECK_END = "<!-- upcycle check -->", "<!-- /upcycle check -->"
COMMAND_ENV = "UPCYCLE_COMMAND"  # set by the command line (cli.main) to the command being run
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def record_command(argv: list[str]) -> None:
    """Remember the command this process runs (the card's "made with" line); the CLI calls it."""
    os.environ[COMMAND_ENV] = shlex.join(["upcycle", *argv])


def front_matter(path: Path) -> dict:
    """The YAML front matter of a model card (README.md), {} where there is none or it does not parse."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        values = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return values if isinstance(values, dict) else {}


def parameter_counts(directory: Path, num_experts: int | None, top_k: int | None) -> tuple[int, int]:
    """(all parameters, parameters used per token) of the safetensors files in `directory`, from their headers: the
    routed experts' tensors (named ".experts.", not shared ones) count top_k / num_experts."""
    from upcycle.formats.safetensors_io import read_header

    total = routed = 0
    for file in sorted(directory.glob("*.safetensors")):
        header, _ = read_header(file)
        for name, info in header.items():
            if name == "__metadata__" or name.startswith("redrawn"):
                continue
            count = 1
            for size in info["shape"]:
                count *= size
            total += count
            if ".experts." in name and "shared" not in name:
                routed += count
    if not num_experts or not top_k:
        return total, total
    return total, total - routed + routed * top_k // num_experts


def _source_facts(sources: list[dict]) -> tuple[str | None, str | None, list[str]]:
    """(base_model, license, lines naming each source with its sha256) from the manifest's source records."""
    base_model = license_ = None
    lines = []
    for source in sources:
        path = Path(source.get("path", ""))
        card = front_matter(path / CARD_NAME)
        config = {}
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            pass
        named = card.get("base_model") or config.get("_name_or_path")
        if isinstance(named, list):
            named = named[0] if named else None
        if base_model is None and isinstance(named, str) and _HUB_ID.match(named):
            base_model = named
        if license_ is None and isinstance(card.get("license"), str):
            license_ = card["license"]
        sums = source.get("sha256") or {}
        digest = ", ".join(f"`{name}` {value}" for name, value in sorted(sums.items())) or "not recorded"
        own_card = f"; its own card: `{path / CARD_NAME}`" if (path / CARD_NAME).is_file() else ""
        lines.append(f"- `{path}` ({source.get('model_type', 'unknown type')}): sha256 {digest}{own_card}")
    return base_model, license_, lines


def _describe_model(config: dict, total: int, active: int) -> list[str]:
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    rows = [("format", config.get("model_type", "unknown")), ("layers", config.get("num_hidden_layers")),
            ("hidden size", config.get("hidden_size"))]
    if experts:
        rows += [("routed experts per MoE layer", experts), ("experts per token (top-k)",
                                                              config.get("num_experts_per_tok")),
                 ("expert FFN size", config.get("moe_intermediate_size") or config.get("intermediate_size"))]
        shared = config.get("shared_expert_intermediate_size") or config.get("shared_intermediate_size")
        if shared:
            rows.append(("shared expert FFN size", shared))
    rows += [("parameters", f"{total:,}"), ("parameters used per token", f"{active:,}")]
    return ["| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows if value is not None)]


def _how_made(provenance: dict) -> list[str]:
    options = provenance.get("options") or {}
    keys = ("method", "ratio", "index_mode", "stats", "seed", "num_experts", "top_k", "granularity", "moe_layers",
            "shared_expert", "router_init", "renormalize", "format", "dtype")
    rows = [f"| {key} | `{options[key]}` |" for key in keys if key in options and options[key] is not None]
    lines = ["| option | value |", "| --- | --- |", *rows] if rows else []
    for key, value in (provenance.get("facts") or {}).items():
        lines.append(f"- {key}: {value}")
    return lines


def write_card(directory: Path, *, what: str, provenance: dict, config: dict | None = None) -> Path:
    """Write `directory`/README.md for a model we just wrote. `what`: a sentence saying how it was made (convert,
    compose, grow, export); `provenance`: {"options": the manifest's options, "sources": the manifest's source
    records, "facts": {label: text}, "method": tag}. `config`: the HF config (read from config.json when None)."""
    directory = Path(directory)
    if config is None:
        config = json.loads((directory / "config.json").read_text())
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    total, active = parameter_counts(directory, experts, config.get("num_experts_per_tok"))
    base_model, license_, source_lines = _source_facts(provenance.get("sources") or [])
    method = provenance.get("method") or (provenance.get("options") or {}).get("method")
    tags = ["upcycle", *(["moe", "mixture-of-experts"] if experts else []), *([method] if method else []),
            config.get("model_type")]
    matter: dict[str, Any] = {}
    if base_model:
        matter["base_model"] = base_model
    if license_:
        matter["license"] = license_
    matter.update(library_name="transformers", pipeline_tag="text-generation",
                  tags=[t for i, t in enumerate(tags) if t and t not in tags[:i]])
    command = os.environ.get(COMMAND_ENV)
    title = f"{config.get('model_type', 'model')}, made by upcycle" + (f" ({method})" if method else "")
    lines = ["---", yaml.safe_dump(matter, sort_keys=False).rstrip(), "---", CARD_MARKER, "",
             f"# {title}", "", what, "", "## The model", "", *_describe_model(config, total, active), "",
             "## How it was made", ""]
    made = _how_made(provenance)
    lines += [*made, ""] if made else []
    if source_lines:
        lines += ["Sources:", "", *source_lines, ""]
    lines += [f"Command: `{command}`" if command else "Made through upcycle's Python API (no command line).", "",
              "The full record (every option, per-layer statistics of what was drawn) is `upcycle_manifest.json` where "
              "this directory has one.", "", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIRECTORY")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIRECTORY")', "```", "",
              "No remote code is needed. `upcycle check THIS_DIRECTORY --dense PARENT` measures its function against "
              "its parent and adds the result below.", ""]
    path = directory / CARD_NAME
    atomic_write(path, "\n".join(lines))
    return path


def add_check(directory: Path, report: dict, dense: str, tolerance: float) -> bool:
    """Put `upcycle check`'s result into `directory`'s card (replacing an earlier check's); only a card we wrote is
    changed. Returns whether it was."""
    path = Path(directory) / CARD_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if CARD_MARKER not in text:
        return False
    verdict = {True: f"the same function (EQUIVALENT at tolerance {tolerance:g})",
               False: f"NOT the same function, though it should be (tolerance {tolerance:g})",
               None: "not meant to compute the same function (re-drawn experts); the numbers say how far it moved"}
    section = "\n".join([
        CHECK_START, "## Function check", "",
        f"`upcycle check` against `{dense}`: {verdict[report.get('equivalent')]}.", "",
        "| measure | value |", "| --- | --- |",
        f"| tokens probed | {report['num_tokens']} |",
        f"| max \\|logit difference\\| | {report['max_abs_logit_diff']:.3e} |",
        f"| top-1 agreement | {report['top1_agreement']:.4f} |",
        f"| perplexity, parent / this model | {report['dense_perplexity']:.4f} / {report['moe_perplexity']:.4f} |",
        CHECK_END, ""])
    if CHECK_START in text and CHECK_END in text:
        head, rest = text.split(CHECK_START, 1)
        text = head + section + rest.split(CHECK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write(path, text)
    return True
