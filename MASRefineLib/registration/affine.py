"""Batched 12-degree-of-freedom affine registration in physical space.

A matrix here is 4x4 (float64) mapping *target* LPS mm to *atlas* LPS mm, as
:func:`MASRefineLib.warp.affine_to_field` expects: the atlas value at ``A p`` is moved to target point ``p``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import Grid
from ..losses import similarity_loss, target_moments
from ..volume import Volume
from ..warp import grid_points
from .params import REGISTRATION_LNCC_EPS, RegistrationParams
from .pyramid import AtlasPyramid, TargetPyramid

Tick = Callable[[int, str, dict], None]


def image_moments(image: Volume | sitk.Image, spacing_mm: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Centre of intensity mass (LPS mm, (3,)) and intensity-weighted covariance (mm^2, (3, 3)) of a
    non-negative (normalised) image, computed on a coarse working grid (default: 4 voxels)."""
    from .pyramid import downsample

    grid = image.grid if isinstance(image, Volume) else Grid.from_image(image)
    arr, g = downsample(image, spacing_mm or 4.0 * min(grid.spacing))
    w = arr.detach().cpu().to(torch.float64).clamp(min=0).reshape(-1).numpy()
    pts = grid_points(g, dtype=torch.float64).reshape(-1, 3).numpy()
    total = w.sum()
    if total <= 0:
        return g.center_mm(), np.eye(3)
    c = (w[:, None] * pts).sum(0) / total
    d = pts - c
    cov = (w[:, None, None] * (d[:, :, None] * d[:, None, :])).sum(0) / total
    return c, cov


def initial_matrices(target: Volume | sitk.Image, atlases: Sequence[Volume | sitk.Image]) -> torch.Tensor:
    """Initial target->atlas matrices (B, 4, 4) float64 (images normalised, as :class:`Volume` s): the target's
    centre of intensity mass maps to each atlas's, with an isotropic scale from the ratio of the second-moment
    volumes (det of the covariances)^(1/6), clipped to [0.67, 1.5]."""
    mats = []
    ct, cov_t = image_moments(target)
    for atlas in atlases:
        m = np.eye(4)
        ca, cov_a = image_moments(atlas)
        dt, da = np.linalg.det(cov_t), np.linalg.det(cov_a)
        s = (da / dt) ** (1.0 / 6.0) if dt > 0 and da > 0 else 1.0
        s = float(np.clip(s, 0.67, 1.5))
        m[:3, :3] *= s
        m[:3, 3] = ca - s * ct
        mats.append(m)
    return torch.as_tensor(np.stack(mats), dtype=torch.float64)


def cosine_lr(lr: float, it: int, n: int, floor: float = 0.05) -> float:
    """Cosine decay from ``lr`` to ``floor * lr`` over ``n`` iterations."""
    if n <= 1:
        return lr
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * it / (n - 1))))


def optimize_affine(target: TargetPyramid, atlases: AtlasPyramid, init: torch.Tensor, params: RegistrationParams,
                    radius_mm: float, tick: Optional[Tick] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine ``init`` (B, 4, 4) by Adam over ``params.affine_*`` levels; returns (matrices (B, 4, 4)
    float64, similarity at the last level (B,)).

    Parametrisation: ``A p = (M0 + L / r)(p - c) + (a0 + t)`` with ``c`` the centre of the target's grid,
    ``M0, a0`` from ``init`` and ``r = radius_mm`` (the target's radius of gyration); ``L`` (3x3) and
    ``t`` (mm) start at 0 and share one Adam step, ``affine_lr * v`` mm. ``tick(n_iterations, message,
    data)`` is called every iteration (it may raise Cancelled).
    """
    dev = next(iter(target.levels.values()))[0].device
    init = init.to(dev, torch.float64)
    b = init.shape[0]
    c = torch.as_tensor(target.grid.center_mm(), dtype=torch.float64, device=dev)
    m0 = init[:, :3, :3].clone()
    a0 = init[:, :3, :3] @ c + init[:, :3, 3]
    lin = torch.zeros(b, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    trans = torch.zeros(b, 3, dtype=torch.float64, device=dev, requires_grad=True)
    radius = float(radius_mm)
    lr = params.affine_lr * target.unit

    def matrices() -> torch.Tensor:
        m = m0 + lin / radius
        top = torch.cat([m, (a0 + trans - (m @ c.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)], dim=2)
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=dev).expand(b, 1, 4)
        return torch.cat([top, bottom], dim=1)

    sim = torch.zeros(b, dtype=torch.float64, device=dev)
    if sum(params.affine_iterations) == 0:
        return matrices().detach(), sim
    opt = torch.optim.Adam([lin, trans], lr=lr)
    for level, (shrink, n_it) in enumerate(zip(params.affine_shrink, params.affine_iterations)):
        spacing = target.spacing(shrink)
        tgt, grid = target.levels[spacing]
        q = grid_points(grid, dev, torch.float32).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, Z, Y, X) mm
        tmom = target_moments(params.affine_similarity, tgt, params.lncc_window)
        for it in range(n_it):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lr, it, n_it)
            opt.zero_grad(set_to_none=True)
            warped = atlases.sample(spacing, matrices().float(), q)
            loss = similarity_loss(params.affine_similarity, warped, tgt, params.lncc_window, tmom, REGISTRATION_LNCC_EPS)
            loss.sum().backward()
            opt.step()
            sim = 1.0 - loss.detach()
            if tick is not None:
                tick(1, f"affine level {level + 1}/{len(params.affine_shrink)} it {it + 1}/{n_it}",
                     {"similarity": sim.tolist()})
    return matrices().detach(), sim.double()
