"""The statistics of the results tables (experiments/*_table.py): 95 % intervals of an accuracy (Wilson) or of a
mean over questions (bootstrap), and paired comparisons of two systems on the same questions (paired bootstrap,
exact McNemar) -- the verdicts of experiments/README.md.
"""

import math

import numpy as np


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
