#!/usr/bin/env python3
"""Timing: our joint label fusion on one real IXI crop, for before/after checks of a code change (#20).

The target is a centre crop of the first IXI subject, the atlases the same voxel crop of the next
``--atlases`` subjects (not registered: their disagreement gives JLF work to do; only the arrays matter
here). Prints the median wall seconds of ``--repeat`` runs with ``--threads`` torch threads and a SHA-1
of the fused labels, posteriors and weights, so two source trees can be compared for identical outputs::

    .venv/bin/python bench/jlf_speed.py                          # this tree
    PYTHONPATH=/tmp/src_before .venv/bin/python bench/jlf_speed.py --tree   # another tree's MASRefineLib
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IXI = ROOT.parent / "shared" / "data" / "ixi-dlmuse"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlases", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=3, default=[64, 64, 48], metavar=("X", "Y", "Z"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tree", action="store_true", help="import MASRefineLib from PYTHONPATH, not from this checkout")
    a = ap.parse_args(argv)
    if not a.tree and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import numpy as np
    import SimpleITK as sitk
    import torch
    import MASRefineLib
    from MASRefineLib.fusion.jlf import joint_label_fusion
    from MASRefineLib.imageio import normalize_intensity

    if not IXI.exists():
        print(f"real data not available: {IXI} is missing")
        return 1
    torch.set_num_threads(a.threads)
    ids = (IXI / "subjects.txt").read_text().split()[:a.atlases + 1]
    images, labels = [], []
    for s in ids:
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(IXI / "images" / f"{s}.nii.gz"), sitk.sitkFloat32))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(IXI / "labels" / f"{s}.nii.gz")))
        sl = tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(img.shape, a.size[::-1]))
        images.append(torch.from_numpy(normalize_intensity(img[sl])))
        labels.append(torch.from_numpy(lab[sl].astype(np.int64)))
    target, images, labels = images[0], torch.stack(images[1:]), torch.stack(labels[1:])
    secs = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        fused, post, weights, info = joint_label_fusion(images, target, labels)
        secs.append(time.perf_counter() - t)
    h = hashlib.sha1()
    for x in (fused, post.index, post.label, post.prob, weights):
        h.update(np.ascontiguousarray(x).tobytes())
    print(f"{MASRefineLib.__file__}: JLF {a.atlases} atlases, crop {a.size}, {a.threads} thread(s), "
          f"{info['solved_centres']} centres: median {statistics.median(secs):.2f} s of {a.repeat} "
          f"({', '.join(f'{s:.2f}' for s in secs)}); outputs sha1 {h.hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
