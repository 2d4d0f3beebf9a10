#!/usr/bin/env bash
# flashkd on one NVIDIA GPU, offline, in one command:
#   1. install peer wheels from .whl/ (liger-kernel, cut-cross-entropy, torchao) into /tmp/site
#   2. take the library that bench/prepare_gpu_lease.sh built on a CPU machine (.gpu/), where it was
#      built from this tree's sources for this torch and this GPU, or else build flashkd in place
#      with its CUDA kernels (2-4 minutes)
#   3. show the GPU, torch and whether the CUDA kernels loaded
#   4. every cuda-marked test (on 4 pytest-xdist workers where xdist is installed): first those of
#      the kernels never yet run on a GPU (the distillation cluster kernel, the int8 wgmma main
#      loop without and with clusters), each on its own; if one fails, the later steps run on the
#      kernel it would replace
#   5. compute-sanitizer memcheck, then racecheck, on a reduced set of cuda tests
#   6. the benchmark: bench/results/<date>-<gpu>.json (in $OUT where set) and a markdown summary .md
#   7. only when asked (FLASHKD_SUITE_STEPS=profile): Nsight Compute on the distillation kernels
#      (bench/profile_distill.py), into profile.log
# Every step is logged with its time; a failing step is recorded and the later
# steps that can still run do (tests and benchmark need the build). The exit
# status is non-zero when any step failed or was cut for time. When $OUT is set
# (the device tool), the logs and the results are written straight there (a run cut short keeps
# them), flat; the device tool returns at most 8 files of at most 16 MiB, so at the end the step
# logs go into one archive where there are more (all steps in one call), and a log still over
# 15 MiB is compressed.
#
# A lease (15 minutes of device time, at most 10 a call): prepare on the CPU machine first
# (bash bench/prepare_gpu_lease.sh: the library, the peer wheels), then two calls on one warm
# machine, each carrying .gpu and .whl: FLASHKD_SUITE_STEPS="tests sanitizer", then
# FLASHKD_SUITE_STEPS=bench. Each call ends within FLASHKD_SUITE_BUDGET seconds: a step gets at most
# what is left of it, a step with too little left is not run (and the summary says so), and the
# summary is always written.
#
# Environment:
#   FLASHKD_SUITE_STEPS       which of steps 4-7 to run (default "tests sanitizer bench"); steps 1-3 always
#                             run (seconds with a prepared library or an unchanged in-place build)
#   FLASHKD_SUITE_BUDGET      seconds this call may take in all (default 570, under the device tool's 600)
#   FLASHKD_SANITIZER_TESTS   test files for step 5 (default: distill, tome, prune, quant kernels)
#   FLASHKD_SANITIZER_SUBSET  pytest -k expression for step 5 (default: 338 cuda tests of edge shapes,
#                             ties, exact integer results and gradients, 242 of them run on an H100;
#                             the rest are the quant tests' CPU kernel choices, skipped)
#   FLASHKD_BENCH_ARGS        arguments for python3 -m flashkd.bench (default: none, i.e. the GPU default:
#                             distill_loss fkl/jsd, both linear ops, tome_merge, vit_tome, quant_linear at their GPU targets)
#   FLASHKD_CUDA_ARCHS        architectures to build (default: this GPU's own, e.g. 90a-real on Hopper,
#                             which halves the build time against the wheel's sm_80 + sm_90a)
#   FLASHKD_TEST_WORKERS      pytest-xdist workers for step 4 (default 4; 0 runs the tests in one process)
#   FLASHKD_COMMIT            commit to record when the checkout has no .git
#   *_TIMEOUT                 seconds, each cut to what is left of the budget (a step over its limit
#                             gets SIGINT, so pytest still writes its summary, then SIGKILL 10 s
#                             later): FLASHKD_BUILD_TIMEOUT (480, only without a prepared library),
#                             FLASHKD_NEW_KERNEL_TIMEOUT
#                             (150 per new kernel's tests), FLASHKD_TEST_TIMEOUT (240), FLASHKD_CASE_TIMEOUT
#                             (120 per test, where pytest-timeout is installed: a hung kernel costs one
#                             test), FLASHKD_SANITIZER_TIMEOUT (240 per tool), FLASHKD_BENCH_TIMEOUT (480; the
#                             JSON is written after every case, so a benchmark cut short still leaves its
#                             finished cases), FLASHKD_PROFILE_TIMEOUT (300)
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
# compute-sanitizer and ncu, where the toolkit's bin/ is not on PATH
if [ -d /usr/local/cuda/bin ]; then PATH=$PATH:/usr/local/cuda/bin; fi

# Logs go straight to $OUT when set, so a run cut short still returns them.
WORK=${OUT:-$(mktemp -d /tmp/flashkd-suite.XXXXXX)}
exec > >(tee -a "$WORK/suite.log") 2>&1
TEE_PID=$!

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
# limited NAME LOGFILE SECONDS COMMAND...: step under `timeout`, its limit cut to what is left of
# the call's budget (less a reserve for the summary); with under 20 s left the step is not run,
# counts as failed, and returns 125. At its limit the step's process group gets SIGINT (pytest
# then still prints its summary line and writes its junit XML), and SIGKILL 10 s later.
BUDGET=${FLASHKD_SUITE_BUDGET:-570}
RESERVE=30
limited() {
    local name=$1 file=$2 want=$3 left
    shift 3
    left=$((BUDGET - SECONDS - RESERVE))
    if [ "$left" -lt 20 ]; then
        log "== $name: not run, $left s left of the call's $BUDGET s budget"
        FAILED+=("$name (not run: out of time)")
        SUMMARY+=("$name: not run (out of time)")
        return 125
    fi
    step "$name" "$file" timeout -s INT -k 10 "$((want < left ? want : left))" "$@"
}

# (nvidia-smi under a time limit throughout: it can hang on a GPU a kernel left wedged)
GPU=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 \
      | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9._\n' '-')
STAMP=$(date -u +%Y-%m-%d-%H%M)
# straight into $OUT where set: the JSON, written after every case, then survives a call cut short
RESULT=${OUT:-bench/results}/$STAMP-${GPU:-unknown-gpu}
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

# 2. the library: prepared on a CPU machine where it fits, else built here
BUILT=0
CAP=$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.')
case "$CAP" in
    90) OWN_ARCH=90a-real ;;
    "") OWN_ARCH="80-real;90a-real" ;;
    *) OWN_ARCH=$CAP-real ;;
esac
export FLASHKD_CUDA_ARCHS=${FLASHKD_CUDA_ARCHS:-$OWN_ARCH}
# use_prepared: puts .gpu/_C.abi3.so (bench/prepare_gpu_lease.sh) beside the tree's Python code if
# it was built from these sources, for this torch and this GPU, and loads from there; prints why not
# otherwise. (Run in a subshell: the caller exports TREE_PYTHONPATH when it is used.)
TREE_PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
use_prepared() {
    local PREBUILT_TORCH PREBUILT_ARCHS PREBUILT_SOURCE PREBUILT_DATE torch source
    if [ ! -f .gpu/prebuilt.env ] || [ ! -f .gpu/_C.abi3.so ]; then echo "none in .gpu/"; return 1; fi
    # shellcheck disable=SC1091
    source .gpu/prebuilt.env
    torch=$(python3 -c 'import torch; print(torch.__version__)')
    source=$(bash bench/source_hash.sh)
    if [ "$PREBUILT_TORCH" != "$torch" ]; then echo "built for torch $PREBUILT_TORCH, not $torch"; return 1; fi
    if [ "$PREBUILT_SOURCE" != "$source" ]; then echo "built from other sources than this tree's"; return 1; fi
    if [[ ";$PREBUILT_ARCHS;" != *";$FLASHKD_CUDA_ARCHS;"* ]]; then
        echo "built for $PREBUILT_ARCHS, not $FLASHKD_CUDA_ARCHS"; return 1
    fi
    # an in-place build of an earlier call on this machine would be imported instead
    python3 -m pip uninstall -y -q flashkd >/dev/null 2>&1
    cp .gpu/_C.abi3.so python/flashkd/_C.abi3.so
    if ! PYTHONPATH=$TREE_PYTHONPATH python3 -c "
import flashkd; assert flashkd.__file__.startswith('$PWD/python/'), flashkd.__file__
assert flashkd.has_cuda_kernels()"; then
        rm -f python/flashkd/_C.abi3.so
        echo "does not load"; return 1
    fi
    echo "built $PREBUILT_DATE for torch $PREBUILT_TORCH, $PREBUILT_ARCHS, sources $source"
}
if PREPARED=$(use_prepared); then
    LIBRARY="prepared on a CPU machine ($PREPARED)"
    export PYTHONPATH=$TREE_PYTHONPATH
    BUILT=1
else
    LIBRARY="built here (prepared library: $PREPARED)"
    log "== prepared library not used: $PREPARED"
    rm -f python/flashkd/_C.abi3.so
    limited build - "${FLASHKD_BUILD_TIMEOUT:-480}" env FLASHKD_CUDA=ON MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 \
        python3 -m pip install --no-build-isolation --no-deps -e . && BUILT=1
    if [ $BUILT = 0 ]; then LIBRARY="none: the build here failed (prepared library: $PREPARED)"; fi
fi
log "== library: $LIBRARY"

# 3. device
timeout 30 nvidia-smi
limited device - 120 python3 -c "
import torch, flashkd
print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name())
print('flashkd CUDA kernels:', flashkd.has_cuda_kernels())
print('int8 GEMM main loop (M > 16):', torch.ops.flashkd.quant_cuda_mainloop())
print('distillation kernel preference:', torch.ops.flashkd.distill_cuda_kernel()[0])
assert flashkd.has_cuda_kernels(), 'flashkd was built without its CUDA kernels'"

STEPS=" ${FLASHKD_SUITE_STEPS:-tests sanitizer bench} "
wanted() { [[ "$STEPS" == *" $1 "* ]]; }

# pytest's closing line, e.g. "830 passed, 2 skipped in 95.1s"
summary_line() { grep -sE '(passed|failed|skipped|deselected|errors?|no tests ran).* in [0-9.]+s' "$1" | tail -n1; }

# 4. tests. The kernels never yet run on a GPU (the distillation cluster kernel, the int8 wgmma
# main loop) go first, each in its own pytest run with its own time limit: a failure or a hang
# there costs only that run, and the later steps (the other tests, sanitizer, benchmark) then run
# on the proven kernel instead. The fallbacks are kept in $FALLBACK_FILE (build/ survives between
# calls on a warm machine), so a later call with FLASHKD_SUITE_STEPS=bench uses them too.
FALLBACK_FILE=build/gpu-suite-fallbacks.env
FALLBACKS=()
# id|pytest -k expression|test files (a glob)|fallbacks|benchmark providers to skip, when its tests fail.
# Fallbacks are VAR=kernel in order of preference: the first whose kernel has not failed is
# exported (none, for a kernel that is not the default: wgmma-1cta, the wgmma loop without
# clusters, only leaves the later steps; the clustered wgmma then falls back to it, or to
# mma.sync if it failed too).
NEW_KERNELS=("cuda-cluster|cuda-cluster|tests/test_distill*.py|FLASHKD_DISTILL_KERNEL=stream|"
             "wgmma-1cta|wgmma-1cta|tests/test_quant_kernels.py||quant_linear:flashkd-wgmma-1cta"
             "wgmma|wgmma and not wgmma-1cta|tests/test_quant_kernels.py|FLASHKD_INT8_MAINLOOP=wgmma-1cta FLASHKD_INT8_MAINLOOP=mma.sync|")
BENCH_SKIP=""
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
    # Several test processes share the GPU, so the CPU-bound part (compiles, opchecks, the float64
    # oracle) runs on several of the machine's 16 cores; a hung test is ended alone (pytest-timeout
    # ends its process, xdist starts another).
    PYTEST_RUN=(python3 -m pytest -m cuda -q -p no:cacheprovider)
    WORKERS=${FLASHKD_TEST_WORKERS:-4}
    if [ "$WORKERS" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
        # each worker's torch would start an OpenMP thread per core (4 x 16 on 16 cores): share them
        THREADS=$(( $(nproc) / WORKERS )); if [ "$THREADS" -lt 1 ]; then THREADS=1; fi
        PYTEST_RUN=(env OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}" "${PYTEST_RUN[@]}" -n "$WORKERS")
        if python3 -c "import pytest_timeout" 2>/dev/null; then
            PYTEST_RUN+=(--timeout "${FLASHKD_CASE_TIMEOUT:-120}" --timeout-method thread)
        fi
    fi
    NEW_TESTS=""
    FAILED_KERNELS=" "
    for spec in "${NEW_KERNELS[@]}"; do
        IFS='|' read -r id expr file fallbacks skip <<< "$spec"
        # shellcheck disable=SC2086 # $file may be a glob of test files
        limited "tests-$id" "$WORK/pytest-$id.log" "${FLASHKD_NEW_KERNEL_TIMEOUT:-150}" \
            "${PYTEST_RUN[@]}" $file -k "$expr"
        rc=$?
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 125 ]; then
            FAILED_KERNELS+="$id "
            fallback=""
            for candidate in $fallbacks; do
                if [[ "$FAILED_KERNELS" != *" ${candidate#*=} "* ]]; then fallback=$candidate; break; fi
            done
            if [ -n "$fallback" ]; then
                export "${fallback?}"
                FALLBACKS+=("$id failed: later steps ran with $fallback")
                printf '# %s\nexport %s\n' "${FALLBACKS[-1]}" "$fallback" >> "$FALLBACK_FILE"
            else
                FALLBACKS+=("$id failed: later steps left it out")
                printf '# %s\n' "${FALLBACKS[-1]}" >> "$FALLBACK_FILE"
            fi
            if [ -n "$skip" ]; then
                BENCH_SKIP+="${BENCH_SKIP:+,}$skip"
                printf 'BENCH_SKIP="%s"\n' "$BENCH_SKIP" >> "$FALLBACK_FILE"
            fi
            log "== ${FALLBACKS[-1]}"
        fi
        NEW_TESTS+="; $id: $(summary_line "$WORK/pytest-$id.log")"
    done
    limited tests "$WORK/pytest.log" "${FLASHKD_TEST_TIMEOUT:-240}" \
        "${PYTEST_RUN[@]}" -k "not cuda-cluster and not wgmma" --junitxml="$WORK/pytest-junit.xml"
    TESTS="the rest: $(summary_line "$WORK/pytest.log")$NEW_TESTS"
fi

# 5. compute-sanitizer; without the caching allocator, so memcheck sees each allocation's bounds
SANITIZER=()
SAN_TESTS=${FLASHKD_SANITIZER_TESTS:-tests/test_distill*.py tests/test_tome.py tests/test_prune.py tests/test_quant_kernels.py}
SAN_SUBSET=${FLASHKD_SANITIZER_SUBSET:-gradcheck or identical or inf or tie or matmul_exact or strided or empty or non_contiguous or merge_wavg_grad or row_split and fkl or prune.py and test_grad or out_of_range or many_tokens}
for line in "${FALLBACKS[@]}"; do SAN_SUBSET="($SAN_SUBSET) and not ${line%% failed*}"; done
if ! wanted sanitizer; then
    SANITIZER+=("compute-sanitizer: not run (FLASHKD_SUITE_STEPS)")
elif [ $BUILT = 0 ]; then
    SANITIZER+=("compute-sanitizer: not run (no build)")
elif ! command -v compute-sanitizer >/dev/null; then
    SANITIZER+=("not run: compute-sanitizer is not on PATH")
else
    for tool in memcheck racecheck; do
        # shellcheck disable=SC2086 # SAN_TESTS is a list of paths
        limited "$tool" "$WORK/$tool.log" "${FLASHKD_SANITIZER_TIMEOUT:-240}" \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
            python3 -m pytest -m cuda -q -x -p no:cacheprovider $SAN_TESTS -k "$SAN_SUBSET"
        SANITIZER+=("$tool ($SAN_TESTS -k \"$SAN_SUBSET\"): $(summary_line "$WORK/$tool.log"); $(grep -s -m1 -E \
            '(ERROR|RACECHECK) SUMMARY' "$WORK/$tool.log" || echo 'no ERROR SUMMARY line')")
    done
fi

# 6. benchmark
BENCH_ARGS=${FLASHKD_BENCH_ARGS-}
if [ $BUILT = 1 ] && wanted bench; then
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of words
    limited bench - "${FLASHKD_BENCH_TIMEOUT:-480}" python3 -m flashkd.bench \
        --device cuda --json "$RESULT.json" --plot "$WORK/bench.png" $BENCH_ARGS --also-skip "$BENCH_SKIP"
fi

# 7. Nsight Compute on the distillation kernels (opt-in: FLASHKD_SUITE_STEPS=profile)
PROFILE="not run (FLASHKD_SUITE_STEPS)"
if [ $BUILT = 1 ] && wanted profile; then
    if command -v ncu >/dev/null; then
        limited profile "$WORK/profile.log" "${FLASHKD_PROFILE_TIMEOUT:-300}" \
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
    echo "- device: ${GPU:-unknown}; $(timeout 30 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | sed 's/^/driver /')"
    echo "- torch: $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
    echo "- commit: $FLASHKD_COMMIT"
    echo "- library: $LIBRARY"
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

# finish STATUS: lets tee write the log's last lines, fits $OUT to what the device tool returns
# (at most 8 files, each at most 16 MiB), and exits with STATUS.
finish() {
    local f logs=()
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    if [ -n "${OUT:-}" ] && cd "$OUT"; then
        if [ "$(find . -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
            for f in pytest-*.log pytest.log pytest-junit.xml memcheck.log racecheck.log profile.log; do
                if [ -f "$f" ]; then logs+=("$f"); fi
            done
            tar --remove-files -czf step-logs.tar.gz "${logs[@]}"
        fi
        find . -maxdepth 1 -type f -size +15M ! -name '*.gz' -exec gzip {} +
    fi
    exit "$1"
}
if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED: ${FAILED[*]}"
    finish 1
fi
log "all steps passed"
finish 0
