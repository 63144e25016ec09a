"""A conversion decided before any work, as plain data (no torch): the options of `upcycle convert` and `upcycle grow`
and of the upcycling math, where every output tensor comes from (`ConversionPlan`), and what a conversion costs
(`estimate`). The CLI's --help, the train config's `init` section and the experiment config declare themselves from
these classes, so they load without the model or the conversion; convert.py, grow.py and upcycling.py do the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from upcycle.formats import hf_formats as hf
from upcycle.errors import UpcycleError
from upcycle.validation import check_fields

if TYPE_CHECKING:
    import torch

METHODS = ("drop", "naive", "noise", "scratch", "btx")
INDEX_MODES = ("independent", "shared")
STATS_MODES = ("slice", "matrix")
ROUTER_INITS = ("uniform", "normal", "data")  # data: k-means of calibration hidden states (upcycle.convert.calibration)
SHARED_EXPERT_MODES = ("zero", "dense")
DEFAULT_SEED = 1234
# Hidden states clustered at a time per layer by `--router-init data` (calibration.py; the first batch seeds
# k-means++); `estimate` counts one batch of them per MoE layer.
CALIBRATION_BATCH_TOKENS = 1024


def parse_moe_layers(spec: str | None, num_layers: int | None = None, *, name: str = "--moe-layers"
                     ) -> tuple[int, ...] | None:
    """The layers a `--moe-layers` spec names, ascending; None (every layer) for an empty spec or "all".

    `0-3,8`: indices and inclusive ranges. `every:N`: layers N-1, 2N-1, ... (Qwen-MoE's decoder_sparse_step N: every
    N-th layer is MoE, the first at index N-1). Without `num_layers` only the syntax is checked. Messages call the
    spec `name`."""
    if spec is None or spec.strip() in ("", "all"):
        return None if num_layers is None else tuple(range(num_layers))
    text = spec.replace(" ", "")
    example = f"e.g. {name} 0-3,8 or {name} every:2"
    layers: set[int] = set()
    try:
        if text.startswith("every:"):
            step = int(text.removeprefix("every:"))
            if step < 1:
                raise ValueError
            if num_layers is None:
                return None
            layers = set(range(step - 1, num_layers, step))
        else:
            for part in text.split(","):
                first, _, last = part.partition("-")
                a, b = int(first), int(last or first)
                if a < 0 or b < a:
                    raise ValueError
                layers.update(range(a, b + 1))
    except ValueError:
        raise UpcycleError(f"cannot read {name} {spec!r}; {example}") from None
    if num_layers is None:
        return tuple(sorted(layers))
    if not layers:
        raise UpcycleError(f"{name} {spec!r} selects no layer of the {num_layers}; {example}")
    if max(layers) >= num_layers:
        raise UpcycleError(f"{name} {spec!r} names layer {max(layers)}, but the model has layers 0-"
                           f"{num_layers - 1}; name layers in that range")
    return tuple(sorted(layers))


def btx_source_of_expert(num_experts: int, num_sources: int) -> list[int]:
    """Expert e takes the FFN of source e // (E / S): contiguous blocks of E / S experts per source."""
    if num_sources < 1 or num_experts % num_sources:
        raise UpcycleError(
            f"btx needs num_experts divisible by the number of sources; got {num_experts} experts and "
            f"{num_sources} sources (for example use --num-experts {num_sources * max(1, num_experts // num_sources)})"
        )
    block = num_experts // num_sources
    return [e // block for e in range(num_experts)]


@dataclass(frozen=True)
class UpcycleOptions:
    """Everything that decides how one dense FFN becomes E experts (BTX and scratch live elsewhere)."""

    method: str = "drop"
    ratio: float = 0.5
    index_mode: str = "independent"
    stats: str = "slice"
    noise_std: float = 0.02
    init_std: float = 0.02  # scratch only
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UpcycleError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.ratio <= 1.0 or math.isnan(self.ratio):
            raise UpcycleError(f"ratio must lie in [0, 1], got {self.ratio}")
        if self.index_mode not in INDEX_MODES:
            raise UpcycleError(f"unknown index mode {self.index_mode!r}; choose one of {', '.join(INDEX_MODES)}")
        if self.stats not in STATS_MODES:
            raise UpcycleError(f"unknown stats {self.stats!r}; choose one of {', '.join(STATS_MODES)}")
        if self.noise_std < 0 or self.init_std < 0:
            raise UpcycleError("noise_std and init_std must be non-negative")


@dataclass(frozen=True)
class ConvertOptions:
    """Every choice of a conversion; recorded verbatim in the manifest.

    The one declaration of convert's options: each field is an `upcycle convert` flag (`--snake-case`), a field of the
    train config's `init` section and a row of docs/convert.md's option table, all made from this class (a field's
    help is its entry below, its choices the `choices` metadata).

    Attributes:
        method: drop (Drop-Upcycling), naive (exact copies), noise (add N(0, noise_std^2) to the selected neurons),
            scratch (HF default init everywhere) or btx (Branch-Train-MiX over --btx-sources).
        ratio: Fraction r of each expert's FFN neurons re-drawn (drop) or perturbed (noise), in [0, 1].
        num_experts: Number of experts E per layer (fine-grained experts: a multiple of --granularity).
        top_k: Experts per token K (1 <= K <= E; a multiple of --granularity).
        granularity: G: split the dense FFN's F neurons into G segments of F/G (a seeded permutation, recorded in the
            manifest); every expert is one segment, E / G copies of the dense FFN, one router row per copy (virtual
            groups) and down projections times G, so r = 0 is still the dense function.
        moe_layers: Which layers become MoE: all, or indices and ranges (0-3,8), or every:N (layers N-1, 2N-1, ...);
            the other layers keep the dense FFN. qwen2_moe and qwen3_moe (their mlp_only_layers), and glm4_moe when the
            dense layers are the first ones (its first_k_dense_replace).
        seed: Seed from which every (layer, expert, matrix) draw derives its own generator.
        index_mode: independent (a fresh neuron set for gate, up and down, as the authors' released code behind every
            published number; the default) or shared (one set per expert for all three, as the paper's text).
        stats: Where mu and sigma of the re-drawn values come from: slice (the selected neurons of the dense matrix,
            as the released code) or matrix (the whole dense matrix).
        noise_std: Standard deviation of the noise added by --method noise.
        router_init: uniform (zero-mean uniform, as the released runs), normal, or data (rows from k-means centroids
            of the hidden states entering each layer's FFN when the dense model reads --calibration, scaled to the
            uniform rows' norm).
        router_std: Standard deviation of the router weights (data: rows get the norm router_std * sqrt(D)).
        calibration: For --router-init data: calibration text, a JSONL file (a "text" field per line), a plain text
            file or a directory of them, as upcycle data prepare reads; tokenized with SOURCE's tokenizer.
        calibration_tokens: For --router-init data: run the dense model on at most this many calibration tokens.
        format: auto (llama/mistral -> mixtral, qwen2 -> qwen2_moe, qwen3 -> qwen3_moe), mixtral, qwen2_moe,
            qwen3_moe, granitemoeshared (fine-grained experts plus an ungated shared expert; llama, mistral and qwen2
            sources), granitemoe (Granite's MoE without the shared expert; the same sources) or glm4_moe
            (DeepSeek-V3's MoE over ordinary attention: sigmoid routers with a zero balancing bias, an ungated shared
            expert of whole routed experts' size, dense layers only as the first ones; llama, qwen2 and qwen3 sources,
            and mistral without a sliding window).
        dtype: Output dtype: auto (the source's), float32, bfloat16 or float16. Math always runs in float32.
        router_aux_loss_coef: The load-balancing coefficient written into the output's config.json.
        renormalize: Renormalize the top-k routing weights to sum to 1 (Mixtral and Granite always do; Qwen-MoE's
            norm_topk_prob). Only with renormalization is naive upcycling exactly the dense function: without it a
            token's FFN output is scaled by the sum of its top-k probabilities (about K / E at initialization).
            --no-renormalize (qwen2_moe, qwen3_moe) makes a qwen2_moe output compute the same function in llama.cpp,
            whose qwen2moe graph never renormalizes.
        shared_expert: qwen2_moe, granitemoeshared and glm4_moe: the shared expert is zero (down projection zero: it
            adds nothing at initialization) or dense (one of the --granularity segments of the dense FFN, never
            re-drawn; qwen2_moe: its down projection doubled and its sigmoid gate near 0; so r = 0 is still the dense
            function; the other G - 1 segments make the routed experts; needs --granularity 2 or more).
        shared_expert_dim: With --shared-expert zero: size of the shared expert (qwen2_moe, which always has one:
            default the dense FFN size; granitemoeshared and glm4_moe: default none; glm4_moe: a multiple of the
            routed experts' size, the dense FFN size / --granularity).
        btx_sources: For --method btx: the other dense checkpoints (SOURCE is the first source).
        max_shard_size: Largest output shard, e.g. 5GB or 500MB.
    """

    method: str = field(default="drop", metadata={"choices": METHODS})
    ratio: float = 0.5
    num_experts: int = 8
    top_k: int = 2
    granularity: int = 1
    moe_layers: str = "all"
    seed: int = DEFAULT_SEED
    index_mode: str = field(default="independent", metadata={"choices": INDEX_MODES})
    stats: str = field(default="slice", metadata={"choices": STATS_MODES})
    noise_std: float = 0.02
    router_init: str = field(default="uniform", metadata={"choices": ROUTER_INITS})
    router_std: float = 0.02
    calibration: str | None = None
    calibration_tokens: int = 16384
    format: str = field(default="auto", metadata={"choices": ("auto", *hf.MOE_FORMATS)})
    dtype: str = field(default="auto", metadata={"choices": ("auto", *hf.FLOAT_DTYPES)})
    router_aux_loss_coef: float = 0.02
    renormalize: bool = True
    shared_expert: str = field(default="zero", metadata={"choices": SHARED_EXPERT_MODES})
    shared_expert_dim: int | None = None
    btx_sources: tuple[str, ...] = ()
    max_shard_size: str = "5GB"

    def upcycle_options(self, init_std: float) -> UpcycleOptions:
        return UpcycleOptions(method=self.method, ratio=self.ratio, index_mode=self.index_mode, stats=self.stats,
                              noise_std=self.noise_std, init_std=init_std, seed=self.seed)

    def option_name(self, field_name: str) -> str:
        """How messages spell one of these options: its flag (the train config's `init` section: its field)."""
        return "--" + field_name.replace("_", "-")

    def validate(self) -> None:
        n = self.option_name
        check_fields(self, n)  # types, choices, and no NaN/Inf in any float
        if not 0 <= self.ratio <= 1:
            raise UpcycleError(f"{n('ratio')} must lie in [0, 1], got {self.ratio}")
        if self.noise_std < 0:
            raise UpcycleError(f"{n('noise_std')} must be non-negative, got {self.noise_std}")
        self.upcycle_options(0.02).validate()
        if self.num_experts < 1:
            raise UpcycleError(f"{n('num_experts')} must be at least 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise UpcycleError(f"{n('top_k')} must lie in [1, num_experts={self.num_experts}], got {self.top_k}")
        self._validate_granularity()
        parse_moe_layers(self.moe_layers, name=n("moe_layers"))
        if self.router_std < 0:
            raise UpcycleError(f"{n('router_std')} must be non-negative, got {self.router_std}")
        if self.router_init == "data" and self.calibration is None:
            raise UpcycleError(f"{n('router_init')} data needs {n('calibration')} FILE (JSONL or text, as upcycle "
                               "data prepare reads)")
        if self.router_init != "data" and self.calibration is not None:
            raise UpcycleError(f"{n('calibration')} is only used with {n('router_init')} data; add "
                               f"{n('router_init')} data")
        if self.calibration_tokens < 1:
            raise UpcycleError(f"{n('calibration_tokens')} must be at least 1, got {self.calibration_tokens}")
        if self.method == "btx" and not self.btx_sources:
            raise UpcycleError(f"{n('method')} btx needs {n('btx_sources')} DIR [DIR ...] (SOURCE is the first "
                               "source)")
        if self.method != "btx" and self.btx_sources:
            raise UpcycleError(f"{n('btx_sources')} is only used with {n('method')} btx")
        sources = 1 + len(self.btx_sources)
        if self.method == "btx" and self.num_experts % sources:
            raise UpcycleError(f"btx needs {n('num_experts')} divisible by the number of sources; got "
                               f"{self.num_experts} experts and {sources} sources (for example use "
                               f"{n('num_experts')} {sources * max(1, self.num_experts // sources)})")
        if self.shared_expert_dim is not None and self.shared_expert_dim < 1:
            raise UpcycleError(f"{n('shared_expert_dim')} must be at least 1")
        try:
            _parse_size(self.max_shard_size)
        except UpcycleError as exc:
            raise UpcycleError(f"{n('max_shard_size')}: {exc}") from None

    def input_paths(self) -> tuple[str, ...]:
        """The files and directories these options make a conversion read besides SOURCE: an output must never be or
        contain one of them."""
        return (*self.btx_sources, *([self.calibration] if self.calibration is not None else []))

    @property
    def shared_dense(self) -> bool:
        return self.shared_expert == "dense"

    @property
    def routed_segments(self) -> int:
        """Fine-grained experts per copy of the dense FFN: G, or G - 1 when one segment is the shared expert."""
        return self.granularity - self.shared_dense

    def _validate_granularity(self) -> None:
        g, n = self.granularity, self.option_name
        if g < 1:
            raise UpcycleError(f"{n('granularity')} must be at least 1, got {g}")
        if self.shared_dense:
            if g < 2:
                raise UpcycleError(f"{n('shared_expert')} dense makes one of the {n('granularity')} segments the "
                                   f"shared expert; use {n('granularity')} 2 or more")
            if self.method not in ("drop", "naive", "noise"):
                raise UpcycleError(f"{n('shared_expert')} dense copies dense neurons, {n('method')} {self.method} "
                                   "does not; use drop, naive or noise")
            if self.shared_expert_dim is not None:
                raise UpcycleError(f"{n('shared_expert')} dense sizes the shared expert as one segment (F / G); "
                                   f"leave out {n('shared_expert_dim')}")
        if g == 1:
            return
        r = self.routed_segments
        what = f"{n('granularity')} - 1 (one segment is shared)" if self.shared_dense else n("granularity")
        if self.num_experts % r:
            raise UpcycleError(f"{n('num_experts')} {self.num_experts} is not a multiple of {what} = {r}; use "
                               f"{n('num_experts')} {r * max(1, round(self.num_experts / r))}")
        if self.top_k % r:
            raise UpcycleError(f"{n('top_k')} {self.top_k} is not a multiple of {what} = {r} (tokens must pick whole "
                               f"copies of the dense FFN); use {n('top_k')} {r * max(1, round(self.top_k / r))}")
        if self.method == "btx":
            raise UpcycleError(f"{n('granularity')} above 1 does not combine with {n('method')} btx; use "
                               f"{n('granularity')} 1")

    def check_format(self, fmt: str) -> None:
        """What the resolved output format `fmt` must hold of these options."""
        n = self.option_name
        if not self.renormalize and fmt in ("mixtral", *hf.GRANITE_FORMATS):
            flag = n("renormalize")
            off = f"--no-{flag[2:]}" if flag.startswith("--") else f"{flag}: false"
            raise UpcycleError(f"{fmt} always renormalizes the top-k weights, so {off} does not fit it; use "
                               f"{n('format')} qwen2_moe (or qwen3_moe for a Qwen3 source)")
        if self.shared_dense and fmt not in hf.SHARED_EXPERT_FORMATS:
            raise UpcycleError(f"{n('shared_expert')} dense needs {n('format')} qwen2_moe, granitemoeshared or "
                               f"glm4_moe, the formats with a shared expert (got {fmt})")

    def check_source(self, shapes: hf.Shapes, fmt: str) -> tuple[int, ...]:
        """What can only be checked against the source's sizes and the resolved format, before anything is written.
        Returns the MoE layers."""
        n = self.option_name
        if shapes.ffn_dim % self.granularity:
            divisors = [g for g in range(2, 17) if shapes.ffn_dim % g == 0]
            raise UpcycleError(f"the dense FFN size {shapes.ffn_dim} is not divisible by {n('granularity')} "
                               f"{self.granularity}; choose one of {', '.join(map(str, divisors)) or '1'}")
        self.check_format(fmt)
        if self.shared_expert_dim is not None and fmt not in hf.SHARED_EXPERT_FORMATS:
            raise UpcycleError(f"{n('shared_expert_dim')} sizes a shared expert, which {fmt} does not have; use "
                               f"{n('format')} qwen2_moe, granitemoeshared or glm4_moe, or leave it out")
        expert_dim = shapes.ffn_dim // self.granularity
        if fmt == "glm4_moe" and self.shared_expert_dim is not None and self.shared_expert_dim % expert_dim:
            fit = expert_dim * max(1, round(self.shared_expert_dim / expert_dim))
            raise UpcycleError(f"glm4_moe's shared expert is a whole number of routed experts' size ({expert_dim}: "
                               f"the dense FFN size / {n('granularity')}), not {self.shared_expert_dim}; use "
                               f"{n('shared_expert_dim')} {fit}, or {n('format')} granitemoeshared or qwen2_moe")
        moe_layers = parse_moe_layers(self.moe_layers, shapes.num_layers, name=n("moe_layers"))
        if fmt in hf.DENSE_PREFIX_FORMATS:
            hf.check_dense_prefix(fmt, moe_layers, shapes.num_layers, flag=n("moe_layers"))
        elif fmt not in hf.DENSE_LAYER_FORMATS and len(moe_layers) < shapes.num_layers:
            raise UpcycleError(f"{fmt} has an MoE FFN in every layer and cannot keep dense layers; use {n('format')} "
                               f"qwen2_moe (or qwen3_moe for a Qwen3 source; glm4_moe when the dense layers come "
                               f"first) with {n('moe_layers')}, or leave {n('moe_layers')} out")
        return moe_layers

    def shared_dim(self, shapes: hf.Shapes, fmt: str) -> int:
        """Size of the output's shared expert (0: none)."""
        if fmt not in hf.SHARED_EXPERT_FORMATS:
            return 0
        if self.shared_dense:
            return shapes.ffn_dim // self.granularity
        return self.shared_expert_dim or (shapes.ffn_dim if fmt == "qwen2_moe" else 0)  # glm4_moe: none (0 wide)

    def plan(self, num_sources: int) -> ConversionPlan:
        """Where each tensor comes from: every copy of the dense FFN from SOURCE, or, for btx, the non-FFN tensors
        averaged over the sources and blocks of E / S copies per source (exact copies)."""
        copies = self.num_experts // self.routed_segments
        if self.method == "btx":
            return ConversionPlan(base=tuple(range(num_sources)),
                                  copies=tuple(CopyPlan(source=s, method="naive", ratio=0.0, index_mode=self.index_mode)
                                               for s in btx_source_of_expert(copies, num_sources)))
        return ConversionPlan(base=(0,), copies=(CopyPlan(0, self.method, self.ratio, self.index_mode),) * copies)


@dataclass(frozen=True)
class CopyPlan:
    """One copy of a dense FFN in the MoE: made from `source`'s FFN by `method` (naive, drop, noise or scratch) with
    `ratio` and `index_mode`, then cut into the copy's routed experts (its --granularity segments)."""

    source: int
    method: str
    ratio: float
    index_mode: str


@dataclass
class ConversionPlan:
    """Where every output tensor comes from, decided before any work.

    `base`: the sources whose non-FFN tensors (embeddings, attention, norms, head) are copied (one) or averaged
    (several, as Branch-Train-MiX does). `copies`: one per router row, in expert order. `shared_source`: a source whose
    whole dense FFN is the shared expert (then the shared expert and the routed mixture weigh 1/2 each, so that
    composing copies of one model is still that model); None: ConvertOptions.shared_expert decides. `router_rows`:
    MoE layer -> one row per copy, computed before the conversion (data, hidden, embed); None: drawn at random by
    ConvertOptions.router_init. `upcycle convert` makes one from its options (`ConvertOptions.plan`), `upcycle compose`
    from its spec."""

    base: tuple[int, ...]
    copies: tuple[CopyPlan, ...]
    shared_source: int | None = None
    router_rows: dict[int, torch.Tensor] | None = None


def _parse_size(size: int | str) -> int:
    """safetensors_io.parse_size, imported when options are validated (that module needs torch; declaring these
    options must not)."""
    from upcycle.formats.safetensors_io import parse_size

    return parse_size(size)


# --------------------------------------------------------------------------------------------------------------------
# What a conversion costs, estimated before any work


@dataclass(frozen=True)
class Estimate:
    output_bytes: int  # everything written under OUTPUT
    memory_bytes: int  # peak memory of the conversion itself (the Python process and torch come on top)


# Generous per-item costs of the bookkeeping that grows with the number of tensors and of experts: the planned layout
# (an Entry and a PlannedTensor per tensor), the shard headers and index, and the manifest's per-expert records while
# converting (Python dicts) and as JSON text.
_MEMORY_PER_TENSOR = 1024
_MEMORY_PER_EXPERT = 4096
_HEADER_BYTES_PER_TENSOR = 160
_MANIFEST_BYTES_PER_EXPERT = 800
_MANIFEST_BYTES_PER_NEURON = 8  # the segments' neuron indices, as JSON text
_MEMORY_PER_NEURON_INDEX = 48  # the same indices as Python ints in the manifest record while converting


def estimate(shapes: hf.Shapes, fmt: str, opts: ConvertOptions, value_bytes: int, num_sources: int = 1) -> Estimate:
    """Output size and peak memory of a conversion, from the shapes alone (nothing is allocated)."""
    L, E, D, V = shapes.num_layers, opts.num_experts, shapes.dim, shapes.vocab_size
    shared = opts.shared_dim(shapes, fmt)
    shared_tensors = len(hf.shared_expert_layout(fmt, 0, D, shared))
    fused = fmt in hf.GRANITE_FORMATS  # each layer's experts in two tensors: a layer's down projections held
    F, dense_F = shapes.ffn_dim // opts.granularity, shapes.ffn_dim  # expert and dense FFN sizes
    out_shapes = hf.read_shapes({**shapes_as_config(shapes), "model_type": fmt})
    attn = [math.prod(shape) for shape in hf.attention_roles(out_shapes).values()]
    M = len(parse_moe_layers(opts.moe_layers, L))  # MoE layers; the other L - M keep their dense FFN
    per_moe_layer = E * D + E * 3 * F * D + 3 * shared * D + (D if hf.GATED_SHARED_EXPERT.get(fmt) else 0)
    heads = (2 if writes_lm_head(shapes, fmt) else 1) * V * D + D
    tensors = (2 + writes_lm_head(shapes, fmt) + L * len(attn) + M * (1 + (2 if fused else 3 * E) + shared_tensors)
               + (L - M) * 3)
    output = ((heads + L * sum(attn) + M * per_moe_layer + (L - M) * 3 * dense_F * D) * value_bytes
              + L * E * 3 * math.ceil(F / 8) + tensors * _HEADER_BYTES_PER_TENSOR + M * E * _MANIFEST_BYTES_PER_EXPERT
              + (M * dense_F * _MANIFEST_BYTES_PER_NEURON if opts.granularity > 1 else 0))
    largest = max(V * D, E * D, 3 * dense_F * D, 3 * shared * D)
    working = (num_sources + 2) * largest * 4 + 3 * 3 * dense_F * D * 4  # reads, fp32 result, cast; dense FFN + expert
    memory = (working + L * E * 3 * F + tensors * _MEMORY_PER_TENSOR + M * E * _MEMORY_PER_EXPERT
              + (M * dense_F * _MEMORY_PER_NEURON_INDEX if opts.granularity > 1 else 0)
              + (E * D * F * value_bytes if fused else 0))
    if opts.router_init == "data":  # the dense model in fp32 once, plus one batch of hidden states per MoE layer
        dense_params = (1 if shapes.tie_embeddings else 2) * V * D + L * (sum(attn) + 3 * dense_F * D)
        memory += 4 * dense_params + 8 * CALIBRATION_BATCH_TOKENS * M * D
    return Estimate(output_bytes=output, memory_bytes=memory)


def writes_lm_head(shapes: hf.Shapes, fmt: str) -> bool:
    return not shapes.tie_embeddings or hf.untied_head(fmt, shapes.tie_embeddings)


def shapes_as_config(shapes: hf.Shapes) -> dict:
    """Enough of an HF config for `read_shapes` to see the target format's attention (biases, q/k norms)."""
    return {"vocab_size": shapes.vocab_size, "hidden_size": shapes.dim, "intermediate_size": shapes.ffn_dim,
            "moe_intermediate_size": shapes.ffn_dim, "num_hidden_layers": shapes.num_layers,
            "num_attention_heads": shapes.num_heads, "num_key_value_heads": shapes.num_kv_heads,
            "head_dim": shapes.head_dim, "attention_bias": shapes.o_bias or shapes.qkv_bias,
            "tie_word_embeddings": shapes.tie_embeddings, "use_qk_norm": shapes.qk_norm}


# --------------------------------------------------------------------------------------------------------------------
# upcycle grow


@dataclass(frozen=True)
class GrowOptions:
    """Every choice of `upcycle grow`; recorded verbatim in the manifest. Each field is a flag (`--snake-case`) and a
    row of docs/convert.md's grow table, both made from this class.

    Attributes:
        factor: m: every expert is kept and joined by m - 1 copies, so E experts become m * E (expert e's copies are
            experts e * m .. e * m + m - 1, the first being e itself). At least 2.
        ratio: Fraction r of each new copy's neurons re-drawn (Drop-Upcycling of the copy, from the statistics of that
            expert's own matrices), in [0, 1]; the kept expert is never re-drawn.
        top_k: Experts per token after growing; default m * k (k the source's), with which r = 0 is the source's
            function. 1 <= top_k <= m * E.
        seed: Seed from which every (layer, expert, matrix) draw derives its own generator.
        index_mode: independent (a fresh neuron set for gate, up and down, the authors' released code; the default)
            or shared (one set per copy for all three, as the paper's text).
        stats: Where mu and sigma of the re-drawn values come from: slice (the selected neurons of the expert's
            matrix) or matrix (the expert's whole matrix).
        format: auto (an HF source keeps its format; one of our checkpoints is written as upcycle export --format auto
            writes it) or, for our checkpoints, mixtral, qwen2_moe, qwen3_moe, granitemoeshared, granitemoe or
            glm4_moe.
        dtype: Output dtype: auto (the source's), float32, bfloat16 or float16. Math always runs in float32.
        max_shard_size: Largest output shard, e.g. 5GB or 500MB.
    """

    factor: int = 2
    ratio: float = 0.5
    top_k: int | None = None
    seed: int = DEFAULT_SEED
    index_mode: str = field(default="independent", metadata={"choices": INDEX_MODES})
    stats: str = field(default="slice", metadata={"choices": STATS_MODES})
    format: str = field(default="auto", metadata={"choices": ("auto", *hf.MOE_FORMATS)})
    dtype: str = field(default="auto", metadata={"choices": ("auto", *hf.FLOAT_DTYPES)})
    max_shard_size: str = "5GB"

    def upcycle_options(self) -> UpcycleOptions:
        return UpcycleOptions(method="drop", ratio=self.ratio, index_mode=self.index_mode, stats=self.stats,
                              seed=self.seed)

    def validate(self) -> None:
        if type(self.factor) is not int or self.factor < 2:
            raise UpcycleError(f"--factor must be an integer of at least 2 (E experts become factor * E), got "
                               f"{self.factor}")
        self.upcycle_options().validate()
        if self.format != "auto" and self.format not in hf.MOE_FORMATS:
            raise UpcycleError(f"unknown --format {self.format!r}; choose auto, {', '.join(hf.MOE_FORMATS)}")
        if self.dtype != "auto" and self.dtype not in hf.FLOAT_DTYPES:
            raise UpcycleError(f"unknown --dtype {self.dtype!r}; choose auto, {', '.join(hf.FLOAT_DTYPES)}")
        _parse_size(self.max_shard_size)

    def resolved_top_k(self, num_experts: int, top_k: int) -> int:
        """The output's top-k for a source with `num_experts` experts and top-`top_k` routing."""
        grown = self.factor * num_experts
        k = self.factor * top_k if self.top_k is None else self.top_k
        if not 1 <= k <= grown:
            raise UpcycleError(f"--top-k must lie in [1, {grown}] (the grown model's experts), got {k}; leave it out "
                               f"for {self.factor * top_k}, which keeps r = 0 the source's function")
        return k
