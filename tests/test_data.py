"""data.py: the corpus format, importers on malformed input, labels, batching, packing."""

import gzip
import json
import random

import pytest
import torch

import data
from data import CorpusError, Skips
from helpers import tiny_student
from checkpoint import from_pretrained, load_tokenizer

REC = {"id": "q1", "question": "Where do beavers get supplies?", "choices": ["zoo", "wooded area", "lake"],
       "answer": "wooded area", "rationales": [{"text": "Beavers use wood.", "prediction": "wooded area", "correct": True},
                                               {"text": "Zoos feed beavers.", "prediction": "zoo", "correct": False}]}


def write_lines(path, lines):
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def test_bundled_corpus_sizes():
    assert len(data.read_corpus(data.DEFAULT_TRAIN)) == 9741
    dev = data.read_corpus(data.DEFAULT_DEV)
    assert len(dev) == 1221 and sum(r["rationales"][0]["correct"] for r in dev) == 962


@pytest.mark.parametrize("line,message", [
    ('{"id": "q2", "question": ', r"bad\.jsonl:2: invalid JSON"),
    (json.dumps({k: v for k, v in REC.items() if k != "choices"}), r"bad\.jsonl:2: a question without 'choices' needs a number as its answer"),
    (json.dumps(REC | {"answer": "mars"}), r"bad\.jsonl:2: answer 'mars' is not among the choices"),
    (json.dumps(REC | {"rationales": [{"prediction": "zoo"}]}), r"bad\.jsonl:2: each rationale needs a 'text'"),
])
def test_canonical_reader_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(REC), line])
    with pytest.raises(CorpusError, match=message):
        data.read_corpus(path)


def test_a_corpus_still_being_written_reads_to_its_last_complete_line(tmp_path):
    """read_finished: a cut last line (a kill mid-write) is left out, a missing file is empty; invalid JSON or
    an invalid record on a complete line is an error naming file:line."""
    path = tmp_path / "c.jsonl"
    assert data.read_finished(path) == []
    path.write_text(json.dumps(REC) + "\n" + json.dumps(REC | {"id": "q2"})[:30])
    assert data.read_finished(path) == [REC]
    path.write_text(json.dumps(REC) + "\n{oops\n" + json.dumps(REC) + "\n")
    with pytest.raises(CorpusError, match=f"{path}:2: invalid JSON"):
        data.read_finished(path)
    path.write_text(json.dumps(REC) + "\n" + json.dumps({"id": "q2"}) + "\n")
    with pytest.raises(CorpusError, match=f"{path}:2: missing field 'question'"):
        data.read_finished(path)


def test_canonical_round_trip_gzip(tmp_path):
    data.write_corpus([REC, REC | {"id": "q2"}], tmp_path / "c.jsonl.gz")
    assert data.read_corpus(tmp_path / "c.jsonl.gz") == [REC, REC | {"id": "q2"}]
    with gzip.open(tmp_path / "c.jsonl.gz", "rt") as f:
        assert len(f.readlines()) == 2


def make_dsbs(folder, questions, outputs):
    (folder / "llm").mkdir(parents=True)
    write_lines(folder / "cqa_train.json", questions)
    (folder / "llm" / "train_CoT_0.json").write_text(json.dumps(outputs))
    return folder


def test_dsbs_importer_parses_palm_outputs_and_counts_skips(tmp_path):
    q = {"id": "a", "question": "Q?", "choices": ["lake", "pond", "sea"], "answer": "pond"}
    folder = make_dsbs(tmp_path, [json.dumps(q), json.dumps(q | {"id": "b"}), json.dumps(q | {"id": "c", "answer": "mud"}),
                                  json.dumps(q | {"id": "d"}), json.dumps(q | {"id": "e"})],
                       ["Ponds are small. So the answer is (b) pond.\n\nQ: hallucinated next question",
                        "It is wet. So the answer is either (a) lake or (b) pond.",
                        "Whatever. So the answer is (a) lake.",
                        "So the answer is (b) pond.",
                        "Seas are salty. So the answer is (c) sea."])
    skips = Skips()
    records = data.import_dsbs(folder, "train", skips)
    assert [r["id"] for r in records] == ["a", "b", "d", "e"]
    assert records[0]["rationales"] == [{"text": "Ponds are small.", "prediction": "pond", "correct": True}]
    assert records[1]["rationales"][0]["prediction"] is None  # "either ... or ...": no single choice
    assert records[2]["rationales"] == []
    assert records[3]["rationales"][0] == {"text": "Seas are salty.", "prediction": "sea", "correct": False}
    assert skips.counts == {"gold answer not among the choices": 1, "empty rationale": 1}
    assert "cqa_train.json:3" in skips.summary()


@pytest.mark.parametrize("output, text, prediction", [
    ("Bridges cross rivers. So the answer is (d) bridge.", "Bridges cross rivers.", "bridge"),
    ("Bridges cross rivers. Therefore, the answer is (d) bridge.", "Bridges cross rivers.", "bridge"),
    ("Bridges cross rivers, so the correct answer is: (d) bridge", "Bridges cross rivers", "bridge"),
    ("Bridges span it. The answer is (d) bridge. Rivers are long.", "Bridges span it.", "bridge"),  # chatter after
    ("The answer is not (a) lake. Water runs under bridges. So the answer is (d).", "The answer is not (a) lake. "
     "Water runs under bridges.", "bridge"),  # the last "answer is" commits, as scotd.extract_answer reads
    ("It is also the answer is (b) river", "It is also", "river"),  # "so" inside "also" is not a lead-in
    ("Rivers flow into the sea.", "Rivers flow into the sea.", None),  # no answer sentence
    ("So the answer is (d) bridge.\n\nQ: next", "", "bridge"),
])
def test_teacher_completion_parser(output, text, prediction):
    r = data.teacher_rationale(output, ["lake", "river", "sea", "bridge"], "bridge")
    assert r == {"text": text, "prediction": prediction, "correct": prediction == "bridge"}


def test_dsbs_importer_names_bad_line(tmp_path):
    folder = make_dsbs(tmp_path, ['{"id": "a"', "{}"], ["x", "y"])
    with pytest.raises(CorpusError, match=r"cqa_train\.json:1: invalid JSON"):
        data.import_dsbs(folder, "train", Skips())


def test_scotd_release_importer(tmp_path):
    qs = write_lines(tmp_path / "train_rand_split.jsonl", [json.dumps(
        {"id": f"q{i}", "answerKey": "B", "question": {"stem": f"Question {i}?", "choices": [
            {"label": "A", "text": "lake"}, {"label": "B", "text": "pond"}, {"label": "C", "text": "sea"}]}})
        for i in range(3)])
    release = [{"prompt": "...", "response": "...", "index": 0, "score": 1.0, "rationale": "Small water. So the answer is (b) pond."},
               {"prompt": "...", "response": "...", "index": 0, "score": 0.0, "rationale": "Big. So the answer is (c) sea.\n\nQ: next"},
               {"prompt": "...", "response": "...", "index": 2, "score": 1.0, "rationale": "So the answer is (b) pond."}]
    (tmp_path / "csqa_30x.json").write_text(json.dumps(release))
    skips = Skips()
    records = data.import_scotd(tmp_path / "csqa_30x.json", qs, skips)
    assert [r["id"] for r in records] == ["q0"]
    assert records[0]["answer"] == "pond"
    assert [(r["text"], r["prediction"], r["correct"]) for r in records[0]["rationales"]] == [
        ("Small water.", "pond", True), ("Big.", "sea", False)]
    assert skips.counts == {"empty rationale": 1, "question without rationales": 2}
    (tmp_path / "csqa_30x.json").write_text(json.dumps([{"index": 7, "score": 1, "rationale": "x"}]))
    with pytest.raises(CorpusError, match=r"csqa_30x\.json\[0\]: index 7 outside"):
        data.import_scotd(tmp_path / "csqa_30x.json", qs, Skips())


def test_filters_modes_and_subsampling():
    recs = [REC]
    cot = data.build_examples(recs, "cot", "correct")
    assert [e["target"] for e in cot] == [" Beavers use wood. So the answer is (b) wooded area.\n\n"]
    every = data.build_examples(recs, "post", "all")
    assert [e["target"] for e in every] == [" The answer is (b) wooded area. Beavers use wood.\n\n",
                                            " The answer is (a) zoo. Zoos feed beavers.\n\n"]
    assert len(data.build_examples(recs, "label", "correct")) == 1
    assert len(data.build_examples(recs * 3, "cot", "all", rationales_per_question=1)) == 3
    skips = Skips()
    assert data.build_examples([REC | {"rationales": REC["rationales"][1:]}], "cot", "correct", skips=skips) == []
    assert skips.counts["question left without rationales"] == 1


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def test_labels_are_minus_100_exactly_on_query_tokens(student):
    tok = load_tokenizer(student)
    examples = data.build_examples([REC, REC | {"question": "A much longer question about where beavers live?"}], "cot")
    skips = Skips()
    tokens = data.tokenize_examples(examples, tok, 256, skips)
    idx, targets, _ = data.collate(tokens, pad_id=0)
    for b, (e, (ids, n_query)) in enumerate(zip(examples, tokens)):
        assert n_query == len(tok.encode(e["query"]).ids)
        n = len(ids)
        assert (targets[b, :n_query - 1] == -100).all()  # positions that would predict query tokens
        assert targets[b, n_query - 1:n - 1].tolist() == list(ids[n_query:])  # exactly the target tokens
        assert (targets[b, n - 1:] == -100).all()  # padding
        assert tok.decode(targets[b, n_query - 1:n - 1].tolist()) == e["target"]
        assert idx[b, :n - 1].tolist() == list(ids[:-1])


def test_too_long_examples_are_skipped_and_counted(student, tmp_path):
    tok = load_tokenizer(student)
    examples = data.build_examples([REC, REC | {"id": "long", "question": "why " * 300}], "cot")
    skips = Skips()
    tokens = data.tokenize_examples(examples, tok, 128, skips, cache_dir=tmp_path)
    assert len(tokens) == 1 and skips.counts == {"longer than --max-len 128 tokens": 1}
    again = Skips()  # from the on-disk cache: same tokens, same skips
    cached = data.tokenize_examples(examples, tok, 128, again, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
    assert [list(t) for t, _ in cached] == [list(t) for t, _ in tokens] and again.counts == skips.counts


def test_packed_loss_equals_unpacked_loss(student):
    model = from_pretrained(student)
    tok = load_tokenizer(student)
    records = data.read_corpus(data.DEFAULT_DEV)[:6]
    tokens = data.tokenize_examples(data.build_examples(records, "cot", "all"), tok, 256, Skips())
    idx, targets, _ = data.collate(tokens, pad_id=0)
    with torch.no_grad():
        _, unpacked = model(idx, targets)
        pidx, ptargets, docs, _, _ = data.layout(tokens, pad_id=0, row_len=400, pack=True)
        assert pidx.shape[0] < len(tokens)  # really packed several examples per row
        _, packed = model(pidx, ptargets, docs=docs)
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=0)


def test_length_buckets_cover_every_example_once():
    import numpy as np

    lengths = list(np.random.default_rng(0).integers(10, 200, 1000))
    batches = data.length_bucketed_batches(lengths, 16, np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # little compute wasted on padding


@pytest.mark.parametrize("grouped", [False, True])
def test_token_budget_batches_fit_the_budget_and_cover_every_example_once(grouped):
    """--tokens-per-step: batches of as many examples as fit 2,048 padded tokens (examples x the longest; a
    longer example alone), every example once, the same batches for the same seed; grouped: shared-prefix
    question batches."""
    import numpy as np

    lengths = list(np.random.default_rng(0).integers(10, 200, 1000)) + [3000]
    queries = [i // 3 for i in range(len(lengths))]

    def batches(seed):
        rng = np.random.default_rng(seed)
        if grouped:
            return data.question_batches(queries, lengths, 16, rng, tokens=2048)
        return data.length_bucketed_batches(lengths, 16, rng, tokens=2048)
    got = batches(1)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 or len(b) == 1 for b in got)
    assert max(map(len, got)) > 16 and got == batches(1)  # short examples: more than --batch-size a batch
    assert data.cut_batches(list(range(10)), [5] * 10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_stats_reports_the_corpus(student):
    text = data.stats(data.DEFAULT_DEV, load_tokenizer(student))
    assert "questions         1,221" in text
    assert "teacher accuracy  78.8% of rationales" in text  # 962 of 1,221 PaLM answers are gold
    assert "rationale tokens  p50" in text and "distinct-1 / -2" in text


def test_stats_of_a_many_rationale_corpus(tmp_path):
    def chain(text, prediction):
        return {"text": text, "prediction": prediction, "correct": prediction == "pond"}
    q = {"question": "Q?", "choices": ["lake", "pond", "sea"], "answer": "pond"}
    records = [q | {"id": "a", "rationales": [chain("small water", "pond"), chain("small water", "pond"), chain("big", "lake")]},
               q | {"id": "b", "rationales": [chain("salt water", "sea"), chain("wet", None), chain("a b a b", "pond")]},
               q | {"id": "c", "rationales": []}]
    path = tmp_path / "many.jsonl"
    data.write_corpus(records, path)
    text = data.stats(path)
    assert "rationales        6 (2.00 per question, min 0, max 3)" in text
    assert "teacher accuracy  50.0% of rationales (16.7% name no single choice)" in text
    # votes: a -> pond (right), b -> sea (first of the tied sea/pond: wrong); c has no chains and is left out
    assert "majority vote     50.0% of questions (any chain correct: 100.0%)" in text
    assert "unique chains     2.50 per question" in text  # a: 2 distinct texts, b: 3
    # distinct-1 within a: {small, water, big} / 5 words = 0.6; b: {salt, water, wet, a, b} / 7 ~ 0.714
    assert f"distinct-1 / -2 {(0.6 + 5 / 7) / 2:.3f}" in text
    assert "answer agreement  50.0% of a question's chains name its majority answer (all agree on 0.0% of questions)" in text


# -----------------------------------------------------------------------------
# Any JSON value, at any level: a line that names itself, never a traceback

JSON_VALUES = [None, True, False, 0, 7, -2.5, "", "zoo", "72", [], ["zoo"], [1, None], {}, {"text": "x"}]
NUMERIC = {"id": "g1", "question": "Natalia sold 48 clips. How many?", "answer": "72",
           "rationales": [{"text": "How many? ** 48 + 24 = 72.", "prediction": "72", "correct": True, "steps": ["48 + 24 = 72."],
                           "subquestions": ["How many?"], "teacher_logprob": -3.5, "teacher_tokens": 12}]}


def field_paths(value, path=()):
    """Every place in a record a mutation can hit: each key of each object, each item of each list."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from field_paths(child, path + (key,))


def mutated(rec, path, value):
    """rec with the value at `path` replaced by `value` (or deleted, value = DELETE)."""
    if not path:
        return value
    rec = json.loads(json.dumps(rec))
    parent = rec
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return rec


DELETE = object()


def test_every_mutated_line_is_accepted_or_named_by_file_and_line(tmp_path):
    """Each field of a multiple-choice and of a numeric Socratic record -- the record itself, its fields, the
    choices, each rationale, each rationale field -- replaced by each JSON type (and null) or deleted: the
    corpus is read, turned into examples in every mode and summarised (data.py stats), or refused with one
    CorpusError naming the file and the mutated line (2 of 3). No other exception, ever."""
    rec = REC | {"rationales": [REC["rationales"][0] | {"teacher_logprob": -4.25, "teacher_tokens": 9}, REC["rationales"][1]]}
    cases, refused = 0, 0
    for base in (rec, NUMERIC):
        for path in field_paths(base):
            for value in JSON_VALUES + ([DELETE] if path else []):
                line = json.dumps(mutated(base, path, value))
                corpus = write_lines(tmp_path / "m.jsonl", [json.dumps(base | {"id": "first"}), line,
                                                            json.dumps(base | {"id": "third"})])
                cases += 1
                try:
                    records = data.read_corpus(corpus)
                    for mode in data.MODES + data.SOCRATIC_ROLES:
                        for filter in data.FILTERS:
                            data.build_examples(records, mode, filter)
                    data.stats(corpus)
                except CorpusError as e:
                    refused += 1
                    assert str(e).startswith(f"{corpus}:2: ") and "\n" not in str(e), (path, value, str(e))
    assert cases > 300 and 0 < refused < cases  # both outcomes happen


def scored(text, logprob, tokens, correct=True):
    return {"text": text, "prediction": "wooded area" if correct else "zoo", "correct": correct,
            "teacher_logprob": logprob, "teacher_tokens": tokens}


# five rationales: mean token log-probabilities -0.5, -0.25, -2.0, -0.25, -1.0 (a tie between 2nd and 4th)
CHAINS = [scored("zoos feed the animals there", -2.0, 4), scored("zoos feed the animals here", -1.0, 4),
          scored("a lake is wet and deep", -8.0, 4, correct=False), scored("zoos feed the animals now", -1.5, 6),
          scored("beavers build dams in rivers", -5.0, 5)]


@pytest.mark.parametrize("how,k,want", [
    ("likely", 2, [1, 3]),          # -0.25 twice (the tie: both)
    ("likely", 1, [1]),             # a tie goes to the one that comes first
    ("unlikely", 2, [2, 4]),        # -2.0, -1.0
    ("diverse", 3, [1, 2, 4]),      # the likeliest (1); then the farthest from it (2 and 4 share no bigram with
                                    # it or each other: the first, 2); then 4, not 0 or 3 (they share bigrams with 1)
])
def test_select_rationales_by_likelihood_and_diversity(how, k, want):
    picked = data.select_rationales(CHAINS, k, how, random.Random(0))
    assert picked == [CHAINS[i] for i in want]
    assert data.select_rationales(CHAINS, k, how, random.Random(1)) == picked  # deterministic


def test_select_is_applied_among_the_chains_the_filter_keeps_and_needs_scores():
    rec = REC | {"rationales": CHAINS}  # the unlikeliest, 2, is the teacher's one wrong answer
    for filter, want in (("correct", [0, 4]), ("all", [2, 4])):
        examples = data.build_examples([rec], "cot", filter, rationales_per_question=2, select="unlikely")
        assert [e["target"] for e in examples] == [f" {CHAINS[i]['text']} So the answer is "
                                                   f"{'(b) wooded area' if i != 2 else '(a) zoo'}.\n\n" for i in want]
    assert len(data.build_examples([rec], "cot", "all", 2, select="random")) == 2
    with pytest.raises(CorpusError, match=r"question q1: --select likely needs each rationale's teacher_logprob"):
        data.build_examples([REC], "cot", "all", rationales_per_question=1, select="likely")
