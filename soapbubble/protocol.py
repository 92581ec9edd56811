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

Bilateral certificates (``certify(..., bilateral=True)``; MATH.md section 3,
"Multi-class, bilateral"). Cohen et al. bound every other class by ``1 - pA``;
the bilateral condition compares the top class's worst case with the best case
of EVERY other class ``B``: radius ``r`` is certified when
``V_r(pA_lower) > 1 - V_r(1 - pB_upper)``
(:meth:`~soapbubble.bounds.table.RadiusTable.bilateral_radius`; Gaussian:
``r < sigma/2 (Phi^-1(pA) - Phi^-1(pB))``). ``pB_upper`` must bound the largest
probability of ALL other classes, not of the runner-up picked from the same
samples (that choice would bias it low). The construction, from the same ``n``
estimation samples (class ``A`` chosen on the ``n0`` separate ones):

* ``pA_lower``: Clopper-Pearson lower bound at ``alpha_a = alpha_p / 2``;
* for EACH of the ``C - 1`` other classes, the Clopper-Pearson upper bound at
  ``alpha_b = alpha_p / (2 (C - 1))``; their maximum is the bound at the
  largest other count (the bound is increasing in the count), plus the
  sampler's total-variation bound;
* a union bound: all ``C`` bounds hold at once with probability at least
  ``1 - alpha_a - (C - 1) alpha_b >= 1 - alpha_p``. On that event ``pB <= 1 - pA
  <= 1 - pA_lower`` too, so ``p_upper = min(pB_upper, 1 - pA_lower)``, and the
  unilateral radius from the same ``pA_lower`` also holds: the certificate
  takes the larger of the two. With ``C = 2``, ``pB = 1 - pA`` exactly and all of
  ``alpha_p`` goes to ``pA`` (the certificate is then the unilateral one).

:meth:`soapbubble.bounds.WorstCase.bilateral_budget` decides this split; the
certificate abstains unless ``pA_lower >= 1/2`` or ``pA_lower > p_upper``.
The sequential route (:mod:`soapbubble.sequential`) certifies bilaterally the same way, with
confidence sequences in place of Clopper-Pearson bounds.

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

from soapbubble import _validation as check
from soapbubble import counting
from soapbubble.bounds import cache as cache_lib
from soapbubble.bounds import confidence
from soapbubble.bounds import table as table_lib
from soapbubble.bounds.rules import AlphaBudget, BilateralBudget, WorstCase, worst_case

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
      p_upper: bilateral certificates only (None otherwise), float64: the upper
        bound on the probability of every class other than the certified one,
        ``min(pB_upper, 1 - p_lower)``; reported also when abstaining.
      bilateral: bilateral certificates only (None otherwise), how ``alpha_p``
        was split: ``{"alpha_a": level of p_lower, "alpha_b": level of EACH upper
        bound on the num_classes - 1 other classes, "num_classes": C,
        "construction": text}`` (``BilateralBudget.as_dict()["bilateral"]``;
        ``alpha_a + (num_classes - 1) alpha_b <= alpha_p``). A TSV sidecar
        records the whole ``BilateralBudget.as_dict()`` as its ``alpha_budget``.
    """

    prediction: Any
    radius: Any
    p_lower: Any
    count: Any
    n: Any
    alpha_p: float
    alpha_d: float
    p_upper: Any = None
    bilateral: Any = None


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


def setup(key, logits_fn, x, family, *, attack, alpha, table, table_dir, batched, batch_size,
          bilateral=False) -> Setup:
    """Checks the arguments shared by the certifying protocols; builds or checks the table last.

    With ``bilateral=True`` the table must keep the bilateral V grid: a given
    table without it is refused, and the default one is
    :func:`~soapbubble.bounds.cache.cached_radius_table` with ``bilateral=True``.
    """
    key = check.key(key)
    model = counting.as_classifier(logits_fn)
    family = check.family(family)
    rule = worst_case(family, attack)
    alpha = check.check_unit_interval(alpha, "alpha")
    check.batch_size(batch_size, counting.CHUNK)
    batched = check.flag(batched, "batched")
    xs, input_shape = check.inputs(x, batched)
    check.pixel_range(x, logits_fn)
    d = family.check_dimension(math.prod(input_shape))
    if table is not None:
        cache_lib.check_table(table, family, d, attack)
        budget = rule.alpha_budget(alpha, table.alpha_d)
        if bilateral and not table.bilateral:
            raise ValueError(
                "bilateral=True needs a radius table with the bilateral V grid, and this one has none: build it"
                " with radius_table(..., bilateral=True), or pass table=None to use the cached bilateral table"
            )
    elif bilateral:  # may take long (exact route, Monte Carlo): only once everything else is checked
        budget = rule.alpha_budget(alpha)
        table = cache_lib.cached_radius_table(family, d, attack, alpha_d=budget.alpha_d, table_dir=table_dir,
                                              bilateral=True)
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
def _stream_keys(key, ids):
    """``split(fold_in(key, i))`` of each row id ``i``: ``(rows, 2)`` keys (selection, estimation)."""
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(ids)


def check_row_ids(row_ids: Any, rows: int, batched: bool) -> np.ndarray:
    """The ids whose ``fold_in`` keys the rows draw with: ``row_ids`` checked, or ``0 .. rows - 1``."""
    if row_ids is None:
        return np.arange(rows, dtype=np.uint32)
    if not batched:
        raise ValueError("row_ids needs batched=True (one input draws with the key itself)")
    ids = np.asarray(row_ids)
    if ids.shape != (rows,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"row_ids must be {rows} integers (one per row of the inputs), got {ids.dtype} of shape {ids.shape}")
    if np.any(ids < 0) or np.any(ids > np.iinfo(np.uint32).max):
        raise ValueError("row_ids must be in [0, 2**32 - 1]")
    return ids.astype(np.uint32)


def stream_keys(key, rows: int, batched: bool, row_ids: Any = None) -> jax.Array:
    """``(rows, 2)`` keys of each row's ``n0`` and ``n`` samples: ``split(fold_in(key, id))``, or
    ``split(key)`` for one input."""
    if not batched:
        return jax.random.split(key)[None]
    return _stream_keys(key, jnp.asarray(check_row_ids(row_ids, rows, batched)))


def select(votes0: np.ndarray, votes: np.ndarray, bilateral: bool = False) -> tuple[np.ndarray, ...]:
    """Cohen's selection, on the host for every row at once.

    Args:
      votes0: ``(rows, C + 1)`` counts of the ``n0`` selection samples (last: non-finite logits).
      votes: ``(rows, C + 1)`` counts of the ``n`` estimation samples.
      bilateral: also return the largest count of any other class among the ``n`` samples.

    Returns:
      int64 arrays ``(top, count, bad)`` (and ``max_other``): the top class of the
      ``n0`` counts (the first on ties), its count among the ``n`` samples, and the
      non-finite samples of both.
    """
    rows = np.arange(votes.shape[0])
    top = np.argmax(votes0[:, :-1], axis=1)
    out = (top, votes[rows, top], votes0[:, -1] + votes[:, -1])
    if not bilateral:
        return tuple(np.asarray(a, np.int64) for a in out)
    others = votes[:, :-1].copy()
    others[rows, top] = -1
    return tuple(np.asarray(a, np.int64) for a in (*out, others.max(axis=1)))


def bilateral_bounds(counts: np.ndarray, max_other: np.ndarray, n: int, budget: BilateralBudget,
                     sampler_tv: float) -> tuple[np.ndarray, np.ndarray]:
    """``(p_lower, p_upper)`` of a bilateral certificate (module docstring), float64.

    Args:
      counts: the selected class's counts among the ``n`` estimation samples.
      max_other: the largest count of any other class among the same samples.
      n: the number of estimation samples.
      budget: the split, from :meth:`~soapbubble.bounds.WorstCase.bilateral_budget`.
      sampler_tv: the sampler's total-variation bound (subtracted from ``p_lower``,
        added to ``p_upper``).
    """
    p_lower = confidence.subtract_down(confidence.clopper_pearson_lower_exact(counts, n, budget.alpha_a), sampler_tv)
    cap = confidence.one_minus_up(p_lower)  # every other class has pB <= 1 - pA <= 1 - p_lower
    if budget.num_classes == 2:
        return p_lower, cap
    p_b = confidence.add_up(confidence.clopper_pearson_upper_exact(max_other, n, budget.alpha_b), sampler_tv)
    return p_lower, np.minimum(p_b, cap)


def bilateral_certificate(table, p_lower: np.ndarray, p_upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether bilateral bounds certify, and the radius (module docstring): the one rule.

    An input is certified when ``p_lower >= 1/2`` or ``p_lower > p_upper``; its radius
    is the larger of the unilateral ``table.radius(p_lower)`` and
    ``table.bilateral_radius(p_lower, p_upper)`` (both valid on the same event), 0 when
    it abstains. :func:`certify` and the sequential route both ask this.

    Returns:
      ``(certified, radius)``: bool and float64 arrays of ``p_lower``'s shape.
    """
    p_lower, p_upper = np.asarray(p_lower, np.float64), np.asarray(p_upper, np.float64)
    certified = (p_lower >= 0.5) | (p_lower > p_upper)
    best = np.maximum(table.radius(p_lower), table.bilateral_radius(p_lower, p_upper))
    return certified, np.where(certified, best, 0.0).astype(np.float64)


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
    bilateral: bool = False,
    row_ids=None,
) -> Certificate:
    """Cohen et al.'s CERTIFY for the classifier smoothed by ``family``.

    The class is the most frequent one on ``n0`` noisy samples; its count among
    ``n`` fresh samples gives ``p_lower`` at level ``alpha_p`` (module
    docstring); the certificate abstains (``prediction = -1``, ``radius = 0``)
    when ``p_lower < 1/2`` and otherwise certifies ``table.radius(p_lower)``. It
    is wrong with probability at most ``alpha``. Every argument is checked
    before anything is sampled.

    With ``bilateral=True`` (module docstring) the same counts also bound every
    other class from above: ``p_lower`` at ``alpha_a = alpha_p / 2``, each of the
    ``C - 1`` other classes at ``alpha_b = alpha_p / (2 (C - 1))`` (union bound),
    and the radius is the larger of ``table.radius(p_lower)`` and
    ``table.bilateral_radius(p_lower, p_upper)``; the certificate abstains unless
    ``p_lower >= 1/2`` or ``p_lower > p_upper``. Still wrong with probability at
    most ``alpha``; ``p_upper`` and the split are recorded in the certificate.

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
        is certified with the key ``jax.random.fold_in(key, i)``. The rows go
        through the compiled loop in groups (up to 64 per call, their samples
        sharing forward batches; :meth:`~soapbubble.counting.Counter.rows`), with
        certificates equal bit for bit to one call per row: pass many small
        inputs at once rather than one at a time.
      row_ids: with ``batched=True``, optional ``(rows,)`` integers in
        ``[0, 2**32)``: row ``i`` is certified with ``fold_in(key, row_ids[i])``
        instead of ``fold_in(key, i)`` (a dataset's row indices, so any group of
        rows gives each row the certificate it gets alone).
      bilateral: certify with the bilateral condition (a bool). The table must
        keep the V grid (``radius_table(..., bilateral=True)``); the default one
        is :func:`~soapbubble.bounds.cache.cached_radius_table` with ``bilateral=True`` (built once: instant for Gaussian,
        about a minute for L2Family on 2 cores, seconds beyond the unilateral
        table for MixedLinf).

    Returns:
      A :class:`Certificate`: numpy scalars for one input, ``(rows,)`` arrays
      for a batch.

    Raises:
      ValueError: for a bad argument, a table that does not match the call, a
        table whose ``alpha_d >= alpha``, a table without the V grid with
        ``bilateral=True``, or a classifier that returned NaN or infinite
        logits under noise.

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
    bilateral = check.flag(bilateral, "bilateral")
    batched = check.flag(batched, "batched")
    check_row_ids(row_ids, np.shape(x)[0] if batched and np.ndim(x) else 1, batched)  # before the table
    s = setup(key, logits_fn, x, family, attack=attack, alpha=alpha, table=table, table_dir=table_dir,
              batched=batched, batch_size=batch_size, bilateral=bilateral)
    count = counting.counter(s.model, (n0, n), batch_size, s.input_shape, s.xs.dtype)
    keys = stream_keys(s.key, s.xs.shape[0], batched, row_ids)
    votes = count.rows(keys, s.xs, s.family)  # (rows, 2, C + 1)
    num_classes = count.num_classes
    tops, counts, bad, *rest = select(votes[:, 0], votes[:, 1], bilateral)
    refuse_nonfinite(bad, n0 + n)
    alpha_p, alpha_d = s.budget.alpha_p, s.budget.alpha_d
    p_upper = split = None
    if bilateral:
        budget = s.rule.bilateral_budget(s.budget.alpha, num_classes, s.budget.alpha_d)
        p_lower, p_upper = bilateral_bounds(counts, rest[0], n, budget, s.sampler_tv)
        certified, radius = bilateral_certificate(s.table, p_lower, p_upper)
        split = budget.as_dict()["bilateral"]
    else:
        p_lower = confidence.subtract_down(confidence.clopper_pearson_lower_exact(counts, n, alpha_p), s.sampler_tv)
        certified = p_lower >= 0.5
        radius = np.where(certified, s.table.radius(p_lower), 0.0).astype(np.float64)
    prediction = np.where(certified, tops, -1).astype(np.int32)
    if batched:
        return Certificate(prediction, radius, p_lower, counts, np.full(counts.shape, n, np.int64), alpha_p, alpha_d,
                           p_upper, split)
    return Certificate(np.int32(prediction[0]), np.float64(radius[0]), np.float64(p_lower[0]), int(counts[0]), n,
                       alpha_p, alpha_d, None if p_upper is None else np.float64(p_upper[0]), split)


def top_two(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(top, n_a, n_b, bad)`` of ``(rows, C + 1)`` votes on the host: the top class (the first on
    ties), the two largest counts, and the non-finite samples."""
    counts = votes[:, :-1]
    rows = np.arange(counts.shape[0])
    top = np.argmax(counts, axis=1)
    n_a = counts[rows, top]
    rest = counts.copy()
    rest[rows, top] = -1
    return top, n_a, rest.max(axis=1), votes[:, -1]


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
    votes = count.rows(row_keys(key, rows.shape[0], batched)[:, None], rows, family)[:, 0]
    top, n_a, n_b, bad = (np.asarray(a, dtype=np.int64) for a in top_two(votes))
    refuse_nonfinite(bad, n)
    pvalue = binomial_pvalue(n_a, n_a + n_b)
    prediction = np.where(pvalue <= alpha, top, -1).astype(np.int32)
    return prediction if batched else int(prediction[0])
