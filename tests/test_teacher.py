"""teacher.py: N rationales per question from a local teacher, written as they finish; a run stopped by
Ctrl-C or cut mid-line by a kill resumes to the uninterrupted file, byte for byte."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import cli
import data
import sample
import teacher
from checkpoint import from_pretrained, load_tokenizer
from helpers import stop_after_first_batch, tiny_student
from scotd import format_query

N_QUESTIONS, N_CHAINS = 7, 3


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def run(student, out, *extra):
    return teacher.main(["--teacher", str(student), "--out", str(out), "--limit", str(N_QUESTIONS), "--n", str(N_CHAINS),
                         "--shots", "2", "--batch-size", "2", "--max-new-tokens", "12", "--seed", "3", *extra])


@pytest.fixture(scope="module")
def straight(student, tmp_path_factory):
    return run(student, tmp_path_factory.mktemp("straight") / "c.jsonl")


def test_writes_n_rationales_per_question_in_the_canonical_format(straight):
    records = data.read_corpus(straight)  # validates every record
    assert len(records) == N_QUESTIONS and all(len(r["rationales"]) == N_CHAINS for r in records)
    assert all(set(x) == {"text", "prediction", "correct", "teacher_logprob", "teacher_tokens"} for r in records for x in r["rationales"])
    meta = json.loads(straight.with_name(straight.name + ".meta.json").read_text())
    exemplars = set(meta["exemplar_ids"])
    assert len(exemplars) == 2 and not exemplars & {r["id"] for r in records}  # prompt questions left out
    assert meta["sampling"]["n"] == N_CHAINS and meta["prompt"].count("So the answer is") == 2


def test_ctrl_c_then_rerun_gives_the_uninterrupted_file(student, straight, tmp_path, monkeypatch):
    out = tmp_path / "c.jsonl"
    real = teacher.CorpusWriter.__call__
    calls = {"n": 0}

    def interrupt_after_two_batches(self, indices, outs):
        real(self, indices, outs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(teacher.CorpusWriter, "__call__", interrupt_after_two_batches)
    with pytest.raises(SystemExit) as e:
        run(student, out)
    assert e.value.code == 130 and len(out.read_text().splitlines()) == 4
    monkeypatch.setattr(teacher.CorpusWriter, "__call__", real)
    run(student, out)
    assert out.read_bytes() == straight.read_bytes()
    runs = data.run_totals(out)  # a running total after every batch; the last of an invocation is its total
    assert [r["questions"] for r in runs] == [4, len(straight.read_text().splitlines()) - 4]
    assert all(r["seconds"] > 0 and r["generated_tokens"] > 0 for r in runs), runs
    Path(str(out) + ".runs.jsonl").unlink()
    run(student, out)  # nothing left to sample: nothing recorded, not even an empty runs file
    assert not Path(str(out) + ".runs.jsonl").exists()


def test_sigterm_mid_decode_stops_cleanly_and_keeps_the_time(student, straight, tmp_path, monkeypatch):
    """A kill (SIGTERM) arriving in the middle of the second batch's decoding: exit 143, the first batch's
    questions are in the file and its time in runs.jsonl; the rerun completes the uninterrupted file."""
    out = tmp_path / "c.jsonl"
    real = sample.next_token
    steps_after_first_batch = {"n": 0}

    def kill_mid_decode(*a, **k):
        if out.exists() and len(out.read_text().splitlines()) == 2:
            steps_after_first_batch["n"] += 1
            if steps_after_first_batch["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(sample, "next_token", kill_mid_decode)
    with pytest.raises(SystemExit) as e:
        run(student, out)
    assert e.value.code == 143 and steps_after_first_batch["n"] == 3
    assert len(out.read_text().splitlines()) == 2
    assert [r["questions"] for r in data.run_totals(out)] == [2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the run
    monkeypatch.setattr(sample, "next_token", real)
    run(student, out)
    assert out.read_bytes() == straight.read_bytes()


def test_half_written_last_line_is_redone(student, straight, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    whole = straight.read_bytes()
    lines = whole.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]) + lines[3][:25])  # killed inside line 4 (the second of batch 1)
    (tmp_path / "c.jsonl.meta.json").write_text(straight.with_name(straight.name + ".meta.json").read_text())
    run(student, out)
    assert "dropped a half-written last line" in capsys.readouterr().out
    assert out.read_bytes() == whole


def test_changed_settings_are_refused(student, straight, tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_bytes(straight.read_bytes())
    (tmp_path / "c.jsonl.meta.json").write_text(straight.with_name(straight.name + ".meta.json").read_text())
    with pytest.raises(teacher.InputError, match=r"c\.jsonl\.meta\.json: .* was sampled with other settings"):
        run(student, out, "--temperature", "0.5")


def test_header_is_prefilled_once(student, tmp_path, monkeypatch):
    caches = []
    real = sample.KVCache.__init__

    def recording(self, *a, **k):
        real(self, *a, **k)
        caches.append(self)
    monkeypatch.setattr(sample.KVCache, "__init__", recording)
    run(student, tmp_path / "c.jsonl")
    header, *batches = caches
    assert header.shared is None and header.batch_size == 1  # one cache of its own: the header's, prefilled once
    assert batches and all(c.shared is header for c in batches)  # every batch attends to it, no copy


def test_settings_record_paths_as_any_clone_would(student, straight, tmp_path, monkeypatch):
    """The teacher and data paths in <out>.meta.json are repository-relative or "~/...", so a corpus sampled in
    one clone (or cwd) resumes in another; given another way (relative to another cwd), the same file matches."""
    meta = json.loads(straight.with_name(straight.name + ".meta.json").read_text())
    assert meta["data"] == "data/csqa_palm_train.jsonl.gz"
    assert cli.portable(Path.home() / "x" / ".." / "y") == "~/y" and cli.portable("/") == "/"
    out = tmp_path / "c.jsonl"
    out.write_bytes(straight.read_bytes())
    (tmp_path / "c.jsonl.meta.json").write_text(straight.with_name(straight.name + ".meta.json").read_text())
    monkeypatch.chdir(cli.ROOT / "tests")
    run(student, out, "--data", "../data/csqa_palm_train.jsonl.gz")
    assert out.read_bytes() == straight.read_bytes()


def test_score_adds_the_teachers_logprob_of_each_chain_and_resumes(student, straight, tmp_path, monkeypatch):
    """teacher.py --score: every rationale of a corpus gets teacher_logprob / teacher_tokens, its chain (the
    rationale, then its answer sentence) scored under the teacher with the same few-shot prompt -- equal to a
    plain forward pass (1e-4); a run stopped after its first batch resumes to the uninterrupted file."""
    def score(out):
        return teacher.main(["--teacher", str(student), "--score", str(straight), "--out", str(out), "--shots", "2",
                             "--batch-size", "3"])
    whole = score(tmp_path / "whole.jsonl")
    model, tok = from_pretrained(student), load_tokenizer(student)
    header = json.loads(Path(str(straight) + ".meta.json").read_text())["prompt"]
    scored, source = data.read_corpus(whole), data.read_corpus(straight)
    assert [r["id"] for r in scored] == [r["id"] for r in source]
    for rec, orig in zip(scored, source):
        assert [r["text"] for r in rec["rationales"]] == [r["text"] for r in orig["rationales"]]
        prompt = tok.encode(header).ids + tok.encode(format_query(rec["question"], rec["choices"]), add_special_tokens=False).ids
        for r in rec["rationales"]:
            chain = tok.encode(teacher.chain_text(rec, r), add_special_tokens=False).ids
            with torch.no_grad():
                logp = model(torch.tensor([prompt + chain]))[0][0].float().log_softmax(-1)
            want = sum(logp[t - 1, (prompt + chain)[t]].item() for t in range(len(prompt), len(prompt) + len(chain)))
            assert r["teacher_tokens"] == len(chain) and r["teacher_logprob"] == pytest.approx(want, abs=1e-4)
    out = tmp_path / "cut.jsonl"
    real = stop_after_first_batch(monkeypatch, teacher, "chain_logprobs")
    with pytest.raises(SystemExit) as e:
        score(out)
    assert e.value.code == 130 and len(out.read_text().splitlines()) == 3
    monkeypatch.setattr(teacher, "chain_logprobs", real)
    score(out)
    assert out.read_bytes() == whole.read_bytes()
