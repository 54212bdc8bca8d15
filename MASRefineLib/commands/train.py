"""``masrefine train MODEL ATLAS_DIR``: train a model on an atlas set; stored in the set's ``models/``.

One sub-command per model. To add one (e.g. ``votenet``), write ``_add_<name>(sub)`` that adds its
parser with ``set_defaults(func=...)`` and list it in :data:`MODELS`.
"""
from __future__ import annotations

import argparse


def _add_segmenter(sub) -> argparse.ArgumentParser:
    from ..segmenter import SegmenterSettings
    d = SegmenterSettings()
    p = sub.add_parser(
        "segmenter", help="the surrogate U-Net of refinement variant IS (and the U-Net baseline)",
        description="Train a small 3D U-Net (MONAI) with cross entropy on random patches of the atlas set, on a "
                    "reduced working grid. Saved as ATLAS_DIR/models/segmenter.safetensors + segmenter.json; a "
                    "checkpoint after every epoch lets an interrupted run resume (run the same command again).")
    p.add_argument("atlas_dir", metavar="ATLAS_DIR", help="atlas set folder (with atlas.json)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs}); raise it to train longer")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, metavar="N",
                   help=f"patch batches per epoch (default {d.steps_per_epoch})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N", help=f"patches per batch (default {d.batch_size})")
    p.add_argument("--patch-size", type=int, default=d.patch_size, metavar="VOXELS",
                   help=f"cubic patch side in working-grid voxels (default {d.patch_size})")
    p.add_argument("--spacing", type=float, default=None, metavar="MM",
                   help="working-grid spacing in mm (default: the atlases' spacing, coarsened to at most "
                        f"{d.max_voxels:,} voxels)")
    p.add_argument("--channels", type=int, nargs="+", default=list(d.channels), metavar="C",
                   help=f"U-Net channels per level (default {' '.join(map(str, d.channels))})")
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"Adam learning rate (default {d.learning_rate:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_segmenter)
    return p


def _run_segmenter(args: argparse.Namespace) -> int:
    from ..errors import MASRefineError
    from ..progress import tqdm_progress
    from ..segmenter import SegmenterSettings, train_on_atlas_set

    if args.epochs < 1 or args.steps_per_epoch < 1 or args.batch_size < 1:
        raise MASRefineError("--epochs, --steps-per-epoch and --batch-size must be at least 1")
    m = 2 ** (len(args.channels) - 1)
    if args.patch_size < m or args.patch_size % m:
        raise MASRefineError(f"--patch-size must be a multiple of {m} for {len(args.channels)} U-Net levels")
    settings = SegmenterSettings(spacing_mm=args.spacing, patch_size=args.patch_size, channels=tuple(args.channels),
                                 strides=(2,) * (len(args.channels) - 1), epochs=args.epochs,
                                 steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                                 learning_rate=args.lr, seed=args.seed)
    with tqdm_progress(disable=args.quiet) as bar:
        seg = train_on_atlas_set(args.atlas_dir, settings, args.device, bar, resume=not args.fresh)
    tr, val = seg.meta.get("training", {}), seg.meta.get("validation") or {}
    print(f"segmenter: {seg.num_classes - 1} labels, working spacing {seg.spacing_mm:g} mm, {tr.get('epochs')} epochs, "
          f"final loss {tr.get('final_loss', float('nan')):.4f}, {tr.get('seconds', 0):.0f} s training")
    if val.get("mean_dice") is not None:
        print(f"validation Dice (held-out atlases {', '.join(val['ids'])}, working grid): {val['mean_dice']:.3f}")
    print(f"wrote {seg.path}")
    return 0


#: model name -> function adding its sub-parser (the fusion engineer adds "votenet" here)
MODELS = {"segmenter": _add_segmenter}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model on an atlas set (stored in its models/ folder)",
                       description="Train a model on an atlas set; it is stored in ATLAS_DIR/models.")
    models = p.add_subparsers(dest="model", metavar="MODEL")
    for add in MODELS.values():
        add(models)

    def no_model(args: argparse.Namespace) -> int:
        p.print_help()
        return 2
    p.set_defaults(func=no_model)
    return p
