"""Cohorts: ``masrefine batch`` segments many targets with one atlas set on Dask distributed.

One Dask task per target runs :func:`MASRefineLib.pipeline.segment` (the same pipeline as ``masrefine segment``)
into ``OUT/<target id>/``, exactly as ``segment`` writes it. The output folder::

    OUT/<id>/...               every target's segment output (manifest.json last: pipeline.py)
    OUT/summary.csv            one row per target: status, attempts, seconds, peak memory, QA numbers,
                               metrics (with truth), the one-line error (rewritten while the batch runs)
    OUT/cohort_metrics.csv     with truth: mean and sd over the targets of every metric per label group
    OUT/.masrefine-output      the marker of a batch output folder (outputs.py)

How it runs (docs/batch.md): a :class:`distributed.LocalCluster` on 127.0.0.1 sized from the machine
(:func:`plan_local_cluster`) or an existing ``--scheduler``; each worker keeps the atlas set and the models in memory
(:func:`worker_preloaded`; models are trained before any task starts, tasks never train); a target with a complete
``manifest.json`` of the same settings is skipped (of other settings: the batch stops before anything runs); a failed
target is tried once more, preferably on another worker; Ctrl-C or the worker protocol's cancel sets a Dask
:class:`distributed.Event` that every task checks at its progress reports.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import Cancelled, MASRefineError
from .progress import ProgressCallback, report

log = logging.getLogger("MASRefineLib.batch")

SUMMARY_NAME = "summary.csv"
COHORT_NAME = "cohort_metrics.csv"
#: attempts per target that end in an error the task reports (the first run and one retry)
MAX_ATTEMPTS = 2
#: seconds between two rewrites of summary.csv while the batch runs (a cohort of thousands writes it rarely)
SUMMARY_INTERVAL_S = 30.0
#: seconds between two looks of a task at the cancel event (a round trip to the scheduler)
CANCEL_CHECK_S = 2.0
#: parameters of a run that do not change its results, so a finished target of other values is still "the same"
NOT_COMPARED = ("device", "threads", "train_missing")
#: a target id is a folder name under OUT: letters, digits and these
_ID_CHARS = set("-_.+")
#: names in OUT that are not targets
_RESERVED = {SUMMARY_NAME, COHORT_NAME, ".masrefine-output", ".dask-scratch"}


# ------------------------------------------------------------------------------------------ targets
@dataclass
class Target:
    """One target of a batch: ``id`` (its folder under OUT), the image path and an optional reference label map."""
    id: str
    image: str
    truth: Optional[str] = None


def _check_id(tid: str, source: str) -> str:
    if not tid or tid.startswith(".") or tid in _RESERVED or not all(c.isalnum() or c in _ID_CHARS for c in tid):
        raise MASRefineError(f"{source}: target id {tid!r} cannot be a folder name (letters, digits, - _ . +; "
                             "not starting with a dot)")
    return tid


def read_targets(spec: str | os.PathLike, truth_dir: str | os.PathLike | None = None) -> list[Target]:
    """The targets named by ``spec``: a folder (every image file in it; id = file name without suffix), a text
    list (one image path per line; ``#`` comments; paths relative to the list's folder) or a CSV file with a
    column ``image`` (or ``target``) and optional ``id`` and ``truth`` columns (paths relative to the CSV's folder).

    ``truth_dir``: a folder with each target's reference label map, the file with the target's id as its name
    (any image suffix). Ids must be unique (also ignoring case) and usable as folder names. Raises
    :class:`MASRefineError` naming the file; a target file that does not exist is left for its task to report."""
    from .imageio import image_stem, is_image_file
    p = Path(spec).expanduser()
    targets: list[Target] = []
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and not f.name.startswith(".") and is_image_file(f):
                targets.append(Target(_check_id(image_stem(f), str(f)), str(f.resolve())))
    elif p.is_file():
        base = p.resolve().parent
        if p.suffix.lower() == ".csv":
            try:
                with open(p, newline="", encoding="utf-8-sig") as fh:
                    rows = list(csv.DictReader(fh))
                    cols = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise MASRefineError(f"{p}: cannot be read as CSV ({e})") from None
            col = next((c for c in ("image", "target") if c in cols), None)
            if rows and col is None:
                raise MASRefineError(f"{p}: needs a column 'image' (or 'target'), has {', '.join(cols)}")
            for n, row in enumerate(rows, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                if not row.get(col):
                    raise MASRefineError(f"{p}: line {n}: empty {col}")
                img = (base / row[col]).resolve()
                truth = str((base / row["truth"]).resolve()) if row.get("truth") else None
                targets.append(Target(_check_id(row.get("id") or image_stem(img), f"{p}: line {n}"), str(img), truth))
        else:
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise MASRefineError(f"{p}: cannot be read as a list of target images ({e})") from None
            for n, line in enumerate(lines, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if not is_image_file(line):
                    raise MASRefineError(f"{p}: line {n}: {line!r} is not a NIfTI/NRRD/MHA image path")
                img = (base / line).resolve()
                targets.append(Target(_check_id(image_stem(img), f"{p}: line {n}"), str(img)))
    else:
        raise MASRefineError(f"{p}: not found (give a folder of target images, a .txt list or a .csv)")
    if not targets:
        raise MASRefineError(f"{p}: no target images")
    seen: dict[str, str] = {}
    for t in targets:
        if t.id.lower() in seen:
            raise MASRefineError(f"{p}: two targets have the id {t.id!r} ({seen[t.id.lower()]}, {t.image}); "
                                 "give ids in a CSV 'id' column")
        seen[t.id.lower()] = t.image
    if truth_dir is not None:
        _match_truth(targets, Path(truth_dir).expanduser())
    return targets


def _match_truth(targets: list[Target], truth_dir: Path) -> None:
    from .imageio import image_stem, is_image_file
    if not truth_dir.is_dir():
        raise MASRefineError(f"{truth_dir}: --truth must be a folder of reference label maps")
    files = {image_stem(f): f for f in sorted(truth_dir.iterdir()) if f.is_file() and is_image_file(f)}
    for t in targets:
        if t.truth is None:
            f = files.get(t.id) or files.get(image_stem(t.image))
            if f is None:
                raise MASRefineError(f"{truth_dir}: no reference label map for target {t.id} "
                                     f"(expected {t.id}.nii.gz or another image suffix)")
            t.truth = str(f.resolve())


# ------------------------------------------------------------------------------------------ resuming
def compared_settings(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a run that decide its results (all but :data:`NOT_COMPARED`)."""
    return {k: v for k, v in parameters.items() if k not in NOT_COMPARED}


def finished_result(folder: Path, target: Target, atlas_dir: Path, parameters: dict[str, Any]) -> Optional[dict]:
    """The manifest of ``folder`` when it holds a complete result of this target, atlas set and settings (the
    target is then skipped); None when there is none (no manifest, or one that lists a missing file: run it).
    A complete result of another target, atlas set, reference or settings raises :class:`MASRefineError`."""
    from .protocol.manifest import MANIFEST_NAME, read_manifest
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        m = read_manifest(folder)  # any unreadable manifest (not UTF-8, not JSON, ...) is one MASRefineError
    except MASRefineError:
        return None  # half a result (a file gone) or a corrupt manifest: the target runs again
    if m.get("status") != "complete" or not isinstance(m.get("inputs") or {}, dict) \
            or not isinstance(m.get("parameters") or {}, dict):
        return None
    inputs = m.get("inputs") or {}
    want = {"target": target.image, "atlas_dir": str(atlas_dir), "truth": target.truth}
    for key, value in want.items():
        if inputs.get(key) != value:
            raise MASRefineError(f"{folder}: holds a result for {key} {inputs.get(key)}, not {value}; "
                                 "choose another --out (or run with the same inputs to resume)")
    old, new = compared_settings(m.get("parameters") or {}), compared_settings(parameters)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise MASRefineError(f"{folder}: holds a result with {key} {old.get(key)!r}, this batch has "
                                 f"{new.get(key)!r}; choose another --out (or the same settings to resume)")
    return m


def _qa_columns(manifest: dict) -> dict[str, Any]:
    """Per-target QA numbers of a finished result: atlases used, mean NCC, mean/min agreement, worst folding."""
    qa = [a.get("qa") or {} for a in manifest.get("atlases") or []]

    def vals(k):
        return [float(q[k]) for q in qa if isinstance(q.get(k), (int, float)) and math.isfinite(float(q[k]))]
    sim, agr, fold = vals("similarity"), vals("agreement"), vals("folding_fraction")
    row: dict[str, Any] = {"atlases": len(qa)}
    row["similarity_mean"] = round(sum(sim) / len(sim), 4) if sim else ""
    row["agreement_mean"] = round(sum(agr) / len(agr), 4) if agr else ""
    row["agreement_min"] = round(min(agr), 4) if agr else ""
    row["folding_max"] = max(fold) if fold else ""
    metrics = (manifest.get("summary") or {}).get("metrics")
    if metrics:
        for name, s in [("mean", metrics.get("mean") or {})] + sorted((metrics.get("groups") or {}).items()):
            for k in ("dice", "surface_dice", "asd_mm", "hd95_mm"):
                row[f"{k}_{name}"] = s.get(k) if s.get(k) is not None else ""
    return row


# ------------------------------------------------------------------------------------------ worker side
def _kept_in_memory(aset):
    """``aset`` (an :class:`~MASRefineLib.atlas.AtlasSet`, a batch worker's copy shared by the targets it segments)
    with :meth:`~MASRefineLib.atlas.AtlasSet.read` answered from memory after an atlas's first read: copies, so a
    caller cannot change the kept ones (SimpleITK copies on write, so this costs no memory until then). An atlas that
    cannot be read is not kept: each target reports it (registration skips it with a warning)."""
    import SimpleITK as sitk
    read, kept, lock = aset.read, {}, threading.Lock()

    def read_kept(atlas_id: str):
        with lock:  # two targets on one worker read an atlas once
            if atlas_id not in kept:
                kept[atlas_id] = read(atlas_id)
            img, lab = kept[atlas_id]
        return sitk.Image(img), sitk.Image(lab)
    aset.read = read_kept
    return aset


_CACHE: dict[str, tuple[tuple, Any]] = {}  # atlas set root -> (fingerprint, (atlas set, segmenter, votenet))
_CACHE_LOCK = threading.Lock()


def _fingerprint(paths: Sequence[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)


def worker_preloaded(atlas_dir: str | os.PathLike, options, device) -> tuple[Any, Any, Any]:
    """This process's ``(atlas_set, segmenter, votenet)`` (``preloaded`` of :func:`~MASRefineLib.pipeline.segment`)
    for an atlas set and options: the atlas set with its
    images kept in memory and the models ``options`` need (surrogate segmenter for refinement IS, VoteNet+ for fusion
    votenet), loaded the first time and reused while ``atlas.json``, the atlas files and the model files keep their
    sizes and modification times (an edited set is loaded again). Models must exist (trained before the batch)."""
    from .atlas import AtlasSet
    from .fusion.votenet import votenet_model_path
    root = Path(atlas_dir).resolve()
    aset = AtlasSet.load(root)
    files = [aset.json_path] + [p for aid in aset.ids for p in (aset.image_path(aid), aset.label_path(aid))]
    seg_path = aset.models_dir / "segmenter.json" if options.refine == "IS" else None
    vn_path = votenet_model_path(aset, options.prereg, options.refine) if options.fusion == "votenet" else None
    models = [p for p in (seg_path, vn_path) if p is not None]
    # a model is a .json description beside its weights file(s): every file of the same name counts
    model_files = [f for p in models for f in sorted(p.parent.glob(p.stem + ".*"))]
    key = (_fingerprint(files + model_files), options.refine, options.fusion, options.prereg, str(device))
    with _CACHE_LOCK:
        hit = _CACHE.get(str(root))
        if hit is not None and hit[0] == key:
            return hit[1]
        segmenter = votenet = None
        if seg_path is not None and seg_path.exists():
            from .segmenter import UNetSegmenter
            segmenter = UNetSegmenter.load(seg_path, device)
        if vn_path is not None:
            from .fusion.votenet import VoteNetModel
            votenet = VoteNetModel.load(vn_path)
        pre = (_kept_in_memory(aset), segmenter, votenet)
        _CACHE[str(root)] = (key, pre)  # replaces an older copy of this set: its memory is freed
        return pre


class _PeakMemory:
    """The largest resident memory (bytes) of this process while the ``with`` block runs, sampled every 0.1 s on
    a thread (so a worker running two targets at once reports the process's peak for both)."""

    def __init__(self, interval_s: float = 0.1):
        import psutil
        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 -- a failed sample only loses precision
                pass

    def __enter__(self) -> "_PeakMemory":
        self._thread = threading.Thread(target=self._run, name="masrefine-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, MASRefineError) else f"{type(e).__name__}: {text}".rstrip(": ")


def run_target(target: dict[str, Any], atlas_dir: str, out_dir: str, parameters: dict[str, Any],
               groups: Optional[dict[str, list[int]]] = None, cancel_event: Optional[str] = None,
               out_option: str = "--out") -> dict[str, Any]:
    """The Dask task of one target: :func:`~MASRefineLib.pipeline.segment` into ``out_dir/<id>`` with the worker's
    preloaded atlas set and models. Returns a summary row (``status`` ``done``, ``failed`` with the one-line
    ``error``, or ``cancelled``), never raises for the target's own problems, so the batch goes on.
    ``cancel_event``: the name of the batch's :class:`distributed.Event`; set, the target stops at its next progress
    report. ``seconds``: wall clock of the task; ``peak_memory_mb``: of the worker process (MiB). ``threads`` 0 in
    ``parameters``: torch threads = the machine's cores / the worker's threads (one worker per machine)."""
    from .device import resolve_device
    from .pipeline import SegmentOptions, segment
    t0 = time.perf_counter()
    worker = _worker_name()
    row: dict[str, Any] = {"id": target["id"], "worker": worker, "target": target["image"]}
    last = [0.0]

    def progress(ev) -> None:
        now = time.monotonic()
        if cancel_event and now - last[0] >= CANCEL_CHECK_S:
            last[0] = now
            if _event_is_set(cancel_event):
                raise Cancelled(f"batch cancelled during {ev.stage}")

    opts = SegmentOptions.from_parameters({**parameters, "train_missing": False})  # never train in a task
    if not opts.threads:  # two targets at once on a worker must not each take every core
        opts.threads = max(1, _cores() // max(1, _worker_threads()))
    try:
        with _PeakMemory() as mem:
            try:
                device = resolve_device(opts.device)
                pre = worker_preloaded(atlas_dir, opts, device)
                r = segment(target["image"], atlas_dir, Path(out_dir) / target["id"], opts, progress,
                            truth=target.get("truth"), groups=groups, out_option=out_option,
                            preloaded=pre)
                from .protocol.manifest import read_manifest
                row.update(status="done", **_qa_columns(read_manifest(r["manifest"])), output=r["output_dir"])
            except Cancelled:
                row.update(status="cancelled")
            except MemoryError:
                row.update(status="failed", error="out of memory (fewer workers or threads per worker, or a smaller "
                                                  "preset)")
            except Exception as e:  # noqa: BLE001 -- the target's own error, reported in its row; the batch goes on
                row.update(status="failed", error=_one_line(e))
        row["peak_memory_mb"] = round(mem.peak / 2 ** 20, 1)
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _dask_worker():
    """The Dask worker running this task; None outside one (or without distributed)."""
    try:
        from distributed import get_worker
        return get_worker()
    except (ImportError, ValueError):
        return None


def _event_is_set(name: str) -> bool:
    """Whether the scheduler's :class:`distributed.Event` ``name`` is set, asked through the worker's own connection
    (``Event(name).is_set()`` would start a client in the worker, which prints errors when the worker is closed)."""
    w = _dask_worker()
    if w is None:
        return False  # not in a Dask worker: nothing to cancel from
    try:
        from distributed.utils import sync
        return bool(sync(w.loop, w.scheduler.event_is_set, name=name))
    except Exception:  # noqa: BLE001 -- the scheduler is gone: the worker is closing, which stops this task too
        return False


def _worker_threads() -> int:
    try:
        return int(_dask_worker().state.nthreads)
    except AttributeError:  # not in a Dask worker (None)
        return 1


def _worker_name() -> str:
    w = _dask_worker()
    if w is None:
        return f"pid {os.getpid()}"
    return f"{w.name}@{w.address}" if w.name is not None else w.address


# ------------------------------------------------------------------------------------------ cluster
#: The memory model of one target in a worker (bytes): a process base, plus per target voxel a constant, a share per
#: atlas and one per label; fitted to segment's peak RSS (docs/batch.md, "Sizing the local cluster"). The peaks a
#: batch measures replace it.
WORKER_BASE_BYTES = 600 * 2 ** 20
BYTES_PER_VOXEL = 64
BYTES_PER_VOXEL_ATLAS = 64
BYTES_PER_VOXEL_LABEL = 6


@dataclass
class ClusterPlan:
    """How many local workers, with how many threads and how much memory each (bytes), and why."""
    workers: int
    threads_per_worker: int
    memory_limit: int
    torch_threads: int
    peak_bytes: int
    peak_source: str
    notes: list[str] = field(default_factory=list)


def estimate_peak_bytes(aset, targets: Sequence[Target], earlier_rows: Sequence[dict] = ()) -> tuple[int, str]:
    """Peak resident memory of a worker segmenting one target (bytes) and where the number comes from: the largest
    ``peak_memory_mb`` measured by an earlier run of this batch (``summary.csv``), else the model
    base + atlas set in memory + per-voxel working memory on the largest of the first 20 targets' grids."""
    measured = [float(r["peak_memory_mb"]) for r in earlier_rows if _is_number(r.get("peak_memory_mb"))]
    if measured:
        return int(max(measured) * 2 ** 20), f"measured by an earlier run ({len(measured)} targets)"
    from .imageio import read_grid
    atlas_bytes = 0
    for aid in aset.ids:
        try:
            g = read_grid(aset.image_path(aid))
            atlas_bytes += int(math.prod(g.size)) * 6  # float32 image + uint16 label map
        except MASRefineError:
            pass
    voxels = 0
    for t in targets[:20]:
        try:
            voxels = max(voxels, int(math.prod(read_grid(t.image).size)))
        except MASRefineError:
            pass
    work = voxels * (BYTES_PER_VOXEL + BYTES_PER_VOXEL_ATLAS * len(aset) + BYTES_PER_VOXEL_LABEL * (len(aset.label_table) + 1))
    return WORKER_BASE_BYTES + atlas_bytes + work, "estimated from the atlas set and target sizes"


def _is_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_local_cluster(n_targets: int, peak: tuple[int, str], workers: Optional[int] = None,
                       threads_per_worker: int = 1, device: str = "cpu", torch_threads: int = 0,
                       cores: Optional[int] = None, available: Optional[int] = None, gpus: int = 0) -> ClusterPlan:
    """Size a local cluster: ``workers`` (default: as many as the cores allow at ``threads_per_worker`` targets each,
    as the available memory allows at ``peak`` bytes per running target, one per GPU with ``device`` cuda, and no
    more than the targets), each with an equal share of the available memory as its Dask memory limit (the nanny
    restarts a worker above 95 % of it). ``torch_threads``: per target (0: the cores shared out evenly)."""
    import psutil
    cores = cores or _cores()
    available = available or int(psutil.virtual_memory().available)
    peak_bytes, source = peak
    notes = []
    t = max(1, int(threads_per_worker))
    if workers is None:
        by_cores = max(1, cores // t)
        by_memory = max(1, int(available * 0.9 // max(1, peak_bytes * t)))
        workers = min(by_cores, by_memory, max(1, n_targets))
        if device == "cuda" and gpus:
            workers = min(workers, gpus)
        if by_memory < by_cores and by_memory < n_targets:
            notes.append(f"{workers} workers, not {by_cores}: {available / 2 ** 30:.1f} GiB available, "
                         f"{peak_bytes / 2 ** 30:.2f} GiB per target ({source})")
    workers = max(1, int(workers))
    tt = torch_threads or max(1, cores // (workers * t))
    return ClusterPlan(workers, t, int(available // workers), tt, peak_bytes, source, notes)


def start_local_cluster(plan: ClusterPlan, dashboard: Optional[str] = None, scratch: Optional[str | os.PathLike] = None,
                        gpus: int = 0):
    """A :class:`distributed.LocalCluster` of ``plan`` on loopback (127.0.0.1; ``dashboard``: its address, e.g.
    ``127.0.0.1:8787``, None: no dashboard). A task runs only where it started (worker-saturation 1: no task
    waits in a worker's queue, so a worker's death touches only the targets it runs) and a target on which two
    workers died is failed rather than tried on a third (allowed-failures 1). With ``gpus`` each worker offers the
    resource ``GPU=1`` and sees one GPU (CUDA_VISIBLE_DEVICES by worker number)."""
    import dask
    from distributed import LocalCluster
    kw: dict[str, Any] = {"plugins": {_LocalWorkerSetup(gpus)}}
    if gpus:
        kw["resources"] = {"GPU": 1}
    if scratch is not None:
        kw["local_directory"] = str(scratch)
    if dashboard is None:  # the scheduler's HTTP server (health checks) would still take 8787; any free port
        kw["scheduler_kwargs"] = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    import signal
    # Ctrl-C in a terminal reaches every process of the group. The worker processes (spawned now from the cluster's
    # event-loop thread, and later again when a dead one is restarted) inherit the signal mask of that thread: with
    # SIGINT blocked while the thread is created, they never act on it, whatever their start-up stage; the batch
    # cancels their tasks and closes them. This thread's Ctrl-C is delivered when the mask is restored below.
    block = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if block else None
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                              "distributed.scheduler.worker-saturation": 1.0}):
            return LocalCluster(n_workers=plan.workers, threads_per_worker=plan.threads_per_worker, processes=True,
                                host="127.0.0.1", dashboard_address=dashboard, memory_limit=plan.memory_limit,
                                silence_logs=logging.ERROR, **kw)
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


try:  # the plugin's base (distributed checks it); this module is imported only where a batch runs
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - without distributed no cluster starts (the worker names the package)
    _WorkerPlugin = object


class _LocalWorkerSetup(_WorkerPlugin):
    """Worker plugin of the local cluster. Ctrl-C in a terminal reaches every process of its group: the workers ignore
    it (the batch cancels their tasks and closes them) rather than each printing a traceback (a second guard beside
    the signal mask of :func:`start_local_cluster`, for an event-loop thread that existed before). With ``gpus``,
    worker number n sees GPU n mod ``gpus`` only (set before torch touches CUDA)."""

    def __init__(self, gpus: int = 0):
        self.gpus = gpus
        self.name = "masrefine-local-worker"

    def setup(self, worker) -> None:
        import signal
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.gpus:
            try:
                n = int(worker.name)
            except (TypeError, ValueError):
                n = 0
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(n % self.gpus))


# ------------------------------------------------------------------------------------------ the batch
SUMMARY_COLUMNS = ["id", "status", "attempts", "seconds", "peak_memory_mb", "worker", "atlases", "similarity_mean",
                   "agreement_mean", "agreement_min", "folding_max"]


def write_summary(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``summary.csv``: one row per target in the targets' order, the fixed columns, then metric columns, then
    ``error``, ``target`` and ``output``; written atomically."""
    from .protocol.atomic import write_csv
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k not in SUMMARY_COLUMNS and k not in extra and k not in ("error", "target", "output")]
    write_csv(rows, path, SUMMARY_COLUMNS + extra + ["error", "target", "output"], lineterminator="\n")
    return Path(path)


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier ``summary.csv`` by target id (empty when there is none or it cannot be read)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {r["id"]: r for r in csv.DictReader(f) if r.get("id")}
    except (OSError, csv.Error, KeyError, UnicodeDecodeError):
        return {}


def mean_sd(values: Sequence[Any]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for one value) of the finite numbers among ``values`` (None, text and
    NaN left out); NaN, NaN when there is none."""
    import numpy as np
    v = [float(x) for x in values if _is_number(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def cohort_metrics(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over the targets with metrics, per label group (and ``mean``, the mean
    over labels) and metric: rows ``{group, metric, n, mean, sd}``."""
    out = []
    keys = []
    for r in rows:
        keys += [k for k in r if k.startswith(("dice_", "surface_dice_", "asd_mm_", "hd95_mm_")) and k not in keys]
    for metric in ("dice", "surface_dice", "asd_mm", "hd95_mm"):
        for k in keys:
            if not k.startswith(metric + "_"):  # ("surface_dice_x" does not start with "dice_")
                continue
            vals = [r.get(k) for r in rows if r.get("status") in ("done", "skipped") and _is_number(r.get(k))]
            if vals:
                m, sd = mean_sd(vals)
                out.append({"group": k[len(metric) + 1:], "metric": metric, "n": len(vals), "mean": round(m, 6),
                            "sd": round(sd, 6)})
    return out


def _write_cohort(rows: list[dict[str, Any]], path: Path) -> Path:
    from .protocol.atomic import write_csv
    write_csv(rows, path, ["group", "metric", "n", "mean", "sd"], lineterminator="\n")
    return path


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 -- no usable CUDA: no GPU workers
        return 0


def run_batch(atlas_dir: str | os.PathLike, targets: str | os.PathLike, out_dir: str | os.PathLike, options=None, *,
              scheduler: Optional[str] = None, workers: Optional[int] = None, threads_per_worker: int = 1,
              truth: str | os.PathLike | None = None, groups=None, dashboard: Optional[str] = None,
              progress: Optional[ProgressCallback] = None, on_cluster: Optional[Callable[[dict], None]] = None,
              out_option: str = "--out") -> dict[str, Any]:
    """Segment every target of ``targets`` (:func:`read_targets`) with the atlas set ``atlas_dir`` into
    ``out_dir/<id>/`` on Dask (module doc), with ``options`` (:class:`~MASRefineLib.pipeline.SegmentOptions`).

    ``scheduler``: address of a running Dask scheduler (``tcp://host:8786``), else a local cluster of ``workers``
    workers (default: sized from the machine, :func:`plan_local_cluster`) with ``threads_per_worker`` targets each,
    dashboard on ``dashboard`` (None: none). ``truth``: a folder of reference label maps (per-target metrics and the
    cohort's mean and sd per label group of ``groups``). ``progress`` gets stage ``batch`` events (fraction = targets
    finished, data: done / failed / running / skipped / total / eta_s) and may raise
    :class:`~MASRefineLib.errors.Cancelled`; ``on_cluster`` gets ``{dashboard, scheduler, workers, ...}`` once the
    cluster is up. Returns ``{output_dir, summary, cohort, rows, counts, cluster}``; raises
    :class:`MASRefineError` before any task runs for bad inputs and :class:`Cancelled` / KeyboardInterrupt after
    writing ``summary.csv`` when cancelled."""
    from .atlas import AtlasSet
    from .outputs import atlas_set_inputs, prepare_output_dir
    from .pipeline import SegmentOptions
    from .training import ensure_models
    from .device import resolve_device

    opts = options or SegmentOptions()
    tlist = read_targets(targets, truth)
    tspec = Path(targets).expanduser()
    inputs = [*atlas_set_inputs(atlas_dir), ("--targets " + ("folder" if tspec.is_dir() else "list"), tspec),
              ("--truth folder", truth)]
    if not tspec.is_dir():  # listed targets may lie anywhere: the output folder holds none of them
        inputs += [("target image", t.image) for t in tlist]
    inputs += [("reference label map", t.truth) for t in tlist if t.truth]
    out = prepare_output_dir(out_dir, command="batch", option=out_option, inputs=inputs)
    root = Path(atlas_dir).resolve()
    aset = AtlasSet.load(root)
    if len(aset) == 0:
        raise MASRefineError(f"{aset.json_path}: the atlas set has no atlases")

    # what is done already (and a folder of other settings stops the batch here, before anything runs)
    earlier = read_summary(out / SUMMARY_NAME)
    rows: dict[str, dict[str, Any]] = {}
    todo: list[Target] = []
    params = opts.to_json()
    for t in tlist:
        m = finished_result(out / t.id, t, root, params)
        if m is None:
            todo.append(t)
            rows[t.id] = {"id": t.id, "status": "pending", "target": t.image, "attempts": 0}
        else:
            old = earlier.get(t.id, {})
            rows[t.id] = {"id": t.id, "status": "skipped", "attempts": old.get("attempts", ""),
                          "seconds": old.get("seconds") or m.get("seconds_total", ""),
                          "peak_memory_mb": old.get("peak_memory_mb", ""), "worker": old.get("worker", ""),
                          **_qa_columns(m), "target": t.image, "output": str(out / t.id)}
    n_skip = len(tlist) - len(todo)

    # models the options need: trained here, once, before any task (tasks never train)
    if todo and (opts.refine == "IS" or opts.fusion == "votenet"):
        ensure_models(aset, opts, resolve_device(opts.device), progress)

    if not scheduler:
        resolve_device(opts.device)  # --device cuda on a machine without one: said now, not by every task
    cluster = client = None
    cancel = None
    futures: dict[Any, Target] = {}
    counts = {"done": 0, "failed": 0, "skipped": n_skip, "cancelled": 0, "total": len(tlist)}
    info: dict[str, Any] = {}
    t_start = time.monotonic()
    last_write = [0.0]

    def save(force: bool = False) -> Path:
        path = out / SUMMARY_NAME
        if force or time.monotonic() - last_write[0] >= SUMMARY_INTERVAL_S:
            write_summary([rows[t.id] for t in tlist], path)
            last_write[0] = time.monotonic()
        return path

    try:
        if todo:
            from distributed import Client, Event, wait
            gpus = _gpu_count() if opts.device == "cuda" or (opts.device == "auto" and scheduler is None) else 0
            if scheduler:
                client = Client(scheduler, timeout="30s")
                info = {"scheduler": scheduler, "workers": len(client.scheduler_info()["workers"])}
                tt = opts.threads
            else:
                plan = plan_local_cluster(len(todo), estimate_peak_bytes(aset, todo, list(earlier.values())), workers,
                                          threads_per_worker, "cuda" if gpus else "cpu", opts.threads, gpus=gpus)
                for note in plan.notes:
                    log.info(note)
                cluster = start_local_cluster(plan, dashboard, out / ".dask-scratch", gpus=gpus)
                client = Client(cluster)
                tt = plan.torch_threads
                info = {"scheduler": cluster.scheduler_address, "workers": plan.workers,
                        "threads_per_worker": plan.threads_per_worker, "memory_limit": plan.memory_limit,
                        "torch_threads": tt, "peak_bytes": plan.peak_bytes, "peak_source": plan.peak_source}
            try:
                info["dashboard"] = client.dashboard_link if (scheduler or dashboard) else None
            except Exception:  # noqa: BLE001 -- a scheduler without a dashboard
                info["dashboard"] = None
            resources = {"GPU": 1} if (opts.device == "cuda" or (gpus and opts.device == "auto")) else None
            if resources and scheduler:
                offered = [w for w in client.scheduler_info()["workers"].values() if (w.get("resources") or {}).get("GPU")]
                if not offered:
                    raise MASRefineError(f"{scheduler}: no worker offers the resource GPU; start GPU workers with "
                                         "'dask worker SCHEDULER --resources GPU=1' (docs/batch.md)")
            if on_cluster is not None:
                on_cluster(dict(info))
            task_params = {**params, "threads": int(tt or 0)}
            token = uuid.uuid4().hex[:8]
            cancel = Event(f"masrefine-batch-{token}-cancel", client=client)

            def submit(t: Target, attempt: int, avoid: Optional[str] = None) -> Any:
                kw: dict[str, Any] = {}
                if avoid:  # a retry prefers another worker (any, when no other is there)
                    others = [a for a in client.scheduler_info()["workers"] if not avoid.endswith(a)]
                    if others:
                        kw.update(workers=others, allow_other_workers=True)
                f = client.submit(run_target, {"id": t.id, "image": t.image, "truth": t.truth}, str(root), str(out),
                                  task_params, groups, cancel.name, out_option,
                                  # one task group for all targets (Dask queues a large group on the scheduler)
                                  key=(f"masrefine-batch-{token}", t.id, attempt),
                                  pure=False, resources=resources, **kw)
                futures[f] = t
                rows[t.id]["attempts"] = attempt
                return f

            for t in todo:
                submit(t, 1)
            pending = set(futures)
            _report(progress, counts, 0, t_start, n_skip)
            while pending:
                try:
                    done, _ = wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for f in done:
                    pending.discard(f)
                    t = futures[f]
                    killed = False
                    if f.status == "finished":
                        r = f.result()
                    else:  # the task did not return: its workers died (KilledWorker) or it could not run there
                        try:
                            exc = f.exception()
                        except Exception as e:  # noqa: BLE001 -- cancelled futures raise here
                            exc = e
                        error, killed = _task_error(exc)
                        r = {"id": t.id, "status": "failed", "error": error}
                    attempt = rows[t.id]["attempts"]
                    if r["status"] == "failed" and attempt < MAX_ATTEMPTS and not killed:
                        log.info(f"target {t.id} failed on {r.get('worker', 'a worker')} ({r.get('error')}); "
                                 "trying once more")
                        pending.add(submit(t, attempt + 1, r.get("worker")))
                        continue
                    rows[t.id] = {**rows[t.id], **r, "attempts": attempt, "target": t.image}
                    counts[r["status"]] = counts.get(r["status"], 0) + 1
                    if r["status"] == "failed":
                        log.warning(f"target {t.id} failed: {r.get('error')}")
                running = _running(client, pending)
                _report(progress, counts, running, t_start, n_skip)
                save()
    except BaseException:
        # Ctrl-C, a cancel from the caller, or a lost scheduler: stop every task, say what finished, clean up
        if cancel is not None:
            try:
                cancel.set()
            except Exception:  # noqa: BLE001 -- the scheduler may be gone; closing the cluster stops the tasks
                pass
        if client is not None and futures:
            try:
                client.cancel(list(futures), force=True)
            except Exception:  # noqa: BLE001
                pass
        for r in rows.values():
            if r["status"] == "pending":
                r["status"] = "cancelled"
        save(force=True)
        raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
            import shutil
            shutil.rmtree(out / ".dask-scratch", ignore_errors=True)  # the local workers' scratch space, ours
    summary = save(force=True)
    cohort = None
    if truth is not None or any(t.truth for t in tlist):
        crow = cohort_metrics([rows[t.id] for t in tlist])
        cohort = _write_cohort(crow, out / COHORT_NAME)
    return {"output_dir": str(out), "summary": str(summary), "cohort": str(cohort) if cohort else None,
            "rows": [rows[t.id] for t in tlist], "counts": counts, "cluster": info,
            "seconds": round(time.monotonic() - t_start, 2)}


def _task_error(exc: BaseException | None) -> tuple[str, bool]:
    """The one-line error of a task that did not return, and whether it ended because workers died running it
    (KilledWorker: Dask tried it on another already, so it is not retried)."""
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:
        KilledWorker = ()
    if isinstance(exc, KilledWorker):
        return (f"the workers running it died {exc.allowed_failures + 1} times (killed, or out of memory: fewer "
                "workers or threads per worker)"), True
    return (_one_line(exc) if exc is not None else "the task was lost"), False


def _running(client, pending) -> int:
    """Targets being run: those the scheduler has handed to workers, at most one per worker thread (a small batch
    is handed out at once, beyond the threads)."""
    keys = {f.key for f in pending}
    try:
        assigned = sum(1 for ks in client.processing().values() for k in ks if k in keys)
        return min(assigned, sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001 -- progress only
        return 0


def _report(progress: Optional[ProgressCallback], counts: dict[str, int], running: int, t_start: float,
            n_skip: int) -> None:
    total = counts["total"]
    finished = counts["done"] + counts["failed"] + counts["cancelled"]
    elapsed = time.monotonic() - t_start
    remaining = total - n_skip - finished
    eta = elapsed / finished * remaining if finished else None
    msg = f"{counts['done']} done, {counts['failed']} failed, {running} running" + \
        (f", {n_skip} skipped" if n_skip else "")
    report(progress, "batch", (finished + n_skip) / max(1, total), msg, done=counts["done"], failed=counts["failed"],
           running=running, skipped=n_skip, total=total, eta_s=None if eta is None else round(eta, 1))


# ------------------------------------------------------------------------------------------ worker protocol
def run_job(job: dict[str, Any], progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """The worker's ``batch`` pipeline (``python -m MASRefineLib.worker job.json``): :func:`run_batch` with the job's
    inputs (``targets``, ``atlas_dir``, optional ``truth``) and parameters (the segment parameters plus
    ``scheduler``, ``workers``, ``threads_per_worker``)."""
    from .protocol.jobs import resolved_parameters
    from .pipeline import SegmentOptions
    params = resolved_parameters(job)
    opts = SegmentOptions.from_parameters(params)
    r = run_batch(job["inputs"]["atlas_dir"], job["inputs"]["targets"], job["output_dir"], opts,
                  scheduler=params.get("scheduler") or None, workers=params.get("workers") or None,
                  threads_per_worker=int(params.get("threads_per_worker") or 1), truth=job["inputs"].get("truth"),
                  progress=progress, out_option="output_dir")
    return {k: r[k] for k in ("summary", "cohort", "counts", "cluster", "seconds")}
