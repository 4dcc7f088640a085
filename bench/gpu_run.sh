#!/usr/bin/env bash
# Everything a GPU machine can show, in one call:
#
#   bash bench/gpu_run.sh [OUTDIR]          # OUTDIR defaults to $OUT (the device tool's output folder)
#
#   1. the machine: nvidia-smi, python, torch, triton, pytorch-metric-learning
#   2. the native extension built against this machine's torch (`python setup.py build_ext --inplace`), where
#      setup.py builds one, for this GPU's architecture alone (METRIC_KERNELS_CUDA_ARCHS, e.g. 90a on an H100/H200);
#      a failed build is logged and the run goes on
#   3. the GPU tests, compiled Triton (TRITON_INTERPRET=0: tests/conftest.py switches the interpreter on otherwise):
#      python -m pytest tests -m gpu, spread over up to 8 processes where pytest-xdist is importable (the CPU suite is
#      CI's: on this machine it would not fit the time)
#   4. malformed calls of the cuda ops, each of which must raise (tests/gpu_probe_op_errors.py), rerun under cuda-gdb
#      for a native backtrace when one does not
#   5. the benchmark on cuda in the time left: with no extra arguments, the four headline losses (Circle, SupCon,
#      batch-hard, Proxy-Anchor) at N = 16384, 4096, 65536 (in that order), bf16 then fp32, every provider, then the
#      largest batch in 8 GiB up to N = 65536 (OUTDIR/search); with extra arguments, --full with those
#
# OUTDIR then holds gpu_run.log (everything printed), results.csv, results.json, results.md, time.png, memory.png
# and search/results.md, search/results.csv: eight files, what the device tool brings back. torch.compile's cache goes to the
# temp dir, not OUTDIR. Installs nothing (that machine has no network). pytorch-metric-learning (the "pml"
# provider) is used where importable: carry its wheel in .whl/ (see the device README); a pure-Python wheel is put
# on PYTHONPATH as it is, without pip.
#
# Time: GPU_RUN_BUDGET seconds in all (default 540, inside the device tool's 600 s per command); the tests get at
# most TEST_TIMEOUT (default 200); the benchmark gets what is left (its --deadline: later cases are recorded as
# skipped). Extra arguments after OUTDIR go to the benchmark (e.g. --losses supcon --sizes 4096 16384).
# Exit status: 0 when the tests and the benchmark both passed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-}}"
if [ -z "$OUTDIR" ]; then
    echo "usage: bash bench/gpu_run.sh OUTDIR [benchmark options]   (or set OUT)" >&2
    exit 2
fi
shift || true
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$ROOT"

START=$(date +%s)
BUDGET="${GPU_RUN_BUDGET:-540}"
TEST_TIMEOUT="${TEST_TIMEOUT:-200}"
PYTHON="${PYTHON:-python3}"
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
for wheel in "$ROOT"/.whl/pytorch_metric_learning-*.whl ${PML_WHEEL:-}; do
    [ -f "$wheel" ] && export PYTHONPATH="$PYTHONPATH:$wheel"
done
exec > >(tee "$OUTDIR/gpu_run.log") 2>&1
elapsed() { echo $(( $(date +%s) - START )); }
section() { echo; echo "=== $* (at $(elapsed) s)"; }

section "machine"
date -u +%Y-%m-%dT%H:%M:%SZ
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not found"
"$PYTHON" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
try:
    import pytorch_metric_learning as p; print("pytorch-metric-learning", p.__version__)
except ImportError:
    print("pytorch-metric-learning: not importable, the pml provider is left out")
PY

section "build"
if [ -z "${METRIC_KERNELS_CUDA_ARCHS:-}" ]; then
    METRIC_KERNELS_CUDA_ARCHS="$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m >= 9 else ""))' 2>/dev/null)"
    [ -n "$METRIC_KERNELS_CUDA_ARCHS" ] && export METRIC_KERNELS_CUDA_ARCHS && echo "CUDA architecture: $METRIC_KERNELS_CUDA_ARCHS"
fi
if [ -f setup.py ]; then
    "$PYTHON" setup.py build_ext --inplace
    rc=$?
    [ $rc -eq 0 ] || echo "build_ext failed (exit $rc); going on with what is there"
else
    echo "no setup.py: nothing to build"
fi
"$PYTHON" -m metric_kernels backends --device cuda || true

section "GPU tests (compiled Triton and the CUDA kernels, at most ${TEST_TIMEOUT} s)"
workers=""
"$PYTHON" -c "import xdist" 2>/dev/null && workers="-n $(( $(nproc) < 8 ? $(nproc) : 8 ))"
export METRIC_KERNELS_REQUIRE_CUDA_BACKEND=1  # a CUDA build that did not happen fails the cuda tests, not skips them
timeout --signal=INT --kill-after=20 "$TEST_TIMEOUT" \
    "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider $workers
tests_rc=$?
[ $tests_rc -eq 124 ] && echo "tests: stopped at the ${TEST_TIMEOUT} s limit (TEST_TIMEOUT)"
echo "tests exit status: $tests_rc"

section "malformed op calls (tests/gpu_probe_op_errors.py)"
if ! timeout 120 "$PYTHON" tests/gpu_probe_op_errors.py && command -v cuda-gdb >/dev/null; then
    echo "the probe failed: its native backtrace under cuda-gdb"
    timeout 180 cuda-gdb -batch -ex run -ex bt --args "$PYTHON" tests/gpu_probe_op_errors.py 2>&1 | tail -60
fi

section "batch-hard under tf32: choices off the float64 optimum (scripts/count_tf32_swaps.py, 10 seeds)"
for backend in triton cuda; do
    timeout 60 "$PYTHON" scripts/count_tf32_swaps.py "$backend" 10 || echo "$backend: the count did not finish"
done

left=$(( BUDGET - $(elapsed) - 20 ))
section "benchmark (deadline ${left} s)"
preset="--full"
if [ "$left" -lt 120 ]; then
    preset="--quick"
    left=$(( left > 30 ? left : 30 ))
    echo "little time left: the quick preset instead of the full one"
fi
bench() { "$PYTHON" -m metric_kernels.bench --device cuda --compile-cache "${TMPDIR:-/tmp}/metric_kernels_bench_inductor" "$@"; }
if [ $# -gt 0 ]; then
    bench $preset --out "$OUTDIR" --deadline "$left" "$@"
    bench_rc=$?
else
    # The whole --full preset takes hours on a GPU (its batch searches autotune at every size up to N = 262144), so
    # a lease of minutes times the four headline losses first, then searches the largest batch up to N = 65536 in
    # what is left (OUTDIR/search/, no plots: the device tool brings back 8 files).
    timing=$(( left * 2 / 3 ))
    bench --out "$OUTDIR" --deadline "$timing" \
        --losses circle supcon batch_hard proxy_anchor --sizes 16384 4096 65536 --dtypes bfloat16 float32
    bench_rc=$?
    left=$(( BUDGET - $(elapsed) - 10 ))
    if [ "$left" -gt 30 ]; then
        section "largest batch in 8 GiB (deadline ${left} s)"
        bench --full --out "$OUTDIR/search" --deadline "$left" --max-batch 8GiB --max-batch-cap 65536 \
            --losses circle supcon batch_hard proxy_anchor --sizes 1024 --dtypes float32 --modes full --no-plots
        search_rc=$?
        rm -f "$OUTDIR/search/results.json"
        [ $search_rc -eq 0 ] || bench_rc=$search_rc
    fi
fi
echo "benchmark exit status: $bench_rc"

section "done"
ls -l "$OUTDIR"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
