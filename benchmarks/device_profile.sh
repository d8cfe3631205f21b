#!/usr/bin/env bash
# Diagnostics of the CUDA rasterizer on a GPU machine: build, CUDA tests, per-kernel times, host time and
# Nsight Compute metrics of the blending kernels. From the repository root: bash benchmarks/device_profile.sh
# Logs go to $OUT (default: benchmarks/results/device_profile).
set -uo pipefail
OUT="${OUT:-benchmarks/results/device_profile}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FIT3D_HF_NO_JIT=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then tail -n 60 "$OUT/build.log"; exit 1; fi
echo "== built in $(( $(date +%s) - start )) s"
if [ -z "${SKIP_TESTS:-}" ]; then
    "$PY" -m pytest -m cuda tests -q -x -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -n 15
fi
"$PY" benchmarks/profile_rasterizer.py --n 1000000 --ch 64 >"$OUT/profile.txt" 2>&1; head -n 40 "$OUT/profile.txt"
grep -E "^forward" "$OUT/profile.txt"
"$PY" benchmarks/profile_rasterizer.py --host 2>&1 | tee "$OUT/host.txt"
if [ -n "${NCU:-1}" ] && command -v ncu >/dev/null; then
    timeout 240 ncu --target-processes all --kernel-name regex:"rasterize_(fwd|bwd)_kernel" --launch-skip 4 \
        --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats --section SchedulerStats \
        "$PY" benchmarks/profile_rasterizer.py --plain 4 >"$OUT/ncu.txt" 2>&1
    grep -E "rasterize_|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Stall|Eligible|Issued Warp|Shared Memory Configuration|L2 Hit|Mem Busy|Max Bandwidth|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -n 80
fi
echo "== done in $(( $(date +%s) - start )) s"
