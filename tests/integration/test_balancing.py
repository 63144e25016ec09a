"""Load balancing beyond the Switch loss: DeepSeek-V3's aux-loss-free bias (its update on known counts, resuming it
exactly, ranks agreeing on it), the sequence-wise auxiliary loss, sigmoid scores in every balancing loss, and the
capacity factor as the trainer runs and logs it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from helpers import (make_data_dir, read_metrics, tiny_config, torchrun_train, train_one_process, write_config)
from upcycle.errors import UpcycleError
from upcycle.train import checkpoint as ckpt
from upcycle.train import losses
from upcycle.train.config import config_from_dict, config_to_dict, load_config

E, K = 6, 2


def test_bias_step_on_known_counts():
    counts_LE = torch.tensor([[10.0, 2.0, 6.0, 6.0], [0.0, 0.0, 0.0, 24.0]], dtype=torch.float64)  # means 6 and 6
    step_LE = losses.expert_bias_step(counts_LE=counts_LE, rate=1e-3)
    assert step_LE.dtype == torch.float32
    assert torch.equal(step_LE, torch.tensor([[-1e-3, 1e-3, 0.0, 0.0], [1e-3, 1e-3, 1e-3, -1e-3]]))
    assert losses.expert_bias_step(counts_LE=counts_LE, rate=0.0).abs().sum() == 0


def _logits(layers: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(tokens, E, generator=gen) + torch.linspace(0, 2, E)).requires_grad_() for _ in range(layers)]


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_sequence_loss_is_the_mean_of_each_sequences_own_loss(per_layer, activation):
    sequences, length = 4, 9
    logits = _logits(layers=3, tokens=sequences * length)
    got = losses.sequence_balancing_loss(router_logits=logits, top_k=K, sequences=sequences, per_layer=per_layer,
                                         activation=activation)
    each = [losses.load_balancing_loss(router_logits=[x[b * length:(b + 1) * length] for x in logits], top_k=K,
                                       per_layer=per_layer, activation=activation) for b in range(sequences)]
    torch.testing.assert_close(got, torch.stack(each).mean())
    got_grads = torch.autograd.grad(got, logits)
    for g, e in zip(got_grads, torch.autograd.grad(torch.stack(each).mean(), logits)):
        torch.testing.assert_close(g, e)
    whole = losses.load_balancing_loss(router_logits=logits, top_k=K, per_layer=per_layer, activation=activation)
    assert abs(whole.item() - got.item()) > 1e-3  # another loss than the micro-batch's


def test_sigmoid_balancing_uses_normalized_scores():
    """f counts the top k sigmoid scores, P averages the scores normalized per token (DeepSeek-V3's s')."""
    (logits,) = _logits(layers=1, tokens=30, seed=2)
    scores = torch.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdim=True)
    counts = torch.bincount(scores.topk(K, -1).indices.flatten(), minlength=E).double()
    expected = E * ((counts / 30) * probs.mean(0).double()).sum()
    got = losses.load_balancing_loss(router_logits=[logits], top_k=K, activation="sigmoid")
    torch.testing.assert_close(got.double(), expected)
    assert losses.assignment_counts(router_logits=[logits], top_k=K, activation="sigmoid")[0].tolist() == \
        counts.tolist()


def _bias_config(data, **train):
    return tiny_config(data, model={"router_activation": "sigmoid"}, schedule={"decay_steps": 8},
                       train={"max_steps": 8, "aux_coef": 0.0, "bias_update_rate": 0.01, "eval_every": 4, **train},
                       checkpoint={"every": 4, "keep": 3})


def _biases(checkpoint) -> dict[str, torch.Tensor]:
    """The balancing biases a sharded checkpoint holds, by name."""
    out = {}
    for file in sorted((checkpoint / ckpt.STATE_DIR).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("expert_bias_E")})
    return out


def test_resuming_with_a_bias_is_bit_identical(tmp_path):
    data = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", _bias_config(data))
    train_one_process(config, tmp_path / "straight")
    halfway = write_config(tmp_path / "h.yaml", _bias_config(data, max_steps=4))
    train_one_process(halfway, tmp_path / "resumed")
    train_one_process(config, tmp_path / "resumed")  # continues from step 4
    expected, got = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "ce", "grad_norm", "expert_load", "data_sha256"):
        assert [r[key] for r in got] == [r[key] for r in expected], key
    assert any(b != 0 for r in got for b in r["expert_load"]["bias_max"])  # the bias moved and was logged
    final = _biases(tmp_path / "straight" / "checkpoints" / "step_00000008")
    assert len(final) == 2 and any(b.abs().sum() > 0 for b in final.values())
    for name, bias in _biases(tmp_path / "resumed" / "checkpoints" / "step_00000008").items():
        assert bias.dtype == torch.float32 and torch.equal(bias, final[name]), name
    assert ckpt.model_config_of(tmp_path / "straight" / "checkpoints" / "step_00000008")["expert_bias"]


@pytest.mark.slow
def test_one_and_two_ranks_agree_on_the_bias(tmp_path):
    """The loads that move the bias are the whole global batch's, so the biases after every step are the same on one
    process and on 2 gloo ranks (global_batch scope makes the rest of the run split-independent too)."""
    data = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", _bias_config(
        data, max_steps=5, global_batch_tokens=24 * 32, micro_batch_size=None, balance_scope="global_batch",
        aux_coef=0.01, eval_every=0))
    train_one_process(config, tmp_path / "one")
    reference = read_metrics(tmp_path / "one")
    for nproc in (2,):
        torchrun_train(config, tmp_path / f"r{nproc}", nproc=nproc)
        got = read_metrics(tmp_path / f"r{nproc}")
        assert [r["expert_load"] for r in got] == [r["expert_load"] for r in reference], nproc
        final = _biases(tmp_path / "one" / "checkpoints" / "step_00000005")
        assert any(b.abs().sum() > 0 for b in final.values())  # the bias moved
        assert _biases(tmp_path / f"r{nproc}" / "checkpoints" / "step_00000005").keys() == final.keys()
        for name, bias in _biases(tmp_path / f"r{nproc}" / "checkpoints" / "step_00000005").items():
            assert torch.equal(bias, final[name]), (nproc, name)


def test_capacity_factor_drops_in_training_and_logs_the_share_per_layer(tmp_path):
    data = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data, model={"capacity_factor": 0.75}, train={"max_steps": 3, "eval_every": 3}, checkpoint={"every": 0}))
    train_one_process(config, tmp_path / "out")
    records = read_metrics(tmp_path / "out")
    dropped = [r["expert_load"]["dropped"] for r in records]
    assert all(len(d) == 2 for d in dropped) and all(0 < v < 1 for d in dropped for v in d)
    # with the factor below 1, at least 1 - 0.75 of the assignments cannot fit
    assert all(v >= 0.25 - 1e-9 for d in dropped for v in d)
    assert "val" in records[-1]


def test_routing_fields_may_be_set_over_a_checkpoint_and_nothing_else(tmp_path):
    data = make_data_dir(tmp_path / "data")
    values = tiny_config(data, model=None, init={"source": str(tmp_path)})
    values["model"] = {"capacity_factor": 1.25, "router_activation": "sigmoid"}
    config = config_from_dict(values)
    config.validate()
    assert config.model is None and config.model_routing == {"capacity_factor": 1.25, "router_activation": "sigmoid"}
    assert config_to_dict(config)["model"] == values["model"]  # OUT/config.yaml records them as given
    values["model"] = {"capacity_factor": 1.25, "dim": 64}
    with pytest.raises(UpcycleError, match="model.dim: with init.source the architecture comes from the checkpoint"):
        config_from_dict(values)
    values["model"] = {"capacity_factor": -1.0}
    with pytest.raises(UpcycleError, match="capacity_factor must be a positive"):
        config_from_dict(values).validate()


@pytest.mark.parametrize("rate", ["-1e-3", ".nan"])
def test_a_negative_or_nan_rate_is_refused(tmp_path, rate):
    data = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data))
    with pytest.raises(UpcycleError, match="bias_update_rate"):
        load_config(config, [f"train.bias_update_rate={rate}"])


def test_a_bias_joins_an_upcycled_model_or_a_checkpoint_without_one(tmp_path, llama_dir):
    """bias_update_rate > 0 gives a model without a bias one at zero: online upcycling into sigmoid routers still
    starts at the dense loss (r = 0), and a checkpoint trained without a bias continues with one."""
    from upcycle.train.trainer import run_training

    data = make_data_dir(tmp_path / "data")
    upcycle = {"source": str(llama_dir), "method": "naive", "num_experts": 4, "top_k": 2}

    def train(name: str, init: dict, model: dict | None, **loop) -> list[dict]:
        values = tiny_config(data, model=None, init=init,
                             train={"max_steps": 2, "eval_every": 0, "aux_coef": 0.0, **loop})
        if model:
            values["model"] = model
        run_training(config_from_dict(values), tmp_path / name)
        return read_metrics(tmp_path / name)

    dense = train("dense", {"source": str(llama_dir)}, None)
    sigmoid = train("sigmoid", upcycle, {"router_activation": "sigmoid"}, bias_update_rate=0.01)
    assert sigmoid[0]["ce"] == pytest.approx(dense[0]["ce"], rel=1e-6, abs=1e-6)
    assert sigmoid[-1]["expert_load"]["bias_max"] != [0.0, 0.0]
    plain = train("plain", upcycle, None)
    assert "bias_max" not in plain[-1]["expert_load"]
    source = ckpt.latest_checkpoint(tmp_path / "plain" / "checkpoints")
    assert not _biases(source)
    train("continued", {"source": str(source)}, {"router_activation": "sigmoid"}, bias_update_rate=0.01)
    final = ckpt.latest_checkpoint(tmp_path / "continued" / "checkpoints")
    model = ckpt.model_config_of(final)
    assert model["expert_bias"] and model["router_activation"] == "sigmoid"
    assert len(_biases(final)) == 2 and all(b.abs().sum() > 0 for b in _biases(final).values())


@pytest.mark.slow
def test_aux_loss_free_balancing_evens_the_loads_of_a_short_run(tmp_path, llama_dir):
    """The issue's demonstration: Drop-Upcycling into sigmoid routers (rows wide enough that the tokens' shared
    direction favours some experts), no auxiliary loss, 40 steps of 512 tokens; with the bias moving (gamma 0.01) the
    loads over the last 10 steps are visibly more even than with no balancing at all (measured 0.162 vs 0.197 for the
    busiest expert's share, uniform 0.125)."""
    from upcycle.train.trainer import run_training

    data = make_data_dir(tmp_path / "data")

    def busiest_share(rate: float) -> float:
        values = tiny_config(data, model=None, schedule={"decay_steps": 40}, checkpoint={"every": 0},
                             init={"source": str(llama_dir), "method": "drop", "ratio": 0.5, "num_experts": 8,
                                   "top_k": 2, "router_std": 0.2},
                             train={"max_steps": 40, "global_batch_tokens": 512, "eval_every": 0, "aux_coef": 0.0,
                                    "bias_update_rate": rate})
        values["model"] = {"router_activation": "sigmoid"}
        run_training(config_from_dict(values), tmp_path / f"rate{rate}")
        last = read_metrics(tmp_path / f"rate{rate}")[-10:]
        return sum(share for r in last for share in r["expert_load"]["max_share"]) / (2 * len(last))

    unbalanced, balanced = busiest_share(0.0), busiest_share(0.01)
    assert unbalanced > 0.18  # the run without balancing is uneven (uniform: 1/8)
    assert balanced < unbalanced - 0.02, (balanced, unbalanced)


def test_the_sequence_scope_reaches_the_trainer(tmp_path):
    """balance_scope sequence trains with the sequence-wise loss: at step 1 (the same weights and batch) its aux loss is
    the mean of per-sequence losses, which is not the micro-batch's."""
    from upcycle.train.trainer import run_training

    data = make_data_dir(tmp_path / "data")
    aux = {}
    for scope in ("micro_batch", "sequence"):
        values = tiny_config(data, model={"router_activation": "sigmoid"}, checkpoint={"every": 0},
                             train={"max_steps": 1, "eval_every": 0, "balance_scope": scope})
        run_training(config_from_dict(values), tmp_path / scope)
        aux[scope] = read_metrics(tmp_path / scope)[0]["aux"]
    assert aux["sequence"] > aux["micro_batch"] > 0  # a sequence spreads its tokens less evenly than a micro-batch
