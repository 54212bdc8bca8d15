"""The Slicer module's glue, driven outside Slicer with real worker processes.

MASRefine/MASRefine.py is imported against stand-ins for Slicer's Python modules (Testing/
slicer_stubs.py); everything else is real: ``MASRefineLogic.start`` exports the target, writes job.json
with ``MASRefineLib.protocol.jobs``, runs ``MASRefineLib.runner.JobRunner`` (a real subprocess running
``python -m MASRefineLib.worker``), ``MASRefineJob`` pumps its events, and the results go through the
real manifest and load plan. The worker runs the small pipelines of Testing/worker_pipelines.py (the
segmentation pipeline itself is tested elsewhere): the runner factory swaps the job's pipeline.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer_stubs
import worker_launcher
from MASRefineLib.protocol import jobs
from MASRefineLib.runner import JobRunner

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER_ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}  # worker_launcher adds worker_pipelines


@pytest.fixture
def mod(monkeypatch, tmp_path):
    module, slicer = slicer_stubs.load_module(monkeypatch, tmp_path)
    jobModule = slicer_stubs.submodule("Job")
    assert jobModule.activeJobs == [] and not jobModule.jobGuardsInstalled  # a fresh import per test
    yield module, slicer
    for job in list(jobModule.activeJobs):  # never leave a worker behind
        job.runner.kill()


@pytest.fixture
def target():
    """A small oblique, anisotropic image (what the target volume node holds)."""
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.random((12, 14, 16)).astype(np.float32))
    img.SetSpacing((0.7, 0.8, 1.5))
    img.SetOrigin((-10.0, 5.0, 2.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return slicer_stubs.volume_node(img, "knee/target 01")


@pytest.fixture
def atlas_dir(tmp_path):
    d = tmp_path / "atlases"
    d.mkdir()
    (d / "atlas.json").write_text(json.dumps({"schema_version": 1, "labels": {}, "atlases": []}))
    return d


def pipeline_factory(pipeline: str, seen: list | None = None, **params):
    """A runnerFactory that runs ``worker_pipelines:<pipeline>`` instead of the segmentation pipeline
    (after checking the job the module wrote is valid for the real one)."""
    def factory(job_path):
        job = json.loads(Path(job_path).read_text())
        assert jobs.validate_job(job) == [], jobs.validate_job(job)
        if seen is not None:
            seen.append(dict(job))
        job["pipeline"] = f"worker_pipelines:{pipeline}"
        job["parameters"].update(params)
        jobs.write_job(job, job_path)
        return JobRunner(job_path, env=WORKER_ENV, command=worker_launcher.command(job_path))
    return factory


def test_job_parameters(mod):
    module, _ = mod
    logic = module.MASRefineLogic
    params = logic.jobParameters(preset="fast", prereg="AFFINE", refine=module.Refinement.I, fusion="jlf",
                                 device="cpu", alpha=2, gamma="0.5", iterations=10.0)
    assert params == {"preset": "fast", "prereg": "affine", "refine": "I", "fusion": "jlf", "device": "cpu",
                      "alpha": 2.0, "gamma": 0.5, "iterations": 10}
    assert logic.jobParameters() == {}  # nothing given: the library's defaults and preset decide
    for bad in ({"fusion": "majority"}, {"refine": "IT"}, {"iterations": 0}, {"alpha": -1}):
        with pytest.raises(ValueError):
            logic.jobParameters(**bad)
    # what the module sends is what the worker accepts
    job = jobs.make_job("/t.nii.gz", "/atlases", "/out", **params)
    assert jobs.validate_job(job, check_files=False) == []
    # the panel's parameter node: alpha/gamma/iterations only when overriding the defaults
    p = slicer_stubs.fake_parameter_node(preset=module.Preset.ACCURATE, prereg=module.PreRegistration.DEFORMABLE,
                                         refine=module.Refinement.IS, fusion=module.Fusion.VOTENET,
                                         device=module.Device.AUTO, overrideDefaults=False, alpha=3.0, gamma=0.4,
                                         iterations=40)
    assert set(logic.jobParameters(**logic.parametersFromNode(p))) == {"preset", "prereg", "refine", "fusion", "device"}
    p.overrideDefaults = True
    assert logic.jobParameters(**logic.parametersFromNode(p))["iterations"] == 40


def test_reload_reexecutes_the_package_before_the_module(mod):
    """Slicer's Reload re-executes MASRefine.py only; the widget reloads MASRefineModule's files first."""
    module, slicer = mod
    before = {name: vars(slicer_stubs.submodule(name)).copy() for name in ("Parameters", "Logic", "Test")}
    widget = module.MASRefineWidget()
    module.MASRefineWidget.onReload(widget)
    assert slicer.reloaded == [widget]
    logic = slicer_stubs.submodule("Logic")
    assert logic.MASRefineLogic is not before["Logic"]["MASRefineLogic"]  # re-executed
    # and in dependency order: the reloaded logic uses the reloaded choices
    assert logic.Retention is slicer_stubs.submodule("Parameters").Retention is not before["Parameters"]["Retention"]
    assert slicer_stubs.submodule("Test").MASRefineLogic is logic.MASRefineLogic


def test_reload_keeps_the_jobs_state(mod, target, atlas_dir, tmp_path):
    """Reload re-executes MASRefineModule.Job before the old widget's cleanup() (slicer.util.reloadScriptedModule):
    the running worker is still known (stopped by cleanup, not orphaned), a delete-on-close run folder is still
    removed when the scene closes, and the scene-close guard is not installed twice."""
    module, slicer = mod
    Job = slicer_stubs.submodule("Job")
    done = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=2, sleep=0.01)).start(
        target, atlas_dir, outDir=tmp_path / "runs", retention="delete-on-close")
    done.wait(timeout=60)
    running = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=3, sleep=60)).start(
        target, atlas_dir, outDir=tmp_path / "runs")
    guards = (len(slicer.mrmlScene.observers), len(slicer.app.connections))

    widget = module.MASRefineWidget()
    module.MASRefineWidget.onReload(widget)  # reloads the package, then (as Slicer) the old widget's cleanup()
    assert slicer.reloaded == [widget] and slicer_stubs.submodule("Job") is Job
    with pytest.raises(RuntimeError, match="cancelled"):
        running.wait(timeout=20)  # stopped by cleanup, through the activeJobs kept across the reload
    assert running.runner.returncode is not None and Job.activeJobs == []
    assert Job.runsToRemove == [done.outDir] and Path(done.outDir).is_dir()  # the scene has not closed

    again = sys.modules["MASRefine"].MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=2, sleep=0.01))
    again.start(target, atlas_dir, outDir=tmp_path / "runs").wait(timeout=60)
    assert (len(slicer.mrmlScene.observers), len(slicer.app.connections)) == guards  # installed once
    slicer.mrmlScene.close()
    assert not Path(done.outDir).exists() and Job.runsToRemove == []


def test_input_problems(mod, target, atlas_dir, tmp_path):
    module, _ = mod
    problem = module.MASRefineLogic.inputProblem
    assert problem(None, atlas_dir) and problem(target, Path(".")) and problem(target, tmp_path)
    empty = slicer_stubs.volume_node(None, "empty")
    assert "no image data" in problem(empty, atlas_dir)
    assert problem(target, atlas_dir) is None
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow"))
    with pytest.raises(ValueError, match="atlas.json"):
        logic.start(target, tmp_path)


def test_full_run_exports_runs_and_loads(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    written, events, finished = [], [], []
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", written, steps=6, sleep=0.02))
    job = logic.start(target, atlas_dir, outDir=tmp_path / "runs", refine="I", fusion="pv",
                      onEvent=lambda j, ev: events.append(ev["event"]), onFinished=finished.append)
    # the target was exported in world coordinates, to a file the job names; the job is valid as written
    (export,) = slicer.exported
    assert export["world"] is True and export["node"] is target
    job_json = written[0]
    assert job_json["inputs"]["target"] == str(Path(export["filename"]).resolve())
    assert job_json["inputs"]["atlas_dir"] == str(atlas_dir.resolve())
    assert job_json["parameters"]["refine"] == "I" and job_json["parameters"]["fusion"] == "pv"
    assert Path(job.outDir).parent == tmp_path / "runs" and Path(job.outputDir).parent == Path(job.outDir)
    back = sitk.ReadImage(export["filename"])
    assert back.GetDirection() == pytest.approx(target.image.GetDirection())
    assert back.GetSpacing() == pytest.approx(target.image.GetSpacing())
    # a QTimer pumps the job; the job is registered for stopAllJobs until it ends
    assert job.timer.active and job.timer.interval == logic.POLL_INTERVAL_MS and job in slicer_stubs.submodule("Job").activeJobs

    nodes = job.wait(timeout=60)
    assert job.state == "completed" and finished == [job]
    assert not job.timer.active and job not in slicer_stubs.submodule("Job").activeJobs
    assert events[0] == "started" and "progress" in events and events[-2:] == ["result", "exit"]
    assert job.fraction == 1.0 and job.stage == "write"
    assert job.manifestPath == str(Path(job.outputDir) / "manifest.json")
    # run-level outputs now, in the run's folder; per-atlas outputs only on demand
    assert set(nodes) == {"qa-table"}
    table = nodes["qa-table"]
    assert table.IsA("vtkMRMLTableNode") and table.path.endswith("qa.csv")
    sh = slicer.subjectHierarchy
    assert sh.path(table) == [f"MASRefine {Path(export['filename']).stem}"]
    assert job.qaIdColumn == "id" and [r["id"] for r in job.qaRows] == ["a1"] and "mean" in job.qaHeader
    assert not any(n.attributes.get("MASRefine.atlasId") for n in slicer.loaded)

    atlas = logic.loadAtlas(job, "a1")
    assert set(atlas) == {"atlas-image"}
    image = atlas["atlas-image"]
    assert image.IsA("vtkMRMLScalarVolumeNode") and image.path.endswith("smooth.nii.gz")
    assert image.properties["show"] is False and image.display.colorNodeID == logic.COLORMAPS["Grey"]
    assert sh.path(image) == [f"MASRefine {Path(export['filename']).stem}", "atlases", "a1"]
    assert logic.loadAtlas(job, "a1") is atlas  # loaded once
    logic.showAtlas(job, "a1", opacity=0.3)
    assert slicer.layers[-1]["foreground"] is image and slicer.layers[-1]["background"] is target
    assert slicer.layers[-1]["foregroundOpacity"] == 0.3


def test_cancel_mid_run_stops_promptly_and_loads_nothing(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=400, sleep=0.05))
    job = logic.start(target, atlas_dir, outDir=tmp_path)
    deadline = time.monotonic() + 30
    while job.poll() and job.fraction == 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.running and job.fraction > 0.0
    t0 = time.monotonic()
    job.cancel(grace_s=5.0)
    with pytest.raises(RuntimeError, match="cancelled"):
        job.wait(timeout=30)
    assert job.state == "cancelled" and time.monotonic() - t0 < 5.0
    assert job.runner.returncode == 3 and not job.nodes and slicer.loaded == []
    assert not (Path(job.outputDir) / "manifest.json").exists()


def test_crash_fails_with_the_reason(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    finished = []
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("crash", mode="raise"))
    job = logic.start(target, atlas_dir, outDir=tmp_path, onFinished=finished.append)
    with pytest.raises(RuntimeError, match="simulated failure"):
        job.wait(timeout=60)
    assert job.state == "failed" and "simulated failure" in job.error and finished == [job]
    assert slicer.loaded == []

    job = module.MASRefineLogic(runnerFactory=pipeline_factory("crash")).start(target, atlas_dir, outDir=tmp_path)
    with pytest.raises(RuntimeError, match="without reporting an error"):
        job.wait(timeout=60)
    assert job.state == "failed"


def test_scene_close_and_app_exit_stop_workers(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=3, sleep=60))
    jobs_started = [logic.start(target, atlas_dir, outDir=tmp_path) for _ in range(2)]
    assert ("aboutToQuit()", module.stopAllJobs) in slicer.app.connections
    t0 = time.monotonic()
    slicer.mrmlScene.close()  # StartCloseEvent -> stopAllJobs: killed at once (grace 0)
    for job in jobs_started:
        with pytest.raises(RuntimeError, match="cancelled"):
            job.wait(timeout=20)
        assert job.runner.returncode != 0
    assert time.monotonic() - t0 < 10.0 and slicer_stubs.submodule("Job").activeJobs == []

    job = logic.start(target, atlas_dir, outDir=tmp_path)
    slicer.app.emit("aboutToQuit()")
    with pytest.raises(RuntimeError, match="cancelled"):
        job.wait(timeout=20)
    # the guards are installed once, however many jobs ran
    assert sum(1 for s, _ in slicer.app.connections if s == "aboutToQuit()") == 1


def test_scene_close_leaves_the_installer_and_the_sample_running(mod, target, atlas_dir, tmp_path):
    """Jobs without a run folder (the installer, the sample: ``stopWithScene`` False) are not killed by the
    scene's closing (pip stopped midway could leave Slicer's Python half-installed) nor by the widget's
    cleanup (Reload); Slicer's exit stops them."""
    module, slicer = mod
    Job = slicer_stubs.submodule("Job")
    from MASRefineLib.runner import JobRunner

    run = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=3, sleep=60)).start(
        target, atlas_dir, outDir=tmp_path / "runs")
    installer = Job.launch(Job.MASRefineJob(JobRunner(command=[sys.executable, "-c", "import time; time.sleep(60)"]),
                                            str(tmp_path), str(tmp_path), stopWithScene=False))
    slicer.mrmlScene.close()
    with pytest.raises(RuntimeError, match="cancelled"):
        run.wait(timeout=20)
    module.MASRefineWidget().cleanup()
    time.sleep(0.5)
    assert installer.poll() and installer.runner.returncode is None and Job.activeJobs == [installer]
    slicer.app.emit("aboutToQuit()")
    with pytest.raises(RuntimeError):
        installer.wait(timeout=20)
    assert installer.runner.returncode is not None and Job.activeJobs == []


def test_scene_close_discards_a_result_not_yet_loaded(mod, target, atlas_dir, tmp_path):
    """A run that finished just before the scene closed must not load its nodes into the new scene."""
    module, slicer = mod
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=2, sleep=0.01))
    job = logic.start(target, atlas_dir, outDir=tmp_path)
    assert job.runner.wait(60) == 0  # the result is queued, not yet polled
    slicer.mrmlScene.close()
    with pytest.raises(RuntimeError, match="cancelled"):
        job.wait(timeout=10)
    assert job.state == "cancelled" and slicer.loaded == [] and job.nodes == {}


def test_wait_timeout_stops_the_worker(mod, target, atlas_dir, tmp_path):
    module, _ = mod
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=3, sleep=60))
    job = logic.start(target, atlas_dir, outDir=tmp_path)
    with pytest.raises(TimeoutError):
        job.wait(timeout=1.0)
    assert not job.running and job.runner.returncode is not None


def test_dependency_helpers(mod):
    _ = mod
    module = slicer_stubs.submodule("Environment")
    reqs = module.readRequirements()
    assert "monai>=1.3" in reqs and not any(r.lower().startswith(("numpy", "simpleitk", "torch")) for r in reqs)
    from MASRefineLib import install  # the one reading of requirements (Environment's copy is gone)

    assert not hasattr(module, "requirementSatisfied")
    assert install.satisfied("pytest>=1")
    assert not install.satisfied("numpy<0.1")
    assert not install.satisfied("masrefine-no-such-package")
    assert install.requirement_name("dask[distributed]>=2024.1") == "dask"
    # from the source tree the library is the repository's
    assert Path(module.libraryParentDir()) == ROOT


@pytest.mark.skipif(not (ROOT / "MASRefineLib" / "pipeline.py").exists(), reason="the segmentation pipeline is not in this checkout")
def test_real_segmentation_run_on_the_phantom(mod, tmp_path):
    """The module's whole flow with the real worker pipeline on the built-in phantom (fastest settings)."""
    from MASRefineLib import sampledata

    module, slicer = mod
    sample = sampledata.make_sample(ROOT / ".cache" / "slicer-glue" / "sample")  # deterministic, reused
    target = slicer_stubs.volume_node(sitk.ReadImage(sample["target"]), "phantom target")

    def factory(job_path):  # the real job, on one thread (a shared 2-core machine)
        job = json.loads(Path(job_path).read_text())
        job["parameters"]["threads"] = 1
        jobs.write_job(job, job_path)
        return JobRunner(job_path, python=sys.executable)

    logic = module.MASRefineLogic(runnerFactory=factory)
    job = logic.start(target, sample["atlas_dir"], outDir=tmp_path, preset="fast", prereg="affine", refine="none",
                      fusion="pv", device="cpu")
    nodes = job.wait(timeout=300)
    assert job.state == "completed" and job.fraction == 1.0

    # the fused segmentation: a .seg.nrrd (names and colours inside), shown, reference geometry = target
    fused = nodes["fused-labels"]
    assert fused.IsA("vtkMRMLSegmentationNode") and fused.path.endswith(".seg.nrrd")
    assert fused.referenceGeometryFrom == target.GetID() and fused.display.GetVisibility()
    # loaded as a .seg.nrrd (not a label map), so Slicer gets each segment's standard terminology with it
    # (issue #23 item 8: the phantom's knee codes, the segments' TerminologyEntry tags)
    import slicerio

    from MASRefineLib.terminology import KNEE, from_slicerio
    segments = slicerio.read_segmentation(fused.path, skip_voxels=True)["segments"]
    assert {s["name"]: from_slicerio(s["terminology"]) for s in segments} == {
        n: KNEE[n] for n in ("femur", "femoral cartilage", "tibia", "tibial cartilage")}
    # on the exported target's grid (export -> worker -> outputs keep the geometry)
    out = sitk.ReadImage(str(Path(job.outputDir) / "fused_labels.nii.gz"))
    assert out.GetSize() == target.image.GetSize()
    assert out.GetOrigin() == pytest.approx(target.image.GetOrigin(), abs=1e-4)
    assert out.GetDirection() == pytest.approx(target.image.GetDirection(), abs=1e-6)
    # QA: one row per atlas of the atlas set, with the pipeline's QA numbers
    atlas_set = json.loads((Path(sample["atlas_dir"]) / "atlas.json").read_text())
    assert [r["id"] for r in job.qaRows] == [a["id"] for a in atlas_set["atlases"]]
    assert {"similarity", "agreement", "folding_fraction"} <= set(job.qaHeader)
    assert nodes["qa-table"].IsA("vtkMRMLTableNode")

    # one atlas on demand: image, labels, field as a transform moving the original atlas, Jacobian
    first = atlas_set["atlases"][0]["id"]
    atlas = logic.loadAtlas(job, first)
    assert {"atlas-image", "atlas-labels", "atlas-field", "atlas-jacobian", "atlas-original"} <= set(atlas)
    field, original = atlas["atlas-field"], atlas["atlas-original"]
    assert field.IsA("vtkMRMLTransformNode") and field.path.endswith("_field.nrrd")
    assert field.GetNodeReferenceID("fixedVolume") == target.GetID()
    assert field.GetNodeReferenceID("movingVolume") == original.GetID() and original.transformNodeID == field.GetID()
    assert Path(original.path) == Path(sample["atlas_dir"]) / atlas_set["atlases"][0]["image"]
    assert atlas["atlas-jacobian"].display.colorNodeID == logic.COLORMAPS["ColdToHotRainbow"]
    assert atlas["atlas-labels"].referenceGeometryFrom == target.GetID()
    folders = {tuple(slicer.subjectHierarchy.path(n)) for n in atlas.values()}
    assert folders == {("MASRefine phantom_target", "atlases", first)}  # the run's folder: the target's name
    logic.showAtlas(job, first, opacity=0.5)
    assert atlas["atlas-labels"].display.GetVisibility() and not fused.display.GetVisibility()
    assert slicer.layers[-1]["foreground"] is atlas["atlas-image"]
