"""What to load into a viewer (the Slicer module) from a finished run: a plan from ``manifest.json``.

Pure Python, no Slicer: the module turns each item of :func:`load_plan` into one node
(``slicer.util.loadSegmentation`` / ``loadVolume`` / ``loadTransform`` / ``loadTable``) and sets the
item's properties; everything else (which files, names, colours, roles, references, folders) is
decided here, where it is tested without Slicer.

Each item is a dict::

    kind        "segmentation" | "volume" | "transform" | "table"
    path        absolute path of the file to load
    name        node name
    role        the output's role in the manifest (manifest.ROLES)
    atlas_id    the atlas it belongs to (None for run-level outputs)
    folder      subject-hierarchy folder path, e.g. ["MASRefine target01", "atlases", "knee03"]
    show        whether to show it right after loading
    segmentation: labels {value: {name, color[0..255]}}, reference "target" (reference geometry)
    volume:       display {"colormap": "Grey"|"Viridis"|"ColdToHotRainbow", "window": [lo, hi]},
                  label (posteriors), compare_with (path of the unrefined image, for flicker)
    transform:    fixed "target", moving (absolute path of the original atlas image or None)
    table:        columns (for the QA table)

By default the plan has the run-level outputs (fused segmentation and the QA table); per-atlas items
come on demand (``atlases="all"`` or a list of ids) and posteriors with ``posteriors=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

from .files import image_stem
from .manifest import read_manifest

LOADABLE = ("segmentation", "volume", "transform", "table")
#: an atlas's outputs in loading order -> the name after its id
_ATLAS_NAMES = {"atlas-image": "image", "atlas-labels": "labels", "atlas-field": "transform",
                "atlas-jacobian": "Jacobian", "atlas-image-unrefined": "image (unrefined)",
                "atlas-labels-unrefined": "labels (unrefined)", "atlas-weights": "weights"}
_ATLAS_ORDER = tuple(_ATLAS_NAMES)


def run_name(manifest: dict[str, Any]) -> str:
    """A short name for the run: the target's file stem (or the output folder's name)."""
    target = (manifest.get("inputs") or {}).get("target")
    if target:
        return image_stem(target)
    return Path(manifest.get("output_dir", "run")).name


def _pick_formats(entries: list[dict]) -> list[dict]:
    """One file per (role, atlas_id, label): a .seg.nrrd beats a .nii.gz for segmentations."""
    best: dict[tuple, dict] = {}
    order = []
    for e in entries:
        if e.get("kind") not in LOADABLE:
            continue
        key = (e["role"], e.get("atlas_id"), e.get("label"))
        if key not in best:
            order.append(key)
            best[key] = e
        elif e["kind"] == "segmentation" and e.get("format") == "seg.nrrd" and best[key].get("format") != "seg.nrrd":
            best[key] = e
    return [best[k] for k in order]


def _item(e: dict, manifest: dict, folder: list[str], name: str, show: bool) -> dict[str, Any]:
    it: dict[str, Any] = {"kind": e["kind"], "path": e["abs_path"], "name": name, "role": e["role"],
                          "atlas_id": e.get("atlas_id"), "folder": folder, "show": show, "format": e.get("format")}
    if e["kind"] == "segmentation":
        it["labels"] = {int(k): v for k, v in (manifest.get("labels") or {}).items()}
        it["reference"] = "target"
    elif e["kind"] == "volume":
        if e["role"] in ("posterior", "atlas-weights"):
            it["display"] = {"colormap": "Viridis", "window": [0.0, 1.0]}
        elif e["role"] == "atlas-jacobian":
            it["display"] = {"colormap": "ColdToHotRainbow", "window": [0.0, 2.0]}
        else:
            it["display"] = {"colormap": "Grey", "window": [0.0, 1.0]}
        if e.get("label") is not None:
            it["label"] = int(e["label"])
    elif e["kind"] == "transform":
        it["fixed"] = "target"
        it["moving"] = e.get("moving")
    elif e["kind"] == "table":
        it["columns"] = e.get("columns")
    return it


def load_plan(manifest_path: str | os.PathLike, atlases: Union[str, Sequence[str], None] = None,
              posteriors: bool = False, unrefined: bool = True) -> list[dict[str, Any]]:
    """The items to load from a run (see the module doc), in loading order.

    ``atlases``: ``None``/``()`` for none, ``"all"``, or a list of atlas ids (unknown ids raise
    KeyError). ``posteriors``: add the per-label posterior maps. ``unrefined``: with atlases, also
    their pre-registration-only images/labels when the run wrote them (for compare/flicker).
    """
    m = read_manifest(manifest_path)
    entries = _pick_formats(m["outputs"])
    top = f"MASRefine {run_name(m)}"
    label_names = {int(k): v.get("name", str(k)) for k, v in (m.get("labels") or {}).items()}
    plan: list[dict[str, Any]] = []
    for role, kinds, name, show in (("fused-labels", LOADABLE, "MASRefine", True),
                                    ("qa-table", LOADABLE, "atlas QA", False), ("metrics", ("table",), "metrics", False)):
        plan += [_item(e, m, [top], f"{run_name(m)} {name}", show)
                 for e in entries if e["role"] == role and e["kind"] in kinds]
    if posteriors:
        for e in entries:
            if e["role"] == "posterior":
                lab = e.get("label")
                nm = label_names.get(int(lab), f"label {lab}") if lab is not None else "background"
                plan.append(_item(e, m, [top, "posteriors"], f"{run_name(m)} P({nm})", False))
    ids = atlas_ids(m)
    if atlases == "all":
        wanted = ids
    elif not atlases:
        wanted = []
    else:
        wanted = list(atlases)
        unknown = [a for a in wanted if a not in ids]
        if unknown:
            raise KeyError(f"atlas ids not in this run: {unknown} (run has {ids})")
    for aid in wanted:
        items = [e for e in entries if e.get("atlas_id") == aid and e["role"] in _ATLAS_ORDER
                 and (unrefined or not e["role"].endswith("-unrefined"))]
        items.sort(key=lambda e: _ATLAS_ORDER.index(e["role"]))
        refined_image = next((e for e in items if e["role"] == "atlas-image"), None)
        for e in items:
            it = _item(e, m, [top, "atlases", aid], f"{aid} {_ATLAS_NAMES[e['role']]}", False)
            if e["role"] == "atlas-image-unrefined" and refined_image is not None:
                it["compare_with"] = refined_image["abs_path"]
            plan.append(it)
    return plan


def atlas_ids(manifest: dict[str, Any]) -> list[str]:
    """Atlas ids of a run, in the manifest's order (QA entries first, then any output's atlas_id)."""
    ids = [a["id"] for a in manifest.get("atlases", []) if isinstance(a, dict) and "id" in a]
    for e in manifest.get("outputs", []):
        if e.get("atlas_id") and e["atlas_id"] not in ids:
            ids.append(e["atlas_id"])
    return ids


def qa_rows(manifest_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-atlas QA table as rows ``{"id": ..., <number>: float, ...}`` (for the QA panel)."""
    m = read_manifest(manifest_path)
    rows = []
    for a in m.get("atlases", []):
        if isinstance(a, dict) and "id" in a:
            rows.append({"id": a["id"], **(a.get("qa") or {})})
    return rows
