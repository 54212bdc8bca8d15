"""Displacement-field files and field diagnostics.

Files are NRRD, LPS millimetres, on the target grid, written so that 3D Slicer loads them as a
grid transform and SimpleITK reads them as a vector image for ``sitk.DisplacementFieldTransform``
(read them as ``sitk.sitkVectorFloat64``: ITK converts on reading)::

    type: float, dimension: 4, sizes: 3 X Y Z, kinds: vector domain domain domain,
    space: left-posterior-superior, space directions: none (d_i) (d_j) (d_k),
    intent_code:=1006 (NIfTI's displacement-vector intent), resampling convention.

The convention is the "resampling" one of :mod:`MASRefineLib.warp`: target point p maps to the
atlas point p + u(p).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch

from .errors import MASRefineError
from .geometry import Grid
from . import validate
from .imageio import _itk_error, require_file, write_image


def _as_numpy(field) -> np.ndarray:
    if isinstance(field, torch.Tensor):
        field = field.detach().cpu().numpy()
    field = np.asarray(field)
    if field.ndim == 5:
        if field.shape[0] != 1:
            raise ValueError("pass one field at a time (batch size 1)")
        field = field[0]
    if field.ndim != 4 or field.shape[0] != 3:
        raise ValueError(f"expected a field of shape (3, Z, Y, X), got {field.shape}")
    return field


def write_field(field, grid: Grid, path: str | os.PathLike) -> Path:
    """Write a displacement field (3, Z, Y, X) in LPS mm on ``grid`` as an NRRD grid transform, atomically.

    Stored as float32 (the fields are computed in float32) and without gzip: on a knee field, 160 x 200 x 200,
    gzip made 77 MB into 70 MB for 2.0 CPU s; raw takes 0.04 s (:func:`imageio.write_image`).
    """
    f = _as_numpy(field)
    if f.shape[1:] != grid.shape:
        raise ValueError(f"field shape {f.shape[1:]} does not match grid shape {grid.shape}")
    img = grid.apply_to(sitk.GetImageFromArray(np.moveaxis(f.astype(np.float32, copy=False), 0, -1), isVector=True))
    # ITK's NRRD writer puts the vector axis first (sizes 3 X Y Z, kinds vector domain domain domain,
    # space directions none ...) and writes string metadata as "key:=value" lines
    img.SetMetaData("intent_code", "1006")  # NIfTI's displacement-vector intent, as Slicer writes it
    img.SetMetaData("displacement_convention", "resampling")
    return write_image(img, path, compress=False)


def read_field(path: str | os.PathLike) -> tuple[np.ndarray, Grid]:
    """Read a displacement field NRRD (as written by :func:`write_field` or Slicer) -> ((3, Z, Y, X) mm, grid),
    after the file checks of :func:`validate.check_image_file` (no truncated or corrupt data); errors name the file."""
    path = require_file(path)
    validate.check_image_file(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise _itk_error(path, e) from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise MASRefineError(f"{path}: not a 3D displacement field (3-vector per voxel)")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (Z, Y, X, 3)
    if not np.isfinite(arr).all():  # NaN/inf (or beyond float32) would spread through every warp and composition
        raise MASRefineError(f"{path}: displacement field contains NaN or infinite values")
    return np.moveaxis(arr, -1, 0).copy(), Grid.from_image(img)


def gradient_columns(field: torch.Tensor, grid: Grid) -> list[torch.Tensor]:
    """The columns of :func:`spatial_gradient` unstacked: ``[du/dx, du/dy, du/dz]``, each (B, 3, Z, Y, X)
    (component a in channel a), without the (B, 3, 3, ...) copy (for callers that use the entries one by one)."""
    if field.dim() == 4:
        field = field.unsqueeze(0)
    # torch.gradient along dims X (i), Y (j), Z (k)
    d_idx = [torch.gradient(field, dim=d)[0] for d in (4, 3, 2)]  # d/di, d/dj, d/dk: (B, 3, Z, Y, X)
    minv = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))
    # du/dp = du/didx @ didx/dp, didx/dp = M^-1 (rows: index axes, cols: LPS axes); written out as
    # scalar multiply-adds (zero terms skipped: 3 for axis-aligned grids) instead of a 3x3 einsum
    cols = []
    for j in range(3):
        terms = [float(minv[i, j]) * d_idx[i] for i in range(3) if abs(minv[i, j]) > 1e-12]
        cols.append(sum(terms[1:], terms[0]) if terms else torch.zeros_like(field))
    return cols


def spatial_gradient(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """du_a/dx_b in physical units: (B, 3, 3, Z, Y, X), a = component, b = LPS axis.

    Central differences in index space (one-sided at the border), mapped to LPS through
    (direction * spacing)^-1, so oblique and anisotropic grids are handled.
    """
    return torch.stack(gradient_columns(field, grid), dim=2)


def jacobian_determinant(field, grid: Grid) -> torch.Tensor:
    """det(I + du/dp) per voxel: (B, Z, Y, X). Values <= 0 mean folding."""
    if not isinstance(field, torch.Tensor):
        field = torch.as_tensor(np.asarray(field, dtype=np.float32))
    g = spatial_gradient(field.float(), grid)
    j = g + torch.eye(3, dtype=g.dtype, device=g.device).view(1, 3, 3, 1, 1, 1)
    # cofactor expansion voxel-wise on (B, 3, 3, Z, Y, X): no per-voxel LU, no transposed copy
    return (j[:, 0, 0] * (j[:, 1, 1] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 1])
            - j[:, 0, 1] * (j[:, 1, 0] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 0])
            + j[:, 0, 2] * (j[:, 1, 0] * j[:, 2, 1] - j[:, 1, 1] * j[:, 2, 0]))


def jacobian_slabs(field, grid: Grid, slab: int = 16) -> Iterator[tuple[int, int, torch.Tensor]]:
    """:func:`jacobian_determinant` computed ``slab`` z-slices at a time: yields ``(z0, z1, det)`` with det
    (B, z1 - z0, Y, X). A one-slice halo keeps the differences exactly those of the whole-volume call;
    slabs keep the (B, 3, 3, ...) gradient small, which is ~4x faster on a knee grid (cache-sized)."""
    if not isinstance(field, torch.Tensor):
        field = torch.as_tensor(np.asarray(field, dtype=np.float32))
    if field.dim() == 4:
        field = field.unsqueeze(0)
    nz = field.shape[2]
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        lo, hi = max(0, z0 - 1), min(nz, z1 + 1)
        yield z0, z1, jacobian_determinant(field[:, :, lo:hi], grid)[:, z0 - lo:z0 - lo + (z1 - z0)]


def folding_fraction(field, grid: Grid, slab: int = 16) -> torch.Tensor:
    """Fraction of voxels with Jacobian determinant <= 0, per batch item: (B,) (by :func:`jacobian_slabs`)."""
    folded, n = None, 0
    for z0, z1, det in jacobian_slabs(field, grid, slab):
        f = (det <= 0).sum(dim=(1, 2, 3)).double()
        folded = f if folded is None else folded + f
        n += det[0].numel()
    return (folded / float(n)).float()


def jacobian_image(field, grid: Grid) -> sitk.Image:
    """Jacobian-determinant map of one field as a float32 image on ``grid`` (for QA in Slicer)."""
    det = np.empty(grid.shape, dtype=np.float32)
    for z0, z1, d in jacobian_slabs(field, grid):
        det[z0:z1] = d[0].cpu().numpy()
    return grid.apply_to(sitk.GetImageFromArray(det))
