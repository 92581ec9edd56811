"""Jit-able statistics: confidence bounds, the abstention test, radii (training and differentiable use).

Certificates do not use these bounds: ``certify``, ``predict`` and the sequential
route compute theirs on the host in float64 from the counts, exact by
construction and for any ``n``
(:mod:`soapbubble.bounds.confidence`). The functions here run inside ``jit``,
``vmap`` and ``grad`` (training objectives, research code); they are sound up to
the documented envelope of jax's ``betainc`` below, for ``n <= MAX_N``.

Alpha accounting
----------------
A certificate rests on two estimated quantities, each given its own share of the
failure probability:

* ``pA``, the probability that the base classifier returns the top class under
  noise, gets a one-sided Clopper-Pearson lower bound at level ``alpha_p``
  (exact on the host for certificates, jit-able here) from ``n`` samples drawn *after* the class was
  chosen on separate samples (Cohen et al.). ``P(pA < pA_lower) <= alpha_p``.
* The Monte Carlo part of the dual bound, ``D(lambda) = E[(lambda - W)_+]`` of
  MATH.md section 3, gets a one-sided DKW/Massart bound at level ``alpha_D``
  (:func:`dkw_epsilon`): with probability ``>= 1 - alpha_D`` the empirical CDF of
  ``W`` is nowhere more than ``epsilon`` below the true one, so
  ``D(lambda) <= D_hat(lambda) + lambda * epsilon`` for every ``lambda`` at once.

By the union bound a certificate is wrong with probability at most
``alpha_p + alpha_D``; that sum is the failure probability to report. A table
of ``D`` over ``m`` radii needs one DKW event per radius, even when the radii
share one sample set (``W`` is a different random variable at each radius), so
``alpha_D`` is split between them by the union bound: ``alpha_D / m`` each.
:func:`binomial_test_pvalue` serves ``predict`` (abstain when the two-sided test
of ``p = 1/2`` has p-value ``> alpha``); :func:`gaussian_radius` and
:func:`gaussian_radius_bilateral` are Cohen et al.'s closed forms, the ``k = 0``
reference for the dual bound.

Numerics and soundness
----------------------
Everything is pure jax (jit, vmap). The binomial quantities invert
``jax.scipy.special.betainc`` by bisection on the *bit patterns* of the float
(for non-negative floats the integer order is the value order), so 32 (float32)
or 64 (float64) steps bracket the root to one ulp everywhere, also for tiny
roots. The bound returned is the lower end of the bracket, made sound against
``betainc``'s own error by a safety margin on the level:

* jax's ``betainc`` takes ``log B(a, b)`` as a difference of ``lgamma`` values of
  size ``~ n log n``, so its relative error grows like ``eps * n * log n``.
  Measured against ``scipy.special.betainc`` at 8e5 random ``(count, n, p)``
  near the roots (n log-uniform up to 2**24, alpha down to 1e-15) the log
  relative error (of ``F`` on the continued fraction's direct branch, of
  ``1 - F`` on its reflected branch) stayed below ``2.6 eps n log(n + 1)`` in
  float32 (n >= 10; 1.3e-5 below) and ``6.3 eps n log(n + 1)`` in float64
  (n >= 100; 4.9e-13 below), as long as n <= 2**20.
* :func:`betainc_log_error_bound` is the documented envelope
  ``E(n) = c0 + c1 * eps * n * log(n + 1)`` with ``(c0, c1) = (5e-5, 6)`` in
  float32 and ``(5e-13, 12)`` in float64, about twice the worst measured error.
  It also covers rounding ``alpha`` itself to float32.
* The bisection only moves its lower end to ``p`` when ``F_hat(p)`` is below
  ``alpha * exp(-E)`` (direct branch) or ``F_hat(p) <= 1 - (1 - alpha) exp(E)``
  (reflected branch, both near the branch switch), i.e. only when the true
  ``F(p) < alpha`` whatever ``betainc``'s error within the envelope.
* Above ``n = 2**20`` the continued fraction (600 iterations in float64, 200 in
  float32) stops converging near the median and the envelope fails, so
  ``n <= MAX_N`` is enforced: a ValueError when ``n`` is concrete, the trivial
  bound (0 for the lower bound, 1 for the upper, 1 for the p-value) when traced.

Cost of the margin: in float64 a few 1e-12 in ``pA_lower`` at n = 1e6 (far
inside the 1e-10 agreement with scipy); in float32 up to ~3e-3 at n = 1e6 (the
level effectively shrinks by ``exp(-E)``, E ~ 10). Certify in float64 when it
matters; float32 is sound, only looser.

Example:
  >>> import jax
  >>> from soapbubble.bounds import stats
  >>> with jax.enable_x64(True):
  ...     p = stats.clopper_pearson_lower(990, 1000, 1e-3)
  ...     float(p) > 0.97, float(stats.gaussian_radius(p, 0.5)) > 0.9
  (True, True)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from soapbubble._validation import concrete as _concrete
from jax import lax
from jax.scipy.special import betainc, ndtri

__all__ = [
    "MAX_N",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "binomial_test_pvalue",
    "dkw_epsilon",
    "gaussian_radius",
    "gaussian_radius_bilateral",
    "betainc_log_error_bound",
]

Array = jax.Array

#: Largest sample count for the betainc-based functions (validated range, see module doc).
MAX_N = 2**20

# Envelope E(n) = c0 + c1 * eps * n * log(n + 1) of |log relative error| of jax's betainc.
_ENVELOPE = {np.dtype(np.float32): (5e-5, 6.0), np.dtype(np.float64): (5e-13, 12.0)}


# --------------------------------------------------------------------------- validation


def _show(v: np.ndarray, bad: np.ndarray) -> str:
    return repr(float(v[bad].flat[0])) if v.ndim else repr(float(v))


def _check_alpha(alpha: Any, name: str = "alpha") -> None:
    v = _concrete(alpha)
    if v is None:
        return
    bad = ~((v > 0) & (v < 1))
    if bad.any():
        raise ValueError(f"{name} must be in (0, 1), got {_show(v, bad)}")


def _check_n(n: Any, max_n: float | None) -> np.ndarray | None:
    v = _concrete(n)
    if v is None:
        return None
    hi = math.inf if max_n is None else max_n
    bad = ~((v >= 1) & (v <= hi) & (v == np.floor(v)))
    if bad.any():
        rng = "an integer >= 1" if max_n is None else f"an integer in [1, {max_n}]"
        why = "" if max_n is None else " (the range where jax's betainc is validated)"
        raise ValueError(f"n must be {rng}{why}, got {_show(v, bad)}")
    return v


def _check_count(count: Any, n_val: np.ndarray | None) -> None:
    v = _concrete(count)
    if v is None:
        return
    bad = ~((v >= 0) & (v == np.floor(v)))
    if bad.any():
        raise ValueError(f"count must be an integer in [0, n], got {_show(v, bad)}")
    if n_val is not None:
        v, nb = np.broadcast_arrays(v, n_val)
        bad = v > nb
        if bad.any():
            i = np.argwhere(bad)[0] if bad.ndim else ()
            raise ValueError(
                f"count must be an integer in [0, n], got count={float(v[tuple(i)])!r} "
                f"with n={float(nb[tuple(i)])!r}"
            )


def _check_prob(p: Any, name: str) -> None:
    v = _concrete(p)
    if v is None:
        return
    bad = ~((v >= 0) & (v <= 1))
    if bad.any():
        raise ValueError(f"{name} must be in [0, 1], got {_show(v, bad)}")


def _check_sigma(sigma: Any) -> None:
    v = _concrete(sigma)
    if v is None:
        return
    bad = ~((v > 0) & np.isfinite(v))
    if bad.any():
        raise ValueError(f"sigma must be finite and > 0, got {_show(v, bad)}")


# --------------------------------------------------------------------------- helpers


def _float_dtype() -> np.dtype:
    """float64 under x64, else float32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def betainc_log_error_bound(n: Any, dtype: Any = None) -> Array:
    """Documented envelope on ``|log relative error|`` of jax's ``betainc`` at ``a + b = n + 1``.

    ``E(n) = c0 + c1 * eps * n * log(n + 1)`` with ``(c0, c1) = (5e-5, 6)`` in float32,
    ``(5e-13, 12)`` in float64 (about twice the worst error measured against scipy
    for ``n <= MAX_N``; see the module docstring).

    Args:
      n: number of trials, array-like.
      dtype: float32 or float64; default: float64 under x64, else float32.

    Returns:
      Array of ``E(n)`` in ``dtype``, shape of ``n``.

    Example:
      >>> float(betainc_log_error_bound(10**6, "float32")) > 1.0
      True
    """
    dt = np.dtype(dtype) if dtype is not None else _float_dtype()
    c0, c1 = _ENVELOPE[dt]
    n = jnp.asarray(n, dt)
    return c0 + c1 * float(np.finfo(dt).eps) * n * jnp.log1p(n)


def _bisect_bits(pred, shape, dt: np.dtype) -> Array:
    """Largest float ``x`` in [0, 1] (to one ulp) with ``pred(x)`` true, assuming ``pred(0)``.

    Bisection on the integer bit patterns: for non-negative floats their order is the
    value order, so a fixed number of steps gives ulp resolution at every scale.
    """
    it = jnp.int32 if dt == np.float32 else jnp.int64
    steps = 32 if dt == np.float32 else 64
    lo = jnp.zeros(shape, it)
    hi = jnp.full(shape, lax.bitcast_convert_type(jnp.asarray(1.0, dt), it), it)

    def body(_, state):
        lo, hi = state
        mid = lo + (hi - lo) // 2
        ok = pred(lax.bitcast_convert_type(mid, dt))
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, steps, body, (lo, hi))
    return lax.bitcast_convert_type(lo, dt)


def _cp_lower(count: Array, n: Array, alpha: Array, dt: np.dtype) -> Array:
    """Sound lower Clopper-Pearson bound, no validation. Inputs already broadcast, dtype dt."""
    eps = float(np.finfo(dt).eps)
    e = betainc_log_error_bound(n, dt)
    interior = (count > 0) & (count < n)
    a = jnp.where(interior, count, 1.0)  # safe parameters where the closed forms apply
    b = jnp.where(interior, n - count + 1.0, 1.0)
    cut = (a + 1.0) / (a + b + 2.0)  # jax's switch to the reflected continued fraction
    t_direct = alpha * jnp.exp(-e)
    t_reflect = alpha - (1.0 - alpha) * jnp.expm1(e)
    t_both = jnp.minimum(t_direct, t_reflect)

    def pred(x):
        f = betainc(a, b, x)
        near = jnp.abs(x - cut) <= 16 * eps * cut
        t = jnp.where(near, t_both, jnp.where(x < cut, t_direct, t_reflect))
        return f < t

    root = _bisect_bits(pred, count.shape, dt)
    # A level so small that betainc underflows cannot be trusted: give the trivial bound.
    tiny = 2.0**-100 if dt == np.float32 else 2.0**-1000
    root = jnp.where(t_direct > tiny, root, 0.0)
    # count = n: F(p) = p^n exactly, at the same shrunken level, then one ulp down for rounding.
    full = jnp.nextafter(jnp.exp((jnp.log(alpha) - e) / n), jnp.zeros((), dt))
    out = jnp.where(count == 0, 0.0, jnp.where(count == n, full, root))
    return jnp.where(n <= MAX_N, out, 0.0)


def _prepare(count: Any, n: Any, alpha: Any) -> tuple[Array, Array, Array, np.dtype]:
    _check_alpha(alpha)
    n_val = _check_n(n, MAX_N)
    _check_count(count, n_val)
    dt = _float_dtype()
    count, n, alpha = jnp.broadcast_arrays(
        jnp.asarray(count, dt), jnp.asarray(n, dt), jnp.asarray(alpha, dt)
    )
    return count, n, alpha, dt


# --------------------------------------------------------------------------- public API


def clopper_pearson_lower(count: Any, n: Any, alpha: Any) -> Array:
    """One-sided lower ``1 - alpha`` Clopper-Pearson bound on a binomial proportion.

    The exact bound is the ``alpha`` quantile of ``Beta(count, n - count + 1)``
    (``scipy.stats.beta.ppf``); ``count = 0`` gives 0 and ``count = n`` gives
    ``alpha ** (1 / n)``. The value returned never exceeds it: the lower end of a
    one-ulp bisection bracket at a level shrunk by :func:`betainc_log_error_bound`
    (module docstring). In float64 it agrees with scipy to ~1e-12 (n <= 1e6).

    Args:
      count: successes, integers in ``[0, n]`` (any shape, broadcast with ``n``, ``alpha``).
      n: trials, integers in ``[1, MAX_N]``.
      alpha: level in ``(0, 1)``.

    Returns:
      Array of the broadcast shape; float64 under x64, else float32. Checks run
      when inputs are concrete; a traced ``n > MAX_N`` gives 0.

    Raises:
      ValueError: for concrete inputs out of range.

    Example:
      >>> import jax
      >>> with jax.enable_x64(True):
      ...     round(float(clopper_pearson_lower(5, 5, 0.05)), 5)   # 0.05 ** (1/5)
      0.54928
    """
    count, n, alpha, dt = _prepare(count, n, alpha)
    return _cp_lower(count, n, alpha, dt)


def clopper_pearson_upper(count: Any, n: Any, alpha: Any) -> Array:
    """One-sided upper ``1 - alpha`` Clopper-Pearson bound: ``1 - lower(n - count, n, alpha)``.

    Never below the exact bound: the lower bound it reflects is sound, and where
    ``1 - lower`` is not exact in floating point (lower < 1/2) it is moved up one ulp.

    Args:
      count: successes, integers in ``[0, n]``.
      n: trials, integers in ``[1, MAX_N]``.
      alpha: level in ``(0, 1)``.

    Returns:
      Array of the broadcast shape; float64 under x64, else float32. A traced
      ``n > MAX_N`` gives 1.

    Raises:
      ValueError: for concrete inputs out of range.

    Example:
      >>> float(clopper_pearson_upper(0, 10, 0.05)) > 0.25
      True
    """
    count, n, alpha, dt = _prepare(count, n, alpha)
    low = _cp_lower(n - count, n, alpha, dt)
    up = 1.0 - low
    up = jnp.where(low < 0.5, jnp.minimum(jnp.nextafter(up, jnp.ones((), dt) * 2), 1.0), up)
    return up


def binomial_test_pvalue(count: Any, n: Any) -> Array:
    """Two-sided exact binomial test of ``p = 1/2`` (``scipy.stats.binomtest(count, n).pvalue``).

    For ``p = 1/2`` the law is symmetric, so with ``m = min(count, n - count)`` the
    p-value is ``min(1, 2 P(X <= m)) = min(1, 2 I_{1/2}(n - m, m + 1))`` (1 when
    ``2 m = n``). ``predict`` abstains when it exceeds ``alpha``, so an
    underestimate is the unsafe error: the betainc value is multiplied by
    ``exp(E(n))`` (:func:`betainc_log_error_bound`), so the result is never below
    the exact p-value. Float64 agreement with scipy: ~1e-12 at n = 1e3, within
    ``E(n) * pvalue`` in general (~2.5e-8 relative at n = 1e6, where jax's
    betainc itself is off by up to 2e-9). Never below ``2**-90`` in float32
    (``2**-1000`` in float64), which bounds what an underflowed tail may hide.

    Args:
      count: count of the top class, integers in ``[0, n]``.
      n: trials, integers in ``[1, MAX_N]``.

    Returns:
      Array of the broadcast shape in ``[0, 1]``; float64 under x64, else float32.
      A traced ``n > MAX_N`` gives 1 (always abstain).

    Raises:
      ValueError: for concrete inputs out of range.

    Example:
      >>> float(binomial_test_pvalue(5, 10))
      1.0
    """
    n_val = _check_n(n, MAX_N)
    _check_count(count, n_val)
    dt = _float_dtype()
    count, n = jnp.broadcast_arrays(jnp.asarray(count, dt), jnp.asarray(n, dt))
    m = jnp.minimum(count, n - count)
    tail = betainc(n - m, m + 1.0, jnp.asarray(0.5, dt))
    pv = jnp.minimum(1.0, 2.0 * tail * jnp.exp(betainc_log_error_bound(n, dt)))
    # Where betainc underflows the true tail is below this floor (E <= 11 for n <= MAX_N).
    pv = jnp.maximum(pv, 2.0**-90 if dt == np.float32 else 2.0**-1000)
    return jnp.where((2.0 * m < n) & (n <= MAX_N), pv, 1.0)


def dkw_epsilon(n: Any, alpha: Any) -> Array:
    """One-sided DKW/Massart epsilon ``sqrt(log(1/alpha) / (2 n))``.

    With probability ``>= 1 - alpha``, ``sup_t (F(t) - F_hat_n(t)) <= epsilon``
    (Massart 1990; the one-sided form needs no factor 2 in the log). Massart's
    bound is proven for levels ``alpha <= 1/2``; a larger ``alpha`` gets the
    (larger, hence still valid) epsilon of level 1/2. Rounded up by 8 ulps so
    floating point never shrinks it.

    Args:
      n: sample size, integers >= 1.
      alpha: level in ``(0, 1)``.

    Returns:
      Array of the broadcast shape; float64 under x64, else float32.

    Raises:
      ValueError: for concrete inputs out of range.

    Example:
      >>> round(float(dkw_epsilon(10**6, 1e-3)), 5)
      0.00186
    """
    _check_alpha(alpha)
    _check_n(n, None)
    dt = _float_dtype()
    n, alpha = jnp.asarray(n, dt), jnp.asarray(alpha, dt)
    eps = jnp.sqrt(-jnp.log(jnp.minimum(alpha, 0.5)) / (2.0 * n))
    return eps * (1.0 + 8 * float(np.finfo(dt).eps))


@jax.custom_jvp
def _ndtri(p):
    return ndtri(p)


@_ndtri.defjvp
def _ndtri_jvp(primals, tangents):
    (p,), (dp,) = primals, tangents
    x = ndtri(p)
    # d/dp Phi^-1(p) = 1 / phi(x) = sqrt(2 pi) exp(x^2 / 2); +inf at p in {0, 1}
    # (jax's own ndtri gradient is 0 there).
    return x, dp * jnp.sqrt(2.0 * jnp.pi).astype(x.dtype) * jnp.exp(0.5 * x * x)


def gaussian_radius(p_lower: Any, sigma: Any) -> Array:
    """Cohen et al.'s certified l2 radius ``sigma * Phi^-1(p_lower)``.

    Negative for ``p_lower < 1/2``: there nothing is certified and callers must
    abstain (the value is returned, not clipped, so it stays differentiable).
    ``p_lower = 1`` gives ``+inf`` (and ``p_lower = 0`` gives ``-inf``): a sound
    ``p_lower`` from :func:`clopper_pearson_lower` is below 1 for every finite ``n``.
    Differentiable: ``d/dp = sigma / phi(Phi^-1(p))``. Computed in the dtype of the
    inputs (jax promotion); its rounding is a few ulps, so round published radii down.

    Args:
      p_lower: lower bound on pA, in ``[0, 1]``.
      sigma: Gaussian scale, finite and > 0.

    Returns:
      Array of the broadcast shape.

    Raises:
      ValueError: for concrete inputs out of range.

    Example:
      >>> round(float(gaussian_radius(0.975, 0.5)), 4)
      0.98
    """
    _check_prob(p_lower, "p_lower")
    _check_sigma(sigma)
    p_lower = jnp.asarray(p_lower)
    p_lower = p_lower.astype(jnp.result_type(p_lower, float))
    return sigma * _ndtri(p_lower)


def gaussian_radius_bilateral(p_lower: Any, p_upper_runner_up: Any, sigma: Any) -> Array:
    """Bilateral Gaussian radius ``sigma / 2 * (Phi^-1(pA_lower) - Phi^-1(pB_upper))``.

    Cohen et al. Theorem 1 / paper Appendix D: with ``pA >= pA_lower`` for the top
    class and ``pB <= pB_upper`` for every other class, the prediction is constant
    on the l2 ball of this radius. Not positive when ``pA_lower <= pB_upper``
    (abstain). Equal arguments give exactly 0 (also at 0 or 1, where the formula
    would be ``inf - inf``); ``pA_lower = 1`` or ``pB_upper = 0`` (not both equal)
    gives ``+inf``.

    Args:
      p_lower: lower bound on the top class's probability, in ``[0, 1]``.
      p_upper_runner_up: upper bound on the runner-up's probability, in ``[0, 1]``.
      sigma: Gaussian scale, finite and > 0.

    Returns:
      Array of the broadcast shape.

    Raises:
      ValueError: for concrete inputs out of range.

    Example:
      >>> round(float(gaussian_radius_bilateral(0.975, 0.025, 0.5)), 4)
      0.98
    """
    _check_prob(p_lower, "p_lower")
    _check_prob(p_upper_runner_up, "p_upper_runner_up")
    _check_sigma(sigma)
    pa, pb = jnp.asarray(p_lower), jnp.asarray(p_upper_runner_up)
    dt = jnp.result_type(pa, pb, float)
    pa, pb = pa.astype(dt), pb.astype(dt)
    r = 0.5 * sigma * (_ndtri(pa) - _ndtri(pb))
    return jnp.where(pa == pb, jnp.zeros_like(r), r)
