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
    OUT/manifest.json                       written last, atomically (see protocol/manifest.py)

Each atlas's own files (refined image, labels, field, Jacobian, unrefined image and labels) are written as soon as
Refine has refined it (:class:`AtlasStream`), and its field is dropped then; its weights, ``atlases/report.json``
and the manifest follow in the Write stage, so the run holds one field at a time, not one per atlas (#22).

Per-atlas QA numbers: ``similarity`` (global NCC of the warped atlas image with the target),
``agreement`` (mean Dice over labels of the atlas's warped labels with the fused result),
``folding_fraction`` (fraction of voxels with Jacobian determinant <= 0 of its total field),
``mean_weight`` (its mean fusion weight where any atlas has a label), and the seconds spent on it.

The run is a list of stage objects, each with one signature (:func:`compute_stages`, :func:`run_stages`)::

    run = Run(options, device, target_path=..., atlas_dir=...)
    for stage in compute_stages(options):          # Load, Models, Register, Refine, Fuse
        run = stage.run(run, progress)

A stage (:class:`Stage`) has a ``name`` (the manifest's stage name and the ``stage`` of its progress events), a
``weight(run)`` (its share of the overall progress) and ``run(run, progress) -> Run``: it reads what the stages
before it left in the :class:`Run` and adds its own. :func:`segment` runs Load, Models (refinement IS or fusion
votenet), Register, Refine (unless ``none``), Fuse, then the output stages Write and QA: it prepares the output
folder, runs the list (each stage timed in the manifest, with its share of the overall progress) and writes the
manifest. ``masrefine experiment`` (the list up to registration once, then Refine and Fuse per row of the table) and
the VoteNet+ training data (:func:`MASRefineLib.training.loo_pairs`: Register and Refine on each atlas left out) run
the same objects (only the one-stage commands ``register``, ``refine`` and ``fuse`` call their engines directly).
When a stage cannot run as asked (Refine: variant IS handed no segmenter), it falls back as documented in its class
and says so in a warning and in the manifest (``summary.fallbacks``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from .errors import MASRefineError
from .geometry import Grid
from .imageio import (array_to_image, image_stem, read_grid, read_label, require_file, run_writers,
                      write_figure, write_image)
from .labels import LabelTable, write_label_outputs
from .protocol.manifest import Manifest, begin_output
from .outputs import atlas_set_inputs, inside, prepare_output_dir
from .progress import ProgressCallback, ProgressEvent, report
from .protocol.atomic import write_csv
from .protocol.jobs import PARAMETERS
from .volume import Volume
from .warped import WarpedSet

log = logging.getLogger("MASRefineLib.pipeline")
_stage_log = logging.getLogger("MASRefineLib.stages")  # the stages' warnings keep their source name

__all__ = ["segment", "SegmentOptions", "Output", "Write", "QA", "run_job"]


# ------------------------------------------------------------------------------------------ stages
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
class Fused:
    """The Fuse stage's result, on the target grid."""
    labels: np.ndarray                                   # (Z, Y, X) uint16 label values of the atlas set
    posterior_values: list[int] = field(default_factory=list)       # label values with a posterior map
    posterior_map: Optional[Callable[[int], np.ndarray]] = None      # value -> (Z, Y, X) float32 in 0..1, on demand
    weights: Any = None                                  # per-atlas weights: weights[i] is atlas i's (Z, Y, X)
                                                         # float32 map (an ndarray (B, Z, Y, X), or JLF's compact
                                                         # fusion.AtlasWeights: #22); None: the method has none
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What flows through the stages of one run: each stage reads what the stages before it set and sets its own
    (``target_path`` and ``atlas_set`` may be given instead of loaded; the output stages of
    :mod:`MASRefineLib.pipeline` record what they wrote in ``outputs``)."""
    options: SegmentOptions
    device: torch.device
    target_path: Optional[str] = None        # absolute path of the target image (None: ``target`` given in memory)
    atlas_dir: Optional[str] = None          # the atlas set's folder (Load reads it unless ``atlas_set`` is given)
    atlas_set: Any = None                    # atlas.AtlasSet (Load)
    atlas_ids: Optional[list[str]] = None    # the atlases Register registers (None: all of the set)
    target: Optional[Volume] = None          # the target: intensities normalised to [0, 1] on its LPS grid (Load)
    segmenter: Any = None                    # the surrogate segmenter for refinement IS (Models, or the caller)
    votenet: Any = None                      # a loaded VoteNet+ model (Models, or the caller; None: Fuse reads the
                                             # stored one)
    warped: Any = None                       # warped.WarpedSet: registered (Register), then refined (Refine)
    unrefined: Any = None                    # the registered WarpedSet's images and labels, kept by Refine for the
                                             # *_unrefined outputs (its fields are dropped: empty tensors, #22);
                                             # None when ``stream`` wrote them already
    stream: Any = None                       # AtlasStream: Refine hands it each atlas once refined (segment: the
                                             # atlas's files written then, its field dropped; #22)
    fused: Optional[Fused] = None            # Fuse
    fallbacks: list[str] = field(default_factory=list)   # what ran otherwise than asked, one line each
    outputs: dict[str, Any] = field(default_factory=dict)  # what the output stages wrote or computed

    def replace(self, **changes: Any) -> "Run":
        """A copy with ``changes`` (the same arrays and models, not copies: e.g. one registration, several fusions)."""
        return dataclasses.replace(self, **changes)


class Stage:
    """One step of a run: ``name`` (manifest stage and progress ``stage``), ``weight(run)`` (share of the overall
    progress, relative to the other stages of the list: ``share`` unless the stage computes it) and
    ``run(run, progress) -> Run``."""
    name = ""
    share = 0.0

    def weight(self, run: Run) -> float:
        return self.share

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        raise NotImplementedError


class Load(Stage):
    """Read the target image (validated and normalised to [0, 1], once: :func:`MASRefineLib.volume.read_image`; the
    later stages take this volume as it is) and the atlas set, with the checks a user needs."""
    name, share = "load", 0.03

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        from .atlas import AtlasSet
        from .volume import read_image
        report(progress, "load", 0.0, "reading inputs")
        target = read_image(run.target_path)
        aset = run.atlas_set if run.atlas_set is not None else AtlasSet.load(run.atlas_dir)
        if len(aset) == 0:
            raise MASRefineError(f"{aset.json_path}: the atlas set has no atlases")
        run = run.replace(target=target, atlas_set=aset)
        report(progress, "load", 1.0, f"{len(aset)} atlases")
        return run


class Models(Stage):
    """The surrogate segmenter (refinement IS) and the VoteNet+ model (fusion votenet): the run's own when the caller
    set every one needed (a batch worker loads them once), else :func:`MASRefineLib.training.ensure_models` (loaded
    from the atlas set's ``models/``, or trained first)."""
    name = "models"

    def weight(self, run: Run) -> float:
        from .training import training_weight
        return training_weight(run.atlas_set if run.atlas_set is not None else run.atlas_dir, run.options)

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        opts = run.options
        if (opts.refine != "IS" or run.segmenter is not None) and (opts.fusion != "votenet" or run.votenet is not None):
            return run  # loaded once by the caller
        from .training import ensure_models
        segmenter, votenet = ensure_models(run.atlas_set, opts, run.device, progress)
        return run.replace(segmenter=segmenter, votenet=votenet)


class Register(Stage):
    """Pre-registration (``options.prereg``, preset ``options.preset``) of the atlases (``atlas_ids``, default all)
    to the target, by the registration engine; skipped atlases are warned about by
    :func:`MASRefineLib.registration.register` (once); none left is an error."""
    name, share = "register", 0.4

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        from .registration import AtlasInput, get_params, register
        opts, aset = run.options, run.atlas_set
        params = get_params(opts.preset, stage=opts.prereg, seed=opts.seed)
        ids = run.atlas_ids if run.atlas_ids is not None else aset.ids
        inputs = [AtlasInput(aid, load=(lambda a=aid: aset.read(a)), source_image=str(aset.image_path(aid)),
                             source_label=str(aset.label_path(aid))) for aid in ids]
        ws = register(run.target, inputs, aset.label_table, params=params, device=run.device, progress=progress,
                      target_path=run.target_path)
        if not ws.atlases:
            raise MASRefineError(f"{aset.json_path}: no atlas could be registered to {run.target_path or 'the target'}")
        return run.replace(warped=ws)


class Refine(Stage):
    """Registration refinement (paper Eq. 3-6), variant ``options.refine`` (alpha, gamma and the finest level's
    iterations from the options when given, else refine.py's defaults). Variant IS without a segmenter falls back
    to I, with a warning and a line in ``fallbacks``."""
    name, share = "refine", 0.3

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        from .refine import DEFAULT_ITERATIONS, refine
        opts = run.options
        kw: dict[str, Any] = {}
        if opts.alpha is not None:
            kw["alpha"] = float(opts.alpha)
        if opts.gamma is not None:
            kw["gamma"] = float(opts.gamma)
        if opts.iterations is not None:  # the finest level's; coarser levels keep their defaults
            kw["iterations"] = (*DEFAULT_ITERATIONS[:-1], int(opts.iterations))
        variant, fallbacks = opts.refine, run.fallbacks
        if variant == "IS" and run.segmenter is None:
            fallbacks = [*fallbacks, "refine: no segmenter available; variant I used instead of IS"]
            _stage_log.warning("no surrogate segmenter available: refinement variant I instead of IS")
            variant = "I"
        stream = run.stream
        if stream is not None:  # the registered set is not needed after this stage: freed atlas by atlas
            ws = refine(run.warped, run.target, variant, segmenter=run.segmenter, device=run.device,
                        progress=progress, on_atlas=stream.for_set(run.warped), consume=True, **kw)
            return run.replace(warped=ws, unrefined=None, fallbacks=fallbacks)
        ws = refine(run.warped, run.target, variant, segmenter=run.segmenter, device=run.device,
                    progress=progress, **kw)
        return run.replace(warped=ws, unrefined=_without_fields(run.warped), fallbacks=fallbacks)


class AtlasStream:
    """Each atlas as soon as Refine has refined it, in a run that needs neither the registered set nor the
    refined fields afterwards (:func:`segment`): with a ``folder`` (``options.save_atlases``) its files are
    written there at once (refined image, labels, field, Jacobian; the registered image and labels as
    ``*_unrefined``), then the atlas is kept without its field (three float32 per voxel, 70 % of a warped atlas:
    #22). Fusion and QA need only the images, labels and info; the Write stage adds the fusion weights,
    ``report.json`` and the manifest entries (in atlas order, as for atlases written there) from ``written``."""

    def __init__(self, folder: Optional[Path]):
        self.folder = folder
        self.written: dict[str, list[tuple[Path, str, str]]] = {}   # atlas id -> its QA maps written (path, kind,
                                                                     # role); its image, labels, field: ws.files

    def for_set(self, registered: WarpedSet) -> Callable[[Any, Any], Any]:
        """The ``on_atlas`` callback of :func:`MASRefineLib.refine.refine` for the atlases of ``registered``."""
        grid, table = registered.target_grid, registered.label_table

        def on_atlas(refined: Any, pre: Any) -> Any:
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                sub = WarpedSet(grid, table, [refined], "")
                maps = _atlas_maps(self.folder, refined, pre, grid)
                done = run_writers([*sub.atlas_writers(refined, self.folder), *maps], max(1, torch.get_num_threads()))
                self.written[refined.id] = done[-len(maps):]
            refined.field_tensor = torch.empty(0)
            return refined
        return on_atlas


def _without_fields(ws: Any) -> Any:
    """``ws`` (a WarpedSet) sharing its images and labels, each field an empty tensor: what is left of the registered
    set once Refine has composed its fields. Only the registered images and labels are written later (Write's
    ``*_unrefined`` files); a field is three float32 per voxel, 70 % of a warped atlas's memory (#22)."""
    from .warped import WarpedAtlas
    return dataclasses.replace(ws, atlases=[
        WarpedAtlas(a.id, a.image_tensor, a.label_tensor, torch.empty(0), a.source_image, a.source_label, a.info)
        for a in ws.atlases])


class Fuse(Stage):
    """Label fusion (``options.fusion``, :func:`MASRefineLib.fusion.fuse`); VoteNet+ with the model of the run
    (Models), else the atlas set's stored one for this pre-registration and refinement."""
    name, share = "fuse", 0.12

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        from .fusion import fuse
        from .fusion.votenet import votenet_model_path
        opts = run.options
        report(progress, "fuse", 0.0, opts.fusion)
        kw = {}
        if opts.fusion == "votenet":
            kw["model"] = run.votenet if run.votenet is not None else \
                votenet_model_path(run.atlas_set, opts.prereg, opts.refine)
        r = fuse(run.warped, run.target, method=opts.fusion, device=run.device, progress=progress, **kw)
        fused = Fused(np.asarray(r.labels, np.uint16), [int(v) for v in r.posteriors.values],
                      lambda v, P=r.posteriors: P.map(int(v)), r.atlas_weights,
                      {"method": r.method, "params": r.params, "seconds": r.seconds, **(r.info or {})})
        report(progress, "fuse", 1.0, "done")
        return run.replace(fused=fused)


def compute_stages(opts: SegmentOptions) -> list[Stage]:
    """The computing stages ``opts`` asks for, in order: Load, Models (refinement IS or fusion votenet), Register,
    Refine (unless ``none``), Fuse."""
    return [Load(), *([Models()] if opts.refine == "IS" or opts.fusion == "votenet" else []), Register(),
            *([Refine()] if opts.refine != "none" else []), Fuse()]


def part(progress: Optional[ProgressCallback], lo: float, hi: float) -> Optional[ProgressCallback]:
    """A sub-task's callback covering lo..hi of its stage's share of the overall progress (its own
    stage fraction is passed on unchanged)."""
    if progress is None:
        return None

    def f(ev: ProgressEvent) -> None:
        progress(ProgressEvent(ev.stage, ev.fraction, ev.message, {**ev.data, "_part": lo + (hi - lo) * ev.fraction}))
    return f


def run_stages(stages: list[Stage], run: Run, progress: Optional[ProgressCallback] = None,
               timer: Optional[Callable[[str], Any]] = None) -> Run:
    """Run ``stages`` in order, each stage's 0..1 mapped onto its share of the whole run by the stages' weights
    (``data["overall"]`` of progress events); ``timer(name)``: a context manager around each stage (the manifest's
    :meth:`~MASRefineLib.protocol.manifest.Manifest.stage`)."""
    import contextlib
    weights = [s.weight(run) for s in stages]  # before any stage runs
    total, acc, overall = sum(weights) or 1.0, 0.0, 0.0

    def scaled(s: float, w: float) -> Optional[ProgressCallback]:
        def f(ev: ProgressEvent) -> None:
            nonlocal overall
            data = dict(ev.data)
            p = data.pop("_part", ev.fraction)  # see part(): a sub-task's share of this stage
            # never backwards (a stage may restart its own fraction for a second pass)
            overall = max(overall, min(s + w * p, s + w))
            progress(ProgressEvent(ev.stage, ev.fraction, ev.message, {**data, "overall": overall}))
        return f if progress is not None else None

    for stage, w in zip(stages, weights):
        with (timer(stage.name) if timer is not None else contextlib.nullcontext()):
            run = stage.run(run, scaled(acc / total, w / total))
        acc += w
    return run


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
        for a in ws.atlases:  # one atlas at a time: no (B, Z, Y, X) stack (#22)
            fg |= a.label > 0
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
def _atlas_maps(adir: Path, a: Any, pre: Any, grid: Grid) -> list[Callable[[], tuple[Path, str, str]]]:
    """The writers of one atlas's QA maps in ``adir``: the Jacobian determinant of its field, and with ``pre`` (the
    atlas before refinement) the unrefined image and labels; each returns (path, manifest kind, role)."""
    from .fields import jacobian_image
    out = [lambda: (write_image(jacobian_image(a.field, grid), inside(adir, f"{a.id}_jacobian.nrrd"), compress=False),
                    "volume", "atlas-jacobian")]
    if pre is not None:
        out.append(lambda: (write_image(array_to_image(pre.image.astype(np.float32), grid),
                                        inside(adir, f"{a.id}_image_unrefined.nrrd"), compress=False),
                            "volume", "atlas-image-unrefined"))
        out.append(lambda: (write_image(array_to_image(pre.label.astype(np.uint16), grid),
                                        inside(adir, f"{a.id}_label_unrefined.nii.gz")),
                            "segmentation", "atlas-labels-unrefined"))
    return out


def _write_atlases(out: Path, ws: WarpedSet, pre: Optional[WarpedSet], fused: Fused, m: Manifest,
                   progress: Optional[ProgressCallback], workers: int = 1,
                   streamed: Optional[dict[str, list[tuple[Path, str, str]]]] = None) -> None:
    """Every atlas's refined image, labels and field, then its QA maps (Jacobian determinant, the unrefined image
    and labels, its fusion weights), each on ``workers`` threads, then ``report.json``; manifest entries are added
    in atlas order once the files exist. ``streamed``: the atlases Refine's :class:`AtlasStream` wrote already
    (id -> its QA maps written); of those only the fusion weights are written here."""
    adir = out / "atlases"
    streamed = streamed or {}
    adir.mkdir(parents=True, exist_ok=True)
    report(progress, "write", 0.2, f"{len(ws.atlases)} refined atlases")
    run_writers([w for a in ws.atlases if a.id not in streamed for w in ws.atlas_writers(a, adir)], workers)
    unrefined = {b.id: b for b in pre.atlases} if pre is not None else {}
    grid = ws.target_grid

    def extras(i: int, a) -> Callable[[], list[tuple[Path, str, str]]]:
        def write() -> list[tuple[Path, str, str]]:
            done = list(streamed[a.id]) if a.id in streamed else \
                [w() for w in _atlas_maps(adir, a, unrefined.get(a.id), grid)]
            if fused.weights is not None:
                done.append((write_image(array_to_image(fused.weights[i].astype(np.float32), grid),
                                         inside(adir, f"{a.id}_weights.nii.gz")), "volume", "atlas-weights"))
            return done
        return write

    report(progress, "write", 0.6, "atlas QA maps")
    written = run_writers([extras(i, a) for i, a in enumerate(ws.atlases)], workers)
    m.add(ws.write_report(adir), "json", "report", name="atlases report")  # last, once every atlas file exists
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


# ------------------------------------------------------------------------------------------ output stages
@dataclass
class Output:
    """Where :func:`segment` writes: the prepared output folder, its manifest (written last, by ``segment``) and the
    optional reference label map of the target (read, on the target's grid) with its path and label groups."""
    folder: Path
    manifest: Manifest
    truth: Optional[str] = None
    reference: Optional[sitk.Image] = None
    groups: Any = None


class Write(Stage):
    """The fused labels (.nii.gz + .seg.nrrd), a posterior map per label and, with ``options.save_atlases``, every
    atlas's refined and unrefined image, labels, field, Jacobian and fusion weights (module doc); each file is
    listed in the manifest, with the run's label table and target grid."""
    name, share = "write", 0.1

    def __init__(self, output: Output):
        self.output = output

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        out, m, fused, aset = self.output.folder, self.output.manifest, run.fused, run.atlas_set
        grid = run.target.grid
        m.set("labels", aset.label_table.to_json_dict())
        m.set("target_grid", grid.to_json())
        report(progress, "write", 0.0, "fused labels")
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
        if run.options.save_atlases:
            _write_atlases(out, run.warped, run.unrefined, fused, m, progress, workers,
                           run.stream.written if run.stream is not None else None)
        report(progress, "write", 1.0, "done")
        return run.replace(outputs={**run.outputs, "fused": paths["nifti"]})


class QA(Stage):
    """Per-atlas QA numbers (qa.csv, and in the manifest), the QA montage (``options.qa_picture``) and, with a
    reference label map, the metrics (metrics.csv, metrics.json)."""
    name, share = "qa", 0.05

    def __init__(self, output: Output):
        self.output = output

    def run(self, run: Run, progress: Optional[ProgressCallback]) -> Run:
        out, m, opts, ws, fused = self.output.folder, self.output.manifest, run.options, run.warped, run.fused
        report(progress, "qa", 0.0, "QA numbers")
        qa = atlas_qa(ws, run.target.numpy(), fused)
        cols = write_csv(qa, out / "qa.csv")
        m.add(out / "qa.csv", "table", "qa-table", name="atlas QA", columns=cols)
        m.set("atlases", [{"id": r["id"], "qa": {k: v for k, v in r.items() if k != "id"}} for r in qa])
        if opts.qa_picture:
            report(progress, "qa", 0.4, "QA picture")
            try:
                qa_picture(out / "qa.png", run.target.numpy(), fused.labels, ws, qa,
                           f"{image_stem(run.target_path)}: {opts.prereg}, refine {opts.refine}, {opts.fusion}")
                m.add(out / "qa.png", "picture", "qa-picture", name="QA montage")
            except ImportError:
                log.warning("matplotlib is not installed: no QA picture (pip install matplotlib)")
        metrics = None
        if self.output.truth:
            report(progress, "qa", 0.8, "metrics against the reference")
            metrics = _write_metrics(out, fused.labels, run.target.grid, self.output.reference,
                                     str(self.output.truth), run.atlas_set.label_table, m, self.output.groups)
        report(progress, "qa", 1.0, "done")
        return run.replace(outputs={**run.outputs, "metrics": metrics})


def segment(target_path: str | os.PathLike, atlas_dir: str | os.PathLike, out_dir: str | os.PathLike,
            options: SegmentOptions | None = None, progress: Optional[ProgressCallback] = None,
            truth: str | os.PathLike | None = None, groups=None, out_option: str = "out_dir", atlas_option: str = "atlas_dir",
            preloaded: Optional[tuple[Any, Any, Any]] = None) -> dict[str, Any]:
    """Segment ``target_path`` with the atlas set at ``atlas_dir`` into ``out_dir`` (layout: module doc).

    ``preloaded``: ``(atlas_set, segmenter, votenet)``, the atlas set of ``atlas_dir`` and its models (None: not
    loaded), already loaded by the caller (a batch worker segmenting many targets: :mod:`MASRefineLib.batch`); the
    results are the same as without it.

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
    aset, segmenter, votenet = preloaded or (None, None, None)
    if aset is not None and Path(aset.root).resolve() != Path(atlas_dir).resolve():
        raise ValueError(f"preloaded atlas set {aset.root} is not the atlas set {atlas_dir}")
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
    m = Manifest(out, {"target": target_path, "atlas_dir": str(Path(atlas_dir).resolve()),
                       **({"truth": str(Path(truth).resolve())} if truth else {})}, opts.to_json())
    # each atlas's files are written as soon as it is refined, and its field dropped then (#22)
    run = Run(opts, device, target_path=target_path, atlas_dir=str(atlas_dir), atlas_set=aset, segmenter=segmenter,
              votenet=votenet, stream=AtlasStream(out / "atlases" if opts.save_atlases else None))
    output = Output(out, m, str(truth) if truth else None, ref, groups)
    run = run_stages([*compute_stages(opts), Write(output), QA(output)], run, progress, timer=m.stage)

    ws, fused = run.warped, run.fused
    summary = {"target": target_path, "atlases": len(ws.atlases), "failed": ws.failed,
               "stage": ws.stage, "fusion": fused.info.get("method", opts.fusion), "fallbacks": run.fallbacks,
               "seconds": m.stage_seconds(), "cpu_seconds": m.stage_seconds("cpu_seconds")}
    if run.outputs.get("metrics") is not None:
        summary["metrics"] = run.outputs["metrics"]
    m.set("summary", summary)
    manifest = m.write()
    return {"manifest": str(manifest), "output_dir": str(out), "fused": str(run.outputs["fused"]), "summary": summary}


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
    write_csv(rows, out / "metrics.csv")
    m.add(out / "metrics.csv", "table", "metrics", name="metrics")
    return {"mean": d["mean"], "groups": d["groups"]}


# ------------------------------------------------------------------------------------------ worker
def run_job(job: dict[str, Any], progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """The worker's ``segment`` pipeline: :func:`segment` with the job's inputs and parameters."""
    from .protocol.jobs import resolved_parameters
    opts = SegmentOptions.from_parameters(resolved_parameters(job))
    return segment(job["inputs"]["target"], job["inputs"]["atlas_dir"], job["output_dir"], opts, progress,
                   out_option="output_dir")
