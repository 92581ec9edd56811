"""Radius tables against closed forms, against each other's routes and against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from soapbubble import noise
from soapbubble.bounds import dual, exact_l2
from soapbubble.bounds.table import RadiusTable, radius_table

KEY = jax.random.key(42)
PS = np.array([0.5, 0.55, 0.7, 0.9, 0.99, 0.999])


def cohen_radius(p, sigma):
    return sigma * scipy.stats.norm.ppf(p)


@pytest.mark.parametrize("attack", ["l2", "linf"])
def test_gaussian_table_is_cohen_rounded_down(attack):
    sigma, d = 0.5, 3072
    scale = math.sqrt(d) if attack == "linf" else 1.0
    radii = np.linspace(0, 3.0 / scale, 3001)
    table = radius_table(None, noise.Gaussian(sigma), d, attack, radii=radii)
    assert table.metadata["route"] == "closed_form" and table.alpha_d == 0.0
    exact = cohen_radius(PS, sigma) / scale
    got = table.radius(PS)
    assert np.all(got <= exact)
    assert np.all(got >= exact - (radii[1] - radii[0]) * 1.000001)


def pmin_tolerance(n, m, alpha_d):
    """How far above the truth a Monte Carlo p_min may sit: its own DKW epsilon
    (alpha_d / m per radius), the test's two-sided DKW deviation (level 1e-3 over
    m radii) and 1e-4 for the lambda grid."""
    eps = math.sqrt(math.log(m / alpha_d) / (2 * n))
    eps_test = math.sqrt(math.log(2 * m / 1e-3) / (2 * n))
    return eps + eps_test + 1e-4


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_corollary1_monte_carlo_route_reproduces_cohen(sigma):
    """k = 0 at d = 3072 through the Monte Carlo dual route: p_min(r) = Phi(r / sigma)."""
    d, n, alpha = 3072, 200_000, 1e-3
    radii = np.linspace(0, 3 * sigma, 61)
    table = radius_table(KEY, noise.L2Family(sigma, 0.0), d, "l2", radii=radii, n_samples=n, alpha_d=alpha,
                         route="monte_carlo")
    truth = scipy.special.ndtr(radii / sigma)
    tol = pmin_tolerance(n, radii.size, alpha)
    finite = np.isfinite(table.p_min)
    assert np.all(table.p_min >= truth - 1e-12)  # sound (on the DKW event)
    assert np.all(table.p_min[finite] <= truth[finite] + tol)
    assert np.all(truth[~finite] + tol >= 1.0)
    # Radii: never above Cohen's, and at least Cohen's at p - tol (less one grid step).
    got = table.radius(PS)
    assert np.all(got <= cohen_radius(PS, sigma) + 1e-12)
    assert np.all(got >= np.maximum(cohen_radius(np.maximum(PS - tol, 0.5), sigma), 0) - (radii[1] - radii[0]) - 1e-12)


def test_exact_and_monte_carlo_routes_agree_for_the_l2_family():
    d, k = 3072, 500.0
    sigma = noise.matched_sigma(0.5, d, k)
    family = noise.L2Family(sigma, k)
    radii = np.linspace(0, 1.5, 31)
    exact = radius_table(None, family, d, "l2", radii=radii)
    n = 200_000
    mc = radius_table(KEY, family, d, "l2", radii=radii, n_samples=n, route="monte_carlo")
    assert exact.metadata["route"] == "exact" and mc.metadata["route"] == "monte_carlo"
    assert exact.metadata["max_quadrature_error"] < 1e-9
    finite = np.isfinite(mc.p_min)
    assert np.all(mc.p_min >= exact.p_min - 1e-9)
    assert np.all(mc.p_min[finite] <= exact.p_min[finite] + pmin_tolerance(n, radii.size, 1e-3))


def bisect_radius(p, sigma, k, d, hi):
    """Largest r with V_r(p) >= 1/2, by bisection on the exact Neyman-Pearson lower bound."""
    lo = 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if exact_l2.l2_lower_bound_exact(np.array([p]), mid, sigma, k, d).value[0] >= 0.5:
            lo = mid
        else:
            hi = mid
    return lo


def test_exact_route_near_one_is_tight():
    """At pA = 0.999 the l2-family radius is within 0.5% of the exact value."""
    d = 3072
    # Step 1e-3 around R ~ 1.5 (rounding down costs < 0.1%); radii elsewhere are not needed.
    radii = np.concatenate([[0.0], np.linspace(1.2, 1.8, 601)])
    k0 = radius_table(None, noise.L2Family(0.5, 0.0), d, "l2", radii=radii)
    exact0 = cohen_radius(0.999, 0.5)
    assert exact0 * 0.995 <= k0.radius(0.999) <= exact0
    k = 500.0
    sigma = noise.matched_sigma(0.5, d, k)
    table = radius_table(None, noise.L2Family(sigma, k), d, "l2", radii=radii)
    ref = bisect_radius(0.999, sigma, k, d, hi=3.0)
    assert ref * 0.995 <= table.radius(0.999) <= ref + 1e-9


def test_imagenet_scale_radii_match_numpy():
    """d = 150528, k = 50000, sigma matched from 0.5: the exact table against a float64
    numpy computation written here: p_min(r) = P(W < 1 / median W) from 1e6 draws
    of (||z||, z1), bracketed by DKW (level 1e-3 per radius)."""
    d, k = 150528, 50000.0
    sigma = noise.matched_sigma(0.5, d, k)
    radii = np.array([0.25, 0.5, 1.0, 1.5])
    table = radius_table(None, noise.L2Family(sigma, k), d, "l2", radii=radii)
    rng = np.random.default_rng(7)
    n = 1_000_000
    rho = sigma * np.sqrt(2 * rng.standard_gamma((d - k) / 2, n))
    z1 = rho * (2 * rng.beta((d - 1) / 2, (d - 1) / 2, n) - 1)
    eps = math.sqrt(math.log(2 * 2 * radii.size / 1e-3) / (2 * n))
    for r, p_min in zip(radii, table.p_min):
        s = r * r - 2 * r * z1
        log_w = np.sort(-(k / 2) * np.log1p(s / rho**2) - s / (2 * sigma**2))
        # The median of W lies between the empirical (1/2 - eps) and (1/2 + eps) quantiles.
        q_lo, q_hi = np.quantile(log_w, [0.5 - eps, 0.5 + eps])
        lo = np.searchsorted(log_w, -q_hi) / n - eps
        hi = np.searchsorted(log_w, -q_lo) / n + eps
        assert lo <= p_min <= hi + 1e-9, (r, lo, p_min, hi)


def test_radius_is_monotone_and_rounded_down_to_the_grid():
    radii = np.linspace(0, 2.0, 81)
    table = radius_table(None, noise.L2Family(0.5, 100.0), 3072, "l2", radii=radii)
    p = np.sort(np.random.default_rng(0).uniform(0, 1, 10_000))
    r = table.radius(p)
    assert np.all(np.diff(r) >= 0)
    assert np.all(np.isin(r, np.concatenate([[0.0], radii])))
    assert np.all(r[p < 0.5] == 0.0)
    # The jax lookup (float32) never exceeds the float64 one.
    rj = np.asarray(jax.jit(table.radius_jax)(jnp.asarray(p, jnp.float32)), np.float64)
    assert np.all(rj <= r + 1e-12)


def test_mixed_linf_table_is_sound_for_k0_and_runs_for_k250():
    d, n = 3072, 20_000
    radii = np.linspace(0, 0.05, 26)
    # k = 0: the mixed family is the Gaussian; Theorem 5's vertex equals the l2 radius r sqrt(d).
    k0 = radius_table(KEY, noise.MixedLinf(0.5, 0.0), d, "linf", radii=radii, n_samples=n)
    truth = scipy.special.ndtr(radii * math.sqrt(d) / 0.5)
    finite = np.isfinite(k0.p_min)
    assert np.all(k0.p_min >= truth - 1e-12)
    assert np.all(k0.p_min[finite] <= truth[finite] + pmin_tolerance(n, radii.size, 1e-3))
    table = radius_table(KEY, noise.MixedLinf(noise.matched_sigma(0.5, d, 250.0), 250.0), d, "linf",
                         radii=radii, n_samples=n)
    assert table.metadata["route"] == "monte_carlo" and table.alpha_d == 1e-3
    assert np.all(np.diff(table.radius(PS)) >= 0)


# ------------------------------------------------------------------ differentiability


def test_smooth_radius_gradients():
    sigma, d = 0.5, 3072
    p = jnp.array([0.6, 0.8, 0.95, 0.99])
    closed = sigma / scipy.stats.norm.pdf(scipy.stats.norm.ppf(np.asarray(p)))
    gauss = radius_table(None, noise.Gaussian(sigma), d, "l2")
    np.testing.assert_allclose(jax.vmap(jax.grad(gauss.smooth_radius))(p), closed, rtol=1e-5)
    # The exact l2 route with k = 0 on a grid: IFT derivative vs the closed form and vs
    # finite differences of its own smooth radius.
    table = radius_table(None, noise.L2Family(sigma, 0.0), d, "l2", radii=np.linspace(0, 3, 601))
    grad = np.asarray(jax.vmap(jax.grad(table.smooth_radius))(p))
    np.testing.assert_allclose(grad, closed, rtol=2e-3)
    h = 1e-4
    with jax.enable_x64(True):
        pp = jnp.asarray(p, jnp.float64)
        fd = (table.smooth_radius(pp + h) - table.smooth_radius(pp - h)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=5e-3)
    np.testing.assert_allclose(table.smooth_radius(p), cohen_radius(np.asarray(p), sigma), rtol=2e-4, atol=1e-4)


def test_lower_bound_gradient_is_the_optimal_lambda():
    sigma, r, d = 0.5, 0.3, 3072
    curve = dual.dual_curve(KEY, noise.Gaussian(sigma), d, "l2", r, jnp.geomspace(0.5, 1e4, 4001), 1_000_000)
    p = jnp.array([0.7, 0.9, 0.99])
    with jax.enable_x64(True):
        grad = np.asarray(jax.vmap(jax.grad(lambda q: dual.lower_bound(q, curve)))(jnp.asarray(p, jnp.float64)))
        h = 1e-7
        pp = jnp.asarray(p, jnp.float64)
        fd = np.asarray((dual.lower_bound(pp + h, curve) - dual.lower_bound(pp - h, curve)) / (2 * h))
    np.testing.assert_allclose(grad, fd, rtol=1e-4)
    # Closed form: d/dp Phi(Phi^-1(p) - r/sigma) = phi(Phi^-1(p) - r/sigma) / phi(Phi^-1(p)).
    q = scipy.stats.norm.ppf(np.asarray(p))
    closed = scipy.stats.norm.pdf(q - r / sigma) / scipy.stats.norm.pdf(q)
    np.testing.assert_allclose(grad, closed, rtol=0.1)


# ------------------------------------------------------------------ files and errors


def test_save_load_roundtrip_and_refusals(tmp_path):
    table = radius_table(None, noise.L2Family(0.5, 100.0), 3072, "l2", radii=np.linspace(0, 1, 11))
    path = tmp_path / "table.npz"
    table.save(path)
    with np.load(path, allow_pickle=False) as f:  # plain arrays, no pickle
        assert set(f.files) == {"radii", "p_min", "metadata"}
    loaded = RadiusTable.load(path, expected=table.identity())
    np.testing.assert_array_equal(loaded.p_min, table.p_min)
    np.testing.assert_array_equal(loaded.radii, table.radii)
    assert dict(loaded.metadata) == dict(table.metadata)
    with pytest.raises(ValueError, match=r"was built with k=100.0, expected k=500.0"):
        RadiusTable.load(path, expected={**table.identity(), "k": 500.0})
    with pytest.raises(ValueError, match=r"was built with attack='l2', expected attack='linf'"):
        RadiusTable.load(path, expected={"attack": "linf"})
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a table")
    with pytest.raises(ValueError, match="is not a readable soapbubble radius table"):
        RadiusTable.load(junk)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, radii=np.array([0.0]), p_min=np.array([0.5]), metadata=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="is not a readable soapbubble radius table"):
        RadiusTable.load(pickled)


def test_bad_input():
    g = noise.Gaussian(0.5)
    with pytest.raises(ValueError, match=r"no worst-case perturbation is proven for the pure l_inf family"):
        radius_table(KEY, noise.PureLinf(0.5, 1.0), 10, "linf")
    with pytest.raises(ValueError, match=r"l2 attack on the MixedLinf family"):
        radius_table(KEY, noise.MixedLinf(0.5, 1.0), 10, "l2")
    with pytest.raises(ValueError, match=r"k must be < d"):
        radius_table(None, noise.L2Family(0.5, 10.0), 10, "l2")
    with pytest.raises(ValueError, match=r"alpha_d must be in \(0, 1\), got 1.5"):
        radius_table(None, g, 10, "l2", alpha_d=1.5)
    with pytest.raises(ValueError, match=r"attack must be 'l2' or 'linf'"):
        radius_table(None, g, 10, "l1")
    with pytest.raises(ValueError, match=r"radii must be finite and >= 0"):
        radius_table(None, g, 10, "l2", radii=[-0.1, 0.2])
    with pytest.raises(ValueError, match=r"radii must be a non-empty 1-D array"):
        radius_table(None, g, 10, "l2", radii=[])
    with pytest.raises(ValueError, match=r"radii must be strictly increasing"):
        radius_table(None, g, 10, "l2", radii=[0.2, 0.1])
    with pytest.raises(ValueError, match=r"lambdas must be a non-empty array of finite values > 0"):
        radius_table(KEY, noise.MixedLinf(0.5, 1.0), 10, "linf", lambdas=np.array([-1.0, 2.0]), n_samples=10)
    table = radius_table(None, g, 10, "l2")
    for bad in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match=r"p_lower must be in \[0, 1\]"):
            table.radius(np.array([0.7, bad]))


def test_key_only_where_the_route_samples():
    with pytest.raises(ValueError, match="key is unused by the closed_form route of gaussian"):
        radius_table(KEY, noise.Gaussian(0.5), 10, "l2")
    with pytest.raises(ValueError, match="key is unused by the exact route of l2"):
        radius_table(KEY, noise.L2Family(0.5, 2.0), 10, "linf")
    with pytest.raises(ValueError, match="key must be a PRNG key for the Monte Carlo route"):
        radius_table(None, noise.MixedLinf(0.5, 1.0), 10, "linf", n_samples=100)


def test_table_without_its_accounting_is_refused():
    good = radius_table(None, noise.Gaussian(0.5), 10, "l2", radii=np.linspace(0, 1, 5))
    meta = dict(good.metadata)
    for drop in ("route", "alpha_d"):
        bad = {k: v for k, v in meta.items() if k != drop}
        with pytest.raises(ValueError, match=drop):
            RadiusTable(good.radii, good.p_min, bad)
    with pytest.raises(ValueError, match="Monte Carlo table must have alpha_d > 0"):
        RadiusTable(good.radii, good.p_min, {**meta, "route": "monte_carlo", "alpha_d": 0.0})
    with pytest.raises(ValueError, match="alpha_d in"):
        RadiusTable(good.radii, good.p_min, {**meta, "alpha_d": 1.0})


def test_nan_never_becomes_a_radius():
    table = radius_table(None, noise.Gaussian(0.5), 10, "l2", radii=np.linspace(0, 1, 5))
    out = np.asarray(table.radius_jax(jnp.array([0.9, jnp.nan, 1.0])))
    assert np.isnan(out[1]) and out[0] > 0 and out[2] == table.radii[-1]
    with pytest.raises(ValueError, match="p_lower"):
        table.radius(np.array([np.nan]))


def test_all_infinite_monte_carlo_table_warns():
    # lambda <= 1/2 gives (1/2 + D) / lambda >= 1: such a grid certifies nothing at all.
    with pytest.warns(UserWarning, match="certifies no radius above 0"):
        radius_table(KEY, noise.MixedLinf(0.5, 1.0), 10, "linf", radii=np.linspace(0, 0.5, 6), n_samples=2000,
                     lambdas=np.array([0.1, 0.5]))


def test_build_progress_changes_nothing(capsys, monkeypatch):
    """progress=True draws the MixedLinf samples in host-visible pieces (4 here) and shows a bar on
    stderr; the table is the same bit for bit, and no bar without a terminal."""
    monkeypatch.setattr(dual, "PROGRESS_PIECES", 4)
    family, d, n = noise.MixedLinf(0.5, 2.0), 10, 3_072  # 48 batches of 64: 4 pieces of 12
    kw = dict(radii=np.linspace(0.0, 0.4, 9), n_samples=n, batch_size=64)
    quiet = radius_table(KEY, family, d, "linf", **kw)  # progress=None: stderr is captured, not a terminal
    assert capsys.readouterr().err == ""
    shown = radius_table(KEY, family, d, "linf", progress=True, **kw)
    err = capsys.readouterr().err
    assert "radius table: Monte Carlo samples" in err and "100%" in err
    np.testing.assert_array_equal(quiet.p_min, shown.p_min)
    np.testing.assert_array_equal(quiet.radii, shown.radii)
    assert quiet.metadata == shown.metadata
    # The pieces are ratio_statistics' own samples (both programs compiled above).
    k_main = jax.random.split(KEY)[0]
    with jax.enable_x64(True):
        whole = dual.ratio_statistics(k_main, family, d, "linf", n, batch_size=64)
        drawn = []
        pieces = dual.ratio_statistics(k_main, family, d, "linf", n, batch_size=64, progress=drawn.append)
        assert drawn == [768, 768, 768, 768]
        for a, b in zip(whole, pieces):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="progress must be a bool or None"):
        radius_table(KEY, family, d, "linf", progress="yes", **kw)
    with pytest.raises(TypeError, match="progress must be None or a callable"):
        dual.ratio_statistics(KEY, family, d, "linf", 10, progress=True)
