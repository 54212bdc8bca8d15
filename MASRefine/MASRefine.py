"""MASRefine: multi-atlas segmentation with registration refinement (VoteNet++) in 3D Slicer.

The module is thin glue over the MASRefineLib library. Nothing heavy runs inside Slicer's process:
the target volume is exported (``exportNode(..., world=True)``), a ``job.json`` is written with
``MASRefineLib.jobs``, and ``PythonSlicer -m MASRefineLib.worker job.json`` runs in the background
through ``MASRefineLib.runner.JobRunner``. A ``qt.QTimer`` pumps ``runner.poll()`` for JSON-lines events
(started, stage, progress, log, warning, result, error, cancelled); when the worker reports its result
the manifest is turned into nodes with the pure-Python load plan (``MASRefineLib.loadplan``).

Console use::

    logic = slicer.util.getModuleLogic("MASRefine")
    nodes = logic.segment(volumeNode, "/path/to/atlas-set", refine="IS", fusion="votenet")
    job = logic.start(volumeNode, "/path/to/atlas-set", preset="fast")   # returns at once
    job.cancel()   # or: nodes = job.wait()

torch, MONAI and the MASRefineLib modules that import them are never imported in Slicer's process;
the worker imports them. Dependencies are installed only after asking (``ensureDependencies``).
"""
import enum
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Annotated, Callable, Optional

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

#
# MASRefine
#


class MASRefine(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MASRefine")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MASRefine developers"]
        self.parent.helpText = _("""
Multi-atlas segmentation of a target volume with an atlas set (a folder with <code>atlas.json</code>):
each atlas is pre-registered to the target (affine or deformable), the registration is refined by
numerical optimisation of a displacement field (VoteNet++: image term (I), or image and segmentation
terms (IS)), and the warped atlas labels are fused (plurality vote, weighted vote, joint label fusion,
STAPLE or VoteNet+). The work runs in a background process with progress and a Cancel button; the
fused labels appear as a segmentation node, and each atlas can be inspected in the QA table.
""")
        self.parent.acknowledgementText = _("""
Implements the method of "VoteNet++: Registration Refinement for Multi-Atlas Segmentation" (ISBI 2021).
Uses PyTorch (through the PyTorch extension), MONAI, SimpleITK and slicerio; licensed Apache-2.0.
""")

        # Additional initialization step after application startup is complete
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Register sample data sets in Sample Data module
#


def registerSampleData():
    """Add the built-in phantom atlas set to the Sample Data module.

    The phantom (a small knee-like atlas set and a target) is generated offline by
    ``MASRefineLib.sampledata`` in a PythonSlicer process; nothing is downloaded.
    """
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources/Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MASRefine",
        sampleName="MASRefinePhantom",
        thumbnailFileName=os.path.join(iconsPath, "MASRefine.png"),
        # Generated locally: the uri and file name only name the data set for Sample Data's bookkeeping.
        uris="masrefine:phantom",
        fileNames="MASRefinePhantom-target.nrrd",
        nodeNames="MASRefinePhantom",
        customDownloader=lambda source: MASRefineLogic().loadSampleData(),
    )


#
# Choices (serialized in the scene by name; values are the worker's job parameters)
#


class Preset(enum.Enum):
    FAST = "fast"
    DEFAULT = "default"
    ACCURATE = "accurate"

    def label(self) -> str:
        return {Preset.FAST: _("Fast"), Preset.DEFAULT: _("Default"), Preset.ACCURATE: _("Accurate")}[self]


class PreRegistration(enum.Enum):
    AFFINE = "affine"
    DEFORMABLE = "deformable"

    def label(self) -> str:
        return {PreRegistration.AFFINE: _("Affine"), PreRegistration.DEFORMABLE: _("Deformable")}[self]


class Refinement(enum.Enum):
    NONE = "none"
    I = "I"  # noqa: E741 (the paper's name: image term only)
    IS = "IS"

    def label(self) -> str:
        return {
            Refinement.NONE: _("None"),
            Refinement.I: _("(I) image similarity + regularity"),
            Refinement.IS: _("(IS) image + segmentation similarity + regularity"),
        }[self]


class Fusion(enum.Enum):
    PV = "pv"
    WV = "wv"
    JLF = "jlf"
    STAPLE = "staple"
    VOTENET = "votenet"

    def label(self) -> str:
        return {
            Fusion.PV: _("Plurality vote"),
            Fusion.WV: _("Weighted vote"),
            Fusion.JLF: _("Joint label fusion"),
            Fusion.STAPLE: _("STAPLE"),
            Fusion.VOTENET: _("VoteNet+"),
        }[self]


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {Device.AUTO: _("Automatic (GPU if available)"), Device.CPU: _("CPU"), Device.CUDA: _("CUDA GPU")}[self]


# Values shown in the Advanced section, sent only when "override" is checked (otherwise the preset
# decides). They are the library's defaults (MASRefineLib/refine.py: DEFAULT_ALPHA, DEFAULT_GAMMA in
# mm^2, the finest level of DEFAULT_ITERATIONS); Testing/test_slicer_module.py keeps them in step.
DEFAULT_ALPHA = 3.0
DEFAULT_GAMMA = 40.0
DEFAULT_ITERATIONS = 20

#
# MASRefineParameterNode
#


@parameterNodeWrapper
class MASRefineParameterNode:
    """
    The parameters needed by module.

    targetVolume - The volume to segment.
    atlasDir - The atlas-set folder (with atlas.json).
    outputDir - Where runs are written (a folder per run); empty: Slicer's temporary folder.
    preset - Speed/accuracy preset of every stage (the worker's "preset" job parameter).
    prereg, refine, fusion, device - The method (the worker's job parameters of the same names).
    overrideDefaults - Send alpha/gamma/iterations to the worker; otherwise the preset decides.
    alpha - Weight of the segmentation dissimilarity term (dimensionless; paper: 3).
    gamma - Weight of the bending energy, in mm^2 (the paper's 20000 is in other units; see refine.py).
    iterations - Refinement iterations at the finest level.
    """

    targetVolume: vtkMRMLScalarVolumeNode
    atlasDir: pathlib.Path
    outputDir: pathlib.Path
    preset: Preset = Preset.DEFAULT
    prereg: PreRegistration = PreRegistration.DEFORMABLE
    refine: Refinement = Refinement.I
    fusion: Fusion = Fusion.JLF
    device: Device = Device.AUTO
    overrideDefaults: bool = False
    alpha: Annotated[float, WithinRange(0.0, 1000.0)] = DEFAULT_ALPHA
    gamma: Annotated[float, WithinRange(0.0, 1000.0)] = DEFAULT_GAMMA
    iterations: Annotated[int, WithinRange(1, 100000)] = DEFAULT_ITERATIONS


def _pathIsSet(path) -> bool:
    """A pathlib.Path parameter that was never set reads as '.'."""
    return path is not None and str(path) not in ("", ".")


#
# MASRefineWidget
#


class MASRefineWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._flickerTimer = None
        self._flickerShowsUnrefined = False

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MASRefine.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets. In Qt designer the top-level qMRMLWidget's
        # "mrmlSceneChanged(vtkMRMLScene*)" signal is connected to each MRML widget's
        # "setMRMLScene(vtkMRMLScene*)" slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # Create logic class. Logic implements all computations that should be possible to run
        # in batch mode, without a graphical user interface.
        self.logic = MASRefineLogic()

        self.ui.atlasDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.outputDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(500)
        self._flickerTimer.connect("timeout()", self.onFlickerTimeout)

        # Connections

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleDataButton)
        self.ui.openOutputFolderButton.connect("clicked(bool)", self.onOpenOutputFolderButton)
        self.ui.qaTableWidget.connect("itemSelectionChanged()", self.onQaSelectionChanged)
        self.ui.qaOpacitySlider.connect("valueChanged(double)", self.onQaOpacityChanged)
        self.ui.qaFlickerButton.connect("toggled(bool)", self.onQaFlickerToggled)
        self.ui.qaSideBySideButton.connect("toggled(bool)", self.onQaSideBySideToggled)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self._updateRunState()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._flickerTimer:
            self._flickerTimer.stop()
        stopAllJobs()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)
        # The worker is stopped by stopAllJobs (observer installed by MASRefineLogic.start); forget its results.
        self._job = None
        if self._flickerTimer:
            self._flickerTimer.stop()
        self._clearQaTable()
        self._updateRunState()

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.targetVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.targetVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[MASRefineParameterNode]) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self.ui.alphaSpinBox.enabled = bool(p and p.overrideDefaults)
        self.ui.gammaSpinBox.enabled = bool(p and p.overrideDefaults)
        self.ui.iterationsSpinBox.enabled = bool(p and p.overrideDefaults)
        if self._job is not None and self._job.running:
            return  # the button is Cancel while a job runs
        problem = self.logic.inputProblem(p.targetVolume, p.atlasDir) if p else _("No parameter node")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Segment the target volume with the atlas set")

    # Running a job

    def onApplyButton(self) -> None:
        """Apply starts a background run; while it runs the same button cancels it."""
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self.ui.applyButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start MASRefine."), waitCursor=True):
            p = self._parameterNode
            self.logic.ensureDependencies(askConfirmation=True)
            self._clearQaTable()
            self.ui.logTextEdit.clear()
            self._job = self.logic.start(
                p.targetVolume,
                p.atlasDir,
                outDir=p.outputDir if _pathIsSet(p.outputDir) else None,
                onEvent=self._onJobEvent,
                onFinished=self._onJobFinished,
                **self.logic.parametersFromNode(p),
            )
            self._appendLog(_("Output folder: {path}").format(path=self._job.outDir))
        self._updateRunState()

    def _onJobEvent(self, job, ev: dict) -> None:
        if job is not self._job:
            return
        kind = ev.get("event")
        self.ui.progressBar.value = int(round(job.fraction * 100))
        if job.stage:
            self.ui.statusLabel.text = f"{job.stage}: {job.message}" if job.message else job.stage
        if kind in ("log", "warning", "error", "stage", "output"):
            text = ev.get("message") or ev.get("stage") or ev.get("line") or ""
            prefix = {"warning": _("Warning: "), "error": _("Error: ")}.get(kind, "")
            self._appendLog(prefix + str(text))

    def _onJobFinished(self, job) -> None:
        if job is not self._job:
            return
        if job.state == "completed":
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = _("Done.")
            self._fillQaTable(job)
        elif job.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled.")
        else:
            self.ui.statusLabel.text = _("Failed.")
            self._appendLog(_("Error: ") + str(job.error))
            slicer.util.errorDisplay(_("MASRefine failed: {error}").format(error=job.error))
        self._updateRunState()

    def _updateRunState(self) -> None:
        running = self._job is not None and self._job.running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        if running:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Stop the background run")
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.visible = self._job is not None
        self.ui.openOutputFolderButton.enabled = self._job is not None and os.path.isdir(self._job.outputDir)
        if not running:
            self._checkCanApply()

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onOpenOutputFolderButton(self) -> None:
        if self._job is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self._job.outputDir))

    def onSampleDataButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to create the sample atlas set."), waitCursor=True):
            sample = self.logic.loadSampleData()
            self._parameterNode.targetVolume = sample["target"]
            self._parameterNode.atlasDir = pathlib.Path(sample["atlas_dir"])

    # Quality assurance

    def _clearQaTable(self) -> None:
        self.ui.qaTableWidget.clear()
        self.ui.qaTableWidget.setRowCount(0)
        self.ui.qaTableWidget.setColumnCount(0)
        self.ui.qaCollapsibleButton.enabled = False

    def _fillQaTable(self, job) -> None:
        header, rows = job.qaHeader, job.qaRows
        table = self.ui.qaTableWidget
        table.setColumnCount(len(header))
        table.setHorizontalHeaderLabels(header)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, key in enumerate(header):
                item = qt.QTableWidgetItem(_formatQaValue(row.get(key, "")))
                item.setData(qt.Qt.UserRole, str(row.get(job.qaIdColumn, "")))
                table.setItem(r, c, item)
        table.resizeColumnsToContents()
        self.ui.qaCollapsibleButton.enabled = bool(rows)

    def _selectedAtlasId(self) -> Optional[str]:
        items = self.ui.qaTableWidget.selectedItems()
        return items[0].data(qt.Qt.UserRole) if items else None

    def onQaSelectionChanged(self) -> None:
        atlasId = self._selectedAtlasId()
        if self._job is None or atlasId is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show atlas {id}.").format(id=atlasId), waitCursor=True):
            self._flickerShowsUnrefined = False
            self._showSelectedAtlas()

    def _showSelectedAtlas(self) -> None:
        atlasId = self._selectedAtlasId()
        if self._job is None or atlasId is None:
            return
        opacity = self.ui.qaOpacitySlider.value
        if self.ui.qaSideBySideButton.checked:
            self.logic.showAtlasSideBySide(self._job, atlasId, opacity)
        else:
            self.logic.showAtlas(self._job, atlasId, opacity, unrefined=self._flickerShowsUnrefined)

    def onQaOpacityChanged(self, value: float) -> None:
        if self._selectedAtlasId() is not None:
            self._showSelectedAtlas()

    def onQaFlickerToggled(self, checked: bool) -> None:
        self._flickerShowsUnrefined = False
        if checked:
            self.ui.qaSideBySideButton.checked = False
            self._flickerTimer.start()
        else:
            self._flickerTimer.stop()
            self._showSelectedAtlas()

    def onFlickerTimeout(self) -> None:
        if self._job is None or self._selectedAtlasId() is None:
            return
        self._flickerShowsUnrefined = not self._flickerShowsUnrefined
        self._showSelectedAtlas()

    def onQaSideBySideToggled(self, checked: bool) -> None:
        if checked:
            self.ui.qaFlickerButton.checked = False
        self._showSelectedAtlas()


def _formatQaValue(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}"


#
# Background jobs
#


_activeJobs = []
_jobGuardsInstalled = False


def stopAllJobs(*args) -> None:
    """Stop every running worker at once (scene close, application exit, module cleanup)."""
    for job in list(_activeJobs):
        job.stop()


def _installJobGuards() -> None:
    """Kill running workers when the scene is closed or the application exits (installed once)."""
    global _jobGuardsInstalled
    if _jobGuardsInstalled:
        return
    slicer.app.connect("aboutToQuit()", stopAllJobs)
    slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, stopAllJobs)
    _jobGuardsInstalled = True


class MASRefineJob:
    """One background run, as returned by :meth:`MASRefineLogic.start`.

    ``state`` is "running", then "completed", "failed" or "cancelled" once the worker process has
    ended. ``poll()`` reads the runner's events (a ``qt.QTimer`` calls it every 200 ms); ``cancel()`` asks
    the worker to stop (the runner kills its process group after ``grace_s``); ``stop()`` kills it now
    and discards its results; ``wait()`` blocks until the end and returns the created
    nodes (a dict ``{role: node}``, e.g. ``"fused-labels"``) or raises. After completion ``nodes`` are the
    nodes loaded at once (fused segmentation, QA table), ``atlasNodes`` the atlases loaded on demand,
    ``qaHeader``/``qaRows`` the per-atlas QA numbers (``qaIdColumn``: the atlas id).
    """

    def __init__(self, runner, outDir: str, outputDir: str, targetNode=None,
                 loadResults: Optional[Callable] = None,
                 onEvent: Optional[Callable] = None, onFinished: Optional[Callable] = None):
        self.runner = runner
        self.outDir = outDir  # the run folder: job.json, exported target, output/
        self.outputDir = outputDir  # the worker's output folder (manifest.json)
        self.targetNode = targetNode
        self.state = "running"
        self.stage = ""
        self.message = ""
        self.stageFraction = 0.0  # 0..1 within the current stage
        self.overall = None  # 0..1 of the whole job, once the worker reports it
        self.messages = []
        self.error = None
        self.manifestPath = None
        self.nodes = {}
        self.atlasNodes = {}
        self.folders = {}  # load-plan folder path (tuple) -> subject-hierarchy item
        self.qaHeader, self.qaRows, self.qaIdColumn = [], [], ""
        self.timer = None
        self._loadResults = loadResults
        self._onEvent = onEvent
        self._onFinished = onFinished
        self._polling = False
        self._outcome = None  # the worker's result/error/cancelled event
        self._stopRequested = False

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        """Progress 0..1: of the whole job when the worker reports it, else of the current stage."""
        return self.overall if self.overall is not None else self.stageFraction

    def poll(self) -> bool:
        """Handle the events that arrived; returns True while the job runs."""
        if self._polling or not self.running:
            return self.running
        self._polling = True
        try:
            for ev in self.runner.poll():
                self._handle(ev)
                if not self.running:
                    break
        finally:
            self._polling = False
        return self.running

    def _handle(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind in ("stage", "progress"):
            if ev.get("stage") and ev.get("stage") != self.stage:
                self.stage, self.stageFraction = str(ev["stage"]), 0.0
            self.message = str(ev.get("message") or "")
            for key, attr in (("fraction", "stageFraction"), ("overall", "overall")):
                if kind == "progress" and ev.get(key) is not None:
                    try:
                        setattr(self, attr, min(max(float(ev[key]), 0.0), 1.0))
                    except (TypeError, ValueError):
                        pass
        elif kind in ("log", "warning", "started", "output"):
            self.messages.append((kind, str(ev.get("message", ev.get("line", "")))))
            if kind == "warning":
                logging.warning(f"MASRefine: {ev.get('message', '')}")
        elif kind == "error" and ev.get("traceback"):
            logging.error(f"MASRefine worker error:\n{ev['traceback']}")
        if self._onEvent:
            self._onEvent(self, ev)
        # The worker's outcome (result, error or cancelled) is kept until the runner's "exit" event,
        # which comes last, once the process has ended: finishing then never blocks the GUI.
        if kind in ("result", "error", "cancelled") and self._outcome is None:
            self._outcome = ev
        elif kind == "exit":
            self._finish(ev)

    def _finish(self, exitEvent: dict) -> None:
        outcome = self._outcome or {}
        if outcome.get("event") == "result" and not self._stopRequested:
            state = "completed"
            self.manifestPath = outcome.get("manifest") or os.path.join(self.outputDir, "manifest.json")
            self.overall = 1.0
        elif outcome.get("event") == "error":
            state = "failed"
            self.error = str(outcome.get("message") or _("the worker stopped with an error"))
        elif outcome.get("event") in ("cancelled", "result") or exitEvent.get("status") == "cancelled":
            state = "cancelled"
        else:
            state = "failed"
            self.error = _("the worker exited with code {code} without a result").format(code=exitEvent.get("returncode"))
        if self.timer is not None:
            self.timer.stop()
        if self in _activeJobs:
            _activeJobs.remove(self)
        if state == "completed" and self._loadResults is not None:
            try:
                self._loadResults(self)
            except Exception as e:
                logging.exception("MASRefine: loading the results failed")
                state = "failed"
                self.error = _("loading the results of {path} failed: {error}").format(path=self.manifestPath, error=e)
        self.state = state
        if self._onFinished:
            self._onFinished(self)

    def cancel(self, grace_s: float = 5.0) -> None:
        """Ask the worker to stop; the job becomes "cancelled" when the worker has ended."""
        if self.running:
            self.runner.cancel(grace_s)

    def stop(self) -> None:
        """Kill the worker now and load nothing, even a result already on its way (scene close, exit)."""
        self._stopRequested = True
        self.cancel(grace_s=0.0)

    def wait(self, timeout: Optional[float] = None, processEvents: Optional[Callable] = None) -> dict:
        """Block until the job ends; return ``nodes`` or raise RuntimeError (failed/cancelled) or TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        timedOut = False
        while self.poll():
            if deadline is not None and not timedOut and time.monotonic() > deadline:
                timedOut = True
                self.cancel(grace_s=0.0)
            if processEvents:
                processEvents()
            time.sleep(0.05)
        if timedOut:
            raise TimeoutError(_("MASRefine did not finish within {s} s; the run was stopped").format(s=timeout))
        if self.state == "failed":
            raise RuntimeError(_("MASRefine failed: {error}").format(error=self.error))
        if self.state == "cancelled":
            raise RuntimeError(_("MASRefine was cancelled"))
        return self.nodes


def _moduleDir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def libraryParentDir() -> str:
    """The folder that contains MASRefineLib: beside this file once installed (WITH_SUBDIR), or the
    repository root when the module is used from the source tree."""
    for candidate in (_moduleDir(), os.path.dirname(_moduleDir())):
        if os.path.isfile(os.path.join(candidate, "MASRefineLib", "__init__.py")):
            return candidate
    raise RuntimeError(_("MASRefineLib was not found beside {path}").format(path=_moduleDir()))


def _ensureLibraryImportable() -> None:
    parent = libraryParentDir()
    if parent not in sys.path:
        sys.path.insert(0, parent)


def pythonSlicerExecutable() -> str:
    """PythonSlicer (Slicer's Python without the application), which runs the worker."""
    return shutil.which("PythonSlicer") or sys.executable


def workerEnvironment() -> dict:
    """The worker's environment: Slicer's, with MASRefineLib importable."""
    env = dict(os.environ)
    parent = libraryParentDir()
    env["PYTHONPATH"] = os.pathsep.join([parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def readRequirements(path: Optional[str] = None) -> list:
    """Requirement strings of Resources/requirements.txt (never torch, numpy or SimpleITK: see the file)."""
    path = path or os.path.join(_moduleDir(), "Resources", "requirements.txt")
    with open(path, encoding="utf-8") as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]


def requirementSatisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies the requirement (checked without importing it)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


#
# MASRefineLogic
#


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

    # Packages Slicer provides itself or through the PyTorch extension: never pip-installed here.
    NEVER_PIP_INSTALL = ("numpy", "SimpleITK", "torch")
    MINIMUM_TORCH_VERSION = "2.1"
    POLL_INTERVAL_MS = 200

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
        """The worker's job parameters (``MASRefineLib.jobs.PARAMETERS``) from keyword arguments.

        Choices may be given as enum members or their string values (``refine="IS"``); numbers as numbers.
        Parameters left at None are not sent, so the library's defaults and the preset decide them.
        Unknown values raise ValueError.
        """
        def choice(enumType, value):
            if value is None or isinstance(value, enumType):
                return value
            for member in enumType:
                if str(value).lower() in (member.value.lower(), member.name.lower()):
                    return member
            raise ValueError(_("{value!r} is not one of {choices}").format(
                value=value, choices=", ".join(m.value for m in enumType)))

        params = {}
        for name, enumType, value in (("preset", Preset, preset), ("prereg", PreRegistration, prereg),
                                      ("refine", Refinement, refine), ("fusion", Fusion, fusion),
                                      ("device", Device, device)):
            member = choice(enumType, value)
            if member is not None:
                params[name] = member.value
        for name, value, kind in (("alpha", alpha, float), ("gamma", gamma, float), ("iterations", iterations, int)):
            if value is not None:
                if kind(value) < 0 or (kind is int and kind(value) < 1):
                    raise ValueError(_("{name} must be positive, got {value}").format(name=name, value=value))
                params[name] = kind(value)
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
    def inputProblem(targetNode, atlasDir) -> Optional[str]:
        """A one-line reason why the inputs cannot be used, or None."""
        if targetNode is None:
            return _("Select a target volume")
        if targetNode.GetImageData() is None:
            return _("The target volume {name} has no image data").format(name=targetNode.GetName())
        if not _pathIsSet(atlasDir):
            return _("Select an atlas-set folder")
        if not os.path.isfile(os.path.join(str(atlasDir), "atlas.json")):
            return _("{path} is not an atlas set (atlas.json is missing)").format(path=atlasDir)
        return None

    # Dependencies

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Make sure the worker's packages are installed in Slicer's Python, asking before installing.

        torch comes from the PyTorch extension (PyTorchUtils); the others from Resources/requirements.txt
        through pip. numpy and SimpleITK are Slicer's own and are never pip-installed.
        """
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(_("MASRefine needs the PyTorch extension: install it from the Extensions Manager and restart Slicer."))
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                                torchVersionRequirement=f">={self.MINIMUM_TORCH_VERSION}")
                if torch is None:
                    raise RuntimeError(_("PyTorch is required: install it with the PyTorch Utils module."))

        missing = [r for r in readRequirements() if not requirementSatisfied(r)]
        if not missing:
            return
        # Pin what Slicer and the PyTorch extension provide so that pip never replaces them.
        from importlib import metadata

        constraints = os.path.join(slicer.app.temporaryPath, "MASRefine-constraints.txt")
        with open(constraints, "w", encoding="utf-8") as f:
            for name in self.NEVER_PIP_INSTALL:
                try:
                    f.write(f"{name}=={metadata.version(name)}\n")
                except metadata.PackageNotFoundError:
                    pass
        pydeps = getattr(slicer, "pydeps", None)  # Slicer's newer dependency helpers
        if pydeps is not None and hasattr(pydeps, "pip_ensure"):
            import inspect

            from packaging.requirements import Requirement

            options = {"constraints": constraints, "prompt_install": askConfirmation, "requester": "MASRefine"}
            accepted = inspect.signature(pydeps.pip_ensure).parameters
            if "skip_packages" in accepted:
                options["skip_packages"] = list(self.NEVER_PIP_INSTALL)
            pydeps.pip_ensure([Requirement(r) for r in missing], **{k: v for k, v in options.items() if k in accepted})
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MASRefine needs these Python packages:\n{packages}\n\nInstall them now?").format(packages="\n".join(missing)),
                _("MASRefine - Install Python packages")):
            raise RuntimeError(_("MASRefine needs {packages}; installation was declined.").format(packages=", ".join(missing)))
        slicer.util.pip_install(["-c", constraints] + missing)

    # Running

    def _makeRunner(self, jobPath: str):
        """The background runner of ``PythonSlicer -m MASRefineLib.worker job.json`` (not started)."""
        if self.runnerFactory is not None:
            return self.runnerFactory(jobPath)
        from MASRefineLib.runner import JobRunner

        return JobRunner(jobPath, python=pythonSlicerExecutable())

    def start(self, targetNode, atlasDir, outDir=None, onEvent: Optional[Callable] = None,
              onFinished: Optional[Callable] = None, loadResults: bool = True, **params) -> MASRefineJob:
        """Start segmenting ``targetNode`` with the atlas set in ``atlasDir`` in the background.

        :param outDir: folder under which this run's folder is made (default: Slicer's temporary folder).
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
        _ensureLibraryImportable()
        from MASRefineLib import jobs

        safeName = "".join(c if c.isalnum() or c in "-_" else "_" for c in targetNode.GetName())[:40]
        base = str(outDir) if outDir else os.path.join(slicer.app.temporaryPath, "MASRefine")
        runDir = os.path.join(base, f"{time.strftime('%Y%m%d-%H%M%S')}-{safeName}")
        suffix = 1
        while os.path.exists(runDir):
            suffix += 1
            runDir = os.path.join(base, f"{time.strftime('%Y%m%d-%H%M%S')}-{safeName}-{suffix}")
        os.makedirs(runDir)
        targetPath = os.path.join(runDir, f"{safeName or 'target'}.nrrd")
        slicer.util.exportNode(targetNode, targetPath, world=True)
        if not os.path.isfile(targetPath):
            raise RuntimeError(_("Could not write the target volume to {path}").format(path=targetPath))
        outputDir = os.path.join(runDir, "output")
        job = jobs.make_job(targetPath, str(atlasDir), outputDir, **jobParams)
        jobPath = os.path.join(runDir, "job.json")
        jobs.write_job(job, jobPath)

        runner = self._makeRunner(jobPath)
        handle = MASRefineJob(runner, runDir, outputDir, targetNode=targetNode,
                              loadResults=self.loadJobResults if loadResults else None,
                              onEvent=onEvent, onFinished=onFinished)
        _installJobGuards()
        runner.start()
        _activeJobs.append(handle)
        handle.timer = qt.QTimer()
        handle.timer.setInterval(self.POLL_INTERVAL_MS)
        handle.timer.connect("timeout()", handle.poll)
        handle.timer.start()
        logging.info(f"MASRefine: started {' '.join(str(c) for c in getattr(runner, 'command', [jobPath]))}")
        return handle

    def segment(self, targetNode, atlasDir, outDir=None, timeout: Optional[float] = None,
                ensureDependencies: bool = True, **params) -> dict:
        """Segment ``targetNode`` and wait; returns the created nodes ``{role: node}`` (see :meth:`start`)."""
        if ensureDependencies:
            self.ensureDependencies(askConfirmation=True)
        job = self.start(targetNode, atlasDir, outDir=outDir, **params)
        return job.wait(timeout, processEvents=slicer.app.processEvents)

    # Results

    # Colour tables for the load plan's "display": {"colormap": ...} of volumes.
    COLORMAPS = {"Grey": "vtkMRMLColorTableNodeGrey", "Viridis": "vtkMRMLColorTableNodeFileViridis.txt",
                 "ColdToHotRainbow": "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"}

    def loadJobResults(self, job: MASRefineJob) -> None:
        """Turn the job's manifest into nodes with the load plan (``MASRefineLib.loadplan``): the run-level
        outputs now (fused segmentation, QA table), per-atlas outputs on demand (:meth:`loadAtlas`)."""
        _ensureLibraryImportable()
        from MASRefineLib import loadplan

        for item in loadplan.load_plan(job.manifestPath):
            job.nodes[item["role"]] = self.loadItem(item, job)
        rows = loadplan.qa_rows(job.manifestPath)
        header = []
        for row in rows:
            header += [k for k in row if k not in header]
        job.qaHeader, job.qaRows, job.qaIdColumn = header, rows, "id"

    def _folderItem(self, job: MASRefineJob, path) -> int:
        """The subject-hierarchy folder for a load-plan ``folder`` path (made once per job)."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = sh.GetSceneItemID()
        for depth in range(1, len(path) + 1):
            key = tuple(path[:depth])
            if key not in job.folders:
                job.folders[key] = sh.CreateFolderItem(parent, key[-1])
            parent = job.folders[key]
        return parent

    def loadItem(self, item: dict, job: MASRefineJob):
        """Load one load-plan item as a node, set its properties, and put it in its folder."""
        kind, path, name, target = item["kind"], item["path"], item["name"], job.targetNode
        show = bool(item.get("show"))
        if kind == "segmentation":
            node = self._loadSegmentation(path, name, item.get("labels"))
            if target is not None and item.get("reference") == "target":
                node.SetReferenceImageGeometryParameterFromVolumeNode(target)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetVisibility(show)
        elif kind == "volume":
            node = slicer.util.loadVolume(path, {"name": name, "show": show})
            display = item.get("display") or {}
            displayNode = node.GetDisplayNode()
            if displayNode is not None and display.get("colormap") in self.COLORMAPS:
                displayNode.SetAndObserveColorNodeID(self.COLORMAPS[display["colormap"]])
            if displayNode is not None and display.get("window"):
                low, high = display["window"]
                displayNode.AutoWindowLevelOff()
                displayNode.SetWindowLevelMinMax(low, high)
        elif kind == "transform":
            node = slicer.util.loadTransform(path)
            node.SetName(name)
            if target is not None and item.get("fixed") == "target":
                node.SetNodeReferenceID("fixedVolume", target.GetID())
        elif kind == "table":
            node = slicer.util.loadTable(path)
            node.SetName(name)
        else:
            raise ValueError(_("{path}: unknown load-plan kind {kind!r}").format(path=path, kind=kind))
        node.SetAttribute("MASRefine.role", str(item.get("role") or ""))
        node.SetAttribute("MASRefine.atlasId", str(item.get("atlas_id") or ""))
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        sh.SetItemParent(sh.GetItemByDataNode(node), self._folderItem(job, item.get("folder") or ["MASRefine"]))
        return node

    @staticmethod
    def _loadSegmentation(path: str, name: str, labels: Optional[dict] = None):
        """A segmentation node from a .seg.nrrd (names and colors inside) or a label map, whose segments
        get the names and colors of ``labels`` ``{value: {"name", "color": [r, g, b] 0..255}}``."""
        if path.lower().endswith(".seg.nrrd"):
            return slicer.util.loadSegmentation(path, {"name": name})
        labelmap = slicer.util.loadLabelVolume(path, {"name": name + " labelmap", "show": False})
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        slicer.mrmlScene.RemoveNode(labelmap)
        table = {int(k): (v if isinstance(v, dict) else {"name": str(v)}) for k, v in (labels or {}).items()}
        segments = segmentation.GetSegmentation()
        for i in range(segments.GetNumberOfSegments()):
            segment = segments.GetNthSegment(i)
            label = table.get(segment.GetLabelValue())
            if label:
                segment.SetName(label.get("name", segment.GetName()))
                if label.get("color"):
                    segment.SetColor(*[c / 255.0 for c in label["color"][:3]])
        return segmentation

    def loadAtlas(self, job: MASRefineJob, atlasId) -> dict:
        """Load (once) one atlas's outputs ``{role: node}``: warped image (refined and unrefined), labels,
        displacement field as a transform (fixed: the target; moving: the original atlas image, shown
        through the transform), Jacobian map."""
        atlasId = str(atlasId)
        if atlasId in job.atlasNodes:
            return job.atlasNodes[atlasId]
        _ensureLibraryImportable()
        from MASRefineLib import loadplan

        nodes = {}
        for item in loadplan.load_plan(job.manifestPath, atlases=[atlasId]):
            if str(item.get("atlas_id")) != atlasId:
                continue  # the run-level items, loaded already
            node = nodes[item["role"]] = self.loadItem(item, job)
            moving = item.get("moving") if item["kind"] == "transform" else None
            if moving and os.path.isfile(moving):
                movingNode = slicer.util.loadVolume(moving, {"name": f"{atlasId} original", "show": False})
                movingNode.SetAndObserveTransformNodeID(node.GetID())
                node.SetNodeReferenceID("movingVolume", movingNode.GetID())
                sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
                sh.SetItemParent(sh.GetItemByDataNode(movingNode), self._folderItem(job, item["folder"]))
                nodes["atlas-original"] = movingNode
        job.atlasNodes[atlasId] = nodes
        return nodes

    def _showOnlyLabels(self, job: MASRefineJob, visibleSegmentation) -> None:
        for node in list(job.nodes.values()) + [n for ns in job.atlasNodes.values() for n in ns.values()]:
            if node.IsA("vtkMRMLSegmentationNode"):
                node.CreateDefaultDisplayNodes()
                node.GetDisplayNode().SetVisibility(node is visibleSegmentation)

    def showAtlas(self, job: MASRefineJob, atlasId, opacity: float = 0.5, unrefined: bool = False) -> None:
        """Show one atlas (refined, or its unrefined version) over the target, with its labels."""
        nodes = self.loadAtlas(job, atlasId)
        volume = nodes.get("atlas-image-unrefined") if unrefined else None
        volume = volume or nodes.get("atlas-image")
        slicer.util.setSliceViewerLayers(background=job.targetNode, foreground=volume, foregroundOpacity=opacity, fit=False)
        self._showOnlyLabels(job, nodes.get("atlas-labels"))

    def showAtlasSideBySide(self, job: MASRefineJob, atlasId, opacity: float = 0.5) -> None:
        """Refined atlas over the target on the left, unrefined on the right (linked views)."""
        nodes = self.loadAtlas(job, atlasId)
        refined = nodes.get("atlas-image")
        unrefined = nodes.get("atlas-image-unrefined") or refined
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for viewName, volume in (("Red", refined), ("Yellow", unrefined)):
            sliceWidget = layoutManager.sliceWidget(viewName)
            if sliceWidget is None:
                continue
            sliceWidget.mrmlSliceNode().SetOrientation("Axial")
            composite = sliceWidget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(job.targetNode.GetID() if job.targetNode else None)
            composite.SetForegroundVolumeID(volume.GetID() if volume else None)
            composite.SetForegroundOpacity(opacity)
            composite.SetLinkedControl(True)
        self._showOnlyLabels(job, nodes.get("atlas-labels"))

    # Sample data

    def loadSampleData(self, outDir: Optional[str] = None) -> dict:
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
        truth = self._loadSegmentation(info["truth"], "MASRefinePhantom truth", info.get("labels"))
        truth.CreateDefaultDisplayNodes()
        truth.GetDisplayNode().SetVisibility(False)
        return {"target": target, "atlas_dir": info["atlas_dir"], "truth": truth}


#
# MASRefineTest
#


class MASRefineTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_MASRefineParameters()
        self.setUp()
        self.test_MASRefineSampleFlow()
        self.setUp()
        self.test_MASRefineCancel()

    def test_MASRefineParameters(self):
        """Enum values and the parameter node round trip."""
        logic = MASRefineLogic()
        self.assertEqual(logic.jobParameters(preset="fast", prereg="affine", refine=Refinement.NONE, fusion="PV"),
                         {"preset": "fast", "prereg": "affine", "refine": "none", "fusion": "pv"})
        self.assertEqual(logic.jobParameters(refine="I", alpha=2)["alpha"], 2.0)
        with self.assertRaises(ValueError):
            logic.jobParameters(fusion="majority")
        p = logic.getParameterNode()
        p.preset = Preset.FAST
        self.assertEqual(p.parameterNode.GetParameter("preset"), "FAST")
        self.assertNotIn("alpha", logic.parametersFromNode(p))
        p.overrideDefaults = True
        self.assertEqual(logic.parametersFromNode(p)["iterations"], p.iterations)

    def _sample(self):
        self.delayDisplay("Creating the sample atlas set")
        sample = MASRefineLogic().loadSampleData()
        self.assertIsNotNone(sample["target"].GetImageData())
        return sample

    def test_MASRefineSampleFlow(self):
        """The whole flow on the built-in phantom: background run, nodes, QA, on-demand atlas outputs."""
        sample = self._sample()
        logic = MASRefineLogic()
        events = []
        job = logic.start(sample["target"], sample["atlas_dir"], preset="fast", prereg="affine", refine="I",
                          fusion="pv", device="cpu", onEvent=lambda j, ev: events.append(ev.get("event")))
        nodes = job.wait(timeout=600, processEvents=slicer.app.processEvents)
        self.delayDisplay("Run finished")
        self.assertEqual(job.state, "completed")
        self.assertIn("result", events)
        self.assertGreater(job.fraction, 0.99)

        fused = nodes["fused-labels"]
        self.assertTrue(fused.IsA("vtkMRMLSegmentationNode"))
        truth = sample["truth"]

        def segmentNames(node):
            segmentation = node.GetSegmentation()
            return {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}

        self.assertEqual(segmentNames(fused), segmentNames(truth))

        # Reference geometry is the target's, and the fused labels overlap the phantom's truth.
        import numpy as np

        target = sample["target"]
        dices = []
        for i in range(truth.GetSegmentation().GetNumberOfSegments()):
            segment = truth.GetSegmentation().GetNthSegment(i)
            fusedId = fused.GetSegmentation().GetSegmentIdBySegmentName(segment.GetName())
            if not fusedId:
                continue
            a = slicer.util.arrayFromSegmentBinaryLabelmap(fused, fusedId, target) > 0
            b = slicer.util.arrayFromSegmentBinaryLabelmap(truth, truth.GetSegmentation().GetNthSegmentID(i), target) > 0
            self.assertEqual(a.shape, slicer.util.arrayFromVolume(target).shape)
            dices.append(2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))
        self.assertTrue(dices and float(np.mean(dices)) > 0.5, dices)

        # QA table: one row per atlas; selecting an atlas loads its outputs into the run's folder.
        _ensureLibraryImportable()
        from MASRefineLib import loadplan, manifest

        atlasIds = loadplan.atlas_ids(manifest.read_manifest(job.manifestPath))
        self.assertEqual({str(r[job.qaIdColumn]) for r in job.qaRows}, set(atlasIds))
        atlasId = atlasIds[0]
        logic.showAtlas(job, atlasId, opacity=0.5)
        atlasNodes = job.atlasNodes[str(atlasId)]
        self.assertTrue(atlasNodes["atlas-image"].IsA("vtkMRMLScalarVolumeNode"))
        self.assertTrue(atlasNodes["atlas-labels"].IsA("vtkMRMLSegmentationNode"))
        self.assertTrue(atlasNodes["atlas-labels"].GetDisplayNode().GetVisibility())
        self.assertFalse(fused.GetDisplayNode().GetVisibility())
        transform = atlasNodes["atlas-field"]
        self.assertTrue(transform.IsA("vtkMRMLTransformNode"))
        self.assertEqual(transform.GetNodeReferenceID("fixedVolume"), target.GetID())
        if "atlas-original" in atlasNodes:
            self.assertEqual(atlasNodes["atlas-original"].GetTransformNodeID(), transform.GetID())
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        runFolder = sh.GetItemParent(sh.GetItemByDataNode(fused))
        self.assertEqual(sh.GetItemParent(runFolder), sh.GetSceneItemID())
        atlasFolder = sh.GetItemParent(sh.GetItemByDataNode(transform))
        self.assertEqual(sh.GetItemParent(sh.GetItemParent(atlasFolder)), runFolder)
        self.delayDisplay("Test passed")

    def test_MASRefineCancel(self):
        """Cancel stops the worker promptly and creates no nodes; closing the scene kills a running worker."""
        sample = self._sample()
        logic = MASRefineLogic()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.start(sample["target"], sample["atlas_dir"], preset="fast", refine="I", fusion="pv", device="cpu")
        deadline = time.monotonic() + 120
        while job.poll() and job.fraction == 0.0 and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        started = time.monotonic()
        job.cancel(grace_s=5.0)
        with self.assertRaises(RuntimeError):
            job.wait(timeout=60, processEvents=slicer.app.processEvents)
        self.assertEqual(job.state, "cancelled")
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)

        job = logic.start(sample["target"], sample["atlas_dir"], preset="fast", refine="I", fusion="pv", device="cpu")
        slicer.mrmlScene.Clear()  # StartCloseEvent -> stopAllJobs
        with self.assertRaises(RuntimeError):
            job.wait(timeout=60)
        self.assertNotEqual(job.state, "completed")
        self.delayDisplay("Test passed")
