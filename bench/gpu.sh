#!/usr/bin/env bash
# Issue #32's GPU rows in one call (meant to fit one 10-minute call on one H100; not yet timed on a GPU): training (SmolLM2-135M- and OPT-1.3b-shaped, batch 8
# and token-filled, K = 30 shared-prefix rows with both tree kernels), sampling at N = 10 / 30, a Qwen2.5-1.5B-shaped
# teacher at N = 30, and the decode step at 32 / 256 rows -- scotd and transformers measured in the same run, random
# inits from bench/assets (python bench/bench.py --prepare-assets --teacher <the 1.5B teacher>, then carry it).
#     bash bench/gpu.sh [--quick] [--only train|k30|sample|teacher|decode]   # writes $OUT/gpu.md (the table), $OUT/gpu.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
export SCOTD_CACHE="${SCOTD_CACHE:-/tmp/scotd-cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.md"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)" | tee -a "$OUT/gpu.md"
"$PY" bench/bench.py --suite gpu --results "$OUT/gpu.jsonl" "$@" 2> >(tee "$OUT/gpu.log" >&2) | tee -a "$OUT/gpu.md"
