"""Smoothing families of "Filling the Soap Bubbles", with exact samplers.

Four families, each an immutable pytree whose scale ``sigma`` is a leaf (so jit,
vmap and grad see it) and whose shape ``k`` is static (it fixes the law's shape,
the sampler's tables and the validity check ``k < d``):

==============  =====================================================  ==================
family          density pi0(z), up to a constant                       radial variable
==============  =====================================================  ==================
``Gaussian``    exp(-||z||_2^2 / 2 sigma^2)                            ||z||_2
``L2Family``    ||z||_2^-k exp(-||z||_2^2 / 2 sigma^2)     (eq. 8)     ||z||_2
``MixedLinf``   ||z||_inf^-k exp(-||z||_2^2 / 2 sigma^2)   (eq. 9)     ||z||_inf
``PureLinf``    ||z||_inf^-k exp(-||z||_inf^2 / 2 sigma^2) (eq. 10)    ||z||_inf
==============  =====================================================  ==================

Samplers (``d`` is the event size, ``G ~ Gamma((d - k) / 2)``):

* Gaussian: ``sigma * normal``.
* L2Family: ``||z||_2 = sigma * sqrt(2 G)``, direction uniform on the sphere.
* PureLinf: ``||z||_inf = sigma * sqrt(2 G)``, direction uniform on the surface of
  the cube ``[-1, 1]^d`` (a face, i.e. coordinate and sign, uniformly; the other
  coordinates uniform in ``(-1, 1)``).
* MixedLinf: condition on the arg-max coordinate and on ``a = ||z||_inf``. Then
  ``a`` has density ``a^-k exp(-a^2 / 2 sigma^2) erf(a / (sigma sqrt 2))^(d-1)``,
  drawn by a tabulated inverse CDF (:mod:`soapbubble.tabulated_law`, float64
  table, CDF error < 1e-8); the arg-max coordinate and its sign are uniform and
  the other ``d - 1`` coordinates are iid ``N(0, sigma^2)`` truncated to
  ``(-a, a)``, drawn by inversion. No rejection anywhere.

Example:
  >>> import jax
  >>> from soapbubble import noise
  >>> family = noise.MixedLinf(sigma=0.5, k=250.0)
  >>> z = family.sample(jax.random.key(0), 4, (3, 32, 32))
  >>> z.shape
  (4, 3, 32, 32)
  >>> family.log_density(z, event_ndim=3).shape
  (4,)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from soapbubble import tabulated_law
from soapbubble._validation import check_positive_int
from soapbubble._validation import concrete as _concrete

__all__ = [
    "SmoothingFamily",
    "Gaussian",
    "L2Family",
    "MixedLinf",
    "PureLinf",
    "matched_sigma",
    "matched_sigma_expected_norm",
    "event_size",
]

Array = jax.Array


# --------------------------------------------------------------------------- validation


def _check_sigma(sigma: Any, name: str = "sigma") -> None:
    value = _concrete(sigma)
    if value is None:
        return
    if value.size == 0 or not np.all(np.isfinite(value)) or not np.all(value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")


def _check_k(k: Any) -> float:
    if isinstance(k, jax.Array) and not isinstance(k, jax.core.Tracer) and k.ndim == 0:
        k = float(k)
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"k is a static shape parameter and must be a Python or numpy real number, got {k!r}"
        )
    k = float(k)
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be finite and >= 0 (and < d, the event size), got {k!r}")
    return k


def event_size(event_shape: Sequence[int]) -> int:
    """The event size ``d = prod(event_shape)``, after checking the shape.

    Raises:
      ValueError: if the shape is empty or has a dimension < 1.
    """
    try:
        shape = tuple(operator.index(s) for s in event_shape)
    except TypeError as e:
        raise TypeError(f"event_shape must be a tuple of ints, got {event_shape!r}") from e
    if not shape:
        raise ValueError("event_shape must be non-empty (d >= 1), got ()")
    if any(s < 1 for s in shape):
        raise ValueError(f"event_shape dimensions must be >= 1, got {shape}")
    return math.prod(shape)


def _check_n(n: Any) -> int:
    return check_positive_int(n, "n")


def _check_d(d: Any) -> int:
    return check_positive_int(d, "d")


def _check_dtype(dtype: Any) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"dtype {dtype} needs 64-bit mode: jax.config.update('jax_enable_x64', True)"
        )
    return dtype


# --------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothingFamily:
    """Base class: an immutable pytree with leaf ``sigma`` and static ``k``.

    Subclasses implement the samplers; every public method validates its static
    arguments (``n``, ``d``, shapes, ``k < d``) before tracing anything.
    """

    name: ClassVar[str] = ""
    #: Which norm of z ``sample_radius`` draws: "l2" or "linf".
    radial_norm: ClassVar[str] = ""

    sigma: Any

    @property
    def k(self) -> float:
        return 0.0

    # -- pytree protocol (unflatten bypasses __init__, so tracers are never validated)

    def _tree_flatten(self):
        return (self.sigma,), (self.k,)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "sigma", children[0])
        if "k" in cls.__dataclass_fields__:
            object.__setattr__(obj, "k", aux[0])
        return obj

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(cls, cls._tree_flatten, cls._tree_unflatten)

    def __post_init__(self):
        _check_sigma(self.sigma)

    # -- common API

    def describe(self) -> dict[str, Any]:
        """Plain-data description (family, sigma, k), for files and caches."""
        value = _concrete(self.sigma)
        sigma = float(value) if value is not None and value.ndim == 0 else self.sigma
        return {"family": self.name, "sigma": sigma, "k": self.k}

    def check_dimension(self, d: int) -> int:
        """Checks that the family is a proper density in dimension ``d`` (``k < d``)."""
        d = _check_d(d)
        if not self.k < d:
            raise ValueError(
                f"k must be < d for {type(self).__name__} (the density is improper otherwise);"
                f" got k={self.k} with d={d}"
            )
        return d

    def sample(self, key: Array, n: int, event_shape: Sequence[int], dtype=jnp.float32) -> Array:
        """Draws ``n`` iid samples.

        Args:
          key: PRNG key.
          n: number of samples (static, >= 1).
          event_shape: shape of one sample (static, non-empty); ``d = prod(event_shape)``.
          dtype: floating output dtype (float64 needs ``jax_enable_x64``).

        Returns:
          Array of shape ``(n, *event_shape)`` and ``dtype``; deterministic given ``key``.
        """
        n = _check_n(n)
        d = self.check_dimension(event_size(event_shape))
        dtype = _check_dtype(dtype)
        return _sample_flat(self, key, n, d, dtype).reshape((n, *tuple(event_shape)))

    def sample_radius(self, key: Array, n: int, d: int, dtype=jnp.float32) -> Array:
        """Draws ``n`` values of the radial variable (``radial_norm`` of z) in dimension ``d``.

        Returns:
          Array of shape ``(n,)`` and ``dtype``.
        """
        n = _check_n(n)
        d = self.check_dimension(d)
        dtype = _check_dtype(dtype)
        return _sample_radius(self, key, n, d, dtype)

    def log_density(self, z: Array, event_ndim: int = 1) -> Array:
        """Unnormalised log density, reduced over the trailing ``event_ndim`` axes.

        Args:
          z: array of shape ``(*batch, *event_shape)``.
          event_ndim: number of trailing event axes (>= 1).

        Returns:
          Array of shape ``batch``. ``+inf`` at z = 0 when k > 0 (the density is
          singular there), never NaN for finite z.
        """
        z = jnp.asarray(z)
        event_ndim = operator.index(event_ndim)
        if not 1 <= event_ndim <= z.ndim:
            raise ValueError(f"event_ndim must be in [1, z.ndim={z.ndim}], got {event_ndim}")
        d = self.check_dimension(math.prod(z.shape[z.ndim - event_ndim :]))
        flat = z.reshape(z.shape[: z.ndim - event_ndim] + (d,))
        return self._log_density_flat(flat)

    def log_radial_density(self, r: Array, d: int) -> Array:
        """Unnormalised log density of the radial variable at ``r > 0`` in dimension ``d``."""
        d = self.check_dimension(d)
        return self._log_radial_density(jnp.asarray(r), d)

    # -- per-family pieces
    def _sample_flat(self, key, n, d, dtype):  # pragma: no cover - abstract
        raise NotImplementedError("SmoothingFamily is abstract; use a concrete family")

    def _sample_radius(self, key, n, d, dtype):  # pragma: no cover - abstract
        raise NotImplementedError("SmoothingFamily is abstract; use a concrete family")

    def _log_density_flat(self, z):  # pragma: no cover - abstract
        raise NotImplementedError("SmoothingFamily is abstract; use a concrete family")

    def _log_radial_density(self, r, d):  # pragma: no cover - abstract
        raise NotImplementedError("SmoothingFamily is abstract; use a concrete family")


# One compiled program per (family type, k, n, d, dtype): eager calls are fast,
# and inside a caller's jit these simply inline.
@functools.partial(jax.jit, static_argnames=("n", "d", "dtype"))
def _sample_flat(family, key, n, d, dtype):
    return family._sample_flat(key, n, d, dtype)


@functools.partial(jax.jit, static_argnames=("n", "d", "dtype"))
def _sample_radius(family, key, n, d, dtype):
    return family._sample_radius(key, n, d, dtype)


def _gamma(key, a, shape, dtype):
    """``jax.random.gamma(key', a, shape, dtype)`` with ``key'`` a threefry2x32 key drawn from ``key``.

    jax's gamma sampler runs a rejection loop that derives keys per element;
    with wider generators that loop is slow on a CPU (1000x for threefry4x32
    keys, the ones :func:`soapbubble.counting.chunk_key` makes; 4x for
    philox4x32), so it always gets a key of jax's default generator.
    """
    key = jax.random.wrap_key_data(jax.random.bits(key, (2,), jnp.uint32), impl="threefry2x32")
    return jax.random.gamma(key, jnp.asarray(a, dtype), shape, dtype)


def _chi_radius(key, n, shape_param, sigma, dtype):
    """sigma * sqrt(2 G), G ~ Gamma(shape_param): the radial law of eqs. (8) and (10)."""
    return sigma * jnp.sqrt(2.0 * _gamma(key, shape_param, (n,), dtype))


def _random_face(key, n, d, dtype):
    """A face of the cube per sample: the arg-max coordinate j and its sign, uniform. Shapes (n, 1)."""
    k_j, k_s = jax.random.split(key)
    j = jax.random.randint(k_j, (n, 1), 0, d)
    sign = jnp.where(jax.random.bernoulli(k_s, 0.5, (n, 1)), 1.0, -1.0).astype(dtype)
    return j, sign


def _power(k: float, log_norm: Array) -> Array:
    # k = 0 must not produce 0 * log(0) = NaN at z = 0.
    return -k * log_norm if k else jnp.zeros_like(log_norm)


@dataclasses.dataclass(frozen=True, eq=False)
class Gaussian(SmoothingFamily):
    """Isotropic Gaussian ``N(0, sigma^2 I)`` (Cohen et al.); the l2 family with k = 0.

    Attributes:
      sigma: scale, finite and > 0 (a pytree leaf).
    """

    name: ClassVar[str] = "gaussian"
    radial_norm: ClassVar[str] = "l2"

    def _sample_flat(self, key, n, d, dtype):
        return self.sigma * jax.random.normal(key, (n, d), dtype)

    def _sample_radius(self, key, n, d, dtype):
        return _chi_radius(key, n, d / 2, self.sigma, dtype)

    def _log_density_flat(self, z):
        return -jnp.sum(z * z, axis=-1) / (2 * self.sigma**2)

    def _log_radial_density(self, r, d):
        return (d - 1) * jnp.log(r) - r * r / (2 * self.sigma**2)


@dataclasses.dataclass(frozen=True, eq=False)
class _ShapedFamily(SmoothingFamily):
    k: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "k", _check_k(self.k))


@dataclasses.dataclass(frozen=True, eq=False)
class L2Family(_ShapedFamily):
    """The l2 family (eq. 8): ``||z||_2^-k exp(-||z||_2^2 / 2 sigma^2)``, ``0 <= k < d``.

    Attributes:
      sigma: scale, finite and > 0 (a pytree leaf).
      k: shape, finite, ``0 <= k < d`` (static).
    """

    name: ClassVar[str] = "l2"
    radial_norm: ClassVar[str] = "l2"

    def _sample_flat(self, key, n, d, dtype):
        k_r, k_u = jax.random.split(key)
        rho = _chi_radius(k_r, n, (d - self.k) / 2, self.sigma, dtype)
        g = jax.random.normal(k_u, (n, d), dtype)
        return g * (rho / jnp.linalg.norm(g, axis=-1))[:, None]

    def _sample_radius(self, key, n, d, dtype):
        return _chi_radius(key, n, (d - self.k) / 2, self.sigma, dtype)

    def _log_density_flat(self, z):
        sq = jnp.sum(z * z, axis=-1)
        return _power(self.k, 0.5 * jnp.log(sq)) - sq / (2 * self.sigma**2)

    def _log_radial_density(self, r, d):
        return (d - 1 - self.k) * jnp.log(r) - r * r / (2 * self.sigma**2)


def _log_erf_np(x: np.ndarray) -> np.ndarray:
    """log erf(x) for x > 0 in float64, accurate near 0 and for large x."""
    with np.errstate(divide="ignore"):
        small = np.log(scipy.special.erf(np.minimum(x, 1.0)))
        large = np.log1p(-scipy.special.erfc(np.maximum(x, 1.0)))
    return np.where(x < 1.0, small, large)


def _log_erf(x: Array) -> Array:
    small = jnp.log(jax.scipy.special.erf(jnp.minimum(x, 1.0)))
    large = jnp.log1p(-jax.scipy.special.erfc(jnp.maximum(x, 1.0)))
    return jnp.where(x < 1.0, small, large)


_U64 = 2.0**-53  # float64 unit roundoff


def _erf_elasticity_np(t: np.ndarray) -> np.ndarray:
    """``m(t) = d log erf(t / sqrt2) / d log t = t sqrt(2/pi) exp(-t^2/2) / erf(t / sqrt2)``.

    ``m`` decreases from 1 (t -> 0) to 0: ``d log m / d log t = 1 - t^2 - m`` and
    ``m >= 1 - t^2`` (with ``G = 2 Phi - 1``, ``H(t) = 2 t phi(t) / (1 - t^2) - G(t)``
    has ``H(0) = 0`` and ``H' = 4 t^2 phi / (1 - t^2)^2 >= 0`` on ``[0, 1)``).
    """
    with np.errstate(under="ignore"):
        return t * math.sqrt(2.0 / math.pi) * np.exp(-0.5 * t * t) / scipy.special.erf(t / math.sqrt(2.0))


def _mixed_linf_facts(k: float, d: int) -> tabulated_law.LogConcaveFacts:
    """Proven enclosures for ``l(s) = (1-k) s - t^2/2 + (d-1) log erf(t/sqrt2)``, ``t = e^s``.

    With ``m`` the elasticity of erf (:func:`_erf_elasticity_np`, decreasing):
    ``l' = (1-k) - t^2 + (d-1) m`` and ``l'' = -2 t^2 + (d-1) m (1 - t^2 - m) <= 0``,
    so ``l`` is concave and ``l' -> d - k`` as ``s -> -inf``. On a cell, ``t^2`` and
    ``m`` are bracketed by their (monotone) values at the ends, and the products by
    interval arithmetic. Float margins: ``m`` is computed to ``(10 + 3 t^2) u``
    relative (exp, erf to a few ulps as documented by their libraries, the rounding
    of ``t = e^s`` included); the margins used are ``64 u (1 + t^2)``.
    """
    u = _U64
    k = float(k)

    def m_rel(t):
        return 64 * u * (1.0 + t * t)

    def derivative(s):
        t = np.exp(np.asarray(s, np.float64))
        m = _erf_elasticity_np(t)
        value = (1.0 - k) - t * t + (d - 1) * m
        err = 64 * u * (abs(1.0 - k) + t * t + (d - 1) * m * (1.0 + t * t)) + (d - 1) * 1e-300
        return value - err, value + err

    def curvature(s0, s1):
        t0, t1 = np.exp(np.asarray(s0, np.float64)), np.exp(np.asarray(s1, np.float64))
        m_hi = _erf_elasticity_np(t0) * (1.0 + m_rel(t0)) + 1e-300
        m_lo = _erf_elasticity_np(t1) * (1.0 - m_rel(t1))
        t0sq, t1sq = t0 * t0 * (1.0 - 8 * u), t1 * t1 * (1.0 + 8 * u)
        nu_lo = (1.0 - t1sq - m_hi) - 4 * u * (1.0 + t1sq + m_hi)
        nu_hi = np.minimum(1.0 - t0sq - m_lo, 0.0)  # proven <= 0
        psi_lo = m_hi * nu_lo * (1.0 + 4 * u)
        psi_hi = m_lo * nu_hi * (1.0 - 4 * u)
        lo = -2.0 * t1sq + (d - 1) * psi_lo
        hi = -2.0 * t0sq + (d - 1) * psi_hi
        margin = 8 * u * (2.0 * t1sq + (d - 1) * np.abs(psi_lo))
        return lo - margin, np.minimum(hi + margin, 0.0)  # l'' <= 0 is proven

    def abs_error(s):
        s = np.asarray(s, np.float64)
        t = np.exp(s)
        psi = _log_erf_np(t / math.sqrt(2.0))
        return 64 * u * (1.0 + abs(1.0 - k) * np.abs(s) + t * t + (d - 1) * (1.0 + np.abs(psi)))

    return tabulated_law.LogConcaveFacts(derivative=derivative, curvature=curvature, abs_error=abs_error)


@functools.lru_cache(maxsize=128)
def mixed_linf_radial_table(k: float, d: int) -> tabulated_law.LogGridTable:
    """Table of ``s = log(a / sigma)``, ``a = ||z||_inf`` under MixedLinf(sigma, k) in dimension d.

    The density of ``t = a / sigma`` is ``t^-k exp(-t^2/2) erf(t/sqrt2)^(d-1)``;
    in ``s`` it gains the Jacobian ``t``. Near 0 it behaves as ``t^(d-1-k)``, so the
    left tail in ``s`` is ``exp((d - k) s)``. Built on the host in float64, cached.
    The log density in ``s`` is concave (:func:`_mixed_linf_facts`), which makes the
    table's ``tv_bound`` a proven bound on the total variation distance between the
    table's law and the true law (see :mod:`soapbubble.tabulated_law` for the proof
    and its scope: float32 sampling arithmetic is not covered).

    When ``d - k < 1`` a noticeable share of the law lies below float32's
    smallest normal number (``P(t < 1e-38) ~ 1e-38^(d-k)``); such draws round to
    0 in float32. Sample in float64 for such extreme shapes.
    """

    def log_density_s(s):
        t = np.exp(s)
        return (1.0 - k) * s - 0.5 * t * t + (d - 1) * _log_erf_np(t / math.sqrt(2.0))

    return tabulated_law.build_table(
        log_density_s, tail_slope=float(d) - k, cells=_MIXED_LINF_CELLS, facts=_mixed_linf_facts(k, d)
    )


# Cells of the mixed l_inf table (the proven TV bound scales like cells^-2).
_MIXED_LINF_CELLS = 8192


@dataclasses.dataclass(frozen=True, eq=False)
class MixedLinf(_ShapedFamily):
    """The mixed l_inf family (eq. 9): ``||z||_inf^-k exp(-||z||_2^2 / 2 sigma^2)``, ``0 <= k < d``.

    Attributes:
      sigma: scale, finite and > 0 (a pytree leaf).
      k: shape, finite, ``0 <= k < d`` (static).
    """

    name: ClassVar[str] = "mixed_linf"
    radial_norm: ClassVar[str] = "linf"

    def _standard_max(self, key, n, d, dtype):
        table = mixed_linf_radial_table(self.k, d)
        return jnp.exp(tabulated_law.sample_table(key, table, (n,), dtype))

    def _sample_flat(self, key, n, d, dtype):
        k_a, k_face, k_x = jax.random.split(key, 3)
        t = self._standard_max(k_a, n, d, dtype)[:, None]  # a / sigma
        j, sign = _random_face(k_face, n, d, dtype)
        # Truncated N(0, 1) on (-t, t) by inversion on the lower half, which keeps
        # float32 precision near the truncation point: |x| = -ndtri(p),
        # p uniform on (Phi(-t), 1/2), the sign taken from v.
        lo = jax.scipy.special.ndtr(-t)
        v = jax.random.uniform(k_x, (n, d), dtype, minval=-1.0, maxval=1.0)
        mag = -jax.scipy.special.ndtri(lo + jnp.abs(v) * (0.5 - lo))
        a = self.sigma * t
        # Rounding may put |z_i| at or a hair above a (also after scaling by sigma):
        # a must stay the unique maximum.
        a_value = jax.lax.stop_gradient(a)
        below_a = a - (a_value - jnp.nextafter(a_value, 0.0))
        others = jnp.copysign(jnp.minimum(self.sigma * mag, below_a), v)
        return jnp.where(jnp.arange(d)[None, :] == j, sign * a, others)

    def _sample_radius(self, key, n, d, dtype):
        return self.sigma * self._standard_max(key, n, d, dtype)

    def _log_density_flat(self, z):
        linf = jnp.max(jnp.abs(z), axis=-1)
        return _power(self.k, jnp.log(linf)) - jnp.sum(z * z, axis=-1) / (2 * self.sigma**2)

    def _log_radial_density(self, r, d):
        return (
            _power(self.k, jnp.log(r))
            - r * r / (2 * self.sigma**2)
            + (d - 1) * _log_erf(r / (self.sigma * math.sqrt(2.0)))
        )


@dataclasses.dataclass(frozen=True, eq=False)
class PureLinf(_ShapedFamily):
    """The pure l_inf family (eq. 10): ``||z||_inf^-k exp(-||z||_inf^2 / 2 sigma^2)``, ``0 <= k < d``.

    The paper proves no worst-case perturbation for it, so soapbubble samples it
    (e.g. for the accuracy/robustness comparison of Figure 4) but does not
    certify with it.

    Attributes:
      sigma: scale, finite and > 0 (a pytree leaf).
      k: shape, finite, ``0 <= k < d`` (static).
    """

    name: ClassVar[str] = "pure_linf"
    radial_norm: ClassVar[str] = "linf"

    def _sample_flat(self, key, n, d, dtype):
        k_a, k_face, k_u = jax.random.split(key, 3)
        a = _chi_radius(k_a, n, (d - self.k) / 2, self.sigma, dtype)[:, None]
        j, sign = _random_face(k_face, n, d, dtype)
        u = jax.random.uniform(k_u, (n, d), dtype, minval=-1.0, maxval=1.0)
        return a * jnp.where(jnp.arange(d)[None, :] == j, sign, u)

    def _sample_radius(self, key, n, d, dtype):
        return _chi_radius(key, n, (d - self.k) / 2, self.sigma, dtype)

    def _log_density_flat(self, z):
        linf = jnp.max(jnp.abs(z), axis=-1)
        return _power(self.k, jnp.log(linf)) - linf * linf / (2 * self.sigma**2)

    def _log_radial_density(self, r, d):
        return (d - 1 - self.k) * jnp.log(r) - r * r / (2 * self.sigma**2)


# --------------------------------------------------------------------------- matching scales


def _check_match_args(sigma0, d, k, k_max_exclusive, rule):
    _check_sigma(sigma0, "sigma0")
    d = _check_d(d)
    k = _check_k(k)
    if not k < k_max_exclusive(d):
        raise ValueError(f"{rule} needs 0 <= k < {k_max_exclusive(d)} (d={d}), got k={k}")
    return d, k


def matched_sigma(sigma0, d: int, k: float):
    """The paper's rule: ``sigma = sigma0 * sqrt((d - 1) / (d - 1 - k))``.

    This matches the *mode* of ``||z||_2`` under the l2 family (radial density
    ``rho^(d-1-k) exp(-rho^2 / 2 sigma^2)``, mode ``sigma sqrt(d-1-k)``) to the mode
    under ``N(0, sigma0^2 I)``. The paper describes it as matching the expectation
    of the norm; for that, see :func:`matched_sigma_expected_norm`. The paper uses
    the same rule for the mixed l_inf family.

    Args:
      sigma0: Gaussian scale (> 0); may be a jax array (differentiable).
      d: dimension (>= 2).
      k: shape, ``0 <= k < d - 1``.
    """
    d, k = _check_match_args(sigma0, d, k, lambda d: d - 1, "matched_sigma")
    return sigma0 * math.sqrt((d - 1) / (d - 1 - k))


def matched_sigma_expected_norm(sigma0, d: int, k: float):
    """Scale of the l2 family whose ``E||z||_2`` equals that of ``N(0, sigma0^2 I)``.

    ``E||z||_2 = sigma sqrt2 Gamma((d-k+1)/2) / Gamma((d-k)/2)`` under the l2 family
    and ``sigma0 sqrt2 Gamma((d+1)/2) / Gamma(d/2)`` under the Gaussian.

    Args:
      sigma0: Gaussian scale (> 0); may be a jax array (differentiable).
      d: dimension (>= 1).
      k: shape, ``0 <= k < d``.
    """
    d, k = _check_match_args(sigma0, d, k, lambda d: d, "matched_sigma_expected_norm")
    gl = scipy.special.gammaln
    log_ratio = gl((d + 1) / 2) - gl(d / 2) - gl((d - k + 1) / 2) + gl((d - k) / 2)
    return sigma0 * math.exp(log_ratio)
