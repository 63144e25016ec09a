"""Training losses as keyword-only pure functions: cross-entropy, the Switch load-balancing loss (per micro-batch, with
the routing counts of the whole global batch, or per sequence as DeepSeek-V3's sequence-wise loss), router z-loss;
and DeepSeek-V3's aux-loss-free balancing step, the update of the per-expert bias from the step's expert loads.

Router logits arrive as one (T, E) tensor per MoE layer (`ModelOutput.router_logits`), in fp32. `activation` is the
router's (model.router_activation): the balancing losses use its scores as probabilities, softmax as they are and
sigmoid ones normalized to sum to 1 per token (DeepSeek-V3's s'), and count the top k of those scores (without the
balancing bias, as DeepSeek-V3 defines f).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from upcycle.errors import UpcycleError
from upcycle.model.moe import count_ids, router_scores


def cross_entropy(*, logits_BTV: Tensor, labels_BT: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy; labels are already shifted (labels[t] is the target of position t).

    Computed in fp32: a bf16 log-softmax over a large vocabulary loses the small probabilities the loss depends on.
    """
    # (B, T, V) -> (B*T, V)
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    return F.cross_entropy(logits_NV, labels_BT.reshape(-1), ignore_index=ignore_index)


def router_probs(logits_NE: Tensor, activation: str = "softmax") -> Tensor:
    """Each row's expert probabilities in fp32: the softmax, or the sigmoid scores divided by their sum (DeepSeek-V3's
    normalized affinities s'). Their top k are the router's choice without the balancing bias (a row's order is
    unchanged by the normalization)."""
    scores_NE = router_scores(logits_NE, activation)
    return scores_NE if activation == "softmax" else scores_NE / scores_NE.sum(dim=-1, keepdim=True)


def _assignment_fractions_and_probs(logits_NE: Tensor, top_k: int, activation: str) -> tuple[Tensor, Tensor]:
    """f_E: top-k assignments per expert divided by the number of rows (sums to top_k); P_E: mean probability."""
    num_experts = logits_NE.shape[-1]
    probs_NE = router_probs(logits_NE, activation)
    ids_NK = torch.topk(probs_NE, top_k, dim=-1).indices
    # f is a count, so it carries no gradient: the gradient flows through P only, as in the Switch Transformer.
    counts_E = count_ids(ids_NK, num_experts).to(probs_NE.dtype)
    return counts_E / logits_NE.shape[0], probs_NE.mean(dim=0)


def assignment_counts(*, router_logits: list[Tensor], top_k: int, activation: str = "softmax") -> Tensor:
    """(L, E) float64 top-k assignments per MoE layer and expert, no gradient: the f half of the load-balancing
    loss, as counts that add up over micro-batches and ranks (balance_scope global_batch)."""
    rows = []
    for logits_TE in router_logits:
        # top-k of the probabilities, as `_assignment_fractions_and_probs` takes it (logits that underflow to equal
        # probabilities would otherwise rank differently)
        ids_TK = torch.topk(router_probs(logits_TE.detach(), activation), top_k, dim=-1).indices
        rows.append(count_ids(ids_TK, logits_TE.shape[-1]))
    return torch.stack(rows).to(torch.float64)


def _fractions_from_counts(counts_LE: Tensor, top_k: int, per_layer: bool) -> Tensor:
    """f from assignment counts: (E,) pooled over layers, or (L, E) per layer; each sums to top_k (every row, a token
    in one layer, makes top_k assignments)."""
    if per_layer:
        return top_k * counts_LE / counts_LE.sum(dim=-1, keepdim=True)
    return top_k * counts_LE.sum(dim=0) / counts_LE.sum()


def load_balancing_loss(*, router_logits: list[Tensor], top_k: int, per_layer: bool = False,
                        global_counts_LE: Tensor | None = None, activation: str = "softmax") -> Tensor:
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
    num_experts = _check_logits(router_logits, top_k, "load_balancing_loss")
    if global_counts_LE is not None:
        f = _fractions_from_counts(global_counts_LE.float(), top_k, per_layer)  # (L, E) or (E,)
        if per_layer:
            p_LE = torch.stack([router_probs(x, activation).mean(dim=0) for x in router_logits])
            return (num_experts * (f * p_LE).sum(dim=-1)).mean()
        # L x (T, E) -> (L*T, E)
        p_E = router_probs(torch.cat(router_logits, dim=0), activation).mean(dim=0)
        return num_experts * torch.sum(f * p_E)
    if per_layer:
        losses = []
        for logits_TE in router_logits:
            f_E, p_E = _assignment_fractions_and_probs(logits_TE, top_k, activation)
            losses.append(num_experts * torch.sum(f_E * p_E))
        return torch.stack(losses).mean()
    # L x (T, E) -> (L*T, E)
    logits_NE = torch.cat(router_logits, dim=0)
    f_E, p_E = _assignment_fractions_and_probs(logits_NE, top_k, activation)
    return num_experts * torch.sum(f_E * p_E)


def _check_logits(router_logits: list[Tensor], top_k: int, what: str) -> int:
    """The number of experts of the layers' logits, after refusing what no loss can be formed from."""
    if not router_logits:
        raise UpcycleError(f"{what} needs the router logits of at least one MoE layer")
    num_experts = router_logits[0].shape[-1]
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
    return num_experts


def sequence_balancing_loss(*, router_logits: list[Tensor], top_k: int, sequences: int, per_layer: bool = False,
                            activation: str = "softmax") -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (balance_scope sequence), in our form: E * sum_e f_e * P_e with f and P
    taken over the tokens of one sequence, averaged over the sequences (equals top_k when every sequence is balanced).

    Each layer's (B*T, E) logits are `sequences` consecutive runs of T rows (the model flattens (B, T) row-major).
    per_layer=False: a sequence's rows of all layers are pooled (as load_balancing_loss pools layers); per_layer=True:
    each layer's loss on its own, averaged over layers. Every sequence has to balance itself, which DeepSeek-V3 keeps
    only as a weak complement to its bias (coefficient 1e-4) to avoid extreme imbalance inside one sequence.
    """
    num_experts = _check_logits(router_logits, top_k, "sequence_balancing_loss")
    # L x (B*T, E) -> (L, B, T, E): each sequence's rows in each layer
    probs_LBTE = torch.stack([router_probs(x, activation) for x in router_logits]).unflatten(1, (sequences, -1))
    L, B, T, _ = probs_LBTE.shape
    ids_LBTK = torch.topk(probs_LBTE, top_k, dim=-1).indices
    # (L, B, E) assignments per sequence, as counts without gradient (f), and mean probabilities (P)
    counts_LBE = torch.zeros(L, B, num_experts, dtype=probs_LBTE.dtype, device=probs_LBTE.device).scatter_add_(
        -1, ids_LBTK.flatten(2), torch.ones_like(ids_LBTK.flatten(2), dtype=probs_LBTE.dtype))
    if per_layer:
        f_LBE, p_LBE = counts_LBE / T, probs_LBTE.mean(dim=2)
        return (num_experts * (f_LBE * p_LBE).sum(dim=-1)).mean()
    f_BE, p_BE = counts_LBE.sum(dim=0) / (L * T), probs_LBTE.mean(dim=(0, 2))
    return (num_experts * (f_BE * p_BE).sum(dim=-1)).mean()


def expert_bias_step(*, counts_LE: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3's aux-loss-free balancing: the change of each MoE layer's per-expert bias after an optimizer step,
    rate * sign(mean load - load_e), from the (L, E) assignment counts of the whole global batch. An overloaded expert's
    bias goes down by `rate`, an underloaded one's up, one exactly at the mean stays. (L, E) fp32, the bias's dtype."""
    mean_L1 = counts_LE.double().mean(dim=-1, keepdim=True)
    return (rate * torch.sign(mean_L1 - counts_LE.double())).float()


def router_z_loss(*, router_logits: list[Tensor]) -> Tensor:
    """ST-MoE router z-loss: mean over all rows of logsumexp(logits)^2; keeps router logits small (bf16-safe).

    The paper's recipe does not use it; it is here for experiments. All layers' rows are pooled.
    """
    if not router_logits:
        raise UpcycleError("router_z_loss needs the router logits of at least one MoE layer")
    # L x (T, E) -> (L*T, E)
    logits_NE = torch.cat(router_logits, dim=0).float()
    return torch.logsumexp(logits_NE, dim=-1).square().mean()
