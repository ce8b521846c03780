"""The project documents its own numbers: docs/metrics.md defines every key scan.json can hold,
and the docs and docstrings point inside the repository."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "docs" / "metrics.md"


def document_keys(value: Any, names: set[str]) -> Iterator[str]:
    """Every key of a JSON value, except data used as keys (task and module-group names)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in names:
                yield key
            yield from document_keys(item, names)
    elif isinstance(value, list):
        for item in value:
            yield from document_keys(item, names)


def schema_keys(schema: Any) -> Iterator[str]:
    """Every property name a JSON Schema declares (patternProperties are data, not names)."""
    if isinstance(schema, dict):
        yield from schema.get("properties", {})
        for item in schema.values():
            yield from schema_keys(item)
    elif isinstance(schema, list):
        for item in schema:
            yield from schema_keys(item)


def undefined(keys: set[str]) -> list[str]:
    text = METRICS.read_text()
    return sorted(k for k in keys if not re.search(rf"`(?:[\w.]+\.)?{re.escape(k)}`", text))


def test_metrics_defines_every_key_of_a_demo_scan(demo_scan_dir):
    document = json.loads((demo_scan_dir / "scan.json").read_text())
    data_names = set(document["tasks"]) | set(document["modules"])
    assert undefined(set(document_keys(document, data_names))) == []


def test_metrics_defines_every_key_of_the_scan_schema():
    schema = json.loads((ROOT / "gradprobe" / "schema" / "scan.schema.json").read_text())
    assert undefined(set(schema_keys(schema))) == []


def test_docs_and_docstrings_link_inside_the_repository():
    sources = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("gradprobe/**/*.py"),
               *ROOT.glob("gradprobe/schema/*.json"), *ROOT.glob("benchmarks/*.py")]
    outside = {str(p.relative_to(ROOT)) for p in sources if "shared/design" in p.read_text()}
    assert outside == set()
    readme = (ROOT / "README.md").read_text()
    assert "(docs/metrics.md)" in readme and "(docs/engine.md)" in readme
    for link in re.findall(r"\]\(([^)#]+)\)", readme + (ROOT / "docs" / "engine.md").read_text()):
        if not link.startswith("http"):
            base = ROOT if (ROOT / link).exists() else ROOT / "docs"
            assert (base / link).exists(), link
