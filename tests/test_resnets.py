"""The flax ResNets on their own: sizes, layout, BatchNorm conventions, bad input, and the
eval-mode formulation (BatchNorm folded into the convolutions) against the reference one.

Equivalence with the PyTorch models is in test_convert.py (and, for the folded
formulation, once more here when torch is installed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from soapbubble.models import registry

# Cohen et al., code/datasets.py, as literals.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STDDEV = np.array([0.2023, 0.1994, 0.2010], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STDDEV = np.array([0.229, 0.224, 0.225], np.float32)


def abstract_variables(model, side):
    return jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)
    )


def random_variables(model, side, seed):
    """Random variables of the right structure, drawn in numpy (faster than model.init)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":  # He-normal on fan-in
            return rng.normal(size=shape).astype(np.float32) * np.sqrt(2 / np.prod(shape[:-1]))
        low, high = {
            "scale": (0.5, 1.5),
            "bias": (-0.1, 0.1),
            "mean": (-0.2, 0.2),
            "var": (0.5, 2.0),
        }[name]
        return rng.uniform(low, high, size=shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, side))


def n_elements(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def cifar_param_count(depth: int, num_classes: int = 10) -> int:
    """Closed form for bearpaw's CIFAR ResNet with 1x1-conv shortcuts (Cohen et al.'s)."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    cin = 16
    for c in (16, 32, 64):
        for i in range(n):
            total += 9 * cin * c + 9 * c * c + 2 * 2 * c  # two 3x3 convs, two BNs
            if cin != c:
                total += cin * c + 2 * c  # 1x1 shortcut conv + BN
            cin = c
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth, published", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_sizes(depth, published):
    model = registry.build(f"cifar_resnet{depth}")
    v = abstract_variables(model, 32)
    assert n_elements(v["params"]) == cifar_param_count(depth)
    # He et al. (2016), Table 6: 0.27M, 0.85M, 1.7M parameters
    assert abs(n_elements(v["params"]) - published) / published < 0.02
    # running mean and var of every BatchNorm: 2n + 1 per stage widths, two shortcut BNs
    n = (depth - 2) // 6
    assert n_elements(v["batch_stats"]) == 2 * (16 + 2 * n * (16 + 32 + 64) + 32 + 64)
    out = jax.eval_shape(model.apply, v, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_resnet50_size():
    model = registry.build("resnet50")
    v = abstract_variables(model, 224)
    assert n_elements(v["params"]) == 25_557_032  # torchvision's resnet50
    assert v["params"]["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 256)
    # v1.5: the stride sits on the 3x3 convolution, so conv1 of a strided block is 1x1
    assert v["params"]["layer2_0"]["conv1"]["kernel"].shape == (1, 1, 256, 128)
    assert set(v["params"]) == {"conv1", "bn1", "fc"} | {
        f"layer{s + 1}_{i}" for s, b in enumerate((3, 4, 6, 3)) for i in range(b)
    }
    out = jax.eval_shape(model.apply, v, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.shape == (2, 1000)


def test_stride_two_spatial_sizes():
    """3x3 stride-2 convolutions with padding 1 (PyTorch), not flax's 'SAME' (0, 1).

    The unfolded formulation, whose convolutions are submodules with captured outputs
    (the folded one computes the same convolutions with the BatchNorm inside).
    """
    model = registry.build("cifar_resnet20").clone(fold_batchnorm=False)
    x = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
    variables = random_variables(model, 32, seed=0)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = traverse_util.flatten_dict(state["intermediates"])
    assert inter[("layer2_0", "conv1", "__call__")][0].shape == (1, 16, 16, 32)
    assert inter[("layer3_0", "conv1", "__call__")][0].shape == (1, 8, 8, 64)
    # Pixel (0, 0) of a stride-2 conv with padding (1, 1) sees input rows/cols -1..1.
    block_in = inter[("layer1_2", "__call__")][0]
    kernel = variables["params"]["layer2_0"]["conv1"]["kernel"]
    ref = jnp.einsum("hwc,hwco->o", block_in[0, :2, :2], kernel[1:, 1:])
    np.testing.assert_allclose(
        inter[("layer2_0", "conv1", "__call__")][0][0, 0, 0], ref, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("arch, side", [("cifar_resnet20", 32), ("resnet50", 32)])
def test_train_mode_batchnorm_momentum_and_normalization(arch, side):
    """Stem BatchNorm after one train step: 0.9 * init + 0.1 * batch statistic (PyTorch's 0.1).

    The batch statistic is computed here from the literal Cohen et al. constants and the
    stem kernel, so it also checks that normalization happens inside the model.
    """
    model = registry.build(arch)
    x = jax.random.uniform(jax.random.key(2), (4, side, side, 3))
    variables = random_variables(model, side, seed=1)
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert np.all(np.isfinite(logits))

    mean, std = (
        (CIFAR10_MEAN, CIFAR10_STDDEV)
        if arch.startswith("cifar")
        else (IMAGENET_MEAN, IMAGENET_STDDEV)
    )
    kernel = variables["params"]["conv1"]["kernel"]
    k, stride = kernel.shape[0], 1 if arch.startswith("cifar") else 2
    stem = jax.lax.conv_general_dilated(
        (x - mean) / std,
        kernel,
        (stride, stride),
        [(k // 2, k // 2)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )
    batch_mean = stem.mean(axis=(0, 1, 2))
    batch_var = stem.var(axis=(0, 1, 2))  # flax uses the biased variance
    old = variables["batch_stats"]["bn1"]
    new = state["batch_stats"]["bn1"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * batch_mean, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * batch_var, rtol=1e-4, atol=1e-5)


def test_eval_mode_uses_running_statistics():
    """Eval mode: the output of an image does not depend on the rest of the batch."""
    model = registry.build("cifar_resnet20")
    x = jax.random.uniform(jax.random.key(3), (3, 32, 32, 3))
    variables = random_variables(model, 32, seed=2)
    full = model.apply(variables, x)
    single = model.apply(variables, x[:1])
    np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, config, match",
    [
        ("cifar_resnet20", {"num_classes": 0}, "num_classes must be a positive integer, got 0"),
        ("resnet50", {"num_classes": 2.5}, "num_classes must be a positive integer, got 2.5"),
        ("cifar_resnet56", {"std": (0.2, 0.0, 0.2)}, "std > 0"),
        ("resnet50", {"mean": (0.5, 0.5)}, "mean and std must be 3 numbers"),
        ("vgg16", {}, "unknown architecture 'vgg16'"),
    ],
)
def test_bad_config(name, config, match):
    with pytest.raises(ValueError, match=match):
        registry.build(name, **config)


def test_bad_depth():
    from soapbubble.models.cifar_resnet import CifarResNet

    with pytest.raises(ValueError, match=r"depth must be 6n \+ 2.*got 21"):
        CifarResNet(depth=21).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((2, 32, 32, 1), jnp.float32, r"shape \(2, 32, 32, 1\)"),
        ((32, 32, 3), jnp.float32, r"shape \(32, 32, 3\)"),
        ((2, 3, 32, 32), jnp.float32, r"shape \(2, 3, 32, 32\)"),  # NCHW by mistake
        ((2, 32, 32, 3), jnp.uint8, "floating dtype"),
    ],
)
def test_bad_images(shape, dtype, match):
    model = registry.build("cifar_resnet20")
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


# ----------------------------------------------------------------------------- folded BatchNorm

FOLD_ATOL = 1e-4  # float32 paths must give the reference's logits to 1e-4 (issue 16)


def trained_scale_variables(model, side, seed):
    """:func:`random_variables` with each residual branch's last BatchNorm scale small.

    Trained ResNets keep it small; without that the activations of random weights
    grow with depth (ResNet-110's logits reach ~1e9 and any absolute tolerance is
    meaningless). Here the logits stay O(1) at every depth.
    """
    rng = np.random.default_rng(seed + 1000)
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, random_variables(model, side, seed)))
    blocks = {path[1] for path in flat if path[0] == "params" and path[1].startswith("layer")}
    for block in blocks:
        last = "bn3" if ("params", block, "bn3", "scale") in flat else "bn2"
        path = ("params", block, last, "scale")
        flat[path] = rng.uniform(0.05, 0.2, flat[path].shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize(
    "arch, side, batch", [("cifar_resnet20", 32, 8), ("cifar_resnet110", 32, 4), ("resnet50", 64, 2)]
)
def test_folded_batchnorm_matches_reference(arch, side, batch):
    """Eval mode folds BatchNorm into the convolutions by default; logits equal the unfolded
    (reference) formulation's to 1e-4, on random weights and statistics."""
    model = registry.build(arch)
    assert model.fold_batchnorm
    variables = trained_scale_variables(model, side, seed=4)
    x = jax.random.uniform(jax.random.key(5), (batch, side, side, 3))
    folded = np.asarray(jax.jit(model.apply)(variables, x))
    reference = np.asarray(jax.jit(model.clone(fold_batchnorm=False).apply)(variables, x))
    assert np.all(np.isfinite(reference)) and np.abs(reference).max() < 100
    # logits that differ between images by far more than the tolerance: the check has teeth
    assert np.abs(reference - reference.mean(axis=0)).max() > 100 * FOLD_ATOL
    np.testing.assert_allclose(folded, reference, rtol=0, atol=FOLD_ATOL)


def test_fold_changes_neither_variables_nor_train_mode():
    """Same variables (init, names, shapes) and the same train-mode step either way."""
    folded = registry.build("cifar_resnet20")
    plain = folded.clone(fold_batchnorm=False)
    x = jax.random.uniform(jax.random.key(6), (4, 32, 32, 3))
    init_f, init_p = folded.init(jax.random.key(0), x), plain.init(jax.random.key(0), x)
    assert jax.tree.structure(init_f) == jax.tree.structure(init_p)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), init_f, init_p)))
    variables = trained_scale_variables(folded, 32, seed=7)
    out_f, state_f = folded.apply(variables, x, train=True, mutable=["batch_stats"])
    out_p, state_p = plain.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out_f, out_p)
    jax.tree.map(np.testing.assert_array_equal, state_f, state_p)


@pytest.mark.parametrize("arch", ["cifar_resnet20", "cifar_resnet110"])
def test_converted_weights_match_pytorch_folded_and_not(arch):
    """The converter's variables give PyTorch's logits (1e-4) in both formulations."""
    pytest.importorskip("torch", reason="needs PyTorch (pip install soapbubble[torch])")
    import test_convert as tc  # its independent PyTorch ResNets (Cohen et al.'s layout)

    from soapbubble.models import convert

    torch_model = tc.cohen_model(arch, seed=11)
    variables = convert.convert_state_dict(arch, torch_model.state_dict()).variables
    x = tc.random_images(12, 4, 32)
    expected = tc.torch_logits(torch_model, x)
    assert np.abs(expected - expected.mean(axis=0)).max() > 100 * FOLD_ATOL
    model = registry.build(arch)
    for module in (model, model.clone(fold_batchnorm=False)):
        got = np.asarray(jax.jit(module.apply)(variables, x))
        np.testing.assert_allclose(got, expected, rtol=0, atol=FOLD_ATOL)
