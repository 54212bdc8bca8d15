"""What several sub-commands share: argparse ``type=`` checks of numbers, the target-grid check.

The number checks run while argparse parses, so a bad value is refused before anything is read or written,
with argparse's usual one-line ``masrefine <cmd>: error: argument --x: ...`` (exit status 2).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _checked(kind: type, ok, rule: str):
    """An argparse type: ``text`` as ``kind`` when ``ok(value)``, else argparse's one line ``<rule>, got <text>``."""
    def check(text: str):
        v = _number(text, kind)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return v
    return check


#: counts (threads, iterations, windows, batch sizes); seeds and radii
positive_int = _checked(int, lambda v: v >= 1, "must be at least 1")
nonnegative_int = _checked(int, lambda v: v >= 0, "must be 0 or more")
#: loss weights, exponents, tolerances (nan and inf are refused); spacings in mm, learning rates
finite_nonneg_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")


def check_target_grid(target_path: str | os.PathLike, target_grid, registered: str | os.PathLike, registered_grid) -> None:
    """Refine and fuse work on the grid the atlases were registered to: a ``--target`` on another grid (size,
    spacing, origin or direction beyond a small tolerance) is refused, naming the file and both grids,
    rather than silently resampled."""
    from ..errors import MASRefineError

    # 1e-3 mm: far below a voxel, above the rounding of a grid written to NIfTI (float32) and read back
    if not target_grid.isclose(registered_grid, rtol=1e-5, atol_mm=1e-3):
        raise MASRefineError(
            f"{target_path}: grid {target_grid.describe()} differs from the grid the atlases were registered to "
            f"({registered_grid.describe()}, {Path(registered) / 'report.json'}): "
            f"{target_grid.difference(registered_grid)}; give the target that was registered to")
