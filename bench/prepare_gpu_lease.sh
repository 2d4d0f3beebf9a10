#!/usr/bin/env bash
# Run on the CPU machine before a GPU lease: makes here, at no device time, what bench/gpu_suite.sh
# would otherwise spend the lease's minutes on (building the CUDA kernels takes 2-4 minutes even on
# 16 cores; a lease has 15 minutes in all).
#   1. a virtual environment with the GPU machine's torch (FLASHKD_GPU_TORCH, default 2.11.0, the
#      +cu130 build that PyPI serves and the lent H100 / H200 machines run) and, where this machine
#      has it, its Python 3.12 (FLASHKD_GPU_PYTHON; else python3: the library is one abi3 build)
#   2. flashkd built against it for the lent GPUs (FLASHKD_CUDA_ARCHS, default 90a-real): its
#      library goes to .gpu/_C.abi3.so, with .gpu/prebuilt.env saying which torch, architectures and
#      sources (bench/source_hash.sh) it was built from; gpu_suite.sh uses it only where all three match
#   3. a check that the library loads under that torch and passes a CPU test subset with it
#      (FLASHKD_PREPARE_TESTS: a pytest -k expression, or "all" for the whole CPU suite, about 3 min)
#   4. the peers' wheels for the GPU machine's Python 3.12 into .whl/ (FLASHKD_PEERS)
# and prints the device calls to make. .gpu/ and .whl/ are git-ignored: name them in the call's carry.
# Took 4 minutes on the 2-core machine (2026-12-06): 1 to make the environment, 2.5 to compile; a
# second run reuses the environment and the build directory.
set -euo pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
TORCH_VERSION=${FLASHKD_GPU_TORCH:-2.11.0}
# the GPU machine's Python where this machine has it: on PATH, or installed by pyenv but not selected
PYTHON=${FLASHKD_GPU_PYTHON:-}
for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 python3; do
    # (ensurepip too: Debian's and Ubuntu's pythons import venv but cannot make one without python3-venv)
    if [ -z "$PYTHON" ] && "$candidate" -c "import venv, ensurepip" 2>/dev/null; then PYTHON=$candidate; fi
done
PY_VERSION=$("$PYTHON" -c "import sys; print('%d.%d' % sys.version_info[:2])")
ARCHS=${FLASHKD_CUDA_ARCHS:-90a-real}
WORK=${FLASHKD_PREPARE_DIR:-/tmp/flashkd-gpu-prepare}
VENV=$WORK/venv-py$PY_VERSION-torch-$TORCH_VERSION
PEERS=${FLASHKD_PEERS:-liger-kernel==0.8.5 cut-cross-entropy==25.1.1 torchao==0.17.0}
TESTS=${FLASHKD_PREPARE_TESTS:-matches_oracle or gradcheck or exact}
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
mkdir -p "$WORK" .gpu .whl

# 1. the GPU machine's torch, in an environment of its own (the one this machine's tests use stays)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    log "1. environment with torch $TORCH_VERSION in $VENV (a download of about 3 GB)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" scikit-build-core cmake ninja pytest numpy expecttest
fi
TORCH_FULL=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
log "1. torch $TORCH_FULL, Python $PY_VERSION"

# 2. the library, built in a directory of its own (build/ belongs to this machine's own install)
SOURCE=$(bash bench/source_hash.sh)
log "2. building for $ARCHS against torch $TORCH_FULL (sources $SOURCE)"
rm -rf "$WORK/wheel"
FLASHKD_CUDA=ON FLASHKD_CUDA_ARCHS=$ARCHS "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps \
    -C build-dir="$WORK/build-${VENV##*/venv-}" -w "$WORK/wheel" .
WHEEL=$(ls "$WORK"/wheel/flashkd-*.whl)
rm -f .gpu/_C.abi3.so .gpu/prebuilt.env
"$VENV/bin/python" -m zipfile -e "$WHEEL" "$WORK/wheel/unpacked"
cp "$WORK/wheel/unpacked/flashkd/_C.abi3.so" .gpu/_C.abi3.so

# 3. the library with the tree's Python code under that torch, as gpu_suite.sh will run them
SITE=$WORK/site
rm -rf "$SITE" && mkdir -p "$SITE" && cp -r python/flashkd "$SITE/" && cp .gpu/_C.abi3.so "$SITE/flashkd/"
find "$SITE" -name '*.so' ! -path "$SITE/flashkd/_C.abi3.so" -delete
SELECT=(-k "$TESTS")
if [ "$TESTS" = all ]; then SELECT=(); fi
log "3. CPU tests with the prepared library and torch $TORCH_FULL: ${SELECT[*]:-all}"
PYTHONPATH=$SITE "$VENV/bin/python" -c "
import flashkd, torch
assert flashkd.__file__.startswith('$SITE'), flashkd.__file__
assert flashkd.has_cuda_kernels(), 'built without the CUDA kernels'
print('flashkd from', flashkd.__file__, '| CUDA kernels compiled in | torch', torch.__version__)"
PYTHONPATH=$SITE "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not cuda" "${SELECT[@]}"
cat > .gpu/prebuilt.env <<EOF
PREBUILT_TORCH=$TORCH_FULL
PREBUILT_ARCHS="$ARCHS"
PREBUILT_SOURCE=$SOURCE
PREBUILT_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
log "3. .gpu/_C.abi3.so ($(du -h .gpu/_C.abi3.so | cut -f1)) and .gpu/prebuilt.env written"

# 4. peer wheels for the GPU machine (Python 3.12, x86-64), their dependencies already there
log "4. peer wheels: $PEERS"
rm -f .whl/*.whl
# shellcheck disable=SC2086 # PEERS is a list of requirements
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $PEERS
ls -l .whl

log "ready. The device calls (bench/NOTES.md, \"A 15-minute lease\"):"
cat <<'EOF'
  1. run(command='FLASHKD_SUITE_STEPS="tests sanitizer" bash bench/gpu_suite.sh', carry=[".gpu", ".whl"], timeout_s=600)
  2. at once, with L = status's budget_left_s:
     run(command='FLASHKD_SUITE_BUDGET=<L - 40> FLASHKD_SUITE_STEPS=bench bash bench/gpu_suite.sh', carry=[".gpu", ".whl"], timeout_s=<L - 20>)
     If call 1's summary has FALLBACK lines and status says the machine is no longer warm, a fresh
     machine has lost build/gpu-suite-fallbacks.env: begin call 2's command with those exports.
  3. give_back; commit bench/results/ from the calls' files (the JSON and .md are in them; the step
     logs, where more than 8 files were written, in step-logs.tar.gz); update the README status table.
EOF
