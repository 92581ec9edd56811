"""The default model: a small CNN for the embedded 8x8 grey digits (``"small_cnn"``).

A 3x3 convolution at 8x8, a 2x2 average pool, a 3x3 convolution at 4x4, another
2x2 average pool and a linear layer on the flattened 2x2 maps: about 21k parameters,
about 10^5 images per second on 2 CPU cores (so certifying one input with 10^5
noise draws takes about a second).
The input is normalized inside the model with the digits training-split mean and
deviation, so noise is added in pixel space ([0, 1]).

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = SmallCNN()
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from soapbubble.models import registry

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "SmallCNN", "small_cnn"]

# Mean and standard deviation of the digits training split's pixels (in [0, 1]),
# checked against the data in tests/test_models_io.py.
DIGITS_MEAN = 0.30523592
DIGITS_STD = 0.37598539


class SmallCNN(nn.Module):
    """Small CNN for NHWC images in [0, 1] (default: 8x8x1 digits).

    Attributes:
      num_classes: number of logits.
      features: channels of the two convolutions.
      use_batchnorm: BatchNorm after each convolution (running averages in eval).
      mean, std: input normalization (per channel or scalar), applied inside.
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    use_batchnorm: bool = False
    mean: float | Sequence[float] = DIGITS_MEAN
    std: float | Sequence[float] = DIGITS_STD

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Logits (B, num_classes) float32 of a batch x (B, H, W, C) in [0, 1]."""
        x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
        f1, f2 = self.features

        def block(x, f):
            x = nn.Conv(f, (3, 3), use_bias=not self.use_batchnorm)(x)
            if self.use_batchnorm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.relu(x)

        x = nn.avg_pool(block(x, f1), (2, 2), strides=(2, 2))
        x = nn.avg_pool(block(x, f2), (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


@registry.register("small_cnn")
def small_cnn(
    num_classes: int = 10,
    features: Sequence[int] = (32, 64),
    use_batchnorm: bool = False,
    mean: float | Sequence[float] = DIGITS_MEAN,
    std: float | Sequence[float] = DIGITS_STD,
) -> SmallCNN:
    """Builder of :class:`SmallCNN` (JSON-friendly arguments, for saved models)."""
    if len(tuple(features)) != 2 or any(int(f) < 1 for f in features):
        raise ValueError(f"features must be two positive channel counts, got {features!r}")
    if isinstance(num_classes, bool) or int(num_classes) < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    std_arr = jnp.asarray(std)
    if not bool(jnp.all(std_arr > 0)):
        raise ValueError(f"std must be > 0, got {std!r}")
    return SmallCNN(
        num_classes=int(num_classes),
        features=tuple(int(f) for f in features),
        use_batchnorm=bool(use_batchnorm),
        mean=tuple(mean) if isinstance(mean, (list, tuple)) else float(mean),
        std=tuple(std) if isinstance(std, (list, tuple)) else float(std),
    )
