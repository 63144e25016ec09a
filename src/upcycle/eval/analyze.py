"""`upcycle analyze`: where an MoE routes each domain's tokens, how far its experts moved from the dense parent, and
how alike the experts are. Writes OUT/analysis.json and three figures.

Why: the paper's routing analysis (per-domain share of top-k assignments per expert; uniform = 1/E) is how naive
upcycling's collapse (every domain on the same 2 experts) and Drop-Upcycling's domain specialization show up. Drift and
expert similarity show whether re-drawn experts actually diverged from the dense FFN and from each other.

Definitions (per MoE layer; for routing also per validation domain):
    share_E          top-k assignments to each expert / all assignments (sums to 1; uniform = 1/E).
    load_imbalance   max(share) * E: 1 at perfect balance, E when one expert takes everything (top-1).
    share_cv         std(share) / mean(share) (population std): 0 at perfect balance.
    dead_experts     experts with share < dead_threshold / E (default 0.01 of the uniform share).
    prob_entropy     entropy of the mean router distribution, H(mean_t p_t) / log E: 1 when the router spreads its
                     probability evenly over experts on average.
    token_entropy    mean_t H(p_t) / log E: how undecided the router is per token (1 = uniform for every token).
    specialization   mean over domain pairs of the Jensen-Shannon divergence (base 2, in [0, 1]) between the domains'
                     share_E: 0 when every domain is routed alike.
    drift            ||W_e - W_dense||_F / ||W_dense||_F and cosine(W_e, W_dense) for gate, up and down of each expert.
    redrawn_share    fraction of the F neurons of gate, up, down re-drawn at conversion (upcycle_redrawn.safetensors).
    similarity_EE    cosine between experts' flattened weights (gate, up, down concatenated).

Run: `upcycle analyze MODEL_DIR --data DATA_DIR --out OUT [--dense DENSE_DIR] [--upcycled-from CONVERT_DIR] [--force]`.
Shape legend: T tokens, D dim, F ffn_dim, E experts, K top_k, L layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from upcycle.convert.conversion import MANIFEST_NAME, load_redrawn
from upcycle.data.prepare import check_data_fits, validation_batches
from upcycle.errors import UpcycleError
from upcycle.files import check_output, publish_dir
from upcycle.model.hf import OUR_DOWN, OUR_GATE_UP, check_model_dir, experts_to_hf, load_model
from upcycle.model.moe import route, router_scores

MATRIX_NAMES = ("gate", "up", "down")
DEFAULT_DEAD_THRESHOLD = 0.01  # of the uniform share 1/E


# --------------------------------------------------------------------------------------------------------------------
# Pure math


def routing_sums(logits_TE: Tensor, *, top_k: int, renormalize: bool = True, activation: str = "softmax",
                 bias_E: Tensor | None = None) -> dict[str, np.ndarray | float | int]:
    """Additive routing statistics of one batch: top-k assignment counts, summed router probabilities and summed
    per-token entropies (nats). Sums, so batches combine by adding; `routing_stats` turns them into shares.

    Uses moe.route with the model's activation and balancing bias, so the counted assignments are the ones the model
    computed. Probabilities: the softmax, or sigmoid scores normalized to sum to 1 per token (as the balancing losses
    take them).
    """
    # Routing in fp32, as in the model: bf16 probabilities of near-tied experts would flip top-k choices.
    logits_TE = logits_TE.detach().float()
    _, ids_TK = route(logits_TE, top_k=top_k, renormalize=renormalize, activation=activation, bias_E=bias_E)
    E = logits_TE.shape[-1]
    probs_TE = router_scores(logits_TE, activation)
    if activation != "softmax":
        probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True)
    # xlogy: 0 * log 0 = 0 for experts with underflowed probability
    token_entropy_T = -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1)
    # .cpu(): the sums leave the device here (the model may run on a GPU); they are E numbers per batch.
    return {"counts_E": torch.bincount(ids_TK.reshape(-1), minlength=E).cpu().numpy().astype(np.int64),
            "prob_sum_E": probs_TE.sum(dim=0).double().cpu().numpy(),
            "entropy_sum": float(token_entropy_T.double().sum()),
            "tokens": logits_TE.shape[0]}


def add_sums(a: dict | None, b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in b}


def entropy(p_E: np.ndarray) -> float:
    """Shannon entropy in nats of a distribution (zeros allowed)."""
    p_E = np.asarray(p_E, dtype=np.float64)
    nz = p_E[p_E > 0]
    return float(-(nz * np.log(nz)).sum())


def load_imbalance(share_E: np.ndarray) -> tuple[float, float]:
    """(max share * E, coefficient of variation): 1 and 0 at perfect balance."""
    share_E = np.asarray(share_E, dtype=np.float64)
    E = len(share_E)
    return float(share_E.max() * E), float(share_E.std() / share_E.mean())


def dead_experts(share_E: np.ndarray, threshold: float = DEFAULT_DEAD_THRESHOLD) -> list[int]:
    """Experts whose share is below `threshold` times the uniform share 1/E (0 counts as dead at any threshold)."""
    share_E = np.asarray(share_E, dtype=np.float64)
    limit = threshold / len(share_E)
    return [int(e) for e in np.flatnonzero((share_E < limit) | (share_E == 0))]


def routing_stats(sums: dict, *, dead_threshold: float = DEFAULT_DEAD_THRESHOLD) -> dict:
    """Shares, entropies, imbalance and dead experts of one (layer, domain) from accumulated `routing_sums`."""
    counts_E = np.asarray(sums["counts_E"], dtype=np.float64)
    E = len(counts_E)
    share_E = counts_E / counts_E.sum()
    mean_prob_E = np.asarray(sums["prob_sum_E"]) / sums["tokens"]
    max_share, cv = load_imbalance(share_E)
    log_e = math.log(E) if E > 1 else 1.0
    return {"share": share_E.tolist(), "mean_prob": mean_prob_E.tolist(),
            "prob_entropy": entropy(mean_prob_E) / log_e,
            "token_entropy": sums["entropy_sum"] / sums["tokens"] / log_e,
            "load_imbalance": max_share, "share_cv": cv,
            "dead_experts": dead_experts(share_E, dead_threshold), "tokens": int(sums["tokens"])}


def jensen_shannon(p_E: np.ndarray, q_E: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2), so it lies in [0, 1]; symmetric and finite with zeros."""
    p_E, q_E = np.asarray(p_E, dtype=np.float64), np.asarray(q_E, dtype=np.float64)
    m_E = 0.5 * (p_E + q_E)
    return max(0.0, 0.5 * (entropy(m_E) * 2 - entropy(p_E) - entropy(q_E)) / math.log(2))


def mean_pairwise_jsd(shares: dict[str, np.ndarray]) -> float | None:
    """Mean JSD over all pairs of domains: one specialization number per layer (None with fewer than 2 domains)."""
    pairs = list(combinations(sorted(shares), 2))
    if not pairs:
        return None
    return float(np.mean([jensen_shannon(shares[a], shares[b]) for a, b in pairs]))


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    denominator = a.norm() * b.norm()
    return float(a @ b / denominator) if denominator > 0 else 0.0


def expert_matrices(gate_up_ED2F: Tensor, down_EFD: Tensor) -> dict[str, Tensor]:
    """Our fused layout -> HF-oriented per-matrix stacks: gate_EFD, up_EFD ([E, F, D]) and down_EDF ([E, D, F])."""
    return experts_to_hf(gate_up_ED2F, down_EFD)


def expert_drift(experts: dict[str, Tensor], dense: dict[str, Tensor]) -> list[dict[str, dict[str, float]]]:
    """Per expert and matrix: relative Frobenius distance to the dense FFN and cosine similarity to it.

    experts: {"gate": (E, F, D), "up": (E, F, D), "down": (E, D, F)}; dense: the same without E.
    """
    num_experts = experts["gate"].shape[0]
    out = []
    for e in range(num_experts):
        row = {}
        for m in MATRIX_NAMES:
            w, w0 = experts[m][e].double(), dense[m].double()
            row[m] = {"rel_distance": float((w - w0).norm() / w0.norm()), "cosine": _cosine(w, w0)}
        out.append(row)
    return out


def expert_similarity(experts: dict[str, Tensor]) -> np.ndarray:
    """(E, E) cosine similarity between experts' flattened weights (gate, up, down concatenated)."""
    # (E, F, D), (E, F, D), (E, D, F) -> (E, 3*F*D)
    flat_EN = torch.cat([experts[m].reshape(experts[m].shape[0], -1) for m in MATRIX_NAMES], dim=1).double()
    unit_EN = flat_EN / flat_EN.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit_EN @ unit_EN.T).cpu().numpy()


def redrawn_shares(redrawn_LEMF: Tensor) -> dict[str, np.ndarray]:
    """Fraction of neurons re-drawn per (layer, expert): per matrix and 'any' (re-drawn in at least one matrix)."""
    shares = {m: redrawn_LEMF[:, :, i].double().mean(dim=-1).numpy() for i, m in enumerate(MATRIX_NAMES)}
    shares["any"] = redrawn_LEMF.any(dim=2).double().mean(dim=-1).numpy()
    return shares


def default_plot_layers(num_layers: int) -> list[int]:
    """First, middle and last MoE layer (the paper shows 0/8/16/23 of 24)."""
    return sorted({0, num_layers // 2, num_layers - 1})


# --------------------------------------------------------------------------------------------------------------------
# Collecting from a model


@torch.no_grad()
def collect_routing(model, batches: dict[str, list[Tensor]], *, device: torch.device | None = None
                    ) -> dict[str, list[dict]]:
    """{domain: [routing_sums per MoE layer]} over a domain's validation batches (inputs only, no targets needed);
    the batches are moved to `device` (the model's) when given."""
    config = model.config
    biases = [model.layers[i].ffn.expert_bias_E for i in config.moe_layer_ids]  # None where the model has none
    out = {}
    for domain, domain_batches in batches.items():
        per_layer: list[dict | None] = [None] * len(config.moe_layer_ids)
        for batch_BT in domain_batches:
            batch_BT = batch_BT if device is None else batch_BT.to(device)
            output = model(batch_BT[:, :-1])
            for i, logits_TE in enumerate(output.router_logits):
                per_layer[i] = add_sums(per_layer[i], routing_sums(
                    logits_TE, top_k=config.top_k, renormalize=config.renormalize,
                    activation=config.router_activation, bias_E=biases[i]))
        if per_layer[0] is not None:
            out[domain] = per_layer
    return out


def sequence_routing_counts(model, batches: dict[str, list[Tensor]], *, device: torch.device | None = None
                            ) -> dict[str, list[np.ndarray]]:
    """{domain: [counts_SE per MoE layer]}: each scored sequence's top-k assignments per expert (rows in batch order),
    through moe.route in fp32 as `routing_sums` counts them, so summed over sequences they are its counts_E. Per
    sequence, so that a statistic of the domains' routing can be compared with its value under shuffled domains."""
    config = model.config
    biases = [model.layers[i].ffn.expert_bias_E for i in config.moe_layer_ids]  # None where the model has none
    out = {}
    for domain, domain_batches in batches.items():
        per_layer: list[list[np.ndarray]] = [[] for _ in config.moe_layer_ids]
        for batch_BT in domain_batches:
            batch_BT = batch_BT if device is None else batch_BT.to(device)
            B = batch_BT.shape[0]
            output = model(batch_BT[:, :-1])
            for i, logits_TE in enumerate(output.router_logits):
                # Routing in fp32, as in the model (with its activation and balancing bias): bf16 probabilities of
                # near-tied experts would flip top-k choices.
                _, ids_TK = route(logits_TE.detach().float(), top_k=config.top_k, renormalize=config.renormalize,
                                  activation=config.router_activation, bias_E=biases[i])
                E = logits_TE.shape[-1]
                # (B*T, K) assignments, rows batch-major -> (B, E) counts per sequence
                sequence_TK = torch.arange(B, device=ids_TK.device).repeat_interleave(ids_TK.shape[0] // B)[:, None]
                counts_BE = torch.bincount((sequence_TK * E + ids_TK).reshape(-1), minlength=B * E).view(B, E)
                per_layer[i].append(counts_BE.cpu().numpy().astype(np.int64))
        if per_layer and per_layer[0]:
            out[domain] = [np.concatenate(chunks) for chunks in per_layer]
    return out


def _dense_ffns(dense_path: Path, config) -> list[dict[str, Tensor]]:

    dense = load_model(dense_path)
    c = dense.config
    if c.is_moe:
        raise UpcycleError(f"--dense {dense_path} is an MoE model; pass the dense parent the MoE was upcycled from")
    if (c.num_layers, c.dim) != (config.num_layers, config.dim) or c.ffn_dim % config.expert_dim:
        raise UpcycleError(f"--dense {dense_path} has (layers, dim, ffn_dim) = {(c.num_layers, c.dim, c.ffn_dim)} but "
                           f"the MoE has {(config.num_layers, config.dim, config.expert_dim)}; it is not the parent")
    return [{"gate": layer.ffn.gate.weight.detach(), "up": layer.ffn.up.weight.detach(),
             "down": layer.ffn.down.weight.detach()} for layer in dense.layers]


def _manifest_dir(model_path: Path, manifest_dir: str | Path | None) -> Path | None:

    if manifest_dir is not None:
        directory = Path(manifest_dir).expanduser()
        if not (directory / MANIFEST_NAME).is_file():
            raise UpcycleError(f"{directory} has no {MANIFEST_NAME}; pass the output directory of upcycle convert")
        return directory
    return model_path if (model_path / MANIFEST_NAME).is_file() else None


def analyze(
    model_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    layers: Sequence[int] | None = None,
    seq_len: int = 256,
    max_sequences: int = 32,
    batch_size: int = 8,
    domains: Sequence[str] | None = None,
    manifest_dir: str | Path | None = None,
    dense_path: str | Path | None = None,
    dead_threshold: float = DEFAULT_DEAD_THRESHOLD,
    plots: bool = True,
    force: bool = False,
) -> dict:
    """Routing, drift and expert-similarity analysis of an MoE checkpoint; writes OUT/analysis.json and PNGs.

    Statistics are computed for every MoE layer (one forward pass yields all of them); `layers` picks the layers drawn
    in the routing and similarity figures (default: first, middle, last). The dense parent for drift is `dense_path`,
    else the source recorded in the convert manifest (in the model directory or `manifest_dir`), else drift is skipped.

    An existing, non-empty OUT is refused unless `force`. The output is built in a temporary sibling directory and
    renamed into place when complete: a failed run leaves the previous analysis as it was, and a replaced one keeps
    none of its old files.
    """
    path = check_model_dir(model_path)
    data_dir = Path(data_dir).expanduser()
    inputs = [path, data_dir, *(Path(p).expanduser() for p in (manifest_dir, dense_path) if p is not None)]
    out = check_output(out_dir, force=force, inputs=inputs, flag="--out")
    manifest_path = _manifest_dir(path, manifest_dir)
    model = load_model(path).eval()
    config = model.config
    if not config.is_moe:
        raise UpcycleError(f"{path} has no MoE layers (a dense model); analyze an upcycled or trained MoE checkpoint")
    check_data_fits(data_dir, vocab_size=config.vocab_size, max_seq_len=config.max_seq_len,
                    seq_len=min(seq_len, config.max_seq_len))  # analyze clamps --seq-len to the model's
    L, E, moe_ids = config.num_layers, config.num_experts, config.moe_layer_ids  # dense layers are skipped
    plot_layers = [moe_ids[j] for j in default_plot_layers(len(moe_ids))] if layers is None else list(layers)
    bad = [i for i in plot_layers if i not in moe_ids]
    if bad:
        span = f"0..{L - 1}" if len(moe_ids) == L else ",".join(map(str, moe_ids))
        raise UpcycleError(f"--layers {bad} out of range; the model has MoE layers {span}")

    batches = validation_batches(data_dir, seq_len=min(seq_len, config.max_seq_len), batch_size=batch_size,
                                 max_sequences=max_sequences, domains=domains)
    sums = collect_routing(model, batches)
    if not sums:
        raise UpcycleError(f"no domain of {data_dir} has a validation split of at least seq_len + 1 tokens; "
                           "lower --seq-len")

    dense_source = Path(dense_path).expanduser() if dense_path else None
    redrawn = None
    if manifest_path is not None:
        manifest = json.loads((manifest_path / MANIFEST_NAME).read_text())
        # convert's one dense parent; btx and compose experts come from several parents, grow's from an MoE
        if dense_source is None and manifest["options"].get("method") not in (None, "btx"):
            dense_source = Path(manifest["sources"][0]["path"])
        redrawn = load_redrawn(manifest_path)
        if tuple(redrawn.shape) != (L, E, 3, config.expert_dim):
            raise UpcycleError(f"the re-drawn masks in {manifest_path} have shape {tuple(redrawn.shape)}, the model "
                               f"needs {(L, E, 3, config.expert_dim)}; --upcycled-from names a different conversion")
    if dense_source is not None and not dense_source.is_dir():
        raise UpcycleError(f"dense parent {dense_source} does not exist; pass --dense DIR")
    dense = _dense_ffns(dense_source, config) if dense_source is not None else None
    redrawn_by = redrawn_shares(redrawn) if redrawn is not None else None

    state = model.state_dict()
    layer_results = []
    for j, i in enumerate(moe_ids):  # j: position among the MoE layers (router outputs), i: layer index
        routing = {d: routing_stats(per_layer[j], dead_threshold=dead_threshold) for d, per_layer in sums.items()}
        pooled = routing_stats(_pool([per_layer[j] for per_layer in sums.values()]), dead_threshold=dead_threshold)
        experts = expert_matrices(state[f"layers.{i}.{OUR_GATE_UP}"], state[f"layers.{i}.{OUR_DOWN}"])
        entry = {"layer": i, "routing": routing, "all_domains": pooled,
                 "specialization_jsd": mean_pairwise_jsd({d: np.array(r["share"]) for d, r in routing.items()}),
                 "expert_similarity": expert_similarity(experts).tolist()}
        if dense is not None and dense[i]["gate"].shape == experts["gate"].shape[1:]:
            entry["drift"] = expert_drift(experts, dense[i])  # fine-grained experts (F/G) have no whole dense twin
        if redrawn_by is not None:
            entry["redrawn_share"] = [{k: float(v[i, e]) for k, v in redrawn_by.items()} for e in range(E)]
        layer_results.append(entry)

    analysis = {"model": str(path), "data": str(data_dir), "num_layers": L, "num_experts": E, "top_k": config.top_k,
                "seq_len": min(seq_len, config.max_seq_len), "max_sequences": max_sequences,
                "domains": sorted(sums), "dead_threshold": dead_threshold,
                "dense": str(dense_source) if dense_source is not None else None,
                "manifest": str(manifest_path) if manifest_path is not None else None,
                "plot_layers": plot_layers, "layers": layer_results}
    figures = _publish_analysis(analysis, out, plot_layers if plots else None, inputs=inputs, force=force)
    if plots:
        analysis["figures"] = [str(out / name) for name in figures]
    return analysis


def _publish_analysis(analysis: dict, out: Path, plot_layers: list[int] | None, *, inputs: list[Path],
                      force: bool) -> list[str]:
    """Write analysis.json (and the figures unless `plot_layers` is None) and publish them as `out` in one rename
    (files.publish_dir); returns the figures' file names."""
    with publish_dir(out, force=force, inputs=inputs, flag="--out") as tmp:
        (tmp / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")
        figures = []
        if plot_layers is not None:
            figures = [p.name for p in (plot_routing(analysis, tmp / "routing.png", plot_layers),
                                        plot_layer_summary(analysis, tmp / "layers.png"),
                                        plot_similarity(analysis, tmp / "expert_similarity.png", plot_layers))]
    return figures


def _pool(sums: list[dict]) -> dict:
    total = None
    for s in sums:
        total = add_sums(total, s)
    return total


# --------------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg: no display on servers)


def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display), imported on first use: matplotlib is heavy and
    only the figures need it. Every figure of the package and its scripts comes through here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing(analysis: dict, path: str | Path, layers: Sequence[int] | None = None,
                 title: str | None = None) -> Path:
    """The paper's routing figure: per layer, grouped bars of each domain's share of top-k assignments per expert,
    with the uniform share 1/E dashed. Reusable on any analysis.json dict."""
    plt = pyplot()
    E, domains = analysis["num_experts"], analysis["domains"]
    if layers is None:
        layers = analysis.get("plot_layers") or default_plot_layers(analysis["num_layers"])
    by_layer = {entry["layer"]: entry for entry in analysis["layers"]}
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6.0, 0.6 * E * len(domains) / 2 + 3), 2.4 * len(layers)),
                             squeeze=False, sharex=True)
    width = 0.8 / len(domains)
    x_E = np.arange(E)
    for ax, layer in zip(axes[:, 0], layers):
        routing = by_layer[layer]["routing"]
        for j, domain in enumerate(domains):
            ax.bar(x_E - 0.4 + width * (j + 0.5), routing[domain]["share"], width, label=domain)
        ax.axhline(1.0 / E, color="black", linestyle="--", linewidth=1, label="uniform 1/E")
        ax.set_ylabel("share")
        ax.set_title(f"layer {layer}", fontsize=10)
    axes[-1, 0].set_xticks(x_E)
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=8, ncol=len(domains) + 1, loc="lower right", bbox_to_anchor=(1.0, 1.12))
    fig.suptitle(f"{title + ': ' if title else ''}share of top-k assignments per expert", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_summary(analysis: dict, path: str | Path) -> Path:
    """Per layer: domain specialization (mean pairwise JSD), routing entropies and load imbalance (all domains)."""
    plt = pyplot()
    layers = [entry["layer"] for entry in analysis["layers"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    jsd = [entry["specialization_jsd"] for entry in analysis["layers"]]
    if all(v is not None for v in jsd):
        ax1.plot(layers, jsd, marker="o", label="specialization (mean pairwise JSD)")
    ax1.plot(layers, [e["all_domains"]["token_entropy"] for e in analysis["layers"]], marker="s",
             label="per-token entropy / log E")
    ax1.plot(layers, [e["all_domains"]["prob_entropy"] for e in analysis["layers"]], marker="^",
             label="entropy of mean prob. / log E")
    ax1.set_xlabel("layer")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(fontsize=8)
    ax2.plot(layers, [e["all_domains"]["load_imbalance"] for e in analysis["layers"]], marker="o", color="C3")
    ax2.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("max share x E (1 = balanced)")
    for ax in (ax1, ax2):
        ax.set_xticks(layers)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_similarity(analysis: dict, path: str | Path, layers: Sequence[int] | None = None) -> Path:
    """Heatmaps of the pairwise cosine similarity between experts' weights, one per layer."""
    plt = pyplot()
    if layers is None:
        layers = analysis.get("plot_layers") or default_plot_layers(analysis["num_layers"])
    by_layer = {entry["layer"]: entry for entry in analysis["layers"]}
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers) + 1, 3.4), squeeze=False)
    image = None
    for ax, layer in zip(axes[0], layers):
        image = ax.imshow(np.array(by_layer[layer]["expert_similarity"]), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
