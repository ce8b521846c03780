"""JSON Lines input: each non-blank line one JSON object, errors named by file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError


def json_objects(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `path`; a bad line is a UserInputError."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{number}: malformed JSON line ({exc.msg})") from None
        if not isinstance(value, dict):
            raise UserInputError(f"{path}:{number}: each line must be a JSON object")
        yield number, value
