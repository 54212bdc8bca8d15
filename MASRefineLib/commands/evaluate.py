"""``masrefine evaluate``: compare a predicted label map with a reference (Dice, surface Dice, ASD, HD95)."""
from __future__ import annotations

import argparse
import json

from ._common import finite_nonneg_float


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate", help="score a segmentation against a reference label map",
        description="Per-label volume Dice, surface Dice at a tolerance (mm), average symmetric surface "
                    "distance (mm) and 95th-percentile Hausdorff distance (mm), with the mean over labels and "
                    "over optional label groups. Both maps must be on the same grid.")
    p.add_argument("--pred", required=True, metavar="FILE", help="predicted label map (NIfTI, NRRD, MHA)")
    p.add_argument("--ref", required=True, metavar="FILE", help="reference label map on the same grid")
    p.add_argument("--groups", metavar="JSON",
                   help='label groups to average over, as JSON or a JSON file: {"bones": [1, 3], "cartilages": [2, 4]}')
    p.add_argument("--tolerance-mm", type=finite_nonneg_float, default=0.7, metavar="MM",
                   help="surface Dice tolerance in mm (default: 0.7, as in the paper)")
    p.add_argument("--labels", metavar="FILE",
                   help="label table for names (JSON {value: {name, color}}, CSV with Index,Name, or Slicer .ctbl)")
    p.add_argument("--json", metavar="OUT",
                   help="also write all results to this JSON file (replaced if it exists; never one of the inputs)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..imageio import atomic_write_text
    from ..labels import LabelTable
    from ..metrics import evaluate_files, format_table, parse_groups
    from ..outputs import check_output_file

    if args.json is not None:  # before any work: the JSON must not replace what is being evaluated
        check_output_file(args.json, option="--json",
                          inputs=[("--pred label map", args.pred), ("--ref label map", args.ref),
                                  ("--labels table", args.labels), ("--groups file", args.groups)])
    groups = parse_groups(args.groups)
    names = None
    if args.labels:
        names = {v: lab.name for v, lab in LabelTable.load(args.labels).items()}
    result = evaluate_files(args.pred, args.ref, groups=groups, tolerance_mm=args.tolerance_mm)
    print(format_table(result, names))
    if args.json is not None:
        doc = result.to_json_dict(names, pred=str(args.pred), ref=str(args.ref))
        atomic_write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", args.json)
        print(f"wrote {args.json}")
    return 0
