"""Does the torch registration pyramid reproduce the SimpleITK one it replaced (#20)? docs/volume.md.

    nice -n 19 .venv/bin/python bench/volume_pyramid.py [--atlases 10] [--targets 1] [--repeats 1]

1. Working images: every pyramid level of real images (IXI tuning atlases, full size, and one knee) built by the
   torch path (timed: the sum over levels of the median of ``--level-repeats`` interleaved builds) (``registration.pyramid.downsample``: avg-pool block average + the torch warp with ITK's edge rule)
   and by the old path (``sitk.BinShrink`` + ``sitk.Resample`` linear, default 0, kept below as
   :func:`legacy_downsample`): the largest absolute difference (intensities in [0, 1]) and the build time.
2. Registration: the default preset, ``--atlases`` IXI tuning atlases -> the first ``--targets`` tuning targets
   (``bench.datasets.benchmark_split("ixi", "tuning")``: never a report subject), once with each pyramid, run
   interleaved (old, new, old, new, ...) in one process with one torch thread so that the shared machine's load
   hits both alike. Per atlas: Dice (mean over the target's labels) of the warped labels; per run: wall and CPU
   seconds. ``--noise-floor 1e-6``: a third run, the torch pyramid on the target plus Gaussian noise of that size,
   says how far per-atlas Dice moves when the inputs change as little as the two pyramids differ. Prints one JSON object, with the 1-minute load average at the start and at the end.
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

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402


def legacy_downsample(image, spacing_mm: float):
    """The SimpleITK pyramid level before #20 (BinShrink by the integer factor, then linear sitk.Resample onto the
    working grid, outside 0), taking a Volume and returning a tensor like the torch one."""
    from MASRefineLib.geometry import Grid
    from MASRefineLib.registration.pyramid import working_grid
    from MASRefineLib.volume import Volume
    vol = image if isinstance(image, Volume) else Volume.from_image(image, normalise=False)
    img = vol.to_image()
    grid = vol.grid
    wg = working_grid(grid, spacing_mm)
    if wg == grid:
        return vol.tensor.float(), grid
    factors = [max(1, int(np.floor(w / s + 1e-6))) for w, s in zip(wg.spacing, grid.spacing)]
    factors = [min(f, n) for f, n in zip(factors, grid.size)]
    shrunk = sitk.BinShrink(img, factors) if max(factors) > 1 else img
    out = sitk.Resample(shrunk, wg.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert Grid.from_image(out).isclose(wg)
    return torch.from_numpy(sitk.GetArrayFromImage(out)).to(vol.device), wg


def compare_levels(paths, shrinks=(4.0, 3.0, 2.5, 2.0), repeats: int = 1) -> dict:
    from MASRefineLib.registration.pyramid import downsample
    from MASRefineLib.volume import read_image
    worst, t_new, t_old, n = 0.0, 0.0, 0.0, 0
    per = []
    for p in paths:
        vol = read_image(p)
        unit = min(vol.grid.spacing)
        for s in shrinks:
            tn, to = [], []
            for _ in range(repeats):  # interleaved; the median of each
                t0 = time.perf_counter()
                a, ga = downsample(vol, s * unit)
                t1 = time.perf_counter()
                b, gb = legacy_downsample(vol, s * unit)
                t2 = time.perf_counter()
                tn.append(t1 - t0)
                to.append(t2 - t1)
            assert ga == gb
            d = float((a - b).abs().max())
            worst = max(worst, d)
            t_new, t_old, n = t_new + float(np.median(tn)), t_old + float(np.median(to)), n + 1
            per.append({"file": Path(p).name, "shrink": s, "size": list(ga.size), "max_abs_diff": d,
                        "mean_abs_diff": float((a - b).abs().mean())})
    return {"levels": n, "repeats": repeats, "max_abs_diff": worst, "torch_s": round(t_new, 3),
            "sitk_s": round(t_old, 3),
            "per_level": per}


def dice_mean(pred: np.ndarray, ref: np.ndarray) -> float:
    vals = [v for v in np.unique(ref) if v != 0]
    out = []
    for v in vals:
        a, b = pred == v, ref == v
        s = int(a.sum()) + int(b.sum())
        out.append(2.0 * int((a & b).sum()) / s if s else 1.0)
    return float(np.mean(out))


def register_once(target_path, atlas_ids, aset, legacy: bool, noise: float = 0.0) -> dict:
    import MASRefineLib.registration.pyramid as pyramid
    from MASRefineLib.registration import AtlasInput, register
    from MASRefineLib.volume import read_image
    saved = pyramid.downsample
    if legacy:
        pyramid.downsample = legacy_downsample
    try:
        inputs = [AtlasInput(a, load=(lambda a=a: aset.read(a))) for a in atlas_ids]
        t0, c0 = time.perf_counter(), time.process_time()
        target = read_image(target_path)
        if noise:  # the noise floor: the same registration of a target changed at the level of float32 rounding
            g = torch.Generator().manual_seed(1)
            target = type(target)(target.tensor + noise * torch.randn(target.tensor.shape, generator=g), target.grid)
        ws = register(target, inputs, aset.label_table, params="default", device="cpu")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        pyramid.downsample = saved
    return {"wall_s": wall, "cpu_s": cpu, "labels": {a.id: a.label.copy() for a in ws.atlases},
            "matrices": {a.id: np.asarray(a.info["matrix"]) for a in ws.atlases}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlases", type=int, default=10)
    ap.add_argument("--targets", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="old/new pairs per target")
    ap.add_argument("--skip-registration", action="store_true")
    ap.add_argument("--level-repeats", type=int, default=1, help="timing repeats per pyramid level (median)")
    ap.add_argument("--noise-floor", type=float, default=0.0,
                    help="also register with the torch pyramid a target perturbed by this much Gaussian noise "
                         "(e.g. 1e-6, the size of the two pyramids' differences): how much Dice moves by chance")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the same one thread for the old path
    from bench.datasets import available, benchmark_split, ixi_case, knee_case, knee_subjects, make_atlas_set
    if not available():
        print(json.dumps({"skipped": "../shared data not available"}))
        return 0
    from MASRefineLib.imageio import read_label
    out: dict = {"load_1min_start": os.getloadavg()[0], "threads": 1}
    atlases, targets = benchmark_split("ixi", "tuning")
    atlases, targets = atlases[:a.atlases], targets[:a.targets]
    paths = [ixi_case(s)[0] for s in atlases[:3]]
    try:
        paths.append(knee_case(knee_subjects()[0])[0])
    except Exception as e:  # noqa: BLE001 - the knee synthesis may be missing; IXI alone still answers
        out["knee_skipped"] = f"{type(e).__name__}: {e}"
    out["pyramid_levels"] = compare_levels(paths, repeats=a.level_repeats)
    if not a.skip_registration:
        aset = make_atlas_set("ixi", atlases)
        runs = []
        for t in targets:
            tp, lp = ixi_case(t)
            ref = sitk.GetArrayFromImage(read_label(lp))
            for r in range(a.repeats):
                res = {}
                for legacy in (True, False):  # interleaved
                    res["sitk" if legacy else "torch"] = register_once(tp, atlases, aset, legacy)
                if a.noise_floor:
                    res["torch_noisy"] = register_once(tp, atlases, aset, False, a.noise_floor)
                dice = {k: {aid: dice_mean(lab, ref) for aid, lab in v["labels"].items()} for k, v in res.items()}
                mv = {}
                for k, v in res.items():
                    from MASRefineLib.fusion.common import vote_fusion
                    stack = torch.from_numpy(np.stack([lab.astype(np.int64) for lab in v["labels"].values()]))
                    mv[k] = dice_mean(vote_fusion(stack)[0], ref)
                diffs = [dice["torch"][i] - dice["sitk"][i] for i in dice["sitk"]]
                floor = ({"max_abs": float(np.max(np.abs([dice["torch_noisy"][i] - dice["torch"][i] for i in dice["torch"]]))),
                          "mean": float(np.mean([dice["torch_noisy"][i] - dice["torch"][i] for i in dice["torch"]]))}
                         if "torch_noisy" in dice else None)
                mat = max(float(np.abs(res["torch"]["matrices"][i] - res["sitk"]["matrices"][i]).max())
                          for i in dice["sitk"])
                runs.append({"target": t, "repeat": r,
                             "mean_dice": {k: float(np.mean(list(v.values()))) for k, v in dice.items()},
                             "majority_vote_dice": mv,
                             "per_atlas_dice_diff": {"max_abs": float(np.max(np.abs(diffs))),
                                                     "mean": float(np.mean(diffs))},
                             "affine_max_abs_diff": mat,
                             "noise_floor_per_atlas_dice_diff": floor,
                             "wall_s": {k: round(v["wall_s"], 2) for k, v in res.items()},
                             "cpu_s": {k: round(v["cpu_s"], 2) for k, v in res.items()}})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        out["registration"] = runs
    out["load_1min_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
