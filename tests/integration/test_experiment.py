"""`upcycle experiment`: config validation, and the whole pipeline at a tiny size: every arm kind made from the seed at
two seeds and two budgets (decay branches off one warmup-stable-decay run), the same data order within a seed,
intervals and verdicts, kept models re-scored, resume, refusal of a changed config, a real SIGKILL with --parallel;
grow and continue arms starting from another arm's trained model at the same seed, and waiting for it under
--parallel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import (make_data_dir, read_metrics, save_dense, subprocess_env, tiny_experiment, write_config,
                     write_tokenizer)
from upcycle.errors import UpcycleError
from upcycle.experiment.runner import rescore_experiment, run_experiment
from upcycle.experiment.config import eval_steps, parse_config, train_config_dict
from upcycle.experiment.stats import call, document_error, gap_interval, holm, mean_offdiagonal, training_flops
from upcycle.model.hf import load_model
from upcycle.train.schedule import lr_at
from upcycle.train.trainer import run_training
from upcycle.train.config import config_from_dict

# ---------------------------------------------------------------------------------------------------------------------
# Pure functions


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
    write_tokenizer(seed, eos=True)
    data = make_data_dir(root / "data")
    return {"root": root, "seed": seed, "data": data}


ALL_ARMS = [{"name": "dense", "kind": "dense"}, {"name": "fs", "kind": "fs"}, {"name": "naive", "kind": "naive"},
            {"name": "drop", "kind": "drop", "ratio": 0.5, "index_mode": "shared"},
            {"name": "btx", "kind": "btx", "branch_tokens": 512, "include_seed": False}]


def experiment_dict(tiny: dict, arms: list[dict] | None = None, **changes) -> dict:
    return tiny_experiment(tiny["seed"], tiny["data"], arms=arms or ALL_ARMS,
                           **{"eval": {"points": 3, "tokens": 256, "train_tokens": 128}, **changes})


def with_recipe(config: dict, **sections) -> dict:
    for section, fields in sections.items():
        config["recipe"].setdefault(section, {}).update(fields)
    return config


@pytest.mark.parametrize("change, field", [
    ({"arms": [{"name": "a", "kind": "moe"}]}, "arms[0] (a).kind"),
    ({"arms": [{"name": "a", "kind": "drop", "ratio": 1.5}]}, "arms[0] (a).ratio"),
    ({"arms": [{"name": "a", "kind": "noise", "ratio": -0.1}]}, "arms[0] (a).ratio"),
    ({"arms": [{"name": "a", "kind": "drop", "index_mode": "both"}]}, "arms[0] (a).index_mode"),
    ({"arms": [{"name": "a", "kind": "btx", "branch_tokens": 512, "domains": ["code"]}]}, "arms[0] (a).domains"),
    ({"arms": [{"name": "a", "kind": "btx"}]}, "arms[0] (a).branch_tokens"),
    ({"arms": [{"name": "a", "kind": "btx", "branch_tokens": 300, "include_seed": False}]},
     "arms[0] (a).branch_tokens"),
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
    ({"budgets": [1000]}, "budgets"),
    ({"budgets": [1024, 512]}, "budgets"),
    ({"budgets": []}, "budgets"),
    ({"budget_tokens": 1024}, "budget_tokens"),  # renamed: the message says to write budgets
    ({"seed": 0}, "seed"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"seeds": []}, "seeds"),
    ({"eval": {"points": [300]}}, "eval.points"),
    ({"eval": {"sequences": 4}}, "eval.sequences"),
    ({"eval": {"tokens": 0}}, "eval.tokens"),
    ({"eval": {"bootstrap": 10}}, "eval.bootstrap"),  # intervals are computed, not resampled: no such field
    ({"eval": {"train_tokens": 0}}, "eval.train_tokens"),
    ({"primary": {"arms": ["nope"]}}, "primary.arms"),
    ({"primary": {"arms": ["naive"]}}, "primary.arms"),  # the reference itself
    ({"primary": {"arms": ["drop", "drop"]}}, "primary.arms"),
    ({"primary": {"arms": ["drop"], "budget": 768}}, "primary.budget"),
    ({"primary": {"budget": 512}}, "primary.budget"),
    ({"primary": {"arms": ["drop"], "mean": "median"}}, "primary.mean"),
    ({"arms": [{"name": "a", "kind": "fs"}], "primary": {"arms": ["a"]}}, "primary.arms"),  # no naive arm
    ({"arms": [{"name": "n", "kind": "naive", "seeds": [0, 7]}]}, "arms[0] (n).seeds"),
    ({"arms": [{"name": "n", "kind": "naive", "seeds": []}]}, "arms[0] (n).seeds"),
    ({"seeds": [0, 1], "arms": [{"name": "n", "kind": "naive", "seeds": [1]}]}, "arms[0] (n).seeds"),  # reference
    ({"seeds": [0, 1], "arms": [{"name": "n", "kind": "naive"}, {"name": "a", "kind": "naive", "seeds": [1]},
                                {"name": "c", "kind": "continue", "from_arm": "a"}]}, "arms[2] (c).seeds"),
    ({"moe": {"num_experts": 2, "top_k": 3}}, "moe.top_k"),
    ({"recipe": {"train": {"max_steps": 5}}}, "recipe.train.max_steps"),
    ({"recipe": {"schedule": {"decay_steps": 5}}}, "recipe.schedule.decay_steps"),
    ({"recipe": {"optim": {"lr": -1.0}}}, "recipe: optim.lr"),
    ({"recipe": {"schedule": {"kind": "linear"}}}, "recipe: schedule.kind"),
    ({"recipe": {"schedule": {"warmup_steps": 100}}}, "recipe.schedule.warmup_steps"),
    ({"recipe": {"schedule": {"warmup_steps": 3}}}, "recipe.schedule.warmup_steps"),  # the smallest budget: 2 steps
    ({"recipe": {"train": {"global_batch_tokens": 100}}}, "recipe: train.global_batch_tokens"),
    ({"seed_model": "/nonexistent"}, "seed_model"),
    ({"data": {"path": "/nonexistent", "seq_len": 32}}, "data.path"),
    ({"data": {"path": "DATA", "seq_len": 32, "weights": {"klingon": 1.0}}}, "data.weights"),
    ({"colour": "blue"}, "colour"),
    ({"data": {"path": "DATA", "seq_len": 256}}, "data.path"),  # the tiny seed takes 128 positions
    # grow and continue
    ({"arms": [{"name": "g", "kind": "grow", "from_arm": "a"}, {"name": "a", "kind": "naive"}]},
     "arms[0] (g).from_arm"),
    ({"arms": [{"name": "c", "kind": "continue", "from_arm": "c"}]}, "arms[0] (c).from_arm"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "c", "kind": "continue", "from_arm": "b"}]},
     "arms[1] (c).from_arm"),
    ({"arms": [{"name": "d", "kind": "dense"}, {"name": "g", "kind": "grow", "from_arm": "d"}]},
     "arms[1] (g).from_arm"),
    ({"arms": [{"name": "d", "kind": "dense"}, {"name": "c", "kind": "continue", "from_arm": "d"},
               {"name": "g", "kind": "grow", "from_arm": "c"}]}, "arms[2] (g).from_arm"),  # still a dense model
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "g", "kind": "grow", "from_arm": "a", "factor": 1}]},
     "arms[1] (g).factor"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "g", "kind": "grow", "from_arm": "a", "factor": 2.5}]},
     "arms[1] (g).factor"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "g", "kind": "grow", "from_arm": "a", "top_k": 9}]},
     "arms[1] (g).top_k"),  # 2 x 4 experts
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "g", "kind": "grow", "from_arm": "a", "top_k": 0}]},
     "arms[1] (g).top_k"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "g", "kind": "grow", "from_arm": "a", "ratio": 1.5}]},
     "arms[1] (g).ratio"),
    ({"arms": [{"name": "a", "kind": "naive"},
               {"name": "g", "kind": "grow", "from_arm": "a", "convert": {"router_std": 0.1}}]}, "arms[1] (g).convert"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "c", "kind": "continue", "from_arm": "a", "ratio": 0.5}]},
     "arms[1] (c).ratio"),
    ({"arms": [{"name": "a", "kind": "naive"}, {"name": "c", "kind": "continue", "from_arm": "a", "factor": 2}]},
     "arms[1] (c).factor"),
    ({"arms": [{"name": "a", "kind": "naive", "from_arm": "b"}]}, "arms[0] (a).from_arm"),
    ({"arms": [{"name": "a", "kind": "naive", "top_k": 1}]}, "arms[0] (a).top_k"),
    ({"arms": [{"name": "c", "kind": "continue"}]}, "arms[0] (c).from_arm"),
    ({"arms": [{"name": "a", "kind": "naive", "train": {"max_steps": 3}}]}, "arms[0] (a).train.max_steps"),
    ({"arms": [{"name": "a", "kind": "dense", "model": {"router_activation": "sigmoid"}}]}, "arms[0] (a).model"),
    ({"arms": [{"name": "a", "kind": "naive", "model": {"dim": 8}}]}, "arms[0] (a): model.dim"),
    ({"arms": [{"name": "a", "kind": "naive", "train": {"bias_update_rate": -1.0}}]},
     "arms[0] (a): train.bias_update_rate"),
])
def test_invalid_configs_name_the_field(tiny, change, field):
    """Each bad field is refused by parse_config, before any work, with a message that starts with its name."""
    config = experiment_dict(tiny, budgets=[512, 1024])
    for key, value in change.items():
        if key == "recipe":  # one field changed in the otherwise valid recipe
            with_recipe(config, **value)
        else:
            config[key] = value
    if config["data"].get("path") == "DATA":
        config["data"]["path"] = str(tiny["data"])
    with pytest.raises(UpcycleError) as error:
        parse_config(config)
    assert str(error.value).startswith(field), str(error.value)


def test_an_moe_that_cannot_train_in_this_machines_memory_is_refused_by_upcycle_plans_figure(tiny, monkeypatch):
    """The need is `upcycle plan`'s (make_plan of the run's training config, its init upcycling the seed as the arm
    does), not a guess: refused one byte below it, accepted at it; one line naming the field and the fix."""
    import re

    from upcycle.experiment import config as experiment_config
    from upcycle.convert.conversion import ConvertOptions
    from upcycle.hardware import HostMemory, format_bytes
    from upcycle.train.plan import make_plan

    config = parse_config(experiment_dict(tiny, arms=[{"name": "naive", "kind": "naive"}]))
    values = train_config_dict(config, init_source=str(tiny["seed"]), max_steps=1, seed=0)
    values["init"].update(method="naive", num_experts=4, top_k=2)  # as `upcycle plan` reads an init section
    plan = make_plan(config_from_dict(values), world_size=1, ranks_per_node=1, device="cpu")
    need = max(plan.node_host_bytes(phase) for phase in ("build", "train", "save"))
    assert experiment_config.moe_training_bytes(config, ConvertOptions(method="naive", num_experts=4, top_k=2)) == need
    assert need > 16 * plan.total_params  # weights, gradients and AdamW (4 fp32 copies), plus activations and runtime

    monkeypatch.setattr(experiment_config, "host_memory", lambda: HostMemory(total=need - 1, available=None))
    with pytest.raises(UpcycleError) as error:
        parse_config(experiment_dict(tiny, arms=[{"name": "naive", "kind": "naive"}]))
    assert re.fullmatch(rf"moe.num_experts: an MoE of 4 experts needs about {re.escape(format_bytes(need))} to train "
                        r"\(upcycle plan's figure: [^)]*\), more than this machine's [0-9.]+ [GM]iB; use fewer experts",
                        str(error.value)), str(error.value)
    monkeypatch.setattr(experiment_config, "host_memory", lambda: HostMemory(total=need, available=None))
    parse_config(experiment_dict(tiny, arms=[{"name": "naive", "kind": "naive"}]))


def test_grow_defaults_follow_the_from_arm_chain(tiny):
    """factor 2 and top_k = factor x the source's top-k by default, through a chain of grow and continue arms; a
    continue of the dense arm is allowed (the dense model trained further)."""
    arms = [{"name": "d", "kind": "dense"}, {"name": "d-more", "kind": "continue", "from_arm": "d"},
            {"name": "a", "kind": "drop"}, {"name": "g", "kind": "grow", "from_arm": "a"},
            {"name": "g-more", "kind": "continue", "from_arm": "g"},
            {"name": "g3", "kind": "grow", "from_arm": "g-more", "factor": 3, "ratio": 0.0, "index_mode": "shared"}]
    config = parse_config(experiment_dict(tiny, arms=arms))
    by_name = {arm.name: arm for arm in config.arms}
    assert (by_name["g"].factor, by_name["g"].top_k, by_name["g"].ratio, by_name["g"].index_mode) == \
        (2, 4, 0.5, "independent")
    assert (by_name["g3"].factor, by_name["g3"].top_k) == (3, 12)  # 24 experts
    assert by_name["g-more"].factor is None and by_name["d-more"].top_k is None


def test_renamed_fields_say_what_to_write_instead(tiny):
    config = experiment_dict(tiny)
    config["budget_tokens"] = config.pop("budgets")[0]
    with pytest.raises(UpcycleError, match=r"^budget_tokens: unknown field \(renamed to budgets: \[TOKENS, \.\.\.\]\); "
                                           "an experiment config accepts: arms, budgets, data, eval, moe, primary, "
                                           "recipe, seed_model, seeds$"):
        parse_config(config)


def test_cli_refuses_an_invalid_config_with_one_line_and_writes_nothing(tiny, tmp_path):
    config = write_config(tmp_path / "bad.yaml", experiment_dict(tiny, arms=[{"name": "d", "kind": "drop",
                                                                              "ratio": 2}]))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "upcycle", "experiment", "--config", str(config), "--out", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["upcycle: error: arms[0] (d).ratio: must lie in [0, 1], got 2"]
    assert not out.exists()


def _run(tiny: dict, out: Path, config: dict, **kwargs) -> dict | None:
    path = write_config(out.parent / f"{out.name}.yaml", config)
    return run_experiment(parse_config(config), out, config_path=str(path), threads=1, **kwargs)


def finished_config(tiny: dict) -> dict:
    """Two seeds, budgets of 2 and 4 steps under warmup-stable-decay (half of each budget decays): the 2-step
    budget is a decay branch taken off the 4-step run at its step 1."""
    return with_recipe(experiment_dict(tiny, seeds=[0, 1], budgets=[512, 1024], primary={"arms": ["drop", "btx"]}),
                       schedule={"kind": "wsd", "decay_fraction": 0.5})


@pytest.fixture(scope="module")
def finished(tiny) -> dict:
    out = tiny["root"] / "run"
    results = _run(tiny, out, finished_config(tiny))
    return {"out": out, "results": results}


def _arms(results: dict) -> dict:
    return {arm["name"]: arm for arm in results["arms"]}


def test_every_arm_kind_runs_at_every_seed_and_budget_and_results_hold_the_schema(finished):
    results, out = finished["results"], finished["out"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["budgets"] == [512, 1024] and results["seeds"] == [0, 1]
    assert results["schedule"] == {"kind": "wsd", "decay_fraction": 0.5, "warmup_steps": 1}
    assert results["validation"]["domains"]["code"]["tokens"] == 256  # eval.tokens per domain: 8 sequences of 32
    weights = results["validation"]["mixture_weights"]
    assert sum(weights.values()) == pytest.approx(1.0) and set(weights) == {"code", "english"}
    arms = _arms(results)
    assert list(arms) == ["dense", "fs", "naive", "drop", "btx"]
    for arm in arms.values():
        assert [b["tokens"] for b in arm["budgets"]] == [512, 1024]
        assert [p["tokens"] for p in arm["curve"]] == [0, 256, 512, 1024]
        assert [run["seed"] for run in arm["seeds"]] == [0, 1]
        for i, budget in enumerate(arm["budgets"]):
            per_seed = [run["budgets"][i] for run in arm["seeds"]]
            for run_budget in per_seed:
                assert run_budget["mean"] == pytest.approx((run_budget["code"] + run_budget["english"]) / 2)
                assert run_budget["mixture"] == pytest.approx(weights["code"] * run_budget["code"]
                                                              + weights["english"] * run_budget["english"])
                assert (out / run_budget["model"] / "config.json").is_file()  # the kept model
            loss = budget["loss"]["mean"]
            assert loss["mean"] == pytest.approx(np.mean([b["mean"] for b in per_seed]))
            assert loss["low"] < loss["mean"] < loss["high"]  # two seeds: an interval
            if arm["name"] != "dense":
                assert budget["jsd"] is not None
    # FLOPs: active parameters for the MoE arms, btx adds its branches (2 domains x 512 tokens, dense)
    assert arms["naive"]["budgets"][1]["flops"] == 6 * arms["naive"]["active_params"] * 1024
    assert arms["btx"]["budgets"][1]["flops"] == (6 * arms["btx"]["active_params"] * 1024
                                                  + 6 * arms["dense"]["active_params"] * 1024)
    assert all(a["budgets"][-1]["loss"]["mean"]["mean"] < a["curve"][0]["loss"]["mean"]["mean"]
               for a in arms.values())  # training helped every arm
    assert arms["naive"]["seeds"][0]["budgets"][0]["tokens"] == 512
    # naive's copies start identical; re-drawn experts do not
    assert arms["naive"]["curve"][0]["cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert arms["drop"]["curve"][0]["cosine"]["mean"] < 0.9
    for name in ("report.md", "loss_curves.png", "gap_to_naive.png", "specialization.png", "similarity.png",
                 "routing_naive.png", "routing_btx.png"):
        assert (out / name).stat().st_size > 0, name
    assert "routing_dense.png" not in {p.name for p in out.iterdir()}


def _doc_sums(out: Path, arm: str, seed: int, tokens: int) -> dict[str, np.ndarray]:
    """A budget's per-document loss sums as the run measured them, at the precision results keep (float32)."""
    measured = json.loads((out / "arms" / arm / f"seed_{seed}" / "measure" / f"budget_{tokens}.json").read_text())
    return {d: np.asarray(v, dtype=np.float32).astype(np.float64) for d, v in measured["doc_loss"].items()}


def test_each_gap_has_one_interval_from_seeds_and_documents_and_a_call_only_at_the_end_of_a_schedule(finished):
    out, arms = finished["out"], _arms(finished["results"])
    naive, drop = arms["naive"], arms["drop"]
    doc_tokens = {d: np.asarray(v["doc_tokens"], dtype=np.float64)
                  for d, v in json.loads((out / "validation.json").read_text())["domains"].items()}
    for i, budget in enumerate(drop["budgets"]):
        per_seed = [d["budgets"][i]["mean"] - n["budgets"][i]["mean"] for d, n in zip(drop["seeds"], naive["seeds"])]
        pairs = [(_doc_sums(out, "drop", s, budget["tokens"]), _doc_sums(out, "naive", s, budget["tokens"]))
                 for s in (0, 1)]
        gaps = [{d: a[d] - b[d] for d in a} for a, b in pairs]
        mean_gaps = {d: (gaps[0][d] + gaps[1][d]) / 2 for d in doc_tokens}
        expected = gap_interval(per_seed, *document_error(mean_gaps, doc_tokens, {d: 1.0 for d in doc_tokens}))
        gap = budget["gap"]["mean"]
        assert gap["mean"] == pytest.approx(np.mean(per_seed))
        assert (gap["low"], gap["high"], gap["df"]) == pytest.approx((expected["low"], expected["high"],
                                                                      expected["df"]))
        assert gap["se_doc"] > 0 and gap["se_seed"] > 0 and not gap["provisional"]  # both sources of error
        assert gap["verdict"] == call(gap)
        assert f"{gap['mean']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]" in (out / "report.md").read_text()
    for budget in naive["budgets"]:  # naive against itself
        assert budget["gap"]["mean"]["mean"] == 0 and budget["gap"]["mean"]["verdict"] is None
    for point in drop["curve"]:  # mid-schedule (and before training): an interval, never a verdict
        assert "verdict" not in point["gap"]["mean"] and point["gap"]["mean"]["low"] is not None
    assert drop["tokens_to_naive"]["of"] == 2 and drop["crossing"]["of"] == 2
    report = (out / "report.md").read_text()
    mid = report[report.index("### Mid-schedule gaps"):report.index("## Training against validation")]
    assert not any(word in mid for word in ("ahead", "behind", "level", "**"))


def test_specialization_has_its_chance_level_and_a_paired_gap_and_training_loss_is_reported(finished):
    """Each MoE arm's JSD at a budget's end comes with its chance level (sequences shuffled between domains: above 0
    on finite samples) and its gap to naive's, paired by seed; each budget's end scores the training split too."""
    arms = _arms(finished["results"])
    for name in ("fs", "drop", "btx"):
        end = arms[name]["budgets"][-1]
        assert end["jsd_chance"]["mean"] > 0
        per_seed = [run["budgets"][-1]["jsd"] - ref["budgets"][-1]["jsd"]
                    for run, ref in zip(arms[name]["seeds"], arms["naive"]["seeds"])]
        assert end["jsd_gap"]["mean"] == pytest.approx(np.mean(per_seed))
        assert end["jsd_gap"]["low"] < end["jsd_gap"]["mean"] < end["jsd_gap"]["high"]
    assert arms["dense"]["budgets"][-1]["jsd"] is None and arms["dense"]["budgets"][-1]["jsd_gap"] is None
    for arm in arms.values():
        for i, budget in enumerate(arm["budgets"]):
            runs = [run["budgets"][i] for run in arm["seeds"]]
            assert budget["train_loss"]["mean"]["mean"] == pytest.approx(np.mean([r["train"]["mean"] for r in runs]))
            assert budget["generalization_gap"]["mean"]["mean"] == pytest.approx(
                np.mean([r["mean"] - r["train"]["mean"] for r in runs]))
    assert "## Training against validation loss" in (finished["out"] / "report.md").read_text()


def test_the_primary_family_is_holm_corrected_and_every_other_gap_is_exploratory(finished):
    results = finished["results"]
    arms = _arms(results)
    family = results["primary_family"]
    assert [entry["arm"] for entry in family] == ["drop", "btx"] and {e["tokens"] for e in family} == {1024}
    adjusted = holm({e["arm"]: e["p"] for e in family})
    for entry in family:
        gap = arms[entry["arm"]]["budgets"][-1]["gap"]["mean"]
        assert gap["role"] == "primary" and gap["p_holm"] == pytest.approx(adjusted[entry["arm"]])
        assert gap["verdict"] == call(gap, p_adjusted=adjusted[entry["arm"]]) == entry["verdict"]
    assert arms["drop"]["budgets"][0]["gap"]["mean"]["role"] == "exploratory"
    assert arms["fs"]["budgets"][-1]["gap"]["mean"]["role"] == "exploratory"
    assert arms["drop"]["budgets"][-1]["gap"]["mixture"]["role"] == "exploratory"  # the family's mean is "mean"
    report = (finished["out"] / "report.md").read_text()
    assert "## Primary comparison (declared in the config, Holm-corrected)" in report
    assert report.count("**") == 4 * len(family)  # each primary verdict bold in both gap tables, nothing else bold


def test_seeds_differ_in_data_order_and_draws_and_arms_share_them_within_a_seed(finished):
    out, arms = finished["out"], _arms(finished["results"])
    hashes = {(name, run["seed"]): run["budgets"][-1]["data_sha256"] for name, arm in arms.items()
              for run in arm["seeds"]}
    for seed in (0, 1):
        assert len({h for (name, s), h in hashes.items() if s == seed}) == 1  # every arm, one stream per seed
    assert hashes[("naive", 0)] != hashes[("naive", 1)]
    assert finished["results"]["same_data_order"] == {"0": True, "1": True}
    # the upcycling draws and the router init differ by seed
    inits = {s: load_model(out / "arms" / "drop" / f"seed_{s}" / "init").state_dict() for s in (0, 1)}
    experts = [k for k in inits[0] if "gate_up_ED2F" in k]
    routers = [k for k in inits[0] if "router" in k]
    assert experts and routers
    assert not torch.equal(inits[0][experts[0]], inits[1][experts[0]])
    assert not torch.equal(inits[0][routers[0]], inits[1][routers[0]])
    naive = {s: load_model(out / "arms" / "naive" / f"seed_{s}" / "init").state_dict() for s in (0, 1)}
    assert torch.equal(naive[0][experts[0]], naive[1][experts[0]])  # naive's experts are copies at any seed
    assert not torch.equal(naive[0][routers[0]], naive[1][routers[0]])
    # btx's branches saw one domain each: their streams differ from the mixture's
    branches = arms["btx"]["seeds"][0]["branches"]["data_sha256"]
    assert len({*branches.values(), hashes[("naive", 0)]}) == 3


def test_a_wsd_branch_that_shares_stable_steps_equals_a_run_scheduled_to_its_budget_from_the_start(tiny, tmp_path):
    """Budgets of 4 and 8 steps, a quarter of each decaying, warmup 1 step: the 4-step budget is a decay branch taken
    off the 8-step run after its step 3, so the two share the warmup step and two steps at the peak learning rate (the
    stable phase), not the warmup alone. An ordinary run whose wsd schedule ends at step 4 from the start takes the
    same steps (loss, learning rate, gradient norm, data) and ends with the same weights, bit for bit."""
    raw = with_recipe(experiment_dict(tiny, arms=[{"name": "naive", "kind": "naive"}], budgets=[4 * 256, 8 * 256],
                                      eval={"points": 1, "tokens": 64, "train_tokens": 64}),
                      schedule={"kind": "wsd", "decay_fraction": 0.25})
    out = tmp_path / "out"
    _run(tiny, out, raw)
    unit = out / "arms" / "naive" / "seed_0"
    config = parse_config(raw)
    run_training(config_from_dict(train_config_dict(config, init_source=str(unit / "init"), max_steps=4, seed=0,
                                                    data_path=str(tiny["data"]))), tmp_path / "direct")
    keys = ("step", "loss", "lr", "grad_norm", "data_sha256", "expert_load")
    branch = [{k: r.get(k) for k in keys} for r in read_metrics(unit / "budgets" / "1024" / "run")]
    assert branch == [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "direct")]
    main = [{k: r.get(k) for k in keys} for r in read_metrics(unit / "run")]
    assert [r["step"] for r in branch] == [1, 2, 3, 4]
    assert branch[:3] == main[:3]  # the shared steps: warmup, then two at the peak learning rate
    assert branch[1]["lr"] == branch[2]["lr"] == main[3]["lr"] == 3e-3  # steps 2 and 3 stable, as is the main run's 4
    assert branch[3]["lr"] == lr_at(3, lr=3e-3, min_lr=3e-4, warmup_steps=1, decay_steps=4, warmup_start_lr=3e-4,
                                    kind="wsd", decay_fraction=0.25) < 3e-3  # the branch's own decay step
    assert branch[3]["loss"] == main[3]["loss"] and branch[3]["grad_norm"] == main[3]["grad_norm"]  # same state
    kept = load_model(unit / "final" / "1024").state_dict()
    direct = load_model(tmp_path / "direct" / "checkpoints" / "step_00000004").to(torch.bfloat16).float()
    assert all(torch.equal(kept[k], v) for k, v in direct.state_dict().items())


def test_measured_loss_equals_the_trainers_own_validation_of_one_uninterrupted_run(finished, tiny, tmp_path):
    """The experiment trains in segments and measures validation loss itself. One uninterrupted `run_training` of
    the same main run, with the trainer's own evaluation on the same sequences, ends with the same numbers."""
    config = parse_config(finished_config(tiny))
    init = finished["out"] / "arms" / "naive" / "seed_1" / "init"
    values = train_config_dict(config, init_source=str(init), max_steps=4, seed=1, data_path=str(tiny["data"]))
    values["train"].update(eval_every=4, eval_sequences=8)
    run_training(config_from_dict(values), tmp_path / "direct")
    last = read_metrics(tmp_path / "direct")[-1]
    naive = _arms(finished["results"])["naive"]["seeds"][1]
    assert naive["curve"][-1]["code"] == pytest.approx(last["val"]["code"], rel=1e-6)
    assert naive["curve"][-1]["english"] == pytest.approx(last["val"]["english"], rel=1e-6)
    assert naive["data_sha256_by_step"]["4"] == last["data_sha256"]


def test_rescoring_the_kept_models_gives_the_recorded_losses(finished, tiny, tmp_path):
    out = finished["out"]
    rescored = rescore_experiment(out, tiny["data"], threads=1)
    for mine, recorded in zip(rescored["arms"], finished["results"]["arms"]):
        assert mine["name"] == recorded["name"]
        for run, theirs in zip(mine["seeds"], recorded["seeds"]):
            for budget, their_budget in zip(run["budgets"], theirs["budgets"]):
                for key in ("code", "english", "mean", "mixture", "jsd"):
                    assert budget.get(key) == their_budget.get(key), (mine["name"], key)
        assert mine["budgets"][-1]["gap"]["mean"]["mean"] == recorded["budgets"][-1]["gap"]["mean"]["mean"]
    written = out / "rescore" / tiny["data"].name
    assert json.loads((written / "results.json").read_text())["rescored_on"]
    assert (written / "report.md").is_file() and (written / "loss_curves.png").is_file()
    # other text: the same models, other numbers
    other = rescore_experiment(out, make_data_dir(tmp_path / "other", seed=5), threads=1)
    assert other["arms"][2]["seeds"][0]["budgets"][0]["mean"] != rescored["arms"][2]["seeds"][0]["budgets"][0]["mean"]


def test_a_rescore_weighs_domains_by_the_training_mixture_not_by_the_rescore_datas_shares(finished, tmp_path):
    """Before: --rescore weighted the mixture-weighted mean by the rescore data's own training shares and called that
    the training mixture. Rescore data whose shares differ (code 1/5 of its training tokens) must still be weighed as
    the experiment trained (its mixture_weights), and the report must say which weights it used."""
    out = finished["out"]
    trained = finished["results"]["validation"]["mixture_weights"]
    data = make_data_dir(tmp_path / "skewed", seed=7)
    metadata = json.loads((data / "data.json").read_text())
    code = metadata["domains"]["code"]["train"]
    np.fromfile(data / code["file"], dtype=np.uint16)[:3000].tofile(data / code["file"])
    code["tokens"] = 3000
    metadata["domains"]["english"]["train"]["tokens"] = 12000
    (data / "data.json").write_text(json.dumps(metadata))
    rescored = rescore_experiment(out, data, threads=1)
    assert rescored["validation"]["mixture_weights"] == pytest.approx(trained)
    assert trained["code"] == pytest.approx(0.5)  # not the rescore data's 0.2
    assert "the experiment's training mixture" in rescored["validation"]["mixture_source"]
    for arm in rescored["arms"]:
        for run in arm["seeds"]:
            for budget in run["budgets"]:
                assert budget["mixture"] == pytest.approx(sum(w * budget[d] for d, w in trained.items()))
    report = (out / "rescore" / "skewed" / "report.md").read_text()
    assert "Mixture weights: code 0.500, english 0.500 (the experiment's training mixture" in report


def test_recompute_rebuilds_every_interval_and_the_report_from_results_and_documents_alone(finished, tmp_path):
    """Every interval of report.md is recomputable from the committed files: --recompute on a copy holding only
    results.json and documents.json gives the same results and report; and one gap, recomputed here by hand from the
    per-document losses in documents.json, is the one results.json and report.md hold."""
    from upcycle.experiment.report import decode_losses, recompute

    out, copy = finished["out"], tmp_path / "copy"
    copy.mkdir()
    for name in ("results.json", "documents.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    rebuilt = recompute(copy)
    assert rebuilt == json.loads((out / "results.json").read_text())
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    documents = json.loads((copy / "documents.json").read_text())
    tokens = {d: np.asarray(v, dtype=np.float64) for d, v in documents["doc_tokens"].items()}
    runs = documents["runs"]
    per_seed, sums = [], []
    for seed in ("0", "1"):
        mine = {d: decode_losses(v) for d, v in runs["drop"][seed]["budgets"]["1024"].items()}
        theirs = {d: decode_losses(v) for d, v in runs["naive"][seed]["budgets"]["1024"].items()}
        sums.append({d: mine[d] - theirs[d] for d in tokens})
    # the per-seed gaps as results.json records them (each seed's mean loss, measured in float64)
    per_seed = [a["budgets"][-1]["mean"] - b["budgets"][-1]["mean"]
                for a, b in zip(_arms(rebuilt)["drop"]["seeds"], _arms(rebuilt)["naive"]["seeds"])]
    mean_sums = {d: (sums[0][d] + sums[1][d]) / 2 for d in tokens}
    expected = gap_interval(per_seed, *document_error(mean_sums, tokens, {d: 1.0 for d in tokens}))
    gap = _arms(rebuilt)["drop"]["budgets"][-1]["gap"]["mean"]
    assert (gap["mean"], gap["low"], gap["high"]) == pytest.approx((expected["mean"], expected["low"],
                                                                     expected["high"]), abs=1e-12)
    assert f"{gap['mean']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]" in (copy / "report.md").read_text()
    assert (copy / "documents.json").stat().st_size < 200_000  # small: compressed float32 sums


def test_equal_flops_gaps_read_the_reference_in_log_flops_and_only_inside_its_measured_range(finished):
    from upcycle.experiment.stats import interpolate_log

    arms = _arms(finished["results"])
    naive = arms["naive"]
    flops = [b["flops"] for b in naive["budgets"]]
    means = [b["loss"]["mean"]["mean"] for b in naive["budgets"]]
    seen = {"in": 0, "out": 0}
    for name in ("dense", "fs", "drop", "btx"):
        for budget in arms[name]["budgets"]:
            equal = budget["gap_equal_flops"]
            if not flops[0] <= budget["flops"] <= flops[-1]:
                assert equal["out_of_range"]
                seen["out"] += 1
                continue
            seen["in"] += 1
            expected = budget["loss"]["mean"]["mean"] - interpolate_log(flops, means, budget["flops"])
            assert equal["mean"]["mean"] == pytest.approx(expected, abs=1e-9)
            assert equal["mean"]["low"] < equal["mean"]["mean"] < equal["mean"]["high"]
    assert seen["in"] and seen["out"]  # btx's branches put its FLOPs past naive's largest budget
    assert arms["btx"]["budgets"][-1]["gap_equal_flops"]["out_of_range"]
    assert "out of range" in (finished["out"] / "report.md").read_text()


def test_merging_pieces_run_elsewhere_gives_the_full_runs_results(finished, tiny, tmp_path):
    """Pieces of one experiment (here: the finished runs split between two directories, as two GPU pieces would hold
    them, without checkpoints or models) merged into one OUT give the results of the experiment run in one place; a
    run held twice, or missing, is refused."""
    from upcycle.experiment.runner import merge_pieces

    out = finished["out"]
    pieces = [tmp_path / "piece0", tmp_path / "piece1"]
    for index, piece in enumerate(pieces):
        piece.mkdir()
        for name in ("experiment.yaml", "validation.json"):
            (piece / name).write_bytes((out / name).read_bytes())
        for done in sorted((out / "arms").glob("*/seed_*/arm.json")):
            if (done.parent.name == "seed_0") == (index == 0):
                target = piece / done.relative_to(out)
                target.parent.mkdir(parents=True)
                target.write_bytes(done.read_bytes())
    merged = merge_pieces(pieces, tmp_path / "merged")
    assert merged == json.loads((out / "results.json").read_text())
    assert (tmp_path / "merged" / "report.md").read_text() == (out / "report.md").read_text()
    # pieces run in different places: their configs' paths compared relative to the directory each ran in
    root = str(tiny["root"])
    (pieces[0] / "piece.json").write_text(json.dumps({"root": root}))
    saved = (pieces[1] / "experiment.yaml").read_text()
    assert root in saved
    (pieces[1] / "experiment.yaml").write_text(saved.replace(root, "/elsewhere/checkout"))
    (pieces[1] / "piece.json").write_text(json.dumps({"root": "/elsewhere/checkout", "gpu": "H200"}))
    moved = merge_pieces(pieces, tmp_path / "merged")  # an earlier merge in OUT is replaced
    assert moved["arms"] == merged["arms"]
    assert json.loads((tmp_path / "merged" / "merged.json").read_text())["pieces"][1]["gpu"] == "H200"
    (pieces[1] / "piece.json").write_text(json.dumps({"root": "/yet/another"}))
    with pytest.raises(UpcycleError, match="another config"):
        merge_pieces(pieces, tmp_path / "merged")
    (pieces[1] / "piece.json").write_text(json.dumps({"root": "/elsewhere/checkout"}))
    with pytest.raises(UpcycleError, match="no piece holds dense seed 1"):
        merge_pieces(pieces[:1], tmp_path / "merged")
    with pytest.raises(UpcycleError, match="finished in both"):
        merge_pieces([pieces[0], pieces[0], pieces[1]], tmp_path / "merged")


def test_with_one_seed_every_verdict_is_provisional_and_nothing_is_bold(finished):
    """The same runs with only seed 0 kept: one interval per gap from the documents alone, marked provisional, and
    no bold verdict, the primary family's included."""
    from upcycle.experiment.report import (HEADER_FIELDS, build_results, report_markdown, units_from_results)

    results = json.loads((finished["out"] / "results.json").read_text())
    documents = json.loads((finished["out"] / "documents.json").read_text())
    results["seeds"] = [0]
    for arm in results["arms"]:
        arm["seeds"] = arm["seeds"][:1]
    units, validation = units_from_results(results, documents)
    one = build_results(units, validation, header={k: results[k] for k in HEADER_FIELDS if k in results},
                        arm_names=[arm["name"] for arm in results["arms"]])
    gaps = [b["gap"]["mean"] for arm in one["arms"] if arm["name"] != "naive" for b in arm["budgets"]]
    assert all(g["provisional"] and g["se_seed"] is None and g["low"] is not None for g in gaps)
    assert all(entry["provisional"] for entry in one["primary_family"])
    report = report_markdown(one)
    assert "**" not in report and "(provisional: one seed)" in report


def test_rerun_skips_finished_runs_and_a_changed_config_is_refused(finished, tiny):
    out = finished["out"]
    done = {p: p.stat().st_mtime_ns for p in (out / "arms").glob("*/seed_*/arm.json")}
    assert len(done) == 10
    again = _run(tiny, out, finished_config(tiny))
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert again["arms"] == json.loads(json.dumps(finished["results"]["arms"]))
    with pytest.raises(UpcycleError, match=r"different config \(first difference: seeds\)"):
        _run(tiny, out, {**finished_config(tiny), "seeds": [0, 1, 2]})
    assert yaml.safe_load((out / "experiment.yaml").read_text())["seeds"] == [0, 1]
    arms = finished_config(tiny)["arms"]
    with pytest.raises(UpcycleError, match=r"first difference: arms \(drop\)\.ratio"):
        _run(tiny, out, {**finished_config(tiny), "arms": [*arms[:3], {**arms[3], "ratio": 0.75}, *arms[4:]]})
    with pytest.raises(UpcycleError, match=r"first difference: arms \(fs was removed\)"):
        _run(tiny, out, {**finished_config(tiny), "arms": [a for a in arms if a["name"] != "fs"]})


def test_an_existing_non_experiment_directory_is_refused(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UpcycleError, match="not an experiment directory"):
        _run(tiny, tmp_path / "out", experiment_dict(tiny, arms=[{"name": "n", "kind": "naive"}]))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_cosine_budgets_are_runs_of_their_own_and_arms_can_be_added(tiny, tmp_path):
    """With schedule.kind cosine every budget is its own run from the initial model, its cosine ending at that
    budget; adding an arm to a finished experiment trains only the new arm."""
    config = experiment_dict(tiny, arms=[{"name": "naive", "kind": "naive"}], budgets=[256, 512],
                             eval={"points": 1, "tokens": 64, "train_tokens": 64})
    out = tmp_path / "out"
    _run(tiny, out, config)
    unit = out / "arms" / "naive" / "seed_0"
    short = read_metrics(unit / "budgets" / "256" / "run")
    assert [r["step"] for r in short] == [1]
    main = read_metrics(unit / "run")
    assert short[0]["data_sha256"] == main[0]["data_sha256"]  # the same data, its own schedule
    assert short[0]["lr"] == lr_at(0, lr=3e-3, min_lr=3e-4, warmup_steps=1, decay_steps=1, warmup_start_lr=3e-4)
    done = (unit / "arm.json").stat().st_mtime_ns
    results = _run(tiny, out, {**config, "arms": [*config["arms"], {"name": "noise", "kind": "noise"}]})
    assert (unit / "arm.json").stat().st_mtime_ns == done
    assert [a["name"] for a in results["arms"]] == ["naive", "noise"]


@pytest.mark.slow
def test_sigkill_then_rerun_with_parallel_finishes_exactly_as_an_uninterrupted_run(tiny, tmp_path):
    """A real SIGKILL of the experiment process in the middle of a run's training; the re-run (two runs at once, one
    thread each) resumes it from its checkpoint and ends with the uninterrupted run's numbers, bit for bit."""
    config = experiment_dict(tiny, budgets=[12 * 256], eval={"points": [512, 1024], "tokens": 64, "train_tokens": 64},
                             arms=[{"name": "naive", "kind": "naive"}, {"name": "dense", "kind": "dense"}])
    config["recipe"]["checkpoint"] = {"every": 1}  # a checkpoint between evaluation points, to resume from
    reference = _run(tiny, tmp_path / "reference", config)

    out = tmp_path / "killed"
    path = write_config(tmp_path / "killed.yaml", config)
    command = [sys.executable, "-m", "upcycle", "experiment", "--config", str(path), "--out", str(out),
               "--threads", "1"]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once the first run has passed its first evaluation point (step 2) and saved a checkpoint beyond it, well
    # before its last step (12)
    run = out / "arms" / "naive" / "seed_0" / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(2 < int(p.name.split("_")[1]) < 12 for p in run.glob("step_*")):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "arms" / "naive" / "seed_0" / "arm.json").exists()
    assert not (out / "results.json").exists()
    killed_at = sorted(run.glob("step_*"))[-1].name

    done = subprocess.run(command + ["--parallel", "2", "--threads", "2"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((out / "results.json").read_text())
    log = (out / "arms" / "naive" / "seed_0" / "log.txt").read_text()
    first_resume = next(line for line in log.splitlines() if "resuming from" in line)
    assert killed_at in first_resume  # continued from the checkpoint the kill left, not from scratch
    for mine, theirs in zip(resumed["arms"], reference["arms"]):
        assert mine["name"] == theirs["name"]
        for key in ("curve", "budgets"):
            assert [{k: v for k, v in p.items() if k != "model"} for p in mine["seeds"][0][key]] == \
                [{k: v for k, v in p.items() if k != "model"} for p in theirs["seeds"][0][key]]


def test_data_with_more_token_ids_than_the_seed_is_refused_before_any_work(tiny, tmp_path):
    small = save_dense(tmp_path / "small-seed", "llama", vocab_size=32)  # the data uses 64 ids
    with pytest.raises(UpcycleError, match="^data.path: .* was tokenized with 64 token ids but the model has only 32"):
        parse_config(experiment_dict({**tiny, "seed": small}))


def test_an_empty_calibration_file_is_refused_before_any_work(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    arms = [{"name": "naive", "kind": "naive"},
            {"name": "d", "kind": "naive", "convert": {"router_init": "data", "calibration": str(empty)}}]
    with pytest.raises(UpcycleError, match=r"^arms\[1\] \(d\)\.convert\.calibration: .*has no text"):
        parse_config(experiment_dict(tiny, arms=arms))


def _jsonl(rng: np.random.Generator, documents: int) -> list[str]:
    """JSONL lines of documents of 30 words of the tiny tokenizer's vocabulary."""
    return [json.dumps({"text": " ".join(f"w{int(rng.integers(90))}" for _ in range(30))}) for _ in range(documents)]


def test_an_arm_can_carry_further_convert_options_such_as_a_data_initialized_router(tiny, tmp_path):
    """`convert:` passes ConvertOptions fields to the arm's conversion: here --router-init data, whose routers differ
    from the uniform init's while a naive upcycle stays the dense function whatever its router."""
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(40)) for i in range(30)))
    arms = [{"name": "naive", "kind": "naive"},
            {"name": "naive-data", "kind": "naive",
             "convert": {"router_init": "data", "calibration": str(calibration), "calibration_tokens": 600}}]
    results = _run(tiny, tmp_path / "out", experiment_dict(tiny, arms=arms, budgets=[256],
                                                           eval={"points": 1, "tokens": 64, "train_tokens": 64}))
    by_name = _arms(results)
    assert by_name["naive"]["convert"] is None
    assert by_name["naive-data"]["convert"]["router_init"] == "data"
    unit = tmp_path / "out" / "arms" / "naive-data" / "seed_0"
    manifest = json.loads((unit / "init" / "upcycle_manifest.json").read_text())
    assert manifest["options"]["router_init"] == "data" and manifest["calibration_tokens_used"] == 600
    assert by_name["naive-data"]["curve"][0]["loss"]["mean"]["mean"] == \
        pytest.approx(by_name["naive"]["curve"][0]["loss"]["mean"]["mean"], abs=1e-5)
    assert by_name["naive-data"]["seeds"][0]["routing_final"] != by_name["naive"]["seeds"][0]["routing_final"]
    assert "router_init data" in (tmp_path / "out" / "report.md").read_text()


def test_an_arm_can_override_training_fields_and_the_routing(tiny, tmp_path):
    """An arm's `train:` and `model:` reach its runs' configs only: here aux-loss-free balancing with sigmoid routers
    beside the recipe's softmax routers and Switch loss."""
    arms = [{"name": "naive", "kind": "naive"},
            {"name": "free", "kind": "naive", "model": {"router_activation": "sigmoid"},
             "train": {"aux_coef": 0.0, "bias_update_rate": 0.01}}]
    _run(tiny, tmp_path / "out", experiment_dict(tiny, arms=arms, budgets=[512],
                                                 eval={"points": 1, "tokens": 64, "train_tokens": 64}))

    def run_config(arm: str) -> dict:
        (path,) = (tmp_path / "out" / "arms" / arm / "seed_0").rglob("config.yaml")
        return yaml.safe_load(path.read_text())

    plain, free = run_config("naive"), run_config("free")
    assert plain["model"] is None and plain["train"]["aux_coef"] == 0.02 and plain["train"]["bias_update_rate"] == 0
    assert free["model"] == {"router_activation": "sigmoid"}
    assert free["train"]["aux_coef"] == 0.0 and free["train"]["bias_update_rate"] == 0.01
    record = json.loads((tmp_path / "out" / "arms" / "free" / "seed_0" / "arm.json").read_text())
    assert record["model"] == {"router_activation": "sigmoid"} and record["train"]["bias_update_rate"] == 0.01
    metrics = read_metrics(next((tmp_path / "out" / "arms" / "free" / "seed_0").rglob("metrics.jsonl")).parent)
    assert any(b != 0 for b in metrics[-1]["expert_load"]["bias_max"])


GROW_ARMS = [{"name": "moe4", "kind": "naive"},
             {"name": "more", "kind": "continue", "from_arm": "moe4"},
             {"name": "grow-r0", "kind": "grow", "from_arm": "moe4", "ratio": 0.0},
             {"name": "grow-r05-top2", "kind": "grow", "from_arm": "moe4", "ratio": 0.5, "top_k": 2}]


def test_grow_and_continue_arms_start_from_another_arms_trained_model_at_the_same_seed(tiny, tmp_path):
    """kind grow: `upcycle grow` of an earlier arm's final model at the same seed (r = 0: the same function, so its
    step-0 loss is that model's loss); kind continue: that model as it is; both then trained for every budget with the
    same recipe and data order. Two seeds, two wsd budgets: each starts from its seed's source, at the end of the
    source's largest budget (the main run's final checkpoint)."""
    config = with_recipe(experiment_dict(tiny, arms=GROW_ARMS, seeds=[0, 1], budgets=[512, 1024],
                                         eval={"points": 1, "tokens": 64, "train_tokens": 64}),
                         schedule={"kind": "wsd", "decay_fraction": 0.5})
    out = tmp_path / "out"
    results = _run(tiny, out, config)
    arms = _arms(results)
    source = arms["moe4"]["seeds"]
    assert source[0]["curve"][-1]["mean"] != pytest.approx(source[1]["curve"][-1]["mean"], abs=1e-4)
    for s in (0, 1):
        final = source[s]["curve"][-1]  # the main run's last step, fp32: the model the others start from
        assert final["tokens"] == 1024
        more, grow_r0, grow_r05 = (arms[name]["seeds"][s]["curve"][0]
                                   for name in ("more", "grow-r0", "grow-r05-top2"))
        assert (more["code"], more["english"]) == (final["code"], final["english"])
        # the kept bf16 model of that budget: the same up to rounding
        assert more["mean"] == pytest.approx(source[s]["budgets"][-1]["mean"], abs=5e-3)
        assert grow_r0["mean"] == pytest.approx(final["mean"], abs=1e-4)
        assert grow_r05["mean"] != pytest.approx(final["mean"], abs=1e-3)
        manifest = json.loads((out / "arms" / "grow-r0" / f"seed_{s}" / "init" / "upcycle_manifest.json").read_text())
        assert manifest["options"]["command"] == "grow" and manifest["function_preserving"] is True
        assert manifest["options"]["seed"] == s
        assert not (out / "arms" / "more" / f"seed_{s}" / "init").exists()
    assert {name: (arms[name]["from_arm"], arms[name]["num_experts"], arms[name]["top_k"])
            for name in ("more", "grow-r0", "grow-r05-top2")} == \
        {"more": ("moe4", 4, 2), "grow-r0": ("moe4", 8, 4), "grow-r05-top2": ("moe4", 8, 2)}
    assert "from_arm" not in arms["moe4"] and "num_experts" not in arms["more"]["seeds"][0]
    # FLOPs from each model's own active parameters: top-2 of 8 uses as many expert parameters per token as top-2 of
    # 4 (the router has 4 more rows of 32 per layer, 2 layers)
    assert arms["grow-r0"]["active_params"] > arms["grow-r05-top2"]["active_params"] == \
        arms["more"]["active_params"] + 2 * 4 * 32
    for name in ("more", "grow-r0"):
        assert [b["flops"] for b in arms[name]["budgets"]] == [6 * arms[name]["active_params"] * t for t in (512, 1024)]
    assert results["same_data_order"] == {"0": True, "1": True}
    assert len(arms["grow-r0"]["seeds"][0]["routing_final"][0]["code"]) == 8  # its own experts
    assert (out / "routing_grow-r0.png").stat().st_size > 0 and (out / "routing_more.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| grow of moe4 to 8 experts, top-4, r=0 (independent) |" in report
    assert "| moe4 trained further (4 experts, top-2) |" in report
    # the kept models re-scored: continue's untrained point is its source's final checkpoint
    rescored = _arms(rescore_experiment(out, tiny["data"], threads=1))
    for name in ("more", "grow-r0"):
        assert rescored[name]["seeds"][1]["curve"][0]["mean"] == arms[name]["seeds"][1]["curve"][0]["mean"]
        assert rescored[name]["budgets"][-1]["loss"] == arms[name]["budgets"][-1]["loss"]
        assert rescored[name]["num_experts"] == arms[name]["num_experts"]


def test_a_grow_run_waits_for_its_source_and_is_not_started_when_the_source_fails(tiny, tmp_path):
    """Without --parallel, a grow run whose source has not run is refused up front, naming what to run first. With
    --parallel 2 the grow run starts only once its source's run has finished; when the source fails, it is not
    started at all."""
    config = experiment_dict(tiny, arms=[{"name": "src", "kind": "naive"},
                                         {"name": "g", "kind": "grow", "from_arm": "src", "ratio": 0.0}],
                             budgets=[256], eval={"points": 1, "tokens": 64, "train_tokens": 64})
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match=r"^g seed 0 starts from arm src seed 0, which has not finished; run it "
                                           r"first \(--only src --seeds 0"):
        _run(tiny, out, config, only=["g"])
    assert not out.exists()

    _run(tiny, out, config, only=[])  # sets OUT up, trains nothing
    (out / "arms" / "src" / "seed_0").mkdir(parents=True)
    (out / "arms" / "src" / "seed_0" / "init").write_text("in the way: convert refuses to replace it")
    with pytest.raises(UpcycleError, match=r"^src seed 0 failed; g seed 0 not started"):
        _run(tiny, out, config, parallel=2)
    assert not (out / "arms" / "g").exists()

    (out / "arms" / "src" / "seed_0" / "init").unlink()
    # two runs at once, yet g's process (which refuses to start before src seed 0's arm.json exists, as above) runs
    # only after src's has finished
    results = _run(tiny, out, config, parallel=2)
    assert "has not finished" not in (out / "arms" / "g" / "seed_0" / "log.txt").read_text()
    assert (out / "arms" / "g" / "seed_0" / "init").stat().st_mtime_ns >= \
        (out / "arms" / "src" / "seed_0" / "arm.json").stat().st_mtime_ns
    arms = _arms(results)
    assert arms["g"]["seeds"][0]["curve"][0]["mean"] == pytest.approx(arms["src"]["seeds"][0]["curve"][-1]["mean"],
                                                                      abs=1e-4)


def test_calibration_text_shared_with_the_validation_split_is_refused_naming_both_files(tiny, tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for name in ("english.train", "english.val", "code.train", "code.val"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(_jsonl(rng, 40)) + "\n")
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("\n".join(_jsonl(rng, 5) + [files["english.val"].read_text().splitlines()[3]]) + "\n")
    data = {"sources": {"english": [str(files["english.train"])], "code": [str(files["code.train"])]},
            "val_sources": {"english": [str(files["english.val"])], "code": [str(files["code.val"])]},
            "seq_len": 32}
    arms = [{"name": "naive", "kind": "naive"},
            {"name": "routed", "kind": "naive", "convert": {"router_init": "data", "calibration": str(calibration)}}]
    out = tmp_path / "out"
    with pytest.raises(UpcycleError) as error:
        _run(tiny, out, experiment_dict(tiny, arms=arms, data=data))
    message = str(error.value)
    assert message.startswith("arms[1] (routed).convert.calibration: ") and "\n" not in message
    assert str(calibration) in message and str(files["english.val"]) in message and "1 document" in message
    assert not out.exists()  # refused before anything was kept


@pytest.mark.parametrize("name", ["replication", "replication-cosine"])
def test_the_committed_study_configs_pass_validation(name, tmp_path):
    """experiments/replication.yaml and its cosine control, on three-domain stand-in data (the corpus is not
    committed): every field valid, the primary comparison and the arms' seeds as the docs describe them."""
    data = make_data_dir(tmp_path / "data")
    metadata = json.loads((data / "data.json").read_text())
    metadata["domains"]["japanese"] = dict(metadata["domains"]["code"])
    (data / "data.json").write_text(json.dumps(metadata))
    from helpers import REPO

    raw = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    raw["data"]["path"] = str(data)
    config = parse_config(raw)
    seeds = {arm.name: config.seeds_of(arm) for arm in config.arms}
    if name == "replication":
        assert config.primary.arms == ["drop-0.5-shared", "drop-0.5"] and config.primary.budget is None
        assert all(seeds[arm] == [1, 2, 3, 4, 5] for arm in ("naive", "drop-0.5-shared", "drop-0.5"))
        assert {arm for arm, s in seeds.items() if s == [1, 2, 3]} == {"dense", "fs", "noise", "drop-0.25",
                                                                      "drop-0.75", "btx"}
        assert {31457280, 62914560, 104857600, 125829120} <= set(config.budgets)
    else:
        assert config.train_template().schedule.kind == "cosine" and config.budgets == [62914560]


def test_the_gpu_pieces_hold_every_run_of_the_study_once_and_at_most_two_runs_each(tmp_path):
    """scripts/gpu_piece.sh's pieces against experiments/replication.yaml and its cosine control: each run (arm,
    seed) of each config in exactly one piece, no piece of the study over 2 runs, every piece in the ledger."""
    from helpers import REPO

    listed = subprocess.run(["bash", str(REPO / "scripts" / "gpu_piece.sh"), "--list"], capture_output=True,
                            text=True, check=True).stdout.split("\n")
    pieces = [line.split("|") for line in listed if line]
    assert [int(number) for number, *_ in pieces] == list(range(1, len(pieces) + 1))
    ledger = (REPO / "docs" / "experiments" / "replication" / "pieces.md").read_text()
    for config_name in ("replication", "replication-cosine"):
        raw = yaml.safe_load((REPO / "experiments" / f"{config_name}.yaml").read_text())
        expected = sorted((arm["name"], seed) for arm in raw["arms"] for seed in arm.get("seeds", raw["seeds"]))
        found = []
        for number, config, arms, seeds in pieces:
            if config == f"experiments/{config_name}.yaml":
                runs = [(arm, int(seed)) for arm in arms.split() for seed in seeds.split()
                        if int(seed) in next(a.get("seeds", raw["seeds"]) for a in raw["arms"] if a["name"] == arm)]
                assert runs and (len(runs) <= 2 or config_name != "replication"), number
                assert f"| {number} |" in ledger, number
                found += runs
        assert sorted(found) == expected, config_name


def test_gpu_piece_sh_runs_pieces_whose_archives_merge_into_the_experiments_report(tiny, tmp_path):
    """scripts/gpu_piece.sh end to end on CPU, with a table of two tiny pieces (naive at seed 0, naive at seed 1): each
    archive holds only the runs' arm.json files, the config, the validation record and piece.json (no model, no
    checkpoint), and the archives, unpacked, merge into the two-seed experiment's report."""
    import tarfile

    from helpers import REPO
    from upcycle.experiment.runner import merge_pieces

    config = experiment_dict(tiny, arms=[{"name": "naive", "kind": "naive"}], seeds=[0, 1], budgets=[256],
                             eval={"points": 1, "tokens": 64, "train_tokens": 64})
    config_path = write_config(tmp_path / "piece.yaml", config)
    table = tmp_path / "pieces.txt"
    table.write_text(f"# number|config|arms|seeds\n1|{config_path}|naive|0\n2|{config_path}|naive|1\n")
    env = {**subprocess_env(), "PIECES_FILE": str(table), "PIECES_DIR": str(tmp_path / "runs"),
           "OUT": str(tmp_path / "back"), "PYTHON": sys.executable}
    unpacked = []
    for number in (1, 2):
        done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_piece.sh"), str(number)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        with tarfile.open(tmp_path / "back" / f"piece-{number}.tar.gz") as archive:
            names = sorted(archive.getnames())
            assert names == sorted(["experiment.yaml", "validation.json", "piece.json", "progress.json",
                                    f"arms/naive/seed_{number - 1}/arm.json"])
            archive.extractall(tmp_path / "unpacked" / f"piece-{number}", filter="data")
        record = json.loads((tmp_path / "unpacked" / f"piece-{number}" / "piece.json").read_text())
        assert record["number"] == number and record["seeds"] == [number - 1] and record["wall_seconds"] >= 0
        progress = json.loads((tmp_path / "unpacked" / f"piece-{number}" / "progress.json").read_text())
        assert progress["done"] and progress["runs"][0]["steps"] == 1 and progress["tokens"] == 256
        assert progress["runs"][0]["evaluations"] >= 1 and 0 < progress["training_seconds"]
        unpacked.append(tmp_path / "unpacked" / f"piece-{number}")
    merged = merge_pieces(unpacked, tmp_path / "merged")
    assert [run["seed"] for run in merged["arms"][0]["seeds"]] == [0, 1]
    assert (tmp_path / "merged" / "report.md").is_file() and (tmp_path / "merged" / "documents.json").is_file()

    # PIECE_SCALE: a rehearsal with every token count halved (same steps), packed under its own name, which --merge
    # refuses beside a real piece
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_piece.sh"), "1"], env={**env, "PIECE_SCALE": "2"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with tarfile.open(tmp_path / "back" / "piece-1-scale-2.tar.gz") as archive:
        archive.extractall(tmp_path / "unpacked" / "rehearsal", filter="data")
    rehearsal = tmp_path / "unpacked" / "rehearsal"
    saved = yaml.safe_load((rehearsal / "experiment.yaml").read_text())
    assert saved["budgets"] == [128] and saved["recipe"]["train"]["global_batch_tokens"] == 128
    assert json.loads((rehearsal / "piece.json").read_text())["scale"] == 2
    arm = json.loads((rehearsal / "arms" / "naive" / "seed_0" / "arm.json").read_text())
    real = json.loads((unpacked[0] / "arms" / "naive" / "seed_0" / "arm.json").read_text())
    assert len(arm["curve"]) == len(real["curve"])  # the same steps and evaluations
    with pytest.raises(UpcycleError, match="another config"):
        merge_pieces([rehearsal, unpacked[1]], tmp_path / "mixed")
    # PIECE_DEADLINE_S: stopped before it ends, the piece exits 3 and leaves its progress, not an archive
    stopped = subprocess.run(["bash", str(REPO / "scripts" / "gpu_piece.sh"), "2"],
                             env={**env, "PIECE_DEADLINE_S": "1", "PIECES_DIR": str(tmp_path / "runs-stopped"),
                                  "OUT": str(tmp_path / "back-stopped")}, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 3 and "stopped at PIECE_DEADLINE_S=1" in stopped.stderr, stopped.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "back-stopped").iterdir()) == ["piece-2-progress.json"]
    assert not json.loads((tmp_path / "back-stopped" / "piece-2-progress.json").read_text())["done"]
    bad = subprocess.run(["bash", str(REPO / "scripts" / "gpu_piece.sh"), "1"], env={**env, "PIECE_SCALE": "3"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not divisible by PIECE_SCALE=3" in bad.stderr


def test_every_config_field_is_in_the_help_and_the_docs():
    from helpers import REPO
    from upcycle.config import config_fields
    from upcycle.experiment.config import (ArmSpec, DataSection, EvalSection, ExperimentConfig, MoESection,
                                           PrimarySection, config_help)

    docs = (REPO / "docs" / "experiments.md").read_text()
    help_text = config_help()
    for prefix, cls in (("", ExperimentConfig), ("data.", DataSection), ("moe.", MoESection), ("eval.", EvalSection),
                        ("primary.", PrimarySection), ("", ArmSpec)):
        for f in config_fields(cls):  # the fields a file sets (not the derived domains, nor data.seed)
            assert f"{f.name}:" in help_text, f.name
            if f.name not in ("data", "moe", "eval", "primary"):  # sections: their fields are the docs' rows
                assert f"`{prefix}{f.name}`" in docs, f"{prefix}{f.name}"


@pytest.mark.parametrize("flags, message", [
    (["--rescore", "--out", "x"], "--rescore needs --data DIR"),
    (["--rescore", "--data", "d", "--config", "c.yaml", "--out", "x"], "--rescore re-measures the experiment"),
    (["--data", "d", "--config", "c.yaml", "--out", "x"], "--data is only used with --rescore"),
    (["--out", "x"], "give --config FILE"),
    (["--recompute", "--config", "c.yaml", "--out", "x"], "--recompute rebuilds what OUT recorded"),
    (["--merge", "a", "b", "--parallel", "2", "--out", "x"], "--merge gathers what the pieces recorded"),
    (["--recompute", "--merge", "a", "--out", "x"], "--recompute and --merge are different jobs"),
    (["--recompute", "--out", "/nonexistent"], "--recompute: /nonexistent has no results.json"),
])
def test_cli_flag_combinations_are_refused_in_one_line(flags, message, capsys):
    from helpers import assert_one_line_error, run_cli

    assert_one_line_error(*run_cli(capsys, "experiment", *flags), message)


def test_the_report_config_and_statistics_never_import_the_runner():
    """experiment/runner.py imports experiment/config.py, stats.py and report.py; none of them imports it back
    (the old experiment <-> experiment_report cycle)."""
    import ast

    from helpers import REPO

    for name in ("config", "stats", "report"):
        tree = ast.parse((REPO / "src" / "upcycle" / "experiment" / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
            {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "upcycle.experiment.runner" not in imported, name
