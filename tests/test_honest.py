"""Honest numbers: dev questions held out of training (never the reported ones), overlap refused or warned, and a
training speed that is the steps' own."""

import json
import time

import pytest

import data
import evaluate
import train
from fileio import InputError
from helpers import tiny_student

FLAGS = ["--limit", "16", "--batch-size", "4", "--eval-every", "0", "--eval-questions", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def ids(records):
    return {r["id"] for r in records}


def test_the_dev_slice_is_held_out_chosen_by_id_and_stable_when_records_are_appended():
    records = data.read_corpus(data.DEFAULT_TRAIN)
    training, dev = data.dev_split(records[:4000])
    assert len(dev) == 200 and not ids(training) & ids(dev) and len(training) + len(dev) == 4000
    assert data.dev_split(list(reversed(records[:4000])))[1] == list(reversed(dev))  # by id, not by place
    grown_training, grown_dev = data.dev_split(records)  # 5,741 records appended
    assert not ids(training) & ids(grown_dev)  # appending never moves a training question into dev
    assert len(ids(dev) & ids(grown_dev)) >= 80  # the appended ones that hash lower take the place of some
    assert data.dev_split(records[:100])[1] and len(data.dev_split(records[:100])[1]) == 5  # 5 % of a small one
    assert data.dev_split(records[:19]) == (records[:19], [])  # none of a corpus under 20


def test_a_run_records_its_dev_questions_and_what_best_was_chosen_on(student, tmp_path):
    out = train.main(["--init", str(student), "--out", str(tmp_path / "o"), "--max-steps", "2", *FLAGS])
    info = json.loads((out / "best" / "scotd.json").read_text())
    training, dev = data.dev_split(data.read_corpus(data.DEFAULT_TRAIN))
    assert info["dev"]["ids"] == [r["id"] for r in dev] and info["dev"]["source"].startswith("200 questions of --data")
    assert info["selected"] == {"step": 2, "metric": "dev greedy accuracy", "value": info["selected"]["value"],
                                "on": f"2 questions of {info['dev']['source']}"}
    assert "selected" not in json.loads((out / "last" / "scotd.json").read_text())


def test_dev_data_that_shares_questions_with_the_training_data_is_refused(student, tmp_path):
    shared = data.read_corpus(data.DEFAULT_TRAIN)[:30]
    shared[3] = shared[3] | {"id": "renamed"}  # the same question under another id: caught by its text
    data.write_corpus(shared, tmp_path / "dev.jsonl")
    with pytest.raises(InputError, match=r"--dev-data .*dev\.jsonl: 29 of its questions share an id and 1 the text of a "
                                         r"question of --data"):
        train.main(["--init", str(student), "--dev-data", str(tmp_path / "dev.jsonl"), "--out", str(tmp_path / "o"),
                    "--max-steps", "1", *FLAGS])


def test_evaluating_on_training_questions_is_warned_and_recorded(student, tmp_path, capsys):
    out = train.main(["--init", str(student), "--out", str(tmp_path / "o"), "--max-steps", "1", *FLAGS])
    dev_ids = json.loads((out / "best" / "scotd.json").read_text())["dev"]["ids"]
    train_records = data.read_corpus(data.DEFAULT_TRAIN)
    mixed = [r for r in train_records if r["id"] in dev_ids[:2]] + train_records[:3]  # 2 dev + 3 training questions
    data.write_corpus(mixed, tmp_path / "mixed.jsonl")
    evaluate.main(["--checkpoint", str(out / "best"), "--data", str(tmp_path / "mixed.jsonl"), "--n", "0",
                   "--max-new-tokens", "8", "--out", str(tmp_path / "e")])
    printed = capsys.readouterr().out
    assert "warning   5 of the 5 evaluated questions are in" in printed and "(5 by id, 0 by text; 2 of them its dev" in printed
    assert json.loads((tmp_path / "e" / "summary-mixed.json").read_text())["overlap"] == {"training": 5, "dev": 2}
    evaluate.main(["--checkpoint", str(out / "best"), "--limit", "3", "--n", "0", "--max-new-tokens", "8",
                   "--out", str(tmp_path / "v")])  # the validation questions: held out, no warning
    assert "warning" not in capsys.readouterr().out
    assert "overlap" not in json.loads((tmp_path / "v" / "summary-csqa_palm_validation.json").read_text())


def test_the_logged_speed_is_the_steps_own(student, tmp_path, monkeypatch, capsys):
    """Dev evaluations that take 1 s each (3 of them) do not lower the tokens/s logged: it is the steps' tokens over
    the steps' wall time, and the run's last lines give the time of each phase."""
    seen, real_step, real_eval = [], train.Trainer.step, train.evaluate_dev

    def step(self, *a):
        out = real_step(self, *a)
        seen.append(out[2])
        return out
    monkeypatch.setattr(train.Trainer, "step", step)
    monkeypatch.setattr(train, "evaluate_dev", lambda *a: (time.sleep(1.0), real_eval(*a))[1])
    t0 = time.time()
    out = train.main(["--init", str(student), "--out", str(tmp_path / "o"), "--max-steps", "3",
                      *FLAGS[:4], "--eval-every", "1", "--eval-questions", "2"])
    wall = time.time() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[-1]["target_tok_s"] > sum(seen) / (wall - 3.0)  # the 3 s of dev evaluation are not in it
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time      "))
    assert float(line.split("dev evaluation ")[1].split(" s")[0]) >= 3
