"""Run-folder retention in the Slicer module (issue #23 item 2) against the stubs of Testing/slicer_stubs.py,
with real worker processes: keep every run, delete when the scene closes (or Slicer quits), keep the last N;
the panel shows the run folders' count and size. The library's side is Testing/test_runs.py."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

import slicer_stubs
from MASRefineLib import runs
from test_slicer_glue import atlas_dir, mod, pipeline_factory, target  # noqa: F401 (fixtures)


def _logic(module, sleep=0.01):
    return module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=2, sleep=sleep))


def test_keep_last_removes_the_oldest_runs_but_not_running_ones_or_the_users(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    base = tmp_path / "runs"
    base.mkdir()
    (base / "my-notes").mkdir()  # the user's own folder beside the runs
    running = _logic(module, sleep=60).start(target, atlas_dir, outDir=base, retention="keep-last", keepLast=1)
    finished = []
    for _ in range(3):
        job = _logic(module).start(target, atlas_dir, outDir=base, retention="keep-last", keepLast=2)
        job.wait(timeout=60)
        finished.append(job)
    # the newest two finished runs are kept, the running one too (older, but its worker still writes there)
    assert runs.list_runs(base) == [_path(running), _path(finished[1]), _path(finished[2])]
    assert (base / "my-notes").is_dir()
    running.cancel(grace_s=0)
    with pytest.raises(RuntimeError, match="cancelled"):
        running.wait(timeout=20)


def _path(job):
    return Path(job.outDir)


def test_delete_on_close_removes_the_runs_folders_at_scene_close(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    base = tmp_path / "runs"
    kept = _logic(module).start(target, atlas_dir, outDir=base, retention="keep")
    done = _logic(module).start(target, atlas_dir, outDir=base, retention="delete-on-close")
    for job in (kept, done):
        job.wait(timeout=60)
    running = _logic(module, sleep=60).start(target, atlas_dir, outDir=base, retention="delete-on-close")
    assert _path(done).is_dir() and _path(running).is_dir()

    slicer.mrmlScene.close()  # StartCloseEvent: the worker is ended first, then its folder removed
    assert not _path(done).exists() and not _path(running).exists()
    assert running.runner.returncode is not None and running.runner.returncode != 0
    assert _path(kept).is_dir() and (_path(kept) / "output" / "manifest.json").is_file()
    assert slicer_stubs.submodule("Job").runsToRemove == []


def test_delete_on_close_also_when_slicer_quits(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    job = _logic(module).start(target, atlas_dir, outDir=tmp_path / "runs", retention="delete-on-close")
    job.wait(timeout=60)
    slicer.app.emit("aboutToQuit()")
    assert not _path(job).exists()


def test_default_folder_and_unknown_retention(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    job = _logic(module).start(target, atlas_dir)  # console default: keep, in Slicer's temporary folder
    job.wait(timeout=60)
    assert _path(job).parent == tmp_path / "slicer-temp" / "MASRefine" and runs.is_run_folder(job.outDir)
    with pytest.raises(ValueError, match="forever"):
        _logic(module).start(target, atlas_dir, retention="forever")


def test_panel_shows_the_run_folders_and_their_size(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    Retention = slicer_stubs.submodule("Parameters").Retention
    W = slicer_stubs.FakeWidget
    panel = module.MASRefineWidget()
    panel.logic = _logic(module)
    panel.ui = types.SimpleNamespace(
        runFoldersLabel=W(text=""), keepLastSpinBox=W(enabled=True), alphaSpinBox=W(), gammaSpinBox=W(),
        iterationsSpinBox=W(), applyButton=W(enabled=False, toolTip=""))
    base = tmp_path / "runs"
    panel._parameterNode = slicer_stubs.fake_parameter_node(
        outputDir=base, retention=Retention.KEEP, keepLast=5, overrideDefaults=False, targetVolume=target,
        atlasDir=atlas_dir)
    panel._updateRunFolders()
    assert panel.ui.runFoldersLabel.text == f"0 runs, 0 B in {base}"
    job = panel.logic.start(target, atlas_dir, outDir=base, **panel.logic.retentionFromNode(panel._parameterNode))
    job.wait(timeout=60)
    panel._updateRunFolders()
    size = runs.format_size(runs.folder_size(job.outDir))
    assert panel.ui.runFoldersLabel.text == f"1 run, {size} in {base}" and size != "0 B"

    panel._checkCanApply()  # "Runs to keep" only matters for "keep the last N"
    assert not panel.ui.keepLastSpinBox.enabled
    panel._parameterNode.retention = Retention.KEEP_LAST
    panel._checkCanApply()
    assert panel.ui.keepLastSpinBox.enabled

    panel._parameterNode.outputDir = Path(".")  # unset: Slicer's temporary folder
    panel._updateRunFolders()
    assert panel.ui.runFoldersLabel.text == f"0 runs, 0 B in {tmp_path / 'slicer-temp' / 'MASRefine'}"
