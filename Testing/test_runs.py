"""Run folders (MASRefineLib/runs.py, issue #23 item 2): made with a marker, measured, and only marked
folders ever removed."""
from __future__ import annotations

import json
import os

import pytest

from MASRefineLib import runs
from MASRefineLib.errors import MASRefineError


def _run(base, name, created, size=0):
    folder = runs.make_run_folder(base, name)
    (folder / runs.RUN_MARKER).write_text(json.dumps({"created": created}))
    if size:
        (folder / "output").mkdir()
        (folder / "output" / "field.nrrd").write_bytes(b"\0" * size)
    return folder


def test_run_folders_are_made_unique_and_marked(tmp_path):
    a = runs.make_run_folder(tmp_path / "new" / "base", "knee/target 01")
    b = runs.make_run_folder(tmp_path / "new" / "base", "knee/target 01")
    assert a != b and a.parent == b.parent == tmp_path / "new" / "base"
    assert a.name.endswith("-knee_target_01") and b.name.endswith("-knee_target_01-2")
    assert runs.is_run_folder(a) and runs.list_runs(a.parent) == [a, b]
    (tmp_path / "file").write_text("x")
    with pytest.raises(MASRefineError, match="file: not a folder"):
        runs.make_run_folder(tmp_path / "file", "t")


def test_size_and_description(tmp_path):
    _run(tmp_path, "a", 1.0, size=1_500_000)
    _run(tmp_path, "b", 2.0, size=600_000)
    (tmp_path / "user-notes").mkdir()  # not a run: neither counted nor measured
    (tmp_path / "user-notes" / "big").write_bytes(b"\0" * 5_000_000)
    assert runs.describe(tmp_path) == f"2 runs, 2.1 MB in {tmp_path}"
    assert runs.describe(tmp_path / "missing") == f"0 runs, 0 B in {tmp_path / 'missing'}"
    assert [runs.format_size(n) for n in (999, 1000, 2_345_678, 3.21e9)] == ["999 B", "1 kB", "2.3 MB", "3.2 GB"]


def test_prune_keeps_the_newest_and_never_touches_what_it_did_not_make(tmp_path):
    old, mid, running, new = (_run(tmp_path, n, t) for n, t in (("old", 1), ("mid", 2), ("running", 3), ("new", 4)))
    user = tmp_path / "20250101-000000-mine"  # looks like a run, has no marker
    user.mkdir()
    (user / "job.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("keep me")
    link = tmp_path / "link-to-run"
    os.symlink(old, link)  # a link to a run is not a run folder: never followed into

    removed = runs.prune(tmp_path, 1, exclude=[running])
    assert sorted(removed) == sorted([old, mid])
    assert not old.exists() and not mid.exists() and running.exists() and new.exists()
    assert (user / "job.json").exists() and (tmp_path / "notes.txt").read_text() == "keep me"
    assert runs.prune(tmp_path, 5) == []
    with pytest.raises(MASRefineError, match="at least 1"):
        runs.prune(tmp_path, 0)


def test_remove_run_refuses_folders_it_did_not_make(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    with pytest.raises(MASRefineError, match=r"mine: not a MASRefine run folder \(no \.masrefine-run\); not removed"):
        runs.remove_run(user)
    assert user.exists()
    run = _run(tmp_path, "r", 1.0, size=10)
    runs.remove_run(run)
    assert not run.exists()
    runs.remove_run(run)  # already gone: nothing to do
