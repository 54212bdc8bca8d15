#!/usr/bin/env python3
"""Benchmark: the whole pipeline (``masrefine segment``) against ANTs SyN + ANTs joint label fusion.

On the same atlases and targets (different subjects; splits from bench/datasets.py):

- **MASRefine**: deformable pre-registration + refinement (IS) + VoteNet+ fusion (``--preset``), with the
  models (surrogate segmenter, VoteNet+) trained on the atlas set beforehand (training time reported
  separately, once; the per-target time is "with trained models").
- **ANTs**: ``ants.registration(type_of_transform="SyN")`` of every atlas to the target (antspyx
  defaults), labels warped with ``genericLabel``, then ``ants.joint_label_fusion`` (ANTs defaults: beta 4,
  patch radius 2, search radius 3) inside the union of the warped labels dilated by 3 voxels.

Prints one table: per method, Dice / surface Dice (0.7 mm) per label group (knee: bone, cartilage; IXI:
mean over all labels), ASD, wall and CPU seconds per target (CPU: this process, so a side slowed by a
neighbour on a shared machine is still compared fairly); then MASRefine's seconds per stage and the
speed-up. Per-target results of both sides are cached in ``.cache/bench-pipeline/`` (they take long);
MASRefine's under a digest of its settings and trained models, so a changed model is rerun. Rerun to add
targets. ``--only ants`` and ``--only masrefine`` in two processes use both cores; a last run without
``--only`` prints the table from the cache.

    .venv/bin/python bench/pipeline.py --dataset knee --atlases 10 --targets 3
    .venv/bin/python bench/pipeline.py --dataset ixi --atlases 10 --targets 5
    .venv/bin/python bench/pipeline.py --dataset knee --only masrefine     # MASRefine only
    .venv/bin/python bench/pipeline.py --dataset knee --atlases 8 --targets 2 --threads 1 --only ants &
    .venv/bin/python bench/pipeline.py --dataset knee --atlases 8 --targets 2 --threads 1 --only masrefine

Needs the bench extra for ANTs: ``.venv/bin/pip install -e '.[bench]'`` (antspyx).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import datasets  # noqa: E402
from MASRefineLib.imageio import atomic_write_text, read_label  # noqa: E402
from MASRefineLib.metrics import evaluate  # noqa: E402

CACHE = ROOT / ".cache" / "bench-pipeline"


def ants_segment(target: Path, atlases: list[tuple[str, Path, Path]], out: Path, threads: int) -> dict:
    """ANTs SyN of every atlas to the target + ANTs JLF; cached in ``out`` (seg.nii.gz + timing.json)."""
    seg_path, info_path = out / "ants_jlf.nii.gz", out / "ants.json"
    if seg_path.exists() and info_path.exists():
        return json.loads(info_path.read_text())
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants
    out.mkdir(parents=True, exist_ok=True)
    fixed = ants.image_read(str(target))
    imgs, labs = [], []
    c0, t0 = time.process_time(), time.perf_counter()
    for aid, img_p, lab_p in atlases:
        print(f"  ANTs SyN {aid} -> {target.name}", file=sys.stderr, flush=True)
        moving = ants.image_read(str(img_p))
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
        imgs.append(reg["warpedmovout"])
        labs.append(ants.apply_transforms(fixed, ants.image_read(str(lab_p)), reg["fwdtransforms"],
                                          interpolator="genericLabel"))
    t_reg = time.perf_counter() - t0
    t1 = time.perf_counter()
    union = labs[0].numpy() > 0
    for lab in labs[1:]:
        union |= lab.numpy() > 0
    from scipy import ndimage
    mask = fixed.new_image_like(ndimage.binary_dilation(union, iterations=3).astype(np.float32))
    print(f"  ANTs joint label fusion ({len(imgs)} atlases)", file=sys.stderr, flush=True)
    jlf = ants.joint_label_fusion(fixed, mask, atlas_list=imgs, label_list=labs)
    t_jlf = time.perf_counter() - t1
    ants.image_write(jlf["segmentation"], str(seg_path))
    info = {"seconds_register": t_reg, "seconds_jlf": t_jlf, "seconds": t_reg + t_jlf,
            "cpu_seconds": time.process_time() - c0, "threads": threads}
    atomic_write_text(json.dumps(info, indent=1), info_path)
    return info


def score(pred: Path, truth: Path, groups) -> dict:
    import SimpleITK as sitk
    from MASRefineLib.imageio import resample_label
    from MASRefineLib.geometry import Grid
    p, r = read_label(pred, allow_empty=True), read_label(truth)
    if not Grid.from_image(p).isclose(Grid.from_image(r)):
        p = resample_label(sitk.Cast(p, sitk.sitkUInt16), Grid.from_image(r))
    ev = evaluate(p, r, groups=groups)
    return {g: {"dice": s.dice, "surface_dice": s.surface_dice, "asd_mm": s.asd_mm, "hd95_mm": s.hd95_mm}
            for g, s in list(ev.groups.items()) + [("mean", ev.mean)]}


def run_digest(opts_json: dict, models_dir: Path) -> str:
    """Digest of the run settings, the trained model files and the library's source: the key of a cached
    MASRefine row (a row measured with older code, e.g. before a speed-up, is not reused)."""
    h = hashlib.sha1(json.dumps(opts_json, sort_keys=True).encode())
    for f in sorted((ROOT / "MASRefineLib").rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    for f in sorted(Path(models_dir).glob("*.safetensors")):
        if "checkpoint" not in f.name:
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:10]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("knee", "ixi"), default="knee")
    ap.add_argument("--atlases", type=int, default=10)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--preset", choices=("fast", "default", "accurate"), default="default")
    ap.add_argument("--refine", choices=("none", "I", "IS"), default="IS",
                    help="MASRefine's refinement (default IS, the issue's configuration)")
    ap.add_argument("--fusion", choices=("pv", "wv", "jlf", "staple", "votenet"), default="votenet",
                    help="MASRefine's label fusion (default votenet, the issue's configuration)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and ITK (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("masrefine", "ants"), default=None,
                    help="run one side only (two processes can then share the cores); the table uses both "
                         "sides' cached per-target results")
    ap.add_argument("--target-index", type=int, default=None, metavar="K",
                    help="run only the K-th target (1-based) of the split, so that two processes can run two targets "
                         "side by side at equal load; rerun without it to print the table of all cached targets")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from MASRefineLib.device import resolve_device
    from MASRefineLib.manifest import read_manifest
    from MASRefineLib.pipeline import SegmentOptions, ensure_models, segment

    if a.dataset == "knee":
        ids = datasets.knee_subjects()
        groups = {"bone": [1, 3], "cartilage": [2, 4]}
        case = datasets.knee_case
    else:
        ids = datasets.ixi_subjects()
        groups = None
        case = datasets.ixi_case
    atlas_ids, target_ids = datasets.split(ids, a.atlases, a.targets, seed=a.seed)
    aset = datasets.make_atlas_set(a.dataset, atlas_ids)
    work = CACHE / f"{a.dataset}-{aset.root.name}"
    dev = resolve_device(a.device)

    # models, trained once on the atlas set
    opts = SegmentOptions(prereg="deformable", refine=a.refine, fusion=a.fusion, device=a.device, preset=a.preset,
                          seed=a.seed, threads=a.threads)
    print_progress = datasets.progress_printer(20.0)
    t0 = time.perf_counter()
    fallbacks: list[str] = []
    if a.only != "ants":
        ensure_models(aset, opts, dev, print_progress, fallbacks)
    t_models = time.perf_counter() - t0
    for f in fallbacks:
        print(f"note: {f}", file=sys.stderr)

    digest = run_digest(opts.to_json(), aset.models_dir)
    rows = []
    if a.target_index is not None:
        if not 1 <= a.target_index <= len(target_ids):
            ap.error(f"--target-index must be between 1 and --targets ({len(target_ids)})")
        target_ids = [target_ids[a.target_index - 1]]
    for tid in target_ids:
        img_p, lab_p = case(tid)
        print(f"target {tid}", file=sys.stderr, flush=True)
        config = "" if (a.refine, a.fusion) == ("IS", "votenet") else f"-{a.refine}-{a.fusion}"
        out = work / tid / f"masrefine-{a.preset}{config}"
        # finished targets are not rerun, unless the settings or the trained models changed
        row_path = work / tid / f"masrefine-{a.preset}-{digest}-row.json"
        if row_path.exists():
            rows.append(json.loads(row_path.read_text()))
        elif a.only != "ants":
            c0 = time.process_time()
            r = segment(img_p, aset.root, out, SegmentOptions(**{**opts.to_json(), "train_missing": False}),
                        truth=None, progress=print_progress)
            summary = read_manifest(r["manifest"])["summary"]
            secs = summary["seconds"]
            for f in summary.get("fallbacks", []):
                print(f"note: {f}", file=sys.stderr)
            rows.append({"method": "MASRefine", "target": tid, "seconds": sum(secs.values()), "stages": secs,
                         "cpu_seconds": time.process_time() - c0, "cpu_stages": summary.get("cpu_seconds", {}),
                         "fusion": summary.get("fusion"), "stage": summary.get("stage"),
                         "metrics": score(Path(r["fused"]), lab_p, groups)})
            atomic_write_text(json.dumps(rows[-1], indent=1, default=float), row_path)
        have_ants = (work / tid / "ants.json").exists()
        if a.only != "masrefine" or have_ants:
            atl = [(i, aset.image_path(i), aset.label_path(i)) for i in aset.ids]
            info = ants_segment(Path(img_p), atl, work / tid, a.threads)
            rows.append({"method": "ANTs SyN + JLF", "target": tid, "seconds": info["seconds"],
                         "cpu_seconds": info.get("cpu_seconds", float("nan")), "stages": info,
                         "metrics": score(work / tid / "ants_jlf.nii.gz", lab_p, groups)})

    gnames = list(groups) if groups else ["mean"]
    print()
    print(f"{a.dataset}: {len(atlas_ids)} atlases -> {len(target_ids)} targets (different subjects), preset "
          f"{a.preset}, {a.threads} threads, device {dev}")
    head = f"{'method':<18}" + "".join(f"{'Dice ' + g:>16}{'SD ' + g:>16}{'ASD ' + g:>14}" for g in gnames) + \
        f"{'s/target':>10}{'cpu s':>8}"
    print(head)
    print("-" * len(head))
    for method in ("MASRefine", "ANTs SyN + JLF"):
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        line = f"{method:<18}"
        for g in gnames:
            for key, w, sc in (("dice", 16, 100), ("surface_dice", 16, 100), ("asd_mm", 14, 1)):
                v = [r["metrics"][g][key] for r in rs]
                line += f"{np.mean(v) * sc:>{w - 7}.2f} ({np.std(v) * sc:4.2f})"
        line += f"{np.mean([r['seconds'] for r in rs]):>10.0f}{np.mean([r.get('cpu_seconds', np.nan) for r in rs]):>8.0f}"
        print(line)
    ours = [r for r in rows if r["method"] == "MASRefine"]
    if not ours:
        return 0
    print(f"MASRefine ran: {sorted({r['stage'] for r in ours})}, fusion {sorted({r['fusion'] for r in ours})}")
    stages = {k: np.mean([r["stages"].get(k, 0.0) for r in ours]) for k in ours[0]["stages"]}
    print("MASRefine seconds per stage (mean per target): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    if all(r.get("cpu_stages") for r in ours):
        cpu = {k: np.mean([r["cpu_stages"].get(k, 0.0) for r in ours]) for k in ours[0]["cpu_stages"]}
        print("MASRefine CPU seconds per stage (mean per target): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    print(f"model training (once per atlas set): {t_models:.0f} s")
    theirs = [r for r in rows if r["method"] != "MASRefine"]
    if theirs:
        def ratio(key):
            return np.mean([r.get(key, np.nan) for r in theirs]) / np.mean([r.get(key, np.nan) for r in ours])
        print(f"speed-up vs ANTs: {ratio('seconds'):.1f}x wall clock, {ratio('cpu_seconds'):.1f}x CPU time")
    atomic_write_text(json.dumps(rows, indent=1, default=float), work / f"results-{a.preset}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
