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
    rows = run_import(monkeypatch, source, tmp_path / "n.jsonl", "--question", "question", "--answer", "answer",
                      "--answer-type", "number")
    assert [(r["id"], r["answer"]) for r in rows] == [("gsm-1", "4"), ("gsm-2", "1.5")] and "choices" not in rows[0]
    rows = run_import(monkeypatch, source, tmp_path / "t.jsonl", "--question", "question", "--answer", "answer")
    assert [(r["answer"], r["answer_type"]) for r in rows] == [("4", "text"), ("1.50", "text"), ("blue", "text")]
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
    ("nothing imported", [{"question": "q?", "answer": "many"}], ["--question", "question", "--answer", "answer",
                                                                   "--answer-type", "number"],
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


def test_yes_no_and_free_text_answers_get_their_type(tmp_path, monkeypatch):
    """StrategyQA-like rows (answers true/false) import as yes/no; short answers as free text; both read back as
    canonical records whose gold answers are "yes"/"no" and SQuAD-normalised text."""
    source = tmp_path / "sqa.jsonl"
    source.write_text(json.dumps({"qid": "a", "question": "Can fish fly?", "answer": False, "facts": ["Fish swim."]}) + "\n"
                      + json.dumps({"qid": "b", "question": "Is water wet?", "answer": True}) + "\n")
    rows = run_import(monkeypatch, source, tmp_path / "yn.jsonl", "--question", "question", "--answer", "answer",
                      "--id", "qid")
    assert [(r["answer"], r["answer_type"]) for r in rows] == [("no", "yesno"), ("yes", "yesno")]
    assert [data.gold(r) for r in rows] == ["no", "yes"]
    source = tmp_path / "qa.json"
    source.write_text(json.dumps([{"q": "Tallest tower in Paris?", "a": "The Eiffel Tower"}, {"q": "Capital?", "a": "  "}]))
    rows = run_import(monkeypatch, source, tmp_path / "qa.jsonl", "--question", "q", "--answer", "a", "--answer-type", "text")
    assert len(rows) == 1 and rows[0]["answer_type"] == "text" and data.gold(rows[0]) == "eiffel tower"


def test_a_yes_no_task_samples_trains_and_votes_end_to_end(tmp_path):
    """A yes/no corpus through the three commands with a tiny model: the teacher's chains read as yes/no (or no
    answer), the student's targets end " So the answer is yes.", evaluate.py votes over "yes"/"no" and says so."""
    import evaluate
    import teacher
    import train
    from helpers import tiny_student

    student = tiny_student(tmp_path / "m")
    records = [{"id": f"q{i}", "question": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no",
                "answer_type": "yesno", "rationales": [{"text": f"{i} is {'even' if i % 2 == 0 else 'odd'}.",
                                                        "prediction": "yes" if i % 2 == 0 else "no", "correct": True}]}
               for i in range(24)]
    corpus = tmp_path / "yn.jsonl"
    data.write_corpus(records, corpus)
    examples = data.build_examples(data.read_corpus(corpus), "cot")
    assert examples[0]["target"] == " 0 is even. So the answer is yes.\n\n" and examples[0]["answer"] == "yes"
    with pytest.raises(data.InputError, match="no bundled worked examples for yes or no answers: .*--shots-from"):
        teacher.main(["--teacher", str(student), "--data", str(corpus), "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(data.InputError, match="for yes or no answers: --teacher-shots 4 needs them; --teacher-shots 0"):
        train.main(["--init", str(student), "--data", str(corpus), "--out", str(tmp_path / "op"), "--on-policy",
                    "--teacher", str(student), "--max-steps", "1"])  # on-policy's default: teacher.py's 4
    shots = tmp_path / "shots.jsonl"  # two worked examples, written by hand
    data.write_corpus(records[:2], shots)
    sampled = teacher.main(["--teacher", str(student), "--data", str(corpus), "--limit", "3", "--n", "2",
                            "--shots-from", str(shots), "--shots", "2", "--max-new-tokens", "8",
                            "--out", str(tmp_path / "t.jsonl")])
    meta = json.loads((tmp_path / "t.jsonl.meta.json").read_text())
    assert meta["exemplar_ids"] == ["q0", "q1"] and "So the answer is yes." in meta["prompt"]
    assert all(r["prediction"] in ("yes", "no", None) for rec in data.read_corpus(sampled) for r in rec["rationales"])
    out = train.main(["--init", str(student), "--data", str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "2",
                      "--batch-size", "4", "--eval-every", "0", "--eval-questions", "2"])
    evaluate.main(["--checkpoint", str(out / "best"), "--data", str(corpus), "--limit", "4", "--n", "2",
                   "--max-new-tokens", "8", "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary-yn.json").read_text())
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions-yn.jsonl").read_text().splitlines()]
    assert summary["answer_type"] == "yesno" and [p["gold"] for p in preds] == ["yes", "no", "yes", "no"]
    assert all(c["answer"] in ("yes", "no", None) for p in preds for c in p["chains"])
