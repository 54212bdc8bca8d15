"""Small pipelines for exercising the worker protocol with real subprocesses (Testing/test_jobs.py).

Each is ``fn(job, progress) -> dict`` like MASRefineLib.pipeline.run_job; jobs name them as
``worker_pipelines:<name>``, which only a worker started through Testing/worker_launcher.py runs (it adds them to
MASRefineLib.protocol.jobs.PIPELINES in its own process).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MASRefineLib.imageio import read_image, write_image
from MASRefineLib.protocol.manifest import Manifest, begin_output
from MASRefineLib.progress import report


def _outputs(job, manifest: Manifest) -> None:
    """Real outputs from the job's target: a smoothed copy (volume) and a threshold (table of counts)."""
    out = Path(job["output_dir"])
    img = read_image(job["inputs"]["target"])
    smooth = sitk.SmoothingRecursiveGaussian(img, 2.0)
    write_image(smooth, out / "smooth.nii.gz")
    manifest.add(out / "smooth.nii.gz", "volume", "atlas-image", atlas_id="a1")
    arr = sitk.GetArrayViewFromImage(smooth)
    (out / "qa.csv").write_text(f"id,mean\na1,{float(arr.mean()):.6f}\n")
    manifest.add(out / "qa.csv", "table", "qa-table")
    manifest.set("atlases", [{"id": "a1", "qa": {"mean": float(arr.mean())}}])


def slow(job, progress):
    """``steps`` progress reports ``sleep`` seconds apart, then real outputs and the manifest."""
    p = job.get("parameters", {})
    steps, sleep = int(p.get("steps", 40)), float(p.get("sleep", 0.05))
    out = begin_output(job["output_dir"])
    m = Manifest(out, job["inputs"], p)
    with m.stage("work"):
        for i in range(steps):
            report(progress, "work", i / steps, f"step {i + 1}/{steps}", overall=0.9 * i / steps, loss=1.0 / (i + 1))
            time.sleep(sleep)
            # a partial output, written while the job runs (never listed unless the job finishes)
            (out / f"partial_{i:03d}.txt").write_text("x")
        report(progress, "work", 1.0, "done", overall=0.9)
    with m.stage("write"):
        report(progress, "write", 0.0, "outputs", overall=0.9)
        _outputs(job, m)
        report(progress, "write", 1.0, "outputs", overall=1.0)
    path = m.write()
    return {"manifest": str(path), "summary": {"steps": steps}}


def crash(job, progress):
    """Some progress and a partial output, then a hard crash (``mode``: abort) or an exception (raise)."""
    out = begin_output(job["output_dir"])
    for i in range(5):
        report(progress, "work", i / 10, f"step {i}")
        time.sleep(0.02)
    write_image(read_image(job["inputs"]["target"]), out / "half.nii.gz")
    if job.get("parameters", {}).get("mode") == "raise":
        raise RuntimeError("simulated failure in the middle of the job")
    sys.stderr.write("about to crash hard\n")
    sys.stderr.flush()
    os.abort()


def noisy(job, progress):
    """Prints junk on stdout in every way a library might, logs and warns, then finishes."""
    out = begin_output(job["output_dir"])
    print("junk from print()")
    sys.stdout.write("MASREFINE-EVENT {not json\n")
    sys.stdout.flush()
    os.write(1, b"junk written to fd 1\n")
    logging.getLogger("MASRefineLib.test").info("an informative message")
    warnings.warn("a warning from a library")
    logging.getLogger("MASRefineLib.test").warning("a logged warning")
    report(progress, "work", 0.5, "half", nan_value=float("nan"), array=np.arange(3))
    m = Manifest(out, job["inputs"], job.get("parameters"))
    _outputs(job, m)
    return {"manifest": str(m.write())}


def needs_missing_package(job, progress):
    import masrefine_no_such_package  # noqa: F401
