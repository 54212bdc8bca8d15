"""The one in-memory volume of the project: a torch tensor with its grid (LPS mm).

A :class:`Volume` is built once where a file is read (:func:`read_image`, :func:`read_label`), and the stages
(registration, refinement, fusion) take it as it is; only the edges read and write files. Two kinds:

* an *image*: float32 intensities normalised to [0, 1] once, when it is read (:func:`imageio.normalize_intensity`:
  percentile clipping 0.5 %/99.5 %, the project's convention);
* a *label map*: the original integer label values (never renumbered) in the most compact integer dtype that
  holds them (:func:`label_dtype`: uint8, int16 or int32; torch has no uint16 arithmetic).

``tensor`` is (Z, Y, X), indexed (k, j, i) like ``sitk.GetArrayFromImage``; ``grid`` is the
:class:`~MASRefineLib.geometry.Grid` (size and spacing in (i, j, k) order, origin and direction in LPS mm).
Why a small own type and not MONAI's ``MetaTensor``: docs/volume.md (measured by ``bench/volume_type.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import SimpleITK as sitk
import torch

from . import imageio
from .errors import MASRefineError
from .geometry import Grid


def label_dtype(max_value: int) -> torch.dtype:
    """The smallest torch integer dtype holding label values 0..``max_value`` (labels are at most 65535,
    :data:`validate.LIMITS`): uint8 up to 255, int16 up to 32767, int32 beyond."""
    if max_value < 0:
        raise ValueError(f"label values must be non-negative, got {max_value}")
    if max_value <= 255:
        return torch.uint8
    if max_value <= 32767:
        return torch.int16
    return torch.int32


def compact_labels(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Label values as a tensor of :func:`label_dtype` (same values, same device; numpy is taken without a copy
    where its dtype is already the compact one)."""
    if isinstance(labels, np.ndarray):  # numpy first: torch has no max() for uint16, the type label files hold
        if labels.dtype.kind not in "biu":
            raise ValueError(f"label maps hold integers, got {labels.dtype}")
        top = int(labels.max()) if labels.size else 0
        dt = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}[label_dtype(top)]
        return torch.from_numpy(np.ascontiguousarray(labels.astype(dt, copy=False)))
    t = labels
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_floating_point():
        raise ValueError(f"label maps hold integers, got {t.dtype}")
    top = int(t.max()) if t.numel() else 0
    dt = label_dtype(top)
    return t if t.dtype == dt else t.to(dt)


@dataclass(frozen=True, eq=False)  # eq by identity: comparing tensors element-wise is not a volume's equality
class Volume:
    """A (Z, Y, X) tensor on ``grid``: normalised float32 intensities or integer label values (module doc).
    ``path``: the file it was read from, for messages."""
    tensor: torch.Tensor
    grid: Grid
    path: str | None = None

    def __post_init__(self):
        if tuple(self.tensor.shape) != tuple(self.grid.shape):
            raise ValueError(f"tensor shape {tuple(self.tensor.shape)} does not match grid shape {self.grid.shape}")

    @property
    def is_label(self) -> bool:
        return not self.tensor.is_floating_point()

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def to(self, device: torch.device | str) -> "Volume":
        """The volume on ``device`` (itself when already there)."""
        t = self.tensor.to(device)
        return self if t is self.tensor else Volume(t, self.grid, self.path)

    def batch(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(1, 1, Z, Y, X) view of the tensor (moved or cast only if asked)."""
        t = self.tensor[None, None]
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

    def numpy(self) -> np.ndarray:
        """The (Z, Y, X) array (no copy on the CPU)."""
        return self.tensor.detach().cpu().numpy()

    def to_image(self) -> sitk.Image:
        """A SimpleITK image on the grid (for writing files; labels as uint16, images as float32)."""
        arr = self.numpy().astype(np.uint16 if self.is_label else np.float32, copy=False)
        return imageio.array_to_image(arr, self.grid)

    @classmethod
    def from_image(cls, image: sitk.Image, normalise: bool = True, path: str | None = None) -> "Volume":
        """An intensity ``sitk.Image`` as a volume: float32, normalised to [0, 1] unless ``normalise=False`` (the
        adapter for callers that hold images; readers use :func:`read_image`)."""
        # normalising makes a new array, so it may read the image's buffer in place
        arr = (imageio.normalize_intensity(sitk.GetArrayViewFromImage(image)) if normalise
               else sitk.GetArrayFromImage(image).astype(np.float32, copy=False))
        return cls(torch.from_numpy(arr), Grid.from_image(image), path)

    @classmethod
    def from_label(cls, label: sitk.Image, path: str | None = None) -> "Volume":
        """A label ``sitk.Image`` (non-negative integer values) as a volume of :func:`compact_labels`."""
        arr = sitk.GetArrayViewFromImage(label)
        if arr.size and arr.min() < 0:
            raise MASRefineError(f"{path or 'label map'}: label values must be non-negative")
        # a copy, not a view: the tensor must not outlive the image's buffer
        return cls(compact_labels(np.array(arr, dtype=np.int64 if arr.dtype.kind == "f" else arr.dtype)),
                   Grid.from_image(label), path)


ImageLike = Union[Volume, sitk.Image, str, os.PathLike]


def read_image(path: str | os.PathLike, device: torch.device | str = "cpu") -> Volume:
    """Read an intensity image (:func:`imageio.read_image`: validated, float32) and normalise it, once."""
    return Volume.from_image(imageio.read_image(path), path=str(path)).to(device)


def read_label(path: str | os.PathLike, device: torch.device | str = "cpu", allow_empty: bool = False) -> Volume:
    """Read a label map (:func:`imageio.read_label`: validated values) as compact integer values."""
    return Volume.from_label(imageio.read_label(path, allow_empty=allow_empty), str(path)).to(device)


def as_image_volume(image: ImageLike, device: torch.device | str | None = None) -> Volume:
    """The one coercion of an intensity input to a normalised :class:`Volume`: a Volume is taken as it is (already
    normalised when it was read), an ``sitk.Image`` is normalised, a path is read (:func:`read_image`)."""
    if isinstance(image, Volume):
        vol = image
    elif isinstance(image, sitk.Image):
        vol = Volume.from_image(image)
    elif isinstance(image, (str, os.PathLike)):
        vol = read_image(image)
    else:
        raise TypeError(f"expected a Volume, an sitk.Image or a path, got {type(image).__name__}")
    if vol.is_label:
        raise MASRefineError(f"{vol.path or 'image'}: expected intensities, got integer label values")
    return vol if device is None else vol.to(device)


def as_label_volume(label: Volume | sitk.Image, device: torch.device | str | None = None) -> Volume:
    """A label input as a :class:`Volume` of compact integer values (an ``sitk.Image`` is converted)."""
    vol = label if isinstance(label, Volume) else Volume.from_label(label)
    if not vol.is_label:
        raise MASRefineError(f"{vol.path or 'label map'}: expected integer label values, got {vol.tensor.dtype}")
    return vol if device is None else vol.to(device)
