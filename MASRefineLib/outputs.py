"""Where MASRefine may write: the one check of output folders and output files.

Every command that writes a folder (``segment``, ``register``, ``refine``, ``fuse``, and the background
worker's ``output_dir``) calls :func:`prepare_output_dir` before it writes anything; ``evaluate --json``
calls :func:`check_output_file`; options naming a folder that is not one run's output folder (``atlas init
OUT``, ``train votenet --cache``, the resumable ``experiment --out``) call :func:`check_folder_path` (rule 1). The rules, so that nothing the user
gave is ever overwritten:

1. the path is not empty and, if it exists, is a folder (an output file: not a folder);
2. an existing, non-empty folder must have been prepared by the same MASRefine command before: the
   folder holds :data:`MARKER` (written when the folder is first prepared) naming that command (a folder
   written before the marker existed is refused like any other);
3. the folder is not, does not contain and does not lie inside an input folder (the atlas set and the
   folders of its images and label maps, a ``--registered`` folder, ...), and contains no input file;
   an output file is none of the inputs.

Errors are :class:`MASRefineError` with one line naming the path, the problem and the option to change.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Union

from .errors import MASRefineError
from .jsonio import read_json, write_json

#: the marker file of an output folder: JSON ``{"masrefine_output": 1, "command": "segment"}``
MARKER = ".masrefine-output"

PathLike = Union[str, os.PathLike]
#: an input of a command: ``(what it is, path)``, e.g. ``("--atlases folder", "/data/set")``; folders and
#: files are told apart on disk (a path that does not exist is taken as a file)
Input = tuple[str, PathLike]

def check_folder_path(path: PathLike | None, option: str = "--out") -> Path:
    """``path`` as an absolute Path after rule 1 (not empty; an existing path, and every existing folder
    above it, is a folder). Nothing is created."""
    if path is None or not str(path).strip():
        raise MASRefineError(f"{option}: empty path; give a folder")
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if p.exists() and not p.is_dir():
        raise MASRefineError(f"{p}: exists and is not a folder; choose another {option}")
    for parent in p.parents:  # mkdir would fail with NotADirectoryError on the first file above it
        if parent.exists():
            if not parent.is_dir():
                raise MASRefineError(f"{p}: {parent} is a file, not a folder; choose another {option}")
            break
    return p


def prepare_output_dir(out: PathLike | None, *, inputs: Iterable[Input] = (), command: str = "segment",
                       option: str = "--out") -> Path:
    """Check ``out`` against the rules of this module, create it and mark it as ``command``'s output
    folder; returns it (absolute). Reruns of ``command`` into its own folder pass; outputs already there
    are the caller's to replace."""
    p = check_folder_path(out, option)
    _check_inputs(p, inputs, option)
    if p.is_dir() and any(e != MARKER for e in os.listdir(p)):  # an empty folder (or only a marker) is new
        owner = _marked_command(p)
        if owner is None:
            raise MASRefineError(f"{p}: not empty and not a MASRefine output folder; choose another {option}")
        if owner != command:
            raise MASRefineError(f"{p}: output folder of 'masrefine {owner}', not of '{command}'; choose another {option}")
        remove_stale_temporaries(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        if _marked_command(p) != command:
            write_json({"masrefine_output": 1, "command": command}, p / MARKER, indent=None)
    except OSError as e:
        raise MASRefineError(f"{p}: cannot create the output folder ({e.strerror or e})") from None
    return p


#: the temporary files of :func:`MASRefineLib.imageio.atomic_path` (``.<name>.<8 random>.tmp<suffix>``) and of
#: writers before it (``.qa.csv.tmp``, ``.qa.tmp.png``): what a killed run leaves behind
_TEMPORARY = re.compile(r"\.[^/\\]+\.tmp(\.[A-Za-z0-9]+){0,2}")

#: a temporary file is stale (left by a killed run) only when it was last modified this many seconds ago: a run
#: still writing into the same folder is writing into its temporary files (and renames each once complete), so a
#: rerun started meanwhile leaves them alone
STALE_TEMPORARY_AGE_S = 600.0


def remove_stale_temporaries(folder: Path, min_age_s: float = STALE_TEMPORARY_AGE_S) -> list[Path]:
    """Delete the temporary files a killed earlier run left in its own output ``folder`` (and its sub-folders;
    links are not followed) that were last modified at least ``min_age_s`` seconds ago (:data:`STALE_TEMPORARY_AGE_S`,
    10 minutes: younger ones may belong to a run still writing there): called on a rerun into a folder this
    command wrote, so they do not pile up. Returns what was removed."""
    import time
    removed = []
    now = time.time()
    for root, dirs, files in os.walk(folder):
        for name in files:
            f = Path(root) / name
            if _TEMPORARY.fullmatch(name) and f.is_file() and not f.is_symlink():
                try:
                    if now - f.stat().st_mtime < min_age_s:
                        continue  # recent: perhaps another run's file being written now
                    f.unlink()
                    removed.append(f)
                except OSError:
                    pass  # not ours to insist on; a later rerun tries again
    return removed


def require_writable_folder(folder: PathLike, what: str) -> Path:
    """``folder`` (created when missing) if a file can be written in it, else one line naming it: checked before
    long work whose result goes there (a model trained into a read-only atlas set would fail at its end).
    Probes with a temporary file that is removed at once; nothing else is touched."""
    import tempfile
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p, prefix=".masrefine-write-test"):
            pass
    except OSError as e:
        raise MASRefineError(f"{p}: cannot store {what} here ({e.strerror or type(e).__name__}); make the folder "
                             "writable or copy the atlas set somewhere writable") from None
    return p


def inside(folder: PathLike, name: str) -> Path:
    """``folder/name`` after checking that it stays in ``folder``: ``name`` is a plain file name (no separator,
    not ``.``/``..``, not absolute, no NUL), so an output named after an atlas id or a label can never be written
    elsewhere. Every output path built from a name read from an input goes through here before it is written."""
    bad = (not isinstance(name, str) or not name or name in (".", "..") or "\0" in name
           or any(sep in name for sep in ("/", "\\", os.sep)) or os.path.isabs(name))
    if bad:
        raise MASRefineError(f"{Path(folder) / str(name)}: output name {name!r} is not a plain file name inside "
                             f"{folder}; nothing written")
    return Path(folder) / name


def check_output_file(path: PathLike | None, *, inputs: Iterable[Input] = (), option: str = "--json") -> Path:
    """``path`` as an absolute Path if it may be written: not empty, not a folder, and none of ``inputs``
    (compared after resolving links, and as the same file on disk). Nothing is written."""
    if path is None or not str(path).strip():
        raise MASRefineError(f"{option}: empty path; give a file name")
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if p.is_dir():
        raise MASRefineError(f"{p}: is a folder; {option} needs a file name")
    for what, inp in inputs:
        if inp is None or not str(inp):
            continue
        if _same(p, Path(inp)):
            raise MASRefineError(f"{p}: is the {what}; {option} would overwrite it, choose another file")
    return p


def atlas_set_inputs(atlas_dir: PathLike, option: str = "--atlases", *, unreadable_ok: bool = False) -> list[Input]:
    """The inputs of a run on an atlas set: its folder and the folders of its images and label maps
    (they may lie elsewhere: atlas.json references files where they are). Reads atlas.json only; one that
    cannot be loaded raises its :class:`MASRefineError`, or with ``unreadable_ok`` leaves just the folder
    (for a caller whose run reports the broken set itself, e.g. the worker)."""
    from .atlas import AtlasSet

    try:
        aset = AtlasSet.load(atlas_dir)
    except MASRefineError:
        if not unreadable_ok:
            raise
        return [(f"{option} atlas set", Path(atlas_dir))]
    found: list[Input] = [(f"{option} atlas set", aset.root)]
    for aid in aset.ids:
        found += [("folder of atlas images", aset.image_path(aid).parent),
                  ("folder of atlas label maps", aset.label_path(aid).parent)]
    return _unique(found)


def warped_set_inputs(registered: PathLike, warped, option: str = "--registered") -> list[Input]:
    """The inputs of a run on a registered folder (a :class:`MASRefineLib.warped.WarpedSet` loaded from
    it): the folder, the folders of the original atlas files it records and its atlas set, if recorded."""
    found: list[Input] = [(f"{option} folder", registered)]
    for a in warped.atlases:
        for what, src in (("folder of atlas images", a.source_image), ("folder of atlas label maps", a.source_label)):
            if src:
                found.append((what, Path(src).parent))
    for key in ("atlas_set", "atlases", "atlas_dir"):
        v = warped.info.get(key)
        if isinstance(v, str) and v:
            found.append(("atlas set", v))
    return _unique(found)


# ------------------------------------------------------------------------------------------------ helpers
def _forms(p: Path) -> set[Path]:
    """The path as given (absolute) and with links resolved: a folder reached through a link is the same."""
    a = Path(os.path.abspath(p))
    return {a, Path(os.path.realpath(a))}


def _same(a: Path, b: Path) -> bool:
    """One file or folder: the same path (as given or with links resolved) or the same object on disk (hard links,
    bind mounts, a case-insensitive file system); a path that does not exist is only its own path."""
    try:
        return bool(_forms(a) & _forms(b)) or os.path.samefile(a, b)
    except OSError:
        return False


def _check_inputs(out: Path, inputs: Iterable[Input], option: str) -> None:
    outs = _forms(out)
    for what, inp in inputs:
        if inp is None or not str(inp):
            continue
        ip = Path(inp)
        for o in outs:
            for i in _forms(ip):
                if o == i:
                    raise MASRefineError(f"{out}: is the {what}; choose another {option}")
                if i in o.parents and ip.is_dir():
                    raise MASRefineError(f"{out}: lies inside the {what} {ip}; choose another {option}")
                if o in i.parents:
                    raise MASRefineError(f"{out}: contains the {what} {ip}; choose another {option}")
        _check_identity(out, ip, what, option)


def _existing_chain(p: Path) -> list[Path]:
    """``p`` (absolute) and its parents, those that exist, nearest first."""
    a = Path(os.path.abspath(p))
    return [q for q in (a, *a.parents) if q.exists()]


def _check_identity(out: Path, ip: Path, what: str, option: str) -> None:
    """The checks of :func:`_check_inputs` by file identity (device and inode, ``os.path.samefile``) instead of
    path strings: on a case-insensitive file system (macOS, Windows) ``/Data/Atlas/x`` lies inside ``/data/atlas``,
    and a bind mount reaches one folder by two paths. Compared on the nearest existing ancestor of ``out``."""
    if not ip.exists():
        return
    outs = _existing_chain(out)
    o_abs = Path(os.path.abspath(out))
    for q in outs:
        if _same(q, ip):
            if q == o_abs:
                raise MASRefineError(f"{out}: is the {what}; choose another {option}")
            if ip.is_dir():
                raise MASRefineError(f"{out}: lies inside the {what} {ip}; choose another {option}")
    if outs and outs[0] == o_abs and o_abs.is_dir():
        for q in _existing_chain(ip)[1:]:
            if _same(q, o_abs):
                raise MASRefineError(f"{out}: contains the {what} {ip}; choose another {option}")


def _marked_command(folder: Path) -> str | None:
    """The command named by the folder's marker (None: no readable marker)."""
    try:
        doc = read_json(folder / MARKER, "output folder marker")
    except MASRefineError:  # missing, unreadable, not UTF-8, not JSON, nested too deeply: no marker
        return None
    return doc.get("command") if isinstance(doc, dict) and isinstance(doc.get("command"), str) else None


def _unique(items: list[Input]) -> list[Input]:
    seen: set[str] = set()
    out: list[Input] = []
    for what, p in items:
        key = os.path.abspath(str(p))
        if key not in seen:
            seen.add(key)
            out.append((what, p))
    return out
