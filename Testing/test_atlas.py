"""Atlas sets: init from the real data folders (IXI with MUSE names, a synthesized knee), validation errors
one line each naming the file, the CLI, and the subject split used by benchmarks."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MASRefineLib.atlas import AtlasSet, init_atlas_set, inspect_atlas_set
from MASRefineLib.cli import main
from MASRefineLib.errors import MASRefineError
from MASRefineLib.geometry import Grid

from conftest import ROOT, SYNTH_KNEE, KNEE, crop, ixi_paths

sys.path.insert(0, str(ROOT))
from bench import datasets  # noqa: E402

START, SIZE = (36, 36, 25), (48, 48, 40)  # a real crop through the ventricles and deep grey matter


def _values(path) -> set[int]:
    return set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist()) - {0}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def crops(tmp_path, ixi_dir, ixi_ids):
    """images/ and labels/ with real crops of three IXI subjects (the user's data for these tests)."""
    data = tmp_path / "data"
    for sid in ixi_ids[:3]:
        img_p, lab_p = ixi_paths(ixi_dir, sid)
        for src, sub in ((img_p, "images"), (lab_p, "labels")):
            (data / sub).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(crop(sitk.ReadImage(str(src)), START, SIZE), str(data / sub / f"{sid}.nii.gz"))
    return data


def test_init_ixi_subset_in_place(tmp_path, ixi_dir, ixi_ids, monkeypatch):
    ids = ixi_ids[:3]
    out = tmp_path / "sets" / "ixi3"
    aset = init_atlas_set(out, ixi_dir / "images", ixi_dir / "labels", ixi_dir / "MUSE_listROIs.csv", ids=ids)
    assert aset.ids == ids
    raw = json.loads((out / "atlas.json").read_text())
    assert raw["schema_version"] == 1 and [a["id"] for a in raw["atlases"]] == ids
    for a, sid in zip(raw["atlases"], ids):
        # stored relative to the set folder, pointing at the data where they are (nothing copied)
        assert not os.path.isabs(a["image"]) and a["image"].startswith("../")
        img_p, lab_p = ixi_paths(ixi_dir, sid)
        assert os.path.samefile(out / a["image"], img_p) and os.path.samefile(out / a["label"], lab_p)
    assert sorted(p.name for p in out.iterdir()) == ["atlas.json"]
    assert (out / "atlas.json").stat().st_mode & 0o777 == 0o666 & ~_umask()  # as open() would, not mkstemp's 0o600

    # the label table: exactly the values present, MUSE names where the CSV has them
    present = set().union(*(_values(ixi_paths(ixi_dir, s)[1]) for s in ids))
    with open(ixi_dir / "MUSE_listROIs.csv", newline="") as f:
        muse = {int(r["Index"]): r["Name"] for r in csv.DictReader(f)}
    assert set(aset.label_table) == present
    named = [v for v in present if v in muse]
    assert len(named) > 100
    for v in present:
        assert aset.label_table[v].name == (muse[v] if v in muse else f"label {v}")
    assert any("not in this table" in n for n in aset.notes) == bool(present - set(muse))

    report = inspect_atlas_set(out)
    assert report.errors == [] and report.n_atlases == 3
    assert "3 atlases" in report.summary() and "120x120x90" in report.summary()

    # reading resolves paths against the set folder, whatever the working directory
    monkeypatch.chdir(tmp_path)
    loaded = AtlasSet.load(out.resolve())
    img, lab = loaded.read(ids[1])
    assert img.GetPixelID() == sitk.sitkFloat32 and lab.GetPixelID() == sitk.sitkUInt16
    ref = sitk.ReadImage(str(ixi_paths(ixi_dir, ids[1])[0]))
    assert Grid.from_image(img) == Grid.from_image(ref) == loaded.grid(ids[1])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref).astype(np.float32))
    assert loaded.models_dir == out.resolve() / "models"
    with pytest.raises(MASRefineError, match="atlas.json"):
        loaded.image_path("nobody")


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_symlink_and_copy_never_overwrite(crops, tmp_path):
    before = {p: _digest(p) for p in crops.rglob("*.nii.gz")}
    s = init_atlas_set(tmp_path / "linked", crops / "images", crops / "labels", mode="symlink")
    c = init_atlas_set(tmp_path / "copied", crops / "images", crops / "labels", mode="copy")
    for aset in (s, c):
        assert [p for p in inspect_atlas_set(aset.root).problems if p.level == "error"] == []
        for a in aset:
            assert a.image == f"images/{a.id}.nii.gz" and a.label == f"labels/{a.id}.nii.gz"
            assert os.path.samefile(aset.image_path(a.id), crops / "images" / f"{a.id}.nii.gz") == (aset is s)
            assert _digest(aset.image_path(a.id)) == before[crops / "images" / f"{a.id}.nii.gz"]
    assert (s.root / "images" / f"{s.ids[0]}.nii.gz").is_symlink()
    assert not os.path.isabs(os.readlink(s.root / "images" / f"{s.ids[0]}.nii.gz"))
    # no generated names when nothing was given and no labels.json exists
    assert all(lab.name == f"label {v}" for v, lab in s.label_table.items())
    # an existing atlas.json is not replaced without overwrite; a different existing file is never replaced
    with pytest.raises(MASRefineError, match=str(tmp_path / "copied" / "atlas.json")):
        init_atlas_set(tmp_path / "copied", crops / "images", crops / "labels", mode="copy")
    victim = tmp_path / "copied" / "labels" / f"{c.ids[0]}.nii.gz"
    victim.write_bytes(b"someone else's file")
    with pytest.raises(MASRefineError, match=str(victim)):
        init_atlas_set(tmp_path / "copied", crops / "images", crops / "labels", mode="copy", overwrite=True)
    assert victim.read_bytes() == b"someone else's file"
    assert {p: _digest(p) for p in crops.rglob("*.nii.gz")} == before  # the user's data never changed


def _break(kind: str, aset: AtlasSet) -> Path:
    """Damage one atlas of a copied set; returns the file the error must name."""
    sid = aset.ids[1]
    img_p, lab_p = aset.image_path(sid), aset.label_path(sid)
    img, lab = sitk.ReadImage(str(img_p)), sitk.ReadImage(str(lab_p))
    if kind == "nan image":
        # as NRRD: ITK's NIfTI reader (nifticlib) silently turns non-finite floats into 0 on reading
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        a[20, 20, 20] = np.nan
        out = sitk.GetImageFromArray(a)
        out.CopyInformation(img)
        nrrd_p = img_p.with_name(f"{sid}.nrrd")
        sitk.WriteImage(out, str(nrrd_p))
        d = json.loads(aset.json_path.read_text())
        d["atlases"][1]["image"] = f"images/{sid}.nrrd"
        aset.json_path.write_text(json.dumps(d))
        return nrrd_p
    if kind == "2d image":
        sitk.WriteImage(img[:, :, 10], str(img_p))
        return img_p
    if kind == "empty label":
        sitk.WriteImage(lab * 0, str(lab_p))
        return lab_p
    if kind == "grid mismatch":
        lab.SetOrigin(tuple(o + 4.0 for o in lab.GetOrigin()))
        sitk.WriteImage(lab, str(lab_p))
        return lab_p
    if kind == "unknown label value":
        a = sitk.GetArrayFromImage(lab).astype(np.uint16)
        a[a == a.max()] = max(aset.label_table) + 17
        out = sitk.GetImageFromArray(a)
        out.CopyInformation(lab)
        sitk.WriteImage(out, str(lab_p))
        return lab_p
    if kind == "missing file":
        lab_p.unlink()
        return lab_p
    if kind == "truncated file":  # ITK would read it, zero-filling what is missing
        data = img_p.read_bytes()
        img_p.write_bytes(data[: len(data) // 3])
        return img_p
    if kind == "thin slab":
        sitk.WriteImage(img[:, :, 10:13], str(img_p))
        return img_p
    d = json.loads(aset.json_path.read_text())
    if kind == "duplicate id":
        d["atlases"].append(dict(d["atlases"][0]))
    elif kind == "bad schema":
        d["schema_version"] = "one"
    aset.json_path.write_text(json.dumps(d))
    return aset.json_path


KINDS = ["nan image", "2d image", "empty label", "grid mismatch", "unknown label value", "missing file",
         "truncated file", "thin slab", "duplicate id", "bad schema"]


def test_validation_errors_one_line_naming_the_file(crops, tmp_path):
    for kind in KINDS:
        aset = init_atlas_set(tmp_path / kind.replace(" ", "-"), crops / "images", crops / "labels", mode="copy")
        assert [p for p in inspect_atlas_set(aset.root).problems if p.level == "error"] == [], kind
        bad = _break(kind, aset)
        errors = [p for p in inspect_atlas_set(aset.root).problems if p.level == "error"]
        assert len(errors) == 1, (kind, errors)
        assert "\n" not in errors[0] and errors[0].startswith(str(bad)), (kind, errors[0])
        if kind in ("duplicate id", "bad schema"):
            with pytest.raises(MASRefineError, match=str(aset.json_path)):
                AtlasSet.load(aset.root)
        elif kind != "2d image":
            with pytest.raises(MASRefineError, match=str(bad)):
                AtlasSet.load(aset.root).read(aset.ids[1])


def test_differing_label_sets_warn(tmp_path, ixi_dir, ixi_ids):
    data = tmp_path / "data"
    img_p, lab_p = ixi_paths(ixi_dir, ixi_ids[0])
    img, lab = crop(sitk.ReadImage(str(img_p)), START, SIZE), crop(sitk.ReadImage(str(lab_p)), START, SIZE)
    a = sitk.GetArrayFromImage(lab)
    dropped = int(np.unique(a)[3])
    b = sitk.GetImageFromArray(np.where(a == dropped, 0, a).astype(a.dtype))
    b.CopyInformation(lab)
    for name, l in (("a", lab), ("b", lab), ("c", b)):
        (data / "images").mkdir(parents=True, exist_ok=True)
        (data / "labels").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(data / "images" / f"{name}.nii.gz"))
        sitk.WriteImage(l, str(data / "labels" / f"{name}.nii.gz"))
    aset = init_atlas_set(tmp_path / "set", data / "images", data / "labels")
    problems = inspect_atlas_set(aset.root).problems
    assert len(problems) == 1 and problems[0].level == "warning"
    assert problems[0].startswith(str(data / "labels" / "c.nii.gz")) and str(dropped) in problems[0]


def test_cli(crops, tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["atlas", "init", str(out), "--images", str(crops / "images"), "--labels", str(crops / "labels")]) == 0
    text = capsys.readouterr().out
    assert "3 atlases" in text and str(out) in text
    assert main(["atlas", "check", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(str(out)) and "3 atlases" in last and "48x48x40" in last and "ok" in last
    # init refuses to replace atlas.json (exit 2, one line naming it)
    assert main(["atlas", "init", str(out), "--images", str(crops / "images"), "--labels", str(crops / "labels")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out / "atlas.json") in err
    # a broken set: exit 1 and the problem on its own line
    lab = AtlasSet.load(out).label_path(AtlasSet.load(out).ids[0])
    lab.unlink()
    assert main(["atlas", "check", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith(f"{lab}: file not found") for line in lines)
    assert "1 error" in lines[-1]
    assert main(["atlas", "check", str(tmp_path / "nowhere")]) == 1


def test_split_is_disjoint_and_reproducible():
    ids = [f"s{i:03d}" for i in range(40)]
    a, t = datasets.split(ids, 10, 5, seed=3)
    assert len(a) == 10 and len(t) == 5 and not set(a) & set(t) and set(a) | set(t) <= set(ids)
    assert datasets.split(ids, 10, 5, seed=3) == (a, t) and datasets.split(ids, 10, 5, seed=4) != (a, t)
    assert datasets.split(ids, 3, 2, shuffle=False) == (ids[:3], ids[3:5])
    with pytest.raises(ValueError):
        datasets.split(ids, 30, 11)
    with pytest.raises(ValueError):
        datasets.split(ids + ids[:1], 2, 2)


def test_knee_atlas_set_from_synthesized_knee(tmp_path):
    if not (SYNTH_KNEE.exists() and KNEE.exists()):
        pytest.skip(f"real data not available: {SYNTH_KNEE} or {KNEE} is missing")
    sid = datasets.knee_subjects()[0]
    kd = datasets.knee_dataset([sid], verbose=False)  # ~12 s the first time, then cached in .cache/knee
    assert kd == ROOT / ".cache" / "knee" and (kd / "images" / f"{sid}.nii.gz").exists()
    assert datasets.knee_dataset([sid], verbose=False) == kd  # cached: nothing to do
    # labels.json beside the labels folder is the label table; restricted to the values present
    aset = init_atlas_set(tmp_path / "knee", kd / "images", kd / "labels", ids=[sid])
    names = json.loads((kd / "labels.json").read_text())
    present = _values(kd / "labels" / f"{sid}.nii.gz")
    assert set(aset.label_table) == present and present <= {int(k) for k in names}
    for v in present:
        assert aset.label_table[v].name == names[str(v)]["name"]
        assert list(aset.label_table[v].color) == names[str(v)]["color"]
    report = inspect_atlas_set(aset.root)
    assert report.problems == [] and report.n_atlases == 1
    g = next(iter(report.grids))
    np.testing.assert_allclose(g.spacing, 0.7, rtol=1e-4)


def test_gzip_check_reads_every_member_and_leaves_uncompressed_files_to_itk(tmp_path):
    """A multi-member gzip file is read whole (a truncated last member is refused), and a file named .nii.gz
    that is not compressed, which ITK reads, is not refused."""
    import gzip
    from MASRefineLib.imageio import read_image
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((10, 11, 12)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "raw.nii"))
    raw = (tmp_path / "raw.nii").read_bytes()
    (tmp_path / "plain.nii.gz").write_bytes(raw)
    assert read_image(tmp_path / "plain.nii.gz").GetSize() == (12, 11, 10)
    two = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    (tmp_path / "two.nii.gz").write_bytes(two)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "two.nii.gz")), sitk.GetArrayFromImage(img))
    (tmp_path / "cut.nii.gz").write_bytes(two[:-40])
    with pytest.raises(MASRefineError, match=r"cut.nii.gz: truncated file"):
        read_image(tmp_path / "cut.nii.gz")
