"""Fine-tune a student on teacher rationales: SCoTD §2, the distillation step.

The loss is the student's cross-entropy on the target (rationale + answer, or the other modes of
scotd.py) given the query; query tokens carry no loss. One visible loop: AdamW (no decay on 1-D
params), linear warmup then cosine or linear decay, gradient clipping, accumulation normalised by the
number of target tokens in the whole step, autocast for bf16/fp16 (GradScaler for fp16).

    python train.py                                   # SmolLM2-135M on the bundled CSQA corpus, cot mode
    python train.py --mode post --filter all --out runs/post
    python train.py --resume --out runs/cot           # continue exactly where runs/cot/last stopped
    torchrun --nproc_per_node 4 train.py [--fsdp] ... # data-parallel: --batch-size stays the global batch

Interruptions: Ctrl-C or SIGTERM finishes the step in flight, saves `last` and exits (130 / 143); a
second Ctrl-C aborts at once. `last` is also saved every --save-every steps, so after a kill -9 a
`--resume` continues from the newest save. Either way the resumed run gives the same losses and weights
as an uninterrupted one (tested). A non-finite loss or gradient norm stops the run before the optimizer
step, naming the step; checkpoints never hold NaN weights.

Read top to bottom: the run (main -> train: load -> loop -> step -> dev evaluation -> save), then its parts. The
optional features each enter through one call: LoRA (lora.load_student), --kd (distill.TopKSidecar, attached to the
examples), --on-policy (onpolicy.load, .takes, .step_batches), torchrun (distributed), Socratic (the modes of scotd.py).
"""

import json
import math
import os
import random
import shutil
import time
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import cli
import data
import distill
import fileio
import flags
import lora
import onpolicy
from checkpoint import RUN_INFO, default_student, from_pretrained, load_tokenizer, nonfinite_tensors, save_pretrained
from answers import GREEDY, answers_of, greedy
from distributed import Dist, data_parallel, full_states, no_sync, rank_share, set_optimizer_state
from fileio import InputError, cache_dir
from flags import STATE_FILE
from model import DTYPES
from report import Clock, Progress, append_jsonl, plot_lines
from scotd import SOCRATIC_ROLES

DEV_NEW_TOKENS = 96  # dev accuracy: greedy answers of at most this many tokens
OUTPUTS = ("best", "last", "metrics.jsonl", "args.json", "loss.png")  # what a run writes into --out


class Diverged(InputError):
    """A non-finite loss or gradient norm (usually a learning rate too high for the model)."""


# -----------------------------------------------------------------------------
# The run


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    # one run an --out; every flag checked before anything loads, under the lock (--resume may finish a swap)
    with fileio.one_writer(args.out or f"runs/{args.mode}", rank0=os.environ.get("RANK", "0") == "0"):
        run = flags.check_args(p, args)
        return train(run)


def get_args(argv=None):
    """The flags (flags.py), checked and resolved -> the RunConfig."""
    return cli.get_args(parser, flags.check_args, argv)


def parser():
    return flags.parser(__doc__)


def train(run):
    """The run: set up (device, data, model, resumed state), then the loop, then what to run next."""
    dist, device = Dist.init(run.device)
    log = print if dist.main else (lambda *a, **k: None)
    cli.keep_freed_memory(device)
    if run.batch_size % dist.world:
        raise InputError(f"--batch-size {run.batch_size} must be divisible by the {dist.world} ranks")
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    seed_everything(run.seed)

    init, model = load_student(run, device)
    tokenizer = load_tokenizer(init)
    records, tokens, skips, dev = load_data(run, tokenizer, init, dist, model.cfg)
    run = budget(run, tokens, len(records))  # every setting resolved: from here on the run's settings are fixed
    onp = onpolicy.load(run, tokenizer, init, device, dist, records) if run.on_policy else None
    log(f"model     {init} ({model.num_params() / 1e6:.1f}M params) on {device}, {run.dtype}")
    for line in describe(run, records, tokens, skips, dev, dist):
        log(line)

    for change in run.changed:
        log(f"changed   {change} (--allow-changes)")
    trainer = Trainer(run, model, init, dist, device)
    trainer.dev = replace(dev, tokenizer=tokenizer)
    if run.resume is not None:
        trainer.restore(run.resume)
        state = trainer.state
        log(f"resumed   {run.resume} at step {state.step} (epoch {state.epoch}, batch {state.index})")
    trainer.metrics = prepare_out(run, trainer.state, dist)
    loop(trainer, tokens, onp)

    if dist.main:
        plot_metrics(trainer.metrics, run.out / "loss.png")
    best = trainer.state.best
    chosen = (f"dev greedy acc {best['acc']:.1%}" if best["acc"] is not None else f"dev loss {best['loss']:.4f}"
              if best["loss"] is not None else "the newest, no dev questions")
    log(f"saved     {run.out / 'last'} and {run.out / 'best'} (best at step {best['step']}: {chosen})")
    log(f"metrics   {trainer.metrics}, plot {run.out / 'loss.png'}")
    log(f"time      {trainer.clock.line()} (this invocation)")
    log(f"next      {next_command(run.mode, run.out / 'best', 'choices' not in records[0])}")
    dist.close()
    return run.out


def loop(trainer, tokens, onp=None):
    """The training loop: lr -> the step's micro-batches -> step -> log -> maybe evaluate -> maybe save -> maybe stop.
    onp: with --on-policy, the onpolicy.OnPolicy whose steps sample the student (all but --on-policy-mix's share)."""
    run, state, dist, device = trainer.run, trainer.state, trainer.dist, trainer.device
    stream = micro_batches(tokens, run, state.epoch, state.index) if tokens else None
    bar = Progress(run.total_steps, "train", start=state.step) if dist.main else None
    trainer.raw_model.train()
    clock, tokens_seen = trainer.clock, 0
    with cli.StopSignals() as stop, closing(bar) if bar else nullcontext():  # the bar closed however the loop ends
        while state.step < run.total_steps:
            with clock("steps"):  # the steps' own throughput: dev evaluations, saves and logging are timed apart
                lr = get_lr(state.step, run)
                if onp and onpolicy.takes(run, state.step):
                    batches, position, extra = onp.step_batches(trainer, state.step)
                else:
                    batches, epoch, index = next_step_batches(stream, run, dist, trainer.raw_model.cfg.pad_token_id,
                                                              device)
                    position, extra = {"epoch": epoch, "index": index}, {}
                t0 = time.perf_counter()
                loss, grad_norm, n_targets, parts = trainer.step(batches, position, lr)
                if extra:  # an on-policy step: its three parts timed apart (a sync on CUDA, once a step)
                    cli.synchronize(device)
                    extra["update_s"] = time.perf_counter() - t0
            tokens_seen += n_targets
            log_step(trainer, bar, lr, {"loss": loss, "grad_norm": grad_norm} | parts | extra,
                     tokens_seen / clock.seconds["steps"])
            done = state.step == run.total_steps
            if (run.eval_every and state.step % run.eval_every == 0) or done:
                with clock("dev evaluation"):
                    dev_evaluation(trainer)
            stopping = stop.requested(dist)
            if done or stopping or (run.save_every and state.step % run.save_every == 0):
                with clock("saves"):
                    trainer.save(run.out / "last")
            if stopping and not done:
                if bar:
                    bar.close()  # before the line below
                if dist.main:
                    print(f"stopped at step {state.step}: saved {run.out / 'last'}; continue with: "
                          f"python train.py --resume --out {run.out} (and the same flags as before)")
                dist.close()
                raise SystemExit(stop.exit_code)


def log_step(trainer, bar, lr, measured, tok_s):
    """metrics.jsonl's line and the bar's. measured: the step's loss and grad_norm, and the loss's parts (--kd) or an
    on-policy step's divergence and stats (train_step, onpolicy.OnPolicy.step_batches)."""
    run, state = trainer.run, trainer.state
    if trainer.dist.main and (state.step % run.log_every == 0 or state.step == run.total_steps):
        loss, grad_norm, parts = measured["loss"], measured["grad_norm"], dict(measured)
        del parts["loss"], parts["grad_norm"]
        append_jsonl(trainer.metrics, {"step": state.step, "loss": loss} | parts | {
            "lr": lr, "grad_norm": grad_norm, "target_tok_s": tok_s, "epoch": state.epoch})
    if bar:
        shown = f" (ce {measured['ce']:.4f}, kd {measured['kd_loss']:.4f})" if "kd_loss" in measured else \
            f" (on-policy: divergence {measured['divergence']:.4f}, {measured['right']:.0%} right)" \
            if "right" in measured else ""
        bar.update(1, f"loss {measured['loss']:.4f}{shown} | lr {lr:.1e} | {tok_s:,.0f} tok/s")


def dev_evaluation(trainer):
    """Dev loss and greedy accuracy now; `best` saved when they improve. Every rank evaluates the same
    questions: FSDP needs all ranks in its forward, DDP does not mind."""
    run, state, dev = trainer.run, trainer.state, trainer.dev
    dev_loss, dev_acc = evaluate_dev(trainer.raw_model, dev, run, trainer.ctx, trainer.device)
    improved = is_better(dev_acc, dev_loss, state.best)
    if improved:
        state.best = {"step": state.step, "acc": dev_acc, "loss": dev_loss}
    if trainer.dist.main:
        append_jsonl(trainer.metrics, {"step": state.step, "dev_loss": dev_loss, "dev_greedy_acc": dev_acc})
        print(f"\nstep {state.step} | dev loss {'none' if dev_loss is None else f'{dev_loss:.4f}'} | "
              f"{accuracy_text(dev_acc, run, len(dev.records))}{' | new best' if improved else ''}", flush=True)
    if improved:
        trainer.save(run.out / "best")


# -----------------------------------------------------------------------------
# Load: the student, the data, the output folder


def load_student(run, device):
    """The model to train -> (its base folder: tokenizer and the token cache's key, the model). Full fine-tuning
    resumes from the checkpoint's weights at once; with --lora (or an --init that is an adapter folder) the base
    gets adapters (lora.load_student)."""
    init = Path(run.init) if run.init else default_student()
    if run.lora or lora.is_adapter_folder(init):
        return lora.load_student(run, init, device)
    return init, from_pretrained(run.resume or init, device=device)


@dataclass
class Dev:
    """The held-out examples: dev loss on `tokens`, greedy accuracy on `records`; `source` says where they are from,
    `ids` which questions they are (every checkpoint's scotd.json records both)."""
    tokens: list
    records: list
    source: str
    ids: list = field(default_factory=list)
    tokenizer: object = None  # the student's (greedy answers)

    def info(self):
        """What a checkpoint's scotd.json says of them."""
        return {"source": self.source, "ids": self.ids, "greedy_questions": len(self.records),
                "loss_examples": len(self.tokens)}


def load_data(run, tokenizer, init, dist, model_cfg):
    """Corpus -> (query, target) examples -> token ids, every skip counted -> (records, tokens, skips, Dev).
    An example longer than --max-len or than the model's positions is a counted skip; a dev question whose
    greedy answer cannot fit the model is an error, before any training."""
    skips = data.Skips()
    records = data.read_corpus(run.data)
    if run.dev_data is None:  # never the questions a report is made on: a slice of the training data, held out
        records, dev_records = data.dev_split(records)
        dev_path, dev_from = run.data, (
            f"{len(dev_records)} questions of --data (those whose ids hash lowest), held out of training" if dev_records
            else "none: --data has fewer than 20 questions, all for training (best/ is then the newest evaluation; "
                 "--dev-data gives some)")
    else:
        dev_path = dev_from = run.dev_data
        dev_records = data.read_corpus(dev_from)
        by_id, by_text = data.overlap(dev_records, records)
        if by_id or by_text:
            raise InputError(f"--dev-data {run.dev_data}: {by_id} of its questions share an id and {by_text} the text "
                             f"of a question of --data {run.data}; dev questions must be held out of training")
    if run.limit:
        records = records[:run.limit]
    examples = data.build_examples(records, run.mode, run.filter, run.rationales_per_question, run.seed, skips,
                                   run.select)
    positions = model_cfg.max_position_embeddings
    max_len, too_long = (run.max_len, None) if run.max_len <= positions else (positions, (
        f"longer than the model's {positions:,} positions (max_position_embeddings; --max-len is {run.max_len})"))
    if not dist.main:
        dist.barrier()  # rank 0 tokenises and writes the cache first; the others then read it
    top_k = distill.TopKSidecar(run.data, records, tokenizer, init) if run.kd else None  # --kd: each example's top-k
    tokens = data.tokenize_examples(examples, tokenizer, max_len, skips, cache_dir() / "tokens", cache_key=str(init),
                                    too_long=too_long, attach=top_k)
    if dist.main:
        dist.barrier()
    if not tokens and not (run.on_policy and run.on_policy_mix == 0):  # on-policy alone needs questions only
        raise InputError(f"{run.data}: no training examples left ({skips.summary()})")
    dev_examples = data.build_examples(dev_records[:64], run.mode, run.filter, 1, run.seed, data.Skips())
    dev_tokens = data.tokenize_examples(dev_examples, tokenizer, max_len, data.Skips())
    dev_ids, dev_records = [r["id"] for r in dev_records], dev_records[:run.eval_questions]
    if run.mode not in SOCRATIC_ROLES:  # dev accuracy decodes greedily: the prompt + what greedy may write
        prompts = [len(tokenizer.encode(data.format_query(r["question"], r.get("choices"))).ids) for r in dev_records]
        data.check_questions_fit(model_cfg, dev_path, dev_records, [n + DEV_NEW_TOKENS for n in prompts],
                                 lambda i: f"a dev question: {prompts[i]:,} prompt tokens + {DEV_NEW_TOKENS} for its "
                                 "greedy answer", "use shorter dev questions (--dev-data), or --eval-questions 0")
    return records, tokens, skips, Dev(dev_tokens, dev_records, dev_from, dev_ids)


def budget(run, tokens, questions=0):
    """The settings that depend on the examples: shared-prefix rows, total and warmup steps (--on-policy: an epoch
    is a pass over the `questions`)."""
    queries = data.query_keys(tokens)
    shared = run.share_prefix == "on" or (run.share_prefix == "auto" and len(set(queries)) < len(queries))
    per_epoch = math.ceil(len(tokens) / run.batch_size)
    if run.on_policy:
        per_epoch = math.ceil(questions / max(1, run.batch_size // run.on_policy_n))
    if run.tokens_per_step and not run.on_policy:  # as many micro-batches as the first epoch's token budget cuts
        per_epoch = len(epoch_batches([len(t[0]) for t in tokens], queries if shared else None, run, 0))
    total = run.max_steps or math.ceil(run.epochs * per_epoch / run.grad_accum)
    warmup = run.warmup_steps if run.warmup_steps is not None else max(1, total // 20)
    return replace(run, shared=shared, batches_per_epoch=per_epoch, total_steps=total, warmup=warmup)


def prepare_out(run, state, dist):
    """--overwrite clears an earlier run's outputs; --resume keeps metrics up to the resumed step."""
    metrics = run.out / "metrics.jsonl"
    if not dist.main:
        return metrics
    if run.overwrite:
        for name in OUTPUTS:
            for path in (run.out / name, run.out / f"{name}.tmp", run.out / f"{name}.old"):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run.out.mkdir(parents=True, exist_ok=True)
    if metrics.exists():  # keep what happened up to the resumed step; drop what a killed run did after
        if data.drop_partial_line(metrics):  # a half-written last line of a killed run
            print(f"note      {metrics}: dropped a half-written line", flush=True)
        rows = [row for _, row in data.read_appended(metrics)]
        fileio.write_text(metrics, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= state.step))
    fileio.write_text(run.out / "args.json", json.dumps(run.info()["args"], indent=2))
    return metrics


def describe(run, records, tokens, skips, dev, dist):
    """What the run will do, before it starts: the lines under `model`."""
    micro = f"{run.batch_size} examples"
    seen = run.total_steps * run.grad_accum * run.batch_size
    if run.tokens_per_step:  # micro-batches of a token budget: examples seen at the first epoch's rate
        micro = f"<= {run.tokens_per_step // run.grad_accum:,} tokens"
        seen = run.total_steps * run.grad_accum * len(tokens) // run.batches_per_epoch
    on = [onpolicy.describe(run)] if run.on_policy else []
    if run.on_policy and run.on_policy_mix == 0:
        return [f"data      {run.data}: {len(records):,} questions", f"dev       {dev.source}"] + on
    coverage = f"a subset: {seen:,} of {len(tokens):,}" if seen < len(tokens) else f"{seen / len(tokens):.2f} epochs"
    ranks = "" if dist.world == 1 else \
        f", {dist.world} ranks x {run.batch_size // dist.world} ({'FSDP' if run.fsdp else 'DDP'})"
    return [f"data      {run.data}: {len(records):,} questions -> {len(tokens):,} {run.mode} examples "
            f"(filter={run.filter}), {sum(len(t) - n for t, n, *_ in tokens):,} target tokens"
            f"{'; shared-prefix rows (a question once, its rationales as branches)' if run.shared else ''}",
            f"          {skips.summary()}",
            f"dev       {dev.source}",
            f"budget    {run.total_steps:,} steps x {run.grad_accum} x {micro} = {seen:,} examples "
            f"({coverage}){ranks}"] + on


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Schedule and data order


def get_lr(step, run):
    """Linear warmup to lr, then cosine (or linear) decay to lr * min_lr_ratio at the last step."""
    if step < run.warmup:
        return run.lr * (step + 1) / run.warmup
    progress = min(1.0, (step - run.warmup) / max(1, run.total_steps - run.warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if run.schedule == "cosine" else 1 - progress
    return run.lr * (run.min_lr_ratio + (1 - run.min_lr_ratio) * decay)


def epoch_batches(lengths, queries, run, epoch):
    """The micro-batches of one epoch: a pure function of (seed, epoch), so a resumed run sees the same.
    Shared-prefix training (queries given) keeps a question's examples together (data.question_batches)."""
    rng = np.random.default_rng([run.seed, epoch])
    tokens = run.tokens_per_step // run.grad_accum if run.tokens_per_step else None  # a micro-batch's share
    if queries is not None:
        return data.question_batches(queries, lengths, run.batch_size, rng, tokens)
    return data.length_bucketed_batches(lengths, run.batch_size, rng, tokens)


def micro_batches(tokens, run, start_epoch, start_index):
    """Endless (epoch, index, batch) from a data position on; index counts the batches of epoch consumed."""
    epoch, index = start_epoch, start_index
    lengths, queries = [len(t[0]) for t in tokens], data.query_keys(tokens) if run.shared else None
    while True:
        batches = epoch_batches(lengths, queries, run, epoch)
        for i in range(index, len(batches)):
            yield epoch, i + 1, [tokens[j] for j in batches[i]]
        epoch, index = epoch + 1, 0


def next_step_batches(stream, run, dist, pad_id, device):
    """The --grad-accum micro-batches of one optimizer step, as this rank's Rows -> (them, epoch, index after them)."""
    batches = []
    for _ in range(run.grad_accum):
        epoch, index, batch = next(stream)
        share = rank_share(batch, dist, run.shared) if dist.world > 1 else batch  # torchrun: this rank's examples
        batches.append(data.to_tensors(share, run, pad_id, device))
    return batches, epoch, index


# -----------------------------------------------------------------------------
# One optimizer step


def train_step(model, optimizer, scaler, batches, ctx, grad_clip, dist=Dist()):
    """One optimizer step over the step's micro-batches (data.Rows, this rank's share).

    The loss is normalised by the target tokens of the whole step on all ranks, not per micro-batch
    (torchtune), so accumulation over micro-batches and ranks gives the gradient of one big batch.
    DDP averages gradients over ranks, hence the factor dist.world. Returns (mean loss, grad norm, tokens, and
    with --kd the loss's parts: {ce, kd_loss}, each a mean over the step's targets).
    A non-finite loss, or a non-finite gradient norm outside fp16 (where the GradScaler skips the step
    and lowers its scale), raises Diverged before the optimizer touches the weights."""
    n_step = dist.sum(sum(rows.n_targets for rows in batches))  # known on the host
    names = getattr(batches[0].teacher_view, "parts", ())  # the loss's parts (--kd, on-policy), logged beside it
    sums = torch.zeros(1 + len(names), dtype=torch.float64, device=batches[0].idx.device)
    for i, rows in enumerate(batches):
        syncing = dist.world == 1 or i == len(batches) - 1  # torchrun: gradients all-reduced after the last only
        with nullcontext() if syncing else no_sync(model), ctx:
            parts, loss = model(rows.idx, rows.targets, docs=rows.docs, branches=rows.branches,
                                target_idx=rows.target_idx, tree_kernel=rows.tree_kernel,
                                teacher_view=rows.teacher_view)
            scaler.scale(loss * (rows.n_targets * dist.world / n_step)).backward()
        values = [loss.detach()] + [parts[k] if parts else loss.detach() * 0 for k in names]  # an empty share: none
        sums += torch.stack(values).double() * rows.n_targets  # float64: what summing Python floats gives
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    *sums, grad_norm = torch.cat((sums, grad_norm.double()[None])).tolist()  # the step's one device->host copy
    mean_loss, *means = (dist.sum(x) / n_step for x in sums)
    if not math.isfinite(mean_loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"loss {mean_loss:.4g}, gradient norm {grad_norm:.4g}")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, n_step, dict(zip(names, means))


def make_optimizer(model, lr, weight_decay, device_type):
    """AdamW; weight decay on matrices and embeddings only (nanoGPT: decay iff p.dim() >= 2). The fused
    kernel (one pass over each parameter) is ~10 % faster per step than foreach on CPU too."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device_type in ("cuda", "cpu"))


def precision(dtype, device):
    """fp32 master weights, autocast for bf16/fp16, a GradScaler only for fp16 -> (autocast ctx, GradScaler)."""
    ptdtype = DTYPES[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device.type, dtype=ptdtype)
    return ctx, torch.amp.GradScaler(device.type, enabled=(ptdtype == torch.float16))


# -----------------------------------------------------------------------------
# What a checkpoint holds, saved and restored


@dataclass
class TrainState:
    """Where training stands, besides weights and optimizer: saved in every checkpoint, restored by --resume."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the epoch and how many of its micro-batches are consumed
    index: int = 0
    on_epoch: int = 0  # --on-policy's question position: the epoch and how many of its questions are consumed
    on_index: int = 0
    best: dict = field(default_factory=dict)  # {"step", "acc", "loss"} of the best dev evaluation so far (None: none)


def load_trainer_state(folder):
    try:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: name it, do not guess
        raise InputError(f"{Path(folder) / STATE_FILE}: cannot read trainer state ({str(e).splitlines()[0]})") from None


class Trainer:
    """What a checkpoint holds and --resume restores, as one object: the model (the raw module, which is what
    is saved, and the one DDP/FSDP wraps), its AdamW, the precision (autocast ctx, fp16 loss scaler), and where
    training stands; and what the loop reports to (metrics, clock) and evaluates on (dev)."""

    def __init__(self, run, model, init, dist, device):
        self.run, self.init, self.dist, self.device = run, init, dist, device
        self.raw_model = model  # what is saved; under torchrun, DDP or FSDP wraps it
        self.model = data_parallel(model, run.fsdp, dist, device) if dist.world > 1 else model
        self.optimizer = make_optimizer(self.model, run.lr, run.weight_decay, device.type)
        self.ctx, self.scaler = precision(run.dtype, device)
        self.state = TrainState()
        if run.compile:
            model.compile_blocks()  # each block compiled once for all (checkpoints never see it)
        self.saved_at = 0  # the step of the newest `last`
        self.dev = Dev([], [], "")  # train() sets these
        self.metrics = run.out / "metrics.jsonl"
        self.clock = Clock()  # this invocation's wall time by phase

    def step(self, batches, position, lr):
        """One optimizer step at learning rate lr over the micro-batches that end at data position `position`
        (TrainState fields) -> train_step's (mean loss, grad norm, target tokens, parts). A divergence is reported
        with the step and the last good checkpoint."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            out = train_step(self.model, self.optimizer, self.scaler, batches, self.ctx, self.run.grad_clip, self.dist)
            self.state.step += 1
            for k, v in position.items():
                setattr(self.state, k, v)
            return out
        except Diverged as e:
            kept = (f"the last good checkpoint is {self.run.out / 'last'} (step {self.saved_at})" if self.saved_at
                    else "no `last` was written yet")
            raise Diverged(f"step {self.state.step + 1}: {e}: training stopped before the optimizer step; {kept}. "
                           f"Lower --lr (now {self.run.lr:g}) or check the data") from None

    def save(self, folder):
        """HF-layout folder + scotd.json (how it was trained), and in `last` (what --resume reads; `best` is for
        evaluating) trainer_state.pt: optimizer, scaler, RNG and TrainState -- for SmolLM2-135M twice the
        weights' size. Atomic; rank 0 writes. Refuses non-finite weights."""
        resumable = Path(folder).name == "last"
        weights, optim = full_states(self.model, self.optimizer if resumable else None)
        if self.dist.main:
            bad = nonfinite_tensors(weights)
            if bad:
                raise Diverged(f"step {self.state.step}: non-finite weights ({', '.join(bad[:3])}); "
                               f"{folder} not written")
            info = {**self.run.info(), "step": self.state.step, "dev": self.dev.info()}
            if Path(folder).name == "best":  # what it was chosen on
                best, dev = self.state.best, self.dev.info()
                by_loss = best["acc"] is None  # no greedy accuracy: the dev loss chose
                info["selected"] = {"step": best["step"], "metric": "dev loss" if by_loss else "dev greedy accuracy",
                                    "value": best["loss"] if by_loss else best["acc"],
                                    "on": f"{dev['loss_examples' if by_loss else 'greedy_questions']} "
                                          f"{'examples' if by_loss else 'questions'} of {dev['source']}"}
            files = {RUN_INFO: json.dumps(info, indent=2) + "\n"}
            if lora.adapters(self.raw_model):  # the adapter in adapter/ (peft's layout), the merged weights beside it
                files |= lora.save_adapter(self.raw_model, "adapter", self.init, weights)
                weights = lora.merged_state(self.raw_model, weights)
            if resumable:
                trainer_state = {"optimizer": optim, "scaler": self.scaler.state_dict(),
                                 "rng_cpu": torch.get_rng_state(), **asdict(self.state)}
                if torch.cuda.is_available() and next(self.raw_model.parameters()).is_cuda:
                    trainer_state["rng_cuda"] = torch.cuda.get_rng_state()
                files[STATE_FILE] = lambda path: torch.save(trainer_state, path)
            save_pretrained(self.raw_model, folder, tokenizer_from=self.init, state_dict=weights, files=files)
        self.dist.barrier()
        if resumable:
            self.saved_at = self.state.step

    def restore(self, folder):
        """Optimizer, scaler, RNG and position from a checkpoint folder's trainer_state.pt."""
        trainer_state = load_trainer_state(folder)
        set_optimizer_state(self.model, self.optimizer, trainer_state["optimizer"])
        self.scaler.load_state_dict(trainer_state["scaler"])
        torch.set_rng_state(trainer_state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in trainer_state:
            torch.cuda.set_rng_state(trainer_state["rng_cuda"])
        self.state = TrainState(**{k: trainer_state[k] for k in ("step", "epoch", "index", "best")},
                                **{k: trainer_state.get(k, 0) for k in ("on_epoch", "on_index")})
        self.saved_at = self.state.step


# -----------------------------------------------------------------------------
# Dev evaluation


@torch.no_grad()
def evaluate_dev(model, dev, run, ctx, device):
    """Dev loss on held-out targets, and greedy accuracy on a few dev questions (evaluate.py's greedy path) ->
    (loss, accuracy); None for what was not measured (no dev questions; --eval-questions 0 or a Socratic role)."""
    model.eval()
    sums, counts = [], []
    for s in range(0, len(dev.tokens), run.batch_size):
        rows = data.to_tensors(dev.tokens[s:s + run.batch_size], run, model.cfg.pad_token_id, device)
        with ctx:
            _, loss = model(rows.idx, rows.targets, docs=rows.docs, branches=rows.branches, target_idx=rows.target_idx,
                            tree_kernel=rows.tree_kernel)
        sums.append(loss.item() * rows.n_targets)
        counts.append(rows.n_targets)
    if not counts:  # no dev questions
        model.train()
        return None, None
    accuracy = None  # a Socratic role answers nothing alone: evaluate.py --decomposer runs the pair
    if dev.records and run.mode not in SOCRATIC_ROLES:
        prompts = [dev.tokenizer.encode(data.format_query(r["question"], r.get("choices"))).ids for r in dev.records]
        with ctx:
            outs = greedy(model, dev.tokenizer, prompts, run.mode, replace(GREEDY, max_new_tokens=DEV_NEW_TOKENS))
        answers = answers_of(run.mode, outs, dev.records)
        accuracy = float(np.mean([a[0] == data.gold(r) for a, r in zip(answers, dev.records)]))
    model.train()
    return sum(sums) / max(1, sum(counts)), accuracy


def accuracy_text(acc, run, questions):
    """The dev line's accuracy part; none for a Socratic role (it answers nothing alone) or --eval-questions 0."""
    if acc is not None:
        return f"dev greedy acc {acc:.1%} on {questions} questions"
    return ("no dev accuracy (a Socratic role answers nothing alone)" if run.mode in SOCRATIC_ROLES
            else "no dev accuracy (--eval-questions 0)")


def is_better(acc, loss, best):
    if not best or loss is None:  # no dev questions at all: the newest evaluation is the best
        return True
    if acc is None or best["acc"] is None:  # no greedy accuracy (--eval-questions 0): dev loss decides
        return loss < best["loss"]
    return (acc, -loss) > (best["acc"], -best["loss"])


def next_command(mode, best, numeric):
    """What to run after training: on GSM8K test for a numeric corpus; the two-model Socratic variant with both
    roles."""
    test = f" --data {cli.portable(data.GSM8K_TEST)}" if numeric else ""
    if mode == "decompose":
        return f"python evaluate.py --checkpoint <a --mode solve run>/best --decomposer {best}{test}"
    if mode == "solve":
        return f"python evaluate.py --checkpoint {best} --decomposer <a --mode decompose run>/best{test}"
    return f"python evaluate.py --checkpoint {best}{test}"


def plot_metrics(metrics, path):
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in rows if r.get("dev_loss") is not None]
    series = {"train loss": tuple(zip(*train))}
    if dev:
        series["dev loss"] = tuple(zip(*dev))
    plot_lines(path, series, "step", "loss (target tokens)", "scotd training")


if __name__ == "__main__":
    cli.run(main)
