"""Peak memory of ``masrefine segment`` per stage (#22): one knee *tuning* target, N atlases.

Runs :func:`MASRefineLib.pipeline.segment` (the defaults of ``masrefine segment``, CPU, 2 threads) in this
process while a thread samples the process's resident set size (psutil, every 0.2 s) and tags each sample with
the stage of the latest progress event. Prints the peak RSS per stage and writes
``docs/results/memory/<name>.json``; ``--render`` renders every result file there into the table of
docs/memory.md (between its markers), with the per-atlas growth of each stage's peak between two runs of one commit;
``--compare A B`` checks two output folders voxel for voxel (every
.nii.gz / .nrrd array and the manifest's QA numbers): how a memory change is shown to change no output.

The target is the split's first tuning target (bench/datasets.benchmark_split("knee", "tuning")); the atlases
are the split's 10 tuning atlases, and for more than 10 the further tuning subjects that are not the target
(never a report subject). RSS includes what torch's allocator keeps cached: it is what the machine must hold.

    .venv/bin/python bench/memory.py --atlases 10 --name knee-10-before
    .venv/bin/python bench/memory.py --compare .cache/memory/knee-10-before/out .cache/memory/knee-10/out
    .venv/bin/python bench/memory.py --render
    # issue 22's series: 5, 10, 20, 40 atlases of one commit, one plot (beyond 26 atlases the subjects repeat)
    for n in 5 10 20 40; do .venv/bin/python bench/memory.py --atlases $n --name stream-$n; done
    .venv/bin/python bench/memory.py --render --plot stream
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the dataset caches are relative to the repository root

RESULTS = ROOT / "docs" / "results" / "memory"
WORK = ROOT / ".cache" / "memory"
DOC = ROOT / "docs" / "memory.md"
BEGIN, END = "<!-- memory table: bench/memory.py --render -->", "<!-- end memory table -->"
SLOPE_BEGIN, SLOPE_END = "<!-- slope table: bench/memory.py --render -->", "<!-- end slope table -->"
INTERVAL_S = 0.2


def knee_split(n_atlases: int) -> tuple[list[str], str]:
    """(atlas subject ids, target id): the tuning split's atlases, extended by further non-report tuning subjects
    beyond 10, and its first tuning target. Beyond the tuning subjects besides the target (26 on the knee data)
    the subjects repeat in the same order: memory depends on how many atlases a run holds, not on who they are
    (the repeats are registered and fused like any atlas; their Dice says nothing)."""
    from bench import datasets
    atlases, targets = datasets.benchmark_split("knee", "tuning")
    target = targets[0]
    pool = datasets.training_pool("knee", exclude=[target, *atlases])
    order = [s for s in datasets._seed0_order("knee") if s in set(pool)]  # the seed-0 order, as the split's
    distinct = atlases + order
    return [distinct[i % len(distinct)] for i in range(n_atlases)], target


def atlas_ids(subjects: list[str]) -> list[str]:
    """Atlas ids of ``subjects``: a subject's k-th repeat (k >= 2) is ``<subject>-r<k>``."""
    seen: dict[str, int] = {}
    out = []
    for s in subjects:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}-r{seen[s]}")
    return out


def knee_atlas_set(subjects: list[str]):
    """The atlas set of ``subjects`` (bench/datasets.make_atlas_set); with repeats, one in ``.cache/memory/`` whose
    images and labels folders hold links named by :func:`atlas_ids` to the knee cache's files."""
    from bench import datasets
    if len(set(subjects)) == len(subjects):
        return datasets.make_atlas_set("knee", subjects)
    from MASRefineLib.atlas import AtlasSet, init_atlas_set
    kd = datasets.knee_dataset(sorted(set(subjects)))
    ids = atlas_ids(subjects)
    root = WORK / f"atlas-set-knee-{len(ids)}"
    if (root / "atlas.json").exists() and AtlasSet.load(root).ids == ids:
        return AtlasSet.load(root)
    for kind in ("images", "labels"):
        d = root / "files" / kind
        d.mkdir(parents=True, exist_ok=True)
        for s, i in zip(subjects, ids):
            link = d / f"{i}.nii.gz"
            if not link.is_symlink():
                link.symlink_to((kd / kind / f"{s}.nii.gz").resolve())
    return init_atlas_set(root, root / "files" / "images", root / "files" / "labels", kd / "labels.json", ids=ids,
                          overwrite=True)


class Sampler(threading.Thread):
    """Samples this process's RSS every ``INTERVAL_S`` and keeps the peak per stage."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil
        self.proc = psutil.Process()
        self.stage = "start"
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self.samples: list[tuple[float, str, int]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        rss, stage = self.proc.memory_info().rss, self.stage
        if stage not in self.peaks:
            self.order.append(stage)
        self.peaks[stage] = max(self.peaks.get(stage, 0), rss)
        self.samples.append((round(time.perf_counter() - self.t0, 2), stage, rss))

    def run(self) -> None:
        while not self.stop.wait(INTERVAL_S):
            self.sample()

    def progress(self, ev) -> None:
        if ev.stage != self.stage:
            self.sample()  # the last sample of the stage that ends
            self.stage = ev.stage
            self.sample()


def measure(n_atlases: int, name: str, threads: int, commit: str | None = None) -> dict:
    import psutil
    import torch
    from bench import datasets
    from MASRefineLib.pipeline import SegmentOptions, segment

    subjects, target = knee_split(n_atlases)
    aset = knee_atlas_set(subjects)
    ids = aset.ids
    img, truth = datasets.knee_case(target)
    out = WORK / name / "out"
    out.mkdir(parents=True, exist_ok=True)
    s = Sampler()
    s.sample()
    s.start()
    t0 = time.perf_counter()
    segment(img, aset.root, out, SegmentOptions(device="cpu", threads=threads, train_missing=False),
            progress=s.progress, truth=truth, groups={"bones": [1, 3], "cartilages": [2, 4]})
    s.stage = "end"
    s.sample()
    s.stop.set()
    s.join()
    rec = {"name": name, "dataset": "knee", "split": "tuning", "target": target, "atlases": ids,
           "n_atlases": len(ids), "distinct_subjects": len(set(subjects)), "threads": threads, "interval_s": INTERVAL_S, "seconds": round(time.perf_counter() - t0, 1),
           "peak_mb": round(max(s.peaks.values()) / 2**20),
           "stages": [{"stage": k, "peak_mb": round(s.peaks[k] / 2**20)} for k in s.order],
           "output": str(out.relative_to(ROOT)), "commit": commit or _commit(), "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "total_memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
           "samples_mb": [(t, st, round(r / 2**20)) for t, st, r in s.samples[::5]]}
    return rec


def _commit() -> str:
    import subprocess
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two ``segment`` output folders: every image file's voxel array (bitwise) and
    grid, the set of files, and the manifest's per-atlas QA numbers and metrics. Empty when identical."""
    import numpy as np
    import SimpleITK as sitk
    problems = []
    exts = (".nii.gz", ".nrrd")
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.name.endswith(exts))
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.name.endswith(exts))
    if fa != fb:
        problems.append(f"file lists differ: {sorted(set(fa) ^ set(fb))}")
    for rel in sorted(set(fa) & set(fb)):
        ia, ib = sitk.ReadImage(str(a / rel)), sitk.ReadImage(str(b / rel))
        xa, xb = sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib)
        if (ia.GetSpacing(), ia.GetOrigin(), ia.GetDirection()) != (ib.GetSpacing(), ib.GetOrigin(), ib.GetDirection()):
            problems.append(f"{rel}: grids differ")
        if xa.dtype != xb.dtype or xa.shape != xb.shape:
            problems.append(f"{rel}: {xa.dtype}{xa.shape} vs {xb.dtype}{xb.shape}")
        elif not np.array_equal(xa, xb):
            d = float(np.abs(xa.astype(np.float64) - xb.astype(np.float64)).max())
            problems.append(f"{rel}: arrays differ (max |diff| {d:.3g}, {int((xa != xb).sum())} voxels)")
    for f in ("qa.csv", "metrics.csv", "metrics.json", "atlases/report.json"):
        if (a / f).exists() != (b / f).exists():
            problems.append(f"{f} in one folder only")
        elif (a / f).exists() and _table(a / f, a.parent) != _table(b / f, b.parent):
            problems.append(f"{f} differs")
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for key in ("labels", "target_grid", "atlases", "summary", "outputs"):  # atlases: the per-atlas QA numbers
        if _strip(ma.get(key), a.parent) != _strip(mb.get(key), b.parent):
            problems.append(f"manifest {key!r} differs")
    return problems


def _table(path: Path, root: Path | None = None):
    """A CSV's rows without the seconds column (timings differ between any two runs), or a JSON file
    (:func:`_strip`)."""
    import csv
    if path.suffix == ".json":
        return _strip(json.loads(path.read_text()), root)
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if "second" not in k} for row in csv.DictReader(f)]


def _strip(x, root: Path | None = None):
    """A manifest part without timings and output paths (which differ between any two runs); input paths from the
    repository's .cache on (a run from a copy of the tree sees them under the copy); ``root`` (the folder above the
    output folder, where a run may keep its own copy of the inputs, e.g. the atlas set) written as ``<run>``."""
    if isinstance(x, dict):
        return {k: _strip(v, root) for k, v in x.items()
                if not any(w in k for w in ("second", "time", "timing", "path", "dir"))}
    if isinstance(x, list):
        return [_strip(v, root) for v in x]
    if isinstance(x, str) and "/.cache/" in x:  # an input under the cache, as seen from the run's (copied) tree
        return x[x.index("/.cache/"):]
    if isinstance(x, str) and root is not None and x.startswith(str(root) + os.sep):
        return "<run>" + x[len(str(root)):]
    return x


def render() -> str:
    recs = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")),
                  key=lambda r: (r["n_atlases"], r["date"], r["name"]))
    stages = list(dict.fromkeys(s["stage"] for r in recs for s in r["stages"]))
    head = ["run", "atlases", "commit", "peak MB", *[f"{s} MB" for s in stages], "s"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in recs:
        per = {s["stage"]: s["peak_mb"] for s in r["stages"]}
        rows.append("| " + " | ".join([r["name"], str(r["n_atlases"]), r["commit"], str(r["peak_mb"]),
                                        *[str(per.get(s, "")) for s in stages], f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(rows)


def slopes() -> str:
    """Per-atlas growth of each stage's peak (MB per atlas) between the runs of one commit with the fewest and the
    most atlases: (peak at N2 - peak at N1) / (N2 - N1), per commit that has runs with two atlas counts."""
    recs = [json.loads(p.read_text()) for p in RESULTS.glob("*.json")]
    by: dict[str, list[dict]] = {}
    for r in recs:
        by.setdefault(r["commit"], []).append(r)
    stages = list(dict.fromkeys(s["stage"] for r in recs for s in r["stages"]))
    head = ["commit", "runs", "peak MB/atlas", *[f"{s} MB/atlas" for s in stages]]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for commit, rs in sorted(by.items()):
        lo, hi = min(rs, key=lambda r: r["n_atlases"]), max(rs, key=lambda r: r["n_atlases"])
        dn = hi["n_atlases"] - lo["n_atlases"]
        if dn <= 0:
            continue
        pl, ph = ({s["stage"]: s["peak_mb"] for s in r["stages"]} for r in (lo, hi))
        per = [f"{(ph[s] - pl[s]) / dn:.0f}" if s in pl and s in ph else "" for s in stages]
        rows.append("| " + " | ".join([commit, f"{lo['name']} -> {hi['name']}",
                                        f"{(hi['peak_mb'] - lo['peak_mb']) / dn:.0f}", *per]) + " |")
    return "\n".join(rows)


def plot(series: str, path: Path) -> bool:
    """Peak MB and seconds against the number of atlases for the result files named ``<series>-<N>`` (one
    commit's runs), both in one figure at ``path``. False when fewer than two such runs exist."""
    recs = sorted((json.loads(p.read_text()) for p in RESULTS.glob(f"{series}-*.json")), key=lambda r: r["n_atlases"])
    recs = [r for r in recs if r["name"] == f"{series}-{r['n_atlases']}"]
    if len(recs) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = [r["n_atlases"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(n, [r["peak_mb"] for r in recs], "o-", color="tab:blue", label="peak MB")
    ax.axhline(3072, color="tab:blue", ls=":", lw=1)
    ax.set_xlabel("atlases")
    ax.set_ylabel("peak resident memory (MB)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(n, [r["seconds"] for r in recs], "s--", color="tab:red", label="seconds")
    ax2.set_ylabel("wall seconds", color="tab:red")
    ax.set_xticks(n)
    commits = sorted({r["commit"] for r in recs})
    ax.set_title(f"segment defaults, knee tuning target, {recs[0]['threads']} threads ({', '.join(commits)})", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def write_doc() -> None:
    text = DOC.read_text()
    i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
    text = text[:i] + "\n" + render() + "\n" + text[j:]
    if SLOPE_BEGIN in text:
        i, j = text.index(SLOPE_BEGIN) + len(SLOPE_BEGIN), text.index(SLOPE_END)
        text = text[:i] + "\n" + slopes() + "\n" + text[j:]
    DOC.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlases", type=int, default=10)
    ap.add_argument("--name", default=None, help="result name (default knee-<N>)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--commit", help="commit to record when run from a copy without .git (e.g. a git archive of it)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two output folders and exit")
    ap.add_argument("--render", action="store_true", help="render docs/results/memory/*.json into docs/memory.md")
    ap.add_argument("--plot", metavar="SERIES", help="with --render: plot the runs named SERIES-<N> into "
                    "docs/results/memory/SERIES.png (peak MB and seconds against N)")
    a = ap.parse_args(argv)
    if a.compare:
        pa, pb = (Path(x).resolve() for x in a.compare)
        problems = compare(pa, pb)
        n = sum(1 for p in pa.rglob("*") if p.name.endswith((".nii.gz", ".nrrd")))
        text = (f"{pa.parent.name} vs {pb.parent.name}: " +
                ("; ".join(problems) if problems else
                 f"identical: {n} image files (.nii.gz/.nrrd) bitwise with equal grids; qa.csv, metrics.csv/.json, "
                 f"atlases/report.json and the manifest's labels, grid, per-atlas QA, summary and output list equal (timings left out)"))
        print(text)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"compare-{pa.parent.name}-{pb.parent.name}.txt").write_text(text + "\n")
        return 1 if problems else 0
    if a.render:
        if a.plot:
            print(f"plot: {'written' if plot(a.plot, RESULTS / (a.plot + '.png')) else 'fewer than two runs'}")
        write_doc()
        print(render())
        print(slopes())
        return 0
    name = a.name or f"knee-{a.atlases}"
    rec = measure(a.atlases, name, a.threads, a.commit)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    for s in rec["stages"]:
        print(f"{s['stage']:>16}: {s['peak_mb']:6d} MB")
    print(f"peak {rec['peak_mb']} MB, {rec['seconds']:.0f} s -> {RESULTS / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
