"""Socratic CoT (Shridhar et al. 2022) on GSM8K, measured: one command, resumable, every cell with a 95 % interval.

    nice python experiments/socratic_table.py              # all of it (many CPU hours); run again to continue
    python experiments/socratic_table.py --report-only     # rewrite socratic-results.md and the results page's table

1. Sub-questions: the teacher (Qwen2.5-Coder-1.5B, `teacher.py --socratic`: one question a gold step, greedy)
   for the first --problems GSM8K *train* problems after the prompt's four. Problems with a question for
   every step are kept, and every student below trains on exactly those problems (5 %, at most 200, held out by
   train.py for its dev loss: data.dev_split), so the rows differ in the target only.
2. Students (SmolLM2-135M-Instruct, seed 1337, --epochs passes over those problems, batch 8, --max-len 512):
   `cot`        the human solution, then the answer (the Socratic paper's CoT baseline, on the same problems);
   `unified`    one model writes "sub-question ** step" lines, then the answer;
   `two-model`  a decomposer (--mode decompose) asks, a solver (--mode solve) answers, turn by turn;
   `untuned`    the untuned student, 3 worked train solutions in the prompt (the floor).
3. Evaluation on GSM8K test (never seen in training or prompts): greedy on all 1,319, self-consistency on
   the first --sc-limit (N = --n chains at T = 0.7), on the final weights (`last`: nothing chosen on test).
Claims are tested as in scotd_table.py: paired bootstrap over the problems, "reproduced" when the 95 %
interval of A - B lies above 0, "not reproduced" when it lies below the 2-point margin, else "inconclusive
at this size". Writes experiments/socratic-results.md and the table between experiments/README.md's markers.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import fileio  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import teacher  # noqa: E402
import train  # noqa: E402
from checkpoint import default_student  # noqa: E402
from scotd_table import (MARGIN, StepLog, acc_cell, chain_cells, claim_cells, has_checkpoint, predictions,  # noqa: E402
                         record_training, run_step, skip_line, summary, trained, write_between)

TEST = data.GSM8K_TEST
CORPUS = ROOT / "data" / "gsm8k_socratic_train.jsonl"
QWEN = Path.home() / ".cache" / "scotd" / "teachers" / "Qwen2.5-Coder-1.5B-Instruct"
README_BEGIN, README_END = "<!-- socratic_table: begin (written by experiments/socratic_table.py) -->", "<!-- socratic_table: end -->"


@dataclass
class Student:
    name: str
    what: str
    train: list = None       # train.py flags; None: the untuned student
    corpus: str = "socratic"  # which of the two same-problem corpora it trains on: "socratic" or "cot"
    decomposer: str = None   # evaluated with this student as its decomposer (two models)
    evaluated: bool = True
    evaluate: list = field(default_factory=list)


STUDENTS = [
    Student("cot", "CoT: the human solution, then the answer", ["--mode", "cot"], "cot"),
    Student("unified", "Socratic, one model: sub-question ** step lines", ["--mode", "cot"]),
    Student("decompose", "(the two-model variant's decomposer)", ["--mode", "decompose"], evaluated=False),
    Student("two-model", "Socratic, two models: decomposer asks, solver answers", ["--mode", "solve"], decomposer="decompose"),
    Student("untuned", "untuned, worked train solutions in the prompt", None, evaluate=["--mode", "cot"]),
]

CLAIMS = [  # (claim, A, B, kind): "name@sc" is the majority of the chains
    ("CoT distillation beats the untuned student prompted with worked solutions", "cot", "untuned", "beats"),
    ("Socratic two-model beats CoT distillation on the same problems", "two-model", "cot", "beats"),
    ("Socratic unified beats CoT distillation on the same problems", "unified", "cot", "beats"),
    ("two models vs one unified model (no claim)", "two-model", "unified", "report"),
    ("self-consistency beats greedy decoding (CoT)", "cot@sc", "cot", "beats"),
    ("self-consistency beats greedy decoding (Socratic unified)", "unified@sc", "unified", "beats"),
    ("self-consistency beats greedy decoding (Socratic two-model)", "two-model@sc", "two-model", "beats"),
]


def same_problem_corpora(corpus, out):
    """The teacher's records with a Socratic rationale -> two corpora of exactly those problems, in the same
    order: the Socratic chains, and the GSM8K human solutions. -> (socratic path, cot path, kept, rejected)."""
    records = data.read_finished(corpus)
    kept = [r for r in records if r["rationales"]]
    gold = {r["id"]: r for r in data.read_corpus(data.GSM8K_TRAIN)}
    paths = out / "socratic-corpus.jsonl", out / "cot-corpus.jsonl"
    data.write_corpus(kept, paths[0])
    data.write_corpus([gold[r["id"]] for r in kept], paths[1])
    return *paths, len(kept), len(records) - len(kept)


def evaluations(s, args):
    """(step, evaluate.py flags) of student s's evaluations: greedy, and self-consistency for trained students."""
    if not s.evaluated:
        return []
    steps = [("greedy", ["--n", "0", "--limit", str(args.greedy_limit), "--batch-size", str(args.greedy_batch)])]
    if s.train is not None:
        steps.append(("sc", ["--n", str(args.n), "--temperature", "0.7", "--limit", str(args.sc_limit), "--no-greedy",
                             "--batch-size", str(args.sc_batch)]))
    return steps


def run(args):
    """Every step not yet done, in order; returns {student: why it waits}. Checkpoints go to --out, the rest
    (steps, metrics, evaluations) to --record, which is committed: a fresh clone goes on from it, training
    again (the same seed: the same weights) a student whose checkpoint it still needs."""
    out, record, waits = Path(args.out), Path(args.record), {}
    have = len(data.read_finished(args.corpus)) if Path(args.corpus).exists() else 0
    if have < args.problems:
        if not (Path(args.teacher) / "config.json").exists():
            return {s.name: f"waits for the sub-questions ({have:,} of {args.problems:,} problems in {args.corpus}; "
                            "teacher absent: python experiments/fetch_teachers.py)" for s in STUDENTS}
        run_step(record / "teacher", "sub-questions", "teacher.py", teacher.main,
                 ["--socratic", "--teacher", str(args.teacher), "--limit", str(args.problems), "--batch-size",
                  str(args.teacher_batch), "--out", str(args.corpus)])
    paths = dict(zip(("socratic", "cot"), same_problem_corpora(args.corpus, out)))
    pending = {s.name: [e for e in evaluations(s, args) if not summary(record / s.name / e[0], TEST).exists()]
               for s in STUDENTS}
    needed = {name for s in STUDENTS if pending[s.name] for name in (s.name, s.decomposer) if name}  # checkpoints still read
    for s in STUDENTS:
        folder, rec = out / s.name, record / s.name
        if s.train is not None and (trained(rec) is None or s.name in needed and not has_checkpoint(folder, rec)):
            argv = [*s.train, "--data", str(paths[s.corpus]), "--epochs", str(args.epochs), "--out", str(folder),
                    "--seed", str(args.seed), "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
                    "--eval-every", "0", "--save-every", str(args.save_every)]
            argv += ["--init", str(args.init)] if args.init else []
            argv.append("--resume" if (folder / "last" / train.STATE_FILE).exists() else "--overwrite")
            run_step(rec, "train", "train.py", train.main, argv)
            record_training(folder, rec)
        if s.decomposer and trained(record / s.decomposer) is None:
            waits[s.name] = f"waits for {s.decomposer}"
            continue
        checkpoint = folder / "last" if s.train is not None else Path(args.init) if args.init else default_student()
        common = ["--checkpoint", str(checkpoint), "--data", str(TEST), "--seed", str(args.seed),
                  "--max-new-tokens", str(args.max_new_tokens), *s.evaluate]
        common += ["--decomposer", str(out / s.decomposer / "last")] if s.decomposer else []
        common += ["--fewshot", str(args.fewshot)] if s.train is None else []
        for step, flags in pending[s.name]:
            run_step(rec, step, "evaluate.py", evaluate.main, [*common, *flags, "--out", str(rec / step)])
    return waits


def outcomes(out):
    """{system: {problem id: right?}}, "@sc" the vote and "@chain" the mean of single chains."""
    systems = {}
    for s in STUDENTS:
        folder = out / s.name
        if summary(folder / "greedy", TEST).exists():
            systems[s.name] = {r["id"]: r["greedy_correct"] for r in predictions(folder / "greedy", TEST)}
        if summary(folder / "sc", TEST).exists():
            rows = predictions(folder / "sc", TEST)
            systems[f"{s.name}@sc"] = {r["id"]: r["vote_correct"] for r in rows}
            systems[f"{s.name}@chain"] = {r["id"]: sum(c["answer"] == r["gold"] for c in r["chains"]) / len(r["chains"])
                                          for r in rows}
    return systems


def report(args, waits, wall0):
    out = Path(args.record)
    systems = outcomes(out)
    kept = rejected = 0
    if Path(args.corpus).exists():
        records = data.read_finished(args.corpus)
        kept = sum(bool(r["rationales"]) for r in records)
        rejected = len(records) - kept
    rows = [f"| student | steps x {args.batch_size} | greedy, test [95 % CI] (problems) | one chain | majority of {args.n} | "
            "wall time (min) | evaluated on |", "| --- | --- | --- | --- | --- | --- | --- |"]
    commands, total = [], 0.0
    for step in StepLog(out / "teacher" / "steps.json", None, None).read().values():
        commands.append(step["command"])
        total += step["seconds"]
    for s in STUDENTS:
        folder = out / s.name
        steps_run = StepLog(folder / "steps.json", None, None).read()
        commands += [step["command"] for step in steps_run.values()]
        total += sum(step["seconds"] for step in steps_run.values())
        if not s.evaluated:
            continue
        steps = trained(folder) or "-"
        if s.decomposer and trained(out / s.decomposer) is not None:
            steps = f"{trained(out / s.decomposer)} + {steps}"
        if s.name not in systems:
            rows.append(f"| {s.what} | {steps} | {waits.get(s.name, 'not run yet')} | | | | |")
            continue
        minutes = [v["seconds"] / 60 for v in steps_run.values()]
        if s.decomposer:
            minutes = [v["seconds"] / 60 for v in StepLog(out / s.decomposer / "steps.json", None, None).read().values()] + minutes
        ran = json.loads(summary(folder / "greedy", TEST).read_text())  # a row's device: the table may mix machines
        rows.append(f"| {s.what} | {steps} | {acc_cell(systems[s.name].values())} ({len(systems[s.name])}) | "
                    f"{chain_cells(systems, s.name)} | " + " + ".join(f"{m:.1f}" for m in minutes)
                    + f" | {ran['device']}, {ran['dtype']} |")
    claims = ["| claim | A vs B | problems | A - B, points [95 % CI] | p (bootstrap / McNemar) | verdict |",
              "| --- | --- | --- | --- | --- | --- |"]
    claims += [f"| {claim} | {claim_cells(systems, a, b, kind)}" for claim, a, b, kind in CLAIMS]
    note = (f"GSM8K test (1,319 problems; self-consistency on the first {args.sc_limit}, T = 0.7). Students: "
            f"SmolLM2-135M-Instruct, seed {args.seed}, {args.epochs} epochs over the {kept:,} train problems whose "
            f"sub-questions the teacher wrote for every step ({rejected:,} of the first {kept + rejected:,} rejected), "
            f"less the dev questions train.py holds out (5 %, at most 200); verdict margin {100 * MARGIN:.0f} points; `@sc`: majority of {args.n} "
            "chains. Wall time: minutes of each step (train, greedy, self-consistency), as run.")
    table = "\n".join(rows) + "\n\n" + "\n".join(claims)
    text = (f"# Socratic CoT on GSM8K, measured\n\n{note}\n\n{table}\n\nMachine: {args.machine}; {total / 3600:.1f} h "
            "of steps in all (the teacher's sub-questions included).\n\nCommands, one per step, as run:\n"
            + "".join(f"    {c}\n" for c in commands) + f"\nThis invocation: {(time.time() - wall0) / 60:.0f} min.\n")
    fileio.write_text(args.results, text)
    write_between(Path(args.readme), README_BEGIN, README_END, f"{note}\n\n{table}")
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "socratic-table"), help="checkpoints (not committed)")
    p.add_argument("--record", default=None, help="steps, metrics and evaluations, committed: what the table is "
                   "read from (default: experiments/socratic-table beside --results)")
    p.add_argument("--report-only", action="store_true", help="write the tables from what is finished; run nothing")
    p.add_argument("--teacher", default=str(QWEN))
    p.add_argument("--corpus", default=str(CORPUS), help="teacher.py --socratic's output (resumed if short)")
    p.add_argument("--problems", type=int, default=1000, help="train problems the teacher writes sub-questions for")
    p.add_argument("--teacher-batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--greedy-limit", type=int, default=0, help="test problems for greedy (0 = all 1,319)")
    p.add_argument("--sc-limit", type=int, default=200)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--greedy-batch", type=int, default=16, help="problems a greedy batch")
    p.add_argument("--sc-batch", type=int, default=8, help="problems a self-consistency batch (x --n rows)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="a chain's tokens (a step's, for the solver)")
    p.add_argument("--max-len", type=int, default=512, help="train.py --max-len")
    p.add_argument("--fewshot", type=int, default=3, help="worked solutions in the untuned student's prompt")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--init", default=None, help="student folder (default: SmolLM2-135M-Instruct); for smoke tests")
    p.add_argument("--readme", default=str(ROOT / "experiments" / "README.md"),
                   help="the results page whose table (between its markers) to rewrite (default: experiments/README.md)")
    p.add_argument("--results", default=str(ROOT / "experiments" / "socratic-results.md"))
    p.add_argument("--machine", default="2-core AMD EPYC VM, float32, torch 2.13.0+cpu")
    args = p.parse_args(argv)
    args.record = args.record or str(Path(args.results).parent / "socratic-table")
    wall0 = time.time()
    waits = {} if args.report_only else run(args)
    for name, why in waits.items():
        print(skip_line(name, why), flush=True)
    report(args, waits, wall0)


if __name__ == "__main__":
    main()
