"""The one generic check of option values against their declared types: every config (each YAML file through
`upcycle.config.build`, `ConvertOptions`, `upcycle data prepare`'s options) runs its values through here before its own
range checks.

A value comes from YAML, JSON, the command line or Python, so it may be of any type: `optim.betas: "ab"`, weights
given as a list, sources given as numbers. Each is refused with one line naming the field (and, inside a list or
mapping, the item), what it must be, and what it got. Every float must be finite: NaN compares false with every bound
(`nan < 0` and `nan > 0` are both false), so a NaN slips through any range check written as a comparison and then
silently disables clipping, drops a data domain or writes NaN weights; Inf passes `> 0` checks and does the same.

Supported annotations: bool, int, float, str, Path, None, `X | Y`, Literal[...], list[X], tuple[X, ...], tuple[X, Y],
dict[K, V], Sequence[X], Mapping[K, V], and bare dict/list/tuple.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import os
import reprlib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 4
_SHORT.maxlevel = 2

# (singular, plural) of the scalar types, for messages
_NOUNS = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"),
          float: ("a finite number", "finite numbers"), str: ("a string", "strings"), Path: ("a path", "paths"),
          type(None): ("null", "nulls")}
_SEQUENCES = (list, tuple, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def short_repr(value: Any) -> str:
    """repr() cut to a few dozen characters: a message must stay one line whatever the user passed."""
    return _SHORT.repr(value)


def union_members(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)


def describe(hint: Any, *, plural: bool = False) -> str:
    """'an integer', 'a list of finite numbers', 'a mapping of strings to lists of strings', ..."""
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    if hint is Any or hint is object:
        return "values" if plural else "any value"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a, plural=plural) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in _SEQUENCES or hint in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            inner = f"{len(args)} " + describe(args[0], plural=True) if len(set(args)) == 1 else \
                ", ".join(describe(a) for a in args)
            return ("lists of " if plural else "a list of ") + inner
        inner = describe(args[0], plural=True) if args else "values"
        return ("lists of " if plural else "a list of ") + inner
    if origin in _MAPPINGS or hint is dict:
        if not args:
            return "mappings" if plural else "a mapping"
        return (("mappings of " if plural else "a mapping of ") + describe(args[0], plural=True) + " to "
                + describe(args[1], plural=True))
    if dataclasses.is_dataclass(hint):  # a section of a config, built from a mapping (upcycle.config.build)
        return "mappings" if plural else "a mapping"
    name = getattr(hint, "__name__", str(hint))
    return f"{name} values" if plural else f"a {name}"


def _fail(name: str, hint: Any, value: Any) -> UpcycleError:
    return UpcycleError(f"{name} must be {describe(hint)}, got {short_repr(value)}")


def _fits_outer(hint: Any, value: Any) -> bool:
    """Whether `value` is at least the right kind of thing for `hint` (a list for a list, ...), items unchecked."""
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    try:
        check_value("", hint, value)
    except UpcycleError:
        return False
    return True


def check_value(name: str, hint: Any, value: Any) -> None:
    """Raise UpcycleError naming `name` (and the item, inside a list or mapping) when `value` does not fit `hint`."""
    if hint is Any or hint is object:
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        candidates = [a for a in args if a is not type(None) and _fits_outer(a, value)]
        if not candidates:
            raise _fail(name, hint, value)
        check_value(name, candidates[0], value)  # the member it looks like, for the precise message
        return
    if origin is typing.Literal:
        if value not in args:
            raise _fail(name, hint, value)
        return
    if hint is type(None):
        if value is not None:
            raise _fail(name, hint, value)
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(name, hint, value)
        return
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(name, hint, value)
        return
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _fail(name, hint, value)
        return
    if hint is str:
        if not isinstance(value, str):
            raise _fail(name, hint, value)
        return
    if hint in (Path, os.PathLike):
        if not isinstance(value, (str, os.PathLike)):
            raise _fail(name, hint, value)
        return
    if origin in _SEQUENCES or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(name, hint, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _fail(name, hint, value)
            for index, (item, item_hint) in enumerate(zip(value, args)):
                check_value(f"{name}[{index}]", item_hint, item)
            return
        for index, item in enumerate(value):
            check_value(f"{name}[{index}]", args[0] if args else Any, item)
        return
    if origin in _MAPPINGS or hint is dict:
        if not isinstance(value, dict):
            raise _fail(name, hint, value)
        key_hint, value_hint = args if args else (Any, Any)
        for key, item in value.items():
            check_value(f"{name} key", key_hint, key)
            check_value(f"{name}.{key}", value_hint, item)
        return
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _fail(name, hint, value)


def check_fields(obj: Any, name: Callable[[str], str]) -> None:
    """Every field of dataclass instance `obj` against its annotation and its `choices` metadata; `name(field)` is how
    errors spell the field (`--noise-std`, `optim.grad_clip`, ...)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        check_value(name(f.name), hints[f.name], value)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UpcycleError(f"{name(f.name)} must be one of {', '.join(map(str, choices))}, got "
                               f"{short_repr(value)}")


def check_arguments(func: Callable, values: dict[str, Any], name: Callable[[str], str]) -> None:
    """The arguments `values` of a call of `func` against its annotations (a command's options that are plain
    parameters rather than a dataclass)."""
    hints = typing.get_type_hints(func)
    for param in inspect.signature(func).parameters:
        if param in values and param in hints:
            check_value(name(param), hints[param], values[param])
