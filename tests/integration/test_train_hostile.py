"""Hostile inputs and faults in training: YAML bombs, refused runs that must leave --out untouched, divergence that must
not take the last healthy checkpoint with it, token ids the model cannot embed, truncated checkpoints."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, VOCAB, make_data_dir, read_metrics, run_cli, tiny_config, write_config
from upcycle.train import checkpoint as ckpt
from upcycle.errors import UpcycleError
from upcycle.train.trainer import NonFiniteLoss, run_training
from upcycle.train.config import load_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"))


def _bomb(levels: int) -> str:
    lines = ["a0: &a0 [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}]" for i in range(1, levels)]
    return "\n".join(f"    {line}" for line in lines)


def test_a_yaml_bomb_is_refused_before_it_expands(tmp_path, data_dir, capsys):
    base = write_config(tmp_path / "base.yaml", tiny_config(data_dir)).read_text()
    small = tmp_path / "small.yaml"
    small.write_text(base.replace("  seq_len: 32", "  seq_len: 32\n  weights:\n" + _bomb(3)))
    with pytest.raises(UpcycleError, match=r"line \d+: YAML aliases \(\*a0\) are not accepted"):
        load_config(small)
    huge = tmp_path / "huge.yaml"  # 9^12 floats once expanded
    huge.write_text(base.replace("  seq_len: 32", "  seq_len: 32\n  weights:\n" + _bomb(12)))
    code, err = run_cli(capsys, "train", "--config", str(huge), "--out", str(tmp_path / "out"))
    assert code == 2 and "YAML aliases" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    code, err = run_cli(capsys, "train", "--config", str(write_config(tmp_path / "ok.yaml", tiny_config(data_dir))),
                    "--out", str(tmp_path / "out"), "--data.weights", "&w {code: 1.0, english: *w}")
    assert code == 2 and "YAML aliases" in err


def test_a_top_level_list_is_one_line_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- model\n- data\n")
    code, err = run_cli(capsys, "train", "--config", str(config), "--out", str(tmp_path / "out"),
                        "--train.max_steps", "2")
    assert code == 2 and "must be a YAML mapping" in err and "not a list" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_run_refused_by_the_data_check_creates_nothing_and_the_corrected_rerun_works(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 2}))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", "--config", str(config), "--out", str(out), "--model.vocab_size", "10")
    assert code == 2 and "vocab" in err
    assert not out.exists()
    code, err = run_cli(capsys, "train", "--config", str(config), "--out", str(out))
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_a_model_too_large_to_allocate_is_one_line_naming_upcycle_plan(tmp_path, data_dir, capsys):
    """Ten billion experts: the first allocation fails (2.6 TB for the routers alone), and the allocator's traceback
    becomes one line that names how to size the run; OUT is left as it was (not created)."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 2}))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", "--config", str(config), "--out", str(out), "--model.num_experts",
                        "10000000000")
    assert code == 2 and "ran out of memory building the model" in err and "upcycle plan" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out.exists()


def test_raw_sources_with_a_larger_tokenizer_are_refused_before_tokenizing(tmp_path, capsys):
    values = tiny_config(tmp_path, train={"max_steps": 2})
    values["data"] = {"sources": {"english": [str(REPO / "data/sample/english.train.jsonl.gz")]},
                      "tokenizer": str(REPO / "assets/tokenizer"), "seq_len": 32}
    config = write_config(tmp_path / "c.yaml", values)
    code, err = run_cli(capsys, "train", "--config", str(config), "--out", str(tmp_path / "out"))
    assert code == 2 and "data.tokenizer" in err and "8192 token ids" in err
    assert not (tmp_path / "out").exists()


def test_token_ids_beyond_the_vocabulary_are_found_at_start(tmp_path, capsys):
    from upcycle.data.prepare import check_data_fits

    data = make_data_dir(tmp_path / "data", train_tokens=3000)
    tokens = (data / "english.train.bin").read_bytes()
    bad = bytearray(tokens)
    bad[2 * 2500:2 * 2500 + 2] = (VOCAB + 5).to_bytes(2, "little")  # uint16 id past the vocabulary
    (data / "english.train.bin").write_bytes(bytes(bad))
    with pytest.raises(UpcycleError, match=rf"english\.train\.bin holds token id {VOCAB + 5}, beyond"):
        check_data_fits(data, vocab_size=VOCAB, max_seq_len=64, seq_len=32, chunk_tokens=1000)
    config = write_config(tmp_path / "c.yaml", tiny_config(data, train={"max_steps": 2}))
    code, err = run_cli(capsys, "train", "--config", str(config), "--out", str(tmp_path / "out"))
    assert code == 2 and "english.train.bin holds token id" in err
    assert not (tmp_path / "out").exists()
    check_data_fits(data, vocab_size=VOCAB + 6, max_seq_len=64, seq_len=32, chunk_tokens=1000)  # a model that fits


def test_the_one_data_fits_check_also_covers_raw_text_before_tokenizing():
    """The trainer's raw-sources branch goes through data.check_data_fits too (no second copy of the check)."""
    from upcycle.data.prepare import check_data_fits

    tokenizer = REPO / "assets" / "tokenizer"
    with pytest.raises(UpcycleError, match=r"data\.tokenizer .* has 8192 token ids but the model's vocab_size is 100"):
        check_data_fits(None, tokenizer=tokenizer, tokenizer_name="data.tokenizer", vocab_size=100, max_seq_len=64,
                        seq_len=32)
    with pytest.raises(UpcycleError, match="data.seq_len 128 exceeds the model's max_seq_len 64"):
        check_data_fits(None, tokenizer=tokenizer, vocab_size=8192, max_seq_len=64, seq_len=128,
                        seq_len_name="data.seq_len")
    assert check_data_fits(None, tokenizer=tokenizer, vocab_size=8192, max_seq_len=64, seq_len=32) is None


def test_divergence_names_and_keeps_the_last_healthy_checkpoint(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 12, "eval_every": 0},
                                                           checkpoint={"every": 4, "keep": 2}))
    out = tmp_path / "run"
    run_training(load_config(config), out)
    assert ckpt.health(out / "checkpoints" / "step_00000008") == ckpt.HEALTH_GOOD  # step 9 tested it
    assert ckpt.health(out / "checkpoints" / "step_00000012") == ckpt.HEALTH_UNVERIFIED  # nothing ran after it

    # A learning rate of 1e6 (with clipping): the weights reach ~1e6 after one update; the loss may stay finite for a
    # while, but the gradient norm jumps far above its running median.
    blowup = ["optim.lr=1e6", "optim.min_lr=1e6", "schedule.warmup_steps=0", "train.max_steps=40",
              "checkpoint.every=1", "checkpoint.keep=1"]
    with pytest.raises(NonFiniteLoss) as failure:
        run_training(load_config(config, blowup), out)
    message = str(failure.value)
    assert "Last good checkpoint: " + str(out / "checkpoints" / "step_00000012") in message
    kept = dict(ckpt.list_checkpoints(out / "checkpoints"))
    assert 12 in kept and ckpt.health(kept[12]) == ckpt.HEALTH_GOOD  # step 13 ran sane: it tested step 12's weights
    assert all(ckpt.health(path) == ckpt.HEALTH_SUSPECT for step, path in kept.items() if step > 12)
    assert len(kept) <= 2  # keep 1, plus the protected healthy one
    assert ckpt.last_good_checkpoint(out / "checkpoints") == kept[12]

    capsys.readouterr()
    run_training(load_config(config, ["train.max_steps=14"]), out)  # the corrected rerun
    err = capsys.readouterr().err
    assert "resuming from" in err and "step_00000012 (step 12" in err
    assert [r["step"] for r in read_metrics(out)][-3:] == [12, 13, 14]


def test_a_truncated_checkpoint_is_named_and_resume_falls_back(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"eval_every": 0}))
    out = tmp_path / "run"
    run_training(load_config(config), out)
    newest = out / "checkpoints" / "step_00000008"
    weights = newest / ckpt.STATE_DIR / "shard-00001-model-00001-of-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])

    code, err = run_cli(capsys, "export", str(newest), str(tmp_path / "hf"))
    assert code == 2 and str(weights) in err and "truncated" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(capsys, "eval", str(newest), "--data", str(data_dir))
    assert code == 2 and str(weights) in err and len(err.strip().splitlines()) == 1

    run_training(load_config(config, ["train.max_steps=10"]), out)
    err = capsys.readouterr().err
    assert "cannot resume from step_00000008" in err and str(weights) in err
    assert "resuming from" in err and "(step 4," in err
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))


def test_every_writer_of_our_model_format_writes_the_same_config_json(tmp_path, data_dir):
    from upcycle.model.hf import load_model, save_model

    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, train={"max_steps": 1, "eval_every": 0}))
    run_training(load_config(config), tmp_path / "run")
    checkpoint = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    saved = save_model(load_model(checkpoint), tmp_path / "saved")
    from_trainer = json.loads((checkpoint / "config.json").read_text())
    from_save_model = json.loads((saved / "config.json").read_text())
    assert from_save_model["format"] == from_trainer["format"] == ckpt.MODEL_FORMAT
    assert from_save_model["model"] == from_trainer["model"]
    assert set(from_trainer) - set(from_save_model) == {"step"}


def test_a_spike_is_judged_against_the_running_medians_of_healthy_steps():
    from upcycle.train.trainer import HEALTH_MIN_HISTORY, health_problem

    history = [(3.0 - 0.01 * i, 1.0 + 0.1 * (i % 3)) for i in range(HEALTH_MIN_HISTORY)]
    assert health_problem(3.0, 1.2, history) is None
    assert health_problem(3.0, 5.0, history) is None  # 5x the median: large, not a spike
    assert "gradient norm" in health_problem(3.0, 50.0, history)
    assert "loss" in health_problem(9.0, 1.0, history)
    assert "non-finite" in health_problem(float("nan"), 1.0, history)
    assert health_problem(3.0, 1e6, history[:HEALTH_MIN_HISTORY - 1]) is None  # too little history to judge
