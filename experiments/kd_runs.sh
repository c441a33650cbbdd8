#!/usr/bin/env bash
# SFT vs KD on the same questions (#47): Qwen2.5-Coder-1.5B-Instruct's chains and top-20 distributions,
# distilled into Qwen2.5-Coder-0.5B-Instruct (the one same-tokenizer pair here). A CPU slice: the first
# 300 questions of the shipped Qwen corpus, 4 chains each. Every step resumes: run this again after an
# interruption and it continues where it stopped. Needs the teachers: python experiments/fetch_teachers.py
#
#   nice -n 19 bash experiments/kd_runs.sh       # outputs under runs/kd/ (not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${SCOTD_TEACHERS:-$HOME/.cache/scotd/teachers}
OUT=runs/kd
mkdir -p $OUT
if [ ! -f $OUT/slice.jsonl ]; then  # 300 questions x their first 4 chains
    python -c "import data; rs = data.read_corpus('data/csqa_qwen_train.jsonl')[:300]
for r in rs: r['rationales'] = r['rationales'][:4]
data.write_corpus(rs, '$OUT/slice.jsonl')"
fi
# the teacher reads each chain as the student will train on it and keeps its top-20 at every target position
python teacher.py --teacher "$T/Qwen2.5-Coder-1.5B-Instruct" --score $OUT/slice.jsonl --top-logprobs 20 \
    --batch-size 2 --out $OUT/slice.scored.jsonl
