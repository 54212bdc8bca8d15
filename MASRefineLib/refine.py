"""VoteNet++ registration refinement (paper Eq. 3-6), batched over atlases (docs/refinement.md).

Per atlas of a pre-registered :class:`WarpedSet`, one more smooth displacement ``f`` (phi^-1(x) = x + f(x))
minimises (Eq. 3)::

    L(f) = [1 - NCC(A~_I o phi^-1, T_I)] + alpha * L_seg(S_src o phi^-1, S_tar) + gamma * L_reg(f)

``L_seg`` (Eq. 5): soft Dice of the surrogate segmenter's probabilities (variant ``IS``; ``I`` drops it), over
the structures it segments with validation Dice >= ``seg_min_dice`` (:func:`surrogate_structures`). ``L_reg``
(Eq. 6): bending energy (:func:`losses.bending_energy`). The image term is local NCC by default (``"ncc"``:
global, the paper).

Units: ``f`` is in **LPS millimetres** and its Hessian per millimetre, so ``L_reg`` is in **mm^-2** and
``gamma`` in **mm^2** (the same smoothness on every working grid and spacing). The paper's ``gamma = 20000``
is in the authors' normalised per-voxel units: :func:`gamma_from_paper` converts (about 0.4 mm^2 on the knee
grid); the default :data:`DEFAULT_GAMMA` (40 mm^2) was measured (docs/refinement.md).

Optimisation: ``f`` on working grids coarse to fine (:func:`default_spacings`), ``f = f_coarser + U(p)`` with
``p`` on a control grid ``control`` voxels apart and ``U`` trilinear upsampling, L-BFGS with a strong-Wolfe
line search, plus a folding barrier (weight ``folding_weight``, 0 = Eq. 3 exactly); the atlases of a batch
share one L-BFGS run on the sum of their (separable) losses. The result is composed with the pre-registration
(:func:`warp.compose`) and warps the *original* atlas image and label map once.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device
from .errors import MASRefineError
from .fields import folding_fraction
from .geometry import Grid
from .labels import label_values
from .losses import bending_energy, folding_barrier, similarity_loss, soft_dice_loss, target_moments
from .progress import ProgressCallback, report
from .protocol.jobs import REFINE_DEFAULTS
from .volume import read_image, read_label
from .warp import compose, grid_points, resample_field, sample, warp, warp_labels
from .warped import WarpedAtlas, WarpedSet, target_tensor

if TYPE_CHECKING:
    from .segmenter import UNetSegmenter

log = logging.getLogger(__name__)

VARIANTS = ("I", "IS")
DEFAULT_ALPHA: float = REFINE_DEFAULTS["alpha"]
#: gamma in mm^2 (module docstring; measured, docs/refinement.md)
DEFAULT_GAMMA: float = REFINE_DEFAULTS["gamma"]
#: voxels of the finest working grid at most (:func:`default_spacings`; docs/refinement.md, "Working grids by
#: voxel budget")
DEFAULT_MAX_VOXELS = 1_500_000
#: L-BFGS iterations per level, coarse to fine (docs/refinement.md, "Iterations")
DEFAULT_ITERATIONS: tuple[int, ...] = REFINE_DEFAULTS["iterations"]
#: control-point spacing of the field's parameterisation, in voxels of each level
DEFAULT_CONTROL = 2
#: weight of the folding barrier (dimensionless; 0 = Eq. 3 exactly), see :func:`folding_barrier`
DEFAULT_FOLDING_WEIGHT = 10.0
#: image similarity of Eq. 4: "lncc" (local NCC over LNCC_WINDOW voxels of each level, default) or "ncc"
#: (global, the paper); docs/refinement.md, "The LNCC floor"
SIMILARITIES = ("ncc", "lncc")
DEFAULT_SIMILARITY = "lncc"
LNCC_WINDOW = 5
#: atlases per L-BFGS run (measured on one CPU thread, docs/refinement.md)
DEFAULT_BATCH = 2


# ----------------------------------------------------------------------------------- units: the paper's gamma
#: for a smooth field with no preferred direction, (pure + 32 x mixed) / (pure + 2 x mixed) of the
#: squared second derivatives: <n_a^4> = 1/5, <n_a^2 n_b^2> = 1/15 over directions -> (9 + 96) / (9 + 6)
_ISOTROPIC_WIDE_MIXED_RATIO = 7.0


def gamma_from_paper(gamma_paper: float, grid: Grid) -> float:
    """Our ``gamma`` (mm^2) equivalent to the paper's ``gamma`` on the paper's image ``grid``:
    ``gamma_paper * (7 / 27) * s^4 * mean_c((n_c / min n)^2 / L_c^2)`` with ``s`` the (geometric mean) spacing
    and ``L_c = (n_c - 1) s_c / 2`` mm (derivation: docs/refinement.md, "Units of f and gamma"). On the knee
    grid (0.7 mm, 160 x 200 x 200) 20000 gives about 0.40 mm^2."""
    n = np.asarray(grid.size, dtype=np.float64)
    sp = np.asarray(grid.spacing, dtype=np.float64)
    s = float(np.prod(sp) ** (1.0 / 3.0))
    half = (n - 1.0) * sp / 2.0
    w = (n / n.min()) ** 2
    return float(gamma_paper * _ISOTROPIC_WIDE_MIXED_RATIO / 27.0 * s ** 4 * np.mean(w / half ** 2))


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RefineSettings:
    """Everything that decides a refinement (stored in the output's report)."""
    variant: str = "IS"
    alpha: float = DEFAULT_ALPHA
    gamma: float = DEFAULT_GAMMA          # mm^2
    spacings_mm: tuple[float, ...] = ()   # working grids, coarse to fine (LPS mm); () = default factors
    iterations: tuple[int, ...] = DEFAULT_ITERATIONS
    control: int = DEFAULT_CONTROL        # control points every `control` voxels of each level
    batch_size: int = DEFAULT_BATCH
    folding_weight: float = DEFAULT_FOLDING_WEIGHT
    similarity: str = DEFAULT_SIMILARITY  # Eq. 4's image term: "lncc" or "ncc" (global, the paper)
    seg_min_dice: float = 0.0             # IS: structures below this surrogate validation Dice left out of L_seg
    seg_structures: tuple[int, ...] | None = None  # IS: label values in L_seg (None: all, or variant I)

    def to_json(self) -> dict:
        return {"variant": self.variant, "alpha": self.alpha, "gamma_mm2": self.gamma,
                "spacings_mm": list(self.spacings_mm), "iterations": list(self.iterations), "control": self.control,
                "batch_size": self.batch_size, "folding_weight": self.folding_weight, "similarity": self.similarity,
                "segmentation_min_dice": self.seg_min_dice,
                "segmentation_structures": None if self.seg_structures is None else list(self.seg_structures)}


def default_spacings(grid: Grid, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[float, float]:
    """Default working-grid spacings (mm), coarse to fine: ``(2 f s, f s)`` with ``s`` the target's
    (geometric-mean) spacing and ``f`` the smallest of 1, 2, 4, ... for which the finest grid has at most
    ``max_voxels`` voxels; so the cost is bounded and small or coarse images are refined at their own resolution."""
    s = float(np.prod(grid.spacing) ** (1.0 / 3.0))
    n = float(np.prod(grid.size))
    f = 1.0
    while n / f ** 3 > max_voxels:
        f *= 2.0
    return (2.0 * f * s, f * s)


def working_grids(grid: Grid, spacings_mm: Sequence[float] | None = None) -> list[Grid]:
    """The refinement pyramid over ``grid``'s field of view, coarse to fine (``spacings_mm`` in mm; default
    :func:`default_spacings`); a level finer than ``grid`` is ``grid`` itself."""
    if not spacings_mm:
        spacings_mm = default_spacings(grid)
    out = []
    for sp in spacings_mm:
        if not (float(sp) > 0):
            raise MASRefineError(f"working spacing {sp} mm must be positive")
        g = grid.with_spacing(float(sp))
        if any(a > b for a, b in zip(g.size, grid.size)):
            g = grid
        if min(g.size) < 4:
            raise MASRefineError(f"working spacing {sp} mm is too coarse for a {grid.size} grid "
                                 f"(fewer than 4 voxels along an axis)")
        out.append(g)
    return out


def _box(x: torch.Tensor, k: int) -> torch.Tensor:
    """Separable box filter of odd width ``k`` voxels (replicate border) on every channel of (B, C, Z, Y, X)."""
    r = k // 2
    for axis in range(3):
        if x.shape[2 + axis] <= r:
            continue
        ks = [1, 1, 1]
        ks[axis] = k
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.avg_pool3d(F.pad(x, pad, mode="replicate"), tuple(ks), stride=1)
    return x


def _resample(x: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """Resample onto ``dst`` with the one warp; when ``dst`` is coarser, first low-pass with a box of odd
    width ~ the spacing ratio (3 voxels for 2x, 5 for 4x) so a coarse level is not aliased."""
    if src == dst:
        return x
    ratio = min(dst.spacing) / max(src.spacing)
    if ratio > 1.5:
        x = _box(x, 2 * int(ratio // 2) + 1)
    return warp(x, src, None, dst, padding="border")


def staggered(grid: Grid) -> Grid:
    """``grid`` shifted by half a voxel along every axis: its voxel centres are the corners of ``grid``'s cells.

    The moving maps of a level are stored on the staggered grid and sampled at the level's voxel centres
    plus ``f``. At ``f = 0`` every sample then sits in the middle of a cell, where trilinear interpolation
    is smooth. Stored on the level grid itself, every sample would sit exactly on a node, where trilinear
    interpolation of a sharp map (a U-Net's nearly binary probabilities) has a kink in every direction: the
    one-sided gradient there is no descent direction and the line search stalls at ``f = 0``."""
    d = grid.direction_matrix
    origin = np.asarray(grid.origin) + d @ (np.asarray(grid.spacing) / 2.0)
    return Grid(grid.size, grid.spacing, tuple(float(o) for o in origin), grid.direction)


# ------------------------------------------------------------------------------------------- the optimisation
@dataclass
class _Terms:
    similarity: torch.Tensor  # 1 - LNCC or 1 - NCC, (B,)
    segmentation: torch.Tensor | None  # soft Dice loss, (B,)
    bending: torch.Tensor  # mm^-2, (B,)
    folding: torch.Tensor | None = None  # folding barrier, (B,)


def _control_shape(shape: Sequence[int], control: int) -> tuple[int, ...]:
    """Control-grid shape: a node every ``control`` voxels, first and last on the level's corner voxels."""
    c = max(1, int(control))
    return tuple((int(n) - 1 + c - 1) // c + 1 for n in shape)


def _expand(q: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear upsampling of control-grid displacements (B, 3, ...) to the level grid (corners aligned)."""
    if tuple(q.shape[2:]) == tuple(shape):
        return q
    return F.interpolate(q, size=tuple(shape), mode="trilinear", align_corners=True)


def _first_step_scale(base: torch.Tensor, loss_fn, control_shape: Sequence[int], move_mm: float) -> torch.Tensor:
    """Per-atlas scales ``c`` (B, 1, 1, 1, 1) for the parameterisation ``f = base + U(c p)`` such that
    L-BFGS's first step (``-min(1, 1/|grad|_1) grad`` in ``p``) moves every atlas's field by about
    ``move_mm`` at its largest. Without it that step is ~1e-4 mm (the loss is a mean over voxels), below
    float32 resolution of the loss, and the line search gives up. Later steps are scaled by L-BFGS itself."""
    q = torch.zeros((base.shape[0], 3, *control_shape), device=base.device, dtype=base.dtype, requires_grad=True)
    with torch.enable_grad():
        loss_fn(base + _expand(q, base.shape[2:])).sum().backward()
    h = q.grad                                       # gradient w.r.t. p at c = 1
    with torch.no_grad():
        move = _expand(h, base.shape[2:]).norm(dim=1).flatten(1).max(1).values.clamp(min=1e-20)  # |U h|_inf
    h1 = h.abs().flatten(1).sum(1)
    # c_b = k / sqrt(move_b) gives every atlas the same first move; k sets it to move_mm
    s = (h1 / move.sqrt()).sum()
    k = move_mm * s if move_mm * s * s >= 1.0 else math.sqrt(move_mm)
    return (k / move.sqrt()).view(-1, 1, 1, 1, 1).detach()


def level_target(x: torch.Tensor, src: Grid, level: Grid) -> torch.Tensor:
    """A target map on a level, interpolated exactly like the moving maps at ``f = 0`` (resampled onto the
    :func:`staggered` grid, then sampled at the level's voxel centres), so both carry the same blur and the
    similarity has no incentive to deform one to sharpen or soften it."""
    sg = staggered(level)
    return sample(_resample(x, src, sg), sg, grid_points(level, x.device).unsqueeze(0), padding="border")


def optimise_field(moving: torch.Tensor, moving_grid: Grid, target: Sequence[torch.Tensor], levels: Sequence[Grid],
                   moving_seg: torch.Tensor | None = None, seg_grid: Grid | None = None,
                   target_seg: Sequence[torch.Tensor] | None = None,
                   alpha: float = DEFAULT_ALPHA, gamma: float = DEFAULT_GAMMA,
                   iterations: Sequence[int] = DEFAULT_ITERATIONS, control: int = DEFAULT_CONTROL,
                   folding_weight: float = DEFAULT_FOLDING_WEIGHT, similarity: str = DEFAULT_SIMILARITY,
                   progress: ProgressCallback | None = None, stage: str = "refine",
                   fraction: tuple[float, float] = (0.0, 1.0), ids: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
    """Minimise Eq. 3 for a batch of warped atlases; returns (f on ``levels[-1]`` (B, 3, ...) mm, terms).

    ``moving``: warped atlas images (B, 1, ...) on ``moving_grid``; ``target``: the target image (1, 1, ...)
    on every level; ``moving_seg`` (B, K+1, ...) on ``seg_grid`` and ``target_seg`` (1, K+1, ...) per level:
    the segmenter's probabilities (None: variant I). ``gamma`` in mm^2. Per level the moving maps are
    resampled onto the :func:`staggered` level grid.
    Returns the per-atlas loss terms before and after (finest level) as lists of floats. The arguments are
    :func:`resolve_settings`'s (checked there: one iteration count per level, at least one level).
    """
    use_seg = moving_seg is not None
    b = moving.shape[0]

    def _total(t: _Terms) -> torch.Tensor:
        loss = t.similarity + float(gamma) * t.bending
        if t.folding is not None:
            loss = loss + float(folding_weight) * t.folding
        if use_seg:
            loss = loss + float(alpha) * t.segmentation
        return loss

    total_iters = max(1, sum(int(i) for i in iterations))
    done = 0
    f = None
    for li, g in enumerate(levels):
        sg = staggered(g)
        channels = [_resample(moving, moving_grid, sg)]
        if use_seg:  # structures only (background is unused by Eq. 5)
            channels.append(_resample(moving_seg[:, 1:], seg_grid or moving_grid, sg))
        mov = torch.cat(channels, 1)
        tgt = target[li]
        tmom = target_moments(similarity, tgt, LNCC_WINDOW)  # lncc: the target's half, once per level
        tseg = target_seg[li] if use_seg else None
        pts = grid_points(g, mov.device).unsqueeze(0)
        if f is None:
            f = torch.zeros((b, 3, *g.shape), device=mov.device)
        else:
            f = resample_field(f, levels[li - 1], g)
        spacing = g.spacing

        def evaluate(field: torch.Tensor) -> _Terms:
            w = sample(mov, sg, pts + field.permute(0, 2, 3, 4, 1), padding="border")
            sim = similarity_loss(similarity, w[:, :1], tgt, LNCC_WINDOW, tmom)
            seg = None
            if use_seg:
                # channels 1.. of w are the structures (0 is the image); Eq. 5 runs over structures only
                seg = soft_dice_loss(w[:, 1:], tseg[:, 1:].expand(b, -1, -1, -1, -1))
            fold = folding_barrier(field, g, stride=control) if folding_weight > 0 else None
            return _Terms(sim, seg, bending_energy(field, spacing), fold)

        n_it = int(iterations[li])
        if n_it <= 0:
            continue
        base = f.detach()
        cshape = _control_shape(g.shape, control)
        scale = _first_step_scale(base, lambda fc: _total(evaluate(fc)), cshape, 0.5 * float(min(g.spacing)))
        p = torch.zeros((b, 3, *cshape), device=base.device, dtype=base.dtype, requires_grad=True)

        def field(q: torch.Tensor) -> torch.Tensor:
            return base + _expand(q * scale, g.shape)
        opt = torch.optim.LBFGS([p], lr=1.0, max_iter=n_it, max_eval=int(n_it * 1.25) + 1, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-12)
        count = [0]
        level_msg = f"level {li + 1}/{len(levels)}"

        def closure():
            opt.zero_grad()
            t = evaluate(field(p))
            loss = _total(t)
            total = loss.sum()
            total.backward()
            count[0] += 1
            if count[0] % 10 == 1:
                report(progress, stage, fraction[0] + (fraction[1] - fraction[0]) * (done + min(count[0], n_it)) / total_iters,
                       f"{level_msg} evaluation {count[0]}", atlases=list(ids), loss=loss.detach().cpu().tolist(),
                       similarity=t.similarity.detach().cpu().tolist(),
                       segmentation=None if t.segmentation is None else t.segmentation.detach().cpu().tolist(),
                       bending=t.bending.detach().cpu().tolist())
            return total

        opt.step(closure)
        done += n_it
        with torch.no_grad():
            f = field(p)
    with torch.no_grad():
        after = evaluate(f)  # on the finest level
        before = evaluate(torch.zeros_like(f))

    def lst(x):
        return None if x is None else [float(v) for v in x.detach().cpu()]

    terms = {"similarity_before": lst(before.similarity), "similarity_after": lst(after.similarity),
             "segmentation_before": lst(before.segmentation), "segmentation_after": lst(after.segmentation),
             "bending_after_mm-2": lst(after.bending)}
    return f.detach(), terms


#: validation Dice of the surrogate U-Net below which IS refinement is expected to hurt (docs/refinement.md);
#: per structure it decides which structures enter L_seg (:func:`surrogate_structures`)
SURROGATE_MIN_DICE = 0.5


def surrogate_structures(segmenter, min_dice: float = SURROGATE_MIN_DICE) -> list[int] | None:
    """The segmenter's structure channels (1..K, its class order) whose stored per-label validation Dice is at
    least ``min_dice``: the structures L_seg (Eq. 5) is taken over. A structure the surrogate cannot segment
    gives the soft Dice a wrong target, so it would pull the atlas away from its (better) registration.
    None (all structures, as the paper) when ``min_dice`` <= 0 or the segmenter stores no per-label Dice."""
    per = ((getattr(segmenter, "meta", None) or {}).get("validation") or {}).get("dice_per_label")
    values = getattr(segmenter, "label_values", None)
    if float(min_dice) <= 0 or not per or values is None:
        return None
    return [c for c, v in enumerate(values) if c > 0 and float(per.get(str(int(v)), 0.0)) >= float(min_dice)]


def surrogate_warning(segmenter, structures: Sequence[int] | None = None) -> str | None:
    """A one-line warning when the surrogate segmenter's stored validation Dice is below
    :data:`SURROGATE_MIN_DICE` (IS would pull the atlases towards a poor segmentation), else None.
    ``structures``: the channels kept by :func:`surrogate_structures` (named in the message)."""
    val = (getattr(segmenter, "meta", None) or {}).get("validation") or {}
    dice = val.get("mean_dice")
    if dice is None or dice >= SURROGATE_MIN_DICE:
        return None
    n_all = len(getattr(segmenter, "label_values", None) or [0]) - 1
    kept = "" if structures is None else (
        f"; L_seg uses only the {len(structures)} of {n_all} structures it segments with Dice >= "
        f"{SURROGATE_MIN_DICE}" if structures else "; no structure reaches Dice "
        f"{SURROGATE_MIN_DICE}, so IS runs as I")
    return (f"the surrogate segmenter's validation Dice is {dice:.3f} (below {SURROGATE_MIN_DICE}){kept}: refinement "
            f"IS may make the atlases worse; train it longer ('masrefine train segmenter ATLAS_DIR --epochs N') "
            f"or use refinement I")


def resolve_settings(grid: Grid, variant: str = "IS", *, alpha: float = DEFAULT_ALPHA, gamma: float = DEFAULT_GAMMA,
                     iterations: Sequence[int] | int | None = None, spacings_mm: Sequence[float] | None = None,
                     control: int = DEFAULT_CONTROL, batch_size: int = DEFAULT_BATCH,
                     folding_weight: float = DEFAULT_FOLDING_WEIGHT, similarity: str = DEFAULT_SIMILARITY,
                     segmenter: UNetSegmenter | None = None, seg_min_dice: float = SURROGATE_MIN_DICE,
                     ) -> tuple[RefineSettings, list[Grid], list[int] | None]:
    """:func:`refine`'s arguments checked and its defaults resolved on the target ``grid``: the settings it
    records (``RefineSettings``, spacings in mm as resolved), its working grids (coarse to fine) and the
    segmenter channels of L_seg (:func:`surrogate_structures`; None = all, or variant I). The one place
    refinement settings are decided, so a caller (a cache check, a report) sees exactly what ``refine`` runs.
    Raises :class:`MASRefineError` naming the bad value."""
    variant = str(variant).upper()
    if variant not in VARIANTS:
        raise MASRefineError(f"unknown refinement variant {variant!r} (expected I or IS)")
    if variant == "IS" and segmenter is None:
        raise MASRefineError("refinement variant IS needs a segmenter (train one with "
                             "'masrefine train segmenter ATLAS_DIR', or use variant I)")
    if similarity not in SIMILARITIES:
        raise MASRefineError(f"unknown refinement similarity {similarity!r} (expected ncc or lncc)")
    if gamma < 0 or alpha < 0 or folding_weight < 0:
        raise MASRefineError(f"alpha ({alpha}), gamma ({gamma}) and the folding weight ({folding_weight}) must be "
                             f"non-negative")
    levels = working_grids(grid, spacings_mm)
    if iterations is None:
        iterations = DEFAULT_ITERATIONS if len(levels) == len(DEFAULT_ITERATIONS) else \
            [DEFAULT_ITERATIONS[-1]] * len(levels)
    if isinstance(iterations, (int, np.integer)):
        iterations = [int(iterations)] * len(levels)
    iterations = [int(i) for i in iterations]
    if len(iterations) != len(levels):
        raise MASRefineError(f"{len(iterations)} iteration counts for {len(levels)} working grids")
    structures = surrogate_structures(segmenter, seg_min_dice) if variant == "IS" else None
    values = getattr(segmenter, "label_values", None)
    used = None if structures is None or values is None else tuple(int(values[c]) for c in structures)
    settings = RefineSettings(variant, float(alpha), float(gamma), tuple(min(g.spacing) for g in levels),
                              tuple(iterations), int(control), int(batch_size), float(folding_weight),
                              similarity, float(seg_min_dice) if variant == "IS" else 0.0, used)
    return settings, levels, structures


# ------------------------------------------------------------------------------------- the public entry point
def refine(warped: WarpedSet, target_image, variant: str = "IS", *, segmenter: UNetSegmenter | None = None,
           device: str | torch.device = "auto", progress: ProgressCallback | None = None,
           on_atlas: Callable[[WarpedAtlas, WarpedAtlas], WarpedAtlas] | None = None, consume: bool = False,
           **settings: Any) -> WarpedSet:
    """Refine every atlas of ``warped`` towards ``target_image``; returns a new :class:`WarpedSet`
    (stage ``refined-I`` / ``refined-IS``). ``settings``: :func:`resolve_settings`'s keyword arguments
    (``alpha`` ... ``seg_min_dice`` below), its defaults where left out.

    Parameters
    ----------
    warped: the pre-registered atlases on the target grid (total fields in LPS mm).
    target_image: the target as a :class:`~MASRefineLib.volume.Volume` on ``warped.target_grid`` (normalised when
        read, taken as it is), an already normalised (Z, Y, X) array / tensor on that grid, or an ``sitk.Image`` or
        a file path (resampled onto the grid if needed and normalised: :func:`warped.target_tensor`).
    variant: ``"I"`` (image term + bending) or ``"IS"`` (+ alpha x soft Dice of the segmenter's predictions).
    alpha: weight of the segmentation term (dimensionless; paper 3).
    gamma: weight of the bending energy, in **mm^2** (:func:`gamma_from_paper` converts the paper's value).
    iterations: L-BFGS iterations per working grid (coarse to fine), or one number for every level.
    spacings_mm: working-grid spacings (mm), coarse to fine; default :func:`default_spacings`.
    control: control-point spacing (voxels of each level) of ``f = U(p)``; 1 = one displacement per voxel.
    folding_weight: weight of the folding barrier (:func:`folding_barrier`, dimensionless; 0 = Eq. 3 exactly).
    segmenter: needed for ``"IS"``: anything with ``predict(images, grid, out_grid)`` giving class probabilities
        (B, K+1, *out_grid.shape), channel 0 background (:class:`~MASRefineLib.segmenter.UNetSegmenter`).
    batch_size: atlases optimised together (memory grows linearly with it).
    progress: callback; may raise :class:`Cancelled` (checked every 10 iterations and between atlases).
    similarity: Eq. 4's image term, ``"lncc"`` (over :data:`LNCC_WINDOW` voxels) or ``"ncc"`` (global, the paper).
    seg_min_dice: IS takes L_seg over the structures the segmenter segments with at least this validation
        Dice (:func:`surrogate_structures`); 0 = all structures, as the paper.
    on_atlas: called as ``on_atlas(refined, registered)`` once each atlas is refined (in atlas order); what it
        returns is kept in the result instead of ``refined``: e.g. the pipeline writes the atlas's files and keeps
        it without its field (#22: a run then holds one field at a time, not one per atlas).
    consume: free each atlas of ``warped`` once it is refined (its tensors become empty: the caller no longer
        needs the registered set), so the registered and refined sets are never both held whole.

    Each atlas's original files are warped with the composed field (one interpolation); without readable
    sources its warped image/labels are warped again (two interpolations; noted in its info).

    Each output atlas's ``info`` holds ``folding_fraction`` (of the composed field), ``seconds`` (wall clock
    of refinement per atlas: its share of the batch's optimisation plus its own re-warp) and
    ``refinement``: the settings, loss terms before/after, folding fraction of the refinement field alone
    (on the finest working grid), its largest displacement (mm), ``cpu_seconds`` (as ``seconds``, in CPU
    time of this process).
    """
    settings, levels, structures = resolve_settings(warped.target_grid, variant, segmenter=segmenter, **settings)
    variant = settings.variant
    if variant == "IS" and (msg := surrogate_warning(segmenter, structures)):
        log.warning(msg)
    if not warped.atlases:
        raise MASRefineError("nothing to refine: the registered set has no atlases")
    dev = resolve_device(device)
    grid = warped.target_grid
    use_seg = variant == "IS" and structures != []

    def kept(p: torch.Tensor) -> torch.Tensor:
        """Background and the structures of L_seg (fewer channels to resample and sample, too)."""
        return p if structures is None else p[:, [0, *structures]]

    target = target_tensor(target_image, grid, dev)
    fine = levels[-1]
    with torch.no_grad():
        target_levels = [level_target(target, grid, g) for g in levels]
        tseg_levels = None
        if use_seg:
            report(progress, "refine", 0.0, "segmenting the target")
            tseg = kept(segmenter.predict(target, grid, staggered(fine))).to(dev)
            tseg_levels = [level_target(tseg, staggered(fine), g) for g in levels]

    n = len(warped.atlases)
    out_atlases: list[WarpedAtlas] = []
    failed = list(warped.failed)
    for s0 in range(0, n, max(1, settings.batch_size)):
        chunk = list(range(s0, min(n, s0 + max(1, settings.batch_size))))
        t0, c0 = time.perf_counter(), time.process_time()
        frac = (chunk[0] / n, (chunk[-1] + 1) / n)
        ids = [warped.atlases[i].id for i in chunk]
        report(progress, "refine", frac[0], f"atlases {', '.join(ids)}")
        with torch.no_grad():
            images = torch.stack([warped.atlases[i].image_tensor for i in chunk]).unsqueeze(1).to(dev)
            seg_grid = staggered(fine)
            mseg = kept(segmenter.predict(images, grid, seg_grid)).to(dev) if use_seg else None
        f, terms = optimise_field(images, grid, target_levels, levels, mseg, seg_grid, tseg_levels, settings.alpha,
                                  settings.gamma, settings.iterations, settings.control, settings.folding_weight,
                                  settings.similarity, progress, "refine", frac, ids)
        del images, mseg
        t_opt, c_opt = time.perf_counter() - t0, time.process_time() - c0
        for j, i in enumerate(chunk):
            t1, c1 = time.perf_counter(), time.process_time()
            a = warped.atlases[i]
            with torch.no_grad():
                f_t = resample_field(f[j:j + 1], fine, grid)
                prior = a.field_tensor.unsqueeze(0).to(dev)
                total = compose(prior, f_t, grid)
                image, label, how = _rewarp(a, total, f_t, grid, warped, dev)
                fold = float(folding_fraction(total, grid)[0])
                # the refinement field alone, on its finest working grid (8x fewer voxels than the target's;
                # the target-grid field is its trilinear interpolation): saves a full-size Jacobian per atlas
                fold_ref = float(folding_fraction(f[j:j + 1], fine)[0])
                max_mm = float(f[j:j + 1].pow(2).sum(1).max().sqrt())  # of the nodes = of the interpolation
            seconds = t_opt / len(chunk) + (time.perf_counter() - t1)
            cpu = c_opt / len(chunk) + (time.process_time() - c1)
            info = dict(a.info)
            info.update({"folding_fraction": fold, "seconds": seconds,
                         "pre_refinement": {k: a.info[k] for k in ("folding_fraction", "seconds") if k in a.info},
                         "refinement": {**settings.to_json(),
                                        **{k: (None if v is None else v[j]) for k, v in terms.items()},
                                        "folding_fraction_refinement_only": fold_ref, "max_displacement_mm": max_mm,
                                        "cpu_seconds": cpu,
                                        "resampled_from": how}})
            ra = WarpedAtlas(a.id, image, label, total[0], a.source_image, a.source_label, info)
            del image, label, total
            if on_atlas is not None:
                ra = on_atlas(ra, a)
            if consume:
                a.image_tensor = a.label_tensor = a.field_tensor = torch.empty(0)
            out_atlases.append(ra)
        report(progress, "refine", frac[1], f"done {', '.join(ids)}")
    return WarpedSet(grid, warped.label_table, out_atlases, f"refined-{variant}", warped.target_path,
                     {**warped.info, "refinement": settings.to_json(), "pre_refinement_stage": warped.stage},
                     failed)


def _rewarp(a: WarpedAtlas, total: torch.Tensor, f_t: torch.Tensor, grid: Grid, warped: WarpedSet,
            dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Warped image and label map of one atlas under the composed field (from the original files), or, when
    those are unavailable, the pre-registered ones warped again by the refinement."""
    values = sorted(set(int(v) for v in warped.label_table) | {0})
    if a.source_image and a.source_label and os.path.exists(a.source_image) \
            and os.path.exists(a.source_label):
        img = read_image(a.source_image, dev)  # read and normalised once, as every image (volume.read_image)
        lab = read_label(a.source_label, dev)
        src_grid = img.grid
        if not lab.grid.isclose(src_grid):
            raise MASRefineError(f"{a.source_label}: label grid does not match its image {a.source_image}")
        image = warp(img.batch(), src_grid, total, grid)
        present = sorted(set(label_values(lab.tensor)) | {0})
        label = warp_labels(lab.batch(), src_grid, total, grid, values=present)
        how = "source"
    else:
        image = warp(a.image_tensor[None, None].to(dev), grid, f_t, grid)
        label = warp_labels(a.label_tensor[None, None].to(dev), grid, f_t, grid, values=values)
        how = "pre-registered (two interpolations: original atlas files unavailable)"
    return image[0, 0], label[0, 0], how
