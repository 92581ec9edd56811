"""Cohen et al.'s PREDICT and CERTIFY for any classifier and any smoothing family.

A classifier is any pure function ``logits_fn(batch) -> logits`` on pixel-space
inputs. The smoothed classifier returns the class the base classifier picks most
often on ``x + z``, ``z ~ noise``. :func:`certify` bounds the probability ``pA``
of that class from below (Clopper-Pearson) and turns the bound into a certified
radius with a :class:`~soapbubble.bounds.table.RadiusTable`; :func:`predict`
only decides the class, abstaining when a binomial test cannot tell the top two
classes apart.

The counting loop
-----------------
One compiled program counts the classes of ``n`` noisy copies of ``x``: the noise
is drawn on the device inside the loop, each step evaluates ``logits_fn`` on one
batch, and the class counts are accumulated as int32 on the device, so memory is
bounded by the batch and not by ``n``, and nothing returns to the host before
the counts are final.

Randomness that does not depend on batching. The ``n`` samples are cut into
fixed chunks of :data:`CHUNK` = 50 rows; chunk ``j`` is
``noise.sample(chunk_key(key, j), CHUNK, x.shape)``, and the rows past ``n`` in
the last chunk are drawn but masked out of the counts. A step evaluates a whole
number of chunks, so ``batch_size`` is rounded *down* to a multiple of
:data:`CHUNK` (at least one chunk, and never more chunks than ``n`` needs); the
noise for sample ``i`` is the same whatever the batch size or the number of
devices. Counts are integers, so the order of summation does not matter either.
What can differ between batch shapes is ``logits_fn`` itself: a matrix product
may round differently for different batch sizes (BLAS blocking), which changes a
prediction only where two logits tie to the last bit.

Sharding. The chunks of a step are spread over every local device
(``jax.local_devices()``) with :func:`jax.shard_map` on a one-axis
:class:`~jax.sharding.Mesh`; each device counts its chunks and the counts are
summed with ``psum``. ``batch_size`` is per device. With CPU devices forced by
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` the results are those of
one device.

Many hosts. Under ``jax.distributed.initialize()`` each process certifies on its
own local devices (no cross-host collectives). Give each process its share of
the rows and the per-row key ``jax.random.fold_in(key, row)``: that is the key a
batched call uses for row ``row`` (``certify(key, f, xs, fam, batched=True)[i]``
equals ``certify(jax.random.fold_in(key, i), f, xs[i], fam)``), so the
certificates do not depend on how rows are spread over hosts.

Keys. :func:`chunk_key` derives a chunk's key from ``fold_in(key, j)``: a
``threefry4x32`` key (the same Threefry cipher as jax's default, four words
wide) seeded with 128 bits drawn from it. On a CPU, jax's default
``threefry2x32`` spends one cipher call per 32-bit word (the partitionable
mode), ``threefry4x32`` one per four, and the noise of a small model costs half
as much. Where jax lacks ``threefry4x32`` (before 0.10.2), the chunk key is
``fold_in(key, j)`` itself.

``certify`` splits its key in two: the first half draws the ``n0``
selection samples, the second the ``n`` estimation samples, so the two sets are
independent, as Cohen et al.'s protocol requires. ``predict`` uses its key
directly for its ``n`` samples.

Alpha accounting. A certificate fails (its radius is not certified) with
probability at most ``alpha``: the Clopper-Pearson bound gets
``alpha_p = alpha - table.alpha_d``, where ``table.alpha_d`` is the failure
probability of a Monte Carlo radius table (0 for the closed-form Gaussian and
exact l2-family tables). Tables built here for ``MixedLinf`` get
``alpha_d = alpha / 2``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from soapbubble import noise
  >>> from soapbubble.certify import certify
  >>> w = jnp.ones(4) / 2.0                        # unit normal of the boundary w.x = 0
  >>> logits_fn = lambda b: jnp.stack([-(b @ w), b @ w], axis=-1)
  >>> cert = certify(jax.random.key(0), logits_fn, jnp.full(4, 0.5), noise.Gaussian(0.25),
  ...                n=10_000, alpha=0.001)
  >>> int(cert.prediction), bool(0.5 < cert.radius <= 1.0)   # exact radius: w.x = 1
  (1, True)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from soapbubble import noise as noise_lib
from soapbubble._validation import check_attack as _check_attack
from soapbubble._validation import check_positive_int, check_unit_interval
from soapbubble.bounds import stats
from soapbubble.bounds import table as table_lib

__all__ = [
    "Certificate",
    "certify",
    "predict",
    "class_counts",
    "chunk_key",
    "cached_radius_table",
    "default_table_dir",
    "CHUNK",
    "TABLE_SEED",
]

#: Rows per noise chunk: the unit of randomness (chunk j uses chunk_key(key, j)).
CHUNK = 50
#: Seed of the key that builds Monte Carlo radius tables cached on disk.
TABLE_SEED = 0
#: Monte Carlo samples of a MixedLinf table built by :func:`certify`.
TABLE_SAMPLES = 1_000_000

_AXIS = "chunks"


class Certificate(NamedTuple):
    """The outcome of :func:`certify`; arrays with a leading row axis for batched inputs.

    Attributes:
      prediction: int32, the certified class, ``-1`` when abstaining.
      radius: float64, the certified radius (in the attack's norm, pixel space),
        rounded down to the table's grid; 0 when abstaining.
      p_lower: float64, the one-sided Clopper-Pearson lower bound on ``pA`` at
        level ``alpha_p`` (reported also when abstaining).
      count: int64, how many of the ``n`` estimation samples gave the selected class.
      n: int64, the number of estimation samples.
    """

    prediction: Any
    radius: Any
    p_lower: Any
    count: Any
    n: Any


# --------------------------------------------------------------------------- validation


def _check_int(value: Any, name: str, *, max_value: int | None = None) -> int:
    return check_positive_int(value, name, max_value=max_value, max_reason="the exact Clopper-Pearson range")


def _check_alpha(alpha: Any) -> float:
    return check_unit_interval(alpha, "alpha")


def _check_noise(family: Any, attack: str | None) -> noise_lib.SmoothingFamily:
    if not isinstance(family, noise_lib.SmoothingFamily):
        raise TypeError(f"noise must be a soapbubble.noise family, got {type(family).__name__}")
    sigma = np.asarray(family.describe()["sigma"])
    if sigma.ndim != 0:
        raise ValueError(f"noise.sigma must be a scalar, got shape {sigma.shape}")
    if attack is None:  # predict: every family may be sampled
        return family
    if isinstance(family, noise_lib.PureLinf):
        raise ValueError(
            "no worst-case perturbation is proven for the pure l_inf family; certify with MixedLinf"
        )
    if isinstance(family, noise_lib.MixedLinf) and attack != "linf":
        raise ValueError(
            "no worst-case perturbation is proven for an l2 attack on the MixedLinf family;"
            " certify l2 attacks with Gaussian or L2Family"
        )
    return family


def _check_key(key: Any) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got a key array of shape {key.shape}")
    elif key.dtype != jnp.uint32 or key.ndim != 1:
        raise ValueError(
            f"key must be a PRNG key (jax.random.key(seed)), got dtype {key.dtype}, shape {key.shape}"
        )
    return key


def _check_x(x: Any, batched: bool) -> tuple[jax.Array, tuple[int, ...]]:
    """Validates x on the host; returns it as a jax array (float32 or float64) and one input's shape."""
    host = np.asarray(x)
    if not np.issubdtype(host.dtype, np.floating):
        raise TypeError(
            f"x must be a floating array in pixel space (e.g. images in [0, 1]), got dtype {host.dtype}"
        )
    need = 2 if batched else 1
    if host.ndim < need:
        what = "(rows, *input_shape)" if batched else "input_shape (at least 1-D)"
        raise ValueError(f"x must have shape {what} with batched={batched}, got shape {host.shape}")
    if host.size == 0:
        raise ValueError(f"x must not be empty, got shape {host.shape}")
    bad = ~np.isfinite(host)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"x must be finite, got {host[where]!r} at index {where}")
    # Noise is drawn in x's precision; half precision is promoted to float32, and
    # float64 stays float64 only under jax_enable_x64.
    dtype = jax.dtypes.canonicalize_dtype(np.promote_types(host.dtype, np.float32))
    return jnp.asarray(x, dtype), tuple(host.shape[1:] if batched else host.shape)


def _check_logits_fn(logits_fn: Any) -> None:
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable (batch -> logits), got {type(logits_fn).__name__}")
    try:
        hash(logits_fn)
    except TypeError as e:
        raise TypeError(
            "logits_fn must be hashable (a function or a jitted function): its compiled counting"
            " loop is cached on it"
        ) from e


@functools.lru_cache(maxsize=64)
def _num_classes(logits_fn: Callable, rows: int, input_shape: tuple[int, ...], dtype: Any) -> int:
    """Checks ``logits_fn`` on one abstract batch (no computation); returns the number of classes."""
    spec = jax.ShapeDtypeStruct((rows, *input_shape), dtype)
    try:
        out = jax.eval_shape(logits_fn, spec)
    except Exception as e:  # any failure here is a bad logits_fn for this x
        raise ValueError(
            f"logits_fn failed on a batch of shape {spec.shape} and dtype {np.dtype(dtype).name}: {e}"
        ) from e
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != rows or shape[1] < 2:
        raise ValueError(
            f"logits_fn must map a batch of shape {spec.shape} to logits of shape ({rows}, num_classes)"
            f" with num_classes >= 2, got {shape if shape is not None else type(out).__name__}"
        )
    if not (jnp.issubdtype(out.dtype, jnp.floating) or jnp.issubdtype(out.dtype, jnp.integer)):
        raise ValueError(f"logits_fn must return real logits, got dtype {out.dtype}")
    return int(shape[1])


# --------------------------------------------------------------------------- counting


def _per_step(n: int, batch_size: int, n_dev: int) -> int:
    """Chunks per device per step: batch_size // CHUNK, at least 1, at most what n needs."""
    n_chunks = -(-n // CHUNK)
    return min(max(1, batch_size // CHUNK), -(-n_chunks // n_dev))


def _key_words(impl: str) -> int:
    """uint32 words of an ``impl`` key (ValueError naming the known ones if jax lacks it)."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape[-1]


@functools.cache
def _auto_impl() -> str | None:
    """``"threefry4x32"`` where this jax has it (>= 0.10.2), else None."""
    try:
        _key_words("threefry4x32")
    except ValueError:
        return None
    return "threefry4x32"


def chunk_key(key: jax.Array, j, impl: str | None = "auto") -> jax.Array:
    """The key of noise chunk ``j``: chunk ``j`` is ``noise.sample(chunk_key(key, j), CHUNK, shape)``.

    Args:
      key: the key given to :func:`class_counts` (or the half of :func:`certify`'s
        key that draws the ``n0`` or the ``n`` samples), any PRNG implementation.
      j: chunk index, int (traced or not).
      impl: the chunk keys' PRNG implementation: ``"auto"`` (what certify uses:
        ``"threefry4x32"`` where jax has it, see the module docstring), a name
        ``jax.random.key`` accepts, or ``None`` for ``fold_in(key, j)`` itself.

    Returns:
      A scalar PRNG key.

    Example:
      >>> import jax
      >>> from soapbubble import noise
      >>> z0 = noise.Gaussian(0.5).sample(chunk_key(jax.random.key(0), 0), CHUNK, (8, 8, 1))
      >>> z0.shape
      (50, 8, 8, 1)
    """
    key = jax.random.fold_in(key, j)
    if impl == "auto":
        impl = _auto_impl()
    if impl is None:
        return key
    words = _key_words(impl)
    return jax.random.wrap_key_data(jax.random.bits(key, (words,), jnp.uint32), impl=impl)


@functools.lru_cache(maxsize=8)
def _mesh_for(devices: tuple) -> Mesh:
    return Mesh(np.array(devices, dtype=object), (_AXIS,))


def _local_mesh() -> Mesh:
    return _mesh_for(tuple(jax.local_devices()))


@functools.partial(jax.jit, static_argnames=("logits_fn", "per_step", "mesh", "num_classes"))
def _count(key, x, family, n, *, logits_fn, per_step, mesh, num_classes):
    """Class counts of ``logits_fn(x + z_i)``, i < n: int32 ``(num_classes,)``, replicated.

    ``n`` is traced (one program serves every n with the same ``per_step``); the
    loop runs ``ceil(n_chunks / (devices * per_step))`` steps.
    """
    n_dev = mesh.size
    shape = x.shape
    d = math.prod(shape)
    rows = per_step * CHUNK
    n = jnp.asarray(n, jnp.int32)
    n_chunks = (n + CHUNK - 1) // CHUNK
    steps = (n_chunks + n_dev * per_step - 1) // (n_dev * per_step)

    def local(key, x, family, n, steps):
        dev = lax.axis_index(_AXIS)

        def body(step, counts):
            chunk = (step * n_dev + dev) * per_step + jnp.arange(per_step)
            keys = jax.vmap(lambda j: chunk_key(key, j))(chunk)
            # Drawn flat (the samplers work on (n, d) and reshape; same values): XLA on
            # CPU fuses the flat add into the model's input cheaper than a 4-D one.
            z = jax.vmap(lambda k: family.sample(k, CHUNK, (d,), x.dtype))(keys)
            batch = (x.reshape(1, d) + z.reshape(rows, d)).reshape((rows, *shape))
            index = (chunk[:, None] * CHUNK + jnp.arange(CHUNK)[None, :]).reshape(rows)
            pred = jnp.argmax(logits_fn(batch), axis=-1)
            # Rows past n (surplus of the last chunk, idle chunks) count for nothing.
            hits = (pred[:, None] == jnp.arange(num_classes)[None, :]) & (index < n)[:, None]
            return counts + jnp.sum(hits, axis=0, dtype=jnp.int32)

        # The counts differ between devices until the psum: mark the carry as varying.
        init = lax.pcast(jnp.zeros((num_classes,), jnp.int32), (_AXIS,), to="varying")
        counts = lax.fori_loop(0, steps, body, init)
        return lax.psum(counts, _AXIS)

    spec = P()
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)(
        key, x, family, n, steps
    )


def _counter(logits_fn, n: int, batch_size: int, input_shape, dtype):
    """A function ``(key, x, family) -> counts`` for ``n`` samples, after checking logits_fn."""
    mesh = _local_mesh()
    per_step = _per_step(n, batch_size, mesh.size)
    num_classes = _num_classes(logits_fn, per_step * CHUNK, tuple(input_shape), np.dtype(dtype))
    count = functools.partial(
        _count, logits_fn=logits_fn, per_step=per_step, mesh=mesh, num_classes=num_classes
    )
    return lambda key, x, family: count(key, x, family, np.int32(n))


def class_counts(key, logits_fn, x, noise, *, n: int, batch_size: int = 1000) -> jax.Array:
    """Class counts of ``logits_fn(x + z_i)`` over ``n`` noise samples ``z_i ~ noise`` (one input).

    The building block of :func:`predict` and :func:`certify` (see the module
    docstring for the chunked, sharded loop). No host round trip: the result
    stays on the device.

    Args:
      key: PRNG key.
      logits_fn: ``(rows, *x.shape) -> (rows, num_classes)``, pure and hashable.
      x: one input, floating, finite.
      noise: a :mod:`soapbubble.noise` family (any, PureLinf included).
      n: number of samples, >= 1.
      batch_size: rows per device per step (rounded down to a multiple of :data:`CHUNK`).

    Returns:
      int32 array ``(num_classes,)`` summing to ``n``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from soapbubble import noise
      >>> f = lambda b: jnp.stack([-b[:, 0], b[:, 0]], axis=-1)
      >>> c = class_counts(jax.random.key(0), f, jnp.zeros(3), noise.Gaussian(1.0), n=1000)
      >>> int(c.sum())
      1000
    """
    key = _check_key(key)
    _check_logits_fn(logits_fn)
    family = _check_noise(noise, None)
    n = _check_int(n, "n")
    batch_size = _check_int(batch_size, "batch_size")
    xs, input_shape = _check_x(x, batched=False)
    family.check_dimension(math.prod(input_shape))
    return _counter(logits_fn, n, batch_size, input_shape, xs.dtype)(key, xs, family)


# --------------------------------------------------------------------------- tables


def default_table_dir() -> pathlib.Path:
    """``$SOAPBUBBLE_CACHE/tables`` if ``SOAPBUBBLE_CACHE`` is set, else ``~/.cache/soapbubble/tables``."""
    root = os.environ.get("SOAPBUBBLE_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "soapbubble"
    return base / "tables"


def _table_identity(family, d: int, attack: str, alpha_d: float, n_samples: int) -> dict:
    desc = family.describe()
    if isinstance(family, noise_lib.MixedLinf):
        route, n_samples, alpha_d = "monte_carlo", int(n_samples), float(alpha_d)
    else:
        route = "closed_form" if isinstance(family, noise_lib.Gaussian) else "exact"
        n_samples, alpha_d = 0, 0.0
    return {
        "family": desc["family"],
        "sigma": float(desc["sigma"]),
        "k": float(desc["k"]),
        "d": int(d),
        "attack": attack,
        "route": route,
        "n_samples": n_samples,
        "alpha_d": alpha_d,
    }


def cached_radius_table(
    family,
    d: int,
    attack: str,
    *,
    alpha_d: float = 5e-4,
    n_samples: int = TABLE_SAMPLES,
    table_dir: str | os.PathLike | None = None,
) -> table_lib.RadiusTable:
    """The default radius table of ``(family, d, attack)``, built once and cached on disk.

    The file name is a hash of the table's identity (family, sigma, k, d, attack,
    route, n_samples, alpha_d) and its radius grid
    (:func:`~soapbubble.bounds.table.default_radii`). A cached file is read with
    ``RadiusTable.load(path, expected=identity)``; a file that does not match (or
    cannot be read) is rebuilt, with a warning. Monte Carlo tables (MixedLinf)
    are built with the fixed key ``jax.random.key(TABLE_SEED)``: the table's own
    failure probability ``alpha_d`` is over that draw, independent of any
    certification's samples.

    Args:
      family: Gaussian, L2Family or MixedLinf.
      d: input dimension.
      attack: "l2" or "linf".
      alpha_d: failure probability of a Monte Carlo table (ignored by the exact routes).
      n_samples: Monte Carlo samples (MixedLinf only).
      table_dir: directory of the cache (default :func:`default_table_dir`).

    Returns:
      The :class:`~soapbubble.bounds.table.RadiusTable`.

    Example:
      >>> import tempfile
      >>> from soapbubble import noise
      >>> t = cached_radius_table(noise.Gaussian(0.5), 16, "l2", table_dir=tempfile.mkdtemp())
      >>> t.metadata["route"]
      'closed_form'
    """
    attack = _check_attack(attack)
    _check_noise(family, attack)
    d = family.check_dimension(d)
    identity = _table_identity(family, d, attack, alpha_d, n_samples)
    radii = table_lib.default_radii(family, d, attack)
    blob = json.dumps({**identity, "radii": radii.tolist(), "format": table_lib.FORMAT_VERSION},
                      sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    folder = pathlib.Path(table_dir) if table_dir is not None else default_table_dir()
    path = folder / f"{identity['family']}-d{d}-{attack}-{digest}.npz"
    if path.exists():
        try:
            table = table_lib.RadiusTable.load(path, expected=identity)
            if np.array_equal(table.radii, radii):
                return table
            raise ValueError(f"radius table {str(path)!r} has another radius grid")
        except ValueError as e:
            warnings.warn(f"rebuilding a stale radius table: {e}", stacklevel=3)
    table = table_lib.radius_table(
        jax.random.key(TABLE_SEED), family, d, attack, radii=radii,
        n_samples=max(int(n_samples), 1), alpha=float(alpha_d) if identity["alpha_d"] else 0.5,
    )
    folder.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    os.close(fd)
    try:
        table.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return table


def _same(have: Any, want: Any) -> bool:
    """Equal, with floats compared to 1e-12 relative (as RadiusTable.load does)."""
    if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
        return math.isclose(float(have), want, rel_tol=1e-12, abs_tol=0.0)
    return have == want


def _check_table(table, family, d: int, attack: str) -> table_lib.RadiusTable:
    if not isinstance(table, table_lib.RadiusTable):
        raise TypeError(f"table must be a soapbubble RadiusTable, got {type(table).__name__}")
    desc = family.describe()
    want = {"family": desc["family"], "sigma": float(desc["sigma"]), "k": float(desc["k"]),
            "d": d, "attack": attack}
    for name, value in want.items():
        have = table.metadata.get(name)
        if not _same(have, value):
            raise ValueError(
                f"table was built for {name}={have!r} but this certification has {name}={value!r}"
            )
    return table


# --------------------------------------------------------------------------- protocols


@jax.jit
def _row_keys(key, rows):
    """Per-row keys ``fold_in(key, i)``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(rows)


# The bounds, compiled once (eager calls would re-trace their bisection loops each time)
# and called under jax.enable_x64(True) with counts and n already checked. lax.map runs
# one row at a time: a vectorised betainc rounds differently for different array
# lengths, and a row's certificate must not depend on the rows certified with it.
@jax.jit
def _cp_lower(counts, n, alpha):
    return lax.map(lambda c: stats.clopper_pearson_lower(c, n, alpha), counts)


@jax.jit
def _binom_pvalue(n_a, n_ab):
    return lax.map(lambda c: stats.binomial_test_pvalue(c[0], c[1]), jnp.stack([n_a, n_ab], -1))


@jax.jit
def _select(counts0, counts):
    """Cohen's selection: the top class of the n0 counts, and its count among the n samples."""
    top = jnp.argmax(counts0).astype(jnp.int32)
    return top, counts[top]


def certify(
    key,
    logits_fn: Callable,
    x,
    noise,
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
    """Cohen et al.'s CERTIFY for the classifier smoothed by ``noise``.

    The class is the most frequent one on ``n0`` noisy samples; its count among
    ``n`` fresh samples gives ``p_lower``, the one-sided Clopper-Pearson bound at
    level ``alpha_p = alpha - table.alpha_d``; the certificate abstains
    (``prediction = -1``, ``radius = 0``) when ``p_lower < 1/2`` and otherwise
    certifies ``table.radius(p_lower)``. The certificate is wrong with
    probability at most ``alpha``. Every argument is checked before anything is
    sampled.

    Args:
      key: PRNG key; split into the selection and the estimation keys.
      logits_fn: pure, hashable ``(rows, *input_shape) -> (rows, num_classes)``,
        ``num_classes >= 2`` (e.g. ``soapbubble.models.load(path)``).
      x: one input (``batched=False``), or a stack of inputs with a leading row
        axis (``batched=True``); floating, finite, pixel space.
      noise: Gaussian, L2Family or MixedLinf (PureLinf has no certificate).
      attack: "l2" or "linf" (MixedLinf certifies linf only).
      n0: selection samples, >= 1.
      n: estimation samples, in ``[1, stats.MAX_N]``.
      alpha: total failure probability, in (0, 1).
      batch_size: rows per device per step, >= 1 (rounded down to a multiple of
        :data:`CHUNK`, at least one chunk).
      table: a radius table for (noise, d = input size, attack); default: built
        by :func:`cached_radius_table` (MixedLinf: ``alpha_d = alpha / 2`` and
        :data:`TABLE_SAMPLES` samples) and cached in ``table_dir``.
      table_dir: cache directory (default :func:`default_table_dir`).
      batched: whether ``x`` holds many inputs along axis 0; row ``i`` is
        certified with the key ``jax.random.fold_in(key, i)``.

    Returns:
      A :class:`Certificate`: numpy scalars for one input, ``(rows,)`` arrays
      for a batch.

    Raises:
      ValueError: for a bad argument, a table that does not match the call, or
        a table whose ``alpha_d >= alpha``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from soapbubble import noise
      >>> f = lambda b: jnp.stack([jnp.zeros(b.shape[0]), jnp.ones(b.shape[0])], axis=-1)
      >>> c = certify(jax.random.key(1), f, jnp.zeros((2, 3)), noise.Gaussian(0.5),
      ...             n=1000, batched=True)
      >>> c.prediction.tolist(), c.count.tolist()
      ([1, 1], [1000, 1000])
    """
    key = _check_key(key)
    _check_logits_fn(logits_fn)
    attack = _check_attack(attack)
    family = _check_noise(noise, attack)
    n0 = _check_int(n0, "n0")
    n = _check_int(n, "n", max_value=stats.MAX_N)
    alpha = _check_alpha(alpha)
    batch_size = _check_int(batch_size, "batch_size")
    xs, input_shape = _check_x(x, batched)
    d = family.check_dimension(math.prod(input_shape))
    if table is not None:
        _check_table(table, family, d, attack)
    count0 = _counter(logits_fn, n0, batch_size, input_shape, xs.dtype)
    count = _counter(logits_fn, n, batch_size, input_shape, xs.dtype)
    if table is not None and table.alpha_d >= alpha:
        raise ValueError(
            f"alpha must exceed the table's failure probability alpha_d={table.alpha_d}, got {alpha}"
        )
    if table is None:  # may take long (Monte Carlo): only once everything else is checked
        table = cached_radius_table(family, d, attack, alpha_d=alpha / 2, table_dir=table_dir)
    alpha_p = alpha - table.alpha_d

    row_keys = _row_keys(key, jnp.arange(xs.shape[0])) if batched else key[None]
    rows = xs if batched else xs[None]
    tops, counts = [], []
    for i in range(rows.shape[0]):  # one input at a time: memory stays bounded by batch_size
        k_select, k_estimate = jax.random.split(row_keys[i])
        top, c = _select(count0(k_select, rows[i], family), count(k_estimate, rows[i], family))
        tops.append(top)
        counts.append(c)
    tops, counts = (np.asarray(a) for a in jax.device_get((jnp.stack(tops), jnp.stack(counts))))
    counts = counts.astype(np.int64)
    with jax.enable_x64(True):
        p_lower = np.asarray(_cp_lower(counts, n, alpha_p), dtype=np.float64)
    certified = p_lower >= 0.5
    prediction = np.where(certified, tops, -1).astype(np.int32)
    radius = np.where(certified, table.radius(p_lower), 0.0).astype(np.float64)
    cert = Certificate(prediction, radius, p_lower, counts, np.full(counts.shape, n, np.int64))
    if batched:
        return cert
    return Certificate(
        np.int32(prediction[0]), np.float64(radius[0]), np.float64(p_lower[0]), int(counts[0]), n
    )


@jax.jit
def _top_two(counts):
    values, classes = lax.top_k(counts, 2)
    return classes[0].astype(jnp.int32), values[0], values[1]


def predict(
    key,
    logits_fn: Callable,
    x,
    noise,
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
      noise: any :mod:`soapbubble.noise` family (PureLinf included: no radius is claimed).
      n: samples, in ``[1, stats.MAX_N]``.
      alpha: level of the test, in (0, 1).
      batch_size: rows per device per step, >= 1.
      batched: whether ``x`` holds many inputs along axis 0.

    Returns:
      An ``int`` for one input; an int32 ``(rows,)`` array for a batch.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from soapbubble import noise
      >>> f = lambda b: jnp.stack([b[:, 0], -b[:, 0]], axis=-1)
      >>> predict(jax.random.key(0), f, jnp.array([2.0, 0.0]), noise.Gaussian(0.5), n=1000)
      0
    """
    key = _check_key(key)
    _check_logits_fn(logits_fn)
    family = _check_noise(noise, None)
    n = _check_int(n, "n", max_value=stats.MAX_N)
    alpha = _check_alpha(alpha)
    batch_size = _check_int(batch_size, "batch_size")
    xs, input_shape = _check_x(x, batched)
    family.check_dimension(math.prod(input_shape))
    count = _counter(logits_fn, n, batch_size, input_shape, xs.dtype)

    row_keys = _row_keys(key, jnp.arange(xs.shape[0])) if batched else key[None]
    rows = xs if batched else xs[None]
    out = [_top_two(count(row_keys[i], rows[i], family)) for i in range(rows.shape[0])]
    top, n_a, n_b = (np.asarray(a, dtype=np.int64) for a in zip(*jax.device_get(out)))
    with jax.enable_x64(True):
        pvalue = np.asarray(_binom_pvalue(n_a, n_a + n_b), dtype=np.float64)
    prediction = np.where(pvalue <= alpha, top, -1).astype(np.int32)
    return prediction if batched else int(prediction[0])
