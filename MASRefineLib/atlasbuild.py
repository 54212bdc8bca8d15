"""Atlas sets from segmented cases: (image, ``.seg.nrrd``) pairs, as the Slicer module exports them from a scene.

:func:`build` makes a new atlas set from cases; :func:`add` adds cases to an existing one (a corrected result, so
the set grows with use). The label table comes from the segments: their names (the labels' identity across
cases), colours and terminology (the segment's own, else the built-in code of its name,
:func:`MASRefineLib.terminology.for_name`). Every case's segment names must equal the set's (one line naming the
missing and the extra ones); a segmentation must lie on its image's voxel grid (Slicer writes the union of the
reference geometry and the segments' extent: a larger box on the same grid is cut back to the image when nothing
labelled lies outside it). The files are copied into ``<set>/images`` and ``<set>/labels`` (the exported ones are
temporary); no existing file is replaced, and ``atlas.json`` is written last, atomically.

As a worker job (``pipeline: "atlas"``, :func:`MASRefineLib.protocol.jobs.make_atlas_job`): ``inputs.cases`` names a JSON file
``{"cases": [{"id", "image", "segmentation"}, ...]}`` (absolute paths), ``inputs.atlas_dir`` the atlas set,
``parameters.mode`` ``"new"`` or ``"add"``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .atlas import ATLAS_JSON, Atlas, AtlasSet
from .errors import MASRefineError
from .geometry import Grid
from .imageio import read_image, write_image
from .labels import Label, LabelTable, read_seg_nrrd
from .progress import ProgressCallback, report
from .terminology import for_name
from .validate import atlas_id_problem, duplicate_id_problem


def read_case(image_path: str | os.PathLike, seg_path: str | os.PathLike) -> tuple[sitk.Image, sitk.Image, LabelTable]:
    """(image float32, label map on the image's grid keyed by the segmentation's label values, its table)."""
    image = read_image(image_path)
    labels, table = read_seg_nrrd(seg_path)  # overlapping segments (several layers) are refused there
    if not table:
        raise MASRefineError(f"{seg_path}: the segmentation has no segments")
    names = [v.name for v in table.values()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MASRefineError(f"{seg_path}: segment names must be unique, {dup[0]!r} is used twice")
    return image, _on_image_grid(labels, image, seg_path, image_path), table


def _on_image_grid(labels: sitk.Image, image: sitk.Image, seg_path, image_path) -> sitk.Image:
    """The label map on the image's grid: as it is when the grids are equal; cut or padded when it is a box of the
    same voxel grid (same spacing and direction, whole-voxel offset) and nothing labelled falls outside."""
    lg, ig = Grid.from_image(labels), Grid.from_image(image)
    if lg.isclose(ig):
        labels.CopyInformation(image)
        return labels
    same_axes = np.allclose(lg.spacing, ig.spacing, rtol=1e-5) and np.allclose(lg.direction, ig.direction, atol=1e-5)
    offset = ig.physical_to_index() @ np.append(lg.origin, 1.0)  # the label box's first voxel, in image indices
    if not same_axes or not np.allclose(offset[:3], np.round(offset[:3]), atol=1e-3):
        raise MASRefineError(f"{seg_path}: the segmentation is not on the voxel grid of {image_path} "
                             f"(segmentation vs volume: {lg.difference(ig)}); segment it with that volume as the source volume")
    out = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    lost = int((sitk.GetArrayViewFromImage(labels) > 0).sum()) - int((sitk.GetArrayViewFromImage(out) > 0).sum())
    if lost:
        raise MASRefineError(f"{seg_path}: {lost} labelled voxels lie outside {image_path}; the segments must lie "
                             "inside their volume")
    return out


def _table_from_segments(table: LabelTable) -> LabelTable:
    """The first case's segments as the set's label table: values 1..n in segment order, with colour and terminology."""
    return LabelTable((i + 1, Label(v.name, v.color, v.terminology or for_name(v.name)))
                      for i, v in enumerate(table.values()))


def _relabel(labels: sitk.Image, case_table: LabelTable, set_table: LabelTable, seg_path, reference: str) -> sitk.Image:
    """Map the case's values to the set's by segment name; the segment names must be the set's."""
    have = {v.name: k for k, v in case_table.items()}
    want = {v.name: k for k, v in set_table.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(map(repr, missing[:5]))}"] if missing else []) + \
                ([f"extra {', '.join(map(repr, extra[:5]))}"] if extra else [])
        raise MASRefineError(f"{seg_path}: its segments differ from {reference}'s ({'; '.join(parts)})")
    arr = sitk.GetArrayFromImage(labels).astype(np.int64)
    lut = np.zeros(max(max(case_table), int(arr.max())) + 1, np.uint16)
    for name, value in have.items():
        lut[value] = want[name]
    out = sitk.GetImageFromArray(lut[arr])
    out.CopyInformation(labels)
    return out


def _new_id(wanted: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(wanted)).strip("._-")[:120] or "case"
    if not base[0].isalnum():
        base = "case" + base
    new, n = base, 1
    while duplicate_id_problem(new, taken):
        n += 1
        new = f"{base}-{n}"
    problem = atlas_id_problem(new)
    if problem:
        raise MASRefineError(f"atlas id {new!r}: {problem}")
    return new


def _write_cases(root: Path, cases: Sequence[dict], set_table: Optional[LabelTable], taken: set[str],
                 reference: str, progress: Optional[ProgressCallback]) -> tuple[LabelTable, list[Atlas]]:
    # read and check every case before anything is written
    read = []
    for n, case in enumerate(cases):
        report(progress, "atlas", n / (2 * len(cases)), f"reading {case.get('id', '')}")
        image, labels, table = read_case(case["image"], case["segmentation"])
        if set_table is None:
            set_table, reference = _table_from_segments(table), str(case["segmentation"])
        labels = _relabel(labels, table, set_table, case["segmentation"], reference)
        if not (sitk.GetArrayViewFromImage(labels) > 0).any():
            raise MASRefineError(f"{case['segmentation']}: the segments are empty (no voxel is labelled)")
        aid = _new_id(case.get("id") or Path(case["image"]).name.split(".")[0], taken)
        taken.add(aid)
        for sub in ("images", "labels"):
            if (root / sub / f"{aid}.nii.gz").exists():
                raise MASRefineError(f"{root / sub / f'{aid}.nii.gz'}: exists already; not replaced")
        read.append((aid, image, labels))
    atlases = []
    for n, (aid, image, labels) in enumerate(read):
        report(progress, "atlas", 0.5 + n / (2 * len(read)), f"writing {aid}")
        write_image(image, root / "images" / f"{aid}.nii.gz")
        write_image(labels, root / "labels" / f"{aid}.nii.gz")
        atlases.append(Atlas(aid, f"images/{aid}.nii.gz", f"labels/{aid}.nii.gz"))
    return set_table, atlases


def _check_cases(cases: Any, source: str) -> list[dict]:
    if not isinstance(cases, list) or not cases:
        raise MASRefineError(f"{source}: 'cases' must be a non-empty list of {{id, image, segmentation}}")
    for n, c in enumerate(cases):
        if not isinstance(c, dict) or not all(isinstance(c.get(k), str) and c.get(k) for k in ("image", "segmentation")):
            raise MASRefineError(f"{source}: case {n + 1} must have the paths 'image' and 'segmentation'")
    return cases


def build(out: str | os.PathLike, cases: Sequence[dict], progress: Optional[ProgressCallback] = None) -> AtlasSet:
    """A new atlas set in ``out`` (a new or empty folder) from ``cases`` ``[{id, image, segmentation}]``; the label
    table is the first case's segments (values 1..n in segment order)."""
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise MASRefineError(f"{root}: a new atlas set needs a new or empty folder")
    cases = _check_cases(list(cases), str(root))
    table, atlases = _write_cases(root, cases, None, set(), "", progress)
    aset = AtlasSet(root, table, atlases)
    aset.save()  # last: a set interrupted before this has no atlas.json
    return AtlasSet.load(root)


def add(atlas_dir: str | os.PathLike, cases: Sequence[dict], progress: Optional[ProgressCallback] = None) -> AtlasSet:
    """Add ``cases`` to the atlas set in ``atlas_dir``: segment names must be its labels' names; new ids are made
    unique (``-2``, ...); its atlas.json is rewritten atomically after the files are written."""
    aset = AtlasSet.load(atlas_dir)
    cases = _check_cases(list(cases), str(aset.json_path))
    names = [v.name for v in aset.label_table.values()]
    if len(set(names)) != len(names):
        raise MASRefineError(f"{aset.json_path}: label names must be unique to add cases by segment name")
    _, atlases = _write_cases(aset.root, cases, aset.label_table, set(aset.ids), str(aset.json_path), progress)
    AtlasSet(aset.root, aset.label_table, aset.atlases + atlases).save()
    out = AtlasSet.load(aset.root)
    if aset.models_dir.is_dir() and any(aset.models_dir.iterdir()):
        out.notes.append(f"{aset.models_dir}: its models were trained without the new atlases; retrain them with "
                         "'masrefine train' to use them")
    return out


def run_job(job: dict, progress: Optional[ProgressCallback] = None) -> dict:
    """The worker's ``atlas`` pipeline (see the module doc)."""
    from .jsonio import read_json

    cases_path = job["inputs"]["cases"]
    d = read_json(cases_path, "cases file")
    cases = _check_cases(d.get("cases") if isinstance(d, dict) else None, cases_path)
    mode = job.get("parameters", {}).get("mode", "new")
    target = job["inputs"]["atlas_dir"]
    aset = build(target, cases, progress) if mode == "new" else add(target, cases, progress)
    added = [a.id for a in aset.atlases[-len(cases):]]
    report(progress, "atlas", 1.0, f"{len(aset)} atlases")
    return {"atlas_dir": str(aset.root), "atlas_json": str(aset.root / ATLAS_JSON), "added": added,
            "atlases": len(aset), "labels": len(aset.label_table), "notes": aset.notes}
