"""Cross-tokenizer alignment, side by side with TRL 1.16's GOLD (`trl.experimental.gold`): on the same texts and
tokenizers, where do the spans start, and how long does each take.

Ours (xtok.starts): the student tokens that start at the character where a teacher token starts, from each side's
own character offsets. GOLD (GOLDTrainer's ULDLoss._align_by_byte_offsets): groups that close where both sides reach
the same byte, the byte offsets built as GOLD builds them for a completion (each piece's length from
`trl.experimental.utils.piece_byte_len`, summed). A group's first student token is a span start, so the two agree
when the sets of span starts are equal. Texts: the bundled corpora's chains (CSQA with PaLM's and Qwen's rationales,
GSM8K) and the hard cases of tests/test_xtok.py. Pairs: Gemma 3 <-> SmolLM2 (SentencePiece vs byte-level BPE) and,
when the teacher is fetched, Qwen2.5 -> SmolLM2 (two byte-level BPEs).

The loss (`losses`): GOLD's ULDLoss -- extended ULD (byte-offset groups), the "bayesian" merge (the shifted
convention: each position's distribution predicts the next token), the hybrid loss (the generalised JSD over the
pieces both vocabularies hold, at GOLD's adaptive weight; sorted-probability L1 over the rest), no cross-entropy, the
appended EOS skipped on both sides -- against ours (train.py --on-policy through xtok: onpolicy.OnPolicy.grade_across,
losses.ProjectedGrades) on one training chain at a time, each the mean over its tokens. Student: a tiny random
model with a byte-level BPE of its own (tests/helpers.tiny_student); teachers: one of its tokenizer with other
weights, that teacher with its ids permuted (another tokenizer, the same pieces), and one of another tokenizer.

    python bench/xtok_gold.py          # needs trl==1.16.0 (and datasets, which it imports); prints two tables
    python bench/xtok_gold.py --cost   # the real pair's on-policy grading, its parts timed (no TRL needed)
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import data  # noqa: E402
import xtok  # noqa: E402
from checkpoint import default_student, load_tokenizer, packaged_student  # noqa: E402
from cli import run  # noqa: E402
from fileio import cache_dir  # noqa: E402
from test_xtok import HARD  # noqa: E402


def texts():
    chains = [r["rationales"][0]["text"] for r in data.read_corpus(data.DEFAULT_TRAIN)[:300]]
    chains += [x["text"] for r in data.read_corpus(data.DATA_DIR / "csqa_qwen_train.jsonl")[:100] for x in r["rationales"][:2]]
    chains += [r["rationales"][0]["text"] for r in data.read_corpus(data.GSM8K_TRAIN)[:200]]
    return [" " + c.strip() + "\n\n" for c in chains] + HARD


def gold_starts(teacher, student, t_ids, s_ids):
    """GOLD's span starts: its groups' first student indices, byte offsets as GOLD builds them."""
    from trl.experimental.gold.gold_trainer import ULDLoss  # imported once by main, outside the clocks
    from trl.experimental.utils import piece_byte_len

    def offsets(tok, ids):
        out, at = [], 0
        for i in ids:
            n = piece_byte_len(tok.id_to_token(i))
            out.append((at, at + n))
            at += n
        return out
    s_groups, _ = ULDLoss._align_by_byte_offsets(offsets(student, s_ids), offsets(teacher, t_ids))
    return [g[0] for g in s_groups if g]


def compare(name, teacher, student, corpus):
    """-> a table row: texts, where the starts differ, a first example, each side's seconds."""
    encoded = [(text, teacher.encode(text, add_special_tokens=False), student.encode(text, add_special_tokens=False))
               for text in corpus]
    t0 = time.perf_counter()
    ours = [sorted(i for i, _ in xtok.starts(text, te.offsets, se.offsets)) for text, te, se in encoded]
    t1 = time.perf_counter()
    theirs = [gold_starts(teacher, student, te.ids, se.ids) for _, te, se in encoded]
    t2 = time.perf_counter()
    differ = [(text, a, b, se) for (text, _, se), a, b in zip(encoded, ours, theirs) if a != b]
    example = ""
    if differ:
        text, a, b, se = differ[0]
        first = min(set(a) ^ set(b))
        near = se.offsets[first][0]
        example = (f"{text[max(0, near - 12):near + 8]!r}: student token {first} ({se.tokens[first]!r}) a start: ours "
                   f"{first in a}, GOLD {first in b}")
    return [name, f"{len(corpus):,}", f"{len(differ):,}", example, f"{(t1 - t0) * 1e3:,.0f} ms", f"{(t2 - t1) * 1e3:,.0f} ms"]


def loss_rows(work, betas=(0.0, 0.5, 0.9), chains=6):
    """-> table rows: teacher, beta, the largest |GOLD - ours| over `chains` chains, the mean of each side."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl.experimental.gold.gold_config import GOLDConfig
    from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts

    import flags
    import onpolicy
    from checkpoint import from_pretrained
    from helpers import tiny_pair, tiny_student
    from sample import SampleConfig
    from test_xtok import permuted

    student, teacher = tiny_pair(work)
    teachers = {"its tokenizer, other weights": teacher, "the same, ids permuted": permuted(teacher, work / "permuted"),
                "another tokenizer (320 pieces)": tiny_student(work / "other", vocab_size=320, seed=2, soft=True)}
    examples = data.build_examples(data.read_corpus(data.DEFAULT_TRAIN)[:3], "cot", "all")[:chains]
    tok, model = load_tokenizer(student), from_pretrained(student)
    hf_student = AutoModelForCausalLM.from_pretrained(student)

    def hf_tokenizer(folder):
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")

    def gold(uld, hf_teacher, s_tok, t_tok, e):
        s_ids, s_labels, _, s_offsets = build_teacher_inputs_from_texts(s_tok, [e["query"]], [e["target"]])
        t_ids, t_labels, _, t_offsets = build_teacher_inputs_from_texts(t_tok, [e["query"]], [e["target"]])
        with torch.no_grad():
            return float(uld(hf_student(s_ids).logits, hf_teacher(t_ids).logits, s_labels, t_labels, s_ids, t_ids,
                             s_offsets, t_offsets))

    def ours(onp, e):
        tokens = data.tokenize_examples([e], tok, 512, data.Skips())
        onp.queries = [e["query"]]
        rows = data.to_tensors(tokens, flags.RunConfig(batch_size=1), 0, torch.device("cpu"))
        view = onp.grade(rows.idx, rows.target_idx, tokens, torch.device("cpu"))
        with torch.no_grad():
            return float(model(rows.idx, rows.targets, target_idx=rows.target_idx, teacher_view=view)[1])

    rows = []
    for name, folder in teachers.items():
        theirs, hf_teacher = load_tokenizer(folder), AutoModelForCausalLM.from_pretrained(folder)
        cross = onpolicy.CrossTeacher(from_pretrained(folder), theirs, xtok.Projection(theirs, tok), xtok.piece_bytes(tok))
        s_tok, t_tok = hf_tokenizer(student), hf_tokenizer(folder)
        for beta in betas:
            config = GOLDConfig(output_dir=str(work / "gold"), use_uld_loss=True, use_extended_uld=True,
                                uld_use_hybrid_loss=True, uld_token_merge_strategy="bayesian", beta=beta,
                                uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_skip_student_eos=True,
                                uld_skip_teacher_eos=True, report_to="none", use_cpu=True)
            uld = ULDLoss(config, student_tokenizer=s_tok, teacher_tokenizer=t_tok)
            onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(), beta, teacher=cross)
            pairs = [(gold(uld, hf_teacher, s_tok, t_tok, e), ours(onp, e)) for e in examples]
            rows.append([name, f"{beta:g}", f"{max(abs(g - o) for g, o in pairs):.1e}",
                         f"{sum(g for g, _ in pairs) / len(pairs):.5f}", f"{sum(o for _, o in pairs) / len(pairs):.5f}"])
    return rows


def grading_cost(chains=8, repeats=3):
    """What aligning two tokenizers adds to an on-policy step on the real pair (Qwen2.5-Coder-1.5B grading
    SmolLM2-135M's chains): onpolicy.OnPolicy.grade_across on `chains` of the Qwen corpus's chains as the student
    tokenizes them, split into the alignment (OnPolicy.align: re-tokenizing, xtok.starts), the teacher's forward pass
    (hidden_at), the projection onto the student's vocabulary (xtok.Projection.full) and the rest (the teacher's head)
    -> a printed line."""
    import numpy as np
    import torch

    import onpolicy
    from checkpoint import from_pretrained
    from sample import SampleConfig

    qwen = cache_dir() / "teachers" / "Qwen2.5-Coder-1.5B-Instruct"
    tok, theirs = load_tokenizer(default_student()), load_tokenizer(qwen)
    t0 = time.perf_counter()
    projection = xtok.Projection(theirs, tok)
    map_s = time.perf_counter() - t0
    teacher = from_pretrained(qwen)
    records = data.read_corpus(data.DATA_DIR / "csqa_qwen_train.jsonl")[:chains]
    examples = [e for e in data.build_examples(records, "cot", "all", 1) if e["target"].strip()][:chains]
    tokens = data.tokenize_examples(examples, tok, 512, data.Skips())
    onp = onpolicy.OnPolicy(tok, "cot", SampleConfig(), 0.5,
                            teacher=onpolicy.CrossTeacher(teacher, theirs, projection, xtok.piece_bytes(tok)))
    onp.queries = [e["query"] for e in examples]
    clock = {"align": 0.0, "forward": 0.0, "project": 0.0}

    def timed(name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            clock[name] += time.perf_counter() - t
            return out
        return call
    teacher.hidden_at = timed("forward", teacher.hidden_at)
    onp.align = timed("align", onp.align)
    projection.full = timed("project", projection.full)
    totals = []
    with torch.no_grad():
        for _ in range(repeats):
            clock.update(align=0.0, forward=0.0, project=0.0)
            t = time.perf_counter()
            view = onp.grade_across(tokens, torch.device("cpu"))
            totals.append((time.perf_counter() - t, clock["align"], clock["forward"], clock["project"]))
    total, align, forward, project = np.median(np.array(totals), 0)
    n = int(view.aligned.sum())
    print(f"\ngrading {len(tokens)} chains ({len(view.aligned)} student tokens, {n} aligned), median of {repeats}, "
          f"fp32, {torch.get_num_threads()} threads: {total:.2f} s -- the alignment {align * 1e3:.0f} ms, the teacher's "
          f"forward {forward:.2f} s, the projection {project:.2f} s, the teacher's head and the rest "
          f"{total - align - forward - project:.2f} s; the vocabulary map "
          f"{map_s:.1f} s once a run ({projection.matched:.1%} of the teacher's pieces held by the student)")


def main():
    if "--cost" in sys.argv:
        return grading_cost()
    import trl.experimental.gold.gold_trainer  # noqa: F401 -- the import (seconds) is no part of GOLD's alignment time
    smol, gemma = load_tokenizer(default_student()), load_tokenizer(packaged_student("gemma-3-270m"))
    pairs = [("Gemma 3 -> SmolLM2", gemma, smol), ("SmolLM2 -> Gemma 3", smol, gemma)]
    qwen = cache_dir() / "teachers" / "Qwen2.5-Coder-1.5B-Instruct"
    if (qwen / "tokenizer.json").is_file():
        pairs.insert(0, ("Qwen2.5 -> SmolLM2", load_tokenizer(qwen), smol))
    corpus = texts()
    rows = [compare(name, t, s, corpus) for name, t, s in pairs]
    print("| teacher -> student | texts | span starts differ | first difference | ours | GOLD |\n|" + " --- |" * 6)
    for row in rows:
        print("| " + " | ".join(row) + " |")
    with tempfile.TemporaryDirectory() as work:
        rows = loss_rows(Path(work))
    print("\n| teacher of the tiny student | beta | largest difference a chain | GOLD (mean of chains) | ours |\n|"
          + " --- |" * 5)
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    run(main)
