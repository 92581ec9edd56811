"""The samplers against independent routes: scipy laws, quadrature, rejection sampling.

Every goodness-of-fit check has a companion showing that the same check rejects a
deliberately wrong law (exponent off by one, scale off by a few percent), so a
passing check means something.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
from conftest import chi2_pvalue, ks2_critical, ks2_stat, ks_critical, ks_stat

from soapbubble import noise

KEY = jax.random.key(1234)


# ----------------------------------------------------------------- Gamma radial laws (chi)

CHI_CASES = [
    # family, d, chi degrees of freedom of ||z|| / sigma, a wrong df and a wrong scale
    # factor that a KS check at n = 20000 must reject (a shift of ~0.1 standard deviations).
    (noise.Gaussian(0.7), 50, 50, 51, 1.03),
    (noise.L2Family(0.7, 20.0), 50, 30, 31, 1.03),
    (noise.L2Family(0.25, 500.0), 3072, 2572, 2572 + 20, 1.005),
    (noise.PureLinf(0.3, 7.0), 40, 33, 34, 1.03),
    (noise.L2Family(1.3, 4.5), 5, 0.5, 0.45, 1.1),  # heavy mass near 0 (Gamma shape 0.25)
]


@pytest.mark.parametrize("family,d,df,wrong_df,wrong_scale", CHI_CASES, ids=lambda x: repr(x))
def test_radial_law_is_scaled_chi(family, d, df, wrong_df, wrong_scale):
    n = 20_000
    r = np.asarray(family.sample_radius(KEY, n, d))
    sigma = float(family.sigma)
    crit = ks_critical(n)
    assert ks_stat(r, scipy.stats.chi(df, scale=sigma).cdf) < crit
    # The same check rejects a wrong exponent and a wrong scale.
    assert ks_stat(r, scipy.stats.chi(wrong_df, scale=sigma).cdf) > crit
    assert ks_stat(r, scipy.stats.chi(df, scale=wrong_scale * sigma).cdf) > crit


@pytest.mark.parametrize("family,d,df,_wd,_ws", CHI_CASES[:4], ids=lambda x: repr(x))
def test_norm_of_samples_follows_radial_law(family, d, df, _wd, _ws):
    n = 5_000
    z = np.asarray(family.sample(jax.random.key(7), n, (d,)), dtype=np.float64)
    norm = np.max(np.abs(z), axis=1) if family.radial_norm == "linf" else np.linalg.norm(z, axis=1)
    assert ks_stat(norm, scipy.stats.chi(df, scale=float(family.sigma)).cdf) < ks_critical(n)


# ----------------------------------------------------------------- mixed l_inf: law of ||z||_inf


def mixed_linf_cdf_by_quadrature(sigma, k, d):
    """CDF of a = ||z||_inf under MixedLinf, by scipy quadrature of its 1-D density.

    Density: a^-k exp(-a^2 / 2 sigma^2) erf(a / (sigma sqrt 2))^(d-1), written
    here independently of the library.
    """

    def log_p(a):
        return -k * np.log(a) - a * a / (2 * sigma**2) + (d - 1) * np.log(
            scipy.special.erf(a / (sigma * math.sqrt(2)))
        )

    grid = sigma * np.concatenate([np.geomspace(1e-14, 1e-2, 200), np.linspace(1e-2, 8, 800)[1:]])
    peak = np.max(log_p(grid))
    f = lambda a: math.exp(log_p(a) - peak)
    pieces = [scipy.integrate.quad(f, lo, hi, epsabs=0, epsrel=1e-12)[0] for lo, hi in zip(grid[:-1], grid[1:])]
    # Below grid[0] the density is a power law a^(d-1-k) to within (d+2) a^2 / 6.
    head = f(grid[0]) * grid[0] / (d - k)
    cum = head + np.concatenate([[0.0], np.cumsum(pieces)])
    total = cum[-1] + scipy.integrate.quad(f, grid[-1], np.inf)[0]
    cum /= total

    def cdf(a):
        a = np.asarray(a, dtype=np.float64)
        below = cum[0] * (np.clip(a, 0.0, grid[0]) / grid[0]) ** (d - k)
        return np.where(a < grid[0], below, np.interp(a, grid, cum, right=1.0))

    return cdf


def test_mixed_linf_max_law_d3072_against_quadrature():
    sigma, k, d = 0.5, 250.0, 3072
    cdf = mixed_linf_cdf_by_quadrature(sigma, k, d)
    n = 20_000
    a = np.asarray(noise.MixedLinf(sigma, k).sample_radius(KEY, n, d))
    crit = ks_critical(n)
    assert ks_stat(a, cdf) < crit
    # The full sampler's ||z||_inf follows the same law.
    m = 3_000
    z = np.asarray(noise.MixedLinf(sigma, k).sample(jax.random.key(3), m, (d,)))
    assert ks_stat(np.max(np.abs(z), axis=1), cdf) < ks_critical(m)
    # Power: the check rejects k off by 25 and sigma off by 1%.
    assert ks_stat(a, mixed_linf_cdf_by_quadrature(sigma, k - 25, d)) > crit
    assert ks_stat(a, mixed_linf_cdf_by_quadrature(1.01 * sigma, k, d)) > crit


@pytest.mark.parametrize("sigma,k,d", [(1.0, 1.5, 2), (0.2, 2.9, 3), (2.0, 0.0, 10), (0.5, 2000.0, 3072)])
def test_mixed_linf_max_law_small_and_extreme_cases(sigma, k, d):
    n = 20_000
    a = np.asarray(noise.MixedLinf(sigma, k).sample_radius(jax.random.key(11), n, d))
    # With d - k = 0.1 some draws lie below float32's range and round to 0 (documented).
    assert np.all(np.isfinite(a)) and np.all(a >= 0)
    assert ks_stat(a, mixed_linf_cdf_by_quadrature(sigma, k, d)) < ks_critical(n)


# ----------------------------------------------------------------- mixed l_inf: full law in d = 2, 3


def mixed_linf_by_rejection(rng, sigma, k, d, n):
    """Independent sampler: rejection from the l2 family (numpy), accept (||z||_2/||z||_inf)^k / d^(k/2)."""
    out = []
    while sum(len(o) for o in out) < n:
        m = 4 * n
        rho = sigma * np.sqrt(2 * rng.standard_gamma((d - k) / 2, m))
        g = rng.standard_normal((m, d))
        z = g / np.linalg.norm(g, axis=1, keepdims=True) * rho[:, None]
        ratio = np.linalg.norm(z, axis=1) / np.max(np.abs(z), axis=1)
        accept = rng.random(m) < ratio**k / d ** (k / 2)
        out.append(z[accept])
    return np.concatenate(out)[:n]


def projections(z):
    return {
        "linf": np.max(np.abs(z), axis=1),
        "l2": np.linalg.norm(z, axis=1),
        "z1": z[:, 0],
        "z1+z2": z[:, 0] + z[:, 1],
        "|z1|-|z2|": np.abs(z[:, 0]) - np.abs(z[:, 1]),
    }


@pytest.mark.parametrize("d,k,sigma", [(2, 1.0, 1.0), (3, 2.0, 0.7), (3, 0.5, 1.5)])
def test_mixed_linf_matches_rejection_sampling_low_dim(rng, d, k, sigma):
    n = 20_000
    ours = np.asarray(noise.MixedLinf(sigma, k).sample(jax.random.key(d * 10 + 1), n, (d,)))
    ref = mixed_linf_by_rejection(rng, sigma, k, d, n)
    crit = ks2_critical(n, n)
    for name, stat in projections(ours).items():
        assert ks2_stat(stat, projections(ref)[name]) < crit, name
    # Power: rejection sampling with k off by one differs in some projection.
    wrong = mixed_linf_by_rejection(rng, sigma, max(k - 1.0, 0.0) if k >= 1 else k + 1.0, d, n)
    assert max(ks2_stat(ours_s, projections(wrong)[name]) for name, ours_s in projections(ours).items()) > crit


def test_mixed_linf_non_maximal_coordinates_are_truncated_normals():
    sigma, k, d, n = 0.5, 250.0, 3072, 200
    z = np.asarray(noise.MixedLinf(sigma, k).sample(jax.random.key(5), n, (d,)), dtype=np.float64)
    absz = np.abs(z)
    a = absz.max(axis=1, keepdims=True)
    # Exactly one coordinate attains the maximum; all others are strictly inside.
    assert np.all((absz == a).sum(axis=1) == 1)
    others = z[absz < a].reshape(n, d - 1)
    t = (a / sigma)
    lo = scipy.special.ndtr(-t)

    def to_uniform(x, s):
        return (scipy.special.ndtr(x / s) - scipy.special.ndtr(-a / s)) / (1 - 2 * scipy.special.ndtr(-a / s))

    u = to_uniform(others, sigma)
    assert lo.shape == (n, 1)
    crit = ks_critical(u.size)
    assert ks_stat(u, scipy.stats.uniform.cdf) < crit
    # Power: the same check rejects a scale 2% off.
    assert ks_stat(to_uniform(others, 1.02 * sigma), scipy.stats.uniform.cdf) > crit


def test_mixed_linf_argmax_coordinate_and_sign_are_uniform():
    d, n = 16, 32_000
    z = np.asarray(noise.MixedLinf(0.5, 3.0).sample(jax.random.key(9), n, (d,)))
    j = np.argmax(np.abs(z), axis=1)
    assert chi2_pvalue(np.bincount(j, minlength=d), np.full(d, 1 / d)) > 1e-3
    positive = int(np.sum(z[np.arange(n), j] > 0))
    assert scipy.stats.binomtest(positive, n).pvalue > 1e-3


# ----------------------------------------------------------------- pure l_inf: the cube surface


def test_pure_linf_points_lie_on_cube_surface_uniformly():
    sigma, k, d, n = 0.4, 3.0, 16, 20_000
    z = np.asarray(noise.PureLinf(sigma, k).sample(jax.random.key(21), n, (d,)), dtype=np.float64)
    absz = np.abs(z)
    a = absz.max(axis=1)
    assert np.all((absz == a[:, None]).sum(axis=1) == 1)
    j = np.argmax(absz, axis=1)
    assert chi2_pvalue(np.bincount(j, minlength=d), np.full(d, 1 / d)) > 1e-3
    assert scipy.stats.binomtest(int(np.sum(z[np.arange(n), j] > 0)), n).pvalue > 1e-3
    # Given the face, the other coordinates / a are uniform on (-1, 1).
    others = (z / a[:, None])[absz < a[:, None]]
    assert ks_stat(others, scipy.stats.uniform(-1, 2).cdf) < ks_critical(others.size)
    assert ks_stat(a, scipy.stats.chi(d - k, scale=sigma).cdf) < ks_critical(n)


def test_pure_linf_in_2d_is_uniform_along_the_square():
    n = 20_000
    z = np.asarray(noise.PureLinf(1.0, 0.5).sample(jax.random.key(22), n, (2,)), dtype=np.float64)
    u = z / np.max(np.abs(z), axis=1, keepdims=True)
    # Arc length along the boundary of [-1, 1]^2, counter-clockwise from (1, -1).
    x, y = u[:, 0], u[:, 1]
    s = np.select(
        [x == 1, y == 1, x == -1, y == -1],
        [1 + y, 3 - x, 5 - y, 7 + x],
    )
    assert ks_stat(s, scipy.stats.uniform(0, 8).cdf) < ks_critical(n)


# ----------------------------------------------------------------- log_density agrees with samplers


def grid_marginal_z1(family, half_width, cells, bin_cells):
    """Bin probabilities of z1 in d = 2, from exp(log_density) integrated on a midpoint grid."""
    h = 2 * half_width / cells
    mid = -half_width + h * (np.arange(cells) + 0.5)
    zz = np.stack(np.meshgrid(mid, mid, indexing="ij"), axis=-1)
    log_p = np.asarray(family.log_density(jnp.asarray(zz, jnp.float32)), dtype=np.float64)
    p = np.exp(log_p - log_p.max()).sum(axis=1)
    p /= p.sum()
    edges = -half_width + h * np.arange(0, cells + 1, bin_cells)
    return p.reshape(-1, bin_cells).sum(axis=1), edges


@pytest.mark.parametrize(
    "family",
    [noise.Gaussian(1.0), noise.L2Family(1.0, 0.5), noise.MixedLinf(1.0, 0.5), noise.PureLinf(1.0, 0.5)],
    ids=lambda f: type(f).__name__,
)
def test_log_density_matches_sampler_marginal(family):
    n = 40_000
    half_width, cells, bin_cells = 5.0, 2000, 50
    probs, edges = grid_marginal_z1(family, half_width, cells, bin_cells)
    z = np.asarray(family.sample(jax.random.key(31), n, (2,)))
    inside = np.abs(z[:, 0]) < half_width
    assert inside.mean() > 0.999
    counts = np.histogram(z[inside, 0], bins=edges)[0]
    keep = probs * n > 5
    assert chi2_pvalue(counts[keep], probs[keep] / probs[keep].sum()) > 1e-3
    # Power: the density of a 5% larger scale is rejected.
    wrong = type(family)(1.05, family.k) if family.k else type(family)(1.05)
    wprobs, _ = grid_marginal_z1(wrong, half_width, cells, bin_cells)
    assert chi2_pvalue(counts[keep], wprobs[keep] / wprobs[keep].sum()) < 1e-3


def test_log_density_closed_forms():
    z = jnp.array([[3.0, -4.0], [0.5, 0.25]])
    np.testing.assert_allclose(noise.Gaussian(2.0).log_density(z), [-25 / 8, -0.3125 / 8], rtol=1e-6)
    np.testing.assert_allclose(
        noise.L2Family(2.0, 1.0).log_density(z), [-math.log(5) - 25 / 8, -0.5 * math.log(0.3125) - 0.3125 / 8], rtol=1e-6
    )
    np.testing.assert_allclose(
        noise.MixedLinf(2.0, 1.5).log_density(z), [-1.5 * math.log(4) - 25 / 8, -1.5 * math.log(0.5) - 0.3125 / 8], rtol=1e-6
    )
    np.testing.assert_allclose(
        noise.PureLinf(2.0, 1.5).log_density(z), [-1.5 * math.log(4) - 2, -1.5 * math.log(0.5) - 0.25 / 8], rtol=1e-6
    )
    # k = 0 at z = 0 is finite (no 0 * log 0), k > 0 is +inf, never NaN.
    zero = jnp.zeros((1, 3))
    assert float(noise.MixedLinf(1.0, 0.0).log_density(zero)[0]) == 0.0
    assert float(noise.MixedLinf(1.0, 1.0).log_density(zero)[0]) == math.inf


# ----------------------------------------------------------------- matched scales


@pytest.mark.parametrize("d,k", [(100, 30.0), (3072, 500.0), (150528, 50000.0)])
def test_matched_sigma_rules(d, k):
    sigma0 = 0.5
    # Paper's rule: the modes of ||z||_2 agree (chi mode = scale * sqrt(df - 1)).
    s = noise.matched_sigma(sigma0, d, k)
    mode = lambda df, scale: scipy.optimize.minimize_scalar(
        lambda r: -scipy.stats.chi(df, scale=scale).logpdf(r), bracket=(scale * math.sqrt(df) * 0.9, scale * math.sqrt(df))
    ).x
    np.testing.assert_allclose(mode(d - k, s), mode(d, sigma0), rtol=1e-6)
    # Exact rule: the means agree (scipy's chi mean as the independent route).
    e = noise.matched_sigma_expected_norm(sigma0, d, k)
    np.testing.assert_allclose(scipy.stats.chi(d - k, scale=e).mean(), scipy.stats.chi(d, scale=sigma0).mean(), rtol=1e-10)
    assert e != s


import scipy.optimize  # noqa: E402  (used by the lambda above)
