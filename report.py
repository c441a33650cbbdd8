"""What a run shows and writes besides checkpoints: a progress bar, a metrics JSONL, PNG plots. (The
statistics of the results tables live beside the scripts that write them: experiments/stats.py.)"""

import json
import sys
import time
from contextlib import contextmanager

import numpy as np

import fileio


class Progress:
    """A one-line progress bar on stderr: `label  37% |#######      | 370/1000 | <info> | ETA 1:23`, redrawn in
    place on a terminal. Off a terminal (a log file, a pipe) it prints the same as a plain line every
    `log_every` seconds and at the end instead: no carriage-return frames piling up into one huge line."""

    def __init__(self, total, label="", start=0, width=24, stream=sys.stderr, log_every=30.0):
        self.total, self.label, self.n, self.start = total, label, start, start
        self.width, self.stream, self.t0, self.info = width, stream, time.time(), ""
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.every = 0.2 if self.tty else log_every
        self.last_draw = time.time() if not self.tty else 0.0  # off a terminal: the first line after `every`
        self.closed = False

    def update(self, k=1, info=None):
        self.n += k
        if info is not None:
            self.info = info
        now = time.time()
        if now - self.last_draw > self.every or (self.tty and self.n >= self.total):
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
        self.stream.write(line + " " * 4 if self.tty else line[1:] + "\n")
        self.stream.flush()

    def close(self):
        """The final line; a second close does nothing."""
        if self.closed:
            return
        self.closed = True
        self.draw()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def append_jsonl(path, record, sync=False):
    """One record as a line appended to a JSONL file, in whole or not at all (fileio.append_text)."""
    fileio.append_text(path, json.dumps(record, ensure_ascii=False) + "\n", sync)


def plot_lines(path, series, xlabel, ylabel, title, bands=None, ylim=None):
    """series: {name: (xs, ys)} -> a PNG line chart; bands: {name: (lows, highs)} shaded around a line (an
    interval); ylim: the y axis's range (e.g. (0, 100) for percentages: a small wobble does not look like a cliff).
    Written atomically (fileio.write_file)."""
    import matplotlib  # here, not at the top: 0.4 s to import, for a plot at the end; the backend before pyplot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, (xs, ys) in series.items():
        line, = ax.plot(xs, ys, label=name, marker="o" if len(xs) <= 40 else None)
        if bands and name in bands:
            ax.fill_between(xs, *bands[name], color=line.get_color(), alpha=0.15, linewidth=0)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    try:
        fileio.write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def bootstrap_ci(values, reps=1000, seed=0):
    """A 95 % percentile-bootstrap interval of the mean of per-question values (resampling questions) -> [lo, hi];
    None for no values (not measured)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return None
    means = v[np.random.default_rng(seed).integers(0, len(v), (reps, len(v)))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def calibration(shares, correct, bins=5):
    """How well the vote's confidence (the winning answer's share of the votes) predicts that it is right: per
    equal-width bin of share, the mean share, the accuracy and the count, and the expected calibration error
    (sum over bins of n_b / n * |accuracy_b - share_b|)."""
    out, n = [], len(shares)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(s, c) for s, c in zip(shares, correct) if lo < s <= hi or (b == 0 and s == 0)]
        share = sum(s for s, _ in inside) / len(inside) if inside else (lo + hi) / 2
        accuracy = sum(c for _, c in inside) / len(inside) if inside else 0.0
        out.append({"lo": lo, "hi": hi, "share": share, "accuracy": accuracy, "n": len(inside)})
    ece = sum(b["n"] / max(n, 1) * abs(b["accuracy"] - b["share"]) for b in out)
    return {"bins": out, "ece": ece}


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
