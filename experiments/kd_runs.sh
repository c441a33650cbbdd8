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
# the same student, questions, steps and batches: plain SCoTD, then --kd 0.5 and --kd 1 (a sweep point). 285
# training questions (15 held out as dev), ~2 right chains each; 150 steps of 8, dev every 50.
S="$T/Qwen2.5-Coder-0.5B-Instruct"
for run in sft kd0.5 kd1; do
    case $run in sft) kd=();; kd0.5) kd=(--kd 0.5);; kd1) kd=(--kd 1);; esac
    if [ ! -f $OUT/$run/.done ]; then
        resume=(); [ -d $OUT/$run/last ] && resume=(--resume)
        python train.py --init "$S" --data $OUT/slice.scored.jsonl --out $OUT/$run --max-steps 150 --batch-size 8 \
            --eval-every 50 "${kd[@]}" "${resume[@]}"
        touch $OUT/$run/.done
    fi
done
# the first 200 validation questions: greedy and 10 chains at T = 0.7 (evaluate.py resumes its predictions)
for run in sft kd0.5 kd1; do
    python evaluate.py --checkpoint $OUT/$run/best --limit 200
done
