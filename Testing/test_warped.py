"""The stage hand-off folder round-trips exactly (geometry, label values, fields)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from MASRefineLib.errors import MASRefineError
from MASRefineLib.geometry import Grid
from MASRefineLib.imageio import normalize_intensity
from MASRefineLib.labels import LabelTable
from MASRefineLib.warped import WarpedAtlas, WarpedSet

from conftest import make_oblique


def test_warped_set_round_trip(ixi_crop, tmp_path):
    img, lab = ixi_crop
    img, lab = make_oblique(img), make_oblique(lab)
    grid = Grid.from_image(img)
    arr = normalize_intensity(sitk.GetArrayFromImage(img))
    labels = sitk.GetArrayFromImage(lab).astype(np.uint16)
    table = LabelTable.from_values(np.unique(labels))
    rng = np.random.default_rng(0)
    atlases = [WarpedAtlas(f"a{i}", arr, labels, rng.normal(size=(3, *grid.shape)).astype(np.float32),
                           info={"seconds": 1.5, "folding_fraction": 0.0}) for i in range(2)]
    atlases[0].source_image, atlases[0].source_label = "atlases/a0.nii.gz", "atlases/a0_label.nii.gz"
    ws = WarpedSet(grid, table, atlases, "affine", target_path="t.nii.gz")
    ws.save(tmp_path)
    back = WarpedSet.load(tmp_path)
    assert back.ids == ["a0", "a1"] and back.stage == "affine"
    # paths given relative to the working directory are stored absolute, so another folder can read them
    assert back.target_path == os.path.abspath("t.nii.gz")
    assert back.atlases[0].source_image == os.path.abspath("atlases/a0.nii.gz") and back.atlases[1].source_image is None
    assert back.target_grid.isclose(grid)
    np.testing.assert_array_equal(back.atlases[0].label, labels)
    np.testing.assert_allclose(back.atlases[1].field, atlases[1].field, atol=1e-6)
    np.testing.assert_allclose(back.atlases[0].image, arr, atol=1e-6)
    assert back.label_table == table
    assert back.atlases[0].info["seconds"] == 1.5
    assert back.labels().shape == (2, 1, *grid.shape)
    (tmp_path / "a1_field.nrrd").unlink()
    with pytest.raises(MASRefineError, match="a1_field.nrrd"):
        WarpedSet.load(tmp_path)


def test_parallel_save_writes_the_same_files(ixi_crop, tmp_path):
    """Writing on two threads gives byte-identical files to one thread (and the report lists the same)."""
    img, lab = ixi_crop
    grid = Grid.from_image(img)
    arr = normalize_intensity(sitk.GetArrayFromImage(img))
    labels = sitk.GetArrayFromImage(lab).astype(np.uint16)
    table = LabelTable.from_values(np.unique(labels))
    rng = np.random.default_rng(1)
    atlases = [WarpedAtlas(f"a{i}", np.roll(arr, i, axis=0), np.roll(labels, i, axis=1),
                           rng.normal(size=(3, *grid.shape)).astype(np.float32)) for i in range(3)]
    ws = WarpedSet(grid, table, atlases, "deformable")
    ws.save(tmp_path / "one", workers=1)
    ws.save(tmp_path / "two", workers=2)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 3 * 4 + 1
    for n in names:
        assert _without_write_time((tmp_path / "one" / n).read_bytes()) == \
            _without_write_time((tmp_path / "two" / n).read_bytes()), n


def _without_write_time(data: bytes) -> bytes:
    """Drop pynrrd's header comment "# on <UTC time>(GMT)." (the write time differs between the two saves)."""
    head, sep, body = data.partition(b"\n\n")
    if not head.startswith(b"NRRD") or not sep:
        return data
    return b"\n".join(ln for ln in head.split(b"\n") if not ln.startswith(b"# on ")) + sep + body


def test_run_writers_keeps_order_and_reraises(tmp_path):
    from MASRefineLib.imageio import atomic_write_text, run_writers

    paths = run_writers([lambda i=i: atomic_write_text(str(i), tmp_path / f"{i}.txt") for i in range(5)], workers=2)
    assert [p.name for p in paths] == [f"{i}.txt" for i in range(5)]

    def broken():
        raise ValueError("disk full")
    with pytest.raises(ValueError, match="disk full"):
        run_writers([lambda: atomic_write_text("x", tmp_path / "x.txt"), broken], workers=2)
    # the other writer still finished, and nothing temporary is left behind
    assert (tmp_path / "x.txt").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_write_is_one_line_naming_the_file_and_leaves_the_old_file(ixi_crop, tmp_path, monkeypatch):
    from MASRefineLib import imageio
    img = ixi_crop[0]
    out = tmp_path / "t_image.nrrd"
    imageio.write_image(img, out)
    before = out.read_bytes()

    def failing_write(image, path, *args):  # what ITK raised when the disk filled up during a benchmark
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: /tmp/SimpleITK-build/ITK/Modules/"
                           f"IO/NRRD/src/itkNrrdImageIO.cxx:1349:\nITK ERROR: NrrdImageIO(0x5566): Write: Error writing "
                           f"{path}:\n[nrrd] _nrrdEncodingRaw_write: fwrite wrote only 6291328 4-sized things")
    monkeypatch.setattr(imageio.sitk, "WriteImage", failing_write)
    with pytest.raises(MASRefineError) as e:
        imageio.write_image(sitk.Cast(img, sitk.sitkFloat32) * 2, out)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{out}: could not write (") and "fwrite wrote only" in msg
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [out.name]


def _small_set(tmp_path, ids=("a0", "a1")) -> WarpedSet:
    """A small synthetic WarpedSet saved in ``tmp_path`` (no real data needed)."""
    grid = Grid((10, 11, 12), (1.0, 1.2, 1.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    rng = np.random.default_rng(1)
    labels = np.zeros(grid.shape, np.uint16)
    labels[2:6, 3:7, 4:8] = 3
    atlases = [WarpedAtlas(i, rng.random(grid.shape, dtype=np.float32), labels,
                           rng.normal(size=(3, *grid.shape)).astype(np.float32)) for i in ids]
    ws = WarpedSet(grid, LabelTable.from_values([3]), atlases, "affine")
    ws.save(tmp_path)
    return ws


@pytest.mark.parametrize("value, dtype, message", [(-1, np.int16, "non-negative integer"),
                                                   (70000, np.int32, "exceeds 65535"),
                                                   (2.5, np.float32, "non-negative integer")])
def test_warped_labels_are_checked_not_wrapped(tmp_path, value, dtype, message):
    """A warped label map goes through read_label: a negative or too large value is refused, not cast to uint16."""
    _small_set(tmp_path)
    lp = tmp_path / "a1_label.nii.gz"
    lab = sitk.ReadImage(str(lp))
    arr = sitk.GetArrayFromImage(lab).astype(dtype)
    arr[0, 0, 0] = value
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(lp))
    with pytest.raises(MASRefineError, match=f"a1_label.nii.gz: .*{message}"):
        WarpedSet.load(tmp_path)


def test_a_field_with_nan_is_refused(tmp_path):
    from MASRefineLib.fields import read_field, write_field
    ws = _small_set(tmp_path)
    f = ws.atlases[1].field.copy()
    f[1, 2, 3, 4] = np.nan
    write_field(f, ws.target_grid, tmp_path / "a1_field.nrrd")
    with pytest.raises(MASRefineError, match=r"a1_field.nrrd: displacement field contains NaN or infinite values$"):
        read_field(tmp_path / "a1_field.nrrd")
    with pytest.raises(MASRefineError, match=r"a1_field.nrrd: displacement field contains NaN"):
        WarpedSet.load(tmp_path)


def test_atlas_ids_differing_only_by_case_are_duplicates_in_a_report(tmp_path):
    """'A1' and 'a1' name the same files on macOS and Windows: a report listing both is refused before reading."""
    from MASRefineLib.jsonio import read_json, write_json
    _small_set(tmp_path, ids=("A1", "b1"))
    report = read_json(tmp_path / "report.json", allow_nan=True)
    report["atlases"][1]["id"] = "a1"
    write_json(report, tmp_path / "report.json")
    with pytest.raises(MASRefineError, match=r"report.json: duplicate atlas id 'a1' \(same as 'A1' on a case-insensitive"):
        WarpedSet.load(tmp_path)


def _old_target_arrays(target, grid):
    """The two copies target_array replaced (#20), as references: refinement's and fusion's."""
    import torch
    from MASRefineLib.imageio import resample_image
    if isinstance(target, sitk.Image):
        same = Grid.from_image(target).isclose(grid)
        refine = normalize_intensity(sitk.GetArrayFromImage(target if same else resample_image(target, grid)))
        fusion = normalize_intensity(sitk.GetArrayFromImage(
            target if same else resample_image(sitk.Cast(target, sitk.sitkFloat32), grid)))
        return refine, fusion
    arr = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    refine = np.asarray(arr, dtype=np.float32)
    refine = refine.reshape(refine.shape[-3:]) if refine.ndim > 3 else refine
    return refine, np.squeeze(arr).astype(np.float32)


def test_target_array_equals_the_refinement_and_fusion_copies_it_replaced(ixi_crop, tmp_path):
    """One target coercion (warped.target_array) for refinement and fusion: on a real IXI crop, the same numbers
    as both former copies, from an image on the grid, one on another (oblique) grid, an array and a tensor."""
    import torch
    from MASRefineLib.imageio import read_image
    from MASRefineLib.warped import target_array
    image = ixi_crop[0]
    grid = Grid.from_image(image)
    path = tmp_path / "target.nrrd"
    sitk.WriteImage(image, str(path))
    arr = normalize_intensity(sitk.GetArrayFromImage(image))
    for target in (image, make_oblique(image), arr, torch.from_numpy(arr)[None, None]):
        got = target_array(target, grid)
        assert got.dtype == np.float32 and got.shape == grid.shape
        for old in _old_target_arrays(target, grid):
            np.testing.assert_array_equal(got, old)
    np.testing.assert_array_equal(target_array(str(path), grid), _old_target_arrays(read_image(path), grid)[0])
    with pytest.raises(MASRefineError, match="does not match the registered grid"):
        target_array(arr[1:], grid)
