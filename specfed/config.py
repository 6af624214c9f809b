"""Typed configuration files: one machinery for scenarios, study files and point lists.

Every file the project reads (a scenario, a study file, the points a runner hands to a
server) is held in a pydantic model built from `StrictModel`: unknown fields, non-finite
numbers and wrong types are refused, and *every* problem of a file is reported at once as
`FILE: field.path: what was expected (got VALUE)`, one line each (`ConfigError`).

YAML is read with `load_yaml`, which refuses duplicate keys (YAML's "last one wins" hides
typos) and names the line and column of a syntax error. `set_path` / `get_path` address a
field by its dotted path (`links.w1.bw_mbit`), and `cross_product` expands a sweep (one
mapping of path -> values, or a list of them: their union) into its points.
"""

from __future__ import annotations

import copy
import itertools
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "StrictModel",
    "cross_product",
    "get_path",
    "load_yaml",
    "parse_yaml_text",
    "set_path",
    "validation_problems",
]


class ConfigError(ValueError):
    """A configuration file (or command-line value) is invalid.

    `problems` holds one (field path, message) pair per problem; str() gives one line per
    problem, each starting with the source: `demo.yaml: links.w1.bw_mbit: must be > 0`.
    """

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems) or [("", "invalid")]
        super().__init__(
            "\n".join(
                f"{source}: {path}: {msg}" if path else f"{source}: {msg}"
                for path, msg in self.problems
            )
        )


class StrictModel(BaseModel):
    """Base of every configuration model: unknown fields and NaN/inf refused, frozen."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        validate_default=True,
        use_attribute_docstrings=True,
    )


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Pydantic appends the type of the failing branch to the location of union members and
# tagged values (e.g. `k.int`, `k.function-after[...]`); these are not field names.
_NOT_FIELDS = ("function-", "constrained-", "lax-", "union[", "tagged-union[", "json-or-python")
_TYPE_NAMES = {"int", "float", "str", "bool", "none", "list", "dict", "enum"}


def _expected_list(expected: str) -> str:
    """pydantic's "'a', 'b' or 'c'" as "a, b, c"."""
    return expected.replace("'", "").replace(" or ", ", ")


def _message(err: Mapping[str, Any], known: list[str] | None) -> str:
    """One error in the project's words: what was expected, and what was given."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, _short(err.get("input"))
    simple = {
        "int_type": "expected an integer",
        "int_parsing": "expected an integer",
        "int_from_float": "expected an integer",
        "float_type": "expected a number",
        "float_parsing": "expected a number",
        "bool_type": "expected true or false",
        "bool_parsing": "expected true or false",
        "string_type": "expected a string",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
        "dataclass_type": "expected a mapping",
        "list_type": "expected a list",
        "finite_number": "must be a finite number",
        "none_required": "expected nothing (null)",
    }
    if kind == "missing":
        return "missing (required)"
    if kind == "extra_forbidden":
        return "unknown field" + (f"; expected one of {', '.join(known)}" if known else "")
    if kind in simple:
        return f"{simple[kind]}, got {got}"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx.get(key)}, got {got}"
    if kind in ("enum", "literal_error"):
        return f"expected one of {_expected_list(str(ctx.get('expected', '')))}; got {got}"
    if kind == "string_too_short":
        return f"expected a non-empty string, got {got}"
    if kind in ("too_short", "too_long"):
        return f"{err['msg'][0].lower()}{err['msg'][1:]}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return f"{err['msg']} (got {got})"


def validation_problems(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> list[tuple[str, str]]:
    """Flatten a pydantic ValidationError into (dotted field path, message) pairs.

    Messages say what was expected and what was given ("must be >= 0, got -1"). A union
    (`int | None`) reports once per path. With `model` (the model that was validated), an
    unknown field's message lists the fields allowed at that place.
    """
    by_path: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = [
            p
            for p in err["loc"]
            if not (
                isinstance(p, str) and (p.startswith(_NOT_FIELDS) or p in _TYPE_NAMES or "[" in p)
            )
        ]
        path = _loc(loc)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        known = (
            _fields_at(model, loc[:-1])
            if model is not None and err["type"] == "extra_forbidden"
            else None
        )
        msgs = by_path.setdefault(path, [])
        msg = _message(err, known)
        if msg not in msgs:
            msgs.append(msg)
    problems = []
    for path, msgs in by_path.items():
        if len(msgs) > 1:  # a union: the optional member's "expected nothing" adds nothing
            msgs = [m for m in msgs if not m.startswith("expected nothing")] or msgs
        problems.append((path, msgs[0] if len(msgs) == 1 else " or ".join(msgs)))
    return problems


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation can hold (through Optional, unions, containers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def _fields_at(model: type[BaseModel], loc: Sequence[int | str]) -> list[str] | None:
    """Field names of the model found by walking `loc` down from `model` (None if unknown)."""
    current = [model]
    for part in loc:
        nxt: list[type[BaseModel]] = []
        for m in current:
            if isinstance(part, str) and part in m.model_fields:
                nxt += _models_in(m.model_fields[part].annotation)
        if nxt:  # else a dict key or list index: stay on the container's value models
            current = nxt
    names = sorted({f for m in current for f in m.model_fields})
    return names or None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1}; YAML would keep only "
                "the last one)",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML text (safe: no tags), refusing duplicate keys; ConfigError if invalid."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no tags
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [(where, f"not valid YAML: {problem}")]) from exc


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file (see `parse_yaml_text`); ConfigError names the file on any error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(str(path), [("", f"cannot read: {why}")]) from exc
    data = parse_yaml_text(text, str(path))
    if data is None:
        raise ConfigError(str(path), [("", "the file is empty")])
    return data


def get_path(data: Any, path: str) -> Any:
    """The value at a dotted path of nested mappings; KeyError if absent."""
    node = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def set_path(data: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `data` with the dotted `path` set to `value` (missing maps created).

    Raises ValueError when a part of the path holds something other than a mapping.
    """
    out = copy.deepcopy(dict(data))
    node = out
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ValueError(f"{'.'.join(parts[: i + 1])} is not a mapping")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return out


def cross_product(
    sweep: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]],
) -> list[dict[str, Any]]:
    """Expand a sweep into its points: {path: value} per point, in order.

    A mapping is the cross product of its lists; a list of mappings is the union of their
    cross products. An empty sweep is one point that sets nothing.
    """
    blocks = [sweep] if isinstance(sweep, Mapping) else list(sweep)
    points: list[dict[str, Any]] = []
    for block in blocks or [{}]:
        keys = list(block)
        for combo in itertools.product(*(block[k] for k in keys)):
            points.append(dict(zip(keys, combo, strict=True)))
    return points
