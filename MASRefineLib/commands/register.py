"""``masrefine register``: affine + deformable registration of every atlas of a set to one target."""
from __future__ import annotations

import argparse
import sys

from ._common import nonnegative_int, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "register", help="register the atlases of a set to a target (affine, deformable)",
        description="Affinely, then deformably, register every atlas of an atlas set to a target image, all "
                    "atlases together on one device, and write per atlas the warped image, warped labels "
                    "(.nii.gz and .seg.nrrd), the total displacement field (.nrrd, LPS mm, a Slicer grid "
                    "transform) and report.json (per-atlas seconds, final similarity, folding fraction). "
                    "An atlas that fails is reported and skipped; the others still finish.")
    p.add_argument("--atlases", metavar="DIR", help="atlas-set folder (with atlas.json)")
    p.add_argument("--target", metavar="IMG", help="target image (NIfTI, NRRD, MHA)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--stage", choices=("affine", "deformable"), default="deformable",
                   help="stop after the affine stage, or add the deformable one (default)")
    p.add_argument("--preset", choices=("fast", "default", "accurate", "greedy"), default="default",
                   help="parameter preset (default: default); see --list-params")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change one parameter of the preset, e.g. --set deform_iterations=80,40 "
                        "--set bending_weight=2 (repeatable; see --list-params)")
    p.add_argument("--list-params", action="store_true",
                   help="print the parameters of the chosen preset with their units and exit")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--seed", type=nonnegative_int, help="random seed (default: the preset's, 0)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch, at least 1 (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _overrides(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as a dict of strings (converted and range-checked, NaN included, by the
    registration parameters: ``RegistrationParams.validate``)."""
    from ..errors import MASRefineError
    out = {}
    for item in items:
        if "=" not in item:
            raise MASRefineError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from ..registration import get_params
    from ..registration import params as params_doc

    overrides = _overrides(args.overrides)
    overrides["stage"] = args.stage
    if args.seed is not None:
        overrides["seed"] = args.seed
    params = get_params(args.preset, **overrides)
    if args.list_params:
        print(params_doc.__doc__)
        print(f"preset {args.preset}:")
        for k, v in params.to_json().items():
            print(f"  {k} = {','.join(str(x) for x in v) if isinstance(v, (list, tuple)) else v}")
        return 0

    missing = [f"--{k}" for k in ("atlases", "target", "out") if not getattr(args, k)]
    if missing:
        from ..errors import MASRefineError
        raise MASRefineError(f"{', '.join(missing)} required (or --list-params)")

    import warnings

    import torch

    from ..atlas import AtlasSet
    from ..imageio import read_image
    from ..outputs import atlas_set_inputs, prepare_output_dir
    from ..progress import tqdm_progress
    from ..registration import AtlasInput, register

    if args.threads:
        torch.set_num_threads(args.threads)
    aset = AtlasSet.load(args.atlases)
    target = read_image(args.target)
    prepare_output_dir(args.out, command="register",
                       inputs=[*atlas_set_inputs(args.atlases), ("--target image", args.target)])
    inputs = [AtlasInput(aid, load=(lambda a=aid: aset.read(a)), source_image=str(aset.image_path(aid)),
                         source_label=str(aset.label_path(aid))) for aid in aset.ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collected in the result and printed below
        with tqdm_progress(disable=args.quiet or not sys.stderr.isatty()) as bar:
            ws = register(target, inputs, aset.label_table, params=params, device=args.device, progress=bar,
                          target_path=str(args.target))
    report_path = ws.save(args.out)
    print(f"{'atlas':<24} {'seconds':>8} {'similarity':>11} {'ncc':>7} {'folding':>9}")
    for a in ws.atlases:
        i = a.info
        print(f"{a.id:<24} {i['seconds']:>8.2f} {i['similarity']:>11.4f} {i['ncc']:>7.4f} {i['folding_fraction']:>9.5f}")
    for w in ws.info.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    for f in ws.failed:
        print(f"skipped atlas {f['id']}: {f['error']}", file=sys.stderr)
    print(f"{len(ws.atlases)} atlases registered ({params.stage}, preset {args.preset}, {ws.info['device']}, "
          f"{ws.info['seconds']:.1f} s); wrote {report_path}")
    return 0
