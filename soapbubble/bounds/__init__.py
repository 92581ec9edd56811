"""Certified bounds: statistics for pA, the dual bound of Theorem 1, radius tables.

Modules:
  rules     the rules: per (family, attack) the worst case, route, scaling, α split.
  confidence  exact Clopper-Pearson (host, float64) and the anytime-valid mixture sequence.
  stats     jit-able Clopper-Pearson (training, differentiable use), binomial test, DKW, Gaussian radii.
  dual      the Monte Carlo dual curve D(lambda) on a lambda grid, and V_r(p).
  exact_l2  the quadrature route for the l2 family (no Monte Carlo).
  table     RadiusTable: certified radius as a function of p_lower, saved with its parameters.
  cache     the on-disk cache of default tables (keyed by parameters, format and version).
"""

from soapbubble.bounds import cache, confidence, dual, exact_l2, stats, table, rules
from soapbubble.bounds.cache import cached_radius_table
from soapbubble.bounds.confidence import clopper_pearson_lower_exact, clopper_pearson_upper_exact
from soapbubble.bounds.rules import AlphaBudget, WorstCase, worst_case
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
    "rules",
    "worst_case",
    "WorstCase",
    "AlphaBudget",
    "confidence",
    "clopper_pearson_lower_exact",
    "clopper_pearson_upper_exact",
    "cache",
    "cached_radius_table",
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
