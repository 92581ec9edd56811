"""Exact Clopper-Pearson on the host and the anytime-valid mixture sequence.

Independent routes: the binomial tail summed in exact rational arithmetic
(fractions) for small n, scipy's beta quantile for large n, a closed form of
the mixture for all-success sequences, and simulation with fixed seeds for the
time-uniform coverage.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats

from soapbubble.bounds import confidence


def _exact_upper_tail(c: int, n: int, p: float) -> Fraction:
    """P_p(X >= c) for X ~ Binomial(n, p), exactly, at the float p taken as a rational."""
    q = Fraction(p)
    return sum(Fraction(math.comb(n, i)) * q**i * (1 - q) ** (n - i) for i in range(c, n + 1))


def _exact_lower_tail(c: int, n: int, p: float) -> Fraction:
    q = Fraction(p)
    return sum(Fraction(math.comb(n, i)) * q**i * (1 - q) ** (n - i) for i in range(0, c + 1))


@pytest.mark.parametrize("n", [1, 7, 40])
@pytest.mark.parametrize("alpha", [1e-3, 0.05])
def test_lower_never_above_exact_bound_small_n(n, alpha):
    counts = np.arange(n + 1)
    low = confidence.clopper_pearson_lower_exact(counts, n, alpha)
    ref = scipy.stats.beta.ppf(alpha, np.maximum(counts, 1), n - counts + 1)
    for c, p, r in zip(counts, low, ref):
        if c == 0:
            assert p == 0.0
            continue
        # The exact tail at the returned p is at most alpha: p is at most the true bound.
        assert _exact_upper_tail(int(c), n, float(p)) <= Fraction(alpha)
        assert p == pytest.approx(r, rel=1e-8, abs=1e-300)  # TAIL_MARGIN = 1e-9 on alpha


@pytest.mark.parametrize("n", [3, 40])
def test_upper_never_below_exact_bound_small_n(n):
    alpha = 0.01
    counts = np.arange(n + 1)
    up = confidence.clopper_pearson_upper_exact(counts, n, alpha)
    for c, p in zip(counts, up):
        if c == n:
            assert p == 1.0
            continue
        assert _exact_lower_tail(int(c), n, float(p)) <= Fraction(alpha)
        assert p == pytest.approx(scipy.stats.beta.ppf(1 - alpha, c + 1, n - c), rel=1e-8)


@pytest.mark.parametrize("n", [2**20 + 1, 10**7, 10**9])
def test_any_n_a_user_can_afford(n):
    counts = np.array([n // 2, n - n // 1000, n - 3, n])
    alpha = 1e-3
    low = confidence.clopper_pearson_lower_exact(counts, n, alpha)
    assert np.all(scipy.stats.binom.sf(counts - 1, n, low) <= alpha)
    np.testing.assert_allclose(low, scipy.stats.beta.ppf(alpha, counts, n - counts + 1), rtol=1e-9)


def test_count_n_closed_form():
    # count = n: the bound is alpha ** (1/n); never above it.
    for n in (1, 10, 1000, 10**6):
        got = float(confidence.clopper_pearson_lower_exact(n, n, 1e-3))
        assert got <= 1e-3 ** (1 / n) and got == pytest.approx(1e-3 ** (1 / n), rel=1e-8)


@pytest.mark.parametrize(
    "count, n, alpha, match",
    [(5, 4, 0.1, r"count must be an integer in \[0, n\]"), (-1, 4, 0.1, r"count must be"),
     (1, 0, 0.1, "n must be an integer"), (1, 4, 0.0, r"alpha must be in \(0, 1\)"),
     (1.5, 4, 0.1, "count must be whole"), (1, 4, float("nan"), r"alpha must be in \(0, 1\)")],
)
def test_bad_counts_refused(count, n, alpha, match):
    with pytest.raises(ValueError, match=match):
        confidence.clopper_pearson_lower_exact(count, n, alpha)


def test_mixture_all_successes_closed_form():
    # Prior Beta(1, 1), S = t: log M_t(p) = -log(t + 1) - t log p, so the lower end
    # is (alpha / (t + 1)) ** (1 / t).
    alpha = 1e-3
    for t in (1, 10, 500, 10**5):
        want = (alpha / (t + 1)) ** (1.0 / t)
        got = float(confidence.mixture_lower(t, t, alpha))
        assert got <= want and got == pytest.approx(want, rel=1e-9)


def test_mixture_log_martingale_is_the_beta_binomial_ratio():
    # M_t(p) = (marginal likelihood under the prior) / (likelihood under p), by quadrature.
    s, t, p = 7, 12, 0.4
    import scipy.integrate

    marginal, _ = scipy.integrate.quad(lambda q: q**s * (1 - q) ** (t - s), 0, 1)
    want = math.log(marginal) - (s * math.log(p) + (t - s) * math.log(1 - p))
    assert float(confidence.mixture_log_martingale(s, t, p)) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("p", [0.6, 0.95])
def test_mixture_covers_at_every_look(p):
    """P(exists t <= T: the sequence excludes the true p) <= alpha, over fixed-seed paths."""
    alpha, paths, horizon = 0.05, 4000, 1500
    rng = np.random.default_rng(1)
    x = rng.random((paths, horizon)) < p
    s = np.cumsum(x, axis=1)
    t = np.arange(1, horizon + 1)[None, :]
    excluded = confidence.mixture_excludes(s, t, p, alpha)
    rate = np.mean(np.any(excluded, axis=1))
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / paths)
    # The lower end at the last look agrees with the decision form.
    last = confidence.mixture_lower(s[:50, -1], horizon, alpha)
    assert np.all((last > p) == excluded[:50, -1])


def test_mixture_lower_is_below_fixed_n_bound_is_the_price_of_anytime():
    counts, n = np.array([600, 900, 990]), 1000
    mix = confidence.mixture_lower(counts, n, 1e-3)
    cp = confidence.clopper_pearson_lower_exact(counts, n, 1e-3)
    assert np.all(mix < cp) and np.all(mix > cp - 0.05)
    up = confidence.mixture_upper(counts, n, 1e-3)
    assert np.all(up > counts / n)
