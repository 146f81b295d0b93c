"""The sampler on hand-made distributions: exact kept sets, exact probabilities, exact draws."""

import numpy as np
import pytest

from grokcpu.errors import GrokError
from grokcpu.sampling import (apply_min_p, apply_repeat_penalty, apply_top_k, apply_top_p, draw,
                              filtered_logits, make_sampler, probabilities)


def logits_of(p):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, dtype=np.float32))


def kept(x):
    return set(np.flatnonzero(np.isfinite(x)).tolist())


# -- top-p: the reference's nucleus rule (spec §6) ----------------------------------------------

def test_top_p_mlx_example():
    # sorted ascending p = [0, .1, .4, .5], cumsum [0, .1, .5, 1]; 1 - 0.6 = 0.4 -> first index 2
    # -> keep logits >= log(.4): tokens 1 and 2, renormalised 5/9 and 4/9
    x = apply_top_p(logits_of([0.0, 0.5, 0.4, 0.1]), 0.6)
    assert kept(x) == {1, 2}
    np.testing.assert_allclose(probabilities(x), [0, 5 / 9, 4 / 9, 0], atol=1e-6)


def test_top_p_is_the_smallest_nucleus():
    p = [0.05, 0.15, 0.3, 0.5]          # ascending cumsum .05 .2 .5 1
    assert kept(apply_top_p(logits_of(p), 0.45)) == {3}          # 0.55 -> index 3 (0.5 alone covers 0.45)
    assert kept(apply_top_p(logits_of(p), 0.55)) == {2, 3}       # 0.45 -> index 2
    assert kept(apply_top_p(logits_of(p), 0.9)) == {1, 2, 3}     # 0.10 -> index 1
    assert kept(apply_top_p(logits_of(p), 1.0)) == {0, 1, 2, 3}  # top_p 1 removes nothing


def test_top_p_keeps_ties_at_the_threshold():
    # logits [1,1,1,0]: ascending softmax [1, e, e, e] / (1+3e) = [.1092, .2969, .2969, .2969]
    # cumsum [.1092, .4061, .7031, 1]. top_p 0.5 -> 0.5 -> index 2, whose logit is 1: all three
    # tied tokens stay although two would already cover 0.5.
    x = np.array([1, 1, 1, 0], np.float32)
    assert kept(apply_top_p(x, 0.5)) == {0, 1, 2}
    assert kept(apply_top_p(x, 0.88)) == {0, 1, 2}     # 0.12 > .1092 -> index 1 (logit 1)
    assert kept(apply_top_p(x, 0.9)) == {0, 1, 2, 3}   # 0.10 <= .1092 -> index 0 (logit 0)


def test_temperature_comes_before_top_p():
    # p = [.5, .4, .1]; top_p 0.55 -> threshold 0.45.
    # T=1: ascending cumsum [.1, .5, 1] -> index 1 -> keep {0, 1}
    # T=0.5: p ~ [.25, .16, .01] -> [.6098, .3902, .0244], cumsum [.0244, .4146, 1] -> index 2 -> {0}
    x = logits_of([0.5, 0.4, 0.1])
    assert kept(filtered_logits(x, temperature=1.0, top_p=0.55)) == {0, 1}
    assert kept(filtered_logits(x, temperature=0.5, top_p=0.55)) == {0}
    np.testing.assert_allclose(probabilities(filtered_logits(x, temperature=1.0, top_p=0.55)), [5 / 9, 4 / 9, 0], atol=1e-6)


# -- top-k, min-p, repeat penalty: llama.cpp semantics ------------------------------------------

def test_top_k_keeps_exactly_k_lower_ids_win_ties():
    x = np.array([5, 3, 3, 1, 3], np.float32)
    assert kept(apply_top_k(x, 1)) == {0}
    assert kept(apply_top_k(x, 2)) == {0, 1}
    assert kept(apply_top_k(x, 3)) == {0, 1, 2}
    assert kept(apply_top_k(x, 4)) == {0, 1, 2, 4}
    assert kept(apply_top_k(x, 0)) == {0, 1, 2, 3, 4}
    assert kept(apply_top_k(x, 99)) == {0, 1, 2, 3, 4}


def test_min_p():
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_min_p(x, 0.2)) == {0, 1, 2}      # keep p >= 0.1
    assert kept(apply_min_p(x, 0.35)) == {0, 1}        # keep p >= 0.175
    assert kept(apply_min_p(x, 0.0)) == {0, 1, 2, 3}
    np.testing.assert_allclose(probabilities(apply_min_p(x, 0.2)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-6)


def test_repeat_penalty():
    x = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    np.testing.assert_array_equal(apply_repeat_penalty(x, [0, 1, 1], 2.0), [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(apply_repeat_penalty(x, [0, 1, 1], 2.0, last_n=1), [2.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(apply_repeat_penalty(x, [0, 1, 1], 1.0), x)
    np.testing.assert_array_equal(apply_repeat_penalty(x, [0, 3], 2.0, last_n=-1), [1.0, -1.0, 0.5, 1.5])
    np.testing.assert_array_equal(x, [2.0, -1.0, 0.5, 3.0])       # the input is not modified


# -- greedy and the random draw -----------------------------------------------------------------

def test_greedy_is_argmax_and_draws_nothing():
    s = make_sampler(temperature=0, seed=0)
    x = np.array([0.1, 2.0, 2.0, -5], np.float32)
    assert s(x, []) == 1                                    # ties: the lowest id
    assert s(np.array([3.0, 2.9], np.float32), [0]) == 0
    assert make_sampler(temperature=0, repeat_penalty=1.5)(np.array([3.0, 2.9], np.float32), [0]) == 1  # 3/1.5 < 2.9
    assert s.rng.random() == 0.6369616873214543             # default_rng(0)'s first number, still unused


def test_inverse_cdf_draw():
    p = np.array([0.2, 0.3, 0.5])                           # cumulative .2 .5 1
    assert [draw(p, u) for u in (0.0, 0.19, 0.2, 0.49, 0.5, 0.999)] == [0, 0, 1, 1, 2, 2]
    q = np.array([0.0, 0.5, 0.0, 0.5])
    assert [draw(q, u) for u in (0.0, 0.25, 0.5, 0.75, 0.9999999)] == [1, 1, 3, 3, 3]


def test_seeded_draws_are_exact():
    # default_rng(0).random(): .637 .270 .041 .017 .813 .913 -> cumulative [.2, .5, 1] -> 2 1 0 0 2 2
    s = make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    x = logits_of([0.2, 0.3, 0.5])
    assert [s(x, []) for _ in range(6)] == [2, 1, 0, 0, 2, 2]


def test_same_seed_same_tokens():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((60, 300)).astype(np.float32) * 3

    def run(seed):
        s = make_sampler(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repeat_penalty=1.1, seed=seed)
        hist = []
        for r in rows:
            hist.append(s(r, hist))
        return hist

    a = run(7)
    assert a == run(7)
    assert a != run(8)
    assert all(0 <= t < 300 for t in a)


def test_draws_follow_the_filtered_distribution():
    x = np.array([2.0, 1.5, 1.0, 0.0, -1.0], np.float32)
    s = make_sampler(temperature=0.7, top_k=3, top_p=1.0, min_p=0.0, seed=123)
    want = probabilities(filtered_logits(x, temperature=0.7, top_k=3))
    assert want[3] == 0 and want[4] == 0
    n = 20000
    counts = np.bincount([s(x, []) for _ in range(n)], minlength=5) / n
    np.testing.assert_allclose(counts, want, atol=0.015)
    assert counts[3] == 0 and counts[4] == 0


@pytest.mark.parametrize("kw, flag", [
    (dict(temperature=-1), "--temperature"), (dict(top_k=-2), "--top-k"), (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"), (dict(min_p=2.0), "--min-p"), (dict(repeat_penalty=0.0), "--repeat-penalty"),
    (dict(repeat_last_n=-5), "--repeat-last-n"),
])
def test_bad_settings(kw, flag):
    with pytest.raises(GrokError, match=flag):
        make_sampler(**kw)


@pytest.mark.parametrize("n", [0, -3, 1.5, True])
def test_max_tokens_is_checked_with_the_settings(n):
    from grokcpu.sampling import settings
    with pytest.raises(GrokError, match="--max-tokens"):
        settings(max_tokens=n)


def test_settings_negative_seed_is_random():
    from grokcpu.sampling import settings
    assert settings(seed=-1)["seed"] is None and settings(seed=5)["seed"] == 5
    assert settings(temperature=0, max_tokens=3)["max_tokens"] == 3
