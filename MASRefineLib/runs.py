"""Run folders of a front end (the Slicer module): made, measured, and removed only when they are ours.

Each run of the Slicer module gets a folder (the exported target, ``job.json``, the worker's ``output/``: about
150 MB per atlas on a knee), by default under Slicer's temporary folder. :func:`make_run_folder` makes it with a
marker file (:data:`RUN_MARKER`); :func:`prune` and :func:`remove_run` remove marked folders only, so a folder the
user made, or any other file in the same place, is never touched. The retention choices (:data:`RETENTION`):

- ``keep``: every run stays where it was written (choose the output folder to keep them somewhere lasting);
- ``delete-on-close``: the run's folder is removed when the scene is closed or the application quits;
- ``keep-last``: starting a run removes the oldest marked run folders beside it, keeping the newest N.
"""
from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path
from typing import Iterable

from .errors import MASRefineError

RUN_MARKER = ".masrefine-run"
#: retention choices of run folders (the Slicer module's "Keep runs" values)
RETENTION = ("keep", "delete-on-close", "keep-last")


def make_run_folder(base: str | os.PathLike, name: str) -> Path:
    """A new folder ``base/<YYYYmmdd-HHMMSS>-<name>[-N]`` with the run marker; ``base`` is made if missing.

    ``name`` is reduced to letters, digits, ``-`` and ``_`` (at most 40 characters). Raises
    :class:`MASRefineError` (one line naming the folder) when ``base`` is a file or cannot be written."""
    base = Path(base)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))[:40] or "run"
    if base.exists() and not base.is_dir():
        raise MASRefineError(f"{base}: not a folder (runs are written into a folder)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        folder = base / (f"{stamp}-{safe}" if n == 1 else f"{stamp}-{safe}-{n}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as e:
            raise MASRefineError(f"{base}: cannot make a run folder there ({e.strerror or e})") from None
        from .jsonio import write_json
        write_json({"created": time.time()}, folder / RUN_MARKER)  # atomic: a marker is whole or absent
        return folder
    raise MASRefineError(f"{base}: too many runs named {stamp}-{safe}")


def is_run_folder(path: str | os.PathLike) -> bool:
    """A folder made by :func:`make_run_folder` (a real folder, not a link, holding the marker)."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / RUN_MARKER).is_file()


def _created(folder: Path) -> float:
    from .jsonio import read_json
    try:
        return float(read_json(folder / RUN_MARKER, "run marker")["created"])
    except (MASRefineError, ValueError, KeyError, TypeError):  # a damaged marker: its file's time will do
        return (folder / RUN_MARKER).stat().st_mtime


def list_runs(base: str | os.PathLike) -> list[Path]:
    """The run folders directly under ``base``, oldest first (by creation time, then name)."""
    base = Path(base)
    if not base.is_dir():
        return []
    runs = [p for p in base.iterdir() if is_run_folder(p)]
    return sorted(runs, key=lambda p: (_created(p), p.name))


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (links are not followed; unreadable entries count 0)."""
    total = 0
    for root, dirs, files in os.walk(path, onerror=lambda e: None):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def format_size(n: int) -> str:
    """``n`` bytes as B, kB, MB, GB or TB (powers of 1000, one decimal above kB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if unit != "kB" else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def describe(base: str | os.PathLike) -> str:
    """One line: how many run folders ``base`` holds and their size, e.g. ``3 runs, 451.2 MB in /tmp/MASRefine``."""
    runs = list_runs(base)
    size = sum(folder_size(r) for r in runs)
    return f"{len(runs)} run{'' if len(runs) == 1 else 's'}, {format_size(size)} in {base}"


def remove_run(path: str | os.PathLike) -> None:
    """Remove one run folder. Refuses (one line) anything :func:`make_run_folder` did not make."""
    p = Path(path)
    if not p.exists():
        return
    if not is_run_folder(p):
        raise MASRefineError(f"{p}: not a MASRefine run folder (no {RUN_MARKER}); not removed")
    try:
        shutil.rmtree(p)
    except OSError as e:
        raise MASRefineError(f"{p}: could not be removed ({e.strerror or e})") from None


def prune(base: str | os.PathLike, keep_last: int, exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Remove the oldest run folders under ``base`` so that the newest ``keep_last`` remain; folders in
    ``exclude`` (running jobs, the run just started) are never removed, whatever their age.
    Returns the removed folders; one that cannot be removed is left and skipped."""
    if int(keep_last) < 1:
        raise MASRefineError(f"keep the last {keep_last} runs: the number must be at least 1")
    excluded = {os.path.normcase(os.path.abspath(e)) for e in exclude}
    runs = list_runs(base)
    keep = set(str(r) for r in runs[-int(keep_last):])
    removed = []
    for r in runs:
        if str(r) in keep or os.path.normcase(os.path.abspath(r)) in excluded:
            continue
        try:
            remove_run(r)
        except MASRefineError:
            continue
        removed.append(r)
    return removed
