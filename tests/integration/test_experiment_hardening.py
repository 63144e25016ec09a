"""Issue 18's experiment defects, each reproduced: the YAML alias bomb (in the config and in OUT/experiment.yaml), the
`--only` race on a fresh OUT, checks that fired after work had started, tracebacks instead of one-line errors, arm
names that broke `--parallel`, a resumed `--parallel` run training its last arm with every thread, and an ENOSPC
message without the path."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import make_data_dir, save_dense, subprocess_env, tiny_experiment, write_config, write_tokenizer
from upcycle.errors import UpcycleError
from upcycle.experiment.runner import run_experiment
from upcycle.experiment.config import config_record, load_experiment, parse_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hardening")
    seed = save_dense(root / "seed", "llama")
    write_tokenizer(seed, eos=True)
    return {"root": root, "seed": seed, "data": make_data_dir(root / "data")}


def config_of(tiny: dict, **changes) -> dict:
    return tiny_experiment(tiny["seed"], tiny["data"], **changes)


def bomb(levels: int, width: int = 10) -> str:
    """A "billion laughs" YAML value: a flow list of `levels` + 1 anchors, each a list of `width` aliases of the one
    before, so the last expands to width ** levels items (a few hundred bytes of YAML)."""
    items = ["&a0 [lol]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


def cli(config: Path, out: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "upcycle", "experiment", "--config", str(config), "--out", str(out),
                           *extra], env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# YAML aliases


def test_an_alias_bomb_in_the_config_is_refused_in_one_short_line(tiny, tmp_path):
    """Before: plain yaml.safe_load expanded it, and the error repr()'d the expansion (a 286-byte file printed
    351 MB)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(config_of(tiny)).replace("seeds:\n- 0", "seeds: " + bomb(6)))
    started = time.perf_counter()
    with pytest.raises(UpcycleError) as error:
        load_experiment(path)
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert len(message) < 300 and "\n" not in message, message[:300]
    assert "alias" in message


def test_an_alias_bomb_in_out_experiment_yaml_is_refused_when_read_back(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "experiment.yaml").write_text(yaml.safe_dump(config_record(parse_config(config_of(tiny))))
                                         .replace("seeds:\n- 0", "seeds: " + bomb(6)))
    config = config_of(tiny)
    with pytest.raises(UpcycleError) as error:
        run_experiment(parse_config(config), out, config_path=str(write_config(tmp_path / "c.yaml", config)),
                       threads=1)
    message = str(error.value)
    assert len(message) < 400 and "alias" in message and str(out / "experiment.yaml") in message, message[:400]


def test_a_top_level_list_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- seed_model: x\n")
    with pytest.raises(UpcycleError, match="mapping"):
        load_experiment(path)


# ---------------------------------------------------------------------------------------------------------------------
# Everything is checked before any work


def _with(config: dict, dotted: str, value) -> dict:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return config


LATE = [  # (change, the field the one-line error starts with)
    (lambda c, t: c.update(arms=[{"name": "a" * 300, "kind": "naive"}]), "arms[0].name"),
    (lambda c, t: c.update(arms=[{"name": "-x", "kind": "naive"}]), "arms[0].name"),
    (lambda c, t: c.update(data={"sources": {"en/../x": [str(t["text"])]}, "tokenizer": str(t["seed"]),
                                 "seq_len": 32}), "data.sources"),
    (lambda c, t: c.update(data={"sources": {"english": ["/dev/null"]}, "tokenizer": str(t["seed"]),
                                 "seq_len": 32}), "data.sources.english"),
    (lambda c, t: c.update(arms=[{"name": "a", "kind": "naive", "convert": {"moe_layers": "0-99"}}]),
     "arms[0] (a).convert"),
    (lambda c, t: c.update(arms=[{"name": "a", "kind": "naive",
                                  "convert": {"granularity": 2, "shared_expert": "dense"}}]), "arms[0] (a).convert"),
    (lambda c, t: _with(c, "data.weights", {"code": 0.0, "english": 0.0}), "data.weights"),
    (lambda c, t: _with(c, "data.weights", {"code": float("nan"), "english": 1.0}), "data.weights"),
    (lambda c, t: _with(c, "recipe.train.expert_parallel", 2), "recipe.train.expert_parallel"),
    (lambda c, t: c.update(moe={"num_experts": 10 ** 6, "top_k": 2}), "moe.num_experts"),
    (lambda c, t: c.update(seeds=[2 ** 70]), "seeds"),
    (lambda c, t: c.update(arms=[{"name": "a", "kind": "naive", "convert": {"granularity": 2.0}}]),
     "arms[0] (a).convert.granularity"),
    (lambda c, t: c.update(arms=[{"name": "a", "kind": "naive", "convert": {"moe_layers": 5}}]),
     "arms[0] (a).convert.moe_layers"),
    (lambda c, t: c.update(arms=[{"name": "a", "kind": "naive", "convert": {"calibration": 5}}]),
     "arms[0] (a).convert.calibration"),
]


@pytest.mark.parametrize("change, field", LATE, ids=[f"{i}-{f}" for i, (_, f) in enumerate(LATE)])
def test_every_check_fires_before_any_work_with_one_line(tiny, tmp_path, change, field):
    """Before: these passed validation and failed (some with a traceback) after experiment.yaml was written, so the
    corrected config was then refused as a "different config"."""
    text = tmp_path / "text.txt"
    text.write_text("w1 w2 w3\n")
    config = config_of(tiny)
    change(config, {**tiny, "text": text})
    with pytest.raises(UpcycleError) as error:
        parse_config(config)
    message = str(error.value)
    assert message.startswith(field), message[:300]
    assert "\n" not in message and len(message) < 400, message[:400]


def test_sources_inside_out_are_refused_before_anything_is_written(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "english.txt").write_text("w1 w2 w3 w4\n" * 50)
    config = config_of(tiny, data={"sources": {"english": [str(out)]}, "tokenizer": str(tiny["seed"]),
                                   "seq_len": 8})
    with pytest.raises(UpcycleError, match="^data.sources.english: .*--out"):
        run_experiment(parse_config(config), out, config_path="x.yaml", threads=1)
    assert sorted(p.name for p in out.iterdir()) == ["english.txt"]


def test_eval_points_far_beyond_the_steps_allocate_nothing(tiny):
    from upcycle.experiment.config import eval_steps

    assert eval_steps(10 ** 9, 4, 256) == [1, 2, 3, 4]


def test_data_whose_token_files_exceed_the_seeds_vocabulary_is_refused_by_the_shared_check(tiny, tmp_path):
    """The one "data fits the model" check (data.check_data_fits) scans the token files too, not only data.json."""
    import numpy as np

    data = make_data_dir(tmp_path / "data")
    tokens = np.fromfile(data / "code.val.bin", dtype=np.uint16)
    tokens[5] = 200  # beyond the seed's 96 ids, while data.json still says 64
    tokens.tofile(data / "code.val.bin")
    with pytest.raises(UpcycleError, match=r"code\.val\.bin holds token id 200"):
        parse_config(tiny_experiment(tiny["seed"], data))


# ---------------------------------------------------------------------------------------------------------------------
# Concurrency: the --only race, and --parallel


def _waiting_for_lock(pid: int, path: Path) -> bool:
    """Whether process `pid` is blocked on the flock of `path` ("N: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ..." in
    /proc/locks)."""
    inode = str(path.stat().st_ino)
    return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid)
               and line.split()[6].split(":")[-1] == inode
               for line in Path("/proc/locks").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux /proc/locks")
def test_only_runs_of_two_configs_on_a_fresh_out_cannot_both_proceed(tiny, tmp_path):
    """Two `--only` runs of different configs start on a fresh OUT: both pass the early check. The second must
    compare the configs again inside the setup lock and refuse, not overwrite the first one's experiment.yaml."""
    out = tmp_path / "out"
    out.mkdir()
    first, second = config_of(tiny), config_of(tiny, seeds=[7])
    lock = open(out / ".setup.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # the first run is inside its set-up
    process = subprocess.Popen([sys.executable, "-m", "upcycle", "experiment", "--config",
                                str(write_config(tmp_path / "second.yaml", second)), "--out", str(out),
                                "--only", "naive", "--threads", "1"],
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not _waiting_for_lock(process.pid, out / ".setup.lock"):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "the second run never waited for the set-up lock"
            time.sleep(0.05)
        # what the first run's set-up writes, then it leaves the lock
        (out / "experiment.yaml").write_text(yaml.safe_dump(config_record(parse_config(first)), sort_keys=False))
    finally:
        lock.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "different config (first difference: seed" in stderr, stderr
    assert yaml.safe_load((out / "experiment.yaml").read_text())["seeds"] == [0]


def test_a_resumed_parallel_run_trains_its_last_arm_with_its_share_of_threads(tiny, tmp_path):
    """Before: with one arm left, `--parallel 2 --threads 2` trained it in-process with 2 threads, so it was not
    bit-identical to the uninterrupted run (whose arms each had 1 thread in their own process)."""
    config = config_of(tiny, arms=[{"name": "a", "kind": "naive"}, {"name": "b", "kind": "naive"}],
                       budgets=[2 * 256], eval={"points": 1, "tokens": 64, "train_tokens": 64})
    path = write_config(tmp_path / "c.yaml", config)
    out = tmp_path / "out"
    run_experiment(parse_config(config), out, config_path=str(path), threads=1, only=["a"])
    run_experiment(parse_config(config), out, config_path=str(path), threads=2, parallel=2)
    assert (out / "arms" / "b" / "seed_0" / "log.txt").is_file()  # trained in a child process
    results = json.loads((out / "results.json").read_text())
    assert {arm["name"]: arm["seeds"][0]["threads"] for arm in results["arms"]} == {"a": 1, "b": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Messages


def test_enospc_while_writing_the_report_names_the_file(tiny, tmp_path):
    """A real ENOSPC: the report's temporary file is made a link to /dev/full, where every write fails with ENOSPC
    (and write() names no file). The one-line message must still name the report."""
    from upcycle.cli import os_error_line

    config = config_of(tiny, budgets=[256], eval={"points": 1, "tokens": 64, "train_tokens": 64})
    out = tmp_path / "out"
    path = write_config(tmp_path / "c.yaml", config)
    run_experiment(parse_config(config), out, config_path=str(path), threads=1)
    (out / "report.md").unlink()
    (out / f".report.md.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError) as error:
        run_experiment(parse_config(config), out, config_path=str(path), threads=1)
    assert error.value.errno == errno.ENOSPC
    assert "report.md" in os_error_line(error.value), os_error_line(error.value)
