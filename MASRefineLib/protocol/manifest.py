"""``manifest.json``: the list of a finished run's outputs, written last and atomically.

A reader (the Slicer module, a script) waits for ``manifest.json``; every file it lists is complete
(each output is itself written atomically before it is listed, and :meth:`Manifest.write` checks
that every listed file exists). A run that fails or is cancelled writes no manifest, and
:func:`begin_output` removes the manifest of an earlier run before new outputs are written, so an
old manifest never describes a half-rewritten folder.

Schema (version 1)::

    {"schema_version": 1, "status": "complete", "created": ISO-8601, "software": {...},
     "inputs": {"target": path, "atlas_dir": path}, "parameters": {...},
     "labels": {value: {name, color}}, "target_grid": Grid.to_json(),
     "stages": [{"name": str, "seconds": float, "cpu_seconds": float}, ...], "seconds_total": float,
     "atlases": [{"id": str, "qa": {...}}, ...], "summary": {...},
     "outputs": [{"path": relative path, "kind": KIND, "role": ROLE, "format": str, "name": str,
                  "atlas_id": str | null, "label": int | null, ...}, ...]}

``kind`` is what an output is (:data:`KINDS`); ``role`` what it is for (:data:`ROLES`).

Standard library only: the Slicer process reads manifests (:func:`read_manifest`); runs write them (:class:`Manifest`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import MASRefineError
from ..jsonio import read_json, write_json

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


def _format_of(path: str) -> str:
    p = path.lower()
    for suf, fmt in ((".seg.nrrd", "seg.nrrd"), (".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"),
                     (".mha", "mha"), (".csv", "csv"), (".json", "json"), (".png", "png"), (".md", "markdown")):
        if p.endswith(suf):
            return fmt
    return Path(p).suffix.lstrip(".")


def begin_output(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and remove a manifest left by an earlier run (call before writing outputs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = out / MANIFEST_NAME
    if m.exists():
        m.unlink()
    return out


class Manifest:
    """Collects a run's outputs, stage times and QA numbers; :meth:`write` writes manifest.json."""

    def __init__(self, out_dir: str | os.PathLike, inputs: dict[str, Any] | None = None,
                 parameters: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir).resolve()
        self.data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "status": "complete",
                                     "inputs": dict(inputs or {}), "parameters": dict(parameters or {}),
                                     "labels": {}, "stages": [], "atlases": [], "summary": {}, "outputs": []}
        self._t0 = time.perf_counter()

    # -- outputs -----------------------------------------------------------------------------
    def add(self, path: str | os.PathLike, kind: str, role: str, name: str | None = None,
            atlas_id: str | None = None, **meta: Any) -> dict[str, Any]:
        """List one finished output file (must exist, inside the output folder)."""
        if kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r} (known: {', '.join(KINDS)})")
        if role not in ROLES:
            raise ValueError(f"unknown output role {role!r} (known: {', '.join(ROLES)})")
        p = Path(path)
        p = p if p.is_absolute() else self.out_dir / p
        if not p.is_file():
            raise MASRefineError(f"{p}: output listed in the manifest does not exist")
        try:
            rel = p.resolve().relative_to(self.out_dir).as_posix()
        except ValueError:
            raise MASRefineError(f"{p}: outputs must lie inside the output folder {self.out_dir}") from None
        entry = {"path": rel, "kind": kind, "role": role, "format": _format_of(rel),
                 "name": name or Path(rel).name, "atlas_id": atlas_id, **meta}
        self.data["outputs"] = [e for e in self.data["outputs"] if e["path"] != rel] + [entry]
        return entry

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.data["outputs"]

    # -- metadata ----------------------------------------------------------------------------
    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage: ``with manifest.stage("register"): ...`` (recorded only if it finishes): its wall-clock
        ``seconds`` and the CPU seconds of this process (all threads; on a shared machine only these compare runs)."""
        t, c = time.perf_counter(), time.process_time()
        yield
        self.data["stages"].append({"name": name, "seconds": round(time.perf_counter() - t, 3),
                                    "cpu_seconds": round(time.process_time() - c, 3)})

    def stage_seconds(self, key: str = "seconds") -> dict[str, float]:
        """Seconds per stage name (summed over repeats); ``key="cpu_seconds"`` for CPU time."""
        out: dict[str, float] = {}
        for s in self.data["stages"]:
            out[s["name"]] = out.get(s["name"], 0.0) + s.get(key, 0.0)
        return out

    # -- write -------------------------------------------------------------------------------
    def write(self) -> Path:
        """Check every listed file exists, then write ``manifest.json`` atomically (last)."""
        for e in self.outputs:
            if not (self.out_dir / e["path"]).is_file():
                raise MASRefineError(f"{self.out_dir / e['path']}: listed output disappeared before the manifest was written")
        from .. import __version__
        d = dict(self.data)
        d["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        d["seconds_total"] = round(time.perf_counter() - self._t0, 3)
        d["software"] = {"MASRefineLib": __version__, **_versions()}
        return write_json(d, self.out_dir / MANIFEST_NAME)


def _versions() -> dict[str, str]:
    import sys
    out = {"python": sys.version.split()[0]}
    for mod in ("torch", "numpy", "SimpleITK", "monai"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = str(m.__version__)
    return out
