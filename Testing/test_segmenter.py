"""The surrogate U-Net: training lowers the loss on a real crop, resumes from its checkpoint, saves as
safetensors + JSON and reloads (without pickle) to identical predictions."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib.errors import Cancelled, MASRefineError
from MASRefineLib.geometry import Grid
from MASRefineLib.imageio import normalize_intensity
from MASRefineLib.labels import LabelTable
from MASRefineLib.segmenter import SegmenterSettings, UNetSegmenter, train_segmenter
from MASRefineLib.warp import image_tensor

TINY = dict(spacing_mm=2.0, patch_size=24, channels=(4, 8, 16), strides=(2, 2), num_res_units=0, batch_size=2,
            learning_rate=5e-3, validation_fraction=0.0)


def _grouped(lab: sitk.Image) -> sitk.Image:
    """The real parcellation merged into 3 structures (parcel value mod 3), so the network stays tiny."""
    a = sitk.GetArrayFromImage(lab).astype(np.int64)
    g = np.where(a > 0, a % 3 + 1, 0).astype(np.uint16)
    out = sitk.GetImageFromArray(g)
    out.CopyInformation(lab)
    return out


@pytest.fixture(scope="module")
def data(ixi_crop):
    img, lab = ixi_crop
    lab = _grouped(lab)
    return img, lab, LabelTable.from_values([1, 2, 3])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    img, lab, table = data
    d = tmp_path_factory.mktemp("models")
    s = SegmenterSettings(epochs=6, steps_per_epoch=4, **TINY)
    return train_segmenter([img], [lab], table, d, s, ids=["a"], device="cpu"), d


def test_training_lowers_the_loss_and_saves_safetensors_and_json(trained):
    seg, d = trained
    hist = seg.meta["training"]["history"]
    assert len(hist) == 6
    # the default loss is cross entropy + soft Dice; the Dice part (up to 1) falls more slowly
    assert np.mean([h["loss"] for h in hist[-2:]]) < 0.9 * hist[0]["loss"]
    meta = json.loads((d / "segmenter.json").read_text())
    assert meta["label_values"] == [0, 1, 2, 3] and meta["spacing_mm"] == 2.0
    assert meta["normalisation"]["function"].endswith("normalize_intensity")
    assert meta["settings"]["epochs"] == 6 and meta["architecture"]["out_channels"] == 4
    assert meta["settings"]["loss"] == "dice_ce"  # "auto", stored resolved: 3 structures
    # safetensors layout: 8-byte little-endian header length, then a JSON header
    raw = (d / "segmenter.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + n])


def test_reloads_without_pickle_to_identical_predictions(trained, data, monkeypatch):
    seg, d = trained
    img = data[0]
    grid = Grid.from_image(img)
    x = image_tensor(normalize_intensity(sitk.GetArrayFromImage(img)))
    p1 = seg.predict(x, grid)

    def no_pickle(*a, **k):
        raise AssertionError("pickle must not be used to load weights")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    back = UNetSegmenter.load(d, "cpu")
    p2 = back.predict(x, grid)
    assert torch.equal(p1, p2)
    assert p1.shape == (1, 4, *grid.shape)
    assert torch.allclose(p1.sum(1), torch.ones(1), atol=1e-4)
    # on another grid (coarser, same field of view): still probabilities, and the labels are label values
    other = grid.with_spacing(3.0)
    q = back.predict(x, grid, other)
    assert q.shape == (1, 4, *other.shape) and torch.allclose(q.sum(1), torch.ones(1), atol=1e-4)
    lab = back.predict_labels(img)
    assert lab.shape == grid.shape and set(np.unique(lab)) <= {0, 1, 2, 3}


def test_interrupted_training_resumes_from_its_checkpoint(data, tmp_path):
    img, lab, table = data
    s = SegmenterSettings(epochs=3, steps_per_epoch=2, **TINY)

    def stop_in_epoch_2(ev):
        if ev.data.get("epoch") == 2:
            raise Cancelled("stop")
    with pytest.raises(Cancelled):
        train_segmenter([img], [lab], table, tmp_path / "a", s, ids=["a"], device="cpu", progress=stop_in_epoch_2)
    ck = json.loads((tmp_path / "a" / "segmenter.checkpoint.json").read_text())
    assert ck["epoch"] == 1 and not (tmp_path / "a" / "segmenter.json").exists()
    resumed = train_segmenter([img], [lab], table, tmp_path / "a", s, ids=["a"], device="cpu")
    straight = train_segmenter([img], [lab], table, tmp_path / "b", s, ids=["a"], device="cpu")
    assert [h["loss"] for h in resumed.meta["training"]["history"]] == \
        pytest.approx([h["loss"] for h in straight.meta["training"]["history"]], rel=1e-5)
    for k, v in straight.net.state_dict().items():
        assert torch.allclose(resumed.net.state_dict()[k], v, atol=1e-6), k
    # other settings with the same checkpoint: a clear error, not a silent restart
    with pytest.raises(MASRefineError, match="--fresh"):
        train_segmenter([img], [lab], table, tmp_path / "a", SegmenterSettings(**{**s.to_json(), "patch_size": 16}),
                        ids=["a"], device="cpu")


def test_train_cli_on_an_atlas_set(data, tmp_path):
    pytest.importorskip("MASRefineLib.atlas")
    from MASRefineLib.cli import main
    img, lab, table = data
    (tmp_path / "set").mkdir()
    sitk.WriteImage(img, str(tmp_path / "set" / "a_img.nii.gz"))
    sitk.WriteImage(lab, str(tmp_path / "set" / "a_lab.nii.gz"))
    (tmp_path / "set" / "atlas.json").write_text(json.dumps({
        "schema_version": 1, "labels": table.to_json_dict(),
        "atlases": [{"id": "a", "image": "a_img.nii.gz", "label": "a_lab.nii.gz"}]}))
    rc = main(["train", "segmenter", str(tmp_path / "set"), "--epochs", "1", "--steps-per-epoch", "2",
               "--patch-size", "16", "--channels", "4", "8", "--spacing", "2", "--sampling", "class", "--device", "cpu",
               "--quiet"])
    assert rc == 0
    assert json.loads((tmp_path / "set" / "models" / "segmenter.json").read_text())["settings"]["sampling"] == "class"
    seg = UNetSegmenter.load(tmp_path / "set")
    assert seg.num_classes == 4 and seg.settings.patch_size == 16
    assert main(["train", "segmenter", str(tmp_path / "nowhere"), "--quiet"]) == 2


def test_many_labels_get_a_1x1_head_that_saves_and_reloads(ixi_crop, tmp_path):
    """With more classes than twice the first feature width (a brain parcellation) the U-Net ends at that
    width and a 1x1x1 convolution gives the classes (a full-resolution 3x3x3 layer over ~150 class channels
    made CPU training ~15x slower); the head is recorded in the JSON and reloads to identical predictions."""
    img, lab = ixi_crop
    a = sitk.GetArrayFromImage(lab).astype(np.int64)
    parcels = sorted(set(np.unique(a).tolist()) - {0})[:12]           # 12 real structures, the rest background
    g = sitk.GetImageFromArray(np.where(np.isin(a, parcels), a, 0).astype(np.uint16))
    g.CopyInformation(lab)
    table = LabelTable.from_values(parcels)
    s = SegmenterSettings(epochs=1, steps_per_epoch=2, **TINY)       # channels (4, 8, 16): head width 8 < 13 classes
    seg = train_segmenter([img], [g], table, tmp_path, s, ids=["a"], device="cpu")
    meta = json.loads((tmp_path / "segmenter.json").read_text())
    assert meta["architecture"]["out_channels"] == 13 and meta["architecture"]["head"]["width"] == 8
    assert isinstance(seg.net, torch.nn.Sequential) and seg.net[-1].out_channels == 13
    grid = Grid.from_image(img)
    x = image_tensor(normalize_intensity(sitk.GetArrayFromImage(img)))
    p1 = seg.predict(x, grid)
    p2 = UNetSegmenter.load(tmp_path, "cpu").predict(x, grid)
    assert p1.shape == (1, 13, *grid.shape) and torch.equal(p1, p2)
    # few classes: MONAI's U-Net as it is (the knee and phantom models stay loadable unchanged)
    from MASRefineLib.segmenter import build_unet, head_width
    assert head_width(5, (8, 16, 32, 64)) is None and not isinstance(build_unet(5), torch.nn.Sequential)


def test_the_cross_entropy_recipe_trains_and_recipes_are_recorded_and_keyed_for_resuming(data, tmp_path):
    """The other recipe (cross entropy on patches centred on any labelled voxel, the default before session 10)
    trains too; the recipe is stored with the model, a checkpoint of one recipe is not resumed with another, and a
    model stored before the recipe was a setting reads as that recipe."""
    img, lab, table = data
    s = SegmenterSettings(epochs=6, steps_per_epoch=4, sampling="foreground", loss="ce", **TINY)
    seg = train_segmenter([img], [lab], table, tmp_path / "m", s, ids=["a"], device="cpu")
    hist = [h["loss"] for h in seg.meta["training"]["history"]]
    assert np.mean(hist[-2:]) < 0.8 * hist[0]
    meta = json.loads((tmp_path / "m" / "segmenter.json").read_text())
    assert meta["settings"]["sampling"] == "foreground" and meta["settings"]["loss"] == "ce"
    with pytest.raises(MASRefineError, match="a checkpoint with other data or settings"):
        train_segmenter([img], [lab], table, tmp_path / "m", SegmenterSettings(epochs=7, steps_per_epoch=4, **TINY),
                        ids=["a"], device="cpu")
    old = SegmenterSettings.from_json({k: v for k, v in meta["settings"].items() if k not in ("loss", "sampling")})
    assert (old.loss, old.sampling) == ("ce", "foreground")
    assert (SegmenterSettings().loss, SegmenterSettings().sampling) == ("auto", "class")
    from MASRefineLib.segmenter import auto_loss
    assert auto_loss(4) == "dice_ce" and auto_loss(148) == "ce"  # knees / brains (docs/refinement.md)
    # a checkpoint written before the recipe was stored resumes with its own recipe under the new defaults
    ck = tmp_path / "m" / "segmenter.checkpoint.json"
    info = json.loads(ck.read_text())
    info["settings"] = {k: v for k, v in info["settings"].items() if k not in ("loss", "sampling")}
    ck.write_text(json.dumps(info))
    more = train_segmenter([img], [lab], table, tmp_path / "m", SegmenterSettings(epochs=7, steps_per_epoch=4, **TINY),
                           ids=["a"], device="cpu")
    assert len(more.meta["training"]["history"]) == 7 and more.settings.loss == "ce"
    assert more.meta["training"]["history"][:6] == seg.meta["training"]["history"]
    with pytest.raises(MASRefineError, match="unknown loss 'dice'"):
        train_segmenter([img], [lab], table, tmp_path / "x", SegmenterSettings(loss="dice", **TINY), device="cpu")


def test_both_models_are_stored_by_one_helper_byte_for_byte_as_before(tmp_path):
    """modelio.save_model writes the segmenter's and VoteNet+'s files (#20): the same bytes as the two writers it
    replaced (reproduced here), and each model loads back to the same weights."""
    from safetensors.torch import save
    from MASRefineLib.fusion.votenet import DEFAULT_ARCH, FORMAT, VoteNetModel, build_network
    from MASRefineLib.jsonio import json_default
    from MASRefineLib.segmenter import build_unet

    def state(net):
        return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}

    torch.manual_seed(0)
    seg = UNetSegmenter(build_unet(4), [0, 1, 2, 3], LabelTable.from_values([1, 2, 3]), 2.0, SegmenterSettings())
    path = seg.save(tmp_path / "seg")
    meta = {**seg.metadata(), "weights": "segmenter.safetensors"}
    assert path.read_text() == json.dumps(meta, indent=1, default=json_default) + "\n"
    assert (tmp_path / "seg" / "segmenter.safetensors").read_bytes() == save(state(seg.net))
    back = UNetSegmenter.load(path)
    assert all(torch.equal(v, back.net.state_dict()[k]) for k, v in seg.net.state_dict().items())

    vn = VoteNetModel(build_network(dict(DEFAULT_ARCH)), dict(DEFAULT_ARCH), 1.5, -0.25, {"note": "test"})
    path = vn.save(tmp_path / "vn", "votenet-affine")
    doc = json.loads(path.read_text())
    assert path.read_text() == json.dumps(doc, indent=1) + "\n"
    assert list(doc)[:4] == ["note", "format", "format_version", "weights"] and doc["weights"] == "votenet-affine.safetensors"
    assert (tmp_path / "vn" / "votenet-affine.safetensors").read_bytes() == save(state(vn.net), metadata={"format": FORMAT})
    back = VoteNetModel.load(tmp_path / "vn", "votenet-affine")
    assert (back.a, back.b) == (1.5, -0.25)
    assert all(torch.equal(v, back.net.state_dict()[k]) for k, v in vn.net.state_dict().items())
