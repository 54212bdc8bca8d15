"""The one in-memory volume (MASRefineLib.volume, #20): read once, normalised once, label values kept exactly in a
compact dtype, physical space (oblique, anisotropic) carried unchanged; WarpedSet holds tensors."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib.errors import MASRefineError
from MASRefineLib.geometry import Grid
from MASRefineLib.imageio import normalize_intensity, read_image as sitk_read_image, write_image
from MASRefineLib.labels import LabelTable
from MASRefineLib.volume import (Volume, as_image_volume, compact_labels, label_dtype, read_image, read_label)
from MASRefineLib.warped import WarpedAtlas, WarpedSet, target_array, target_tensor

from conftest import make_oblique


@pytest.fixture()
def oblique_files(ixi_crop, tmp_path):
    img, lab = (make_oblique(x) for x in ixi_crop)
    ip, lp = tmp_path / "img.nrrd", tmp_path / "lab.nii.gz"
    write_image(img, ip, compress=False)
    write_image(sitk.Cast(lab, sitk.sitkUInt16), lp)
    return img, lab, ip, lp


def test_read_image_is_the_normalised_file_on_its_oblique_grid(oblique_files):
    img, _, ip, _ = oblique_files
    vol = read_image(ip)
    assert vol.tensor.dtype == torch.float32 and not vol.is_label
    assert vol.grid.isclose(Grid.from_image(img)) and vol.grid.spacing == pytest.approx((1.3, 0.9, 2.1))
    np.testing.assert_array_equal(vol.numpy(), normalize_intensity(sitk.GetArrayFromImage(sitk_read_image(ip))))
    # the adapter for sitk images normalises the same way: one definition of the normalised target
    np.testing.assert_array_equal(as_image_volume(img).numpy(), vol.numpy())
    assert as_image_volume(vol) is vol  # a Volume is taken as it is: never normalised twice
    back = vol.to_image()
    assert Grid.from_image(back).isclose(vol.grid)


def test_read_label_keeps_values_in_a_compact_dtype(oblique_files, tmp_path):
    _, lab, _, lp = oblique_files
    ref = sitk.GetArrayFromImage(lab).astype(np.int64)
    vol = read_label(lp)
    assert vol.is_label and vol.tensor.dtype == label_dtype(int(ref.max()))
    np.testing.assert_array_equal(vol.numpy().astype(np.int64), ref)
    # values above 255 and above 32767 move to wider types, never renumbered
    for top, dt in ((300, torch.int16), (40000, torch.int32)):
        big = ref.copy()
        big[big == ref.max()] = top
        img = sitk.GetImageFromArray(big.astype(np.uint16))
        img.CopyInformation(lab)
        write_image(img, tmp_path / f"big{top}.nii.gz")
        v = read_label(tmp_path / f"big{top}.nii.gz")
        assert v.tensor.dtype == dt
        np.testing.assert_array_equal(v.numpy().astype(np.int64), big)
    assert compact_labels(np.array([0, 255], np.uint16)).dtype == torch.uint8
    with pytest.raises(ValueError):
        compact_labels(np.zeros(3, np.float32))


def test_volume_refuses_a_tensor_off_its_grid_and_labels_as_intensities(oblique_files):
    img, _, ip, lp = oblique_files
    vol = read_image(ip)
    with pytest.raises(ValueError, match="does not match grid"):
        Volume(vol.tensor[1:], vol.grid)
    with pytest.raises(MASRefineError, match="expected intensities"):
        as_image_volume(read_label(lp))


def test_target_tensor_takes_a_volume_as_it_is_and_checks_its_grid(oblique_files):
    img, _, ip, _ = oblique_files
    vol = read_image(ip)
    t = target_tensor(vol, vol.grid)
    assert t.shape == (1, 1, *vol.grid.shape) and t.data_ptr() == vol.tensor.data_ptr()  # no copy
    np.testing.assert_array_equal(target_array(vol, vol.grid), target_array(img, vol.grid))
    other = vol.grid.resized(tuple(s + 1 for s in vol.grid.size))
    with pytest.raises(MASRefineError, match="does not match the registered grid"):
        target_tensor(vol, other)


def test_warped_set_holds_compact_tensors_and_round_trips(oblique_files, tmp_path):
    img, lab, ip, lp = oblique_files
    vol, labels = read_image(ip), read_label(lp)
    table = LabelTable.from_values(np.unique(labels.numpy()))
    field = torch.randn(3, *vol.grid.shape, generator=torch.Generator().manual_seed(0))
    a = WarpedAtlas("a", vol.tensor, sitk.GetArrayFromImage(sitk.Cast(lab, sitk.sitkUInt16)), field)
    assert a.label_tensor.dtype == torch.uint8 and a.image_tensor.dtype == torch.float32
    assert a.field_tensor.dtype == torch.float32
    assert np.shares_memory(a.label, a.label_tensor.numpy())  # numpy views, no copy
    ws = WarpedSet(vol.grid, table, [a], "affine")
    assert ws.labels().dtype == torch.int64 and ws.images().shape == (1, 1, *vol.grid.shape)
    ws.save(tmp_path / "out")
    back = WarpedSet.load(tmp_path / "out").atlases[0]
    assert back.label_tensor.dtype == torch.uint8
    np.testing.assert_array_equal(back.label_tensor.numpy(), labels.numpy())
    np.testing.assert_allclose(back.field_tensor.numpy(), field.numpy(), atol=1e-6)
    np.testing.assert_allclose(back.image_tensor.numpy(), vol.numpy(), atol=1e-6)
