"""Shared helpers: statistical thresholds derived from the sample size."""

import math

import numpy as np
import pytest
import scipy.stats

from soapbubble._modules import public_modules  # noqa: F401 (test_docs, test_doctests; docs/conf.py walks the same)

# False-rejection rate of every goodness-of-fit check below (keys are fixed, so a
# check either always passes or always fails; this sets how strict it is).
ALPHA = 1e-3


def ks_critical(n: int, alpha: float = ALPHA) -> float:
    """Two-sided one-sample KS threshold from the DKW-Massart inequality."""
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def ks2_critical(n: int, m: int, alpha: float = ALPHA) -> float:
    """Two-sample KS threshold (asymptotic)."""
    return math.sqrt(-math.log(alpha / 2) / 2 * (n + m) / (n * m))


def ks_stat(samples, cdf) -> float:
    return scipy.stats.kstest(np.asarray(samples, dtype=np.float64).ravel(), cdf).statistic


def ks2_stat(a, b) -> float:
    return scipy.stats.ks_2samp(np.ravel(a), np.ravel(b)).statistic


def chi2_pvalue(counts, probs) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(probs, dtype=np.float64) * counts.sum()
    return scipy.stats.chisquare(counts, expected).pvalue


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)

