"""ImageNet ResNet-50 in torchvision's layout (ResNet v1.5), in flax.

Cohen et al. and Salman et al. use torchvision's ``resnet50`` wrapped as
``Sequential(NormalizeLayer, DataParallel(resnet50))``. The layout here is the same:
7x7 stride-2 stem, 3x3 stride-2 max pool, stages of 3, 4, 6, 3 bottleneck blocks
(1x1, 3x3, 1x1 convolutions; the stride sits on the 3x3 convolution, "v1.5"; the
first block of each stage has a 1x1 conv + BatchNorm shortcut), global average
pooling and a linear layer. The ImageNet per-channel normalization is the first
operation of the module, so the model takes images in pixel space (NHWC, [0, 1]).

Module names mirror the PyTorch state_dict with ``.`` -> ``_``
(``layer1.0.downsample.0`` -> ``layer1_0/downsample_0``).

Registered architecture: ``resnet50``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from soapbubble.models import registry
  >>> model = registry.build("resnet50", num_classes=5)
  >>> x = jnp.zeros((1, 64, 64, 3))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
  >>> variables["params"]["fc"]["kernel"].shape
  (2048, 5)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from soapbubble.models.cifar_resnet import (
    check_head,
    check_images,
    conv_bn,
    normalize,
)
from soapbubble.models.registry import register

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Bottleneck", "ImageNetResNet", "resnet50"]

# Cohen et al., code/datasets.py (_IMAGENET_MEAN, _IMAGENET_STDDEV).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (4x channels), plus shortcut.

    Attributes:
      planes: width of the 1x1 and 3x3 convolutions; the block outputs ``4 * planes``.
      stride: stride of the 3x3 convolution and of the shortcut.
      downsample: whether the shortcut is a 1x1 convolution + BatchNorm.
      fold_batchnorm: in eval mode, fold BatchNorm into the convolutions
        (:func:`soapbubble.models.cifar_resnet.conv_bn`).
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    fold_batchnorm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        p, fold = self.planes, self.fold_batchnorm
        out = nn.relu(conv_bn(self, x, p, 1, 1, 0, "conv1", "bn1", train, fold))
        out = nn.relu(conv_bn(self, out, p, 3, self.stride, 1, "conv2", "bn2", train, fold))
        out = conv_bn(self, out, 4 * p, 1, 1, 0, "conv3", "bn3", train, fold)
        residual = x
        if self.downsample:
            residual = conv_bn(
                self, x, 4 * p, 1, self.stride, 0, "downsample_0", "downsample_1", train, fold
            )
        return nn.relu(out + residual)


class ImageNetResNet(nn.Module):
    """Bottleneck ResNet in torchvision's layout.

    Attributes:
      stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50.
      num_classes: number of logits.
      mean, std: per-channel normalization applied first (ImageNet constants).
      fold_batchnorm: in eval mode, fold each BatchNorm into the convolution before it
        (the default; ``False`` keeps separate BatchNorm layers, same variables).

    Call: ``(x: float[B, H, W, 3] in [0, 1], train: bool = False) -> float[B, num_classes]``
    (224 x 224 for ImageNet; pooling is global, so other sizes work).
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    fold_batchnorm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x)
        x = normalize(x, self.mean, self.std)
        x = nn.relu(conv_bn(self, x, 64, 7, 2, 3, "conv1", "bn1", train, self.fold_batchnorm))
        # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf, as flax's max_pool does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.stage_sizes)):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                x = Bottleneck(
                    planes,
                    stride,
                    downsample=(stride != 1 or inplanes != 4 * planes),
                    fold_batchnorm=self.fold_batchnorm,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
                inplanes = 4 * planes
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


@register("resnet50")
def resnet50(num_classes: int = 1000, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ImageNetResNet:
    """torchvision's ResNet-50 (25.6M parameters with 1000 classes), Cohen et al.'s ImageNet model."""
    mean, std = check_head(num_classes, mean, std)
    return ImageNetResNet(num_classes=num_classes, mean=mean, std=std)
