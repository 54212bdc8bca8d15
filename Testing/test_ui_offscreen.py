"""The module panel (MASRefine/Resources/UI/MASRefine.ui) loads with Qt's own loader, offscreen.

Slicer's and CTK's widgets are not available outside Slicer: each is created as the base class its
<customwidgets> entry declares (QWidget for all of them), as Qt Designer would. The enum combo boxes,
spin-box ranges and defaults are filled the way Slicer's parameterNodeWrapper does (from the
parameter node class of MASRefineModule/Parameters.py, imported against stand-ins for Slicer), a screenshot of the
panel is written to Testing/artifacts/, and any Qt warning that the fallback does not explain fails.
"""
from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ["QT_QPA_PLATFORM"] = "offscreen"
QtUiTools = pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is not installed (pip install PySide6-Essentials)")
from PySide6 import QtCore, QtWidgets  # noqa: E402

import slicer_stubs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "MASRefine" / "Resources" / "UI" / "MASRefine.ui"
ARTIFACTS = ROOT / "Testing" / "artifacts"
UI = ET.parse(UI_FILE).getroot()
CUSTOM = {c.findtext("class"): c.findtext("extends") for c in UI.iter("customwidget")}


class FallbackLoader(QtUiTools.QUiLoader):
    """Creates each custom widget as its declared base class (no warning, unlike QUiLoader's own fallback)."""

    def createWidget(self, className, parent=None, name=""):
        return super().createWidget(CUSTOM.get(className, className), parent, name)


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture
def qt_messages():
    messages = []

    def handler(mode, context, text):
        messages.append((mode, text))

    previous = QtCore.qInstallMessageHandler(handler)
    yield messages
    QtCore.qInstallMessageHandler(previous)


def expected_warning(text: str) -> bool:
    """Connections in the .ui whose signal or slot only exists on a Slicer/CTK class cannot be made on
    the fallback base class; Qt says so in three lines per connection. Nothing else is expected."""
    for c in UI.iter("connection"):
        sender, receiver = c.findtext("sender"), c.findtext("receiver")
        signal, slot = c.findtext("signal"), c.findtext("slot")
        patterns = [rf"QObject::connect: No such signal \w+::{re.escape(signal)}",
                    rf"QObject::connect: No such slot \w+::{re.escape(slot)}",
                    rf"QObject::connect:\s+\(sender name:\s+'{re.escape(sender)}'\)",
                    rf"QObject::connect:\s+\(receiver name:\s+'{re.escape(receiver)}'\)"]
        if any(re.fullmatch(p, text.strip()) for p in patterns):
            return True
    return False


def load_panel():
    loader = FallbackLoader()
    f = QtCore.QFile(str(UI_FILE))
    assert f.open(QtCore.QIODevice.ReadOnly)
    widget = loader.load(f)
    f.close()
    assert widget is not None, loader.errorString()
    return widget


def bindings() -> dict[str, str]:
    """SlicerParameterName -> widget name, from the .ui."""
    out = {}
    for w in UI.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                out[p.find("string").text] = w.get("name")
    return out


def connect_like_parameter_node_wrapper(panel, module):
    """What parameterNodeWrapper.connectGui does to the widgets: fill the enum combo boxes with
    label(), set ranges from WithinRange, write the defaults. Returns {parameter: widget}."""
    source = ast.parse((slicer_stubs.MODULE_DIR / slicer_stubs.PACKAGE / "Parameters.py").read_text(encoding="utf-8"))
    cls = next(n for n in source.body if isinstance(n, ast.ClassDef) and n.name == "MASRefineParameterNode")
    widgets = {}
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign):
            continue
        name = node.target.id
        widget = panel.findChild(QtWidgets.QWidget, bindings()[name])
        assert widget is not None, name
        assert widget.property("SlicerParameterName") == name  # what connectGui looks for
        widgets[name] = widget
        annotation = ast.unparse(node.annotation)
        default = eval(ast.unparse(node.value), {**vars(module), **vars(slicer_stubs.submodule("Parameters"))}) \
            if node.value is not None else None
        enum_type = getattr(module, annotation, None)
        if isinstance(widget, QtWidgets.QComboBox):
            labels = [m.label() for m in enum_type]  # every member has a label
            assert len(set(labels)) == len(labels) and all(labels), annotation
            widget.addItems(labels)
            widget.setCurrentIndex(list(enum_type).index(default))
        elif isinstance(widget, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
            lo, hi = (float(v) for v in re.search(r"WithinRange\(([^,]+),\s*([^)]+)\)", annotation).groups())
            if isinstance(widget, QtWidgets.QSpinBox):
                widget.setRange(int(lo), int(hi))
            else:
                widget.setRange(lo, hi)
            widget.setValue(default)
            assert widget.value() == pytest.approx(default), f"{name}: the widget cannot show {default}"
        elif isinstance(widget, QtWidgets.QCheckBox):
            widget.setChecked(bool(default))
    return widgets


def test_panel_loads_offscreen_and_screenshot(app, qt_messages, monkeypatch, tmp_path):
    module, _ = slicer_stubs.load_module(monkeypatch, tmp_path)
    panel = load_panel()
    assert panel.objectName() == "MASRefine"

    # every named widget of the .ui exists, as the class it is or the base class it declares
    for w in UI.iter("widget"):
        cls = w.get("class")
        expected = getattr(QtWidgets, CUSTOM.get(cls, cls))
        found = panel if w.get("name") == "MASRefine" else panel.findChild(QtWidgets.QWidget, w.get("name"))
        assert isinstance(found, expected), f"{w.get('name')}: {cls}"

    widgets = connect_like_parameter_node_wrapper(panel, module)
    assert set(widgets) == set(bindings())
    # the Slicer widgets keep their Designer properties (Slicer reads them on the real classes)
    selector = panel.findChild(QtWidgets.QWidget, "targetVolumeSelector")
    assert list(selector.property("nodeTypes")) == ["vtkMRMLScalarVolumeNode"]
    assert panel.findChild(QtWidgets.QWidget, "advancedCollapsibleButton").property("collapsed") is True
    apply = panel.findChild(QtWidgets.QPushButton, "applyButton")
    assert apply.text() == "Apply" and not apply.isEnabled()
    assert panel.findChild(QtWidgets.QPlainTextEdit, "logTextEdit").isReadOnly()
    table = panel.findChild(QtWidgets.QTableWidget, "qaTableWidget")
    assert table.selectionBehavior() == QtWidgets.QAbstractItemView.SelectRows
    assert table.editTriggers() == QtWidgets.QAbstractItemView.NoEditTriggers
    for name in ("qaFlickerButton", "qaSideBySideButton"):
        assert panel.findChild(QtWidgets.QPushButton, name).isCheckable()

    # a QA table as the module fills it, for the screenshot
    header = ["id", "similarity", "agreement", "folding_fraction"]  # the pipeline's QA columns
    rows = [["knee01", 0.912, 0.873, 0.0], ["knee02", 0.887, 0.851, 0.0004], ["knee03", 0.901, 0.866, 0.0]]
    table.setColumnCount(len(header))
    table.setHorizontalHeaderLabels(header)
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            table.setItem(r, c, QtWidgets.QTableWidgetItem(module._formatQaValue(value)))
    panel.findChild(QtWidgets.QWidget, "qaCollapsibleButton").setEnabled(True)  # as _fillQaTable does
    panel.findChild(QtWidgets.QProgressBar, "progressBar").setValue(42)
    panel.findChild(QtWidgets.QLabel, "statusLabel").setText("refine: atlas 3 of 6")

    panel.resize(440, max(panel.sizeHint().height(), 700))
    panel.layout().activate()  # laid out and rendered without showing a window
    image = panel.grab().toImage()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "MASRefine-panel.png"
    assert image.save(str(shot))
    assert image.width() >= 440 and image.height() >= 700
    colors = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colors) > 20, "the screenshot is blank"
    panel.close()

    unexpected = [text for mode, text in qt_messages
                  if mode in (QtCore.QtMsgType.QtWarningMsg, QtCore.QtMsgType.QtCriticalMsg, QtCore.QtMsgType.QtFatalMsg)
                  and not expected_warning(text)]
    assert not unexpected, f"unexpected Qt warnings: {unexpected}"


def test_unexpected_qt_warnings_are_caught(app, qt_messages):
    """The warning check is live: a broken .ui produces a warning it does not excuse."""
    bad = ("<connection><sender>applyButton</sender><signal>clicked()</signal>"
           "<receiver>progressBar</receiver><slot>noSuchSlot()</slot></connection>")
    broken = UI_FILE.read_text(encoding="utf-8").replace("<connections>", "<connections>" + bad)
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(broken.encode("utf-8")))
    buffer.open(QtCore.QIODevice.ReadOnly)
    assert FallbackLoader().load(buffer) is not None
    texts = [t for m, t in qt_messages if m == QtCore.QtMsgType.QtWarningMsg]
    assert texts, "Qt reported nothing for a broken connection"
    assert any(not expected_warning(t) for t in texts)
