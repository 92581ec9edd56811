"""The tabulated inverse CDF against scipy quadrature of the same density."""

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
