"""The one warp agrees with SimpleITK, and displacement-field files mean the same thing to both."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from MASRefineLib.fields import (folding_fraction, jacobian_determinant, read_field,
                                 write_field)
from MASRefineLib.geometry import Grid
from MASRefineLib.warp import affine_to_field, compose, grid_points, image_tensor, warp, warp_labels

from conftest import make_oblique


def _inside_moving(field: torch.Tensor | None, grid: Grid, margin_vox: float = 1.0,
                   moving_grid: Grid | None = None) -> np.ndarray:
    """Target voxels whose sample point p + u(p) lies inside the moving grid by ``margin_vox``:
    only there is the interpolation defined the same way by ITK and torch (borders differ by design)."""
    pts = grid_points(grid).double()
    if field is not None:
        pts = pts + field[0].double().permute(1, 2, 3, 0)
    grid = moving_grid or grid
    m = torch.as_tensor(grid.physical_to_index())
    idx = pts @ m[:3, :3].T + m[:3, 3]
    size = torch.tensor(grid.size, dtype=torch.float64)
    return ((idx >= margin_vox) & (idx <= size - 1 - margin_vox)).all(dim=-1).numpy()


def _smooth_field(grid: Grid, amp_mm: float, seed: int = 0) -> torch.Tensor:
    """A smooth random displacement (mm) built from low-frequency sines over the grid."""
    g = torch.Generator().manual_seed(seed)
    pts = grid_points(grid).double()
    c = pts.mean(dim=(0, 1, 2))
    ext = (pts.amax(dim=(0, 1, 2)) - pts.amin(dim=(0, 1, 2))).clamp(min=1.0)
    x = (pts - c) / ext
    comps = []
    for _ in range(3):
        w = torch.randn(3, generator=g, dtype=torch.float64) * 3
        ph = torch.rand(1, generator=g, dtype=torch.float64) * 6.28
        comps.append(amp_mm * torch.sin(x @ w + ph))
    return torch.stack(comps, dim=0).unsqueeze(0).float()


def test_field_file_matches_sitk_resample(ixi_crop, tmp_path):
    img, _ = ixi_crop
    moving = make_oblique(img)
    grid = Grid.from_image(moving)
    field = _smooth_field(grid, amp_mm=3.0)
    path = write_field(field, grid, tmp_path / "field.nrrd")
    # SimpleITK reads the file as a vector image and applies it
    disp = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    assert disp.GetNumberOfComponentsPerPixel() == 3
    assert Grid.from_image(disp).isclose(grid)
    ref = sitk.Resample(moving, moving, sitk.DisplacementFieldTransform(disp), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = warp(image_tensor(sitk.GetArrayFromImage(moving)), grid, field, grid)[0, 0].numpy()
    a = sitk.GetArrayFromImage(ref)
    arr = sitk.GetArrayFromImage(moving)
    rng = float(arr.max() - arr.min())
    inner = _inside_moving(field, grid)
    assert inner.mean() > 0.5
    assert np.abs(a[inner] - ours[inner]).max() <= 1e-3 * rng


def test_nrrd_header_is_a_slicer_grid_transform(ixi_crop, tmp_path):
    import nrrd

    grid = Grid.from_image(make_oblique(ixi_crop[0]))
    write_field(torch.zeros(1, 3, *grid.shape), grid, tmp_path / "f.nrrd")
    h = nrrd.read_header(str(tmp_path / "f.nrrd"))
    assert h["kinds"] == ["vector", "domain", "domain", "domain"]
    assert h["space"] == "left-posterior-superior"
    assert h["intent_code"] == "1006"
    assert list(h["sizes"]) == [3, *grid.size]
    np.testing.assert_allclose(h["space origin"], grid.origin)


def test_translation_is_a_constant_lps_vector(ixi_crop, tmp_path):
    img = make_oblique(ixi_crop[0])
    grid = Grid.from_image(img)
    t = np.array([4.0, -2.5, 1.5])  # LPS mm: target p samples the moving image at p + t
    a = torch.eye(4).unsqueeze(0)
    a[0, :3, 3] = torch.tensor(t)
    field = affine_to_field(a, grid)
    write_field(field, grid, tmp_path / "t.nrrd")
    back, g2 = read_field(tmp_path / "t.nrrd")
    assert g2.isclose(grid)
    np.testing.assert_allclose(back.reshape(3, -1).T, np.broadcast_to(t, (back[0].size, 3)), atol=1e-4)
    # and the same transform through SimpleITK's TranslationTransform
    ref = sitk.Resample(img, img, sitk.TranslationTransform(3, t.tolist()), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = warp(image_tensor(sitk.GetArrayFromImage(img)), grid, field, grid)[0, 0].numpy()
    arr = sitk.GetArrayFromImage(img)
    inner = _inside_moving(field, grid)
    assert np.abs(sitk.GetArrayFromImage(ref)[inner] - ours[inner]).max() <= 1e-3 * float(arr.max() - arr.min())


def test_warp_between_different_grids_matches_sitk(ixi_crop):
    """Moving and target on different (oblique, anisotropic) grids: pure physical-space resampling."""
    moving = ixi_crop[0]
    g = Grid.from_image(make_oblique(moving, spacing=(1.7, 1.9, 2.2), angles=(0.05, 0.1, -0.08))).resized((30, 32, 28))
    shift = Grid.from_image(moving).center_mm() - g.center_mm()  # centre it on the moving image
    target_grid = Grid(g.size, g.spacing, tuple(np.add(g.origin, shift)), g.direction)
    ref = sitk.Resample(moving, target_grid.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = warp(image_tensor(sitk.GetArrayFromImage(moving)), Grid.from_image(moving), None, target_grid)[0, 0].numpy()
    rng = float(np.ptp(sitk.GetArrayFromImage(moving)))
    inner = _inside_moving(None, target_grid, moving_grid=Grid.from_image(moving))
    assert inner.mean() > 0.3
    assert np.abs(sitk.GetArrayFromImage(ref)[inner] - ours[inner]).max() <= 1e-3 * rng


def test_label_warp_keeps_values_and_matches_nearest(ixi_crop):
    _, lab = ixi_crop
    grid = Grid.from_image(lab)
    arr = sitk.GetArrayFromImage(lab).astype(np.int64)
    t = image_tensor(arr, dtype=torch.int64)
    field = _smooth_field(grid, amp_mm=2.0, seed=3)
    for method in ("onehot", "nearest"):
        out = warp_labels(t, grid, field, grid, method=method)[0, 0].numpy()
        assert set(np.unique(out)) <= set(np.unique(arr))
    # identity keeps the map exactly
    same = warp_labels(t, grid, None, grid)[0, 0].numpy()
    np.testing.assert_array_equal(same, arr)
    # nearest agrees with SimpleITK's nearest neighbour in the interior (ties aside)
    vec = grid.apply_to(sitk.GetImageFromArray(np.moveaxis(field.numpy().astype(np.float64)[0], 0, -1), isVector=True))
    ref = sitk.Resample(lab, lab, sitk.DisplacementFieldTransform(vec), sitk.sitkNearestNeighbor, 0)
    near = warp_labels(t, grid, field, grid, method="nearest")[0, 0].numpy()
    inner = _inside_moving(field, grid)
    agree = (sitk.GetArrayFromImage(ref)[inner] == near[inner]).mean()
    assert agree > 0.995


def test_batched_warp_equals_one_by_one(ixi_crop):
    img = ixi_crop[0]
    grid = Grid.from_image(img)
    x = image_tensor(sitk.GetArrayFromImage(img))
    fields = torch.cat([_smooth_field(grid, 2.0, s) for s in range(3)])
    batch = warp(x.expand(3, -1, -1, -1, -1), grid, fields, grid)
    for i in range(3):
        torch.testing.assert_close(batch[i:i + 1], warp(x, grid, fields[i:i + 1], grid))


def test_compose_equals_warping_twice(ixi_crop):
    img = ixi_crop[0]
    grid = Grid.from_image(img)
    x = image_tensor(sitk.GetArrayFromImage(img))
    a, b = _smooth_field(grid, 2.0, 1), _smooth_field(grid, 1.5, 2)
    twice = warp(warp(x, grid, a, grid, padding="border"), grid, b, grid, padding="border")
    once = warp(x, grid, compose(a, b, grid), grid, padding="border")
    inner = (slice(None), slice(None)) + (slice(5, -5),) * 3
    rng = float(x.max() - x.min())
    assert (twice[inner] - once[inner]).abs().mean() < 2e-2 * rng


def test_jacobian_of_affine_and_folding(ixi_crop):
    grid = Grid.from_image(make_oblique(ixi_crop[0]))
    a = torch.eye(4).unsqueeze(0).double()
    a[0, :3, :3] = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.1]], dtype=torch.float64)
    det = jacobian_determinant(affine_to_field(a, grid), grid)
    np.testing.assert_allclose(det.numpy(), np.linalg.det(a[0, :3, :3].numpy()), rtol=1e-5)
    assert folding_fraction(affine_to_field(a, grid), grid).item() == 0.0
    flip = torch.eye(4).unsqueeze(0).double()
    flip[0, 0, 0] = -1.0
    assert folding_fraction(affine_to_field(flip, grid), grid).item() == 1.0


def test_resample_field_fast_path_equals_general_path(ixi_crop):
    from MASRefineLib.warp import resample_field, same_box
    grid = Grid.from_image(make_oblique(ixi_crop[0]))
    coarse = grid.with_spacing(5.0)
    assert same_box(coarse, grid)
    assert not same_box(coarse, Grid(coarse.size, coarse.spacing, grid.origin, grid.direction))  # shifted
    f = _smooth_field(coarse, amp_mm=4.0, seed=3)
    fast = resample_field(f, coarse, grid)
    general = warp(f, coarse, None, grid, padding="border")
    assert fast.shape == general.shape
    assert torch.allclose(fast, general, atol=1e-4)


def test_onehot_label_warp_equals_argmax_of_interpolated_indicators(ixi_crop):
    """The 8-corner computation gives the label of the largest trilinearly warped indicator (outside = 0)."""
    _, lab = ixi_crop
    moving = make_oblique(lab)
    mgrid = Grid.from_image(moving)
    tgrid = mgrid.resized((40, 44, 36))
    arr = sitk.GetArrayFromImage(moving).astype(np.int64)
    t = image_tensor(arr, dtype=torch.int64)
    field = _smooth_field(tgrid, amp_mm=3.0, seed=5)
    values = sorted(set(np.unique(arr).tolist()) | {0})
    onehot = torch.cat([(t == v).float() for v in values], dim=1)
    prob = warp(onehot, mgrid, field, tgrid, padding="zeros")
    prob[:, values.index(0)] += 1.0 - warp(torch.ones_like(t, dtype=torch.float32), mgrid, field, tgrid)[:, 0]
    top2 = prob.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-4)[0].numpy()  # ties aside
    ref = torch.as_tensor(values)[prob.argmax(dim=1)][0].numpy()
    ours = warp_labels(t, mgrid, field, tgrid, method="onehot")[0, 0].numpy()
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ours[clear], ref[clear])
    # shifted far (many voxels) beyond one side: sample points outside the map are background, as in
    # the one-hot reference with zero padding
    far = field.clone()
    far[:, 0] += 0.6 * tgrid.size[0] * tgrid.spacing[0]
    pf = warp(onehot, mgrid, far, tgrid, padding="zeros")
    pf[:, values.index(0)] += 1.0 - warp(torch.ones_like(t, dtype=torch.float32), mgrid, far, tgrid)[:, 0]
    t2 = pf.topk(2, dim=1).values
    cf = (t2[:, 0] - t2[:, 1] > 1e-4)[0].numpy()
    rf = torch.as_tensor(values)[pf.argmax(dim=1)][0].numpy()
    of = warp_labels(t, mgrid, far, tgrid, method="onehot")[0, 0].numpy()
    assert (rf[cf] == 0).mean() > 0.3 and (rf[cf] != 0).any()
    np.testing.assert_array_equal(of[cf], rf[cf])
    # restricting the allowed values: a removed label is never assigned
    drop = values[len(values) // 2]
    restricted = warp_labels(t, mgrid, field, tgrid, values=[v for v in values if v != drop])[0, 0].numpy()
    assert drop not in set(np.unique(restricted)) and (ours == drop).any()


def test_sample_with_one_grid_per_batch_item(ixi_crop):
    from MASRefineLib.warp import sample
    img = ixi_crop[0]
    g1 = Grid.from_image(img)
    g2 = Grid.from_image(make_oblique(img))
    x = image_tensor([sitk.GetArrayFromImage(img)] * 2)
    pts = grid_points(g1.resized((20, 22, 18))).unsqueeze(0) + torch.tensor([1.5, -2.0, 0.7])
    both = sample(x, [g1, g2], pts)
    assert torch.allclose(both[:1], sample(x[:1], g1, pts), atol=1e-6)
    assert torch.allclose(both[1:], sample(x[1:], g2, pts), atol=1e-6)


def test_sample_mapped_equals_sample_at_mapped_points(ixi_crop):
    from MASRefineLib.warp import sample, sample_mapped
    img = ixi_crop[0]
    g1, g2 = Grid.from_image(img), Grid.from_image(make_oblique(img))
    x = image_tensor([sitk.GetArrayFromImage(img)] * 2)
    tgrid = g1.resized((20, 22, 18))
    m = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    m[0, :3, :3] += torch.tensor([[0.05, 0.02, 0.0], [-0.03, 0.0, 0.04], [0.0, 0.01, -0.06]], dtype=torch.float64)
    m[1, :3, 3] = torch.tensor([2.0, -3.0, 1.0], dtype=torch.float64)
    pts = grid_points(tgrid, dtype=torch.float64)
    mapped = torch.einsum("bij,zyxj->bzyxi", m[:, :3, :3], pts) + m[:, None, None, None, :3, 3]
    ref = sample(x, [g1, g2], mapped.float())
    ours = sample_mapped(x, [g1, g2], m, pts.permute(3, 0, 1, 2).unsqueeze(0))
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()  # float32 rounding of intensities ~4000


def test_jacobian_determinant_equals_linalg_det(ixi_crop):
    from MASRefineLib.fields import spatial_gradient
    grid = Grid.from_image(make_oblique(ixi_crop[0]))
    field = _smooth_field(grid, amp_mm=4.0, seed=7)
    j = spatial_gradient(field, grid) + torch.eye(3).view(1, 3, 3, 1, 1, 1)
    ref = torch.linalg.det(j.permute(0, 3, 4, 5, 1, 2).double()).float()
    assert torch.allclose(jacobian_determinant(field, grid), ref, atol=1e-5)


def test_grid_points_are_the_voxel_centres_in_lps():
    g = Grid((7, 5, 4), (1.3, 0.9, 2.1), (12.5, -30.25, 7.0), tuple(np.asarray(
        sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()).tolist()))
    pts = grid_points(g, dtype=torch.float64)
    assert pts.shape == (4, 5, 7, 3)
    for k, j, i in ((0, 0, 0), (3, 4, 6), (2, 1, 5)):
        ref = g.index_to_physical() @ np.array([i, j, k, 1.0])
        np.testing.assert_allclose(pts[k, j, i].numpy(), ref[:3], atol=1e-9)


def test_folding_fraction_by_slabs_equals_whole_volume(ixi_crop):
    grid = Grid.from_image(make_oblique(ixi_crop[0]))
    field = _smooth_field(grid, amp_mm=25.0, seed=2)  # strong enough to fold somewhere
    whole = (jacobian_determinant(field, grid) <= 0).float().mean(dim=(1, 2, 3))
    assert 0 < whole.item() < 1
    for slab in (1, 7, 16, 1000):
        assert torch.allclose(folding_fraction(field, grid, slab=slab), whole, atol=1e-7)
    # the Jacobian map written for QA (also by slabs) is the whole-volume determinant, on the field's grid
    from MASRefineLib.fields import jacobian_image
    img = jacobian_image(field[0], grid)
    assert grid.shape[0] > 16 and Grid.from_image(img).isclose(grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), jacobian_determinant(field, grid)[0].numpy())
