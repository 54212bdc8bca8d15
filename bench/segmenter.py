"""Benchmark of the surrogate U-Net's training recipes (validation Dice against training time).

    python bench/segmenter.py                                     # knee, 100 epochs, the three recipes
    python bench/segmenter.py --dataset ixi --epochs 80           # brains, 148 structures (about 2 CPU h)
    python bench/segmenter.py --recipes dice_ce/class --epochs 600

Data (``bench.datasets``, split seed 0, as ``bench/refinement.py``): the U-Net is trained on the subjects that
are neither atlases nor targets of the refinement benchmark (knee: the 20 other knees; IXI: ``--train`` of
them), so its validation subjects (20 % of those, held out by ``train_segmenter``) are never benchmark targets.
Recipes are ``LOSS/SAMPLING``: ``ce`` or ``dice_ce`` (cross entropy + soft Dice of the structures in the batch),
``foreground`` (patches centred on any labelled voxel) or ``class`` (on a structure drawn uniformly). Every
other setting is ``masrefine train segmenter``'s default. Models are kept (and resumed) in
``.cache/atlas-sets/<dataset>-segbench-<n>-<loss>-<sampling>``; a longer ``--epochs`` resumes a shorter run.

One table: per recipe, the mean validation Dice over the structures, how many structures reach 0.5 and 0.7,
the training's CPU seconds (``train_segmenter``'s own clock: this process, ``--threads`` torch threads) and the
final loss. Validation Dice is measured on the working grid.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPES = ("ce/foreground", "ce/class", "dice_ce/class")


def training_subjects(dataset: str, n: int) -> list[str]:
    """The subjects that are neither atlases nor targets of ``bench/refinement.py``'s default split, nor
    report subjects (bench/datasets.py)."""
    from bench import datasets as D
    ids = D.subjects(dataset)
    atlases, targets = D.split(ids, 8, 4, seed=0) if dataset == "knee" else D.split(ids, 10, 5, seed=0)
    return D.training_pool(dataset, atlases + targets)[:n]


def run_recipe(dataset: str, ids: list[str], recipe: str, epochs: int, device: str) -> dict:
    from bench import datasets as D
    from MASRefineLib.segmenter import SegmenterSettings, train_on_atlas_set
    loss, sampling = recipe.split("/")
    if dataset == "knee":
        D.knee_dataset(ids)
    aset = D.make_atlas_set(dataset, ids, name=f"{dataset}-segbench-{len(ids)}-{loss}-{sampling}")
    seg = train_on_atlas_set(aset.root, SegmenterSettings(epochs=epochs, loss=loss, sampling=sampling), device=device,
                             progress=D.progress_printer(60.0))
    val = seg.meta.get("validation") or {}
    dice = [d for d in (val.get("dice_per_label") or {}).values() if d is not None]
    tr = seg.meta["training"]
    return {"dataset": dataset, "recipe": recipe, "epochs": epochs, "mean_dice": val.get("mean_dice"),
            "n": len(dice), "n_05": sum(d >= 0.5 for d in dice), "n_07": sum(d >= 0.7 for d in dice),
            "seconds": tr["seconds"], "final_loss": tr["final_loss"]}


def table(rows: list[dict]) -> str:
    head = f"{'dataset':8s} {'recipe':16s} {'epochs':>6s} {'val Dice':>9s} {'>=0.5':>7s} {'>=0.7':>7s} {'CPU s':>8s} {'loss':>7s}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['dataset']:8s} {r['recipe']:16s} {r['epochs']:6d} {r['mean_dice']:9.4f} "
                   f"{r['n_05']:3d}/{r['n']:<3d} {r['n_07']:3d}/{r['n']:<3d} {r['seconds']:8.0f} {r['final_loss']:7.4f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("knee", "ixi"), default="knee")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--train", type=int, default=20, metavar="N", help="training subjects (default 20)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ids = training_subjects(args.dataset, args.train)
    rows = [run_recipe(args.dataset, ids, r, args.epochs, args.device) for r in args.recipes]
    print(table(rows))
    print(f"({time.perf_counter() - t0:.0f} s; threads {args.threads}; device {args.device}; "
          f"{len(ids)} training subjects, 20 % held out for validation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
