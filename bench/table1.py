#!/usr/bin/env python3
"""The paper's Table 1, measured: ``masrefine experiment`` on a benchmark split (issue 19, item 6).

Runs :func:`MASRefineLib.experiment.run_experiment` with the fixed split of bench/datasets.py (the 10 tuning
atlases; the 5 report targets by default) instead of a random one, so its numbers sit beside bench/pipeline.py's.
The models (surrogate U-Net, one VoteNet+ per pre-registration) are trained on the 10 atlases only, on the CPU,
by the experiment itself (their seconds are in ``training.json``). Then:

- copies the finished cells, ``split.json`` and ``training.json`` to ``docs/results/table1/<dataset>-<split>/``
  (committed: the data) and renders ``table1.md`` / ``table1.csv`` there from them (``write_table``);
- copies the trained models into bench/pipeline.py's atlas set of the same atlases when it has none, so its
  ``masrefine-paper`` method (deformable + IS + VoteNet+) uses the same models and does not train them again;
- renders ``docs/results/table1.md``: each data set's measured table, and for the knee our rows beside the
  paper's Table 1 (parsed from ../shared/reference/votenet-pp-paper.txt into
  ``docs/results/table1/paper-table1.json``), with the differences of setting next to it.

    .venv/bin/python bench/table1.py --dataset knee            # runs (resumable), then renders
    .venv/bin/python bench/table1.py --render                  # renders from the committed files only

About 1-2 CPU hours per data set at 2 threads (training included); the experiment resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import datasets  # noqa: E402
from MASRefineLib.imageio import atomic_write_text  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "table1"
DOC = ROOT / "docs" / "results" / "table1.md"
WORK = ROOT / ".cache" / "table1"
PAPER = ROOT.parent / "shared" / "reference" / "votenet-pp-paper.txt"
PAPER_JSON = RESULTS / "paper-table1.json"
# the paper's columns, in its order: (metric key of our cells, group)
PAPER_COLUMNS = [(m, g) for m in ("asd_mm", "surface_dice", "hd95_mm", "dice") for g in ("bone", "cartilage")]
# our row key -> the paper's row it corresponds to. Our optimisation-based deformable registration uses image
# similarity only, as the paper's DI network does (DIS also used the labels); the paper's DI rows are the match.
MATCH = {"unet": ("-", "U-Net (baseline)"),
         "affine-pv": ("Affine", "PV"), "affine-votenet": ("Affine", "VoteNet0+"),
         "affine-votenet-I": ("Affine", "VoteNet0+ (I)"), "affine-votenet-IS": ("Affine", "VoteNet0+ (IS)"),
         "deformable-pv": ("DI", "PV"), "deformable-votenet": ("DI", "VoteNet1+"),
         "deformable-votenet-I": ("DI", "VoteNet1+ (I)"), "deformable-votenet-IS": ("DI", "VoteNet1+ (IS)")}


def parse_paper(text: str) -> dict:
    """The paper's Table 1 rows: {"<block>|<method>": {"<metric>|<group>": [mean, sd]}} (the DIS block's last two
    rows, DIS pre-registration fused by VoteNet0+/1+, are "DIS*|VoteNet0+" and "DIS*|VoteNet1+")."""
    num = r"(\d+\.\d+)\((\d+\.\d+)\)"
    row_re = re.compile(r"^(?:(–|DIS) )?(U-Net \(baseline\)|PV|VoteNet\d\+(?: \((?:I|IS)\))?)((?: " + num + r"){8})\s*$")
    block, rows, seen_dis = None, {}, False
    for line in text.splitlines():
        s = line.strip()
        if s in ("Affine", "DI", "DIS"):
            block, seen_dis = s, seen_dis or s == "DIS"
            continue
        m = row_re.match(s)
        if not m:
            continue
        prefix, method = m.group(1), m.group(2)
        b = "-" if prefix == "–" else ("DIS*" if prefix == "DIS" or (block == "DIS*") else block)
        if prefix == "DIS":
            block = "DIS*"  # the rows after "DIS VoteNet0+" belong to that last block too
        vals = [float(v) for v in re.findall(r"\d+\.\d+", m.group(3))]
        rows[f"{b}|{method}"] = {f"{k}|{g}": [vals[2 * i], vals[2 * i + 1]] for i, (k, g) in enumerate(PAPER_COLUMNS)}
    return rows


def paper_table() -> dict:
    """The paper's Table 1 as committed JSON (parsed from the paper's text the first time)."""
    if PAPER_JSON.exists():
        return json.loads(PAPER_JSON.read_text())
    rows = parse_paper(PAPER.read_text())
    if len(rows) != 15:
        raise SystemExit(f"{PAPER}: parsed {len(rows)} rows of Table 1, expected 15")
    doc = {"source": "shared/reference/votenet-pp-paper.txt, Table 1 (OAI, 254 test images, mean (sd))",
           "units": {"asd_mm": "mm", "surface_dice": "% (0.7 mm)", "hd95_mm": "mm", "dice": "%"}, "rows": rows}
    atomic_write_text(json.dumps(doc, indent=1) + "\n", PAPER_JSON)
    return doc


def run(dataset: str, split: str, threads: int) -> Path:
    """Run (or resume) the experiment of ``dataset``/``split``; returns its work folder."""
    import os
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    from MASRefineLib.experiment import run_experiment
    atlas_ids, target_ids = datasets.benchmark_split(dataset, split)
    if dataset == "knee":
        data, labels = datasets.knee_dataset(atlas_ids + target_ids), None
    else:
        data, labels = datasets.ixi_dir(), str(datasets.ixi_label_table())
    out = WORK / f"{dataset}-{split}"
    t0 = time.perf_counter()
    r = run_experiment(data, None, None, out, split=(atlas_ids, target_ids), preset="default", device="cpu", seed=0,
                       label_table=labels, progress=datasets.progress_printer(60.0))
    print(f"{dataset} {split}: {r['cells']} cells, {time.perf_counter() - t0:.0f} s this run", file=sys.stderr)
    share_models(dataset, atlas_ids, out / "atlas-set" / "models")
    return out


def share_models(dataset: str, atlas_ids: list[str], models: Path) -> None:
    """Copy the experiment's models to bench/pipeline.py's atlas set of the same atlases when it has none: the
    same atlases, preset and seed train the same models there (ensure_models), so training twice is waste."""
    aset = datasets.make_atlas_set(dataset, atlas_ids)
    dest = aset.models_dir
    if any(dest.glob("*.safetensors")) or not any(models.glob("*.safetensors")):
        return
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(models.iterdir()):
        if f.is_file() and "checkpoint" not in f.name:
            shutil.copy2(f, dest / f.name)
    print(f"models copied to {dest}", file=sys.stderr)


def collect(dataset: str, split: str, work: Path) -> Path:
    """Copy the experiment's data files to docs/results/table1/<dataset>-<split>/."""
    dest = RESULTS / f"{dataset}-{split}"
    for f in [*work.glob("cells/*/*.json"), work / "split.json", work / "training.json"]:
        if f.exists():
            rel = f.relative_to(work)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest / rel)
    return dest


def render() -> str:
    """Each measured table (re-rendered from its cells) and the knee's comparison with the paper."""
    from MASRefineLib.experiment import ROWS, write_table
    parts = ["# The paper's Table 1, measured (`bench/table1.py`)", "",
             "Rendered by `bench/table1.py --render` from the result files under `docs/results/table1/` (cells written",
             "by `masrefine experiment` with the fixed benchmark split: the 10 tuning atlases, the 5 report targets).",
             "Models trained on the 10 atlases on the CPU by the experiment itself; seconds at 2 threads.", ""]
    for d in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        split = json.loads((d / "split.json").read_text())
        dataset = d.name.split("-")[0]
        # the label groups the experiment used, as its cells record them (no label table needed to render)
        first = json.loads(next(d.glob("cells/*/*.json")).read_text())
        groups = {g: v["labels"] for g, v in first["metrics"]["groups"].items()}
        training = json.loads((d / "training.json").read_text()) if (d / "training.json").exists() else None
        r = write_table(d, ROWS, split["targets"], groups, training)
        parts += [f"## {d.name}: {len(split['atlases'])} atlases, {len(split['targets'])} targets", "",
                  r["markdown"].split("\n", 2)[2].strip(), ""]
        if dataset == "knee":
            parts += compare_with_paper(d, split["targets"]) + [""]
    md = "\n".join(parts).rstrip() + "\n"
    atomic_write_text(md, DOC)
    return md


def compare_with_paper(d: Path, targets: list[str]) -> list[str]:
    """Volume and surface Dice (%) of our rows beside the paper's matching rows (MATCH)."""
    import statistics
    paper = paper_table()["rows"]
    out = ["### Beside the paper's Table 1 (volume Dice VD and surface Dice SD, %, mean over the targets finished)", "",
           "| our row | paper's row | VD bone ours / paper | VD cartilage ours / paper | SD bone ours / paper "
           "| SD cartilage ours / paper | our targets |", "|---|---|---|---|---|---|---|"]
    for key, (block, method) in MATCH.items():
        cells = [json.loads(p.read_text()) for t in targets if (p := d / "cells" / key / f"{t}.json").exists()]
        if not cells:
            continue
        pr = paper[f"{block}|{method}"]
        vals = []
        for m, g in (("dice", "bone"), ("dice", "cartilage"), ("surface_dice", "bone"), ("surface_dice", "cartilage")):
            ours = statistics.fmean(100 * c["metrics"]["groups"][g][m] for c in cells)
            vals.append(f"{ours:.1f} / {pr[f'{m}|{g}'][0]:.1f}")
        out.append(f"| {key} | {method if block == '-' else f'{block} {method}'} | " + " | ".join(vals) + f" | {len(cells)} of {len(targets)} |")
    out += ["", "What differs from the paper's setting: the knee images are synthesized from real OAI manual label maps",
            "(`../shared/tools/synth_knee.py`, DESS-like appearance) rather than the OAI DESS images; 10 atlases and 5",
            "targets rather than 11 atlases, a 200-image training set and 254 test images; the U-Net and VoteNet+ are",
            "trained on the 10 atlases only, for minutes on a CPU, rather than 100 epochs on 200 images on a GPU; the",
            "pre-registration is optimisation-based (our affine, then our deformable registration, image similarity",
            "only) instead of the paper's DI/DIS networks, so our deformable rows are set beside the paper's DI rows."]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("knee", "ixi"))
    ap.add_argument("--split", choices=("tuning", "report"), default="report")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true", help="only render docs/results/table1.md from the result files")
    a = ap.parse_args(argv)
    if not a.render:
        if not a.dataset:
            ap.error("--dataset is required unless --render")
        collect(a.dataset, a.split, run(a.dataset, a.split, a.threads))
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
