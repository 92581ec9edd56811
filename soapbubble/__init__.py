"""soapbubble: certified robustness by randomized smoothing with non-Gaussian families.

The public surface:

* ``soapbubble.noise``: the smoothing families (``Gaussian``, ``L2Family``,
  ``MixedLinf``, ``PureLinf``) and matched scales.
* ``soapbubble.bounds``: Clopper-Pearson, the dual bound, radius tables.
* ``soapbubble.certify``: the module of ``certify.certify`` and ``predict``
  (Cohen et al.'s protocol, compiled, batched, sharded over local devices);
  ``soapbubble.predict`` and ``soapbubble.Certificate`` are re-exported (the
  module keeps the name ``certify``).
* ``soapbubble.models``, ``soapbubble.data``, ``soapbubble.train``,
  ``soapbubble.analyze``: models and the checkpoint converter, datasets,
  noise-augmented training, certified-accuracy curves (imported on first use).
"""

import importlib

from soapbubble import bounds, certify, noise
from soapbubble.bounds import (
    RadiusTable,
    clopper_pearson_lower,
    dual_curve,
    gaussian_radius,
    lower_bound,
    radius_table,
)
from soapbubble.certify import Certificate, predict
from soapbubble.noise import (
    Gaussian,
    L2Family,
    MixedLinf,
    PureLinf,
    matched_sigma,
    matched_sigma_expected_norm,
)

__version__ = "0.1.0"

_LAZY = ("data", "models", "train", "analyze", "runner", "main_job")

__all__ = [
    "noise",
    "bounds",
    "certify",
    "predict",
    "Certificate",
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
    *_LAZY,
]


def __getattr__(name):
    # Heavier modules (orbax, matplotlib, tensorflow-datasets) load on first use.
    if name in _LAZY:
        return importlib.import_module(f"soapbubble.{name}")
    raise AttributeError(f"module 'soapbubble' has no attribute {name!r}")
