"""train.balance_scope: the load-balancing loss per micro-batch (the paper's recipe) or over the whole global batch,
where the routing counts of every micro-batch and rank are summed before the loss is formed, so that how the batch is
split (micro-batch size, number of ranks) does not change the run."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from helpers import (assert_same_training, make_data_dir, tiny_config, torchrun_train, train_one_process,
                     write_config)
from upcycle.train import losses
from upcycle.train.trainer import forward_backward
from upcycle.train.config import TrainLoopConfig

E, K = 6, 2


def _logits(layers: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a skewed router, so that micro-batches disagree with each other about the balance
    return [(torch.randn(tokens, E, generator=gen) + torch.linspace(0, 2, E)).requires_grad_() for _ in range(layers)]


@pytest.mark.parametrize("per_layer", [False, True])
def test_the_mean_over_micro_batches_with_global_counts_is_the_whole_batch_loss(per_layer):
    logits = _logits(layers=3, tokens=32)
    whole = losses.load_balancing_loss(router_logits=logits, top_k=K, per_layer=per_layer)
    whole_grads = torch.autograd.grad(whole, logits)

    chunks = [[x[i:i + 8] for x in logits] for i in range(0, 32, 8)]  # 4 micro-batches of 8 tokens
    counts_LE = sum(losses.assignment_counts(router_logits=c, top_k=K) for c in chunks)
    split = torch.stack([losses.load_balancing_loss(router_logits=c, top_k=K, per_layer=per_layer,
                                                    global_counts_LE=counts_LE) for c in chunks]).mean()
    torch.testing.assert_close(split, whole)
    for got, expected in zip(torch.autograd.grad(split, logits), whole_grads):
        torch.testing.assert_close(got, expected)
    # the per-micro-batch loss (balance_scope micro_batch) is another number: the test above can fail
    local = torch.stack([losses.load_balancing_loss(router_logits=c, top_k=K, per_layer=per_layer)
                         for c in chunks]).mean()
    assert abs(local.item() - whole.item()) > 1e-3


def test_global_counts_of_the_batch_itself_give_the_plain_loss():
    logits = _logits(layers=2, tokens=20, seed=1)
    counts_LE = losses.assignment_counts(router_logits=logits, top_k=K)
    assert counts_LE.shape == (2, E) and counts_LE.sum().item() == 2 * 20 * K
    for per_layer in (False, True):
        torch.testing.assert_close(
            losses.load_balancing_loss(router_logits=logits, top_k=K, per_layer=per_layer, global_counts_LE=counts_LE),
            losses.load_balancing_loss(router_logits=logits, top_k=K, per_layer=per_layer))


def test_forward_backward_does_not_depend_on_the_micro_batch_size_with_global_scope():
    from helpers import tiny_moe

    batch_BT = torch.randint(0, 320, (8, 17), generator=torch.Generator().manual_seed(0))

    def run(scope: str, micro: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = tiny_moe(seed=3).train()
        loop = dataclasses.replace(TrainLoopConfig(), micro_batch_size=micro, balance_scope=scope)
        sums, _, _ = forward_backward(model, batch_BT, loop=loop, top_k=2, num_moe=3, num_experts=4,
                                      autocast=contextlib.nullcontext)
        return sums.tolist(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (loss8, ce8, aux8, _), grads8 = run("global_batch", 8)
    (loss2, ce2, aux2, _), grads2 = run("global_batch", 2)  # 4 micro-batches: counts from the gradient-free pre-pass
    assert aux2 == pytest.approx(aux8, rel=1e-6) and loss2 == pytest.approx(loss8, rel=1e-6)
    for name, grad in grads8.items():
        torch.testing.assert_close(grads2[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    (_, _, aux2_local, _), _ = run("micro_batch", 2)
    assert abs(aux2_local - aux8) > 1e-4  # per micro-batch it is another loss


def test_the_default_is_the_papers_per_micro_batch_loss():
    assert TrainLoopConfig().balance_scope == "micro_batch"


@pytest.mark.slow
def test_global_batch_scope_trains_alike_on_one_two_and_four_ranks(tmp_path):
    """Under auto micro-batching 24 sequences per step are 3 micro-batches of 8 on one process, 2 of 6 per rank on
    two ranks and 1 of 6 per rank on four: the per-micro-batch loss differs between them, the global one must not."""
    data = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data, train={"max_steps": 5, "global_batch_tokens": 24 * 32, "micro_batch_size": None,
                     "balance_scope": "global_batch", "eval_every": 0}, checkpoint={"every": 0}))
    train_one_process(config, tmp_path / "one")
    torchrun_train(config, tmp_path / "two", nproc=2)
    torchrun_train(config, tmp_path / "four", nproc=4)
    for out in ("two", "four"):
        assert_same_training(tmp_path / out, tmp_path / "one", range(1, 6), total_steps=5, rel=1e-5)
