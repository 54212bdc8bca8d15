"""Measurement behind which of MASRefineLib/losses.py's losses are MONAI's (docs/numerics.md): values, gradients
and CPU time of ours against ``monai.losses`` on real images and label maps.

    nice -n 19 .venv/bin/python bench/losses_monai.py [--repeats 5]

- LNCC (registration and refinement's image term) against ``LocalNormalizedCrossCorrelationLoss`` (rectangular
  kernel of the same side, ``smooth_nr=0``; its ``smooth_dr`` clamps each windowed *sum* of squares, ours adds
  ``eps`` to the product of the windowed *means*, so it is set to ``eps * window^3``, the nearest equivalent), on the
  whole first IXI image (120 x 120 x 90) against the same image moved by 2 voxels with 0.9x contrast, both
  normalised to [0, 1]: the largest difference of the loss and of its gradient (relative to the largest gradient),
  inside the image and within half a window of its border, and forward + backward time.
- Soft Dice (refinement's Eq. 5; our formula as it was before it went through MONAI) against
  ``DiceLoss(include_background=False, smooth_nr=smooth_dr=1e-5, reduction="none")`` on the one-hot map of a
  real IXI label crop (64^3 voxels, every label in it) against softmax probabilities of noisy logits (float32;
  the softmax is not timed): loss, gradient, time.
- The segmenter's Dice from a class-index map (:func:`losses.soft_dice_loss_labels`) against ``DiceLoss(
  to_onehot_y=True, batch=True)`` on the same crop: time (the means differ: ours is over the structures present).
- Bending energy and diffusion against ``BendingEnergyLoss`` / ``DiffusionLoss`` on a voxel checkerboard and on a
  smooth field (unit spacing), and forward + backward time on a (2, 3, 40, 48, 48) field.
Times: best of ``--repeats`` CPU times (process time, 1 thread), milliseconds.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.datasets import ixi_dir  # noqa: E402
from MASRefineLib import losses  # noqa: E402
from MASRefineLib.imageio import normalize_intensity  # noqa: E402
from MASRefineLib.registration.params import REGISTRATION_LNCC_EPS  # noqa: E402


def cpu_ms(f, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.process_time()
        f()
        best = min(best, time.process_time() - t0)
    return 1000 * best


def value_and_grad(loss_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    v = loss_fn(x)
    (g,) = torch.autograd.grad(v.sum(), x)
    return v.detach(), g


def lncc_rows(repeats: int) -> list[str]:
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    sid = (ixi_dir() / "subjects.txt").read_text().split()[0]
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(ixi_dir() / "images" / f"{sid}.nii.gz"), sitk.sitkFloat32))
    b = torch.from_numpy(normalize_intensity(img))[None, None]
    a = torch.roll(b, 2, dims=4) * 0.9
    rows = []
    for w in (5, 9):
        border = torch.ones_like(b, dtype=torch.bool)
        h = w // 2
        border[:, :, h:-h, h:-h, h:-h] = False
        for eps_name, eps in (("LNCC_EPS", losses.LNCC_EPS), ("REGISTRATION_LNCC_EPS", REGISTRATION_LNCC_EPS)):
            monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=w, kernel_type="rectangular",
                                                        reduction="none", smooth_nr=0.0, smooth_dr=eps * w ** 3)

            def ours_map(x):
                cov, va, vb = losses._local_moments(x, b, w)
                return cov * cov / (va * vb + eps)

            vo, go = value_and_grad(lambda x: 1 - losses.lncc(x, b, w, eps=eps), a)
            vm, gm = value_and_grad(lambda x: 1 + monai(x, b).flatten(1).mean(1), a)
            with torch.no_grad():
                diff = (ours_map(a) + monai(a, b)).abs()  # ours: cc, MONAI: -cc
            scale = float(go.abs().max())
            rows.append(f"| LNCC w={w} {eps_name} | {float((vo - vm).abs().max()):.1e} | "
                        f"{float(diff[~border].max()):.1e} | {float(diff[border].max()):.1e} | "
                        f"{float((go - gm).abs().max()) / scale:.1e} | "
                        f"{cpu_ms(lambda: value_and_grad(lambda x: 1 - losses.lncc(x, b, w, eps=eps), a), repeats):.0f} | "
                        f"{cpu_ms(lambda: value_and_grad(lambda x: 1 + monai(x, b).flatten(1).mean(1), a), repeats):.0f} |")
    return rows


def dice_rows(repeats: int) -> list[str]:
    from monai.losses import DiceLoss

    sid = (ixi_dir() / "subjects.txt").read_text().split()[0]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(ixi_dir() / "labels" / f"{sid}.nii.gz")))[13:77, 28:92, 28:92]
    values = np.unique(lab)
    idx = torch.from_numpy(np.searchsorted(values, lab).astype(np.int64))[None]  # (1, Z, Y, X) class indices
    onehot = torch.nn.functional.one_hot(idx, len(values)).permute(0, 4, 1, 2, 3).double()
    torch.manual_seed(0)
    logits = 4 * onehot + torch.randn_like(onehot)
    probs, onehot = torch.softmax(logits, 1).float(), onehot.float()  # refinement's dtype; softmax is not timed
    monai = DiceLoss(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, reduction="none")

    def ours_f(p):  # losses.soft_dice_loss before it went through MONAI
        inter = (p[:, 1:] * onehot[:, 1:]).sum((2, 3, 4))
        return 1.0 - ((2 * inter + 1e-5) / (p[:, 1:].sum((2, 3, 4)) + onehot[:, 1:].sum((2, 3, 4)) + 1e-5)).mean(1)

    def monai_f(p):
        return monai(p, onehot).flatten(1).mean(1)

    vo, go = value_and_grad(ours_f, probs)
    vm, gm = value_and_grad(monai_f, probs)
    rows = [f"| soft Dice, {len(values) - 1} structures | {float((vo - vm).abs().max()):.1e} | - | - | "
            f"{float((go - gm).abs().max() / go.abs().max()):.1e} | {cpu_ms(lambda: value_and_grad(ours_f, probs), repeats):.0f} | "
            f"{cpu_ms(lambda: value_and_grad(monai_f, probs), repeats):.0f} |"]
    batch = DiceLoss(include_background=False, to_onehot_y=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    rows.append(f"| Dice from class indices (segmenter) | - | - | - | - | "
                f"{cpu_ms(lambda: value_and_grad(lambda p: losses.soft_dice_loss_labels(p, idx), probs), repeats):.0f} | "
                f"{cpu_ms(lambda: value_and_grad(lambda p: batch(p, idx[:, None]), probs), repeats):.0f} |")
    return rows


def regulariser_rows(repeats: int) -> list[str]:
    from monai.losses import BendingEnergyLoss, DiffusionLoss

    z, y, x = torch.meshgrid(*(torch.arange(12.0),) * 3, indexing="ij")
    cb = (-1.0) ** (x + y + z)
    checker = torch.stack([cb, cb, cb])[None] * 0.5
    smooth = torch.stack([torch.sin(x / 3), torch.cos(y / 4), torch.sin(z / 5) * torch.cos(x / 6)])[None]
    rows = []
    for name, ours, monai in (("bending energy", losses.bending_energy, BendingEnergyLoss(reduction="none")),
                              ("diffusion", losses.diffusion, DiffusionLoss(reduction="none"))):
        def m(f, monai=monai):  # ours sums the 3 components and averages over voxels
            return monai(f).sum(1).flatten(1).mean(1)
        field = torch.randn(2, 3, 40, 48, 48)
        rows.append(f"| {name} | {float(ours(checker)):.3g} | {float(m(checker)):.3g} | {float(ours(smooth)):.3g} | "
                    f"{float(m(smooth)):.3g} | {cpu_ms(lambda: value_and_grad(ours, field), repeats):.0f} | "
                    f"{cpu_ms(lambda: value_and_grad(m, field), repeats):.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("| loss | max loss diff | max voxel diff inside | max voxel diff near border | max grad diff / max grad "
          "| ours ms | MONAI ms |\n| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(lncc_rows(args.repeats) + dice_rows(args.repeats)))
    print("\n| regulariser | ours: checkerboard | MONAI: checkerboard | ours: smooth | MONAI: smooth | ours ms | "
          "MONAI ms |\n| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(regulariser_rows(args.repeats)))


if __name__ == "__main__":
    main()
