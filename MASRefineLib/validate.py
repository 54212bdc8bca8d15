"""The one validation layer for what MASRefine reads: image files before ITK trusts them, image geometry, label
values and names that become file names. Every check raises :class:`MASRefineError` with one line naming the file
and the problem (the value named); the limits below are stated in docs/architecture.md ("Inputs").

Image files are checked in two steps by :func:`MASRefineLib.imageio._read` (the one reader):

1. :func:`check_image_file`, before ITK reads the voxels: a file (or the detached data file of a ``.nhdr`` /
   ``.mhd``) holding fewer voxel bytes than its header promises is refused (ITK's NIfTI reader zero-fills the
   missing part and says nothing, its MetaImage reader says "No such file or directory"); compressed data
   (``.nii.gz``, gzip NRRD, compressed MetaImage) is decompressed once, 16 MB at a time, to count its bytes;
   NaN/inf in floating-point NIfTI voxels are refused here, because ITK's NIfTI reader turns them into 0.
2. :func:`check_grid`, on the header's geometry before the voxels are read (so an absurd size is refused before
   memory is allocated): sizes, spacing, origin and direction within :data:`LIMITS`, and a direction matrix
   that is orthonormal: NIfTI (our label outputs) can only hold a rotation, so a sheared grid would be
   written somewhere else than it was read (tens of mm off), and a degenerate one has no inverse.
"""
from __future__ import annotations

import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .errors import MASRefineError
from .geometry import Grid


@dataclass(frozen=True)
class Limits:
    """What a medical image read by MASRefine may be (values outside are refused, named, before any work)."""
    min_spacing_mm: float = 0.01        # below: not a scanner's voxel (a 0 or 1e-6 typo runs for minutes)
    max_spacing_mm: float = 50.0        # above: not a 3D medical image (mm taken for m or cm)
    max_axis_voxels: int = 4096         # per axis
    max_voxels: int = 2 ** 30           # per image (4 GiB as float32; the registration pyramid needs several copies)
    max_abs_origin_mm: float = 1e5      # 100 m from the scanner's origin: a unit or sign error
    orthonormal_tolerance: float = 1e-3  # max |DᵀD - I| (float32 NIfTI quaternions round to ~1e-7)
    max_label_value: int = 65535        # labels are kept as uint16 end to end
    max_labels: int = 1000              # distinct non-zero values per label map (brain parcellations: ~150)


LIMITS = Limits()

#: atlas ids become file names (``atlases/<id>_image.nrrd``): a name, never a path
ATLAS_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_CHUNK = 1 << 24  # bytes of decompressed data held at a time


# ------------------------------------------------------------------------------------------------ names
def atlas_id_problem(value: object) -> Optional[str]:
    """Why ``value`` is not a valid atlas id (None: it is one). Ids are names that become file names: 1-128
    characters of letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit (so no ``/``, ``\\``,
    ``..``, leading dot or absolute path can take an output out of its folder)."""
    if not isinstance(value, str) or not value:
        return "atlas id must be a non-empty string"
    if not ATLAS_ID_PATTERN.fullmatch(value) or ".." in value:
        return (f"atlas id {value!r} is not a plain name (1-128 letters, digits, '.', '_', '-', starting with a "
                "letter or digit; no path)")
    return None


def duplicate_id_problem(new: str, taken: Iterable[str]) -> Optional[str]:
    """Why ``new`` cannot join the ids ``taken`` (None: it can): it equals one or differs only by case
    (``casefold``): ids become file names, and ``A1`` and ``a1`` name the same file on macOS and Windows."""
    same = next((t for t in taken if t.casefold() == new.casefold()), None)
    if same is None:
        return None
    how = "" if same == new else f" (same as {same!r} on a case-insensitive file system)"
    return f"duplicate atlas id {new!r}{how}"


# ------------------------------------------------------------------------------------------------ geometry
def check_grid(path: str | os.PathLike, grid: Grid) -> None:
    """Refuse geometry outside :data:`LIMITS` or a direction matrix that is not orthonormal (see module doc)."""
    lim = LIMITS
    size, sp, org = grid.size, grid.spacing, grid.origin
    if any(int(s) < 1 for s in size) or any(int(s) > lim.max_axis_voxels for s in size):
        raise MASRefineError(f"{path}: size {'x'.join(map(str, size))} is outside 1..{lim.max_axis_voxels} voxels "
                             "per axis")
    if math.prod(int(s) for s in size) > lim.max_voxels:
        raise MASRefineError(f"{path}: size {'x'.join(map(str, size))} ({math.prod(size):,} voxels) exceeds "
                             f"{lim.max_voxels:,} voxels")
    for axis, v in zip("ijk", sp):
        if not (math.isfinite(v) and lim.min_spacing_mm <= v <= lim.max_spacing_mm):
            raise MASRefineError(f"{path}: spacing {v:g} mm along {axis} is outside {lim.min_spacing_mm:g}.."
                                 f"{lim.max_spacing_mm:g} mm (not a medical image's voxel size)")
    for axis, v in zip("xyz", org):
        if not (math.isfinite(v) and abs(v) <= lim.max_abs_origin_mm):
            raise MASRefineError(f"{path}: origin {axis} = {v:g} mm is outside ±{lim.max_abs_origin_mm:g} mm")
    d = np.asarray(grid.direction, dtype=np.float64)
    if d.size != 9 or not np.isfinite(d).all():
        raise MASRefineError(f"{path}: direction matrix has missing or non-finite entries")
    d = d.reshape(3, 3)
    norms = np.linalg.norm(d, axis=0)
    if (norms < 1e-6).any():
        raise MASRefineError(f"{path}: direction matrix is degenerate (axis {'ijk'[int(np.argmin(norms))]} has no "
                             "direction)")
    dev = float(np.abs(d.T @ d - np.eye(3)).max())
    if dev > lim.orthonormal_tolerance:
        u = d / norms
        cos = u.T @ u
        i, j = max(((0, 1), (0, 2), (1, 2)), key=lambda ij: abs(cos[ij]))
        angle = math.degrees(math.acos(max(-1.0, min(1.0, float(cos[i, j])))))
        if abs(np.linalg.det(u)) < 1e-6:
            raise MASRefineError(f"{path}: direction matrix is degenerate (axes {'ijk'[i]} and {'ijk'[j]} are "
                                 "parallel)")
        raise MASRefineError(f"{path}: direction matrix is not orthonormal (axes {'ijk'[i]} and {'ijk'[j]} at "
                             f"{angle:.1f}° instead of 90°, or not unit length: sheared geometry, which NIfTI "
                             "outputs cannot hold); resample the image onto an orthogonal grid first")


def check_label_values(path: str | os.PathLike, values: np.ndarray) -> None:
    """Refuse a label map with more distinct non-zero values than :data:`LIMITS` allows (``values``: the
    distinct values present)."""
    n = int((np.asarray(values) > 0).sum())
    if n > LIMITS.max_labels:
        raise MASRefineError(f"{path}: {n} distinct label values exceed {LIMITS.max_labels} (is this an intensity "
                             "image rather than a label map?)")


# ------------------------------------------------------------------------------------------------ files
#: NIfTI datatype code -> numpy float type whose NaN/inf ITK hides (integer types cannot hold them)
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_NRRD_TYPES = {**{k: 1 for k in ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t")},
               **{k: 2 for k in ("short", "short int", "signed short", "signed short int", "int16", "int16_t",
                                 "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t")},
               **{k: 4 for k in ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
                                 "uint32_t", "float")},
               **{k: 8 for k in ("longlong", "long long", "long long int", "signed long long",
                                 "signed long long int", "int64", "int64_t", "ulonglong", "unsigned long long",
                                 "unsigned long long int", "uint64", "uint64_t", "double")}}
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def check_image_file(path: str | os.PathLike) -> None:
    """Refuse an image file whose voxel data is shorter than its header promises, compressed data that is
    corrupt or ends early, and NaN/inf in floating-point NIfTI voxels (see the module doc). Formats and
    encodings not parsed here (ASCII NRRD, file lists) are left to ITK, which reports their errors."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    elif name.endswith(".gz"):
        for _ in _chunks(path, 0, _gzip_magic(path)):  # a gzip file ITK reads: whole, not truncated
            pass


def _gzip_magic(path: Path, offset: int = 0) -> bool:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(2) == b"\x1f\x8b"


def _chunks(path: Path, offset: int, compressed: bool, what: str = "gzip") -> Iterator[bytes]:
    """The bytes of ``path`` from ``offset``, decompressed (gzip or zlib, every member) when ``compressed``,
    at most 16 MB at a time; a corrupt or truncated stream is a one-line error naming ``path``."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        if not compressed:
            yield from iter(lambda: fh.read(_CHUNK), b"")
            return
        d, fed = zlib.decompressobj(32 + zlib.MAX_WBITS), False  # 32: gzip or zlib header, detected
        try:
            for block in iter(lambda: fh.read(1 << 20), b""):
                data = block
                while data:
                    fed = True
                    out = d.decompress(data, _CHUNK)
                    if out:
                        yield out
                    data = d.unconsumed_tail
                    if d.eof:  # a member ends; another may follow (multi-member gzip)
                        data = d.unused_data + data
                        d, fed = zlib.decompressobj(32 + zlib.MAX_WBITS), False
        except zlib.error as e:
            raise MASRefineError(f"{path}: corrupt {what} data ({e})") from None
    if fed and not d.eof:
        raise MASRefineError(f"{path}: truncated file (the {what} stream ends early)")


def _short_of(path: Path, have: int, need: int, data_of: Optional[Path] = None) -> MASRefineError:
    whose = f" (the data file of {data_of})" if data_of else ""
    return MASRefineError(f"{path}: truncated file{whose}: {have:,} bytes of voxel data, its header promises "
                          f"{need:,}")


def _check_nifti(path: Path) -> None:
    compressed = _gzip_magic(path)
    stream = _chunks(path, 0, compressed)
    head = b""
    for chunk in stream:  # the header (348 or 540 bytes) may straddle chunks only in theory
        head += chunk
        if len(head) >= 544:
            break
    info = _nifti_header(head)
    if info is None:  # not a NIfTI-1/2 single file: ITK says what it is
        for _ in stream:
            pass
        return
    offset, nbytes, dtype = info
    scan = _Scan(offset, nbytes, dtype)
    scan.feed(head)
    for chunk in stream:
        scan.feed(chunk)
    if scan.seen < offset + nbytes:
        raise _short_of(path, max(0, scan.seen - offset), nbytes)
    if scan.bad is not None:
        raise MASRefineError(f"{path}: contains NaN or infinite values (voxel {scan.bad:,} of the file)")


def _nifti_header(head: bytes) -> Optional[tuple[int, int, Optional[str]]]:
    """(voxel offset, voxel bytes, numpy float type to scan or None) from a NIfTI-1/2 single-file header."""
    if len(head) < 348:
        return None
    for end in "<>":
        n = int(np.frombuffer(head[:4], f"{end}i4")[0])
        if n == 348 and head[344:347] == b"n+1":
            dims = np.frombuffer(head[40:56], f"{end}i2").astype(np.int64)
            dtype, bitpix = (int(v) for v in np.frombuffer(head[70:74], f"{end}i2"))
            offset = int(np.frombuffer(head[108:112], f"{end}f4")[0])
            break
        if n == 540 and len(head) >= 540 and head[4:7] == b"n+2":
            dtype, bitpix = (int(v) for v in np.frombuffer(head[12:16], f"{end}i2"))
            dims = np.frombuffer(head[16:80], f"{end}i8").astype(np.int64)
            offset = int(np.frombuffer(head[168:176], f"{end}i8")[0])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8 or (dims[1:ndim + 1] < 1).any() or offset < 0:
        return None  # nonsense header fields: ITK's error names them
    nbytes = int(np.prod(dims[1:ndim + 1], dtype=object)) * (bitpix // 8)
    ft = _NIFTI_FLOATS.get(dtype)
    return offset, nbytes, (end + ft) if ft else None


class _Scan:
    """Counts the bytes of a stream and finds the first non-finite value of the voxel region
    ``[offset, offset + nbytes)`` when ``dtype`` is a float type."""

    def __init__(self, offset: int, nbytes: int, dtype: Optional[str]):
        self.offset, self.end, self.dtype = offset, offset + nbytes, dtype
        self.item = np.dtype(dtype).itemsize if dtype else 1
        self.seen = 0
        self.carry = b""
        self.bad: Optional[int] = None

    def feed(self, chunk: bytes) -> None:
        start, self.seen = self.seen, self.seen + len(chunk)
        if self.dtype is None or self.bad is not None:
            return
        lo, hi = max(start, self.offset), min(self.seen, self.end)
        if hi <= lo:
            return
        base = lo - self.offset - len(self.carry)  # voxel-region offset of data[0] (whole values)
        data = self.carry + chunk[lo - start:hi - start]
        n = len(data) // self.item * self.item
        self.carry = data[n:]
        finite = np.isfinite(np.frombuffer(data[:n], self.dtype))
        if not finite.all():
            self.bad = int(base // self.item + np.argmin(finite))


def _data_file(path: Path, name: str) -> Optional[Path]:
    """The detached data file ``name`` of the header ``path`` (None: a list or pattern of files, which ITK checks);
    a missing one is a one-line error naming it."""
    if name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        return None
    target = Path(name) if os.path.isabs(name) else path.parent / name
    if not target.is_file():
        raise MASRefineError(f"{target}: data file of {path} not found")
    return target


def _check_nrrd(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    end = re.search(rb"\r?\n\r?\n", head)  # the blank line after the header; none: a detached header, or cut
    head, data_at = (head, -1) if end is None else (head[:end.start()], end.end())
    if not head.startswith(b"NRRD"):
        return
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#") and not value.startswith("="):  # "key:=value" lines are metadata
            fields[key.strip().lower()] = value.strip()
    size = _NRRD_TYPES.get(fields.get("type", "").lower())
    enc = fields.get("encoding", "").lower()
    try:
        count = math.prod(int(s) for s in fields.get("sizes", "").split())
        byte_skip = int(fields.get("byte skip", "0"))
        line_skip = int(fields.get("line skip", "0"))
    except ValueError:
        return  # ITK names the bad field
    if size is None or enc not in ("raw", "gzip", "gz") or not fields.get("sizes") or line_skip:
        return
    need = count * size
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        if target := _data_file(path, data_file):
            _check_payload(target, 0 if byte_skip < 0 else byte_skip, need, enc != "raw", byte_skip < 0, path)
    else:
        if data_at < 0:
            raise MASRefineError(f"{path}: truncated file (the header has no end, no voxel data)")
        _check_payload(path, data_at + max(0, byte_skip), need, enc != "raw", byte_skip < 0)


def _check_metaimage(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    fields: dict[str, str] = {}
    data_at = -1
    pos = 0
    for raw in head.split(b"\n"):
        pos += len(raw) + 1
        key, sep, value = raw.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            data_at = pos
            break
    size = _MET_TYPES.get(fields.get("elementtype", "").upper())
    if data_at < 0 or size is None or fields.get("binarydata", "true").lower() == "false":
        return
    try:
        count = math.prod(int(s) for s in fields.get("dimsize", "").split())
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except ValueError:
        return
    need = count * channels * size
    compressed = fields.get("compresseddata", "false").lower() == "true"
    data_file = fields["elementdatafile"]
    if data_file.upper() == "LOCAL":
        _check_payload(path, min(data_at, path.stat().st_size), need, compressed)
    elif target := _data_file(path, data_file):
        _check_payload(target, max(0, header_size), need, compressed, header_size < 0, path)


def _check_payload(path: Path, offset: int, need: int, compressed: bool, at_end: bool = False,
                   data_of: Optional[Path] = None) -> None:
    """Refuse fewer than ``need`` voxel bytes in ``path`` from ``offset`` (``at_end``: the data are the file's
    last ``need`` bytes, so only the file size counts)."""
    if not compressed:
        have = path.stat().st_size - (0 if at_end else offset)
    else:
        have = sum(len(c) for c in _chunks(path, offset, True, "compressed"))
    if have < need:
        raise _short_of(path, max(0, have), need, data_of)
