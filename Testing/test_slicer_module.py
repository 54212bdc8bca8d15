"""Static contract checks of the Slicer module, read from its source (Slicer is not installable here).

What is checked: the scripted-module classes and their bases, the module metadata, imports (nothing
heavy or Slicer-removed at module level; torch never imported in Slicer's process, not even through
MASRefineLib), dependencies (never pip-installing numpy/SimpleITK/torch), the .ui against the code
(every ``self.ui.X`` exists; every SlicerParameterName is a parameter-node field bound to a widget
type Slicer's parameterNodeWrapper can connect; MRML widgets get the scene), and the CMake files against the files on disk (both ways).
"""
from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "MASRefine"
LIB_DIR = ROOT / "MASRefineLib"
MODULE_PY = MODULE_DIR / "MASRefine.py"
PACKAGE_DIR = MODULE_DIR / "MASRefineModule"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MASRefine.ui"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"

SOURCE = MODULE_PY.read_text(encoding="utf-8")
TREE = ast.parse(SOURCE, filename=str(MODULE_PY))
# every Python file of the module: MASRefine.py and its package (what Slicer's process imports)
FILES = [MODULE_PY] + sorted(PACKAGE_DIR.glob("*.py"))
TREES = {p: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in FILES}
ALL = ast.Module(body=[n for t in TREES.values() for n in t.body], type_ignores=[])
UI = ET.parse(UI_FILE).getroot()

# Imported lazily inside functions only: heavy, or pip-installed after asking (not there at import).
NOT_AT_MODULE_LEVEL = {"torch", "monai", "numpy", "scipy", "SimpleITK", "nrrd", "slicerio", "safetensors",
                       "tqdm", "MASRefineLib", "PyTorchUtils", "SampleData", "packaging"}
# The library's standard-library-only parts, which the module may import at module level (Parameters.py makes its
# enums from them); Testing/test_protocol.py imports them where numpy, SimpleITK, torch, MONAI and scipy are blocked.
STDLIB_ONLY_LIBRARY = ("MASRefineLib.protocol", "MASRefineLib.runs")
# Never imported by the module at all (Slicer's process): the worker imports them.
NEVER_IN_SLICER_PROCESS = {"torch", "monai"}
# Removed from Python 3.12 (Slicer >= 5.8) or from Slicer's Python API.
REMOVED = {"imp", "distutils", "asynchat", "asyncore", "smtpd", "pkg_resources", "__main__", "urllib2",
           "imp.reload", "vtk.util.vtkImageImportFromArray"}
# Provided by Slicer itself or by the PyTorch extension: pip must never install or replace them.
NEVER_PIP = {"numpy", "simpleitk", "torch"}


def classes(tree=ALL) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def base_names(cls: ast.ClassDef) -> list[str]:
    return [ast.unparse(b) for b in cls.bases]


def methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def _import_names(n: ast.Import | ast.ImportFrom) -> list[tuple[str, int]]:
    """(module name, line) for one import statement; ``from m import x`` gives ``m`` and ``m.x``."""
    if isinstance(n, ast.Import):
        return [(a.name, n.lineno) for a in n.names]
    mod = ("." * n.level) + (n.module or "")
    return [(mod, n.lineno)] + [(f"{mod}.{a.name}", n.lineno) for a in n.names]


def module_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(module name, line) of every import executed at import time (top level, also inside if/try)."""
    out = []

    def visit(stmts):
        for n in stmts:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                out.extend(_import_names(n))
            elif isinstance(n, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for sub in getattr(n, field, []) or []:
                        visit(sub.body if isinstance(sub, ast.ExceptHandler) else [sub])
    visit(tree.body)
    return out


def all_imports(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            out.extend(_import_names(n))
    return out


def top(name: str) -> str:
    return name.lstrip(".").split(".")[0]


# ------------------------------------------------------------------------------------------------
# classes, metadata, API


def test_scripted_module_classes_and_bases():
    c = classes()
    assert base_names(c["MASRefine"]) == ["ScriptedLoadableModule"]
    assert base_names(c["MASRefineWidget"]) == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert base_names(c["MASRefineLogic"]) == ["ScriptedLoadableModuleLogic"]
    assert base_names(c["MASRefineTest"]) == ["ScriptedLoadableModuleTest"]
    assert [ast.unparse(d) for d in c["MASRefineParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    # the template's life cycle
    assert {"setup", "cleanup", "enter", "exit", "onSceneStartClose", "onSceneEndClose", "initializeParameterNode",
            "setParameterNode", "onApplyButton"} <= set(methods(c["MASRefineWidget"]))
    assert {"setUp", "runTest"} <= set(methods(c["MASRefineTest"]))
    run_test = ast.unparse(methods(c["MASRefineTest"])["runTest"])
    tests = [m for m in methods(c["MASRefineTest"]) if m.startswith("test_")]
    assert tests and all(f"self.{t}()" in run_test for t in tests), "runTest must run every test_ method"
    # getParameterNode wraps the scripted module node in the parameter node class
    assert "MASRefineParameterNode(super().getParameterNode())" in ast.unparse(methods(c["MASRefineLogic"])["getParameterNode"])


def test_module_metadata():
    init = methods(classes()["MASRefine"])["__init__"]
    assigned = {}
    for n in ast.walk(init):
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Attribute):
            target = ast.unparse(n.targets[0])
            if target.startswith("self.parent."):
                assigned[target.removeprefix("self.parent.")] = n.value
    for field in ("title", "categories", "dependencies", "contributors", "helpText", "acknowledgementText"):
        assert field in assigned, f"MASRefine.__init__ does not set parent.{field}"
    assert ast.unparse(assigned["title"]) == "_('MASRefine')"
    assert "Segmentation" in ast.unparse(assigned["categories"])
    for text in ("helpText", "acknowledgementText"):
        value = assigned[text]
        literal = value.args[0].value if isinstance(value, ast.Call) else value.value
        assert len(literal.strip()) > 80, f"parent.{text} is too short to help anyone"
    contributors = ast.literal_eval(assigned["contributors"])
    assert contributors and all(c.strip() for c in contributors)
    assert "slicer.app.connect('startupCompleted()', registerSampleData)" in ast.unparse(init)


def test_console_api_is_keyword_based():
    logic = methods(classes()["MASRefineLogic"])
    for name in ("segment", "start"):
        args = logic[name].args
        assert [a.arg for a in args.args[:3]] == ["self", "targetNode", "atlasDir"], name
        assert args.kwarg is not None and args.kwarg.arg == "params", f"{name} must take **params"
    job = methods(classes()["MASRefineJob"])
    assert {"poll", "cancel", "wait"} <= set(job)


# ------------------------------------------------------------------------------------------------
# imports and dependencies


def _lib_module_imports(module: str, seen: set[str]) -> set[str]:
    """Top-level names imported at import time by MASRefineLib.<module> and, transitively, by the
    MASRefineLib modules it imports at import time."""
    if module in seen:
        return set()
    seen.add(module)
    parts = module.split(".")[1:]
    path = LIB_DIR.joinpath(*parts)
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    assert path.exists(), f"the module imports {module}, which does not exist ({path})"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for name, _ in module_level_imports(tree):
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            base = pkg.split(".")
            base = base[: len(base) - (level - 1)] if level > 1 else base
            name = ".".join(base + ([name.lstrip(".")] if name.lstrip(".") else []))
        out.add(top(name))
        if top(name) == "MASRefineLib":
            candidates = [name]
            if "." in name:
                candidates.append(name.rsplit(".", 1)[0])  # "from .x import y": y may be a name in x
            for cand in candidates:
                p = LIB_DIR.joinpath(*cand.split(".")[1:])
                if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
                    out |= _lib_module_imports(cand, seen)
                    break
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_heavy_or_removed_imports_at_module_level(path):
    tree, where = TREES[path], path.relative_to(MODULE_DIR)
    for name, line in module_level_imports(tree):
        if name.startswith(STDLIB_ONLY_LIBRARY):
            continue  # standard library only (Testing/test_protocol.py): the enums are made from it at import
        assert top(name) not in NOT_AT_MODULE_LEVEL, f"{where}:{line} imports {name} at module level"
        assert name not in REMOVED and top(name) not in REMOVED, f"{where}:{line} imports removed {name}"
    for name, line in all_imports(tree):
        assert name not in REMOVED and top(name) not in REMOVED, f"{where}:{line} imports removed {name}"
        assert top(name) not in NEVER_IN_SLICER_PROCESS, f"{where}:{line} imports {name} into Slicer's process"
        if top(name) == "MASRefineModule" and path.parent == PACKAGE_DIR:
            # absolute imports only: the package is imported as MASRefineModule from the module's folder
            assert not name.startswith("."), f"{where}:{line}"


def test_masrefinelib_modules_used_by_the_module_do_not_import_torch():
    used = sorted({n for n, _ in all_imports(ALL) if top(n) == "MASRefineLib"})
    assert used, "the module is expected to use MASRefineLib (protocol, runner)"
    for name in used:
        module = name
        parts = name.split(".")
        # "from MASRefineLib.protocol import jobs" appears as MASRefineLib.protocol and MASRefineLib.protocol.jobs
        if not (LIB_DIR.joinpath(*parts[1:]).with_suffix(".py").exists() or (LIB_DIR.joinpath(*parts[1:]) / "__init__.py").exists()):
            continue
        heavy = _lib_module_imports(module, set()) & NEVER_IN_SLICER_PROCESS
        assert not heavy, f"{module} imports {heavy} at import time; the Slicer module imports {module}"


def _requirement_names(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line)
            out[m.group(1).lower().replace("_", "-")] = m.group(2).replace(" ", "")
    return out


def test_requirements_never_pip_install_slicer_packages_and_match_pyproject():
    tomllib = pytest.importorskip("tomllib")

    reqs = _requirement_names(REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    assert not set(reqs) & NEVER_PIP, f"{REQUIREMENTS.name} lists {set(reqs) & NEVER_PIP}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = _requirement_names(project["dependencies"])
    expected = {k: v for k, v in deps.items() if k not in NEVER_PIP}
    assert reqs == expected, "Resources/requirements.txt must list pyproject's dependencies except numpy/SimpleITK/torch"
    # where torch comes from, as the comments say: MASRefineLib.install with light-the-torch (not PyTorchUtils)
    comments = " ".join(line for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    assert "MASRefineLib.install" in comments and "light-the-torch" in comments
    assert "installed through the PyTorch extension" not in comments


def test_installs_only_after_asking_and_never_at_import():
    """Nothing is installed in Slicer's process (no pip_install, pip_ensure, installTorch: installTorch imports
    torch there); installs run as ``PythonSlicer -m MASRefineLib.install`` started from Dependencies.startInstall,
    which only the Install button and ensureDependencies (after confirmOkCancelDisplay) reach."""
    for n in ast.walk(ALL):
        if isinstance(n, ast.Call):
            name = ast.unparse(n.func)
            assert not name.endswith(("pip_install", "pip_ensure", "installTorch", "_executePythonModule")), \
                f"line {n.lineno}: {name} installs inside Slicer's process"
    deps = TREES[PACKAGE_DIR / "Dependencies.py"]
    assert "'MASRefineLib.install'" in ast.unparse(deps)
    assert not any("slicer.pydeps" in ast.unparse(n) for n in ast.walk(ALL) if isinstance(n, ast.Attribute))
    callers = {f.name for f in ast.walk(ALL) if isinstance(f, ast.FunctionDef)
               and any(isinstance(c, ast.Call) and ast.unparse(c.func).endswith("startInstall") for c in ast.walk(f))}
    assert callers == {"ensureDependencies", "onInstallDependenciesButton"}, callers
    ensure = ast.unparse(methods(classes()["MASRefineLogic"])["ensureDependencies"])
    assert "askConfirmation" in ensure and "confirmOkCancelDisplay" in ensure
    apply = ast.unparse(methods(classes()["MASRefineWidget"])["onApplyButton"])
    assert apply.index("confirmOkCancelDisplay") < apply.index("self.onInstallDependenciesButton()")
    for path, tree in TREES.items():  # nothing runs at import besides definitions and constants
        for n in tree.body:
            assert isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)) or (
                isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) or (
                # the one exception: Parameters.py puts the library on sys.path before making its enums from it
                path.name == "Parameters.py" and ast.unparse(n) == "ensureLibraryImportable()"), \
                f"{path.name}:{n.lineno} runs code at import"


# ------------------------------------------------------------------------------------------------
# .ui against the code


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


def ui_parameter_bindings() -> dict[str, tuple[str, str]]:
    """SlicerParameterName -> (widget name, widget class)."""
    out = {}
    for w in UI.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{w.get('name')}: SlicerParameterName must be a dynamic property"
                param = prop.find("string").text
                assert param not in out, f"two widgets bound to {param}"
                out[param] = (w.get("name"), w.get("class"))
    return out


def parameter_fields() -> dict[str, str]:
    cls = classes()["MASRefineParameterNode"]
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def enum_classes() -> set[str]:
    """Names of the module's choice enums: made by ``Parameters._choices`` from the library's lists (their values
    and labels are checked by Testing/test_protocol.py)."""
    tree = TREES[PACKAGE_DIR / "Parameters.py"]
    return {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
            and ast.unparse(n.value.func) == "_choices"}


def test_every_ui_attribute_used_exists_in_the_ui():
    used = {n.attr for n in ast.walk(ALL) if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "self.ui"}
    assert used, "the widget is expected to use self.ui"
    missing = used - set(ui_widgets())
    assert not missing, f"self.ui.{sorted(missing)} not in {UI_FILE.name}"
    setup = ast.unparse(methods(classes()["MASRefineWidget"])["setup"])
    assert "slicer.util.loadUI(self.resourcePath('UI/MASRefine.ui'))" in setup
    assert "slicer.util.childWidgetVariables(uiWidget)" in setup


def test_every_slicer_parameter_name_is_a_parameter_node_field():
    bindings, fields = ui_parameter_bindings(), parameter_fields()
    assert set(bindings) <= set(fields), f"{sorted(set(bindings) - set(fields))} are not MASRefineParameterNode fields"
    assert set(fields) <= set(bindings), f"{sorted(set(fields) - set(bindings))} have no widget in the panel"


def test_bound_widgets_can_represent_their_parameter_types():
    """The widget/type pairs that Slicer's parameterNodeWrapper GUI connectors accept."""
    enums = enum_classes()
    custom = {c.find("class").text for c in UI.iter("customwidget")}
    for param, (widget, cls) in ui_parameter_bindings().items():
        annotation = parameter_fields()[param]
        base = annotation.removeprefix("Annotated[").split(",")[0].rstrip("]")
        if base in enums:
            allowed = {"QComboBox", "ctkComboBox"}
        elif base == "bool":
            allowed = {"QCheckBox", "ctkCheckBox", "QPushButton"}
        elif base == "int":
            allowed = {"QSpinBox", "QSlider"}
            assert "WithinRange" in annotation or "Minimum" in annotation, f"{param}: bounded ints only"
        elif base == "float":
            allowed = {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider"}
            assert "WithinRange" in annotation, f"{param}: the float widgets need a range"
        elif base == "pathlib.Path":
            allowed = {"ctkPathLineEdit", "ctkDirectoryButton"}
        elif base.startswith("vtkMRML"):
            allowed = {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"}
        elif base == "str":
            allowed = {"QLineEdit", "QTextEdit", "QLabel"}
        else:
            pytest.fail(f"{param}: no GUI connector for {annotation}")
        assert cls in allowed, f"{widget} ({cls}) cannot be bound to {param}: {annotation}"
        assert cls not in custom or cls.startswith(("ctk", "qMRML")), cls
    # enum combo boxes are filled by the connector from label(); items in the .ui would be replaced
    for w in UI.iter("widget"):
        if w.get("class") == "QComboBox":
            assert not w.findall("item"), f"{w.get('name')}: leave the items to the parameter node wrapper"


def test_mrml_widgets_get_the_scene():
    top_widget = UI.find("widget")
    assert top_widget.get("class") == "qMRMLWidget"
    connections = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in UI.iter("connection")}
    mrml = [w.get("name") for w in top_widget.iter("widget") if w.get("class", "").startswith("qMRML") and w is not top_widget]
    assert mrml, "the panel has MRML widgets (the target selector)"
    for name in mrml:
        assert (top_widget.get("name"), "mrmlSceneChanged(vtkMRMLScene*)", name, "setMRMLScene(vtkMRMLScene*)") in connections, \
            f"{name} is not connected to the scene"
    assert "uiWidget.setMRMLScene(slicer.mrmlScene)" in ast.unparse(methods(classes()["MASRefineWidget"])["setup"])
    # node types of the target selector match the parameter's node class
    selector = next(w for w in top_widget.iter("widget") if w.get("name") == ui_parameter_bindings()["targetVolume"][0])
    node_types = [s.text for p in selector.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
    assert node_types == [parameter_fields()["targetVolume"]]


def test_custom_widgets_are_declared_with_a_base_class():
    declared = {c.findtext("class"): c.findtext("extends") for c in UI.iter("customwidget")}
    used = {w.get("class") for w in UI.iter("widget")}
    for cls in used:
        if cls.startswith(("ctk", "qMRML", "qSlicer")):
            assert declared.get(cls), f"{cls} is used but not declared in <customwidgets>"
    assert set(declared) <= used, f"declared but unused: {set(declared) - used}"


# ------------------------------------------------------------------------------------------------
# choices and defaults against the library


def test_the_gamma_spin_box_shows_the_default_exactly():
    from MASRefineLib.protocol.jobs import REFINE_DEFAULTS

    ui = {w.get("name"): w for w in UI.iter("widget")}
    decimals = int(ui["gammaSpinBox"].find("property[@name='decimals']/number").text)
    assert round(REFINE_DEFAULTS["gamma"], decimals) == REFINE_DEFAULTS["gamma"], "the gamma spin box would round the default"


# ------------------------------------------------------------------------------------------------
# CMake


def cmake_lists(path: Path, variable: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    m = re.search(r"set\(\s*" + variable + r"\b(.*?)\)", text, re.S)
    assert m, f"{path}: no set({variable} ...)"
    name = re.search(r"set\(\s*MODULE_NAME\s+(\S+)\s*\)", text).group(1)
    items = [line.split("#", 1)[0].strip() for line in m.group(1).splitlines()]
    return [i.replace("${MODULE_NAME}", name) for i in items if i]


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and p.name != "CMakeLists.txt"}


@pytest.mark.parametrize("folder", [MODULE_DIR, LIB_DIR], ids=["MASRefine", "MASRefineLib"])
def test_cmake_lists_every_file_and_only_existing_files(folder):
    cmake = folder / "CMakeLists.txt"
    scripts = cmake_lists(cmake, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_lists(cmake, "MODULE_PYTHON_RESOURCES")
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources)), "duplicates"
    on_disk = files_under(folder)
    py = {f for f in on_disk if f.endswith(".py")}
    assert set(scripts) == py, (f"{cmake.relative_to(ROOT)}: not listed {sorted(py - set(scripts))}, "
                                f"listed but missing {sorted(set(scripts) - py)}")
    assert set(resources) == on_disk - py, (f"{cmake.relative_to(ROOT)}: resources not listed {sorted(on_disk - py - set(resources))}, "
                                            f"listed but missing {sorted(set(resources) - (on_disk - py))}")


def test_cmake_files_are_balanced():
    """Every ( has its ) outside comments and quoted strings (a stray one breaks configuring)."""
    for path in (ROOT / "CMakeLists.txt", MODULE_DIR / "CMakeLists.txt", LIB_DIR / "CMakeLists.txt"):
        text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', path.read_text(encoding="utf-8"))
        depth = 0
        for number, line in enumerate(text.splitlines(), 1):
            for ch in line.split("#", 1)[0]:
                depth += {"(": 1, ")": -1}.get(ch, 0)
                assert depth >= 0, f"{path.relative_to(ROOT)}:{number}: unmatched )"
        assert depth == 0, f"{path.relative_to(ROOT)}: unclosed ("


def test_cmake_extension_structure():
    top_cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(\s*MASRefine\s*\)", top_cmake)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(r"set\(\s*" + var + r"\s", top_cmake), var
    assert re.search(r'set\(\s*EXTENSION_DEPENDS\s+"[^"]*\bPyTorch\b[^"]*"', top_cmake)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(MASRefine)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in top_cmake, line
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in module_cmake
    assert re.search(r"add_subdirectory\(\s*\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./MASRefineLib\s+\S+\)", module_cmake)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    lib_cmake = (LIB_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", lib_cmake, re.S).group(1)
    assert "WITH_SUBDIR" in macro, "MASRefineLib must be installed in its own folder beside the module"
    assert re.search(r"set\(\s*MODULE_NAME\s+MASRefineLib\s*\)", lib_cmake)
    # Slicer finds the module's resources beside MASRefine.py; only MASRefine.py at the module's top, the
    # rest in its package (as SlicerNNUnet's SlicerNNUNetLib)
    assert {p.name for p in MODULE_DIR.iterdir() if p.is_file()} == {"MASRefine.py", "CMakeLists.txt"}
    assert {p.name for p in MODULE_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"} == {"Resources", "MASRefineModule"}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_icons():
    for path in (MODULE_DIR / "Resources" / "Icons" / "MASRefine.png", ROOT / "Resources" / "Icons" / "MASRefine.png"):
        assert _png_size(path) == (128, 128), path
    icon_url = re.search(r'EXTENSION_ICONURL\s+"([^"]+)"', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert icon_url.endswith("Resources/Icons/MASRefine.png")


# ------------------------------------------------------------------------------------------------
# the module's files (issue #20, item 5: MASRefine.py split as SlicerNNUnet does)


def _package_imports(tree: ast.AST) -> set[str]:
    return {name.split(".")[1] for name, _ in all_imports(tree)
            if top(name) == "MASRefineModule" and name.count(".") >= 1 and (PACKAGE_DIR / f"{name.split('.')[1]}.py").exists()}


def test_masrefine_py_is_the_module_and_its_panel_only():
    """Slicer looks up MASRefine, MASRefineWidget, MASRefineLogic and MASRefineTest in MASRefine.py's
    namespace; the first two are defined there, the logic and test come from the package."""
    defined = {n.name for n in TREE.body if isinstance(n, ast.ClassDef)}
    assert defined == {"MASRefine", "MASRefineWidget"}
    imported = {a.asname or a.name for n in TREE.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("MASRefineModule")
                for a in n.names}
    assert {"MASRefineLogic", "MASRefineTest", "MASRefineParameterNode"} <= imported
    assert len(SOURCE.splitlines()) < 500, "MASRefine.py grows again: move logic into MASRefineModule"


def test_reload_order_covers_every_submodule_after_its_imports():
    init = TREES[PACKAGE_DIR / "__init__.py"]
    order = next(ast.literal_eval(n.value) for n in init.body if isinstance(n, ast.Assign) and n.targets[0].id == "SUBMODULES")
    assert sorted(order) == sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
    for i, name in enumerate(order):
        deps = _package_imports(TREES[PACKAGE_DIR / f"{name}.py"]) - {name}
        assert deps <= set(order[:i]), f"{name} imports {deps - set(order[:i])}, reloaded after it"
    reload = ast.unparse(methods(classes()["MASRefineWidget"])["onReload"])
    assert "MASRefineModule.SUBMODULES" in reload and "ScriptedLoadableModuleWidget.onReload(self)" in reload
