#!/usr/bin/env bash
# The default student from the 1.5B teacher's distributions, across tokenizers (#59): SmolLM2-135M-Instruct (the
# README's student) distilled from Qwen2.5-Coder-1.5B-Instruct's chains and top-20, three arms on the same chains,
# steps and seed -- SCoTD alone, SCoTD + cross-tokenizer --kd 0.5, SCoTD then cross-tokenizer on-policy (--beta 0.5) --
# each evaluated on all 1,221 CSQA validation questions (greedy and majority of 10). Every step resumes: run it again
# after an interruption and it continues where it stopped. The scoring (~4 h on 2 cores) continues from what earlier
# sessions committed in experiments/xtok/, and is copied back there. Needs the teacher:
# python experiments/fetch_teachers.py --only 1.5b
#
#   nice -n 19 bash experiments/xtok_runs.sh      # outputs under runs/xtok/ (not committed)
#   SCORE_ONLY=1 nice -n 19 bash experiments/xtok_runs.sh   # the scoring alone
set -euo pipefail
cd "$(dirname "$0")/.."
T=${SCOTD_TEACHERS:-$HOME/.cache/scotd/teachers}/Qwen2.5-Coder-1.5B-Instruct
OUT=runs/xtok
mkdir -p $OUT
if [ ! -f $OUT/slice.jsonl ]; then  # the first 1,000 questions x their first 4 chains of the Qwen corpus
    python -c "import data; rs = data.read_corpus('data/csqa_qwen_train.jsonl')[:1000]
for r in rs: r['rationales'] = r['rationales'][:4]
data.write_corpus(rs, '$OUT/slice.jsonl')"
fi
if [ ! -f $OUT/slice.scored.jsonl ] && [ -f experiments/xtok/slice.scored.jsonl ]; then  # what earlier sessions scored
    cp experiments/xtok/slice.scored.jsonl* $OUT/
fi
python teacher.py --teacher "$T" --score $OUT/slice.jsonl --top-logprobs 20 --batch-size 2 --out $OUT/slice.scored.jsonl
cmp -s $OUT/slice.scored.jsonl experiments/xtok/slice.scored.jsonl || for f in "" .meta.json .runs.jsonl .topk; do
    cp $OUT/slice.scored.jsonl$f experiments/xtok/  # (the teacher's tokenizer beside the sidecar: from its folder)
done
[ -n "${SCORE_ONLY:-}" ] && exit 0

# Each arm's evaluation and training record are kept in experiments/xtok/<arm>/ (committed: a checkpoint is not); an
# arm found there is done. SCoTD first, then on-policy from it, then KD: a session that ends between arms keeps them.
BUDGET=(--max-steps 300 --batch-size 8 --eval-every 50 --seed 1337)
kept() { [ -f experiments/xtok/$1/eval/summary-csqa_palm_validation.json ]; }
train() {  # name, extra flags
    local name=$1; shift
    if [ ! -f $OUT/$name/.done ]; then
        local resume=(); [ -d $OUT/$name/last ] && resume=(--resume)
        python train.py --data $OUT/slice.scored.jsonl --out $OUT/$name "${BUDGET[@]}" "$@" "${resume[@]}"
        touch $OUT/$name/.done
    fi
}
evaluate() {  # all 1,221 validation questions: greedy and 10 chains at T = 0.7 (resumes)
    kept $1 && return
    python evaluate.py --checkpoint $OUT/$1/best --limit 0
    mkdir -p experiments/xtok/$1/eval  # the layout experiments/distill_table.py --runs experiments/xtok reads
    cp $OUT/$1/metrics.jsonl $OUT/$1/best/scotd.json experiments/xtok/$1/
    cp $OUT/$1/eval/*csqa_palm_validation* experiments/xtok/$1/eval/
}
(kept sft && kept onpolicy) || train sft
evaluate sft
if ! kept onpolicy && [ ! -f $OUT/onpolicy/.done ]; then  # SCoTD, then 30 on-policy steps graded by the teacher
    resume=(); [ -d $OUT/onpolicy/last ] && resume=(--resume)  # (JSD: another tokenizer), which reads the 4 worked
    python train.py --init $OUT/sft/best --data $OUT/slice.scored.jsonl --out $OUT/onpolicy --on-policy --teacher "$T" \
        --beta 0.5 --max-steps 30 --batch-size 8 --on-policy-n 4 --lr 5e-5 --eval-every 10 --seed 1337 \
        --teacher-shots 4 "${resume[@]}"  # examples it wrote its chains after (experiments/README.md)
    touch $OUT/onpolicy/.done
fi
evaluate onpolicy
kept kd0.5 || train kd0.5 --kd 0.5
evaluate kd0.5
