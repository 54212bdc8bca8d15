"""Install or upgrade the worker's Python packages in this interpreter, reporting the worker's events.

``python -m MASRefineLib.install [--upgrade] [--torch REQ] [--constraints FILE] [--pin NAME ...] [--pip-option OPT ...] REQ ...``

What the Slicer module runs in the background (``PythonSlicer -m MASRefineLib.install ...``), so that
nothing is installed or imported in Slicer's own process: torch through light-the-torch (the tool the
PyTorch extension's ``PyTorchUtils.installTorch`` uses, which picks the build for the installed NVIDIA
driver), everything else through pip with the constraints file and the ``--pin`` distributions (what Slicer
ships, and torch) at the versions installed when the pip step starts, so after the torch step: a torch pin
written before light-the-torch replaced torch would make pip resolve the rest against the old torch.
Requirements already satisfied are skipped, unless ``--upgrade``: then every requirement is
installed with ``--upgrade`` (pip and light-the-torch), satisfied or not. Events (``MASREFINE-EVENT {json}`` lines, see
:mod:`MASRefineLib.worker`): ``stage`` per step, ``progress``, ``log`` for each line the installers
print, ``result`` with ``installed`` ``{distribution: version}`` of the requirements and ``changed``
``{distribution: [before, after]}`` of every distribution whose installed version the run changed
(dependencies too; ``before`` null: new), or ``error`` with the installer's last
line. Exit codes: 0 done, 1 an installer failed. Only the standard library is imported here (the
packages being installed may be missing or broken).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from typing import Optional

from .protocol.events import EXIT_DONE, EXIT_ERROR
from .worker import EventWriter

LIGHT_THE_TORCH = "light-the-torch>=0.5"


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement string (``"monai>=1.3"`` -> ``"monai"``)."""
    for i, c in enumerate(requirement):
        if not (c.isalnum() or c in "-_."):
            return requirement[:i]
    return requirement


def satisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies the requirement (read from metadata, never imported).
    Without ``packaging`` to compare versions, only presence is checked and pip decides the rest."""
    try:
        version = metadata.version(requirement_name(requirement))
    except metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def steps(torch: Optional[str], requirements: list[str], constraints: Optional[str],
          pip_options: list[str], upgrade: bool = False) -> list[tuple[str, list[str]]]:
    """(stage, command) for each installer run needed, in order. Installing (``upgrade`` False): only the
    requirements not satisfied, empty when everything is. Upgrading: every requirement (and
    light-the-torch with torch), with ``--upgrade`` for pip and light-the-torch."""
    py = sys.executable
    options = list(pip_options)
    if upgrade and "--upgrade" not in options and "-U" not in options:
        options.append("--upgrade")
    out = []
    if torch and (upgrade or not satisfied(torch)):
        if upgrade or not satisfied(LIGHT_THE_TORCH):
            out.append(("light-the-torch", [py, "-m", "pip", "install", *options, LIGHT_THE_TORCH]))
        out.append(("torch", [py, "-m", "light_the_torch", "install", *options, torch]))
    wanted = list(requirements) if upgrade else [r for r in requirements if not satisfied(r)]
    if wanted:
        pinned = ["-c", constraints] if constraints else []
        out.append(("packages", [py, "-m", "pip", "install", *pinned, *options, *wanted]))
    return out


def write_constraints(path: str, constraints: Optional[str], pins: list[str]) -> None:
    """The pip step's constraints file: the lines of ``constraints`` (if any), then ``name==version`` for each
    pinned distribution installed now (one not installed is left out)."""
    lines = []
    if constraints:
        with open(constraints, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    for name in pins:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def installed_versions() -> dict[str, str]:
    """{distribution name: version} of every installed distribution (the first on ``sys.path`` wins)."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(name, dist.version)
    return out


def run(events: EventWriter, torch: Optional[str], requirements: list[str], constraints: Optional[str],
        pip_options: list[str], upgrade: bool = False, pins: Optional[list[str]] = None) -> int:
    """Run the plan of :func:`steps`; with ``pins``, the pip step's constraints file is written just before it
    runs (:func:`write_constraints`), in a temporary folder removed afterwards."""
    pins = list(pins or [])
    before = installed_versions()
    with tempfile.TemporaryDirectory(prefix="masrefine-install-") as tmp:
        pinned = os.path.join(tmp, "constraints.txt") if pins else constraints
        plan = steps(torch, requirements, pinned, pip_options, upgrade)
        for i, (stage, command) in enumerate(plan):
            if stage == "packages" and pins:
                write_constraints(pinned, constraints, pins)  # read now: after the torch step
            events.emit("stage", stage=stage, message=" ".join(command[1:]))
            events.emit("progress", stage=stage, fraction=0.0, overall=round(i / len(plan), 4), message=stage)
            kwargs = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)} if os.name == "nt" else {}
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    encoding="utf-8", errors="replace", **kwargs)
            last = ""
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    last = line
                    events.emit("log", level="info", message=line)
            if proc.wait() != 0:
                events.emit("error", kind="install", message=f"{stage}: {last or 'the installer failed'} (exit code {proc.returncode})")
                return EXIT_ERROR
    names = ([requirement_name(torch)] if torch else []) + [requirement_name(r) for r in requirements]
    installed = {}
    for name in names:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    after = installed_versions() if plan else before
    changed = {name: [before.get(name), after.get(name)] for name in sorted(set(before) | set(after))
               if before.get(name) != after.get(name)}
    events.emit("result", installed=installed, ran=[stage for stage, _ in plan], changed=changed)
    return EXIT_DONE


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m MASRefineLib.install", description=__doc__.split("\n\n")[0])
    ap.add_argument("requirements", nargs="*", help="pip requirement strings")
    ap.add_argument("--torch", help="torch requirement, installed with light-the-torch (e.g. 'torch>=2.1')")
    ap.add_argument("--constraints", help="pip constraints file (versions pip must keep)")
    ap.add_argument("--pin", action="append", default=[], metavar="NAME",
                    help="keep this distribution at the version installed when the pip step starts (after the torch step)")
    ap.add_argument("--upgrade", action="store_true",
                    help="upgrade every requirement, satisfied or not (else only what is not satisfied is installed)")
    ap.add_argument("--pip-option", action="append", default=[],
                    help="option passed to pip and light-the-torch (e.g. --pip-option=--no-index)")
    return ap


def plan(argv: list[str]) -> list[tuple[str, list[str]]]:
    """The steps ``main(argv)`` would run now (nothing is run; with ``--pin``, the pip step's ``-c`` names
    the constraints file written just before it, shown here as ``<pins>``)."""
    a = parser().parse_args(argv)
    return steps(a.torch, a.requirements, "<pins>" if a.pin else a.constraints, a.pip_option, a.upgrade)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    events = EventWriter(sys.stdout)
    events.emit("started", pid=os.getpid(), pipeline="install")
    return run(events, a.torch, a.requirements, a.constraints, a.pip_option, a.upgrade, a.pin)


if __name__ == "__main__":
    raise SystemExit(main())
