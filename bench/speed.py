#!/usr/bin/env python3
"""Speed of ``masrefine segment`` (issue 22): one table per data set and split, rendered from the result files.

No second measuring path: the numbers are bench/pipeline.py's result files (``docs/results/pipeline/<dataset>-
<split>/*.json``), whose MASRefine rows record wall and CPU seconds of the whole run and of each stage, and the
process's peak memory, at the benchmark's thread count. This script renders, for every MASRefine configuration
there (``masrefine`` = the defaults, ``masrefine-fast`` = ``--preset fast``, ``masrefine-greedy`` = ``--preset
greedy``), mean ± sd over the targets that have every configuration shown: wall s, CPU s, seconds per stage, peak MB,
Dice per label group, and the paired per-target Dice difference against the defaults, beside issue 22's targets
(wall <= 120 s per knee and <= 60 s per brain target at 2 threads; peak <= 3 GB at 10 knee atlases).

    .venv/bin/python bench/pipeline.py --dataset knee --split tuning --methods masrefine,masrefine-fast   # measure
    .venv/bin/python bench/speed.py                 # print every table, rewrite docs/results/speed.md
    .venv/bin/python bench/speed.py --check         # exit 1 when docs/results/speed.md is not what they render
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "pipeline"
DOC = ROOT / "docs" / "results" / "speed.md"
# issue 22's targets: wall seconds per target at 2 threads, and peak MB at 10 knee atlases
WALL_TARGET_S = {"knee": 120.0, "ixi": 60.0}
PEAK_TARGET_MB = {"knee": 3 * 1024.0}
STAGES = ("register", "refine", "fuse", "write")
DEFAULT = "masrefine"


def _ms(vals: list[float], digits: int = 0) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    sd = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
    return f"{statistics.fmean(vals):.{digits}f}{sd}"


def table(dataset: str, split: str) -> str | None:
    """The markdown table of one data set and split (None when no MASRefine row exists)."""
    recs = [json.loads(p.read_text()) for p in sorted((RESULTS / f"{dataset}-{split}").glob("*.json"))]
    methods = sorted({m for r in recs for m in r["methods"] if m.startswith("masrefine")},
                     key=lambda m: (m != DEFAULT, m))
    if not methods:
        return None
    recs = [r for r in recs if all(m in r["methods"] for m in methods)]
    if not recs:
        return None
    groups = [g for g in recs[0]["methods"][methods[0]]["metrics"] if g != "mean"] or ["mean"]
    head = ["configuration", "wall s", "CPU s", "load at start", *[f"{s} s" for s in STAGES], "peak MB",
            *[f"Dice {g} %" for g in groups]]
    if len(methods) > 1:
        head += [f"Δ Dice {g} vs default (ahead)" for g in groups]
    lines = [f"#### {dataset}, {split} targets ({len(recs)}: {', '.join(r['target'] for r in recs)})", "",
             f"Issue 22's targets: wall <= {WALL_TARGET_S[dataset]:.0f} s per target"
             + (f", peak <= {PEAK_TARGET_MB[dataset]:.0f} MB at 10 atlases" if dataset in PEAK_TARGET_MB else "")
             + f"; {recs[0]['methods'][methods[0]].get('threads')} threads, {len(recs[0]['atlases'])} atlases; "
             "mean ± sd over the targets; load at start: the 1-minute load average when the run began (above 2, the "
             "2 cores were shared and wall seconds exceed what an idle machine gives).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        rows = [r["methods"][m] for r in recs]
        cells = [m, _ms([x["seconds"] for x in rows]), _ms([x["cpu_seconds"] for x in rows]),
                 _ms([x.get("load_at_start") for x in rows], 1),
                 *[_ms([x["stages"].get(s) for x in rows]) for s in STAGES], _ms([x.get("peak_mb") for x in rows]),
                 *[_ms([100 * x["metrics"][g]["dice"] for x in rows], 2) for g in groups]]
        if len(methods) > 1:
            for g in groups:
                if m == DEFAULT:
                    cells.append("–")
                    continue
                d = [100 * (r["methods"][m]["metrics"][g]["dice"] - r["methods"][DEFAULT]["metrics"][g]["dice"])
                     for r in recs]
                cells.append(f"{_ms(d, 2)} ({sum(x > 0 for x in d)}/{len(d)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render() -> str:
    parts = ["# Speed of `masrefine segment` (issue 22)", "",
             "Rendered by `bench/speed.py` from bench/pipeline.py's result files (`docs/results/pipeline/`), not typed.",
             "Seconds are of one process at the benchmark's thread count on the 2-core machine, measured beside the",
             "peers in the same invocation; stage seconds are the manifest's.", ""]
    for d in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        dataset, split = d.name.split("-", 1)
        t = table(dataset, split)
        if t:
            parts.append(t)
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/results/speed.md is out of date")
    a = ap.parse_args(argv)
    md = render()
    if a.check:
        ok = DOC.exists() and DOC.read_text() == md
        print("docs/results/speed.md is up to date" if ok else "docs/results/speed.md differs: run bench/speed.py")
        return 0 if ok else 1
    DOC.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
