"""Certified bounds: statistics for pA, the dual bound of Theorem 1, radius tables.

Modules:
  stats     Clopper-Pearson bounds, the binomial test, DKW epsilon, Gaussian radii.
  dual      the Monte Carlo dual curve D(lambda) on a lambda grid, and V_r(p).
  exact_l2  the quadrature route for the l2 family (no Monte Carlo).
  table     RadiusTable: certified radius as a function of p_lower, saved with its parameters.
"""

from soapbubble.bounds import dual, exact_l2, stats, table
from soapbubble.bounds.dual import DualCurve, dual_curve, dual_curve_from_stats, lower_bound, ratio_statistics
from soapbubble.bounds.stats import (
    binomial_test_pvalue,
    clopper_pearson_lower,
    clopper_pearson_upper,
    dkw_epsilon,
    gaussian_radius,
    gaussian_radius_bilateral,
)
from soapbubble.bounds.table import RadiusTable, radius_table

__all__ = [
    "stats",
    "dual",
    "exact_l2",
    "table",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "binomial_test_pvalue",
    "dkw_epsilon",
    "gaussian_radius",
    "gaussian_radius_bilateral",
    "DualCurve",
    "dual_curve",
    "dual_curve_from_stats",
    "ratio_statistics",
    "lower_bound",
    "RadiusTable",
    "radius_table",
]
