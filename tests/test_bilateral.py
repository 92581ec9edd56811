"""Bilateral certification (MATH.md section 3, Appendix D) for every family.

The bilateral condition certifies radius r when V_r(pA) > 1 - V_r(1 - pB). Checked here:
the table's V against closed forms and the exact l2 route, the lookup against the Gaussian
closed form sigma/2 (Phi^-1(pA) - Phi^-1(pB)), the table format (old files, refusals), the
alpha split, and certify(..., bilateral=True) on three-class classifiers whose smoothed
probabilities are known independently (Gaussian: closed form; l2 family: scipy quadrature of
the radial law; mixed l_inf: importance sampling with a stated standard error).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats

import soapbubble
from soapbubble import noise
from soapbubble.bounds import exact_l2
from soapbubble.bounds.rules import worst_case
from soapbubble.bounds.table import RadiusTable, radius_table
from soapbubble.bounds.cache import cached_radius_table

SIGMA = 0.5
D = 4
T_STEP = 0.01  # the p grid's step in Phi^-1(p)


def closed_bilateral(pa, pb, sigma):
    return sigma / 2 * (scipy.stats.norm.ppf(pa) - scipy.stats.norm.ppf(pb))


# ------------------------------------------------------------------ tables


@pytest.mark.parametrize("attack", ["l2", "linf"])
def test_gaussian_lookup_is_the_closed_form_rounded_down(attack):
    d = 64
    scale = math.sqrt(d) if attack == "linf" else 1.0
    radii = np.linspace(0.0, 3.0 / scale, 601)
    table = radius_table(None, noise.Gaussian(SIGMA), d, attack, radii=radii, bilateral=True)
    rng = np.random.default_rng(0)
    pa = rng.uniform(0.05, 1 - 1e-6, 4000)
    pb = pa * rng.uniform(0.0, 1.0, pa.size) ** 3
    exact = np.maximum(closed_bilateral(pa, pb, SIGMA), 0.0) / scale
    got = table.bilateral_radius(pa, pb)
    assert got.shape == pa.shape
    assert np.all(got <= exact + 1e-12)
    # Losses: one radius step, and 0.01 in Phi^-1 of each argument (sigma/2 each).
    inside = exact < radii[-1]
    slack = (radii[1] - radii[0]) + SIGMA * T_STEP / scale
    assert np.all(got[inside] >= exact[inside] - slack * 1.0001)
    # V itself: Phi(Phi^-1(p) - r/sigma), never above, at most one grid step in Phi^-1 below.
    p = np.array([1e-6, 0.1, 0.5, 0.9, 0.999, 1 - 1e-7])
    v = table.v_lower(p)
    true = scipy.stats.norm.cdf(scipy.stats.norm.ppf(p)[None, :] - (radii * scale / SIGMA)[:, None])
    assert v.shape == (radii.size, p.size)
    assert np.all(v <= true)
    lower = scipy.stats.norm.cdf(scipy.stats.norm.ppf(p)[None, :] - T_STEP - (radii * scale / SIGMA)[:, None])
    assert np.all(v >= lower - 1e-12)


def test_bilateral_radius_edges_and_refusals(tmp_path):
    table = radius_table(None, noise.Gaussian(SIGMA), D, "l2", bilateral=True)
    assert table.bilateral and table.metadata["bilateral"]["p_grid"]["count"] == table.v_p.size
    assert float(table.bilateral_radius(0.6, 0.6)) == 0.0  # pA <= pB: nothing
    assert float(table.bilateral_radius(0.3, 0.7)) == 0.0
    assert table.bilateral_radius(np.full((2, 3), 0.9), 0.01).shape == (2, 3)
    for bad in (np.nan, -0.1, 1.5):
        with pytest.raises(ValueError, match="must be in"):
            table.bilateral_radius(bad, 0.1)
        with pytest.raises(ValueError, match="must be in"):
            table.bilateral_radius(0.9, bad)
    # Round trip keeps V; a table without V certifies unilaterally and refuses bilaterally.
    table.save(tmp_path / "b.npz")
    back = RadiusTable.load(tmp_path / "b.npz", expected=table.identity())
    assert np.array_equal(back.v, table.v) and np.array_equal(back.v_p, table.v_p)
    plain = radius_table(None, noise.Gaussian(SIGMA), D, "l2")
    assert not plain.bilateral and plain.v is None
    with pytest.raises(ValueError, match="no bilateral V grid"):
        plain.bilateral_radius(0.9, 0.01)
    # A format-2 file (written before V existed) still loads and certifies unilaterally.
    meta = dict(plain.metadata, format_version=2)
    with open(tmp_path / "old.npz", "wb") as f:
        np.savez(f, radii=plain.radii, p_min=plain.p_min, metadata=np.array(json.dumps(meta)))
    old = RadiusTable.load(tmp_path / "old.npz")
    assert np.array_equal(old.radius([0.7, 0.99]), plain.radius([0.7, 0.99])) and not old.bilateral
    with pytest.raises(ValueError, match="no bilateral V grid"):
        old.bilateral_radius(0.9, 0.01)
    # A V grid that is not monotone (or half of one) is refused.
    with pytest.raises(ValueError, match="non-decreasing along p"):
        RadiusTable(table.radii, table.p_min, table.metadata, table.v_p, table.v[:, ::-1])
    with pytest.raises(ValueError, match="together"):
        RadiusTable(table.radii, table.p_min, table.metadata, table.v_p, None)
    x = jnp.zeros(D)
    f = lambda b: jnp.stack([b[:, 0], -b[:, 0], 0 * b[:, 0]], -1)  # noqa: E731
    with pytest.raises(ValueError, match="bilateral V grid"):
        soapbubble.certify(jax.random.key(0), f, x, noise.Gaussian(SIGMA), n=100, table=plain, bilateral=True)
    with pytest.raises(TypeError, match="bilateral"):
        soapbubble.certify(jax.random.key(0), f, x, noise.Gaussian(SIGMA), n=100, table=table, bilateral=1)


def test_monte_carlo_and_exact_v_are_lower_bounds():
    p = np.array([0.02, 0.3, 0.6, 0.9, 0.99, 0.999, 0.9999])
    t = scipy.stats.norm.ppf(p)
    # Gaussian by the Monte Carlo route: below the closed form, and close to it.
    radii = np.linspace(0.0, 1.0, 11)
    mc = radius_table(jax.random.key(1), noise.Gaussian(SIGMA), 16, "l2", radii=radii, n_samples=200_000,
                      alpha_d=1e-3, route="monte_carlo", bilateral=True)
    s = radii[:, None] / SIGMA
    true = scipy.stats.norm.cdf(t[None, :] - s)
    v = mc.v_lower(p)
    assert np.all(v <= true)
    # Loose by at most lam* (DKW eps), lam* = exp(s t - s^2/2) the optimal lambda, plus the grids.
    lam = np.exp(s * t[None, :] - s * s / 2)
    assert np.all(v >= true - 1.5 * lam * mc.metadata["epsilon"] - 0.01)
    # k = 0 by the exact route: the closed form, to the lambda lines and the p grid.
    radii = np.array([0.0, 0.2, 0.5, 1.0])
    ex = radius_table(None, noise.L2Family(SIGMA, 0.0), 16, "l2", radii=radii, bilateral=True)
    true = scipy.stats.norm.cdf(t[None, :] - radii[:, None] / SIGMA)
    v = ex.v_lower(p)
    assert np.all(v <= true + 1e-9)
    # Phi^-1 of V within 0.06 (p grid 0.01 plus the gap between two of the 20 lambda lines) where the
    # lines aim: Phi^-1(p) in [2 s - 5, 5], s = r / sigma (elsewhere V is looser, never wrong).
    aimed = t[None, :] >= 2 * radii[:, None] / SIGMA - 5
    gap = scipy.stats.norm.ppf(true) - scipy.stats.norm.ppf(np.maximum(v, 1e-300))
    assert np.all(gap[aimed] <= 0.06)


def test_exact_v_is_below_the_exact_routes_own_bound(cases):
    """k > 0: never above exact_l2's Neyman-Pearson bound at the optimal lambda, and close to it."""
    table = cases["l2"][6]
    p = np.array([0.3, 0.6, 0.9, 0.99, 0.999])
    for i in (1, 4, 8):
        ref = exact_l2.l2_lower_bound_exact(p, table.radii[i], SIGMA, 1.0, D)
        v = table.v_lower(p)[i]
        assert np.all(v <= ref.value + 2 * ref.error + 1e-9)
        assert np.all(v >= ref.value - 0.05)


def test_alpha_split_rule():
    rule = worst_case(noise.Gaussian(SIGMA), "l2")
    b = rule.bilateral_budget(0.001, 10)
    assert (b.alpha_p, b.alpha_d, b.alpha_a) == (0.001, 0.0, 0.0005)
    assert b.alpha_a + 9 * b.alpha_b <= b.alpha_p and b.alpha_b == pytest.approx(0.0005 / 9)
    assert b.as_dict()["bilateral"]["num_classes"] == 10 and b.as_dict()["alpha_p"] == 0.001
    two = rule.bilateral_budget(0.001, 2)
    assert (two.alpha_a, two.alpha_b) == (0.001, 0.0)
    mixed = worst_case(noise.MixedLinf(SIGMA, 1.0), "linf").bilateral_budget(0.001, 3)
    assert (mixed.alpha_d, mixed.alpha_a) == (0.0005, 0.00025)
    for bad in (1, 0):
        with pytest.raises(ValueError, match="num_classes"):
            rule.bilateral_budget(0.001, bad)
    for bad in (True, 2.5, "3"):
        with pytest.raises(TypeError, match="num_classes"):
            rule.bilateral_budget(0.001, bad)


def test_cached_bilateral_table(tmp_path):
    family = noise.Gaussian(SIGMA)
    first = cached_radius_table(family, D, "l2", table_dir=tmp_path, bilateral=True)
    files = sorted(tmp_path.glob("*-bilateral-*.npz"))
    assert first.bilateral and len(files) == 1
    again = cached_radius_table(family, D, "l2", table_dir=tmp_path, bilateral=True)
    assert np.array_equal(again.v, first.v) and np.array_equal(again.p_min, first.p_min)
    # Same p_min as the unilateral cached table.
    plain = soapbubble.cached_radius_table(family, D, "l2", table_dir=tmp_path)
    assert np.array_equal(plain.p_min, first.p_min)
    # A file that lost its V grid is rebuilt, with a warning.
    radius_table(None, family, D, "l2", radii=first.radii).save(files[0])
    with pytest.warns(UserWarning, match="rebuilding a stale radius table.*no V grid"):
        rebuilt = cached_radius_table(family, D, "l2", table_dir=tmp_path, bilateral=True)
    assert rebuilt.bilateral


# ------------------------------------------------------------------ certification


def two_direction_logits(b):
    """Class 1 iff b0 > 0; else class 0 iff b1 > 0; else class 2."""
    one = b[:, 0] > 0
    zero = ~one & (b[:, 1] > 0)
    return jnp.stack([zero, one, ~one & ~zero], -1).astype(jnp.float32)


def two_direction_gaussian(x):
    """Exact class probabilities under N(0, sigma^2 I)."""
    a, b = scipy.stats.norm.cdf(x[:, 0] / SIGMA), scipy.stats.norm.cdf(x[:, 1] / SIGMA)
    return np.stack([(1 - a) * b, a, (1 - a) * (1 - b)], -1)


CUT = 0.26  # class 1: y > 0; class 0: -CUT < y <= 0; class 2: y <= -CUT (y = first coordinate)


def thresholds_logits(b):
    one = b[:, 0] > 0
    zero = ~one & (b[:, 0] > -CUT)
    return jnp.stack([zero, one, ~one & ~zero], -1).astype(jnp.float32)


def l2_tail(t, sigma, k, d):
    """P(z1 > t) for z ~ L2Family(sigma, k) in R^d: z1 = rho u1, rho^2/(2 sigma^2) ~ Gamma((d-k)/2),
    (u1 + 1)/2 ~ Beta((d-1)/2, (d-1)/2); scipy quadrature over the radial law (independent of exact_l2)."""
    a, b, t = (d - k) / 2, (d - 1) / 2, float(t)

    def integrand(g):
        rho = sigma * math.sqrt(2 * g)
        u = min(max(t / rho, -1.0), 1.0) if rho > 0 else math.copysign(1.0, t)
        return scipy.stats.gamma.pdf(g, a) * scipy.special.betainc(b, b, (1 - u) / 2)

    hi = scipy.stats.gamma.isf(1e-16, a)
    kink = t * t / (2 * sigma * sigma)  # rho = |t|: where u1 = t / rho leaves [-1, 1]
    points = [kink] if 0 < kink < hi else None
    return scipy.integrate.quad(integrand, 0, hi, epsabs=1e-12, epsrel=1e-11, limit=200, points=points)[0]


def thresholds_l2(x, sigma, k, d):
    out = []
    for x0 in x[:, 0]:
        p1 = l2_tail(-x0, sigma, k, d)
        p_above_cut = l2_tail(-CUT - x0, sigma, k, d)
        out.append([p_above_cut - p1, p1, 1 - p_above_cut])
    return np.array(out)


def mixed_importance(x, sigma, k, n=2_000_000, seed=3):
    """Class probabilities of the two-direction classifier under MixedLinf(sigma, k) in R^D by
    importance sampling from N(0, sigma^2 I) (weights ||z||_inf^-k; finite variance as 2k < D), and
    their standard errors (delta method of the self-normalised estimate)."""
    z = np.random.default_rng(seed).normal(0.0, sigma, (n, D))
    w = np.max(np.abs(z), axis=1) ** -k
    w /= w.sum()
    probs, errors = [], []
    for row in x:
        y = row[None, :2] + z[:, :2]
        one = y[:, 0] > 0
        zero = ~one & (y[:, 1] > 0)
        p, e = [], []
        for ind in (zero, one, ~one & ~zero):
            pi = float(np.sum(w * ind))
            p.append(pi)
            e.append(math.sqrt(float(np.sum(w**2 * (ind - pi) ** 2))))
        probs.append(p)
        errors.append(e)
    return np.array(probs), np.array(errors)


@pytest.fixture(scope="module")
def cases():
    """(family, attack, logits_fn, xs, exact probs, standard errors, table) for each family."""
    rng = np.random.default_rng(7)
    distinct = 24
    base = np.zeros((distinct, D), np.float32)
    base[:, 0] = rng.uniform(-0.2, 1.0, distinct)
    base[:, 1] = rng.uniform(-0.4, 0.4, distinct)
    out = {}
    g = noise.Gaussian(SIGMA)
    out["gaussian"] = (g, "l2", two_direction_logits, base, two_direction_gaussian(base), 0.0,
                       radius_table(None, g, D, "l2", bilateral=True))
    l2 = noise.L2Family(SIGMA, 1.0)
    out["l2"] = (l2, "l2", thresholds_logits, base, thresholds_l2(base, SIGMA, 1.0, D), 0.0,
                 radius_table(None, l2, D, "l2", radii=np.linspace(0.0, 1.2, 13), bilateral=True))
    mixed = noise.MixedLinf(SIGMA, 1.0)
    probs, errors = mixed_importance(base, SIGMA, 1.0)
    assert errors.max() < 1e-3
    out["mixed_linf"] = (mixed, "linf", two_direction_logits, base, probs, errors,
                         radius_table(jax.random.key(5), mixed, D, "linf", radii=np.linspace(0.0, 1.0, 51),
                                      n_samples=200_000, alpha_d=0.01, bilateral=True))
    return out


def test_exact_probabilities_are_consistent(cases):
    """The independent routes agree where they overlap: l2 quadrature at k = 0 is the Gaussian."""
    x = cases["l2"][3][:4]
    gauss = np.array([[scipy.stats.norm.cdf(-x0 / SIGMA) - scipy.stats.norm.cdf((-CUT - x0) / SIGMA),
                       scipy.stats.norm.cdf(x0 / SIGMA), scipy.stats.norm.cdf((-CUT - x0) / SIGMA)] for x0 in x[:, 0]])
    assert np.allclose(thresholds_l2(x, SIGMA, 0.0, D), gauss, atol=1e-9)
    for name, case in cases.items():
        assert np.allclose(case[4].sum(axis=1), 1.0, atol=1e-9), name


@pytest.mark.parametrize("name", ["gaussian", "l2", "mixed_linf"])
def test_certified_bilateral_radius_never_exceeds_the_exact_one(cases, name):
    family, attack, f, base, probs, errors, table = cases[name]
    reps, alpha, n = 8, 0.1, 2000
    xs = np.repeat(base, reps, axis=0)
    exact = np.repeat(probs, reps, axis=0)
    err = np.broadcast_to(np.repeat(np.asarray(errors, float) * np.ones_like(probs), reps, axis=0), exact.shape)
    cert = soapbubble.certify(jax.random.key(11), f, xs, family, attack=attack, n0=50, n=n, alpha=alpha,
                              table=table, batched=True, bilateral=True)
    assert cert.bilateral["num_classes"] == 3 and cert.alpha_p + cert.alpha_d == pytest.approx(alpha)
    rows = np.arange(xs.shape[0])
    top = exact.argmax(axis=1)
    pred = cert.prediction
    certified = pred >= 0  # abstentions are always sound; a certificate speaks of its predicted class
    sel = np.where(certified, pred, top)
    # Exact probabilities, widened by 4 standard errors where they are estimated (importance sampling).
    p_a = np.minimum(exact + 4 * err, 1.0)[rows, sel]
    others = np.maximum(exact - 4 * err, 0.0)
    others[rows, sel] = -1.0
    p_b = others.max(axis=1)
    covered = ~certified | ((cert.p_lower <= p_a) & (cert.p_upper >= p_b))
    # Reference: the same table at the exact probabilities (for the Gaussian also the closed form).
    ref = np.maximum(table.radius(p_a), table.bilateral_radius(p_a, p_b))
    ok = (pred < 0) | ((pred == top) & (cert.radius <= ref + 1e-12))
    if name == "gaussian":
        closed = np.maximum(closed_bilateral(exact[rows, top], p_b, SIGMA), 0.0)
        assert np.all(ref <= closed + 1e-12)
        ok &= (pred < 0) | (cert.radius <= closed + 1e-12)
    # Deterministic: whenever the bounds hold, the certificate is right (monotone lookups).
    assert np.all(ok[covered]), name
    # Statistical: bounds fail, and certificates are wrong, at most at rate alpha.
    limit = scipy.stats.binom.ppf(1 - 1e-4, rows.size, alpha)
    assert np.sum(~covered) <= limit and np.sum(~ok) <= limit
    assert np.mean(pred >= 0) > 0.5  # something was certified


@pytest.mark.parametrize("name", ["gaussian", "l2", "mixed_linf"])
def test_bilateral_beats_unilateral_when_the_rest_is_split(cases, name):
    """pA ~ 0.7 with the rest split evenly: the runner-up is far below 1 - pA."""
    family, attack, f, _, _, _, table = cases[name]
    x = np.zeros((4, D), np.float32)
    x[:, 0] = 0.26  # p1 ~ 0.7; the rest split evenly: p0 = p2 (two directions) or by the cut (~0.15 each)
    kw = dict(attack=attack, n0=50, n=10_000, alpha=0.02, table=table, batched=True)  # n0 as above: no recompile
    bil = soapbubble.certify(jax.random.key(2), f, x, family, bilateral=True, **kw)
    uni = soapbubble.certify(jax.random.key(2), f, x, family, **kw)
    assert np.all(bil.prediction == 1) and np.all(uni.prediction == 1)
    assert np.all(bil.radius >= uni.radius) and np.mean(bil.radius > uni.radius) >= 0.75, (bil.radius, uni.radius)
    assert np.all(bil.p_upper < 0.7 * (1 - bil.p_lower))


def test_two_classes_bilateral_is_unilateral():
    """C = 2: pB = 1 - pA, all of alpha_p on pA, the same radius as the unilateral certificate."""
    f = lambda b: jnp.stack([-b[:, 0], b[:, 0]], -1)  # noqa: E731
    x = np.zeros((6, D), np.float32)
    x[:, 0] = np.linspace(0.05, 1.0, 6)
    table = radius_table(None, noise.Gaussian(SIGMA), D, "l2", bilateral=True)
    kw = dict(n=5000, alpha=0.001, table=table, batched=True)
    bil = soapbubble.certify(jax.random.key(4), f, x, noise.Gaussian(SIGMA), bilateral=True, **kw)
    uni = soapbubble.certify(jax.random.key(4), f, x, noise.Gaussian(SIGMA), **kw)
    assert bil.bilateral["alpha_a"] == 0.001 and bil.bilateral["alpha_b"] == 0.0
    assert np.array_equal(bil.p_lower, uni.p_lower) and np.array_equal(bil.radius, uni.radius)
    assert np.all(bil.p_upper >= 1 - bil.p_lower) and uni.p_upper is None and uni.bilateral is None
    one = soapbubble.certify(jax.random.key(4), f, x[1], noise.Gaussian(SIGMA), n=5000, table=table, bilateral=True)
    assert isinstance(one.p_upper, np.float64) and isinstance(one.radius, np.float64)  # single input: scalars


# ------------------------------------------------------------------ the sequential route


def _stop_bounds(key, f, x, family, n, split):
    """Independent route: the bounds from the counts at the stop, counted again by class_counts with
    the keys certify uses and bounded by the float64 mixture sequences (Gaussian: no TV charge)."""
    from soapbubble import counting
    from soapbubble.bounds import confidence

    k_select, k_estimate = jax.random.split(key)
    top = int(np.argmax(np.asarray(counting.class_counts(k_select, f, x, family, n=50, batch_size=200))))
    votes = np.asarray(counting.class_counts(k_estimate, f, x, family, n=n, batch_size=200)).astype(np.int64)
    low = float(confidence.mixture_lower(votes[top], n, split["alpha_a"]))
    up = float(confidence.mixture_upper(np.delete(votes, top).max(), n, split["alpha_b"]))
    return low, min(up, 1 - low)


def test_sequential_bilateral_never_exceeds_the_exact_radius(cases):
    """certify_radii(bilateral=True) on the three-class Gaussian case: the bounds cover the exact
    probabilities and the certified radii stay below the closed form sigma/2 (Phi^-1(pA) - Phi^-1(pB))
    (and the table at the exact probabilities) at rate alpha; at the stop the bounds are the float64
    mixture bounds of the counts, counted again independently; the same rows for any pool size; new
    radii and inputs compile nothing."""
    from soapbubble import sequential

    family, attack, f, base, probs, _, table = cases["gaussian"]
    reps, alpha, max_n = 8, 0.1, 3000
    radii = np.array([0.05, 0.15, 0.3, 0.45])
    # Three more rows at pA ~ 0.70 with the rest split evenly (p0 = p2 ~ 0.15): bilateral radius ~0.37,
    # beyond any unilateral certificate (sigma Phi^-1(0.70) ~ 0.26).
    split_rest = np.zeros((3, D), np.float32)
    split_rest[:, 0] = 0.26
    xs = np.concatenate([np.repeat(base, reps, axis=0), split_rest])
    exact = np.concatenate([np.repeat(probs, reps, axis=0), two_direction_gaussian(split_rest)])
    key = jax.random.key(12)
    kw = dict(attack=attack, n0=50, max_n=max_n, alpha=alpha, table=table, bilateral=True)
    c = soapbubble.certify_radii(key, f, xs, family, radii, batch_size=200, **kw)
    assert c.bilateral["num_classes"] == 3 and c.bilateral["alpha_a"] == c.alpha_p / 2 == alpha / 2
    assert c.bilateral["alpha_b"] == pytest.approx(alpha / 4) and "mixture" in c.bilateral["construction"]
    rows = np.arange(xs.shape[0])
    top, pred = exact.argmax(axis=1), c.prediction
    certified = pred >= 0
    assert np.all(certified == ((c.p_lower >= 0.5) | (c.p_lower > c.p_upper)))
    sel = np.where(certified, pred, top)
    p_a = exact[rows, sel]
    others = exact.copy()
    others[rows, sel] = -1.0
    p_b = others.max(axis=1)
    covered = ~certified | ((c.p_lower <= p_a) & (c.p_upper >= p_b))
    # The largest certified target radius against the closed form and the table at the exact values.
    got = np.where(certified, np.max(np.where(c.certified, radii[None, :], 0.0), axis=1), 0.0)
    closed = np.maximum(closed_bilateral(exact[rows, top], p_b, SIGMA), 0.0)
    ref = np.maximum(table.radius(p_a), table.bilateral_radius(p_a, p_b))
    ok = ~certified | ((pred == top) & (got <= ref + 1e-12) & (got <= closed + 1e-12))
    assert np.all(ok[covered])  # deterministic given the bounds (monotone lookups)
    limit = scipy.stats.binom.ppf(1 - 1e-4, rows.size, alpha)
    assert np.sum(~covered) <= limit and np.sum(~ok) <= limit
    assert np.mean(certified) > 0.5 and np.all(c.certified[-3:, 2])  # not vacuous; the bilateral gain
    assert np.all(c.n_used <= max_n) and np.mean(c.n_used) < max_n / 2  # decided early, mostly
    # Independent route at the stop (an abstention certified nothing: equality).
    for i in (int(np.argmin(c.p_lower)), int(np.argmax(c.p_lower))):
        low, up = _stop_bounds(jax.random.fold_in(key, i), f, xs[i], family, int(c.n_used[i]), c.bilateral)
        assert c.p_lower[i] >= low and c.p_upper[i] <= up * (1 + 1e-12)
        if pred[i] < 0:
            assert c.p_lower[i] == pytest.approx(low, rel=1e-12) and c.p_upper[i] == pytest.approx(up, rel=1e-12)
    # New inputs and radii values (as many; rows in the same bucket) compile nothing new.
    programs = sequential._run._cache_size()
    soapbubble.certify_radii(jax.random.key(13), f, xs[:130] + 0.01, family, radii * 0.9, batch_size=200, **kw)
    assert sequential._run._cache_size() == programs
    # Another pool size: the same rows, bit for bit.
    other = soapbubble.certify_radii(key, f, xs, family, radii, batch_size=100, **kw)
    for a, b in zip(c, other):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sequential_bilateral_bounds_charge_the_sampler_tv():
    """The host bounds: the best look, the cap pB <= 1 - pA, the TV charge on both sides, C = 2."""
    from soapbubble.bounds import confidence
    from soapbubble.sequential import bilateral_bounds

    budget = worst_case(noise.Gaussian(SIGMA), "l2").bilateral_budget(0.01, 4)
    count, other, n = np.array([700, 950, 700]), np.array([100, 50, 250]), np.array([1000, 1000, 1000])
    dec = np.array([[0, 0], [0, 0], [600, 0]]), np.array([[0, 0], [0, 0], [50, 0]]), np.array([[0, 0], [0, 0], [700, 0]])
    decided = dec[2] > 0
    tv = 1e-4
    lo, up = bilateral_bounds(count, other, n, *dec, decided, budget, tv)
    a = confidence.mixture_lower(count, n, budget.alpha_a)
    a[2] = max(a[2], confidence.mixture_lower(600, 700, budget.alpha_a))  # the better look
    b = confidence.mixture_upper(other, n, budget.alpha_b)
    b[2] = min(b[2], confidence.mixture_upper(50, 700, budget.alpha_b))
    assert np.all(lo <= a - tv) and np.allclose(lo, a - tv, rtol=0, atol=1e-15)
    assert np.all(up >= np.minimum(b + tv, 1 - lo)) and np.allclose(up, np.minimum(b + tv, 1 - lo), atol=1e-15)
    assert up[1] == pytest.approx(1 - lo[1], rel=1e-12)  # only A and B seen, B at a smaller level: the cap binds
    two = worst_case(noise.Gaussian(SIGMA), "l2").bilateral_budget(0.01, 2)
    lo2, up2 = bilateral_bounds(count, other, n, *dec, decided, two, tv)
    assert np.all(up2 >= 1 - lo2) and np.all(up2 <= np.nextafter(1 - lo2, 2))


def test_sequential_bilateral_adaptive_radius(cases):
    """certify_adaptive(bilateral=True): the better of the two radii at the final bounds, below the
    closed form, beyond the unilateral radius where the rest is split."""
    family, _, f, _, _, _, table = cases["gaussian"]
    x = np.zeros((4, D), np.float32)
    x[:, 0] = [0.26, 0.26, 0.5, 0.1]
    x[:, 1] = [0.0, 0.0, 0.3, -0.1]
    ad = soapbubble.certify_adaptive(jax.random.key(3), f, x, family, tol=0.05, n0=50, max_n=4000, alpha=0.02,
                                     table=table, batch_size=200, bilateral=True)
    exact = two_direction_gaussian(x)
    pa, pb = exact.max(axis=1), np.sort(exact, axis=1)[:, -2]
    assert np.all(ad.prediction == exact.argmax(axis=1)) and ad.bilateral["num_classes"] == 3
    assert np.all(ad.radius <= closed_bilateral(pa, pb, SIGMA))
    assert np.all(ad.radius == np.maximum(table.radius(ad.p_lower), table.bilateral_radius(ad.p_lower, ad.p_upper)))
    assert np.all(ad.radius[:2] > 0.26)  # beyond the unilateral radius sigma Phi^-1(0.70)


def test_sequential_bilateral_two_classes_and_refusals():
    """C = 2: all of alpha_p on pA, p_upper = 1 - p_lower, sound; a table without V and a non-bool flag
    are refused before any work."""
    from soapbubble import sequential

    f = lambda b: jnp.stack([-b[:, 0], b[:, 0]], -1)  # noqa: E731
    x = np.zeros((4, D), np.float32)
    x[:, 0] = [0.1, 0.3, 0.6, -0.4]
    table = radius_table(None, noise.Gaussian(SIGMA), D, "l2", bilateral=True)
    kw = dict(max_n=5000, alpha=0.001, table=table, batch_size=100)
    radii = np.array([0.1, 0.25, 0.5])
    bil = soapbubble.certify_radii(jax.random.key(4), f, x, noise.Gaussian(SIGMA), radii, bilateral=True, **kw)
    assert bil.bilateral["alpha_a"] == 0.001 and bil.bilateral["alpha_b"] == 0.0
    assert np.all(bil.p_upper >= 1 - bil.p_lower) and np.all(bil.p_upper <= np.nextafter(1 - bil.p_lower, 2))
    assert bil.prediction.tolist() == [1, 1, 1, 0]
    assert np.all(bil.certified <= (np.abs(x[:, :1]) >= radii[None, :]))  # the exact radius is |x0|
    assert bil.certified[1:].sum() >= 4  # not vacuous
    plain = radius_table(None, noise.Gaussian(SIGMA), D, "l2")

    def boom(*args, **kwargs):
        raise AssertionError("the loop started before the arguments were checked")

    run = sequential._run
    sequential._run = boom
    try:
        with pytest.raises(ValueError, match="bilateral V grid"):
            soapbubble.certify_radii(jax.random.key(0), f, x, noise.Gaussian(SIGMA), radii, table=plain, bilateral=True)
        with pytest.raises(TypeError, match="bilateral"):
            soapbubble.certify_adaptive(jax.random.key(0), f, x, noise.Gaussian(SIGMA), tol=0.1, table=table,
                                        bilateral="yes")
    finally:
        sequential._run = run
