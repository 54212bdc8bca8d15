"""Registration engine on real brains (IXI, resampled to 4 mm to stay fast): known affines and smooth
deformations are recovered (errors in mm), oblique/anisotropic grids are handled in physical space,
identity stays identity, batching does not change results, cancellation is prompt, the CLI writes
what it promises and skips a bad atlas."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib.errors import Cancelled, MASRefineError
from MASRefineLib.geometry import Grid
from MASRefineLib.imageio import resample_image, resample_label, write_image
from cancelling import cancel_after
from MASRefineLib.registration import AtlasInput, PRESETS, get_params, register
from MASRefineLib.warp import grid_points, image_tensor, warp
from MASRefineLib.warped import WarpedSet

from conftest import ixi_paths, make_oblique


def _at_4mm(ixi_dir, subject: str) -> tuple[sitk.Image, sitk.Image]:
    img_p, lab_p = ixi_paths(ixi_dir, subject)
    img = sitk.ReadImage(str(img_p), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(lab_p), sitk.sitkUInt16)
    g = Grid.from_image(img).with_spacing(4.0)
    return resample_image(sitk.BinShrink(img, [2, 2, 2]), g), resample_label(lab, g)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine this is faster than two, and it is what CI uses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def brains(ixi_dir, ixi_ids):
    """Three real brains (different subjects) at 4 mm: 60 x 60 x 45 voxels each."""
    return [_at_4mm(ixi_dir, s) for s in ixi_ids[:3]]


# settings for small 4 mm test images (shrink factors are relative to the voxel size; the presets'
# coarsest levels would be too coarse here)
AFFINE = dict(stage="affine", affine_shrink=(2.0, 1.0), affine_iterations=(50, 50))
DEFORM = dict(affine_shrink=(2.0,), affine_iterations=(40,), deform_shrink=(2.0, 1.0),
              control_shrink=(3.0, 2.0), deform_iterations=(40, 40), deform_lr=(0.15, 0.1))


def _points_mm(grid: Grid) -> np.ndarray:
    return grid_points(grid, dtype=torch.float64).numpy()  # (Z, Y, X, 3)


def _mapped(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


def _sitk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(matrix[:3, :3].ravel().tolist())
    t.SetTranslation(matrix[:3, 3].tolist())
    return t


def _true_affine(grid: Grid) -> np.ndarray:
    """~5 degree rotations, 4-6 % scalings, a shear and a 5 mm translation about the image centre."""
    r = sitk.Euler3DTransform()
    r.SetRotation(0.08, -0.06, 0.09)
    m = np.asarray(r.GetMatrix()).reshape(3, 3) @ np.array([[1.06, 0.03, 0.0], [0.0, 0.95, 0.0], [0.0, 0.0, 1.04]])
    c = grid.center_mm()
    a = np.eye(4)
    a[:3, :3] = m
    a[:3, 3] = c + np.array([5.0, -4.0, 3.0]) - m @ c
    return a


def test_recovers_a_known_affine_in_mm(brains):
    atlas, atlas_lab = brains[0]
    grid = Grid.from_image(atlas)
    a_true = _true_affine(grid)
    # target(p) = atlas(A_true p): registering the atlas to the target must find A_true
    target = sitk.Resample(atlas, atlas, _sitk_affine(a_true), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    target_lab = sitk.Resample(atlas_lab, atlas_lab, _sitk_affine(a_true), sitk.sitkNearestNeighbor, 0)
    ws = register(target, [AtlasInput("a", atlas, atlas_lab)], params=get_params("fast", **AFFINE), device="cpu")
    a = np.asarray(ws.atlases[0].info["matrix"])
    inside = sitk.GetArrayFromImage(target_lab) > 0
    pts = _points_mm(grid)[inside]
    before = np.linalg.norm(pts - _mapped(a_true, pts), axis=1).mean()
    err = np.linalg.norm(_mapped(a, pts) - _mapped(a_true, pts), axis=1)
    assert before > 5.0
    assert err.mean() < 0.6 and err.max() < 1.5, (err.mean(), err.max())
    assert ws.atlases[0].info["folding_fraction"] == 0.0


def _smooth_field(grid: Grid, amp_mm: float) -> torch.Tensor:
    """A smooth displacement (mm): low-frequency sines over the field of view."""
    pts = grid_points(grid, dtype=torch.float64)
    x = (pts - torch.as_tensor(grid.center_mm())) / torch.as_tensor(grid.extent_mm().max())
    comps = [torch.sin(2.5 * x[..., 1] + 0.3), torch.cos(2.0 * x[..., 2] - 0.5), torch.sin(2.2 * x[..., 0] + 1.0)]
    return (amp_mm * torch.stack(comps)).unsqueeze(0).float()


def test_recovers_a_known_smooth_deformation(brains):
    atlas, atlas_lab = brains[0]
    grid = Grid.from_image(atlas)
    u_true = _smooth_field(grid, 3.0)
    target_arr = warp(image_tensor(sitk.GetArrayFromImage(atlas)), grid, u_true, grid)[0, 0].numpy()
    target = grid.apply_to(sitk.GetImageFromArray(target_arr))
    ws = register(target, [AtlasInput("a", atlas, atlas_lab)], params=get_params("fast", **DEFORM), device="cpu")
    u = torch.as_tensor(ws.atlases[0].field)
    inside = torch.as_tensor(target_arr > 0.2 * target_arr.max())
    err_before = u_true[0].norm(dim=0)[inside].mean().item()
    err_after = (u - u_true[0]).norm(dim=0)[inside].mean().item()
    assert err_before > 2.0
    assert err_after < 0.35 * err_before, (err_before, err_after)
    assert ws.atlases[0].info["folding_fraction"] < 1e-3


def test_physical_space_consistency_on_oblique_anisotropic_grids(brains):
    """The same physical object on an oblique anisotropic grid (target) and on an axis-aligned 2 mm grid
    shifted by a known translation (atlas): the registration must find that translation in mm."""
    img, lab = brains[1]
    target, target_lab = make_oblique(img), make_oblique(lab)
    tg = Grid.from_image(target)
    corners = np.array([[i, j, k] for i in (0, tg.size[0] - 1) for j in (0, tg.size[1] - 1) for k in (0, tg.size[2] - 1)])
    lps = corners @ (tg.direction_matrix @ np.diag(tg.spacing)).T + np.asarray(tg.origin)
    lo, hi = lps.min(0), lps.max(0)
    axis = Grid(tuple(int(s) for s in np.ceil((hi - lo) / 2.0) + 1), (2.0, 2.0, 2.0), tuple(lo), tuple(np.eye(3).ravel()))
    shift = np.array([6.0, -4.0, 3.0])
    atlas = resample_image(target, axis)
    atlas_lab = resample_label(target_lab, axis)
    for im in (atlas, atlas_lab):
        im.SetOrigin(tuple(np.asarray(axis.origin) + shift))
    ws = register(target, [AtlasInput("a", atlas, atlas_lab)], params=get_params("fast", **AFFINE), device="cpu")
    a = np.asarray(ws.atlases[0].info["matrix"])
    inside = sitk.GetArrayFromImage(target_lab) > 0
    pts = _points_mm(tg)[inside]
    err = np.linalg.norm(_mapped(a, pts) - (pts + shift), axis=1)
    assert err.mean() < 1.0, err.mean()
    # labels came back onto the oblique target grid where they belong
    warped = ws.atlases[0].label
    ref = sitk.GetArrayFromImage(target_lab)
    both = (warped > 0) & (ref > 0)
    assert 2 * both.sum() / ((warped > 0).sum() + (ref > 0).sum()) > 0.9


def test_identity_when_target_is_the_atlas(brains):
    img, lab = brains[0]
    ws = register(img, [AtlasInput("same", img, lab)], params=get_params("fast", **DEFORM), device="cpu")
    a = ws.atlases[0]
    inside = sitk.GetArrayFromImage(lab) > 0
    mag = np.linalg.norm(a.field, axis=0)[inside]
    assert mag.mean() < 0.25 and np.percentile(mag, 99) < 0.8, (mag.mean(), np.percentile(mag, 99))
    assert (a.label == sitk.GetArrayFromImage(lab)).mean() > 0.97
    assert a.info["folding_fraction"] == 0.0
    assert a.info["ncc"] > 0.99


def test_batch_equals_one_by_one_and_is_deterministic(brains):
    target = brains[0][0]
    atlases = [AtlasInput(f"s{i}", *brains[i]) for i in (1, 2)]
    params = get_params("fast", affine_shrink=(1.5,), affine_iterations=(20,), deform_shrink=(1.5,),
                        control_shrink=(2.25,), deform_iterations=(20,), deform_lr=(0.12,))
    both = register(target, atlases, params=params, device="cpu")
    for i, a in enumerate(atlases):
        one = register(target, [a], params=params, device="cpu")
        np.testing.assert_allclose(one.atlases[0].field, both.atlases[i].field, atol=2e-3)
        assert (one.atlases[0].label == both.atlases[i].label).mean() > 0.999
    again = register(target, atlases, params=params, device="cpu")
    np.testing.assert_array_equal(again.atlases[1].field, both.atlases[1].field)


def test_cancellation_stops_promptly(brains):
    events = []
    cancel = cancel_after(6)

    def cb(ev):
        events.append(ev)
        cancel(ev)

    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        register(brains[0][0], [AtlasInput(f"s{i}", *brains[i]) for i in (1, 2)],
                 params=get_params("default"), device="cpu", progress=cb)
    assert len(events) == 6
    assert any("affine" in e.message for e in events)  # stopped inside the optimisation, not after it
    assert time.perf_counter() - t0 < 10.0


def test_parameters_presets_and_overrides():
    assert set(PRESETS) == {"fast", "default", "accurate", "greedy"}
    p = get_params("default", deform_iterations="10,5", bending_weight="2.5", diffeomorphic="true")
    assert p.deform_iterations == (10, 5) and p.bending_weight == 2.5 and p.diffeomorphic is True
    with pytest.raises(MASRefineError, match="unknown registration parameter"):
        get_params("default", no_such_knob=1)
    with pytest.raises(MASRefineError, match="one value per deformable level"):
        get_params("default", deform_iterations="10")
    with pytest.raises(MASRefineError, match="preset"):
        get_params("slow")


def test_diffeomorphic_mode_prevents_folding(brains):
    """Without regularisation a displacement field folds; the scaling-and-squaring velocity field does not."""
    target, atlas = brains[0][0], brains[1]
    folding = {}
    for diffeo in (False, True):
        params = get_params("fast", **{**DEFORM, "diffeomorphic": diffeo, "bending_weight": 0.0,
                                       "diffusion_weight": 0.0, "deform_lr": (0.25, 0.25)})
        ws = register(target, [AtlasInput("s1", *atlas)], params=params, device="cpu")
        folding[diffeo] = ws.atlases[0].info["folding_fraction"]
        assert ws.atlases[0].info["ncc"] > 0.9
    assert folding[False] > 0.01
    assert folding[True] < 1e-3 and folding[True] < 0.05 * folding[False], folding


def test_folding_barrier_removes_most_folding_at_the_same_similarity(brains):
    """A lightly regularised displacement field folds on this pair; the folding barrier (the default's
    weight) removes most of it and leaves the match to the target as it was."""
    target, atlas = brains[0][0], brains[1]
    out = {}
    for weight in (0.0, get_params("default").folding_weight):
        params = get_params("default", **{**DEFORM, "bending_weight": 0.01, "diffusion_weight": 0.02,
                                          "deform_lr": (0.25, 0.25), "folding_weight": weight})
        info = register(target, [AtlasInput("s1", *atlas)], params=params, device="cpu").atlases[0].info
        out[weight] = (info["folding_fraction"], info["ncc"])
    (fold0, ncc0), (fold1, ncc1) = out.values()
    assert fold0 > 1e-3, out  # the problem is real on this pair
    assert fold1 < 0.25 * fold0, out
    assert ncc1 > ncc0 - 0.005, out


def test_cli_writes_outputs_and_skips_a_bad_atlas(brains, tmp_path, capsys):
    from MASRefineLib.cli import main

    root = tmp_path / "set"
    entries = []
    for i in (1, 2):
        write_image(brains[i][0], root / f"img{i}.nii.gz")
        write_image(brains[i][1], root / f"lab{i}.nii.gz")
        entries.append({"id": f"s{i}", "image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    empty = sitk.Image(brains[1][0]) * 0  # a constant (empty) image: reported and skipped
    write_image(empty, root / "empty.nii.gz")
    entries.append({"id": "bad", "image": "empty.nii.gz", "label": "lab1.nii.gz"})
    values = sorted(set(np.unique(sitk.GetArrayFromImage(brains[1][1])).tolist())
                    | set(np.unique(sitk.GetArrayFromImage(brains[2][1])).tolist()) - {0})
    (root / "atlas.json").write_text(json.dumps({"schema_version": 1, "labels": {str(v): {"name": f"r{v}"} for v in values},
                                                 "atlases": entries}))
    write_image(brains[0][0], tmp_path / "target.nii.gz")
    out = tmp_path / "out"
    rc = main(["register", "--atlases", str(root), "--target", str(tmp_path / "target.nii.gz"), "--out", str(out),
               "--preset", "fast", "--device", "cpu", "-q", "--set", "deform_shrink=1.5", "--set", "control_shrink=2.25",
               "--set", "affine_shrink=1.5", "--set", "affine_iterations=20", "--set", "deform_iterations=20",
               "--set", "deform_lr=0.25"])
    assert rc == 0
    # the skip is said once, in one line, without Python's warning source line
    err = capsys.readouterr().err.splitlines()
    assert len([ln for ln in err if "atlas bad" in ln]) == 1 and not any("warnings.warn" in ln for ln in err), err
    ws = WarpedSet.load(out)
    assert ws.ids == ["s1", "s2"] and ws.stage == "deformable"
    assert [f["id"] for f in ws.failed] == ["bad"] and "constant" in ws.failed[0]["error"]
    for aid in ws.ids:
        for name in ("image.nrrd", "label.nii.gz", "label.seg.nrrd", "field.nrrd"):
            assert (out / f"{aid}_{name}").exists()
    report = json.loads((out / "report.json").read_text())
    for entry in report["atlases"]:
        assert {"seconds", "similarity", "folding_fraction"} <= set(entry)
    assert Grid.from_json(report["grid"]).isclose(Grid.from_image(brains[0][0]))
    # a bad override is a one-line error, exit status 2
    assert main(["register", "--atlases", str(root), "--target", str(tmp_path / "target.nii.gz"), "--out",
                 str(out), "--set", "bending_weight=abc"]) == 2


def test_very_different_field_of_view_is_warned_about(brains):
    img, lab = brains[1]
    small = [sitk.RegionOfInterest(x, [14, 14, 12], [23, 23, 16]) for x in (img, lab)]
    params = get_params("fast", stage="affine", affine_shrink=(2.0,), affine_iterations=(5,))
    with pytest.warns(UserWarning, match="atlas tiny: field of view"):
        ws = register(brains[0][0], [AtlasInput("tiny", *small), AtlasInput("ok", img, lab)], params=params,
                      device="cpu")
    assert ws.ids == ["tiny", "ok"]
    assert any("atlas tiny" in w for w in ws.info["warnings"]) and not any("atlas ok" in w for w in ws.info["warnings"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(brains):
    params = get_params("fast", **DEFORM)
    atlases = [AtlasInput("s1", *brains[1])]
    cpu = register(brains[0][0], atlases, params=params, device="cpu")
    gpu = register(brains[0][0], atlases, params=params, device="cuda")
    assert gpu.info["device"].startswith("cuda")
    assert np.abs(cpu.atlases[0].field - gpu.atlases[0].field).mean() < 0.05  # mm; float paths differ slightly
    assert (cpu.atlases[0].label == gpu.atlases[0].label).mean() > 0.99


def _sitk_level(img: sitk.Image, wg: Grid, factors) -> np.ndarray:
    """The SimpleITK pyramid level the torch one replaced (#20): BinShrink, then linear Resample, outside 0."""
    shrunk = sitk.BinShrink(img, [int(f) for f in factors]) if max(factors) > 1 else img
    return sitk.GetArrayFromImage(sitk.Resample(shrunk, wg.reference_image(), sitk.Transform(), sitk.sitkLinear,
                                                0.0, sitk.sitkFloat32))


def test_torch_pyramid_reproduces_simpleitk_on_oblique_anisotropic_grids(brains):
    """The working images come from the torch warp (avg-pool block average + grid_sample with ITK's edge rule):
    on a real brain re-gridded oblique and anisotropic they equal SimpleITK's BinShrink + Resample to 1e-4 of the
    [0, 1] range, per level."""
    from MASRefineLib.registration.pyramid import bin_shrink, downsample, resample_linear, working_grid
    from MASRefineLib.volume import Volume
    # sizes that the shrink factors do not divide (BinShrink drops the remainder: ITK's 0 band at the far end)
    vol = Volume.from_image(make_oblique(sitk.RegionOfInterest(brains[0][0], [57, 59, 43], [0, 0, 0])))
    vol = Volume(vol.tensor + 1.0, vol.grid)  # no dark border: a wrong edge rule (0 or edge value) shows as 1
    img = vol.to_image()
    zeros = 0
    unit = min(vol.grid.spacing)
    for shrink in (4.0, 3.0, 2.5, 2.0, 1.0):
        t, wg = downsample(vol, shrink * unit)
        assert wg == working_grid(vol.grid, shrink * unit)
        factors = [min(n, max(1, int(np.floor(w / s + 1e-6)))) for w, s, n in zip(wg.spacing, vol.grid.spacing,
                                                                                     vol.grid.size)]
        ref = _sitk_level(img, wg, factors) if wg != vol.grid else sitk.GetArrayFromImage(img)
        assert np.abs(t.numpy() - ref).max() < 1e-4, shrink
        zeros += int((ref == 0).sum())
    assert zeros > 0  # some working voxels lie more than half a voxel outside the shrunk image: ITK's 0 band
    shrunk, sgrid = bin_shrink(vol.tensor, vol.grid, (2, 2, 1))
    np.testing.assert_allclose(shrunk.numpy(), sitk.GetArrayFromImage(sitk.BinShrink(img, [2, 2, 1])), atol=1e-6)
    assert sgrid.isclose(Grid.from_image(sitk.BinShrink(img, [2, 2, 1])))
    # the 1D-separable path is the warp's trilinear grid_sample (border padding) where ITK's mask keeps a voxel
    from MASRefineLib.warp import sample
    wg = working_grid(vol.grid, 3.0 * unit)
    fast = resample_linear(vol.tensor, vol.grid, wg)
    slow = sample(vol.tensor[None, None], vol.grid, grid_points(wg), padding="border")[0, 0]
    kept = fast != 0
    assert kept.float().mean() > 0.5 and float((fast - slow)[kept].abs().max()) < 1e-5


def test_a_volume_target_registers_as_its_sitk_image(brains):
    """register(Volume) (normalised once, when read) gives what register(sitk.Image) gives (normalised inside)."""
    from MASRefineLib.volume import Volume
    target, _ = brains[0]
    atlas, atlas_lab = brains[1]
    params = get_params("fast", **AFFINE)
    a = register(target, [AtlasInput("a", atlas, atlas_lab)], params=params, device="cpu").atlases[0]
    b = register(Volume.from_image(target), [AtlasInput("a", Volume.from_image(atlas), Volume.from_label(atlas_lab))],
                 params=params, device="cpu").atlases[0]
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.field, b.field, atol=1e-5)
    assert a.label_tensor.dtype == torch.uint8  # compact label values in the WarpedSet


def test_registration_of_volumes_neither_normalises_again_nor_resamples_with_simpleitk(brains, monkeypatch):
    """The walk of a target read once (volume.read_image) through registration: no second normalisation, no
    SimpleITK resampling, no numpy round trip of the target (#20, issue 20's done-when)."""
    from MASRefineLib import imageio
    from MASRefineLib.volume import Volume
    target, _ = brains[0]
    atlas, atlas_lab = brains[1]
    tv, av, al = Volume.from_image(target), Volume.from_image(atlas), Volume.from_label(atlas_lab)

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"{name} called on the walk of a Volume")
        return f
    for mod, name in ((sitk, "Resample"), (sitk, "BinShrink"), (sitk, "GetArrayFromImage"),
                      (sitk, "GetImageFromArray"), (imageio, "normalize_intensity")):
        monkeypatch.setattr(mod, name, forbidden(f"{mod.__name__}.{name}"))
    ws = register(tv, [AtlasInput("a", av, al)], params=get_params("fast", **AFFINE), device="cpu")
    assert ws.target_grid == tv.grid and ws.atlases[0].info["ncc"] > 0.5


# -- the greedy-style optimiser (deform_optimizer="greedy", #21) --------------------------------------------

# greedy's schedule shortened for 4 mm test images: levels 2 and 1 v (its 4 v level would be 15 voxels wide)
GREEDY = dict(affine_shrink=(2.0,), affine_iterations=(40,), deform_shrink=(2.0, 1.0), control_shrink=(2.0, 1.0),
              deform_iterations=(30, 15))


def _mean_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    vals = [v for v in np.unique(ref) if v]
    return float(np.mean([2 * ((pred == v) & (ref == v)).sum() / ((pred == v).sum() + (ref == v).sum()) for v in vals]))


def test_greedy_optimizer_improves_on_the_affine_and_is_deterministic(brains):
    """Another subject's brain registered with greedy's algorithm: labels and intensities match the target
    much better than after the affine alone (same affine), the field does not fold, and a rerun is bitwise equal."""
    (target, target_lab), atlas = brains[0], AtlasInput("s1", *brains[1])
    ref = sitk.GetArrayFromImage(target_lab)
    aff = register(target, [atlas], params=get_params("greedy", **GREEDY, stage="affine"), device="cpu").atlases[0]
    params = get_params("greedy", **GREEDY)
    assert params.deform_optimizer == "greedy"
    g = register(target, [atlas], params=params, device="cpu").atlases[0]
    np.testing.assert_allclose(g.info["matrix"], aff.info["matrix"])  # the same affine underneath
    d_aff, d_g = _mean_dice(aff.label, ref), _mean_dice(g.label, ref)
    assert d_g > d_aff + 0.08, (d_aff, d_g)
    assert g.info["ncc"] > aff.info["ncc"] + 0.03, (aff.info["ncc"], g.info["ncc"])
    assert g.info["folding_fraction"] < 1e-3
    again = register(target, [atlas], params=params, device="cpu").atlases[0]
    np.testing.assert_array_equal(again.field, g.field)


def test_greedy_optimizer_batch_equals_one_by_one(brains):
    """Each atlas's update is normalised by its own longest vector: batching changes nothing."""
    target = brains[0][0]
    atlases = [AtlasInput(f"s{i}", *brains[i]) for i in (1, 2)]
    params = get_params("greedy", affine_shrink=(1.5,), affine_iterations=(20,), deform_shrink=(1.5,),
                        control_shrink=(1.5,), deform_iterations=(20,))
    both = register(target, atlases, params=params, device="cpu")
    for i, a in enumerate(atlases):
        one = register(target, [a], params=params, device="cpu")
        np.testing.assert_allclose(one.atlases[0].field, both.atlases[i].field, atol=2e-3)
        assert (one.atlases[0].label == both.atlases[i].label).mean() > 0.999


def test_greedy_parameters_leave_the_adam_presets_as_they_were():
    """The greedy knobs only appear (reports, benchmark cache keys) when the greedy optimiser is selected, and
    combinations it does not have are refused."""
    for name in ("fast", "default", "accurate"):
        js = get_params(name).to_json()
        assert get_params(name).deform_optimizer == "adam"
        assert not [k for k in js if k.startswith("greedy_") or k == "deform_optimizer"]
    g = get_params("greedy")
    assert g.to_json()["deform_optimizer"] == "greedy" and g.deform_iterations == (100, 50, 10)
    assert g.deform_shrink == (4.0, 2.0, 1.0) and g.lncc_window == 5
    assert (g.greedy_sigma_pre, g.greedy_sigma_post, g.greedy_step) == pytest.approx((1.732, 0.7071, 1.0), abs=1e-3)
    with pytest.raises(MASRefineError, match="diffeomorphic"):
        get_params("greedy", diffeomorphic="true")
    with pytest.raises(MASRefineError, match="deform_optimizer"):
        get_params("default", deform_optimizer="lbfgs")
    with pytest.raises(MASRefineError, match="greedy_step"):
        get_params("greedy", greedy_step=0)


def test_gaussian_smoothing_of_fields():
    """greedy's smoothing as we do it: constants and (inside) linear ramps kept, sum of an impulse kept away
    from the border, spread sigma^2 per axis."""
    from MASRefineLib.registration.deformable import gaussian_smooth
    const = torch.full((2, 3, 9, 10, 11), 2.5)
    torch.testing.assert_close(gaussian_smooth(const, 1.732), const)
    ramp = torch.arange(30.0).view(1, 1, 1, 1, 30).expand(1, 1, 3, 4, 30).contiguous()
    sm = gaussian_smooth(ramp, 0.7071)
    torch.testing.assert_close(sm[..., 5:-5], ramp[..., 5:-5], atol=1e-4, rtol=0)
    imp = torch.zeros(1, 1, 31, 31, 31)
    imp[0, 0, 15, 15, 15] = 1.0
    out = gaussian_smooth(imp, 1.732)[0, 0]
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    x = torch.arange(31.0) - 15
    var_x = (out.sum((0, 1)) * x * x).sum().item()
    assert var_x == pytest.approx(1.732 ** 2, rel=0.02)
    assert gaussian_smooth(imp, 0.0) is imp


def test_gaussian_smoothing_is_monai_separable_filtering_with_replicate_borders():
    """Why gaussian_smooth is ours (its docstring): MONAI's GaussianFilter pads with zeros, so it pulls a
    field toward 0 at the border (a constant field loses most of its value in a corner); MONAI's
    separable_filtering with replicate padding and the same sampled, normalised kernel is the same numbers."""
    from monai.networks.layers import GaussianFilter, separable_filtering
    from monai.networks.layers.convutils import gaussian_1d
    from MASRefineLib.registration.deformable import gaussian_smooth
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 20, 24, 22, generator=g)
    for sigma in (0.7071, 1.732):
        k = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="sampled", normalize=True)
        theirs = separable_filtering(f.reshape(6, 1, *f.shape[2:]), [k] * 3, mode="replicate").reshape(f.shape)
        torch.testing.assert_close(gaussian_smooth(f, sigma), theirs, atol=1e-5, rtol=0)
        const = torch.ones(1, 1, 12, 12, 12)
        assert GaussianFilter(3, sigma, truncated=4.0, approx="sampled")(const).min().item() < 0.6
        assert gaussian_smooth(const, sigma).min().item() == pytest.approx(1.0, abs=1e-6)


def test_register_command_offers_every_preset():
    """``masrefine register --preset`` lists its choices by hand (building the parser must not import torch);
    they are the registration presets, no more, no fewer."""
    from MASRefineLib.cli import build_parser
    from MASRefineLib.registration import PRESETS
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    preset = next(a for a in sub.choices["register"]._actions if a.dest == "preset")
    assert set(preset.choices) == set(PRESETS)


def test_every_segment_preset_is_a_registration_preset():
    """``segment --preset`` (protocol.jobs.PARAMETERS) names the registration preset its Register stage runs:
    each choice must exist there, and ``greedy`` selects the greedy-style optimiser for the deformable stage."""
    from MASRefineLib.pipeline import PRESETS as SEGMENT_PRESETS, SegmentOptions
    assert set(SEGMENT_PRESETS) <= set(PRESETS)
    opts = SegmentOptions(preset="greedy")
    assert get_params(opts.preset, stage="deformable").deform_optimizer == "greedy"
    assert get_params(SegmentOptions().preset, stage="deformable").deform_optimizer == "adam"


def test_deformable_unit_floor_scales_the_levels(brains):
    """``deform_min_unit_mm``: on a 4 mm brain a floor of 8 mm counts the deformable levels in 8 mm, i.e. the same
    registration as levels twice as coarse in the target's own voxels (bitwise); a floor below the voxel size
    changes nothing, and it stays out of the reports of presets that do not set it."""
    target, atlas = brains[0][0], AtlasInput("s1", *brains[1])
    base = dict(affine_shrink=(2.0,), affine_iterations=(10,), deform_iterations=(8, 4))
    floored = get_params("greedy", **base, deform_shrink=(1.5, 1.0), control_shrink=(1.5, 1.0), deform_min_unit_mm=8.0)
    by_hand = get_params("greedy", **base, deform_shrink=(3.0, 2.0), control_shrink=(3.0, 2.0), deform_min_unit_mm=0.0)
    a = register(target, [atlas], params=floored, device="cpu").atlases[0]
    b = register(target, [atlas], params=by_hand, device="cpu").atlases[0]
    np.testing.assert_array_equal(a.field, b.field)
    low = get_params("greedy", **base, deform_shrink=(1.5, 1.0), control_shrink=(1.5, 1.0), deform_min_unit_mm=1.4)
    none = get_params("greedy", **base, deform_shrink=(1.5, 1.0), control_shrink=(1.5, 1.0), deform_min_unit_mm=0.0)
    np.testing.assert_array_equal(register(target, [atlas], params=low, device="cpu").atlases[0].field,
                                  register(target, [atlas], params=none, device="cpu").atlases[0].field)
    assert "deform_min_unit_mm" not in get_params("default").to_json()
    assert get_params("greedy").to_json()["deform_min_unit_mm"] == pytest.approx(1.4)
    with pytest.raises(MASRefineError, match="deform_min_unit_mm"):
        get_params("greedy", deform_min_unit_mm=-1)
