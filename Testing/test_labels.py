"""Label outputs: a label map written as .nii.gz and Slicer .seg.nrrd reads back (with our reader and with
slicerio directly) with the same values, names, colours and geometry; label tables from files."""
from __future__ import annotations

import csv
import os

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from MASRefineLib.errors import MASRefineError
from MASRefineLib.geometry import Grid
from MASRefineLib.labels import Label, LabelTable, default_color, read_seg_nrrd, write_label_outputs

from conftest import make_oblique


def _muse_rows(ixi_dir) -> dict[int, str]:
    with open(ixi_dir / "MUSE_listROIs.csv", newline="") as f:
        return {int(r["Index"]): r["Name"] for r in csv.DictReader(f)}


def _table_for(label: sitk.Image, ixi_dir) -> LabelTable:
    """MUSE names for the values present; present values the CSV lacks get generated entries."""
    present = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) - {0}
    table = LabelTable.load(ixi_dir / "MUSE_listROIs.csv").subset(present)
    for v in present - set(table):
        table[v] = Label(f"label {v}", default_color(v))
    return LabelTable(sorted(table.items()))


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_muse_csv_label_table(ixi_dir):
    rows = _muse_rows(ixi_dir)
    table = LabelTable.load(ixi_dir / "MUSE_listROIs.csv")
    assert set(table) == {v for v in rows if v > 0}
    for v, name in rows.items():
        assert table[v].name == name.strip()
        assert all(0 <= c <= 255 for c in table[v].color)
    assert list(table) == sorted(table)
    # colours are distinct enough to tell neighbouring labels apart
    assert len({table[v].color for v in table}) > 0.9 * len(table)


@pytest.mark.parametrize("oblique", [False, True])
def test_label_outputs_round_trip(ixi_crop, ixi_dir, tmp_path, oblique):
    _, label = ixi_crop
    label = make_oblique(label) if oblique else sitk.Image(label)
    grid = Grid.from_image(label)
    arr = sitk.GetArrayFromImage(label).astype(np.uint16)
    table = _table_for(label, ixi_dir)
    assert len(table) > 20

    paths = write_label_outputs(label, table, tmp_path / "out" / "case1")
    assert paths["nifti"].name == "case1.nii.gz" and paths["seg_nrrd"].name == "case1.seg.nrrd"
    for p in paths.values():
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["case1.nii.gz", "case1.seg.nrrd"]  # no temp files

    # NIfTI: same voxels and geometry
    nii = sitk.ReadImage(str(paths["nifti"]))
    assert nii.GetPixelID() == sitk.sitkUInt16
    assert Grid.from_image(nii).isclose(grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nii), arr)

    # our reader: values, names, colours, geometry
    back, back_table = read_seg_nrrd(paths["seg_nrrd"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    assert Grid.from_image(back).isclose(grid, atol_mm=1e-6)
    assert back_table == table

    # slicerio directly (what Slicer's reader sees): LPS space, one segment per label
    header = nrrd.read_header(str(paths["seg_nrrd"]))
    assert header["space"] == "left-posterior-superior"
    seg = slicerio.read_segmentation(str(paths["seg_nrrd"]))
    np.testing.assert_allclose(seg["ijkToLPS"], grid.index_to_physical(), atol=1e-6)
    assert seg["voxels"].shape == tuple(grid.size)  # (i, j, k)
    assert {s["labelValue"] for s in seg["segments"]} == set(table)
    arr_ijk = arr.transpose(2, 1, 0)
    for s in seg["segments"]:
        v = s["labelValue"]
        assert s["name"] == table[v].name
        assert tuple(int(round(c * 255)) for c in s["color"]) == table[v].color
        np.testing.assert_array_equal(slicerio.segment_mask(seg, s["id"]), arr_ijk == v)
    # the physical position of one voxel of a small structure agrees with ITK's
    v = min(table, key=lambda k: (arr == k).sum())
    k, j, i = np.argwhere(arr == v)[0]
    lps = seg["ijkToLPS"] @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(lps[:3], label.TransformIndexToPhysicalPoint((int(i), int(j), int(k))), atol=1e-6)


def test_large_values_and_array_input(ixi_crop, tmp_path):
    """Values above 255 survive (16-bit segmentation); an array plus a Grid is accepted."""
    _, label = ixi_crop
    grid = Grid.from_image(make_oblique(label))
    arr = sitk.GetArrayFromImage(label).astype(np.int64)
    arr = np.where(arr > 0, arr + 1000, 0).astype(np.uint16)
    table = LabelTable.from_values(np.unique(arr))
    paths = write_label_outputs(arr, table, tmp_path / "big.seg.nrrd", grid=grid)
    assert paths["seg_nrrd"] == tmp_path / "big.seg.nrrd" and paths["nifti"] == tmp_path / "big.nii.gz"
    back, back_table = read_seg_nrrd(paths["seg_nrrd"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    assert back_table == table and min(table) > 1000
    assert Grid.from_image(back).isclose(grid, atol_mm=1e-6)


def test_missing_value_is_an_error_and_writes_nothing(ixi_crop, ixi_dir, tmp_path):
    _, label = ixi_crop
    table = _table_for(label, ixi_dir)
    dropped = sorted(table)[len(table) // 2]
    del table[dropped]
    with pytest.raises(MASRefineError) as e:
        write_label_outputs(label, table, tmp_path / "case")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "case") in msg and str(dropped) in msg
    assert list(tmp_path.iterdir()) == []


def test_label_table_formats(tmp_path):
    # JSON: 0..255 ints, 0..1 floats (Slicer style), a bare name, background skipped, atlas.json form
    d = {"0": {"name": "bg"}, "1": {"name": "femur", "color": [241, 214, 145]},
         "2": {"name": "cart\nilage", "color": [0, 0.5, 1.0]}, "7": "lesion"}
    (tmp_path / "t.json").write_text(__import__("json").dumps({"schema_version": 1, "labels": d}))
    t = LabelTable.load(tmp_path / "t.json")
    assert list(t) == [1, 2, 7]
    assert t[1] == Label("femur", (241, 214, 145))
    assert t[2] == Label("cart ilage", (0, 128, 255))
    assert t[7].name == "lesion" and t[7].color == default_color(7)
    assert LabelTable.from_json_dict(t.to_json_dict()) == t
    # Slicer colour table
    (tmp_path / "c.ctbl").write_text("# Color table\n0 Background 0 0 0 0\n3 tibia 216 101 79 255\n")
    assert LabelTable.load(tmp_path / "c.ctbl") == {3: Label("tibia", (216, 101, 79))}
    # errors are one line naming the file
    for name, text in [("bad.json", '{"1": {"color": [300, 0, 0]}}'), ("neg.json", '{"-2": "x"}'),
                       ("list.json", "[1, 2]"), ("bad.csv", "Value,Label\n1,a\n"), ("bad.txt", "1 femur 1 2\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(MASRefineError, match=str(tmp_path / name)):
            LabelTable.load(tmp_path / name)


def test_label_values_equals_unique(ixi_crop):
    import torch
    from MASRefineLib.labels import label_values

    lab = sitk.GetArrayFromImage(ixi_crop[1])
    expected = np.unique(lab).tolist()
    assert len(expected) > 10
    assert label_values(lab) == expected
    assert label_values(torch.from_numpy(lab.astype(np.int64))) == expected
    # outside the histogram's range (negative, >= 2^16) the sort is used, with the same answer
    odd = np.array([[70000, -3], [5, 5]], dtype=np.int64)
    assert label_values(odd) == [-3, 5, 70000] == label_values(torch.from_numpy(odd))
    assert label_values(np.zeros((0, 3), np.uint16)) == []
    assert label_values(np.array([3, 1, 3], np.uint64)) == [1, 3]  # SimpleITK's UInt64 label maps
    with pytest.raises(ValueError, match="integer"):
        label_values(np.ones(3, np.float32))
    # the structures (foreground_values, what atlas.py and registration check against the label table): the same
    # values without 0, from an image as from its array, as the non-zero bins of a histogram
    from MASRefineLib.labels import foreground_values
    structures = np.flatnonzero(np.bincount(lab.ravel()))
    assert foreground_values(ixi_crop[1]) == foreground_values(lab) == [int(v) for v in structures if v > 0]
    assert foreground_values(np.zeros((2, 2), np.uint16)) == []
