"""Every Python block of README.md and of the documentation pages (docs/)
runs as it stands, alone, in a fresh interpreter; the figures the README
repeats from other pages agree with them.

A block that needs an optional package says so in an HTML comment on the line
before it, ``<!-- needs: torch -->``, and is skipped, saying why, where that
package is missing (mpi4py runs as a single process). An unmarked block may
import only the standard library, NumPy and fastbn."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import same_fastbn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
if not README.exists():
    pytest.skip("README.md is not beside this tests folder (a copy of the tests)",
                allow_module_level=True)

BLOCK = re.compile(r"(?:^<!-- needs: ([\w, ]+) -->\n)?^```python\n(.*?)^```", re.M | re.S)
ALWAYS_THERE = {"numpy", "fastbn"}


def blocks():
    """(needed packages, code) of each ```python block, with its page and heading as id."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in BLOCK.finditer(text):
            headings = re.findall(r"^#+ (.*)$", text[:block.start()], re.M)
            needs = [n.strip() for n in (block.group(1) or "").split(",") if n.strip()]
            found.append(pytest.param(needs, block.group(2),
                                      id=f"{page.relative_to(ROOT)}: {headings[-1]}"))
    return found


def imported(code):
    """The top-level modules a block imports."""
    return set(re.findall(r"^\s*(?:from|import) (\w+)", code, re.M))


@pytest.mark.parametrize("needs, code", blocks())
def test_block_runs_alone(needs, code, tmp_path):
    optional = imported(code) - ALWAYS_THERE - set(sys.stdlib_module_names)
    assert optional <= set(needs), (
        f"the block imports {sorted(optional - set(needs))}: mark it with "
        f"<!-- needs: {', '.join(sorted(optional))} --> on the line before it")
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the block needs {module} (marked on the line before it), "
                        f"which is not installed")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, **{**same_fastbn(), "cwd": tmp_path})
    assert done.returncode == 0, done.stderr[-3000:]


def test_pages_have_python_blocks():
    """The pattern finds the blocks (a renamed fence would silently test nothing)."""
    assert len(blocks()) >= 8


def test_hostile_counts_agree_with_the_hostile_inputs_page():
    """Wherever the README or a guide page repeats the size of docs/hostile_inputs.md
    (generated from tests/test_hostile.py), it says what that page says."""
    page = (ROOT / "docs" / "hostile_inputs.md").read_text()
    rows, calls = re.search(r"(\d+) rows and (\d+) calls in all", page).groups()
    claims = [(p.relative_to(ROOT), m.groups()) for p in PAGES
              for m in re.finditer(r"(\d+) such calls in (\d+) rows", p.read_text())]
    assert claims, "no page repeats the counts any more: drop this test"
    for where, (c, r) in claims:
        assert (c, r) == (calls, rows), f"{where} says {c} calls in {r} rows"
