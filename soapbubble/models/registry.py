"""Architectures by name: what a saved model's ``arch`` field refers to.

Each architecture module registers a builder ``(**config) -> flax.linen.Module``
under a name; :func:`build` imports the module that defines a name on demand, so
loading a checkpoint needs no knowledge of where its architecture lives.
All modules take a batch of images in pixel space, NHWC, values in [0, 1], and
return logits; input normalization lives inside the model.
"""

from __future__ import annotations

import importlib
from typing import Callable

import flax.linen as nn

__all__ = ["register", "build", "names"]

# Which module defines each architecture (imported on first use).
_MODULES = {
    "small_cnn": "soapbubble.models.small",
    "cifar_resnet20": "soapbubble.models.cifar_resnet",
    "cifar_resnet56": "soapbubble.models.cifar_resnet",
    "cifar_resnet110": "soapbubble.models.cifar_resnet",
    "resnet50": "soapbubble.models.imagenet_resnet",
}

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: registers ``builder(**config) -> nn.Module`` under ``name``."""

    def wrap(builder):
        if name not in _MODULES:
            raise ValueError(f"architecture {name!r} must be listed in soapbubble.models.registry._MODULES")
        _BUILDERS[name] = builder
        return builder

    return wrap


def names() -> list[str]:
    """Every architecture name soapbubble knows."""
    return sorted(_MODULES)


def build(name: str, **config) -> nn.Module:
    """The flax module of architecture ``name``.

    Raises:
      ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in _MODULES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(names())}")
    if name not in _BUILDERS:
        importlib.import_module(_MODULES[name])
    return _BUILDERS[name](**config)
