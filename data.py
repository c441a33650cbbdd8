"""The teacher-rationale corpus: one canonical format, importers, tokenisation and batching.

SCoTD (Li et al. 2023, §2) samples rationales from a teacher for every training question and trains
the student on (query -> rationale + answer). The corpus holds exactly that, one JSON object a line
(gzip or plain JSONL):

    {"id": "6b81...", "question": "...", "choices": ["park", ..., "gravity"], "answer": "math problem",
     "rationales": [{"text": "The answer must be ...", "prediction": "math problem", "correct": true}]}

`answer` and `prediction` are choice texts (`prediction` is null when the teacher named no single
choice); `correct` is prediction == answer. A numeric question (GSM8K) has no "choices": its `answer`
and `prediction` are normalised numbers as text (scotd.parse_number: "1000.5", "72", "-3"):

    {"id": "gsm8k-train-2", "question": "Natalia sold clips to ...", "answer": "72",
     "rationales": [{"text": "Natalia sold 48/2 = 24 clips in May. ...", "prediction": "72", "correct": true,
                     "steps": ["Natalia sold 48/2 = 24 clips in May.", ...]}]}

A Socratic rationale (Shridhar et al. 2022; teacher.py --socratic writes them) adds one sub-question per
step, and its text is the Socratic chain (scotd.socratic_rationale: "sub-question ** step", a line each):

     "rationales": [{"text": "How many clips did she sell in May? ** Natalia sold 48/2 = 24 clips ...\n...",
                     "prediction": "72", "correct": true, "steps": [...], "subquestions": ["How many ...?", ...]}]

Importers turn releases into it (and `import`, any dataset by column mapping: dotted paths reach nested fields,
choices come as a list or as label/text columns, an answer as a choice's text, label or index, or a number):
    dsbs:  Distilling Step-by-Step's CSQA with PaLM-540B rationales (one per question) -- bundled in data/
    scotd: the SCoTD release (csqa_30x.json style, ~30 GPT-3 rationales per question) + the question JSONL
    gsm8k: GSM8K's train/test JSONL; the human solution is the rationale (calculator annotations
           <<48/2=24>> removed, lines joined), the number after "####" the answer -- bundled in data/

    python data.py import-dsbs ../shared/corpora/dsbs-cqa-palm data/
    python data.py import-scotd csqa_30x.json train_rand_split.jsonl out.jsonl.gz
    python data.py import-gsm8k ../shared/corpora/gsm8k data/
    python data.py import SOURCE --question COL --answer COL [--choices COL --labels COL] [--id COL] [--rationale COL]
        [--split NAME] --out CORPUS     # any dataset: JSONL, JSON, CSV, Parquet, or ORG/NAME in the HF cache
    python data.py stats [corpus]

Bad input, the rule: what makes a file something other than a corpus is fatal -- a line that is not
UTF-8 or not JSON, a record without a required field or of the wrong type, an answer that is not among
its choices, a corrupt or truncated gzip, a missing or empty file. The run stops before training with
one line naming file:line (`CorpusError`). What a teacher can legitimately produce is a counted skip,
reported by reason with its first place, in train.py's output and in `data.py stats`: an empty
rationale, a teacher answer that names no single choice, a wrong teacher answer under
filter=correct, a question left without rationales, an example longer than --max-len. A corrupt
token cache is rebuilt, never fatal.
"""

import argparse
import csv
import gzip
import hashlib
import json
import os
import random
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import cli
import fileio
import losses
from checkpoint import cached_repo, default_student, is_hub_id, load_tokenizer
from fileio import InputError
from scotd import (LETTERS, MODES, SOCRATIC_ROLES, fewshot_prefix, format_query, format_target, kind_of, majority_vote,
                   normalize_text, parse_answer, parse_choice, parse_number, split_teacher_output, socratic_turns)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRAIN = DATA_DIR / "csqa_palm_train.jsonl.gz"
DEFAULT_DEV = DATA_DIR / "csqa_palm_validation.jsonl.gz"
GSM8K_TRAIN = DATA_DIR / "gsm8k_train.jsonl.gz"
GSM8K_TEST = DATA_DIR / "gsm8k_test.jsonl.gz"
FILTERS = ("correct", "all")
ANSWER_NAMES = {"number": "a number", "yesno": "yes or no", "text": "a short text"}  # a teacher answer that is not one


class CorpusError(InputError):
    """Bad input that cannot be skipped; the message names the file and line."""


@dataclass
class Skips:
    """Counts of what was left out and why; printed before training so nothing goes missing silently."""
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason, where):
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)

    def summary(self):
        if not self.counts:
            return "skipped: nothing"
        return "skipped: " + "; ".join(f"{n:,} x {r} (first at {self.examples[r]})"
                                       for r, n in self.counts.most_common())


def _lines(path):
    """(line number, text) of a UTF-8 text file, gzipped or not; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    n = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            for n, text in _decoded(path, enumerate(f, 1)):
                yield n, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise CorpusError(f"{path}: corrupt gzip after line {n} ({e or type(e).__name__}); re-download or "
                          "re-create it") from None


def _decoded(path, lines):
    """(line number, bytes) -> (line number, text); a line that is not UTF-8 is an error naming it."""
    for n, raw in lines:
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                from None


def _json_lines(path, lines=None):
    """(line number, object) for each non-blank line (of `lines`, (n, text) pairs, if given; else of the file);
    invalid JSON is an error naming file:line."""
    for n, line in _lines(path) if lines is None else lines:
        if not line.strip():
            continue
        try:
            yield n, json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None


# -----------------------------------------------------------------------------
# Canonical corpus

REQUIRED = {"id": str, "question": str, "answer": str, "rationales": list}


def _strings(x):
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# optional fields of a rationale: (check, what it should be)
RATIONALE_FIELDS = {"prediction": (lambda x: x is None or isinstance(x, str), "a string or null"),
                    "correct": (lambda x: isinstance(x, bool), "true or false"),
                    "steps": (_strings, "a list of strings"), "subquestions": (_strings, "a list of strings"),
                    "teacher_logprob": (_number, "a number"),
                    "teacher_tokens": (lambda x: _number(x) and x == int(x) and x >= 0, "a count")}


def json_type(x):
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(x), type(x).__name__)


def check_record(rec, where):
    """A parsed line -> nothing, or CorpusError naming `where` (file:line) and what is wrong, at any depth:
    the record, its fields, its choices, each rationale and each of its fields."""
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: a record should be a JSON object, got {json_type(rec)}")
    for key, kind in REQUIRED.items():
        if key not in rec:
            raise CorpusError(f"{where}: missing field {key!r}")
        if not isinstance(rec[key], kind):
            raise CorpusError(f"{where}: field {key!r} should be a {kind.__name__}, got {json_type(rec[key])}")
    for i, r in enumerate(rec["rationales"], 1):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            got = f"its 'text' is {json_type(r.get('text'))}" if isinstance(r, dict) else f"it is {json_type(r)}"
            raise CorpusError(f"{where}: each rationale needs a 'text' string (rationale {i}: {got})")
        for key, (ok, what) in RATIONALE_FIELDS.items():
            if key in r and not ok(r[key]):
                raise CorpusError(f"{where}: rationale {i}: field {key!r} should be {what}, got {json_type(r[key])}")
        if ("teacher_logprob" in r) != ("teacher_tokens" in r):
            raise CorpusError(f"{where}: rationale {i}: 'teacher_logprob' and 'teacher_tokens' come together")
    if rec.get("answer_type") is not None:  # a yes/no or free-text question
        return check_answer_type(rec, where)
    if "choices" not in rec:  # a numeric question
        if parse_number(rec["answer"]) != rec["answer"]:
            raise CorpusError(f"{where}: a question without 'choices' needs a number as its answer "
                              f"(normalised, e.g. '1000.5'), got {rec['answer']!r}")
        return
    if not _strings(rec["choices"]):
        raise CorpusError(f"{where}: field 'choices' should be a list of strings, got {json_type(rec['choices'])}")
    if not 2 <= len(rec["choices"]) <= len(LETTERS):
        raise CorpusError(f"{where}: expected 2..{len(LETTERS)} choices, got {len(rec['choices'])}")
    if rec["answer"] not in rec["choices"]:
        raise CorpusError(f"{where}: answer {rec['answer']!r} is not among the choices {rec['choices']}")


def check_answer_type(rec, where):
    """check_record for a question that says its answer_type: 'yesno' or 'text', without choices."""
    kind = rec["answer_type"]
    if kind not in ("yesno", "text") or "choices" in rec:
        raise CorpusError(f"{where}: answer_type {kind!r}: it is 'yesno' or 'text', on a question without 'choices' "
                          "(a choice or a number needs none)")
    if kind == "yesno" and rec["answer"] not in ("yes", "no"):
        raise CorpusError(f"{where}: a yes/no question's answer is 'yes' or 'no', got {rec['answer']!r}")
    if kind == "text" and normalize_text(rec["answer"]) is None:
        raise CorpusError(f"{where}: a free-text answer needs a word (SQuAD's normalisation leaves none of "
                          f"{rec['answer']!r})")


def gold(rec):
    """The answer as scotd.extract_answer reads one: the choice's index, the normalised number, "yes"/"no", or the
    normalised text."""
    kind = kind_of(rec)
    return rec["choices"].index(rec["answer"]) if kind == "choice" else parse_answer(rec["answer"], kind) \
        if kind == "text" else rec["answer"]


def train_corpus_of(records, instead="give a few (teacher.py --shots-from CORPUS), or --shots 0"):
    """The bundled train corpus of the records' task, where few-shot exemplars come from: CSQA for
    multiple-choice questions, GSM8K for numeric ones; none for yes/no and free-text tasks (the error says what to
    do `instead`: teacher.py --shots-from names the user's)."""
    kind = kind_of(records[0])
    if kind in ("yesno", "text"):
        raise InputError(f"no bundled worked examples for {ANSWER_NAMES[kind]} answers: {instead}")
    return DEFAULT_TRAIN if kind == "choice" else GSM8K_TRAIN


def exemplars(k, source=DEFAULT_TRAIN):
    """K fixed worked examples: the first K questions of a bundled train corpus whose rationale is correct
    (CSQA's PaLM rationales; GSM8K's human solutions for numeric questions)."""
    chosen = []
    for rec in read_corpus(source):
        r = rec["rationales"][0] if rec["rationales"] else None
        if len(chosen) == k:
            break
        if r and r.get("correct") and r["text"].strip():
            choices = rec.get("choices")
            chosen.append((rec["id"], format_query(rec["question"], choices),
                           format_target("cot", choices, gold(rec) if choices else rec["answer"], r["text"])))
    return chosen


def fewshot_header(shots):
    """The K-shot prompt every question follows: exemplars' (id, query, target) as worked examples."""
    return fewshot_prefix([(query, target) for _, query, target in shots])


def read_corpus(path):
    """Canonical JSONL (optionally gzipped) -> list of records, validated; errors name file:line. Ids are
    unique: the teacher's resume, the token cache and the evaluation journal key on them."""
    records, lines = [], UniqueIds(path)
    for n, rec in _json_lines(path):
        check_record(rec, f"{path}:{n}")
        lines.add(rec["id"], n)
        records.append(rec)
    if not records:
        raise CorpusError(f"{path}: no records")
    return records


class UniqueIds:
    """The ids of a file's records seen so far, and on which line: a repeated one is an error naming both lines."""

    def __init__(self, path):
        self.path, self.seen = path, {}

    def add(self, id, line):
        if id in self.seen:
            raise CorpusError(f"{self.path}:{line}: id {id!r} repeats line {self.seen[id]}; every record needs an id "
                              "of its own (the teacher's resume, the token cache and evaluation journals key on ids)")
        self.seen[id] = line


def line_of(path, id):
    """The line of `path` that holds the record with this id (for a message: reads the file again)."""
    return next((n for n, rec in _json_lines(path) if isinstance(rec, dict) and rec.get("id") == id), "?")


def check_questions_fit(model_cfg, path, records, needed, parts, fix):
    """Before any work: every question of `path` fits the model, needed[i] being the positions records[i] needs
    (its prompt, the header, what may be generated) -> nothing, or cli.check_fits' error for the longest, named
    by file and line; parts(i) says what its positions are made of."""
    if records:
        i = max(range(len(records)), key=needed.__getitem__)
        cli.check_fits(model_cfg, needed[i], f"{path}:{line_of(path, records[i]['id'])}: question {records[i]['id']!r} "
                       f"({parts(i)})", fix)


DEV_QUESTIONS = 200  # train.py's dev slice of a corpus: this many questions, or 5 % of a small corpus


def dev_split(records, size=None):
    """The corpus -> (training records, dev records): the dev questions are the `size` (default: 200, or 5 % of
    a corpus of fewer than 4,000; none of one under 20) whose ids hash lowest (sha256), so the choice depends on ids
    alone, not on the order of the file; appending records never moves a training question into dev (a new id
    that hashes lower than the last dev one moves that one to training)."""
    size = min(DEV_QUESTIONS, len(records) // 20) if size is None else size
    dev = set(sorted((r["id"] for r in records), key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:size])
    return [r for r in records if r["id"] not in dev], [r for r in records if r["id"] in dev]


def overlap(records, others):
    """How many of `records` share an id or their question's text with `others` -> (by id, by text only)."""
    ids, texts = {r["id"] for r in others}, {" ".join(r["question"].split()) for r in others}
    by_id = sum(r["id"] in ids for r in records)
    return by_id, sum(r["id"] not in ids and " ".join(r["question"].split()) in texts for r in records)


def read_appended(path):
    """(line number, object) of each complete line of a JSONL file a run may still be appending to, or was
    killed while appending to: a cut last line is left out (not an error), a missing file is empty."""
    return read_cut(path)[0]


def read_cut(path):
    """read_appended, and what follows the last newline: (the complete lines' (line number, object), the bytes
    after the last newline -- a line cut by a kill or a copy cut short, even mid-character; b"" when none)."""
    path = Path(path)
    raw = path.read_bytes() if path.exists() else b""
    end = raw.rfind(b"\n") + 1
    return list(_json_lines(path, _decoded(path, enumerate(raw[:end].splitlines(), 1)))), raw[end:]


def drop_partial_line(path):
    """Cut a half-written last line (a kill mid-write) off a JSONL file a run appends to, so that the next line
    appended starts on a line of its own -> the bytes dropped (0: none, or no file). Reads only the tail."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep < size:
            f.truncate(keep)
    return size - keep


def read_finished(path):
    """The complete records of a corpus a teacher run may still be appending to (read_appended); every
    complete record is validated."""
    rows = read_appended(path)
    for n, rec in rows:
        check_record(rec, f"{path}:{n}")
    return [rec for _, rec in rows]


def run_totals(corpus):
    """<corpus>.runs.jsonl (teacher.py's cost record) -> one dict per invocation: its last running total
    (started, seconds, questions, generated_tokens; for an API teacher also requests, retries, malformed,
    prompt_tokens, completion_tokens). A line cut by a kill is left out, wherever it is (the next run appends
    after it): the line before it has that run's time."""
    path, totals = Path(str(corpus) + ".runs.jsonl"), {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            totals[row["started"]] = row
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
    return list(totals.values())


def write_corpus(records, path):
    path = Path(path)
    opener = (lambda p: gzip.GzipFile(p, "wb", mtime=0)) if path.suffix == ".gz" else (lambda p: open(p, "wb"))

    def write(tmp):
        with opener(tmp) as f:
            for rec in records:
                f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    return fileio.write_file(path, write)


def make_rationale(text, prediction_text, answer):
    return {"text": text, "prediction": prediction_text, "correct": prediction_text == answer}


# -----------------------------------------------------------------------------
# Importers


def teacher_rationale(output, choices, answer, kind=None):
    """A teacher's completion -> {text, prediction, correct}: the rationale before the sentence with its last
    'answer is', and the choice that sentence names (prediction None when it names no single choice) --
    or, for the other answer types (kind; None: a number without choices), the answer as parse_answer reads it
    (a number, "yes"/"no", a normalised text), correct when it is the gold one."""
    text, answer_part = split_teacher_output(output)
    kind = kind or ("choice" if choices is not None else "number")
    if answer_part is None:
        return make_rationale(text, None, answer)
    if kind != "choice":
        said = parse_answer(answer_part, kind)
        return {"text": text, "prediction": said, "correct": said is not None and said == parse_answer(answer, kind)}
    index = parse_choice(answer_part, choices)
    return make_rationale(text, None if index is None else choices[index], answer)


def import_dsbs(folder, split, skips):
    """Distilling Step-by-Step CSQA: cqa_{train,test}.json (questions) + llm/{split}_CoT_k.json (PaLM outputs)."""
    folder = Path(folder)
    qfile = folder / ("cqa_train.json" if split == "train" else "cqa_test.json")
    prefix = "train" if split == "train" else "test"
    outputs = []
    for k in range(100):
        f = folder / "llm" / f"{prefix}_CoT_{k}.json"
        if not f.exists():
            break
        outputs += json.loads(f.read_text())
    records, ids = [], UniqueIds(qfile)
    questions = list(_json_lines(qfile))
    if len(outputs) != len(questions):
        raise CorpusError(f"{folder}/llm: {len(outputs)} teacher outputs for {len(questions)} questions in {qfile}")
    for (n, q), output in zip(questions, outputs):
        where = f"{qfile}:{n}"
        for key in ("id", "question", "choices", "answer"):
            if key not in q:
                raise CorpusError(f"{where}: missing field {key!r}")
        ids.add(q["id"], n)
        if q["answer"] not in q["choices"]:
            skips.add("gold answer not among the choices", where)
            continue
        r = teacher_rationale(output, q["choices"], q["answer"])
        rationales = []
        if not r["text"]:
            skips.add("empty rationale", where)
        else:
            rationales.append(r)
        records.append({"id": q["id"], "question": q["question"], "choices": q["choices"], "answer": q["answer"],
                        "rationales": rationales})
    return records


def import_scotd(release_json, questions_jsonl, skips):
    """SCoTD release: a JSON list of {prompt, response, score, index, rationale}; `index` is the line
    (0-based) of the question in the official CommonsenseQA-style JSONL
    ({"id", "question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}); score >= 0.5 = teacher correct."""
    questions, ids = [], UniqueIds(questions_jsonl)
    for n, q in _json_lines(questions_jsonl):
        where = f"{questions_jsonl}:{n}"
        try:
            ids.add(q["id"], n)
            choices = [c["text"] for c in sorted(q["question"]["choices"], key=lambda c: c["label"])]
            labels = sorted(c["label"] for c in q["question"]["choices"])
            answer = choices[labels.index(q["answerKey"])]
            questions.append({"id": q["id"], "question": q["question"]["stem"], "choices": choices,
                              "answer": answer, "rationales": []})
        except (KeyError, TypeError, ValueError) as e:
            raise CorpusError(f"{where}: not a CommonsenseQA-style question ({type(e).__name__}: {e})") from None
    try:
        release = json.loads("".join(line for _, line in _lines(release_json)))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{release_json}:{e.lineno}: invalid JSON ({e.msg})") from None
    for i, item in enumerate(release):
        where = f"{release_json}[{i}]"
        for key in ("index", "rationale", "score"):
            if key not in item:
                raise CorpusError(f"{where}: missing field {key!r}")
        if not 0 <= item["index"] < len(questions):
            raise CorpusError(f"{where}: index {item['index']} outside {questions_jsonl} ({len(questions)} questions)")
        q = questions[item["index"]]
        r = teacher_rationale(item["rationale"], q["choices"], q["answer"])
        if not r["text"]:
            skips.add("empty rationale", where)
            continue
        r["correct"] = item["score"] >= 0.5  # the release's own judgement of the teacher
        q["rationales"].append(r)
    for n, q in enumerate(questions):
        if not q["rationales"]:
            skips.add("question without rationales", f"{questions_jsonl}:{n + 1}")
    return [q for q in questions if q["rationales"]]


def import_gsm8k(path, split, skips):
    """GSM8K JSONL ({"question", "answer": "step\\nstep\\n#### 72"}) -> numeric records whose one rationale
    is the human solution: calculator annotations (<<48/2=24>>) removed, a Socratic split's "sub-question
    ** " prefixes dropped, lines joined by spaces (a target is one paragraph); the answer is the number
    after "####"; the rationale keeps its `steps` (the lines) for Socratic sub-questions (teacher.py --socratic).
A solution without such a number, or without steps, is a counted skip."""
    records = []
    for n, q in _json_lines(path):
        where = f"{path}:{n}"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("answer"), str):
            raise CorpusError(f"{where}: expected an object with 'question' and 'answer' strings")
        solution, sep, final = q["answer"].rpartition("####")
        answer = parse_number(final) if sep else None
        if answer is None:
            skips.add("no number after '####'", where)
            continue
        steps = [re.sub(r"<<[^>]*>>", "", line.split(" ** ")[-1]).strip() for line in solution.splitlines()]
        steps = [step for step in steps if step]
        if not steps:
            skips.add("empty rationale", where)
            continue
        records.append({"id": f"gsm8k-{split}-{n}", "question": q["question"].strip(), "answer": answer,
                        "rationales": [make_rationale(" ".join(steps), answer, answer) | {"steps": steps}]})
    return records


# -----------------------------------------------------------------------------
# Any dataset, by column mapping: python data.py import SOURCE --question COL --answer COL ...


@dataclass
class Columns:
    """Where a source's rows keep each field: a column name or a dotted path into nested fields ("choices.text").
    choices: a list of choice texts; labels: the choices' labels beside them ("A".."E"), when answers name labels."""
    question: str
    answer: str
    choices: str | None = None
    labels: str | None = None
    id: str | None = None
    rationale: str | None = None


def read_rows(source, split=None):
    """The rows of a JSONL, JSON (a list of objects), CSV or Parquet file, or of a dataset in the local Hugging Face
    cache by id ("org/name": its cached parquet files of `split`, read offline) -> (where each row is, the rows)."""
    path = Path(source)
    if not path.exists() and is_hub_id(source):
        return _cached_dataset(str(source), split or "train")
    if not path.is_file():
        raise CorpusError(f"{source}: no such file (nor a dataset id in the Hugging Face cache)")
    kind = path.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    if kind == "jsonl":
        return [(f"{path}:{n}", row) for n, row in _json_lines(path)]
    if kind == "json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorpusError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(rows, list):
            raise CorpusError(f"{path}: a JSON source is a list of objects, got {json_type(rows)}")
        return [(f"{path}: row {i}", row) for i, row in enumerate(rows, 1)]
    if kind == "csv":
        return _csv_rows(path)
    if kind == "parquet":
        return _parquet_rows(path)
    raise CorpusError(f"{path}: not a source data.py import reads (.jsonl, .json, .csv, .parquet, or a dataset id)")


def _csv_rows(path):
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header:
            raise CorpusError(f"{path}: empty CSV file (no header line)")
        for row in rows:
            if len(row) != len(header):
                raise CorpusError(f"{path}:{rows.line_num}: {len(row)} fields, the header line has {len(header)}")
            out.append((f"{path}:{rows.line_num}", dict(zip(header, row))))
    return out


def _parquet_rows(path, where=None):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 -- pyarrow's errors for a file that is not Parquet vary
        raise CorpusError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    return [(f"{where or path}: row {i}", row) for i, row in enumerate(rows, 1)]


def _cached_dataset(hub_id, split):
    """A dataset's parquet files for `split` in the local Hugging Face cache (datasets--ORG--NAME/snapshots/...)."""
    name, _, repo, _, snapshot = cached_repo(hub_id, "datasets")
    files = sorted(f for f in snapshot.rglob("*.parquet") if re.search(rf"(^|[/_-]){re.escape(split)}([/_.-]|$)",
                                                                           str(f.relative_to(snapshot))))
    if not files:
        raise CorpusError(f"{hub_id}: no cached parquet files of split {split!r} under {repo}; fetch the dataset with "
                          f"`hf download {name} --repo-type dataset`, or pass a file")
    return [row for f in files for row in _parquet_rows(f, f"{hub_id} {split} {f.name}")]


def field_at(row, path):
    """A row's value at a dotted path ("choices.text"); KeyError(path) where there is none."""
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(path)
        value = value[key]
    return value


def import_rows(rows, cols, skips, prefix="row", kind="auto"):
    """Rows of any source -> canonical records, every row accounted for: imported, or a counted skip with its reason
    and first place (an empty question; an answer that is not among the choices, names no label or index, or is
    not of the answer type). kind: the answer type of a task without choices (number, yesno, text; auto: yesno
    when every answer is yes/no/true/false, else number when every one is a number, else text). A column a row
    lacks is an error naming it and the columns the row has."""
    if cols.choices:
        kind = "choice"
    elif kind == "auto":
        answers = [_get(r, cols.answer) for _, r in rows]
        kind = next((k for k in ("yesno", "number") if answers and all(_answer_as(a, k, strict=True) is not None
                                                                        for a in answers)), "text")
    records, ids = [], {}
    for n, (where, row) in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise CorpusError(f"{where}: a row should be an object, got {json_type(row)}")
        try:
            question, answer = field_at(row, cols.question), field_at(row, cols.answer)
            choices = field_at(row, cols.choices) if cols.choices else None
            labels = field_at(row, cols.labels) if cols.labels else None
            rid = str(field_at(row, cols.id)) if cols.id else f"{prefix}-{n}"
        except KeyError as e:
            raise CorpusError(f"{where}: no column {e.args[0]!r}; the row has {', '.join(map(repr, row))}") from None
        try:  # a worked example where the row has one
            rationale = field_at(row, cols.rationale) if cols.rationale else None
        except KeyError:
            rationale = None
        if not isinstance(question, str) or not question.strip():
            skips.add("empty question", where)
            continue
        if choices is not None:
            if not _strings(choices) or not 2 <= len(choices) <= len(LETTERS):
                skips.add(f"choices not a list of 2..{len(LETTERS)} strings", where)
                continue
            answer = _choice_of(answer, choices, labels)
            if answer is None:
                skips.add("answer names no choice (its text, label or index)", where)
                continue
        else:
            answer = _answer_as(answer, kind)
            if answer is None:
                skips.add(f"answer not {ANSWER_NAMES[kind]}", where)
                continue
        if rid in ids:
            raise CorpusError(f"{where}: id {rid!r} repeats {ids[rid]}; every question needs an id of its own (--id)")
        ids[rid] = where
        rec = {"id": rid, "question": question.strip()} | ({"choices": choices} if choices is not None else {})
        rec |= {"answer": answer} | ({"answer_type": kind} if kind in ("yesno", "text") else {}) | {"rationales": []}
        if isinstance(rationale, str) and rationale.strip():
            rec["rationales"] = [make_rationale(rationale.strip(), answer, answer)]
        records.append(rec)
    return records


def _get(row, path):
    """field_at, or None where the row has no such field."""
    try:
        return field_at(row, path)
    except KeyError:
        return None


def _answer_as(answer, kind, strict=False):
    """A source's answer as the corpus keeps it for `kind`: a normalised number, "yes"/"no" (true/false too; strict:
    the word alone), a non-empty text; None when it is not one."""
    if isinstance(answer, bool):
        return ("yes" if answer else "no") if kind == "yesno" else None
    if not isinstance(answer, (str, int, float)):
        return None
    text = str(answer).strip()
    if kind == "number":
        return parse_number(text) if re.fullmatch(r"[-$\d.,\s]+", text) or not strict else None
    if kind == "yesno":
        said = parse_answer(text, "yesno")
        return said if not strict or text.lower().rstrip(".") in ("yes", "no", "true", "false") else None
    return text if normalize_text(text) else None


def _choice_of(answer, choices, labels):
    """An answer given as a choice's text, its label (with --labels), its letter ("B") or its index -> the text."""
    if isinstance(answer, str) and answer in choices:
        return answer
    if labels is not None and answer in labels and len(labels) == len(choices):
        return choices[labels.index(answer)]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().lower() in LETTERS[:len(choices)]:
        return choices[LETTERS.index(answer.strip().lower())]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return choices[answer]
    return None


# -----------------------------------------------------------------------------
# Examples: (query, target) pairs for a target mode and filter


def build_examples(records, mode, filter="correct", rationales_per_question=None, seed=0, skips=None, select="random"):
    """Records -> list of dicts {id, query, target, answer (data.gold)}, and `chain`: the rationale's index in its
    record (modes with a rationale; distill.TopKSidecar finds its top-k by it). The paper trains on every sampled
    rationale (§2); `filter="correct"` keeps only rationales whose teacher answer is gold;
    `rationales_per_question` K keeps K of those, chosen by `select` (select_rationales)."""
    if mode not in MODES + SOCRATIC_ROLES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES + SOCRATIC_ROLES}")
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; expected one of {FILTERS}")
    skips = skips if skips is not None else Skips()
    rng = random.Random(seed)
    examples = []
    for rec in records:
        choices = rec.get("choices")
        query = format_query(rec["question"], choices)
        answer = gold(rec)
        if mode == "label":
            said = answer if choices is not None else rec["answer"]
            examples.append({"id": rec["id"], "query": query, "answer": answer,
                             "target": format_target("label", choices, said)})
            continue
        kept = []
        for r in rec["rationales"]:
            if not r["text"].strip():
                skips.add("empty rationale", rec["id"])
            elif filter == "correct" and not r.get("correct"):
                skips.add("teacher answer wrong (filter=correct)", rec["id"])
            elif choices is not None and r.get("prediction") not in choices:
                skips.add("teacher answer not a single choice", rec["id"])
            elif choices is None and (r.get("prediction") is None
                                      or parse_answer(r["prediction"], kind_of(rec)) != r["prediction"]):
                skips.add(f"teacher answer not {ANSWER_NAMES[kind_of(rec)]}", rec["id"])
            else:
                kept.append(r)
        if not kept:
            skips.add("question left without rationales", rec["id"])
            continue
        if rationales_per_question and len(kept) > rationales_per_question:
            kept = select_rationales(kept, rationales_per_question, select, rng, f"question {rec['id']}")
        if mode in SOCRATIC_ROLES:  # the two-model variant: a problem's chain split into turns
            examples += socratic_examples(rec, query, answer, kept, mode, skips)
            continue
        index = {id(r): c for c, r in enumerate(rec["rationales"])}
        for r in kept:
            # the student learns the teacher's answer with its rationale (with filter=all it may be wrong)
            said = choices.index(r["prediction"]) if choices is not None else rec["answer"] \
                if kind_of(rec) == "text" and r.get("correct") else r["prediction"]  # a text answer as written
            examples.append({"id": rec["id"], "query": query, "answer": answer, "chain": index[id(r)],
                             "target": format_target(mode, choices, said, r["text"])})
    return examples


SELECT = ("random", "likely", "unlikely", "diverse")


def socratic_examples(rec, query, answer, kept, mode, skips):
    """The examples of one Socratic role (decompose or solve) from a question's kept rationales: a turn each
    (query: the question's, answer: data.gold's)."""
    examples = []
    for r in kept:
        if not r.get("steps") or len(r.get("subquestions") or []) != len(r["steps"]):
            skips.add("rationale without a sub-question for each step (Socratic)", rec["id"])
            continue
        examples += [{"id": rec["id"], "query": context, "target": target, "answer": answer} for context, target
                     in socratic_turns(query, r["subquestions"], r["steps"], r["prediction"])[mode]]
    return examples


def select_rationales(rationales, k, how, rng, where=""):
    """K of a question's rationales (SCoTD §5 compares choosing chains by teacher likelihood with choosing them
    for diversity):
    random    a uniform sample (rng);
    likely    the K with the highest mean token log-probability under the teacher (teacher_logprob /
              teacher_tokens: teacher.py records it, --score adds it to a corpus), unlikely the K lowest;
    diverse   the most likely first, then again and again the one farthest from those chosen (the largest
              smallest distance; distance = 1 - Jaccard overlap of the word bigrams, distinct-2's unit).
    Ties go to the rationale that comes first; every choice but random is deterministic."""
    if how == "random":
        return rng.sample(rationales, k)
    if any("teacher_logprob" not in r for r in rationales):
        raise CorpusError(f"{where}: --select {how} needs each rationale's teacher_logprob; score the corpus first "
                          "(python teacher.py --teacher FOLDER --score CORPUS --out SCORED)")
    mean = [r["teacher_logprob"] / max(1, r["teacher_tokens"]) for r in rationales]
    likely_first = sorted(range(len(rationales)), key=lambda i: -mean[i])  # stable: ties keep their order
    if how == "likely":
        chosen = likely_first[:k]
    elif how == "unlikely":
        chosen = sorted(range(len(rationales)), key=lambda i: mean[i])[:k]
    elif how == "diverse":
        grams = [set(zip(r["text"].split(), r["text"].split()[1:])) for r in rationales]
        distance = lambda i, j: 1 - len(grams[i] & grams[j]) / max(1, len(grams[i] | grams[j]))  # noqa: E731
        chosen = likely_first[:1]
        while len(chosen) < k:
            rest = [i for i in range(len(rationales)) if i not in chosen]
            chosen.append(max(rest, key=lambda i: (min(distance(i, j) for j in chosen), -i)))
    else:
        raise ValueError(f"unknown selection {how!r}; expected one of {SELECT}")
    return [rationales[i] for i in sorted(chosen)]


# -----------------------------------------------------------------------------
# Tokenisation (cached) and batching


def tokenize_examples(examples, tokenizer, max_len, skips, cache_dir=None, cache_key="", too_long=None, attach=None):
    """-> list of (ids, n_query) int32 arrays; examples longer than max_len are skipped and counted, as
    `too_long` (default: "longer than --max-len N tokens"). attach(example, ids, n_query): a third element for
    each example kept (train.py --kd: its teacher top-k, distill.TopKSidecar).

    Cached on disk keyed by the examples, the tokenizer and max_len, so a second run starts at once.
    """
    digest = hashlib.sha256()
    digest.update(cache_key.encode())
    digest.update(tokenizer.to_str().encode())
    digest.update(str(max_len).encode())
    for e in examples:
        digest.update((e["query"] + "\0" + e["target"] + "\0").encode())
    path = Path(cache_dir) / f"tokens-{digest.hexdigest()[:16]}.npz" if cache_dir else None
    cached = _read_token_cache(path, len(examples)) if path is not None and path.exists() else None
    if cached is not None:
        ids, offsets, n_query, keep = cached
    else:
        queries = tokenizer.encode_batch([e["query"] for e in examples])
        targets = tokenizer.encode_batch([e["target"] for e in examples], add_special_tokens=False)
        seqs = [q.ids + t.ids for q, t in zip(queries, targets)]
        n_query = np.array([len(q.ids) for q in queries], dtype=np.int32)
        keep = np.array([len(s) <= max_len for s in seqs], dtype=bool)
        kept = [s for s, k in zip(seqs, keep) if k]
        offsets = np.cumsum([0] + [len(s) for s in kept]).astype(np.int64)
        ids = np.array([t for s in kept for t in s], dtype=np.int32)
        if path is not None:
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.savez(f, ids=ids, offsets=offsets, n_query=n_query, keep=keep)
            fileio.write_file(path, write, sync=False)  # a cache: rebuilt if a crash loses it
    for e, k in zip(examples, keep):
        if not k:
            skips.add(too_long or f"longer than --max-len {max_len} tokens", e["id"])
    n_query = n_query[keep]
    out = [(ids[offsets[i]:offsets[i + 1]], int(n_query[i])) for i in range(len(offsets) - 1)]
    if attach is not None:
        out = [(t, n, attach(e, t, n)) for e, (t, n) in zip((e for e, k in zip(examples, keep) if k), out)]
    return out


def _read_token_cache(path, n_examples):
    """(ids, offsets, n_query, keep) from a token cache, or None (with a note) when it is unreadable."""
    try:
        with np.load(path) as z:  # allow_pickle=False: arrays only
            ids, offsets, n_query, keep = (z[k] for k in ("ids", "offsets", "n_query", "keep"))
        if len(n_query) != n_examples or len(keep) != n_examples or offsets[-1] != len(ids) \
                or len(offsets) != keep.sum() + 1:
            raise ValueError("array sizes do not match the examples")
        return ids, offsets, n_query, keep
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        print(f"note      token cache {path} is unreadable ({e}): rebuilding it", flush=True)
        return None


def collate(batch, pad_id):
    """Right-padded (idx, targets, teacher) with targets -100 on the query and on padding: only the rationale and
    answer carry loss. targets[t] is the token that position t should predict (idx shifted by one).
    teacher: None, or where the examples are (ids, n_query, top-k) -- train.py --kd -- the top-k placed as the
    targets are (TopKRows)."""
    T = max(len(ex[0]) for ex in batch) - 1
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), T), -100, dtype=torch.long)
    teacher = TopKRows.empty(batch, idx.shape)
    for b, (ids, n_query, *topk) in enumerate(batch):
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        n = len(ids) - 1
        idx[b, :n] = ids[:-1]
        targets[b, n_query - 1:n] = ids[n_query:]
        if teacher:
            teacher.place(b, n_query - 1, topk[0])
    return idx, targets, teacher


class TopKRows(NamedTuple):
    """The teacher's top-k at each position of a micro-batch's rows: ids (B, T, K) and log-probabilities (B, T, K),
    filled where targets are (train.py --kd; distill.py stores them)."""
    ids: torch.Tensor
    logprobs: torch.Tensor

    @classmethod
    def empty(cls, batch, shape):
        """None unless the examples carry top-k (a third element)."""
        if len(batch[0]) < 3:
            return None
        k = batch[0][2]["ids"].shape[1]
        return cls(torch.zeros(*shape, k, dtype=torch.long), torch.zeros(*shape, k, dtype=torch.float32))

    def place(self, b, pos, topk):
        self.ids[b, pos:pos + len(topk)] = torch.from_numpy(np.asarray(topk["ids"], dtype=np.int64))
        self.logprobs[b, pos:pos + len(topk)] = torch.from_numpy(np.asarray(topk["logprobs"], dtype=np.float32))


def record_dtype(k):
    """One position of a top-k sidecar (distill.py): the target token, the teacher's K likeliest ids and their
    log-probabilities."""
    return np.dtype([("token", "<i4"), ("ids", "<i4", (k,)), ("logprobs", "<f2", (k,))])


class Rows(NamedTuple):
    """A micro-batch on the device, with what the step needs to know about it known on the host."""
    idx: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) the next token, -100 where there is no loss
    docs: torch.Tensor | None  # packed / shared-prefix rows (data.layout), else None: plain causal rows
    branches: torch.Tensor | None
    target_idx: torch.Tensor  # (N,) flat indices of the target positions (the head runs there only)
    n_targets: int  # N, on the host: normalising the loss needs no device->host copy
    tree_kernel: str = "gather"  # how packed and shared-prefix rows attend (--tree-kernel)
    teacher_view: "losses.TopKTargets | losses.Grader | losses.SampledTokens | None" = None  # the teacher's side of
    # the loss at the N targets: its top-k and the mix (--kd), or its grades of the student's tokens (--on-policy)


def to_tensors(batch, run, pad_id, device):
    """A micro-batch of (ids, n_query) -> Rows on the device: right-padded rows (docs None: plain causal
    attention), or data.layout's packed and/or shared-prefix rows (run: pack, shared, row_len). An empty share
    (a last global batch with fewer examples than ranks) becomes one padding token without targets: zero
    loss and zero gradients, but the rank still joins the gradient all-reduce."""
    batch = batch or [(np.array([pad_id, pad_id]), 2) + ((np.zeros(0, record_dtype(1)),) if run.kd else ())]
    if run.pack or run.shared:
        idx, targets, docs, branches, teacher = layout(batch, pad_id, run.row_len, share=run.shared, pack=run.pack)
    else:
        (idx, targets, teacher), docs, branches = collate(batch, pad_id), None, None
    target_idx = (targets.flatten() != -100).nonzero()[:, 0]  # on the host
    move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
    if teacher is not None:  # --kd: the top-k of the target positions only, in the head's order, and the mix
        teacher = losses.TopKTargets(*(move(t.flatten(0, 1)[target_idx]) for t in teacher), run.kd, run.kd_temperature)
    return Rows(move(idx), move(targets), move(docs), move(branches), move(target_idx), len(target_idx),
                run.tree_kernel, teacher)


def cut_batches(order, lengths, batch_size, tokens=None):
    """Examples in order, cut into batches of batch_size; or with `tokens`, into batches of as many as fit that
    budget of padded tokens (examples x the longest of them; at least one example a batch)."""
    if not tokens:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches, batch, longest = [], [], 0
    for i in order:
        if batch and (len(batch) + 1) * max(longest, lengths[i]) > tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    return batches + ([batch] if batch else [])


def length_bucketed_batches(lengths, batch_size, rng, tokens=None):
    """Shuffle, then sort within windows of 50 batches by length, so a batch wastes little on padding;
    the batches are shuffled again so training does not see lengths in order. tokens: cut_batches'."""
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: lengths[i])
        batches += cut_batches(chunk, lengths, batch_size, tokens)
    rng.shuffle(batches)
    return batches


def query_keys(tokens):
    """One hashable key per tokenised example (ids, n_query): its query's tokens, the same for all of a
    question's rationales."""
    return [ids[:n].tobytes() for ids, n, *_ in tokens]


def question_batches(queries, lengths, batch_size, rng, tokens=None):
    """Batches for shared-prefix training: a question's examples stay together, so that a micro-batch
    holds few questions with several rationales each (what `layout(share=True)` saves on). Questions are
    shuffled, sorted by their tokens within windows of 50 batches (little padding), laid end to end and
    cut into batches of batch_size examples (or of `tokens`: cut_batches; a question may straddle two); the
    batches are shuffled. queries: one hashable key per example (query_keys)."""
    groups = {}
    for i, q in enumerate(queries):
        groups.setdefault(q, []).append(i)
    groups = list(groups.values())
    order = rng.permutation(len(groups))
    window = max(1, int(len(order) * batch_size * 50 / max(1, len(queries))))  # ~50 batches of questions
    flat = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda g: sum(lengths[i] for i in groups[g]))
        flat += [i for g in chunk for i in groups[g]]
    batches = cut_batches(flat, lengths, batch_size, tokens)
    rng.shuffle(batches)
    return batches


def layout(batch, pad_id, row_len, share=False, pack=False):
    """A micro-batch of (ids, n_query) -> rows (idx, targets, docs, branches, teacher), each (B, T), for
    Transformer.forward(docs=..., branches=...) and attention.TreeAttention.

    An example is a prefix (its query less the last token: no loss) and a branch (the query's last token,
    then the target: it predicts the target). share=True: examples with the same prefix (a question's K
    rationales) form one group -- the prefix once, then its K branches, each attending to the prefix and
    to itself only, with positions that restart after the prefix (branches = 1, 2, ...; 0 = the prefix).
    So the loss and the gradients are those of the K examples, for q + K*r tokens instead of K*(q + r).
    A group over row_len tokens spills into another (prefix repeated). share=False: a group per example.
    pack=True: groups end to end in rows of up to row_len tokens (docs = group id), else one group a row.
    Padding: docs -1, targets -100. Examples (ids, n_query, top-k) -- train.py --kd -- also give the top-k placed
    as the targets are (TopKRows; else None)."""
    groups, where = [], {}  # [prefix, [(branch, top-k), ...], tokens]; where: prefix -> index of its open group
    for ids, n_query, *topk in batch:
        ids = np.asarray(ids, dtype=np.int64)
        prefix, branch = ids[:n_query - 1], ids[n_query - 1:]
        g = where.get(prefix.tobytes()) if share else None
        if g is None or groups[g][2] + len(branch) - 1 > row_len:
            groups.append([prefix, [], len(prefix)])
            g = len(groups) - 1
            where[prefix.tobytes()] = g
        groups[g][1].append((branch, topk[0] if topk else None))
        groups[g][2] += len(branch) - 1
    rows, row, used = [], [], 0
    for group in groups:
        if row and (not pack or used + group[2] > row_len):
            rows.append(row)
            row, used = [], 0
        row.append(group)
        used += group[2]
    rows.append(row)
    T = max(sum(group[2] for group in r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    docs = torch.full((len(rows), T), -1, dtype=torch.long)
    branches = torch.zeros((len(rows), T), dtype=torch.long)
    teacher = TopKRows.empty(batch, idx.shape)
    for b, r in enumerate(rows):
        pos = 0
        for d, (prefix, group_branches, n) in enumerate(r):
            docs[b, pos:pos + n] = d
            idx[b, pos:pos + len(prefix)] = torch.from_numpy(prefix)
            pos += len(prefix)
            for k, (branch, topk) in enumerate(group_branches, 1):
                m = len(branch) - 1
                idx[b, pos:pos + m] = torch.from_numpy(branch[:-1])
                targets[b, pos:pos + m] = torch.from_numpy(branch[1:])
                branches[b, pos:pos + m] = k
                if teacher:
                    teacher.place(b, pos, topk)
                pos += m
    return idx, targets, docs, branches, teacher


# -----------------------------------------------------------------------------
# Statistics


def distinct_n(texts, n):
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / max(1, len(grams))


def stats(path, tokenizer=None):
    records = read_corpus(path)
    skips = Skips()
    build_examples(records, "cot", "correct", skips=skips)  # what training would leave out, and why
    rationales = [r for rec in records for r in rec["rationales"]]
    per_q = np.array([len(rec["rationales"]) for rec in records])
    lines = [f"corpus            {path}",
             f"questions         {len(records):,}",
             f"rationales        {len(rationales):,} ({per_q.mean():.2f} per question, min {per_q.min()}, "
             f"max {per_q.max()})",
             f"teacher accuracy  {np.mean([r.get('correct', False) for r in rationales]):.1%} of rationales "
             f"({np.mean([r.get('prediction') is None for r in rationales]):.1%} name no single choice)",
             f"distinct-1 / -2   {distinct_n([r['text'] for r in rationales], 1):.3f} / "
             f"{distinct_n([r['text'] for r in rationales], 2):.3f}"]
    if per_q.max() > 1:
        lines += many_rationale_stats([rec for rec in records if rec["rationales"]])
    lines.append(f"for cot training  {skips.summary()}")
    scored = [r for r in rationales if "teacher_logprob" in r]
    if scored:
        per_token = [r["teacher_logprob"] / max(1, r["teacher_tokens"]) for r in scored]
        median = np.median([r["teacher_tokens"] for r in scored])
        lines.append(f"teacher logprob   {np.mean(per_token):.3f} a token on average ({len(scored):,} of "
                     f"{len(rationales):,} rationales scored; median chain {median:.0f} tokens)")
    lines += cost_lines(run_totals(path))
    if tokenizer is not None:
        q = [len(e.ids) for e in tokenizer.encode_batch([format_query(r["question"], r.get("choices"))
                                                         for r in records])]
        t = [len(e.ids) for e in tokenizer.encode_batch([r["text"] for r in rationales])]
        for name, xs in (("query tokens", q), ("rationale tokens", t)):
            p = np.percentile(xs, [50, 90, 99, 100]).astype(int)
            lines.append(f"{name:17s} p50 {p[0]}  p90 {p[1]}  p99 {p[2]}  max {p[3]}")
    return "\n".join(lines)


def cost_lines(runs):
    """What sampling the corpus cost, summed over teacher.py's invocations (runs.jsonl)."""
    if not runs:
        return []
    total = {k: sum(r.get(k, 0) for r in runs) for k in ("seconds", "questions", "generated_tokens", "requests",
                                                         "retries", "malformed", "prompt_tokens", "completion_tokens")}
    rate = total["generated_tokens"] / max(total["seconds"], 1e-9)
    lines = [f"teacher runs      {len(runs)}: {total['questions']:,} questions in {total['seconds'] / 60:,.1f} min, "
             f"{total['generated_tokens']:,} tokens generated ({rate:,.1f} tokens/s)"]
    if any("requests" in r for r in runs):
        lines.append(f"api requests      {total['requests']:,} ({total['retries']:,} retries, {total['malformed']:,} "
                     f"malformed responses); {total['prompt_tokens']:,} prompt + {total['completion_tokens']:,} "
                     "completion tokens")
    return lines


def many_rationale_stats(records):
    """SCoTD's corpus (N chains per question), per question: does the teacher's majority vote get it right,
    does any chain, how many chains are distinct, how diverse their words, how many agree with the vote."""
    votes = [majority_vote([r.get("prediction") for r in rec["rationales"]]) for rec in records]
    agree = [np.mean([r.get("prediction") == v for r in rec["rationales"]]) if v is not None else 0.0
             for rec, v in zip(records, votes)]
    texts = [[r["text"] for r in rec["rationales"]] for rec in records]
    return [f"majority vote     {np.mean([v == rec['answer'] for rec, v in zip(records, votes)]):.1%} of questions "
            f"(any chain correct: "
            f"{np.mean([any(r.get('correct') for r in rec['rationales']) for rec in records]):.1%})",
            f"unique chains     {np.mean([len(set(t)) for t in texts]):.2f} per question",
            f"within question   distinct-1 / -2 {np.mean([distinct_n(t, 1) for t in texts]):.3f} / "
            f"{np.mean([distinct_n(t, 2) for t in texts]):.3f}",
            f"answer agreement  {np.mean(agree):.1%} of a question's chains name its majority answer "
            f"(all agree on {np.mean([a == 1.0 for a in agree]):.1%} of questions)"]


def parser():
    """data.py's commands: the importers and stats."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import-dsbs", help="Distilling Step-by-Step CSQA folder -> canonical train/validation")
    p.add_argument("folder")
    p.add_argument("out_dir", nargs="?", default=str(DATA_DIR))
    p = sub.add_parser("import-scotd", help="SCoTD release JSON + question JSONL -> canonical")
    p.add_argument("release_json")
    p.add_argument("questions_jsonl")
    p.add_argument("out")
    p = sub.add_parser("import-gsm8k", help="GSM8K folder (train.jsonl, test.jsonl) -> canonical numeric train/test")
    p.add_argument("folder")
    p.add_argument("out_dir", nargs="?", default=str(DATA_DIR))
    p = sub.add_parser("import", help="any dataset by column mapping -> canonical (JSONL, JSON, CSV, Parquet, or a "
                       "dataset id in the local Hugging Face cache)")
    p.add_argument("source", help="a file, or ORG/NAME of a dataset in the Hugging Face cache (read offline)")
    p.add_argument("--question", required=True,
                   help="the question's column (required; dotted paths reach nested fields)")
    p.add_argument("--answer", required=True, help="the answer's column: a choice's text, label or index, or a number "
                   "(required)")
    p.add_argument("--choices", default=None,
                   help="the choices' column, a list of texts (default: none, a numeric task)")
    p.add_argument("--labels", default=None, help="the choices' labels, when answers name them (default: none)")
    p.add_argument("--id", default=None, help="the id column (default: ROW-N, N the row's number)")
    p.add_argument("--rationale", default=None, help="a rationale column: worked examples (default: none)")
    p.add_argument("--split", default=None, help="a cached dataset's split (default: train)")
    p.add_argument("--answer-type", default="auto", choices=("auto", "number", "yesno", "text"),
                   help="without --choices (default auto: yesno when every answer is yes/no/true/false, else number "
                   "when every one is a number, else short free text)")
    p.add_argument("--out", required=True, help="the canonical corpus to write (required)")
    p = sub.add_parser("stats", help="corpus statistics")
    p.add_argument("corpus", nargs="?", default=str(DEFAULT_TRAIN))
    p.add_argument("--tokenizer", default=None, help="model folder for token lengths (default: the default student)")
    return parser


def main():
    args = parser().parse_args()
    if args.cmd == "stats":
        return print(stats(args.corpus, load_tokenizer(args.tokenizer or default_student())))
    written = []  # a corpus is written whole or not at all (write_corpus): a stop keeps these, never half of one

    def write(records, path, skips, what):
        write_corpus(records, path)
        written.append(str(path))
        print(f"{len(records):,} {what} -> {path}; {skips.summary()}")

    with cli.stopping_cleanly(lambda: f"written whole: {', '.join(written) or 'nothing'}"):
        if args.cmd == "import-dsbs":
            for split, name in (("train", DEFAULT_TRAIN.name), ("validation", DEFAULT_DEV.name)):
                skips = Skips()
                write(import_dsbs(args.folder, split, skips), Path(args.out_dir) / name, skips, f"{split} questions")
        elif args.cmd == "import-gsm8k":
            for split, name in (("train", GSM8K_TRAIN.name), ("test", GSM8K_TEST.name)):
                skips = Skips()
                write(import_gsm8k(Path(args.folder) / f"{split}.jsonl", split, skips), Path(args.out_dir) / name,
                      skips, f"{split} problems")
        elif args.cmd == "import":
            skips, rows = Skips(), read_rows(args.source, args.split)
            cols = Columns(args.question, args.answer, args.choices, args.labels, args.id, args.rationale)
            records = import_rows(rows, cols, skips, Path(str(args.source)).name.split(".")[0].replace("/", "-"),
                                  args.answer_type)
            if not records:
                raise CorpusError(f"{args.source}: no row imported ({len(rows):,} rows; {skips.summary()})")
            write(records, Path(args.out), skips, f"of {len(rows):,} rows imported as questions")
        else:
            skips = Skips()
            write(import_scotd(args.release_json, args.questions_jsonl, skips), Path(args.out), skips, "questions")


if __name__ == "__main__":
    cli.run(main)
