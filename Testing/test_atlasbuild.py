"""Atlas sets from segmented cases (issue #23 item 11, library side): MASRefineLib/atlasbuild.py and the worker's
``atlas`` job. Cases are (image, .seg.nrrd) pairs as the Slicer module exports them; segment names are the labels'
identity across cases."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MASRefineLib import atlasbuild, terminology
from MASRefineLib.protocol import jobs
from MASRefineLib.atlas import AtlasSet, inspect_atlas_set
from MASRefineLib.errors import MASRefineError
from MASRefineLib.labels import Label, LabelTable, write_seg_nrrd
from MASRefineLib.runner import JobRunner

FEMUR, TIBIA = Label("femur", (241, 214, 145)), Label("tibia", (216, 101, 79), "custom~SCT^1^a~SCT^2^b~^^~~^^~^^")


def _image(shape=(12, 14, 16), spacing=(0.8, 0.8, 1.0), origin=(0.0, 0.0, 0.0)):
    rng = np.random.default_rng(len(shape))
    img = sitk.GetImageFromArray(rng.random(shape).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _case(tmp_path, name, segments: dict[int, Label], image=None, seg_grid=None, blocks=None):
    """An image file and a .seg.nrrd of ``segments`` (value -> Label); ``blocks`` value -> z slice range."""
    image = image or _image()
    img_path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(image, str(img_path))
    grid_img = seg_grid or image
    arr = np.zeros(sitk.GetArrayFromImage(grid_img).shape, np.uint16)
    for i, value in enumerate(segments):
        z0, z1 = (blocks or {}).get(value, (2 + 3 * i, 4 + 3 * i))
        arr[z0:z1, 3:8, 3:8] = value
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(grid_img)
    seg_path = tmp_path / f"{name}.seg.nrrd"
    write_seg_nrrd(lab, LabelTable(segments), seg_path)
    return {"id": name, "image": str(img_path), "segmentation": str(seg_path)}


def test_build_takes_names_colours_and_terminology_from_the_segments(tmp_path):
    a = _case(tmp_path, "case A", {1: FEMUR, 2: TIBIA})
    b = _case(tmp_path, "caseB", {5: TIBIA, 9: FEMUR})  # other values and order: matched by name
    aset = atlasbuild.build(tmp_path / "set", [a, b])
    t = aset.label_table
    assert [(k, v.name) for k, v in t.items()] == [(1, "femur"), (2, "tibia")]
    assert t[1].color == FEMUR.color and t[2].terminology == TIBIA.terminology
    assert t[1].terminology == terminology.KNEE["femur"]  # no code of its own: the built-in one of its name
    assert aset.ids == ["case_A", "caseB"] and inspect_atlas_set(tmp_path / "set").ok
    _, lab_b = aset.read("caseB")
    arr = sitk.GetArrayFromImage(lab_b)
    assert set(np.unique(arr[2:4])) == {0, 2} and set(np.unique(arr[5:7])) == {0, 1}  # tibia -> 2, femur -> 1
    assert (tmp_path / "set" / "images" / "caseB.nii.gz").is_file()  # copied: exported files are temporary


def test_mismatched_segments_and_grids_are_one_line_and_write_nothing(tmp_path):
    a = _case(tmp_path, "a", {1: FEMUR, 2: TIBIA})
    b = _case(tmp_path, "b", {1: FEMUR, 2: Label("patella", (1, 2, 3))})
    with pytest.raises(MASRefineError, match=r"b\.seg\.nrrd: its segments differ from .*a\.seg\.nrrd's "
                                             r"\(missing 'tibia'; extra 'patella'\)"):
        atlasbuild.build(tmp_path / "set", [a, b])
    assert not (tmp_path / "set").exists()
    other = _image(spacing=(1.0, 1.0, 1.0))
    c = _case(tmp_path, "c", {1: FEMUR, 2: TIBIA}, seg_grid=other)
    with pytest.raises(MASRefineError, match=r"c\.seg\.nrrd: the segmentation is not on the voxel grid of .*c\.nrrd "
                                             r"\(segmentation vs volume: spacing 1x1x1 vs 0\.8x0\.8x1 mm"):
        atlasbuild.build(tmp_path / "set", [a, c])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with pytest.raises(MASRefineError, match="full: a new atlas set needs a new or empty folder"):
        atlasbuild.build(tmp_path / "full", [a])


def test_a_larger_box_of_the_same_grid_is_cut_back_unless_labels_fall_outside(tmp_path):
    """Slicer writes the union of the reference geometry and the segments' extent."""
    image = _image()
    bigger = _image(shape=(16, 18, 20), origin=(-1.6, -1.6, -2.0))  # 2 voxels more on each side
    inside = _case(tmp_path, "inside", {1: FEMUR, 2: TIBIA}, image=image, seg_grid=bigger, blocks={1: (4, 6), 2: (7, 9)})
    aset = atlasbuild.build(tmp_path / "set", [inside])
    _, lab = aset.read("inside")
    assert lab.GetSize() == image.GetSize() and (sitk.GetArrayFromImage(lab)[2:4, 1:6, 1:6] == 1).all()
    outside = _case(tmp_path, "outside", {1: FEMUR, 2: TIBIA}, image=image, seg_grid=bigger, blocks={1: (0, 2), 2: (7, 9)})
    with pytest.raises(MASRefineError, match=r"outside\.seg\.nrrd: 50 labelled voxels lie outside .*outside\.nrrd"):
        atlasbuild.build(tmp_path / "set2", [outside])


def test_add_grows_the_set_with_unique_ids_and_keeps_every_file(tmp_path):
    first = _case(tmp_path, "knee", {1: FEMUR, 2: TIBIA})
    atlasbuild.build(tmp_path / "set", [first])
    before = (tmp_path / "set" / "labels" / "knee.nii.gz").read_bytes()
    (tmp_path / "set" / "models").mkdir()
    (tmp_path / "set" / "models" / "segmenter.json").write_text("{}")
    corrected = _case(tmp_path, "knee", {3: TIBIA, 4: FEMUR})  # the same case, corrected: a new id
    aset = atlasbuild.add(tmp_path / "set", [corrected])
    assert aset.ids == ["knee", "knee-2"] and (tmp_path / "set" / "labels" / "knee.nii.gz").read_bytes() == before
    assert any("retrain" in n for n in aset.notes)
    wrong = _case(tmp_path, "wrong", {1: FEMUR})
    json_before = (tmp_path / "set" / "atlas.json").read_text()
    with pytest.raises(MASRefineError, match=r"its segments differ from .*atlas\.json's \(missing 'tibia'\)"):
        atlasbuild.add(tmp_path / "set", [wrong])
    assert (tmp_path / "set" / "atlas.json").read_text() == json_before


def test_the_worker_runs_an_atlas_job(tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"cases": [_case(tmp_path, "a", {1: FEMUR, 2: TIBIA})]}))
    job = jobs.make_atlas_job(cases, tmp_path / "set", tmp_path / "run", mode="new")
    assert jobs.validate_job(job) == []
    assert "parameter 'mode' must be one of new, add, got 'replace'" in \
        jobs.validate_job({**job, "parameters": {"mode": "replace"}})
    assert any("not an atlas set" in p for p in jobs.validate_job({**job, "parameters": {"mode": "add"}}))
    path = tmp_path / "job.json"
    jobs.write_job(job, path)
    runner = JobRunner(path, python=sys.executable)
    runner.start()
    assert runner.wait(120) == 0
    result = next(e for e in runner.poll() if e["event"] == "result")
    assert result["added"] == ["a"] and result["atlases"] == 1 and result["labels"] == 2
    assert AtlasSet.load(tmp_path / "set").ids == ["a"]
