"""Converts Cohen et al.'s / Salman et al.'s PyTorch checkpoints into soapbubble models.

A published checkpoint is a ``torch.save``-d dict with ``"arch"`` (``"cifar_resnet20"``,
``"cifar_resnet110"``, ``"resnet50"``) and ``"state_dict"`` of
``Sequential(NormalizeLayer, model)``: every key carries the prefix ``1.``, and the
ImageNet model's also DataParallel's ``module.`` (``1.module.conv1.weight``). The
normalize layer has no state; its constants are built into the flax modules.

Tensors map one to one onto the flax variables (module names are the PyTorch ones
with ``.`` -> ``_``):

==============================  ==========================================
PyTorch                         flax
==============================  ==========================================
conv ``weight`` (O, I, H, W)    ``params/.../kernel`` (H, W, I, O)
linear ``weight`` (out, in)     ``params/.../kernel`` (in, out)
BN ``weight`` / ``bias``        ``params/.../scale`` / ``bias``
BN ``running_mean`` / ``_var``  ``batch_stats/.../mean`` / ``var``
BN ``num_batches_tracked``      ignored
==============================  ==========================================

Every expected tensor must be present with the right shape and no other tensor may
be; otherwise a ValueError names the key. The file is read with
``torch.load(weights_only=True)``: a checkpoint is data, and a file that would need
code execution to load is refused.

Example (needs the ``torch`` extra)::

    from soapbubble.models import convert
    convert.convert_checkpoint("noise_0.25/checkpoint.pth.tar", "models/cifar_sigma025")
    # or: soapbubble convert noise_0.25/checkpoint.pth.tar models/cifar_sigma025

The torch-free core works on any mapping of arrays:

  >>> import numpy as np
  >>> from soapbubble.models import convert
  >>> state = {"1.conv1.weight": np.zeros((16, 3, 3, 3)), "1.fc.weight": np.zeros((10, 64))}
  >>> convert.convert_state_dict("cifar_resnet20", state)
  Traceback (most recent call last):
  ...
  ValueError: checkpoint state_dict lacks key '1.bn1.running_mean' (expected for arch 'cifar_resnet20')
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import traverse_util

from soapbubble.models import registry

__all__ = [
    "ARCHS",
    "ConvertedModel",
    "convert_checkpoint",
    "convert_state_dict",
    "load_checkpoint",
    "main",
]

# Cohen et al.'s arch name -> (registry name, dataset, input side, key prefix).
# The prefix "1." is Sequential(NormalizeLayer, model); "module." is DataParallel.
ARCHS: dict[str, tuple[str, str, int, str]] = {
    "cifar_resnet20": ("cifar_resnet20", "cifar10", 32, "1."),
    "cifar_resnet56": ("cifar_resnet56", "cifar10", 32, "1."),
    "cifar_resnet110": ("cifar_resnet110", "cifar10", 32, "1."),
    "resnet50": ("resnet50", "imagenet2012", 224, "1.module."),
}

_DATA_PARALLEL = "module."

# A legacy (pre-zip) torch.save file opens with a pickle (protocol >= 2) of torch's magic
# number: these are its bytes (LONG1 opcode, 10 bytes little-endian) as any protocol writes them.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_START = b"PK\x03\x04"

# (collection, flax leaf name) -> PyTorch tensor name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class ConvertedModel(NamedTuple):
    """A converted checkpoint, ready for ``io.save_model``.

    Attributes:
      arch: registry name of the architecture.
      config: builder kwargs (``{"num_classes": int}``).
      dataset: dataset name (``"cifar10"`` or ``"imagenet2012"``).
      variables: ``{"params": ..., "batch_stats": ...}``, float32 numpy arrays in flax layout.
    """

    arch: str
    config: dict[str, Any]
    dataset: str
    variables: dict[str, Any]


def _torch_layout(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch shape of a flax kernel / vector shape (inverse of :func:`_to_flax`)."""
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:  # (in, out) -> (out, in)
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def _to_flax(tensor: np.ndarray) -> np.ndarray:
    """OIHW conv weight -> HWIO; (out, in) linear weight -> (in, out); vectors as they are."""
    if tensor.ndim == 4:
        return np.transpose(tensor, (2, 3, 1, 0))
    if tensor.ndim == 2:
        return tensor.T
    return tensor


def _expected_keys(module, side: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Torch key (without prefix) -> (flax path, flax shape), from the module's abstract init."""
    dummy = jax.ShapeDtypeStruct((1, side, side, 3), np.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), dummy)
    expected = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        collection, *modules, name = path
        torch_name = _LEAF_NAMES[(collection, name)]
        key = ".".join([m.replace("_", ".") for m in modules] + [torch_name])
        expected[key] = (path, tuple(leaf.shape))
    return expected


def _num_classes(state_dict: Mapping[str, Any], prefix: str) -> int:
    key = prefix + "fc.weight"
    if key not in state_dict:
        raise ValueError(f"checkpoint state_dict lacks key {key!r} (the final linear layer)")
    shape = np.shape(state_dict[key])
    if len(shape) != 2 or shape[0] < 1:
        raise ValueError(
            f"checkpoint tensor {key!r} has shape {shape}, expected (num_classes, features)"
        )
    return int(shape[0])


def convert_state_dict(arch: str, state_dict: Mapping[str, Any]) -> ConvertedModel:
    """Maps a Cohen et al.-style state_dict onto the flax variables of ``arch``.

    Args:
      arch: Cohen et al.'s architecture name, a key of :data:`ARCHS`.
      state_dict: key -> array (numpy arrays, or anything ``np.asarray`` takes), keys
        with the prefix ``1.`` (and ``1.module.`` for ``resnet50``). A CIFAR
        checkpoint saved through DataParallel (``1.module.``) is accepted too.

    Returns:
      A :class:`ConvertedModel`; ``num_classes`` is read from ``fc.weight``.

    Raises:
      ValueError: unknown ``arch``; a key missing, unexpected or without the prefix;
        a tensor of the wrong shape, non-float dtype or with non-finite values. The
        message names the key.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} in checkpoint; known: {', '.join(sorted(ARCHS))}")
    name, dataset, side, prefix = ARCHS[arch]
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"checkpoint 'state_dict' must be a mapping, got {type(state_dict).__name__}"
        )
    for key in state_dict:
        if not isinstance(key, str):
            raise ValueError(f"checkpoint state_dict key {key!r} is not a string")
    # DataParallel is an accident of training: accept its absence/presence as the keys show.
    if (
        prefix.endswith(_DATA_PARALLEL)
        and state_dict
        and not any(k.startswith(prefix) for k in state_dict)
    ):
        prefix = prefix[: -len(_DATA_PARALLEL)]
    elif (
        not prefix.endswith(_DATA_PARALLEL)
        and state_dict
        and all(k.startswith(prefix + _DATA_PARALLEL) for k in state_dict)
    ):
        prefix = prefix + _DATA_PARALLEL
    for key in state_dict:
        if not key.startswith(prefix):
            raise ValueError(
                f"checkpoint state_dict key {key!r} lacks the prefix {prefix!r} of Cohen et al.'s "
                f"Sequential(NormalizeLayer, model) wrapping (arch {arch!r})"
            )

    config = {"num_classes": _num_classes(state_dict, prefix)}
    expected = _expected_keys(registry.build(name, **config), side)
    bn_modules = {k[: -len("running_mean")] for k in expected if k.endswith("running_mean")}

    flat = {}
    for key in state_dict:
        bare = key[len(prefix) :]
        if (
            bare.endswith("num_batches_tracked")
            and bare[: -len("num_batches_tracked")] in bn_modules
        ):
            continue  # a counter for PyTorch's momentum=None mode; eval mode never reads it
        if bare not in expected:
            raise ValueError(f"checkpoint state_dict has unexpected key {key!r} for arch {arch!r}")
        path, flax_shape = expected[bare]
        tensor = np.asarray(state_dict[key])
        if tensor.shape != _torch_layout(flax_shape):
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                f"{_torch_layout(flax_shape)} for arch {arch!r}"
            )
        if not np.issubdtype(tensor.dtype, np.floating):
            raise ValueError(
                f"checkpoint tensor {key!r} has dtype {tensor.dtype}, expected a float dtype"
            )
        if not np.all(np.isfinite(tensor)):
            raise ValueError(f"checkpoint tensor {key!r} has non-finite values")
        # A copy: the caller's tensors (torch shares memory with numpy) must not alias ours.
        flat[path] = np.array(_to_flax(tensor), dtype=np.float32, order="C", copy=True)
    for bare in expected:
        if expected[bare][0] not in flat:
            raise ValueError(
                f"checkpoint state_dict lacks key {prefix + bare!r} (expected for arch {arch!r})"
            )
    return ConvertedModel(name, config, dataset, traverse_util.unflatten_dict(flat))


def _import_torch():
    try:
        import torch
    except ImportError as e:  # torch is an optional extra
        raise ImportError(
            "converting PyTorch checkpoints needs torch: pip install 'soapbubble[torch]'"
        ) from e
    return torch


def load_checkpoint(
    checkpoint_path: str | os.PathLike,
) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """Reads a published checkpoint as data: ``(arch, state_dict as numpy, extra)``.

    ``extra`` records the source (file name, Cohen et al.'s arch, ``epoch`` when present).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the path is a directory; the file is no torch checkpoint (neither a
        ``torch.save`` zip archive nor the legacy pickle format), is truncated or
        corrupted, or is not plain tensor data (it would need code execution to
        load); or it lacks ``"arch"`` / ``"state_dict"``. The message names the path.
      ImportError: torch is not installed.
    """
    path = os.fspath(checkpoint_path)
    expected = (
        "expected a torch.save file (Cohen et al.'s checkpoint.pth.tar) holding a dict with "
        "'arch' and 'state_dict'"
    )
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory, {expected}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} is not a file")
    # torch.save writes a zip archive (torch >= 1.6) or, before that, a pickle stream that
    # opens with the pickled magic number; anything else is no checkpoint (random bytes,
    # text), whatever error the unpickler would stumble on first.
    with open(path, "rb") as f:
        start = f.read(32)
    legacy = start[:1] == b"\x80" and _LEGACY_MAGIC in start
    if start.startswith(_ZIP_START) and not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path!r} is a truncated or corrupted zip archive, {expected}")
    if not (legacy or zipfile.is_zipfile(path)):
        raise ValueError(f"checkpoint {path!r} is not a PyTorch checkpoint: {expected}")
    torch = _import_torch()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {path!r} is not plain tensor data: torch.load(weights_only=True) refused "
            f"it ({reason}). Loading it would execute code stored in the file, which soapbubble "
            "will not do; re-save the dict of arch and state_dict tensors from a trusted source."
        ) from e
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError, TypeError, AttributeError,
            struct.error, zipfile.BadZipFile, UnicodeDecodeError) as e:
        # A truncated or corrupted file: the loader fails in whatever way the bytes lead it to.
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        raise ValueError(
            f"checkpoint {path!r} cannot be read as a PyTorch checkpoint (truncated or corrupted? "
            f"{reason}); {expected}"
        ) from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(
            f"checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict with 'arch' and 'state_dict'"
        )
    for field in ("arch", "state_dict"):
        if field not in ckpt:
            raise ValueError(
                f"checkpoint {path!r} lacks the field {field!r} (has: {', '.join(map(str, ckpt))})"
            )
    arch, state = ckpt["arch"], ckpt["state_dict"]
    if not isinstance(arch, str):
        raise ValueError(f"checkpoint {path!r} field 'arch' must be a string, got {arch!r}")
    if not isinstance(state, Mapping):
        raise ValueError(
            f"checkpoint {path!r} field 'state_dict' must be a dict, got {type(state).__name__}"
        )
    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"checkpoint state_dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        arrays[key] = (
            value.detach().to(torch.float32).numpy() if value.is_floating_point() else value.numpy()
        )
    extra: dict[str, Any] = {
        "source": "pytorch",
        "checkpoint": os.path.basename(path),
        "torch_arch": arch,
    }
    if isinstance(ckpt.get("epoch"), int):
        extra["epoch"] = ckpt["epoch"]
    return arch, arrays, extra


def convert_checkpoint(
    checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> str:
    """Converts a published PyTorch checkpoint into a soapbubble model directory.

    Args:
      checkpoint_path: a ``torch.save``-d dict with ``"arch"`` and ``"state_dict"``.
      out_dir: directory to write (``soapbubble_model.json`` + orbax ``variables/``);
        must not exist or be empty, unless it holds a saved model and ``overwrite``.
      overwrite: replace a saved model at ``out_dir``.

    Returns:
      ``out_dir`` as a string; ``soapbubble.models.load(out_dir)`` gives the logits function.

    Raises:
      ValueError, FileNotFoundError, ImportError: see :func:`load_checkpoint` and
        :func:`convert_state_dict`.
      FileExistsError: ``out_dir`` holds something (see ``io.save_model``).
    """
    arch, state_dict, extra = load_checkpoint(checkpoint_path)
    converted = convert_state_dict(arch, state_dict)
    from soapbubble.models import io as model_io  # imported late: io pulls in orbax

    variables = jax.tree.map(np.asarray, converted.variables)
    out = os.fspath(out_dir)
    model_io.save_model(
        out,
        converted.arch,
        converted.config,
        variables,
        dataset=converted.dataset,
        extra=extra,
        overwrite=overwrite,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """``soapbubble convert CHECKPOINT OUT``: returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="soapbubble convert",
        description="Convert a Cohen et al. / Salman et al. PyTorch checkpoint to a soapbubble model.",
    )
    parser.add_argument("checkpoint", help="torch-saved dict with 'arch' and 'state_dict'")
    parser.add_argument("out", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a saved model at OUT")
    args = parser.parse_args(argv)
    out = convert_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
