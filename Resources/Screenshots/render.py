"""Render Resources/Screenshots/MASRefine-result.png: the module's panel with a finished run, and a slice of
that run's fused result, for the Extensions Index (EXTENSION_SCREENSHOTURLS).

It is NOT a screenshot of 3D Slicer (Slicer cannot be installed where this is made). The left half is the
panel's Qt Designer file (MASRefine/Resources/UI/MASRefine.ui) loaded offscreen with PySide6's QUiLoader; the
Slicer/CTK widgets are drawn as plain Qt stand-ins (collapsible sections as group boxes with their titles, path
fields as line edits, the volume selector as a combo box, the slider as a spin box), filled with what the module
shows after the run: the target's name, the atlas set, the Method choices (parameter-node defaults, preset fast),
the status, and the run's real QA table (qa.csv). The right half is a coronal slice of the knee phantom's target
with the run's fused labels (names and colours of the atlas set's label table), drawn with matplotlib, and the
run's Dice against the phantom's truth. The run is ``masrefine segment --preset fast`` (defaults otherwise:
deformable, refinement I, joint label fusion) on the built-in phantom, made here if missing (about a minute).

    .venv/bin/python Resources/Screenshots/render.py [--work .cache/screenshot]
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parents[2]
UI_FILE = ROOT / "MASRefine" / "Resources" / "UI" / "MASRefine.ui"
OUT = Path(__file__).resolve().parent / "MASRefine-result.png"
STAND_INS = {"ctkCollapsibleButton": "QGroupBox", "ctkPathLineEdit": "QLineEdit", "qMRMLNodeComboBox": "QComboBox", "qMRMLCheckableNodeComboBox": "QComboBox",
             "ctkSliderWidget": "QDoubleSpinBox", "qMRMLWidget": "QWidget"}


def make_run(work: Path) -> tuple[dict, Path]:
    sys.path.insert(0, str(ROOT))
    from MASRefineLib import sampledata

    sample = sampledata.make_sample(work / "sample")
    run = work / "run"
    if not (run / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "MASRefineLib.cli", "segment", "--atlases", sample["atlas_dir"],
                        "--target", sample["target"], "--out", str(run), "--preset", "fast", "--device", "cpu",
                        "--truth", sample["truth"], "--quiet"], check=True, cwd=ROOT)
    return sample, run


def render_panel(sample: dict, run: Path, path: Path) -> None:
    from PySide6 import QtCore, QtWidgets
    from PySide6.QtUiTools import QUiLoader

    ui = ET.parse(UI_FILE).getroot()

    class Loader(QUiLoader):
        def createWidget(self, className, parent=None, name=""):
            return super().createWidget(STAND_INS.get(className, className), parent, name)

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    f = QtCore.QFile(str(UI_FILE))
    f.open(QtCore.QIODevice.ReadOnly)
    panel = Loader().load(f)
    f.close()
    find = lambda cls, name: panel.findChild(cls, name)  # noqa: E731

    for w in ui.iter("widget"):  # section titles; the sections the .ui folds are folded
        if w.get("class") == "ctkCollapsibleButton":
            box = find(QtWidgets.QGroupBox, w.get("name"))
            box.setTitle(w.findtext("property[@name='text']/string"))
            if w.get("name") in ("dependenciesCollapsibleButton", "logCollapsibleButton", "sceneAtlasCollapsibleButton"):
                for child in box.findChildren(QtWidgets.QWidget):
                    child.hide()
    find(QtWidgets.QComboBox, "targetVolumeSelector").addItem("target01")
    find(QtWidgets.QLineEdit, "atlasDirPathLineEdit").setText(str(Path(sample["atlas_dir"]).relative_to(ROOT)))
    choices = {"presetComboBox": ("Fast", "Default", "Accurate"), "preregComboBox": ("Affine", "Deformable"),
               "refineComboBox": ("None", "(I) image similarity + regularity", "(IS) image + segmentation similarity + regularity"),
               "fusionComboBox": ("Plurality vote", "Weighted vote", "Joint label fusion", "STAPLE", "VoteNet+"),
               "deviceComboBox": ("Automatic (GPU if available)", "CPU", "CUDA GPU"),
               "retentionComboBox": ("Keep every run (in the output folder)", "Delete when the scene closes",
                                     "Keep the last N runs")}
    current = {"presetComboBox": 0, "preregComboBox": 1, "refineComboBox": 1, "fusionComboBox": 2,
               "deviceComboBox": 1, "retentionComboBox": 2}
    for name, items in choices.items():
        box = find(QtWidgets.QComboBox, name)
        box.addItems(list(items))
        box.setCurrentIndex(current[name])
    for name, value in (("alphaSpinBox", 3.0), ("gammaSpinBox", 40.0)):
        find(QtWidgets.QDoubleSpinBox, name).setValue(value)
    find(QtWidgets.QSpinBox, "iterationsSpinBox").setRange(1, 100000)
    find(QtWidgets.QSpinBox, "iterationsSpinBox").setValue(20)
    find(QtWidgets.QSpinBox, "keepLastSpinBox").setValue(5)
    sys.path.insert(0, str(ROOT))
    from MASRefineLib import runs

    find(QtWidgets.QLabel, "runFoldersLabel").setText(
        f"1 run, {runs.format_size(runs.folder_size(run))} in <Slicer temporary folder>/MASRefine")
    apply = find(QtWidgets.QPushButton, "applyButton")
    apply.setEnabled(True)
    find(QtWidgets.QProgressBar, "progressBar").setValue(100)
    find(QtWidgets.QLabel, "statusLabel").setText("Done.")
    find(QtWidgets.QWidget, "openOutputFolderButton").setEnabled(True)
    with open(run / "qa.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    table = find(QtWidgets.QTableWidget, "qaTableWidget")
    table.setColumnCount(len(rows[0]))
    table.setHorizontalHeaderLabels(rows[0])
    table.setRowCount(len(rows) - 1)
    for r, row in enumerate(rows[1:]):
        for c, value in enumerate(row):
            try:
                value = f"{float(value):.4g}"
            except ValueError:
                pass
            table.setItem(r, c, QtWidgets.QTableWidgetItem(value))
    table.resizeColumnsToContents()
    find(QtWidgets.QGroupBox, "qaCollapsibleButton").setEnabled(True)  # as the module's _fillQaTable does
    table.selectRow(0)
    find(QtWidgets.QDoubleSpinBox, "qaOpacitySlider").setValue(0.5)
    panel.resize(460, max(panel.sizeHint().height(), 980))
    panel.layout().activate()
    assert panel.grab().toImage().save(str(path))
    del app


def render(work: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    sys.path.insert(0, str(ROOT))
    from MASRefineLib.labels import read_seg_nrrd

    sample, run = make_run(work)
    panel_png = work / "panel.png"
    render_panel(sample, run, panel_png)

    image = sitk.GetArrayFromImage(sitk.ReadImage(sample["target"]))
    labels_img, table = read_seg_nrrd(run / "fused_labels.seg.nrrd")
    labels = sitk.GetArrayFromImage(labels_img)
    y = int(np.argmax((labels > 0).sum(axis=(0, 2))))  # the coronal slice with the most labelled voxels
    img, lab = image[:, y, :], labels[:, y, :]
    colors = np.zeros((max(table) + 1, 4))
    for value, entry in table.items():
        colors[value] = [*(c / 255 for c in entry.color), 1.0]
    with open(run / "metrics.csv", newline="") as fh:
        metrics = {r["name"]: r for r in csv.DictReader(fh)}

    fig = plt.figure(figsize=(12.0, 8.6), dpi=100)
    left = fig.add_axes([0.0, 0.06, 0.42, 0.94])
    left.imshow(plt.imread(str(panel_png)))
    left.set_axis_off()
    right = fig.add_axes([0.45, 0.2, 0.53, 0.74])
    right.imshow(img, cmap="gray", origin="lower")
    right.imshow(np.ma.masked_equal(lab, 0), cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1,
                 origin="lower", alpha=0.55, interpolation="nearest")
    right.contour(lab > 0, levels=[0.5], colors="white", linewidths=0.6, origin="lower")
    right.set_axis_off()
    right.set_title(f"Fused labels over the phantom target (coronal slice {y}): Dice "
                    f"{100 * float(metrics['mean']['dice']):.1f} % vs. truth", fontsize=11)
    right.legend(handles=[Patch(color=colors[v][:3], label=f"{e.name} (Dice {100 * float(metrics[e.name]['dice']):.1f} %)")
                          for v, e in table.items()], loc="lower center", bbox_to_anchor=(0.5, -0.15), ncol=2,
                 frameon=False, fontsize=10)
    fig.text(0.01, 0.012, "Left: the MASRefine panel's Qt .ui rendered offscreen with PySide6 (Slicer/CTK widgets as Qt "
                          "stand-ins), filled as after a run.\nRight: that run's fused labels, drawn with matplotlib. "
                          "Not a screenshot of 3D Slicer. Knee phantom, 6 atlases, preset fast.", fontsize=9,
             color="0.3")
    fig.savefig(str(out), dpi=100)
    print(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "screenshot", help="phantom and run (reused)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    render(a.work.resolve(), a.out)


if __name__ == "__main__":
    main()
