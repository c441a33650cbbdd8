"""One on-policy distillation step, split into its three parts -- the student samples, the teacher grades, the
student is updated -- for scotd (train.py --on-policy) and TRL's DistillationTrainer, on the same pair, prompts
and batch, measured in the same run (each side in its own process: its peak memory is its own).

    pip install trl==1.16.0            # the peer (and its dependencies: accelerate, datasets)
    python bench/onpolicy.py            # ~5 min on 2 CPU cores
    bash bench/gpu.sh --only onpolicy   # on a GPU: the SmolLM2 pair (TRL from bench/assets/wheels)

--pair tiny (the CPU default): random Llama-layout models with SmolLM2's tokenizer (49,152 tokens), a student of
4 layers x 256 and a teacher of 6 layers x 512, fp32; 2 CSQA training questions x 4 chains, at most 64 new tokens.
--pair smollm2 (the CUDA default): random inits of SmolLM2-135M's and SmolLM2-1.7B's shapes (a real same-tokenizer
pair), bf16; 8 questions x 4 chains, at most 128 new tokens. Both sides: T = 1, reverse KL (beta 1) over the whole
vocabulary, AdamW (TRL takes each prompt 4 times: it samples one completion a prompt). TRL at its best settings
without vLLM (not installable where the benchmark runs): no gradient checkpointing (its default recomputes the
forward), fused AdamW, fp32 on a CPU (bf16 is ~25x slower there) and bf16 on CUDA; ours at train.py's defaults
(on CUDA: bf16, compiled, CUDA-graph sampling). TRL's parts are timed by wrapping its generation (`_generate`) and
the teacher's backbone (`_get_last_hidden_state`), synchronised on CUDA; the update is the rest of its training
step (both sides compute the teacher's head inside the loss, a chunk of rows at a time). Ours come from
metrics.jsonl. The first `--warmup` steps (compiles among them) are left out of both.

--pair xtok (#59, CPU): the tiny pair with the teacher on Qwen2.5's tokenizer (151,665 pieces; the fetched 1.5B
teacher's tokenizer.json), so the two tokenizers differ: ours aligns them (xtok.py), the peer is TRL's GOLDTrainer
(`trl.experimental.gold`: on-policy, lmbda 1, extended ULD with the hybrid loss and the "bayesian" merge, the
settings under which its loss equals ours where the conventions agree: bench/xtok_gold.py). Both sides at beta 0.5
(across tokenizers ours refuses beta 1: the reverse KL is unbounded where the teacher gives a student piece no mass).
GOLD's parts are timed by wrapping its generation (`generate_on_policy_outputs`) and the teacher's forward.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli import run, stopping_cleanly, synchronize  # noqa: E402


PAIRS = {  # name -> {side: (layers, width, heads, kv heads, mlp width, seed)}
    "tiny": {"student": (4, 256, 4, 2, 768, 0), "teacher": (6, 512, 8, 4, 1536, 1)},
    "smollm2": {"student": (30, 576, 9, 3, 1536, 0), "teacher": (24, 2048, 32, 32, 8192, 1)},  # 135M, 1.7B
    "xtok": {"student": (4, 256, 4, 2, 768, 0), "teacher": (6, 512, 8, 4, 1536, 1)},  # the teacher on Qwen2.5's
}
QWEN = Path.home() / ".cache" / "scotd" / "teachers" / "Qwen2.5-Coder-1.5B-Instruct"  # experiments/fetch_teachers.py


def smollm2_tokenizer():
    """A folder with SmolLM2's tokenizer: bench/assets (carried to a GPU machine) or the default student."""
    from checkpoint import default_student

    assets = ROOT / "bench" / "assets" / "smollm2-135m"
    return assets if (assets / "tokenizer.json").exists() else Path(default_student())


def make_pair(folder, pair="tiny"):
    """The pair as transformers writes them (both sides load these folders), SmolLM2's tokenizer beside each."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tokenizers import Tokenizer

    for name, (layers, width, heads, kv, mlp, seed) in PAIRS[pair].items():
        out = Path(folder) / name
        if (out / "config.json").exists():
            continue
        tok = QWEN if pair == "xtok" and name == "teacher" else smollm2_tokenizer()
        eos = Tokenizer.from_file(str(tok / "tokenizer.json")).token_to_id("<|endoftext|>")
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=151936 if tok == QWEN else 49152, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                          tie_word_embeddings=True, bos_token_id=None if tok == QWEN else 1, eos_token_id=eos,
                          pad_token_id=eos)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tok / f).exists():
                (out / f).write_bytes((tok / f).read_bytes())
    return Path(folder) / "student", Path(folder) / "teacher"


def prompts(k):
    import data
    from scotd import format_query

    return [format_query(r["question"], r["choices"]) for r in data.read_corpus(data.DEFAULT_TRAIN)[:k]]


def ours(args, student, teacher, work):
    """train.py --on-policy for warmup + steps steps -> the timed steps' mean parts (metrics.jsonl)."""
    import data
    import train

    records = data.read_corpus(data.DEFAULT_TRAIN)[:64]
    data.write_corpus(records, work / "q.jsonl")
    train.main(["--init", str(student), "--data", str(work / "q.jsonl"), "--out", str(work / "ours"), "--on-policy",
                "--teacher", str(teacher), "--on-policy-n", "4", "--batch-size", str(4 * args.questions),
                "--max-new-tokens", str(args.max_new_tokens), "--device", args.device,
                "--max-steps", str(args.warmup + args.steps), "--eval-every", "0", "--eval-questions", "0",
                "--save-every", "0", "--dev-data", str(data.DEFAULT_DEV), "--lr", "1e-5", "--beta", str(beta(args)),
                "--teacher-shots", "0"])  # the prompt alone, as TRL's teacher reads it
    rows = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "divergence" in r][args.warmup:]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("sample_s", "teacher_s", "update_s", "sampled_tokens")}


def beta(args):
    return 0.5 if args.pair == "xtok" else 1.0


def trl(args, student, teacher, work):
    """DistillationTrainer (GOLDTrainer for --pair xtok) for warmup + steps steps, its parts timed by wrapping its generation and the teacher."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tok = AutoTokenizer.from_pretrained(student)
    tok.padding_side, tok.pad_token = "left", tok.pad_token or tok.eos_token
    qs = prompts(64)
    dataset = Dataset.from_dict({"prompt": [q for q in qs for _ in range(4)]})  # 4 chains a question
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    settings = dict(output_dir=str(work / "trl"), per_device_train_batch_size=4 * args.questions,
                    max_steps=args.warmup + args.steps, max_completion_length=args.max_new_tokens, temperature=1.0,
                    beta=beta(args), learning_rate=1e-5, bf16=cuda, gradient_checkpointing=False,
                    optim="adamw_torch_fused", use_cpu=not cuda, report_to="none", logging_steps=args.warmup + args.steps,
                    save_strategy="no", disable_dropout=True)  # one log line, at the end
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16 if cuda else torch.float32)
    clock = {"sample_s": 0.0, "teacher_s": 0.0}
    if args.pair == "xtok":
        return gold(args, student, teacher, teacher_model, tok, dataset, settings, clock, device)
    trainer = DistillationTrainer(model=str(student), teacher_model=teacher_model, train_dataset=dataset,
                                  args=DistillationConfig(**settings, shuffle_dataset=False), processing_class=tok)
    trainer._generate = timed(trainer._generate, clock, "sample_s", device)
    hidden, the_teacher = trainer._get_last_hidden_state, trainer.accelerator.unwrap_model(trainer.teacher_model)

    def timed_hidden(model, *a, **k):  # TRL runs the teacher's backbone through this (its head in the loss's chunks)
        t0 = time.perf_counter()
        out = hidden(model, *a, **k)
        synchronize(device)
        if model is the_teacher:
            clock["teacher_s"] += time.perf_counter() - t0
        return out
    trainer._get_last_hidden_state = timed_hidden
    return timed_steps(args, trainer, clock, device)


def gold(args, student, teacher, teacher_model, tok, dataset, settings, clock, device):
    """GOLDTrainer on-policy across tokenizers, its parts timed by wrapping its generation and the teacher's forward."""
    from transformers import AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    config = GOLDConfig(**settings, lmbda=1.0, use_uld_loss=True, use_extended_uld=True, uld_use_hybrid_loss=True,
                        uld_token_merge_strategy="bayesian", uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
                        uld_skip_student_eos=True, uld_skip_teacher_eos=True, teacher_tokenizer_name_or_path=str(teacher))
    dataset = dataset.map(lambda r: {"completion": ""})  # prompt-completion rows; on-policy writes the completions
    trainer = GOLDTrainer(model=str(student), teacher_model=teacher_model, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(student))
    lengths = []  # each batch's mean completion length: its labels' tokens

    def count(out):
        lengths.append(float((out[2] != -100).sum(1).float().mean()))
    generate = trainer.generate_on_policy_outputs
    trainer.generate_on_policy_outputs = timed(generate, clock, "sample_s", device, then=count)
    started = []
    the_teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    the_teacher.register_forward_pre_hook(lambda *a: started.append(time.perf_counter()))

    def teacher_done(*a):
        synchronize(device)
        clock["teacher_s"] += time.perf_counter() - started.pop()
    the_teacher.register_forward_hook(teacher_done)
    return timed_steps(args, trainer, clock, device) | {"sampled_tokens": sum(lengths) / len(lengths)}


def timed(fn, clock, key, device, then=None):
    """fn, each call's wall time (its device work included) added to clock[key]; then(out) after each call."""
    def call(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        synchronize(device)
        clock[key] += time.perf_counter() - t0
        if then is not None:
            then(out)
        return out
    return call


def timed_steps(args, trainer, clock, device):
    """Train, timing each step and the parts `clock` sums -> the timed steps' mean parts."""
    from transformers import TrainerCallback

    marks = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append({"t": time.perf_counter(), **{k: clock[k] for k in ("sample_s", "teacher_s")}})

        def on_step_end(self, *a, **k):
            synchronize(device)
            m = marks[-1]
            m.update(step_s=time.perf_counter() - m["t"], sample=clock["sample_s"] - m["sample_s"],
                     teacher=clock["teacher_s"] - m["teacher_s"])
    trainer.add_callback(Steps())
    trainer.train()
    timed = marks[args.warmup:]
    mean = lambda k: sum(m[k] for m in timed) / len(timed)  # noqa: E731
    # the sampling happens in the step's input preparation, inside on_step_begin .. on_step_end
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"sample_s": mean("sample"), "teacher_s": mean("teacher"),
            "update_s": mean("step_s") - mean("sample") - mean("teacher"),
            "sampled_tokens": lengths[-1] if lengths else float("nan")}  # every step's, warm-up included


def worker(args):
    import torch

    from bench import peak_memory_mb

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    student, teacher = work / "student", work / "teacher"
    t0 = time.perf_counter()
    result = (ours if args.side == "scotd" else trl)(args, student, teacher, work)
    result |= {"wall_s": time.perf_counter() - t0, "peak_mb": peak_memory_mb(torch.device(args.device))}
    print("RESULT " + json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out first (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda where there is one")
    p.add_argument("--pair", default=None, choices=tuple(PAIRS), help="default: smollm2 on CUDA, tiny on a CPU")
    p.add_argument("--questions", type=int, default=None, help="questions a step, 4 chains each (default: 8 on "
                   "CUDA, 2 on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 on CUDA, 64 on a CPU")
    p.add_argument("--work", help="where the pair and the runs go (default: a new temporary folder)")
    p.add_argument("--side", choices=("scotd", "trl"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return worker(args)
    import torch

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.device, args.pair = ("cuda" if cuda else "cpu"), args.pair or ("smollm2" if cuda else "tiny")
    args.questions, args.max_new_tokens = args.questions or (8 if cuda else 2), args.max_new_tokens or (128 if cuda else 64)
    work = Path(args.work or tempfile.mkdtemp(prefix="onpolicy-bench-"))
    make_pair(work, args.pair)
    results = {}
    with stopping_cleanly(lambda: f"{len(results)} of 2 sides measured (printed above)"):
        measure_sides(args, work, results)
    table(args, results)


def measure_sides(args, work, results):
    """Each side in a process of its own, one after the other, into `results` as it ends."""
    for side in ("scotd", "trl"):
        shutil.rmtree(work / ("ours" if side == "scotd" else "trl"), ignore_errors=True)
        cmd = [sys.executable, __file__, "--side", side, "--work", str(work)] + \
            [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("steps", "warmup", "threads", "device", "pair",
                                                                      "questions", "max_new_tokens")]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:  # a failed side is a finding: its row says so, the other side still stands
            why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]
            print(f"{side} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            results[side] = {"failed": why}
            continue
        results[side] = json.loads(line[0][7:])
        print(f"{side}: {results[side]}", file=sys.stderr)


def table(args, results):
    import torch

    from bench import device_name

    device = device_name(torch.device(args.device))
    print(f"\non-policy step | {device} | pair {args.pair} | {'bf16' if args.device == 'cuda' else 'fp32'} | "
          f"{args.steps} timed steps after {args.warmup}")
    for side, r in results.items():
        if "failed" in r:
            print(f"\n{side} failed: {r['failed']}")
        else:
            r["step_s"] = sum(r[k] for k in ("sample_s", "teacher_s", "update_s"))
    cell = lambda side, k, f="{:.2f}": f.format(results[side][k]) if k in results[side] else "-"  # noqa: E731
    ratio = lambda k: f"{results['trl'][k] / results['scotd'][k]:.1f}x" if all(  # noqa: E731
        k in r for r in results.values()) else ""
    print(f"\n| part of one step ({args.questions} questions x 4 chains, <= {args.max_new_tokens} tokens) | scotd | "
          f"TRL {'GOLDTrainer' if args.pair == 'xtok' else 'DistillationTrainer'} | ratio |")
    print("| --- | --- | --- | --- |")
    for k, label in (("sample_s", "student samples"), ("teacher_s", "teacher grades"), ("update_s", "student update"),
                     ("step_s", "the step")):
        print(f"| {label} (s) | {cell('scotd', k)} | {cell('trl', k)} | {ratio(k)} |")
    memory = "peak GPU memory allocated" if args.device == "cuda" else "peak RSS"
    print(f"| {memory} (MB) | {cell('scotd', 'peak_mb', '{:,.0f}')} | {cell('trl', 'peak_mb', '{:,.0f}')} | |")
    print(f"| tokens a chain | {cell('scotd', 'sampled_tokens', '{:.1f}')} | {cell('trl', 'sampled_tokens', '{:.1f}')} | |")


if __name__ == "__main__":
    run(main)
