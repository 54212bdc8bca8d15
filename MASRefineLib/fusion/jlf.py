"""Joint label fusion (Wang et al., PAMI 2013), vectorised in torch, solved only where it can matter.

The formulation of ANTs' ``antsJointFusion`` (``itk::WeightedVotingFusionImageFilter``); docs/fusion.md
describes it, the speed-ups and the two deliberate border differences from ANTs:

1. **Search** (radius ``search_radius`` voxels): per centre voxel and atlas, the offset whose atlas patch
   best matches the target patch by ANTs' Pearson measure, offsets visited by physical distance, the first
   strict optimum kept (flat regions keep offset 0).
2. **Dependency matrix**: patches (radius ``patch_radius``) normalised to zero mean and unit standard deviation
   (floored at ``std_floor``, 1/255 of our [0, 1] intensities), ``d_i = |X_i - T|``,
   ``M_ij = (sum_p d_i d_j / (P - 1))^beta``, ``W = (M + alpha I)^-1 1``, negatives set to 0, normalised.
3. **Patch voting**: every centre votes with ``W_i`` for each voxel of its patch, for atlas i's label at the
   searched position; posteriors are the votes normalised by their sum.

VoteNet+ (``error_probs`` given): ``d_i(p)`` is the calibrated probability that atlas i's label is wrong
at ``c + o_i + p``, with ``M_ij = (mean_p d_i d_j)^beta``. Away from the border the result is ANTs' exactly
(tested against a direct implementation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..progress import ProgressCallback, report
from concurrent.futures import ThreadPoolExecutor

from .common import AtlasWeights, Posteriors, consensus, dilate, intra_op_threads


def search_offsets(radius: int, spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """(S, 3) int64 offsets (dz, dy, dx) of the search cube in ANTs' visiting order: by physical
    distance, ties in ITK neighbourhood order (x fastest)."""
    r = int(radius)
    rng = torch.arange(-r, r + 1)
    dz, dy, dx = torch.meshgrid(rng, rng, rng, indexing="ij")
    off = torch.stack([dz.reshape(-1), dy.reshape(-1), dx.reshape(-1)], 1)
    sx, sy, sz = (float(s) for s in spacing_xyz)
    d2 = (off[:, 0] * sz) ** 2 + (off[:, 1] * sy) ** 2 + (off[:, 2] * sx) ** 2
    order = np.argsort(d2.numpy(), kind="stable")
    return off[torch.from_numpy(order)]


def _box_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum over a (2r+1)^3 cube on the last three axes, 'valid' (each axis shrinks by 2r)."""
    if r == 0:
        return x
    k = 2 * r + 1
    for d in (-3, -2, -1):
        n = x.shape[d]
        if k == 5:  # pairwise doubling: 3 additions instead of 4
            s2 = x.narrow(d, 0, n - 1) + x.narrow(d, 1, n - 1)
            s = s2.narrow(d, 0, n - 4) + s2.narrow(d, 2, n - 4)
            s += x.narrow(d, 4, n - 4)
        else:
            s = x.narrow(d, 0, n - k + 1) + x.narrow(d, 1, n - k + 1)
            for j in range(2, k):
                s += x.narrow(d, j, n - k + 1)
        x = s
    return x


def _lin(off: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Linear index offsets of (…, 3) (dz, dy, dx) in a C-ordered array of shape ``dims``."""
    return off[..., 0] * (dims[1] * dims[2]) + off[..., 1] * dims[2] + off[..., 2]


def _normalise_patches(x: torch.Tensor, valid: torch.Tensor, floor: float) -> torch.Tensor:
    """Zero-mean, unit-std patches over the last axis (std floored), invalid entries 0."""
    n = valid.sum(-1, keepdim=True).clamp(min=2)
    xv = x * valid
    mean = xv.sum(-1, keepdim=True) / n
    var = ((xv * xv).sum(-1, keepdim=True) - n * mean * mean) / (n - 1)
    std = var.clamp(min=0).sqrt().clamp(min=floor)
    return (x - mean) / std * valid


def _normalise_full(x: torch.Tensor, floor: float) -> torch.Tensor:
    """Zero-mean, unit-std patches over the last axis (std with n - 1, floored), all entries valid."""
    n = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    std = ((xc * xc).sum(-1, keepdim=True) / (n - 1)).sqrt_().clamp_(min=floor)
    return xc.div_(std)


def _solve_weights(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """W = (M + alpha I)^-1 1, negatives set to 0, normalised to sum 1 (uniform if all are 0). m: (N, B, B)."""
    b = m.shape[-1]
    a = m.to(torch.float64) + alpha * torch.eye(b, dtype=torch.float64, device=m.device)
    ones = torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(a)
    w = torch.cholesky_solve(ones, chol)[..., 0]
    bad = info != 0
    if bad.any():
        w[bad] = (torch.linalg.pinv(a[bad]) @ ones[bad])[..., 0]
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    s = w.sum(-1, keepdim=True)
    w = torch.where(s > 0, w / s.clamp(min=1e-300), torch.full_like(w, 1.0 / b))
    return w.to(torch.float32)


def joint_label_fusion(images: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                       labels: torch.Tensor | Sequence[torch.Tensor], *,
                       alpha: float = 0.1, beta: float = 2.0, patch_radius: int = 2, search_radius: int = 3,
                       spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0), std_floor: float = 1.0 / 255.0,
                       error_probs: torch.Tensor | None = None, block: int = 40, workers: int | None = None,
                       progress: ProgressCallback | None = None, stage: str = "fuse", compact_weights: bool = False
                       ) -> tuple[np.ndarray, Posteriors, np.ndarray | AtlasWeights, dict]:
    """Joint label fusion on one target grid.

    ``images`` (B, Z, Y, X) warped atlas intensities, ``target`` (Z, Y, X) (both normalised to [0, 1]),
    ``labels`` (B, Z, Y, X) integer label values (any integer dtype: the compact ones of a
    :class:`~MASRefineLib.warped.WarpedSet` are taken as they are); ``images`` and ``labels`` may also be
    sequences of B (Z, Y, X) tensors. No full-size (B, ...) working copy of them is made (#22): each block copies
    its data box (the block grown by the search and patch radii) out of every atlas, with the values outside the
    image (intensity 0, label -1) that padding the whole stack would give. Radii in voxels; ``spacing_xyz`` (mm)
    only orders the search. ``error_probs`` (B, Z, Y, X) or a sequence of B (Z, Y, X): VoteNet+ mode (see the
    module docstring).
    Returns (fused uint16 (Z, Y, X), posteriors, per-atlas weights (B, Z, Y, X) float32, info); with
    ``compact_weights`` the weights are an :class:`~.common.AtlasWeights` (1/B but at the voxels solved; its
    maps equal the dense stack's bit for bit). At voxels where the vote is unanimous the weights are 1/B (any
    weights give the same label).
    Blocks of about ``block`` voxels per side run in ``workers`` threads (default: torch's intra-op
    thread count on the CPU), each torch op single-threaded (see :func:`.common.intra_op_threads`).
    """
    dev = images[0].device
    b = len(images)
    shape = tuple(int(s) for s in labels[0].shape)
    rp = int(patch_radius)
    rs = int(search_radius)
    big_r = rs + rp
    n_patch = (2 * rp + 1) ** 3

    # pad so that every block's centre box (block grown by rp, unclipped) grown by big_r is inside
    pw = big_r + rp
    pad = [pw] * 6

    def padded(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(x, pad, value=value)

    # No padded (B, ...) stacks (#22): every block copies its data box out of the atlases' own tensors
    # (_data_box: the values padding would give), so the per-atlas working memory is a block's, and the
    # caller's compact labels become int64 only inside a block.
    fixed = consensus(labels, rs)
    unc = ~fixed
    centres = dilate(unc, rp)

    tgt_p = padded(target.to(torch.float32)[None], 0.0)[0]
    val_p = padded(torch.ones(shape, dtype=torch.float32, device=dev)[None], 0.0)[0]
    cen_p = padded(centres[None].to(torch.float32), 0.0)[0] > 0
    inner = torch.zeros(shape, dtype=torch.bool, device=dev)
    if all(n > 2 * big_r for n in shape):
        inner[big_r:-big_r, big_r:-big_r, big_r:-big_r] = True
    near_border = cen_p & ~(padded(inner[None].to(torch.float32), 0.0)[0] > 0)

    offs = search_offsets(rs, spacing_xyz).to(dev)
    rng = torch.arange(-rp, rp + 1, device=dev)
    pz, py, px = torch.meshgrid(rng, rng, rng, indexing="ij")
    patch = torch.stack([pz.reshape(-1), py.reshape(-1), px.reshape(-1)], 1)  # (P, 3)

    fused = labels[0].to(torch.int64, copy=True).reshape(-1)
    fill = float(torch.full((1,), 1.0 / b, dtype=torch.float32))       # 1/B as float32 (unanimous voxels)
    w_idx, w_val = [], []                                              # the solved voxels' weights, per block
    sp_idx, sp_lab, sp_prob = [], [], []
    sizes = [-(-n // max(1, round(n / block))) for n in shape]        # near-equal blocks of about `block`
    starts = [list(range(0, n, sz)) for n, sz in zip(shape, sizes)]
    blocks = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    blocks = [bl for bl in blocks if bool(unc[bl[0]:bl[0] + sizes[0], bl[1]:bl[1] + sizes[1], bl[2]:bl[2] + sizes[2]].any())]
    n_solved = 0

    def run_block(z0: int, y0: int, x0: int):
        z1, y1, x1 = min(z0 + sizes[0], shape[0]), min(y0 + sizes[1], shape[1]), min(x0 + sizes[2], shape[2])
        nz = unc[z0:z1, y0:y1, x0:x1].nonzero()                        # shrink the block to its voxels to solve
        lo, hi = nz.min(0).values.tolist(), nz.max(0).values.tolist()
        z0, y0, x0, z1, y1, x1 = z0 + lo[0], y0 + lo[1], x0 + lo[2], z0 + hi[0] + 1, y0 + hi[1] + 1, x0 + hi[2] + 1
        u_blk = unc[z0:z1, y0:y1, x0:x1]
        bdim = (z1 - z0, y1 - y0, x1 - x0)
        cdim = tuple(d + 2 * rp for d in bdim)                        # centre box: block grown by rp
        ddim = tuple(d + 2 * big_r for d in cdim)                      # data box: centre box grown by big_r
        # padded coords of the data box start: (z0 - rp - big_r) + pw = z0 (image coords z0 - pw)
        dsl = tuple(slice(s0, s0 + d) for s0, d in zip((z0, y0, x0), ddim))
        img0 = (z0 - pw, y0 - pw, x0 - pw)
        a_d = _data_box(images, img0, ddim, 0.0, torch.float32, dev)   # contiguous: ~4x faster box sums
        t_d = tgt_p[dsl].contiguous()
        v_d = val_p[dsl].contiguous()
        l_d = _data_box(labels, img0, ddim, -1, torch.int64, dev)
        csl = tuple(slice(s0 + big_r, s0 + big_r + d) for s0, d in zip((z0, y0, x0), cdim))
        cidx = cen_p[csl].nonzero()                                    # (M, 3) centre-box coords
        c_lin = _lin(cidx, cdim)
        base_lin = _lin(cidx + big_r, ddim)                            # their linear index in the data box
        p_lin = _lin(patch, ddim)                                      # (P,)

        near = bool(near_border[csl].any())                             # some patch may leave the image
        if rs > 0:
            best_off = _search(a_d, t_d, v_d, cdim, rs, rp, offs)      # (B, cz, cy, cx)
            # centres whose patches leave the image: exact border search on the slabs holding them
            for sub in _border_slabs(near_border[csl], (z0 - rp, y0 - rp, x0 - rp), shape, big_r):
                dsub = tuple(slice(q.start, q.stop + 2 * big_r) for q in sub)
                best_off[(slice(None),) + sub] = _search(
                    a_d[(slice(None),) + dsub], t_d[dsub], v_d[dsub], tuple(q.stop - q.start for q in sub), rs, rp,
                    offs, exact_border=True)
            o_lin = _lin(offs, ddim)[best_off.reshape(b, -1)[:, c_lin]]  # (B, M)
        else:
            o_lin = torch.zeros((b, cidx.shape[0]), dtype=torch.int64, device=dev)

        # weights at the centres, in chunks
        w_c = torch.zeros((b, cidx.shape[0]), dtype=torch.float32, device=dev)
        a_flat, t_flat, v_flat = a_d.reshape(b, -1), t_d.reshape(-1), v_d.reshape(-1)
        e_flat = _data_box(error_probs, img0, ddim, 0.0, torch.float32, dev).reshape(b, -1) \
            if error_probs is not None else None
        for s in range(0, cidx.shape[0], 4096):
            bl = base_lin[s:s + 4096]
            tp = bl[:, None] + p_lin[None]                              # (m, P)
            vt = v_flat[tp]
            if e_flat is None:
                ap = (bl[None, :, None] + o_lin[:, s:s + 4096, None] + p_lin[None, None]).reshape(b, -1)
                xa = torch.gather(a_flat, 1, ap).reshape(b, *tp.shape)
                if near:                                                # patches may leave the image
                    va = v_flat[ap].reshape(b, *tp.shape) * vt
                    xn = _normalise_patches(xa, va, std_floor)
                    tn = _normalise_patches(t_flat[tp][None].expand(b, -1, -1), va, std_floor)
                else:
                    xn = _normalise_full(xa, std_floor)
                    tn = _normalise_full(t_flat[tp], std_floor)[None]
                d = (xn - tn).abs_().permute(1, 0, 2)                   # (m, B, P)
                m = d @ d.transpose(1, 2) / float(n_patch - 1)
            else:                                                       # error probabilities at the (searched) patch
                ap = (bl[None, :, None] + o_lin[:, s:s + 4096, None] + p_lin[None, None]).reshape(b, -1)
                va = v_flat[ap].reshape(b, *tp.shape) * vt
                q = torch.gather(e_flat, 1, ap).reshape(b, *tp.shape) * va  # (B, m, P)
                d = q.permute(1, 0, 2)
                m = d @ d.transpose(1, 2) / vt.sum(-1).clamp(min=1)[:, None, None]
            m = m.pow(beta) if beta != 2.0 else m * m
            m = torch.nan_to_num(m, nan=0.0, posinf=0.0)
            w_c[:, s:s + 4096] = _solve_weights(m, alpha).T
        n_c = cdim[0] * cdim[1] * cdim[2]
        w_dense = torch.zeros((b, n_c), dtype=torch.float32, device=dev)
        w_dense[:, c_lin] = w_c
        o_dense = torch.zeros((b, n_c), dtype=torch.int64, device=dev)
        o_dense[:, c_lin] = o_lin
        del w_c, o_lin

        # patch voting at the uncertain voxels of the block (gathered from the centres whose patch holds them)
        lv = torch.unique(l_d[l_d >= 0])                                # local label values (sorted)
        nl = int(lv.numel())
        l_loc = torch.where(l_d >= 0, torch.searchsorted(lv, l_d.clamp(min=0)), torch.full_like(l_d, nl))
        l_loc = l_loc.reshape(b, -1)                                    # outside the image -> row nl (dropped)
        xs = u_blk.nonzero()                                            # (n, 3) block coords
        x_c = _lin(xs + rp, cdim)                                       # as centre-box linear index
        x_d = _lin(xs + rp + big_r, ddim)                               # as data-box linear index
        post = torch.zeros((nl + 1, xs.shape[0]), dtype=torch.float32, device=dev)
        wacc = torch.zeros((b, xs.shape[0]), dtype=torch.float32, device=dev)
        for pc in _lin(patch, cdim).tolist():
            cl = x_c - pc                                               # centre whose patch holds x
            w = torch.index_select(w_dense, 1, cl)
            li = torch.gather(l_loc, 1, torch.index_select(o_dense, 1, cl).add_(x_d))
            post.scatter_add_(0, li, w)
            if near:                                                    # votes from outside the image are dropped
                wacc += w.masked_fill_(li == nl, 0.0)
        if not near:                                                    # every vote counted: box sums of the weights
            wacc = _box_sum(w_dense.reshape(b, *cdim), rp).reshape(b, -1)
            wacc = torch.index_select(wacc, 1, _lin(xs, bdim))
        post = post[:nl]
        wsum = post.sum(0)
        winner = lv[post.argmax(0)]
        norm = wsum.clamp(min=1e-12)
        post = post / norm
        x_lin = _lin(xs + torch.tensor([z0, y0, x0], device=dev), shape)
        wblk = torch.where(wsum > 0, wacc / norm, torch.full_like(wacc, 1.0 / b))
        nz_l, nz_x = (post > 0).nonzero(as_tuple=True)
        return (int(cidx.shape[0]), x_lin, winner, wblk, x_lin[nz_x].cpu(), lv[nz_l].cpu(), post[nz_l, nz_x].cpu())

    if workers is None:
        workers = torch.get_num_threads() if dev.type == "cpu" else 1
    def collect(k: int, res) -> None:
        nonlocal n_solved
        n_c, x_lin, winner, wblk, i_, l_, p_ = res
        n_solved += n_c
        fused[x_lin] = winner
        w_idx.append(x_lin.cpu())
        w_val.append(wblk.cpu())
        sp_idx.append(i_)
        sp_lab.append(l_)
        sp_prob.append(p_)
        report(progress, stage, (k + 1) / max(1, len(blocks)), f"block {k + 1}/{len(blocks)}")

    with intra_op_threads(1 if dev.type == "cpu" else torch.get_num_threads()):
        if int(workers) <= 1:
            for k, bl in enumerate(blocks):
                collect(k, run_block(*bl))
        else:
            with ThreadPoolExecutor(max_workers=int(workers)) as pool:
                futures = [pool.submit(run_block, *bl) for bl in blocks]
                try:
                    for k, fut in enumerate(futures):
                        collect(k, fut.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    report(progress, stage, 1.0, "done")
    cat = (lambda xs, dt: torch.cat(xs).numpy() if xs else np.zeros(0, dtype=dt))
    fused_np = fused.reshape(shape).cpu().numpy().astype(np.uint16)
    post = Posteriors(shape, fused_np, unc.cpu().numpy(), cat(sp_idx, np.int64), cat(sp_lab, np.int64),
                      cat(sp_prob, np.float32).astype(np.float32))
    info = {"uncertain_voxels": int(unc.sum()), "solved_centres": n_solved, "voxels": int(np.prod(shape))}
    # blocks are disjoint, so each solved voxel has one entry
    weights = AtlasWeights(shape, fill, cat(w_idx, np.int64),
                           torch.cat(w_val, 1).numpy() if w_val else np.zeros((b, 0), np.float32))
    del w_idx, w_val
    return fused_np, post, (weights if compact_weights else np.asarray(weights)), info


def _data_box(xs: torch.Tensor | Sequence[torch.Tensor], start: Sequence[int], dims: Sequence[int], value: float,
              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B, *dims) contiguous ``dtype``: the box of ``dims`` voxels starting at image voxel ``start`` (may lie
    outside the image) of each (Z, Y, X) ``xs[i]``, ``value`` where it leaves the image: what slicing
    ``F.pad(stack(xs), value=value)`` at that box gives, without the padded stack."""
    shape = [int(n) for n in xs[0].shape[-3:]]
    out = torch.full((len(xs), *(int(d) for d in dims)), value, dtype=dtype, device=device)
    src, dst = [], []
    for s0, d, n in zip(start, dims, shape):
        lo, hi = max(0, s0), min(n, s0 + d)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s0, hi - s0))
    src_t, dst_t = tuple(src), tuple(dst)
    for i in range(len(xs)):
        out[(i, *dst_t)] = xs[i][src_t]
    return out


def _search(a_d: torch.Tensor, t_d: torch.Tensor, v_d: torch.Tensor, cdim: tuple[int, int, int], rs: int, rp: int,
            offs: torch.Tensor, exact_border: bool = False) -> torch.Tensor:
    """Best search offset index per atlas and centre: (B, cz, cy, cx) int64 (see module docstring).

    ``a_d`` (B, ...), ``t_d``, ``v_d`` (in-image indicator) cover the centre box grown by
    ``rs + rp``. Away from the image border every sum runs over the full patch: per offset one product,
    one box sum and two multiply-adds; the score ``s / sqrt(var_X)`` orders offsets exactly as ANTs'
    ``-sign(s) s^2 / var_X``. ``exact_border`` (centres near the border): the correlation runs over the
    patch positions inside the image for both the target and the shifted atlas patch, the target mean
    included (four more box sums per offset)."""
    big_r = rs + rp
    b = a_d.shape[0]
    cz, cy, cx = cdim
    dev, dt = a_d.device, a_d.dtype
    if rs == 0:
        return torch.zeros((b, cz, cy, cx), dtype=torch.int64, device=dev)
    cs = (slice(rs, rs + cz), slice(rs, rs + cy), slice(rs, rs + cx))
    n_t = _box_sum(v_d, rp)[cs]
    mt = _box_sum(t_d, rp)[cs] / n_t.clamp(min=1)                         # target patch means (in-image voxels)
    reg = (slice(big_r - rp, big_r + cz + rp), slice(big_r - rp, big_r + cy + rp), slice(big_r - rp, big_r + cx + rp))
    t_reg = t_d[reg].contiguous()
    valid_c = v_d[rp:rp + cz + 2 * rs, rp:rp + cy + 2 * rs, rp:rp + cx + 2 * rs] > 0  # centre + offset in the image
    if not exact_border:
        sa = _box_sum(a_d, rp)                                            # (B, cz+2rs, ...): atlas sums at c + o
        sa2 = _box_sum(a_d * a_d, rp)
        n_g = _box_sum(v_d, rp).clamp(min=1)
        inv_std = (sa2 - sa * sa / n_g).clamp(min=1e-6).rsqrt_()
        penalty = None                                                    # -inf for offsets leaving the image
        if not bool(valid_c.all()):
            penalty = torch.zeros(valid_c.shape, device=dev, dtype=dt).masked_fill_(~valid_c, -float("inf"))
        del sa2, n_g
    else:
        vt_reg = v_d[reg]
    best = torch.full((b, cz, cy, cx), -float("inf"), device=dev, dtype=dt)
    arg = torch.zeros((b, cz, cy, cx), dtype=torch.int16, device=dev)
    score = torch.empty((b, cz, cy, cx), device=dev, dtype=dt)
    better = torch.empty((b, cz, cy, cx), device=dev, dtype=torch.bool)
    for j, (dz, dy, dx) in enumerate(offs.tolist()):
        z, y, x = big_r - rp + dz, big_r - rp + dy, big_r - rp + dx
        a_o = a_d[:, z:z + cz + 2 * rp, y:y + cy + 2 * rp, x:x + cx + 2 * rp]
        sh = (slice(None), slice(rs + dz, rs + dz + cz), slice(rs + dy, rs + dy + cy), slice(rs + dx, rs + dx + cx))
        if not exact_border:
            sxy = _box_sum(a_o * t_reg, rp).addcmul_(mt, sa[sh], value=-1.0)
            torch.mul(sxy, inv_std[sh], out=score)
            if penalty is not None:
                score += penalty[sh[1:]]
        else:  # Pearson correlation over the positions inside the image for both patches
            v_o = v_d[z:z + cz + 2 * rp, y:y + cy + 2 * rp, x:x + cx + 2 * rp]
            sxy = _box_sum(a_o * t_reg, rp)
            p1 = a_o * vt_reg
            sx = _box_sum(p1, rp)
            sxx = _box_sum(p1 * a_o, rp)
            st = _box_sum(v_o * t_reg, rp)
            n = _box_sum(v_o * vt_reg, rp)
            sxy = sxy - sx * st / n.clamp(min=1)
            var = (sxx - sx * sx / n.clamp(min=1)).clamp(min=1e-6)
            score = torch.where((n >= 3) & valid_c[sh[1:]], sxy / var.sqrt(), torch.full_like(sxy, -float("inf")))
        torch.gt(score, best, out=better)         # strictly better: the first of equal scores is kept
        torch.maximum(best, score, out=best)
        arg.masked_fill_(better, j)
    return arg.long()


def _border_slabs(near: torch.Tensor, start: Sequence[int], shape: Sequence[int], big_r: int
                  ) -> list[tuple[slice, slice, slice]]:
    """Sub-boxes of a centre box (``near``: its centres that need the exact border search; ``start``: the
    image coordinates of its first voxel) that cover those centres: per axis, the slabs within ``big_r``
    of the low and high image edges."""
    out = []
    cdim = near.shape
    for ax in range(3):
        lo_end = min(cdim[ax], big_r - start[ax])                         # image coord start + c < big_r
        hi_beg = max(0, shape[ax] - big_r - start[ax])                    # image coord >= n - big_r
        for a0, a1 in ((0, lo_end), (hi_beg, cdim[ax])):
            if a1 <= a0:
                continue
            sl = [slice(None)] * 3
            sl[ax] = slice(a0, a1)
            if bool(near[tuple(sl)].any()):
                out.append(tuple(slice(0, d) if i != ax else slice(a0, a1) for i, d in enumerate(cdim)))
    return out
