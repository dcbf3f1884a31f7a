"""The code keeps one style: ruff's lint and format, configured in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff():
    """The ruff installed beside this interpreter (requirements.txt pins it)."""
    found = Path(sys.executable).parent / "ruff"
    return str(found) if found.exists() else shutil.which("ruff")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    assert ruff(), "ruff is not installed: ./install.sh installs it (requirements.txt)"
    done = subprocess.run([ruff(), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"ruff {' '.join(command)} found problems (fix with: ruff check --fix . / ruff format .):\n"
        + done.stdout[-4000:]
        + done.stderr[-2000:]
    )
