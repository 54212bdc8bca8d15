"""Where the library is, how the worker is started, and what it needs installed (no Qt, no MRML)."""
import os
import shutil
import sys
from typing import Optional

from slicer.i18n import tr as _


def moduleDir() -> str:
    """The module's folder (MASRefine.py and Resources/), one up from this package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def libraryParentDir() -> str:
    """The folder that contains MASRefineLib: beside this file once installed (WITH_SUBDIR), or the
    repository root when the module is used from the source tree."""
    for candidate in (moduleDir(), os.path.dirname(moduleDir())):
        if os.path.isfile(os.path.join(candidate, "MASRefineLib", "__init__.py")):
            return candidate
    raise RuntimeError(_("MASRefineLib was not found beside {path}").format(path=moduleDir()))


def ensureLibraryImportable() -> None:
    """Put MASRefineLib on sys.path; Parameters.py calls it at import, which every use of the module comes after
    (MASRefine.py imports the logic, the logic Parameters), so the functions that import MASRefineLib need not."""
    parent = libraryParentDir()
    if parent not in sys.path:
        sys.path.insert(0, parent)


def pythonSlicerExecutable() -> str:
    """PythonSlicer (Slicer's Python without the application), which runs the worker."""
    return shutil.which("PythonSlicer") or sys.executable


def readRequirements(path: Optional[str] = None) -> list:
    """Requirement strings of Resources/requirements.txt (never torch, numpy or SimpleITK: see the file)."""
    path = path or os.path.join(moduleDir(), "Resources", "requirements.txt")
    with open(path, encoding="utf-8") as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]

