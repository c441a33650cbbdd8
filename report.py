"""What a run shows and writes besides checkpoints: a progress bar, a metrics JSONL, PNG plots, and the
statistics a results table needs (95 % intervals, paired comparisons over the same questions)."""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np


class Progress:
    """A one-line progress bar on stderr: `label  37% |#######      | 370/1000 | <info> | ETA 1:23`."""

    def __init__(self, total, label="", start=0, width=24, stream=sys.stderr):
        self.total, self.label, self.n, self.start = total, label, start, start
        self.width, self.stream, self.t0, self.info = width, stream, time.time(), ""
        self.last_draw = 0.0
        self.closed = False

    def update(self, k=1, info=None):
        self.n += k
        if info is not None:
            self.info = info
        now = time.time()
        if now - self.last_draw > 0.2 or self.n >= self.total:
            self.last_draw = now
            self.draw()

    def draw(self):
        done = self.n - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0
        frac = self.n / max(self.total, 1)
        bar = "#" * int(frac * self.width)
        line = f"\r{self.label} {frac:4.0%} |{bar:<{self.width}}| {self.n}/{self.total}"
        if self.info:
            line += f" | {self.info}"
        line += f" | ETA {int(eta // 60)}:{int(eta % 60):02d}"
        self.stream.write(line + " " * 4)
        self.stream.flush()

    def close(self):
        self.closed = True
        self.draw()
        self.stream.write("\n")
        self.stream.flush()


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_lines(path, series, xlabel, ylabel, title, bands=None):
    """series: {name: (xs, ys)} -> a PNG line chart; bands: {name: (lows, highs)} shaded around a line (an
    interval). Written to a temporary name, then renamed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, (xs, ys) in series.items():
        line, = ax.plot(xs, ys, label=name, marker="o" if len(xs) <= 40 else None)
        if bands and name in bands:
            ax.fill_between(xs, *bands[name], color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# -----------------------------------------------------------------------------
# Statistics for accuracy tables


def wilson(k, n, z=1.96):
    """95 % Wilson score interval of an accuracy of k right out of n: (low, high) as fractions."""
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return mid - half, mid + half


def wilson_cell(k, n):
    """A table cell: the accuracy k / n in percent with its 95 % Wilson interval, "58.4 % [52.8, 63.9]"."""
    low, high = wilson(k, n)
    return f"{100 * k / n:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"


def bootstrap_cell(per_question):
    """A table cell: the mean of per-question values in percent with its 95 % bootstrap interval."""
    mean, (low, high) = bootstrap_mean(list(per_question))
    return f"{100 * mean:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"


def bootstrap_mean(per_question, samples=10_000, seed=0):
    """Mean of per-question values (e.g. the share of a question's chains that are right) and its 95 %
    interval from resampling questions: chains of one question are not independent draws."""
    x = np.asarray(per_question, dtype=float)
    means = x[np.random.default_rng(seed).integers(0, len(x), (samples, len(x)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), (float(low), float(high))


def paired_bootstrap(a, b, samples=10_000, seed=0):
    """Two systems' per-question correctness (0/1 arrays over the same questions) -> (accuracy difference
    a - b, its 95 % interval from resampling questions, two-sided p-value of "no difference")."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (samples, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return float(diff.mean()), (float(low), float(high)), float(p)


def mcnemar(a, b):
    """Exact two-sided McNemar test on paired 0/1 outcomes: p-value from the discordant pairs alone."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
