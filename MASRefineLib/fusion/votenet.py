"""VoteNet+ (Ding, Han, Niethammer, ISBI 2020), as the VoteNet++ paper uses it for label fusion: the model, its
storage and its use. Training it lives with the other models' training (:mod:`MASRefineLib.training`).

A small 3D U-Net (MONAI) takes a warped atlas image and the target image (two channels, intensities
normalised to [0, 1]) and predicts, per voxel, the logit of p(warped atlas label == target label).
Platt scaling ``p = sigmoid(a z + b)``, fitted on held-out pairs, calibrates it; the calibrated error
probabilities ``1 - p`` replace the intensity differences of joint label fusion's dependency matrix
(``MASRefineLib.fusion.jlf``, ``error_probs``).

Stored in the atlas set's ``models/`` as ``<name>.safetensors`` (weights) + ``<name>.json``
(architecture, Platt a and b, the reliability report with the expected calibration error before and
after calibration on pairs used for neither training nor fitting a and b, and the training record);
:func:`votenet_model_path` finds the one for a pre-registration and refinement.

Practical on a CPU: few channels (8-16-32), inference only on the region where atlases disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..modelio import ceil_to, load_model, save_model
from ..progress import ProgressCallback, report

FORMAT = "masrefine-votenet+"
FORMAT_VERSION = 1
DEFAULT_ARCH: dict[str, Any] = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "instance"}
# JLF settings for probability dependencies: the error probabilities are in [0, 1], so the ridge is
# smaller than JLF's intensity default (0.1); see docs/fusion.md for the choice.
DEFAULT_JLF = {"alpha": 0.01, "beta": 2.0, "patch_radius": 1}


def build_network(arch: dict | None = None) -> torch.nn.Module:
    from monai.networks.nets import UNet

    a = {**DEFAULT_ARCH, **(arch or {})}
    return UNet(spatial_dims=3, in_channels=2, out_channels=1, channels=tuple(a["channels"]),
                strides=tuple(a["strides"]), num_res_units=int(a["num_res_units"]), norm=a["norm"])


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
        roi_size = tuple(min(window, ceil_to(h - l, 4)) for l, h in zip(lo, hi))
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
        """Load from a ``.json`` file, or a folder (``models/``, or an atlas set whose ``models/`` has it):
        :func:`modelio.load_model`."""
        def build(p: Path, doc: dict) -> tuple[torch.nn.Module, VoteNetModel]:
            arch = {k: doc["architecture"][k] for k in DEFAULT_ARCH if k in doc["architecture"]}
            a, b = float(doc["platt"]["a"]), float(doc["platt"]["b"])
            if not (math.isfinite(a) and math.isfinite(b)):
                raise ValueError(f"platt a={a}, b={b} must be finite")
            net = build_network(arch)
            return net, cls(net, arch, a, b, {k: v for k, v in doc.items() if k not in ("architecture", "platt")},
                            str(p))

        return load_model(path, name, "VoteNet+", FORMAT, build, lambda p: (
            f"{p}: no {name}.json here or in its models/ folder (train one with 'masrefine train votenet')"))[1]


def model_name(prereg: str = "deformable", refine: str | None = None) -> str:
    """The stored name of a model trained on ``prereg`` pairs, refined with ``refine`` (None/"none": not):
    ``votenet-<prereg>`` or ``votenet-<prereg>-<refine>`` (:func:`votenet_model_path` looks them up)."""
    return f"votenet-{prereg}" + (f"-{refine}" if refine and refine != "none" else "")


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
