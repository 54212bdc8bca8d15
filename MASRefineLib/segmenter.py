"""The surrogate segmentation network of VoteNet++ (the paper's U-Net; also its "U-Net baseline").

A small MONAI 3D U-Net trained with cross entropy (+ soft Dice for up to 32 structures) on an atlas set, on a
reduced working grid with random patches centred on structures drawn uniformly, so it trains in minutes on a CPU
(and faster on a GPU). Refinement (variant IS) uses
its class probabilities of the warped atlas images and of the target (:mod:`MASRefineLib.refine`).

Stored inside the atlas set, ``<set>/models/``::

    segmenter.safetensors             the weights (safetensors; loading never unpickles anything)
    segmenter.json                    architecture, label table and class order, working spacing,
                                      normalisation, training settings, history, validation Dice
    segmenter.checkpoint.safetensors  weights + optimiser state after the last finished epoch
    segmenter.checkpoint.json         epoch, settings, loss history (training resumes from these)

Conventions: input images are normalised to [0, 1] by :func:`imageio.normalize_intensity` (the project's
normalisation), resampled to an isotropic working spacing over their own field of view with the one
warp (:func:`warp.warp`), and class probabilities are resampled back to any requested grid the same way.
Class 0 is background; class ``c`` is label value ``label_values[c]`` (values are never renumbered in
outputs).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .device import resolve_device
from .errors import MASRefineError
from .geometry import Grid
from .imageio import atomic_write_bytes, atomic_write_text, normalize_intensity
from .jsonio import json_default, read_json
from .labels import LabelTable
from .losses import soft_dice_loss_labels
from .modelio import ceil_to, load_model, save_model
from .progress import ProgressCallback, report
from .warp import image_tensor, warp, warp_labels

MODEL_NAME = "segmenter"
FORMAT = "masrefine-segmenter"
FORMAT_VERSION = 1
NORMALISATION = {"function": "MASRefineLib.imageio.normalize_intensity", "lower_percentile": 0.5,
                 "upper_percentile": 99.5, "range": [0.0, 1.0]}


@dataclass
class SegmenterSettings:
    """Training settings (stored with the model). Spacing in mm; patch size in voxels of the working grid."""
    spacing_mm: float | None = None     # working spacing; None: the atlases' spacing, coarsened to <= max_voxels
    max_voxels: int = 1_000_000         # for the automatic working spacing
    patch_size: int = 48
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    epochs: int = 150                   # 30 epochs left knee cartilage at Dice ~0.5 (docs/refinement.md)
    steps_per_epoch: int = 20
    batch_size: int = 2
    learning_rate: float = 2e-3
    foreground_fraction: float = 0.7    # patches centred on a labelled voxel
    # that voxel: "class", of a structure drawn uniformly, or "foreground", any labelled one; and the loss:
    # "dice_ce" (cross entropy + soft Dice of the structures in the batch), "ce", or "auto": dice_ce up to
    # AUTO_DICE_MAX_STRUCTURES structures, else ce (measured: docs/refinement.md, "Surrogate training recipe")
    sampling: str = "class"
    loss: str = "auto"
    validation_fraction: float = 0.2    # held-out atlases (none when fewer than 3 atlases)
    seed: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"], d["strides"] = list(self.channels), list(self.strides)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SegmenterSettings":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        # stored before the recipe was a setting: such models and checkpoints were trained this way
        kw.setdefault("loss", "ce")
        kw.setdefault("sampling", "foreground")
        for k in ("channels", "strides"):
            if k in kw:
                kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)

    def architecture_key(self) -> tuple:
        """What must match for a checkpoint to be resumed."""
        return (self.spacing_mm, self.patch_size, tuple(self.channels), tuple(self.strides), self.num_res_units,
                self.batch_size, self.learning_rate, self.foreground_fraction, self.validation_fraction, self.seed,
                self.sampling, self.loss)


#: structures up to which loss "auto" adds the soft Dice (docs/refinement.md, "Surrogate training recipe")
AUTO_DICE_MAX_STRUCTURES = 32


def auto_loss(n_structures: int) -> str:
    """The loss that ``loss="auto"`` trains with for ``n_structures`` structures (background not counted)."""
    return "dice_ce" if int(n_structures) <= AUTO_DICE_MAX_STRUCTURES else "ce"


def head_width(out_channels: int, channels: Sequence[int]) -> int | None:
    """Width of the U-Net's last layer when a 1x1x1 convolution maps it to the classes, or None (the U-Net
    outputs the classes itself). MONAI's U-Net ends with a full-resolution 3x3x3 convolution from
    ``out_channels`` to ``out_channels``, which dominates a training step with ~150 brain structures: above
    twice the first feature width the U-Net ends at that width and a 1x1x1 head gives the classes."""
    w = 2 * int(channels[0])
    return w if int(out_channels) > w else None


def build_unet(out_channels: int, channels: Sequence[int] = (8, 16, 32, 64), strides: Sequence[int] = (2, 2, 2),
               num_res_units: int = 1, head: int | None = None) -> torch.nn.Module:
    """MONAI ``UNet`` (3D, one input channel, instance norm); with ``head`` (see :func:`head_width`) it
    outputs ``head`` features, then PReLU and a 1x1x1 convolution to ``out_channels``."""
    from monai.networks.nets import UNet
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=int(head or out_channels), channels=tuple(channels),
                strides=tuple(strides), num_res_units=int(num_res_units), norm="INSTANCE")
    if not head:
        return unet
    return torch.nn.Sequential(unet, torch.nn.PReLU(), torch.nn.Conv3d(int(head), int(out_channels), 1))


def _architecture(out_channels: int, s: SegmenterSettings) -> dict:
    arch = {"type": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": int(out_channels),
            "channels": list(s.channels), "strides": list(s.strides), "num_res_units": int(s.num_res_units),
            "norm": "INSTANCE"}
    head = head_width(out_channels, s.channels)
    if head:
        arch["head"] = {"width": head, "layers": "PReLU, Conv3d 1x1x1"}
    return arch


class UNetSegmenter:
    """A trained surrogate segmenter: class probabilities of normalised images on any grid."""

    def __init__(self, net: torch.nn.Module, label_values: Sequence[int], label_table: LabelTable, spacing_mm: float,
                 settings: SegmenterSettings, meta: dict | None = None):
        self.net = net.eval()
        self.label_values = [int(v) for v in label_values]
        self.label_table = label_table
        self.spacing_mm = float(spacing_mm)
        self.settings = settings
        self.meta = dict(meta or {})
        self.path: Path | None = None  # the JSON file it was saved to / loaded from

    @property
    def num_classes(self) -> int:
        """K + 1 (background included)."""
        return len(self.label_values)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> "UNetSegmenter":
        self.net.to(resolve_device(device))
        return self

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K+1, ...) of normalised images on the working grid, by sliding windows."""
        from monai.inferers import sliding_window_inference
        m = int(np.prod(self.settings.strides))
        roi = [min(ceil_to(s, m), ceil_to(2 * self.settings.patch_size, m)) for s in x.shape[2:]]
        return sliding_window_inference(x, roi, 1, self.net, overlap=0.25, mode="gaussian")

    @torch.no_grad()
    def predict(self, images: torch.Tensor, grid: Grid, out_grid: Grid | None = None) -> torch.Tensor:
        """Class probabilities (B, K+1, *out_grid.shape) of normalised images (B, 1, *grid.shape) (or one
        (Z, Y, X) array) on ``grid``; ``out_grid`` defaults to ``grid``. Computed on the working grid
        (``spacing_mm`` over ``grid``'s field of view) and resampled trilinearly (probabilities stay
        probabilities: a convex combination)."""
        if not isinstance(images, torch.Tensor):
            images = image_tensor(np.asarray(images, dtype=np.float32))
        dev = self.device
        x = images.to(dev, torch.float32)
        wg = grid.with_spacing(self.spacing_mm)  # the working grid over grid's field of view
        out_grid = out_grid or grid
        probs = []
        for b in range(x.shape[0]):  # one at a time: bounded memory
            xb = warp(x[b:b + 1], grid, None, wg, padding="border")
            p = torch.softmax(self._logits(xb), 1)
            probs.append(p if out_grid == wg else warp(p, wg, None, out_grid, padding="border"))
        return torch.cat(probs, 0)

    @torch.no_grad()
    def predict_labels(self, image: sitk.Image | np.ndarray | torch.Tensor, grid: Grid | None = None,
                       chunk: int = 16) -> np.ndarray:
        """The U-Net's own segmentation (label values, (Z, Y, X) uint16) of one image on its grid.

        ``image``: an sitk image (normalised here) or a normalised array/tensor on ``grid``. Classes are
        resampled ``chunk`` at a time so memory stays bounded with many labels."""
        if isinstance(image, sitk.Image):
            grid = Grid.from_image(image)
            image = normalize_intensity(sitk.GetArrayFromImage(image))
        if grid is None:
            raise ValueError("grid is required for an array image")
        if not isinstance(image, torch.Tensor):
            image = image_tensor(np.asarray(image, dtype=np.float32))
        x = image.to(self.device, torch.float32).reshape(1, 1, *grid.shape)
        wg = grid.with_spacing(self.spacing_mm)
        p = torch.softmax(self._logits(warp(x, grid, None, wg, padding="border")), 1)
        best = best_idx = None
        for s in range(0, p.shape[1], chunk):
            q = p[:, s:s + chunk] if grid == wg else warp(p[:, s:s + chunk], wg, None, grid, padding="border")
            v, i = q.max(1)
            i = i + s
            if best is None:
                best, best_idx = v, i
            else:
                better = v > best
                best = torch.where(better, v, best)
                best_idx = torch.where(better, i, best_idx)
        lut = torch.as_tensor(self.label_values, device=best_idx.device)
        return lut[best_idx][0].cpu().numpy().astype(np.uint16)

    # -- storage --------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "architecture": _architecture(self.num_classes, self.settings),
                "label_values": self.label_values, "labels": self.label_table.to_json_dict(),
                "spacing_mm": self.spacing_mm, "normalisation": NORMALISATION,
                "settings": self.settings.to_json(), **self.meta}

    def save(self, models_dir: str | os.PathLike, name: str = MODEL_NAME) -> Path:
        """Write ``<name>.safetensors`` then ``<name>.json`` (atomically, :func:`modelio.save_model`); returns the
        JSON path."""
        self.path = save_model(models_dir, name, self.net, {**self.metadata(), "weights": f"{name}.safetensors"})
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", name: str = MODEL_NAME) -> "UNetSegmenter":
        """Load from a models folder, an atlas-set folder (its ``models/``), or the JSON file itself
        (:func:`modelio.load_model`: the weights read with ``safetensors`` only, no pickle)."""
        def missing(p: Path) -> str:  # name the atlas set to train on: p itself, or the set holding this models/
            aset = p.parent if p.name == "models" and (p.parent / "atlas.json").is_file() else p
            hint = aset if (aset / "atlas.json").is_file() else "ATLAS_DIR"
            return (f"{p}: no trained segmenter ({name}.json) here or in {p / 'models'}; "
                    f"train one with 'masrefine train segmenter {hint}'")

        def build(p: Path, meta: dict) -> tuple[torch.nn.Module, UNetSegmenter]:
            arch, spacing = meta["architecture"], float(meta["spacing_mm"])
            label_values = [int(v) for v in meta["label_values"]]
            if not (math.isfinite(spacing) and spacing > 0) or len(label_values) != int(arch["out_channels"]):
                raise ValueError(f"spacing_mm {spacing!r}, {len(label_values)} classes for {arch['out_channels']} "
                                 f"output channels")
            net = build_unet(int(arch["out_channels"]), arch["channels"], arch["strides"], int(arch["num_res_units"]),
                             head=(arch.get("head") or {}).get("width"))
            extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "architecture",
                                                                 "label_values", "labels", "spacing_mm",
                                                                 "normalisation", "settings", "weights")}
            return net, cls(net, label_values, LabelTable.from_json_dict(meta["labels"], str(p)), spacing,
                            SegmenterSettings.from_json(meta.get("settings", {})), extra)

        p, seg = load_model(path, name, "segmenter", FORMAT, build, missing, FORMAT_VERSION)
        seg.path = p
        return seg.to(device)


# ---------------------------------------------------------------------------------------------- training data
@dataclass
class _Volume:
    id: str
    image: np.ndarray   # (Z, Y, X) float32 on the working grid
    classes: np.ndarray  # (Z, Y, X) int64 class indices
    by_class: np.ndarray  # flat voxel indices sorted by class (int32): class c is by_class[start[c]:start[c + 1]]
    start: np.ndarray     # (K + 2,) offsets into by_class

    def voxels(self, c: int) -> np.ndarray:
        """Flat indices of the voxels of class ``c``."""
        return self.by_class[self.start[c]:self.start[c + 1]]


def auto_spacing(grids: Sequence[Grid], max_voxels: int = 1_000_000) -> float:
    """The working spacing: the atlases' finest (geometric-mean) spacing, coarsened (0.1 mm steps) until the
    largest field of view has at most ``max_voxels`` voxels."""
    base = min(float(np.prod(g.spacing) ** (1 / 3)) for g in grids)
    vol = max(float(np.prod(g.extent_mm())) for g in grids)
    s = max(base, (vol / max_voxels) ** (1 / 3))
    return float(math.ceil(s * 10 - 1e-6) / 10)


def _prepare(atlas_id: str, image: sitk.Image, label: sitk.Image, spacing: float, lut: np.ndarray,
             values: Sequence[int]) -> _Volume:
    grid = Grid.from_image(image)
    if not Grid.from_image(label).isclose(grid):
        raise MASRefineError(f"atlas {atlas_id}: label map and image are on different grids")
    wg = grid.with_spacing(spacing)
    x = image_tensor(normalize_intensity(sitk.GetArrayFromImage(image)))
    img = warp(x, grid, None, wg, padding="border")[0, 0].numpy()
    lab = torch.from_numpy(sitk.GetArrayFromImage(label).astype(np.int64))[None, None]
    lab = warp_labels(lab, grid, None, wg, values=values)[0, 0].numpy()
    if lab.max() >= len(lut):
        raise MASRefineError(f"atlas {atlas_id}: label value {int(lab.max())} is not in the label table")
    cls = lut[lab]
    if (cls < 0).any():
        bad = sorted(set(np.unique(lab[cls < 0]).tolist()))
        raise MASRefineError(f"atlas {atlas_id}: label values {bad[:8]} are not in the label table")
    flat = cls.ravel()
    start = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=len(values)))])
    return _Volume(atlas_id, img.astype(np.float32), cls.astype(np.int64),
                   np.argsort(flat, kind="stable").astype(np.int32), start)


def crop_patch(arrays: Sequence[torch.Tensor], centre: Sequence[int], size: int) -> list[torch.Tensor]:
    """Crops of ``size``^3 voxels around ``centre`` ((z, y, x) voxel index) from (Z, Y, X) tensors of one shape,
    zero outside them (the training patches of the segmenter and of VoteNet+)."""
    shape = arrays[0].shape
    lo = [int(c) - size // 2 for c in centre]
    src = tuple(slice(max(l, 0), min(l + size, s)) for l, s in zip(lo, shape))
    dst = tuple(slice(max(l, 0) - l, min(l + size, s) - l) for l, s in zip(lo, shape))
    out = []
    for a in arrays:
        crop = torch.zeros((size, size, size), dtype=a.dtype)
        crop[dst] = a[src]
        out.append(crop)
    return out


def _batch(vols: Sequence[_Volume], rng: np.random.Generator, s: SegmenterSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random patches. A fraction ``foreground_fraction`` is centred on a labelled voxel: any
    one (``sampling="foreground"``), or one of a structure drawn uniformly from those in the volume
    (``"class"``), so that small structures are seen as often as large ones (many-structure brains)."""
    xs, ys = [], []
    for _ in range(s.batch_size):
        v = vols[int(rng.integers(len(vols)))]
        n_fg = int(v.start[-1] - v.start[1])
        if n_fg and rng.random() < s.foreground_fraction:
            if s.sampling == "class":
                present = np.flatnonzero(np.diff(v.start)[1:]) + 1
                vox = v.voxels(int(present[int(rng.integers(len(present)))]))
            else:
                vox = v.by_class[v.start[1]:]
            c = np.array(np.unravel_index(int(vox[int(rng.integers(len(vox)))]), v.image.shape))
        else:
            c = np.array([rng.integers(n) for n in v.image.shape])
        img, cls = (t.numpy() for t in crop_patch([torch.from_numpy(v.image), torch.from_numpy(v.classes)], c,
                                                  s.patch_size))
        img = np.clip(img * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05), 0.0, 1.0)  # intensity jitter
        xs.append(img)
        ys.append(cls)
    return torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)), torch.from_numpy(np.stack(ys))


# ------------------------------------------------------------- checkpoints (safetensors + JSON: never pickle)
def _ckpt_paths(models_dir: Path, name: str) -> tuple[Path, Path]:
    return models_dir / f"{name}.checkpoint.safetensors", models_dir / f"{name}.checkpoint.json"


def _save_checkpoint(models_dir: Path, name: str, net: torch.nn.Module, opt: torch.optim.Optimizer, info: dict) -> None:
    from safetensors.torch import save
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = t.detach().cpu().contiguous()
    wp, jp = _ckpt_paths(models_dir, name)
    atomic_write_bytes(save(tensors), wp)
    atomic_write_text(json.dumps({**info, "param_groups": sd["param_groups"]}, indent=1, default=json_default), jp)


def _load_checkpoint(models_dir: Path, name: str) -> tuple[dict, dict, dict] | None:
    """(model state, optimiser state dict, info) or None when there is no (complete) checkpoint."""
    from safetensors.torch import load_file
    wp, jp = _ckpt_paths(models_dir, name)
    if not (wp.is_file() and jp.is_file()):
        return None
    try:
        info = read_json(jp, "checkpoint", allow_nan=True)
        tensors = load_file(str(wp), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise MASRefineError(f"{wp}: unreadable checkpoint ({str(e).splitlines()[0]}); delete it or use --fresh") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    return model, {"state": state, "param_groups": info.pop("param_groups")}, info


# --------------------------------------------------------------------------------------------------- training
def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float | None]:
    """Volume Dice of classes 1..K (None where a class is in neither map), from integer voxel counts."""
    n_p, n_r = np.bincount(pred.ravel(), minlength=n_classes), np.bincount(ref.ravel(), minlength=n_classes)
    both = np.bincount(pred[pred == ref], minlength=n_classes)
    return [None if n_p[c] + n_r[c] == 0 else 2.0 * int(both[c]) / int(n_p[c] + n_r[c]) for c in range(1, n_classes)]


def train_segmenter(images: Sequence[sitk.Image], labels: Sequence[sitk.Image], label_table: LabelTable,
                    models_dir: str | os.PathLike, settings: SegmenterSettings | None = None,
                    ids: Sequence[str] | None = None, device: str | torch.device = "auto",
                    progress: ProgressCallback | None = None, resume: bool = True, name: str = MODEL_NAME,
                    source: str | None = None) -> UNetSegmenter:
    """Train the U-Net with cross entropy on atlas images and label maps; save it in ``models_dir``.

    ``images``/``labels``: sitk images (any grids; each label map on its image's grid). Classes are the
    label table's values (background 0 first). After every epoch a checkpoint (weights + Adam state,
    safetensors) is written; with ``resume`` an interrupted training continues from it (the same data
    and settings, except ``epochs``, which may be raised to train longer). ``progress`` receives
    ``train-segmenter`` events (it may raise :class:`Cancelled`; the last finished epoch is kept).
    Validation: ``validation_fraction`` of the atlases (at least one when there are 3 or more) are held
    out and their Dice on the working grid is stored with the model.
    """
    s = settings or SegmenterSettings()
    if s.loss not in ("auto", "ce", "dice_ce"):
        raise MASRefineError(f"segmenter settings: unknown loss {s.loss!r} (expected auto, ce or dice_ce)")
    if s.sampling not in ("foreground", "class"):
        raise MASRefineError(f"segmenter settings: unknown sampling {s.sampling!r} (expected foreground or class)")
    if len(images) != len(labels) or not images:
        raise MASRefineError("training needs the same, non-zero number of images and label maps")
    ids = list(ids) if ids is not None else [f"atlas{i}" for i in range(len(images))]
    from .outputs import require_writable_folder
    models_dir = require_writable_folder(models_dir, "the surrogate segmenter")  # before hours of training
    dev = resolve_device(device)
    grids = [Grid.from_image(im) for im in images]
    if s.spacing_mm is None:
        s = SegmenterSettings(**{**asdict(s), "spacing_mm": auto_spacing(grids, s.max_voxels)})
    values = [0] + sorted(int(v) for v in label_table)
    if s.loss == "auto":  # stored resolved, so the model says what it was trained with
        s = SegmenterSettings(**{**asdict(s), "loss": auto_loss(len(values) - 1)})
    lut = -np.ones(max(values) + 1, np.int64)
    lut[values] = np.arange(len(values))

    # hold-out split (deterministic for the seed)
    rng0 = np.random.default_rng(s.seed)
    order = rng0.permutation(len(images))
    n_val = int(round(s.validation_fraction * len(images))) if len(images) >= 3 else 0
    if len(images) >= 3:
        n_val = min(max(1, n_val), len(images) - 1)
    val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())

    # resume?
    torch.manual_seed(s.seed)
    net = build_unet(len(values), s.channels, s.strides, s.num_res_units, head_width(len(values), s.channels)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=s.learning_rate)
    start_epoch, history, seconds = 0, [], 0.0
    ck = _load_checkpoint(models_dir, name) if resume else None
    if ck is not None:
        model_state, opt_state, info = ck
        stored = info.get("settings", {})
        old = SegmenterSettings.from_json(stored)
        if "loss" not in stored and (s.loss, s.sampling) != (old.loss, old.sampling):
            # a checkpoint from before the recipe was a setting goes on with the recipe it was started with
            s = SegmenterSettings(**{**asdict(s), "loss": old.loss, "sampling": old.sampling})
            report(progress, "train-segmenter", start_epoch / max(1, s.epochs),
                   f"resuming a checkpoint of the earlier recipe (loss {s.loss}, sampling {s.sampling})")
        same = (old.architecture_key() == s.architecture_key() and info.get("train_ids") == [ids[i] for i in train_idx]
                and info.get("label_values") == values and set(model_state) == set(net.state_dict()))
        if not same:
            raise MASRefineError(f"{_ckpt_paths(models_dir, name)[1]}: a checkpoint with other data or settings "
                                 f"exists; use --fresh to start over (it will be replaced)")
        net.load_state_dict(model_state, strict=True)
        opt.load_state_dict(opt_state)
        start_epoch, history, seconds = int(info["epoch"]), list(info.get("history", [])), float(info.get("seconds", 0))
        report(progress, "train-segmenter", start_epoch / max(1, s.epochs),
               f"resuming after epoch {start_epoch} of {s.epochs}")

    report(progress, "train-segmenter", start_epoch / max(1, s.epochs), f"reading {len(images)} atlases")
    vols = [_prepare(ids[i], images[i], labels[i], s.spacing_mm, lut, values) for i in range(len(images))]
    train_vols = [vols[i] for i in train_idx]
    val_vols = [vols[i] for i in val_idx]

    net.train()
    for epoch in range(start_epoch, s.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([s.seed, epoch])
        torch.manual_seed(s.seed * 100003 + epoch)
        losses = []
        for step in range(s.steps_per_epoch):
            x, y = _batch(train_vols, rng, s)
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad(set_to_none=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            if s.loss == "dice_ce":  # + Eq. 5 over the structures in the batch
                loss = loss + soft_dice_loss_labels(torch.softmax(logits, 1), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % 5 == 0:
                report(progress, "train-segmenter", (epoch + (step + 1) / s.steps_per_epoch) / s.epochs,
                       f"epoch {epoch + 1}/{s.epochs} step {step + 1}/{s.steps_per_epoch} loss {np.mean(losses):.4f}",
                       epoch=epoch + 1, loss=float(np.mean(losses)))
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        _save_checkpoint(models_dir, name, net, opt, {
            "epoch": epoch + 1, "settings": s.to_json(), "history": history, "seconds": seconds,
            "train_ids": [ids[i] for i in train_idx], "label_values": values})
        report(progress, "train-segmenter", (epoch + 1) / s.epochs,
               f"epoch {epoch + 1}/{s.epochs} loss {history[-1]['loss']:.4f}", epoch=epoch + 1, loss=history[-1]["loss"])
    net.eval()

    seg = UNetSegmenter(net, values, label_table, s.spacing_mm, s)
    val = {}
    if val_vols:
        per_class = []
        for v in val_vols:
            wg_shape = v.image.shape
            with torch.no_grad():
                p = seg._logits(torch.from_numpy(v.image)[None, None].to(dev)).argmax(1)[0].cpu().numpy()
            assert p.shape == wg_shape
            per_class.append(dice_per_class(p, v.classes, len(values)))
        per_label = {}
        for c in range(1, len(values)):
            ds = [d[c - 1] for d in per_class if d[c - 1] is not None]
            per_label[str(values[c])] = float(np.mean(ds)) if ds else None
        defined = [d for d in per_label.values() if d is not None]
        val = {"ids": [v.id for v in val_vols], "grid": "working grid", "dice_per_label": per_label,
               "mean_dice": float(np.mean(defined)) if defined else None}
    seg.meta = {"trained_on": {"source": source, "train_ids": [ids[i] for i in train_idx],
                               "example_grid": grids[0].to_json()},
                "training": {"epochs": s.epochs, "seconds": seconds, "device": str(dev), "history": history,
                             "final_loss": history[-1]["loss"] if history else None,
                             "torch": torch.__version__},
                "validation": val or None}
    seg.save(models_dir, name)
    report(progress, "train-segmenter", 1.0, "saved" + (f", validation Dice {val['mean_dice']:.3f}"
                                                         if val and val.get("mean_dice") is not None else ""))
    return seg


def train_on_atlas_set(atlas_dir: str | os.PathLike, settings: SegmenterSettings | None = None,
                       device: str | torch.device = "auto", progress: ProgressCallback | None = None,
                       resume: bool = True) -> UNetSegmenter:
    """Train the segmenter on every atlas of an atlas set; saved in the set's ``models/``."""
    from .atlas import AtlasSet
    aset = AtlasSet.load(atlas_dir)
    images, labels = [], []
    for n, aid in enumerate(aset.ids):
        report(progress, "train-segmenter", 0.0, f"reading atlas {n + 1}/{len(aset)} {aid}")
        img, lab = aset.read(aid)
        images.append(img)
        labels.append(lab)
    return train_segmenter(images, labels, aset.label_table, aset.models_dir, settings, aset.ids, device, progress,
                           resume, source=str(aset.root))


