#!/usr/bin/env bash
# SFT vs KD on the same questions (#47): Qwen2.5-Coder-1.5B-Instruct's chains and top-20 distributions,
# distilled into Qwen2.5-Coder-0.5B-Instruct (the one same-tokenizer pair here). A CPU slice: the first
# 300 questions of the shipped Qwen corpus, 4 chains each; 100 steps of 8. Every step resumes: run this
# again after an interruption and it continues where it stopped. Needs the teachers:
# python experiments/fetch_teachers.py
#
#   nice -n 19 bash experiments/kd_runs.sh       # outputs under runs/kd/ (not committed); ~3 h on 2 cores
#   FULL=1 bash experiments/kd_runs.sh           # the full size, for a GPU: all 1,000 questions x 10 chains, the
#                                                # device's default budget (3 epochs), all 1,221 validation questions
set -euo pipefail
cd "$(dirname "$0")/.."
T=${SCOTD_TEACHERS:-$HOME/.cache/scotd/teachers}
S="$T/Qwen2.5-Coder-0.5B-Instruct"
if [ -n "${FULL:-}" ]; then
    OUT=runs/kd-full QUESTIONS=1000 CHAINS=10 BUDGET=() LIMIT=0
else
    OUT=runs/kd QUESTIONS=300 CHAINS=4 BUDGET=(--max-steps 100 --batch-size 8) LIMIT=100
fi
mkdir -p $OUT
if [ ! -f $OUT/slice.jsonl ]; then  # the first QUESTIONS questions x their first CHAINS chains
    python -c "import data; rs = data.read_corpus('data/csqa_qwen_train.jsonl')[:$QUESTIONS]
for r in rs: r['rationales'] = r['rationales'][:$CHAINS]
data.write_corpus(rs, '$OUT/slice.jsonl')"
fi
# the teacher reads each chain as the student will train on it and keeps its top-20 at every target position
python teacher.py --teacher "$T/Qwen2.5-Coder-1.5B-Instruct" --score $OUT/slice.jsonl --top-logprobs 20 \
    --batch-size 2 --out $OUT/slice.scored.jsonl

train() {  # name, extra flags: the same student, questions (285; 15 held out as dev), steps and batches
    local name=$1; shift
    if [ ! -f $OUT/$name/.done ]; then
        local resume=(); [ -d $OUT/$name/last ] && resume=(--resume)
        python train.py --init "$S" --data $OUT/slice.scored.jsonl --out $OUT/$name "${BUDGET[@]}" \
            --eval-every 25 "$@" "${resume[@]}"
        touch $OUT/$name/.done
    fi
}
evaluate() {  # the first LIMIT validation questions (0: all): greedy and 10 chains at T = 0.7 (resumes)
    [ -f $OUT/$1/eval/summary-csqa_palm_validation.json ] || python evaluate.py --checkpoint $OUT/$1/best --limit $LIMIT
}
train sft
train kd0.5 --kd 0.5
evaluate sft
evaluate kd0.5
train kd1 --kd 1   # a sweep point: the distributions alone
evaluate kd1
