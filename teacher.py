"""Sample SCoTD's many-rationales corpus from a local teacher (SCoTD §2: N chains per training question).

The teacher (any folder checkpoint.py loads) is prompted with K worked examples in scotd.py's format --
the bundled PaLM rationales of K fixed train questions, which are left out of the output -- then each
question; it writes N chains per question at temperature T. The header is the same for every question,
so it is prefilled once (sample.generate(prefix=...)); each batch of questions is prefilled once and its
cache repeated to N rows. A chain ends after its answer sentence ("... So the answer is (d) bridge.") or at
its first newline (`--stop newline`: the newline only): in this format a rationale and its answer sentence
are one line, and instruct teachers go on after it, on the same line or the next, instead of stopping.

    python teacher.py --teacher ~/.cache/scotd/teachers/Qwen2.5-Coder-1.5B-Instruct --n 30 --limit 1000 \\
        --out data/csqa_qwen_train.jsonl

`--socratic` writes sub-questions instead (Socratic CoT, Shridhar et al. 2022, who generated them for
datasets without annotations): for each GSM8K *train* problem, one question per gold solution step -- the
question the step answers -- asked one step a turn (the text: the problem, the earlier steps each with its
question, then the next step; all turns of a batch continue one KV cache, so a turn prefills only the step
it appends: sample.generate_turns), from a 4-shot prompt hand-written on train problems 1-4 (SOCRATIC_SHOTS;
greedy by default). A problem's record then holds a Socratic rationale (data.py:
"sub-question ** step" lines, with `steps` and `subquestions`); a chain whose output for some step asks no
question is kept under the record's "rejected" with the reason, and gives no rationale (a counted skip).

    python teacher.py --socratic --teacher ~/.cache/scotd/teachers/Qwen2.5-Coder-1.5B-Instruct --limit 1000 \\
        --out data/gsm8k_socratic_train.jsonl

Output: canonical JSONL (data.py), one record per question with its N rationales, each with the teacher's
parsed `prediction` and `correct`; beside it `<out>.meta.json` holds the teacher, the prompt and the
sampling settings, and `<out>.runs.jsonl` the wall time: after every batch, the invocation's running total
(start, seconds, questions, tokens), so even a killed run leaves its time (`run_totals` reads it). Resumable: a question's line is written (and flushed) as soon as its
batch is done; the same command run again skips what is there, redoes a half-written last line, and gives
the file an uninterrupted run gives (batch k samples from seed (seed, k) whatever ran before it). Ctrl-C and
SIGTERM stop it cleanly (exit 130 / 143).
"""

import argparse
import json
import signal
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import cli
import data
from checkpoint import from_pretrained, load_tokenizer
from cli import InputError
from distributed import Dist
from model import DTYPES
from report import Progress
from sample import SampleConfig, batch_slices, generate, generate_turns, prefill
from scotd import ANSWER_END, fewshot_prefix, format_query, format_target, socratic_rationale

# Socratic sub-questions for the first GSM8K train problems, written for this prompt (never test problems)
SOCRATIC_SHOTS = {
    "gsm8k-train-1": ["How many clips did Natalia sell in May?",
                      "How many clips did Natalia sell altogether in April and May?"],
    "gsm8k-train-2": ["How much does Weng earn per minute?", "How much did Weng earn for 50 minutes of babysitting?"],
    "gsm8k-train-3": ["How much money does Betty have in the beginning?", "How much money did Betty's grandparents give her?",
                      "How much more money does Betty need to buy the wallet?"],
    "gsm8k-train-4": ["How many pages did Julie read today?", "How many pages has Julie read since yesterday?",
                      "How many pages are left to be read?", "How many pages should Julie read tomorrow?"],
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF-layout model folder")
    p.add_argument("--socratic", action="store_true", help="write sub-questions for GSM8K train solutions (see above)")
    p.add_argument("--data", default=None, help="questions (canonical JSONL); rationales there are ignored "
                   "(default: bundled CSQA train; GSM8K train with --socratic)")
    p.add_argument("--n", type=cli.positive_int, default=None, help="rationales per question (default: the paper's 30; "
                   "1 with --socratic)")
    p.add_argument("--temperature", type=cli.nonneg_float, default=None, help="default 1.0; 0 (greedy) with --socratic")
    p.add_argument("--top-p", type=cli.fraction, default=1.0)
    p.add_argument("--shots", type=cli.nonneg_int, default=4, help="worked examples in the prompt (bundled PaLM rationales)")
    p.add_argument("--prompt", default=None, help="a file with the few-shot header instead of --shots")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="the first N questions (after the exemplars)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None, help="default 96; 48 a question with --socratic")
    p.add_argument("--stop", default="answer", choices=("answer", "newline"),
                   help="end a chain after its answer sentence or at a newline (answer), or at a newline only")
    p.add_argument("--batch-size", type=cli.positive_int, default=4, help="questions per prefill (x n rows while sampling)")
    p.add_argument("--out", required=True, help="output JSONL (plain, appended as questions finish)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    defaults = dict(data=str(data.GSM8K_TRAIN), n=1, temperature=0.0, max_new_tokens=48) if args.socratic else \
        dict(data=str(data.DEFAULT_TRAIN), n=30, temperature=1.0, max_new_tokens=96)
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    cli.check_file(p, "--data", args.data)
    if args.socratic and Path(args.data).resolve() == data.GSM8K_TEST.resolve():
        p.error("argument --data: --socratic never prompts on test problems; use GSM8K train")
    cli.check_file(p, "--prompt", args.prompt)
    cli.check_device(p, args.device)
    if not (Path(args.teacher) / "config.json").is_file():
        p.error(f"argument --teacher: {args.teacher} is not a model folder (no config.json)")
    if args.out.endswith(".gz"):
        p.error("argument --out: write plain .jsonl (it is appended to as questions finish); gzip it afterwards")
    return args


def exemplars(k, source=data.DEFAULT_TRAIN):
    """K fixed worked examples: the first K questions of a bundled train corpus whose rationale is correct
    (CSQA's PaLM rationales; GSM8K's human solutions for numeric questions)."""
    chosen = []
    for rec in data.read_corpus(source):
        r = rec["rationales"][0] if rec["rationales"] else None
        if len(chosen) == k:
            break
        if r and r.get("correct") and r["text"].strip():
            choices = rec.get("choices")
            chosen.append((rec["id"], format_query(rec["question"], choices),
                           format_target("cot", choices, data.gold(rec), r["text"])))
    return chosen


def fewshot_header(shots):
    """The K-shot prompt every question follows: exemplars' (id, query, target) as worked examples."""
    return fewshot_prefix([(query, target) for _, query, target in shots])


ASKS = "Question it answers:"


def socratic_round(rec, asked):
    """The sub-question prompt for the step after the questions `asked` so far: the problem, each earlier
    step followed by the question it answers, then the next step and its question to write."""
    steps = rec["rationales"][0]["steps"]
    return (f"Problem: {rec['question']}\n" + "".join(f"Step: {s}\n{ASKS} {q}\n" for s, q in zip(steps, asked))
            + f"Step: {steps[len(asked)]}\n{ASKS}")


def socratic_header(records):
    """The 4-shot sub-question prompt: SOCRATIC_SHOTS's problems with every step and its question."""
    by_id = {r["id"]: r for r in records}
    return "".join(socratic_round(by_id[i], qs[:-1]) + f" {qs[-1]}\n\n" for i, qs in SOCRATIC_SHOTS.items())


def subquestion(output):
    """The teacher's line after "Question it answers:" -> the question (cut after its "?": instruct teachers
    go on with "To solve this, ..."), or None when the line asks nothing."""
    line = output.strip().split("\n")[0]
    return line[:line.index("?") + 1] if "?" in line else None


class Asking:
    """The sub-question dialogues of `rows` (GSM8K records with solution `steps`), one step a turn: a row's
    text starts as socratic_round(rec, []) -- the problem, step 1, and "Question it answers:" -- and after the
    teacher's question for step r (cut after its "?"), the turn appends step r + 1 and asks again, so the text
    is always socratic_round(rec, questions so far): one question a step (a teacher asked for all at once
    miscounts the steps). A row whose output asks nothing is stopped there, with the reason."""

    def __init__(self, rows):
        self.rows = rows
        self.asked, self.why, self.tokens = [[] for _ in rows], [None] * len(rows), [[] for _ in rows]

    def prompt(self, j):
        return socratic_round(self.rows[j], [])

    def turn(self, j, out):
        """Row j's output {"text", "tokens"} -> the text that follows it (the next step), or None: done."""
        self.tokens[j] += out["tokens"]
        steps, q = self.rows[j]["rationales"][0]["steps"], subquestion(out["text"])
        if q is None:
            self.why[j] = f"step {len(self.asked[j]) + 1}: not a question: {out['text'].strip()[:200]!r}"
            return None
        self.asked[j].append(q)
        return f"\nStep: {steps[len(self.asked[j])]}\n{ASKS}" if len(self.asked[j]) < len(steps) else None

    def chains(self):
        """-> per row {"subquestions", "why" (None when every step has its question), "tokens": all generated}."""
        return [{"subquestions": a, "why": w, "tokens": t} for a, w, t in zip(self.asked, self.why, self.tokens)]


def socratic_generate(model, tokenizer, records, header, cfg, batches, on_batch):
    """Asking's dialogues for each batch of problems (cfg.n chains each), all turns of a batch in one cache
    (sample.generate_turns: a turn prefills only the step it appends), the header prefilled once for the run;
    batch k samples from seed (cfg.seed, k). on_batch as sample.generate's."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    layout = batch_slices(len(records), cfg.batch_size)
    for k in batches:
        batch = list(layout[k])
        asking = Asking([records[i] for i in batch for _ in range(cfg.n)])
        prompts = [encode(asking.prompt(j)) for j in range(len(asking.rows))]
        need = max(len(p) + sum(len(encode(f"\nStep: {s}\n{ASKS}")) + cfg.max_new_tokens for s in rec["rationales"][0]["steps"])
                   for p, rec in zip(prompts, asking.rows))  # cache slots: every turn's tokens
        generate_turns([model], tokenizer, prompts, [replace(cfg, n=1, seed=cfg.seed * 1_000_003 + k)],
                       lambda j, _, out: None if (follow := asking.turn(j, out)) is None else encode(follow), need,
                       eos_id=model.cfg.eos_token_id, pad_id=model.cfg.pad_token_id, prefix=header)
        chains = asking.chains()
        on_batch(batch, [chains[j * cfg.n:(j + 1) * cfg.n] for j in range(len(batch))])


def rationales(rec, chains, socratic):
    """A question's sampled chains -> (its rationales, the rejected outputs with their reasons)."""
    if not socratic:
        return [data.teacher_rationale(c["text"], rec.get("choices"), rec["answer"]) for c in chains], []
    kept, rejected = [], []
    steps = rec["rationales"][0]["steps"]
    for c in chains:
        if c["why"]:
            rejected.append({"why": c["why"], "subquestions": c["subquestions"]})
        else:
            kept.append({"text": socratic_rationale(c["subquestions"], steps), "prediction": rec["answer"], "correct": True,
                         "steps": steps, "subquestions": c["subquestions"]})
    return kept, rejected


def done_ids(out):
    """Ids already in `out`; a half-written last line (a kill mid-write) is cut off, with a note."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]
    ids = set()
    for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            raise InputError(f"{out}:{n}: not a record this script wrote; move the file away or choose another --out") from None
    if len(keep) < len(raw):
        print(f"note      {out}: dropped a half-written last line ({len(raw) - len(keep)} bytes); it is redone")
        out.write_bytes(keep)
    return ids


def run_totals(out):
    """<out>.runs.jsonl -> one {started, seconds, questions, generated_tokens} per invocation (its last line)."""
    path = Path(str(out) + ".runs.jsonl")
    totals = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # cut by a kill -9: the line before it has that run's time
            continue
        totals[row["started"]] = row
    return list(totals.values())


class CorpusWriter:
    """generate()'s on_batch: each question's record appended and flushed as soon as its batch is done, then
    this invocation's running total appended to <out>.runs.jsonl."""

    def __init__(self, f, runs, records, done, bar, socratic=False):
        self.f, self.runs, self.records, self.done, self.bar, self.socratic = f, Path(runs), records, done, bar, socratic
        self.tokens, self.questions, self.t0 = 0, 0, time.time()
        self.started = datetime.fromtimestamp(self.t0, timezone.utc).isoformat(timespec="microseconds")  # the run's key

    def __call__(self, indices, outs):
        self.tokens += sum(len(c["tokens"]) for chains in outs for c in chains)  # the whole batch's, before the bar moves
        for i, chains in zip(indices, outs):
            rec = self.records[i]
            if rec["id"] in self.done:  # a batch redone after a kill mid-write: its first lines are there
                continue
            row = {key: rec[key] for key in ("id", "question", "choices", "answer") if key in rec}
            row["rationales"], rejected = rationales(rec, chains, self.socratic)
            if rejected:
                row["rejected"] = rejected
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.f.flush()
            self.questions += 1
            self.bar.update(1, f"{self.tokens / (time.time() - self.t0):,.0f} tok/s")
        with open(self.runs, "a") as runs:  # opened a batch at a time: an invocation with nothing to do writes nothing
            runs.write(json.dumps({"started": self.started, "seconds": round(time.time() - self.t0, 3),
                                   "questions": self.questions, "generated_tokens": self.tokens}) + "\n")


def _stop(signum, frame):
    raise KeyboardInterrupt(signum)  # SIGTERM stops like Ctrl-C: every finished question is already written


def main(argv=None):
    args = get_args(argv)
    _, device = Dist.init(args.device)
    cli.keep_freed_memory(device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    records = data.read_corpus(args.data)
    if args.socratic:
        for n, r in enumerate(records, 1):
            if "choices" in r or not (r["rationales"] and r["rationales"][0].get("steps")):
                raise InputError(f"{args.data}:{n}: --socratic needs numeric problems whose first rationale has "
                                 "its solution `steps` (data.py import-gsm8k writes them)")
        shot_ids = [] if args.prompt else list(SOCRATIC_SHOTS)
        header = Path(args.prompt).read_text() if args.prompt else socratic_header(data.read_corpus(data.GSM8K_TRAIN))
    else:
        shots = [] if args.prompt else exemplars(args.shots, data.train_corpus_of(records))  # of the same task
        shot_ids = [i for i, _, _ in shots]
        header = Path(args.prompt).read_text() if args.prompt else fewshot_header(shots)
    records = [r for r in records if r["id"] not in shot_ids]
    records = records[:args.limit] if args.limit else records

    out, meta_path = Path(args.out), Path(args.out + ".meta.json")
    stop = "\n" if args.stop == "newline" else f"\n, or after {ANSWER_END}"
    meta = {"teacher": cli.portable(args.teacher), "data": cli.portable(args.data), "exemplar_ids": shot_ids, "prompt": header,
            "sampling": {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                         "stop": "\\n, or after the question's ? (one question a turn)" if args.socratic else stop,
                         "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": args.seed},
            "dtype": args.dtype} | ({"socratic": True} if args.socratic else {})
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise InputError(f"{meta_path}: {out} was sampled with other settings; use the same flags, or another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    done = done_ids(out)

    model = from_pretrained(args.teacher, device=device, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer(args.teacher)
    prefix = tokenizer.encode(header).ids
    cfg = SampleConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                       stop=("\n",),
                       stop_after=(r"\?",) if args.socratic else (ANSWER_END,) if args.stop == "answer" else (),
                       batch_size=args.batch_size, seed=args.seed)
    todo = [k for k, batch in enumerate(batch_slices(len(records), args.batch_size))
            if any(records[i]["id"] not in done for i in batch)]
    print(f"teacher   {args.teacher} on {device}, {args.dtype}; {len(shot_ids) or 'custom'}-shot "
          f"{'sub-question ' if args.socratic else ''}header of {len(prefix)} tokens")
    print(f"questions {len(records):,} from {args.data}: {len(done):,} already in {out}, {len(records) - len(done):,} to sample "
          f"x {args.n} chains (T={args.temperature})")
    bar = Progress(len(records), "teacher", start=len(done))
    writer = CorpusWriter(open(out, "a", encoding="utf-8"), args.out + ".runs.jsonl", records, done, bar,
                          args.socratic)
    signal.signal(signal.SIGTERM, _stop)
    try:
        if args.socratic:  # a question a step, turn by turn, from the header's one prefill
            socratic_generate(model, tokenizer, records, prefill(model, prefix), cfg, todo, writer)
        else:
            prompts = [tokenizer.encode(format_query(r["question"], r.get("choices")), add_special_tokens=False).ids
                       for r in records]
            generate(model, tokenizer, prompts, cfg, eos_id=model.cfg.eos_token_id, pad_id=model.cfg.pad_token_id,
                     batches=todo, prefix=prefix, on_batch=writer)
    except KeyboardInterrupt as e:
        bar.close()
        print(f"stopped: {bar.n:,} of {len(records):,} questions in {out}; run the same command to continue")
        raise SystemExit(128 + signal.SIGTERM if e.args == (signal.SIGTERM,) else 130)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        writer.f.close()
    bar.close()
    print(f"wrote     {out} ({len(records):,} questions x {args.n} rationales); settings in {meta_path}")
    print(f"next      python data.py stats {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
