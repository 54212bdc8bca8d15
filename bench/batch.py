#!/usr/bin/env python3
"""Benchmark (not a test): ``masrefine batch`` against a shell loop of ``masrefine segment`` on knee targets.

8 knee targets (tuning subjects after the 10 tuning atlases in bench/datasets.py's seed-0 order; never a report
subject) segmented with the 10 tuning atlases, ``segment``'s defaults unless ``--refine/--fusion/--preset`` say
otherwise, three ways on this machine:

- ``loop``: one ``masrefine segment --threads 2`` process per target, one after the other (what a shell loop does:
  Python, torch and the atlas set loaded again for every target);
- ``batch 1x2``: ``masrefine batch --workers 1 --threads-per-worker 2`` (two targets at once in one process, one
  torch thread each, the atlas set loaded once);
- ``batch 2x1``: ``masrefine batch --workers 2 --threads-per-worker 1`` (two processes, one target each).

For each: wall seconds for all targets, targets per hour, seconds per target (mean over targets; the batch's are its
tasks' wall clock, two of which run at once), peak memory per worker process (the loop: per ``segment`` process) in
MB, and the load average at the start (another benchmark on the machine shows there). Every way writes its own
output folder under ``.cache/bench-batch/`` and is rerun from scratch (``--keep`` reuses finished outputs, which a
batch then skips: for checking the table only). The batch must beat the loop; the table says by how much.

    .venv/bin/python bench/batch.py                        # about 3 x 8 x 10 CPU min with the defaults
    .venv/bin/python bench/batch.py --refine none --targets 4

    .venv/bin/python bench/batch.py --check                # exit 1 when docs/results/batch.md is out of date

Writes ``docs/results/batch/knee-tuning.json`` (the measurement, with the commit and package versions; committed)
and renders ``docs/results/batch.md`` from it (``--render`` renders again without measuring).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "batch" / "knee-tuning.json"
DOC = ROOT / "docs" / "results" / "batch.md"
MASREFINE = [sys.executable, "-m", "MASRefineLib.cli"]


def _peak_rss_mb(proc: subprocess.Popen, stop: threading.Event, out: dict) -> None:
    """Peak resident memory (MB) of ``proc`` and its children, sampled every 0.2 s, per process id."""
    import psutil
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    while not stop.wait(0.2):
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                out[p.pid] = max(out.get(p.pid, 0.0), p.memory_info().rss / 2 ** 20)
            except psutil.NoSuchProcess:
                pass


def run(cmd: list[str]) -> tuple[float, dict]:
    """(wall seconds, {pid: peak MB}) of a command and its child processes."""
    stop, peaks = threading.Event(), {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    th = threading.Thread(target=_peak_rss_mb, args=(proc, stop, peaks), daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    if rc not in (0,):
        raise SystemExit(f"{' '.join(cmd[:4])} ...: exit status {rc}")
    return time.perf_counter() - t0, peaks


def render(doc: dict | None = None) -> str:
    """docs/results/batch.md from the result file (or from ``doc``): one row per way, the loop first."""
    if doc is None:
        if not RESULT.exists():
            return "# Cohort runs: `masrefine batch` against a loop of `segment` (issue 24)\n\nNot measured yet.\n"
        doc = json.loads(RESULT.read_text())
    results = doc["results"]
    loop = results.get("loop", {}).get("wall_s")
    v = doc.get("versions", {})
    lines = ["# Cohort runs: `masrefine batch` against a loop of `segment` (issue 24)", "",
             "Rendered by `bench/batch.py` from `docs/results/batch/knee-tuning.json`, not typed. "
             f"{len(doc['targets'])} knee targets (tuning subjects, never report subjects), {len(doc['atlases'])} "
             f"tuning atlases, options `{' '.join(doc['options'])}`, {doc['cpus']} CPUs, commit {doc.get('commit', '?')}, "
             f"{doc.get('date', '?')}, " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", "",
             "- `loop`: one `masrefine segment --threads 2` process per target, one after the other;",
             "- `batch-WxT`: `masrefine batch --workers W --threads-per-worker T` (a Dask LocalCluster).", "",
             "Seconds per target: the loop's per process; the batch's per task (W targets run at once). "
             "Load at start: the 1-minute load average when the way began (above 2, something else shared the cores).",
             "", "| way | wall s (all targets) | targets / hour | s / target | peak MB per worker | faster than the loop |"
             " load at start |", "|---|---|---|---|---|---|---|"]
    for way, r in results.items():
        peaks = r.get("peak_mb_per_worker") or {}
        pk = ", ".join(f"{x:.0f}" for x in peaks.values()) if peaks else f"{max(r['peak_mb_per_process']):.0f} (max)"
        vs = f"{loop / r['wall_s']:.2f}x" if loop else ""
        lines.append(f"| {way} | {r['wall_s']:.0f} | {r['targets_per_hour']:.1f} | {r['per_target_s']:.0f} | {pk} | "
                     f"{vs} | {r['load_at_start']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=int, default=8, help="knee targets (default 8)")
    ap.add_argument("--refine", default="I")
    ap.add_argument("--fusion", default="jlf")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--ways", default="loop,batch-1x2,batch-2x1")
    ap.add_argument("--keep", action="store_true", help="reuse finished outputs (checking the table only)")
    ap.add_argument("--render", action="store_true", help="render docs/results/batch.md from the committed result")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/results/batch.md is out of date")
    a = ap.parse_args(argv)
    if a.check:
        ok = DOC.exists() and DOC.read_text() == render()
        print("docs/results/batch.md is up to date" if ok else "docs/results/batch.md differs: run bench/batch.py --render")
        return 0 if ok else 1
    if a.render:
        DOC.write_text(render())
        print(DOC.read_text())
        return 0

    atlases, _ = datasets.benchmark_split("knee", "tuning")
    report = set(datasets.REPORT_SUBJECTS["knee"])
    pool = [s for s in datasets._seed0_order("knee") if s not in report and s not in atlases]
    targets = pool[:a.targets]
    aset = datasets.make_atlas_set("knee", atlases)
    kd = datasets.knee_dataset(targets)
    work = ROOT / ".cache" / "bench-batch"
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "targets.txt"
    listing.write_text("".join(f"{kd / 'images' / f'{t}.nii.gz'}\n" for t in targets))
    opts = ["--refine", a.refine, "--fusion", a.fusion, "--preset", a.preset, "--no-qa-picture"]

    results = {}
    for way in a.ways.split(","):
        out = work / way
        if out.exists() and not a.keep:
            shutil.rmtree(out)
        load = os.getloadavg()[0]
        if way == "loop":
            per, peaks, wall = [], [], 0.0
            for t in targets:
                s, pk = run(MASREFINE + ["segment", "--atlases", str(aset.root), "--target",
                                         str(kd / "images" / f"{t}.nii.gz"), "--out", str(out / t), "--threads", "2",
                                         "--quiet", *opts])
                wall += s
                per.append(s)
                peaks.append(max(pk.values(), default=0.0))
            results[way] = {"wall_s": wall, "per_target_s": sum(per) / len(per), "peak_mb_per_process": peaks}
        else:
            w, t = way.split("-")[1].split("x")
            wall, pk = run(MASREFINE + ["batch", "--atlases", str(aset.root), "--targets", str(listing), "--out", str(out),
                                        "--workers", w, "--threads-per-worker", t, "--dashboard", "none", "--quiet",
                                        *opts])
            with open(out / "summary.csv") as f:
                rows = list(csv.DictReader(f))
            bad = [r["id"] for r in rows if r["status"] not in ("done", "skipped")]
            if bad:
                raise SystemExit(f"{way}: targets not done: {bad}")
            per_worker: dict[str, float] = {}
            for r in rows:
                if r["peak_memory_mb"]:
                    per_worker[r["worker"]] = max(per_worker.get(r["worker"], 0.0), float(r["peak_memory_mb"]))
            results[way] = {"wall_s": wall, "per_target_s": sum(float(r["seconds"] or 0) for r in rows) / len(rows),
                            "peak_mb_per_worker": per_worker, "peak_mb_all_processes": pk}
        results[way].update(targets_per_hour=len(targets) * 3600 / results[way]["wall_s"], load_at_start=load)

    import pipeline  # noqa: E402  (bench/pipeline.py: the commit and package versions every result records)
    from importlib.metadata import version
    doc = {"targets": targets, "atlases": atlases, "options": opts, "cpus": os.cpu_count(),
           "commit": pipeline.commit(), "date": time.strftime("%Y-%m-%d"),
           "versions": {k: version(k) for k in ("torch", "SimpleITK", "dask", "distributed")}, "results": results}
    if a.keep:  # a table check on reused outputs is not a measurement: it stays in .cache
        (work / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    else:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(doc, indent=1) + "\n")
        DOC.write_text(render())
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
