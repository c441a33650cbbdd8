"""The method, as small pure functions: prompt and target templates, answer extraction, majority vote.

SCoTD (Li et al. 2023): a teacher writes chain-of-thought rationales; the student is trained on
    query  = "Q: {question}\\nAnswer Choices:\\n(a) ...\\n(e) ...\\nA:"          (the Wei et al. CoT format, §2)
    target = " {rationale} So the answer is ({x}) {choice}.\\n\\n"          (mode "cot")
and at test time samples N chains and takes a majority vote over their answers (self-consistency, §3).
Two variants from related work are targets too:
    mode "post":  " The answer is ({x}) {choice}. {rationale}\\n\\n"  -- label first, rationale after
                  (Wadhwa et al. 2024): the answer can be read without generating the rationale.
    mode "post-shuffled": "post" with the rationale's words in a fixed random order -- Wadhwa et al.'s
                  control: does the text after the label help by its meaning or by its tokens alone?
    mode "label": " The answer is ({x}) {choice}.\\n\\n"               -- no rationale (the baseline).
Every target ends with a blank line, the stop string the sampler watches for.

Socratic CoT (Shridhar et al. 2022), on numeric problems: the chain is sub-questions, each followed by the
step that answers it, a line each -- " How many eggs does she sell? ** 16 - 3 - 4 = 9 eggs.\nHow much ...
** ... So the answer is 18.\n\n" (GSM8K's socratic format). One "unified" model writes it as a cot target;
the two-model variant splits it into turns (socratic_turns): a *decomposer* writes the next sub-question
from the problem and the lines so far, a *solver* writes the step that answers it, and the last step
carries the answer sentence, which ends the chain.

Four answer types (`kind_of`, `parse_answer`): multiple choice (CSQA: the answer is one of the choices, read as its
index); numeric (GSM8K: no choices; the query is "Q: {question}\nA:", the answer a number, read as its normalised
text, "1,000.50" -> "1000.5"); yes/no (StrategyQA: " ... So the answer is yes.\n\n", read as "yes" or "no", true
and false too); short free text (" ... So the answer is the Eiffel Tower.\n\n", compared after SQuAD's
normalisation: "eiffel tower"). The same targets serve all: " ... So the answer is 72.\n\n".
"""

import hashlib
import random
import re
from collections import Counter
from math import comb
from decimal import Decimal, InvalidOperation

ANSWER_END = r"answer is [^\n]*?[.!?](?=\s)"  # the end of an answer sentence ("So the answer is (d) bridge." + space)
MODES = ("cot", "post", "post-shuffled", "label")
SOCRATIC_ROLES = ("decompose", "solve")  # the two models of Socratic CoT (train.py --mode; data.build_examples)
SUB = " **"  # ends a sub-question: its answer follows on the same line
LABEL_FIRST = ("post", "post-shuffled", "label")  # the answer leads the continuation
LETTERS = "abcdefghij"
STOP = "\n\n"


def format_query(question, choices=None):
    """The prompt: the question, then its choices (none for a numeric question), then "A:"."""
    lines = [f"Q: {question}"]
    if choices is not None:
        lines += ["Answer Choices:"] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nA:"


def format_answer(choices, index):
    return f"({LETTERS[index]}) {choices[index]}"


def format_target(mode, choices, answer, rationale=None):
    """The text the student learns to write after the query (rationale and/or answer, then STOP).
    answer: the choice's index, or for a numeric question (choices None) the number's text."""
    answer = format_answer(choices, answer) if choices is not None else answer
    if mode == "cot":
        return f" {rationale.strip()} So the answer is {answer}.{STOP}"
    if mode == "post":
        return f" The answer is {answer}. {rationale.strip()}{STOP}"
    if mode == "post-shuffled":
        return f" The answer is {answer}. {shuffle_words(rationale)}{STOP}"
    if mode == "label":
        return f" The answer is {answer}.{STOP}"
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def socratic_line(subquestion, step):
    """One line of a Socratic chain: the sub-question, then the step that answers it."""
    return f"{subquestion}{SUB} {step}"


def socratic_ask(lines, subquestion):
    """The next sub-question as it follows the lines so far (the first follows "A:" after a space)."""
    return ("" if lines else " ") + subquestion + SUB


def socratic_rationale(subquestions, steps):
    """The Socratic chain as one rationale (the unified model's target, through format_target("cot"))."""
    return "\n".join(map(socratic_line, subquestions, steps))


def socratic_context(query, lines):
    """What both Socratic models read: the query, then the finished lines ("sub-question ** step")."""
    return query + "".join(("\n" if i else " ") + line for i, line in enumerate(lines)) + ("\n" if lines else "")


def socratic_turns(query, subquestions, steps, answer):
    """One solved problem -> the two models' (context, target) pairs, turn by turn:
    decompose: (problem + lines so far) -> " next sub-question **"
    solve:     (problem + lines so far + sub-question **) -> " step\n"; the last step -> " step So the answer is X.\n\n"
    Concatenated, the turns are exactly query + format_target("cot", None, answer, socratic_rationale(...))."""
    turns = {"decompose": [], "solve": []}
    lines = []
    for i, (q, s) in enumerate(zip(subquestions, steps)):
        context, asked = socratic_context(query, lines), socratic_ask(lines, q)
        turns["decompose"].append((context, asked))
        last = i == len(steps) - 1
        turns["solve"].append((context + asked, f" {s}" + (f" So the answer is {answer}.{STOP}" if last else "\n")))
        lines.append(socratic_line(q, s))
    return turns


def shuffle_words(text):
    """The words of text in a random order fixed by the text itself (the same every epoch and run)."""
    words = text.split()
    random.Random(hashlib.sha256(text.encode()).digest()).shuffle(words)
    return " ".join(words)


def fewshot_prefix(exemplars):
    """[(query, target), ...] -> the few-shot CoT prompt (Wei et al.): worked examples separated by blank
    lines. Prepended to a query it prompts an untuned model -- the floor a distilled student should beat."""
    return "".join(query + target for query, target in exemplars)


# -----------------------------------------------------------------------------
# Answer extraction

_ANSWER = re.compile(r"answer is\s*(.*)", re.IGNORECASE | re.DOTALL)


def parse_choice(text, choices):
    """'(c) wooded area' or 'wooded area' -> index into choices; None when it names no single choice.

    A letter decides, unless the text after it is a different choice ('(a) pond' where (a) is 'lake').
    """
    text = text.strip().rstrip(".").strip()
    m = re.fullmatch(r"\(([a-j])\)\s*(.*)", text, re.DOTALL)
    if m:
        index, named = LETTERS.index(m.group(1)), m.group(2).strip().lower()
        if index >= len(choices):
            return None
        others = {c.lower() for c in choices} - {choices[index].lower()}  # choices may repeat a text
        return None if named in others else index
    matches = [i for i, c in enumerate(choices) if text.lower() == c.lower()]
    return matches[0] if len(matches) == 1 else None


def parse_number(text):
    """The first number in text, normalised ("$1,000.50" -> "1000.5", "72.0" -> "72", "-3" -> "-3"), or None."""
    m = re.search(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", text.replace("$", ""))
    if not m:
        return None
    try:
        value = Decimal(m.group(0).replace(",", ""))
    except InvalidOperation:
        return None
    text = format(value.normalize(), "f") if value != value.to_integral() else str(value.to_integral())
    return "0" if text in ("-0", "0") else text


_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)


def states_answer(text):
    """Does text state an answer ("... So the answer is 18.", any case)? It ends a Socratic chain."""
    return _ANSWER_IS.search(text) is not None


def answer_spans(text):
    """Each "answer is" in text (a match, case-insensitive): a chain's answer follows the last (cot) or the first
    (label first); a teacher's completion is read like a cot chain (split_teacher_output)."""
    return list(_ANSWER_IS.finditer(text))


def parse_yesno(text):
    """'Yes.', 'no, because ...', 'True' -> "yes" / "no"; None when the text does not start with one of them."""
    m = re.match(r"\W*(yes|no|true|false)\b", text, re.IGNORECASE)
    return None if m is None else "yes" if m.group(1).lower() in ("yes", "true") else "no"


def normalize_text(text):
    """A short free-text answer as SQuAD compares them: lower case, punctuation and the articles a/an/the removed,
    white space folded ("The Eiffel Tower." -> "eiffel tower"); None when nothing is left."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = " ".join(w for w in text.split() if w not in ("a", "an", "the"))
    return text or None


_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
KINDS = ("choice", "number", "yesno", "text")  # the answer types a corpus can hold (data.py: `answer_type`)


def kind_of(rec):
    """A record's answer type: its `answer_type` (yesno, text), else choice with choices, number without."""
    return rec.get("answer_type") or ("choice" if "choices" in rec else "number")


def parse_answer(text, kind, choices=None):
    """An answer as text -> the answer a vote counts: a choice's index, a normalised number, "yes"/"no", or a
    normalised short text (normalize_text); None where the text gives none.

        parse_answer("(c) minnesota.", "choice", choices) -> 2
        parse_answer("$1,000.50", "number") -> "1000.5"
        parse_answer("Yes. Frogs ...", "yesno") -> "yes"
        parse_answer("The Eiffel Tower.", "text") -> "eiffel tower"
    """
    if kind == "choice":
        return parse_choice(text, choices)
    if kind == "number":
        return parse_number(text)
    if kind == "yesno":
        return parse_yesno(text)
    return normalize_text(re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].strip().rstrip(".!?"))


def extract_answer(mode, generated, choices, kind=None):
    """The answer a generated continuation commits to, or None (an abstention), as parse_answer reads it (kind
    None: a choice with choices, else a number).

    cot:   the answer after the last "answer is" (the rationale comes first).
    post/post-shuffled/label: the answer after the first "answer is" (it leads the continuation).
    """
    text = generated.split(STOP)[0]
    spans = answer_spans(text)
    if not spans:
        return None
    start = (spans[-1] if mode == "cot" else spans[0]).start()
    tail = _ANSWER.match(text, start).group(1)
    if mode != "cot":
        tail = tail.split(". ")[0]  # the rationale follows the answer
    return parse_answer(tail, kind or ("choice" if choices is not None else "number"), choices)


_LEAD_IN = re.compile(r"[,\s]*(?:\b(?:and\s+)?(?:so|thus|therefore|hence)\b)?[,\s]*(?:\b(?:the|my|our)\b)?\s*"
                      r"(?:\b(?:correct|final|best|right)\b)?\s*$", re.IGNORECASE)


def split_teacher_output(output):
    """A few-shot completion -> (rationale, answer part), answer part None when it names no answer.

    The completion is cut at the next '\\n\\nQ:'. The answer part follows its last "answer is" (as
    extract_answer reads a cot chain) to the end of that sentence; the rationale is what precedes
    it, less the lead-in ("... So the answer is (c) x." / "..., therefore the correct answer is: x").
    """
    output = output.split("\n\nQ:")[0].strip()
    spans = answer_spans(output)
    if not spans:
        return output, None
    answer = output[spans[-1].end():].lstrip(" :")
    answer = re.split(r"(?<=[.!?])\s", answer, maxsplit=1)[0]  # "(d) bridge. Bridges span rivers." -> "(d) bridge."
    return _LEAD_IN.sub("", output[:spans[-1].start()]), answer.strip()


# -----------------------------------------------------------------------------
# Self-consistency


def majority_vote(answers):
    """Most frequent non-None answer. Ties go to the answer sampled first among the tied ones
    (deterministic for a seeded run). All abstentions -> None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def vote_curve(chains_answers, golds):
    """Accuracy of the majority vote over the first k chains, for k = 1..N, from the same samples.

    chains_answers: per question, the list of N extracted answers (None = abstained); golds: indices.
    """
    n = min(len(a) for a in chains_answers)
    return [sum(majority_vote(a[:k]) == g for a, g in zip(chains_answers, golds)) / len(golds)
            for k in range(1, n + 1)]


def maj_at_k(answers, gold):
    """Self-consistency as an expectation: for k = 1..N, the expected accuracy of the majority vote over k of these
    N chains drawn without replacement (every k-subset equally likely). Abstentions (None) do not vote; a subset
    where all abstain is wrong; a tie among m answers that includes the gold one counts 1/m. Exact, by counting:
    for each number g of gold votes, a dynamic programme over the other answers' counts (each at most g) counts
    the subsets and how many answers tie with gold -- N = 30 in microseconds for a multiple-choice question."""
    N = len(answers)
    counts = Counter(a for a in answers if a is not None)
    abstain, c_gold = N - sum(counts.values()), counts.pop(gold, 0)
    wins = [0.0] * (N + 1)  # wins[k]: the k-subsets' scores, summed
    for g in range(1, c_gold + 1):
        ways = {(0, 0): 1}  # (others chosen, others with exactly g votes) -> number of ways
        for c in counts.values():
            grown = Counter()
            for (t, m), w in ways.items():
                for x in range(min(c, g) + 1):
                    grown[(t + x, m + (x == g))] += w * comb(c, x)
            ways = grown
        for (t, m), w in ways.items():
            for z in range(abstain + 1):
                wins[g + t + z] += comb(c_gold, g) * w * comb(abstain, z) / (m + 1)
    return [wins[k] / comb(N, k) for k in range(1, N + 1)]


def pass_at_k(answers, gold):
    """For k = 1..N, the chance that some one of k chains drawn without replacement is right: 1 - C(N - c, k) / C(N, k)
    with c right chains among N (Chen et al. 2021's unbiased estimator)."""
    N, c = len(answers), sum(a == gold for a in answers)
    return [1 - comb(N - c, k) / comb(N, k) for k in range(1, N + 1)]
