"""On-policy distillation (#48): train.py --on-policy --teacher DIR: the student samples chains, the teacher grades
each of its tokens, the student lowers the divergence (losses.Grader; a served teacher: losses.SampledTokens, in
test_teacher_api.py)."""

import json

import pytest
import torch

import cli
import data
import flags
import losses
import onpolicy
import train
from checkpoint import from_pretrained, load_tokenizer
from helpers import tiny_student
from sample import SampleConfig


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 384, (3, 20), generator=g)
    targets = torch.full((3, 20), -100)
    targets[:, 6:] = torch.randint(0, 384, (3, 14), generator=g)
    return idx, targets, (targets.flatten() != -100).nonzero()[:, 0]


def test_the_divergence_of_a_model_from_itself_is_zero_with_zero_gradients(pair):
    model = from_pretrained(pair[0])
    idx, targets, target_idx = rows()
    grader = losses.Grader(model.hidden_at(idx, target_idx), model.lm_head.weight.detach(), None, 1.0)
    parts, loss = model(idx, targets, target_idx=target_idx, teacher_view=grader)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(loss.item()) < 1e-6 and parts["divergence"].item() == pytest.approx(loss.item(), abs=1e-9)
    assert max(g.abs().max().item() for g in grads) < 1e-6


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_divergence_and_its_gradients_equal_a_dense_reference(pair, beta, softcap, monkeypatch):
    """Against the loss written plainly from both models' full logits (fp32, 1e-5), in chunks of 7 rows: beta 1 is
    KL(student || teacher), 0 KL(teacher || student), 0.5 the generalised JSD with its mixture; a soft-capped
    student (Gemma's final_logit_softcapping) too."""
    import dataclasses

    student, teacher = from_pretrained(pair[0]), from_pretrained(pair[1])
    if softcap:
        student.cfg = dataclasses.replace(student.cfg, logit_softcap=softcap)
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 384 * 3 * 7)
    idx, targets, target_idx = rows(1)
    grader = losses.Grader(teacher.hidden_at(idx, target_idx), teacher.lm_head.weight.detach(), None, beta)
    _, loss = student(idx, targets, target_idx=target_idx, teacher_view=grader)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    q = student(idx)[0].flatten(0, 1)[target_idx].log_softmax(-1)
    with torch.no_grad():
        p = teacher(idx)[0].flatten(0, 1)[target_idx].log_softmax(-1)
    if beta == 1:
        want = (q.exp() * (q - p)).sum(-1).mean()
    elif beta == 0:
        want = (p.exp() * (p - q)).sum(-1).mean()
    else:
        m = (beta * p.exp() + (1 - beta) * q.exp()).log()
        want = (beta * (p.exp() * (p - m)).sum(-1) + (1 - beta) * (q.exp() * (q - m)).sum(-1)).mean()
    torch.testing.assert_close(loss, want.detach(), atol=1e-5, rtol=0)
    for a, b in zip(grads, torch.autograd.grad(want, list(student.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_sampled_token_estimator_equals_its_plain_form(pair):
    """A served teacher's grades: loss = mean(sg(log q - log p) * log q) over the sampled tokens, its reported value
    mean(log q - log p); equal to the plain form (1e-6) with its gradients."""
    model = from_pretrained(pair[0])
    idx, targets, target_idx = rows(2)
    labels = targets.flatten()[target_idx]
    p = torch.randn(len(target_idx)) - 5
    parts, loss = model(idx, targets, target_idx=target_idx, teacher_view=losses.SampledTokens(p))
    logq = model(idx)[0].flatten(0, 1)[target_idx].log_softmax(-1).gather(1, labels[:, None])[:, 0]
    want = ((logq - p).detach() * logq).mean()
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=0)
    assert parts["divergence"].item() == pytest.approx((logq - p).mean().item(), abs=1e-6)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


COMMON = ["--max-new-tokens", "16", "--batch-size", "8", "--eval-every", "0", "--eval-questions", "2", "--lr", "1e-2",
          "--warmup-steps", "0", "--min-lr-ratio", "1", "--seed", "7", "--teacher-shots", "0"]


def on_policy(pair, corpus, out, *extra):
    train.main(["--init", str(pair[0]), "--data", str(corpus), "--out", str(out), "--on-policy", "--teacher",
                str(pair[1]), *COMMON, *extra])
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_few_steps_lower_the_reverse_kl_to_a_fixed_teacher(pair, corpus, tmp_path):
    """The student's own chains, graded by another model: the reverse KL a token falls over 12 steps; metrics.jsonl
    logs it with the sampled lengths, the share of right answers and each part's seconds."""
    steps = on_policy(pair, corpus, tmp_path / "run", "--max-steps", "12")
    first, last = sum(r["divergence"] for r in steps[:3]) / 3, sum(r["divergence"] for r in steps[-3:]) / 3
    assert last < 0.9 * first, (first, last)  # measured: 0.402 -> 0.346
    assert all(r["loss"] == r["divergence"] and 0 < r["sampled_tokens"] <= 16 and 0 <= r["right"] <= 1 for r in steps)
    assert all(r["sample_s"] > 0 and r["teacher_s"] > 0 and r["update_s"] > 0 for r in steps)


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(pair, corpus, tmp_path):
    """6 steps (a third of them on corpus batches, --on-policy-mix) against 3, then --resume to 6: the same losses
    and weights, exactly: the sampler's seeds, the step choice and both data positions are the run's state."""
    import safetensors.torch

    whole = on_policy(pair, corpus, tmp_path / "whole", "--max-steps", "6", "--on-policy-mix", "0.34")
    on_policy(pair, corpus, tmp_path / "cut", "--max-steps", "3", "--on-policy-mix", "0.34")
    resumed = on_policy(pair, corpus, tmp_path / "cut", "--max-steps", "6", "--on-policy-mix", "0.34", "--resume")
    assert {("divergence" in r) for r in whole} == {True, False}  # both kinds of step ran
    assert [r["loss"] for r in whole] == [r["loss"] for r in resumed]
    a, b = (safetensors.torch.load_file(str(tmp_path / x / "last" / "model.safetensors")) for x in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_with_another_tokenizer_and_the_reverse_kl_is_refused_in_one_line(pair, corpus, tmp_path, capsys):
    """--beta 1 (the default) across tokenizers: unbounded where the carried teacher gives a student piece no mass
    (tests/test_xtok.py trains such a pair with --beta 0.5)."""
    other = tiny_student(tmp_path / "other", vocab_size=320)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main(["--init", str(pair[0]), "--data", str(corpus), "--out", str(tmp_path / "r"),
                                    "--on-policy", "--teacher", str(other), "--max-steps", "1"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1
    assert f"--teacher {other}: its tokenizer is not the student's, and --beta 1 (the reverse KL) is unbounded" in err


def test_on_policy_flags_are_checked_before_anything_loads(pair, corpus, capsys, tmp_path):
    for argv, message in ((["--teacher", "x"], "--teacher: only with --on-policy"),
                          (["--beta", "0.5"], "--beta: only with --on-policy"),
                          (["--teacher-shots", "2"], "--teacher-shots: only with --on-policy"),
                          (["--on-policy"], "give the teacher that grades the student's chains"),
                          (["--on-policy", "--teacher-api", "http://127.0.0.1:1"], "--teacher-model: required"),
                          (["--on-policy", "--teacher-api", "http://127.0.0.1:1", "--teacher-model", "t", "--beta", "0"],
                           "a served teacher grades the sampled tokens only"),
                          (["--on-policy", "--teacher", str(corpus.parent), "--on-policy-mix", "1"], "below 1"),
                          (["--on-policy", "--teacher-api", "http://127.0.0.1:1", "--teacher-model", "t", "--kd", "0.5"],
                           "--on-policy: not with --kd")):
        with pytest.raises(SystemExit):
            train.get_args(["--data", str(corpus), *argv])
        assert message in capsys.readouterr().err, argv
    local = ["--data", str(corpus), "--on-policy", "--teacher", str(pair[1]), "--out", str(tmp_path / "run")]
    assert train.get_args(local).teacher_shots == 4  # teacher.py's default
    assert train.get_args(local + ["--teacher-shots", "0"]).teacher_shots == 0


def test_the_chains_are_sampled_from_the_training_prompt(pair, corpus):
    """OnPolicy.sample: n chains a question, each an example (training query + chain) whose chain tokens are the
    targets, at most --max-new-tokens."""
    tok = load_tokenizer(pair[0])
    records = data.read_corpus(corpus)[:2]
    onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(n=3, temperature=1.0, max_new_tokens=12))
    examples, stats = onp.sample(from_pretrained(pair[0]), records, seed=5)
    queries = [tok.encode(data.format_query(r["question"], r["choices"])).ids for r in records]
    assert len(examples) == 6 and 0 < stats["sampled_tokens"] <= 12
    for k, (ids, n_query) in enumerate(examples):
        assert list(ids[:n_query]) == queries[k // 3] and 0 < len(ids) - n_query <= 12


def test_the_token_that_ends_a_chain_past_its_text_is_not_graded(pair):
    """A chain cut where teacher.py cut the teacher's own (after the answer sentence, sample's rule): the teacher
    grades the tokens of its text; the one that completes the stop and runs past it (".\n\n") is left out."""
    from sample import SampleConfig, _clean
    from scotd import ANSWER_END

    tok = load_tokenizer(pair[0])
    onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(n=2, temperature=1.0, max_new_tokens=12))
    for written, kept in (("Rivers flow. So the answer is (b) water.\n\nQ: next", "Rivers flow. So the answer is (b) water."),
                          ("So the answer is (a) a sky. And then", "So the answer is (a) a sky."),
                          ("no answer yet, cut by max-new-tokens", "no answer yet, cut by max-new-tokens")):
        chain = _clean(tok.encode(written, add_special_tokens=False).ids, tok, SampleConfig(stop_after=(ANSWER_END,)))
        assert chain["text"] == kept
        assert tok.decode(onp.graded(chain)) == kept, written


def test_the_teacher_reads_its_worked_examples_before_each_chain(pair, corpus, tmp_path):
    """--teacher-shots K: the teacher's hidden states at the chain tokens are those of header + query + chain, each
    chain run alone and unpadded (1e-5; the header is read once and attended to by every row), while the student's examples stay query + chain; a run with it trains and
    says so; K = 0 is no header."""
    tok, teacher = load_tokenizer(pair[0]), from_pretrained(pair[1])
    text = data.fewshot_header(data.exemplars(2))
    header = tok.encode(text, add_special_tokens=False).ids
    onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(n=2, temperature=1.0, max_new_tokens=12), header=text,
                           teacher=teacher)
    examples, _ = onp.sample(from_pretrained(pair[0]), data.read_corpus(corpus)[:2], seed=3)
    assert len(header) > 50 and all(list(ids[:len(header)]) != header for ids, _ in examples)
    rows = data.to_tensors(examples, flags.RunConfig(batch_size=4), 0, torch.device("cpu"))
    assert len({len(ids) for ids, _ in examples}) > 1  # padded rows: the shift must skip the padding
    with torch.no_grad():
        graded = onp.grade(rows.idx, rows.target_idx, examples, torch.device("cpu")).hidden
        want = torch.cat([teacher.hidden_at(torch.tensor([header + ids.tolist()]),
                                            torch.arange(len(header) + n_query - 1, len(header) + len(ids) - 1))
                          for ids, n_query in examples])
    torch.testing.assert_close(graded, want, atol=1e-5, rtol=0)
    steps = on_policy(pair, corpus, tmp_path / "run", "--max-steps", "2", "--teacher-shots", "2")
    assert len(steps) == 2 and all(r["divergence"] > 0 for r in steps)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["teacher_shots"] == 2


def test_on_policy_trains_a_lora_adapter_only(pair, corpus, tmp_path):
    """--on-policy --lora 4: the student samples through its adapters; only they change, and the run's adapter/
    loads back (lora.py)."""
    import safetensors.torch

    steps = on_policy(pair, corpus, tmp_path / "run", "--max-steps", "2", "--lora", "4")
    assert len(steps) == 2 and all(r["divergence"] > 0 for r in steps)
    merged = safetensors.torch.load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    base = safetensors.torch.load_file(str(pair[0] / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "gate_proj.weight", "up_proj.weight", "down_proj.weight")) for k in changed)
    assert (tmp_path / "run" / "last" / "adapter" / "adapter_model.safetensors").exists()
