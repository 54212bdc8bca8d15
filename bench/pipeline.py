#!/usr/bin/env python3
"""Benchmark (the yardstick): ``masrefine segment`` against its peers on tuning or report targets.

Methods (``--methods``, all by default but the paper configuration, whose two models take CPU hours to train):

- ``masrefine``: ``segment`` with its defaults (deformable pre-registration, refinement I, JLF), as a user
  runs it (it writes every output);
- ``masrefine-fast``: ``segment --preset fast`` (what it costs in accuracy: bench/speed.py);
- ``masrefine-greedy``: ``segment --preset greedy`` (the greedy-style deformable optimiser, otherwise the
  defaults), a candidate default, run on tuning targets until they decide;
- ``masrefine-paper``: ``segment --refine IS --fusion votenet`` with models trained on the atlas set first
  (training time reported once, apart);
- ``ants-pv`` and ``ants-jlf``: ANTs SyN per atlas, then plurality vote / ``antsJointFusion``
  (bench/peers.py says exactly how; one registration serves both, and each is timed as registration +
  its fusion);
- ``greedy-jlf``: greedy affine + deformable per atlas, then our JLF.

Splits (bench/datasets.py): the 10 atlases are the seed-0 tuning atlases; ``--split tuning`` runs the 5 tuning
targets, ``--split report`` the 5 report targets, which nothing else ever looks at. Every method of a
target runs in one invocation, one after the other, each in its own process with ``--threads`` threads
(wall, CPU seconds of that process and its peak memory), so both sides of a comparison share the day and
the machine's load (the load average at the start of each is recorded).

Results are data: one JSON per target, ``docs/results/pipeline/<dataset>-<split>/<target>.json``, holding per
method the metrics per label group (Dice, surface Dice at the tolerance, ASD and HD95 with the number of labels
where they are undefined), seconds, CPU seconds, peak MB, threads, the commit, the package versions and the
key that decides whether it is rerun (a peer's parameters and package version; MASRefine's options). A target
whose method is recorded with the same key is not rerun (``--rerun`` forces it), so a run can be continued
later, target by target. Labels: the reference's (every non-zero value of the target's label map).
``bench/report.py`` renders the tables from these files; this script prints them at the end too.

    .venv/bin/python bench/pipeline.py --dataset knee --split report
    .venv/bin/python bench/pipeline.py --dataset ixi --split report
    .venv/bin/python bench/pipeline.py --dataset ixi --split tuning --methods masrefine,greedy-jlf

Needs the bench extra (``.venv/bin/pip install -e '.[bench]'``: antspyx, picsl-greedy).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import datasets, peers  # noqa: E402
from MASRefineLib.imageio import atomic_write_text  # noqa: E402

WORK = ROOT / ".cache" / "bench-pipeline"
from bench.report import LABELS, RESULTS  # noqa: E402  (the result files report.py renders)
# name -> (label in tables, the process that computes it)
METHODS = {m: (LABELS[m], {"ants-pv": "ants", "ants-jlf": "ants", "greedy-jlf": "greedy"}.get(m, m)) for m in LABELS}
DEFAULT_METHODS = ("masrefine", "ants-pv", "ants-jlf", "greedy-jlf")
GROUPS = {"knee": {"bones": [1, 3], "cartilages": [2, 4]}, "ixi": {}}
# surface Dice tolerance: the knee grid's spacing (the paper's 0.7 mm); one voxel of the 2 mm brains
TOLERANCE_MM = {"knee": 0.7, "ixi": 2.0}
FORMAT = 1  # of the result files


# each MASRefine method: its segment options besides the defaults
SEGMENT_CHOICES = {"masrefine": {}, "masrefine-fast": {"preset": "fast"}, "masrefine-greedy": {"preset": "greedy"},
                   "masrefine-paper": {"refine": "IS", "fusion": "votenet"}}


def segment_options(method: str, threads: int):
    from MASRefineLib.pipeline import SegmentOptions
    return SegmentOptions(**SEGMENT_CHOICES[method], device="cpu", threads=threads, train_missing=False)


def method_key(method: str, threads: int) -> dict:
    """What a result must have been measured with to be reused."""
    proc = METHODS[method][1]
    if proc.startswith("masrefine"):
        o = segment_options(method, threads).to_json()
        return {"options": {k: v for k, v in o.items() if k not in ("device", "threads")}, "threads": threads,
                "versions": {k: v for k, v in peers.versions().items() if k in ("torch", "SimpleITK")}}
    return {"peer": proc, "params": peers.params(proc), "versions": peers.versions(), "threads": threads}


def commit() -> str:
    """The checked-out commit, "-dirty" when a tracked file other than the result files (which this script
    itself writes while it runs) differs from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs/results")
    return head + ("-dirty" if changed else "")


# The code that decides the numbers of a row: registration, refinement, fusion, warps, losses, metrics, the
# reader and the peers' runner. A row measured with other such code is marked stale by bench/report.py and
# rerun with --rerun-stale (not by default: a change elsewhere, e.g. to input validation, keeps the rows).
NUMERIC_CODE = ("MASRefineLib/registration", "MASRefineLib/fusion", "MASRefineLib/refine.py", "MASRefineLib/warp.py",
                "MASRefineLib/fields.py", "MASRefineLib/losses.py", "MASRefineLib/segmenter.py",
                "MASRefineLib/metrics.py", "MASRefineLib/imageio.py", "MASRefineLib/pipeline.py",
                "MASRefineLib/training.py", "MASRefineLib/volume.py", "bench/peers.py")


def code_digest() -> str:
    """Digest of :data:`NUMERIC_CODE` as it is in the working tree."""
    h = hashlib.sha1()
    for entry in NUMERIC_CODE:
        p = ROOT / entry
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def models_digest(models_dir: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(Path(models_dir).glob("*.safetensors")):
        if "checkpoint" not in f.name:
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:10]


# ------------------------------------------------------------------------------------------ worker
def worker(job_path: Path) -> int:
    """One process of one target: computes label maps (``job["outputs"]``) and writes timing to ``job["result"]``."""
    job = json.loads(job_path.read_text())
    threads = int(job["threads"])
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    from MASRefineLib.imageio import array_to_image, read_image, read_label, write_image
    from MASRefineLib.geometry import Grid
    from MASRefineLib.atlas import AtlasSet

    proc, target, out = job["process"], Path(job["target"]), Path(job["out"])
    aset = AtlasSet.load(job["atlas_set"])
    atlases = [(i, aset.image_path(i), aset.label_path(i)) for i in aset.ids]
    log = lambda m: print(f"  [{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    res: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if proc.startswith("masrefine"):
        from MASRefineLib.protocol.manifest import read_manifest
        from MASRefineLib.pipeline import segment
        run_dir = out / f"{proc}-run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        r = segment(target, aset.root, run_dir, segment_options(proc, threads), progress=datasets.progress_printer(30.0))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        summary = read_manifest(r["manifest"])["summary"]
        shutil.copyfile(r["fused"], out / f"{proc}.nii.gz")
        per_atlas = {}
        for stage, suffix in (("refined", "_label.nii.gz"), ("unrefined", "_label_unrefined.nii.gz")):
            maps = {i: run_dir / "atlases" / f"{i}{suffix}" for i in aset.ids}
            if job.get("truth") and all(p.exists() for p in maps.values()):
                per_atlas[stage] = atlas_dice({i: read_label(p, allow_empty=True) for i, p in maps.items()},
                                              job["truth"], job["groups"])
        shutil.rmtree(run_dir)  # warped atlases and fields: ~150 MB per knee atlas
        res[proc] = {"seconds": wall, "cpu_seconds": cpu, "stages": summary["seconds"],
                     "cpu_stages": summary.get("cpu_seconds", {}), "fallbacks": summary.get("fallbacks", []),
                     "per_atlas_dice": per_atlas}
    else:
        from MASRefineLib.fusion import fuse
        from MASRefineLib.warped import target_array
        timg = read_image(target)
        grid = Grid.from_image(timg)
        register = peers.ants_register if proc == "ants" else peers.greedy_register
        imgs, labs, secs = register(target, atlases, threads, log=log)
        reg_wall, reg_cpu = time.perf_counter() - t0, time.process_time() - c0
        ws = peers.warped_set(grid, aset.label_table, aset.ids, imgs, labs)
        per_atlas = ({"registered": atlas_dice(dict(zip(aset.ids, labs)), job["truth"], job["groups"])}
                     if job.get("truth") else {})
        tgt = target_array(timg, grid)
        fusions = {"ants-pv": "pv", "ants-jlf": "ants", "greedy-jlf": "jlf"}
        for method, how in fusions.items():
            if METHODS[method][1] != proc:
                continue
            log(f"{method}: fusing {len(ws.atlases)} atlases")
            t1, c1 = time.perf_counter(), time.process_time()
            if how == "ants":
                fused = peers.ants_joint_fusion(tgt, np.stack([a.image for a in ws.atlases]), labs, grid, threads)
            else:
                fused = fuse(ws, tgt, how, device="cpu").labels
            fw, fc = time.perf_counter() - t1, time.process_time() - c1
            write_image(array_to_image(fused.astype(np.uint16), grid), out / f"{method}.nii.gz")
            res[method] = {"seconds": reg_wall + fw, "cpu_seconds": reg_cpu + fc,
                           "stages": {"register": reg_wall, "fuse": fw}, "cpu_stages": {"register": reg_cpu, "fuse": fc},
                           "seconds_per_atlas": secs, "per_atlas_dice": per_atlas}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    for r in res.values():
        r["peak_mb"] = peak  # of the whole process (registration and every fusion in it)
    atomic_write_text(json.dumps(res, indent=1), Path(job["result"]))
    return 0


# ------------------------------------------------------------------------------------------ scoring
def atlas_dice(labels: dict, truth: str, groups: dict) -> dict[str, dict[str, float]]:
    """Volume Dice of each warped atlas label map (sitk images or (Z, Y, X) arrays on the target grid) against
    the target's truth, per label group and over all labels ("mean"): how good the warps are before fusion."""
    import SimpleITK as sitk
    from MASRefineLib.imageio import read_label
    from bench.scoring import dice_per_label, summarize

    ref = sitk.GetArrayFromImage(read_label(truth))
    out = {}
    for aid, lab in labels.items():
        arr = sitk.GetArrayFromImage(lab) if isinstance(lab, sitk.Image) else np.asarray(lab)
        if arr.shape != ref.shape:
            continue  # truth on another grid: not scored per atlas
        out[aid] = summarize(dice_per_label(arr, ref), groups, "mean")
    return out


def score(pred: Path, truth: Path, dataset: str) -> dict:
    """Metrics per label group (and "mean" over all the reference's labels) of ``pred`` against ``truth``."""
    import SimpleITK as sitk
    from MASRefineLib.geometry import Grid
    from MASRefineLib.imageio import read_label, resample_label
    from MASRefineLib.labels import foreground_values
    from MASRefineLib.metrics import evaluate

    p, r = read_label(pred, allow_empty=True), read_label(truth)
    if not Grid.from_image(p).isclose(Grid.from_image(r)):
        p = resample_label(sitk.Cast(p, sitk.sitkUInt16), Grid.from_image(r))
    ev = evaluate(p, r, groups=GROUPS[dataset], tolerance_mm=TOLERANCE_MM[dataset], labels=foreground_values(r))
    def num(v: float):  # undefined (NaN) is null in the result files
        return None if v is None or not np.isfinite(v) else float(v)

    return {g: {"dice": num(s.dice), "surface_dice": num(s.surface_dice), "asd_mm": num(s.asd_mm),
                "hd95_mm": num(s.hd95_mm), "n_labels": len(s.labels), "n_undefined": s.n_undefined}
            for g, s in list(ev.groups.items()) + [("mean", ev.mean)]}


# ------------------------------------------------------------------------------------------ main
def result_path(dataset: str, which: str, target: str) -> Path:
    return RESULTS / f"{dataset}-{which}" / f"{target}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", choices=("knee", "ixi"), default="knee")
    ap.add_argument("--split", choices=("tuning", "report"), default="report")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--threads", type=int, default=2, help="threads of every method (default 2)")
    ap.add_argument("--targets", default=None, help="comma-separated 1-based indices of the split's targets (default all)")
    ap.add_argument("--rerun", action="store_true", help="rerun methods that already have a result with the same key")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="rerun methods whose result was measured with other numerical code (bench/pipeline.py NUMERIC_CODE)")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(Path(a.worker))
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")

    atlas_ids, target_ids = datasets.benchmark_split(a.dataset, a.split)
    if a.targets:
        target_ids = [target_ids[int(k) - 1] for k in a.targets.split(",")]
    case, _ = datasets.dataset_case(a.dataset)
    aset = datasets.make_atlas_set(a.dataset, atlas_ids)
    if "masrefine-paper" in methods:
        from MASRefineLib.device import resolve_device
        from MASRefineLib.pipeline import SegmentOptions
        from MASRefineLib.training import ensure_models
        t0 = time.perf_counter()
        ensure_models(aset, SegmentOptions(refine="IS", fusion="votenet", device="cpu", threads=a.threads),
                      resolve_device("cpu"), datasets.progress_printer(60.0))
        print(f"models of {aset.root.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    for tid in target_ids:
        img_p, lab_p = case(tid)
        rp = result_path(a.dataset, a.split, tid)
        rec = json.loads(rp.read_text()) if rp.exists() else {
            "format": FORMAT, "dataset": a.dataset, "split": a.split, "target": tid, "atlases": atlas_ids, "methods": {}}
        if rec["atlases"] != atlas_ids:
            raise SystemExit(f"{rp}: recorded with other atlases; move it away to rerun")
        keys = {m: method_key(m, a.threads) for m in methods}
        if "masrefine-paper" in keys:
            keys["masrefine-paper"]["models"] = models_digest(aset.models_dir)
        code, at = code_digest(), commit()  # of this invocation, taken before anything runs
        todo = [m for m in methods if a.rerun or rec["methods"].get(m, {}).get("key") != keys[m]
                or (a.rerun_stale and rec["methods"][m].get("code") != code)]
        procs = list(dict.fromkeys(METHODS[m][1] for m in todo))
        run_id = datetime.datetime.now().isoformat(timespec="seconds")
        for proc in procs:
            print(f"{a.dataset} {a.split} {tid}: {proc}", file=sys.stderr, flush=True)
            out = WORK / f"{a.dataset}-{a.split}" / tid
            out.mkdir(parents=True, exist_ok=True)
            job = {"process": proc, "target": str(img_p), "atlas_set": str(aset.root), "out": str(out),
                   "threads": a.threads, "result": str(out / f"{proc}.result.json"), "truth": str(lab_p),
                   "groups": GROUPS[a.dataset]}
            jp = out / f"{proc}.job.json"
            jp.write_text(json.dumps(job))
            load = os.getloadavg()[0]
            subprocess.run([sys.executable, __file__, "--worker", str(jp)], check=True)
            timing = json.loads((out / f"{proc}.result.json").read_text())
            for m, t in timing.items():
                if m not in todo:
                    continue
                rec["methods"][m] = {"label": METHODS[m][0], "key": keys[m], **t,
                                     "metrics": score(out / f"{m}.nii.gz", lab_p, a.dataset),
                                     "threads": a.threads, "cores": os.cpu_count(), "load_at_start": load,
                                     "run": run_id, "commit": at, "code": code,
                                     "versions": peers.versions(), "date": time.strftime("%Y-%m-%d")}
                rp.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(json.dumps(rec, indent=1, default=float, allow_nan=False) + "\n", rp)
    from bench import report
    print(report.render(a.dataset, a.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
