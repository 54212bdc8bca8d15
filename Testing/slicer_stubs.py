"""Stand-ins for Slicer's Python modules (``slicer``, ``qt``, ``ctk``, ``vtk``): just enough to import
``MASRefine/MASRefine.py`` (and its package ``MASRefine/MASRefineModule``) outside Slicer and drive the parts of it that do not need Slicer's C++
(the job handle, the runner, the load plan consumption). Nodes are recorded, not rendered: a test can
see which files were loaded as which kind of node, with which names, references and folders.

Nothing here claims Slicer behaves like this; what only Slicer can verify is listed in docs/slicer.md.
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
import types
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "MASRefine"
MODULE_PY = MODULE_DIR / "MASRefine.py"
PACKAGE = "MASRefineModule"
STUBBED = ("slicer", "slicer.util", "slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule",
           "qt", "ctk", "vtk", "MASRefine")


class FakeDisplayNode:
    def __init__(self):
        self.visible, self.colorNodeID, self.window, self.autoWindowLevel = True, None, None, True

    def SetVisibility(self, v):
        self.visible = bool(v)

    def GetVisibility(self):
        return self.visible

    def SetAndObserveColorNodeID(self, i):
        self.colorNodeID = i

    def AutoWindowLevelOff(self):
        self.autoWindowLevel = False

    def SetWindowLevelMinMax(self, lo, hi):
        self.window = (lo, hi)


class FakeNode:
    _ids = itertools.count(1)

    def __init__(self, cls: str, name: str = "", path: str | None = None, image=None):
        self.cls, self.name, self.path, self.image = cls, name, path, image
        self.id = f"{cls}{next(self._ids)}"
        self.attributes: dict[str, str] = {}
        self.references: dict[str, str] = {}
        self.transformNodeID = None
        self.referenceGeometryFrom = None
        self.display = FakeDisplayNode()
        self.removed = False  # set by FakeScene.RemoveNode (the user deleted it)
        self.referenceNodes: dict[str, "FakeNode"] = {}
        self.segments = None  # a segmentation node made in the test: its LabelTable (image: its label map)

    def GetID(self):
        return self.id

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name

    def IsA(self, cls):
        return cls == self.cls or (cls == "vtkMRMLTransformNode" and self.cls.endswith("TransformNode"))

    def GetImageData(self):
        return self.image

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def SetNodeReferenceID(self, role, nodeID):
        self.references[role] = nodeID

    def GetNodeReferenceID(self, role):
        return self.references.get(role)

    def SetReferenceImageGeometryParameterFromVolumeNode(self, node):
        """As Slicer's, which also references the volume (vtkMRMLSegmentationNode.cxx:782)."""
        self.referenceGeometryFrom = node.GetID()
        self.referenceNodes[self.GetReferenceImageGeometryReferenceRole()] = node

    @staticmethod
    def GetReferenceImageGeometryReferenceRole():
        return "referenceImageGeometryRef"  # vtkMRMLSegmentationNode.h:208

    def GetNodeReference(self, role):
        return self.referenceNodes.get(role)

    def CreateDefaultDisplayNodes(self):
        pass

    def GetDisplayNode(self):
        return self.display

    def SetAndObserveTransformNodeID(self, nodeID):
        self.transformNodeID = nodeID

    def GetSegmentation(self):
        """No segments: what a label map imports to is Slicer's to verify (docs/slicer.md)."""
        return types.SimpleNamespace(GetNumberOfSegments=lambda: 0)


class FakeSubjectHierarchy:
    SCENE = 1

    def __init__(self):
        self._ids = itertools.count(2)
        self.parent: dict[int, int] = {}
        self.name: dict[int, str] = {}
        self.byNode: dict[str, int] = {}

    def GetSceneItemID(self):
        return self.SCENE

    def CreateFolderItem(self, parent, name):
        i = next(self._ids)
        self.parent[i], self.name[i] = parent, name
        return i

    def GetItemByDataNode(self, node):
        if node.GetID() not in self.byNode:
            i = next(self._ids)
            self.byNode[node.GetID()], self.parent[i], self.name[i] = i, self.SCENE, node.GetName()
        return self.byNode[node.GetID()]

    def SetItemParent(self, item, parent):
        assert item in self.parent and (parent == self.SCENE or parent in self.parent), "no such subject-hierarchy item"
        self.parent[item] = parent

    def GetItemChildren(self, parent, ids, recursive=False):
        for item, p in self.parent.items():
            if p == parent:
                ids.InsertNextId(item)
                if recursive:
                    self.GetItemChildren(item, ids, True)

    def RemoveItem(self, item):
        """Removes the item and its children (what deleting a folder in the Data module does)."""
        for child in [i for i, p in self.parent.items() if p == item]:
            self.RemoveItem(child)
        self.parent.pop(item, None)

    def GetItemParent(self, item):
        return self.parent.get(item, 0)

    def GetItemName(self, item):
        return self.name[item]

    def path(self, node) -> list[str]:
        """Folder names from the scene down to the node's parent."""
        out, item = [], self.parent[self.GetItemByDataNode(node)]
        while item != self.SCENE:
            out.insert(0, self.name[item])
            item = self.parent[item]
        return out


class FakeScene:
    StartCloseEvent, EndCloseEvent = 1, 2

    def __init__(self):
        self.observers: list[tuple[int, Callable]] = []
        self.nodes: list[FakeNode] = []

    def AddObserver(self, event, callback):
        self.observers.append((event, callback))
        return len(self.observers)

    def Clear(self, *args):
        pass

    def AddNewNodeByClass(self, cls, name=""):
        return FakeNode(cls, name)

    def RemoveNode(self, node):
        node.removed = True

    def IsNodePresent(self, node):
        return 0 if node.removed else 1

    def close(self):
        """What closing the scene does for observers: StartCloseEvent, then EndCloseEvent."""
        for event in (self.StartCloseEvent, self.EndCloseEvent):
            for e, cb in list(self.observers):
                if e == event:
                    cb(self, event)


class FakeApp:
    def __init__(self, temporaryPath: str, cachePath: str):
        self.temporaryPath, self.cachePath = temporaryPath, cachePath
        self.connections: list[tuple[str, Callable]] = []

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def emit(self, signal):
        for s, slot in list(self.connections):
            if s == signal:
                slot()

    def processEvents(self, *args):
        pass

    testing = True  # Slicer started with --testing (ctest, the extension factory)

    def testingEnabled(self):
        return self.testing

    def layoutManager(self):
        return self.layout

    layout = None  # a FakeLayoutManager, set by make_slicer


class FakeSliceNode:
    def __init__(self):
        self.orientation = "Axial"

    def GetOrientationString(self):
        return self.orientation

    def SetOrientation(self, orientation):
        self.orientation = orientation
        return True


class FakeCompositeNode:
    def __init__(self):
        self.linked, self.background, self.foreground, self.opacity = 0, None, None, 0.0

    def GetLinkedControl(self):
        return self.linked

    def SetLinkedControl(self, v):
        self.linked = int(v)

    def SetBackgroundVolumeID(self, i):
        self.background = i

    def SetForegroundVolumeID(self, i):
        self.foreground = i

    def SetForegroundOpacity(self, v):
        self.opacity = v


class FakeSliceWidget:
    def __init__(self):
        self.sliceNode, self.compositeNode = FakeSliceNode(), FakeCompositeNode()

    def mrmlSliceNode(self):
        return self.sliceNode

    def mrmlSliceCompositeNode(self):
        return self.compositeNode


class FakeLayoutManager:
    """Slicer's layout manager as far as the module uses it: the ``layout`` property, ``setLayout``,
    ``sliceWidget(name)``."""
    CONVENTIONAL = 2  # vtkMRMLLayoutNode::SlicerLayoutConventionalView

    def __init__(self):
        self.layout = self.CONVENTIONAL
        self.views = {name: FakeSliceWidget() for name in ("Red", "Yellow", "Green")}
        self.views["Yellow"].sliceNode.orientation = "Sagittal"

    def setLayout(self, layout):
        self.layout = layout

    def sliceWidget(self, name):
        return self.views.get(name)


class FakeWidget:
    """A panel widget as the module touches it: properties (``checked``, ``enabled``, ``text``, ...) as
    attributes, ``blockSignals``, ``connect``; the signals it blocked or not are recorded, not emitted."""

    def __init__(self, **properties):
        self.blocked, self.connections = False, []
        self.__dict__.update(properties)

    def blockSignals(self, block):
        was, self.blocked = self.blocked, bool(block)
        return was

    def connect(self, signal, slot):
        self.connections.append((signal, slot))


class FakeTimer:
    def __init__(self):
        self.interval, self.slots, self.active = 0, [], False

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append((signal, slot))

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def fire(self):
        for _, slot in self.slots:
            slot()


def _loader(kind: str, record: list) -> Callable:
    def load(path, properties=None):
        props = dict(properties or {})
        node = FakeNode(kind, props.get("name", Path(path).name), str(path))
        node.properties = props
        record.append(node)
        return node
    return load


# the shared default argument of the stub's exportNode (reset by make_slicer)
EXPORT_DEFAULT_PROPERTIES: dict = {}


def make_slicer(tmp: Path) -> dict[str, types.ModuleType]:
    """Fresh stub modules; ``slicer.loaded`` lists the nodes the glue loaded, ``slicer.exported`` the
    ``exportNode`` calls."""
    slicer = types.ModuleType("slicer")
    EXPORT_DEFAULT_PROPERTIES.clear()
    slicer.app = FakeApp(str(tmp / "slicer-temp"), str(tmp / "slicer-cache"))
    slicer.app.layout = FakeLayoutManager()
    slicer.vtkMRMLLayoutNode = type("vtkMRMLLayoutNode", (), {"SlicerLayoutSideBySideView": 29})
    slicer.mrmlScene = FakeScene()
    slicer.loaded, slicer.exported, slicer.layers, slicer.reloaded, slicer.displayed = [], [], [], [], []
    sh = FakeSubjectHierarchy()
    slicer.subjectHierarchy = sh
    slicer.vtkMRMLSubjectHierarchyNode = type("vtkMRMLSubjectHierarchyNode", (), {
        "GetSubjectHierarchyNode": staticmethod(lambda scene: sh)})
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.imported = []  # (label map node, segmentation node) of ImportLabelmapToSegmentationNode
    segmentationsLogic = types.SimpleNamespace(
        ImportLabelmapToSegmentationNode=lambda labelmap, segmentation: slicer.imported.append((labelmap, segmentation)))
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentationsLogic))

    util = types.ModuleType("slicer.util")

    class VTKObservationMixin:
        def __init__(self):
            self.observations = []

        def removeObservers(self, method=None):
            self.observations = []

    def exportNode(node, filename, properties=EXPORT_DEFAULT_PROPERTIES, world=False):
        """As Slicer's (Base/Python/slicer/util.py:1183-1209): the default ``properties`` is one shared dict,
        and the call writes the file format it chose into whatever dict it got."""
        import shutil

        import SimpleITK as sitk
        properties.setdefault("fileFormat", "NRRD (.nrrd)" if str(filename).endswith(".nrrd") else "other")
        slicer.exported.append({"node": node, "filename": str(filename), "world": world, "properties": properties})
        if str(filename).endswith(".seg.nrrd"):  # a segmentation node: its segments (names, colours, terminology)
            if node.segments is not None:
                from MASRefineLib.labels import write_seg_nrrd
                write_seg_nrrd(node.image, node.segments, filename)
            else:  # loaded from a .seg.nrrd: what it holds
                shutil.copyfile(node.path, filename)
            return True
        sitk.WriteImage(node.image, str(filename))
        return True

    import contextlib

    slicer.errors = []  # what errorDisplay / tryWithErrorDisplay would have shown the user

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        """As Slicer's (util.py:3368-3408): an exception becomes an error dialog, and is not raised."""
        try:
            yield
        except Exception as e:  # noqa: BLE001
            slicer.errors.append(f"{message} {e}")

    util.tryWithErrorDisplay = tryWithErrorDisplay
    util.errorDisplay = lambda text, *a, **kw: slicer.errors.append(str(text))
    slicer.confirmAnswer = True  # what the user answers to confirmation dialogs
    util.confirmOkCancelDisplay = lambda text, *a, **kw: slicer.confirmAnswer
    util.VTKObservationMixin = VTKObservationMixin
    util.exportNode = exportNode
    util.loadVolume = _loader("vtkMRMLScalarVolumeNode", slicer.loaded)
    util.loadLabelVolume = _loader("vtkMRMLLabelMapVolumeNode", slicer.loaded)
    util.loadSegmentation = _loader("vtkMRMLSegmentationNode", slicer.loaded)
    util.loadTransform = _loader("vtkMRMLGridTransformNode", slicer.loaded)
    util.loadTable = _loader("vtkMRMLTableNode", slicer.loaded)
    util.setSliceViewerLayers = lambda **kw: slicer.layers.append(kw)
    slicer.util = util

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slicer.i18n = i18n

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    pnw.WithinRange = WithinRange
    pnw.parameterNodeWrapper = lambda cls: cls
    slicer.parameterNodeWrapper = pnw

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def onReload(self):
            """As Slicer's (Base/Python/slicer/util.py:1398-1446, reloadScriptedModule): MASRefine.py is
            executed again into a new module object, then the old widget's cleanup() is called."""
            slicer.reloaded.append(self)
            spec = importlib.util.spec_from_file_location("MASRefine", MODULE_PY)
            reloaded = importlib.util.module_from_spec(spec)
            sys.modules["MASRefine"] = reloaded
            spec.loader.exec_module(reloaded)
            self.cleanup()

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return None

    import unittest

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            slicer.displayed.append(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    slicer.ScriptedLoadableModule = slm

    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.Qt = types.SimpleNamespace(UserRole=256, WaitCursor=3)
    ctk = types.ModuleType("ctk")
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = type("vtkCommand", (), {"ModifiedEvent": 33})

    class vtkIdList:
        def __init__(self):
            self.ids = []

        def InsertNextId(self, i):
            self.ids.append(i)

        def IsId(self, i):
            return self.ids.index(i) if i in self.ids else -1

    vtk.vtkIdList = vtkIdList
    return {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw,
            "slicer.ScriptedLoadableModule": slm, "qt": qt, "ctk": ctk, "vtk": vtk}


def load_module(monkeypatch, tmp: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Import MASRefine.py against fresh stubs (undone by ``monkeypatch``); returns (module, slicer)."""
    stubs = make_slicer(tmp)
    # the package's modules are imported afresh, against these stubs (Slicer puts the module's folder on
    # sys.path: qSlicerScriptedLoadableModuleFactory appends it)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    for name in STUBBED + tuple(n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("MASRefine", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "MASRefine", module)
    spec.loader.exec_module(module)
    return module, stubs["slicer"]


def submodule(name: str) -> types.ModuleType:
    """``MASRefineModule.<name>`` as imported by the last :func:`load_module`."""
    return sys.modules[f"{PACKAGE}.{name}"]


def volume_node(image, name: str = "knee target") -> FakeNode:
    """A stand-in scalar volume node holding a SimpleITK image (what exportNode writes)."""
    return FakeNode("vtkMRMLScalarVolumeNode", name, image=image)


def fake_parameter_node(**values: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**values)
