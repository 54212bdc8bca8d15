"""The GPU run of issue 22: what ``bench/gpu.sh`` runs on a CUDA machine (and, tiny, on CPU as a dry run).

Sub-commands:

``prepare`` (here, through ``bench/gpu_prepare.sh``)
    Copies into ``.gpu/shared`` (a ``../shared`` look-alike; the GPU machine has no ``../shared``) the data of
    the run: the synth_knee.py tool, the knee label maps of the seed-0 tuning split (10 atlases + the first
    tuning target; images are synthesized there), the IXI brains of the same split, the three IXI subjects the
    CUDA test uses, and as many extra IXI tuning atlases as fit in ``--budget-mib`` (for a run with every atlas).
    ``plan.json`` names them. No subject of ``bench.datasets.REPORT_SUBJECTS`` is ever copied.

``run`` (there, through ``bench/gpu.sh``)
    Runs each part in its own process with its own time limit, inside one overall deadline, so that a part that
    fails or hangs costs only its own row: ``env``, ``data`` (knee synthesis, atlas sets), ``cuda-tests``
    (the tests of Testing/ that need CUDA), ``segment-knee`` and ``segment-brain`` (``masrefine segment`` with
    ``--device``; per-stage seconds from the manifest.json it writes, peak GPU memory, Dice against the
    reference), ``train-unet`` (the surrogate U-Net's own training loop, steps/s after the first epoch; plus
    forward+backward alone on random patches of the same shape), ``train-votenet`` (VoteNet+'s training loop
    on the pairs of the knee run), and ``segment-brain-all`` (every shipped brain atlas) when time is left.
    Writes ``<out>/gpu-results.json`` and ``<out>/gpu-table.md`` and prints the table.

``part NAME`` runs one part in this process (what ``run`` starts); its result is one JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# -- sizes of the run ---------------------------------------------------------------------------------------
#: (full, --quick): atlases per segment run, U-Net epochs x steps, VoteNet+ iterations
#: atlases / pairs the training parts read: a step's cost does not depend on them, reading them (CPU) does
FULL = {"knee_atlases": 10, "brain_atlases": 10, "preset": "default", "unet_epochs": 4, "unet_steps": 25,
        "unet_atlases": 6, "unet_compute_steps": 30, "votenet_iterations": 200, "votenet_train_pairs": 4}
QUICK = {"knee_atlases": 2, "brain_atlases": 2, "preset": "fast", "unet_epochs": 2, "unet_steps": 2,
         "unet_atlases": 2, "unet_compute_steps": 3, "votenet_iterations": 12, "votenet_train_pairs": 1}
#: seconds each part may take at most (further capped by the overall deadline, keeping MIN_S for each later part)
LIMIT_S = {"env": 60, "data": 120, "cuda-tests": 120, "segment-knee": 150, "segment-brain": 120, "train-unet": 60,
           "train-votenet": 60, "segment-brain-all": 150}
MIN_S = {"env": 10, "data": 30, "cuda-tests": 30, "segment-knee": 45, "segment-brain": 40, "train-unet": 25,
         "train-votenet": 25, "segment-brain-all": 0}
PARTS = list(LIMIT_S)
#: the optional part runs only with at least this many seconds left
OPTIONAL_MIN_S = 90
STAGES = ["load", "models", "register", "refine", "fuse", "write", "qa"]


# ============================================================================================ prepare (here)
def prepare(gpu_dir: Path, budget_mib: float) -> None:
    from bench.datasets import (REPORT_SUBJECTS, benchmark_split, ixi_case, ixi_dir, knee_labels_dir,
                                synth_knee_script, training_pool)

    shared = gpu_dir / "shared"
    if shared.exists():
        shutil.rmtree(shared)
    ixi_out, knee_out = shared / "data" / "ixi-dlmuse", shared / "data" / "knee-oai"
    for d in (ixi_out / "images", ixi_out / "labels", knee_out / "labels", shared / "tools"):
        d.mkdir(parents=True)
    shutil.copy2(synth_knee_script(), shared / "tools" / "synth_knee.py")
    for name in ("subjects.txt", "MUSE_listROIs.csv", "README.md"):
        shutil.copy2(ixi_dir() / name, ixi_out / name)
    for name in ("subjects.txt", "README.md"):
        shutil.copy2(knee_labels_dir().parent / name, knee_out / name)

    knee_atlases, knee_targets = benchmark_split("knee", "tuning")
    ixi_atlases, ixi_targets = benchmark_split("ixi", "tuning")
    report = set().union(*REPORT_SUBJECTS.values())
    knee_ids = knee_atlases + knee_targets[:1]
    for s in knee_ids:
        shutil.copy2(knee_labels_dir() / f"{s}.nii.gz", knee_out / "labels" / f"{s}.nii.gz")
    # Testing/test_registration.py's CUDA test reads the first three subjects of subjects.txt (conftest.ixi_ids)
    test_ids = (ixi_dir() / "subjects.txt").read_text().split()[:3]

    def copy_ixi(s: str) -> None:
        for src, sub in zip(ixi_case(s), ("images", "labels")):
            shutil.copy2(src, ixi_out / sub / src.name)

    for s in dict.fromkeys(ixi_atlases + ixi_targets[:1] + test_ids):
        copy_ixi(s)
    budget = budget_mib * 2 ** 20 - _tree_size(gpu_dir)  # what the wheels etc. leave
    extra = []
    for s in training_pool("ixi", exclude=ixi_atlases + ixi_targets):  # never a tuning target as an atlas
        need = sum(p.stat().st_size for p in ixi_case(s) if not (ixi_out / p.parent.name / p.name).exists())
        if need > budget:
            break
        copy_ixi(s)
        extra.append(s)
        budget -= need
    plan = {"knee": {"atlases": knee_atlases, "target": knee_targets[0]},
            "ixi": {"atlases": ixi_atlases, "target": ixi_targets[0], "extra_atlases": extra,
                    "test_subjects": test_ids},
            "code": _git_head(),
            "split": "bench.datasets.benchmark_split(dataset, 'tuning'): atlases and the first tuning target; "
                     "extra IXI atlases from training_pool without the tuning targets"}
    used = set(knee_ids) | set(ixi_atlases) | {ixi_targets[0]} | set(extra) | set(test_ids)
    assert not used & report, f"report subjects copied: {sorted(used & report)}"
    (shared / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    print(f"data: {len(knee_ids)} knee label maps, {len(ixi_atlases)} + {len(extra)} IXI atlases, IXI target "
          f"{ixi_targets[0]}, knee target {knee_targets[0]}; .gpu holds {_tree_size(gpu_dir) / 2 ** 20:.1f} MiB "
          f"(budget {budget_mib} MiB; .gpu/download is not carried)")


def _tree_size(d: Path) -> int:
    """Bytes under ``d`` that travel (``download/`` and ``out/`` do not)."""
    return sum(p.stat().st_size for p in d.rglob("*")
               if p.is_file() and not {"download", "out", "stage"} & set(p.relative_to(d).parts[:1]))


# ============================================================================================ parts (there)
def _plan() -> dict:
    from bench.datasets import shared_dir

    return json.loads((shared_dir() / "plan.json").read_text())


def _data(args) -> dict:
    """What the ``data`` part made (atlas sets, target paths)."""
    return json.loads((Path(args.work) / "part-data.json").read_text())["result"]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_peak_mib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.startswith("cuda") else None


def _rss_peak_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def part_env(args) -> dict:
    import platform

    import torch

    r: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        r.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version())
    for mod in ("numpy", "scipy", "SimpleITK", "monai", "slicerio", "nrrd"):
        try:
            r[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError as e:
            r[mod] = f"MISSING ({e})"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    return r


def part_data(args) -> dict:
    """Knees synthesized in parallel (one process per knee; ~12 s each on one core), then the atlas sets."""
    from concurrent.futures import ThreadPoolExecutor

    import bench.datasets as ds
    from bench.datasets import knee_dataset, make_atlas_set
    from MASRefineLib.atlas import init_atlas_set
    from MASRefineLib.labels import LabelTable

    size = QUICK if args.quick else FULL
    plan = _plan()
    knee_ids = plan["knee"]["atlases"][:size["knee_atlases"]] + [plan["knee"]["target"]]
    kcache = Path(args.knee_cache or Path(args.work) / "knee").resolve()
    t = time.perf_counter()

    def synth(i: str) -> None:
        code = f"from bench.datasets import knee_dataset; knee_dataset([{i!r}], cache={str(kcache)!r}, verbose=False)"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

    with ThreadPoolExecutor(max_workers=max(1, min(len(knee_ids), (os.cpu_count() or 2) - 1))) as ex:
        list(ex.map(synth, knee_ids))
    knee_dataset(knee_ids, cache=kcache, verbose=False)  # checks all are there
    synth_s = time.perf_counter() - t
    sets = Path(args.work) / "atlas-sets"
    # the knee set straight from our knee folder (make_atlas_set would synthesize into the default cache)
    knee = init_atlas_set(sets / "knee", kcache / "images", kcache / "labels", LabelTable.load(kcache / "labels.json"),
                          ids=plan["knee"]["atlases"][:size["knee_atlases"]], overwrite=True)
    brain = make_atlas_set("ixi", plan["ixi"]["atlases"][:size["brain_atlases"]], cache=sets)
    every = plan["ixi"]["atlases"] + plan["ixi"]["extra_atlases"]
    brain_all = make_atlas_set("ixi", every if not args.quick else every[:3], cache=sets)
    return {"knee_synthesis_s": round(synth_s, 1), "knees": len(knee_ids), "knee_set": str(knee.root),
            "brain_set": str(brain.root), "brain_all_set": str(brain_all.root), "brain_all_atlases": len(brain_all.ids),
            "knee_target": [str(kcache / sub / f"{plan['knee']['target']}.nii.gz") for sub in ("images", "labels")],
            "brain_target": [str(p) for p in ds.ixi_case(plan["ixi"]["target"])]}


def cuda_test_files() -> list[str]:
    """Testing/ files with a test that needs CUDA (skipped without: ``torch.cuda.is_available()``)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "Testing").glob("test_*.py")
                  if "torch.cuda.is_available()" in p.read_text())


def part_cuda_tests(args) -> dict:
    files = cuda_test_files()
    log = Path(args.out) / "gpu-cuda-tests.txt"
    cmd = [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-q", "-rA", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(r.stdout)
    print(r.stdout[-3000:])
    last = [ln for ln in r.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
    return {"files": files, "selection": "-k cuda", "exit_code": r.returncode, "summary": last[0].strip("= "),
            "ok": r.returncode in (0, 5)}  # 5: nothing selected


def part_segment(args, which: str) -> dict:
    from MASRefineLib.cli import main as cli_main

    size = QUICK if args.quick else FULL
    data = _data(args)
    atlas_set = {"knee": data["knee_set"], "brain": data["brain_set"], "brain-all": data["brain_all_set"]}[which]
    image, truth = data["knee_target" if which == "knee" else "brain_target"]
    out = Path(args.work) / f"segment-{which}"
    if out.exists():
        shutil.rmtree(out)
    argv = ["segment", "--atlases", atlas_set, "--target", image, "--truth", truth, "--out", str(out),
            "--device", args.device, "--preset", size["preset"], "--quiet"]
    print("masrefine " + " ".join(argv), flush=True)
    t = time.perf_counter()
    rc = cli_main(argv)
    _sync(args.device)
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"masrefine segment exited {rc}")
    man = json.loads((out / "manifest.json").read_text())
    shutil.copy2(out / "manifest.json", Path(args.out) / f"gpu-manifest-{which}.json")
    stages: dict[str, float] = {}
    for s in man.get("stages", []):
        stages[s["name"]] = round(stages.get(s["name"], 0.0) + float(s.get("seconds", 0.0)), 2)
    dice = None
    metrics = out / "metrics.json"
    if metrics.exists():
        labs = [x["dice"] for x in json.loads(metrics.read_text()).get("labels", []) if x.get("dice") is not None]
        dice = round(sum(labs) / len(labs), 4) if labs else None
    return {"argv": argv, "wall_s": round(wall, 1), "manifest_seconds_total": man.get("seconds_total"),
            "stages_s": stages, "atlases": len(man.get("atlases", [])), "mean_dice": dice,
            "gpu_peak_mib": _gpu_peak_mib(args.device), "rss_peak_mib": _rss_peak_mib(),
            "parameters": man.get("parameters"), "output": str(out)}


def part_train_unet(args) -> dict:
    """The surrogate U-Net's own loop (``segmenter.train_segmenter``: CPU patch sampling + GPU step), timed
    from its end-of-epoch events after the first epoch (warm-up: cuDNN autotuning, allocator), and the
    forward+backward+Adam step alone on random patches of the same shape."""
    import torch
    import torch.nn.functional as F

    from MASRefineLib.atlas import AtlasSet
    from MASRefineLib.segmenter import (SegmenterSettings, auto_loss, build_unet, head_width, train_segmenter)

    size = QUICK if args.quick else FULL
    data = _data(args)
    aset = AtlasSet.load(data["knee_set"])
    ids = aset.ids[:size["unet_atlases"]]
    images, labels = zip(*(aset.read(a) for a in ids))
    s = SegmenterSettings(epochs=size["unet_epochs"], steps_per_epoch=size["unet_steps"])
    ends: list[float] = []

    def progress(ev) -> None:
        if ev.stage == "train-segmenter" and ev.message.startswith("epoch") and "step" not in ev.message:
            ends.append(time.perf_counter())

    models = Path(args.work) / "unet-models"
    if models.exists():
        shutil.rmtree(models)
    t = time.perf_counter()
    seg = train_segmenter(images, labels, aset.label_table, models, s, ids=ids, device=args.device,
                          progress=progress, resume=False)
    wall = time.perf_counter() - t
    steady = (len(ends) - 1) * s.steps_per_epoch / (ends[-1] - ends[0]) if len(ends) >= 2 else None
    r: dict[str, Any] = {"loop": {"epochs": s.epochs, "steps_per_epoch": s.steps_per_epoch, "batch": s.batch_size,
                                  "patch": s.patch_size, "atlases": len(ids), "spacing_mm": seg.spacing_mm, "loss": seg.settings.loss,
                                  "steps_per_s_after_epoch_1": round(steady, 2) if steady else None,
                                  "wall_s": round(wall, 1)}}
    # compute alone: knee classes and brain classes (148 structures: the head is wider)
    dev = torch.device(args.device)
    for name, n_classes in (("knee", len(aset.label_table) + 1), ("brain", _brain_classes(data))):
        torch.manual_seed(0)
        net = build_unet(n_classes, s.channels, s.strides, s.num_res_units, head_width(n_classes, s.channels)).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=s.learning_rate)
        x = torch.rand(s.batch_size, 1, *(s.patch_size,) * 3, device=dev)
        y = torch.randint(0, n_classes, (s.batch_size, *(s.patch_size,) * 3), device=dev)
        n = size["unet_compute_steps"]
        for i in range(n + 3):  # 3 warm-up steps
            if i == 3:
                _sync(args.device)
                t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        _sync(args.device)
        r[f"compute_{name}"] = {"classes": n_classes, "steps": n, "loss": "ce" if auto_loss(n_classes - 1) == "ce"
                                else "ce (loop adds soft Dice)", "steps_per_s": round(n / (time.perf_counter() - t), 2)}
    r["gpu_peak_mib"] = _gpu_peak_mib(args.device)
    return r


def _brain_classes(data: dict) -> int:
    from MASRefineLib.atlas import AtlasSet

    return len(AtlasSet.load(data["brain_set"]).label_table) + 1


def part_train_votenet(args) -> dict:
    """VoteNet+'s loop (``training.train_votenet``) on the knee run's warped atlases against its target
    (the pairs training uses); steps/s from its progress events between iteration 11 and the last."""
    import numpy as np
    import SimpleITK as sitk

    from MASRefineLib.training import Pair, pairs_from_warped, train_votenet
    from MASRefineLib.imageio import normalize_intensity, read_image, read_label
    from MASRefineLib.warped import WarpedSet

    size = QUICK if args.quick else FULL
    data = _data(args)
    image, truth = data["knee_target"]
    timg, tlab = read_image(image), read_label(truth)
    tarr = normalize_intensity(sitk.GetArrayFromImage(timg)).astype(np.float32)
    larr = sitk.GetArrayFromImage(tlab).astype(np.int64)
    folder = Path(args.work) / "segment-knee" / "atlases"
    if (folder / "report.json").exists():
        pairs, source = pairs_from_warped(WarpedSet.load(folder), tarr, larr, "target"), "knee run's warped atlases"
    else:  # the knee run failed: atlases resampled without registration (the cost of a step is the same)
        from MASRefineLib.atlas import AtlasSet
        from MASRefineLib.geometry import Grid
        from MASRefineLib.imageio import resample_image, resample_label

        aset, grid = AtlasSet.load(data["knee_set"]), Grid.from_image(timg)
        pairs = []
        for a in aset.ids:
            ai, al = aset.read(a)
            pairs.append(Pair(normalize_intensity(sitk.GetArrayFromImage(resample_image(ai, grid))).astype(np.float32),
                              sitk.GetArrayFromImage(resample_label(al, grid)).astype(np.int64), tarr, larr, a, "target"))
        source = "atlases resampled onto the target grid WITHOUT registration (the knee run gave none)"
    marks: dict[int, float] = {}

    def progress(ev) -> None:
        if ev.message.startswith("iteration "):
            marks[int(ev.message.split()[1].split("/")[0])] = time.perf_counter()

    n = size["votenet_iterations"]
    t = time.perf_counter()
    train = pairs[1:1 + size["votenet_train_pairs"]]
    model = train_votenet(train, pairs[:1], iterations=n, device=args.device, progress=progress)
    wall = time.perf_counter() - t
    its = sorted(marks)
    first = next((i for i in its if i >= 11), its[0])
    rate = (its[-1] - first) / (marks[its[-1]] - marks[first]) if its[-1] > first else None
    tr = model.meta["training"]
    return {"pairs": source, "train_pairs": len(train), "iterations": n, "batch": tr["batch"], "patch": tr["patch"],
            "steps_per_s": round(rate, 2) if rate else None, "steps_timed": its[-1] - first,
            "training_s": tr["seconds"], "wall_s_with_calibration": round(wall, 1),
            "gpu_peak_mib": _gpu_peak_mib(args.device)}


def run_part(args) -> int:
    """One part in this process; its result (or error) as ``<work>/part-<name>.json`` (not in ``<out>``: at most
    8 files come back from the device machine)."""
    t = time.perf_counter()
    fn = {"env": part_env, "data": part_data, "cuda-tests": part_cuda_tests, "train-unet": part_train_unet,
          "train-votenet": part_train_votenet, "segment-knee": lambda a: part_segment(a, "knee"),
          "segment-brain": lambda a: part_segment(a, "brain"),
          "segment-brain-all": lambda a: part_segment(a, "brain-all")}[args.name]
    try:
        res, status = fn(args), "ok"
        if args.name == "cuda-tests" and not res["ok"]:
            status = "failed"
    except Exception as e:  # noqa: BLE001 -- one part's failure is that part's row, not the end of the run
        import traceback

        traceback.print_exc()
        res, status = {"error": f"{type(e).__name__}: {e}"}, "failed"
    (Path(args.work) / f"part-{args.name}.json").write_text(json.dumps(
        {"status": status, "seconds": round(time.perf_counter() - t, 1), "result": res}, indent=1, default=str) + "\n")
    return 0 if status == "ok" else 1


# ============================================================================================ run (there)
def run_all(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or time.time() + 470
    results: dict[str, Any] = {}
    for i, name in enumerate(PARTS):
        left = deadline - time.time()
        reserve = sum(MIN_S[p] for p in PARTS[i + 1:])
        limit = min(LIMIT_S[name] * args.limit_scale, left - reserve * args.limit_scale)
        if name == "segment-brain-all" and limit < OPTIONAL_MIN_S * args.limit_scale:
            results[name] = {"status": "not run", "seconds": 0, "result": {"why": f"{left:.0f} s left"}}
            continue
        if limit < 5:
            results[name] = {"status": "not run", "seconds": 0, "result": {"why": "overall deadline"}}
            continue
        print(f"\n=== {name} (limit {limit:.0f} s, {left:.0f} s left) ===", flush=True)
        (Path(args.work) / f"part-{name}.json").unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "part", name, "--out", str(out), "--work", args.work,
               "--device", args.device] + (["--quick"] if args.quick else []) + (
                   ["--knee-cache", args.knee_cache] if args.knee_cache else [])
        t = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: the part's children go too
            p.wait()
        f = Path(args.work) / f"part-{name}.json"
        if f.exists():
            results[name] = json.loads(f.read_text())
        else:
            results[name] = {"status": "timed out" if time.perf_counter() - t >= limit - 1 else f"crashed ({p.returncode})",
                             "seconds": round(time.perf_counter() - t, 1), "result": {}}
    doc = {"issue": 22, "device": args.device, "quick": args.quick, "sizes": QUICK if args.quick else FULL,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code": _git_head(), "parts": results,
           "total_s": round(time.time() - (deadline - args.budget), 1) if args.deadline else None}
    (out / "gpu-results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    table = render(doc)
    (out / "gpu-table.md").write_text(table)
    print("\n" + table, flush=True)
    return 0 if all(r["status"] in ("ok", "not run") for r in results.values()) else 1


def _git_head() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes); on the device machine, whose copy of the
    tree has no .git, the one ``prepare`` recorded in plan.json."""
    try:
        head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    if head:
        return head
    try:
        return f"{_plan()['code']} (at prepare)"
    except (OSError, KeyError, ValueError):
        return "unknown"


def render(doc: dict) -> str:
    """One markdown table: a row per part; segment rows with their stage seconds, training rows with steps/s."""
    def f(v, nd=1):
        return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v))

    env = doc["parts"].get("env", {}).get("result", {})
    head = (f"GPU run (issue 22): device {doc['device']}{' (--quick dry run)' if doc['quick'] else ''}, "
            f"{env.get('gpu', 'no GPU')}, torch {env.get('torch', '?')}, code {doc['code']}, {doc['created']}"
            + (f", total {doc['total_s']} s" if doc.get("total_s") is not None else ""))
    # the stages the runs recorded (pipeline.py names them; new ones get a column too), in the usual order
    seen = [n for r in doc["parts"].values() for n in (r.get("result") or {}).get("stages_s", {})]
    stages = [n for n in STAGES if n in seen] + [n for n in dict.fromkeys(seen) if n not in STAGES] or STAGES
    cols = ["part", "status", "s", *stages, "steps/s", "GPU peak MiB", "mean Dice", "note"]
    rows = []
    for name, r in doc["parts"].items():
        res = r.get("result", {})
        st = res.get("stages_s", {})
        steps, note = None, ""
        if name == "env":
            note = ", ".join(f"{k} {env.get(k)}" for k in ("cuda", "cpu_count", "SimpleITK", "monai") if k in env)
        elif name == "data":
            note = (f"{res.get('knees')} knees ready (synthesized where missing) in {res.get('knee_synthesis_s')} s"
                    if "knees" in res else "")
        elif name == "cuda-tests":
            note = f"{', '.join(res.get('files', []))}: {res.get('summary', '')}"
        elif name.startswith("segment"):
            note = (f"{res.get('atlases')} atlases, preset {(res.get('parameters') or {}).get('preset', '?')}"
                    if res.get("atlases") is not None else "")
        elif name == "train-unet":
            loop = res.get("loop", {})
            steps = loop.get("steps_per_s_after_epoch_1")
            ck, cb = res.get("compute_knee", {}), res.get("compute_brain", {})
            if loop:
                note = (f"own loop, batch {loop.get('batch')} x {loop.get('patch')}^3, {loop.get('loss')}; "
                        f"fwd+bwd alone: knee {ck.get('steps_per_s')}/s, brain ({cb.get('classes')} classes) "
                        f"{cb.get('steps_per_s')}/s")
        elif name == "train-votenet":
            steps = res.get("steps_per_s")
            if "iterations" in res:
                note = f"batch {res.get('batch')} x {res.get('patch')}^3, {res.get('steps_timed')} steps timed; {res.get('pairs')}"
        if "error" in res:
            note = (note + " " if note else "") + "error: " + res["error"][:160]
        if "why" in res:
            note = res["why"]
        rows.append([name, r.get("status", "?"), f(r.get("seconds")), *[f(st.get(s), 2) for s in stages],
                     f(steps, 2), f(res.get("gpu_peak_mib"), 0), f(res.get("mean_dice"), 4),
                     note.replace("|", "/")])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Stage columns: seconds from the run's manifest.json (`stages`); s: the part's wall seconds "
              "(process start, imports and data reading included). Steps/s: after warm-up (U-Net: epochs 2+, "
              "VoteNet+: iterations 11+)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--gpu-dir", default=str(ROOT / ".gpu"))
    p.add_argument("--budget-mib", type=float, default=56)
    for name in ("run", "part"):
        q = sub.add_parser(name)
        if name == "part":
            q.add_argument("name", choices=PARTS)
        q.add_argument("--out", required=True)
        q.add_argument("--work", default="/tmp/masrefine-gpu")
        q.add_argument("--device", default="cuda")
        q.add_argument("--quick", action="store_true")
        q.add_argument("--knee-cache", default=None, help="folder of synthesized knees (default: <work>/knee)")
        q.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the run must end")
        q.add_argument("--budget", type=float, default=470, help="seconds of the whole run (for the total)")
        q.add_argument("--limit-scale", type=float, default=1.0,
                       help="multiplies every part's limit (the CPU dry run is far slower than a GPU)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(Path(args.gpu_dir), args.budget_mib)
        return 0
    return run_part(args) if args.cmd == "part" else run_all(args)


if __name__ == "__main__":
    sys.exit(main())
