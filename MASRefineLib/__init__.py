"""MASRefineLib: multi-atlas segmentation with registration refinement (VoteNet++).

The library behind the MASRefine 3D Slicer module. It never imports slicer, qt, ctk or vtk.
Conventions (see docs/architecture.md): physical space is LPS millimetres as in ITK;
numpy/torch arrays are indexed (z, y, x); vectors (points, displacements) are (x, y, z) LPS.
"""
from .errors import MASRefineError

__version__ = "0.1.0"
__all__ = ["MASRefineError", "__version__"]
