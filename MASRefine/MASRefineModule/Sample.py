"""The built-in sample: a small knee-like phantom atlas set made locally by ``MASRefineLib.sampledata``
(nothing is downloaded), offered in the Sample Data module and by the panel's Sample button."""
import json
import os
import subprocess
from typing import Optional

import slicer
from slicer.i18n import tr as _

from MASRefineModule.Environment import moduleDir, pythonSlicerExecutable, workerEnvironment
from MASRefineModule.Results import loadSegmentation


def registerSampleData():
    """Add the built-in phantom atlas set to the Sample Data module.

    The phantom (a small knee-like atlas set and a target) is generated offline by
    ``MASRefineLib.sampledata`` in a PythonSlicer process; nothing is downloaded.
    """
    import SampleData

    iconsPath = os.path.join(moduleDir(), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MASRefine",
        sampleName="MASRefinePhantom",
        thumbnailFileName=os.path.join(iconsPath, "MASRefine.png"),
        # Generated locally: the uri and file name only name the data set for Sample Data's bookkeeping.
        uris="masrefine:phantom",
        fileNames="MASRefinePhantom-target.nrrd",
        nodeNames="MASRefinePhantom",
        customDownloader=lambda source: loadSampleData(),
    )


def loadSampleData(outDir: Optional[str] = None) -> dict:
    """Generate (or reuse) the built-in phantom atlas set and load its target and truth.

    Returns ``{"target": volume node, "atlas_dir": folder, "truth": segmentation node}``. The phantom is
    made by ``MASRefineLib.sampledata.make_sample`` (deterministic, reused when already there) in a
    PythonSlicer process, like the worker.
    """
    outDir = str(outDir or os.path.join(slicer.app.cachePath, "MASRefine", "sample"))
    code = ("import json, sys\n"
            "from MASRefineLib import sampledata\n"
            "r = sampledata.make_sample(sys.argv[1])\n"
            "print(json.dumps({k: r[k] for k in ('atlas_dir', 'target', 'truth', 'labels')}))\n")
    proc = subprocess.run([pythonSlicerExecutable(), "-c", code, outDir], env=workerEnvironment(),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        lastLine = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(_("Creating the sample atlas set in {path} failed: {error}").format(path=outDir, error=lastLine))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    target = slicer.util.loadVolume(info["target"], {"name": "MASRefinePhantom"})
    truth = loadSegmentation(info["truth"], "MASRefinePhantom truth", info.get("labels"))
    truth.CreateDefaultDisplayNodes()
    truth.GetDisplayNode().SetVisibility(False)
    return {"target": target, "atlas_dir": info["atlas_dir"], "truth": truth}

