"""Converter: PyTorch models written here (mirroring Cohen et al.'s code) vs the converted flax models.

The PyTorch side is an independent reference: Cohen et al.'s NormalizeLayer and
CIFAR ResNet (bearpaw/pytorch-classification) and torchvision's ResNet-50 layout,
written out below, wrapped as ``Sequential(NormalizeLayer, model)`` (ImageNet also in
DataParallel), with random weights and non-trivial BatchNorm statistics, saved in
the published checkpoint format.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

# torch is an optional extra; CI installs it, so there the tests always run.
if os.environ.get("CI"):
    import torch
else:
    torch = pytest.importorskip("torch", reason="the converter tests need PyTorch (pip install soapbubble[torch])")
nn = torch.nn

from soapbubble import models
from soapbubble.models import convert, registry

# Cohen et al., code/datasets.py, copied as literals.
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STDDEV = [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STDDEV = [0.229, 0.224, 0.225]

# float32 logits through up to 110 layers: the two routes differ only by summation order.
LOGIT_ATOL = 1e-4


# ----------------------------------------------------------------------- PyTorch reference


class NormalizeLayer(nn.Module):
    """Cohen et al.'s NormalizeLayer (means/sds are plain attributes: not in the state_dict)."""

    def __init__(self, means, sds):
        super().__init__()
        self.means = torch.tensor(means)
        self.sds = torch.tensor(sds)

    def forward(self, input):
        (batch_size, _, height, width) = input.shape
        means = self.means.repeat((batch_size, height, width, 1)).permute(0, 3, 1, 2)
        sds = self.sds.repeat((batch_size, height, width, 1)).permute(0, 3, 1, 2)
        return (input - means) / sds


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class CifarResNet(nn.Module):
    """bearpaw's CIFAR ResNet with BasicBlock, as in Cohen et al.'s archs/cifar_resnet.py."""

    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TorchvisionResNet50(nn.Module):
    """torchvision.models.resnet50's layout and parameter names."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def randomize_(model: nn.Module, seed: int, side: int) -> nn.Module:
    """Random weights and non-trivial BatchNorm affine parameters and running statistics.

    Uses its own generator (no global RNG). Running statistics are first calibrated
    on a random batch (as training would leave them; purely random ones make 110
    layers blow up to 1e8) and then perturbed per channel, so that mean/var
    matter and a swapped or mis-mapped statistic changes the logits.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.4 * torch.rand(c, generator=g) - 0.2)
        for m in model.modules():
            # Trained ResNets keep the last BatchNorm of each residual branch small; without
            # that, 54 blocks add up to logits of O(100), beyond float32's 1e-4 absolute.
            if isinstance(m, BasicBlock):
                m.bn2.weight.mul_(0.3)
            elif isinstance(m, Bottleneck):
                m.bn3.weight.mul_(0.3)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.copy_((2 * torch.rand(m.weight.shape, generator=g) - 1) * bound)
                m.bias.copy_((2 * torch.rand(m.bias.shape, generator=g) - 1) * bound)
        for m in bns:  # momentum 1: running statistics := this batch's statistics
            m.momentum = 1.0
        model.train()(torch.rand((4, 3, side, side), generator=g))
        for m in bns:
            c = m.num_features
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean.add_(0.3 * std * torch.randn(c, generator=g))
            m.running_var.mul_(torch.exp(0.4 * torch.randn(c, generator=g)))
            m.num_batches_tracked.fill_(12345)
    return model


def cohen_model(arch: str, seed: int = 0) -> nn.Module:
    """Cohen et al.'s get_architecture (CPU): Sequential(NormalizeLayer, model), eval mode."""
    with torch.random.fork_rng():  # module constructors draw from the global RNG; keep it untouched
        if arch == "resnet50":
            model = nn.DataParallel(TorchvisionResNet50())  # no GPU: DataParallel calls the module
            normalize = NormalizeLayer(IMAGENET_MEAN, IMAGENET_STDDEV)
        else:
            model = CifarResNet(depth={"cifar_resnet20": 20, "cifar_resnet110": 110}[arch])
            normalize = NormalizeLayer(CIFAR10_MEAN, CIFAR10_STDDEV)
    side = 224 if arch == "resnet50" else 32
    return randomize_(nn.Sequential(normalize, model), seed, side).eval()


def save_published(path, arch: str, model: nn.Module) -> str:
    """The published format: Cohen et al.'s train.py checkpoint dict."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.save(
        {
            "epoch": 90,
            "arch": arch,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        path,
    )
    return os.fspath(path)


def random_images(seed: int, batch: int, side: int) -> np.ndarray:
    """NHWC float32 images in [0, 1]."""
    return np.random.default_rng(seed).uniform(size=(batch, side, side, 3)).astype(np.float32)


def torch_logits(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "arch, batch, side",
    [("cifar_resnet20", 8, 32), ("cifar_resnet110", 4, 32), ("resnet50", 2, 224)],
)
def test_converted_logits_match_pytorch(tmp_path, arch, batch, side):
    """End to end: published checkpoint -> main(CHECKPOINT OUT) -> models.load -> logits."""
    model = cohen_model(arch, seed=1)
    keys = list(model.state_dict())
    assert keys[0] == ("1.module.conv1.weight" if arch == "resnet50" else "1.conv1.weight")
    path = save_published(tmp_path / "checkpoint.pth.tar", arch, model)
    out = tmp_path / "converted"
    assert convert.main([path, os.fspath(out)]) == 0

    with open(out / "soapbubble_model.json") as f:
        meta = json.load(f)
    assert meta["arch"] == arch
    assert meta["dataset"] == ("imagenet2012" if arch == "resnet50" else "cifar10")
    assert meta["config"] == {"num_classes": 1000 if arch == "resnet50" else 10}
    assert meta["extra"]["epoch"] == 90 and meta["extra"]["torch_arch"] == arch

    x = random_images(2, batch, side)
    expected = torch_logits(model, x)
    got = np.asarray(models.load(out)(x))
    assert got.shape == expected.shape
    # logits that vary with the input, at a trained network's scale: the check has teeth
    assert np.abs(expected - expected.mean(axis=0)).max() > 100 * LOGIT_ATOL
    assert np.abs(expected).max() < 50
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL)


def test_train_mode_batch_statistics_match_pytorch():
    """Train mode: batch-statistics normalization (eps) and running-mean update (momentum)."""
    model = cohen_model("cifar_resnet20", seed=3)
    converted = convert.convert_state_dict("cifar_resnet20", model.state_dict())
    x = random_images(4, 8, 32)

    model.train()
    expected = torch_logits(model, x)  # also updates the running statistics in place
    updated = convert.convert_state_dict("cifar_resnet20", model.state_dict()).variables

    module = registry.build("cifar_resnet20")
    got, new_state = module.apply(converted.variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=LOGIT_ATOL)
    # Means only: PyTorch updates running_var with the unbiased batch variance, flax
    # with the biased one (a factor n / (n - 1) on the update; eval mode is unaffected).
    got_stats = traverse_util.flatten_dict(new_state["batch_stats"])
    ref_stats = traverse_util.flatten_dict(updated["batch_stats"])
    mean_paths = [p for p in ref_stats if p[-1] == "mean"]
    assert len(mean_paths) == 1 + 2 * 9 + 2  # stem, 9 blocks, 2 shortcut BatchNorms
    for path in mean_paths:
        np.testing.assert_allclose(np.asarray(got_stats[path]), ref_stats[path], rtol=0, atol=1e-5)


def test_data_parallel_prefix_accepted_for_cifar():
    model = cohen_model("cifar_resnet20", seed=5)
    plain = model.state_dict()
    wrapped = {"1.module." + k[len("1.") :]: v for k, v in plain.items()}
    a = convert.convert_state_dict("cifar_resnet20", plain).variables
    b = convert.convert_state_dict("cifar_resnet20", wrapped).variables
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_output_does_not_alias_input(resnet20_state):
    state = {k: v.copy() for k, v in resnet20_state.items()}
    variables = convert.convert_state_dict("cifar_resnet20", state).variables
    state["1.bn1.running_mean"] += 1.0
    np.testing.assert_array_equal(
        variables["batch_stats"]["bn1"]["mean"], resnet20_state["1.bn1.running_mean"]
    )


def test_existing_output_needs_overwrite(tmp_path):
    model = cohen_model("cifar_resnet20", seed=8)
    path = save_published(tmp_path / "ckpt.pth", "cifar_resnet20", model)
    out = tmp_path / "out"
    convert.convert_checkpoint(path, out)
    with pytest.raises(FileExistsError):
        convert.convert_checkpoint(path, out)
    assert convert.convert_checkpoint(path, out, overwrite=True) == os.fspath(out)


def test_layouts_of_single_tensors():
    """Spot checks of the layout maps on named tensors; every tensor is used once."""
    model = cohen_model("cifar_resnet20", seed=6)
    sd = model.state_dict()
    v = convert.convert_state_dict("cifar_resnet20", sd).variables
    n_tensors = sum(1 for k in sd if not k.endswith("num_batches_tracked"))
    # 19 + 2 shortcut convolutions, as many BatchNorms (4 tensors each), fc weight and bias
    assert len(jax.tree.leaves(v)) == n_tensors == 21 + 4 * 21 + 2
    w = sd["1.layer2.0.downsample.0.weight"].numpy()  # (32, 16, 1, 1), OIHW
    np.testing.assert_array_equal(
        v["params"]["layer2_0"]["downsample_0"]["kernel"][0, 0], w[:, :, 0, 0].T
    )
    w = sd["1.conv1.weight"].numpy()  # (16, 3, 3, 3)
    assert v["params"]["conv1"]["kernel"][2, 1, 0, 5] == w[5, 0, 2, 1]
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["1.fc.weight"].numpy().T)
    np.testing.assert_array_equal(
        v["params"]["layer3_2"]["bn2"]["scale"], sd["1.layer3.2.bn2.weight"]
    )
    np.testing.assert_array_equal(
        v["batch_stats"]["layer3_2"]["bn2"]["var"], sd["1.layer3.2.bn2.running_var"]
    )


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def resnet20_state():
    return {k: v.numpy() for k, v in cohen_model("cifar_resnet20", seed=7).state_dict().items()}


def test_unknown_arch_named(tmp_path, resnet20_state):
    path = tmp_path / "ckpt.pth"
    torch.save(
        {
            "arch": "vgg16",
            "state_dict": {k: torch.from_numpy(v) for k, v in resnet20_state.items()},
        },
        path,
    )
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        convert.convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_key_named(resnet20_state):
    state = dict(resnet20_state)
    del state["1.layer2.0.downsample.1.running_var"]
    with pytest.raises(ValueError, match=r"lacks key '1\.layer2\.0\.downsample\.1\.running_var'"):
        convert.convert_state_dict("cifar_resnet20", state)


def test_extra_key_named(resnet20_state):
    state = dict(
        resnet20_state, **{"1.layer4.0.conv1.weight": np.zeros((64, 64, 3, 3), np.float32)}
    )
    with pytest.raises(ValueError, match=r"unexpected key '1\.layer4\.0\.conv1\.weight'"):
        convert.convert_state_dict("cifar_resnet20", state)


def test_stray_num_batches_tracked_is_an_extra_key(resnet20_state):
    state = dict(resnet20_state, **{"1.layer1.0.conv1.num_batches_tracked": np.array(3)})
    with pytest.raises(
        ValueError, match=r"unexpected key '1\.layer1\.0\.conv1\.num_batches_tracked'"
    ):
        convert.convert_state_dict("cifar_resnet20", state)


def test_shape_mismatch_named(resnet20_state):
    state = dict(
        resnet20_state, **{"1.layer1.1.conv2.weight": np.zeros((16, 16, 5, 5), np.float32)}
    )
    with pytest.raises(
        ValueError,
        match=r"'1\.layer1\.1\.conv2\.weight' has shape \(16, 16, 5, 5\), expected \(16, 16, 3, 3\)",
    ):
        convert.convert_state_dict("cifar_resnet20", state)


def test_missing_prefix_named(resnet20_state):
    state = {k[len("1.") :]: v for k, v in resnet20_state.items()}
    with pytest.raises(ValueError, match=r"key 'conv1\.weight' lacks the prefix '1\.'"):
        convert.convert_state_dict("cifar_resnet20", state)


def test_non_finite_tensor_named(resnet20_state):
    bad = resnet20_state["1.bn1.running_var"].copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"'1\.bn1\.running_var' has non-finite"):
        convert.convert_state_dict(
            "cifar_resnet20", dict(resnet20_state, **{"1.bn1.running_var": bad})
        )


def test_missing_fields_named(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="lacks the field 'arch'"):
        convert.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert.load_checkpoint(tmp_path / "nope.pth")


class _Payload:
    """Unpickling this runs exec(): the classic malicious-checkpoint payload."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


class _CustomClass:
    """A pickled object of a custom class: loading it would import and run project code."""

    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("payload", ["exec", "custom_class"])
def test_code_executing_checkpoint_refused(tmp_path, payload):
    marker = tmp_path / "executed.txt"
    obj = _Payload(marker) if payload == "exec" else _CustomClass()
    path = tmp_path / "evil.pth"
    torch.save({"arch": "cifar_resnet20", "state_dict": {}, "evil": obj}, path)
    # sanity: the file really is an unsafe pickle (plain pickle.load-based loading runs it)
    if payload == "exec":
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ValueError, match="not plain tensor data.*will not"):
        convert.convert_checkpoint(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
