"""``job.json``: the request a caller (the Slicer module, a script) hands to the background worker.

Schema (version 1)::

    {
      "schema_version": 1,
      "pipeline": "segment",                     # optional; a name in PIPELINES (see pipeline_target)
      "inputs": {"target": "/abs/target.nii.gz", "atlas_dir": "/abs/atlas-set"},
      "parameters": {"prereg": "deformable", "refine": "I", "fusion": "jlf", "device": "auto",
                     "preset": "default", ...},  # see PARAMETERS; missing ones take their defaults
      "output_dir": "/abs/out",
      "cancel_file": "/abs/out/.cancel"          # the worker stops when this file appears; inside output_dir
    }

A ``"pipeline": "batch"`` job (``masrefine batch``, :mod:`MASRefineLib.batch`) has ``inputs`` {``targets`` (a folder
of images, a .txt list or a .csv), ``atlas_dir``, optional ``truth`` (a folder)} and, besides :data:`PARAMETERS`,
the parameters :data:`BATCH_PARAMETERS` (``scheduler``, ``workers``, ``threads_per_worker``); :func:`make_batch_job`.

Paths are absolute (:func:`make_job` resolves them). The worker (``python -m MASRefineLib.worker
job.json``) validates the job with :func:`validate_job` and refuses an invalid one with exit code 2.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import MASRefineError
from ..jsonio import write_json
from .files import is_image_file

SCHEMA_VERSION = 1
CANCEL_FILE_NAME = ".cancel"

#: pipeline names the worker knows -> ``"module:function"``; a job may also name one of these functions directly.
#: The only pipelines a worker runs: neither a job file nor the environment adds any (a program that starts the
#: worker in its own process, as the tests do, may add entries before calling :func:`MASRefineLib.worker.main`)
PIPELINES: dict[str, str] = {"segment": "MASRefineLib.pipeline:run_job", "batch": "MASRefineLib.batch:run_job",
                             "atlas": "MASRefineLib.atlasbuild:run_job"}


def pipeline_target(name: Any) -> str:
    """The ``"module:function"`` a job's ``pipeline`` field runs, or :class:`MASRefineError` saying why not.

    A job file must not make the worker import and call arbitrary code: it runs one of :data:`PIPELINES`, named
    (``"segment"``) or as its ``"module:function"``. Nothing is imported here."""
    if not isinstance(name, str):
        name = repr(name)  # refused below, named as written in the job
    if name in PIPELINES:
        return PIPELINES[name]
    if name in PIPELINES.values():
        return name
    raise MASRefineError(f"unknown pipeline {name!r} (known: {', '.join(PIPELINES)}; other functions are not run "
                         "from a job file)")

# name -> (type, allowed values or (min, max) for numbers or None, default, help). ``None`` as a
# default means "the preset decides".
PARAMETERS: dict[str, tuple[type, Any, Any, str]] = {
    "prereg": (str, ("affine", "deformable"), "deformable", "pre-registration of the atlases to the target"),
    # I by default: needs no trained model and gave the best JLF results on knees and brains; IS (the paper's) is
    # for atlas sets whose surrogate segments well (docs/pipeline.md, "Default fusion and refinement")
    "refine": (str, ("none", "I", "IS"), "I", "registration refinement: none, image only (I), image + segmentation (IS)"),
    # jlf by default: VoteNet+ as trainable on a CPU is 9.8-13 Dice points below it on knees and brains
    # (docs/pipeline.md, "Default fusion and refinement"); votenet stays one choice away
    "fusion": (str, ("pv", "wv", "jlf", "staple", "votenet"), "jlf", "label fusion method"),
    "device": (str, ("auto", "cpu", "cuda"), "auto", "torch device"),
    # greedy: the registration preset "greedy" (greedy-style dense-field optimiser, docs/registration.md), every
    # other stage as default; a benchmark arm until the tuning targets decide (docs/pipeline.md)
    "preset": (str, ("fast", "default", "accurate", "greedy"), "default", "speed/accuracy preset of every stage"),
    "alpha": (float, (0.0, 1e6), None, "refinement: weight of the segmentation loss (paper: 3)"),
    "gamma": (float, (0.0, 1e12), None, "refinement: weight of the bending energy (units: see refine.py)"),
    "iterations": (int, (1, 100000), None, "refinement: iterations at the finest level"),
    "train_missing": (bool, None, True, "train missing models (segmenter, VoteNet+) on the atlas set first"),
    "save_atlases": (bool, None, True, "write each atlas's warped image, labels and displacement field"),
    "qa_picture": (bool, None, True, "write the PNG montage of target, fused labels and atlases"),
    "seed": (int, (0, 2 ** 31 - 1), 0, "random seed"),
    "threads": (int, (0, 1024), 0, "CPU threads for torch (0: torch's default)"),
}


#: what refinement uses for the parameters a job leaves at None, and the values the Slicer module's Advanced section
#: shows: ``alpha``, ``gamma`` (mm^2) and ``iterations`` per level, coarse to fine (the ``iterations`` parameter sets
#: the finest). Chosen by measurement: refine.py's DEFAULT_ALPHA, DEFAULT_GAMMA and DEFAULT_ITERATIONS are these
#: (the evidence is noted there and in docs/refinement.md)
REFINE_DEFAULTS: dict[str, Any] = {"alpha": 3.0, "gamma": 40.0, "iterations": (80, 20)}


#: the batch job's parameters besides :data:`PARAMETERS` (``masrefine batch --scheduler --workers --threads-per-worker``)
BATCH_PARAMETERS: dict[str, tuple[type, Any, Any, str]] = {
    "scheduler": (str, None, None, "address of a running Dask scheduler (None: a local cluster)"),
    "workers": (int, (1, 4096), None, "local cluster: worker processes (None: sized from the machine)"),
    "threads_per_worker": (int, (1, 1024), 1, "local cluster: targets each worker runs at once"),
}


#: the ``atlas`` job's parameters (:mod:`MASRefineLib.atlasbuild`: an atlas set from segmented cases)
ATLAS_PARAMETERS: dict[str, tuple[type, Any, Any, str]] = {
    "mode": (str, ("new", "add"), "new", "make a new atlas set, or add the cases to an existing one"),
}


#: the parameters each of :data:`PIPELINES` takes (a job naming another pipeline, as the tests do, is not checked)
_TABLES: dict[str, dict[str, tuple[type, Any, Any, str]]] = {
    "segment": PARAMETERS, "batch": {**PARAMETERS, **BATCH_PARAMETERS}, "atlas": ATLAS_PARAMETERS}


def _kind(pipeline: Any) -> str | None:
    """``"segment"``, ``"batch"`` or ``"atlas"`` for a ``pipeline`` field naming one (by name or as its
    ``"module:function"``), else None."""
    return next((n for n in _TABLES if pipeline in (n, PIPELINES[n])), None)


def _path(p: str | os.PathLike) -> str:
    return str(Path(p).expanduser().resolve())


def _job(pipeline: str, inputs: dict[str, Any], out_dir: str | os.PathLike, cancel_file: str | os.PathLike | None,
         parameters: dict[str, Any]) -> dict[str, Any]:
    """A job dict: ``inputs`` (paths) made absolute; ``cancel_file`` defaults to ``<out_dir>/.cancel``."""
    out = Path(_path(out_dir))
    return {"schema_version": SCHEMA_VERSION, "pipeline": pipeline, "inputs": {k: _path(v) for k, v in inputs.items()},
            "parameters": parameters, "output_dir": str(out),
            "cancel_file": _path(cancel_file) if cancel_file else str(out / CANCEL_FILE_NAME)}


def make_atlas_job(cases: str | os.PathLike, atlas_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   mode: str = "new", cancel_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """An ``atlas`` job: the cases file ``{"cases": [{id, image, segmentation}]}`` made into a new atlas set in
    ``atlas_dir`` (``mode="new"``) or added to it (``"add"``); ``out_dir`` holds only the job's cancel file."""
    return _job("atlas", {"cases": cases, "atlas_dir": atlas_dir}, out_dir, cancel_file, {"mode": mode})


def default_parameters(pipeline: str = "segment") -> dict[str, Any]:
    table = _TABLES["batch"] if _kind(pipeline) == "batch" else PARAMETERS
    return {k: v[2] for k, v in table.items()}


def make_job(target_path: str | os.PathLike, atlas_dir: str | os.PathLike, out_dir: str | os.PathLike,
             cancel_file: str | os.PathLike | None = None, pipeline: str = "segment", **params: Any) -> dict[str, Any]:
    """A job dict with absolute paths and every parameter (defaults filled in, ``params`` override).

    ``cancel_file`` defaults to ``<out_dir>/.cancel``. Nothing is written or checked here (see
    :func:`validate_job`, :func:`write_job`)."""
    p = default_parameters() if pipeline == "segment" else {}
    return _job(pipeline, {"target": target_path, "atlas_dir": atlas_dir}, out_dir, cancel_file, {**p, **params})


def make_batch_job(targets: str | os.PathLike, atlas_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   truth: str | os.PathLike | None = None, cancel_file: str | os.PathLike | None = None,
                   **params: Any) -> dict[str, Any]:
    """A ``batch`` job (see the module doc) with absolute paths and every parameter (defaults filled in)."""
    inputs = {"targets": targets, "atlas_dir": atlas_dir, **({"truth": truth} if truth is not None else {})}
    return _job("batch", inputs, out_dir, cancel_file, {**default_parameters("batch"), **params})


def write_job(job: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``job`` as JSON, atomically. Returns the path."""
    return write_json(job, Path(path))


def read_job(path: str | os.PathLike) -> dict[str, Any]:
    """Read a job file (:class:`MASRefineError` naming the file when it is missing, unreadable, not UTF-8, not
    JSON or not a JSON object: :func:`MASRefineLib.jsonio.read_json`)."""
    from ..jsonio import read_json
    job = read_json(path, "job file")
    if not isinstance(job, dict):
        raise MASRefineError(f"{path}: a job must be a JSON object")
    return job


def check_value(name: str, value: Any, table: dict[str, tuple[type, Any, Any, str]] = PARAMETERS) -> str | None:
    typ, allowed, _, _ = table[name]
    if value is None and table[name][2] is None:
        return None
    if typ is bool:
        return None if isinstance(value, bool) else f"parameter '{name}' must be true or false, got {value!r}"
    if typ in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (typ is float or float(value).is_integer())
        if not ok:
            return f"parameter '{name}' must be {'an integer' if typ is int else 'a number'}, got {value!r}"
        lo, hi = allowed
        if not lo <= value <= hi:
            return f"parameter '{name}' must be between {lo:g} and {hi:g}, got {value!r}"
        return None
    if allowed is None:
        return None if isinstance(value, str) and value else f"parameter '{name}' must be a text, got {value!r}"
    if not isinstance(value, str) or value not in allowed:
        return f"parameter '{name}' must be one of {', '.join(allowed)}, got {value!r}"
    return None


def _path_problem(name: str, v: Any, problems: list[str]) -> bool:
    """Append why ``v`` is not an absolute path (a job names every file absolutely: the worker's working
    folder is not the caller's); True when there was a problem."""
    if not isinstance(v, str) or not v:
        problems.append(f"{name} must be a path")
    elif not os.path.isabs(v):
        problems.append(f"{name} must be an absolute path, got {v!r}")
    else:
        return False
    return True


def cancel_file_inside(cancel_file: Any, output_dir: Any) -> bool:
    """True when ``cancel_file`` is a path inside ``output_dir`` (links resolved). The runner deletes the cancel
    file when a job starts and writes it to cancel: a job file must not make it write anywhere else."""
    if not (isinstance(cancel_file, str) and isinstance(output_dir, str) and cancel_file and output_dir
            and os.path.isabs(cancel_file) and os.path.isabs(output_dir)):
        return False
    c, o = os.path.realpath(cancel_file), os.path.realpath(output_dir)
    return c != o and os.path.commonpath([c, o]) == o


def validate_job(job: Any, check_files: bool = True) -> list[str]:
    """Problems with a job, one line each (empty: valid). ``check_files`` also checks that the
    target image and the atlas set's ``atlas.json`` exist."""
    if not isinstance(job, dict):
        return ["a job must be a JSON object"]
    problems: list[str] = []
    version = job.get("schema_version")
    if version != SCHEMA_VERSION:
        problems.append(f"unsupported schema_version {version!r} (this MASRefine reads {SCHEMA_VERSION})")
    pipeline = job.get("pipeline", "segment")
    try:
        pipeline_target(pipeline)
    except MASRefineError as e:
        problems.append(str(e))
    inputs = job.get("inputs")
    kind = _kind(pipeline)
    batch, atlas = kind == "batch", kind == "atlas"
    first = "targets" if batch else "cases" if atlas else "target"
    new_atlas = atlas and isinstance(job.get("parameters"), dict) and job["parameters"].get("mode", "new") == "new"
    if not isinstance(inputs, dict):
        problems.append(f"'inputs' must be an object with '{first}' and 'atlas_dir'")
        inputs = {}
    for key in (first, "atlas_dir") + (("truth",) if batch and inputs.get("truth") is not None else ()):
        v = inputs.get(key)
        if _path_problem(f"inputs.{key}", v, problems) or not check_files:
            continue
        if key == "cases":
            if not os.path.isfile(v):
                problems.append(f"{v}: cases file not found")
        elif key == "atlas_dir" and new_atlas:
            if os.path.exists(v) and not os.path.isdir(v):
                problems.append(f"{v}: inputs.atlas_dir exists and is not a folder")
        elif key == "targets":
            if not os.path.exists(v):
                problems.append(f"{v}: targets not found (a folder of images, a .txt list or a .csv)")
        elif key == "truth":
            if not os.path.isdir(v):
                problems.append(f"{v}: inputs.truth must be a folder of reference label maps")
        elif key == "target":
            if not os.path.isfile(v):
                problems.append(f"{v}: target image not found")
            elif not is_image_file(v):
                problems.append(f"{v}: target is not a NIfTI/NRRD/MHA image file")
        elif not os.path.isfile(os.path.join(v, "atlas.json")):
            problems.append(f"{v}: not an atlas set (no atlas.json; build one with 'masrefine atlas init')")
    for key in ("output_dir", "cancel_file"):
        _path_problem(f"'{key}'", job.get(key), problems)
    out = job.get("output_dir")
    if isinstance(out, str) and os.path.isabs(out) and isinstance(job.get("cancel_file"), str) \
            and os.path.isabs(job["cancel_file"]) and not cancel_file_inside(job["cancel_file"], out):
        problems.append(f"{job['cancel_file']}: cancel_file must lie inside output_dir {out}")
    if isinstance(out, str) and os.path.exists(out) and not os.path.isdir(out):
        problems.append(f"{out}: output_dir exists and is not a folder")
    params = job.get("parameters", {})
    if not isinstance(params, dict):
        problems.append("'parameters' must be an object")
    elif kind:
        table = _TABLES[kind]
        for name, value in params.items():
            if name not in table:
                problems.append(f"unknown parameter '{name}' (known: {', '.join(table)})")
                continue
            msg = check_value(name, value, table)
            if msg:
                problems.append(msg)
    known = {"schema_version", "pipeline", "inputs", "parameters", "output_dir", "cancel_file"}
    for k in job:
        if k not in known:
            problems.append(f"unknown job field '{k}'")
    return problems


def resolved_parameters(job: dict[str, Any]) -> dict[str, Any]:
    """The job's parameters with defaults filled in for the ones it leaves out."""
    p = default_parameters(job.get("pipeline", "segment"))
    p.update(job.get("parameters") or {})
    return p
