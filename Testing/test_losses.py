"""The shared losses: NCC/LNCC on real images, soft Dice (MONAI's DiceLoss) by hand, and why LNCC, the bending
energy and the diffusion term stay ours: what MONAI's versions miss (a linear intensity change at the border,
a checkerboard's mixed terms and border voxels, a checkerboard)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MASRefineLib.imageio import normalize_intensity
from MASRefineLib.losses import bending_energy, diffusion, lncc, ncc, soft_dice_loss
from MASRefineLib.warp import image_tensor

def _checkerboard(n: int = 12) -> torch.Tensor:
    """(1, 3, n, n, n) field of +-0.5 mm alternating voxel by voxel in all three components."""
    z, y, x = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n), indexing="ij")
    cb = ((-1.0) ** (x + y + z)).float()
    return torch.stack([cb, cb, cb]).unsqueeze(0) * 0.5


def _real(ixi_crop) -> torch.Tensor:
    return image_tensor(normalize_intensity(sitk.GetArrayFromImage(ixi_crop[0])))


def test_ncc_is_one_for_affine_intensity_change_and_lower_for_shift(ixi_crop):
    x = _real(ixi_crop)
    assert torch.allclose(ncc(x, 3 * x + 0.5), torch.ones(1), atol=1e-4)
    shifted = torch.roll(x, 3, dims=4)
    assert ncc(x, shifted).item() < 0.95
    # local NCC is invariant to a linear intensity change too, in every window with contrast; only truly
    # flat windows count 0. (With the old variance floor of 1e-5 this crop scored 0.78 against itself and
    # 0.65 against half its contrast, so the optimum of a registration was not the identity.)
    for w in (5, 9):
        assert lncc(x, x, w).item() > 0.995
        assert lncc(x, 0.5 * x + 0.2, w).item() > 0.995
        assert lncc(x, shifted, w).item() < lncc(x, x, w).item() - 0.1
    # batched: one value per item, each equal to the unbatched value
    both = ncc(torch.cat([x, x]), torch.cat([x, shifted]))
    assert both.shape == (2,)
    assert torch.allclose(both[1], ncc(x, shifted)[0])


def test_lncc_stays_ours_monai_counts_zeros_outside_the_image(ixi_crop):
    """A linear intensity change leaves our local NCC at 1 in every window with contrast, the border too (voxels
    outside the image are not counted); MONAI's LocalNormalizedCrossCorrelationLoss counts them as zeros, which
    the changed image does not share, and scores the same pair lower (bench/losses_monai.py: also slower)."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    x = _real(ixi_crop)
    for w in (5, 9):
        theirs = LocalNormalizedCrossCorrelationLoss(3, kernel_size=w, kernel_type="rectangular", smooth_nr=0.0,
                                                     smooth_dr=1e-9 * w ** 3)
        ours = lncc(x, 0.5 * x + 0.2, w).item()
        assert ours > 0.995 and -theirs(0.5 * x + 0.2, x).item() < ours - 0.01


def test_soft_dice_is_eq5_by_hand_per_structure_and_batch_item():
    """Two items, background + two structures of 4 voxels: Dice = 2 sum(p q) / (sum p + sum q) per structure
    (smoothed by 1e-5), loss = 1 - the mean over every channel given (the background too)."""
    q = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)  # channels x voxels
    p1 = torch.tensor([[0.5, 0, 1, 0.5], [0.5, 1, 0, 0.5], [0, 0, 0, 0]], dtype=torch.float64)
    p2 = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    pred = torch.stack([p1, p2]).reshape(2, 3, 1, 2, 2)
    target = torch.stack([q, q]).reshape(2, 3, 1, 2, 2)

    def d(i, s, u):  # 2 * intersection + eps over sums + eps
        return (2 * i + 1e-5) / (s + u + 1e-5)
    with_bg = torch.tensor([1 - (d(1.5, 2, 2) + d(1.5, 2, 2) + 1.0) / 3, 1 - (d(0, 2, 2) + d(0, 1, 2) + d(0, 1, 0)) / 3],
                           dtype=torch.float64)
    assert torch.allclose(soft_dice_loss(pred, target), with_bg, atol=1e-12)
    want = torch.tensor([1 - (d(1.5, 2, 2) + d(0, 0, 0)) / 2, 1 - (d(0, 1, 2) + d(0, 1, 0)) / 2],
                        dtype=torch.float64)  # the structures alone, as refinement passes them
    assert torch.allclose(soft_dice_loss(pred[:, 1:], target[:, 1:]), want, atol=1e-12)


def test_soft_dice_zero_for_match_and_one_for_disjoint(ixi_crop):
    lab = torch.as_tensor(sitk.GetArrayFromImage(ixi_crop[1]).astype(np.int64))
    values = torch.unique(lab)
    onehot = torch.stack([(lab == v).float() for v in values]).unsqueeze(0)
    assert soft_dice_loss(onehot, onehot).item() < 1e-4
    rolled = torch.roll(onehot, 2, dims=2)
    assert 0.05 < soft_dice_loss(onehot, rolled).item() < 1.0
    bg = torch.zeros_like(onehot)
    bg[:, 0] = 1
    assert soft_dice_loss(onehot, bg).item() > 0.99


def test_bending_energy_penalises_checkerboard():
    z, y, x = torch.meshgrid(torch.arange(12), torch.arange(12), torch.arange(12), indexing="ij")
    field = _checkerboard()
    assert bending_energy(field).item() > 1.0
    # an affine field has zero bending energy; a smooth bump has some, less than a checkerboard
    lin = torch.stack([0.1 * x + 0.2 * y, 0.05 * z, 0.3 * x]).float().unsqueeze(0)
    assert bending_energy(lin).item() < 1e-8
    bump = torch.stack([torch.sin(x / 3.0), torch.cos(y / 4.0), torch.sin(z / 5.0)]).float().unsqueeze(0)
    assert 0 < bending_energy(bump).item() < bending_energy(field).item()


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # inside MONAI
def test_bending_energy_stays_ours_monai_misses_a_checkerboards_mixed_terms_and_the_border():
    """On the +-0.5 checkerboard each pure second difference is 4 x 0.5 = 2 and each compact mixed one over a
    2 x 2 cell 4 x 0.5 = 2: ours = 3 components x (3 x 2^2 + 2 x 3 x 2^2) = 108. MONAI's BendingEnergyLoss
    has the pure part (3 x 3 x 2^2 = 36) and nothing of the mixed terms, whose wide stencil (i +- 1, j +- 1)
    does not see the checkerboard; a displaced corner voxel costs it nothing (interior only)."""
    from monai.losses import BendingEnergyLoss

    def monai(f):  # per batch item, summed over components like ours
        return BendingEnergyLoss(reduction="none")(f).sum(1).flatten(1).mean(1)
    cb = _checkerboard()
    assert bending_energy(cb).item() == pytest.approx(108.0, rel=1e-6)
    assert monai(cb).item() == pytest.approx(36.0, rel=1e-6)
    corner = torch.zeros(1, 3, 8, 8, 8)
    corner[0, :, 0, 0, 0] = 1.0
    assert monai(corner).item() == 0.0 and bending_energy(corner).item() > 0.01


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # inside MONAI
def test_diffusion_stays_ours_monai_does_not_see_a_checkerboard():
    """Forward differences of the +-0.5 checkerboard are +-1 along each axis: 3 axes x 3 components = 9.
    MONAI's DiffusionLoss takes central differences, (f(x+1) - f(x-1)) / 2 = 0 on a checkerboard."""
    from monai.losses import DiffusionLoss
    cb = _checkerboard()
    assert diffusion(cb).item() == pytest.approx(9.0, rel=1e-6)
    assert DiffusionLoss()(cb).item() == 0.0


def test_bending_energy_units_follow_spacing():
    z, y, x = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), torch.arange(10.0), indexing="ij")
    quad = torch.stack([x * x, torch.zeros_like(x), torch.zeros_like(x)]).unsqueeze(0)  # d2/dx2 = 2 per voxel^2
    assert abs(bending_energy(quad).item() - 4.0) < 1e-4
    # with 2 mm voxels the same array means u = (x_mm / 2)^2: d2/dx2 = 0.5 per mm^2 -> 0.25
    assert abs(bending_energy(quad, spacing=(2.0, 1.0, 1.0)).item() - 0.25) < 1e-4
    assert diffusion(torch.zeros(1, 3, 5, 5, 5)).item() == 0.0


def test_bending_energy_gradient_matches_autograd():
    # the hand-written backward against autograd through the same compact stencils (and gradcheck)
    from MASRefineLib.losses import _d2, _dxy
    torch.manual_seed(0)
    f = torch.randn(2, 3, 7, 6, 9, dtype=torch.float64, requires_grad=True)
    sp = (0.7, 1.1, 2.0)  # x, y, z

    def reference(f):
        h = {4: sp[0], 3: sp[1], 2: sp[2]}
        tot = 0.0
        for ax in (2, 3, 4):
            tot = tot + _d2(f, ax, h[ax]).pow(2).sum(1).flatten(1).mean(1)
        for a, b in ((2, 3), (2, 4), (3, 4)):
            tot = tot + 2.0 * _dxy(f, a, b, h[a], h[b]).pow(2).sum(1).flatten(1).mean(1)
        return tot

    w = torch.tensor([0.3, -1.7], dtype=torch.float64)  # different upstream gradients per batch item
    e = bending_energy(f, sp)
    assert torch.allclose(e, reference(f))
    (g,) = torch.autograd.grad((e * w).sum(), f)
    (g_ref,) = torch.autograd.grad((reference(f) * w).sum(), f)
    assert torch.allclose(g, g_ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: bending_energy(x, sp), (f[:, :, :4, :5, :4].detach().clone().requires_grad_(),))


def test_bending_energy_of_a_control_grid_with_two_nodes_along_an_axis():
    """A small image's coarse control grid may have 2 nodes along an axis: the pure second difference along it
    does not fit (the field is linear there) and is left out; the other terms remain, with their gradient."""
    from MASRefineLib.losses import _d2, _dxy
    torch.manual_seed(1)
    f = torch.randn(1, 3, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    e = bending_energy(f)
    expected = sum(_d2(f, ax, 1.0).pow(2).sum(1).mean() for ax in (3, 4)) + \
        sum(2.0 * _dxy(f, a, b, 1.0, 1.0).pow(2).sum(1).mean() for a, b in ((2, 3), (2, 4), (3, 4)))
    assert torch.allclose(e, expected.reshape(1))
    assert torch.autograd.gradcheck(bending_energy, (f,))
    assert bending_energy(torch.randn(1, 3, 1, 1, 4)).item() != 0.0  # only d2 along x fits
    assert bending_energy(torch.randn(1, 3, 1, 1, 2)).item() == 0.0  # nothing fits


def test_separable_box_mean_equals_full_window_pool():
    import torch.nn.functional as F
    from MASRefineLib.losses import box_mean
    x = torch.rand(2, 3, 11, 10, 13, dtype=torch.float64)
    for w in (3, 5, 7, 9):  # shifted sums (<= 7) and cumulative sums (> 7)
        full = F.avg_pool3d(x, w, stride=1, padding=w // 2, count_include_pad=False)
        assert torch.allclose(box_mean(x, w), full, atol=1e-12)


def test_box_mean_gradient():
    from MASRefineLib.losses import box_mean
    for w in (3, 9):
        x = torch.rand(1, 2, 5, 6, 10, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: box_mean(t, w), (x,))


def test_lncc_with_the_fixed_images_moments_gives_the_same_loss_and_gradient(ixi_crop):
    """Registration computes the target's local moments once per level (losses.box_moments): same numbers."""
    from MASRefineLib.losses import box_moments
    b = image_tensor(normalize_intensity(sitk.GetArrayFromImage(ixi_crop[0])))
    a = torch.cat([torch.roll(b, s, dims=-1) for s in (1, 3)]).requires_grad_(True)  # two "atlases"
    for w in (5, 9):
        plain = lncc(a, b.expand_as(a), w)
        (g_plain,) = torch.autograd.grad(plain.sum(), a)
        fast = lncc(a, b.expand_as(a), w, box_moments(b, w))
        (g_fast,) = torch.autograd.grad(fast.sum(), a)
        assert float(plain.detach().min()) > 0.05 and torch.equal(plain, fast) and torch.equal(g_plain, g_fast)


def test_folding_barrier_matches_autograd_through_the_jacobian_on_an_oblique_grid():
    # the hand-written backward against autograd through the folding metric's Jacobian (fields.spatial_gradient)
    from MASRefineLib.fields import jacobian_determinant, spatial_gradient
    from MASRefineLib.geometry import Grid
    from MASRefineLib.losses import folding_barrier
    torch.manual_seed(0)
    c, s = np.cos(0.3), np.sin(0.3)
    grid = Grid((6, 5, 7), (0.7, 1.1, 2.0), (3.0, -2.0, 1.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    f = (0.8 * torch.randn(2, 3, 7, 5, 6, dtype=torch.float64)).requires_grad_()

    def reference(f):
        j = spatial_gradient(f, grid) + torch.eye(3, dtype=f.dtype).view(1, 3, 3, 1, 1, 1)
        det = torch.linalg.det(j.permute(0, 3, 4, 5, 1, 2))
        return torch.relu(0.2 - det).pow(2).flatten(1).mean(1)

    w = torch.tensor([0.3, -1.7], dtype=torch.float64)
    e = folding_barrier(f, grid)
    assert torch.allclose(e, reference(f)) and float(e.detach().min()) > 0  # the random field folds somewhere
    det32 = jacobian_determinant(f.detach(), grid)  # the metric itself (float32)
    assert torch.allclose(e.float(), torch.relu(0.2 - det32).pow(2).flatten(1).mean(1), rtol=1e-4)
    (g,) = torch.autograd.grad((e * w).sum(), f)
    (g_ref,) = torch.autograd.grad((reference(f) * w).sum(), f)
    assert torch.allclose(g, g_ref, atol=1e-12)
    # no voxel below the margin: zero and a zero gradient
    z = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    folding_barrier(z, grid).sum().backward()
    assert z.grad is None or float(z.grad.abs().max()) == 0.0


def test_soft_dice_from_labels_equals_eq5_on_the_one_hot_map_of_the_present_structures():
    """The segmenter's training Dice (no one-hot map) is Eq. 5 over the structures present, batch as one volume."""
    from MASRefineLib.losses import soft_dice_loss, soft_dice_loss_labels
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (2, 6, 7, 5))  # structures 6-8 absent
    present = torch.arange(1, 6)
    q = (y.unsqueeze(1) == present.view(1, -1, 1, 1, 1)).double()

    def fold(t):
        return t.transpose(0, 1).reshape(1, t.shape[1], -1)
    ref = soft_dice_loss(fold(torch.softmax(logits, 1)[:, present]), fold(q))[0]
    new = soft_dice_loss_labels(torch.softmax(logits, 1), y)
    assert torch.allclose(new, ref)
    (g1,) = torch.autograd.grad(ref, logits)
    (g2,) = torch.autograd.grad(soft_dice_loss_labels(torch.softmax(logits, 1), y), logits)
    assert torch.allclose(g1, g2, atol=1e-12)
    assert float(soft_dice_loss_labels(torch.softmax(logits, 1), torch.zeros_like(y)).detach()) == 0.0  # no structure
