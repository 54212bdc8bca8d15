"""VoteNet++ refinement (Eq. 3-6) on a real brain crop with a known smooth misalignment.

The atlas *is* the target subject, and its pre-registration field is a known smooth, wrong field:
the correct total field is the identity, so the error of the composed field (mm) is measurable.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib.errors import Cancelled, MASRefineError
from MASRefineLib.geometry import Grid
from MASRefineLib.imageio import normalize_intensity
from MASRefineLib.labels import LabelTable
from MASRefineLib.losses import bending_energy, folding_barrier
from cancelling import cancel_after
from MASRefineLib.refine import default_spacings, gamma_from_paper, refine
from MASRefineLib.warp import grid_points, image_tensor, warp, warp_labels
from MASRefineLib.warped import WarpedAtlas, WarpedSet

# working grids 8 / 4 mm (4x and 2x the crops' 2 mm; the default would be 4 / 2 mm on these small crops)
FAST = dict(iterations=(30, 15), spacings_mm=(8.0, 4.0))


def refinement_field_error(total: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean Euclidean distance (mm) between two fields (B, 3, ...), optionally within a mask (B or 1, ...)."""
    d = (total - truth).norm(dim=1)
    if mask is not None:
        m = mask.to(d.dtype).expand_as(d)
        return float((d * m).sum() / m.sum().clamp(min=1))
    return float(d.mean())


def normalized_displacement(field_mm: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The field in the authors' units: (B, 3, Z, Y, X) displacements along the index axes in ``grid_sample``
    normalised coordinates (align_corners), i.e. component ``c`` divided by ``(n_c - 1) * s_c / 2`` mm."""
    d = torch.as_tensor(grid.direction_matrix, dtype=field_mm.dtype, device=field_mm.device)
    along = torch.einsum("ac,bazyx->bczyx", d, field_mm)  # LPS -> index-axis components, still mm
    half = torch.as_tensor([(n - 1) * s / 2.0 for n, s in zip(grid.size, grid.spacing)], dtype=field_mm.dtype,
                           device=field_mm.device)
    return along / half.view(1, 3, 1, 1, 1)


class IntensityClasses:
    """A stand-in surrogate segmenter: soft dark/mid/bright classes of the (3-voxel box-smoothed) normalised
    intensity. Like a U-Net's predictions it is imperfect but consistent between images, which is all
    Eq. 5 needs."""

    def predict(self, images, grid, out_grid=None):
        x = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(images, (1,) * 6, mode="replicate"), 3, stride=1)
        x = x if out_grid is None or out_grid == grid else warp(x, grid, None, out_grid, padding="border")
        centres = torch.tensor([0.05, 0.35, 0.7], dtype=x.dtype).view(1, 3, 1, 1, 1)
        return torch.softmax(-((x - centres) ** 2) / 0.01, 1)


def _smooth_misalignment(grid: Grid) -> torch.Tensor:
    """A smooth, non-affine field (mm): a Gaussian bump (sigma 20 mm) with rotating direction, max ~4 mm."""
    pts = grid_points(grid)
    c = torch.as_tensor(grid.center_mm(), dtype=torch.float32)
    bump = torch.exp(-((pts - c) ** 2).sum(-1) / (2 * 20.0 ** 2))
    u = torch.stack([3.0 * bump, -2.0 * bump * torch.sin((pts[..., 2] - c[2]) / 15),
                     2.5 * bump * torch.cos((pts[..., 0] - c[0]) / 20)], 0)
    return u.unsqueeze(0)


@pytest.fixture(scope="module")
def case(ixi_crop, tmp_path_factory):
    img, lab = ixi_crop
    d = tmp_path_factory.mktemp("refine_case")
    sitk.WriteImage(img, str(d / "atlas.nii.gz"))
    sitk.WriteImage(sitk.Cast(lab, sitk.sitkUInt16), str(d / "atlas_label.nii.gz"))
    grid = Grid.from_image(img)
    arr = normalize_intensity(sitk.GetArrayFromImage(img))
    labels = sitk.GetArrayFromImage(lab).astype(np.int64)
    u = _smooth_misalignment(grid)
    wimg = warp(image_tensor(arr), grid, u, grid)[0, 0].numpy()
    wlab = warp_labels(torch.as_tensor(labels)[None, None], grid, u, grid)[0, 0].numpy().astype(np.uint16)
    table = LabelTable.from_values(np.unique(labels))
    ws = WarpedSet(grid, table, [WarpedAtlas("a", wimg, wlab, u[0].numpy(), str(d / "atlas.nii.gz"),
                                             str(d / "atlas_label.nii.gz"), {"seconds": 1.0})], "deformable")
    mask = torch.as_tensor(labels > 0)[None]
    return {"ws": ws, "target": arr, "labels": labels, "u": u, "mask": mask, "dir": d, "image": img}


@pytest.fixture(scope="module")
def refined_I(case):
    return refine(case["ws"], case["target"], "I", device="cpu", **FAST)


def _error(ws: WarpedSet, case) -> float:
    total = torch.as_tensor(ws.atlases[0].field)[None]
    return refinement_field_error(total, torch.zeros_like(total), case["mask"])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    vals = [v for v in np.unique(b) if v > 0]
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in vals]))


def test_known_smooth_misalignment_is_undone(case, refined_I):
    before = refinement_field_error(case["u"], torch.zeros_like(case["u"]), case["mask"])
    after = _error(refined_I, case)
    assert before > 0.5
    assert after < 0.7 * before, (before, after)
    a = refined_I.atlases[0]
    r = a.info["refinement"]
    assert r["similarity_after"] < r["similarity_before"]
    assert r["resampled_from"] == "source" and refined_I.stage == "refined-I"
    assert a.info["folding_fraction"] < 1e-3
    assert a.info["seconds"] > 0 and a.info["pre_refinement"]["seconds"] == 1.0
    # the label map, warped once from the original atlas, matches the truth better than before
    assert _dice(a.label, case["labels"]) > _dice(case["ws"].atlases[0].label, case["labels"]) + 0.02
    assert set(np.unique(a.label)) <= set(np.unique(case["labels"]))
    assert a.image.shape == refined_I.target_grid.shape and a.image.dtype == np.float32


@pytest.mark.parametrize("similarity", ["ncc", "lncc"])
def test_either_similarity_undoes_the_misalignment_and_leaves_an_aligned_atlas_in_place(case, similarity):
    out = refine(case["ws"], case["target"], "I", similarity=similarity, device="cpu", **FAST)
    before = refinement_field_error(case["u"], torch.zeros_like(case["u"]), case["mask"])
    assert _error(out, case) < 0.5 * before, (similarity, before, _error(out, case))
    assert out.atlases[0].info["refinement"]["similarity"] == similarity
    # the atlas already exactly on the target: the identity must be the optimum of the image term. (Local NCC
    # with a variance floor of 1e-5 moved this atlas 1.5 mm on average: losses.LNCC_EPS.)
    a = case["ws"].atlases[0]
    aligned = WarpedSet(case["ws"].target_grid, case["ws"].label_table,
                        [WarpedAtlas("a", case["target"].astype(np.float32), case["labels"].astype(np.uint16),
                                     np.zeros_like(a.field), a.source_image, a.source_label, {"seconds": 1.0})],
                        "deformable")
    still = refine(aligned, case["target"], "I", similarity=similarity, device="cpu", **FAST)
    assert _error(still, case) < 0.05, (similarity, _error(still, case))


def test_alpha_zero_equals_variant_I_and_IS_optimises_the_segmentation_term(case, refined_I):
    seg = IntensityClasses()
    zero = refine(case["ws"], case["target"], "IS", alpha=0.0, segmenter=seg, device="cpu", **FAST)
    np.testing.assert_allclose(zero.atlases[0].field, refined_I.atlases[0].field, atol=1e-4)
    r = zero.atlases[0].info["refinement"]
    assert r["segmentation_before"] is not None and zero.stage == "refined-IS"
    full = refine(case["ws"], case["target"], "IS", alpha=3.0, segmenter=seg, device="cpu", **FAST)
    r = full.atlases[0].info["refinement"]
    assert r["segmentation_after"] < r["segmentation_before"] - 0.005
    assert r["segmentation_after"] < zero.atlases[0].info["refinement"]["segmentation_after"]


def test_large_gamma_keeps_the_refinement_near_zero(case, refined_I):
    stiff = refine(case["ws"], case["target"], "I", gamma=1e6, device="cpu", **FAST)
    r, r0 = stiff.atlases[0].info["refinement"], refined_I.atlases[0].info["refinement"]
    # bending energy has an affine null space: a huge gamma leaves at most a small near-affine move
    assert r["max_displacement_mm"] < 0.35 * r0["max_displacement_mm"]
    assert r["max_displacement_mm"] < 1.0
    assert r["bending_after_mm-2"] < 1e-3 * r0["bending_after_mm-2"]


def test_gamma_conversion_matches_the_normalised_convention():
    grid = Grid((40, 40, 40), (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    u = _smooth_misalignment(grid).double()
    e_mm = bending_energy(u, grid.spacing)
    e_norm = bending_energy(normalized_displacement(u, grid), (1.0, 1.0, 1.0))  # per voxel, normalised units
    # Eq. 6 taken literally on the normalised field: the factor s^4 mean_c(1 / L_c^2) that gamma_from_paper builds on
    half = (np.asarray(grid.size, np.float64) - 1.0) * np.asarray(grid.spacing, np.float64) / 2.0
    g = 20000.0 * 0.7 ** 4 * float(np.mean(1.0 / half ** 2))
    assert float(g * e_mm) == pytest.approx(float(20000.0 * e_norm), rel=1e-6)
    assert gamma_from_paper(20000.0, grid) == pytest.approx(g * (7.0 / 27.0), rel=1e-12)  # cubic grid: all weights 1
    # the authors' knee grid: 20000 in their code is a fraction of a mm^2 in ours
    knee = Grid((160, 200, 200), (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert 0.3 < gamma_from_paper(20000.0, knee) < 0.5


def _deepatlas_bending(v: torch.Tensor) -> torch.Tensor:
    """Test oracle: the authors' bending energy (DeepAtlas ``BendingEnergyLoss``, L2, unit spacing, cubic
    grid so every weight is 1), re-typed from its published formula, on a normalised field (N, 3, D, H, W)."""
    c = v[:, :, 1:-1, 1:-1, 1:-1]
    ddx = v[:, :, 2:, 1:-1, 1:-1] + v[:, :, :-2, 1:-1, 1:-1] - 2 * c
    ddy = v[:, :, 1:-1, 2:, 1:-1] + v[:, :, 1:-1, :-2, 1:-1] - 2 * c
    ddz = v[:, :, 1:-1, 1:-1, 2:] + v[:, :, 1:-1, 1:-1, :-2] - 2 * c
    dxdy = v[:, :, 2:, 2:, 1:-1] + v[:, :, :-2, :-2, 1:-1] - v[:, :, 2:, :-2, 1:-1] - v[:, :, :-2, 2:, 1:-1]
    dydz = v[:, :, 1:-1, 2:, 2:] + v[:, :, 1:-1, :-2, :-2] - v[:, :, 1:-1, 2:, :-2] - v[:, :, 1:-1, :-2, 2:]
    dxdz = v[:, :, 2:, 1:-1, 2:] + v[:, :, :-2, 1:-1, :-2] - v[:, :, 2:, 1:-1, :-2] - v[:, :, :-2, 1:-1, 2:]
    m = [(t ** 2).flatten(2).mean(2).mean() for t in (ddx, ddy, ddz, dxdy, dydz, dxdz)]
    return (m[0] + m[1] + m[2] + 2 * m[3] + 2 * m[4] + 2 * m[5]) / 9.0


def test_deepatlas_convention_factor_on_a_smooth_isotropic_field():
    """gamma_from_paper predicts the authors' energy from ours on a smooth random field with
    no preferred direction (the 7/27 factor of its docstring)."""
    torch.manual_seed(0)
    grid = Grid((48, 48, 48), (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    u = torch.randn(1, 3, 48, 48, 48, dtype=torch.float64)
    for _ in range(6):  # isotropic smoothing
        u = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(u, (2,) * 6, mode="replicate"), 5, stride=1)
    e_deepatlas = float(_deepatlas_bending(normalized_displacement(u, grid)))
    e_mm = float(bending_energy(u, grid.spacing))
    assert gamma_from_paper(1.0, grid) * e_mm == pytest.approx(e_deepatlas, rel=0.25)


def test_variant_IS_needs_a_segmenter_and_cancellation_stops(case):
    with pytest.raises(MASRefineError, match="segmenter"):
        refine(case["ws"], case["target"], "IS", device="cpu")
    with pytest.raises(MASRefineError, match="variant"):
        refine(case["ws"], case["target"], "X", device="cpu")
    with pytest.raises(Cancelled):
        refine(case["ws"], case["target"], "I", device="cpu", progress=cancel_after(3), **FAST)


def test_refine_cli_reads_register_output_and_writes_the_same_layout(case, tmp_path):
    from MASRefineLib.cli import main
    reg, out = tmp_path / "registered", tmp_path / "refined"
    case["ws"].save(reg)
    sitk.WriteImage(case["image"], str(tmp_path / "target.nii.gz"))
    rc = main(["refine", "--registered", str(reg), "--target", str(tmp_path / "target.nii.gz"), "--out", str(out),
               "--variant", "I", "--iterations", "8", "4", "--spacings", "4", "2", "--similarity", "ncc",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    settings = report["atlases"][0]["refinement"]
    assert report["stage"] == "refined-I" and settings["variant"] == "I" and settings["similarity"] == "ncc"
    back = WarpedSet.load(out)
    assert back.atlases[0].label.shape == case["ws"].target_grid.shape
    # IS without any segmenter is a one-line error naming the folder
    assert main(["refine", "--registered", str(reg), "--target", str(tmp_path / "target.nii.gz"), "--out",
                 str(tmp_path / "x"), "--variant", "IS", "--quiet"]) == 2


def test_folding_barrier_keeps_an_inter_subject_refinement_unfolded(ixi_dir, ixi_ids, case):
    """Inter-subject refinement (another subject's crop, identity pre-registration, a large misalignment):
    Eq. 3 alone (folding weight 0) folds the refinement field; with the default folding barrier the field
    has (almost) no folded voxel and still improves the similarity."""
    from conftest import crop, ixi_paths
    grid = case["ws"].target_grid
    img_p, lab_p = ixi_paths(ixi_dir, ixi_ids[1])
    img = crop(sitk.ReadImage(str(img_p), sitk.sitkFloat32), (36, 36, 25), (48, 48, 40))
    lab = crop(sitk.ReadImage(str(lab_p)), (36, 36, 25), (48, 48, 40))
    g2 = Grid.from_image(img)
    arr = warp(image_tensor(normalize_intensity(sitk.GetArrayFromImage(img))), g2, None, grid)[0, 0].numpy()
    labels = warp_labels(torch.as_tensor(sitk.GetArrayFromImage(lab).astype(np.int64))[None, None], g2, None,
                         grid)[0, 0].numpy().astype(np.uint16)
    ws = WarpedSet(grid, LabelTable.from_values(np.unique(labels)),
                   [WarpedAtlas("b", arr, labels, np.zeros((3, *grid.shape), np.float32), None, None, {})], "affine")
    plain = refine(ws, case["target"], "I", folding_weight=0.0, device="cpu", **FAST).atlases[0].info["refinement"]
    safe = refine(ws, case["target"], "I", device="cpu", **FAST).atlases[0]
    r = safe.info["refinement"]
    assert plain["folding_fraction_refinement_only"] > 1e-2  # the problem is real on this pair
    assert r["folding_fraction_refinement_only"] < 1e-3
    assert safe.info["folding_fraction"] < 1e-3  # identity pre-registration: total = refinement
    assert r["similarity_after"] < r["similarity_before"] - 0.01
    assert r["folding_weight"] > 0


def test_folding_barrier_is_zero_without_folding_and_penalises_a_fold(case):
    grid = case["ws"].target_grid
    u = case["u"]  # smooth, no folding
    assert float(folding_barrier(u, grid)[0]) == 0.0
    folded = u.clone()
    folded[:, 0] = folded[:, 0] - 3.0 * grid_points(grid)[..., 0]  # du_x/dx = -3: every voxel inverted
    assert float(folding_barrier(folded, grid)[0]) > 1.0
    # on every second voxel (the control nodes) it sees the same fold
    assert float(folding_barrier(folded, grid, stride=2)[0]) > 1.0
    assert float(folding_barrier(u, grid, stride=2)[0]) == 0.0


def test_poor_surrogate_segmenter_is_warned_about(case, caplog):
    from types import SimpleNamespace

    from MASRefineLib.refine import SURROGATE_MIN_DICE, surrogate_warning

    poor = SimpleNamespace(meta={"validation": {"mean_dice": 0.11}})
    msg = surrogate_warning(poor)
    assert msg and "0.11" in msg and "--epochs" in msg and "\n" not in msg
    assert surrogate_warning(SimpleNamespace(meta={"validation": {"mean_dice": SURROGATE_MIN_DICE + 0.1}})) is None
    # just below the threshold it must not read "0.50 (below 0.5)"
    assert "is 0.499 (below" in surrogate_warning(SimpleNamespace(meta={"validation": {"mean_dice": 0.4987}}))
    assert surrogate_warning(SimpleNamespace(meta={})) is None  # nothing stored: nothing to judge
    # refine() itself logs it (so the pipeline, the worker's events and 'masrefine refine' show it)
    seg = IntensityClasses()
    seg.meta = poor.meta
    with caplog.at_level("WARNING", logger="MASRefineLib.refine"), pytest.raises(Cancelled):
        refine(case["ws"], case["target"], "IS", segmenter=seg, device="cpu", progress=cancel_after(1), **FAST)
    assert any("validation Dice is 0.11" in r.getMessage() for r in caplog.records)


def test_is_leaves_out_the_structures_the_surrogate_cannot_segment(case, refined_I, caplog):
    from MASRefineLib.refine import surrogate_structures

    seg = IntensityClasses()
    seg.label_values = [0, 10, 20]
    seg.meta = {"validation": {"mean_dice": 0.3, "dice_per_label": {"10": 0.9, "20": 0.1}}}
    assert surrogate_structures(seg) == [1] and surrogate_structures(seg, 0.0) is None
    with caplog.at_level("WARNING", logger="MASRefineLib.refine"):
        part = refine(case["ws"], case["target"], "IS", segmenter=seg, device="cpu", **FAST)
    assert any("only the 1 of 2 structures" in r.getMessage() for r in caplog.records)
    r = part.atlases[0].info["refinement"]
    assert r["segmentation_structures"] == [10] and r["segmentation_min_dice"] == 0.5

    class FirstStructureOnly(IntensityClasses):  # the same surrogate without the unreliable class
        def predict(self, images, grid, out_grid=None):
            return super().predict(images, grid, out_grid)[:, :2]

    alone = refine(case["ws"], case["target"], "IS", segmenter=FirstStructureOnly(), device="cpu", seg_min_dice=0.0,
                   **FAST)
    assert alone.atlases[0].info["refinement"]["segmentation_structures"] is None
    assert r["segmentation_before"] == pytest.approx(alone.atlases[0].info["refinement"]["segmentation_before"])
    np.testing.assert_allclose(part.atlases[0].field, alone.atlases[0].field, atol=1e-4)
    # with every structure kept (the paper) the Dice term is a different one
    every = refine(case["ws"], case["target"], "IS", segmenter=seg, device="cpu", seg_min_dice=0.0, **FAST)
    assert abs(every.atlases[0].info["refinement"]["segmentation_before"] - r["segmentation_before"]) > 1e-3
    # no structure good enough: IS is I
    seg.meta = {"validation": {"mean_dice": 0.15, "dice_per_label": {"10": 0.2, "20": 0.1}}}
    none = refine(case["ws"], case["target"], "IS", segmenter=seg, device="cpu", **FAST)
    assert none.atlases[0].info["refinement"]["segmentation_structures"] == []
    np.testing.assert_allclose(none.atlases[0].field, refined_I.atlases[0].field, atol=1e-4)


def test_refine_records_exactly_the_settings_resolve_settings_gives(case, refined_I):
    """``resolve_settings`` is the one place defaults are resolved (a cache check relies on it): what
    ``refine`` records must equal it, for I with every default and for IS with a structure subset."""
    from MASRefineLib.refine import resolve_settings

    grid = case["ws"].target_grid
    rec = refined_I.atlases[0].info["refinement"]
    settings, levels, structures = resolve_settings(grid, "i", **FAST)
    assert structures is None and len(levels) == len(settings.iterations)
    assert {k: rec[k] for k in settings.to_json()} == settings.to_json()
    seg = IntensityClasses()
    seg.label_values = [0, 10, 20]
    seg.meta = {"validation": {"mean_dice": 0.6, "dice_per_label": {"10": 0.4, "20": 0.8}}}
    settings, _, structures = resolve_settings(grid, "IS", segmenter=seg, **FAST)
    assert structures == [2] and settings.seg_structures == (20,)
    out = refine(case["ws"], case["target"], "IS", segmenter=seg, device="cpu", **FAST)
    rec = out.atlases[0].info["refinement"]
    assert {k: rec[k] for k in settings.to_json()} == settings.to_json()
    for bad, match in (({"iterations": (5, 5, 5)}, "3 iteration counts for 2"), ({"gamma": -1.0}, "non-negative"),
                       ({"variant": "X"}, "variant 'X'")):
        kw = {**FAST, **bad}
        with pytest.raises(MASRefineError, match=match):
            resolve_settings(grid, kw.pop("variant", "I"), **kw)


def test_local_ncc_similarity_is_optimised_and_unknown_ones_refused(case):
    with pytest.raises(MASRefineError, match="similarity 'mi'"):
        refine(case["ws"], case["target"], "I", similarity="mi", device="cpu", **FAST)
    out = refine(case["ws"], case["target"], "I", similarity="lncc", device="cpu", **FAST)
    r = out.atlases[0].info["refinement"]
    assert r["similarity"] == "lncc" and r["similarity_after"] < r["similarity_before"] - 0.01


def test_default_working_grids_follow_the_voxel_budget():
    """The finest default working grid is the target's own when it has at most 1.5 M voxels (a 2 mm brain),
    else 2x, 4x, ... (a 0.7 mm knee at 1.4 mm); the coarse level is twice the finest."""
    brain = Grid((120, 120, 90), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    knee = Grid((200, 200, 160), (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert np.allclose(default_spacings(brain), (4.0, 2.0))
    assert np.allclose(default_spacings(knee), (2.8, 1.4))
    assert np.allclose(default_spacings(knee, max_voxels=100_000), (5.6, 2.8))
    # anisotropic: the geometric-mean spacing, so the voxel count is what the budget says
    aniso = Grid((256, 256, 40), (0.5, 0.5, 4.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    fine = default_spacings(aniso)[1]
    assert np.isclose(fine, 2.0) and np.prod(aniso.size) * np.prod(aniso.spacing) / fine ** 3 <= 1_500_000
