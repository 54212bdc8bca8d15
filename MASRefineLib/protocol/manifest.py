"""Reading ``manifest.json``, the list of a finished run's outputs (written last and atomically by
:class:`MASRefineLib.manifest.Manifest`; schema in that module's doc)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import MASRefineError
from ..jsonio import read_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

KINDS = ("segmentation", "volume", "transform", "table", "picture", "json")
ROLES = {
    "fused-labels": "the fused segmentation of the target",
    "posterior": "per-label posterior probability of the fused segmentation (``label``)",
    "atlas-image": "an atlas's image warped (and refined) onto the target",
    "atlas-image-unrefined": "an atlas's image after pre-registration only (for compare/flicker)",
    "atlas-labels": "an atlas's label map warped (and refined) onto the target",
    "atlas-labels-unrefined": "an atlas's label map after pre-registration only",
    "atlas-field": "an atlas's total displacement field (LPS mm, resampling convention)",
    "atlas-jacobian": "Jacobian determinant of an atlas's displacement field",
    "atlas-weights": "an atlas's per-voxel fusion weight",
    "qa-table": "per-atlas QA numbers",
    "qa-picture": "montage of target, fused labels and atlases",
    "metrics": "evaluation against a reference segmentation",
    "report": "a machine-readable report of a stage",
}



def read_manifest(path: str | os.PathLike, check_files: bool = True) -> dict[str, Any]:
    """Read and check a manifest (``path``: the file or its folder). Each output gets ``abs_path``.

    Raises :class:`MASRefineError` naming the file for a missing/invalid manifest or a listed file
    that is missing."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.exists():
        raise MASRefineError(f"{p}: no manifest (the run has not finished, failed, or was cancelled)")
    d = read_json(p, "manifest", allow_nan=True)  # the project writes NaN for undefined QA numbers
    if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
        v = d.get("schema_version") if isinstance(d, dict) else None
        raise MASRefineError(f"{p}: unsupported manifest schema_version {v!r} (expected {SCHEMA_VERSION})")
    outs = d.get("outputs")
    if not isinstance(outs, list):
        raise MASRefineError(f"{p}: 'outputs' must be a list")
    for e in outs:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("path", "kind", "role")):
            raise MASRefineError(f"{p}: every output needs path, kind and role")
        e["abs_path"] = str((p.parent / e["path"]).resolve())
        if check_files and not os.path.isfile(e["abs_path"]):
            raise MASRefineError(f"{e['abs_path']}: listed in {p.name} but missing")
    d["manifest_path"] = str(p.resolve())
    d["output_dir"] = str(p.parent.resolve())
    return d
