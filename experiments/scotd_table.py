"""The SCoTD and Wadhwa et al. claims, measured: one command, resumable, every cell with a 95 % interval.

    nice python experiments/scotd_table.py                 # the CPU plan (many CPU hours); run again to continue
    python experiments/scotd_table.py --report-only        # rewrite results.md and the plot from the record
    # experiments/README.md's table: on one GPU, four students at a time, batch 32, 693 steps (3 epochs of cot) on PaLM
    python experiments/scotd_table.py --workers 4 --batch-size 32 --palm-steps 693 --greedy-batch 256 \
        --sc-batch 64 --save-every 100000 --results experiments/gpu --readme experiments/README.md

Students (SmolLM2-135M-Instruct, seed 1337, AdamW lr 1e-4, batch 8; train.py's defaults otherwise):
  on the bundled PaLM corpus (one rationale per question), --palm-steps optimizer steps each (default
  400 x 8 = 3,200 examples, 0.43 of an epoch of the 7,388 correct rationales, the most a CPU allows; on a
  GPU 693 x 32, 3 epochs of them, train.py's GPU default): `label`, `cot`, `cot --filter all`, `post`,
  `post-shuffled`;
  on the teacher corpus (data/csqa_qwen_train.jsonl: Qwen2.5-Coder-1.5B, 10 chains per question, its
  correct ones kept): K = 1, 5 and all rationales per question for one pass over the questions (the
  paper's setting: more rationales, more training), and K = 1 and 5 for as many steps as K = all took
  (the control: more steps on fewer rationales);
  and the untuned student prompted with 3 worked examples (the floor).
Each student is evaluated on its final weights (`last`: nothing is chosen on validation) greedily on all
1,221 CSQA validation questions and, if it writes its rationale first, with self-consistency on the first
400 (N = 20 chains at T = 0.7; the vote curve k = 1..20 is read off the same chains). Beside them, the
teacher's own 4-shot accuracy on the first 200 (experiments/teachers/, from teacher_runs.sh).

A claim is tested by a paired bootstrap over the questions both systems answered (and McNemar's exact
test). "A beats B" is *reproduced* when the 95 % interval of A - B lies above 0, *not reproduced* when it
lies below MARGIN (an effect that large is excluded), else *inconclusive at this size*. "A does as well
as B" is reproduced when the interval lies above -MARGIN, not reproduced when it lies below 0.

Resumable: a student is three steps (train, greedy, self-consistency), each skipped once its output is
there; a train step cut short resumes from its newest `last` save (train.py --resume: the same result as
an uninterrupted run). Students on the teacher corpus wait until it holds --corpus-questions questions.
What a step leaves is split in two: the checkpoints (--out, runs/scotd-table/, ignored by git) and the
record (--record, experiments/scotd-table/, committed): each step's command and seconds, the train
metrics, and every evaluation's predictions and summary. The record is what the tables are read from, so
a later session in a fresh clone goes on from it; a student whose evaluation is still to run and whose
checkpoint is gone trains again (the same seed and data: the same weights).
Writes <--results>/results.md and vote-curves.png (--plan chains: the files below), and with --readme the table
between its markers.

--plan chains (issue #31) runs other students the same way: K = 1, 2, 3, 5 random rationales per question and
K = all, all for as many steps as one pass over K = all (the K curve); K = 3 chosen by the teacher's likelihood
(likeliest, unlikeliest) or for diversity (train.py --select, on the --score'd corpus); and self-consistency on
all 1,221 questions for `cot`, K = all and K = 5 (the best greedy at equal steps). It writes chains-results.md,
chains.png (accuracy against K) and chains-vote-curves.png (the claims plan's files stay as they are); its record
is <--results>/chains-table.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))  # stats.py

import cli  # noqa: E402
import fileio  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import default_student, read_run_info  # noqa: E402
from report import plot_lines  # noqa: E402
from stats import bootstrap_cell, mcnemar, paired_bootstrap, wilson, wilson_cell  # noqa: E402
from scotd import majority_vote  # noqa: E402

MARGIN = 0.02  # the smallest accuracy difference the verdicts care about
TEACHER_CORPUS = ROOT / "data" / "csqa_qwen_train.jsonl"
TEACHERS = ROOT / "experiments" / "teachers"
SCORED_CORPUS = ROOT / "experiments" / "scores" / "csqa_qwen_train.scored.jsonl"  # teacher.py --score's output
CORPORA = {"palm": "PaLM, 1 per question", "teacher": "Qwen 1.5B, 10 per question",
           "scored": "Qwen 1.5B, 10 per question, scored by the teacher"}
README_BEGIN, README_END = "<!-- scotd_table: begin (written by experiments/scotd_table.py) -->", "<!-- scotd_table: end -->"


@dataclass
class Student:
    name: str
    what: str
    train: list = None      # train.py flags; None: evaluated as it is (the untuned floor)
    corpus: str = "palm"    # "palm" (bundled), "teacher" (data/csqa_qwen_train.jsonl) or "scored" (with teacher_logprob)
    chains: bool = True     # writes its rationale first: self-consistency and a vote curve
    steps_of: str = None    # the equal-steps control: as many optimizer steps as this student took
    evaluate: list = field(default_factory=list)  # extra evaluate.py flags


STUDENTS = [  # in the order they run: the main comparisons first
    Student("cot", "`cot`: rationale, then answer", ["--mode", "cot"]),
    Student("label", "`label`: answer only", ["--mode", "label"], chains=False),
    Student("qwen-K1", "`cot`, Qwen corpus, K = 1, one pass", ["--rationales-per-question", "1", "--epochs", "1"], "teacher"),
    Student("qwen-K5", "`cot`, Qwen corpus, K = 5, one pass", ["--rationales-per-question", "5", "--epochs", "1"], "teacher"),
    Student("qwen-Kall", "`cot`, Qwen corpus, K = all, one pass", ["--epochs", "1"], "teacher"),
    Student("post", "`post`: answer, then rationale", ["--mode", "post"], chains=False),
    Student("post-shuffled", "`post`, rationale words shuffled", ["--mode", "post-shuffled"], chains=False),
    Student("cot-all", "`cot`, teacher's wrong rationales kept", ["--mode", "cot", "--filter", "all"]),
    Student("qwen-K1-steps", "`cot`, Qwen corpus, K = 1, K = all's steps", ["--rationales-per-question", "1"],
            "teacher", steps_of="qwen-Kall"),
    Student("qwen-K5-steps", "`cot`, Qwen corpus, K = 5, K = all's steps", ["--rationales-per-question", "5"],
            "teacher", steps_of="qwen-Kall"),
    Student("untuned", "untuned, worked examples in the prompt", None, chains=False, evaluate=["--mode", "cot"]),
]

CLAIMS = [  # (paper, claim, system A, system B, kind); "name@sc": the N-chain vote, "teacher": Qwen 1.5B 4-shot
    ("SCoTD", "CoT distillation beats training on labels alone", "cot", "label", "beats"),
    ("SCoTD", "the distilled student beats the untuned one prompted with worked examples", "cot", "untuned", "beats"),
    ("SCoTD", "many rationales per question: K = all beats K = 1 (one pass)", "qwen-Kall", "qwen-K1", "beats"),
    ("SCoTD", "K = 5 beats K = 1 (one pass)", "qwen-K5", "qwen-K1", "beats"),
    ("SCoTD", "control: K = all beats K = 1 at equal steps", "qwen-Kall", "qwen-K1-steps", "beats"),
    ("SCoTD", "control: K = all beats K = 5 at equal steps", "qwen-Kall", "qwen-K5-steps", "beats"),
    ("SCoTD", "self-consistency beats greedy decoding (PaLM `cot` student)", "cot@sc", "cot", "beats"),
    ("SCoTD", "self-consistency beats greedy decoding (unfiltered rationales)", "cot-all@sc", "cot-all", "beats"),
    ("SCoTD", "self-consistency beats greedy decoding (Qwen corpus, K = all)", "qwen-Kall@sc", "qwen-Kall", "beats"),
    ("Wadhwa", "rationale after the label does as well as before it", "post", "cot", "as well"),
    ("Wadhwa", "after the label, the rationale's words in random order do as well", "post-shuffled", "post", "as well"),
    ("-", "keeping the teacher's wrong rationales vs filtering them (no claim)", "cot-all", "cot", "report"),
    ("-", "student (Qwen corpus, K = all) vs its teacher, greedy (no claim)", "qwen-Kall", "teacher", "report"),
    ("-", "student vs its teacher, majority of the chains (no claim)", "qwen-Kall@sc", "teacher@sc", "report"),
]


# --plan chains (issue #31): which chains, how many, and self-consistency on every question. Every Qwen student
# trains for as many steps as one pass over K = all, so only the chains differ.
CHAIN_STUDENTS = [
    Student("cot", "`cot`: rationale, then answer", ["--mode", "cot"]),
    Student("qwen-Kall", "`cot`, Qwen corpus, K = all, one pass", ["--epochs", "1"], "teacher"),
    *[Student(f"qwen-K{k}-steps", f"`cot`, Qwen corpus, K = {k}, random, K = all's steps",
              ["--rationales-per-question", str(k)], "teacher", chains=k == 5, steps_of="qwen-Kall") for k in (1, 2, 3, 5)],
    *[Student(f"qwen-K3-{how}", f"`cot`, Qwen corpus, K = 3, {what}, K = all's steps",
              ["--rationales-per-question", "3", "--select", how], "scored", chains=False, steps_of="qwen-Kall")
      for how, what in (("likely", "the teacher's likeliest"), ("unlikely", "the teacher's unlikeliest"),
                        ("diverse", "the most diverse"))],
]
CURVE = {1: "qwen-K1-steps", 2: "qwen-K2-steps", 3: "qwen-K3-steps", 5: "qwen-K5-steps", 10: "qwen-Kall"}
CHAIN_CLAIMS = [
    ("SCoTD", "more rationales per question at equal steps: K = 2 beats K = 1", "qwen-K2-steps", "qwen-K1-steps", "beats"),
    ("SCoTD", "K = 3 beats K = 2 at equal steps", "qwen-K3-steps", "qwen-K2-steps", "beats"),
    ("SCoTD", "K = 5 beats K = 3 at equal steps", "qwen-K5-steps", "qwen-K3-steps", "beats"),
    ("SCoTD", "K = all (10) beats K = 5 at equal steps (the paper: 50 did not beat 30)", "qwen-Kall", "qwen-K5-steps", "beats"),
    ("SCoTD", "the teacher's likeliest chains beat random ones (K = 3)", "qwen-K3-likely", "qwen-K3-steps", "beats"),
    ("SCoTD", "diverse chains beat random ones (K = 3)", "qwen-K3-diverse", "qwen-K3-steps", "beats"),
    ("SCoTD", "diverse chains beat the teacher's likeliest (K = 3)", "qwen-K3-diverse", "qwen-K3-likely", "beats"),
    ("-", "the teacher's unlikeliest chains vs random ones (no claim)", "qwen-K3-unlikely", "qwen-K3-steps", "report"),
    ("SCoTD", "self-consistency beats greedy decoding (PaLM `cot` student)", "cot@sc", "cot", "beats"),
    ("SCoTD", "self-consistency beats greedy decoding (Qwen corpus, K = all)", "qwen-Kall@sc", "qwen-Kall", "beats"),
    ("SCoTD", "self-consistency beats greedy decoding (Qwen corpus, K = 5: the best greedy at equal steps)",
     "qwen-K5-steps@sc", "qwen-K5-steps", "beats"),
]
# plan -> (students, claims, results page, vote-curve plot, record folder, the results page's markers)
PLANS = {"claims": (STUDENTS, CLAIMS, "results.md", "vote-curves.png", "scotd-table", (README_BEGIN, README_END)),
         "chains": (CHAIN_STUDENTS, CHAIN_CLAIMS, "chains-results.md", "chains-vote-curves.png", "chains-table",
                    ("<!-- chains_table: begin (written by experiments/scotd_table.py --plan chains) -->",
                     "<!-- chains_table: end -->"))}


# -----------------------------------------------------------------------------
# Running the students


class StepLog:
    """<run>/steps.json: each step's command and the seconds spent on it, summed over invocations; the time
    is rewritten every 30 s, so a killed session loses at most that much of the record."""

    def __init__(self, path, step, command):
        self.path, self.step, self.command = path, step, command
        self.before = self.read().get(step, {}).get("seconds", 0.0)
        self.t0, self.stop = time.time(), threading.Event()

    def read(self):
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def write(self):
        steps = self.read()
        steps[self.step] = {"command": self.command, "seconds": round(self.before + time.time() - self.t0, 1)}
        fileio.write_text(self.path, json.dumps(steps, indent=1))

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        threading.Thread(target=lambda: [self.write() for _ in iter(lambda: self.stop.wait(30), True)], daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.write()


def trained_steps(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in rows)


def trained(rec):
    """The steps of the training recorded in rec (its trained.json), or None while it has not finished."""
    path = rec / "trained.json"
    return json.loads(path.read_text())["steps"] if path.exists() else None


def record_training(run, rec):
    """A finished train step into the record: its metrics, and trained.json (the steps it took)."""
    rec.mkdir(parents=True, exist_ok=True)
    fileio.write_text(rec / "metrics.jsonl", (run / "metrics.jsonl").read_text())
    fileio.write_text(rec / "trained.json", json.dumps({"steps": trained_steps(run)}))


def skip_line(name, why):
    """The line a skipped student prints; run_workers reads it back from a --workers process's log."""
    return f"skip      {name}: {why}"


def has_checkpoint(run, rec):
    """Is run/last the final checkpoint of the training rec records? (A retraining cut short leaves an earlier one.)"""
    steps = trained(rec)
    return steps is not None and read_run_info(run / "last").get("step") == steps


def run_step(run, step, script, main, argv):
    """script's main(argv), printed as the command it stands for, its time kept in <run>/steps.json."""
    command = f"python {script} " + " ".join(argv).replace(f"{ROOT}/", "")
    print(f"\n>>> {command}", flush=True)
    t0 = time.time()
    with StepLog(run / "steps.json", step, command):
        main(argv)
    print(f"<<< {time.time() - t0:.0f} s", flush=True)


class Runner:
    def __init__(self, args):
        self.args, self.out, self.record = args, Path(args.out), Path(args.record)

    def run(self, s):
        """Train (or resume) and evaluate one student; returns why it was skipped, or None."""
        a, run, rec = self.args, self.out / s.name, self.record / s.name
        evaluations = [summary(rec / "greedy")] + ([summary(rec / "sc")] if s.chains else [])
        if all(e.exists() for e in evaluations):
            return None
        corpus = {"teacher": a.teacher_corpus, "scored": a.scored_corpus}.get(s.corpus)
        if corpus:
            have = len(data.read_finished(corpus)) if Path(corpus).exists() else 0
            if have < a.corpus_questions:
                return f"waits for the {s.corpus} corpus ({have:,} of {a.corpus_questions:,} questions in {corpus})"
        checkpoint = run / "last"
        if s.train is None:
            checkpoint = Path(a.init) if a.init else default_student()
        elif not has_checkpoint(run, rec):  # not trained yet, cut short, or its checkpoint is gone
            if s.steps_of and trained(self.record / s.steps_of) is None:
                return f"waits for {s.steps_of} (it sets the number of steps)"
            argv = [*s.train, "--out", str(run), "--seed", str(a.seed), "--batch-size", str(a.batch_size),
                    "--eval-every", "0", "--save-every", str(a.save_every)]
            if corpus:
                argv += ["--data", str(corpus), "--limit", str(a.corpus_questions)]
            elif a.train_limit:
                argv += ["--limit", str(a.train_limit)]
            if s.steps_of:
                argv += ["--max-steps", str(trained(self.record / s.steps_of))]
            elif "--epochs" not in s.train:
                argv += ["--max-steps", str(a.palm_steps)]
            if a.init:
                argv += ["--init", str(a.init)]
            # --overwrite: a run that stopped before its first save starts again (it clears only train.py's outputs)
            argv.append("--resume" if (run / "last" / train.STATE_FILE).exists() else "--overwrite")
            run_step(rec, "train", "train.py", train.main, argv)
            record_training(run, rec)
        common = ["--checkpoint", str(checkpoint), "--seed", str(a.seed), *s.evaluate]
        if s.train is None:
            common += ["--fewshot", str(a.fewshot)]
        if not summary(rec / "greedy").exists():
            run_step(rec, "greedy", "evaluate.py", evaluate.main,
                     [*common, "--n", "0", "--limit", str(a.greedy_limit), "--batch-size", str(a.greedy_batch),
                      "--out", str(rec / "greedy")])
        if s.chains and not summary(rec / "sc").exists():
            run_step(rec, "self-consistency", "evaluate.py", evaluate.main,
                     [*common, "--n", str(a.n), "--temperature", str(a.temperature), "--limit", str(a.sc_limit),
                      "--batch-size", str(a.sc_batch), "--no-greedy", "--out", str(rec / "sc")])
        return None


def run_workers(args, argv, names):
    """Each student of `names` in its own process (this script, --only that student), args.workers at a time,
    in the order of `names`; a student whose step count comes from another (steps_of) starts once that one's
    training is recorded. For a GPU, where one student's small kernels leave most of it idle. Each
    process's output goes to <--out>/<student>.log. -> {student: why it did not finish}: its own skip line
    ("waits for ..."), or its failure; the tables are written once, by the caller, from the record."""
    by_name = {s.name: s for s in args.students}
    queue, running, skipped = [by_name[name] for name in names], {}, {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        while queue or running:
            for name, (proc, log, start) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[name]
                    this_run = Path(log.name).read_bytes()[start:].decode(errors="replace").splitlines()
                    prefix = skip_line(name, "")
                    why = next((line[len(prefix):] for line in this_run if line.startswith(prefix)), None)
                    if proc.returncode:
                        why = f"failed (exit {proc.returncode}): see {log.name}"
                    if why:
                        skipped[name] = why
                    print(f"{'FAILED' if proc.returncode else 'skipped' if why else 'done':9s} {name} "
                          f"(exit {proc.returncode}; {log.name}){': ' + why if why else ''}", flush=True)
            for s in list(queue):
                waits_for = s.steps_of in running or s.steps_of in [q.name for q in queue]
                if len(running) == args.workers or (waits_for and trained(Path(args.record) / s.steps_of) is None):
                    continue
                queue.remove(s)
                log = open(Path(args.out) / f"{s.name}.log", "a")
                cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", s.name, "--workers", "1", "--no-report"]
                running[s.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, log.tell())
                print(f"start     {s.name} ({len(running)} running; {log.name})", flush=True)
            time.sleep(1)
    finally:  # Ctrl-C reaches the workers too (one process group): each stops at a safe point; wait for them
        for proc, log, _ in running.values():
            proc.wait()
            log.close()
    return skipped


def summary(folder, dev=data.DEFAULT_DEV):
    """evaluate.py's summary of `dev` in folder (its predictions sit beside it)."""
    return folder / f"summary-{Path(dev).name.split('.')[0]}.json"


# -----------------------------------------------------------------------------
# Reading the results: per question, right or wrong


def predictions(folder, dev=data.DEFAULT_DEV):
    path = summary(folder, dev).with_name(summary(folder, dev).name.replace("summary-", "predictions-").replace(".json", ".jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def outcomes(out, n, teachers, students=STUDENTS):
    """{system: {question id: right?}} for every finished evaluation, plus {student: vote curve rows}."""
    systems, curves = {}, {}
    for s in students:
        run = out / s.name
        if summary(run / "greedy").exists():
            systems[s.name] = {r["id"]: r["greedy_correct"] for r in predictions(run / "greedy")}
        if summary(run / "sc").exists():
            rows = predictions(run / "sc")
            systems[f"{s.name}@sc"] = {r["id"]: r["vote_correct"] for r in rows}
            systems[f"{s.name}@chain"] = {r["id"]: np.mean([c["answer"] == r["gold"] for c in r["chains"]]) for r in rows}
            curves[s.name] = [[majority_vote([c["answer"] for c in r["chains"][:k]]) == r["gold"] for r in rows]
                              for k in range(1, n + 1)]
    for kind, path in (("teacher", teachers / "qwen-1.5B-greedy.jsonl"), ("teacher@sc", teachers / "qwen-1.5B-n10.jsonl")):
        rows = data.read_finished(path)  # the 10-chain run may still be writing
        if rows:
            systems[kind] = {r["id"]: majority_vote([x["prediction"] for x in r["rationales"]]) == r["answer"] for r in rows}
            if kind == "teacher@sc":
                systems["teacher@chain"] = {r["id"]: np.mean([x["correct"] for x in r["rationales"]]) for r in rows}
    return systems, curves


def acc_cell(right):
    right = list(right)
    return wilson_cell(sum(right), len(right))


def verdict(kind, low, high):
    if kind == "report":
        return "(reported)"
    if kind == "beats":
        return "reproduced" if low > 0 else "not reproduced" if high < MARGIN else "inconclusive at this size"
    return "reproduced" if low > -MARGIN else "not reproduced" if high < 0 else "inconclusive at this size"


def compare(systems, a, b, kind):
    """One claim's row: paired over the questions both systems answered."""
    if a not in systems or b not in systems:
        return None
    ids = [i for i in systems[a] if i in systems[b]]
    xa, xb = [systems[a][i] for i in ids], [systems[b][i] for i in ids]
    diff, (low, high), p = paired_bootstrap(xa, xb)
    return {"n": len(ids), "a": float(np.mean(xa)), "b": float(np.mean(xb)), "diff": diff, "low": low, "high": high,
            "p": p, "mcnemar": mcnemar(xa, xb), "verdict": verdict(kind, low, high)}


def claim_cells(systems, a, b, kind):
    """A claim row's cells from "A vs B" on: questions, A - B with its interval, p values, verdict."""
    c = compare(systems, a, b, kind)
    if c is None:
        return f"{a} vs {b} | | | | not run yet |"
    return (f"{a} vs {b} | {c['n']} | {100 * c['diff']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] | "
            f"{c['p']:.3f} / {c['mcnemar']:.3f} | {c['verdict']} |")


def chain_cells(systems, name):
    """A student row's self-consistency cells: one sampled chain, and the majority vote (with its question count)."""
    sc = systems.get(f"{name}@sc")
    if not sc:
        return "- | -"
    return f"{bootstrap_cell(systems[f'{name}@chain'].values())} | {acc_cell(sc.values())} ({len(sc)})"


def report(args, skipped, wall0):
    out = Path(args.record)
    systems, curves = outcomes(out, args.n, Path(args.teachers), args.students)
    commands, total = [], 0.0
    rows = [f"| student | trained on | steps x {args.batch_size} | greedy [95 % CI] (questions) | one chain | "
            f"majority of {args.n} | wall time (min) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in args.students:
        run = out / s.name
        if s.name not in systems:
            rows.append(f"| {s.what} | {CORPORA[s.corpus] if s.train else '-'} | | {skipped.get(s.name, 'not run yet')} | | | |")
            continue
        steps = trained(run) or "-"
        steps_run = StepLog(run / "steps.json", None, None).read()
        commands += [step["command"] for step in steps_run.values()]
        total += sum(step["seconds"] for step in steps_run.values())
        rows.append(f"| {s.what} | {CORPORA[s.corpus] if s.train else '-'} | {steps} | {acc_cell(systems[s.name].values())} "
                    f"({len(systems[s.name])}) | {chain_cells(systems, s.name)} | "
                    + " + ".join(f"{step['seconds'] / 60:.1f}" for step in steps_run.values()) + " |")
    if "teacher" in systems:
        rows.append(f"| teacher: Qwen2.5-Coder-1.5B, 4-shot (T = 1.0, 10 chains) | - | - | "
                    f"{acc_cell(systems['teacher'].values())} ({len(systems['teacher'])}) | "
                    f"{chain_cells(systems, 'teacher')} | see the teacher table |")
    claims = ["| paper | claim | A vs B | questions | A - B, points [95 % CI] | p (bootstrap / McNemar) | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    claims += [f"| {paper} | {claim} | {claim_cells(systems, a, b, kind)}" for paper, claim, a, b, kind in args.claims]
    sc = f"the first {args.sc_limit}" if args.sc_limit else "all of them"
    note = (f"CSQA validation (1,221 questions; self-consistency on {sc}, T = {args.temperature}); "
            f"SmolLM2-135M-Instruct students, seed {args.seed}; verdict margin {100 * MARGIN:.0f} points; "
            f"`@sc`: majority of {args.n} chains. Wall time: minutes of train + greedy + self-consistency, as run.")
    table = "\n".join(rows) + "\n\n" + "\n".join(claims)
    title = "How many rationales, which ones, and self-consistency" if args.plan == "chains" else "SCoTD claims"
    text = (f"# {title}, measured\n\n{note}\n\n{table}\n\nMachine: {args.machine}; {total / 3600:.1f} h of "
            "steps in all.\n\nCommands, one per step, as run:\n" + "".join(f"    {c}\n" for c in commands)
            + f"\nThis invocation: {(time.time() - wall0) / 60:.0f} min.\n")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    fileio.write_text(results / args.page, text)
    if curves:
        ks = list(range(1, args.n + 1))
        series = {name: (ks, [float(np.mean(c)) for c in curve]) for name, curve in curves.items()}
        bands = {name: tuple(zip(*[wilson(sum(c), len(c)) for c in curve])) for name, curve in curves.items()}
        plot_lines(results / args.curves_plot, series, "chains voted over (k)", "accuracy",
                   f"self-consistency, CSQA validation ({sc}), 95 % bands", bands=bands)
    if args.plan == "chains":
        plot_chains(results / "chains.png", systems)
    if args.readme:
        write_between(Path(args.readme), *args.markers, f"{note}\n\n{table}")
    print(text)


def plot_chains(path, systems):
    """Accuracy against K (random chains, equal steps) with 95 % bands, and the K = 3 selections beside it."""
    series, bands = {}, {}
    curve = [(k, systems[name]) for k, name in CURVE.items() if name in systems]
    if curve:
        series["random chains"] = ([k for k, _ in curve], [float(np.mean(list(s.values()))) for _, s in curve])
        bands["random chains"] = tuple(zip(*[wilson(sum(s.values()), len(s)) for _, s in curve]))
    for how in ("likely", "unlikely", "diverse"):
        if (s := systems.get(f"qwen-K3-{how}")) is not None:
            series[f"K = 3, {how}"] = ([3], [float(np.mean(list(s.values())))])
            bands[f"K = 3, {how}"] = tuple([x] for x in wilson(sum(s.values()), len(s)))
    if series:
        plot_lines(path, series, "rationales per question (K), equal steps", "greedy accuracy",
                   "CSQA validation, SmolLM2-135M students, 95 % bands", bands=bands)


def write_between(readme, begin, end, text):
    """Replace what lies between README's two marker lines with text (a README without them is left alone)."""
    if readme.exists() and begin in readme.read_text():
        head, rest = readme.read_text().split(begin)
        fileio.write_text(readme, f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "scotd-table"), help="checkpoints (not committed)")
    p.add_argument("--record", default=None, help="steps, metrics and evaluations, committed: what the tables are "
                   "read from (default: <--results>/scotd-table)")
    p.add_argument("--plan", default="claims", choices=list(PLANS), help="claims: the SCoTD and Wadhwa claims; chains: "
                   "how many rationales, which ones (teacher likelihood, diversity) and self-consistency on every "
                   "question (default: claims)")
    p.add_argument("--only", default=None, help="comma-separated student names (default: all, in order)")
    p.add_argument("--report-only", action="store_true", help="write the tables from what is finished; run nothing")
    p.add_argument("--palm-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-corpus", default=str(TEACHER_CORPUS))
    p.add_argument("--scored-corpus", default=str(SCORED_CORPUS), help="the teacher corpus with teacher_logprob "
                   "(teacher.py --score), for --select")
    p.add_argument("--corpus-questions", type=int, default=1000)
    p.add_argument("--greedy-limit", type=int, default=0, help="validation questions for greedy (0 = all 1,221)")
    p.add_argument("--sc-limit", type=int, default=None, help="questions for self-consistency, 0 = all (default: 400; "
                   "all with --plan chains)")
    p.add_argument("--greedy-batch", type=int, default=64, help="questions a greedy batch")
    p.add_argument("--sc-batch", type=int, default=8, help="questions a self-consistency batch (x --n rows)")
    p.add_argument("--workers", type=cli.positive_int, default=1, help="students run at once, each in its own process (GPU)")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a --workers process
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--fewshot", type=int, default=3, help="worked examples in the untuned student's prompt")
    p.add_argument("--init", default=None, help="student folder (default: SmolLM2-135M-Instruct); for smoke tests")
    p.add_argument("--train-limit", type=int, default=None, help="first N PaLM train questions; for smoke tests")
    p.add_argument("--readme", default=None, help="the results page whose table (between the markers) to rewrite, "
                   "e.g. experiments/README.md: its table is the GPU run's, so a CPU run leaves it alone unless asked "
                   "(default: none)")
    p.add_argument("--results", default=str(ROOT / "experiments"), help="folder for results.md and vote-curves.png")
    p.add_argument("--teachers", default=str(TEACHERS), help="teacher_runs.sh's outputs (the teacher's own accuracy)")
    p.add_argument("--machine", default="2-core AMD EPYC VM, float32, torch 2.13.0+cpu")
    args = p.parse_args(argv)
    args.students, args.claims, args.page, args.curves_plot, record, args.markers = PLANS[args.plan]
    args.record = args.record or str(Path(args.results) / record)
    args.sc_limit = args.sc_limit if args.sc_limit is not None else (0 if args.plan == "chains" else 400)
    names = [s.name for s in args.students]
    only = args.only.split(",") if args.only else names
    if unknown := set(only) - set(names):
        p.error(f"--only: unknown students {sorted(unknown)}; expected some of {names}")
    wall0, skipped = time.time(), {}
    if args.workers > 1 and not args.report_only:
        skipped = run_workers(args, sys.argv[1:] if argv is None else argv, only)
    elif not args.report_only:
        runner = Runner(args)
        for s in args.students:
            if s.name in only and (why := runner.run(s)):
                skipped[s.name] = why
                print(skip_line(s.name, why), flush=True)
    if not args.no_report:
        report(args, skipped, wall0)


if __name__ == "__main__":
    main()
