#!/usr/bin/env bash
# Build the release artifacts and check that they work on their own:
#
# 1. `python -m build` makes an sdist and a wheel (the wheel is built from
#    the sdist, in an isolated build environment) from a clean copy of the
#    sources;
# 2. the sdist holds the Cython sources (.pyx, .pxd), setup.py and the
#    metadata; the wheel holds the three compiled modules, the stubs and
#    py.typed, and no tests;
# 3. the wheel, with its test extras, goes into a fresh virtual environment,
#    and a copy of tests/ runs against it from a directory with no source tree
#    (the installed fastbn is checked to be the one imported);
# 4. the sdist, unpacked alone in another directory, builds a wheel again.
#
#   scripts/check_artifacts.sh [pytest arguments...]
#
# Environment: PYTHON (default python3); FASTBN_KEEP=1 keeps the temporary
# directory. Nothing is written into the repository.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/fastbn-artifacts.XXXXXX")
if [ "${FASTBN_KEEP:-0}" = 1 ]; then
    echo "artifacts: working in $work (kept)"
else
    trap 'rm -rf "$work"' EXIT
fi
fail() { echo "artifacts: $*" >&2; exit 1; }

# The sources, without build products (scripts/copy_sources.sh).
. "$repo/scripts/copy_sources.sh"
copy_sources "$repo" "$work/src"

echo "artifacts: python -m build (sdist, then the wheel from the sdist)"
"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet build
"$work/tools/bin/python" -m build --outdir "$work/dist" "$work/src" > "$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log"; fail "python -m build failed"; }
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
echo "artifacts: $(basename "$sdist") $(du -h "$sdist" | cut -f1), $(basename "$wheel") $(du -h "$wheel" | cut -f1)"

echo "artifacts: checking their contents"
tar -tzf "$sdist" | sed 's|^[^/]*/||' | sort > "$work/sdist.txt"
for f in setup.py pyproject.toml README.md \
         fastbn/__init__.py fastbn/functional.py fastbn/layers.py fastbn/reference.py \
         fastbn/compat/cs231n.py fastbn/compat/deepnet.py \
         fastbn/_planar.pyx fastbn/_columnar.pyx fastbn/_openmp.pyx \
         fastbn/_openmp.pxd fastbn/_stats.pxd fastbn/_views.pxd; do
    grep -qx "$f" "$work/sdist.txt" || fail "the sdist lacks $f"
done
"$work/tools/bin/python" -m zipfile -l "$wheel" | awk 'NR > 1 {print $1}' | sort > "$work/wheel.txt"
for pattern in '^fastbn/_planar\..*\.so$' '^fastbn/_columnar\..*\.so$' '^fastbn/_openmp\..*\.so$' \
               '^fastbn/__init__\.py$' '^fastbn/compat/cs231n\.py$' '^fastbn/py\.typed$' \
               '^fastbn/_planar\.pyi$'; do
    grep -qE "$pattern" "$work/wheel.txt" || fail "the wheel has no file matching $pattern"
done
if grep -qE '^tests/|/tests/|conftest\.py' "$work/wheel.txt"; then
    fail "the wheel contains tests"
fi

echo "artifacts: installing the wheel with its test extras into a fresh environment"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$wheel[test]"
mkdir -p "$work/run"
cp -r "$repo/tests" "$work/run/tests"
find "$work/run" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/run"
where=$(env -u PYTHONPATH "$work/venv/bin/python" -c "import fastbn; print(fastbn.__file__)")
case "$where" in
    "$work/venv/"*) echo "artifacts: fastbn imported from $where" ;;
    *) fail "fastbn imported from $where, not from the fresh environment" ;;
esac
env -u PYTHONPATH "$work/venv/bin/python" -c "import fastbn; fastbn.show_config()"
echo "artifacts: running the tests against the installed wheel"
env -u PYTHONPATH "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"

echo "artifacts: building a wheel from the unpacked sdist alone"
mkdir -p "$work/unpacked"
tar -xzf "$sdist" -C "$work/unpacked"
cd "$work/unpacked"/*/
"$work/tools/bin/python" -m build --wheel --outdir "$work/dist2" . > "$work/build2.log" 2>&1 \
    || { tail -n 40 "$work/build2.log"; fail "the sdist does not build a wheel on its own"; }
ls "$work"/dist2/*.whl > /dev/null || fail "no wheel from the sdist"
"$work/venv/bin/pip" install --quiet --force-reinstall --no-deps "$work"/dist2/*.whl
(cd "$work/run" && env -u PYTHONPATH "$work/venv/bin/python" -c "
import numpy as np, fastbn
x = np.random.default_rng(0).standard_normal((8, 3, 5, 5)).astype(np.float32)
y, mean, invstd = fastbn.batch_norm_forward(x, None, None)
assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-3
print('artifacts: the wheel from the sdist imports and normalizes')")
echo "artifacts: ok"
