"""Shared fixtures: the real data in ../shared (tests skip with a message when it is absent)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASREFINE_SHARED", ROOT.parent / "shared"))
IXI = SHARED / "data" / "ixi-dlmuse"
KNEE = SHARED / "data" / "knee-oai"
SYNTH_KNEE = SHARED / "tools" / "synth_knee.py"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing (tests use ../shared/data when present)")
    return path


@pytest.fixture(scope="session")
def ixi_dir() -> Path:
    return _need(IXI)


@pytest.fixture(scope="session")
def ixi_ids(ixi_dir) -> list[str]:
    return (ixi_dir / "subjects.txt").read_text().split()


def ixi_paths(ixi_dir: Path, subject: str) -> tuple[Path, Path]:
    return ixi_dir / "images" / f"{subject}.nii.gz", ixi_dir / "labels" / f"{subject}.nii.gz"


def crop(image: sitk.Image, start: tuple[int, int, int], size: tuple[int, int, int]) -> sitk.Image:
    """A real sub-volume (index start/size in i, j, k) keeping physical placement."""
    return sitk.RegionOfInterest(image, [int(s) for s in size], [int(s) for s in start])


@pytest.fixture(scope="session")
def ixi_crop(ixi_dir, ixi_ids):
    """A small real crop (48 x 48 x 40 voxels, 2 mm) of the first IXI subject: (image, label)."""
    img_p, lab_p = ixi_paths(ixi_dir, ixi_ids[0])
    img = sitk.ReadImage(str(img_p), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(lab_p))
    start, size = (36, 36, 25), (48, 48, 40)
    return crop(img, start, size), crop(lab, start, size)


def make_oblique(image: sitk.Image, spacing=(1.3, 0.9, 2.1), angles=(0.3, -0.2, 0.5)) -> sitk.Image:
    """The same voxels with an anisotropic spacing and an oblique direction (a real but re-gridded image)."""
    out = sitk.Image(image)
    r = sitk.Euler3DTransform()
    r.SetRotation(*angles)
    out.SetSpacing(spacing)
    out.SetDirection(np.asarray(r.GetMatrix()).ravel().tolist())
    out.SetOrigin((12.5, -30.25, 7.0))
    return out
