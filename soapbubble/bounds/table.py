"""Radius tables: certified radius as a function of a lower bound on pA.

For a fixed (family, d, attack) the dual bound does not depend on the classifier
or the input, so it is computed once, as the smallest certifiable ``pA`` at each
radius of a grid (MATH.md section 3)::

    p_min(r) = min over lam of (1/2 + D_r(lam)) / lam,    R(p) = max{r : p_min(r) <= p}.

Certifying a dataset is then classifier counts plus a lookup that rounds the
radius down to the grid.

The route (closed form ``Phi(r_eff / sigma)`` for Gaussian, exact quadrature
(:mod:`.exact_l2`) for L2Family, the Monte Carlo dual curve (:mod:`.dual`) for
MixedLinf), the scaling ``r_eff`` (``r`` or Theorem 3's ``r * sqrt(d)``) and the
refusals come from :func:`soapbubble.bounds.worst_case`. ``route="monte_carlo"``
forces the Monte Carlo route for Gaussian and L2Family too (an independent check
of the exact routes). Only the Monte Carlo route uses a key: the exact routes
take ``key=None`` and refuse a key they would ignore.

A table carries its own accounting: its metadata must name its route and its
``alpha_d`` (positive on the Monte Carlo route), or it is refused.

Alpha accounting: a Monte Carlo table holds, with probability at least
``1 - alpha``, at every radius of its grid at once: each radius' DKW bound gets
``alpha / m`` (union bound over the ``m`` radii; the radius returned by a lookup
depends on the data, so all radii must hold together). Exact routes hold
deterministically (their quadrature error is added to ``p_min``), so their
``alpha_d`` is 0. A certificate that combines a table with a Clopper-Pearson
bound at level ``alpha_p`` fails with probability at most
``alpha_p + table.alpha_d``.

Example:
  >>> import jax, numpy as np
  >>> from soapbubble import noise
  >>> from soapbubble.bounds import table as table_lib
  >>> t = table_lib.radius_table(None, noise.Gaussian(0.5), 3072, "l2",  # closed form: no key
  ...                            radii=np.linspace(0.0, 2.0, 201))
  >>> float(t.radius(0.9))  # sigma * Phi^-1(0.9) = 0.6408, rounded down to the grid
  0.64
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from soapbubble import noise
from soapbubble.bounds import dual, exact_l2
from soapbubble.bounds.rules import ROUTES, worst_case

__all__ = ["RadiusTable", "radius_table", "default_radii", "default_lambdas", "FORMAT_VERSION"]

#: Version 2: the route and alpha_d are required; the cache key holds the soapbubble version.
FORMAT_VERSION = 2

# Parameters that define a table: a table loaded for a certification must match them.
_IDENTITY_KEYS = ("family", "sigma", "k", "d", "attack", "route", "n_samples", "alpha_d")


@dataclasses.dataclass(frozen=True, eq=False)
class RadiusTable:
    """Certified radius as a function of ``p_lower``.

    Attributes:
      radii: ``(m,)`` float64, strictly increasing, ``radii[0] >= 0``.
      p_min: ``(m,)`` float64, non-decreasing: the smallest ``p_lower`` that
        certifies ``radii[i]`` (``inf``: never). Rounded up, so a lookup is sound.
      metadata: every parameter the table was built with (family, sigma, k, d,
        attack, route, n_samples, alpha_d, key, lambdas, versions).
    """

    radii: np.ndarray
    p_min: np.ndarray
    metadata: Mapping[str, Any]

    def __post_init__(self):
        radii = np.array(self.radii, dtype=np.float64)
        p_min = np.array(self.p_min, dtype=np.float64)
        if radii.ndim != 1 or radii.size < 1 or radii.shape != p_min.shape:
            raise ValueError(f"radii and p_min must be equal non-empty 1-D arrays, got {radii.shape}, {p_min.shape}")
        if not (np.all(np.isfinite(radii)) and radii[0] >= 0 and np.all(np.diff(radii) > 0)):
            raise ValueError("radii must be finite, >= 0 and strictly increasing")
        if np.any(np.isnan(p_min)) or not np.all(p_min[1:] >= p_min[:-1]):
            raise ValueError("p_min must be non-decreasing and free of NaN")
        _check_accounting(self.metadata)
        radii.setflags(write=False)
        p_min.setflags(write=False)
        object.__setattr__(self, "radii", radii)
        object.__setattr__(self, "p_min", p_min)
        object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))

    @property
    def alpha_d(self) -> float:
        """Failure probability of the table itself (0 for exact routes)."""
        return float(self.metadata["alpha_d"])

    def radius(self, p_lower: Any) -> np.ndarray:
        """Certified radius for each ``p_lower``, rounded down to the table's grid.

        ``0.0`` where no radius of the grid is certified (in particular for
        ``p_lower < 1/2``, where a certifier abstains). Host numpy, vectorised: a
        million lookups take milliseconds.

        Args:
          p_lower: lower confidence bounds on pA, any shape, in ``[0, 1]``.

        Returns:
          float64 array of the shape of ``p_lower``.
        """
        p = np.asarray(p_lower, dtype=np.float64)
        if np.any(np.isnan(p)) or np.any(p < 0) or np.any(p > 1):
            bad = p[np.isnan(p) | (p < 0) | (p > 1)].ravel()[0]
            raise ValueError(f"p_lower must be in [0, 1], got {bad}")
        count = np.searchsorted(self.p_min, p, side="right")  # number of radii certified
        return np.where(count > 0, self.radii[np.maximum(count - 1, 0)], 0.0)

    def radius_jax(self, p_lower: jax.Array) -> jax.Array:
        """:meth:`radius` as a jax function (jit-able), in the dtype of ``p_lower``.

        ``p_min`` is rounded *up* and the radii *down* to that dtype, so float32
        lookups stay sound. A NaN ``p_lower`` gives NaN, never a radius.
        """
        p_lower = jnp.asarray(p_lower)
        dtype = p_lower.dtype if jnp.issubdtype(p_lower.dtype, jnp.floating) else jnp.float32
        p_min = jnp.asarray(_round_to(self.p_min, dtype, up=True))
        radii = jnp.asarray(_round_to(self.radii, dtype, up=False))
        p = p_lower.astype(dtype)
        count = jnp.searchsorted(p_min, p, side="right")
        out = jnp.where(count > 0, radii[jnp.maximum(count - 1, 0)], jnp.zeros((), dtype))
        # searchsorted puts NaN after everything (the largest radius): NaN stays NaN.
        return jnp.where(jnp.isnan(p), jnp.asarray(jnp.nan, dtype), out)

    def smooth_radius(self, p: jax.Array) -> jax.Array:
        """A differentiable radius for training objectives (not a certificate).

        The inverse of ``p_min`` by linear interpolation between grid radii (so
        at least :meth:`radius`), with the derivative from the implicit function
        theorem, ``dR/dp = 1 / p_min'(R)``, where ``p_min'`` is the central
        difference of the table interpolated at ``R`` (a continuous derivative,
        unlike the interpolant's own piecewise-constant slope). For the Gaussian
        both are the closed form ``sigma_eff * Phi^-1(p)``.

        Args:
          p: probabilities in ``(p_min[0], p_min[-1])``, any shape; outside that
            range the value is clamped and the derivative is 0.

        Returns:
          Array like ``p``.
        """
        meta = self.metadata
        if meta.get("route") == "closed_form":
            scale = math.sqrt(int(meta["d"])) if meta["attack"] == "linf" else 1.0  # Theorem 3
            sigma_eff = float(meta["sigma"]) / scale
            return sigma_eff * jax.scipy.special.ndtri(jnp.asarray(p))
        finite = np.isfinite(self.p_min)
        pm, rr = self.p_min[finite], self.radii[finite]
        keep = np.concatenate([[True], np.diff(pm) > 0])  # strictly increasing for inversion
        pm, rr = pm[keep], rr[keep]
        if pm.size < 3:
            raise ValueError("smooth_radius needs at least 3 distinct finite p_min values in the table")
        slope = np.gradient(pm, rr)  # dp_min/dr at each grid radius
        return _smooth_inverse(jnp.asarray(p), jnp.asarray(pm), jnp.asarray(rr), jnp.asarray(slope))

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Writes an ``.npz`` file: plain arrays and JSON metadata, no pickle."""
        meta = json.dumps(dict(self.metadata), sort_keys=True)
        with open(path, "wb") as f:
            np.savez(f, radii=self.radii, p_min=self.p_min, metadata=np.array(meta))

    @classmethod
    def load(cls, path: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> "RadiusTable":
        """Reads a table written by :meth:`save`; refuses one built for other parameters.

        Args:
          path: the ``.npz`` file.
          expected: parameters the table must have been built with (any of
            family, sigma, k, d, attack, route, n_samples, alpha_d). Floats are
            compared to 1e-12 relative.

        Raises:
          ValueError: if the file is not a soapbubble table or a parameter differs.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                radii, p_min, meta = f["radii"], f["p_min"], json.loads(str(f["metadata"]))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)!r} is not a readable soapbubble radius table: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} has table format {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        for name, want in (expected or {}).items():
            have = meta.get(name)
            if not _same(have, want):
                raise ValueError(
                    f"radius table {os.fspath(path)!r} was built with {name}={have!r}, expected {name}={want!r}"
                )
        return cls(radii=radii, p_min=p_min, metadata=meta)

    def identity(self) -> dict[str, Any]:
        """The parameters that define this table (for :meth:`load`'s ``expected``)."""
        return {key: self.metadata[key] for key in _IDENTITY_KEYS if key in self.metadata}


def _check_accounting(meta: Mapping[str, Any]) -> None:
    """A table must say how it was computed and what it may fail with."""
    route = meta.get("route")
    if route not in ROUTES:
        raise ValueError(f"table metadata must name its route, one of {ROUTES}, got route={route!r}")
    alpha_d = meta.get("alpha_d")
    if isinstance(alpha_d, bool) or not isinstance(alpha_d, (int, float)) or not 0.0 <= alpha_d < 1.0:
        raise ValueError(f"table metadata must give its failure probability alpha_d in [0, 1), got {alpha_d!r}")
    if route == "monte_carlo" and not alpha_d > 0.0:
        raise ValueError("a Monte Carlo table must have alpha_d > 0 (its DKW failure probability), got 0")


def _same(have, want) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(have, (int, float)):
        return math.isclose(float(have), float(want), rel_tol=1e-12, abs_tol=0.0)
    return have == want


def _round_to(values: np.ndarray, dtype, up: bool) -> np.ndarray:
    """Casts float64 values to ``dtype`` rounding up (or down) rather than to nearest."""
    dtype = np.dtype(dtype)
    cast = values.astype(dtype)
    wrong = cast.astype(np.float64) < values if up else cast.astype(np.float64) > values
    return np.where(wrong, np.nextafter(cast, np.array(np.inf if up else -np.inf, dtype)), cast)


@jax.custom_jvp
def _smooth_inverse(p, p_min, radii, slope):
    return jnp.interp(p, p_min, radii)


@_smooth_inverse.defjvp
def _smooth_inverse_jvp(primals, tangents):
    p, p_min, radii, slope = primals
    r = jnp.interp(p, p_min, radii)
    inside = (p > p_min[0]) & (p < p_min[-1])
    # Implicit function theorem on p_min(R(p)) = p.
    d_r = jnp.where(inside, 1.0 / jnp.interp(r, radii, slope), 0.0)
    return r, d_r * tangents[0]


# ---------------------------------------------------------------------- building


def default_radii(family: noise.SmoothingFamily, d: int, attack: str, m: int = 401) -> np.ndarray:
    """A grid of ``m`` radii from 0 to where nothing is certifiable at n ~ 1e7.

    l2 attack: up to ``6 sigma``; linf attack: up to ``6 sigma / sqrt(d)`` for
    Gaussian and L2Family (Theorem 3), and ``12 sigma / sqrt(d)`` for MixedLinf,
    which certifies l_inf balls a few times larger.
    """
    sigma = float(family.describe()["sigma"])
    if attack == "l2":
        top = 6.0 * sigma
    else:
        top = (12.0 if isinstance(family, noise.MixedLinf) else 6.0) * sigma / math.sqrt(d)
    return np.linspace(0.0, top, m)


def default_lambdas(count: int = 4001) -> np.ndarray:
    """The lambda grid for Monte Carlo tables: geometric from 0.5 to 1e6.

    The optimal lambda at the threshold is ``1 / median(W)``; ``1e6`` covers
    Gaussian-like ratios up to ``p_min ~ 1 - 1e-8``. The relative spacing
    (0.36% at 4001 values) costs ~1e-5 relative in ``p_min``.
    """
    return np.geomspace(0.5, 1e6, count)


def _check_radii(radii) -> np.ndarray:
    r = np.asarray(radii, dtype=np.float64)
    if r.ndim != 1 or r.size < 1:
        raise ValueError(f"radii must be a non-empty 1-D array, got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"radii must be finite and >= 0, got min {np.nanmin(r)}")
    if np.any(np.diff(r) <= 0):
        raise ValueError("radii must be strictly increasing")
    return r


def _check_alpha(alpha_d) -> float:
    alpha_d = float(alpha_d)
    if not 0.0 < alpha_d < 1.0:
        raise ValueError(f"alpha_d must be in (0, 1), got {alpha_d}")
    return alpha_d


def radius_table(
    key: jax.Array | None,
    family: noise.SmoothingFamily,
    d: int,
    attack: str,
    *,
    radii: Any = None,
    n_samples: int = 1_000_000,
    alpha_d: float = 1e-3,
    route: str = "auto",
    lambdas: Any = None,
    batch_size: int = 1024,
) -> RadiusTable:
    """Builds the radius table of ``family`` in dimension ``d`` for ``attack``.

    Args:
      key: PRNG key of the Monte Carlo route; ``None`` on the exact routes (which
        refuse a key they would ignore).
      family: ``Gaussian``, ``L2Family`` or ``MixedLinf`` (``PureLinf`` is refused).
      d: input dimension (``k < d``).
      attack: ``"l2"`` or ``"linf"``.
      radii: increasing grid of radii ``>= 0`` (default :func:`default_radii`).
      n_samples: Monte Carlo samples (Monte Carlo route).
      alpha_d: failure probability of the whole table (Monte Carlo route), split
        evenly over the radii.
      route: ``"auto"`` (closed form for Gaussian, exact quadrature for
        L2Family, Monte Carlo for MixedLinf) or ``"monte_carlo"``.
      lambdas: lambda grid of the Monte Carlo route (default :func:`default_lambdas`).
      batch_size: rows per d-dimensional batch (MixedLinf).

    Returns:
      A :class:`RadiusTable`.

    Raises:
      ValueError: a pair without a proven worst case, a key on an exact route
        (or none on the Monte Carlo route), bad radii, lambdas or counts.

    Warns:
      UserWarning: when the Monte Carlo table certifies no radius above 0 (too
        few samples or a lambda grid that misses the optimum).
    """
    rule = worst_case(family, attack)
    if route not in ("auto", "monte_carlo"):
        raise ValueError(f"route must be 'auto' or 'monte_carlo', got {route!r}")
    is_mc = route == "monte_carlo" or rule.monte_carlo
    if is_mc and key is None:
        raise ValueError("key must be a PRNG key for the Monte Carlo route, got None")
    if not is_mc and key is not None:
        raise ValueError(
            f"key is unused by the {rule.route} route of {rule.family} (no sampling): pass key=None"
        )
    d = family.check_dimension(d)
    alpha = _check_alpha(alpha_d)
    radii = _check_radii(default_radii(family, d, attack) if radii is None else radii)
    desc = family.describe()
    sigma = float(desc["sigma"])
    scale = rule.radius_scale(d)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "family": desc["family"],
        "sigma": sigma,
        "k": float(desc["k"]),
        "d": d,
        "attack": attack,
        "worst_case": rule.theorem,
    }
    if not is_mc and rule.route == "closed_form":
        # Phi(r / sigma) in float64, moved up two ulps so rounding never lowers it.
        p_min = np.nextafter(np.nextafter(scipy.special.ndtr(radii * scale / sigma), 2.0), 2.0)
        meta.update(route="closed_form", n_samples=0, alpha_d=0.0)
    elif not is_mc:
        exact = exact_l2.l2_p_min(radii * scale, sigma, family.k, d)
        p_min = np.asarray(exact.p_min, dtype=np.float64)  # rounded up by its error bound
        meta.update(route="exact", n_samples=0, alpha_d=0.0, max_quadrature_error=float(np.max(exact.error)))
    else:
        lams = default_lambdas() if lambdas is None else np.asarray(lambdas, dtype=np.float64)
        curve = dual.dual_curve(
            key, family, d, attack, radii, lams, n_samples, alpha_d=alpha / radii.size, batch_size=batch_size
        )
        with jax.enable_x64(True):
            d_upper = np.asarray(curve.d_upper, dtype=np.float64)
        # (1/2 + D_upper) / lam at every lambda is an upper bound on p_min; round up.
        p_min = np.min((0.5 + d_upper) / lams[None, :], axis=1) * (1.0 + 4.0 * np.finfo(np.float64).eps)
        if radii.size > 1 and not np.any(p_min[radii > 0] < 1.0):
            warnings.warn(
                f"this Monte Carlo table certifies no radius above 0 (n_samples={n_samples},"
                f" lambdas in [{lams.min():g}, {lams.max():g}]): raise n_samples or widen the lambda grid",
                stacklevel=2,
            )
        meta.update(
            route="monte_carlo",
            n_samples=int(n_samples),
            alpha_d=alpha,
            key=np.asarray(jax.random.key_data(key)).ravel().tolist(),
            lambdas={"min": float(lams.min()), "max": float(lams.max()), "count": int(lams.size)},
            epsilon=float(curve.epsilon),
        )
    # Thresholds above 1 are never met; the true p_min is increasing in r, so a
    # running maximum only raises thresholds (sound) and makes lookups a search.
    p_min = np.where(p_min >= 1.0, np.inf, p_min)
    p_min = np.maximum.accumulate(p_min)
    import soapbubble

    meta.update(soapbubble_version=soapbubble.__version__, jax_version=jax.__version__)
    return RadiusTable(radii=radii, p_min=p_min, metadata=meta)
