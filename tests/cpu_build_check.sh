#!/usr/bin/env bash
# The CPU test suite against another build of flashkd's C++:
#   tests/cpu_build_check.sh address   [pytest args]   AddressSanitizer (out-of-bounds, use after free)
#   tests/cpu_build_check.sh undefined [pytest args]   UndefinedBehaviorSanitizer
#   tests/cpu_build_check.sh portable  [pytest args]   the portable kernels non-x86 CPUs get
#                                                     (FLASHKD_CPU_PORTABLE: no x86 intrinsics)
# The build goes to its own build directory and a temporary install target,
# so the editable development build is left alone (about 2 minutes); the
# tests then take 2-5 minutes on 2 cores. Sanitizer reports are written to
# files (pytest captures stderr) and printed at the end; the exit status is
# non-zero when pytest fails or any report was written.
#
# Under the sanitizers GCC vectorizes almost none of the kernels' loops; the
# distillation row sums keep their order all the same (csrc/cpu/row_sums.h
# fixes it), so the float32 accuracy tests hold there too.
# tests/test_bench.py is left out: it runs the benchmark in a subprocess,
# which would import the regular build.
set -eu
kind=${1:?usage: tests/cpu_build_check.sh address|undefined|portable [pytest args]}
shift
case "$kind" in
    address | undefined)
        build_args=(-C cmake.define.CMAKE_CXX_FLAGS="-fsanitize=$kind -fno-omit-frame-pointer -g"
                    -C cmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=$kind") ;;
    portable) build_args=(-C cmake.define.FLASHKD_CPU_PORTABLE=ON) ;;
    *) echo "unknown build '$kind' (address, undefined or portable)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PKG=$(mktemp -d "/tmp/flashkd-$kind.XXXXXX")
LOGS="$PKG/reports"
mkdir -p "$LOGS"

echo "== building flashkd (CPU only, $kind) into $PKG"
FLASHKD_CUDA=OFF "$PY" -m pip install -q --no-build-isolation --no-deps --target "$PKG" \
    -C build-dir="build/check-$kind" -C install.strip=false "${build_args[@]}" .

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# python -S: no .pth files, so the editable install's import hook cannot
# shadow the build placed first on the path.
RUN=("$PY" -S -c "import sys; sys.path[:0] = ['$PKG', '$SITE']; import pytest; \
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--deselect', 'tests/test_bench.py'] + sys.argv[1:]))")
status=0
if [ "$kind" = address ]; then
    # The ASan runtime must come first; libstdc++ too, or its __cxa_throw
    # interceptor finds nothing to forward C++ exceptions to.
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
        ASAN_OPTIONS="detect_leaks=0:log_path=$LOGS/asan" "${RUN[@]}" "$@" || status=$?
elif [ "$kind" = undefined ]; then
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$LOGS/ubsan" "${RUN[@]}" "$@" || status=$?
else
    "${RUN[@]}" "$@" || status=$?
fi

shopt -s nullglob
reports=("$LOGS"/*)
if [ ${#reports[@]} -gt 0 ]; then
    echo "== $kind sanitizer reports:"
    cat "${reports[@]}"
    status=1
elif [ "$kind" != portable ]; then
    echo "== no $kind sanitizer reports"
fi
exit "$status"
