"""Every `--flag` that an error message tells the user to pass exists as a flag of some `upcycle` command.

The messages are read from the source (string literals, f-string parts included, inside `raise ...`,
`UpcycleError(...)`, `SystemExit(...)` and `parser.error(...)`), so a message added later is checked too. A dotted train
override such as `--optim.lr` exists when its section and field are fields of the train config.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import typing
from pathlib import Path

import upcycle
from upcycle.cli import build_parser

SOURCES = sorted(Path(upcycle.__file__).parent.rglob("*.py"))  # every module, also once they sit in subpackages
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*(?:\.[A-Za-z_][\w-]*)?)")
_MESSAGE_CALLS = {"UpcycleError", "SystemExit", "error"}


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def message_flags(source: str) -> list[tuple[int, str]]:
    """(line, flag) for every --flag in a string literal of an error message in `source`."""
    literals = {}  # a literal inside `raise UpcycleError(...)` is reached twice; count it once
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) or isinstance(node, ast.Call) and _call_name(node) in _MESSAGE_CALLS:
            for inner in ast.walk(node):
                if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                    literals[id(inner)] = inner
    return [(c.lineno, m.group(1)) for c in sorted(literals.values(), key=lambda c: (c.lineno, c.col_offset))
            for m in FLAG.finditer(c.value)]


def cli_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The long option names (without --) of a parser and all its subcommands, recursively."""
    flags = set()
    for action in parser._actions:
        flags.update(s[2:] for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                flags |= cli_flags(child)
    return flags


def override_flags() -> set[str]:
    """`section.field` for every field of every section of the train config (the dotted overrides of train)."""
    from upcycle.train.config import TrainConfig

    names = set()
    for section, hint in typing.get_type_hints(TrainConfig).items():
        cls = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        if cls is not None:
            names |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    return names


def test_the_scanner_finds_flags_in_messages_only():
    source = ('def f(x):\n'
              '    """Docstring --not-a-message."""\n'
              '    if x:\n'
              '        raise UpcycleError(f"bad {x}; pass --text-field or --optim.lr.")\n'
              '    parser.error("use --force")\n')
    assert message_flags(source) == [(4, "text-field"), (4, "optim.lr"), (5, "force")]
    assert message_flags('raise UpcycleError("pass --text_field")') == [(1, "text_field")]


# flags of other programs that our messages tell the user to pass to them
TORCHRUN_FLAGS = {"nproc_per_node", "nnodes"}


def test_every_flag_named_in_an_error_message_exists():
    known = cli_flags(build_parser()) | override_flags() | TORCHRUN_FLAGS
    assert {"text-field", "eos-token", "force", "optim.lr", "train.max_steps"} <= known
    root = Path(upcycle.__file__).parent
    missing = [f"{path.relative_to(root)}:{line}: --{flag}" for path in SOURCES
               for line, flag in message_flags(path.read_text()) if flag not in known]
    assert not missing, "error messages name flags that no upcycle command has:\n" + "\n".join(missing)
