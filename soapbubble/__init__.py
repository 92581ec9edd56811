"""soapbubble: certified robustness by randomized smoothing with non-Gaussian families."""

from soapbubble import noise
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
    "Gaussian",
    "L2Family",
    "MixedLinf",
    "PureLinf",
    "matched_sigma",
    "matched_sigma_expected_norm",
]
