"""``masrefine experiment`` (Table 1) on the phantom: cells, table files, resume, split checks."""
from __future__ import annotations

import csv
import json
import os

import pytest

from MASRefineLib import sampledata
from MASRefineLib.cli import main as cli_main
from MASRefineLib.errors import MASRefineError
from MASRefineLib.experiment import default_groups, list_subjects, make_split, run_experiment


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sampledata.make_sample(tmp_path_factory.mktemp("exp-data"), n_atlases=5, size=(32, 32, 32), spacing=2.8)


def test_split_and_groups(data):
    subs, table = list_subjects(data["atlas_dir"])
    assert [s.id for s in subs] == [f"knee{i:02d}" for i in range(1, 6)]
    assert default_groups(table) == {"bone": [1, 3], "cartilage": [2, 4]}
    a, t = make_split(subs, 3, 2, seed=1)
    assert not {s.id for s in a} & {s.id for s in t} and len(a) == 3 and len(t) == 2
    assert [s.id for s in make_split(subs, 3, 2, seed=1)[0]] == [s.id for s in a]
    with pytest.raises(MASRefineError, match="labelled subjects"):
        make_split(subs, 4, 2, seed=0)


def test_table_resume_and_split_guard(data, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", "--data", data["atlas_dir"], "--atlases", "3", "--targets", "2", "--out", str(out),
            "--no-unet", "--preset", "fast", "--quiet"]
    # only the affine PV row: no model training and no deformable registration in a unit test
    r = run_experiment(data["atlas_dir"], 3, 2, out, preregs=("affine",), preset="fast", unet=False,
                       rows=["affine-pv"])
    assert r["cells"] == 2
    split = json.loads((out / "split.json").read_text())
    cells = sorted(p.relative_to(out).as_posix() for p in (out / "cells").rglob("*.json"))
    assert cells == sorted(f"cells/affine-pv/{t}.json" for t in split["targets"])
    # the atlas set of the experiment holds the atlases only, and the targets are other subjects
    aset = json.loads((out / "atlas-set" / "atlas.json").read_text())
    assert [a["id"] for a in aset["atlases"]] == split["atlases"]
    assert not set(split["atlases"]) & set(split["targets"])
    md = (out / "table1.md").read_text()
    assert "| affine | PV |" in md and "VD (%) cartilage" in md and "deformable" not in md
    with open(out / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["affine-pv"]
    for r in rows:
        assert 0 <= float(r["dice_bone_mean"]) <= 1 and float(r["asd_mm_cartilage_mean"]) >= 0
        assert int(r["n"]) == 2
    # the summary is the mean of the cells
    c = [json.loads((out / "cells" / "affine-pv" / f"{t}.json").read_text()) for t in split["targets"]]
    mean = sum(x["metrics"]["groups"]["bone"]["dice"] for x in c) / 2
    assert float(rows[0]["dice_bone_mean"]) == pytest.approx(mean)
    assert (out / "table1.png").stat().st_size > 5000
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 4  # targets x groups x metrics

    # resume: nothing is computed again
    mtimes = {p: os.path.getmtime(p) for p in (out / "cells").rglob("*.json")}
    assert cli_main(args + ["--prereg", "affine", "--rows", "affine-pv"]) == 0
    printed = capsys.readouterr().out
    assert "# Table 1 (mean (sd) over 2 targets" in printed and "table1.csv" in printed
    assert {p: os.path.getmtime(p) for p in (out / "cells").rglob("*.json")} == mtimes
    # a cell that is deleted is computed again, alone
    victim = out / "cells" / "affine-pv" / f"{split['targets'][0]}.json"
    victim.unlink()
    run_experiment(data["atlas_dir"], 3, 2, out, preregs=("affine",), preset="fast", unet=False, rows=["affine-pv"])
    assert victim.exists()
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items() if p != victim)
    # another split in the same folder is refused
    with pytest.raises(MASRefineError, match="another data set, split or preset"):
        run_experiment(data["atlas_dir"], 2, 2, out, preregs=("affine",), preset="fast", unet=False, rows=["affine-pv"])


def test_fixed_split_file(data, tmp_path):
    """``--split FILE``: the atlases and targets named there, not a random draw; bad files fail in one line."""
    sp = tmp_path / "split.json"
    sp.write_text(json.dumps({"atlases": ["knee05", "knee01", "knee03"], "targets": ["knee02"]}))
    out = tmp_path / "exp"
    assert cli_main(["experiment", "--data", data["atlas_dir"], "--split", str(sp), "--out", str(out), "--no-unet",
                     "--preset", "fast", "--prereg", "affine", "--rows", "affine-pv", "--quiet"]) == 0
    rec = json.loads((out / "split.json").read_text())
    assert (rec["atlases"], rec["targets"]) == (["knee05", "knee01", "knee03"], ["knee02"])
    assert [a["id"] for a in json.loads((out / "atlas-set" / "atlas.json").read_text())["atlases"]] == rec["atlases"]
    assert sorted(p.name for p in (out / "cells" / "affine-pv").iterdir()) == ["knee02.json"]
    subs, _ = list_subjects(data["atlas_dir"])
    for bad, msg in (((["knee01", "knee09"], ["knee02"]), "no labelled subject 'knee09'"),
                     ((["knee01", "knee02"], ["knee02"]), "'knee02' is both an atlas and a target"),
                     ((["knee01"], ["knee02"]), "at least 2 atlases")):
        with pytest.raises(MASRefineError, match=msg):
            run_experiment(data["atlas_dir"], None, None, tmp_path / "x", split=bad, preregs=("affine",),
                           preset="fast", unet=False, rows=["affine-pv"])
    sp.write_text(json.dumps({"atlases": "knee01"}))
    assert cli_main(["experiment", "--data", data["atlas_dir"], "--split", str(sp), "--out", str(tmp_path / "y"),
                     "--quiet"]) != 0
    assert cli_main(["experiment", "--data", data["atlas_dir"], "--atlases", "3", "--out", str(tmp_path / "z"),
                     "--quiet"]) != 0
