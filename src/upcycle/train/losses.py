"""Training losses as keyword-only pure functions: cross-entropy, Switch load-balancing loss (per micro-batch, or
with the routing counts of the whole global batch), router z-loss.

Router logits arrive as one (T, E) tensor per MoE layer (`ModelOutput.router_logits`), in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from upcycle.errors import UpcycleError


def cross_entropy(*, logits_BTV: Tensor, labels_BT: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy; labels are already shifted (labels[t] is the target of position t).

    Computed in fp32: a bf16 log-softmax over a large vocabulary loses the small probabilities the loss depends on.
    """
    # (B, T, V) -> (B*T, V)
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    return F.cross_entropy(logits_NV, labels_BT.reshape(-1), ignore_index=ignore_index)


def count_ids(ids: Tensor, num_experts: int) -> Tensor:
    """(E,) int64: how often each expert id occurs in `ids`. A scatter-add into E counters: unlike torch.bincount,
    which on CUDA reads the largest id back to the host to size its output, it never synchronizes."""
    flat = ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def _assignment_fractions_and_probs(logits_NE: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """f_E: top-k assignments per expert divided by the number of rows (sums to top_k); P_E: mean probability."""
    num_experts = logits_NE.shape[-1]
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    ids_NK = torch.topk(probs_NE, top_k, dim=-1).indices
    # f is a count, so it carries no gradient: the gradient flows through P only, as in the Switch Transformer.
    counts_E = count_ids(ids_NK, num_experts).to(probs_NE.dtype)
    return counts_E / logits_NE.shape[0], probs_NE.mean(dim=0)


def assignment_counts(*, router_logits: list[Tensor], top_k: int) -> Tensor:
    """(L, E) float64 top-k assignments per MoE layer and expert, no gradient: the f half of the load-balancing
    loss, as counts that add up over micro-batches and ranks (balance_scope global_batch)."""
    rows = []
    for logits_TE in router_logits:
        # top-k of the probabilities, as `_assignment_fractions_and_probs` takes it (logits that underflow to equal
        # probabilities would otherwise rank differently)
        ids_TK = torch.topk(torch.softmax(logits_TE.detach().float(), dim=-1), top_k, dim=-1).indices
        rows.append(count_ids(ids_TK, logits_TE.shape[-1]))
    return torch.stack(rows).to(torch.float64)


def _fractions_from_counts(counts_LE: Tensor, top_k: int, per_layer: bool) -> Tensor:
    """f from assignment counts: (E,) pooled over layers, or (L, E) per layer; each sums to top_k (every row, a token
    in one layer, makes top_k assignments)."""
    if per_layer:
        return top_k * counts_LE / counts_LE.sum(dim=-1, keepdim=True)
    return top_k * counts_LE.sum(dim=0) / counts_LE.sum()


def load_balancing_loss(*, router_logits: list[Tensor], top_k: int, per_layer: bool = False,
                        global_counts_LE: Tensor | None = None) -> Tensor:
    """Switch load-balancing loss, aux = E * sum_e f_e * P_e, in transformers' Mixtral form (equals top_k at
    perfect balance, because f sums to top_k).

    per_layer=False (the paper, HF `load_balancing_loss_func`): the logits of all layers are pooled into one
    [layers*tokens, E] matrix before f and P are taken, so one layer's imbalance can be offset by another's.
    per_layer=True: the loss of each layer on its own, averaged over layers; every layer must balance itself.

    global_counts_LE (balance_scope global_batch): the (L, E) `assignment_counts` summed over every micro-batch and
    rank of the step. f is then the global batch's, and P still these logits' mean probabilities, so the mean of this
    loss over equal-sized micro-batches and ranks is exactly the loss of the whole global batch, value and gradient
    (f has no gradient, and P is a mean over rows): the same number however the batch is split.
    """
    if not router_logits:
        raise UpcycleError("load_balancing_loss needs the router logits of at least one MoE layer")
    num_experts = router_logits[0].shape[-1]
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
    if global_counts_LE is not None:
        f = _fractions_from_counts(global_counts_LE.float(), top_k, per_layer)  # (L, E) or (E,)
        if per_layer:
            p_LE = torch.stack([torch.softmax(x.float(), dim=-1).mean(dim=0) for x in router_logits])
            return (num_experts * (f * p_LE).sum(dim=-1)).mean()
        # L x (T, E) -> (L*T, E)
        p_E = torch.softmax(torch.cat(router_logits, dim=0).float(), dim=-1).mean(dim=0)
        return num_experts * torch.sum(f * p_E)
    if per_layer:
        losses = []
        for logits_TE in router_logits:
            f_E, p_E = _assignment_fractions_and_probs(logits_TE, top_k)
            losses.append(num_experts * torch.sum(f_E * p_E))
        return torch.stack(losses).mean()
    # L x (T, E) -> (L*T, E)
    logits_NE = torch.cat(router_logits, dim=0)
    f_E, p_E = _assignment_fractions_and_probs(logits_NE, top_k)
    return num_experts * torch.sum(f_E * p_E)


def router_z_loss(*, router_logits: list[Tensor]) -> Tensor:
    """ST-MoE router z-loss: mean over all rows of logsumexp(logits)^2; keeps router logits small (bf16-safe).

    The paper's recipe does not use it; it is here for experiments. All layers' rows are pooled.
    """
    if not router_logits:
        raise UpcycleError("router_z_loss needs the router logits of at least one MoE layer")
    # L x (T, E) -> (L*T, E)
    logits_NE = torch.cat(router_logits, dim=0).float()
    return torch.logsumexp(logits_NE, dim=-1).square().mean()
