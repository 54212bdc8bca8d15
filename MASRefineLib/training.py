"""Training the models of an atlas set (stored in its ``models/``), by the pipeline's own stages.

- The surrogate segmenter (refinement IS): :func:`ensure_segmenter` (:func:`MASRefineLib.segmenter.train_on_atlas_set`
  with the settings of :data:`SEGMENTER_PRESETS`).
- VoteNet+ (fusion ``votenet``): its training data are leave-one-out pairs of the atlas set (:func:`loo_pairs`:
  each chosen atlas is a target and the others go through the pipeline's :class:`~MASRefineLib.pipeline.Register`
  and :class:`~MASRefineLib.pipeline.Refine` stages), then :func:`train_votenet` (binary cross-entropy, Adam) and
  Platt calibration on held-out targets (:func:`fit_platt`, :func:`reliability`); :func:`train_for_atlas_set`
  does it all and stores the model (:class:`MASRefineLib.fusion.votenet.VoteNetModel`, which only loads and applies).
- :func:`ensure_models`: what a run needs, loaded, or trained first when missing and allowed (the Models stage).

Practical on a CPU: VoteNet+ samples 32^3 patches mostly near label boundaries and disagreements.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import segmenter as segmod
from .errors import MASRefineError
from .fusion.votenet import DEFAULT_ARCH, DEFAULT_JLF, VoteNetModel, build_network, model_name, votenet_model_path
from .progress import ProgressCallback, report, scaled
from .pipeline import Refine, Register, Run, SegmentOptions, part

log = logging.getLogger("MASRefineLib.training")


@dataclass
class Pair:
    """One training pair on the target's grid: a warped atlas and the target, with both label maps."""
    warped_image: np.ndarray   # (Z, Y, X) float32 in [0, 1]
    warped_label: np.ndarray   # (Z, Y, X) integer label values
    target_image: np.ndarray   # (Z, Y, X) float32 in [0, 1]
    target_label: np.ndarray   # (Z, Y, X) integer label values
    atlas_id: str = ""
    target_id: str = ""


def pairs_from_warped(warped, target_image: np.ndarray, target_label: np.ndarray, target_id: str = "") -> list[Pair]:
    """Pairs from a :class:`~MASRefineLib.warped.WarpedSet` whose target has a known label map (the target's
    image normalised to [0, 1] and its label map, both on ``warped.target_grid``)."""
    if tuple(target_label.shape) != tuple(warped.target_grid.shape):
        raise MASRefineError(f"target {target_id}: label map shape {target_label.shape} does not match the "
                             f"registered grid {warped.target_grid.shape}")
    return [Pair(a.image.astype(np.float32), a.label, target_image.astype(np.float32), target_label, a.id, target_id)
            for a in warped.atlases if a.id != target_id]


def band_mask(warped_label: np.ndarray | torch.Tensor, target_label: np.ndarray | torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(Z, Y, X) bool: where the two label maps differ, or within ``radius`` voxels of a label boundary of
    either: the voxels where an atlas label may be wrong (elsewhere both sit deep inside one structure)."""
    from .fusion.common import consensus

    wl = torch.as_tensor(np.asarray(warped_label).astype(np.int64))
    tl = torch.as_tensor(np.asarray(target_label).astype(np.int64))
    out = wl != tl
    for lab in (wl, tl):
        out |= ~consensus(lab[None], radius)
    return out


# ---------------------------------------------------------------------------------------------- calibration

def fit_platt(logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, iters: int = 100) -> tuple[float, float]:
    """Platt scaling: (a, b) maximising the likelihood of ``y`` in {0, 1} under sigmoid(a z + b) (Newton, float64)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(np.asarray(y), dtype=torch.float64).reshape(-1)
    if z.numel() == 0:
        raise ValueError("no samples to fit Platt scaling on")
    if t.min() == t.max():
        raise ValueError("Platt scaling needs both outcomes among the samples")
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = torch.stack([z, torch.ones_like(z)], 1)
    for _ in range(iters):
        p = torch.sigmoid(x @ theta)
        g = x.T @ (p - t)
        h = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(h, g)
        # backtracking keeps Newton safe on separable data
        nll = F.binary_cross_entropy_with_logits(x @ theta, t, reduction="sum")
        s = 1.0
        while s > 1e-6:
            cand = theta - s * step
            if F.binary_cross_entropy_with_logits(x @ cand, t, reduction="sum") <= nll:
                break
            s *= 0.5
        theta = theta - s * step
        if float(step.abs().max()) * s < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def reliability(p: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, bins: int = 15) -> dict:
    """Reliability of probabilities ``p`` for binary outcomes ``y``: expected calibration error over
    ``bins`` equal-width bins (sum over bins of fraction * |mean outcome - mean p|) and the bin table."""
    p = torch.as_tensor(np.asarray(p), dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64).reshape(-1)
    idx = (p * bins).long().clamp(0, bins - 1)
    n = torch.bincount(idx, minlength=bins).to(torch.float64)
    sp = torch.bincount(idx, weights=p, minlength=bins)
    sy = torch.bincount(idx, weights=y, minlength=bins)
    conf = sp / n.clamp(min=1)
    acc = sy / n.clamp(min=1)
    ece = float(((n / n.sum()) * (acc - conf).abs()).sum())
    table = [{"lo": i / bins, "hi": (i + 1) / bins, "count": int(n[i]), "confidence": float(conf[i]),
              "accuracy": float(acc[i])} for i in range(bins) if n[i] > 0]
    return {"ece": ece, "bins": bins, "samples": int(p.numel()), "table": table}


# ---------------------------------------------------------------------------------------------- training

class _PairData:
    def __init__(self, pair: Pair, band_radius: int):
        self.img = torch.as_tensor(pair.warped_image, dtype=torch.float32)
        self.tgt = torch.as_tensor(pair.target_image, dtype=torch.float32)
        self.y = torch.as_tensor(np.asarray(pair.warped_label).astype(np.int64) == np.asarray(pair.target_label).astype(np.int64))
        self.band = band_mask(pair.warped_label, pair.target_label, band_radius)
        self.band_idx = self.band.nonzero()
        self.wrong_idx = (~self.y).nonzero()
        if self.img.shape != self.tgt.shape or self.y.shape != self.img.shape:
            raise MASRefineError(f"pair {pair.atlas_id}->{pair.target_id}: arrays have different shapes")


def _band_samples(model: VoteNetModel, data: Sequence[_PairData], device, max_voxels: int, rng: np.random.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and outcomes at (a random subset of) the band voxels of the given pairs."""
    zs, ys = [], []
    per = max(1, max_voxels // max(1, len(data)))
    for d in data:
        z = model.logits(d.img[None], d.tgt, roi=d.band, device=device)[0]
        sel = d.band_idx
        if sel.shape[0] > per:
            sel = sel[torch.from_numpy(rng.choice(sel.shape[0], per, replace=False))]
        zs.append(z[sel[:, 0], sel[:, 1], sel[:, 2]])
        ys.append(d.y[sel[:, 0], sel[:, 1], sel[:, 2]].float())
    return torch.cat(zs), torch.cat(ys)


def train_votenet(train_pairs: Sequence[Pair], calib_pairs: Sequence[Pair], *, arch: dict | None = None,
                  patch: int = 32, batch: int = 4, iterations: int = 400, lr: float = 1e-3, band_radius: int = 2,
                  band_fraction: float = 0.4, wrong_fraction: float = 0.4, seed: int = 0, device: torch.device | str = "cpu",
                  max_calib_voxels: int = 400_000, progress: ProgressCallback | None = None,
                  stage: str = "train-votenet") -> VoteNetModel:
    """Train VoteNet+ on ``train_pairs`` (binary cross-entropy on p(atlas label == target label), Adam) and
    calibrate it (Platt) on ``calib_pairs``: every other pair (from the first) fits a and b, the remaining
    pairs give the reliability report (ECE before/after); with a single calibration pair its band voxels
    are split at random instead. Patches of ``patch``^3 voxels: a fraction ``wrong_fraction`` centred
    where the atlas label is wrong, ``band_fraction`` in the band (labels differ or within ``band_radius``
    voxels of a boundary), the rest anywhere; the loss counts band voxels only (deep inside a structure the
    answer is trivially "right" and would dominate). The returned model's ``meta``
    holds the loss curve, timings and the reliability report."""
    if not train_pairs:
        raise MASRefineError("VoteNet+ training needs at least one training pair")
    if not calib_pairs:
        raise MASRefineError("VoteNet+ calibration needs at least one held-out pair")
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arch = {**DEFAULT_ARCH, **(arch or {})}
    net = build_network(arch).to(device)
    model = VoteNetModel(net, arch)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    data = [_PairData(p, band_radius) for p in train_pairs]
    losses: list[float] = []
    for it in range(iterations):
        net.train()
        xs, ys, ms = [], [], []
        for _ in range(batch):
            d = data[rng.integers(len(data))]
            u = rng.random()
            if d.wrong_idx.shape[0] and u < wrong_fraction:
                c = d.wrong_idx[rng.integers(d.wrong_idx.shape[0])].tolist()
            elif d.band_idx.shape[0] and u < wrong_fraction + band_fraction:
                c = d.band_idx[rng.integers(d.band_idx.shape[0])].tolist()
            else:
                c = [int(rng.integers(s)) for s in d.img.shape]
            img, tgt, y, m = segmod.crop_patch([d.img, d.tgt, d.y.float(), d.band.float()], c, patch)
            xs.append(torch.stack([img, tgt]))
            ys.append(y[None])
            ms.append(m[None])
        x = torch.stack(xs).to(device)
        y = torch.stack(ys).to(device)
        m = torch.stack(ms).to(device)
        loss = (F.binary_cross_entropy_with_logits(net(x), y, reduction="none") * m).sum() / m.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if it % 10 == 0 or it == iterations - 1:
            report(progress, stage, 0.85 * (it + 1) / iterations, f"iteration {it + 1}/{iterations} loss {np.mean(losses[-20:]):.4f}")
    train_s = time.time() - t0

    report(progress, stage, 0.9, "calibrating (Platt)")
    cdata = [_PairData(p, band_radius) for p in calib_pairs]
    if len(cdata) >= 2:  # alternate pairs: both halves hold every held-out target
        z_fit, y_fit = _band_samples(model, cdata[0::2], device, max_calib_voxels, rng)
        z_ev, y_ev = _band_samples(model, cdata[1::2], device, max_calib_voxels, rng)
        split = "pairs"
    else:
        z, y = _band_samples(model, cdata, device, 2 * max_calib_voxels, rng)
        perm = torch.from_numpy(rng.permutation(z.numel()))
        h = z.numel() // 2
        z_fit, y_fit, z_ev, y_ev = z[perm[:h]], y[perm[:h]], z[perm[h:]], y[perm[h:]]
        split = "voxels"
    model.a, model.b = fit_platt(z_fit, y_fit)
    before = reliability(torch.sigmoid(z_ev), y_ev)
    after = reliability(model.calibrate(z_ev), y_ev)
    k = max(1, min(20, len(losses) // 5))
    model.meta = {
        "training": {"iterations": iterations, "batch": batch, "patch": patch, "lr": lr, "optimizer": "Adam",
                     "loss": "binary cross-entropy", "seed": seed, "band_radius": band_radius,
                     "band_fraction": band_fraction, "wrong_fraction": wrong_fraction,
                     "seconds": round(train_s, 1),
                     "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
                     "loss_curve": [round(float(np.mean(losses[i:i + 10])), 5) for i in range(0, len(losses), 10)],
                     "train_pairs": [f"{p.atlas_id}->{p.target_id}" for p in train_pairs]},
        "reliability": {"split": split, "fit_samples": int(z_fit.numel()), "region": f"band (radius {band_radius})",
                        "ece_before": before["ece"], "ece_after": after["ece"],
                        "before": before, "after": after,
                        "calibration_pairs": [f"{p.atlas_id}->{p.target_id}" for p in calib_pairs]},
        "jlf": dict(DEFAULT_JLF),
    }
    report(progress, stage, 1.0, f"ECE {before['ece']:.4f} -> {after['ece']:.4f}")
    return model


def split_by_target(pairs: Sequence[Pair], calib_fraction: float = 0.3, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Split leave-one-out pairs by target (a target's pairs all on one side): about ``calib_fraction`` of
    the targets (at least one) are held out for calibration."""
    targets = sorted({p.target_id for p in pairs})
    if len(targets) < 2:
        raise MASRefineError("VoteNet+ needs pairs with at least two different targets (one held out to calibrate)")
    rng = np.random.default_rng(seed)
    n_cal = min(len(targets) - 1, max(1, int(round(calib_fraction * len(targets)))))
    cal = set(rng.choice(targets, n_cal, replace=False).tolist())
    return [p for p in pairs if p.target_id not in cal], [p for p in pairs if p.target_id in cal]


# ---------------------------------------------------------------------------------------------- atlas sets

def loo_pairs(aset, *, prereg: str = "deformable", preset: str = "default", refine: str | None = None,
              segmenter=None, targets: Sequence[str] | None = None, device: torch.device | str = "auto",
              progress: ProgressCallback | None = None, stage: str = "train-votenet",
              cache: str | Path | None = None) -> list[Pair]:
    """Leave-one-out pairs of an atlas set: each atlas in ``targets`` (default: all) is a target, every
    other atlas is registered to it by the pipeline's Register stage (``prereg``, the registration preset
    ``preset`` with its own seed), then its Refine stage (variant ``refine``, refine.py's defaults) when given, and
    each warped atlas with the target's image (normalised to [0, 1]) and label map is a pair. ``cache``: a folder keeping each target's registrations
    (``<cache>/<target id>/``, the folder ``masrefine register`` writes), reused when present."""
    import SimpleITK as sitk

    from .device import resolve_device
    from .imageio import normalize_intensity
    from .registration import get_params
    from .volume import Volume
    from .warped import WarpedSet

    ids = list(aset.ids)
    targets = list(targets) if targets is not None else ids
    opts = SegmentOptions(prereg=prereg, refine=refine or "none", preset=preset, seed=get_params(preset).seed)
    dev = resolve_device(device)
    pairs: list[Pair] = []
    for k, tid in enumerate(targets):
        report(progress, stage, 0.3 * k / len(targets), f"leave-one-out registration to {tid} ({k + 1}/{len(targets)})")
        image, label = aset.read(tid)
        others = [a for a in ids if a != tid]
        folder = Path(cache) / tid if cache is not None else None
        if folder is not None and (folder / "report.json").exists():
            ws = WarpedSet.load(folder)
        else:
            run = Run(opts, dev, atlas_set=aset, atlas_ids=others, target=Volume.from_image(image),
                      segmenter=segmenter)  # the target normalised once, as Load does for a file
            run = Register().run(run, None)
            ws = (Refine().run(run, None) if refine else run).warped
            if folder is not None:
                ws.save(folder)
        tarr = normalize_intensity(sitk.GetArrayFromImage(image))
        pairs += pairs_from_warped(ws, tarr, sitk.GetArrayFromImage(label).astype(np.int64), tid)
    return pairs


#: training settings per preset (``fast`` trains in a few minutes on 2 CPU cores)
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"iterations": 150, "targets": 3},
    "default": {"iterations": 400, "targets": 5},
    "accurate": {"iterations": 1500, "targets": None},
}


def train_for_atlas_set(aset, *, prereg: str = "deformable", refine: str | None = None, preset: str = "default",
                        device: torch.device | str = "auto", progress: ProgressCallback | None = None,
                        segmenter=None, targets: Sequence[str] | int | None = None,
                        iterations: int | None = None, name: str | None = None, seed: int = 0,
                        cache: str | Path | None = None, **train_kw) -> Path:
    """Train VoteNet+ on an atlas set alone (leave-one-out registrations of its atlases to each other) and
    store it in ``aset.models_dir`` as :func:`model_name` (``.safetensors`` + ``.json``). ``targets``:
    atlas ids used as targets, or how many (chosen at random with ``seed``; default from the preset); about
    30 % of the targets are held out for calibration; ``cache``: keep/reuse the leave-one-out registrations
    there (see :func:`loo_pairs`). Returns the JSON path."""
    from .atlas import AtlasSet
    from .device import resolve_device

    if not hasattr(aset, "ids"):
        aset = AtlasSet.load(aset)
    if len(aset.ids) < 3:
        raise MASRefineError(f"{aset.root}: VoteNet+ needs at least 3 atlases (2 targets, one held out to calibrate)")
    from .outputs import require_writable_folder
    require_writable_folder(aset.models_dir, "the VoteNet+ model")  # before the leave-one-out registrations
    dev = resolve_device(device)
    settings = dict(TRAIN_PRESETS.get(preset, TRAIN_PRESETS["default"]))
    if iterations is not None:
        settings["iterations"] = iterations
    if targets is None:
        targets = settings["targets"]
    if targets is None or isinstance(targets, int):
        n = len(aset.ids) if targets is None else max(2, min(int(targets), len(aset.ids)))
        targets = sorted(np.random.default_rng(seed).choice(aset.ids, n, replace=False).tolist())
    t0 = time.time()
    pairs = loo_pairs(aset, prereg=prereg, preset=preset, refine=refine, segmenter=segmenter,
                      targets=targets, device=dev, progress=progress, cache=cache)
    reg_s = time.time() - t0
    train, calib = split_by_target(pairs, seed=seed)

    model = train_votenet(train, calib, iterations=int(settings["iterations"]), seed=seed, device=dev,
                          progress=scaled(progress, 0.3, 1.0), **train_kw)  # 0..0.3: the registrations
    model.meta["atlas_set"] = str(aset.root)
    model.meta["registration"] = {"prereg": prereg, "refine": refine, "preset": preset, "targets": list(targets),
                                  "seconds": round(reg_s, 1)}
    return model.save(aset.models_dir, name or model_name(prereg, refine))


# ---------------------------------------------------------------------------------------------- a run's models

#: surrogate-segmenter training settings per preset; the others are segmenter.py's defaults or longer.
#: ``fast``: on the 64^3 phantom, shorter runs of smaller patches left the cartilages below Dice 0.35 and made
#: IS worse than I; ``accurate``: 600 epochs lift the knee surrogate's Dice from 0.79 to 0.89 and let IS help
#: the vote (docs/refinement.md, "600-epoch surrogate")
SEGMENTER_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"epochs": 16, "steps_per_epoch": 20, "patch_size": 48, "learning_rate": 3e-3},
    "default": {},
    "accurate": {"epochs": 600},
}


def ensure_segmenter(aset, opts: SegmentOptions, device: torch.device, progress: Optional[ProgressCallback]):
    """The atlas set's surrogate segmenter: loaded from ``models/``, else trained (``opts.train_missing``, settings
    of ``opts.preset``), else :class:`MASRefineError` naming the ``masrefine train`` command."""
    path = Path(aset.models_dir) / f"{segmod.MODEL_NAME}.json"
    if path.exists():
        return segmod.UNetSegmenter.load(path, device)
    if not opts.train_missing:
        raise MASRefineError(f"{aset.models_dir}: no surrogate segmenter for refinement IS; train one with "
                             f"'masrefine train segmenter {aset.root}' (or refinement I)")
    log.info(f"training the surrogate segmenter on the atlas set first (once; stored in {aset.models_dir})")
    settings = segmod.SegmenterSettings(seed=opts.seed, **SEGMENTER_PRESETS.get(opts.preset, {}))
    return segmod.train_on_atlas_set(aset.root, settings, device=device, progress=progress)


def ensure_models(aset, opts: SegmentOptions, device: torch.device, progress: Optional[ProgressCallback]) -> tuple:
    """The surrogate segmenter (for refinement IS) and the VoteNet+ model (fusion votenet) of the atlas
    set: loaded from ``<atlas set>/models``, trained first when missing and ``opts.train_missing``,
    else :class:`MASRefineError` naming the ``masrefine train`` command. Returns (segmenter, VoteNet+ model), each
    None when not needed; a stored VoteNet+ model is loaded here, once, so a corrupt one is refused before any
    registration, and handed to the Fuse stage (a model just trained is not: Fuse reads it)."""
    segmenter = votenet = None
    seg_missing, vn_missing = _missing(aset, opts)
    split = 0.4 if seg_missing and vn_missing else (1.0 if seg_missing else 0.0)
    if opts.refine == "IS":
        segmenter = ensure_segmenter(aset, opts, device, part(progress, 0.0, split))
    if vn_missing:  # training the segmenter above does not add a VoteNet+ model
        cmd = f"masrefine train votenet {aset.root} --prereg {opts.prereg}"
        if not opts.train_missing:
            raise MASRefineError(f"{aset.models_dir}: no VoteNet+ model for {opts.prereg} pre-registration; "
                                 f"train one with '{cmd}' (or another fusion method)")
        log.info(f"training VoteNet+ on the atlas set first (once; stored in {aset.models_dir})")
        # as in the paper, VoteNet+ learns from pre-registration results (one model per pre-registration);
        # the refined variants (I), (IS) use the same model
        train_for_atlas_set(aset, prereg=opts.prereg, refine=None, preset=opts.preset, device=device,
                            progress=part(progress, split, 1.0), seed=opts.seed)
    elif opts.fusion == "votenet":
        # a stored model is loaded now, so a corrupt or malformed one is refused before any registration
        votenet = VoteNetModel.load(votenet_model_path(aset, opts.prereg, opts.refine))
    return segmenter, votenet


def _missing(aset, opts: SegmentOptions) -> tuple[bool, bool]:
    """(the surrogate segmenter refinement IS needs is missing, the VoteNet+ model fusion votenet needs is missing);
    ``aset``: an atlas set or its folder."""
    models = Path(getattr(aset, "models_dir", None) or Path(aset) / "models")
    return (opts.refine == "IS" and not (models / f"{segmod.MODEL_NAME}.json").exists(),
            opts.fusion == "votenet" and votenet_model_path(aset, opts.prereg, opts.refine) is None)


def training_weight(aset, opts: SegmentOptions) -> float:
    """Share of a run's overall progress for training models (when they are missing and will be trained);
    ``aset``: an atlas set or its folder."""
    seg_missing, vn_missing = _missing(aset, opts)
    return 0.5 * seg_missing + 0.7 * vn_missing if opts.train_missing else 0.0
