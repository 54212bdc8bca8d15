"""Batched deformable registration on top of an affine: a displacement (or stationary velocity) field
carried by a coarse control grid over the target, optimised with Adam over a multi-resolution pyramid
(``deform_optimizer="adam"``, the default), or a dense displacement on each working grid updated as the
greedy tool does (``deform_optimizer="greedy"``: smoothed NCC gradient, fixed maximal step, compositive
update, smoothing of the field; :func:`optimize_greedy`, docs/registration.md "greedy-style optimiser").

With ``d`` the deformable displacement (mm, LPS, on the target) and ``A`` the affine (target -> atlas),
target point ``p`` takes the atlas value at ``A (p + d(p))``: the total resampling field is
``u(p) = A (p + d(p)) - p``, i.e. :func:`total_field`, which is the composition of the affine field
with ``d`` computed exactly (no interpolation of the affine part).
"""
from __future__ import annotations

from typing import Optional

import math

import numpy as np
import torch
import torch.nn.functional as F

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
    ``deform_lr * v`` mm with cosine decay. With ``params.deform_optimizer == "greedy"``:
    :func:`optimize_greedy` (same inputs and outputs; the control grid is then the last working grid).
    """
    if params.deform_optimizer == "greedy":
        return optimize_greedy(target, atlases, matrices, params, tick)
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


def gaussian_smooth(field: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, Z, Y, X) with standard deviation ``sigma_vox`` voxels along
    every axis (each component alike), the border value repeated outside the grid (as ITK's recursive
    Gaussian, which greedy uses, extends an image), kernel truncated at 4 sigma and normalised to sum 1.
    ``sigma_vox <= 0``: unchanged.

    Not MONAI's ``GaussianFilter``: it pads with zeros, which pulls a displacement field toward 0 at the
    border (a constant field keeps 0.23-0.48 of its value in a corner). MONAI's ``separable_filtering`` with
    ``mode="replicate"`` and the same kernel gives the same numbers (within 1e-6; test_registration) but took
    1.4-2.4x as long on a (2, 3, 40, 48, 44) field at 1 thread, so this loop stays."""
    if sigma_vox <= 0:
        return field
    r = max(1, int(math.ceil(4.0 * sigma_vox)))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    k = (k / k.sum()).to(field.dtype).to(field.device)
    b, c = field.shape[:2]
    out = field.reshape(b * c, 1, *field.shape[2:])
    for axis in range(3):  # z, y, x
        n = out.shape[2 + axis]
        rr = min(r, n - 1)  # replicate padding of a short axis: the kernel beyond 4 sigma is ~0 anyway
        kk = k[r - rr:r + rr + 1] if rr < r else k
        kk = kk / kk.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kk.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = rr  # F.pad lists the last axis first
        if rr > 0:
            out = F.conv3d(F.pad(out, pad, mode="replicate"), kk.view(shape))
    return out.reshape(field.shape)


def _voxel_frame(grid: Grid, dev: torch.device) -> torch.Tensor:
    """(3, 3) float32 ``D diag(spacing)``: the LPS mm vector of one voxel step along i, j, k (columns)."""
    m = grid.direction_matrix @ np.diag(grid.spacing)
    return torch.as_tensor(m, dtype=torch.float32, device=dev)


def optimize_greedy(target: TargetPyramid, atlases: AtlasPyramid, matrices: torch.Tensor,
                    params: RegistrationParams, tick: Optional[Tick] = None,
                    ) -> tuple[torch.Tensor, Grid, torch.Tensor]:
    """The greedy tool's deformable algorithm (GreedyApproach::RunDeformable in pyushkevich/greedy's
    src/GreedyAPI.cxx, non-SVF mode; docs/registration.md "greedy-style optimiser") on our pyramids, warp
    and LNCC, batched over atlases. Returns as :func:`optimize_deformable`: (displacement (B, 3, ...) mm on
    the last working grid, that grid, similarity at the last iteration (B,)).

    Per level ``deform_shrink * v`` (the displacement ``d`` lives on that working grid; ``control_shrink``
    is not used), ``deform_iterations`` times, per atlas:

    1. ``g`` = gradient of the LNCC similarity (``similarity``, ``lncc_window``, ``greedy_lncc_eps``) with
       respect to ``d`` at every voxel (autograd through the one warp), written in voxels of the working grid
       (``g_vox = diag(s) D^T g_mm``, as greedy's voxel-unit fields);
    2. ``g`` smoothed by a Gaussian of ``greedy_sigma_pre`` voxels (greedy ``-s`` first value);
    3. scaled so that its largest vector is ``greedy_step`` voxels long (greedy ``-e``, time-step mode SCALE);
    4. composed: ``d <- g + d o (id + g)`` (target point p then takes the atlas value at
       ``A (p + g(p) + d(p + g(p)))``: the old map applied after the update, greedy's ``uk1 = viTemp + uk o viTemp``);
    5. ``d`` smoothed by a Gaussian of ``greedy_sigma_post`` voxels (greedy ``-s`` second value).

    Between levels ``d`` (mm) is resampled linearly onto the next working grid (greedy resamples its voxel-unit
    field and doubles it: the same displacement in mm). No bending/diffusion/folding terms: the two smoothings
    are the regularisation. Deterministic (no noise is added to the images, unlike greedy's NCC; see the docs).
    """
    dev = next(iter(target.levels.values()))[0].device
    b = matrices.shape[0]
    mats = matrices.to(dev, torch.float32)
    d: Optional[torch.Tensor] = None
    prev: Optional[Grid] = None
    sim = torch.zeros(b, dtype=torch.float64, device=dev)
    n_levels = len(params.deform_shrink)
    step = float(params.greedy_step)
    for level in range(n_levels):
        spacing = target.spacing(params.deform_shrink[level])
        n_it = int(params.deform_iterations[level])
        tgt, grid = target.levels[spacing]
        d = torch.zeros(b, 3, *grid.shape, device=dev) if d is None else resample_field(d, prev, grid)
        prev = grid
        if n_it == 0:
            continue
        p = grid_points(grid, dev).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, Z, Y, X) mm
        frame = _voxel_frame(grid, dev)  # voxel steps -> mm
        tmom = target_moments(params.similarity, tgt, params.lncc_window)
        for it in range(n_it):
            dd = d.detach().requires_grad_(True)
            warped = atlases.sample(spacing, mats, p + dd)
            dissim = similarity_loss(params.similarity, warped, tgt, params.lncc_window, tmom, params.greedy_lncc_eps)
            # per-atlas losses summed: each atlas's gradient is its own (the normalisation below is per atlas)
            (g_mm,) = torch.autograd.grad(dissim.sum(), dd)
            with torch.no_grad():
                # ascent direction of the similarity as a covector in voxel units: g_vox = (D S)^T (-g_mm)
                g_vox = torch.einsum("ji,bj...->bi...", frame, -g_mm)
                g_vox = gaussian_smooth(g_vox, params.greedy_sigma_pre)
                longest = g_vox.square().sum(1).amax(dim=(1, 2, 3)).sqrt()  # (B,) voxels
                scale = torch.where(longest > 0, step / longest.clamp_min(1e-30), torch.zeros_like(longest))
                g_vox = g_vox * scale.view(b, 1, 1, 1, 1)
                upd = torch.einsum("ij,bj...->bi...", frame, g_vox)  # voxel-unit displacement -> mm
                d = gaussian_smooth(compose(d, upd, grid), params.greedy_sigma_post)
            sim = 1.0 - dissim.detach()
            if tick is not None:
                tick(1, f"deformable level {level + 1}/{n_levels} it {it + 1}/{n_it}", {"similarity": sim.tolist()})
    if d is None:
        return None, None, sim
    return d.detach(), prev, sim.double()
