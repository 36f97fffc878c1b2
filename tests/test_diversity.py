"""Judge-free diversity metrics on crafted sample sets with hand-computed values."""

import math

import pytest

from flowrl_jax.eval import diversity as dv


def test_tokenize_and_distinct_n_hand_computed():
    toks = [dv.tokenize("a b a c"), dv.tokenize("A b d")]
    assert toks == [["a", "b", "a", "c"], ["a", "b", "d"]]
    # unigrams: a b a c a b d → 7 total, {a,b,c,d} 4 unique
    assert dv.distinct_n(toks, 1) == pytest.approx(4 / 7)
    # bigrams: ab ba ac ab bd → 5 total, 4 unique
    assert dv.distinct_n(toks, 2) == pytest.approx(4 / 5)
    # trigrams: aba bac abd → 3 unique of 3
    assert dv.distinct_n(toks, 3) == pytest.approx(1.0)
    assert dv.distinct_n([["x"]], 2) == 0.0


def test_identical_samples_low_diversity_and_self_bleu_one():
    texts = ["We factor x^2 - 1 = (x-1)(x+1), so the answer is \\boxed{2}."] * 4
    d = dv.problem_diversity(texts, [1, 1, 1, 1])
    assert d["self_bleu"] == pytest.approx(1.0)
    assert d["self_bleu_300"] == pytest.approx(1.0)
    n_tok = len(dv.tokenize(texts[0]))
    assert d["distinct_1"] == pytest.approx(len(set(dv.tokenize(texts[0]))) / (4 * n_tok))
    assert d["distinct_answers"] == 1
    assert d["distinct_correct_paths"] == 1


def test_disjoint_samples_high_diversity():
    texts = ["alpha beta gamma delta epsilon", "one two three four five",
             "red green blue cyan magenta", "north south east west up"]
    d = dv.problem_diversity(texts, [1, 0, 1, 1])
    assert d["distinct_1"] == 1.0 and d["distinct_2"] == 1.0 and d["distinct_3"] == 1.0
    assert d["self_bleu"] == 0.0  # no shared unigram → BLEU 0
    assert d["distinct_correct_paths"] == 3 and d["num_correct"] == 3
    assert d["distinct_answers"] == 0 and d["answered"] == 0


def test_bleu_hand_computed_with_smoothing():
    hyp = "the cat sat on the mat".split()
    ref = "the cat sat on a mat".split()
    # clipped precisions: p1 = 5/6; p2: the-cat, cat-sat, sat-on match (3 of 5) → (3+1)/(5+1);
    # p3: the-cat-sat, cat-sat-on (2 of 4) → 3/5; p4: the-cat-sat-on (1 of 3) → 2/4; BP = 1.
    expected = math.exp((math.log(5 / 6) + math.log(4 / 6) + math.log(3 / 5) + math.log(2 / 4)) / 4)
    assert dv.bleu(hyp, [ref]) == pytest.approx(expected, rel=1e-12)
    # brevity penalty: hypothesis of 3 tokens vs reference of 6 → exp(1 - 6/3)
    short = "the cat sat".split()
    p = math.exp((math.log(1) + math.log(3 / 3) + math.log(2 / 2) + math.log(1 / 1)) / 4)
    assert dv.bleu(short, [ref]) == pytest.approx(math.exp(1 - 2) * p)
    # self-BLEU is the mean of the two directions
    assert dv.self_bleu([hyp, ref]) == pytest.approx((dv.bleu(hyp, [ref]) + dv.bleu(ref, [hyp])) / 2)


def test_answers_normalised_and_counted():
    texts = ["so \\boxed{\\frac{1}{2}}", "thus \\boxed{\\dfrac{1}{2}}", "Answer: 27.0",
             "final \\boxed{27}", "Answer: $x = 5$", "no answer here"]
    d = dv.problem_diversity(texts)
    assert d["distinct_answers"] == 3  # 1/2, 27, 5
    assert d["answered"] == 5
    assert "distinct_correct_paths" not in d


def test_answers_found_by_the_shared_last_boxed():
    # data.extract.last_boxed is the one box finder: braceless `\boxed 5`, `\boxed {x}`
    # and `\fbox{}` count as answers too
    assert dv.extract_answer("\\boxed{a{b}c} and \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    d = dv.problem_diversity(["so \\boxed 5", "so \\boxed {5}", "so \\fbox{6}", "none"])
    assert d["answered"] == 3 and d["distinct_answers"] == 2


def test_cluster_paths_single_link_chain():
    a = "one two three four five six".split()
    b = "one two three four five seven".split()   # J(a,b) = 3/5
    c = "one two three four eight seven".split()  # J(b,c) = 2/6 < .5, J(a,c) = 1/7
    d = "xx yy zz ww vv uu".split()
    assert dv.cluster_paths([a, b, c, d], threshold=0.5) == [0, 0, 1, 2]
    assert dv.cluster_paths([a, b, c, d], threshold=0.3) == [0, 0, 0, 1]  # chain a-b-c links


def test_truncation_to_300_chars():
    base = "x " * 150  # exactly 300 chars shared prefix
    texts = [base + "alpha beta gamma", base + "delta epsilon zeta"]
    d = dv.problem_diversity(texts)
    assert d["self_bleu_300"] == pytest.approx(1.0)
    assert d["self_bleu"] < 1.0
    assert d["distinct_1_300"] == pytest.approx(1 / 300)


def test_benchmark_diversity_aggregates():
    samples = [{"prompt_id": "p", "sample_index": i, "text": t, "score": 1.0}
               for i, t in enumerate(["a b c", "a b c"])]
    samples += [{"prompt_id": "q", "sample_index": i, "text": t, "score": 0.0}
                for i, t in enumerate(["d e f", "g h i"])]
    out = dv.benchmark_diversity(samples)
    assert out["mean"]["self_bleu"] == pytest.approx(0.5)
    assert out["mean"]["distinct_correct_paths"] == pytest.approx(0.5)  # 1 and 0
    assert out["mean"]["num_problems"] == 2.0


def test_answer_key_uses_reward_normaliser():
    # Minerva/DAPO normalisation (flowrl_jax.rewards.math_dapo) drops unit words like "degrees"
    d = dv.problem_diversity(["so Answer: 5 degrees", "hence \\boxed{5}", "Answer: 6"])
    assert d["distinct_answers"] == 2


def test_fast_self_bleu_equals_pairwise_definition():
    import random

    rng = random.Random(0)
    vocab = "a b c d e f g".split()
    for trial in range(20):
        samples = [[rng.choice(vocab) for _ in range(rng.randint(0 if trial else 1, 12))]
                   for _ in range(rng.randint(2, 6))]
        slow = sum(dv.bleu(h, [r for j, r in enumerate(samples) if j != i])
                   for i, h in enumerate(samples)) / len(samples)
        assert dv.self_bleu(samples) == pytest.approx(slow, rel=1e-12, abs=1e-15)


def test_texygen_self_bleu_hand_computed():
    """Texygen convention: BLEU-3, NLTK smoothing method1 (a zero count becomes 0.1)."""
    hyp, ref = list("abcd"), list("abxd")
    # unigrams 3/4, bigrams 1/3 (ab), trigrams 0/2 → 0.1/2; equal lengths → no brevity penalty
    want = (0.75 * (1 / 3) * 0.05) ** (1 / 3)
    assert dv.bleu(hyp, [ref], 3, "epsilon") == pytest.approx(want, rel=1e-12)
    assert dv.self_bleu([hyp, ref], 3, "epsilon") == pytest.approx(want, rel=1e-12)
    # the default (add-one, BLEU-4) differs on the same pair: (3/4 · 2/4 · 1/3 · 1/2)^(1/4)
    assert dv.bleu(hyp, [ref]) == pytest.approx((0.75 * 0.5 * (1 / 3) * 0.5) ** 0.25, rel=1e-12)
    assert dv.bleu(list("ab"), [list("xy")], 3, "epsilon") == 0.0  # no unigram match


def test_self_bleu_variant_is_named_and_selectable():
    samples = [{"prompt_id": "p", "sample_index": i, "text": t, "score": 0.0}
               for i, t in enumerate(["a b c d", "a b x d"])]
    default = dv.benchmark_diversity(samples)
    tex = dv.benchmark_diversity(samples, self_bleu_variant="texygen")
    assert default["self_bleu_variant"].startswith("add1: BLEU-4")
    assert tex["self_bleu_variant"].startswith("texygen: BLEU-3")
    assert tex["mean"]["self_bleu"] == pytest.approx((0.75 * (1 / 3) * 0.05) ** (1 / 3))
    assert default["mean"]["self_bleu"] != tex["mean"]["self_bleu"]
    with pytest.raises(ValueError, match="unknown self-BLEU variant 'nltk'"):
        dv.problem_diversity(["a", "b"], self_bleu_variant="nltk")


def test_fast_self_bleu_equals_pairwise_with_epsilon_smoothing():
    import random

    rng = random.Random(1)
    vocab = "a b c d e f g".split()
    for trial in range(20):
        samples = [[rng.choice(vocab) for _ in range(rng.randint(0 if trial else 1, 12))]
                   for _ in range(rng.randint(2, 6))]
        slow = sum(dv.bleu(h, [r for j, r in enumerate(samples) if j != i], 3, "epsilon")
                   for i, h in enumerate(samples) if h) / len(samples)
        assert dv.self_bleu(samples, 3, "epsilon") == pytest.approx(slow, rel=1e-12, abs=1e-15)
