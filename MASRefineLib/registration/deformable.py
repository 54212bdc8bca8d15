"""Batched deformable registration on top of an affine: a displacement (or stationary velocity) field
carried by a coarse control grid over the target, optimised with Adam over a multi-resolution pyramid.

With ``d`` the deformable displacement (mm, LPS, on the target) and ``A`` the affine (target -> atlas),
target point ``p`` takes the atlas value at ``A (p + d(p))``: the total resampling field is
``u(p) = A (p + d(p)) - p``, i.e. :func:`total_field`, which is the composition of the affine field
with ``d`` computed exactly (no interpolation of the affine part).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import losses
from ..geometry import Grid
from ..warp import affine_to_field, compose, grid_points, resample_field
from ..losses import similarity_loss, target_moments
from .affine import Tick, cosine_lr
from .params import REGISTRATION_LNCC_EPS, RegistrationParams
from .pyramid import AtlasPyramid, TargetPyramid, working_grid


def integrate_velocity(velocity: torch.Tensor, grid: Grid, steps: int) -> torch.Tensor:
    """Scaling and squaring: the displacement (B, 3, Z, Y, X) mm of exp(v) for a stationary velocity
    field ``velocity`` on ``grid``: d = v / 2^steps, then ``steps`` times d <- d o d."""
    d = velocity / (2 ** steps)
    for _ in range(steps):
        d = compose(d, d, grid)
    return d


def control_displacement(params_field: torch.Tensor, grid: Grid, params: RegistrationParams) -> torch.Tensor:
    """The displacement (mm) on the control ``grid`` that the optimised parameters describe."""
    if params.diffeomorphic:
        return integrate_velocity(params_field, grid, params.svf_steps)
    return params_field


def total_field(matrices: torch.Tensor, displacement: Optional[torch.Tensor], control_grid: Optional[Grid],
                grid: Grid) -> torch.Tensor:
    """Total resampling field (B, 3, Z, Y, X) mm on ``grid``: ``A (p + d(p)) - p``, with ``d`` the
    control-grid displacement upsampled to ``grid`` (``None``: the affine alone, as
    :func:`~MASRefineLib.warp.affine_to_field`)."""
    if displacement is None:
        return affine_to_field(matrices.to(torch.float64), grid).float()
    dev = displacement.device
    p = grid_points(grid, dev).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, Z, Y, X) mm, float32
    q = (p + resample_field(displacement.float(), control_grid, grid)).reshape(displacement.shape[0], 3, -1)
    m = matrices.to(dev, torch.float32)
    # coordinates relative to the grid centre keep float32 rounding at ~1e-5 mm
    c = torch.as_tensor(grid.center_mm(), dtype=torch.float32, device=dev).view(1, 3, 1)
    t = (m[:, :3, :3] @ c + m[:, :3, 3:]) - c
    moved = torch.baddbmm(t, m[:, :3, :3], q - c) - (p.reshape(1, 3, -1) - c)
    return moved.reshape(displacement.shape[0], 3, *grid.shape)


def optimize_deformable(target: TargetPyramid, atlases: AtlasPyramid, matrices: torch.Tensor,
                        params: RegistrationParams, tick: Optional[Tick] = None,
                        ) -> tuple[torch.Tensor, Grid, torch.Tensor]:
    """Optimise the deformable part over ``params.deform_*`` levels for atlases already affinely placed
    by ``matrices`` (B, 4, 4). Returns (control-grid displacement (B, 3, ...) mm, control grid,
    similarity at the last level (B,)).

    Per level: images compared on the working grid of ``deform_shrink * v``; parameters on the grid of
    ``control_shrink * v`` (upsampled from the previous level's); loss per atlas ``dissimilarity +
    bending_weight * bending + diffusion_weight * diffusion`` of the control parameters (velocity in
    diffeomorphic mode), the bending energy measured in control-grid voxels (dimensionless), plus
    ``folding_weight * folding_barrier`` of the control-grid displacement (mm); Adam step
    ``deform_lr * v`` mm with cosine decay.
    """
    dev = next(iter(target.levels.values()))[0].device
    b = matrices.shape[0]
    mats = matrices.to(dev, torch.float32)
    theta: Optional[torch.Tensor] = None
    cgrid: Optional[Grid] = None
    sim = torch.zeros(b, dtype=torch.float64, device=dev)
    n_levels = len(params.deform_shrink)
    for level in range(n_levels):
        spacing = target.spacing(params.deform_shrink[level])
        n_it = int(params.deform_iterations[level])
        lr = float(params.deform_lr[level]) * target.unit
        tgt, grid = target.levels[spacing]
        new_cgrid = working_grid(target.grid, target.spacing(params.control_shrink[level]))
        if theta is None:
            theta = torch.zeros(b, 3, *new_cgrid.shape, device=dev)
        else:
            theta = resample_field(theta.detach(), cgrid, new_cgrid)
        cgrid = new_cgrid
        theta = theta.detach().requires_grad_(True)
        if n_it == 0:
            continue
        opt = torch.optim.Adam([theta], lr=lr)
        p = grid_points(grid, dev).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, Z, Y, X) mm
        h = float(np.mean(cgrid.spacing))  # bending measured in control-grid voxels: u / h over x / h
        cspacing = tuple(sp / h for sp in cgrid.spacing)
        tmom = target_moments(params.similarity, tgt, params.lncc_window)
        for it in range(n_it):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lr, it, n_it)
            opt.zero_grad(set_to_none=True)
            cdisp = control_displacement(theta, cgrid, params)
            d = resample_field(cdisp, cgrid, grid)
            warped = atlases.sample(spacing, mats, p + d)
            dissim = similarity_loss(params.similarity, warped, tgt, params.lncc_window, tmom, REGISTRATION_LNCC_EPS)
            loss = dissim
            if params.bending_weight > 0:
                loss = loss + params.bending_weight * losses.bending_energy(theta / h, cspacing)
            if params.diffusion_weight > 0:
                loss = loss + params.diffusion_weight * losses.diffusion(theta / h, cspacing)
            if params.folding_weight > 0:
                # on the displacement itself (after integration in diffeomorphic mode): what folds is d
                loss = loss + params.folding_weight * losses.folding_barrier(cdisp, cgrid)
            loss.sum().backward()
            opt.step()
            sim = 1.0 - dissim.detach()
            if tick is not None:
                tick(1, f"deformable level {level + 1}/{n_levels} it {it + 1}/{n_it}",
                     {"similarity": sim.tolist()})
    if theta is None:
        return None, None, sim
    with torch.no_grad():
        disp = control_displacement(theta.detach(), cgrid, params)
    return disp, cgrid, sim.double()
