#!/usr/bin/env bash
# The ONE prepared GPU run of the step benchmark (issue 7): every variant at the Qwen2.5-1.5B shape on one H200,
# JSON lines under $OUT, a table printed last. Each measurement runs in its own child process (--isolate), so an
# out-of-memory or a crash in one variant leaves the others measured.
#
# Prepare here (once per session; .whl/ is git-ignored and travels with `carry`):
#   bash ../shared/device/make_wheels.sh            # deepspeed (no prebuilt ops), pydantic, hjson, webdataset, ...
# Then, with the device tool:
#   run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=480)
# Check it on a CPU first (costs no device time):
#   bash bench/device_run.sh --dry-run                      # plans every h200 invocation (configs, shapes, FLOPs)
#   ETT_BENCH_PRESET=cpu-tiny bash bench/device_run.sh      # runs the whole script with the tiny model
#
# Phases, each started only while the time budget allows (ETT_BENCH_BUDGET_S, default 360 s of this script):
#   A  mb8    matmul ceiling, loader, plain-PyTorch reference, engine ett, align, frozen   -> ratio (target >= 0.90)
#   B  mb16   reference and ett at micro-batch 16                                          -> engine MFU (target >= 45%)
#   M  memory plan: bench/memory_plan.py's estimate vs torch.cuda.max_memory_allocated of the A/B engine rows
#   C  levers ett with one setting changed each (and the reference where the change applies to it too):
#      nockpt (no activation checkpointing), nockpt16, zero2, bucket5e8, persist1e5 (DeepSpeed's default),
#      foreach (AdamW without fused), rb4 (IBQ's 4 res blocks), qchunk512 (quantizer chunks of 512 tokens instead of
#      the automatic 128); a lever's ratio line uses the mb8 reference
# Environment: ETT_BENCH_PRESET (h200-1.5b), ETT_BENCH_BUDGET_S (360), ETT_BENCH_STEPS / ETT_BENCH_WARMUP (preset's),
# ETT_BENCH_LEVERS (1: run phase C), ETT_BENCH_SKIP_WHEELS (1: do not install .whl/*.whl), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PRESET=${ETT_BENCH_PRESET:-h200-1.5b}
BUDGET=${ETT_BENCH_BUDGET_S:-360}
LEVERS=${ETT_BENCH_LEVERS:-1}
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/ett_bench_out.XXXXXX")
    echo "[device_run] OUT is not set; writing to $OUT"
fi
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/log.txt"
SECONDS=0

say() { echo "[device_run $(printf '%4d' "$SECONDS")s] $*" | tee -a "$LOG"; }

# -- environment: carried wheels into /tmp/site (the device has no package index) -----------------------------------
if [ "$DRY" = 0 ] && [ "${ETT_BENCH_SKIP_WHEELS:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tail -3 | tee -a "$LOG" || say "wheel install failed: the engine variants will report the error"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# DeepSpeed's JIT ops cannot parse Hopper's '9.0a'; the bench needs none, but never let one build for a wrong target.
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
if [ -z "${ETT_BENCH_FONTS:-}" ] && ls .whl/*.ttf >/dev/null 2>&1; then
    ETT_BENCH_FONTS=$(ls .whl/*.ttf | tr '\n' ':')
    export ETT_BENCH_FONTS=${ETT_BENCH_FONTS%:}
fi
if [ "$PRESET" = cpu-tiny ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

{
    echo "preset $PRESET budget ${BUDGET}s levers $LEVERS dry-run $DRY"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv,noheader 2>&1
    "$PY" - <<'PYINFO' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "deepspeed", "transformers", "sentencepiece", "braceexpand", "PIL"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING:", type(e).__name__, e)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYINFO
} | tee "$OUT/env.txt" | tee -a "$LOG"

STEPS_ARGS=()
[ -n "${ETT_BENCH_STEPS:-}" ] && STEPS_ARGS+=(--steps "$ETT_BENCH_STEPS")
[ -n "${ETT_BENCH_WARMUP:-}" ] && STEPS_ARGS+=(--warmup "$ETT_BENCH_WARMUP")

# bench TAG MIN_SECONDS_LEFT ARGS...: one step_bench invocation, if at least MIN_SECONDS_LEFT of the budget remain.
bench() {
    local tag=$1 need=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$DRY" = 1 ]; then
        say "plan $tag: step_bench.py --preset $PRESET $*"
        "$PY" bench/step_bench.py --preset "$PRESET" --plan --tag "$tag" "$@" 2>>"$LOG" | tee -a "$OUT/plan.jsonl" \
            | cut -c1-200
        [ "${PIPESTATUS[0]}" = 0 ] || { say "PLAN FAILED for $tag"; PLAN_FAILED=1; }
        return 0
    fi
    if [ "$left" -lt "$need" ]; then
        say "skip $tag: ${left}s of the budget left, it needs about ${need}s"
        echo "{\"variant\": \"skipped\", \"tag\": \"$tag\", \"reason\": \"budget: ${left}s left\"}" >> "$RESULTS"
        return 0
    fi
    say "run $tag ($left s left): $*"
    "$PY" bench/step_bench.py --preset "$PRESET" --isolate --deadline "$left" --variant-timeout "$(( left < 200 ? left : 200 ))" \
        --tag "$tag" --out "$OUT" "${STEPS_ARGS[@]}" "$@" 2>>"$LOG" | cut -c1-240
    say "done $tag (exit ${PIPESTATUS[0]})"
}

PLAN_FAILED=0
# A: every variant at micro-batch 8 (the issue's setting); gives the ceiling the later phases reuse.
bench mb8 60 --variants matmul,loader,reference,ett,align,frozen
# B: micro-batch 16, where the MFU target is set.
bench mb16 90 --micro-batch 16 --variants reference,ett --ceiling-from "$RESULTS"
# M: the memory plan (issue 12) against torch.cuda.max_memory_allocated of the engine rows of A and B: activations
# measured on a CPU beforehand (bench/memory_plan_h200-1.5b.json, from `python bench/memory_plan.py --preset
# h200-1.5b --save ...`), model states from the meta-device model; one estimate_over_measured line per engine row.
memory_check() {
    local saved=bench/memory_plan_${PRESET}.json
    if [ ! -f "$saved" ]; then say "memory plan: no $saved (make it on a CPU with --save)"; return 0; fi
    if [ "$DRY" = 1 ]; then
        say "plan memory check: memory_plan.py --preset $PRESET --measured $saved --compare RESULTS"
        "$PY" bench/memory_plan.py --preset "$PRESET" --measured "$saved" --gpus 1 --gpu-gb 141 --json 2>>"$LOG" \
            | tail -1 | cut -c1-200
        [ "${PIPESTATUS[0]}" = 0 ] || { say "PLAN FAILED for the memory check"; PLAN_FAILED=1; }
        return 0
    fi
    say "memory plan vs cuda max_memory_allocated"
    "$PY" bench/memory_plan.py --preset "$PRESET" --measured "$saved" --compare "$RESULTS" 2>>"$LOG" \
        | grep '"memory_plan_check"' | tee -a "$RESULTS" | tee -a "$LOG"
}
memory_check
# C: levers, one setting at a time, most informative first (engine only unless the change applies to both).
if [ "$LEVERS" = 1 ]; then
    bench nockpt 90 --variants reference,ett --ceiling-from "$RESULTS" model.llm.gradient_checkpointing=false
    # 6N-MFU of 45% at micro-batch 16 is above what plain PyTorch reached there WITH checkpointing (0.494 s = 41%):
    bench nockpt16 60 --micro-batch 16 --variants ett --ceiling-from "$RESULTS" model.llm.gradient_checkpointing=false
    bench zero2 50 --variants ett --ceiling-from "$RESULTS" engine.ds_config=zero2
    bench bucket5e8 50 --variants ett --ceiling-from "$RESULTS" engine.bucket_size=500000000
    bench persist1e5 50 --variants ett --ceiling-from "$RESULTS" engine.persistence_threshold=100000
    bench foreach 50 --variants ett --ceiling-from "$RESULTS" engine.fused_optimizer=false
    bench rb4 90 --variants reference,ett --ceiling-from "$RESULTS" model.tokenizer.num_res_blocks=4
    # issue 12: the chunked quantizer's default chunk (128 tokens at K = 131,072) against 4x larger chunks
    bench qchunk512 50 --variants ett --ceiling-from "$RESULTS" model.tokenizer.quantizer_chunk_tokens=512
fi

if [ "$DRY" = 1 ]; then
    say "dry run finished: $( [ "$PLAN_FAILED" = 0 ] && echo 'every invocation planned' || echo 'SOME PLANS FAILED')"
    exit "$PLAN_FAILED"
fi
if grep -q '"error"' "$RESULTS" 2>/dev/null; then
    echo "--- errors (full log in $LOG) ---"
    grep -n -B2 -A12 'Traceback' "$LOG" | tail -40
fi
"$PY" bench/step_bench.py --summarize "$RESULTS" | tee "$OUT/summary.txt"
say "finished in ${SECONDS}s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
