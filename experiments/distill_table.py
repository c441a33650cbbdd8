"""The KD and on-policy table (#47, #48): each run of experiments/kd_runs.sh and onpolicy_runs.sh that has been
evaluated, its greedy and majority-of-N accuracy with 95 % intervals (from evaluate.py's summary), and each against
plain SCoTD (`sft`) on the same questions: the paired difference with its bootstrap interval, and McNemar's p.

    python experiments/distill_table.py             # reads runs/kd/<run>/eval/
    python experiments/distill_table.py --runs experiments/xtok    # #59: the default student across tokenizers
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

from stats import mcnemar, paired_bootstrap  # noqa: E402

RUNS = {"sft": "plain SCoTD (cross-entropy on the teacher's chains)", "kd0.5": "--kd 0.5 (top-20 KL beside it)",
        "kd1": "--kd 1 (the top-20 KL alone)",
        "op-sft": "SCoTD, then 30 on-policy steps, the chain's end token graded (the first version)",
        "onpolicy-sft": "SCoTD, then 30 on-policy steps (reverse KL)",
        "onpolicy-untuned": "30 on-policy steps from the untuned student",
        "onpolicy": "SCoTD, then 30 on-policy steps graded across tokenizers (JSD, beta 0.5; the teacher reads "
                    "the 4 worked examples it wrote its chains after)"}


def load(folder):
    """-> (summary, {question id: (greedy right, vote right)}) of a run's evaluation, or None."""
    summaries = sorted(folder.glob("eval/summary-*.json"))
    if not summaries:
        return None
    summary = json.loads(summaries[0].read_text())
    rows = [json.loads(line) for line in summaries[0].with_name(summaries[0].name.replace("summary-", "predictions-")
                                                                 .replace(".json", ".jsonl")).read_text().splitlines()]
    return summary, {r["id"]: (int(r["greedy_correct"]), int(r.get("vote_correct", 0))) for r in rows}


def cell(acc, ci):
    return f"{100 * acc:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def versus(a, b, k):
    ids = [i for i in a if i in b]
    xa, xb = [a[i][k] for i in ids], [b[i][k] for i in ids]
    diff, (low, high), _ = paired_bootstrap(xa, xb)
    return f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], McNemar {mcnemar(xa, xb):.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "runs" / "kd"), help="the runs' folder (default runs/kd)")
    args = p.parse_args()
    found = {name: r for name in RUNS if (r := load(Path(args.runs) / name))}
    print("| run | greedy | majority of N | greedy vs sft | majority vs sft |")
    print("| --- | --- | --- | --- | --- |")
    for name, (summary, per) in found.items():
        base = found.get("sft")
        voted = "vote_acc" in summary  # evaluate.py --n 0: greedy only
        vs = ("-", "-") if name == "sft" or not base else (versus(per, base[1], 0), versus(per, base[1], 1) if voted else "-")
        vote = f"{cell(summary['vote_acc'], summary['vote_acc_ci'])} (N = {summary['n']})" if voted else "- (greedy only)"
        print(f"| `{name}`: {RUNS[name]} | {cell(summary['greedy_acc'], summary['greedy_acc_ci'])} | {vote} | {vs[0]} | "
              f"{vs[1]} |")


if __name__ == "__main__":
    main()
