#!/usr/bin/env bash
# The teacher runs behind README's teacher table and the shipped corpus (#17), in order. Every step is
# teacher.py, which resumes: run this again after an interruption and it continues where it stopped.
# Needs the teachers: python experiments/fetch_teachers.py
#
#   nice -n 19 bash experiments/teacher_runs.sh     # ~4 h on a 2-core CPU, float32
set -euo pipefail
cd "$(dirname "$0")/.."
T=${SCOTD_TEACHERS:-$HOME/.cache/scotd/teachers}
VAL=data/csqa_palm_validation.jsonl.gz
for size in 0.5B 1.5B; do  # few-shot CoT accuracy on the first 200 validation questions
    python teacher.py --teacher "$T/Qwen2.5-Coder-$size-Instruct" --data $VAL --limit 200 --n 1 --temperature 0 \
        --batch-size 16 --stop newline --out experiments/teachers/qwen-$size-greedy.jsonl
done
for size in 0.5B 1.5B; do
    python teacher.py --teacher "$T/Qwen2.5-Coder-$size-Instruct" --data $VAL --limit 200 --n 10 --temperature 1.0 \
        --batch-size 8 --stop newline --out experiments/teachers/qwen-$size-n10.jsonl
done
# the corpus: 1,000 train questions x 10 rationales from the better teacher, each chain ended after its answer
# sentence (the runs above stop at a newline only: they were made before --stop answer existed).
# 32 questions a batch (320 running rows): a 1.5B decode step here costs ~0.45 s + 17 ms a row (measured,
# float32, 2 cores), and every batch pays the fixed part for as many steps as its longest chain, so a
# bigger batch spreads it over more chains (45 tok/s at 80 rows, 50 at 160).
python teacher.py --teacher "$T/Qwen2.5-Coder-1.5B-Instruct" --n 10 --temperature 1.0 --limit 1000 \
    --batch-size 32 --out data/csqa_qwen_train.jsonl
