"""``masrefine fuse``: fuse the warped atlases of a registration folder into one segmentation."""
from __future__ import annotations

import argparse
import sys

from ._common import finite_nonneg_float, nonnegative_int, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fuse", help="fuse registered atlases into a segmentation (pv, wv, jlf, staple, votenet)",
        description="Label fusion of the warped atlases in a folder written by 'masrefine register' or "
                    "'masrefine refine'. Writes OUT/fused.nii.gz and OUT/fused.seg.nrrd (label values and "
                    "names of the atlas set), OUT/posteriors/label_<value>.nii.gz, OUT/weights/<atlas>.nii.gz "
                    "and OUT/fusion.json (written last). Only voxels where the atlases disagree are solved.")
    p.add_argument("--registered", required=True, metavar="DIR", help="folder with report.json and the warped atlases")
    p.add_argument("--target", metavar="IMG", help="target image (default: the target recorded in report.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--method", default="jlf", choices=["pv", "wv", "jlf", "staple", "votenet"],
                   help="pv: plurality vote; wv: locally weighted vote (local correlation); jlf: joint label "
                        "fusion (ANTs defaults); staple: multi-label STAPLE; votenet: VoteNet+ probabilities "
                        "in JLF (needs --model). Default: jlf")
    p.add_argument("--model", metavar="PATH",
                   help="VoteNet+ model: votenet.json, a models/ folder or an atlas-set folder (default: the "
                        "atlas set recorded in report.json, if any)")
    g = p.add_argument_group("method parameters (defaults per method)")
    g.add_argument("--alpha", type=finite_nonneg_float, help="JLF ridge alpha (jlf 0.1; votenet: the model's, 0.01)")
    g.add_argument("--beta", type=finite_nonneg_float, help="JLF exponent beta (default 2)")
    g.add_argument("--patch-radius", type=nonnegative_int, metavar="VOX",
                   help="JLF patch radius in voxels (jlf 2, votenet 1)")
    g.add_argument("--search-radius", type=nonnegative_int, metavar="VOX", help="JLF search radius in voxels (default 3)")
    g.add_argument("--window", type=positive_int, metavar="VOX", help="wv: local correlation window in voxels (default 5)")
    g.add_argument("--power", type=finite_nonneg_float, help="wv: weight = max(correlation, 0)^power (default 4)")
    g.add_argument("--max-iter", type=positive_int, help="staple: maximum EM iterations (default 50)")
    p.add_argument("--no-posteriors", action="store_true", help="do not write the per-label posterior maps")
    p.add_argument("--no-weights", action="store_true", help="do not write the per-atlas weight maps")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.set_defaults(func=run)
    return p


_PARAMS = {"pv": [], "wv": ["window", "power"], "jlf": ["alpha", "beta", "patch_radius", "search_radius"],
           "staple": ["max_iter"], "votenet": ["alpha", "beta", "patch_radius"]}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import MASRefineError
    from ..fusion import fuse
    from ..geometry import Grid
    from ..imageio import read_image
    from ..outputs import prepare_output_dir, warped_set_inputs
    from ..progress import tqdm_progress
    from ..warped import WarpedSet
    from ._common import check_target_grid

    warped = WarpedSet.load(args.registered)
    target = args.target or warped.target_path
    if not target:
        raise MASRefineError(f"{args.registered}/report.json records no target image: give --target IMG")
    params = {}
    for name in ("alpha", "beta", "patch_radius", "search_radius", "window", "power", "max_iter"):
        v = getattr(args, name)
        if v is None:
            continue
        if name not in _PARAMS[args.method]:
            raise MASRefineError(f"--{name.replace('_', '-')} does not apply to --method {args.method}")
        params[name] = v
    model = None
    if args.method == "votenet":
        model = args.model or warped.info.get("atlas_set")
        if not model:
            raise MASRefineError("--method votenet needs --model (votenet.json, models/ or the atlas-set folder)")
    image = read_image(target)
    check_target_grid(target, Grid.from_image(image), args.registered, warped.target_grid)
    # before anything is written: a new or earlier 'fuse' folder, apart from --registered and the atlases
    out_dir = prepare_output_dir(args.out, command="fuse",
                                 inputs=[*warped_set_inputs(args.registered, warped), ("--target image", target),
                                         ("--model", args.model)])
    with tqdm_progress(disable=not sys.stderr.isatty()) as bar:
        result = fuse(warped, image, args.method, device=args.device, progress=bar, model=model, **params)
    path = result.save(out_dir, posteriors=not args.no_posteriors, weights=not args.no_weights,
                       extra={"registered": str(Path(args.registered).resolve()), "target": str(target)})
    n = int(result.posteriors.uncertain.sum())
    print(f"{args.method}: {len(result.atlas_ids)} atlases, {n} of {result.labels.size} voxels solved, "
          f"{result.seconds:.1f} s -> {path}")
    return 0
