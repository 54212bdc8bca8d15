"""Greedy-style optimiser against our default and against greedy itself (issue 21), on tuning subjects only.

One tuning target of ``--dataset`` (ixi, default IXI213-HH-1642; or knee, default its first tuning target;
``benchmark_split(dataset, "tuning")``) and the first ``--atlases`` tuning atlases; one thread (torch and ITK); per
atlas the warped-label Dice (mean over the target's labels, and per group on knees: bones, cartilages;
bench/scoring.py) and the CPU seconds of each method:

- ``default``: our `default` preset (affine + Adam deformable), all atlases in one batched ``register`` call;
- ``greedy-style``: our `greedy` preset (our affine + ``deform_optimizer="greedy"`` with greedy's documented MRI
  parameters: levels 4, 2, 1 v x 100, 50, 10 iterations, 5-voxel NCC window, sigmas 1.732 / 0.7071 voxels, step
  1 voxel), one batched call;
- ``greedy-style-coarse``: the same without greedy's last level (levels 4, 2 v x 100, 50 iterations): what the
  greedy-style algorithm gives when the finest grid is left to refinement, at a fraction of the cost;
- ``greedy-style-2v``: greedy's schedule one octave coarser (levels 8, 4, 2 v x 100, 50, 10);
- ``greedy``: the greedy tool itself (bench/peers.py ``greedy_register``: moments, affine, deformable, label
  reslicing), one atlas at a time.

For the batched calls the CPU seconds per atlas are the call's process CPU time divided by the number of atlases
(the engine's `seconds` per atlas in the report is wall-clock and shared). Writes
``docs/results/registration/greedy-style-<target>.json`` and prints a table.

Usage: ``.venv/bin/python bench/greedy_style.py [--dataset ixi|knee] [--target ID] [--atlases 3] [--methods default,greedy-style,greedy]``
(the knee results are written as ``greedy-style-knee-<target>.json``)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.datasets import REPORT_SUBJECTS, benchmark_split, dataset_case, make_atlas_set  # noqa: E402
from bench.scoring import dice_per_label, summarize  # noqa: E402

OUT = ROOT / "docs" / "results" / "registration"
METHODS = ("default", "greedy-style", "greedy-style-coarse", "greedy-style-2v", "greedy")
GROUPS = {"knee": {"bones": [1, 3], "cartilages": [2, 4]}, "ixi": None}
# method -> (registration preset, overrides)
OURS = {"default": ("default", {}), "greedy-style": ("greedy", {}),
        "greedy-style-coarse": ("greedy", {"deform_shrink": (4.0, 2.0), "control_shrink": (4.0, 2.0),
                                           "deform_iterations": (100, 50), "deform_lr": (1.0, 1.0)}),
        # greedy's schedule one octave up (levels 8, 4, 2 v): on the 0.7 mm knee grid its finest level is 1.4 mm,
        # about as many voxels as an IXI brain at 2 mm, where greedy's own 1 v level costs ~6x our default
        "greedy-style-2v": ("greedy", {"deform_shrink": (8.0, 4.0, 2.0), "control_shrink": (8.0, 4.0, 2.0),
                                       "deform_min_unit_mm": 0.0})}
# the schedules above as they were measured (before the greedy preset's 1.4 mm floor, deform_min_unit_mm): with the
# floor, "greedy-style" on a 0.7 mm knee is "greedy-style-2v"; on a 2 mm brain nothing changes
OURS["greedy-style-coarse"][1]["deform_min_unit_mm"] = 0.0


def _ours(dataset: str, method: str, target: Path, atlas_ids: list[str]) -> tuple[list[np.ndarray], list[float], dict]:
    """Warped labels, CPU seconds per atlas (the batched call's CPU / n) and per-atlas info of our engine."""
    from MASRefineLib.imageio import read_image
    from MASRefineLib.registration import AtlasInput, get_params, register

    aset = make_atlas_set(dataset, atlas_ids)
    inputs = [AtlasInput(aid, load=(lambda aid=aid: aset.read(aid))) for aid in atlas_ids]
    preset, overrides = OURS[method]
    params = get_params(preset, **overrides)
    img = read_image(target)
    c0 = time.process_time()
    ws = register(img, inputs, aset.label_table, params=params, device="cpu")
    cpu = time.process_time() - c0
    if ws.failed:
        raise RuntimeError(f"{method}: failed atlases {ws.failed}")
    info = {a.id: {k: a.info[k] for k in ("similarity", "ncc", "folding_fraction") if k in a.info} for a in ws.atlases}
    return [np.asarray(a.label) for a in ws.atlases], [cpu / len(atlas_ids)] * len(atlas_ids), \
        {"params": params.to_json(), "atlas_info": info, "cpu_s_call": cpu}


def _greedy(case, target: Path, atlas_ids: list[str]) -> tuple[list[np.ndarray], list[float], dict]:
    from bench.peers import GREEDY, greedy_register, versions

    labels, cpus = [], []
    for aid in atlas_ids:
        img_p, lab_p = case(aid)
        c0 = time.process_time()
        _, labs, _ = greedy_register(target, [(aid, img_p, lab_p)], threads=1)
        cpus.append(time.process_time() - c0)
        labels.append(labs[0])
    return labels, cpus, {"params": GREEDY, "versions": versions()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("ixi", "knee"), default="ixi")
    ap.add_argument("--target", default=None, help="a tuning target (default: IXI213-HH-1642 / the first knee one)")
    ap.add_argument("--atlases", type=int, default=3, help="the first N tuning atlases")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    ds = args.dataset
    atlases, targets = benchmark_split(ds, "tuning")
    if args.target is None:
        args.target = "IXI213-HH-1642" if ds == "ixi" else targets[0]
    if args.target in REPORT_SUBJECTS[ds] or args.target not in targets:
        raise SystemExit(f"{args.target} is not a {ds} tuning target ({', '.join(targets)})")
    atlas_ids = atlases[:args.atlases]
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {set(methods) - set(METHODS)} (choose from {METHODS})")

    import os
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    from MASRefineLib.experiment import code_version
    from MASRefineLib.jsonio import read_json, write_json

    case, _ = dataset_case(ds)
    target_img, target_lab = case(args.target)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(target_lab)))
    result = {"dataset": ds, "split": "tuning", "target": args.target, "atlases": atlas_ids, "threads": 1,
              "code": code_version(), "torch": torch.__version__, "methods": {}}
    out = OUT / (f"greedy-style-{args.target}.json" if ds == "ixi" else f"greedy-style-knee-{args.target}.json")
    old = read_json(out, "result") if out.exists() else None
    if old and old.get("atlases") == atlas_ids:
        result["methods"] = {m: r for m, r in old["methods"].items() if m not in methods}  # keep the others
    for m in methods:
        print(f"{time.strftime('%H:%M:%S')} {m} ...", file=sys.stderr, flush=True)
        labs, cpus, extra = _greedy(case, target_img, atlas_ids) if m == "greedy" else \
            _ours(ds, m, target_img, atlas_ids)
        per = [summarize(dice_per_label(lab, ref), GROUPS[ds]) for lab in labs]
        dices = [p["all"] for p in per]
        groups = {g: float(np.mean([p[g] for p in per])) for g in (GROUPS[ds] or {})}
        result["methods"][m] = {"dice": dict(zip(atlas_ids, dices)), "cpu_s": dict(zip(atlas_ids, cpus)),
                                "mean_dice": float(np.mean(dices)), "mean_cpu_s": float(np.mean(cpus)),
                                "group_dice": groups, **extra}
        OUT.mkdir(parents=True, exist_ok=True)
        write_json(result, out)  # after every method: a partial result survives a stopped run

    gnames = list(GROUPS[ds] or {})
    print(f"{ds} tuning target {args.target}, atlases {', '.join(atlas_ids)}, 1 thread; Dice = mean over labels")
    print(f"| method | {' | '.join(atlas_ids)} | mean Dice | {''.join(g + ' | ' for g in gnames)}CPU s / atlas |")
    print("|---" * (len(atlas_ids) + 3 + len(gnames)) + "|")
    for m, r in result["methods"].items():
        cells = " | ".join(f"{r['dice'][a]:.4f}" for a in atlas_ids)
        gs = "".join(f"{r.get('group_dice', {}).get(g, float('nan')):.4f} | " for g in gnames)
        print(f"| {m} | {cells} | {r['mean_dice']:.4f} | {gs}{r['mean_cpu_s']:.1f} |")
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
