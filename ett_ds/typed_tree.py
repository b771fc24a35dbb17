"""Typed dataclass trees from YAML plus ``key.sub=value`` overrides, and their reference docs: the generic part of
``ett_ds/config.py``, which declares the tree itself.

Values are checked against the annotations (``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``dict``,
``X | None``, nested dataclasses); a field's docstring is the string literal right after it in the class body.
A field declares the values it accepts in its annotation, ``Annotated[float, Range(gt=0)]`` (or an alias such as
``PosFloat``), with :class:`Range`, :class:`OneOf` and :class:`Len`: checked whenever a tree is built from a recipe
or overrides, and shown in the reference's type column. Every float must be finite. Every error is a one-line
:class:`ConfigError` that names the key.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from typing import Annotated, Any

import yaml

from .commandline import UserError


class ConfigError(UserError, ValueError):
    """A bad recipe or override; the message is one line that names the key."""


class ConstraintError(ConfigError):
    """A value of the right type outside what its field declares (reported as is, also inside ``X | None``)."""


class Range:
    """A number's bounds: ``Range(gt=0)``, ``Range(ge=0, lt=1)``, ..."""

    def __init__(self, gt=None, ge=None, lt=None, le=None):
        self.gt, self.ge, self.lt, self.le = gt, ge, lt, le

    def __str__(self) -> str:
        lo = self.gt if self.gt is not None else self.ge
        hi = self.lt if self.lt is not None else self.le
        if lo is not None and hi is not None:  # in [0, 1), in (0, 1], ...
            return f"in {'(' if self.gt is not None else '['}{_num(lo)}, {_num(hi)}{')' if self.lt is not None else ']'}"
        return " and ".join(f"{op} {_num(v)}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt),
                                                            ("<=", self.le)) if v is not None)

    def check(self, value, key: str) -> None:
        ok = ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
              and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        if not ok:
            raise ConstraintError(f"{key}: must be {self}, got {value!r}")


class OneOf:
    """A string from a fixed set."""

    def __init__(self, *choices: str):
        self.choices = choices

    def __str__(self) -> str:
        return "one of " + ", ".join(self.choices)

    def check(self, value, key: str) -> None:
        if value not in self.choices:
            raise ConstraintError(f"{key}: '{value}' is not one of {', '.join(self.choices)}")


class Len:
    """A list's length: ``Len(1)`` at least one item, ``Len(2, 2)`` exactly two."""

    def __init__(self, lo: int, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def __str__(self) -> str:
        if self.lo == self.hi:
            return f"{self.lo} items"
        return f"at least {self.lo} item{'s' * (self.lo != 1)}" if self.hi is None else f"{self.lo}-{self.hi} items"

    def check(self, value, key: str) -> None:
        if len(value) < self.lo or (self.hi is not None and len(value) > self.hi):
            raise ConstraintError(f"{key}: expected {self}, got {len(value)}: {value!r}")


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# the vocabulary config.py declares its fields with
PosInt = Annotated[int, Range(gt=0)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]  # a probability, a rate, a ratio of two amounts
Decay = Annotated[float, Range(ge=0, lt=1)]  # EMA decays and Adam betas: 1 would never move
PosFraction = Annotated[float, Range(gt=0, le=1)]  # a share that cannot be 0: nucleus sampling's top-p


def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def coerce(value: Any, tp: Any, key: str, moved: dict | None = None) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise a one-line ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *checks = typing.get_args(tp)
        value = coerce(value, inner, key, moved)
        for check in checks:
            check.check(value, key)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, moved)
            except ConstraintError:
                raise
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConstraintError(f"{key}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def type_name(tp: Any) -> str:
    """A type as written in the annotation: ``str``, ``list[int]``, ``float or None`` (never ``<class 'str'>``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:  # the constraints are shown by allowed()
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is not None and args:
        return f"{type_name(origin)}[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def allowed(tp: Any) -> str:
    """What a field accepts beyond its type, from its annotation: ``> 0``, ``2 items, each in [0, 1)``, ``''``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return "; ".join(filter(None, (allowed(a) for a in args)))
    if origin is Annotated:
        return ", ".join(filter(None, [", ".join(str(c) for c in args[1:]), allowed(args[0])]))
    if origin is list and args and allowed(args[0]):
        return f"each {allowed(args[0])}"
    return ""


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


def is_unset(tree: dict, key: str) -> bool:
    """Whether ``key`` ("a.b.c") is missing, None or empty in a nested dict."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) in (None, ""):
            return True
        node = node[part]
    return False


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
    """| key | type | default | allowed | meaning | rows for every leaf field of the tree ``cls``."""
    lines = []
    if not prefix:
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
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
        lines.append(f"| `{key}` | {type_name(tp).replace('|', 'or')} | `{val!r}` | {allowed(tp)} | "
                     f"{docs.get(f.name, '')} |")
    return "\n".join(lines)
