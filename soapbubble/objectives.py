"""Differentiable certified-radius quantities for training research (MACER style).

For any smoothing family with a radius table (:mod:`soapbubble.bounds.table`),
:func:`smoothed_radius` gives a *soft* smoothed classifier's certified radius as a
differentiable function of the classifier's parameters and of the input:

1. draw ``n`` noise vectors ``z = family.sample(key, n, x.shape, dtype)``
   (``dtype``: that of ``x`` if floating, else float32);
2. average the tempered softmax over the noisy copies,
   ``probs = mean_i softmax(beta * logits_fn(x + z)_i)`` (MACER's soft smoothed
   classifier; ``beta -> inf`` gives the hard vote frequencies);
3. take ``p = probs[label]`` (the given label, or the top class) and map it through
   the family's own :meth:`RadiusTable.smooth_radius
   <soapbubble.bounds.table.RadiusTable.smooth_radius>`, after clipping ``p`` to
   ``[p_clip, 1 - p_clip]``.

The radius is in the units of the table's attack (l2 or l-infinity). For the
closed-form Gaussian table it is ``sigma_eff * Phi^-1(p)`` (``sigma_eff = sigma``
for l2, ``sigma / sqrt(d)`` for l-infinity), negative for ``p < 1/2``. For the other
tables (exact l2 family, Monte Carlo mixed l-infinity) it is the linear inverse of
the table's ``p_min`` with the implicit-function-theorem derivative
``dR/dp = 1 / p_min'(R)``; outside the table's finite range
``(p_min[0], p_min[-1])`` the radius is clamped (to ``radii[0] = 0`` below, to the
largest finite radius above) and its derivative is 0. So for those families an
input whose ``p`` is at most ``p_min[0]`` (about 1/2, more for a Monte Carlo table:
its DKW slack) contributes no radius gradient. The clip to
``[p_clip, 1 - p_clip]`` (also zero gradient outside) keeps the Gaussian's
``Phi^-1`` and its derivative finite when the tempered softmax saturates.

**This is a training objective, not a certificate.** ``p`` is a soft, tempered
probability estimated from a handful of samples, with no confidence bound: the
radius is neither sound nor rounded down. Certify with :func:`soapbubble.certify`.

Gradients: ``logits_fn`` may close over parameters (differentiate the enclosing
function), or be a :class:`jax.tree_util.Partial` ``Partial(apply_fn, params)``,
a pytree whose leaves are ``params`` (``jax.grad`` with respect to it returns a
``Partial`` of gradients). :func:`smoothed_radius_fn` wraps an
``apply_fn(params, batch)`` (flax's ``module.apply``) into a compiled
``f(params, key, x, label=None)``, the shape optax/flax training code expects:
``jax.grad(lambda p: f(p, key, x, y).radius)(params)``. The gradient with
respect to ``x`` flows through ``x + z`` (the noise does not depend on ``x``, so
the same ``key`` gives common random numbers).

Batches: one call handles one input; map over a batch with :func:`jax.vmap`,
one key per row::

    keys = jax.random.split(key, xs.shape[0])
    out = jax.vmap(lambda k, x, y: smoothed_radius(k, logits_fn, x, family, table, label=y))(keys, xs, ys)
    out.radius  # (B,)

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from soapbubble import noise
  >>> from soapbubble.bounds.table import radius_table
  >>> family = noise.Gaussian(0.5)
  >>> table = radius_table(None, family, 4, "l2")  # closed form: no key
  >>> w = jnp.array([[1.0, -1.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
  >>> out = smoothed_radius(jax.random.key(1), lambda b: b @ w, jnp.ones(4), family, table, beta=4.0)
  >>> out.probs.shape, out.radius.shape, int(out.label)
  ((2,), (), 0)
  >>> bool(jnp.allclose(out.radius, 0.5 * jax.scipy.special.ndtri(out.p)))
  True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soapbubble import noise as noise_lib
from soapbubble.bounds import table as table_lib

__all__ = ["SmoothedRadius", "radius_from_logits", "smoothed_radius", "smoothed_radius_fn"]

#: Default clip of the soft probability: keeps ``Phi^-1`` (and its derivative) finite.
P_CLIP = 1e-6


class SmoothedRadius(NamedTuple):
    """A soft smoothed classifier's differentiable radius (a training quantity, not a certificate).

    Shapes are for one input; :func:`radius_from_logits` with batched logits and
    :func:`jax.vmap` prepend the batch axes to every field.

    Attributes:
      probs: ``(C,)`` floating (the logits' dtype): ``mean softmax(beta * logits)``
        over the noisy copies; sums to 1.
      label: ``()`` int32: the class whose radius is given (the ``label`` argument,
        or ``argmax(probs)``; ties go to the lowest class).
      p: ``()`` floating: ``probs[label]``, unclipped.
      radius: ``()`` floating (dtype of ``probs``): ``table.smooth_radius(clip(p,
        p_clip, 1 - p_clip))``, in the units of the table's attack.
    """

    probs: jax.Array
    label: jax.Array
    p: jax.Array
    radius: jax.Array


def _check_table(table: Any) -> table_lib.RadiusTable:
    if not isinstance(table, table_lib.RadiusTable):
        raise TypeError(
            f"table must be a soapbubble.bounds.table.RadiusTable (radius_table(...)), got {type(table).__name__}"
        )
    return table


def _check_p_clip(p_clip: Any) -> float:
    p_clip = float(p_clip)
    if not 0.0 < p_clip < 0.5:
        raise ValueError(f"p_clip must be in (0, 1/2), got {p_clip}")
    return p_clip


def _check_beta(beta: Any) -> None:
    if isinstance(beta, (int, float, np.integer, np.floating)) and not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_table_matches(table: table_lib.RadiusTable, family: noise_lib.SmoothingFamily, d: int) -> None:
    """Refuses a table built for another family, k, dimension or (concrete) sigma."""
    meta = table.metadata
    desc = family.describe()
    problems = []
    if "family" in meta and meta["family"] != desc["family"]:
        problems.append(f"family {meta['family']!r} (noise is {desc['family']!r})")
    if "k" in meta and float(meta["k"]) != float(desc["k"]):
        problems.append(f"k={meta['k']} (noise has k={desc['k']})")
    if "d" in meta and int(meta["d"]) != d:
        problems.append(f"d={meta['d']} (the input has {d} entries)")
    if "sigma" in meta and isinstance(desc["sigma"], float) and not math.isclose(
        float(meta["sigma"]), desc["sigma"], rel_tol=1e-6
    ):
        problems.append(f"sigma={meta['sigma']} (noise has sigma={desc['sigma']})")
    if problems:
        raise ValueError("the radius table was built for another smoothing law: " + ", ".join(problems))


def radius_from_logits(
    logits: jax.Array,
    table: table_lib.RadiusTable,
    *,
    beta: float = 16.0,
    label: Any = None,
    p_clip: float = P_CLIP,
) -> SmoothedRadius:
    """The soft smoothed radius from the logits of noisy copies (the core of :func:`smoothed_radius`).

    Use it when the noisy forward pass is done elsewhere, e.g. as one batched call
    in a training step (:func:`soapbubble.train.macer_loss` does).

    Args:
      logits: ``(*batch, n, C)`` floating: logits of ``n`` noisy copies of each input.
      table: the family's :class:`~soapbubble.bounds.table.RadiusTable`.
      beta: inverse temperature of the soft smoothed classifier (> 0).
      label: ``None`` (the top class of ``probs``) or int array of shape ``batch``.
      p_clip: ``p`` is clipped to ``[p_clip, 1 - p_clip]`` before the table.

    Returns:
      :class:`SmoothedRadius` with fields of shapes ``(*batch, C)``, ``batch``,
      ``batch``, ``batch``.
    """
    table = _check_table(table)
    p_clip = _check_p_clip(p_clip)
    _check_beta(beta)
    logits = jnp.asarray(logits)
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (*batch, n, C), got {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    probs = jnp.mean(jax.nn.softmax(beta * logits, axis=-1), axis=-2)
    if label is None:
        label = jnp.argmax(probs, axis=-1)
    label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), probs.shape[:-1])
    p = jnp.take_along_axis(probs, label[..., None], axis=-1)[..., 0]
    radius = table.smooth_radius(jnp.clip(p, p_clip, 1.0 - p_clip)).astype(probs.dtype)
    return SmoothedRadius(probs=probs, label=label, p=p, radius=radius)


def smoothed_radius(
    key: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    family: noise_lib.SmoothingFamily,
    table: table_lib.RadiusTable,
    *,
    n: int = 16,
    beta: float = 16.0,
    label: Any = None,
    p_clip: float = P_CLIP,
) -> SmoothedRadius:
    """A smoothed classifier's differentiable certified radius at one input (training objective).

    Not a certificate: see the module docstring for what is computed, where the
    gradient is 0 and how to batch. Traceable: call it inside ``jax.jit``,
    ``jax.grad`` and ``jax.vmap`` (``n``, ``beta`` and ``table`` are used
    as Python values; ``family`` is a pytree, ``logits_fn`` may be a
    :class:`jax.tree_util.Partial`). ``jax.jit(smoothed_radius,
    static_argnames=("table", "n", "beta", "p_clip"))`` compiles it
    directly when ``logits_fn`` is a ``Partial``.

    Args:
      key: PRNG key of the noise; the same key gives the same noise (common random
        numbers for finite differences).
      logits_fn: batch ``(n, *x.shape) -> (n, C)`` logits; pixel space (noise is
        added to ``x`` as given).
      x: one input, any shape (``d = x.size`` must match the table's ``d``).
      family: the smoothing family the table was built for.
      table: its :class:`~soapbubble.bounds.table.RadiusTable` (``radius_table(key,
        family, d, attack)``, or ``soapbubble.bounds.cache.cached_radius_table``); the radius is in the units of its attack.
      n: noisy copies (static int >= 1).
      beta: inverse temperature of the soft smoothed classifier (> 0; MACER's 16).
      label: ``None`` (radius of the top class of ``probs``) or an int class, e.g.
        the true label (radius of that class, whatever the top class).
      p_clip: the soft probability is clipped to ``[p_clip, 1 - p_clip]`` before the
        table (zero gradient outside).

    Returns:
      :class:`SmoothedRadius` (``probs (C,)``, ``label ()`` int32, ``p ()``,
      ``radius ()``), floating fields in the logits' dtype.

    Raises:
      TypeError: ``table`` is not a RadiusTable or ``family`` not a family.
      ValueError: the table was built for another family, k, d or sigma; bad
        ``n``, ``beta`` or ``p_clip``.
    """
    if not isinstance(family, noise_lib.SmoothingFamily):
        raise TypeError(f"family must be a soapbubble.noise family, got {type(family).__name__}")
    table = _check_table(table)
    if isinstance(n, bool) or operator.index(n) < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _check_beta(beta)
    _check_p_clip(p_clip)
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)
    x = x.astype(dtype)
    _check_table_matches(table, family, int(x.size))
    z = family.sample(key, int(n), x.shape, dtype)
    logits = logits_fn(x[None] + z)
    if logits.ndim != 2 or logits.shape[0] != n:
        raise ValueError(f"logits_fn must map ({n}, *x.shape) to ({n}, C) logits, got {logits.shape}")
    return radius_from_logits(logits, table, beta=beta, label=label, p_clip=p_clip)


def smoothed_radius_fn(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    family: noise_lib.SmoothingFamily,
    table: table_lib.RadiusTable,
    *,
    n: int = 16,
    beta: float = 16.0,
    p_clip: float = P_CLIP,
) -> Callable[..., SmoothedRadius]:
    """:func:`smoothed_radius` for ``apply_fn(params, batch) -> logits``, with ``params`` first.

    Returns a jitted ``f(params, key, x, label=None) -> SmoothedRadius`` (compiled
    once per shapes and dtypes; ``family``, ``table`` and the options are fixed).
    ``params`` is any pytree, e.g. flax variables for ``module.apply``::

        radius = smoothed_radius_fn(module.apply, family, table)
        grads = jax.grad(lambda v: radius(v, key, x, y).radius)(variables)
        # a batch: jax.vmap(radius, in_axes=(None, 0, 0, 0))(variables, keys, xs, ys)

    Args:
      apply_fn: ``(params, batch (n, *x.shape)) -> (n, C)`` logits.
      family, table, n, beta, p_clip: as :func:`smoothed_radius`.
    """
    if not isinstance(family, noise_lib.SmoothingFamily):
        raise TypeError(f"family must be a soapbubble.noise family, got {type(family).__name__}")
    table = _check_table(table)
    _check_beta(beta)
    p_clip = _check_p_clip(p_clip)

    def f(params, key, x, label=None):
        return smoothed_radius(key, jax.tree_util.Partial(apply_fn, params), x, family, table,
                               n=n, beta=beta, label=label, p_clip=p_clip)

    return jax.jit(f)
