"""The end-to-end pipeline: atlas set + target -> pre-registration -> refinement -> fusion -> outputs.

:func:`segment` is what ``masrefine segment`` and the background worker (:func:`run_job`) run. Its
output folder::

    OUT/fused_labels.nii.gz, .seg.nrrd      fused segmentation (label values and names of the atlas set)
    OUT/posteriors/<value>_<name>.nii.gz    per-label posterior probability (float32, 0..1)
    OUT/atlases/<id>_image.nrrd             per atlas: refined warped image (normalised intensities)
    OUT/atlases/<id>_label.nii.gz, .seg.nrrd   refined warped labels
    OUT/atlases/<id>_field.nrrd             total displacement field (LPS mm; a Slicer grid transform)
    OUT/atlases/<id>_jacobian.nrrd          its Jacobian determinant
    OUT/atlases/<id>_image_unrefined.nrrd, <id>_label_unrefined.nii.gz   before refinement (compare)
    (float32 volumes are written raw, labels and maps gzipped: imageio.write_image)
    OUT/atlases/<id>_weights.nii.gz         fusion weight map (methods that have one)
    OUT/atlases/report.json                 the WarpedSet report (per-atlas info)
    OUT/qa.csv, OUT/qa.png                  per-atlas QA numbers and the QA montage
    OUT/metrics.csv, metrics.json           only when a reference segmentation (truth) is given
    OUT/manifest.json                       written last, atomically (see manifest.py)

Per-atlas QA numbers: ``similarity`` (global NCC of the warped atlas image with the target),
``agreement`` (mean Dice over labels of the atlas's warped labels with the fused result),
``folding_fraction`` (fraction of voxels with Jacobian determinant <= 0 of its total field),
``mean_weight`` (its mean fusion weight where any atlas has a label), and the seconds spent on it.

When a stage cannot run as asked (:func:`refine_stage`: variant IS handed no segmenter), it falls back as
documented in its function and says so in a warning and in the manifest (``summary.fallbacks``).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from . import segmenter as segmod
from .atlas import AtlasSet
from .errors import MASRefineError
from .fusion import fuse
from .fusion.votenet import VoteNetModel, model_name, train_for_atlas_set
from .geometry import Grid
from .imageio import (array_to_image, atomic_path, image_stem, normalize_intensity, read_grid, read_image, read_label,
                      require_file, run_writers, write_figure, write_image)
from .labels import LabelTable, write_label_outputs
from .manifest import Manifest, begin_output
from .outputs import atlas_set_inputs, inside, prepare_output_dir
from .progress import ProgressCallback, ProgressEvent, report
from .protocol.jobs import PARAMETERS
from .refine import DEFAULT_ITERATIONS
from .refine import refine as refine_warped
from .registration import AtlasInput, get_params, register
from .warped import WarpedSet

log = logging.getLogger("MASRefineLib.pipeline")

# the choices and defaults of a run: the job protocol's parameters (one list, shared by the CLI, the worker and Slicer)
PREREGS, REFINES, FUSIONS, PRESETS = (PARAMETERS[n][1] for n in ("prereg", "refine", "fusion", "preset"))


@dataclass
class SegmentOptions:
    """Settings of one run (see ``masrefine segment --help`` and :data:`MASRefineLib.protocol.jobs.PARAMETERS`)."""
    # every default is protocol.jobs.PARAMETERS' (docs/pipeline.md); the comments say what each is
    prereg: str = PARAMETERS["prereg"][2]
    refine: str = PARAMETERS["refine"][2]
    fusion: str = PARAMETERS["fusion"][2]
    device: str = PARAMETERS["device"][2]
    preset: str = PARAMETERS["preset"][2]
    alpha: Optional[float] = PARAMETERS["alpha"][2]            # refinement: weight of L_seg (None: refine.py's default)
    gamma: Optional[float] = PARAMETERS["gamma"][2]            # refinement: bending energy, mm^2 (None: default)
    iterations: Optional[int] = PARAMETERS["iterations"][2]    # at the finest level (None: refine.py's default)
    train_missing: bool = PARAMETERS["train_missing"][2]       # train missing models on the atlas set first
    save_atlases: bool = PARAMETERS["save_atlases"][2]
    qa_picture: bool = PARAMETERS["qa_picture"][2]
    seed: int = PARAMETERS["seed"][2]
    threads: int = PARAMETERS["threads"][2]                    # torch CPU threads (0: leave torch's default)

    def __post_init__(self) -> None:
        for name, allowed in (("prereg", PREREGS), ("refine", REFINES), ("fusion", FUSIONS), ("preset", PRESETS)):
            if getattr(self, name) not in allowed:
                raise MASRefineError(f"option {name!r} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> "SegmentOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Preloaded:
    """What a long-lived process (a ``masrefine batch`` worker) loads once and hands to every :func:`segment`
    call, so that a cohort does not re-read the atlas set and the models per target: the atlas set (of the
    same folder as ``segment``'s ``atlas_dir``; e.g. one that keeps its images in memory) and the models the
    options need (None: loaded from the atlas set's ``models/`` as usual)."""
    atlas_set: Any                      # an atlas.AtlasSet
    segmenter: Any = None               # the surrogate segmenter (refinement IS)
    votenet: Any = None                 # the VoteNet+ model (fusion votenet): fusion.votenet.VoteNetModel


# ------------------------------------------------------------------------------------------ progress
class _Plan:
    """Maps each stage's 0..1 onto the whole run (``data["overall"]`` of progress events)."""

    def __init__(self, progress: Optional[ProgressCallback], weights: dict[str, float]):
        self.progress = progress
        total = sum(weights.values()) or 1.0
        self.start: dict[str, float] = {}
        self.width: dict[str, float] = {}
        acc = 0.0
        self.overall = 0.0
        for k, w in weights.items():
            self.start[k], self.width[k] = acc / total, w / total
            acc += w

    def cb(self, stage: str) -> Optional[ProgressCallback]:
        if self.progress is None:
            return None
        s, w = self.start.get(stage, 0.0), self.width.get(stage, 0.0)

        def f(ev: ProgressEvent) -> None:
            data = dict(ev.data)
            part = data.pop("_part", ev.fraction)  # see _part(): a sub-task's share of this stage
            # never backwards (a stage may restart its own fraction for a second pass)
            self.overall = max(self.overall, min(s + w * part, s + w))
            self.progress(ProgressEvent(ev.stage, ev.fraction, ev.message, {**data, "overall": self.overall}))
        return f

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        report(self.cb(stage), stage, fraction, message)


def _part(progress: Optional[ProgressCallback], lo: float, hi: float) -> Optional[ProgressCallback]:
    """A sub-task's callback covering lo..hi of its stage's share of the overall progress (its own
    stage fraction is passed on unchanged)."""
    if progress is None:
        return None

    def f(ev: ProgressEvent) -> None:
        progress(ProgressEvent(ev.stage, ev.fraction, ev.message, {**ev.data, "_part": lo + (hi - lo) * ev.fraction}))
    return f


# ------------------------------------------------------------------------------------------ stages
def load_inputs(target_path: str | os.PathLike, atlas_dir: str | os.PathLike, atlas_set=None):
    """(target image, normalised target array, AtlasSet) with the checks a user needs; ``atlas_set``: the set
    of ``atlas_dir`` already loaded (:class:`Preloaded`)."""
    target = read_image(target_path)
    aset = atlas_set if atlas_set is not None else AtlasSet.load(atlas_dir)
    if len(aset) == 0:
        raise MASRefineError(f"{aset.json_path}: the atlas set has no atlases")
    return target, normalize_intensity(sitk.GetArrayFromImage(target)), aset


def register_stage(target_path: str, target: sitk.Image, aset, opts: SegmentOptions, device: torch.device,
                   progress: Optional[ProgressCallback]) -> WarpedSet:
    """Pre-registration of every atlas to the target (``opts.prereg``), by the registration engine; skipped
    atlases are warned about by :func:`registration.register` (once)."""
    params = get_params(opts.preset, stage=opts.prereg, seed=opts.seed)
    inputs = [AtlasInput(aid, load=(lambda a=aid: aset.read(a)), source_image=str(aset.image_path(aid)),
                         source_label=str(aset.label_path(aid))) for aid in aset.ids]
    return register(target, inputs, aset.label_table, params=params, device=device, progress=progress,
                    target_path=target_path)


@dataclass
class Fused:
    labels: np.ndarray                                   # (Z, Y, X) uint16
    posterior_values: list[int] = field(default_factory=list)       # label values with a posterior map
    posterior_map: Optional[Callable[[int], np.ndarray]] = None      # value -> (Z, Y, X) float32, on demand
    weights: Optional[np.ndarray] = None                 # (B, Z, Y, X) float32 per-atlas weights
    info: dict[str, Any] = field(default_factory=dict)


def fuse_stage(ws: WarpedSet, target_arr: np.ndarray, aset, opts: SegmentOptions, device: torch.device,
               progress: Optional[ProgressCallback], votenet=None) -> Fused:
    """Label fusion (``opts.fusion``, :func:`fusion.fuse`). ``votenet``: a loaded VoteNet+ model (else the atlas
    set's is read)."""
    report(progress, "fuse", 0.0, opts.fusion)
    kw = {}
    if opts.fusion == "votenet":
        kw["model"] = votenet if votenet is not None else votenet_model_path(aset, opts.prereg, opts.refine)
    r = fuse(ws, target_arr, method=opts.fusion, device=device, progress=progress, **kw)
    out = Fused(np.asarray(r.labels, np.uint16), [int(v) for v in r.posteriors.values],
                lambda v, P=r.posteriors: P.map(int(v)), r.weights,
                {"method": r.method, "params": r.params, "seconds": r.seconds, **(r.info or {})})
    report(progress, "fuse", 1.0, "done")
    return out


# ------------------------------------------------------------------------------------------ QA
def _dice_mean(a: np.ndarray, b: np.ndarray, values) -> float:
    ds = []
    for v in values:
        x, y = a == v, b == v
        s = int(x.sum()) + int(y.sum())
        if s:
            ds.append(2.0 * int((x & y).sum()) / s)
    return float(np.mean(ds)) if ds else float("nan")


def atlas_qa(ws: WarpedSet, target_arr: np.ndarray, fused: Fused) -> list[dict[str, Any]]:
    """Per-atlas QA numbers (see the module doc)."""
    from .losses import ncc
    values = [v for v in ws.label_table]
    t = torch.from_numpy(target_arr)[None, None].float()
    fg = fused.labels > 0
    if fused.weights is not None:
        fg = fg | (np.stack([a.label for a in ws.atlases]) > 0).any(0)
    rows = []
    for i, a in enumerate(ws.atlases):
        sim = float(ncc(torch.from_numpy(a.image)[None, None].float(), t)[0])
        row = {"id": a.id, "similarity": round(sim, 4),
               "agreement": round(_dice_mean(a.label, fused.labels, values), 4),
               "folding_fraction": float(a.info.get("folding_fraction", float("nan")))}
        if fused.weights is not None:
            row["mean_weight"] = round(float(fused.weights[i][fg].mean()), 4) if fg.any() else float("nan")
        if "seconds" in a.info:
            row["seconds"] = round(float(a.info["seconds"]), 2)
        rows.append(row)
    return rows


def write_qa_csv(rows: list[dict[str, Any]], path: Path) -> list[str]:
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_path(path) as tmp:  # a full disk is one line and leaves no temporary file
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow(r)
    return cols


def _best_slices(labels: np.ndarray) -> tuple[int, int, int]:
    """(z, y, x) indices of the slices with the most labelled voxels."""
    fg = labels > 0
    if not fg.any():
        return tuple(s // 2 for s in labels.shape)
    return (int(np.argmax(fg.sum((1, 2)))), int(np.argmax(fg.sum((0, 2)))), int(np.argmax(fg.sum((0, 1)))))


def qa_picture(path: Path, target_arr: np.ndarray, fused: np.ndarray, ws: WarpedSet, qa: list[dict[str, Any]],
               title: str = "") -> Path:
    """PNG montage: the target with the fused labels in three orientations, then every atlas (warped,
    with its labels) at the same slice, titled with its agreement; written atomically."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    grid = ws.target_grid
    vmax = max(ws.label_table) if ws.label_table else 1
    colors = np.zeros((vmax + 1, 4))
    for v, lab in ws.label_table.items():
        colors[v, :3] = np.asarray(lab.color) / 255.0
        colors[v, 3] = 0.45
    cmap = ListedColormap(colors)
    z, y, x = _best_slices(fused)
    sz, sy, sx = grid.spacing[2], grid.spacing[1], grid.spacing[0]
    views = [("axial", lambda a: a[z], sy / sx), ("coronal", lambda a: a[:, y][::-1], sz / sx),
             ("sagittal", lambda a: a[:, :, x][::-1], sz / sy)]
    # the view with the most labelled area shows each atlas
    areas = [int((v[1](fused) > 0).sum()) for v in views]
    main = views[int(np.argmax(areas))]
    n = len(ws.atlases)
    ncol = max(3, min(6, n))
    nrow = 1 + int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.7 * nrow), squeeze=False)
    for axr in axes:
        for ax in axr:
            ax.axis("off")

    def show(ax, img, lab, view, ttl):
        name, cut, aspect = view
        ax.imshow(cut(img), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        ax.imshow(cut(lab).astype(int), cmap=cmap, vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
        ax.set_title(ttl, fontsize=8)

    for c, view in enumerate(views):
        show(axes[0][c], target_arr, fused, view, f"target + fused ({view[0]})")
    if ncol > 3:  # the target alone in the view the atlases are shown in, to compare with them
        show(axes[0][3], target_arr, np.zeros_like(fused), main, f"target ({main[0]})")
    for i, a in enumerate(ws.atlases):
        ax = axes[1 + i // ncol][i % ncol]
        q = qa[i] if i < len(qa) else {}
        show(ax, a.image, a.label, main, f"{a.id}  agree {q.get('agreement', float('nan')):.2f}")
    if title:
        fig.suptitle(title, fontsize=9)
    return write_figure(fig, path, dpi=80)


# ------------------------------------------------------------------------------------------ outputs
def _write_atlases(out: Path, ws: WarpedSet, pre: Optional[WarpedSet], fused: Fused, m: Manifest,
                   progress: Optional[ProgressCallback], workers: int = 1) -> None:
    """Every atlas's refined image, labels and field (``ws.save``), then its QA maps (Jacobian determinant,
    the unrefined image and labels, its fusion weights), each on ``workers`` threads; manifest entries
    are added in atlas order once the files exist."""
    from .fields import jacobian_image
    adir = out / "atlases"
    report(progress, "write", 0.2, f"{len(ws.atlases)} refined atlases")
    report_path = ws.save(adir, workers=workers)
    m.add(report_path, "json", "report", name="atlases report")
    unrefined = {b.id: b for b in pre.atlases} if pre is not None else {}
    grid = ws.target_grid

    def extras(i: int, a) -> Callable[[], list[tuple[Path, str, str]]]:
        def write() -> list[tuple[Path, str, str]]:
            done = [(write_image(jacobian_image(a.field, grid), inside(adir, f"{a.id}_jacobian.nrrd"), compress=False),
                     "volume", "atlas-jacobian")]
            b = unrefined.get(a.id)
            if b is not None:
                done.append((write_image(array_to_image(b.image.astype(np.float32), grid),
                                         inside(adir, f"{a.id}_image_unrefined.nrrd"), compress=False),
                             "volume", "atlas-image-unrefined"))
                done.append((write_image(array_to_image(b.label.astype(np.uint16), grid),
                                         inside(adir, f"{a.id}_label_unrefined.nii.gz")),
                             "segmentation", "atlas-labels-unrefined"))
            if fused.weights is not None:
                done.append((write_image(array_to_image(fused.weights[i].astype(np.float32), grid),
                                         inside(adir, f"{a.id}_weights.nii.gz")), "volume", "atlas-weights"))
            return done
        return write

    report(progress, "write", 0.6, "atlas QA maps")
    written = run_writers([extras(i, a) for i, a in enumerate(ws.atlases)], workers)
    for a, files in zip(ws.atlases, written):
        f = ws.files(a.id)
        m.add(inside(adir, f["image"]), "volume", "atlas-image", atlas_id=a.id)
        m.add(inside(adir, f["segmentation"]), "segmentation", "atlas-labels", atlas_id=a.id)
        m.add(inside(adir, f["label"]), "segmentation", "atlas-labels", atlas_id=a.id)
        m.add(inside(adir, f["field"]), "transform", "atlas-field", atlas_id=a.id, moving=a.source_image)
        for path, kind, role in files:
            m.add(path, kind, role, atlas_id=a.id)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "label"


def _training_weight(atlas_dir, opts: SegmentOptions) -> float:
    """Share of the overall progress for training models (when they are missing and will be trained)."""
    models = Path(atlas_dir) / "models"
    w = 0.0
    if opts.train_missing and opts.refine == "IS" and not (models / "segmenter.json").exists():
        w += 0.5
    if opts.train_missing and opts.fusion == "votenet" and votenet_model_path(atlas_dir, opts.prereg, opts.refine) is None:
        w += 0.7
    return w


def segment(target_path: str | os.PathLike, atlas_dir: str | os.PathLike, out_dir: str | os.PathLike,
            options: SegmentOptions | None = None, progress: Optional[ProgressCallback] = None,
            truth: str | os.PathLike | None = None, groups=None, out_option: str = "out_dir", atlas_option: str = "atlas_dir",
            preloaded: Optional[Preloaded] = None) -> dict[str, Any]:
    """Segment ``target_path`` with the atlas set at ``atlas_dir`` into ``out_dir`` (layout: module doc).

    ``preloaded``: the atlas set of ``atlas_dir`` and its models, already loaded by the caller (a batch worker
    segmenting many targets: :mod:`MASRefineLib.batch`); the results are the same as without it.

    ``out_dir`` must be new or empty, or an earlier ``segment`` output, and apart from every input
    (:func:`MASRefineLib.outputs.prepare_output_dir`; its errors name ``out_option``, e.g. the CLI's ``--out``,
    and ``atlas_option``, e.g. ``--atlases``: the caller's names for them).

    ``truth``: an optional reference label map of the target; then ``metrics.csv``/``.json`` are
    written (volume Dice, surface Dice, ASD, HD95 per label and per group of ``groups``, a mapping
    name -> label values or anything :func:`metrics.parse_groups` reads). Returns ``{"manifest",
    "output_dir", "fused", "summary"}``. Raises :class:`MASRefineError` for bad inputs and
    :class:`~MASRefineLib.errors.Cancelled` when ``progress`` asks to stop (no manifest then).
    """
    from .device import resolve_device
    opts = options or SegmentOptions()
    if preloaded is not None and Path(preloaded.atlas_set.root).resolve() != Path(atlas_dir).resolve():
        raise ValueError(f"preloaded atlas set {preloaded.atlas_set.root} is not the atlas set {atlas_dir}")
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    torch.manual_seed(opts.seed)
    device = resolve_device(opts.device)
    # input files are files (a folder named as the target would make every output folder "lie inside" it)
    target_path = str(require_file(target_path).resolve())
    if truth:
        require_file(truth)
    # before anything is written (the atlas set's own problems are reported when it is loaded below)
    out = prepare_output_dir(out_dir, command="segment", option=out_option,
                             inputs=[*atlas_set_inputs(atlas_dir, atlas_option, unreadable_ok=True),
                                     ("target image", target_path),
                                     ("reference label map", truth)])
    # a reference on another grid is refused before an earlier run's manifest is removed
    ref = read_label(truth) if truth else None
    if ref is not None and not Grid.from_image(ref).isclose(target_grid := read_grid(target_path)):  # header only
        raise MASRefineError(f"{truth}: reference label map and target {target_path} are on different grids "
                             f"({Grid.from_image(ref).difference(target_grid)})")
    out = begin_output(out.resolve())
    weights = {"load": 0.03, "models": _training_weight(atlas_dir, opts), "register": 0.4,
               "refine": 0.3 if opts.refine != "none" else 0.0, "fuse": 0.12, "write": 0.1, "qa": 0.05}
    plan = _Plan(progress, weights)
    m = Manifest(out, {"target": target_path, "atlas_dir": str(Path(atlas_dir).resolve()),
                       **({"truth": str(Path(truth).resolve())} if truth else {})}, opts.to_json())
    fallbacks: list[str] = []

    with m.stage("load"):
        plan.report("load", 0.0, "reading inputs")
        target, target_arr, aset = load_inputs(target_path, atlas_dir,
                                               preloaded.atlas_set if preloaded is not None else None)
        grid = Grid.from_image(target)
        m.set("labels", aset.label_table.to_json_dict())
        m.set("target_grid", grid.to_json())
        plan.report("load", 1.0, f"{len(aset)} atlases")

    segmenter = votenet = None
    if opts.refine == "IS" or opts.fusion == "votenet":
        with m.stage("models"):
            if preloaded is not None and (opts.refine != "IS" or preloaded.segmenter is not None) and \
                    (opts.fusion != "votenet" or preloaded.votenet is not None):
                segmenter, votenet = preloaded.segmenter, preloaded.votenet  # loaded once by the caller
            else:
                models = ensure_models(aset, opts, device, plan.cb("models"))
                segmenter, votenet = models.segmenter, models.votenet

    with m.stage("register"):
        ws = register_stage(target_path, target, aset, opts, device, plan.cb("register"))
        ws.target_path = target_path
    if not ws.atlases:
        raise MASRefineError(f"{aset.json_path}: no atlas could be registered to {target_path}")
    pre = None
    if opts.refine != "none":
        with m.stage("refine"):
            pre = ws
            ws = refine_stage(ws, target_arr, opts, segmenter, device, plan.cb("refine"), fallbacks)
    with m.stage("fuse"):
        fused = fuse_stage(ws, target_arr, aset, opts, device, plan.cb("fuse"), votenet)

    with m.stage("write"):
        wcb = plan.cb("write")
        report(wcb, "write", 0.0, "fused labels")
        paths = write_label_outputs(array_to_image(fused.labels, grid), aset.label_table, out / "fused_labels")
        m.add(paths["seg_nrrd"], "segmentation", "fused-labels", name="fused labels")
        m.add(paths["nifti"], "segmentation", "fused-labels", name="fused labels")
        workers = max(1, torch.get_num_threads())

        def posterior(v: int, nm: str) -> Callable[[], Path]:
            return lambda: write_image(array_to_image(fused.posterior_map(v).astype(np.float32), grid),
                                       inside(out / "posteriors", f"{v}_{_safe(nm)}.nii.gz"))

        names = {v: aset.label_table[v].name if v in aset.label_table else f"label {v}"
                 for v in sorted(fused.posterior_values) if v != 0}
        # one map per writer thread in memory at a time (~150 labels for brains)
        for (v, nm), pp in zip(names.items(), run_writers([posterior(v, nm) for v, nm in names.items()], workers)):
            m.add(pp, "volume", "posterior", name=f"P({nm})", label=int(v))
        if opts.save_atlases:
            _write_atlases(out, ws, pre, fused, m, wcb, workers)
        report(wcb, "write", 1.0, "done")

    with m.stage("qa"):
        qcb = plan.cb("qa")
        report(qcb, "qa", 0.0, "QA numbers")
        qa = atlas_qa(ws, target_arr, fused)
        cols = write_qa_csv(qa, out / "qa.csv")
        m.add(out / "qa.csv", "table", "qa-table", name="atlas QA", columns=cols)
        m.set("atlases", [{"id": r["id"], "qa": {k: v for k, v in r.items() if k != "id"}} for r in qa])
        if opts.qa_picture:
            report(qcb, "qa", 0.4, "QA picture")
            try:
                qa_picture(out / "qa.png", target_arr, fused.labels, ws, qa,
                           f"{image_stem(target_path)}: {opts.prereg}, refine {opts.refine}, {opts.fusion}")
                m.add(out / "qa.png", "picture", "qa-picture", name="QA montage")
            except ImportError:
                log.warning("matplotlib is not installed: no QA picture (pip install matplotlib)")
        metrics = None
        if truth:
            report(qcb, "qa", 0.8, "metrics against the reference")
            metrics = _write_metrics(out, fused.labels, grid, ref, str(truth), aset.label_table, m, groups)
        report(qcb, "qa", 1.0, "done")

    summary = {"target": target_path, "atlases": len(ws.atlases), "failed": ws.failed,
               "stage": ws.stage, "fusion": fused.info.get("method", opts.fusion), "fallbacks": fallbacks,
               "seconds": m.stage_seconds(), "cpu_seconds": m.stage_seconds("cpu_seconds")}
    if metrics is not None:
        summary["metrics"] = metrics
    m.set("summary", summary)
    manifest = m.write()
    return {"manifest": str(manifest), "output_dir": str(out), "fused": str(paths["nifti"]), "summary": summary}


def refine_stage(ws: WarpedSet, target_arr: np.ndarray, opts: SegmentOptions, segmenter, device: torch.device,
                 progress: Optional[ProgressCallback], fallbacks: list[str]) -> WarpedSet:
    """Registration refinement (paper Eq. 3-6), variant ``opts.refine``."""
    kw: dict[str, Any] = {}
    if opts.alpha is not None:
        kw["alpha"] = float(opts.alpha)
    if opts.gamma is not None:
        kw["gamma"] = float(opts.gamma)
    if opts.iterations is not None:  # the finest level's; coarser levels keep their defaults
        kw["iterations"] = (*DEFAULT_ITERATIONS[:-1], int(opts.iterations))
    variant = opts.refine
    if variant == "IS" and segmenter is None:
        fallbacks.append("refine: no segmenter available; variant I used instead of IS")
        log.warning("no surrogate segmenter available: refinement variant I instead of IS")
        variant = "I"
    return refine_warped(ws, target_arr, variant, segmenter=segmenter, device=device, progress=progress, **kw)


def votenet_model_path(aset, prereg: str | None = None, refine: str | None = None) -> Optional[Path]:
    """The VoteNet+ model of an atlas set for a pre-registration kind (and refinement variant): the first of
    ``models/votenet-<prereg>-<refine>.json`` (``masrefine train votenet --refine``), ``votenet-<prereg>.json``
    and ``votenet.json`` that exists; None when there is none. ``aset``: an atlas set or its folder."""
    models = Path(getattr(aset, "models_dir", None) or Path(aset) / "models")
    names = ([model_name(prereg, refine)] if prereg and refine and refine != "none" else []) + \
        ([model_name(prereg)] if prereg else []) + ["votenet"]
    for n in names:
        p = models / f"{n}.json"
        if p.exists():
            return p
    return None


#: surrogate-segmenter training settings per preset; the others are segmenter.py's defaults or longer.
#: ``fast``, measured on the 64^3 phantom (6 atlases, one held out): 12 epochs x 12 steps of 32^3 patches
#: reached validation Dice 0.67/0.28/0.31/0.24 (femur, fem. cartilage, tibia, tib. cartilage) and made
#: refinement IS worse than I; 20 x 20 steps of 48^3 patches (lr 3e-3) reached 0.94/0.76/0.94/0.84.
SEGMENTER_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"epochs": 16, "steps_per_epoch": 20, "patch_size": 48, "learning_rate": 3e-3},
    "default": {},
    # 600 epochs: on 20 knees validation Dice 0.79 (150) -> 0.89, and IS then lifts the 8-atlas vote's
    # cartilage by +0.026 instead of -0.002 (docs/refinement.md, "600-epoch surrogate"); ~40 CPU min for knees
    "accurate": {"epochs": 600},
}


def _ensure_segmenter(aset, opts: SegmentOptions, device: torch.device, progress: Optional[ProgressCallback]):
    path = Path(aset.models_dir) / f"{segmod.MODEL_NAME}.json"
    if path.exists():
        return segmod.load_segmenter(path, device)
    if not opts.train_missing:
        raise MASRefineError(f"{aset.models_dir}: no surrogate segmenter for refinement IS; train one with "
                             f"'masrefine train segmenter {aset.root}' (or refinement I)")
    log.info(f"training the surrogate segmenter on the atlas set first (once; stored in {aset.models_dir})")
    settings = segmod.SegmenterSettings(seed=opts.seed, **SEGMENTER_PRESETS.get(opts.preset, {}))
    return segmod.train_on_atlas_set(aset.root, settings, device=device, progress=progress)


@dataclass
class Models:
    """What :func:`ensure_models` loaded: the segmenter (refinement IS) and the stored VoteNet+ model (fusion
    votenet), each None when not needed (or, for VoteNet+, just trained: :func:`fuse_stage` then reads it)."""
    segmenter: Any = None
    votenet: Any = None


def ensure_models(aset, opts: SegmentOptions, device: torch.device, progress: Optional[ProgressCallback]) -> Models:
    """The surrogate segmenter (for refinement IS) and the VoteNet+ model (fusion votenet) of the atlas
    set: loaded from ``<atlas set>/models``, trained first when missing and ``opts.train_missing``,
    else :class:`MASRefineError` naming the ``masrefine train`` command. Returns them (:class:`Models`; a stored
    VoteNet+ model is loaded here, once, so a corrupt one is refused before any registration, and handed to
    :func:`fuse_stage`)."""
    segmenter = votenet = None
    seg_missing = opts.refine == "IS" and not (Path(aset.models_dir) / "segmenter.json").exists()
    vn_missing = opts.fusion == "votenet" and votenet_model_path(aset, opts.prereg, opts.refine) is None
    split = 0.4 if seg_missing and vn_missing else (1.0 if seg_missing else 0.0)
    if opts.refine == "IS":
        segmenter = _ensure_segmenter(aset, opts, device, _part(progress, 0.0, split))
    if vn_missing:  # training the segmenter above does not add a VoteNet+ model
        cmd = f"masrefine train votenet {aset.root} --prereg {opts.prereg}"
        if not opts.train_missing:
            raise MASRefineError(f"{aset.models_dir}: no VoteNet+ model for {opts.prereg} pre-registration; "
                                 f"train one with '{cmd}' (or another fusion method)")
        log.info(f"training VoteNet+ on the atlas set first (once; stored in {aset.models_dir})")
        # as in the paper, VoteNet+ learns from pre-registration results (one model per pre-registration);
        # the refined variants (I), (IS) use the same model
        train_for_atlas_set(aset, prereg=opts.prereg, refine=None, preset=opts.preset, device=device,
                            progress=_part(progress, split, 1.0), seed=opts.seed)
    elif opts.fusion == "votenet":
        # a stored model is loaded now, so a corrupt or malformed one is refused before any registration
        votenet = VoteNetModel.load(votenet_model_path(aset, opts.prereg, opts.refine))
    return Models(segmenter, votenet)


def _write_metrics(out: Path, fused: np.ndarray, grid: Grid, ref: sitk.Image, truth: str, table: LabelTable,
                   m: Manifest, groups=None) -> dict:
    """Evaluate the fused labels against the reference label map ``ref`` (read from ``truth``, on the target's
    grid): metrics.json and metrics.csv."""
    from .imageio import atomic_write_text
    from .metrics import evaluate
    ev = evaluate(array_to_image(fused, grid), ref, groups=groups, labels=list(table),
                  pred_name="fused labels", ref_name=str(truth))
    names = {v: lab.name for v, lab in table.items()}
    d = ev.to_json_dict(names, reference=str(truth))
    p = atomic_write_text(json.dumps(d, indent=1), out / "metrics.json")
    m.add(p, "json", "metrics", name="metrics")
    rows = [{"label": r["label"], "name": r.get("name", ""), **{k: v for k, v in r.items() if k not in ("label", "name")}}
            for r in d["labels"]]
    rows += [{"label": "", "name": f"group {k}", **{x: g[x] for x in ("dice", "surface_dice", "asd_mm", "hd95_mm")}}
             for k, g in d["groups"].items()]
    rows.append({"label": "", "name": "mean", **{x: d["mean"][x] for x in ("dice", "surface_dice", "asd_mm", "hd95_mm")}})
    write_qa_csv(rows, out / "metrics.csv")
    m.add(out / "metrics.csv", "table", "metrics", name="metrics")
    return {"mean": d["mean"], "groups": d["groups"]}


# ------------------------------------------------------------------------------------------ worker
def run_job(job: dict[str, Any], progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """The worker's ``segment`` pipeline: :func:`segment` with the job's inputs and parameters."""
    from .protocol.jobs import resolved_parameters
    opts = SegmentOptions.from_parameters(resolved_parameters(job))
    return segment(job["inputs"]["target"], job["inputs"]["atlas_dir"], job["output_dir"], opts, progress,
                   out_option="output_dir")
