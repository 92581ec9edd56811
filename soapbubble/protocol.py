"""Cohen et al.'s PREDICT and CERTIFY for any classifier and any smoothing family.

A classifier is any callable pytree ``logits_fn(batch) -> logits`` on
pixel-space inputs (see :mod:`soapbubble.counting`: its arrays are traced, so
new weights compile nothing new). The smoothed classifier returns the class the
base classifier picks most often on ``x + z``, ``z ~ noise``. :func:`certify`
bounds the probability ``pA`` of that class from below and turns the bound into
a certified radius with a :class:`~soapbubble.bounds.table.RadiusTable`;
:func:`predict` only decides the class, abstaining when a binomial test cannot
tell the top two classes apart.

Keys. ``certify`` splits its key in two: the first half draws the ``n0``
selection samples, the second the ``n`` estimation samples, so the two sets are
independent, as Cohen et al.'s protocol requires. ``predict`` uses its key
directly. Row ``i`` of a batch is certified with ``jax.random.fold_in(key, i)``
(``certify(key, f, xs, fam, batched=True)[i]`` equals
``certify(jax.random.fold_in(key, i), f, xs[i], fam)``), so certificates do not
depend on how rows are spread over calls, processes or hosts.

Alpha accounting (:func:`soapbubble.bounds.worst_case` decides it). A
certificate is wrong with probability at most ``alpha = alpha_p + alpha_d``:
``pA`` gets the exact one-sided Clopper-Pearson bound at level ``alpha_p``
(:func:`~soapbubble.bounds.confidence.clopper_pearson_lower_exact`, float64 on
the host, any ``n``), and ``alpha_d`` is the radius table's own failure
probability (0 for the closed-form Gaussian and exact l2-family tables; tables
built here for ``MixedLinf`` get ``alpha / 2``). Where the sampler only
approximates its family (MixedLinf's tabulated radial law), its total-variation
bound is subtracted from the bound on ``pA``. Both shares are recorded in every
:class:`Certificate`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from soapbubble import noise, certify
  >>> w = jnp.ones(4) / 2.0                        # unit normal of the boundary w.x = 0
  >>> logits_fn = lambda b: jnp.stack([-(b @ w), b @ w], axis=-1)
  >>> cert = certify(jax.random.key(0), logits_fn, jnp.full(4, 0.5), noise.Gaussian(0.25),
  ...                n=10_000, alpha=0.001)
  >>> int(cert.prediction), bool(0.5 < cert.radius <= 1.0)   # exact radius: w.x = 1
  (1, True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from jax import lax

from soapbubble import _validation as check
from soapbubble import counting
from soapbubble.bounds import cache as cache_lib
from soapbubble.bounds import confidence
from soapbubble.bounds import table as table_lib
from soapbubble.bounds.rules import AlphaBudget, WorstCase, worst_case

__all__ = ["Certificate", "certify", "predict"]


class Certificate(NamedTuple):
    """The outcome of :func:`certify`; arrays with a leading row axis for batched inputs.

    Attributes:
      prediction: int32, the certified class, ``-1`` when abstaining.
      radius: float64, the certified radius (in the attack's norm, pixel space),
        rounded down to the table's grid; 0 when abstaining.
      p_lower: float64, the lower bound on ``pA`` at level ``alpha_p`` (the exact
        Clopper-Pearson bound, less the sampler's total-variation bound);
        reported also when abstaining.
      count: int64, how many of the ``n`` estimation samples gave the selected class.
      n: int64, the number of estimation samples.
      alpha_p: float, the level of ``p_lower``.
      alpha_d: float, the radius table's failure probability; the certificate is
        wrong with probability at most ``alpha_p + alpha_d``.
    """

    prediction: Any
    radius: Any
    p_lower: Any
    count: Any
    n: Any
    alpha_p: float
    alpha_d: float


class Setup(NamedTuple):
    """Everything :func:`certify` and the sequential route check before sampling."""

    key: jax.Array
    model: counting.Classifier
    family: Any
    rule: WorstCase
    xs: jax.Array
    input_shape: tuple
    d: int
    table: table_lib.RadiusTable
    budget: AlphaBudget
    sampler_tv: float


def setup(key, logits_fn, x, family, *, attack, alpha, table, table_dir, batched, batch_size) -> Setup:
    """Checks the arguments shared by the certifying protocols; builds or checks the table last."""
    key = check.key(key)
    model = counting.as_classifier(logits_fn)
    family = check.family(family)
    rule = worst_case(family, attack)
    alpha = check.check_unit_interval(alpha, "alpha")
    check.batch_size(batch_size, counting.CHUNK)
    batched = check.flag(batched, "batched")
    xs, input_shape = check.inputs(x, batched)
    d = family.check_dimension(math.prod(input_shape))
    if table is not None:
        cache_lib.check_table(table, family, d, attack)
        budget = rule.alpha_budget(alpha, table.alpha_d)
    else:  # may take long (Monte Carlo): only once everything else is checked
        budget = rule.alpha_budget(alpha)
        table = cache_lib.cached_radius_table(family, d, attack, alpha_d=budget.alpha_d, table_dir=table_dir)
    xs = xs if batched else xs[None]
    return Setup(key, model, family, rule, xs, input_shape, d, table, budget, rule.sampler_tv(family, d))


@jax.jit
def _row_keys(key, rows):
    """Per-row keys ``fold_in(key, i)``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(rows)


def row_keys(key, rows: int, batched: bool) -> jax.Array:
    """The key of each row: ``fold_in(key, i)`` for a batch, the key itself for one input."""
    return _row_keys(key, jnp.arange(rows)) if batched else key[None]


def refuse_nonfinite(bad: np.ndarray, total: int) -> None:
    """A ValueError when any noisy sample gave non-finite logits (no certificate from NaN votes)."""
    bad = np.asarray(bad)
    if np.any(bad):
        row = int(np.argmax(bad > 0))
        raise ValueError(
            f"logits_fn returned non-finite logits (NaN or inf) on {int(bad[row])} of {total} noisy samples"
            f" of row {row}; no certificate is given for such a classifier"
        )


@jax.jit
def _select(votes0, votes):
    """Cohen's selection: the top class of the n0 counts, and its count among the n samples."""
    top = jnp.argmax(votes0[:-1]).astype(jnp.int32)
    return top, votes[top], votes0[-1] + votes[-1]


def certify(
    key,
    logits_fn: Callable,
    x,
    family,
    *,
    attack: str = "l2",
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    table: table_lib.RadiusTable | None = None,
    table_dir: str | os.PathLike | None = None,
    batched: bool = False,
) -> Certificate:
    """Cohen et al.'s CERTIFY for the classifier smoothed by ``family``.

    The class is the most frequent one on ``n0`` noisy samples; its count among
    ``n`` fresh samples gives ``p_lower`` at level ``alpha_p`` (module
    docstring); the certificate abstains (``prediction = -1``, ``radius = 0``)
    when ``p_lower < 1/2`` and otherwise certifies ``table.radius(p_lower)``. It
    is wrong with probability at most ``alpha``. Every argument is checked
    before anything is sampled.

    Args:
      key: PRNG key; split into the selection and the estimation keys.
      logits_fn: callable pytree ``(rows, *input_shape) -> (rows, num_classes)``,
        ``num_classes >= 2`` (a function, a ``jax.tree_util.Partial(apply_fn,
        variables)``, ``soapbubble.models.load(path)``); its arrays are traced.
      x: one input (``batched=False``), or a stack of inputs with a leading row
        axis (``batched=True``); floating, finite, pixel space.
      family: Gaussian, L2Family or MixedLinf (PureLinf has no certificate).
      attack: "l2" or "linf" (MixedLinf certifies linf only).
      n0: selection samples, in ``[1, 2**31 - 1]``.
      n: estimation samples, in ``[1, 2**31 - 1]``.
      alpha: total failure probability, in (0, 1).
      batch_size: rows per device per step, ``>= 50`` (one noise chunk; rounded
        down to a multiple of 50).
      table: a radius table for (family, d = input size, attack); default: built
        by :func:`~soapbubble.bounds.cache.cached_radius_table` (MixedLinf:
        ``alpha_d = alpha / 2``) and cached in ``table_dir``.
      table_dir: cache directory (default ``$SOAPBUBBLE_CACHE/tables``).
      batched: whether ``x`` holds many inputs along axis 0 (a bool); row ``i``
        is certified with the key ``jax.random.fold_in(key, i)``.

    Returns:
      A :class:`Certificate`: numpy scalars for one input, ``(rows,)`` arrays
      for a batch.

    Raises:
      ValueError: for a bad argument, a table that does not match the call, a
        table whose ``alpha_d >= alpha``, or a classifier that returned NaN or
        infinite logits under noise.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from soapbubble import noise
      >>> f = lambda b: jnp.stack([jnp.zeros(b.shape[0]), jnp.ones(b.shape[0])], axis=-1)
      >>> c = certify(jax.random.key(1), f, jnp.zeros((2, 3)), noise.Gaussian(0.5),
      ...             n=1000, batched=True)
      >>> c.prediction.tolist(), c.count.tolist()
      ([1, 1], [1000, 1000])
    """
    n0 = check.count(n0, "n0")
    n = check.count(n, "n")
    s = setup(key, logits_fn, x, family, attack=attack, alpha=alpha, table=table, table_dir=table_dir,
              batched=batched, batch_size=batch_size)
    count0 = counting.counter(s.model, n0, batch_size, s.input_shape, s.xs.dtype)
    count = counting.counter(s.model, n, batch_size, s.input_shape, s.xs.dtype)

    keys = row_keys(s.key, s.xs.shape[0], batched)
    out = []
    for i in range(s.xs.shape[0]):  # one input at a time: memory stays bounded by batch_size
        k_select, k_estimate = jax.random.split(keys[i])
        out.append(_select(count0(k_select, s.xs[i], s.family), count(k_estimate, s.xs[i], s.family)))
    tops, counts, bad = (np.asarray(a, dtype=np.int64) for a in zip(*jax.device_get(out)))
    refuse_nonfinite(bad, n0 + n)
    p_lower = confidence.subtract_down(confidence.clopper_pearson_lower_exact(counts, n, s.budget.alpha_p),
                                       s.sampler_tv)
    certified = p_lower >= 0.5
    prediction = np.where(certified, tops, -1).astype(np.int32)
    radius = np.where(certified, s.table.radius(p_lower), 0.0).astype(np.float64)
    alpha_p, alpha_d = s.budget.alpha_p, s.budget.alpha_d
    if batched:
        return Certificate(prediction, radius, p_lower, counts, np.full(counts.shape, n, np.int64), alpha_p, alpha_d)
    return Certificate(np.int32(prediction[0]), np.float64(radius[0]), np.float64(p_lower[0]), int(counts[0]), n,
                       alpha_p, alpha_d)


@jax.jit
def _top_two(votes):
    values, classes = lax.top_k(votes[:-1], 2)
    return classes[0].astype(jnp.int32), values[0], values[1], votes[-1]


def binomial_pvalue(n_a: np.ndarray, n_ab: np.ndarray) -> np.ndarray:
    """Two-sided exact binomial test of ``p = 1/2`` (host, float64), never below the exact value."""
    m = np.minimum(n_a, n_ab - n_a)
    tail = scipy.stats.binom.cdf(m, n_ab, 0.5) * (1.0 + confidence.TAIL_MARGIN)
    return np.where(2 * m < n_ab, np.minimum(1.0, 2.0 * tail), 1.0)


def predict(
    key,
    logits_fn: Callable,
    x,
    family,
    *,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    batched: bool = False,
):
    """Cohen et al.'s PREDICT: the smoothed classifier's class, or -1 (abstain).

    Counts the classes on ``n`` noisy samples and returns the top class when the
    two-sided binomial test of ``nA`` against ``nA + nB`` (the top two counts)
    rejects ``p = 1/2`` at level ``alpha``; the answer then differs from the
    smoothed classifier's with probability at most ``alpha``.

    Args:
      key: PRNG key (row ``i`` of a batch uses ``jax.random.fold_in(key, i)``).
      logits_fn: as in :func:`certify`.
      x: one input, or a stack of inputs with ``batched=True``.
      family: any :mod:`soapbubble.noise` family (PureLinf included: no radius is claimed).
      n: samples, in ``[1, 2**31 - 1]``.
      alpha: level of the test, in (0, 1).
      batch_size: rows per device per step, ``>= 50``.
      batched: whether ``x`` holds many inputs along axis 0 (a bool).

    Returns:
      An ``int`` for one input; an int32 ``(rows,)`` array for a batch.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from soapbubble import noise
      >>> f = lambda b: jnp.stack([b[:, 0], -b[:, 0]], axis=-1)
      >>> predict(jax.random.key(0), f, jnp.array([2.0, 0.0]), noise.Gaussian(0.5), n=1000)
      0
    """
    key = check.key(key)
    model = counting.as_classifier(logits_fn)
    family = check.family(family)
    n = check.count(n, "n")
    alpha = check.check_unit_interval(alpha, "alpha")
    batch_size = check.batch_size(batch_size, counting.CHUNK)
    batched = check.flag(batched, "batched")
    xs, input_shape = check.inputs(x, batched)
    family.check_dimension(math.prod(input_shape))
    count = counting.counter(model, n, batch_size, input_shape, xs.dtype)

    rows = xs if batched else xs[None]
    keys = row_keys(key, rows.shape[0], batched)
    out = [_top_two(count(keys[i], rows[i], family)) for i in range(rows.shape[0])]
    top, n_a, n_b, bad = (np.asarray(a, dtype=np.int64) for a in zip(*jax.device_get(out)))
    refuse_nonfinite(bad, n)
    pvalue = binomial_pvalue(n_a, n_a + n_b)
    prediction = np.where(pvalue <= alpha, top, -1).astype(np.int32)
    return prediction if batched else int(prediction[0])
