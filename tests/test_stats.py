"""soapbubble.bounds.stats against scipy (an independent implementation of the same laws)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from soapbubble.bounds import stats

ALPHAS = np.array([1e-15, 1e-10, 1e-6, 1e-3, 0.01, 0.05, 0.3, 0.5, 0.9])
NS = [1, 2, 3, 5, 10, 100, 1000, 10**4, 10**5, 10**6]


def _grid(ns=NS, alphas=ALPHAS, per_n=15):
    """(count, n, alpha) including count = 0, 1, n - 1, n, n = 1 and n = 1e6."""
    rows = []
    for n in ns:
        cs = np.r_[0, 1, 2, 3, np.round(np.linspace(0, n, per_n)).astype(int), n - 2, n - 1, n]
        for c in np.unique(cs[(cs >= 0) & (cs <= n)]):
            rows += [(c, n, a) for a in alphas]
    c, n, a = np.array(rows).T
    return c, n, a


def _random_grid(seed, size):
    """Random (count, n, alpha): n log-uniform in [1, 1e6], counts spread and piled at the ends."""
    rng = np.random.default_rng(seed)
    n = np.floor(np.exp(rng.uniform(0, np.log(1e6), size))).astype(np.int64) + 1
    c = np.floor(rng.uniform(0, 1, size) * (n + 1)).astype(np.int64)
    ends = rng.uniform(size=size)
    c = np.where(ends < 0.15, np.minimum(n, rng.integers(0, 4, size)), c)
    c = np.where(ends > 0.85, np.maximum(0, n - rng.integers(0, 4, size)), c)
    a = np.exp(rng.uniform(np.log(1e-15), np.log(0.9), size))
    return c.astype(np.float64), n.astype(np.float64), a


def _ref_lower(c, n, a):
    return np.where(c == 0, 0.0, scipy.stats.beta.ppf(a, np.maximum(c, 1), n - c + 1))


def _ref_upper(c, n, a):
    # isf, not ppf(1 - a): 1 - 1e-15 is not exact in float64.
    return np.where(c == n, 1.0, scipy.stats.beta.isf(a, c + 1, np.maximum(n - c, 1)))


def _run(fn, dtype, *args):
    return np.asarray(jax.jit(fn)(*(jnp.asarray(x, dtype) for x in args)), np.float64)


# --------------------------------------------------------------------------- Clopper-Pearson


def test_cp_float64_agrees_with_scipy_and_is_sound():
    c, n, a = _grid()
    ref_lo, ref_up = _ref_lower(c, n, a), _ref_upper(c, n, a)
    with jax.enable_x64(True):
        lo = stats.clopper_pearson_lower(c, n, a)
        up = stats.clopper_pearson_upper(c, n, a)
        assert lo.dtype == jnp.float64 and up.dtype == jnp.float64
        lo, up = np.asarray(lo), np.asarray(up)
    assert np.abs(lo - ref_lo).max() <= 1e-10
    assert np.abs(up - ref_up).max() <= 1e-10
    assert (lo <= ref_lo).all() and (up >= ref_up).all()


def test_cp_exact_edge_cases_float64():
    n = np.array([1.0, 2.0, 7.0, 1e3, 1e6])
    with jax.enable_x64(True):
        zero = np.asarray(stats.clopper_pearson_lower(0.0, n, 1e-3))
        full = np.asarray(stats.clopper_pearson_lower(n, n, 1e-3))
        up_zero = np.asarray(stats.clopper_pearson_upper(0.0, n, 1e-3))
        up_full = np.asarray(stats.clopper_pearson_upper(n, n, 1e-3))
    assert (zero == 0.0).all() and (up_full == 1.0).all()
    exact = 1e-3 ** (1.0 / n)
    assert (full <= exact).all() and np.abs(full - exact).max() <= 1e-12
    assert (up_zero >= 1 - exact).all() and np.abs(up_zero - (1 - exact)).max() <= 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_cp_float32_never_above_scipy(seed):
    c, n, a = _grid()
    rc, rn, ra = _random_grid(seed, 20000)
    c, n, a = np.r_[c, rc], np.r_[n, rn], np.r_[a, ra]
    lo = _run(stats.clopper_pearson_lower, jnp.float32, c, n, a)
    up = _run(stats.clopper_pearson_upper, jnp.float32, c, n, a)
    assert jax.jit(stats.clopper_pearson_lower)(1.0, 2.0, 0.1).dtype == jnp.float32
    ref_lo, ref_up = _ref_lower(c, n, a), _ref_upper(c, n, a)
    assert np.isfinite(lo).all() and np.isfinite(up).all()
    worst = np.argmax(lo - ref_lo)
    assert (lo <= ref_lo).all(), (c[worst], n[worst], a[worst], lo[worst], ref_lo[worst])
    assert (up >= ref_up).all()
    # Not vacuous: at most the documented margin looser. With betainc's log error <= E the
    # returned p has true CDF >= alpha * exp(-2E) (less one float32 ulp of p).
    e = np.asarray(stats.betainc_log_error_bound(n, "float32"), np.float64)
    direct = (a <= 0.1) & (c > 0)
    floor = scipy.stats.beta.ppf(a * np.exp(-2.5 * e), np.maximum(c, 1), n - c + 1)
    floor = floor - 2 * np.spacing(floor.astype(np.float32)).astype(np.float64)
    assert (lo[direct] >= floor[direct]).all()


def test_cp_monotone():
    # one jitted call per precision: counts 0..1000 of n = 1000, a range of alphas at
    # count 600, and neighbouring counts at n = 1e6
    counts = np.r_[np.arange(0.0, 1001.0), np.full(6, 600.0), np.arange(499990.0, 500010.0)]
    ns = np.r_[np.full(1007, 1000.0), np.full(20, 1e6)]
    alphas = np.r_[np.full(1001, 1e-3), [0.5, 0.1, 1e-2, 1e-4, 1e-8, 1e-14], np.full(20, 1e-3)]
    for x64, dt in ((True, jnp.float64), (False, jnp.float32)):
        with jax.enable_x64(x64):
            out = _run(stats.clopper_pearson_lower, dt, counts, ns, alphas)
        lo, by_alpha, big = out[:1001], out[1001:1007], out[1007:]
        assert (np.diff(lo) > 0).all()
        assert (np.diff(by_alpha) < 0).all()
        if x64:  # float32 steps of 1e-6 in p are below its resolution near 0.5 + margin noise
            assert (np.diff(big) > 0).all()


def test_cp_jit_vmap_and_traced_inputs():
    counts = jnp.array([0.0, 3.0, 50.0, 99.0, 100.0])
    direct = stats.clopper_pearson_lower(counts, 100.0, 1e-3)
    vm = jax.jit(jax.vmap(stats.clopper_pearson_lower, in_axes=(0, None, None)))
    vm = vm(counts, 100.0, 1e-3)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(vm))
    # alpha and n traced: one compiled function serves all values
    f = jax.jit(stats.clopper_pearson_lower)
    ref = _ref_lower(np.array([30.0]), np.array([100.0]), np.array([0.05]))[0]
    got = float(f(30.0, 100.0, 0.05))
    assert got <= ref and abs(got - ref) < 1e-3
    # broadcasting
    assert stats.clopper_pearson_lower(jnp.ones((3, 1)), jnp.full((1, 4), 5.0), 0.1).shape == (3, 4)


def test_traced_n_above_max_gives_trivial_bounds():
    big = float(stats.MAX_N + 1)
    assert float(jax.jit(stats.clopper_pearson_lower)(10.0, big, 0.01)) == 0.0
    assert float(jax.jit(stats.clopper_pearson_upper)(10.0, big, 0.01)) == 1.0
    assert float(jax.jit(stats.binomial_test_pvalue)(10.0, big)) == 1.0


# --------------------------------------------------------------------------- binomial test


def _binom_grid():
    rows = []
    for n in [1, 2, 3, 4, 10, 11, 100, 1000, 10**4, 10**5, 10**6]:
        ks = np.r_[0, 1, n, n - 1, n // 2, (n + 1) // 2,
                   np.round(n / 2 + math.sqrt(n) * np.linspace(-8, 8, 33))]
        rows += [(k, n) for k in np.unique(ks[(ks >= 0) & (ks <= n)])]
    k, n = np.array(rows, dtype=np.float64).T
    ref = np.array([scipy.stats.binomtest(int(kk), int(nn), 0.5).pvalue for kk, nn in rows])
    return k, n, ref


def test_binomial_pvalue_agrees_with_scipy():
    k, n, ref = _binom_grid()
    with jax.enable_x64(True):
        pv = stats.binomial_test_pvalue(k, n)
        assert pv.dtype == jnp.float64
        pv = np.asarray(pv)
        e = np.asarray(stats.betainc_log_error_bound(n))
    # Never below scipy (abstention is the safe side), above it by at most the documented margin.
    assert (pv >= ref * (1 - 1e-12)).all()
    assert (pv <= np.minimum(1.0, ref * np.exp(2 * e)) + 1e-12).all()
    small = n <= 1000
    assert np.abs(pv - ref)[small].max() <= 1e-10
    # float32: never below the exact p-value either
    pv32 = _run(stats.binomial_test_pvalue, jnp.float32, k, n)
    assert (pv32 >= ref * (1 - 1e-12)).all()
    # ... and above it by at most the float32 margin (large at n = 1e6: exp(E) ~ 2e4)
    e32 = np.asarray(stats.betainc_log_error_bound(n, "float32"), np.float64)
    assert (pv32 <= np.maximum(np.minimum(1.0, ref * np.exp(2 * e32)) * (1 + 1e-6), 2.0**-90)).all()
    assert np.abs(pv32 - ref)[n <= 100].max() < 1e-3


def test_binomial_pvalue_jit_vmap():
    ks = jnp.arange(0.0, 21.0)
    vm = jax.jit(jax.vmap(stats.binomial_test_pvalue, in_axes=(0, None)))(ks, 20.0)
    ref = [scipy.stats.binomtest(int(k), 20, 0.5).pvalue for k in range(21)]
    np.testing.assert_allclose(np.asarray(vm), ref, rtol=1e-4)


# --------------------------------------------------------------------------- DKW


def test_dkw_epsilon():
    n = np.array([1, 10, 1000, 10**6, 10**9], dtype=np.float64)
    a = np.array([0.5, 1e-3, 1e-3, 1e-6, 1e-12])
    ref = np.sqrt(np.log(1 / a) / (2 * n))
    with jax.enable_x64(True):
        got = np.asarray(stats.dkw_epsilon(n, a))
    np.testing.assert_allclose(got, ref, rtol=1e-14)
    assert (got >= ref).all()
    got32 = np.asarray(stats.dkw_epsilon(n, a), np.float64)
    assert (got32 >= ref).all() and np.allclose(got32, ref, rtol=1e-5)


# --------------------------------------------------------------------------- radii


def test_gaussian_radius_values_and_grad():
    p = np.array([0.5, 0.6, 0.9, 0.99, 0.999999, 0.3])
    sigma = 0.25
    with jax.enable_x64(True):
        r = np.asarray(stats.gaussian_radius(p, sigma))
        g = np.asarray(jax.vmap(jax.grad(stats.gaussian_radius), in_axes=(0, None))(p, sigma))
        h = 1e-6
        fd = (np.asarray(stats.gaussian_radius(p + h, sigma)) -
              np.asarray(stats.gaussian_radius(p - h, sigma))) / (2 * h)
        g_sigma = float(jax.grad(stats.gaussian_radius, argnums=1)(0.9, sigma))
        inf = float(stats.gaussian_radius(1.0, sigma))
        g_inf = float(jax.grad(stats.gaussian_radius)(1.0, sigma))
    ref = sigma * scipy.stats.norm.ppf(p)
    np.testing.assert_allclose(r, ref, rtol=1e-12, atol=1e-15)
    assert r[-1] < 0  # below 1/2: negative, callers abstain
    closed = sigma / scipy.stats.norm.pdf(scipy.stats.norm.ppf(p))
    np.testing.assert_allclose(g, closed, rtol=1e-12)
    # central difference error ~ h^2 * f''' ; near p = 1 - 1e-6 the step is too large, skip it
    np.testing.assert_allclose(g[:-2], fd[:-2], rtol=1e-6)
    assert g_sigma == pytest.approx(scipy.stats.norm.ppf(0.9), rel=1e-12)
    assert inf == math.inf and g_inf == math.inf
    # float32 path
    r32 = stats.gaussian_radius(jnp.float32(0.9), 0.5)
    assert r32.dtype == jnp.float32 and abs(float(r32) - 0.5 * scipy.stats.norm.ppf(0.9)) < 1e-6


def test_gaussian_radius_bilateral():
    pa = np.array([0.9, 0.6, 0.5, 0.99, 0.4, 1.0, 0.0, 1.0])
    pb = np.array([0.05, 0.3, 0.5, 0.001, 0.45, 0.2, 0.0, 1.0])
    sigma = 0.5
    with jax.enable_x64(True):
        r = np.asarray(stats.gaussian_radius_bilateral(pa, pb, sigma))
        # pB_upper = 1 - pA_lower reduces to Cohen's one-sided radius
        one = float(stats.gaussian_radius_bilateral(0.8, 0.2, sigma))
        g = float(jax.grad(stats.gaussian_radius_bilateral)(0.8, 0.1, sigma))
    with np.errstate(invalid="ignore"):
        ref = sigma / 2 * (scipy.stats.norm.ppf(pa) - scipy.stats.norm.ppf(pb))
    ref = np.where(pa == pb, 0.0, ref)
    np.testing.assert_allclose(r, ref, rtol=1e-12, atol=1e-15)
    assert not np.isnan(r).any() and r[4] < 0 and r[5] == math.inf
    assert one == pytest.approx(sigma * scipy.stats.norm.ppf(0.8), rel=1e-12)
    closed = sigma / 2 / scipy.stats.norm.pdf(scipy.stats.norm.ppf(0.8))
    assert g == pytest.approx(closed, rel=1e-10)


# --------------------------------------------------------------------------- errors


_CP_LO, _CP_UP = stats.clopper_pearson_lower, stats.clopper_pearson_upper
_PV, _DKW = stats.binomial_test_pvalue, stats.dkw_epsilon
_RAD, _BIL = stats.gaussian_radius, stats.gaussian_radius_bilateral
_NAN, _INF = float("nan"), float("inf")
_ALPHA, _SIGMA = r"alpha must be in \(0, 1\), got ", r"sigma must be finite and > 0, got "
_COUNT = r"count must be an integer in \[0, n\], got "


@pytest.mark.parametrize(
    "fn, args, pattern",
    [
        (_CP_LO, (1, 10, 0.0), _ALPHA + r"0\.0"),
        (_CP_LO, (1, 10, 1.5), _ALPHA + r"1\.5"),
        (_CP_LO, (1, 10, _NAN), _ALPHA + "nan"),
        (_CP_UP, (1, 10, [0.1, -0.2]), _ALPHA + r"-0\.2"),
        (_CP_LO, (0, 0, 0.1), r"n must be an integer in \[1, 1048576\].* got 0\.0"),
        (_CP_LO, (1, 10.5, 0.1), r"n must be .* got 10\.5"),
        (_CP_LO, (1, 2**20 + 1, 0.1), r"n must be .*1048576.* got 1048577"),
        (_CP_LO, (-1, 10, 0.1), _COUNT + r"-1\.0"),
        (_CP_LO, (2.5, 10, 0.1), _COUNT + r"2\.5"),
        (_CP_UP, ([3, 11], 10, 0.1), r"count must be .* count=11\.0 with n=10\.0"),
        (_PV, (11, 10), r"count must be .* count=11\.0 with n=10\.0"),
        (_PV, (1, 0), r"n must be .* got 0\.0"),
        (_DKW, (0, 0.1), r"n must be an integer >= 1, got 0\.0"),
        (_DKW, (10, 1.0), _ALPHA + r"1\.0"),
        (_RAD, (1.2, 1.0), r"p_lower must be in \[0, 1\], got 1\.2"),
        (_RAD, (0.7, 0.0), _SIGMA + r"0\.0"),
        (_RAD, (0.7, _INF), _SIGMA + "inf"),
        (_BIL, (0.7, -0.1, 1.0), r"p_upper_runner_up must be in \[0, 1\], got -0\.1"),
        (_BIL, (_NAN, 0.1, 1.0), r"p_lower must be in \[0, 1\], got nan"),
        (_BIL, (0.7, 0.1, -2.0), _SIGMA + r"-2\.0"),
    ],
)
def test_errors(fn, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(*args)
