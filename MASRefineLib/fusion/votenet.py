"""VoteNet+ (Ding, Han, Niethammer, ISBI 2020), as the VoteNet++ paper uses it for label fusion.

A small 3D U-Net (MONAI) takes a warped atlas image and the target image (two channels, intensities
normalised to [0, 1]) and predicts, per voxel, the logit of p(warped atlas label == target label).
Platt scaling ``p = sigmoid(a z + b)``, fitted on held-out pairs, calibrates it; the calibrated error
probabilities ``1 - p`` replace the intensity differences of joint label fusion's dependency matrix
(``MASRefineLib.fusion.jlf``, ``error_probs``).

Training needs only an atlas set: its atlases registered to each other leave-one-out give pairs
(warped atlas j -> atlas i image/labels) with known target labels. The pairs come from a
:class:`PairSource` (any iterable of :class:`Pair`), so the registration that makes them is injected:
``masrefine train votenet`` builds them from ``masrefine register`` output folders.

Stored in the atlas set's ``models/`` as ``<name>.safetensors`` (weights) + ``<name>.json``
(architecture, Platt a and b, the reliability report with the expected calibration error before and
after calibration on pairs used for neither training nor fitting a and b, and the training record).

Practical on a CPU: few channels (8-16-32), 32^3 patches sampled mostly near label boundaries and
disagreements, inference only on the region where atlases disagree.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MASRefineError
from ..jsonio import field_error, read_json
from ..modelio import find_description, load_weights, save_model, weights_path
from ..progress import ProgressCallback, report, scaled

FORMAT = "masrefine-votenet+"
FORMAT_VERSION = 1
DEFAULT_ARCH: dict[str, Any] = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "instance"}
# JLF settings for probability dependencies: the error probabilities are in [0, 1], so the ridge is
# smaller than JLF's intensity default (0.1); see docs/fusion.md for the choice.
DEFAULT_JLF = {"alpha": 0.01, "beta": 2.0, "patch_radius": 1}


@dataclass
class Pair:
    """One training pair on the target's grid: a warped atlas and the target, with both label maps."""
    warped_image: np.ndarray   # (Z, Y, X) float32 in [0, 1]
    warped_label: np.ndarray   # (Z, Y, X) integer label values
    target_image: np.ndarray   # (Z, Y, X) float32 in [0, 1]
    target_label: np.ndarray   # (Z, Y, X) integer label values
    atlas_id: str = ""
    target_id: str = ""


PairSource = Iterable[Pair]


def pairs_from_warped(warped, target_image: np.ndarray, target_label: np.ndarray, target_id: str = "") -> list[Pair]:
    """Pairs from a :class:`~MASRefineLib.warped.WarpedSet` whose target has a known label map (the target's
    image normalised to [0, 1] and its label map, both on ``warped.target_grid``)."""
    if tuple(target_label.shape) != tuple(warped.target_grid.shape):
        raise MASRefineError(f"target {target_id}: label map shape {target_label.shape} does not match the "
                             f"registered grid {warped.target_grid.shape}")
    return [Pair(a.image.astype(np.float32), a.label, target_image.astype(np.float32), target_label, a.id, target_id)
            for a in warped.atlases if a.id != target_id]


def build_network(arch: dict | None = None) -> torch.nn.Module:
    from monai.networks.nets import UNet

    a = {**DEFAULT_ARCH, **(arch or {})}
    return UNet(spatial_dims=3, in_channels=2, out_channels=1, channels=tuple(a["channels"]),
                strides=tuple(a["strides"]), num_res_units=int(a["num_res_units"]), norm=a["norm"])


def band_mask(warped_label: np.ndarray | torch.Tensor, target_label: np.ndarray | torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(Z, Y, X) bool: where the two label maps differ, or within ``radius`` voxels of a label boundary of
    either: the voxels where an atlas label may be wrong (elsewhere both sit deep inside one structure)."""
    from .common import consensus

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


# ---------------------------------------------------------------------------------------------- the model

@dataclass
class VoteNetModel:
    net: torch.nn.Module
    arch: dict
    a: float = 1.0
    b: float = 0.0
    meta: dict = field(default_factory=dict)
    source: str | None = None  # the .json it was loaded from (recorded in the fusion's info)

    def logits(self, images: torch.Tensor, target: torch.Tensor, roi: torch.Tensor | None = None,
               device: torch.device | str = "cpu", window: int = 64, progress: ProgressCallback | None = None,
               stage: str = "fuse") -> torch.Tensor:
        """Logits (B, Z, Y, X) for warped atlas images (B, Z, Y, X) against ``target`` (Z, Y, X); only the
        bounding box of ``roi`` (plus a context margin) is evaluated, the rest is 0."""
        from monai.inferers import sliding_window_inference

        b = images.shape[0]
        shape = tuple(target.shape)
        out = torch.zeros((b, *shape), dtype=torch.float32)
        if roi is not None and not bool(roi.any()):
            return out
        if roi is None:
            lo, hi = [0, 0, 0], list(shape)
        else:
            nz = roi.nonzero()
            margin = 8
            lo = [max(int(v) - margin, 0) for v in nz.min(0).values]
            hi = [min(int(v) + 1 + margin, s) for v, s in zip(nz.max(0).values, shape)]
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        net = self.net.to(device).eval()
        tgt = target[sl].to(device, torch.float32)
        roi_size = tuple(min(window, _ceil_to(h - l, 4)) for l, h in zip(lo, hi))
        with torch.no_grad():
            for i in range(b):
                report(progress, stage, i / b, f"VoteNet+ atlas {i + 1}/{b}")
                x = torch.stack([images[i][sl].to(device, torch.float32), tgt])[None]
                z = sliding_window_inference(x, roi_size, 1, net, overlap=0.25, mode="gaussian", padding_mode="replicate")
                out[i][sl] = z[0, 0].float().cpu()
        return out

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated p(atlas label == target label) = sigmoid(a z + b)."""
        return torch.sigmoid(self.a * logits + self.b)

    def save(self, models_dir: str | Path, name: str = "votenet") -> Path:
        """Write ``<models_dir>/<name>.safetensors`` and ``<name>.json`` (last, :func:`modelio.save_model`); returns
        the JSON path."""
        doc = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION, "weights": f"{name}.safetensors",
               "architecture": {"kind": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 2,
                                "out_channels": 1, **self.arch},
               "inputs": ["warped atlas image", "target image"],
               "intensities": "normalised to [0, 1] (imageio.normalize_intensity, 0.5/99.5 percentiles)",
               "output": "logit z of p(warped atlas label == target label)",
               "platt": {"a": self.a, "b": self.b, "formula": "p = 1 / (1 + exp(-(a z + b)))"}}
        return save_model(models_dir, name, self.net, doc, metadata={"format": FORMAT})

    @classmethod
    def load(cls, path: str | Path, name: str = "votenet") -> "VoteNetModel":
        """Load from a ``.json`` file, or a folder (``models/``, or an atlas set whose ``models/`` has it)."""
        p = Path(path)
        if p.is_dir():
            found = find_description(p, name)
            if found is None:
                raise MASRefineError(f"{path}: no {name}.json here or in its models/ folder "
                                     f"(train one with 'masrefine train votenet')")
            p = found
        if not p.exists():
            raise MASRefineError(f"{p}: VoteNet+ model not found")
        doc = read_json(p, "VoteNet+ model", allow_nan=True)  # written by save()
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise MASRefineError(f"{p}: not a VoteNet+ model (format "
                                 f"{doc.get('format') if isinstance(doc, dict) else None!r})")
        try:  # a description edited by hand or cut short: one line naming the field
            wpath = weights_path(p, doc, name)
            arch = {k: doc["architecture"][k] for k in DEFAULT_ARCH if k in doc["architecture"]}
            a, b = float(doc["platt"]["a"]), float(doc["platt"]["b"])
            if not (math.isfinite(a) and math.isfinite(b)):
                raise ValueError(f"platt a={a}, b={b} must be finite")
            net = build_network(arch)
        except (KeyError, TypeError, ValueError, AttributeError, AssertionError, RuntimeError) as e:
            raise MASRefineError(f"{p}: malformed VoteNet+ model description ({field_error(e)})") from None
        load_weights(net, wpath, p, "VoteNet+")
        meta = {k: v for k, v in doc.items() if k not in ("architecture", "platt")}
        return cls(net, arch, a, b, meta, str(p))


def _ceil_to(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


# ---------------------------------------------------------------------------------------------- training

def _patch(arrays: Sequence[torch.Tensor], centre: Sequence[int], size: int) -> list[torch.Tensor]:
    """Crops of ``size``^3 around ``centre`` from (Z, Y, X) tensors, zero-padded outside."""
    shape = arrays[0].shape
    lo = [c - size // 2 for c in centre]
    out = []
    for a in arrays:
        crop = torch.zeros((size, size, size), dtype=a.dtype)
        src = tuple(slice(max(l, 0), min(l + size, s)) for l, s in zip(lo, shape))
        dst = tuple(slice(max(l, 0) - l, min(l + size, s) - l) for l, s in zip(lo, shape))
        crop[dst] = a[src]
        out.append(crop)
    return out


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
                  band_fraction: float = 0.4, wrong_fraction: float = 0.4, band_loss: bool = True,
                  seed: int = 0, device: torch.device | str = "cpu",
                  max_calib_voxels: int = 400_000, progress: ProgressCallback | None = None,
                  stage: str = "train-votenet") -> VoteNetModel:
    """Train VoteNet+ on ``train_pairs`` (binary cross-entropy on p(atlas label == target label), Adam) and
    calibrate it (Platt) on ``calib_pairs``: every other pair (from the first) fits a and b, the remaining
    pairs give the reliability report (ECE before/after); with a single calibration pair its band voxels
    are split at random instead. Patches of ``patch``^3 voxels: a fraction ``wrong_fraction`` centred
    where the atlas label is wrong, ``band_fraction`` in the band (labels differ or within ``band_radius``
    voxels of a boundary), the rest anywhere; with ``band_loss`` the loss counts band voxels only (deep
    inside a structure the answer is trivially "right" and would dominate). The returned model's ``meta``
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
            img, tgt, y, m = _patch([d.img, d.tgt, d.y.float(), d.band.float()], c, patch)
            xs.append(torch.stack([img, tgt]))
            ys.append(y[None])
            ms.append(m[None])
        x = torch.stack(xs).to(device)
        y = torch.stack(ys).to(device)
        if band_loss:
            m = torch.stack(ms).to(device)
            loss = (F.binary_cross_entropy_with_logits(net(x), y, reduction="none") * m).sum() / m.sum().clamp(min=1)
        else:
            loss = F.binary_cross_entropy_with_logits(net(x), y)
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
                     "band_fraction": band_fraction, "wrong_fraction": wrong_fraction, "band_loss": band_loss,
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

def loo_pairs(aset, register_fn=None, *, prereg: str = "deformable", preset: str = "default", refine: str | None = None,
              segmenter=None, targets: Sequence[str] | None = None, device: torch.device | str = "auto",
              progress: ProgressCallback | None = None, stage: str = "train-votenet",
              cache: str | Path | None = None) -> list[Pair]:
    """Leave-one-out pairs of an atlas set: each atlas in ``targets`` (default: all) is a target, every
    other atlas is registered to it (``register_fn(target_image, target_id, atlas_ids) -> WarpedSet``;
    default: :func:`MASRefineLib.registration.register` with ``preset`` and stage ``prereg``, then
    :func:`MASRefineLib.refine.refine` variant ``refine`` when given), and each warped atlas with the
    target's image and label map is a pair. ``cache``: a folder keeping each target's registrations
    (``<cache>/<target id>/``, the folder ``masrefine register`` writes), reused when present."""
    import SimpleITK as sitk

    from ..warped import WarpedSet

    from ..imageio import normalize_intensity

    ids = list(aset.ids)
    targets = list(targets) if targets is not None else ids
    if register_fn is None:
        register_fn = _default_register(aset, prereg, preset, refine, segmenter, device)
    pairs: list[Pair] = []
    for k, tid in enumerate(targets):
        report(progress, stage, 0.3 * k / len(targets), f"leave-one-out registration to {tid} ({k + 1}/{len(targets)})")
        image, label = aset.read(tid)
        others = [a for a in ids if a != tid]
        folder = Path(cache) / tid if cache is not None else None
        if folder is not None and (folder / "report.json").exists():
            ws = WarpedSet.load(folder)
        else:
            ws = register_fn(image, tid, others)
            if folder is not None:
                ws.save(folder)
        tarr = normalize_intensity(sitk.GetArrayFromImage(image))
        pairs += pairs_from_warped(ws, tarr, sitk.GetArrayFromImage(label).astype(np.int64), tid)
    return pairs


def _default_register(aset, prereg: str, preset: str, refine: str | None, segmenter, device):
    def fn(image, tid: str, others: list[str]):
        from ..registration import AtlasInput, get_params, register

        inputs = [AtlasInput(a, load=(lambda a=a: aset.read(a)), source_image=str(aset.image_path(a)),
                             source_label=str(aset.label_path(a))) for a in others]
        ws = register(image, inputs, aset.label_table, params=get_params(preset, stage=prereg), device=device)
        if refine:
            from ..refine import refine as refine_fn
            ws = refine_fn(ws, image, refine, segmenter=segmenter, device=device)
        return ws
    return fn


def model_name(prereg: str = "deformable", refine: str | None = None) -> str:
    """The stored name of a model trained on ``prereg`` pairs, refined with ``refine`` (None/"none": not):
    ``votenet-<prereg>`` or ``votenet-<prereg>-<refine>`` (``pipeline.votenet_model_path`` looks them up)."""
    return f"votenet-{prereg}" + (f"-{refine}" if refine and refine != "none" else "")


#: training settings per preset (``fast`` trains in a few minutes on 2 CPU cores)
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"iterations": 150, "targets": 3},
    "default": {"iterations": 400, "targets": 5},
    "accurate": {"iterations": 1500, "targets": None},
}


def train_for_atlas_set(aset, *, prereg: str = "deformable", refine: str | None = None, preset: str = "default",
                        device: torch.device | str = "auto", progress: ProgressCallback | None = None,
                        segmenter=None, register_fn=None, targets: Sequence[str] | int | None = None,
                        iterations: int | None = None, name: str | None = None, seed: int = 0,
                        cache: str | Path | None = None, **train_kw) -> Path:
    """Train VoteNet+ on an atlas set alone (leave-one-out registrations of its atlases to each other) and
    store it in ``aset.models_dir`` as :func:`model_name` (``.safetensors`` + ``.json``). ``targets``:
    atlas ids used as targets, or how many (chosen at random with ``seed``; default from the preset); about
    30 % of the targets are held out for calibration; ``cache``: keep/reuse the leave-one-out registrations
    there (see :func:`loo_pairs`). Returns the JSON path."""
    from ..atlas import AtlasSet
    from ..device import resolve_device

    if not hasattr(aset, "ids"):
        aset = AtlasSet.load(aset)
    if len(aset.ids) < 3:
        raise MASRefineError(f"{aset.root}: VoteNet+ needs at least 3 atlases (2 targets, one held out to calibrate)")
    from ..outputs import require_writable_folder
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
    pairs = loo_pairs(aset, register_fn, prereg=prereg, preset=preset, refine=refine, segmenter=segmenter,
                      targets=targets, device=dev, progress=progress, cache=cache)
    reg_s = time.time() - t0
    train, calib = split_by_target(pairs, seed=seed)

    model = train_votenet(train, calib, iterations=int(settings["iterations"]), seed=seed, device=dev,
                          progress=scaled(progress, 0.3, 1.0), **train_kw)  # 0..0.3: the registrations
    model.meta["atlas_set"] = str(aset.root)
    model.meta["registration"] = {"prereg": prereg, "refine": refine, "preset": preset, "targets": list(targets),
                                  "seconds": round(reg_s, 1), "custom": register_fn is not None}
    return model.save(aset.models_dir, name or model_name(prereg, refine))
