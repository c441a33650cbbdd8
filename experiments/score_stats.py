"""What the teacher's likelihood says about its own chains (issue #31's scoring pass): does a chain the teacher
finds likelier (mean log-probability a token, under its 4-shot prompt) more often reach the right answer?

    python experiments/score_stats.py [experiments/scores/csqa_qwen_train.scored.jsonl]

Prints the pass's size and cost (from the runs file beside it), the mean token log-probability of right and
wrong chains, and the within-question AUC: over the questions with both right and wrong chains, the chance that
a right chain outscores a wrong one of the same question (0.5: likelihood says nothing; ties count half), with
a 95 % bootstrap interval over questions. This is what `train.py --select likely` bets on.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))  # stats.py

import data  # noqa: E402
from stats import bootstrap_mean  # noqa: E402

SCORED = ROOT / "experiments" / "scores" / "csqa_qwen_train.scored.jsonl"


def token_logprob(chain):
    return chain["teacher_logprob"] / max(chain["teacher_tokens"], 1)


def within_question_auc(chains):
    """P(a right chain outscores a wrong one) among one question's chains; None without both kinds."""
    right = [token_logprob(c) for c in chains if c["correct"]]
    wrong = [token_logprob(c) for c in chains if not c["correct"]]
    if not right or not wrong:
        return None
    wins = sum(float(a > b) + 0.5 * float(a == b) for a in right for b in wrong)
    return wins / (len(right) * len(wrong))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scored", nargs="?", default=str(SCORED), help="a teacher.py --score output (default: %(default)s)")
    args = p.parse_args()
    records = data.read_corpus(args.scored)
    chains = [c for r in records for c in r["rationales"]]
    runs = data.run_totals(args.scored)
    seconds, tokens = sum(r["seconds"] for r in runs), sum(r.get("scored_tokens", 0) for r in runs)
    print(f"{len(records):,} questions, {len(chains):,} chains, {tokens:,} tokens scored in {seconds / 3600:.1f} h "
          f"over {len(runs)} runs")
    for name, keep in (("right", True), ("wrong", False)):
        scores = [token_logprob(c) for c in chains if c["correct"] == keep]
        print(f"{name} chains: {len(scores):,}, mean log-probability a token {np.mean(scores):.3f}")
    aucs = [a for a in (within_question_auc(r["rationales"]) for r in records) if a is not None]
    mean, (low, high) = bootstrap_mean(aucs)
    print(f"within-question AUC over {len(aucs):,} questions with right and wrong chains: {mean:.3f} "
          f"[{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
