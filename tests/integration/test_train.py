"""The trainer end to end on a tiny MoE: config validation, LR schedule, metrics, NaN handling, SIGTERM, online
upcycling. Resume exactness is in test_resume.py, multi-process runs in test_distributed.py."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import make_data_dir, read_metrics, run_cli, subprocess_env, tiny_config, train_cli, write_config
from upcycle.train import checkpoint as ckpt
from upcycle.train import losses
from upcycle.commands import train_command
from upcycle.errors import UpcycleError
from upcycle.train.schedule import lr_at
from upcycle.train.trainer import NonFiniteLoss, run_training
from upcycle.train.config import config_from_dict, load_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


# -- learning-rate schedule --------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_from_min_then_cosine_decays_to_min():
    kw = dict(lr=2e-4, min_lr=2e-5, warmup_steps=10, decay_steps=110, warmup_start_lr=2e-5)
    lrs = [lr_at(s, **kw) for s in range(130)]
    assert lrs[0] == 2e-5  # the paper starts warmup at the minimum LR
    assert lrs[5] == pytest.approx(2e-5 + 0.5 * (2e-4 - 2e-5))  # linear halfway
    assert lrs[10] == pytest.approx(2e-4)  # peak right after warmup
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))  # strictly decreasing cosine
    assert lrs[60] == pytest.approx((2e-4 + 2e-5) / 2)  # cosine midpoint
    assert lrs[110:] == [2e-5] * 20  # flat at the minimum after decay_steps
    assert lr_at(0, **{**kw, "warmup_start_lr": 0.0}) == 0.0


# -- config validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("train.precision=fp16", "train.precision"),
    ("train.global_batch_tokens=100", "train.global_batch_tokens"),
    ("init.method=drop", "init.method"),
    ("optim.min_lr=1.0", "optim.min_lr"),
    ("train.max_steps=ten", "train.max_steps"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
    # NaN compares false with every bound, so range checks let it through; Inf passes `> 0` (issue 18)
    ("optim.grad_clip=.nan", "optim.grad_clip must be a finite number"),
    ("optim.eps=.nan", "optim.eps must be a finite number"),
    ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number"),
    ("optim.lr=.inf", "optim.lr must be a finite number"),
    ("train.aux_coef=.nan", "train.aux_coef must be a finite number"),
    ("schedule.warmup_start_lr=.nan", "schedule.warmup_start_lr must be a finite number"),
    ("data.weights={code: .nan, english: 1.0}", "data.weights.code must be a finite number"),
    ("model.norm_eps=.inf", "model.norm_eps must be a finite number"),
    ("init.noise_std=.nan", "init.noise_std must be a finite number"),
    # values of the wrong shape: one line naming the field, not a TypeError from deep inside
    ("optim.betas=ab", "optim.betas must be a list of 2 finite numbers"),
    ("optim.betas=[[0.9], 0.95]", "optim.betas[0] must be a finite number"),
    ("data.weights=[1, 2]", "data.weights must be a mapping"),
    # the one weight check (data.check_weights), at config time rather than when the loader starts
    ("data.weights={code: -1, english: 1}", "data.weights must be finite numbers >= 0, got {'code': -1.0, "),
    ("data.weights={code: 0, english: 0.0}", "data.weights: every weight is 0; give at least one domain a positive"),
    ("model.rope_scaling=[1]", "model.rope_scaling must be a mapping"),
    ("model.dim=-4", "dim must be at least 1"),
    ("model.moe_layers=[a]", "model.moe_layers[0] must be an integer"),
])
def test_bad_config_field_is_named_before_any_work(tmp_path, data_dir, override, field):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir))
    with pytest.raises(UpcycleError, match=re.escape(field)):
        load_config(config, [override])


def test_sources_of_the_wrong_type_are_named(tmp_path, data_dir):
    values = tiny_config(data_dir)
    values["data"] = {"sources": {"english": [1, 2]}, "tokenizer": str(tmp_path), "seq_len": 32}
    with pytest.raises(UpcycleError, match=re.escape("data.sources.english[0] must be a string, got 1")):
        config_from_dict(values).validate()
    values["data"]["sources"] = 5
    with pytest.raises(UpcycleError, match=re.escape("data.sources must be a mapping")):
        config_from_dict(values)
    values["data"]["sources"] = {"english": ["/dev/null"]}  # it exists, yet holds no text: not "does not exist"
    with pytest.raises(UpcycleError, match="data.sources.english: /dev/null is a character device"):
        config_from_dict(values).validate()


def test_a_nan_domain_weight_is_refused_by_the_loader_too(data_dir):
    """Before, `w < 0` let NaN through and `w > 0` then left the domain out: the stream was that of the other domain."""
    from upcycle.data.prepare import MixtureLoader

    with pytest.raises(UpcycleError, match="finite numbers >= 0"):
        MixtureLoader(data_dir, seq_len=32, global_batch_size=4, weights={"code": math.nan, "english": 1.0})


def _cli(capsys, config: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`upcycle train --config CONFIG --out OUT ...` in this process: (exit status, stderr)."""
    return run_cli(capsys, "train", "--config", str(config), "--out", str(out), *extra)


def test_cli_rejects_bad_field_before_creating_out_and_accepts_dotted_overrides(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir))
    code, err = _cli(capsys, config, tmp_path / "bad", "--train.precision", "fp16")
    assert code == 2 and "train.precision" in err
    assert not (tmp_path / "bad").exists()
    code, err = _cli(capsys, config, tmp_path / "bad2", "--optim.lrr", "1")
    assert code != 0 and "optim.lrr" in err
    assert not (tmp_path / "bad2").exists()

    code, err = _cli(capsys, config, tmp_path / "ok", "--optim.lr", "1e-3", "--max-steps", "2", "--save-every", "1")
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["train"]["max_steps"] == 2 and saved["checkpoint"]["every"] == 1
    assert [r["step"] for r in read_metrics(tmp_path / "ok")] == [1, 2]
    assert read_metrics(tmp_path / "ok")[-1]["lr"] == lr_at(1, lr=1e-3, min_lr=3e-4, warmup_steps=2,
                                                            decay_steps=2, warmup_start_lr=3e-4)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path / "ok" / "checkpoints")] == [1, 2]


def test_model_section_conflicts_with_init_source(tmp_path, data_dir, llama_dir):
    values = tiny_config(data_dir, init={"source": str(llama_dir)})
    with pytest.raises(UpcycleError, match="model"):
        run_training(config_from_dict(values), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- a whole run -------------------------------------------------------------------------------------------------------


def test_run_logs_metrics_validation_and_loadable_checkpoints(tmp_path, data_dir):
    from upcycle.model.hf import load_model

    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 12}))
    train_command(config=str(config), out=str(out))
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[-1]["tokens"] == 12 * 256
    assert records[-1]["ce"] < records[0]["ce"] - 0.3  # it learns the synthetic rule
    for r in records:
        assert r["loss"] == pytest.approx(r["ce"] + 0.02 * r["aux"], rel=1e-6)
        load = r["expert_load"]
        assert len(load["max_share"]) == 2 and all(0.25 <= m <= 1 for m in load["max_share"])
        assert all(0 <= m <= 0.25 for m in load["min_share"])
    assert [r["step"] for r in records if "val" in r] == [4, 8, 12]
    assert set(records[3]["val"]) == {"code", "english"}
    assert records[-1]["val"]["code"] < records[3]["val"]["code"]

    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert [step for step, _ in kept] == [8, 12]  # keep: 2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    model = load_model(kept[-1][1])  # a checkpoint is our model format (what `upcycle export` reads)
    assert model.config.num_experts == 4 and model.config.num_layers == 2
    state = json.loads((kept[-1][1] / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["data"]["step"] == 12 and state["tokens"] == 12 * 256

    # Re-running the finished command is a no-op, not a second run.
    train_command(config=str(config), out=str(out))
    assert len(read_metrics(out)) == 12


def test_out_must_be_a_run_directory(tmp_path, data_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(data_dir)))
    with pytest.raises(UpcycleError, match="not a training directory"):
        run_training(config, tmp_path / "out")


def test_resume_refuses_a_different_model(tmp_path, data_dir):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 4}))
    run_training(load_config(config), tmp_path / "out")
    with pytest.raises(UpcycleError, match="model.dim"):
        run_training(load_config(config, ["model.dim=64"]), tmp_path / "out")


# -- divergence --------------------------------------------------------------------------------------------------------


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "run"
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(data_dir)))
    real_ce = losses.cross_entropy
    calls = {"train": 0}

    def poisoned_ce(**kwargs):
        value = real_ce(**kwargs)
        if torch.is_grad_enabled():  # training forwards only; validation runs under no_grad
            calls["train"] += 1
            if calls["train"] > 5 * 4:  # 4 micro-batches per step: step 6 goes NaN
                return value * float("nan")
        return value

    monkeypatch.setattr(losses, "cross_entropy", poisoned_ce)
    with pytest.raises(NonFiniteLoss, match=r"step 6.*step_00000004"):
        run_training(config, out)
    assert [step for step, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]

    monkeypatch.setattr(losses, "cross_entropy", real_ce)
    assert run_training(config, out)["step"] == 8  # re-running resumes from the good checkpoint and finishes
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))


def test_nan_exits_non_zero_from_the_command_line(tmp_path, data_dir, capsys):
    # A learning rate of 1e30 without clipping blows the weights up to inf on the first update.
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data_dir, optim={"lr": 1e30, "min_lr": 1e30, "grad_clip": 0.0}, checkpoint={"every": 1}))
    code, err = _cli(capsys, config, tmp_path / "run")
    assert code != 0
    assert "non-finite" in err and "Last good checkpoint" in err
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert kept and all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


# -- SIGTERM -----------------------------------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data_dir, train={"max_steps": 10_000, "eval_every": 0}, checkpoint={"every": 0}))
    process = subprocess.Popen(train_cli(config, out), env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out, 3, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "SIGTERM" in stderr
    last_logged = read_metrics(out)[-1]["step"]
    assert 3 <= last_logged < 10_000
    assert [step for step, _ in ckpt.list_checkpoints(out / "checkpoints")] == [last_logged]


def _wait_for_steps(out: Path, steps: int, process: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file():
            count = metrics.read_text().count("\n")
            if count >= steps:
                return count
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early: {process.communicate()[1]}")
        time.sleep(0.005)
    raise AssertionError("trainer did not reach the expected step in time")


# -- initialisation from checkpoints -----------------------------------------------------------------------------------


def test_init_renormalize_reaches_the_online_upcycled_model(tmp_path, data_dir, llama_dir):
    from upcycle.train.distributed import World
    from upcycle.train.trainer import start_point

    values = tiny_config(data_dir, model=None, init={"source": str(llama_dir), "method": "naive", "num_experts": 4,
                                                     "top_k": 2, "format": "qwen2_moe", "renormalize": False})
    config = config_from_dict(values)
    config.validate()
    one = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert start_point(config, one, resume_model_config=None).model_config.renormalize is False
    values["init"]["format"] = "auto"  # mixtral for a Llama source: it always renormalizes; refused before any work
    with pytest.raises(UpcycleError, match="init.renormalize: false does not fit it; use init.format qwen2_moe"):
        config_from_dict(values).validate()


def test_online_naive_upcycling_starts_at_the_dense_loss(tmp_path, data_dir, llama_dir):
    def first_ce(name: str, init: dict) -> float:
        values = tiny_config(data_dir, model=None, init=init, train={"max_steps": 1, "eval_every": 0})
        run_training(config_from_dict(values), tmp_path / name)
        return read_metrics(tmp_path / name)[0]["ce"]

    dense = first_ce("dense", {"source": str(llama_dir)})
    naive = first_ce("naive", {"source": str(llama_dir), "method": "naive", "num_experts": 4, "top_k": 2})
    drop = first_ce("drop", {"source": str(llama_dir), "method": "drop", "ratio": 1.0, "num_experts": 4,
                             "top_k": 2})
    assert naive == pytest.approx(dense, rel=1e-6, abs=1e-6)
    assert abs(drop - dense) > 1e-3  # re-drawn experts do change the function: the comparison can fail
    moe = json.loads((ckpt.latest_checkpoint(tmp_path / "naive" / "checkpoints") / "config.json").read_text())
    assert moe["model"]["num_experts"] == 4 and moe["model"]["top_k"] == 2


def test_raw_sources_are_tokenized_into_out_once(tmp_path):
    import gzip

    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(90)} | {"</s>": 90, "[UNK]": 91},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))

    rng = torch.Generator().manual_seed(0)
    for name, step in (("english", 3), ("code", 7)):
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt") as handle:
            for _ in range(60):
                start = int(torch.randint(0, 90, (1,), generator=rng))
                words = " ".join(f"w{(start + step * i) % 90}" for i in range(50))
                handle.write(json.dumps({"text": words}) + "\n")
    values = tiny_config(tmp_path, train={"max_steps": 2, "eval_every": 2}, checkpoint={"every": 1})
    values["model"]["vocab_size"] = 96
    values["data"] = {"sources": {"english": [str(tmp_path / "english.jsonl.gz")],
                                  "code": [str(tmp_path / "code.jsonl.gz")]},
                      "tokenizer": str(tmp_path / "tok"), "val_fraction": 0.1, "seq_len": 32}
    out = tmp_path / "run"
    run_training(config_from_dict(values), out)
    metadata = json.loads((out / "data" / "data.json").read_text())
    assert set(metadata["domains"]) == {"english", "code"} and metadata["domains"]["code"]["val"]["documents"] == 6
    assert set(read_metrics(out)[-1]["val"]) == {"english", "code"}
    prepared_at = (out / "data" / "data.json").stat().st_mtime_ns
    values["train"]["max_steps"] = 3
    run_training(config_from_dict(values), out)  # resumes; the data is not tokenized again
    assert (out / "data" / "data.json").stat().st_mtime_ns == prepared_at
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


# -- structure: entry points and the loop's parts ----------------------------------------------------------------------


def test_one_entry_point_and_train_does_not_import_the_cli():
    import sys

    code = ("import sys, upcycle.train.trainer; assert not {'upcycle.cli', 'upcycle.commands'} & set(sys.modules), "
            "'train imports the CLI'")
    subprocess.run([sys.executable, "-c", code], env=subprocess_env(), check=True)
    shown = subprocess.run([sys.executable, "-m", "upcycle", "train", "--help"], env=subprocess_env(),
                           capture_output=True, text=True, check=True).stdout
    assert "--train.precision" in shown and "--init.index_mode" in shown


def test_train_step_returns_a_record_and_run_training_a_summary(tmp_path, data_dir):
    from upcycle.train.distributed import init_distributed
    from upcycle.train.trainer import StepRecord, _StopRequest, setup, train_step

    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 2})))
    run = setup(config, tmp_path / "steps", init_distributed())
    record = train_step(run, 0, stop=_StopRequest())
    assert isinstance(record, StepRecord) and record.step == 1 and record.tokens == 256
    assert math.isfinite(record.loss) and len(record.expert_load["max_share"]) == 2
    assert record.to_json()["data_sha256"] == run.data_sha256

    summary = run_training(config, tmp_path / "run")
    assert summary["step"] == 2 and summary["stopped"] == "max_steps"
    assert summary["checkpoint"].endswith("step_00000002")


# -- precision: auto ---------------------------------------------------------------------------------------------------


NO_BF16, BF16 = frozenset({"avx2"}), frozenset({"avx2", "avx512_bf16"})


@pytest.mark.parametrize("flags, speedup, requested, resolved, warned", [
    (NO_BF16, None, "auto", "fp32", None),  # no native bf16: fp32 without probing
    (BF16, 2.0, "auto", "bf16", None),
    (BF16, 0.7, "auto", "fp32", None),  # a bf16 flag, but bf16 measured slower (issue 19)
    (NO_BF16, None, "bf16", "bf16", "warning: precision bf16 on a CPU without native bf16"),
    (BF16, 3.0, "fp32", "fp32", "warning: precision fp32 trains 3.0x slower than bf16"),
    (BF16, 0.5, "bf16", "bf16", "warning: precision bf16 trains 2.0x slower than fp32"),
    (BF16, 1.0, "fp32", "fp32", None),  # explicit and not slower: nothing to say
])
def test_precision_is_decided_once_logged_with_the_reason_and_recorded(tmp_path, data_dir, monkeypatch, capsys, flags,
                                                                       speedup, requested, resolved, warned):
    from upcycle import hardware

    calls = []

    def measure(dim, ffn_dim, rows):  # injected timings: bf16 `speedup` times as fast as fp32 (100 GFLOP/s)
        calls.append((dim, ffn_dim))
        flops = 18 * rows * dim * ffn_dim / 1e9
        return {"matmul_fp32": flops / 100, "matmul_bf16": flops / 100, "swiglu_fp32": flops / 100,
                "swiglu_bf16": flops / (100 * speedup)}

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cpu_info", lambda: ("test CPU", flags))
    monkeypatch.setattr(hardware, "measure_seconds", measure)
    values = tiny_config(data_dir, train={"max_steps": 2, "eval_every": 0, "precision": requested})
    if requested == "auto":
        del values["train"]["precision"]  # the default
    run_training(config_from_dict(values), tmp_path / "run")
    err = capsys.readouterr().err
    assert calls == ([] if speedup is None else [(32, 48)])  # the model's width, probed once
    lines = [line for line in err.splitlines() if line.startswith(f"upcycle train: precision {resolved} ")]
    if requested != "auto" and not warned:
        assert lines == []  # as configured: the start-up log stays quiet
    else:
        [line] = lines
        assert line.startswith(f"upcycle train: precision {resolved} ({requested}): ")
    if requested == "auto" and speedup is not None:
        assert f"auto picked {resolved}: " in line and "100 GFLOP/s in fp32 and " in line
    assert err.count("upcycle train: warning: precision") == (1 if warned else 0)
    if warned:
        assert f"upcycle train: {warned}" in err
    assert [r["precision"] for r in read_metrics(tmp_path / "run")] == [resolved] * 2
    assert config_from_dict(values).train.precision == requested


# -- micro-batch size: auto from the world size -----------------------------------------------------------------------


def test_auto_micro_batch_is_the_largest_divisor_of_the_per_rank_rows_up_to_the_cap():
    from upcycle.train.config import AUTO_MICRO_BATCH_MAX, micro_batch_size_for

    assert micro_batch_size_for(8, None) == 8 and micro_batch_size_for(4, None) == 4
    assert micro_batch_size_for(12, None) == 6 and micro_batch_size_for(7, None) == 7
    assert micro_batch_size_for(64, None) == AUTO_MICRO_BATCH_MAX and micro_batch_size_for(11, None) == 1
    assert micro_batch_size_for(8, 2) == 2


def test_a_pinned_micro_batch_that_does_not_split_over_the_ranks_is_refused_before_anything_is_written(tmp_path,
                                                                                                       data_dir):
    from upcycle.train.distributed import World
    from upcycle.train.trainer import resolve_loop

    two = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(data_dir)), ["train.micro_batch_size=8"])
    with pytest.raises(UpcycleError, match="micro_batch_size 8 does not divide the 4 sequences.*null: auto"):
        resolve_loop(config, two)
    auto = load_config(write_config(tmp_path / "c.yaml", tiny_config(data_dir)), ["train.micro_batch_size=null"])
    assert resolve_loop(auto, two).micro_batch_size == 4
    with pytest.raises(UpcycleError, match="3 ranks cannot share"):
        resolve_loop(auto, World(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")))
