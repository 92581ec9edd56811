"""soapbubble.train: the default model, resumption, determinism, the MACER objective."""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from soapbubble import data, models, noise, train
from soapbubble.bounds.table import RadiusTable, radius_table

KEY = jax.random.key(20260806)

# A small training problem (256 digits, 4 steps per epoch) for the mechanics tests.
SMALL = dataclasses.replace(data.load_digits("train"), images=data.load_digits("train").images[:256],
                            labels=data.load_digits("train").labels[:256])
SMALL_CONFIG = train.TrainConfig(family=noise.Gaussian(0.25), model_config={"features": [8, 16], "use_batchnorm": True},
                                 epochs=4, batch_size=64, learning_rate=0.05, lr_step_epochs=2, progress=False)


def _leaves(variables):
    return [np.asarray(a) for a in jax.tree.leaves(variables)]


def test_default_model_reaches_90_percent_clean_accuracy(tmp_path):
    start = time.perf_counter()
    result = train.train_default_model(jax.random.key(0), tmp_path)
    seconds = time.perf_counter() - start
    print(f"train_default_model: {seconds:.1f} s, test accuracy {result.test_accuracy[-1]:.4f}")
    # Independent route: reload the saved model and count correct test predictions here.
    logits_fn = models.load(os.path.join(tmp_path, "model"))
    test = data.load_digits("test")
    accuracy = float(np.mean(np.argmax(np.asarray(logits_fn(test.images)), axis=-1) == test.labels))
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(float(result.test_accuracy[-1]), abs=1e-6)
    assert result.train_loss.shape == (train.DEFAULT_CONFIG.epochs,) and result.start_epoch == 0
    meta = models.load_model(os.path.join(tmp_path, "model")).meta
    assert meta.arch == "small_cnn" and meta.dataset == "digits"
    assert meta.extra["train_config"]["family"] == {"family": "gaussian", "sigma": 0.25, "k": 0.0}


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
    straight = train.train(KEY, SMALL_CONFIG, SMALL, workdir=tmp_path / "straight")
    # 'Interrupted' after 2 epochs, then restarted with the full configuration.
    first = train.train(KEY, dataclasses.replace(SMALL_CONFIG, epochs=2), SMALL, workdir=tmp_path / "resumed")
    assert first.start_epoch == 0 and first.train_loss.shape == (2,)
    resumed = train.train(KEY, SMALL_CONFIG, SMALL, workdir=tmp_path / "resumed")
    assert resumed.start_epoch == 2
    for a, b in zip(_leaves(straight.variables), _leaves(resumed.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(straight.train_loss, resumed.train_loss)
    # The batch statistics were trained too (not left at their initial values).
    stats = resumed.variables["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(np.asarray(stats), 0.0)
    # Saved model = final parameters; a finished run called again changes nothing.
    again = train.train(KEY, SMALL_CONFIG, SMALL, workdir=tmp_path / "resumed")
    assert again.start_epoch == 4
    loaded = models.load_model(tmp_path / "resumed" / "model").variables
    for a, b in zip(_leaves(straight.variables), _leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    # Another key gives other parameters; the workdir refuses it.
    with pytest.raises(ValueError, match="key"):
        train.train(jax.random.key(1), SMALL_CONFIG, SMALL, workdir=tmp_path / "resumed")
    with pytest.raises(ValueError, match="config.learning_rate"):
        train.train(KEY, dataclasses.replace(SMALL_CONFIG, learning_rate=0.1), SMALL, workdir=tmp_path / "resumed")
    with pytest.raises(ValueError, match="already holds epoch 4"):
        train.train(KEY, dataclasses.replace(SMALL_CONFIG, epochs=3), SMALL, workdir=tmp_path / "resumed")


def test_training_with_a_non_gaussian_family_macer_and_augmentation_runs(tmp_path):
    # One run covers the options (each new configuration costs a compilation). The
    # objective is the MixedLinf family's own l_inf radius (a small Monte Carlo table).
    config = dataclasses.replace(SMALL_CONFIG, family=noise.MixedLinf(0.1, k=8.0), epochs=1, random_crop_padding=1,
                                 random_flip=True, macer_weight=1.0, macer_samples=4, macer_gamma=0.5,
                                 macer_table_samples=20_000)
    assert config.objective_attack == "linf"
    result = train.train(KEY, config, SMALL, workdir=tmp_path, eval_dataset=data.load("digits", "test"))
    assert np.isfinite(result.train_loss).all() and result.test_accuracy.shape == (1,)
    assert 0.0 <= result.test_accuracy[0] <= 1.0
    assert all(np.isfinite(a).all() for a in _leaves(result.variables))
    # The table was built once, for (MixedLinf, d = 64, linf), kept in the workdir for a resume.
    (path,) = (tmp_path / "tables").glob("*.npz")
    table = RadiusTable.load(path)
    assert dict(table.identity(), alpha_d=None) == {"family": "mixed_linf", "sigma": 0.1, "k": 8.0, "d": 64,
                                                    "attack": "linf", "route": "monte_carlo", "n_samples": 20_000,
                                                    "alpha_d": None}
    # The 4 steps ran one compiled program (the table's arrays are constants of it).
    n_compiled = len(train._COMPILED)
    step = train._compiled(config, SMALL.image_shape, len(SMALL) // config.batch_size, tmp_path / "tables")[3]
    assert len(train._COMPILED) == n_compiled and step._cache_size() == 1
    # The objective's settings are part of the run's fingerprint.
    with pytest.raises(ValueError, match="config.macer_table_samples"):
        train.train(KEY, dataclasses.replace(config, macer_table_samples=30_000), SMALL, workdir=tmp_path)


def _macer_reference(logits, labels, sigma, weight, gamma, beta, radius_fn=None):
    """MACER loss in numpy/scipy float64 (one-sided Gaussian radius, or radius_fn(p))."""
    logits = np.asarray(logits, np.float64)

    def soft(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).mean(axis=1)

    rows = np.arange(len(labels))
    ce = -np.log(soft(logits)[rows, labels] + 1e-10)
    p_beta = soft(beta * logits)
    p_y = np.clip(p_beta[rows, labels], 1e-6, 1 - 1e-6)
    radius = sigma * scipy.stats.norm.ppf(p_y) if radius_fn is None else radius_fn(p_y)
    active = (p_beta.argmax(-1) == labels) & (radius < gamma)
    return ce.mean() + weight * np.where(active, gamma - radius, 0.0).mean()


def test_macer_loss_matches_reference_and_has_finite_gradients():
    logits = 3.0 * jax.random.normal(jax.random.key(3), (32, 8, 10))
    labels = jnp.argmax(logits[:, 0], axis=-1).at[:8].set(0)  # mostly right, some wrong
    kwargs = {"weight": 2.0, "gamma": 1.0, "beta": 4.0}
    loss = jax.jit(lambda z, y: train.macer_loss(z, y, 0.5, **kwargs))  # jit: eager ops compile one by one
    got = float(loss(logits, labels))
    ref = _macer_reference(logits, np.asarray(labels), 0.5, **kwargs)
    assert got == pytest.approx(ref, rel=1e-4)  # float32 softmax/ndtri vs float64
    grad = jax.jit(jax.grad(loss))
    g = np.asarray(grad(logits, labels))
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    # Saturated probabilities (p_y -> 1 and -> 0) stay finite thanks to the clip.
    extreme = jnp.zeros((32, 8, 10)).at[:16, :, 3].set(1e4).at[16:, :, 5].set(1e4)
    assert np.isfinite(np.asarray(grad(extreme, jnp.full(32, 3)))).all()


def test_macer_loss_with_the_family_radius_table():
    logits = 3.0 * jax.random.normal(jax.random.key(3), (32, 8, 10))
    labels = jnp.argmax(logits[:, 0], axis=-1).at[:8].set(0)
    kwargs = {"weight": 2.0, "gamma": 1.0, "beta": 4.0}
    # The closed-form l2 table of the Gaussian is the Gaussian radius: same loss and gradient.
    gauss = radius_table(None, noise.Gaussian(0.5), 64, "l2")
    by_sigma, by_table = jax.jit(lambda z: (
        jax.value_and_grad(lambda z: train.macer_loss(z, labels, 0.5, **kwargs))(z),
        jax.value_and_grad(lambda z: train.macer_loss(z, labels, table=gauss, **kwargs))(z)))(logits)
    np.testing.assert_allclose(float(by_table[0]), float(by_sigma[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(by_table[1]), np.asarray(by_sigma[1]), rtol=1e-4, atol=1e-6)
    # A tabulated table (exact l2 family, coarse grid for speed): the radius is the linear
    # inverse of p_min, clamped to the table's range (numpy reference).
    table = radius_table(None, noise.L2Family(0.5, 8.0), 64, "l2", radii=np.linspace(0.0, 1.5, 61))
    finite = np.isfinite(table.p_min)
    loss = jax.jit(jax.value_and_grad(lambda z: train.macer_loss(z, labels, table=table, **kwargs)))
    got, grad = loss(logits)
    ref = _macer_reference(logits, np.asarray(labels), None, **kwargs,
                           radius_fn=lambda p: np.interp(p, table.p_min[finite], table.radii[finite]))
    assert float(got) == pytest.approx(ref, rel=1e-4)  # float32 softmax vs float64
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
    extreme = jnp.zeros((32, 8, 10)).at[:16, :, 3].set(1e4).at[16:, :, 5].set(1e4)
    assert np.isfinite(np.asarray(loss(extreme)[1])).all()
    with pytest.raises(ValueError, match="exactly one of sigma"):
        train.macer_loss(logits, labels, 0.5, table=table, **kwargs)
    with pytest.raises(ValueError, match="exactly one of sigma"):
        train.macer_loss(logits, labels, **kwargs)


def test_objective_attack_table_and_fingerprint(tmp_path):
    assert SMALL_CONFIG.objective_attack == "l2"
    assert dataclasses.replace(SMALL_CONFIG, family=noise.L2Family(0.25, 8.0)).objective_attack == "l2"
    assert dataclasses.replace(SMALL_CONFIG, radius_attack="linf").objective_attack == "linf"
    with pytest.raises(ValueError, match="radius_attack='l2' is refused for MixedLinf"):
        dataclasses.replace(SMALL_CONFIG, family=noise.MixedLinf(0.1, 8.0), radius_attack="l2")
    # Without the objective no table is built, and its settings stay out of the fingerprint
    # (workdirs of such runs from before these settings existed still resume).
    assert train._objective_table(SMALL_CONFIG, 64, tmp_path) is None
    desc = train._fingerprint(KEY, SMALL_CONFIG, SMALL)["config"]
    assert "radius_attack" not in desc and "macer_table_samples" not in desc
    macer = dataclasses.replace(SMALL_CONFIG, macer_weight=1.0, radius_attack="linf")
    table = train._objective_table(macer, 64, tmp_path)
    assert table.metadata["route"] == "closed_form" and table.metadata["attack"] == "linf"
    assert train._fingerprint(KEY, macer, SMALL)["config"]["radius_attack"] == "linf"
    # PureLinf has no radius: the Gaussian one at its sigma is the (documented) surrogate.
    pure = dataclasses.replace(SMALL_CONFIG, family=noise.PureLinf(0.3, 4.0), macer_weight=1.0)
    table = train._objective_table(pure, 64, tmp_path)
    assert (table.metadata["family"], table.metadata["sigma"], table.metadata["attack"]) == ("gaussian", 0.3, "l2")


def test_augmentation_returns_shifted_and_flipped_copies():
    images = jax.random.uniform(jax.random.key(5), (16, 6, 6, 2))
    out = np.asarray(train._augment(jax.random.key(6), images, 2, True))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    shifts = set()
    for i in range(16):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if np.array_equal(out[i], (padded[i, dy:dy + 6, dx:dx + 6][:, ::-1] if f
                                              else padded[i, dy:dy + 6, dx:dx + 6]))]
        assert matches, i
        shifts.update(matches)
    assert len(shifts) > 3  # the draws differ between images


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr_gamma": 0.0}, "lr_gamma"),
        ({"macer_weight": float("nan")}, "macer_weight"),
        ({"arch": "lenet"}, "arch='lenet'"),
        ({"family": 0.25}, "family"),
        ({"model_config": {"f": object()}}, "model_config"),
        ({"radius_attack": "l1"}, "radius_attack"),
        ({"macer_table_samples": 10}, "macer_table_samples"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**kwargs)


def test_bad_train_arguments(tmp_path):
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 10"):
        train.train(KEY, SMALL_CONFIG, data.load("digits", "test", max_examples=10), workdir=tmp_path)
    with pytest.raises(ValueError, match="key"):
        train.train(0, SMALL_CONFIG, SMALL, workdir=tmp_path)
    with pytest.raises(ValueError, match="k must be < d"):
        train.train(KEY, dataclasses.replace(SMALL_CONFIG, family=noise.L2Family(0.25, k=64.0)), SMALL,
                    workdir=tmp_path)
