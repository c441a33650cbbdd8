"""Reliability, round 3: inputs longer than the model's context, writes that fail inside a library, ids that
repeat, and the settings a --resume may or may not change. Each fault is injected where it hurts: inside the
first checkpoint's safetensors writer, a real file-size limit (ulimit -f), a half-written append."""

import errno
import gzip
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import checkpoint
import cli
import fileio
import data
import evaluate
import flags
import report
import teacher
import train
from fileio import WriteError
from data import CorpusError
from helpers import signal_on_call, tiny_student

ROOT = Path(train.__file__).resolve().parent
TRAIN_FLAGS = ["--limit", "16", "--batch-size", "4", "--eval-every", "0", "--eval-questions", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """The same tiny student with 128 positions: a 4-shot header does not fit it."""
    return tiny_student(tmp_path_factory.mktemp("short") / "m", positions=128)


def one_line_error(main, capsys):
    """cli.run(main) -> (exit code, the one line it printed on stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return e.value.code, err[0]


# -----------------------------------------------------------------------------
# Does it fit the model? One check, before any work, wherever tokens are fed to a model


def test_a_header_longer_than_the_teachers_context_is_named_before_any_sampling(short, tmp_path, capsys, monkeypatch):
    """Was: IndexError inside RoPE, reached from the header's prefill."""
    calls = []
    monkeypatch.setattr(teacher, "prefill", lambda *a: calls.append(a))
    code, line = one_line_error(lambda: teacher.main(["--teacher", str(short), "--shots", "4", "--limit", "2", "--n", "2",
                                                      "--out", str(tmp_path / "c.jsonl")]), capsys)
    assert code == 1 and not calls
    assert "the few-shot header (--shots 4: " in line and "needs" in line and "the model has 128 (max_position_embeddings" in line
    assert "use fewer --shots" in line


def test_a_question_that_does_not_fit_after_the_header_is_named_by_file_and_line(short, tmp_path, capsys):
    header = tmp_path / "header.txt"
    header.write_text("Answer the question.\n\n")
    code, line = one_line_error(lambda: teacher.main([
        "--teacher", str(short), "--prompt", str(header), "--limit", "3", "--n", "2", "--max-new-tokens", "100",
        "--out", str(tmp_path / "c.jsonl")]), capsys)
    assert code == 1 and f"{data.DEFAULT_TRAIN}:" in line and "+ --max-new-tokens" in line and "has 128" in line
    where, question = line.removeprefix("error: ").split(": question ")
    n = int(where.rsplit(":", 1)[1])
    assert json.loads(gzip.open(data.DEFAULT_TRAIN, "rt").read().splitlines()[n - 1])["id"] == question.split("'")[1]
    assert not (tmp_path / "c.jsonl").exists()


def test_scoring_and_socratic_headers_are_checked_too(short, tmp_path, capsys):
    code, line = one_line_error(lambda: teacher.main(["--teacher", str(short), "--socratic", "--limit", "2",
                                                      "--out", str(tmp_path / "s.jsonl")]), capsys)
    assert code == 1 and "the few-shot header (the 4-shot sub-question header: " in line
    code, line = one_line_error(lambda: teacher.main(["--teacher", str(short), "--score", str(data.DEFAULT_DEV),
                                                      "--shots", "4", "--out", str(tmp_path / "sc.jsonl")]), capsys)
    assert code == 1 and "the few-shot header (--shots 4: " in line


def test_evaluate_with_few_shot_prompts_longer_than_the_model_is_named_by_file_and_line(short, tmp_path, capsys):
    code, line = one_line_error(lambda: evaluate.main(["--checkpoint", str(short), "--fewshot", "4", "--limit", "3",
                                                       "--n", "0", "--out", str(tmp_path / "e")]), capsys)
    assert code == 1 and f"{data.DEFAULT_DEV}:" in line and "with 4 worked examples + --max-new-tokens 96" in line
    assert "has 128" in line and "use fewer --fewshot examples or lower --max-new-tokens" in line
    assert not list((tmp_path / "e").glob("partial-*"))  # refused before the journal was started


def test_training_rows_longer_than_the_model_are_counted_skips_and_dev_questions_are_checked(tmp_path, capsys):
    tiny = tiny_student(tmp_path / "t", positions=170)  # CSQA examples are 131-214 tokens long for it; prompts ~100
    train.main(["--init", str(tiny), "--out", str(tmp_path / "o"), "--max-steps", "1", *TRAIN_FLAGS[:-4],
                "--eval-questions", "0"])
    assert "x longer than the model's 170 positions (max_position_embeddings; --max-len is 256)" in capsys.readouterr().out
    code, line = one_line_error(lambda: train.main(["--init", str(tiny), "--out", str(tmp_path / "p"), "--max-steps", "1",
                                                    *TRAIN_FLAGS]), capsys)
    assert code == 1 and f"{data.DEFAULT_TRAIN}:" in line and "a dev question: " in line and "has 170" in line


def test_an_opt_config_with_more_positions_than_its_weights_is_named(tmp_path):
    folder = tiny_student(tmp_path / "opt", model_type="opt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1024}))
    with pytest.raises(checkpoint.CheckpointError, match="max_position_embeddings 1,024 is more positions than the "
                                                         "weights hold: 512"):
        checkpoint.from_pretrained(folder)


def test_an_empty_prompt_file_is_refused(student, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    code, line = one_line_error(lambda: teacher.main(["--teacher", str(student), "--prompt", str(empty),
                                                      "--out", str(tmp_path / "c.jsonl")]), capsys)
    assert code == 1 and f"{empty}: the --prompt file has no text" in line


# -----------------------------------------------------------------------------
# Writes that fail, inside a library: one line naming the file and the cause, nothing half-written left


def test_the_safetensors_writer_failing_on_the_first_checkpoint_ends_in_one_line(student, tmp_path, capsys, monkeypatch):
    def full_disk(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "o"
    code, line = one_line_error(lambda: train.main(["--init", str(student), "--out", str(out), "--max-steps", "2",
                                                    *TRAIN_FLAGS]), capsys)
    assert code == 1 and line.startswith(f"error: {out / 'best' / 'model.safetensors'}: cannot write it (Error while "
                                         "serializing: I/O error: File too large")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "args.json", "metrics.jsonl"]  # no folder, no .tmp


def test_a_real_file_size_limit_on_the_first_checkpoint(student, tmp_path):
    """ulimit -f: the kernel refuses to grow model.safetensors past 64 KiB (EFBIG, SIGXFSZ ignored as shells do)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "train.py", "--init", str(student), "--out", str(out), "--max-steps", "1",
                        *TRAIN_FLAGS], cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                       env=dict(os.environ, SCOTD_CACHE=str(tmp_path / "cache")))
    err = [line for line in r.stderr.splitlines() if not line.startswith("train ")]  # the progress bar's lines
    assert r.returncode == 1 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert err[0].startswith(f"error: {out / 'best' / 'model.safetensors'}: cannot write it (") and "too large" in err[0]
    assert not [p for p in out.iterdir() if p.is_dir()]


def test_a_failed_save_leaves_the_previous_checkpoint_whole(student, tmp_path, capsys, monkeypatch):
    """torch.save of trainer_state.pt failing at the second save of `last`: `last` is still the first one, whole."""
    out, saves = tmp_path / "o", []
    real = torch.save

    def fails_second_time(obj, path, *a, **k):
        saves.append(path)
        if len(saves) == 2:
            real(obj, path, *a, **k)
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 512")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", fails_second_time)
    code, line = one_line_error(lambda: train.main(["--init", str(student), "--out", str(out), "--max-steps", "3",
                                                    "--save-every", "1", *TRAIN_FLAGS]), capsys)
    assert code == 1 and line.startswith(f"error: {out / 'last' / train.STATE_FILE}: cannot write it ([enforce fail")
    assert json.loads((out / "last" / "scotd.json").read_text())["step"] == 1
    assert torch.load(out / "last" / train.STATE_FILE, weights_only=True)["step"] == 1
    checkpoint.from_pretrained(out / "last")
    assert not list(tmp_path.glob("o/*.tmp")) and not list(tmp_path.glob("o/*.old"))


def test_best_holds_weights_only_and_last_the_state_to_resume(student, tmp_path):
    out = train.main(["--init", str(student), "--out", str(tmp_path / "o"), "--max-steps", "2", *TRAIN_FLAGS])
    assert (out / "last" / train.STATE_FILE).is_file() and not (out / "best" / train.STATE_FILE).exists()
    checkpoint.from_pretrained(out / "best")
    with pytest.raises(SystemExit):
        train.get_args(["--init", str(student), "--out", str(out), "--resume", str(out / "best"), *TRAIN_FLAGS])


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"), zlib.error("Error -3 while compressing")])
def test_a_corpus_write_that_fails_keeps_the_previous_file(tmp_path, fault, monkeypatch):
    path = tmp_path / "c.jsonl.gz"
    records = data.read_corpus(data.DEFAULT_DEV)[:5]
    data.write_corpus(records, path)
    before = path.read_bytes()

    def broken(self, *a):
        raise fault
    monkeypatch.setattr(gzip.GzipFile, "write", broken)
    with pytest.raises(WriteError, match=rf"{path}: cannot write it \({fault.strerror if isinstance(fault, OSError) else 'Error -3'}"):
        data.write_corpus(records[:2], path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_plot_that_fails_to_write_is_named(tmp_path, monkeypatch):
    import matplotlib.figure

    def broken(self, *a, **k):
        raise ValueError("Image size of 100000x400 pixels is too large")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(WriteError, match="loss.png: cannot write it \\(Image size"):
        report.plot_lines(tmp_path / "loss.png", {"a": ([1, 2], [3, 4])}, "x", "y", "t")
    assert not list(tmp_path.iterdir())


def test_a_teacher_append_that_fails_halfway_leaves_whole_records_and_resumes(student, tmp_path, monkeypatch):
    """The disk fills up in the middle of the second batch's records: the half batch is cut off again, the
    error names the corpus, and the rerun gives the uninterrupted file."""
    argv = lambda out: ["--teacher", str(student), "--out", str(out), "--limit", "5", "--n", "2", "--shots", "1",  # noqa: E731
                        "--batch-size", "2", "--max-new-tokens", "8"]
    straight = teacher.main(argv(tmp_path / "a.jsonl"))
    out, real, appends = tmp_path / "b.jsonl", os.write, []

    def half_then_full(fd, payload):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(out.resolve()):
            appends.append(len(payload))
            if len(appends) == 2:
                real(fd, bytes(payload[:len(payload) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, payload)
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(WriteError, match=f"{out}: cannot write it \\(No space left on device\\)"):
        teacher.main(argv(out))
    assert len(out.read_text().splitlines()) == 2 and out.read_text().endswith("\n")
    monkeypatch.setattr(os, "write", real)
    teacher.main(argv(out))
    assert out.read_bytes() == straight.read_bytes()


def test_files_get_the_mode_a_plain_open_gives(student, tmp_path):
    """Was: model.safetensors written 0600 (a temporary file's mode), its siblings 0644."""
    folder = checkpoint.save_pretrained(checkpoint.from_pretrained(student), tmp_path / "m")
    plain = tmp_path / "plain"
    plain.write_text("x")
    want = plain.stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {p.name: want for p in folder.iterdir()}
    assert fileio.write_text(tmp_path / "t.json", "{}").stat().st_mode & 0o777 == want


# -----------------------------------------------------------------------------
# Ids that repeat


def duplicated(tmp_path):
    records = data.read_corpus(data.DEFAULT_TRAIN)[:6]
    records[4]["id"] = records[1]["id"]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records[1]["id"]


def test_repeated_ids_are_refused_in_train_teacher_and_evaluate_inputs(student, tmp_path):
    path, id = duplicated(tmp_path)
    message = f"{path}:5: id {id!r} repeats line 2"
    with pytest.raises(CorpusError, match=message):
        train.main(["--init", str(student), "--data", str(path), "--out", str(tmp_path / "o"), *TRAIN_FLAGS])
    with pytest.raises(CorpusError, match=message):
        teacher.main(["--teacher", str(student), "--data", str(path), "--shots", "0", "--out", str(tmp_path / "c.jsonl")])
    with pytest.raises(CorpusError, match=message):
        evaluate.main(["--checkpoint", str(student), "--data", str(path), "--out", str(tmp_path / "e")])
    with pytest.raises(CorpusError, match=message):
        train.main(["--init", str(student), "--dev-data", str(path), "--out", str(tmp_path / "d"), *TRAIN_FLAGS])


def test_importers_refuse_repeated_ids_in_the_source(tmp_path):
    folder = tmp_path / "dsbs"
    (folder / "llm").mkdir(parents=True)
    q = {"id": "x1", "question": "Q?", "choices": ["a", "b"], "answer": "a"}
    (folder / "cqa_train.json").write_text(json.dumps(q) + "\n" + json.dumps(q | {"question": "Other?"}) + "\n")
    (folder / "llm" / "train_CoT_0.json").write_text(json.dumps(["So the answer is a.", "So the answer is b."]))
    with pytest.raises(CorpusError, match=f"{folder / 'cqa_train.json'}:2: id 'x1' repeats line 1"):
        data.import_dsbs(folder, "train", data.Skips())
    scotd_q = {"id": "y", "question": {"stem": "Q?", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": "b"}]},
               "answerKey": "A"}
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(scotd_q) + "\n" + json.dumps(scotd_q) + "\n")
    (tmp_path / "r.json").write_text("[]")
    with pytest.raises(CorpusError, match=f"{questions}:2: id 'y' repeats line 1"):
        data.import_scotd(tmp_path / "r.json", questions, data.Skips())


# -----------------------------------------------------------------------------
# Settings declared once; progress off a terminal


def test_every_train_flag_has_a_resume_policy_and_a_changed_must_match_flag_is_refused(student, tmp_path, capsys):
    """The parser is built from RunConfig's fields; each says what --resume may do with it. For every MATCH flag,
    a resume with another value is refused, naming the flag (an alternative value derived from its declaration)."""
    settings = {f.name: f for f in flags.SETTINGS}
    for action in train.parser()._actions:
        if action.dest != "help":
            assert settings[action.dest].metadata["resume"] in (cli.MATCH, cli.MAY_CHANGE, cli.NOT_SAVED), action.dest
    plain = ["--init", str(student), "--out", str(tmp_path / "o"), "--rationales-per-question", "2", "--lora", "2"]
    last = tmp_path / "o" / "last"
    last.mkdir(parents=True)
    (last / train.STATE_FILE).write_bytes(b"")
    other_model, third_model = tmp_path / "other", tmp_path / "third"
    for folder in (other_model, third_model):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    local, served = ["--on-policy", "--teacher", str(other_model)], ["--on-policy", "--teacher-api", "http://127.0.0.1:1",
                                                                     "--teacher-model", "t"]
    # a flag that needs another (--kd-temperature: --kd) is changed in a run that has it
    needs = {"kd_temperature": ["--kd", "0.5"], "teacher_api": served, "teacher_model": served} | {
        name: local for name in ("teacher", "on_policy_n", "on_policy_mix", "beta", "temperature", "max_new_tokens",
                                 "teacher_shots")}

    def another(f):
        kw = f.metadata["argparse"]
        if f.name in ("init", "data", "teacher", "teacher_api"):
            return [{"init": str(other_model), "data": str(data.DEFAULT_DEV), "teacher": str(third_model),
                     "teacher_api": "http://127.0.0.1:2"}[f.name]]
        if f.name == "on_policy":
            return ["--teacher", str(other_model)]
        if "choices" in kw:
            return [next(c for c in kw["choices"] if c != f.default)]
        if kw.get("action") == "store_true":
            return []
        if "type" not in kw:  # a string
            return ["q_proj"]
        default = f.default or (2 if f.name in ("rationales_per_question", "lora") else 1)
        return [str(default + 1 if kw["type"] in (int, cli.positive_int, cli.nonneg_int) else default / 2)]
    for name in flags.MUST_MATCH:
        flag = f"--{name.replace('_', '-')}"
        base = plain + needs.get(name, [])
        (last / "scotd.json").write_text(json.dumps(train.get_args(base + ["--overwrite"]).info()))
        assert train.get_args(base + ["--resume"]).changed == ()
        argv = [a for i, a in enumerate(base) if flag not in (a, base[i - 1])]
        with pytest.raises(SystemExit) as e:
            train.get_args(argv + [flag, *another(settings[name]), "--resume"])
        assert e.value.code == 2 and f"was trained with other flags: {flag} " in capsys.readouterr().err, name


def test_progress_off_a_terminal_prints_plain_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        bar = report.Progress(100, "train", stream=stream, log_every=0.0)
        for _ in range(100):
            bar.update(1, "loss 1.0")
        bar.close()
        written = stream.getvalue()
        bar.close()  # a second close (the loop's `closing` after a stop closed it) draws nothing more
        assert stream.getvalue() == written
    assert "\r" not in log.getvalue() and log.getvalue().splitlines()[-1].startswith("train 100% |")
    assert max(map(len, log.getvalue().splitlines())) < 120
    assert tty.getvalue().count("\r") > 1 and tty.getvalue().count("\n") == 1


# -----------------------------------------------------------------------------
# Round 4: a predictions file cut short or with an empty chains list; SIGTERM to evaluate.py, data.py and bench/

PINNED = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}  # same sums under load


def predictions_file(path, questions=5, chains=3):
    """A predictions file as evaluate.py writes it (its rows' shape), questions whose chains vote a, b, a ..."""
    rows = []
    for i in range(questions):
        answers = ["a", "b", None][: chains] if i % 2 else ["a"] * chains
        rows.append({"id": f"q{i}", "gold": "a", "greedy": {"text": " So the answer is (a).", "answer": "a"},
                     "greedy_correct": True, "chains": [{"text": "x", "answer": a, "tokens": 4, "logprob": -1.0}
                                                        for a in answers],
                     "vote": "a", "vote_correct": True})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_predictions_file_cut_at_every_byte_of_its_last_line_is_never_reported_as_whole(tmp_path, capsys):
    """--report on a copy cut short: at every byte of the last line the file reads as "4 of 5 lines, line 5 cut"
    (a cut at the line's first byte as "4 of 5 questions", from the summary beside it); cut only before its final
    newline, the file is whole. Through main: the warning, the table's header and the summary say so."""
    whole = predictions_file(tmp_path / "predictions-x.jsonl")
    evaluate.main(["--report", str(whole)])  # the summary beside it counts 5 questions
    text = whole.read_bytes()
    start = text.rstrip(b"\n").rfind(b"\n") + 1
    assert evaluate.read_predictions(whole, 5)[1] is None
    for end in range(start, len(text)):
        cut = tmp_path / "cut" / whole.name
        cut.parent.mkdir(exist_ok=True)
        cut.write_bytes(text[:end])
        rows, incomplete = evaluate.read_predictions(cut, 5)
        if end == len(text) - 1:  # only the newline lost: every row is there
            assert (len(rows), incomplete) == (5, None)
        elif end == start:
            assert (len(rows), incomplete) == (4, "4 of 5 questions (its summary counted 5)")
        else:
            assert (len(rows), incomplete) == (4, "4 of 5 lines, line 5 cut"), end
    capsys.readouterr()
    cut.write_bytes(text[:start + 7])
    (cut.parent / "summary-x.json").unlink(missing_ok=True)
    evaluate.main(["--report", str(cut), "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert f"warning   {cut}: 4 of 5 lines, line 5 cut: the report covers only the questions it holds" in out
    assert "\n4 questions (4 of 5 lines, line 5 cut) from x" in out
    assert json.loads((tmp_path / "r" / "summary-x.json").read_text())["incomplete"] == "4 of 5 lines, line 5 cut"
    cut.write_bytes(text[:start + 7] + "é".encode()[:1])  # cut inside a multi-byte character
    assert evaluate.read_predictions(cut)[1] == "4 of 5 lines, line 5 cut"


def test_a_question_with_no_chains_is_an_abstention_and_a_bad_line_is_named(tmp_path, capsys):
    path = predictions_file(tmp_path / "predictions-x.jsonl", questions=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1] |= {"chains": [], "vote": None, "vote_correct": False}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate.main(["--report", str(path)])
    summary = json.loads((tmp_path / "summary-x.json").read_text())
    assert summary["questions"] == 4 and summary["questions_without_chains"] == 1
    assert summary["vote_acc"] == 0.75  # no vote: wrong, not left out
    assert summary["maj_at_k"][-1] == (1 + 0 + 1 + 0.5) / 4  # the last question's a / b tie counts half
    assert "| questions with no chains (counted as abstentions, no vote) | 1 |" in capsys.readouterr().out
    for change, message in [({"chains": "a"}, "'chains' must be a list of"),
                            ({"chains": [{"answer": "a"}]}, "'chains' must be a list of"),
                            ({"greedy": None, "greedy_correct": None}, None)]:
        bad = dict(rows[2]) | change
        if message is None:  # a row without the greedy part, beside rows with one
            del bad["greedy"], bad["greedy_correct"]
            message = "lacks 'greedy', which the first line has"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + [bad] + rows[3:]))
        with pytest.raises(evaluate.InputError, match=rf"^{path}:3: {message}"):
            evaluate.main(["--report", str(path)])


def test_sigterm_to_a_running_evaluation_stops_it_cleanly_and_the_same_command_continues(student, tmp_path):
    """A real SIGTERM to evaluate.py once a batch is journaled (whatever it is doing then): exit 143, a line that
    says what is kept and how to continue; the same command then writes what one uninterrupted run writes."""
    argv = [sys.executable, "evaluate.py", "--checkpoint", str(student), "--limit", "16", "--n", "2",
            "--temperature", "1.0", "--batch-size", "1", "--max-new-tokens", "16", "--seed", "5"]
    stem = "csqa_palm_validation"
    whole = subprocess.run(argv + ["--out", str(tmp_path / "whole")], cwd=ROOT, env=PINNED, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out, journal = tmp_path / "cut", tmp_path / "cut" / f"partial-{stem}.jsonl"
    proc = subprocess.Popen(argv + ["--out", str(out)], cwd=ROOT, env=PINNED, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not (journal.exists() and len(journal.read_bytes().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    kept = len(journal.read_text().splitlines()) - 1
    assert f"stopped: {kept} finished batches kept in {journal}; run the same command to continue" in stdout
    assert "Traceback" not in stderr and not (out / f"predictions-{stem}.jsonl").exists()
    again = subprocess.run(argv + ["--out", str(out)], cwd=ROOT, env=PINNED, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and f"resume    {kept} finished batches" in again.stdout, again.stderr[-2000:]
    for name in (f"predictions-{stem}.jsonl",):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_ctrl_c_inside_a_decode_step_of_evaluate_exits_130_and_keeps_the_journal(student, tmp_path, monkeypatch,
                                                                                capsys):
    """Ctrl-C as a terminal delivers it. (A process started in the background by a non-interactive shell, as a CI
    runner may start pytest, inherits SIGINT ignored -- POSIX shells do that to background jobs -- so the test puts
    Python's own handler in place for its duration.)"""
    import sample
    signal_on_call(monkeypatch, sample, "next_token", 30, signal.SIGINT)
    out = tmp_path / "e"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", str(student), "--limit", "8", "--n", "2", "--batch-size", "2",
                           "--max-new-tokens", "8", "--out", str(out)])
    finally:
        signal.signal(signal.SIGINT, previous)
    journal = out / "partial-csqa_palm_validation.jsonl"
    lines = journal.read_text().splitlines()
    assert e.value.code == 130 and all(json.loads(line) for line in lines)
    assert f"stopped: {len(lines) - 1} finished batches kept in {journal}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the run


def test_sigterm_while_an_importer_writes_keeps_whole_files_only(tmp_path, monkeypatch, capsys):
    """data.py import-gsm8k stopped by SIGTERM after its train split is written: exit 143; the train file whole,
    no test file, not even half of one; the line says which files are whole."""
    src = tmp_path / "gsm8k"
    src.mkdir()
    for split in ("train", "test"):
        (src / f"{split}.jsonl").write_text("".join(json.dumps(
            {"question": f"{split} {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}) + "\n"
            for i in range(3)))
    real = data.write_corpus

    def stopped_on_the_second(records, path):
        if "test" in Path(path).name:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(records, path)

    monkeypatch.setattr(data, "write_corpus", stopped_on_the_second)
    monkeypatch.setattr(sys, "argv", ["data.py", "import-gsm8k", str(src), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        cli.run(data.main)
    train_file = tmp_path / "out" / data.GSM8K_TRAIN.name
    assert e.value.code == 143 and len(data.read_corpus(train_file)) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [train_file.name]
    assert f"stopped: written whole: {train_file}; run the same command to continue" in capsys.readouterr().out


def test_sigterm_to_the_benchmark_kills_its_worker_and_says_what_is_kept(tmp_path, monkeypatch, capsys):
    """bench.py's suite stopped by SIGTERM while a worker process runs: exit 143, the worker killed (no
    orphan measuring on), the line names the --results file that holds each measurement so far."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench
    pid_file = tmp_path / "worker.pid"

    def suite(args, device, dtype):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        pid_file.write_text(str(child.pid))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            child.wait()
        finally:
            child.kill()
            child.wait()

    monkeypatch.setattr(bench, "suite", suite)
    results = tmp_path / "r.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--results", str(results), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        cli.run(bench.main)
    assert e.value.code == 143
    assert f"stopped: each measurement so far is in {results}; run the same command to continue" in \
        capsys.readouterr().out
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
