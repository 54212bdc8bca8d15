"""The module's dependency handling, sample job and self-test against the stubs (Testing/slicer_stubs.py),
with real background processes: ``python -m MASRefineLib.install`` (pip is never asked to download
anything: what it would install is already there, or ``--no-index`` refuses) and ``python -m
MASRefineLib.sampledata --events``. "Not installed" is simulated at the metadata boundary the module
reads (``importlib.metadata.version``), never inside the module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest
from importlib import metadata
from pathlib import Path

import pytest

import slicer_stubs
from test_slicer_glue import mod  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def without_monai(monkeypatch):
    """importlib.metadata says monai is not installed (in this process only)."""
    real = metadata.version

    def version(name):
        if name.lower() == "monai":
            raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(metadata, "version", version)


def test_status_reads_versions_without_importing(mod, without_monai):
    deps = slicer_stubs.submodule("Dependencies")
    rows = {r["name"]: r for r in deps.status()}
    assert rows["torch"]["ok"] and rows["torch"]["version"] == metadata.version("torch")
    assert rows["monai"] == {"name": "monai", "requirement": "monai>=1.3", "version": None, "ok": False}
    assert deps.missing() == ["monai>=1.3"]
    text = deps.statusText()
    assert "not installed" in text and metadata.version("scipy") in text
    from MASRefineLib import install

    assert set(rows) == {"torch"} | {install.requirement_name(r) for r in slicer_stubs.submodule("Environment").readRequirements()}


def test_status_and_command_use_the_installers_reading_of_requirements(mod, monkeypatch):
    """One reading of requirement strings (MASRefineLib.install), not a copy in the module: what the
    installer calls unsatisfied is what the panel shows missing and what the command asks for."""
    from MASRefineLib import install

    deps = slicer_stubs.submodule("Dependencies")
    real = install.satisfied
    monkeypatch.setattr(install, "satisfied", lambda r: False if r.startswith("scipy") else real(r))
    assert deps.missing() == ["scipy>=1.10"] and deps.installCommand()[-1] == "scipy>=1.10"
    assert not hasattr(deps, "_name")


def test_install_command_pins_slicer_packages_and_names_only_what_is_missing(mod, without_monai):
    deps = slicer_stubs.submodule("Dependencies")
    command = deps.installCommand()
    assert command[1:3] == ["-m", "MASRefineLib.install"] and command[-1] == "monai>=1.3"
    assert "--torch" not in command  # torch is there
    # numpy, SimpleITK and torch are pinned by the installer at the versions installed when its pip step starts
    # (after its torch step): a torch pin written before would make pip resolve monai against the old torch
    assert [a for a in command if a.startswith("--pin")] == ["--pin=numpy", "--pin=SimpleITK", "--pin=torch"]
    assert "--constraints" not in command


def test_upgrade_command_plans_installer_runs_when_everything_is_installed(mod):
    """What "Install / upgrade" runs with nothing missing: the installer's plan for the module's command line
    must upgrade torch (light-the-torch) and every requirement (pip), not be empty."""
    from MASRefineLib import install

    deps = slicer_stubs.submodule("Dependencies")
    assert deps.missing() == []
    upgrade = deps.installCommand(upgrade=True)
    assert upgrade[1:3] == ["-m", "MASRefineLib.install"]
    plan = dict(install.plan(upgrade[3:]))
    assert list(plan) == ["light-the-torch", "torch", "packages"]
    assert plan["torch"][-2:] == ["--upgrade", deps.TORCH_REQUIREMENT]
    requirements = slicer_stubs.submodule("Environment").readRequirements()
    assert plan["packages"][-len(requirements) - 1:] == ["--upgrade", *requirements]
    assert install.plan(deps.installCommand()[3:]) == []  # installing: nothing is missing, nothing runs


def test_installer_reports_versions_and_one_line_errors():
    """``python -m MASRefineLib.install``: satisfied requirements run nothing; a failing pip is one line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "MASRefineLib.install", "--torch", "torch>=2.1", "scipy>=1.10",
                          "--pip-option=--no-index"], capture_output=True, text=True, env=env, timeout=120)
    events = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and events[-1]["event"] == "result" and events[-1]["ran"] == []
    assert events[-1]["installed"] == {"torch": metadata.version("torch"), "scipy": metadata.version("scipy")}
    out = subprocess.run([sys.executable, "-m", "MASRefineLib.install", "masrefine-no-such-package>=1",
                          "--pip-option=--no-index"], capture_output=True, text=True, env=env, timeout=120)
    last = json.loads(out.stdout.splitlines()[-1].split(" ", 1)[1])
    assert out.returncode == 1 and last["event"] == "error" and "masrefine-no-such-package" in last["message"]
    assert "\n" not in last["message"]


def test_background_install_through_the_logic(mod):
    module, slicer = mod
    events = []
    job = module.MASRefineLogic().startInstall(onEvent=lambda j, ev: events.append(ev["event"]))
    assert job.timer.active and job in slicer_stubs.submodule("Job").activeJobs  # stopped when Slicer quits
    assert not job.stopWithScene  # not when the scene closes: pip is not killed midway
    job.wait(timeout=120)
    assert job.state == "completed" and events[-1] == "exit" and "result" in events
    assert job.result["ran"] == [] and job.result["installed"] == {}  # nothing missing: nothing to install
    assert job.result["changed"] == {}
    assert not module.MASRefineLogic.restartNeeded(job.result)  # nothing ran


def test_restart_only_for_changed_packages_slicer_imported(mod):
    """The restart prompt follows what the installer changed (its before/after versions), not what was
    requested: pytest is imported in this process, masrefine-not-imported is not."""
    restartNeeded = slicer_stubs.submodule("Dependencies").restartNeeded
    pytest_version = metadata.version("pytest")
    # requested (and reported installed), but pip found it satisfied: nothing changed, no restart
    assert not restartNeeded({"ran": ["packages"], "installed": {"pytest": pytest_version}, "changed": {}})
    assert restartNeeded({"ran": ["packages"], "installed": {}, "changed": {"pytest": ["8.0", pytest_version]}})
    # changed as a dependency of what was requested: still a restart
    assert restartNeeded({"ran": ["packages"], "installed": {"monai": "1.4"}, "changed": {"pytest": ["8.0", "9.0"]}})
    assert not restartNeeded({"ran": ["packages"], "changed": {"masrefine-not-imported": [None, "1"]}})
    assert not restartNeeded(None) and not restartNeeded({"ran": ["packages"], "installed": {"pytest": "9"}})


def test_declined_installation_raises_and_starts_nothing(mod, without_monai):
    module, slicer = mod
    slicer.confirmAnswer = False
    with pytest.raises(RuntimeError, match="declined"):
        module.MASRefineLogic().ensureDependencies(askConfirmation=True)
    assert slicer_stubs.submodule("Job").activeJobs == []


# ------------------------------------------------------------------------------------------------
# the self-test's install-or-skip path (issue #23 item 1)


def self_test(module, monkeypatch):
    """MASRefineTest with its tests recorded instead of run (they need Slicer's parameter node and
    segmentation API); what is real is runTest's order and its install-or-skip decision."""
    ran = []
    Test = module.MASRefineTest
    monkeypatch.setattr(Test, "test_MASRefineParameters", lambda self: ran.append("parameters"))
    monkeypatch.setattr(Test, "test_MASRefineSampleFlow", lambda self: ran.append("flow"))
    monkeypatch.setattr(Test, "test_MASRefineCancel", lambda self: ran.append("cancel"))
    return Test, ran


def test_self_test_skips_with_a_message_when_installing_is_not_allowed(mod, monkeypatch, without_monai):
    module, slicer = mod
    monkeypatch.delenv("MASREFINE_SELFTEST_INSTALL", raising=False)
    Test, ran = self_test(module, monkeypatch)
    result = unittest.TestResult()
    Test("runTest").run(result)  # as ctest runs it (slicer.testing.runUnitTest)
    assert not result.errors, result.errors[0][1] if result.errors else ""
    assert result.wasSuccessful() and len(result.skipped) == 1 and ran == ["parameters"]
    assert "monai>=1.3" in result.skipped[0][1] and "MASREFINE_SELFTEST_INSTALL" in result.skipped[0][1]
    assert slicer_stubs.submodule("Job").activeJobs == [] and slicer.errors == []
    Test().runTest()  # as Reload and Test calls it: no exception (a failure dialog), a message
    assert ran == ["parameters"] * 2 and any("Skipped" in m for m in slicer.displayed)


def test_self_test_installs_through_the_module_when_allowed(mod, monkeypatch, without_monai):
    module, slicer = mod
    monkeypatch.setenv("MASREFINE_SELFTEST_INSTALL", "1")
    Test, ran = self_test(module, monkeypatch)
    started = []
    deps = slicer_stubs.submodule("Dependencies")
    real = deps.startInstall
    monkeypatch.setattr(deps, "startInstall", lambda *a, **kw: started.append(real(*a, **kw)) or started[-1])
    result = unittest.TestResult()
    Test("runTest").run(result)
    (job,) = started  # the module's own install path ran, in the background, to the end
    assert job.state == "completed" and "monai>=1.3" in job.runner.command
    # the installer found monai (it is installed; only this process was told otherwise): still missing here,
    # so the flows are skipped with the reason rather than failing on the worker's missing package
    assert len(result.skipped) == 1 and "did not succeed" in result.skipped[0][1] and ran == ["parameters"]


def test_self_test_runs_the_flows_when_the_dependencies_are_there(mod, monkeypatch):
    module, slicer = mod
    Test, ran = self_test(module, monkeypatch)
    result = unittest.TestResult()
    Test("runTest").run(result)
    assert result.wasSuccessful() and not result.skipped and ran == ["parameters", "flow", "cancel"]


# ------------------------------------------------------------------------------------------------
# the phantom as a background job (issue #23 item 6)


def test_sample_is_a_background_job_and_loads_its_nodes(mod, tmp_path):
    module, slicer = mod
    finished = []
    job = module.MASRefineLogic().startSample(outDir=str(tmp_path / "sample"), onFinished=finished.append)
    assert job.running and job.timer.active  # returned at once; the GUI keeps running
    assert not job.stopWithScene  # no run folder: closing the scene does not stop it
    assert job.runner.command[1:3] == ["-m", "MASRefineLib.sampledata"] and "--events" in job.runner.command
    job.wait(timeout=300)
    assert job.state == "completed" and finished == [job] and job.fraction == 1.0
    target, truth = job.sample["target"], job.sample["truth"]
    assert target.IsA("vtkMRMLScalarVolumeNode") and target.name == "MASRefinePhantom"
    assert Path(target.path) == tmp_path / "sample" / "targets" / "target01.nii.gz"
    assert Path(job.sample["atlas_dir"], "atlas.json").is_file() and not truth.display.GetVisibility()
    assert truth.IsA("vtkMRMLSegmentationNode") and slicer.imported[0][1] is truth  # from the truth label map
    assert slicer.imported[0][0].removed  # the intermediate label map node does not stay in the scene


def test_sample_failure_is_one_line(mod, tmp_path):
    module, slicer = mod
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    job = module.MASRefineLogic().startSample(outDir=str(blocker / "sample"))
    with pytest.raises(RuntimeError, match="MASRefine failed"):
        job.wait(timeout=120)
    assert job.state == "failed" and "\n" not in job.error and slicer.loaded == []


def test_sample_data_registration(mod, monkeypatch):
    """The Sample Data button calls customDownloader; downloadSample fetches ``uris`` with urllib
    (SampleData.py:445-446, :796-1098), so the uri is the phantom target's file URL."""
    module, slicer = mod
    registered = []
    sd = type(sys)("SampleData")
    sd.SampleDataLogic = type("SampleDataLogic", (), {"registerCustomSampleDataSource": staticmethod(
        lambda **kw: registered.append(kw))})
    monkeypatch.setitem(sys.modules, "SampleData", sd)
    slicer_stubs.submodule("Sample").registerSampleData()
    (source,) = registered
    sample = slicer_stubs.submodule("Sample")
    assert source["uris"] == Path(sample.sampleTarget()).as_uri() and source["nodeNames"] == "MASRefinePhantom"
    assert Path(source["thumbnailFileName"]).is_file()
    assert callable(source["customDownloader"])


# ------------------------------------------------------------------------------------------------
# the installer's plan (MASRefineLib/install.py)


def test_upgrade_plans_every_requirement_even_when_satisfied():
    """"Install / upgrade" with everything installed must still run the installers, with --upgrade."""
    from MASRefineLib import install

    assert install.satisfied("torch>=2.1") and install.satisfied("numpy>=1.0")
    assert install.steps("torch>=2.1", ["numpy>=1.0"], "c.txt", []) == []  # install mode: nothing to do
    plan = dict(install.steps("torch>=2.1", ["numpy>=1.0"], "c.txt", [], upgrade=True))
    assert list(plan) == ["light-the-torch", "torch", "packages"]
    assert plan["torch"][1:] == ["-m", "light_the_torch", "install", "--upgrade", "torch>=2.1"]
    assert plan["packages"][1:] == ["-m", "pip", "install", "-c", "c.txt", "--upgrade", "numpy>=1.0"]
    assert "--upgrade" in plan["light-the-torch"]
    # an --upgrade given as a pip option too is passed once
    assert dict(install.steps(None, ["numpy>=1.0"], None, ["--upgrade"], upgrade=True))["packages"].count("--upgrade") == 1


def _fake_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_installer_pins_the_versions_installed_after_its_torch_step(monkeypatch, tmp_path):
    """The pip step's constraints hold the pinned distributions at the versions installed when it starts, so a
    torch that light-the-torch just replaced is pinned at its new version (with the --constraints file's lines)."""
    import io

    from MASRefineLib import install
    from MASRefineLib.worker import EventWriter

    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "masrefine-fake-torch", "1.0")
    monkeypatch.syspath_prepend(str(site))
    base = tmp_path / "base.txt"
    base.write_text("scipy<99\n")
    seen = tmp_path / "seen.txt"
    replace_torch = (f"import pathlib, shutil; site = pathlib.Path({str(site)!r}); "
                     "shutil.rmtree(site / 'masrefine_fake_torch-1.0.dist-info'); "
                     "(site / 'masrefine_fake_torch-2.0.dist-info').mkdir(); "
                     "(site / 'masrefine_fake_torch-2.0.dist-info' / 'METADATA').write_text("
                     "'Metadata-Version: 2.1\\nName: masrefine-fake-torch\\nVersion: 2.0\\n')")

    def fake_steps(torch, requirements, constraints, pip_options, upgrade=False):
        copy = f"import shutil, sys; shutil.copy(sys.argv[1], {str(seen)!r})"
        return [("torch", [sys.executable, "-c", replace_torch]),
                ("packages", [sys.executable, "-c", copy, constraints])]

    monkeypatch.setattr(install, "steps", fake_steps)
    out = io.StringIO()
    code = install.run(EventWriter(out), "masrefine-fake-torch>=1", ["scipy>=1"], str(base), [],
                       pins=["masrefine-fake-torch", "masrefine-not-installed"])
    assert code == 0, out.getvalue()
    assert seen.read_text().split() == ["scipy<99", "masrefine-fake-torch==2.0"]
    # what changed, from the installed versions before and after (what the restart prompt follows)
    result = json.loads(out.getvalue().splitlines()[-1].split(" ", 1)[1])
    assert result["event"] == "result" and result["changed"] == {"masrefine-fake-torch": ["1.0", "2.0"]}
