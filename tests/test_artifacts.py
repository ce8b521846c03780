"""Scan directories and other artifacts: modes under the user's umask; what git ignores."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from gradprobe import artifacts


@pytest.fixture()
def umask():
    """Set a umask for the test, then restore the process's."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_artifacts_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    out = tmp_path / "scan"
    with artifacts.staged_directory(out) as staging:
        artifacts.write_json(staging / artifacts.SCAN_FILE, {"schema_version": "1.0"})
    assert _mode(out) == dir_mode
    assert _mode(out / artifacts.SCAN_FILE) == file_mode
    page = tmp_path / "report.html"
    artifacts.write_text(page, "<html></html>")
    assert _mode(page) == file_mode


def test_ci_virtual_environment_is_ignored_by_git():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", ".ci-venv/bin/python"], cwd=root)
    assert result.returncode == 0, ".ci-venv is not in .gitignore"
