"""Start the real worker (:func:`MASRefineLib.worker.main`) with the protocol tests' small pipelines added.

``python Testing/worker_launcher.py job.json``: registers every pipeline of ``Testing/worker_pipelines.py`` in
``MASRefineLib.protocol.jobs.PIPELINES`` (as ``worker_pipelines:<name>``) in this process only, then runs the worker. The
library itself runs only its own pipelines: no environment variable or job field adds any.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: the pipelines of worker_pipelines.py a job may name
NAMES = ("slow", "crash", "noisy", "needs_missing_package")


def command(job_path) -> list[str]:
    """The command line that runs ``job_path`` through this launcher (for ``JobRunner(command=...)``)."""
    return [sys.executable, str(Path(__file__).resolve()), str(job_path)]


def register() -> None:
    from MASRefineLib.protocol import jobs
    for name in NAMES:
        jobs.PIPELINES[f"worker_pipelines:{name}"] = f"worker_pipelines:{name}"


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(ROOT)]
    register()
    from MASRefineLib.worker import main
    code = main()
    sys.stderr.flush()
    sys.exit(code)
