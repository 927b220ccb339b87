#!/usr/bin/env bash
# Run a command as on a machine with no C compiler and no OpenMP runtime of
# its own: a user's machine that `pip install fastbn` must serve from the
# binary wheel alone.
#
#   scripts/without_toolchain.sh COMMAND [ARGS...]
#
# In a private mount namespace (`unshare`; a user namespace too when not
# root), /dev/null is mounted over every C compiler driver on PATH (cc, gcc,
# g++, clang, ...) and over every libgomp the dynamic loader knows, so that
# neither can be run or loaded; CC, CXX and LD_LIBRARY_PATH are unset. The
# script checks that no compiler runs and that libgomp.so.1 does not load,
# then runs COMMAND there. Nothing outside the namespace changes.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

if [ "${FASTBN_NO_TOOLCHAIN:-}" != 1 ]; then
    namespace=(--mount --propagation private)
    [ "$(id -u)" = 0 ] || namespace=(--map-root-user "${namespace[@]}")
    if ! unshare "${namespace[@]}" true 2>/dev/null; then
        echo "without_toolchain: cannot make a mount namespace (unshare ${namespace[*]})" >&2
        exit 1
    fi
    FASTBN_NO_TOOLCHAIN=1 exec unshare "${namespace[@]}" bash "$0" "$@"
fi

# In the namespace from here on.
hide() {
    local real
    real=$(readlink -f "$1") || return 0
    [ -f "$real" ] || return 0
    mount --bind /dev/null "$real"
}
IFS=: read -r -a path_dirs <<< "$PATH"
for dir in "${path_dirs[@]}"; do
    for f in "$dir"/cc "$dir"/c++ "$dir"/c89 "$dir"/c99 "$dir"/cpp "$dir"/*gcc* "$dir"/*g++* \
             "$dir"/*clang* "$dir"/icx "$dir"/icc "$dir"/tcc "$dir"/mpicc*; do
        if [ -e "$f" ]; then hide "$f"; fi
    done
done
ldconfig -p | awk '/libgomp/ {print $NF}' | while read -r lib; do hide "$lib"; done
unset CC CXX LD_LIBRARY_PATH

for compiler in cc gcc c++ g++ clang; do
    if "$compiler" --version >/dev/null 2>&1; then
        echo "without_toolchain: $compiler still runs" >&2
        exit 1
    fi
done
if python3 -c 'import ctypes; ctypes.CDLL("libgomp.so.1")' 2>/dev/null; then
    echo "without_toolchain: libgomp.so.1 still loads" >&2
    exit 1
fi
echo "without_toolchain: no C compiler runs and no system libgomp loads here" >&2
exec "$@"
