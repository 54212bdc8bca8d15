"""``make demo`` / ``python -m MASRefineLib.demo --out .cache/demo``: the whole product on built-in data.

1. generates the knee phantom atlas set and a target with its ground truth (:mod:`.sampledata`);
2. runs ``masrefine segment`` on it: deformable pre-registration, refinement (IS) and VoteNet+ fusion,
   training the small models it needs on the atlas set first (they are kept in the atlas set's
   ``models/`` folder, so a second run skips training);
3. prints the metrics against the phantom's truth (per label and for bones / cartilages), with plurality
   vote before and after refinement as reference rows, the per-atlas QA numbers, the seconds per
   stage, and where the outputs and the QA picture are.

Runs in a few minutes on a 2-core CPU (``--atlases`` and the phantom's grid keep it small).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .protocol.jobs import PARAMETERS


def _pv_metrics(label_files: list[Path], truth: str, groups) -> dict | None:
    """Plurality vote of the given warped label maps, scored against the truth (a reference row)."""
    import SimpleITK as sitk
    from .metrics import evaluate
    from .imageio import read_label
    from .fusion.common import vote_fusion
    if not label_files:
        return None
    ref = read_label(truth)
    labs = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in label_files])
    fused = vote_fusion(torch.from_numpy(labs.astype(np.int64)))[0]
    img = sitk.GetImageFromArray(fused.astype(np.uint16))
    img.CopyInformation(ref)
    return evaluate(img, ref, groups=groups, labels=[1, 2, 3, 4])


def _row(name: str, ev) -> str:
    def f(s, key, scale, digits):
        v = getattr(s, key)
        return "-" if v is None or not np.isfinite(v) else f"{v * scale:.{digits}f}"
    cells = [name.ljust(34)]
    for key, scale, digits in (("dice", 100, 1), ("surface_dice", 100, 1), ("asd_mm", 1, 2), ("hd95_mm", 1, 2)):
        for g in ("bone", "cartilage"):
            cells.append(f(ev.groups[g], key, scale, digits).rjust(7))
    return " ".join(cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m MASRefineLib.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".cache/demo", help="folder for the sample data and the results")
    ap.add_argument("--atlases", type=int, default=6, help="number of phantom atlases (default 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    # the choices are the job parameters'; the demo's defaults are the paper's method (fast)
    ap.add_argument("--preset", default="fast", choices=PARAMETERS["preset"][1])
    ap.add_argument("--refine", default="IS", choices=PARAMETERS["refine"][1])
    ap.add_argument("--fusion", default="votenet", choices=PARAMETERS["fusion"][1])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    t_all = time.perf_counter()
    from . import sampledata
    from .imageio import read_label
    from .metrics import evaluate, format_table
    from .pipeline import SegmentOptions, segment
    from .commands.segment import console_logging, format_rows, terminal_progress
    from .protocol.manifest import read_manifest

    out = Path(a.out).resolve()
    if not a.quiet:
        console_logging()
    print(f"MASRefine demo: knee phantom, {a.atlases} atlases -> 1 target, output in {out}", flush=True)
    t = time.perf_counter()
    with terminal_progress(a.quiet) as bar:
        sample = sampledata.make_sample(out / "sample", n_atlases=a.atlases, seed=a.seed, progress=bar)
    t_sample = time.perf_counter() - t
    opts = SegmentOptions(prereg="deformable", refine=a.refine, fusion=a.fusion, device=a.device, preset=a.preset,
                          train_missing=True, seed=a.seed, threads=a.threads)
    with terminal_progress(a.quiet) as bar:
        result = segment(sample["target"], sample["atlas_dir"], out / "result", opts, bar, truth=sample["truth"],
                         groups=sampledata.GROUPS)
    m = read_manifest(result["manifest"])
    names = {int(k): v["name"] for k, v in m["labels"].items()}
    ev = evaluate(read_label(result["fused"]), read_label(sample["truth"]), groups=sampledata.GROUPS,
                  labels=[1, 2, 3, 4])
    summary = result["summary"]

    print()
    print(f"Fused segmentation vs phantom truth ({summary['stage']}, fusion {summary['fusion']}):")
    print(format_table(ev, names))
    print()
    adir = Path(result["output_dir"]) / "atlases"
    head = " ".join(["".ljust(34)] + [f"{m_} {g}".rjust(7) for m_ in ("Dice", "SD", "ASD", "HD95")
                                       for g in ("bone", "cart")])
    print("Label groups (Dice and surface Dice in %, ASD and HD95 in mm):")
    print(head)
    variant = summary["stage"].replace("refined-", "") if summary["stage"].startswith("refined-") else "none"
    rows = [("PV, pre-registration only", sorted(adir.glob("*_label_unrefined.nii.gz"))),
            (f"PV, after refinement ({variant})" if variant != "none" else "PV, pre-registration only",
             sorted(adir.glob("*_label.nii.gz")))]
    if variant == "none":
        rows = rows[1:]
    for name, files in rows:
        e = _pv_metrics(files, sample["truth"], sampledata.GROUPS)
        if e is not None:
            print(_row(name, e))
    print(_row(f"MASRefine ({summary['fusion']}, refine {variant})", ev))
    print()
    print("Per-atlas QA:")
    print(format_rows([{"id": x["id"], **x.get("qa", {})} for x in m["atlases"]]))
    print()
    secs = {"sample data": t_sample, **summary["seconds"]}
    print("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    for fb in summary.get("fallbacks", []):
        print(f"note: {fb}")
    outs = {(e["role"], e.get("format")): e["abs_path"] for e in m["outputs"] if e.get("atlas_id") is None}
    print()
    print(f"fused labels:  {result['fused']}")
    print(f"               {outs.get(('fused-labels', 'seg.nrrd'), '')}")
    print(f"QA picture:    {outs.get(('qa-picture', 'png'), '(not written)')}")
    print(f"QA table:      {outs.get(('qa-table', 'csv'), '')}")
    print(f"per atlas:     {adir}")
    print(f"manifest:      {result['manifest']}")
    print(f"atlas set:     {sample['atlas_dir']} (models in {Path(sample['atlas_dir']) / 'models'})")
    print(f"demo finished in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
