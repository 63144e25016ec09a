"""Each option is declared once: `ConvertOptions` makes the `upcycle convert` flags, the train config's `init` fields
and docs/convert.md's option table. Every option set through a flag or an init field reaches the conversion, and every
choice list is enforced by the flag, the Python API and the train config alike."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import pytest

from helpers import REPO, make_data_dir, tiny_config, write_config
from upcycle import cli
from upcycle.convert.options import ConvertOptions
from upcycle.errors import UpcycleError
from upcycle.train.config import InitConfig, load_config


def _convert_flags() -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s: a for a in sub.choices["convert"]._actions for s in a.option_strings}


def _other_value(f: dataclasses.Field, hint) -> object:
    """A valid value of option `f` other than its default, so that a field dropped on the way shows."""
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != f.default)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if typing.get_args(hint) and \
        type(None) in typing.get_args(hint) else hint
    if base is bool:
        return not f.default
    if base is int:
        return (f.default or 0) + 3
    if base is float:
        return f.default / 4 if f.default else 0.25
    if typing.get_origin(base) is tuple:
        return ("a", "b")
    return "layers-spec" if f.name == "moe_layers" else f"{f.name}-value"


def test_every_convert_option_reaches_convert_from_its_flag_and_from_the_init_section(monkeypatch, tmp_path):
    """Set every option to a value other than its default, once as `upcycle convert` flags and once as the train
    config's `init` fields: `convert` must receive each of them, so a field that a path drops or renames fails here."""
    hints = typing.get_type_hints(ConvertOptions)
    values = {f.name: _other_value(f, hints[f.name]) for f in dataclasses.fields(ConvertOptions)}
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    seen = {}
    (tmp_path / "config.json").write_text('{"model_type": "mixtral"}')  # what the command reads after converting
    monkeypatch.setattr("upcycle.convert.conversion.convert", lambda source, output, **kw: seen.update(kw) or tmp_path)
    cli.main(["convert", "src", "out", *argv, "--quiet"])
    assert {k: v for k, v in seen.items() if k not in ("force", "progress")} == values

    init = InitConfig(**{**values, "btx_sources": list(values["btx_sources"]), "source": "somewhere"})
    assert init.convert_options() == ConvertOptions(**values)
    assert set(f.name for f in dataclasses.fields(InitConfig)) == {"source"} | set(values)
    assert InitConfig().method is None  # load the source as it is, unless a method is given


def test_docs_table_is_the_generated_one():
    docs = (REPO / "docs" / "convert.md").read_text()
    table = re.search(r"<!-- options table:.*?-->\n(.*?)\n<!-- end of options table -->", docs, re.S).group(1)
    assert table == cli.options_table(ConvertOptions), "regenerate with upcycle.cli.options_table(ConvertOptions)"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ConvertOptions) if f.metadata.get("choices")])
def test_every_choice_list_is_enforced_by_the_flag_the_library_and_the_init_section(name, capsys):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(SystemExit) as exc:  # argparse
        cli.main(["convert", "src", "out", flag, "bogus"])
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(UpcycleError, match=f"^{flag} must be one of "):  # the Python API
        ConvertOptions(**{name: "bogus"}).validate()
    init = {"source": str(REPO), "method": "drop", name: "bogus"}
    with pytest.raises(UpcycleError, match=rf"^init\.{name} must be one of "):  # the train config
        InitConfig(**init).validate()


def test_convert_flags_build_one_options_object(monkeypatch, tmp_path):
    seen = {}
    (tmp_path / "config.json").write_text('{"model_type": "mixtral"}')  # what the command reads after converting
    monkeypatch.setattr("upcycle.convert.conversion.convert", lambda source, output, **kw: seen.update(kw) or tmp_path)
    cli.main(["convert", "src", "out", "--method", "btx", "--btx-sources", "a", "b", "--router-aux-loss-coef", "0.1",
              "--quiet"])
    assert seen["method"] == "btx" and seen["btx_sources"] == ("a", "b") and seen["router_aux_loss_coef"] == 0.1
    assert seen["ratio"] == ConvertOptions().ratio


def test_a_new_option_needs_one_declaration():
    extended = dataclasses.make_dataclass(
        "Extended", [("granularity", int, dataclasses.field(default=1)),
                     ("router_mode", str, dataclasses.field(default="a", metadata={"choices": ("a", "b")}))],
        bases=(ConvertOptions,), frozen=True)
    extended.__doc__ = "Options.\n\nAttributes:\n    granularity: Experts per dense FFN.\n    router_mode: A or b.\n"

    def command(source, options=extended()):
        """A command."""

    command.__annotations__ = {"source": str, "options": extended}  # real types: `extended` is a local name

    parser = argparse.ArgumentParser()
    cli._add_function(parser, command)
    args = vars(parser.parse_args(["x", "--granularity", "4", "--router-mode", "b"]))
    options = cli._collect_dataclasses(command, args)["options"]
    assert options.granularity == 4 and options.router_mode == "b" and options.method == "drop"
    assert "| `--granularity` (int) | `1` | - | Experts per dense FFN. |" in cli.options_table(extended)
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--router-mode", "c"])


def test_init_errors_name_init_fields(tmp_path):
    data = make_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data, model=None, init={"source": str(tmp_path)}))
    with pytest.raises(UpcycleError, match=r"init\.top_k"):
        load_config(config, ["init.method=drop", "init.num_experts=2", "init.top_k=3"])
    with pytest.raises(UpcycleError, match=r"init\.index_mode must be one of independent, shared"):
        load_config(config, ["init.method=drop", "init.index_mode=both"])
    with pytest.raises(UpcycleError, match=r"init\.btx_sources"):
        load_config(config, ["init.method=btx"])
