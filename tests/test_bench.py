"""bench/bench.py's machinery (not its numbers): --profile's files, the GPU-busy arithmetic, and a measurement that
survives its profile failing or its worker dying while it profiles."""

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_student

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("bench") / "tiny")


def sample(folder, **kw):
    return dict(name=str(folder), n=2, questions=2, batch_size=2, device="cpu", dtype="float32", max_new_tokens=4) | kw


def test_covered_counts_overlapping_intervals_once():
    assert bench.covered([]) == 0
    assert bench.covered([(0, 10), (20, 25)]) == 15
    assert bench.covered([(5, 15), (0, 10), (12, 13), (30, 31)]) == 16  # unsorted, overlapping, nested
    assert bench.covered([(0, 10), (10, 20)]) == 20


def test_profile_writes_what_each_measurement_ran(tiny, tmp_path, monkeypatch):
    """--profile: each worker, in its own process, profiles one more run of its work and writes it to its own file
    (kind, model, side, and a digest of the rest), titled with what it measured; the measurement still comes back."""
    monkeypatch.setattr(bench, "PROFILE_DIR", str(tmp_path / "profiles"))
    for n in (2, 3):
        result = bench.measure("sample", "ours", **sample(tiny, n=n))
        assert result["generated"] > 0 and result["tok_s"] > 0
    files = sorted((tmp_path / "profiles").iterdir())
    assert len(files) == 2 and all(f.name.startswith("sample-tiny-ours-") for f in files), files
    texts = [f.read_text() for f in files]
    assert sorted(json.loads(t.splitlines()[0])["n"] for t in texts) == [2, 3]
    for text in texts:
        assert text.splitlines()[1].startswith("profiled run: ")
        assert "aten::linear" in text and "Self CPU time total" in text  # the model ran under the profiler


def test_a_failed_profile_is_written_not_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "PROFILE", (tmp_path / "p.txt", "what it measured"))

    def fails():
        raise RuntimeError("CUPTI said no")
    bench.profiled(torch.device("cpu"), fails)
    assert (tmp_path / "p.txt").read_text() == "what it measured\nprofile failed: RuntimeError: CUPTI said no\n"


def test_a_worker_that_dies_while_it_profiles_keeps_its_measurement(tiny, tmp_path, monkeypatch):
    """The fault where it hurts: the worker process dies hard inside the profiled run (as a CUDA or CUPTI crash
    would), after its measurement: the measurement stands and is recorded; a worker that dies before measuring
    fails its row."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # runs at the worker's start-up: the profiler's entry kills the process
        "import os, torch.profiler\n"
        "torch.profiler.profile.__enter__ = lambda self: os._exit(int(os.environ['DIE_WITH']))\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("DIE_WITH", "3")
    monkeypatch.setattr(bench, "PROFILE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path / "results.jsonl"))
    result = bench.measure("sample", "ours", keep_going=True, **sample(tiny))
    assert "failed" not in result and result["generated"] > 0
    assert list((tmp_path / "profiles").iterdir()) == []  # it died before writing
    [rec] = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rec["generated"] == result["generated"] and rec["side"] == "ours"

    failed = bench.measure("sample", "ours", keep_going=True, **sample(tiny, name=str(tmp_path / "missing")))
    assert "failed" in failed and "missing" in failed["failed"]  # the error's last line


def test_prewarm_runs_each_warm_up_and_measures_nothing(tiny, tmp_path, monkeypatch, capsys):
    """--prewarm: every planned measurement's worker runs to the end of its warm-up, in parallel, and stops there
    (nothing timed, nothing recorded); a warm-up that fails says why and the others go on. The timed run after it
    finds its compiled graphs in the cache, and says where its wall time went."""
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path / "results.jsonl"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold, then shared by the workers
    out = bench.subprocess.run(bench.worker_command("sample", "ours", sample(tiny)) + ["--warm-only"],
                               capture_output=True, text=True, cwd=bench.ROOT)
    assert out.stdout.strip().splitlines()[-1] == '{"warmed": true}' and '"tok_s"' not in out.stdout, out.stderr[-2000:]
    jobs = [("sample", "ours", sample(tiny)), ("decode_step", "ours", dict(
        name=str(tiny), rows=2, device="cpu", dtype="float32", steps=2, prompt=4, slots=16)),
        ("sample", "ours", sample(tiny, name=str(tmp_path / "missing")))]
    bench.prewarm(jobs, 3, 600)
    err = capsys.readouterr().err.splitlines()
    assert sorted(line.split(":")[0] for line in err) == ["warm-up decode_step " + str(tiny) + " ours",
                                                          "warm-up sample " + str(tiny) + " ours",
                                                          "warm-up sample " + str(tmp_path / "missing") + " ours"]
    assert sum(": done (" in line for line in err) == 2
    assert any("missing" in line.split(": ", 1)[1] for line in err if "missing ours" in line)
    assert not (tmp_path / "results.jsonl").exists()

    timed = bench.measure(jobs[1][0], jobs[1][1], **jobs[1][2])
    assert timed["compile"]["frames"] == 1 and timed["compile"]["fx_graphs"] == "1 cached / 1", timed
    assert list(timed["phases"]) == ["start-up", "warm-up", "timed"]
    assert timed["compile"]["seconds"] < timed["phases"]["warm-up"] < timed["wall_s"]
    assert sum(timed["phases"].values()) <= timed["wall_s"]
    line = capsys.readouterr().err.strip()
    assert "s in all: start-up " in line and ", FX graphs 1 cached / 1), timed " in line, line


def test_the_gpu_suite_plans_the_rows_that_close_issue_49_first():
    """The rows #49 is closed by come first, each with transformers' side right after ours (OPT-1.3b's MFU, the
    teacher at N = 30, the decode step), so a call cut by --deadline keeps those; every row is planned once."""
    jobs = []
    bench.gpu_suite("cuda", "bfloat16", False,
                    measure=lambda kind, side, keep_going=False, **kw: jobs.append((kind, side, kw)) or {})
    keys = [bench.measured_key(kind, side, kw) for kind, side, kw in jobs]
    assert len(set(keys)) == len(keys) == 22 + 8 + 8  # #32's rows, #45's families (2 x train and sample), #46's LoRA (2 x 2)
    firsts = [(kind, side, kw.get("rows") or kw.get("n") or kw.get("batch_tokens"), kw["name"]) for kind, side, kw in jobs[:8]]
    assert firsts == [("train", "ours", 16384, "opt-1.3b-random"), ("train", "hf", 16384, "opt-1.3b-random"),
                      ("sample", "ours", 30, "qwen2.5-1.5b-random"), ("sample", "hf", 30, "qwen2.5-1.5b-random"),
                      ("decode_step", "ours", 256, "smollm2-135m-random"), ("decode_step", "hf", 256, "smollm2-135m-random"),
                      ("decode_step", "ours", 32, "smollm2-135m-random"), ("decode_step", "hf", 32, "smollm2-135m-random")]


def test_the_decode_step_rows_do_the_same_work_on_both_sides(tiny):
    """The decode-step row's two sides read the same prompt into a static cache and step the same greedy tokens:
    transformers' StaticCache at the positions ours writes (its last step's logits equal ours to 1e-5; a cache
    position that does not advance moves them by ~1e-2)."""
    kw = dict(name=str(tiny), rows=3, device=torch.device("cpu"), dtype=torch.float32, steps=6, prompt=5, slots=32,
              compile=False)
    ours, _ = bench.decode_step_worker("ours", **kw)
    hf, _ = bench.decode_step_worker("hf", **kw)
    assert ours["tokens"] == hf["tokens"] and len(ours["tokens"]) == 6
    torch.testing.assert_close(torch.tensor(hf["logits"]), torch.tensor(ours["logits"]), atol=1e-5, rtol=0)
    assert ours["ms_per_step"] > 0 and hf["ms_per_step"] > 0
