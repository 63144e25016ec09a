"""Every bad input to `upcycle convert` gets one clear line naming the fix, exit status 2, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_convert_refused, assert_one_line_error, run_cli, save_dense
from upcycle.cli import main


def _truncate(directory: Path) -> None:
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def _drop_ffn(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def _as_gpt2(directory: Path) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (directory / "config.json").write_text(json.dumps(cfg))


def _pickle_only(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")


def _config_value(key, value):
    def edit(directory: Path) -> None:
        cfg = json.loads((directory / "config.json").read_text())
        cfg[key] = value
        (directory / "config.json").write_text(json.dumps(cfg))
    return edit


def _deeply_nested_config(directory: Path) -> None:
    """Valid JSON that Python's parser cannot read without recursing 100,000 levels (RecursionError)."""
    text = (directory / "config.json").read_text().rstrip().rstrip("}")
    (directory / "config.json").write_text(text + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _nan_weight(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


CASES = {
    "missing source": (None, ["{tmp}/nowhere", "{out}"], "does not exist"),
    "source is /dev/null": (None, ["/dev/null", "{out}"], "source /dev/null is a character device, not a directory"),
    "source is a symlink to itself": (None, ["{tmp}/loop", "{out}"], "is a symlink loop, not a directory"),
    "source is a file": (lambda d: None, ["{src}/config.json", "{out}"], "not a directory"),
    "no config.json": (lambda d: (d / "config.json").unlink(), ["{src}", "{out}"], "no config.json"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{oops"), ["{src}", "{out}"], "not valid JSON"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), ["{src}", "{out}"], "no *.safetensors"),
    "pickle weights": (_pickle_only, ["{src}", "{out}"], "never unpickles"),
    "truncated safetensors": (_truncate, ["{src}", "{out}"], "truncated"),
    "missing FFN tensor": (_drop_ffn, ["{src}", "{out}"], "lacks FFN tensor model.layers.1.mlp.up_proj.weight"),
    "unsupported family": (_as_gpt2, ["{src}", "{out}"], "supported dense families: llama, mistral, qwen2, qwen3"),
    "top-k above experts": (lambda d: None, ["{src}", "{out}", "--num-experts", "2", "--top-k", "3"], "--top-k"),
    "ratio above one": (lambda d: None, ["{src}", "{out}", "--ratio", "1.5"], "ratio must lie in [0, 1]"),
    "ratio below zero": (lambda d: None, ["{src}", "{out}", "--ratio", "-0.5"], "ratio must lie in [0, 1]"),
    "zero experts": (lambda d: None, ["{src}", "{out}", "--num-experts", "0"], "--num-experts must be at least 1"),
    "unknown method": (lambda d: None, ["{src}", "{out}", "--method", "magic"], "invalid choice: 'magic'"),
    "btx without sources": (lambda d: None, ["{src}", "{out}", "--method", "btx"], "--btx-sources"),
    "mixtral from biased qwen2": (None, ["{qwen2}", "{out}", "--format", "mixtral"], "use --format qwen2_moe"),
    "float heads": (_config_value("num_attention_heads", 4.0), ["{src}", "{out}"],
                    "config.json: num_attention_heads must be a positive integer, got 4.0"),
    "string heads": (_config_value("num_attention_heads", "4"), ["{src}", "{out}"],
                     "config.json: num_attention_heads must be a positive integer, got '4'"),
    "string eps": (_config_value("rms_norm_eps", "1e-6"), ["{src}", "{out}"], "config.json: rms_norm_eps must be"),
    "string tie": (_config_value("tie_word_embeddings", "false"), ["{src}", "{out}"],
                   "config.json: tie_word_embeddings must be true or false"),
    "heads not a multiple": (_config_value("num_key_value_heads", 3), ["{src}", "{out}"],
                             "must be a multiple of num_key_value_heads"),
    "deeply nested config.json": (_deeply_nested_config, ["{src}", "{out}"], "nests its JSON too deeply"),
    "rope parameters not a mapping": (_config_value("rope_parameters", 5), ["{src}", "{out}"],
                                      "config.json: rope_parameters must be a mapping or null, got 5"),
    "NaN weight": (_nan_weight, ["{src}", "{out}"], "model.layers.1.mlp.down_proj.weight in"),
    "NaN router std": (lambda d: None, ["{src}", "{out}", "--router-std", "nan"],
                       "--router-std must be a finite number, got nan"),
    "Inf router std": (lambda d: None, ["{src}", "{out}", "--router-std", "inf"],
                       "--router-std must be a finite number, got inf"),
    "NaN noise std": (lambda d: None, ["{src}", "{out}", "--method", "noise", "--noise-std", "nan"],
                      "--noise-std must be a finite number, got nan"),
    "NaN ratio": (lambda d: None, ["{src}", "{out}", "--ratio", "nan"], "--ratio must be a finite number"),
    "a billion experts": (lambda d: None, ["{src}", "{out}", "--num-experts", "1000000000"], "of memory"),
    # what an outside audit found accepted, or blamed on another option
    "empty moe layers": (lambda d: None, ["{src}", "{out}", "--moe-layers", ""],
                         "--moe-layers is empty; name the MoE layers"),
    "zero shard size": (lambda d: None, ["{src}", "{out}", "--max-shard-size", "0"],
                        "--max-shard-size must be a positive size such as 5GB or 500MB, got '0'"),
    "huge shared expert": (lambda d: None, ["{src}", "{out}", "--format", "qwen2_moe", "--shared-expert-dim",
                                            "100000000"], "use a smaller --shared-expert-dim than 100000000"),
    "dense shared expert in mixtral": (lambda d: None, ["{src}", "{out}", "--shared-expert", "dense", "--format",
                                                        "mixtral"], "--shared-expert dense needs --format qwen2_moe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    prepare, argv, message = CASES[case]
    src = save_dense(tmp_path / "src", "llama")
    if prepare is not None:
        prepare(src)
    qwen2 = save_dense(tmp_path / "qwen2", "qwen2") if "{qwen2}" in " ".join(argv) else None
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    source, *flags = [a.format(tmp=tmp_path, src=src, out="", qwen2=qwen2) for a in argv if a != "{out}"]
    assert_convert_refused(capsys, source, tmp_path / "out", *flags, message=message)


def test_btx_sources_with_different_shapes_are_refused(tmp_path, capsys):
    a = save_dense(tmp_path / "a", "llama")
    b = save_dense(tmp_path / "b", "llama", intermediate_size=40)
    code, err = run_cli(capsys, "convert", str(a), str(tmp_path / "out"), "--method", "btx", "--btx-sources", str(b),
                        "--num-experts", "4", "--quiet")
    assert code == 2 and "differs in shape" in err and not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_left_untouched(tmp_path, capsys):
    src = save_dense(tmp_path / "src", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, err = run_cli(capsys, "convert", str(src), str(out), "--quiet")
    assert code == 2 and "pass --force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_force_onto_a_symlinked_output_is_refused_and_writes_nothing(tmp_path, capsys):
    """Before, convert wrote the output in place of the link, then exited 2 leaving a .out.upcycle-old-PID link."""
    src = save_dense(tmp_path / "src", "llama")
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("keep")
    (tmp_path / "out").symlink_to(real)
    code, err = run_cli(capsys, "convert", str(src), str(tmp_path / "out"), "--force", "--quiet")
    assert_one_line_error(code, err, f"OUTPUT {tmp_path / 'out'} is a symlink (to {real})")
    assert (tmp_path / "out").is_symlink() and [p.name for p in real.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real", "src"]


def test_export_refuses_a_zero_shard_size(tmp_path, capsys):
    from upcycle.convert.conversion import convert

    moe = convert(save_dense(tmp_path / "src", "llama"), tmp_path / "moe", progress=False, num_experts=2)
    code, err = run_cli(capsys, "export", str(moe), str(tmp_path / "out"), "--max-shard-size", "0")
    assert_one_line_error(code, err, "--max-shard-size must be a positive size")
    assert not (tmp_path / "out").exists()


def test_export_refuses_experts_transformers_cannot_run_in_its_dtype(tmp_path, capsys):
    """Experts of 12 neurons: 48-byte rows in float32, 24 in bfloat16 (transformers' grouped matmul needs multiples of
    16); before, the bfloat16 export was written and transformers failed on it."""
    from upcycle.convert.conversion import convert

    moe = convert(save_dense(tmp_path / "src", "llama"), tmp_path / "moe", progress=False, num_experts=4, top_k=4,
                  granularity=4)
    code, err = run_cli(capsys, "export", str(moe), str(tmp_path / "out"), "--dtype", "bfloat16")
    assert_one_line_error(code, err, f"the experts of {moe} have 12 neurons, whose rows of 24 bytes in bfloat16 are "
                          "not a multiple of 16 bytes", "export with --dtype float32")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert run_cli(capsys, "export", str(moe), str(tmp_path / "out"), "--dtype", "float32")[0] == 0


def test_the_installed_entry_point_runs_convert_and_check(tmp_path):
    """One real subprocess per command: `python -m upcycle` works end to end and sets exit codes."""
    src = save_dense(tmp_path / "src", "llama")
    subprocess.run([sys.executable, "-m", "upcycle", "convert", str(src), str(tmp_path / "naive"), "--method",
                    "naive", "--num-experts", "4", "--quiet"], check=True)
    done = subprocess.run([sys.executable, "-m", "upcycle", "check", str(tmp_path / "naive"), "--dense", str(src),
                           "--json-output"], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["equivalent"] is True and report["max_abs_logit_diff"] <= 1e-4
    assert report["dense_perplexity"] == pytest.approx(report["moe_perplexity"], rel=1e-4)
    bad = subprocess.run([sys.executable, "-m", "upcycle", "convert", str(tmp_path / "missing"), str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_check_fails_when_a_naive_conversion_is_not_equivalent(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = save_dense(tmp_path / "src", "llama")
    main(["convert", str(src), str(tmp_path / "naive"), "--method", "naive", "--num-experts", "2", "--quiet"])
    weights = tmp_path / "naive" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.block_sparse_moe.experts.1.w2.weight"] += 0.05  # break one expert
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exc:
        main(["check", str(tmp_path / "naive"), "--dense", str(src)])
    assert exc.value.code == 1
    assert "NOT EQUIVALENT" in capsys.readouterr().out


def test_a_million_experts_are_refused_before_any_work_on_a_machine_they_do_not_fit(tmp_path, capsys, monkeypatch):
    from upcycle.convert import conversion as convert

    src = save_dense(tmp_path / "src", "llama")
    monkeypatch.setattr(convert, "_available_memory_bytes", lambda: 8 * 10**9)
    monkeypatch.setattr(convert, "_free_disk_bytes", lambda path: 10**12)
    code, err = run_cli(capsys, "convert", str(src), str(tmp_path / "out"), "--num-experts", "1000000", "--quiet")
    assert code == 2 and "needs about" in err and "of memory" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(convert, "_available_memory_bytes", lambda: 10**12)
    monkeypatch.setattr(convert, "_free_disk_bytes", lambda path: 20 * 10**9)
    code, err = run_cli(capsys, "convert", str(src), str(tmp_path / "out"), "--num-experts", "1000000", "--quiet")
    assert code == 2 and "of disk" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert main(["convert", str(src), str(tmp_path / "out"), "--num-experts", "4", "--quiet"]) in (0, None)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage, which, message", [
    (_pickle_only, "moe", "never unpickles"), (_truncate, "moe", "truncated"), (_truncate, "dense", "truncated"),
])
def test_check_refuses_pickle_and_truncated_checkpoints_like_convert(tmp_path, capsys, damage, which, message):
    src = save_dense(tmp_path / "dense", "llama")
    assert main(["convert", str(src), str(tmp_path / "moe"), "--num-experts", "2", "--quiet"]) in (0, None)
    damage(tmp_path / which)
    code, err = run_cli(capsys, "check", str(tmp_path / "moe"), "--dense", str(tmp_path / "dense"))
    assert code == 2 and message in err and str(tmp_path / which) in err and len(err.strip().splitlines()) == 1


# -- OS errors at the command boundary: one line naming the path and the reason, exit 2 ------------------------------
# Tests run as root, which ignores permission bits; /proc, a file used as a directory and small tmpfs mounts give
# errors that root gets too.


@pytest.fixture
def train_config_file(tmp_path):
    from helpers import make_data_dir, tiny_config, write_config

    data = make_data_dir(tmp_path / "data")
    return write_config(tmp_path / "c.yaml", tiny_config(data, train={"max_steps": 2, "eval_every": 0},
                                                         checkpoint={"every": 1}))


@pytest.mark.parametrize("where, needle", [
    ("file", "is not a directory"),  # --out names an existing file
    ("file/run", "Not a directory"),  # ENOTDIR: a path through a file
    ("/proc/upcycle-test/run", "/proc/upcycle-test"),  # a /proc path nothing may be created in
])
def test_train_out_that_cannot_be_a_directory_is_one_line_error(tmp_path, capsys, train_config_file, where, needle):
    (tmp_path / "file").write_text("x")
    out = where if where.startswith("/") else str(tmp_path / where)
    code, err = run_cli(capsys, "train", "--config", str(train_config_file), "--out", out)
    assert_one_line_error(code, err, needle)


def test_convert_into_proc_is_one_line_error(tmp_path, capsys):
    src = save_dense(tmp_path / "src", "llama")
    code, err = run_cli(capsys, "convert", str(src), "/proc/upcycle-test-out", "--quiet")
    assert_one_line_error(code, err, "/proc")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A mount factory: mount(options) -> a directory on a fresh tmpfs (skipped where mounting is not allowed)."""
    mounted = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root and "
                        "CAP_SYS_ADMIN")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def test_train_on_a_full_disk_is_one_line_and_publishes_no_partial_checkpoint(capsys, train_config_file,
                                                                              small_tmpfs):
    disk = small_tmpfs("size=160k")
    out = disk / "run"
    code, err = run_cli(capsys, "train", "--config", str(train_config_file), "--out", str(out))
    assert_one_line_error(code, err, "No space left on device", "ENOSPC", str(out / "checkpoints"))
    checkpoints = out / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # no step_* and no leftover .tmp-*


def test_train_and_convert_on_a_read_only_file_system_areassert_one_line_error(tmp_path, capsys, train_config_file,
                                                                  small_tmpfs):
    disk = small_tmpfs("ro,size=1m")
    code, err = run_cli(capsys, "train", "--config", str(train_config_file), "--out", str(disk / "run"))
    assert_one_line_error(code, err, "Read-only file system", "EROFS", str(disk / "run"))
    src = save_dense(tmp_path / "src", "llama")
    code, err = run_cli(capsys, "convert", str(src), str(disk / "moe"), "--quiet")
    assert_one_line_error(code, err, "Read-only file system")


def test_check_refuses_a_moe_with_nan_weights(tmp_path, capsys):
    """A drop conversion has no exactness verdict, so before this check NaN logits printed "nan" and exited 0."""
    from safetensors.torch import load_file, save_file

    src = save_dense(tmp_path / "src", "llama")
    main(["convert", str(src), str(tmp_path / "moe"), "--num-experts", "2", "--quiet"])
    weights = tmp_path / "moe" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.block_sparse_moe.gate.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    code, err = run_cli(capsys, "check", str(tmp_path / "moe"), "--dense", str(src))
    assert_one_line_error(code, err, "NaN or Inf logits", "model.layers.1.block_sparse_moe.gate.weight")



@pytest.mark.parametrize("damage, message", [
    (_config_value("hidden_size", "32"), "config.json: hidden_size must be a positive integer, got '32'"),
    (_config_value("vocab_size", -1), "config.json: vocab_size must be a positive integer"),
    (_config_value("rope_parameters", 5), "rope_parameters must be a mapping or null"),
    (_config_value("num_hidden_layers", 1), "has tensors a plain llama model does not"),
    (_config_value("model_type", "gpt2"), "supported dense families"),
    (_deeply_nested_config, "nests its JSON too deeply"),
])
def test_check_with_a_broken_dense_config_is_one_line_naming_it(tmp_path, capsys, damage, message):
    """Before, transformers met these configs: TypeError, RuntimeError or IndexError tracebacks."""
    src = save_dense(tmp_path / "src", "llama")
    main(["convert", str(src), str(tmp_path / "moe"), "--num-experts", "2", "--quiet"])
    damage(src)
    code, err = run_cli(capsys, "check", str(tmp_path / "moe"), "--dense", str(src))
    assert_one_line_error(code, err, message, str(src))


def test_check_with_a_broken_moe_config_is_one_line_naming_it(tmp_path, capsys):
    """Before, transformers judged the MoE's config (a TypeError here, in one line naming the directory); now the MoE
    is validated as export validates it, and the line names the field."""
    src = save_dense(tmp_path / "src", "llama")
    main(["convert", str(src), str(tmp_path / "moe"), "--num-experts", "2", "--quiet"])
    _config_value("hidden_size", "32")(tmp_path / "moe")
    code, err = run_cli(capsys, "check", str(tmp_path / "moe"), "--dense", str(src))
    assert_one_line_error(code, err, str(tmp_path / "moe"), "config.json: hidden_size must be a positive integer, "
                          "got '32'")
