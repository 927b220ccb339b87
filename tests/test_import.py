"""Importing fastbn: what a user sees in an unbuilt source tree, and the version it reports."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastbn


def _editable_install():
    """Whether fastbn is installed in editable mode (pip install -e)."""
    from importlib import metadata

    try:
        url = metadata.distribution("fastbn").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    return bool(url) and json.loads(url).get("dir_info", {}).get("editable", False)


def test_source_tree_without_compiled_modules_says_what_to_do(tmp_path):
    """Importing fastbn from a source tree that was never built fails with an
    ImportError that says to install it or to run from another folder."""
    if _editable_install():
        pytest.skip("an editable install's import hook gives any fastbn/ folder its "
                    "compiled modules")
    src = Path(fastbn.__file__).resolve().parent
    tree = tmp_path / "fastbn"
    shutil.copytree(src, tree, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    result = subprocess.run([sys.executable, "-c", "import fastbn"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode != 0
    assert "ImportError: fastbn is being imported from its source tree" in result.stderr
    assert "pip install ." in result.stderr
    # raised from None: one traceback, not Python's circular-import error chained before it
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert "circular import" not in result.stderr
    assert "During handling of the above exception" not in result.stderr


def test_version_is_the_installed_distributions():
    """fastbn.__version__ is the version in the metadata of the installed
    distribution (a wheel or pip install .); an in-place build has none."""
    from importlib import metadata

    try:
        installed = metadata.distribution("fastbn")
    except metadata.PackageNotFoundError:
        pytest.skip("fastbn is built in place, not installed: no distribution metadata")
    if installed.read_text("RECORD") is None:  # an egg-info that a build left in the source tree
        pytest.skip("no installed distribution of fastbn, only build metadata in a source tree")
    if Path(installed.locate_file("fastbn")).resolve() != Path(fastbn.__file__).resolve().parent:
        pytest.skip(f"the fastbn imported ({fastbn.__file__}) is not the installed distribution")
    assert fastbn.__version__ == installed.version
