"""sample.py and evaluate.py: greedy parity with transformers, seeded sampling, per-row stopping, end to end."""

import json

import pytest
import torch

import evaluate
import fileio
import train
from helpers import Crash, counting_forward, left_padded_batch, make_hf_model, save_hf, tiny_student
from checkpoint import from_pretrained, load_tokenizer
from scotd import ANSWER_END
import sample
from sample import SampleConfig, generate, next_token


@pytest.mark.parametrize("kind", ["opt-preln", "opt-postln", "llama-tied", "qwen2-untied"])
def test_greedy_equals_transformers_generate_on_left_padded_batch(kind, tmp_path):
    hf = make_hf_model(kind)
    hf.generation_config.eos_token_id = None  # random weights: run the full length on both sides
    model = from_pretrained(save_hf(hf, tmp_path))
    pad = hf.config.pad_token_id
    ids, mask = left_padded_batch([5, 9, 3, 7], pad_id=pad)
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=pad)[:, ids.shape[1]:]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    outs = generate(model, None, prompts, SampleConfig(max_new_tokens=10, stop=(), batch_size=4, pad_id=pad))
    assert [o[0]["tokens"] for o in outs] == ref.tolist()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def test_seeded_sampling_is_reproducible(student):
    model, tok = from_pretrained(student), load_tokenizer(student)
    with torch.no_grad():  # random init is very peaked; flatten it so that samples differ
        model.embed_tokens.weight.mul_(0.02)
    prompts = [tok.encode("Q: where?\nA:").ids, tok.encode("Q: what do people use?\nA:").ids]
    cfg = SampleConfig(n=5, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)
    a, b = generate(model, tok, prompts, cfg), generate(model, tok, prompts, cfg)
    assert a == b
    c = generate(model, tok, prompts, SampleConfig(n=5, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=4))
    assert a != c
    assert len({tuple(x["tokens"]) for x in a[0]}) > 1  # the chains differ from each other


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, SampleConfig(temperature=1.0, top_k=2), g).flatten().tolist()) == {0, 1}
    # softmax mass: 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two
    assert set(next_token(logits, SampleConfig(temperature=1.0, top_p=0.8), g).flatten().tolist()) == {0, 1}
    assert set(next_token(logits, SampleConfig(temperature=0.0), g).flatten().tolist()) == {0}


def test_sampled_frequencies_match_the_tempered_softmax():
    """200k draws from softmax(logits / T): each token's frequency within 5 sigma of its probability,
    and a token with zero probability (masked to -inf) is never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]]).repeat(200_000, 1)
    g = torch.Generator().manual_seed(0)
    draws = next_token(logits, SampleConfig(temperature=0.7), g).flatten()
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    p = (logits[0] / 0.7).double().softmax(-1)
    sigma = (p * (1 - p) / len(draws)).sqrt()
    assert freq[5] == 0
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)

class CountingTokenizer:
    """Decodes ids as letters; id 1 is a newline, so [.., 1, 1] completes the '\\n\\n' stop string."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n" if i == 1 else chr(ord("a") + i % 26) for i in ids)


class Scripted(torch.nn.Module):
    """A fake model whose row b emits newlines from step stop_at[b] on: rows stop at different lengths."""

    def __init__(self, stop_at):
        super().__init__()
        self.cfg = make_hf_cfg()
        self.stop_at, self.w = stop_at, torch.nn.Parameter(torch.zeros(1))
        self.rows_seen = []

    def prefill(self, idx, cache, attention_mask=None, last_only=True):
        logits = self.decode_step(idx, cache)  # the same fake logits, a prefill or a step
        return logits[:, -1:] if last_only else logits

    def decode_step(self, idx, cache):
        B, T = idx.shape
        step = cache.length - self.prompt_len  # -prompt_len at the prefill, then 0, 1, ...
        cache.length += T
        self.rows_seen.append(B)
        logits = torch.zeros(B, T, 30)
        for b in range(B):
            row = self.row_ids[b] if B == len(self.row_ids) else self.live[b]
            logits[b, -1, 1 if step >= self.stop_at[row] else 5] = 1.0
        return logits


def make_hf_cfg():
    from model import Config
    return Config(model_type="llama", vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=8, max_position_embeddings=64)


def test_stop_strings_end_each_row_on_its_own(monkeypatch):
    """Rows that finish leave the running batch; each is cut at its own '\\n\\n'."""
    import sample

    stops = [2, 6, 4]
    model = Scripted(stops)
    model.prompt_len, model.row_ids, model.live = 3, [0, 1, 2], [0, 1, 2]
    real_select = sample.KVCache.select_rows

    def select(cache, index):
        model.live = [model.live[i] for i in index]
        return real_select(cache, index)

    monkeypatch.setattr(sample.KVCache, "select_rows", select)
    outs = generate(model, CountingTokenizer(), [[3, 4, 5]] * 3, SampleConfig(max_new_tokens=20, batch_size=3))
    # row b writes stop_at[b] + 1 'f's (id 5; the first from the prefill), then two newlines end it
    assert [o[0]["text"] for o in outs] == ["f" * (s + 1) for s in stops]
    assert [len(o[0]["tokens"]) for o in outs] == [s + 3 for s in stops]
    assert model.rows_seen[1:] == sorted(model.rows_seen[1:], reverse=True) and min(model.rows_seen) == 1


def scripted_run(monkeypatch, stops, **cfg):
    """generate() over the Scripted model, rows stopping at stops[b] -> (outputs, the batch sizes it saw)."""
    import sample

    model = Scripted(stops)
    model.prompt_len, model.row_ids, model.live = 3, list(range(len(stops))), list(range(len(stops)))
    real_select = getattr(sample.KVCache.select_rows, "real", sample.KVCache.select_rows)

    def select(cache, index):
        model.live = [model.live[i] for i in index]
        return real_select(cache, index)

    select.real = real_select
    monkeypatch.setattr(sample.KVCache, "select_rows", select)
    outs = generate(model, CountingTokenizer(), [[3, 4, 5]] * len(stops),
                    SampleConfig(max_new_tokens=30, batch_size=len(stops), **cfg))
    return outs, model.rows_seen


def test_bucketed_running_rows_give_the_same_chains(monkeypatch):
    """With bucket_rows (the default of a compiled step), rows that finish leave the batch as before, but the rows
    left are padded to a power of two: the decode step sees 11 rows (the start), then 8, 4, 2, 1 only, and every
    chain is the one the unbucketed run writes."""
    stops = [2, 9, 4, 13, 3, 17, 5, 21, 6, 11, 8]
    plain, plain_rows = scripted_run(monkeypatch, stops, bucket_rows=False)
    bucketed, bucketed_rows = scripted_run(monkeypatch, stops, bucket_rows=True)
    assert bucketed == plain and [o[0]["text"] for o in plain] == ["f" * (s + 1) for s in stops]
    assert len(set(plain_rows[1:])) > 4 and not set(plain_rows[1:]) <= {11, 8, 4, 2, 1}  # without: many shapes
    assert set(bucketed_rows[1:]) <= {11, 8, 4, 2, 1}


def test_evaluate_end_to_end_writes_predictions_and_plot(student, tmp_path):
    ckpt = train.main(["--init", str(student), "--out", str(tmp_path / "run"), "--limit", "32", "--max-steps", "4",
                       "--batch-size", "8", "--eval-every", "0", "--eval-questions", "4"])
    out = evaluate.main(["--checkpoint", str(ckpt / "best"), "--limit", "6", "--n", "4", "--max-new-tokens", "24",
                         "--out", str(tmp_path / "eval")])
    rows = [json.loads(ln) for ln in (out / "predictions-csqa_palm_validation.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all(len(r["chains"]) == 4 and "vote" in r and r["gold"] in "abcde" for r in rows)
    assert (out / "vote-curve-csqa_palm_validation.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary-csqa_palm_validation.json").read_text())
    assert summary["mode"] == "cot" and len(summary["vote_curve"]) == len(summary["maj_at_k"]) == 4
    assert all("logprob" in c for r in rows for c in r["chains"]) and "likelihood_vote_acc" in summary
    assert (out / "reliability-csqa_palm_validation.png").read_bytes()[:4] == b"\x89PNG"
    # --report: the whole report again, from the predictions file alone, number for number
    again = evaluate.main(["--report", str(out / "predictions-csqa_palm_validation.jsonl"), "--out", str(tmp_path / "re")])
    assert json.loads((again / "summary-csqa_palm_validation.json").read_text()) == summary
    # --no-greedy: the same sampled chains (each batch has its own seed), without the greedy decode
    alone = evaluate.main(["--checkpoint", str(ckpt / "best"), "--limit", "6", "--n", "4", "--max-new-tokens", "24",
                           "--no-greedy", "--out", str(tmp_path / "sc")])
    rows_alone = [json.loads(ln) for ln in (alone / "predictions-csqa_palm_validation.jsonl").read_text().splitlines()]
    assert [r["chains"] for r in rows_alone] == [r["chains"] for r in rows]
    assert all("greedy" not in r and "greedy_correct" not in r for r in rows_alone)
    assert json.loads((alone / "summary-csqa_palm_validation.json").read_text())["greedy_acc"] is None
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(ckpt / "best"), "--n", "0", "--no-greedy"])


def test_interrupted_evaluation_resumes_to_the_uninterrupted_result(student, tmp_path, monkeypatch, capsys):
    """A crash inside a forward pass mid-run, then the same command: only the batches the journal lacks are
    decoded again, and predictions and vote curve equal one uninterrupted run's exactly (greedy: 2 batches,
    sampling: 5 batches of 4 questions x 3 chains at T=1)."""
    argv = ["--checkpoint", str(student), "--limit", "20", "--n", "3", "--temperature", "1.0", "--batch-size", "4",
            "--max-new-tokens", "12", "--seed", "5"]
    stem = "csqa_palm_validation"
    read = lambda out: ((out / f"predictions-{stem}.jsonl").read_text(),
                        json.loads((out / f"summary-{stem}.json").read_text())["vote_curve"])
    calls = counting_forward(monkeypatch)
    whole = read(evaluate.main(argv + ["--out", str(tmp_path / "whole")]))
    total = calls[0]
    assert not (tmp_path / "whole" / f"partial-{stem}.jsonl").exists()  # removed once the predictions are written

    out = tmp_path / "cut"
    calls = counting_forward(monkeypatch, crash_at=total * 2 // 3)  # in the sampled chains' 3rd or 4th batch
    with pytest.raises(Crash):
        evaluate.main(argv + ["--out", str(out)])
    journal = out / f"partial-{stem}.jsonl"
    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(r["step"], r["batch"]) for r in rows[1:4]] == [("greedy", 0), ("greedy", 1), ("chains", 0)]
    assert not (out / f"predictions-{stem}.jsonl").exists()
    journal.write_text(journal.read_text()[:-20])  # and killed while writing the last batch: that one is redone

    calls = counting_forward(monkeypatch)
    assert read(evaluate.main(argv + ["--out", str(out)])) == whole
    assert 0 < calls[0] < total and not journal.exists()
    said = capsys.readouterr().out
    assert f"resume    {len(rows) - 2} finished batches from {journal}" in said
    cut = len(json.dumps(rows[-1])) + 1 - 20  # what was left of the last batch's line
    assert f"note      {journal}:{len(rows)}: its last line was cut ({cut:,} bytes, a run killed while writing it): " \
        "that batch is decoded again" in said

    # a journal of other settings is discarded, not mixed in; a damaged one is an error naming its line
    bogus = rows[1] | {"outs": [[{"text": " So the answer is (a).", "tokens": [1]}]] * 16}  # greedy batch 0, other weights
    journal.write_text(json.dumps({"settings": {"seed": "4"}}) + "\n" + json.dumps(bogus) + "\n")
    assert read(evaluate.main(argv + ["--out", str(out)])) == whole
    assert f"note      {journal}: an interrupted run with other settings, discarded" in capsys.readouterr().out
    journal.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(evaluate.InputError, match=f"{journal}:2: invalid JSON .*; delete the file to start this evaluation over"):
        evaluate.main(argv + ["--out", str(out)])


def test_an_evaluation_killed_mid_write_twice_still_resumes(student, tmp_path, monkeypatch):
    """Killed while writing a batch (a cut last line), resumed, and crashed again: the resumed run first cuts
    the half line off, so what it appends starts a line of its own and the third run reads every finished
    batch (appending after the half line made line 4 invalid JSON, and the journal unusable)."""
    argv = ["--checkpoint", str(student), "--limit", "12", "--n", "2", "--temperature", "1.0", "--batch-size", "4",
            "--max-new-tokens", "8", "--seed", "3"]
    stem = "csqa_palm_validation"
    read = lambda out: (out / f"predictions-{stem}.jsonl").read_text()  # noqa: E731
    calls = counting_forward(monkeypatch)
    whole = read(evaluate.main(argv + ["--out", str(tmp_path / "whole")]))
    out, journal = tmp_path / "cut", tmp_path / "cut" / f"partial-{stem}.jsonl"
    counting_forward(monkeypatch, crash_at=calls[0] // 2)
    with pytest.raises(Crash):
        evaluate.main(argv + ["--out", str(out)])
    journal.write_text(journal.read_text()[:-20])  # killed while writing its last batch
    lines = len(journal.read_text().splitlines())
    counting_forward(monkeypatch, crash_at=calls[0] // 3)  # the resumed run crashes again, after a batch or more
    with pytest.raises(Crash):
        evaluate.main(argv + ["--out", str(out)])
    rows = [json.loads(line) for line in journal.read_text().splitlines()]  # every line whole JSON
    assert len(rows) >= lines
    counting_forward(monkeypatch)
    assert read(evaluate.main(argv + ["--out", str(out)])) == whole and not journal.exists()


def test_compiled_decode_step_gives_the_same_tokens(student):
    model, tok = from_pretrained(student), load_tokenizer(student)
    prompts = [tok.encode("Q: where do beavers live?\nA:").ids, tok.encode("Q: what?\nA:").ids]
    cfg = dict(n=3, temperature=0.0, max_new_tokens=8, stop=())
    eager = generate(model, None, prompts, SampleConfig(**cfg))
    compiled = generate(model, None, prompts, SampleConfig(**cfg, compile=True))
    assert compiled == eager


def test_compiled_decode_step_is_one_graph_of_tensors(student, monkeypatch):
    """On CUDA the compiled step is replayed as a CUDA graph, which is recorded anew for every value an int
    input of the graph takes: over a whole generate() the step must compile once, to a graph whose inputs are
    all tensors (the host's slot count, a Python int, stays outside it). Compiled here as on CUDA (no
    dynamic=True), with a backend that records each graph's inputs."""
    graphs, compile = [], torch.compile

    def backend(gm, example_inputs):
        graphs.append([type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)])
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=backend))
    torch._dynamo.reset()  # forget the shapes earlier tests compiled this step for (it would start them dynamic)
    model, tok = from_pretrained(student), load_tokenizer(student)
    prompts = [tok.encode("Q: where do beavers live?\nA:").ids, tok.encode("Q: what?\nA:").ids]
    out = generate(model, None, prompts, SampleConfig(n=2, max_new_tokens=12, stop=(), compile=True, bucket_rows=False))
    assert all(len(c["tokens"]) == 12 for o in out for c in o)  # no row left early: one batch shape throughout
    assert graphs == [[]]


def test_compiled_decode_step_writes_each_layer_into_its_own_cache_tensor(student, monkeypatch):
    """Each layer's K/V write in the compiled step goes straight into a cache tensor of its own, an input of the
    graph: a write into a slice of one (L, ...) tensor makes the compiled step rewrite the whole tensor, every
    layer's cache, once for each layer (on an H100, 256 rows over 512 slots: 94 ms a step; 3 ms with one tensor a
    layer, bench/README.md)."""
    writes, compile = [], torch.compile

    def backend(gm, example_inputs):
        writes.extend(node.args[0] for node in gm.graph.nodes if node.target in ("index_copy_", torch.Tensor.index_copy_))
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=backend))
    torch._dynamo.reset()
    model, tok = from_pretrained(student), load_tokenizer(student)
    generate(model, None, [tok.encode("Q: what?\nA:").ids], SampleConfig(n=2, max_new_tokens=4, stop=(), compile=True))
    layers = model.cfg.num_hidden_layers
    assert len(writes) == 2 * layers and len(set(writes)) == 2 * layers  # K and V of every layer, each its own
    assert all(w.op == "placeholder" for w in writes), [w.format_node() for w in writes if w.op != "placeholder"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefix_prefilled_once_gives_the_same_tokens(student, temperature):
    """A few-shot header prefilled once and shared by each batch (by generate, or by the caller for many
    generate calls): the same chains (greedy and seeded sampling) as prefilling header + question from
    scratch, prompts of different lengths."""
    model, tok = from_pretrained(student), load_tokenizer(student)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.05)  # flatten the random init so that samples differ
    header = tok.encode("Q: Where do beavers live?\nA: Beavers build dams. So the answer is (b) river.\n\n").ids
    questions = [tok.encode(q).ids for q in ("Q: what?\nA:", "Q: where do people keep their money?\nA:",
                                             "Q: who?\nA:", "Q: what do cats like most of all?\nA:", "Q: why?\nA:")]
    cfg = SampleConfig(n=3, temperature=temperature, max_new_tokens=10, stop=(), batch_size=2, seed=5)
    shared = generate(model, None, questions, cfg, prefix=header)
    scratch = generate(model, None, [header + q for q in questions], cfg)
    assert shared == scratch
    assert generate(model, None, questions, cfg, prefix=sample.prefill(model, header)) == shared  # prefilled by the caller
    assert len({tuple(c["tokens"]) for o in shared for c in o}) > 1


def test_a_chain_can_end_after_its_answer_sentence(student):
    """stop_after keeps what it matches and ends the chain there (teacher.py: the end of the answer sentence,
    before the teacher rambles on); a plain stop string is cut off; without either the chain runs on."""
    tok = load_tokenizer(student)
    tokens = tok.encode(" Rivers flow. So the answer is (b) river. It is wet and long\nQ: next").ids
    cfg = SampleConfig(stop=("\n",), stop_after=(ANSWER_END,))
    out = sample._clean(tokens, tok, cfg)
    assert out["text"] == " Rivers flow. So the answer is (b) river."
    assert tok.decode(out["tokens"]).startswith(out["text"])  # the token that completed the match ends it
    ends = [k for k in range(1, len(tokens) + 1) if sample._finished(tokens[:k], 1, tok, cfg, None)]
    assert ends and ends[0] == len(out["tokens"]) + 1  # generation stops one token later (the space after "."), cut off
    whole = " Rivers flow. So the answer is (b) river. It is wet and long"
    assert sample._clean(tokens, tok, SampleConfig(stop=("\n",)))["text"] == whole
    assert sample._clean(tokens[:5], tok, cfg)["tokens"] == tokens[:5]  # no stop yet: all of it


def test_prompt_longer_than_the_model_positions_is_a_clear_error(student, tmp_path, capsys):
    """Past max_position_embeddings the position table has no row: say so before decoding, with the numbers.
    Through evaluate.py it is one line and exit 1 (a 12-shot prompt is ~2,000 tokens; the tiny model has 512)."""
    model = from_pretrained(student)
    with pytest.raises(fileio.InputError, match=r"the longest prompt \(420 tokens\) \+ max_new_tokens 96 needs 516 "
                                             r"positions; the model has 512 \(max_position_embeddings"):
        generate(model, None, [[5] * 420, [5] * 10], SampleConfig(max_new_tokens=96, stop=()))
    with pytest.raises(SystemExit) as e:
        evaluate.cli.run(lambda: evaluate.main(["--checkpoint", str(student), "--fewshot", "12", "--limit", "2",
                                                "--n", "0", "--out", str(tmp_path)]))
    assert e.value.code == 1 and "max_position_embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("n_models", [1, 2])
def test_turns_in_one_cache_equal_prefilling_each_turn_from_scratch(student, n_models):
    """generate_turns: greedy turns continued in one cache a model (a turn prefills only what that model has
    not read: what was appended, and with two models the other's turns; what a row sampled after its stop is
    masked out; a row that ends its dialogue early leaves the batch) give the tokens of prefilling prompt +
    every earlier output + appended text from scratch for each turn, with the model whose turn it is."""
    tok = load_tokenizer(student)
    models = []
    for seed in (1, 4)[:n_models]:  # the random init greedily repeats one token; shaken, rows stop at different steps
        model = from_pretrained(student)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 3 * p.std().clamp(min=0.02))
        models.append(model)
    prompts = [tok.encode(q).ids for q in ("Q: what?\nA:", "Q: where do people keep their money?\nA:", "Q: who?\nA:")]
    follow = [tok.encode(x).ids for x in ("\nQ: and then?\nA:", "", "\nQ: so where is the river?\nA:")]
    cfgs = [SampleConfig(n=1, temperature=0.0, max_new_tokens=10 - 3 * m, stop=(), stop_after=("\x07",))
            for m in range(n_models)]
    turns = {0: 4, 1: 2, 2: 4}  # the second row's dialogue ends early
    seen = {i: 0 for i in turns}

    def turn(i, m, out):
        assert m == seen[i] % n_models  # the models take turns
        seen[i] += 1
        return follow[(seen[i] - 1) % 3] if seen[i] < turns[i] else None

    outputs = sample.generate_turns(models, tok, prompts, cfgs, turn, max_len=160)
    assert [len(row) for row in outputs] == [4, 2, 4]
    lengths = [[len(row[t]["tokens"]) for row in outputs if t < len(row)] for t in range(4)]
    assert any(min(n) < max(n) for n in lengths), lengths  # a row stopped while another ran on: masked slots
    for i, row in enumerate(outputs):
        text = list(prompts[i])
        for t, out in enumerate(row):
            m = t % n_models
            assert generate(models[m], tok, [text], cfgs[m])[0][0] == out, (i, t)
            text += out["tokens"] + (follow[t % 3] if t + 1 < len(row) else [])


@pytest.mark.parametrize("header", [False, True])
def test_chain_logprob_equals_a_plain_forward_pass(student, header):
    """SampleConfig(logprobs=True): each chain's "logprob" is the sum, over the tokens it keeps (cut after its
    stop), of log p(token | everything before it) under the model at T = 1 -- the same as one plain forward
    pass over prefix + prompt + chain (1e-4), whatever the sampling temperature, with or without a prefilled
    header and with stops cutting rows at different steps."""
    model, tok = from_pretrained(student), load_tokenizer(student)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.02)
    prefix = tok.encode("Q: a worked example?\nA: yes.\n\n").ids if header else None
    prompts = [tok.encode("Q: where?\nA:").ids, tok.encode("Q: what do people use?\nA:").ids]
    cfg = SampleConfig(n=3, temperature=0.7, top_p=0.9, max_new_tokens=10, stop=("e",), seed=5, logprobs=True)
    outs = generate(model, tok, prompts, cfg, prefix=prefix)
    assert len({len(c["tokens"]) for o in outs for c in o}) > 1  # the stop cut chains at different lengths
    for p, chains in zip(prompts, outs):
        for c in chains:
            ids = (prefix or []) + p + c["tokens"]
            with torch.no_grad():
                logp = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
            start = len(ids) - len(c["tokens"])
            want = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
            assert c["logprob"] == pytest.approx(want, abs=1e-4)
    assert all("logprob" not in c for o in generate(model, tok, prompts, SampleConfig(n=2, max_new_tokens=4)) for c in o)


def test_scoring_given_chains_equals_a_plain_forward_pass(student):
    """sample.chain_logprobs: the header prefilled once, each question once and copied to its chains' rows
    (questions with different numbers of chains in one batch, chains of different lengths): each chain's
    summed log-probability equals one plain forward pass over header + prompt + chain (1e-4)."""
    model, tok = from_pretrained(student), load_tokenizer(student)
    header = tok.encode("Q: a worked example?\nA: yes.\n\n").ids
    prompts = [tok.encode(q, add_special_tokens=False).ids for q in ("Q: where?\nA:", "Q: what do people use?\nA:", "Q: x?\nA:")]
    chains = [[tok.encode(c, add_special_tokens=False).ids for c in cs] for cs in
              ([" a river.", " the lake, then the sea. So the answer is (b) lake."], [" wood."], [])]
    chains[1].append([7])  # a one-token chain
    scores = sample.chain_logprobs(model, prompts, chains, prefix=header, batch_size=2)
    assert [len(s) for s in scores] == [2, 2, 0] and min(len(c) for cs in chains for c in cs) == 1  # a one-token chain too
    for p, cs, ss in zip(prompts, chains, scores):
        for c, (logprob, n) in zip(cs, ss):
            ids = header + p + c
            with torch.no_grad():
                logp = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
            want = sum(logp[t - 1, ids[t]].item() for t in range(len(header) + len(p), len(ids)))
            assert n == len(c) and logprob == pytest.approx(want, abs=1e-4)
