"""The project's data sets for benchmarks and tests: IXI brains, synthesized knees, subject splits and
atlas sets built in ``.cache/``.

``../shared`` (read-only) is found beside the repository root; the environment variable
``MASREFINE_SHARED`` overrides it. Everything generated goes under the repository's ``.cache/``
(relative ``cache`` arguments are relative to the repository root, not the working directory).

Typical use::

    from bench.datasets import ixi_subjects, split, make_atlas_set, ixi_case
    atlas_ids, target_ids = split(ixi_subjects(), n_atlases=10, n_targets=5, seed=0)
    aset = make_atlas_set("ixi", atlas_ids)                  # AtlasSet in .cache/atlas-sets/
    image_path, label_path = ixi_case(target_ids[0])

    knee_dir = knee_dataset(knee_subjects()[:6])            # synthesizes missing knees only
    aset = make_atlas_set("knee", knee_subjects()[:4])
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `python bench/<x>.py` can import MASRefineLib from the checkout
    sys.path.insert(0, str(ROOT))

from MASRefineLib.atlas import AtlasSet, init_atlas_set  # noqa: E402
from MASRefineLib.errors import MASRefineError  # noqa: E402
from MASRefineLib.imageio import atomic_write_text  # noqa: E402
from MASRefineLib.labels import LabelTable  # noqa: E402


def shared_dir() -> Path:
    """``$MASREFINE_SHARED`` or ``<repo>/../shared``."""
    return Path(os.environ.get("MASREFINE_SHARED") or ROOT.parent / "shared")


def ixi_dir() -> Path:
    return shared_dir() / "data" / "ixi-dlmuse"


def knee_labels_dir() -> Path:
    return shared_dir() / "data" / "knee-oai" / "labels"


def synth_knee_script() -> Path:
    return shared_dir() / "tools" / "synth_knee.py"


def available() -> bool:
    """Whether ../shared (with both data sets and synth_knee.py) is present."""
    return ixi_dir().is_dir() and knee_labels_dir().is_dir() and synth_knee_script().is_file()


def _need(path: Path) -> Path:
    if not path.exists():
        raise MASRefineError(f"{path}: not found (set MASREFINE_SHARED to the shared folder)")
    return path


def _cache_path(p: str | os.PathLike) -> Path:
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


# -- IXI ------------------------------------------------------------------------------------------
def ixi_subjects() -> list[str]:
    """The 135 IXI subject ids, in the order of subjects.txt."""
    return _need(ixi_dir() / "subjects.txt").read_text().split()


def ixi_case(subject: str) -> tuple[Path, Path]:
    """(image, label map) of an IXI subject (2 mm T1, DLMUSE labels)."""
    return ixi_dir() / "images" / f"{subject}.nii.gz", ixi_dir() / "labels" / f"{subject}.nii.gz"


def ixi_label_table() -> Path:
    return ixi_dir() / "MUSE_listROIs.csv"


# -- knees ----------------------------------------------------------------------------------------
def knee_subjects() -> list[str]:
    """The 32 OAI knee ids, in the order of subjects.txt."""
    return _need(knee_labels_dir().parent / "subjects.txt").read_text().split()


def knee_cache(seed: int = 0, cache: str | os.PathLike | None = None) -> Path:
    """Folder of synthesized knees for ``seed``: ``.cache/knee`` (seed 0) or ``.cache/knee-seed<N>``."""
    return _cache_path(cache if cache is not None else (".cache/knee" if seed == 0 else f".cache/knee-seed{seed}"))


def knee_dataset(ids: Sequence[str], cache: str | os.PathLike | None = None, seed: int = 0,
                 verbose: bool = True) -> Path:
    """Synthesize (with ../shared/tools/synth_knee.py) the knees of ``ids`` that are not in the cache yet;
    returns the cache folder holding ``images/<id>.nii.gz``, ``labels/<id>.nii.gz`` and ``labels.json``.

    About 12 s per missing knee. Files appear atomically (synthesized into a temporary folder, then
    renamed), so an interrupted or concurrent run never leaves a half-written knee. A cache folder
    remembers its seed (``synth.json``); asking it for another seed is an error.
    """
    out = knee_cache(seed, cache)
    ids = list(ids)
    known = set(knee_subjects())
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise MASRefineError(f"{knee_labels_dir()}: no knee label map for {unknown[:5]}")
    manifest = out / "synth.json"
    if manifest.exists():
        prev = json.loads(manifest.read_text())
        if prev.get("seed") != seed:
            raise MASRefineError(f"{manifest}: this cache holds knees synthesized with seed {prev.get('seed')}, "
                                 f"not {seed}; use another cache folder")
    missing = [i for i in ids if not ((out / "images" / f"{i}.nii.gz").exists()
                                      and (out / "labels" / f"{i}.nii.gz").exists())]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    if missing == [] and ids and not (out / "labels.json").exists():
        missing = ids[:1]  # labels.json comes with every synthesis run
    if not manifest.exists():
        atomic_write_text(json.dumps({"seed": seed, "tool": str(synth_knee_script()),
                                        "tool_sha256": _sha256(synth_knee_script())}, indent=1) + "\n", manifest)
    if missing:
        tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
        try:
            cmd = [sys.executable, str(_need(synth_knee_script())), "--labels", str(knee_labels_dir()),
                   "--out", str(tmp), "--seed", str(seed), "--ids", *missing]
            if verbose:
                print(f"synthesizing {len(missing)} knee(s) into {out} (about {12 * len(missing)} s)", file=sys.stderr)
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE, text=True)
            if r.returncode != 0:
                tail = (r.stderr or "").strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
                raise MASRefineError(f"{synth_knee_script()}: knee synthesis failed ({tail[0]})")
            for i in missing:
                for sub in ("labels", "images"):  # image last: its presence marks a complete knee
                    os.replace(tmp / sub / f"{i}.nii.gz", out / sub / f"{i}.nii.gz")
            os.replace(tmp / "labels.json", out / "labels.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def knee_case(subject: str, seed: int = 0, cache: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(image, label map) of a synthesized knee (synthesized now if missing)."""
    out = knee_dataset([subject], cache, seed)
    return out / "images" / f"{subject}.nii.gz", out / "labels" / f"{subject}.nii.gz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


# -- splits and atlas sets --------------------------------------------------------------------------
def split(ids: Sequence[str], n_atlases: int, n_targets: int, seed: int = 0,
          shuffle: bool = True, allow_report: bool = False) -> tuple[list[str], list[str]]:
    """Disjoint (atlas ids, target ids): no subject is ever both an atlas and a target.

    With ``shuffle`` the subjects are drawn at random (reproducible for a ``seed``); otherwise the
    first ``n_atlases`` are atlases and the next ``n_targets`` targets. A split that would use a report
    subject (:data:`REPORT_SUBJECTS`) is refused unless ``allow_report``: tuning benchmarks never see them.
    """
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("subject ids must be unique")
    if n_atlases < 1 or n_targets < 0:
        raise ValueError("need at least one atlas and a non-negative number of targets")
    if n_atlases + n_targets > len(ids):
        raise ValueError(f"{n_atlases} atlases + {n_targets} targets > {len(ids)} subjects")
    order = random.Random(seed).sample(ids, len(ids)) if shuffle else ids
    atlases, targets = order[:n_atlases], order[n_atlases:n_atlases + n_targets]
    assert not set(atlases) & set(targets)
    if not allow_report:
        report = set().union(*REPORT_SUBJECTS.values()) & set(atlases + targets)
        if report:
            raise ValueError(f"this split uses report subjects {sorted(report)}: only bench/pipeline.py's "
                             "report run may (bench/datasets.py, REPORT_SUBJECTS)")
    return atlases, targets


def make_atlas_set(dataset: str, ids: Sequence[str], name: str | None = None, seed: int = 0,
                   cache: str | os.PathLike = ".cache/atlas-sets") -> AtlasSet:
    """An atlas set of ``ids`` from ``dataset`` ("ixi" or "knee") in ``<cache>/<name>``, referencing the
    data where they are (IXI in ../shared, knees in the knee cache). Reused when it already lists exactly
    these ids; rebuilt (only atlas.json) otherwise. The default name encodes the data set and the ids."""
    ids = list(ids)
    if dataset == "ixi":
        images, labels, table = ixi_dir() / "images", ixi_dir() / "labels", ixi_label_table()
    elif dataset == "knee":
        kd = knee_dataset(ids, seed=seed)
        images, labels, table = kd / "images", kd / "labels", kd / "labels.json"
    else:
        raise ValueError(f"dataset must be 'ixi' or 'knee', got {dataset!r}")
    if name is None:
        digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:10]
        name = f"{dataset}{'' if dataset == 'ixi' or seed == 0 else f'-seed{seed}'}-{len(ids)}-{digest}"
    out = _cache_path(cache) / name
    if (out / "atlas.json").exists():
        try:
            existing = AtlasSet.load(out)
            if existing.ids == ids and all(existing.image_path(i).exists() for i in ids):
                return existing
        except MASRefineError:
            pass
    return init_atlas_set(out, images, labels, LabelTable.load(table), ids=ids, overwrite=True)


# -- registrations shared by the benchmarks ------------------------------------------------------------
def dataset_case(dataset: str):
    """``case(id) -> (image path, label path)`` and the label-table path of ``dataset`` ("ixi" or "knee")."""
    if dataset == "ixi":
        return ixi_case, ixi_label_table()
    if dataset == "knee":
        return knee_case, knee_cache() / "labels.json"
    raise ValueError(f"dataset must be 'ixi' or 'knee', got {dataset!r}")


def params_digest(stage: str, preset: str, *extra: str) -> str:
    """Short digest of the registration parameters of ``preset`` at ``stage`` (and ``extra`` strings, e.g.
    atlas ids): cache folders named with it are never a stale hit after a preset changes."""
    from MASRefineLib.registration import get_params

    key = "\n".join([*extra, json.dumps(get_params(preset, stage=stage).to_json(), sort_keys=True)])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def progress_printer(interval_s: float = 20.0):
    """A progress callback for benchmark logs (plain lines, not tqdm bars, since the logs are files): each
    event's message with the time, stage and fraction, at most one line per ``interval_s`` per stage."""
    import time

    last: dict[str, float] = {}

    def show(ev) -> None:
        now = time.monotonic()
        if ev.message and now - last.get(ev.stage, -float("inf")) >= interval_s:
            last[ev.stage] = now
            print(f"  [{time.strftime('%H:%M:%S')} {ev.stage} {100 * ev.fraction:3.0f}%] {ev.message}",
                  file=sys.stderr, flush=True)
    return show


def registered(dataset: str, target_id: str, atlas_ids: Sequence[str], stage: str = "deformable",
               preset: str = "default", device: str = "cpu",
               cache: str | os.PathLike = ".cache/registered") -> Path:
    """Folder of the ``WarpedSet`` of ``atlas_ids`` registered to ``target_id`` with the registration engine
    (``stage`` "affine" or "deformable", ``preset``), computed once and shared by every benchmark (so the
    registration, refinement and fusion tables all start from the *same* warped atlases).

    ``<cache>/<dataset>/<stage>-<preset>-<n>-<digest of the atlas ids and the parameters>/<target id>/``
    (:func:`params_digest`) as ``masrefine register`` writes it; its ``report.json`` ``info["bench"]`` holds
    the wall and CPU seconds per pair of the registration call and the code version. Never registers a subject to itself.
    """
    from MASRefineLib.imageio import read_image
    from MASRefineLib.registration import AtlasInput, get_params, register

    atlas_ids = list(atlas_ids)
    if target_id in atlas_ids:
        raise MASRefineError(f"{target_id}: a target cannot also be an atlas")
    digest = params_digest(stage, preset, *atlas_ids)
    folder = _cache_path(cache) / dataset / f"{stage}-{preset}-{len(atlas_ids)}-{digest}" / target_id
    if (folder / "report.json").exists():
        return folder
    import time

    case, _ = dataset_case(dataset)
    tp, _ = case(target_id)
    aset = make_atlas_set(dataset, atlas_ids)  # its label table: the data set's names + values found in the maps
    inputs = [AtlasInput(aid, load=(lambda aid=aid: aset.read(aid)), source_image=str(aset.image_path(aid)),
                         source_label=str(aset.label_path(aid))) for aid in atlas_ids]
    table = aset.label_table
    t0, c0 = time.perf_counter(), time.process_time()
    ws = register(read_image(tp), inputs, table, params=get_params(preset, stage=stage), device=device,
                  target_path=str(tp))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if ws.failed:
        print(f"  warning: {dataset} {stage}-{preset} -> {target_id}: failed atlases {ws.failed}", file=sys.stderr)
    from MASRefineLib.experiment import code_version
    ws.info["bench"] = {"wall_s_per_pair": wall / len(atlas_ids), "cpu_s_per_pair": cpu / len(atlas_ids),
                        "stage": stage, "preset": preset, "device": str(device), "code": code_version()}
    ws.save(folder)
    return folder


# -- tuning and report subjects (issue 19) -----------------------------------------------------------
# Every default, preset and choice so far was measured on the seed-0 split of each data set: atlases
# order[:10] (order[:8] for some knee tables), targets order[8:15], the surrogate U-Net's validation subjects
# and the subjects named in docs/. Those are *tuning* subjects: anything may be tuned or chosen on them.
# *Report* subjects are never looked at while tuning: no tuning benchmark may use them (``split`` and
# ``training_pool`` refuse or leave them out), and README / headline numbers come from them alone.
# They are fixed lists, not derived, so no change of split code can move them: five subjects from the end
# of the seed-0 order that no earlier benchmark used as a target or for validation and no doc named
# (Testing/test_bench.py checks both). The knee ones were among the 20 subjects earlier sessions
# trained a surrogate U-Net on (their labels, never their results, were seen); the IXI ones were never used.
REPORT_SUBJECTS: dict[str, tuple[str, ...]] = {
    "knee": ("AKOA_9135902_00m", "ZIB-UQ_9002817", "ZIB-UQ_9004175", "ZIB-UQ_9031426", "AKOA_9171097_00m"),
    "ixi": ("IXI575-HH-2658", "IXI572-HH-2605", "IXI537-HH-2378", "IXI609-HH-2600", "IXI212-HH-1643"),
}
N_ATLASES = 10          # the atlas set of every pipeline table: the seed-0 order's first 10 (tuning) subjects
N_TUNING_TARGETS = 5    # the tuning targets: the next 5


def subjects(dataset: str) -> list[str]:
    """All subject ids of ``dataset`` ("knee" or "ixi")."""
    if dataset == "knee":
        return knee_subjects()
    if dataset == "ixi":
        return ixi_subjects()
    raise ValueError(f"dataset must be 'ixi' or 'knee', got {dataset!r}")


def benchmark_split(dataset: str, which: str) -> tuple[list[str], list[str]]:
    """(atlas ids, target ids) of the pipeline tables: the same 10 tuning atlases, and either the 5 tuning
    targets (``which="tuning"``) or the 5 report targets (``which="report"``)."""
    order = _seed0_order(dataset)
    report = set(REPORT_SUBJECTS[dataset])
    tuning_order = [s for s in order if s not in report]
    atlases = tuning_order[:N_ATLASES]
    if which == "tuning":
        return atlases, tuning_order[N_ATLASES:N_ATLASES + N_TUNING_TARGETS]
    if which == "report":
        return atlases, list(REPORT_SUBJECTS[dataset])
    raise ValueError(f"split must be 'tuning' or 'report', got {which!r}")


def training_pool(dataset: str, exclude: Sequence[str] = ()) -> list[str]:
    """Subjects of ``dataset`` (in subjects.txt order) that are neither report subjects nor in ``exclude``:
    the pool tuning benchmarks draw extra (e.g. surrogate training) subjects from."""
    skip = set(REPORT_SUBJECTS[dataset]) | set(exclude)
    return [s for s in subjects(dataset) if s not in skip]


def _seed0_order(dataset: str) -> list[str]:
    ids = subjects(dataset)
    atlases, targets = split(ids, 1, len(ids) - 1, seed=0, allow_report=True)
    return atlases + targets
