"""The dual bound by Monte Carlo (MATH.md sections 2-3), compiled with jax.

For a family ``pi0``, an attack (``"l2"`` or ``"linf"``) and a radius ``r``, the
worst-case perturbation ``delta*`` is known in closed form:

==========================  =======  =====================================================
family                      attack   worst case
==========================  =======  =====================================================
Gaussian, L2Family          l2       ``delta* = r e1`` (Theorem 2)
Gaussian, L2Family          linf     the l2 attack at radius ``r sqrt(d)`` (Theorem 3)
MixedLinf                   linf     ``delta* = r (1, ..., 1)`` (Theorem 5)
MixedLinf                   l2       refused: no theorem gives the worst case
PureLinf                    any      refused: no worst case is proven; use MixedLinf
==========================  =======  =====================================================

With ``W = pi0(z - delta*) / pi0(z)``, ``z ~ pi0``, and ``D(lam) = E[(lam - W)_+]``,
the smoothed probability of the top class anywhere in the ball is at least
``V_r(p) = max_lam lam p - D(lam)`` (Theorem 1), where ``p`` is a lower bound on
its probability at the input.

``log W`` depends on ``z`` only through a few per-sample statistics
(:class:`L2RatioStats`: ``(rho, z1)``; :class:`MixedLinfRatioStats`: ``(||z||_inf,
max z, min z, sum z)``), drawn once and reused for every radius and every lambda.
``D`` is estimated on a whole lambda grid from one sort per radius, and made
sound with a one-sided DKW bound: since ``D(lam) = int_0^lam F_W(t) dt``,
``sup_t F_W(t) - F_hat(t) <= eps`` gives ``D(lam) <= D_hat(lam) + lam eps`` for
every lambda at once, with probability ``1 - alpha_d`` over the samples.

Precision: every function here computes in float64 (inside
``jax.enable_x64(True)``, whatever the global flag) and returns float64 arrays;
the MixedLinf samples are drawn in float64 too. Use the results through these
functions or convert them with ``numpy.asarray``: with x64 disabled, jax
operations outside would truncate them to float32.

Example:
  >>> import jax
  >>> from soapbubble import noise
  >>> import jax.numpy as jnp
  >>> from soapbubble.bounds import dual
  >>> family = noise.Gaussian(sigma=0.5)
  >>> curve = dual.dual_curve(jax.random.key(0), family, 16, "l2", r=0.25,
  ...                         lambdas=jnp.geomspace(0.05, 20.0, 401), n_samples=100_000)
  >>> v = dual.lower_bound(0.9, curve)  # Cohen et al.: Phi(Phi^-1(0.9) - 0.5) = 0.7828
  >>> 0.76 < float(v) <= 0.7828
  True
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from soapbubble import noise
from soapbubble._validation import check_positive_int, check_unit_interval
from soapbubble._validation import concrete as _concrete
from soapbubble.bounds import stats as stats_lib
from soapbubble.bounds.rules import worst_case

__all__ = [
    "L2RatioStats",
    "MixedLinfRatioStats",
    "RatioStats",
    "DualCurve",
    "PMinBound",
    "ratio_statistics",
    "negated_statistics",
    "p_min_bound",
    "log_ratio",
    "dual_curve",
    "dual_curve_from_stats",
    "lower_bound",
]

Array = jax.Array

_F64 = jnp.float64
_U = 2.0**-53  # unit roundoff of float64

# Relative slack added to d_upper (times lambda) on top of lam * eps, so that float64
# rounding never makes the bound optimistic: it covers rounding of the statistics
# (float64 sums of d coordinates), of log W and exp, and of lam m - S(m) (each well
# below 1e-8 relative for d <= 1e6); the prefix sums add n * 2^-53 (see _slack).
# The slack is only justified for d <= _ROUNDING_SLACK_MAX_D: Monte Carlo curves for
# larger d are refused (_check_slack_dimension).
_ROUNDING_SLACK = 1e-7
_ROUNDING_SLACK_MAX_D = 10**6


class L2RatioStats(NamedTuple):
    """Per-sample statistics of ``z ~ pi0`` for Gaussian and L2Family (float64).

    Attributes:
      rho: ``(n,)`` ``||z||_2``.
      z1: ``(n,)`` the first coordinate of ``z``.
    """

    rho: Array
    z1: Array


class MixedLinfRatioStats(NamedTuple):
    """Per-sample statistics of ``z ~ pi0`` for MixedLinf (float64).

    Attributes:
      linf: ``(n,)`` ``||z||_inf``.
      zmax: ``(n,)`` ``max_i z_i``.
      zmin: ``(n,)`` ``min_i z_i``.
      zsum: ``(n,)`` ``sum_i z_i``.
    """

    linf: Array
    zmax: Array
    zmin: Array
    zsum: Array


#: The statistics of either kind, as returned by :func:`ratio_statistics`.
RatioStats = Union[L2RatioStats, MixedLinfRatioStats]


class DualCurve(NamedTuple):
    """Estimated ``D(lam) = E[(lam - W)_+]`` on a lambda grid, with a sound upper bound.

    Attributes:
      lambdas: ``(L,)`` float64, the lambda grid.
      d_hat: ``(L,)`` for a scalar radius or ``(m, L)`` for ``m`` radii, float64:
        the Monte Carlo estimate ``D_hat(lam)``.
      d_upper: same shape, float64: ``min(D_hat + lam (eps + rounding slack), lam)``;
        for each radius, ``D(lam) <= d_upper(lam)`` for all lambdas at once with
        probability ``>= 1 - alpha_d`` over the samples.
      epsilon: scalar float64, the one-sided DKW ``eps = sqrt(log(1/alpha_d) / (2 n))``
        (for ``alpha_d > 1/2`` the larger eps of level 1/2: Massart's one-sided bound
        is proven for levels up to 1/2).
    """

    lambdas: Array
    d_hat: Array
    d_upper: Array
    epsilon: Array


class PMinBound(NamedTuple):
    """Variance-adaptive upper bounds on ``D`` at a few lambdas per radius, and ``p_min``.

    Attributes:
      lambdas: ``(m, J)`` float64, the lambdas of each radius (chosen on a pilot sample).
      y_mean: ``(m, J)`` float64, the mean of ``Y = ((lam - W(z))_+ + (lam - W(-z))_+) / (2 lam)``.
      deviation: ``(m, J)`` float64, Maurer and Pontil's empirical Bernstein deviation of ``Y``.
      d_upper: ``(m, J)`` float64, ``min(lam (y_mean + deviation + slack), lam)``: for each
        radius, ``D(lam) <= d_upper`` at all its ``J`` lambdas with probability ``>= 1 - alpha_d``.
      p_min: ``(m,)`` float64, ``min_j (1/2 + d_upper) / lam``, rounded up: an upper bound on
        the smallest ``p`` with ``V_r(p) >= 1/2`` on the same event.
    """

    lambdas: Array
    y_mean: Array
    deviation: Array
    d_upper: Array
    p_min: Array


# --------------------------------------------------------------------------- validation


def _stats_kind(family: Any, attack: str) -> str:
    """Which statistics certify ``attack`` with ``family``: "l2" or "mixed" (or raise)."""
    return worst_case(family, attack).statistics


def _check_count(value: Any, name: str) -> int:
    return check_positive_int(value, name)


def _check_alpha(alpha_d: Any) -> float:
    return check_unit_interval(alpha_d, "alpha_d")


def _check_radius(r: Any, max_ndim: int) -> None:
    value = _concrete(r)
    if value is None:
        return
    if value.ndim > max_ndim:
        allowed = "a scalar" if max_ndim == 0 else "a scalar or a 1-D array"
        raise ValueError(f"r must be {allowed}, got shape {value.shape}")
    if value.size == 0 or not np.all(np.isfinite(value)) or not np.all(value >= 0):
        raise ValueError(f"r must be finite and >= 0 (non-empty), got {r!r}")


def _check_lambdas(lambdas: Any) -> None:
    value = _concrete(lambdas)
    if value is None:
        return
    bad = value.ndim != 1 or value.size == 0
    if bad or not np.all(np.isfinite(value)) or not np.all(value > 0):
        raise ValueError(
            f"lambdas must be a non-empty array of finite values > 0 (1-D), got {lambdas!r}"
        )


def _check_p(p: Any) -> None:
    value = _concrete(p)
    if value is None:
        return
    if not np.all(np.isfinite(value)) or not np.all((value >= 0) & (value <= 1)):
        raise ValueError(f"p must be in [0, 1], got {p!r}")


def _check_stats(stats: Any, kind: str) -> tuple:
    expected = L2RatioStats if kind == "l2" else MixedLinfRatioStats
    if not isinstance(stats, expected):
        raise TypeError(
            f"stats must be {expected.__name__} for this family, got {type(stats).__name__}"
        )
    shapes = {jnp.shape(x) for x in stats}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0] < 1:
        raise ValueError(f"stats must hold equal non-empty 1-D arrays, got shapes {sorted(shapes)}")
    return tuple(jnp.asarray(x, _F64) for x in stats)


def _check_slack_dimension(d: int) -> int:
    """Refuses dimensions for which ``_ROUNDING_SLACK`` is not justified."""
    if not 1 <= d <= _ROUNDING_SLACK_MAX_D:
        raise ValueError(
            f"the Monte Carlo dual bound's float64 rounding slack ({_ROUNDING_SLACK:g} relative) is"
            f" justified only for 1 <= d <= {_ROUNDING_SLACK_MAX_D:d}, got d = {d}"
        )
    return d


def _slack(n: int, d: int) -> float:
    _check_slack_dimension(d)
    return _ROUNDING_SLACK + 2.0 * n * _U


# --------------------------------------------------------------------------- statistics


@functools.partial(jax.jit, static_argnames=("n", "d"))
def _l2_stats(family, key, n, d):
    k_r, k_g, k_c = jax.random.split(key, 3)
    rho = family.sample_radius(k_r, n, d, dtype=_F64)
    g = jax.random.normal(k_g, (n,), _F64)
    if d == 1:
        u1 = jnp.sign(g)
    else:
        # u1 = g / sqrt(g^2 + chi2_{d-1}) is the first coordinate of a uniform unit
        # vector ((u1+1)/2 ~ Beta((d-1)/2, (d-1)/2)), with no cancellation near 0.
        c = 2.0 * noise._gamma(k_c, (d - 1) / 2, (n,), _F64)  # package-private: fast for any key
        u1 = g / jnp.sqrt(g * g + c)
    return L2RatioStats(rho=rho, z1=rho * u1)


@functools.partial(jax.jit, static_argnames=("d", "batch"))
def _mixed_batches(family, keys, d, batch):
    def one_batch(k):
        z = family.sample(k, batch, (d,), dtype=_F64)
        zmax = jnp.max(z, axis=1)
        zmin = jnp.min(z, axis=1)
        return jnp.maximum(zmax, -zmin), zmax, zmin, jnp.sum(z, axis=1)

    # Sequential over batches: memory is batch * d, not n * d.
    return jax.lax.map(one_batch, keys)


#: Pieces the MixedLinf sampling is cut into when ``ratio_statistics`` reports progress.
PROGRESS_PIECES = 200


def _mixed_stats(family, key, n, d, batch, progress):
    keys = jax.random.split(key, -(-n // batch))
    if progress is None:
        out = _mixed_batches(family, keys, d, batch)
    else:
        # The same batches, in pieces the host sees finish (two compiled piece sizes at most).
        step = max(1, -(-keys.shape[0] // PROGRESS_PIECES))
        parts = []
        for start in range(0, keys.shape[0], step):
            parts.append(jax.block_until_ready(_mixed_batches(family, keys[start:start + step], d, batch)))
            progress(min(n, (start + step) * batch) - min(n, start * batch))
        out = [jnp.concatenate([part[i] for part in parts]) for i in range(4)]
    # The surplus of the last batch is dropped, so exactly n samples remain.
    return MixedLinfRatioStats(*(x.reshape(-1)[:n] for x in out))


def ratio_statistics(
    key: Array, family: Any, d: int, attack: str, n_samples: int, *, batch_size: int = 1024,
    progress: Any = None,
) -> RatioStats:
    """Draws the per-sample statistics that determine ``log W`` for every radius.

    Gaussian / L2Family: ``rho = ||z||_2`` from ``family.sample_radius`` and
    ``z1 = rho u1`` with ``u1`` the first coordinate of a uniform unit vector
    (drawn as ``g / sqrt(g^2 + chi2_{d-1})``); no d-dimensional array is formed.

    MixedLinf: ``family.sample`` in batches of ``min(batch_size, n_samples)``
    rows, sequentially (memory ``batch_size * d``); batch ``i`` is
    ``family.sample(jax.random.split(key, n_batches)[i], batch, (d,), float64)``
    and the surplus rows of the last batch are dropped.

    Args:
      key: PRNG key.
      family: ``Gaussian``, ``L2Family`` or ``MixedLinf`` (PureLinf is refused).
      d: input dimension (``family.k < d``).
      attack: ``"l2"`` or ``"linf"`` (MixedLinf only certifies ``"linf"``).
      n_samples: number of samples ``n >= 1``.
      batch_size: rows per batch for MixedLinf (>= 1).
      progress: ``None``, or a callable given the number of samples drawn since its
        last call (e.g. a tqdm bar's ``update``). MixedLinf then draws its batches in
        up to :data:`PROGRESS_PIECES` pieces (the same batches, so the same numbers);
        the l2 statistics are drawn in one call and reported at the end.

    Returns:
      :class:`L2RatioStats` or :class:`MixedLinfRatioStats` of ``(n,)`` float64 arrays.

    Raises:
      ValueError: bad ``attack``, ``n_samples``, ``batch_size``, ``d`` (``k < d``), or a
        family/attack pair without a proven worst case.

    Example:
      >>> stats = ratio_statistics(jax.random.key(0), noise.MixedLinf(0.5, 4.0), 8, "linf", 100)
      >>> stats.zsum.shape
      (100,)
    """
    kind = _stats_kind(family, attack)
    n = _check_count(n_samples, "n_samples")
    batch = _check_count(batch_size, "batch_size")
    d = family.check_dimension(d)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a callable, got {progress!r}")
    with jax.enable_x64(True):
        if kind == "l2":
            stats = _l2_stats(family, key, n, d)
            if progress is not None:
                progress(n)
            return stats
        return _mixed_stats(family, key, n, d, min(batch, n), progress)


def negated_statistics(stats: RatioStats) -> RatioStats:
    """The statistics of ``-z``: the same law as those of ``z`` (every family is symmetric).

    Example:
      >>> negated_statistics(L2RatioStats(rho=jnp.ones(2), z1=jnp.array([0.5, -1.0]))).z1
      Array([-0.5,  1. ], dtype=float32)
    """
    if isinstance(stats, L2RatioStats):
        return L2RatioStats(rho=stats.rho, z1=-stats.z1)
    return MixedLinfRatioStats(linf=stats.linf, zmax=-stats.zmin, zmin=-stats.zmax, zsum=-stats.zsum)


# --------------------------------------------------------------------------- log W


def _log_w(kind, attack, family, stats, d, r, log_linf=None):
    """log W at a scalar radius ``r`` (float64; traced ``r`` allowed).

    ``log_linf``: ``log(stats.linf)`` computed once by a caller looping over radii.
    """
    sigma2 = jnp.asarray(family.sigma, _F64) ** 2
    k = family.k
    if kind == "l2":
        rho, z1 = stats
        r = r * worst_case(family, attack).radius_scale(d)  # Theorem 3 for l_inf
        s = r * r - 2.0 * r * z1  # ||z - r e1||^2 - ||z||^2
        out = -s / (2.0 * sigma2)
        if k:
            # Rounding may push s / rho^2 below its true minimum -1; never below.
            out = out - 0.5 * k * jnp.log1p(jnp.maximum(s / (rho * rho), -1.0))
    else:
        linf, zmax, zmin, zsum = stats
        out = -(d * r * r - 2.0 * r * zsum) / (2.0 * sigma2)
        if k:
            shifted = jnp.maximum(zmax - r, r - zmin)  # ||z - r 1||_inf
            out = out - k * (jnp.log(shifted) - (jnp.log(linf) if log_linf is None else log_linf))
    # delta = 0 gives W = 1 exactly, also at z = 0 where the formula is 0/0.
    return jnp.where(r == 0, 0.0, out)


def log_ratio(family: Any, stats: RatioStats, d: int, attack: str, r: Any) -> Array:
    """``log W = log pi0(z - delta*) - log pi0(z)`` per sample, at one radius.

    l2 family (``delta* = r e1``, ``s = r^2 - 2 r z1``):
    ``log W = -(k/2) log1p(s / rho^2) - s / (2 sigma^2)``; the linf attack uses
    radius ``r sqrt(d)``. MixedLinf (``delta* = r 1``):
    ``log W = -k (log ||z - delta||_inf - log ||z||_inf) - (d r^2 - 2 r sum z) / (2 sigma^2)``
    with ``||z - delta||_inf = max(max z - r, r - min z)``.

    Args:
      family: the family the statistics were drawn from.
      stats: from :func:`ratio_statistics` with the same family, ``d`` and ``attack``.
      d: input dimension.
      attack: ``"l2"`` or ``"linf"``.
      r: scalar radius ``>= 0``; may be traced (e.g. ``jax.vmap`` over radii gives ``(m, n)``).

    Returns:
      ``(n,)`` float64; ``+inf`` where ``z = delta*`` and ``-inf`` at ``z = 0`` when
      ``k > 0``, never NaN.

    Example:
      >>> fam = noise.Gaussian(1.0)
      >>> st = ratio_statistics(jax.random.key(0), fam, 4, "l2", 3)
      >>> log_ratio(fam, st, 4, "l2", 0.5).shape
      (3,)
    """
    kind = _stats_kind(family, attack)
    d = family.check_dimension(d)
    _check_radius(r, 0)
    with jax.enable_x64(True):
        stats = _check_stats(stats, kind)
        return _log_w(kind, attack, family, stats, d, jnp.asarray(r, _F64))


# --------------------------------------------------------------------------- dual curve


@functools.partial(jax.jit, static_argnames=("kind", "attack", "d"))
def _curve_core(family, stats, radii, lambdas, eps, slack, kind, attack, d):
    n = stats[0].shape[0]
    num_lambdas = lambdas.shape[0]
    order = jnp.argsort(lambdas)
    log_lam = jnp.log(lambdas[order])  # ascending

    def one_radius(r):
        lw = _log_w(kind, attack, family, stats, d, r)
        # Sample i enters D_hat(lam_j) iff log W_i < log lam_j, i.e. iff j >= b_i: a
        # histogram over the sorted grid plus a cumulative sum gives m(lam) and
        # S(m(lam)) for the whole grid. This is the sorted-prefix-sum formula with
        # O(n log L) work instead of a sort of n values per radius.
        b = jnp.searchsorted(log_lam, lw, side="right")
        # Samples with W >= lam_max never enter; capping keeps exp finite.
        w = jnp.where(b < num_lambdas, jnp.exp(jnp.minimum(lw, log_lam[-1])), 0.0)
        m = jnp.cumsum(jax.ops.segment_sum(jnp.ones_like(w), b, num_lambdas + 1))[:num_lambdas]
        s = jnp.cumsum(jax.ops.segment_sum(w, b, num_lambdas + 1))[:num_lambdas]
        d_hat = (lambdas[order] * m - s) / n
        d_hat = jnp.maximum(d_hat, 0.0)  # D >= 0; rounding only ever raises it here
        return jnp.zeros_like(d_hat).at[order].set(d_hat)

    d_hat = jax.lax.map(one_radius, radii)
    d_upper = jnp.minimum(d_hat + lambdas * (eps + slack), lambdas)
    return d_hat, d_upper


def dual_curve_from_stats(
    family: Any,
    stats: RatioStats,
    d: int,
    attack: str,
    r: Any,
    lambdas: Any,
    *,
    alpha_d: float = 1e-3,
) -> DualCurve:
    """The dual curve ``D(lam)`` from statistics already drawn (see :func:`dual_curve`).

    One compiled program: per radius, each ``log W`` is located in the sorted
    lambda grid (``searchsorted``) and a histogram of counts and of ``W`` with
    cumulative sums gives ``m(lam)`` and ``S(m(lam))`` for the whole grid
    (``O(n log L)``; the same numbers as sorting ``W``, faster than a sort).
    New lambdas, radii (same shapes), ``sigma`` or ``alpha_d`` do not recompile.

    Args:
      family, stats, d, attack: as for :func:`log_ratio`.
      r: radius ``>= 0``, scalar or ``(m,)``.
      lambdas: ``(L,)`` grid, finite and ``> 0`` (any order).
      alpha_d: failure probability of each radius' curve, in ``(0, 1)``.

    Returns:
      :class:`DualCurve` with ``d_hat``/``d_upper`` of shape ``(L,)`` or ``(m, L)``.

    Example:
      >>> fam = noise.Gaussian(1.0)
      >>> st = ratio_statistics(jax.random.key(0), fam, 4, "l2", 1000)
      >>> dual_curve_from_stats(fam, st, 4, "l2", jnp.array([0.1, 0.2]),
      ...                       jnp.array([0.5, 1.0, 2.0])).d_upper.shape
      (2, 3)
    """
    kind = _stats_kind(family, attack)
    d = family.check_dimension(d)
    alpha = _check_alpha(alpha_d)
    _check_radius(r, 1)
    _check_lambdas(lambdas)
    with jax.enable_x64(True):
        stats = _check_stats(stats, kind)
        n = stats[0].shape[0]
        radii = jnp.asarray(r, _F64)
        lams = jnp.asarray(lambdas, _F64)
        eps = float(stats_lib.dkw_epsilon(n, alpha))
        d_hat, d_upper = _curve_core(
            family,
            stats,
            jnp.atleast_1d(radii),
            lams,
            jnp.asarray(eps, _F64),
            jnp.asarray(_slack(n, d) + worst_case(family, attack).sampler_tv(family, d), _F64),
            kind=kind,
            attack=attack,
            d=d,
        )
        if radii.ndim == 0:
            d_hat, d_upper = d_hat[0], d_upper[0]
        return DualCurve(lambdas=lams, d_hat=d_hat, d_upper=d_upper, epsilon=jnp.asarray(eps, _F64))


def dual_curve(
    key: Array,
    family: Any,
    d: int,
    attack: str,
    r: Any,
    lambdas: Any,
    n_samples: int,
    *,
    alpha_d: float = 1e-3,
    batch_size: int = 1024,
) -> DualCurve:
    """Monte Carlo estimate of ``D(lam) = E[(lam - W)_+]`` with a sound upper bound.

    ``D_hat(lam) = (lam m(lam) - S(m(lam))) / n`` with ``m(lam) = #{W < lam}`` and
    ``S`` the prefix sums of the sorted ``W``. With ``eps = sqrt(log(1/alpha_d) / (2 n))``
    (one-sided DKW), ``D(lam) <= d_upper(lam) = min(D_hat + lam eps, lam)`` holds for
    all lambdas at once with probability ``>= 1 - alpha_d``, because
    ``D(lam) = int_0^lam F_W(t) dt`` (``d_upper`` also adds a ``1e-7 lam`` float slack, justified
    for ``d <= 1e6``: larger ``d`` raises ``ValueError`` before any sampling).

    For an array of ``m`` radii the statistics are drawn once and serve every radius,
    so the curves are dependent: EACH radius' curve holds with probability
    ``1 - alpha_d``. A claim about all radii at once needs a union bound: pass
    ``alpha_d / m`` (the caller splits its alpha).

    Args:
      key: PRNG key.
      family: ``Gaussian``, ``L2Family`` or ``MixedLinf``.
      d: input dimension.
      attack: ``"l2"`` or ``"linf"``.
      r: radius ``>= 0``, scalar or ``(m,)``.
      lambdas: ``(L,)`` grid, finite and ``> 0``.
      n_samples: Monte Carlo samples (>= 1).
      alpha_d: failure probability of each radius' curve, in ``(0, 1)``.
      batch_size: rows per batch of d-dimensional samples (MixedLinf).

    Returns:
      :class:`DualCurve`; ``d_hat`` and ``d_upper`` have shape ``(L,)`` or ``(m, L)``.

    Example:
      >>> c = dual_curve(jax.random.key(0), noise.MixedLinf(0.5, 4.0), 8, "linf",
      ...                jnp.array([0.01, 0.02]), jnp.geomspace(0.1, 10.0, 5), 1000)
      >>> c.d_upper.shape
      (2, 5)
    """
    _stats_kind(family, attack)
    _check_slack_dimension(family.check_dimension(d))  # before any sampling
    stats = ratio_statistics(key, family, d, attack, n_samples, batch_size=batch_size)
    return dual_curve_from_stats(family, stats, d, attack, r, lambdas, alpha_d=alpha_d)


# --------------------------------------------------------------------------- p_min, variance-adaptive


def _maurer_pontil(variance, n, delta):
    """Empirical Bernstein deviation (Maurer and Pontil 2009, Theorem 4) for values in [0, 1]."""
    log_term = jnp.log(2.0 / delta)
    return jnp.sqrt(2.0 * variance * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))


@functools.partial(jax.jit, static_argnames=("kind", "attack", "d"))
def _p_min_core(family, stats, negated, radii, lambdas, delta, slack, kind, attack, d):
    n = stats[0].shape[0]
    log_linf = jnp.log(stats[0]) if kind == "mixed" else None  # the same for z and -z, at every radius

    def one_radius(args):
        r, lams = args
        # Y averages z and -z (antithetic): both have the law pi0, and their ratios
        # move in opposite directions, which lowers the variance of Y.
        w = jnp.exp(_log_w(kind, attack, family, stats, d, r, log_linf))[:, None]
        w_neg = jnp.exp(_log_w(kind, attack, family, negated, d, r, log_linf))[:, None]
        y = 0.5 * (jnp.maximum(1.0 - w / lams, 0.0) + jnp.maximum(1.0 - w_neg / lams, 0.0))
        mean = jnp.mean(y, axis=0)
        variance = jnp.sum(jnp.square(y - mean), axis=0) / (n - 1)
        return mean, variance

    mean, variance = jax.lax.map(one_radius, (radii, lambdas))
    deviation = _maurer_pontil(variance, n, delta)
    d_upper = jnp.minimum(lambdas * (mean + deviation + slack), lambdas)
    p_min = jnp.min((0.5 + d_upper) / lambdas, axis=-1) * (1.0 + 4.0 * _U)
    return mean, deviation, d_upper, p_min


def _pilot_lambdas(family, pilot, d, attack, radii, lambdas, n_lambdas, width):
    """For each radius, ``n_lambdas`` lambdas around the pilot's optimum of ``(1/2 + D_hat) / lam``."""
    kind = _stats_kind(family, attack)
    zero = jnp.asarray(0.0, _F64)
    d_hat, _ = _curve_core(family, pilot, radii, lambdas, zero, zero, kind=kind, attack=attack, d=d)
    best = lambdas[jnp.argmin((0.5 + d_hat) / lambdas[None, :], axis=1)]
    spread = best[:, None] * jnp.exp(jnp.linspace(-width, width, n_lambdas))[None, :]
    return jnp.clip(spread, jnp.min(lambdas), jnp.max(lambdas))  # stay within the caller's grid


def p_min_bound(
    family: Any,
    stats: RatioStats,
    pilot: RatioStats,
    d: int,
    attack: str,
    r: Any,
    *,
    alpha_d: float = 1e-3,
    lambdas: Any = None,
    n_lambdas: int = 5,
    width: float = 0.2,
) -> PMinBound:
    """``p_min(r)`` by a variance-adaptive bound on ``D`` at lambdas chosen on a pilot sample.

    The DKW band of :func:`dual_curve` adds ``lam eps`` to ``D(lam)`` at every lambda,
    the same ``eps`` where ``W < lam`` is nearly certain as where it is a coin flip;
    near ``p = 1`` that costs most of the radius. Here only the few lambdas that can
    give ``p_min`` are bounded: the optimum of ``(1/2 + D_hat(lam)) / lam`` on an
    independent ``pilot`` sample (over the grid ``lambdas``), and ``n_lambdas`` values
    around it (``lam* exp(t)``, ``t`` evenly spaced in ``[-width, width]``, clipped to
    the grid's range). At each of
    them ``D(lam) / lam = E[Y]`` with ``Y = ((lam - W(z))_+ + (lam - W(-z))_+) / (2 lam)``
    in ``[0, 1]`` (``-z`` has the law of ``z``), and Maurer and Pontil's empirical
    Bernstein bound (2009, Theorem 4) at level ``alpha_d / n_lambdas`` gives, for each
    radius, ``E[Y] <= mean(Y) + sqrt(2 V ln(2/delta) / n) + 7 ln(2/delta) / (3 (n - 1))``
    at all its lambdas with probability ``>= 1 - alpha_d`` over ``stats`` (``V`` is the
    unbiased sample variance). The choice of lambdas depends on the pilot only, so the
    bound needs no uniformity over lambda; any lambda gives a sound ``p_min``, a better
    one a smaller one. The same float slack as :func:`dual_curve` (``1e-7 lam``, for
    ``d <= 1e6``) and the sampler's total-variation bound are added, as to ``D_hat``.

    Args:
      family, d, attack: as for :func:`ratio_statistics`.
      stats: the statistics the bound rests on (``n >= 2``).
      pilot: independent statistics of the same family (any size >= 1), for the lambdas.
      r: radii ``>= 0``, scalar or ``(m,)``.
      alpha_d: failure probability of each radius' bound, in ``(0, 1)``.
      lambdas: the pilot's lambda grid (default: ``table.default_lambdas()``'s
        geometric grid from 0.5 to 1e6 with 4001 values).
      n_lambdas: lambdas bounded per radius (>= 1).
      width: half-width of their spread in ``log lam`` (>= 0).

    Returns:
      :class:`PMinBound` with ``(m, n_lambdas)`` arrays and ``p_min`` of shape ``(m,)``
      (``()`` for a scalar ``r``).

    Example:
      >>> fam = noise.Gaussian(1.0)
      >>> k_main, k_pilot = jax.random.split(jax.random.key(0))
      >>> stats = ratio_statistics(k_main, fam, 4, "l2", 100_000)
      >>> pilot = ratio_statistics(k_pilot, fam, 4, "l2", 10_000)
      >>> b = p_min_bound(fam, stats, pilot, 4, "l2", 0.5)  # Cohen et al.: Phi(0.5) = 0.6915
      >>> 0.6915 <= float(b.p_min) < 0.70
      True
    """
    kind = _stats_kind(family, attack)
    d = family.check_dimension(d)
    alpha = _check_alpha(alpha_d)
    _check_radius(r, 1)
    j = _check_count(n_lambdas, "n_lambdas")
    if not (np.isfinite(width) and width >= 0):
        raise ValueError(f"width must be finite and >= 0, got {width!r}")
    grid = np.geomspace(0.5, 1e6, 4001) if lambdas is None else lambdas
    _check_lambdas(grid)
    with jax.enable_x64(True):
        stats = _check_stats(stats, kind)
        pilot = _check_stats(pilot, kind)
        n = stats[0].shape[0]
        if n < 2:
            raise ValueError(f"stats must hold at least 2 samples (an empirical variance), got {n}")
        radii = jnp.asarray(r, _F64)
        lams = _pilot_lambdas(family, pilot, d, attack, jnp.atleast_1d(radii), jnp.asarray(grid, _F64),
                              j, float(width))
        slack = _slack(n, d) + worst_case(family, attack).sampler_tv(family, d)
        ratio_stats = (L2RatioStats if kind == "l2" else MixedLinfRatioStats)(*stats)
        negated = tuple(negated_statistics(ratio_stats))
        mean, deviation, d_upper, p_min = _p_min_core(
            family, stats, negated, jnp.atleast_1d(radii), lams, jnp.asarray(alpha / j, _F64),
            jnp.asarray(slack, _F64), kind=kind, attack=attack, d=d,
        )
        if radii.ndim == 0:
            return PMinBound(lams[0], mean[0], deviation[0], d_upper[0], p_min[0])
        return PMinBound(lams, mean, deviation, d_upper, p_min)


# --------------------------------------------------------------------------- lower bound

# Elements per chunk of the (p, curve, lambda) grid that lower_bound materialises.
_CHUNK_ELEMENTS = 1 << 22


@functools.partial(jax.jit, static_argnames=("chunk",))
def _lower_core(p_flat, lambdas, d_upper, chunk):
    # 4 u lam bounds the float64 rounding of lam p - d_upper (both <= lam).
    safe_lambdas = lambdas * (1.0 - 4.0 * _U)
    rounding = 4.0 * _U * lambdas

    def one_p(p):
        return jnp.max(safe_lambdas * p - d_upper - rounding, axis=-1)

    v = jax.lax.map(one_p, p_flat, batch_size=chunk)  # (P, B)
    return jnp.maximum(v, 0.0).T


def lower_bound(p: Any, curve: DualCurve) -> Array:
    """Certified lower bound ``V_r(p) = max(0, max_lam lam p - d_upper(lam))``.

    Sound whenever ``p`` lower-bounds the top-class probability and ``d_upper``
    upper-bounds ``D`` (probability ``1 - alpha_d`` per curve); rounding is
    accounted for, so the result is never rounded up. The maximum is over the
    lambda grid only, which can only lower the bound.

    Args:
      p: probabilities in ``[0, 1]``, any shape.
      curve: a :class:`DualCurve` with ``d_upper`` of shape ``(*batch, L)``.

    Returns:
      float64 array of shape ``(*batch, *p.shape)``.

    Example:
      >>> c = dual_curve(jax.random.key(0), noise.Gaussian(1.0), 8, "l2",
      ...                jnp.array([0.1, 0.2]), jnp.geomspace(0.1, 10.0, 101), 10_000)
      >>> lower_bound(jnp.array([0.6, 0.9]), c).shape
      (2, 2)
    """
    _check_p(p)
    _check_lambdas(curve.lambdas)
    with jax.enable_x64(True):
        p = jnp.asarray(p, _F64)
        lambdas = jnp.asarray(curve.lambdas, _F64)
        d_upper = jnp.asarray(curve.d_upper, _F64)
        if d_upper.ndim < 1 or d_upper.shape[-1] != lambdas.shape[0]:
            raise ValueError(
                f"curve.d_upper must have shape (..., L) with L = {lambdas.shape[0]},"
                f" got {d_upper.shape}"
            )
        batch_shape = d_upper.shape[:-1]
        flat = d_upper.reshape((-1, lambdas.shape[0]))
        p_flat = p.reshape(-1)
        chunk = max(1, min(p_flat.shape[0], _CHUNK_ELEMENTS // flat.size))
        v = _lower_core(p_flat, lambdas, flat, chunk=chunk)
        return v.reshape(batch_shape + p.shape)
