"""soapbubble: certified robustness by randomized smoothing with non-Gaussian families.

The public surface:

* ``soapbubble.noise``: the smoothing families (``Gaussian``, ``L2Family``,
  ``MixedLinf``, ``PureLinf``) and matched scales.
* ``soapbubble.bounds``: Clopper-Pearson, the dual bound, radius tables.
* ``soapbubble.certify`` and ``soapbubble.predict``: Cohen et al.'s protocol
  (module :mod:`soapbubble.protocol`), compiled, batched, sharded over local
  devices (the counting loop: :mod:`soapbubble.counting`).
* ``soapbubble.certify_radii`` / ``certify_adaptive``: sequential certification
  (:mod:`soapbubble.sequential`): each input stops as soon as its radii are decided.
* ``soapbubble.smoothed_radius``: a differentiable certified radius of any family
  with a table, for training objectives (:mod:`soapbubble.objectives`).
* ``soapbubble.worst_case``: the one place that says, for a (family, attack),
  the worst-case perturbation, the route to the radius table and the α split.
* ``soapbubble.models``, ``soapbubble.data``, ``soapbubble.train``,
  ``soapbubble.analyze``: models and the checkpoint converter, datasets,
  noise-augmented training, certified-accuracy curves (imported on first use).
"""

import importlib

from soapbubble import bounds, counting, noise, objectives, protocol, sequential
from soapbubble.bounds import (
    AlphaBudget,
    RadiusTable,
    WorstCase,
    cached_radius_table,
    clopper_pearson_lower,
    dual_curve,
    gaussian_radius,
    lower_bound,
    radius_table,
    worst_case,
)
from soapbubble.protocol import Certificate, certify, predict
from soapbubble.objectives import SmoothedRadius, smoothed_radius
from soapbubble.sequential import RadiiCertificate, certify_adaptive, certify_radii
from soapbubble.noise import (
    Gaussian,
    L2Family,
    MixedLinf,
    PureLinf,
    matched_sigma,
    matched_sigma_expected_norm,
)

__version__ = "0.3.0"

_LAZY = ("data", "models", "train", "analyze", "runner", "main_job")

__all__ = [
    "noise",
    "bounds",
    "protocol",
    "counting",
    "sequential",
    "certify",
    "predict",
    "Certificate",
    "certify_radii",
    "certify_adaptive",
    "RadiiCertificate",
    "objectives",
    "smoothed_radius",
    "SmoothedRadius",
    "worst_case",
    "WorstCase",
    "AlphaBudget",
    "RadiusTable",
    "radius_table",
    "cached_radius_table",
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
