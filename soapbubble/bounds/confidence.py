"""Confidence bounds for certificates: exact fixed-n bounds and an anytime-valid sequence.

Everything here runs on the host in float64 from integer counts; these are the
bounds a certificate rests on. (:mod:`soapbubble.bounds.stats` keeps jit-able
versions for training and differentiable use.)

Fixed n: Clopper-Pearson
------------------------
The lower ``1 - alpha`` bound ``L`` is the largest ``p`` with
``P_p(X >= count) <= alpha`` for ``X ~ Binomial(n, p)``, i.e. the ``alpha``
quantile of ``Beta(count, n - count + 1)``. It is computed as
``scipy.special.betaincinv`` and then *checked* with the binomial tail
``scipy.stats.binom.sf`` and stepped down until the tail at the returned value
is at most ``alpha (1 - TAIL_MARGIN)``. The margin covers the relative error of
the float64 tail (boost's ``ibeta``, accurate to far better than 1e-9
relative), so the value returned is never above the exact bound. Any ``n`` that
fits an int64 is allowed.

Anytime-valid: the beta-binomial mixture (Robbins)
--------------------------------------------------
For a prior ``Beta(a, b)`` and ``S`` successes in ``t`` trials,
``log M_t(p) = log B(a + S, b + t - S) - log B(a, b) - S log p - (t - S) log(1 - p)``
is the log of a nonnegative martingale with ``M_0 = 1`` under ``pA = p``; by
Ville's inequality ``P(exists t: M_t(pA) >= 1/alpha) <= alpha``. The lower end of
the confidence sequence ``{p : M_t(p) < 1/alpha}`` is therefore a lower bound on
``pA`` that holds at every look at once, whatever the stopping rule.
``log M_t`` is convex in ``p`` with its minimum at ``S/t``, so the lower end is
one bisection on ``[0, S/t]``. :func:`mixture_excludes` is the decision form
used by the sequential route: ``p`` is excluded (``pA > p`` is certified) when
``p <= S/t`` and ``log M_t(p) >= log(1/alpha) + margin``; the margin
(:func:`mixture_margin`) covers float64 rounding of ``log M_t``.

Example:
  >>> import numpy as np
  >>> float(clopper_pearson_lower_exact(990, 1000, 1e-3)) > 0.97
  True
  >>> bool(mixture_lower(1000, 1000, 1e-3) < clopper_pearson_lower_exact(1000, 1000, 1e-3))
  True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.special
import scipy.stats

from soapbubble._validation import check_unit_interval

__all__ = [
    "TAIL_MARGIN",
    "MIXTURE_PRIOR",
    "clopper_pearson_lower_exact",
    "clopper_pearson_upper_exact",
    "mixture_log_martingale",
    "mixture_margin",
    "mixture_excludes",
    "mixture_lower",
    "mixture_upper",
    "subtract_down",
    "add_up",
    "one_minus_up",
]

#: Relative margin on alpha when a binomial tail is checked (covers its float64 error).
TAIL_MARGIN = 1e-9
#: The default prior ``Beta(a, b)`` of the mixture confidence sequence (see SEQUENTIAL.md).
MIXTURE_PRIOR = (1.0, 1.0)

_INT64_MAX = np.iinfo(np.int64).max


def _counts(count: Any, n: Any) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(count)
    t = np.asarray(n)
    for name, v in (("count", c), ("n", t)):
        if v.dtype == bool or not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)):
            raise TypeError(f"{name} must be integers, got dtype {v.dtype}")
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v) & (v == np.floor(v))):
            raise ValueError(f"{name} must be whole numbers, got {v[~(np.isfinite(v) & (v == np.floor(v)))].ravel()[0]!r}")
    c, t = np.broadcast_arrays(c.astype(np.float64), t.astype(np.float64))
    if np.any(t < 1) or np.any(t > _INT64_MAX):
        raise ValueError(f"n must be an integer in [1, 2**63 - 1], got {t[(t < 1) | (t > _INT64_MAX)].ravel()[0]:.0f}")
    bad = (c < 0) | (c > t)
    if np.any(bad):
        i = np.argwhere(bad)[0] if bad.ndim else ()
        raise ValueError(f"count must be an integer in [0, n], got count={c[tuple(i)]:.0f} with n={t[tuple(i)]:.0f}")
    return c, t


def _alpha(alpha: Any) -> float:
    return check_unit_interval(alpha, "alpha")


def _step_until(p: np.ndarray, ok, down: bool) -> np.ndarray:
    """Moves ``p`` down (or up) by growing relative steps until ``ok(p)`` holds everywhere."""
    shape = np.shape(p)
    p = np.array(p, dtype=np.float64).reshape(-1)
    check = lambda q: np.asarray(ok(q.reshape(shape))).reshape(-1)  # noqa: E731
    step = 2.0**-50
    bad = ~check(p)
    while np.any(bad):
        if down:
            p[bad] = np.maximum(p[bad] * (1.0 - step), 0.0)
        else:
            p[bad] = np.minimum(p[bad] + (1.0 - p[bad]) * step + step * p[bad], 1.0)
        step = min(2.0 * step, 0.5)
        bad = ~check(p)
    return p.reshape(shape)


def clopper_pearson_lower_exact(count: Any, n: Any, alpha: float) -> np.ndarray:
    """One-sided lower ``1 - alpha`` Clopper-Pearson bound, exact, never above the true bound.

    Args:
      count: successes, integers in ``[0, n]`` (any shape, broadcast with ``n``).
      n: trials, integers ``>= 1`` (any int64).
      alpha: level in (0, 1).

    Returns:
      float64 array of the broadcast shape: 0 where ``count = 0``.

    Raises:
      ValueError, TypeError: for counts or a level out of range.

    Example:
      >>> round(float(clopper_pearson_lower_exact(5, 5, 0.05)), 5)   # 0.05 ** (1/5)
      0.54928
    """
    c, t = _counts(count, n)
    a = _alpha(alpha)
    pos = c > 0
    cs, ts = np.where(pos, c, 1.0), t
    with np.errstate(all="ignore"):
        p = np.where(pos, scipy.special.betaincinv(cs, ts - cs + 1.0, a), 0.0)
    p = np.nan_to_num(p, nan=0.0)

    def ok(q):
        tail = scipy.stats.binom.sf(cs - 1.0, ts, q)  # P_q(X >= count)
        return ~pos | (q <= 0.0) | (tail <= a * (1.0 - TAIL_MARGIN))

    return _step_until(p, ok, down=True)


def clopper_pearson_upper_exact(count: Any, n: Any, alpha: float) -> np.ndarray:
    """One-sided upper ``1 - alpha`` Clopper-Pearson bound, exact, never below the true bound.

    The smallest ``p`` with ``P_p(X <= count) <= alpha`` (1 where ``count = n``).

    Example:
      >>> round(float(clopper_pearson_upper_exact(0, 5, 0.05)), 5)   # 1 - 0.05 ** (1/5)
      0.45072
    """
    c, t = _counts(count, n)
    a = _alpha(alpha)
    below = c < t
    cs = np.where(below, c, 0.0)
    with np.errstate(all="ignore"):
        p = np.where(below, scipy.special.betaincinv(cs + 1.0, t - cs, 1.0 - a), 1.0)
    p = np.nan_to_num(p, nan=1.0)

    def ok(q):
        tail = scipy.stats.binom.cdf(cs, t, q)  # P_q(X <= count)
        return ~below | (q >= 1.0) | (tail <= a * (1.0 - TAIL_MARGIN))

    return _step_until(p, ok, down=False)


def mixture_log_martingale(count: Any, n: Any, p: Any, prior: tuple[float, float] = MIXTURE_PRIOR) -> np.ndarray:
    """``log M_t(p)`` of the beta-binomial mixture (module docstring), float64, broadcast.

    ``p`` must lie in (0, 1); ``+inf`` where ``p`` is impossible given the counts
    (``p = 0`` with a success, ``p = 1`` with a failure).
    """
    a, b = prior
    s = np.asarray(count, np.float64)
    t = np.asarray(n, np.float64)
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        like = scipy.special.xlogy(s, p) + scipy.special.xlog1py(t - s, -p)
        return scipy.special.betaln(a + s, b + t - s) - scipy.special.betaln(a, b) - like


def mixture_margin(n: Any) -> np.ndarray:
    """Slack on ``log(1/alpha)`` covering float64 rounding of ``log M_t`` (terms of size ~t)."""
    return 1e-12 * (np.asarray(n, np.float64) + 64.0)


def mixture_excludes(count: Any, n: Any, p: Any, alpha: float, prior: tuple[float, float] = MIXTURE_PRIOR) -> np.ndarray:
    """Whether the mixture sequence at level ``alpha`` rules out ``pA <= p`` after these counts.

    True iff ``p <= count / n`` and ``log M_t(p) >= log(1/alpha) + mixture_margin(n)``;
    then every ``q <= p`` is excluded too (convexity), so ``pA > p`` is certified.
    """
    a = _alpha(alpha)
    s = np.asarray(count, np.float64)
    t = np.asarray(n, np.float64)
    p = np.asarray(p, np.float64)
    with np.errstate(invalid="ignore"):
        log_m = mixture_log_martingale(s, t, p, prior)
    return (p * t <= s) & (log_m >= math.log(1.0 / a) + mixture_margin(t))


def _bisect(lo: np.ndarray, hi: np.ndarray, inside_low) -> np.ndarray:
    """Largest x in [lo, hi] with ``inside_low(x)`` (assumed true at lo, monotone), to ~1 ulp."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        good = inside_low(mid)
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
        if np.all(hi - lo <= 4 * np.finfo(np.float64).eps * np.maximum(hi, 1e-300)):
            break
    return lo


def mixture_lower(count: Any, n: Any, alpha: float, prior: tuple[float, float] = MIXTURE_PRIOR) -> np.ndarray:
    """The lower end of the mixture confidence sequence after ``count`` successes in ``n`` trials.

    Valid simultaneously for every ``n`` (anytime-valid); rounded down.

    Example:
      >>> 0.97 < float(mixture_lower(1000, 1000, 1e-3)) < 0.99
      True
    """
    c, t = _counts(count, n)
    _alpha(alpha)
    hat = c / t
    lo = np.zeros_like(hat)
    out = _bisect(lo, hat, lambda p: mixture_excludes(c, t, p, alpha, prior) | (p <= 0.0))
    return np.where(c > 0, out, 0.0)


def mixture_upper(count: Any, n: Any, alpha: float, prior: tuple[float, float] = MIXTURE_PRIOR) -> np.ndarray:
    """The upper end of the mixture confidence sequence (the lower end of the failures', reflected)."""
    c, t = _counts(count, n)
    return one_minus_up(mixture_lower(t - c, t, alpha, prior[::-1]))


def subtract_down(p: Any, tv: float) -> np.ndarray:
    """``max(p - tv, 0)`` rounded down (a total-variation charge on a lower bound)."""
    p = np.asarray(p, np.float64)
    if tv == 0.0:
        return p
    return np.maximum(np.nextafter(p - tv, -1.0), 0.0)


def add_up(p: Any, tv: float) -> np.ndarray:
    """``min(p + tv, 1)`` rounded up (a total-variation charge on an upper bound)."""
    p = np.asarray(p, np.float64)
    if tv == 0.0:
        return p
    return np.minimum(np.nextafter(p + tv, 2.0), 1.0)


def one_minus_up(p: Any) -> np.ndarray:
    """``1 - p`` rounded up (one ulp above the correctly rounded difference), capped at 1."""
    return np.minimum(np.nextafter(1.0 - np.asarray(p, np.float64), 2.0), 1.0)
