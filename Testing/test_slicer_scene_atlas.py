"""Atlas sets from the scene (issue #23 item 11, the module's side) against the stubs of Testing/slicer_stubs.py, with
real worker processes running the ``atlas`` job (MASRefineLib/atlasbuild.py; its library tests are
Testing/test_atlasbuild.py): segmentation nodes with their source volumes become an atlas set; a finished run's
result, corrected, is added to the atlas set it used."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer_stubs
from MASRefineLib import terminology
from MASRefineLib.protocol import jobs
from MASRefineLib.atlas import AtlasSet
from MASRefineLib.labels import Label, LabelTable, read_seg_nrrd
from MASRefineLib.runner import JobRunner
from test_slicer_glue import ROOT, mod  # noqa: F401 (fixture)

FEMUR, TIBIA = Label("femur", (241, 214, 145)), Label("tibia", (216, 101, 79))


def real_worker(job_path):
    job = json.loads(Path(job_path).read_text())
    job.setdefault("parameters", {})
    if job.get("pipeline", "segment") == "segment":
        job["parameters"]["threads"] = 1  # a shared 2-core machine
    jobs.write_job(job, job_path)
    return JobRunner(job_path, python=sys.executable)


def _volume(name, seed):
    img = sitk.GetImageFromArray(np.random.default_rng(seed).random((12, 14, 16)).astype(np.float32))
    img.SetSpacing((0.8, 0.8, 1.0))
    return slicer_stubs.volume_node(img, name)


def _segmentation(volume, segments: dict[int, Label], name="Segmentation"):
    """A segmentation node as Segment Editor leaves it: segments on the volume's grid, the volume as its source."""
    arr = np.zeros((12, 14, 16), np.uint16)
    for i, value in enumerate(segments):
        arr[2 + 3 * i: 4 + 3 * i, 3:8, 3:8] = value
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(volume.image)
    node = slicer_stubs.FakeNode("vtkMRMLSegmentationNode", name, image=lab)
    node.segments = LabelTable(segments)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def test_segmentations_in_the_scene_become_an_atlas_set(mod, tmp_path):
    module, slicer = mod
    logic = module.MASRefineLogic(runnerFactory=real_worker)
    a, b = _volume("knee A", 1), _volume("knee/B", 2)
    segs = [_segmentation(a, {1: FEMUR, 2: TIBIA}), _segmentation(b, {7: TIBIA, 3: FEMUR})]
    job = logic.startAtlasBuild(segs, tmp_path / "set")
    job.wait(timeout=120)
    assert job.state == "completed" and job.result["added"] == ["knee_A", "knee_B"]
    aset = AtlasSet.load(tmp_path / "set")
    assert [(k, v.name, v.terminology) for k, v in aset.label_table.items()] == [
        (1, "femur", terminology.KNEE["femur"]), (2, "tibia", terminology.KNEE["tibia"])]
    _, labels_b = aset.read("knee_B")  # B's tibia (7) and femur (3) became the set's 2 and 1
    assert set(np.unique(sitk.GetArrayFromImage(labels_b)[2:4])) == {0, 2}
    exports = slicer.exported
    assert {e["node"].GetName() for e in exports} == {"knee A", "knee/B", "Segmentation"}
    assert all(e["world"] and e["properties"] is not slicer_stubs.EXPORT_DEFAULT_PROPERTIES for e in exports)
    # the exported copies go with the scene; the atlas set stays
    exportDir = Path(job.outDir)
    slicer.mrmlScene.close()
    assert not exportDir.exists() and (tmp_path / "set" / "atlas.json").is_file()


def test_problems_are_one_line_before_or_from_the_worker(mod, tmp_path):
    module, slicer = mod
    logic = module.MASRefineLogic(runnerFactory=real_worker)
    a = _volume("a", 1)
    orphan = slicer_stubs.FakeNode("vtkMRMLSegmentationNode", "drawn on nothing")
    with pytest.raises(ValueError, match="Segmentation drawn on nothing has no source volume"):
        logic.startAtlasBuild([orphan], tmp_path / "set")
    with pytest.raises(ValueError, match="Select a folder for the new atlas set"):
        logic.startAtlasBuild([_segmentation(a, {1: FEMUR})], Path("."))
    with pytest.raises(ValueError, match="Select at least one segmentation"):
        logic.startAtlasBuild([], tmp_path / "set")
    assert slicer.exported == []
    b = _volume("b", 2)
    job = logic.startAtlasBuild([_segmentation(a, {1: FEMUR, 2: TIBIA}), _segmentation(b, {1: FEMUR})], tmp_path / "set")
    with pytest.raises(RuntimeError, match=r"case002\.seg\.nrrd: its segments differ from .*case001\.seg\.nrrd's "
                                           r"\(missing 'tibia'\)"):
        job.wait(timeout=120)
    assert not (tmp_path / "set" / "atlas.json").exists()


def test_a_corrected_result_is_added_to_the_atlas_set_it_came_from(mod, tmp_path):
    from MASRefineLib import sampledata

    module, slicer = mod
    sample = sampledata.make_sample(ROOT / ".cache" / "slicer-glue" / "sample")
    atlasDir = tmp_path / "atlases"
    shutil.copytree(sample["atlas_dir"], atlasDir)  # the cached sample stays as it is
    target = slicer_stubs.volume_node(sitk.ReadImage(sample["target"]), "phantom target")
    logic = module.MASRefineLogic(runnerFactory=real_worker)
    run = logic.start(target, atlasDir, outDir=tmp_path / "runs", preset="fast", prereg="affine", refine="none",
                      fusion="pv", device="cpu")
    run.wait(timeout=300)

    # the user corrects the fused result in Segment Editor: the node now holds other voxels
    fused, table = read_seg_nrrd(run.nodes["fused-labels"].path)
    arr = sitk.GetArrayFromImage(fused)
    arr[:4] = 0
    corrected = sitk.GetImageFromArray(arr)
    corrected.CopyInformation(fused)
    run.nodes["fused-labels"].image, run.nodes["fused-labels"].segments = corrected, table

    before = len(AtlasSet.load(atlasDir))
    job = logic.startAddCase(run)
    job.wait(timeout=120)
    assert job.state == "completed" and job.result["added"] == ["phantom_target"]
    aset = AtlasSet.load(atlasDir)
    assert len(aset) == before + 1 and aset.ids[-1] == "phantom_target"
    image, labels = aset.read("phantom_target")
    assert np.array_equal(sitk.GetArrayFromImage(labels), arr)  # what the user left, not what was fused
    assert image.GetSize() == target.image.GetSize()

    slicer.mrmlScene.RemoveNode(run.targetNode)  # gone from the scene: one line, nothing started
    with pytest.raises(ValueError, match="The run's target volume is no longer in the scene"):
        logic.startAddCase(run)


def test_panel_section(mod, tmp_path):
    module, slicer = mod
    SceneAtlasSection = slicer_stubs.submodule("SceneAtlas").SceneAtlasSection
    W = slicer_stubs.FakeWidget
    seg = _segmentation(_volume("a", 1), {1: FEMUR, 2: TIBIA})
    widget = types.SimpleNamespace(
        logic=module.MASRefineLogic(runnerFactory=real_worker), _job=None, log=[],
        _parameterNode=slicer_stubs.fake_parameter_node(newAtlasDir=tmp_path / "set", atlasDir=Path(".")),
        ui=types.SimpleNamespace(buildAtlasSetButton=W(enabled=True), addCaseButton=W(enabled=False),
                                 atlasStatusLabel=W(text=""), sceneSegmentationsSelector=W(checkedNodes=lambda: [seg])))
    widget._appendLog = widget.log.append
    section = SceneAtlasSection(widget)
    section.update()
    assert not widget.ui.addCaseButton.enabled  # no finished run to add
    section.onBuild()
    assert not widget.ui.buildAtlasSetButton.enabled and widget.ui.atlasStatusLabel.text == "Building the atlas set..."
    section.job.wait(timeout=120)
    assert widget.ui.atlasStatusLabel.text == f"{tmp_path / 'set'}: 1 atlases (added a)"
    assert widget._parameterNode.atlasDir == tmp_path / "set"  # the new set is the one to segment with
    assert widget.ui.buildAtlasSetButton.enabled and slicer.errors == []

    widget._job = types.SimpleNamespace(state="completed", nodes={"fused-labels": seg})
    section.update()
    assert widget.ui.addCaseButton.enabled
    widget.ui.sceneSegmentationsSelector.checkedNodes = lambda: []
    section.onBuild()  # nothing selected: the reason in a dialog, nothing started
    assert slicer.errors == ["Failed to build the atlas set. Select at least one segmentation"]
