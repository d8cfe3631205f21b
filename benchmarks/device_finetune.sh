#!/usr/bin/env bash
# Stage II benchmark on a GPU machine (benchmarks/finetune.py), from the repository root:
#     bash benchmarks/device_finetune.sh
# Installs the `datasets` wheels from .whl/ (datasets, dill, multiprocess: the lent image lacks them), builds
# the CUDA extension, then runs the full step on 1 process (full and LoRA fine-tuning, batch 16 and 32, and
# the data loading measurement) and, with 2 or more GPUs, the same step on 2 processes (DDP through
# `accelerate launch`), so that the 2-GPU/1-GPU ratio comes from one call. JSON lines go to stdout and to
# $OUT/finetune.jsonl, logs to $OUT (default: benchmarks/results/device_finetune).
# Options (environment): BATCH="16 32", LORA="0 16", WORKERS="4 8 16", STEP_ARGS (more finetune.py options for
# both runs, e.g. "--compile --pin": the 2-GPU target is for the compiled step).
set -uo pipefail
OUT="${OUT:-benchmarks/results/device_finetune}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1 FIT3D_HF_NO_JIT=1
# NVLink multicast stays off (the lent machines' rule: it can take shared GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
BATCH="${BATCH:-16 32}" LORA="${LORA:-0 16}" WORKERS="${WORKERS:-4 8 16}" STEP_ARGS="${STEP_ARGS:-}"

if ! "$PY" -c "import datasets" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site \
        .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl \
        || { echo "could not install the datasets wheels from .whl/" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "cpus: $(nproc)"
  "$PY" -c "import torch, accelerate, peft, datasets as d; print('torch', torch.__version__, 'accelerate',
accelerate.__version__, 'peft', peft.__version__, 'datasets', d.__version__)"; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2

start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log" >&2; echo "BUILD FAILED" >&2; exit 1
fi
echo "== built in $(( $(date +%s) - start )) s" >&2

echo "== 1 process" >&2
# shellcheck disable=SC2086  # BATCH, LORA and WORKERS are lists of numbers
if ! "$PY" benchmarks/finetune.py --batch $BATCH --lora_rank $LORA --loader_workers $WORKERS $STEP_ARGS \
    2>"$OUT/one_process.log" | tee "$OUT/finetune.jsonl"; then
    tail -n 40 "$OUT/one_process.log" >&2; echo "1-PROCESS RUN FAILED" >&2; exit 1
fi

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    echo "== 2 processes (DDP)" >&2
    # shellcheck disable=SC2086
    if ! "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision bf16 --dynamo_backend no --main_process_port 29531 \
        benchmarks/finetune.py --batch $BATCH --lora_rank $LORA --loader_workers $STEP_ARGS \
        2>"$OUT/two_processes.log" | tee -a "$OUT/finetune.jsonl"; then
        tail -n 40 "$OUT/two_processes.log" >&2; echo "2-PROCESS RUN FAILED" >&2; exit 1
    fi
    # One line per (batch, lora rank): 2-process images/s over 1-process images/s of this call.
    "$PY" - "$OUT/finetune.jsonl" <<'PYTHON'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
steps = {(r["processes"], r["batch"], r["lora_rank"]): r["images_per_s"] for r in rows if r["benchmark"] == "finetune_step"}
for (processes, batch, lora_rank), two in sorted(steps.items()):
    one = steps.get((1, batch, lora_rank))
    if processes == 2 and one:
        print(json.dumps({"benchmark": "finetune_scaling", "batch": batch, "lora_rank": lora_rank,
                          "images_per_s_1": one, "images_per_s_2": two, "ratio": round(two / one, 3)}))
PYTHON
else
    echo "== $gpus GPU(s): no 2-process run" >&2
fi
echo "== done in $(( $(date +%s) - start )) s" >&2
