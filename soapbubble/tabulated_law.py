"""Sampling a one-dimensional law on (0, inf) through a tabulated inverse CDF.

The law is given by its unnormalised log density in ``s = log t``. The table is
built once on the host in float64: the log density is evaluated on a fine
uniform grid in ``s`` around the bulk, each cell is modelled as an exponential
segment (log-linear interpolation, whose CDF inverts in closed form), and the
left tail below the grid is an exact power law ``t**beta`` (density
``exp(beta * s)`` in ``s``), which is what every radial law here looks like near
zero. On the device a draw is one uniform, one ``searchsorted`` over the table
and one ``log1p``: no rejection loop, fixed shapes, jit friendly.

Accuracy. Cell masses come from Gauss-Legendre quadrature of the true density;
only the shape inside a cell is approximated. The table carries ``tv_bound``, a
PROVEN upper bound on the total variation distance between the table's law and
the true law, when the caller supplies :class:`LogConcaveFacts` (rigorous
enclosures of the derivatives of a concave log density); without them
``tv_bound`` is ``inf`` (nothing is claimed). The proof (:func:`_proven_tv`):

* bulk cell ``[s0, s1]``, width ``h``, ``w(s) = (s - s0)(s1 - s)``: the true log
  density minus the model's exponential ``G`` (the chord through the computed end
  values, stored slope) is ``-l''(xi) w(s) / 2`` up to the evaluation and rounding
  error ``e``, with ``A <= l'' <= B`` on the cell from the curvature facts; so
  ``f / G`` lies between two affine functions of ``w`` (``exp(x) >= 1 + x`` and the
  chord of ``exp``), which brackets the cell's true mass and gives
  ``int |f / Z_ref - q|`` in closed form (:func:`_abs_bump_integral`);
* left tail (``s < s0`` of the grid): concavity and ``l' <= beta`` give
  ``l(s0) + beta (s - s0) <= l(s) <= l(s0) + gamma (s - s0)`` with ``gamma`` a
  lower bound of ``l'(s0)``: the tail mass is bracketed by ``[1/beta, 1/gamma]``
  times ``exp(l(s0))``;
* right of the grid the table has no mass; concavity bounds the true mass there
  by ``exp(l(s1)) / |l'(s1)|``;
* the normalising constant ``Z`` is only bracketed (sum of the brackets above):
  ``int |f/Z - q| <= int |f/Z_ref - q| + |Z - Z_ref| / Z_ref``;
* floating point: the caller's bound on the error of the computed log density,
  the rounding of the stored slopes and masses, and of the bound's own sums are
  added explicitly (relative margins of 1e-12 and more, and ``cells * 2^-50``).

Scope: the bound is between the true law and the law the float64 table
describes (exponential segments with the stored edges, slopes and CDF). The
conversion of the uniform draw and the evaluation of the inversion formula in
the sampling dtype (float32 in particular) are not covered; neither is the
accuracy of the special functions beyond the caller's stated margins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LogConcaveFacts", "LogGridTable", "build_table", "sample_table", "table_cdf"]

# Mass below max - _CUTOFF (in log space) is dropped on the right, where the
# densities decay like exp(-t^2/2); exp(-60) ~ 1e-26.
_CUTOFF = 60.0
_U = 2.0**-53  # float64 unit roundoff
_REL = 1e-12  # relative margin for the float64 evaluation of the bound's closed forms


class LogConcaveFacts(NamedTuple):
    """Proven facts about a log density ``l(s)`` that make ``tv_bound`` a proof.

    Contract (the caller proves it; :func:`build_table` relies on it): ``l`` is
    concave on the whole real line and ``l'(s) -> tail_slope`` as ``s -> -inf``
    (so ``l' <= tail_slope`` everywhere); the three callables are rigorous
    enclosures of the TRUE functions, float rounding of their own evaluation
    included.

    Attributes:
      derivative: ``s -> (lo, hi)``, arrays with ``lo <= l'(s) <= hi``.
      curvature: ``(s0, s1) -> (lo, hi)``, arrays with ``lo <= l''(s) <= hi``
        for every ``s`` in ``[s0, s1]`` (elementwise over cells).
      abs_error: ``s -> eps``, ``|log_density_s(s) - l(s)| <= eps`` for the
        computed log density passed to :func:`build_table`.
    """

    derivative: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    curvature: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    abs_error: Callable[[np.ndarray], np.ndarray]


class LogGridTable(NamedTuple):
    """A tabulated law in ``s = log t`` (host numpy arrays, float64).

    Attributes:
      edges: ``(m + 1,)`` cell edges in ``s``; cell 0 is the power-law tail
        ``(-inf, edges[1]]`` (``edges[0]`` is ``-inf``).
      slope: ``(m,)`` slope of the log density in each cell (cell 0: the
        tail exponent).
      cdf: ``(m + 1,)`` CDF at the edges, ``cdf[0] = 0``, ``cdf[-1] = 1``.
      tv_bound: PROVEN upper bound on the total variation distance between the
        law this float64 table describes and the true law (bulk cells, left
        tail, mass dropped on the right, normalisation and float rounding; see
        the module docstring for the proof and its scope), or ``inf`` when the
        table was built without :class:`LogConcaveFacts`. Estimates built from
        draws of the table (the dual bound's deviation terms) add it.
    """

    edges: np.ndarray
    slope: np.ndarray
    cdf: np.ndarray
    tv_bound: float


class TVBreakdown(NamedTuple):
    """Terms of the proven TV bound (for tests and diagnostics); all are upper bounds.

    ``tv = (bulk + left + right + normalisation) / 2 + rounding``; ``cells`` holds the
    bulk terms ``int_cell |f / z_ref - q|`` per cell (same order as the grid) and
    ``z_lo <= Z / z_ref <= z_hi`` brackets the true normalising constant.
    """

    tv: float
    bulk: float
    left: float
    right: float
    normalisation: float
    rounding: float
    cells: np.ndarray
    z_lo: float
    z_hi: float


def build_table(
    log_density_s: Callable[[np.ndarray], np.ndarray],
    tail_slope: float,
    s_range: tuple[float, float] = (np.log(1e-10), np.log(80.0)),
    cells: int = 8192,
    tail_start: float = np.log(1e-5),
    facts: LogConcaveFacts | None = None,
) -> LogGridTable:
    """Tabulates a law given its unnormalised log density in ``s = log t``.

    Cell masses come from 3-point Gauss-Legendre quadrature of the true density
    (so the CDF at the cell edges is accurate to ~1e-12); only the shape of the
    density inside a cell is approximated by an exponential segment.

    Args:
      log_density_s: vectorised float64 log density in ``s`` (already including
        the Jacobian ``t``), unnormalised.
      tail_slope: exponent ``beta > 0`` with ``log_density_s(s) ~ beta * s`` as
        ``s -> -inf``; below the grid the law is taken as exactly this power law.
      s_range: coarse search window for the bulk.
      cells: number of fine cells over the bulk.
      tail_start: the grid never starts below this ``s`` unless the bulk lies
        there; the power-law tail takes over below it.
      facts: rigorous facts about the log density (:class:`LogConcaveFacts`);
        with them ``tv_bound`` is proven, without them it is ``inf``.

    Returns:
      A :class:`LogGridTable`.
    """
    if not tail_slope > 0:
        raise ValueError(f"tail_slope must be > 0, got {tail_slope}")
    coarse = np.linspace(s_range[0], s_range[1], 20001)
    values = log_density_s(coarse)
    peak = np.max(values)
    keep = np.nonzero(values >= peak - _CUTOFF)[0]
    lo = max(coarse[max(keep[0] - 1, 0)], min(tail_start, coarse[keep[-1]] - 1.0))
    hi = coarse[min(keep[-1] + 1, coarse.size - 1)]
    grid = np.linspace(lo, hi, cells + 1)
    raw = log_density_s(grid)
    shift = np.max(raw)
    log_p = raw - shift
    h = grid[1] - grid[0]
    slope = np.diff(log_p) / h
    mid = 0.5 * (grid[:-1] + grid[1:])
    nodes, weights = np.polynomial.legendre.leggauss(3)
    mass = sum(w * np.exp(log_density_s(mid + x * h / 2) - shift) for x, w in zip(nodes, weights)) * h / 2
    tail = np.exp(log_p[0]) / tail_slope
    masses = np.concatenate([[tail], mass])
    cdf = np.concatenate([[0.0], np.cumsum(masses)])
    total = cdf[-1]
    cdf /= total
    edges = np.concatenate([[-np.inf], grid])
    slopes = np.concatenate([[tail_slope], slope])
    table = LogGridTable(edges=edges, slope=slopes, cdf=cdf, tv_bound=math.inf)
    if facts is None:
        return table
    bound = _proven_tv(table, raw, shift, total, facts)
    return table._replace(tv_bound=bound.tv)


def _segment_integral(lp0: np.ndarray, b: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``int_0^h exp(lp0 + b x) dx``, evaluated from the larger end (no overflow)."""
    bh = b * h
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = np.where(b == 0.0, h, -np.expm1(-np.abs(bh)) / np.abs(np.where(b == 0.0, 1.0, b)))
    return np.exp(lp0 + np.maximum(bh, 0.0)) * shape


def _abs_bump_integral(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``K(a, c) = int_0^1 |a y (1 - y) - c| dy`` in closed form (plus its rounding)."""
    flip = a < 0
    a, c = np.where(flip, -a, a), np.where(flip, -c, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a > 0, c / np.where(a > 0, a, 1.0), 0.0)
        y = 2.0 * ratio / (1.0 + np.sqrt(np.maximum(1.0 - 4.0 * ratio, 0.0)))  # smaller root
        inner = (a / 6.0 - c) + 4.0 * (c * y - a * y * y * (0.5 - y / 3.0))
    out = np.where(c <= 0.0, a / 6.0 - c, np.where(4.0 * c >= a, c - a / 6.0, inner))
    return np.maximum(out, 0.0) + 16 * _U * (a + np.abs(c))


def _proven_tv(
    table: LogGridTable, raw: np.ndarray, shift: float, total: float, facts: LogConcaveFacts
) -> TVBreakdown:
    """Proven upper bound on TV(table law, true law); see the module docstring.

    ``raw`` is the computed log density at the grid ``table.edges[1:]``, ``shift``
    the reference subtracted from it and ``total`` the table's total mass in units
    of ``exp(shift)`` (any positive float would do: it is the reference ``z_ref``).
    Masses below are in units of ``exp(shift)``.

    Bulk cell ``[s0, s1]`` (width ``h``, ``w(s) = (s - s0)(s1 - s)``): with
    ``G(s) = exp(log_p0 + b (s - s0))`` the model's exponential through the computed
    left value, ``F = int G`` and the table's mass ``P``, the model density is
    ``q = P G / F`` and the true density is ``f = G exp(rho(s))`` with
    ``kap_lo w - e <= rho <= kap_hi w + e`` (``kap = -l''/2`` bracketed by the
    curvature facts, ``e`` the evaluation and slope-rounding error). Hence
    ``exp(rho)`` lies between two affine functions of ``w`` (``exp(x) >= 1 + x`` and
    the chord of ``exp`` on ``[0, kap_hi h^2/4]``), and ``int_cell |f/z_ref - q|``
    is at most ``(G_max h K(kap_mid h^2, C) + dkap G_max h^3 / 12 + F (e^e - 1)) / z_ref``
    with ``C = P z_ref / F - 1`` and ``K`` the closed form of :func:`_abs_bump_integral`.
    """
    grid = table.edges[1:]
    n = grid.size - 1
    log_p = raw - shift
    b = table.slope[1:]
    beta = float(table.slope[0])
    width = np.diff(grid)
    inf = TVBreakdown(math.inf, math.inf, math.inf, math.inf, math.inf, 0.0, np.full(n, np.inf), 0.0, math.inf)
    # Error of the computed log density (and of subtracting shift) at the edges.
    eps = np.asarray(facts.abs_error(grid), np.float64) + _U * (np.abs(log_p) + np.abs(raw))
    if not (np.all(np.isfinite(eps)) and np.all(np.isfinite(log_p)) and total > 0):
        return inf

    # ---- bulk cells
    a_curv, b_curv = (np.asarray(x, np.float64) for x in facts.curvature(grid[:-1], grid[1:]))
    kap_lo, kap_hi = -0.5 * b_curv, -0.5 * a_curv  # kap = -l''/2, kap_lo <= kap_hi
    h = width * (1.0 + 2 * _U)  # >= the exact width s1 - s0
    # |(chord slope of the true l - b) h| <= eta; with eps0: the log-level error e.
    diff = np.diff(log_p)
    eta = (
        eps[:-1] + eps[1:] + np.abs(diff - b * width)
        + 4 * _U * (np.abs(log_p[:-1]) + np.abs(log_p[1:]) + np.abs(diff) + np.abs(b * width))
    )
    e = eps[:-1] + eta
    big_x = kap_hi * h * h / 4.0  # kap_hi w <= big_x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        chord = np.where(np.abs(big_x) < 1e-8, 1.0 + 0.5 * big_x + big_x * big_x, np.expm1(big_x) / big_x)
    chord = chord * (1.0 + 4 * _U)
    # exp(rho) in [1 + al_lo + be_lo w, 1 + al_hi + be_hi w]:
    al_lo, be_lo = np.expm1(-e) * (1.0 + 4 * _U), np.exp(-e) * kap_lo  # al_lo <= 0
    al_hi, be_hi = np.expm1(e) * (1.0 + 4 * _U), np.exp(e) * kap_hi * chord
    be_lo = be_lo - 4 * _U * np.abs(be_lo)
    be_hi = be_hi + 4 * _U * np.abs(be_hi)
    seg = _segment_integral(log_p[:-1], b, width)  # F, relative error <= _REL
    g_max = np.exp(log_p[:-1] + np.maximum(b * width, 0.0)) * (1.0 + _REL)
    g_min = np.exp(log_p[:-1] + np.minimum(b * width, 0.0)) * (1.0 - _REL)
    cube = h * h * h / 6.0  # int w over the cell
    # int G w in [g_min, g_max] * h^3 / 6; mass = int G exp(rho).
    f_lo = seg * (1.0 - _REL) * (1.0 + al_lo) + be_lo * np.where(be_lo >= 0, g_min, g_max) * cube
    f_hi = seg * (1.0 + _REL) * (1.0 + al_hi) + be_hi * np.where(be_hi >= 0, g_max, g_min) * cube
    f_lo = np.maximum(f_lo * (1.0 - 8 * _U), 0.0)
    f_hi = f_hi * (1.0 + 8 * _U)
    cdf = table.cdf
    prob = cdf[2:] - cdf[1:-1]  # the table's cell masses (float difference: error <= u cdf)
    z_ref = float(total)
    big_c = prob * z_ref / seg - 1.0
    dc = 2 * _REL * (1.0 + np.abs(big_c)) + 8 * _U * (1.0 + np.abs(big_c)) + _U * cdf[2:] * z_ref / seg
    be_mid, be_half = 0.5 * (be_lo + be_hi), 0.5 * (be_hi - be_lo)
    al_max = np.maximum(np.abs(al_lo), np.abs(al_hi))
    cell_terms = (
        g_max * h * (_abs_bump_integral(be_mid * h * h, big_c) + dc)
        + be_half * g_max * cube
        + seg * (1.0 + _REL) * al_max
    ) / z_ref
    cell_terms = np.where(seg > 0, cell_terms, np.abs(prob) + f_hi / z_ref) * (1.0 + 16 * _U)

    # ---- left tail: exp(l(s0) + beta (s - s0)) <= f <= exp(l(s0) + gamma (s - s0)), s <= s0.
    gamma = float(np.asarray(facts.derivative(np.array([grid[0]])))[0][0])
    g0 = float(np.exp(log_p[0])) / beta  # the power-law tail mass through the computed l(s0)
    e0 = float(eps[0])
    left_lo = g0 * math.exp(-e0) * (1.0 - _REL)
    left_hi = g0 * (beta / gamma) * math.exp(e0) * (1.0 + _REL) if gamma > 0 else math.inf

    # ---- right of the grid: f <= exp(l(s1) + l'(s1) (s - s1)), l'(s1) <= delta < 0.
    delta = float(np.asarray(facts.derivative(np.array([grid[-1]])))[1][0])
    right_hi = float(np.exp(log_p[-1] + eps[-1])) / -delta * (1.0 + _REL) if delta < 0 else math.inf

    # ---- normalisation: Z in [z_lo, z_hi] (in units of exp(shift)).
    z_lo = (np.sum(f_lo) + left_lo) * (1.0 - (n + 4) * _U)
    z_hi = (np.sum(f_hi) + left_hi + right_hi) * (1.0 + (n + 4) * _U)
    bulk = float(np.sum(cell_terms)) * (1.0 + (n + 4) * _U)
    # Left tail: f >= G0 e^-e0 pointwise and q0 = P0 G0 / g0 (G0 the power law through log_p0).
    p0 = float(cdf[1])
    left = (left_hi - left_lo) / z_ref + abs(left_lo / z_ref - p0) + 2 * _REL * left_hi / z_ref
    left = (left + 4 * _U * (left_hi / z_ref + p0)) * (1.0 + 8 * _U)
    right = right_hi / z_ref * (1.0 + 4 * _U)
    normalisation = max(z_hi - z_ref, z_ref - z_lo) / z_ref * (1.0 + 4 * _U)
    rounding = 8 * (n + 8) * _U
    tv = 0.5 * (bulk + left + right + normalisation) + rounding
    if not math.isfinite(tv):
        return inf
    return TVBreakdown(
        tv=float(tv), bulk=bulk, left=left, right=right, normalisation=float(normalisation),
        rounding=rounding, cells=cell_terms, z_lo=float(z_lo / z_ref), z_hi=float(z_hi / z_ref),
    )


def table_cdf(table: LogGridTable, s: np.ndarray) -> np.ndarray:
    """The table's CDF at ``s`` (host, float64); used to check the table."""
    s = np.asarray(s, dtype=np.float64)
    i = np.clip(np.searchsorted(table.edges, s, side="right") - 1, 0, table.slope.size - 1)
    b = table.slope[i]
    right = table.edges[i + 1]
    width = np.where(i == 0, np.inf, right - table.edges[i])
    gap = np.maximum(right - s, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        decay = np.where(i == 0, 1.0, -np.expm1(-b * width))
        right_share = np.where(np.abs(b * np.where(i == 0, 1.0, width)) < 1e-12, gap / width,
                               -np.expm1(-b * gap) / decay)
    out = table.cdf[i + 1] - (table.cdf[i + 1] - table.cdf[i]) * right_share
    return np.where(s >= table.edges[-1], 1.0, out)


def sample_table(key: jax.Array, table: LogGridTable, shape: tuple[int, ...], dtype) -> jax.Array:
    """Draws ``s`` from a tabulated law by inversion.

    Args:
      key: PRNG key.
      table: a :class:`LogGridTable`.
      shape: output shape.
      dtype: floating dtype of the output.

    Returns:
      Array of ``shape`` and ``dtype`` with draws of ``s = log t``.
    """
    # Inversion is done relative to the right edge of the cell, which is finite
    # for every cell (including the tail), so one formula serves all cells.
    cdf = jnp.asarray(table.cdf, dtype)
    right = jnp.asarray(table.edges[1:], dtype)
    slope = jnp.asarray(table.slope, dtype)
    u = jax.random.uniform(key, shape, dtype)
    i = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, slope.shape[0] - 1)
    lo_c, hi_c = cdf[i], cdf[i + 1]
    # w in (0, 1]: share of the cell's mass to the right of the draw.
    w = jnp.clip((hi_c - u) / jnp.maximum(hi_c - lo_c, jnp.finfo(dtype).tiny), 0.0, 1.0)
    b = slope[i]
    width = jnp.asarray(np.diff(np.concatenate([[table.edges[1] - 1.0], table.edges[1:]])), dtype)[i]
    # Within an exponential segment of slope b and width h (tail: h = inf):
    #   mass right of s  ∝ 1 - exp(-b (right - s))  ->  right - s = -log1p(-w (1 - exp(-b h))) / b.
    is_tail = i == 0
    decay = jnp.where(is_tail, 1.0, -jnp.expm1(-b * width))
    small = jnp.abs(b * width) < 1e-6
    b_safe = jnp.where(small & ~is_tail, 1.0, b)
    gap = jnp.where(
        small & ~is_tail,
        w * width,
        -jnp.log1p(-w * decay) / b_safe,
    )
    # w == 1 in the tail would be s = -inf (t = 0), a null event: keep it finite.
    gap = jnp.where(jnp.isfinite(gap), gap, jnp.asarray(700.0, dtype))
    return right[i] - gap
