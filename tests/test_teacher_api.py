"""teacher.py --api: a served teacher. End to end against llama.cpp's real server (xllamacpp serving the default
student's GGUF), and fault by fault against a misbehaving server (fault_server.py). Every server listens on
127.0.0.1 and is stopped by its pid when its test ends, failed or not."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import api
import cli
import fileio
import data
import distill
import teacher
from checkpoint import default_student, load_tokenizer
from helpers import many_rationale_corpus, tiny_pair, tiny_student
from scotd import format_query

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-test-Zq8V3kP1-never-to-be-seen"


def start(cmd, timeout=120):
    """A server as its own process -> (process, its base URL), once it says it is listening."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    deadline = time.time() + timeout
    line = ""
    while time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith("listening "):
            return proc, line.split()[1]
    stop(proc)
    raise RuntimeError(f"{cmd} did not start: {line!r}")


def stop(proc):
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def llama():
    """llama.cpp's server on the default student's GGUF (4 slots)."""
    proc, url = start([sys.executable, "experiments/llama_server.py", "--port", "0", "--parallel", "4", "--ctx", "2048",
                       "--threads", "2", "--alias", "smol"])
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture
def faulty(tmp_path):
    """start(script) -> (the fault server's URL, a function returning the requests it has seen)."""
    procs = []

    def start_script(script="", text=None, model=None):
        log = tmp_path / f"requests-{len(procs)}.jsonl"
        log.touch()
        cmd = [sys.executable, str(ROOT / "tests" / "fault_server.py"), "--script", script, "--log", str(log)]
        proc, url = start(cmd + (["--text", text] if text else []) + (["--model", str(model)] if model else []), timeout=60)
        procs.append(proc)
        return url, lambda: [json.loads(line) for line in log.read_text().splitlines()]

    yield start_script
    for proc in procs:
        stop(proc)


def run(url, out, *extra, limit=3, n=3):
    return teacher.main(["--api", url, "--model", "smol", "--out", str(out), "--limit", str(limit), "--n", str(n),
                         "--shots", "2", "--max-new-tokens", "24", "--retry-wait", "0.01", "--timeout", "120", *extra])


# teacher.py as a terminal starts it: Ctrl-C raises KeyboardInterrupt and no signal is blocked, whatever this test
# process passes on (a suite started in the background of a script inherits SIGINT ignored, and so would its children)
AS_IN_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "signal.pthread_sigmask(signal.SIG_SETMASK, []); sys.argv = sys.argv[1:]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")


def cli_run(url, out, *extra, env=None, limit=3, n=3):
    cmd = [sys.executable, "-c", AS_IN_A_TERMINAL, "teacher.py", "--api", url, "--model", "smol", "--out", str(out),
           "--limit", str(limit), "--n", str(n), "--shots", "2", "--max-new-tokens", "24", "--retry-wait", "0.01",
           "--timeout", "120", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONFAULTHANDLER": "1"} | (env or {}))


def exit_code(proc, timeout):
    """proc's exit code; if it has not exited within `timeout` s, fail with why: its signal state and the stack of
    every thread (faulthandler, on SIGABRT)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        state = [line.strip() for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                 if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
        proc.send_signal(signal.SIGABRT)
        err = proc.communicate(timeout=30)[1]
        pytest.fail(f"still running {timeout} s later; {state}; its stderr:\n{err[-6000:]}")


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def totals(out):
    (run,) = data.run_totals(out)
    return run


# -----------------------------------------------------------------------------
# against llama.cpp's server


def test_real_server_writes_n_chains_with_logprobs_and_usage(llama, tmp_path):
    out = run(llama, tmp_path / "c.jsonl", "--seed", "1", "--concurrency", "2", limit=4, n=3)
    records = data.read_corpus(out)
    questions = teacher.prompt_and_questions(teacher.get_args(["--api", llama, "--model", "m", "--out", "x", "--shots",
                                                               "2", "--limit", "4"]))[0]
    assert [r["id"] for r in records] == [q["id"] for q in questions]  # in question order, exemplars left out
    assert all(len(r["rationales"]) == 3 for r in records)
    chains = [c for r in records for c in r["rationales"]]
    assert all(c["teacher_logprob"] < 0 and c["teacher_tokens"] > 0 for c in chains)
    assert all(c["correct"] == (c["prediction"] == r["answer"]) for r in records for c in r["rationales"])
    cost = totals(out)
    assert cost["questions"] == 4 and cost["requests"] == 4 and cost["retries"] == 0 and cost["malformed"] == 0
    assert cost["prompt_tokens"] > 4 * 100  # the 2-shot header and the question, each request
    assert cost["completion_tokens"] >= sum(c["teacher_tokens"] for c in chains)  # what a stop cut off is billed too
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["api"] == llama and meta["model"] == "smol" and meta["sampling"]["seed"] == 1
    assert "api requests      4 (0 retries" in data.stats(out)


def test_real_server_that_cannot_grade_given_tokens_is_refused_in_one_line(llama, tmp_path, capsys):
    """llama.cpp returns no prompt log-probabilities: scoring a corpus through it (--score --api) ends at the first
    request with one line naming what the server lacks, and writes no record."""
    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: teacher.main(["--api", llama, "--model", "smol", "--score", str(corpus), "--top-logprobs", "5",
                                      "--tokenizer", str(default_student()), "--out", str(tmp_path / "s.jsonl")]))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("error: question ") and "chain 1: " in err
    assert "returned no prompt log-probabilities: the server lacks vLLM's `prompt_logprobs`" in err
    assert not (tmp_path / "s.jsonl").exists()


def test_served_scoring_in_vllms_format_equals_the_local_teachers(faulty, tmp_path):
    """--score --top-logprobs 5 through a server that answers in vLLM's prompt_logprobs format (the same tiny model
    behind it) writes the local teacher's records and sidecar: the same top-k ids and spans, log-probabilities to
    float16's precision and teacher_logprob to 1e-5 relative; the request sends token ids; a 500 is retried."""
    model = tiny_student(tmp_path / "teacher", soft=True)
    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    local = teacher.main(["--teacher", str(model), "--score", str(corpus), "--top-logprobs", "5",
                          "--out", str(tmp_path / "local" / "s.jsonl")])
    url, requests = faulty("ok,ok,500", model=model)
    served = teacher.main(["--api", url, "--model", "smol", "--score", str(corpus), "--top-logprobs", "5", "--tokenizer",
                           str(model), "--concurrency", "2", "--retry-wait", "0.01", "--out", str(tmp_path / "s.jsonl")])
    a, b = data.read_corpus(local), data.read_corpus(served)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
        for x, y in zip(ra["rationales"], rb["rationales"]):
            assert x["topk"] == y["topk"] and x["teacher_tokens"] == y["teacher_tokens"]
            assert x["teacher_logprob"] == pytest.approx(y["teacher_logprob"], rel=1e-5)  # a sum of ~80 fp32 terms
    (ha, sa), (hb, sb) = distill.read_sidecar(str(local) + ".topk"), distill.read_sidecar(str(served) + ".topk")
    assert ha["tokenizer"] == hb["tokenizer"] and ha["k"] == hb["k"] == 5
    assert (sa["token"] == sb["token"]).all() and (sa["ids"] == sb["ids"]).all()
    assert abs(sa["logprobs"].astype("f4") - sb["logprobs"].astype("f4")).max() <= 1e-3
    sent = requests()
    assert len(sent) == 60 + 1 and all(isinstance(r["body"]["prompt"], list) and r["body"]["prompt_logprobs"] == 5
                                       for r in sent)
    assert totals(served)["retries"] == 1


def test_a_server_with_another_tokenizer_is_refused(faulty, tmp_path):
    """The served model reads the ids with its own vocabulary: a --tokenizer that names them otherwise is refused."""
    served = tiny_student(tmp_path / "served")
    spec = json.loads((served / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]  # the same tokens and merges, ids 1.. in reverse: another vocabulary, same size
    spec["model"]["vocab"] = {t: (len(vocab) - i if i else 0) for t, i in vocab.items()}
    (served / "tokenizer.json").write_text(json.dumps(spec))
    url, _ = faulty(model=served)
    other = tiny_student(tmp_path / "ours")
    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    with pytest.raises(fileio.InputError, match=r"chain 1: the server's model reads token \d+ as '.*', --tokenizer as .*same"):
        teacher.main(["--api", url, "--model", "smol", "--score", str(corpus), "--top-logprobs", "5",
                      "--tokenizer", str(other), "--retry-wait", "0.01", "--out", str(tmp_path / "s.jsonl")])


def test_on_policy_with_a_served_teacher_grades_the_students_tokens_as_the_local_teacher(faulty, tmp_path, monkeypatch,
                                                                                       capsys):
    """train.py --on-policy --teacher-api: each chain the student samples is sent as token ids; the log-probability
    the server gives each sampled token is the local teacher's (1e-5); a run of 3 steps through a server that fails
    once completes and logs the estimator's divergence; a run against the local teacher samples the same chains.
    The key ($OPENAI_API_KEY) is sent, and is in no file the run writes nor in what it prints."""
    import flags
    import losses
    import onpolicy
    import train
    from checkpoint import from_pretrained
    from sample import SampleConfig

    student, graded = tiny_pair(tmp_path)
    corpus = many_rationale_corpus(tmp_path / "many.jsonl")
    url, requests = faulty("ok,500", model=graded)
    tok = load_tokenizer(student)
    onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(n=2, temperature=1.0, max_new_tokens=12),
                           client=api.Client(url, "smol", retry_wait=0.01))
    onp.concurrency = 2
    examples, _ = onp.sample(from_pretrained(student), data.read_corpus(corpus)[:2], seed=3)
    rows = data.to_tensors(examples, flags.RunConfig(batch_size=4), 0, torch.device("cpu"))
    served = onp.grade(rows.idx, rows.target_idx, examples, torch.device("cpu"))
    teacher_model = from_pretrained(graded)
    with torch.no_grad():
        logp = teacher_model(rows.idx)[0].log_softmax(-1).flatten(0, 1)[rows.target_idx]
    want = logp.gather(1, rows.targets.flatten()[rows.target_idx][:, None])[:, 0]
    assert isinstance(served, losses.SampledTokens) and len(served.logprobs) == rows.n_targets
    torch.testing.assert_close(served.logprobs, want, atol=1e-5, rtol=0)
    assert [r["body"]["prompt"] for r in requests()][-1] in [e[0].tolist() for e in examples]
    onp.header = header = tok.encode("Q: a worked example\nA: its answer.\n\n", add_special_tokens=False).ids
    served = onp.grade(rows.idx, rows.target_idx, examples, torch.device("cpu"))  # --teacher-shots: header first
    with torch.no_grad():
        want = torch.cat([teacher_model(torch.tensor([header + ids.tolist()]))[0][0, len(header) + n - 1:-1]
                          .log_softmax(-1).gather(1, torch.tensor(ids[n:], dtype=torch.long)[:, None])[:, 0]
                          for ids, n in examples])
    torch.testing.assert_close(served.logprobs, want, atol=1e-5, rtol=0)
    assert [r["body"]["prompt"][:len(header)] for r in requests()][-1] == header
    args = ["--init", str(student), "--data", str(corpus), "--on-policy", "--max-steps", "3", "--batch-size", "4",
            "--on-policy-n", "2", "--max-new-tokens", "12", "--eval-every", "0", "--eval-questions", "2",
            "--teacher-shots", "0"]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    train.main(args + ["--teacher-api", url, "--teacher-model", "smol", "--out", str(tmp_path / "served")])
    assert requests()[-1]["auth"] == f"Bearer {SECRET}" and SECRET not in "".join(capsys.readouterr())
    assert not [p for p in (tmp_path / "served").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    train.main(args + ["--teacher", str(graded), "--out", str(tmp_path / "local")])
    metrics = [[json.loads(line) for line in (tmp_path / x / "metrics.jsonl").read_text().splitlines()][:3]
               for x in ("served", "local")]
    assert [r["sampled_tokens"] for r in metrics[0]] == [r["sampled_tokens"] for r in metrics[1]]
    assert all(r["divergence"] == r["divergence"] and r["loss"] != r["divergence"] for r in metrics[0])


def test_on_policy_with_a_server_that_cannot_grade_is_refused_in_one_line(llama, tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main(["--init", str(default_student()), "--data", str(many_rationale_corpus(tmp_path / "m.jsonl")),
                                    "--on-policy", "--teacher-api", llama, "--teacher-model", "smol", "--max-steps", "1",
                                    "--batch-size", "2", "--on-policy-n", "2", "--max-new-tokens", "8",
                                    "--out", str(tmp_path / "r")]))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("error: on-policy chain 1 of the step: ")
    assert "returned no prompt log-probabilities: the server lacks vLLM's `prompt_logprobs`" in err


def test_real_server_chat_style_and_socratic_dialogues(llama, tmp_path):
    out = run(llama, tmp_path / "chat.jsonl", "--api-style", "chat", "--seed", "2", limit=2, n=2)
    records = data.read_corpus(out)
    assert len(records) == 2 and all(len(r["rationales"]) == 2 for r in records)
    assert all(c["teacher_logprob"] < 0 for r in records for c in r["rationales"])
    out = teacher.main(["--api", llama, "--model", "smol", "--socratic", "--limit", "2", "--max-new-tokens", "16",
                        "--out", str(tmp_path / "s.jsonl")])
    records = data.read_corpus(out)
    assert len(records) == 2
    turns = 0
    for r in records:  # each problem: its questions, or the step where the teacher asked nothing
        steps = r["rationales"][0]["steps"] if r["rationales"] else None
        if r["rationales"]:
            assert len(r["rationales"][0]["subquestions"]) == len(steps)
            turns += len(steps)
        else:
            turns += len(r["rejected"][0]["subquestions"]) + 1
    assert totals(out)["requests"] == turns  # one request a turn


def test_kill_9_mid_run_then_the_rerun_completes_the_file(llama, tmp_path):
    out = tmp_path / "c.jsonl"
    proc = cli_run(llama, out, "--seed", "1", "--concurrency", "1", limit=6, n=2)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = out.read_bytes()
    assert first.count(b"\n") >= 2
    with open(out, "ab") as f:
        f.write(b'{"id": "cut by the ki')  # as a kill mid-write leaves it
    run(llama, out, "--seed", "1", limit=6, n=2)
    assert out.read_bytes().startswith(first[:first.rfind(b"\n") + 1])
    records = data.read_corpus(out)
    assert len(records) == 6 and len({r["id"] for r in records}) == 6 and all(len(r["rationales"]) == 2 for r in records)


# -----------------------------------------------------------------------------
# faults


def test_faults_are_retried_and_counted_and_the_corpus_comes_out_complete(faulty, tmp_path):
    """429 (after its Retry-After), 500, a dropped and a reset connection, a stall past the timeout, a body
    that is not JSON, one without choices: each retried and counted; a server that returns fewer choices than
    asked is asked again for the rest. Nothing malformed becomes a rationale."""
    url, seen = faulty("429:1,500,drop,reset,stall:6,malformed,nochoices,fewer")
    out = run(url, tmp_path / "c.jsonl", "--timeout", "2", "--concurrency", "1", limit=2, n=3)
    records = data.read_corpus(out)
    assert len(records) == 2 and all(len(r["rationales"]) == 3 for r in records)
    # the chain is cut after its answer sentence: 9 of the 12 tokens, -0.5 each
    assert all(c["text"] == "Because it is." and c["teacher_tokens"] == 9 and c["teacher_logprob"] == -4.5
               for r in records for c in r["rationales"])
    requests = seen()
    asked = [r["body"]["n"] for r in requests]
    assert [r["action"] for r in requests] == ["429:1", "500", "drop", "reset", "stall:6", "malformed", "nochoices",
                                              "fewer", "ok", "ok"]
    assert asked == [3] * 8 + [2, 3]  # after "fewer" gave 1 of 3, the next request asks for the other 2
    assert requests[1]["t"] - requests[0]["t"] >= 1.0  # Retry-After: 1 was honoured
    cost = totals(out)
    assert (cost["requests"], cost["retries"], cost["malformed"]) == (10, 7, 2)


def test_what_cannot_be_retried_ends_at_once_with_the_servers_message(faulty, tmp_path):
    url, seen = faulty("404")
    with pytest.raises(api.ApiError, match=r"^question \w+: http://127\.0\.0\.1:\d+/v1/completions answered HTTP 404: "
                                           r"model 'smol' not found$"):
        run(url, tmp_path / "c.jsonl", "--concurrency", "1")
    assert len(seen()) == 1 and not (tmp_path / "c.jsonl").exists()  # nothing written, not even an empty file


@pytest.mark.parametrize("script", ["500," * 3, ""])
def test_retries_give_up_with_one_line_naming_the_question(faulty, tmp_path, script):
    if script:
        url, seen = faulty(script)
    else:  # nothing listens there: connection refused
        url, seen = faulty()
        url = url.rsplit(":", 1)[0] + ":9"  # the discard port, closed on this machine
    first = teacher.prompt_and_questions(teacher.get_args(["--api", url, "--model", "m", "--out", "x", "--shots", "2"]))[0][0]
    with pytest.raises(api.ApiError) as e:
        run(url, tmp_path / "c.jsonl", "--max-retries", "2", "--concurrency", "1")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"question {first['id']}: ")
    assert "gave up after 3 attempts; the last: " + ("HTTP 500: internal error" if script else "ConnectError") in message


def test_the_key_is_sent_but_never_shown(faulty, tmp_path):
    """The key comes from the environment, travels in the Authorization header, and appears in no output,
    file or error message -- not even when the server echoes it back."""
    url, seen = faulty("401")
    proc = cli_run(url, tmp_path / "c.jsonl", "--api-key-env", "MY_TEACHER_KEY", "--concurrency", "1",
                   env={"MY_TEACHER_KEY": SECRET})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr.splitlines()[-1].startswith("error: question ")
    assert "answered HTTP 401: invalid API key: Bearer ***" in stderr
    assert seen()[0]["auth"] == f"Bearer {SECRET}"
    assert SECRET not in stdout + stderr
    written = [f for f in tmp_path.rglob("*") if f.is_file() and not f.name.startswith("requests-")]  # not the server's log
    assert written and all(SECRET not in f.read_text() for f in written)
    proc = cli_run(url, tmp_path / "d.jsonl", "--api-key-env", "NOT_SET_ANYWHERE")
    assert proc.wait(60) == 2 and "NOT_SET_ANYWHERE is not set" in proc.stderr.read()
    with pytest.raises(SystemExit) as e:
        teacher.get_args(["--api", "http://user:pw@127.0.0.1:1/v1", "--model", "m", "--out", "x"])
    assert e.value.code == 2


def test_ctrl_c_exits_130_with_every_line_valid_and_the_rerun_completes(faulty, tmp_path):
    url, seen = faulty("ok,ok,stall:60")
    out = tmp_path / "c.jsonl"
    proc = cli_run(url, out, "--concurrency", "1", "--timeout", "90", limit=4)
    deadline = time.time() + 60
    while time.time() < deadline and (len(seen()) < 3 or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    assert exit_code(proc, 30) == 130 and time.time() - t0 < 10  # not waiting for the stalled request
    assert [r["id"] for r in lines(out)] == [r["id"] for r in data.read_corpus(out)] and len(lines(out)) == 2
    run(url, out, limit=4)
    assert len(data.read_corpus(out)) == 4


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_ctrl_c_and_sigterm_go_to_the_main_thread_not_to_a_worker_in_a_request():
    """The workers block SIGINT and SIGTERM, so the kernel hands them to the main thread (which raises
    KeyboardInterrupt at once), never to a worker waiting on a stalled request; the main thread's mask is kept."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    masks = [mask for _, mask in api.in_order(lambda job: signal.pthread_sigmask(signal.SIG_BLOCK, []), range(4), 2)]
    assert all({signal.SIGINT, signal.SIGTERM} <= mask for mask in masks)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before and signal.SIGINT not in before


def test_records_land_in_question_order_whatever_finishes_first(faulty, tmp_path):
    url, seen = faulty("slow:1.5")  # the first question's request is the slowest
    out = run(url, tmp_path / "c.jsonl", "--concurrency", "3", limit=5)
    questions = teacher.prompt_and_questions(teacher.get_args(["--api", url, "--model", "m", "--out", "x", "--shots", "2",
                                                               "--limit", "5"]))[0]
    assert [r["id"] for r in lines(out)] == [q["id"] for q in questions]
    requests = seen()
    assert len(requests) == 5 and max(r["t"] for r in requests[1:]) < requests[0]["t"] + 1.5  # they ran meanwhile


def test_a_changed_setting_is_refused_by_name(faulty, tmp_path):
    url, _ = faulty()
    out = run(url, tmp_path / "c.jsonl", limit=1)
    with pytest.raises(fileio.InputError, match=r"sampled with other settings: model smol -> other; "
                                             r"sampling\.temperature 1\.0 -> 0\.5\. Use the same flags"):
        teacher.main(["--api", url, "--model", "other", "--out", str(out), "--limit", "1", "--n", "3", "--shots", "2",
                      "--max-new-tokens", "24", "--temperature", "0.5"])


def test_dry_run_states_the_cost_and_sends_nothing(faulty, tmp_path, capsys):
    url, seen = faulty()
    args = ["--api", url, "--model", "m", "--out", str(tmp_path / "c.jsonl"), "--limit", "5", "--n", "30", "--shots", "2"]
    teacher.main(args + ["--dry-run"])
    said = capsys.readouterr().out
    records, header, _, _ = teacher.prompt_and_questions(teacher.get_args(args))
    tok = load_tokenizer(default_student())
    prompt = sum(len(tok.encode(header + format_query(r["question"], r["choices"]), add_special_tokens=False).ids)
                 for r in records)
    assert "requests  5 (one a question;" in said and f"prompt    about {prompt:,} tokens" in said
    assert f"completion at most {5 * 30 * 96:,} tokens" in said
    assert seen() == [] and [f.name for f in tmp_path.iterdir()] == ["requests-0.jsonl"]  # the server's log only


def test_min_correct_stops_a_question_once_k_chains_are_right(faulty, tmp_path):
    """The server always answers (a): questions whose answer is (a) stop after the first round of K = 2, the
    others get all of --n = 5 (rounds of 2, 2, 1)."""
    corpus = tmp_path / "q.jsonl"
    qs = [{"id": f"q{i}", "question": f"Question {i}?", "choices": ["alpha", "beta"], "answer": a, "rationales": []}
          for i, a in enumerate(["alpha", "beta", "alpha"])]
    corpus.write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "header.txt").write_text("Answer the question.\n\n")
    url, seen = faulty()
    out = run(url, tmp_path / "c.jsonl", "--data", str(corpus), "--min-correct", "2", "--prompt", str(tmp_path / "header.txt"),
              "--concurrency", "1", limit=3, n=5)
    assert [len(r["rationales"]) for r in lines(out)] == [2, 5, 2]
    assert [r["body"]["n"] for r in seen()] == [2, 2, 2, 1, 2]


def test_local_min_correct_follows_the_same_rule(tmp_path, monkeypatch):
    """The local teacher in rounds: a question stops once K chains are right (here: "right" is scripted as
    an even-length chain text) or at --n; every question of a batch drew from seed (seed, batch, round)."""
    student = tiny_student(tmp_path / "m")
    monkeypatch.setattr(teacher, "is_correct", lambda rec, c: len(c["text"]) % 2 == 0)
    out = teacher.main(["--teacher", str(student), "--out", str(tmp_path / "c.jsonl"), "--limit", "6", "--n", "6",
                        "--min-correct", "2", "--shots", "1", "--batch-size", "3", "--max-new-tokens", "8"])
    for rec in lines(out):
        right = [len(c["text"]) % 2 == 0 for c in rec["rationales"]]
        n = len(right)
        assert n in (2, 4, 6)
        assert n == 6 or sum(right) >= 2
        assert n == 2 or sum(right[:n - 2]) < 2  # it went on only while fewer than K were right


# -----------------------------------------------------------------------------
# the client's pieces


def test_both_logprob_formats_give_the_kept_tokens_and_their_sum():
    """llama.cpp's logprobs.content[] (with bytes) and OpenAI's legacy tokens/token_logprobs; a chain is cut
    after its answer sentence, and its logprob sums the tokens up to the one that completes the cut."""
    text = " It flows. So the answer is (b) river. More"
    pieces = [" It", " flows.", " So", " the", " answer", " is", " (b)", " river", ".", " More"]
    lps = [-1.0, -2.0, -0.5, -0.25, -0.125, -1.0, -3.0, -0.5, -0.25, -4.0]
    llama = {"text": text, "logprobs": api.token_logprobs(
        {"content": [{"token": t, "bytes": list(t.encode()), "logprob": lp} for t, lp in zip(pieces, lps)]})}
    legacy = {"text": text, "logprobs": api.token_logprobs({"tokens": pieces, "token_logprobs": lps})}
    for choice in (llama, legacy):
        chain = api.chain(choice, (teacher.ANSWER_END,))
        assert chain["text"] == " It flows. So the answer is (b) river."
        assert len(chain["tokens"]) == 9 and chain["logprob"] == sum(lps[:9])
    assert api.chain(llama, ())["logprob"] == sum(lps) and len(api.chain(legacy, ())["tokens"]) == 10  # uncut: all
    assert api.chain({"text": text, "logprobs": None}, ()) == {"text": text, "tokens": None, "logprob": None}
    with pytest.raises(api.Malformed):
        api.token_logprobs({"content": [{"token": " x"}]})  # no logprob


def test_a_response_that_is_not_a_completion_is_malformed():
    for raw in (b"not json", b"[]", b'{"choices": []}', b'{"choices": [{"index": 0}]}', b'{"choices": [5]}'):
        with pytest.raises(api.Malformed):
            api.parse_response(raw, "completions")
    with pytest.raises(api.Malformed):
        api.parse_response(b'{"choices": [{"text": "a completion, not a message"}]}', "chat")
    choices, usage = api.parse_response(b'{"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3}}', "chat")
    assert choices == [{"text": "hi", "logprobs": None}] and usage == {"prompt_tokens": 3}


def test_chat_layout_of_the_fewshot_prompt():
    shots = [("Q: one?\nA:", " Because. So the answer is (a) x.\n\n"), ("Q: two?\nA:", " Hence. So the answer is (b) y.\n\n")]
    assert api.chat_messages(shots, ["Q: three?\nA:"]) == [
        {"role": "user", "content": "Q: one?\nA:"}, {"role": "assistant", "content": "Because. So the answer is (a) x."},
        {"role": "user", "content": "Q: two?\nA:"}, {"role": "assistant", "content": "Hence. So the answer is (b) y."},
        {"role": "user", "content": "Q: three?\nA:"}]
    assert api.chat_messages([], ["Problem: p\nStep: s1\nQuestion it answers:", " Q1?", "\nStep: s2\nQuestion it answers:"],
                             system="A custom header.") == [
        {"role": "system", "content": "A custom header."},
        {"role": "user", "content": "Problem: p\nStep: s1\nQuestion it answers:"}, {"role": "assistant", "content": "Q1?"},
        {"role": "user", "content": "Step: s2\nQuestion it answers:"}]


def test_httpx_is_imported_only_by_the_api_path():
    code = "import sys, teacher, train, evaluate; assert 'httpx' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_urls_backoff_and_retry_after():
    assert api.base_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/v1"
    assert api.base_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    for bad in ("ftp://x/v1", "127.0.0.1:8080", "https://me:sk-123@api.example.com/v1"):
        with pytest.raises(ValueError) as e:
            api.base_url(bad)
        assert "sk-123" not in str(e.value)
    waits = [api.backoff(1.0, a) for a in range(10)]
    assert all(2 ** a / 2 <= w <= 2 ** a for a, w in enumerate(waits[:6])) and all(30 <= w <= 60 for w in waits[6:])
    assert api.retry_after("3") == 3.0 and api.retry_after(None) is None and api.retry_after("soon") is None
    assert 0 < api.retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))) <= 30
