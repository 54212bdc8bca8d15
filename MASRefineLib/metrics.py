"""Segmentation metrics in physical units (mm), per label and averaged over label groups: volume Dice,
average symmetric surface distance (ASD), surface Dice at a tolerance and the 95th-percentile Hausdorff
distance (HD95), the four metrics of the VoteNet++ paper (Table 1: ASD mm, SD %, 95MD mm, VD %).

The definitions are MONAI's (``monai.metrics``; docs/numerics.md has the measured agreement and speed):
surfaces are ``get_mask_edges``'s border voxels (6-connected erosion, outside the array is background, no
sub-voxel areas); distances are ``get_surface_distance``'s, from each surface voxel of one mask to the nearest
of the other, Euclidean in mm between voxel centres (float32; the direction matrix is orthonormal, so spacing
alone matters). From them, as ``compute_average_surface_distance(symmetric=True)``, ``compute_hausdorff_distance
(percentile=95)`` and ``compute_surface_dice`` reduce them: ASD = the mean of both directions' distances pooled;
HD95 = the larger of the two directed, linearly interpolated 95th percentiles (weights in float32 as MONAI's:
up to 5e-5 mm from float64); surface Dice at ``tau`` = the fraction of both surfaces within ``tau`` mm of the
other (float32, so a distance equal to ``tau`` is within).
Dice = ``2 |P & R| / (|P| + |R|)``, as ``compute_dice``. The edges and distances are computed once per label
for the three (calling the three functions computes them three times: 4-7x the time), on the bounding box of
the label in both maps plus one background voxel, as MONAI crops (the same numbers as the whole array, tested).

Missing labels never raise. A label present in neither map (only when asked for, e.g. in a group) is
``"absent"``: all NaN, left out of all means. One present in only one map is ``"missing_in_pred"`` /
``"missing_in_ref"``: Dice and surface Dice 0, ASD and HD95 NaN (undefined; MONAI gives inf); means of Dice
and surface Dice count it as 0, means of ASD and HD95 leave it out and say how many (``n_undefined``).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import MASRefineError
from .geometry import Grid
from .labels import label_values

DEFAULT_TOLERANCE_MM = 0.7

OK, MISSING_IN_PRED, MISSING_IN_REF, ABSENT = "ok", "missing_in_pred", "missing_in_ref", "absent"


@dataclass
class LabelMetrics:
    """Metrics of one label value. Distances in mm, volumes in mm^3; NaN where undefined (see ``status``)."""
    label: int
    status: str  # "ok" | "missing_in_pred" | "missing_in_ref" | "absent"
    dice: float
    surface_dice: float
    asd_mm: float
    hd95_mm: float
    volume_pred_mm3: float
    volume_ref_mm3: float

    def to_json_dict(self) -> dict:
        return {k: _json_number(v) for k, v in asdict(self).items()}


@dataclass
class Summary:
    """Means over a set of labels. ``labels``: the labels counted (not absent in both maps);
    ``n_undefined``: labels whose ASD/HD95 is undefined (missing on one side), left out of those two means."""
    name: str
    labels: list[int]
    dice: float
    surface_dice: float
    asd_mm: float
    hd95_mm: float
    n_undefined: int
    absent: list[int] = field(default_factory=list)

    def to_json_dict(self) -> dict:
        return {k: _json_number(v) for k, v in asdict(self).items()}


@dataclass
class Evaluation:
    """Per-label metrics, group means and the mean over all evaluated labels."""
    labels: dict[int, LabelMetrics]
    mean: Summary
    groups: dict[str, Summary]
    tolerance_mm: float
    spacing_mm: tuple[float, float, float]  # (x, y, z)

    def to_json_dict(self, names: Mapping[int, str] | None = None, **extra) -> dict:
        rows = []
        for value, m in self.labels.items():
            d = m.to_json_dict()
            if names is not None and value in names:
                d["name"] = names[value]
            rows.append(d)
        return {**extra, "tolerance_mm": self.tolerance_mm, "spacing_mm": list(self.spacing_mm),
                "definitions": "MONAI-compatible: surfaces = border voxels; ASD pools both directions; "
                               "HD95 = max of directed 95th percentiles; surface Dice counts border voxels",
                "labels": rows, "mean": self.mean.to_json_dict(),
                "groups": {k: g.to_json_dict() for k, g in self.groups.items()}}


def _json_number(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _nan_metrics(label: int, status: str, vol_p: float = 0.0, vol_r: float = 0.0) -> LabelMetrics:
    zero = 0.0 if status != ABSENT else math.nan
    return LabelMetrics(label, status, zero, zero, math.nan, math.nan, vol_p, vol_r)


def _crop(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks (not both empty) on the bounding box of their union plus one background voxel (MONAI's
    crop margin)."""
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    return np.pad(pred[tuple(box)], 1), np.pad(ref[tuple(box)], 1)


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing_xyz: Sequence[float],
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM, label: int = 1) -> LabelMetrics:
    """All metrics of two boolean masks (z, y, x) on the same grid; ``spacing_xyz`` in mm, (x, y, z) order
    as ``sitk.Image.GetSpacing()``. Works on any sub-volume that contains both masks' surfaces."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"masks have different shapes {pred.shape} and {ref.shape}")
    voxel_mm3 = float(np.prod(spacing_xyz))
    n_p, n_r = int(pred.sum()), int(ref.sum())
    vol_p, vol_r = n_p * voxel_mm3, n_r * voxel_mm3
    if n_p == 0 and n_r == 0:
        return _nan_metrics(label, ABSENT)
    if n_p == 0 or n_r == 0:
        return _nan_metrics(label, MISSING_IN_PRED if n_p == 0 else MISSING_IN_REF, vol_p, vol_r)
    # MONAI's compute_dice is this ratio (tested equal) at 2.5-3x the time of these counts, which the volumes
    # need anyway (bench/metrics_speed.py)
    dice = 2.0 * int(np.count_nonzero(pred & ref)) / (n_p + n_r)
    from monai.metrics.utils import get_mask_edges, get_surface_distance  # not at import: MONAI takes seconds

    p, r = _crop(pred, ref)
    # crop=False: cropped above (MONAI's own crop, a CropForeground transform per call, would redo it)
    ep, er = get_mask_edges(p, r, crop=False)
    sampling = [float(s) for s in spacing_xyz][::-1]  # arrays are (z, y, x)
    d_pr, d_rp = get_surface_distance(ep, er, spacing=sampling), get_surface_distance(er, ep, spacing=sampling)
    # the reductions of compute_surface_dice / compute_average_surface_distance / compute_hausdorff_distance
    # (np.percentile: torch.quantile's linear interpolation, without its limit of 16 M values)
    tol = np.float32(tolerance_mm)
    sd = (int(np.count_nonzero(d_pr <= tol)) + int(np.count_nonzero(d_rp <= tol))) / (d_pr.size + d_rp.size)
    asd = float(np.concatenate([d_pr, d_rp]).mean(dtype=np.float64))
    hd95 = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    return LabelMetrics(label, OK, float(dice), float(sd), asd, hd95, vol_p, vol_r)


def _union_box(a: slice | None, b: slice | None, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    if a is None and b is None:
        return None
    boxes = [s for s in (a, b) if s is not None]
    return tuple(slice(min(bx[d].start for bx in boxes), max(bx[d].stop for bx in boxes)) for d in range(len(shape)))


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing_xyz: Sequence[float],
                  labels: Sequence[int] | None = None,
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict[int, LabelMetrics]:
    """Per-label metrics of two integer label maps (z, y, x) on the same grid.

    ``labels``: the values to evaluate (default: every non-zero value present in either map); a
    requested label present in neither map is reported ``"absent"``. ``spacing_xyz`` in mm, (x, y, z).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label maps have different shapes {pred.shape} and {ref.shape}")
    if pred.ndim != 3 or len(spacing_xyz) != 3:
        raise ValueError("label maps must be 3D (z, y, x) with a 3-vector spacing (x, y, z)")
    if any(not (float(s) > 0) for s in spacing_xyz):
        raise ValueError(f"spacing must be positive, got {tuple(spacing_xyz)}")
    for name, a in (("prediction", pred), ("reference", ref)):
        if not np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.bool_):
            if not np.all(a == np.round(a)):
                raise ValueError(f"{name} label map holds non-integer values")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} label map holds negative values")
    # integer maps as they are (find_objects takes any integer type; int64 copies of a knee are 2 x 190 MB)
    pred, ref = (a if np.issubdtype(a.dtype, np.integer) else a.astype(np.int64) for a in (pred, ref))
    if labels is None:
        values = sorted((set(label_values(pred)) | set(label_values(ref))) - {0})
    else:
        values = sorted(set(int(v) for v in labels) - {0})
    top = max(values, default=0)

    def boxes(a: np.ndarray) -> list:
        return ndimage.find_objects(np.where(a <= top, a, 0) if int(a.max()) > top else a, max_label=top) if top else []

    boxes_p, boxes_r = boxes(pred), boxes(ref)
    out: dict[int, LabelMetrics] = {}
    for v in values:
        box = _union_box(boxes_p[v - 1], boxes_r[v - 1], pred.shape)
        if box is None:
            out[v] = _nan_metrics(v, ABSENT)
            continue
        out[v] = binary_metrics(pred[box] == v, ref[box] == v, spacing_xyz, tolerance_mm, label=v)
    return out


def summarize(per_label: Mapping[int, LabelMetrics], labels: Sequence[int] | None = None, name: str = "mean") -> Summary:
    """Means over ``labels`` (default: all in ``per_label``); labels absent in both maps are left out,
    ASD/HD95 are averaged over the labels where they are defined (``n_undefined`` counts the others)."""
    chosen = list(per_label) if labels is None else [int(v) for v in labels]
    ms = [per_label[v] for v in chosen if v in per_label and per_label[v].status != ABSENT]
    absent = [v for v in chosen if v not in per_label or per_label[v].status == ABSENT]
    defined = [m for m in ms if m.status == OK]

    def mean(vals):
        return float(np.mean(vals)) if len(vals) else math.nan

    return Summary(name, [m.label for m in ms], mean([m.dice for m in ms]), mean([m.surface_dice for m in ms]),
                   mean([m.asd_mm for m in defined]), mean([m.hd95_mm for m in defined]),
                   len(ms) - len(defined), absent)


def parse_groups(groups: Mapping[str, Sequence[int]] | str | os.PathLike | None, source: str = "--groups") -> dict[str, list[int]]:
    """Label groups ``{name: [values]}`` from a dict, a JSON string, or a JSON file path."""
    if groups is None:
        return {}
    if isinstance(groups, (str, os.PathLike)):
        from .jsonio import parse_json, read_json
        text = str(groups)
        p = Path(text)
        if not text.lstrip().startswith("{"):  # not JSON text: a file name
            if not p.exists():
                raise MASRefineError(f"{p}: label groups file not found ({source} takes a JSON file or JSON text)")
            source, groups = str(p), read_json(p, "label groups file")
        else:
            groups = parse_json(text, source)
    if not isinstance(groups, Mapping):
        raise MASRefineError(f'{source}: label groups must be a JSON object {{"name": [values], ...}}')
    out = {}
    for k, vs in groups.items():
        if isinstance(vs, (int, np.integer)) and not isinstance(vs, bool):
            vs = [vs]
        if not isinstance(vs, (list, tuple)) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                       and v > 0 for v in vs):
            raise MASRefineError(f"{source}: group {k!r} must be a list of positive integer label values")
        out[str(k)] = [int(v) for v in vs]
    return out


def _check_direction(grid: Grid, name: str) -> None:
    d = grid.direction_matrix
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise MASRefineError(f"{name}: direction matrix is not orthonormal; distances cannot be measured from spacing")


def evaluate(pred: sitk.Image | np.ndarray, ref: sitk.Image | np.ndarray, spacing_xyz: Sequence[float] | None = None,
             groups: Mapping[str, Sequence[int]] | None = None, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
             labels: Sequence[int] | None = None, pred_name: str = "prediction",
             ref_name: str = "reference") -> Evaluation:
    """Evaluate a predicted label map against a reference.

    Images: both must lie on the same grid (size, spacing, origin, direction), else
    :class:`MASRefineError` naming ``pred_name`` and ``ref_name``; the spacing comes from the images.
    Arrays (z, y, x): ``spacing_xyz`` (mm, x-y-z order) is required. ``labels`` defaults to every
    non-zero value present in either map; labels named in ``groups`` are always evaluated.
    """
    if float(tolerance_mm) < 0 or not math.isfinite(float(tolerance_mm)):
        raise MASRefineError(f"tolerance {tolerance_mm} mm must be a finite non-negative number")
    if isinstance(pred, sitk.Image) != isinstance(ref, sitk.Image):
        raise TypeError("pred and ref must both be SimpleITK images or both be arrays")
    if isinstance(pred, sitk.Image):
        gp, gr = Grid.from_image(pred), Grid.from_image(ref)
        if not gp.isclose(gr):
            raise MASRefineError(f"{pred_name} and {ref_name} are on different grids ({gp.difference(gr)}); "
                                 "resample the prediction onto the reference grid first")
        _check_direction(gp, pred_name)
        spacing_xyz = gp.spacing
        pa, ra = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
    else:
        if spacing_xyz is None:
            raise ValueError("spacing_xyz is required for array inputs")
        pa, ra = np.asarray(pred), np.asarray(ref)
        if pa.shape != ra.shape:
            raise MASRefineError(f"{pred_name} and {ref_name} have different shapes {pa.shape} and {ra.shape}")
    groups = parse_groups(groups) if groups is not None else {}
    if labels is None:
        values = set(label_values(pa)) | set(label_values(ra))
    else:
        values = set(int(v) for v in labels)
    values |= {v for vs in groups.values() for v in vs}
    per_label = label_metrics(pa, ra, spacing_xyz, sorted(values - {0}), tolerance_mm)
    mean = summarize(per_label, name="mean")
    summaries = {name: summarize(per_label, vs, name) for name, vs in groups.items()}
    return Evaluation(per_label, mean, summaries, float(tolerance_mm), tuple(float(s) for s in spacing_xyz))


def evaluate_files(pred: str | os.PathLike, ref: str | os.PathLike, groups=None,
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM, labels: Sequence[int] | None = None) -> Evaluation:
    """:func:`evaluate` on two label-map files (read with :func:`MASRefineLib.imageio.read_label`)."""
    from .imageio import read_label

    return evaluate(read_label(pred, allow_empty=True), read_label(ref), groups=groups, tolerance_mm=tolerance_mm, labels=labels,
                    pred_name=str(pred), ref_name=str(ref))


def _fmt(v: float, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if not math.isfinite(v) else f"{v * scale:.{digits}f}"


def format_table(result: Evaluation, names: Mapping[int, str] | None = None) -> str:
    """A plain-text table: one row per label, then one per group and the mean over all labels.
    Dice and surface Dice in %, distances in mm; ``-`` marks an undefined value."""
    names = names or {}
    sd_head = f"SurfDice@{result.tolerance_mm:g}mm %"
    head = ("label", "name", "Dice %", sd_head, "ASD mm", "HD95 mm", "status")
    rows = []
    for v, m in result.labels.items():
        rows.append((str(v), names.get(v, ""), _fmt(m.dice, 100), _fmt(m.surface_dice, 100), _fmt(m.asd_mm, 1, 3),
                     _fmt(m.hd95_mm, 1, 3), "" if m.status == OK else m.status.replace("_", " ")))
    tail = []
    for s in list(result.groups.values()) + [result.mean]:
        note = []
        if s.n_undefined:
            note.append(f"{s.n_undefined} without distances")
        if s.absent:
            note.append(f"{len(s.absent)} absent")
        label = f"{s.name} over {len(s.labels)} label{'s' if len(s.labels) != 1 else ''}"
        tail.append(("", label, _fmt(s.dice, 100), _fmt(s.surface_dice, 100),
                     _fmt(s.asd_mm, 1, 3), _fmt(s.hd95_mm, 1, 3), ", ".join(note)))
    width = [max(len(r[i]) for r in [head] + rows + tail) for i in range(len(head))]
    width[1] = min(width[1], 44)

    def line(r):
        cells = [r[0].rjust(width[0]), r[1][:44].ljust(width[1])] + [c.rjust(w) for c, w in zip(r[2:6], width[2:6])] + [r[6]]
        return "  ".join(cells).rstrip()

    sep = "-" * len(line(head))
    return "\n".join([line(head), sep] + [line(r) for r in rows] + [sep] + [line(r) for r in tail])
