"""The module's choices and its parameter node (saved with the scene).

The choice enums are made from the worker's job parameters (``MASRefineLib.protocol.jobs.PARAMETERS``: values,
defaults) and the run-folder retentions (``MASRefineLib.runs.RETENTION``), so there is one list of each; a member's
name is its value in capitals (``"votenet"`` -> ``VOTENET``), the name the scene stores. Only the labels are here.
"""
import enum
import pathlib
from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

from MASRefineModule.Environment import ensureLibraryImportable

ensureLibraryImportable()
from MASRefineLib.protocol.jobs import PARAMETERS, REFINE_DEFAULTS  # noqa: E402 (standard library only)
from MASRefineLib.runs import RETENTION  # noqa: E402 (standard library only)


class _Choice(enum.Enum):
    """A combo box's choices: members made by :func:`_choices`, texts from :data:`_LABELS`."""

    def label(self) -> str:
        return _LABELS[type(self).__name__][self.value]()


def _choices(name: str, values) -> type:
    return _Choice(name, [(v.upper().replace("-", "_"), v) for v in values], module=__name__, qualname=name)


# the combo box texts, by value (functions: translated when shown)
_LABELS = {
    "Preset": {"fast": lambda: _("Fast"), "default": lambda: _("Default"), "accurate": lambda: _("Accurate"),
               "greedy": lambda: _("Greedy-style registration")},
    "PreRegistration": {"affine": lambda: _("Affine"), "deformable": lambda: _("Deformable")},
    "Refinement": {
        "none": lambda: _("None"),
        "I": lambda: _("(I) image similarity + regularity"),
        "IS": lambda: _("(IS) image + segmentation similarity + regularity"),
    },
    "Fusion": {
        "pv": lambda: _("Plurality vote"),
        "wv": lambda: _("Weighted vote"),
        "jlf": lambda: _("Joint label fusion"),
        "staple": lambda: _("STAPLE"),
        "votenet": lambda: _("VoteNet+"),
    },
    "Device": {"auto": lambda: _("Automatic (GPU if available)"), "cpu": lambda: _("CPU"), "cuda": lambda: _("CUDA GPU")},
    "Retention": {
        "keep": lambda: _("Keep every run (in the output folder)"),
        "delete-on-close": lambda: _("Delete when the scene closes"),
        "keep-last": lambda: _("Keep the last N runs"),
    },
}

#: the job parameter each choice enum stands for
JOB_CHOICES = {"preset": "Preset", "prereg": "PreRegistration", "refine": "Refinement", "fusion": "Fusion",
               "device": "Device"}
Preset = _choices("Preset", PARAMETERS["preset"][1])
PreRegistration = _choices("PreRegistration", PARAMETERS["prereg"][1])
Refinement = _choices("Refinement", PARAMETERS["refine"][1])
Fusion = _choices("Fusion", PARAMETERS["fusion"][1])
Device = _choices("Device", PARAMETERS["device"][1])
#: what happens to run folders (MASRefineLib.runs.RETENTION)
Retention = _choices("Retention", RETENTION)


# Values shown in the Advanced section, sent only when "override" is checked (otherwise the preset
# decides): refinement's defaults (MASRefineLib.protocol.jobs.REFINE_DEFAULTS; gamma in mm^2, iterations at
# the finest level).
DEFAULT_ALPHA = float(REFINE_DEFAULTS["alpha"])
DEFAULT_GAMMA = float(REFINE_DEFAULTS["gamma"])
DEFAULT_ITERATIONS = int(REFINE_DEFAULTS["iterations"][-1])

#
# MASRefineParameterNode
#


@parameterNodeWrapper
class MASRefineParameterNode:
    """
    The parameters needed by module.

    targetVolume - The volume to segment.
    atlasDir - The atlas-set folder (with atlas.json).
    outputDir - Where runs are written (a folder per run); empty: Slicer's temporary folder.
    preset - Speed/accuracy preset of every stage (the worker's "preset" job parameter).
    prereg, refine, fusion, device - The method (the worker's job parameters of the same names).
    overrideDefaults - Send alpha/gamma/iterations to the worker; otherwise the preset decides.
    alpha - Weight of the segmentation dissimilarity term (dimensionless; paper: 3).
    gamma - Weight of the bending energy, in mm^2 (the paper's 20000 is in other units; see refine.py).
    iterations - Refinement iterations at the finest level.
    retention - What happens to run folders: kept, deleted when the scene closes, or only the last keepLast kept.
    keepLast - How many run folders "keep the last N runs" keeps in the output folder.
    newAtlasDir - Where "Build atlas set" makes a new atlas set from the scene's segmentations.
    """

    targetVolume: vtkMRMLScalarVolumeNode
    atlasDir: pathlib.Path
    outputDir: pathlib.Path
    newAtlasDir: pathlib.Path
    preset: Preset = Preset(PARAMETERS["preset"][2])
    prereg: PreRegistration = PreRegistration(PARAMETERS["prereg"][2])
    refine: Refinement = Refinement(PARAMETERS["refine"][2])
    fusion: Fusion = Fusion(PARAMETERS["fusion"][2])
    device: Device = Device(PARAMETERS["device"][2])
    overrideDefaults: bool = False
    alpha: Annotated[float, WithinRange(0.0, 1000.0)] = DEFAULT_ALPHA
    gamma: Annotated[float, WithinRange(0.0, 1000.0)] = DEFAULT_GAMMA
    iterations: Annotated[int, WithinRange(1, 100000)] = DEFAULT_ITERATIONS
    retention: Retention = Retention.KEEP_LAST
    keepLast: Annotated[int, WithinRange(1, 1000)] = 5


def pathIsSet(path) -> bool:
    """A pathlib.Path parameter that was never set reads as '.' (the wrapper's empty path)."""
    return path is not None and str(path) not in ("", ".")
