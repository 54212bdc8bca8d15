"""The module's choices and its parameter node (saved with the scene).

The choices are serialized in the scene by member name; their values are the worker's job parameters
(``MASRefineLib.jobs.PARAMETERS``), which Testing/test_slicer_module.py keeps in step.
"""
import enum
import pathlib
from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

class Preset(enum.Enum):
    FAST = "fast"
    DEFAULT = "default"
    ACCURATE = "accurate"

    def label(self) -> str:
        return {Preset.FAST: _("Fast"), Preset.DEFAULT: _("Default"), Preset.ACCURATE: _("Accurate")}[self]


class PreRegistration(enum.Enum):
    AFFINE = "affine"
    DEFORMABLE = "deformable"

    def label(self) -> str:
        return {PreRegistration.AFFINE: _("Affine"), PreRegistration.DEFORMABLE: _("Deformable")}[self]


class Refinement(enum.Enum):
    NONE = "none"
    I = "I"  # noqa: E741 (the paper's name: image term only)
    IS = "IS"

    def label(self) -> str:
        return {
            Refinement.NONE: _("None"),
            Refinement.I: _("(I) image similarity + regularity"),
            Refinement.IS: _("(IS) image + segmentation similarity + regularity"),
        }[self]


class Fusion(enum.Enum):
    PV = "pv"
    WV = "wv"
    JLF = "jlf"
    STAPLE = "staple"
    VOTENET = "votenet"

    def label(self) -> str:
        return {
            Fusion.PV: _("Plurality vote"),
            Fusion.WV: _("Weighted vote"),
            Fusion.JLF: _("Joint label fusion"),
            Fusion.STAPLE: _("STAPLE"),
            Fusion.VOTENET: _("VoteNet+"),
        }[self]


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {Device.AUTO: _("Automatic (GPU if available)"), Device.CPU: _("CPU"), Device.CUDA: _("CUDA GPU")}[self]


class Retention(enum.Enum):
    """What happens to run folders (MASRefineLib.runs.RETENTION)."""
    KEEP = "keep"
    DELETE_ON_CLOSE = "delete-on-close"
    KEEP_LAST = "keep-last"

    def label(self) -> str:
        return {
            Retention.KEEP: _("Keep every run (in the output folder)"),
            Retention.DELETE_ON_CLOSE: _("Delete when the scene closes"),
            Retention.KEEP_LAST: _("Keep the last N runs"),
        }[self]


# Values shown in the Advanced section, sent only when "override" is checked (otherwise the preset
# decides). They are the library's defaults (MASRefineLib/refine.py: DEFAULT_ALPHA, DEFAULT_GAMMA in
# mm^2, the finest level of DEFAULT_ITERATIONS); Testing/test_slicer_module.py keeps them in step.
DEFAULT_ALPHA = 3.0
DEFAULT_GAMMA = 40.0
DEFAULT_ITERATIONS = 20

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
    preset: Preset = Preset.DEFAULT
    prereg: PreRegistration = PreRegistration.DEFORMABLE
    refine: Refinement = Refinement.I
    fusion: Fusion = Fusion.JLF
    device: Device = Device.AUTO
    overrideDefaults: bool = False
    alpha: Annotated[float, WithinRange(0.0, 1000.0)] = DEFAULT_ALPHA
    gamma: Annotated[float, WithinRange(0.0, 1000.0)] = DEFAULT_GAMMA
    iterations: Annotated[int, WithinRange(1, 100000)] = DEFAULT_ITERATIONS
    retention: Retention = Retention.KEEP_LAST
    keepLast: Annotated[int, WithinRange(1, 1000)] = 5


def pathIsSet(path) -> bool:
    """A pathlib.Path parameter that was never set reads as '.' (the wrapper's empty path)."""
    return path is not None and str(path) not in ("", ".")
