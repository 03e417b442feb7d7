#!/usr/bin/env bash
# The GPU checks in one call, for a machine with a CUDA GPU whose python3 already has torch,
# triton, pytest and pytest-benchmark (no downloads): builds the C++ extension, runs the test
# files that exercise the Triton kernels (compiled for the GPU there, not interpreted) and the
# CUDA-graph sampler tests (-m gpu), then times the Triton kernels with the benchmark suite.
#
#   OUT=/some/dir bash scripts/gpu_check.sh              # logs, JSON and table.md land in $OUT
#   STAGES=tests bash scripts/gpu_check.sh              # or STAGES=bench: one stage per call
#
# Each stage has its own time limit (TEST_S for the tests, BENCH_S per benchmark file, seconds),
# and each benchmark file writes its own JSON, so one slow stage cannot take the others' results.
# The exit status is the tests' (0 when they are not run). TCSM_GPU_CHECK_ON_CPU=1 runs the same
# flow on a machine without a GPU (Triton interpreted, CPU benchmarks at small shapes): a
# rehearsal.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
STAGES=${STAGES:-tests bench}
TEST_S=${TEST_S:-300}
BENCH_S=${BENCH_S:-100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ "${TCSM_GPU_CHECK_ON_CPU:-0}" = 1 ]; then
  device=cpu
  export TCSM_BENCH_ROWS=64 TCSM_BENCH_VOCABS=4096 TCSM_BENCH_STEP_ROWS=64
  export TCSM_BENCH_STEP_VOCABS=4096 TCSM_BENCH_TOPK_VOCABS=4096 TCSM_BENCH_ROUNDS=2
else
  device=cuda
  if ! $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device visible to $PY (TCSM_GPU_CHECK_ON_CPU=1 rehearses on CPU)" >&2
    exit 2
  fi
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  | tee "$OUT/versions.txt"

$PY setup.py -q build_ext --inplace -j "$(nproc)" > "$OUT/build.log" 2>&1 \
  || echo "C++ build failed: see $OUT/build.log (the C++ backend's tests will fail)"

tests_status=0
if [[ " $STAGES " == *" tests "* ]]; then
  timeout "$TEST_S" $PY -m pytest -q -p no:cacheprovider -rs \
    tests/test_loss_triton.py tests/test_ctmc_step.py tests/test_topk_scores.py \
    tests/test_sampling.py > "$OUT/tests.log" 2>&1
  tests_status=$?
  tail -5 "$OUT/tests.log"
fi

if [[ " $STAGES " == *" bench "* ]]; then
  results=()
  for suite in loss ctmc topk; do
    TCSM_BENCH_DEVICE=$device TCSM_BENCH_MEMORY=0 timeout "$BENCH_S" $PY -m pytest -q \
      -p no:cacheprovider "benchmarks/test_bench_$suite.py" --benchmark-only \
      --benchmark-json="$OUT/bench_$suite.json" --benchmark-columns=median,min,max \
      > "$OUT/bench_$suite.log" 2>&1
    echo "benchmarks/test_bench_$suite.py: exit $?"
    [ -s "$OUT/bench_$suite.json" ] && results+=("$OUT/bench_$suite.json")
  done
  if [ ${#results[@]} -gt 0 ]; then
    $PY benchmarks/report.py "$OUT" "${results[@]}" > /dev/null && cat "$OUT/table.md"
  fi
fi
exit "$tests_status"
