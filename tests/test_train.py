"""train.py: the loop learns, resumes exactly, and runs end to end from the command line."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from helpers import tiny_student
from model import from_pretrained

ROOT = train.Path(train.__file__).resolve().parent


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def run(student, out, *extra):
    return train.main(["--init", str(student), "--out", str(out), "--limit", "64", "--batch-size", "4",
                       "--eval-every", "0", "--eval-questions", "4", "--lr", "3e-3", "--seed", "7", *extra])


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tiny_model_overfits_eight_examples(student, tmp_path):
    out = run(student, tmp_path / "o", "--limit", "12", "--max-steps", "150", "--lr", "1e-2", "--batch-size", "8",
              "--warmup-steps", "5", "--weight-decay", "0", "--min-lr-ratio", "1")
    assert losses(out)[0] > 4.0
    assert min(losses(out)[-5:]) < 0.05


def test_resume_continues_exactly(student, tmp_path, monkeypatch):
    """8 steps straight == 4 steps, Ctrl-C (saves last), then --resume for the rest: same losses, same weights."""
    straight = run(student, tmp_path / "a", "--max-steps", "8", "--grad-accum", "2")

    calls = {"n": 0}
    update = train.Progress.update

    def interrupt_after_4(self, k=1, info=None):
        update(self, k, info)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Progress, "update", interrupt_after_4)
    with pytest.raises(SystemExit) as e:
        run(student, tmp_path / "b", "--max-steps", "8", "--grad-accum", "2")
    assert e.value.code == 130 and len(losses(tmp_path / "b")) == 4
    monkeypatch.setattr(train.Progress, "update", update)
    resumed = run(student, tmp_path / "b", "--max-steps", "8", "--grad-accum", "2", "--resume")

    a, b = losses(straight), losses(resumed)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    wa = load_file(str(straight / "last" / "model.safetensors"))
    wb = load_file(str(resumed / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_is_an_hf_folder_transformers_loads(student, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run(student, tmp_path / "o", "--max-steps", "2")
    ours = from_pretrained(out / "best")
    hf = AutoModelForCausalLM.from_pretrained(out / "best").eval()
    ids = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-4, rtol=0)
    assert (out / "last" / "trainer_state.pt").exists() and (out / "last" / "tokenizer.json").exists()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_packed_batches_train(student, tmp_path):
    out = run(student, tmp_path / "o", "--max-steps", "3", "--pack")
    assert len(losses(out)) == 3 and all(x == x for x in losses(out))


def test_fp16_grad_scaler_path(student, tmp_path):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError:
        pytest.skip("this torch has no fp16 autocast on CPU")
    out = run(student, tmp_path / "o", "--max-steps", "3", "--dtype", "float16")
    state = torch.load(out / "last" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and len(losses(out)) == 3


def test_command_line_end_to_end(student, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--init", str(student), "--max-steps", "3", "--out",
                        str(tmp_path / "cli"), "--limit", "32", "--eval-questions", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipped:" in r.stdout and "next      python evaluate.py --checkpoint" in r.stdout
    assert (tmp_path / "cli" / "best" / "model.safetensors").exists()


def test_compiled_training_matches_eager(student, tmp_path):
    eager = run(student, tmp_path / "e", "--max-steps", "2")
    compiled = run(student, tmp_path / "c", "--max-steps", "2", "--compile")
    assert max(abs(x - y) for x, y in zip(losses(eager), losses(compiled))) <= 1e-4
    assert "_orig_mod" not in "".join(load_file(str(compiled / "last" / "model.safetensors")))  # the raw module is saved
