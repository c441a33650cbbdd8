"""experiments/scotd_table.py on a tiny student: one command trains and evaluates every kind of student,
writes the tables with intervals and verdicts, and a second invocation runs nothing and writes the same."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import data
from helpers import tiny_student

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("scotd_table", ROOT / "experiments" / "scotd_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)

ONLY = "cot,label,qwen-K1,qwen-Kall,qwen-K1-steps,untuned"


def teacher_corpus(path, questions=6, chains=3):
    """A many-rationale corpus shaped like teacher.py's: each question's PaLM rationale in `chains` wordings,
    one of them wrong (filtered out by --filter correct)."""
    records = []
    for r in data.read_corpus(data.DEFAULT_TRAIN)[:questions]:
        right = r["rationales"][0]
        wrong = next(c for c in r["choices"] if c != r["answer"])
        r["rationales"] = [{"text": f"{right['text']} ({k})", "prediction": r["answer"], "correct": True}
                           for k in range(chains - 1)] + [{"text": "I am not sure.", "prediction": wrong, "correct": False}]
        records.append(r)
    data.write_corpus(records, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table")
    readme = tmp / "README.md"
    readme.write_text(f"intro\n{table.README_BEGIN}\nold table\n{table.README_END}\nrest\n")
    argv = ["--out", str(tmp / "runs"), "--results", str(tmp / "results"), "--readme", str(readme),
            "--teachers", str(tmp / "no-teachers"), "--init", str(tiny_student(tmp / "m")), "--only", ONLY,
            "--palm-steps", "2", "--batch-size", "4", "--train-limit", "24", "--greedy-limit", "6", "--sc-limit", "4",
            "--n", "3", "--fewshot", "1", "--teacher-corpus", str(teacher_corpus(tmp / "qwen.jsonl")), "--corpus-questions", "6"]
    return tmp, argv


def test_one_command_writes_every_cell_and_resumes_to_the_same_tables(setup, capsys):
    tmp, argv = setup
    table.main(argv)
    first = (tmp / "results" / "results.md").read_text()
    runs = tmp / "results" / "scotd-table"  # the record: what a fresh clone keeps
    steps = {name: json.loads((runs / name / "trained.json").read_text())["steps"] for name in ONLY.split(",")[:-1]}
    assert steps["cot"] == steps["label"] == 2  # --palm-steps
    assert steps["qwen-K1"] == 2 and steps["qwen-Kall"] == 3  # one pass: 6 and 12 examples, 4 a step
    assert steps["qwen-K1-steps"] == steps["qwen-Kall"]  # the equal-steps control
    for name in ("cot", "qwen-K1", "qwen-Kall", "qwen-K1-steps"):  # rationale-first: greedy and self-consistency
        assert len(table.predictions(runs / name / "sc")) == 4
    assert not (runs / "label" / "sc").exists() and not (runs / "untuned" / "sc").exists()
    assert len(table.predictions(runs / "untuned" / "greedy")) == 6
    for claim in ("CoT distillation beats training on labels alone", "K = all beats K = 1 (one pass)",
                  "control: K = all beats K = 1 at equal steps", "self-consistency beats greedy decoding (PaLM"):
        row = next(line for line in first.splitlines() if claim in line)
        assert any(v in row for v in ("| reproduced |", "| not reproduced |", "| inconclusive at this size |")), row
    assert "rationale after the label does as well as before it | post vs cot | | | | not run yet |" in first
    assert "python train.py --mode cot --out" in first and (tmp / "results" / "vote-curves.png").stat().st_size > 0
    readme = (tmp / "README.md").read_text()
    assert "old table" not in readme and readme.startswith("intro\n") and readme.endswith(f"{table.README_END}\nrest\n")
    assert "| `cot`: rationale, then answer |" in readme

    capsys.readouterr()
    table.main(argv)  # everything is there: nothing runs, the tables are the same
    assert ">>> python" not in capsys.readouterr().out
    second = (tmp / "results" / "results.md").read_text()
    strip = lambda text: text.split("This invocation")[0]  # noqa: E731
    assert strip(second) == strip(first)


def test_the_record_alone_resumes_and_a_lost_checkpoint_is_trained_again(setup, capsys):
    """A later session in a fresh clone has the committed record and no checkpoints: what is evaluated stays,
    and a student whose self-consistency is still to run trains again to the same weights (the same chains)."""
    tmp, argv = setup
    table.main(argv)
    record, runs = tmp / "results" / "scotd-table", tmp / "runs"
    first = (tmp / "results" / "results.md").read_text().split("This invocation")[0]
    sc_before = table.predictions(record / "cot" / "sc")
    shutil.rmtree(runs)
    capsys.readouterr()
    table.main(argv)
    assert ">>> python" not in capsys.readouterr().out
    assert (tmp / "results" / "results.md").read_text().split("This invocation")[0] == first
    shutil.rmtree(record / "cot" / "sc")
    table.main([*argv, "--only", "cot"])
    out = capsys.readouterr().out
    assert ">>> python train.py --mode cot" in out and ">>> python evaluate.py" in out
    assert table.predictions(record / "cot" / "sc") == sc_before


def test_workers_run_each_student_in_its_own_process_to_the_same_record(setup, capsys):
    """--workers 2 (for a GPU): each student in a process of its own; the equal-steps control starts once the
    student whose steps it takes has recorded its training; every prediction equals the one-process run's."""
    tmp, argv = setup
    table.main(argv)  # the one-process record (nothing runs if an earlier test made it)
    names = ["cot", "qwen-Kall", "qwen-K1-steps"]
    capsys.readouterr()
    table.main([*argv, "--only", ",".join(names), "--workers", "2", "--out", str(tmp / "runs-w"),
                "--results", str(tmp / "results-w")])
    out = capsys.readouterr().out
    assert all(f"done      {name} (exit 0;" in out for name in names) and "FAILED" not in out
    one, many = tmp / "results" / "scotd-table", tmp / "results-w" / "scotd-table"
    assert json.loads((many / "qwen-K1-steps" / "trained.json").read_text())["steps"] == 3  # qwen-Kall's, not skipped
    for name in names:
        for step in ("greedy", "sc"):
            assert table.predictions(many / name / step) == table.predictions(one / name / step), (name, step)
    assert ">>> python train.py --mode cot" in (tmp / "runs-w" / "cot.log").read_text()


def test_teacher_students_wait_for_the_corpus(setup, capsys):
    tmp, argv = setup
    small = teacher_corpus(tmp / "small.jsonl", questions=3)
    with open(small, "a") as f:
        f.write('{"id": "cut by a kill')  # a half-written line is not a question
    table.main([*argv[:-4], "--teacher-corpus", str(small), "--corpus-questions", "6", "--out", str(tmp / "runs2"),
                "--only", "qwen-K1,qwen-K1-steps", "--results", str(tmp / "results2")])
    out = capsys.readouterr().out
    assert f"skip      qwen-K1: waits for the teacher corpus (3 of 6 questions in {small})" in out
    assert "waits for the teacher corpus" in (tmp / "results2" / "results.md").read_text()
    assert not (tmp / "runs2" / "qwen-K1").exists()

    # the same under --workers: each process's skip line reaches the caller's report, not a bare "done"
    table.main([*argv[:-4], "--teacher-corpus", str(small), "--corpus-questions", "6", "--out", str(tmp / "runs3"),
                "--only", "qwen-K1,qwen-K1-steps", "--results", str(tmp / "results3"), "--workers", "2"])
    out = capsys.readouterr().out
    assert f"skipped   qwen-K1 (exit 0; {tmp / 'runs3' / 'qwen-K1.log'}): waits for the teacher corpus (3 of 6" in out
    assert "skipped   qwen-K1-steps (exit 0;" in out and "done " not in out
    results = (tmp / "results3" / "results.md").read_text()
    assert results.count("| waits for the teacher corpus (3 of 6 questions") == 2  # the two rows


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        table.main(["--workers", "0", "--report-only"])
    assert "argument --workers: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("kind,low,high,expected", [
    ("beats", 0.001, 0.08, "reproduced"), ("beats", -0.03, 0.019, "not reproduced"),
    ("beats", -0.01, 0.05, "inconclusive at this size"), ("as well", -0.019, 0.03, "reproduced"),
    ("as well", -0.06, -0.001, "not reproduced"), ("as well", -0.05, 0.02, "inconclusive at this size"),
    ("report", -0.5, 0.5, "(reported)")])
def test_verdicts_follow_the_interval(kind, low, high, expected):
    assert table.verdict(kind, low, high) == expected


def test_the_chains_plan_trains_k_and_selection_students_at_equal_steps(setup, tmp_path, capsys):
    """--plan chains: the K = 3 students on random, likeliest and most diverse chains train for as many steps as
    K = all's one pass, with train.py --select on the scored corpus; the results page names each claim's verdict
    and chains.png plots accuracy against K. Without the scored corpus, its students wait for it."""
    tmp, argv = setup
    records = data.read_corpus(tmp / "qwen.jsonl")
    for rec in records:  # scored as teacher.py --score would
        for k, r in enumerate(rec["rationales"]):
            r |= {"teacher_logprob": -1.0 - k, "teacher_tokens": 4}
    data.write_corpus(records, tmp_path / "scored.jsonl")
    plan = [a for a in argv if a not in ("--readme", str(tmp / "README.md"))]
    plan[plan.index("--only") + 1] = "qwen-Kall,qwen-K3-steps,qwen-K3-likely,qwen-K3-diverse"
    plan[plan.index("--results") + 1] = str(tmp_path / "results")
    waiting = plan + ["--plan", "chains", "--scored-corpus", str(tmp_path / "missing.jsonl")]
    table.main(waiting)
    assert "skip      qwen-K3-likely: waits for the scored corpus (0 of 6 questions" in capsys.readouterr().out
    table.main(plan + ["--plan", "chains", "--scored-corpus", str(tmp_path / "scored.jsonl")])
    record = tmp_path / "results" / "chains-table"
    steps = {name: json.loads((record / name / "trained.json").read_text())["steps"]
             for name in ("qwen-Kall", "qwen-K3-steps", "qwen-K3-likely", "qwen-K3-diverse")}
    assert len(set(steps.values())) == 1  # equal steps
    commands = json.loads((record / "qwen-K3-likely" / "steps.json").read_text())["train"]["command"]
    assert "--select likely" in commands and "scored.jsonl" in commands
    page = (tmp_path / "results" / "chains-results.md").read_text()
    for claim in ("the teacher's likeliest chains beat random ones (K = 3)", "diverse chains beat random ones (K = 3)"):
        row = next(line for line in page.splitlines() if claim in line)
        assert any(v in row for v in ("| reproduced |", "| not reproduced |", "| inconclusive at this size |")), row
    assert page.startswith("# How many rationales, which ones, and self-consistency, measured")
    assert "K = 2 beats K = 1 | qwen-K2-steps vs qwen-K1-steps | | | | not run yet |" in page
    assert (tmp_path / "results" / "chains.png").stat().st_size > 0
    assert (tmp_path / "results" / "chains-vote-curves.png").stat().st_size > 0  # K = all's self-consistency
    assert not (tmp_path / "results" / "vote-curves.png").exists()  # the claims plan's plot is not overwritten
