"""Built-in sample data: a small knee-like phantom atlas set and target, generated offline in seconds.

Every subject is a set of implicit shapes (signed distance functions in millimetres) evaluated at
the voxel centres of a small grid (default 64^3 voxels of 1.4 mm, identity direction, LPS):

- **femur**: a shaft smoothly joined to a metaphyseal flare and two condyles (medial/lateral
  ellipsoids) with an intercondylar notch;
- **femoral cartilage**: a layer of varying thickness (about 2-3.5 mm) on the distal and posterior
  condyle surface, not in the notch;
- **tibia**: a plateau with a posterior slope and two shallow concave compartments, joined to a shaft;
- **tibial cartilage**: a layer on each compartment under the condyles;
- unlabelled anatomy that appears in the image: patella, menisci, joint fluid, Hoffa's fat pad,
  muscle with fat streaks, subcutaneous fat and the skin outline of the leg.

Subjects differ in size (global and per structure), condyle spacing and shape, plateau slope,
cartilage thickness, knee flexion (a rotation of the femur about the condyle axis), position and
orientation in the field of view (a small rigid motion) and a smooth random deformation (about
2 mm). The appearance is MR-like (DESS-like tissue intensities as in ``shared/tools/synth_knee.py``,
tissue texture, partial-volume blur, a multiplicative bias field and Rician noise), intensities in
[0, 1].

Labels: 1 femur, 2 femoral cartilage, 3 tibia, 4 tibial cartilage (colours as in ``synth_knee.py``).

:func:`make_sample` writes an atlas set (``atlas.json`` with ``schema_version``, ``labels`` and
``atlases`` ``{id, image, label}`` relative to the folder) plus one or more targets with their
ground-truth label maps. Output is deterministic for a given seed, grid and subject index.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import MASRefineError
from .geometry import Grid
from .imageio import write_image
from .jsonio import read_json, write_json
from .progress import ProgressCallback, report
from .terminology import KNEE as KNEE_TERMINOLOGY

FEMUR, FEM_CART, TIBIA, TIB_CART = 1, 2, 3, 4
LABELS: dict[str, dict[str, Any]] = {
    "1": {"name": "femur", "color": [241, 214, 145]},
    "2": {"name": "femoral cartilage", "color": [111, 184, 210]},
    "3": {"name": "tibia", "color": [216, 101, 79]},
    "4": {"name": "tibial cartilage", "color": [128, 174, 128]},
}
for _label in LABELS.values():  # the knee's standard codes (SNOMED CT), shown by Slicer with each segment
    _label["terminology"] = KNEE_TERMINOLOGY[_label["name"]]
#: label groups for reporting (the paper's Table 1 columns)
GROUPS: dict[str, list[int]] = {"bone": [FEMUR, TIBIA], "cartilage": [FEM_CART, TIB_CART]}

SAMPLE_VERSION = 1          # bump when the generator changes (invalidates cached sample folders)
DEFAULT_SIZE = (64, 64, 64)  # voxels (x, y, z)
DEFAULT_SPACING = 1.4        # mm, isotropic


def sample_grid(size: tuple[int, int, int] = DEFAULT_SIZE, spacing: float = DEFAULT_SPACING) -> Grid:
    """The phantom's grid: ``size`` voxels (x, y, z) of ``spacing`` mm, identity direction, centred
    on the LPS origin (the knee joint line is near z = 0)."""
    size = tuple(int(s) for s in size)
    origin = tuple(-(s - 1) * spacing / 2.0 for s in size)
    return Grid(size, (float(spacing),) * 3, origin, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


# --------------------------------------------------------------------------- implicit shapes (mm)

def _ellipsoid(p: np.ndarray, c, r) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid (centre ``c``, radii ``r``)."""
    q = (p - np.asarray(c, np.float32)) / np.asarray(r, np.float32)
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / np.asarray(r, np.float32), axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _cylinder_z(p: np.ndarray, cx: float, cy: float, rx: float, ry: float, z0: float, z1: float) -> np.ndarray:
    """Signed distance (approximately, mm) to an elliptic cylinder along z between z0 < z1."""
    q = np.stack([(p[..., 0] - cx) / rx, (p[..., 1] - cy) / ry], -1)
    radial = (np.linalg.norm(q, axis=-1) - 1.0) * min(rx, ry)
    axial = np.maximum(z0 - p[..., 2], p[..., 2] - z1)
    return np.maximum(radial, axial)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed distances with blend radius ``k`` mm."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.minimum(a, b) - h * h * k * 0.25


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: float, amp: float) -> np.ndarray:
    """Zero-mean smooth Gaussian noise with standard deviation ``amp`` (computed at low resolution
    for large ``sigma_vox`` and upsampled, so it stays fast)."""
    factor = int(max(1, min(8, sigma_vox // 3)))
    small = tuple(shape) if factor == 1 else tuple(max(2, int(np.ceil(s / factor)) + 1) for s in shape)
    n = rng.standard_normal(small).astype(np.float32)
    n = ndimage.gaussian_filter(n, sigma_vox / factor, mode="reflect")
    if factor > 1:
        n = ndimage.zoom(n, [s / m for s, m in zip(shape, small)], order=1)[tuple(slice(0, s) for s in shape)]
    n -= n.mean()
    n /= n.std() + 1e-8
    return amp * n


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_parameters(rng: np.random.Generator) -> dict[str, Any]:
    """Random anatomy and pose of one subject (all lengths in mm, angles in radians)."""
    u = rng.uniform
    s = u(0.9, 1.08)                                  # global size
    return {
        "scale": s,
        "axis_scale": [u(0.95, 1.05), u(0.95, 1.05), u(0.96, 1.04)],
        "rotation": [u(-0.07, 0.07), u(-0.05, 0.05), u(-0.08, 0.08)],
        "translation": [u(-4, 4), u(-4, 4), u(-3, 3)],
        "flexion": u(-0.05, 0.16),                     # femur about the condyle axis (x)
        "condyle_sep": u(10.5, 13.0),                  # half distance between condyle centres
        "condyle_r": [u(8.5, 10.0), u(14.5, 17.5), u(10.5, 12.5)],
        "condyle_asym": u(-1.0, 1.0),                  # medial vs lateral size difference
        "condyle_y": u(2.0, 5.0),
        "femur_shaft_r": u(10.5, 12.5),
        "flare_r": [u(20.0, 24.0), u(14.0, 17.0), u(10.0, 13.0)],
        "fc_thick": u(2.2, 3.2),
        "tc_thick": u(2.0, 3.0),
        "joint_gap": u(0.0, 0.8),
        "plateau_r": [u(29.0, 34.0), u(21.0, 25.0)],
        "plateau_slope": u(0.03, 0.15),                # posterior tibial slope (rise per mm in y)
        "plateau_dip": u(0.8, 2.0),                    # depth of the concave compartments
        "tibia_shaft_r": u(11.0, 13.5),
        "patella": [u(-30.0, -26.0), u(16.0, 22.0)],   # (y, z) of its centre
        "leg_r": [u(37.0, 43.0), u(33.0, 38.0)],
        "deform_mm": u(1.2, 2.4),
    }


def _subject(grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One phantom subject: (image float32 in [0, 1], label uint8, parameters), arrays (z, y, x)."""
    P = subject_parameters(rng)
    shape = grid.shape
    vox = float(min(grid.spacing))
    # LPS mm of the voxel centres, (Z, Y, X, 3) as (x, y, z)
    m = grid.index_to_physical()
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    ijk = np.stack([ii, jj, kk], -1)
    world = (ijk @ m[:3, :3].T.astype(np.float32) + m[:3, 3].astype(np.float32))
    # subject pose: world = R @ diag(scale) @ anatomy + t  ->  anatomy = diag(1/scale) R^T (world - t)
    R = _rotation(*P["rotation"]).astype(np.float32)
    sc = (P["scale"] * np.asarray(P["axis_scale"])).astype(np.float32)
    p = ((world - np.asarray(P["translation"], np.float32)) @ R) / sc
    # smooth random deformation of the anatomy
    for a in range(3):
        p[..., a] += _smooth_noise(rng, shape, 10.0 / vox, P["deform_mm"])

    t_fc, t_tc, gap = P["fc_thick"], P["tc_thick"], P["joint_gap"]
    # ---- femur, in its own frame rotated (flexion) about the condyle axis
    cz = P["condyle_r"][2]                       # condyle centre height: condyles touch z = 0
    cy = P["condyle_y"]
    pivot = np.array([0.0, cy, cz], np.float32)
    fr = _rotation(P["flexion"], 0.0, 0.0).astype(np.float32)
    pf = (p - pivot) @ fr + pivot
    sep, asym = P["condyle_sep"], P["condyle_asym"]
    rx, ry, rz = P["condyle_r"]
    med = _ellipsoid(pf, (-sep, cy, cz), (rx + 0.5 * asym, ry + asym, rz + 0.3 * asym))
    lat = _ellipsoid(pf, (sep, cy, cz + 0.4 * asym), (rx - 0.5 * asym, ry - asym, rz - 0.3 * asym))
    condyles = _smin(med, lat, 3.0)
    flare = _ellipsoid(pf, (0.0, cy - 2.0, cz + 10.0), P["flare_r"])
    shaft = _cylinder_z(pf, 0.0, cy - 3.0, P["femur_shaft_r"], P["femur_shaft_r"] * 0.9, cz, 500.0)
    femur = _smin(_smin(condyles, flare, 6.0), shaft, 10.0)
    # femoral cartilage thickness varies smoothly over the surface
    t_fc_map = t_fc * (1.0 + _smooth_noise(rng, shape, 8.0 / vox, 0.12))
    notch = (np.abs(pf[..., 0]) < sep - rx * 0.45) & (pf[..., 1] > cy - 4.0)
    fem_cart = (femur > 0) & (femur <= t_fc_map) & (pf[..., 2] < cz + 6.0) & ~notch

    # ---- tibia: plateau top below the femoral cartilage
    ztop = -(t_fc + t_tc + gap)
    slope, dip = P["plateau_slope"], P["plateau_dip"]
    top = ztop - slope * (p[..., 1] - cy)
    for xc in (-sep, sep):
        top = top - dip * np.exp(-((p[..., 0] - xc) ** 2 + (p[..., 1] - cy) ** 2) / (2 * 7.0 ** 2))
    prx, pry = P["plateau_r"]
    plateau = np.maximum(_ellipsoid(p, (0.0, cy, ztop - 9.0), (prx, pry, 13.0)), p[..., 2] - top)
    tshaft = _cylinder_z(p, 0.0, cy + 2.0, P["tibia_shaft_r"], P["tibia_shaft_r"] * 0.9, -500.0, ztop - 8.0)
    tibia = _smin(plateau, tshaft, 12.0)
    t_tc_map = t_tc * (1.0 + _smooth_noise(rng, shape, 8.0 / vox, 0.12))
    comp = np.zeros(shape, bool)
    for xc in (-sep, sep):
        comp |= ((p[..., 0] - xc) / 11.5) ** 2 + ((p[..., 1] - cy) / 16.0) ** 2 < 1.0
    tib_cart = (tibia > 0) & (tibia <= t_tc_map) & (p[..., 2] > top - 1.0) & comp

    label = np.zeros(shape, np.uint8)
    label[tib_cart] = TIB_CART
    label[fem_cart] = FEM_CART
    label[tibia <= 0] = TIBIA
    label[femur <= 0] = FEMUR

    # ---- unlabelled anatomy
    patella = _ellipsoid(pf, (0.0, P["patella"][0], P["patella"][1]), (15.0, 6.5, 17.0)) <= 0
    bone = (femur <= 0) | (tibia <= 0) | patella
    cart = fem_cart | tib_cart
    pat_cart = (_ellipsoid(pf, (0.0, P["patella"][0] + 2.0, P["patella"][1]), (13.0, 7.0, 15.0)) <= 0) & ~patella
    menisc = np.zeros(shape, bool)
    for xc in (-sep, sep):
        r = np.sqrt(((p[..., 0] - xc) / 11.5) ** 2 + ((p[..., 1] - cy) / 16.0) ** 2)
        h = p[..., 2] - top
        menisc |= (r > 0.85) & (r < 1.35) & (h > 0) & (h < 7.0 * np.clip((r - 0.8) / 0.4, 0, 1))
    menisc &= ~bone & ~cart
    d_cart = ndimage.distance_transform_edt(~(cart | pat_cart)) * vox
    fluid = ~bone & ~cart & ~pat_cart & ~menisc & (d_cart <= 1.6) & (_smooth_noise(rng, shape, 2.0 / vox, 1.0) > -0.3)
    hoffa = (_ellipsoid(p, (0.0, -24.0, ztop + 3.0), (17.0, 9.0, 9.0)) <= 0) & ~bone & ~cart & ~fluid & ~menisc
    radius = np.sqrt((p[..., 0] / P["leg_r"][0]) ** 2 + ((p[..., 1] - cy) / P["leg_r"][1]) ** 2)
    radius = radius + _smooth_noise(rng, shape, 10.0 / vox, 0.03)
    leg = radius < 1.0
    subcut = leg & (radius > 1.0 - rng.uniform(0.08, 0.14))
    streaks = leg & (_smooth_noise(rng, shape, 3.0 / vox, 1.0) > rng.uniform(1.0, 1.5))
    cortex = bone & (ndimage.distance_transform_edt(bone) * vox <= 1.0)

    j = lambda v: v * rng.uniform(0.88, 1.12)
    img = np.full(shape, j(0.02), np.float32)                     # air
    img[leg] = j(0.30)                                            # muscle
    img[streaks | subcut | hoffa] = j(0.12)                       # (water-excited) fat
    img[fluid] = j(0.88)
    img[menisc] = j(0.08)
    img[bone] = j(0.18)                                           # fat-suppressed marrow
    img[cortex] = j(0.05)
    img[cart | pat_cart] = j(0.60)
    img *= 1.0 + _smooth_noise(rng, shape, 1.2 / vox, 0.06)       # tissue texture
    img[bone] *= 1.0 + _smooth_noise(rng, shape, 0.6, 0.12)[bone] # trabecular texture
    img = ndimage.gaussian_filter(img, 0.55)                      # partial volume / PSF
    img *= np.exp(_smooth_noise(rng, shape, 30.0 / vox, 0.15))    # bias field
    s = rng.uniform(0.02, 0.035)
    img = np.sqrt((img + rng.normal(0, s, shape)) ** 2 + rng.normal(0, s, shape) ** 2)  # Rician noise
    lo, hi = np.percentile(img, [0.1, 99.9])
    img = np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)
    return img, label, P


def _subject_rng(seed: int, name: str) -> np.random.Generator:
    h = int(hashlib.sha256(f"masrefine-knee-phantom:{SAMPLE_VERSION}:{seed}:{name}".encode()).hexdigest()[:16], 16)
    return np.random.default_rng(h)


def make_subject(name: str, seed: int = 0, size: tuple[int, int, int] = DEFAULT_SIZE,
                 spacing: float = DEFAULT_SPACING) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """One phantom subject as (image float32, label uint16, parameters) on :func:`sample_grid`.

    Deterministic for (``name``, ``seed``, grid)."""
    grid = sample_grid(size, spacing)
    img, lab, params = _subject(grid, _subject_rng(seed, name))
    return (grid.apply_to(sitk.GetImageFromArray(img)), grid.apply_to(sitk.GetImageFromArray(lab.astype(np.uint16))),
            params)


def _settings(n_atlases: int, n_targets: int, seed: int, size, spacing) -> dict[str, Any]:
    return {"generator": "MASRefineLib.sampledata", "version": SAMPLE_VERSION, "n_atlases": int(n_atlases),
            "n_targets": int(n_targets), "seed": int(seed), "size": [int(s) for s in size], "spacing": float(spacing),
            "labels": LABELS}  # a sample made before the labels changed (e.g. without terminology) is made again


def make_sample(out_dir: str | os.PathLike, n_atlases: int = 6, seed: int = 0, n_targets: int = 1,
                size: tuple[int, int, int] = DEFAULT_SIZE, spacing: float = DEFAULT_SPACING,
                progress: Optional[ProgressCallback] = None, force: bool = False) -> dict[str, Any]:
    """Write the phantom atlas set and target(s) under ``out_dir``; return their paths.

    Layout::

        out_dir/atlases/atlas.json                     the atlas set (labels + atlases, relative paths)
        out_dir/atlases/images/knee<NN>.nii.gz         atlas images (float32, [0, 1])
        out_dir/atlases/labels/knee<NN>.nii.gz         atlas label maps (uint16)
        out_dir/targets/target<NN>.nii.gz              target image(s)
        out_dir/truth/target<NN>.nii.gz                the targets' ground-truth label maps
        out_dir/sample.json                            settings, written last (a finished sample)

    Returns ``{"atlas_dir", "target", "truth", "targets", "truths", "labels", "groups"}`` with paths as
    strings (``target``/``truth`` are the first target). If ``out_dir`` already holds a finished
    sample with the same settings it is reused (``force=True`` regenerates). Deterministic: the same
    arguments give the same voxels. About 1 s per subject at the default 64^3 grid.
    """
    if n_atlases < 1 or n_targets < 1:
        raise ValueError("n_atlases and n_targets must be >= 1")
    out = Path(out_dir).resolve()
    settings = _settings(n_atlases, n_targets, seed, size, spacing)
    atlas_dir, tgt_dir, truth_dir = out / "atlases", out / "targets", out / "truth"
    atlas_ids = [f"knee{i + 1:02d}" for i in range(n_atlases)]
    target_ids = [f"target{i + 1:02d}" for i in range(n_targets)]
    result = {"atlas_dir": str(atlas_dir),
              "targets": [str(tgt_dir / f"{t}.nii.gz") for t in target_ids],
              "truths": [str(truth_dir / f"{t}.nii.gz") for t in target_ids],
              "labels": {int(k): v["name"] for k, v in LABELS.items()}, "groups": GROUPS}
    result["target"], result["truth"] = result["targets"][0], result["truths"][0]
    stamp = out / "sample.json"
    if not force and stamp.exists():
        try:
            d = read_json(stamp, "sample stamp")
            done = isinstance(d, dict) and d.get("settings") == settings
        except MASRefineError:  # unreadable: the sample is made again
            done = False
        if done and all(Path(p).exists() for p in result["targets"] + result["truths"] + [str(atlas_dir / "atlas.json")]):
            return result
    if stamp.exists():
        stamp.unlink()
    n = n_atlases + n_targets
    entries = []
    for i, name in enumerate(atlas_ids + target_ids):
        report(progress, "sample-data", i / n, f"subject {name}")
        img, lab, _ = make_subject(name, seed, size, spacing)
        if i < n_atlases:
            write_image(img, atlas_dir / "images" / f"{name}.nii.gz")
            write_image(lab, atlas_dir / "labels" / f"{name}.nii.gz")
            entries.append({"id": name, "image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"})
        else:
            write_image(img, tgt_dir / f"{name}.nii.gz")
            write_image(lab, truth_dir / f"{name}.nii.gz")
    atlas_json = {"schema_version": 1, "name": "MASRefine knee phantom", "labels": LABELS, "atlases": entries}
    write_json(atlas_json, atlas_dir / "atlas.json")
    write_json({"settings": settings, **{k: result[k] for k in ("atlas_dir", "targets", "truths")}}, stamp)
    report(progress, "sample-data", 1.0, "done")
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m MASRefineLib.sampledata",
                                 description="Write the built-in knee phantom atlas set and target(s).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--atlases", type=int, default=6)
    ap.add_argument("--targets", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=3, default=list(DEFAULT_SIZE), metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, default=DEFAULT_SPACING)
    ap.add_argument("--events", action="store_true",
                    help="report progress and the result as the worker's JSON-lines events (MASRefineLib.worker), "
                         "reusing a finished sample in --out; what the Slicer module runs in the background")
    a = ap.parse_args(argv)
    if not a.events:
        r = make_sample(a.out, a.atlases, a.seed, a.targets, tuple(a.size), a.spacing, force=True)
        print(json.dumps({k: r[k] for k in ("atlas_dir", "targets", "truths")}, indent=1))
        return 0
    # the worker's protocol (events, cancel through stdin or SIGTERM, one-line errors, exit codes): MASRefineLib.worker
    from .progress import ProgressEvent
    from .worker import run_function

    def run(job, progress) -> dict:
        def cb(ev) -> None:  # the sample is the whole job: its stage's fraction is the overall one
            progress(ProgressEvent(ev.stage, ev.fraction, ev.message, {**(ev.data or {}), "overall": ev.fraction}))
        r = make_sample(a.out, a.atlases, a.seed, a.targets, tuple(a.size), a.spacing, progress=cb)
        return {k: r[k] for k in ("atlas_dir", "target", "truth", "labels")}

    return run_function(run, {"output_dir": str(Path(a.out).resolve())}, "sample")


if __name__ == "__main__":
    raise SystemExit(main())
