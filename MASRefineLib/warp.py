"""The one warp of the project: displacement fields in physical units applied with torch.

Conventions (pinned down here and nowhere else):

* Tensors of images are (B, C, Z, Y, X), i.e. indexed (k, j, i) like ``sitk.GetArrayFromImage``.
* A displacement field is (B, 3, Z, Y, X) on the *target* grid, in LPS millimetres, components in
  (x, y, z) order -- the same convention as ITK's ``DisplacementFieldTransform`` and Slicer's grid
  transforms (a "resampling" field): the target point ``p`` takes its value from the moving
  (atlas) point ``p + u(p)``. The paper's phi^-1(x) = x + f(x) is exactly this.
* Sampling uses ``torch.nn.functional.grid_sample`` with ``align_corners=True``: normalised
  coordinate -1 is the centre of the first voxel and +1 the centre of the last, which is ITK's
  voxel-centre convention. The mapping LPS mm -> normalised coordinates of the moving grid is one
  affine matrix (:func:`physical_to_normalized`), so moving and target may have different grids,
  spacings and (oblique) directions.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Grid


def physical_to_normalized(grid: Grid) -> np.ndarray:
    """4x4 matrix from LPS mm to grid_sample's normalised (x, y, z) coordinates (align_corners=True)."""
    size = np.asarray(grid.size, dtype=np.float64)
    scale = np.ones(3)
    nz = size > 1
    scale[nz] = 2.0 / (size[nz] - 1.0)
    n = np.eye(4)
    n[:3, :3] = np.diag(scale)
    n[:3, 3] = -1.0
    n[:3, 3][~nz] = 0.0
    return n @ grid.physical_to_index()


def _tensor(m: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(m, dtype=like.dtype, device=like.device)


def grid_points(grid: Grid, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LPS mm of every voxel centre of ``grid``: tensor (Z, Y, X, 3), last axis (x, y, z)."""
    m = torch.as_tensor(grid.index_to_physical(), dtype=torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in grid.size]  # i, j, k
    kk, jj, ii = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    ijk = torch.stack([ii, jj, kk], dim=-1)
    pts = ijk @ m[:3, :3].T + m[:3, 3]
    return pts.to(device=device, dtype=dtype)


def sample(moving: torch.Tensor, moving_grid: Grid, points: torch.Tensor, mode: str = "bilinear",
           padding: str = "zeros") -> torch.Tensor:
    """Sample ``moving`` (B, C, z, y, x) on ``moving_grid`` at LPS mm ``points`` (B or 1, Z, Y, X, 3).

    ``mode`` is grid_sample's (``bilinear`` is trilinear in 3D, or ``nearest``); ``padding`` is
    ``zeros`` (outside is 0, as ITK's default pixel value), ``border`` or ``reflection``.
    Returns (B, C, Z, Y, X).
    """
    if points.dim() == 4:
        points = points.unsqueeze(0)
    a = _tensor(physical_to_normalized(moving_grid), points)
    norm = points @ a[:3, :3].T + a[:3, 3]
    if norm.shape[0] != moving.shape[0]:
        norm = norm.expand(moving.shape[0], *norm.shape[1:])
    return F.grid_sample(moving, norm.to(moving.dtype), mode=mode, padding_mode=padding, align_corners=True)


def warp(moving: torch.Tensor, moving_grid: Grid, field: torch.Tensor | None, target_grid: Grid,
         mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """Warp ``moving`` (B, C, z, y, x) onto ``target_grid`` with ``field`` (B, 3, Z, Y, X) in LPS mm.

    ``field=None`` is pure resampling (identity transform in physical space).
    """
    pts = grid_points(target_grid, moving.device, torch.float32 if moving.dtype != torch.float64 else torch.float64)
    if field is not None:
        pts = pts.unsqueeze(0) + field.to(pts.dtype).permute(0, 2, 3, 4, 1)
    return sample(moving, moving_grid, pts, mode=mode, padding=padding)


def warp_labels(labels: torch.Tensor, moving_grid: Grid, field: torch.Tensor | None, target_grid: Grid,
                values: Sequence[int] | None = None, method: str = "onehot", chunk: int = 8) -> torch.Tensor:
    """Warp integer label maps (B, 1, z, y, x) holding label *values*; returns (B, 1, Z, Y, X) values.

    ``method='onehot'`` interpolates each label's indicator trilinearly and takes the argmax (smooth
    boundaries, no label invented); ``'nearest'`` is nearest-neighbour. Labels are processed ``chunk``
    at a time so memory stays bounded with ~150 labels. Outside the moving image is background 0.
    """
    if method == "nearest":
        out = warp(labels.float(), moving_grid, field, target_grid, mode="nearest", padding="zeros")
        return out.round().to(labels.dtype)
    if method != "onehot":
        raise ValueError(f"unknown label warp method {method!r}")
    if values is None:
        values = torch.unique(labels).tolist()
    values = sorted(set(int(v) for v in values) | {0})
    pts = grid_points(target_grid, labels.device)
    if field is not None:
        pts = pts.unsqueeze(0) + field.float().permute(0, 2, 3, 4, 1)
    best = None
    best_val = None
    for start in range(0, len(values), chunk):
        vs = values[start:start + chunk]
        onehot = torch.cat([(labels == v).float() for v in vs], dim=1)
        # outside the moving image counts as background: pad the indicator of 0 with ones
        prob = sample(onehot, moving_grid, pts, padding="zeros")
        if vs[0] == 0:
            inside = sample(torch.ones_like(labels, dtype=torch.float32), moving_grid, pts, padding="zeros")
            prob[:, :1] += 1.0 - inside
        p, idx = prob.max(dim=1, keepdim=True)
        v = torch.as_tensor(vs, device=labels.device)[idx]
        if best is None:
            best, best_val = p, v
        else:
            better = p > best
            best = torch.where(better, p, best)
            best_val = torch.where(better, v, best_val)
    return best_val.to(labels.dtype)


def affine_to_field(matrix: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement field (B, 3, Z, Y, X) mm of affine maps ``matrix`` (B, 4, 4) from target LPS mm to
    moving LPS mm: u(p) = A p - p."""
    if matrix.dim() == 2:
        matrix = matrix.unsqueeze(0)
    pts = grid_points(grid, matrix.device, matrix.dtype)
    mapped = torch.einsum("bij,zyxj->bzyxi", matrix[:, :3, :3], pts) + matrix[:, None, None, None, :3, 3]
    return (mapped - pts.unsqueeze(0)).permute(0, 4, 1, 2, 3).contiguous()


def resample_field(field: torch.Tensor, from_grid: Grid, to_grid: Grid) -> torch.Tensor:
    """Interpolate a displacement field (B, 3, ...) in mm from one grid (e.g. a coarse working grid)
    to another over the same space. Vectors are physical, so only positions are interpolated."""
    if from_grid == to_grid:
        return field
    if same_box(from_grid, to_grid):
        # Both grids tile the same box (one is Grid.resized of the other): voxel centres sit at the
        # same normalised positions as F.interpolate's align_corners=False, whose edge clamping is
        # border padding -- the same result as the general path below, several times faster.
        return F.interpolate(field, size=to_grid.shape, mode="trilinear", align_corners=False)
    return warp(field, from_grid, None, to_grid, padding="border")


def same_box(a: Grid, b: Grid, atol_mm: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` cover the same box (same direction, centre and extent ``size * spacing``),
    i.e. one is :meth:`Grid.resized` of the other, as all working grids of one image are."""
    return (np.allclose(a.direction_matrix, b.direction_matrix, atol=1e-6)
            and np.allclose(a.center_mm(), b.center_mm(), atol=atol_mm)
            and np.allclose(a.extent_mm(), b.extent_mm(), atol=atol_mm))


def compose(prior: torch.Tensor, refinement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The one field equivalent to warping by ``prior`` and then warping the result by ``refinement``.

    Both are (B, 3, Z, Y, X) mm on ``grid``: c(p) = r(p) + prior(p + r(p)).
    """
    pts = grid_points(grid, refinement.device, refinement.dtype).unsqueeze(0) + refinement.permute(0, 2, 3, 4, 1)
    return refinement + sample(prior, grid, pts, padding="border")


def image_tensor(arrays: np.ndarray | Iterable[np.ndarray], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(Z, Y, X) array, or several of the same shape, as a (B, 1, Z, Y, X) tensor."""
    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        arrays = [arrays]
    return torch.stack([torch.as_tensor(np.asarray(a)) for a in arrays]).unsqueeze(1).to(device=device, dtype=dtype)
