"""train.py: the loop learns, resumes exactly from any interruption, stops on divergence, runs end to end."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import model as model_module
import flags
import data
import train
from checkpoint import from_pretrained
from data import DEFAULT_DEV
from helpers import many_rationale_corpus, tiny_student

ROOT = train.Path(train.__file__).resolve().parent
INTERRUPTIBLE = ["--max-steps", "8", "--grad-accum", "2", "--save-every", "3"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def run(student, out, *extra):
    return train.main(["--init", str(student), "--out", str(out), "--limit", "64", "--batch-size", "4",
                       "--eval-every", "0", "--eval-questions", "4", "--lr", "3e-3", "--seed", "7", *extra])


def rows(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in rows(out) if "loss" in r]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_tiny_model_overfits_eight_examples(student, tmp_path):
    out = run(student, tmp_path / "o", "--limit", "12", "--max-steps", "150", "--lr", "1e-2", "--batch-size", "8",
              "--warmup-steps", "5", "--weight-decay", "0", "--min-lr-ratio", "1")
    assert losses(out)[0] > 4.0
    assert min(losses(out)[-5:]) < 0.05


# -----------------------------------------------------------------------------
# Exact resume from any interruption


@pytest.fixture(scope="module")
def straight(student, tmp_path_factory):
    return run(student, tmp_path_factory.mktemp("straight") / "run", *INTERRUPTIBLE)


def inject(monkeypatch, where, nth, action):
    """Call action() inside the nth training forward / backward / optimizer step, or the nth safetensors
    write of a checkpoint."""
    calls = {"n": 0}

    def hit():
        calls["n"] += 1
        if calls["n"] == nth:
            action()

    if where in ("forward", "backward"):
        forward = model_module.Transformer.forward

        def patched(self, idx, targets=None, **kw):
            if where == "forward" and targets is not None:
                hit()
            logits, loss = forward(self, idx, targets, **kw)
            if where == "backward" and targets is not None:
                loss.register_hook(lambda g: (hit(), g)[1])  # runs inside autograd's backward pass
            return logits, loss
        monkeypatch.setattr(model_module.Transformer, "forward", patched)
    elif where == "optimizer":
        step = torch.optim.AdamW.step

        def patched(self, *a, **kw):
            hit()
            return step(self, *a, **kw)
        monkeypatch.setattr(torch.optim.AdamW, "step", patched)
    else:
        save_file = checkpoint.save_file

        def patched(*a, **kw):
            hit()
            return save_file(*a, **kw)
        monkeypatch.setattr(checkpoint, "save_file", patched)


def interrupt_and_resume(student, out, monkeypatch, flags, signum):
    """A signal inside step 3's first forward (of INTERRUPTIBLE's 2 micro-batches a step), then --resume -> out."""
    with monkeypatch.context() as m:
        inject(m, "forward", 5, lambda: os.kill(os.getpid(), signum))
        with pytest.raises(SystemExit):
            run(student, out, *flags)
    run(student, out, *flags, "--resume")
    return out


@pytest.mark.parametrize("where,nth,signum", [
    ("forward", 5, signal.SIGINT),     # step 3, first micro-batch
    ("backward", 6, signal.SIGINT),    # step 3, second micro-batch
    ("optimizer", 4, signal.SIGINT),   # step 4, gradients done, weights not yet updated
    ("save", 1, signal.SIGINT),        # while writing `last` at step 3 (--save-every 3)
    ("forward", 11, signal.SIGTERM),   # step 6
])
def test_signal_anywhere_in_a_step_resumes_exactly(student, straight, tmp_path, monkeypatch, where, nth, signum):
    """Ctrl-C / SIGTERM delivered inside forward, backward, the optimizer step or a checkpoint write: the
    step in flight completes, `last` is saved, exit 130 / 143; --resume then gives every loss row and
    the final weights of the uninterrupted run, exactly."""
    out, handlers = tmp_path / "b", (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with monkeypatch.context() as m:
        inject(m, where, nth, lambda: os.kill(os.getpid(), signum))
        with pytest.raises(SystemExit) as e:
            run(student, out, *INTERRUPTIBLE)
    assert e.value.code == 128 + signum
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    stopped_at = len(losses(out))
    assert 0 < stopped_at < 8
    assert torch.load(out / "last" / train.STATE_FILE, weights_only=True)["step"] == stopped_at
    run(student, out, *INTERRUPTIBLE, "--resume")
    assert losses(out) == losses(straight)
    assert_same_weights(out / "last", straight / "last")


def test_second_ctrl_c_aborts_and_resume_uses_the_last_save(student, straight, tmp_path, monkeypatch):
    """Two Ctrl-C inside step 5: abort at once, nothing written for it; `last` is the step-3 save, and
    resuming from it (metrics of steps 4-5 dropped) still equals the uninterrupted run."""
    out = tmp_path / "b"
    with monkeypatch.context() as m:
        inject(m, "forward", 9, lambda: (os.kill(os.getpid(), signal.SIGINT), os.kill(os.getpid(), signal.SIGINT)))
        with pytest.raises(KeyboardInterrupt):
            run(student, out, *INTERRUPTIBLE)
    assert len(losses(out)) == 4
    assert torch.load(out / "last" / train.STATE_FILE, weights_only=True)["step"] == 3
    run(student, out, *INTERRUPTIBLE, "--resume")
    assert losses(out) == losses(straight)
    assert_same_weights(out / "last", straight / "last")


KILL_BETWEEN_RENAMES = """
import os, pathlib, signal, sys
import train
rename, seen = pathlib.Path.rename, []
def rename_or_die(self, target):
    if self.name == "last.tmp":
        seen.append(self)
        if len(seen) == 2:  # the second save of `last` (step 6): the old folder is already moved aside
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)
pathlib.Path.rename = rename_or_die
train.main(sys.argv[1:])
"""


def test_kill_9_inside_a_checkpoint_swap_resumes_exactly(student, straight, tmp_path):
    """kill -9 between the two renames that swap a new `last` in: the next run finds `last.tmp` complete
    and `last.old`, recovers the newer one (step 6) and continues to the uninterrupted result."""
    out = tmp_path / "k"
    argv = ["--init", str(student), "--out", str(out), "--limit", "64", "--batch-size", "4", "--eval-every", "0",
            "--eval-questions", "4", "--lr", "3e-3", "--seed", "7", *INTERRUPTIBLE]
    r = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (out / "last").exists() and (out / "last.tmp").exists() and (out / "last.old").exists()
    run(student, out, *INTERRUPTIBLE, "--resume")
    assert losses(out) == losses(straight)
    assert_same_weights(out / "last", straight / "last")
    assert not (out / "last.tmp").exists() and not (out / "last.old").exists()


# -----------------------------------------------------------------------------
# Divergence


def scale_gradients(monkeypatch, nth, factor):
    """Multiply every gradient of the nth training micro-batch by factor (nan, inf) during its backward."""
    forward = model_module.Transformer.forward
    calls = {"n": 0}

    def patched(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if targets is not None:
            calls["n"] += 1
            if calls["n"] == nth:
                loss.register_hook(lambda g: g * factor)
        return logits, loss
    monkeypatch.setattr(model_module.Transformer, "forward", patched)


def test_huge_learning_rate_stops_with_the_step_and_keeps_the_last_good_checkpoint(student, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(train.Diverged, match=r"step 2: loss .*gradient norm nan.*last good checkpoint is .*last \(step 1\)"):
        run(student, out, "--max-steps", "20", "--lr", "1e6", "--save-every", "1")
    assert torch.load(out / "last" / train.STATE_FILE, weights_only=True)["step"] == 1
    assert all(torch.isfinite(w).all() for w in weights(out / "last").values())
    assert not (out / "best").exists()
    from_pretrained(out / "last")  # loads: finite weights


def test_nan_gradient_stops_before_the_optimizer_step(student, tmp_path, monkeypatch):
    """A NaN injected into the gradients during step 3's backward: stopped there, before the optimizer
    step; `last` stays the finite step-2 save."""
    scale_gradients(monkeypatch, nth=3, factor=float("nan"))
    out = tmp_path / "o"
    with pytest.raises(train.Diverged, match=r"step 3: .*gradient norm nan.*last good checkpoint is .*last \(step 2\)"):
        run(student, out, "--max-steps", "6", "--save-every", "2")
    assert torch.load(out / "last" / train.STATE_FILE, weights_only=True)["step"] == 2
    assert len(losses(out)) == 2


def fp16_autocast_works():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not fp16_autocast_works(), reason="this torch has no fp16 autocast on CPU")
def test_fp16_overflow_is_skipped_by_the_scaler_not_an_error(student, tmp_path, monkeypatch):
    """An inf gradient under fp16 is what the GradScaler is for: the step is skipped, the scale halves,
    training goes on to the end with finite weights."""
    scale_gradients(monkeypatch, nth=2, factor=float("inf"))
    out = run(student, tmp_path / "o", "--max-steps", "3", "--dtype", "float16")
    state = torch.load(out / "last" / train.STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["scaler"]["scale"] == 2.0 ** 16 / 2  # one overflow: halved once
    assert all(math.isfinite(x) for x in losses(out))
    assert all(torch.isfinite(w).all() for w in weights(out / "last").values())


# -----------------------------------------------------------------------------
# Outputs, --out and --resume rules


def test_checkpoint_is_an_hf_folder_transformers_loads(student, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run(student, tmp_path / "o", "--max-steps", "2")
    ours = from_pretrained(out / "best")
    hf = AutoModelForCausalLM.from_pretrained(out / "best").eval()
    ids = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-4, rtol=0)
    assert (out / "last" / "trainer_state.pt").exists() and (out / "last" / "tokenizer.json").exists()
    assert json.loads((out / "best" / "scotd.json").read_text())["mode"] == "cot"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_existing_out_is_refused_unless_resume_or_overwrite(student, tmp_path, capsys):
    out = run(student, tmp_path / "o", "--max-steps", "2")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        run(student, out, "--max-steps", "2")
    assert e.value.code == 2 and "already holds a run; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    run(student, out, "--max-steps", "1", "--overwrite")
    assert len(losses(out)) == 1


def test_resume_refuses_changed_flags_naming_each(student, tmp_path, capsys):
    out = run(student, tmp_path / "o", "--max-steps", "2")
    with pytest.raises(SystemExit) as e:
        run(student, out, "--max-steps", "3", "--resume", "--lr", "1e-3", "--mode", "post")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--mode cot -> post" in err and "--lr 0.003 -> 0.001" in err and "--allow-changes" in err
    run(student, out, "--max-steps", "3", "--resume", "--lr", "1e-3", "--allow-changes")
    assert len(losses(out)) == 3 and "changed   --lr 0.003 -> 0.001" in capsys.readouterr().out


def test_packed_batches_train(student, tmp_path):
    out = run(student, tmp_path / "o", "--max-steps", "3", "--pack")
    assert len(losses(out)) == 3 and all(x == x for x in losses(out))


def test_command_line_end_to_end(student, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--init", str(student), "--max-steps", "3", "--out",
                        str(tmp_path / "cli"), "--limit", "32", "--eval-questions", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipped:" in r.stdout and "next      python evaluate.py --checkpoint" in r.stdout
    assert (tmp_path / "cli" / "best" / "model.safetensors").exists()


@pytest.mark.parametrize("rows", ["plain", "packed+shared", "packed+shared+lora"])
def test_compiled_training_matches_eager(student, tmp_path, rows):
    """--compile (the default on CUDA) against --no-compile over 3 steps: the same losses and weights (fp32, 1e-5),
    with plain rows, with packed shared-prefix rows (attention.TreeAttention), and those with LoRA adapters; the
    blocks compiled once for the 3 steps' shapes (a static compile and then a dynamic recompile was 3 and 2
    compiles here, and 35 % more time)."""
    fp32 = ("--dtype", "float32")  # on CUDA too: bfloat16 rounds eager and compiled kernels apart by ~4e-3
    # (dev from the validation file: all 20 questions train, in batches of 2+ groups -- a batch of one group would
    # specialise a size-1 dimension and compile again)
    layout = ("--pack", "--share-prefix", "on", "--data", str(many_rationale_corpus(tmp_path / "many.jsonl")),
              "--dev-data", str(DEFAULT_DEV)) if rows != "plain" else ()
    layout += ("--lora", "4") if rows.endswith("lora") else ()
    lr = ("--lr", "1e-4")  # AdamW's normalised update turns last-bit gradient differences into lr-sized ones
    eager = run(student, tmp_path / "e", "--max-steps", "3", "--no-compile", *fp32, *layout, *lr)
    torch._dynamo.reset()
    compiles = torch._dynamo.utils.compilation_time_metrics.setdefault("_compile.compile_inner", [])
    before = len(compiles)
    compiled = run(student, tmp_path / "c", "--max-steps", "3", "--compile", *fp32, *layout, *lr)
    # one graph for every length: no static first compile, then a dynamic one (LoRA: a second graph for the first
    # block, whose input needs no gradient -- the embeddings are frozen -- where the later blocks' inputs do)
    assert len(compiles) - before == (2 if rows.endswith("lora") else 1)
    assert len(losses(eager)) == 3 and max(abs(x - y) for x, y in zip(losses(eager), losses(compiled))) <= 1e-5
    we, wc = weights(eager / "last"), weights(compiled / "last")
    assert we.keys() == wc.keys()  # the raw module is saved: no _orig_mod prefix
    for k in we:
        torch.testing.assert_close(wc[k], we[k], atol=1e-5, rtol=0)


def test_shared_prefix_run_resumes_exactly(student, tmp_path, monkeypatch, capsys):
    """On a corpus with 3 rationales per question --share-prefix auto turns on (off turns it off); a SIGINT
    inside a training forward, then --resume, gives the uninterrupted run's loss rows and weights exactly."""
    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    flags = ["--data", str(corpus), *INTERRUPTIBLE]
    straight = run(student, tmp_path / "a", *flags)
    assert "shared-prefix rows" in capsys.readouterr().out
    out = interrupt_and_resume(student, tmp_path / "b", monkeypatch, flags, signal.SIGINT)
    assert losses(out) == losses(straight)
    assert_same_weights(out / "last", straight / "last")
    capsys.readouterr()
    run(student, tmp_path / "c", *flags, "--share-prefix", "off", "--max-steps", "2")
    assert "shared-prefix rows" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# One writer per --out

WAIT_AT_SECOND_STEP = """
import os, pathlib, sys, time
import train
real, calls = train.train_step, []
def waiting(*a, **k):
    calls.append(1)
    if len(calls) == 2:  # mid-run: say so, then wait for the test's go
        pathlib.Path(os.environ["READY"]).touch()
        while not pathlib.Path(os.environ["GO"]).exists():
            time.sleep(0.05)
    return real(*a, **k)
train.train_step = waiting
train.main(sys.argv[1:])
"""


# One thread and no MKL dynamic threads in the processes compared: the same sums in the same order under any load
# (with torch's default threads, a run under a competing CPU load once gave a first loss 7.5e-6 off).
PINNED = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}


def live_run(student, out, tmp_path):
    """A train.py process paused inside its second step, holding --out -> (the process, its argv, the go file)."""
    argv = ["--init", str(student), "--out", str(out), "--limit", "64", "--batch-size", "4", "--eval-every", "0",
            "--eval-questions", "4", "--lr", "3e-3", "--seed", "7", *INTERRUPTIBLE]
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", WAIT_AT_SECOND_STEP, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=PINNED | {"READY": str(ready), "GO": str(go)})
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    return proc, argv, go


def test_a_second_run_into_a_live_out_is_refused_and_touches_nothing(student, straight, tmp_path):
    """While one run writes --out, another -- plain, --overwrite or --resume -- exits 2 at once naming the
    folder and the pid that holds it; the first run's outputs are those of a run alone (a process of the same
    pinned threads: equal exactly, whatever else the machine runs)."""
    out = tmp_path / "race"
    proc, argv, go = live_run(student, out, tmp_path)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            r = subprocess.run([sys.executable, "train.py", *argv, *extra], cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 2, r.stderr[-2000:]
            assert f"error: {out}: another process (pid {proc.pid}) is writing there" in r.stderr
    finally:
        go.touch()
    assert proc.wait(300) == 0, proc.stderr.read()[-2000:]
    alone = tmp_path / "alone"
    argv[argv.index("--out") + 1] = str(alone)
    r = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=PINNED, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(out) == losses(alone) and losses(out)[0] == pytest.approx(losses(straight)[0], abs=1e-4)
    assert (out / "last" / "model.safetensors").read_bytes() == (alone / "last" / "model.safetensors").read_bytes()


def test_a_lock_left_by_a_killed_run_is_taken_over(student, straight, tmp_path):
    out = tmp_path / "killed"
    proc, argv, go = live_run(student, out, tmp_path)
    proc.kill()
    proc.wait()
    assert (out / ".lock").exists()
    run(student, out, *INTERRUPTIBLE, "--overwrite")
    assert losses(out) == losses(straight)


# -----------------------------------------------------------------------------
# The run's settings


def test_every_flag_is_a_setting_of_the_frozen_run_config(tmp_path):
    """RunConfig holds each flag of --help (a new flag cannot be forgotten) plus the settings resolved from the
    data; a helper cannot change one (frozen). (--out in tmp_path: the default, runs/cot, already holds a run
    once a user has run README's `python train.py`, and check_args rightly refuses it.)"""
    named = {a.dest for a in train.parser()._actions if a.dest != "help"}
    fields = set(flags.RunConfig.__dataclass_fields__)
    assert fields - named == {"shared", "changed", "batches_per_epoch", "total_steps", "warmup"}
    assert named <= fields
    cfg = train.get_args(["--max-steps", "3", "--out", str(tmp_path / "run")])
    with pytest.raises(AttributeError):
        cfg.batch_size = 4


def test_resume_of_a_run_with_the_device_defaults_is_not_refused(student, tmp_path):
    """A run that left --batch-size and --dtype to the device, resumed with the same (short) command: the
    saved settings hold the defaults it used, and the resumed run resolves the same ones, so nothing is
    reported changed (before RunConfig, `--batch-size 8 -> None` refused the resume)."""
    out = tmp_path / "o"
    argv = ["--init", str(student), "--out", str(out), "--limit", "16", "--max-steps", "2", "--eval-every", "0",
            "--eval-questions", "2"]
    train.main(argv)
    assert json.loads((out / "args.json").read_text())["batch_size"] == flags.CPU_DEFAULT["batch_size"]
    resumed = train.get_args(argv + ["--resume"])
    assert resumed.resume == out / "last" and resumed.changed == ()
    assert resumed.batch_size == flags.CPU_DEFAULT["batch_size"] and resumed.dtype == "float32"


def test_token_budget_micro_batches_train_and_resume_exactly(student, tmp_path, monkeypatch, capsys):
    """--tokens-per-step: micro-batches as many examples as fit the budget (they vary in size); the budget line
    says so; stopped by SIGTERM inside step 3 and resumed, the same losses and weights as the uninterrupted run."""
    flags = [*INTERRUPTIBLE, "--tokens-per-step", "1600"]
    straight = run(student, tmp_path / "a", *flags)
    assert "x <= 800 tokens" in capsys.readouterr().out
    sizes = []
    real = data.to_tensors
    monkeypatch.setattr(data, "to_tensors", lambda batch, *a: (sizes.append(len(batch)), real(batch, *a))[1])
    out = interrupt_and_resume(student, tmp_path / "b", monkeypatch, flags, signal.SIGTERM)
    assert len(set(sizes)) > 1 and max(sizes) > 4  # not --batch-size 4: as many as fit 800 tokens
    assert losses(out) == losses(straight)
    assert_same_weights(out / "last", straight / "last")
