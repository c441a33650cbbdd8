"""Socratic CoT (Shridhar et al. 2022): the chain's turns, the two models' examples, the teacher's
sub-question rounds, and the decomposer -> solver loop end to end on tiny models."""

import json

import pytest

import data
import evaluate
import teacher
import train
from helpers import Crash, counting_forward, tiny_student
from scotd import extract_answer, format_query, format_target, socratic_rationale, socratic_turns

SUBQ = ["How many clips in May?", "How many clips in all?"]
STEPS = ["Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips altogether."]


def test_turns_concatenate_to_the_unified_chain():
    query = format_query("Natalia sold 48 clips in April and half as many in May. How many in all?")
    turns = socratic_turns(query, SUBQ, STEPS, "72")
    assert turns["decompose"] == [(query, " How many clips in May? **"),
                                  (query + " How many clips in May? ** Natalia sold 48/2 = 24 clips in May.\n",
                                   "How many clips in all? **")]
    assert [target for _, target in turns["solve"]] == [" Natalia sold 48/2 = 24 clips in May.\n",
                                                        " Natalia sold 48+24 = 72 clips altogether. So the answer is 72.\n\n"]
    text = query
    for (d_context, d_target), (s_context, s_target) in zip(turns["decompose"], turns["solve"]):
        assert d_context == text and s_context == text + d_target  # each model reads what came before
        text += d_target + s_target
    unified = format_target("cot", None, "72", socratic_rationale(SUBQ, STEPS))
    assert text == query + unified and extract_answer("cot", unified, None) == "72"


def socratic_record(rec, subquestions):
    r = rec["rationales"][0]
    return rec | {"rationales": [r | {"subquestions": subquestions, "text": socratic_rationale(subquestions, r["steps"])}]}


def test_examples_of_each_role_and_counted_skips():
    a, b = data.read_corpus(data.GSM8K_TRAIN)[:2]
    assert a["rationales"][0]["steps"] == ["Natalia sold 48/2 = 24 clips in May.",
                                           "Natalia sold 48+24 = 72 clips altogether in April and May."]
    records = [socratic_record(a, SUBQ), socratic_record(b, ["How much a minute?"])]  # b: 1 question for 2 steps
    skips = data.Skips()
    for role in ("decompose", "solve"):
        examples = data.build_examples(records, role, skips=skips)
        assert [x["target"] for x in examples] == [t for _, t in socratic_turns(format_query(a["question"]), SUBQ,
                                                                                   a["rationales"][0]["steps"], "72")[role]]
    assert skips.counts == {"rationale without a sub-question for each step (Socratic)": 2}
    cot = data.build_examples(records, "cot")  # the unified model: the Socratic chain as a cot target
    assert cot[0]["target"].startswith(" How many clips in May? ** Natalia sold 48/2 = 24 clips in May.\nHow many")


@pytest.mark.parametrize("output, expected", [
    (" How many clips in May?", "How many clips in May?"),
    (" How many in all? To solve this problem, we", "How many in all?"),  # cut after its "?"
    (" She sold 72 clips.\nHow many?", None),  # the question line asks nothing
    ("", None),
])
def test_subquestion_line(output, expected):
    assert teacher.subquestion(output) == expected


def test_subquestions_are_asked_a_step_a_turn_reading_the_earlier_ones():
    """teacher.Asking with a scripted teacher: after each question the dialogue's text is the problem, the
    earlier steps with the questions asked for them, then the next step -- the format the header's worked
    examples show -- and a row that asks nothing is stopped there with the reason."""
    recs = data.read_corpus(data.GSM8K_TRAIN)[:4]  # the header's worked examples: every round of each is in it
    header = teacher.socratic_header(recs)
    for rec, qs in zip(recs, teacher.SOCRATIC_SHOTS.values()):
        assert all(teacher.socratic_round(rec, qs[:r]) + f" {qs[r]}\n" in header for r in range(len(qs)))
    recs = recs[:3]
    asking = teacher.Asking(recs)
    text = dict(enumerate(asking.prompts))
    active, r = [0, 1, 2], 0
    while active:
        going = []
        for j in active:  # row 2 writes no question for its second step
            said = " Nothing." if (j == 2 and r == 1) else f" Q{r + 1} of row {j}? Then more"
            follow = asking.turn(j, {"text": said, "tokens": [r]})
            if follow is not None:
                text[j] += said.split(" Then")[0] + follow
                assert text[j] == teacher.socratic_round(recs[j], asking.asked[j])
                going.append(j)
        active, r = going, r + 1
    chains = asking.chains()
    assert [len(x["rationales"][0]["steps"]) for x in recs] == [2, 2, 3] and r == 2  # two turns: all done
    assert chains[0] == {"subquestions": ["Q1 of row 0?", "Q2 of row 0?"], "why": None, "tokens": [0, 1]}
    assert chains[2] == {"subquestions": ["Q1 of row 2?"], "why": "step 2: not a question: 'Nothing.'", "tokens": [0, 1]}
    kept, rejected = teacher.rationales(recs[0], chains[:1], socratic=True)
    assert rejected == [] and kept[0]["text"] == socratic_rationale(chains[0]["subquestions"], recs[0]["rationales"][0]["steps"])
    assert teacher.rationales(recs[2], chains[2:], socratic=True) == ([], [{"why": chains[2]["why"],
                                                                            "subquestions": chains[2]["subquestions"]}])


def test_teacher_socratic_keeps_rejections_and_never_prompts_on_test(tmp_path, capsys):
    student = tiny_student(tmp_path / "m")
    config = json.loads((student / "config.json").read_text())  # the 4-shot header is ~2,000 tiny-BPE tokens: RoPE
    (student / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))  # has no table to grow
    out = tmp_path / "s.jsonl"
    teacher.main(["--socratic", "--teacher", str(student), "--limit", "3", "--max-new-tokens", "8", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["gsm8k-train-5", "gsm8k-train-6", "gsm8k-train-7"]  # 1-4 are the prompt's
    for r in records:  # a random model writes no usable questions: kept with the reason, no rationale
        assert r["rationales"] == [] and r["rejected"][0]["why"].startswith("step 1: not a question")
    meta = json.loads(out.with_name("s.jsonl.meta.json").read_text())
    assert meta["socratic"] and meta["exemplar_ids"] == list(teacher.SOCRATIC_SHOTS)
    assert meta["prompt"].count("Problem: ") == 4 and meta["prompt"].count(teacher.ASKS) == sum(
        map(len, teacher.SOCRATIC_SHOTS.values()))
    with pytest.raises(SystemExit):
        teacher.get_args(["--socratic", "--teacher", str(student), "--data", str(data.GSM8K_TEST), "--out", "x.jsonl"])
    assert "never prompts on test problems" in capsys.readouterr().err


def test_decomposer_and_solver_answer_end_to_end(tmp_path, monkeypatch, capsys):
    """Tiny decomposer and solver trained to memorise two problems' Socratic chains: evaluate.py's loop asks
    each sub-question, solves it, stops at the answer sentence and reads the answer, greedy and sampled."""
    recs = data.read_corpus(data.GSM8K_TRAIN)[:3]
    corpus, held_out = tmp_path / "c.jsonl", tmp_path / "dev.jsonl"
    data.write_corpus([socratic_record(recs[0], SUBQ), socratic_record(recs[1], ["How much a minute?", "How much in all?"])],
                      corpus)
    data.write_corpus([socratic_record(recs[2], ["What?"] * len(recs[2]["rationales"][0]["steps"]))], held_out)
    init = tiny_student(tmp_path / "m")
    for role in ("decompose", "solve"):
        train.main(["--init", str(init), "--data", str(corpus), "--dev-data", str(held_out), "--mode", role, "--out",
                    str(tmp_path / role), "--max-steps", "200", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "0",
                    "--weight-decay", "0", "--eval-every", "0", "--max-len", "512"])
        dev = json.loads((tmp_path / role / "metrics.jsonl").read_text().splitlines()[-1], parse_constant=pytest.fail)
        assert dev["step"] == 200 and dev["dev_greedy_acc"] is None  # a role answers nothing alone; strict JSON, no NaN
        printed = capsys.readouterr().out
        assert "no dev accuracy (a Socratic role answers nothing alone)" in printed
        assert f"(best at step 200: dev loss {dev['dev_loss']:.4f})" in printed
    assert (f"next      python evaluate.py --checkpoint {tmp_path / 'solve' / 'best'} --decomposer <a --mode decompose "
            "run>/best --data data/gsm8k_test.jsonl.gz") in printed
    evaluate.main(["--checkpoint", str(tmp_path / "solve" / "last"), "--decomposer", str(tmp_path / "decompose" / "last"),
                   "--data", str(corpus), "--n", "2", "--out", str(tmp_path / "eval")])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions-c.jsonl").read_text().splitlines()]
    assert rows[0]["greedy"]["text"] == " " + socratic_rationale(SUBQ, STEPS[:1] + [
        "Natalia sold 48+24 = 72 clips altogether in April and May."]) + " So the answer is 72."
    assert [r["greedy"]["answer"] for r in rows] == ["72", "10"] and all(r["vote_correct"] for r in rows)
    evaluate.main(["--checkpoint", str(tmp_path / "solve" / "last"), "--decomposer", str(tmp_path / "decompose" / "last"),
                   "--data", str(corpus), "--n", "2", "--no-greedy", "--out", str(tmp_path / "sc")])
    alone = [json.loads(line) for line in (tmp_path / "sc" / "predictions-c.jsonl").read_text().splitlines()]
    assert [r["chains"] for r in alone] == [r["chains"] for r in rows] and "greedy" not in alone[0]
    # interrupted inside the solver's or decomposer's forward in the last batch, resumed: the uninterrupted result
    argv = ["--checkpoint", str(tmp_path / "solve" / "last"), "--decomposer", str(tmp_path / "decompose" / "last"),
            "--data", str(corpus), "--n", "2", "--batch-size", "1", "--temperature", "1.0"]
    total = counting_forward(monkeypatch)
    whole = evaluate.main(argv + ["--out", str(tmp_path / "whole")]) / "predictions-c.jsonl"
    counting_forward(monkeypatch, crash_at=total[0] - 2)
    with pytest.raises(Crash):
        evaluate.main(argv + ["--out", str(tmp_path / "cut")])
    assert len((tmp_path / "cut" / "partial-c.jsonl").read_text().splitlines()) == 3  # settings, greedy, chains batch 0
    calls = counting_forward(monkeypatch)
    assert (evaluate.main(argv + ["--out", str(tmp_path / "cut")]) / "predictions-c.jsonl").read_text() == whole.read_text()
    assert calls[0] < total[0] / 2  # only the last batch (of 3) decoded again
    with pytest.raises(evaluate.InputError, match="needs two models"):
        evaluate.main(["--checkpoint", str(tmp_path / "solve" / "last"), "--data", str(corpus), "--n", "0",
                       "--out", str(tmp_path / "e2")])
