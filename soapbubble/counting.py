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

Many inputs. One compiled call counts a group of rows (up to :data:`GROUP`,
padded to a power of two, so a dataset compiles a handful of programs), each
with several streams of samples (``certify``: the ``n0`` selection and the ``n``
estimation samples, each with its own key). Every chunk of every row is a work
item; a step takes the next ``batch_size // CHUNK`` items whatever rows they
belong to, so a forward batch carries several rows' samples when one row needs
less than a batch, and only a group's last step is partly idle. The step's
shape depends on one row's needs only (never on the group), so a row's counts
are the same bit for bit alone or in a group. All groups are dispatched before
any count is read: one host round trip per call of :meth:`Counter.rows`.

Memory. XLA:CPU's kernels allocate and free blocks of a few MiB at every step;
:func:`keep_heap_memory` (called by the first :func:`num_classes`) keeps glibc's
malloc from mapping them anew each time, which otherwise costs thousands of
page faults per step.

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

import ctypes
import ctypes.util
import functools
import math
import os
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from soapbubble import _validation as check

__all__ = ["CHUNK", "GROUP", "Classifier", "Counter", "as_classifier", "chunk_key", "class_counts", "counter",
           "group_size", "keep_heap_memory", "local_mesh"]

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
    """Checks the classifier on one abstract batch (no computation); returns the number of classes.

    Every route (fixed n, sequential) checks its classifier here before its
    compiled loop, so this is also where :func:`keep_heap_memory` takes effect.
    """
    keep_heap_memory()
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


# --------------------------------------------------------------------------- memory

#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this come from the heap and are reused (glibc's own ceiling for its dynamic threshold).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory kept at the top of a heap before it is given back to the system.
TRIM_THRESHOLD = 64 * 2**20


@functools.cache
def keep_heap_memory() -> bool:
    """Lets glibc's malloc reuse the compiled loop's per-step buffers instead of mapping them anew.

    XLA:CPU's kernels (the convolutions' packing buffers) allocate and free
    blocks of a few MiB at every step of the counting loop. With glibc's
    defaults, whether those blocks are mapped and unmapped each time depends on
    what the process freed before (the dynamic mmap threshold), and where they
    are, every step pays for thousands of fresh zeroed pages (minor page faults:
    about 1,800 per 1000-row step of the default digits model, some 36,000 per
    image certified at n = 10,000, and nearly half of its time on 2 CPU cores;
    benchmarks/RESULTS.md, "Many small inputs"). Fixing the thresholds once
    (blocks under 32 MiB from the heap, heaps trimmed beyond 64 MiB free) lets
    the loop run at the speed of the bare forward pass. Called by
    :func:`num_classes` (every route's check of its classifier before its loop);
    a no-op off glibc, or when ``SOAPBUBBLE_KEEP_MALLOC=1`` asks to leave the
    process's malloc settings alone.

    Returns:
      Whether the thresholds were set.

    Example:
      >>> keep_heap_memory() in (True, False)   # once per process (cached)
      True
    """
    if os.environ.get("SOAPBUBBLE_KEEP_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# --------------------------------------------------------------------------- fixed n


def per_step(n: int, batch_size: int, n_dev: int) -> int:
    """Chunks per device per step: batch_size // CHUNK, at most what n samples need."""
    n_chunks = -(-n // CHUNK)
    return min(batch_size // CHUNK, -(-n_chunks // n_dev))


@functools.lru_cache(maxsize=8)
def _mesh_for(devices: tuple) -> Mesh:
    return Mesh(np.array(devices, dtype=object), (_AXIS,))


def local_mesh() -> Mesh:
    """A one-axis mesh over ``jax.local_devices()`` (cached)."""
    return _mesh_for(tuple(jax.local_devices()))


def _chunks(n):
    """``ceil(n / CHUNK)`` without the int32 overflow of ``n + CHUNK - 1`` near ``2**31``."""
    return n // CHUNK + (n % CHUNK > 0).astype(n.dtype)


@functools.partial(jax.jit, static_argnames=("static", "per_step", "mesh", "num_classes"))
def _count(keys, xs, rows, ns, family, arrays, *, static, per_step, mesh, num_classes):
    """Votes of ``logits_fn(xs[r] + z)`` for rows ``r < rows`` and streams ``s``: int32 ``(G, S, C + 1)``.

    ``keys`` ``(G, S)``: stream ``s`` of row ``r`` draws ``ns[s]`` samples with
    ``keys[r, s]`` (chunk ``j`` is ``chunk_key(keys[r, s], j)``). Every chunk of
    every live row is one work item; a step evaluates ``per_step`` consecutive
    items per device, whatever rows they belong to, so rows that need fewer
    samples than a batch share it and only the group's last step is partly idle.
    ``rows`` and ``ns`` are traced: one program serves every group of at most
    ``G`` rows and every ``n`` with the same ``per_step``. Replicated output.
    """
    n_dev = mesh.size

    def local(keys, xs, rows, ns, family, arrays):
        dev = lax.axis_index(_AXIS)
        logits_fn = Classifier(static, arrays).rebuild()
        chunks = _chunks(ns)  # (S,)
        starts = jnp.cumsum(chunks) - chunks  # first item of stream s within a row
        per_row = jnp.maximum(jnp.sum(chunks), 1)
        total = rows * per_row
        steps = (total + n_dev * per_step - 1) // (n_dev * per_step)

        def body(step, counts):
            item = (step * n_dev + dev) * per_step + jnp.arange(per_step)
            live = item < total
            row = jnp.where(live, item // per_row, 0)
            within = item % per_row
            stream = jnp.sum(within[:, None] >= starts[None, 1:], axis=1)
            j = within - starts[stream]
            ckeys = jax.vmap(lambda r, s, c: chunk_key(keys[r, s], c))(row, stream, j)
            batch = noisy_chunks(ckeys, xs[row], family)
            index = j[:, None] * CHUNK + jnp.arange(CHUNK)[None, :]
            # Rows past n (surplus of a stream's last chunk) and idle items count for nothing.
            valid = (index < ns[stream][:, None]) & live[:, None]
            hits = votes(logits_fn(batch), num_classes).reshape(per_step, CHUNK, num_classes + 1)
            per_item = jnp.sum(hits & valid[:, :, None], axis=1, dtype=jnp.int32)
            return counts.at[row, stream].add(per_item)

        # The counts differ between devices until the psum: mark the carry as varying.
        shape = (*keys.shape, num_classes + 1)
        init = lax.pcast(jnp.zeros(shape, jnp.int32), (_AXIS,), to="varying")
        return lax.psum(lax.fori_loop(0, steps, body, init), _AXIS)

    spec = P()
    rows, ns = jnp.asarray(rows, jnp.int32), jnp.asarray(ns, jnp.int32)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)(keys, xs, rows, ns, family, arrays)


#: Most rows in one compiled call of :meth:`Counter.rows` (groups are padded to a power of two
#: up to this, so a dataset compiles at most log2(GROUP) + 1 programs per classifier).
GROUP = 64


def group_size(rows: int, per_row_chunks: int, limit: int | None = None) -> int:
    """Rows per compiled call: the power of two >= ``rows``, at most ``limit`` (default :data:`GROUP`).

    Also at most what keeps the group's work items (``rows * per_row_chunks``)
    within int32, the loop's index type.

    Example:
      >>> group_size(1, 202), group_size(5, 202), group_size(360, 202)
      (1, 8, 64)
    """
    limit = GROUP if limit is None else limit
    cap = max(1, min(limit, (2**31 - 1 - CHUNK * 2**16) // max(per_row_chunks, 1)))
    want = 1 << max(rows - 1, 0).bit_length()
    return max(1, min(want, 1 << (cap.bit_length() - 1)))


class Counter(NamedTuple):
    """A compiled counter for one (classifier, sample counts, batch, input shape).

    Attributes:
      model: the classifier.
      ns: samples of each stream (e.g. ``(n0, n)``: certify's selection and
        estimation samples).
      per_step: chunks per device per step.
      mesh: the one-axis mesh the chunks are spread over.
      num_classes: the classifier's number of classes.
    """

    model: Classifier
    ns: tuple
    per_step: int
    mesh: Any
    num_classes: int

    def __call__(self, key, x, family) -> jax.Array:
        """int32 ``(num_classes + 1,)`` votes of the first stream of one input, on the device."""
        keys, ns = _two_streams(jnp.asarray(key)[None, None], self.ns[:1])
        return _count(keys, x[None], np.int32(1), ns, family, self.model.arrays, static=self.model.static,
                      per_step=self.per_step, mesh=self.mesh, num_classes=self.num_classes)[0, 0]

    def rows(self, keys: jax.Array, xs, family, *, group: int | None = None) -> np.ndarray:
        """Votes of every row and stream, on the host: int64 ``(rows, S, num_classes + 1)``.

        Args:
          keys: PRNG keys ``(rows, S)``; ``keys[r, s]`` draws stream ``s`` of row ``r``.
          xs: inputs ``(rows, *input_shape)`` (numpy or jax).
          family: the noise family.
          group: rows per compiled call (default :func:`group_size`).

        Rows go through the compiled loop ``group`` at a time (the last group
        padded with idle rows that cost nothing but their transfer); every call
        is dispatched before any result is read, so the host never waits between
        groups, and one transfer brings all the counts back.
        """
        total = int(xs.shape[0])
        per_row = sum(-(-n // CHUNK) for n in self.ns)
        size = group_size(total, per_row) if group is None else int(group)
        streams = len(self.ns)
        keys, ns = _two_streams(keys, self.ns)
        padded = -(-total // size) * size
        if padded != total:  # idle rows repeat the last one: never counted (rows is traced)
            fill = np.full(padded - total, total - 1)
            keys = keys[np.concatenate([np.arange(total), fill])]
            xs = xs[np.concatenate([np.arange(total), fill])]
        out = [
            _count(keys[g:g + size], xs[g:g + size], np.int32(min(size, total - g)), ns, family, self.model.arrays,
                   static=self.model.static, per_step=self.per_step, mesh=self.mesh, num_classes=self.num_classes)
            for g in range(0, padded, size)
        ]
        return np.concatenate([np.asarray(c, np.int64) for c in jax.device_get(out)])[:total, :streams]


def _two_streams(keys: jax.Array, ns: tuple) -> tuple[jax.Array, np.ndarray]:
    """Pads one stream to two with an empty one (no chunks, no work): ``predict``, ``certify`` and
    ``class_counts`` with the same step shape then share one compiled program."""
    if len(ns) >= 2:
        return keys, np.asarray(ns, np.int32)
    return jnp.concatenate([keys, keys], axis=1), np.asarray((*ns, 0), np.int32)


def counter(model: Classifier, n, batch_size: int, input_shape, dtype) -> Counter:
    """A :class:`Counter` for ``n`` samples (an int, or a tuple of one count per stream).

    ``per_step`` depends on what ONE row needs (all its streams together), never
    on how many rows share a call: a row's forward batches have the same shape
    alone or in a group, so its counts are the same bit for bit.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from soapbubble import noise
      >>> f = lambda b: jnp.stack([-b[:, 0], b[:, 0]], axis=-1)
      >>> c = counter(as_classifier(f), (100, 1000), 1000, (3,), jnp.float32)
      >>> keys = jax.random.split(jax.random.key(0), 6).reshape(3, 2)   # 3 rows, 2 streams
      >>> c.rows(keys, jnp.zeros((3, 3)), noise.Gaussian(1.0)).sum(axis=-1).tolist()
      [[100, 1000], [100, 1000], [100, 1000]]
    """
    ns = (int(n),) if np.ndim(n) == 0 else tuple(int(v) for v in n)
    mesh = local_mesh()
    steps = per_step(sum(-(-v // CHUNK) for v in ns) * CHUNK, batch_size, mesh.size)
    classes = num_classes(model, steps * CHUNK, tuple(input_shape), dtype)
    return Counter(model, ns, steps, mesh, classes)


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
