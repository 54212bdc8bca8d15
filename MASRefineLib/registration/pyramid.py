"""Working grids for registration: images block-averaged and resampled to coarser spacings, and a batch
of atlases kept on their own grids so one batched call samples them at mapped target points.

Every working grid is ``grid.with_spacing(...)`` of the image's own grid (same box, same direction), so
fields move between working grids of one image with :func:`MASRefineLib.warp.resample_field`'s fast path.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import Grid
from ..imageio import normalize_intensity, resample_image
from ..warp import image_tensor, sample_mapped


def normalized(image: sitk.Image) -> sitk.Image:
    """The image with intensities clipped to percentiles and scaled to [0, 1] (the project's convention)."""
    out = sitk.GetImageFromArray(normalize_intensity(sitk.GetArrayViewFromImage(image)))
    out.CopyInformation(image)
    return out


def working_grid(grid: Grid, spacing_mm: float) -> Grid:
    """A grid over ``grid``'s box with about ``spacing_mm`` spacing, never finer than the image itself."""
    sp = np.maximum(float(spacing_mm), np.asarray(grid.spacing, dtype=np.float64))
    return grid.with_spacing(tuple(float(s) for s in sp))


def downsample(image: sitk.Image, spacing_mm: float) -> tuple[np.ndarray, Grid]:
    """``image`` on :func:`working_grid`: block-averaged by the integer factor per axis (anti-aliasing),
    then linearly resampled. Returns the (Z, Y, X) float32 array and its grid."""
    grid = Grid.from_image(image)
    wg = working_grid(grid, spacing_mm)
    if wg == grid:
        return sitk.GetArrayFromImage(image).astype(np.float32), grid
    factors = [max(1, int(np.floor(w / s + 1e-6))) for w, s in zip(wg.spacing, grid.spacing)]
    factors = [min(f, n) for f, n in zip(factors, grid.size)]
    shrunk = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    return sitk.GetArrayFromImage(resample_image(shrunk, wg)).astype(np.float32), wg


class TargetPyramid:
    """The normalised target at each working spacing: ``levels[s] = ((1, 1, Z, Y, X) tensor, grid)``,
    ``s`` in mm = shrink factor x :attr:`unit` (the target's smallest voxel spacing, mm)."""

    def __init__(self, image: sitk.Image, shrinks: Iterable[float], device: torch.device):
        self.grid = Grid.from_image(image)
        self.unit = float(min(self.grid.spacing))
        self.levels: dict[float, tuple[torch.Tensor, Grid]] = {}
        for s in sorted(set(self.spacing(f) for f in shrinks)):
            arr, g = downsample(image, s)
            self.levels[s] = (image_tensor(arr, device), g)

    def spacing(self, shrink: float) -> float:
        """Working spacing (mm) of a shrink factor."""
        return round(float(shrink) * self.unit, 6)


class AtlasPyramid:
    """A batch of normalised atlas images at each working spacing, each on its own working grid.

    Atlases whose working arrays have the same shape are stacked into one group (their grids may
    differ in origin, spacing or direction), so :meth:`sample` makes one ``grid_sample`` call per
    distinct shape -- one call for a typical atlas set.
    """

    def __init__(self, images: Sequence[sitk.Image], spacings: Iterable[float], device: torch.device):
        self.n = len(images)
        self.levels: dict[float, list[tuple[torch.Tensor, torch.Tensor, list[Grid]]]] = {}
        for s in sorted(set(float(s) for s in spacings)):
            per = [downsample(im, s) for im in images]
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (arr, _) in enumerate(per):
                groups.setdefault(arr.shape, []).append(i)
            self.levels[s] = [(torch.as_tensor(idx, device=device), image_tensor([per[i][0] for i in idx], device),
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
