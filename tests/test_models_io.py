"""soapbubble.models: the default small CNN and the saved-model format."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from soapbubble import data, models
from soapbubble.models import io as model_io
from soapbubble.models import registry, small

X = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))


def _init(module, seed=0):
    """Random variables of the module's shapes, drawn with numpy (compiling flax's
    init takes seconds on CPU); BatchNorm statistics are non-trivial on purpose."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False))
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, leaf in flat[0]:
        name = str(path[-1].key)
        value = rng.normal(0.0, 0.2, leaf.shape)
        if name == "var":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        leaves.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(flat[1], leaves)


# ----------------------------------------------------------------------------- small_cnn


def test_normalization_constants_are_the_digits_train_statistics():
    images = data.load_digits("train").images.astype(np.float64)
    assert small.DIGITS_MEAN == pytest.approx(images.mean(), abs=1e-7)
    assert small.DIGITS_STD == pytest.approx(images.std(), abs=1e-7)


def _np_conv_same(x, kernel, bias):
    """3x3 'SAME' cross-correlation in numpy (NHWC, HWIO)."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("bhwi,io->bhwo", xp[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
    return out + bias


def _np_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def test_small_cnn_matches_a_numpy_forward_pass():
    module = registry.build("small_cnn")
    assert isinstance(module, models.SmallCNN)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), _init(module)["params"])
    x = np.asarray(X, np.float64)
    h = (x - small.DIGITS_MEAN) / small.DIGITS_STD  # normalization is inside the model
    h = _np_pool(np.maximum(_np_conv_same(h, params["Conv_0"]["kernel"], params["Conv_0"]["bias"]), 0))
    h = _np_pool(np.maximum(_np_conv_same(h, params["Conv_1"]["kernel"], params["Conv_1"]["bias"]), 0))
    ref = h.reshape(len(x), -1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    got = jax.jit(module.apply)(_init(module), X)
    assert got.shape == (5, 10) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_small_cnn_batchnorm_uses_running_averages_in_eval():
    module = registry.build("small_cnn", use_batchnorm=True)
    variables = _init(module)
    apply = jax.jit(module.apply, static_argnames="train")
    # Eval mode is a per-example function (batch-independent), training mode is not.
    one = apply(variables, X[:1])
    np.testing.assert_allclose(np.asarray(one), np.asarray(apply(variables, X)[:1]), rtol=1e-5, atol=1e-6)
    train_apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])[0])
    assert not np.allclose(np.asarray(train_apply(variables, X[:2])[:1]),
                           np.asarray(train_apply(variables, X[:1])), atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"features": (8,)}, {"num_classes": 1}, {"std": 0.0}])
def test_small_cnn_bad_config(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        registry.build("small_cnn", **kwargs)


# ----------------------------------------------------------------------------- save / load


def _trained_bn_variables():
    module = registry.build("small_cnn", use_batchnorm=True, features=[8, 16])
    return module, _init(module)


def test_round_trip_preserves_variables_and_logits(tmp_path):
    module, variables = _trained_bn_variables()
    path = tmp_path / "model"
    models.save_model(path, "small_cnn", {"use_batchnorm": True, "features": [8, 16]}, variables,
                      dataset="digits", extra={"note": "test"})
    with open(path / model_io.META_FILE) as f:
        meta = json.load(f)
    assert meta == {"format_version": 1, "arch": "small_cnn", "config": {"use_batchnorm": True, "features": [8, 16]},
                    "dataset": "digits", "extra": {"note": "test"}}
    loaded = models.load_model(path)
    assert loaded.meta.input_shape == (8, 8, 1) and loaded.meta.extra == {"note": "test"}
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded.variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logits_fn = models.load(str(path))
    expected = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, X)
    np.testing.assert_array_equal(np.asarray(logits_fn(X)), np.asarray(expected))
    # The returned function composes with jit and vmap like any pure function.
    # (Variables become compile-time constants there, so XLA may reassociate: float32 tolerance.)
    np.testing.assert_allclose(np.asarray(jax.jit(logits_fn)(X)), np.asarray(logits_fn(X)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(B, 8, 8, 1\)"):
        logits_fn(jnp.zeros((2, 8, 8, 3)))


def test_save_refuses_to_clobber(tmp_path):
    module = registry.build("small_cnn")
    variables = _init(module)
    models.save_model(tmp_path / "m", "small_cnn", {}, variables, dataset="digits")
    with pytest.raises(FileExistsError, match="overwrite"):
        models.save_model(tmp_path / "m", "small_cnn", {}, variables, dataset="digits")
    other = _init(module, seed=7)
    models.save_model(tmp_path / "m", "small_cnn", {}, other, dataset="digits", overwrite=True)
    np.testing.assert_array_equal(np.asarray(models.load_model(tmp_path / "m").variables["params"]["Dense_0"]["bias"]),
                                  np.asarray(other["params"]["Dense_0"]["bias"]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        models.save_model(tmp_path / "busy", "small_cnn", {}, variables, dataset="digits")


def test_missing_paths_raise_file_not_found_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="soapbubble_model.json"):
        models.load_model(tmp_path / "empty")
    _write_raw(tmp_path / "novars", "small_cnn", {}, None)
    with pytest.raises(FileNotFoundError, match="variables"):
        models.load_model(tmp_path / "novars")


def _write_raw(path, arch, config, variables, dataset="digits"):
    """Writes the format by hand, bypassing save_model's checks."""
    os.makedirs(path)
    if variables is not None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(path, "variables"), variables)
        checkpointer.wait_until_finished()
    with open(os.path.join(path, "soapbubble_model.json"), "w") as f:
        json.dump({"format_version": 1, "arch": arch, "config": config, "dataset": dataset, "extra": {}}, f)


def _edit(variables, fn):
    v = jax.tree.map(lambda a: np.asarray(a), variables)
    fn(v)
    return v


BAD = {
    "missing": (lambda v: v["params"]["Dense_0"].pop("bias"), r"missing key\(s\) params/Dense_0/bias"),
    "extra": (lambda v: v["params"].__setitem__("Conv_9", {"kernel": np.zeros(3, np.float32)}),
              r"unexpected key\(s\) params/Conv_9/kernel"),
    "shape": (lambda v: v["params"]["Conv_1"].__setitem__("kernel", np.zeros((3, 3, 32, 7), np.float32)),
              r"params/Conv_1/kernel has shape \(3, 3, 32, 7\), expected \(3, 3, 32, 64\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_mismatched_variables_name_the_key_on_save_and_load(tmp_path, case):
    edit, match = BAD[case]
    variables = _edit(_init(registry.build("small_cnn")), edit)
    with pytest.raises(ValueError, match=match):
        models.save_model(tmp_path / "s", "small_cnn", {}, variables, dataset="digits")
    _write_raw(tmp_path / "l", "small_cnn", {}, variables)
    with pytest.raises(ValueError, match=match):
        models.load(tmp_path / "l")


def test_unknown_arch_and_dataset_raise_value_error(tmp_path):
    variables = _init(registry.build("small_cnn"))
    with pytest.raises(ValueError, match="unknown architecture 'lenet'"):
        models.save_model(tmp_path / "a", "lenet", {}, variables, dataset="digits")
    _write_raw(tmp_path / "b", "lenet", {}, variables)
    with pytest.raises(ValueError, match="arch='lenet'"):
        models.load(tmp_path / "b")
    with pytest.raises(ValueError, match="dataset='mnist'"):
        models.save_model(tmp_path / "c", "small_cnn", {}, variables, dataset="mnist")
    # Another dataset works when it states its input shape.
    models.save_model(tmp_path / "d", "small_cnn", {}, variables, dataset="mnist8", extra={"input_shape": [8, 8, 1]})
    assert models.load_model(tmp_path / "d").meta.input_shape == (8, 8, 1)


# ----------------------------------------------------------------------------- load: a classifier pytree


def _constant_class(variables, label, scale=5.0):
    """The same architecture with weights that output class ``label`` on every input."""
    v = jax.tree.map(np.asarray, variables)
    v["params"]["Dense_0"]["kernel"] = np.zeros_like(v["params"]["Dense_0"]["kernel"])
    v["params"]["Dense_0"]["bias"] = scale * np.eye(v["params"]["Dense_0"]["bias"].shape[0], dtype=np.float32)[label]
    return v


def test_load_gives_a_pytree_whose_checkpoints_share_one_compilation(tmp_path):
    import flax.core
    import scipy.stats

    import soapbubble
    from soapbubble import counting, noise
    from soapbubble.bounds.table import radius_table

    module = registry.build("small_cnn")
    rand = _init(module, seed=3)
    saved = {"rand": rand, "three": _constant_class(rand, 3), "seven": _constant_class(rand, 7)}
    for name, variables in saved.items():
        models.save_model(tmp_path / name, "small_cnn", {}, variables, dataset="digits")
    fns = {name: models.load(tmp_path / name) for name in saved}

    # The static halves are equal (hashable, same apply function), the weights are the leaves.
    statics = {name: counting.as_classifier(f).static for name, f in fns.items()}
    assert statics["rand"] == statics["three"] == statics["seven"]
    assert len({hash(s) for s in statics.values()}) == 1
    assert isinstance(fns["rand"], jax.tree_util.Partial) and isinstance(fns["rand"].func, models.ApplyFn)
    assert len(jax.tree.leaves(fns["rand"])) == len(jax.tree.leaves(rand))
    with pytest.raises((TypeError, ValueError)):  # immutable: FrozenDict
        fns["rand"].args[0]["params"] = {}
    assert isinstance(fns["rand"].args[0], flax.core.FrozenDict)

    family = noise.Gaussian(0.25)
    table = radius_table(None, family, 64, "l2")
    x = data.load_digits("test").images[0]
    kw = dict(n0=50, n=100, batch_size=50, alpha=0.001, table=table)
    key = jax.random.key(0)
    first = soapbubble.certify(key, fns["rand"], x, family, **kw)  # compiles (once per architecture)
    compiled = counting._count._cache_size()
    certs = {name: soapbubble.certify(key, fns[name], x, family, **kw) for name in ("three", "seven")}
    again = soapbubble.certify(key, fns["rand"], x, family, **kw)
    preds = {name: soapbubble.predict(key, f, x, family, n=100, batch_size=50) for name, f in fns.items()}
    assert counting._count._cache_size() == compiled  # new weights, nothing compiled

    # The results follow the weights: constant models certify their class with every vote;
    # the exact one-sided Clopper-Pearson bound with n of n successes is alpha^(1/n).
    for name, label in (("three", 3), ("seven", 7)):
        c = certs[name]
        assert int(c.prediction) == label and c.count == 100 and preds[name] == label
        exact = 0.001 ** (1 / 100)
        assert exact - 1e-9 < c.p_lower <= exact
        r = 0.25 * scipy.stats.norm.ppf(c.p_lower)  # Cohen et al.'s radius, rounded down to the grid
        step = float(np.max(np.diff(table.radii)))
        assert r - step <= c.radius <= r + 1e-12
    assert tuple(again) == tuple(first)

    # Independent route for the random model: a plain closure over the original variables
    # (another classifier pytree, compiled separately) sees the same noise and counts the same votes.
    plain = soapbubble.certify(key, lambda b: module.apply(rand, b, train=False), x, family, **kw)
    assert (int(plain.prediction), plain.count, plain.p_lower) == (int(first.prediction), first.count, first.p_lower)
    assert soapbubble.predict(key, lambda b: module.apply(rand, b, train=False), x, family, n=100,
                              batch_size=50) == preds["rand"]


def test_inputs_outside_pixel_space_warn_and_point_to_the_guide(tmp_path):
    """A loaded model declares pixel space [0, 1]: certifying [-1, 1] inputs warns (guide named)."""
    import soapbubble
    from soapbubble import noise

    module = registry.build("small_cnn")
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    model_io.save_model(tmp_path / "m", "small_cnn", {}, variables, dataset="digits")
    logits_fn = model_io.load(tmp_path / "m")
    table = soapbubble.radius_table(None, noise.Gaussian(0.25), 64, "l2")
    image = np.full((8, 8, 1), 0.5, np.float32)
    with pytest.warns(UserWarning, match=r"expects pixel space in \[0, 1\].*docs/guides/pixel_space.md"):
        soapbubble.certify(jax.random.key(0), logits_fn, 2 * image - 1.2, noise.Gaussian(0.25), n=100, n0=50,
                           batch_size=50, table=table)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inputs in [0, 1]: no warning
        soapbubble.certify(jax.random.key(0), logits_fn, image, noise.Gaussian(0.25), n=100, n0=50,
                           batch_size=50, table=table)
