"""The math of every upcycling method, as pure functions over tensors.

Nothing here reads or writes files. Every random draw comes from its own generator, derived from
(seed, layer, expert, purpose), so a result never depends on the order in which layers or experts are processed or on
how many workers process them (the authors' released code seeds one global RNG, which makes its output depend on
traversal order).

Layout (HF nn.Linear): gate_FD and up_FD are [F, D], down_DF is [D, F]; the intermediate ("neuron") axis is F.
Drop-Upcycling re-draws whole neurons: rows of gate/up, columns of down. All math runs in fp32; callers cast to the
checkpoint dtype at the end.

Methods (docs/method.md explains each, the index modes and the baselines they reproduce):
    naive   every expert an exact copy of the dense FFN (r = 0 of drop).
    drop    per expert, re-draw a fraction `ratio` of neurons from N(mu, sigma^2) matched to the dense weights.
    noise   like drop's index selection, but ADD N(0, noise_std^2) to the selected slice (random-noise upcycling).
    scratch every weight N(0, init_std^2), norms 1, biases 0 (HF default init): the from-scratch baseline.
    btx     non-FFN tensors averaged over several dense sources; expert e takes the FFN of source e // (E / S).

Granularity G (fine-grained experts): the F neurons are split into G segments of F/G by a seeded permutation, expert
e = c * G + s holds segment s of copy c, every copy's G experts share one router row (virtual groups), and each
expert's down projection is multiplied by `granular_scale` so that the MoE still computes the dense function.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from upcycle.convert.options import UpcycleOptions
from upcycle.errors import UpcycleError

# |weights| of a dense shared expert's sigmoid gate: sigmoid(g . x) is then 1/2 to within fp32 rounding for any
# realistic hidden state (|g . x| < 1e-6), yet the gate is not all zeros (llama.cpp's silu(x)/x would be NaN at 0).
DENSE_SHARED_GATE_STD = 1e-9
MATRICES = ("gate", "up", "down")
# Which axis of each HF-layout matrix is the intermediate (neuron) axis.
NEURON_AXIS = {"gate": 0, "up": 0, "down": 1}


def derived_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from (seed, *parts) through SHA-256, so nearby seeds and parts give unrelated streams."""
    text = "/".join(str(p) for p in (seed, *parts))
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator(device="cpu").manual_seed(value)


def num_redrawn(size: int, ratio: float) -> int:
    """floor(ratio * size), robust to binary fractions (0.29 * 100 must give 29, not 28)."""
    return min(size, math.floor(ratio * size + 1e-9))


def select_indices(size: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A sorted random subset of range(size) with floor(ratio * size) elements."""
    count = num_redrawn(size, ratio)
    return torch.randperm(size, generator=generator)[:count].sort().values


def mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Scalar mean and (unbiased, as torch.std and the released code) standard deviation, in fp32."""
    values = values.float()
    # two calls: torch.std_mean is a single pass but measured 5x slower on CPU (torch 2.13)
    return values.mean().item(), values.std().item()


def redraw_neurons(
    weight: torch.Tensor, indices: torch.Tensor, axis: int, *, stats: str, generator: torch.Generator
) -> tuple[torch.Tensor, float | None, float | None]:
    """Replace the selected rows (axis 0) or columns (axis 1) by samples of N(mu, sigma^2).

    mu and sigma come from the selected slice of the dense matrix (`slice`, the released code) or the whole matrix
    (`matrix`). With no index selected nothing is computed: the statistics of an empty slice are undefined.
    Returns the new fp32 matrix and (mu, sigma).
    """
    out = weight.to(torch.float32, copy=True)
    if indices.numel() == 0:
        return out, None, None
    selected = out.index_select(axis, indices)
    mu, sigma = mean_std(selected if stats == "slice" else out)
    sample = torch.empty(selected.shape, dtype=torch.float32).normal_(mu, sigma, generator=generator)
    out.index_copy_(axis, indices, sample)
    return out, mu, sigma


def add_noise(
    weight: torch.Tensor, indices: torch.Tensor, axis: int, *, std: float, generator: torch.Generator
) -> torch.Tensor:
    """Random-noise upcycling: add N(0, std^2) to the selected rows/columns only."""
    out = weight.to(torch.float32, copy=True)
    if indices.numel() == 0:
        return out
    selected = out.index_select(axis, indices)
    noise = torch.empty(selected.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    out.index_copy_(axis, indices, selected + noise)
    return out


def segment_neurons(ffn_dim: int, granularity: int, *, seed: int, layer: int) -> torch.Tensor:
    """(G, F/G) int64: row s lists, sorted, the dense neurons that fine-grained segment s holds.

    G = 1 is the identity (one segment, every neuron in order). Otherwise a permutation drawn from (seed, layer,
    "segments") picks which neurons go together, so segments are not contiguous runs of the dense FFN (whose
    neighbouring neurons are unrelated anyway, but a fixed split would tie every layer to the same partition)."""
    if granularity < 1 or ffn_dim % granularity:
        raise UpcycleError(f"the FFN size {ffn_dim} is not divisible by --granularity {granularity}; choose a "
                           "divisor of it")
    if granularity == 1:
        return torch.arange(ffn_dim).unsqueeze(0)
    perm = torch.randperm(ffn_dim, generator=derived_generator(seed, layer, "segments"))
    return perm.view(granularity, ffn_dim // granularity).sort(dim=1).values


def granular_scale(granularity: int) -> float:
    """The factor on each fine-grained expert's down projection that makes the MoE the coarse (G = 1) MoE, and so
    the dense function at r = 0 when the top-k weights are renormalized.

    Routing is softmax over all E = C * G experts, top K = k * G. The G experts of copy c share one router row, so
    each gets p_c / G, p_c being the softmax over copies, and top-k takes whole copies (a copy's G equal values rank
    together). Copy c's G segments add up to the dense output y.
    - Renormalized (Mixtral, Qwen-MoE with norm_topk_prob true): each expert of a chosen copy c weighs
      w_c = p_c / (G * P), P the sum of the k chosen p_c, so the MoE outputs sum_c G * w_c * y / G = y / G, and
      multiplying every down projection by G restores y (exactly, for a power of two).
    - Not renormalized (Qwen-MoE with norm_topk_prob false): each weighs p_c / G, the MoE outputs P * y / G, and the
      same factor G gives P * y: what the coarse MoE without renormalization computes. Neither is the dense y, since
      P < 1 depends on the token (see docs/convert.md, `--no-renormalize`).
    """
    return float(granularity)


def virtual_group_router(router_CD: torch.Tensor, granularity: int) -> torch.Tensor:
    """Router [C * G, D] from one row per copy: the G fine-grained experts of copy c (rows c*G .. c*G+G-1) get copy
    c's row, so at initialization every token picks whole copies of the dense FFN."""
    return router_CD.repeat_interleave(granularity, dim=0)


def fine_grained_slice(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, neurons: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense neurons `neurons` as one fine-grained expert (fp32): rows of gate/up, columns of down times `scale`."""
    return (gate_FD.index_select(0, neurons).float(), up_FD.index_select(0, neurons).float(),
            down_DF.index_select(1, neurons).float() * scale)


@dataclass
class ExpertFFN:
    """One expert's FFN (fp32) and what was done to it."""

    gate_FD: torch.Tensor
    up_FD: torch.Tensor
    down_DF: torch.Tensor
    redrawn_MF: torch.Tensor  # (3, F) bool: neurons of gate, up, down that were re-drawn (or perturbed, for noise)
    records: dict[str, dict] = field(default_factory=dict)  # matrix -> {"mean", "std", "redrawn"}


def _neuron_indices(ffn_dim: int, opts: UpcycleOptions, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Index sets per matrix: one shared set (the paper's text) or a fresh one per matrix (the released code)."""
    if opts.index_mode == "shared":
        shared = select_indices(ffn_dim, opts.ratio, derived_generator(opts.seed, layer, expert, "index", "shared"))
        return {m: shared for m in MATRICES}
    return {
        m: select_indices(ffn_dim, opts.ratio, derived_generator(opts.seed, layer, expert, "index", m))
        for m in MATRICES
    }


def upcycle_expert(
    gate_FD: torch.Tensor,
    up_FD: torch.Tensor,
    down_DF: torch.Tensor,
    *,
    layer: int,
    expert: int,
    opts: UpcycleOptions,
) -> ExpertFFN:
    """Expert `expert` of layer `layer` made from the dense FFN by method naive, drop, noise or scratch.

    For naive the returned matrices may share memory with fp32 inputs; every other method returns new tensors.
    """
    dense = {"gate": gate_FD, "up": up_FD, "down": down_DF}
    ffn_dim = gate_FD.shape[0]
    redrawn_MF = torch.zeros(len(MATRICES), ffn_dim, dtype=torch.bool)
    out: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    if opts.method == "naive":
        for m in MATRICES:
            out[m] = dense[m].to(torch.float32)  # no copy needed: nothing is modified (may share the input's memory)
            records[m] = {"mean": None, "std": None, "redrawn": 0}
    elif opts.method == "scratch":
        for i, m in enumerate(MATRICES):
            gen = derived_generator(opts.seed, layer, expert, "values", m)
            out[m] = torch.empty(dense[m].shape, dtype=torch.float32).normal_(0.0, opts.init_std, generator=gen)
            redrawn_MF[i] = True
            records[m] = {"mean": 0.0, "std": opts.init_std, "redrawn": ffn_dim}
    elif opts.method in ("drop", "noise"):
        indices = _neuron_indices(ffn_dim, opts, layer, expert)
        for i, m in enumerate(MATRICES):
            gen = derived_generator(opts.seed, layer, expert, "values", m)
            if opts.method == "drop":
                out[m], mu, sigma = redraw_neurons(dense[m], indices[m], NEURON_AXIS[m], stats=opts.stats,
                                                   generator=gen)
            else:
                out[m] = add_noise(dense[m], indices[m], NEURON_AXIS[m], std=opts.noise_std, generator=gen)
                mu, sigma = (0.0, opts.noise_std) if indices[m].numel() else (None, None)
            redrawn_MF[i, indices[m]] = True
            records[m] = {"mean": mu, "std": sigma, "redrawn": int(indices[m].numel())}
    else:
        raise UpcycleError(f"method {opts.method!r} does not make experts from one dense FFN")
    return ExpertFFN(out["gate"], out["up"], out["down"], redrawn_MF, records)


@dataclass
class UpcycledFFN:
    """All experts of one layer, stacked (fp32)."""

    gate_EFD: torch.Tensor
    up_EFD: torch.Tensor
    down_EDF: torch.Tensor
    redrawn_EMF: torch.Tensor  # (E, 3, F) bool
    records: list[dict[str, dict]]  # per expert: matrix -> {"mean", "std", "redrawn"}


def upcycle_ffn(
    gate_FD: torch.Tensor,
    up_FD: torch.Tensor,
    down_DF: torch.Tensor,
    *,
    num_experts: int,
    layer: int,
    opts: UpcycleOptions,
) -> UpcycledFFN:
    """One dense FFN -> `num_experts` stacked experts. The same draws as `upcycle_expert`, expert by expert."""
    experts = [upcycle_expert(gate_FD, up_FD, down_DF, layer=layer, expert=e, opts=opts) for e in range(num_experts)]
    return UpcycledFFN(
        gate_EFD=torch.stack([x.gate_FD for x in experts]),
        up_EFD=torch.stack([x.up_FD for x in experts]),
        down_EDF=torch.stack([x.down_DF for x in experts]),
        redrawn_EMF=torch.stack([x.redrawn_MF for x in experts]),
        records=[x.records for x in experts],
    )


def init_router(num_experts: int, dim: int, *, kind: str, std: float, generator: torch.Generator) -> torch.Tensor:
    """Router weight [E, D] with standard deviation `std`.

    `uniform` (the released runs): U[0, 1) centred on its mean 1/2 and scaled by std * sqrt(12), so its std is `std`.
    `normal`: N(0, std^2), the common alternative.
    """
    if kind == "uniform":
        u = torch.rand(num_experts, dim, generator=generator, dtype=torch.float32)
        return (u - 0.5) * (std * math.sqrt(12.0))
    if kind == "normal":
        return torch.randn(num_experts, dim, generator=generator, dtype=torch.float32) * std
    raise UpcycleError(f"router init {kind!r} is not drawn at random; choose uniform or normal")


def init_shared_expert(shapes: dict[str, tuple[int, int]], *, std: float, seed: int, layer: int
                       ) -> dict[str, torch.Tensor]:
    """A shared expert that contributes nothing at initialization, by the roles of `hf_formats.shared_expert_layout`
    (Qwen2-MoE's always-present one; Granite's has no sigmoid gate).

    Its down projection is zeros, so it adds exactly nothing and the MoE computes what the experts compute. Its gate
    and up projections get the HF init N(0, std^2), so it can learn. Its sigmoid gate [1, D] gets N(0, std^2) too,
    not zeros: with down_proj zero any finite gate keeps the function, but llama.cpp evaluates that sigmoid as
    silu(x) / x, which is NaN at x = 0 for every token when the gate is all zeros; with random weights x = 0 has
    probability zero, as with any trained gate."""
    out = {}
    for role, shape in shapes.items():
        if role == "shared_down":
            out[role] = torch.zeros(shape, dtype=torch.float32)
        else:
            gen = derived_generator(seed, layer, "shared", role)
            out[role] = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    return out


def dense_shared_expert(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor,
                        neurons: torch.Tensor | None, *, seed: int, layer: int, gated: bool = True, scale: float = 1.0
                        ) -> dict[str, torch.Tensor]:
    """A shared expert made of the dense neurons `neurons` (all of them when None), never re-drawn, that adds `scale`
    times their output, by the roles of `hf_formats.shared_expert_layout` (gate and up kept apart).

    Granite-MoE-Shared (`gated` false) adds shared(x) as it is, so the down projection is multiplied by `scale`.
    Qwen2-MoE adds sigmoid(g . x) * shared(x). Only g = 0 makes that factor a constant (there is no bias), and
    sigmoid(0) = 1/2, so the down projection is multiplied by 2 * `scale` (exact in floating point for powers of two).
    The gate is drawn from N(0, DENSE_SHARED_GATE_STD^2) rather than set to zero, so that sigmoid(g . x) = 1/2 up to
    fp32 rounding while no engine meets an all-zero gate (llama.cpp's sigmoid is silu(x) / x); training moves it from
    there."""
    if neurons is not None:
        gate_FD, up_FD, down_DF = gate_FD.index_select(0, neurons), up_FD.index_select(0, neurons), \
            down_DF.index_select(1, neurons)
    out = {"shared_gate": gate_FD.float(), "shared_up": up_FD.float(),
           "shared_down": down_DF.float() * (2.0 * scale if gated else scale)}
    if gated:
        gen = derived_generator(seed, layer, "shared", "shared_expert_gate")
        out["shared_expert_gate"] = torch.empty(1, gate_FD.shape[1]).normal_(0.0, DENSE_SHARED_GATE_STD, generator=gen)
    return out


def scratch_tensor(
    shape: tuple[int, ...], kind: str, *, std: float, generator: torch.Generator, padding_idx: int | None = None
) -> torch.Tensor:
    """HF's default init for one tensor: `weight` N(0, std^2), `norm` ones, `bias` zeros, `embedding` N(0, std^2)
    with the padding row zeroed (as transformers' `_init_weights` does when pad_token_id is set)."""
    if kind == "norm":
        return torch.ones(shape, dtype=torch.float32)
    if kind == "bias":
        return torch.zeros(shape, dtype=torch.float32)
    out = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    if kind == "embedding" and padding_idx is not None and 0 <= padding_idx < shape[0]:
        out[padding_idx] = 0.0
    return out


def btx_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean over the dense sources, in fp32."""
    return torch.stack([t.float() for t in tensors]).mean(dim=0)
