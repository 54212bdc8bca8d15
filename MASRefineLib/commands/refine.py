"""``masrefine refine``: VoteNet++ registration refinement (paper Eq. 3-6) of registered atlases."""
from __future__ import annotations

import argparse

from ._common import finite_nonneg_float, positive_float, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    from ..refine import (DEFAULT_ALPHA, DEFAULT_CONTROL, DEFAULT_GAMMA, DEFAULT_SIMILARITY, SIMILARITIES,
                          SURROGATE_MIN_DICE)
    p = sub.add_parser(
        "refine", help="refine pre-registered atlases towards the target (VoteNet++, variants I and IS)",
        description="Optimise one more smooth displacement field per atlas: 1 - (L)NCC(image) + alpha x soft Dice of a "
                    "surrogate U-Net's predictions (variant IS) + gamma x bending energy. Reads what "
                    "'masrefine register' wrote and writes the same layout (composed fields, atlases re-warped from "
                    "their original files, report.json).")
    p.add_argument("--registered", required=True, metavar="DIR", help="folder written by 'masrefine register'")
    p.add_argument("--target", required=True, metavar="IMG", help="the target image (as given to register)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (same layout as --registered)")
    # either case is accepted (str.upper runs before the choices are checked); the help shows I, IS
    p.add_argument("--variant", default="I", type=str.upper, choices=["I", "IS"],
                   help="I: image term + bending; IS: also the segmentation term (needs a segmenter). "
                        "Default I, as 'masrefine segment'")
    p.add_argument("--alpha", type=finite_nonneg_float, default=DEFAULT_ALPHA,
                   help=f"segmentation weight (default {DEFAULT_ALPHA:g})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=finite_nonneg_float, default=None, metavar="MM2",
                   help=f"bending-energy weight in mm^2 for displacements in mm (default {DEFAULT_GAMMA:g})")
    g.add_argument("--paper-gamma", type=finite_nonneg_float, default=None, metavar="G",
                   help="bending weight in the authors' convention (normalised coordinates, e.g. the paper's 20000), "
                        "converted for the target grid")
    p.add_argument("--iterations", type=positive_int, nargs="+", metavar="N",
                   help="L-BFGS iterations per working grid, coarse to fine (one number: every level)")
    p.add_argument("--spacings", type=positive_float, nargs="+", metavar="MM",
                   help="working-grid spacings in mm, coarse to fine (default: the target spacing, or 2x, 4x, ... "
                        "of it above 1.5 M voxels, and a coarse level at twice that)")
    p.add_argument("--control", type=positive_int, default=DEFAULT_CONTROL, metavar="VOXELS",
                   help=f"control points of the field every VOXELS voxels of each working grid (default {DEFAULT_CONTROL})")
    p.add_argument("--segmenter", metavar="PATH",
                   help="trained segmenter for IS: an atlas set, its models/ folder or segmenter.json (default: the "
                        "atlas set named in the registered report, if any)")
    p.add_argument("--similarity", default=DEFAULT_SIMILARITY, choices=list(SIMILARITIES),
                   help=f"image term: local NCC (lncc) or global NCC (ncc, the paper) (default {DEFAULT_SIMILARITY})")
    p.add_argument("--seg-min-dice", type=finite_nonneg_float, default=SURROGATE_MIN_DICE, metavar="D",
                   help=f"IS: leave out of the soft Dice the structures the segmenter segments with a validation Dice "
                        f"below D (default {SURROGATE_MIN_DICE:g}; 0 = all structures, as the paper)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="atlases optimised together (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _find_segmenter(args, warped):
    from pathlib import Path

    from ..errors import MASRefineError
    from ..segmenter import UNetSegmenter
    cands = [args.segmenter] if args.segmenter else []
    if not cands:
        for key in ("atlas_set", "atlases", "atlas_dir"):
            v = warped.info.get(key)
            if isinstance(v, str):
                cands.append(v)
    if not cands:
        raise MASRefineError(f"{args.registered}: variant IS needs a trained segmenter: pass --segmenter (an atlas set "
                             "with models/segmenter.json; train one with 'masrefine train segmenter ATLAS_DIR'), "
                             "or use --variant I")
    return UNetSegmenter.load(Path(cands[0]), args.device)


def run(args: argparse.Namespace) -> int:
    from ..geometry import Grid
    from ..imageio import read_image
    from ..outputs import prepare_output_dir, warped_set_inputs
    from ..progress import tqdm_progress
    from ..refine import DEFAULT_BATCH, DEFAULT_GAMMA, gamma_from_paper, refine
    from ..warped import WarpedSet
    from ._common import check_target_grid

    warped = WarpedSet.load(args.registered)
    target = read_image(args.target)
    check_target_grid(args.target, Grid.from_image(target), args.registered, warped.target_grid)
    variant = args.variant
    # one number applies to every working grid (refine() takes an int for that)
    iterations = args.iterations[0] if args.iterations and len(args.iterations) == 1 else args.iterations
    gamma = args.gamma if args.gamma is not None else DEFAULT_GAMMA
    if args.paper_gamma is not None:
        gamma = gamma_from_paper(args.paper_gamma, warped.target_grid)
        print(f"paper gamma {args.paper_gamma:g} = {gamma:.4g} mm^2 on the target grid")
    segmenter = _find_segmenter(args, warped) if variant == "IS" else None
    # before anything is written: a new or earlier 'refine' folder, apart from --registered and the atlases
    out_dir = prepare_output_dir(args.out, command="refine",
                                 inputs=[*warped_set_inputs(args.registered, warped), ("--target image", args.target),
                                         ("--segmenter", args.segmenter)])
    with tqdm_progress(disable=args.quiet) as bar:
        out = refine(warped, target, variant, alpha=args.alpha, gamma=gamma, iterations=iterations,
                     spacings_mm=args.spacings, control=args.control, segmenter=segmenter, device=args.device,
                     batch_size=args.batch_size if args.batch_size else DEFAULT_BATCH, progress=bar,
                     seg_min_dice=args.seg_min_dice, similarity=args.similarity)
    if out.target_path is None:
        out.target_path = str(args.target)
    out.save(out_dir)
    print(format_summary(out))
    print(f"wrote {args.out}")
    return 0


def format_summary(ws) -> str:
    """One line per atlas: image and segmentation terms before -> after, largest move, folding, seconds."""
    head = f"{'atlas':<24} {'1-NCC':>17} {'soft Dice loss':>17} {'max mm':>7} {'fold %':>7} {'s':>6}"
    lines = [head, "-" * len(head)]

    def pair(a, b):
        return "-" if a is None or b is None else f"{a:.4f} -> {b:.4f}"

    for a in ws.atlases:
        r = a.info.get("refinement", {})
        lines.append(f"{a.id[:24]:<24} {pair(r.get('similarity_before'), r.get('similarity_after')):>17} "
                     f"{pair(r.get('segmentation_before'), r.get('segmentation_after')):>17} "
                     f"{r.get('max_displacement_mm', float('nan')):7.2f} "
                     f"{100 * a.info.get('folding_fraction', float('nan')):7.3f} {a.info.get('seconds', float('nan')):6.1f}")
    return "\n".join(lines)
