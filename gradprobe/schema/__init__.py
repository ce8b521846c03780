"""JSON Schemas of every JSON document gradprobe writes, shipped as package data.

`scan` (scan.json), `report` (report --json), `compare` (compare --json), `gains`
(gains --out/--json), `plan` (plan --json), `track` (track.json) and `weights`
(report --weights-out). Versioning rule, also in each schema's description and in README:
schema_version is MAJOR.MINOR; adding a field is a minor change, renaming or removing one (or
changing its meaning or type) is a major change.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent
KINDS = ("scan", "report", "compare", "gains", "plan", "track", "weights")


def schema_path(kind: str) -> Path:
    """The file of one schema kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown schema {kind!r}; known: {', '.join(KINDS)}")
    return SCHEMA_DIR / f"{kind}.schema.json"


@cache
def load(kind: str) -> dict[str, Any]:
    """The parsed JSON Schema of one kind."""
    return json.loads(schema_path(kind).read_text(encoding="utf-8"))


def validator(kind: str) -> Any:
    """A Draft 2020-12 validator for one kind, with the other schemas resolvable by $id."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (load(k)["$id"], Resource.from_contents(load(k))) for k in KINDS
    )
    return Draft202012Validator(load(kind), registry=registry)


def validate(document: Any, kind: str) -> None:
    """Raise jsonschema.ValidationError when `document` does not match the schema of `kind`."""
    validator(kind).validate(document)
