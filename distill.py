"""Distillation beyond the teacher's chains: its token distributions, stored once and trained on many times
(train.py --kd). (On-policy distillation, where the student writes the chains and the teacher grades every token:
onpolicy.py.)

`teacher.py --score CORPUS --top-logprobs K` runs the teacher once over each chain of a corpus -- the student's
training prompt, then the target it learns (scotd.format_target), the very tokens train.py trains on -- and keeps,
at each target position, the teacher's K likeliest next tokens and their log-probabilities. They go to a sidecar
file beside the scored corpus; each corpus line names it, and each scored rationale says where its positions are:

    {"id": ..., "rationales": [{"text": ..., "topk": [start, n], ...}, ...], "topk_file": "x.jsonl.topk"}

The sidecar (`<out>.topk`): 8 bytes, the little-endian length H of a JSON header (its settings: K, the
teacher's tokenizer fingerprint, the teacher, the prompt), the header padded with spaces so that the records
start on a 64-byte boundary, then one record a position, appended as questions finish:

    token     int32       the target token at this position (train.py checks it against its own tokenisation)
    ids       int32 x K   the teacher's K likeliest tokens, likeliest first
    logprobs  float16 x K their log-probabilities (log-softmax over the whole vocabulary, T = 1)

124 bytes a position at K = 20: numpy reads it as a memory map (`read_sidecar`), no pickle anywhere.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

import data
import fileio
import xtok
from api import ApiError
from data import record_dtype
from fileio import InputError

MAGIC = "scotd top-k 1"  # the header's "format"
ALIGN = 64


def tokenizer_fingerprint(tokenizer):
    """sha256 (16 hex digits) of a tokenizer's vocabulary, merges and added tokens: what decides which id names
    which text. Two tokenizers with the same fingerprint give the same ids (chat templates and post-processors
    aside: train.py also checks every stored target token)."""
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    vocab = model.get("vocab")
    vocab = sorted(vocab.items()) if isinstance(vocab, dict) else vocab  # BPE: a dict; Unigram: [piece, score] rows
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])
    text = json.dumps({"type": model.get("type"), "vocab": vocab, "merges": merges, "added": added}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _header_bytes(header):
    body = json.dumps(header, ensure_ascii=False).encode()
    pad = -(8 + len(body)) % ALIGN
    return len(body + b" " * pad).to_bytes(8, "little") + body + b" " * pad


def read_header(path):
    """-> (the header dict, the byte offset of the first record); a clear error for a file that is no sidecar."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 24:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict) or header.get("format") != MAGIC or not isinstance(header.get("k"), int):
            raise ValueError(f"format {header.get('format') if isinstance(header, dict) else header!r}")
    except FileNotFoundError:
        raise InputError(f"{path}: the top-k sidecar this corpus names is missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise InputError(f"{path}: not a top-k sidecar written by teacher.py --top-logprobs ({e})") from None
    return header, 8 + n


def read_sidecar(path):
    """-> (header, records: a read-only memory map of record_dtype(k)); a half-written last record (a kill
    mid-append) is left out."""
    header, offset = read_header(path)
    dtype = record_dtype(header["k"])
    count = (Path(path).stat().st_size - offset) // dtype.itemsize
    if count == 0:
        return header, np.zeros(0, dtype)
    return header, np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class SidecarWriter:
    """Appends positions to a sidecar, resumably: `positions` (the first free one) is what the corpus lines
    already written account for; anything past it (a kill between a sidecar append and its corpus line) is cut
    off. A sidecar written with another header is refused."""

    def __init__(self, path, header, positions):
        self.path, self.header = Path(path), {"format": MAGIC} | header
        self.dtype = record_dtype(header["k"])
        if not self.path.exists() or (positions == 0 and self.path.stat().st_size == 0):
            fileio.write_file(self.path, lambda tmp: Path(tmp).write_bytes(_header_bytes(self.header)))
        old, offset = read_header(self.path)
        if old != self.header:
            changed = sorted(k for k in old.keys() | self.header.keys() if old.get(k) != self.header.get(k))
            raise InputError(f"{self.path}: written with other settings ({', '.join(changed)}); use the same flags, or "
                             "another --out")
        have = (self.path.stat().st_size - offset) // self.dtype.itemsize
        if have < positions:
            raise InputError(f"{self.path}: holds {have:,} positions, the corpus lines already written name "
                             f"{positions:,}; the sidecar was cut short or replaced: move both away and score again")
        self.offset, self.positions = offset, positions
        with open(self.path, "r+b") as f:  # cut a tail no corpus line names
            f.truncate(offset + positions * self.dtype.itemsize)

    def append(self, chains):
        """chains: [(tokens (n,), ids (n, k), logprobs (n, k))] -> their [start, n] in the sidecar, written and
        fsync'd before the caller writes the corpus lines that name them."""
        spans, blocks, at = [], [], self.positions
        for tokens, ids, logprobs in chains:
            block = np.zeros(len(tokens), self.dtype)
            block["token"], block["ids"] = tokens, ids
            block["logprobs"] = np.clip(logprobs, np.finfo(np.float16).min, 0)  # fp16 holds no -inf here
            spans.append([at, len(tokens)])
            blocks.append(block)
            at += len(tokens)
        fileio.append_bytes(self.path, b"".join(b.tobytes() for b in blocks), sync=True)  # whole, or not at all
        self.positions = at
        return spans


class TopKSidecar:
    """train.py --kd: data.tokenize_examples' `attach` -- an example's stored top-k (a slice of its sidecar's
    records, found through its record's topk_file and its rationale's topk span), checked against the student's
    tokens. A sidecar scored by a teacher of the student's tokenizer (the fingerprints agree) gives its records as
    they are; one of another tokenizer is carried onto the student's tokens (xtok.py) through the teacher's
    tokenizer: the file beside the sidecar (`<sidecar>.tokenizer.json`, teacher.py writes it), else the teacher's
    folder the header names. `student`: the student's folder (for messages)."""

    def __init__(self, corpus, records, tokenizer, student):
        self.corpus, self.sidecars, self.student, self.tokenizer = Path(corpus), {}, student, tokenizer
        self.records, self.fingerprint = {r["id"]: r for r in records}, tokenizer_fingerprint(tokenizer)

    def sidecar(self, name):
        """-> (records, None, or for a teacher of another tokenizer (its tokenizer, the xtok.Projection))."""
        if name not in self.sidecars:
            path = self.corpus.parent / name
            header, rows = read_sidecar(path)
            cross = None
            if header.get("tokenizer") != self.fingerprint:
                teacher = teacher_tokenizer(path, header)
                projection = xtok.Projection(teacher, self.tokenizer)
                print(f"note      {path}: scored by {header.get('teacher')}, whose tokenizer is not the student's: "
                      f"aligning two tokenizers ({projection.teacher_vocab:,} teacher pieces -> "
                      f"{projection.student_vocab:,} student pieces; the student holds {projection.matched:.1%} of the "
                      "teacher's byte for byte)", flush=True)
                cross = (teacher, projection)
            self.sidecars[name] = rows, cross
        return self.sidecars[name]

    def __call__(self, example, ids, n_query):
        """-> the example's records (n, one a target token of the student's); a clear error where none are stored
        or they do not line up with the target tokens."""
        rec = self.records[example["id"]]
        span = rec["rationales"][example["chain"]].get("topk")
        where = lambda: (  # noqa: E731
            f"{self.corpus}:{data.line_of(self.corpus, rec['id'])}: rationale {example['chain']}")
        if span is None or "topk_file" not in rec:
            raise InputError(f"{where()} has no stored top-k; --kd needs a corpus scored with `python teacher.py "
                             "--teacher DIR --score CORPUS --top-logprobs K --out SCORED`")
        rows, cross = self.sidecar(rec["topk_file"])
        start, n = span
        target = ids[n_query:]
        if cross is not None:
            return self.carried(rows, start, n, example["target"], target, cross, where)
        if start + n > len(rows) or n != len(target) or not np.array_equal(rows["token"][start:start + n], target):
            raise InputError(f"{where()}: its {n} stored target tokens (positions {start:,}.. of "
                             f"{self.corpus.parent / rec['topk_file']}, {len(rows):,} in all) are not the student's "
                             f"{len(target)}: score the corpus again for this --mode and tokenizer")
        return rows[start:start + n]

    def carried(self, rows, start, n, text, target, cross, where):
        """A teacher's records for a target it read in its own tokens -> records over the student's target tokens:
        at a student token that starts where a teacher token starts, the teacher's top-k there carried onto student
        ids (xtok.Projection.top_k); elsewhere one slot, the student's own token at probability 1 (a KD term of 0)."""
        teacher, projection = cross
        theirs = teacher.encode(text, add_special_tokens=False)
        ours = self.tokenizer.encode(text, add_special_tokens=False)
        if start + n > len(rows):
            raise InputError(f"{where()}: its stored positions {start:,}..{start + n:,} run past the sidecar's "
                             f"{len(rows):,}: score the corpus again")
        stored = rows[start:start + n]
        xtok.check_teacher_tokens(stored["token"], theirs.ids, where())
        if not np.array_equal(np.asarray(ours.ids), target):
            raise InputError(f"{where()}: the student's target tokens are not its tokenizer's encoding of the target")
        k = stored["ids"].shape[1]
        out = np.zeros(len(target), record_dtype(k))
        out["token"], out["ids"][:, 0] = target, target
        out["logprobs"][:] = xtok.EMPTY
        out["logprobs"][:, 0] = 0.0
        pairs = xtok.starts(text, theirs.offsets, ours.offsets)
        if pairs:
            i, j = map(list, zip(*pairs))
            out["ids"][i], out["logprobs"][i] = projection.top_k(stored["ids"][j], stored["logprobs"][j])
        return out


def teacher_tokenizer(sidecar, header):
    """The tokenizer of the teacher that scored `sidecar`: the copy beside it, else the teacher's folder."""
    beside = Path(str(sidecar) + ".tokenizer.json")
    folder = Path(str(header.get("teacher", ""))).expanduser()
    for path in (beside, folder / "tokenizer.json"):
        if path.is_file():
            tokenizer = Tokenizer.from_file(str(path))
            if tokenizer_fingerprint(tokenizer) != header.get("tokenizer"):
                raise InputError(f"{path}: not the tokenizer that scored {sidecar} (fingerprint "
                                 f"{tokenizer_fingerprint(tokenizer)}, the sidecar's {header.get('tokenizer')})")
            return tokenizer
    raise InputError(f"{sidecar}: scored by {header.get('teacher')}, whose tokenizer is not the student's; aligning "
                     f"the two needs the teacher's tokenizer: put its tokenizer.json at {beside}")


def served_chain(rows, chain, k, tokenizer, what, ours="--tokenizer"):
    """A chain's prompt log-probabilities from a server (api.Client.prompt_logprobs, at the chain's positions) ->
    chain_logprobs' tuple: (summed log-probability, tokens), and with k its top-k ids (n, k) and log-probabilities
    (n, k), likeliest first."""
    logps = served_logprobs(rows, chain, tokenizer, what, ours)
    top_ids, top_logps = np.zeros((len(chain), k), np.int32), np.zeros((len(chain), k), np.float32)
    for j, row in enumerate(rows[:len(chain)] if k else ()):
        top = sorted(row.items(), key=lambda kv: -kv[1][0])[:k]
        if len(top) < k:
            raise ApiError(f"{what}: the server returned {len(row)} log-probabilities a position, --top-logprobs asks "
                           f"for {k} (vLLM caps them at --max-logprobs)")
        top_ids[j], top_logps[j] = [t for t, _ in top], [lp for _, (lp, _) in top]
    return (float(logps.sum()), len(chain)) + ((top_ids, top_logps) if k else ())


def served_logprobs(rows, chain, tokenizer, what, ours):
    """The served model's log-probability of each token of `chain` (n,), float32; the text it gives each token
    checked against our tokenizer's (`ours` names it): another vocabulary would grade other tokens."""
    out = np.zeros(len(chain), np.float32)
    for j, (row, token) in enumerate(zip(rows, chain)):
        if token not in row:
            raise ApiError(f"{what}: the server's prompt_logprobs at position {j} lack the token sent there ({token})")
        served, text = row[token][1], tokenizer.decode([token], skip_special_tokens=False)
        if served is not None and served != text and "\ufffd" not in served + text:
            raise InputError(f"{what}: the server's model reads token {token} as {served!r}, {ours} as {text!r}: "
                             "serve a teacher with the same tokenizer")
        out[j] = row[token][0]
    return out
