"""Each option is declared once: `ConvertOptions` makes the `upcycle convert` flags, the train config's `init` fields
and docs/convert.md's option table; choice lists come from the constants."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from helpers import REPO, make_data_dir, tiny_config, write_config
from upcycle import cli
from upcycle.convert import ConvertOptions
from upcycle.errors import UpcycleError
from upcycle.hf_formats import MOE_FORMATS
from upcycle.safetensors_io import DTYPE_NAMES
from upcycle.train_config import InitConfig, load_config
from upcycle.upcycling import INDEX_MODES, METHODS, ROUTER_INITS, STATS_MODES


def _convert_flags() -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s: a for a in sub.choices["convert"]._actions for s in a.option_strings}


def test_every_convert_option_is_a_flag_an_init_field_and_a_docs_row():
    flags = _convert_flags()
    init_fields = {f.name: f for f in dataclasses.fields(InitConfig)}
    docs = (REPO / "docs" / "convert.md").read_text()
    for f in dataclasses.fields(ConvertOptions):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, flag
        assert f.name in init_fields, f.name
        assert f"| `{flag}`" in docs, flag
        if f.name != "method":  # init.method defaults to none: load the source as it is
            assert init_fields[f.name].default == f.default, f.name
    assert set(init_fields) == {"source"} | {f.name for f in dataclasses.fields(ConvertOptions)}


def test_docs_table_is_the_generated_one():
    docs = (REPO / "docs" / "convert.md").read_text()
    table = re.search(r"<!-- options table:.*?-->\n(.*?)\n<!-- end of options table -->", docs, re.S).group(1)
    assert table == cli.options_table(ConvertOptions), "regenerate with upcycle.cli.options_table(ConvertOptions)"


def test_choices_come_from_the_constants():
    flags = _convert_flags()
    expected = {"--method": METHODS, "--index-mode": INDEX_MODES, "--stats": STATS_MODES,
                "--router-init": ROUTER_INITS, "--format": ("auto", *MOE_FORMATS), "--dtype": ("auto", *DTYPE_NAMES)}
    for flag, choices in expected.items():
        assert tuple(flags[flag].choices) == tuple(choices), flag


def test_convert_flags_build_one_options_object(monkeypatch, tmp_path):
    seen = {}
    (tmp_path / "config.json").write_text('{"model_type": "mixtral"}')  # what the command reads after converting
    monkeypatch.setattr("upcycle.convert.convert", lambda source, output, **kw: seen.update(kw) or tmp_path)
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
