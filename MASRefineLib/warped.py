"""The hand-off between stages: atlases warped onto one target grid.

Registration produces a :class:`WarpedSet`; refinement takes one and returns a new one (fields
composed, images and labels re-warped from the original atlas in one interpolation); fusion and
evaluation read one. On disk (what ``masrefine register``/``refine`` write and read)::

    OUT/report.json                 written last, atomically: target, grid, stage, label table, atlases
    OUT/<id>_image.nrrd             warped atlas image (float32, intensities normalised to [0, 1]; raw)
    OUT/<id>_label.nii.gz           warped atlas label map (uint16, original label values)
    OUT/<id>_label.seg.nrrd         the same as a Slicer segmentation (names, colours)
    OUT/<id>_field.nrrd             displacement field, LPS mm on the target grid (Slicer grid transform)

In memory every atlas holds torch tensors on the CPU (the stages move chunks of them to the working device):
the image (Z, Y, X) float32, the label values (Z, Y, X) in the most compact integer dtype that holds them
(:func:`MASRefineLib.volume.compact_labels`: uint8 for most atlas sets, a quarter of int32; never renumbered),
the field (3, Z, Y, X) float32 in LPS mm on ``target_grid``, resampling convention (target p -> atlas p + u(p)),
always the *total* field from the original atlas to the target. ``image``/``label``/``field`` give numpy views
of them (no copy) for numpy code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import imageio, validate
from .volume import Volume, compact_labels
from .errors import MASRefineError
from .fields import read_field, write_field
from .geometry import Grid
from .imageio import array_to_image, run_writers, write_image
from .jsonio import read_json, write_json
from .labels import LabelTable, write_label_outputs
from .outputs import inside

SCHEMA_VERSION = 1


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def target_tensor(target, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """The target as a normalised (1, 1, Z, Y, X) float32 tensor on ``grid`` and ``device``: a
    :class:`~MASRefineLib.volume.Volume` is taken as it is (normalised when it was read; its grid must be ``grid``),
    without a numpy round trip; anything else as :func:`target_array`."""
    if isinstance(target, Volume):
        if not target.grid.isclose(grid):
            raise MASRefineError(f"{target.path or 'target'}: grid does not match the registered grid "
                                 f"({target.grid.difference(grid)})")
        return target.batch(device, torch.float32)
    if isinstance(target, torch.Tensor) and tuple(target.shape[-3:]) == tuple(grid.shape) \
            and target.numel() == int(np.prod(grid.shape)):
        return target.detach().reshape(1, 1, *grid.shape).to(device=device, dtype=torch.float32)
    return torch.from_numpy(target_array(target, grid))[None, None].to(device)


def target_array(target, grid: Grid) -> np.ndarray:
    """The target as a normalised (Z, Y, X) float32 array on ``grid`` (a set's ``target_grid``), what refinement
    and fusion compare the atlases with: a :class:`~MASRefineLib.volume.Volume` is taken as it is (normalised when
    read; its grid must be ``grid``); a file path is read (:func:`imageio.read_image`); an ``sitk.Image`` is
    resampled onto the grid when needed and normalised (:func:`imageio.normalize_intensity`); arrays and tensors
    are taken as already normalised and must have the grid's shape (leading axes of size 1 are dropped)."""
    if isinstance(target, Volume):
        return target_tensor(target, grid)[0, 0].cpu().numpy()
    if isinstance(target, (str, os.PathLike)):
        target = imageio.read_image(target)
    if isinstance(target, sitk.Image):
        if not Grid.from_image(target).isclose(grid):
            target = imageio.resample_image(sitk.Cast(target, sitk.sitkFloat32), grid)
        return imageio.normalize_intensity(sitk.GetArrayFromImage(target))
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    arr = np.asarray(target, dtype=np.float32)
    arr = arr.reshape(arr.shape[-3:]) if arr.ndim > 3 and arr.size == np.prod(arr.shape[-3:]) else arr
    if arr.shape != grid.shape:
        raise MASRefineError(f"target array shape {arr.shape} does not match the registered grid {grid.shape}")
    return arr


def _cpu_tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach()
    return t.to(device="cpu", dtype=dtype)


class WarpedAtlas:
    """One atlas on the target grid: tensors on the CPU (module doc). ``image``, ``label`` and ``field`` may be
    given as numpy arrays or tensors (any device); they are kept as ``image_tensor`` (Z, Y, X) float32 normalised
    intensities, ``label_tensor`` (Z, Y, X) compact integer label values and ``field_tensor`` (3, Z, Y, X) float32
    LPS mm. ``source_*``: the original atlas files (absolute paths); ``info``: seconds, similarity,
    folding_fraction, ..."""

    def __init__(self, id: str, image: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor,
                 field: np.ndarray | torch.Tensor, source_image: str | None = None, source_label: str | None = None,
                 info: dict[str, Any] | None = None):
        self.id = id
        self.image_tensor = _cpu_tensor(image, torch.float32)
        self.label_tensor = compact_labels(label).cpu()
        self.field_tensor = _cpu_tensor(field, torch.float32)
        self.source_image, self.source_label = source_image, source_label
        self.info: dict[str, Any] = dict(info) if info else {}

    # numpy views (no copy) for numpy code (the pipeline's QA, VoteNet+ training pairs, benchmarks)
    @property
    def image(self) -> np.ndarray:
        """(Z, Y, X) float32 normalised intensities (a view of ``image_tensor``)."""
        return self.image_tensor.numpy()

    @property
    def label(self) -> np.ndarray:
        """(Z, Y, X) label values, compact integer dtype (a view of ``label_tensor``)."""
        return self.label_tensor.numpy()

    @property
    def field(self) -> np.ndarray:
        """(3, Z, Y, X) float32 LPS mm (a view of ``field_tensor``)."""
        return self.field_tensor.numpy()

    def __repr__(self) -> str:
        return f"WarpedAtlas({self.id!r}, shape={tuple(self.image_tensor.shape)}, labels {self.label_tensor.dtype})"


@dataclass
class WarpedSet:
    target_grid: Grid
    label_table: LabelTable
    atlases: list[WarpedAtlas]
    stage: str                        # "affine", "deformable", "refined-I", "refined-IS"
    target_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)  # [{"id", "error"}]

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self.atlases]

    def images(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, 1, Z, Y, X) float32."""
        return torch.stack([a.image_tensor for a in self.atlases]).unsqueeze(1).to(device)

    def labels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, 1, Z, Y, X) int64 label values."""
        return torch.stack([a.label_tensor.to(device=device, dtype=torch.int64) for a in self.atlases]).unsqueeze(1)

    def files(self, atlas_id: str) -> dict[str, str]:
        return {"image": f"{atlas_id}_image.nrrd", "label": f"{atlas_id}_label.nii.gz",
                "segmentation": f"{atlas_id}_label.seg.nrrd", "field": f"{atlas_id}_field.nrrd"}

    def save(self, out_dir: str | Path, workers: int = 1) -> Path:
        """Write every atlas's files (on ``workers`` threads), then ``report.json`` last (atomically).
        Returns the report path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)

        def writer(a: WarpedAtlas) -> Callable[[], None]:
            def write() -> None:
                for w in self.atlas_writers(a, out):
                    w()
            return write

        run_writers([writer(a) for a in self.atlases], workers)
        return self.write_report(out)

    def atlas_writers(self, a: WarpedAtlas, out_dir: str | Path) -> list[Callable[[], Path]]:
        """The writers of one atlas's files in ``out_dir`` (:meth:`files`: image, label map as .nii.gz and
        .seg.nrrd, field), one callable per file kind, each returning the path it wrote: :meth:`save` runs them,
        and so does a caller that writes each atlas as soon as it has it (the pipeline, #22)."""
        out = Path(out_dir)
        f = self.files(a.id)
        return [
            # float32: gzip saves ~16 % for 0.7 CPU s (imageio.write_image)
            lambda: write_image(array_to_image(a.image.astype(np.float32), self.target_grid), inside(out, f["image"]),
                                compress=False),
            lambda: write_label_outputs(array_to_image(a.label.astype(np.uint16), self.target_grid), self.label_table,
                                        inside(out, f"{a.id}_label"))["nifti"],
            lambda: write_field(a.field, self.target_grid, inside(out, f["field"])),
        ]

    def write_report(self, out_dir: str | Path) -> Path:
        """``report.json`` of this set in ``out_dir`` (atomically; written after the atlases' files). Returns its
        path."""
        out = Path(out_dir)
        # absolute paths: a later 'masrefine refine/fuse' may run from another working directory
        entries = [{"id": a.id, "files": self.files(a.id), "source_image": _absolute(a.source_image),
                    "source_label": _absolute(a.source_label), **{k: v for k, v in a.info.items()}}
                   for a in self.atlases]
        report = {"schema_version": SCHEMA_VERSION, "stage": self.stage, "target": _absolute(self.target_path),
                  "grid": self.target_grid.to_json(), "labels": self.label_table.to_json_dict(),
                  "atlases": entries, "failed": self.failed, "info": self.info}
        return write_json(report, out / "report.json")

    @classmethod
    def load(cls, out_dir: str | Path) -> "WarpedSet":
        """Read a folder written by :meth:`save` (``masrefine register`` / ``refine``). Its ``report.json`` is an
        input like any other: a malformed one, an atlas id that is not a plain name (ids become output file
        names) or a listed file outside the folder is a one-line error naming it; every volume goes through
        the one reader (:mod:`MASRefineLib.imageio`, :mod:`MASRefineLib.validate`)."""
        out = Path(out_dir)
        rp = out / "report.json"
        if not rp.exists():
            raise MASRefineError(f"{rp}: not found (is {out} a folder written by 'masrefine register'?)")
        report = read_json(rp, "report", allow_nan=True)  # written by save(): NaN QA numbers allowed
        if not isinstance(report, dict):
            raise MASRefineError(f"{rp}: must hold a JSON object (a report written by 'masrefine register')")
        if report.get("schema_version") != SCHEMA_VERSION:
            raise MASRefineError(f"{rp}: unsupported schema_version {report.get('schema_version')!r}")
        try:
            grid = Grid.from_json(report["grid"])
            entries, stage = list(report["atlases"]), str(report["stage"])
            labels = report["labels"]
        except (KeyError, TypeError, ValueError) as e:
            raise MASRefineError(f"{rp}: malformed report ({type(e).__name__}: {e})") from None
        validate.check_grid(rp, grid)
        atlases = []
        for n, e in enumerate(entries):
            f = e.get("files") if isinstance(e, dict) else None
            if not isinstance(f, dict):
                raise MASRefineError(f"{rp}: atlas entry {n + 1} must be an object with id and files")
            aid = e.get("id")
            problem = validate.atlas_id_problem(aid) or validate.duplicate_id_problem(aid, (a.id for a in atlases))
            if problem:
                raise MASRefineError(f"{rp}: {problem}")
            paths = {key: inside(out, f.get(key)) for key in ("image", "label", "field")}  # names, never paths
            for p in paths.values():
                if not p.exists():
                    raise MASRefineError(f"{p}: listed in report.json but missing")
            img = imageio._read(paths["image"], sitk.sitkFloat32)
            lab = imageio.read_label(paths["label"], allow_empty=True)  # values checked, never wrapped by a cast
            fld, fgrid = read_field(paths["field"])
            for p, g in ((paths["image"], Grid.from_image(img)), (paths["label"], Grid.from_image(lab)),
                         (paths["field"], fgrid)):
                if not g.isclose(grid):
                    raise MASRefineError(f"{p}: grid does not match the target grid in report.json "
                                         f"({g.difference(grid)})")
            info = {k: v for k, v in e.items() if k not in ("id", "files", "source_image", "source_label")}
            atlases.append(WarpedAtlas(aid, sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab), fld,
                                       e.get("source_image"), e.get("source_label"), info))
        if not isinstance(labels, dict):
            raise MASRefineError(f"{rp}: 'labels' must be an object {{value: {{name, color}}}}")
        return cls(grid, LabelTable.from_json_dict(labels, str(rp)), atlases, stage,
                   report.get("target"), report.get("info", {}), report.get("failed", []))
