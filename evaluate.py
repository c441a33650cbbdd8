"""Evaluate a student: greedy accuracy and self-consistency (SCoTD §3: sample N chains, majority vote).

    python evaluate.py                                   # newest runs/*/best on bundled CSQA validation
    python evaluate.py --checkpoint runs/cot/best --n 30 --temperature 0.7
    python evaluate.py --data contrast_set.jsonl         # any corpus in the canonical format
    torchrun --nproc_per_node 4 evaluate.py ...          # questions sharded over ranks, same result
    python evaluate.py --checkpoint runs/solve/last --decomposer runs/decompose/last --data data/gsm8k_test.jsonl.gz
                                                         # Socratic CoT, two models (socratic_chains)
    python evaluate.py --report runs/cot/eval/predictions-csqa_palm_validation.jsonl   # the report again, no model

Writes, next to the checkpoint, predictions JSONL (every chain, its parsed answer and log-probability, the vote,
the gold answer), then everything else from that file alone (`summarize`): a table (greedy and voted accuracy
with bootstrap intervals, exact maj@k and pass@k, one chain, the likeliest chain and a likelihood-weighted vote,
the vote's calibration, abstentions, tokens/s), summary-<data>.json, a plot of maj@k and pass@k and a reliability
plot. A warning comes first when the questions overlap the checkpoint's training data (its scotd.json says which).
An interrupted run goes on where it stopped: run the same command again (finished batches wait in
<out>/partial-<data>.jsonl). Ctrl-C and SIGTERM stop it cleanly (exit 130 / 143), saying what is kept.
"""

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import cli
import fileio
import data
from fileio import InputError
from checkpoint import (PACKAGED, check_model_folder, from_pretrained, is_hub_id, load_tokenizer, read_run_info,
                        recover_folder)
from distributed import Dist
from model import DTYPES
from report import Progress, bootstrap_ci, calibration, plot_lines
from answers import answers_of, greedy, socratic_chains
from sample import SampleConfig, batch_slices, generate
from scotd import (LABEL_FIRST, LETTERS, MODES, SOCRATIC_ROLES, fewshot_prefix, kind_of, maj_at_k, majority_vote,
                   pass_at_k, vote_curve)

CPU_DEFAULT_LIMIT = 100  # questions: greedy + N=10 chains in about 3.5 minutes on 2 cores (SmolLM2-135M)


def get_args(argv=None):
    return cli.get_args(parser, check_args, argv)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="HF-layout folder, or a hub id in the local Hugging Face "
                   "cache (default: the newest runs/*/best)")
    p.add_argument("--data", default=str(data.DEFAULT_DEV),
                   help="canonical corpus JSONL(.gz) (default: CSQA validation)")
    p.add_argument("--mode", default=None, choices=MODES, help="target mode (default: the one it was trained with)")
    p.add_argument("--decomposer", default=None, help="Socratic CoT: this model writes the sub-questions, --checkpoint "
                   "(trained with --mode solve) answers them (default: none, one model)")
    p.add_argument("--max-rounds", type=cli.positive_int, default=10,
                   help="Socratic: sub-questions per chain at most (default 10)")
    p.add_argument("--n", "--chains", dest="n", type=cli.nonneg_int, default=10,
                   help="chains per question for self-consistency (0 = greedy only; default 10); under torchrun "
                   "write --chains")
    p.add_argument("--temperature", type=cli.nonneg_float, default=0.7,
                   help="of the sampled chains; 0 = greedy chains (default 0.7)")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True,
                   help="decode greedily first (--no-greedy: the sampled chains alone, for a caller that has the "
                   "greedy run)")
    p.add_argument("--top-p", type=cli.fraction, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--top-k", type=cli.nonneg_int, default=0, help="0 = off (the default)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=96, help="per chain (default 96)")
    p.add_argument("--limit", type=cli.nonneg_int, default=None,
                   help=f"first N questions, 0 = all (default: all on GPU, {CPU_DEFAULT_LIMIT} on CPU)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8,
                   help="questions per prefill (x n rows while sampling; default 8)")
    cli.add_device_flags(p, "the decode step, on CUDA replayed as CUDA graphs")
    p.add_argument("--seed", type=int, default=0, help="of the sampled chains (default 0)")
    p.add_argument("--fewshot", type=cli.nonneg_int, default=0,
                   help="prefix K worked train examples (for untuned models; default 0)")
    p.add_argument("--report", default=None, metavar="PREDICTIONS", help="recompute the report (table, plots, summary) "
                   "from a predictions file an evaluation wrote, without a model; --out: where (default: beside it)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>/../eval; for a hub id or a "
                   "packaged student, runs/eval-NAME)")
    return p


def check_args(p, args):
    """Everything that can be checked before anything loads (argparse's message, exit 2)."""
    if args.report:
        cli.check_file(p, "--report", args.report)
        return args
    if not args.greedy and args.n == 0:
        p.error("--no-greedy with --n 0 leaves nothing to decode")
    cli.check_file(p, "--data", args.data)
    cli.check_device(p, args.device)
    args.compile = cli.default_compile(cli.device_type(args.device), args.compile)
    if args.checkpoint is None:
        found = sorted(Path("runs").glob("*/best/config.json"), key=lambda f: f.stat().st_mtime)
        if not found:
            p.error("no checkpoint found under runs/*/best: run `python train.py` first, or pass --checkpoint")
        args.checkpoint = found[-1].parent
    if not Path(args.checkpoint).exists() and (is_hub_id(args.checkpoint) or str(args.checkpoint) in PACKAGED):
        args.out = args.out or f"runs/eval-{str(args.checkpoint).split('@')[0].replace('/', '--')}"  # not into a cache
    args.checkpoint = Path(check_model_folder(p, "--checkpoint", recover_folder(args.checkpoint)))
    args.decomposer = check_model_folder(p, "--decomposer", args.decomposer)
    return args


class Journal:
    """<out>/partial-<data>.jsonl: each finished batch's outputs, appended as the batch ends, so that an
    interrupted evaluation (a killed session, Ctrl-C, a crash) goes on where it stopped: the same command
    decodes only the batches the journal lacks and, batch k sampling from its own seed, writes what one
    uninterrupted run writes. Line 1 is the run's settings (every flag but --out, the weights' file sizes
    and times); a journal of other settings is discarded, never mixed in. Removed once the predictions
    are written. path None (under torchrun): kept in memory only.

    `run` is the batch loop itself: it decodes this rank's batches that the journal lacks, one at a time, and
    journals each as it ends."""

    def __init__(self, path, settings, dist, log):
        self.path, self.dist, self.done = path, dist, {}  # (step, batch k) -> {"seconds", "outs"}
        if path is None:
            return
        settings = json.loads(json.dumps(settings))
        try:  # a cut last line (a kill mid-write) is left out: that batch is decoded again
            rows = [row for _, row in data.read_appended(path)]
        except InputError as e:
            raise InputError(f"{e}; delete the file to start this evaluation over") from None
        if rows and rows[0] == {"settings": settings}:
            if cut := data.drop_partial_line(path):  # a batch cut by a kill is decoded again, its line appended after
                log(f"note      {path}:{len(rows) + 1}: its last line was cut ({cut:,} bytes, a run killed while "
                    "writing it): that batch is decoded again")
            self.done = {(r["step"], r["batch"]): r for r in rows[1:]}
            log(f"resume    {len(self.done):,} finished batches from {path} (an interrupted run of these settings)")
            return
        if rows:
            log(f"note      {path}: an interrupted run with other settings, discarded")
        fileio.write_text(path, json.dumps({"settings": settings}) + "\n")

    def add(self, step, k, seconds, outs):
        row = {"step": step, "batch": k, "seconds": round(seconds, 3), "outs": outs}
        self.done[(step, k)] = row
        if self.path is not None:  # fsync'd: a crash of the machine keeps the batch too
            fileio.append_text(self.path, json.dumps(row, ensure_ascii=False) + "\n", sync=True)

    def run(self, step, label, n_prompts, batch_size, decode_batch):
        """decode_batch(k) -> the outputs of question batch k (batch_slices), for each of this rank's batches (every
        world-th: batch k samples from its own seed, so any number of ranks gives the one-process result) that
        the journal lacks, with a progress bar on rank 0 -> (outputs, None where another rank has the question;
        seconds spent decoding them, this run's and the interrupted runs' together)."""
        layout = batch_slices(n_prompts, batch_size)
        mine = range(self.dist.rank, len(layout), self.dist.world)
        todo = [k for k in mine if (step, k) not in self.done]
        bar = Progress(n_prompts, label, start=sum(len(layout[k]) for k in mine if k not in todo) * self.dist.world) \
            if self.dist.main else None
        try:
            for k in todo:
                t0 = time.time()
                outs = decode_batch(k)
                self.add(step, k, time.time() - t0, outs)
                if bar:
                    bar.update(len(layout[k]) * self.dist.world)
        finally:  # also when stopped: the stop's line comes after the bar's
            if bar:
                bar.close()
        outs = [None] * n_prompts
        for k in mine:
            outs[layout[k].start:layout[k].stop] = self.done[(step, k)]["outs"]
        return outs, sum(self.done[(step, k)]["seconds"] for k in mine)

    def kept(self):
        """What a stopped evaluation keeps (cli.stopping_cleanly): the whole lines on disk, counted there, whichever
        statement the stop came in (a batch's line written and its row not yet remembered, say)."""
        if self.path is None:
            return "under torchrun the journal is kept in memory only: nothing kept"
        whole = max(self.path.read_bytes().count(b"\n") - 1, 0) if self.path.exists() else 0
        return f"{whole:,} finished batches kept in {self.path}"

    def close(self):
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def merge(shares):
    """Each rank's outputs (None where another rank had the question) -> one list."""
    return [next(s[i] for s in shares if s[i] is not None) for i in range(len(shares[0]))]


def only(k, batch_size, outs):
    """Batch k's outputs from a decoding call that decoded batch k alone."""
    return outs[k * batch_size:(k + 1) * batch_size]


class Decoded(NamedTuple):
    """What an evaluation decoded: per question the greedy output and the sampled chains (None: not asked for),
    and the seconds each took."""
    greedy: list | None
    greedy_s: float
    chains: list | None
    chains_s: float


def sample_chains(args, mode, model, tokenizer, prompts, journal):
    """Greedy chains, then args.n sampled chains a question -> Decoded. For label-first students ("post", "label")
    greedy stops after the answer sentence: the fast path."""
    batch = max(args.batch_size, 16)
    greedy_outs, greedy_s = None, 0.0
    if args.greedy:
        label = "greedy (answer only)" if mode in LABEL_FIRST else "greedy"
        cfg = SampleConfig(max_new_tokens=args.max_new_tokens, batch_size=batch, seed=args.seed, compile=args.compile)
        greedy_outs, greedy_s = journal.run("greedy", label, len(prompts), batch, lambda k: only(k, batch, greedy(
            model, tokenizer, prompts, mode, cfg, batches=[k])))
    chains, sc_s = None, 0.0
    if args.n > 0:
        cfg = SampleConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                           compile=args.compile, logprobs=True).for_model(model)  # each chain's likelihood, too
        chains, sc_s = journal.run("chains", f"sample N={args.n}", len(prompts), args.batch_size, lambda k: only(
            k, args.batch_size, generate(model, tokenizer, prompts, cfg, batches=[k])))
    return Decoded(greedy_outs, greedy_s, chains, sc_s)


def socratic(args, mode, solver, tokenizer, queries, dist, journal):
    """sample_chains' counterpart for Socratic CoT: --checkpoint the solver, --decomposer the decomposer (loaded on
    the solver's device, in its dtype)."""
    if mode != "solve" or not args.decomposer:
        raise InputError(f"Socratic CoT needs two models: --checkpoint trained with --mode solve (this one: {mode}) "
                         "and --decomposer trained with --mode decompose")
    if dist.world > 1:
        raise InputError("--decomposer runs in one process; run it without torchrun")
    weight = next(solver.parameters())
    decomposer = from_pretrained(args.decomposer, device=weight.device, dtype=weight.dtype)
    results = []
    rows = args.batch_size * max(args.n, 1)  # greedy runs as many rows at a time as sampling does
    for step, n, temperature, label in (("greedy", int(args.greedy), 0.0, "socratic greedy"),
                                        ("chains", args.n, args.temperature, f"socratic N={args.n}")):
        if n == 0:
            results += [None, 0.0]
            continue
        cfg = SampleConfig(n=n, temperature=temperature, top_p=args.top_p, top_k=args.top_k, batch_size=rows // n,
                           max_new_tokens=args.max_new_tokens, seed=args.seed)
        results += journal.run(step, label, len(queries), cfg.batch_size, lambda k: next(socratic_chains(
            decomposer, solver, tokenizer, queries, cfg, args.max_rounds, batches=[k]))[1])
    return Decoded(*results)


def settings_of(args, device):
    """What an evaluation's outputs depend on (a Journal's first line): every flag but --out, and the size and
    time of each weights file it reads."""
    settings = {k: str(v) for k, v in sorted(vars(args).items()) if k != "out"} | {"device_type": device.type}
    for flag in ("checkpoint", "decomposer"):
        if getattr(args, flag):
            settings[f"{flag} weights"] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                           for f in sorted(Path(getattr(args, flag)).glob("*.safetensors"))]
    return settings


def main(argv=None):
    args = get_args(argv)  # every flag checked before anything loads
    if args.report:
        return recompute(Path(args.report), Path(args.out) if args.out else Path(args.report).parent)
    out = Path(args.out) if args.out else args.checkpoint.parent / "eval"
    with fileio.one_writer(out, rank0=os.environ.get("RANK", "0") == "0"):  # one evaluation writes an --out
        return evaluation(args, out)


def evaluation(args, out):
    """Load, decode (greedy, then the sampled chains; through the journal), gather, write and report."""
    dist, device = Dist.init(args.device)
    cli.keep_freed_memory(device)
    log = print if dist.main else (lambda *a, **k: None)
    dtype = cli.default_dtype(device.type, args.dtype)
    mode = args.mode or read_run_info(args.checkpoint).get("mode")
    if mode is None:
        log(f"note      {args.checkpoint} has no scotd.json (not written by train.py): assuming --mode cot")
        mode = "cot"
    torch.manual_seed(args.seed)
    model = from_pretrained(args.checkpoint, device=device, dtype=DTYPES[dtype])
    tokenizer = load_tokenizer(args.checkpoint)
    records, total, prefix = questions(args, mode, device)
    queries = [prefix + data.format_query(r["question"], r.get("choices")) for r in records]
    shots = f", {args.fewshot}-shot" if args.fewshot else ""
    log(f"model     {args.checkpoint} ({mode} mode{shots}) on {device}, {dtype}")
    log(f"data      {args.data}: {len(records):,} of {total:,} questions"
        f"{' (a subset sized for CPU; --limit 0 for all)' if len(records) < total else ''}")

    overlap = training_overlap(args.checkpoint, records, log)
    prompts = [tokenizer.encode(q).ids for q in queries]
    fewshot = f" with {args.fewshot} worked examples" if args.fewshot else ""
    data.check_questions_fit(model.cfg, args.data, records, [len(p) + args.max_new_tokens for p in prompts],
                             lambda i: f"{len(prompts[i]):,} prompt tokens{fewshot} + --max-new-tokens "
                                       f"{args.max_new_tokens}",
                             f"{'use fewer --fewshot examples or ' if args.fewshot else ''}lower --max-new-tokens")
    stem = Path(args.data).name.split(".")[0]
    journal = Journal(out / f"partial-{stem}.jsonl" if dist.world == 1 else None, settings_of(args, device), dist, log)
    with cli.stopping_cleanly(journal.kept):  # Ctrl-C, SIGTERM: exit 130 / 143, the finished batches kept
        if mode in SOCRATIC_ROLES or args.decomposer:
            decoded = socratic(args, mode, model, tokenizer, queries, dist, journal)
            mode = "cot"  # the chains read as a unified model's: the answer after the last "answer is"
        else:
            decoded = sample_chains(args, mode, model, tokenizer, prompts, journal)
    if dist.world > 1:  # one gather for the whole run; rank 0 has everything and writes it
        shares = dist.gather((decoded.greedy, decoded.chains))
        decoded = decoded._replace(greedy=merge([g for g, _ in shares]) if decoded.greedy is not None else None,
                                   chains=merge([c for _, c in shares]) if decoded.chains is not None else None)
        log(f"gathered  {len(records):,} questions' outputs from {dist.world} ranks (one all-gather)")
    if dist.main:
        report(args, out, stem, records, decoded, {"mode": mode, "device": str(device), "dtype": dtype,
                                                   **({"overlap": overlap} if overlap else {})})
        journal.close()  # everything it held is in the predictions
    dist.close()
    return out


def training_overlap(checkpoint, records, log):
    """How many evaluated questions the checkpoint was trained on, or chose its best step on (its scotd.json says
    both) -> {"training": n, "dev": n} when any, after a one-line warning; None when none or unknown."""
    info = read_run_info(checkpoint)
    if not info:
        return None
    if "dev" not in info:
        if Path(checkpoint).name == "best":
            log(f"note      {checkpoint} was trained before dev questions were held out of --data: it may have been "
                "chosen on validation questions")
        return None
    trained = Path(info["args"]["data"])
    if not trained.is_file():
        log(f"note      {trained} (its training data) is not here: overlap with it not checked")
        return None
    by_id, by_text = data.overlap(records, data.read_corpus(trained))
    dev = len({r["id"] for r in records} & set(info["dev"]["ids"]))
    if not by_id + by_text:
        return None
    log(f"warning   {by_id + by_text:,} of the {len(records):,} evaluated questions are in {checkpoint}'s training "
        f"data {trained} ({by_id} by id, {by_text} by text; {dev} of them its dev questions): not a held-out result")
    return {"training": by_id + by_text, "dev": dev}


def recompute(predictions, out):
    """--report: the report of a predictions file, recomputed from it alone (the run's settings and speeds from the
    summary beside it, when there is one). A file that lost its end (a copy cut short) is reported for the
    questions it holds, saying so in a warning, the table and the summary ("incomplete")."""
    stem = predictions.name.removeprefix("predictions-").split(".")[0]
    beside = predictions.with_name(f"summary-{stem}.json")
    before = json.loads(beside.read_text()) if beside.exists() else {}
    rows, incomplete = read_predictions(predictions, before.get("questions"))
    derived = summarize(rows) | ({"incomplete": incomplete} if incomplete else {})
    if incomplete:
        print(f"warning   {predictions}: {incomplete}: the report covers only the questions it holds")
    meta = {k: v for k, v in before.items() if k not in derived and k != "vote_curve"}
    with fileio.one_writer(out):
        write_report(rows, meta, out, stem, derived)
    return out


def read_predictions(path, counted=None):
    """The rows of a predictions file, each checked (a line that is not one names file:line) -> (rows, None; or,
    when the file is not whole, what is missing: "N of M lines, line M cut" for a cut last line, "N of M questions"
    when the summary beside it counted M). A last line whole but for its newline is read."""
    lines, tail = data.read_cut(path)
    rows, where = [row for _, row in lines], [f"{path}:{n}" for n, _ in lines]
    incomplete = None
    if tail.strip():
        try:
            rows.append(json.loads(tail.decode("utf-8")))
            where.append(f"{path}:{len(lines) + 1}")
        except ValueError:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
            incomplete = f"{len(rows):,} of {len(rows) + 1:,} lines, line {len(rows) + 1} cut"
    if incomplete is None and isinstance(counted, int) and counted > len(rows):
        incomplete = f"{len(rows):,} of {counted:,} questions (its summary counted {counted:,})"
    if not rows:
        raise InputError(f"{path}: no complete predictions line{f' ({incomplete})' if incomplete else ''}")
    for row, at in zip(rows, where):
        check_prediction(row, at, rows[0])
    return rows, incomplete


PREDICTION_KEYS = {"greedy": ("greedy", "greedy_correct"), "chains": ("chains", "vote", "vote_correct")}


def check_prediction(row, where, first):
    """A predictions row as prediction_rows writes it, with the same parts (greedy, chains) as the first row;
    else an InputError naming file:line."""
    if not isinstance(row, dict) or "gold" not in row:
        raise InputError(f"{where}: not a predictions line evaluate.py wrote (no 'gold')")
    for part, keys in PREDICTION_KEYS.items():
        if (part in row) != (part in first):
            raise InputError(f"{where}: {'has' if part in row else 'lacks'} '{part}', which the first line "
                             f"{'lacks' if part in row else 'has'}: lines of two evaluations?")
        missing = [k for k in keys if part in row and k not in row]
        if missing:
            raise InputError(f"{where}: '{part}' without {', '.join(map(repr, missing))}")
    if "chains" in row and not (isinstance(row["chains"], list) and all(
            isinstance(c, dict) and "answer" in c and isinstance(c.get("tokens"), int) for c in row["chains"])):
        raise InputError(f"{where}: 'chains' must be a list of {{'answer', 'tokens', ...}} objects")


def questions(args, mode, device):
    """The evaluated questions (--limit's first N; by default all on a GPU, CPU_DEFAULT_LIMIT on a CPU) ->
    (records, the corpus's size, the --fewshot prefix: worked examples from the same task's train split)."""
    records = data.read_corpus(args.data)
    limit = args.limit if args.limit is not None else (0 if device.type == "cuda" else CPU_DEFAULT_LIMIT)
    prefix = ""
    if args.fewshot:
        corpus = data.train_corpus_of(records, "--fewshot 0")
        exemplars = data.build_examples(data.read_corpus(corpus)[:100], mode, "correct")
        prefix = fewshot_prefix([(x["query"], x["target"]) for x in exemplars[:args.fewshot]])
    return (records[:limit] if limit else records), len(records), prefix


def report(args, out, stem, records, decoded, setup):
    """The predictions file, then everything else computed from it alone (`summarize`: what --report recomputes):
    the table (printed), the plots and the summary JSON. setup: the mode the chains are read in, the device and
    dtype, and the overlap with the training data where there is some."""
    golds, mode, greedy_outs, chains = [data.gold(r) for r in records], setup["mode"], decoded.greedy, decoded.chains
    greedy_answers = [a[0] for a in answers_of(mode, greedy_outs, records)] if greedy_outs else None
    answers = answers_of(mode, chains, records) if chains else None
    rows = prediction_rows(records, golds, greedy_outs, greedy_answers, chains, answers)
    preds_path = fileio.write_text(out / f"predictions-{stem}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    speed = {}
    if greedy_outs:
        speed["greedy_tok_s"] = sum(len(o[0]["tokens"]) for o in greedy_outs) / max(decoded.greedy_s, 1e-9)
    if chains:
        speed |= {"sampling_tok_s": sum(len(c["tokens"]) for o in chains for c in o) / max(decoded.chains_s, 1e-9),
                  "sampling_seconds": decoded.chains_s}
    meta = {"checkpoint": str(args.checkpoint), "mode": mode, "answer_type": kind_of(records[0]),
            "data": str(args.data), "n": args.n, "fewshot": args.fewshot, "temperature": args.temperature,
            "device": setup["device"], "dtype": setup["dtype"], **speed,
            **({"overlap": setup["overlap"]} if setup.get("overlap") else {})}
    write_report(rows, meta, out, stem)
    print(f"\npredictions {preds_path}")


def write_report(rows, meta, out, stem, derived=None):
    """summarize(rows) (or `derived`, already computed from them) -> the printed table, the plots (maj@k and pass@k;
    reliability) and summary-<stem>.json."""
    summary = meta | (derived or summarize(rows))
    cut = f" ({summary['incomplete']})" if summary.get("incomplete") else ""
    kind = f" ({summary['answer_type']} answers)" if summary.get("answer_type") else ""
    print(f"\n{summary['questions']:,} questions{cut} from {meta.get('data', stem)}{kind}, {meta.get('device', '?')}, "
          f"{meta.get('dtype', '?')}\n" + "\n".join(table(summary)))
    if "maj_at_k" in summary:
        ks, n = list(range(1, len(summary["maj_at_k"]) + 1)), summary["questions"]
        band = lambda p: ([100 * max(0.0, x - 1.96 * (x * (1 - x) / n) ** 0.5) for x in p],  # noqa: E731
                          [100 * min(1.0, x + 1.96 * (x * (1 - x) / n) ** 0.5) for x in p])
        lines = {"majority of k (maj@k)": (ks, [100 * x for x in summary["maj_at_k"]]),
                 "any of k right (pass@k)": (ks, [100 * x for x in summary["pass_at_k"]])}
        if summary.get("greedy_acc") is not None:
            lines["greedy"] = ([1, ks[-1]], [100 * summary["greedy_acc"]] * 2)
        plot_lines(out / f"vote-curve-{stem}.png", lines, "chains (k), drawn from the N sampled", "accuracy (%)",
                   f"self-consistency on {stem} ({n} questions), 95 % bands",
                   bands={k: band(summary[k2]) for k, k2 in (("majority of k (maj@k)", "maj_at_k"),
                                                              ("any of k right (pass@k)", "pass_at_k"))}, ylim=(0, 100))
        bins = [b for b in summary["calibration"]["bins"] if b["n"]]
        plot_lines(out / f"reliability-{stem}.png", {"the vote": ([100 * b["share"] for b in bins],
                                                              [100 * b["accuracy"] for b in bins]),
                                                 "calibrated": ([0, 100], [0, 100])},
                   "the winning answer's share of the N votes (%)", "accuracy (%)",
                   f"calibration of the vote, ECE {summary['calibration']['ece']:.3f}", ylim=(0, 100))
    fileio.write_text(out / f"summary-{stem}.json", json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(rows):
    """Every number of the report, from the predictions rows alone (answers as shown: letters or numbers)."""
    out = {"questions": len(rows), "greedy_acc": None}
    if rows and "greedy" in rows[0]:
        right = [float(r["greedy_correct"]) for r in rows]
        out |= {"greedy_acc": float(np.mean(right)), "greedy_acc_ci": bootstrap_ci(right),
                "greedy_abstentions": float(np.mean([r["greedy"]["answer"] is None for r in rows]))}
    if not rows or "chains" not in rows[0]:
        return out
    answers = [[c["answer"] for c in r["chains"]] for r in rows]
    golds = [r["gold"] for r in rows]
    n = min((len(a) for a in answers if a), default=0)  # a question with no chains: n abstentions, no vote
    if empty := sum(not a for a in answers):
        out["questions_without_chains"] = empty
    if n == 0:
        return out
    answers = [a or [None] * n for a in answers]
    per_question = np.array([maj_at_k(a[:n], g) for a, g in zip(answers, golds)])
    maj = per_question.mean(0)
    passes = np.mean([pass_at_k(a[:n], g) for a, g in zip(answers, golds)], axis=0)
    vote = [float(r["vote_correct"]) for r in rows]
    single = per_question[:, 0].tolist()  # maj@1 of a question: the share of its chains that are right
    out |= {"vote_acc": float(np.mean(vote)), "vote_acc_ci": bootstrap_ci(vote), "maj_at_k": maj.tolist(),
            "pass_at_k": passes.tolist(), "vote_curve": vote_curve(answers, golds),
            "single_chain_acc": float(np.mean(single)), "single_chain_acc_ci": bootstrap_ci(single),
            "abstention_rate": float(np.mean([x is None for a in answers for x in a])),
            "mean_chain_tokens": float(np.mean([c["tokens"] for r in rows for c in r["chains"]])),
            "calibration": calibration([max(Counter(x for x in a if x is not None).values(), default=0) / len(a)
                                        for a in answers], vote)}
    if all("logprob" in c for r in rows for c in r["chains"]):  # the student's likelihood of its own chains
        mean_lp = [[c["logprob"] / max(c["tokens"], 1) for c in r["chains"]] for r in rows]
        best = [float(bool(lp) and a[int(np.argmax(lp))] == g) for a, lp, g in zip(answers, mean_lp, golds)]
        weighted = [float(weighted_vote(a, lp) == g) for a, lp, g in zip(answers, mean_lp, golds)]
        out |= {"likeliest_chain_acc": float(np.mean(best)), "likeliest_chain_acc_ci": bootstrap_ci(best),
                "likelihood_vote_acc": float(np.mean(weighted)), "likelihood_vote_acc_ci": bootstrap_ci(weighted)}
    return out


def weighted_vote(answers, mean_logprobs):
    """The answer with the most weight, each chain weighing exp(its mean token log-probability); abstentions none."""
    weight = Counter()
    for a, lp in zip(answers, mean_logprobs):
        if a is not None:
            weight[a] += float(np.exp(lp))
    return max(weight, key=weight.get) if weight else None


def table(s):
    """The printed table of a summary (summarize's keys, and the run's speeds where it has them)."""
    ci = lambda key: f"{s[key]:.1%} [{s[key + '_ci'][0]:.1%}, {s[key + '_ci'][1]:.1%}]"  # noqa: E731
    rows = ["| metric | value |", "| --- | --- |"]
    if s.get("greedy_acc") is not None:
        rows += [f"| greedy accuracy{' (answer only, fast path)' if s.get('mode') in LABEL_FIRST else ''} | "
                 f"{ci('greedy_acc')} |", f"| greedy abstentions | {s['greedy_abstentions']:.1%} |"]
        rows += [f"| greedy tokens/s | {s['greedy_tok_s']:,.0f} |"] if "greedy_tok_s" in s else []
    if "maj_at_k" in s:
        n, maj = len(s["maj_at_k"]), s["maj_at_k"]
        rows += [f"| self-consistency: majority of the N={n} chains (T={s.get('temperature', '?')}) | "
                 f"{ci('vote_acc')} |",
                 f"| maj@k, expected over k-subsets, k = 1 / {(n + 1) // 2} / {n} | "
                 f"{maj[0]:.1%} / {maj[(n + 1) // 2 - 1]:.1%} / {maj[-1]:.1%} |",
                 f"| pass@k (any of k right), k = 1 / {n} | {s['pass_at_k'][0]:.1%} / {s['pass_at_k'][-1]:.1%} |",
                 f"| accuracy of a single sampled chain | {ci('single_chain_acc')} |"]

        if "likeliest_chain_acc" in s:
            rows += [f"| the likeliest chain (mean token log-prob) / likelihood-weighted vote | "
                     f"{s['likeliest_chain_acc']:.1%} / {s['likelihood_vote_acc']:.1%} |"]
        rows += [f"| calibration of the vote (ECE over 5 bins of vote share) | {s['calibration']['ece']:.3f} |",
                 f"| abstention rate (chains with no answer) | {s['abstention_rate']:.1%} |",
                 f"| mean chain length (tokens) | {s['mean_chain_tokens']:.1f} |"]
        rows += [f"| sampling tokens/s | {s['sampling_tok_s']:,.0f} ({s['sampling_seconds']:.0f} s) |"] \
            if "sampling_tok_s" in s else []
    if s.get("questions_without_chains"):
        rows += [f"| questions with no chains (counted as abstentions, no vote) | {s['questions_without_chains']:,} |"]
    return rows


def prediction_rows(records, golds, greedy_outs, greedy_answers, chains, answers):
    """One row a question: the gold answer, the greedy chain and its answer, every sampled chain with its answer
    (and its log-probability under the student, where sampled with it), the vote."""
    rows = []
    for i, r in enumerate(records):
        row = {"id": r["id"], "gold": _shown(golds[i])}
        if greedy_outs:
            row["greedy"] = {"text": greedy_outs[i][0]["text"], "answer": _shown(greedy_answers[i])}
            row["greedy_correct"] = greedy_answers[i] == golds[i]
        if chains:
            row["chains"] = [{"text": c["text"], "answer": _shown(a), "tokens": len(c["tokens"])}
                             | ({"logprob": c["logprob"]} if c.get("logprob") is not None else {})
                             for c, a in zip(chains[i], answers[i])]
            vote = majority_vote(answers[i])
            row["vote"], row["vote_correct"] = _shown(vote), vote == golds[i]
        rows.append(row)
    return rows


def _shown(answer):
    """A choice index as its letter; a number as it is; an abstention as None."""
    return LETTERS[answer] if isinstance(answer, int) else answer


if __name__ == "__main__":
    cli.run(main)
