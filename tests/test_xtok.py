"""Distilling across tokenizers (xtok.py, distill.TopKSidecar): the alignment on hand-written hard cases and over the
bundled corpora with real tokenizers (SmolLM2's byte-level BPE, Gemma 3's SentencePiece with byte fallback; Qwen2.5's
when the fetched teacher is here, else skipped), the projection of a teacher's top-k onto the student's ids, and
--kd through it: one tokenizer gives today's loss and gradients (1e-6), a teacher that is the student with its ids
permuted has a KL of 0, empty slots leave the chunked loss equal to a dense reference, a run resumes exactly."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import data
import distill
import flags
import losses
import teacher
import train
import xtok
from checkpoint import default_student, from_pretrained, load_tokenizer, packaged_student, save_pretrained
from fileio import InputError, cache_dir
from helpers import signal_on_call, tiny_student

K = 5
QWEN = cache_dir() / "teachers" / "Qwen2.5-Coder-1.5B-Instruct"  # experiments/fetch_teachers.py; absent in CI
HARD = [" The answer must be a place. So the answer is (b) river.\n\n",  # the chain's end: ".\n\n" one or two pieces
        " 12,345 apples and 3.5 pears: 12345 in all?",  # digits split one by one, or not
        " café, naïve, Zürich → señor 😀 日本語",  # multi-byte characters split across byte-level pieces
        "  two spaces,\ttabs\nand\n\n\nnewlines ",  # runs of white space and newlines
        " ▁ and Ġ as text, <0x0A> as text"]  # the space markers and a byte-fallback name, written literally


@pytest.fixture(scope="module")
def real():
    """name -> a real tokenizer: SmolLM2-135M-Instruct (the default student), Gemma 3 270M, Qwen2.5 if fetched."""
    out = {"smollm2": load_tokenizer(default_student()), "gemma3": load_tokenizer(packaged_student("gemma-3-270m"))}
    if (QWEN / "tokenizer.json").is_file():
        out["qwen2.5"] = Tokenizer.from_file(str(QWEN / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def pieces(real):
    return {name: xtok.piece_bytes(tok) for name, tok in real.items()}


@pytest.mark.parametrize("text", HARD)
def test_pieces_spell_the_text_and_common_starts_cut_both_sides_alike(real, pieces, text):
    """On every side the pieces' bytes concatenate to the text ("▁" and "Ġ" are spaces, <0xNN> a byte); every
    common start is a token start on both sides, the text's first character is one, and between two common starts
    both sides' tokens cover the same characters (and spell the same bytes)."""
    literal = "▁" in text  # SentencePiece reads a literal "▁" as its space: Gemma's pieces spell a space there
    for name, tok in real.items():
        ids = tok.encode(text, add_special_tokens=False).ids
        spelled = b"".join(pieces[name][i] for i in ids)
        assert spelled == tok.decode(ids, skip_special_tokens=False).encode(), name  # what the ids mean to it
        assert spelled == text.encode() or (name == "gemma3" and literal), name
    for a in real:
        for b in real:
            if a == b:
                continue
            theirs, ours = real[a].encode(text, add_special_tokens=False), real[b].encode(text, add_special_tokens=False)
            pairs = xtok.starts(text, theirs.offsets, ours.offsets)
            assert pairs[0] == (0, 0)
            cuts = pairs + [(len(ours.ids), len(theirs.ids))]
            for (i, j), (i2, j2) in zip(cuts, cuts[1:]):
                assert ours.offsets[i][0] == theirs.offsets[j][0]
                assert max(e for _, e in ours.offsets[i:i2]) == max(e for _, e in theirs.offsets[j:j2])
                if not literal:
                    assert b"".join(pieces[b][x] for x in ours.ids[i:i2]) == \
                        b"".join(pieces[a][x] for x in theirs.ids[j:j2]), (a, b, text)


def test_a_special_token_on_one_side_only_does_not_move_the_alignment(real):
    """A BOS that one side adds (offsets (0, 0)) is no start: the alignment is that of the text alone."""
    text = HARD[0]
    gemma, smol = real["gemma3"], real["smollm2"]
    with_bos = gemma.encode(text)  # Gemma 3 adds <bos>
    assert with_bos.ids[0] != gemma.encode(text, add_special_tokens=False).ids[0]
    plain = xtok.starts(text, gemma.encode(text, add_special_tokens=False).offsets, smol.encode(text, add_special_tokens=False).offsets)
    shifted = xtok.starts(text, with_bos.offsets, smol.encode(text, add_special_tokens=False).offsets)
    assert [(i, j - 1) for i, j in shifted] == plain


def test_the_bundled_corpora_align_at_most_positions(real):
    """Over chains of the bundled corpora (CSQA with PaLM's and Qwen's rationales, GSM8K): the pieces between
    common starts spell the same text, and most student positions have a teacher distribution."""
    chains = [r["rationales"][0]["text"] for r in data.read_corpus(data.DEFAULT_TRAIN)[:40]]
    chains += [x["text"] for r in data.read_corpus(data.DATA_DIR / "csqa_qwen_train.jsonl")[:10] for x in r["rationales"][:3]]
    chains += [r["rationales"][0]["text"] for r in data.read_corpus(data.GSM8K_TRAIN)[:20]]
    aligned = total = 0
    for text in (" " + c.strip() + "\n\n" for c in chains):
        theirs, ours = real["gemma3"].encode(text, add_special_tokens=False), real["smollm2"].encode(text, add_special_tokens=False)
        pairs = xtok.starts(text, theirs.offsets, ours.offsets)
        cut = sorted({ours.offsets[i][0] for i, _ in pairs} | {len(text)})
        assert "".join(text[a:b] for a, b in zip(cut, cut[1:])) == text[cut[0]:]
        aligned, total = aligned + len(pairs), total + len(ours.ids)
    assert aligned / total > 0.9


def test_the_projection_is_the_identity_for_one_tokenizer_and_sums_pieces_that_start_alike(real, pieces):
    smol = real["smollm2"]
    same = xtok.Projection(smol, smol)
    ordinary = [i for i, b in enumerate(pieces["smollm2"]) if b]
    assert same.matched == 1.0 and np.array_equal(same.map[ordinary], ordinary)
    ids = np.array([[500, 900, 700]])
    got_ids, got_lp = same.top_k(ids, np.log(np.array([[0.5, 0.3, 0.1]])))
    assert got_ids.tolist() == [[500, 900, 700]] and np.allclose(np.exp(got_lp), [[0.5, 0.3, 0.1]])
    gemma = real["gemma3"]
    proj = xtok.Projection(gemma, smol)
    river, ri = gemma.encode(" river", add_special_tokens=False).ids, smol.encode(" river", add_special_tokens=False).ids
    assert len(river) == 1 and proj.map[river[0]] == ri[0]  # the same bytes: the same piece
    longer = [i for i, b in enumerate(pieces["gemma3"]) if b == b" riverside"]
    if longer:  # a piece the student splits counts for the student piece it starts with
        assert pieces["smollm2"][proj.map[longer[0]]] in (b" river", b" rivers", b" riv", b" r")
    both = np.array([[river[0], longer[0] if longer else river[0], 0]])
    got_ids, got_lp = proj.top_k(both, np.log(np.array([[0.4, 0.2, 0.1]])))
    assert np.isneginf(got_lp[0, -1]) and np.isclose(np.exp(got_lp[0]).sum(), 0.6 + (0.1 if proj.map[0] >= 0 else 0))


def test_qwen_and_smollm2_align_and_share_a_quarter_of_the_pieces(real):
    """The real pair of the experiment: Qwen2.5's 151k pieces onto SmolLM2's 49k (skipped without the teacher)."""
    if "qwen2.5" not in real:
        pytest.skip("Qwen2.5-Coder-1.5B-Instruct not fetched (python experiments/fetch_teachers.py)")
    proj = xtok.Projection(real["qwen2.5"], real["smollm2"])
    assert 0.2 < proj.matched < 0.5
    text = HARD[0]
    theirs, ours = real["qwen2.5"].encode(text, add_special_tokens=False), real["smollm2"].encode(text, add_special_tokens=False)
    assert [t for t in theirs.tokens[-2:]] == ["Ġriver", ".ĊĊ"] and ours.tokens[-2:] == [".", "ĊĊ"]
    starts = dict(xtok.starts(text, theirs.offsets, ours.offsets))
    assert len(ours.ids) - 2 in starts and len(ours.ids) - 1 not in starts  # the blank line: inside ".\n\n"


# -----------------------------------------------------------------------------
# --kd through the projection


def score(model, corpus, out):
    return teacher.main(["--teacher", str(model), "--score", str(corpus), "--out", str(out), "--top-logprobs", str(K),
                         "--batch-size", "3"])


def kd_tokens(student, scored, cross=None):
    """The scored corpus's chains as train.py --kd tokenises them for `student`; cross: force the carried path."""
    records = data.read_corpus(scored)
    tok = load_tokenizer(student)
    sidecar = distill.TopKSidecar(scored, records, tok, student)
    if cross is not None:
        name = records[0]["topk_file"]
        sidecar.sidecars[name] = (sidecar.sidecar(name)[0], cross)
    examples = data.build_examples(records, "cot", "correct")[:9]
    return data.tokenize_examples(examples, tok, 512, data.Skips(), attach=sidecar)


def loss_and_grads(model, tokens, alpha=0.5):
    r = data.to_tensors(tokens, flags.RunConfig(kd=alpha, batch_size=len(tokens)), 0, torch.device("cpu"))
    model.zero_grad()
    parts, loss = model(r.idx, r.targets, target_idx=r.target_idx, teacher_view=r.teacher_view)
    loss.backward()
    return [loss.detach(), *parts.values()], [p.grad.clone() for p in model.parameters()]


def test_one_tokenizer_through_the_projection_gives_todays_loss_and_gradients(pair, corpus, tmp_path):
    scored = score(pair[1], corpus, tmp_path / "s.jsonl")
    tok = load_tokenizer(pair[0])
    today = kd_tokens(pair[0], scored)
    carried = kd_tokens(pair[0], scored, cross=(tok, xtok.Projection(tok, tok)))
    model = from_pretrained(pair[0])
    a, b = loss_and_grads(model, today), loss_and_grads(model, carried)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def permuted(folder, out, seed=3):
    """The model at `folder` with its vocabulary's ids permuted: tokenizer.json's ids and the embedding rows
    moved together -- the same model, reading the same text, under other ids."""
    spec = json.loads((Path(folder) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    perm = np.random.default_rng(seed).permutation(len(vocab))  # old id -> new id
    spec["model"]["vocab"] = {p: int(perm[i]) for p, i in vocab.items()}
    for t in spec.get("added_tokens") or []:
        t["id"] = int(perm[t["id"]])
    model = from_pretrained(folder)
    inverse = torch.from_numpy(np.argsort(perm))  # new id -> old id
    with torch.no_grad():
        model.embed_tokens.weight.copy_(model.embed_tokens.weight[inverse])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        model.cfg.hf[key] = int(perm[model.cfg.hf[key]])
    src = Path(str(out) + "-tok")
    src.mkdir(parents=True)
    (src / "tokenizer.json").write_text(json.dumps(spec))
    save_pretrained(model, out, tokenizer_from=src)
    return out


def test_a_teacher_that_is_the_student_with_its_ids_permuted_has_a_kl_of_0(pair, corpus, tmp_path, capsys):
    """Other ids, other fingerprint, so the projection runs; the same model: its KD term is float16's rounding."""
    twin = permuted(pair[0], tmp_path / "twin")
    assert distill.tokenizer_fingerprint(load_tokenizer(twin)) != distill.tokenizer_fingerprint(load_tokenizer(pair[0]))
    scored = score(twin, corpus, tmp_path / "twin.jsonl")
    rows = train_kd(pair[0], scored, tmp_path / "run")
    assert "aligning two tokenizers" in capsys.readouterr().out
    assert abs(rows[0]["kd_loss"]) < 1e-5 and rows[0]["ce"] > 1


def train_kd(student, scored, out, *extra):
    train.main(["--init", str(student), "--data", str(scored), "--out", str(out), "--max-steps", "4", "--batch-size",
                "6", "--eval-every", "0", "--eval-questions", "2", "--lr", "3e-3", "--warmup-steps", "0", "--seed", "5",
                "--kd", "0.5", *extra])
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_student_of_another_tokenizer_distils_and_resumes_exactly(pair, corpus, tmp_path, monkeypatch):
    """A student whose tokenizer is not the teacher's trains on the teacher's top-k (a KD term that falls); stopped
    by SIGINT inside its third step and resumed, its losses equal the uninterrupted run's."""
    other = tiny_student(tmp_path / "other", vocab_size=320, seed=2)
    scored = score(pair[1], corpus, tmp_path / "s.jsonl")
    straight = train_kd(other, scored, tmp_path / "a", "--max-steps", "6", "--kd", "1")
    assert straight[0]["kd_loss"] > 0.05 and straight[-1]["kd_loss"] < straight[0]["kd_loss"]
    real_step = signal_on_call(monkeypatch, train, "train_step", 3, signal.SIGINT)
    with pytest.raises(SystemExit):
        train_kd(other, scored, tmp_path / "b", "--max-steps", "6", "--kd", "1")
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train_kd(other, scored, tmp_path / "b", "--max-steps", "6", "--kd", "1", "--resume")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_without_the_teachers_tokenizer_the_run_says_where_to_put_it(pair, corpus, tmp_path):
    other = tiny_student(tmp_path / "other", vocab_size=320, seed=2)
    scored = score(pair[1], corpus, tmp_path / "s.jsonl")
    beside = Path(str(scored) + ".topk.tokenizer.json")
    assert beside.is_file()  # teacher.py --score --top-logprobs writes it
    beside.unlink()
    (pair[1] / "tokenizer.json").rename(pair[1] / "tokenizer.json.away")
    try:
        with pytest.raises(InputError, match=r"aligning the two needs the teacher's tokenizer: put its tokenizer.json at"):
            kd_tokens(other, scored)
    finally:
        (pair[1] / "tokenizer.json.away").rename(pair[1] / "tokenizer.json")


def test_empty_slots_leave_the_chunked_kd_equal_to_a_dense_reference(pair, monkeypatch):
    """Top-k rows with empty slots (-inf, id 0), one row with a single slot (no teacher distribution there): loss
    and gradients equal the plain formula over the filled slots only (1e-5), and the single-slot row adds 0."""
    model = from_pretrained(pair[0])
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 384 * 7)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 384, (2, 16), generator=g)
    targets = torch.full((2, 16), -100)
    targets[:, 4:] = torch.randint(0, 384, (2, 12), generator=g)
    target_idx = (targets.flatten() != -100).nonzero()[:, 0]
    n = len(target_idx)
    top = torch.randn(n, 384, generator=g).mul(3).log_softmax(-1).topk(K, -1)
    ids, lp = top.indices.clone(), top.values.clone()
    filled = torch.arange(K)[None, :] < torch.randint(1, K + 1, (n, 1), generator=g)
    ids[~filled], lp[~filled] = 0, -torch.inf
    t = losses.TopKTargets(ids, lp, 0.5, 1.0)
    parts, loss = model(idx, targets, target_idx=target_idx, teacher_view=t)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(idx)[0].flatten(0, 1)[target_idx]
    p = lp.log_softmax(-1)
    q = logits.gather(1, ids).masked_fill(~filled, -torch.inf).log_softmax(-1)
    per_row = torch.where(filled, p.exp() * (p - q), 0.0).sum(-1)
    want = 0.5 * torch.nn.functional.cross_entropy(logits, targets.flatten()[target_idx]) + 0.5 * per_row.mean()
    torch.testing.assert_close(loss, want.detach(), atol=1e-5, rtol=0)
    for a, b in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert per_row[filled.sum(-1) == 1].abs().max() == 0


# -----------------------------------------------------------------------------
# On-policy through the projection


def grades(student, teacher, corpus, cross, beta=0.5):
    """One on-policy micro-batch graded by `teacher` (through the projection with cross) -> (the loss, the
    gradients, the grades). The chains are the corpus's targets as the student tokenizes them: the teacher re-reads
    a chain's text in its own tokens, so a sampled chain the student split otherwise than its tokenizer would is
    aligned only where the splits agree."""
    import onpolicy
    from sample import SampleConfig

    tok, model = load_tokenizer(student), from_pretrained(student)
    judge = from_pretrained(teacher)
    if cross:
        theirs = load_tokenizer(teacher)
        judge = onpolicy.CrossTeacher(judge, theirs, xtok.Projection(theirs, tok), xtok.piece_bytes(tok))
    onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(n=2, temperature=1.0, max_new_tokens=12), beta, teacher=judge)
    chosen = data.build_examples(data.read_corpus(corpus)[:3], "cot", "all")[:6]
    examples = data.tokenize_examples(chosen, tok, 512, data.Skips())
    onp.queries = [e["query"] for e in chosen]
    rows = data.to_tensors(examples, flags.RunConfig(batch_size=6), 0, torch.device("cpu"))
    view = onp.grade(rows.idx, rows.target_idx, examples, torch.device("cpu"))
    model.zero_grad()
    parts, loss = model(rows.idx, rows.targets, target_idx=rows.target_idx, teacher_view=view)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], view


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_on_policy_through_the_projection_equals_the_one_tokenizer_grader(pair, corpus, beta):
    """A teacher of the student's tokenizer, graded through the cross-tokenizer path: the divergence and its
    gradients of the exact grader (1e-5)."""
    same = grades(pair[0], pair[1], corpus, cross=False, beta=beta)
    carried = grades(pair[0], pair[1], corpus, cross=True, beta=beta)
    assert bool(carried[2].aligned.all())
    torch.testing.assert_close(carried[0], same[0], atol=1e-5, rtol=0)
    for a, b in zip(carried[1], same[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_teacher_of_another_tokenizer_reads_its_worked_examples_in_its_own_tokens(pair, corpus, tmp_path):
    """--teacher-shots with a teacher of another tokenizer: the header is the teacher tokenizer's encoding of the
    worked examples (not the student's ids), read once, and the grades are those of header + query + chain read whole
    by the teacher, carried onto the student's vocabulary (1e-5)."""
    import onpolicy
    from sample import SampleConfig

    other = tiny_student(tmp_path / "other", vocab_size=320, seed=2, soft=True)
    tok, theirs, judge = load_tokenizer(pair[0]), load_tokenizer(other), from_pretrained(other)
    cross = onpolicy.CrossTeacher(judge, theirs, xtok.Projection(theirs, tok), xtok.piece_bytes(tok))
    text = data.fewshot_header(data.exemplars(1))
    onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(), 0.5, header=text, teacher=cross)
    assert onp.header == theirs.encode(text, add_special_tokens=False).ids != tok.encode(text).ids
    chosen = data.build_examples(data.read_corpus(corpus)[:2], "cot", "all")[:3]
    examples = data.tokenize_examples(chosen, tok, 512, data.Skips())
    onp.queries = [e["query"] for e in chosen]
    view = onp.grade(None, None, examples, torch.device("cpu"))
    rows, where = onp.align(examples)
    with torch.no_grad():
        want = [judge(torch.tensor([onp.header + rows[e]]))[0][0, len(onp.header) + p].log_softmax(-1)
                for e, p in (w for w in where if w is not None)]
    assert bool(view.aligned.any()) and onp.header_cache.length == len(onp.header)
    torch.testing.assert_close(view.logprobs[view.aligned], cross.projection.full(torch.stack(want)), atol=1e-5,
                               rtol=0)


def test_on_policy_from_a_permuted_twin_has_a_divergence_of_0_and_another_tokenizer_trains(pair, corpus, tmp_path,
                                                                                           capsys):
    twin = permuted(pair[0], tmp_path / "twin")
    loss, _, view = grades(pair[0], twin, corpus, cross=True)
    assert bool(view.aligned.all()) and abs(float(loss)) < 1e-5
    other = tiny_student(tmp_path / "other", vocab_size=320, seed=2)
    argv = ["--init", str(other), "--data", str(corpus), "--on-policy", "--teacher", str(pair[1]), "--max-steps", "2",
            "--batch-size", "4", "--on-policy-n", "2", "--max-new-tokens", "12", "--eval-every", "0",
            "--eval-questions", "2", "--teacher-shots", "0"]
    with pytest.raises(InputError, match=r"--beta 1 \(the reverse KL\) is unbounded"):
        train.main(argv + ["--out", str(tmp_path / "r1")])
    out = train.main(argv + ["--beta", "0.5", "--out", str(tmp_path / "r2")])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert "aligning two tokenizers" in capsys.readouterr().out
    assert len(rows) == 2 and all(0 <= r["divergence"] < 10 for r in rows)
