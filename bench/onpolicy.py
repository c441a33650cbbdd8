"""One on-policy distillation step, split into its three parts -- the student samples, the teacher grades, the
student is updated -- for scotd (train.py --on-policy) and TRL's DistillationTrainer, on the same tiny pair, prompts
and batch, measured in the same run (each side in its own process: its peak memory is its own).

    pip install trl==1.16.0            # the peer (and its dependencies: accelerate, datasets)
    python bench/onpolicy.py            # ~5 min on 2 CPU cores

The pair: random Llama-layout models with SmolLM2's tokenizer (49,152 tokens): a student of 4 layers x 256 and a
teacher of 6 layers x 512, fp32. The batch: 2 CSQA training questions x 4 chains (TRL takes each prompt 4 times:
it samples one completion a prompt), at most 64 new tokens at T = 1, reverse KL (beta 1) over the whole vocabulary
on both sides, AdamW. TRL at its best CPU settings: fp32 (bf16 is ~25x slower on this CPU), no gradient
checkpointing (its default recomputes the forward), fused AdamW. Its parts are timed by wrapping its generation
(`_generate`) and the teacher's backbone (`_get_last_hidden_state`); the update is the rest of its training step
(both sides compute the teacher's head inside the loss, a chunk of rows at a time). Ours come from metrics.jsonl.
The first `--warmup` steps are left out of both.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_pair(folder):
    """The tiny pair as transformers writes them (both sides load these folders), SmolLM2's tokenizer beside each."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from checkpoint import default_student

    tok = Path(default_student())
    for name, (layers, width, seed) in {"student": (4, 256, 0), "teacher": (6, 512, 1)}.items():
        out = Path(folder) / name
        if (out / "config.json").exists():
            continue
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=width, intermediate_size=width * 3, num_hidden_layers=layers,
                          num_attention_heads=width // 64, num_key_value_heads=width // 128, max_position_embeddings=1024,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
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
                "--teacher", str(teacher), "--on-policy-n", "4", "--batch-size", "8", "--max-new-tokens", "64",
                "--max-steps", str(args.warmup + args.steps), "--eval-every", "0", "--eval-questions", "0",
                "--save-every", "0", "--dev-data", str(data.DEFAULT_DEV), "--lr", "1e-5"])
    rows = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "divergence" in r][args.warmup:]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("sample_s", "teacher_s", "update_s", "sampled_tokens")}


def trl(args, student, teacher, work):
    """DistillationTrainer for warmup + steps steps, its parts timed by wrapping its generation and the teacher."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    tok = AutoTokenizer.from_pretrained(student)
    tok.padding_side, tok.pad_token = "left", tok.pad_token or tok.eos_token
    qs = prompts(64)
    dataset = Dataset.from_dict({"prompt": [q for q in qs for _ in range(4)]})  # 4 chains a question
    config = DistillationConfig(output_dir=str(work / "trl"), per_device_train_batch_size=8, max_steps=args.warmup + args.steps,
                                max_completion_length=64, temperature=1.0, beta=1.0, learning_rate=1e-5, bf16=False,
                                gradient_checkpointing=False, optim="adamw_torch_fused", use_cpu=True, report_to="none",
                                logging_steps=args.warmup + args.steps, save_strategy="no", shuffle_dataset=False,
                                disable_dropout=True)  # one log line, at the end
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    trainer = DistillationTrainer(model=str(student), teacher_model=teacher_model, args=config, train_dataset=dataset,
                                  processing_class=tok)
    clock = {"sample_s": 0.0, "teacher_s": 0.0, "step_s": 0.0, "tokens": 0, "chains": 0}
    generate = trainer._generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = generate(*a, **k)
        clock["sample_s"] += time.perf_counter() - t0
        return out
    trainer._generate = timed_generate
    hidden, the_teacher = trainer._get_last_hidden_state, trainer.accelerator.unwrap_model(trainer.teacher_model)

    def timed_hidden(model, *a, **k):  # TRL runs the teacher's backbone through this (its head in the loss's chunks)
        t0 = time.perf_counter()
        out = hidden(model, *a, **k)
        if model is the_teacher:
            clock["teacher_s"] += time.perf_counter() - t0
        return out
    trainer._get_last_hidden_state = timed_hidden
    marks = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append({"t": time.perf_counter(), **{k: clock[k] for k in ("sample_s", "teacher_s")}})

        def on_step_end(self, *a, **k):
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

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    student, teacher = work / "student", work / "teacher"
    t0 = time.perf_counter()
    result = (ours if args.side == "scotd" else trl)(args, student, teacher, work)
    result |= {"wall_s": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("RESULT " + json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out first (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all)")
    p.add_argument("--side", choices=("scotd", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return worker(args)
    work = Path(tempfile.mkdtemp(prefix="onpolicy-bench-"))
    make_pair(work)
    results = {}
    for side in ("scotd", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            raise SystemExit(f"{side} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        results[side] = json.loads(line[0][7:])
        print(f"{side}: {results[side]}", file=sys.stderr)
    print("| part of one step (2 questions x 4 chains, <= 64 tokens) | scotd | TRL DistillationTrainer | ratio |")
    print("| --- | --- | --- | --- |")
    for k, label in (("sample_s", "student samples"), ("teacher_s", "teacher grades"), ("update_s", "student update")):
        a, b = results["scotd"][k], results["trl"][k]
        print(f"| {label} (s) | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    a, b = (sum(results[s][k] for k in ("sample_s", "teacher_s", "update_s")) for s in ("scotd", "trl"))
    print(f"| the step (s) | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    print(f"| peak memory (MB) | {results['scotd']['peak_rss_mb']:,.0f} | {results['trl']['peak_rss_mb']:,.0f} | |")
    print(f"| tokens a chain | {results['scotd']['sampled_tokens']:.1f} | {results['trl']['sampled_tokens']:.1f} | |")


if __name__ == "__main__":
    main()
