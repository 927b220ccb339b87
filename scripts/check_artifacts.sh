#!/usr/bin/env bash
# Build the release artifacts and check that they work on their own:
#
# 1. scripts/build_wheel.sh makes the sdist and, from it, a manylinux wheel
#    for this machine's glibc that carries its OpenMP runtime (the private
#    libgomp copy fastbn/_libs/libgomp-fastbn.so.1), and prints `auditwheel show`;
# 2. the sdist holds the Cython sources (.pyx, .pxd), setup.py and the
#    metadata; the repaired wheel holds the compiled modules, the stubs,
#    py.typed and its libgomp, and no tests or generated C; its version is
#    fastbn.__version__;
# 3. with no C compiler and no system libgomp reachable
#    (scripts/without_toolchain.sh), the repaired wheel, its test extras and
#    PyTorch go into a fresh virtual environment from binary wheels only, and
#    a copy of tests/ runs against it from a directory with no source tree
#    (the installed fastbn is checked to be the one imported, and its libgomp
#    the wheel's); then the same with the oldest NumPy the metadata allows;
# 4. the sdist, unpacked alone in another directory, builds a wheel again.
#
#   scripts/check_artifacts.sh [pytest arguments...]
#
# Environment: PYTHON (default python3); FASTBN_TORCH, the PyTorch requirement
# for the tests beside a second OpenMP runtime (default torch==2.13.0, as
# .ci/run); FASTBN_KEEP=1 keeps the temporary directory, whose dist/ holds
# the sdist and the wheel. Nothing is written into the repository.
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

echo "artifacts: scripts/build_wheel.sh"
PYTHON="$python" bash "$repo/scripts/build_wheel.sh" "$work/dist"
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
case "$(basename "$wheel")" in
    *-manylinux_*.whl) ;;
    *) fail "$(basename "$wheel") has no manylinux tag" ;;
esac

echo "artifacts: checking their contents"
tar -tzf "$sdist" | sed 's|^[^/]*/||' | sort > "$work/sdist.txt"
for f in setup.py pyproject.toml README.md \
         fastbn/__init__.py fastbn/functional.py fastbn/layers.py fastbn/reference.py \
         fastbn/compat/cs231n.py fastbn/compat/deepnet.py fastbn/_checks.py \
         fastbn/folding.py fastbn/distributed/__init__.py fastbn/distributed/_passes.py \
         fastbn/_planar.pyx fastbn/_columnar.pyx fastbn/_openmp.pyx fastbn/_channels.pyx \
         fastbn/_openmp.pxd fastbn/_stats.pxd fastbn/_views.pxd; do
    grep -qx "$f" "$work/sdist.txt" || fail "the sdist lacks $f"
done
"$python" -m zipfile -l "$wheel" | awk 'NR > 1 {print $1}' | sort > "$work/wheel.txt"
for pattern in '^fastbn/_planar\..*\.so$' '^fastbn/_columnar\..*\.so$' '^fastbn/_openmp\..*\.so$' \
               '^fastbn/_channels\..*\.so$' '^fastbn/distributed/_layer\.py$' \
               '^fastbn/__init__\.py$' '^fastbn/compat/cs231n\.py$' '^fastbn/py\.typed$' \
               '^fastbn/_planar\.pyi$' '^fastbn/_libs/libgomp-fastbn\.so\.1$'; do
    grep -qE "$pattern" "$work/wheel.txt" || fail "the wheel has no file matching $pattern"
done
if grep -qE '^tests/|/tests/|conftest\.py' "$work/wheel.txt"; then
    fail "the wheel contains tests"
fi
if grep -qE '\.c$' "$work/wheel.txt"; then
    fail "the wheel contains Cython's generated C"
fi

# Each command below runs with no C compiler and no system libgomp, and pip
# takes binary wheels only: nothing can be built from source on the way.
bare() { env -u PYTHONPATH "$repo/scripts/without_toolchain.sh" "$@"; }
mkdir -p "$work/run"
cp -r "$repo/tests" "$work/run/tests"
find "$work/run" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/run"

# check_installed VENV: fastbn is imported from VENV, with the wheel's own
# libgomp and the wheel's version.
check_installed() {
    local facts
    facts=$(bare "$1/bin/python" -c "
import re, fastbn
maps = open('/proc/self/maps').read()
print(fastbn.__file__, fastbn.__version__, *sorted(set(re.findall(r'\S*libgomp\S*', maps))))")
    echo "artifacts: fastbn, version, OpenMP runtime: $facts"
    set -- "$1" $facts
    case "$2" in
        "$1/"*) ;;
        *) fail "fastbn imported from $2, not from the fresh environment $1" ;;
    esac
    [ "$3" = "$wheel_version" ] || fail "fastbn.__version__ is $3, the wheel's version $wheel_version"
    [ "$#" = 4 ] && [[ "$4" == "$1"/*/fastbn/_libs/libgomp-fastbn.so.1 ]] \
        || fail "fastbn did not load the wheel's libgomp alone: ${*:4}"
}
wheel_version=$(basename "$wheel" | cut -d- -f2)

echo "artifacts: installing the repaired wheel, its test extras and PyTorch into a fresh environment"
"$python" -m venv "$work/venv"
bare "$work/venv/bin/pip" install --quiet --only-binary=:all: "$wheel[test]" "${FASTBN_TORCH:-torch==2.13.0}"
check_installed "$work/venv"
bare "$work/venv/bin/python" -c "import fastbn; fastbn.show_config()"
echo "artifacts: running the tests against the installed wheel"
bare "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"

oldest=$("$work/venv/bin/python" -c "
import re
from importlib.metadata import requires
(numpy,) = [r for r in requires('fastbn') if re.match(r'numpy\b', r)]
print(re.fullmatch(r'numpy\s*>=\s*([0-9.]+)', numpy).group(1))")
echo "artifacts: the same with the oldest NumPy the wheel allows (numpy==$oldest.*), without PyTorch"
"$python" -m venv "$work/oldest"
bare "$work/oldest/bin/pip" install --quiet --only-binary=:all: "$wheel[test]" "numpy==$oldest.*"
check_installed "$work/oldest"
bare "$work/oldest/bin/python" -c "import numpy; print('artifacts: NumPy', numpy.__version__)"
bare "$work/oldest/bin/python" -m pytest -q -p no:cacheprovider tests "$@"

echo "artifacts: building a wheel from the unpacked sdist alone"
"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet build
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
