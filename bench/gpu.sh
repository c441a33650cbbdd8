#!/usr/bin/env bash
# Issue #32's GPU rows: training (SmolLM2-135M- and OPT-1.3b-shaped, batch 8 and token-filled, K = 30 shared-prefix
# rows with both tree kernels), sampling at N = 10 / 30, a Qwen2.5-1.5B-shaped teacher at N = 30, and the decode step
# at 256 / 32 rows (those closing #49 -- OPT-1.3b's MFU, the teacher, the decode step -- first), #45's Qwen3-0.6B-
# and Gemma-3-270M-shaped students (training and N = 10; --only families), #46's LoRA (r = 16) against every
# weight, ours vs peft (--only lora), and #48's on-policy step, scotd vs TRL's DistillationTrainer on a
# SmolLM2-135M / 1.7B-shaped pair (--only onpolicy: bench/onpolicy.py, ~6 min)
# -- scotd and transformers measured in the same run, random inits from bench/assets
# (python bench/bench.py --prepare-assets --teacher <the 1.5B teacher>, then carry it).
#     bash bench/gpu.sh [--quick] [--only GROUP] [--prewarm J] [--deadline S] [--row-timeout S] [--reuse bench/results/gpu.jsonl]
# writes $OUT/gpu.md (the table), $OUT/gpu.jsonl (each measurement as it ends), $OUT/gpu.log, $OUT/profiles.txt (what
# bounds each measurement: one more run of its work under torch.profiler, after its timing) and
# $OUT/inductor-cache.tgz -- five files, also when the call's timeout stops it (the device returns 8 at most).
# Each measurement is a fresh process that compiles its model (on an H100, 2026-11-27: ~100 s each, start-up
# included), so the whole suite takes more than one 10-minute call: --deadline starts no row after S seconds,
# --reuse takes the rows an earlier call measured on the same device, and the compile cache of one call,
# carried back as bench/assets/inductor-cache.tgz, spares the next call the compiles whose code is unchanged;
# --prewarm J compiles every row's warm-up J at a time first, so the timed rows (one at a time) start on a warm cache.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
PROFILES=$(mktemp -d)  # one file a measurement; bundled into $OUT/profiles.txt (the device returns 8 files at most)
export SCOTD_CACHE="${SCOTD_CACHE:-/tmp/scotd-cache}" TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}"
finish() {  # also when the call's timeout stops it: what was measured comes back
    if compgen -G "$PROFILES/*" >/dev/null; then tail -n +1 "$PROFILES"/* > "$OUT/profiles.txt"; fi
    cache_mb=$(du -sm "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null | cut -f1)
    if [ -n "$cache_mb" ] && [ "$cache_mb" -le 80 ]; then  # larger would not compress under 15 MB
        tar czf "$OUT/inductor-cache.tgz" -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null
    fi
    size=$(stat -c %s "$OUT/inductor-cache.tgz" 2>/dev/null || echo 0)
    if [ "$size" -gt 15000000 ]; then  # a file over 16 MiB does not come back from the device machine
        echo "inductor cache: $size bytes, too large to bring back; not kept" && rm -f "$OUT/inductor-cache.tgz"
    fi
}
trap finish EXIT
trap 'exit 143' TERM
if [ -f bench/assets/inductor-cache.tgz ]; then
    mkdir -p "$TORCHINDUCTOR_CACHE_DIR" && tar xzf bench/assets/inductor-cache.tgz -C "$TORCHINDUCTOR_CACHE_DIR"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.md"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)" | tee -a "$OUT/gpu.md"
if [[ " $* " == *" --only onpolicy "* ]]; then  # #48: one on-policy step, scotd vs TRL (carried: bench/assets/wheels)
    ls bench/assets/wheels/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps bench/assets/wheels/*.whl
    "$PY" bench/onpolicy.py --work /tmp/onpolicy-bench 2> >(tee "$OUT/onpolicy.log" >&2) | tee -a "$OUT/gpu.md"
else
    "$PY" bench/bench.py --suite gpu --results "$OUT/gpu.jsonl" --profile "$PROFILES" "$@" 2> >(tee "$OUT/gpu.log" >&2) | tee -a "$OUT/gpu.md"
fi
