"""Distilling across tokenizers: a teacher's next-token distributions, read in its own tokens, carried onto a
student whose tokenizer is another (train.py --kd with a sidecar scored by a teacher of another family).

The same text is tokenized by both sides: the teacher read the training target in its tokens when it was scored
(teacher.py --score --top-logprobs K), the student reads it in its own. Where a teacher token and a student token
start at the same character, both models predict the next piece from the same text, so the teacher's distribution
there can stand for the student's: each teacher piece counts for the student piece it starts with (`Projection`:
the longest student piece that is a prefix of the teacher piece's bytes -- the piece itself where both vocabularies
hold it), and the teacher's probabilities of the pieces that start alike are summed (the chain rule's first factor:
P(span) = P(first piece) P(rest | first piece), and the rest is the student's own next position). Where a student
token starts inside a teacher token, the teacher predicted nothing from that text: the position keeps the
cross-entropy alone. So a pair with one tokenizer gives today's top-k exactly, and a teacher whose ids are the
student's permuted gives the student's own distribution.

    alignment      `starts`: the student positions whose token starts where a teacher token starts
    vocabulary     `piece_bytes`: each id's bytes (byte-level BPE, SentencePiece with byte fallback, added tokens)
    projection     `Projection`: teacher id -> student id; how much of the teacher's vocabulary the student holds

Unused top-k slots hold `EMPTY` (log-probability -inf, id 0): losses.TopKTargets leaves them out of both sides.
"""

import json
import re
from functools import lru_cache

import numpy as np
import torch

from fileio import InputError

EMPTY = -np.inf  # an unused top-k slot's log-probability


@lru_cache(maxsize=1)
def _byte_decoder():
    """GPT-2's byte-level alphabet: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(spec):
    decoder = spec.get("decoder") or {}
    return {d.get("type") for d in decoder.get("decoders", [decoder])}


def piece_bytes(tokenizer):
    """The bytes each id stands for in text (None for special tokens): byte-level BPE through GPT-2's byte
    alphabet ("Ġriver" -> b" river"), SentencePiece pieces with "▁" as a space and byte fallback ("<0x0A>" ->
    b"\\n"), added tokens as written."""
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab = vocab if isinstance(vocab, dict) else {p: i for i, (p, _) in enumerate(vocab)}  # Unigram: [piece, score]
    out = [None] * tokenizer.get_vocab_size()
    byte_level, fallback = "ByteLevel" in _decoder_types(spec), re.compile(r"<0x([0-9A-Fa-f]{2})>")
    table = _byte_decoder()
    for piece, i in vocab.items():
        if i >= len(out):
            continue
        if byte_level:
            out[i] = bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        elif (m := fallback.fullmatch(piece)) and spec["model"].get("byte_fallback"):
            out[i] = bytes([int(m.group(1), 16)])
        else:
            out[i] = piece.replace("▁", " ").encode()
    for t in spec.get("added_tokens") or []:
        if t["id"] < len(out):
            out[t["id"]] = None if t.get("special") else t["content"].encode()
    return out


def specials(tokenizer):
    """A tokenizer's special tokens: content -> id ("<|endoftext|>", "<eos>", ...)."""
    return {t["content"]: t["id"] for t in json.loads(tokenizer.to_str()).get("added_tokens") or [] if t.get("special")}


class Projection:
    """Teacher ids -> student ids: each teacher piece counts for the longest student piece its bytes start with
    (itself, where the student holds the same bytes), a special token for the student's special token of the same
    name; -1 where none. `matched`: the share of the teacher's ordinary pieces the student holds byte for byte."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        theirs, ours = piece_bytes(teacher_tokenizer), piece_bytes(student_tokenizer)
        by_bytes = {}
        for i, b in enumerate(ours):
            if b and b not in by_bytes:
                by_bytes[b] = i
        longest = max(map(len, by_bytes), default=0)
        self.map = np.full(len(theirs), -1, dtype=np.int64)
        same = ordinary = 0
        for i, b in enumerate(theirs):
            if not b:
                continue
            ordinary += 1
            for n in range(min(len(b), longest), 0, -1):
                if b[:n] in by_bytes:
                    self.map[i] = by_bytes[b[:n]]
                    same += n == len(b)
                    break
        ours_special = specials(student_tokenizer)
        for name, i in specials(teacher_tokenizer).items():
            if name in ours_special and i < len(self.map):
                self.map[i] = ours_special[name]
        self.matched = same / max(1, ordinary)
        self.teacher_vocab, self.student_vocab = len(theirs), len(ours)

    def top_k(self, ids, logprobs):
        """A teacher's top-k at some positions (ids, logprobs: (n, K)) -> the same in student ids: the probabilities
        of teacher pieces that start with the same student piece summed, likeliest first, the slots left over EMPTY.
        A teacher piece the student cannot start is dropped (its mass leaves the top-k, as the mass outside it
        does)."""
        n, k = ids.shape
        mapped = self.map[np.asarray(ids, dtype=np.int64)]
        out_ids, out_lp = np.zeros((n, k), np.int32), np.full((n, k), EMPTY, np.float32)
        for r in range(n):
            merged = {}
            for s, lp in zip(mapped[r].tolist(), np.asarray(logprobs[r], np.float64).tolist()):
                if s >= 0 and np.isfinite(lp):
                    merged[s] = np.logaddexp(merged[s], lp) if s in merged else lp
            ranked = sorted(merged.items(), key=lambda x: -x[1])
            for j, (s, lp) in enumerate(ranked):
                out_ids[r, j], out_lp[r, j] = s, lp
        return out_ids, out_lp


    def full(self, logprobs):
        """A teacher's whole next-token distributions (n, V_teacher) as log-probabilities -> the same carried onto the
        student's vocabulary (n, V_student): each student piece gets the probabilities of the teacher pieces that
        begin with it, renormalised over what the student can begin (-inf where nothing does)."""
        index = torch.as_tensor(self.map, device=logprobs.device)
        keep = index >= 0
        out = torch.zeros(logprobs.shape[0], self.student_vocab, device=logprobs.device)
        out.index_add_(1, index[keep], logprobs[:, keep].exp())
        return out.log() - out.sum(-1, keepdim=True).log()


def starts(text, teacher_offsets, student_offsets):
    """Which student tokens start where a teacher token starts, over the same `text` -> (student index, teacher
    index) pairs. A token starts where its offset does and the token before it ended (a byte-level split inside a
    multi-byte character shares its character's offsets: no start there)."""
    def starting(offsets):
        out, end = {}, 0
        for i, (a, b) in enumerate(offsets):
            if a == end and a not in out and b > a:
                out[a] = i
            end = max(end, b)
        return out
    theirs = starting(teacher_offsets)
    return [(i, theirs[c]) for c, i in starting(student_offsets).items() if c in theirs and c < len(text)]


def check_teacher_tokens(stored, encoded, where):
    """The teacher tokens a sidecar stored for a target are the teacher tokenizer's encoding of its text."""
    if not np.array_equal(np.asarray(stored), np.asarray(encoded)):
        raise InputError(f"{where}: the {len(stored)} stored teacher tokens are not the teacher tokenizer's "
                         f"{len(encoded)} for the target text: score the corpus again with this teacher")
