"""Shared pieces of label fusion: sparse per-label posteriors, weighted voting, consensus masks.

Label values are never renumbered: every label a fusion method outputs is a value some warped atlas
holds at that voxel (or, for STAPLE, a value of the atlases' label set). Internally labels are int64
tensors of the original values.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Posteriors:
    """Per-label posterior probabilities on the target grid, stored sparsely.

    Where the atlases agree (``~uncertain``) the posterior is 1 for ``base`` (the consensus label).
    At uncertain voxels the non-zero posteriors are listed as triplets: flat voxel index (into the
    (Z, Y, X) array, C order), label value and probability; the probabilities of one voxel sum to 1.
    This keeps data sets with ~150 labels (IXI) at the memory of a few label maps.
    """
    shape: tuple[int, int, int]
    base: np.ndarray            # (Z, Y, X) uint16: the label with posterior 1 at certain voxels
    uncertain: np.ndarray       # (Z, Y, X) bool
    index: np.ndarray           # (E,) int64 flat voxel indices (uncertain voxels only)
    label: np.ndarray           # (E,) int64 label values
    prob: np.ndarray            # (E,) float32

    @property
    def values(self) -> list[int]:
        """Every label value with a non-zero posterior somewhere (including 0 when present)."""
        v = set(np.unique(self.base[~self.uncertain]).tolist()) | set(np.unique(self.label).tolist())
        return sorted(int(x) for x in v)

    def map(self, value: int) -> np.ndarray:
        """Dense posterior map of one label value: (Z, Y, X) float32 in [0, 1]."""
        out = ((self.base == value) & ~self.uncertain).astype(np.float32)
        sel = self.label == value
        out.reshape(-1)[self.index[sel]] = self.prob[sel]
        return out


class AtlasWeights:
    """Per-atlas fusion weight maps (B, Z, Y, X) float32, held compactly: ``fill`` (1/B, as float32) everywhere but
    at the ``index`` voxels (flat indices into (Z, Y, X), C order), where atlas i's weight is ``values[i]``.

    JLF solves weights only where the atlases disagree (a fraction of the grid) and leaves 1/B elsewhere; a dense
    float32 stack is 4 bytes per voxel and atlas, most of them 1/B (#22). ``w[i]`` is atlas i's dense map (a new
    (Z, Y, X) float32 array, bitwise the dense stack's row), ``np.asarray(w)`` the dense stack, ``len(w)`` B."""

    def __init__(self, shape: tuple[int, int, int], fill: float, index: np.ndarray, values: np.ndarray):
        self.shape3 = tuple(int(s) for s in shape)
        self.fill = np.float32(fill)
        self.index = np.asarray(index, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.float32)          # (B, N)
        if self.values.ndim != 2 or self.values.shape[1] != self.index.shape[0]:
            raise ValueError(f"weights {self.values.shape} do not match {self.index.shape[0]} voxel indices")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.shape3)

    @property
    def nbytes(self) -> int:
        return int(self.index.nbytes + self.values.nbytes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)):
            raise TypeError("AtlasWeights: index with one atlas number (np.asarray(w) gives the dense stack)")
        out = np.full(self.shape3, self.fill, dtype=np.float32)
        out.reshape(-1)[self.index] = self.values[int(i)]
        return out

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.full(self.shape, self.fill, dtype=np.float32)
        out.reshape(len(self), -1)[:, self.index] = self.values
        return out if dtype is None else out.astype(dtype)


def consensus(labels: torch.Tensor | Sequence[torch.Tensor], radius: int = 0) -> torch.Tensor:
    """(Z, Y, X) bool: voxels whose fused label is fixed because every atlas holds the same single label
    value over the whole cube of ``radius`` voxels around them (radius 0: the atlases agree at the voxel).

    ``labels`` is (B, Z, Y, X) of any integer type, or a sequence of B (Z, Y, X) integer tensors (each atlas's
    compact labels as a :class:`~MASRefineLib.warped.WarpedSet` holds them: no (B, ...) stack is made, #22). With
    radius r, methods that may take a label from up to r voxels away (JLF's search) cannot change such a voxel's
    label.
    """
    if not isinstance(labels, torch.Tensor):
        return _consensus_of(list(labels), radius)
    if radius <= 0:
        return (labels == labels[:1]).all(0)
    # max / min over the atlases first, in the labels' own type: no (B, Z, Y, X) float copy (#22);
    # values up to 65535 are exact in float32
    mx = _max_filter(labels.amax(0)[None, None].to(torch.float32), radius)[0, 0]
    mn = -_max_filter(-labels.amin(0)[None, None].to(torch.float32), radius)[0, 0]
    return mx == mn


def _consensus_of(labels: list[torch.Tensor], radius: int) -> torch.Tensor:
    """:func:`consensus` of per-atlas (Z, Y, X) tensors, taken one atlas at a time: the maximum and minimum over
    the atlases are accumulated in int32 (every label value, 0..65535, exact; the atlases may hold different
    compact types), so the result equals the stacked tensor's, bit for bit."""
    if radius <= 0:
        out = torch.ones(labels[0].shape, dtype=torch.bool, device=labels[0].device)
        for x in labels[1:]:
            out &= x == labels[0]
        return out
    mx = labels[0].to(torch.int32, copy=True)
    mn = mx.clone()
    for x in labels[1:]:
        x = x.to(torch.int32)
        torch.maximum(mx, x, out=mx)
        torch.minimum(mn, x, out=mn)
    mx = _max_filter(mx[None, None].to(torch.float32), radius)[0, 0]
    mn = -_max_filter(-mn[None, None].to(torch.float32), radius)[0, 0]
    return mx == mn


def _max_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Cubic max filter of (N, 1, Z, Y, X) as three 1D passes (a cube's max is separable)."""
    k = 2 * radius + 1
    for ks, pd in (((k, 1, 1), (radius, 0, 0)), ((1, k, 1), (0, radius, 0)), ((1, 1, k), (0, 0, radius))):
        x = F.max_pool3d(x, ks, stride=1, padding=pd)
    return x


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Cubic dilation of a (Z, Y, X) bool mask by ``radius`` voxels."""
    if radius <= 0:
        return mask.clone()
    return _max_filter(mask[None, None].float(), radius)[0, 0] > 0


def weighted_vote(labels: torch.Tensor, weights: torch.Tensor, chunk: int = 65536
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted vote per row: ``labels`` (M, B) int64 values, ``weights`` (M, B) >= 0.

    Returns ``(winner (M,), entry_row (E,), entry_label (E,), entry_prob (E,))``: the label with the
    largest total weight (ties: the smallest label value), and the normalised posterior of every
    label present in the row. Rows whose weights are all zero count every atlas equally.
    """
    m, b = labels.shape
    winners, rows, labs, probs = [], [], [], []
    for s in range(0, m, chunk):
        lab = labels[s:s + chunk]
        w = weights[s:s + chunk].to(torch.float64)
        tot = w.sum(1, keepdim=True)
        w = torch.where(tot > 0, w, torch.ones_like(w))
        w = w / w.sum(1, keepdim=True)
        srt, order = lab.sort(dim=1)
        ws = w.gather(1, order)
        eq = srt.unsqueeze(2) == srt.unsqueeze(1)                       # (m, B, B)
        score = (eq.to(ws.dtype) * ws.unsqueeze(1)).sum(2)              # weight of each element's label
        first = torch.ones_like(srt, dtype=torch.bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        masked = torch.where(first, score, torch.full_like(score, -1.0))
        winners.append(srt.gather(1, masked.argmax(1, keepdim=True))[:, 0])  # first max = smallest value
        r, c = first.nonzero(as_tuple=True)
        rows.append(r + s)
        labs.append(srt[r, c])
        probs.append(score[r, c].to(torch.float32))
    if not winners:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e, e, torch.zeros(0)
    return torch.cat(winners), torch.cat(rows), torch.cat(labs), torch.cat(probs)


def vote_fusion(labels: torch.Tensor, weights: torch.Tensor | None = None
                ) -> tuple[np.ndarray, Posteriors, np.ndarray]:
    """Voting fusion, solved only where the atlases disagree.

    ``labels`` (B, Z, Y, X) int64; ``weights`` (B, Z, Y, X) >= 0 or None (plurality vote). Returns the
    fused label map (uint16), the posteriors and the normalised per-atlas weights (B, Z, Y, X) float32.
    """
    b = labels.shape[0]
    shape = tuple(labels.shape[1:])
    agree = consensus(labels)
    unc = ~agree
    fused = labels[0].clone()
    flat_idx = unc.reshape(-1).nonzero()[:, 0]
    lab_rows = labels.reshape(b, -1)[:, flat_idx].T.contiguous()                      # (M, B)
    if weights is None:
        w_rows = torch.ones(lab_rows.shape, dtype=torch.float32)
        wmaps = np.full((b, *shape), 1.0 / b, dtype=np.float32)
    else:
        w = weights.to(torch.float32).clamp(min=0)
        tot = w.sum(0, keepdim=True)
        w = torch.where(tot > 0, w / tot.clamp(min=1e-30), torch.full_like(w, 1.0 / b))
        wmaps = w.cpu().numpy().astype(np.float32)
        w_rows = w.reshape(b, -1)[:, flat_idx].T.contiguous()
    win, rows, labs, probs = weighted_vote(lab_rows.cpu(), w_rows.cpu())
    fused.reshape(-1)[flat_idx] = win.to(fused.device)
    post = Posteriors(shape, fused.cpu().numpy().astype(np.uint16), unc.cpu().numpy(),
                      flat_idx.cpu()[rows].numpy(), labs.numpy(), probs.numpy())
    return fused.cpu().numpy().astype(np.uint16), post, wmaps


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run torch CPU ops with ``n`` intra-op threads inside the block, restoring the setting after.

    Fusion's tensors are many medium-sized element-wise operations; OpenMP threads on those gain little
    and, on a busy machine, spin-wait for each other (measured: 2 threads 7x slower than 1 on 2 shared
    cores). JLF therefore runs its blocks in parallel Python threads, each op single-threaded."""
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield prev
    finally:
        torch.set_num_threads(prev)
