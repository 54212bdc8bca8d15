"""MASRefineLib: multi-atlas segmentation with registration refinement (VoteNet++).

The library behind the MASRefine 3D Slicer module. It never imports slicer, qt, ctk or vtk.
Conventions (see docs/architecture.md): physical space is LPS millimetres as in ITK;
numpy/torch arrays are indexed (z, y, x); vectors (points, displacements) are (x, y, z) LPS.
"""
import os as _os

# OpenMP threads that spin while waiting (libgomp's default) collapse when other processes share the
# cores: on the 2-core machine with other jobs running, refinement of the demo took 264 s with the
# default and 38 s with passive waiting (same 2 threads). Passive is set here, before torch is imported,
# unless the user chose a policy.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import MASRefineError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MASRefineError", "__version__"]
