"""The end-to-end pipeline on the built-in phantom: a real segment job through the worker, its
manifest and load plan; cancellation in process; the ``masrefine segment`` command with metrics."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MASRefineLib import sampledata
from MASRefineLib.protocol import jobs
from MASRefineLib.cli import main as cli_main
from MASRefineLib.errors import Cancelled
from MASRefineLib.labels import read_seg_nrrd
from MASRefineLib.protocol.loadplan import load_plan, qa_rows
from MASRefineLib.protocol.manifest import MANIFEST_NAME, read_manifest
from MASRefineLib.pipeline import SegmentOptions, segment
from cancelling import cancel_after
from MASRefineLib.runner import JobRunner


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sampledata.make_sample(tmp_path_factory.mktemp("pipe-sample"), n_atlases=3, size=(36, 36, 36), spacing=2.5)


def test_segment_job_through_worker(sample, tmp_path):
    out = tmp_path / "run"
    job = jobs.make_job(sample["target"], sample["atlas_dir"], out, prereg="affine", refine="I", fusion="pv",
                        iterations=8, preset="fast", threads=1)
    r = JobRunner(jobs.write_job(job, tmp_path / "job.json")).start()
    evs = list(r.events(120))
    assert r.returncode == 0, [e for e in evs if e["event"] in ("error", "output")][-5:]
    stages = [e["stage"] for e in evs if e["event"] == "stage"]
    for s in ("load", "register", "refine", "fuse", "write", "qa"):
        assert s in stages
    overall = [e["overall"] for e in evs if e["event"] == "progress" and "overall" in e]
    assert overall and all(b >= a - 1e-9 for a, b in zip(overall, overall[1:])) and overall[-1] == 1.0

    m = read_manifest(r.result["manifest"])
    roles = {}
    for e in m["outputs"]:
        roles.setdefault(e["role"], []).append(e)
        assert os.path.isfile(e["abs_path"])
    assert {e["format"] for e in roles["fused-labels"]} == {"seg.nrrd", "nifti"}
    assert sorted(e["label"] for e in roles["posterior"]) == [1, 2, 3, 4]
    for role in ("atlas-image", "atlas-labels", "atlas-field", "atlas-jacobian", "atlas-image-unrefined"):
        assert sorted({e["atlas_id"] for e in roles[role]}) == ["knee01", "knee02", "knee03"], role
    assert [s["name"] for s in m["stages"]] == ["load", "register", "refine", "fuse", "write", "qa"]
    # CPU time per stage: registration and refinement do real work in this process
    assert m["stages"][1]["cpu_seconds"] > 0 and m["stages"][2]["cpu_seconds"] > 0
    assert set(m["summary"]["cpu_seconds"]) == set(m["summary"]["seconds"])
    assert m["parameters"]["refine"] == "I" and m["inputs"]["target"] == sample["target"]
    # the job's single iteration count is the finest level's; coarser levels keep refine's defaults
    from MASRefineLib.refine import DEFAULT_ITERATIONS
    report = json.loads(next(Path(e["abs_path"]) for e in roles["report"]).read_text())
    assert report["info"]["refinement"]["iterations"] == [*DEFAULT_ITERATIONS[:-1], 8]

    # the fused labels: values of the atlas set, names and colours in the seg.nrrd, target geometry
    seg = next(e for e in roles["fused-labels"] if e["format"] == "seg.nrrd")
    lab, table = read_seg_nrrd(seg["abs_path"])
    assert {v: t.name for v, t in table.items()} == sample["labels"]
    target = sitk.ReadImage(sample["target"])
    assert lab.GetSize() == target.GetSize() and np.allclose(lab.GetOrigin(), target.GetOrigin())
    fused = sitk.GetArrayFromImage(lab)
    # posteriors: in [0, 1], the fused label has the largest posterior among the labels
    post = {e["label"]: sitk.GetArrayFromImage(sitk.ReadImage(e["abs_path"])) for e in roles["posterior"]}
    stack = np.stack([post[v] for v in (1, 2, 3, 4)])
    assert stack.min() >= 0 and stack.max() <= 1 + 1e-6 and stack.sum(0).max() <= 1 + 1e-5
    fg = fused > 0
    assert (np.array([1, 2, 3, 4])[stack.argmax(0)][fg] == fused[fg]).mean() > 0.99

    # QA numbers are what they claim to be
    rows = qa_rows(r.result["manifest"])
    assert [q["id"] for q in rows] == ["knee01", "knee02", "knee03"]
    for q in rows:
        assert -1 <= q["similarity"] <= 1 and 0 <= q["agreement"] <= 1 and 0 <= q["folding_fraction"] <= 1
        warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "atlases" / f"{q['id']}_label.nii.gz")))
        d = [2 * ((warped == v) & (fused == v)).sum() / ((warped == v).sum() + (fused == v).sum()) for v in (1, 2, 3, 4)]
        assert q["agreement"] == pytest.approx(np.mean(d), abs=1e-3)
    with open(out / "qa.csv") as f:
        assert [row["id"] for row in csv.DictReader(f)] == ["knee01", "knee02", "knee03"]
    assert (out / "qa.png").stat().st_size > 10_000

    # the load plan for the Slicer module
    plan = load_plan(r.result["manifest"])
    assert [(i["kind"], i["role"]) for i in plan] == [("segmentation", "fused-labels"), ("table", "qa-table")]
    assert plan[0]["path"].endswith(".seg.nrrd") and plan[0]["labels"][2]["name"] == "femoral cartilage"
    assert plan[0]["reference"] == "target" and plan[0]["show"]
    full = load_plan(r.result["manifest"], atlases=["knee02"], posteriors=True)
    a2 = [i for i in full if i["atlas_id"] == "knee02"]
    assert [i["role"] for i in a2 if i["role"] != "atlas-weights"] == [
        "atlas-image", "atlas-labels", "atlas-field", "atlas-jacobian", "atlas-image-unrefined", "atlas-labels-unrefined"]
    tr = next(i for i in a2 if i["kind"] == "transform")
    assert tr["fixed"] == "target" and tr["moving"].endswith("knee02.nii.gz") and os.path.isfile(tr["moving"])
    assert next(i for i in a2 if i["role"] == "atlas-labels")["path"].endswith(".seg.nrrd")
    assert next(i for i in a2 if i["role"] == "atlas-image-unrefined")["compare_with"].endswith("knee02_image.nrrd")
    assert len([i for i in full if i["role"] == "posterior"]) == 4
    assert all(i["folder"][0] == "MASRefine target01" for i in full)
    with pytest.raises(KeyError):
        load_plan(r.result["manifest"], atlases=["nope"])


def test_segment_is_the_stage_list_plus_its_outputs(sample, tmp_path):
    """The stages the options ask for, in order; run by hand (as experiment and VoteNet+ training do), they give
    the labels ``segment`` writes, and ``segment`` times exactly its list (computing stages, then Write and QA)."""
    from MASRefineLib.device import resolve_device
    from MASRefineLib.pipeline import Run, compute_stages, run_stages

    assert [s.name for s in compute_stages(SegmentOptions(refine="IS", fusion="votenet"))] == \
        ["load", "models", "register", "refine", "fuse"]
    opts = SegmentOptions(prereg="affine", refine="none", fusion="pv", preset="fast", threads=1, qa_picture=False,
                          save_atlases=False)
    stages = compute_stages(opts)
    assert [s.name for s in stages] == ["load", "register", "fuse"]
    run = run_stages(stages, Run(opts, resolve_device(opts.device), target_path=sample["target"],
                                 atlas_dir=sample["atlas_dir"]))
    r = segment(sample["target"], sample["atlas_dir"], tmp_path / "out", opts)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(r["fused"])), run.fused.labels)
    assert r["summary"]["stage"] == run.warped.stage == "affine" and run.unrefined is None
    assert [s["name"] for s in read_manifest(r["manifest"])["stages"]] == ["load", "register", "fuse", "write", "qa"]


def test_cancel_leaves_no_manifest(sample, tmp_path):
    from MASRefineLib.outputs import prepare_output_dir
    out = prepare_output_dir(tmp_path / "run", command="segment")  # an earlier segment output with its manifest
    (out / MANIFEST_NAME).write_text("{}")
    with pytest.raises(Cancelled):
        segment(sample["target"], sample["atlas_dir"], out,
                SegmentOptions(prereg="affine", refine="none", fusion="pv", preset="fast"), progress=cancel_after(6))
    assert not (out / MANIFEST_NAME).exists()


def test_segment_command_with_truth(sample, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["segment", "--atlases", sample["atlas_dir"], "--target", sample["target"], "--out", str(out),
                   "--prereg", "affine", "--refine", "none", "--fusion", "pv", "--preset", "fast",
                   "--no-atlas-outputs", "--no-qa-picture", "--truth", sample["truth"],
                   "--groups", json.dumps(sampledata.GROUPS), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "manifest:" in text and "cartilage: Dice" in text
    m = read_manifest(out)
    assert not any(e["role"].startswith("atlas-") for e in m["outputs"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"bone", "cartilage"}
    # the metrics are of the fused labels that were written
    fused = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fused_labels.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(sample["truth"]))
    d1 = 2 * ((fused == 1) & (truth == 1)).sum() / ((fused == 1).sum() + (truth == 1).sum())
    assert next(r for r in metrics["labels"] if r["label"] == 1)["dice"] == pytest.approx(d1, abs=1e-6)


def test_missing_models_without_training_name_the_command(sample, tmp_path):
    from MASRefineLib.errors import MASRefineError
    with pytest.raises(MASRefineError, match="masrefine train segmenter"):
        segment(sample["target"], sample["atlas_dir"], tmp_path / "o",
                SegmentOptions(prereg="affine", refine="IS", fusion="pv", train_missing=False))
    with pytest.raises(MASRefineError, match="masrefine train votenet"):
        segment(sample["target"], sample["atlas_dir"], tmp_path / "o",
                SegmentOptions(prereg="affine", refine="none", fusion="votenet", train_missing=False))
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()



def test_train_votenet_command_stores_a_model_that_segment_uses(sample, tmp_path, capsys):
    """``masrefine train votenet`` (leave-one-out registrations of the set to itself, refined with I here)
    stores ``votenet-affine-I``, with its calibration report; ``segment --refine I --fusion votenet`` then
    finds and uses it without training."""
    from MASRefineLib.fusion.votenet import VoteNetModel, votenet_model_path

    atlas_dir = Path(sample["atlas_dir"])
    for args, why in ((["--refine", "IS"], f"train one with 'masrefine train segmenter {atlas_dir}'"),
                      (["--targets", "1"], "--targets must be at least 2")):
        assert cli_main(["train", "votenet", str(atlas_dir), *args, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("masrefine train: error:") and why in err[0], err
    rc = cli_main(["train", "votenet", str(atlas_dir), "--prereg", "affine", "--refine", "I", "--preset", "fast",
                   "--targets", "2", "--iterations", "3", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    path = atlas_dir / "models" / "votenet-affine-I.json"
    assert f"wrote {path}" in text and "expected calibration error" in text
    model = VoteNetModel.load(path)
    assert model.meta["registration"]["prereg"] == "affine" and model.meta["registration"]["refine"] == "I"
    assert model.meta["reliability"]["ece_after"] >= 0
    assert votenet_model_path(atlas_dir, "affine", "I") == path
    assert votenet_model_path(atlas_dir, "affine", "none") is None  # only refinement I asked for this one
    r = segment(sample["target"], atlas_dir, tmp_path / "o",
                SegmentOptions(prereg="affine", refine="I", fusion="votenet", preset="fast", iterations=5,
                               train_missing=False, save_atlases=False, qa_picture=False))
    summary = read_manifest(r["manifest"])["summary"]
    assert summary["fusion"] == "votenet" and not summary.get("fallbacks")


def test_a_small_target_segments_and_a_thin_slab_is_refused(sample, tmp_path):
    """An 8-voxel cube (the smallest volume read) runs through every stage (its coarse control grids have 2 nodes
    along an axis: the bending energy leaves out what does not fit), with outputs on its grid; a 3-slice slab is
    refused with a one-line error naming the file."""
    from MASRefineLib.errors import MASRefineError
    img = sitk.ReadImage(sample["target"])
    c = [n // 2 - 4 for n in img.GetSize()]
    small = sitk.RegionOfInterest(img, [8, 8, 8], c)
    sitk.WriteImage(small, str(tmp_path / "small.nii.gz"))
    r = segment(tmp_path / "small.nii.gz", sample["atlas_dir"], tmp_path / "o",
                SegmentOptions(prereg="deformable", refine="I", fusion="pv", preset="fast", save_atlases=False,
                               qa_picture=False))
    fused = sitk.ReadImage(str(tmp_path / "o" / "fused_labels.nii.gz"))
    assert fused.GetSize() == small.GetSize() and np.allclose(fused.GetOrigin(), small.GetOrigin())
    assert r["summary"]["atlases"] == len(json.loads((Path(sample["atlas_dir"]) / "atlas.json").read_text())["atlases"])
    slab = sitk.RegionOfInterest(img, [img.GetSize()[0], img.GetSize()[1], 3], [0, 0, c[2]])
    sitk.WriteImage(slab, str(tmp_path / "slab.nii.gz"))
    with pytest.raises(MASRefineError, match=r"slab.nii.gz: expected a 3D volume of at least 8 voxels"):
        segment(tmp_path / "slab.nii.gz", sample["atlas_dir"], tmp_path / "o2", SegmentOptions(preset="fast"))


def test_a_reference_on_another_grid_is_refused_before_any_work(sample, tmp_path):
    """``truth`` is read and checked with the target, not after the whole run (evaluate refuses it too)."""
    from MASRefineLib.errors import MASRefineError
    ref = sitk.ReadImage(sample["truth"])
    ref.SetOrigin(tuple(o + 30.0 for o in ref.GetOrigin()))
    sitk.WriteImage(ref, str(tmp_path / "shifted.nii.gz"))
    from MASRefineLib.outputs import prepare_output_dir
    prepare_output_dir(tmp_path / "o", command="segment")
    (tmp_path / "o" / MANIFEST_NAME).write_text('{"schema_version": 1}')  # an earlier run's result
    with pytest.raises(MASRefineError, match=r"shifted.nii.gz: reference label map and target .* different grids "
                                             r"\(origin"):
        segment(sample["target"], sample["atlas_dir"], tmp_path / "o", SegmentOptions(preset="fast"),
                truth=tmp_path / "shifted.nii.gz")
    with pytest.raises(MASRefineError, match="nosuch.nii.gz: file not found"):
        segment(sample["target"], sample["atlas_dir"], tmp_path / "o", SegmentOptions(preset="fast"),
                truth=tmp_path / "nosuch.nii.gz")
    assert (tmp_path / "o" / MANIFEST_NAME).read_text() == '{"schema_version": 1}'  # kept: nothing was started
