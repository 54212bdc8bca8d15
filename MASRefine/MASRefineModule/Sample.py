"""The built-in sample: a small knee-like phantom atlas set made locally by ``MASRefineLib.sampledata``
(nothing is downloaded), offered in the Sample Data module and by the panel's Sample button.

Making it takes seconds to minutes, so it is a background job like a run (``PythonSlicer -m
MASRefineLib.sampledata --events``: progress, cancel, a one-line error), reused once made.
"""
import os
import pathlib
from typing import Callable, Optional

import slicer
from slicer.i18n import tr as _

from MASRefineModule.Environment import moduleDir, pythonSlicerExecutable
from MASRefineModule.Job import MASRefineJob, launchCommand
from MASRefineModule.Results import loadSegmentation

SAMPLE_NAME = "MASRefinePhantom"


def sampleDir() -> str:
    """Where the phantom is made and reused: Slicer's cache folder."""
    return os.path.join(slicer.app.cachePath, "MASRefine", "sample")


def sampleTarget(outDir: Optional[str] = None) -> str:
    """The phantom's target image (the first target of ``MASRefineLib.sampledata.make_sample``)."""
    return os.path.join(outDir or sampleDir(), "targets", "target01.nii.gz")


def registerSampleData() -> None:
    """Add the phantom to the Sample Data module.

    The module's button calls ``customDownloader``: a background job, then the phantom's nodes. The
    Sample Data logic's ``downloadSample`` ignores ``customDownloader`` and fetches ``uris`` into its
    cache with urllib; a ``file:`` URL of the phantom's target makes that work, once the phantom has
    been made (by the button, the panel's Sample button, or :func:`loadSampleData`).
    """
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MASRefine",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(moduleDir(), "Resources", "Icons", "MASRefine.png"),
        uris=pathlib.Path(sampleTarget()).as_uri(),
        fileNames=f"{SAMPLE_NAME}-target01.nii.gz",
        nodeNames=SAMPLE_NAME,
        customDownloader=lambda source: startSample(onFinished=_reportFailure),
    )


def _reportFailure(job: MASRefineJob) -> None:
    if job.state == "failed":
        slicer.util.errorDisplay(_("Creating the MASRefine sample failed: {error}").format(error=job.error))


def _loadSample(job: MASRefineJob) -> None:
    """The finished sample's target (shown) and truth (hidden) as nodes; ``job.sample`` for the panel."""
    info = job.result
    target = slicer.util.loadVolume(info["target"], {"name": SAMPLE_NAME})
    truth = loadSegmentation(info["truth"], f"{SAMPLE_NAME} truth", info.get("labels"))
    truth.CreateDefaultDisplayNodes()
    truth.GetDisplayNode().SetVisibility(False)
    job.nodes = {"target": target, "truth": truth}
    job.sample = {"target": target, "atlas_dir": info["atlas_dir"], "truth": truth}


def startSample(outDir: Optional[str] = None, onEvent: Optional[Callable] = None,
                onFinished: Optional[Callable] = None) -> MASRefineJob:
    """Make (or reuse) the phantom in the background and load it; returns the job (``job.sample``). No run folder:
    the scene's closing does not stop it."""
    outDir = str(outDir or sampleDir())
    command = [pythonSlicerExecutable(), "-m", "MASRefineLib.sampledata", "--out", outDir, "--events"]
    return launchCommand(command, outDir, loadResults=_loadSample, onEvent=onEvent, onFinished=onFinished)


def loadSampleData(outDir: Optional[str] = None, timeout: Optional[float] = 900) -> dict:
    """Make (or reuse) the phantom and wait: ``{"target": volume node, "atlas_dir": folder, "truth":
    segmentation node}`` (console and self-test; the panel uses :func:`startSample`)."""
    job = startSample(outDir)
    job.wait(timeout, processEvents=slicer.app.processEvents)
    return job.sample
