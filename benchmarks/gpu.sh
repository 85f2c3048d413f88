#!/usr/bin/env bash
# The GPU checks: the CUDA tests (pytest marker `cuda`), the real-width, fixed-cost and head-sweep benchmark
# sections on CUDA and, with two or more GPUs, `torchrun --nproc_per_node 2` diagnose over nccl. Without CUDA it
# runs nothing.
#
#   benchmarks/gpu.sh [OUT]     OUT: folder for gpu.json and the logs (default: $OUT, else out/gpu)
#
# Exit status: 0 when every step that ran passed (or CUDA is absent), 1 when one failed. PYTHON picks the
# interpreter (default: python).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
OUT=${1:-${OUT:-out/gpu}}

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)") || {
    echo "gpu.sh: cannot import torch with $PY" >&2; exit 1; }
if [ "$gpus" -eq 0 ]; then
    echo "gpu.sh: torch.cuda.is_available() is False: no CUDA device, ran nothing."
    exit 0
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" \
    | tee "$OUT/device.txt"

failed=()
summary=()
step() {   # step NAME COMMAND...: run, log to OUT/NAME.log, remember the outcome
    local name=$1; shift
    echo "== $name: $*"
    if "$@" 2>&1 | tee "$OUT/$name.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
        summary+=("$name: passed")
    else
        summary+=("$name: FAILED (log: $OUT/$name.log)"); failed+=("$name")
    fi
}

# 1. the CUDA tests (skipped without CUDA elsewhere); the two-GPU torchrun test runs in step 3
step cuda_tests "$PY" -m pytest -q -p no:warnings -m cuda -k "not nccl" tests/

# 2. benchmark sections on CUDA, those that exist in this version of benchmarks/run.py
sections=$("$PY" -c "from benchmarks.run import SECTIONS; print(' '.join(SECTIONS))")
want=()
for s in scale fixed sweep; do
    if [[ " $sections " == *" $s "* ]]; then want+=("$s"); else
        echo "gpu.sh: benchmarks/run.py has no section '$s' (sections: $sections); skipped."
        summary+=("benchmark $s: skipped (no such section)")
    fi
done
if [ ${#want[@]} -gt 0 ]; then
    only=$(IFS=,; echo "${want[*]}")
    step benchmarks "$PY" benchmarks/run.py --only "$only" --json "$OUT/gpu.json"
fi

# 3. torchrun over nccl: two ranks, one GPU each, against the single-process report
if [ "$gpus" -ge 2 ]; then
    step torchrun_nccl "$PY" -m pytest -q -p no:warnings -m cuda -k nccl tests/test_kernels_dtypes.py
else
    echo "gpu.sh: one GPU: torchrun over nccl needs two; skipped."
    summary+=("torchrun_nccl: skipped (one GPU)")
fi

echo "== gpu.sh summary ($gpus GPU(s); results in $OUT)"
printf '  %s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ]
