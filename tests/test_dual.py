"""The Monte Carlo dual bound against independent routes.

Routes: Cohen et al.'s closed form and the lognormal law of W for the Gaussian
(Corollary 1), the families' own log densities on explicit samples, full
d-dimensional samples (KS), and a numpy rejection sampler for MixedLinf in d = 2.
Tolerances come from the sample sizes through DKW bounds at conftest.ALPHA; each
comparison has a companion showing that a slightly wrong answer is rejected.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import ks2_critical, ks2_stat, ks_critical, ks_stat

from soapbubble import noise
from soapbubble.bounds import dual

KEY = jax.random.key(20261126)
Phi = scipy.stats.norm.cdf
Phi_inv = scipy.stats.norm.ppf


def gaussian_d_closed_form(lam, s):
    """D(lam) = E[(lam - W)_+] for the Gaussian at shift r/sigma = s, derived here.

    With delta = r e1, log W = -(r^2 - 2 r z1) / (2 sigma^2) = -s^2/2 + s g with
    g = z1/sigma ~ N(0, 1): log W ~ N(mu, s^2), mu = -s^2/2. For X ~ N(mu, s^2),
    E[(lam - e^X) 1{X < log lam}] = lam Phi(a) - e^(mu + s^2/2) Phi(a - s) with
    a = (log lam - mu)/s, and e^(mu + s^2/2) = 1.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if s == 0:
        return np.maximum(lam - 1.0, 0.0)
    a = (np.log(lam) + s * s / 2) / s
    return lam * Phi(a) - Phi(a - s)


# ----------------------------------------------------------------- Corollary 1 (d = 3072)

COROLLARY_CASES = [
    # family, attack, sigma, l2 radii; the linf attack is certified at r / sqrt(d) (Theorem 3)
    (noise.Gaussian(0.25), "l2", 0.25, [0.1, 0.5, 1.0]),
    (noise.Gaussian(1.0), "linf", 1.0, [0.25, 1.0, 2.0]),
    (noise.L2Family(0.5, 0.0), "l2", 0.5, [0.1, 0.5, 1.5]),
]


@pytest.mark.parametrize("family,attack,sigma,radii", COROLLARY_CASES, ids=lambda x: repr(x))
def test_corollary1_reproduces_cohen(family, attack, sigma, radii):
    d, n = 3072, 200_000
    lambdas = np.geomspace(1e-3, 1e3, 2001)
    radii = np.asarray(radii)
    r_arg = radii / math.sqrt(d) if attack == "linf" else radii
    curve = dual.dual_curve(KEY, family, d, attack, r_arg, lambdas, n, alpha_d=1e-3)
    d_hat = np.asarray(curve.d_hat)
    d_upper = np.asarray(curve.d_upper)
    eps = float(curve.epsilon)
    assert d_hat.shape == d_upper.shape == (len(radii), len(lambdas))
    assert eps == pytest.approx(math.sqrt(math.log(1e3) / (2 * n)), rel=1e-12)
    eps_test = ks_critical(n)  # two-sided DKW at ALPHA: sup |F_hat - F| for this check

    ps = np.array([0.55, 0.75, 0.9, 0.99])
    v = np.asarray(dual.lower_bound(ps, curve))
    assert v.shape == (len(radii), len(ps))
    for i, r in enumerate(radii):
        s = r / sigma
        d_true = gaussian_d_closed_form(lambdas, s)
        # D_hat(lam) - D(lam) = int_0^lam (F_hat - F), so |D_hat - D| <= lam eps_test.
        assert np.all(np.abs(d_hat[i] - d_true) <= lambdas * eps_test + 1e-12)
        # ... and the check sees a shift of r / sigma by 0.05.
        wrong = gaussian_d_closed_form(lambdas, s + 0.05)
        assert np.any(np.abs(d_hat[i] - wrong) > lambdas * eps_test)
        # Soundness: the upper curve lies above the true D at every lambda.
        assert np.all(d_upper[i] >= d_true)

        v_cohen = Phi(Phi_inv(ps) - s)
        # The best the grid allows with the exact D, and with D + lam (eps + eps_test).
        gain = lambdas[None, :] * ps[:, None]
        v_grid = np.maximum(np.max(gain - d_true, axis=1), 0)
        v_low = np.maximum(np.max(gain - d_true - lambdas * (eps + eps_test), axis=1), 0)
        assert np.all(v[i] <= v_grid + 1e-12) and np.all(v_grid <= v_cohen + 1e-12)
        assert np.all(v[i] >= v_low - 1e-12)
        # In Corollary 1's terms: the gap to Cohen is at most the lambda-grid loss plus
        # (eps + eps_test) times lambda*, the grid's maximiser for the exact D (close to
        # the root of Phi(a) = p unless that falls off the grid).
        lam_star = lambdas[np.argmax(gain - d_true, axis=1)]
        tol = lam_star * (eps + eps_test) + (v_cohen - v_grid)
        assert np.all(np.abs(v[i] - v_cohen) <= tol + 1e-12)
        assert np.all(v_cohen - v_grid < 1e-4)


def test_mixed_linf_with_k0_is_the_gaussian_at_r_sqrt_d():
    # MixedLinf(sigma, 0) is N(0, sigma^2 I); delta = r 1 has l2 norm r sqrt(d), so the
    # four-statistic route at d = 3072 must match the lognormal closed form.
    sigma, d, n = 0.5, 3072, 20_000
    radii = np.array([0.3, 1.0]) * sigma / math.sqrt(d)
    lambdas = np.geomspace(1e-2, 1e2, 201)
    curve = dual.dual_curve(KEY, noise.MixedLinf(sigma, 0.0), d, "linf", radii, lambdas, n)
    tol = lambdas * ks_critical(n)
    for i, s in enumerate([0.3, 1.0]):
        d_hat = np.asarray(curve.d_hat[i])
        assert np.all(np.abs(d_hat - gaussian_d_closed_form(lambdas, s)) <= tol)
        assert np.any(np.abs(d_hat - gaussian_d_closed_form(lambdas, s + 0.1)) > tol)


def test_alpha_above_one_half_uses_the_epsilon_of_one_half():
    # Massart's one-sided DKW bound is proven for levels <= 1/2.
    family, n = noise.Gaussian(1.0), 1000
    stats = dual.ratio_statistics(KEY, family, 4, "l2", n)
    for alpha, level in [(0.1, 0.1), (0.5, 0.5), (0.9, 0.5)]:
        curve = dual.dual_curve_from_stats(family, stats, 4, "l2", 0.1, np.ones(1), alpha_d=alpha)
        want = math.sqrt(math.log(1 / level) / (2 * n))
        assert float(curve.epsilon) == pytest.approx(want, rel=1e-12)


def test_linf_attack_on_l2_family_is_l2_attack_at_r_sqrt_d():
    family, d = noise.L2Family(0.5, 30.0), 100
    stats = dual.ratio_statistics(KEY, family, d, "linf", 1000)
    a = np.asarray(dual.log_ratio(family, stats, d, "linf", 0.03))
    b = np.asarray(dual.log_ratio(family, stats, d, "l2", 0.3))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_zero_radius_gives_w_equal_one():
    # delta = 0: W = 1 for every sample, so D_hat(lam) = (lam - 1)_+ exactly.
    lambdas = np.geomspace(1e-3, 1e3, 101)
    for family, attack in [(noise.L2Family(0.5, 3.0), "l2"), (noise.MixedLinf(0.5, 2.0), "linf")]:
        curve = dual.dual_curve(KEY, family, 7, attack, 0.0, lambdas, 1000, batch_size=300)
        want = np.maximum(lambdas - 1, 0)
        np.testing.assert_allclose(np.asarray(curve.d_hat), want, rtol=1e-12, atol=1e-15)


def test_extreme_lambdas_and_radii_stay_finite():
    lambdas = np.geomspace(1e-250, 1e250, 11)
    family = noise.L2Family(0.05, 5.0)
    curve = dual.dual_curve(KEY, family, 10, "l2", np.array([0.0, 1e-6, 3.0, 1e3]), lambdas, 2000)
    d_hat, d_upper = np.asarray(curve.d_hat), np.asarray(curve.d_upper)
    assert np.all(np.isfinite(d_hat)) and np.all(np.isfinite(d_upper))
    assert np.all(d_hat >= 0) and np.all(d_upper <= lambdas) and np.all(d_upper >= d_hat)
    v = np.asarray(dual.lower_bound(np.array([0.0, 0.5, 1.0]), curve))
    assert np.all(np.isfinite(v)) and np.all(v >= 0)
    # At r = 1e3 (200 sigma) the distributions barely overlap: nothing is certified.
    assert np.all(v[3] < 1e-3)


# ----------------------------------------------------------------- statistics and log W


def direct_log_ratio(family, z, delta):
    """log pi0(z - delta) - log pi0(z) from the family's own log density (float64)."""
    with jax.enable_x64(True):
        z = jnp.asarray(z, jnp.float64)
        return np.asarray(family.log_density(z - delta) - family.log_density(z))


def stats_from_samples(z, kind):
    z = np.asarray(z, dtype=np.float64)
    if kind == "l2":
        return dual.L2RatioStats(rho=np.linalg.norm(z, axis=1), z1=z[:, 0])
    return dual.MixedLinfRatioStats(
        linf=np.max(np.abs(z), axis=1), zmax=z.max(axis=1), zmin=z.min(axis=1), zsum=z.sum(axis=1)
    )


LOG_RATIO_CASES = [
    (noise.MixedLinf(0.5, 3.0), 5, "linf"),
    (noise.MixedLinf(0.5, 1000.0), 3072, "linf"),
    (noise.MixedLinf(0.25, 0.0), 3072, "linf"),
    (noise.Gaussian(0.3), 5, "l2"),
    (noise.Gaussian(0.3), 5, "linf"),
    (noise.L2Family(0.7, 10.0), 20, "l2"),
    (noise.L2Family(0.7, 10.0), 20, "linf"),
    (noise.L2Family(0.25, 500.0), 3072, "l2"),
]


@pytest.mark.parametrize("family,d,attack", LOG_RATIO_CASES, ids=lambda x: repr(x))
def test_log_ratio_equals_log_density_difference(family, d, attack):
    with jax.enable_x64(True):
        z = np.asarray(family.sample(jax.random.key(5), 64, (d,), jnp.float64))
    kind = "mixed" if isinstance(family, noise.MixedLinf) else "l2"
    stats = stats_from_samples(z, kind)
    # Float64 cancellation in the direct route is relative to the log densities' size.
    with jax.enable_x64(True):
        magnitude = 1 + float(np.max(np.abs(np.asarray(family.log_density(jnp.asarray(z))))))
    sigma = float(family.sigma)
    radii = np.array([0.0, 0.1, 1.0, 3.0]) * sigma / (math.sqrt(d) if attack == "linf" else 1)
    with jax.enable_x64(True):  # float64 radii through vmap
        vmapped = jax.vmap(lambda r: dual.log_ratio(family, stats, d, attack, r))
        got = np.asarray(vmapped(jnp.asarray(radii, jnp.float64)))
    assert got.shape == (len(radii), 64)
    for i, r in enumerate(radii):
        if kind == "mixed":
            delta = np.full(d, r)  # Theorem 5
        else:
            scale = math.sqrt(d) if attack == "linf" else 1.0  # Theorem 3
            delta = np.zeros(d)
            delta[0] = r * scale  # Theorem 2
        want = direct_log_ratio(family, z, delta)
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-10 * magnitude)
        if r > 0:  # the check sees a 1% error in the radius
            assert not np.allclose(got[i], direct_log_ratio(family, z, 1.01 * delta), rtol=1e-6)
        # The scalar route agrees with the vmapped one.
        scalar = np.asarray(dual.log_ratio(family, stats, d, attack, r))
        np.testing.assert_allclose(scalar, got[i], rtol=1e-14, atol=1e-14 * magnitude)


def test_l2_statistics_follow_the_law_of_full_samples():
    family, d, n, n_full = noise.L2Family(0.7, 10.0), 20, 200_000, 50_000
    stats = dual.ratio_statistics(KEY, family, d, "l2", n)
    rho, z1 = np.asarray(stats.rho), np.asarray(stats.z1)
    assert rho.shape == z1.shape == (n,) and rho.dtype == np.float64
    with jax.enable_x64(True):
        z = np.asarray(family.sample(jax.random.key(9), n_full, (d,), jnp.float64))
    full = stats_from_samples(z, "l2")
    crit2 = ks2_critical(n, n_full)
    assert ks2_stat(rho, full.rho) < crit2
    assert ks2_stat(z1, full.z1) < crit2
    # The joint law, through the quantity that matters: log W at a radius.
    lw = np.asarray(dual.log_ratio(family, stats, d, "l2", 0.5))
    lw_full = np.asarray(dual.log_ratio(family, full, d, "l2", 0.5))
    assert ks2_stat(lw, lw_full) < crit2
    # u1 = z1 / rho: (u1 + 1) / 2 ~ Beta((d-1)/2, (d-1)/2); the check sees a 2.5% scale error.
    u1 = z1 / rho
    beta = scipy.stats.beta((d - 1) / 2, (d - 1) / 2)
    assert ks_stat((u1 + 1) / 2, beta.cdf) < ks_critical(n)
    assert ks_stat((1.025 * u1 + 1) / 2, beta.cdf) > ks_critical(n)


def test_mixed_statistics_are_the_batched_samples_exactly():
    family, d, n, batch = noise.MixedLinf(0.5, 2.0), 7, 1000, 300
    stats = dual.ratio_statistics(KEY, family, d, "linf", n, batch_size=batch)
    assert all(np.asarray(x).shape == (n,) for x in stats)
    # Documented scheme: batch i is family.sample(split(key, 4)[i], 300, (d,), float64),
    # and the last 200 rows of the 4th batch are dropped.
    with jax.enable_x64(True):
        keys = jax.random.split(KEY, 4)
        z = np.concatenate([np.asarray(family.sample(k, batch, (d,), jnp.float64)) for k in keys])
    z = z[:n]
    want = stats_from_samples(z, "mixed")
    for got, ref in zip(stats, want):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12, atol=1e-12)
    # batch_size > n: a single batch of n rows.
    small = dual.ratio_statistics(KEY, family, d, "linf", 5, batch_size=1024)
    with jax.enable_x64(True):
        z5 = np.asarray(family.sample(jax.random.split(KEY, 1)[0], 5, (d,), jnp.float64))
    np.testing.assert_allclose(np.asarray(small.zsum), z5.sum(1), rtol=1e-12)


def test_mixed_statistics_memory_is_bounded_by_the_batch():
    family, d, n, batch = noise.MixedLinf(0.5, 2.0), 512, 50_000, 128
    with jax.enable_x64(True):
        compiled = (
            jax.jit(lambda k: dual.ratio_statistics(k, family, d, "linf", n, batch_size=batch))
            .lower(KEY)
            .compile()
        )
    temp = compiled.memory_analysis().temp_size_in_bytes
    # Everything d-dimensional is per batch; n * d float64 would be 200 MB.
    assert temp < 8 * (8 * batch * d + 8 * n)
    assert temp < n * d * 8 / 20


# ----------------------------------------------------------------- MixedLinf in d = 2


def mixed_linf_rejection_sample(rng, n, sigma, k, d):
    """Independent exact sampler for ||z||_inf^-k exp(-||z||^2 / 2 sigma^2).

    Write z = a u with a = ||z||_inf and u on the surface of the cube [-1, 1]^d
    (surface measure ~ a^(d-1)): (a, u) has density a^(d-1-k) exp(-a^2 ||u||^2 / 2 sigma^2).
    Propose a from a^(d-1-k) exp(-a^2 / 2 sigma^2) (a = sigma sqrt(2 G), G ~ Gamma((d-k)/2))
    and u uniform on the surface; accept with exp(-a^2 (||u||^2 - 1) / 2 sigma^2) <= 1.
    """
    out = []
    while sum(len(x) for x in out) < n:
        m = 2 * n
        a = sigma * np.sqrt(2 * rng.gamma((d - k) / 2, size=m))
        u = rng.uniform(-1, 1, size=(m, d))
        j = rng.integers(0, d, size=m)
        u[np.arange(m), j] = rng.choice([-1.0, 1.0], size=m)
        accept = rng.uniform(size=m) < np.exp(-a * a * (np.sum(u * u, 1) - 1) / (2 * sigma**2))
        out.append((a[:, None] * u)[accept])
    return np.concatenate(out)[:n]


def numpy_mixed_log_density(z, sigma, k):
    return -k * np.log(np.max(np.abs(z), axis=-1)) - np.sum(z * z, axis=-1) / (2 * sigma**2)


def test_mixed_dhat_matches_rejection_sampling_in_d2(rng):
    sigma, k, d, n = 1.0, 1.0, 2, 40_000
    family = noise.MixedLinf(sigma, k)
    radii = np.array([0.2, 0.6])
    lambdas = np.geomspace(0.05, 20, 60)
    curve = dual.dual_curve(KEY, family, d, "linf", radii, lambdas, n, batch_size=4096)
    z = mixed_linf_rejection_sample(rng, n, sigma, k, d)
    tol = lambdas * ks2_critical(n, n)  # |D_hat_1 - D_hat_2| <= lam sup |F_hat_1 - F_hat_2|

    def numpy_d(r):
        w = np.exp(numpy_mixed_log_density(z - r, sigma, k) - numpy_mixed_log_density(z, sigma, k))
        return np.mean(np.maximum(lambdas[:, None] - w[None, :], 0), axis=1)

    for i, r in enumerate(radii):
        assert np.all(np.abs(np.asarray(curve.d_hat[i]) - numpy_d(r)) <= tol)
        assert np.any(np.abs(np.asarray(curve.d_hat[i]) - numpy_d(1.15 * r)) > tol)


# ----------------------------------------------------------------- monotonicity


def test_lower_bound_increases_in_p_and_decreases_in_r():
    family, d, n = noise.MixedLinf(0.5, 200.0), 3072, 20_000
    radii = np.array([0.0, 0.001, 0.002, 0.003, 0.004])
    lambdas = np.geomspace(1e-2, 1e2, 1001)
    curve = dual.dual_curve(KEY, family, d, "linf", radii, lambdas, n, batch_size=2048)
    ps = np.linspace(0.5, 0.999, 50)
    v = np.asarray(dual.lower_bound(ps, curve))
    assert v.shape == (len(radii), len(ps))
    assert np.all(np.diff(v, axis=1) >= 0)
    assert np.all(np.diff(v[:, 10:], axis=0) < 0)  # strictly, where something is certified
    assert np.all(np.diff(v, axis=0) <= 0)
    # r = 0: V(p) = p - eps up to the grid (D(lam) = (lam - 1)_+).
    eps = float(curve.epsilon)
    assert np.all(v[0] <= ps) and np.all(v[0] >= ps - eps - 1e-6)  # 1e-7 lam float slack


def test_lower_bound_shapes():
    curve = dual.dual_curve(KEY, noise.Gaussian(1.0), 8, "l2", 0.3, np.geomspace(0.1, 10, 31), 1000)
    assert curve.d_upper.shape == (31,)
    assert dual.lower_bound(0.7, curve).shape == ()
    assert dual.lower_bound(np.full((2, 3), 0.7), curve).shape == (2, 3)
    curves = dual.dual_curve(KEY, noise.Gaussian(1.0), 8, "l2", np.array([0.1, 0.2, 0.3, 0.4]),
                             np.geomspace(0.1, 10, 31), 1000)
    v = np.asarray(dual.lower_bound(np.full((2, 3), 0.7), curves))
    assert v.shape == (4, 2, 3)
    np.testing.assert_allclose(v[2], float(dual.lower_bound(0.7, curve)), rtol=1e-12)
    # The lambda grid may come in any order.
    lambdas = np.geomspace(0.1, 10, 31)
    perm = np.random.default_rng(0).permutation(31)
    shuffled = dual.dual_curve(KEY, noise.Gaussian(1.0), 8, "l2", 0.3, lambdas[perm], 1000)
    want = np.asarray(curve.d_hat)[perm]
    np.testing.assert_allclose(np.asarray(shuffled.d_hat), want, rtol=1e-12)


# ----------------------------------------------------------------- compilation


def test_new_lambdas_radii_sigma_or_alpha_do_not_recompile():
    d, n = 12, 2000
    stats = dual.ratio_statistics(KEY, noise.MixedLinf(0.5, 3.0), d, "linf", n)

    def run(sigma, radii, lambdas, alpha):
        curve = dual.dual_curve_from_stats(
            noise.MixedLinf(sigma, 3.0), stats, d, "linf", radii, lambdas, alpha_d=alpha
        )
        return dual.lower_bound(np.array([0.6, 0.8]), curve)

    run(0.5, np.array([0.01, 0.02]), np.geomspace(0.1, 10, 17), 1e-3)
    curve_cache = dual._curve_core._cache_size()
    lower_cache = dual._lower_core._cache_size()
    run(0.7, np.array([0.03, 0.05]), np.geomspace(0.2, 5, 17), 1e-2)
    run(0.5, jnp.array([0.0, 0.1]), jnp.linspace(0.5, 2.0, 17), 0.2)
    assert dual._curve_core._cache_size() == curve_cache
    assert dual._lower_core._cache_size() == lower_cache
    # The guard itself sees a new shape.
    run(0.5, np.array([0.01, 0.02, 0.03]), np.geomspace(0.1, 10, 17), 1e-3)
    assert dual._curve_core._cache_size() == curve_cache + 1


# ----------------------------------------------------------------- errors

GOOD = dict(family=noise.MixedLinf(0.5, 2.0), d=8, attack="linf", r=0.1,
            lambdas=np.array([0.5, 1.0]), n_samples=10)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(lambdas=np.array([])), "lambdas must be a non-empty array of finite values > 0"),
        (dict(lambdas=np.array([1.0, 0.0])), "lambdas must be a non-empty array"),
        (dict(lambdas=np.array([-1.0])), "lambdas must be a non-empty array"),
        (dict(lambdas=np.array([1.0, np.inf])), "lambdas must be a non-empty array"),
        (dict(lambdas=np.array([np.nan])), "lambdas must be a non-empty array"),
        (dict(lambdas=np.ones((2, 2))), "lambdas must be a non-empty array"),
        (dict(r=-0.1), r"r must be finite and >= 0"),
        (dict(r=np.nan), r"r must be finite and >= 0"),
        (dict(r=np.array([0.1, np.inf])), r"r must be finite and >= 0"),
        (dict(r=np.ones((2, 2))), r"r must be a scalar or a 1-D array"),
        (dict(n_samples=0), "n_samples must be >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(alpha_d=0.0), r"alpha_d must be in \(0, 1\), got 0.0"),
        (dict(alpha_d=1.0), r"alpha_d must be in \(0, 1\)"),
        (dict(alpha_d=1.5), r"alpha_d must be in \(0, 1\), got 1.5"),
        (dict(attack="l1"), "attack must be 'l2' or 'linf', got 'l1'"),
        (dict(family=noise.MixedLinf(0.5, 8.0)), "k must be < d"),
        (dict(family=noise.L2Family(0.5, 9.0), attack="l2"), "k must be < d"),
        (dict(family=noise.PureLinf(0.5, 2.0)), "pure l_inf family; certify with MixedLinf"),
        (dict(family=noise.PureLinf(0.5, 2.0), attack="l2"), "pure l_inf family"),
        (dict(attack="l2"), "no worst-case perturbation is proven for an l2 attack on the Mixed"),
    ],
)
def test_bad_input_raises(change, match):
    args = {**GOOD, **change}
    extra = {k: args.pop(k) for k in ("alpha_d", "batch_size") if k in args}
    with pytest.raises(ValueError, match=match):
        dual.dual_curve(KEY, args["family"], args["d"], args["attack"], args["r"], args["lambdas"],
                        args["n_samples"], **extra)


def test_bad_input_raises_in_the_other_entry_points():
    family, d = noise.Gaussian(1.0), 8
    stats = dual.ratio_statistics(KEY, family, d, "l2", 10)
    curve = dual.dual_curve_from_stats(family, stats, d, "l2", 0.1, np.array([1.0]))
    for p in (-0.1, 1.5, np.nan, np.array([0.5, 2.0])):
        with pytest.raises(ValueError, match="p must be in"):
            dual.lower_bound(p, curve)
    with pytest.raises(ValueError, match="r must be a scalar"):
        dual.log_ratio(family, stats, d, "l2", np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="r must be finite and >= 0"):
        dual.log_ratio(family, stats, d, "l2", -1.0)
    with pytest.raises(ValueError, match="pure l_inf"):
        dual.ratio_statistics(KEY, noise.PureLinf(1.0, 1.0), d, "linf", 10)
    with pytest.raises(ValueError, match="lambdas must be"):
        dual.dual_curve_from_stats(family, stats, d, "l2", 0.1, np.array([1.0, -2.0]))
    with pytest.raises(ValueError, match="alpha_d must be in"):
        dual.dual_curve_from_stats(family, stats, d, "l2", 0.1, np.array([1.0]), alpha_d=-1)
    with pytest.raises(TypeError, match="MixedLinfRatioStats"):
        dual.log_ratio(noise.MixedLinf(1.0, 1.0), stats, d, "linf", 0.1)
    with pytest.raises(TypeError, match="n_samples must be an int"):
        dual.ratio_statistics(KEY, family, d, "l2", 10.5)


def test_rounding_slack_validity_range_is_enforced():
    """_ROUNDING_SLACK = 1e-7 is justified for d <= 1e6 only: Monte Carlo curves beyond refuse,
    before drawing any d-dimensional sample, with a message naming d and the range."""
    big = dual._ROUNDING_SLACK_MAX_D + 1
    assert dual._ROUNDING_SLACK_MAX_D == 10**6
    match = rf"1 <= d <= 1000000, got d = {big}"
    lams = np.array([0.5, 1.0, 2.0])
    # MixedLinf at d > 1e6 would draw 1e6-dimensional vectors: it must fail fast.
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        dual.dual_curve(KEY, noise.MixedLinf(0.5, 10.0), big, "linf", 0.01, lams, 1000)
    assert time.perf_counter() - start < 5.0
    with pytest.raises(ValueError, match=match):
        dual.dual_curve(KEY, noise.Gaussian(0.5), big, "l2", 0.1, lams, 100)
    # Statistics from elsewhere (built by hand here: no sampler to compile) are refused too.
    rng = np.random.default_rng(0)
    rho = 0.5 * np.sqrt(np.full(100, float(big)))
    stats = dual.L2RatioStats(rho=rho, z1=0.5 * rng.standard_normal(100))
    with pytest.raises(ValueError, match=match):
        dual.dual_curve_from_stats(noise.Gaussian(0.5), stats, big, "l2", 0.1, lams)
    # At the edge of the range it still works.
    edge = dual._ROUNDING_SLACK_MAX_D
    curve = dual.dual_curve_from_stats(noise.Gaussian(0.5), stats, edge, "l2", 0.1, lams)
    assert np.all(np.isfinite(np.asarray(curve.d_upper)))


# ----------------------------------------------------------------- variance-adaptive p_min


def _gaussian_p_min_bound(radii, n, alpha_d, seed=0):
    fam = noise.Gaussian(1.0)
    k_main, k_pilot = jax.random.split(jax.random.fold_in(KEY, seed))
    stats = dual.ratio_statistics(k_main, fam, 16, "l2", n)
    pilot = dual.ratio_statistics(k_pilot, fam, 16, "l2", n // 20)
    return dual.p_min_bound(fam, stats, pilot, 16, "l2", radii, alpha_d=alpha_d)


def test_p_min_bound_is_sound_and_close_for_the_gaussian():
    """Gaussian, sigma = 1: p_min(r) = Phi(r) exactly (Corollary 1). The bound is above it
    (on its event: fixed key) and below it plus twice its own deviation (the deviation
    exceeds 5 standard errors of Y's mean at this level) and 1e-3 for lambdas chosen on a
    pilot of n/20 (the optimum is flat: 10% off in lambda costs < 1e-3)."""
    radii = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 3.0])
    n, alpha_d = 400_000, 1e-3
    b = _gaussian_p_min_bound(radii, n, alpha_d)
    with jax.enable_x64(True):
        p_min, dev = np.asarray(b.p_min), np.asarray(b.deviation)
        d_upper, lams = np.asarray(b.d_upper), np.asarray(b.lambdas)
    truth = Phi(radii)
    assert np.all(p_min >= truth)
    best = np.argmin((0.5 + d_upper) / lams, axis=1)
    dev_best = dev[np.arange(radii.size), best]
    assert np.all(p_min <= truth + 2 * dev_best + 1e-3)
    # D itself at every chosen lambda: above the closed form.
    for i, r in enumerate(radii):
        exact = gaussian_d_closed_form(lams[i], r)
        assert np.all(d_upper[i] >= exact)


def test_p_min_bound_is_tighter_than_dkw_near_one():
    """At pA near 1 (large radii), the empirical Bernstein p_min is far below the DKW one
    from the same samples: at r = 3 (Phi(3) = 0.99865, n = 2e5) its excess over the truth is
    under a third of DKW's (whose p_min there exceeds 1: DKW certifies nothing)."""
    radii = np.array([1.0, 2.0, 3.0])
    n, alpha_d = 200_000, 1e-3
    fam = noise.Gaussian(1.0)
    k_main, k_pilot = jax.random.split(KEY)
    stats = dual.ratio_statistics(k_main, fam, 16, "l2", n)
    pilot = dual.ratio_statistics(k_pilot, fam, 16, "l2", n // 20)
    lams = np.geomspace(0.5, 1e6, 4001)
    with jax.enable_x64(True):
        bern = np.asarray(dual.p_min_bound(fam, stats, pilot, 16, "l2", radii, alpha_d=alpha_d).p_min)
        curve = dual.dual_curve_from_stats(fam, stats, 16, "l2", radii, lams, alpha_d=alpha_d)
        dkw = np.min((0.5 + np.asarray(curve.d_upper)) / lams, axis=1)
    assert np.all(bern <= dkw)
    assert bern[-1] < 1.0
    assert bern[-1] - Phi(3.0) < (dkw[-1] - Phi(3.0)) / 3


def test_p_min_bound_false_rate_within_alpha():
    """Soundness as a rate: with alpha_d = 0.2 per radius and 40 independent seeds of a
    small sample (n = 2000, r = 1, the truth Phi(1) in closed form), the bound falls below
    the truth in at most 16 of 40 runs (binomial(40, 0.2) exceeds 16 with probability 4e-4)."""
    fails = 0
    for seed in range(40):
        b = _gaussian_p_min_bound(np.array([1.0]), 2000, 0.2, seed=seed)
        with jax.enable_x64(True):
            fails += int(np.asarray(b.p_min)[0] < Phi(1.0))
    assert fails <= 16


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_lambdas": 0}, "n_lambdas"),
        ({"width": -0.1}, "width"),
        ({"alpha_d": 1.5}, "alpha_d"),
        ({"r": -1.0}, "r must be"),
    ],
)
def test_p_min_bound_bad_input(change, match):
    fam = noise.Gaussian(1.0)
    stats = dual.ratio_statistics(KEY, fam, 4, "l2", 10)
    kwargs = {"alpha_d": 1e-3, "n_lambdas": 3, "width": 0.1, **change}
    r = kwargs.pop("r", 0.5)
    with pytest.raises(ValueError, match=match):
        dual.p_min_bound(fam, stats, stats, 4, "l2", r, **kwargs)
    with pytest.raises(ValueError, match="at least 2 samples"):
        one = dual.ratio_statistics(KEY, fam, 4, "l2", 1)
        dual.p_min_bound(fam, one, stats, 4, "l2", 0.5)
