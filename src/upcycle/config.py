"""One config mechanism for every YAML file of ours (the training config, the experiment config, the compose spec):
the YAML loader (aliases and duplicate keys refused), one builder of dataclasses from the parsed mapping, and the field
docs and `--help` lists made from the same dataclasses.

Every mistake the builder finds is one line, in one of three forms (`where`: the dotted path of the section, e.g.
`train`, `arms[2] (drop)`, `experts[0]`; a reader may put its file's path in front):

    {where}.{field}: unknown field; {where} accepts: a, b, c       (with `(renamed to X)` after `unknown field`)
    {where}.{field} must be {what}, got {value}
    {where}.{field}[{i}] must be {what}, got {value}

What a dataclass may declare for the builder: `choices` field metadata; `derived` field metadata (not read from a
file); a class attribute `RENAMED = {old name: what to write instead}` (refused, naming the new spelling; a field
inherited from a base class that is listed there is not taken either); and `config_where(where, values)`, the name an
item of a list of it has in messages. Range checks stay in each dataclass's `__post_init__` or `validate()`.

Imports only the standard library, yaml and upcycle's errors and validation: `--help` reads it without torch.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from upcycle.errors import UpcycleError
from upcycle.validation import check_value, describe, short_repr, union_members

# ---------------------------------------------------------------------------------------------------------------------
# YAML


class _Refused(Exception):
    """A YAML construct no config of ours accepts; the message starts with its line."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load without aliases and without duplicate keys.

    Aliases: `*name` refers back to an `&name` anchor, and nested aliases expand exponentially (a "billion laughs" file
    of a few hundred bytes would become gigabytes when the config is copied or written out). No config of ours has a
    use for them, so the first alias is refused before anything expands. Duplicate keys: PyYAML keeps the last one
    silently, so a field given twice would quietly lose its first value.
    """

    what = "a config"  # for messages: "a training config", "a compose spec", ...

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not accepted in "
                           f"{self.what}; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}  # 1, 1.0 and true are one key of a dict
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML refuses it below
                    continue
                if first is not None:
                    raise _Refused(f"line {line}: key {short_repr(key)} is given twice in one mapping (first on line "
                                   f"{first}); keep one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str, what: str) -> Any:
    """The value of YAML `text` (safe types only; aliases and duplicate keys refused); `where` (a path, an override)
    and `what` ("a training config") name it in errors."""
    loader = _Loader(text)
    loader.what = what
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise UpcycleError(f"{where}, {exc}") from None
    except yaml.YAMLError as exc:
        raise UpcycleError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML file at `path` (an empty file: {})."""
    path = Path(path)
    if not path.is_file():
        raise UpcycleError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UpcycleError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UpcycleError(f"cannot read {path}: {exc.strerror or exc}") from None
    values = load_yaml(text, str(path), what)
    return {} if values is None else values


# ---------------------------------------------------------------------------------------------------------------------
# Building dataclasses


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that a file sets: all but `derived` ones and the names in `cls.RENAMED`."""
    renamed = getattr(cls, "RENAMED", {})
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("derived") and f.name not in renamed]


def join(where: str, name: Any) -> str:
    """The dotted name of field `name` of the section at `where` ('' is the top level)."""
    return f"{where}.{name}" if where else str(name)


def refuse_unknown(values: dict, accepted: collections.abc.Iterable[str], where: str = "", *, what: str = "the config",
                   renamed: dict[str, str] | None = None) -> None:
    """Refuse the first key of `values` that is not in `accepted`, naming what is accepted (and, for a name in
    `renamed`, what to write instead); `what` names the top level."""
    accepted = list(accepted)
    unknown = sorted((key for key in values if key not in accepted), key=str)
    if unknown:
        name = unknown[0]
        note = f" (renamed to {renamed[name]})" if renamed and name in renamed else ""
        raise UpcycleError(f"{join(where, name)}: unknown field{note}; {where or what} accepts: "
                           f"{', '.join(sorted(accepted))}")


def build(cls: type, values: Any, where: str = "", *, what: str = "the config") -> Any:
    """Dataclass `cls` from a parsed mapping: unknown and renamed fields refused, required ones demanded, every value
    coerced (`_coerce`) and checked against its annotation and `choices`, sections and lists of sections built the
    same way. `where` is the section's dotted path ('' for the top level, which messages call `what`). None builds the
    defaults; an instance of `cls` is taken as it is."""
    if isinstance(values, cls):
        return values
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UpcycleError(f"{where or what} must be a mapping, got {short_repr(values)}")
    fields = config_fields(cls)
    refuse_unknown(values, [f.name for f in fields], where, what=what, renamed=getattr(cls, "RENAMED", None))
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields:
        name = join(where, f.name)
        if f.name in values:
            out[f.name] = _field_value(f, hints[f.name], values[f.name], name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UpcycleError(f"{name} is required ({describe(hints[f.name])})")
    try:
        return cls(**out)
    except UpcycleError as exc:  # a __post_init__ check: its message names the field, not the section
        raise UpcycleError(f"{where}: {exc}" if where else str(exc)) from None


def check_values(cls: type, values: dict, where: str = "", *, accepted: collections.abc.Iterable[str] | None = None
                 ) -> dict:
    """Some fields of dataclass `cls` given as a mapping (options handed on to it later), checked as `build` checks
    them; a name not in `accepted` (default: every field) is refused. Returns the coerced values."""
    fields = {f.name: f for f in config_fields(cls) if accepted is None or f.name in accepted}
    refuse_unknown(values, fields, where)
    hints = typing.get_type_hints(cls)
    return {key: _field_value(fields[key], hints[key], value, join(where, key)) for key, value in values.items()}


def _section_class(hint: Any) -> type | None:
    """The dataclass of a section annotated `X` or `X | None`."""
    return next((a for a in union_members(hint) if dataclasses.is_dataclass(a)), None)


def _item_class(hint: Any) -> type | None:
    """The dataclass of a list of sections, `list[X]`."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]) else None


def _field_value(f: dataclasses.Field, hint: Any, value: Any, name: str) -> Any:
    section, item = _section_class(hint), _item_class(hint)
    if section is not None:
        return None if value is None and type(None) in union_members(hint) else build(section, value, name)
    if item is not None:
        if not isinstance(value, list):
            raise UpcycleError(f"{name} must be {describe(hint)}, got {short_repr(value)}")
        label = getattr(item, "config_where", None)
        return [build(item, v, label(f"{name}[{i}]", v) if label and isinstance(v, dict) else f"{name}[{i}]")
                for i, v in enumerate(value)]
    value = _coerce(hint, value)
    check_value(name, hint, value)
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise UpcycleError(f"{name} must be one of {', '.join(map(str, choices))}, got {short_repr(value)}")
    return value


_SEQUENCES = (list, tuple, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def _coerce(hint: Any, value: Any) -> Any:
    """`value` as the annotation means it, where that is unambiguous: PyYAML (YAML 1.1) reads `1e-3` (no dot) as a
    string, taken as the number it obviously is; an integer where only a float fits becomes that float; a list where a
    tuple is declared becomes a tuple; items of lists and values of mappings likewise. Anything else is left for
    `check_value` to judge."""
    members = union_members(hint)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if float in members and str not in members and Path not in members:
            try:
                return float(value)
            except ValueError:
                return value
        return value
    if isinstance(value, int):
        return float(value) if float in members and int not in members else value
    if isinstance(value, (list, tuple)):
        sequences = [m for m in members if (typing.get_origin(m) or m) in _SEQUENCES]
        if len(sequences) != 1:
            return value
        origin, args = typing.get_origin(sequences[0]) or sequences[0], typing.get_args(sequences[0])
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(_coerce(a, v) for a, v in zip(args, value)) if len(args) == len(value) else value
        items = [_coerce(args[0], v) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if isinstance(value, dict):
        mappings = [m for m in members if (typing.get_origin(m) or m) in _MAPPINGS]
        if len(mappings) != 1 or not typing.get_args(mappings[0]):
            return value
        value_hint = typing.get_args(mappings[0])[1]
        return {key: _coerce(value_hint, item) for key, item in value.items()}
    return value


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe data of a built config (tuples become lists; fields a file does not set, per RENAMED, left
    out): what OUT's config files record."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        renamed = getattr(type(obj), "RENAMED", {})
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in renamed}
    if isinstance(obj, dict):
        return {key: to_dict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(value) for value in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# Field docs and --help


def _doc_section(doc: str, section: str) -> tuple[str, dict[str, str]]:
    description, _, body = doc.partition(f"\n{section}:\n")
    entries: dict[str, str] = {}
    current, level = None, None
    for line in body.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        level = indent if level is None else level
        if indent < level:  # the next section (Returns:, ...)
            break
        head, sep, rest = stripped.partition(":")
        if indent == level and sep and head.isidentifier():
            current = head
            entries[current] = rest.strip()
        elif current:
            entries[current] += " " + stripped
    return description.strip(), entries


def doc_entries(obj: Any) -> tuple[str, dict[str, str]]:
    """(description, {name: text}) from a Google-style docstring, each entry joined into one line: a function's `Args:`
    section, a class's `Attributes:` (merged over its bases, so a dataclass documents only what it adds or changes)."""
    if not isinstance(obj, type):
        return _doc_section(inspect.getdoc(obj) or "", "Args")
    entries: dict[str, str] = {}
    for klass in reversed(obj.__mro__):
        doc = vars(klass).get("__doc__")
        if isinstance(doc, str):
            entries.update(_doc_section(inspect.cleandoc(doc), "Attributes")[1])
    return _doc_section(inspect.getdoc(obj) or "", "Attributes")[0], entries


def help_type(hint: Any) -> str:
    """INT, FLOAT, STR, BOOL, PATH, [X], [X, Y], {NAME: X}, X | Y: a field's type as --help shows it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(help_type(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin in _SEQUENCES or hint in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(help_type(a) for a in args) + "]"
        return f"[{help_type(args[0]) if args else 'VALUE'}]"
    if origin in _MAPPINGS or hint is dict:
        return f"{{NAME: {help_type(args[1]) if args else 'VALUE'}}}"
    if dataclasses.is_dataclass(hint):
        return "MAPPING"
    return {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL", Path: "PATH"}.get(hint, "VALUE")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "empty"
    return value if isinstance(value, str) and value else json.dumps(value, default=str)


def fields_help(cls: type, title: str, *, flags: bool = False) -> str:
    """Every field a file of dataclass `cls` sets, as `--help` lists them: `name: TYPE  [default]` (`flags`: as the
    override flag, `--section.name TYPE  [default]`) and its doc, sections and lists of sections indented below."""
    lines = [title]

    def add(cls: type, indent: int, prefix: str) -> None:
        _, docs = doc_entries(cls)
        hints = typing.get_type_hints(cls)
        pad = " " * indent
        for f in config_fields(cls):
            hint = hints[f.name]
            section, item = _section_class(hint), _item_class(hint)
            if section is not None:
                head = f"{pad}{f.name}:" + ("  [empty]" if type(None) in union_members(hint) else "")
            elif item is not None:
                head = f"{pad}{f.name}: list of {f.name}, each:  [{_default_text(f)}]"
            else:
                choices = f.metadata.get("choices")
                kind = " | ".join(map(str, choices)) if choices else help_type(hint)
                name = f"--{prefix}{f.name} " if flags else f"{f.name}: "
                head = f"{pad}{name}{kind}  [{_default_text(f)}]"
            lines.append(head)
            lines.extend(textwrap.wrap(docs.get(f.name, ""), width=116, initial_indent=pad + "    ",
                                       subsequent_indent=pad + "    ", break_on_hyphens=False))
            if section is not None or item is not None:
                add(section or item, indent + 2, f"{prefix}{f.name}.")

    add(cls, 2, "")
    return "\n".join(lines)
