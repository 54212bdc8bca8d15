"""``masrefine experiment``: the paper's Table 1 on a labelled data set (resumable)."""
from __future__ import annotations

import argparse

from ._common import nonnegative_int, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "experiment", help="reproduce the paper's Table 1 on a labelled data set (resumable)",
        description="Split a labelled data set into atlases and targets, train the models on the atlases, and "
                    "evaluate PV, VoteNet+, VoteNet+ (I) and VoteNet+ (IS) after affine and deformable "
                    "pre-registration, plus the U-Net baseline: ASD, surface Dice, 95% HD and volume Dice, "
                    "mean (sd) per label group, and seconds per stage. Writes table1.md, table1.csv, "
                    "results.csv and table1.png. Finished cells are kept: run the same command again to resume.")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="an atlas set (atlas.json) or a folder with images/ and labels/ (and labels.json)")
    p.add_argument("--atlases", type=positive_int, metavar="N", help="number of atlases (a random split)")
    p.add_argument("--targets", type=positive_int, metavar="M", help="number of targets (a random split)")
    p.add_argument("--split", metavar="FILE",
                   help='a fixed split instead: JSON {"atlases": [ids], "targets": [ids]} (ids: the file names of '
                        "the data's images without extension, or the atlas set's ids)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumes what is there)")
    p.add_argument("--prereg", nargs="+", choices=("affine", "deformable"), default=["affine", "deformable"],
                   help="pre-registrations (rows) to run (default: both)")
    p.add_argument("--no-unet", dest="unet", action="store_false", help="leave out the U-Net baseline row")
    p.add_argument("--rows", nargs="+", metavar="ROW",
                   help="only these rows: affine-pv, affine-votenet, affine-votenet-I, affine-votenet-IS, the same "
                        "with deformable-, and unet (default: all rows of --prereg, and unet)")
    p.add_argument("--preset", choices=("fast", "default", "accurate"), default="default",
                   help="speed/accuracy preset of every stage, as 'masrefine segment --preset' (default: default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--groups", metavar="JSON",
                   help='label groups (columns), e.g. {"bone": [1, 3], "cartilage": [2, 4]} '
                        "(default: bones/cartilages when the label names say so, else all labels)")
    p.add_argument("--labels", metavar="FILE", help="label table, when the data folder has no labels.json")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split and of the methods (default: 0)")
    p.add_argument("--threads", type=positive_int, default=0, metavar="N",
                   help="torch CPU threads, at least 1 (default: torch's choice)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import MASRefineError
    from ..experiment import run_experiment
    from ..metrics import parse_groups
    from ..outputs import check_folder_path
    from .segment import console_logging, terminal_progress

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    # only rule 1 of outputs.py: an experiment folder is resumed as it is (finished cells are kept)
    check_folder_path(args.out, "--out")
    groups = parse_groups(args.groups)
    split = None
    if args.split:
        from ..jsonio import read_json
        doc = read_json(args.split, "--split file")
        if not (isinstance(doc, dict) and all(isinstance(doc.get(k), list) and all(isinstance(i, str) for i in doc[k])
                                              for k in ("atlases", "targets"))):
            raise MASRefineError(f'{args.split}: a split file must hold {{"atlases": [ids], "targets": [ids]}}')
        split = (doc["atlases"], doc["targets"])
    elif args.atlases is None or args.targets is None:
        raise MASRefineError("give --atlases N and --targets M (a random split), or --split FILE")
    if not args.quiet:
        console_logging()
    with terminal_progress(args.quiet) as bar:
        r = run_experiment(args.data, args.atlases, args.targets, args.out, preregs=args.prereg, preset=args.preset,
                           device=args.device, seed=args.seed, groups=groups, label_table=args.labels,
                           unet=args.unet, rows=args.rows, split=split, progress=bar)
    print(r["markdown"])
    print()
    print(f"table: {r['table']}\ncsv:   {r['csv']}\nplot:  {r['plot']}")
    return 0
