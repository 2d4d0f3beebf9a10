#!/usr/bin/env bash
# flashkd on one NVIDIA GPU, offline, in one command (9 minutes on an H100 before the tome and quant
# ops were added; not yet run with them — expect about 15, see FLASHKD_SUITE_STEPS to split it):
#   1. install peer wheels from .whl/ (liger-kernel, cut-cross-entropy, torchao) into /tmp/site
#   2. build flashkd in place with its CUDA kernels
#   3. show the GPU, torch and whether the CUDA kernels loaded
#   4. every cuda-marked test: first those of the kernels never yet run on a GPU (the distillation
#      cluster kernel, the int8 wgmma main loop), each on its own; if one fails, the later steps
#      run on the kernel it would replace
#   5. compute-sanitizer memcheck, then racecheck, on a reduced set of cuda tests
#   6. the benchmark: bench/results/<date>-<gpu>.json and a markdown summary .md
#   7. only when asked (FLASHKD_SUITE_STEPS=profile): Nsight Compute on the distillation kernels
#      (bench/profile_distill.py), into profile.log
# Every step is logged with its time; a failing step is recorded and the later
# steps that can still run do (tests and benchmark need the build). The exit
# status is non-zero when any step failed. When $OUT is set (the device tool),
# the logs are written there and the results copied there: 8 flat files.
#
# Environment:
#   FLASHKD_SUITE_STEPS       which of steps 4-7 to run (default "tests sanitizer bench"); steps 1-3 always
#                             run (a rebuild of an unchanged tree takes seconds), so a lease with a
#                             10-minute limit per call can split the suite over two calls, e.g.
#                             "tests sanitizer" then "bench"
#   FLASHKD_SANITIZER_TESTS   test files for step 5 (default: distill, tome, prune, quant kernels)
#   FLASHKD_SANITIZER_SUBSET  pytest -k expression for step 5 (default: about 110 tests of edge shapes,
#                             ties, exact integer results and gradients)
#   FLASHKD_BENCH_ARGS        arguments for python3 -m flashkd.bench (default: none, i.e. the GPU default:
#                             distill_loss fkl/jsd, both linear ops, tome_merge, vit_tome, quant_linear at their GPU targets)
#   FLASHKD_CUDA_ARCHS        architectures to build (default: this GPU's own, e.g. 90a-real on Hopper,
#                             which halves the build time against the wheel's sm_80 + sm_90a)
#   FLASHKD_COMMIT            commit to record when the checkout has no .git
#   *_TIMEOUT                 seconds: FLASHKD_NEW_KERNEL_TIMEOUT (150 per new kernel's tests),
#                             FLASHKD_TEST_TIMEOUT (240), FLASHKD_SANITIZER_TIMEOUT (240 per tool),
#                             FLASHKD_BENCH_TIMEOUT (480; the JSON is written after every case, so a
#                             benchmark cut short still leaves its finished cases), FLASHKD_PROFILE_TIMEOUT (300)
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

# Logs go straight to $OUT when set, so a run cut short still returns them.
WORK=${OUT:-$(mktemp -d /tmp/flashkd-suite.XXXXXX)}
exec > >(tee -a "$WORK/suite.log") 2>&1

log() { echo "[$(date -u +%H:%M:%S)] $*"; }
FAILED=()
SUMMARY=()
# step NAME LOGFILE COMMAND...: run (output also copied to LOGFILE unless it
# is -), log the time taken, record a failure.
step() {
    local name=$1 file=$2 start=$SECONDS rc
    shift 2
    log "== $name: $*"
    if [ "$file" = - ]; then
        "$@"
        rc=$?
    else
        "$@" 2>&1 | tee "$file"
        rc=${PIPESTATUS[0]}
    fi
    log "== $name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ]; then FAILED+=("$name (exit $rc)"); fi
    SUMMARY+=("$name: exit $rc, $((SECONDS - start)) s")
    return "$rc"
}

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr 'A-Z' 'a-z' | tr -s ' ' '-')
STAMP=$(date -u +%Y-%m-%d-%H%M)
RESULT=bench/results/$STAMP-${GPU:-unknown-gpu}
export FLASHKD_COMMIT=${FLASHKD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
mkdir -p bench/results
log "flashkd GPU suite: commit $FLASHKD_COMMIT, results $RESULT.{json,md}, logs $WORK"

# 1. peer wheels
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    step wheels - python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${WHEELS[@]}" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    log "== wheels: none in .whl/"
fi

# 2. build
BUILT=0
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.')
case "$CAP" in
    90) OWN_ARCH=90a-real ;;
    "") OWN_ARCH="80-real;90a-real" ;;
    *) OWN_ARCH=$CAP-real ;;
esac
export FLASHKD_CUDA_ARCHS=${FLASHKD_CUDA_ARCHS:-$OWN_ARCH}
step build - env FLASHKD_CUDA=ON MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install --no-build-isolation --no-deps -e . && BUILT=1

# 3. device
nvidia-smi
step device - python3 -c "
import torch, flashkd
print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name())
print('flashkd CUDA kernels:', flashkd.has_cuda_kernels())
print('int8 GEMM main loop (M > 16):', torch.ops.flashkd.quant_cuda_mainloop())
print('distillation kernel preference:', torch.ops.flashkd.distill_cuda_kernel()[0])
assert flashkd.has_cuda_kernels(), 'flashkd was built without its CUDA kernels'"

STEPS=" ${FLASHKD_SUITE_STEPS:-tests sanitizer bench} "
wanted() { [[ "$STEPS" == *" $1 "* ]]; }

# pytest's closing line, e.g. "830 passed, 2 skipped in 95.1s"
summary_line() { grep -E '(passed|failed|skipped|deselected|errors?|no tests ran).* in [0-9.]+s' "$1" | tail -n1; }

# 4. tests. The kernels never yet run on a GPU (the distillation cluster kernel, the int8 wgmma
# main loop) go first, each in its own pytest run with its own time limit: a failure or a hang
# there costs only that run, and the later steps (the other tests, sanitizer, benchmark) then run
# on the proven kernel instead. The fallbacks are kept in $FALLBACK_FILE (build/ survives between
# calls on a warm machine), so a later call with FLASHKD_SUITE_STEPS=bench uses them too.
FALLBACK_FILE=build/gpu-suite-fallbacks.env
FALLBACKS=()
NEW_KERNELS=("cuda-cluster:tests/test_distill.py:FLASHKD_DISTILL_KERNEL=stream"
             "wgmma:tests/test_quant_kernels.py:FLASHKD_INT8_MAINLOOP=mma.sync")
TESTS="not run (no build)"
if ! wanted tests; then
    TESTS="not run (FLASHKD_SUITE_STEPS)"
    if [ -f "$FALLBACK_FILE" ]; then
        # shellcheck disable=SC1090
        source "$FALLBACK_FILE"
        mapfile -t FALLBACKS < <(sed -n 's/^# //p' "$FALLBACK_FILE")
        log "== fallbacks from an earlier call: ${FALLBACKS[*]}"
    fi
elif [ $BUILT = 1 ]; then
    mkdir -p build && : > "$FALLBACK_FILE"
    NEW_TESTS=""
    for spec in "${NEW_KERNELS[@]}"; do
        IFS=: read -r id file fallback <<< "$spec"
        if ! step "tests-$id" "$WORK/pytest-$id.log" timeout "${FLASHKD_NEW_KERNEL_TIMEOUT:-150}" \
            python3 -m pytest -m cuda -q -p no:cacheprovider "$file" -k "$id"; then
            export "${fallback?}"
            FALLBACKS+=("$id failed: later steps ran with $fallback")
            printf '# %s\nexport %s\n' "${FALLBACKS[-1]}" "$fallback" >> "$FALLBACK_FILE"
            log "== $id failed: $fallback from here on"
        fi
        NEW_TESTS+="; $id: $(summary_line "$WORK/pytest-$id.log")"
    done
    step tests "$WORK/pytest.log" timeout "${FLASHKD_TEST_TIMEOUT:-240}" \
        python3 -m pytest -m cuda -q -p no:cacheprovider -k "not cuda-cluster and not wgmma" \
        --junitxml="$WORK/pytest-junit.xml"
    TESTS="the rest: $(summary_line "$WORK/pytest.log")$NEW_TESTS"
fi

# 5. compute-sanitizer; without the caching allocator, so memcheck sees each allocation's bounds
SANITIZER=()
SAN_TESTS=${FLASHKD_SANITIZER_TESTS:-tests/test_distill.py tests/test_tome.py tests/test_prune.py tests/test_quant_kernels.py}
SAN_SUBSET=${FLASHKD_SANITIZER_SUBSET:-gradcheck or identical or inf or tie or matmul_exact or strided or empty or non_contiguous or merge_wavg_grad or row_split and fkl or prune.py and test_grad}
for line in "${FALLBACKS[@]}"; do SAN_SUBSET="($SAN_SUBSET) and not ${line%% failed*}"; done
if ! wanted sanitizer; then
    SANITIZER+=("compute-sanitizer: not run (FLASHKD_SUITE_STEPS)")
elif [ $BUILT = 0 ]; then
    SANITIZER+=("not run (no build)")
elif ! command -v compute-sanitizer >/dev/null; then
    SANITIZER+=("not run: compute-sanitizer is not on PATH")
else
    for tool in memcheck racecheck; do
        # shellcheck disable=SC2086  (SAN_TESTS is a list of paths)
        step "$tool" "$WORK/$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            timeout "${FLASHKD_SANITIZER_TIMEOUT:-240}" \
            compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
            python3 -m pytest -m cuda -q -x -p no:cacheprovider $SAN_TESTS -k "$SAN_SUBSET"
        SANITIZER+=("$tool ($SAN_TESTS -k \"$SAN_SUBSET\"): $(summary_line "$WORK/$tool.log"); $(grep -m1 \
            'ERROR SUMMARY' "$WORK/$tool.log" || echo 'no ERROR SUMMARY line')")
    done
fi

# 6. benchmark
BENCH_ARGS=${FLASHKD_BENCH_ARGS-}
if [ $BUILT = 1 ] && wanted bench; then
    # shellcheck disable=SC2086  (BENCH_ARGS is a list of words)
    step bench - timeout "${FLASHKD_BENCH_TIMEOUT:-480}" python3 -m flashkd.bench \
        --device cuda --json "$RESULT.json" --plot "$WORK/bench.png" $BENCH_ARGS
fi

# 7. Nsight Compute on the distillation kernels (opt-in: FLASHKD_SUITE_STEPS=profile)
PROFILE="not run (FLASHKD_SUITE_STEPS)"
if [ $BUILT = 1 ] && wanted profile; then
    if command -v ncu >/dev/null; then
        step profile "$WORK/profile.log" timeout "${FLASHKD_PROFILE_TIMEOUT:-300}" \
            ncu --profile-from-start off --kernel-name regex:distill --section SpeedOfLight \
            --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
            --section Occupancy --section LaunchStats python3 bench/profile_distill.py
        PROFILE="profile.log (exit code in steps)"
    else
        PROFILE="not run: ncu is not on PATH"
    fi
fi

{
    echo "# flashkd GPU suite, $STAMP"
    echo
    echo "- device: ${GPU:-unknown}; $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | sed 's/^/driver /')"
    echo "- torch: $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
    echo "- commit: $FLASHKD_COMMIT"
    echo "- tests (pytest -m cuda): ${TESTS:-no summary line}"
    for line in "${FALLBACKS[@]}"; do echo "- FALLBACK: $line"; done
    for line in "${SANITIZER[@]}"; do echo "- $line"; done
    echo "- ncu on the distillation kernels: $PROFILE"
    echo "- steps: $(printf '%s; ' "${SUMMARY[@]}")"
    echo "- failed: ${FAILED[*]:-none}"
    echo
    echo "## Benchmark"
    echo
    echo '```text'
    python3 -m flashkd.bench.report "$RESULT.json" 2>/dev/null || echo "no benchmark results"
    echo '```'
} > "$RESULT.md"
log "summary written to $RESULT.md"

if [ -n "${OUT:-}" ]; then
    for f in "$RESULT.json" "$RESULT.md"; do
        if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
    done
fi

if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED: ${FAILED[*]}"
    exit 1
fi
log "all steps passed"
