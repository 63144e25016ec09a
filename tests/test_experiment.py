"""`upcycle experiment`: the derived numbers, config validation, and the whole pipeline at a tiny size (every arm
kind, identical data order, resume, refusal of a changed config, a real SIGKILL with --parallel)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import make_data_dir, save_dense, subprocess_env, write_config, write_tokenizer
from upcycle.errors import UpcycleError
from upcycle.experiment import (
    eval_steps,
    gap_to_reference,
    mean_offdiagonal,
    parse_config,
    run_experiment,
    tokens_to_target,
    training_flops,
)

# ---------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_gap_to_reference_is_the_loss_difference_at_shared_points_negative_when_ahead():
    reference = [{"tokens": 0, "mean": 3.0}, {"tokens": 10, "mean": 2.5}, {"tokens": 20, "mean": 2.0}]
    arm = [{"tokens": 0, "mean": 6.0}, {"tokens": 10, "mean": 2.75}, {"tokens": 20, "mean": 1.9}, {"tokens": 30, "mean": 1}]
    gap = gap_to_reference(arm, reference)
    assert [p["tokens"] for p in gap] == [0, 10, 20]  # 30: the reference has no point there
    assert [p["mean"] for p in gap] == pytest.approx([3.0, 0.25, -0.1])
    assert gap_to_reference(reference, reference) == [{"tokens": t, "mean": 0.0} for t in (0, 10, 20)]


def test_tokens_to_target_interpolates_between_the_points_around_the_first_crossing():
    curve = [(0, 5.0), (100, 4.0), (300, 3.0), (400, 3.5), (500, 2.0)]
    assert tokens_to_target(curve, 3.5) == 200  # halfway between 4.0 at 100 and 3.0 at 300
    assert tokens_to_target(curve, 3.0) == 300  # reached exactly at a point
    assert tokens_to_target(curve, 6.0) == 0  # already below before training
    assert tokens_to_target(curve, 1.9) is None  # never reached
    assert tokens_to_target(curve, 2.0) == 500  # reached only at the end, not at the bump at 400


def test_training_flops_is_six_times_active_parameters_times_tokens():
    assert training_flops(1_000, 2_048) == 6 * 1_000 * 2_048
    assert training_flops(0, 10) == 0


def test_mean_offdiagonal_ignores_each_expert_with_itself():
    assert mean_offdiagonal(np.ones((4, 4))) == pytest.approx(1.0)
    assert mean_offdiagonal(np.eye(3)) == pytest.approx(0.0)
    sim = np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    assert mean_offdiagonal(sim) == pytest.approx(0.4)


def test_eval_steps_are_log_spaced_and_end_at_the_budget():
    assert eval_steps(5, 16, 256) == [1, 2, 4, 8, 16]
    assert eval_steps(3, 6, 256)[-1] == 6
    assert eval_steps([512, 1024], 8, 256) == [2, 4, 8]  # the budget is always measured


# ---------------------------------------------------------------------------------------------------------------------
# A tiny experiment: a 2-layer seed built here, two synthetic domains


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("experiment")
    seed = save_dense(root / "seed", "llama")
    write_tokenizer(seed)
    data = make_data_dir(root / "data")
    return {"root": root, "seed": seed, "data": data}


def experiment_dict(tiny: dict, arms: list[dict] | None = None, **changes) -> dict:
    config = {
        "seed_model": str(tiny["seed"]), "seed": 0,
        "data": {"path": str(tiny["data"]), "seq_len": 32},
        "moe": {"num_experts": 4, "top_k": 2},
        "budget_tokens": 4 * 256,
        "eval": {"points": 3, "sequences": 4},
        "arms": arms or [{"name": "dense", "kind": "dense"}, {"name": "fs", "kind": "fs"},
                         {"name": "naive", "kind": "naive"}, {"name": "drop", "kind": "drop", "ratio": 0.5},
                         {"name": "btx", "kind": "btx", "branch_tokens": 512, "include_seed": False}],
        "recipe": {"optim": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"warmup_steps": 1},
                   "train": {"global_batch_tokens": 256, "micro_batch_size": 8, "precision": "fp32"},
                   "logging": {"progress": False}},
    }
    config.update(changes)
    return config


@pytest.mark.parametrize("change, field", [
    ({"arms": [{"name": "a", "kind": "moe"}]}, "arms[0] (a).kind"),
    ({"arms": [{"name": "a", "kind": "drop", "ratio": 1.5}]}, "arms[0] (a).ratio"),
    ({"arms": [{"name": "a", "kind": "noise", "ratio": -0.1}]}, "arms[0] (a).ratio"),
    ({"arms": [{"name": "a", "kind": "drop", "index_mode": "both"}]}, "arms[0] (a).index_mode"),
    ({"arms": [{"name": "a", "kind": "btx", "branch_tokens": 512, "domains": ["code"]}]}, "arms[0] (a).domains"),
    ({"arms": [{"name": "a", "kind": "btx"}]}, "arms[0] (a).branch_tokens"),
    ({"arms": [{"name": "a", "kind": "btx", "branch_tokens": 300, "include_seed": False}]}, "arms[0] (a).branch_tokens"),
    ({"arms": [{"name": "a", "kind": "btx", "branch_tokens": 512}]}, "arms[0] (a)"),  # 3 sources, 4 experts
    ({"arms": [{"name": "a", "kind": "naive", "ratio": 0.5}]}, "arms[0] (a).ratio"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "a", "kind": "fs"}]}, "arms"),
    ({"arms": [{"name": "../x", "kind": "naive"}]}, "arms[0].name"),
    ({"arms": [{"name": "a", "kind": "naive", "convert": {"ratio": 0.1}}]}, "arms[0] (a).convert.ratio"),
    ({"arms": [{"name": "a", "kind": "naive", "convert": {"colour": 1}}]}, "arms[0] (a).convert.colour"),
    ({"arms": [{"name": "a", "kind": "dense", "convert": {"router_std": 0.1}}]}, "arms[0] (a).convert"),
    ({"arms": [{"name": "a", "kind": "naive", "convert": {"router_init": "data"}}]}, "arms[0] (a).convert"),
    ({"arms": [{"name": "a", "kind": "naive", "convert": {"router_init": "data", "calibration": "/nonexistent"}}]},
     "arms[0] (a).convert.calibration"),
    ({"budget_tokens": 1000}, "budget_tokens"),
    ({"eval": {"points": [300]}}, "eval.points"),
    ({"moe": {"num_experts": 2, "top_k": 3}}, "moe.top_k"),
    ({"recipe": {"train": {"max_steps": 5}}}, "recipe.train.max_steps"),
    ({"recipe": {"optim": {"lr": -1.0}}}, "recipe: optim.lr"),
    ({"recipe": {"schedule": {"warmup_steps": 100}}}, "recipe.schedule.warmup_steps"),
    ({"recipe": {"schedule": {"warmup_steps": 3}}}, "arms[4] (btx).branch_tokens"),  # branches have 2 steps
    ({"recipe": {"train": {"global_batch_tokens": 100}}}, "recipe: train.global_batch_tokens"),
    ({"seed_model": "/nonexistent"}, "seed_model"),
    ({"data": {"path": "/nonexistent", "seq_len": 32}}, "data.path"),
    ({"data": {"path": "DATA", "seq_len": 32, "weights": {"klingon": 1.0}}}, "data.weights"),
    ({"colour": "blue"}, "colour"),
    ({"data": {"path": "DATA", "seq_len": 256}}, "data.seq_len"),  # the tiny seed takes 128 positions
    ({"arms": [{"name": "g", "kind": "grow", "from_arm": "a"}, {"name": "a", "kind": "naive"}]}, "arms[0] (g).from_arm"),
    ({"arms": [{"name": "d", "kind": "dense"}, {"name": "g", "kind": "grow", "from_arm": "d"}]}, "arms[1] (g).from_arm"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "g", "kind": "grow", "from_arm": "a", "factor": 1}]},
     "arms[1] (g).factor"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "g", "kind": "grow", "from_arm": "a", "top_k": 9}]},
     "arms[1] (g).top_k"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "c", "kind": "continue", "from_arm": "a", "ratio": 0.5}]},
     "arms[1] (c).ratio"),
    ({"arms": [{"name": "a", "kind": "naive", "from_arm": "b"}]}, "arms[0] (a).from_arm"),
    ({"arms": [{"name": "c", "kind": "continue"}]}, "arms[0] (c).from_arm"),
])
def test_invalid_configs_name_the_field(tiny, change, field):
    """Each bad field is refused by parse_config, before any work, with a message that starts with its name."""
    config = experiment_dict(tiny)
    for key, value in change.items():
        if key == "recipe":  # one field changed in the otherwise valid recipe
            for section, fields in value.items():
                config["recipe"].setdefault(section, {}).update(fields)
        else:
            config[key] = value
    if config["data"].get("path") == "DATA":
        config["data"]["path"] = str(tiny["data"])
    with pytest.raises(UpcycleError) as error:
        parse_config(config)
    assert str(error.value).startswith(field), str(error.value)


def test_cli_refuses_an_invalid_config_with_one_line_and_writes_nothing(tiny, tmp_path):
    config = write_config(tmp_path / "bad.yaml", experiment_dict(tiny, arms=[{"name": "d", "kind": "drop",
                                                                              "ratio": 2}]))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "upcycle", "experiment", "--config", str(config), "--out", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "upcycle: error: arms[0] (d).ratio: must lie in [0, 1], got 2"]
    assert not out.exists()


def _run(tiny: dict, out: Path, config: dict, **kwargs) -> dict | None:
    path = write_config(out.parent / f"{out.name}.yaml", config)
    return run_experiment(parse_config(config), out, config_path=str(path), threads=1, **kwargs)


@pytest.fixture(scope="module")
def finished(tiny) -> dict:
    out = tiny["root"] / "run"
    results = _run(tiny, out, experiment_dict(tiny))
    return {"out": out, "results": results}


def test_every_arm_kind_runs_and_results_hold_the_issue_schema(finished):
    results = finished["results"]
    out = finished["out"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["budget_tokens"] == 1024 and results["seed"] == 0
    assert [a["name"] for a in results["arms"]] == ["dense", "fs", "naive", "drop", "btx"]
    for arm in results["arms"]:
        assert {"name", "method", "ratio", "index_mode", "tokens", "flops", "final", "curve",
                "tokens_to_naive_final", "specialization", "similarity", "data_sha256"} <= set(arm)
        assert set(arm["final"]) == {"code", "english", "mean"}
        assert arm["final"]["mean"] == pytest.approx((arm["final"]["code"] + arm["final"]["english"]) / 2)
        assert [p["tokens"] for p in arm["curve"]] == [0, 256, 512, 1024]
        assert arm["curve"][-1]["mean"] == arm["final"]["mean"]
        assert arm["tokens"] == 1024
        if arm["method"] == "dense":
            assert arm["specialization"] == [] and arm["similarity"] == []
        else:
            assert [p["tokens"] for p in arm["specialization"]] == [0, 256, 512, 1024]
            assert all(0 <= p["jsd"] <= 1 for p in arm["specialization"])
    arms = {a["name"]: a for a in results["arms"]}
    assert arms["drop"]["ratio"] == 0.5 and arms["drop"]["index_mode"] == "independent"
    # Naive upcycling starts as copies; re-drawn and from-scratch experts do not.
    assert arms["naive"]["similarity"][0]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert arms["drop"]["similarity"][0]["cosine"] < 0.9
    assert abs(arms["fs"]["similarity"][0]["cosine"]) < 0.2
    # Naive's own curve reaches its final loss at the end at the latest; training helped every arm.
    assert arms["naive"]["tokens_to_naive_final"] <= 1024
    assert all(a["final"]["mean"] < a["curve"][0]["mean"] for a in results["arms"])
    # The dense arm's FLOPs use all its parameters; the MoE arms only the active ones; btx adds its branches.
    assert arms["naive"]["flops"] == 6 * arms["naive"]["active_params"] * 1024
    assert arms["naive"]["active_params"] < arms["naive"]["total_params"]
    assert arms["btx"]["flops"] == 6 * arms["btx"]["active_params"] * 1024 + 6 * arms["dense"]["active_params"] * 1024
    drop_gap = arms["drop"]["gap_to_naive"]
    assert [p["tokens"] for p in drop_gap] == [p["tokens"] for p in arms["naive"]["curve"]]
    assert drop_gap[-1]["mean"] == pytest.approx(arms["drop"]["final"]["mean"] - arms["naive"]["final"]["mean"])
    assert f"{drop_gap[-1]['mean']:+.3f}" in (out / "report.md").read_text()
    for name in ("report.md", "loss_curves.png", "gap_to_naive.png", "specialization.png", "similarity.png",
                 "routing_naive.png", "routing_btx.png"):
        assert (out / name).stat().st_size > 0, name
    assert "routing_dense.png" not in {p.name for p in out.iterdir()}


def test_all_arms_consumed_the_identical_token_stream(finished):
    arms = finished["results"]["arms"]
    hashes = {a["name"]: a["data_sha256"] for a in arms}
    assert all(len(h) == 64 for h in hashes.values())
    assert len(set(hashes.values())) == 1, hashes
    assert finished["results"]["same_data_order"] is True
    # the hash does depend on the data: each btx branch saw one domain only, so its stream differs from the mixture
    btx = next(a for a in arms if a["method"] == "btx")
    branch_hashes = btx["branches"]["data_sha256"]
    assert set(branch_hashes) == {"code", "english"}
    assert len({*branch_hashes.values(), hashes["naive"]}) == 3


def test_measured_loss_equals_the_trainers_own_validation_of_one_uninterrupted_run(finished, tiny, tmp_path):
    """The experiment trains in segments and measures validation loss itself (so the untrained point is measured the
    same way). An ordinary single `run_training` of the same arm config, with the trainer's own evaluation on the same
    sequences, ends with the same numbers."""
    from upcycle.experiment import train_config_dict
    from upcycle.train import config_from_dict, run_training

    from helpers import read_metrics

    config = parse_config(experiment_dict(tiny))
    values = train_config_dict(config, init_source=str(finished["out"] / "arms" / "naive" / "init"), max_steps=4,
                               data_path=str(tiny["data"]))
    values["train"].update(eval_every=4, eval_sequences=4)
    run_training(config_from_dict(values), tmp_path / "direct")
    last = read_metrics(tmp_path / "direct")[-1]
    naive = next(a for a in finished["results"]["arms"] if a["name"] == "naive")
    assert naive["final"]["code"] == pytest.approx(last["val"]["code"], rel=1e-6)
    assert naive["final"]["english"] == pytest.approx(last["val"]["english"], rel=1e-6)
    assert naive["data_sha256"] == last["data_sha256"]


def test_rerun_skips_finished_arms_and_a_changed_config_is_refused(finished, tiny):
    out = finished["out"]
    done = {p: p.stat().st_mtime_ns for p in (out / "arms").glob("*/arm.json")}
    again = _run(tiny, out, experiment_dict(tiny))
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert again["arms"] == json.loads(json.dumps(finished["results"]["arms"]))
    changed = experiment_dict(tiny, seed=1)
    with pytest.raises(UpcycleError, match=r"different config \(first difference: seed\)"):
        _run(tiny, out, changed)
    assert yaml.safe_load((out / "experiment.yaml").read_text())["seed"] == 0
    arms = experiment_dict(tiny)["arms"]
    with pytest.raises(UpcycleError, match=r"first difference: arms \(drop\)\.ratio"):
        _run(tiny, out, experiment_dict(tiny, arms=[*arms[:3], {**arms[3], "ratio": 0.75}, *arms[4:]]))
    with pytest.raises(UpcycleError, match=r"first difference: arms \(fs was removed\)"):
        _run(tiny, out, experiment_dict(tiny, arms=[a for a in arms if a["name"] != "fs"]))


def test_arms_can_be_added_to_a_finished_experiment(finished, tiny):
    out = finished["out"]
    done = {p: p.stat().st_mtime_ns for p in (out / "arms").glob("*/arm.json")}
    extended = experiment_dict(tiny, arms=[*experiment_dict(tiny)["arms"], {"name": "noise", "kind": "noise"}])
    results = _run(tiny, out, extended)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the earlier arms were not redone
    assert [a["name"] for a in results["arms"]] == ["dense", "fs", "naive", "drop", "btx", "noise"]
    assert results["arms"][-1]["data_sha256"] == results["arms"][0]["data_sha256"]
    assert [a["name"] for a in yaml.safe_load((out / "experiment.yaml").read_text())["arms"]][-1] == "noise"


def test_an_existing_non_experiment_directory_is_refused(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UpcycleError, match="not an experiment directory"):
        _run(tiny, tmp_path / "out", experiment_dict(tiny, arms=[{"name": "n", "kind": "naive"}]))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_sigkill_then_rerun_with_parallel_finishes_exactly_as_an_uninterrupted_run(tiny, tmp_path):
    """A real SIGKILL of the experiment process in the middle of an arm's training; the re-run (two arms at once, one
    thread each) resumes that arm from its checkpoint and ends with the uninterrupted run's numbers, bit for bit."""
    config = experiment_dict(tiny, budget_tokens=12 * 256, eval={"points": [512, 1024], "sequences": 4},
                             arms=[{"name": "naive", "kind": "naive"}, {"name": "dense", "kind": "dense"}])
    config["recipe"]["checkpoint"] = {"every": 1}  # a checkpoint between evaluation points, to resume from
    reference = _run(tiny, tmp_path / "reference", config)

    out = tmp_path / "killed"
    path = write_config(tmp_path / "killed.yaml", config)
    command = [sys.executable, "-m", "upcycle", "experiment", "--config", str(path), "--out", str(out), "--threads", "1"]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once the first arm has passed its first evaluation point (step 2) and saved a checkpoint beyond it, well
    # before its last step (12)
    run = out / "arms" / "naive" / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(2 < int(p.name.split("_")[1]) < 12 for p in run.glob("step_*")):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "arms" / "naive" / "arm.json").exists()
    assert not (out / "results.json").exists()
    killed_at = sorted(run.glob("step_*"))[-1].name

    done = subprocess.run(command + ["--parallel", "2", "--threads", "2"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((out / "results.json").read_text())
    log = (out / "arms" / "naive" / "log.txt").read_text()
    first_resume = next(line for line in log.splitlines() if "resuming from" in line)
    assert killed_at in first_resume  # continued from the checkpoint the kill left, not from scratch
    for mine, theirs in zip(resumed["arms"], reference["arms"]):
        assert mine["name"] == theirs["name"]
        assert mine["curve"] == theirs["curve"]
        assert mine["similarity"] == theirs["similarity"]
        assert mine["data_sha256"] == theirs["data_sha256"]


def test_data_with_more_token_ids_than_the_seed_is_refused_before_any_work(tiny, tmp_path):
    small = save_dense(tmp_path / "small-seed", "llama", vocab_size=32)  # the data uses 64 ids
    with pytest.raises(UpcycleError, match="^data.path: has 64 token ids but seed_model's vocab_size is 32"):
        parse_config(experiment_dict(tiny, seed_model=str(small)))


def test_an_empty_calibration_file_is_refused_before_any_work(tiny, tmp_path):
    seed = save_dense(tmp_path / "seed", "llama")
    write_tokenizer(seed, eos=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    arms = [{"name": "naive", "kind": "naive"},
            {"name": "d", "kind": "naive", "convert": {"router_init": "data", "calibration": str(empty)}}]
    with pytest.raises(UpcycleError, match=r"^arms\[1\] \(d\)\.convert\.calibration: .*has no text"):
        parse_config(experiment_dict({**tiny, "seed": seed}, arms=arms))


def test_an_arm_can_carry_further_convert_options_such_as_a_data_initialized_router(tiny, tmp_path):
    """`convert:` passes ConvertOptions fields to the arm's conversion: here --router-init data, whose routers differ
    from the uniform init's while a naive upcycle stays the dense function whatever its router."""
    seed = save_dense(tmp_path / "seed", "llama")
    write_tokenizer(seed, eos=True)  # calibration text is read with the seed's tokenizer, documents end with EOS
    tiny = {**tiny, "seed": seed}
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(40)) for i in range(30)))
    arms = [{"name": "naive", "kind": "naive"},
            {"name": "naive-data", "kind": "naive",
             "convert": {"router_init": "data", "calibration": str(calibration), "calibration_tokens": 600}}]
    results = _run(tiny, tmp_path / "out", experiment_dict(tiny, arms=arms, budget_tokens=256))
    by_name = {a["name"]: a for a in results["arms"]}
    assert by_name["naive"]["convert"] is None
    assert by_name["naive-data"]["convert"]["router_init"] == "data"
    manifest = json.loads((tmp_path / "out" / "arms" / "naive-data" / "init" / "upcycle_manifest.json").read_text())
    assert manifest["options"]["router_init"] == "data" and manifest["calibration_tokens_used"] == 600
    assert by_name["naive-data"]["curve"][0]["mean"] == pytest.approx(by_name["naive"]["curve"][0]["mean"], abs=1e-5)
    assert by_name["naive-data"]["routing_final"] != by_name["naive"]["routing_final"]
    assert "router_init data" in (tmp_path / "out" / "report.md").read_text()


def test_grow_and_continue_arms_start_from_another_arms_trained_model(tiny, tmp_path):
    """kind grow: `upcycle grow` of an earlier arm's final model (r = 0: the same function, so its step-0 loss is that
    arm's final loss); kind continue: that model as it is; both then trained with the same recipe and data order."""
    arms = [{"name": "moe4", "kind": "naive"},
            {"name": "more", "kind": "continue", "from_arm": "moe4"},
            {"name": "grow-r0", "kind": "grow", "from_arm": "moe4", "ratio": 0.0},
            {"name": "grow-r05-top2", "kind": "grow", "from_arm": "moe4", "ratio": 0.5, "top_k": 2}]
    results = _run(tiny, tmp_path / "out", experiment_dict(tiny, arms=arms))
    by_name = {a["name"]: a for a in results["arms"]}
    source_final = by_name["moe4"]["final"]["mean"]
    assert by_name["more"]["curve"][0]["mean"] == pytest.approx(source_final, abs=1e-5)
    assert by_name["grow-r0"]["curve"][0]["mean"] == pytest.approx(source_final, abs=1e-4)
    assert by_name["grow-r05-top2"]["curve"][0]["mean"] != pytest.approx(source_final, abs=1e-3)
    assert (by_name["grow-r0"]["num_experts"], by_name["grow-r0"]["top_k"]) == (8, 4)
    assert (by_name["grow-r05-top2"]["num_experts"], by_name["grow-r05-top2"]["top_k"]) == (8, 2)
    assert (by_name["more"]["num_experts"], by_name["more"]["top_k"]) == (4, 2)
    # top-2 of 8 uses as many expert parameters per token as top-2 of 4 (the router has 4 more rows of 32 per layer)
    assert by_name["grow-r0"]["active_params"] > by_name["grow-r05-top2"]["active_params"] == \
        by_name["more"]["active_params"] + 2 * 4 * 32
    assert results["same_data_order"] is True
    manifest = json.loads((tmp_path / "out" / "arms" / "grow-r0" / "init" / "upcycle_manifest.json").read_text())
    assert manifest["options"]["command"] == "grow" and manifest["function_preserving"] is True
