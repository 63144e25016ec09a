"""The pure math of every method, on tensors: counts, untouched entries, statistics, determinism, edges."""

import math

import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.convert.options import UpcycleOptions, btx_source_of_expert
from upcycle.convert.upcycling import (
    btx_mean,
    derived_generator,
    init_router,
    num_redrawn,
    scratch_tensor,
    upcycle_expert,
    upcycle_ffn,
)

F, D = 256, 64


@pytest.fixture(scope="module")
def dense():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(F, D, generator=g) * 0.05 + 0.01
    up = torch.randn(F, D, generator=g) * 0.03 - 0.02
    down = torch.randn(D, F, generator=g) * 0.04
    return gate, up, down


def _changed_neurons(new, old, axis):
    return (new != old).any(dim=1 - axis).nonzero().flatten()


@pytest.mark.parametrize("ratio", [0.1, 0.29, 0.5, 0.75])
def test_drop_redraws_exactly_floor_r_f_neurons_and_leaves_the_rest_bit_identical(dense, ratio):
    gate, up, down = dense
    x = upcycle_expert(gate, up, down, layer=3, expert=5, opts=UpcycleOptions(method="drop", ratio=ratio))
    expected = math.floor(ratio * F + 1e-9)
    for i, (new, old, axis) in enumerate([(x.gate_FD, gate, 0), (x.up_FD, up, 0), (x.down_DF, down, 1)]):
        mask = x.redrawn_MF[i]
        assert int(mask.sum()) == expected
        keep = (~mask).nonzero().flatten()
        assert torch.equal(new.index_select(axis, keep), old.index_select(axis, keep))
        # every selected neuron really changed (a continuous draw equal to the old value has probability zero)
        assert torch.equal(_changed_neurons(new, old, axis), mask.nonzero().flatten())
    assert num_redrawn(100, 0.29) == 29


def test_redrawn_values_follow_the_slice_statistics_within_sampling_error(dense):
    gate, up, down = dense
    x = upcycle_expert(gate, up, down, layer=0, expert=0, opts=UpcycleOptions(method="drop", ratio=0.5))
    for i, (new, old, axis, name) in enumerate([(x.gate_FD, gate, 0, "gate"), (x.up_FD, up, 0, "up"),
                                                 (x.down_DF, down, 1, "down")]):
        idx = x.redrawn_MF[i].nonzero().flatten()
        source_slice, drawn = old.index_select(axis, idx), new.index_select(axis, idx)
        mu, sigma = source_slice.mean().item(), source_slice.std().item()
        assert x.records[name]["mean"] == pytest.approx(mu, abs=1e-7)
        assert x.records[name]["std"] == pytest.approx(sigma, rel=1e-6)
        n = drawn.numel()
        # 5 standard errors: mean error sigma/sqrt(n), std error about sigma/sqrt(2n)
        assert abs(drawn.mean().item() - mu) < 5 * sigma / math.sqrt(n)
        assert abs(drawn.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n)


def test_matrix_stats_use_the_whole_dense_matrix(dense):
    gate, up, down = dense
    x = upcycle_expert(gate, up, down, layer=0, expert=0, opts=UpcycleOptions(ratio=0.5, stats="matrix"))
    assert x.records["gate"]["mean"] == pytest.approx(gate.mean().item(), abs=1e-7)
    assert x.records["down"]["std"] == pytest.approx(down.std().item(), rel=1e-6)


def test_shared_mode_uses_one_set_for_all_three_matrices_and_independent_does_not(dense):
    gate, up, down = dense
    shared = upcycle_expert(gate, up, down, layer=1, expert=2, opts=UpcycleOptions(index_mode="shared"))
    assert torch.equal(shared.redrawn_MF[0], shared.redrawn_MF[1])
    assert torch.equal(shared.redrawn_MF[0], shared.redrawn_MF[2])
    indep = upcycle_expert(gate, up, down, layer=1, expert=2, opts=UpcycleOptions(index_mode="independent"))
    assert not torch.equal(indep.redrawn_MF[0], indep.redrawn_MF[1])
    assert not torch.equal(indep.redrawn_MF[1], indep.redrawn_MF[2])
    # with shared sets a fraction 1 - r of neurons stay intact in all three matrices; independent leaves ~(1 - r)^3
    intact_shared = (~shared.redrawn_MF.any(0)).float().mean().item()
    intact_indep = (~indep.redrawn_MF.any(0)).float().mean().item()
    assert intact_shared == pytest.approx(0.5)
    assert abs(intact_indep - 0.125) < 5 * math.sqrt(0.125 * 0.875 / F)


def test_experts_differ_and_draws_do_not_depend_on_order_or_grouping(dense):
    gate, up, down = dense
    opts = UpcycleOptions(seed=7)
    stacked = upcycle_ffn(gate, up, down, num_experts=4, layer=2, opts=opts)
    for e in range(4):
        for f in range(e + 1, 4):
            assert not torch.equal(stacked.gate_EFD[e], stacked.gate_EFD[f])
    # expert 3 computed alone, before the others, equals expert 3 of the stacked result
    alone = upcycle_expert(gate, up, down, layer=2, expert=3, opts=opts)
    assert torch.equal(alone.down_DF, stacked.down_EDF[3]) and torch.equal(alone.up_FD, stacked.up_EFD[3])
    again = upcycle_ffn(gate, up, down, num_experts=4, layer=2, opts=opts)
    assert torch.equal(again.gate_EFD, stacked.gate_EFD)
    other_seed = upcycle_ffn(gate, up, down, num_experts=4, layer=2, opts=UpcycleOptions(seed=8))
    assert not torch.equal(other_seed.gate_EFD, stacked.gate_EFD)
    other_layer = upcycle_ffn(gate, up, down, num_experts=4, layer=3, opts=opts)
    assert not torch.equal(other_layer.gate_EFD, stacked.gate_EFD)


def test_ratio_zero_is_naive_and_computes_no_statistics(dense):
    gate, up, down = dense
    for opts in (UpcycleOptions(method="drop", ratio=0.0), UpcycleOptions(method="naive")):
        x = upcycle_ffn(gate, up, down, num_experts=3, layer=0, opts=opts)
        assert torch.equal(x.gate_EFD, gate.expand(3, F, D)) and torch.equal(x.down_EDF, down.expand(3, D, F))
        assert not x.redrawn_EMF.any()
        assert all(r[m]["mean"] is None for r in x.records for m in ("gate", "up", "down"))


def test_ratio_one_redraws_whole_matrices_from_dense_statistics(dense):
    gate, up, down = dense
    x = upcycle_expert(gate, up, down, layer=0, expert=0, opts=UpcycleOptions(ratio=1.0))
    assert x.redrawn_MF.all()
    assert x.records["gate"]["mean"] == pytest.approx(gate.mean().item(), abs=1e-7)
    assert (x.gate_FD != gate).all()
    n = gate.numel()
    assert abs(x.gate_FD.std().item() - gate.std().item()) < 5 * gate.std().item() / math.sqrt(2 * n)


def test_noise_adds_only_to_the_selected_slice(dense):
    gate, up, down = dense
    x = upcycle_expert(gate, up, down, layer=0, expert=1, opts=UpcycleOptions(method="noise", noise_std=0.02))
    for i, (new, old, axis) in enumerate([(x.gate_FD, gate, 0), (x.up_FD, up, 0), (x.down_DF, down, 1)]):
        mask = x.redrawn_MF[i]
        assert int(mask.sum()) == F // 2
        keep, sel = (~mask).nonzero().flatten(), mask.nonzero().flatten()
        assert torch.equal(new.index_select(axis, keep), old.index_select(axis, keep))
        noise = (new - old).index_select(axis, sel)
        n = noise.numel()
        assert abs(noise.mean().item()) < 5 * 0.02 / math.sqrt(n)
        assert abs(noise.std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * n)
        # added, not replaced: the perturbed values still correlate with the dense ones
        assert torch.corrcoef(torch.stack([new.index_select(axis, sel).flatten(),
                                           old.index_select(axis, sel).flatten()]))[0, 1] > 0.8


def test_scratch_matches_hf_default_init():
    g = derived_generator(0, "x")
    w = scratch_tensor((512, 256), "weight", std=0.02, generator=g)
    n = w.numel()
    assert abs(w.mean().item()) < 5 * 0.02 / math.sqrt(n)
    assert abs(w.std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * n)
    assert torch.equal(scratch_tensor((8,), "norm", std=0.02, generator=g), torch.ones(8))
    assert torch.equal(scratch_tensor((8,), "bias", std=0.02, generator=g), torch.zeros(8))
    emb = scratch_tensor((10, 4), "embedding", std=0.02, generator=g, padding_idx=3)
    assert torch.equal(emb[3], torch.zeros(4)) and (emb[2] != 0).all()


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_router_init_has_zero_mean_and_the_requested_std(kind):
    w = init_router(8, 4096, kind=kind, std=0.02, generator=derived_generator(0, "router"))
    n = w.numel()
    assert w.shape == (8, 4096)
    assert abs(w.mean().item()) < 5 * 0.02 / math.sqrt(n)
    assert abs(w.std().item() - 0.02) < 5 * 0.02 / math.sqrt(n)
    if kind == "uniform":
        assert w.abs().max().item() <= 0.02 * math.sqrt(3) + 1e-7


def test_btx_maps_experts_to_sources_in_blocks_and_averages():
    assert btx_source_of_expert(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert btx_source_of_expert(6, 3) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(UpcycleError, match="divisible"):
        btx_source_of_expert(8, 3)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(btx_mean([a, b.to(torch.bfloat16)]), torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("bad, message", [
    (dict(ratio=1.5), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(method="magic"), "method"),
    (dict(index_mode="both"), "index mode"), (dict(stats="layer"), "stats"),
])
def test_options_are_validated(bad, message):
    with pytest.raises(UpcycleError, match=message):
        UpcycleOptions(**bad).validate()
