"""Tests of soapbubble.certify: soundness on classifiers with a known smoothed probability.

Every reference here is independent of the library's sampling and statistics:
closed forms (Gaussian), scipy quadrature over the radial law (l2 family),
importance sampling in numpy (mixed l_inf family), scipy's Beta quantiles
(Clopper-Pearson) and binomial test. Keys are fixed, so each statistical check
either always passes or always fails; its threshold comes from the sample size.

Compilation dominates the run time on CPU (a few seconds per program), so the
tests share a few logits functions and use ``batch_size=100``, which makes the
``n0`` and ``n`` loops one program (both use two 50-row chunks per step).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats

from soapbubble import counting
from soapbubble.bounds import cache as cache_lib
from soapbubble import noise
from soapbubble.bounds import table as table_lib
from soapbubble import Certificate, certify, predict
from soapbubble.counting import class_counts

KEY = jax.random.key(20260301)
BATCH = 100  # 2 chunks per step for n0 = 100 and every larger n: one program per classifier

# ----------------------------------------------------------------------------- classifiers

D = 16
SIGMA = 0.5
_rng = np.random.default_rng(7)
W16 = _rng.normal(size=D)
W16 /= np.linalg.norm(W16)  # unit normal: the signed distance to the boundary is w.x
TRACES: list[tuple] = []  # shapes linear16 was traced with (the no-recompile guard reads it)


def linear16(batch):
    """f(x) = 1{w.x > 0} in d = 16, as two logits."""
    TRACES.append(tuple(batch.shape))
    score = batch @ jnp.asarray(W16, batch.dtype)
    return jnp.stack([-score, score], axis=-1)


def at_distance(s: float, w: np.ndarray = W16, seed: int = 0) -> np.ndarray:
    """A point at signed distance s from the hyperplane w.x = 0 (w a unit vector)."""
    base = np.random.default_rng(seed).uniform(0.0, 1.0, size=w.size)
    base -= (base @ w) * w
    return (base + s * w).astype(np.float32)


def constant16(batch):
    """Always class 2 of 3."""
    return jnp.zeros((batch.shape[0], 3), batch.dtype).at[:, 2].set(1.0)


def three_way(batch):
    """argmax of the first three coordinates: three classes."""
    return batch[:, :3]


@pytest.fixture(scope="module")
def gaussian_table():
    return table_lib.radius_table(None, noise.Gaussian(SIGMA), D, "l2")


def _grid_step(table) -> float:
    return float(np.max(np.diff(table.radii)))


def _cp_scipy(count, n, alpha):
    return scipy.stats.beta.ppf(alpha, count, n - count + 1) if count > 0 else 0.0


# ----------------------------------------------------------------------------- soundness


def test_gaussian_linear_sound_and_tight(gaussian_table):
    """Certified radius <= |w.x| (exact), and within the sampling error of it as n grows."""
    s, alpha = 0.4, 0.001
    x = at_distance(s)
    p_a = scipy.stats.norm.cdf(s / SIGMA)
    z_alpha = scipy.stats.norm.isf(alpha)
    gaps = []
    for n in (1_000, 10_000, 100_000):
        cert = certify(KEY, linear16, x, noise.Gaussian(SIGMA), n=n, alpha=alpha,
                       batch_size=BATCH, table=gaussian_table)
        assert cert.prediction == 1 and cert.n == n
        # p_lower is the exact Clopper-Pearson bound (scipy), never above it.
        ref = _cp_scipy(cert.count, n, alpha)
        assert cert.p_lower <= ref and cert.p_lower == pytest.approx(ref, rel=1e-9)
        assert cert.radius <= s  # the exact robust radius of the smoothed classifier
        # Tight: count >= n pA - 4 sd (fails w.p. 3e-5), then CP loses z_alpha sd at most.
        delta = (z_alpha + 4.0) * math.sqrt(p_a * (1 - p_a) / n)
        worst = SIGMA * scipy.stats.norm.ppf(p_a - delta) - _grid_step(gaussian_table)
        assert cert.radius >= worst, (n, cert, worst)
        gaps.append(s - cert.radius)
    assert gaps[-1] < gaps[0]


def _l2_family_p_a(s: float, sigma: float, k: float, d: int) -> float:
    """P(w.z > -s), z ~ L2Family(sigma, k) in dimension d, |w| = 1, by quadrature.

    z = rho u: rho^2 / (2 sigma^2) ~ Gamma((d - k) / 2), u uniform on the sphere,
    whose first coordinate is 2B - 1 with B ~ Beta((d-1)/2, (d-1)/2).
    """
    shape, half = (d - k) / 2.0, (d - 1) / 2.0

    def miss(g):  # P(rho u1 <= -s | G = g)
        c = min(s / (sigma * math.sqrt(2.0 * g)), 1.0)
        return scipy.stats.gamma.pdf(g, shape) * scipy.stats.beta.cdf((1.0 - c) / 2.0, half, half)

    lo = s * s / (2 * sigma * sigma)  # below it rho < s: the boundary cannot be reached
    val, err = scipy.integrate.quad(miss, lo, np.inf, epsabs=1e-12, epsrel=1e-10, limit=200)
    assert err < 1e-9
    return 1.0 - val


def test_l2_family_quadrature_reference_reduces_to_gaussian():
    # k = 0 is the Gaussian: the reference must give Phi(s / sigma).
    assert _l2_family_p_a(0.3, 0.5, 0.0, 8) == pytest.approx(scipy.stats.norm.cdf(0.6), abs=1e-9)


def test_l2_family_linear_sound_and_tight():
    d, sigma, k, s, alpha = 8, 0.5, 4.0, 0.3, 0.001
    family = noise.L2Family(sigma, k)
    w = np.ones(d) / math.sqrt(d)
    x = at_distance(s, w)
    p_a = _l2_family_p_a(s, sigma, k, d)
    table = table_lib.radius_table(None, family, d, "l2", radii=np.linspace(0.0, 1.5, 151))
    exact = float(table.radius(p_a))  # what certification with the exact pA gives
    assert 0.0 < exact <= s  # the table itself is sound: the true robust radius is s
    z_alpha = scipy.stats.norm.isf(alpha)
    logits = _linear_fn(w)
    for n in (1_000, 10_000, 100_000):
        cert = certify(KEY, logits, x, family, n=n, alpha=alpha, batch_size=BATCH, table=table)
        assert cert.prediction == 1
        assert cert.radius <= exact
        delta = (z_alpha + 4.0) * math.sqrt(p_a * (1 - p_a) / n)
        assert cert.radius >= float(table.radius(p_a - delta)), (n, cert)


_LINEAR_FNS: dict = {}


def _linear_fn(w: np.ndarray):
    """One (hashable, cached) linear classifier per weight vector, so programs are reused."""
    key = tuple(np.round(w, 12))
    if key not in _LINEAR_FNS:
        wj = jnp.asarray(w, jnp.float32)
        _LINEAR_FNS[key] = lambda b: jnp.stack([-(b @ wj), b @ wj], axis=-1)
    return _LINEAR_FNS[key]


def _mixed_linf_p_a(c: float, sigma: float, k: float, d: int, w: np.ndarray, m: int):
    """P(w.z > -c) under MixedLinf by self-normalised importance sampling from N(0, sigma^2 I).

    The weight ||z||_inf^-k is the density ratio up to a constant; its second
    moment is finite for 2k < d. Returns (estimate, standard error).
    """
    rng = np.random.default_rng(11)
    z = rng.normal(scale=sigma, size=(m, d))
    weight = np.max(np.abs(z), axis=1) ** -k
    hit = (z @ w > -c).astype(np.float64)
    est = np.sum(weight * hit) / np.sum(weight)
    se = math.sqrt(np.sum(weight**2 * (hit - est) ** 2)) / np.sum(weight)
    return est, se


def test_mixed_linf_linear_sound():
    d, sigma, k, alpha = 4, 0.5, 1.0, 0.001
    family = noise.MixedLinf(sigma, k)
    w = np.ones(d) / 2.0  # unit l2 norm, l1 norm 2
    c = 0.2  # w.x: the l_inf distance to the boundary is c / ||w||_1 = 0.1
    linf_distance = c / np.sum(np.abs(w))
    x = (np.full(d, 0.5) + (c - 0.5 * np.sum(w)) * w).astype(np.float32)
    assert float(x @ w) == pytest.approx(c, abs=1e-6)
    p_a, se = _mixed_linf_p_a(c, sigma, k, d, w, 1_000_000)
    p_upper, p_low = p_a + 5 * se, p_a - 5 * se
    table = table_lib.radius_table(KEY, family, d, "linf", radii=np.linspace(0.0, 1.0, 101),
                                   n_samples=100_000, alpha_d=alpha / 2)
    assert float(table.radius(p_upper)) <= linf_distance  # the bound is sound here
    z_alpha = scipy.stats.norm.isf(alpha / 2)
    logits = _linear_fn(w)
    for n in (1_000, 100_000):
        cert = certify(KEY, logits, x, family, attack="linf", n=n, alpha=alpha,
                       batch_size=BATCH, table=table)
        assert cert.prediction == 1
        assert cert.radius <= float(table.radius(p_upper)) <= linf_distance
        # alpha_p = alpha - alpha_d: the Clopper-Pearson level is alpha / 2 here.
        # The sampler's total-variation bound (< 1e-5) is subtracted from the exact CP bound.
        cp = _cp_scipy(cert.count, n, alpha / 2)
        assert cp - 1e-5 <= cert.p_lower <= cp
        delta = (z_alpha + 4.0) * math.sqrt(p_a * (1 - p_a) / n)
        assert cert.radius >= float(table.radius(p_low - delta)), (n, cert)


def test_violation_share_within_alpha(tmp_path):
    """400 certifications at alpha = 0.05: violations match the exact Clopper-Pearson rate.

    Also checks the counts are Binomial(n, pA) (mean and variance), which they
    would not be if noise chunks were reused within an input.
    """
    rows, n, alpha, p_a = 400, 200, 0.05, 0.8
    x = np.tile(at_distance(SIGMA * scipy.stats.norm.ppf(p_a)), (rows, 1))
    cert = certify(KEY, linear16, x, noise.Gaussian(SIGMA), n=n, alpha=alpha, batch_size=BATCH,
                   table_dir=tmp_path, batched=True)
    assert cert.prediction.shape == (rows,) and np.all(cert.prediction == 1)
    share = np.mean(cert.p_lower > p_a)
    # Exact violation probability: counts whose scipy CP bound exceeds pA.
    counts = np.arange(n + 1)
    bad = np.array([_cp_scipy(c, n, alpha) > p_a for c in counts])
    rate = scipy.stats.binom.pmf(counts[bad], n, p_a).sum()
    assert rate <= alpha
    assert share <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / rows)
    assert abs(share - rate) <= 3 * math.sqrt(rate * (1 - rate) / rows)
    mean, var = n * p_a, n * p_a * (1 - p_a)
    assert abs(cert.count.mean() - mean) <= 4 * math.sqrt(var / rows)
    ratio = cert.count.var(ddof=1) / var
    dof = rows - 1
    assert scipy.stats.chi2.ppf(1e-4, dof) / dof <= ratio <= scipy.stats.chi2.ppf(1 - 1e-4, dof) / dof


# ----------------------------------------------------------------------------- edge classifiers


def test_abstains_on_coin_flip(gaussian_table):
    # On the boundary, sign(w.(x + z)) = sign(w.z): pA = 1/2 exactly.
    x = at_distance(0.0)
    cert = certify(KEY, linear16, x, noise.Gaussian(SIGMA), n=10_000, batch_size=BATCH,
                   table=gaussian_table)
    assert cert.prediction == -1 and cert.radius == 0.0 and cert.p_lower < 0.5
    assert predict(KEY, linear16, x, noise.Gaussian(SIGMA), n=10_000, batch_size=BATCH) == -1


def test_constant_classifier_gets_the_largest_radius(gaussian_table):
    n, alpha = 100_000, 0.001
    cert = certify(KEY, constant16, at_distance(0.0), noise.Gaussian(SIGMA), n=n, alpha=alpha,
                   batch_size=BATCH, table=gaussian_table)
    best = alpha ** (1.0 / n)
    assert cert.prediction == 2 and cert.count == n
    assert cert.p_lower <= best and cert.p_lower == pytest.approx(best, rel=1e-12)
    assert cert.radius == float(gaussian_table.radius(cert.p_lower))
    closed = SIGMA * scipy.stats.norm.ppf(best)  # Cohen et al.'s radius at the same p_lower
    assert closed - _grid_step(gaussian_table) <= cert.radius <= closed


# ----------------------------------------------------------------------------- protocol


def test_p_lower_uses_the_selected_class_and_fresh_samples(gaussian_table):
    """Selection on n0 samples of the first key half; count among n samples of the second."""
    x = np.zeros(D, np.float32)
    x[:3] = [0.10, 0.05, 0.0]
    family = noise.Gaussian(SIGMA)
    k_select, k_estimate = jax.random.split(KEY)
    c0 = np.asarray(class_counts(k_select, three_way, x, family, n=100, batch_size=BATCH))
    c = np.asarray(class_counts(k_estimate, three_way, x, family, n=5_000, batch_size=BATCH))
    assert c0.sum() == 100 and c.sum() == 5_000
    cert = certify(KEY, three_way, x, family, n0=100, n=5_000, alpha=0.01, batch_size=BATCH,
                   table=gaussian_table)
    top = int(np.argmax(c0))
    assert cert.count == c[top]
    assert cert.p_lower == pytest.approx(_cp_scipy(c[top], 5_000, 0.01), rel=1e-9)
    assert cert.prediction == (top if cert.p_lower >= 0.5 else -1)


def test_predict_matches_scipy_binomial_test():
    family = noise.Gaussian(SIGMA)
    x = np.zeros((4, D), np.float32)
    x[:, 0] = [0.0, 0.03, 0.3, 1.0]
    n, alpha = 1_000, 0.01
    got = predict(KEY, three_way, x, family, n=n, alpha=alpha, batch_size=BATCH, batched=True)
    assert got.shape == (4,) and got.dtype == np.int32
    decided = 0
    for i in range(4):
        counts = np.asarray(class_counts(jax.random.fold_in(KEY, i), three_way, x[i], family, n=n,
                                         batch_size=BATCH))
        order = np.argsort(-counts, kind="stable")
        n_a, n_b = counts[order[0]], counts[order[1]]
        pvalue = scipy.stats.binomtest(int(n_a), int(n_a + n_b), 0.5).pvalue
        want = int(order[0]) if pvalue <= alpha else -1
        assert got[i] == want, (i, counts, pvalue)
        decided += want != -1
    assert 0 < decided < 4  # both outcomes are exercised


def test_batched_rows_use_fold_in_keys(gaussian_table):
    x = np.stack([at_distance(0.2), at_distance(-0.3, seed=1), at_distance(0.05, seed=2)])
    family = noise.Gaussian(SIGMA)
    many = certify(KEY, linear16, x, family, n=3_000, batch_size=BATCH, table=gaussian_table,
                   batched=True)
    assert isinstance(many, Certificate)
    assert many.prediction.dtype == np.int32 and many.radius.dtype == np.float64
    assert many.p_lower.dtype == np.float64 and many.count.shape == (3,)
    assert many.prediction.tolist()[:2] == [1, 0]
    for i in range(3):
        one = certify(jax.random.fold_in(KEY, i), linear16, x[i], family, n=3_000,
                      batch_size=BATCH, table=gaussian_table)
        assert tuple(np.asarray(v).item() for v in one[:5]) == tuple(v[i].item() for v in many[:5])
        assert (one.alpha_p, one.alpha_d) == (many.alpha_p, many.alpha_d) == (0.001, 0.0)


def test_grouped_equals_per_row_bit_for_bit(gaussian_table, monkeypatch):
    """Rows sharing compiled calls (groups of 2 here: 3 calls, the last one padded) and forward
    batches give each row exactly its per-row certificate, and a second batch compiles nothing."""
    monkeypatch.setattr(counting, "GROUP", 2)
    x = np.stack([at_distance(s, seed=i) for i, s in enumerate((0.2, -0.3, 0.05, 0.0, 0.6))])
    family = noise.Gaussian(SIGMA)
    kw = dict(n0=120, n=1_234, batch_size=BATCH, table=gaussian_table)
    many = certify(KEY, linear16, x, family, batched=True, **kw)
    for i in range(len(x)):
        one = certify(jax.random.fold_in(KEY, i), linear16, x[i], family, **kw)
        assert tuple(np.asarray(v).item() for v in one[:5]) == tuple(v[i].item() for v in many[:5])
    traces, programs = len(TRACES), counting._count._cache_size()
    again = certify(jax.random.key(9), linear16, x[::-1] * 0.5, family, batched=True, **kw)
    assert len(TRACES) == traces and counting._count._cache_size() == programs
    assert again.count.shape == (5,)
    # A dataset's row indices: any group gives each row the certificate it gets alone.
    ids = certify(KEY, linear16, x[[3, 1]], family, batched=True, row_ids=np.array([3, 1]), **kw)
    assert ids.count.tolist() == many.count[[3, 1]].tolist()
    assert ids.p_lower.tolist() == many.p_lower[[3, 1]].tolist()
    with pytest.raises(ValueError, match="row_ids must be 2 integers"):
        certify(KEY, linear16, x[:2], family, batched=True, row_ids=[1], **kw)
    with pytest.raises(ValueError, match="row_ids needs batched=True"):
        certify(KEY, linear16, x[0], family, row_ids=[0], **kw)
    # predict groups its rows the same way.
    rows = predict(KEY, three_way, x, family, n=700, batch_size=BATCH, batched=True)
    assert rows.tolist() == [predict(jax.random.fold_in(KEY, i), three_way, x[i], family, n=700, batch_size=BATCH)
                             for i in range(len(x))]


def test_identical_across_batch_sizes(gaussian_table):
    """Noise for sample i does not depend on batching; n not a multiple of anything."""
    x = np.stack([at_distance(0.1), at_distance(-0.05, seed=3)])
    outs = [
        certify(KEY, linear16, x, noise.Gaussian(SIGMA), n=2_345, batch_size=b,
                table=gaussian_table, batched=True)
        for b in (100, 250, 1000)
    ]
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            np.testing.assert_array_equal(a, b)
    assert np.all(outs[0].count <= 2_345)
    counts = class_counts(KEY, linear16, x[0], noise.Gaussian(SIGMA), n=2_345, batch_size=250)
    assert int(np.sum(counts)) == 2_345  # the partial last chunk is counted exactly


@pytest.mark.parametrize("family, d", [(noise.L2Family(0.5, 4.0), 8), (noise.MixedLinf(0.5, 1.0), 4)])
def test_counts_identical_across_batch_sizes_other_families(family, d):
    w = np.ones(d) / math.sqrt(d)
    x = at_distance(0.05, w)
    a, b = (np.asarray(class_counts(KEY, _linear_fn(w), x, family, n=1_234, batch_size=bs))
            for bs in (100, 250))
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 1_234 and a.min() > 0


def test_no_recompile_for_a_second_input(gaussian_table):
    family = noise.Gaussian(SIGMA)
    certify(KEY, linear16, at_distance(0.1), family, n=1_000, batch_size=BATCH, table=gaussian_table)
    traces, programs = len(TRACES), counting._count._cache_size()
    cert = certify(jax.random.key(5), linear16, at_distance(0.3, seed=9), family, n=1_000,
                   batch_size=BATCH, table=gaussian_table)
    assert cert.prediction == 1
    assert len(TRACES) == traces  # linear16 was not traced again
    assert counting._count._cache_size() == programs


# ----------------------------------------------------------------------------- tables


def test_table_built_once_cached_and_stale_file_rebuilt(tmp_path, monkeypatch):
    family = noise.Gaussian(SIGMA)
    x = at_distance(0.4)
    first = certify(KEY, linear16, x, family, n=1_000, batch_size=BATCH, table_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("gaussian-d16-l2-")
    assert first.radius <= 0.4 and first.prediction == 1

    def no_build(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(table_lib, "radius_table", no_build)
    again = certify(KEY, linear16, x, family, n=1_000, batch_size=BATCH, table_dir=tmp_path)
    assert again == first
    monkeypatch.undo()

    # A file at that path built for other parameters is refused and rebuilt.
    other = table_lib.radius_table(None, noise.Gaussian(0.25), D, "l2",
                                   radii=table_lib.default_radii(family, D, "l2"))
    other.save(files[0])
    with pytest.warns(UserWarning, match="sigma"):
        rebuilt = certify(KEY, linear16, x, family, n=1_000, batch_size=BATCH, table_dir=tmp_path)
    assert rebuilt == first
    assert table_lib.RadiusTable.load(files[0]).metadata["sigma"] == SIGMA


def test_default_table_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SOAPBUBBLE_CACHE", str(tmp_path))
    assert cache_lib.default_table_dir() == tmp_path / "tables"
    monkeypatch.delenv("SOAPBUBBLE_CACHE")
    assert str(cache_lib.default_table_dir()).endswith(".cache/soapbubble/tables")


def test_mixed_linf_default_table_splits_alpha(tmp_path, monkeypatch):
    """Without a table, MixedLinf gets one with alpha_d = alpha / 2; p_lower uses alpha / 2."""
    built = []
    real = table_lib.radius_table

    def small_build(key, family, d, attack, **kwargs):
        built.append(kwargs)
        return real(key, family, d, attack, **{**kwargs, "n_samples": 20_000})

    monkeypatch.setattr(table_lib, "radius_table", small_build)
    d, w, alpha = 4, np.ones(4) / 2.0, 0.002
    x = np.full(d, 0.3, np.float32)
    cert = certify(KEY, _linear_fn(w), x, noise.MixedLinf(0.5, 1.0), attack="linf", n=1_000,
                   alpha=alpha, batch_size=BATCH, table_dir=tmp_path)
    assert len(built) == 1 and built[0]["alpha_d"] == pytest.approx(alpha / 2)
    cp = _cp_scipy(cert.count, 1_000, alpha / 2)  # less the sampler's TV bound (< 1e-5)
    assert cp - 1e-5 <= cert.p_lower <= cp and (cert.alpha_p, cert.alpha_d) == (alpha / 2, alpha / 2)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_sampling(monkeypatch):
    """Any sampling or table building fails the test: errors must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("sampling or table building started before the input was checked")

    monkeypatch.setattr(counting, "_count", boom)
    monkeypatch.setattr(table_lib, "radius_table", boom)


def _bad_shape_fns():
    return {
        "vector": lambda b: b[:, 0],
        "one class": lambda b: b[:, :1],
        "extra axis": lambda b: b[:, :4].reshape(b.shape[0], 2, 2),
        "wrong rows": lambda b: b[:2, :2],
    }


@pytest.mark.parametrize("case", list(_bad_shape_fns()))
def test_wrong_logits_shape_fails_fast(case, no_sampling, gaussian_table):
    fn = _bad_shape_fns()[case]
    with pytest.raises(ValueError, match="logits_fn"):
        certify(KEY, fn, at_distance(0.1), noise.Gaussian(SIGMA), table=gaussian_table)
    with pytest.raises(ValueError, match="logits_fn"):
        predict(KEY, fn, at_distance(0.1), noise.Gaussian(SIGMA))


def _bad_kwargs():
    x = at_distance(0.1)
    nan_x, inf_x = x.copy(), x.copy()
    nan_x[3], inf_x[5] = np.nan, -np.inf
    return {
        "nan": (dict(x=nan_x), "x must be finite"),
        "inf": (dict(x=inf_x), "x must be finite"),
        "size vs table d": (dict(x=x[:8]), "d=16"),
        "n < 1": (dict(n=0), "n must be >= 1"),
        "n0 < 1": (dict(n0=0), "n0 must be >= 1"),
        "n too large": (dict(n=2**31), "n must be <= 2147483647"),
        "n0 too large": (dict(n0=10**30), "n0 must be <= 2147483647"),
        "batch_size below a chunk": (dict(batch_size=10), "batch_size must be >= 50"),
        "alpha 0": (dict(alpha=0.0), r"alpha must be in \(0, 1\)"),
        "alpha 1": (dict(alpha=1.0), r"alpha must be in \(0, 1\)"),
        "alpha nan": (dict(alpha=float("nan")), r"alpha must be in \(0, 1\)"),
        "batch_size 0": (dict(batch_size=0), "batch_size must be >= 1"),
        "attack": (dict(attack="l1"), "attack must be"),
        "pure linf": (dict(noise=noise.PureLinf(0.5, 1.0), table=None), "pure l_inf"),
        "mixed l2": (dict(noise=noise.MixedLinf(0.5, 1.0), table=None), "l2 attack on the MixedLinf"),
        "table sigma": (dict(noise=noise.Gaussian(0.25)), "sigma"),
        "table family": (dict(noise=noise.L2Family(SIGMA, 1.0)), "family"),
        "table attack": (dict(attack="linf"), "attack"),
        "alpha below alpha_d": (dict(alpha=1e-4, table="mc"), "alpha_d"),
        "batched needs rows": (dict(batched=True), "batched=True"),
    }


@pytest.mark.parametrize("case", list(_bad_kwargs()))
def test_bad_input_fails_fast(case, gaussian_table, mc_table, no_sampling):
    changes, match = _bad_kwargs()[case]
    kwargs = dict(x=at_distance(0.1), noise=noise.Gaussian(SIGMA), table=gaussian_table,
                  batch_size=BATCH)
    kwargs.update(changes)
    if isinstance(kwargs["table"], str):
        kwargs["table"] = mc_table
    x, family = kwargs.pop("x"), kwargs.pop("noise")
    with pytest.raises(ValueError, match=match):
        certify(KEY, linear16, x, family, **kwargs)


@pytest.fixture(scope="module")
def mc_table(gaussian_table):
    """A table for Gaussian(SIGMA), d = 16, l2 that claims alpha_d = 1e-3 (as a Monte Carlo one)."""
    meta = {**gaussian_table.metadata, "route": "monte_carlo", "alpha_d": 1e-3}
    return table_lib.RadiusTable(gaussian_table.radii, gaussian_table.p_min, meta)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be >= 1"),
        (dict(n=2**31), "n must be <= 2147483647"),
        (dict(batch_size=49), "batch_size must be >= 50"),
        (dict(alpha=1.5), r"alpha must be in \(0, 1\)"),
        (dict(batch_size=-3), "batch_size must be >= 1"),
    ],
)
def test_predict_bad_input_fails_fast(kwargs, match, no_sampling):
    with pytest.raises(ValueError, match=match):
        predict(KEY, linear16, at_distance(0.1), noise.Gaussian(SIGMA), **kwargs)


def test_predict_rejects_nan(no_sampling):
    x = at_distance(0.1)
    x[0] = np.nan
    with pytest.raises(ValueError, match="x must be finite"):
        predict(KEY, linear16, x, noise.Gaussian(SIGMA))


def test_bad_types_fail_fast(no_sampling, gaussian_table):
    with pytest.raises(TypeError, match="floating"):
        certify(KEY, linear16, np.zeros(D, np.uint8), noise.Gaussian(SIGMA), table=gaussian_table)
    with pytest.raises(TypeError, match="noise"):
        certify(KEY, linear16, at_distance(0.1), "gaussian", table=gaussian_table)
    with pytest.raises(TypeError, match="n must be an int"):
        certify(KEY, linear16, at_distance(0.1), noise.Gaussian(SIGMA), n=1e5, table=gaussian_table)
    with pytest.raises(ValueError, match="key"):
        certify(jax.random.split(KEY, 2), linear16, at_distance(0.1), noise.Gaussian(SIGMA),
                table=gaussian_table)
    with pytest.raises(ValueError, match="k must be < d"):
        certify(KEY, linear16, at_distance(0.1), noise.L2Family(SIGMA, 16.0))


def _documented_counts(key, x, family, n, impl="auto"):
    """Counts of three_way from the module docstring's recipe, in numpy: chunk j is
    ``noise.sample(chunk_key(key, j), CHUNK, x.shape)``, rows past n dropped."""
    chunks = -(-n // counting.CHUNK)
    z = np.concatenate([
        np.asarray(family.sample(counting.chunk_key(key, j, impl), counting.CHUNK, x.shape))
        for j in range(chunks)
    ])[:n]
    return np.bincount(np.argmax((x + z)[:, :3], axis=-1), minlength=3)


@pytest.mark.parametrize("family", [noise.Gaussian(SIGMA), noise.MixedLinf(0.5, 1.0)])
def test_counts_follow_documented_chunk_keys(family):
    """class_counts draws exactly the documented noise (here with a partial last chunk)."""
    x = at_distance(0.05, seed=5)
    counts = np.asarray(class_counts(KEY, three_way, x, family, n=1_234, batch_size=BATCH))
    np.testing.assert_array_equal(counts, _documented_counts(KEY, x, family, 1_234))


def test_chunk_key_generators(monkeypatch):
    """'auto' is threefry4x32 where jax has it; without it, certify falls back to fold_in keys."""
    has_4x32 = "threefry4x32" in str(jax.random.key_impl(counting.chunk_key(KEY, 0)))
    assert has_4x32 == (counting._auto_impl() == "threefry4x32")
    assert str(jax.random.key_impl(counting.chunk_key(KEY, 0, None))) == str(
        jax.random.key_impl(KEY))
    with pytest.raises(ValueError, match="threefry2x32"):
        counting.chunk_key(KEY, 0, "threefry")
    # Older jax: a fresh classifier (a new program) traced with the fallback generator.
    monkeypatch.setattr(counting, "_auto_impl", lambda: None)
    x = at_distance(0.05, seed=6)
    fresh = lambda b: b[:, :3]  # noqa: E731
    counts = np.asarray(class_counts(KEY, fresh, x, noise.Gaussian(SIGMA), n=345, batch_size=BATCH))
    np.testing.assert_array_equal(counts, _documented_counts(KEY, x, noise.Gaussian(SIGMA), 345, None))


def _nan_beyond(b):
    """linear16, but NaN logits wherever the noise pushes coordinate 0 past 0.6 (a few % of samples)."""
    logits = linear16(b)
    return jnp.where(b[:, :1] > at_distance(0.3)[0] + 0.6, jnp.nan, logits)


def test_nonfinite_logits_never_certify(gaussian_table):
    x = at_distance(0.3)
    with pytest.raises(ValueError, match=r"non-finite logits \(NaN or inf\) on \d+ of 1100 noisy samples of row 0"):
        certify(KEY, _nan_beyond, x, noise.Gaussian(SIGMA), n=1_000, batch_size=BATCH, table=gaussian_table)
    inf_fn = lambda b: jnp.where(b[:, :1] > x[0] + 0.6, jnp.inf, linear16(b))  # noqa: E731
    with pytest.raises(ValueError, match="non-finite logits"):
        predict(KEY, inf_fn, x, noise.Gaussian(SIGMA), n=1_000, batch_size=BATCH)
    with pytest.raises(ValueError, match="non-finite logits"):
        class_counts(KEY, _nan_beyond, x, noise.Gaussian(SIGMA), n=1_000, batch_size=BATCH)


def _apply_linear(w, b):
    s = b @ w
    return jnp.stack([-s, s], axis=-1)


def test_pytree_classifier_new_weights_compile_nothing(gaussian_table):
    """A Partial's arrays are traced: new weights of the same shape reuse the compiled loop."""
    x = at_distance(0.4)
    w = jnp.asarray(W16, jnp.float32)
    first = certify(KEY, jax.tree_util.Partial(_apply_linear, w), x, noise.Gaussian(SIGMA), n=1_000,
                    batch_size=BATCH, table=gaussian_table)
    programs = counting._count._cache_size()
    flipped = certify(KEY, jax.tree_util.Partial(_apply_linear, -w), x, noise.Gaussian(SIGMA), n=1_000,
                      batch_size=BATCH, table=gaussian_table)
    assert counting._count._cache_size() == programs
    # The weights are not baked in: flipping them flips the certified class.
    assert (int(first.prediction), int(flipped.prediction)) == (1, 0)
    assert first.count == flipped.count


def test_batched_must_be_a_bool(gaussian_table):
    with pytest.raises(TypeError, match="batched must be True or False, got 1"):
        certify(KEY, linear16, at_distance(0.1)[None], noise.Gaussian(SIGMA), table=gaussian_table, batched=1)


def test_table_cache_key_holds_the_library_version(tmp_path, monkeypatch):
    """A table built by another release is never reused silently: it has another file."""
    import soapbubble

    cache_lib.cached_radius_table(noise.Gaussian(SIGMA), D, "l2", table_dir=tmp_path)
    monkeypatch.setattr(soapbubble, "__version__", "0.0.1-other")
    table = cache_lib.cached_radius_table(noise.Gaussian(SIGMA), D, "l2", table_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2 and table.metadata["soapbubble_version"] == "0.0.1-other"
    # A file whose recorded version differs from the running one is refused on load.
    path = next(p for p in tmp_path.glob("*.npz"))
    other = table_lib.RadiusTable.load(path)
    with pytest.raises(ValueError, match="soapbubble_version"):
        table_lib.RadiusTable.load(path, expected={"soapbubble_version": "another"})
    assert other.metadata["route"] == "closed_form"


def test_flax_nnx_module_is_a_classifier_with_traced_weights(gaussian_table):
    """flax nnx modules are pytrees: their parameters are traced, so new weights compile nothing."""
    from flax import nnx

    models = [nnx.Linear(D, 2, rngs=nnx.Rngs(0)) for _ in range(2)]
    for model, bias in zip(models, ([0.0, 1.0], [1.0, 0.0])):
        model.kernel.value = jnp.zeros((D, 2))
        model.bias.value = jnp.asarray(bias)
    x = at_distance(0.0)
    first = certify(KEY, models[0], x, noise.Gaussian(SIGMA), n=500, batch_size=BATCH, table=gaussian_table)
    programs = counting._count._cache_size()
    second = certify(KEY, models[1], x, noise.Gaussian(SIGMA), n=500, batch_size=BATCH, table=gaussian_table)
    assert counting._count._cache_size() == programs
    assert (int(first.prediction), int(second.prediction)) == (1, 0) and first.count == second.count == 500
