#!/usr/bin/env bash
# The GPU issue's runs in one device call, from the repository root. Stages (env STAGES, space-separated):
#   quick    QUICK_TESTS (CUDA test ids), to vet a kernel change first
#   tests    CUDA tests (rasterizer, feature loss, pipeline) and, where timm is installed, the timm parity tests
#            (TESTS_ONLY=1: TESTS alone)
#   raster   benchmarks/rasterizer.py against gsplat 1.5.3 (default chunk and one pass) when .whl/ holds its wheel
#   rastertrees  our benchmarks/rasterizer.py (or TREES_BENCH, e.g. "benchmarks/profile_rasterizer.py --host") in each
#            older snapshot in RASTER_TREES, then here (a drift bisected)
#   abba     A/B of each patch in ABBA_PATCH, its stages alternated between this tree and a patched copy (the copies
#            build in the background while this tree builds)
#   profile  per-kernel times, host time per call (benchmarks/profile_rasterizer.py)
#   finetune benchmarks/finetune.py (Stage II step, 1 process; needs the datasets wheels in .whl/)
#   lift     benchmarks/profile_lift.py at LIFT_N Gaussians (Stage I iteration time split)
#   liftfull benchmarks/lift.py, the whole Stage I of a 300-view scene from ~1M Gaussians (LIFT_COPIES)
#   liftgen  only that scene's generation (kept in /tmp while the machine is held: a later liftfull reuses it)
#   liftnode the same scene's copies (LIFT_NODE_SCENES, default one per GPU) lifted by training/lift_features.py on
#            every GPU at once (benchmarks/lift_node.py): the headline's Stage I rate, measured; LIFT_NODE_LAUNCHES=2:
#            two scenes per GPU at once, under CUDA MPS
#   targets  benchmarks/target_features.py: Stage I's scene-data phase split (readers, backbone by precision/batch)
#   adam     benchmarks/adam_bandwidth.py: Stage I's fused Adam step against a copy of as many bytes
#   decoder  benchmarks/decoder_conv.py: Stage I's decoder convolution alone, cuDNN's heuristics against its autotuner
#   ckpt     benchmarks/checkpoint_write.py: a Stage I checkpoint at LIFT_N Gaussians, synchronous and in the background
#   sharing  benchmarks/gpu_sharing.py: Stage I iterations per second with one and two scenes on the GPU at once, and
#            with one, two and three under CUDA MPS where its daemon starts
#   ncu      Nsight Compute reports of both blending kernels (benchmark scene; NCU_KERNEL, a regex, picks others, e.g.
#            NCU_KERNEL=project_bwd NCU_SKIP=2 NCU_COUNT=1, and then alone) and of the backward at Stage I's density,
#            read per source line (benchmarks/ncu_lines.py); ncu_lift: only the latter
# Options: RASTER_ARGS (default --quick), TESTS (test paths) and TESTS_TIMEOUT, FINETUNE_ARGS and FINETUNE_TIMEOUT,
# LIFT_N (default 1000000), LIFT_ARGS (more profile_lift.py options, e.g. --densification); AB_PATCH (patch files)
# and AB_STAGES: after the stages, apply each patch in turn (on top of the last; one whose quick tests fail is
# reverted, so give each one diff per file, e.g. `git diff branch~2 branch~1`: format-patches that create a file and
# then change it, concatenated, do not revert cleanly), rebuild and run AB_STAGES again, an A/B comparison on one
# machine (their quick stage runs AB_QUICK_TESTS where given; for patches whose gain is near the run-to-run
# spread, the abba stage alternates the two sides instead: ABBA_PATCH, ABBA_STAGES, ABBA_ROUNDS); FINAL_STAGES run
# last. Logs and JSON lines go to $LOGS; where the device tool sets $OUT (it returns at most 8 files), they come back
# as one $OUT/logs.tgz (Nsight reports left out).
set -uo pipefail
LOGS="${LOGS:-benchmarks/results/device_all}"
mkdir -p "$LOGS"
LOGS="$(cd "$LOGS" && pwd)"  # absolute: some stages run in other folders
OUT_DIR="${OUT:-}"
OUT="$LOGS"
# the logs come back even when the device tool's time limit ends the run
[ -n "$OUT_DIR" ] && trap 'tar czf "$OUT_DIR/logs.tgz" --exclude="*.ncu-rep" -C "$LOGS" .' EXIT
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export FIT3D_HF_NO_JIT=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
STAGES="${STAGES:-smoke tests timm raster profile finetune lift}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$OUT/setup.log" 2>&1 \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/setup.log"
ROOT="$PWD"
# The abba stage's copies of this tree, each with its patch applied and built, are made in the background while this
# tree builds (on a fresh machine each build takes 50-77 s, most of an A/B call's fixed cost); a copy's exit status
# lands in /tmp/abba/<patch>.status, its build log in $LOGS/setup_abba_<patch>.log.
abba_build() {
    local name; name=$(basename "$1" .patch)
    local copy="/tmp/abba/$name"
    rm -rf "$copy" "$copy.status" && mkdir -p "$copy"
    # without this tree's build: the copy's extensions come from its own sources only
    tar --exclude=./.whl --exclude=./.liftscene --exclude=./benchmarks/results --exclude=./build \
        --exclude='./fit3d_hf/_C*.so' -cf - . | tar -xf - -C "$copy"
    (cd "$copy" && patch -p1 <"$ROOT/$1" && "$PY" setup.py build_ext --inplace) >"$LOGS/setup_abba_$name.log" 2>&1
    echo $? >"$copy.status"
}
declare -A abba_started=()
if [[ " $STAGES " == *" abba "* ]]; then
    for patch in ${ABBA_PATCH:-}; do
        abba_build "$patch" &
        abba_started[$patch]=1
    done
fi
start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >>"$OUT/setup.log" 2>&1; then tail -n 60 "$OUT/setup.log"; echo BUILD FAILED; exit 1; fi
wait  # for the abba copies' builds too, so that no stage's timings share the CPUs with them
echo "== built in $(( $(date +%s) - start )) s"
# the test files a patch adds or changes (they join its quick tests)
patch_tests() { sed -n 's|^+++ b/\(tests/test_[^ \t]*\.py\).*|\1|p' "$1" | sort -u | tr '\n' ' '; }
run_stages() {
for stage in "$@"; do
    t0=$(date +%s)
    echo "== $stage"
    case "$stage" in
        smoke)
            # the extensions must link the shared libstdc++ (rasterizer_cuda/build.py says why)
            ldd fit3d_hf/_C.*.so fit3d_hf/_C_cpu.*.so | grep -E "^fit3d|libstdc" || echo "no shared libstdc++ linked"
            "$PY" -X faulthandler benchmarks/smoke_cuda.py 2>&1 | tail -n 25 ;;
        quick)
            # QUICK_TESTS (a few test files that vet a kernel change before the long stages; "failed" in quick.log),
            # then the test files the A/B's current patch adds or changes; files missing from the tree are left out
            # (a reverted patch's test file must not fail the next patch), and one failure does not hide the rest
            quick_tests=()
            # shellcheck disable=SC2086
            for t in ${QUICK_TESTS:-tests/test_render_cuda.py} ${PATCH_TESTS:-}; do
                [ -e "$t" ] && [[ " ${quick_tests[*]} " != *" $t "* ]] && quick_tests+=("$t")
            done
            timeout 300 "$PY" -m pytest -m cuda "${quick_tests[@]}" -q -p no:cacheprovider --maxfail=5 \
                2>&1 | tee "$OUT/quick.log" | tail -n 8 ;;
        tests)
            # shellcheck disable=SC2086
            timeout "${TESTS_TIMEOUT:-600}" "$PY" -m pytest -m cuda ${TESTS:-tests} -q -p no:cacheprovider -rf 2>&1 | tee "$OUT/tests.log" \
                | grep -v -E "^  File|^Extension modules" | tail -n 25
            [ -n "${TESTS_ONLY:-}" ] && continue
            "$PY" -m pytest tests/test_extension_runtime.py -q -p no:cacheprovider -rf 2>&1 | tee -a "$OUT/tests.log" \
                | grep -v -E "^  File|^Extension modules" | tail -n 25
            if "$PY" -c "import timm" 2>/dev/null && ls tests/test_timm*.py >/dev/null 2>&1; then
                "$PY" -m pytest tests/test_timm*.py -q -p no:cacheprovider 2>&1 | tee -a "$OUT/tests.log" | tail -n 6
            fi ;;
        timm)
            # the timm parity tests, optionally from a snapshot of another checkout (TIMM_TREE) carried along
            tree="${TIMM_TREE:-.}"
            (cd "$tree" && PYTHONPATH="$PWD:$PYTHONPATH" timeout 120 "$PY" -m pytest tests/test_timm_parity.py -q \
                -p no:cacheprovider -rf 2>&1 | tee -a "$OUT/tests.log" | tail -n 8) ;;
        raster)
            # gsplat JIT-compiles here: with the system g++ where there is one, since the image's CXX wrapper
            # links a static libstdc++ (session 5: gsplat's one-pass run at 385 channels ended the process without
            # a line, likely an error raised through that mix, as ours did)
            cxx="${CXX:-c++}"; [ -x /usr/bin/g++ ] && cxx=/usr/bin/g++
            # shellcheck disable=SC2086
            CXX="$cxx" "$PY" benchmarks/rasterizer.py ${RASTER_ARGS:---lib both --quick} 2>&1 | tee "$OUT/rasterizer.jsonl" | tail -n 14 ;;
        rastertrees)
            # our rasterizer's benchmark (RASTER_ARGS; or the script and options in TREES_BENCH) in each snapshot of
            # an older checkout in RASTER_TREES (plain files, e.g. `git archive <commit> | tar -x -C snap/<name>`),
            # each built here, then in this tree: a timing drift bisected on one machine; every JSON line gets the
            # tree's name, and every line goes to rastertrees.txt after a header naming the tree
            bench="${TREES_BENCH:-benchmarks/rasterizer.py ${RASTER_ARGS:---quick --channels 64}}"
            for tree in ${RASTER_TREES:-} .; do
                echo "== tree $tree: $bench" >>"$OUT/rastertrees.txt"
                # shellcheck disable=SC2086
                (cd "$tree" && "$PY" setup.py build_ext --inplace >>"$OUT/setup.log" 2>&1 \
                    && PYTHONPATH="$PWD:$PYTHONPATH" "$PY" $bench) \
                    2>&1 | sed "s|^{|{\"tree\": \"$tree\", |" | tee -a "$OUT/rastertrees.txt" | tail -n 10
            done
            grep "^{" "$OUT/rastertrees.txt" >"$OUT/rastertrees.jsonl" ;;
        abba)
            # each patch of ABBA_PATCH applied to a copy of this tree (built there); ABBA_STAGES (default "lift
            # raster") then run here and in the copy alternately, ABBA_ROUNDS times (default 2), each run's logs in
            # $OUT/abba/<patch>/<round><A|B>: an A/B whose two sides share the machine's drift (one run after the
            # other, sides have differed by 5% on one machine). The copy's quick tests (QUICK_TESTS) run first.
            for patch in ${ABBA_PATCH:-}; do
                name=$(basename "$patch" .patch); copy="/tmp/abba/$name"
                [ -n "${abba_started[$patch]:-}" ] || abba_build "$patch"  # abba named in FINAL_STAGES or AB_STAGES
                if [ "$(cat "$copy.status")" != 0 ]; then
                    tail -n 30 "$LOGS/setup_abba_$name.log"; echo "ABBA BUILD FAILED: $patch"; continue
                fi
                dir="$OUT/abba/$name"; mkdir -p "$dir/quick"
                (cd "$copy" && OUT="$dir/quick" PATCH_TESTS="$(patch_tests "$patch")" PYTHONPATH="$copy:$PYTHONPATH" run_stages quick)
                for round in $(seq "${ABBA_ROUNDS:-2}"); do
                    for side in A B; do
                        tree="$ROOT"; [ "$side" = B ] && tree="$copy"
                        mkdir -p "$dir/$round$side"; echo "== abba $name round $round side $side"
                        # shellcheck disable=SC2086
                        (cd "$tree" && OUT="$dir/$round$side" PYTHONPATH="$tree:$PYTHONPATH" run_stages ${ABBA_STAGES:-lift raster})
                    done
                done
            done ;;
        profile)
            "$PY" benchmarks/profile_rasterizer.py --n 1000000 --ch 64 >"$OUT/profile.txt" 2>&1
            head -n 30 "$OUT/profile.txt"; grep -E "^forward" "$OUT/profile.txt"
            "$PY" benchmarks/profile_rasterizer.py --host 2>&1 | tee "$OUT/host.txt" ;;
        finetune)
            # shellcheck disable=SC2086
            timeout "${FINETUNE_TIMEOUT:-600}" "$PY" benchmarks/finetune.py ${FINETUNE_ARGS:---batch 32 --loader_workers} 2>"$OUT/finetune.log" \
                | tee "$OUT/finetune.jsonl" || tail -n 30 "$OUT/finetune.log" ;;
        ncu|ncu_lift)
            if [ "$stage" = ncu ]; then
                # 64 channels render in one launch per direction: skip two calls' kernels, report the third's pair
                timeout 300 ncu --clock-control none -k "regex:${NCU_KERNEL:-rasterize_}" --launch-skip "${NCU_SKIP:-4}" \
                    --launch-count "${NCU_COUNT:-2}" --set full \
                    --import-source yes -o "$OUT/rasterize" "$PY" benchmarks/profile_rasterizer.py --plain 3 >"$OUT/ncu.log" 2>&1
                # (the file first: `tee | head` cut it where head stopped reading, losing the second kernel)
                "$PY" benchmarks/ncu_lines.py "$OUT/rasterize.ncu-rep" --top 80 >"$OUT/ncu_lines.txt" 2>&1
                head -n 60 "$OUT/ncu_lines.txt"
            fi
            # the backward at Stage I's density (opacity 0.1 at the start: long walks, every Gaussian composited)
            if [ "$stage" = ncu_lift ] || [ -z "${NCU_KERNEL:-}" ]; then
                timeout 300 ncu --clock-control none -k regex:rasterize_bwd --launch-skip 5 --launch-count 1 --set full \
                    --import-source yes -o "$OUT/lift_bwd" "$PY" benchmarks/profile_lift.py \
                    --gaussians "${LIFT_N:-1000000}" --steps 1 >"$OUT/ncu_lift.log" 2>&1
                "$PY" benchmarks/ncu_lines.py "$OUT/lift_bwd.ncu-rep" --top 80 >"$OUT/ncu_lift_lines.txt" 2>&1
                head -n 50 "$OUT/ncu_lift_lines.txt"
            fi ;;
        sharing)
            # gpu_sharing.py with the label $1 for each process count after it
            sharing_runs() {
                local label=$1 n; shift
                for n in "$@"; do
                    timeout 150 "$PY" benchmarks/gpu_sharing.py --processes "$n" --label "$label" 2>>"$OUT/sharing.log" \
                        | tee -a "$OUT/sharing.jsonl"
                done
            }
            sharing_runs "no MPS" 1 2
            if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d >>"$OUT/sharing.log" 2>&1; then
                sharing_runs MPS 1 2 3
                echo quit | nvidia-cuda-mps-control
            else
                echo "no MPS daemon" | tee -a "$OUT/sharing.log"
            fi ;;
        liftgen|liftfull)
            # the whole Stage I of one synthetic scene (benchmarks/lift.py: 300 views, 30k iterations) from ~1M
            # Gaussians (200k sparse points x LIFT_COPIES); generation ~3.5 min on 16 processes, training ~4.5 min:
            # a call of its own, on the machine a previous call built on. The scene stays in /tmp/fit3d-liftbench
            # while the machine is held: liftgen only writes it, so that a later liftfull only trains. LIFT_SCENE: a
            # scene generated elsewhere (benchmarks/lift.py --generate_only, one copy per point), carried along
            extra=""; [ "$stage" = liftgen ] && extra="--generate_only"
            [ -n "${LIFT_SCENE:-}" ] && extra="$extra --base_scene $LIFT_SCENE"
            timeout "${LIFT_TIMEOUT:-590}" "$PY" benchmarks/lift.py --views 300 --iterations 30000 --workers 16 \
                --points_per_sample "${LIFT_COPIES:-5}" --work_dir /tmp/fit3d-liftbench $extra \
                2>"$OUT/$stage.log" | tee "$OUT/$stage.jsonl" || tail -n 20 "$OUT/$stage.log" ;;
        liftnode)
            # LIFT_NODE_LAUNCHES=2: two launches at once, two scenes per GPU, under CUDA MPS (started here)
            mps=""
            if [ "${LIFT_NODE_LAUNCHES:-1}" -gt 1 ] && nvidia-cuda-mps-control -d >>"$OUT/liftnode.log" 2>&1; then mps=1; fi
            # shellcheck disable=SC2086  # the optional flags split into words
            timeout "${LIFT_TIMEOUT:-590}" "$PY" benchmarks/lift_node.py --views 300 --iterations 30000 --workers 16 \
                --points_per_sample "${LIFT_COPIES:-5}" --work_dir /tmp/fit3d-liftbench \
                ${LIFT_NODE_SCENES:+--scenes $LIFT_NODE_SCENES} ${LIFT_SCENE:+--base_scene $LIFT_SCENE} \
                ${LIFT_NODE_LAUNCHES:+--launches $LIFT_NODE_LAUNCHES} \
                2>>"$OUT/liftnode.log" | tee "$OUT/liftnode.jsonl" || tail -n 20 "$OUT/liftnode.log"
            if [ -n "$mps" ]; then echo quit | nvidia-cuda-mps-control; fi ;;
        targets)
            # the carried scene's images where there is one (LIFT_SCENE), else random ones
            timeout 240 "$PY" benchmarks/target_features.py ${LIFT_SCENE:+--scene "$LIFT_SCENE"} 2>"$OUT/targets.log" \
                | tee "$OUT/targets.jsonl" || tail -n 20 "$OUT/targets.log" ;;
        ckpt)
            "$PY" benchmarks/checkpoint_write.py --gaussians "${LIFT_N:-1000000}" --work_dir /tmp/fit3d-ckpt 2>&1 \
                | tee "$OUT/checkpoint_write.jsonl" ;;
        decoder)
            "$PY" benchmarks/decoder_conv.py 2>&1 | tee "$OUT/decoder.jsonl" ;;
        adam)
            "$PY" benchmarks/adam_bandwidth.py --gaussians "${LIFT_N:-1000000}" 2>&1 | tee "$OUT/adam.jsonl" ;;
        lift)
            # shellcheck disable=SC2086
            "$PY" benchmarks/profile_lift.py --gaussians "${LIFT_N:-1000000}" --steps 50 ${LIFT_ARGS:-} >"$OUT/lift_profile.txt" 2>&1
            head -n 45 "$OUT/lift_profile.txt"; grep "^densification event" "$OUT/lift_profile.txt"
            grep "^{" "$OUT/lift_profile.txt" | tee -a "$OUT/lift_profile.jsonl" ;;
    esac
    echo "== $stage took $(( $(date +%s) - t0 )) s"
done
}
# shellcheck disable=SC2086
run_stages $STAGES
# shellcheck disable=SC2086
for patch in ${AB_PATCH:-}; do
    echo "== applying $patch"
    # the test files it touches join its quick tests
    PATCH_TESTS=$(patch_tests "$patch")
    if patch -p1 <"$patch" >>"$LOGS/setup.log" 2>&1 && "$PY" setup.py build_ext --inplace >>"$LOGS/setup.log" 2>&1; then
        OUT="$LOGS/ab_$(basename "$patch" .patch)" && mkdir -p "$OUT"
        QUICK_TESTS="${AB_QUICK_TESTS:-${QUICK_TESTS:-}}"
        # shellcheck disable=SC2086
        run_stages ${AB_STAGES:-$STAGES}
        # a patch whose quick tests fail is taken back, so the next ones are measured without it
        if grep -q -E "[0-9]+ (failed|errors?)" "$OUT/quick.log" 2>/dev/null; then
            echo "== $patch failed its quick tests: reverted"
            patch -R -p1 <"$patch" >>"$LOGS/setup.log" 2>&1 && "$PY" setup.py build_ext --inplace >>"$LOGS/setup.log" 2>&1
        fi
    else
        tail -n 60 "$LOGS/setup.log"; echo "AB BUILD FAILED"; break
    fi
done
# shellcheck disable=SC2086
[ -n "${FINAL_STAGES:-}" ] && run_stages $FINAL_STAGES
echo "== done in $(( $(date +%s) - start )) s"
