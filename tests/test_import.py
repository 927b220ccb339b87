"""Importing fastbn: what a user who runs Python in an unbuilt source tree sees."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fastbn


def test_source_tree_without_compiled_modules_says_what_to_do(tmp_path):
    """Importing fastbn from a source tree that was never built fails with an
    ImportError that says to install it or to run from another folder."""
    src = Path(fastbn.__file__).resolve().parent
    tree = tmp_path / "fastbn"
    shutil.copytree(src, tree, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    result = subprocess.run([sys.executable, "-c", "import fastbn"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode != 0
    assert "ImportError: fastbn is being imported from its source tree" in result.stderr
    assert "pip install ." in result.stderr
