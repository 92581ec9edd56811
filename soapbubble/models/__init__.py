"""Models: the architecture registry, saved-model I/O and the architectures.

``load(path)`` gives the pure ``logits_fn(batch) -> logits`` of a saved model (the
only thing certification needs) as a classifier pytree,
``jax.tree_util.Partial(ApplyFn, variables)``: its weights are traced by the
certification loops, so checkpoints of one architecture share one compilation. The ResNets live in ``cifar_resnet`` and
``imagenet_resnet`` and are imported on first use (``soapbubble.models.<Name>``
finds a class there), which keeps ``import soapbubble.models`` light.

Example:
  >>> from soapbubble import models
  >>> "small_cnn" in models.registry.names()
  True
"""

from __future__ import annotations

import importlib

from soapbubble.models import io, registry
from soapbubble.models.io import ApplyFn, LoadedModel, ModelMeta, load, load_model, save_model
from soapbubble.models.small import SmallCNN

__all__ = [
    "ApplyFn",
    "CifarResNet",  # lazy (cifar_resnet)
    "ImageNetResNet",  # lazy (imagenet_resnet)
    "LoadedModel",
    "ModelMeta",
    "SmallCNN",
    "io",
    "load",
    "load_model",
    "registry",
    "save_model",
]

# Modules whose public names are served lazily (they register into the registry on import).
_LAZY = ("soapbubble.models.cifar_resnet", "soapbubble.models.imagenet_resnet")


def __getattr__(name: str):
    for module_name in _LAZY:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module 'soapbubble.models' has no attribute {name!r}")
