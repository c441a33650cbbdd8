#!/usr/bin/env bash
# SCoTD alone vs SCoTD + on-policy distillation vs on-policy from the untuned student (#48), on the questions of
# experiments/kd_runs.sh (run it first: its `sft` run is SCoTD alone and the warm start): the student
# (Qwen2.5-Coder-0.5B-Instruct) samples 4 chains for each of 2 questions a step, the teacher
# (Qwen2.5-Coder-1.5B-Instruct) grades every token (reverse KL over the vocabulary); 30 steps. Resumable.
#
#   nice -n 19 bash experiments/onpolicy_runs.sh  # outputs under runs/kd/ (not committed); ~2 h on 2 cores
#   FULL=1 bash experiments/onpolicy_runs.sh      # the full size, for a GPU, after FULL=1 kd_runs.sh: 200 steps of
#                                                 # 8 questions x 4 chains, all 1,221 validation questions
set -euo pipefail
cd "$(dirname "$0")/.."
T=${SCOTD_TEACHERS:-$HOME/.cache/scotd/teachers}
if [ -n "${FULL:-}" ]; then
    OUT=runs/kd-full BUDGET=(--max-steps 200 --batch-size 32 --eval-every 50) LIMIT=0
else
    OUT=runs/kd BUDGET=(--max-steps 30 --batch-size 8 --eval-every 10) LIMIT=100
fi
on_policy() {  # name, the student to start from
    local name=$1 init=$2
    if [ ! -f $OUT/$name/.done ]; then
        local resume=(); [ -d $OUT/$name/last ] && resume=(--resume)
        python train.py --init "$init" --data $OUT/slice.scored.jsonl --out $OUT/$name --on-policy \
            --teacher "$T/Qwen2.5-Coder-1.5B-Instruct" --on-policy-n 4 "${BUDGET[@]}" --lr 5e-5 --teacher-shots 0 \
            "${resume[@]}"  # (recorded before the default became 4: these runs read no worked examples)
        touch $OUT/$name/.done
    fi
}
evaluate() {  # the first LIMIT validation questions (0: all): greedy and 10 chains at T = 0.7 (resumes)
    [ -f $OUT/$1/eval/summary-csqa_palm_validation.json ] || python evaluate.py --checkpoint $OUT/$1/best --limit $LIMIT
}
on_policy onpolicy-sft $OUT/sft/best
evaluate onpolicy-sft
on_policy onpolicy-untuned "$T/Qwen2.5-Coder-0.5B-Instruct"
evaluate onpolicy-untuned
