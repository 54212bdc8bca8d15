"""The pipeline as data: the stages of a run, in order, each an object with one signature.

    run = Run(options, device, target_path=..., atlas_dir=...)
    for stage in compute_stages(options):          # Load, Models, Register, Refine, Fuse
        run = stage.run(run, progress)

A stage (:class:`Stage`) has a ``name`` (the manifest's stage name and the ``stage`` of its progress events), a
``weight(run)`` (its share of the overall progress) and ``run(run, progress) -> Run``: it reads what the stages
before it left in the :class:`Run` and adds its own. ``masrefine segment`` (:func:`MASRefineLib.pipeline.segment`:
this list plus its output stages, so also the worker, ``masrefine batch`` and the Slicer job), ``masrefine
experiment`` (the list up to registration once, then Refine and Fuse per row of the table) and the VoteNet+
training data (:func:`MASRefineLib.training.loo_pairs`: Register and Refine on each atlas left out) all run
these objects (only the one-stage commands ``register``, ``refine`` and ``fuse`` call their engines directly, with
their own options).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

import numpy as np
import torch

from .errors import MASRefineError
from .progress import ProgressCallback, ProgressEvent, report
from .protocol.jobs import PARAMETERS
from .volume import Volume

log = logging.getLogger("MASRefineLib.stages")

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
    weights: Optional[np.ndarray] = None                 # (B, Z, Y, X) float32 per-atlas weights
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
                                             # *_unrefined outputs (its fields are dropped: empty tensors, #22)
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
            log.warning("no surrogate segmenter available: refinement variant I instead of IS")
            variant = "I"
        ws = refine(run.warped, run.target, variant, segmenter=run.segmenter, device=run.device,
                    progress=progress, **kw)
        return run.replace(warped=ws, unrefined=_without_fields(run.warped), fallbacks=fallbacks)


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
                      lambda v, P=r.posteriors: P.map(int(v)), r.weights,
                      {"method": r.method, "params": r.params, "seconds": r.seconds, **(r.info or {})})
        report(progress, "fuse", 1.0, "done")
        return run.replace(fused=fused)


def compute_stages(opts: SegmentOptions) -> list[Stage]:
    """The computing stages ``opts`` asks for, in order: Load, Models (refinement IS or fusion votenet), Register,
    Refine (unless ``none``), Fuse."""
    return [Load(), *([Models()] if opts.refine == "IS" or opts.fusion == "votenet" else []), Register(),
            *([Refine()] if opts.refine != "none" else []), Fuse()]


# ------------------------------------------------------------------------------------------ progress
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
    :meth:`~MASRefineLib.manifest.Manifest.stage`)."""
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
