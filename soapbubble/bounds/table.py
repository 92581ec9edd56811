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
``1 - alpha``, at every radius of its grid at once: each radius' bound gets
``alpha / m`` (union bound over the ``m`` radii; the radius returned by a lookup
depends on the data, so all radii must hold together). That bound is
:func:`soapbubble.bounds.dual.p_min_bound`: an empirical Bernstein bound on ``D``
at three lambdas per radius chosen on an independent pilot sample (``n / 40``),
which near ``p = 1`` is several times tighter than a DKW band over all lambdas. Exact routes hold
deterministically (their quadrature error is added to ``p_min``), so their
``alpha_d`` is 0. A certificate that combines a table with a Clopper-Pearson
bound at level ``alpha_p`` fails with probability at most
``alpha_p + table.alpha_d``.

Bilateral certification (MATH.md section 3, "Multi-class, bilateral")
---------------------------------------------------------------------
A table built with ``bilateral=True`` also keeps the lower-bound function
itself, ``V_r(p) = max_lam lam p - D_r(lam)``, on a grid of ``p`` for each
radius (:attr:`RadiusTable.v_p`, :attr:`RadiusTable.v`). ``V_r`` bounds from
below the smoothed probability of ANY class whose probability at the input is
at least ``p``, anywhere in the ball of radius ``r``; so the best case of a
class with probability at most ``pB`` is at most ``1 - V_r(1 - pB)``, and the
radius ``r`` is certified for the top class when::

    V_r(pA_lower) > 1 - V_r(1 - pB_upper)      (Gaussian: r < sigma/2 (Phi^-1(pA) - Phi^-1(pB)))

(:meth:`RadiusTable.bilateral_radius`). The grid of ``p`` is
:func:`bilateral_p_grid`: ``0`` and ``Phi(t)`` for ``t`` from -7.5 to 7.5 in
steps of 0.01 (so rounding a ``p`` down to the grid costs at most 0.01 in
``Phi^-1(p)``, i.e. at most ``0.01 sigma`` of Gaussian radius for both arguments
together). Every stored value is a lower bound, rounded down, and lookups use
the grid point at or below ``p`` (``V_r`` is non-decreasing in ``p``). Routes:

* closed form: ``Phi(Phi^-1(p) - r_eff / sigma)`` less ``1e-13`` (float error);
* Monte Carlo: :func:`soapbubble.bounds.dual.lower_bound` on a DKW curve
  (:func:`soapbubble.bounds.dual.dual_curve_from_stats`) from the same samples
  as ``p_min``; each radius' ``alpha / m`` is split evenly between the two bounds;
  the default lambda grid then also reaches down to 1e-3;
* exact (l2 family): ``max_j lam_j p - D_upper(lam_j)`` over
  ``_EXACT_V_LINES`` (20) values of ``lam`` per radius, where
  ``D(lam) = lam P(W < lam) - P(W > 1/lam)`` (the family's symmetry) is bounded
  with the proven brackets of :func:`soapbubble.bounds.exact_l2.l2_ratio_cdf`
  (any ``lam`` gives a valid bound, so a finite set is sound). The lams are the
  Gaussian Neyman-Pearson ones for ``Phi^-1(p)`` in ``[2 s - 5, 5]``,
  ``s = r_eff / sigma_eff``: where the bilateral condition can hold for ``n`` up
  to ~1e7 (beyond, the outermost line still gives a valid, looser bound). Each
  radius costs ~1 s of quadrature, so V is computed at about ``_EXACT_V_RADII``
  (101) radii of the grid (every ``stride``-th, and the last, skipping
  ``s >= 5``); a radius between two of them takes the V of the next one above
  (``V_r`` is non-increasing in ``r``), so there the bilateral radius is rounded
  down to that coarser grid. About a minute on 2 CPU cores, once per cached table.

Two sound refinements are then applied to every route: a running maximum along
``p`` (a lower bound at ``p`` holds at every larger ``p``) and a running maximum
from the largest radius down (a bound over a larger ball holds in every smaller
one); ``V_0(p) = p`` exactly. Tables without V (``bilateral=False``, or files of
format 2) certify unilaterally as before; :meth:`RadiusTable.bilateral_radius`
refuses them.

Example:
  >>> import jax, numpy as np
  >>> from soapbubble import noise
  >>> from soapbubble.bounds import table as table_lib
  >>> t = table_lib.radius_table(None, noise.Gaussian(0.5), 3072, "l2",  # closed form: no key
  ...                            radii=np.linspace(0.0, 2.0, 201))
  >>> float(t.radius(0.9))  # sigma * Phi^-1(0.9) = 0.6408, rounded down to the grid
  0.64
  >>> b = table_lib.radius_table(None, noise.Gaussian(0.5), 3072, "l2", radii=np.linspace(0.0, 2.0, 201),
  ...                            bilateral=True)
  >>> round(float(b.bilateral_radius(0.9, 0.02)), 6)  # sigma/2 (Phi^-1(0.9) - Phi^-1(0.02)) = 0.8338, rounded down
  0.83
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
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

__all__ = [
    "RadiusTable",
    "radius_table",
    "default_radii",
    "default_lambdas",
    "bilateral_p_grid",
    "BILATERAL_SETTINGS",
    "FORMAT_VERSION",
    "READABLE_FORMATS",
]

#: Version 2: the route and alpha_d are required; the cache key holds the soapbubble version.
#: Version 3: optional arrays ``v_p`` and ``v`` (the bilateral V grid).
FORMAT_VERSION = 3
#: Formats :meth:`RadiusTable.load` reads (a format-2 file is a table without V).
READABLE_FORMATS = (2, 3)

# The p grid of V: 0 and Phi(t), t in [-_V_T, _V_T] in steps of _V_STEP.
_V_T = 7.5
_V_STEP = 0.01
# Monte Carlo route: a bilateral table's default lambdas reach down to this.
_V_LAMBDA_MIN = 1e-3
# Exact route: V is computed at about this many radii, with this many lambdas each.
_EXACT_V_RADII = 101
_EXACT_V_LINES = 20
_EXACT_V_TMAX = 5.0  # largest Phi^-1(p) the exact route's lambdas aim at (n up to ~1e7)
#: Everything that fixes how a bilateral V grid is computed (part of a bilateral table's cache key).
BILATERAL_SETTINGS = {"t_max": _V_T, "t_step": _V_STEP, "exact_radii": _EXACT_V_RADII,
                      "exact_lambdas": _EXACT_V_LINES, "exact_t_max": _EXACT_V_TMAX}
# Float error margin of the closed form Phi(Phi^-1(p) - s) (a few 1e-16 in fact).
_CLOSED_FORM_V_MARGIN = 1e-13
_U = 2.0**-53
# Monte Carlo p_min (dual.p_min_bound): a pilot of n_samples / 40 picks the lambdas,
# three per radius within exp(+-0.1) of the pilot's optimum.
_PILOT_FRACTION = 40
_BOUND_LAMBDAS = 3
_BOUND_WIDTH = 0.1

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
        attack, route, n_samples, alpha_d, key, lambdas, versions; for a
        bilateral table also ``bilateral``: how V was computed).
      v_p: ``(P,)`` float64, strictly increasing in ``[0, 1]``, or None: the p
        grid of the bilateral V (module docstring).
      v: ``(m, P)`` float64 in ``[0, 1]``, or None: ``v[i, j] <= V_{radii[i]}(v_p[j])``,
        non-decreasing along ``p`` and non-increasing along the radii.
    """

    radii: np.ndarray
    p_min: np.ndarray
    metadata: Mapping[str, Any]
    v_p: np.ndarray | None = None
    v: np.ndarray | None = None

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
        if (self.v_p is None) != (self.v is None):
            raise ValueError("v_p and v must be given together (a bilateral table) or both be None")
        if self.v_p is not None:
            v_p = np.array(self.v_p, dtype=np.float64)
            v = np.array(self.v, dtype=np.float64)
            if v_p.ndim != 1 or v_p.size < 2 or v.shape != (radii.size, v_p.size):
                raise ValueError(f"v_p must be (P,) with P >= 2 and v (m, P) = ({radii.size}, P), got"
                                 f" {v_p.shape}, {v.shape}")
            if not (np.all(np.isfinite(v_p)) and v_p[0] >= 0 and v_p[-1] <= 1 and np.all(np.diff(v_p) > 0)):
                raise ValueError("v_p must be strictly increasing in [0, 1]")
            if not (np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(v <= 1)):
                raise ValueError("v must be finite and in [0, 1]")
            if np.any(np.diff(v, axis=1) < 0) or np.any(np.diff(v, axis=0) > 0):
                raise ValueError("v must be non-decreasing along p and non-increasing along the radii")
            v_p.setflags(write=False)
            v.setflags(write=False)
            object.__setattr__(self, "v_p", v_p)
            object.__setattr__(self, "v", v)
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

    @property
    def bilateral(self) -> bool:
        """Whether the table keeps the V grid that bilateral certification needs."""
        return self.v is not None

    def _require_v(self) -> None:
        if self.v is None:
            raise ValueError(
                "this radius table has no bilateral V grid (it was built with bilateral=False, or is a"
                " format-2 file): build one with radius_table(..., bilateral=True) to certify bilaterally"
            )

    def _v_index(self, p: np.ndarray) -> np.ndarray:
        """Index of the grid point at or below ``p`` (-1 below the grid)."""
        return np.searchsorted(self.v_p, p, side="right") - 1

    def v_lower(self, p: Any) -> np.ndarray:
        """Lower bounds on ``V_r(p)`` for every radius of the table, from the grid.

        The value at the grid point at or below ``p`` (0 below the grid): never
        above the true ``V_r(p)`` (when the table holds).

        Args:
          p: probabilities in ``[0, 1]``, any shape.

        Returns:
          float64 array ``(m, *p.shape)``.
        """
        self._require_v()
        p = _check_probabilities(p, "p")
        idx = self._v_index(p)
        vals = np.take(self.v, np.maximum(idx, 0), axis=1)
        return np.where(idx >= 0, vals, 0.0)

    def bilateral_radius(self, p_a_lower: Any, p_b_upper: Any) -> np.ndarray:
        """Largest grid radius certified by the bilateral condition, rounded down; 0 if none.

        Radius ``radii[i]`` is certified when ``v[i, a] + v[i, b] > 1``, where ``a``
        is the grid point at or below ``p_a_lower`` and ``b`` the grid point at or
        below ``1 - p_b_upper`` (rounded down): then for every perturbation in
        the ball, the top class keeps probability ``>= v[i, a]`` and every other
        class ``<= 1 - v[i, b]`` (module docstring). Both are lower bounds rounded
        down, and a float sum of two floats is above 1 only if their exact sum is.

        Args:
          p_a_lower: lower bounds on the top class's probability, in ``[0, 1]``.
          p_b_upper: upper bounds on the probability of EVERY other class, in
            ``[0, 1]`` (broadcast with ``p_a_lower``).

        Returns:
          float64 array of the broadcast shape.

        Raises:
          ValueError: a table without V, or a NaN or out-of-range argument.
        """
        self._require_v()
        pa = _check_probabilities(p_a_lower, "p_a_lower")
        pb = _check_probabilities(p_b_upper, "p_b_upper")
        pa, pb = np.broadcast_arrays(pa, pb)
        q = np.maximum(np.nextafter(1.0 - pb, -1.0), 0.0)  # <= 1 - pb exactly
        ia, iq = self._v_index(pa).ravel(), self._v_index(q).ravel()
        ok_a, ok_q = ia >= 0, iq >= 0
        ia, iq = np.maximum(ia, 0), np.maximum(iq, 0)
        m = self.radii.size
        # v[i, a] + v[i, q] is non-increasing in i: bisect for the number of certified radii.
        lo, hi = np.zeros(ia.shape, np.int64), np.full(ia.shape, m, np.int64)
        while np.any(lo < hi):
            active = lo < hi
            mid = np.minimum((lo + hi) // 2, m - 1)
            total = np.where(ok_a, self.v[mid, ia], 0.0) + np.where(ok_q, self.v[mid, iq], 0.0)
            good = total > 1.0
            lo = np.where(active & good, mid + 1, lo)
            hi = np.where(active & ~good, mid, hi)
        out = np.where(lo > 0, self.radii[np.maximum(lo - 1, 0)], 0.0)
        return out.reshape(pa.shape)

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
        arrays = {"radii": self.radii, "p_min": self.p_min, "metadata": np.array(meta)}
        if self.v is not None:
            arrays.update(v_p=self.v_p, v=self.v)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

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
                v_p = f["v_p"] if "v_p" in f.files else None
                v = f["v"] if "v" in f.files else None
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)!r} is not a readable soapbubble radius table: {e}") from e
        if meta.get("format_version") not in READABLE_FORMATS:
            raise ValueError(
                f"{os.fspath(path)!r} has table format {meta.get('format_version')!r}, expected one of"
                f" {READABLE_FORMATS}"
            )
        for name, want in (expected or {}).items():
            have = meta.get(name)
            if not _same(have, want):
                raise ValueError(
                    f"radius table {os.fspath(path)!r} was built with {name}={have!r}, expected {name}={want!r}"
                )
        return cls(radii=radii, p_min=p_min, metadata=meta, v_p=v_p, v=v)

    def identity(self) -> dict[str, Any]:
        """The parameters that define this table (for :meth:`load`'s ``expected``)."""
        return {key: self.metadata[key] for key in _IDENTITY_KEYS if key in self.metadata}


def _check_probabilities(p: Any, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    bad = np.isnan(p) | (p < 0) | (p > 1)
    if np.any(bad):
        raise ValueError(f"{name} must be in [0, 1], got {p[bad].ravel()[0]}")
    return p


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
    """A grid of radii from 0 to where nothing is certifiable at n ~ 1e7.

    l2 attack: ``m`` radii evenly spaced up to ``6 sigma``; linf attack: up to
    ``6 sigma / sqrt(d)`` (Theorem 3 for Gaussian and L2Family). MixedLinf (linf)
    gets a finer grid, because its Monte Carlo table is tight to about 1%: 20 even
    steps up to ``top / 100``, then geometric steps of 0.6% up to ``top = 6 sigma /
    sqrt(d)`` (791 radii; rounding a radius down to the grid costs less than 0.6%).
    """
    sigma = float(family.describe()["sigma"])
    if attack == "l2":
        return np.linspace(0.0, 6.0 * sigma, m)
    top = 6.0 * sigma / math.sqrt(d)
    if isinstance(family, noise.MixedLinf):
        low = np.linspace(0.0, top / 100, 21)
        return np.concatenate([low, np.geomspace(top / 100, top, 771)[1:]])
    return np.linspace(0.0, top, m)


def default_lambdas(count: int = 4001) -> np.ndarray:
    """The lambda grid for Monte Carlo tables: geometric from 0.5 to 1e6.

    The optimal lambda at the threshold is ``1 / median(W)``; ``1e6`` covers
    Gaussian-like ratios up to ``p_min ~ 1 - 1e-8``. The relative spacing
    (0.36% at 4001 values) costs ~1e-5 relative in ``p_min``.
    """
    return np.geomspace(0.5, 1e6, count)


def bilateral_p_grid() -> np.ndarray:
    """The p grid of the bilateral V: 0 and ``Phi(t)``, ``t`` from -7.5 to 7.5 in steps of 0.01.

    ``Phi(t)`` is computed from its nearer tail (``1 - Phi(-t)`` above 1/2), and
    points that coincide in float64 are merged, so the grid is strictly increasing.
    """
    t = np.linspace(-_V_T, _V_T, int(round(2 * _V_T / _V_STEP)) + 1)
    p = np.where(t <= 0, scipy.special.ndtr(np.minimum(t, 0.0)), 1.0 - scipy.special.ndtr(-np.maximum(t, 0.0)))
    return np.unique(np.concatenate([[0.0], p]))


def _closed_form_v(radii_eff: np.ndarray, sigma: float, p: np.ndarray) -> np.ndarray:
    """``Phi(Phi^-1(p) - r / sigma)`` less a float margin (the Gaussian's exact V)."""
    with np.errstate(divide="ignore"):
        t = scipy.special.ndtri(p)
    v = scipy.special.ndtr(t[None, :] - radii_eff[:, None] / sigma)
    return v - _CLOSED_FORM_V_MARGIN


def _exact_v(radii_eff: np.ndarray, sigma: float, k: float, d: int, p: np.ndarray) -> tuple[np.ndarray, dict]:
    """V of the l2 family from exact CDFs of ``W`` at a few lambdas per radius (module docstring).

    For each lambda, ``D(lam) = lam P(W < lam) - P(W > 1/lam)`` (the l2 family's
    symmetry, :mod:`.exact_l2`) is bounded above with the proven brackets of
    :func:`~soapbubble.bounds.exact_l2.l2_ratio_cdf` at ``lam`` and at ``1/lam``
    rounded up, and ``lam p - D_upper(lam)`` bounds ``V_r(p)`` below for every
    ``p``. Radii with ``r_eff / sigma_eff >= _EXACT_V_TMAX`` are skipped (no
    bilateral certificate there before ``n ~ 1e8``). Returns ``(v, info)``;
    rows not computed are 0 (filled by :func:`_refine_v`).
    """
    m = radii_eff.size
    stride = max(1, math.ceil(m / _EXACT_V_RADII))
    rows = np.unique(np.concatenate([np.arange(0, m, stride), [m - 1]]))
    sigma_eff = sigma * math.sqrt((d - k) / d)  # the lognormal approximation of log W (lambda choice only)
    rows = rows[(radii_eff[rows] > 0) & (radii_eff[rows] < _EXACT_V_TMAX * sigma_eff)]
    v = np.zeros((m, p.size))
    max_error = 0.0
    for i in rows:
        s = radii_eff[i] / sigma_eff
        t = np.linspace(max(2.0 * s - _EXACT_V_TMAX, -_EXACT_V_TMAX), _EXACT_V_TMAX, _EXACT_V_LINES)
        lam = np.exp(s * t - 0.5 * s * s)  # Neyman-Pearson lambda of Phi^-1(p) = t if log W were normal
        inv = np.nextafter(1.0 / lam, np.inf)  # >= 1 / lam exactly
        cdf = exact_l2.l2_ratio_cdf(np.concatenate([lam, inv]), float(radii_eff[i]), sigma, k, d)
        hi = np.minimum(np.asarray(cdf.prob) + np.asarray(cdf.error), 1.0)  # >= P(W < c)
        max_error = max(max_error, float(np.max(cdf.error)))
        # D(lam) = lam P(W < lam) - (1 - P(W <= 1/lam)) <= lam hi(lam) + hi(inv) - 1, rounded up.
        a = lam * hi[: lam.size] * (1.0 + 4.0 * _U)
        d_up = a + hi[lam.size :] - 1.0 + 8.0 * _U * (a + 2.0)
        # lam p - D(lam) for each lambda, every float operation rounded against us.
        lines = (lam[:, None] * (1.0 - 4.0 * _U)) * p[None, :] - d_up[:, None] - 4.0 * _U * lam[:, None]
        v[i] = np.maximum(lines.max(axis=0), 0.0)
    info = {"v_radii": int(rows.size), "v_stride": int(stride), "v_lambdas": _EXACT_V_LINES,
            "v_t_max": _EXACT_V_TMAX, "v_max_cdf_error": max_error}
    return v, info


def _refine_v(v: np.ndarray, radii: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Sound refinements of lower bounds on ``V_r(p)`` (module docstring).

    ``0 <= V_r(p) <= p`` (any valid lower bound may be clipped into it),
    ``V_0(p) = p``, a bound at ``p`` holds at larger ``p``, and a bound at a
    radius holds at smaller radii.
    """
    v = np.clip(np.nan_to_num(v, nan=0.0), 0.0, p[None, :])
    if radii[0] == 0.0:
        v[0] = p
    v = np.maximum.accumulate(v, axis=1)
    return np.maximum.accumulate(v[::-1], axis=0)[::-1].copy()


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


# --------------------------------------------------------------------------- build progress


def _show_progress(progress: bool | None) -> bool:
    """``progress``, or for ``None`` whether stderr is a terminal (no bars in logs, CI or tests)."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be a bool or None, got {progress!r}")
    return bool(progress)


def _statistics(draws, family, d: int, attack: str, batch_size: int, progress: bool | None) -> list:
    """:func:`dual.ratio_statistics` of each ``(key, n)`` of ``draws``, with a progress bar if asked."""
    if not _show_progress(progress):
        return [dual.ratio_statistics(k, family, d, attack, n, batch_size=batch_size) for k, n in draws]
    from tqdm.auto import tqdm

    with tqdm(total=sum(n for _, n in draws), desc="radius table: Monte Carlo samples", unit="sample",
              unit_scale=True, file=sys.stderr) as bar:
        return [dual.ratio_statistics(k, family, d, attack, n, batch_size=batch_size, progress=bar.update)
                for k, n in draws]


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
    bilateral: bool = False,
    progress: bool | None = None,
) -> RadiusTable:
    """Builds the radius table of ``family`` in dimension ``d`` for ``attack``.

    Args:
      key: PRNG key of the Monte Carlo route; ``None`` on the exact routes (which
        refuse a key they would ignore).
      family: ``Gaussian``, ``L2Family`` or ``MixedLinf`` (``PureLinf`` is refused).
      d: input dimension (``k < d``).
      attack: ``"l2"`` or ``"linf"``.
      radii: increasing grid of radii ``>= 0`` (default :func:`default_radii`).
      n_samples: Monte Carlo samples (Monte Carlo route, >= 2), plus a pilot of
        ``n_samples // 40`` (at least 1) that chooses the lambdas.
      alpha_d: failure probability of the whole table (Monte Carlo route), split
        evenly over the radii.
      route: ``"auto"`` (closed form for Gaussian, exact quadrature for
        L2Family, Monte Carlo for MixedLinf) or ``"monte_carlo"``.
      lambdas: lambda grid of the Monte Carlo route (default :func:`default_lambdas`; with
        ``bilateral=True`` also 620 geometric values from 1e-3 to 0.5, which V at
        ``p < 1/2`` needs; ``p_min`` never takes its minimum there, so it is the
        same up to float rounding of the sums).
      batch_size: rows per d-dimensional batch (MixedLinf).
      bilateral: also keep the V grid that bilateral certification needs
        (module docstring): instant on the closed form, seconds on the Monte
        Carlo route, about a minute (2 CPU cores, 401 radii) on the exact route.
      progress: show a tqdm bar of the Monte Carlo samples drawn, with the time
        left, on stderr (the sampling is nearly all of a large Monte Carlo
        build: ~50 minutes for mixed l_inf at ImageNet size on 2 cores).
        ``None`` (default) shows it only when stderr is a terminal, so logs,
        CI and tests stay clean. The table is the same bit for bit either way:
        the samples are drawn in host-visible pieces of the same batch keys.

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
    if not isinstance(bilateral, (bool, np.bool_)):
        raise TypeError(f"bilateral must be a bool, got {bilateral!r}")
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
    v_p = bilateral_p_grid() if bilateral else None
    v = None
    if not is_mc and rule.route == "closed_form":
        # Phi(r / sigma) in float64, moved up two ulps so rounding never lowers it.
        p_min = np.nextafter(np.nextafter(scipy.special.ndtr(radii * scale / sigma), 2.0), 2.0)
        meta.update(route="closed_form", n_samples=0, alpha_d=0.0)
        if bilateral:
            v = _closed_form_v(radii * scale, sigma, v_p)
            meta["bilateral"] = {"v": "Phi(Phi^-1(p) - r_eff/sigma) - 1e-13"}
    elif not is_mc:
        exact = exact_l2.l2_p_min(radii * scale, sigma, family.k, d)
        p_min = np.asarray(exact.p_min, dtype=np.float64)  # rounded up by its error bound
        meta.update(route="exact", n_samples=0, alpha_d=0.0, max_quadrature_error=float(np.max(exact.error)))
        if bilateral:
            v, info = _exact_v(radii * scale, sigma, float(family.k), d, v_p)
            meta["bilateral"] = {"v": "max over lambdas of lam p - D_upper(lam), exact_l2.l2_ratio_cdf brackets",
                                 **info}
    else:
        if lambdas is not None:
            lams = np.asarray(lambdas, dtype=np.float64)
        elif bilateral:
            # V at p < 1/2 needs lambdas below 1/2 too; they never give p_min ((1/2 + D)/lam > 1 there).
            lams = np.concatenate([np.geomspace(_V_LAMBDA_MIN, 0.5, 621)[:-1], default_lambdas()])
        else:
            lams = default_lambdas()
        dual._check_slack_dimension(d)  # before any sampling
        k_main, k_pilot = jax.random.split(key)
        n_pilot = max(1, n_samples // _PILOT_FRACTION)
        stats, pilot = _statistics(((k_main, n_samples), (k_pilot, n_pilot)), family, d, attack, batch_size,
                                   progress)
        # Each radius gets alpha / m (union over the radii); a bilateral table splits it
        # between p_min's bound and the DKW curve that gives V (same samples, two events).
        per_radius = alpha / radii.size / (2 if bilateral else 1)
        bound = dual.p_min_bound(family, stats, pilot, d, attack, radii, alpha_d=per_radius,
                                 lambdas=default_lambdas() if lambdas is None else lams,
                                 n_lambdas=_BOUND_LAMBDAS, width=_BOUND_WIDTH)
        with jax.enable_x64(True):
            p_min = np.asarray(bound.p_min, dtype=np.float64)
            best = np.argmin(np.asarray((0.5 + bound.d_upper) / bound.lambdas), axis=1)
            deviation = np.take_along_axis(np.asarray(bound.deviation), best[:, None], 1)[:, 0]
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
            p_min_bound={"bound": "empirical Bernstein (Maurer-Pontil) on antithetic pairs at pilot lambdas",
                         "n_pilot": int(n_pilot), "n_lambdas": _BOUND_LAMBDAS, "width": _BOUND_WIDTH,
                         "alpha_per_radius": per_radius,
                         "max_deviation": float(np.max(deviation[p_min < 1.0], initial=0.0))},
        )
        if bilateral:
            curve = dual.dual_curve_from_stats(family, stats, d, attack, radii, lams, alpha_d=per_radius)
            with jax.enable_x64(True):
                v = np.asarray(dual.lower_bound(v_p, curve), dtype=np.float64)
            meta["epsilon"] = float(curve.epsilon)
            meta["bilateral"] = {"v": "dual.lower_bound on a DKW curve from the same samples (half of alpha_d)"}
    # Thresholds above 1 are never met; the true p_min is increasing in r, so a
    # running maximum only raises thresholds (sound) and makes lookups a search.
    p_min = np.where(p_min >= 1.0, np.inf, p_min)
    p_min = np.maximum.accumulate(p_min)
    import soapbubble

    meta.update(soapbubble_version=soapbubble.__version__, jax_version=jax.__version__)
    if bilateral:
        v = _refine_v(v, radii, v_p)
        meta["bilateral"].update(p_grid={"t_max": _V_T, "t_step": _V_STEP, "count": int(v_p.size)})
    return RadiusTable(radii=radii, p_min=p_min, metadata=meta, v_p=v_p, v=v)
