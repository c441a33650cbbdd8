"""Sample SCoTD's many-rationales corpus from a teacher (SCoTD §2: N chains per training question).

The teacher is prompted with K worked examples in scotd.py's format -- the bundled PaLM rationales of K fixed
train questions, which are left out of the output -- then each question; it writes N chains per question at
temperature T. A chain ends after its answer sentence ("... So the answer is (d) bridge.") or at its first
newline (`--stop newline`: the newline only): in this format a rationale and its answer sentence are one
line, and instruct teachers go on after it, on the same line or the next, instead of stopping.

The teacher is either a local folder (`--teacher`: any folder checkpoint.py loads, run by sample.py: the
header is prefilled once for the run, each batch of questions once, its cache repeated to N rows) or a served
model (`--api URL --model NAME`: any OpenAI-compatible server -- a hosted API, vLLM or SGLang across GPUs,
llama.cpp -- asked through api.py with `n` chains a request, `--concurrency` requests in flight):

    python teacher.py --teacher ~/.cache/scotd/teachers/Qwen2.5-Coder-1.5B-Instruct --n 30 --limit 1000 \\
        --out data/csqa_qwen_train.jsonl
    python teacher.py --api https://api.example.com/v1 --model big-model --n 30 --limit 1000 \\
        --out data/csqa_big_train.jsonl   # the key from $OPENAI_API_KEY; --dry-run first: the cost, nothing sent

Each rationale records the teacher's summed log-probability of its chain and the chain's token count
(`teacher_logprob`, `teacher_tokens`; under the model itself, at T = 1), for the paper's teacher-likelihood
analysis; an API teacher records them when its server returns logprobs. `--min-correct K` asks in rounds of K
chains and stops a question once K of its chains reach the gold answer (at most --n).

`--socratic` writes sub-questions instead (Socratic CoT, Shridhar et al. 2022, who generated them for
datasets without annotations): for each GSM8K *train* problem, one question per gold solution step -- the
question the step answers -- asked one step a turn (the text: the problem, the earlier steps each with its
question, then the next step; all turns of a local batch continue one KV cache, so a turn prefills only the
step it appends: sample.generate_turns; an API teacher gets one request a turn), from a 4-shot prompt
hand-written on train problems 1-4 (SOCRATIC_SHOTS; greedy by default). A problem's record then holds a
Socratic rationale (data.py: "sub-question ** step" lines, with `steps` and `subquestions`); a chain whose
output for some step asks no question is kept under the record's "rejected" with the reason, and gives no
rationale (a counted skip).

    python teacher.py --socratic --teacher ~/.cache/scotd/teachers/Qwen2.5-Coder-1.5B-Instruct --limit 1000 \\
        --out data/gsm8k_socratic_train.jsonl

Output: canonical JSONL (data.py), one record per question with its N rationales, each with the teacher's
parsed `prediction` and `correct`; beside it `<out>.meta.json` holds the teacher (the folder, or the URL and
model name), the prompt and the sampling settings, and `<out>.runs.jsonl` the cost: after every batch, the
invocation's running total (start, seconds, questions, generated tokens; for an API teacher also requests,
retries, malformed responses, prompt and completion tokens), so even a killed run leaves its time
(data.run_totals reads it; `data.py stats` sums it). Resumable: a question's line is written (and flushed)
as soon as it is done, in question order; the same command run again skips what is there, redoes a
half-written last line, and refuses changed settings, naming them. A local teacher gives the file an
uninterrupted run gives (batch k samples from seed (seed, k) whatever ran before it); an API teacher does when
its server honours `seed`. Ctrl-C and SIGTERM stop it cleanly (exit 130 / 143).
"""

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import api
import cli
import fileio
import data
import distill
from checkpoint import check_model_folder, default_student, from_pretrained, load_tokenizer
from fileio import InputError
from distributed import Dist
from model import DTYPES
from report import Progress
from answers import dialogues
from sample import SampleConfig, batch_seed, batch_slices, chain_logprobs, generate, prefill
from scotd import ANSWER_END, STOP, fewshot_prefix, format_query, format_target, kind_of, socratic_rationale

# Socratic sub-questions for the first GSM8K train problems, written for this prompt (never test problems)
SOCRATIC_SHOTS = {
    "gsm8k-train-1": ["How many clips did Natalia sell in May?",
                      "How many clips did Natalia sell altogether in April and May?"],
    "gsm8k-train-2": ["How much does Weng earn per minute?", "How much did Weng earn for 50 minutes of babysitting?"],
    "gsm8k-train-3": ["How much money does Betty have in the beginning?",
                      "How much money did Betty's grandparents give her?",
                      "How much more money does Betty need to buy the wallet?"],
    "gsm8k-train-4": ["How many pages did Julie read today?", "How many pages has Julie read since yesterday?",
                      "How many pages are left to be read?", "How many pages should Julie read tomorrow?"],
}


def get_args(argv=None):
    return cli.get_args(parser, check_args, argv)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="a local teacher: an HF-layout model folder, or a hub id in the local "
                        "Hugging Face cache (--teacher or --api is required)")
    source.add_argument("--api", metavar="URL", help="a served teacher: an OpenAI-compatible server's base URL, e.g. "
                        "http://127.0.0.1:8080/v1 (\"/v1\" is added to a bare host; --teacher or --api is required); "
                        "needs `pip install httpx`")
    p.add_argument("--socratic", action="store_true", help="write sub-questions for GSM8K train solutions (see above)")
    p.add_argument("--data", default=None, help="questions (canonical JSONL); rationales there are ignored "
                   "(default: bundled CSQA train; GSM8K train with --socratic)")
    p.add_argument("--n", type=cli.positive_int, default=None, help="rationales per question (default: the paper's 30; "
                   "1 with --socratic)")
    p.add_argument("--min-correct", type=cli.positive_int, default=None, metavar="K",
                   help="ask in rounds of K chains and stop a question once K of its chains give the gold answer "
                   "(--n is the cap; default: off, --n chains for every question)")
    p.add_argument("--temperature", type=cli.nonneg_float, default=None, help="default 1.0; 0 (greedy) with --socratic")
    p.add_argument("--top-p", type=cli.fraction, default=1.0, help="default 1.0 (off)")
    p.add_argument("--shots", type=cli.nonneg_int, default=None, help="worked examples in the prompt (bundled PaLM "
                   "rationales; default 4, 0 with --top-logprobs)")
    p.add_argument("--shots-from", default=None, metavar="CORPUS", help="the worked examples: the first --shots "
                   "records of this corpus with a correct rationale -- a few written by hand, or an imported train "
                   "split's (data.py import --rationale) (default: the task's bundled train corpus)")
    p.add_argument("--prompt", default=None, help="a file with the few-shot header instead of --shots (default: none)")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="the first N questions (after the exemplars; "
                   "default: all)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                   help="default 96; 48 a question with --socratic")
    p.add_argument("--stop", default="answer", choices=("answer", "newline"),
                   help="end a chain after its answer sentence or at a newline (answer, the default), or at a "
                   "newline only")
    p.add_argument("--logprobs", action=argparse.BooleanOptionalAction, default=True,
                   help="record each chain's summed teacher log-probability and token count (default: on; an API "
                   "teacher asks its server for logprobs, and records none when the server returns none)")
    p.add_argument("--out", required=True, help="output JSONL (plain, appended as questions finish)")
    p.add_argument("--seed", type=int, default=None, help="default 0 for a local teacher; an API teacher sends a seed "
                   "derived from it with each request only when it is given")
    p.add_argument("--score", metavar="CORPUS", default=None, help="score the chains of CORPUS (a canonical corpus) "
                   "under a local --teacher instead of sampling: --out gets its records with each rationale's "
                   "teacher_logprob and teacher_tokens, the chain as the corpus keeps it (rationale, then the answer "
                   "sentence), under the same few-shot prompt (default: none, sample)")
    p.add_argument("--top-logprobs", type=cli.positive_int, default=None, metavar="K",
                   help="with --score: store the teacher's K likeliest tokens and their log-probabilities at each "
                   "target position of each chain, read as train.py trains on it (the training prompt, then the "
                   "target: rationale, answer sentence, blank line), in <out>.topk for train.py --kd (distill.py; "
                   "default: off)")
    p.add_argument("--dry-run", action="store_true", help="print how many requests and about how many prompt and "
                   "completion tokens the run will cost, then stop: nothing is sent or written")
    p.add_argument("--tokenizer", default=None, help="--dry-run counts tokens with this model folder's tokenizer "
                   "(default: the local teacher's, else the default student's); --score with --api: the served "
                   "teacher's tokenizer (required)")
    local = p.add_argument_group("a local teacher (--teacher)")
    local.add_argument("--batch-size", type=cli.positive_int, default=4, help="questions per prefill (x n rows while "
                       "sampling; default 4)")
    cli.add_device_flags(local, "the decode step, on CUDA replayed as CUDA graphs")
    add_served_flags(p)
    return p


def add_served_flags(p):
    """The flags of a served teacher (--api)."""
    served = p.add_argument_group("a served teacher (--api)")
    served.add_argument("--model", help="the model name the server knows (required with --api)")
    served.add_argument("--api-style", default="completions", choices=("completions", "chat"),
                        help="completions (the default): /v1/completions with the few-shot text; chat: "
                        "/v1/chat/completions for servers of chat models only, the few-shot prompt laid out as "
                        "messages -- each worked example a user turn (its question) and an assistant turn (its "
                        "chain and answer), then the question as a user turn (a --prompt file is the system "
                        "message; Socratic rounds continue the dialogue: each step a user turn, each question the "
                        "teacher wrote an assistant turn)")
    served.add_argument("--api-key-env", default=None, metavar="NAME", help="the environment variable holding the API "
                        "key (default: OPENAI_API_KEY, no key when it is unset); never pass a key on the command line")
    served.add_argument("--chains-per-request", type=cli.positive_int, default=None, metavar="M",
                        help="ask for at most M chains a request (default: all of a question's; llama.cpp answers at "
                        "most as many as it has slots)")
    served.add_argument("--concurrency", type=cli.positive_int, default=4, help="requests in flight (default 4)")
    served.add_argument("--timeout", type=cli.positive_float, default=600.0,
                        help="seconds a request may take (default 600)")
    served.add_argument("--max-retries", type=cli.nonneg_int, default=8, help="retries of a request that failed in a "
                        "way worth retrying (refused, reset, timed out, 429, 5xx, malformed; default 8)")
    served.add_argument("--retry-wait", type=cli.nonneg_float, default=1.0, help="seconds before the first retry, "
                        "doubled for each next one, at most 60, with jitter; a Retry-After header wins (default 1)")


def check_args(p, args):
    """Everything that can be checked before anything loads (argparse's message, exit 2)."""
    defaults = dict(data=str(data.GSM8K_TRAIN), n=1, temperature=0.0, max_new_tokens=48) if args.socratic else \
        dict(data=str(data.DEFAULT_TRAIN), n=30, temperature=1.0, max_new_tokens=96)
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    cli.check_file(p, "--data", args.data)
    cli.check_file(p, "--shots-from", args.shots_from)
    if args.shots_from and (args.prompt or args.socratic):
        p.error("argument --shots-from: not with --prompt or --socratic (they bring their own header)")
    if args.socratic and Path(args.data).resolve() == data.GSM8K_TEST.resolve():
        p.error("argument --data: --socratic never prompts on test problems; use GSM8K train")
    if args.score and (args.socratic or args.min_correct or args.dry_run):
        p.error("argument --score: scores a corpus, on its own (no --socratic, --min-correct, --dry-run)")
    if args.score and args.api and (not args.tokenizer or args.api_style != "completions"):
        p.error("argument --score: with --api, give the teacher's tokenizer (--tokenizer FOLDER: the token ids sent "
                "and the sidecar's fingerprint) and use --api-style completions (vLLM's prompt_logprobs)")
    cli.check_file(p, "--score", args.score)
    if args.top_logprobs and not args.score:
        p.error("argument --top-logprobs: only with --score CORPUS (the chains whose distributions to store)")
    args.shots = (0 if args.top_logprobs else 4) if args.shots is None else args.shots
    args.data = args.score or args.data  # scoring: the prompt's worked examples come from the corpus's own task
    if args.socratic and args.min_correct:
        p.error("argument --min-correct: a Socratic chain has no answer of its own to check")
    cli.check_file(p, "--prompt", args.prompt)
    if args.out.endswith(".gz"):
        p.error("argument --out: write plain .jsonl (it is appended to as questions finish); gzip it afterwards")
    if args.teacher:
        cli.check_device(p, args.device)
        args.teacher = check_model_folder(p, "--teacher", args.teacher)
        args.seed = 0 if args.seed is None else args.seed
        device = cli.device_type(args.device)
        args.dtype, args.compile = cli.default_dtype(device, args.dtype), cli.default_compile(device, args.compile)
    else:
        check_api_args(p, args)
    return args


def check_api_args(p, args):
    """--api's flags, and the key, read from the environment (never from argv)."""
    if not args.model:
        p.error("argument --model: required with --api (the name the server serves the teacher under)")
    try:
        args.api = api.base_url(args.api)
    except ValueError as e:
        p.error(f"argument --api: {e}")
    name = args.api_key_env or "OPENAI_API_KEY"
    if args.api_key_env and not os.environ.get(name):
        p.error(f"argument --api-key-env: the environment variable {name} is not set")
    args.key = os.environ.get(name) or None
    if not args.dry_run:
        try:
            import httpx  # noqa: F401
        except ImportError:
            p.error("argument --api: needs the httpx package (pip install httpx)")


# -----------------------------------------------------------------------------
# The prompt


ASKS = "Question it answers:"


def socratic_round(rec, asked):
    """The sub-question prompt for the step after the questions `asked` so far: the problem, each earlier
    step followed by the question it answers, then the next step and its question to write."""
    steps = rec["rationales"][0]["steps"]
    return (f"Problem: {rec['question']}\n" + "".join(f"Step: {s}\n{ASKS} {q}\n" for s, q in zip(steps, asked))
            + f"Step: {steps[len(asked)]}\n{ASKS}")


def socratic_shots(records):
    """The 4-shot sub-question prompt as (prompt, answer) pairs: for each of SOCRATIC_SHOTS's problems, every
    step with its question, the last question being the answer."""
    by_id = {r["id"]: r for r in records}
    return [(socratic_round(by_id[i], qs[:-1]), f" {qs[-1]}\n\n") for i, qs in SOCRATIC_SHOTS.items()]


def socratic_header(records):
    """The 4-shot sub-question prompt as text."""
    return fewshot_prefix(socratic_shots(records))


def read_prompt(path):
    """A --prompt file's few-shot header: UTF-8 text that is not blank."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    if not text.strip():
        raise InputError(f"{path}: the --prompt file has no text; write the few-shot header there, or leave --prompt "
                         "out (--shots K takes K worked examples)")
    return text


def prompt_and_questions(args):
    """-> (the questions to sample for, the header's text, its worked examples as (prompt, answer) pairs --
    empty for a --prompt file --, the exemplars' ids)."""
    records = data.read_corpus(args.data)
    if args.socratic:
        for n, r in enumerate(records, 1):
            if "choices" in r or not (r["rationales"] and r["rationales"][0].get("steps")):
                raise InputError(f"{args.data}:{n}: --socratic needs numeric problems whose first rationale has "
                                 "its solution `steps` (data.py import-gsm8k writes them)")
        shot_ids = [] if args.prompt else list(SOCRATIC_SHOTS)
        shots = [] if args.prompt else socratic_shots(data.read_corpus(data.GSM8K_TRAIN))
    else:
        chosen = []
        if args.shots and not args.prompt:
            source = args.shots_from or data.train_corpus_of(records)  # worked examples of the same task
            chosen = data.exemplars(args.shots, source)
            if not chosen:
                raise InputError(f"{source}: no record with a correct rationale to show as a worked example")
        shot_ids, shots = [i for i, _, _ in chosen], [(query, target) for _, query, target in chosen]
    header = read_prompt(args.prompt) if args.prompt else fewshot_prefix(shots)
    records = [r for r in records if r["id"] not in shot_ids]
    return records[:args.limit] if args.limit else records, header, shots, shot_ids


# -----------------------------------------------------------------------------
# Socratic dialogues


class Asking:
    """The sub-question dialogues of `rows` (GSM8K records with solution `steps`), one step a turn. A row's
    text starts as socratic_round(rec, []): the problem, step 1, and "Question it answers:". After the
    teacher's question for step r (cut after its "?"), the turn appends step r + 1 and asks again, so the text
    is always socratic_round(rec, questions so far): one question a step (a teacher asked for all of them at
    once miscounts the steps). A row whose output asks nothing is stopped there, with the reason. encode and
    max_new_tokens (a local teacher's: answers.dialogues) size the cache (`slots`)."""

    def __init__(self, rows, encode=None, max_new_tokens=0):
        self.rows, self.encode, self.max_new_tokens = rows, encode, max_new_tokens
        self.asked, self.why, self.tokens = [[] for _ in rows], [None] * len(rows), [[] for _ in rows]
        self.logprob = [0.0] * len(rows)  # the sum over the row's turns; None once a turn comes without one

    def slots(self, prompts):
        """Every turn's tokens, for the longest dialogue."""
        return max(socratic_slots(self.encode, rec, self.max_new_tokens, len(p)) for p, rec in zip(prompts, self.rows))

    @property
    def prompts(self):
        return [socratic_round(rec, []) for rec in self.rows]

    def turn(self, j, out, m=0):
        """Row j's output {"text", "tokens"[, "logprob"]} -> the text that follows it (the next step), or None:
        the row is done. (m: the model, for answers.dialogues; here there is one.)"""
        self.tokens[j] += out["tokens"]
        known = out.get("logprob") is not None and self.logprob[j] is not None
        self.logprob[j] = self.logprob[j] + out["logprob"] if known else None
        steps, q = self.rows[j]["rationales"][0]["steps"], subquestion(out["text"])
        if q is None:
            self.why[j] = f"step {len(self.asked[j]) + 1}: not a question: {out['text'].strip()[:200]!r}"
            return None
        self.asked[j].append(q)
        return f"\nStep: {steps[len(self.asked[j])]}\n{ASKS}" if len(self.asked[j]) < len(steps) else None

    def chains(self):
        """-> per row {"subquestions", "why" (None when every step has its question), "tokens": all generated,
        "logprob": their summed log-probability (when every turn came with one)}."""
        return [{"subquestions": a, "why": w, "tokens": t} | ({"logprob": lp} if lp is not None else {})
                for a, w, t, lp in zip(self.asked, self.why, self.tokens, self.logprob)]


def subquestion(output):
    """The teacher's line after "Question it answers:" -> the question (cut after its "?": instruct teachers
    go on with "To solve this, ..."), or None when the line asks nothing."""
    line = output.strip().split("\n")[0]
    return line[:line.index("?") + 1] if "?" in line else None


# -----------------------------------------------------------------------------
# What a question's chains become


def rationales(rec, chains, socratic):
    """A question's sampled chains -> (its rationales, the rejected outputs with their reasons). A chain that
    carries its summed log-probability gives its rationale `teacher_logprob` and `teacher_tokens`."""
    kept, rejected = [], []
    for c in chains:
        if not socratic:
            r = data.teacher_rationale(c["text"], rec.get("choices"), rec["answer"], kind_of(rec))
        elif c["why"]:
            rejected.append({"why": c["why"], "subquestions": c["subquestions"]})
            continue
        else:
            steps = rec["rationales"][0]["steps"]
            r = {"text": socratic_rationale(c["subquestions"], steps), "prediction": rec["answer"], "correct": True,
                 "steps": steps, "subquestions": c["subquestions"]}
        if c.get("logprob") is not None:
            r |= {"teacher_logprob": c["logprob"], "teacher_tokens": len(c["tokens"])}
        kept.append(r)
    return kept, rejected


def is_correct(rec, chain):
    return data.teacher_rationale(chain["text"], rec.get("choices"), rec["answer"], kind_of(rec))["correct"]


def rounds(n, k):
    """--min-correct: the chains asked for in each round (k at a time, n in all)."""
    return [min(k, n - r * k) for r in range(math.ceil(n / k))]


def done_ids(out):
    """Ids already in `out` (data.read_appended: each complete line); a half-written last line (a kill
    mid-write) is cut off the file, with a note, so that the next record starts on a line of its own."""
    rows = data.read_appended(out)
    for n, row in rows:
        if not isinstance(row, dict) or "id" not in row:
            raise InputError(f"{out}:{n}: not a record this script wrote; move the file away or choose another --out")
    if dropped := data.drop_partial_line(out):
        print(f"note      {out}: dropped a half-written last line ({dropped} bytes); it is redone")
    return {row["id"] for _, row in rows}


class CorpusWriter:
    """Called with (question indices, their chains) as questions finish: each question's record appended and
    flushed, then this invocation's running total appended to <out>.runs.jsonl. `client`: an api.Client,
    whose tally (requests, retries, tokens) the totals carry, with the client's own CPU seconds (what it
    spends besides waiting for the server); else generated tokens are counted here."""
    counted = "generated_tokens"  # what the runs file's totals count

    def __init__(self, out, runs, records, done, bar, socratic=False, client=None):
        self.out, self.runs, self.records, self.done, self.bar = out, Path(runs), records, done, bar
        self.socratic, self.client = socratic, client
        self.tokens, self.questions, self.t0, self.cpu0 = 0, 0, time.time(), time.process_time()
        self.started = datetime.fromtimestamp(self.t0, timezone.utc).isoformat(timespec="microseconds")  # the run's key
        self.no_logprobs = False

    def row(self, rec, chains):
        """A question's record: its rationales (and the rejected chains) from its chains."""
        row = {key: rec[key] for key in ("id", "question", "choices", "answer", "answer_type") if key in rec}
        row["rationales"], rejected = rationales(rec, chains, self.socratic)
        if rejected:
            row["rejected"] = rejected
        if self.client and not self.no_logprobs and any(c.get("logprob") is None for c in chains):
            self.no_logprobs = True
            print(f"\nnote      the server returned no logprobs for {rec['id']}: its rationales have no "
                  "teacher_logprob")
        return row

    def tokens_of(self, outs):
        return sum(len(c["tokens"] or []) for chains in outs for c in chains)

    def counted_tokens(self, tally):
        """What the runs file counts: the server's completion tokens (an API teacher), else those counted here."""
        return tally.get("completion_tokens", self.tokens)

    def __call__(self, indices, outs):
        self.tokens += self.tokens_of(outs)  # the whole batch's, first
        cpu = {"client_cpu_seconds": round(time.process_time() - self.cpu0, 3)}
        tally = self.client.totals() | cpu if self.client else {}
        counted = self.counted_tokens(tally)
        # a batch redone after a kill mid-write: its first lines are there already
        new = [(self.records[i], out) for i, out in zip(indices, outs) if self.records[i]["id"] not in self.done]
        # the batch's records in one append, fsync'd: a kill or a crash of the machine loses nothing written, and a
        # write that fails (a full disk) leaves no half record
        lines = "".join(json.dumps(self.row(rec, out), ensure_ascii=False) + "\n" for rec, out in new)
        fileio.append_text(self.out, lines, sync=True)
        self.questions += len(new)
        self.bar.update(len(new), f"{counted / (time.time() - self.t0):,.0f} tok/s")
        fileio.append_text(self.runs, json.dumps({"started": self.started, "seconds": round(time.time() - self.t0, 3),
                                               "questions": self.questions, self.counted: counted} | tally) + "\n")


class ScoreWriter(CorpusWriter):
    """--score's writer: each record as the corpus has it, its scored rationales with teacher_logprob and
    teacher_tokens added (outs: per question, (summed log-probability, tokens, ...) a chain). `which`: per
    question, the indices of the rationales its chains are; `sidecar` (--top-logprobs, with the chains' tokens in
    `chains`): each chain's top-k appended there first, its span in the rationale's `topk`."""
    counted = "scored_tokens"

    def __init__(self, *args, which, chains=None, sidecar=None, client=None):
        super().__init__(*args, client=client)
        self.which, self.chains, self.sidecar = which, chains, sidecar
        self.index = {rec["id"]: q for q, rec in enumerate(self.records)}

    def row(self, rec, scores):
        q = self.index[rec["id"]]
        rec = json.loads(json.dumps(rec))
        spans = [None] * len(scores) if not self.sidecar else \
            self.sidecar.append([(tokens, ids, logp) for tokens, (_, _, ids, logp) in zip(self.chains[q], scores)])
        for c, (logprob, n, *_), span in zip(self.which[q], scores, spans):
            rec["rationales"][c] |= {"teacher_logprob": logprob, "teacher_tokens": n} | ({"topk": span} if span else {})
        if self.sidecar:
            rec["topk_file"] = self.sidecar.path.name
        return rec

    def tokens_of(self, outs):
        return sum(n for scores in outs for _, n, *_ in scores)

    def counted_tokens(self, tally):
        return self.tokens


# -----------------------------------------------------------------------------
# A local teacher


def load_local(args, header):
    """The local teacher -> (model, tokenizer, the header's prefilled cache, its SampleConfig)."""
    _, device = Dist.init(args.device)
    cli.keep_freed_memory(device)
    model = from_pretrained(args.teacher, device=device, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer(args.teacher)
    header_ids = tokenizer.encode(header).ids
    source = f"--prompt {args.prompt}" if args.prompt else "the 4-shot sub-question header" if args.socratic \
        else f"--shots {args.shots}"
    cli.check_fits(model.cfg, len(header_ids) + 1, f"the few-shot header ({source}: {len(header_ids):,} tokens) and a "
                   "token after it", "use fewer --shots or a shorter --prompt file, or a teacher with more positions")
    prefix = prefill(model, header_ids)  # one prefill of the header for the whole run
    stop_after = (r"\?",) if args.socratic else (ANSWER_END,) if args.stop == "answer" else ()
    cfg = SampleConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                       stop=("\n",), stop_after=stop_after, batch_size=args.batch_size, seed=args.seed,
                       logprobs=args.logprobs, compile=args.compile)
    print(f"teacher   {args.teacher} on {device}, {args.dtype}; header of {prefix.length if prefix else 0} tokens")
    return model, tokenizer, prefix, cfg


def question_prompts(tokenizer, records):
    return [tokenizer.encode(format_query(r["question"], r.get("choices")), add_special_tokens=False).ids
            for r in records]


def check_local_fits(args, teacher, records):
    """Before any sampling: the header + each question's prompt + what the teacher may write for it fit the local
    teacher's positions (a Socratic chain: every step, its question and --max-new-tokens for it)."""
    model, tokenizer, prefix, cfg = teacher
    header = prefix.length if prefix else 0
    if args.socratic:
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
        own = [socratic_slots(encode, rec, cfg.max_new_tokens) for rec in records]
        what = "its steps, and --max-new-tokens for each step's question"
    else:
        own = [len(p) + cfg.max_new_tokens for p in question_prompts(tokenizer, records)]
        what = "its prompt + --max-new-tokens"
    data.check_questions_fit(model.cfg, args.data, records, [header + n for n in own],
                             lambda i: f"a header of {header:,} tokens + {own[i]:,} for {what}",
                             "use fewer --shots, a shorter --prompt file or a lower --max-new-tokens")


def sample_local(args, teacher, records, todo, writer):
    """Sample every batch in `todo` with the local teacher (load_local's), handing each finished batch to `writer`."""
    model, tokenizer, prefix, cfg = teacher
    if args.socratic:  # a question a step, turn by turn
        return socratic_generate(model, tokenizer, records, prefix, cfg, todo, writer)
    prompts, cfg = question_prompts(tokenizer, records), cfg.for_model(model)
    if not args.min_correct:
        return generate(model, tokenizer, prompts, cfg, batches=todo, prefix=prefix, on_batch=writer)
    layout = batch_slices(len(records), cfg.batch_size)
    for k in todo:  # --min-correct: a batch's open questions get K more chains a round, from seed (seed, k, round)
        chains = {i: [] for i in layout[k]}
        for r, ask in enumerate(rounds(args.n, args.min_correct)):
            going = [i for i in layout[k] if sum(is_correct(records[i], c) for c in chains[i]) < args.min_correct]
            if not going:
                break
            outs = generate(model, tokenizer, [prompts[i] for i in going], replace(cfg, n=ask, batch_size=len(going),
                            seed=batch_seed(batch_seed(cfg.seed, k), r)), prefix=prefix)
            for i, out in zip(going, outs):
                chains[i] += out
        writer(list(layout[k]), [chains[i] for i in layout[k]])


def socratic_slots(encode, rec, max_new_tokens, prompt=None):
    """The cache slots (at most) of a sub-question dialogue of `rec`: its first prompt (`prompt` tokens, else
    encoded here), then for each step the step's text and a question of at most max_new_tokens."""
    prompt = len(encode(socratic_round(rec, []))) if prompt is None else prompt
    return prompt + sum(len(encode(f"\nStep: {s}\n{ASKS}")) + max_new_tokens for s in rec["rationales"][0]["steps"])


def socratic_generate(model, tokenizer, records, header, cfg, batches, on_batch):
    """Asking's dialogues for each batch of problems (cfg.n chains each; answers.dialogues: all turns of a batch
    in one cache, a turn prefilling only the step it appends), after the header's one prefill (a KVCache); batch
    k samples from seed (cfg.seed, k). on_batch as sample.generate's."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    make = lambda rows: Asking(rows, encode, cfg.max_new_tokens)  # noqa: E731
    for batch, chains in dialogues([model], tokenizer, records, make, [cfg], encode, batches, prefix=header):
        on_batch(batch, chains)


# -----------------------------------------------------------------------------
# A served teacher


class Served:
    """What teacher.py asks an API teacher, question by question: the prompt (text, or chat messages), the
    chains (asked again for what a server left out, in --min-correct rounds), and the Socratic dialogues (a
    request a turn). Request r of question i carries seed (seed, i, r) when --seed is given."""

    def __init__(self, args, client, header, shots, records):
        self.args, self.client, self.header, self.shots, self.records = args, client, header, shots, records
        self.stop_after = (r"\?",) if args.socratic else (ANSWER_END,) if args.stop == "answer" else ()

    def prompt(self, pieces):
        """The dialogue so far (the question; Socratic: then each question asked and the step after it)."""
        if self.args.api_style == "completions":
            return self.header + "".join(pieces)
        return api.chat_messages(self.shots, pieces, system=None if self.shots else self.header)

    def ask(self, i, pieces, n, r):
        seed = None if self.args.seed is None else batch_seed(batch_seed(self.args.seed, i), r) % 2**31
        choices = self.client.complete(self.prompt(pieces), n, seed, what=f"question {self.records[i]['id']}")
        return [api.chain(c, self.stop_after) for c in choices[:n]]

    def __call__(self, i):
        """Question i -> its chains."""
        if self.args.socratic:
            return [self.dialogue(i, j) for j in range(self.args.n)]
        rec, n, k = self.records[i], self.args.n, self.args.min_correct or self.args.n
        query, chains, r = format_query(rec["question"], rec.get("choices")), [], 0
        while len(chains) < n and sum(is_correct(rec, c) for c in chains) < k:
            ask = min(n - len(chains), k, self.args.chains_per_request or n)
            chains += self.ask(i, [query], ask, r)  # a server may return fewer: asked again
            r += 1
        return chains

    def dialogue(self, i, j):
        """Chain j of Socratic problem i: a request a step (Asking's dialogue with one row)."""
        asking = Asking([self.records[i]])
        pieces, r = [asking.prompts[0]], j * 1000  # chain j's requests: numbered from j * 1000 (far fewer turns)
        while True:
            out = self.ask(i, pieces, 1, r)[0]
            out["tokens"] = out["tokens"] or []
            r += 1
            follow = asking.turn(0, out)
            if follow is None:
                return asking.chains()[0]
            pieces += [out["text"], follow]


def api_client(args):
    """The served teacher's api.Client: every request asks for --max-new-tokens at --temperature and --top-p,
    stops at a newline, and asks for logprobs (unless --no-logprobs)."""
    params = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_new_tokens, "stop": ["\n"]}
    if args.logprobs:
        params |= {"logprobs": 1} if args.api_style == "completions" else {"logprobs": True}
    print(f"teacher   {args.model} at {args.api} ({args.api_style}), {args.concurrency} request(s) in flight")
    return api.Client(args.api, args.model, args.api_style, args.key, args.timeout, args.max_retries, args.retry_wait,
                      params)


def sample_api(args, client, records, header, shots, todo, writer):
    """Ask the served teacher for every question in `todo`, --concurrency at a time, handing each question's
    chains to `writer` in question order."""
    try:
        for i, chains in api.in_order(Served(args, client, header, shots, records), todo, args.concurrency):
            writer([i], [chains])
    finally:
        client.close()


def cost(args, records, header, shots, tokenizer):
    """--dry-run: what the run will send, before anything is sent -> lines to print."""
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    chat = args.api_style == "chat" and args.api

    def prompt_tokens(pieces):  # chat: the messages' words and ~4 tokens of template a message
        if not chat:
            return count(header + "".join(pieces))
        messages = api.chat_messages(shots, pieces, system=None if shots else header)
        return sum(count(m["content"]) + 4 for m in messages)

    if args.socratic:  # a request a step; the prompt grows by each step and question (questions not counted)
        steps = [len(r["rationales"][0]["steps"]) for r in records]
        requests = args.n * sum(steps)
        prompt = args.n * sum(prompt_tokens([socratic_round(r, [""] * s)]) for r, n in zip(records, steps)
                              for s in range(n))
        completion = requests * args.max_new_tokens
        per = "one a step of each chain"
    else:
        asks = len(rounds(args.n, min(args.min_correct or args.n, args.chains_per_request or args.n)))
        requests = len(records) * asks
        prompt = asks * sum(prompt_tokens([format_query(r["question"], r.get("choices"))]) for r in records)
        completion = len(records) * args.n * args.max_new_tokens
        per = f"{'at most ' if args.min_correct else ''}{asks if asks > 1 else 'one'} a question"
    where = f"{args.model} at {args.api} ({args.api_style})" if args.api else args.teacher
    uncounted = " and more: the questions the teacher writes are not counted" if args.socratic else ""
    return [f"dry run   nothing sent: {len(records):,} questions x {args.n} chains (T={args.temperature}) from {where}",
            f"requests  {requests:,} ({per}; more if the server returns fewer choices than asked, or a request is "
            "retried)",
            f"prompt    about {prompt:,} tokens{uncounted} (counted with the tokenizer of {args.tokenizer}; the "
            "server's may differ)",
            f"completion at most {completion:,} tokens ({args.max_new_tokens} a chain"
            f"{', a step' if args.socratic else ''})"]


def main(argv=None):
    args = get_args(argv)
    records, header, shots, shot_ids = prompt_and_questions(args)
    if args.dry_run:
        args.tokenizer = args.tokenizer or args.teacher or default_student()
        print("\n".join(cost(args, records, header, shots, load_tokenizer(args.tokenizer))))
        return None
    with fileio.one_writer(args.out, folder=False):  # one process writes a corpus
        if args.score:
            return score(args, header, shot_ids)
        return write(args, records, header, shots, shot_ids)


def write(args, records, header, shots, shot_ids):
    """Sample what <out> lacks and append it, question by question (the module docstring says how)."""
    out, meta_path = Path(args.out), Path(args.out + ".meta.json")
    meta = settings(args, header, shot_ids)
    if meta_path.exists() and (changes := cli.changed_settings(json.loads(meta_path.read_text()), meta)):
        raise InputError(f"{meta_path}: {out} was sampled with other settings: {'; '.join(changes)}. Use the same "
                         "flags, or another --out")
    fileio.write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    done = done_ids(out)
    engine = load_local(args, header) if args.teacher else api_client(args)
    if args.teacher:
        check_local_fits(args, engine, records)
    print(f"questions {len(records):,} from {args.data}: {len(done):,} already in {out}, "
          f"{len(records) - len(done):,} to sample x {args.n} chains (T={args.temperature}); "
          f"{len(shot_ids) or 'custom'}-shot {'sub-question ' if args.socratic else ''}header")
    bar = Progress(len(records), "teacher", start=len(done))
    with cli.stopping_cleanly(lambda: f"{bar.n:,} of {len(records):,} questions in {out}", bar):
        writer = CorpusWriter(out, args.out + ".runs.jsonl", records, done, bar, args.socratic,
                              client=None if args.teacher else engine)
        if args.teacher:
            todo = [k for k, batch in enumerate(batch_slices(len(records), args.batch_size))
                    if any(records[i]["id"] not in done for i in batch)]
            sample_local(args, engine, records, todo, writer)
        else:
            todo = [i for i, r in enumerate(records) if r["id"] not in done]
            sample_api(args, engine, records, header, shots, todo, writer)
    bar.close()
    print(f"wrote     {out} ({len(records):,} questions x {args.n} rationales); settings in {meta_path}")
    print(f"next      python data.py stats {out}")
    return out


def chain_text(rec, r):
    """A rationale as the teacher's chain, as the corpus keeps it: the rationale, then its answer sentence (none
    when the teacher named no answer) -- what a student is trained on, less the blank line."""
    choices = rec.get("choices")
    if r.get("prediction") is None or (choices is not None and r["prediction"] not in choices):
        return " " + r["text"].strip()
    said = choices.index(r["prediction"]) if choices is not None else rec["answer"] \
        if kind_of(rec) == "text" and r.get("correct") else r["prediction"]
    return format_target("cot", choices, said, r["text"])[:-len(STOP)]


def score(args, header, shot_ids):
    """--score: every chain of the corpus scored under the teacher, written to --out as the records with
    teacher_logprob and teacher_tokens added, a batch of questions at a time (resumable). A local teacher:
    sample.chain_logprobs (the header prefilled once, each question once, its chains as rows of its cache); a
    served one: the prompt log-probabilities of each chain's token ids (score_served). With --top-logprobs the
    chains are the student's training targets, and their top-k go to <out>.topk (distill.py)."""
    out, meta_path = Path(args.out), Path(args.out + ".meta.json")
    meta = {"scored": cli.portable(args.score), "teacher": cli.portable(args.teacher) if args.teacher else
            {"api": args.api, "model": args.model, "tokenizer": cli.portable(args.tokenizer)}, "exemplar_ids": shot_ids,
            "prompt": header, "chain": TRAINING_TARGET if args.top_logprobs else
            "the rationale, then ' So the answer is (x) choice.' (none without an answer)"}
    meta |= {"batch_size": args.batch_size, "dtype": args.dtype} if args.teacher else {}
    meta |= {"top_logprobs": args.top_logprobs} if args.top_logprobs else {}
    if meta_path.exists() and (changes := cli.changed_settings(json.loads(meta_path.read_text()), meta)):
        raise InputError(f"{meta_path}: {out} was scored with other settings: {'; '.join(changes)}")
    records = data.read_corpus(args.score)
    fileio.write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    done = done_ids(out)
    if args.teacher:
        model, tokenizer, prefix, _ = load_local(args, header)
    else:
        tokenizer, client = load_tokenizer(args.tokenizer), api_client(args)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    prompts = question_prompts(tokenizer, records)
    which, chains = chains_to_score(records, encode, args.top_logprobs)
    if args.teacher:
        head = prefix.length if prefix else 0
        own = [len(p) + max(map(len, c), default=0) for p, c in zip(prompts, chains)]
        data.check_questions_fit(model.cfg, args.score, records, [head + n for n in own],
                                 lambda i: f"a header of {head:,} tokens + {own[i]:,} for its prompt and longest chain",
                                 "use fewer --shots or a shorter --prompt file")
    print(f"scoring   {sum(map(len, chains)):,} chains of {len(records):,} questions in {args.score}: {len(done):,} "
          f"questions already in {out}")
    bar = Progress(len(records), "score", start=len(done))
    sidecar = sidecar_writer(args, out, tokenizer, meta["prompt"], len(shot_ids)) if args.top_logprobs else None
    writer = ScoreWriter(out, args.out + ".runs.jsonl", records, done, bar, which=which, chains=chains, sidecar=sidecar,
                         client=None if args.teacher else client)
    with cli.stopping_cleanly(lambda: f"{bar.n:,} of {len(records):,} questions in {out}", bar):
        if args.teacher:
            todo = [k for k, batch in enumerate(batch_slices(len(records), args.batch_size))
                    if any(records[i]["id"] not in done for i in batch)]
            chain_logprobs(model, prompts, chains, prefix=prefix, batch_size=args.batch_size, batches=todo,
                           on_batch=writer, top_k=args.top_logprobs or 0)
        else:
            todo = [i for i, r in enumerate(records) if r["id"] not in done]
            score_served(args, client, tokenizer, tokenizer.encode(header).ids if header else [], records,
                         list(zip(prompts, chains)), todo, writer)
    bar.close()
    print(f"wrote     {out} ({len(records):,} questions, every chain scored); settings in {meta_path}"
          + (f"; top-{args.top_logprobs} in {sidecar.path} ({sidecar.path.stat().st_size / 2**20:,.1f} MiB)"
             if args.top_logprobs else ""))
    return out


def chains_to_score(records, encode, training_targets):
    """-> (per question, the indices of the rationales scored; per question, their chains' token ids). Every
    rationale as the corpus keeps it (chain_text); or with training_targets (--top-logprobs) each one a student could
    train on (mode cot, any answer), as its target, tokenised as train.py does -- the others counted and named."""
    if not training_targets:
        return ([list(range(len(rec["rationales"]))) for rec in records],
                [[encode(chain_text(rec, r)) for r in rec["rationales"]] for rec in records])
    skips = data.Skips()
    by_id = {r["id"]: ([], []) for r in records}
    for e in data.build_examples(records, "cot", "all", skips=skips):
        by_id[e["id"]][0].append(e["chain"])
        by_id[e["id"]][1].append(encode(e["target"]))
    if skips.counts:
        print(f"note      chains without a target a student trains on are not scored; {skips.summary()}")
    return [by_id[r["id"]][0] for r in records], [by_id[r["id"]][1] for r in records]


def score_served(args, client, tokenizer, head, records, work, todo, writer):
    """--score --api: each chain's ids (header + prompt + chain; work: per question its prompt's ids and its
    chains' ids) sent to the server, its prompt log-probabilities read at the chain's positions
    (api.Client.prompt_logprobs; the tokens' texts checked against --tokenizer), --concurrency questions at a time,
    handed to `writer` in question order as chain_logprobs' would be."""
    k = args.top_logprobs or 0

    def question(q):
        outs, (prompt, chains) = [], work[q]
        for c, chain in enumerate(chains):
            ids, start = head + prompt + chain, len(head) + len(prompt)
            what = f"question {records[q]['id']} chain {c + 1}"
            rows = client.prompt_logprobs(ids, max(k, 1), what)
            outs.append(distill.served_chain(rows[start:start + len(chain)], chain, k, tokenizer, what))
        return outs
    try:
        for q, outs in api.in_order(question, todo, args.concurrency):
            writer([q], [outs])
    finally:
        client.close()


TRAINING_TARGET = ("the training target (train.py --mode cot): the rationale, ' So the answer is (x) choice.', "
                   "a blank line")


def sidecar_writer(args, out, tokenizer, header_text, shots):
    """<out>.topk, continued where the corpus lines already written end; the teacher's tokenizer beside it
    (<out>.topk.tokenizer.json), so that a student of another tokenizer can align to it without the teacher."""
    beside = Path(args.out + ".topk.tokenizer.json")
    if not beside.exists():
        fileio.write_text(beside, tokenizer.to_str())
    spans = [r["topk"] for _, rec in data.read_appended(out) for r in rec.get("rationales", []) if "topk" in r]
    header = {"k": args.top_logprobs, "tokenizer": distill.tokenizer_fingerprint(tokenizer),
              "teacher": cli.portable(args.teacher) if args.teacher else f"{args.model} at {args.api}", "mode": "cot",
              "shots": shots, "prompt_sha256": hashlib.sha256(header_text.encode()).hexdigest()}
    return distill.SidecarWriter(Path(args.out + ".topk"), header, max((a + n for a, n in spans), default=0))


def settings(args, header, shot_ids):
    """<out>.meta.json: what decides the corpus (a rerun with other settings is refused). Not in it: what only
    decides how fast (--concurrency, --timeout, retries; the local batch size is, as it decides the seeds)."""
    socratic = args.socratic
    stop = "\\n, or after the question's ? (one question a turn)" if socratic else \
        "\n" if args.stop == "newline" else f"\n, or after {ANSWER_END}"
    sampling = {"n": args.n, "temperature": args.temperature, "top_p": args.top_p, "stop": stop,
                "max_new_tokens": args.max_new_tokens}
    if args.teacher:
        sampling |= {"batch_size": args.batch_size, "seed": args.seed}
        source = {"teacher": cli.portable(args.teacher)}
    else:
        sampling |= {"seed": args.seed}
        source = {"api": args.api, "model": args.model, "api_style": args.api_style}
    sampling |= {"logprobs": args.logprobs} | ({"min_correct": args.min_correct} if args.min_correct else {})
    meta = source | {"data": cli.portable(args.data), "exemplar_ids": shot_ids, "prompt": header, "sampling": sampling}
    return meta | ({"dtype": args.dtype} if args.teacher else {}) | ({"socratic": True} if socratic else {})


if __name__ == "__main__":
    cli.run(main)
