"""Bounded memory of ``segment`` (#22): atlases stream through refinement (each atlas's files written as soon as it
is refined, its field dropped, the registered set freed atlas by atlas), JLF works block by block on the atlases'
own tensors and keeps its weights compactly. None of it may change a single output: the tests compare with the
unstreamed path and with the dense forms, bit for bit."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib import pipeline, sampledata
from MASRefineLib.fusion.common import AtlasWeights, consensus
from MASRefineLib.fusion.jlf import _data_box, joint_label_fusion
from MASRefineLib.pipeline import SegmentOptions, segment

OPTIONS = dict(prereg="affine", refine="I", fusion="jlf", iterations=8, preset="fast", threads=1)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sampledata.make_sample(tmp_path_factory.mktemp("stream-sample"), n_atlases=3, size=(36, 36, 36),
                                  spacing=2.5)


def _images(folder: Path) -> dict[str, sitk.Image]:
    return {p.relative_to(folder).as_posix(): sitk.ReadImage(str(p)) for p in sorted(folder.rglob("*"))
            if p.name.endswith((".nii.gz", ".nrrd"))}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_streamed_segment_writes_exactly_what_the_unstreamed_one_writes(sample, tmp_path, monkeypatch):
    held = {}
    qa_run = pipeline.QA.run

    def spy(self, run, progress):  # what the run holds once every stage before QA has run
        held["warped"], held["unrefined"] = run.warped, run.unrefined
        return qa_run(self, run, progress)

    monkeypatch.setattr(pipeline.QA, "run", spy)
    streamed = segment(sample["target"], sample["atlas_dir"], tmp_path / "streamed", SegmentOptions(**OPTIONS),
                       truth=sample["truth"])
    # the refined atlases hold no field (written when refined), and no registered set is kept
    assert held["unrefined"] is None
    assert len(held["warped"].atlases) == 3
    assert all(a.field_tensor.numel() == 0 and a.image_tensor.numel() > 0 for a in held["warped"].atlases)

    monkeypatch.setattr(pipeline, "AtlasStream", lambda folder: None)  # the path that writes everything in Write
    whole = segment(sample["target"], sample["atlas_dir"], tmp_path / "whole", SegmentOptions(**OPTIONS),
                    truth=sample["truth"])
    assert held["unrefined"] is not None and all(a.field_tensor.numel() > 0 for a in held["warped"].atlases)

    a, b = Path(streamed["output_dir"]), Path(whole["output_dir"])
    ia, ib = _images(a), _images(b)
    assert sorted(ia) == sorted(ib)
    assert any(k.endswith("_field.nrrd") for k in ia) and any(k.endswith("_weights.nii.gz") for k in ia)
    assert any(k.endswith("_label_unrefined.nii.gz") for k in ia) and any(k.endswith("_jacobian.nrrd") for k in ia)
    for k in ia:
        xa, xb = sitk.GetArrayFromImage(ia[k]), sitk.GetArrayFromImage(ib[k])
        assert xa.dtype == xb.dtype and np.array_equal(xa, xb), k
        assert ia[k].GetSpacing() == ib[k].GetSpacing() and ia[k].GetOrigin() == ib[k].GetOrigin(), k
    assert _rows(a / "qa.csv") == _rows(b / "qa.csv")
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [(e["path"], e["role"]) for e in ma["outputs"]] == [(e["path"], e["role"]) for e in mb["outputs"]]
    strip = (lambda rows: [{k: v for k, v in r["qa"].items() if k != "seconds"} for r in rows])
    assert strip(ma["atlases"]) == strip(mb["atlases"])
    ra, rb = (json.loads((p / "atlases" / "report.json").read_text()) for p in (a, b))
    assert [e["files"] for e in ra["atlases"]] == [e["files"] for e in rb["atlases"]]
    assert [e["folding_fraction"] for e in ra["atlases"]] == [e["folding_fraction"] for e in rb["atlases"]]


def test_refine_consumes_its_input_and_hands_each_atlas_over_once_refined(sample):
    from MASRefineLib.atlas import AtlasSet
    from MASRefineLib.refine import refine
    from MASRefineLib.registration import AtlasInput, get_params, register
    from MASRefineLib.volume import read_image
    target = read_image(sample["target"])
    aset = AtlasSet.load(sample["atlas_dir"])
    inputs = [AtlasInput(i, load=(lambda a=i: aset.read(a)), source_image=str(aset.image_path(i)),
                         source_label=str(aset.label_path(i))) for i in aset.ids]
    ws = register(target, inputs, aset.label_table, params=get_params("fast", stage="affine"), device="cpu")
    kw = dict(iterations=4, device="cpu", batch_size=2)
    plain = refine(ws, target, "I", **kw)
    seen = []

    def on_atlas(refined, registered):
        # the registered atlas still holds its tensors when its refined one is handed over
        assert registered.field_tensor.numel() > 0 and registered.image_tensor.numel() > 0
        seen.append((refined.id, refined.field_tensor.clone()))
        refined.field_tensor = torch.empty(0)
        return refined

    streamed = refine(ws, target, "I", on_atlas=on_atlas, consume=True, **kw)
    assert [s[0] for s in seen] == ws.ids == streamed.ids
    assert all(a.field_tensor.numel() == 0 and a.image_tensor.numel() == 0 for a in ws.atlases)  # consumed
    for p, s, (_, fld) in zip(plain.atlases, streamed.atlases, seen):
        assert torch.equal(p.field_tensor, fld)
        assert torch.equal(p.image_tensor, s.image_tensor) and torch.equal(p.label_tensor, s.label_tensor)
        assert p.info["folding_fraction"] == s.info["folding_fraction"]


def test_data_box_equals_slicing_the_padded_stack():
    """JLF's blocks copy their data box out of each atlas (no padded (B, ...) stack): boxes anywhere inside the
    padded extent, partly or wholly outside the image, hold what the padded stack holds there."""
    rng = np.random.default_rng(1)
    xs = [torch.from_numpy(rng.integers(0, 9, (7, 9, 11)).astype(np.uint8)) for _ in range(3)]
    pw = 4
    padded = torch.nn.functional.pad(torch.stack(xs).to(torch.int64), [pw] * 6, value=-1)
    for start, dims in [((-4, -4, -4), (6, 5, 8)), ((2, 3, 4), (3, 3, 3)), ((-1, 5, 8), (10, 8, 7)),
                        ((-4, -4, -4), (15, 17, 19)), ((6, 8, 10), (5, 5, 5))]:
        box = _data_box(xs, start, dims, -1, torch.int64, torch.device("cpu"))
        sl = tuple(slice(s + pw, s + pw + d) for s, d in zip(start, dims))
        assert box.is_contiguous() and torch.equal(box, padded[(slice(None), *sl)])


def test_compact_weights_and_listed_consensus_equal_the_dense_forms():
    rng = np.random.default_rng(2)
    shape = (18, 12, 14)
    base = np.zeros(shape, np.int64)
    base[4:14, 3:9, 3:11] = 1
    base[7:11, 5:7, 5:9] = 2
    near = np.zeros(shape, bool)
    near[7:11] = True                                  # the atlases disagree only in a slab: the rest is unanimous
    labs = [torch.from_numpy(np.where(near & (rng.random(shape) < 0.2), rng.integers(0, 3, shape), base))
            for _ in range(4)]
    compact = [labs[0].to(torch.uint8), labs[1].to(torch.int16), labs[2].to(torch.int32), labs[3]]
    for r in (0, 1, 2):
        assert torch.equal(consensus(compact, r), consensus(torch.stack(labs), r))
    imgs = [torch.from_numpy((base + rng.normal(0, 0.3, shape)).astype(np.float32) / 3) for _ in range(4)]
    tgt = torch.from_numpy((base / 3).astype(np.float32))
    dense = joint_label_fusion(imgs, tgt, compact, patch_radius=1, search_radius=1, block=5)
    small = joint_label_fusion(imgs, tgt, compact, patch_radius=1, search_radius=1, block=5, compact_weights=True)
    w = small[2]
    assert isinstance(w, AtlasWeights) and len(w) == 4 and w.shape == dense[2].shape
    assert 0 < w.index.size < np.prod(shape) and w.nbytes < dense[2].nbytes
    for i in range(4):
        assert w[i].dtype == np.float32 and np.array_equal(w[i], dense[2][i])
    assert np.array_equal(np.asarray(w), dense[2]) and np.array_equal(small[0], dense[0])
    np.testing.assert_allclose(np.asarray(w).sum(0), 1.0, atol=1e-5)
