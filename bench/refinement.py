"""Benchmark of VoteNet++ refinement (variants I and IS) after affine and deformable pre-registration.

    python bench/refinement.py                              # full: knee 8 atlases -> 4 targets, IXI 10 -> 5
    python bench/refinement.py --knee 8 1 --ixi 0 0         # reduced: knee, one target
    python bench/refinement.py --knee 8 2 --gammas 0.1 0.4 1.6 --variants I IS --starts deformable  # gamma sweep

Data (``bench.datasets``, split seed 0): atlases and targets are different subjects; the surrogate U-Net
is trained on the *other* subjects (knee: the 20 remaining knees; IXI: ``--ixi-train`` others) with
``masrefine train segmenter`` defaults (resumable; stored in ``.cache/atlas-sets/<name>/models``).
Pre-registration: ``registration.register`` (preset ``default``, stage affine or deformable), all
atlases of a target batched. Refinement: ``refine.refine`` with its defaults unless ``--gammas`` /
``--alpha`` are given. Registered and refined sets are cached in ``.cache/bench-refinement`` (reruns
only add what is missing; ``--fresh`` recomputes).

One table: per data set, start and method (none = the pre-registration itself, I, IS): mean Dice of
the warped atlas label maps against the target's labels (knee: bones = femur, tibia; cartilages =
femoral, tibial; IXI: mean over all labels), Dice of the plurality vote (``fusion.fuse(method="pv")``)
over the atlases, mean folding fraction (% of voxels with Jacobian determinant <= 0 of the total
field), seconds per atlas (wall clock) and CPU seconds per atlas of refinement (this process, one torch
thread unless ``--threads``; on the shared machine wall clock is several times the CPU time);
then the U-Net's own Dice on the targets. Dice is volume Dice on the target grid.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scoring import dice_per_label  # noqa: E402
from bench import scoring  # noqa: E402

CACHE = ROOT / ".cache" / "bench-refinement"
KNEE_GROUPS = {"bones": [1, 3], "cartilages": [2, 4]}


def summarize(per_label: dict[int, float], groups: dict | None) -> dict[str, float]:
    return scoring.summarize(per_label, groups, "all")


def evaluate_set(ws, target_arr: np.ndarray, ref: np.ndarray, groups: dict | None) -> dict:
    from MASRefineLib.fusion import fuse
    labels = sorted(set(np.unique(ref).tolist()) - {0})
    per_atlas = [summarize(dice_per_label(a.label.astype(np.int64), ref, labels), groups) for a in ws.atlases]
    pv = fuse(ws, target_arr, "pv", device="cpu").labels.astype(np.int64)
    keys = per_atlas[0].keys()
    return {"atlas": {k: float(np.mean([d[k] for d in per_atlas])) for k in keys},
            "pv": summarize(dice_per_label(pv, ref, labels), groups),
            "folding_pct": 100.0 * float(np.mean([a.info.get("folding_fraction", 0.0) for a in ws.atlases])),
            "seconds_per_atlas": float(np.mean([a.info.get("seconds", float("nan")) for a in ws.atlases])),
            "cpu_seconds_per_atlas": float(np.mean([a.info.get("refinement", {}).get("cpu_seconds", float("nan"))
                                                    for a in ws.atlases]))}


def cached(path: Path, fresh: bool, make, expect: dict | None = None):
    """A WarpedSet from ``path`` if complete (and, with ``expect``, its recorded ``info["refinement"]`` has
    those values: a changed refinement default never reuses a stale result), else ``make()`` saved there
    (with its wall seconds)."""
    from MASRefineLib.warped import WarpedSet
    if path.exists() and (path / "report.json").exists() and not fresh:
        ws = WarpedSet.load(path)
        rec = ws.info.get("refinement", {})
        stale = {k: (rec.get(k), v) for k, v in (expect or {}).items() if not _same(rec.get(k), v)}
        if not stale:
            return ws
        print(f"  {path}: cached with other settings {stale}; recomputing", file=sys.stderr)
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    ws = make()
    ws.info["bench_wall_seconds"] = time.perf_counter() - t0
    ws.save(path)
    return ws


def _same(a, b) -> bool:
    """Equal, numbers (and lists of them) to 1e-6 relative (spacings are recorded as resolved floats)."""
    if isinstance(b, (int, float, list)) and not isinstance(b, bool):
        try:
            return np.shape(a) == np.shape(b) and bool(np.allclose(a, b, rtol=1e-6, atol=0))
        except (TypeError, ValueError):
            return False
    return a == b


def segmenter_for(dataset: str, train_ids: list[str], name: str, device: str, fresh: bool, epochs: int):
    """The surrogate U-Net trained on ``train_ids`` for ``epochs`` (``masrefine train segmenter``'s other
    defaults), kept in ``.cache/atlas-sets/<name>`` and reused."""
    from bench.datasets import make_atlas_set, progress_printer
    from MASRefineLib.segmenter import SegmenterSettings, UNetSegmenter, train_on_atlas_set
    aset = make_atlas_set(dataset, train_ids, name=name)
    path = aset.models_dir / "segmenter.json"
    if path.exists() and not fresh:
        return UNetSegmenter.load(path, device)
    print(f"training the surrogate U-Net on {len(train_ids)} {dataset} subjects ({aset.root})", file=sys.stderr)
    return train_on_atlas_set(aset.root, SegmenterSettings(epochs=epochs), device=device,
                              progress=progress_printer(0.0))


def run_dataset(dataset: str, n_atlases: int, n_targets: int, n_train: int, args) -> list[dict]:
    import SimpleITK as sitk
    from bench import datasets as D
    from MASRefineLib.imageio import normalize_intensity, read_image, read_label
    from MASRefineLib.refine import refine, resolve_settings
    from MASRefineLib.warped import WarpedSet

    if dataset == "knee":
        ids = D.knee_subjects()
        groups = KNEE_GROUPS
    else:
        ids = D.ixi_subjects()
        groups = None
    atlas_ids, target_ids_all = D.split(ids, n_atlases, 4 if dataset == "knee" else 5, seed=0)
    target_ids = target_ids_all[:n_targets]
    others = D.training_pool(dataset, atlas_ids + target_ids_all)[: n_train]  # never a report subject
    if dataset == "knee":
        kd = D.knee_dataset(atlas_ids + target_ids + others)
        case = lambda i: (kd / "images" / f"{i}.nii.gz", kd / "labels" / f"{i}.nii.gz")  # noqa: E731
    else:
        case = D.ixi_case
    seg = None
    # the U-Net's training length names its folder and the IS cache, so a changed default (30 -> 150
    # epochs) or --segmenter-epochs never reuses another model or its refinements
    from MASRefineLib.segmenter import SegmenterSettings
    seg_epochs = args.segmenter_epochs or SegmenterSettings().epochs
    d = SegmenterSettings()
    # the training recipe names the folder too, so a model of another default recipe is never reused
    seg_tag = f"-e{seg_epochs}" + ("" if (d.loss, d.sampling) == ("ce", "foreground") else f"-{d.loss}-{d.sampling}")
    if "IS" in args.variants:
        t0 = time.perf_counter()
        seg = segmenter_for(dataset, others, f"{dataset}-refinement-segmenter-{len(others)}{seg_tag}", args.device,
                            args.fresh_segmenter, seg_epochs)
        print(f"{dataset}: segmenter ready ({time.perf_counter() - t0:.0f} s; trained "
              f"{seg.meta.get('training', {}).get('seconds', float('nan')):.0f} s)", file=sys.stderr)
    rows, unet = [], []
    for tid in target_ids:
        ip, lp = case(tid)
        timg = read_image(ip)
        ref = sitk.GetArrayFromImage(read_label(lp)).astype(np.int64)
        tarr = normalize_intensity(sitk.GetArrayFromImage(timg))
        if seg is not None:
            pred = seg.predict_labels(timg).astype(np.int64)
            labels = sorted(set(np.unique(ref).tolist()) - {0})
            unet.append(summarize(dice_per_label(pred, ref, labels), groups))
        for start in args.starts:
            reg = D.registered(dataset, tid, atlas_ids, start, "default", device=args.device)
            # refinements are cached per registration (its folder names the parameters' digest), so a changed
            # registration default never pairs new unrefined atlases with old refined ones
            base = CACHE / dataset / tid / start / reg.parent.name
            ws0 = WarpedSet.load(reg)
            methods = [("none", None, None, None)]
            for v in args.variants:
                for g in (args.gammas or [None]):
                    label = v if g is None else f"{v} g={g:g}"
                    if args.iterations:  # its own label, so its own cache folder and table row
                        label += " it" + "-".join(map(str, args.iterations))
                    if args.similarity != "ncc":
                        label += f" {args.similarity}"
                    methods.append((label, v, g, args.alpha))
            for label, variant, gamma, alpha in methods:
                if variant is None:
                    ws = ws0
                else:
                    kw = {}
                    if gamma is not None:
                        kw["gamma"] = gamma
                    if alpha is not None:
                        kw["alpha"] = alpha
                    if args.iterations:
                        kw["iterations"] = tuple(args.iterations)
                    kw["similarity"] = args.similarity
                    folder = base / label.replace(" ", "_").replace("=", "")
                    if alpha is not None:
                        folder = folder.with_name(folder.name + f"_a{alpha:g}")
                    if variant == "IS":
                        folder = folder.with_name(folder.name + f"_seg{seg_tag}")
                    ws = cached(folder, args.fresh, lambda: refine(ws0, tarr, variant, segmenter=seg,
                                                                   device=args.device, **kw),
                                expect=resolve_settings(ws0.target_grid, variant, segmenter=seg, **kw)[0].to_json())
                m = evaluate_set(ws, tarr, ref, groups)
                rows.append({"dataset": dataset, "target": tid, "start": start, "method": label, **m})
                print(f"  {dataset} {tid} {start:10s} {label:12s} atlas {m['atlas']} pv {m['pv']} "
                      f"fold {m['folding_pct']:.4f}% {m['seconds_per_atlas']:.1f} s/atlas", file=sys.stderr)
    if unet:
        keys = unet[0].keys()
        rows.append({"dataset": dataset, "target": "all", "start": "-", "method": "U-Net alone",
                     "atlas": {k: float(np.mean([u[k] for u in unet])) for k in keys},
                     "pv": {k: float("nan") for k in keys}, "folding_pct": float("nan"),
                     "seconds_per_atlas": float("nan")})
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        keys = list(rs[0]["atlas"].keys())
        head = f"{dataset:6s} {'start':10s} {'method':12s} {'n':>2s} " + " ".join(f"{'atlas ' + k:>16s}" for k in keys) + \
            " " + " ".join(f"{'PV ' + k:>14s}" for k in keys) + f" {'fold %':>8s} {'s/atlas':>8s} {'cpu s':>6s}"
        out += [head, "-" * len(head)]
        for (start, method) in dict.fromkeys((r["start"], r["method"]) for r in rs):
            sel = [r for r in rs if r["start"] == start and r["method"] == method]
            a = {k: np.mean([r["atlas"][k] for r in sel]) for k in keys}
            p = {k: np.mean([r["pv"][k] for r in sel]) for k in keys}
            fold = np.mean([r["folding_pct"] for r in sel])
            sec = np.mean([r["seconds_per_atlas"] for r in sel])
            cpu = np.mean([r.get("cpu_seconds_per_atlas", float("nan")) for r in sel])
            n = len(sel) if method != "U-Net alone" else sum(1 for r in rs if r["method"] == "none") // max(
                1, len({r["start"] for r in rs if r["start"] != "-"}))
            out.append(f"{dataset:6s} {start:10s} {method:12s} {n:2d} " + " ".join(f"{a[k]:16.4f}" for k in keys) + " " +
                       " ".join(f"{p[k]:14.4f}" for k in keys) + f" {fold:8.4f} {sec:8.1f} {cpu:6.1f}")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    from MASRefineLib.refine import DEFAULT_SIMILARITY, SIMILARITIES
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--knee", type=int, nargs=2, default=[8, 4], metavar=("ATLASES", "TARGETS"))
    ap.add_argument("--ixi", type=int, nargs=2, default=[10, 5], metavar=("ATLASES", "TARGETS"))
    ap.add_argument("--ixi-train", type=int, default=20, metavar="N", help="IXI subjects for the U-Net (default 20)")
    ap.add_argument("--starts", nargs="+", default=["affine", "deformable"], choices=["affine", "deformable"])
    ap.add_argument("--variants", nargs="+", default=["I", "IS"], choices=["I", "IS"])
    ap.add_argument("--gammas", type=float, nargs="+", help="refine with each of these gammas (mm^2) instead of the default")
    ap.add_argument("--alpha", type=float, default=None, help="alpha for IS (default: refine's)")
    ap.add_argument("--similarity", choices=SIMILARITIES, default=DEFAULT_SIMILARITY,
                    help=f"refinement image term (default {DEFAULT_SIMILARITY}, refine's; rows other than the paper's ncc "
                         f"are labelled with it and cached apart)")
    ap.add_argument("--iterations", type=int, nargs="+", default=None, metavar="N",
                    help="L-BFGS iterations per working grid, coarse to fine (default: refine's); cached apart")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="recompute cached registrations and refinements")
    ap.add_argument("--fresh-segmenter", action="store_true", help="retrain the U-Net")
    ap.add_argument("--segmenter-epochs", type=int, default=None, metavar="N",
                    help="train the U-Net for N epochs (default: masrefine train segmenter's); each length is "
                         "a separate model and IS cache")
    ap.add_argument("--json", metavar="OUT", help="also write all rows as JSON")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    rows = []
    t0 = time.perf_counter()
    if args.knee[0] and args.knee[1]:
        rows += run_dataset("knee", args.knee[0], args.knee[1], 20, args)
    if args.ixi[0] and args.ixi[1]:
        rows += run_dataset("ixi", args.ixi[0], args.ixi[1], args.ixi_train, args)
    print(table(rows))
    print(f"({time.perf_counter() - t0:.0f} s; threads {args.threads}; device {args.device})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
