"""``masrefine batch``: segment a cohort of targets with one atlas set on Dask (a local cluster or a scheduler)."""
from __future__ import annotations

import argparse
import sys
import time

from ._common import positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    from .segment import add_segment_options
    p = sub.add_parser(
        "batch", help="segment many targets with one atlas set on Dask (this machine or a cluster)",
        description="Run the segment pipeline on every target (one Dask task each) into OUT/<target id>/, exactly "
                    "as 'masrefine segment' writes it, on a local Dask cluster sized from this machine or on a "
                    "running Dask scheduler. Finished targets are skipped when the command is run again; a failed "
                    "target is tried once more, then reported in OUT/summary.csv without stopping the others. "
                    "docs/batch.md: clusters (SLURM/PBS, several machines, GPUs).")
    p.add_argument("--atlases", required=True, metavar="DIR", help="atlas set folder (with atlas.json)")
    p.add_argument("--targets", required=True, metavar="DIR|LIST.txt|CSV",
                   help="a folder of target images, a text file with one image path per line, or a CSV with a "
                        "column 'image' (and optional 'id', 'truth'); paths relative to the list's folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (one sub-folder per target)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running Dask scheduler, e.g. tcp://node1:8786 (default: a local cluster)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="local cluster: worker processes (default: from the cores, the memory a target needs and "
                        "the GPUs with --device cuda)")
    p.add_argument("--threads-per-worker", type=positive_int, default=1, metavar="T",
                   help="local cluster: targets each worker runs at once (default: 1)")
    p.add_argument("--dashboard", default="127.0.0.1:8787", metavar="HOST:PORT",
                   help="local cluster: address of the Dask dashboard ('none': no dashboard; default: "
                        "127.0.0.1:8787, another port when taken)")
    add_segment_options(p)
    p.add_argument("--truth", metavar="DIR",
                   help="folder of reference segmentations named as the targets: per-target metrics and the "
                        "cohort's mean +- sd per label group (OUT/cohort_metrics.csv)")
    p.add_argument("--groups", metavar="JSON", help='label groups for the metrics, e.g. {"bone": [1, 3]}')
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


class BatchProgress:
    """The terminal's view of a batch: a tqdm bar of targets finished (done / failed / running, ETA) and, before
    the batch, the bars of model training (segment's); a line per change when stderr is not a terminal."""

    def __init__(self, quiet: bool = False):
        from .segment import terminal_progress
        self.quiet = quiet
        self.stages = terminal_progress(quiet)
        self.bar = None
        self.last = ""
        self.last_t = 0.0

    def __call__(self, ev) -> None:
        if ev.stage != "batch":
            self.stages(ev)
            return
        if self.quiet:
            return
        d = ev.data
        if not sys.stderr.isatty():
            if ev.message != self.last or time.monotonic() - self.last_t > 60:
                eta = "" if d.get("eta_s") is None else \
                    f", about {d['eta_s']:.0f} s left" if d["eta_s"] < 120 else f", about {d['eta_s'] / 60:.0f} min left"
                print(f"[batch {d['done'] + d['failed'] + d['skipped']}/{d['total']}] {ev.message}{eta}",
                      file=sys.stderr, flush=True)
                self.last, self.last_t = ev.message, time.monotonic()
            return
        from tqdm import tqdm
        if self.bar is None:
            self.stages.__exit__(None, None, None)
            self.bar = tqdm(total=d["total"], initial=d["skipped"], desc="targets", unit="target", dynamic_ncols=True)
        self.bar.n = d["done"] + d["failed"] + d["skipped"]
        self.bar.set_postfix_str(ev.message, refresh=False)
        self.bar.refresh()

    def __enter__(self):
        self.stages.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        self.stages.__exit__(*exc)


def run(args: argparse.Namespace) -> int:
    from ..batch import run_batch
    from ..metrics import parse_groups
    from ..pipeline import SegmentOptions
    from .segment import console_logging, format_rows

    groups = parse_groups(args.groups)
    opts = SegmentOptions.from_parameters(vars(args))
    if not args.quiet:
        console_logging()
    dashboard = None if (args.dashboard or "").lower() in ("", "none") else args.dashboard

    def cluster_up(info: dict) -> None:
        where = info["scheduler"] + (f" ({info['workers']} workers x {info['threads_per_worker']} threads, "
                                     f"{info['memory_limit'] / 2 ** 30:.1f} GiB each)" if "memory_limit" in info else "")
        print(f"Dask scheduler: {where}", file=sys.stderr)
        print(f"Dask dashboard: {info['dashboard'] or 'none'}", file=sys.stderr, flush=True)

    with BatchProgress(args.quiet) as bar:
        r = run_batch(args.atlases, args.targets, args.out, opts, scheduler=args.scheduler, workers=args.workers,
                      threads_per_worker=args.threads_per_worker, truth=args.truth, groups=groups,
                      dashboard=dashboard, progress=bar, on_cluster=cluster_up)
    c = r["counts"]
    failed = [row for row in r["rows"] if row["status"] == "failed"]
    for row in failed:
        print(f"failed: {row['id']}: {row.get('error', '')}")
    if r["cohort"]:
        from ..batch import cohort_metrics
        print(format_rows([{"group": x["group"], "metric": x["metric"], "n": x["n"],
                            "mean +- sd": f"{x['mean']:.4g} +- {x['sd']:.2g}"} for x in cohort_metrics(r["rows"])]))
    print(f"{c['done']} done, {c['skipped']} skipped (finished before), {c['failed']} failed of {c['total']} targets "
          f"in {r['seconds']:.0f} s")
    print(f"summary: {r['summary']}")
    if r["cohort"]:
        print(f"cohort:  {r['cohort']}")
    return 1 if failed else 0
