"""The stage hand-off folder round-trips exactly (geometry, label values, fields)."""
from __future__ import annotations

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
    ws = WarpedSet(grid, table, atlases, "affine", target_path="t.nii.gz")
    ws.save(tmp_path)
    back = WarpedSet.load(tmp_path)
    assert back.ids == ["a0", "a1"] and back.stage == "affine"
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
