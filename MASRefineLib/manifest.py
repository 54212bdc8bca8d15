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
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import MASRefineError
from .jsonio import json_default
from .protocol.atomic import atomic_write_text
# the schema's constants and the reader live in the standard-library protocol package (the Slicer process reads manifests)
from .protocol.manifest import KINDS, MANIFEST_NAME, ROLES, SCHEMA_VERSION, read_manifest  # noqa: F401


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

    def add_stage_time(self, name: str, seconds: float, cpu_seconds: float | None = None) -> None:
        """Record a stage's wall-clock ``seconds`` and, if given, the CPU seconds of this process (all
        threads): on a shared machine only the latter compares runs."""
        entry = {"name": name, "seconds": round(float(seconds), 3)}
        if cpu_seconds is not None:
            entry["cpu_seconds"] = round(float(cpu_seconds), 3)
        self.data["stages"].append(entry)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage: ``with manifest.stage("register"): ...`` (recorded only if it finishes)."""
        t, c = time.perf_counter(), time.process_time()
        yield
        self.add_stage_time(name, time.perf_counter() - t, time.process_time() - c)

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
        from . import __version__
        d = dict(self.data)
        d["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        d["seconds_total"] = round(time.perf_counter() - self._t0, 3)
        d["software"] = {"MASRefineLib": __version__, **_versions()}
        return atomic_write_text(json.dumps(d, indent=1, default=json_default, allow_nan=True) + "\n",
                                 self.out_dir / MANIFEST_NAME)


def _versions() -> dict[str, str]:
    import sys
    out = {"python": sys.version.split()[0]}
    for mod in ("torch", "numpy", "SimpleITK", "monai"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = str(m.__version__)
    return out
