"""The worker's Python packages in Slicer's Python: what is installed (read from package metadata, never
imported: torch and MONAI stay out of Slicer's process), and installing or upgrading them in the
background with ``PythonSlicer -m MASRefineLib.install`` (torch through light-the-torch, as the PyTorch
extension does; the rest through pip, with Slicer's own numpy and SimpleITK pinned)."""
import sys
from importlib import metadata
from typing import Callable, Optional

import slicer
from slicer.i18n import tr as _

from MASRefineModule.Environment import pythonSlicerExecutable, readRequirements
from MASRefineModule.Job import MASRefineJob, launchCommand

# torch is installed with light-the-torch (as the PyTorch extension's installer does); numpy and SimpleITK are Slicer's.
TORCH_REQUIREMENT = "torch>=2.1"
NEVER_PIP_INSTALL = ("numpy", "SimpleITK", "torch")


def requirements() -> list:
    """torch's requirement, then Resources/requirements.txt."""
    return [TORCH_REQUIREMENT] + readRequirements()


def status() -> list:
    """One dict per requirement: ``name``, ``requirement``, installed ``version`` (None: missing), ``ok``."""
    from MASRefineLib import install  # the one reading of requirements (standard library only)

    rows = []
    for requirement in requirements():
        name = install.requirement_name(requirement)
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        rows.append({"name": name, "requirement": requirement, "version": version,
                     "ok": version is not None and install.satisfied(requirement)})
    return rows


def missing() -> list:
    """The requirements not satisfied (empty: the worker can run)."""
    return [row["requirement"] for row in status() if not row["ok"]]


def statusText() -> str:
    """The panel's table of versions (rich text)."""
    lines = []
    for row in status():
        state = row["version"] or _("not installed")
        mark = "&#10003;" if row["ok"] else "<b>&#10007;</b>"
        lines.append(f"<tr><td>{mark}</td><td>{row['name']}</td><td>{state}</td><td>({row['requirement']})</td></tr>")
    return "<table>" + "".join(lines) + "</table>"


def installCommand(upgrade: bool = False) -> list:
    """The background installer's command line for what is missing (``upgrade``: every requirement). numpy,
    SimpleITK and torch are pinned by the installer at the versions installed when its pip step starts, after
    its torch step (``--pin``), so pip never replaces them and resolves the rest against the torch just installed."""
    from MASRefineLib.install import requirement_name as reqName
    wanted = requirements() if upgrade else missing()
    torch = next((r for r in wanted if reqName(r) == "torch"), None)
    others = [r for r in wanted if reqName(r) != "torch"]
    command = [pythonSlicerExecutable(), "-m", "MASRefineLib.install"] + [f"--pin={name}" for name in NEVER_PIP_INSTALL]
    if torch:
        command += ["--torch", torch]
    if upgrade:
        command += ["--upgrade"]  # every requirement, satisfied or not (the installer skips satisfied ones otherwise)
    return command + others


def restartNeeded(result: Optional[dict]) -> bool:
    """Whether a distribution the installer changed (its ``changed``: versions before and after, dependencies
    included) provides a module already imported in Slicer's process (by another module): Python keeps the
    old one until Slicer restarts. What was only requested, and found satisfied by pip, is no reason."""
    changed = {name.lower() for name in ((result or {}).get("changed") or {})}
    if not changed:
        return False
    importNames = set()
    for importName, dists in metadata.packages_distributions().items():  # import name -> distributions
        if any(d.lower() in changed for d in dists):
            importNames.add(importName)
    return any(name in sys.modules for name in importNames)


def startInstall(upgrade: bool = False, onEvent: Optional[Callable] = None,
                 onFinished: Optional[Callable] = None) -> MASRefineJob:
    """Install (or upgrade) in the background; returns the job (``wait()``, ``cancel()``, ``result``)."""
    return launchCommand(installCommand(upgrade), slicer.app.temporaryPath, onEvent=onEvent, onFinished=onFinished)
