"""soapbubble.data: the embedded digits and the tfds pipelines (mock data, no download)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soapbubble import data

# ----------------------------------------------------------------------------- digits


def test_shipped_digits_equal_sklearn_and_split_is_documented_one():
    from sklearn.datasets import load_digits  # the test extra

    ref = load_digits()
    perm = np.random.default_rng(data.DIGITS_SEED).permutation(len(ref.target))
    n_test = int(np.ceil(0.2 * len(ref.target)))
    assert n_test == data.DIGITS_TEST_SIZE
    for split, idx in (("train", perm[:-n_test]), ("test", perm[-n_test:])):
        ds = data.load_digits(split)
        assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
        assert ds.images.shape == (len(idx), 8, 8, 1) and ds.labels.shape == (len(idx),)
        np.testing.assert_array_equal(ds.images[..., 0], (ref.images[idx] / 16.0).astype(np.float32))
        np.testing.assert_array_equal(ds.labels, ref.target[idx])
        assert ds.name == "digits" and ds.num_classes == 10 and ds.image_shape == (8, 8, 1)


def test_digits_split_is_a_partition_and_file_is_small():
    train, test = data.load_digits("train"), data.load_digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    # No image of the test split appears in the train split (digits has no exact duplicates
    # across the fixed split; checking pixels + label is an independent partition check).
    rows = {(im.tobytes(), int(y)) for im, y in zip(train.images, train.labels)}
    assert not any((im.tobytes(), int(y)) in rows for im, y in zip(test.images, test.labels))
    size = os.path.getsize(os.path.join(os.path.dirname(data.__file__), "data_digits.npz"))
    assert size < 100_000


def test_load_digits_and_max_examples_and_batches():
    ds = data.load("digits", "test", max_examples=50)
    full = data.load_digits("test")
    np.testing.assert_array_equal(ds.images, full.images[:50])
    batches = list(ds.batches(16))
    assert [len(b.indices) for b in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), np.arange(50))
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), ds.images)
    later = list(ds.batches(16, start=40))
    np.testing.assert_array_equal(later[0].indices, np.arange(40, 50))
    image, label = ds[3]
    np.testing.assert_array_equal(image, full.images[3])
    assert label == int(full.labels[3])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: data.load("mnist", "test"), "name='mnist'.*cifar10, digits, imagenet2012"),
        (lambda: data.load("digits", "validation"), "split='validation'.*train, test"),
        (lambda: data.load("imagenet2012", "test"), "split='test'.*train, validation"),
        (lambda: data.load("digits", "test", max_examples=0), "max_examples"),
        (lambda: data.load_digits("valid"), "split='valid'"),
        (lambda: list(data.load_digits("test").batches(0)), "batch_size"),
        (lambda: list(data.load_digits("test").batches(8, start=999)), "start"),
        (lambda: data.image_shape("svhn"), "name='svhn'"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_missing_tfds_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install soapbubble\[data\]"):
        data.load("cifar10", "test")


# ----------------------------------------------------------------------------- tfds

# The `data` extra (tensorflow-datasets) is required here: CI installs it, and a missing
# install fails these tests instead of skipping them.
import tensorflow_datasets as tfds


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10.*not prepared"):
        data.load("cifar10", "test", data_dir=str(tmp_path))


def test_cifar10_pipeline_on_mock_data():
    with tfds.testing.mock_data(num_examples=13):
        ds = data.load("cifar10", "test")
        raw = tfds.data_source("cifar10", split="test")
        assert len(ds) == 13 and ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
        batches = list(ds.batches(5))
        images = np.concatenate([b.images for b in batches])
        labels = np.concatenate([b.labels for b in batches])
        assert images.dtype == np.float32 and images.shape == (13, 32, 32, 3)
        assert labels.dtype == np.int32
        for i in range(13):  # the split's own order, pixels / 255, no normalization
            np.testing.assert_array_equal(images[i], raw[i]["image"].astype(np.float32) / 255)
            assert labels[i] == raw[i]["label"]
        again = data.load("cifar10", "test", max_examples=4)
        assert len(again) == 4
        np.testing.assert_array_equal(np.concatenate([b.images for b in again.batches(3)]), images[:4])
        assert 0.0 <= images.min() and images.max() <= 1.0
        with pytest.raises(IndexError):
            again[4]


def _reference_resize_crop(img: np.ndarray) -> np.ndarray:
    """Resize(256) + CenterCrop(224) through jax.image.resize (antialiased bilinear)."""
    h, w, c = img.shape
    nh, nw = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    out = np.asarray(jax.image.resize(jnp.asarray(img, jnp.float32), (nh, nw, c), "linear", antialias=True))
    top, left = round((nh - 224) / 2), round((nw - 224) / 2)
    return out[top : top + 224, left : left + 224]


def test_imagenet_pipeline_on_mock_data_matches_resize_256_crop_224():
    with tfds.testing.mock_data(num_examples=4):
        ds = data.load("imagenet2012", "validation")
        raw = tfds.data_source("imagenet2012", split="validation")
        assert ds.num_classes == 1000 and ds.image_shape == (224, 224, 3)
        for i, batch in enumerate(ds.batches(1)):
            src = raw[i]["image"]
            assert batch.images.shape == (1, 224, 224, 3) and batch.images.dtype == np.float32
            # PIL rounds to uint8 (like torchvision on PIL images): within one grey level.
            err = np.abs(batch.images[0] * 255 - _reference_resize_crop(src)).max()
            assert err <= 1.0, (i, src.shape, err)
            assert batch.labels[0] == raw[i]["label"]


@pytest.mark.parametrize("shape", [(600, 400, 3), (300, 500, 3), (256, 900, 1)])
def test_resize_center_crop_downscales_like_the_reference(shape):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.uint8)
    out = data.resize_center_crop(img)
    assert out.shape == (224, 224, shape[-1]) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float32) - _reference_resize_crop(img)).max() <= 1.0


def test_resize_center_crop_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        data.resize_center_crop(np.zeros((10, 10, 3), np.float32))
