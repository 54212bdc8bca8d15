"""Atomic file writes: a temporary file beside the target, renamed over it once complete (the one way every
output and JSON file of the project is written); a failed write is one :class:`MASRefineError` line."""
from __future__ import annotations

import contextlib
import csv
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import MASRefineError

_UMASK = os.umask(0)
os.umask(_UMASK)


def new_file_mode(path: str | os.PathLike) -> int:
    """Permissions for a file written atomically through a temporary file: those of the file it replaces,
    else 0o666 less the umask, as ``open()`` would give (``mkstemp`` alone leaves 0o600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success rename it to ``path``, else delete it.

    The one way outputs are written: a reader never sees a half-written file, and an existing file
    is replaced only once the new one is complete. ``suffix`` (default: the path's own, e.g.
    ``.nii.gz``) lets writers that pick a format by extension work on the temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, new_file_mode(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            # a full disk or a failed write surfaces from ITK as a many-line RuntimeError: say it in one line
            raise MASRefineError(f"{path}: could not write ({_write_reason(e, path.parent)})") from e
        raise


def _write_reason(e: BaseException, folder: Path) -> str:
    """One line on why a write failed: the free space when the disk is (nearly) full, else the error's gist."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (free is not None and free < 64 * 2 ** 20):
        return f"no space left on the device: {free / 2 ** 20:.0f} MB free" if free is not None else "no space left"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    gist = next((ln for ln in reversed(lines) if not ln.startswith(("ITK ERROR", "/"))), lines[-1] if lines else "")
    return gist or type(e).__name__


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write bytes atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def write_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike, columns: Sequence[str] | None = None,
              lineterminator: str = "\r\n") -> list[str]:
    """Write ``rows`` as a UTF-8 CSV file with a header, atomically: ``columns`` (default: every key of the rows, in
    order of first appearance; a missing value is empty, a key not in ``columns`` left out). ``lineterminator``: the
    csv module's ``\\r\\n`` unless a file has always had ``\\n``. Returns the columns."""
    rows = list(rows)
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:  # a full disk: one line
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator=lineterminator)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return columns
