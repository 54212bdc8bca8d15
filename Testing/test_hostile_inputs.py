"""Hostile and broken inputs (issue #25): every bad input is one line naming the file (exit 2 on the command line,
``invalid-job`` / ``input`` from the worker), nothing outside the output folder is touched, no input file changes,
and no geometry or voxel value is silently changed.

One class per test, each on small generated inputs (the built-in phantom, 24^3 voxels, or 10^3 volumes written
here): atlas ids that are paths, sheared / degenerate / implausible geometry, truncated files in every format
(attached, detached and compressed data), NaN in NIfTI, pathological JSON in job files and atlas.json, corrupt
and malformed models, failing writes, interrupts during start-up, read-only model folders, misleading messages.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MASRefineLib import sampledata, validate
from MASRefineLib.protocol import jobs
from MASRefineLib.atlas import AtlasSet, init_atlas_set, inspect_atlas_set
from MASRefineLib.cli import main
from MASRefineLib.errors import MASRefineError
from MASRefineLib.imageio import read_grid, read_image, read_label
from MASRefineLib.jsonio import read_json
from MASRefineLib.outputs import inside, prepare_output_dir


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    return sampledata.make_sample(tmp_path_factory.mktemp("hostile") / "sample", n_atlases=3, size=(24, 24, 24),
                                  spacing=3.5)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes (links not followed)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and the lines of stderr."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = int(e.code)
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def copy_set(sample: dict, dest: Path, **changes) -> Path:
    """The sample atlas set as a new set in ``dest`` referencing the same files (absolute paths), with ``changes``
    applied to atlas.json's top level; returns the folder."""
    src = AtlasSet.load(sample["atlas_dir"])
    d = json.loads(src.json_path.read_text())
    for a in d["atlases"]:
        a["image"], a["label"] = str(src.image_path(a["id"])), str(src.label_path(a["id"]))
    d.update(changes)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "atlas.json").write_text(json.dumps(d))
    return dest


def volume(dtype=np.float32, size=10, seed=0) -> sitk.Image:
    a = (np.random.default_rng(seed).random((size, size, size)) * 100).astype(dtype)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.0, 1.2, 1.5))
    img.SetOrigin((-10.0, 5.0, 3.0))
    return img


# --------------------------------------------------------------------------- 1. ids are names, not paths
@pytest.mark.parametrize("bad_id", ["../escape", "/tmp/abs", "a/b", "..", ".hidden", "x\\y", "a b", ""])
def test_atlas_ids_that_are_paths_are_refused_when_a_set_is_read(sample, tmp_path, bad_id):
    d = json.loads(Path(sample["atlas_dir"], "atlas.json").read_text())
    d["atlases"][0]["id"] = bad_id
    aset = copy_set(sample, tmp_path / "set", atlases=d["atlases"])
    with pytest.raises(MASRefineError, match=r"atlas.json: atlas entry 1") as e:
        AtlasSet.load(aset)
    assert "\n" not in str(e.value)
    assert any("atlas entry 1" in p and p.level == "error" for p in inspect_atlas_set(aset).problems)


def test_segment_with_a_path_id_writes_nothing_outside_out(sample, tmp_path, capsys):
    d = json.loads(Path(sample["atlas_dir"], "atlas.json").read_text())
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep_image.nrrd").write_text("user data")
    d["atlases"][0]["id"] = f"../../victim/keep"  # would be OUT/atlases/../../victim/keep_image.nrrd
    aset = copy_set(sample, tmp_path / "set", atlases=d["atlases"])
    before = snapshot(tmp_path)
    rc, err = cli(["segment", "--atlases", aset, "--target", sample["target"], "--out", tmp_path / "out",
                   "--prereg", "affine", "--refine", "none", "--fusion", "pv", "--preset", "fast", "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and "atlas.json" in err[0] and "not a plain name" in err[0], err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "/out/" not in k} == before  # nothing changed or created elsewhere
    assert (victim / "keep_image.nrrd").read_text() == "user data"


def test_output_names_and_report_ids_cannot_leave_the_folder(tmp_path):
    for name in ("../x.nii.gz", "/etc/x", "a/b.nrrd", "..", "", "a\\b"):
        with pytest.raises(MASRefineError, match="not a plain file name"):
            inside(tmp_path, name)
    assert inside(tmp_path, "knee01_image.nrrd") == tmp_path / "knee01_image.nrrd"
    # a registered folder's report.json is an input too: its ids and file names are checked
    from MASRefineLib.warped import WarpedSet
    reg = tmp_path / "reg"
    reg.mkdir()
    grid = {"size": [8, 8, 8], "spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    doc = {"schema_version": 1, "stage": "affine", "grid": grid, "labels": {"1": {"name": "a", "color": [1, 2, 3]}},
           "atlases": [{"id": "../../evil", "files": {"image": "x", "label": "y", "field": "z"}}]}
    (reg / "report.json").write_text(json.dumps(doc))
    with pytest.raises(MASRefineError, match=r"report.json: atlas id '\.\./\.\./evil' is not a plain name"):
        WarpedSet.load(reg)
    doc["atlases"][0] = {"id": "ok", "files": {"image": "../../etc/passwd", "label": "y", "field": "z"}}
    (reg / "report.json").write_text(json.dumps(doc))
    with pytest.raises(MASRefineError, match="not a plain file name"):
        WarpedSet.load(reg)
    del doc["grid"]
    (reg / "report.json").write_text(json.dumps(doc))
    with pytest.raises(MASRefineError, match=r"report.json: malformed report .*grid"):
        WarpedSet.load(reg)


def test_atlas_init_refuses_file_names_that_are_not_ids(sample, tmp_path):
    aset = AtlasSet.load(sample["atlas_dir"])
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    aid = aset.ids[0]
    os.symlink(aset.image_path(aid), images / "case 1.nii.gz")
    os.symlink(aset.label_path(aid), labels / "case 1.nii.gz")
    with pytest.raises(MASRefineError, match=r"case 1.nii.gz: atlas id 'case 1' is not a plain name"):
        init_atlas_set(tmp_path / "set", images, labels)
    assert not (tmp_path / "set" / "atlas.json").exists()



def test_atlas_ids_differing_only_by_case_are_duplicates(sample, tmp_path):
    """'A1' and 'a1' become the same output files on macOS and Windows: refused in atlas.json, by atlas init and
    by atlas-building (a new id differs from every existing one whatever the case)."""
    d = json.loads(Path(sample["atlas_dir"], "atlas.json").read_text())
    first = d["atlases"][0]["id"]
    d["atlases"][1]["id"] = first.upper() if first.upper() != first else first.lower()
    aset = copy_set(sample, tmp_path / "set", atlases=d["atlases"])
    with pytest.raises(MASRefineError, match=rf"atlas.json: duplicate atlas id {d['atlases'][1]['id']!r} \(same as "
                                             rf"{first!r} on a case-insensitive file system\)"):
        AtlasSet.load(aset)
    src = AtlasSet.load(sample["atlas_dir"])
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for name, aid in (("Knee1", src.ids[0]), ("knee1", src.ids[1])):
        os.symlink(src.image_path(aid), images / f"{name}.nii.gz")
        os.symlink(src.label_path(aid), labels / f"{name}.nii.gz")
    with pytest.raises(MASRefineError, match=r"images: duplicate atlas id 'knee1' \(same as 'Knee1' on a case-insensitive"):
        init_atlas_set(tmp_path / "new", images, labels)
    assert not (tmp_path / "new" / "atlas.json").exists()
    from MASRefineLib.atlasbuild import _new_id
    assert _new_id("KNEE1", {"knee1"}) == "KNEE1-2"


# --------------------------------------------------------------------------- 2. geometry kept or refused
def test_sheared_and_degenerate_directions_are_refused_at_reading(tmp_path, sample, capsys):
    img = sitk.ReadImage(sample["target"])
    img.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))  # column j leans 26.6 degrees towards i: a shear
    sitk.WriteImage(img, str(tmp_path / "sheared.nrrd"))
    assert not np.allclose(np.reshape(sitk.ReadImage(str(tmp_path / "sheared.nrrd")).GetDirection(), (3, 3)).T @
                           np.reshape(sitk.ReadImage(str(tmp_path / "sheared.nrrd")).GetDirection(), (3, 3)),
                           np.eye(3), atol=1e-3)  # ITK keeps the shear: the file really is sheared
    with pytest.raises(MASRefineError, match=r"sheared.nrrd: direction matrix is not orthonormal \(axes i and j at "
                                             r"63.4° instead of 90°"):
        read_image(tmp_path / "sheared.nrrd")
    with pytest.raises(MASRefineError, match="not orthonormal"):
        read_grid(tmp_path / "sheared.nrrd")
    # degenerate: two axes parallel (ITK itself says only "0 0 1")
    text = (tmp_path / "sheared.nrrd").read_bytes()
    head, sep, data = text.partition(b"\n\n")
    lines = [ln if not ln.startswith(b"space directions:") else
             b"space directions: (3.5,0,0) (3.5,0,0) (0,0,3.5)" for ln in head.split(b"\n")]
    (tmp_path / "degenerate.nrrd").write_bytes(b"\n".join(lines) + sep + data)
    with pytest.raises(MASRefineError, match=r"degenerate.nrrd: direction matrix is degenerate \(axes i and j are "
                                             r"parallel\)"):
        read_image(tmp_path / "degenerate.nrrd")
    # the command line: one line, exit 2, nothing written
    rc, err = cli(["segment", "--atlases", sample["atlas_dir"], "--target", tmp_path / "sheared.nrrd",
                   "--out", tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and "not orthonormal" in err[0]
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "fused_labels.nii.gz").exists()


@pytest.mark.parametrize("field,value,message", [
    ("spacing", (1e-4, 1, 1), r"spacing 0.0001 mm along i is outside 0.01..50 mm"),
    ("spacing", (1, 1, 80), r"spacing 80 mm along k is outside"),
    ("origin", (0, 3e6, 0), r"origin y = 3e\+06 mm is outside ±100000 mm"),
])
def test_implausible_geometry_is_refused_with_the_value_named(tmp_path, field, value, message):
    img = volume()
    getattr(img, f"Set{field.capitalize()}")(value)
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        p = tmp_path / f"img{suffix}"
        sitk.WriteImage(img, str(p))
        with pytest.raises(MASRefineError, match=f"img{suffix.replace('.', '[.]')}: {message}"):
            read_image(p)


def test_absurd_size_and_label_count_are_refused_before_reading(tmp_path):
    # a header promising 5000 x 10 x 10 voxels: refused from the header, not by allocating
    (tmp_path / "big.nhdr").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 5000 10 10\nencoding: raw\n"
                                      "endian: little\ndata file: big.raw\n")
    (tmp_path / "big.raw").write_bytes(b"\0" * 16)
    with pytest.raises(MASRefineError, match=r"big.nhdr: size 5000x10x10 is outside 1..4096 voxels per axis"):
        read_image(tmp_path / "big.nhdr")
    # an intensity image given as a label map: more distinct values than any parcellation
    lab = sitk.GetImageFromArray(np.arange(12 ** 3, dtype=np.uint16).reshape(12, 12, 12))
    sitk.WriteImage(lab, str(tmp_path / "many.nii.gz"))
    with pytest.raises(MASRefineError, match=r"many.nii.gz: 1727 distinct label values exceed 1000"):
        read_label(tmp_path / "many.nii.gz")


# --------------------------------------------------------------------------- 3. no zero-fill, no hidden NaN
def _cut(path: Path, keep: int) -> None:
    b = path.read_bytes()
    path.write_bytes(b[:len(b) - keep])


@pytest.mark.parametrize("name,compress", [("t.nii", False), ("t.nrrd", False), ("t.nrrd", True), ("t.mha", False),
                                           ("t.mha", True)])
def test_truncated_files_are_refused_in_every_format(tmp_path, name, compress):
    img = volume()
    p = tmp_path / name
    sitk.WriteImage(img, str(p), compress)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(p)), sitk.GetArrayFromImage(img))  # the whole file reads
    _cut(p, 200)
    with pytest.raises(MASRefineError, match=f"{name}: truncated file") as e:
        read_image(p)
    assert "No such file" not in str(e.value) and "\n" not in str(e.value)


def test_a_valid_gzip_of_a_truncated_nifti_is_refused(tmp_path):
    sitk.WriteImage(volume(), str(tmp_path / "t.nii"))
    raw = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(gzip.compress(raw[:-400]))  # the gzip stream itself is complete
    with pytest.raises(MASRefineError, match=r"t.nii.gz: truncated file: 3,600 bytes of voxel data, its header "
                                             r"promises 4,000"):
        read_image(tmp_path / "t.nii.gz")


@pytest.mark.parametrize("header,data", [("t.nhdr", "t.raw"), ("t.mhd", "t.raw")])
def test_truncated_detached_data_files_are_refused(tmp_path, header, data):
    sitk.WriteImage(volume(), str(tmp_path / header))
    assert (tmp_path / data).is_file()
    read_image(tmp_path / header)
    _cut(tmp_path / data, 1)
    with pytest.raises(MASRefineError, match=f"{data}: truncated file \\(the data file of .*{header}\\)"):
        read_image(tmp_path / header)
    (tmp_path / data).unlink()
    with pytest.raises(MASRefineError, match=f"{data}: data file of .*{header} not found"):
        read_image(tmp_path / header)


@pytest.mark.parametrize("name", ["n.nii", "n.nii.gz", "n.nrrd", "n.mha"])
def test_nan_is_found_in_every_format(tmp_path, name):
    a = sitk.GetArrayFromImage(volume())
    a[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / name))
    with pytest.raises(MASRefineError, match=f"{name}: .*NaN or infinite"):
        read_image(tmp_path / name)
    with pytest.raises(MASRefineError, match=f"{name}: .*NaN or infinite"):
        read_label(tmp_path / name)


def test_atlas_check_reports_a_truncated_atlas(sample, tmp_path, capsys):
    aset = AtlasSet.load(sample["atlas_dir"])
    sitk.WriteImage(sitk.ReadImage(str(aset.image_path(aset.ids[1]))), str(tmp_path / "cut.nii"))
    _cut(tmp_path / "cut.nii", 1000)
    s = copy_set(sample, tmp_path / "set")
    d2 = json.loads((s / "atlas.json").read_text())
    d2["atlases"][1]["image"] = str(tmp_path / "cut.nii")
    (s / "atlas.json").write_text(json.dumps(d2))
    errors = [p for p in inspect_atlas_set(s).problems if p.level == "error"]
    assert len(errors) == 1 and "cut.nii: truncated file" in errors[0] and f"(atlas {aset.ids[1]})" in errors[0], errors
    rc, _ = cli(["atlas", "check", s], capsys)
    assert rc != 0


# --------------------------------------------------------------------------- 4. one line, not a traceback
PATHOLOGICAL_JSON = {
    "not-utf8": b'{"schema_version": 1, "pipeline": "\xff\xfe"}',
    "deep": b"[" * 200000 + b"]" * 200000,
    "huge-number": b'{"schema_version": 1' + b"1" * 5000 + b"}",
    "nan": b'{"schema_version": NaN}',
    "list": b"[1, 2]",
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(PATHOLOGICAL_JSON))
def test_unreadable_job_files_are_invalid_jobs(sample, tmp_path, kind):
    from MASRefineLib.worker import EXIT_INVALID, EventWriter, Worker
    job = tmp_path / "job.json"
    job.write_bytes(PATHOLOGICAL_JSON[kind])
    buf = io.StringIO()
    assert Worker(job, EventWriter(buf)).run() == EXIT_INVALID
    evs = [json.loads(ln.split(" ", 1)[1]) for ln in buf.getvalue().splitlines()]
    assert [e["event"] for e in evs] == ["error"] and evs[0]["kind"] == "invalid-job"
    assert evs[0]["message"].startswith(str(job)) and "\n" not in evs[0]["message"]


@pytest.mark.parametrize("kind", sorted(PATHOLOGICAL_JSON))
def test_unreadable_atlas_json_is_one_line(sample, tmp_path, kind, capsys):
    s = tmp_path / "set"
    s.mkdir()
    (s / "atlas.json").write_bytes(PATHOLOGICAL_JSON[kind])
    with pytest.raises(MASRefineError, match=r"atlas.json: "):
        AtlasSet.load(s)
    rc, err = cli(["atlas", "check", s], capsys)
    assert rc != 0 and not any("Traceback" in ln for ln in err)
    (tmp_path / "x.json").write_bytes(PATHOLOGICAL_JSON[kind])
    if kind != "list":  # a list is JSON; the readers above refuse it as a set (or a job)
        with pytest.raises(MASRefineError, match=r"x.json: "):
            read_json(tmp_path / "x.json")


@pytest.mark.parametrize("kind", sorted(PATHOLOGICAL_JSON))
def test_manifests_markers_and_groups_go_through_the_one_json_reader(tmp_path, kind):
    """Manifests, output-folder markers and --groups files: one line whatever the bytes (not a
    UnicodeDecodeError or RecursionError), and a batch rerun treats a corrupt manifest as no result."""
    from MASRefineLib.batch import Target, finished_result
    from MASRefineLib.protocol.manifest import read_manifest
    from MASRefineLib.metrics import parse_groups
    from MASRefineLib.outputs import MARKER
    bad = PATHOLOGICAL_JSON[kind]
    run = tmp_path / "OUT" / "t1"
    run.mkdir(parents=True)
    (run / "manifest.json").write_bytes(bad)
    with pytest.raises(MASRefineError, match=r"manifest.json: "):
        read_manifest(run)
    assert finished_result(run, Target("t1", str(tmp_path / "t1.nii.gz")), tmp_path / "set", {}) is None
    with pytest.raises(MASRefineError, match=r"not empty and not a MASRefine output folder"):  # no marker
        prepare_output_dir(run, command="segment")
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / MARKER).write_bytes(bad)
    (marked / "x.txt").write_text("x")
    with pytest.raises(MASRefineError, match=r"not empty and not a MASRefine output folder"):
        prepare_output_dir(marked, command="evaluate")
    (tmp_path / "groups.json").write_bytes(bad)
    with pytest.raises(MASRefineError, match=r"groups.json: "):
        parse_groups(str(tmp_path / "groups.json"))


def test_deeply_nested_groups_text_is_one_line():
    from MASRefineLib.metrics import parse_groups
    with pytest.raises(MASRefineError, match=r"--groups: invalid JSON \(nested too deeply\)"):
        parse_groups('{"a": ' * 200000 + "1" + "}" * 200000)


def test_a_json_label_table_is_read_by_the_one_json_reader(tmp_path, monkeypatch):
    from MASRefineLib import jsonio
    from MASRefineLib.labels import LabelTable
    t = tmp_path / "labels.json"
    t.write_text('{"1": {"name": "bone", "color": [1, 0, 0]}}')
    monkeypatch.setattr(jsonio, "MAX_JSON_BYTES", 10)  # the reader's size cap applies to label tables too
    with pytest.raises(MASRefineError, match=r"labels.json: label table of .* bytes exceeds 10 bytes"):
        LabelTable.load(t)


def _votenet_set(sample, tmp_path) -> tuple[Path, Path]:
    """A copy of the sample set with an (untrained) VoteNet+ model stored in its models/; (set, model json)."""
    from MASRefineLib.fusion.votenet import DEFAULT_ARCH, VoteNetModel, build_network, model_name
    s = copy_set(sample, tmp_path / "set")
    name = model_name("affine")
    path = VoteNetModel(build_network(dict(DEFAULT_ARCH)), dict(DEFAULT_ARCH), 1.0, 0.0, {}).save(s / "models", name)
    return s, path


def test_a_corrupt_votenet_model_is_refused_before_any_registration(sample, tmp_path, capsys):
    s, path = _votenet_set(sample, tmp_path)
    weights = path.with_suffix(".safetensors")
    b = bytearray(weights.read_bytes())
    b[:8] = b"\xff" * 8  # the header length: no longer a safetensors file
    weights.write_bytes(bytes(b))
    before = snapshot(s)
    rc, err = cli(["segment", "--atlases", s, "--target", sample["target"], "--out", tmp_path / "out",
                   "--prereg", "affine", "--refine", "none", "--fusion", "votenet", "--preset", "fast", "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and str(weights) in err[0] and "cannot load the VoteNet+ weights" in err[0], err
    assert not (tmp_path / "out" / "atlases").exists()  # refused at the models stage, before registration
    assert snapshot(s) == before


def test_a_stored_votenet_model_is_loaded_once(sample, tmp_path, monkeypatch):
    """The model checked before registration is the one fusion uses: read from disk once per run."""
    from MASRefineLib.fusion.votenet import VoteNetModel
    from MASRefineLib.pipeline import SegmentOptions, segment
    s, path = _votenet_set(sample, tmp_path)
    loaded = []
    real = VoteNetModel.load.__func__
    monkeypatch.setattr(VoteNetModel, "load", classmethod(lambda cls, *a, **k: loaded.append(a[0]) or real(cls, *a, **k)))
    res = segment(sample["target"], s, tmp_path / "out", SegmentOptions(prereg="affine", refine="none", fusion="votenet",
                                                                         preset="fast", device="cpu"))
    assert [Path(p) for p in loaded] == [path]
    assert (tmp_path / "out" / "manifest.json").is_file() and res is not None


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("platt"), r"missing field 'platt'"),
    (lambda d: d["platt"].update(a="x"), r"wrong field value"),
    (lambda d: d.pop("architecture"), r"missing field 'architecture'"),
    (lambda d: d.update(format="other"), r"not a VoteNet\+ model"),
])
def test_malformed_votenet_descriptions_are_one_line(sample, tmp_path, change, message):
    from MASRefineLib.fusion.votenet import VoteNetModel
    _, path = _votenet_set(sample, tmp_path)
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    with pytest.raises(MASRefineError, match=f"{path.name}: .*{message}"):
        VoteNetModel.load(path)


def test_malformed_and_corrupt_segmenters_are_one_line(sample, tmp_path):
    from MASRefineLib.labels import LabelTable
    from MASRefineLib.segmenter import SegmenterSettings, UNetSegmenter, build_unet
    table = AtlasSet.load(sample["atlas_dir"]).label_table
    values = [0] + sorted(table)
    seg = UNetSegmenter(build_unet(len(values)), values, table, 3.5, SegmenterSettings())
    path = seg.save(tmp_path / "models")
    assert UNetSegmenter.load(path).label_values == values
    d = json.loads(path.read_text())
    for key in ("label_values", "architecture", "spacing_mm"):
        bad = {k: v for k, v in d.items() if k != key}
        path.write_text(json.dumps(bad))
        with pytest.raises(MASRefineError, match=f"segmenter.json: malformed segmenter description \\(missing field "
                                                 f"'{key}'\\)"):
            UNetSegmenter.load(path)
    path.write_text(json.dumps(d))
    w = tmp_path / "models" / "segmenter.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(MASRefineError, match="segmenter.safetensors: cannot load the segmenter weights"):
        UNetSegmenter.load(path)


def test_failed_writes_of_tables_and_pictures_are_one_line_and_leave_no_temporary_file(tmp_path, monkeypatch):
    import csv

    from MASRefineLib import pipeline
    from MASRefineLib.protocol.atomic import write_csv

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerow", full)
    with pytest.raises(MASRefineError, match=r"qa.csv: could not write \(no space left on the device"):
        write_csv([{"id": "a", "x": 1}], tmp_path / "qa.csv")
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    fig_path = tmp_path / "qa.png"
    ws = type("WS", (), {"target_grid": type("G", (), {"spacing": (1, 1, 1)})(), "label_table": {}, "atlases": []})()
    with pytest.raises(MASRefineError, match=r"qa.png: could not write"):
        pipeline.qa_picture(fig_path, np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint16), ws, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_during_start_up_is_a_clean_cancel(monkeypatch, capsys):
    from MASRefineLib import cli as climod

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(climod, "build_parser", interrupted)
    rc, err = cli(["segment", "--help"], capsys)
    assert rc == 3 and err == ["masrefine: cancelled"]


def test_a_model_folder_that_cannot_be_written_is_refused_before_training(sample, tmp_path, capsys):
    s = copy_set(sample, tmp_path / "set")
    (s / "models").write_text("not a folder")  # as unwritable as a read-only set, for root too
    before = snapshot(s)
    rc, err = cli(["segment", "--atlases", s, "--target", sample["target"], "--out", tmp_path / "out",
                   "--prereg", "affine", "--refine", "IS", "--fusion", "pv", "--preset", "fast", "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and "models: cannot store the surrogate segmenter here" in err[0], err
    assert snapshot(s) == before and not (tmp_path / "out" / "atlases").exists()


# --------------------------------------------------------------------------- 6. messages that say what is wrong
def test_a_folder_given_as_the_target_is_named_as_such(sample, tmp_path, capsys):
    rc, err = cli(["segment", "--atlases", sample["atlas_dir"], "--target", tmp_path, "--out", tmp_path / "out",
                   "--quiet"], capsys)
    assert rc == 2 and err == [f"masrefine segment: error: {tmp_path}: not a file"]


def test_a_bad_label_table_is_reported_once(sample, tmp_path):
    s = copy_set(sample, tmp_path / "set", labels={"one": {"name": "x", "color": [1, 2, 3]}})
    errors = [p for p in inspect_atlas_set(s).problems if p.level == "error"]
    assert len(errors) == 1 and "atlas.json" in errors[0], errors


def test_worker_errors_name_job_fields_not_command_line_options(sample, tmp_path):
    from MASRefineLib.worker import EXIT_ERROR, EventWriter, Worker
    job = jobs.make_job(sample["target"], sample["atlas_dir"], Path(sample["atlas_dir"]) / "out")
    jp = jobs.write_job(job, tmp_path / "job.json")
    buf = io.StringIO()
    assert Worker(jp, EventWriter(buf)).run() == EXIT_ERROR
    err = [json.loads(ln.split(" ", 1)[1]) for ln in buf.getvalue().splitlines()][-1]
    assert err["kind"] == "input" and "output_dir" in err["message"] and "atlas_dir" in err["message"]
    assert "--" not in err["message"], err["message"]
    assert not (Path(sample["atlas_dir"]) / "out").exists()


def test_stale_temporary_files_of_a_killed_run_are_removed_on_rerun(tmp_path):
    out = prepare_output_dir(tmp_path / "out", command="segment")
    (out / "atlases").mkdir()
    stale = [out / ".qa.csv.k3j_x9a2.tmp.csv", out / "atlases" / ".a1_image.nrrd.abcdefgh.tmp.nrrd", out / ".qa.tmp.png"]
    kept = [out / "qa.csv", out / "atlases" / "a1_image.nrrd"]
    recent = out / "atlases" / ".a2_image.nrrd.zyxwvuts.tmp.nrrd"  # a run still writing into the same folder
    for p in stale + kept + [recent]:
        p.write_text("x")
    from MASRefineLib.outputs import STALE_TEMPORARY_AGE_S
    old = time.time() - STALE_TEMPORARY_AGE_S - 5
    for p in stale + kept:
        os.utime(p, (old, old))
    os.utime(recent, (time.time() - STALE_TEMPORARY_AGE_S + 60,) * 2)  # younger than the stated age
    prepare_output_dir(out, command="segment")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert recent.exists()  # another run's temporary file: not deleted


def test_no_environment_variable_lets_a_job_file_name_other_code(sample, tmp_path, monkeypatch):
    """The worker runs only jobs.PIPELINES: the former MASREFINE_WORKER_PIPELINES opt-in (which a Slicer worker
    would have inherited from Slicer's environment) is gone, and nothing else in the environment adds pipelines."""
    from MASRefineLib.worker import EXIT_INVALID, EventWriter, Worker, load_pipeline
    monkeypatch.setenv("MASREFINE_WORKER_PIPELINES", "worker_pipelines,os")
    import worker_pipelines  # noqa: F401 - importable here (Testing/ is on the path), still not run
    for name in ("worker_pipelines:slow", "os:getcwd"):
        with pytest.raises(ValueError, match=f"unknown pipeline {name!r}"):
            load_pipeline(name)
    job = jobs.make_job(sample["target"], sample["atlas_dir"], tmp_path / "out", pipeline="os:getcwd")
    buf = io.StringIO()
    assert Worker(jobs.write_job(job, tmp_path / "job.json"), EventWriter(buf)).run() == EXIT_INVALID
    assert '"kind": "invalid-job"' in buf.getvalue() and not (tmp_path / "out").exists()
    assert not hasattr(jobs, "PIPELINE_MODULES_ENV")


def test_limits_are_those_the_architecture_page_states():
    """Every number of the page's 'Inputs' paragraph, derived from the code's limits and quoted with its words
    (a bare "4096" or "1000" would match anywhere on the page)."""
    import math
    from MASRefineLib.imageio import MIN_AXIS_VOXELS
    from MASRefineLib.jsonio import MAX_JSON_BYTES
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text().split())
    lim = validate.LIMITS
    assert lim.max_voxels == 2 ** int(math.log2(lim.max_voxels)) and MAX_JSON_BYTES % 2 ** 20 == 0
    mantissa, exponent = f"{lim.orthonormal_tolerance:.0e}".split("e")
    for text in (f"`imageio.MIN_AXIS_VOXELS` ({MIN_AXIS_VOXELS}) voxels per axis",
                 f"size 1–{lim.max_axis_voxels} voxels per axis",
                 f"at most 2^{int(math.log2(lim.max_voxels))} voxels",
                 f"spacing {lim.min_spacing_mm:g}–{lim.max_spacing_mm:g} mm",
                 f"origin within ±{lim.max_abs_origin_mm:g} mm",
                 f"|DᵀD − I| ≤ {mantissa}e{int(exponent)}",
                 f"non-negative integers up to {lim.max_label_value}",
                 f"at most {lim.max_labels} distinct ones per map",
                 f"at most {MAX_JSON_BYTES // 2 ** 20} MB"):
        assert text in doc, text


def _bind_mount_works() -> bool:
    import shutil
    import subprocess
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(os.name == "nt" or not _bind_mount_works(), reason="needs unshare (a private mount namespace)")
def test_an_input_folder_reached_by_another_path_is_still_an_input(tmp_path):
    """Folder containment is also checked by file identity, not only by path strings: here the input folder is
    reached through a bind mount (the Linux form of macOS's '/Data/Atlas' = '/data/atlas'), in a private mount
    namespace so nothing outside this test sees it."""
    import subprocess
    import sys
    inputs, alias = tmp_path / "data" / "atlas", tmp_path / "alias"
    (inputs / "images").mkdir(parents=True)
    (inputs / "images" / "a1.nii.gz").write_text("x")
    alias.mkdir()
    script = f"""
import sys
from pathlib import Path
from MASRefineLib.errors import MASRefineError
from MASRefineLib.outputs import prepare_output_dir
inputs, alias = Path({str(inputs)!r}), Path({str(alias)!r})
given = [("--atlases atlas set", inputs), ("atlas image", inputs / "images" / "a1.nii.gz")]
for out in (alias / "x", alias, alias / "images" / "new"):
    try:
        prepare_output_dir(out, inputs=given)
        print("ACCEPTED", out)
    except MASRefineError as e:
        print("REFUSED", e)
"""
    cmd = ["unshare", "-rm", "sh", "-c", f'mount --bind "{inputs}" "{alias}" && exec "$0" -c "$1"', sys.executable, script]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stdout + r.stderr
    assert lines[0] == f"REFUSED {alias / 'x'}: lies inside the --atlases atlas set {inputs}; choose another --out"
    assert lines[1] == f"REFUSED {alias}: is the --atlases atlas set; choose another --out"
    assert lines[2].startswith(f"REFUSED {alias / 'images' / 'new'}: lies inside the --atlases atlas set")
    assert sorted(p.name for p in inputs.rglob("*")) == ["a1.nii.gz", "images"]  # nothing written into the input


def test_an_input_folder_named_in_another_case_is_an_input_on_a_case_insensitive_file_system(tmp_path):
    probe = tmp_path / "CaseProbe"
    probe.mkdir()
    if not (tmp_path / "caseprobe").exists():
        pytest.skip("this file system is case-sensitive (the identity check is tested through a bind mount)")
    inputs = tmp_path / "data" / "atlas"
    inputs.mkdir(parents=True)
    with pytest.raises(MASRefineError, match="lies inside the --atlases atlas set"):
        prepare_output_dir(tmp_path / "Data" / "Atlas" / "x", inputs=[("--atlases atlas set", inputs)])
