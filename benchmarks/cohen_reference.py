"""A PyTorch baseline: Cohen et al.'s ``Smooth.certify`` and their CIFAR ResNets.

Written for the benchmarks from the algorithm of Cohen, Rosenfeld and Kolter,
"Certified Adversarial Robustness via Randomized Smoothing" (ICML 2019), as
published in github.com/locuslab/smoothing (``code/core.py``,
``code/archs/cifar_resnet.py``, ``code/datasets.py``). It keeps their protocol
and their host-side loop, which is what the benchmark compares against:

* selection: class counts on ``n0`` noisy copies, ``cA = argmax``;
* estimation: counts on ``n`` fresh copies, in batches of ``batch_size``
  (``x.repeat`` then ``randn_like * sigma``, the last batch shorter), predictions
  moved to the host and counted there;
* the one-sided Clopper-Pearson lower bound at level ``alpha``
  (``proportion_confint(nA, n, alpha=2 alpha, method="beta")[0]``, which is
  ``Beta(alpha; nA, n - nA + 1)``'s quantile, here with ``scipy.stats.beta.ppf``);
* abstain when the bound is below 1/2, else ``radius = sigma * Phi^-1(pA)``.

Two changes, both neutral or in the baseline's favour: the device is the
input's (their code hard-codes ``cuda``), and ``count="bincount"`` replaces
their per-prediction Python counting loop by ``np.bincount`` (``count="loop"``
keeps theirs).

The models take NCHW images in [0, 1]; ``NormalizeLayer`` standardizes first,
as in their ``Sequential(NormalizeLayer, model)`` wrapping, so the state_dict
keys carry the prefix ``1.`` that :mod:`soapbubble.models.convert` expects.

Example:
  >>> import torch
  >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
  <torch._C.Generator object at ...>
  >>> model = cifar_model("cifar_resnet20").eval()
  >>> smooth = Smooth(model, num_classes=10, sigma=0.25)
  >>> prediction, radius = smooth.certify(torch.rand(3, 32, 32), n0=10, n=20, alpha=0.001, batch_size=20)
  >>> prediction in range(-1, 10), radius >= 0.0
  (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats
import torch
from torch import nn

__all__ = [
    "ABSTAIN",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "NormalizeLayer",
    "Smooth",
    "TorchCifarResNet",
    "TorchSmallCNN",
    "cifar_model",
    "clopper_pearson_lower",
    "randomize_batchnorm",
    "save_checkpoint",
    "small_cnn_from_flax",
]

ABSTAIN = -1
# Cohen et al., code/datasets.py.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def clopper_pearson_lower(count: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    Equals ``statsmodels.stats.proportion.proportion_confint(count, n, 2 * alpha,
    method="beta")[0]``: the ``alpha`` quantile of ``Beta(count, n - count + 1)``
    (0 when ``count = 0``).

    Example:
      >>> round(clopper_pearson_lower(100, 100, 0.001), 4)   # 0.001 ** (1 / 100)
      0.9333
    """
    if count == 0:
        return 0.0
    return float(scipy.stats.beta.ppf(alpha, count, n - count + 1))


class Smooth:
    """Cohen et al.'s smoothed classifier ``g`` around a PyTorch base classifier.

    Args:
      base_classifier: maps an NCHW batch to logits ``(batch, num_classes)``.
      num_classes: number of classes.
      sigma: Gaussian noise level.
      count: ``"loop"`` (their per-prediction Python loop) or ``"bincount"``.
    """

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, count: str = "loop"):
        if count not in ("loop", "bincount"):
            raise ValueError(f"count must be 'loop' or 'bincount', got {count!r}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.count = count

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        """(predicted class or ABSTAIN, certified l2 radius) for one CHW input ``x``."""
        self.base_classifier.eval()
        counts0 = self.sample_noise(x, n0, batch_size)
        top = int(counts0.argmax())
        counts = self.sample_noise(x, n, batch_size)
        p_lower = clopper_pearson_lower(int(counts[top]), n, alpha)
        if p_lower < 0.5:
            return ABSTAIN, 0.0
        return top, self.sigma * float(scipy.stats.norm.ppf(p_lower))

    def sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        """Class counts (int64 ``(num_classes,)``) of the base classifier on ``num`` noisy copies of ``x``."""
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=np.int64)
            remaining = num
            for _ in range(math.ceil(num / batch_size)):
                rows = min(batch_size, remaining)
                remaining -= rows
                batch = x.repeat((rows, 1, 1, 1))
                noisy = batch + torch.randn_like(batch) * self.sigma
                predictions = self.base_classifier(noisy).argmax(1).cpu().numpy()
                counts += self._count(predictions)
            return counts

    def _count(self, predictions: np.ndarray) -> np.ndarray:
        if self.count == "bincount":
            return np.bincount(predictions, minlength=self.num_classes)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for p in predictions:  # their _count_arr: one Python step per prediction
            counts[p] += 1
        return counts


class NormalizeLayer(nn.Module):
    """Per-channel ``(x - mean) / std`` on NCHW batches (no state_dict keys, as in their code)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # Non-persistent buffers: they follow .to(device) but stay out of the state_dict.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Block(nn.Module):
    """He et al.'s basic block: conv-BN-ReLU-conv-BN plus an identity or 1x1 conv-BN shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class TorchCifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with the layout and init of Cohen et al.'s ``cifar_resnet``."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        for stage, planes in enumerate((16, 32, 64)):
            layers = []
            for i in range(blocks):
                layers.append(_Block(inplanes, planes, 2 if (stage and i == 0) else 1))
                inplanes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # normal(0, sqrt(2 / (k * k * out_channels)))
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_model(arch: str, num_classes: int = 10) -> nn.Sequential:
    """``Sequential(NormalizeLayer, ResNet)`` for ``arch`` in cifar_resnet20/56/110 (random weights)."""
    depths = {"cifar_resnet20": 20, "cifar_resnet56": 56, "cifar_resnet110": 110}
    if arch not in depths:
        raise ValueError(f"arch must be one of {sorted(depths)}, got {arch!r}")
    return nn.Sequential(NormalizeLayer(CIFAR10_MEAN, CIFAR10_STD), TorchCifarResNet(depths[arch], num_classes))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Gives every BatchNorm random affine parameters and running statistics (in place; returns ``model``).

    A freshly initialised network has mean 0 / variance 1 statistics, which would
    leave a wrong mapping of ``running_mean``/``running_var`` undetected by a
    comparison of logits. The second BatchNorm of each block gets a scale near
    0.2, so ResNet-110's activations do not grow through its 54 residual additions.
    """
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                # A small scale on each residual branch's last BN keeps a deep net's logits O(1).
                scale = 0.2 if name.endswith("bn2") else 1.0
                m.weight.copy_(scale * (1.0 + 0.1 * torch.randn(c, generator=generator)))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(1.0 + 0.5 * torch.rand(c, generator=generator))
    return model


def save_checkpoint(model: nn.Module, arch: str, path: str) -> None:
    """Writes ``{"arch", "state_dict", "epoch"}`` as Cohen et al.'s ``train.py`` does."""
    torch.save({"epoch": 0, "arch": arch, "state_dict": model.state_dict()}, path)


class TorchSmallCNN(nn.Module):
    """soapbubble's ``small_cnn`` (conv-ReLU-avgpool twice, linear) in PyTorch, NCHW.

    Use :func:`small_cnn_from_flax` to copy a trained flax model's weights.
    """

    def __init__(self, in_channels: int, features: Sequence[int], num_classes: int, side: int,
                 mean, std, use_batchnorm: bool = False):
        super().__init__()
        f1, f2 = features
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(in_channels, f1, 3, padding=1, bias=not use_batchnorm)
        self.conv2 = nn.Conv2d(f1, f2, 3, padding=1, bias=not use_batchnorm)
        self.bn1 = nn.BatchNorm2d(f1) if use_batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(f2) if use_batchnorm else nn.Identity()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(f2 * (side // 4) ** 2, num_classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


def small_cnn_from_flax(variables: dict, config: dict, input_shape: Sequence[int]) -> TorchSmallCNN:
    """A :class:`TorchSmallCNN` computing the same function as a flax ``small_cnn``.

    Args:
      variables: the flax variables ``{"params": ..., ["batch_stats": ...]}``.
      config: the builder kwargs of the saved model (missing ones take the builder defaults).
      input_shape: ``(H, W, C)``.
    """
    from soapbubble.models import small

    h, w, c = input_shape
    if h != w or h % 4:
        raise ValueError(f"input_shape must be square with a side divisible by 4, got {tuple(input_shape)}")
    features = tuple(config.get("features", (32, 64)))
    use_bn = bool(config.get("use_batchnorm", False))
    num_classes = int(config.get("num_classes", 10))
    mean = np.broadcast_to(np.asarray(config.get("mean", small.DIGITS_MEAN), np.float32), (c,))
    std = np.broadcast_to(np.asarray(config.get("std", small.DIGITS_STD), np.float32), (c,))
    model = TorchSmallCNN(c, features, num_classes, h, mean.copy(), std.copy(), use_bn)
    p = variables["params"]
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
    with torch.no_grad():
        for i, conv in ((0, model.conv1), (1, model.conv2)):
            conv.weight.copy_(t(np.transpose(p[f"Conv_{i}"]["kernel"], (3, 2, 0, 1))))  # HWIO -> OIHW
            if not use_bn:
                conv.bias.copy_(t(p[f"Conv_{i}"]["bias"]))
        if use_bn:
            stats = variables["batch_stats"]
            for i, bn in ((0, model.bn1), (1, model.bn2)):
                bn.weight.copy_(t(p[f"BatchNorm_{i}"]["scale"]))
                bn.bias.copy_(t(p[f"BatchNorm_{i}"]["bias"]))
                bn.running_mean.copy_(t(stats[f"BatchNorm_{i}"]["mean"]))
                bn.running_var.copy_(t(stats[f"BatchNorm_{i}"]["var"]))
        # flax flattens (H, W, C), torch (C, H, W): permute the rows of the dense kernel.
        side, f2 = h // 4, features[1]
        kernel = np.asarray(p["Dense_0"]["kernel"]).reshape(side, side, f2, num_classes)
        model.fc.weight.copy_(t(np.transpose(kernel, (3, 2, 0, 1)).reshape(num_classes, -1)))
        model.fc.bias.copy_(t(p["Dense_0"]["bias"]))
    return model.eval()
