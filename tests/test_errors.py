"""Bad input ends a run with one clear line and an exit code, never a traceback (unless SCOTD_DEBUG=1).

Classes covered: flags (exit 2, before any model loads), corpus files (exit 1, file:line), checkpoints
(exit 1, file or tensor), tokenizers (exit 1, file), trainer state (exit 1, file); skippable records
are counted by reason; a corrupt token cache is rebuilt."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import evaluate
import train
from checkpoint import CheckpointError, from_pretrained, load_tokenizer
from data import CorpusError, Skips
from helpers import tiny_student

ROOT = train.Path(train.__file__).resolve().parent
REC = {"id": "q1", "question": "Where do beavers get supplies?", "choices": ["zoo", "wooded area", "lake"],
       "answer": "wooded area", "rationales": [{"text": "Beavers use wood.", "prediction": "wooded area", "correct": True}]}


def cli(*args, env=None):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


# -----------------------------------------------------------------------------
# Flags: argparse-style message, exit 2, before anything loads


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--max-steps", "0"], "argument --max-steps: must be >= 1, got 0"),
    (["--lr", "nan"], "argument --lr: must be > 0, got nan"),
    (["--lr=-1e-4"], "argument --lr: must be > 0, got -1e-4"),
    (["--grad-accum", "x"], "argument --grad-accum: expected an integer, got 'x'"),
    (["--min-lr-ratio", "2"], "argument --min-lr-ratio: must be in [0, 1], got 2"),
    (["--data", "nowhere.jsonl"], "argument --data: no such file: nowhere.jsonl"),
    (["--init", "no/such/folder"], "argument --init: no/such/folder is not a model folder"),
    (["--resume", "no/such/ckpt"], "argument --resume: no/such/ckpt/trainer_state.pt not found"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N"),
    (["--resume", "--overwrite"], "--overwrite and --resume exclude each other"),
    (["--select", "likely"], "argument --select: choose K with --rationales-per-question"),
    (["--select", "best", "--rationales-per-question", "2"], "argument --select: invalid choice: 'best'"),
])
def test_train_flags_are_checked_up_front(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.get_args(["--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["--limit", "-1"], "argument --limit: must be >= 0, got -1"),
    (["--n", "-2"], "argument --n/--chains: must be >= 0, got -2"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["--checkpoint", "no/such/ckpt"], "argument --checkpoint: no/such/ckpt is not a model folder"),
    (["--checkpoint", "no/such"], "argument --checkpoint: no/such is not a folder here, nor in the Hugging Face cache"),
])
def test_evaluate_flags_are_checked_up_front(argv, message, capsys, student):
    with pytest.raises(SystemExit) as e:
        evaluate.get_args(["--checkpoint", str(student), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_flag_from_the_command_line_exits_2_at_once():
    """The hang of --batch-size -1 and the silent --batch-size 0 are gone: usage error, no model loaded."""
    code, out, err = cli("train.py", "--batch-size", "-1")
    assert code == 2 and "argument --batch-size: must be >= 1, got -1" in err
    assert "Traceback" not in err and "converting" not in out and "model " not in out


# -----------------------------------------------------------------------------
# Corpus files: fatal, one line naming file:line


def write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = json.dumps(REC) + "\n"


def goods(k):
    """k good records, each with an id of its own."""
    return "".join(json.dumps(REC | {"id": f"q{i}"}) + "\n" for i in range(k))


@pytest.mark.parametrize("name,content,message", [
    ("c.jsonl", GOOD + '{"id": "q2", "question": \n', r"c\.jsonl:2: invalid JSON \(Expecting value at column 26\)"),
    ("c.jsonl", goods(2).encode() + b'{"id": "q\xff3"}\n', r"c\.jsonl:3: not UTF-8 text \(byte 0xff at column 10\)"),
    ("c.jsonl", goods(2) + json.dumps(REC | {"choices": "zoo"}) + "\n", r"c\.jsonl:3: field 'choices' should be a list"),
    ("c.jsonl", json.dumps(REC | {"choices": ["zoo", 3]}) + "\n", r"c\.jsonl:1: field 'choices' should be a list of strings"),
    ("c.jsonl", json.dumps(REC | {"rationales": [{"text": None}]}) + "\n", r"c\.jsonl:1: each rationale needs a 'text' string"),
    ("c.jsonl", "\n\n", r"c\.jsonl: no records"),
])
def test_corpus_structure_errors_name_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(CorpusError, match=message):
        data.read_corpus(path)


def test_corrupt_and_truncated_gzip_name_the_file(tmp_path):
    whole = gzip.compress(goods(2000).encode())
    write(tmp_path / "t.jsonl.gz", whole[:len(whole) // 2])
    with pytest.raises(CorpusError, match=r"t\.jsonl\.gz: corrupt gzip after line \d+"):
        data.read_corpus(tmp_path / "t.jsonl.gz")
    write(tmp_path / "n.jsonl.gz", b"this is not gzip at all\n")
    with pytest.raises(CorpusError, match=r"n\.jsonl\.gz: corrupt gzip after line 0"):
        data.read_corpus(tmp_path / "n.jsonl.gz")


def test_bad_corpus_from_the_command_line_is_one_line_exit_1(student, tmp_path):
    bad = write(tmp_path / "bad.jsonl", GOOD.encode() + b'{"id": "q\xe9"}\n')  # latin-1, not UTF-8
    code, out, err = cli("train.py", "--init", str(student), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {bad}:2: not UTF-8 text (byte 0xe9 at column 10)"]
    code, _, err = cli("train.py", "--init", str(student), "--data", str(bad), "--out", str(tmp_path / "o2"),
                       env={"SCOTD_DEBUG": "1"})
    assert code == 1 and "Traceback" in err and "CorpusError" in err


# -----------------------------------------------------------------------------
# Skippable records: counted by reason, in train.py and in data.py stats


def test_empty_rationale_is_a_counted_skip(tmp_path, student):
    recs = [REC, REC | {"id": "q2", "rationales": [{"text": "  ", "prediction": "wooded area", "correct": True}]}]
    skips = Skips()
    examples = data.build_examples(recs, "cot", "correct", skips=skips)
    assert [e["id"] for e in examples] == ["q1"]
    assert skips.counts == {"empty rationale": 1, "question left without rationales": 1}
    data.write_corpus(recs, tmp_path / "c.jsonl")
    assert "1 x empty rationale (first at q2)" in data.stats(tmp_path / "c.jsonl", load_tokenizer(student))
    code, out, err = cli("train.py", "--init", str(student), "--data", str(tmp_path / "c.jsonl"), "--max-steps", "1",
                         "--out", str(tmp_path / "o"), "--eval-questions", "2", "--batch-size", "1")
    assert code == 0, err
    assert "1 x empty rationale (first at q2)" in out


def test_corrupt_token_cache_is_rebuilt(tmp_path, student, capsys):
    tok = load_tokenizer(student)
    examples = data.build_examples([REC, REC | {"id": "q2"}], "cot")
    first = data.tokenize_examples(examples, tok, 256, Skips(), cache_dir=tmp_path)
    (cache,) = tmp_path.glob("tokens-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    again = data.tokenize_examples(examples, tok, 256, Skips(), cache_dir=tmp_path)
    assert f"token cache {cache} is unreadable" in capsys.readouterr().out
    assert [list(t) for t, _ in again] == [list(t) for t, _ in first]
    np.load(cache)  # the rewritten cache is whole again


# -----------------------------------------------------------------------------
# Checkpoints, tokenizers, trainer state


def test_nonfinite_weights_are_named(student, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(student, folder)
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"NaN or infinite weights.*\n  non-finite values: {key[len('model.'):]}"):
        from_pretrained(folder)


def test_corrupt_tokenizer_and_config_name_the_file(student, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(student, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match=r"m/tokenizer\.json: cannot read tokenizer"):
        load_tokenizer(folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"m/config\.json: missing field 'hidden_size'"):
        from_pretrained(folder)
    (folder / "config.json").write_text("{\n  oops")
    with pytest.raises(CheckpointError, match=r"m/config\.json:2: not valid JSON"):
        from_pretrained(folder)


def test_corrupt_trainer_state_on_resume_names_the_file(student, tmp_path):
    out = train.main(["--init", str(student), "--out", str(tmp_path / "o"), "--limit", "16", "--batch-size", "4",
                      "--max-steps", "1", "--eval-questions", "2"])
    state = out / "last" / train.STATE_FILE
    state.write_bytes(state.read_bytes()[:200])
    code, _, err = cli("train.py", "--init", str(student), "--out", str(out), "--limit", "16", "--batch-size", "4",
                       "--max-steps", "2", "--eval-questions", "2", "--resume")
    assert code == 1 and "Traceback" not in err
    assert f"error: {state}: cannot read trainer state" in err


def test_evaluate_reads_the_mode_from_the_small_side_file(student, tmp_path, monkeypatch):
    out = train.main(["--init", str(student), "--out", str(tmp_path / "o"), "--limit", "16", "--batch-size", "4",
                      "--max-steps", "1", "--eval-questions", "2", "--mode", "post"])
    assert json.loads((out / "best" / "scotd.json").read_text())["mode"] == "post"
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))  # the optimizer state is never read
    summary = evaluate.main(["--checkpoint", str(out / "best"), "--limit", "2", "--n", "0", "--out", str(tmp_path / "e")])
    assert json.loads((summary / "summary-csqa_palm_validation.json").read_text())["mode"] == "post" and not loads
