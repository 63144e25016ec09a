"""The learning-rate schedule (upcycle.train.schedule): warmup-stable-decay next to the cosine (whose shape
test_train.py checks), and the property the experiment's budgets rely on: a wsd run's stable phase does not depend on
its length."""

from __future__ import annotations

import pytest

from helpers import make_data_dir, read_metrics, tiny_config
from upcycle.errors import UpcycleError
from upcycle.train.schedule import lr_at, wsd_decay_start
from upcycle.train.trainer import run_training
from upcycle.train.config import config_from_dict, validate_config


def wsd(step: int, decay_steps: int, fraction: float = 0.25) -> float:
    return lr_at(step, lr=1e-3, min_lr=1e-4, warmup_steps=4, decay_steps=decay_steps, warmup_start_lr=0.0,
                 kind="wsd", decay_fraction=fraction)


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_over_its_last_fraction():
    lrs = [wsd(s, 40) for s in range(50)]
    assert lrs[:4] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4])
    assert wsd_decay_start(40, warmup_steps=4, decay_fraction=0.25) == 30
    assert lrs[4:30] == [1e-3] * 26  # stable
    assert lrs[30] == pytest.approx(1e-3 - 0.1 * 9e-4)  # the first of the 10 decay steps is below the peak
    assert lrs[34] == pytest.approx(1e-3 - 0.5 * 9e-4)
    assert all(a > b for a, b in zip(lrs[29:39], lrs[30:40]))
    assert lrs[39:] == [1e-4] * 11  # the decay's last step reaches min_lr
    # the decay never eats into the warmup: with fraction 1 it starts right after it
    assert wsd_decay_start(10, warmup_steps=4, decay_fraction=1.0) == 4


def test_the_stable_phase_is_the_same_whatever_the_run_length():
    for short, long in ((20, 40), (8, 1000)):
        start = wsd_decay_start(short, warmup_steps=4, decay_fraction=0.25)
        assert [wsd(s, short) for s in range(start)] == [wsd(s, long) for s in range(start)]


@pytest.mark.parametrize("change, message", [
    ({"kind": "linear"}, "schedule.kind must be one of cosine, wsd"),
    ({"decay_fraction": 0.0}, r"schedule.decay_fraction must lie in \(0, 1\]"),
    ({"decay_fraction": 1.5}, r"schedule.decay_fraction must lie in \(0, 1\]"),
])
def test_schedule_fields_are_validated(tmp_path, change, message):
    values = tiny_config(make_data_dir(tmp_path / "data"), schedule=change)
    with pytest.raises(UpcycleError, match=message):  # a choice when the config is built, a range when validated
        validate_config(config_from_dict(values))


def test_the_trainer_logs_the_wsd_learning_rates(tmp_path):
    config = tiny_config(make_data_dir(tmp_path / "data"), schedule={"kind": "wsd", "warmup_steps": 2,
                                                                      "decay_fraction": 0.5},
                         train={"max_steps": 6, "eval_every": 0}, checkpoint={"every": 0, "keep": 1})
    run_training(config_from_dict(config), tmp_path / "run")
    expected = [lr_at(s, lr=3e-3, min_lr=3e-4, warmup_steps=2, decay_steps=6, warmup_start_lr=3e-4, kind="wsd",
                      decay_fraction=0.5) for s in range(6)]
    assert [r["lr"] for r in read_metrics(tmp_path / "run")] == expected
    # stable through step 2; the decay's 3 steps (6 - round(0.5 * 6) = 3 on) end at min_lr
    assert expected[2] == 3e-3 > expected[3] > expected[4] > expected[5] == 3e-4
