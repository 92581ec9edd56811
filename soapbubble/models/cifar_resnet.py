"""CIFAR-10 ResNets (He et al., depth 6n+2) as used by Cohen et al., in flax.

The layout follows Cohen et al.'s ``code/archs/cifar_resnet.py`` (itself from
bearpaw/pytorch-classification): a 3x3 stem convolution with 16 channels, no max
pool, three stages of ``n`` basic blocks with 16, 32 and 64 channels (the first
block of stages 2 and 3 has stride 2 and a 1x1 convolution + BatchNorm shortcut),
global average pooling (their ``AvgPool2d(8)`` on the 8x8 map) and a linear layer.

Cohen et al. wrap the network as ``Sequential(NormalizeLayer, model)``; here the
per-channel normalization is the first operation of the module, so the model takes
images in pixel space (NHWC, values in [0, 1]) and noise is added in pixel space.

Module and parameter names mirror the PyTorch state_dict, with ``.`` replaced by
``_`` in module names (``layer2.0.downsample.1`` -> ``layer2_0/downsample_1``), so
:mod:`soapbubble.models.convert` maps keys one to one.

Registered architectures: ``cifar_resnet20``, ``cifar_resnet56``, ``cifar_resnet110``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from soapbubble.models import registry
  >>> model = registry.build("cifar_resnet20")
  >>> x = jnp.zeros((2, 32, 32, 3))
  >>> variables = model.init(jax.random.key(0), x)
  >>> model.apply(variables, x).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from soapbubble.models.registry import register

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BasicBlock",
    "CifarResNet",
    "check_head",
    "check_images",
    "cifar_resnet20",
    "cifar_resnet56",
    "cifar_resnet110",
]

# Cohen et al., code/datasets.py (_CIFAR10_MEAN, _CIFAR10_STDDEV).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# PyTorch BatchNorm2d defaults: eps 1e-5, momentum 0.1 (flax's momentum is 1 - torch's).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (running statistics in eval mode)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )


def conv(features: int, kernel: int, stride: int, padding: int, name: str) -> nn.Conv:
    """Bias-free convolution with PyTorch's explicit symmetric padding.

    Explicit padding matters: flax's ``"SAME"`` pads a stride-2 3x3 convolution on an
    even-sized input as (0, 1), PyTorch's ``padding=1`` as (1, 1).
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        # He et al. / bearpaw init: normal(0, sqrt(2 / (k * k * out_channels))).
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


def check_images(x: jax.Array, name: str = "x") -> None:
    """Raises ValueError unless ``x`` is a float NHWC batch with 3 channels (static check)."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"{name} must be a batch of RGB images of shape (batch, height, width, 3) "
            f"with values in [0, 1], got shape {tuple(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype (pixels in [0, 1]), got {x.dtype}")


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Cohen et al.'s NormalizeLayer, channels last: ``(x - mean) / std``."""
    mean = jnp.asarray(mean, dtype=x.dtype)
    std = jnp.asarray(std, dtype=x.dtype)
    return (x - mean) / std


def conv_bn(
    parent: nn.Module,
    x: jax.Array,
    features: int,
    kernel: int,
    stride: int,
    padding: int,
    conv_name: str,
    bn_name: str,
    train: bool,
    fold: bool = True,
) -> jax.Array:
    """``batch_norm(bn_name)(conv(conv_name)(x))`` inside ``parent``'s compact ``__call__``.

    In eval mode with ``fold`` (and once the variables exist), BatchNorm's running
    statistics are folded into the convolution: with ``m = scale / sqrt(var + eps)``,
    ``BN(conv(x, k)) = conv(x, k * m) + (bias - mean * m)``. One convolution and a bias
    add replace a convolution and a separate normalization pass over its output: the
    same function up to float rounding (logits within about 1e-6 of the unfolded
    model); on a 2-core CPU the ResNet-20 forward pass is about 12% faster, ResNet-110's
    no slower (``docs/guides/cpu_performance.md``). The variables are the same
    (``conv_name/kernel``, ``bn_name/{scale, bias}``, ``batch_stats/bn_name/{mean,
    var}``) and are read as they are, so checkpoints and the converter are unaffected;
    the fold is computed inside the jitted forward (a few hundred thousand
    multiplications, nothing next to the convolutions). Train mode and ``init`` take
    the unfolded path (batch statistics, running-average updates).
    """
    if train or not fold or parent.is_initializing():
        return batch_norm(train, bn_name)(conv(features, kernel, stride, padding, conv_name)(x))
    k = parent.variables["params"][conv_name]["kernel"]
    bn = parent.variables["params"][bn_name]
    stats = parent.variables["batch_stats"][bn_name]
    # flax's BatchNorm: (y - mean) * (scale * rsqrt(var + eps)) + bias.
    m = bn["scale"] * jax.lax.rsqrt(stats["var"] + BN_EPSILON)
    dtype = jnp.result_type(x, k)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        (k * m).astype(dtype),
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + (bn["bias"] - stats["mean"] * m).astype(dtype)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut.

    Attributes:
      planes: output channels.
      stride: stride of the first convolution (and of the shortcut).
      downsample: whether the shortcut is a 1x1 convolution + BatchNorm
        (``downsample.0`` / ``downsample.1`` in the PyTorch state_dict).
      fold_batchnorm: in eval mode, fold BatchNorm into the convolutions (:func:`conv_bn`).
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    fold_batchnorm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        fold = self.fold_batchnorm
        out = nn.relu(conv_bn(self, x, self.planes, 3, self.stride, 1, "conv1", "bn1", train, fold))
        out = conv_bn(self, out, self.planes, 3, 1, 1, "conv2", "bn2", train, fold)
        residual = x
        if self.downsample:
            residual = conv_bn(
                self, x, self.planes, 1, self.stride, 0, "downsample_0", "downsample_1", train, fold
            )
        return nn.relu(out + residual)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet with basic blocks, depth ``6n + 2``.

    Attributes:
      depth: 20, 56, 110, ... (any ``6n + 2`` with ``n >= 1``).
      num_classes: number of logits.
      mean, std: per-channel normalization applied first (CIFAR-10 constants).
      fold_batchnorm: in eval mode, fold each BatchNorm into the convolution before it
        (:func:`conv_bn`; the default, faster on a CPU). ``False`` keeps the separate
        BatchNorm layers (the reference formulation); the variables are the same.

    Call: ``(x: float[B, H, W, 3] in [0, 1], train: bool = False) -> float[B, num_classes]``.
    ``H = W = 32`` for CIFAR; other sizes work (pooling is global).
    """

    depth: int = 20
    num_classes: int = 10
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    fold_batchnorm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n = blocks_per_stage(self.depth)
        check_images(x)
        x = normalize(x, self.mean, self.std)
        x = nn.relu(conv_bn(self, x, 16, 3, 1, 1, "conv1", "bn1", train, self.fold_batchnorm))
        inplanes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                x = BasicBlock(
                    planes,
                    stride,
                    downsample=(stride != 1 or inplanes != planes),
                    fold_batchnorm=self.fold_batchnorm,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
                inplanes = planes
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


def blocks_per_stage(depth: int) -> int:
    """``n`` of a depth ``6n + 2`` ResNet; ValueError for any other depth."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 56, 110, ...), got {depth!r}")
    return (depth - 2) // 6


def check_head(num_classes, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validates builder arguments; returns ``mean`` and ``std`` as tuples (hashable fields)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"mean and std must be 3 numbers each with std > 0, got mean={mean}, std={std}"
        )
    return mean, std


def _build(depth: int, num_classes: int, mean, std) -> CifarResNet:
    mean, std = check_head(num_classes, mean, std)
    blocks_per_stage(depth)
    return CifarResNet(depth=depth, num_classes=num_classes, mean=mean, std=std)


@register("cifar_resnet20")
def cifar_resnet20(num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> CifarResNet:
    """ResNet-20 for CIFAR-10 (0.27M parameters)."""
    return _build(20, num_classes, mean, std)


@register("cifar_resnet56")
def cifar_resnet56(num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> CifarResNet:
    """ResNet-56 for CIFAR-10 (0.86M parameters)."""
    return _build(56, num_classes, mean, std)


@register("cifar_resnet110")
def cifar_resnet110(num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> CifarResNet:
    """ResNet-110 for CIFAR-10 (1.7M parameters), Cohen et al.'s CIFAR-10 model."""
    return _build(110, num_classes, mean, std)
