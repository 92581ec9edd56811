"""Argument checks shared by the modules: messages name the parameter, its value and the range."""

from __future__ import annotations

import operator
from typing import Any

import jax
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
    """Host float64 value of ``x``, or None when ``x`` is traced (checks then belong to the caller).

    Raises:
      TypeError: if ``x`` is not numeric.
    """
    try:
        return np.asarray(x, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    except (TypeError, ValueError) as e:
        raise TypeError(f"expected a real number or array, got {x!r}") from e


def check_positive_int(value: Any, name: str, *, max_value: int | None = None, max_reason: str = "") -> int:
    """``value`` as an int >= 1 (and <= ``max_value``); bools are refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError as e:
        raise TypeError(f"{name} must be an int, got {value!r}") from e
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if max_value is not None and value > max_value:
        reason = f" ({max_reason})" if max_reason else ""
        raise ValueError(f"{name} must be <= {max_value}{reason}, got {value}")
    return value


def check_unit_interval(value: Any, name: str) -> float:
    """``value`` as a float in the open interval (0, 1)."""
    try:
        out = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a real number in (0, 1), got {value!r}") from e
    if not 0.0 < out < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return out


def check_attack(attack: Any) -> str:
    if attack not in ("l2", "linf"):
        raise ValueError(f"attack must be 'l2' or 'linf', got {attack!r}")
    return attack


# --------------------------------------------------------------------------- certification arguments

#: Largest sample count: the device counters are int32.
MAX_COUNT = 2**31 - 1


def count(value: Any, name: str) -> int:
    """A sample count: an int in ``[1, 2**31 - 1]`` (the device counters are int32)."""
    return check_positive_int(value, name, max_value=MAX_COUNT, max_reason="int32 counts on the device")


def batch_size(value: Any, chunk: int) -> int:
    """Rows per device per step: an int ``>= chunk`` (one noise chunk)."""
    value = check_positive_int(value, "batch_size", max_value=MAX_COUNT)
    if value < chunk:
        raise ValueError(
            f"batch_size must be >= {chunk} (one noise chunk; it is rounded down to a multiple of {chunk}),"
            f" got {value}"
        )
    return value


def flag(value: Any, name: str) -> bool:
    """A bool (numpy bools too); ints and strings are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def key(value: Any) -> jax.Array:
    """A single PRNG key (new-style or a raw uint32 key)."""
    import jax.numpy as jnp

    value = jnp.asarray(value) if not isinstance(value, jax.Array) else value
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        if value.shape != ():
            raise ValueError(f"key must be a single PRNG key, got a key array of shape {value.shape}")
    elif value.dtype != jnp.uint32 or value.ndim != 1:
        raise ValueError(
            f"key must be a PRNG key (jax.random.key(seed)), got dtype {value.dtype}, shape {value.shape}"
        )
    return value


def family(value: Any):
    """A :mod:`soapbubble.noise` family with a scalar sigma."""
    from soapbubble import noise

    if not isinstance(value, noise.SmoothingFamily):
        raise TypeError(f"family must be a soapbubble.noise family, got {type(value).__name__}")
    sigma = np.asarray(value.describe()["sigma"])
    if sigma.ndim != 0:
        raise ValueError(f"family.sigma must be a scalar, got shape {sigma.shape}")
    return value


def inputs(x: Any, batched: bool):
    """Validates x on the host; returns it as a jax array (float32 or float64) and one input's shape."""
    import jax.numpy as jnp

    host = np.asarray(x)
    if not np.issubdtype(host.dtype, np.floating):
        raise TypeError(
            f"x must be a floating array in pixel space (e.g. images in [0, 1]), got dtype {host.dtype};"
            f" see {PIXEL_GUIDE}"
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


#: Where the pixel-space conventions (and the mistakes they avoid) are explained.
PIXEL_GUIDE = "docs/guides/pixel_space.md"


def pixel_range(x: Any, logits_fn: Any) -> None:
    """Warns when a classifier that declares its input range (``input_range``, e.g. a model from
    ``soapbubble.models.load``) is given inputs outside it: noise is added in pixel space."""
    import warnings

    declared = getattr(getattr(logits_fn, "func", logits_fn), "input_range", None)
    if declared is None:
        return
    low, high = declared
    host = np.asarray(x)
    if host.min() < low or host.max() > high:
        warnings.warn(
            f"x has values in [{host.min():.3g}, {host.max():.3g}], but this model expects pixel space in"
            f" [{low:g}, {high:g}] (noise and sigma are in pixel units; normalization belongs inside the"
            f" model): see {PIXEL_GUIDE}",
            UserWarning, stacklevel=3)
