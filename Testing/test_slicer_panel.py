"""The module's panel behaviour (MASRefineWidget) against the stubs of Testing/slicer_stubs.py: what it
leaves behind when the user leaves the module, and how it copes with nodes the user deleted.

The widget is built without its .ui (Slicer's widgets are not available here): ``ui`` holds stand-ins
with the properties the code reads and writes, and the runs are real worker processes of the small
pipelines in Testing/worker_pipelines.py, so the results go through a real manifest and load plan.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

import slicer_stubs
from test_slicer_glue import atlas_dir, mod, pipeline_factory, target  # noqa: F401 (fixtures)


class FakeItem:
    def __init__(self, atlasId):
        self.atlasId = atlasId

    def data(self, role):
        return self.atlasId


def make_panel(module):
    """A MASRefineWidget as setup() leaves it, with stand-in widgets."""
    W = slicer_stubs.FakeWidget
    widget = module.MASRefineWidget()
    widget.logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=2, sleep=0.01))
    widget._flickerTimer = slicer_stubs.FakeTimer()
    widget.selected = []
    widget.ui = types.SimpleNamespace(
        qaFlickerButton=W(checked=False), qaSideBySideButton=W(checked=False), qaOpacitySlider=W(value=0.4),
        qaTableWidget=W(selectedItems=lambda: [FakeItem(a) for a in widget.selected]))
    return widget


@pytest.fixture
def finished_job(mod, target, atlas_dir, tmp_path):
    module, slicer = mod
    logic = module.MASRefineLogic(runnerFactory=pipeline_factory("slow", steps=2, sleep=0.01))
    job = logic.start(target, atlas_dir, outDir=tmp_path / "runs")
    job.wait(timeout=60)
    return job


def test_export_gets_a_fresh_properties_dict(mod, finished_job):
    """Slicer's exportNode writes "fileFormat" into its (shared, default) properties; the module must not
    leave NRRD there for every other module's exportNode."""
    module, slicer = mod
    (export,) = slicer.exported
    assert export["properties"] is not slicer_stubs.EXPORT_DEFAULT_PROPERTIES
    assert slicer_stubs.EXPORT_DEFAULT_PROPERTIES == {}
    assert export["properties"] == {"fileFormat": "NRRD (.nrrd)"}  # the stub wrote into the dict it got


def test_leaving_the_module_stops_flicker_and_restores_the_views(mod, finished_job):
    module, slicer = mod
    layout = slicer.app.layoutManager()
    panel = make_panel(module)
    panel._job, panel.selected = finished_job, ["a1"]

    panel.ui.qaSideBySideButton.checked = True
    panel.onQaSideBySideToggled(True)
    assert layout.layout == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red, yellow = layout.views["Red"], layout.views["Yellow"]
    assert red.compositeNode.linked == yellow.compositeNode.linked == 1
    assert yellow.sliceNode.orientation == "Axial" and red.compositeNode.foreground is not None
    panel.ui.qaFlickerButton.checked = True
    panel.onQaFlickerToggled(True)
    assert panel._flickerTimer.active

    panel.exit()
    assert not panel._flickerTimer.active
    assert not panel.ui.qaFlickerButton.checked and not panel.ui.qaSideBySideButton.checked
    assert not panel.ui.qaFlickerButton.blocked and not panel.ui.qaSideBySideButton.blocked
    assert layout.layout == layout.CONVENTIONAL
    assert red.compositeNode.linked == yellow.compositeNode.linked == 0
    assert yellow.sliceNode.orientation == "Sagittal"


def test_side_by_side_off_restores_the_views_it_changed(mod, finished_job):
    module, slicer = mod
    layout = slicer.app.layoutManager()
    layout.layout = 4  # the user's own layout (one-up 3D) is what comes back, not a default
    panel = make_panel(module)
    panel._job, panel.selected = finished_job, ["a1"]
    panel.ui.qaSideBySideButton.checked = True
    panel.onQaSideBySideToggled(True)
    panel.onQaSideBySideToggled(True)  # shown again (another atlas): the first saved state is kept
    assert layout.layout == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    panel.ui.qaSideBySideButton.checked = False
    panel.onQaSideBySideToggled(False)
    assert layout.layout == 4 and layout.views["Red"].compositeNode.linked == 0


def test_deleted_result_nodes_are_loaded_again_not_an_error(mod, finished_job):
    module, slicer = mod
    panel = make_panel(module)
    panel._job, panel.selected = finished_job, ["a1"]
    panel.onQaSelectionChanged()
    image = finished_job.atlasNodes["a1"]["atlas-image"]
    assert slicer.layers[-1]["foreground"] is image and slicer.errors == []

    slicer.mrmlScene.RemoveNode(image)  # the user deletes the atlas image in the Data module
    sh = slicer.subjectHierarchy
    atlasFolder = sh.GetItemParent(sh.GetItemByDataNode(image))
    sh.RemoveItem(sh.GetItemParent(atlasFolder))  # ... and the "atlases" folder
    panel.onQaSelectionChanged()
    assert slicer.errors == []
    again = finished_job.atlasNodes["a1"]["atlas-image"]
    assert again is not image and not again.removed and slicer.layers[-1]["foreground"] is again
    assert sh.path(again)[-2:] == ["atlases", "a1"]  # in a new folder, not a deleted one
    panel.onQaSelectionChanged()
    assert finished_job.atlasNodes["a1"]["atlas-image"] is again  # alive: not loaded a third time

    # a deleted target: the atlas is shown alone, no dialog
    slicer.mrmlScene.RemoveNode(finished_job.targetNode)
    panel.onQaSelectionChanged()
    assert slicer.errors == [] and slicer.layers[-1]["background"] is None


def test_unset_paths_show_empty_not_a_dot(mod):
    """The GUI connector writes str(pathlib.Path()) == "." for an unset path (guiConnectors.py:704-705)."""
    module, slicer = mod
    panel = make_panel(module)
    panel.ui.atlasDirPathLineEdit = slicer_stubs.FakeWidget(currentPath=".")
    panel.ui.outputDirPathLineEdit = slicer_stubs.FakeWidget(currentPath="/data/runs")
    panel.ui.newAtlasDirPathLineEdit = slicer_stubs.FakeWidget(currentPath=".")
    panel._parameterNode = slicer_stubs.fake_parameter_node(atlasDir=Path("."), outputDir=Path("/data/runs"),
                                                            newAtlasDir=Path("."))
    panel._clearUnsetPaths()
    assert panel.ui.atlasDirPathLineEdit.currentPath == "" and panel.ui.outputDirPathLineEdit.currentPath == "/data/runs"
    assert panel.ui.newAtlasDirPathLineEdit.currentPath == ""


def test_ui_texts_say_what_the_widgets_do():
    import xml.etree.ElementTree as ET

    ui = ET.parse(slicer_stubs.MODULE_DIR / "Resources" / "UI" / "MASRefine.ui").getroot()
    widgets = {w.get("name"): w for w in ui.iter("widget")}

    def prop(name, key):
        return widgets[name].findtext(f"property[@name='{key}']/string") or ""

    assert "does not change" in prop("presetComboBox", "toolTip")  # it sets no method choice
    assert "per atlas" not in prop("iterationsSpinBox", "toolTip") and "finest" in prop("iterationsSpinBox", "toolTip")
    source = (slicer_stubs.MODULE_PY).read_text(encoding="utf-8")
    for name, w in widgets.items():  # a settingKey keeps a history only through addCurrentPathToHistory()
        if prop(name, "settingKey"):
            assert f"self.ui.{name}.addCurrentPathToHistory()" in source, name
