"""Registration of a set of atlases to one target: the orchestration behind ``masrefine register``.

The target and the atlases are :class:`~MASRefineLib.volume.Volume` s, normalised to [0, 1] once when read
(``sitk.Image`` s are still accepted and normalised here). For each batch of up to ``max_batch`` atlases:
build working grids (block-averaged pyramids, the torch warp on the working device), initialise the affine from image moments, optimise the affine, then the
deformable field, all atlases of the batch together on one device. Then per atlas the *total* field
on the target grid (affine composed with the deformable displacement, LPS mm) warps the original
atlas image and label map once. The result is a :class:`~MASRefineLib.warped.WarpedSet`.

Per-atlas ``info``: ``seconds`` (the batch's shared optimisation time divided among its atlases plus the
atlas's own preparation and final warp), ``similarity`` (the optimised similarity on the finest working
grid), ``ncc`` (global NCC of the warped atlas image and the target on the target grid),
``folding_fraction`` (fraction of target voxels where the total field's Jacobian determinant is <= 0)
and ``matrix`` (the affine, target LPS mm -> atlas LPS mm).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..device import resolve_device
from ..errors import MASRefineError
from ..fields import folding_fraction
from ..geometry import Grid
from ..labels import LabelTable, foreground_values, label_values
from ..losses import ncc
from ..progress import ProgressCallback, report
from ..volume import Volume, as_image_volume, as_label_volume
from ..warp import warp, warp_labels
from ..warped import WarpedAtlas, WarpedSet
from .affine import image_moments, initial_matrices, optimize_affine
from .deformable import optimize_deformable, total_field
from .params import RegistrationParams, get_params
from .pyramid import AtlasPyramid, TargetPyramid

STAGE = "register"


@dataclass
class AtlasInput:
    """One atlas to register: either ``image`` and ``label`` given, or ``load()`` returning them
    (read lazily, one batch at a time). ``source_*`` are the file paths recorded in the report. Images and labels
    are :class:`Volume` s (the image normalised when read, :func:`MASRefineLib.volume.read_image`) or
    ``sitk.Image`` s (normalised by :func:`register`)."""
    id: str
    image: Optional[Volume | sitk.Image] = None
    label: Optional[Volume | sitk.Image] = None
    load: Optional[Callable[[], tuple[Volume | sitk.Image, Volume | sitk.Image]]] = None
    source_image: Optional[str] = None
    source_label: Optional[str] = None

    def read(self) -> tuple[Volume | sitk.Image, Volume | sitk.Image]:
        if self.image is not None and self.label is not None:
            return self.image, self.label
        if self.load is None:
            raise MASRefineError(f"atlas {self.id}: no image/label given")
        return self.load()


def _check_image(image: Volume | sitk.Image, what: str) -> None:
    if isinstance(image, Volume):
        t = image.tensor
        if not bool(torch.isfinite(t).all()):
            raise MASRefineError(f"{what}: image contains NaN or infinite values")
        if float(t.max()) == float(t.min()):
            raise MASRefineError(f"{what}: image is constant (empty)")
        return
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MASRefineError(f"{what}: expected a 3D scalar image")
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all():
        raise MASRefineError(f"{what}: image contains NaN or infinite values")
    if float(arr.max()) == float(arr.min()):
        raise MASRefineError(f"{what}: image is constant (empty)")


def _fov_warning(atlas_id: str, atlas_grid: Grid, target_grid: Grid, ratio: float = 2.5) -> Optional[str]:
    """A warning when an atlas's field of view is wildly different from the target's (sorted extents
    differing by more than ``ratio`` along an axis), which affine initialisation may not overcome."""
    ea, et = np.sort(atlas_grid.extent_mm()), np.sort(target_grid.extent_mm())
    r = ea / np.maximum(et, 1e-6)
    if (r > ratio).any() or (r < 1.0 / ratio).any():
        return (f"atlas {atlas_id}: field of view {np.round(atlas_grid.extent_mm(), 1).tolist()} mm is very "
                f"different from the target's {np.round(target_grid.extent_mm(), 1).tolist()} mm; "
                f"registration may fail")
    return None


def _prepare_atlas(atlas: AtlasInput, label_table: Optional[LabelTable]) -> tuple[Volume, Volume]:
    """(normalised image, label values) of one atlas as :class:`Volume` s, checked."""
    image, label = atlas.read()
    _check_image(image, f"atlas {atlas.id} image")
    image, label = as_image_volume(image), as_label_volume(label)
    if not image.grid.isclose(label.grid):
        raise MASRefineError(f"atlas {atlas.id}: label map grid does not match the image grid")
    values = set(foreground_values(label.tensor))
    if not values:
        raise MASRefineError(f"atlas {atlas.id}: label map is empty")
    if label_table is not None:
        unknown = sorted(values - set(label_table))
        if unknown:
            raise MASRefineError(f"atlas {atlas.id}: label values {unknown[:8]} are not in the label table "
                                 f"(atlases must share one label table)")
    return image, label


def register(target: Volume | sitk.Image, atlases: Sequence[AtlasInput], label_table: Optional[LabelTable] = None,
             params: RegistrationParams | str = "default", device: str | torch.device = "auto",
             progress: Optional[ProgressCallback] = None, target_path: Optional[str] = None,
             ) -> WarpedSet:
    """Register every atlas to ``target`` and warp its image and labels onto the target grid.

    ``target``: a :class:`Volume` (normalised when read: :func:`MASRefineLib.volume.read_image`), taken as it is;
    an ``sitk.Image`` is normalised here.

    ``params`` is a preset name (``fast``, ``default``, ``accurate``) or a :class:`RegistrationParams`.
    An atlas that cannot be used (unreadable, empty, labels outside ``label_table``, non-finite result)
    is listed in ``WarpedSet.failed`` and the others still finish; warnings (e.g. very different
    fields of view) are collected in ``WarpedSet.info["warnings"]`` and issued with :mod:`warnings`.
    ``progress`` receives events of stage ``register`` and may raise Cancelled to stop.
    """
    if isinstance(params, str):
        params = get_params(params)
    params.validate()
    dev = resolve_device(device)
    torch.manual_seed(params.seed)
    t_start = time.perf_counter()
    _check_image(target, f"target {target_path or ''}".strip())
    target_vol = as_image_volume(target, dev)  # a Volume: as it is; sitk: normalised once, here
    target_grid = target_vol.grid
    deformable = params.stage == "deformable"
    floor = params.deform_min_unit_mm / min(target_grid.spacing)
    if deformable and floor > 1.0:  # the deformable levels' unit raised to deform_min_unit_mm (params.py)
        params = replace(params, deform_shrink=tuple(round(s * floor, 6) for s in params.deform_shrink),
                         control_shrink=tuple(round(s * floor, 6) for s in params.control_shrink),
                         deform_min_unit_mm=0.0)
    shrinks = list(params.affine_shrink) + (list(params.deform_shrink) if deformable else [])
    report(progress, STAGE, 0.0, "preparing target")
    tpyr = TargetPyramid(target_vol, shrinks, dev)
    spacings = list(tpyr.levels)
    radius = float(np.sqrt(np.trace(image_moments(target_vol)[1])))  # radius of gyration, mm
    target_norm = target_vol.batch()

    n_total = len(atlases)
    iters_per_batch = sum(params.affine_iterations) + (sum(params.deform_iterations) if deformable else 0)
    done = {"units": 0}
    total_units = max(1, n_total * (iters_per_batch + 1))

    results: list[WarpedAtlas] = []
    failed: list[dict[str, str]] = []
    warn_list: list[str] = []
    present: set[int] = set()
    timing = {"prepare": 0.0, "affine": 0.0, "deformable": 0.0, "warp": 0.0}  # seconds, all batches

    for start in range(0, n_total, params.max_batch):
        batch = list(atlases[start:start + params.max_batch])
        prepared = []
        t_prep = time.perf_counter()
        for a in batch:
            report(progress, STAGE, done["units"] / total_units, f"reading atlas {a.id}")
            t0 = time.perf_counter()
            try:
                norm, label = _prepare_atlas(a, label_table)
            except MASRefineError as e:
                failed.append({"id": a.id, "error": str(e)})
                warnings.warn(f"skipping atlas {a.id}: {e}")
                continue
            w = _fov_warning(a.id, norm.grid, target_grid)
            if w:
                warn_list.append(w)
                warnings.warn(w)
            prepared.append((a, norm, label, time.perf_counter() - t0))
        if not prepared:
            continue
        nb = len(prepared)
        t_opt = time.perf_counter()
        norms = [p[1] for p in prepared]
        apyr = AtlasPyramid(norms, spacings, dev)
        init = initial_matrices(target_vol, norms)

        def tick(n: int, message: str, data: dict, _nb=nb) -> None:
            done["units"] += n * _nb
            report(progress, STAGE, done["units"] / total_units, message, **data)

        t_aff = time.perf_counter()
        timing["prepare"] += t_aff - t_prep
        mats, sim = optimize_affine(tpyr, apyr, init, params, radius, tick)
        t_def = time.perf_counter()
        timing["affine"] += t_def - t_aff
        disp, cgrid = None, None
        if deformable:
            disp, cgrid, sim = optimize_deformable(tpyr, apyr, mats, params, tick)
        timing["deformable"] += time.perf_counter() - t_def
        shared_seconds = (time.perf_counter() - t_opt) / nb
        del apyr

        for i, (a, norm, label, prep_s) in enumerate(prepared):
            t0 = time.perf_counter()
            report(progress, STAGE, done["units"] / total_units, f"warping atlas {a.id}")
            try:
                field = total_field(mats[i:i + 1], None if disp is None else disp[i:i + 1], cgrid, target_grid)
                if not torch.isfinite(field).all():
                    raise MASRefineError(f"atlas {a.id}: registration diverged (non-finite field)")
                img = warp(norm.batch(dev), norm.grid, field, target_grid)
                lab = warp_labels(label.batch(dev), label.grid, field, target_grid)
                fold = float(folding_fraction(field, target_grid)[0]) if deformable else 0.0
                final_ncc = float(ncc(img, target_norm)[0])
            except MASRefineError as e:
                failed.append({"id": a.id, "error": str(e)})
                warnings.warn(f"skipping atlas {a.id}: {e}")
                continue
            lab_t = lab[0, 0].cpu()
            present |= set(label_values(lab_t))
            timing["warp"] += time.perf_counter() - t0
            seconds = shared_seconds + prep_s + (time.perf_counter() - t0)
            info = {"seconds": round(seconds, 3), "similarity": round(float(sim[i]), 5),
                    "similarity_kind": params.similarity if deformable else params.affine_similarity,
                    "ncc": round(final_ncc, 5), "folding_fraction": fold,
                    "matrix": mats[i].cpu().numpy().round(6).tolist()}
            if final_ncc < 0.2:
                msg = f"atlas {a.id}: low similarity after registration (ncc {final_ncc:.2f}); check the result"
                warn_list.append(msg)
                warnings.warn(msg)
            results.append(WarpedAtlas(a.id, img[0, 0].cpu(), lab_t, field[0].cpu(), a.source_image,
                                       a.source_label, info))
            done["units"] += 1
            report(progress, STAGE, done["units"] / total_units, f"atlas {a.id} done", atlas=a.id, **info)

    if not results:
        raise MASRefineError("no atlas could be registered: " + "; ".join(f"{f['id']}: {f['error']}" for f in failed))
    table = label_table if label_table is not None else LabelTable.from_values(present)
    info = {"params": params.to_json(), "device": str(dev), "seconds": round(time.perf_counter() - t_start, 3),
            "timing": {k: round(v, 3) for k, v in timing.items()}, "warnings": warn_list}
    report(progress, STAGE, 1.0, "done")
    return WarpedSet(target_grid, table, results, params.stage, target_path, info, failed)

