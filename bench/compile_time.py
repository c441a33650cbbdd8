"""How long training waits for torch.compile: eager, the whole model compiled, or each block compiled
(Transformer.compile_blocks, what train.py --compile does: dynamic shapes from the start; blocks-static: the
default, a graph for the first shape and a dynamic one at the second). A SmolLM2-135M-shaped random init
(bench/assets), a few forward + backward steps at the given lengths; each step's seconds, the first of a new
length included (a fresh compile cache: what a first run pays).

    python bench/compile_time.py [--lengths 128,128,96,128] [--batch 4] [--device cuda] [--how blocks,blocks-static]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # cold: nothing compiled by an earlier run is reused
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli import run, synchronize  # noqa: E402
from model import Config, Transformer  # noqa: E402


def steps(how, lengths, batch, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(Config.from_hf_json(ROOT / "bench" / "assets" / "smollm2-135m" / "config.json")).to(device)
    if how in ("blocks", "blocks-static"):
        model.compile_blocks(dynamic=True if how == "blocks" else None)
    forward = torch.compile(model) if how == "whole" else model
    seconds = []
    for T in lengths:
        t0 = time.time()
        idx = torch.randint(0, model.cfg.vocab_size, (batch, T + 1), device=device)
        forward(idx[:, :-1], idx[:, 1:])[1].backward()
        synchronize(device)
        seconds.append(time.time() - t0)
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128,128,96,128", help="one training step per length (default: 128,128,96,128)")
    p.add_argument("--batch", type=int, default=4, help="rows a step (default: 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--how", default="eager,blocks,whole", help="which to run, of eager, blocks, blocks-static and "
                   "whole (default: eager,blocks,whole)")
    args = p.parse_args()
    lengths, device = [int(t) for t in args.lengths.split(",")], torch.device(args.device)
    if unknown := set(args.how.split(",")) - {"eager", "blocks", "blocks-static", "whole"}:
        p.error(f"argument --how: unknown {', '.join(sorted(unknown))} (choose from eager, blocks, blocks-static, whole)")
    if "," in args.how:  # each in a process and compile cache of its own: one's graphs must not warm the next's
        print(f"| compile | {' | '.join(f'step {i + 1}, T={T}' for i, T in enumerate(lengths))} | total |")
        print("| --- |" + " --- |" * (len(lengths) + 1), flush=True)
        for how in args.how.split(","):
            subprocess.run([sys.executable, __file__, "--lengths", args.lengths, "--batch", str(args.batch),
                            "--device", args.device, "--how", how], check=True)
        return
    s = steps(args.how, lengths, args.batch, device)
    print(f"| {args.how} | {' | '.join(f'{x:.1f} s' for x in s)} | {sum(s):.1f} s |", flush=True)


if __name__ == "__main__":
    run(main)  # SIGTERM and Ctrl-C: one line, exit 143 / 130
