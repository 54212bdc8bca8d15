"""Atlas sets from the scene: segmentation nodes, each with its source volume, made into a new atlas set, or a
corrected result added to the atlas set it came from, so the set grows with use.

The nodes are exported (``slicer.util.exportNode(..., world=True)``: the volume as NRRD, the segmentation as
``.seg.nrrd`` with its segment names, colours and terminology) into a run folder, and the worker's ``atlas`` job
(``MASRefineLib.atlasbuild``, as ``masrefine atlas init`` builds sets) does the rest: the label table from the
segment names, one-line errors for mismatched grids or segment sets, files copied into the set.
"""
import json
import os
import pathlib
from typing import Callable, Optional

import slicer
from slicer.i18n import tr as _

from MASRefineModule.Job import MASRefineJob, launch, removeOnClose


def casePairs(segmentationNodes) -> list:
    """``[(volume, segmentation)]``; ValueError (one line) for a segmentation without a source volume."""
    pairs = []
    for seg in segmentationNodes:
        # the volume it was made on: its reference-geometry node (what Segment Editor's source volume sets)
        volume = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or volume.GetImageData() is None:
            raise ValueError(_("Segmentation {name} has no source volume; select one for it in Segment Editor").format(
                name=seg.GetName()))
        pairs.append((volume, seg))
    if not pairs:
        raise ValueError(_("Select at least one segmentation"))
    return pairs


def startAtlasJob(logic, pairs, atlasDir, mode: str, onEvent: Optional[Callable] = None,
                  onFinished: Optional[Callable] = None) -> MASRefineJob:
    """Export ``pairs`` and start the worker's atlas job: ``mode`` "new" (a new set in ``atlasDir``) or "add"."""
    from MASRefineLib import runs
    from MASRefineLib.protocol import jobs

    runDir = str(runs.make_run_folder(os.path.join(slicer.app.temporaryPath, "MASRefine-atlas"), mode))
    removeOnClose(runDir)  # only exported copies: the atlas set holds its own
    cases = []
    for n, (volume, seg) in enumerate(pairs):
        stem = os.path.join(runDir, f"case{n + 1:03d}")
        for node, path in ((volume, stem + ".nrrd"), (seg, stem + ".seg.nrrd")):
            slicer.util.exportNode(node, path, properties={}, world=True)  # a fresh dict: see Logic.start
            if not os.path.isfile(path):
                raise RuntimeError(_("Could not write {name} to {path}").format(name=node.GetName(), path=path))
        cases.append({"id": volume.GetName(), "image": stem + ".nrrd", "segmentation": stem + ".seg.nrrd"})
    casesPath = os.path.join(runDir, "cases.json")
    with open(casesPath, "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, indent=1)
    jobPath = os.path.join(runDir, "job.json")
    jobs.write_job(jobs.make_atlas_job(casesPath, str(atlasDir), runDir, mode=mode), jobPath)
    return launch(MASRefineJob(logic._makeRunner(jobPath), runDir, runDir, onEvent=onEvent, onFinished=onFinished))


class SceneAtlasSection:
    """The panel's *Atlas set from the scene* section: widgets to the logic's startAtlasBuild / startAddCase."""

    def __init__(self, widget) -> None:
        self.widget, self.ui, self.job = widget, widget.ui, None
        self.ui.buildAtlasSetButton.connect("clicked(bool)", self.onBuild)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)

    def update(self) -> None:
        run, running = self.widget._job, self.job is not None and self.job.running
        self.ui.buildAtlasSetButton.enabled = not running
        self.ui.addCaseButton.enabled = (not running and run is not None and run.state == "completed"
                                         and "fused-labels" in run.nodes)

    def onBuild(self) -> None:
        p = self.widget._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to build the atlas set."), waitCursor=True):
            self.job = self.widget.logic.startAtlasBuild(self.ui.sceneSegmentationsSelector.checkedNodes(),
                                                         p.newAtlasDir if p else None, onFinished=self._onFinished)
            self.ui.atlasStatusLabel.text = _("Building the atlas set...")
        self.update()

    def onAddCase(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the result to the atlas set."), waitCursor=True):
            self.job = self.widget.logic.startAddCase(self.widget._job, onFinished=self._onFinished)
            self.ui.atlasStatusLabel.text = _("Adding the result to the atlas set...")
        self.update()

    def _onFinished(self, job) -> None:
        if job.state == "completed":
            r = job.result
            self.ui.atlasStatusLabel.text = _("{set}: {n} atlases (added {ids})").format(
                set=r["atlas_dir"], n=r["atlases"], ids=", ".join(r["added"]))
            for note in r.get("notes", []):
                self.widget._appendLog(note)
            if self.widget._parameterNode is not None:  # the set just made or grown is the one to use
                self.widget._parameterNode.atlasDir = pathlib.Path(r["atlas_dir"])
        elif job.state == "failed":
            self.ui.atlasStatusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("MASRefine atlas set: {error}").format(error=job.error))
        self.update()
