"""Segmentation metrics (Dice, surface Dice, ASD, HD95): hand-computed boxes on anisotropic grids, the
label-box crop against MONAI on whole real IXI label maps, exact properties of identity and known shifts,
missing labels, grid checks and the CLI."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib.cli import main
from MASRefineLib.errors import MASRefineError
from MASRefineLib.imageio import write_image
from MASRefineLib.metrics import (ABSENT, MISSING_IN_PRED, MISSING_IN_REF, OK, evaluate, evaluate_files,
                                  format_table, label_metrics)

from conftest import crop, ixi_paths, make_oblique

ANISO = (1.3, 0.9, 2.1)  # (x, y, z) mm
SP = (0.6, 1.1, 2.3)  # (x, y, z) mm: x the finest, so a one-voxel step along x is the nearest surface
N = 7  # box side in voxels


def _box(shape, lo, hi, value=1) -> np.ndarray:
    """A label map (z, y, x) holding ``value`` on the box [lo, hi) (array order)."""
    a = np.zeros(shape, np.uint16)
    a[tuple(slice(p, q) for p, q in zip(lo, hi))] = value
    return a


def _n_surface(a: int, b: int, c: int) -> int:
    """Border voxels of an a x b x c box (outside the box is background, also beyond the array)."""
    return a * b * c - max(a - 2, 0) * max(b - 2, 0) * max(c - 2, 0)


def test_box_shifted_one_voxel_along_x_by_hand():
    """A 7^3 box and the same box one voxel further along x (0.6 mm; y 1.1, z 2.3 mm). Each box's leading x
    face (N^2 voxels) and the inside of its trailing x face ((N-2)^2) lie 0.6 mm from the other surface;
    every other border voxel is also a border voxel of the other box (0 mm)."""
    ref = _box((12, 12, 12), (2, 2, 2), (2 + N, 2 + N, 2 + N))
    pred = _box((12, 12, 12), (2, 2, 3), (2 + N, 2 + N, 3 + N))
    far = N * N + (N - 2) ** 2  # per direction, at 0.6 mm
    total = _n_surface(N, N, N)  # per direction
    for tol, sd in ((0.6, 1.0), (0.59, 1 - far / total), (0.0, 1 - far / total)):
        m = label_metrics(pred, ref, SP, tolerance_mm=tol)[1]
        assert m.status == OK
        assert m.dice == pytest.approx((N - 1) / N, abs=1e-12)
        assert m.surface_dice == pytest.approx(sd, abs=1e-12), tol  # a distance equal to the tolerance is within
        assert m.asd_mm == pytest.approx(0.6 * far / total, rel=1e-6)  # 34 % of the border at 0.6 mm
        assert m.hd95_mm == pytest.approx(0.6, rel=1e-6)
        assert m.volume_pred_mm3 == m.volume_ref_mm3 == pytest.approx(N ** 3 * 0.6 * 1.1 * 2.3)
    # the spacing is (x, y, z), the arrays (z, y, x): the same shift along z puts the leading z face 2.3 mm away,
    # and a voxel inside the trailing one i, j voxels from the box's x, y sides min(2.3, 0.6 i, 1.1 j) mm
    zshift = _box((12, 12, 12), (3, 2, 2), (3 + N, 2 + N, 2 + N))
    m = label_metrics(zshift, ref, SP)[1]
    inner = sum(min(2.3, 0.6 * min(i, N - 1 - i), 1.1 * min(j, N - 1 - j)) for i in range(1, N - 1) for j in range(1, N - 1))
    assert m.asd_mm == pytest.approx((N * N * 2.3 + inner) / total, rel=1e-6)
    assert m.hd95_mm == pytest.approx(2.3, rel=1e-6)


def test_asd_pools_both_directions_and_a_cut_structure_has_a_surface_along_the_cut():
    """The reference fills x = 0..N (touching the array's side), the prediction x = 0..N-1. Both have a
    border on the array's side x = 0 (outside is background), where they agree. Only the ends differ:
    d(ref -> pred) = 0.6 mm on the whole last face (N^2 voxels), d(pred -> ref) = 0.6 mm on the inside
    of its last face ((N-2)^2). ASD pools both (MONAI's symmetric ASD), not the mean of the two means."""
    ref = _box((N + 4, N + 4, N + 2), (2, 2, 0), (2 + N, 2 + N, N + 1))
    pred = _box((N + 4, N + 4, N + 2), (2, 2, 0), (2 + N, 2 + N, N))
    m = label_metrics(pred, ref, SP, tolerance_mm=0.3)[1]
    s_ref, s_pred = _n_surface(N + 1, N, N), _n_surface(N, N, N)
    far_ref, far_pred = N * N, (N - 2) ** 2
    assert m.asd_mm == pytest.approx(0.6 * (far_ref + far_pred) / (s_ref + s_pred), rel=1e-6)
    assert abs(m.asd_mm - 0.3 * (far_ref / s_ref + far_pred / s_pred)) > 1e-3  # the other definition
    assert m.surface_dice == pytest.approx(1 - (far_ref + far_pred) / (s_ref + s_pred), abs=1e-12)
    assert m.hd95_mm == pytest.approx(0.6, rel=1e-6)  # 27 % of the ref border is at 0.6 mm
    assert m.dice == pytest.approx(2 * N / (2 * N + 1), abs=1e-12)


def _perturbed(label: sitk.Image, angle: float = 0.06, shift_mm=(1.5, -1.0, 2.0)) -> sitk.Image:
    """The same label map moved by a small rigid transform (nearest neighbour) on the same grid:
    a realistic 'prediction' with boundary errors of a few voxels."""
    t = sitk.Euler3DTransform()
    t.SetCenter(label.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in label.GetSize()]))
    t.SetRotation(angle, -angle / 2, angle / 3)
    t.SetTranslation(shift_mm)
    return sitk.Resample(label, label, t, sitk.sitkNearestNeighbor, 0, label.GetPixelID())


@pytest.fixture(scope="module")
def ixi_label(ixi_dir, ixi_ids) -> sitk.Image:
    return sitk.ReadImage(str(ixi_paths(ixi_dir, ixi_ids[0])[1]), sitk.sitkUInt16)


@pytest.fixture(scope="module")
def pair(ixi_label):
    """(pred, ref) real label crops (56 x 52 x 44 voxels) on an anisotropic, oblique grid."""
    ref = crop(ixi_label, (32, 34, 22), (56, 52, 44))
    pred = _perturbed(ref)
    return make_oblique(pred, spacing=ANISO), make_oblique(ref, spacing=ANISO)


def _monai_whole(p: np.ndarray, r: np.ndarray, v: int, tols: tuple[float, ...]) -> dict:
    """MONAI's four metrics of label ``v`` on the whole arrays (z, y, x), spacing ANISO, no crop of ours;
    surface Dice at each of ``tols`` (one channel per tolerance)."""
    from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                               compute_surface_dice)

    yp, yr = (torch.from_numpy((a == v)[None, None].astype(np.float32)) for a in (p, r))
    sp = list(ANISO[::-1])  # MONAI takes spacing in array-axis order (z, y, x)
    n = len(tols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = compute_surface_dice(yp.expand(1, n, *p.shape), yr.expand(1, n, *p.shape), list(tols),
                                  include_background=True, spacing=sp)
        return {"dice": float(compute_dice(yp, yr, include_background=True, ignore_empty=False)),
                "asd": float(compute_average_surface_distance(yp, yr, include_background=True, symmetric=True, spacing=sp)),
                "hd95": float(compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=sp)),
                **{tol: float(s) for tol, s in zip(tols, sd[0])}}


def test_label_box_crop_gives_monais_numbers_on_the_whole_real_label_map(pair):
    """Our per-label bounding-box crop (one background voxel around the union) against MONAI's compute_* on
    the whole arrays, for small to large real structures and for those the field of view cuts (surfaces along
    the array border), at a tolerance equal to a voxel step (a tie) and at one that is not."""
    pred, ref = pair
    p, r = sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref)
    labels = sorted((set(np.unique(p).tolist()) | set(np.unique(r).tolist())) - {0})
    both = [v for v in labels if (p == v).any() and (r == v).any()]
    assert len(both) >= 40 and len(both) < len(labels)  # real variety, and some labels cut off by the move
    border = np.ones(r.shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    cut = sorted((v for v in both if (r[border] == v).any()), key=lambda v: -int((r[border] == v).sum()))[:3]
    size = {v: int(((p == v) | (r == v)).sum()) for v in both}
    checked = sorted(set(sorted(both, key=size.get)[::8]) | set(cut))
    assert len(cut) == 3
    tols = (2.1, 1.0)  # 2.1 = one z step
    ours = {tol: label_metrics(p, r, ANISO, checked, tolerance_mm=tol) for tol in tols}
    for v in checked:
        m, ref_m = ours[tols[0]][v], _monai_whole(p, r, v, tols)
        assert m.status == OK
        assert m.dice == pytest.approx(ref_m["dice"], abs=1e-6), v
        assert m.asd_mm == pytest.approx(ref_m["asd"], rel=1e-5), v
        assert m.hd95_mm == pytest.approx(ref_m["hd95"], rel=1e-6), v
        for tol in tols:
            assert ours[tol][v].surface_dice == pytest.approx(ref_m[tol], abs=1e-6), (v, tol)
    # the metrics are not degenerate on this pair: real, varied boundary errors of a few mm
    asd = np.array([ours[tols[0]][v].asd_mm for v in checked])
    assert 0.3 < np.median(asd) < 5 and asd.max() > asd.min() + 1
    assert 0 < np.mean([ours[1.0][v].surface_dice for v in checked]) < 1


def test_identity_gives_perfect_scores(pair):
    _, ref = pair
    res = evaluate(ref, ref, groups={"first": [4, 11]})
    present = sorted(set(np.unique(sitk.GetArrayViewFromImage(ref)).tolist()) - {0})
    assert list(res.labels) == present
    for m in res.labels.values():
        assert (m.status, m.dice, m.surface_dice, m.asd_mm, m.hd95_mm) == (OK, 1.0, 1.0, 0.0, 0.0)
        assert m.volume_pred_mm3 == m.volume_ref_mm3 > 0
    assert (res.mean.dice, res.mean.asd_mm, res.mean.n_undefined) == (1.0, 0.0, 0)
    assert res.groups["first"].labels == [4, 11]


@pytest.mark.parametrize("axis,k,spacing", [(2, 3, ANISO), (0, 2, ANISO), (1, 1, (0.7, 0.7, 0.7))])
def test_known_shift_gives_k_times_spacing(ixi_label, axis, k, spacing):
    """Moving a label map by k voxels along one axis: every surface voxel is within k * spacing of
    the other surface (surface Dice at that tolerance is exactly 1, ASD and HD95 are at most that) and
    the first slice of each structure along the shift is exactly k * spacing away (so surface Dice
    just below that tolerance is < 1). The 0.7 mm isotropic case is the paper's setting: a one-voxel
    shift is within the default 0.7 mm tolerance. The tolerance is given as a user types it (3.9 mm
    for 3 x 1.3 mm, which the distance transform returns as 3.9000000000000004): a tie counts."""
    arr = sitk.GetArrayFromImage(crop(ixi_label, (40, 40, 30), (40, 36, 30)))
    pad = [(0, 0)] * 3
    pad[axis] = (k + 1, k + 1)
    ref = np.pad(arr, pad)  # nothing touches the array border along the shift axis
    pred = np.zeros_like(ref)
    dst = [slice(None)] * 3
    src = [slice(None)] * 3
    dst[axis], src[axis] = slice(k, None), slice(None, -k)
    pred[tuple(dst)] = ref[tuple(src)]
    step = k * spacing[2 - axis]  # spacing is (x, y, z); array axes are (z, y, x)

    at = label_metrics(pred, ref, spacing, tolerance_mm=round(step, 6))
    below = label_metrics(pred, ref, spacing, tolerance_mm=step - 1e-3)
    assert len(at) >= 30
    for v, m in at.items():
        assert m.status == OK and 0 <= m.dice < 1
        assert m.surface_dice == 1.0, v
        assert 0 < m.asd_mm <= step * (1 + 1e-6) and 0 < m.hd95_mm <= step * (1 + 1e-6), v  # float32 distances
        assert m.hd95_mm > 0.25 * step, v
        assert below[v].surface_dice < 1.0, v
    hd = np.array([m.hd95_mm for m in at.values()])
    assert np.median(hd) > 0.5 * step


def test_missing_and_absent_labels_never_crash(pair):
    _, ref = pair
    r = sitk.GetArrayFromImage(ref)
    values, counts = np.unique(r[r > 0], return_counts=True)
    a, b = (int(v) for v in values[np.argsort(counts)[-2:]])  # two large labels
    p = r.copy()
    p[p == a] = 0  # a: only in the reference
    p[(p == b) & (np.arange(p.shape[2]) < p.shape[2] // 2)] = 999  # 999: only in the prediction
    res = evaluate(p, r, spacing_xyz=ANISO, groups={"g": [a, b, 999, 998]})
    ma, mb, m999, m998 = (res.labels[v] for v in (a, b, 999, 998))
    assert ma.status == MISSING_IN_PRED and m999.status == MISSING_IN_REF and m998.status == ABSENT
    for m in (ma, m999):
        assert m.dice == 0.0 and m.surface_dice == 0.0 and math.isnan(m.asd_mm) and math.isnan(m.hd95_mm)
    assert ma.volume_pred_mm3 == 0 and ma.volume_ref_mm3 == pytest.approx((r == a).sum() * np.prod(ANISO))
    assert mb.status == OK and 0 < mb.dice < 1 and mb.asd_mm > 0
    g = res.groups["g"]
    assert g.labels == [a, b, 999] and g.absent == [998] and g.n_undefined == 2
    assert g.dice == pytest.approx(mb.dice / 3) and g.asd_mm == pytest.approx(mb.asd_mm)
    assert 998 in res.mean.absent and not math.isnan(res.mean.dice)
    doc = json.loads(json.dumps(res.to_json_dict(), allow_nan=False))  # NaN -> null, valid JSON
    row = next(x for x in doc["labels"] if x["label"] == a)
    assert row["asd_mm"] is None and row["dice"] == 0.0
    assert "missing in pred" in format_table(res) and "absent" in format_table(res)

    empty = evaluate(np.zeros_like(r), r, spacing_xyz=ANISO)  # an empty prediction is a valid (bad) result
    assert all(m.status == MISSING_IN_PRED for m in empty.labels.values())
    assert empty.mean.dice == 0.0 and math.isnan(empty.mean.asd_mm) and empty.mean.n_undefined == len(empty.labels)


def test_different_grids_is_an_error_naming_both_files(pair, tmp_path, capsys):
    pred, ref = pair
    moved = sitk.Image(pred)
    moved.SetOrigin([o + 2.0 for o in pred.GetOrigin()])
    p_path, r_path = write_image(moved, tmp_path / "pred_case.nii.gz"), write_image(ref, tmp_path / "ref_case.nrrd")
    with pytest.raises(MASRefineError, match="different grids") as e:
        evaluate_files(p_path, r_path)
    assert str(p_path) in str(e.value) and str(r_path) in str(e.value) and "origin" in str(e.value)
    assert "\n" not in str(e.value)
    resized = crop(ref, (0, 0, 0), (50, 52, 44))
    with pytest.raises(MASRefineError, match="size"):
        evaluate(resized, ref)
    assert main(["evaluate", "--pred", str(p_path), "--ref", str(r_path)]) == 2
    err = capsys.readouterr().err
    assert "pred_case.nii.gz" in err and "ref_case.nrrd" in err


def test_cli_on_real_files_writes_json(ixi_dir, ixi_label, tmp_path, capsys):
    ref_path = ixi_paths(ixi_dir, (ixi_dir / "subjects.txt").read_text().split()[0])[1]
    pred_path = write_image(_perturbed(ixi_label), tmp_path / "pred.nii.gz")
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"ventricles": [4, 11, 49, 50, 51, 52], "hippocampus": [47, 48]}))
    out = tmp_path / "out" / "metrics.json"
    rc = main(["evaluate", "--pred", str(pred_path), "--ref", str(ref_path), "--groups", str(groups),
               "--labels", str(ixi_dir / "MUSE_listROIs.csv"), "--tolerance-mm", "2.0", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean over" in text and "ventricles over" in text and "SurfDice@2mm" in text
    doc = json.loads(out.read_text())
    ref_arr = sitk.GetArrayViewFromImage(ixi_label)
    assert {x["label"] for x in doc["labels"]} >= set(np.unique(ref_arr).tolist()) - {0}
    names = {x["label"]: x.get("name") for x in doc["labels"]}
    assert names[48] and "hippocampus" in names[48].lower()
    assert doc["tolerance_mm"] == 2.0 and doc["ref"] == str(ref_path)
    direct = evaluate_files(pred_path, ref_path, groups=json.loads(groups.read_text()), tolerance_mm=2.0)
    assert doc["mean"]["dice"] == pytest.approx(direct.mean.dice)
    assert doc["groups"]["hippocampus"]["labels"] == [47, 48]
    assert 0.3 < doc["mean"]["dice"] < 1 and 0 < doc["groups"]["ventricles"]["asd_mm"] < 5
    assert not list(out.parent.glob(".*tmp*"))  # atomic write leaves no temporary file behind
