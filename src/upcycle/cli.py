"""Command-line entry point: `upcycle COMMAND ...` or `python -m upcycle COMMAND ...`.

Every command is a plain typed function with a Google-style docstring in commands.py, which imports what it runs
inside its body: `upcycle --help` and `upcycle COMMAND --help` load neither torch nor transformers. This file lists
them (`COMMANDS`) and turns each signature into argparse flags: parameters without a default are positional
(keyword-only ones become required options), `snake_case`
becomes `--snake-case`, `bool` becomes an on/off flag, `list[...]` takes one or more values, `Literal[...]` gives the
allowed choices, and the docstring's `Args:` section becomes the help text.

A command with an `override: list[str]` parameter also accepts `--section.field VALUE` for any field of its config
file; those arrive in `override` as `section.field=VALUE`.

Library code raises `UpcycleError` for bad input; only here is it turned into one line on stderr and exit status 2. So
is an OSError (a full disk, a read-only file system, a file where a directory should be): one line naming the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import sys
import types
import typing
from collections.abc import Callable

from upcycle.errors import UpcycleError


# Command name -> its function in commands.py (a group of subcommands: name -> their table), in the order --help lists
# them.
COMMANDS: dict[str, str | dict[str, str]] = {
    "convert": "convert_command",
    "compose": "compose_command",
    "check": "check_command",
    "grow": "grow_command",
    "train": "train_command",
    "plan": "plan_command",
    "export": "export_command",
    "data": {"prepare": "prepare_command"},
    "eval": "eval_command",
    "analyze": "analyze_command",
    "bench": "bench_command",
    "experiment": "experiment_command",
}


def _commands() -> dict[str, Callable | dict[str, Callable]]:
    """The command functions by name (commands.py imports no torch: see the module docstring)."""
    from upcycle import commands

    def resolve(table: dict) -> dict:
        return {name: resolve(target) if isinstance(target, dict) else getattr(commands, target)
                for name, target in table.items()}

    return resolve(COMMANDS)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help, as every other error of ours; and an epilog
    made only when this parser's help is shown (`epilog_of`: a function returning it), so listing a config's fields
    costs nothing to the other commands."""

    def __init__(self, *args, epilog_of: Callable[[], str | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._epilog_of = epilog_of

    def format_help(self) -> str:
        if self._epilog_of is not None:
            self.epilog, self._epilog_of = self._epilog_of(), None
        return super().format_help()

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _docstring(func: Callable | type) -> tuple[str, dict[str, str]]:
    """(description, {name: help}) from a Google-style docstring: a function's `Args:` or a dataclass's
    `Attributes:` section (the one parser, `upcycle.config.doc_entries`)."""
    from upcycle.config import doc_entries

    return doc_entries(func)


def _epilog(func: Callable) -> str | None:
    """A command may list more than its signature (e.g. the fields of its config file) as `func.help_epilog()`."""
    epilog = getattr(func, "help_epilog", None)
    return epilog() if epilog else None


class _ExtendList(argparse.Action):
    """A list flag that may be given more than once: `--domain a=x --domain b=y` means both domains (argparse's plain
    nargs="+" would silently keep only the last). The first use replaces the default, later ones add to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        current = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, [*current, *values])


def _add_argument(parser: argparse.ArgumentParser, name: str, hint, default, help_text: str, *,
                  positional: bool, required: bool, choices: tuple = (), dest: str | None = None) -> None:
    """One flag (or positional) for a parameter or dataclass field `name` of type `hint`."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in args if a is not type(None))
        args, origin = typing.get_args(hint), typing.get_origin(hint)
    kwargs: dict = {"help": help_text}
    if origin is typing.Literal:
        choices = args
    if choices:
        kwargs.update(choices=list(choices), type=type(choices[0]))
    elif origin in (list, tuple):
        kwargs.update(nargs="+", type=args[0] if args else str)
        if not positional:
            kwargs["action"] = _ExtendList
    elif hint is bool:
        kwargs.update(action=argparse.BooleanOptionalAction)
    else:
        kwargs["type"] = hint
    if positional:
        kwargs.pop("action", None)
        parser.add_argument(name, **kwargs)
        return
    flag = "--" + name.replace("_", "-")
    if dest is not None and not choices and kwargs.get("action") is not argparse.BooleanOptionalAction:
        kwargs["metavar"] = name.upper()
    if required:
        parser.add_argument(flag, dest=dest or name, required=True, **kwargs)
        return
    if default is not None and default != () and hint is not bool:
        kwargs["help"] += f" (default: {default})"
    parser.add_argument(flag, dest=dest or name, default=default, **kwargs)


_FIELD_DEST = "{param}:{field}"


def _add_function(parser: argparse.ArgumentParser, func: Callable) -> None:
    """Flags from `func`'s signature; a parameter typed as a dataclass becomes one flag per field of it."""
    hints = typing.get_type_hints(func)
    _, helps = _docstring(func)
    for name, param in inspect.signature(func).parameters.items():
        hint = hints.get(name, str)
        if dataclasses.is_dataclass(hint):
            field_hints = typing.get_type_hints(hint)
            _, field_helps = _docstring(hint)
            for f in dataclasses.fields(hint):
                _add_argument(parser, f.name, field_hints[f.name], f.default, field_helps.get(f.name, ""),
                              positional=False, required=False, choices=f.metadata.get("choices", ()),
                              dest=_FIELD_DEST.format(param=name, field=f.name))
            continue
        no_default = param.default is inspect.Parameter.empty
        keyword_only = param.kind is inspect.Parameter.KEYWORD_ONLY
        _add_argument(parser, name, hint, None if no_default else param.default, helps.get(name, ""),
                      positional=no_default and not keyword_only, required=no_default and keyword_only)
    parser.set_defaults(_func=func, _parser=parser)


def _collect_dataclasses(func: Callable, args: dict) -> dict:
    """Gather the per-field flags of each dataclass parameter back into one instance of it."""
    hints = typing.get_type_hints(func)
    for name in inspect.signature(func).parameters:
        cls = hints.get(name)
        if not dataclasses.is_dataclass(cls):
            continue
        values = {}
        for f in dataclasses.fields(cls):
            value = args.pop(_FIELD_DEST.format(param=name, field=f.name))
            values[f.name] = tuple(value) if isinstance(value, list) else value
        args[name] = cls(**values)
    return args


def options_table(cls: type, *, as_fields: bool = False) -> str:
    """The markdown table (flag, default, choices, meaning) of a dataclass of command options, for the docs;
    `as_fields`: named as fields of a YAML file (`top_k`) rather than flags (`--top-k`)."""
    field_hints = typing.get_type_hints(cls)
    _, helps = _docstring(cls)
    lines = [f"| {'field' if as_fields else 'flag'} | default | choices | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = "required"
        else:
            default = "none" if f.default is None else ("-" if f.default == () else f"`{f.default}`")
        choices = ", ".join(f"`{c}`" for c in f.metadata.get("choices", ())) or "-"
        hint = field_hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kind = ("list" if typing.get_origin(hint) in (list, tuple)
                else "/".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint)) or hint.__name__)
        name = f"`{f.name}`" if as_fields else f"`--{f.name.replace('_', '-')}`"
        flag = name + ("" if f.metadata.get("choices") else f" ({kind})")
        lines.append(f"| {flag} | {default} | {choices} | {helps.get(f.name, '')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from upcycle import __version__

    parser = _Parser(prog="upcycle",
                     description="Drop-Upcycling: dense checkpoint -> Mixture-of-Experts, and training.")
    parser.add_argument("--version", action="version", version=f"upcycle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(container, name: str, target) -> None:
        if isinstance(target, dict):
            group = container.add_parser(name, help=f"{name} commands")
            inner = group.add_subparsers(dest=f"{name}_command", required=True, parser_class=_Parser)
            for inner_name, func in target.items():
                add(inner, inner_name, func)
            return
        description, _ = _docstring(target)
        child = container.add_parser(name, help=description.splitlines()[0] if description else "",
                                     description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog_of=lambda: _epilog(target))
        _add_function(child, target)

    for name, target in _commands().items():
        add(sub, name, target)
    return parser


def _dotted_overrides(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    """['--optim.lr', '1e-3', '--train.seed=2'] -> ['optim.lr=1e-3', 'train.seed=2']; anything else is an error."""
    out, i = [], 0
    while i < len(extra):
        flag = extra[i]
        name, eq, value = flag[2:].partition("=") if flag.startswith("--") else ("", "", "")
        if "." not in name:
            parser.error(f"unrecognized arguments: {' '.join(extra[i:])}")
        if not eq:
            if i + 1 >= len(extra):
                parser.error(f"{flag} needs a value")
            value, i = extra[i + 1], i + 1
        out.append(f"{name.replace('-', '_')}={value}")
        i += 1
    return out


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the path(s) involved, the system's reason and its errno name."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno) if exc.errno else None
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    line = f"{paths}: {reason}" if paths else reason
    return line + (f" ({code})" if code else "") + "; check the path, its permissions and the free space"


def _call(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    args, extra = parser.parse_known_args(argv)
    args = vars(args)
    func, own_parser = args.pop("_func"), args.pop("_parser")
    args = _collect_dataclasses(func, args)
    parameters = inspect.signature(func).parameters
    kwargs = {k: v for k, v in args.items() if k in parameters}
    if extra:
        if "override" not in parameters:
            own_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        kwargs["override"] = [*(kwargs.get("override") or []), *_dotted_overrides(own_parser, extra)]
    try:
        result = func(**kwargs)
    except UpcycleError as exc:
        print(f"upcycle: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a full disk, a read-only or /proc path, a file where a directory should be, ...
        print(f"upcycle: error: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("upcycle: interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int) and result != 0:
        sys.exit(result)


def main(argv: list[str] | None = None) -> None:
    from upcycle.formats.model_card import record_command

    argv = sys.argv[1:] if argv is None else argv
    record_command(argv)  # model cards say which command made them
    _call(build_parser(), argv)


if __name__ == "__main__":
    main()
