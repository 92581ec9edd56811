"""Saved models: a directory with a JSON description and an orbax checkpoint.

Layout of a saved model directory::

    soapbubble_model.json   {"format_version": 1, "arch": <registry name>,
                             "config": {builder kwargs}, "dataset": <name>,
                             "extra": {...}}
    variables/              orbax checkpoint of the flax variables dict
                            {"params": ..., "batch_stats": ...} (plain arrays)

The JSON is written last, so a directory without it is an unfinished save.
Loading checks the stored variables against the architecture (built from
``arch`` and ``config``, initialised abstractly on the dataset's image shape): a
missing or extra key or a wrong shape is a ``ValueError`` naming the key path,
e.g. ``params/Conv_0/kernel``. The image shape comes from ``dataset`` (see
:data:`soapbubble.data.KNOWN`) or, for other datasets, ``extra["input_shape"]``.

:func:`load` gives the classifier certification needs, as a pytree:
``jax.tree_util.Partial(apply_fn, variables)`` with ``apply_fn`` an
:class:`ApplyFn` (hashable, equal for every checkpoint of one architecture) and
the variables its only (traced) leaves, so a second checkpoint of the same
architecture compiles nothing new in :mod:`soapbubble.counting`.

Example:
  >>> import jax, jax.numpy as jnp, tempfile, os
  >>> from soapbubble.models import registry
  >>> module = registry.build("small_cnn")
  >>> variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> path = os.path.join(tempfile.mkdtemp(), "m")
  >>> save_model(path, "small_cnn", {}, variables, dataset="digits")
  >>> loaded = load_model(path)
  >>> loaded.meta.arch, load(path)(jnp.zeros((3, 8, 8, 1))).shape
  ('small_cnn', (3, 10))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from soapbubble.models import registry

__all__ = ["FORMAT_VERSION", "META_FILE", "ApplyFn", "LoadedModel", "ModelMeta", "load", "load_model", "save_model"]

FORMAT_VERSION = 1
META_FILE = "soapbubble_model.json"
_VARIABLES_DIR = "variables"


class ModelMeta(NamedTuple):
    """The parsed ``soapbubble_model.json``.

    Attributes:
      format_version: int, 1.
      arch: registry name of the architecture.
      config: builder keyword arguments (JSON values).
      dataset: dataset name the model was trained for.
      extra: free-form JSON dict (training details, provenance).
      input_shape: (H, W, C) of one input image.
    """

    format_version: int
    arch: str
    config: dict
    dataset: str
    extra: dict
    input_shape: tuple


class LoadedModel(NamedTuple):
    """A loaded model.

    Attributes:
      module: the flax module (``module.apply(variables, x, train=False)``).
      variables: dict of jax arrays ``{"params": ..., "batch_stats": ...}``.
      meta: :class:`ModelMeta`.
    """

    module: nn.Module
    variables: dict
    meta: ModelMeta


def _input_shape(dataset: str, extra: dict) -> tuple[int, ...]:
    from soapbubble import data

    if "input_shape" in extra:
        shape = extra["input_shape"]
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(
                isinstance(s, int) and s >= 1 for s in shape)):
            raise ValueError(f"extra['input_shape'] must be three positive integers (H, W, C), got {shape!r}")
        return tuple(shape)
    if dataset in data.KNOWN:
        return data.image_shape(dataset)
    raise ValueError(
        f"cannot tell the input shape of dataset={dataset!r}: use one of {', '.join(sorted(data.KNOWN))}"
        " or give extra['input_shape'] = [H, W, C]"
    )


def _key_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _expected(module: nn.Module, input_shape: tuple[int, ...]) -> dict:
    # Abstract init: shapes only, nothing computed.
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)


def _match(variables: Any, expected: Any) -> dict:
    """Checks ``variables`` against the abstract ``expected`` tree; returns jax arrays."""
    got = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    got_s = {_key_str(k): v for k, v in got.items()}
    want_s = {_key_str(k): v for k, v in want.items()}
    missing = sorted(set(want_s) - set(got_s))
    extra = sorted(set(got_s) - set(want_s))
    if missing:
        raise ValueError(f"variables do not match the architecture: missing key(s) {', '.join(missing)}")
    if extra:
        raise ValueError(f"variables do not match the architecture: unexpected key(s) {', '.join(extra)}")
    for k, w in want_s.items():
        v = got_s[k]
        if tuple(np.shape(v)) != tuple(w.shape):
            raise ValueError(f"variables do not match the architecture: {k} has shape {tuple(np.shape(v))},"
                             f" expected {tuple(w.shape)}")
        kind_v, kind_w = np.dtype(v.dtype).kind, np.dtype(w.dtype).kind
        if (kind_v == "f") != (kind_w == "f"):
            raise ValueError(f"variables do not match the architecture: {k} has dtype {v.dtype}, expected {w.dtype}")
    # Rebuild in the expected structure (dict order, dtype) from the key paths.
    leaves = [jnp.asarray(got_s[_key_str(k)], dtype=w.dtype) for k, w in want.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), leaves)


def save_model(path: str | os.PathLike, arch: str, config: dict, variables: dict, *, dataset: str,
               extra: dict | None = None, overwrite: bool = False) -> None:
    """Saves a model directory (see the module docstring for the layout).

    Args:
      path: directory to create (must not exist, be empty, or be a saved model with
        ``overwrite=True``).
      arch: registry name (``soapbubble.models.registry.names()``).
      config: builder keyword arguments, JSON-serializable.
      variables: flax variables dict ``{"params": ..., ["batch_stats": ...]}``.
      dataset: dataset name (sets the input shape, unless ``extra["input_shape"]``).
      extra: optional JSON-serializable dict stored as it is.
      overwrite: replace an existing saved model at ``path``.

    Raises:
      ValueError: unknown arch, non-JSON config/extra, variables that do not fit the
        architecture (names the key path).
      FileExistsError: ``path`` holds something else, or a model and not ``overwrite``.
    """
    path = os.path.abspath(os.fspath(path))
    extra = {} if extra is None else dict(extra)
    config = dict(config)
    for name, value in (("config", config), ("extra", extra)):
        try:
            json.dumps(value)
        except TypeError as e:
            raise ValueError(f"{name} must be JSON-serializable: {e}") from e
    module = registry.build(arch, **config)
    input_shape = _input_shape(dataset, extra)
    variables = _match(variables, _expected(module, input_shape))
    if os.path.exists(path):
        if os.path.isfile(os.path.join(path, META_FILE)):
            if not overwrite:
                raise FileExistsError(f"a saved model exists at path={path!r} (pass overwrite=True)")
            shutil.rmtree(path)
        elif not os.path.isdir(path) or os.listdir(path):
            raise FileExistsError(f"path={path!r} exists and is not an empty directory or a saved model")
    os.makedirs(path, exist_ok=True)
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, _VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
    meta = {"format_version": FORMAT_VERSION, "arch": arch, "config": config, "dataset": dataset, "extra": extra}
    tmp = os.path.join(path, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, META_FILE))


def _read_meta(path: str) -> ModelMeta:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved model directory at {path!r}")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"not a saved model: {meta_path!r} is missing")
    with open(meta_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path!r} is not valid JSON: {e}") from e
    for key in ("format_version", "arch", "config", "dataset"):
        if key not in raw:
            raise ValueError(f"{meta_path!r} lacks the field {key!r}")
    if raw["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{meta_path!r}: format_version={raw['format_version']!r} is not supported"
                         f" (this soapbubble reads {FORMAT_VERSION})")
    if raw["arch"] not in registry.names():
        raise ValueError(f"{meta_path!r}: unknown arch={raw['arch']!r}; known: {', '.join(registry.names())}")
    extra = raw.get("extra") or {}
    return ModelMeta(FORMAT_VERSION, raw["arch"], dict(raw["config"]), raw["dataset"], dict(extra),
                     _input_shape(raw["dataset"], extra))


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Loads a saved model directory.

    Args:
      path: directory written by :func:`save_model` (or the converter).

    Returns:
      :class:`LoadedModel` (module, variables as jax arrays, meta).

    Raises:
      FileNotFoundError: missing directory, JSON or variables (names the path).
      ValueError: unknown arch or format, variables that do not fit the architecture
        (names the key path).
    """
    path = os.path.abspath(os.fspath(path))
    meta = _read_meta(path)
    module = registry.build(meta.arch, **meta.config)
    var_path = os.path.join(path, _VARIABLES_DIR)
    if not os.path.isdir(var_path):
        raise FileNotFoundError(f"saved model at {path!r} lacks its variables: {var_path!r} is missing")
    variables = _match(_restore(var_path), _expected(module, meta.input_shape))
    return LoadedModel(module, variables, meta)


def _restore(var_path: str):
    """The variables as saved; under ``jax.distributed`` each process restores alone.

    Orbax treats a multi-process restore as a collective (a barrier over every process,
    arrays laid out on the saved global devices), which fails on a process that does not
    own device 0. A model is small and every process needs all of it: each reads it as
    host arrays and puts them on its own first device.
    """
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        with warnings.catch_warnings():
            # Restoring without a target makes orbax warn about sharding; one CPU/host device is fine.
            warnings.simplefilter("ignore", UserWarning)
            return ocp.PyTreeCheckpointer().restore(var_path)
    import logging

    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={me},
                                               barrier_sync_key_prefix=f"soapbubble-load-{me}")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                                    multiprocessing_options=alone)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that size logging is off without a primary host
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tree = checkpointer.metadata(var_path).item_metadata.tree
            restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            raw = checkpointer.restore(var_path, args=ocp.args.PyTreeRestore(restore_args=restore))
    finally:
        absl_log.setLevel(level)
    return jax.device_put(raw, jax.local_devices()[0])


def _canonical_config(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _build(arch: str, config: str) -> nn.Module:
    # Builders may check their arguments with jnp: evaluate that now, even when
    # called while tracing (the counting loops call the classifier under jit).
    with jax.ensure_compile_time_eval():
        return registry.build(arch, **json.loads(config))


@functools.lru_cache(maxsize=64)
def _jitted_apply(arch: str, config: str) -> Callable:
    """One jitted eval-mode apply per (arch, config) in this process."""
    module = _build(arch, config)
    return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


@dataclasses.dataclass(frozen=True)
class ApplyFn:
    """Eval-mode inference of one architecture: ``apply_fn(variables, batch) -> logits``.

    A hashable value (equal for equal architecture, configuration and input shape),
    so the classifier ``jax.tree_util.Partial(apply_fn, variables)`` that
    :func:`load` returns has the same static part for every checkpoint of one
    architecture: the compiled certification loops (:mod:`soapbubble.counting`)
    trace the variables and compile nothing new for new weights.

    Attributes:
      arch: registry name of the architecture.
      config: the builder keyword arguments as canonical JSON (sorted keys).
      input_shape: (H, W, C) of one input image.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = ApplyFn.of("small_cnn", {}, (8, 8, 1))
      >>> f == ApplyFn.of("small_cnn", {}, [8, 8, 1]) and hash(f) == hash(ApplyFn.of("small_cnn", {}, (8, 8, 1)))
      True
      >>> variables = f.module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> f(variables, jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    arch: str
    config: str
    input_shape: tuple

    #: Every soapbubble model takes pixel space: images in [0, 1], normalization inside.
    input_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __post_init__(self):
        _jitted_apply(self.arch, self.config)  # builds the module now: a bad config fails here

    @classmethod
    def of(cls, arch: str, config: dict, input_shape) -> "ApplyFn":
        """The apply function of ``registry.build(arch, **config)`` on images of ``input_shape``."""
        return cls(arch, _canonical_config(dict(config)), tuple(int(s) for s in input_shape))

    @property
    def module(self) -> nn.Module:
        """The flax module (``module.apply(variables, x, train=False)``)."""
        return _build(self.arch, self.config)

    def __call__(self, variables, batch) -> jax.Array:
        """Logits ``(B, num_classes)`` of ``batch`` ``(B, H, W, C)`` (eval mode, BatchNorm running averages).

        Raises:
          ValueError: ``batch`` is not ``(B, *input_shape)`` (names both shapes).
        """
        shape = tuple(jnp.shape(batch))
        if len(shape) != 4 or shape[1:] != self.input_shape:
            raise ValueError(f"batch must have shape (B, {', '.join(map(str, self.input_shape))}), got {shape}")
        return _jitted_apply(self.arch, self.config)(variables, batch)


def load(path: str | os.PathLike) -> jax.tree_util.Partial:
    """The inference function of a saved model, as a classifier pytree.

    Args:
      path: saved model directory.

    Returns:
      ``logits_fn = jax.tree_util.Partial(apply_fn, variables)``:
      ``logits_fn(batch) -> logits``, batch float (B, H, W, C) in [0, 1] ->
      float32 (B, num_classes), eval mode (BatchNorm running averages), jitted.
      ``apply_fn`` is an :class:`ApplyFn` (hashable, equal for every checkpoint
      of the same architecture, configuration and input shape) and
      ``variables`` a ``flax.core.FrozenDict`` of jax arrays, the pytree's only
      leaves. The counting loops trace those arrays, so certifying a second
      checkpoint of the same architecture compiles nothing new. To swap in other
      weights of the same shapes: ``Partial(logits_fn.func, flax.core.freeze(v))``.

    Raises:
      As :func:`load_model`; ``logits_fn`` raises ValueError for a batch whose
      trailing shape is not the model's (H, W, C).

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from soapbubble.models import registry
      >>> variables = registry.build("small_cnn").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> a, b = (os.path.join(tempfile.mkdtemp(), "m") for _ in range(2))
      >>> save_model(a, "small_cnn", {}, variables, dataset="digits")
      >>> save_model(b, "small_cnn", {}, jax.tree.map(lambda v: -v, variables), dataset="digits")
      >>> f, g = load(a), load(b)
      >>> f.func == g.func, jax.tree.structure(f) == jax.tree.structure(g)
      (True, True)
      >>> f(jnp.zeros((3, 8, 8, 1))).shape
      (3, 10)
    """
    loaded = load_model(path)
    apply_fn = ApplyFn.of(loaded.meta.arch, loaded.meta.config, loaded.meta.input_shape)
    return jax.tree_util.Partial(apply_fn, flax.core.freeze(loaded.variables))
