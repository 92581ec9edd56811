"""The rules: for each (family, attack), the worst case, the route to ``p_min`` and the α split.

Every module that certifies asks :func:`worst_case` (the dual bound, radius
tables, the table cache, ``certify``, the sequential route, the CLI and the main
job); nothing else decides which theorem applies, how the radius is scaled or
how the failure probability is shared.

=================  ======  ===============================  =============  ==============
family             attack  worst perturbation δ*            route          table's α_D
=================  ======  ===============================  =============  ==============
Gaussian           l2      ``r e1`` (Theorem 2, k = 0)      closed form    0
Gaussian           linf    ``r √d e1`` (Theorem 3)          closed form    0
L2Family           l2      ``r e1`` (Theorem 2)             exact          0
L2Family           linf    ``r √d e1`` (Theorem 3)          exact          0
MixedLinf          linf    ``r (1, …, 1)`` (Theorem 5)      Monte Carlo    α_D > 0
MixedLinf          l2      none proven                      refused        –
PureLinf           any     none proven                      refused        –
=================  ======  ===============================  =============  ==============

The failure probability α of a certificate is split as an :class:`AlphaBudget`:
``alpha_p`` for the bound on ``pA`` from the classifier's counts and ``alpha_d``
for the Monte Carlo table's own failure event (0 on the exact routes). Tables
built by soapbubble for a certificate at level α use ``alpha_d = α / 2``
(:meth:`WorstCase.default_alpha_d`). A certificate is wrong with probability at
most ``alpha_p + alpha_d = α``.

Bilateral certificates (Appendix D: the top class's worst case against every
other class's best case, ``certify(..., bilateral=True)``) share ``alpha_p``
once more, as a :class:`BilateralBudget` (:meth:`WorstCase.bilateral_budget`):
``alpha_a = alpha_p / 2`` for the lower bound on ``pA`` and ``alpha_b =
alpha_p / (2 (C - 1))`` for EACH of the ``C - 1`` upper bounds on the other
classes' ``pB`` (a union bound; with ``C = 2`` classes ``pB = 1 - pA`` needs no
bound of its own and ``alpha_a = alpha_p``). The table's ``alpha_d`` is
unchanged: the bilateral lookup uses the same table event.

A sampler that only approximates its family (MixedLinf draws ``‖z‖∞`` from a
tabulated law) is charged where it enters: its total-variation bound
(:meth:`WorstCase.sampler_tv`) is subtracted from every probability estimated
from its draws (the pA bound here, the table's D through the deviation of its
bound in :mod:`~soapbubble.bounds.dual`).

Example:
  >>> from soapbubble import noise
  >>> rule = worst_case(noise.L2Family(0.5, 10.0), "linf")
  >>> rule.route, rule.radius_scale(64)
  ('exact', 8.0)
  >>> rule.alpha_budget(0.001)
  AlphaBudget(alpha=0.001, alpha_p=0.001, alpha_d=0.0)
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

from soapbubble import noise

__all__ = ["WorstCase", "AlphaBudget", "BilateralBudget", "worst_case", "ROUTES"]

#: The routes to ``p_min(r)``; only "monte_carlo" has a failure probability of its own.
ROUTES = ("closed_form", "exact", "monte_carlo")


class AlphaBudget(NamedTuple):
    """How a certificate's failure probability is shared (Python floats).

    Attributes:
      alpha: the total, ``alpha_p + alpha_d``.
      alpha_p: level of the bound on ``pA`` (Clopper-Pearson or the confidence sequence).
      alpha_d: failure probability of the radius table (0 on exact routes).
    """

    alpha: float
    alpha_p: float
    alpha_d: float

    def as_dict(self) -> dict[str, float]:
        """The budget as a JSON-ready dict (the TSV sidecar's ``alpha_budget``)."""
        return {"alpha": self.alpha, "alpha_p": self.alpha_p, "alpha_d": self.alpha_d}


class BilateralBudget(NamedTuple):
    """How a bilateral certificate's failure probability is shared (Python floats).

    A bilateral certificate is wrong only if the lower bound on ``pA`` fails
    (probability ``<= alpha_a``), one of the ``num_classes - 1`` upper bounds on
    the other classes fails (``<= alpha_b`` each), or the table fails
    (``<= alpha_d``): in all at most ``alpha_a + (num_classes - 1) alpha_b +
    alpha_d <= alpha``.

    Attributes:
      alpha: the total, ``alpha_p + alpha_d``.
      alpha_p: the counts' share, ``>= alpha_a + (num_classes - 1) alpha_b``.
      alpha_d: failure probability of the radius table (0 on exact routes).
      alpha_a: level of the lower bound on ``pA``.
      alpha_b: level of EACH upper bound on ``pB``, ``B != A`` (0 when
        ``num_classes = 2``: then ``pB = 1 - pA``).
      num_classes: ``C``, the number of classes of the classifier.
    """

    alpha: float
    alpha_p: float
    alpha_d: float
    alpha_a: float
    alpha_b: float
    num_classes: int

    def as_dict(self, construction: str | None = None) -> dict[str, Any]:
        """The budget as a JSON-ready dict: :meth:`AlphaBudget.as_dict`'s keys plus ``bilateral``.

        ``construction`` says how the bounds were built (default: the Clopper-Pearson
        text of :func:`soapbubble.certify`; the sequential route states its own).

        ``{"alpha", "alpha_p", "alpha_d", "bilateral": {"alpha_a", "alpha_b", "num_classes",
        "construction"}}``: readers that know only the unilateral keys still find ``alpha_p``
        (the counts' total share) and ``alpha_d``.
        """
        return {
            "alpha": self.alpha,
            "alpha_p": self.alpha_p,
            "alpha_d": self.alpha_d,
            "bilateral": {
                "alpha_a": self.alpha_a,
                "alpha_b": self.alpha_b,
                "num_classes": self.num_classes,
                "construction": BILATERAL_CONSTRUCTION if construction is None else construction,
            },
        }


#: How a bilateral certificate bounds the other classes (recorded with its split).
BILATERAL_CONSTRUCTION = (
    "Clopper-Pearson lower bound on pA at alpha_a; Clopper-Pearson upper bound at alpha_b on each of"
    " the num_classes - 1 other classes (union bound), from the same n estimation samples"
)


class WorstCase(NamedTuple):
    """The rule for one (family, attack); see the module docstring's table.

    Attributes:
      family: the family's name (``family.describe()["family"]``).
      attack: "l2" or "linf".
      route: how ``p_min(r)`` is computed: "closed_form", "exact" or "monte_carlo".
      statistics: which sufficient statistics the dual bound uses: "l2" (‖z‖₂, z₁)
        or "mixed" (‖z‖∞, max z, min z, Σz).
      scaled: whether the attack radius ``r`` is certified as the l2 radius ``r √d``.
      theorem: the result that makes δ* the worst case.
    """

    family: str
    attack: str
    route: str
    statistics: str
    scaled: bool
    theorem: str

    @property
    def monte_carlo(self) -> bool:
        """Whether the table has a failure probability of its own."""
        return self.route == "monte_carlo"

    def radius_scale(self, d: int) -> float:
        """Factor from the attack radius to the radius of δ* in the statistics' norm."""
        return math.sqrt(d) if self.scaled else 1.0

    def default_alpha_d(self, alpha: float) -> float:
        """α_D of the table soapbubble builds for a certificate at level ``alpha``."""
        return alpha / 2 if self.monte_carlo else 0.0

    def alpha_budget(self, alpha: float, table_alpha_d: float | None = None) -> AlphaBudget:
        """Splits ``alpha`` between pA and the table.

        Args:
          alpha: total failure probability, in (0, 1).
          table_alpha_d: the table's own ``alpha_d`` (default: :meth:`default_alpha_d`).

        Raises:
          ValueError: if the table's ``alpha_d`` leaves nothing for pA.
        """
        alpha_d = self.default_alpha_d(alpha) if table_alpha_d is None else float(table_alpha_d)
        if not 0.0 <= alpha_d < alpha:
            raise ValueError(
                f"alpha must exceed the radius table's failure probability alpha_d={alpha_d}, got {alpha}"
            )
        return AlphaBudget(alpha=float(alpha), alpha_p=float(alpha) - alpha_d, alpha_d=alpha_d)

    def bilateral_budget(
        self, alpha: float, num_classes: int, table_alpha_d: float | None = None
    ) -> BilateralBudget:
        """Splits ``alpha`` for a bilateral certificate (module docstring).

        ``alpha_d`` and ``alpha_p`` are those of :meth:`alpha_budget`; ``alpha_p`` is
        halved between the lower bound on ``pA`` (``alpha_a``) and the ``C - 1``
        upper bounds on the other classes (``alpha_b`` each, rounded down so the
        shares never add up to more than ``alpha_p``). With ``C = 2``, ``pB = 1 - pA``
        exactly and all of ``alpha_p`` goes to ``pA``.

        Args:
          alpha: total failure probability, in (0, 1).
          num_classes: number of classes ``C >= 2``.
          table_alpha_d: the table's own ``alpha_d`` (default: :meth:`default_alpha_d`).

        Example:
          >>> from soapbubble import noise
          >>> b = worst_case(noise.Gaussian(0.5), "l2").bilateral_budget(0.001, 10)
          >>> b.alpha_a, round(b.alpha_b * 18, 12)
          (0.0005, 0.001)
        """
        try:
            classes = operator.index(num_classes)
        except TypeError:
            raise TypeError(f"num_classes must be an integer >= 2, got {num_classes!r}") from None
        if isinstance(num_classes, bool):
            raise TypeError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        base = self.alpha_budget(alpha, table_alpha_d)
        if classes == 2:
            alpha_a, alpha_b = base.alpha_p, 0.0
        else:
            alpha_a = base.alpha_p / 2
            alpha_b = (base.alpha_p - alpha_a) / (classes - 1)
            while alpha_a + (classes - 1) * alpha_b > base.alpha_p:  # float rounding: never more
                alpha_b = math.nextafter(alpha_b, 0.0)
        return BilateralBudget(base.alpha, base.alpha_p, base.alpha_d, float(alpha_a), float(alpha_b), classes)

    def sampler_tv(self, family: noise.SmoothingFamily, d: int) -> float:
        """Total-variation bound between the family's sampler and its exact law in dimension ``d``."""
        if isinstance(family, noise.MixedLinf):
            return float(noise.mixed_linf_radial_table(family.k, d).tv_bound)
        return 0.0


_NO_PURE = "no worst-case perturbation is proven for the pure l_inf family; certify with MixedLinf"
_NO_MIXED_L2 = (
    "no worst-case perturbation is proven for an l2 attack on the MixedLinf family"
    " (Theorem 5 covers the l_inf attack only); certify l2 attacks with Gaussian or L2Family"
)


def worst_case(family: Any, attack: Any) -> WorstCase:
    """The rule for certifying ``attack`` with ``family`` (or a ValueError saying why not).

    Args:
      family: a :mod:`soapbubble.noise` family.
      attack: "l2" or "linf".

    Returns:
      A :class:`WorstCase`.

    Raises:
      TypeError: ``family`` is not a soapbubble family.
      ValueError: an unknown ``attack``, or a pair without a proven worst case.

    Example:
      >>> from soapbubble import noise
      >>> worst_case(noise.MixedLinf(0.5, 4.0), "linf").theorem
      'Theorem 5: delta* = r (1, ..., 1)'
    """
    if attack not in ("l2", "linf"):
        raise ValueError(f"attack must be 'l2' or 'linf', got {attack!r}")
    if not isinstance(family, noise.SmoothingFamily):
        raise TypeError(f"family must be a soapbubble.noise family, got {type(family).__name__}")
    name = family.describe()["family"]
    if isinstance(family, noise.PureLinf):
        raise ValueError(_NO_PURE)
    if isinstance(family, noise.MixedLinf):
        if attack != "linf":
            raise ValueError(_NO_MIXED_L2)
        return WorstCase(name, attack, "monte_carlo", "mixed", False, "Theorem 5: delta* = r (1, ..., 1)")
    if isinstance(family, (noise.Gaussian, noise.L2Family)):
        route = "closed_form" if isinstance(family, noise.Gaussian) else "exact"
        if attack == "l2":
            return WorstCase(name, attack, route, "l2", False, "Theorem 2: delta* = r e1")
        return WorstCase(name, attack, route, "l2", True, "Theorem 3: delta* = r sqrt(d) e1")
    raise TypeError(f"family must be Gaussian, L2Family or MixedLinf, got {type(family).__name__}")
