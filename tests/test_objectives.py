"""soapbubble.objectives: the differentiable smoothed radius against finite differences and closed forms.

The finite-difference checks run in float64 (``jax.enable_x64``) with common random
numbers: every evaluation uses the same key, hence the same noise, so the objective
is a smooth deterministic function of the parameters and of the input.

Tolerance of a central difference ``D(h) = (f(v + h e) - f(v - h e)) / 2h``, per
coordinate: truncation ``h^2 f''' / 6 + O(h^4)``, estimated by Richardson from
``D(2h) - D(h) = 3 h^2 f''' / 6 + O(h^4)`` and taken twice (``2 |D(2h) - D(h)| / 3``),
plus roundoff ``delta / h`` with ``delta = 256 ulp * max(|f|, 1)`` bounding the
float64 evaluation error of ``f`` (a few hundred operations, each within an ulp or
a few). With ``h = 1e-5`` that is ~6e-9, roundoff-dominated; the observed errors are
1e-11 to 7e-10, and the gradients 1e-3 to 1 (each test also checks that the
tolerance stays below 1e-5 of the gradient's scale, so it cannot pass vacuously).

Three checks per family, for the parameters and for the input:
1. the soft probability ``p``: autodiff against ``D(h)``;
2. the chain rule: autodiff of the radius against ``R'(p) * D_p(h)``, with ``R'``
   computed independently (scipy's ``sigma / phi(Phi^-1(p))`` for the closed form,
   ``1 / s(R)`` from the table's arrays in numpy otherwise);
3. the radius against its own ``D(h)``. A tabulated radius is by definition linear
   in ``p`` on each grid cell (slope: the cell's chord), while its derivative is the
   implicit-function-theorem slope ``R'(p) = 1 / s(R)`` (``s``: central differences
   of ``p_min`` interpolated at ``R``; continuous in ``p``). So ``D(h)`` is multiplied
   by the known ratio ``R'(p) / chord`` (1 for the closed form; within 5% of 1 for
   the tables here), after checking that the stencil stays inside one cell.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from soapbubble import noise, objectives
from soapbubble.bounds.table import radius_table

D, H, C = 12, 8, 3  # input dimension, hidden units, classes
SIGMA, K = 0.5, 4.0
BETA, N = 4.0, 16
SEED = 1  # the problem's draws: a point where p is in (0.6, 0.99) for the three families
NOISE_KEY = jax.random.key(5)
H_FD = 1e-5
ROUNDOFF_ULPS = 256  # bound on the float64 evaluation error of the objective, in ulps of max(|f|, 1)
ULP = np.finfo(np.float64).eps


def mlp(params, batch):
    """A 2-layer tanh MLP on flattened inputs: (n, *shape) -> (n, C)."""
    hidden = jnp.tanh(batch.reshape(batch.shape[0], -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def mlp_numpy(params, batch):
    hidden = np.tanh(batch.reshape(batch.shape[0], -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def make_problem(dtype):
    """Parameters and one 3x4 "image" (numpy draws: no eager jax compilations)."""
    rng = np.random.default_rng(SEED)
    params = {
        "w1": rng.standard_normal((D, H)) / math.sqrt(D),
        "b1": 0.1 * rng.standard_normal(H),
        "w2": 2.0 * rng.standard_normal((H, C)) / math.sqrt(H),
        "b2": 0.1 * rng.standard_normal(C),
    }
    x = rng.uniform(size=(3, 4))
    return {k: jnp.asarray(v, dtype) for k, v in params.items()}, jnp.asarray(x, dtype)


@pytest.fixture(scope="module")
def tables():
    """family name -> (family, table). Small grids keep the exact and Monte Carlo builds to ~1 s each."""
    gauss = noise.Gaussian(SIGMA)
    l2 = noise.L2Family(SIGMA, K)
    mixed = noise.MixedLinf(SIGMA, K)
    return {
        "gaussian": (gauss, radius_table(None, gauss, D, "l2")),
        "l2_family": (l2, radius_table(None, l2, D, "l2", radii=np.linspace(0.0, 3.0 * SIGMA, 121))),
        "mixed_linf": (mixed, radius_table(jax.random.key(0), mixed, D, "linf", radii=np.linspace(0.0, 0.3, 61),
                                           n_samples=20_000)),
    }


def _inverse_pieces(table):
    """smooth_radius's documented pieces, in numpy: strictly increasing finite (p_min, r) and the IFT slope."""
    finite = np.isfinite(table.p_min)
    pm, rr = table.p_min[finite], table.radii[finite]
    keep = np.concatenate([[True], np.diff(pm) > 0])
    pm, rr = pm[keep], rr[keep]
    return pm, rr, np.gradient(pm, rr)


def radius_derivative(table, p):
    """dR/dp at p in numpy/scipy: sigma_eff / phi(Phi^-1(p)) (closed form) or 1 / s(R) (tables)."""
    meta = table.metadata
    if meta["route"] == "closed_form":
        sigma_eff = meta["sigma"] / (math.sqrt(meta["d"]) if meta["attack"] == "linf" else 1.0)
        return sigma_eff / scipy.stats.norm.pdf(scipy.stats.norm.ppf(p))
    pm, rr, slope = _inverse_pieces(table)
    return 1.0 / np.interp(np.interp(p, pm, rr), rr, slope)


def interpolant_slope(table, ps):
    """dR/dp of the value smooth_radius computes, on the cell of p_min holding all of ``ps``.

    The closed form is smooth: its slope is R'(p). A table's value is the linear
    interpolant, whose slope on cell j is the chord (r[j+1] - r[j]) / (p[j+1] - p[j]).
    """
    if table.metadata["route"] == "closed_form":
        return radius_derivative(table, ps[0])
    pm, rr, _ = _inverse_pieces(table)
    cells = np.unique(np.searchsorted(pm, ps) - 1)
    assert cells.size == 1, "the finite-difference stencil crosses a grid node of the table"
    j = int(cells[0])
    return (rr[j + 1] - rr[j]) / (pm[j + 1] - pm[j])


def fd_check_data(f, v, h):
    """f at v, its Jacobian by autodiff, and the central differences D(h), D(2h) along every coordinate.

    f maps the flat vector v to a vector of outputs; all evaluations are one vmapped,
    compiled call (rows v, v +- h e_i, v +- 2h e_i).
    """
    eye = jnp.eye(v.size, dtype=v.dtype)
    rows = jnp.concatenate([v[None], v + h * eye, v - h * eye, v + 2 * h * eye, v - 2 * h * eye])
    values, jacobian = jax.jit(lambda rows, v: (jax.vmap(f)(rows), jax.jacrev(f)(v)))(rows, v)  # one compilation
    values, jacobian = np.asarray(values), np.asarray(jacobian).T  # jacobian: (n, outputs)
    n = v.size
    plus, minus, plus2, minus2 = (values[1 + i * n: 1 + (i + 1) * n] for i in range(4))
    return values[0], values[1:], jacobian, (plus - minus) / (2 * h), (plus2 - minus2) / (4 * h)


@pytest.fixture(scope="module")
def float64_runs(tables):
    """name -> (n_params, f0, values, jacobian, D(h), D(2h)) of the float64 objective in (params, x).

    The outputs are (p, radius, label, *probs); one compilation per family, shared by the tests.
    """
    cache = {}

    def run(name):
        if name not in cache:
            family, table = tables[name]
            with jax.enable_x64(True):
                params, x = make_problem(jnp.float64)
                flat, unravel = ravel_pytree(params)

                def f(v):
                    out = objectives.smoothed_radius(NOISE_KEY, Partial(mlp, unravel(v[:flat.size])),
                                                     v[flat.size:].reshape(x.shape), family, table,
                                                     n=N, beta=BETA)
                    return jnp.concatenate([jnp.stack([out.p, out.radius, out.label.astype(v.dtype)]), out.probs])

                cache[name] = (flat.size, *fd_check_data(f, jnp.concatenate([flat, x.ravel()]), H_FD))
        return cache[name]

    return run


@pytest.mark.parametrize("name", ["gaussian", "l2_family", "mixed_linf"])
def test_gradients_match_central_differences(tables, float64_runs, name):
    _, table = tables[name]
    n_params, f0, values, jac, d1, d2 = float64_runs(name)
    p0 = float(f0[0])
    # The point must be inside the table's smooth range (or every gradient is 0), with one
    # top class at every evaluation.
    pm, _, _ = _inverse_pieces(table)
    assert pm[0] < p0 < pm[-1] and 0.6 < p0 < 0.99, (name, p0, pm[0], pm[-1])
    assert np.all(values[:, 2] == f0[2])
    delta = ROUNDOFF_ULPS * ULP * np.maximum(np.abs(f0[:2]), 1.0)
    tol = 2 * np.abs(d2 - d1)[:, :2] / 3 + delta / H_FD  # (coordinates, [p, radius])
    slope = radius_derivative(table, p0)  # what autodiff must use
    ratio = slope / interpolant_slope(table, np.concatenate([[p0], values[:, 0]]))  # 1 for the closed form
    for wrt, part in (("params", slice(0, n_params)), ("x", slice(n_params, None))):
        grad_p, grad_r = jac[part, 0], jac[part, 1]
        fd_p, fd_r, tol_p, tol_r = d1[part, 0], d1[part, 1], tol[part, 0], tol[part, 1]
        scale_p, scale_r = np.abs(grad_p).max(), np.abs(grad_r).max()
        assert scale_p > 1e-3 and scale_r > 1e-3, (name, wrt)
        assert tol_p.max() < 1e-5 * scale_p and tol_r.max() < 1e-5 * scale_r, (name, wrt)  # not vacuous
        # 1. The soft probability: autodiff against central differences.
        np.testing.assert_array_less(np.abs(grad_p - fd_p), tol_p, err_msg=f"{name} dp/d{wrt}")
        # 2. Chain rule: dR = R'(p) dp, R' computed independently (scipy / the table's arrays).
        np.testing.assert_array_less(np.abs(grad_r - slope * fd_p), slope * tol_p + 1e-9 * scale_r,
                                     err_msg=f"{name} chain rule d{wrt}")
        # 3. The radius against its own central differences, times the known ratio of the IFT
        #    slope to the interpolant's (1 for the closed form).
        np.testing.assert_array_less(np.abs(grad_r - ratio * fd_r), ratio * tol_r + 1e-9 * scale_r,
                                     err_msg=f"{name} dR/d{wrt}")
    if name == "gaussian":
        assert ratio == 1.0
    else:  # the two slopes differ by O(grid step) only
        assert abs(ratio - 1) < 0.05, (name, ratio)


def test_gaussian_radius_is_sigma_phi_inverse_of_the_soft_probability(tables, float64_runs):
    """Independent route: numpy MLP and softmax on the same noise, scipy's norm.ppf."""
    family, table = tables["gaussian"]
    _, f0, *_ = float64_runs("gaussian")  # (p, radius, label, *probs) from smoothed_radius, float64
    with jax.enable_x64(True):
        params, x = make_problem(jnp.float64)
        z = np.asarray(family.sample(NOISE_KEY, N, x.shape, jnp.float64))  # the documented draw
        shapes = jax.eval_shape(lambda: objectives.smoothed_radius(NOISE_KEY, Partial(mlp, params), x, family, table))
    logits = mlp_numpy({k: np.asarray(v) for k, v in params.items()}, np.asarray(x)[None] + z)
    e = np.exp(BETA * (logits - logits.max(axis=1, keepdims=True)))
    probs = (e / e.sum(axis=1, keepdims=True)).mean(axis=0)
    label = int(np.argmax(probs))
    assert int(f0[2]) == label
    # float64 throughout: a few ulps (1e-12); scipy's and jax's ndtri agree to ~1e-15 relative.
    np.testing.assert_allclose(f0[3:], probs, rtol=1e-12)
    np.testing.assert_allclose(f0[0], probs[label], rtol=1e-12)
    np.testing.assert_allclose(f0[1], SIGMA * scipy.stats.norm.ppf(probs[label]), rtol=1e-10)
    # The l_inf table of the Gaussian (Theorem 3): sigma / sqrt(d) * Phi^-1(p).
    linf_table = radius_table(None, family, D, "linf")
    with jax.enable_x64(True):
        linf = jax.jit(lambda z: objectives.radius_from_logits(z, linf_table, beta=BETA))(jnp.asarray(logits))
    np.testing.assert_allclose(float(linf.radius), SIGMA / math.sqrt(D) * scipy.stats.norm.ppf(probs[label]),
                               rtol=1e-10)
    # Shapes and dtypes of one input's SmoothedRadius, float64 under x64.
    assert (shapes.probs.shape, shapes.label.shape, shapes.p.shape, shapes.radius.shape) == ((C,), (), (), ())
    assert shapes.probs.dtype == shapes.p.dtype == shapes.radius.dtype == jnp.float64
    assert shapes.label.dtype == jnp.int32


def test_l2_family_at_k0_is_close_to_the_gaussian(tables):
    """Same logits through the exact k = 0 table and the closed form: values and gradients.

    Linear inversion of p_min(r) = Phi(r / sigma) between grid radii errs by at most
    dr^2 / 8 * max |p''| / p' = dr^2 / 8 * r_max / sigma^2 in r (plus the table's
    quadrature error, < 1e-12); the IFT slope (central differences of p_min,
    interpolated) errs by O(dr^2) relative: dr^2 (1/6 + 1/8) max |r^2 / sigma^2 - 1| / sigma^2.
    Both are doubled for the comparison.
    """
    radii = np.linspace(0.0, 3.0 * SIGMA, 121)
    dr = radii[1] - radii[0]
    _, gauss = tables["gaussian"]
    exact = radius_table(None, noise.L2Family(SIGMA, 0.0), D, "l2", radii=radii)
    # 32 inputs x N copies, class 0 ahead: soft probabilities of class 0 spread over (0.5, 1).
    logits = np.random.default_rng(3).standard_normal((32, N, C))
    logits[..., 0] += np.linspace(0.5, 4.0, 32)[:, None]
    with jax.enable_x64(True):
        def radii_and_grads(z):
            def total(z, t):
                out = objectives.radius_from_logits(z, t, beta=1.0, label=jnp.zeros(32, jnp.int32))
                return jnp.sum(out.radius), out
            return [jax.value_and_grad(total, has_aux=True)(z, t) for t in (gauss, exact)]

        ((_, g), grad_g), ((_, e), grad_e) = jax.jit(radii_and_grads)(jnp.asarray(logits, jnp.float64))
    r = np.asarray(g.radius)
    inside = (np.asarray(g.p) > 0.5 + 1e-3) & (r < radii[-2])  # within the k = 0 table's range
    assert inside.sum() >= 20
    r_max = r[inside].max() + dr
    value_tol = dr**2 / 8 * r_max / SIGMA**2 + 1e-12
    np.testing.assert_allclose(np.asarray(e.radius)[inside], r[inside], rtol=0, atol=2 * value_tol)
    slope_rtol = dr**2 * (1 / 6 + 1 / 8) * max(abs(r_max**2 / SIGMA**2 - 1), 1.0) / SIGMA**2
    ge, gg = np.asarray(grad_e)[inside], np.asarray(grad_g)[inside]
    np.testing.assert_allclose(ge, gg, rtol=0, atol=2 * slope_rtol * np.abs(gg).max())
    assert slope_rtol < 2e-3 and value_tol < 1e-4  # the comparison is a meaningful one


def test_batches_by_vmap_and_params_first_wrapper(tables):
    family, table = tables["gaussian"]  # the cheapest sampler to compile: these are mechanics
    params, _ = make_problem(jnp.float32)
    xs = jnp.asarray(np.random.default_rng(8).uniform(size=(5, 3, 4)), jnp.float32)
    ys = jnp.array([0, 1, 2, 0, 1])
    keys = jax.random.split(NOISE_KEY, 5)
    logits_fn = Partial(mlp, params)
    out = jax.jit(jax.vmap(lambda k, x, y: objectives.smoothed_radius(k, logits_fn, x, family, table, label=y)))(
        keys, xs, ys)
    assert out.probs.shape == (5, C) and out.radius.shape == (5,) and out.label.shape == (5,)
    assert out.radius.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.label), np.asarray(ys))
    # Row by row (jit of the function itself: table and options static, logits_fn a Partial pytree)
    # the batched values come back (float32 rounding: 1e-5).
    jitted = jax.jit(objectives.smoothed_radius, static_argnames=("table", "n", "beta", "p_clip"))
    for i in range(5):
        one = jitted(keys[i], logits_fn, xs[i], family, table, label=ys[i])
        np.testing.assert_allclose(np.asarray(one.probs), np.asarray(out.probs[i]), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(one.radius), float(out.radius[i]), rtol=1e-5, atol=1e-7)
    # The params-first wrapper: value, and gradients w.r.t. the params pytree equal to those
    # w.r.t. the Partial's leaves (one compilation for both).
    fn = objectives.smoothed_radius_fn(mlp, family, table)

    def both(params, logits_fn):
        value, grads = jax.value_and_grad(lambda p: fn(p, keys[1], xs[1], ys[1]).radius)(params)
        via_partial = jax.grad(lambda f: objectives.smoothed_radius(keys[1], f, xs[1], family, table,
                                                                    label=ys[1]).radius)(logits_fn)
        return value, grads, via_partial

    value, grads, via_partial = jax.jit(both)(params, logits_fn)
    np.testing.assert_allclose(float(value), float(out.radius[1]), rtol=1e-5, atol=1e-7)
    assert isinstance(via_partial, Partial)
    for name in params:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(via_partial.args[0][name]),
                                   rtol=1e-5, atol=1e-6)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in grads.values())


def test_out_of_range_probabilities_are_clamped_with_zero_gradient(tables):
    _, l2_table = tables["l2_family"]
    _, gauss_table = tables["gaussian"]
    pm, rr, _ = _inverse_pieces(l2_table)

    def radius_and_grad(table):
        def radius(q):  # two noisy copies whose softmax (beta = 1) gives probability q to class 0
            row = jnp.log(jnp.stack([q, (1 - q) / 2, (1 - q) / 2]))
            return objectives.radius_from_logits(jnp.stack([row, row]), table, beta=1.0, label=0).radius
        return jax.jit(jax.vmap(jax.value_and_grad(radius)))

    q_hi = min(1 - 1e-5, float(pm[-1]) + 1e-4)
    r, g = map(np.asarray, radius_and_grad(l2_table)(jnp.array([q_hi, 0.4, 0.8], jnp.float32)))
    assert np.float32(q_hi) > pm[-1]
    # Above the table's last finite threshold: its largest finite radius, gradient 0.
    assert r[0] == pytest.approx(rr[-1], rel=1e-6) and g[0] == 0.0
    # Below p_min(0) ~ 1/2 (here a class that is not the top one): radius 0, gradient 0.
    assert r[1] == 0.0 and g[1] == 0.0
    assert 0 < r[2] < rr[-1] and g[2] > 0
    # Closed form: p beyond 1 - p_clip is clipped (finite radius, gradient 0); inside, sigma / phi(Phi^-1(p)).
    r, g = map(np.asarray, radius_and_grad(gauss_table)(jnp.array([1 - 1e-7, 0.8], jnp.float32)))
    clip = float(np.float32(1 - 1e-6))
    assert r[0] == pytest.approx(SIGMA * scipy.stats.norm.ppf(clip), rel=1e-4) and g[0] == 0.0  # float32 ndtri
    assert g[1] == pytest.approx(SIGMA / scipy.stats.norm.pdf(scipy.stats.norm.ppf(0.8)), rel=1e-4)
    # p ~ 0 for the given label: finite gradients (no inf * 0 in a downstream hinge).
    g0 = jax.jit(jax.grad(lambda z: objectives.radius_from_logits(z, gauss_table, beta=16.0, label=1).radius))(
        jnp.array([[50.0, -50.0, 0.0]] * 2))
    assert np.isfinite(np.asarray(g0)).all()


def test_bad_arguments(tables):
    family, table = tables["l2_family"]
    params, x = make_problem(jnp.float32)
    f = Partial(mlp, params)
    with pytest.raises(ValueError, match="k=4.0"):
        objectives.smoothed_radius(NOISE_KEY, f, x, noise.L2Family(SIGMA, 2.0), table)
    with pytest.raises(ValueError, match="family 'l2_family'|family"):
        objectives.smoothed_radius(NOISE_KEY, f, x, noise.Gaussian(SIGMA), table)
    with pytest.raises(ValueError, match="d=12"):
        objectives.smoothed_radius(NOISE_KEY, f, jnp.zeros((4, 4)), family, table)
    with pytest.raises(ValueError, match="sigma"):
        objectives.smoothed_radius(NOISE_KEY, f, x, noise.L2Family(0.7, K), table)
    with pytest.raises(TypeError, match="RadiusTable"):
        objectives.smoothed_radius(NOISE_KEY, f, x, family, table.p_min)
    with pytest.raises(ValueError, match="beta"):
        objectives.smoothed_radius(NOISE_KEY, f, x, family, table, beta=0.0)
    with pytest.raises(ValueError, match="p_clip"):
        objectives.radius_from_logits(jnp.zeros((2, 3)), table, p_clip=0.5)
    with pytest.raises(ValueError, match="n must be"):
        objectives.smoothed_radius(NOISE_KEY, f, x, family, table, n=0)
