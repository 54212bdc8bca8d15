"""Measurement behind MASRefineLib/metrics.py going through MONAI (docs/numerics.md): numbers and time of three
ways to compute Dice, surface Dice, ASD and HD95 of every label of a full-size label-map pair.

    nice -n 19 .venv/bin/python bench/metrics_speed.py [--repeats 2] [--tolerance-mm 0.7]

- ``scipy``: the implementation metrics.py had before (scipy's exact Euclidean distance transform with
  ``sampling=spacing`` on each label's bounding box; surfaces = mask & ~erosion; ties within 1e-6 mm count),
  kept here as the reference the new numbers must reproduce;
- ``monai-compute``: one call each of MONAI's ``compute_dice``, ``compute_surface_dice``,
  ``compute_average_surface_distance`` and ``compute_hausdorff_distance(percentile=95)`` per label, on the same
  bounding box (plus one background voxel);
- ``new``: :func:`MASRefineLib.metrics.label_metrics` (MONAI's edges and distances, computed once per label).

Pairs: a real label map (IXI DLMUSE, 2 mm, ~145 labels; OAI knee, 0.7 x 0.365 x 0.365 mm, 9 labels) against
the same map moved by a small rigid transform (nearest neighbour): boundary errors of a few voxels.
Prints a Markdown table (best of ``--repeats`` CPU times of this process, seconds, single-threaded: robust to
a shared machine's load), the time of Dice alone (MONAI's ``compute_dice`` against the voxel count), and the
largest differences between the numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.datasets import ixi_dir, knee_labels_dir  # noqa: E402
from MASRefineLib import metrics  # noqa: E402

KEYS = ("dice", "surface_dice", "asd_mm", "hd95_mm")


def perturbed(label: sitk.Image, angle: float, shift_mm: tuple[float, float, float]) -> sitk.Image:
    t = sitk.Euler3DTransform()
    t.SetCenter(label.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in label.GetSize()]))
    t.SetRotation(angle, -angle / 2, angle / 3)
    t.SetTranslation(shift_mm)
    return sitk.Resample(label, label, t, sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def boxes(p: np.ndarray, r: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each label present in both maps: its two masks on the bounding box of their union plus one voxel."""
    top = int(max(p.max(), r.max()))
    bp, br = ndimage.find_objects(p, max_label=top), ndimage.find_objects(r, max_label=top)
    out = {}
    for v in range(1, top + 1):
        if bp[v - 1] is None or br[v - 1] is None:
            continue
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(bp[v - 1], br[v - 1]))
        out[v] = (np.pad(p[box] == v, 1), np.pad(r[box] == v, 1))
    return out


def scipy_metrics(mp: np.ndarray, mr: np.ndarray, spacing_xyz, tol: float) -> tuple[float, ...]:
    """metrics.binary_metrics as it was before it went through MONAI."""
    sampling = tuple(float(s) for s in spacing_xyz)[::-1]
    st = ndimage.generate_binary_structure(3, 1)
    sp, sr = (m & ~ndimage.binary_erosion(m, structure=st, border_value=0) for m in (mp, mr))
    d_pr = ndimage.distance_transform_edt(~sr, sampling=sampling)[sp]
    d_rp = ndimage.distance_transform_edt(~sp, sampling=sampling)[sr]
    dice = 2.0 * np.count_nonzero(mp & mr) / (mp.sum() + mr.sum())
    sd = (np.count_nonzero(d_pr <= tol + 1e-6) + np.count_nonzero(d_rp <= tol + 1e-6)) / (d_pr.size + d_rp.size)
    return (float(dice), float(sd), float(np.concatenate([d_pr, d_rp]).mean()),
            float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))))


def monai_compute(mp: np.ndarray, mr: np.ndarray, spacing_xyz, tol: float) -> tuple[float, ...]:
    from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                               compute_surface_dice)
    yp, yr = torch.from_numpy(mp[None, None]), torch.from_numpy(mr[None, None])
    sp = [float(s) for s in spacing_xyz][::-1]
    return (float(compute_dice(yp, yr)), float(compute_surface_dice(yp, yr, [tol], include_background=True, spacing=sp)),
            float(compute_average_surface_distance(yp, yr, include_background=True, symmetric=True, spacing=sp)),
            float(compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=sp)))


def run(name: str, label: sitk.Image, moved: sitk.Image, repeats: int, tol: float) -> tuple[str, str]:
    p, r = sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(label)
    spacing = label.GetSpacing()
    both = sorted(boxes(p, r))

    def per_box(f):  # from the full maps: the boxes are part of the time
        return {v: f(mp, mr, spacing, tol) for v, (mp, mr) in boxes(p, r).items()}

    def new(_=None):
        res = metrics.label_metrics(p, r, spacing, both, tolerance_mm=tol)
        return {v: tuple(getattr(m, k) for k in KEYS) for v, m in res.items()}

    def dice_monai(mp, mr, *_):
        from monai.metrics import compute_dice
        return float(compute_dice(torch.from_numpy(mp[None, None]), torch.from_numpy(mr[None, None])))

    methods = {"scipy": lambda: per_box(scipy_metrics), "monai-compute": lambda: per_box(monai_compute), "new": new,
               "compute_dice": lambda: per_box(dice_monai),
               "count": lambda: per_box(lambda mp, mr, *_: 2.0 * np.count_nonzero(mp & mr) / (mp.sum() + mr.sum()))}
    cpu, values = {}, {}
    for _ in range(repeats):  # interleaved, best of the repeats
        for method, f in methods.items():
            t0 = time.process_time()
            out = f()
            cpu[method] = min(cpu.get(method, np.inf), time.process_time() - t0)
            values[method] = np.array([out[v] for v in both])
    assert np.abs(values["compute_dice"] - values["new"][:, 0]).max() < 1e-6
    row = (f"| {name} | {p.shape[2]} x {p.shape[1]} x {p.shape[0]} | {len(both)} | "
           + " | ".join(f"{cpu[m]:.2f}" for m in methods) + " |")
    diffs = []
    for other in ("scipy", "monai-compute"):
        d = np.abs(values["new"] - values[other]).max(axis=0)
        diffs.append(f"| {name} | new - {other} | " + " | ".join(f"{x:.1e}" for x in d) + " |")
    return row, "\n".join(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tolerance-mm", type=float, default=metrics.DEFAULT_TOLERANCE_MM)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # MONAI's deprecation notes
    ixi_id = (ixi_dir() / "subjects.txt").read_text().split()[0]
    ixi = sitk.ReadImage(str(ixi_dir() / "labels" / f"{ixi_id}.nii.gz"))
    knee_path = sorted(knee_labels_dir().glob("*.nii.gz"))[0]
    knee = sitk.ReadImage(str(knee_path))
    cases = [(f"IXI {ixi_id}", ixi, perturbed(ixi, 0.06, (1.5, -1.0, 2.0))),
             (f"knee {knee_path.name.split('.')[0]}", knee, perturbed(knee, 0.03, (0.5, -0.4, 0.7)))]
    rows, diffs = [], []
    for name, lab, moved in cases:
        row, diff = run(name, lab, moved, args.repeats, args.tolerance_mm)
        rows.append(row)
        diffs.append(diff)
    print(f"tolerance {args.tolerance_mm:g} mm, best of {args.repeats}, 1 thread, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("CPU seconds (process time; the machine is shared) for all labels present in both maps; the last two\n"
          "columns: Dice alone, MONAI's compute_dice against the voxel count\n")
    print("| pair | size (x y z) | labels | scipy | monai-compute | new | compute_dice | count |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print("\nlargest difference over the labels\n")
    print("| pair | compared | Dice | surface Dice | ASD mm | HD95 mm |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(diffs))


if __name__ == "__main__":
    main()
