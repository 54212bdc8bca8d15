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
from .labels import label_values


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
    m = grid.index_to_physical()
    nx, ny, nz = grid.size
    out = torch.empty((nz, ny, nx, 3), dtype=dtype, device=device)
    for c in range(3):  # p_c = o_c + M_c0 i + M_c1 j + M_c2 k: a broadcast sum of three 1D ramps
        ri = torch.arange(nx, dtype=torch.float64, device=device) * m[c, 0] + m[c, 3]
        rj = torch.arange(ny, dtype=torch.float64, device=device) * m[c, 1]
        rk = torch.arange(nz, dtype=torch.float64, device=device) * m[c, 2]
        out[..., c] = rk.view(nz, 1, 1) + rj.view(1, ny, 1) + ri.view(1, 1, nx)
    return out


def sample(moving: torch.Tensor, moving_grid: Grid | Sequence[Grid], points: torch.Tensor, mode: str = "bilinear",
           padding: str = "zeros") -> torch.Tensor:
    """Sample ``moving`` (B, C, z, y, x) on ``moving_grid`` at LPS mm ``points`` (B or 1, Z, Y, X, 3).

    ``moving_grid`` may also be one grid per batch item (same array shape, e.g. atlases with different
    origins or directions), sampled in one call. ``mode`` is grid_sample's (``bilinear`` is trilinear in
    3D, or ``nearest``); ``padding`` is ``zeros`` (outside is 0, as ITK's default pixel value),
    ``border`` or ``reflection``. Returns (B, C, Z, Y, X).
    """
    if points.dim() == 4:
        points = points.unsqueeze(0)
    if isinstance(moving_grid, Grid):
        a = _tensor(physical_to_normalized(moving_grid), points)
        norm = points @ a[:3, :3].T + a[:3, 3]
    else:
        if len(moving_grid) != moving.shape[0]:
            raise ValueError(f"{len(moving_grid)} grids for a batch of {moving.shape[0]}")
        a = _tensor(np.stack([physical_to_normalized(g) for g in moving_grid]), points)
        if points.shape[0] != moving.shape[0]:
            points = points.expand(moving.shape[0], *points.shape[1:])
        norm = torch.einsum("bij,bzyxj->bzyxi", a[:, :3, :3], points) + a[:, None, None, None, :3, 3]
    if norm.shape[0] != moving.shape[0]:
        norm = norm.expand(moving.shape[0], *norm.shape[1:])
    return F.grid_sample(moving, norm.to(moving.dtype), mode=mode, padding_mode=padding, align_corners=True)


def sample_mapped(moving: torch.Tensor, moving_grid: Grid | Sequence[Grid], matrices: torch.Tensor,
                  points: torch.Tensor, mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """Sample ``moving`` (B, C, z, y, x) at ``A_b q`` for LPS mm points ``q`` given channel-first,
    (B or 1, 3, Z, Y, X) like a displacement field, and affine maps ``matrices`` (B, 4, 4) LPS mm -> LPS mm.

    The same as :func:`sample` at the mapped points, with the map folded into the normalisation so the
    whole mapping is one batched 3x3 product (differentiable in ``matrices`` and ``points``): the inner
    loop of affine and deformable registration. ``moving_grid``: one grid, or one per batch item.
    """
    b = moving.shape[0]
    grids = [moving_grid] * b if isinstance(moving_grid, Grid) else list(moving_grid)
    if len(grids) != b:
        raise ValueError(f"{len(grids)} grids for a batch of {b}")
    norm = _tensor(np.stack([physical_to_normalized(g) for g in grids]), matrices) @ matrices  # (B, 4, 4)
    q = points.reshape(points.shape[0], 3, -1).to(norm.dtype)
    if q.shape[0] != b:
        q = q.expand(b, -1, -1)
    mapped = torch.baddbmm(norm[:, :3, 3:], norm[:, :3, :3], q)  # (B, 3, N)
    grid = mapped.reshape(b, 3, *points.shape[2:]).permute(0, 2, 3, 4, 1)
    return F.grid_sample(moving, grid.to(moving.dtype), mode=mode, padding_mode=padding, align_corners=True)


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
                values: Sequence[int] | None = None, method: str = "onehot", chunk: int = 1 << 18) -> torch.Tensor:
    """Warp integer label maps (B, 1, z, y, x) holding label *values*; returns (B, 1, Z, Y, X) values.

    ``method='onehot'`` gives each target voxel the label whose indicator, interpolated trilinearly,
    is largest (smooth boundaries, no label invented; ties go to the smaller value). Only the labels of
    the 8 voxels around a sample point can win, so this is computed from those 8 corners and their
    trilinear weights -- the same result as interpolating all K indicators, at a cost independent of K
    (~150 labels for brains). ``'nearest'`` is nearest-neighbour. Outside the moving image is background 0.
    ``values`` restricts the labels that may be assigned (others never win); ``chunk`` bounds the
    number of target voxels processed at once.
    """
    if method == "nearest":
        out = warp(labels.float(), moving_grid, field, target_grid, mode="nearest", padding="zeros")
        return out.round().to(labels.dtype)
    if method != "onehot":
        raise ValueError(f"unknown label warp method {method!r}")
    dev = labels.device
    allowed = None
    if values is not None:
        allowed = torch.as_tensor(sorted(set(int(v) for v in values) | {0}), dtype=torch.int32, device=dev)
    base = grid_points(target_grid, dev, torch.float64).reshape(-1, 3)
    m = torch.as_tensor(moving_grid.physical_to_index(), dtype=torch.float64, device=dev)
    nx, ny, nz = moving_grid.size
    out = torch.empty((labels.shape[0], base.shape[0]), dtype=torch.int32, device=dev)
    for b in range(labels.shape[0]):
        flat = labels[b, 0].reshape(-1).to(torch.int32)
        keep = allowed
        if keep is not None and set(label_values(flat)) <= set(keep.tolist()):
            keep = None  # every value in this map may be assigned: no restriction to apply
        for s in range(0, base.shape[0], chunk):
            pts = base[s:s + chunk]
            if field is not None:
                pts = pts + field[b].reshape(3, -1)[:, s:s + chunk].T.to(torch.float64)
            out[b, s:s + chunk] = _onehot_argmax(flat, pts @ m[:3, :3].T + m[:3, 3], (nx, ny, nz), keep)
    return out.reshape(labels.shape[0], 1, *target_grid.shape).to(labels.dtype)


def _onehot_argmax(flat: torch.Tensor, idx: torch.Tensor, size: tuple[int, int, int],
                   allowed: torch.Tensor | None) -> torch.Tensor:
    """Label of largest trilinearly interpolated indicator at continuous indices ``idx`` (N, 3) (i, j, k)
    of the label volume ``flat`` (int32, x fastest); corners outside the volume are background 0."""
    lo = torch.floor(idx)
    frac = (idx - lo).to(torch.float32)
    # int32 flat indices when the volume allows: index_select with an int32 index is ~3x faster than
    # int64 fancy indexing (the gathers below are most of a label warp's time)
    itype = torch.int32 if size[0] * size[1] * size[2] < 2 ** 31 - 1 else torch.int64
    lo = lo.clamp(-2, max(size) + 1).to(itype)  # clamped where both corners are outside anyway (no overflow)
    per_axis = []  # for each axis: [(clamped index * stride, inside, weight) for offset 0, 1]
    stride = 1
    for a, n in enumerate(size):
        entries = []
        for off in (0, 1):
            i = lo[:, a] + off
            inside = (i >= 0) & (i < n)
            w = frac[:, a] if off else 1.0 - frac[:, a]
            entries.append((i.clamp(0, n - 1) * stride, inside, w))
        per_axis.append(entries)
        stride *= n
    labs, weights = [], []
    for corner in range(8):
        (ix, inx, wx), (iy, iny, wy), (iz, inz, wz) = (per_axis[a][(corner >> a) & 1] for a in range(3))
        lab = flat.index_select(0, ix + iy + iz)
        labs.append(torch.where(inx & iny & inz, lab, torch.zeros_like(lab)))
        weights.append(wx * wy * wz)
    result = labs[0].clone()
    # where all 8 corners agree (most voxels), that label wins; elsewhere score each corner's label
    mixed = torch.zeros_like(result, dtype=torch.bool)
    for lab in labs[1:]:
        mixed |= lab != labs[0]
    sel = mixed.nonzero().squeeze(1)
    if allowed is not None:
        sel = torch.arange(result.shape[0], device=result.device)  # a disallowed uniform label must lose too
    if sel.numel() == 0:
        return result
    labs = [lab[sel] for lab in labs]
    weights = [w[sel] for w in weights]
    scores = [w.clone() for w in weights]
    for c in range(8):
        for d in range(c + 1, 8):
            eq = (labs[c] == labs[d]).to(torch.float32)
            scores[c] += weights[d] * eq
            scores[d] += weights[c] * eq
    best_score = torch.full_like(scores[0], -1.0)
    best_label = torch.zeros_like(labs[0])
    for lab, score in zip(labs, scores):
        if allowed is not None:
            score = torch.where(torch.isin(lab, allowed), score, torch.full_like(score, -0.5))
        better = (score > best_score + 1e-6) | ((score > best_score - 1e-6) & (lab < best_label))
        best_score = torch.where(better, score, best_score)
        best_label = torch.where(better, lab, best_label)
    if allowed is not None:
        best_label = torch.where(best_score < 0, torch.zeros_like(best_label), best_label)
    result[sel] = best_label
    return result


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
