"""Datasets: the embedded digits set and tensorflow-datasets pipelines.

Every dataset serves images in pixel space: float32, NHWC, values in ``[0, 1]``,
no normalization (models normalize inside, so smoothing noise is added to pixels),
in a fixed, deterministic order (never shuffled here).

* ``"digits"`` (embedded, offline): scikit-learn's handwritten digits (UCI optdigits
  test set: 1797 grey images of 8x8 pixels with values 0..16, 10 classes), shipped
  in the package as ``data_digits.npz`` (48 kB) so that a fresh machine needs
  neither scikit-learn nor a download. Pixels are divided by 16. The split is fixed:
  ``permutation = np.random.default_rng(20260806).permutation(1797)`` (stored in
  the file, so it cannot drift with numpy versions); ``test`` is its last 360
  indices (20 %), ``train`` the first 1437, each in permutation order.
  :func:`load_digits` returns an in-memory :class:`Dataset`.
* ``"cifar10"`` (splits ``train``, ``test``) and ``"imagenet2012"`` (splits
  ``train``, ``validation``) through ``tfds.data_source`` (random access over
  ArrayRecord files; needs no TensorFlow). The data must already be prepared in
  ``data_dir`` (nothing is downloaded). ImageNet images are resized so that the
  shorter side is 256 (bilinear, PIL, the longer side truncated as torchvision does)
  and center-cropped to 224x224, as Cohen et al.'s ``Resize(256), CenterCrop(224),
  ToTensor()``. :func:`load` returns a lazy :class:`ImageSource`.

Both kinds share one reading protocol: ``name``, ``num_classes``, ``image_shape``,
``len(ds)``, ``ds[i] -> (image, label)`` and ``ds.batches(batch_size, start=0) ->
iterator of Batch(indices, images, labels)``.

Example:
  >>> ds = load_digits("test")
  >>> ds.images.shape, ds.labels.shape, ds.num_classes
  ((360, 8, 8, 1), (360,), 10)
  >>> b = next(ds.batches(32))
  >>> b.images.shape, int(b.indices[0])
  ((32, 8, 8, 1), 0)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DIGITS_SEED",
    "DIGITS_TEST_SIZE",
    "KNOWN",
    "Batch",
    "Dataset",
    "ImageSource",
    "image_shape",
    "load",
    "load_digits",
    "materialize",
    "resize_center_crop",
]

#: Seed of the digits permutation (documentation: the permutation itself is stored).
DIGITS_SEED = 20260806
#: Number of digits test examples (the last 20 % of the permutation, rounded up).
DIGITS_TEST_SIZE = 360

# name -> (splits, image shape (H, W, C), number of classes)
KNOWN: dict[str, tuple[tuple[str, ...], tuple[int, int, int], int]] = {
    "digits": (("train", "test"), (8, 8, 1), 10),
    "cifar10": (("train", "test"), (32, 32, 3), 10),
    "imagenet2012": (("train", "validation"), (224, 224, 3), 1000),
}

# Cohen et al.'s ImageNet preprocessing: Resize(256) then CenterCrop(224).
_RESIZE, _CROP = 256, 224


class Batch(NamedTuple):
    """A batch in dataset order.

    Attributes:
      indices: int64 (B,) positions in the dataset.
      images: float32 (B, H, W, C) in [0, 1].
      labels: int32 (B,).
    """

    indices: np.ndarray
    images: np.ndarray
    labels: np.ndarray


def _check_name_split(name: Any, split: Any) -> None:
    if name not in KNOWN:
        raise ValueError(f"unknown dataset name={name!r}; known: {', '.join(sorted(KNOWN))}")
    splits = KNOWN[name][0]
    if split not in splits:
        raise ValueError(f"unknown split={split!r} for dataset {name!r}; known: {', '.join(splits)}")


def _check_batch_args(batch_size: Any, start: Any, n: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= n:
        raise ValueError(f"start must be an integer in [0, {n}], got {start!r}")


def image_shape(name: str) -> tuple[int, int, int]:
    """The (H, W, C) of images served for dataset ``name``.

    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    if name not in KNOWN:
        raise ValueError(f"unknown dataset name={name!r}; known: {', '.join(sorted(KNOWN))}")
    return KNOWN[name][1]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory labelled image set.

    Attributes:
      images: float32 (N, H, W, C), values in [0, 1].
      labels: int32 (N,), values in [0, num_classes).
      name: dataset name (``"digits"``, ...).
      num_classes: number of classes.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    num_classes: int

    def __post_init__(self):
        if self.images.ndim != 4 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"images must be (N, H, W, C) and labels (N,); got images {self.images.shape},"
                f" labels {self.labels.shape}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])

    def batches(self, batch_size: int, *, start: int = 0) -> Iterator[Batch]:
        """Consecutive batches from ``start`` on; the last one may be smaller."""
        _check_batch_args(batch_size, start, len(self))
        for lo in range(start, len(self), batch_size):
            hi = min(lo + batch_size, len(self))
            yield Batch(np.arange(lo, hi, dtype=np.int64), self.images[lo:hi], self.labels[lo:hi])


def _digits_file() -> dict[str, np.ndarray]:
    with importlib.resources.files("soapbubble").joinpath("data_digits.npz").open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


def load_digits(split: str) -> Dataset:
    """The embedded handwritten digits (see the module docstring for the split).

    Args:
      split: ``"train"`` (1437 images) or ``"test"`` (360 images).

    Returns:
      Dataset with images float32 (N, 8, 8, 1) in [0, 1] (pixel / 16), labels int32 (N,).

    Raises:
      ValueError: unknown split.

    Example:
      >>> len(load_digits("train"))
      1437
    """
    _check_name_split("digits", split)
    z = _digits_file()
    perm = z["permutation"].astype(np.int64)
    idx = perm[-DIGITS_TEST_SIZE:] if split == "test" else perm[:-DIGITS_TEST_SIZE]
    images = (z["images"][idx].astype(np.float32) / np.float32(16.0))[..., None]
    return Dataset(images, z["labels"][idx].astype(np.int32), "digits", 10)


# ----------------------------------------------------------------------------- tfds


def resize_center_crop(image: np.ndarray, resize: int = _RESIZE, crop: int = _CROP) -> np.ndarray:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a uint8 PIL route.

    The shorter side becomes ``resize`` and the longer ``int(resize * long / short)``
    (bilinear with PIL's antialiasing, as torchvision on PIL images); the crop starts
    at ``round((size - crop) / 2)``.

    Args:
      image: uint8 (H, W, C) with C in {1, 3}.
      resize: target of the shorter side, >= crop.
      crop: side of the square center crop, >= 1.

    Returns:
      uint8 (crop, crop, C).

    Example:
      >>> resize_center_crop(np.zeros((300, 400, 3), np.uint8)).shape
      (224, 224, 3)
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be uint8 (H, W, C) with C in (1, 3); got {image.dtype} {image.shape}")
    if not 1 <= crop <= resize:
        raise ValueError(f"need 1 <= crop <= resize; got crop={crop}, resize={resize}")
    h, w, c = image.shape
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = resize, int(resize * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    out = out.reshape(new_h, new_w, c)
    top = round((new_h - crop) / 2.0)
    left = round((new_w - crop) / 2.0)
    return out[top : top + crop, left : left + crop]


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the cifar10 / imagenet2012 pipelines need tensorflow-datasets: pip install soapbubble[data]"
        ) from e
    return tfds


class ImageSource:
    """Lazy random access to a tfds split, in the split's fixed order.

    Built by :func:`load`; reads through ``tfds.data_source`` (no TensorFlow).

    Attributes:
      name: dataset name.
      split: split name.
      num_classes: number of classes.
      image_shape: (H, W, C) of served images.
    """

    def __init__(self, name: str, split: str, source: Any, max_examples: int | None):
        self.name = name
        self.split = split
        self.num_classes = KNOWN[name][2]
        self.image_shape = KNOWN[name][1]
        self._source = source
        n = len(source)
        self._len = n if max_examples is None else min(n, max_examples)

    def __len__(self) -> int:
        return self._len

    def _convert(self, example: dict) -> tuple[np.ndarray, int]:
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[..., None]
        if self.name == "imagenet2012":
            if image.shape[-1] == 1:  # a few ImageNet JPEGs are greyscale
                image = np.repeat(image, 3, axis=-1)
            image = resize_center_crop(image)
        return image.astype(np.float32) / np.float32(255.0), int(example["label"])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -self._len <= i < self._len:
            raise IndexError(f"index i={i!r} out of range for {self._len} examples")
        return self._convert(self._source[int(i) % self._len])

    def batches(self, batch_size: int, *, start: int = 0) -> Iterator[Batch]:
        """Consecutive batches from ``start`` on; the last one may be smaller."""
        _check_batch_args(batch_size, start, len(self))
        for lo in range(start, len(self), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(self))))
            # Item by item: tfds's batched __getitems__ is not supported by every
            # source (its mock, for one).
            pairs = [self._convert(self._source[j]) for j in idx]
            yield Batch(
                np.asarray(idx, np.int64),
                np.stack([p[0] for p in pairs]),
                np.asarray([p[1] for p in pairs], np.int32),
            )


def load(name: str, split: str, *, data_dir: str | None = None, max_examples: int | None = None):
    """A dataset by name: ``"digits"`` (embedded), ``"cifar10"`` or ``"imagenet2012"`` (tfds).

    Args:
      name: dataset name.
      split: ``"train"``/``"test"`` (digits, cifar10), ``"train"``/``"validation"`` (imagenet2012).
      data_dir: tfds data directory holding the prepared dataset (default: tfds's own);
        ignored for digits.
      max_examples: keep only the first ``max_examples`` examples (>= 1), or all.

    Returns:
      :class:`Dataset` for digits (in memory), :class:`ImageSource` otherwise (lazy).

    Raises:
      ValueError: unknown name or split, bad ``max_examples``.
      FileNotFoundError: the tfds dataset is not prepared in ``data_dir``.
      ImportError: tensorflow-datasets missing (``pip install soapbubble[data]``).

    Example:
      >>> load("digits", "test", max_examples=10).images.shape
      (10, 8, 8, 1)
    """
    _check_name_split(name, split)
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be None or an integer >= 1, got {max_examples!r}")
    if name == "digits":
        ds = load_digits(split)
        if max_examples is not None:
            ds = dataclasses.replace(ds, images=ds.images[:max_examples], labels=ds.labels[:max_examples])
        return ds
    tfds = _import_tfds()
    # download=False: soapbubble never fetches data at run time.
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
        # tfds reports a missing dataset in several ways; say what to do instead.
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared (as array_record) in data_dir={data_dir!r}: prepare it"
            f" once with `tfds build {name} --file_format=array_record` (ImageNet needs its"
            f" manual download); tfds said: {e}"
        ) from e
    return ImageSource(name, split, source, None if max_examples is None else int(max_examples))


def materialize(ds, *, batch_size: int = 256) -> Dataset:
    """Reads a whole source into memory (for training on cifar10, say).

    Args:
      ds: a :class:`Dataset` (returned as it is) or :class:`ImageSource`.
      batch_size: read granularity.

    Returns:
      Dataset with images float32 (N, H, W, C) and labels int32 (N,).
    """
    if isinstance(ds, Dataset):
        return ds
    parts = list(ds.batches(batch_size))
    return Dataset(
        np.concatenate([b.images for b in parts]),
        np.concatenate([b.labels for b in parts]),
        ds.name,
        ds.num_classes,
    )
