"""What the commands write: one writer per output (a second process is refused, naming the holder; a lock of a
killed process is free), durable writes (fsync'd in the right order), and an output that cannot be written
refused before any model loads. train.py's own race is in test_train.py."""

import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import evaluate
import fileio
import teacher
from helpers import tiny_student

ROOT = checkpoint.Path(checkpoint.__file__).resolve().parent
HOLD = """
import sys, time
import fileio
with fileio.one_writer(sys.argv[1], folder=sys.argv[2] == "folder"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def holder(path, kind):
    """Another process holding `path`'s lock, as a live run would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), kind], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def no_model_loads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(teacher, "from_pretrained", refuse)
    monkeypatch.setattr(evaluate, "from_pretrained", refuse)


def teach(student, out, *extra):
    return teacher.main(["--teacher", str(student), "--out", str(out), "--limit", "4", "--n", "2", "--shots", "1",
                         "--batch-size", "2", "--max-new-tokens", "6", *extra])


def judge(student, out, *extra):
    return evaluate.main(["--checkpoint", str(student), "--out", str(out), "--limit", "4", "--n", "2",
                          "--batch-size", "2", "--max-new-tokens", "6", *extra])


@pytest.mark.parametrize("command", ["teacher", "evaluate"])
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_ones_lock_is_free(student, tmp_path, monkeypatch,
                                                                                     command):
    out = tmp_path / ("c.jsonl" if command == "teacher" else "eval")
    proc = holder(out, "file" if command == "teacher" else "folder")
    try:
        no_model_loads(monkeypatch)
        with pytest.raises(fileio.Busy, match=rf"^{out}: another process \(pid {proc.pid}\) is writing there") as e:
            (teach if command == "teacher" else judge)(student, out)
        assert e.value.exit_code == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == (["c.jsonl.lock"] if command == "teacher" else ["eval"])
        assert command == "teacher" or [p.name for p in out.iterdir()] == [".lock"]  # nothing else touched
    finally:
        proc.kill()
        proc.wait()
    monkeypatch.undo()
    (teach if command == "teacher" else judge)(student, out)  # the dead holder's lock is taken over
    assert (out.exists() if command == "teacher" else any(out.glob("predictions-*.jsonl")))


def test_an_output_that_cannot_be_written_is_refused_before_a_model_loads(student, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    no_model_loads(monkeypatch)
    with pytest.raises(fileio.Busy, match=rf"^{blocker}/c\.jsonl: cannot write there"):
        teach(student, blocker / "c.jsonl")
    with pytest.raises(fileio.Busy, match=rf"^{blocker}/eval: cannot write there"):
        judge(student, blocker / "eval")
    r = subprocess.run([sys.executable, "teacher.py", "--teacher", str(student), "--out", str(blocker / "c.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {blocker}/c.jsonl: cannot write there")


def recording_fsync(monkeypatch):
    """os.fsync, recording the path of each file or folder it flushes."""
    calls, real = [], os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_checkpoint_is_fsynced_file_by_file_then_its_folder_then_the_rename(tmp_path, monkeypatch):
    calls = recording_fsync(monkeypatch)
    folder = tmp_path / "last"
    for _ in range(2):  # a first write, then a swap over it
        calls.clear()
        checkpoint.write_folder(folder, {"w": torch.ones(2)}, {"model_type": "llama"},
                                files={"trainer_state.pt": lambda p: torch.save({"step": 1}, p), "scotd.json": "{}"})
        tmp = f"{folder}.tmp"
        assert sorted(calls[:4]) == [f"{tmp}/config.json", f"{tmp}/model.safetensors", f"{tmp}/scotd.json",
                                     f"{tmp}/trainer_state.pt"] and calls[4:] == [tmp, str(tmp_path)]


def test_corpus_and_journal_lines_are_fsynced_after_each_batch(student, tmp_path, monkeypatch):
    calls = recording_fsync(monkeypatch)
    out = teach(student, tmp_path / "c.jsonl")
    assert calls.count(str(out)) == 2  # 4 questions, 2 a batch
    calls.clear()
    batches, add = [], evaluate.Journal.add
    monkeypatch.setattr(evaluate.Journal, "add", lambda self, *a: (batches.append(a[:2]), add(self, *a))[1])
    judge(student, tmp_path / "eval")
    journal = str(tmp_path / "eval" / "partial-csqa_palm_validation.jsonl")
    assert len(batches) >= 3 and calls.count(journal) == len(batches)  # greedy's and the sampled chains' batches
