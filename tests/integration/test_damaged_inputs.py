"""Every command that reads a model directory refuses the same damage with the same line, exit 2, writing nothing:
export, eval, analyze, grow and check read it through one validation (model.hf.model_tensors) and one reader of our
training checkpoints (formats.training_checkpoint: its files, their values and their checksums, as resume checks
them). What an outside audit found accepted or ending in a traceback, one case each."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (assert_one_line_error, make_data_dir, run_cli, run_train, save_dense, tiny_config,
                     train_one_process, write_config, write_tokenizer)
from upcycle.errors import UpcycleError
from upcycle.formats.training_checkpoint import CHECKSUMS, STATE_DIR, TRAINER_STATE, step_dir_name

STATE_FILE = "shard-00001-model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A dense HF llama, its naive 4-expert Mixtral, a prepared data directory and a 2-step training run of a tiny MoE
    whose checkpoint step_00000002 is sharded."""
    root = tmp_path_factory.mktemp("inputs")
    dense = save_dense(root / "dense", "llama")
    write_tokenizer(dense)
    from upcycle.convert.conversion import convert

    moe = convert(dense, root / "moe", progress=False, method="naive", num_experts=4, top_k=2)
    data = make_data_dir(root / "data")
    config = write_config(root / "c.yaml", tiny_config(data, train={"max_steps": 2, "eval_every": 0},
                                                       checkpoint={"every": 2}))
    train_one_process(config, root / "run")
    return {"dense": dense, "moe": moe, "data": data, "config": config,
            "checkpoint": root / "run" / "checkpoints" / step_dir_name(2)}


def _commands(inputs: dict, model: Path, out: Path) -> dict[str, list[str]]:
    data = str(inputs["data"])
    return {"export": ["export", str(model), str(out)],
            "eval": ["eval", str(model), "--data", data, "--seq-len", "32"],
            "analyze": ["analyze", str(model), "--data", data, "--out", str(out), "--seq-len", "32"],
            "grow": ["grow", str(model), str(out), "--quiet"],
            "check": ["check", str(model), "--dense", str(inputs["dense"])]}


def _assert_refused_by_every_reader(capsys, inputs: dict, model: Path, *needles: str) -> None:
    """Each command refuses `model` in one line holding `needles` and writes nothing; load_model (the experiment's
    reader) raises the same."""
    out = model.parent / "out"
    for command, argv in _commands(inputs, model, out).items():
        code, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, *needles)
        assert not out.exists() and not list(model.parent.glob(".out*")), command
    from upcycle.model.hf import load_model

    with pytest.raises(UpcycleError) as error:
        load_model(model)
    assert all(needle in str(error.value) for needle in needles)


# ---- a training checkpoint: what resume checks, every reader checks --------------------------------------------------


def _flip_a_byte(checkpoint: Path) -> None:
    file = checkpoint / STATE_DIR / STATE_FILE
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x10  # in the last tensor's values: the header still parses, the weights are another model's
    file.write_bytes(bytes(data))


def _edit_json(name: str, edit):
    def damage(checkpoint: Path) -> None:
        value = json.loads((checkpoint / name).read_text())
        edit(value)
        (checkpoint / name).write_text(json.dumps(value))
    return damage


def _extend_sparse(checkpoint: Path) -> None:
    """A 40 GB state file: the real one with a hole after it (no disk used)."""
    os.truncate(checkpoint / STATE_DIR / STATE_FILE, 40 * 2**30)


CHECKPOINT_DAMAGE = {
    "flipped byte": (_flip_a_byte, f"{STATE_DIR}/{STATE_FILE} does not match its sha256 in {CHECKSUMS}: the "
                                   "checkpoint was modified or damaged after it was written"),
    "no checksums.json": (lambda c: (c / CHECKSUMS).unlink(), f"has no {CHECKSUMS}"),
    "no trainer_state.json": (lambda c: (c / TRAINER_STATE).unlink(), f"has no {TRAINER_STATE}"),
    "no rng file": (lambda c: (c / "rng_rank0.json").unlink(), "has no rng_rank0.json (written by 1 rank(s))"),
    "rng of wrong values": (_edit_json("rng_rank0.json", lambda v: v["numpy"].update(keys=[1, 2, 3])),
                            "rng_rank0.json holds no valid RNG state"),
    "trainer state of wrong values": (_edit_json(TRAINER_STATE, lambda v: v.update(step="two")),
                                      "trainer_state.json: step must be a count of steps, got 'two'"),
    "trainer state of another step": (_edit_json(TRAINER_STATE, lambda v: v.update(step=4)),
                                      "records step 4 in step_00000002; it belongs to another checkpoint"),
    "40 GB sparse state file": (_extend_sparse, "bytes after its last tensor"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_every_reader_of_a_training_checkpoint_refuses_what_resume_refuses(inputs, tmp_path, capsys, damage):
    """Before, export wrote an HF model from a checkpoint with a flipped byte or no checksums.json (exit 0), eval and
    analyze reported its numbers, and wrong values in the JSON files ended in tracebacks."""
    make, message = CHECKPOINT_DAMAGE[damage]
    checkpoint = shutil.copytree(inputs["checkpoint"], tmp_path / "copy" / step_dir_name(2))
    make(checkpoint)
    _assert_refused_by_every_reader(capsys, inputs, checkpoint, str(checkpoint), message)


def test_check_reads_a_training_checkpoint_as_the_parent_of_a_grow_and_verifies_it(inputs, tmp_path, capsys):
    """A grow of a training checkpoint can be checked against it (before, --dense took HF directories only), and the
    parent is verified as the MoE is."""
    from upcycle.convert.check import check

    grown = tmp_path / "grown"
    assert run_cli(capsys, "grow", str(inputs["checkpoint"]), str(grown), "--ratio", "0", "--quiet")[0] == 0
    report = check(str(grown), str(inputs["checkpoint"]))
    assert report.method == "grow" and report.equivalent is True
    parent = shutil.copytree(inputs["checkpoint"], tmp_path / "parent")
    _flip_a_byte(parent)
    code, err = run_cli(capsys, "check", str(grown), "--dense", str(parent))
    assert_one_line_error(code, err, f"{parent / STATE_DIR / STATE_FILE} does not match its sha256")


def test_train_from_a_damaged_checkpoint_as_init_source_is_refused_in_one_line(inputs, tmp_path):
    checkpoint = shutil.copytree(inputs["checkpoint"], tmp_path / "ckpt")
    _flip_a_byte(checkpoint)
    config = tiny_config(inputs["data"], model=None, init={"source": str(checkpoint)},
                         train={"max_steps": 1, "eval_every": 0}, checkpoint={"every": 0})
    result = run_train(write_config(tmp_path / "c.yaml", config), tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"upcycle: error: {checkpoint / STATE_DIR / STATE_FILE} does not match its sha256 in {CHECKSUMS}: the "
        "checkpoint was modified or damaged after it was written")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / TRAINER_STATE).unlink(), f"has no {TRAINER_STATE}"),
    (lambda c: (c / "rng_rank0.json").unlink(), "has no rng_rank0.json"),
    (_edit_json("rng_rank0.json", lambda v: v.update(torch_cpu="AAAA")), "rng_rank0.json holds no valid RNG state"),
    (_edit_json(TRAINER_STATE, lambda v: v.update(world_size="1")), "world_size must be a count of ranks, got '1'"),
])
def test_resume_names_a_checkpoint_damaged_in_its_small_files_and_falls_back(inputs, tmp_path, damage, message):
    """Before, a checkpoint without trainer_state.json was skipped without a word, a missing RNG file was ignored (the
    run went on with fresh RNG states) and RNG or trainer state of wrong values was a traceback on every rank."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(inputs["data"], train={"max_steps": 4, "eval_every": 0},
                                                           checkpoint={"every": 2, "keep": 2}))
    assert run_train(config, out).returncode == 0
    damage(out / "checkpoints" / step_dir_name(4))
    result = run_train(config, out, "--train.max_steps", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cannot resume from {step_dir_name(4)}: " in result.stderr and message in result.stderr, result.stderr
    assert "(step 2," in result.stderr


def test_a_data_loader_state_of_wrong_values_is_one_line(inputs, tmp_path):
    from upcycle.data.prepare import MixtureLoader

    loader = MixtureLoader(inputs["data"], seq_len=32, global_batch_size=8, seed=0)
    state = loader.state_dict()
    for broken, message in (([], "not a JSON object"), ({**state, "step": "x"}, "step must be a count"),
                            ({**state, "consumed": {"code": -1, "english": 0}}, "consumed"),
                            ({**state, "probabilities": "half"}, "probabilities")):
        with pytest.raises(UpcycleError, match=message):
            loader.load_state_dict(broken)


# ---- an HF MoE directory: what export refuses, check refuses too -----------------------------------------------------


def _set_config(**values):
    def damage(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(values)
        (model / "config.json").write_text(json.dumps(config))
    return damage


def _edit_tensors(edit):
    def damage(model: Path) -> None:
        state = load_file(model / "model.safetensors")
        edit(state)
        save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    return damage


ROUTER = "model.layers.1.block_sparse_moe.gate.weight"
EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


def _nan(name: str, value: float):
    def edit(state):
        state[name][0, 1] = value
    return edit


MOE_DAMAGE = {
    "NaN in an expert": (_edit_tensors(_nan(EXPERT, float("nan"))), "holds NaN or Inf values"),
    "Inf in the router": (_edit_tensors(_nan(ROUTER, float("inf"))), "holds NaN or Inf values"),
    "int32 embeddings": (_edit_tensors(lambda s: s.update({"model.embed_tokens.weight":
                                                           s["model.embed_tokens.weight"].to(torch.int32)})),
                         "model.embed_tokens.weight of", "is int32, not a floating dtype"),
    "no router": (_edit_tensors(lambda s: s.pop(ROUTER)), f"lacks tensor {ROUTER}"),
    "a layer missing": (_set_config(num_hidden_layers=3), "lacks tensor model.layers.2."),
    "num_local_experts a string": (_set_config(num_local_experts="4"),
                                   "config.json: num_local_experts must be a positive integer, got '4'"),
    "num_local_experts 0": (_set_config(num_local_experts=0),
                            "config.json: num_local_experts must be a positive integer, got 0"),
    "top-k above the experts": (_set_config(num_experts_per_tok=8), "top_k must be between 1 and num_experts (4), "
                                                                    "got 8"),
    "unknown model_type": (_set_config(model_type="gpt_oss"), "unsupported model_type 'gpt_oss'"),
    "40 GB sparse weights": (lambda m: os.truncate(m / "model.safetensors", 40 * 2**30),
                             "bytes after its last tensor"),
}


@pytest.mark.parametrize("damage", list(MOE_DAMAGE))
def test_every_reader_of_an_hf_moe_refuses_the_same_damage(inputs, tmp_path, capsys, damage):
    """Before, check loaded these through transformers, which filled missing tensors at random (exit 0) or raised
    tracebacks; export, eval and analyze accepted NaN and int32 weights (eval printed nan); a string for
    num_local_experts was a TypeError, 0 a top-k problem."""
    make, *needles = MOE_DAMAGE[damage]
    model = shutil.copytree(inputs["moe"], tmp_path / "moe")
    make(model)
    _assert_refused_by_every_reader(capsys, inputs, model, str(model), *needles)


@pytest.mark.parametrize("which, damage", [("checkpoint", "flipped byte"), ("checkpoint", "no checksums.json"),
                                           ("moe", "no router"), ("moe", "num_local_experts a string")])
def test_bench_refuses_what_every_reader_refuses(inputs, tmp_path, capsys, which, damage):
    """bench loads through transformers, which would fill a missing router at random; a damaged training checkpoint
    was exported and timed. (NaN weights cost the same time: bench does not read values to look for them.)"""
    if which == "checkpoint":
        make, *needles = CHECKPOINT_DAMAGE[damage]
        model = shutil.copytree(inputs["checkpoint"], tmp_path / "copy" / step_dir_name(2))
    else:
        make, *needles = MOE_DAMAGE[damage]
        model = shutil.copytree(inputs["moe"], tmp_path / "moe")
    make(model)
    code, err = run_cli(capsys, "bench", str(model), "--quick", "--device", "cpu", "--output", str(tmp_path / "b.json"))
    assert_one_line_error(code, err, str(model), *needles)
    assert not (tmp_path / "b.json").exists()
