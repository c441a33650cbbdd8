"""data.py import: any dataset by column mapping -- JSONL, JSON, CSV and Parquet files built here, and a dataset in
a fabricated Hugging Face cache -- into the canonical corpus, every row accounted for (imported, or a counted skip
with its reason and first place), and each kind of bad input one line or a counted skip, nothing written half."""

import csv
import json
import re
import sys

import pytest

import cli
import data

ROWS = [  # CSQA-like rows: nested choices with labels, answers as labels
    {"id": "q1", "question": "Where do fish live?", "choices": {"label": ["A", "B", "C"], "text": ["sea", "sky", "sand"]},
     "answerKey": "A", "why": "Fish live in water."},
    {"id": "q2", "question": "What is hot?", "choices": {"label": ["A", "B", "C"], "text": ["ice", "fire", "snow"]},
     "answerKey": "B", "why": ""},
    {"id": "q3", "question": "  ", "choices": {"label": ["A", "B", "C"], "text": ["a", "b", "c"]}, "answerKey": "A"},
    {"id": "q4", "question": "Which is green?", "choices": {"label": ["A", "B", "C"], "text": ["grass", "sun", "milk"]},
     "answerKey": "D"},
]
MAPPING = ["--question", "question", "--choices", "choices.text", "--labels", "choices.label", "--answer", "answerKey",
           "--id", "id", "--rationale", "why"]


def run_import(monkeypatch, source, out, *mapping):
    monkeypatch.setattr(sys, "argv", ["data.py", "import", str(source), *mapping, "--out", str(out)])
    cli.run(data.main)
    return data.read_corpus(out)


def expected():
    return [{"id": "q1", "question": "Where do fish live?", "choices": ["sea", "sky", "sand"], "answer": "sea",
             "rationales": [{"text": "Fish live in water.", "prediction": "sea", "correct": True}]},
            {"id": "q2", "question": "What is hot?", "choices": ["ice", "fire", "snow"], "answer": "fire", "rationales": []}]


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_each_format_imports_the_same_records_and_counts_every_skip(tmp_path, monkeypatch, capsys, kind):
    source = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        source.write_text(json.dumps(ROWS))
    else:
        write_parquet(source, ROWS)
    assert run_import(monkeypatch, source, tmp_path / "out.jsonl", *MAPPING) == expected()
    out = capsys.readouterr().out
    assert "2 of 4 rows imported as questions" in out
    assert "1 x empty question (first at" in out and "1 x answer names no choice (its text, label or index)" in out


def test_a_csv_with_choice_columns_answers_by_text_index_or_letter(tmp_path, monkeypatch):
    """Flat CSV columns: a numeric task (no --choices), then a choice task whose answers are indices or letters."""
    source = tmp_path / "gsm.csv"
    with open(source, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows([["2 + 2?", "4"], ["Half of 3?", "1.50"], ["Name a color", "blue"]])
    rows = run_import(monkeypatch, source, tmp_path / "n.jsonl", "--question", "question", "--answer", "answer")
    assert [(r["id"], r["answer"]) for r in rows] == [("gsm-1", "4"), ("gsm-2", "1.5")] and "choices" not in rows[0]
    source = tmp_path / "mc.jsonl"
    source.write_text(json.dumps({"q": "Pick b", "opts": ["a", "b"], "gold": 1}) + "\n" +
                      json.dumps({"q": "Pick a", "opts": ["a", "b"], "gold": "A"}) + "\n")
    rows = run_import(monkeypatch, source, tmp_path / "mc-out.jsonl", "--question", "q", "--choices", "opts", "--answer", "gold")
    assert [r["answer"] for r in rows] == ["b", "a"]


def test_a_dataset_in_the_hugging_face_cache_is_read_offline(tmp_path, monkeypatch):
    """ORG/NAME: the cached parquet files of the split (datasets--ORG--NAME/snapshots/<commit>/data/...), no network;
    a split or dataset that is not cached says what to run."""
    hub = tmp_path / "hub"
    snap = hub / "datasets--acme--quiz" / "snapshots" / "abc123" / "data"
    snap.mkdir(parents=True)
    write_parquet(snap / "train-00000-of-00001.parquet", ROWS[:2])
    write_parquet(snap / "validation-00000-of-00001.parquet", ROWS[2:])
    (hub / "datasets--acme--quiz" / "refs").mkdir()
    (hub / "datasets--acme--quiz" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert run_import(monkeypatch, "acme/quiz", tmp_path / "out.jsonl", *MAPPING) == expected()
    with pytest.raises(data.CorpusError, match=r"acme/quiz: no cached parquet files of split 'test'.*`hf download acme/quiz "
                                               r"--repo-type dataset`"):
        data.read_rows("acme/quiz", "test")
    with pytest.raises(data.CorpusError, match=r"acme/other: no cached parquet files"):
        data.read_rows("acme/other")


@pytest.mark.parametrize("case,content,mapping,message", [
    ("missing column", [{"question": "q?", "answer": "4"}], ["--question", "question", "--answer", "gold"],
     r"rows.jsonl:1: no column 'gold'; the row has 'question', 'answer'"),
    ("ragged csv", "question,answer\nq?,4\nr?,5,extra\n", ["--question", "question", "--answer", "answer"],
     r"rows.csv:3: 3 fields, the header line has 2"),
    ("not parquet", b"PAR1 not really", ["--question", "question", "--answer", "answer"],
     r"rows.parquet: not a Parquet file"),
    ("repeated id", [{"id": "x", "question": "q?", "answer": "4"}, {"id": "x", "question": "r?", "answer": "5"}],
     ["--question", "question", "--answer", "answer", "--id", "id"], r"rows.jsonl:2: id 'x' repeats .*rows.jsonl:1"),
    ("nothing imported", [{"question": "q?", "answer": "many"}], ["--question", "question", "--answer", "answer"],
     r"no row imported \(1 rows; skipped: 1 x answer not a number"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, case, content, mapping, message):
    kind = "csv" if case == "ragged csv" else "parquet" if case == "not parquet" else "jsonl"
    source = tmp_path / f"rows.{kind}"
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif isinstance(content, str):
        source.write_text(content)
    else:
        source.write_text("".join(json.dumps(r) + "\n" for r in content))
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        run_import(monkeypatch, source, out, *mapping)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()
