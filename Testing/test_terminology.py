"""Standard terminology of segments (issue #23 item 8): MASRefineLib/terminology.py, the label table's
``terminology`` (atlas.json, CSV column, the atlas set's terminology.json), the built-in knee and MUSE codes given by
``atlas init``, and the ``TerminologyEntry`` tag of every ``.seg.nrrd`` segment, as Slicer reads it."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from MASRefineLib import sampledata, terminology
from MASRefineLib.atlas import AtlasSet, init_atlas_set, inspect_atlas_set
from MASRefineLib.errors import MASRefineError
from MASRefineLib.labels import Label, LabelTable, read_seg_nrrd, write_label_outputs

HIPPOCAMPUS_R = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
                 "SCT^5366008^Hippocampus~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^")


def _label_map(values=(1, 2)):
    arr = np.zeros((8, 9, 10), np.uint16)
    for i, v in enumerate(values):
        arr[2 + 2 * i: 4 + 2 * i, 2:6, 2:6] = v
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.6, 0.7))
    return img


def _tags(seg_path) -> dict[int, str]:
    """The raw ``SegmentN_Tags`` header fields of a .seg.nrrd (what vtkMRMLSegmentationStorageNode reads)."""
    header = seg_path.read_bytes().split(b"\n\n", 1)[0].decode("latin-1")
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^Segment(\d+)_Tags:=(.*)$", header, re.M)}


def test_seg_nrrd_segments_carry_the_terminology_tag_and_read_back(tmp_path):
    table = LabelTable({1: Label("Hippocampus_R", (220, 216, 20), HIPPOCAMPUS_R), 2: Label("other", (10, 20, 30))})
    out = write_label_outputs(_label_map(), table, tmp_path / "fused")
    tags = _tags(out["seg_nrrd"])
    assert f"TerminologyEntry:{HIPPOCAMPUS_R}|" in tags[0]
    assert "TerminologyEntry" not in tags.get(1, "")  # no code rather than a guess
    _, back = read_seg_nrrd(out["seg_nrrd"])
    assert back[1].terminology == HIPPOCAMPUS_R and back[2].terminology is None
    assert LabelTable.from_json_dict(back.to_json_dict()) == back  # atlas.json keeps it


@pytest.mark.parametrize("bad, message", [
    ("not an entry", "7 '~'-separated components"),
    (HIPPOCAMPUS_R.replace("SCT^5366008^Hippocampus", "^^"), "type must be 'scheme"),
    (HIPPOCAMPUS_R.replace("SCT^24028007^Right", "SCT^24028007"), "type modifier must be"),
    (HIPPOCAMPUS_R + "|Segmentation.Status:done", "without '|'"),
    (42, "must be a Slicer TerminologyEntry string"),
])
def test_bad_terminology_is_one_line_naming_the_label(bad, message, tmp_path):
    with pytest.raises(MASRefineError, match=re.escape(message)) as e:
        LabelTable.from_json_dict({"3": {"name": "x", "terminology": bad}}, "labels.json")
    assert str(e.value).startswith("labels.json: label 3: ") and "\n" not in str(e.value)


def test_every_built_in_code_is_a_valid_entry_and_names_match_exactly():
    for name, entry in terminology.KNOWN.items():
        assert terminology.parse(entry) == entry
        assert terminology.from_slicerio(terminology.to_slicerio(entry)) == entry, name
    assert terminology.for_name("Hippocampus_R") == HIPPOCAMPUS_R
    assert "SCT^7771000^Left" in terminology.for_name("Hippocampus_L")
    assert terminology.for_name("Femoral_Cartilage") == terminology.KNEE["femoral cartilage"]
    assert "Cartilage~^^~Anatomic codes - DICOM master list~SCT^71341001^Femur" in terminology.KNEE["femoral cartilage"]
    # not coded: other spellings of MUSE names, cortical parcels, white matter, composites
    for name in ("hippocampus_r", "Hippocampus", "SuperiorFrontalGyrus_R", "Frontal_WM_R", "Cerebellum_L",
                 "TotalBrain", "Ventricles", "label 7"):
        assert terminology.for_name(name) is None, name


def _atlas_inputs(tmp_path, names):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for sid in ("s1", "s2"):
        lab = _label_map(tuple(names))
        img = sitk.GetImageFromArray(rng.random(sitk.GetArrayFromImage(lab).shape).astype(np.float32))
        img.CopyInformation(lab)
        sitk.WriteImage(img, str(images / f"{sid}.nii.gz"))
        sitk.WriteImage(lab, str(labels / f"{sid}.nii.gz"))
    return images, labels


def test_atlas_init_codes_known_names_and_keeps_the_tables_own(tmp_path):
    images, labels = _atlas_inputs(tmp_path, (47, 171, 4))
    csv = tmp_path / "MUSE_listROIs.csv"
    own = HIPPOCAMPUS_R.replace("Hippocampus~SCT^24028007^Right", "Hippocampus~SCT^7771000^Left")  # the user's word
    csv.write_text("Index,Code,Name,Terminology\n47,MUSE_47,Hippocampus_R,\n171,MUSE_171,ParahippocampalGyrus_L,\n"
                   f"4,MUSE_4,3rdVentricle,{own}\n")
    aset = init_atlas_set(tmp_path / "set", images, labels, csv)
    t = aset.label_table
    assert t[47].terminology == HIPPOCAMPUS_R  # built in, from the exact MUSE name
    assert t[171].terminology is None  # a cortical parcel: left without a code
    assert t[4].terminology == own  # the table's own entry wins over the built-in one
    saved = json.loads((tmp_path / "set" / "atlas.json").read_text())["labels"]
    assert saved["47"]["terminology"] == HIPPOCAMPUS_R and "terminology" not in saved["171"]
    assert AtlasSet.load(tmp_path / "set").label_table == t


def test_terminology_json_in_the_atlas_set_is_applied_and_checked(tmp_path):
    images, labels = _atlas_inputs(tmp_path, (1, 2))
    init_atlas_set(tmp_path / "set", images, labels)
    term = tmp_path / "set" / "terminology.json"
    term.write_text(json.dumps({"2": terminology.KNEE["tibia"]}))
    t = AtlasSet.load(tmp_path / "set").label_table
    assert t[2].terminology == terminology.KNEE["tibia"] and t[1].terminology is None
    term.write_text(json.dumps({"9": terminology.KNEE["tibia"]}))
    with pytest.raises(MASRefineError, match=r"terminology\.json: label values \[9\] are not in the label table"):
        AtlasSet.load(tmp_path / "set")
    term.write_text(json.dumps({"2": "femur"}))
    rep = inspect_atlas_set(tmp_path / "set")
    assert not rep.ok and any("terminology.json" in str(p) and "7 '~'-separated" in str(p) for p in rep.errors)


def test_the_phantom_atlas_set_ships_the_knee_codes(tmp_path):
    sample = sampledata.make_sample(tmp_path / "phantom", n_atlases=2)
    table = AtlasSet.load(sample["atlas_dir"]).label_table
    assert {v.name: v.terminology for v in table.values()} == {n: terminology.KNEE[n] for n in
                                                               ("femur", "femoral cartilage", "tibia", "tibial cartilage")}
