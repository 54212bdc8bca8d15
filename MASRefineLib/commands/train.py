"""``masrefine train MODEL ATLAS_DIR``: train a model on an atlas set; stored in the set's ``models/``.

One sub-command per model (``segmenter``, ``votenet``). To add one, write ``_add_<name>(sub)`` that adds its
parser with ``set_defaults(func=...)`` and call it in :func:`add_parser`.
"""
from __future__ import annotations

import argparse

from ._common import nonnegative_int, positive_float, positive_int


def _add_segmenter(sub) -> argparse.ArgumentParser:
    from ..segmenter import AUTO_DICE_MAX_STRUCTURES, SegmenterSettings
    d = SegmenterSettings()
    p = sub.add_parser(
        "segmenter", help="the surrogate U-Net of refinement variant IS (and the U-Net baseline)",
        description="Train a small 3D U-Net (MONAI) with cross entropy (+ soft Dice for sets of few structures) on "
                    "random patches of the atlas set, on a reduced working grid. Saved as "
                    "ATLAS_DIR/models/segmenter.safetensors + segmenter.json; a "
                    "checkpoint after every epoch lets an interrupted run resume (run the same command again).")
    p.add_argument("atlas_dir", metavar="ATLAS_DIR", help="atlas set folder (with atlas.json)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"epochs (default {d.epochs}); raise it to train longer")
    p.add_argument("--steps-per-epoch", type=positive_int, default=d.steps_per_epoch, metavar="N",
                   help=f"patch batches per epoch (default {d.steps_per_epoch})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, metavar="N",
                   help=f"patches per batch (default {d.batch_size})")
    p.add_argument("--patch-size", type=positive_int, default=d.patch_size, metavar="VOXELS",
                   help=f"cubic patch side in working-grid voxels (default {d.patch_size})")
    p.add_argument("--spacing", type=positive_float, default=None, metavar="MM",
                   help="working-grid spacing in mm (default: the atlases' spacing, coarsened to at most "
                        f"{d.max_voxels:,} voxels)")
    p.add_argument("--channels", type=positive_int, nargs="+", default=list(d.channels), metavar="C",
                   help=f"U-Net channels per level, at least 2 levels (default {' '.join(map(str, d.channels))})")
    p.add_argument("--lr", type=positive_float, default=d.learning_rate,
                   help=f"Adam learning rate (default {d.learning_rate:g})")
    p.add_argument("--sampling", choices=("foreground", "class"), default=d.sampling,
                   help="patch centres: any labelled voxel, or a voxel of a structure drawn uniformly (for sets with "
                        f"many small structures) (default {d.sampling})")
    p.add_argument("--loss", choices=("auto", "ce", "dice_ce"), default=d.loss,
                   help="cross entropy, or cross entropy + soft Dice of the structures in the batch; auto: dice_ce up "
                        f"to {AUTO_DICE_MAX_STRUCTURES} structures, else ce (default {d.loss})")
    p.add_argument("--seed", type=nonnegative_int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_segmenter)
    return p


def _run_segmenter(args: argparse.Namespace) -> int:
    from ..errors import MASRefineError
    from ..progress import tqdm_progress
    from ..segmenter import SegmenterSettings, train_on_atlas_set

    if len(args.channels) < 2:  # the counts and sizes themselves are checked by argparse (positive_int)
        raise MASRefineError(f"--channels needs at least 2 values (one per U-Net level), got {len(args.channels)}")
    m = 2 ** (len(args.channels) - 1)
    if args.patch_size < m or args.patch_size % m:
        raise MASRefineError(f"--patch-size must be a multiple of {m} for {len(args.channels)} U-Net levels")
    settings = SegmenterSettings(spacing_mm=args.spacing, patch_size=args.patch_size, channels=tuple(args.channels),
                                 strides=(2,) * (len(args.channels) - 1), epochs=args.epochs,
                                 steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                                 learning_rate=args.lr, seed=args.seed, sampling=args.sampling, loss=args.loss)
    with tqdm_progress(disable=args.quiet) as bar:
        seg = train_on_atlas_set(args.atlas_dir, settings, args.device, bar, resume=not args.fresh)
    tr, val = seg.meta.get("training", {}), seg.meta.get("validation") or {}
    print(f"segmenter: {seg.num_classes - 1} labels, working spacing {seg.spacing_mm:g} mm, {tr.get('epochs')} epochs, "
          f"final loss {tr.get('final_loss', float('nan')):.4f}, {tr.get('seconds', 0):.0f} s training")
    if val.get("mean_dice") is not None:
        print(f"validation Dice (held-out atlases {', '.join(val['ids'])}, working grid): {val['mean_dice']:.3f}")
    print(f"wrote {seg.path}")
    return 0


def _add_votenet(sub) -> argparse.ArgumentParser:
    from ..training import TRAIN_PRESETS
    p = sub.add_parser(
        "votenet", help="VoteNet+ for label fusion (leave-one-out registrations of the atlas set to itself)",
        description="Register the atlases of the set to each other (leave-one-out: each chosen atlas is a target, "
                    "the others are registered to it), train a small 3D U-Net to predict where a warped atlas's "
                    "label is right, calibrate it (Platt scaling) on held-out targets and store it as "
                    "ATLAS_DIR/models/votenet-PREREG[-REFINE].safetensors + .json, with the reliability report "
                    "(ECE before/after calibration). 'masrefine segment --fusion votenet' uses it.")
    p.add_argument("atlas_dir", metavar="ATLAS_DIR", help="atlas set folder (with atlas.json)")
    p.add_argument("--prereg", choices=("affine", "deformable"), default="deformable",
                   help="pre-registration of the training pairs (default deformable); one model per kind")
    p.add_argument("--refine", choices=("none", "I", "IS"), default="none",
                   help="also refine the training pairs (default none, as the paper: the refined variants use the "
                        "pre-registration model); I or IS store votenet-PREREG-I / -IS, which 'segment' prefers "
                        "for that refinement. IS needs the set's segmenter ('masrefine train segmenter').")
    p.add_argument("--preset", choices=tuple(TRAIN_PRESETS), default="default",
                   help="registration preset and training length: "
                        + "; ".join(f"{k}: {v['iterations']} iterations, "
                                    f"{'all' if v['targets'] is None else v['targets']} leave-one-out targets"
                                    for k, v in TRAIN_PRESETS.items()) + " (default: default)")
    p.add_argument("--targets", type=int, default=None, metavar="N",
                   help="leave-one-out targets (atlases) to register to (default from the preset; at least 2)")
    p.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                   help="Adam iterations (default from the preset)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep the leave-one-out registrations here and reuse them on a rerun")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_votenet)
    return p


def _run_votenet(args: argparse.Namespace) -> int:
    from ..atlas import AtlasSet
    from ..errors import MASRefineError
    from ..fusion.votenet import VoteNetModel
    from ..progress import tqdm_progress
    from ..training import train_for_atlas_set

    if args.targets is not None and args.targets < 2:
        raise MASRefineError("--targets must be at least 2 (one target is held out to calibrate)")
    if args.cache is not None:
        from ..outputs import check_folder_path
        check_folder_path(args.cache, "--cache")  # a folder of per-target registration folders, not a file
    aset = AtlasSet.load(args.atlas_dir)
    refine = None if args.refine == "none" else args.refine
    segmenter = None
    if refine == "IS":
        from ..segmenter import UNetSegmenter
        segmenter = UNetSegmenter.load(aset.root, args.device)  # a missing one: its error names the command to train it
    with tqdm_progress(disable=args.quiet) as bar:  # stored as votenet.model_name(prereg, refine)
        path = train_for_atlas_set(aset, prereg=args.prereg, refine=refine, preset=args.preset, device=args.device,
                                   progress=bar, segmenter=segmenter, targets=args.targets,
                                   iterations=args.iterations, seed=args.seed, cache=args.cache)
    model = VoteNetModel.load(path)
    rel, reg = model.meta.get("reliability", {}), model.meta.get("registration", {})
    print(f"VoteNet+: leave-one-out targets {', '.join(reg.get('targets', []))} ({reg.get('seconds', 0):.0f} s of "
          f"registration), Platt a {model.a:.3f} b {model.b:.3f}")
    if rel.get("ece_before") is not None:
        print(f"expected calibration error on held-out pairs: {rel['ece_before']:.4f} before, "
              f"{rel['ece_after']:.4f} after calibration")
    print(f"wrote {path}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model on an atlas set (stored in its models/ folder)",
                       description="Train a model on an atlas set; it is stored in ATLAS_DIR/models.")
    models = p.add_subparsers(dest="model", metavar="MODEL")
    _add_segmenter(models)
    _add_votenet(models)
    p.set_defaults(func=lambda args: p.print_help() or 2)  # no MODEL: the help, exit status 2
    return p
