#!/usr/bin/env bash
# Build the documentation site (docs/) with warnings as errors, then run
# its doctests (the docstrings' examples and the pages' doctest blocks).
#
#   scripts/build_docs.sh [OUTPUT_DIR]      (default docs/_build)
#
# PYTHON (default python3) is the Python of an environment where fastbn is
# installed or built in place (the API pages come from its docstrings) and
# docs/requirements.txt is installed. The HTML is in OUTPUT_DIR/html.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
case "$python" in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac
out=$(mkdir -p "${1:-$repo/docs/_build}" && cd "${1:-$repo/docs/_build}" && pwd)

# From docs/, not the repository root: `python -m` puts the working folder on
# sys.path, and the root's fastbn/ is an unbuilt source tree in a clean clone.
cd "$repo/docs"
echo "docs: sphinx-build -W -b html (warnings are errors)"
"$python" -m sphinx -W --keep-going -q -b html -d "$out/doctrees" . "$out/html"
echo "docs: sphinx-build -W -b doctest"
"$python" -m sphinx -W --keep-going -q -b doctest -d "$out/doctrees" . "$out/doctest"
grep -A4 '^Doctest summary' "$out/doctest/output.txt"
echo "docs: ok, $out/html/index.html"
