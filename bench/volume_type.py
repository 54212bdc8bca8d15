"""Measurement behind the choice of the in-memory volume type (docs/volume.md): MONAI's ``MetaTensor``
against a plain ``torch.Tensor`` carried with a :class:`MASRefineLib.geometry.Grid` (LPS).

    nice -n 19 .venv/bin/python bench/volume_type.py [--repeats 5] [--shape 80 100 100] [--batch 8]

1. Hot path: one registration-like step on a knee-sized batch (B, 1, Z, Y, X): ``grid_sample`` of the
   atlases at displaced points, a squared-difference loss against the target, backward to the field;
   timed with the tensors as plain tensors and as ``MetaTensor`` (interleaved, median of ``--repeats``).
2. Many small ops: 200 elementwise operations on a (1, 1, 32, 32, 32) tensor (MetaTensor's per-op
   ``__torch_function__`` cost, what an optimisation loop of small ops pays).
3. Geometry: the affine MONAI's reader (ITKReader, or NibabelReader without itk) attaches to a real NIfTI file (RAS, ``affine_lps_to_ras``) against
   our LPS ``Grid.index_to_physical()`` of the same file: they differ by diag(-1, -1, 1, 1) and by the axis
   order MONAI's arrays use ((x, y, z) channel-last, ours (z, y, x)).
Prints one JSON object (and the 1-minute load average, since the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _step(atlases: torch.Tensor, target: torch.Tensor, base: torch.Tensor, disp: torch.Tensor) -> float:
    t0 = time.perf_counter()
    d = disp.detach().requires_grad_(True)
    warped = F.grid_sample(atlases, base + d, mode="bilinear", padding_mode="zeros", align_corners=True)
    loss = ((warped - target) ** 2).mean()
    loss.backward()
    return time.perf_counter() - t0


def hot_path(shape, batch: int, repeats: int) -> dict:
    from monai.data import MetaTensor
    g = torch.Generator().manual_seed(0)
    atlases = torch.rand(batch, 1, *shape, generator=g)
    target = torch.rand(1, 1, *shape, generator=g)
    lin = [torch.linspace(-1, 1, n) for n in shape]
    zz, yy, xx = torch.meshgrid(*lin, indexing="ij")
    base = torch.stack([xx, yy, zz], -1)[None].expand(batch, *shape, 3).contiguous()
    disp = 0.01 * torch.randn(batch, *shape, 3, generator=g)
    meta = [MetaTensor(t) for t in (atlases, target, base, disp)]
    plain_t, meta_t = [], []
    _step(atlases, target, base, disp), _step(*meta)  # warm-up
    for _ in range(repeats):  # interleaved: the shared machine's load hits both alike
        plain_t.append(_step(atlases, target, base, disp))
        meta_t.append(_step(*meta))
    p, m = statistics.median(plain_t), statistics.median(meta_t)
    return {"shape": [batch, 1, *shape], "plain_s": round(p, 4), "metatensor_s": round(m, 4),
            "overhead_pct": round(100 * (m / p - 1), 1)}


def small_ops(repeats: int, n_ops: int = 200) -> dict:
    from monai.data import MetaTensor
    x = torch.rand(1, 1, 32, 32, 32)
    mx = MetaTensor(x.clone())

    def run(t):
        t0 = time.perf_counter()
        y = t
        for _ in range(n_ops):
            y = y * 1.0001 + 0.0001
        return time.perf_counter() - t0
    run(x), run(mx)
    pt, mt = [], []
    for _ in range(repeats):
        pt.append(run(x))
        mt.append(run(mx))
    p, m = statistics.median(pt), statistics.median(mt)
    return {"ops": n_ops, "plain_us_per_op": round(1e6 * p / n_ops, 2), "metatensor_us_per_op": round(1e6 * m / n_ops, 2)}


def geometry() -> dict:
    """Which of MONAI's readers for our formats (NIfTI, NRRD, MHA) can run here, and what a MetaTensor of one of our
    LPS images would carry: MONAI's ITK/NIfTI readers store a RAS affine (``affine_lps_to_ras=True`` by default),
    so an LPS ``Grid`` becomes ``diag(-1, -1, 1, 1) @ index_to_physical()`` and its arrays are (x, y, z)."""
    from monai.utils import optional_import
    have = {name: bool(optional_import(name)[1]) for name in ("itk", "nibabel", "nrrd")}
    out: dict = {"monai_file_readers_installed": have}
    from bench.datasets import available, benchmark_split, dataset_case
    if not available():
        return out
    from monai.data import MetaTensor
    from MASRefineLib.imageio import read_grid
    atlases, _ = benchmark_split("ixi", "tuning")
    img_path, _ = dataset_case("ixi")[0](atlases[0])
    lps = read_grid(img_path).index_to_physical()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # what ITKReader(affine_lps_to_ras=True) stores
    mt = MetaTensor(torch.zeros(2, 2, 2), affine=torch.as_tensor(ras))
    y = (mt * 2.0 + 1.0).permute(2, 1, 0)  # an op that reorders axes: the affine is carried along unchanged
    out.update({"file": img_path.name, "lps_equals_metatensor_affine": bool(np.allclose(lps, np.asarray(mt.affine))),
                "affine_after_permute_unchanged": bool(np.allclose(np.asarray(y.affine), ras))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 100, 100], help="working grid (Z Y X): knee at 2v")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {"load_1min": os.getloadavg()[0], "threads": 1,
           "hot_path": hot_path(tuple(a.shape), a.batch, a.repeats), "small_ops": small_ops(a.repeats),
           "geometry": geometry()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
