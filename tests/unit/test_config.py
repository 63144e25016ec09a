"""One config mechanism (`upcycle.config`) behind the training config, the experiment config and the compose spec: the
same mistake gets the same one-line message in all three, YAML aliases and duplicate keys are refused in all three,
the compose spec's types are checked before anything is written, and --help lists every field with its type and
default."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest
import yaml

from helpers import assert_one_line_error, run_cli
from upcycle.convert.compose import read_spec
from upcycle.config import config_fields
from upcycle.validation import union_members
from upcycle.errors import UpcycleError
from upcycle.experiment.config import ExperimentConfig, load_experiment
from upcycle.train.config import SECTIONS, load_config

READERS = {"train": load_config, "experiment": load_experiment, "compose": read_spec}
# The smallest mapping of each kind whose fields all build (the files they name are checked later, by validate).
BASES = {
    "train": {"data": {"path": "data"}},
    "experiment": {"seed_model": "seed", "budgets": [256], "arms": [{"name": "a", "kind": "naive"}]},
    "compose": {"base": "base", "experts": [{"source": "a"}, {"source": "b"}]},
}
# reader -> mistake -> (dotted key, with list indices, and the value set there; the message)
MISTAKES = {
    "train": {
        "unknown field": ("data.seq_lenn", 32, "data.seq_lenn: unknown field; data accepts: path, seed, seq_len, "
                                               "sources, tokenizer, val_fraction, weights"),
        "unknown top-level field": ("trian", {}, "trian: unknown field; a training config accepts: checkpoint, data, "
                                                 "init, logging, model, optim, schedule, train"),
        "wrong type": ("train.max_steps", "ten", "train.max_steps must be an integer, got 'ten'"),
        "wrong list element": ("optim.betas", [0.9, "x"], "optim.betas[1] must be a finite number, got 'x'"),
    },
    "experiment": {
        "unknown field": ("data.seq_lenn", 32, "data.seq_lenn: unknown field; data accepts: path, seq_len, sources, "
                                               "tokenizer, val_fraction, val_sources, weights"),
        "unknown top-level field": ("colour", "blue", "colour: unknown field; an experiment config accepts: arms, "
                                                      "budgets, data, eval, moe, primary, recipe, seed_model, seeds"),
        "wrong type": ("moe.num_experts", "ten", "moe.num_experts must be an integer, got 'ten'"),
        "wrong list element": ("arms.0.domains", ["code", 5], "arms[0] (a).domains[1] must be a string, got 5"),
    },
    "compose": {
        "unknown field": ("experts.1.colour", "blue", "experts[1].colour: unknown field; experts[1] accepts: "
                                                      "index_mode, negative, positive, ratio, source"),
        "unknown top-level field": ("colour", "blue", "colour: unknown field; a compose spec accepts: average, base, "
                                                      "calibration, calibration_tokens, dtype, experts, format, "
                                                      "granularity, max_shard_size, moe_layers, router, "
                                                      "router_aux_loss_coef, router_std, seed, shared_expert, stats, "
                                                      "top_k"),
        "wrong type": ("top_k", "ten", "top_k must be an integer, got 'ten'"),
        "wrong list element": ("experts.0.positive", ["w1", 5], "experts[0].positive[1] must be a string, got 5"),
    },
}
# The three forms, whatever the reader (`where`: the dotted path of the section, empty at the top level)
FORMS = {
    "unknown field": r"(?P<where>[^:]+)\.\w+: unknown field; (?P=where) accepts: \w+(, \w+)*",
    "unknown top-level field": r"\w+: unknown field; (a|an) [\w ]+ accepts: \w+(, \w+)*",
    "wrong type": r"[\w.]+[a-z_] must be .+, got .+",
    "wrong list element": r"[\w.\[\]() ]+\[\d+\] must be .+, got .+",
}


def _set(values: dict, dotted: str, value) -> dict:
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node = values
    for key in keys[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[keys[-1]] = value
    return values


@pytest.mark.parametrize("mistake", list(FORMS))
@pytest.mark.parametrize("reader", list(READERS))
def test_the_same_mistake_has_the_same_message_in_every_config(tmp_path, reader, mistake):
    dotted, value, expected = MISTAKES[reader][mistake]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_set(json.loads(json.dumps(BASES[reader])), dotted, value), sort_keys=False))
    with pytest.raises(UpcycleError) as error:
        READERS[reader](path)
    message = str(error.value)
    if reader == "compose":  # a compose spec's messages start with its path
        assert message.startswith(f"{path}: "), message
        message = message.removeprefix(f"{path}: ")
    assert message == expected
    assert re.fullmatch(FORMS[mistake], message), message


def test_a_renamed_field_is_named_in_the_unknown_field_message(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASES["experiment"], "data": {"path": "d", "seed": 3}}))
    with pytest.raises(UpcycleError, match=r"^data\.seed: unknown field \(renamed to seeds, at the top level\); data "
                                           r"accepts: path, seq_len, sources, tokenizer, val_fraction, val_sources, "
                                           r"weights$"):
        load_experiment(path)


# ---------------------------------------------------------------------------------------------------------------------
# YAML: duplicate keys and aliases, in every file

DUPLICATES = {
    "train": "data:\n  path: data\n  seq_len: 32\n  seq_len: 64\n",
    "experiment": "seed_model: seed\nbudgets: [256]\nseeds: [0]\nseeds: [1]\narms: [{name: a, kind: naive}]\n",
    "compose": "base: base\nexperts:\n- source: a\n  source: b\n",
}
DUPLICATED = {"train": ("seq_len", 4, 3), "experiment": ("seeds", 4, 3), "compose": ("source", 4, 3)}
WHAT = {"train": "a training config", "experiment": "an experiment config", "compose": "a compose spec"}


@pytest.mark.parametrize("reader", list(READERS))
def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path, reader):
    path = tmp_path / "c.yaml"
    path.write_text(DUPLICATES[reader])
    key, line, first = DUPLICATED[reader]
    with pytest.raises(UpcycleError) as error:
        READERS[reader](path)
    assert str(error.value) == (f"{path}, line {line}: key {key!r} is given twice in one mapping (first on line "
                                f"{first}); keep one")


@pytest.mark.parametrize("reader", list(READERS))
def test_a_key_given_twice_is_one_line_exit_2_through_the_cli_and_nothing_is_written(tmp_path, capsys, reader):
    path, out = tmp_path / "c.yaml", tmp_path / "out"
    path.write_text(DUPLICATES[reader])
    argv = {"train": ["train", "--config", str(path), "--out", str(out)],
            "experiment": ["experiment", "--config", str(path), "--out", str(out)],
            "compose": ["compose", str(path), str(out)]}[reader]
    assert_one_line_error(*run_cli(capsys, *argv), f"{path}, line 4: key ", "is given twice")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_key_given_twice_in_an_override_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASES["train"]))
    with pytest.raises(UpcycleError, match=r"^override 'data\.weights=\{a: 1, a: 2\}', line 1: key 'a' is given twice"):
        load_config(path, ["data.weights={a: 1, a: 2}"])


@pytest.mark.parametrize("reader", list(READERS))
def test_an_alias_is_refused_naming_the_kind_of_file(tmp_path, reader):
    path = tmp_path / "c.yaml"
    path.write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(UpcycleError) as error:
        READERS[reader](path)
    assert str(error.value) == (f"{path}, line 2: YAML aliases (*x) are not accepted in {WHAT[reader]}; write the "
                                "value out")


# ---------------------------------------------------------------------------------------------------------------------
# The compose spec's types: before, these built an averaged model from the string "false" or ended in a TypeError


@pytest.mark.parametrize("change, message", [
    ({"average": "false", "base": None}, "average must be true or false, got 'false'"),
    ({"experts": [{"source": None}]}, "experts[0].source must be a string, got None"),
    ({"experts": [{"source": 42}]}, "experts[0].source must be a string, got 42"),
    ({"base": 123}, "base must be a string or null, got 123"),
    ({"shared_expert": {"source": 5}}, "shared_expert.source must be a string, got 5"),
    ({"experts": [{"source": "a", "ratio": "half"}]}, "experts[0].ratio must be a finite number, got 'half'"),
    ({"granularity": "2"}, "granularity must be an integer, got '2'"),
    ({"router": "random"}, "router must be one of hidden, embed, uniform, normal, data, got 'random'"),
    ({"experts": {"source": "a"}}, "experts must be a list of mappings, got {'source': 'a'}"),
    ({"experts": ["a"]}, "experts[0] must be a mapping, got 'a'"),
])
def test_a_compose_spec_of_the_wrong_type_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, change, message):
    spec, out = tmp_path / "spec.yaml", tmp_path / "out"
    values = {**BASES["compose"], **change}
    spec.write_text(yaml.safe_dump({k: v for k, v in values.items() if v is not None or k != "base"}))
    code, err = run_cli(capsys, "compose", str(spec), str(out))
    assert_one_line_error(code, err)
    assert err.strip() == f"upcycle: error: {spec}: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


# ---------------------------------------------------------------------------------------------------------------------
# --help


def _help(capsys, command: str) -> list[str]:
    from upcycle.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out.splitlines()


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "empty" if value is None else value if isinstance(value, str) else json.dumps(value)


def _flag_fields(cls: type, prefix: str):
    """(flag prefix, field) for every leaf field; a nested section (logging.wandb) contributes its own fields."""
    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        nested = next((a for a in union_members(hints[f.name]) if dataclasses.is_dataclass(a)), None)
        if nested is None:
            yield prefix, f
        else:
            yield from _flag_fields(nested, f"{prefix}.{f.name}")


def test_train_help_lists_every_field_with_its_type_default_and_doc(capsys):
    lines = _help(capsys, "train")
    assert "    wandb:  [empty]" in lines  # a nested section is a heading, its fields are flags below it
    for top, cls in SECTIONS.items():
        for section, f in _flag_fields(cls, top):
            pattern = re.compile(rf" +--{section}\.{f.name} (?P<type>\S.*)  \[(?P<default>.*)\]")
            found = [i for i, line in enumerate(lines) if pattern.fullmatch(line)]
            assert len(found) == 1, f"{section}.{f.name}"
            match = pattern.fullmatch(lines[found[0]])
            assert match["default"] == _default(f), f"{section}.{f.name}"
            if f.metadata.get("choices"):
                assert match["type"] == " | ".join(f.metadata["choices"])
            if top != "model":  # ModelConfig documents its fields in attribute docstrings, not Attributes:
                doc = lines[found[0] + 1]
                assert doc.startswith(" " * 8) and not doc.lstrip().startswith("--"), f"{section}.{f.name}: {doc}"


def test_experiment_help_lists_every_field_with_its_type_default_and_doc(capsys):
    lines = _help(capsys, "experiment")

    def check(cls: type) -> None:
        for f in config_fields(cls):
            section = cls is ExperimentConfig and f.name in ("data", "moe", "eval", "arms", "primary")
            pattern = (re.compile(rf" +{f.name}:( list of arms, each:  \[required\])?") if section else
                       re.compile(rf" +{f.name}: (?P<type>\S.*)  \[{re.escape(_default(f))}\]"))
            found = [i for i, line in enumerate(lines) if pattern.fullmatch(line)]
            assert found, f"{cls.__name__}.{f.name}"
            assert lines[found[0] + 1].startswith(" " * 6), f"{cls.__name__}.{f.name} has no doc"

    from upcycle.experiment.config import ArmSpec, DataSection, EvalSection, MoESection, PrimarySection

    for cls in (ExperimentConfig, DataSection, MoESection, EvalSection, ArmSpec, PrimarySection):
        check(cls)
    assert not any(re.fullmatch(r" +seed: .*", line) for line in lines)  # data.seed: set by the experiment's seeds


def test_the_config_module_imports_no_torch():
    """`upcycle.config` stays light (standard library, yaml, upcycle.errors and upcycle.validation): help and config
    errors need no torch."""
    import subprocess
    import sys

    from helpers import subprocess_env

    code = ("import sys, upcycle.config; assert 'torch' not in sys.modules; "
            "print(sorted(m for m in sys.modules if m.startswith('upcycle')))")
    shown = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                           check=True).stdout
    assert shown.strip() == "['upcycle', 'upcycle.config', 'upcycle.errors', 'upcycle.validation']"


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    from upcycle.config import read_yaml

    path = tmp_path / "c.yaml"
    path.write_bytes(b"train:\n  max_steps: 5 \xff\xfe\n")
    expected = r"c.yaml is not UTF-8 text \(invalid start byte at byte 22\); save it as UTF-8"
    with pytest.raises(UpcycleError, match=expected):
        read_yaml(path, "a training config")
