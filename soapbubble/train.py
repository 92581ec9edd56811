"""Noise-augmented training (Cohen et al.'s recipe), resumable, with an optional
certified-radius objective (MACER-style).

Each step draws one noise vector per training image from the smoothing family and
adds it in pixel space (no clipping, as Cohen et al.), then takes an SGD step with
momentum and weight decay (``optax.add_decayed_weights`` + ``optax.sgd``, i.e.
PyTorch's ``SGD(momentum, weight_decay)``) under a step schedule: the learning
rate is multiplied by ``lr_gamma`` every ``lr_step_epochs`` epochs.

Determinism and resumption: ``key`` is split into (init, shuffle, noise) keys; the
order of epoch ``e`` is ``permutation(fold_in(shuffle_key, e))`` and step ``s``
uses ``fold_in(noise_key, s)``, so the run is a function of ``(key, config,
dataset)`` alone. After every epoch the full state (variables, optimizer state,
epoch) goes to an orbax checkpoint in ``workdir/checkpoints``; calling
:func:`train` again with the same arguments continues from the last one and ends
with exactly the parameters of an uninterrupted run. ``epochs`` may be raised on
resume (the schedule does not depend on it); any other change of the
configuration or key is refused. The final model is written with
:func:`soapbubble.models.io.save_model` to ``workdir/model``.

Certified-radius objective (``macer_weight > 0``): per image, ``macer_samples``
noisy copies give the soft smoothed probabilities ``p = mean softmax(logits)``
(classification loss ``-log p_y``) and ``p_beta = mean softmax(beta * logits)``;
for images whose ``p_beta`` ranks the true class first, the hinge
``max(0, gamma - R)`` on the differentiable radius ``R`` of the true class is
added with weight ``macer_weight``. ``R`` is the training family's own radius
(:func:`soapbubble.objectives.radius_from_logits`: ``p_beta_y`` clipped to
``[1e-6, 1 - 1e-6]``, then the family's ``RadiusTable.smooth_radius``), for the
attack ``config.objective_attack``:

=========  =====================  ==================================================
family     attack (default)       radius table (built once per run, see below)
=========  =====================  ==================================================
Gaussian   l2 (or linf)           closed form, ``R = sigma_eff * Phi^-1(p)``
L2Family   l2 (or linf)           exact quadrature
MixedLinf  linf (l2 is refused)   Monte Carlo, ``macer_table_samples`` samples, fixed key
PureLinf   surrogate              no radius is proven: the Gaussian radius at the
                                  family's ``sigma`` stands in (with a warning)
=========  =====================  ==================================================

``gamma`` is in radius units of that attack (pixel space). Its default, 8, is
above every radius these tables reach for pixel-space scales ``sigma <= 1`` (l2:
``6 sigma``; linf: ``12 sigma / sqrt(d)`` at most), so, as with MACER's ``gamma = 8``,
the hinge acts on every correctly classified image. An linf radius is about
``sqrt(d)`` times smaller than an l2 radius, and so is its gradient: scale
``macer_weight`` accordingly. For the tabulated families (L2Family, MixedLinf)
the radius is clamped, with zero gradient, below the table's first threshold
``p_min(0)`` (about 1/2) and above its last finite one, so only images with
``p_beta_y`` above about 1/2 are pushed; the Gaussian's closed form also pushes
(negative) radii below 1/2. The table is built by
:func:`soapbubble.bounds.cache.cached_radius_table` into ``workdir/tables`` (a
resumed run reads it back) and enters the compiled step as constants: the step
is compiled once per configuration. It is a training objective, not a
certificate (:mod:`soapbubble.objectives`).

Example:
  >>> import jax, tempfile
  >>> from soapbubble import data, noise
  >>> cfg = TrainConfig(family=noise.Gaussian(0.25), epochs=1, progress=False)
  >>> res = train(jax.random.key(0), cfg, data.load_digits("train"), workdir=tempfile.mkdtemp())
  >>> res.train_loss.shape
  (1,)
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soapbubble import data as data_lib
from soapbubble import noise as noise_lib
from soapbubble import objectives
from soapbubble.bounds import stats
from soapbubble.bounds import table as table_lib
from soapbubble.models import io as model_io
from soapbubble.models import registry

__all__ = ["DEFAULT_CONFIG", "TrainConfig", "TrainResult", "evaluate", "macer_loss", "train", "train_default_model"]

_CONFIG_FILE = "train_config.json"
_P_CLIP = objectives.P_CLIP  # keeps Phi^-1 and its gradient finite in the MACER hinge
_TABLE_DIR = "tables"  # the objective's radius table, under workdir


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (defaults: Cohen et al.'s, scaled to the digits).

    Attributes:
      family: smoothing family whose noise augments every step.
      arch: registry name of the architecture.
      model_config: builder keyword arguments (JSON values).
      epochs: number of epochs (>= 1).
      batch_size: images per step (the last incomplete batch of an epoch is dropped).
      learning_rate: initial SGD learning rate (> 0).
      momentum: SGD momentum in [0, 1).
      weight_decay: L2 weight decay (>= 0), added to the gradient as PyTorch's SGD.
      lr_step_epochs: epochs between learning-rate drops (>= 1).
      lr_gamma: factor of each drop, in (0, 1].
      random_crop_padding: pad-and-random-crop augmentation (pixels, >= 0; 0 = off).
      random_flip: random horizontal flips (off for digits).
      macer_weight: weight of the certified-radius hinge (>= 0; 0 = off).
      macer_samples: noise draws per image for the soft smoothed classifier (>= 1).
      macer_gamma: hinge margin on the radius (> 0), in radius units of the
        objective's attack (see the module docstring for the default).
      macer_beta: inverse temperature of the soft smoothed classifier (> 0).
      radius_attack: attack whose radius the objective uses: None (the family's:
        "l2" for Gaussian and L2Family, "linf" for MixedLinf, the "l2" Gaussian
        surrogate for PureLinf), "l2" or "linf" ("l2" is refused for MixedLinf).
        Resolved as :attr:`objective_attack`.
      macer_table_samples: Monte Carlo samples of the MixedLinf radius table of
        the objective (>= 1000; the other families' tables are exact).
      eval_batch_size: batch size of the clean-accuracy evaluation.
      progress: show a tqdm progress bar.
    """

    family: noise_lib.SmoothingFamily = dataclasses.field(default_factory=lambda: noise_lib.Gaussian(0.25))
    arch: str = "small_cnn"
    model_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    random_crop_padding: int = 0
    random_flip: bool = False
    macer_weight: float = 0.0
    macer_samples: int = 16
    macer_gamma: float = 8.0
    macer_beta: float = 16.0
    radius_attack: str | None = None
    macer_table_samples: int = 100_000
    eval_batch_size: int = 1000
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.family, noise_lib.SmoothingFamily):
            raise _bad("family", self.family, "a soapbubble.noise family (Gaussian, L2Family, ...)")
        if self.arch not in registry.names():
            raise ValueError(f"unknown arch={self.arch!r}; known: {', '.join(registry.names())}")
        try:
            json.dumps(dict(self.model_config))
        except TypeError as e:
            raise ValueError(f"model_config must be JSON-serializable: {e}") from e
        for name, lo in (("epochs", 1), ("batch_size", 1), ("lr_step_epochs", 1), ("random_crop_padding", 0),
                         ("macer_samples", 1), ("macer_table_samples", 1000), ("eval_batch_size", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise _bad(name, v, f"an integer >= {lo}")
        checks = (
            ("learning_rate", lambda v: v > 0, "> 0"),
            ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("lr_gamma", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("macer_weight", lambda v: v >= 0, ">= 0"),
            ("macer_gamma", lambda v: v > 0, "> 0"),
            ("macer_beta", lambda v: v > 0, "> 0"),
        )
        for name, ok, allowed in checks:
            v = getattr(self, name)
            if not _is_real(v) or not ok(v):
                raise _bad(name, v, f"a finite number {allowed}")
        for name in ("random_flip", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "a bool")
        if self.radius_attack not in (None, "l2", "linf"):
            raise _bad("radius_attack", self.radius_attack, "None, 'l2' or 'linf'")
        if isinstance(self.family, noise_lib.MixedLinf) and self.objective_attack != "linf":
            raise ValueError("radius_attack='l2' is refused for MixedLinf: no worst case is proven for an l2 attack"
                             " on it (Theorem 5 covers linf); use radius_attack=None or 'linf'")

    @property
    def objective_attack(self) -> str:
        """The attack of the certified-radius objective: ``radius_attack`` or the family's default."""
        if self.radius_attack is not None:
            return self.radius_attack
        return "linf" if isinstance(self.family, noise_lib.MixedLinf) else "l2"

    def describe(self) -> dict[str, Any]:
        """Plain-data description (JSON), the family as ``family.describe()``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["family"] = self.family.describe()
        out["model_config"] = dict(self.model_config)
        return out


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      variables: final flax variables dict (jax arrays).
      model_dir: directory of the saved final model (``workdir/model``).
      train_loss: float32 (epochs,) mean training loss per epoch.
      train_accuracy: float32 (epochs,) accuracy on the noisy training batches.
      test_accuracy: float32 (epochs,) clean accuracy on ``eval_dataset`` after each
        epoch, or None without one.
      start_epoch: epochs already done when this call started (0 = fresh run).
    """

    variables: dict
    model_dir: str
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray | None
    start_epoch: int


def _as_key(key: Any) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise _bad("key", key, "a jax PRNG key (jax.random.key(seed))")


def _fingerprint(key: jax.Array, config: TrainConfig, dataset) -> dict:
    desc = config.describe()
    for volatile in ("epochs", "progress", "eval_batch_size"):
        desc.pop(volatile)
    # The objective's settings are recorded only where they change the run (so workdirs
    # of runs without the objective, written before these fields existed, still resume).
    desc.pop("radius_attack")
    desc.pop("macer_table_samples")
    if config.macer_weight > 0:
        desc["radius_attack"] = config.objective_attack
        if isinstance(config.family, noise_lib.MixedLinf):
            desc["macer_table_samples"] = config.macer_table_samples
    return {
        "config": desc,
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "dataset": {"name": dataset.name, "size": len(dataset), "image_shape": list(dataset.image_shape)},
    }


def _augment(key, images, padding: int, flip: bool):
    """Random pad-and-crop and horizontal flip, one draw per image (vmapped)."""
    if not padding and not flip:
        return images
    b, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    if padding:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    if flip:
        do = jax.random.bernoulli(k_flip, 0.5, (b,))
        images = jnp.where(do[:, None, None, None], images[:, :, ::-1], images)
    return images


def macer_loss(logits: jax.Array, labels: jax.Array, sigma: float | None = None, *, weight: float, gamma: float,
               beta: float, table: table_lib.RadiusTable | None = None) -> jax.Array:
    """MACER-style loss of the soft smoothed classifier (see the module docstring).

    Give exactly one of ``sigma`` (the Gaussian radius ``sigma * Phi^-1(p)``, as
    before tables existed) or ``table`` (the family's radius,
    :func:`soapbubble.objectives.radius_from_logits`; the Gaussian closed-form l2
    table gives the same values as ``sigma``).

    Args:
      logits: float (B, m, C), logits of m noisy copies of each of B images.
      labels: int (B,).
      sigma: scale of the Gaussian radius.
      weight: weight of the radius hinge.
      gamma: hinge margin, in radius units.
      beta: inverse temperature of the soft smoothed classifier.
      table: the training family's :class:`~soapbubble.bounds.table.RadiusTable`.

    Returns:
      Scalar: ``mean(-log p_y) + weight * mean(hinge)``; finite, with finite gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> float(macer_loss(jnp.zeros((2, 4, 10)), jnp.array([0, 1]), 0.25, weight=1.0, gamma=8.0, beta=16.0)) > 0
      True
    """
    if (sigma is None) == (table is None):
        raise ValueError("macer_loss needs exactly one of sigma (Gaussian radius) or table (the family's radius)")
    p = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)
    ce = -jnp.log(jnp.take_along_axis(p, labels[:, None], axis=1)[:, 0] + 1e-10)
    if table is None:
        p_beta = jnp.mean(jax.nn.softmax(beta * logits, axis=-1), axis=1)
        p_y = jnp.clip(jnp.take_along_axis(p_beta, labels[:, None], axis=1)[:, 0], _P_CLIP, 1 - _P_CLIP)
        radius = stats.gaussian_radius(p_y, sigma)
    else:
        soft = objectives.radius_from_logits(logits, table, beta=beta, label=labels, p_clip=_P_CLIP)
        p_beta, radius = soft.probs, soft.radius
    # Only images the smoothed classifier gets right, and whose radius is below the margin.
    active = (jnp.argmax(p_beta, axis=-1) == labels) & (radius < gamma)
    hinge = jnp.where(active, gamma - radius, 0.0)
    return jnp.mean(ce) + weight * jnp.mean(hinge)


def _objective_table(config: TrainConfig, d: int, table_dir) -> table_lib.RadiusTable | None:
    """The radius table of the certified-radius objective (None without the objective).

    Built (or read back) by :func:`soapbubble.bounds.cache.cached_radius_table` in
    ``table_dir``: exact for Gaussian and L2Family, Monte Carlo with
    ``macer_table_samples`` samples and the cache's fixed key for MixedLinf. PureLinf
    has no table: the Gaussian one at its ``sigma`` is the surrogate.
    """
    if config.macer_weight == 0:
        return None
    from soapbubble.bounds import cache

    family = config.family
    if isinstance(family, noise_lib.PureLinf):
        family = noise_lib.Gaussian(family.sigma)
    return cache.cached_radius_table(family, d, config.objective_attack, n_samples=config.macer_table_samples,
                                     table_dir=table_dir)


def _make_step(module, tx, config: TrainConfig, image_shape, has_bn: bool, table=None):
    family = config.family
    m = config.macer_samples if config.macer_weight > 0 else 1

    def loss_fn(params, batch_stats, images, labels, key):
        k_aug, k_noise = jax.random.split(key)
        images = _augment(k_aug, images, config.random_crop_padding, config.random_flip)
        b = images.shape[0]
        z = family.sample(k_noise, b * m, image_shape).reshape(b, m, *image_shape)
        x = (images[:, None] + z).reshape(b * m, *image_shape)
        variables = {"params": params, **({"batch_stats": batch_stats} if has_bn else {})}
        if has_bn:
            logits, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = module.apply(variables, x, train=True), batch_stats
        logits = logits.reshape(b, m, -1)
        if config.macer_weight > 0:
            # The table's arrays are constants of this (once-compiled) step.
            loss = macer_loss(logits, labels, weight=config.macer_weight, gamma=config.macer_gamma,
                              beta=config.macer_beta, table=table)
            p = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)
            correct = jnp.argmax(p, axis=-1) == labels
        else:
            logits = logits[:, 0]
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
            correct = jnp.argmax(logits, axis=-1) == labels
        return loss, (new_stats, jnp.mean(correct))

    @jax.jit
    def step(state, images_all, labels_all, batches, i, noise_key, global_step):
        idx = batches[i]
        images, labels = images_all[idx], labels_all[idx]
        key = jax.random.fold_in(noise_key, global_step)
        (loss, (new_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state.get("batch_stats"), images, labels, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
        if has_bn:
            new_state["batch_stats"] = new_stats
        return new_state, loss, acc

    return step, loss_fn


def _predictor(module):
    return jax.jit(lambda v, x: jnp.argmax(module.apply(v, x, train=False), axis=-1))


# Compiled functions of recent runs, by what they depend on: a resumed or repeated
# run in the same process (tests, notebooks) reuses them instead of recompiling.
_COMPILED: dict[str, tuple] = {}


def _compiled(config: TrainConfig, image_shape: tuple, steps_per_epoch: int, table_dir=None):
    desc = config.describe()
    for volatile in ("epochs", "progress"):
        desc.pop(volatile)
    cache_key = json.dumps([desc, list(image_shape), steps_per_epoch], sort_keys=True)
    if cache_key not in _COMPILED:
        module = registry.build(config.arch, **dict(config.model_config))
        # jit: flax's eager init would compile every op separately (seconds).
        init = jax.jit(lambda k: module.init(k, jnp.zeros((1, *image_shape), jnp.float32), train=False))
        has_bn = "batch_stats" in jax.eval_shape(init, jax.random.key(0))
        schedule = optax.exponential_decay(config.learning_rate, config.lr_step_epochs * steps_per_epoch,
                                           config.lr_gamma, staircase=True)
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                         optax.sgd(schedule, momentum=config.momentum))
        table = _objective_table(config, int(np.prod(image_shape)), table_dir)
        step, _ = _make_step(module, tx, config, image_shape, has_bn, table)
        if len(_COMPILED) >= 4:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[cache_key] = (module, tx, init, step, _predictor(module))
    return _COMPILED[cache_key]


def evaluate(module, variables, dataset, *, batch_size: int = 1000, _predict=None) -> float:
    """Clean accuracy of ``module`` with ``variables`` on ``dataset`` (eval mode).

    Returns:
      float in [0, 1].
    """
    predict = _predict if _predict is not None else _predictor(module)
    correct = 0
    for batch in dataset.batches(batch_size):
        correct += int(np.sum(np.asarray(predict(variables, batch.images)) == batch.labels))
    return correct / len(dataset)


def train(key, config: TrainConfig, dataset, *, workdir: str | os.PathLike, eval_dataset=None) -> TrainResult:
    """Trains (or resumes training) with noise augmentation; see the module docstring.

    Args:
      key: PRNG key (``jax.random.key(seed)``).
      config: :class:`TrainConfig`.
      dataset: training set (:class:`soapbubble.data.Dataset`; a lazy source is read
        into memory).
      workdir: directory for checkpoints, ``train_config.json`` and ``model/``.
      eval_dataset: optional set on which clean accuracy is measured after each epoch.

    Returns:
      :class:`TrainResult`.

    Raises:
      ValueError: bad config, a dataset smaller than one batch, or a workdir holding
        a run with another key, configuration or dataset.

    Warns:
      UserWarning: ``macer_weight > 0`` with PureLinf (the Gaussian surrogate radius is used).
    """
    key = _as_key(key)
    if not isinstance(config, TrainConfig):
        raise _bad("config", config, "a TrainConfig")
    dataset = data_lib.materialize(dataset)
    if eval_dataset is not None:
        eval_dataset = data_lib.materialize(eval_dataset)
    n = len(dataset)
    if n < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {n} training examples")
    image_shape = tuple(dataset.image_shape)
    config.family.check_dimension(int(np.prod(image_shape)))
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)

    fingerprint = _fingerprint(key, config, dataset)
    config_path = os.path.join(workdir, _CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(fingerprint)):
            diff = [k for k in ("key", "dataset") if previous.get(k) != fingerprint[k]]
            diff += [f"config.{k}" for k, v in fingerprint["config"].items()
                     if previous.get("config", {}).get(k) != json.loads(json.dumps(v))]
            raise ValueError(f"workdir={workdir!r} holds a run with other settings ({', '.join(diff) or 'format'});"
                             " use a fresh workdir")
    else:
        with open(config_path, "w") as f:
            json.dump(fingerprint, f, indent=2, sort_keys=True)

    model_config = dict(config.model_config)
    steps_per_epoch = n // config.batch_size
    if config.macer_weight > 0 and isinstance(config.family, noise_lib.PureLinf):
        warnings.warn("PureLinf has no certified radius (the paper proves no worst case): the certified-radius"
                      " objective uses the Gaussian radius at the family's sigma as a surrogate", stacklevel=2)
    module, tx, init, step, predict = _compiled(config, image_shape, steps_per_epoch,
                                                os.path.join(workdir, _TABLE_DIR))
    k_init, k_shuffle, k_noise = jax.random.split(key, 3)
    variables = init(k_init)
    has_bn = "batch_stats" in variables
    state = {"params": variables["params"], "opt_state": tx.init(variables["params"])}
    if has_bn:
        state["batch_stats"] = variables["batch_stats"]
    history = {"train_loss": [], "train_accuracy": [], "test_accuracy": []}

    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    start_epoch = 0
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
        state, history, start_epoch = restored["state"], restored["history"], int(latest)
    if start_epoch > config.epochs:
        manager.close()
        raise ValueError(f"epochs={config.epochs} but workdir={workdir!r} already holds epoch {start_epoch};"
                         " use a fresh workdir or at least that many epochs")

    images_all, labels_all = jnp.asarray(dataset.images), jnp.asarray(dataset.labels)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               disable=not config.progress, desc="train", unit="step")
    try:
        for epoch in range(start_epoch, config.epochs):
            order = jax.random.permutation(jax.random.fold_in(k_shuffle, epoch), n)
            batches = order[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch, config.batch_size)
            losses, accs = [], []
            for i in range(steps_per_epoch):
                global_step = epoch * steps_per_epoch + i
                state, loss, acc = step(state, images_all, labels_all, batches, i, k_noise, global_step)
                losses.append(loss)
                accs.append(acc)
                bar.update(1)
            history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
            history["train_accuracy"].append(float(jnp.mean(jnp.stack(accs))))
            if eval_dataset is not None:
                history["test_accuracy"].append(evaluate(module, _variables(state), eval_dataset,
                                                         batch_size=config.eval_batch_size, _predict=predict))
            bar.set_postfix(epoch=epoch + 1, loss=f"{history['train_loss'][-1]:.3f}",
                            **({"test_acc": f"{history['test_accuracy'][-1]:.3f}"} if eval_dataset else {}))
            manager.save(epoch + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             history=ocp.args.JsonSave(history)))
        manager.wait_until_finished()
    finally:
        bar.close()
        manager.close()

    final = _variables(state)
    model_dir = os.path.join(workdir, "model")
    extra = {"train_config": config.describe(),
             "test_accuracy": history["test_accuracy"][-1] if history["test_accuracy"] else None}
    model_io.save_model(model_dir, config.arch, model_config, final, dataset=dataset.name, extra=extra,
                        overwrite=True)
    return TrainResult(
        final, model_dir,
        np.asarray(history["train_loss"], np.float32),
        np.asarray(history["train_accuracy"], np.float32),
        np.asarray(history["test_accuracy"], np.float32) if eval_dataset is not None else None,
        start_epoch,
    )


def _variables(state: dict) -> dict:
    return {k: state[k] for k in ("params", "batch_stats") if k in state}


#: The default model's recipe: small_cnn on the digits, Gaussian noise sigma = 0.25.
DEFAULT_CONFIG = TrainConfig(family=noise_lib.Gaussian(0.25), arch="small_cnn", epochs=20, batch_size=64,
                             learning_rate=0.05, lr_step_epochs=15, progress=False)


def train_default_model(key, workdir: str | os.PathLike, *, progress: bool = False) -> TrainResult:
    """Trains the default model (small_cnn, digits, Gaussian sigma = 0.25).

    Takes well under a minute on 2 CPU cores; the saved model is ``workdir/model``.

    Args:
      key: PRNG key.
      workdir: directory for checkpoints and the model.
      progress: show a tqdm bar.

    Returns:
      :class:`TrainResult` with ``test_accuracy`` the clean accuracy on the digits
      test split after each epoch.
    """
    config = dataclasses.replace(DEFAULT_CONFIG, progress=progress)
    return train(key, config, data_lib.load_digits("train"), workdir=workdir,
                 eval_dataset=data_lib.load_digits("test"))
