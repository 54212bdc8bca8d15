"""Image grids in physical space.

A :class:`Grid` is the geometry of a 3D image as ITK defines it: ``size`` and ``spacing`` in
(x, y, z) = (i, j, k) order, ``origin`` in LPS millimetres, and ``direction`` a 3x3 matrix whose
columns are the LPS directions of the i, j, k axes. The voxel with index (i, j, k) sits at::

    p = origin + direction @ diag(spacing) @ (i, j, k)        (LPS mm)

numpy arrays from ``sitk.GetArrayFromImage`` (and all torch tensors in this project) are indexed
(k, j, i), i.e. (z, y, x); their shape is ``grid.shape``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 numbers, row-major, as sitk.Image.GetDirection()

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x) of images on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to (x, y, z, 1) in LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def physical_to_index(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous LPS mm to continuous (i, j, k, 1)."""
        return np.linalg.inv(self.index_to_physical())

    def extent_mm(self) -> np.ndarray:
        """Physical size of the field of view along i, j, k in mm (size * spacing)."""
        return np.asarray(self.size) * np.asarray(self.spacing)

    def center_mm(self) -> np.ndarray:
        """LPS mm of the centre of the field of view."""
        c = (np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0
        return (self.index_to_physical() @ np.append(c, 1.0))[:3]

    def reference_image(self, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image on this grid, for SimpleITK resampling."""
        img = sitk.Image([int(s) for s in self.size], pixel_id)
        self.apply_to(img)
        return img

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (already of this size) this grid's origin, spacing and direction."""
        if tuple(image.GetSize()) != tuple(self.size):
            raise ValueError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def isclose(self, other: "Grid", rtol: float = 1e-5, atol_mm: float = 1e-4) -> bool:
        """Same size and (to ITK's usual tolerance) the same voxel-to-LPS mapping."""
        if tuple(self.size) != tuple(other.size):
            return False
        return bool(np.allclose(self.index_to_physical(), other.index_to_physical(), rtol=rtol, atol=atol_mm))

    def describe(self) -> str:
        """``120x120x90 @ 2x2x2 mm`` (size i x j x k, spacing in mm)."""
        sp = "x".join(f"{v:.4g}" for v in self.spacing)
        return "x".join(str(n) for n in self.size) + f" @ {sp} mm"

    def difference(self, other: "Grid") -> str:
        """What differs from ``other``, in words, for one-line errors: size, spacing (mm), origin (distance in
        mm) or direction."""
        diffs = []
        if tuple(self.size) != tuple(other.size):
            diffs.append(f"size {'x'.join(map(str, self.size))} vs {'x'.join(map(str, other.size))}")
        if not np.allclose(self.spacing, other.spacing, rtol=1e-5, atol=1e-6):
            diffs.append(f"spacing {'x'.join(f'{v:.4g}' for v in self.spacing)} vs "
                         f"{'x'.join(f'{v:.4g}' for v in other.spacing)} mm")
        d = float(np.linalg.norm(np.subtract(self.origin, other.origin)))
        if d > 1e-4:
            diffs.append(f"origin {d:.3g} mm apart")
        if not np.allclose(self.direction, other.direction, atol=1e-5):
            diffs.append("direction differs")
        return ", ".join(diffs) or "differs slightly"

    def resized(self, size: tuple[int, int, int]) -> "Grid":
        """A grid over the same field of view (same corners of the first and last voxel centres'
        bounding box extents) with a different number of voxels: used for working grids.

        The physical extent ``size * spacing`` is kept and the centre stays put.
        """
        size = tuple(int(max(1, s)) for s in size)
        spacing = tuple(float(e / s) for e, s in zip(self.extent_mm(), size))
        d = self.direction_matrix
        c = self.center_mm()
        origin = c - d @ (np.asarray(spacing) * (np.asarray(size) - 1.0) / 2.0)
        return Grid(size, spacing, tuple(float(o) for o in origin), self.direction)

    def with_spacing(self, spacing_mm: float | tuple[float, float, float]) -> "Grid":
        """A working grid of (about) the given spacing over the same field of view."""
        sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        size = np.maximum(1, np.round(self.extent_mm() / sp)).astype(int)
        return self.resized(tuple(int(s) for s in size))

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_json(cls, d: dict) -> "Grid":
        return cls(tuple(int(v) for v in d["size"]), tuple(float(v) for v in d["spacing"]),
                   tuple(float(v) for v in d["origin"]), tuple(float(v) for v in d["direction"]))
