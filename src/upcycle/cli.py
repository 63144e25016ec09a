"""Command-line entry point: `upcycle COMMAND ...` or `python -m upcycle COMMAND ...`.

Every command is a plain typed function with a Google-style docstring that lives beside the code it drives; this file
lists them and turns each signature into argparse flags: parameters without a default are positional
(keyword-only ones become required options), `snake_case`
becomes `--snake-case`, `bool` becomes an on/off flag, `list[...]` takes one or more values, `Literal[...]` gives the
allowed choices, and the docstring's `Args:` section becomes the help text.

A command with an `override: list[str]` parameter also accepts `--section.field VALUE` for any field of its config
file; those arrive in `override` as `section.field=VALUE`.

Library code raises `UpcycleError` for bad input; only here is it turned into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from collections.abc import Callable

from upcycle.errors import UpcycleError


def _commands() -> dict[str, Callable | dict[str, Callable]]:
    # Imported here so `upcycle --help` stays fast and a broken optional extra only breaks the command that needs it.
    from upcycle.analyze import analyze_command
    from upcycle.check import check_command
    from upcycle.convert import convert_command
    from upcycle.data import prepare_command
    from upcycle.evaluate import eval_command
    from upcycle.experiment import experiment_command
    from upcycle.hf_model import export_command
    from upcycle.train import train_command

    return {
        "convert": convert_command,
        "check": check_command,
        "train": train_command,
        "export": export_command,
        "data": {"prepare": prepare_command},
        "eval": eval_command,
        "analyze": analyze_command,
        "experiment": experiment_command,
    }


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help, as every other error of ours."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _docstring(func: Callable) -> tuple[str, dict[str, str]]:
    """(description, {parameter: help}) from a Google-style docstring."""
    doc = inspect.getdoc(func) or ""
    description, _, args = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    current = None
    for line in args.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        head, sep, rest = stripped.partition(":")
        if sep and line.startswith("    ") and not line.startswith("        ") and head.isidentifier():
            current = head
            helps[current] = rest.strip()
        elif current:
            helps[current] += " " + stripped
    return description.strip(), helps


def _epilog(func: Callable) -> str | None:
    """A command may list more than its signature (e.g. the fields of its config file) as `func.help_epilog()`."""
    epilog = getattr(func, "help_epilog", None)
    return epilog() if epilog else None


def _add_function(parser: argparse.ArgumentParser, func: Callable) -> None:
    hints = typing.get_type_hints(func)
    _, helps = _docstring(func)
    for name, param in inspect.signature(func).parameters.items():
        hint = hints.get(name, str)
        args = typing.get_args(hint)
        origin = typing.get_origin(hint)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # X | None
            hint = next(a for a in args if a is not type(None))
            args, origin = typing.get_args(hint), typing.get_origin(hint)
        kwargs: dict = {"help": helps.get(name, "")}
        if origin is typing.Literal:
            kwargs.update(choices=list(args), type=type(args[0]))
        elif origin in (list, tuple):
            kwargs.update(nargs="+", type=args[0] if args else str)
        elif hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs["type"] = hint
        if param.default is inspect.Parameter.empty and param.kind is not inspect.Parameter.KEYWORD_ONLY:
            kwargs.pop("action", None)
            parser.add_argument(name, **kwargs)
        elif param.default is inspect.Parameter.empty:  # keyword-only without default: a required option
            parser.add_argument("--" + name.replace("_", "-"), dest=name, required=True, **kwargs)
        else:
            if param.default is not None and hint is not bool:
                kwargs["help"] += f" (default: {param.default})"
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=param.default, **kwargs)
    parser.set_defaults(_func=func, _parser=parser)


def build_parser() -> argparse.ArgumentParser:
    from upcycle import __version__

    parser = _Parser(prog="upcycle", description="Drop-Upcycling: dense checkpoint -> Mixture-of-Experts, and training.")
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
                                     epilog=_epilog(target))
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


def _call(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    args, extra = parser.parse_known_args(argv)
    args = vars(args)
    func, own_parser = args.pop("_func"), args.pop("_parser")
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
    except KeyboardInterrupt:
        print("upcycle: interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int) and result != 0:
        sys.exit(result)


def run_function(func: Callable, argv: list[str], prog: str) -> None:
    """Run one command function with its own parser (for `python -m upcycle.train`, which torchrun launches)."""
    parser = _Parser(prog=prog, description=_docstring(func)[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=_epilog(func))
    _add_function(parser, func)
    _call(parser, argv)


def main(argv: list[str] | None = None) -> None:
    _call(build_parser(), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
