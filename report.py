"""What a run shows and writes besides checkpoints: a progress bar, a metrics JSONL, PNG plots. (The
statistics of the results tables live beside the scripts that write them: experiments/stats.py.)"""

import json
import sys
import time

import cli


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
        self.closed = True
        self.draw()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def append_jsonl(path, record, sync=False):
    """One record as a line appended to a JSONL file, in whole or not at all (cli.append_text)."""
    cli.append_text(path, json.dumps(record, ensure_ascii=False) + "\n", sync)


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
    try:
        cli.write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
