"""MASRefine: multi-atlas segmentation with registration refinement (VoteNet++) in 3D Slicer.

This file holds what Slicer looks up by name: the module (``MASRefine``), its panel
(``MASRefineWidget``), and, imported from the ``MASRefineModule`` package beside it, the logic
(``MASRefineLogic``) and the self-test (``MASRefineTest``). The panel only maps widgets to the logic;
the logic writes a ``job.json`` for ``PythonSlicer -m MASRefineLib.worker`` and turns the results into
nodes. Nothing heavy runs inside Slicer's process.

Console use::

    logic = slicer.util.getModuleLogic("MASRefine")
    nodes = logic.segment(volumeNode, "/path/to/atlas-set", refine="IS", fusion="votenet")
    job = logic.start(volumeNode, "/path/to/atlas-set", preset="fast")   # returns at once
    job.cancel()   # or: nodes = job.wait()
"""
import importlib
import os
import pathlib
import sys
from typing import Optional

import ctk
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

# Re-exported for the Python console and other modules (``from MASRefine import Refinement``).
from MASRefineModule.Job import MASRefineJob, stopAllJobs, stopJobs  # noqa: F401
from MASRefineModule.Logic import MASRefineLogic
from MASRefineModule.Parameters import (Device, Fusion, MASRefineParameterNode, PreRegistration, Preset, Refinement,
                                        Retention, pathIsSet)  # noqa: F401
from MASRefineModule.Sample import registerSampleData
from MASRefineModule.SceneAtlas import SceneAtlasSection
from MASRefineModule.Test import MASRefineTest  # noqa: F401 (Slicer looks it up here)


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
Uses PyTorch (installed with light-the-torch), MONAI, SimpleITK and slicerio; licensed Apache-2.0.
""")

        slicer.app.connect("startupCompleted()", registerSampleData)


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
        self._savedViews = None  # layout and slice linking before side-by-side, restored after
        self._installJob = None  # a background installation of the worker's packages
        self._sampleJob = None  # the phantom being made in the background
        self._runFoldersShown = None  # the output folder whose run folders the panel last measured

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MASRefine.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MASRefineLogic()

        self.ui.atlasDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.outputDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.newAtlasDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.sceneAtlas = SceneAtlasSection(self)  # atlas sets from the scene's segmentations
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(500)
        self._flickerTimer.connect("timeout()", self.onFlickerTimeout)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleDataButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependenciesButton)
        self.ui.openOutputFolderButton.connect("clicked(bool)", self.onOpenOutputFolderButton)
        self.ui.qaTableWidget.connect("itemSelectionChanged()", self.onQaSelectionChanged)
        self.ui.qaOpacitySlider.connect("valueChanged(double)", self.onQaOpacityChanged)
        self.ui.qaFlickerButton.connect("toggled(bool)", self.onQaFlickerToggled)
        self.ui.qaSideBySideButton.connect("toggled(bool)", self.onQaSideBySideToggled)

        self.initializeParameterNode()
        self._updateRunState()
        self._updateDependencies()

    def onReload(self) -> None:
        """Reload the MASRefineModule package too: Slicer's reload re-executes MASRefine.py only
        (slicer.util.reloadScriptedModule), so edited submodules would otherwise stay as first imported."""
        import MASRefineModule

        importlib.reload(MASRefineModule)
        for name in MASRefineModule.SUBMODULES:
            importlib.reload(sys.modules.get(f"MASRefineModule.{name}") or importlib.import_module(f"MASRefineModule.{name}"))
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        """When the application closes, and on Reload for the old widget (after the package's reload). Stops the
        runs' workers; an installation or the sample goes on, run folders stay until the scene closes (Job.py)."""
        if self._flickerTimer:
            self._flickerTimer.stop()
        stopJobs(sceneOnly=True)
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        # Comparing views belongs to this panel: other modules get the views as they were.
        self._stopComparing()

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self.setParameterNode(None)
        # The worker is stopped by stopSceneJobs (observer installed by launching a job); forget its results.
        self._job = None
        self._stopComparing()
        self._clearQaTable()
        self._updateRunState()

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        self._runFoldersShown = None  # measured again: closing the scene may have removed run folders
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

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
        if self._parameterNode and str(self._parameterNode.outputDir) != self._runFoldersShown:
            self._updateRunFolders()
        # An unset pathlib.Path parameter is written to its line edit as "." (the GUI connector writes
        # str(value)); show it empty. Deferred: the wrapper's own update of the widgets may come after this.
        qt.QTimer.singleShot(0, self._clearUnsetPaths)

    def _clearUnsetPaths(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        for lineEdit, value in ((self.ui.atlasDirPathLineEdit, p.atlasDir), (self.ui.outputDirPathLineEdit, p.outputDir),
                                (self.ui.newAtlasDirPathLineEdit, p.newAtlasDir)):
            if not pathIsSet(value) and lineEdit.currentPath:
                lineEdit.currentPath = ""

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self.ui.alphaSpinBox.enabled = bool(p and p.overrideDefaults)
        self.ui.gammaSpinBox.enabled = bool(p and p.overrideDefaults)
        self.ui.iterationsSpinBox.enabled = bool(p and p.overrideDefaults)
        self.ui.keepLastSpinBox.enabled = bool(p and p.retention == Retention.KEEP_LAST)
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
        missing = self.logic.missingDependencies()
        if missing:
            if slicer.util.confirmOkCancelDisplay(
                    _("MASRefine needs these Python packages:\n{packages}\n\nInstall them now in the background? "
                      "Press Apply again when the installation has finished.").format(packages="\n".join(missing)),
                    _("MASRefine - Install Python packages")):
                self.onInstallDependenciesButton()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start MASRefine."), waitCursor=True):
            p = self._parameterNode
            # ctkPathLineEdit keeps its settingKey history only when told to
            self.ui.atlasDirPathLineEdit.addCurrentPathToHistory()
            if pathIsSet(p.outputDir):
                self.ui.outputDirPathLineEdit.addCurrentPathToHistory()
            self._clearQaTable()
            self.ui.logTextEdit.clear()
            self._job = self.logic.start(
                p.targetVolume,
                p.atlasDir,
                outDir=p.outputDir if pathIsSet(p.outputDir) else None,
                onEvent=self._onJobEvent,
                onFinished=self._onJobFinished,
                **self.logic.retentionFromNode(p),
                **self.logic.parametersFromNode(p),
            )
            self._appendLog(_("Output folder: {path}").format(path=self._job.outDir))
        self._updateRunState()
        self._updateRunFolders()

    def _updateRunFolders(self) -> None:
        """Show how many run folders the output folder holds and their size."""
        outDir = self._parameterNode.outputDir if self._parameterNode else None
        self._runFoldersShown = str(outDir)
        self.ui.runFoldersLabel.text = self.logic.runFoldersText(outDir)

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
        self._updateRunFolders()

    def _updateRunState(self) -> None:
        running = self._job is not None and self._job.running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        if running:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Stop the background run")
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.visible = self._job is not None
        self.sceneAtlas.update()
        self.ui.openOutputFolderButton.enabled = self._job is not None and os.path.isdir(self._job.outputDir)
        if not running:
            self._checkCanApply()

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onOpenOutputFolderButton(self) -> None:
        if self._job is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self._job.outputDir))

    def onSampleDataButton(self) -> None:
        """Make (or reuse) the phantom in the background; its target and atlas set become the inputs."""
        if self._sampleJob is not None and self._sampleJob.running:
            return
        self.ui.sampleDataButton.enabled = False
        self.ui.statusLabel.text = _("Creating the sample atlas set...")
        with slicer.util.tryWithErrorDisplay(_("Failed to create the sample atlas set.")):
            self._sampleJob = self.logic.startSample(onFinished=self._onSampleFinished)
        if self._sampleJob is None:
            self.ui.sampleDataButton.enabled = True

    def _onSampleFinished(self, job) -> None:
        self.ui.sampleDataButton.enabled = True
        if job.state == "completed" and self._parameterNode is not None:
            self._parameterNode.targetVolume = job.sample["target"]
            self._parameterNode.atlasDir = pathlib.Path(job.sample["atlas_dir"])
            self.ui.statusLabel.text = _("Sample loaded.")
        elif job.state == "failed":
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("Creating the sample atlas set failed: {error}").format(error=job.error))

    # Dependencies

    def _updateDependencies(self) -> None:
        """Show the installed versions; open the section when something is missing."""
        self.ui.dependenciesLabel.text = self.logic.dependenciesText()
        if self.logic.missingDependencies():
            self.ui.dependenciesCollapsibleButton.collapsed = False

    def onInstallDependenciesButton(self) -> None:
        """Install what is missing, or upgrade everything when nothing is, in the background."""
        if self._installJob is not None and self._installJob.running:
            return
        upgrade = not self.logic.missingDependencies()
        self.ui.installDependenciesButton.enabled = False
        self.ui.installProgressBar.visible = True
        self.ui.installProgressBar.value = 0
        with slicer.util.tryWithErrorDisplay(_("Failed to start the installation.")):
            self._installJob = self.logic.startInstall(upgrade=upgrade, onEvent=self._onInstallEvent,
                                                       onFinished=self._onInstallFinished)
        if self._installJob is None:
            self.ui.installDependenciesButton.enabled = True

    def _onInstallEvent(self, job, ev: dict) -> None:
        self.ui.installProgressBar.value = int(round(job.fraction * 100))
        if ev.get("event") in ("log", "stage", "error", "output"):
            self._appendLog(str(ev.get("message") or ev.get("line") or ""))

    def _onInstallFinished(self, job) -> None:
        self.ui.installDependenciesButton.enabled = True
        self.ui.installProgressBar.value = 100 if job.state == "completed" else 0
        self._updateDependencies()
        if job.state == "failed":
            slicer.util.errorDisplay(_("Installing MASRefine's packages failed: {error}").format(error=job.error))
        elif job.state == "completed" and self.logic.restartNeeded(job.result):
            if slicer.util.confirmYesNoDisplay(_("Packages Slicer has already loaded were upgraded. Restart Slicer now "
                                                 "to use them?"), _("MASRefine - Restart")):
                slicer.util.restart()

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
            if self._savedViews is None:
                self._savedViews = self.logic.saveViews()
        else:
            self.logic.restoreViews(self._savedViews)
            self._savedViews = None
        self._showSelectedAtlas()

    def _stopComparing(self) -> None:
        """End flicker and side by side: stop the timer, restore the layout and slice linking."""
        if self._flickerTimer:
            self._flickerTimer.stop()
        self._flickerShowsUnrefined = False
        for button in (self.ui.qaFlickerButton, self.ui.qaSideBySideButton):
            wasBlocked = button.blockSignals(True)  # their toggled() handlers would show the atlas again
            button.checked = False
            button.blockSignals(wasBlocked)
        self.logic.restoreViews(self._savedViews)
        self._savedViews = None


def _formatQaValue(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}"
