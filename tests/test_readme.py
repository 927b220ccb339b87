"""Every Python snippet in README.md runs as it stands, alone, in a fresh
interpreter (a snippet that imports an optional package, PyTorch or mpi4py,
is skipped where that package is missing; mpi4py runs as a single process)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import same_fastbn

README = Path(__file__).resolve().parents[1] / "README.md"
if not README.exists():
    pytest.skip("README.md is not beside this tests folder (a copy of the tests)",
                allow_module_level=True)


def snippets():
    """(section heading, code) of each ```python block of README.md."""
    text = README.read_text()
    found = []
    for block in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        heading = re.findall(r"^## (.*)$", text[:block.start()], re.M)[-1]
        found.append(pytest.param(block.group(1), id=heading))
    return found


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs_alone(code):
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.M):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the snippet imports {module}, which is not installed")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, **same_fastbn())
    assert done.returncode == 0, done.stderr[-3000:]
