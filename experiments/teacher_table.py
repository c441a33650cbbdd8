"""README's teacher table from the files experiments/teacher_runs.sh writes (and a student's evaluate.py
predictions on the same questions): accuracy with a 95 % interval (Wilson over questions; for one chain, a
bootstrap over questions), abstentions, throughput.

    python experiments/teacher_table.py [--student runs/cot/eval/predictions-csqa_palm_validation.jsonl]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))  # stats.py

import data  # noqa: E402
from stats import bootstrap_cell, wilson_cell  # noqa: E402
from scotd import majority_vote  # noqa: E402


def throughput(path):
    """Generated tokens/s over the invocations that recorded their time, and how many questions they did."""
    runs = data.run_totals(path)
    seconds, tokens = sum(r["seconds"] for r in runs), sum(r["generated_tokens"] for r in runs)
    return f"{tokens / seconds:,.0f} ({sum(r['questions'] for r in runs)} q)" if seconds else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(ROOT / "experiments" / "teachers"))
    p.add_argument("--student", default=None, help="evaluate.py predictions (greedy + chains) on the same questions")
    args = p.parse_args()
    print("| model (4-shot CoT prompt for the teachers) | questions | greedy | one chain, T = 1.0 | majority of 10, T = 1.0 "
          "| any of 10 right | chains with no answer | tokens/s (CPU) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in ("0.5B", "1.5B"):
        greedy_path = Path(args.folder) / f"qwen-{size}-greedy.jsonl"
        many_path = Path(args.folder) / f"qwen-{size}-n10.jsonl"
        greedy = data.read_finished(greedy_path)
        if not greedy:
            continue
        row = [f"Qwen2.5-Coder-{size}-Instruct (teacher)", f"{len(greedy)}",
               wilson_cell(sum(r["rationales"][0]["correct"] for r in greedy), len(greedy))]
        many = data.read_finished(many_path)
        if many:
            chains = [c for r in many for c in r["rationales"]]
            votes = [majority_vote([c["prediction"] for c in r["rationales"]]) for r in many]
            row += [bootstrap_cell([sum(c["correct"] for c in r["rationales"]) / len(r["rationales"]) for r in many]),
                    wilson_cell(sum(v == r["answer"] for v, r in zip(votes, many)), len(many)),
                    wilson_cell(sum(any(c["correct"] for c in r["rationales"]) for r in many), len(many)),
                    f"{100 * sum(c['prediction'] is None for c in chains) / len(chains):.1f} %",
                    f"{throughput(greedy_path)} greedy, {throughput(many_path)} sampling"]
            if len(many) != len(greedy):
                row[1] += f" ({len(many)} sampled so far)"
        else:
            row += ["-"] * 4 + [f"{throughput(greedy_path)} greedy"]
        print("| " + " | ".join(row) + " |")
    if args.student:
        rows = [json.loads(ln) for ln in Path(args.student).read_text().splitlines()]
        chains = [c for r in rows for c in r.get("chains", [])]
        right = [sum(c["answer"] == r["gold"] for c in r["chains"]) / len(r["chains"]) for r in rows]
        print(f"| student: SmolLM2-135M after `python train.py` (PaLM rationales), T = 0.7 | {len(rows)} | "
              f"{wilson_cell(sum(r['greedy_correct'] for r in rows), len(rows))} | {bootstrap_cell(right)} | "
              f"{wilson_cell(sum(r.get('vote_correct', False) for r in rows), len(rows))} | "
              f"{wilson_cell(sum(any(c['answer'] == r['gold'] for c in r['chains']) for r in rows), len(rows))} | "
              f"{100 * sum(c['answer'] is None for c in chains) / max(1, len(chains)):.1f} % | - |")


if __name__ == "__main__":
    main()
