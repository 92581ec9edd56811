"""The compiled counting loop: class counts of a classifier under noise, on every local device.

A classifier is any callable pytree ``logits_fn(batch) -> logits`` on pixel-space
inputs. Its array leaves (the weights of a ``jax.tree_util.Partial(apply_fn,
variables)`` or of a flax nnx module) are *traced* arguments of the compiled
loop, so certifying with new weights of the same shapes compiles nothing new;
everything else in it (a plain function, a closure, ``apply_fn``) is static and
must be hashable.

The loop
--------
One compiled program counts the classes of ``n`` noisy copies of ``x``: the noise
is drawn on the device inside the loop, each step evaluates ``logits_fn`` on one
batch, and the class counts are accumulated as int32 on the device, so memory is
bounded by the batch and not by ``n``, and nothing returns to the host before
the counts are final. A noisy sample whose logits are not all finite votes for
no class: it is counted apart (the last entry of the counts), and the protocol
refuses to certify from such counts.

Randomness that does not depend on batching. The ``n`` samples are cut into
fixed chunks of :data:`CHUNK` = 50 rows; chunk ``j`` is
``noise.sample(chunk_key(key, j), CHUNK, x.shape)``, and the rows past ``n`` in
the last chunk are drawn but masked out of the counts. A step evaluates a whole
number of chunks, so ``batch_size`` must be at least one chunk and is rounded
*down* to a multiple of :data:`CHUNK` (never more chunks than ``n`` needs); the
noise for sample ``i`` is the same whatever the batch size or the number of
devices. What can differ between batch shapes is ``logits_fn`` itself: a matrix
product may round differently for different batch sizes (BLAS blocking), which
changes a prediction only where two logits tie to the last bit.

Sharding. The chunks of a step are spread over every local device
(``jax.local_devices()``) with :func:`jax.shard_map` on a one-axis
:class:`~jax.sharding.Mesh`; each device counts its chunks and the counts are
summed with ``psum``. ``batch_size`` is per device.

Keys. :func:`chunk_key` derives a chunk's key from ``fold_in(key, j)``: a
``threefry4x32`` key (the same Threefry cipher as jax's default, four words
wide) seeded with 128 bits drawn from it. On a CPU, jax's default
``threefry2x32`` spends one cipher call per 32-bit word, ``threefry4x32`` one per
four, and the noise of a small model costs half as much. Where jax lacks
``threefry4x32`` (before 0.10.2), the chunk key is ``fold_in(key, j)`` itself.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from soapbubble import noise
  >>> f = lambda b: jnp.stack([-b[:, 0], b[:, 0]], axis=-1)
  >>> c = class_counts(jax.random.key(0), f, jnp.zeros(3), noise.Gaussian(1.0), n=1000)
  >>> int(c.sum())
  1000
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from soapbubble import _validation as check

__all__ = ["CHUNK", "Classifier", "as_classifier", "chunk_key", "class_counts", "local_mesh"]

#: Rows per noise chunk: the unit of randomness (chunk j uses chunk_key(key, j)).
CHUNK = 50
#: Largest count a device accumulates (int32 counters).
MAX_COUNT = np.iinfo(np.int32).max

_AXIS = "chunks"


class _Static:
    """Marks a non-array leaf of a classifier pytree (kept in the static half)."""

    __slots__ = ()


_ARRAY = _Static()


class Classifier(NamedTuple):
    """A classifier pytree split into its static and traced halves.

    Attributes:
      static: hashable ``(treedef, non-array leaves)``: a compile-time constant.
      arrays: tuple of the array leaves (``None`` where the leaf is static): traced.
    """

    static: Any
    arrays: tuple

    def rebuild(self, arrays=None) -> Callable:
        """The callable, with ``arrays`` (traced or not) in place of its array leaves."""
        treedef, fixed = self.static
        arrays = self.arrays if arrays is None else arrays
        leaves = [a if f is _ARRAY else f for f, a in zip(fixed, arrays)]
        return jax.tree_util.tree_unflatten(treedef, leaves)


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def as_classifier(logits_fn: Any) -> Classifier:
    """Splits a callable pytree into static and traced parts (TypeError naming what is wrong).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = jax.tree_util.Partial(lambda w, b: b @ w, jnp.ones((3, 2)))
      >>> c = as_classifier(f)
      >>> [a.shape for a in c.arrays]
      [(3, 2)]
    """
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable (batch -> logits), got {type(logits_fn).__name__}")
    leaves, treedef = jax.tree_util.tree_flatten(logits_fn)
    fixed = tuple(_ARRAY if _is_array(leaf) else leaf for leaf in leaves)
    arrays = tuple(jnp.asarray(leaf) if _is_array(leaf) else None for leaf in leaves)
    static = (treedef, fixed)
    try:
        hash(static)
    except TypeError as e:
        raise TypeError(
            "logits_fn must be a hashable function or a pytree whose non-array leaves are hashable"
            f" (e.g. jax.tree_util.Partial(apply_fn, variables)): {e}"
        ) from e
    return Classifier(static, arrays)


@functools.lru_cache(maxsize=64)
def _num_classes_cached(static, arrays_spec, rows: int, input_shape: tuple, dtype) -> int:
    spec = jax.ShapeDtypeStruct((rows, *input_shape), dtype)
    model = Classifier(static, arrays_spec)
    try:
        out = jax.eval_shape(lambda arrays, b: model.rebuild(arrays)(b), arrays_spec, spec)
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


def num_classes(model: Classifier, rows: int, input_shape: tuple, dtype) -> int:
    """Checks the classifier on one abstract batch (no computation); returns the number of classes."""
    spec = tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in model.arrays)
    return _num_classes_cached(model.static, spec, rows, tuple(input_shape), np.dtype(dtype))


# --------------------------------------------------------------------------- keys


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
      key: the key of a stream of samples (e.g. the half of ``certify``'s row key
        that draws the ``n0`` or the ``n`` samples), any PRNG implementation.
      j: chunk index, int (traced or not).
      impl: the chunk keys' PRNG implementation: ``"auto"`` (``"threefry4x32"``
        where jax has it, see the module docstring), a name ``jax.random.key``
        accepts, or ``None`` for ``fold_in(key, j)`` itself.

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


def noisy_chunks(keys: jax.Array, xs: jax.Array, family) -> jax.Array:
    """``xs[c] + z`` for chunk keys ``keys`` ``(c,)`` and inputs ``xs`` ``(c, *shape)``: ``(c * CHUNK, *shape)``."""
    shape = xs.shape[1:]
    d = math.prod(shape)
    # Drawn flat (the samplers work on (n, d) and reshape; same values): XLA on CPU
    # fuses the flat add into the model's input cheaper than a 4-D one.
    z = jax.vmap(lambda k: family.sample(k, CHUNK, (d,), xs.dtype))(keys)
    batch = xs.reshape(-1, 1, d) + z
    return batch.reshape((-1, *shape))


def votes(logits: jax.Array, num_classes: int) -> jax.Array:
    """One-hot votes ``(rows, num_classes + 1)``: the last column marks non-finite logits."""
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    pred = jnp.where(finite, jnp.argmax(logits, axis=-1), num_classes)
    return pred[:, None] == jnp.arange(num_classes + 1)[None, :]


# --------------------------------------------------------------------------- fixed n


def per_step(n: int, batch_size: int, n_dev: int) -> int:
    """Chunks per device per step: batch_size // CHUNK, at most what n needs."""
    n_chunks = -(-n // CHUNK)
    return min(batch_size // CHUNK, -(-n_chunks // n_dev))


@functools.lru_cache(maxsize=8)
def _mesh_for(devices: tuple) -> Mesh:
    return Mesh(np.array(devices, dtype=object), (_AXIS,))


def local_mesh() -> Mesh:
    """A one-axis mesh over ``jax.local_devices()`` (cached)."""
    return _mesh_for(tuple(jax.local_devices()))


@functools.partial(jax.jit, static_argnames=("static", "per_step", "mesh", "num_classes"))
def _count(key, x, family, n, arrays, *, static, per_step, mesh, num_classes):
    """Votes of ``logits_fn(x + z_i)``, i < n: int32 ``(num_classes + 1,)``, replicated.

    ``n`` is traced (one program serves every n with the same ``per_step``).
    """
    n_dev = mesh.size
    rows = per_step * CHUNK
    n = jnp.asarray(n, jnp.int32)
    n_chunks = (n + CHUNK - 1) // CHUNK
    steps = (n_chunks + n_dev * per_step - 1) // (n_dev * per_step)

    def local(key, x, family, n, steps, arrays):
        dev = lax.axis_index(_AXIS)
        logits_fn = Classifier(static, arrays).rebuild()

        def body(step, counts):
            chunk = (step * n_dev + dev) * per_step + jnp.arange(per_step)
            keys = jax.vmap(lambda j: chunk_key(key, j))(chunk)
            batch = noisy_chunks(keys, jnp.broadcast_to(x, (per_step, *x.shape)), family)
            index = (chunk[:, None] * CHUNK + jnp.arange(CHUNK)[None, :]).reshape(rows)
            # Rows past n (surplus of the last chunk, idle chunks) count for nothing.
            hits = votes(logits_fn(batch), num_classes) & (index < n)[:, None]
            return counts + jnp.sum(hits, axis=0, dtype=jnp.int32)

        # The counts differ between devices until the psum: mark the carry as varying.
        init = lax.pcast(jnp.zeros((num_classes + 1,), jnp.int32), (_AXIS,), to="varying")
        counts = lax.fori_loop(0, steps, body, init)
        return lax.psum(counts, _AXIS)

    spec = P()
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)(
        key, x, family, n, steps, arrays
    )


class Counter(NamedTuple):
    """A compiled counter for one (classifier, n, batch, input shape): call ``(key, x, family)``."""

    model: Classifier
    n: int
    per_step: int
    mesh: Any
    num_classes: int

    def __call__(self, key, x, family) -> jax.Array:
        """int32 ``(num_classes + 1,)`` votes on the device (last: non-finite logits)."""
        return _count(key, x, family, np.int32(self.n), self.model.arrays, static=self.model.static,
                      per_step=self.per_step, mesh=self.mesh, num_classes=self.num_classes)


def counter(model: Classifier, n: int, batch_size: int, input_shape, dtype) -> Counter:
    """A :class:`Counter` for ``n`` samples, after checking the classifier on an abstract batch."""
    mesh = local_mesh()
    steps = per_step(n, batch_size, mesh.size)
    classes = num_classes(model, steps * CHUNK, tuple(input_shape), dtype)
    return Counter(model, n, steps, mesh, classes)


def class_counts(key, logits_fn, x, family, *, n: int, batch_size: int = 1000) -> jax.Array:
    """Class counts of ``logits_fn(x + z_i)`` over ``n`` noise samples ``z_i ~ noise`` (one input).

    The building block of ``predict`` and ``certify`` (see the module docstring for
    the chunked, sharded loop).

    Args:
      key: PRNG key.
      logits_fn: callable pytree ``(rows, *x.shape) -> (rows, num_classes)``.
      x: one input, floating, finite.
      family: a :mod:`soapbubble.noise` family (any, PureLinf included).
      n: number of samples, in ``[1, 2**31 - 1]``.
      batch_size: rows per device per step, ``>= CHUNK`` (rounded down to a multiple of it).

    Returns:
      int32 array ``(num_classes,)`` summing to ``n``.

    Raises:
      ValueError: for bad arguments, or when ``logits_fn`` returned non-finite logits.
    """
    key = check.key(key)
    model = as_classifier(logits_fn)
    family = check.family(family)
    n = check.count(n, "n")
    batch_size = check.batch_size(batch_size, CHUNK)
    xs, input_shape = check.inputs(x, batched=False)
    family.check_dimension(math.prod(input_shape))
    counts = counter(model, n, batch_size, input_shape, xs.dtype)(key, xs, family)
    bad = int(counts[-1])
    if bad:
        raise ValueError(f"logits_fn returned non-finite logits on {bad} of {n} noisy samples")
    return counts[:-1]
