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
