"""``masrefine segment``: multi-atlas segmentation of one target, end to end (register, refine, fuse)."""
from __future__ import annotations

import argparse
import math

from ._common import finite_nonneg_float, nonnegative_int, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment", help="segment a target image with an atlas set (register, refine, fuse)",
        description="Pre-register every atlas of the atlas set to the target, refine the registrations "
                    "(VoteNet++, paper Eq. 3-6), fuse the warped labels, and write the fused segmentation "
                    "(.nii.gz, .seg.nrrd), posteriors, per-atlas warped images/labels/displacement fields, "
                    "per-atlas QA numbers (qa.csv), a QA picture (qa.png) and manifest.json (last).")
    p.add_argument("--atlases", required=True, metavar="DIR", help="atlas set folder (with atlas.json)")
    p.add_argument("--target", required=True, metavar="IMG", help="target image (NIfTI, NRRD, MHA)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_segment_options(p)
    p.add_argument("--truth", metavar="IMG", help="reference segmentation of the target: also write metrics")
    p.add_argument("--groups", metavar="JSON", help='label groups for the metrics, e.g. {"bone": [1, 3]}')
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def add_segment_options(p: argparse.ArgumentParser) -> None:
    """The options of the pipeline itself (``segment`` and ``batch`` share them; read by
    :meth:`~MASRefineLib.pipeline.SegmentOptions.from_parameters` of ``vars(args)``)."""
    from ..protocol.jobs import PARAMETERS
    for name in ("prereg", "refine", "fusion", "preset", "device"):
        typ, choices, default, hlp = PARAMETERS[name]
        p.add_argument(f"--{name}", choices=choices, default=default, help=f"{hlp} (default: {default})")
    p.add_argument("--alpha", type=finite_nonneg_float, help=PARAMETERS["alpha"][3])
    p.add_argument("--gamma", type=finite_nonneg_float, help=PARAMETERS["gamma"][3])
    p.add_argument("--iterations", type=positive_int, help=PARAMETERS["iterations"][3])
    p.add_argument("--no-train", dest="train_missing", action="store_false",
                   help="never train missing models; fail with the 'masrefine train ...' command to run instead")
    p.add_argument("--no-atlas-outputs", dest="save_atlases", action="store_false",
                   help="do not write per-atlas warped images, labels and fields")
    p.add_argument("--no-qa-picture", dest="qa_picture", action="store_false", help="do not write qa.png")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="random seed of registration, refinement and model training (default: 0)")
    p.add_argument("--threads", type=positive_int, default=0, metavar="N",
                   help="torch CPU threads, at least 1 (default: torch's choice)")


class _StageLines:
    """Progress for a log file or pipe: a line when a stage begins, then at most one every 10 s."""

    def __init__(self, interval_s: float = 10.0):
        self.stage = None
        self.last = 0.0
        self.interval_s = interval_s

    def __call__(self, ev) -> None:
        import sys
        import time
        now = time.monotonic()
        if ev.stage != self.stage or now - self.last >= self.interval_s:
            self.stage, self.last = ev.stage, now
            print(f"[{ev.stage} {100 * ev.fraction:3.0f}%] {ev.message}".rstrip(), file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def terminal_progress(quiet: bool = False):
    """tqdm bars on a terminal, one line per stage otherwise (a context manager and a callback)."""
    import sys
    from ..progress import tqdm_progress
    if quiet:
        return tqdm_progress(disable=True)
    return tqdm_progress() if sys.stderr.isatty() else _StageLines()


def console_logging() -> None:
    """Show the library's info messages (e.g. "training the surrogate segmenter first") on stderr."""
    import logging
    lg = logging.getLogger("MASRefineLib")
    if not any(getattr(h, "_masrefine_console", False) for h in lg.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        h._masrefine_console = True
        lg.addHandler(h)
        lg.setLevel(logging.INFO)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of dict rows (QA numbers)."""
    if not rows:
        return ""
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, width)))
    return "\n".join([line(cols), "-" * len(line(cols))] + [line(r) for r in cells])


def run(args: argparse.Namespace) -> int:
    from ..protocol.manifest import read_manifest
    from ..metrics import parse_groups
    from ..pipeline import SegmentOptions, segment

    groups = parse_groups(args.groups)  # JSON text or a file: a missing file is refused before any work
    opts = SegmentOptions.from_parameters(vars(args))
    if not args.quiet:
        console_logging()
    with terminal_progress(args.quiet) as bar:
        result = segment(args.target, args.atlases, args.out, opts, bar, truth=args.truth, groups=groups,
                         out_option="--out", atlas_option="--atlases")
    m = read_manifest(result["manifest"])
    print(format_rows([{"id": a["id"], **a.get("qa", {})} for a in m.get("atlases", [])]))
    secs = result["summary"]["seconds"]
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()) + f"; total {sum(secs.values()):.1f}")
    for fb in result["summary"].get("fallbacks", []):
        print(f"note: {fb}")
    if "metrics" in result["summary"]:
        mt = result["summary"]["metrics"]
        for name, s in list(mt.get("groups", {}).items()) + [("mean", mt["mean"])]:
            print(f"{name}: Dice {100 * (s['dice'] or 0):.2f}%  surface Dice {100 * (s['surface_dice'] or 0):.2f}%  "
                  f"ASD {s['asd_mm'] if s['asd_mm'] is not None else float('nan'):.3f} mm  "
                  f"HD95 {s['hd95_mm'] if s['hd95_mm'] is not None else float('nan'):.3f} mm")
    print(f"fused labels: {result['fused']}")
    print(f"manifest:     {result['manifest']}")
    return 0
