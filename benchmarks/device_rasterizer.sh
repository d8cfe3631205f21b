#!/usr/bin/env bash
# Builds, tests and benchmarks the CUDA rasterizer on a GPU machine. Run from the repository root:
#     bash benchmarks/device_rasterizer.sh            # full benchmark matrix (about 10 minutes)
#     QUICK=1 bash benchmarks/device_rasterizer.sh    # 1M Gaussians, 1 camera, 3/64/384 channels
# Needs torch with CUDA, nvcc, ninja and pybind11 (as on the lent H100), and for the gsplat comparison the
# wheel in .whl/ (python -m pip download --no-deps gsplat==1.5.3 -d .whl; gsplat JIT-compiles on first use).
# Logs and results go to $OUT (default: benchmarks/results/device_rasterizer).
set -uo pipefail
OUT="${OUT:-benchmarks/results/device_rasterizer}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FIT3D_HF_NO_JIT=1
PY="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -n 2;
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$OUT/env.txt"

echo "== build (setup.py build_ext --inplace)"
start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s: $(ls fit3d_hf/_C*.so)"
grep -E "registers|spill" "$OUT/build.log" | head -n 20

echo "== CUDA tests"
"$PY" -m pytest -m cuda tests/test_render_cuda.py -q -rf -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -n 60

echo "== benchmark"
libs=fit3d
if ls .whl/gsplat-1.5.3-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index --target /tmp/gsplat_site .whl/gsplat-1.5.3-*.whl && \
        export PYTHONPATH="$PYTHONPATH:/tmp/gsplat_site" && libs=both
else
    echo "no .whl/gsplat-1.5.3-*.whl: benchmarking fit3d only"
fi
"$PY" benchmarks/rasterizer.py --lib "$libs" ${QUICK:+--quick} 2>&1 | tee "$OUT/bench.jsonl"
