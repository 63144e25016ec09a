"""`upcycle compose SPEC.yaml OUT`: an MoE whose experts come from several dense models of one architecture (say a
code, a math and a chat fine-tune of one base), with routers that can be steered by example prompts.

The spec names a base (whose embeddings, attention, norms and head the MoE takes) or `average: true` (those tensors
averaged over the experts' sources, as Branch-Train-MiX does), and the experts: each one copy of its source's FFN,
optionally Drop-Upcycled (`ratio`, `index_mode`), optionally with positive and negative prompts. Everything else is
`upcycle convert`'s machinery: the same layout, formats, granularity, shared expert, streaming writer, manifest and
atomic output. `upcycle convert --method btx` is the special case `average: true`, `router: uniform`, every source
listed E / S times (convert builds exactly that plan; tests/unit/test_compose.py checks the two give the same weights).

Router rows (`router`):
    hidden  per MoE layer, expert i's row is the mean direction (each token's vector divided by its norm) of the hidden
            states entering that layer's FFN (what the router sees) over its positive prompts' tokens, minus the same
            over its negative prompts', computed with the base model one layer at a time;
    embed   the same from the prompts' token embeddings (one row set for every layer; no model run);
    data    k-means of calibration text, as `upcycle convert --router-init data` (on the base, or the first source);
    uniform / normal   random, as convert.
Rows from prompts are centred (the mean row subtracted: softmax ignores what every row shares, so routing is unchanged
by it) and each scaled to the norm of a random row, router_std * sqrt(D), as `--router-init data` does: the direction
carries the prompts, the size is what training recipes expect of a fresh router.

After writing, the finished MoE reads every prompt again, one layer at a time, and the manifest records per MoE layer
the share of each expert's positive-prompt tokens whose top-1 expert is one of that expert's own (`prompt_routing`);
`upcycle check` measures the same through transformers.

Run: `upcycle compose spec.yaml OUT`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from upcycle.formats import hf_formats as hf
from upcycle.convert.calibration import rows_from_centroids
from upcycle.config import build, check_values, config_fields, read_yaml, refuse_unknown
from upcycle.convert.conversion import check_conversion_fits, check_dense_source, write_moe
from upcycle.convert.options import INDEX_MODES, ROUTER_INITS, ConversionPlan, ConvertOptions, CopyPlan
from upcycle.data.prepare import calibration_token_ids, expand_paths, iter_documents
from upcycle.errors import UpcycleError
from upcycle.files import check_output
from upcycle.model.hf import layer_by_layer
from upcycle.formats.safetensors_io import CheckpointReader
from upcycle.convert.upcycling import btx_mean
from upcycle.validation import short_repr

COMPOSE_ROUTERS = ("hidden", "embed", *ROUTER_INITS)
# `upcycle convert` options a spec takes at its top level, with convert's meaning and default (one declaration:
# ConvertOptions; docs/convert.md's compose section lists them from here).
CONVERT_FIELDS = ("top_k", "granularity", "moe_layers", "seed", "stats", "format", "dtype", "router_std",
                  "calibration", "calibration_tokens", "router_aux_loss_coef", "max_shard_size")
WHAT = "a compose spec"  # how messages name the file


@dataclass
class ExpertSpec:
    """One entry of a compose spec's `experts` list.

    Attributes:
        source: A dense checkpoint directory of the base's architecture and shape (a fine-tune of it, typically):
            its FFN in every MoE layer becomes this expert (one copy; granularity G makes it G fine-grained experts).
        positive: Prompts this expert should receive: a list of strings, or a path (a JSONL file with a "text" field
            per line, a plain text file, or a directory of them: each document one prompt). Needed by router hidden
            and embed.
        negative: Prompts this expert should not receive, in the same forms (optional).
        ratio: Drop-Upcycling of this expert's copy: the fraction of its neurons re-drawn, in [0, 1] (0: the source's
            FFN as it is).
        index_mode: independent (a fresh neuron set for gate, up and down; the default) or shared (one set for all
            three), as upcycle convert --index-mode.
    """

    source: str
    positive: list[str] | str | None = None
    negative: list[str] | str | None = None
    ratio: float = 0.0
    index_mode: str = field(default="independent", metadata={"choices": INDEX_MODES})


@dataclass
class ComposeSpec:
    """The YAML file of `upcycle compose`. Besides these fields it takes, at its top level, the `upcycle convert`
    options listed in `CONVERT_FIELDS` (top_k, granularity, moe_layers, format, dtype, seed, ...), with convert's
    meaning and defaults.

    Attributes:
        experts: The experts, in order (expert i is router row i); see the experts table.
        base: The dense checkpoint whose non-FFN tensors (embeddings, attention, norms, head) the MoE takes, whose
            tokenizer reads the prompts and whose hidden states set router hidden rows. Leave out with average.
        average: Average every non-FFN tensor over the experts' distinct sources instead of taking a base's (as BTX
            does); that averaged model is then the base, and the first source's tokenizer reads the prompts.
        shared_expert: Optional, qwen2_moe, granitemoeshared and glm4_moe only: dense (one granularity segment of the
            base's FFN, never re-drawn, as upcycle convert --shared-expert dense) or {source: DIR} (that model's whole
            FFN; the shared expert and the routed mixture then weigh 1/2 each).
        router: hidden (rows from the base's hidden states on each expert's prompts; the default), embed (from the
            prompts' token embeddings), data (k-means of the calibration text, as convert), uniform or normal (random,
            as convert).
    """

    experts: list[ExpertSpec]
    base: str | None = None
    average: bool = False
    shared_expert: str | dict[str, str] | None = None
    router: str = field(default="hidden", metadata={"choices": COMPOSE_ROUTERS})


# --------------------------------------------------------------------------------------------------------------------
# Reading and checking the spec


def read_spec(path: str | os.PathLike) -> tuple[ComposeSpec, ConvertOptions]:
    """The spec and the convert options it implies, every field checked (types, choices, paths) before any work."""
    values = read_yaml(path, WHAT)
    if not isinstance(values, dict):
        raise UpcycleError(f"{path} must hold a mapping (base, experts, router, ...); see docs/convert.md")
    own = [f.name for f in config_fields(ComposeSpec)]
    try:  # types and choices, by `upcycle.config`; messages name the spec field
        refuse_unknown(values, [*own, *CONVERT_FIELDS], what=WHAT)
        convert_values = check_values(ConvertOptions, {k: v for k, v in values.items() if k in CONVERT_FIELDS})
        spec = build(ComposeSpec, {k: v for k, v in values.items() if k in own}, what=WHAT)
    except UpcycleError as exc:
        raise UpcycleError(f"{path}: {exc}") from None
    if not spec.experts:
        raise UpcycleError(f"{path}: experts must be a list of at least one {{source: DIR, ...}} mapping")
    for i, expert in enumerate(spec.experts):
        if not 0 <= expert.ratio <= 1:
            raise UpcycleError(f"{path}: experts[{i}].ratio must lie in [0, 1], got {expert.ratio!r}")
    if (spec.base is None) == (not spec.average):
        raise UpcycleError(f"{path}: give either base (a dense checkpoint) or average: true, exactly one of them")
    shared = spec.shared_expert
    if shared is not None and shared != "dense" and not (isinstance(shared, dict) and set(shared) == {"source"}):
        raise UpcycleError(f"{path}: shared_expert must be dense or {{source: DIR}}, got {short_repr(shared)}")
    granularity = convert_values.get("granularity", ConvertOptions.granularity)
    routed = granularity - (shared == "dense")
    opts = ConvertOptions(method="drop", ratio=0.0, num_experts=len(spec.experts) * max(1, routed),
                          shared_expert="dense" if shared == "dense" else "zero",
                          # hidden and embed rows are computed here and handed over in the plan
                          router_init=spec.router if spec.router in ROUTER_INITS else "uniform", **convert_values)
    _as_spec_error(path, opts.validate)
    return spec, opts


def _as_spec_error(path: str | os.PathLike, check: Callable[[], Any]) -> Any:
    """Run one of convert's checks; its messages name convert's flags (--top-k), here they are spec fields (top_k)."""
    try:
        return check()
    except UpcycleError as exc:
        raise UpcycleError(f"{path}: " + re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"),
                                                str(exc))) from None


@dataclass
class _Sources:
    readers: list[CheckpointReader]  # distinct inputs: the base (when given) first, then each new source
    index: dict[str, int]  # resolved path -> reader
    shapes: hf.Shapes

    def of(self, path: str) -> int:
        return self.index[str(Path(path).expanduser().resolve())]


def _open_sources(spec: ComposeSpec) -> _Sources:
    paths = ([spec.base] if spec.base is not None else []) + [e.source for e in spec.experts]
    if isinstance(spec.shared_expert, dict):
        paths.append(spec.shared_expert["source"])
    readers, index = [], {}
    for path in paths:
        key = str(Path(path).expanduser().resolve())
        if key not in index:
            index[key] = len(readers)
            readers.append(CheckpointReader(path))
    first = readers[0]
    shapes = check_dense_source(first)
    for reader in readers[1:]:
        other = check_dense_source(reader)
        if reader.config.get("model_type") != first.config.get("model_type") or other != shapes:
            raise UpcycleError(f"{reader.dir} ({reader.config.get('model_type')}, {_describe(other)}) does not match "
                               f"{first.dir} ({first.config.get('model_type')}, {_describe(shapes)}); every source "
                               "must have the base's architecture and shape (fine-tunes of one model)")
    return _Sources(readers, index, shapes)


def _describe(shapes: hf.Shapes) -> str:
    return (f"{shapes.num_layers} layers, dim {shapes.dim}, ffn {shapes.ffn_dim}, {shapes.num_heads}/"
            f"{shapes.num_kv_heads} heads, vocab {shapes.vocab_size}")


# --------------------------------------------------------------------------------------------------------------------
# Prompts and router rows


def _prompt_texts(prompts: list[str] | str | None, where: str) -> list[str]:
    if prompts is None:
        return []
    if isinstance(prompts, list):
        return prompts
    if not Path(prompts).expanduser().exists():
        raise UpcycleError(f"{where}: {prompts} does not exist; give a list of prompts or a text/JSONL file")
    return [doc for file in expand_paths([prompts]) for doc in iter_documents(file)]


def prompt_token_ids(tokenizer_dir: Path, texts: list[str]) -> list[torch.Tensor]:
    """Each prompt's token ids, by the tokenizer.json of `tokenizer_dir`, without special tokens (compose and check
    read prompts the same way)."""
    from tokenizers import Tokenizer

    file = Path(tokenizer_dir) / "tokenizer.json"
    if not file.is_file():
        raise UpcycleError(f"prompts are read with the base's tokenizer, and {tokenizer_dir} has no tokenizer.json; "
                           "add it")
    tokenizer = Tokenizer.from_file(str(file))
    return [torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long) for text in texts]


@dataclass
class Prompts:
    texts: list[dict[str, list[str]]]  # per expert: {"positive": [...], "negative": [...]}
    sequences: list[torch.Tensor]  # every prompt's token ids, experts in order, positive then negative
    owner: list[tuple[int, str]]  # per sequence: (expert, "positive" | "negative")

    @classmethod
    def tokenize(cls, texts: list[dict[str, list[str]]], tokenizer_dir: Path, where: str = "prompts") -> Prompts:
        """The prompts of every expert (as the manifest records them), tokenized; an empty one is refused."""
        sequences, owner = [], []
        for i, entry in enumerate(texts):
            for kind in ("positive", "negative"):
                ids = prompt_token_ids(tokenizer_dir, entry[kind])
                for text, tokens in zip(entry[kind], ids):
                    if tokens.numel() == 0:
                        raise UpcycleError(f"{where}: experts[{i}].{kind}: the prompt {text[:40]!r} tokenizes to "
                                           "nothing; give it some text")
                sequences += ids
                owner += [(i, kind)] * len(ids)
        return cls(texts, sequences, owner)


def _read_prompts(spec: ComposeSpec, tokenizer_dir: Path, path: str | os.PathLike) -> Prompts:
    texts = []
    for i, expert in enumerate(spec.experts):
        entry = {kind: _prompt_texts(getattr(expert, kind), f"{path}: experts[{i}].{kind}")
                 for kind in ("positive", "negative")}
        if spec.router in ("hidden", "embed") and not entry["positive"]:
            raise UpcycleError(f"{path}: experts[{i}] ({expert.source}) has no positive prompts, which router "
                               f"{spec.router} needs for every expert; add them or set router: uniform")
        texts.append(entry)
    return Prompts.tokenize(texts, tokenizer_dir, str(path))


def _unit(x_ND: torch.Tensor) -> torch.Tensor:
    return x_ND / x_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)


def prompt_rows(features: list[torch.Tensor], prompts: Prompts, num_experts: int, *, std: float) -> torch.Tensor:
    """Router rows [C, D] from per-sequence features ([T, D] each): expert i's row is the mean unit vector over its
    positive prompts' tokens minus that over its negative ones', then rows are centred and scaled to norm
    std * sqrt(D) (`calibration.rows_from_centroids`). In float64."""
    rows = []
    for i in range(num_experts):
        mean = {}
        for kind in ("positive", "negative"):
            tokens = [features[j].double() for j, owner in enumerate(prompts.owner) if owner == (i, kind)]
            mean[kind] = _unit(torch.cat(tokens)).mean(dim=0) if tokens else None
        rows.append(mean["positive"] - mean["negative"] if mean["negative"] is not None else mean["positive"])
    return rows_from_centroids(torch.stack(rows), std=std).float()


class _MeanOf(Mapping):
    """The element-wise mean of several checkpoints' tensors (the `average: true` base), read lazily."""

    def __init__(self, readers: list[CheckpointReader]):
        self.readers = readers

    def __getitem__(self, name: str) -> torch.Tensor:
        return btx_mean([r[name] for r in self.readers])

    def __iter__(self):
        return iter(self.readers[0].tensors)

    def __len__(self) -> int:
        return len(self.readers[0].tensors)


def _base_tensors(sources: _Sources, plan: ConversionPlan) -> Mapping[str, torch.Tensor]:
    readers = [sources.readers[i] for i in plan.base]
    return readers[0] if len(readers) == 1 else _MeanOf(readers)


def _router_rows(spec: ComposeSpec, opts: ConvertOptions, sources: _Sources, plan: ConversionPlan, prompts: Prompts,
                 moe_layers: tuple[int, ...]) -> dict[int, torch.Tensor] | None:
    base = _base_tensors(sources, plan)
    if spec.router == "embed":
        embed = base[hf.EMBED_KEY].float()
        rows = prompt_rows([embed[ids] for ids in prompts.sequences], prompts, len(spec.experts), std=opts.router_std)
        return {layer: rows for layer in moe_layers}
    if spec.router == "hidden":
        out = {}
        for layer, ffn_inputs, _ in layer_by_layer(base, sources.readers[plan.base[0]].config, prompts.sequences):
            if layer in moe_layers:
                out[layer] = prompt_rows(ffn_inputs, prompts, len(spec.experts), std=opts.router_std)
        return out
    return None  # data: convert runs the k-means; uniform, normal: drawn by convert


def prompt_routing(tensors: Mapping[str, torch.Tensor], cfg: dict, prompts: Prompts, routed: int
                   ) -> list[dict]:
    """Per MoE layer, the share of each expert's positive-prompt tokens whose top-1 routed expert is one of its own
    (experts i * routed .. i * routed + routed - 1), measured on the MoE at `tensors` one layer at a time."""
    return [{"layer": layer, "top1_share": top1_shares(logits, prompts.owner, len(prompts.texts), routed)}
            for layer, _, logits in layer_by_layer(tensors, cfg, prompts.sequences) if logits[0] is not None]


def top1_shares(logits: list[torch.Tensor], owner: list[tuple[int, str]], num_experts: int, routed: int
                ) -> list[float]:
    """Share of expert i's positive-prompt tokens whose top-1 (of [T, E] router logits per sequence) is in its
    group of `routed` experts, for each expert i (rounded to 4 decimals)."""
    hits, totals = [0] * num_experts, [0] * num_experts
    for logits_TE, (i, kind) in zip(logits, owner):
        if kind != "positive":
            continue
        group_T = logits_TE.float().argmax(dim=-1) // routed
        hits[i] += int((group_T == i).sum())
        totals[i] += group_T.numel()
    return [round(h / t, 4) for h, t in zip(hits, totals)]


# --------------------------------------------------------------------------------------------------------------------
# The command


def compose(spec_path: str | os.PathLike, output: str | os.PathLike, *, force: bool = False,
            progress: bool = True) -> Path:
    """Compose the MoE that the spec at `spec_path` describes into `output`; returns the output path. Everything is
    validated (sources' shapes, prompts, options) before anything is written, and the output is published
    atomically, as by `upcycle convert`."""
    spec, opts = read_spec(spec_path)
    sources_paths = [p for p in ([spec.base] + [e.source for e in spec.experts]) if p is not None]
    if isinstance(spec.shared_expert, dict):
        sources_paths.append(spec.shared_expert["source"])
    prompt_files = [p for e in spec.experts for p in (e.positive, e.negative) if isinstance(p, str)]
    inputs = [*sources_paths, *prompt_files, *([opts.calibration] if opts.calibration else [])]
    output = check_output(output, force=force, inputs=inputs)
    sources = _open_sources(spec)
    fmt = hf.resolve_format(sources.readers[0].config, opts.format)
    if spec.shared_expert is not None and fmt not in hf.SHARED_EXPERT_FORMATS:
        raise UpcycleError(f"{spec_path}: shared_expert needs format qwen2_moe, granitemoeshared or glm4_moe, the "
                           f"formats with a shared expert (got {fmt})")
    moe_layers = _as_spec_error(spec_path, lambda: opts.check_source(sources.shapes, fmt))
    distinct = list(dict.fromkeys(sources.of(e.source) for e in spec.experts))
    plan = ConversionPlan(base=(0,) if spec.base is not None else tuple(distinct),
                          copies=tuple(CopyPlan(sources.of(e.source), "drop", float(e.ratio), e.index_mode)
                                       for e in spec.experts),
                          shared_source=(sources.of(spec.shared_expert["source"])
                                         if isinstance(spec.shared_expert, dict) else None))
    check_conversion_fits(sources.readers, sources.shapes, fmt, opts, output)  # before the prompts' model runs
    tokenizer_dir = sources.readers[plan.base[0]].dir
    has_prompts = any(e.positive or e.negative for e in spec.experts)
    prompts = (_read_prompts(spec, tokenizer_dir, spec_path) if has_prompts or spec.router in ("hidden", "embed")
               else None)
    if opts.router_init == "data":  # the text is there (cheap, before any work); clustering comes while writing
        calibration_token_ids(opts.calibration, tokenizer_dir, opts.calibration_tokens)
    if prompts is not None:
        plan = dataclasses.replace(plan, router_rows=_router_rows(spec, opts, sources, plan, prompts, moe_layers))

    def finish(directory: Path, moe_config: dict) -> dict[str, Any]:
        extra: dict[str, Any] = {"function_preserving": _preserving(spec, sources, plan)}
        if prompts is not None:
            extra["prompts"] = prompts.texts
            extra["prompt_routing"] = prompt_routing(CheckpointReader(directory), moe_config, prompts,
                                                     opts.routed_segments)
        return extra

    options = {"command": "compose", **dataclasses.asdict(opts), "format": fmt,
               "base": str(Path(spec.base).absolute()) if spec.base else None, "average": spec.average,
               "router": spec.router,
               "shared_expert": (spec.shared_expert if not isinstance(spec.shared_expert, dict)
                                 else {"source": str(Path(spec.shared_expert["source"]).absolute())}),
               "experts": [{"source": str(Path(e.source).absolute()), "ratio": e.ratio, "index_mode": e.index_mode}
                           for e in spec.experts],
               "calibration": str(Path(opts.calibration).absolute()) if opts.calibration else None}
    for unused in ("method", "ratio", "index_mode", "noise_std", "router_init", "btx_sources", "shared_expert_dim"):
        options.pop(unused)  # convert options a spec does not take (their values above are placeholders)
    return write_moe(sources.readers, sources.shapes, fmt, opts, plan, output, force=force, inputs=inputs,
                     progress=progress, options=options, finish=finish)


def _preserving(spec: ComposeSpec, sources: _Sources, plan: ConversionPlan) -> bool:
    """Whether the MoE should compute the base's function: every expert (and a shared source) an unchanged copy of
    one model, which is the base (or all that is averaged)."""
    used = {c.source for c in plan.copies} | set(plan.base)
    if plan.shared_source is not None:
        used.add(plan.shared_source)
    hashes = {tuple(sorted(sources.readers[i].sha256().items())) for i in used}
    return len(hashes) == 1 and all(c.ratio == 0 for c in plan.copies)
