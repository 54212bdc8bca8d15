"""A finished run's outputs as nodes: the load plan (``MASRefineLib.protocol.loadplan``) decides files, names,
colours, folders and references; each function here turns one of its items into a node, or shows one
atlas over the target for quality assurance."""
import os
from typing import Optional

import vtk

import slicer
from slicer.i18n import tr as _

from MASRefineModule.Job import MASRefineJob


# Colour tables for the load plan's "display": {"colormap": ...} of volumes.
COLORMAPS = {"Grey": "vtkMRMLColorTableNodeGrey", "Viridis": "vtkMRMLColorTableNodeFileViridis.txt",
             "ColdToHotRainbow": "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"}


def loadJobResults(job: MASRefineJob) -> None:
    """Turn the job's manifest into nodes with the load plan (``MASRefineLib.protocol.loadplan``): the run-level
    outputs now (fused segmentation, QA table), per-atlas outputs on demand (:meth:`loadAtlas`)."""
    from MASRefineLib.protocol import loadplan

    for item in loadplan.load_plan(job.manifestPath):
        job.nodes[item["role"]] = loadItem(item, job)
    rows = loadplan.qa_rows(job.manifestPath)
    header = []
    for row in rows:
        header += [k for k in row if k not in header]
    job.qaHeader, job.qaRows, job.qaIdColumn = header, rows, "id"


def nodeAlive(node) -> bool:
    """Whether a node the job loaded is still in the scene (the user may have deleted it)."""
    return node is not None and bool(slicer.mrmlScene.IsNodePresent(node))


def liveNodes(nodes: dict) -> dict:
    """``nodes`` without the ones the user deleted from the scene."""
    return {role: node for role, node in nodes.items() if nodeAlive(node)}


def _folderExists(sh, item: int) -> bool:
    # Asked through the scene's children: GetItemParent/GetItemName log an error for a deleted item.
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return ids.IsId(item) >= 0


def folderItem(job: MASRefineJob, path) -> int:
    """The subject-hierarchy folder for a load-plan ``folder`` path (made once per job, again if deleted)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = sh.GetSceneItemID()
    for depth in range(1, len(path) + 1):
        key = tuple(path[:depth])
        if key not in job.folders or not _folderExists(sh, job.folders[key]):
            job.folders[key] = sh.CreateFolderItem(parent, key[-1])
        parent = job.folders[key]
    return parent


def loadItem(item: dict, job: MASRefineJob):
    """Load one load-plan item as a node, set its properties, and put it in its folder."""
    kind, path, name, target = item["kind"], item["path"], item["name"], job.targetNode
    show = bool(item.get("show"))
    if kind == "segmentation":
        node = loadSegmentation(path, name, item.get("labels"))
        if target is not None and item.get("reference") == "target":
            node.SetReferenceImageGeometryParameterFromVolumeNode(target)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetVisibility(show)
    elif kind == "volume":
        node = slicer.util.loadVolume(path, {"name": name, "show": show})
        display = item.get("display") or {}
        displayNode = node.GetDisplayNode()
        if displayNode is not None and display.get("colormap") in COLORMAPS:
            displayNode.SetAndObserveColorNodeID(COLORMAPS[display["colormap"]])
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
    sh.SetItemParent(sh.GetItemByDataNode(node), folderItem(job, item.get("folder") or ["MASRefine"]))
    return node


def loadSegmentation(path: str, name: str, labels: Optional[dict] = None):
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


def loadAtlas(job: MASRefineJob, atlasId) -> dict:
    """Load (once) one atlas's outputs ``{role: node}``: warped image (refined and unrefined), labels,
    displacement field as a transform (fixed: the target; moving: the original atlas image, shown
    through the transform), Jacobian map. Nodes the user deleted since are loaded again."""
    atlasId = str(atlasId)
    cached = job.atlasNodes.get(atlasId)
    if cached is not None and len(liveNodes(cached)) == len(cached):
        return cached
    from MASRefineLib.protocol import loadplan

    nodes = liveNodes(cached or {})
    nodes.pop("atlas-original", None)  # re-linked below to whichever transform node is current
    for item in loadplan.load_plan(job.manifestPath, atlases=[atlasId]):
        if str(item.get("atlas_id")) != atlasId:
            continue  # the run-level items, loaded already
        if item["role"] in nodes:
            continue  # still in the scene
        node = nodes[item["role"]] = loadItem(item, job)
        moving = item.get("moving") if item["kind"] == "transform" else None
        if moving and os.path.isfile(moving):
            previous = (cached or {}).get("atlas-original")
            movingNode = previous if nodeAlive(previous) else slicer.util.loadVolume(
                moving, {"name": f"{atlasId} original", "show": False})
            movingNode.SetAndObserveTransformNodeID(node.GetID())
            node.SetNodeReferenceID("movingVolume", movingNode.GetID())
            sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
            sh.SetItemParent(sh.GetItemByDataNode(movingNode), folderItem(job, item["folder"]))
            nodes["atlas-original"] = movingNode
    job.atlasNodes[atlasId] = nodes
    return nodes


def showOnlyLabels(job: MASRefineJob, visibleSegmentation) -> None:
    loaded = list(job.nodes.values()) + [n for ns in job.atlasNodes.values() for n in ns.values()]
    for node in filter(nodeAlive, loaded):
        if node.IsA("vtkMRMLSegmentationNode"):
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetVisibility(node is visibleSegmentation)


def showAtlas(job: MASRefineJob, atlasId, opacity: float = 0.5, unrefined: bool = False) -> None:
    """Show one atlas (refined, or its unrefined version) over the target, with its labels."""
    nodes = loadAtlas(job, atlasId)
    volume = nodes.get("atlas-image-unrefined") if unrefined else None
    volume = volume or nodes.get("atlas-image")
    target = job.targetNode if nodeAlive(job.targetNode) else None  # deleted by the user: the atlas alone
    slicer.util.setSliceViewerLayers(background=target, foreground=volume, foregroundOpacity=opacity, fit=False)
    showOnlyLabels(job, nodes.get("atlas-labels"))


SIDE_BY_SIDE_VIEWS = ("Red", "Yellow")


def saveViews() -> Optional[dict]:
    """What :func:`showAtlasSideBySide` changes: the layout, and each of its views' orientation and slice
    linking, for :func:`restoreViews`. None without a layout manager (no GUI)."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:
        return None
    views = {}
    for viewName in SIDE_BY_SIDE_VIEWS:
        sliceWidget = layoutManager.sliceWidget(viewName)
        if sliceWidget is not None:
            views[viewName] = (sliceWidget.mrmlSliceNode().GetOrientationString(),
                               sliceWidget.mrmlSliceCompositeNode().GetLinkedControl())
    return {"layout": layoutManager.layout, "views": views}


def restoreViews(saved: Optional[dict]) -> None:
    """Put back the layout and views :func:`saveViews` recorded."""
    layoutManager = slicer.app.layoutManager()
    if not saved or layoutManager is None:
        return
    for viewName, (orientation, linked) in saved["views"].items():
        sliceWidget = layoutManager.sliceWidget(viewName)
        if sliceWidget is not None:
            sliceWidget.mrmlSliceNode().SetOrientation(orientation)
            sliceWidget.mrmlSliceCompositeNode().SetLinkedControl(linked)
    layoutManager.setLayout(saved["layout"])


def showAtlasSideBySide(job: MASRefineJob, atlasId, opacity: float = 0.5) -> None:
    """Refined atlas over the target on the left, unrefined on the right (linked views). Changes the
    layout and slice linking: :func:`saveViews` first and :func:`restoreViews` after to undo it."""
    nodes = loadAtlas(job, atlasId)
    refined = nodes.get("atlas-image")
    unrefined = nodes.get("atlas-image-unrefined") or refined
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:
        return
    layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    for viewName, volume in zip(SIDE_BY_SIDE_VIEWS, (refined, unrefined)):
        sliceWidget = layoutManager.sliceWidget(viewName)
        if sliceWidget is None:
            continue
        sliceWidget.mrmlSliceNode().SetOrientation("Axial")
        composite = sliceWidget.mrmlSliceCompositeNode()
        composite.SetBackgroundVolumeID(job.targetNode.GetID() if nodeAlive(job.targetNode) else None)
        composite.SetForegroundVolumeID(volume.GetID() if volume else None)
        composite.SetForegroundOpacity(opacity)
        composite.SetLinkedControl(True)
    showOnlyLabels(job, nodes.get("atlas-labels"))
