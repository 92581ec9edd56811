"""The families as pytrees, their transforms, determinism and every error case."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soapbubble import noise

KEY = jax.random.key(0)
FAMILIES = [noise.Gaussian(0.5), noise.L2Family(0.5, 5.0), noise.MixedLinf(0.5, 5.0), noise.PureLinf(0.5, 5.0)]
IDS = [type(f).__name__ for f in FAMILIES]


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_shapes_dtype_and_determinism(family):
    z = family.sample(KEY, 7, (2, 3, 4))
    assert z.shape == (7, 2, 3, 4) and z.dtype == jnp.float32
    np.testing.assert_array_equal(z, family.sample(KEY, 7, (2, 3, 4)))
    assert not np.array_equal(z, family.sample(jax.random.key(1), 7, (2, 3, 4)))
    assert family.log_density(z, event_ndim=3).shape == (7,)
    assert family.sample_radius(KEY, 5, 24).shape == (5,)
    assert bool(jnp.all(jnp.isfinite(z)))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_jit_takes_the_family_as_an_argument(family):
    f = jax.jit(lambda key, fam: fam.sample(key, 9, (12,)), static_argnums=())
    np.testing.assert_allclose(f(KEY, family), family.sample(KEY, 9, (12,)), rtol=1e-6, atol=1e-7)
    leaves, treedef = jax.tree_util.tree_flatten(family)
    assert len(leaves) == 1
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(rebuilt) is type(family) and rebuilt.k == family.k


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_vmap_over_sigma_and_grad(family):
    sigmas = jnp.array([0.25, 0.5, 1.0])
    batched = jax.tree_util.tree_map(lambda _: sigmas, family)
    z = jax.vmap(lambda f: f.sample(KEY, 4, (6,)))(batched)
    assert z.shape == (3, 4, 6)
    # Every sampler is sigma times a sigma-free draw: the pathwise gradient is the draw.
    unit = jax.tree_util.tree_map(lambda _: jnp.float32(1.0), family)
    g = jax.grad(lambda s: jnp.sum(jax.tree_util.tree_map(lambda _: s, family).sample(KEY, 4, (6,))))(0.5)
    np.testing.assert_allclose(g, jnp.sum(unit.sample(KEY, 4, (6,))), rtol=1e-5)


def test_imagenet_scale_sampling_is_bounded_by_the_batch():
    family = noise.MixedLinf(noise.matched_sigma(0.5, 150528, 50000.0), 50000.0)
    z = jax.jit(lambda k: family.sample(k, 4, (3, 224, 224)))(KEY)
    assert z.shape == (4, 3, 224, 224)
    flat = np.abs(np.asarray(z).reshape(4, -1))
    assert np.all(np.isfinite(flat)) and np.all((flat == flat.max(axis=1, keepdims=True)).sum(axis=1) == 1)
    r = noise.L2Family(1.0, 50000.0).sample(KEY, 2, (3, 224, 224))
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(r).reshape(2, -1), axis=1),
        noise.L2Family(1.0, 50000.0).sample_radius(jax.random.split(KEY)[0], 2, 150528),
        rtol=1e-4,
    )


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, np.array([0.5, -0.1])])
@pytest.mark.parametrize("cls", [noise.Gaussian, noise.L2Family, noise.MixedLinf, noise.PureLinf])
def test_bad_sigma(cls, bad):
    with pytest.raises(ValueError, match=r"sigma must be finite and > 0"):
        cls(bad)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
@pytest.mark.parametrize("cls", [noise.L2Family, noise.MixedLinf, noise.PureLinf])
def test_bad_k(cls, bad):
    with pytest.raises(ValueError, match=r"k must be finite and >= 0"):
        cls(1.0, bad)


def test_k_must_be_static():
    with pytest.raises(TypeError, match="k is a static shape parameter"):
        jax.jit(lambda k: noise.L2Family(1.0, k))(3.0)


@pytest.mark.parametrize("cls", [noise.L2Family, noise.MixedLinf, noise.PureLinf])
def test_k_at_least_d_is_improper(cls):
    family = cls(1.0, 12.0)
    for call in (
        lambda: family.sample(KEY, 2, (3, 4)),
        lambda: family.sample_radius(KEY, 2, 12),
        lambda: family.log_density(jnp.ones((2, 3, 4)), event_ndim=2),
        lambda: family.log_radial_density(1.0, 5),
    ):
        with pytest.raises(ValueError, match=r"k must be < d .* got k=12.0 with d=(12|5)"):
            call()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_bad_sample_arguments(family):
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        family.sample(KEY, 0, (8,))
    with pytest.raises(TypeError, match=r"n must be an int"):
        family.sample(KEY, 2.5, (8,))
    with pytest.raises(ValueError, match=r"event_shape must be non-empty"):
        family.sample(KEY, 2, ())
    with pytest.raises(ValueError, match=r"event_shape dimensions must be >= 1"):
        family.sample(KEY, 2, (8, 0))
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype"):
        family.sample(KEY, 2, (8,), dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"needs 64-bit mode"):
        family.sample(KEY, 2, (8,), dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"d must be >= 1"):
        family.sample_radius(KEY, 2, 0)
    with pytest.raises(ValueError, match=r"event_ndim must be in \[1, z.ndim=2\]"):
        family.log_density(jnp.ones((2, 8)), event_ndim=3)


def test_matched_sigma_errors():
    with pytest.raises(ValueError, match=r"matched_sigma needs 0 <= k < 99"):
        noise.matched_sigma(0.5, 100, 99.0)
    with pytest.raises(ValueError, match=r"matched_sigma_expected_norm needs 0 <= k < 100"):
        noise.matched_sigma_expected_norm(0.5, 100, 100.0)
    with pytest.raises(ValueError, match=r"sigma0 must be finite and > 0"):
        noise.matched_sigma(-0.5, 100, 10.0)
    # Traced sigma0 is allowed and differentiable.
    g = jax.grad(lambda s: noise.matched_sigma(s, 100, 19.0))(0.5)
    np.testing.assert_allclose(g, math.sqrt(99 / 80), rtol=1e-6)
