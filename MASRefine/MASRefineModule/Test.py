"""MASRefineTest: the module's self-test in Slicer (*Reload and Test*, ``ctest -R MASRefine``).

MASRefine.py imports it, so that Slicer finds ``MASRefineTest`` in the module's namespace
(ScriptedLoadableModule.runTest looks it up there).
"""
import logging
import os
import time
import unittest

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from MASRefineModule import Dependencies
from MASRefineModule.Logic import MASRefineLogic
from MASRefineModule.Parameters import Preset, Refinement


class MASRefineTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    # Set to 1 to let the self-test install missing packages when Slicer runs with --testing (the extension
    # factory, ctest): it downloads torch, so it is never done there unless asked.
    INSTALL_ENVIRONMENT_VARIABLE = "MASREFINE_SELFTEST_INSTALL"

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_MASRefineParameters()
        reason = self.dependenciesProblem()
        if reason:
            self.skipWithMessage(reason)
            return
        self.setUp()
        self.test_MASRefineSampleFlow()
        self.setUp()
        self.test_MASRefineCancel()

    def dependenciesProblem(self):
        """None when the worker's packages are installed (installed first, as a user would through the
        module's own install path, when that is allowed); else why the flows cannot run."""
        wanted = Dependencies.missing()
        if not wanted:
            return None
        testing = slicer.app.testingEnabled()
        if testing and os.environ.get(self.INSTALL_ENVIRONMENT_VARIABLE) != "1":
            return (f"MASRefine's worker needs {', '.join(wanted)}; not installed under --testing "
                    f"(set {self.INSTALL_ENVIRONMENT_VARIABLE}=1 to install them)")
        self.delayDisplay(f"Installing {', '.join(wanted)}")
        try:
            # asks the user when run interactively (Reload and Test), as the Apply button does
            MASRefineLogic().ensureDependencies(askConfirmation=not testing, timeout=3600)
        except RuntimeError as e:
            return f"MASRefine's worker needs {', '.join(wanted)}: {e}"
        return None

    def skipWithMessage(self, reason: str) -> None:
        """Tell why the flows did not run: a skipped test under unittest (ctest); a message and a pass when
        Slicer's Reload and Test calls runTest directly (ScriptedLoadableModule.runTest), where an
        exception would read as a failure."""
        logging.warning(f"MASRefineTest: skipped: {reason}")
        self.delayDisplay(f"Skipped: {reason}")
        if getattr(self, "_outcome", None) is not None:  # set by unittest.TestCase.run
            raise unittest.SkipTest(reason)

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
        from MASRefineLib.protocol import loadplan, manifest

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
        slicer.mrmlScene.Clear()  # StartCloseEvent -> stopSceneJobs
        with self.assertRaises(RuntimeError):
            job.wait(timeout=60)
        self.assertNotEqual(job.state, "completed")
        self.delayDisplay("Test passed")
