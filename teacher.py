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
from pathlib import Path

import cli
import data
from checkpoint import from_pretrained, load_tokenizer
from cli import InputError
from distributed import Dist
from model import DTYPES
from report import Progress
from sample import SampleConfig, batch_slices, generate
from scotd import ANSWER_END, fewshot_prefix, format_query, format_target


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF-layout model folder")
    p.add_argument("--data", default=str(data.DEFAULT_TRAIN), help="questions (canonical JSONL); rationales there are ignored")
    p.add_argument("--n", type=cli.positive_int, default=30, help="rationales per question (the paper's 30)")
    p.add_argument("--temperature", type=cli.nonneg_float, default=1.0)
    p.add_argument("--top-p", type=cli.fraction, default=1.0)
    p.add_argument("--shots", type=cli.nonneg_int, default=4, help="worked examples in the prompt (bundled PaLM rationales)")
    p.add_argument("--prompt", default=None, help="a file with the few-shot header instead of --shots")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="the first N questions (after the exemplars)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=96)
    p.add_argument("--stop", default="answer", choices=("answer", "newline"),
                   help="end a chain after its answer sentence or at a newline (answer), or at a newline only")
    p.add_argument("--batch-size", type=cli.positive_int, default=4, help="questions per prefill (x n rows while sampling)")
    p.add_argument("--out", required=True, help="output JSONL (plain, appended as questions finish)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    cli.check_file(p, "--data", args.data)
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

    def __init__(self, f, runs, records, done, bar):
        self.f, self.runs, self.records, self.done, self.bar = f, runs, records, done, bar
        self.tokens, self.questions, self.t0 = 0, 0, time.time()

    def __call__(self, indices, outs):
        for i, chains in zip(indices, outs):
            rec = self.records[i]
            if rec["id"] in self.done:  # a batch redone after a kill mid-write: its first lines are there
                continue
            row = {key: rec[key] for key in ("id", "question", "choices", "answer") if key in rec}
            row["rationales"] = [data.teacher_rationale(c["text"], rec.get("choices"), rec["answer"]) for c in chains]
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.f.flush()
            self.tokens += sum(len(c["tokens"]) for c in chains)
            self.questions += 1
            self.bar.update(1, f"{self.tokens / (time.time() - self.t0):,.0f} tok/s")
        self.runs.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.t0)),
                                    "seconds": round(time.time() - self.t0, 3), "questions": self.questions,
                                    "generated_tokens": self.tokens}) + "\n")
        self.runs.flush()


def _stop(signum, frame):
    raise KeyboardInterrupt(signum)  # SIGTERM stops like Ctrl-C: every finished question is already written


def main(argv=None):
    args = get_args(argv)
    _, device = Dist.init(args.device)
    cli.keep_freed_memory(device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    records = data.read_corpus(args.data)
    shots = [] if args.prompt else exemplars(args.shots, data.train_corpus_of(records))  # of the same task
    header = Path(args.prompt).read_text() if args.prompt else fewshot_header(shots)
    records = [r for r in records if r["id"] not in {i for i, _, _ in shots}]
    records = records[:args.limit] if args.limit else records

    out, meta_path = Path(args.out), Path(args.out + ".meta.json")
    meta = {"teacher": str(args.teacher), "data": args.data, "exemplar_ids": [i for i, _, _ in shots], "prompt": header,
            "sampling": {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                         "stop": "\n" if args.stop == "newline" else f"\n, or after {ANSWER_END}",
                         "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": args.seed},
            "dtype": args.dtype}
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise InputError(f"{meta_path}: {out} was sampled with other settings; use the same flags, or another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    done = done_ids(out)

    model = from_pretrained(args.teacher, device=device, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer(args.teacher)
    prompts = [tokenizer.encode(format_query(r["question"], r.get("choices")), add_special_tokens=False).ids for r in records]
    prefix = tokenizer.encode(header).ids
    cfg = SampleConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                       stop=("\n",), stop_after=(ANSWER_END,) if args.stop == "answer" else (), batch_size=args.batch_size,
                       seed=args.seed)
    todo = [k for k, batch in enumerate(batch_slices(len(records), args.batch_size))
            if any(records[i]["id"] not in done for i in batch)]
    print(f"teacher   {args.teacher} on {device}, {args.dtype}; {len(shots) or 'custom'}-shot header of {len(prefix)} tokens")
    print(f"questions {len(records):,} from {args.data}: {len(done):,} already in {out}, {len(records) - len(done):,} to sample "
          f"x {args.n} chains (T={args.temperature})")
    bar = Progress(len(records), "teacher", start=len(done))
    writer = CorpusWriter(open(out, "a", encoding="utf-8"), open(args.out + ".runs.jsonl", "a"), records, done, bar)
    signal.signal(signal.SIGTERM, _stop)
    try:
        generate(model, tokenizer, prompts, cfg, eos_id=model.cfg.eos_token_id, pad_id=model.cfg.pad_token_id,
                 batches=todo, prefix=prefix, on_batch=writer)
    except KeyboardInterrupt as e:
        bar.close()
        print(f"stopped: {bar.n:,} of {len(records):,} questions in {out}; run the same command to continue")
        raise SystemExit(128 + signal.SIGTERM if e.args == (signal.SIGTERM,) else 130)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        writer.f.close()
        writer.runs.close()
    bar.close()
    print(f"wrote     {out} ({len(records):,} questions x {args.n} rationales); settings in {meta_path}")
    print(f"next      python data.py stats {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
