"""The numeric task (GSM8K): number extraction and voting, the importer, and train/evaluate end to end."""

import json

import pytest

import data
import evaluate
import train
from data import CorpusError, Skips
from helpers import tiny_student
from scotd import extract_answer, format_query, format_target, majority_vote, parse_number, states_answer, vote_curve


@pytest.mark.parametrize("text, number", [
    ("72", "72"), ("$1,000.50", "1000.5"), ("18.0 dollars", "18"), ("-3 degrees", "-3"), ("0.20", "0.2"),
    (".5", "0.5"), ("-0", "0"), ("about 5, maybe 6", "5"), ("no number here", None), ("", None),
])
def test_numbers_are_normalised(text, number):
    assert parse_number(text) == number


def test_numeric_query_target_and_extraction():
    assert format_query("How many clips?") == "Q: How many clips?\nA:"
    target = format_target("cot", None, "72", "48 + 24 = 72.")
    assert target == " 48 + 24 = 72. So the answer is 72.\n\n"
    assert extract_answer("cot", target, None) == "72"
    assert extract_answer("cot", " 2 + 2 = 4. So the answer is $1,200.00.\n\nQ: next", None) == "1200"
    assert extract_answer("cot", " The answer is 3 apples. Then 5. So the answer is 8.", None) == "8"  # the last
    assert extract_answer("post", " The answer is 12. Because 3 x 4 = 12.", None) == "12"  # the first
    assert extract_answer("cot", " I cannot tell.", None) is None  # abstains
    assert extract_answer("cot", " So the answer is unknown.", None) is None
    # a Socratic step that states the answer ends its chain, whatever the case
    assert states_answer("She sold 72 clips. So the answer is 72.") and states_answer("The Answer Is 72.")
    assert not states_answer("Natalia sold 48/2 = 24 clips in May.")


def test_vote_over_numbers():
    assert majority_vote(["8", None, "9", "8"]) == "8"
    assert majority_vote([None, None]) is None
    assert vote_curve([["8", "9", "9"], ["1", None, "1"]], ["9", "1"]) == [0.5, 0.5, 1.0]


def write(path, lines):
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def test_import_gsm8k_cleans_solutions_and_counts_skips(tmp_path):
    path = write(tmp_path / "train.jsonl", [
        json.dumps({"question": "Natalia sold 48 clips ... ?", "answer": "She sold 48/2 = <<48/2=24>>24.\n"
                    "In all 48+24 = <<48+24=72>>72.\n#### 72"}),
        json.dumps({"question": "No final answer?", "answer": "It is 5."}),
        json.dumps({"question": "Money?", "answer": "How much? ** It costs $<<2*500=1000>>1,000.\n#### 1,000"}),
        json.dumps({"question": "No steps?", "answer": "#### 4"}),
        json.dumps({"question": "Words?", "answer": "Many.\n#### many"}),
    ])
    skips = Skips()
    records = data.import_gsm8k(path, "train", skips)
    assert records == [
        {"id": "gsm8k-train-1", "question": "Natalia sold 48 clips ... ?", "answer": "72",
         "rationales": [{"text": "She sold 48/2 = 24. In all 48+24 = 72.", "prediction": "72", "correct": True,
                         "steps": ["She sold 48/2 = 24.", "In all 48+24 = 72."]}]},
        {"id": "gsm8k-train-3", "question": "Money?", "answer": "1000",
         "rationales": [{"text": "It costs $1,000.", "prediction": "1000", "correct": True, "steps": ["It costs $1,000."]}]}]
    assert skips.counts == {"no number after '####'": 2, "empty rationale": 1}
    assert "train.jsonl:2" in skips.summary()


def test_import_gsm8k_names_a_bad_line(tmp_path):
    with pytest.raises(CorpusError, match=r"train\.jsonl:2: invalid JSON"):
        data.import_gsm8k(write(tmp_path / "train.jsonl", [json.dumps({"question": "q", "answer": "#### 1"}), "{"]),
                          "train", Skips())
    with pytest.raises(CorpusError, match=r"train\.jsonl:1: expected an object with 'question' and 'answer'"):
        data.import_gsm8k(write(tmp_path / "train.jsonl", [json.dumps({"question": "q"})]), "train", Skips())


def test_numeric_record_needs_a_normalised_number(tmp_path):
    rec = {"id": "x", "question": "q", "answer": "1,000", "rationales": []}
    write(tmp_path / "c.jsonl", [json.dumps(rec)])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: a question without 'choices' needs a number"):
        data.read_corpus(tmp_path / "c.jsonl")


def test_bundled_gsm8k_and_its_examples():
    train_records, test_records = data.read_corpus(data.GSM8K_TRAIN), data.read_corpus(data.GSM8K_TEST)
    assert (len(train_records), len(test_records)) == (7473, 1319)
    assert not {r["question"] for r in train_records} & {r["question"] for r in test_records}
    skips = Skips()
    examples = data.build_examples(train_records[:3] + [{"id": "bad", "question": "q", "answer": "4", "rationales": [
        {"text": "Two and two.", "prediction": None, "correct": False}]}], "cot", "all", skips=skips)
    assert examples[0]["target"].endswith(" So the answer is 72.\n\n") and examples[0]["answer"] == "72"
    assert "<<" not in "".join(e["target"] for e in examples)
    assert skips.counts["teacher answer not a number"] == 1


def test_train_and_evaluate_on_gsm8k(tmp_path, capsys):
    """train.py on the numeric corpus (dev: 200 of its problems, chosen by id and held out), then evaluate.py on the test
    split with self-consistency: predictions carry numbers, the summary an accuracy."""
    student = tiny_student(tmp_path / "tiny")
    ckpt = train.main(["--init", str(student), "--data", str(data.GSM8K_TRAIN), "--out", str(tmp_path / "run"),
                       "--limit", "32", "--max-steps", "3", "--batch-size", "4", "--eval-every", "0",
                       "--eval-questions", "2", "--max-len", "512"])
    assert "200 questions of --data (those whose ids hash lowest), held out of training" in capsys.readouterr().out
    info = json.loads((ckpt / "best" / "scotd.json").read_text())
    assert len(info["dev"]["ids"]) == 200 and info["selected"]["on"].startswith("2 questions of 200 questions of --data")
    out = evaluate.main(["--checkpoint", str(ckpt / "best"), "--data", str(data.GSM8K_TEST), "--limit", "3",
                         "--n", "2", "--max-new-tokens", "16", "--out", str(tmp_path / "eval"), "--fewshot", "1"])
    rows = [json.loads(ln) for ln in (out / "predictions-gsm8k_test.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == [r["answer"] for r in data.read_corpus(data.GSM8K_TEST)[:3]]
    assert all(len(r["chains"]) == 2 for r in rows)
    summary = json.loads((out / "summary-gsm8k_test.json").read_text())
    assert 0.0 <= summary["greedy_acc"] <= 1.0 and len(summary["vote_curve"]) == len(summary["maj_at_k"]) == 2
