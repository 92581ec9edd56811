"""soapbubble: certified robustness by randomized smoothing with non-Gaussian families."""

from soapbubble import bounds, noise
from soapbubble.bounds import (
    RadiusTable,
    clopper_pearson_lower,
    dual_curve,
    gaussian_radius,
    lower_bound,
    radius_table,
)
from soapbubble.noise import (
    Gaussian,
    L2Family,
    MixedLinf,
    PureLinf,
    matched_sigma,
    matched_sigma_expected_norm,
)

__version__ = "0.1.0"

__all__ = [
    "noise",
    "bounds",
    "RadiusTable",
    "radius_table",
    "dual_curve",
    "lower_bound",
    "clopper_pearson_lower",
    "gaussian_radius",
    "Gaussian",
    "L2Family",
    "MixedLinf",
    "PureLinf",
    "matched_sigma",
    "matched_sigma_expected_norm",
]
