"""``masrefine atlas init|check``: build and validate atlas sets (see :mod:`MASRefineLib.atlas`)."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("atlas", help="build (init) or validate (check) an atlas set",
                       description="Atlas sets: a folder with atlas.json listing atlas images, label maps and "
                                   "the label table.")
    asub = p.add_subparsers(dest="atlas_command", metavar="ACTION")
    asub.required = True

    i = asub.add_parser("init", help="build an atlas set from an image folder and a label-map folder",
                        description="Build OUT/atlas.json from images and label maps with matching file names "
                                    "(IXI013.nii.gz with IXI013.nii.gz, ...). Paths are stored relative to OUT; "
                                    "the data are referenced where they are unless --copy or --symlink is given. "
                                    "Existing files are never overwritten.")
    i.add_argument("out", metavar="OUT", help="atlas-set folder to create (atlas.json is written there)")
    i.add_argument("--images", required=True, metavar="DIR", help="folder of atlas images")
    i.add_argument("--labels", required=True, metavar="DIR", help="folder of label maps (same file names)")
    i.add_argument("--label-table", metavar="FILE",
                   help="label names/colours: JSON {value: {name, color}}, CSV with Index,Name columns "
                        "(e.g. MUSE_listROIs.csv) or a Slicer colour table; default: labels.json beside "
                        "the labels folder, else generated names")
    m = i.add_mutually_exclusive_group()
    m.add_argument("--copy", dest="mode", action="store_const", const="copy",
                   help="copy the files into OUT/images and OUT/labels")
    m.add_argument("--symlink", dest="mode", action="store_const", const="symlink",
                   help="link the files into OUT/images and OUT/labels (relative links)")
    i.add_argument("--ids", nargs="+", metavar="ID", help="only these subjects (file names without suffix)")
    i.add_argument("--force", action="store_true", help="replace an existing OUT/atlas.json (never the data)")
    i.add_argument("--no-check", action="store_true", help="do not validate the new set afterwards")
    i.set_defaults(func=run_init, mode="reference")

    c = asub.add_parser("check", help="validate an atlas set (exit status 1 if it has errors)",
                        description="Read every atlas and report problems, one line each naming the file: "
                                    "missing files, grid mismatches, label values not in the table, empty label "
                                    "maps, non-3D or NaN images; warnings for atlases with differing label sets.")
    c.add_argument("dir", metavar="DIR", help="atlas-set folder (or its atlas.json)")
    c.add_argument("-q", "--quiet", action="store_true", help="print errors and the summary only (no warnings)")
    c.set_defaults(func=lambda args: _check(args.dir, args.quiet))


def run_init(args: argparse.Namespace) -> int:
    from ..atlas import init_atlas_set
    from ..outputs import check_folder_path
    from ..progress import tqdm_progress

    # OUT may already hold the data (atlas init DATA --images DATA/images ...), so only: a folder, not a file
    check_folder_path(args.out, "OUT")
    with tqdm_progress(disable=not sys.stderr.isatty()) as bar:
        aset = init_atlas_set(args.out, args.images, args.labels, args.label_table, mode=args.mode,
                              ids=args.ids, overwrite=args.force, progress=bar)
    for note in aset.notes:
        print(f"note: {note}")
    n, k = len(aset), len(aset.label_table)
    print(f"{aset.json_path}: {n} atlas{'' if n == 1 else 'es'}, {k} label{'' if k == 1 else 's'} ({args.mode} mode)")
    if args.no_check:
        return 0
    return _check(str(aset.root), quiet=False)


def _check(path: str, quiet: bool) -> int:
    from ..atlas import inspect_atlas_set
    from ..progress import tqdm_progress

    with tqdm_progress(disable=not sys.stderr.isatty()) as bar:
        rep = inspect_atlas_set(path, progress=bar)
    for p in rep.problems:
        if p.level == "error" or not quiet:
            print(p)
    print(rep.summary())
    return 0 if rep.ok else 1
