"""MASRefineLogic: what the panel and the Python console call. Every computation runs in the worker
(``PythonSlicer -m MASRefineLib.worker job.json``); the logic writes the job, starts the runner and
turns the results into nodes (MASRefineModule.Results)."""
import logging
import os
from typing import Callable, Optional

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from MASRefineModule import Dependencies, Results, Sample, SceneAtlas
from MASRefineModule.Environment import pythonSlicerExecutable
from MASRefineModule.Job import POLL_INTERVAL_MS, MASRefineJob, activeJobs, launch, removeOnClose
from MASRefineModule.Parameters import MASRefineParameterNode, Retention, pathIsSet


class MASRefineLogic(ScriptedLoadableModuleLogic):
    """This class should implement all the actual
    computation done by your module.  The interface
    should be such that other python code can import
    this class and make use of the functionality without
    requiring an instance of the Widget.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py

    ``runnerFactory(jobPath)`` may be injected (tests, other front ends); by default it builds
    ``MASRefineLib.runner.JobRunner(jobPath, python=PythonSlicer)``.
    """

    POLL_INTERVAL_MS = POLL_INTERVAL_MS

    def __init__(self, runnerFactory: Optional[Callable] = None) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runnerFactory

    def getParameterNode(self):
        return MASRefineParameterNode(super().getParameterNode())

    # Parameters

    @staticmethod
    def jobParameters(preset=None, prereg=None, refine=None, fusion=None, device=None,
                      alpha=None, gamma=None, iterations=None) -> dict:
        """The worker's job parameters (``MASRefineLib.protocol.jobs.PARAMETERS``) from keyword arguments.

        Choices may be given as enum members or their string values, in any case (``refine="is"``); numbers as
        numbers or their text. Parameters left at None are not sent, so the library's defaults and the preset decide
        them. A value the worker would refuse raises ValueError (its one line).
        """
        from MASRefineLib.protocol.jobs import PARAMETERS, check_value  # the worker's own check of a value

        params = {}
        for name, value in (("preset", preset), ("prereg", prereg), ("refine", refine), ("fusion", fusion),
                            ("device", device), ("alpha", alpha), ("gamma", gamma), ("iterations", iterations)):
            if value is None:
                continue
            kind, allowed = PARAMETERS[name][:2]
            value = getattr(value, "value", value)  # an enum member (Parameters.py's choices are made from PARAMETERS)
            if kind is str:
                value = next((a for a in allowed if a.lower() == str(value).lower()), value)
            else:
                value = kind(value)
            problem = check_value(name, value)
            if problem:
                raise ValueError(problem)
            params[name] = value
        return params

    @staticmethod
    def parametersFromNode(parameterNode) -> dict:
        """Keyword arguments for start()/segment() from the module's parameter node."""
        p = parameterNode
        kwargs = {"preset": p.preset, "prereg": p.prereg, "refine": p.refine, "fusion": p.fusion, "device": p.device}
        if p.overrideDefaults:
            kwargs.update(alpha=p.alpha, gamma=p.gamma, iterations=p.iterations)
        return kwargs

    @staticmethod
    def retentionFromNode(parameterNode) -> dict:
        """Keyword arguments ``retention`` and ``keepLast`` for start() from the parameter node."""
        return {"retention": parameterNode.retention.value, "keepLast": parameterNode.keepLast}

    @staticmethod
    def runsFolder(outDir=None) -> str:
        """Where run folders are made: ``outDir``, or ``MASRefine`` in Slicer's temporary folder."""
        return str(outDir) if pathIsSet(outDir) else os.path.join(slicer.app.temporaryPath, "MASRefine")

    def runFoldersText(self, outDir=None) -> str:
        """One line: the run folders in :meth:`runsFolder` and their size (MASRefineLib.runs.describe)."""
        from MASRefineLib import runs

        return runs.describe(self.runsFolder(outDir))

    @staticmethod
    def inputProblem(targetNode, atlasDir) -> Optional[str]:
        """A one-line reason why the inputs cannot be used, or None."""
        if targetNode is None:
            return _("Select a target volume")
        if targetNode.GetImageData() is None:
            return _("The target volume {name} has no image data").format(name=targetNode.GetName())
        if not pathIsSet(atlasDir):
            return _("Select an atlas-set folder")
        if not os.path.isfile(os.path.join(str(atlasDir), "atlas.json")):
            return _("{path} is not an atlas set (atlas.json is missing)").format(path=atlasDir)
        return None

    # Dependencies

    def ensureDependencies(self, askConfirmation: bool = True, timeout: Optional[float] = None) -> None:
        """Install what the worker is missing, after asking, and wait (the console's blocking path; the
        panel's Install button uses :meth:`startInstall`). Raises RuntimeError when declined or failed."""
        wanted = Dependencies.missing()
        if not wanted:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MASRefine needs these Python packages:\n{packages}\n\nInstall them now? (This takes a few "
                  "minutes; torch is installed with light-the-torch, as the PyTorch extension does.)").format(
                    packages="\n".join(wanted)),
                _("MASRefine - Install Python packages")):
            raise RuntimeError(_("MASRefine needs {packages}; installation was declined.").format(packages=", ".join(wanted)))
        job = Dependencies.startInstall()
        job.wait(timeout, processEvents=slicer.app.processEvents)
        still = Dependencies.missing()
        if still:
            raise RuntimeError(_("Installing {packages} did not succeed; see the log.").format(packages=", ".join(still)))

    missingDependencies = staticmethod(Dependencies.missing)
    dependenciesText = staticmethod(Dependencies.statusText)
    restartNeeded = staticmethod(Dependencies.restartNeeded)
    startInstall = staticmethod(Dependencies.startInstall)  # in a background PythonSlicer process

    # Running

    def _makeRunner(self, jobPath: str):
        """The background runner of ``PythonSlicer -m MASRefineLib.worker job.json`` (not started)."""
        if self.runnerFactory is not None:
            return self.runnerFactory(jobPath)
        from MASRefineLib.runner import JobRunner

        return JobRunner(jobPath, python=pythonSlicerExecutable())

    def start(self, targetNode, atlasDir, outDir=None, onEvent: Optional[Callable] = None,
              onFinished: Optional[Callable] = None, loadResults: bool = True, retention: str = "keep",
              keepLast: int = 5, **params) -> MASRefineJob:
        """Start segmenting ``targetNode`` with the atlas set in ``atlasDir`` in the background.

        :param outDir: folder under which this run's folder is made (default: Slicer's temporary folder).
        :param retention: what happens to the run folder (``MASRefineLib.runs.RETENTION``): ``"keep"``,
            ``"delete-on-close"`` (removed when the scene closes or Slicer quits) or ``"keep-last"`` (the oldest
            run folders in ``outDir`` are removed now, keeping the newest ``keepLast``, running ones always).
        :param params: ``preset``, ``prereg``, ``refine``, ``fusion``, ``device``, ``alpha``, ``gamma``,
            ``iterations`` (see :meth:`jobParameters`).
        :param onEvent: called as ``onEvent(job, event)`` for every worker event.
        :param onFinished: called as ``onFinished(job)`` once the job completed, failed or was cancelled.
        :returns: the :class:`MASRefineJob` (``cancel()``, ``wait()``).
        """
        problem = self.inputProblem(targetNode, atlasDir)
        if problem:
            raise ValueError(problem)
        jobParams = self.jobParameters(**params)
        from MASRefineLib import runs
        from MASRefineLib.protocol import jobs

        retention = Retention(retention.value if isinstance(retention, Retention) else retention).value
        safeName = "".join(c if c.isalnum() or c in "-_" else "_" for c in targetNode.GetName())[:40]
        base = self.runsFolder(outDir)
        runDir = str(runs.make_run_folder(base, safeName))
        if retention == Retention.KEEP_LAST.value:
            for removed in runs.prune(base, int(keepLast), exclude=[runDir] + [j.outDir for j in activeJobs]):
                logging.info(f"MASRefine: removed the old run folder {removed}")
        elif retention == Retention.DELETE_ON_CLOSE.value:
            removeOnClose(runDir)
        targetPath = os.path.join(runDir, f"{safeName or 'target'}.nrrd")
        # A fresh properties dict: exportNode's default is one dict shared by every call, into which it writes
        # the "fileFormat" it picked; left to the default, every later exportNode in Slicer would get NRRD.
        slicer.util.exportNode(targetNode, targetPath, properties={}, world=True)
        if not os.path.isfile(targetPath):
            raise RuntimeError(_("Could not write the target volume to {path}").format(path=targetPath))
        outputDir = os.path.join(runDir, "output")
        job = jobs.make_job(targetPath, str(atlasDir), outputDir, **jobParams)
        jobPath = os.path.join(runDir, "job.json")
        jobs.write_job(job, jobPath)

        runner = self._makeRunner(jobPath)
        handle = launch(MASRefineJob(runner, runDir, outputDir, targetNode=targetNode,
                                     loadResults=self.loadJobResults if loadResults else None,
                                     onEvent=onEvent, onFinished=onFinished))
        handle.atlasDir = str(atlasDir)  # where "add this case to the atlas set" adds a corrected result
        logging.info(f"MASRefine: started {' '.join(str(c) for c in getattr(runner, 'command', [jobPath]))}")
        return handle

    def segment(self, targetNode, atlasDir, outDir=None, timeout: Optional[float] = None,
                ensureDependencies: bool = True, **params) -> dict:
        """Segment ``targetNode`` and wait; returns the created nodes ``{role: node}`` (see :meth:`start`)."""
        if ensureDependencies:
            self.ensureDependencies(askConfirmation=True)
        job = self.start(targetNode, atlasDir, outDir=outDir, **params)
        return job.wait(timeout, processEvents=slicer.app.processEvents)

    # Results (MASRefineModule.Results; methods here for the console API)

    COLORMAPS = Results.COLORMAPS
    loadJobResults = staticmethod(Results.loadJobResults)
    loadAtlas = staticmethod(Results.loadAtlas)
    showAtlas = staticmethod(Results.showAtlas)
    showAtlasSideBySide = staticmethod(Results.showAtlasSideBySide)
    saveViews = staticmethod(Results.saveViews)
    restoreViews = staticmethod(Results.restoreViews)

    # Atlas sets from the scene (MASRefineModule.SceneAtlas)

    def startAtlasBuild(self, segmentationNodes, atlasDir, onEvent: Optional[Callable] = None,
                        onFinished: Optional[Callable] = None) -> MASRefineJob:
        """A new atlas set in ``atlasDir`` (new or empty) from segmentation nodes, each with its source volume, in the
        background: labels from the segment names (the same in every segmentation), colours and terminology."""
        if not pathIsSet(atlasDir):
            raise ValueError(_("Select a folder for the new atlas set"))
        return SceneAtlas.startAtlasJob(self, SceneAtlas.casePairs(list(segmentationNodes)), atlasDir, "new",
                                        onEvent=onEvent, onFinished=onFinished)

    def startAddCase(self, job, volumeNode=None, segmentationNode=None, onEvent: Optional[Callable] = None,
                     onFinished: Optional[Callable] = None) -> MASRefineJob:
        """Add a finished run's result (its fused segmentation, as the user corrected it, on its target) to the atlas
        set the run used, in the background; the segment names must be the set's label names."""
        volumeNode = volumeNode or (job.targetNode if job is not None else None)
        segmentationNode = segmentationNode or (job.nodes.get("fused-labels") if job is not None else None)
        for node, what in ((volumeNode, _("target volume")), (segmentationNode, _("segmentation"))):
            if node is None or not slicer.mrmlScene.IsNodePresent(node):
                raise ValueError(_("The run's {what} is no longer in the scene").format(what=what))
        return SceneAtlas.startAtlasJob(self, [(volumeNode, segmentationNode)], job.atlasDir, "add",
                                        onEvent=onEvent, onFinished=onFinished)

    # The built-in phantom atlas set (MASRefineModule.Sample): made or reused, with its target loaded (waits), or
    # in the background (``job.sample`` once completed)
    loadSampleData = staticmethod(Sample.loadSampleData)
    startSample = staticmethod(Sample.startSample)
