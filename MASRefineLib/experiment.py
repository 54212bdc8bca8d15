"""The paper's Table 1 on any labelled data set: ``masrefine experiment``.

Rows: for each pre-registration (affine, deformable): PV, VoteNet+, VoteNet+ (I), VoteNet+ (IS); plus
the U-Net baseline (the surrogate segmenter's own segmentation). Columns: ASD (mm), surface Dice (%,
tolerance 0.7 mm as in the paper), 95% Hausdorff distance (mm) and volume Dice (%), each as mean (sd)
over the targets, per label group (e.g. bones / cartilages; ``all`` when the data set has no groups).
Plus the seconds per stage (per target, and the one-off model training).

Data: ``--data DIR`` is an atlas set (``atlas.json``) or a folder with ``images/`` and ``labels/``
(matched by file name, label names from ``labels.json`` or ``--labels``), e.g. the output of
``shared/tools/synth_knee.py`` or ``shared/data/ixi-dlmuse``. Subjects are split at random (seeded)
into ``--atlases N`` atlases and ``--targets M`` targets, disjoint. The models (surrogate segmenter,
one VoteNet+ per pre-registration) are trained on the atlases only.

Output folder::

    OUT/split.json                 the subjects of the atlas set and the targets (a resumed run checks it)
    OUT/atlas-set/                 the experiment's atlas set (atlas.json referencing the data; models/)
    OUT/cells/<row>/<target>.json  one result per (row, target): metrics per group and label, seconds
    OUT/table1.md, table1.csv      the table (mean (sd)) and the seconds per stage
    OUT/results.csv                every cell's numbers (long format)
    OUT/table1.png                 volume and surface Dice per row and group, with sd error bars

Resumable: a finished cell is never computed again; a (target, pre-registration) whose four cells are
all finished is not even registered again. Interrupt it at any time and run the same command again.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .batch import mean_sd
from .errors import MASRefineError
from .imageio import atomic_write_text, image_stem, is_image_file, write_figure
from .jsonio import read_json, write_json
from .progress import ProgressCallback, report
from .protocol.atomic import write_csv

log = logging.getLogger("MASRefineLib.experiment")

#: (key, pre-registration, refinement, fusion, row name as in the paper)
ROWS: list[tuple[str, Optional[str], str, str, str]] = [
    ("affine-pv", "affine", "none", "pv", "PV"),
    ("affine-votenet", "affine", "none", "votenet", "VoteNet+"),
    ("affine-votenet-I", "affine", "I", "votenet", "VoteNet+ (I)"),
    ("affine-votenet-IS", "affine", "IS", "votenet", "VoteNet+ (IS)"),
    ("deformable-pv", "deformable", "none", "pv", "PV"),
    ("deformable-votenet", "deformable", "none", "votenet", "VoteNet+"),
    ("deformable-votenet-I", "deformable", "I", "votenet", "VoteNet+ (I)"),
    ("deformable-votenet-IS", "deformable", "IS", "votenet", "VoteNet+ (IS)"),
    ("unet", None, "none", "unet", "U-Net (baseline)"),
]
METRICS = [("asd_mm", "ASD (mm)", 1.0, 2), ("surface_dice", "SD (%)", 100.0, 2), ("hd95_mm", "95MD (mm)", 1.0, 2),
           ("dice", "VD (%)", 100.0, 2)]


@dataclass
class Subject:
    id: str
    image: str
    label: str


# ----------------------------------------------------------------------------------------------- data
def list_subjects(data_dir: str | os.PathLike, label_table: str | None = None):
    """(subjects, LabelTable) of a data folder: an atlas set, or ``images/`` + ``labels/``."""
    from .atlas import AtlasSet
    from .labels import LabelTable
    d = Path(data_dir)
    if (d / "atlas.json").exists():
        aset = AtlasSet.load(d)
        subs = [Subject(a, str(aset.image_path(a)), str(aset.label_path(a))) for a in aset.ids]
        table = LabelTable.load(label_table) if label_table else aset.label_table
        return subs, table
    img_dir, lab_dir = d / "images", d / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise MASRefineError(f"{d}: expected an atlas set (atlas.json) or the folders images/ and labels/")
    imgs = {image_stem(p): p for p in img_dir.iterdir() if is_image_file(p)}
    labs = {image_stem(p): p for p in lab_dir.iterdir() if is_image_file(p)}
    ids = sorted(set(imgs) & set(labs))
    if not ids:
        raise MASRefineError(f"{lab_dir}: no label map matches an image of {img_dir} by file name")
    subs = [Subject(i, str(imgs[i].resolve()), str(labs[i].resolve())) for i in ids]
    src = label_table or next((str(p) for p in (d / "labels.json", lab_dir / "labels.json") if p.exists()), None)
    if src is None:
        raise MASRefineError(f"{d}: no labels.json; give the label table with --labels FILE")
    return subs, LabelTable.load(src)


def default_groups(table) -> dict[str, list[int]]:
    """Label groups for the table: cartilages vs bones when the names say so (knee), else all labels."""
    cart = [v for v, lab in table.items() if "cartilage" in lab.name.lower()]
    if cart and len(cart) < len(table):
        return {"bone": [v for v in table if v not in cart], "cartilage": cart}
    return {"all": list(table)}


def make_split(subjects: Sequence[Subject], n_atlases: int, n_targets: int, seed: int) -> tuple[list[Subject], list[Subject]]:
    if n_atlases < 2:
        raise MASRefineError("the experiment needs at least 2 atlases (VoteNet+ holds one out to calibrate)")
    if n_targets < 1:
        raise MASRefineError("the experiment needs at least 1 target")
    if n_atlases + n_targets > len(subjects):
        raise MASRefineError(f"{n_atlases} atlases + {n_targets} targets > {len(subjects)} labelled subjects")
    order = random.Random(seed).sample(list(subjects), len(subjects))
    return order[:n_atlases], order[n_atlases:n_atlases + n_targets]


def named_split(subjects: Sequence[Subject], atlas_ids: Sequence[str],
                target_ids: Sequence[str]) -> tuple[list[Subject], list[Subject]]:
    """The given split (e.g. a benchmark's fixed one) instead of a random one: atlases and targets by subject id,
    every id a subject of the data, none both an atlas and a target."""
    by_id = {s.id: s for s in subjects}
    unknown = [i for i in [*atlas_ids, *target_ids] if i not in by_id]
    if unknown:
        raise MASRefineError(f"split: no labelled subject {unknown[0]!r} in the data ({len(unknown)} unknown id(s))")
    both = sorted(set(atlas_ids) & set(target_ids))
    if both:
        raise MASRefineError(f"split: {both[0]!r} is both an atlas and a target")
    if len(set(atlas_ids)) != len(atlas_ids) or len(set(target_ids)) != len(target_ids):
        raise MASRefineError("split: an id is listed twice")
    if len(atlas_ids) < 2 or not target_ids:
        raise MASRefineError("split: the experiment needs at least 2 atlases (VoteNet+ holds one out to calibrate) "
                             "and 1 target")
    return [by_id[i] for i in atlas_ids], [by_id[i] for i in target_ids]


def write_atlas_set(out: Path, atlases: Sequence[Subject], table):
    """The experiment's atlas set: atlas.json in ``out`` referencing the files (relative paths)."""
    from .atlas import Atlas, AtlasSet
    out.mkdir(parents=True, exist_ok=True)
    rel = lambda p: Path(os.path.relpath(p, out)).as_posix()
    aset = AtlasSet(out, table, [Atlas(s.id, rel(s.image), rel(s.label)) for s in atlases])
    if not (out / "atlas.json").exists() or read_json(out / "atlas.json", "atlas.json") != aset.to_json_dict():
        aset.save()
    return AtlasSet.load(out)


# ----------------------------------------------------------------------------------------------- cells
def _cell_path(out: Path, row: str, target: str) -> Path:
    return out / "cells" / row / f"{target}.json"


def _evaluate(labels: np.ndarray, truth_path: str, grid, groups, table) -> dict[str, Any]:
    from .imageio import array_to_image, read_label, resample_label
    from .geometry import Grid
    from .metrics import evaluate
    ref = read_label(truth_path)
    if not Grid.from_image(ref).isclose(grid):
        ref = resample_label(ref, grid)
    ev = evaluate(array_to_image(labels.astype(np.uint16), grid), ref, groups=groups, labels=list(table),
                  pred_name="segmentation", ref_name=truth_path)
    return ev.to_json_dict({v: lab.name for v, lab in table.items()})


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The package version and, in a git checkout, the commit (provenance of every cell)."""
    from . import __version__
    try:
        import subprocess
        r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
        if r.returncode == 0 and r.stdout.strip():
            return f"{__version__}+{r.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def _save_cell(out: Path, row: str, target: str, doc: dict) -> None:
    write_json({**doc, "code": code_version()}, _cell_path(out, row, target))


def run_experiment(data_dir: str | os.PathLike, n_atlases: Optional[int], n_targets: Optional[int],
                   out_dir: str | os.PathLike, *,
                   preregs: Sequence[str] = ("affine", "deformable"), preset: str = "default", device: str = "auto",
                   seed: int = 0, groups: dict[str, list[int]] | None = None, label_table: str | None = None,
                   unet: bool = True, rows: Sequence[str] | None = None,
                   split: Optional[tuple[Sequence[str], Sequence[str]]] = None,
                   progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """Compute every missing cell of Table 1 and write the table files; returns {"table", "cells", ...}.

    ``rows``: only these row keys of :data:`ROWS` (default all rows of ``preregs``, and the U-Net).
    ``split``: (atlas ids, target ids) to use instead of a random split of ``n_atlases`` + ``n_targets``
    subjects (which are then ignored)."""
    import torch
    from .device import resolve_device
    from .fusion.votenet import votenet_model_path
    from .pipeline import Fuse, Load, Models, Refine, Register, Run, SegmentOptions
    from .training import ensure_segmenter

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    subjects, table = list_subjects(data_dir, label_table)
    if split is not None:
        atlases, targets = named_split(subjects, *split)
    elif n_atlases is None or n_targets is None:
        raise MASRefineError("the experiment needs the numbers of atlases and targets, or a split")
    else:
        atlases, targets = make_split(subjects, n_atlases, n_targets, seed)
    split = {"data": str(Path(data_dir).resolve()), "seed": seed, "atlases": [s.id for s in atlases],
             "targets": [s.id for s in targets], "preset": preset}
    sp = out / "split.json"
    if sp.exists():
        old = read_json(sp, "experiment split")
        if not isinstance(old, dict) or {k: old.get(k) for k in split} != split:
            raise MASRefineError(f"{sp}: this folder holds an experiment with another data set, split or preset; "
                                 f"use another --out (or delete it)")
    else:
        write_json(split, sp)
    groups = groups or default_groups(table)
    aset = write_atlas_set(out / "atlas-set", atlases, table)
    dev = resolve_device(device)
    if rows is not None:
        unknown = set(rows) - {r[0] for r in ROWS}
        if unknown:
            raise MASRefineError(f"unknown table rows {sorted(unknown)} (known: {', '.join(r[0] for r in ROWS)})")
    rows = [r for r in ROWS if ((r[1] in preregs) or (r[1] is None and unet)) and (rows is None or r[0] in rows)]
    preregs = [p for p in preregs if any(r[1] == p for r in rows)]
    unet = any(r[1] is None for r in rows)
    training: dict[str, float] = {}
    tpath = out / "training.json"
    if tpath.exists():
        training = read_json(tpath, "training times", allow_nan=True)
        if not isinstance(training, dict):
            raise MASRefineError(f"{tpath}: must hold a JSON object (training seconds per model); delete it")

    def train_segmenter() -> Any:
        """The surrogate segmenter (loaded, or trained when missing); a training is timed and recorded at once
        (an interrupted run keeps it; loading one trained before is not training)."""
        t0, trained = time.perf_counter(), not (aset.models_dir / "segmenter.json").exists()
        seg = ensure_segmenter(aset, SegmentOptions(preset=preset, seed=seed, refine="IS"), dev, None)
        if trained:
            training["segmenter"] = round(time.perf_counter() - t0, 1)
            write_json(training, tpath)
        return seg

    n_units = len(targets) * (len(preregs) + (1 if unet else 0))
    unit = 0
    for t in targets:
        for prereg in list(preregs) + (["unet"] if unet else []):
            frac0 = unit / max(1, n_units)
            unit += 1
            rkeys = [r[0] for r in rows if (r[1] == prereg) or (prereg == "unet" and r[1] is None)]
            todo = [k for k in rkeys if not _cell_path(out, k, t.id).exists()]
            if not todo:
                continue
            report(progress, "experiment", frac0, f"{t.id}: {prereg} ({len(todo)} cells)")
            # the pipeline's stages: Load, then (per pre-registration) Models and Register once, Refine once per
            # variant and Fuse once per row
            base = Load().run(Run(SegmentOptions(), dev, target_path=t.image, atlas_dir=str(aset.root)), None)
            grid = base.target.grid
            if prereg == "unet":
                seg = train_segmenter()
                t0 = time.perf_counter()
                labels = seg.predict_labels(base.target.numpy(), grid)
                secs = {"segment": round(time.perf_counter() - t0, 2)}
                _save_cell(out, "unet", t.id, {"row": "unet", "target": t.id, "method": "unet", "seconds": secs,
                                               "metrics": _evaluate(labels, t.label, grid, groups, table)})
                continue
            spec = [r for r in rows if r[0] in todo]
            opts = SegmentOptions(prereg=prereg, refine="IS" if any(r[2] == "IS" for r in spec) else "none",
                                  fusion="votenet" if any(r[3] == "votenet" for r in spec) else "pv",
                                  device=str(dev), preset=preset, seed=seed, train_missing=True)
            had_vn = votenet_model_path(aset, prereg) is not None
            base = base.replace(options=opts)
            # each model's training timed apart (the segmenter first), and recorded as soon as it is done
            if opts.refine == "IS" and not (aset.models_dir / "segmenter.json").exists():
                train_segmenter()  # (an existing one is loaded by Models below, once)
            t0 = time.perf_counter()
            if opts.refine == "IS" or opts.fusion == "votenet":
                base = Models().run(base, None)
            if opts.fusion == "votenet" and not had_vn:
                training[f"votenet-{prereg}"] = round(time.perf_counter() - t0, 1)
                write_json(training, tpath)
            t0 = time.perf_counter()
            registered = Register().run(base, None)
            t_reg = time.perf_counter() - t0
            cache: dict[str, Any] = {"none": registered}
            for key, _, refine, fusion, _ in spec:
                secs = {"register": round(t_reg, 2)}
                if refine not in cache:
                    t0 = time.perf_counter()
                    o = dataclasses.replace(opts, refine=refine, fusion="pv")
                    cache[refine] = Refine().run(registered.replace(options=o), None)
                    cache[f"t-{refine}"] = time.perf_counter() - t0
                if refine != "none":
                    secs["refine"] = round(cache[f"t-{refine}"], 2)
                o = dataclasses.replace(opts, refine=refine, fusion=fusion)
                t0 = time.perf_counter()
                fused = Fuse().run(cache[refine].replace(options=o), None).fused
                secs["fuse"] = round(time.perf_counter() - t0, 2)
                _save_cell(out, key, t.id, {"row": key, "target": t.id, "prereg": prereg, "refine": refine,
                                            "method": fused.info.get("method", fusion), "seconds": secs,
                                            "fallbacks": list(cache[refine].fallbacks),
                                            "metrics": _evaluate(fused.labels, t.label, grid, groups, table)})
            del cache, registered, base
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    write_json(training, tpath)
    report(progress, "experiment", 1.0, "writing the table")
    return write_table(out, rows, [t.id for t in targets], groups, training)


# ----------------------------------------------------------------------------------------------- table
def _fmt(m: float, s: float, digits: int) -> str:
    return "–" if not math.isfinite(m) else f"{m:.{digits}f} ({s:.{digits}f})"


def write_table(out: Path, rows, target_ids: Sequence[str], groups: dict[str, list[int]],
                training: dict[str, float] | None = None) -> dict[str, Any]:
    """Table 1 from the finished cells: table1.md, table1.csv, results.csv, table1.png."""
    cells: dict[str, list[dict]] = {}
    for key, *_ in rows:
        for t in target_ids:
            p = _cell_path(out, key, t)
            if p.exists():
                cells.setdefault(key, []).append(read_json(p, "experiment cell", allow_nan=True))
    gnames = list(groups)
    summary: dict[str, dict] = {}
    long_rows = []
    for key, prereg, refine, fusion, name in rows:
        cs = cells.get(key, [])
        s: dict[str, Any] = {"n": len(cs), "methods": sorted({c.get("method", fusion) for c in cs})}
        for g in gnames:
            for m, *_ in METRICS:
                vals = [c["metrics"]["groups"][g][m] for c in cs]
                s[(g, m)] = mean_sd(vals)
        for st in ("register", "refine", "fuse", "segment"):
            vals = [c["seconds"][st] for c in cs if st in c.get("seconds", {})]
            if vals:
                s[("seconds", st)] = float(np.mean(vals))
        summary[key] = s
        for c in cs:
            for g in gnames:
                for m, *_ in METRICS:
                    long_rows.append({"row": key, "prereg": prereg or "", "refine": refine, "method": c.get("method"),
                                      "target": c["target"], "group": g, "metric": m,
                                      "value": c["metrics"]["groups"][g][m]})
    done = [r for r in rows if summary[r[0]]["n"]]  # the rows with finished cells
    # Markdown
    head = ["Pre-registration", "Method"] + [f"{lab} {g}" for _, lab, _, _ in METRICS for g in gnames] + ["targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, prereg, refine, fusion, name in done:
        s = summary[key]
        shown = name
        if fusion == "votenet" and s["methods"] and "votenet" not in s["methods"]:
            shown = f"{name.replace('VoteNet+', s['methods'][0].upper())} (VoteNet+ unavailable)"
        cellv = [_fmt(s[(g, m)][0] * sc, s[(g, m)][1] * sc, d) for m, _, sc, d in METRICS for g in gnames]
        lines.append("| " + " | ".join([prereg or "–", shown] + cellv + [str(s["n"])]) + " |")  # sd of 1 target: 0
    n_t = len(target_ids)
    md = [f"# Table 1 (mean (sd) over {n_t} target{'s' if n_t != 1 else ''}; a row with fewer has not finished)", "",
          "Groups: " + "; ".join(f"{g} = labels {v}" for g, v in groups.items()) +
          ". ASD: average symmetric surface distance; SD: surface Dice at 0.7 mm; 95MD: 95th-percentile "
          "Hausdorff distance; VD: volume Dice.", ""] + lines
    md += ["", "## Seconds per target", "", "| Pre-registration | Method | register | refine | fuse / segment |",
           "|---|---|---|---|---|"]
    for key, prereg, refine, fusion, name in done:
        s = summary[key]
        f = lambda k: f"{s[('seconds', k)]:.1f}" if ("seconds", k) in s else "–"
        md.append(f"| {prereg or '–'} | {name} | {f('register')} | {f('refine')} | "
                  f"{f('fuse') if ('seconds', 'fuse') in s else f('segment')} |")
    if training:
        md += ["", "Model training (once, on the atlases): " +
               ", ".join(f"{k} {v:.0f} s" for k, v in training.items())]
    atomic_write_text("\n".join(md) + "\n", out / "table1.md")
    # CSV (summary) and long results
    head = ["row", "prereg", "method", "n"] + [f"{m}_{g}_{k}" for m, *_ in METRICS for g in gnames for k in ("mean", "sd")] \
        + ["seconds_register", "seconds_refine", "seconds_fuse", "seconds_segment"]
    write_csv([dict(zip(head, [key, prereg or "", name, summary[key]["n"]]
                        + [v for m, *_ in METRICS for g in gnames for v in summary[key][(g, m)]]
                        + [summary[key].get(("seconds", k), "") for k in ("register", "refine", "fuse", "segment")]))
               for key, prereg, refine, fusion, name in done], out / "table1.csv", head)
    write_csv(long_rows, out / "results.csv", ["row", "prereg", "refine", "method", "target", "group", "metric", "value"])
    plot = _plot(out / "table1.png", rows, summary, gnames)
    return {"table": str(out / "table1.md"), "csv": str(out / "table1.csv"), "results": str(out / "results.csv"),
            "plot": plot, "cells": sum(s["n"] for s in summary.values()), "markdown": "\n".join(md)}


def _plot(path: Path, rows, summary, gnames) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [(k, (p + " " if p else "") + n) for k, p, _, _, n in rows if summary[k]["n"]]
    if not shown:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(shown) + 1.8), sharey=True)
    y = np.arange(len(shown))
    h = 0.8 / len(gnames)
    for ax, (m, lab) in zip(axes, (("dice", "volume Dice (%)"), ("surface_dice", "surface Dice (%)"))):
        for j, g in enumerate(gnames):
            mean = [100 * summary[k][(g, m)][0] for k, _ in shown]
            sd = [100 * summary[k][(g, m)][1] for k, _ in shown]
            ax.barh(y + j * h - 0.4 + h / 2, mean, h, xerr=sd, label=g, capsize=2)
        ax.set_xlabel(lab)
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([n for _, n in shown], fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    return str(write_figure(fig, path, dpi=90))
