"""scripts/piece_progress.py: how far a piece of the study has got, from its runs' files."""

import importlib.util
import json

from helpers import REPO


def _load():
    spec = importlib.util.spec_from_file_location("piece_progress", REPO / "scripts" / "piece_progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(step: int, lr: float) -> dict:
    return {"step": step, "loss": 5.0 - step / 10, "lr": lr, "tokens": 512 * step, "tokens_per_s": 1000.0 + step,
            "step_time_s": 0.5}


def test_a_branch_counts_its_own_steps_not_the_stable_runs_history_it_copied(tmp_path):
    unit = tmp_path / "arms" / "naive" / "seed_1"
    (unit / "run").mkdir(parents=True)
    (unit / "budgets" / "2048" / "run").mkdir(parents=True)
    (unit / "measure").mkdir()
    stable = [_record(step, 1e-3) for step in range(1, 7)]
    (unit / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stable) + '{"step": 7, "lo')
    branch = stable[:3] + [_record(4, 5e-4)]  # forked after step 3, then one decay step of its own
    (unit / "budgets" / "2048" / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in branch))
    for step in (0, 3):
        (unit / "measure" / f"step_{step:08d}.json").write_text("{}")
    record = _load().progress(tmp_path, elapsed_s=10.0)
    run = record["runs"][0]
    assert (run["arm"], run["seed"], run["done"]) == ("naive", 1, False)
    assert run["steps"] == 7 and run["tokens"] == 7 * 512 and run["training_seconds"] == 3.5  # 6 stable + 1 decay
    assert run["evaluations"] == 2 and run["median_tokens_per_s"] == 1004
    assert not record["done"] and record["elapsed_seconds"] == 10.0 and record["tokens"] == 7 * 512
