"""Multi-label STAPLE (Warfield et al. 2004; Rohlfing et al. 2004), our own EM in torch.

Not SimpleITK's ``MultiLabelSTAPLE``, whose pitfalls docs/fusion.md lists: labels are compact indices of the
values present (any value 0..65535, memory by the number of labels), the EM runs on unique rows of atlas
decisions with int64 counts and float64 accumulation (exact beyond 2^24 voxels), ties go to the smallest label
value. As ITK: fixed priors (the labels' frequencies), confusion matrices started from the plurality vote, and a
stop when no confusion-matrix entry changes by more than ``tol``; also when the log-likelihood gains less than
``ll_tol`` relative (rare labels' columns keep moving after the map has settled), or after ``max_iter``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..progress import ProgressCallback, report
from .common import Posteriors


def staple_em(rows: torch.Tensor, counts: torch.Tensor, n_labels: int, max_iter: int = 50, tol: float = 1e-5,
              init: torch.Tensor | None = None, chunk: int = 16384, ll_tol: float = 1e-5,
              progress: ProgressCallback | None = None, stage: str = "fuse") -> tuple[torch.Tensor, torch.Tensor, int]:
    """EM on unique decision rows.

    ``rows`` (U, B) int64 compact label indices (0..n_labels-1) chosen by each of B raters; ``counts`` (U,)
    int64 voxels having that row. Label priors: the relative frequencies of all decisions. ``init`` (U, L): initial posteriors (default: the rows' vote fractions).
    Returns (posteriors W (U, L) float64, confusion matrices theta (B, L, L) with
    ``theta[i, d, k] = P(rater i says d | truth k)``, iterations).
    """
    u, b = rows.shape
    lcount = int(n_labels)
    c = counts.to(torch.float64)
    prior = torch.zeros(lcount, dtype=torch.float64)
    for i in range(b):
        prior.index_add_(0, rows[:, i], c)
    prior = prior / prior.sum()
    logp = prior.clamp(min=1e-300).log()

    flat_rows = rows + torch.arange(b)[None, :] * lcount                  # (U, B) rows of num viewed (B*L, L)

    def m_step(w_of) -> torch.Tensor:
        num = torch.zeros((b * lcount, lcount), dtype=torch.float64)
        den = torch.zeros(lcount, dtype=torch.float64)
        for s in range(0, u, chunk):
            cw = c[s:s + chunk, None] * w_of(s)
            den += cw.sum(0)
            num.index_add_(0, flat_rows[s:s + chunk].T.reshape(-1), cw.repeat(b, 1))
        th = num.view(b, lcount, lcount) / den.clamp(min=1e-300)[None, None, :]
        empty = den <= 0
        if empty.any():  # a label nobody can be: keep an identity column
            th[:, :, empty] = torch.eye(lcount, dtype=torch.float64)[:, empty][None]
        return th

    def e_step(theta: torch.Tensor, s: int, ll: list | None = None) -> torch.Tensor:
        r = rows[s:s + chunk]
        lt = theta.clamp(min=1e-300).log()
        acc = logp[None, :].expand(r.shape[0], -1).clone()                 # (m, L)
        for i in range(b):
            acc += lt[i][r[:, i]]
        if ll is not None:
            ll.append(float((torch.logsumexp(acc, 1) * c[s:s + chunk]).sum()))
        return torch.softmax(acc, dim=1)

    if init is None:
        def init_w(s: int) -> torch.Tensor:
            r = rows[s:s + chunk]
            w = torch.zeros((r.shape[0], lcount), dtype=torch.float64)
            w.scatter_add_(1, r, torch.ones(r.shape, dtype=torch.float64))
            return w / b
    else:
        def init_w(s: int) -> torch.Tensor:
            return init[s:s + chunk].to(torch.float64)
    theta = m_step(init_w)
    it = 0
    prev_ll = None
    for it in range(1, max_iter + 1):
        report(progress, stage, it / max_iter, f"STAPLE iteration {it}")
        ll: list[float] = []
        new = m_step(lambda s: e_step(theta, s, ll))
        delta = float((new - theta).abs().max())
        theta = new
        total = sum(ll)
        # converged: no confusion entry moves by tol, or the likelihood (monotone under EM) stalls
        if delta < tol or (prev_ll is not None and abs(total - prev_ll) <= ll_tol * abs(total)):
            break
        prev_ll = total
    w = torch.cat([e_step(theta, s) for s in range(0, u, chunk)]) if u else torch.zeros((0, lcount), dtype=torch.float64)
    return w, theta, it


def staple_fusion(labels: torch.Tensor, max_iter: int = 50, tol: float = 1e-5, keep: float = 1e-3,
                  progress: ProgressCallback | None = None, stage: str = "fuse"
                  ) -> tuple[np.ndarray, Posteriors, np.ndarray, dict]:
    """Multi-label STAPLE of ``labels`` (B, Z, Y, X) int64 values.

    Returns (fused uint16, posteriors (entries below ``keep`` dropped and the rest renormalised),
    per-atlas weights (B, Z, Y, X): at each voxel the posterior probability that atlas i's label is the
    true one, normalised over atlases), info with the confusion matrices' diagonals (sensitivities).
    """
    labels = labels.cpu()
    b = labels.shape[0]
    shape = tuple(int(s) for s in labels.shape[1:])
    values = torch.unique(labels)                                  # the only labels that can come out
    lcount = int(values.numel())
    idx = torch.searchsorted(values, labels.reshape(b, -1))        # (B, N) compact
    agree = (idx == idx[:1]).all(0)
    cons_counts = torch.bincount(idx[0][agree], minlength=lcount)
    cons_labels = cons_counts.nonzero()[:, 0]
    dis = (~agree).nonzero()[:, 0]
    if dis.numel():
        uniq, inverse, ucounts = torch.unique(idx[:, dis].T, dim=0, return_inverse=True, return_counts=True)
    else:
        uniq = torch.zeros((0, b), dtype=torch.int64)
        inverse = torch.zeros(0, dtype=torch.int64)
        ucounts = torch.zeros(0, dtype=torch.int64)
    rows = torch.cat([cons_labels[:, None].expand(-1, b), uniq])
    counts = torch.cat([cons_counts[cons_labels], ucounts])
    w, theta, iters = staple_em(rows, counts, lcount, max_iter=max_iter, tol=tol, progress=progress, stage=stage)

    # posterior rows -> voxels
    row_of = torch.empty(idx.shape[1], dtype=torch.int64)
    row_of[dis] = inverse + cons_labels.numel()
    cons_row = torch.full((lcount,), -1, dtype=torch.int64)
    cons_row[cons_labels] = torch.arange(cons_labels.numel())
    row_of[agree] = cons_row[idx[0][agree]]
    win_row = w.argmax(1)                                           # first max = smallest value
    fused = values[win_row[row_of]].reshape(shape)

    # sparse posteriors: a row is "certain" when it is one-hot to within `keep`
    wk = torch.where(w >= keep, w, torch.zeros_like(w))
    wk[torch.arange(w.shape[0]), win_row] = w[torch.arange(w.shape[0]), win_row]
    wk = wk / wk.sum(1, keepdim=True)
    certain_row = (wk.max(1).values >= 1.0 - 1e-9)
    unc_flat = ~certain_row[row_of]
    vox = unc_flat.nonzero()[:, 0]
    r_nz, l_nz = (wk > 0).nonzero(as_tuple=True)
    # entries per uncertain voxel: expand its row's non-zeros
    starts = torch.searchsorted(r_nz, torch.arange(w.shape[0]))
    ends = torch.searchsorted(r_nz, torch.arange(w.shape[0]), right=True)
    vr = row_of[vox]
    n_per = (ends - starts)[vr]
    rep_vox = torch.repeat_interleave(vox, n_per)
    offs = torch.arange(int(n_per.sum())) - torch.repeat_interleave(torch.cumsum(n_per, 0) - n_per, n_per)
    ent = torch.repeat_interleave(starts[vr], n_per) + offs
    post = Posteriors(shape, fused.numpy().astype(np.uint16), unc_flat.reshape(shape).numpy(), rep_vox.numpy(),
                      values[l_nz[ent]].numpy(), wk[r_nz[ent], l_nz[ent]].to(torch.float32).numpy())

    # per-atlas weights: P(truth = atlas i's label | decisions), normalised over atlases
    pc = torch.gather(w, 1, rows)                                  # (R, B)
    tot = pc.sum(1, keepdim=True)
    pc = torch.where(tot > 1e-300, pc / tot.clamp(min=1e-300), torch.full_like(pc, 1.0 / b)).to(torch.float32)
    weights = pc[row_of].T.reshape(b, *shape).numpy()
    sens = {int(values[k]): [float(theta[i, k, k]) for i in range(b)] for k in range(lcount)}
    info = {"iterations": iters, "unique_rows": int(rows.shape[0]), "labels": [int(v) for v in values],
            "sensitivity": sens, "prior": "label frequencies", "uncertain_voxels": int(unc_flat.sum())}
    return fused.numpy().astype(np.uint16), post, weights, info
