"""The OpenMP wait policy that holds up on a shared machine (see sbtemplate/__init__.py)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("finetune.py", "single_node_pretrained.py", "multisource_mini_recipe.py")
SHOW = "import sbtemplate, os, torch; print(os.environ['OMP_WAIT_POLICY'])"


@pytest.mark.parametrize("preset, seen", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_package_sets_passive_waiting_unless_the_user_chose(preset, seen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    done = subprocess.run(
        [sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == seen


def _top_level_imports(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_imports_the_package_before_torch(script):
    """The OpenMP runtime reads the policy once, when torch loads it."""
    names = list(_top_level_imports(ROOT / script))
    assert "sbtemplate" in names, script
    first = names.index("sbtemplate")
    assert not {"torch", "speechbrain", "torchaudio"} & set(names[:first]), (script, names)
