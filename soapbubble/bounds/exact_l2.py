"""Exact dual bound for the l2 family (and the Gaussian, k = 0) under the l2 attack.

No Monte Carlo: every probability is a one-dimensional integral, done by
Gauss-Legendre quadrature in float64 on the host (numpy/scipy), with a stated
error (MATH.md section 3, "The l2 family needs no Monte Carlo at all").

Setting. ``z ~ pi0 = L2Family(sigma, k)`` in dimension ``d``, ``delta = r e1``,
``W = pi0(z - delta) / pi0(z)``. With ``rho = ||z||``, ``z1 = rho u1``,
``(u1 + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)``, ``rho^2 / (2 sigma^2) ~ Gamma((d-k)/2)``
and ``s = r^2 - 2 r z1``::

    log W = -(k/2) log1p(s / rho^2) - s / (2 sigma^2).

For fixed ``rho``, ``log W`` increases with ``z1``, so ``{W < c}`` is
``{u1 < u1*(rho, c)}`` and ``P(W < c | rho)`` is a regularized incomplete beta
function at the root. The root is found in ``w = log1p(s / rho^2)``, where the
equation ``-(k/2) w - rho^2 expm1(w) / (2 sigma^2) = log c`` is concave and
decreasing on the whole real line, so Newton started right of the root
(the zero of the tangent at ``w = 0``, or the end of the ``u1`` range) descends
monotonically onto it, and never leaves the domain.

The radial law is integrated in its quantile space written through a normal
quantile, ``v = Phi(t)``, ``rho^2 / (2 sigma^2) = gammaincinv((d-k)/2, v)``,
``t in [-9, 9]`` (the omitted mass ``2 Phi(-9) ~ 2e-19`` is added to the error).
The conditional probability is smooth in ``t`` except where ``u1*`` leaves
``[-1, 1]`` (a kink, which matters in low ``d``); those points are located by a
scan plus bisection and become panel edges. Each panel is integrated with
Gauss-Legendre rules of ``m`` and ``2m`` nodes; the reported error is the sum
over panels of ``|Q_2m - Q_m|`` (the value reported is ``Q_2m``, normally far
more accurate than that), plus the omitted tail mass, plus an allowance of
``1e-13`` for the rounding of the special functions (scipy's ``betainc``,
``gammaincinv``). This is an estimate, not a proof: a feature narrower than the
scan grid could escape it.

Symmetry (``W(delta - z) = 1 / W(z)``) gives ``E[W 1{W < lam}] = P(W > 1/lam)``
and so ``D(lam) = E[(lam - W)_+] = lam P(W < lam) - P(W > 1/lam)``.

Certificates err on the safe side whatever the root finders return: for ANY
``lam > 0``, ``V_r(p) >= lam p - D(lam)`` and ``p_min(r) <= (1/2 + D(lam)) / lam``.
The library picks ``lam`` by Neyman-Pearson (``P(W < lam) = p``, resp.
``1/lam = median of W``) and evaluates these forms with ``D`` rounded up by its
error bound, so a less accurate root costs tightness (quadratically), never
soundness.

Example:
  >>> import numpy as np
  >>> from soapbubble.bounds import exact_l2
  >>> out = exact_l2.l2_p_min(np.array([0.0, 0.25, 0.5]), sigma=0.5, k=0.0, d=10)
  >>> np.round(out.p_min, 6)  # Cohen: Phi(r / sigma)
  array([0.5     , 0.691462, 0.841345])
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, NamedTuple

import numpy as np
import scipy.special as sc

__all__ = [
    "RatioCDF",
    "ExactDual",
    "PMin",
    "LowerBound",
    "l2_ratio_cdf",
    "l2_dual_exact",
    "l2_p_min",
    "l2_lower_bound_exact",
]

# Quadrature design (see module docstring).
_T = 9.0  # t range [-T, T] in normal-quantile space
_TAIL = 2.0 * float(sc.ndtr(-_T))  # radial mass outside it; the integrand is in [0, 1]
_PANELS = 24
_ORDER = 10  # low rule; the high rule has 2 * _ORDER nodes
_SCAN = 385  # scan points for kinks of P(W < c | rho)
_ROUNDING = 1e-13  # allowance for special-function rounding (not proven)
_G_FLOOR = 1e-300  # rho^2 / (2 sigma^2) floor: below it P(. | rho) has reached its limit
_ROW_BLOCK = 256  # rows evaluated together (bounds peak memory)
_MAX_LOG_LAM = 700.0  # exp stays finite


class RatioCDF(NamedTuple):
    """``P_pi0(W < c)`` and its error bound.

    Attributes:
      prob: float64, shape of ``c``.
      error: float64, shape of ``c``; ``|prob - P(W < c)| <= error`` (quadrature estimate).
    """

    prob: np.ndarray
    error: np.ndarray


class ExactDual(NamedTuple):
    """``D(lam) = E[(lam - W)_+]`` on a grid.

    Attributes:
      lambdas: float64, shape ``(L,)`` (or the input's shape), the grid.
      d_value: float64, same shape, the quadrature value of ``D`` (NOT rounded;
        use ``d_value + error`` as the safe upper bound).
      error: float64, same shape, error bound of ``d_value``.
    """

    lambdas: np.ndarray
    d_value: np.ndarray
    error: np.ndarray


class PMin(NamedTuple):
    """Smallest certifiable ``pA`` per radius.

    Attributes:
      radii: float64, shape ``(R,)`` (or the input's shape).
      p_min: float64, same shape, ROUNDED UP by ``error`` (and capped at 1):
        ``V_r(p) >= 1/2`` holds for every ``p >= p_min``.
      error: float64, same shape, the amount the quadrature value was raised by.
    """

    radii: np.ndarray
    p_min: np.ndarray
    error: np.ndarray


class LowerBound(NamedTuple):
    """Certified lower bound ``V_r(p)`` of the smoothed probability at radius ``r``.

    Attributes:
      p: float64, shape of the input ``p``.
      value: float64, same shape, ``V_r(p)`` ROUNDED DOWN by ``error`` (floored at 0).
      error: float64, same shape, the amount the quadrature value was lowered by.
    """

    p: np.ndarray
    value: np.ndarray
    error: np.ndarray


# --------------------------------------------------------------------------- validation


def _real_array(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real number or array, got {x!r}") from e
    return arr  # NaN fails every range check below


def _check_family(sigma: Any, k: Any, d: Any) -> tuple[float, float, int]:
    if isinstance(d, bool):
        raise ValueError(f"d must be an integer >= 2, got {d!r}")
    try:
        d_int = operator.index(d)
    except TypeError:
        raise ValueError(f"d must be an integer >= 2, got {d!r}") from None
    if d_int < 2:
        raise ValueError(f"d must be an integer >= 2, got {d!r}")
    s = _real_array(sigma, "sigma")
    if s.ndim != 0 or not (math.isfinite(float(s)) and float(s) > 0):
        raise ValueError(f"sigma must be a finite scalar > 0, got {sigma!r}")
    kk = _real_array(k, "k")
    if kk.ndim != 0 or not (math.isfinite(float(kk)) and 0 <= float(kk) < d_int):
        raise ValueError(f"k must be a scalar in [0, d) = [0, {d_int}), got {k!r}")
    return float(s), float(kk), d_int


def _check_radius(r: Any, name: str = "r", scalar: bool = True) -> np.ndarray:
    arr = _real_array(r, name)
    if scalar and arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar >= 0, got {r!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {r!r}")
    return arr


def _check_positive(x: Any, name: str) -> np.ndarray:
    arr = _real_array(x, name)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {x!r}")
    return arr


# --------------------------------------------------------------------------- radial law


def _g_of_t(t: np.ndarray, alpha: float) -> np.ndarray:
    """``rho^2 / (2 sigma^2)`` at normal quantile ``t`` (each tail from its own side)."""
    lower = sc.gammaincinv(alpha, sc.ndtr(np.minimum(t, 0.0)))
    upper = sc.gammainccinv(alpha, sc.ndtr(-np.maximum(t, 0.0)))
    return np.maximum(np.where(t <= 0, lower, upper), _G_FLOOR)


def _t_of_g(g: np.ndarray, alpha: float) -> np.ndarray:
    lower = sc.gammainc(alpha, g)
    return np.where(lower < 0.5, sc.ndtri(lower), -sc.ndtri(sc.gammaincc(alpha, g)))


class _Table(NamedTuple):
    sigma: float
    k: float
    d: int
    alpha: float  # (d - k) / 2, radial Gamma shape
    a: float  # (d - 1) / 2, Beta shape of (u1 + 1) / 2
    log_beta: float  # log B(a, a)
    x: np.ndarray  # (3m,) GL abscissae on [-1, 1]: low rule then high rule
    w_lo: np.ndarray  # (3m,) low-rule weights (0 on the high nodes)
    w_hi: np.ndarray  # (3m,) high-rule weights (0 on the low nodes)
    edges: np.ndarray  # (P + 1,) base panel edges in t
    t_nodes: np.ndarray  # (P, 3m)
    g_nodes: np.ndarray  # (P, 3m)
    rho_scan: np.ndarray  # (S,)
    g_scan: np.ndarray  # (S,)


@functools.lru_cache(maxsize=16)
def _table(sigma: float, k: float, d: int) -> _Table:
    """Quadrature nodes for one family; built once, reused for every radius and c."""
    alpha = 0.5 * (d - k)
    a = 0.5 * (d - 1)
    x_lo, w_lo = np.polynomial.legendre.leggauss(_ORDER)
    x_hi, w_hi = np.polynomial.legendre.leggauss(2 * _ORDER)
    x = np.concatenate([x_lo, x_hi])
    wl = np.concatenate([w_lo, np.zeros_like(w_hi)])
    wh = np.concatenate([np.zeros_like(w_lo), w_hi])
    edges = np.linspace(-_T, _T, _PANELS + 1)
    mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
    t_nodes = mid[:, None] + half[:, None] * x
    t_scan = np.linspace(-_T, _T, _SCAN)
    g_scan = _g_of_t(t_scan, alpha)
    return _Table(
        sigma=sigma, k=k, d=d, alpha=alpha, a=a, log_beta=float(sc.betaln(a, a)),
        x=x, w_lo=wl, w_hi=wh, edges=edges, t_nodes=t_nodes, g_nodes=_g_of_t(t_nodes, alpha),
        rho_scan=sigma * np.sqrt(2.0 * g_scan), g_scan=g_scan,
    )


# --------------------------------------------------------------------------- conditional law


def _extreme_logs(rho, g, r, k):
    """``w = log1p(s / rho^2)`` and ``log W`` at ``u1 = +1`` (largest W) and ``u1 = -1``."""
    q = r / rho
    with np.errstate(divide="ignore"):
        w_max = 2.0 * np.where(q < 1, np.log1p(-np.minimum(q, 1.0)), np.log(np.abs(q - 1.0)))
    w_min = 2.0 * np.log1p(q)
    log_w_max = -g * np.expm1(w_max)
    log_w_min = -g * np.expm1(w_min)
    if k > 0:  # with k = 0 the term is absent (0 * -inf must not appear)
        log_w_max = log_w_max - 0.5 * k * w_max
        log_w_min = log_w_min - 0.5 * k * w_min
    return w_max, w_min, log_w_max, log_w_min


def _conditional(g, logc, r, tab: _Table, density: bool):
    """``P(W < c | rho)``, ``P(W > c | rho)`` and ``d P(W < c | rho) / d log c``.

    ``g = rho^2 / (2 sigma^2)``; ``g``, ``logc``, ``r`` broadcast together (r > 0).
    """
    g, logc, r = np.broadcast_arrays(g, logc, r)
    sigma, k, a = tab.sigma, tab.k, tab.a
    rho = sigma * np.sqrt(2.0 * g)
    w_max, w_min, log_w_max, log_w_min = _extreme_logs(rho, g, r, k)
    below = log_w_max <= logc  # W < c on the whole sphere of radius rho
    above = log_w_min >= logc  # W >= c on the whole sphere
    p_lt = np.where(below, 1.0, 0.0)
    p_gt = np.where(above, 1.0, 0.0)
    dens = np.zeros(g.shape)
    idx = np.nonzero(~below & ~above)
    if idx[0].size == 0:
        return p_lt, p_gt, dens
    gi, ci, ri, rhoi = g[idx], logc[idx], r[idx], rho[idx]
    half_k = 0.5 * k
    # Start right of the root: f is concave and decreasing, so Newton then descends onto it.
    w = np.minimum(w_min[idx], -ci / (half_k + gi))
    active = np.arange(w.size)
    for _ in range(200):
        wa, ga = w[active], gi[active]
        f = -ga * np.expm1(wa) - half_k * wa - ci[active]
        fp = -half_k - ga * np.exp(wa)
        step = f / fp
        w[active] = wa - step
        keep = np.abs(step) > 4e-16 * np.abs(wa)
        active = active[keep]
        if active.size == 0:
            break
    s = 2.0 * sigma**2 * gi * np.expm1(w)  # rho^2 expm1(w)
    u = np.clip((ri * ri - s) / (2.0 * ri * rhoi), -1.0, 1.0)
    p_lt[idx] = sc.betainc(a, a, 0.5 * (1.0 + u))
    p_gt[idx] = sc.betainc(a, a, 0.5 * (1.0 - u))
    if density:
        ew = np.exp(w)
        dx = rhoi * ew / (4.0 * ri * (half_k + gi * ew))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            log_pdf = (a - 1.0) * (np.log1p(-u * u) - math.log(4.0)) - tab.log_beta
            di = np.exp(log_pdf) * dx
        dens[idx] = np.where(np.isfinite(di), di, 0.0)
    return p_lt, p_gt, dens


# --------------------------------------------------------------------------- quadrature


def _kinks(logc, r, tab: _Table):
    """Points ``t`` in ``(-T, T)`` where ``u1*`` crosses ``+-1``: ``(n, K)``, padded with T."""
    n = logc.size
    rho, g = tab.rho_scan[None, :], tab.g_scan[None, :]
    _, _, lmax, lmin = _extreme_logs(rho, g, r[:, None], tab.k)
    rows, lo_j, which = [], [], []
    for kind, lw in enumerate((lmax, lmin)):
        pos = lw > logc[:, None]
        i, j = np.nonzero(pos[:, :-1] != pos[:, 1:])
        rows.append(i), lo_j.append(j), which.append(np.full(i.size, kind))
    rows, lo_j, which = np.concatenate(rows), np.concatenate(lo_j), np.concatenate(which)
    if rows.size == 0:
        return None
    lo, hi = tab.rho_scan[lo_j], tab.rho_scan[lo_j + 1]
    rr, cc = r[rows], logc[rows]

    def sign(rho_):
        _, _, a_, b_ = _extreme_logs(rho_, rho_**2 / (2.0 * tab.sigma**2), rr, tab.k)
        return np.where(which == 0, a_, b_) > cc

    s_lo = sign(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        same = sign(mid) == s_lo
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
    rho_k = 0.5 * (lo + hi)
    t_k = np.clip(_t_of_g(rho_k**2 / (2.0 * tab.sigma**2), tab.alpha), -_T, _T)
    order = np.argsort(rows, kind="stable")
    rows, t_k = rows[order], t_k[order]
    counts = np.bincount(rows, minlength=n)
    start = np.cumsum(counts) - counts
    out = np.full((n, counts.max()), _T)
    out[rows, np.arange(rows.size) - start[rows]] = t_k
    return out


def _integrate_block(logc, r, tab: _Table, error: bool, density: bool):
    cols = slice(None) if error else slice(_ORDER, None)
    x, w_lo, w_hi = tab.x[cols], tab.w_lo[cols], tab.w_hi[cols]
    kinks = _kinks(logc, r, tab)
    if kinks is None:
        t = tab.t_nodes[None, :, cols]
        g = tab.g_nodes[None, :, cols]
        half = (0.5 * np.diff(tab.edges))[None, :, None]
    else:
        base_edges = np.broadcast_to(tab.edges, (logc.size, tab.edges.size))
        edges = np.sort(np.concatenate([base_edges, kinks], axis=1), axis=1)
        mid, half = 0.5 * (edges[:, 1:] + edges[:, :-1]), 0.5 * (edges[:, 1:] - edges[:, :-1])
        t = mid[..., None] + half[..., None] * x
        g = _g_of_t(t, tab.alpha)
        half = half[..., None]
    base = half * np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)  # GL weight x normal density
    p_lt, p_gt, dens = _conditional(g, logc[:, None, None], r[:, None, None], tab, density)
    wh = base * w_hi
    out = [np.sum(v * wh, axis=(1, 2)) for v in (p_lt, p_gt, dens)]
    if error:
        wl = base * w_lo
        extra = _TAIL + _ROUNDING
        out.append(np.sum(np.abs(np.sum(p_lt * (wh - wl), axis=2)), axis=1) + extra)
        out.append(np.sum(np.abs(np.sum(p_gt * (wh - wl), axis=2)), axis=1) + extra)
    return out


def _integrate(logc, r, tab: _Table, error: bool = True, density: bool = False):
    """Rows of ``P(W < c)``, ``P(W > c)``, ``d P(W < c) / d log c`` [, their errors] (r > 0)."""
    logc = np.asarray(logc, np.float64).ravel()
    logc, r = np.broadcast_arrays(logc, np.asarray(r, np.float64).ravel())
    parts = [
        _integrate_block(logc[i : i + _ROW_BLOCK], r[i : i + _ROW_BLOCK], tab, error, density)
        for i in range(0, logc.size, _ROW_BLOCK)
    ]
    if not parts:
        return [np.zeros(0)] * (5 if error else 3)
    out = [np.concatenate(p) for p in zip(*parts)]
    out[0], out[1] = np.clip(out[0], 0.0, 1.0), np.clip(out[1], 0.0, 1.0)
    return out


def _solve_logc(target, r, tab: _Table, upper: bool):
    """``y = log c`` with ``P(W < c) = target`` (``upper=False``) or ``P(W > c) = target``.

    Vectorised safeguarded Newton (bisection once bracketed, doubling steps before).
    Accuracy only affects tightness: callers plug the result into sound forms.
    """
    target, r = np.broadcast_arrays(np.asarray(target, np.float64), np.asarray(r, np.float64))
    target, r = target.ravel().copy(), r.ravel().copy()
    # Lognormal guess: log W ~ N(-r^2 / 2 s^2, r^2 / s^2), s^2 = sigma^2 (d - k) / d.
    s_eff = tab.sigma * math.sqrt((tab.d - tab.k) / tab.d)
    q = sc.ndtri(1.0 - target if upper else target)
    y = np.clip(-0.5 * (r / s_eff) ** 2 + (r / s_eff) * q, -_MAX_LOG_LAM, _MAX_LOG_LAM)
    lo = np.full(y.shape, -np.inf)
    hi = np.full(y.shape, np.inf)
    scale = np.maximum(r / s_eff, 1.0)
    active = np.arange(y.size)
    for it in range(80):
        if active.size == 0:
            break
        ya = y[active]
        p_lt, p_gt, dens = _integrate(ya, r[active], tab, error=False, density=True)
        resid = (target[active] - p_gt) if upper else (p_lt - target[active])  # increasing in y
        lo[active] = np.where(resid < 0, ya, lo[active])
        hi[active] = np.where(resid > 0, ya, hi[active])
        la, ha = lo[active], hi[active]
        with np.errstate(divide="ignore", invalid="ignore"):
            new = ya - resid / dens
            mid = 0.5 * (la + ha)
        tol = 1e-14 * np.maximum(1.0, np.abs(ya))
        ok = np.isfinite(new) & (new > la) & (new < ha)
        bracketed = np.isfinite(la) & np.isfinite(ha)
        # Converged rows keep the point just evaluated (a fallback step must not move them).
        small_step = np.isfinite(new) & (np.abs(new - ya) <= tol)
        done = (np.abs(resid) <= 1e-15) | small_step | (ha - la <= tol)
        grow = scale[active] * 2.0 ** min(it, 20)
        fallback = np.where(bracketed, mid, np.where(np.isfinite(la), ya + grow, ya - grow))
        new = np.where(done, ya, np.where(ok, new, fallback))
        y[active] = np.clip(new, -_MAX_LOG_LAM, _MAX_LOG_LAM)
        active = active[~done]
    return y


def _dual_rows(log_lam, r, tab: _Table):
    """``D(lam)`` estimate and error bound per row (r > 0)."""
    n = log_lam.size
    res = _integrate(np.concatenate([log_lam, -log_lam]), np.concatenate([r, r]), tab, error=True)
    p_lt, e_lt = res[0][:n], res[3][:n]
    p_gt, e_gt = res[1][n:], res[4][n:]
    lam = np.exp(log_lam)
    return lam * p_lt - p_gt, lam * e_lt + e_gt


# --------------------------------------------------------------------------- public API


def l2_ratio_cdf(c: Any, r: Any, sigma: Any, k: Any, d: Any) -> RatioCDF:
    """``P_pi0(W < c)`` for the l2 family at attack radius ``r``, by quadrature.

    Args:
      c: array of thresholds, each finite and > 0.
      r: scalar attack radius, >= 0 (at r = 0, W = 1 and the answer is ``1{c > 1}``).
      sigma, k, d: the family ``L2Family(sigma, k)`` in dimension ``d``
        (sigma > 0, 0 <= k < d, integer d >= 2; k = 0 is the Gaussian).

    Returns:
      RatioCDF(prob, error), float64 arrays of the shape of ``c``.

    Example:
      >>> import numpy as np
      >>> out = l2_ratio_cdf(np.array([0.5, 1.0, 2.0]), 0.3, sigma=0.5, k=2.0, d=10)
      >>> bool(np.all(np.diff(out.prob) > 0)), bool(np.all(out.error < 1e-9))
      (True, True)
    """
    sigma, k, d = _check_family(sigma, k, d)
    r = float(_check_radius(r))
    c = _check_positive(c, "c")
    if r == 0.0:
        return RatioCDF(np.where(c > 1.0, 1.0, 0.0), np.zeros(c.shape))
    res = _integrate(np.log(c).ravel(), np.full(c.size, r), _table(sigma, k, d), error=True)
    return RatioCDF(res[0].reshape(c.shape), res[3].reshape(c.shape))


def l2_dual_exact(lambdas: Any, r: Any, sigma: Any, k: Any, d: Any) -> ExactDual:
    """``D(lam) = E[(lam - W)_+] = lam P(W < lam) - P(W > 1/lam)`` on a grid of ``lam``.

    Args:
      lambdas: array of ``lam``, each finite and > 0.
      r: scalar attack radius >= 0 (``D(lam) = (lam - 1)_+`` at r = 0).
      sigma, k, d: the family, as in :func:`l2_ratio_cdf`.

    Returns:
      ExactDual(lambdas, d_value, error), float64 arrays of the shape of ``lambdas``.
      A safe upper bound on ``D`` is ``d_value + error``.

    Example:
      >>> import numpy as np
      >>> out = l2_dual_exact(np.array([0.5, 1.0, 2.0]), 0.25, sigma=0.5, k=0.0, d=10)
      >>> bool(np.all(out.d_value >= np.maximum(out.lambdas - 1, 0)))  # Jensen
      True
    """
    sigma, k, d = _check_family(sigma, k, d)
    r = float(_check_radius(r))
    lam = _check_positive(lambdas, "lambdas")
    if r == 0.0:
        return ExactDual(lam, np.maximum(lam - 1.0, 0.0), np.zeros(lam.shape))
    value, err = _dual_rows(np.log(lam).ravel(), np.full(lam.size, r), _table(sigma, k, d))
    return ExactDual(lam, value.reshape(lam.shape), err.reshape(lam.shape))


def l2_p_min(radii: Any, sigma: Any, k: Any, d: Any) -> PMin:
    """Smallest ``pA`` certifiable at each radius: ``V_r(p) >= 1/2`` iff ``p >= p_min(r)``.

    Neyman-Pearson: ``1/lam*`` is the median of ``W`` and ``p_min = P(W < lam*)``.
    The value returned is ``(1/2 + D(lam) + error_D) / lam`` at the computed
    ``lam``, an upper bound on ``p_min`` for any ``lam`` (equal to it at ``lam*``),
    capped at 1. ``p_min(0) = 1/2``.

    Args:
      radii: array of radii, each finite and >= 0.
      sigma, k, d: the family, as in :func:`l2_ratio_cdf`.

    Returns:
      PMin(radii, p_min, error), float64 arrays of the shape of ``radii``.

    Example:
      >>> import numpy as np
      >>> out = l2_p_min(np.array([0.0, 0.5]), sigma=0.5, k=0.0, d=3072)
      >>> np.round(out.p_min, 6)  # Phi(r / sigma)
      array([0.5     , 0.841345])
    """
    sigma, k, d = _check_family(sigma, k, d)
    radii = _check_radius(radii, "radii", scalar=False)
    flat = radii.ravel()
    p_min, err = np.full(flat.shape, 0.5), np.zeros(flat.shape)
    pos = np.nonzero(flat > 0)[0]
    if pos.size:
        tab = _table(sigma, k, d)
        rr = flat[pos]
        log_median = _solve_logc(np.full(pos.size, 0.5), rr, tab, upper=True)
        log_lam = -log_median
        value, err_d = _dual_rows(log_lam, rr, tab)
        lam = np.exp(log_lam)
        p_min[pos] = np.minimum((0.5 + value + err_d) / lam, 1.0)
        err[pos] = err_d / lam
    return PMin(radii, p_min.reshape(radii.shape), err.reshape(radii.shape))


def l2_lower_bound_exact(p: Any, r: Any, sigma: Any, k: Any, d: Any) -> LowerBound:
    """Certified lower bound ``V_r(p)`` on the smoothed top-class probability at radius ``r``.

    Neyman-Pearson: ``V_r(p) = P(W > 1/tau)`` with ``P(W < tau) = p``. The value
    returned is ``lam p - D(lam) - error_D`` at the computed ``lam ~ tau``, a lower
    bound on ``V_r(p)`` for any ``lam``, floored at 0. Exact ends: ``V_r(0) = 0``,
    ``V_r(1) = 1``, ``V_0(p) = p``.

    Args:
      p: array of probabilities in [0, 1].
      r: scalar attack radius, >= 0.
      sigma, k, d: the family, as in :func:`l2_ratio_cdf`.

    Returns:
      LowerBound(p, value, error), float64 arrays of the shape of ``p``.

    Example:
      >>> import numpy as np
      >>> out = l2_lower_bound_exact(np.array([0.9]), 0.25, sigma=0.5, k=0.0, d=10)
      >>> from scipy.stats import norm
      >>> bool(abs(out.value[0] - norm.cdf(norm.ppf(0.9) - 0.5)) < 1e-9)
      True
    """
    sigma, k, d = _check_family(sigma, k, d)
    r = float(_check_radius(r))
    p = _real_array(p, "p")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    flat = p.ravel()
    value, err = flat.copy(), np.zeros(flat.shape)  # exact at r = 0 and at p in {0, 1}
    inner = np.nonzero((flat > 0) & (flat < 1))[0] if r > 0 else np.zeros(0, dtype=int)
    if inner.size:
        tab = _table(sigma, k, d)
        rr = np.full(inner.size, r)
        log_lam = _solve_logc(flat[inner], rr, tab, upper=False)
        d_val, err_d = _dual_rows(log_lam, rr, tab)
        value[inner] = np.maximum(np.exp(log_lam) * flat[inner] - d_val - err_d, 0.0)
        err[inner] = err_d
    return LowerBound(p, value.reshape(p.shape), err.reshape(p.shape))
