"""Working grids for registration: images block-averaged and resampled to coarser spacings (torch, on the
working device), and a batch of atlases kept on their own grids so one batched call samples them at mapped
target points.

Every working grid is ``grid.with_spacing(...)`` of the image's own grid (same box, same direction), so
fields move between working grids of one image with :func:`MASRefineLib.warp.resample_field`'s fast path.
The images are :class:`~MASRefineLib.volume.Volume` s (normalised once when read); ``sitk.Image`` s are still
accepted and normalised here (the adapter for older callers).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..geometry import Grid
from ..volume import Volume, as_image_volume
from ..warp import sample_mapped


def working_grid(grid: Grid, spacing_mm: float) -> Grid:
    """A grid over ``grid``'s box with about ``spacing_mm`` spacing, never finer than the image itself."""
    sp = np.maximum(float(spacing_mm), np.asarray(grid.spacing, dtype=np.float64))
    return grid.with_spacing(tuple(float(s) for s in sp))


def bin_shrink(x: torch.Tensor, grid: Grid, factors: Sequence[int]) -> tuple[torch.Tensor, Grid]:
    """Block average of ``x`` (Z, Y, X) by integer ``factors`` (i, j, k order), as ITK's BinShrink: the output has
    ``size // factor`` voxels per axis (a remainder is dropped at the far end), each the mean of its block, centred
    on the block: origin moved by ``(factor - 1) / 2`` input voxels along each axis (LPS mm), spacing ``x factor``."""
    f = [int(v) for v in factors]
    if max(f) == 1:
        return x, grid
    k = (f[2], f[1], f[0])  # (z, y, x)
    out = F.avg_pool3d(x[None, None], kernel_size=k, stride=k)[0, 0]
    sp = np.asarray(grid.spacing, dtype=np.float64)
    origin = np.asarray(grid.origin) + grid.direction_matrix @ (sp * (np.asarray(f) - 1.0) / 2.0)
    g = Grid(tuple(int(n // v) for n, v in zip(grid.size, f)), tuple(float(s) for s in sp * f),
             tuple(float(o) for o in origin), grid.direction)
    return out, g


def resample_linear(x: torch.Tensor, grid: Grid, to_grid: Grid) -> torch.Tensor:
    """``x`` (Z, Y, X) on ``grid`` linearly resampled onto ``to_grid`` (identity transform, physical space) with
    ITK's edge rule, so that it reproduces ``sitk.Resample(..., sitk.sitkLinear, 0)``: a point within half a voxel
    outside the outermost voxel centres takes the edge value (ITK's buffer is the voxels' extent, its linear
    interpolator clamps to the edge), a point further out is 0. The two grids' axes must be parallel (every working
    grid of an image: index maps axis by axis), so trilinear interpolation is three 1D linear interpolations (the
    warp's numbers, with float64 weights; several times faster than grid_sample on one CPU thread, which brings the
    pyramid to SimpleITK's speed: docs/volume.md)."""
    m = grid.physical_to_index() @ to_grid.index_to_physical()  # to_grid's (i, j, k, 1) -> grid's continuous index
    if not np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])), atol=1e-9 * max(1.0, float(np.abs(m).max()))):
        raise ValueError("resample_linear: the grids' axes are not parallel (only working grids of one image are)")
    out = x
    inside = None
    for a in range(3):  # i, j, k: tensor dims 2, 1, 0; one 1D linear interpolation per axis (separable)
        n, dim = grid.size[a], 2 - a
        idx = torch.arange(to_grid.size[a], dtype=torch.float64, device=x.device) * m[a, a] + m[a, 3]
        keep = (idx >= -0.5) & (idx < n - 0.5)
        c = idx.clamp(0, n - 1)  # border: the edge value up to half a voxel out (masked beyond)
        i0 = c.floor().long().clamp(max=max(n - 2, 0))
        w = (c - i0).to(x.dtype)
        i1 = (i0 + 1).clamp(max=n - 1)
        shape = [1, 1, 1]
        shape[dim] = -1
        out = out.index_select(dim, i0) * (1 - w).view(shape) + out.index_select(dim, i1) * w.view(shape)
        k = keep.view(shape)
        inside = k if inside is None else inside & k
    return torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))


def downsample(image: Volume | sitk.Image, spacing_mm: float) -> tuple[torch.Tensor, Grid]:
    """``image`` on :func:`working_grid`: block-averaged by the integer factor per axis (anti-aliasing),
    then linearly resampled (:func:`bin_shrink`, :func:`resample_linear`: the torch warp, on the volume's device).
    Returns the (Z, Y, X) float32 tensor and its grid. An ``sitk.Image`` is taken as it is (not normalised)."""
    vol = image if isinstance(image, Volume) else Volume.from_image(image, normalise=False)
    grid, x = vol.grid, vol.tensor.float()
    wg = working_grid(grid, spacing_mm)
    if wg == grid:
        return x, grid
    factors = [max(1, int(np.floor(w / s + 1e-6))) for w, s in zip(wg.spacing, grid.spacing)]
    factors = [min(f, n) for f, n in zip(factors, grid.size)]
    shrunk, sgrid = bin_shrink(x, grid, factors)
    return resample_linear(shrunk, sgrid, wg), wg


class TargetPyramid:
    """The normalised target at each working spacing: ``levels[s] = ((1, 1, Z, Y, X) tensor, grid)``,
    ``s`` in mm = shrink factor x :attr:`unit` (the target's smallest voxel spacing, mm)."""

    def __init__(self, image: Volume | sitk.Image, shrinks: Iterable[float], device: torch.device):
        vol = as_image_volume(image, device)
        self.grid = vol.grid
        self.unit = float(min(self.grid.spacing))
        self.levels: dict[float, tuple[torch.Tensor, Grid]] = {}
        for s in sorted(set(self.spacing(f) for f in shrinks)):
            t, g = downsample(vol, s)
            self.levels[s] = (t[None, None].contiguous(), g)

    def spacing(self, shrink: float) -> float:
        """Working spacing (mm) of a shrink factor."""
        return round(float(shrink) * self.unit, 6)


class AtlasPyramid:
    """A batch of normalised atlas images at each working spacing, each on its own working grid.

    Atlases whose working arrays have the same shape are stacked into one group (their grids may
    differ in origin, spacing or direction), so :meth:`sample` makes one ``grid_sample`` call per
    distinct shape -- one call for a typical atlas set.
    """

    def __init__(self, images: Sequence[Volume | sitk.Image], spacings: Iterable[float], device: torch.device):
        vols = [as_image_volume(im, device) for im in images]
        self.n = len(vols)
        self.levels: dict[float, list[tuple[torch.Tensor, torch.Tensor, list[Grid]]]] = {}
        for s in sorted(set(float(s) for s in spacings)):
            per = [downsample(v, s) for v in vols]
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (t, _) in enumerate(per):
                groups.setdefault(tuple(t.shape), []).append(i)
            self.levels[s] = [(torch.as_tensor(idx, device=device), torch.stack([per[i][0] for i in idx]).unsqueeze(1),
                               [per[i][1] for i in idx]) for idx in groups.values()]

    def sample(self, spacing: float, matrices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Atlas intensities at ``A_b q``: ``matrices`` (B, 4, 4) target -> atlas LPS mm, ``q`` LPS mm points
        channel-first (1 or B, 3, Z, Y, X). Returns (B, 1, Z, Y, X), one row per atlas."""
        groups = self.levels[float(spacing)]
        if len(groups) == 1:
            _, vol, grids = groups[0]
            return sample_mapped(vol, grids, matrices, points)
        outs, order = [], []
        for idx, vol, grids in groups:
            q = points if points.shape[0] == 1 else points.index_select(0, idx)
            outs.append(sample_mapped(vol, grids, matrices.index_select(0, idx), q))
            order.append(idx)
        inv = torch.argsort(torch.cat(order))
        return torch.cat(outs).index_select(0, inv)
