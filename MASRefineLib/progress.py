"""Progress reporting and cancellation for long work.

Long-running functions take ``progress: ProgressCallback | None``. They call it with a
:class:`ProgressEvent`; the callback may raise :class:`~MASRefineLib.errors.Cancelled` to stop the
work (the worker does this when its cancel file appears). ``fraction`` is 0..1 within ``stage``.
The terminal uses :func:`tqdm_progress`; the Slicer module receives the same events as JSON lines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class ProgressEvent:
    stage: str                      # e.g. "register", "refine", "fuse", "train-segmenter"
    fraction: float                 # 0..1 within the stage
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # e.g. per-atlas loss terms


ProgressCallback = Callable[[ProgressEvent], None]


def report(progress: Optional[ProgressCallback], stage: str, fraction: float, message: str = "", **data: Any) -> None:
    """Send one event if there is a callback (it may raise Cancelled)."""
    if progress is not None:
        progress(ProgressEvent(stage, float(min(max(fraction, 0.0), 1.0)), message, data))


def scaled(progress: Optional[ProgressCallback], start: float, end: float) -> Optional[ProgressCallback]:
    """A callback that maps a sub-task's 0..1 onto start..end of the parent's fraction."""
    if progress is None:
        return None

    def cb(ev: ProgressEvent) -> None:
        progress(ProgressEvent(ev.stage, start + (end - start) * ev.fraction, ev.message, ev.data))
    return cb


class tqdm_progress:
    """A terminal progress callback: one tqdm bar per stage (context manager)."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.bar = None
        self.stage = None

    def __call__(self, ev: ProgressEvent) -> None:
        from tqdm import tqdm
        if ev.stage != self.stage:
            self.close()
            self.stage = ev.stage
            self.bar = tqdm(total=1000, desc=ev.stage, disable=self.disable, leave=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        self.bar.n = int(round(ev.fraction * 1000))
        if ev.message:
            self.bar.set_postfix_str(ev.message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
