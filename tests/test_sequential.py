"""Sequential certification: soundness on classifiers with an exactly known pA, invariance, no recompiles.

The smoothed classifier of a linear base classifier 1{w.x > 0} under a symmetric
family predicts 1{w.x > 0}, and pA = P(w.z > -s) at signed distance s: the Gaussian
closed form Phi(s / sigma), the l2 family by quadrature (test_protocol's
``_l2_family_p_a``). Inputs placed just below a radius' threshold
(pA < p_min(r)) must be certified at r at a rate within alpha (binomial error).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats

from soapbubble import certify, certify_adaptive, certify_radii, noise, sequential
from soapbubble.bounds import confidence
from soapbubble.bounds import table as table_lib

from test_protocol import _l2_family_p_a, _mixed_linf_p_a

KEY = jax.random.key(20261130)
D = 8
W = np.ones(D) / math.sqrt(D)
WJ = jnp.asarray(W, jnp.float32)


def linear(b):
    s = b @ WJ
    return jnp.stack([-s, s], axis=-1)


def at(distances, seed=0):
    """Rows at the given signed distances from w.x = 0 (random orthogonal parts)."""
    base = np.random.default_rng(seed).uniform(0, 1, (len(distances), D))
    base -= np.outer(base @ W, W)
    return (base + np.outer(distances, W)).astype(np.float32)


def _false_rate_bound(alpha, trials):
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_log_mixture32_matches_float64_betaln():
    """The loop's float32 statistic against scipy's float64 beta-binomial mixture."""
    s = np.array([0, 1, 5, 49, 50, 900, 9_990, 99_000, 100_000, 16_000_000])
    t = np.array([50, 50, 50, 50, 50, 1_000, 10_000, 100_000, 100_000, 16_777_200])
    for q in (0.5, 0.9, 0.999, 0.999999):
        got = np.asarray(sequential.log_mixture32(jnp.asarray(s), jnp.asarray(t), jnp.asarray(q), jnp.asarray(1 - q)))
        want = (scipy.special.betaln(1 + s, 1 + t - s) - scipy.special.xlogy(s, q)
                - scipy.special.xlog1py(t - s, -q))
        np.testing.assert_allclose(got, want, atol=0.02, rtol=1e-5)


@pytest.mark.slow
def test_gaussian_just_below_thresholds_false_rate_within_alpha():
    sigma, alpha, radii = 0.5, 0.1, np.array([0.1, 0.25, 0.4])
    per = 120
    distances = np.repeat(radii - 0.005, per)  # pA = Phi(s / sigma) < Phi(r / sigma) = p_min(r)
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    c = certify_radii(KEY, linear, at(distances), noise.Gaussian(sigma), radii, max_n=4_000, alpha=alpha,
                      table=table, batch_size=500)
    assert np.all(c.prediction[c.prediction >= 0] == 1)
    for j in range(radii.size):
        rows = slice(j * per, (j + 1) * per)
        false = np.mean(c.certified[rows, j])
        assert false <= _false_rate_bound(alpha, per), (j, false)
        # The lower radii are true and mostly certified: the test is not vacuous.
        if j:
            assert np.mean(c.certified[rows, 0]) > 0.5


@pytest.mark.slow
def test_l2_family_just_below_thresholds_false_rate_within_alpha():
    sigma, k, alpha, radii = 0.5, 3.0, 0.1, np.array([0.15, 0.3])
    family = noise.L2Family(sigma, k)
    table = table_lib.radius_table(None, family, D, "l2", radii=np.linspace(0, 1.0, 201))
    q = sequential.thresholds(table, radii)
    # Distances whose exact pA (quadrature) is 0.002 below each threshold.
    distances = [scipy.optimize.brentq(lambda s, qq=qq: _l2_family_p_a(s, sigma, k, D) - (qq - 0.002), 1e-4, 1.5)
                 for qq in q]
    per = 100
    c = certify_radii(KEY, linear, at(np.repeat(distances, per), seed=1), family, radii, max_n=4_000, alpha=alpha,
                      table=table, batch_size=500)
    for j in range(radii.size):
        false = np.mean(c.certified[j * per:(j + 1) * per, j])
        assert false <= _false_rate_bound(alpha, per), (j, false)


@pytest.mark.slow
def test_mixed_linf_just_below_thresholds_false_rate_within_alpha():
    """Low dimension (d = 4): pA of a linear classifier by importance sampling (fixed seed, its
    standard error se); inputs placed 5 se below a Monte Carlo table's threshold."""
    d, sigma, k, alpha = 4, 0.5, 1.0, 0.1
    family = noise.MixedLinf(sigma, k)
    w = np.ones(d) / 2.0  # ||w||_1 = 2: l_inf distance = (w.x) / 2
    wj = jnp.asarray(w, jnp.float32)
    f = lambda b: jnp.stack([-(b @ wj), b @ wj], axis=-1)  # noqa: E731
    table = table_lib.radius_table(jax.random.key(3), family, d, "linf", radii=np.linspace(0, 0.4, 81),
                                   n_samples=200_000, alpha_d=alpha / 2)
    radius = np.array([0.1])
    q = float(sequential.thresholds(table, radius)[0])
    # w.x = c: pA(c) = P(w.z > -c) increases in c (the same fixed-seed samples at every c), so
    # bisect for the largest c with pA + 5 se < q.
    upper = lambda c: sum(_mixed_linf_p_a(c, sigma, k, d, w, 200_000) * np.array([1.0, 5.0]))  # noqa: E731
    lo, hi = 0.0, 1.0
    for _ in range(14):
        lo, hi = ((lo + hi) / 2, hi) if upper((lo + hi) / 2) < q else (lo, (lo + hi) / 2)
    c = lo
    assert upper(c) < q and c > 0.05
    rows = 120
    base = np.random.default_rng(5).uniform(0, 1, (rows, d))
    base -= np.outer(base @ w, w) / (w @ w)
    xs = (base + c * w / (w @ w)).astype(np.float32)
    out = certify_radii(KEY, f, xs, family, radius, attack="linf", max_n=4_000, alpha=alpha, table=table,
                        batch_size=500)
    assert np.all(out.prediction[out.prediction >= 0] == 1)
    assert np.mean(out.certified[:, 0]) <= _false_rate_bound(alpha / 2, rows)


def test_decisions_match_fixed_n_and_spend_less():
    """Far from the thresholds both routes agree; the sequential one stops early."""
    sigma, radii = 0.5, np.array([0.25, 0.5, 0.75])
    distances = np.array([1.5, 0.6, 0.35, 0.1, -0.9, 0.0])
    xs = at(distances)
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    seq = certify_radii(KEY, linear, xs, noise.Gaussian(sigma), radii, max_n=50_000, table=table)
    fixed = certify(KEY, linear, xs, noise.Gaussian(sigma), n=50_000, table=table, batched=True)
    want = np.abs(distances)[:, None] >= radii[None, :] + 0.1  # the exact radius is |distance|
    assert np.array_equal(seq.certified, want)
    assert np.array_equal(fixed.radius[:, None] >= radii[None, :], want)
    assert seq.prediction.tolist() == fixed.prediction.tolist() == [1, 1, 1, 1, 0, -1]
    assert seq.n_used[0] < 1_000 and seq.n_used[4] < 1_000  # decided at once
    assert np.all(seq.n_used <= 50_000)
    # Never above the exact radius (the distance): sound at every row.
    assert not np.any(seq.certified & (radii[None, :] > np.abs(distances)[:, None]))


def test_identical_for_any_pool_and_batch_size():
    sigma, radii = 0.5, np.array([0.1, 0.3])
    xs = at(np.array([0.35, 0.12, 0.31, -0.2, 0.05, 0.6, 0.29]), seed=2)
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    runs = [certify_radii(KEY, linear, xs, noise.Gaussian(sigma), radii, max_n=6_000, table=table, batch_size=b)
            for b in (50, 150, 1000)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_samples_are_certifys_samples():
    """Estimation chunk j of input i is certify's: at the stop, the counts are certify's at n = n_used."""
    sigma = 0.5
    xs = at(np.array([0.02, -0.03]))  # pA ~ 0.52: nothing certified, stopped by futility
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    seq = certify_radii(KEY, linear, xs, noise.Gaussian(sigma), np.array([0.5]), max_n=3_000, table=table)
    assert not seq.certified.any() and np.all(seq.prediction == -1)
    for i in range(2):
        n = int(seq.n_used[i])
        fixed = certify(jax.random.fold_in(KEY, i), linear, xs[i], noise.Gaussian(sigma), n=n, table=table)
        assert seq.p_lower[i] == pytest.approx(float(confidence.mixture_lower(fixed.count, n, 0.001)), rel=1e-12)


def test_no_recompilation_for_new_inputs_rows_or_radii_values():
    sigma = 0.5
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    run = lambda xs, radii: certify_radii(KEY, linear, xs, noise.Gaussian(sigma), radii, max_n=500,  # noqa: E731
                                          table=table, batch_size=100)
    run(at(np.array([0.3, 0.1, 0.2])), np.array([0.1, 0.2]))
    programs = sequential._run._cache_size()
    run(at(np.array([0.5, -0.1, 0.2, 0.05]), seed=5), np.array([0.15, 0.4]))  # same bucket of rows
    run(at(np.array([0.5, 0.2, 0.3]), seed=6), np.array([0.0, 0.3]))
    assert sequential._run._cache_size() == programs


def test_pytree_classifier_new_weights_no_recompilation():
    sigma = 0.5
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    apply = lambda w, b: jnp.stack([-(b @ w), b @ w], axis=-1)  # noqa: E731
    xs = at(np.array([0.4, 0.3]))
    a = certify_radii(KEY, jax.tree_util.Partial(apply, WJ), xs, noise.Gaussian(sigma), np.array([0.1]),
                      max_n=500, table=table, batch_size=100)
    programs = sequential._run._cache_size()
    b = certify_radii(KEY, jax.tree_util.Partial(apply, -WJ), xs, noise.Gaussian(sigma), np.array([0.1]),
                      max_n=500, table=table, batch_size=100)
    assert sequential._run._cache_size() == programs
    assert a.prediction.tolist() == [1, 1] and b.prediction.tolist() == [0, 0]


def test_adaptive_radius_is_sound_and_close():
    sigma, tol = 0.5, 0.05
    distances = np.array([0.9, 0.45, 0.2])
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    c = certify_adaptive(KEY, linear, at(distances), noise.Gaussian(sigma), tol=tol, max_n=200_000, table=table)
    assert c.prediction.tolist() == [1, 1, 1]
    assert np.all(c.radius <= distances)
    # Stopped once the radius could not grow by tol: within tol (plus the bound's slack at the
    # samples spent, read from the exact CP bound at those counts) of what more samples give.
    assert np.all(c.n <= 200_000) and np.all(c.n < 200_000)
    assert np.all(c.radius >= distances - 0.35)
    assert np.all(c.count <= c.n)


@pytest.fixture
def no_loop(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the loop started before the arguments were checked")

    monkeypatch.setattr(sequential, "_run", boom)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(radii=np.array([0.3, 0.1])), ValueError, "radii must be strictly increasing"),
        (dict(radii=np.array([-0.1, 0.2])), ValueError, "radii must be finite and >= 0"),
        (dict(radii=np.array([0.1, np.nan])), ValueError, "radii must be finite and >= 0"),
        (dict(radii=np.array([[0.1]])), ValueError, "radii must be a non-empty 1-D array"),
        (dict(max_n=0), ValueError, "max_n must be >= 1"),
        (dict(max_n=2**25), ValueError, "max_n must be <= 16777216"),
        (dict(xs=np.zeros(D, np.float32)), ValueError, r"x must have shape \(rows, \*input_shape\)"),
        (dict(noise=noise.Gaussian(0.25)), ValueError, "table was built for sigma"),
        (dict(batch_size=10), ValueError, "batch_size must be >= 50"),
        (dict(alpha=0.0), ValueError, r"alpha must be in \(0, 1\)"),
    ],
)
def test_bad_input_before_any_work(kwargs, error, match, no_loop):
    table = table_lib.radius_table(None, noise.Gaussian(0.5), D, "l2")
    args = dict(xs=at(np.array([0.1])), noise=noise.Gaussian(0.5), radii=np.array([0.1]))
    args.update(kwargs)
    xs, family, radii = args.pop("xs"), args.pop("noise"), args.pop("radii")
    with pytest.raises(error, match=match):
        certify_radii(KEY, linear, xs, family, radii, table=table, **args)


def test_row_ids_make_grouping_irrelevant():
    """Row i with row_ids draws with fold_in(key, row_ids[i]): any split into calls gives the same rows."""
    sigma, radii = 0.5, np.array([0.1, 0.3])
    xs = at(np.array([0.35, 0.12, 0.31, -0.2, 0.05]), seed=4)
    table = table_lib.radius_table(None, noise.Gaussian(sigma), D, "l2")
    run = lambda rows, ids: certify_radii(KEY, linear, xs[rows], noise.Gaussian(sigma), radii,  # noqa: E731
                                          max_n=4_000, table=table, batch_size=100, row_ids=ids)
    whole = run(slice(None), None)
    head, tail = run(slice(0, 2), np.array([0, 1])), run(slice(2, 5), np.array([2, 3, 4]))
    for a, b, c in zip(whole[:4], head[:4], tail[:4]):
        np.testing.assert_array_equal(np.asarray(a), np.concatenate([np.asarray(b), np.asarray(c)]))
    with pytest.raises(ValueError, match="row_ids must be 2 integers"):
        run(slice(0, 2), np.array([0.0, 1.0]))
