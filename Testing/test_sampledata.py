"""The built-in knee phantom: deterministic, a valid atlas set, anatomically plausible, varied, MR-like."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MASRefineLib import sampledata
from MASRefineLib.atlas import AtlasSet, inspect_atlas_set
from MASRefineLib.geometry import Grid
from MASRefineLib.imageio import read_image, read_label


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    return sampledata.make_sample(out, n_atlases=3, seed=0, n_targets=1)


def _arr(p):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))


def test_atlas_set_is_valid_and_complete(sample):
    assert inspect_atlas_set(sample["atlas_dir"]).problems == []
    aset = AtlasSet.load(sample["atlas_dir"])
    assert len(aset) == 3
    assert {k: v.name for k, v in aset.label_table.items()} == {1: "femur", 2: "femoral cartilage", 3: "tibia",
                                                                 4: "tibial cartilage"}
    # colours as in shared/tools/synth_knee.py
    assert aset.label_table[2].color == (111, 184, 210)
    img, lab = aset.read(aset.ids[0])
    assert Grid.from_image(img).isclose(Grid.from_image(lab))
    assert Grid.from_image(img).isclose(sampledata.sample_grid())
    # target and truth are readable by the project's reader and share a grid
    t, tr = read_image(sample["target"]), read_label(sample["truth"])
    assert Grid.from_image(t).isclose(Grid.from_image(tr))
    assert sorted(np.unique(sitk.GetArrayViewFromImage(tr)).tolist()) == [0, 1, 2, 3, 4]


def test_deterministic_and_seed_dependent():
    kw = dict(size=(40, 40, 40), spacing=2.2)
    a_img, a_lab, _ = sampledata.make_subject("knee01", seed=3, **kw)
    b_img, b_lab, _ = sampledata.make_subject("knee01", seed=3, **kw)
    c_img, c_lab, _ = sampledata.make_subject("knee01", seed=4, **kw)
    assert np.array_equal(sitk.GetArrayViewFromImage(a_img), sitk.GetArrayViewFromImage(b_img))
    assert np.array_equal(sitk.GetArrayViewFromImage(a_lab), sitk.GetArrayViewFromImage(b_lab))
    assert not np.array_equal(sitk.GetArrayViewFromImage(a_lab), sitk.GetArrayViewFromImage(c_lab))


def test_anatomy_is_plausible(sample):
    lab = _arr(sample["truth"])
    spacing = sampledata.DEFAULT_SPACING
    # each structure is one connected piece
    for v in (1, 3):
        _, n = ndimage.label(lab == v)
        assert n == 1, f"label {v} has {n} components"
    # cartilage lies on its bone: a 2-3.5 mm layer, so every voxel within ~6 mm, most within 3.5 mm
    for cart, bone in ((2, 1), (4, 3)):
        d = ndimage.distance_transform_edt(lab != bone) * spacing
        assert (d[lab == cart] <= 6.0).all()
        assert np.median(d[lab == cart]) <= 3.5
        # and it is a thin layer (not a blob): most cartilage voxels touch non-cartilage
        interior = ndimage.binary_erosion(lab == cart)
        assert interior.sum() < 0.35 * (lab == cart).sum()
    # femur above tibia (LPS z = superior = array axis 0)
    zf = ndimage.center_of_mass(lab == 1)[0]
    zt = ndimage.center_of_mass(lab == 3)[0]
    assert zf > zt
    # femoral cartilage between femur and tibial cartilage
    assert ndimage.center_of_mass(lab == 3)[0] < ndimage.center_of_mass(lab == 4)[0] < \
        ndimage.center_of_mass(lab == 2)[0] < zf


def test_subjects_vary(sample):
    aset = AtlasSet.load(sample["atlas_dir"])
    labs = [sitk.GetArrayFromImage(aset.read(i)[1]) for i in aset.ids] + [_arr(sample["truth"])]
    for v, lo, hi in ((1, 0.5, 0.97), (2, 0.03, 0.9)):
        vols = [(l == v).sum() for l in labs]
        assert max(vols) / min(vols) > 1.05
        for i in range(len(labs)):
            for j in range(i + 1, len(labs)):
                a, b = labs[i] == v, labs[j] == v
                dice = 2 * (a & b).sum() / (a.sum() + b.sum())
                # different subjects (so registration has work to do), same anatomy roughly in place
                assert lo < dice < hi


def test_mr_like_appearance(sample):
    img, lab = _arr(sample["target"]), _arr(sample["truth"])
    assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    core = lambda m: ndimage.binary_erosion(m)
    cart = img[(lab == 2) | (lab == 4)].mean()
    marrow = img[core(lab == 1) | core(lab == 3)].mean()
    assert cart > marrow + 0.15  # DESS-like: bright cartilage, dark fat-suppressed marrow
    # noise: neighbouring voxels inside marrow are not identical, nor unrelated to anatomy
    m = core(core(lab == 3))
    assert img[m].std() > 0.01
    # Rician: the background (air outside the leg) is positive, not zero-mean
    assert img[0, 0, :].mean() > 0.0


def test_reuse_and_force(sample, tmp_path):
    stamp = os.path.join(os.path.dirname(sample["atlas_dir"]), "sample.json")
    before = os.path.getmtime(stamp)
    again = sampledata.make_sample(os.path.dirname(sample["atlas_dir"]), n_atlases=3, seed=0, n_targets=1)
    assert again["target"] == sample["target"] and os.path.getmtime(stamp) == before
    settings = json.loads(open(stamp).read())["settings"]
    assert settings["n_atlases"] == 3 and settings["seed"] == 0


def test_events_mode_speaks_the_worker_protocol_and_stops_on_cancel(tmp_path):
    """``python -m MASRefineLib.sampledata --out DIR --events`` (what the Slicer module runs) is a worker: its events,
    a cancel through the runner (stdin) stops it at the next progress report with exit code 3, and a failure is
    one ``error`` event."""
    import sys
    from MASRefineLib.runner import JobRunner
    from MASRefineLib.worker import EVENT_PREFIX, EXIT_CANCELLED, EXIT_ERROR

    def runner(out):
        return JobRunner(command=[sys.executable, "-m", "MASRefineLib.sampledata", "--out", str(out), "--events"]).start()

    r = runner(tmp_path / "sample")
    seen = []
    for ev in r.events(120):
        seen.append(ev)
        if ev["event"] == "progress" and ev["fraction"] > 0:
            r.cancel(grace_s=60)  # the kill after the grace period would read "cancelled" too: exit code 3 says it stopped
    kinds = [e["event"] for e in seen]
    assert kinds[:2] == ["started", "stage"] and "output" not in kinds and "result" not in kinds, kinds
    (cancelled,) = [e for e in seen if e["event"] == "cancelled"]
    assert cancelled["reason"] == "cancel-file" and r.returncode == EXIT_CANCELLED and r.status == "cancelled"
    assert all(e["overall"] == e["fraction"] for e in seen if e["event"] == "progress")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = runner(blocker / "sample")
    evs = list(r.events(120))
    kinds = [e["event"] for e in evs if e["event"] != "output"]
    assert r.returncode == EXIT_ERROR and kinds[0] == "started" and kinds[-2:] == ["error", "exit"], kinds
    assert "\n" not in r.error["message"] and str(blocker) in r.error["message"]
    assert not any(e["event"] == "output" and e["stream"] == "stdout" for e in evs)  # stdout holds events only
    assert EVENT_PREFIX.strip() == "MASREFINE-EVENT"


def test_an_unreadable_stamp_remakes_the_sample(tmp_path):
    """sample.json is read by the one JSON reader: bytes that are not UTF-8 mean 'not made', not a traceback."""
    out = tmp_path / "s"
    sampledata.make_sample(out, n_atlases=2, size=(24, 24, 24), spacing=3.5)
    (out / "sample.json").write_bytes(b"\xff\xfe{")
    r = sampledata.make_sample(out, n_atlases=2, size=(24, 24, 24), spacing=3.5)
    assert AtlasSet.load(r["atlas_dir"]).ids and json.loads((out / "sample.json").read_text())["settings"]
