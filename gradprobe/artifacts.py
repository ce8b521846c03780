"""Scan directories on disk: written atomically, read back with clear errors.

A scan directory holds scan.json (the report, versioned by SCHEMA_VERSION), rollouts.jsonl (one
line per completion, enough to recompute every gradient) and, where saved, task_grads.safetensors.
It is built in a hidden sibling directory and renamed into place only when complete, so a failed
scan never leaves a half-written DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError

SCHEMA_VERSION = "1.1"
SCAN_FILE = "scan.json"
ROLLOUTS_FILE = "rollouts.jsonl"
TASK_GRADS_FILE = "task_grads.safetensors"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work when DIR exists (and may not be replaced) or cannot be created."""
    if out.exists() and not overwrite:
        raise UserInputError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not (out / SCAN_FILE).is_file():
        raise UserInputError(f"{out} exists and is not a gradprobe scan; refusing to replace it")
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise UserInputError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"cannot write into {parent}; choose another --out")


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give a file or folder made by tempfile (0600/0700, private) the mode a plain open() or
    mkdir() would have given it under the user's umask."""
    full = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, full & ~_umask())


@contextmanager
def staged_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging directory; on success it replaces `out`, on failure it vanishes."""
    out = out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        follow_umask(staging)
        yield staging
        if out.exists() and overwrite:
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserInputError(f"cannot write {out} ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, document: Any) -> None:
    """Write JSON atomically: a temporary file in the same directory, then rename."""
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    write_text(path, text + "\n")


def write_text(path: Path, text: str) -> None:
    """Write text atomically (see write_bytes)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically, with the user's umask: a temporary file in the same directory,
    then rename."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        follow_umask(Path(temporary))
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise UserInputError(f"cannot write {path} ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_scan(path: Path) -> dict[str, Any]:
    """scan.json of a scan directory (or the file itself), checked for a known schema version."""
    path = Path(path)
    file = path / SCAN_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserInputError(f"{path}: no {SCAN_FILE} here; is it a gradprobe scan directory?")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{file}: corrupt scan file ({exc})") from None
    if not isinstance(document, dict) or "schema_version" not in document:
        raise UserInputError(f"{file}: not a gradprobe scan (no schema_version)")
    from gradprobe.schema import load as load_schema

    missing = [key for key in load_schema("scan")["required"] if key not in document]
    if missing:
        raise UserInputError(f"{file}: incomplete scan file (no {', '.join(missing)}); run the scan again")
    major = str(document["schema_version"]).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise UserInputError(
            f"{file}: schema version {document['schema_version']} is not readable by this "
            f"gradprobe (schema {SCHEMA_VERSION}); use a matching gradprobe version"
        )
    return document
