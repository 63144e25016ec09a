"""`--router-init data`: router rows from k-means centroids of the hidden states that enter each layer's FFN.

The dense model runs on calibration text (JSONL or plain text, read by the same functions as `upcycle data prepare`,
tokenized with the source's tokenizer). For every layer that becomes MoE, the normalized FFN inputs (the output of
the post-attention RMSNorm, exactly what the router will see) are clustered by streaming spherical k-means: k-means++
on the first batch, then mini-batch updates (each centroid the running mean of the points assigned to it), so memory
is one batch of hidden states plus C centroids per layer, whatever the amount of text. Each router row is then a
centroid minus the mean of the layer's centroids (softmax ignores what all rows share), scaled to the norm the
uniform init's rows have (router_std * sqrt(D)), so the logits have the usual size but point at the data's clusters.

Pure math in `kmeans_plus_plus`, `update_centroids` and `rows_from_centroids`; `data_router_rows` runs the model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from upcycle.convert.options import CALIBRATION_BATCH_TOKENS
from upcycle.data.prepare import calibration_token_ids
from upcycle.errors import UpcycleError
from upcycle.model.hf import load_model
from upcycle.convert.upcycling import derived_generator


def kmeans_plus_plus(points_ND: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k initial centroids [k, D] chosen among the points, each with probability proportional to its squared distance
    to the nearest centroid chosen so far (Arthur and Vassilvitskii's k-means++)."""
    n = points_ND.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [points_ND[first]]
    dist_N = (points_ND - points_ND[first]).pow(2).sum(-1)
    for _ in range(1, k):
        total = dist_N.sum()
        if total <= 0:  # equal rows would tie in top-k and could split a copy of the dense FFN
            raise UpcycleError(f"the calibration text gives fewer than {k} distinct hidden states, one per router row; "
                               "pass more (or more varied) text")
        idx = int(torch.multinomial(dist_N / total, 1, generator=generator))
        centroids.append(points_ND[idx])
        dist_N = torch.minimum(dist_N, (points_ND - points_ND[idx]).pow(2).sum(-1))
    return torch.stack(centroids).clone()


def update_centroids(centroids_KD: torch.Tensor, counts_K: torch.Tensor, points_ND: torch.Tensor) -> None:
    """One mini-batch k-means step, in place: assign each point to its nearest centroid, then move every centroid to
    the running mean of all points ever assigned to it (counts_K holds how many)."""
    nearest_N = torch.cdist(points_ND, centroids_KD).argmin(dim=1)
    k = centroids_KD.shape[0]
    n_K = torch.bincount(nearest_N, minlength=k).to(counts_K.dtype)
    sums_KD = torch.zeros_like(centroids_KD).index_add_(0, nearest_N, points_ND)
    counts_K += n_K
    hit = n_K > 0
    centroids_KD[hit] += (sums_KD[hit] - n_K[hit, None] * centroids_KD[hit]) / counts_K[hit, None]


def rows_from_centroids(centroids_KD: torch.Tensor, *, std: float) -> torch.Tensor:
    """Router rows [k, D]: centroids minus their mean, each scaled to norm std * sqrt(D) (a uniform-init row's norm).
    With one centroid (or all equal) the centroids themselves are scaled: any row then routes the same."""
    dim = centroids_KD.shape[1]
    rows = centroids_KD - centroids_KD.mean(dim=0, keepdim=True)
    norms = rows.norm(dim=1, keepdim=True)
    if bool((norms < 1e-12).any()):
        rows, norms = centroids_KD, centroids_KD.norm(dim=1, keepdim=True)
    return rows / norms.clamp_min(1e-30) * (std * math.sqrt(dim))


@dataclass
class RouterCalibration:
    rows: dict[int, torch.Tensor]  # MoE layer -> router rows [copies, D] (one per copy; virtual groups repeat them)
    cluster_sizes: dict[int, list[int]]  # MoE layer -> points assigned to each centroid over the whole pass
    tokens: int  # calibration tokens the dense model ran on


@torch.no_grad()
def data_router_rows(source: str | os.PathLike, calibration: str | os.PathLike, *, max_tokens: int, copies: int,
                     layers: tuple[int, ...], seed: int, std: float) -> RouterCalibration:
    """Run the dense model at `source` on the calibration text; k-means rows for each of `layers`."""
    ids = calibration_token_ids(calibration, source, max_tokens)
    if ids.numel() < copies:
        raise UpcycleError(f"--calibration {calibration} gives {ids.numel()} tokens, fewer than the {copies} router "
                           "rows to fit; pass more text")
    model = load_model(source).eval()  # the dense model, once
    seq_len = min(512, model.config.max_seq_len)
    centroids: dict[int, torch.Tensor] = {}
    counts = {i: torch.zeros(copies, dtype=torch.float64) for i in layers}

    buffered: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook(layer: int):
        def observe(_module, inputs):
            buffered[layer].append(inputs[0].reshape(-1, inputs[0].shape[-1]).float())
        return observe

    def cluster_buffered() -> None:
        for layer in layers:
            points = torch.cat(buffered[layer]).double()
            buffered[layer].clear()
            points = points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)  # spherical: direction only
            if layer not in centroids:
                gen = derived_generator(seed, layer, "router", "kmeans")
                centroids[layer] = kmeans_plus_plus(points, copies, gen)
            update_centroids(centroids[layer], counts[layer], points)

    handles = [model.layers[i].ffn.register_forward_pre_hook(hook(i)) for i in layers]
    try:
        sequences = list(ids.split(seq_len))
        per_batch = max(1, CALIBRATION_BATCH_TOKENS // seq_len)
        for start in range(0, len(sequences), per_batch):
            for sequence in sequences[start:start + per_batch]:  # one sequence at a time: no padding needed
                model(sequence.unsqueeze(0))
            cluster_buffered()
    finally:
        for handle in handles:
            handle.remove()
    rows = {i: rows_from_centroids(centroids[i].float(), std=std) for i in layers}
    return RouterCalibration(rows=rows, cluster_sizes={i: counts[i].long().tolist() for i in layers},
                             tokens=int(ids.numel()))
