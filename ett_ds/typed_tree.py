"""Typed dataclass trees from YAML plus ``key.sub=value`` overrides, and their reference docs: the generic part of
``ett_ds/config.py``, which declares the tree itself.

Values are checked against the annotations (``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``dict``,
``X | None``, nested dataclasses); a field's docstring is the string literal right after it in the class body.
Every error is a one-line :class:`ConfigError` that names the key.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad recipe or override; the message is one line that names the key."""



def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str, moved: dict | None = None) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise a one-line ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, moved)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
        return build(tp, value, key, moved)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [coerce(v, inner, f"{key}[{i}]", moved) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def type_name(tp: Any) -> str:
    """A type as written in the annotation: ``str``, ``list[int]``, ``float or None`` (never ``<class 'str'>``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is not None and args:
        return f"{type_name(origin)}[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def build(cls, data: dict, prefix: str = "", moved: dict | None = None):
    """``cls`` from a mapping, recursively; ``moved``: old dotted keys -> their new names (a clear error)."""
    hints_ = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            if moved and key in moved:
                raise ConfigError(f"config key '{key}' is now '{moved[key]}'")
            raise ConfigError(f"unknown config key '{key}' (valid: {', '.join(names)})")
        kwargs[k] = coerce(v, hints_[k], key, moved)
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {} if nxt is None else nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: '{p}' is not a section")
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value



def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring literal that follows it in the class body."""
    src = inspect.getsource(cls)
    tree = ast.parse(src)
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def markdown_table(cls, prefix: str = "") -> str:
    """| key | type | default | meaning | rows for every leaf field of the tree ``cls``."""
    lines = []
    if not prefix:
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    docs = field_docs(cls)
    hints_ = hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints_[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(markdown_table(tp, key + "."))
            continue
        val = getattr(default, f.name)
        lines.append(f"| `{key}` | {type_name(tp).replace('|', 'or')} | `{val!r}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)
