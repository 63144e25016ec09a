"""logging.wandb: a Weights & Biases run beside metrics.jsonl, in offline mode (no network), continued on resume."""

from __future__ import annotations

import shutil

import pytest

from helpers import make_data_dir, read_metrics, read_wandb_run, tiny_config, write_config
from upcycle.errors import UpcycleError
from upcycle.train.config import config_from_dict, load_config
from upcycle.train.trainer import run_training

pytest.importorskip("wandb")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def _runs(out):
    return [read_wandb_run(path) for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb"))]


def test_a_run_logs_its_metrics_and_config_to_wandb_and_a_resumed_run_continues_it(tmp_path, offline):
    data = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data, train={"max_steps": 4, "eval_every": 2}, checkpoint={"every": 2, "keep": 3},
        logging={"wandb": {"project": "upcycle-test", "name": "tiny", "tags": ["moe", "ci"]}}))
    out = tmp_path / "run"
    run_training(load_config(config), out)
    [first] = _runs(out)
    assert first["project"] == "upcycle-test" and first["name"] == "tiny" and first["tags"] == ["moe", "ci"]
    assert first["config"]["optim"]["lr"] == 3e-3 and first["config"]["train"]["max_steps"] == 4
    metrics = read_metrics(out)
    rows = {row["train/step"]: row for row in first["history"]}
    assert sorted(rows) == [1, 2, 3, 4]
    for record in metrics:
        row = rows[record["step"]]
        assert row["train/loss"] == pytest.approx(record["loss"]) and row["train/lr"] == pytest.approx(record["lr"])
        assert row["train/grad_norm"] == pytest.approx(record["grad_norm"])
        assert row["expert_load/max_share/layer_0"] == pytest.approx(record["expert_load"]["max_share"][0])
        if "val" in record:
            assert {k: v for k, v in row.items() if k.startswith("val/")} == pytest.approx(
                {f"val/{d}": v for d, v in record["val"].items()})
    # resume from step 2: the same W&B run (same id) goes on from step 3
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    run_training(load_config(config), out)
    first_again, second = _runs(out)
    assert second["id"] == first["id"]
    assert [row["train/step"] for row in second["history"]] == [3, 4]
    assert second["history"][-1]["train/loss"] == pytest.approx(read_metrics(out)[-1]["loss"])


def test_wandb_settings_are_checked_before_any_work(tmp_path, monkeypatch):
    base = {"model": {"vocab_size": 8, "dim": 8, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "ffn_dim": 8}}
    with pytest.raises(UpcycleError, match=r"^logging.wandb.projekt: unknown field; logging.wandb accepts: entity, "):
        config_from_dict({**base, "logging": {"wandb": {"projekt": "p"}}})
    with pytest.raises(UpcycleError, match=r"^logging.wandb.project is required"):
        config_from_dict({**base, "logging": {"wandb": {"name": "x"}}})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = config_from_dict({**base, "logging": {"wandb": {"project": "p"}}})
    with pytest.raises(UpcycleError, match=r"^logging.wandb needs the wandb package: pip install 'upcycle\[wandb\]'$"):
        config.logging.validate()  # part of TrainConfig.validate, before OUT is touched


def test_an_experiment_names_one_wandb_run_per_arm_and_seed_grouped_by_the_experiment(tmp_path):
    from helpers import REPO, tiny_experiment
    from upcycle.experiment.config import parse_config, train_config_dict

    values = tiny_experiment(REPO / "assets" / "micro-seed", make_data_dir(tmp_path / "data"))
    values["recipe"].setdefault("logging", {})["wandb"] = {"project": "study", "tags": ["replication"]}
    config = parse_config(values)
    main = train_config_dict(config, init_source="x", max_steps=8, seed=2, data_path="d",
                             wandb_run=("replication", "drop/seed2", "main"))
    assert main["logging"]["wandb"] == {"project": "study", "tags": ["replication"], "group": "replication",
                                        "name": "drop/seed2", "job_type": "main"}
    assert "name" not in config.recipe["logging"]["wandb"]  # the shared recipe is not changed
    plain = train_config_dict(config, init_source="x", max_steps=8, seed=2, data_path="d")
    assert plain["logging"]["wandb"] == {"project": "study", "tags": ["replication"]}
