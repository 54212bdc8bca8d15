"""Atlas sets: a folder with ``atlas.json`` listing atlas images, their label maps and one label table.

Layout::

    <set>/atlas.json       {"schema_version": 1,
                            "labels":  {"<value>": {"name": str, "color": [r, g, b]}, ...},
                            "atlases": [{"id": str, "image": path, "label": path}, ...]}
    <set>/models/          trained models that belong to this atlas set (:attr:`AtlasSet.models_dir`)
    <set>/terminology.json optional {"<value>": Slicer TerminologyEntry string}: the labels' standard codes, over
                           any "terminology" in "labels" (MASRefineLib.terminology; ``init`` codes known names)
    <set>/images/, labels/ only when the set was built with ``mode="copy"`` or ``"symlink"``

Paths in ``atlas.json`` are **always stored relative to the atlas-set folder**, with ``/`` separators,
also when the data lie outside it (then they start with ``../``, e.g.
``../../shared/data/ixi-dlmuse/images/IXI013-HH-1212.nii.gz``). Such a set keeps working wherever the
set and its data are moved *together* (a checkout with ``../shared`` beside it, CI, another machine).
Only when no relative path exists (another drive on Windows) is the absolute path stored. To make a set
self-contained, build it with ``mode="copy"`` (or ``"symlink"``, links with relative targets) which
puts the files in ``<set>/images`` and ``<set>/labels``. Absolute paths written by hand are accepted.
The user's data are never modified, moved or overwritten: ``init`` writes ``atlas.json`` (and, in copy
or symlink mode, new files that do not exist yet) and nothing else.

Label values are kept as they are in the label maps (never renumbered); value 0 is background.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import SimpleITK as sitk

from .errors import MASRefineError
from .geometry import Grid
from .imageio import atomic_write_text, image_stem, is_image_file, read_grid, read_image, read_label
from .jsonio import read_json
from .labels import Label, LabelTable, default_color, foreground_values
from .progress import ProgressCallback, report
from .terminology import TERMINOLOGY_JSON
from .terminology import load_file as load_terminology
from .validate import atlas_id_problem, duplicate_id_problem

SCHEMA_VERSION = 1
ATLAS_JSON = "atlas.json"
MODELS_DIR = "models"
MODES = ("reference", "symlink", "copy")


@dataclass(frozen=True)
class Atlas:
    """One atlas: ``image`` and ``label`` are paths as stored in atlas.json (relative to the set folder)."""
    id: str
    image: str
    label: str


class AtlasSet:
    """An atlas set loaded from its folder (no image is read until :meth:`read`)."""

    def __init__(self, root: str | os.PathLike, label_table: LabelTable, atlases: Sequence[Atlas]):
        self.root = Path(os.path.abspath(root))  # absolute: its paths go into reports read from other folders
        self.label_table = label_table
        self.atlases: list[Atlas] = list(atlases)
        self._by_id = {a.id: a for a in self.atlases}
        self.notes: list[str] = []  # messages from init_atlas_set (not stored)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "AtlasSet":
        """Load ``<path>/atlas.json`` (or ``path`` itself if it is the json file). Raises
        :class:`MASRefineError` (one line naming atlas.json) on a bad schema; files are not checked here
        (see :func:`inspect_atlas_set`)."""
        root, json_path = _locate(path)
        data, problems = _parse_atlas_json(json_path)
        errors = [p for p in problems if p.level == "error"]
        if errors:
            raise MASRefineError(str(errors[0]))
        return cls(root, data["table"], data["atlases"])

    # -- access --------------------------------------------------------------------------------
    @property
    def json_path(self) -> Path:
        return self.root / ATLAS_JSON

    @property
    def models_dir(self) -> Path:
        """``<set>/models``: where models trained on this atlas set are kept (not created here)."""
        return self.root / MODELS_DIR

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self.atlases]

    def __len__(self) -> int:
        return len(self.atlases)

    def __iter__(self):
        return iter(self.atlases)

    def atlas(self, atlas_id: str) -> Atlas:
        try:
            return self._by_id[atlas_id]
        except KeyError:
            raise MASRefineError(f"{self.json_path}: no atlas with id {atlas_id!r}") from None

    def image_path(self, atlas_id: str) -> Path:
        return _resolve(self.root, self.atlas(atlas_id).image)

    def label_path(self, atlas_id: str) -> Path:
        return _resolve(self.root, self.atlas(atlas_id).label)

    def grid(self, atlas_id: str) -> Grid:
        """The image grid of an atlas, from the file header only (fast)."""
        return read_grid(self.image_path(atlas_id))

    def read(self, atlas_id: str) -> tuple[sitk.Image, sitk.Image]:
        """(image as float32, label map as uint16), both with their file geometry (LPS mm).

        Raises :class:`MASRefineError` naming the file for unreadable, non-3D, NaN or empty data, for
        a label map whose grid differs from its image's and for label values not in the label table."""
        img_p, lab_p = self.image_path(atlas_id), self.label_path(atlas_id)
        img, lab = read_image(img_p), read_label(lab_p)
        problems = _label_map_problems(img_p, img, lab, foreground_values(lab), self.label_table, self.json_path)
        if problems:
            raise MASRefineError(f"{lab_p}: {problems[0]}")
        return img, lab

    def to_json_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "labels": self.label_table.to_json_dict(),
                "atlases": [{"id": a.id, "image": a.image, "label": a.label} for a in self.atlases]}

    def save(self) -> Path:
        """Write atlas.json atomically (one line per label and per atlas, for readable diffs)."""
        return atomic_write_text(_format_json(self.to_json_dict()), self.json_path)

    def __repr__(self) -> str:
        return f"AtlasSet({str(self.root)!r}, {len(self)} atlases, {len(self.label_table)} labels)"


# --------------------------------------------------------------------------------------------------- problems
class Problem(str):
    """One line naming the file: ``"<path>: <message>"`` (errors) or ``"<path>: warning: <message>"``."""

    level: str

    def __new__(cls, path: str | os.PathLike, message: str, level: str = "error") -> "Problem":
        if level not in ("error", "warning"):
            raise ValueError(level)
        text = f"{path}: {message}" if level == "error" else f"{path}: warning: {message}"
        obj = super().__new__(cls, " ".join(text.split("\n")))
        obj.level = level
        return obj

    @classmethod
    def from_error(cls, e: MASRefineError, suffix: str = "") -> "Problem":
        """A problem from a one-line error that already starts with the file name."""
        text = str(e) + suffix
        path, _, msg = text.partition(": ")
        return cls(path, msg or text)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


@dataclass
class CheckReport:
    """What :func:`inspect_atlas_set` found: problems plus a summary of the valid atlases."""
    path: Path
    problems: list[Problem] = field(default_factory=list)
    n_atlases: int = 0
    label_table: LabelTable = field(default_factory=LabelTable)
    grids: Counter = field(default_factory=Counter)        # Grid -> number of atlases

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: atlases, labels, grid (size @ spacing; whether placements differ), status."""
        parts = [_count(self.n_atlases, "atlas", "atlases"), _count(len(self.label_table), "label", "labels")]
        shapes = Counter()
        for g, n in self.grids.items():
            shapes[g.describe()] += n
        if len(shapes) == 1:
            text = "grid " + next(iter(shapes))
            if len(self.grids) > 1:
                text += " (origin/direction differ between atlases)"
            parts.append(text)
        elif shapes:
            g, n = shapes.most_common(1)[0]
            parts.append(f"{len(shapes)} different grids (most common {g}, {n} atlases)")
        status = "ok" if self.ok else _count(len(self.errors), "error", "errors")
        if self.warnings:
            status += ", " + _count(len(self.warnings), "warning", "warnings")
        return f"{self.path}: " + ", ".join(parts) + f": {status}"


def inspect_atlas_set(path: str | os.PathLike, progress: ProgressCallback | None = None) -> CheckReport:
    """Read every atlas of a set and report problems (one line each, naming the file; none: the set is valid and
    consistent) and a summary.

    Errors: bad atlas.json schema, duplicate ids, missing/unreadable files, non-3D or NaN/inf or
    constant images, empty or non-integer label maps, label grid != image grid, label values not in the
    table. Warnings: atlases whose label sets differ from the most common one, table entries that
    appear in no atlas.
    """
    try:
        root, json_path = _locate(path)
    except MASRefineError as e:
        rep = CheckReport(Path(path))
        rep.problems.append(Problem.from_error(e))
        return rep
    rep = CheckReport(root)
    data, problems = _parse_atlas_json(json_path)
    rep.problems.extend(problems)
    if data is None:
        return rep
    table: LabelTable = data["table"]
    rep.label_table = table
    sets: dict[str, tuple[str, frozenset]] = {}
    atlases: list[Atlas] = data["atlases"]
    for n, a in enumerate(atlases):
        report(progress, "check", n / max(1, len(atlases)), a.id)
        where = f" (atlas {a.id})"
        img_p, lab_p = _resolve(root, a.image), _resolve(root, a.label)
        img = lab = None
        try:
            img = read_image(img_p)
        except MASRefineError as e:
            rep.problems.append(Problem.from_error(e, where))
        try:
            lab = read_label(lab_p)
        except MASRefineError as e:
            rep.problems.append(Problem.from_error(e, where))
        if lab is not None:
            values = frozenset(foreground_values(lab))
            sets[a.id] = (str(lab_p), values)
            # a missing or bad table is reported once (above), not once per atlas
            problems = _label_map_problems(img_p, img, lab, values if table else (), table, json_path)
            rep.problems.extend(Problem(lab_p, p + where) for p in problems)
            if img is not None and Grid.from_image(img).isclose(Grid.from_image(lab)):
                rep.grids[Grid.from_image(img)] += 1
                rep.n_atlases += 1
    report(progress, "check", 1.0, "done")
    # consistency warnings
    if len(sets) > 1:
        common, _ = Counter(v for _, v in sets.values()).most_common(1)[0]
        for aid, (lab_p, vals) in sets.items():
            if vals == common:
                continue
            lacks, extra = sorted(common - vals), sorted(vals - common)
            msg = []
            if lacks:
                msg.append(f"lacks labels {_short(lacks)}")
            if extra:
                msg.append(f"has labels {_short(extra)}")
            rep.problems.append(Problem(lab_p, " and ".join(msg) + f" compared with most atlases (atlas {aid})",
                                        "warning"))
    if sets:
        unused = sorted(set(table).difference(*(vals for _, vals in sets.values())))
        if unused:
            rep.problems.append(Problem(json_path, f"label table entries {_short(unused)} appear in no atlas", "warning"))
    return rep


# -------------------------------------------------------------------------------------- building an atlas set
def init_atlas_set(out: str | os.PathLike, images_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                   label_table: str | os.PathLike | LabelTable | None = None, *, mode: str = "reference",
                   ids: Iterable[str] | None = None, overwrite: bool = False,
                   progress: ProgressCallback | None = None) -> AtlasSet:
    """Build an atlas set in ``out`` from images and label maps matched by file stem (``a.nii.gz`` with
    ``a.nrrd``...). Writes ``out/atlas.json`` atomically and returns the loaded set; its ``notes`` list
    what the user should know (unmatched files, generated label names).

    ``mode``: "reference" (default) stores paths to the files where they are, relative to ``out``;
    "symlink" / "copy" put links (relative targets) / copies into ``out/images`` and ``out/labels``,
    never replacing an existing different file. ``ids``: only these stems (default all matched).

    Label table: ``label_table`` (a LabelTable, or a JSON / CSV ``Index,Name`` / Slicer colour-table file);
    else ``labels.json`` beside or inside ``labels_dir``; else generated names ``label N``. It is restricted
    to the values present in the label maps; present values missing from the given table get generated
    names (and a note). Every label map is read (validated by ``imageio.read_label``) to find the values.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = Path(out)
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    json_path = out / ATLAS_JSON
    if json_path.exists() and not overwrite:
        raise MASRefineError(f"{json_path}: already exists (use --force / overwrite=True to replace atlas.json)")
    images = _list_images(images_dir, "images")
    labels = _list_images(labels_dir, "label maps")
    if images_dir.resolve() == labels_dir.resolve():
        raise MASRefineError(f"{images_dir}: images and label maps must be in different folders (matched by file name)")
    notes: list[str] = []
    common = sorted(set(images) & set(labels))
    if ids is not None:
        ids = list(ids)
        for i in ids:
            if i not in images:
                raise MASRefineError(f"{images_dir}: no image named {i!r} (for atlas {i})")
            if i not in labels:
                raise MASRefineError(f"{labels_dir}: no label map named {i!r} (for atlas {i})")
        if len(set(ids)) != len(ids):
            raise MASRefineError(f"{images_dir}: duplicate ids requested: {_short(sorted(i for i, c in Counter(ids).items() if c > 1))}")
        common = ids
    else:
        only_img = sorted(set(images) - set(labels))
        only_lab = sorted(set(labels) - set(images))
        if only_img:
            notes.append(f"{images_dir}: {len(only_img)} images have no label map in {labels_dir} and are left out "
                         f"({_short(only_img)})")
        if only_lab:
            notes.append(f"{labels_dir}: {len(only_lab)} label maps have no image in {images_dir} and are left out "
                         f"({_short(only_lab)})")
    if not common:
        raise MASRefineError(f"{labels_dir}: no label map matches an image of {images_dir} by file name")
    for n, sid in enumerate(common):  # the id is the file stem and becomes output file names: checked first
        problem = atlas_id_problem(sid)
        if problem:
            raise MASRefineError(f"{images[sid]}: {problem}; rename the image and its label map")
        problem = duplicate_id_problem(sid, common[:n])
        if problem:
            raise MASRefineError(f"{images_dir}: {problem}")

    # read the label maps: validates them and collects the values present
    present: set[int] = set()
    for n, sid in enumerate(common):
        report(progress, "atlas-init", n / len(common), sid)
        present.update(foreground_values(read_label(labels[sid])))
    report(progress, "atlas-init", 1.0, "label maps read")

    table = _init_label_table(label_table, labels_dir, present, notes).with_known_terminology()

    # the files
    out.mkdir(parents=True, exist_ok=True)
    atlases = []
    for sid in common:
        img_src, lab_src = images[sid], labels[sid]
        if mode != "reference":
            img_src = _materialize(img_src, out / "images" / img_src.name, mode)
            lab_src = _materialize(lab_src, out / "labels" / lab_src.name, mode)
        atlases.append(Atlas(sid, _relative(img_src, out), _relative(lab_src, out)))
    aset = AtlasSet(out, table, atlases)
    aset.save()
    aset = AtlasSet.load(out)
    aset.notes = notes
    return aset


# ---------------------------------------------------------------------------------------------------- helpers
def _label_map_problems(img_p: Path, img: sitk.Image | None, lab: sitk.Image, values: Iterable[int], table: LabelTable,
                        json_path: Path) -> list[str]:
    """An atlas label map's values not in the set's label table, its grid if not its image's (``img`` None: unread)."""
    unknown, gi, gl = sorted(set(values) - set(table)), img is not None and Grid.from_image(img), Grid.from_image(lab)
    return ([f"label values {_short(unknown)} are not in the label table of {json_path}"] if unknown else []) + \
        ([f"label grid does not match the image grid of {img_p} ({gl.difference(gi)})"]
         if gi and not gi.isclose(gl) else [])


def _locate(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.name == ATLAS_JSON and p.is_file():
        return p.parent, p
    if not p.exists():
        raise MASRefineError(f"{p}: atlas set folder not found")
    if not p.is_dir():
        raise MASRefineError(f"{p}: not an atlas set folder (expected a folder with {ATLAS_JSON})")
    j = p / ATLAS_JSON
    if not j.is_file():
        raise MASRefineError(f"{j}: not found (not an atlas set; create one with 'masrefine atlas init')")
    return p, j


def _parse_atlas_json(json_path: Path) -> tuple[dict | None, list[Problem]]:
    """Parse and validate atlas.json. Returns ({"table", "atlases"} or None if unusable, problems)."""
    problems: list[Problem] = []
    try:
        d = read_json(json_path, ATLAS_JSON)
    except MASRefineError as e:
        return None, [Problem.from_error(e)]
    if not isinstance(d, dict):
        return None, [Problem(json_path, "must hold a JSON object with schema_version, labels and atlases")]
    version = d.get("schema_version")
    if version is None:
        problems.append(Problem(json_path, "missing 'schema_version' (expected 1)"))
    elif version != SCHEMA_VERSION:
        if isinstance(version, int) and version > SCHEMA_VERSION:
            return None, [Problem(json_path, f"schema_version {version} is newer than this MASRefine reads "
                                             f"({SCHEMA_VERSION}); update MASRefine")]
        return None, [Problem(json_path, f"unsupported schema_version {version!r} (expected {SCHEMA_VERSION})")]
    table = LabelTable()
    labels = d.get("labels")
    if labels is None:
        problems.append(Problem(json_path, "missing 'labels' (the label table {value: {name, color}})"))
    elif not isinstance(labels, dict):
        problems.append(Problem(json_path, "'labels' must be an object {value: {name, color}}"))
    else:
        try:
            table = LabelTable.from_json_dict(labels, f"{json_path}")
        except MASRefineError as e:
            problems.append(Problem.from_error(e))
        if not table and not problems:
            problems.append(Problem(json_path, "the label table 'labels' is empty"))
        term_path = json_path.parent / TERMINOLOGY_JSON  # the set's own codes, over those in atlas.json
        if table and term_path.is_file():
            try:
                table = table.with_terminology(load_terminology(term_path), str(term_path))
            except MASRefineError as e:
                problems.append(Problem.from_error(e))
    entries = d.get("atlases")
    atlases: list[Atlas] = []
    if not isinstance(entries, list) or not entries:
        problems.append(Problem(json_path, "'atlases' must be a non-empty list of {id, image, label}"))
        return None, problems
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) and e.get(k) for k in ("id", "image", "label")):
            problems.append(Problem(json_path, f"atlas entry {n + 1} must have non-empty string fields id, image, label"))
            continue
        id_problem = atlas_id_problem(e["id"])
        if id_problem:  # ids become output file names: refused here, before anything is written
            problems.append(Problem(json_path, f"atlas entry {n + 1}: {id_problem}"))
            continue
        duplicate = duplicate_id_problem(e["id"], (a.id for a in atlases))
        if duplicate:
            problems.append(Problem(json_path, duplicate))
            continue
        atlases.append(Atlas(e["id"], e["image"], e["label"]))
    return {"table": table, "atlases": atlases}, problems


def _format_json(d: dict) -> str:
    lines = ["{", f' "schema_version": {json.dumps(d["schema_version"])},', ' "labels": {']
    items = list(d["labels"].items())
    for n, (k, v) in enumerate(items):
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" + ("," if n < len(items) - 1 else ""))
    lines += [" },", ' "atlases": [']
    for n, a in enumerate(d["atlases"]):
        lines.append(f"  {json.dumps(a, ensure_ascii=False)}" + ("," if n < len(d['atlases']) - 1 else ""))
    lines += [" ]", "}", ""]
    text = "\n".join(lines)
    assert json.loads(text) == d
    return text


def _resolve(root: Path, p: str) -> Path:
    """A stored path (relative to the set folder, or absolute) as a usable path, normalised (``a/../b``)."""
    q = Path(p)
    return Path(os.path.normpath(q if q.is_absolute() else root / q))


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (``../`` allowed, no symlink resolution), POSIX separators; absolute
    only where no relative path exists."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:  # another drive (Windows)
        return Path(os.path.abspath(path)).as_posix()
    return Path(rel).as_posix()


def _list_images(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MASRefineError(f"{folder}: folder of {what} not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not is_image_file(p) or p.name.lower().endswith(".seg.nrrd") or not p.is_file():
            continue
        stem = image_stem(p)
        if stem in found:
            raise MASRefineError(f"{p}: same name as {found[stem].name} (two {what} for {stem!r})")
        found[stem] = p
    if not found:
        raise MASRefineError(f"{folder}: no {what} (.nii.gz, .nii, .nrrd, .mha, .mhd) found")
    return found


def _init_label_table(source, labels_dir: Path, present: set[int], notes: list[str]) -> LabelTable:
    name = None
    if isinstance(source, LabelTable):
        table, name = source, "the given label table"
    elif source is not None:
        table, name = LabelTable.load(source), str(source)
    else:
        table = None
        for cand in (labels_dir.parent / "labels.json", labels_dir / "labels.json"):
            if cand.is_file():
                table, name = LabelTable.load(cand), str(cand)
                notes.append(f"{cand}: used as the label table")
                break
    if table is None:
        notes.append(f"{labels_dir}: no label table given (--label-table) and no labels.json beside it; "
                     f"labels are named 'label <value>'")
        return LabelTable.from_values(present)
    out = table.subset(present)
    missing = sorted(present - set(table))
    if missing:
        for v in missing:
            out[v] = Label(f"label {v}", default_color(v))
        out = LabelTable(sorted(out.items()))
        notes.append(f"{name}: label values {_short(missing)} of the label maps are not in this table; "
                     f"named 'label <value>'")
    dropped = len(set(table) - present)
    if dropped:
        notes.append(f"{name}: {dropped} entries not present in any label map are left out")
    return out


def _materialize(src: Path, dest: Path, mode: str) -> Path:
    """Link or copy ``src`` to ``dest`` (relative symlink target); an existing ``dest`` is kept only if it
    is already the same file, otherwise it is an error (never overwritten)."""
    if dest.exists() or dest.is_symlink():
        try:
            if dest.exists() and os.path.samefile(dest, src):
                return dest
        except OSError:
            pass
        if mode == "copy" and dest.is_file() and not dest.is_symlink() and filecmp.cmp(src, dest, shallow=False):
            return dest
        raise MASRefineError(f"{dest}: already exists and is not {src}; not overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(os.path.relpath(os.path.abspath(src), os.path.abspath(dest.parent)), dest)
    else:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    return dest


def _short(values: Sequence, n: int = 8) -> str:
    """``[1, 2, 3]``, or the first ``n`` and the count when longer."""
    values = list(values)
    body = ", ".join(str(v) for v in values[:n])
    if len(values) > n:
        body += f", ... ({len(values)} in all)"
    return f"[{body}]"
