#!/usr/bin/env python3
"""Benchmark: label fusion methods on identical warped atlases, with ANTs joint label fusion as the peer.

For each target (subjects disjoint from the atlases; splits from bench/datasets.py) the atlases are
registered once with the registration engine (``--prereg``, ``--preset``; cached in
``.cache/fusion-bench/``) and every method fuses *the same* warped atlases:

- ``pv``, ``wv``, ``jlf``, ``staple``, ``votenet``: :func:`MASRefineLib.fusion.fuse` with defaults;
- ``ants``: ANTs' ``antsJointFusion`` itself with ANTs' defaults, as bench/peers.py runs it for every
  benchmark (:func:`bench.peers.ants_joint_fusion`: intensities on ANTs' scale, our JLF's mask rule, its own
  label output).

VoteNet+ is trained on the atlas set alone (leave-one-out registrations with the same engine and
settings), once, and stored in the atlas set's ``models/``; its calibration (ECE before/after Platt
scaling, on held-out pairs) is printed.

Each method runs in its own process (so its peak memory can be measured: peak RSS of the process
during fusion minus the RSS before it) with ``--threads`` threads (torch / ITK). Reported: mean Dice
(IXI: all labels of the target; knee: bones 1, 3 and cartilages 2, 4), wall seconds and CPU seconds per
target, peak memory, and the Dice agreement of our JLF with ANTs' JLF. Results are cached per target
and method; rerun to add targets or methods.

    .venv/bin/python bench/fusion.py --dataset ixi --atlases 10 --targets 5
    .venv/bin/python bench/fusion.py --dataset knee --atlases 8 --targets 4
    .venv/bin/python bench/fusion.py --dataset ixi --targets 2 --methods pv,jlf,ants     # reduced

Needs the bench extra for ANTs: ``.venv/bin/pip install -e '.[bench]'`` (antspyx).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.scoring import dice_per_label  # noqa: E402

CACHE = ROOT / ".cache" / "fusion-bench"
METHODS = ("pv", "wv", "staple", "jlf", "votenet", "ants")
GROUPS = {"knee": {"bones": [1, 3], "cartilages": [2, 4]}, "ixi": None}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# ------------------------------------------------------------------------------------------ worker
def worker(job: dict) -> dict:
    """Run one method on one target (in a fresh process); returns timing and memory, writes the labels."""
    threads = int(job["threads"])
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    from MASRefineLib.fusion import fuse
    from MASRefineLib.warped import target_array
    from MASRefineLib.imageio import array_to_image, read_image, write_image
    from MASRefineLib.warped import WarpedSet

    ws = WarpedSet.load(job["registered"])
    tgt = target_array(read_image(job["target"]), ws.target_grid)
    labels = np.stack([a.label for a in ws.atlases])
    if job["method"] == "ants":
        from bench import peers
        imgs = np.stack([a.image for a in ws.atlases])
        rss0 = _rss_mb("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        fused = peers.ants_joint_fusion(tgt, imgs, labels, ws.target_grid, threads)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        info = {}
    else:
        kw = {}
        if job["method"] == "votenet":
            kw["model"] = job["model"]
            kw.update(job.get("params") or {})
        rss0 = _rss_mb("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        r = fuse(ws, tgt, job["method"], device="cpu", **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        fused = r.labels
        info = {k: v for k, v in r.info.items() if isinstance(v, (int, float, str))}
    peak = _rss_mb("VmHWM") - rss0
    write_image(array_to_image(fused.astype(np.uint16), ws.target_grid), job["out"])
    return {"seconds": wall, "cpu_seconds": cpu, "peak_mb": max(0.0, peak), "threads": threads, **info}


def _inputs(job: dict) -> tuple:
    """What decides a cached result: the method, its model and parameters, and the registration folder
    (keyed by its parameter digest, so a changed registration default never reuses an old fusion)."""
    from bench import peers
    peer = json.dumps([peers.params("ants"), peers.versions().get("antspyx")]) if job["method"] == "ants" else None
    return job["method"], Path(job["registered"]).parent.name, Path(job["registered"]).name, \
        Path(job["model"]).name if job.get("model") else None, json.dumps(job.get("params") or {}, sort_keys=True), peer


def run_job(job: dict, result_path: Path) -> dict:
    jp = result_path.with_suffix(".job.json")
    if result_path.exists() and jp.exists() and _inputs(json.loads(jp.read_text())) == _inputs(job):
        return json.loads(result_path.read_text())
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(job))
    subprocess.run([sys.executable, __file__, "--worker", str(jp)], check=True)
    return json.loads(result_path.read_text())


# ------------------------------------------------------------------------------------------ scoring
def summary(pred: np.ndarray, truth: np.ndarray, groups) -> dict[str, float]:
    d = dice_per_label(pred.astype(np.int64), truth.astype(np.int64))
    if groups is None:
        return {"all labels": float(np.mean(list(d.values())))}
    return {g: float(np.mean([d.get(v, 0.0) for v in vs])) for g, vs in groups.items()}


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", choices=("ixi", "knee"), default="ixi")
    ap.add_argument("--atlases", type=int, default=None, help="number of atlases (ixi 10, knee 8)")
    ap.add_argument("--targets", type=int, default=None, help="number of targets (ixi 5, knee 4)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--prereg", choices=("affine", "deformable"), default="deformable")
    ap.add_argument("--preset", choices=("fast", "default", "accurate"), default="default",
                    help="registration preset (and VoteNet+ training length)")
    ap.add_argument("--votenet-targets", type=int, default=None, help="leave-one-out targets for VoteNet+ training")
    ap.add_argument("--votenet-iterations", type=int, default=None,
                    help="VoteNet+ training iterations (default: the preset's)")
    ap.add_argument("--votenet-search", type=int, default=None,
                    help="VoteNet+ fusion search radius in voxels (default: the model's, 0)")
    ap.add_argument("--threads", type=int, default=1, help="threads per method (torch / ITK; default 1)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.worker:
        job = json.loads(Path(a.worker).read_text())
        res = worker(job)
        Path(job["result"]).write_text(json.dumps(res, indent=1))
        return 0

    import SimpleITK as sitk
    import torch
    torch.set_num_threads(a.threads)
    from bench import datasets
    from MASRefineLib.training import train_for_atlas_set

    methods = [m for m in a.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        ap.error(f"unknown methods {sorted(bad)}")
    n_atl = a.atlases or (10 if a.dataset == "ixi" else 8)
    n_tgt = a.targets or (5 if a.dataset == "ixi" else 4)
    ids = datasets.ixi_subjects() if a.dataset == "ixi" else datasets.knee_subjects()
    case = datasets.ixi_case if a.dataset == "ixi" else datasets.knee_case
    atlas_ids, target_ids = datasets.split(ids, n_atl, n_tgt, seed=a.seed)
    aset = datasets.make_atlas_set(a.dataset, atlas_ids)
    work = CACHE / f"{aset.root.name}-{a.prereg}-{a.preset}"
    work.mkdir(parents=True, exist_ok=True)
    groups = GROUPS[a.dataset]

    # VoteNet+: trained on the atlas set alone, once
    model = None
    itag = f"-i{a.votenet_iterations}" if a.votenet_iterations else ""
    vtag = itag + (f"-s{a.votenet_search}" if a.votenet_search is not None else "")
    vparams = {"search_radius": a.votenet_search} if a.votenet_search is not None else {}
    # result files and table rows: VoteNet+ variants side by side
    stems = {m: m + (vtag if m == "votenet" else "") for m in methods}
    if "votenet" in methods:
        name = f"votenet-{a.prereg}-{a.preset}-fusionbench{itag}"
        model = Path(aset.models_dir) / f"{name}.json"
        if not model.exists():
            print(f"training VoteNet+ on {aset.root.name} (leave-one-out {a.prereg} registrations)", file=sys.stderr,
                  flush=True)
            # the leave-one-out registrations are kept (keyed by their parameters), so retraining skips them
            loo = CACHE / "loo" / f"{aset.root.name}-{a.prereg}-{a.preset}-{datasets.params_digest(a.prereg, a.preset)}"
            train_for_atlas_set(aset, prereg=a.prereg, preset=a.preset, device="cpu", name=name, seed=a.seed,
                                targets=a.votenet_targets, iterations=a.votenet_iterations, cache=loo)
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    agreement = []
    for tid in target_ids:
        img_p, lab_p = case(tid)
        reg = datasets.registered(a.dataset, tid, atlas_ids, a.prereg, a.preset)  # shared with the other benchmarks
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(lab_p))).astype(np.int64)
        preds = {}
        for m in methods:
            stem = stems[m]
            out = work / tid / f"{stem}.nii.gz"
            res = run_job({"method": m, "registered": str(reg), "target": str(img_p), "out": str(out),
                           "result": str(work / tid / f"{stem}.json"), "threads": a.threads,
                           "model": str(model) if model else None, "params": vparams if m == "votenet" else {}},
                          work / tid / f"{stem}.json")
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(np.int64)
            preds[m] = pred
            row = {"target": tid, **summary(pred, truth, groups), **res}
            rows[m].append(row)
            print(f"  {tid} {m:8s} " + " ".join(f"{k} {v:.4f}" for k, v in summary(pred, truth, groups).items())
                  + f"  {res['seconds']:.1f} s", file=sys.stderr, flush=True)
        if "jlf" in preds and "ants" in preds:
            agreement.append(np.mean(list(dice_per_label(preds["jlf"], preds["ants"]).values())))
    # table
    keys = ["all labels"] if groups is None else list(groups)
    print(f"\nLabel fusion on {a.dataset}: {n_atl} atlases -> {n_tgt} targets, {a.prereg} registration "
          f"({a.preset}), {a.threads} thread(s) per method")
    head = "| method | " + " | ".join(f"Dice {k}" for k in keys) + " | s / target | CPU s / target | peak MB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for m in methods:
        r = rows[m]
        dice = " | ".join(f"{np.mean([x[k] for x in r]):.4f} ± {np.std([x[k] for x in r]):.4f}" for k in keys)
        print(f"| {stems[m]} | {dice} | {np.mean([x['seconds'] for x in r]):.1f} | {np.mean([x['cpu_seconds'] for x in r]):.1f} "
              f"| {np.max([x['peak_mb'] for x in r]):.0f} |")
    if agreement:
        print(f"\nour JLF vs ANTs JLF: mean Dice agreement {np.mean(agreement):.4f}; speed-up "
              f"{np.mean([x['seconds'] for x in rows['ants']]) / np.mean([x['seconds'] for x in rows['jlf']]):.1f}x wall, "
              f"{np.mean([x['cpu_seconds'] for x in rows['ants']]) / np.mean([x['cpu_seconds'] for x in rows['jlf']]):.1f}x CPU")
    if model is not None:
        rel = json.loads(model.read_text())["reliability"]
        print(f"VoteNet+ calibration (held-out pairs, band voxels): ECE {rel['ece_before']:.4f} uncalibrated -> "
              f"{rel['ece_after']:.4f} Platt (a {json.loads(model.read_text())['platt']['a']:.3f}, "
              f"b {json.loads(model.read_text())['platt']['b']:.3f})")
    out = work / "results.json"
    out.write_text(json.dumps({"rows": rows, "agreement_jlf_ants": agreement, "atlases": atlas_ids,
                               "targets": target_ids}, indent=1, default=float))
    print(f"(results: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
