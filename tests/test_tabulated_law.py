"""The tabulated inverse CDF against scipy quadrature of the same density."""

import itertools
import math

import jax
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
from conftest import ks_critical, ks_stat

from soapbubble import noise, tabulated_law


def quad_cdf_t(k, d, ts):
    """CDF of t = a / sigma under MixedLinf at the points ts, by adaptive quadrature."""
    mode_guess = np.linspace(1e-6, 10, 4001)
    log_p = lambda t: -k * np.log(t) - t * t / 2 + (d - 1) * np.log(scipy.special.erf(t / math.sqrt(2)))
    peak = np.max(log_p(mode_guess))
    f = lambda t: math.exp(log_p(t) - peak) if t > 0 else 0.0
    brk = list(np.linspace(0, 10, 201))
    total = sum(scipy.integrate.quad(f, a, b, epsabs=1e-300, epsrel=1e-13, limit=200)[0] for a, b in zip(brk[:-1], brk[1:]))
    out = []
    for t in ts:
        edges = [e for e in brk if e < t] + [t]
        out.append(sum(scipy.integrate.quad(f, a, b, epsabs=1e-300, epsrel=1e-13, limit=200)[0] for a, b in zip(edges[:-1], edges[1:])))
    return np.array(out) / total


@pytest.mark.parametrize("k,d", [(0.0, 2), (1.5, 2), (2.9, 3), (250.0, 3072), (2000.0, 3072), (50000.0, 150528)])
def test_table_cdf_within_1e8_of_quadrature(k, d):
    table = noise.mixed_linf_radial_table(k, d)
    # Points spread over the bulk of the law.
    qs = np.asarray(noise.MixedLinf(1.0, k).sample_radius(jax.random.key(0), 40, d), dtype=np.float64)
    ts = np.sort(qs)
    np.testing.assert_allclose(tabulated_law.table_cdf(table, np.log(ts)), quad_cdf_t(k, d, ts), atol=1e-8, rtol=0)


def test_power_law_tail_is_exact():
    # Density t^beta-1 on (0, 1] in t, i.e. exp(beta s) on s <= 0: a Beta(beta, 1) law in t.
    beta = 0.05
    table = tabulated_law.build_table(
        lambda s: np.where(s <= 0, beta * s, -1e4 * s), tail_slope=beta, s_range=(-5.0, 1.0)
    )
    n = 20_000
    s = np.asarray(tabulated_law.sample_table(jax.random.key(4), table, (n,), np.float32), dtype=np.float64)
    # Most of the mass lies far below the grid: it comes from the exact tail cell.
    assert np.mean(s < -5.0) > 0.7
    assert ks_stat(s, lambda x: np.exp(beta * np.minimum(x, 0.0))) < ks_critical(n)


def test_build_table_rejects_bad_tail():
    with pytest.raises(ValueError, match="tail_slope must be > 0"):
        tabulated_law.build_table(lambda s: -s * s, tail_slope=0.0)


@pytest.mark.parametrize("k,d", [(0.0, 2), (250.0, 3072), (50000.0, 150528)])
def test_tv_bound_covers_the_table_error(k, d):
    """Total variation between the table and the true law, by an independent fine
    midpoint integration of the true density (in t) against the table's CDF."""
    table = noise.mixed_linf_radial_table(k, d)
    assert table.tv_bound < 1e-6
    # TV >= sup |F_table - F_true|: check the table's CDF against quadrature at its
    # own cell edges, where the error is largest relative to the model.
    edges = table.edges[1:][:: table.edges.size // 25]
    ts = np.exp(edges[(edges > -11) & np.isfinite(edges)])
    diff = np.abs(tabulated_law.table_cdf(table, np.log(ts)) - quad_cdf_t(k, d, ts))
    assert diff.max() <= table.tv_bound


# --------------------------------------------------------------------------- the proven TV bound


def _log_erf_indep(x):
    with np.errstate(divide="ignore"):
        return np.where(
            x < 1, np.log(scipy.special.erf(np.minimum(x, 1.0))), np.log1p(-scipy.special.erfc(np.maximum(x, 1.0)))
        )


def _mixed_log_f(k, d):
    """Unnormalised log density of s = log t under MixedLinf, written here independently."""
    return lambda s: (1.0 - k) * s - 0.5 * np.exp(2 * s) + (d - 1) * _log_erf_indep(np.exp(s) / math.sqrt(2))


def _model_log_q(table, i, s):
    """log density of the table's law at s inside bulk cell i (edges[i+1], edges[i+2])."""
    s0, s1 = table.edges[i + 1], table.edges[i + 2]
    b, p = table.slope[i + 1], table.cdf[i + 2] - table.cdf[i + 1]
    return math.log(p) + math.log(abs(b)) + b * (s - s0) - math.log(abs(math.expm1(b * (s1 - s0))))


def _dense_tv(table, log_f, log_z, sub=256):
    """(1/2) int |p - q| over the bulk cells by a composite midpoint rule (sub points a cell)."""
    grid = table.edges[1:]
    h, b = np.diff(grid), table.slope[1:]
    prob = np.diff(table.cdf)[1:]
    off = (np.arange(sub) + 0.5) / sub
    total = 0.0
    for idx in np.array_split(np.arange(h.size), 32):
        hh, bb, pp = h[idx, None], b[idx, None], prob[idx, None]
        x = grid[idx, None] + hh * off
        log_q = np.log(np.maximum(pp, 1e-300)) + np.log(np.abs(bb)) + bb * hh * off - np.log(np.abs(np.expm1(bb * hh)))
        log_p = log_f(x) - log_z
        with np.errstate(invalid="ignore", over="ignore"):
            gap = np.where(pp > 0, np.abs(np.exp(log_q) * np.expm1(log_p - log_q)), np.exp(log_p))
        total += np.sum(gap * hh / sub)
    return 0.5 * total


def _log_total_by_quad(log_f, lo, hi, shift):
    f = lambda s: math.exp(log_f(np.float64(s)) - shift)
    brk = np.linspace(lo, hi, 201)
    z = sum(
        scipy.integrate.quad(f, a, b, epsabs=0, epsrel=1e-12, limit=200)[0]
        for a, b in itertools.pairwise(brk)
    )
    z += scipy.integrate.quad(f, -np.inf, lo, epsabs=0, epsrel=1e-12, limit=200)[0]
    return math.log(z) + shift


@pytest.mark.parametrize("k,d", [(5.0, 64), (250.0, 3072), (50000.0, 150528), (1.5, 2), (0.0, 10)])
def test_proven_tv_bound_dominates_independent_tv(k, d):
    """The proven bound against 1/2 int |p - q| by dense midpoint integration (256 points a
    cell), with the true law normalised by scipy quadrature; and it stays below 1e-6."""
    table = noise.mixed_linf_radial_table(k, d)
    log_f = _mixed_log_f(k, d)
    grid = table.edges[1:]
    log_z = _log_total_by_quad(log_f, grid[0], grid[-1], float(np.max(log_f(grid))))
    tv = _dense_tv(table, log_f, log_z)
    assert tv <= table.tv_bound < 1e-6
    assert table.tv_bound < 1.2 * tv  # and it is tight (the proof loses little)


def test_proven_cell_terms_dominate_quadrature():
    """Each bulk term of the proof bounds int_cell |f / z_ref - q| (scipy quad, cells with the
    largest terms and a few others), for an arbitrary reference z_ref."""
    k, d = 250.0, 3072
    table = noise.mixed_linf_radial_table(k, d)
    log_f = _mixed_log_f(k, d)
    grid = table.edges[1:]
    raw = log_f(grid)
    shift = float(np.max(raw))
    z_ref = (np.exp(raw[0] - shift) / table.slope[0]) / table.cdf[1]  # the table's own total mass
    proof = tabulated_law._proven_tv(table, raw, shift, z_ref, noise._mixed_linf_facts(k, d))
    assert proof.tv == pytest.approx(table.tv_bound, rel=1e-6)
    assert proof.z_lo <= 1.0 + 1e-9 and proof.z_hi >= 1.0 - 1e-9
    cells = list(np.argsort(proof.cells)[-4:]) + [50, 1000, 2500, 5000, 6000]
    assert np.all(np.diff(table.cdf)[1:][cells] > 0)
    for i in cells:
        s0, s1 = grid[i], grid[i + 1]

        def gap(s, i=i):
            log_q = _model_log_q(table, i, s)
            return abs(math.exp(log_q) * math.expm1(float(log_f(np.float64(s))) - shift - math.log(z_ref) - log_q))

        exact = scipy.integrate.quad(gap, s0, s1, epsabs=1e-30, epsrel=1e-10, limit=200)[0]
        assert exact <= proof.cells[i], (i, exact, proof.cells[i])


def _softplus_facts(beta, gamma):
    """Facts for l(s) = beta s - gamma log(1 + e^s): concave, l' -> beta at -inf."""
    sig = scipy.special.expit

    def derivative(s):
        v = beta - gamma * sig(s)
        return v - 1e-12 * (beta + gamma), v + 1e-12 * (beta + gamma)

    def curvature(s0, s1):
        v0, v1 = sig(s0) * sig(-s0), sig(s1) * sig(-s1)
        vmax = np.where((s0 <= 0) & (s1 >= 0), 0.25, np.maximum(v0, v1))
        vmin = np.minimum(v0, v1)
        return -gamma * vmax * (1 + 1e-12), -gamma * vmin * (1 - 1e-12)

    def abs_error(s):
        return 1e-13 * (1 + np.abs(beta * s) + gamma * np.logaddexp(0.0, s))

    return tabulated_law.LogConcaveFacts(derivative, curvature, abs_error)


def test_proven_tv_bound_covers_a_bent_left_tail():
    """A law that is a power law only far below the grid: t (1 + t)^-4 (Beta-prime, total
    mass B(2, 2) = 1/6 in closed form), tabulated from s = -3. The table's power-law tail
    is then visibly wrong; the proof covers it (the former bound, twice a bulk estimate plus
    1e-9, did not)."""
    beta, gamma = 2.0, 4.0
    log_f = lambda s: beta * s - gamma * np.logaddexp(0.0, s)
    table = tabulated_law.build_table(
        log_f, tail_slope=beta, s_range=(-3.0, 25.0), facts=_softplus_facts(beta, gamma)
    )
    assert table.edges[1] == -3.0
    log_z = math.log(1.0 / 6.0)
    p0, s0 = table.cdf[1], table.edges[1]
    tail = scipy.integrate.quad(
        lambda s: abs(math.exp(log_f(s) - log_z) - p0 * beta * math.exp(beta * (s - s0))),
        -np.inf, s0, epsabs=1e-15, epsrel=1e-10, limit=200,
    )[0]
    right = scipy.integrate.quad(lambda s: math.exp(log_f(s) - log_z), table.edges[-1], np.inf)[0]
    tv = 0.5 * (tail + right) + _dense_tv(table, log_f, log_z)
    assert tv > 1e-4  # the tail error dominates
    assert tv <= table.tv_bound < 2 * tv


def test_build_table_without_facts_claims_nothing():
    table = tabulated_law.build_table(lambda s: 2 * s - 4 * np.logaddexp(0.0, s), tail_slope=2.0)
    assert table.tv_bound == math.inf
