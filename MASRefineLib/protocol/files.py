"""Image file names: which suffixes are images, and a file's name without them."""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_stem(path: str | os.PathLike) -> str:
    """File name without an image suffix: ``/a/b/case1.nii.gz`` -> ``case1``; ``x.seg.nrrd`` -> ``x``."""
    name = Path(path).name
    for suf in (".seg.nrrd",) + IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)
