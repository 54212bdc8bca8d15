"""Benchmark of the registration engine against ANTs SyN (antspyx), on real data from ../shared.

    python bench/registration.py                       # full: IXI 10 atlases -> 5 targets, knee 8 -> 4
    python bench/registration.py --ixi 10 2 --knee 0 0 # reduced: IXI 10 -> 2, no knee
    python bench/registration.py --methods affine fast default   # without ANTs

Atlases and targets are different subjects (``bench.datasets.split``, seed 0). Per method and data set
it prints one row: seconds per atlas-target pair (wall clock and CPU time of this process), mean Dice
of each warped atlas label map against the target's labels, Dice of the majority vote over the atlases,
and the mean fraction of voxels with Jacobian determinant <= 0. Dice is the mean over the labels of the
target (IXI: ~145 structures; knee: femur, femoral cartilage, tibia, tibial cartilage, also shown as
bones / cartilages).

Both engines run with the same number of threads (``--threads``, default 1: on the shared 2-core
machine one thread per process is the fair and reproducible setting); the inputs are read before the
clock starts (ANTs). Ours: ``registration.register`` on all atlases of a target at once (batched), per-pair
time = total / atlases, including reading the atlases and the final warps of images and labels; the
registrations are ``bench.datasets.registered`` (cached in ``.cache/registered``, shared with the
refinement and fusion benchmarks), and the times are those recorded when they were computed. ANTs: ``ants.registration(
type_of_transform="SyN")`` (antspyx defaults: affine + SyN, Mattes MI) and ``apply_transforms`` of
the labels with ``genericLabel``; its folding is read from ``create_jacobian_determinant_image`` of the
SyN warp (outside the clock). ANTs results are cached in ``.cache/bench-registration/ants`` (they
take long), so reruns only add what is missing. Knees are synthesized into ``.cache/knee`` when missing.
Needs the bench extra (``pip install -e .[bench]``: antspyx) for the ANTs rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KNEE_GROUPS = {"bones": [1, 3], "cartilages": [2, 4]}
from bench.scoring import dice_per_label  # noqa: E402
from bench import scoring  # noqa: E402

CACHE = ROOT / ".cache" / "bench-registration"


def summarize(per_label: dict, groups: dict | None) -> dict:
    return scoring.summarize(per_label, groups, "dice")


def majority_vote(labels):
    import numpy as np
    import torch
    from MASRefineLib.fusion.common import vote_fusion
    return vote_fusion(torch.from_numpy(np.stack([lab.astype(np.int64) for lab in labels])))[0]


def run_ours(dataset, preset, target_id, atlas_ids, device):
    """(warped label arrays, folding fractions, wall s/pair, cpu s/pair) for one target, from the
    registrations shared by the benchmarks (``bench.datasets.registered``: computed once, then cached)."""
    from bench.datasets import registered
    from MASRefineLib.warped import WarpedSet
    stage = "affine" if preset == "affine" else "deformable"
    ws = WarpedSet.load(registered(dataset, target_id, atlas_ids, stage, "default" if preset == "affine" else preset,
                                   device=device))
    if ws.failed:
        print(f"  warning: {preset}: failed atlases {ws.failed}", file=sys.stderr)
    t = ws.info["bench"]
    return [a.label for a in ws.atlases], [a.info["folding_fraction"] for a in ws.atlases], \
        t["wall_s_per_pair"], t["cpu_s_per_pair"]


def run_ants_pair(cache_dir: Path, target_path: Path, atlas_id: str, img_path: Path, lab_path: Path):
    """ANTs SyN of one atlas to the target, cached: (label array (z, y, x), folding, wall s, cpu s)."""
    import numpy as np
    import SimpleITK as sitk
    out_lab = cache_dir / f"{atlas_id}_label.nii.gz"
    out_info = cache_dir / f"{atlas_id}.json"
    if not (out_lab.exists() and out_info.exists()):
        import ants
        from MASRefineLib.imageio import atomic_write_text
        fixed = ants.image_read(str(target_path))
        moving = ants.image_read(str(img_path))
        moving_lab = ants.image_read(str(lab_path))
        t0, c0 = time.perf_counter(), time.process_time()
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
        warped = ants.apply_transforms(fixed, moving_lab, reg["fwdtransforms"], interpolator="genericLabel")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        jac = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0], do_log=False)
        folding = float((jac.numpy() <= 0).mean())
        cache_dir.mkdir(parents=True, exist_ok=True)
        ants.image_write(warped, str(out_lab))
        atomic_write_text(json.dumps({"wall": wall, "cpu": cpu, "folding": folding}), out_info)
    info = json.loads(out_info.read_text())
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out_lab))).astype(np.int64)
    return lab, info["folding"], info["wall"], info["cpu"]


def bench_dataset(name, cases, atlas_ids, target_ids, methods, device, groups, rows, tag):
    import numpy as np
    import SimpleITK as sitk
    acc = {m: {"wall": [], "cpu": [], "dice": [], "mv": [], "fold": [], "mv_groups": {g: [] for g in groups or {}},
               "pair_groups": {g: [] for g in groups or {}}} for m in methods}
    for tid in target_ids:
        tp, tlp = cases(tid)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tlp))).astype(np.int64)
        values = sorted(set(np.unique(ref).tolist()) - {0})
        for m in methods:
            if m == "ants":
                res = [run_ants_pair(CACHE / "ants" / name / tid, tp, aid, *cases(aid)) for aid in atlas_ids]
                labels = [r[0] for r in res]
                fold = [r[1] for r in res]
                wall, cpu = float(np.mean([r[2] for r in res])), float(np.mean([r[3] for r in res]))
            else:
                labels, fold, wall, cpu = run_ours(name, m, tid, atlas_ids, device)
            pair = [summarize(dice_per_label(lab.astype(np.int64), ref, values), groups) for lab in labels]
            mv = summarize(dice_per_label(majority_vote(labels).astype(np.int64), ref, values), groups)
            a = acc[m]
            a["wall"].append(wall)
            a["cpu"].append(cpu)
            a["dice"].append(float(np.mean([p["dice"] for p in pair])))
            a["mv"].append(mv["dice"])
            a["fold"].append(float(np.mean(fold)))
            for g in groups or {}:
                a["mv_groups"][g].append(mv[g])
                a["pair_groups"][g].append(float(np.nanmean([p[g] for p in pair])))
            print(f"  {name} target {tid} {m:>8}: {wall:6.2f} s/pair ({cpu:6.2f} cpu)  dice {a['dice'][-1]:.4f}  "
                  f"MV {mv['dice']:.4f}  folding {a['fold'][-1]:.5f}", flush=True)
    for m in methods:
        a = acc[m]
        row = {"data": name, "method": m, "pairs": len(target_ids) * len(atlas_ids),
               "s_pair": float(np.mean(a["wall"])), "cpu_pair": float(np.mean(a["cpu"])),
               "dice": float(np.mean(a["dice"])), "mv": float(np.mean(a["mv"])), "folding": float(np.mean(a["fold"]))}
        for g in groups or {}:
            row[f"mv_{g}"] = float(np.mean(a["mv_groups"][g]))
        rows.append(row)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"results-{tag}.json").write_text(json.dumps(rows, indent=1))


def print_table(rows):
    print()
    print(f"{'data':<6} {'method':<9} {'pairs':>5} {'s/pair':>7} {'cpu/pair':>8} {'x ANTs':>6} {'Dice':>6} "
          f"{'MV Dice':>7} {'MV bones':>8} {'MV cart.':>8} {'folding':>8}")
    ants = {r["data"]: r for r in rows if r["method"] == "ants"}
    for r in rows:
        speed = f"{ants[r['data']]['cpu_pair'] / r['cpu_pair']:.1f}" if r["data"] in ants else "-"
        b = f"{r['mv_bones']:.4f}" if "mv_bones" in r else "-"
        c = f"{r['mv_cartilages']:.4f}" if "mv_cartilages" in r else "-"
        print(f"{r['data']:<6} {r['method']:<9} {r['pairs']:>5} {r['s_pair']:>7.2f} {r['cpu_pair']:>8.2f} {speed:>6} "
              f"{r['dice']:>6.4f} {r['mv']:>7.4f} {b:>8} {c:>8} {r['folding']:>8.5f}")
    print("s/pair: wall clock; cpu/pair: CPU time of the process; x ANTs: ANTs cpu/pair over the method's.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ixi", nargs=2, type=int, default=[10, 5], metavar=("ATLASES", "TARGETS"))
    p.add_argument("--knee", nargs=2, type=int, default=[8, 4], metavar=("ATLASES", "TARGETS"))
    p.add_argument("--methods", nargs="+", default=["affine", "fast", "default", "accurate", "ants"],
                   choices=["affine", "fast", "default", "accurate", "ants"])
    p.add_argument("--threads", type=int, default=1, help="threads for torch and ITK (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--table", nargs="+", metavar="JSON",
                   help="only print the table of earlier runs' results files (.cache/bench-registration/results-*.json)")
    args = p.parse_args(argv)
    if args.table:
        print_table([r for f in args.table for r in json.loads(Path(f).read_text())])
        return
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # before ITK/ANTs load
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    from bench.datasets import ixi_case, ixi_subjects, knee_case, knee_dataset, knee_subjects, split

    rows = []
    tag = f"ixi{args.ixi[0]}x{args.ixi[1]}-knee{args.knee[0]}x{args.knee[1]}-{'-'.join(args.methods)}"
    if args.ixi[1] > 0:
        atl, tgt = split(ixi_subjects(), args.ixi[0], args.ixi[1], seed=0)
        print(f"IXI: {len(atl)} atlases -> {len(tgt)} targets", flush=True)
        bench_dataset("ixi", ixi_case, atl, tgt, args.methods, args.device, None, rows, tag)
    if args.knee[1] > 0:
        atl, tgt = split(knee_subjects(), args.knee[0], args.knee[1], seed=0)
        knee_dataset(atl + tgt)
        print(f"knee: {len(atl)} atlases -> {len(tgt)} targets", flush=True)
        bench_dataset("knee", knee_case, atl, tgt, args.methods, args.device, KNEE_GROUPS, rows, tag)
    print_table(rows)


if __name__ == "__main__":
    main()
