"""``masrefine batch`` on real Dask clusters on loopback (2 worker processes, 1 thread each) and the phantom: every
target's output equals ``segment``'s, a rerun skips finished targets, a corrupt target fails alone with its error in
summary.csv, a worker killed mid-batch (its process, by pid) does not stop the batch, and the worker protocol's
batch job runs and cancels. Fast settings (affine, no refinement, plurality vote, 36^3 phantom)."""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib import batch, sampledata
from MASRefineLib.protocol import jobs
from MASRefineLib.cli import main as cli_main
from MASRefineLib.errors import MASRefineError
from MASRefineLib.protocol.manifest import read_manifest
from MASRefineLib.pipeline import SegmentOptions, segment
from MASRefineLib.runner import JobRunner

pytest.importorskip("distributed", reason="masrefine batch needs dask[distributed] (pip install 'dask[distributed]')")

FAST = dict(prereg="affine", refine="none", fusion="pv", preset="fast", qa_picture=False)
FAST_ARGS = ["--prereg", "affine", "--refine", "none", "--fusion", "pv", "--preset", "fast", "--no-qa-picture"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return sampledata.make_sample(tmp_path_factory.mktemp("batch-sample"), n_atlases=3, n_targets=4,
                                  size=(36, 36, 36), spacing=2.5)


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of the batch's own making (2 workers x 1 thread on 127.0.0.1, no dashboard)."""
    plan = batch.plan_local_cluster(4, (2 ** 30, "test"), workers=2, threads_per_worker=1)
    c = batch.start_local_cluster(plan, dashboard=None)
    yield c
    c.close()


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / batch.SUMMARY_NAME, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _assert_same_outputs(a: Path, b: Path) -> None:
    """Two segment output folders hold the same results: the same listed files, equal voxels, QA numbers and
    metrics (times aside)."""
    ma, mb = read_manifest(a), read_manifest(b)
    files = sorted((e["path"], e["role"]) for e in ma["outputs"])
    assert files == sorted((e["path"], e["role"]) for e in mb["outputs"])
    # the same settings (a batch task never trains: train_missing is off there, threads are the cluster's)
    assert batch.compared_settings(ma["parameters"]) == batch.compared_settings(mb["parameters"])
    assert ma["parameters"]["threads"] == mb["parameters"]["threads"] == 1
    for path, role in files:
        if path.endswith((".nii.gz", ".nrrd")):
            x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / path))) for d in (a, b))
            assert x.dtype == y.dtype and x.shape == y.shape, path
            assert np.array_equal(x, y) if x.dtype.kind in "iu" else np.allclose(x, y, atol=1e-6, rtol=0), path
    with open(a / "qa.csv") as fa, open(b / "qa.csv") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ra] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rb]
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())


def test_batch_equals_segment_resumes_and_isolates_a_corrupt_target(cohort, tmp_path):
    # a CSV of the 4 targets and a truncated copy of the first (ITK would zero-fill it; the reader refuses it)
    bad = tmp_path / "inputs" / "bad.nii.gz"
    bad.parent.mkdir()
    data = Path(cohort["targets"][0]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    csv_path = tmp_path / "inputs" / "cohort.csv"
    lines = ["id,image,truth"] + [f"{Path(t).name.split('.')[0]},{t},{g}" for t, g in zip(cohort["targets"], cohort["truths"])]
    lines.insert(2, f"bad,bad.nii.gz,{cohort['truths'][0]}")  # relative to the CSV's folder
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["batch", "--atlases", cohort["atlas_dir"], "--targets", str(csv_path), "--out", str(out),
            "--workers", "2", "--threads-per-worker", "1", "--dashboard", "none", "--quiet",
            "--groups", json.dumps(cohort["groups"]), *FAST_ARGS]
    assert cli_main(args) == 1  # one target failed: the exit status says so, after everything else ran

    rows = _summary(out)
    ids = ["target01", "bad", "target02", "target03", "target04"]
    assert list(rows) == ids
    assert rows["bad"]["status"] == "failed" and rows["bad"]["attempts"] == "2"
    err = rows["bad"]["error"]
    assert str(bad) in err and "\n" not in err and not (out / "bad" / "manifest.json").exists()
    good = [i for i in ids if i != "bad"]
    for i in good:
        r = rows[i]
        assert r["status"] == "done" and r["attempts"] == "1" and r["error"] == "", r
        assert float(r["seconds"]) > 0 and float(r["peak_memory_mb"]) > 100 and r["worker"]
        assert r["atlases"] == "3" and 0 < float(r["agreement_mean"]) <= 1 and 0 < float(r["dice_bone"]) <= 1
    # the batch ran on two worker processes
    assert len({rows[i]["worker"] for i in good}) == 2

    # every target's output is segment's on the same target with the same options (one torch thread each, as
    # the 2-core machine's 2 workers x 1 thread give)
    threads = torch.get_num_threads()
    try:
        for t, g in zip(cohort["targets"], cohort["truths"]):
            tid = Path(t).name.split(".")[0]
            ref = tmp_path / "segment" / tid
            segment(t, cohort["atlas_dir"], ref, SegmentOptions(**FAST, threads=1), truth=g, groups=cohort["groups"])
            _assert_same_outputs(out / tid, ref)
            assert json.loads((out / tid / "metrics.json").read_text())["groups"]["bone"]["dice"] == \
                pytest.approx(float(rows[tid]["dice_bone"]))
    finally:
        torch.set_num_threads(threads)

    # the cohort's mean and sd per label group, over the 4 targets with metrics
    with open(out / batch.COHORT_NAME) as f:
        cohort_rows = {(r["group"], r["metric"]): r for r in csv.DictReader(f)}
    for group in ("bone", "cartilage", "mean"):
        vals = np.array([float(rows[i][f"dice_{group}"]) for i in good])
        c = cohort_rows[(group, "dice")]
        assert c["n"] == "4" and float(c["mean"]) == pytest.approx(vals.mean(), abs=1e-6)
        assert float(c["sd"]) == pytest.approx(vals.std(ddof=1), abs=1e-6)

    # a rerun skips the finished targets (their files untouched) and tries the failed one again
    stamps = {i: (out / i / "manifest.json").stat().st_mtime_ns for i in good}
    assert cli_main(args) == 1
    rows2 = _summary(out)
    assert [rows2[i]["status"] for i in ids] == ["skipped", "failed", "skipped", "skipped", "skipped"]
    assert {i: (out / i / "manifest.json").stat().st_mtime_ns for i in good} == stamps
    assert rows2["target02"]["dice_bone"] == rows["target02"]["dice_bone"]
    assert rows2["target02"]["peak_memory_mb"] == rows["target02"]["peak_memory_mb"]  # from the earlier summary
    assert not (out / ".dask-scratch").exists()

    # the same folder with other settings is refused before anything runs, naming the setting
    with pytest.raises(MASRefineError, match="fusion 'pv'.*'wv'"):
        batch.run_batch(cohort["atlas_dir"], csv_path, out, SegmentOptions(**{**FAST, "fusion": "wv"}), workers=1)


def test_worker_killed_mid_batch(cohort, cluster, tmp_path):
    """A worker process killed (SIGKILL, by pid) while it runs a target: the batch still completes every target
    on an existing scheduler (--scheduler), and the lost attempt left no result behind."""
    from distributed import Client
    out = tmp_path / "out"
    killed: dict = {}

    def killer() -> None:
        with Client(cluster.scheduler_address, timeout="20s") as c:
            pids = c.run(os.getpid)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed:
                for addr, keys in c.processing().items():
                    if any("masrefine-batch" in str(k) for k in keys):
                        killed.update(pid=pids[addr], address=addr, keys=[str(k) for k in keys], time=time.time())
                        os.kill(pids[addr], signal.SIGKILL)
                        break
                time.sleep(0.02)

    th = threading.Thread(target=killer)
    th.start()
    r = batch.run_batch(cohort["atlas_dir"], Path(cohort["targets"][0]).parent, out, SegmentOptions(**FAST),
                        scheduler=cluster.scheduler_address)
    th.join()
    assert killed, "no target was seen running"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # it is gone
    assert r["counts"]["done"] == 4 and r["counts"]["failed"] == 0
    rows = _summary(out)
    assert [rows[f"target0{i}"]["status"] for i in range(1, 5)] == ["done"] * 4
    for i in range(1, 5):
        m = read_manifest(out / f"target0{i}")  # complete: every listed file exists
        assert m["status"] == "complete" and killed["address"] not in rows[f"target0{i}"]["worker"]
    # the targets the dead worker held were finished by another worker after it died
    lost = [k for k in killed["keys"]]
    assert lost
    for key in lost:
        tid = next(t for t in ("target01", "target02", "target03", "target04") if t in key)
        assert (out / tid / "manifest.json").stat().st_mtime > killed["time"]


def test_batch_job_through_the_worker_and_cancel(cohort, cluster, tmp_path):
    """The worker protocol's batch job: progress events of stage batch, a result naming summary.csv; a second job
    cancelled through its cancel file stops with exit 3 and lists its unfinished targets as cancelled."""
    listing = tmp_path / "two.txt"
    listing.write_text("\n".join(cohort["targets"][:2]) + "\n")
    job = jobs.make_batch_job(listing, cohort["atlas_dir"], tmp_path / "out", scheduler=cluster.scheduler_address,
                              **FAST)
    assert jobs.validate_job(job) == []
    r = JobRunner(jobs.write_job(job, tmp_path / "job.json")).start()
    evs = list(r.events(120))
    assert r.returncode == 0, [e for e in evs if e["event"] in ("error", "output")][-5:]
    prog = [e for e in evs if e["event"] == "progress" and e["stage"] == "batch"]
    assert prog and prog[-1]["fraction"] == 1.0 and prog[-1]["data"]["done"] == 2 and prog[-1]["data"]["total"] == 2
    assert r.result["counts"]["done"] == 2 and Path(r.result["summary"]).is_file()

    # cancel: slower settings (refinement I) so that targets are mid-run when the cancel file appears
    job = jobs.make_batch_job(Path(cohort["targets"][0]).parent, cohort["atlas_dir"], tmp_path / "out2",
                              scheduler=cluster.scheduler_address, **{**FAST, "prereg": "deformable", "refine": "I"})
    r = JobRunner(jobs.write_job(job, tmp_path / "job2.json")).start()
    t0 = time.monotonic()
    for ev in r.events(120):
        if ev["event"] == "progress" and ev.get("data", {}).get("running", 0) >= 1 and time.monotonic() - t0 > 1:
            Path(job["cancel_file"]).write_text("")
    assert r.returncode == 3
    rows = _summary(tmp_path / "out2")
    assert "cancelled" in {x["status"] for x in rows.values()}
    for tid, x in rows.items():
        if x["status"] == "cancelled":
            assert not (tmp_path / "out2" / tid / "manifest.json").exists()
    # the cancelled targets' tasks stopped (no worker thread is still in run_target), not only left by the scheduler
    from distributed import Client
    with Client(cluster.scheduler_address) as c:
        deadline = time.monotonic() + 20
        while sum(c.run(_threads_in_run_target).values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum(c.run(_threads_in_run_target).values()) == 0


def _threads_in_run_target() -> int:
    """Threads of this (worker) process now inside batch.run_target."""
    n = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "run_target":
                n += 1
                break
            frame = frame.f_back
    return n


def test_targets_lists(cohort, tmp_path):
    folder = Path(cohort["targets"][0]).parent
    assert [t.id for t in batch.read_targets(folder)] == ["target01", "target02", "target03", "target04"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# cohort\n{cohort['targets'][1]}\n\n{os.path.relpath(cohort['targets'][0], tmp_path)}\n")
    ts = batch.read_targets(lst, Path(cohort["truths"][0]).parent)
    assert [(t.id, t.image, t.truth) for t in ts] == [("target02", cohort["targets"][1], cohort["truths"][1]),
                                                       ("target01", cohort["targets"][0], cohort["truths"][0])]
    lst.write_text(f"{cohort['targets'][0]}\n{cohort['targets'][0]}\n")
    with pytest.raises(MASRefineError, match="two targets have the id 'target01'"):
        batch.read_targets(lst)
    bad_csv = tmp_path / "t.csv"
    bad_csv.write_text("id,image\n../x,a.nii.gz\n")
    with pytest.raises(MASRefineError, match=r"t.csv: line 2: target id '../x' cannot be a folder name"):
        batch.read_targets(bad_csv)
    bad_csv.write_text("name,file\nx,a.nii.gz\n")
    with pytest.raises(MASRefineError, match="needs a column 'image'"):
        batch.read_targets(bad_csv)
    with pytest.raises(MASRefineError, match="no reference label map for target target01"):
        batch.read_targets(folder, tmp_path)
    with pytest.raises(MASRefineError, match="not found"):
        batch.read_targets(tmp_path / "nothing")


def test_local_cluster_plan():
    gib = 2 ** 30
    # cores decide when memory is plentiful; the memory a target needs decides when it is not
    p = batch.plan_local_cluster(100, (2 * gib, "m"), cores=16, available=64 * gib)
    assert (p.workers, p.threads_per_worker, p.torch_threads) == (16, 1, 1) and p.memory_limit == 4 * gib
    p = batch.plan_local_cluster(100, (10 * gib, "m"), cores=16, available=64 * gib, threads_per_worker=2)
    assert p.workers == 2 and p.torch_threads == 4 and p.notes
    assert batch.plan_local_cluster(3, (gib, "m"), cores=16, available=64 * gib).workers == 3  # no idle workers
    assert batch.plan_local_cluster(100, (gib, "m"), cores=16, available=64 * gib, device="cuda", gpus=2).workers == 2
    assert batch.plan_local_cluster(100, (gib, "m"), workers=5, cores=2, available=8 * gib).workers == 5


def test_batch_job_validation(cohort, tmp_path):
    job = jobs.make_batch_job(tmp_path / "missing", cohort["atlas_dir"], tmp_path / "o", workers=0, threads_per_worker=2)
    problems = jobs.validate_job(job)
    assert any("targets not found" in p for p in problems) and any("'workers' must be between" in p for p in problems)
    job = jobs.make_batch_job(Path(cohort["targets"][0]).parent, cohort["atlas_dir"], tmp_path / "o", scheduler=3)
    assert jobs.validate_job(job) == ["parameter 'scheduler' must be a text, got 3"]


def test_ctrl_c_cancels_the_batch(cohort, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the command's whole process group, its local workers included): exit 3 within
    seconds, summary.csv lists the unfinished targets as cancelled, none of them has a manifest, no process is left
    and no worker prints a traceback."""
    import subprocess
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "MASRefineLib.cli", "batch", "--atlases", cohort["atlas_dir"], "--targets",
           str(Path(cohort["targets"][0]).parent), "--out", str(out), "--workers", "2", "--dashboard", "none",
           "--prereg", "deformable", "--refine", "I", "--fusion", "pv", "--preset", "fast", "--no-qa-picture"]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and " 0 running" in (log.read_text().splitlines() or [" 0 running"])[-1]:
            time.sleep(0.2)  # until a target runs (a line per change: stderr is not a terminal)
        assert "running" in log.read_text(), log.read_text()
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(30) == 3, log.read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    import psutil
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _group(p.pid):
        time.sleep(0.2)
    assert not _group(p.pid), [(q.pid, q.cmdline()[:4]) for q in _group(p.pid)]  # nothing of the group is left
    text = log.read_text()
    assert "masrefine batch: cancelled" in text and "Traceback" not in text, text
    rows = _summary(out)
    assert "cancelled" in {r["status"] for r in rows.values()}
    for tid, r in rows.items():
        assert r["status"] in ("done", "cancelled")
        assert (out / tid / "manifest.json").exists() == (r["status"] == "done")
    assert not (out / ".dask-scratch").exists()


def test_cuda_needs_gpu_workers(cohort, cluster, tmp_path):
    """--device cuda on a scheduler whose workers offer no GPU resource is refused (tasks would wait forever)."""
    with pytest.raises(MASRefineError, match="no worker offers the resource GPU"):
        batch.run_batch(cohort["atlas_dir"], Path(cohort["targets"][0]).parent, tmp_path / "out",
                        SegmentOptions(**{**FAST, "device": "cuda"}), scheduler=cluster.scheduler_address)


def _group(pgid: int) -> list:
    """The live processes of a process group."""
    import psutil
    out = []
    for q in psutil.process_iter():
        try:
            if os.getpgid(q.pid) == pgid and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q)
        except (ProcessLookupError, psutil.Error):
            pass
    return out
