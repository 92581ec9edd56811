"""Exact dual bound for the l2 family (and the Gaussian, k = 0) under the l2 attack.

No Monte Carlo: every probability is a one-dimensional integral, done by
Gauss-Legendre quadrature in float64 on the host (numpy/scipy), with a proven
error bracket (MATH.md section 3, "The l2 family needs no Monte Carlo at all").

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

Values. The radial law is integrated in its quantile space written through a
normal quantile, ``v = Phi(t)``, ``rho^2 / (2 sigma^2) = gammaincinv((d-k)/2, v)``,
``t in [-9, 9]``, by Gauss-Legendre panels (kinks of ``P(W < c | rho)``, where ``u1*``
leaves ``[-1, 1]``, located by a scan plus bisection become panel edges). These values
are accurate (typically ~1e-13 for d >= 3) but are not what the error rests on.

Errors are PROVEN (:func:`_bracket_rows`): ``P(W < c) = int_0^1 h(v) dv`` with
``h = P(W < c | rho(v)) = I_x*(a, a)`` is bracketed cell by cell over an exact
partition of ``[0, 1]`` (float ends; the upper half is written in ``1 - v``), with
rigorous enclosures of ``h'`` and ``h''`` on each cell: ``g = rho^2/(2 sigma^2)``, the
root ``w``, ``s = rho^2 expm1(w)`` and ``q = g e^w`` are monotone in ``v`` (their ranges
are their end values), the rest is interval arithmetic with outward rounding, the Beta
density is unimodal or U-shaped, ``dg/dv = 1 / f_Gamma(g)``. A cell's integral lies in
``h(v_c) dv + h'(v_c) J + [min h'', max h''] Q / 2`` (third order) and in the second-
and first-order brackets; the intersection is used, and the widest cells are halved
until the bracket is narrower than ``_TARGET`` (2e-10, per probability; weighted by
lambda for ``D``) or a cell budget is spent (then the bracket is simply wider). The
Newton root for ``w`` carries a proven error (``|F(w)| / min |F'|``). Trusted, not
proven: scipy's ``betainc`` to ``1e-13`` absolute, ``gammaincinv``/``gammainccinv`` to
``1e-12`` relative, ``gammaln``/``betaln``/libm to a few ulps, and the float
parameters ``(d - k)/2``, ``(d - 1)/2`` standing for the exact ones; these margins are
added explicitly. The reported ``error`` is ``max(value - lo, hi - value)``, the value
being the quadrature value clipped into ``[lo, hi]``.

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

# Values: Gauss-Legendre quadrature (see module docstring).
_T = 9.0  # t range [-T, T] in normal-quantile space (values and initial bracket cells)
_PANELS = 24
_ORDER = 20  # Gauss-Legendre nodes per panel
_SCAN = 385  # scan points for kinks of P(W < c | rho)
_G_FLOOR = 1e-300  # rho^2 / (2 sigma^2) floor: below it P(. | rho) has reached its limit
_ROW_BLOCK = 256  # rows evaluated together (bounds peak memory)
_MAX_LOG_LAM = 700.0  # exp stays finite

# Proven brackets (see module docstring and _cell_brackets).
_U = 2.0**-53  # float64 unit roundoff
_TINY = 1e-300
_SPECIAL_ABS = 1e-13  # trusted absolute accuracy of scipy's betainc (stated, not proven)
_SPECIAL_REL = 1e-12  # trusted relative accuracy of scipy's gammaincinv / gammainccinv
_CELLS = 256  # initial bracket cells (uniform in t on [-T, T], plus [0, Phi(-T)] at each end)
_TARGET = 2e-10  # refinement goal for the width of each probability's bracket
_MAX_CELLS = 64 * _CELLS  # per row: refinement stops there (the bracket stays proven)
_ROUNDS = 60


class RatioCDF(NamedTuple):
    """``P_pi0(W < c)`` and its error bound.

    Attributes:
      prob: float64, shape of ``c``.
      error: float64, shape of ``c``; ``|prob - P(W < c)| <= error`` (proven bracket, see
        the module docstring for what is trusted).
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
    x: np.ndarray  # (m,) GL abscissae on [-1, 1]
    w: np.ndarray  # (m,) GL weights
    edges: np.ndarray  # (P + 1,) base panel edges in t
    t_nodes: np.ndarray  # (P, m)
    g_nodes: np.ndarray  # (P, m)
    rho_scan: np.ndarray  # (S,)
    g_scan: np.ndarray  # (S,)


@functools.lru_cache(maxsize=16)
def _table(sigma: float, k: float, d: int) -> _Table:
    """Quadrature nodes for one family; built once, reused for every radius and c."""
    alpha = 0.5 * (d - k)
    a = 0.5 * (d - 1)
    x, w = np.polynomial.legendre.leggauss(_ORDER)
    edges = np.linspace(-_T, _T, _PANELS + 1)
    mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
    t_nodes = mid[:, None] + half[:, None] * x
    t_scan = np.linspace(-_T, _T, _SCAN)
    g_scan = _g_of_t(t_scan, alpha)
    return _Table(
        sigma=sigma, k=k, d=d, alpha=alpha, a=a, log_beta=float(sc.betaln(a, a)),
        x=x, w=w, edges=edges, t_nodes=t_nodes, g_nodes=_g_of_t(t_nodes, alpha),
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


def _integrate_block(logc, r, tab: _Table, density: bool):
    x, w = tab.x, tab.w
    kinks = _kinks(logc, r, tab)
    if kinks is None:
        t = tab.t_nodes[None]
        g = tab.g_nodes[None]
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
    wh = base * w
    return [np.sum(v * wh, axis=(1, 2)) for v in (p_lt, p_gt, dens)]


def _integrate(logc, r, tab: _Table, density: bool = False):
    """Gauss-Legendre values of ``P(W < c)``, ``P(W > c)``, ``d P(W < c) / d log c`` (r > 0).

    Accurate (typically ~1e-13 for d >= 3) but not a proof: :func:`_bracket_rows` gives
    the proven brackets that every reported error comes from.
    """
    logc = np.asarray(logc, np.float64).ravel()
    logc, r = np.broadcast_arrays(logc, np.asarray(r, np.float64).ravel())
    parts = [
        _integrate_block(logc[i : i + _ROW_BLOCK], r[i : i + _ROW_BLOCK], tab, density)
        for i in range(0, logc.size, _ROW_BLOCK)
    ]
    if not parts:
        return [np.zeros(0)] * 3
    out = [np.concatenate(p) for p in zip(*parts)]
    out[0], out[1] = np.clip(out[0], 0.0, 1.0), np.clip(out[1], 0.0, 1.0)
    return out


# --------------------------------------------------------------------------- proven brackets
#
# Interval arithmetic on pairs (lo, hi) of float64 arrays. + - * / are correctly rounded
# (error <= u |result|) and exp, log, expm1, log1p, sqrt in numpy/libm are within a couple
# of ulps: every result is widened outward by 4 u |x| (plus a tiny absolute amount), which
# contains the exact result of the operation on the exact operands. A NaN anywhere marks
# the enclosure as failed (the callers then fall back to a cruder bracket).

def _dn(x, n=4.0):
    return x - n * _U * np.abs(x) - _TINY


def _up(x, n=4.0):
    return x + n * _U * np.abs(x) + _TINY


def _iv(lo, hi, n=4.0):
    return _dn(lo, n), _up(hi, n)


def _iadd(a, b):
    return _iv(a[0] + b[0], a[1] + b[1])


def _isub(a, b):
    return _iv(a[0] - b[1], a[1] - b[0])


def _imul(a, b):
    with np.errstate(invalid="ignore", over="ignore"):
        c = (a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])
    lo = np.minimum(np.minimum(c[0], c[1]), np.minimum(c[2], c[3]))
    hi = np.maximum(np.maximum(c[0], c[1]), np.maximum(c[2], c[3]))
    return _iv(lo, hi)


def _iinv(b):
    """1 / b for b not containing 0 (NaN otherwise)."""
    ok = (b[0] > 0) | (b[1] < 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = np.where(ok, 1.0 / b[1], np.nan), np.where(ok, 1.0 / b[0], np.nan)
    return _iv(lo, hi)


def _idiv_nonneg(a, b):
    """a / b for b with b.lo >= 0 (b.lo may be 0: the quotient is then unbounded)."""
    d0, d1 = np.maximum(b[0], 0.0), b[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        q00 = np.where(a[0] == 0, 0.0, a[0] / d0)
        q01 = a[0] / d1
        q10 = a[1] / d0
        q11 = np.where(a[1] == 0, 0.0, a[1] / d1)
    lo = np.where(a[0] >= 0, q01, q00)  # a.lo >= 0: smallest over the largest b
    hi = np.where(a[1] > 0, q10, q11)  # a.hi > 0: largest over the smallest b
    return _iv(lo, hi)


def _idiv(a, b):
    return _imul(a, _iinv(b))


def _iscal(c, a):
    """c * a for a float constant c (exact as given)."""
    lo, hi = (c * a[0], c * a[1]) if c >= 0 else (c * a[1], c * a[0])
    return _iv(lo, hi)


def _ipos_const(x):
    """A positive float constant computed with a few roundings (<= 4 u relative)."""
    return x * (1.0 - 8 * _U), x * (1.0 + 8 * _U)


def _iexp(a):
    with np.errstate(over="ignore", under="ignore"):
        return _iv(np.exp(a[0]), np.exp(a[1]))


def _root_w(g, logc, k):
    """Root ``w`` of ``F(w) = -(k/2) w - g expm1(w) - logc`` and a proven bound on its error.

    F is concave and decreasing; Newton from the zero of the tangent at 0 (right of the
    root) descends onto it. The error: ``|w - w*| <= (|F(w)| + rounding) / min |F'|``
    between them, with ``|F'| >= k/2 + g exp(w - delta)``; valid when ``delta <= 1/2``
    (NaN otherwise).
    """
    half_k = 0.5 * k
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        w = np.minimum(-logc / (half_k + g), 700.0)
        active = np.nonzero(np.isfinite(w))[0]
        for _ in range(200):
            wa, ga, ca = w[active], g[active], logc[active]
            f = -ga * np.expm1(wa) - half_k * wa - ca
            step = f / (-half_k - ga * np.exp(wa))
            w_new = wa - step
            good = np.isfinite(w_new)
            w[active] = np.where(good, w_new, wa)
            active = active[good & (np.abs(step) > 4e-16 * np.abs(wa))]
            if active.size == 0:
                break
        e = np.expm1(w)
        f = -g * e - half_k * w - logc
        rounding = 8 * _U * (half_k * np.abs(w) + g * np.abs(e) + np.abs(logc)) + _TINY
        delta = (np.abs(f) + rounding) / (half_k + 0.6 * g * np.exp(w))
    delta = np.where(np.isfinite(delta) & (delta <= 0.5), delta, np.nan)
    return w, delta


def _s_interval(g, logc, tab: _Table, rel=0.0):
    """Enclosure of ``s = rho^2 expm1(w) = 2 sigma^2 g expm1(w)`` over ``g (1 +- rel)``.

    ``|ds/dg| = |k s / (2 g (k/2 + q))| <= |s| / g``, so over ``g (1 +- rel)`` (rel tiny)
    ``s`` stays within ``s(g) (1 +- 2.01 rel)``.
    """
    two_s2 = _ipos_const(2.0 * tab.sigma**2)
    if tab.k == 0:
        # Closed form: e^w = 1 - logc / g when logc < g; otherwise no root (W < c on the
        # whole sphere) and s = -rho^2, its limit as w -> -inf.
        m = np.minimum(logc, g)
        s = _iscal(-1.0, _imul(two_s2, (m, m)))
    else:
        w, delta = _root_w(g, logc, tab.k)
        e = _iv(np.expm1(w - delta), np.expm1(w + delta))
        s = _imul(_imul(two_s2, (g, g)), e)
    if rel:
        s = _iv(s[0] - 2.01 * rel * np.abs(s[0]), s[1] + 2.01 * rel * np.abs(s[1]))
    return s


def _unique_pairs(a, b):
    """Distinct pairs ``(a[i], b[i])`` and the index of each pair among them."""
    order = np.lexsort((b, a))
    sa, sb = a[order], b[order]
    new = np.ones(a.size, bool)
    new[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    ids = np.cumsum(new) - 1
    inv = np.empty(a.size, np.int64)
    inv[order] = ids
    return (sa[new], sb[new]), inv


def _g_of_y(y, alpha, upper):
    """``G^-1(y)`` (lower half) or ``G^-1(1 - y)`` (upper half), G the Gamma(alpha) CDF.

    Evaluated once per distinct ``(upper, y)``.
    """
    (up, yy), inv = _unique_pairs(upper, y)
    out = np.empty(yy.shape)
    out[up] = sc.gammainccinv(alpha, yy[up])
    out[~up] = sc.gammaincinv(alpha, yy[~up])
    return out[inv]


def _cell_brackets(rows, y_a, y_b, upper, logc_rows, r_rows, tab: _Table):
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        return _cell_brackets_impl(rows, y_a, y_b, upper, logc_rows, r_rows, tab)


def _cell_brackets_impl(rows, y_a, y_b, upper, logc_rows, r_rows, tab: _Table):
    """Proven brackets of ``int h dv`` over cells (flat arrays), ``h = P(W < c | rho)``.

    A cell is ``[y_a, y_b]`` in ``y = v`` (lower half) or ``y = 1 - v`` (upper half),
    ``v`` the Gamma CDF of ``g = rho^2 / (2 sigma^2)``: exact float ends, so the
    cells partition ``[0, 1]`` exactly. On the cell, with ``h`` as a function of ``y``:

    * 3rd order: ``h(y_c) dy + h'(y_c) J + [h''] Q / 2`` with ``J = int (y - y_c)``,
      ``Q = int (y - y_c)^2`` and enclosures of ``h'`` and ``h''`` over the cell;
    * 2nd order: ``h(y_c) dy + [L A+ - U A-, U A+ - L A-]`` with ``h' in [L, U]``;
    * 1st order: ``[h_min, h_max] dy`` from the range of ``x*`` (``h = I_x*(a, a)``).

    The intersection of those that are finite is returned. Enclosures: ``g`` is
    monotone in ``y``; ``s(g)``, ``q = g e^w`` and ``w`` are monotone in ``g``
    (``d(g expm1 w)/dg = expm1(w) (k/2) / (k/2 + q)``, ``dq/dg = q (k/2 + g) / (g (k/2 + q)) > 0``),
    so their ranges over a cell are their values at its ends; derived quantities use
    interval arithmetic; the Beta density is unimodal (``a >= 1``) or U-shaped.
    """
    sigma, k, a, alpha = tab.sigma, tab.k, tab.a, tab.alpha
    r = r_rows[rows]
    y_c = 0.5 * (y_a + y_b)
    n = y_a.size
    # g at the three points of every cell (once per distinct point), then s once per
    # distinct (row, point); both widened for the trusted accuracy of the inverse gamma.
    pts_y = np.concatenate([y_a, y_b, y_c])
    pts_up = np.concatenate([upper, upper, upper])
    pts_row = np.concatenate([rows, rows, rows])
    g_pts = _g_of_y(pts_y, alpha, pts_up)
    (u_row, u_g), inv = _unique_pairs(pts_row, g_pts)
    s_u = _s_interval(u_g, logc_rows[u_row], tab, rel=_SPECIAL_REL)
    s_pts = (s_u[0][inv], s_u[1][inv])
    g_a, g_b, g_c = g_pts[:n], g_pts[n : 2 * n], g_pts[2 * n :]
    s_a = (s_pts[0][:n], s_pts[1][:n])
    s_b = (s_pts[0][n : 2 * n], s_pts[1][n : 2 * n])
    s_c = (s_pts[0][2 * n :], s_pts[1][2 * n :])
    # ends of the cell in g (g increases with v: the upper half runs backwards).
    g_lo = np.maximum(np.where(upper, g_b, g_a) * (1.0 - _SPECIAL_REL), 0.0)
    g_hi = np.where(upper, g_a, g_b) * (1.0 + _SPECIAL_REL)
    s_lo_end = tuple(np.where(upper, x, y) for x, y in zip(s_b, s_a))
    s_hi_end = tuple(np.where(upper, x, y) for x, y in zip(s_a, s_b))
    s_iv = (np.minimum(s_lo_end[0], s_hi_end[0]), np.maximum(s_lo_end[1], s_hi_end[1]))
    gi = (g_lo, g_hi)
    inv_two_s2 = _iinv(_ipos_const(2.0 * sigma**2))
    # q = g + s / (2 sigma^2), increasing in g.
    q_lo = _iadd((g_lo, g_lo), _imul(s_lo_end, inv_two_s2))[0]
    q_hi = _iadd((g_hi, g_hi), _imul(s_hi_end, inv_two_s2))[1]
    qi = (np.minimum(q_lo, q_hi), np.maximum(q_lo, q_hi))
    r2 = _ipos_const(r * r)
    c0 = _ipos_const(2.0 * math.sqrt(2.0) * r * sigma)
    sqrt_g = _iv(np.sqrt(g_lo), np.sqrt(g_hi))
    g32 = _imul(gi, sqrt_g)
    # u* = (r^2 - s) / (c0 sqrt g), x* = (1 + u*) / 2.
    u_iv = _idiv_nonneg(_isub(r2, s_iv), _imul(c0, sqrt_g))  # g_lo may be 0
    x_iv = _iscal(0.5, _iadd((1.0, 1.0), u_iv))
    # du*/dg = -Nm / (2 c0 g^1.5), Nm = r^2 + s (k/2 - q) / (k/2 + q).
    hk = 0.5 * k
    if k > 0:
        fq = _iv((hk - qi[1]) / (hk + qi[1]), (hk - qi[0]) / (hk + qi[0]), 8.0)  # decreasing in q
    else:
        fq = (np.full_like(g_lo, -1.0), np.full_like(g_lo, -1.0))
    nm = _iadd(r2, _imul(s_iv, fq))
    two_c0_g32 = _imul(_iscal(2.0, c0), g32)
    ug = _iscal(-1.0, _idiv(nm, two_c0_g32))
    # d2u*/dg2 = -Nm_g / (2 c0 g^1.5) + 3 Nm / (4 c0 g^2.5);
    # Nm_g = s_g fq + s fq' q_g, s_g = k s / (2 g (k/2 + q)), fq' = -k / (k/2 + q)^2,
    # q_g = q (k/2 + g) / (g (k/2 + q)).
    if k > 0:
        kq = _iadd((hk, hk), qi)
        s_g = _idiv(_iscal(k, s_iv), _imul(_iscal(2.0, gi), kq))
        fq_d = _iscal(-k, _iinv(_imul(kq, kq)))
        q_g = _idiv(_imul(qi, _iadd((hk, hk), gi)), _imul(gi, kq))
        nm_g = _iadd(_imul(s_g, fq), _imul(_imul(s_iv, fq_d), q_g))
    else:
        nm_g = (np.zeros_like(g_lo), np.zeros_like(g_lo))
    ugg = _iadd(
        _iscal(-1.0, _idiv(nm_g, two_c0_g32)),
        _idiv(_iscal(3.0, nm), _imul(_iscal(4.0, c0), _imul(g32, gi))),
    )
    # dg/dv = 1 / f_Gamma(g) = exp(psi(g) + lgamma(alpha)), psi = g - (alpha - 1) log g.
    am1 = alpha - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        g_m = np.clip(am1, g_lo, g_hi) if am1 > 0 else g_lo
        pts = (g_lo, g_hi, g_m)
        psis = [p - am1 * np.log(p) for p in pts]
        margin = 16 * _U * (g_hi + abs(am1) * np.maximum(np.abs(np.log(g_lo)), np.abs(np.log(g_hi))))
    lgam = float(sc.gammaln(alpha))
    margin = margin + 16 * _U * (abs(lgam) + 1.0)
    psi_lo = np.minimum(np.minimum(psis[0], psis[1]), psis[2]) - margin
    psi_hi = np.maximum(psis[0], psis[1]) + margin
    pv = _iexp((psi_lo + lgam, psi_hi + lgam))
    # d log(1/f) / dg = 1 - (alpha - 1) / g: monotone in g.
    pg = _isub((1.0, 1.0), _iscal(am1, _iinv(gi)))
    # Beta(a, a) density over x in [0, 1]; logB error margin.
    xc = (np.clip(x_iv[0], 0.0, 1.0), np.clip(x_iv[1], 0.0, 1.0))
    partial = (x_iv[0] < 0.0) | (x_iv[1] > 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xx_ends = np.minimum(xc[0] * (1.0 - xc[0]), xc[1] * (1.0 - xc[1]))
        xm = np.clip(0.5, xc[0], xc[1])
        xx = np.maximum(_dn(xx_ends, 8.0), 0.0), _up(xm * (1.0 - xm), 8.0)
        lxx = _iv(np.log(xx[0]), np.log(xx[1]))
    lb = tab.log_beta

    def beta_like(power):
        # x^power (1-x)^power / B(a, a) for power = a - 1 or a - 2; margins for betaln
        # (trusted to a few ulps) and the subtraction, at each end (an end may be -inf).
        e = _iscal(power, lxx)
        e = (np.where(np.isnan(e[0]) & (power == 0), 0.0, e[0]), np.where(np.isnan(e[1]) & (power == 0), 0.0, e[1]))
        lo_end = e[0] - lb - 16 * _U * (np.abs(e[0]) + abs(lb) + 1.0)
        hi_end = np.where(np.isneginf(e[1]), -np.inf, e[1] - lb + 16 * _U * (np.abs(e[1]) + abs(lb) + 1.0))
        return _iexp((lo_end, hi_end))

    beta = beta_like(a - 1.0)
    beta_d = _iscal(a - 1.0, _imul(_isub((1.0, 1.0), _iscal(2.0, xc)), beta_like(a - 2.0)))
    xg = _iscal(0.5, ug)
    xgg = _iscal(0.5, ugg)
    d1 = _imul(_imul(beta, xg), pv)  # dh/dv
    p2 = _imul(pv, pv)
    d2 = _imul(p2, _iadd(_imul(beta_d, _imul(xg, xg)), _imul(beta, _iadd(xgg, _imul(xg, pg)))))
    d1 = (np.where(partial, np.minimum(d1[0], 0.0), d1[0]), np.where(partial, np.maximum(d1[1], 0.0), d1[1]))
    d2 = (np.where(partial, np.minimum(d2[0], 0.0), d2[0]), np.where(partial, np.maximum(d2[1], 0.0), d2[1]))
    # dh/dy = sign dh/dv (the upper half runs backwards in v); h'' is the same in y and v.
    d1 = (np.where(upper, -d1[1], d1[0]), np.where(upper, -d1[0], d1[1]))
    # h at y_c: x* at g_c, error from the root and g_c's accuracy through the h' bound.
    sg_c = _iv(np.sqrt(g_c * (1.0 - _SPECIAL_REL)), np.sqrt(g_c * (1.0 + _SPECIAL_REL)))
    u_c = _idiv_nonneg(_isub(r2, s_c), _imul(c0, sg_c))
    x_c = _iscal(0.5, _iadd((1.0, 1.0), u_c))
    # The exact x*(g_c) lies in x_c and in [xc0, xc1]; so does x_mid (clipped into it).
    x_mid = np.clip(0.5 * (x_c[0] + x_c[1]), xc[0], xc[1])
    h_mid = sc.betainc(a, a, x_mid)
    beta_max = np.where(np.isfinite(beta[1]), beta[1], np.inf)
    # x_c's enclosure covers the root error and g_c's accuracy; |dI_x/dx| <= beta_max.
    h_err = beta_max * (x_c[1] - x_c[0]) + _SPECIAL_ABS
    h_c = (h_mid - h_err, h_mid + h_err)
    # Cell geometry in y (exact float ends; y_c exact float).
    dy = _iv(y_b - y_a, y_b - y_a)
    dp, dm = _iv(y_b - y_c, y_b - y_c), _iv(y_c - y_a, y_c - y_a)
    a_plus, a_minus = _iscal(0.5, _imul(dp, dp)), _iscal(0.5, _imul(dm, dm))
    j_iv = _isub(a_plus, a_minus)
    q3 = _iscal(1.0 / 3.0, _iadd(_imul(dp, _imul(dp, dp)), _imul(dm, _imul(dm, dm))))
    q3 = _iv(q3[0], q3[1])
    base = _imul(h_c, dy)
    third = _iadd(_iadd(base, _imul(d1, j_iv)), _iscal(0.5, _imul(d2, q3)))
    # second order: int (h - h_c) in [L A+ - U A-, U A+ - L A-], h' in [L, U].
    l_, u_ = (d1[0], d1[0]), (d1[1], d1[1])
    second = _iadd(base, (_imul(l_, a_plus)[0] - _imul(u_, a_minus)[1], _imul(u_, a_plus)[1] - _imul(l_, a_minus)[0]))
    lo = np.full(y_a.shape, -np.inf)
    hi = np.full(y_a.shape, np.inf)
    for br in (third, second):
        ok = np.isfinite(br[0]) & np.isfinite(br[1])
        lo = np.where(ok, np.maximum(lo, br[0]), lo)
        hi = np.where(ok, np.minimum(hi, br[1]), hi)
    # Constant cells: x* entirely outside [0, 1].
    zero = x_iv[1] <= 0.0
    one = x_iv[0] >= 1.0
    lo = np.where(zero, 0.0, np.where(one, dy[0], lo))
    hi = np.where(zero, 0.0, np.where(one, dy[1], hi))
    # First order where nothing finite: h in [I(x_lo), I(x_hi)].
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if np.any(bad):
        xl = np.where(np.isfinite(x_iv[0][bad]), xc[0][bad], 0.0)
        xh = np.where(np.isfinite(x_iv[1][bad]), xc[1][bad], 1.0)
        lo[bad] = _dn((sc.betainc(a, a, xl) - _SPECIAL_ABS) * dy[0][bad])
        hi[bad] = _up((sc.betainc(a, a, xh) + _SPECIAL_ABS) * dy[1][bad])
    lo = np.maximum(lo, 0.0)
    hi = np.minimum(hi, dy[1])
    return lo, hi


def _initial_cells(tab):
    """Initial cells of the lower half (the upper half uses the same, mirrored)."""
    t = np.linspace(-_T, 0.0, _CELLS // 2 + 1)
    y = np.concatenate([[0.0], sc.ndtr(t)])  # lower half: y = v, from 0 to 1/2 (ndtr(0) = 0.5)
    return y[:-1], y[1:]


def _bracket_rows(logc, r, tab, weight=None):
    """Proven ``[lo, hi]`` for ``P(W < c)`` per row (``r > 0``), refined adaptively.

    Cells are halved (largest first) until the row's bracket is narrower than
    ``_TARGET / weight`` or the row has ``_MAX_CELLS`` cells; the bracket is proven
    whatever the refinement reached. Returns ``(lo, hi, cells per row)``.
    """
    logc = np.asarray(logc, np.float64).ravel()
    r = np.broadcast_to(np.asarray(r, np.float64).ravel(), logc.shape)
    n = logc.size
    ya, yb = _initial_cells(tab)
    m = ya.size
    rows = np.repeat(np.arange(n), 2 * m)
    y_a = np.tile(np.concatenate([ya, ya]), n)
    y_b = np.tile(np.concatenate([yb, yb]), n)
    upper = np.tile(np.concatenate([np.zeros(m, bool), np.ones(m, bool)]), n)
    target = _TARGET / (np.ones(n) if weight is None else np.maximum(weight, 1e-300))
    lo, hi = _cell_brackets(rows, y_a, y_b, upper, logc, r, tab)
    lo_sum, hi_sum, count_all = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)
    for round_ in range(_ROUNDS + 1):
        width = hi - lo
        tot_w = np.bincount(rows, width, n)
        count = np.bincount(rows, minlength=n)
        # Rows that are done (narrow enough, out of cells or rounds) leave the working set.
        done = (tot_w <= target) | (count >= _MAX_CELLS) | (round_ == _ROUNDS)
        out = done[rows]
        if np.any(out):
            lo_sum += np.bincount(rows[out], lo[out], n)
            hi_sum += np.bincount(rows[out], hi[out], n)
            count_all += np.bincount(rows[out], minlength=n)
            keep = ~out
            rows, y_a, y_b, upper, lo, hi, width = (x[keep] for x in (rows, y_a, y_b, upper, lo, hi, width))
            tot_w = np.bincount(rows, width, n)
        if rows.size == 0:
            break
        # Halve the widest cells of each row that carry half of its width.
        order = np.lexsort((-width, rows))
        csum = np.cumsum(width[order])
        start = np.concatenate([[0.0], np.cumsum(tot_w)])[rows[order]]  # width of earlier rows
        before = np.empty_like(width)
        before[order] = csum - width[order] - start
        split = (before < 0.5 * tot_w[rows]) & ((y_b - y_a) > 4 * _U * y_b)  # can still be halved
        if not np.any(split):
            lo_sum += np.bincount(rows, lo, n)
            hi_sum += np.bincount(rows, hi, n)
            count_all += np.bincount(rows, minlength=n)
            break
        ys = 0.5 * (y_a[split] + y_b[split])
        new_rows = np.repeat(rows[split], 2)
        new_a = np.stack([y_a[split], ys], 1).ravel()
        new_b = np.stack([ys, y_b[split]], 1).ravel()
        new_up = np.repeat(upper[split], 2)
        new_lo, new_hi = _cell_brackets(new_rows, new_a, new_b, new_up, logc, r, tab)
        keep = ~split
        rows = np.concatenate([rows[keep], new_rows])
        y_a, y_b = np.concatenate([y_a[keep], new_a]), np.concatenate([y_b[keep], new_b])
        upper = np.concatenate([upper[keep], new_up])
        lo, hi = np.concatenate([lo[keep], new_lo]), np.concatenate([hi[keep], new_hi])
    # Float summation of nonnegative terms: relative error <= (count + 1) u (bincount adds
    # sequentially; the partial sums above add one more rounding per round).
    slack = 2 * (count_all + _ROUNDS + 4) * _U
    lo_sum = lo_sum * (1.0 - slack)
    hi_sum = hi_sum * (1.0 + slack)
    return np.clip(lo_sum, 0.0, 1.0), np.clip(hi_sum, 0.0, 1.0), count_all


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
        p_lt, p_gt, dens = _integrate(ya, r[active], tab, density=True)
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


def _dual_rows(log_lam, r, tab: _Table, lam=None, for_p_min=False):
    """``D(lam)`` and a proven bound on its error per row (r > 0).

    ``lam`` defaults to the float ``np.exp(log_lam)``. The brackets are for
    ``c = e^{+-log_lam}`` exactly, i.e. for ``lam* = e^{log_lam}``, and
    ``|D(lam) - D(lam*)| <= |lam - lam*|`` (``D' = P(W < .) <= 1``), with
    ``|lam - lam*| <= eps lam``, ``eps = 1.01 u (|log_lam| + 3)`` (``log_lam`` within an ulp
    of ``log lam`` when given, ``exp`` within two ulps).

    Refinement weights: ``D``'s error is ``lam e1 + e2`` (brackets of widths ``e1``, ``e2``);
    ``p_min = (1/2 + D) / lam`` sees ``e1 + e2 / lam`` (``for_p_min``).
    """
    n = log_lam.size
    lam = np.exp(log_lam) if lam is None else lam
    logc = np.concatenate([log_lam, -log_lam])
    res = _integrate(logc, np.concatenate([r, r]), tab)
    if for_p_min:
        weight = np.concatenate([np.ones(n), 1.0 / np.maximum(lam, 1.0)])
    else:
        weight = np.concatenate([np.maximum(lam, 1.0), np.ones(n)])
    lo, hi, _ = _bracket_rows(logc, np.concatenate([r, r]), tab, weight)
    p_lt, p_gt = res[0][:n], res[1][n:]
    eps = 1.01 * _U * (np.abs(log_lam) + 3.0)
    # D(lam*) = lam* P(W < lam*) - (1 - P(W < 1/lam*)), lam* in lam [1 - eps, 1 + eps].
    d_lo = lam * (1.0 - eps) * lo[:n] - (1.0 - lo[n:])
    d_hi = lam * (1.0 + eps) * hi[:n] - (1.0 - hi[n:])
    slack = 4 * _U * (lam * hi[:n] + 1.0) + 2.0 * eps * lam  # float rounding + |lam - lam*|
    d_lo, d_hi = d_lo - slack, d_hi + slack
    value = np.clip(lam * p_lt - p_gt, d_lo, d_hi)
    return value, np.maximum(value - d_lo, d_hi - value)


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
    tab = _table(sigma, k, d)
    log_c = np.log(c).ravel()
    # log is within an ulp: e^{l-} <= c <= e^{l+} two ulps either side, and P(W < .) is
    # nondecreasing, so P(W < c) lies between the brackets at l- and l+.
    l_minus = np.nextafter(np.nextafter(log_c, -np.inf), -np.inf)
    l_plus = np.nextafter(np.nextafter(log_c, np.inf), np.inf)
    rr = np.full(c.size, r)
    lo, hi, _ = _bracket_rows(np.concatenate([l_minus, l_plus]), np.concatenate([rr, rr]), tab)
    lo, hi = lo[: c.size], hi[c.size :]
    prob = np.clip(_integrate(log_c, rr, tab)[0], lo, hi)
    err = np.maximum(prob - lo, hi - prob)
    return RatioCDF(prob.reshape(c.shape), err.reshape(c.shape))


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
    flat = lam.ravel()
    value, err = _dual_rows(np.log(flat), np.full(lam.size, r), _table(sigma, k, d), lam=flat)
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
        value, err_d = _dual_rows(log_lam, rr, tab, for_p_min=True)
        lam = np.exp(log_lam)
        # Rounded up: three float operations, each within u.
        p_min[pos] = np.minimum((0.5 + value + err_d) / lam * (1.0 + 4 * _U), 1.0)
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
        lam_p = np.exp(log_lam) * flat[inner]
        # Rounded down: lam p - (D + error), each product and sum within u.
        value[inner] = np.maximum(lam_p * (1.0 - 4 * _U) - (d_val + err_d) * (1.0 + 4 * _U), 0.0)
        err[inner] = err_d
    return LowerBound(p, value.reshape(p.shape), err.reshape(p.shape))
