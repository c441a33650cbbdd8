"""scotd.py: the templates, answer extraction and voting, as the paper defines them."""

import pytest

import scotd

from scotd import (extract_answer, fewshot_prefix, format_query, format_target, majority_vote, parse_choice,
                   vote_curve)

CHOICES = ["british columbia", "body of water", "wooded area", "pay debts", "zoo"]


def test_query_template_is_the_cot_prompt_format():
    assert format_query("Where do beavers get supplies?", CHOICES) == (
        "Q: Where do beavers get supplies?\nAnswer Choices:\n(a) british columbia\n(b) body of water\n"
        "(c) wooded area\n(d) pay debts\n(e) zoo\nA:")


def test_target_templates():
    r = "Beavers build with wood. "
    assert format_target("cot", CHOICES, 2, r) == " Beavers build with wood. So the answer is (c) wooded area.\n\n"
    assert format_target("post", CHOICES, 2, r) == " The answer is (c) wooded area. Beavers build with wood.\n\n"
    assert format_target("label", CHOICES, 2) == " The answer is (c) wooded area.\n\n"


def test_extraction_per_mode():
    assert extract_answer("cot", " Wood. So the answer is (c) wooded area.", CHOICES) == 2
    # cot reads the last "answer is"; post/label read the first
    assert extract_answer("cot", " The answer is not (a). So the answer is (e) zoo.", CHOICES) == 4
    assert extract_answer("post", " The answer is (b) body of water. So the answer is (e) zoo.", CHOICES) == 1
    assert extract_answer("label", " The answer is (d) pay debts.\n\nQ: next question", CHOICES) == 3


def test_letter_or_text_answers_and_abstentions():
    assert parse_choice("(c) wooded area.", CHOICES) == 2
    assert parse_choice("(c)", CHOICES) == 2
    assert parse_choice("wooded area.", CHOICES) == 2
    assert parse_choice("(c) zoo", CHOICES) is None  # letter and text disagree
    assert parse_choice("either (b) body of water or (c) wooded area.", CHOICES) is None
    assert parse_choice("(h) mars", CHOICES) is None  # no such choice
    assert extract_answer("cot", " Beavers are rodents and", CHOICES) is None  # no answer: abstains


def test_majority_vote_ties_go_to_the_first_sampled():
    assert majority_vote([1, 2, 2, 1, None]) == 1
    assert majority_vote([2, 1, 1, 2]) == 2
    assert majority_vote([None, None, 3]) == 3
    assert majority_vote([None, None]) is None
    assert majority_vote([0, 1, 1]) == 1


def test_vote_curve_from_the_same_samples():
    answers = [[1, 0, 0], [2, 2, None], [None, 3, 4]]
    golds = [0, 2, 4]
    # k=1: [1, 2, None] -> 1/3; k=2: [1 (tie, first), 2, 3] -> 1/3; k=3: [0, 2, 3 (tie, first)] -> 2/3
    assert vote_curve(answers, golds) == [1 / 3, 1 / 3, 2 / 3]


def test_repeated_choice_text_is_not_a_contradiction():
    # CSQA has questions whose choices repeat a text, e.g. (a) healthy ... (e) healthy
    assert parse_choice("(a) healthy.", ["healthy", "cure", "wellness", "passing around", "healthy"]) == 0


def test_fewshot_prefix_is_worked_examples_then_blank_lines():
    q = format_query("Where?", CHOICES)
    prefix = fewshot_prefix([(q, format_target("cot", CHOICES, 2, "Wood."))] * 2)
    assert prefix == (q + " Wood. So the answer is (c) wooded area.\n\n") * 2


def test_post_shuffled_target_is_the_label_then_the_rationale_words_in_a_fixed_order():
    rationale = "Beavers build dams from wood they cut in wooded areas near rivers."
    target = format_target("post-shuffled", CHOICES, 2, rationale)
    head = " The answer is (c) wooded area. "
    assert target.startswith(head) and target.endswith("\n\n")
    words = target[len(head):-2].split()
    assert sorted(words) == sorted(rationale.split()) and words != rationale.split()
    assert format_target("post-shuffled", CHOICES, 2, rationale) == target  # the same every time
    assert extract_answer("post-shuffled", target, CHOICES) == 2


def brute_force(answers, gold, k):
    """maj@k by enumerating every k-subset: abstentions do not vote, all-abstain is wrong, a tie of m counts 1/m."""
    from collections import Counter
    from fractions import Fraction
    from itertools import combinations

    total, subsets = Fraction(0), 0
    for subset in combinations(answers, k):
        subsets += 1
        votes = Counter(a for a in subset if a is not None)
        if votes.get(gold):
            best = max(votes.values())
            total += Fraction(votes[gold] == best, sum(v == best for v in votes.values()))
    return float(total / subsets)


def test_maj_at_k_and_pass_at_k_equal_enumerating_every_subset():
    import random
    from itertools import combinations

    from scotd import maj_at_k, pass_at_k

    rng = random.Random(0)
    for _ in range(400):  # ties and abstentions included
        n = rng.randint(1, 8)
        answers = [rng.choice([None, "a", "b", "c", "d", 1, 2]) for _ in range(n)]
        gold = rng.choice(["a", "b", 1])
        for k, (maj, passed) in enumerate(zip(maj_at_k(answers, gold), pass_at_k(answers, gold)), 1):
            assert maj == pytest.approx(brute_force(answers, gold, k), abs=1e-12)
            assert passed == pytest.approx(sum(gold in s for s in combinations(answers, k)) /
                                           len(list(combinations(answers, k))), abs=1e-12)
    # N = 30, where enumerating is out of reach: against 20,000 subsets drawn at random for each k (seeded; the
    # estimate's standard error is at most 0.0035)
    answers = [rng.choice([None, "a", "b", "c", "d", "e"]) for _ in range(30)]
    exact = maj_at_k(answers, "a")
    for k in (1, 5, 14, 29, 30):
        drawn = [brute_force(rng.sample(answers, k), "a", k) for _ in range(20_000)]
        assert exact[k - 1] == pytest.approx(sum(drawn) / len(drawn), abs=0.015)


def test_the_bootstrap_interval_holds_the_mean_narrows_with_questions_and_is_none_for_none():
    from report import bootstrap_ci

    few, many = [1.0, 0.0] * 10, [1.0, 0.0] * 500
    lo, hi = bootstrap_ci(few)
    assert lo < 0.5 < hi and hi - lo > bootstrap_ci(many)[1] - bootstrap_ci(many)[0]
    assert bootstrap_ci(few) == [lo, hi]  # seeded: the same interval every time
    assert bootstrap_ci([1.0] * 7) == [1.0, 1.0]
    assert bootstrap_ci([]) is None  # not measured: None, never NaN


def test_yes_no_and_free_text_answers_are_read_and_voted():
    """parse_answer per type, as the docstring shows; a yes/no or free-text vote counts normalised answers."""
    assert scotd.parse_answer("Yes. Frogs can jump.", "yesno") == "yes"
    assert scotd.parse_answer("false, since ...", "yesno") == "no" and scotd.parse_answer("maybe", "yesno") is None
    assert scotd.parse_answer("The Eiffel Tower. It is tall.", "text") == "eiffel tower"
    assert scotd.normalize_text("  An   apple!") == "apple" and scotd.normalize_text("the.") is None
    chains = [" It flies. So the answer is yes.\n\n", " So the answer is No.", " So the answer is yes, clearly.", " hmm"]
    answers = [scotd.extract_answer("cot", c, None, "yesno") for c in chains]
    assert answers == ["yes", "no", "yes", None] and scotd.majority_vote(answers) == "yes"
    texts = [" So the answer is the Eiffel Tower.", " So the answer is Eiffel tower", " So the answer is Louvre."]
    assert scotd.majority_vote([scotd.extract_answer("cot", c, None, "text") for c in texts]) == "eiffel tower"
    assert scotd.kind_of({"answer_type": "yesno"}) == "yesno" and scotd.kind_of({"choices": ["a", "b"]}) == "choice"
    assert scotd.kind_of({}) == "number"
