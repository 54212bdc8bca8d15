"""The job protocol package (MASRefineLib.protocol) is standard library only, and the Slicer module is made from it.

One subprocess, where importing numpy, SimpleITK, torch, MONAI or scipy raises: it imports every module of
MASRefineLib.protocol, every MASRefineLib module the Slicer module imports (at module level or inside its functions),
and the Slicer module itself (against the stand-ins of Testing/slicer_stubs.py), and reports the module's choice
enums, labels and defaults, which must be the protocol's.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from MASRefineLib import runs
from MASRefineLib.protocol import events
from MASRefineLib.protocol.jobs import PARAMETERS, REFINE_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "MASRefine"
BLOCKED = ("numpy", "SimpleITK", "torch", "monai", "scipy")


def library_modules_the_slicer_module_imports() -> list[str]:
    out = set()
    for path in [MODULE_DIR / "MASRefine.py", *sorted((MODULE_DIR / "MASRefineModule").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("MASRefineLib")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("MASRefineLib"):
                out.add(node.module)
                # "from MASRefineLib.protocol import loadplan": submodules
                out |= {f"{node.module}.{a.name}" for a in node.names
                        if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()}
    return sorted(out)


CHILD = r"""
import importlib, json, pkgutil, sys, tempfile
from pathlib import Path

BLOCKED = set(sys.argv[1].split(","))

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
import MASRefineLib.protocol as protocol
for m in pkgutil.iter_modules(protocol.__path__):
    importlib.import_module(f"MASRefineLib.protocol.{m.name}")
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)

sys.path.insert(0, sys.argv[3])
import slicer_stubs
stubs = slicer_stubs.make_slicer(Path(tempfile.mkdtemp()))
sys.path.insert(0, str(slicer_stubs.MODULE_DIR))
sys.modules.update(stubs)
spec = importlib.util.spec_from_file_location("MASRefine", slicer_stubs.MODULE_PY)
module = importlib.util.module_from_spec(spec)
sys.modules["MASRefine"] = module
spec.loader.exec_module(module)
P = sys.modules["MASRefineModule.Parameters"]
node = P.MASRefineParameterNode
out = {"enums": {}, "labels": {}, "defaults": {}, "advanced": [P.DEFAULT_ALPHA, P.DEFAULT_GAMMA, P.DEFAULT_ITERATIONS]}
for param, enum_name in P.JOB_CHOICES.items():
    e = getattr(P, enum_name)
    out["enums"][param] = [m.value for m in e]
    out["labels"][param] = [m.label() for m in e]
    out.setdefault("names", {})[param] = [m.name for m in e]
    out["defaults"][param] = getattr(node, param).value if hasattr(getattr(node, param, None), "value") else None
out["enums"]["retention"] = [m.value for m in P.Retention]
out["labels"]["retention"] = [m.label() for m in P.Retention]
out["names"]["retention"] = [m.name for m in P.Retention]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({**out, "heavy": heavy}))
"""


def test_protocol_and_the_slicer_module_import_without_numpy_simpleitk_torch_monai_scipy():
    names = library_modules_the_slicer_module_imports()
    assert "MASRefineLib.protocol.jobs" in names and "MASRefineLib.protocol.loadplan" in names, names
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(BLOCKED), json.dumps(names), str(Path(__file__).parent)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    for param, values in got["enums"].items():
        if param == "retention":
            assert tuple(values) == runs.RETENTION
        else:
            assert tuple(values) == PARAMETERS[param][1], param
    for param, labels in got["labels"].items():  # every combo box item has its own text
        assert all(labels) and len(set(labels)) == len(labels), param
    for param, default in got["defaults"].items():
        assert default == PARAMETERS[param][2], param
    # the scene stores a choice by its member name: the names scenes saved before the enums were generated all
    # still load (new choices may only be added after them)
    saved = {"preset": ["FAST", "DEFAULT", "ACCURATE"], "prereg": ["AFFINE", "DEFORMABLE"],
             "refine": ["NONE", "I", "IS"], "fusion": ["PV", "WV", "JLF", "STAPLE", "VOTENET"],
             "device": ["AUTO", "CPU", "CUDA"], "retention": ["KEEP", "DELETE_ON_CLOSE", "KEEP_LAST"]}
    assert set(got["names"]) == set(saved)
    for param, names in saved.items():
        assert got["names"][param][:len(names)] == names, param
    assert got["advanced"] == [REFINE_DEFAULTS["alpha"], REFINE_DEFAULTS["gamma"], REFINE_DEFAULTS["iterations"][-1]]


def test_wire_constants():
    """The worker's protocol on the wire (docs/pipeline.md): what a caller of another version relies on."""
    assert events.EVENT_PREFIX == "MASREFINE-EVENT "
    assert (events.EXIT_DONE, events.EXIT_ERROR, events.EXIT_INVALID, events.EXIT_CANCELLED) == (0, 1, 2, 3)
