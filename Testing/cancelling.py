"""A progress callback for tests of prompt cancellation (kept out of the library: no test helpers in product code)."""
from __future__ import annotations

from MASRefineLib.errors import Cancelled
from MASRefineLib.progress import ProgressCallback, ProgressEvent


def cancel_after(n_events: int) -> ProgressCallback:
    """A callback that raises Cancelled on its n-th call."""
    count = {"n": 0}

    def cb(ev: ProgressEvent) -> None:
        count["n"] += 1
        if count["n"] >= n_events:
            raise Cancelled(f"cancelled during {ev.stage}")
    return cb
