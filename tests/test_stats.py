"""experiments/stats.py: intervals and paired tests, against values computed by hand or by definition."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("stats", Path(__file__).resolve().parent.parent / "experiments" / "stats.py")
stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stats)
bootstrap_mean, mcnemar, paired_bootstrap, wilson = stats.bootstrap_mean, stats.mcnemar, stats.paired_bootstrap, stats.wilson


def test_wilson_interval():
    low, high = wilson(50, 100)  # textbook: 0.5 +- 0.0966...
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson(0, 20)  # never below 0, and not degenerate at the boundary
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.1611, abs=1e-4)


def test_mcnemar_counts_only_discordant_pairs():
    a = [1] * 30 + [1] * 9 + [0] * 1 + [0] * 60  # 9 questions only a gets right, 1 only b
    b = [1] * 30 + [0] * 9 + [1] * 1 + [0] * 60
    assert mcnemar(a, b) == pytest.approx(2 * (1 + 10) / 2 ** 10)  # exact binomial, k <= 1 of 10
    assert mcnemar(a, a) == 1.0


def test_paired_bootstrap_sees_what_unpaired_intervals_miss():
    """b is a plus 12 extra right answers on 400 questions: the paired difference is clearly positive even
    though the two Wilson intervals overlap."""
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.5).astype(int)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1
    diff, (low, high), p = paired_bootstrap(b, a)
    assert diff == pytest.approx(12 / 400) and 0 < low <= diff <= high and p < 0.01
    assert wilson(a.sum(), 400)[1] > wilson(b.sum(), 400)[0]  # the unpaired intervals overlap
    diff, (low, high), p = paired_bootstrap(a, a)
    assert diff == 0 and low == high == 0 and p == 1.0


def test_bootstrap_over_questions_is_wider_than_treating_chains_as_independent():
    """100 questions whose 10 chains all agree (all right or all wrong): 1,000 chains, but only 100
    independent outcomes -- the interval is that of 100, not of 1,000."""
    per_question = [1.0] * 50 + [0.0] * 50
    mean, (low, high) = bootstrap_mean(per_question)
    assert mean == 0.5 and high - low > 0.17  # Wilson for 500/1000 would be ~0.06 wide
    assert wilson(500, 1000)[1] - wilson(500, 1000)[0] < 0.07


def test_within_question_auc_counts_pairs_by_mean_token_logprob():
    """experiments/score_stats.py: the chance that a right chain of a question outscores a wrong one, scored
    per token (a long likely chain is not penalised for its length), ties half; None without both kinds."""
    spec = importlib.util.spec_from_file_location("score_stats", Path(__file__).resolve().parent.parent /
                                                  "experiments" / "score_stats.py")
    score_stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score_stats)
    chain = lambda logprob, tokens, correct: dict(teacher_logprob=logprob, teacher_tokens=tokens, correct=correct)  # noqa: E731
    right = [chain(-10.0, 20, True), chain(-3.0, 3, True)]  # -0.5 and -1.0 a token
    wrong = [chain(-6.0, 10, False), chain(-2.0, 2, False), chain(-1.0, 1, False)]  # -0.6, -1.0, -1.0
    # pairs: -0.5 beats all three (3); -1.0 loses to -0.6 and ties twice (1)
    assert score_stats.within_question_auc(right + wrong) == pytest.approx(4 / 6)
    assert score_stats.within_question_auc(right) is None and score_stats.within_question_auc(wrong) is None
