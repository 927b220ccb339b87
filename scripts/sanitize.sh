#!/usr/bin/env bash
# Build fastbn with AddressSanitizer and UndefinedBehaviorSanitizer
# (FASTBN_SANITIZE=1: -fsanitize=address,undefined) in a temporary copy of
# the repository, and run the test suite there with the ASan runtime
# preloaded into the Python interpreter. The repository itself is not
# touched (no build products, no .c files written into it).
#
#   scripts/sanitize.sh [pytest arguments...]
#
# Environment:
#   PYTHON=python3       the interpreter for the virtual environment
#   FASTBN_KEEP=1        keep the temporary directory (the log is in it)
#
# LeakSanitizer is off (detect_leaks=0): CPython does not free everything at
# exit by design. Any ASan or UBSan report stops the process
# (halt_on_error=1) and fails the run; the log is also searched for reports.
# Under ASan freed memory sits in a quarantine, so tests/test_leaks.py skips
# its resident-memory checks (its reference-count checks still run); the
# tests marked slow are not run. PyTorch is not installed here, so the parity
# tests skip.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/fastbn-sanitize.XXXXXX")
if [ "${FASTBN_KEEP:-0}" = 1 ]; then
    echo "sanitize: working in $work (kept)"
else
    trap 'rm -rf "$work"' EXIT
fi

# The sources, without build products (scripts/copy_sources.sh).
. "$repo/scripts/copy_sources.sh"
copy_sources "$repo" "$work/src"

echo "sanitize: virtual environment with the build and test requirements"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "setuptools>=77" "Cython>=3" "numpy>=2" \
    "pytest>=7" "hypothesis>=6" "threadpoolctl>=3"

echo "sanitize: building with FASTBN_SANITIZE=1"
(cd "$work/src" && FASTBN_SANITIZE=1 "$work/venv/bin/python" setup.py build_ext --inplace \
    --force > "$work/build.log" 2>&1) || { tail -n 40 "$work/build.log"; exit 1; }
grep -m1 "fastbn: building" "$work/build.log"
for so in "$work"/src/fastbn/_*.so; do
    if ! ldd "$so" | grep libasan > /dev/null; then
        echo "sanitize: $so is not linked against libasan" >&2
        exit 1
    fi
done

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
echo "sanitize: running the tests with LD_PRELOAD=$asan $ubsan"
status=0
(
    cd "$work/src"
    export LD_PRELOAD="$asan $ubsan"
    export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:strict_string_checks=1"
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:report_error_type=1"
    "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
) > "$work/tests.log" 2>&1 || status=$?
tail -n 15 "$work/tests.log"

if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" \
        "$work/tests.log"; then
    echo "sanitize: sanitizer report(s):" >&2
    grep -nE -A 20 "ERROR: AddressSanitizer|runtime error:" "$work/tests.log" | head -n 80 >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "sanitize: the tests failed (exit status $status)" >&2
    exit "$status"
fi
echo "sanitize: no sanitizer report; tests passed"
