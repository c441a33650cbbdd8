"""torchrun on CPU (gloo, 2 processes): data-parallel training equals one process with the same global
batch, a DDP checkpoint resumes in one process, sharded evaluation writes the same predictions."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import many_rationale_corpus, tiny_student

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
COMMON = ["--limit", "48", "--batch-size", "8", "--eval-every", "0", "--eval-questions", "4", "--lr", "3e-3",
          "--warmup-steps", "0", "--min-lr-ratio", "1", "--seed", "5",  # constant lr: a run can be cut and resumed
          "--grad-accum", "2"]  # exercises no_sync (DDP) and set_requires_gradient_sync (FSDP)


def launch(script, *args, nproc=1):
    args = [*args, "--device", "cpu"]  # gloo on the CPU on any machine: two ranks may share one GPU nowhere
    cmd = [sys.executable, script, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def single(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    launch("train.py", "--init", str(student), "--out", str(out), "--max-steps", "8", *COMMON)
    return out


def weights(run):
    return load_file(str(run / "last" / "model.safetensors"))


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) <= 1e-5


def test_ddp_then_single_process_resume_equals_single_process(student, single, tmp_path):
    out = tmp_path / "ddp"
    stdout = launch("train.py", "--init", str(student), "--out", str(out), "--max-steps", "4", *COMMON, nproc=2)
    assert "2 ranks x 4 (DDP)" in stdout
    launch("train.py", "--init", str(student), "--out", str(out), "--max-steps", "8", "--resume", *COMMON)
    assert len(losses(out)) == 8
    assert_same_run(single, out, atol=1e-5)


def test_fsdp_equals_single_process(student, single, tmp_path):
    out = tmp_path / "fsdp"
    stdout = launch("train.py", "--init", str(student), "--out", str(out), "--max-steps", "8", "--fsdp", *COMMON, nproc=2)
    assert "2 ranks x 4 (FSDP)" in stdout
    assert_same_run(single, out, atol=1e-5)


def test_sharded_evaluation_writes_the_same_predictions(single, tmp_path):
    args = ["--checkpoint", str(single / "last"), "--limit", "7", "--chains", "3", "--batch-size", "2",  # torchrun takes --n
            "--max-new-tokens", "16"]
    launch("evaluate.py", *args, "--out", str(tmp_path / "one"))
    stdout = launch("evaluate.py", *args, "--out", str(tmp_path / "two"), nproc=2)
    assert stdout.count("gathered") == 1 and "gathered  7 questions' outputs from 2 ranks (one all-gather)" in stdout
    name = "predictions-csqa_palm_validation.jsonl"
    one = (tmp_path / "one" / name).read_text()
    assert len(one.splitlines()) == 7
    assert one == (tmp_path / "two" / name).read_text()


def test_last_batch_with_fewer_examples_than_ranks(student, tmp_path):
    """9 examples at batch 4 on 2 ranks: the epoch's last batch holds 1 example, so one rank's share is
    empty. It joins the all-reduce with zero gradients, and the weights equal one process's."""
    import data

    records = [r for r in data.read_corpus(data.DEFAULT_DEV) if r["rationales"][0]["correct"]][:9]
    data.write_corpus(records, tmp_path / "nine.jsonl")
    args = ["--init", str(student), "--data", str(tmp_path / "nine.jsonl"), "--batch-size", "4", "--max-steps", "3",
            "--eval-every", "0", "--eval-questions", "2", "--lr", "3e-3", "--warmup-steps", "0", "--seed", "5"]
    stdout = launch("train.py", *args, "--out", str(tmp_path / "one"))
    assert "9 cot examples" in stdout  # 3 steps = the epoch's batches of 4, 4 and 1
    launch("train.py", *args, "--out", str(tmp_path / "two"), nproc=2)
    # each rank pads its prefixes and branches to its own longest (attention.TreeAttention), so attention sums in
    # another order than one process's (step-1 losses differ by ~1e-7 relative); four AdamW steps at lr 3e-3
    # make that up to 1.1e-5 in a weight (measured), hence 3e-5 here
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=3e-5)


def test_shared_prefix_rows_under_ddp_equal_one_process(student, tmp_path):
    """3 rationales per question, --share-prefix auto: each rank takes a contiguous slice of the question-grouped
    batch (distributed.rank_share) and builds shared rows from it; weights and losses equal one process's."""
    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    args = ["--init", str(student), "--data", str(corpus), "--max-steps", "4", *COMMON]
    stdout = launch("train.py", *args, "--out", str(tmp_path / "one"))
    assert "shared-prefix rows" in stdout
    launch("train.py", *args, "--out", str(tmp_path / "two"), nproc=2)
    # each rank pads its prefixes and branches to its own longest (attention.TreeAttention), so attention sums in
    # another order than one process's (step-1 losses differ by ~1e-7 relative); four AdamW steps at lr 3e-3
    # make that up to 1.1e-5 in a weight (measured), hence 3e-5 here
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=3e-5)


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_lora_under_ddp_and_fsdp_equals_one_process(student, tmp_path, how):
    """--lora 4 on shared-prefix rows with micro-batches: two ranks (DDP, FSDP2 with frozen and trainable parameters
    in one layer) give one process's losses, adapters and merged weights."""
    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    args = ["--init", str(student), "--data", str(corpus), "--max-steps", "3", "--lora", "4", *COMMON]
    launch("train.py", *args, "--out", str(tmp_path / "one"))
    launch("train.py", *args, "--out", str(tmp_path / "two"), *(["--fsdp"] if how == "fsdp" else []), nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=3e-5)  # as shared-prefix rows under DDP, above
    a, b = (load_file(str(tmp_path / x / "last" / "adapter" / "adapter_model.safetensors")) for x in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=3e-5, rtol=0) for k in a)


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_kd_under_ddp_and_fsdp_equals_one_process(student, tmp_path, how):
    """--kd 0.5 on shared-prefix rows with micro-batches: each rank's examples carry their top-k; two ranks (DDP, or
    FSDP2: the head's weight gathered for the chunked KD loss) give one process's losses, KD terms and weights."""
    import teacher

    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    scored = teacher.main(["--teacher", str(tiny_student(tmp_path / "teacher", seed=1, soft=True)), "--score",
                           str(corpus), "--top-logprobs", "4", "--out", str(tmp_path / "scored.jsonl")])
    args = ["--init", str(student), "--data", str(scored), "--max-steps", "3", "--kd", "0.5", *COMMON]
    launch("train.py", *args, "--out", str(tmp_path / "one"))
    launch("train.py", *args, "--out", str(tmp_path / "two"), *(["--fsdp"] if how == "fsdp" else []), nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=3e-5)  # as shared-prefix rows under DDP, above
    kd = [[r["kd_loss"] for r in map(json.loads, (tmp_path / x / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
          for x in ("one", "two")]
    assert len(kd[0]) == 3 and kd[0][0] > 0.1 and max(abs(a - b) for a, b in zip(*kd)) <= 1e-5


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """Two ranks on a one-GPU machine: an error naming the fix, not CUDA's "invalid device ordinal"."""
    from fileio import InputError
    from distributed import Dist

    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(InputError, match=r"local rank 1, but this machine has 1 CUDA device\(s\).*--device cpu"):
        Dist.init(None)
