"""The one image I/O path of the project (SimpleITK): read with validation, write atomically,
resample onto another grid, normalise intensities.

Every read keeps origin, spacing and direction exactly as in the file (LPS mm). Errors are
:class:`MASRefineError` with one line naming the file and the problem.
"""
from __future__ import annotations

import os
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import numpy as np
import SimpleITK as sitk

from .errors import MASRefineError
from . import validate
from .geometry import Grid

# atomic writes and image file names live in the standard-library protocol package (the Slicer process imports it)
from .protocol.atomic import atomic_path, atomic_write_bytes, atomic_write_text  # noqa: F401
from .protocol.files import IMAGE_SUFFIXES, image_stem, is_image_file  # noqa: F401


def require_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is an existing file; otherwise a one-line error naming it."""
    path = Path(path)
    if not path.exists():
        raise MASRefineError(f"{path}: file not found")
    if not path.is_file():
        raise MASRefineError(f"{path}: not a file")
    return path


#: voxels along each axis an image needs: a thinner slab (e.g. 64 x 64 x 3) is not a volume this product can
#: register (its refinement pyramid needs at least 4 voxels per axis on a level 2x coarser than the image)
MIN_AXIS_VOXELS = 8


def _itk_error(path: Path, e: RuntimeError) -> MASRefineError:
    first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else "unreadable"
    return MASRefineError(f"{path}: cannot be read as an image ({first})")


def _header(path: Path) -> sitk.ImageFileReader:
    """ITK's reader of ``path`` with its header read (no voxels): dimension, size, geometry, pixel type."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        validate.check_image_file(path)  # a missing data file or cut header, said plainly, before ITK's words
        raise _itk_error(path, e) from None
    return r


def _header_grid(path: Path, r: sitk.ImageFileReader) -> Grid:
    """The validated grid of a 3D header (:func:`validate.check_grid`): refused before any voxel is read."""
    if r.GetDimension() != 3:
        raise MASRefineError(f"{path}: expected a 3D image, got {r.GetDimension()}D")
    grid = Grid.from_image(r)  # the reader has an image's geometry getters
    validate.check_grid(path, grid)
    return grid


def _read(path: str | os.PathLike, pixel_id: int) -> sitk.Image:
    """The one reader of images and label maps: the header's dimension and geometry, then the file's voxel
    bytes (:mod:`MASRefineLib.validate`), then the voxels as ``pixel_id``."""
    path = require_file(path)
    r = _header(path)
    _header_grid(path, r)  # an absurd size is refused before its bytes are counted or allocated
    validate.check_image_file(path)
    if r.GetNumberOfComponents() != 1:
        raise MASRefineError(f"{path}: expected a scalar image, got {r.GetNumberOfComponents()} components per voxel")
    if min(r.GetSize()) < 2:
        raise MASRefineError(f"{path}: expected a 3D volume, got size {r.GetSize()}")
    try:
        img = r.Execute()
    except RuntimeError as e:
        raise _itk_error(path, e) from None
    return sitk.Cast(img, pixel_id) if img.GetPixelID() != pixel_id else img


def read_grid(path: str | os.PathLike) -> Grid:
    """The grid of a 3D image file from its header only (no voxels read), validated like every read image
    (:func:`validate.check_grid`); errors name the file."""
    path = require_file(path)
    return _header_grid(path, _header(path))


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D intensity image as float32, rejecting non-3D, multi-component, NaN/inf and constant images."""
    img = _read(path, sitk.sitkFloat32)
    if min(img.GetSize()) < MIN_AXIS_VOXELS:  # what registration needs; label maps follow their image's grid
        raise MASRefineError(f"{path}: expected a 3D volume of at least {MIN_AXIS_VOXELS} voxels along each axis, "
                             f"got size {img.GetSize()}")
    arr = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(arr).all():
        raise MASRefineError(f"{path}: image contains NaN or infinite values")
    if float(arr.max()) == float(arr.min()):
        raise MASRefineError(f"{path}: image is constant (empty)")
    return img


def read_label(path: str | os.PathLike, allow_empty: bool = False) -> sitk.Image:
    """Read a 3D label map; values must be non-negative integers (kept exactly, stored as uint16).

    An all-background map is an error (an atlas without labels is useless) unless ``allow_empty``
    (e.g. a prediction being evaluated, where it simply scores 0)."""
    raw = _read(path, sitk.sitkFloat64)
    arr = sitk.GetArrayViewFromImage(raw)
    if not np.isfinite(arr).all():
        raise MASRefineError(f"{path}: label map contains NaN or infinite values")
    if (arr < 0).any() or (arr != np.round(arr)).any():
        raise MASRefineError(f"{path}: label map must hold non-negative integer values")
    if arr.max() > validate.LIMITS.max_label_value:
        raise MASRefineError(f"{path}: label value {int(arr.max())} exceeds {validate.LIMITS.max_label_value}")
    validate.check_label_values(path, np.flatnonzero(np.bincount(arr.astype(np.uint16).ravel())))
    if not allow_empty and not (arr > 0).any():
        raise MASRefineError(f"{path}: label map is empty (no voxel is labelled)")
    return sitk.Cast(raw, sitk.sitkUInt16)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` atomically (see :func:`atomic_path`). ``compress``: gzip (where the format has it).

    Float32 volumes (warped images, displacement fields, Jacobian maps) are written raw, ``.nrrd`` with
    ``compress=False``: gzip saves only 9-16 % of their size (the low mantissa bits are noise) for 0.7-2 CPU s
    per file on a knee grid (160 x 200 x 200), ~40 CPU s per 10-atlas pipeline run (docs/pipeline.md).
    Label maps, weights and posteriors (mostly constant) compress well and stay gzipped."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, compress)
    return Path(path)


T = TypeVar("T")


def run_writers(writers: Sequence[Callable[[], T]], workers: int = 1) -> list[T]:
    """Call each writer (a function writing one or more files) on ``workers`` threads; results in order.

    Threads pay off because SimpleITK's writers (gzip included) release the GIL: with two threads the
    knee pipeline's output stage takes about half the wall clock. The first exception is re-raised
    after every started writer has finished, so no temporary file is left behind.
    """
    if workers <= 1 or len(writers) <= 1:
        return [w() for w in writers]
    with ThreadPoolExecutor(max_workers=min(workers, len(writers)), thread_name_prefix="masrefine-write") as pool:
        futures = [pool.submit(w) for w in writers]
        return [f.result() for f in futures]


def write_figure(fig, path: str | os.PathLike, dpi: int) -> Path:
    """A matplotlib figure as a PNG (tight layout), atomically; the figure is closed, written or not."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def resample_image(image: sitk.Image, grid: Grid, transform: sitk.Transform | None = None,
                   default: float = 0.0) -> sitk.Image:
    """Resample an intensity image onto ``grid`` (linear interpolation, physical space)."""
    return sitk.Resample(image, grid.reference_image(), transform or sitk.Transform(), sitk.sitkLinear,
                         default, sitk.sitkFloat32)


def resample_label(label: sitk.Image, grid: Grid, transform: sitk.Transform | None = None) -> sitk.Image:
    """Resample a label map onto ``grid`` by nearest neighbour (values are never mixed or invented)."""
    return sitk.Resample(label, grid.reference_image(), transform or sitk.Transform(), sitk.sitkNearestNeighbor,
                         0, label.GetPixelID())


def normalize_intensity(array: np.ndarray, lower_percentile: float = 0.5, upper_percentile: float = 99.5,
                        mask: np.ndarray | None = None) -> np.ndarray:
    """Clip to the given percentiles (of the voxels in ``mask``, or all) and scale to [0, 1] (float32).

    The paper normalises intensities to [0, 1]; percentile clipping makes that robust to a few bright voxels.
    """
    a = np.asarray(array, dtype=np.float32)
    vals = a[mask] if mask is not None else a
    lo, hi = np.percentile(vals, [lower_percentile, upper_percentile])
    if hi <= lo:
        hi = float(vals.max())
        lo = float(vals.min())
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def array_to_image(array: np.ndarray, grid: Grid) -> sitk.Image:
    """A (z, y, x) array as an image on ``grid``."""
    array = np.asarray(array)
    if array.shape != grid.shape:
        raise ValueError(f"array shape {array.shape} does not match grid shape {grid.shape}")
    return grid.apply_to(sitk.GetImageFromArray(array))
