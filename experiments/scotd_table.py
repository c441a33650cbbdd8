"""Reproduce the SCoTD comparisons with the real student on the bundled CSQA + PaLM corpus.

    python experiments/scotd_table.py                 # GPU: full budgets, all 1,221 validation questions
    python experiments/scotd_table.py --cpu-budget    # CPU: the default train.py budget, a validation subset

Trains, with identical budgets and seed: `label` (answer only), `cot` filter=correct, `cot` filter=all,
`post` (answer, then rationale); evaluates each greedily and the `cot` students with self-consistency
(N chains; accuracy at N = 5, 10, 20 read off one vote curve), plus the untuned student prompted
few-shot as a floor. Resumable: a finished run (its eval summary exists) is skipped, a started one
resumes from its `last` checkpoint. Writes experiments/results.md and experiments/vote-curves.png.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import default_student  # noqa: E402
from report import plot_lines  # noqa: E402

RUNS = {  # name: (mode, filter)
    "label": ("label", "correct"),
    "cot-correct": ("cot", "correct"),
    "cot-all": ("cot", "all"),
    "post": ("post", "correct"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--cpu-budget", action="store_true", help="train.py's CPU default budget and --limit questions")
    p.add_argument("--limit", type=int, default=None, help="validation questions (default: all; 100 with --cpu-budget)")
    p.add_argument("--n", type=int, default=20, help="chains for self-consistency")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--fewshot", type=int, default=3)
    args = p.parse_args()
    out = ROOT / args.out
    limit = args.limit if args.limit is not None else (100 if args.cpu_budget else 0)
    budget = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    if args.cpu_budget and not budget:
        budget = ["--max-steps", str(train.CPU_DEFAULT["max_steps"]), "--batch-size", str(train.CPU_DEFAULT["batch_size"])]
    commands = []

    def evaluate_once(name, checkpoint, extra):
        summary = out / name / "eval" / "summary-csqa_palm_validation.json"
        if not summary.exists():
            argv = ["--checkpoint", str(checkpoint), "--limit", str(limit), "--temperature", str(args.temperature),
                    "--seed", str(args.seed), "--out", str(summary.parent), *extra]
            commands.append("python evaluate.py " + " ".join(argv).replace(f"{ROOT}/", ""))
            evaluate.main(argv)
        return json.loads(summary.read_text())

    results, t0 = {}, time.time()
    fewshot = ["--mode", "cot", "--n", "0", "--fewshot", str(args.fewshot)]
    results[f"untuned, {args.fewshot}-shot CoT prompt (floor)"] = evaluate_once("untuned", default_student(), fewshot)
    for name, (mode, filt) in RUNS.items():
        run = out / name
        if not (run / "best" / "config.json").exists() or not (run / "loss.png").exists():
            argv = ["--mode", mode, "--filter", filt, "--out", str(run), "--seed", str(args.seed), *budget]
            if (run / "last" / "trainer_state.pt").exists():
                argv.append("--resume")
            elif run.exists():
                argv.append("--overwrite")  # a run that stopped before its first save
            commands.append("python train.py " + " ".join(argv).replace(f"{ROOT}/", ""))
            train.main(argv)
        results[name] = evaluate_once(name, run / "best", ["--n", str(args.n) if mode == "cot" else "0"])

    lines = [f"| student | greedy | SC N=5 | SC N=10 | SC N={args.n} |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        c = r["vote_curve"]
        at = lambda k: f"{c[k - 1]:.1%}" if len(c) >= k else "-"  # noqa: E731
        lines.append(f"| {name} | {r['greedy_acc']:.1%} | {at(5)} | {at(10)} | {at(args.n)} |")
    n_q = next(iter(results.values()))["questions"]
    table = "\n".join(lines)
    text = (f"CSQA validation, {n_q} questions; SmolLM2-135M-Instruct; T = {args.temperature}; seed {args.seed}; "
            f"wall time {(time.time() - t0) / 60:.0f} min this invocation\n\n{table}\n\ncommands:\n"
            + "\n".join(f"    {c}" for c in commands) + "\n")
    (ROOT / "experiments" / "results.md").write_text(text)
    curves = {name: (list(range(1, len(r["vote_curve"]) + 1)), r["vote_curve"])
              for name, r in results.items() if r["vote_curve"]}
    if curves:
        plot_lines(ROOT / "experiments" / "vote-curves.png", curves, "chains voted over (k)", "accuracy",
                   f"self-consistency, CSQA validation ({n_q} questions)")
    print(text)


if __name__ == "__main__":
    main()
