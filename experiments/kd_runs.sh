#!/usr/bin/env bash
# SFT vs KD on the same questions (#47): Qwen2.5-Coder-1.5B-Instruct's chains and top-20 distributions,
# distilled into Qwen2.5-Coder-0.5B-Instruct (the one same-tokenizer pair here). A CPU slice: the first
# 300 questions of the shipped Qwen corpus, 4 chains each; 100 steps of 8. Every step resumes: run this
# again after an interruption and it continues where it stopped. Needs the teachers:
# python experiments/fetch_teachers.py
#
#   nice -n 19 bash experiments/kd_runs.sh       # outputs under runs/kd/ (not committed); ~6 h on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
T=${SCOTD_TEACHERS:-$HOME/.cache/scotd/teachers}
OUT=runs/kd
S="$T/Qwen2.5-Coder-0.5B-Instruct"
mkdir -p $OUT
if [ ! -f $OUT/slice.jsonl ]; then  # 300 questions x their first 4 chains
    python -c "import data; rs = data.read_corpus('data/csqa_qwen_train.jsonl')[:300]
for r in rs: r['rationales'] = r['rationales'][:4]
data.write_corpus(rs, '$OUT/slice.jsonl')"
fi
# the teacher reads each chain as the student will train on it and keeps its top-20 at every target position
python teacher.py --teacher "$T/Qwen2.5-Coder-1.5B-Instruct" --score $OUT/slice.jsonl --top-logprobs 20 \
    --batch-size 2 --out $OUT/slice.scored.jsonl

train() {  # name, extra flags: the same student, questions (285; 15 held out as dev), steps and batches
    local name=$1; shift
    if [ ! -f $OUT/$name/.done ]; then
        local resume=(); [ -d $OUT/$name/last ] && resume=(--resume)
        python train.py --init "$S" --data $OUT/slice.scored.jsonl --out $OUT/$name --max-steps 100 --batch-size 8 \
            --eval-every 25 "$@" "${resume[@]}"
        touch $OUT/$name/.done
    fi
}
evaluate() {  # the first 100 validation questions: greedy and 10 chains at T = 0.7 (resumes its predictions)
    [ -f $OUT/$1/eval/summary-csqa_palm_validation.json ] || python evaluate.py --checkpoint $OUT/$1/best --limit 100
}
train sft
train kd0.5 --kd 0.5
evaluate sft
evaluate kd0.5
train kd1 --kd 1   # a sweep point: the distributions alone
evaluate kd1
