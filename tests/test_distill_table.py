"""experiments/distill_table.py's machinery (not its numbers): runs found by folder, each against `sft` on the
questions both answered."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_run(folder, greedy, vote):
    (folder / "eval").mkdir(parents=True)
    rows = [{"id": f"q{i}", "greedy_correct": bool(g), "vote_correct": bool(v)} for i, (g, v) in enumerate(zip(greedy, vote))]
    (folder / "eval" / "predictions-x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"greedy_acc": sum(greedy) / len(greedy), "greedy_acc_ci": [0.1, 0.9], "vote_acc": sum(vote) / len(vote),
               "vote_acc_ci": [0.2, 0.8], "n": 10}
    (folder / "eval" / "summary-x.json").write_text(json.dumps(summary))


def test_each_run_is_compared_with_sft_on_the_same_questions(tmp_path):
    write_run(tmp_path / "sft", [1, 0, 0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 1, 0, 0, 0])
    write_run(tmp_path / "kd0.5", [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 0, 0, 0])
    out = subprocess.run([sys.executable, "experiments/distill_table.py", "--runs", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 4 and out[2].startswith("| `sft`") and out[3].startswith("| `kd0.5`")
    assert "| 25.0 % [10.0, 90.0] | 37.5 % [20.0, 80.0] (N = 10) | - | - |" in out[2]
    assert "+37.5 [" in out[3] and "McNemar 0.25" in out[3]  # 3 discordant pairs, all one way: p = 2 / 8
    assert "+0.0 [+0.0, +0.0], McNemar 1.00 |" in out[3]


def test_a_greedy_only_evaluation_has_no_majority_cells(tmp_path):
    """A run evaluated with --n 0 (no vote in its summary or predictions): its greedy row against sft, no vote."""
    write_run(tmp_path / "sft", [1, 0, 0, 0], [1, 1, 0, 0])
    write_run(tmp_path / "onpolicy-sft", [1, 1, 0, 0], [0, 0, 0, 0])
    summary = tmp_path / "onpolicy-sft" / "eval" / "summary-x.json"
    summary.write_text(json.dumps({k: v for k, v in json.loads(summary.read_text()).items() if not k.startswith("vote")}))
    out = subprocess.run([sys.executable, "experiments/distill_table.py", "--runs", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[3].startswith("| `onpolicy-sft`") and "| - (greedy only) | +25.0 [" in out[3] and out[3].endswith("| - |")
