"""Bad command-line input is one line on stderr (exit 2) and never costs the user a file.

Covers the output-folder rules (MASRefineLib/outputs.py), the target-grid check of refine/fuse, the
argparse number checks (commands/_common.py), label-table and --groups errors, and which pipelines a job
file may run. Everything runs on a 24^3 two-atlas phantom; the only real work is one fast registration
(shared) and a few short reruns.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import SimpleITK as sitk

from MASRefineLib import sampledata
from MASRefineLib.protocol import jobs
from MASRefineLib.cli import main
from MASRefineLib.errors import MASRefineError
from MASRefineLib.outputs import MARKER, prepare_output_dir
from MASRefineLib.pipeline import segment

# the fastest registration that still writes a real registered folder
FAST_REG = ["--preset", "fast", "--device", "cpu", "-q", "--set", "affine_iterations=3", "--set",
            "deform_iterations=3,3"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    return sampledata.make_sample(tmp_path_factory.mktemp("cli-inputs") / "sample", n_atlases=2, size=(24, 24, 24),
                                  spacing=3.5)


@pytest.fixture(scope="module")
def registered(sample, tmp_path_factory) -> Path:
    """A folder written by 'masrefine register' (module-wide; tests must not change it)."""
    out = tmp_path_factory.mktemp("cli-inputs-reg") / "reg"
    assert main(["register", "--atlases", sample["atlas_dir"], "--target", sample["target"], "--out", str(out),
                 *FAST_REG]) == 0
    return out


def snapshot(*roots) -> dict[str, str]:
    """Every file under ``roots`` (files or folders) -> sha256 of its bytes."""
    out = {}
    for r in map(Path, roots):
        for p in ([r] if r.is_file() else sorted(x for x in r.rglob("*") if x.is_file())):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and the last line of stderr; argparse's own errors (SystemExit) included."""
    try:
        rc = main(args)
    except SystemExit as e:
        rc = int(e.code)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def one_line_error(args: list[str], capsys, fragment: str) -> str:
    rc, line = run(args, capsys)
    assert rc == 2, (rc, line)
    assert line.startswith("masrefine ") and "error:" in line and fragment in line, line
    assert "Traceback" not in line
    return line


# ------------------------------------------------------------------------------ A1: empty path, a file
@pytest.mark.parametrize("cmd", ["segment", "register", "refine", "fuse"])
def test_out_that_is_empty_or_a_file_is_one_line(cmd, sample, registered, tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    before = snapshot(afile, sample["atlas_dir"], registered)
    base = {"segment": ["segment", "--atlases", sample["atlas_dir"], "--target", sample["target"], "--quiet"],
            "register": ["register", "--atlases", sample["atlas_dir"], "--target", sample["target"], "-q"],
            "refine": ["refine", "--registered", str(registered), "--target", sample["target"], "--quiet"],
            "fuse": ["fuse", "--registered", str(registered), "--method", "pv"]}[cmd]
    one_line_error(base + ["--out", str(afile)], capsys, f"{afile}: exists and is not a folder; choose another --out")
    one_line_error(base + ["--out", str(afile / "sub")], capsys, f"{afile} is a file, not a folder")
    if cmd != "register":  # register's own check says "--out required"
        one_line_error(base + ["--out", ""], capsys, "--out: empty path")
    assert snapshot(afile, sample["atlas_dir"], registered) == before


def test_atlas_init_and_votenet_cache_refuse_a_file(sample, tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    images = str(Path(sample["atlas_dir"]) / "images")
    labels = str(Path(sample["atlas_dir"]) / "labels")
    one_line_error(["atlas", "init", str(afile), "--images", images, "--labels", labels], capsys,
                   f"{afile}: exists and is not a folder; choose another OUT")
    one_line_error(["train", "votenet", sample["atlas_dir"], "--cache", str(afile), "--quiet"], capsys,
                   f"{afile}: exists and is not a folder; choose another --cache")
    assert afile.read_text() == "mine"


# ------------------------------------------------------------------------------ A2: foreign folders, reruns
def test_foreign_folder_is_refused_and_own_folder_rerun(sample, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"my": "data"}')
    before = snapshot(mine)
    args = ["register", "--atlases", sample["atlas_dir"], "--target", sample["target"], *FAST_REG]
    one_line_error(args + ["--out", str(mine)], capsys,
                   f"{mine}: not empty and not a MASRefine output folder; choose another --out")
    assert snapshot(mine) == before
    # a new folder is marked; a rerun of the same command into it works
    out = tmp_path / "reg"
    assert main(args + ["--out", str(out)]) == 0
    assert json.loads((out / MARKER).read_text())["command"] == "register"
    assert main(args + ["--out", str(out)]) == 0
    # another command's output folder is not reused
    assert main(["fuse", "--registered", str(out), "--method", "pv", "--out", str(tmp_path / "fz")]) == 0
    fused = snapshot(tmp_path / "fz")
    one_line_error(args + ["--out", str(tmp_path / "fz")], capsys, "output folder of 'masrefine fuse', not of 'register'")
    assert snapshot(tmp_path / "fz") == fused


def test_unmarked_output_of_an_earlier_version_is_refused(tmp_path):
    """A folder written before the marker existed is refused like any foreign folder, and left as it was."""
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "report.json").write_text('{"grid": {}, "stage": "deformable"}')
    before = snapshot(reg)
    for command in ("register", "refine"):
        with pytest.raises(MASRefineError, match="not empty and not a MASRefine output folder"):
            prepare_output_dir(reg, command=command)
    assert snapshot(reg) == before and not (reg / MARKER).exists()


# ------------------------------------------------------------------------------ A3: inputs are never outputs
def test_out_must_stay_apart_from_the_inputs(sample, registered, tmp_path, capsys):
    atlases = Path(sample["atlas_dir"])
    before = snapshot(atlases, registered, sample["target"])
    seg = ["segment", "--atlases", str(atlases), "--target", sample["target"], "--quiet", "--out"]
    one_line_error(seg + [str(atlases)], capsys, f"{atlases}: is the --atlases atlas set; choose another --out")
    one_line_error(seg + [str(atlases / "images" / "new")], capsys, "lies inside the --atlases atlas set")
    one_line_error(seg + [str(atlases.parent)], capsys, f"{atlases.parent}: contains the --atlases atlas set")
    one_line_error(seg + [str(Path(sample["target"]).parent)], capsys, "contains the target image")
    reg = ["register", "--atlases", str(atlases), "--target", sample["target"], "-q", "--out"]
    one_line_error(reg + [str(atlases / "labels")], capsys, "lies inside the --atlases atlas set")
    ref = ["refine", "--registered", str(registered), "--target", sample["target"], "--quiet", "--out"]
    one_line_error(ref + [str(registered)], capsys, f"{registered}: is the --registered folder; choose another --out")
    one_line_error(ref + [str(registered / "refined")], capsys, "lies inside the --registered folder")
    fuse = ["fuse", "--registered", str(registered), "--method", "pv", "--out"]
    one_line_error(fuse + [str(registered)], capsys, "is the --registered folder")
    one_line_error(fuse + [str(registered.parent)], capsys, "contains the --registered folder")
    assert snapshot(atlases, registered, sample["target"]) == before
    assert not (atlases / "images" / "new").exists() and not (registered / "refined").exists()


# ------------------------------------------------------------------------------ A4: evaluate --json
def test_evaluate_json_never_replaces_an_input(sample, tmp_path, capsys):
    ref = tmp_path / "ref.nii.gz"
    ref.write_bytes(Path(sample["truth"]).read_bytes())
    table = tmp_path / "labels.json"
    table.write_text(json.dumps({str(k): v for k, v in sample["labels"].items()}))
    (tmp_path / "link.nii.gz").symlink_to(ref)
    before = snapshot(tmp_path)
    base = ["evaluate", "--pred", sample["truth"], "--ref", str(ref), "--labels", str(table), "--json"]
    one_line_error(base + [str(ref)], capsys, f"{ref}: is the --ref label map; --json would overwrite it")
    one_line_error(base + [str(tmp_path / "link.nii.gz")], capsys, "is the --ref label map")
    one_line_error(base + [str(tmp_path / ".." / tmp_path.name / "labels.json")], capsys, "is the --labels table")
    one_line_error(base + [sample["truth"]], capsys, "is the --pred label map")
    one_line_error(base + [str(tmp_path)], capsys, "is a folder; --json needs a file name")
    assert snapshot(tmp_path) == before
    assert main(base + [str(tmp_path / "scores.json")]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["pred"] == sample["truth"]


# ------------------------------------------------------------------------------ B: the target's grid
def test_refine_and_fuse_refuse_a_target_on_another_grid(sample, registered, tmp_path, capsys):
    moved = sitk.ReadImage(sample["target"])
    moved.SetOrigin([o + 2.0 for o in moved.GetOrigin()])
    shifted = tmp_path / "shifted.nii.gz"
    sitk.WriteImage(moved, str(shifted))
    before = snapshot(registered, shifted)
    line = one_line_error(["refine", "--registered", str(registered), "--target", str(shifted), "--out",
                           str(tmp_path / "ref"), "--quiet"], capsys,
                          f"{shifted}: grid 24x24x24 @ 3.5x3.5x3.5 mm differs from the grid the atlases were registered "
                          f"to (24x24x24 @ 3.5x3.5x3.5 mm, {registered / 'report.json'})")
    assert "origin 3.46 mm apart" in line
    line = one_line_error(["fuse", "--registered", str(registered), "--target", str(shifted), "--out",
                           str(tmp_path / "fz"), "--method", "pv"], capsys, f"{shifted}: grid")
    assert "origin" in line
    assert snapshot(registered, shifted) == before
    assert not (tmp_path / "ref").exists() and not (tmp_path / "fz").exists()


# ------------------------------------------------------------------------------ C: numbers
@pytest.mark.parametrize("cmd, option, value, message", [
    ("segment", "--threads", "-1", "argument --threads: must be at least 1, got -1"),
    ("register", "--threads", "0", "argument --threads: must be at least 1, got 0"),
    ("register", "--seed", "-3", "argument --seed: must be 0 or more, got -3"),
    ("segment", "--alpha", "nan", "argument --alpha: must be a finite number >= 0, got nan"),
    ("segment", "--iterations", "0", "argument --iterations: must be at least 1"),
    ("fuse", "--patch-radius", "-1", "argument --patch-radius: must be 0 or more"),
    ("fuse", "--alpha", "inf", "argument --alpha: must be a finite number >= 0"),
    ("fuse", "--max-iter", "0", "argument --max-iter: must be at least 1"),
    ("refine", "--control", "0", "argument --control: must be at least 1"),
    ("refine", "--batch-size", "x", "argument --batch-size: expected an integer, got 'x'"),
    ("segmenter", "--spacing", "0", "argument --spacing: must be a finite number > 0, got 0"),
    ("segmenter", "--lr", "-0.1", "argument --lr: must be a finite number > 0"),
    ("segmenter", "--channels", "0", "argument --channels: must be at least 1"),
])
def test_bad_numbers_are_refused_by_the_parser(cmd, option, value, message, sample, tmp_path, capsys):
    base = {"segment": ["segment", "--atlases", "A", "--target", "T", "--out", str(tmp_path / "o")],
            "register": ["register", "--atlases", "A", "--target", "T", "--out", str(tmp_path / "o")],
            "fuse": ["fuse", "--registered", "R", "--out", str(tmp_path / "o")],
            "refine": ["refine", "--registered", "R", "--target", "T", "--out", str(tmp_path / "o")],
            "segmenter": ["train", "segmenter", sample["atlas_dir"]]}[cmd]
    one_line_error(base + [option, value], capsys, message)
    assert not (tmp_path / "o").exists() and not (Path(sample["atlas_dir"]) / "models").exists()


def test_channels_need_two_levels_and_set_needs_finite_values(sample, tmp_path, capsys):
    one_line_error(["train", "segmenter", sample["atlas_dir"], "--channels", "8", "--quiet"], capsys,
                   "--channels needs at least 2 values (one per U-Net level), got 1")
    one_line_error(["register", "--atlases", sample["atlas_dir"], "--target", sample["target"], "--out",
                    str(tmp_path / "o"), "--set", "bending_weight=nan"], capsys,
                   "registration parameters: bending_weight must be finite, got nan")
    assert not (tmp_path / "o").exists() and not (Path(sample["atlas_dir"]) / "models").exists()


def test_refine_one_iteration_count_applies_to_every_level(sample, registered, tmp_path):
    out = tmp_path / "refined"
    assert main(["refine", "--registered", str(registered), "--target", sample["target"], "--out", str(out),
                 "--variant", "i", "--iterations", "2", "--device", "cpu", "--quiet"]) == 0
    settings = json.loads((out / "report.json").read_text())["atlases"][0]["refinement"]
    assert settings["variant"] == "I" and len(settings["iterations"]) >= 2
    assert set(settings["iterations"]) == {2}


# ------------------------------------------------------------------------------ D: label tables, --groups
def test_garbage_label_table_and_missing_groups_file(sample, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("# my notes\nhello world this is text\n")
    binary = tmp_path / "blob.ctbl"
    binary.write_bytes(bytes(range(256)))
    bad_csv = tmp_path / "t.csv"
    bad_csv.write_text("Index,Name\n1,femur\nx,tibia\n")
    ev = ["evaluate", "--pred", sample["truth"], "--ref", sample["truth"]]
    one_line_error(ev + ["--labels", str(text)], capsys,
                   f"{text}, line 2: colour-table line needs 'value name r g b [a]'")
    one_line_error(ev + ["--labels", str(binary)], capsys, f"{binary}: not a label table (not text")
    one_line_error(ev + ["--labels", str(bad_csv)], capsys, f"{bad_csv}, line 3: label value 'x' is not an integer")
    one_line_error(ev + ["--groups", str(tmp_path / "nosuch.json")], capsys,
                   f"{tmp_path / 'nosuch.json'}: label groups file not found")
    images, labels = (str(Path(sample["atlas_dir"]) / d) for d in ("images", "labels"))
    one_line_error(["atlas", "init", str(tmp_path / "set"), "--images", images, "--labels", labels,
                    "--label-table", str(text)], capsys, f"{text}, line 2:")
    assert not (tmp_path / "set" / "atlas.json").exists()


# ------------------------------------------------------------------------------ E: help texts
def test_help_texts(capsys):
    for args in (["experiment", "--help"], ["refine", "--help"]):
        with pytest.raises(SystemExit):
            main(args)
    out = " ".join(capsys.readouterr().out.split())
    assert "95% HD" in out and "%%" not in out
    assert "--variant {I,IS}" in out and "Default I, as 'masrefine segment'" in out


# ------------------------------------------------------------------------------ the worker
def test_job_files_run_only_the_projects_pipelines(sample, tmp_path, monkeypatch):
    from MASRefineLib.worker import load_pipeline

    monkeypatch.setenv("MASREFINE_WORKER_PIPELINES", "worker_pipelines")  # the removed opt-in adds nothing

    job = jobs.make_job(sample["target"], sample["atlas_dir"], tmp_path / "out")
    assert jobs.validate_job(job) == []
    for name in ("os:system", "subprocess:run", "MASRefineLib.atlas:init_atlas_set", "nosuchmodule:f", ""):
        job["pipeline"] = name
        problems = jobs.validate_job(job)
        assert any(p.startswith(f"unknown pipeline {name!r} (known: segment") for p in problems), problems
        with pytest.raises(ValueError, match="unknown pipeline"):
            load_pipeline(name)
    assert jobs.pipeline_target("segment") == "MASRefineLib.pipeline:run_job"
    # the protocol tests' own pipelines run only in a worker started through Testing/worker_launcher.py
    job["pipeline"] = "worker_pipelines:slow"
    assert any(p.startswith("unknown pipeline 'worker_pipelines:slow'") for p in jobs.validate_job(job))
    with pytest.raises(ValueError, match="unknown pipeline 'worker_pipelines:slow'"):
        load_pipeline("worker_pipelines:slow")
    assert any("unknown pipeline" in p for p in jobs.validate_job({**job, "pipeline": "os:system"}))
    job["pipeline"] = 3
    assert any(p.startswith("unknown pipeline '3'") for p in jobs.validate_job(job))


def test_worker_refuses_a_foreign_output_dir(sample, tmp_path):
    from MASRefineLib.worker import EXIT_ERROR, EventWriter, Worker

    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    job = jobs.make_job(sample["target"], sample["atlas_dir"], out, preset="fast")  # the segment pipeline
    path = jobs.write_job(job, tmp_path / "job.json")
    stream = io.StringIO()
    assert Worker(path, EventWriter(stream)).run() == EXIT_ERROR
    events = [json.loads(line.split(" ", 1)[1]) for line in stream.getvalue().splitlines()]
    err = next(e for e in events if e["event"] == "error")
    assert err["kind"] == "input" and err["message"] == (
        f"{out}: not empty and not a MASRefine output folder; choose another output_dir")
    assert os.listdir(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "mine"
    # a script calling the library directly is held to the same rule (the message names its argument)
    with pytest.raises(MASRefineError, match=f"{out}: not empty and not a MASRefine output folder; choose "
                                             "another out_dir"):
        segment(sample["target"], sample["atlas_dir"], out)
    assert os.listdir(out) == ["thesis.tex"]


def test_library_inputs_refuse_non_finite_parameters_and_missing_group_files(tmp_path):
    """The checks behind the options hold for library callers too (jobs, scripts)."""
    from MASRefineLib.errors import MASRefineError
    from MASRefineLib.metrics import parse_groups
    from MASRefineLib.registration.params import get_params
    with pytest.raises(MASRefineError, match="folding_weight must be finite"):
        get_params("fast").with_overrides({"folding_weight": "inf"})
    with pytest.raises(MASRefineError, match="nosuch.json: label groups file not found"):
        parse_groups(str(tmp_path / "nosuch.json"))
    (tmp_path / "g.json").write_text('{"bone": [1, 3]}')
    assert parse_groups(str(tmp_path / "g.json")) == {"bone": [1, 3]}
