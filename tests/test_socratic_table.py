"""experiments/socratic_table.py on a tiny student: from a sub-question corpus, one command trains the CoT,
unified and two-model students on exactly the same problems, evaluates them and the untuned floor on GSM8K
test, writes the table with intervals and verdicts, and a second invocation runs nothing."""

import importlib.util
import json
import shutil
from pathlib import Path

import torch

import data
from helpers import tiny_student
from scotd import socratic_rationale

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("socratic_table", ROOT / "experiments" / "socratic_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


def subquestion_corpus(path, problems):
    """Shaped like teacher.py --socratic's output: a question per step ("Step k?"), the third problem rejected."""
    records = []
    for n, r in enumerate(data.read_corpus(data.GSM8K_TRAIN)[4:4 + problems]):
        steps = r["rationales"][0]["steps"]
        qs = [f"Step {k}?" for k in range(1, len(steps) + 1)]
        rationale = r["rationales"][0] | {"text": socratic_rationale(qs, steps), "subquestions": qs}
        records.append(r | ({"rationales": [], "rejected": [{"why": "step 1: not a question", "subquestions": []}]}
                            if n == 2 else {"rationales": [rationale]}))
    data.write_corpus(records, path)
    return path


def test_one_command_trains_every_variant_on_the_same_problems(tmp_path, capsys):
    init = tiny_student(tmp_path / "m")
    config = json.loads((init / "config.json").read_text())  # GSM8K in a CSQA-trained tiny BPE is long
    (init / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.README_BEGIN}\nOLD TABLE\n{table.README_END}\nrest\n")
    argv = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results.md"), "--readme", str(readme),
            "--teacher", str(tmp_path / "no-teacher"), "--corpus", str(subquestion_corpus(tmp_path / "s.jsonl", 73)),
            "--problems", "73", "--init", str(init), "--epochs", "1", "--batch-size", "4", "--greedy-limit", "4",
            "--sc-limit", "3", "--n", "2", "--max-new-tokens", "12", "--max-len", "2048", "--fewshot", "1",
            "--greedy-batch", "3", "--sc-batch", "2"]
    table.main(argv)
    socratic, cot = (data.read_corpus(tmp_path / "runs" / f"{k}-corpus.jsonl") for k in ("socratic", "cot"))
    runs = tmp_path / "socratic-table"  # the record beside results.md: what a fresh clone keeps
    assert [r["id"] for r in socratic] == [r["id"] for r in cot] and len(cot) == 72  # the rejected one left out
    assert cot[0]["rationales"][0]["text"] == data.read_corpus(data.GSM8K_TRAIN)[4]["rationales"][0]["text"]
    steps = {s: json.loads((runs / s / "trained.json").read_text())["steps"] for s in ("cot", "unified", "decompose", "two-model")}
    assert steps["cot"] == steps["unified"] == 18  # 72 - 3 held out (5 %) = 69 problems, 4 a step, one epoch
    assert steps["decompose"] == steps["two-model"] > 2  # one example per turn
    for name in ("cot", "unified", "two-model", "untuned"):
        assert len(table.predictions(runs / name / "greedy", table.TEST)) == 4
    assert len(table.predictions(runs / "two-model" / "sc", table.TEST)) == 3 and not (runs / "untuned" / "sc").exists()
    text = (tmp_path / "results.md").read_text()
    for claim in ("Socratic two-model beats CoT distillation", "self-consistency beats greedy decoding (CoT)",
                  "self-consistency beats greedy decoding (Socratic two-model)"):
        row = next(line for line in text.splitlines() if claim in line)
        assert any(v in row for v in ("| reproduced |", "| not reproduced |", "| inconclusive at this size |")), row
    assert "(1 of the first 73 rejected)" in text and "--decomposer" in text
    where = "cuda, bfloat16" if torch.cuda.is_available() else "cpu, float32"  # evaluate.py's defaults
    assert text.count(f" | {where} |") == 4  # where each row was evaluated
    assert "--n 0 --limit 4 --batch-size 3 " in text and "--no-greedy --batch-size 2 " in text  # the GPU's batches
    assert "OLD TABLE" not in readme.read_text() and "| Socratic, two models" in readme.read_text()

    capsys.readouterr()
    table.main(argv)  # everything is there: nothing runs, the same tables
    assert ">>> python" not in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text().split("This invocation")[0] == text.split("This invocation")[0]

    # a fresh clone: the record, no checkpoints; the two-model chains still to sample need both models again
    sc_before = table.predictions(runs / "two-model" / "sc", table.TEST)
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(runs / "two-model" / "sc")
    table.main(argv)
    out = capsys.readouterr().out
    assert out.count(">>> python train.py") == 2 and "--mode decompose" in out and "--mode solve" in out
    assert table.predictions(runs / "two-model" / "sc", table.TEST) == sc_before  # the same seed: the same weights
