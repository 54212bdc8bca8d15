"""Volume Dice for the benchmarks' fast per-atlas tables, on one label convention: the reference's labels.

The pipeline tables use :func:`MASRefineLib.metrics.evaluate` (distances too); the registration, refinement and
fusion tables need only volume Dice of many warped atlases, which bincounts give in one pass.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Volume Dice per label value of ``labels`` (default: every non-zero value of ``ref``, the reference's
    labels); a label absent from both maps is left out, one absent from ``pred`` only scores 0."""
    pred, ref = np.asarray(pred).astype(np.int64), np.asarray(ref).astype(np.int64)
    labels = sorted(set(np.unique(ref).tolist()) - {0}) if labels is None else [int(v) for v in labels]
    n = int(max(pred.max(), ref.max(), max(labels, default=0))) + 1
    inter = np.bincount(ref[pred == ref].ravel(), minlength=n)
    sp = np.bincount(pred.ravel(), minlength=n)
    sr = np.bincount(ref.ravel(), minlength=n)
    return {v: float(2 * inter[v] / (sp[v] + sr[v])) for v in labels if sp[v] + sr[v] > 0}


def summarize(per_label: Mapping[int, float], groups: Mapping[str, Iterable[int]] | None, all_key: str = "all") -> dict[str, float]:
    """Mean Dice over all labels (``all_key``) and over each group's labels (NaN for a group with none)."""
    out = {all_key: float(np.mean(list(per_label.values())))}
    for g, vals in (groups or {}).items():
        vs = [per_label[v] for v in vals if v in per_label]
        out[g] = float(np.mean(vs)) if vs else float("nan")
    return out
