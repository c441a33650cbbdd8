"""Distilling the teacher's token distributions (#47): teacher.py --score --top-logprobs K writes each chain's
top-k to a sidecar (distill.py), train.py --kd ALPHA trains on them beside the targets' cross-entropy."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import fileio
import data
import distill
import flags
import losses
import teacher
import train
from checkpoint import from_pretrained, load_tokenizer
from fileio import InputError
from helpers import Crash, stop_after_first_batch

K = 5


def score(model, corpus, out, *extra):
    return teacher.main(["--teacher", str(model), "--score", str(corpus), "--out", str(out), "--top-logprobs", str(K),
                         "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def scored(pair, corpus, tmp_path_factory):
    return score(pair[1], corpus, tmp_path_factory.mktemp("scored") / "scored.jsonl")


def training_tokens(model, records):
    """Each chain as train.py tokenises it: [(record id, chain index, ids, n_query)]."""
    examples = data.build_examples(records, "cot", "all")
    tokens = data.tokenize_examples(examples, load_tokenizer(model), 10_000, data.Skips())
    return [(e["id"], e["chain"], ids, n) for e, (ids, n) in zip(examples, tokens)]


@pytest.mark.parametrize("shots", [0, 1])
def test_stored_topk_equal_a_plain_forward_over_the_training_tokens(pair, corpus, tmp_path, shots):
    """At every target token of every chain: the stored ids are the teacher's top-k of a plain forward pass's
    log-softmax over (worked examples +) the training prompt + the target, the log-probabilities equal to
    float16's precision; the stored token is the target itself."""
    out = score(pair[1], corpus, tmp_path / "s.jsonl", "--shots", str(shots))
    header, rows = distill.read_sidecar(str(out) + ".topk")
    assert header["k"] == K and header["shots"] == shots and header["mode"] == "cot"
    assert distill.record_dtype(20).itemsize == 124  # README's "124 bytes a position" at K = 20
    records = {r["id"]: r for r in data.read_corpus(out)}
    model, tok = from_pretrained(pair[1]), load_tokenizer(pair[1])
    prompt = json.loads((tmp_path / "s.jsonl.meta.json").read_text())["prompt"]
    head = tok.encode(prompt).ids if shots else []
    chains = training_tokens(pair[1], list(records.values()))
    assert len(chains) == 3 * len(records) and sum(len(ids) - q for _, _, ids, q in chains) == len(rows)
    for rid, c, ids, n_query in chains:
        start, n = records[rid]["rationales"][c]["topk"]
        assert records[rid]["topk_file"] == "s.jsonl.topk" and n == len(ids) - n_query
        seq = head + list(ids[:n_query] if not shots else tok.encode(data.format_query(
            records[rid]["question"], records[rid]["choices"]), add_special_tokens=False).ids) + list(ids[n_query:])
        with torch.no_grad():
            logp = model(torch.tensor([seq]))[0][0].log_softmax(-1)[len(seq) - n - 1:len(seq) - 1]
        want = logp.topk(K, -1)
        got = rows[start:start + n]
        np.testing.assert_array_equal(got["token"], ids[n_query:])
        np.testing.assert_array_equal(got["ids"], want.indices.numpy())
        np.testing.assert_allclose(got["logprobs"].astype(np.float32), want.values.numpy(), rtol=1e-3, atol=1e-3)


def test_a_run_stopped_or_failing_between_the_sidecar_and_its_lines_resumes_to_the_same_files(pair, corpus, scored,
                                                                                            tmp_path, monkeypatch):
    """Stopped after its first batch (Ctrl-C), then failing to write the second batch's corpus lines after its
    top-k were appended: each rerun cuts the sidecar back to what the lines name and ends with the uninterrupted
    run's files, byte for byte."""
    out = tmp_path / "scored.jsonl"  # the name the lines give the sidecar: the same
    real = stop_after_first_batch(monkeypatch, teacher, "chain_logprobs")
    with pytest.raises(SystemExit) as e:
        score(pair[1], corpus, out)
    assert e.value.code == 130 and len(out.read_text().splitlines()) == 3
    monkeypatch.setattr(teacher, "chain_logprobs", real)
    append = fileio.append_text

    def fail_on_the_corpus(path, text, sync=False):
        if str(path) == str(out):
            raise Crash("the disk went away")
        return append(path, text, sync)
    monkeypatch.setattr(fileio, "append_text", fail_on_the_corpus)
    with pytest.raises(Crash):
        score(pair[1], corpus, out)
    named = max(a + n for _, rec in data.read_appended(out) for a, n in (r["topk"] for r in rec["rationales"]))
    assert len(out.read_text().splitlines()) == 3 and len(distill.read_sidecar(str(out) + ".topk")[1]) > named
    monkeypatch.setattr(fileio, "append_text", append)
    score(pair[1], corpus, out)
    assert out.read_bytes() == scored.read_bytes()
    assert (tmp_path / "scored.jsonl.topk").read_bytes() == (scored.parent / "scored.jsonl.topk").read_bytes()


def test_a_sidecar_of_other_settings_or_cut_short_is_refused(pair, corpus, scored, tmp_path):
    out = tmp_path / "s.jsonl"
    (tmp_path / "s.jsonl.topk").write_bytes(b"not a sidecar")
    with pytest.raises(InputError, match=r"s.jsonl.topk: not a top-k sidecar written by teacher.py"):
        score(pair[1], corpus, out)
    out.write_bytes(scored.read_bytes())  # every line, but a sidecar with a third of the positions
    side = (scored.parent / "scored.jsonl.topk").read_bytes()
    (tmp_path / "s.jsonl.topk").write_bytes(side[:len(side) // 3])
    (tmp_path / "s.jsonl.meta.json").write_bytes((scored.parent / "scored.jsonl.meta.json").read_bytes())
    with pytest.raises(InputError, match=r"s.jsonl.topk: holds [\d,]+ positions, the corpus lines already written name"):
        score(pair[1], corpus, out)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (1.0, 2.0), (0.2, 0.5)])
@pytest.mark.parametrize("path", ["chunked", "softcapped"])
def test_kd_loss_and_gradients_equal_a_dense_reference(pair, alpha, temperature, path, monkeypatch):
    """The model's mixed loss, its two parts and every gradient against the loss written plainly from the full
    logits: (1 - a) * CE + a * T^2 * KL(softmax(teacher / T) || softmax(student / T)), both over the teacher's K
    ids, fp32, 1e-5. Chunked: the head in chunks of a few rows (losses.linear_cross_entropy computes the
    gradient by hand); softcapped (Gemma's final_logit_softcapping): the plain autograd path."""
    model = from_pretrained(pair[0])
    if path == "softcapped":
        model.cfg = dataclasses.replace(model.cfg, logit_softcap=5.0)
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 384 * 7)  # 7 rows a chunk
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 384, (3, 20), generator=g)
    targets = torch.full((3, 20), -100)
    targets[:, 6:] = torch.randint(0, 384, (3, 14), generator=g)
    target_idx = (targets.flatten() != -100).nonzero()[:, 0]
    top = torch.randn(len(target_idx), 384, generator=g).mul(3).log_softmax(-1).topk(K, -1)
    t = losses.TopKTargets(top.indices, top.values, alpha, temperature)
    parts, loss = model(idx, targets, target_idx=target_idx, teacher_view=t)
    ce, kd = parts["ce"], parts["kd_loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(idx)[0].flatten(0, 1)[target_idx]
    p = (top.values / temperature).softmax(-1)
    q = (logits.gather(1, top.indices) / temperature).log_softmax(-1)
    want_kd = (temperature ** 2 * (p * (p.log() - q)).sum(-1)).mean()
    want_ce = torch.nn.functional.cross_entropy(logits, targets.flatten()[target_idx])
    want = (1 - alpha) * want_ce + alpha * want_kd
    for a, b in ((loss, want), (ce, want_ce), (kd, want_kd)):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=0)
    for a, b in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def kd_run(student, data_path, out, *extra):
    train.main(["--init", str(student), "--data", str(data_path), "--out", str(out), "--max-steps", "4",
                "--batch-size", "6", "--eval-every", "0", "--eval-questions", "2", "--lr", "3e-3",
                "--warmup-steps", "0", "--seed", "5", *extra])
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_student_that_is_its_own_teacher_starts_at_kd_zero(pair, corpus, tmp_path):
    """Scored by itself, the student's first step has a KD term of 0 (float16 log-probabilities: < 1e-6) and a
    loss of (1 - alpha) * its cross-entropy; metrics.jsonl logs the parts."""
    own = score(pair[0], corpus, tmp_path / "own.jsonl")
    rows = kd_run(pair[0], own, tmp_path / "run", "--kd", "0.5")
    first = rows[0]
    assert abs(first["kd_loss"]) < 1e-6 and first["ce"] > 1
    assert first["loss"] == pytest.approx(0.5 * first["ce"] + 0.5 * first["kd_loss"], rel=1e-6)


def test_kd_alone_lowers_the_kl_to_another_teacher(pair, scored, tmp_path):
    rows = kd_run(pair[0], scored, tmp_path / "run", "--kd", "1", "--max-steps", "6")
    assert rows[0]["kd_loss"] > 0.1 and rows[-1]["kd_loss"] < 0.7 * rows[0]["kd_loss"]
    assert all(r["loss"] == pytest.approx(r["kd_loss"], rel=1e-6) for r in rows)


@pytest.mark.parametrize("rows", ["shared", "packed"])
def test_kd_on_shared_prefix_and_packed_rows_gives_the_gradients_of_plain_rows(pair, scored, rows):
    """The same micro-batch as plain rows, as shared-prefix rows and as packed rows: loss, parts and gradients
    equal (1e-5): the top-k ride with their targets wherever data.layout puts them."""
    records = data.read_corpus(scored)
    tok, model = load_tokenizer(pair[0]), from_pretrained(pair[0])
    examples = data.build_examples(records, "cot", "correct")[:9]
    tokens = data.tokenize_examples(examples, tok, 512, data.Skips(),
                                    attach=distill.TopKSidecar(scored, records, tok, pair[0]))
    base = flags.RunConfig(kd=0.7, kd_temperature=1.5, batch_size=9)

    def loss_and_grads(run):
        r = data.to_tensors(tokens, run, 0, torch.device("cpu"))
        model.zero_grad()
        parts, loss = model(r.idx, r.targets, docs=r.docs, branches=r.branches, target_idx=r.target_idx,
                            teacher_view=r.teacher_view)
        loss.backward()
        return [loss.detach(), *parts.values()], [p.grad.clone() for p in model.parameters()]

    plain = loss_and_grads(base)
    other = loss_and_grads(dataclasses.replace(base, shared=rows == "shared", pack=rows == "packed", row_len=400))
    for a, b in zip(plain[0] + plain[1], other[0] + other[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_kd_on_a_corpus_without_topk_or_with_edited_chains_is_refused(pair, corpus, scored, tmp_path):
    with pytest.raises(InputError, match=r"many.jsonl:1: rationale 0 has no stored top-k; --kd needs a corpus scored"):
        kd_run(pair[0], corpus, tmp_path / "a", "--kd", "0.5")
    records = data.read_corpus(scored)
    records[2]["rationales"][1]["text"] += " Edited."  # the chain changed after scoring
    edited = tmp_path / "edited.jsonl"
    data.write_corpus(records, edited)
    (tmp_path / "scored.jsonl.topk").symlink_to(scored.parent / "scored.jsonl.topk")
    with pytest.raises(InputError, match=r"edited.jsonl:3: rationale 1: its \d+ stored target tokens .* are not the "
                                         r"student's \d+: score the corpus again"):
        kd_run(pair[0], edited, tmp_path / "b", "--kd", "0.5")


def test_kd_flags_are_checked_before_anything_loads(scored, capsys):
    for argv, message in ((["--kd", "0.5", "--mode", "post"], "--mode post trains on other tokens"),
                          (["--kd-temperature", "2"], "--kd-temperature: only with --kd ALPHA"),
                          (["--kd", "1.5"], "--kd: must be in (0, 1], got 1.5")):
        with pytest.raises(SystemExit):
            train.get_args(["--data", str(scored), *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        teacher.get_args(["--teacher", "x", "--top-logprobs", "5", "--out", "o.jsonl"])
    assert "--top-logprobs: only with --score" in capsys.readouterr().err
