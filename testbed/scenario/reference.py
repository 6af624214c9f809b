"""The scenario field reference and JSON Schema, generated from the schema (never by hand).

    python -m testbed.scenario.reference            # write docs/scenario-reference.md and
                                                    # docs/scenario.schema.json
    python -m testbed.scenario.reference --check    # exit 1 if they are out of date (CI)

Every field of every section, with its type, default, range and meaning, comes from the
pydantic models in testbed.scenario.schema, so the reference cannot go stale: a test runs
`--check`.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from specfed.provenance import REPO
from testbed.scenario.schema import ScenarioSpec

__all__ = ["json_schema", "main", "reference_markdown"]

DOCS = REPO / "docs"
MARKDOWN = DOCS / "scenario-reference.md"
SCHEMA = DOCS / "scenario.schema.json"

_HEADER = """# Scenario file reference

Generated from the schema (`testbed/scenario/schema.py`) by
`python -m testbed.scenario.reference`; do not edit by hand. A test fails when this page and
the schema differ. Editors that read JSON Schema can validate scenario files with
[scenario.schema.json](scenario.schema.json) (for example the YAML language server:
`# yaml-language-server: $schema=../docs/scenario.schema.json` as a scenario's first line).

Units: ms, Mbit/s, percent, seconds. Link delays are ONE-WAY per direction. `testbed validate
FILE` checks a file and reports every problem at once (file, field path, what was expected).
Any field can be swept by its dotted path (`sweep: {links.w1.bw_mbit: [5, 20]}`) or
overridden on the command line (`--set decoding.gamma=6`).
"""


def _type_name(annotation: Any) -> str:
    """A short, readable type: int, number, text, one of a | b, mapping name -> X, ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(names))
        return f"{text} or null" if type(None) in args else text
    if origin is typing.Literal:
        return "one of " + " / ".join(str(a) for a in args)
    if origin is dict:
        return f"mapping name -> {_type_name(args[1])}"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return "one of " + " / ".join(str(m.value) for m in annotation)
        if issubclass(annotation, BaseModel):
            return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
        return {int: "integer", float: "number", str: "text", bool: "true/false"}.get(
            annotation, annotation.__name__
        )
    if annotation is typing.Any:
        return "any"
    return str(annotation).replace("typing.", "")


def _bounds(items: Any) -> list[str]:
    """Range texts from field metadata (annotated-types bounds, patterns), recursively
    through FieldInfo objects and Annotated members of unions (Optional fields)."""
    parts = []
    for m in items:
        if isinstance(m, FieldInfo):
            parts += _bounds(m.metadata)
            continue
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(m, attr, None)
            if value is not None and isinstance(m, annotated_types.BaseMetadata):
                parts.append(f"{op} {value:g}" if isinstance(value, float) else f"{op} {value}")
        if getattr(m, "pattern", None):
            parts.append(f"matches `{m.pattern}`")
    return parts


def _range(field: FieldInfo) -> str:
    parts = _bounds(field.metadata)
    for arg in typing.get_args(field.annotation):  # bounds inside Optional[Annotated[...]]
        if typing.get_origin(arg) is typing.Annotated:
            parts += _bounds(typing.get_args(arg)[1:])
    return ", ".join(dict.fromkeys(parts))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        return "`{" + ", ".join(f"{k}: {{}}" for k in value) + "}`"
    return f"`{json.dumps(value)}`"


def _models(model: type[BaseModel], seen: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """`model` and every model its fields hold, depth-first, each once."""
    if model in seen:
        return seen
    seen.append(model)
    for field in model.model_fields.values():
        for inner in _nested(field.annotation):
            _models(inner, seen)
    return seen


def _nested(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _nested(a)]


def reference_markdown() -> str:
    """The field reference as markdown: one table per section."""
    lines = [_HEADER]
    for model in _models(ScenarioSpec, []):
        lines += [
            f"## {model.__name__}" if model is not ScenarioSpec else "## Top level",
            "",
            (model.__doc__ or "").strip().replace("\n    ", " ").replace("\n", " "),
            "",
            "| field | type | default | range | meaning |",
            "|---|---|---|---|---|",
        ]
        for name, field in model.model_fields.items():
            meaning = (field.description or "").replace("\n", " ").replace("|", "\\|")
            meaning = " ".join(meaning.split())
            lines.append(
                f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | "
                f"{_range(field)} | {meaning} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def json_schema() -> str:
    """JSON Schema (draft 2020-12) of a scenario file."""
    schema = ScenarioSpec.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "SpecFed testbed scenario"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m testbed.scenario.reference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    ap.add_argument("--check", action="store_true", help="only check that the files are current")
    args = ap.parse_args(argv)
    wanted = {MARKDOWN: reference_markdown(), SCHEMA: json_schema()}
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(REPO)} is out of date: run python -m testbed.scenario.reference")
        return 1 if stale else 0
    for p in stale:
        p.write_text(wanted[p])
        print(f"wrote {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
