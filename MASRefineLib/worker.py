"""The background worker: ``python -m MASRefineLib.worker job.json`` (``PythonSlicer -m ...`` in Slicer).

Protocol (what :mod:`MASRefineLib.runner` and the Slicer module rely on):

- **Events** are printed on stdout, one per line, as ``MASREFINE-EVENT {json}``. Every event has
  ``"event"`` and ``"time"`` (seconds since the epoch). The events:

  ========== ===================================================================================
  started    ``pid``, ``job`` (path), ``pipeline``, ``output_dir``, ``version``
  stage      ``stage``, ``message``: a new stage began (e.g. ``register``, ``refine``, ``fuse``)
  progress   ``stage``, ``fraction`` (0..1 within the stage), ``overall`` (0..1 of the whole job, when
             the pipeline knows it), ``message``, ``data`` (e.g. per-atlas loss terms)
  log        ``level`` (``info``/``debug``), ``message``
  warning    ``message``
  result     ``output_dir``, ``manifest`` (path of manifest.json) and the pipeline's summary fields
  error      ``message`` (one line), ``kind`` (``invalid-job``, ``missing-dependency``, ``input``,
             ``internal``), ``problems`` (for an invalid job), ``traceback`` (internal errors)
  cancelled  ``message``, ``reason`` (``cancel-file``, ``parent-exited``, ``signal``)
  ========== ===================================================================================

  Only events go to stdout: the worker moves file descriptor 1 onto stderr before running the
  pipeline, so prints from any library end up on stderr.
- **Exit codes**: 0 done, 1 error, 2 invalid job or missing dependency (the message says what to
  do), 3 cancelled.
- **Cancel**: the worker stops at the pipeline's next progress report (between atlases and every few
  iterations) once the job's ``cancel_file`` exists (or a line ``cancel`` arrives on stdin, or
  SIGTERM). Outputs written so far stay, but ``manifest.json`` is written only by a finished job.
- **Parent death**: when stdin is a pipe (as the runner starts it), the worker treats end-of-file on
  stdin as "the caller is gone": it cancels, and exits hard after a few seconds if the pipeline does
  not reach a progress report by then.

The pipeline is a function ``fn(job: dict, progress: ProgressCallback) -> dict`` named by the job's
``pipeline`` field: ``"segment"`` -> :func:`MASRefineLib.pipeline.run_job`, ``"batch"`` -> :func:`MASRefineLib.batch.run_job`
(a cohort on Dask: progress events of stage ``batch`` with ``data`` done / failed / running / skipped / total /
eta_s; its ``result`` names ``summary``, ``cohort`` and ``counts``), ``"atlas"`` -> :func:`MASRefineLib.atlasbuild.run_job`
(an atlas set from segmented cases, new or added to; its ``result`` names ``atlas_dir``, ``added``, ``notes``);
nothing else is imported (:data:`MASRefineLib.protocol.jobs.PIPELINES`, :func:`MASRefineLib.protocol.jobs.pipeline_target`).
- **Unreadable jobs**: a job file that is missing, not UTF-8, not JSON (or pathological: nested too deeply,
  numbers beyond the parser) or not a valid job is answered with one ``error`` event of kind ``invalid-job``
  and exit code 2, before anything is written.

- **Output folder**: the ``segment`` pipeline checks ``output_dir`` like the command line's ``--out``
  (:func:`MASRefineLib.outputs.prepare_output_dir`, called by :func:`MASRefineLib.pipeline.segment`): new, or an
  earlier ``segment`` output, and apart from the atlas set and its image/label folders; otherwise an ``input`` error.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .protocol.events import EVENT_PREFIX, EXIT_CANCELLED, EXIT_DONE, EXIT_ERROR, EXIT_INVALID  # noqa: F401 (the wire protocol)

PARENT_GONE_GRACE_S = 5.0
PROGRESS_MIN_INTERVAL_S = 0.1

# what to tell a user for each importable dependency (module name -> how to get it)
DEPENDENCIES: dict[str, str] = {
    "numpy": "pip install numpy",
    "scipy": "pip install scipy",
    "SimpleITK": "pip install SimpleITK",
    "torch": "pip install torch (in 3D Slicer: install the PyTorch extension and click 'Install PyTorch')",
    "nrrd": "pip install pynrrd",
    "slicerio": "pip install slicerio",
    "safetensors": "pip install safetensors",
    "monai": "pip install monai",
    "tqdm": "pip install tqdm",
    "matplotlib": "pip install matplotlib",
    "dask": "pip install 'dask[distributed]' bokeh",
    "distributed": "pip install 'dask[distributed]' bokeh",
}
CORE_DEPENDENCIES = ("numpy", "scipy", "SimpleITK", "torch", "nrrd", "slicerio")


def install_hint(module: str) -> str:
    top = (module or "").split(".")[0]
    return DEPENDENCIES.get(top, f"pip install {top}")


def missing_dependencies(modules=CORE_DEPENDENCIES) -> list[str]:
    """Names of the given modules that cannot be imported."""
    import importlib.util
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _json_default(o: Any):
    """Events never fail on an odd value: the project's encoder, else its repr."""
    from .jsonio import json_default
    try:
        return json_default(o)
    except TypeError:
        return repr(o)


class EventWriter:
    """Writes protocol events to a private copy of the original stdout (thread-safe)."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()
        self.broken = False

    def emit(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            line = EVENT_PREFIX + json.dumps(rec, default=_json_default, allow_nan=False) + "\n"
        except ValueError:  # NaN/inf in data: write them as null
            line = EVENT_PREFIX + json.dumps(_nan_to_none(rec), default=_json_default) + "\n"
        with self.lock:
            if self.broken:
                return
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True  # the reader is gone; keep working towards a clean stop


def _nan_to_none(o):
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def _private_stdout():
    """Duplicate fd 1 for events and point fd 1 (and sys.stdout) at stderr, so that nothing else
    (prints, C libraries) can write into the event stream."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1, newline="\n")


class _EventLogHandler(logging.Handler):
    def __init__(self, events: EventWriter):
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover
            msg = str(record.msg)
        if record.levelno >= logging.WARNING:
            self.events.emit("warning", message=msg, source=record.name)
        else:
            self.events.emit("log", level=record.levelname.lower(), message=msg, source=record.name)


def load_pipeline(name: str) -> Callable[..., dict]:
    """The pipeline function for a job's ``pipeline`` field (only what :func:`MASRefineLib.protocol.jobs.pipeline_target`
    allows is imported; anything else is a ValueError)."""
    from .errors import MASRefineError
    from .protocol.jobs import pipeline_target
    try:
        target = pipeline_target(name)
    except MASRefineError as e:
        raise ValueError(str(e)) from None
    mod, func = target.split(":", 1)
    fn = getattr(importlib.import_module(mod), func, None)
    if not callable(fn):
        raise ValueError(f"pipeline {target!r}: {mod} has no function {func!r}")
    return fn


class Worker:
    """Runs one job with the protocol's events, cancellation and exit codes (see the module doc)."""

    def __init__(self, job_path: str | os.PathLike | None, events: EventWriter, watch_stdin: bool = False):
        self.job_path = Path(job_path) if job_path is not None else None  # None: a job given in memory (execute)
        self.events = events
        self.watch_stdin = watch_stdin
        self.stop = threading.Event()
        self.stop_reason: Optional[str] = None
        self.cancel_file: Optional[str] = None
        self._stage: Optional[str] = None
        self._last_progress = 0.0

    # -- cancellation -----------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    def cancelled(self) -> bool:
        if self.stop.is_set():
            return True
        if self.cancel_file and os.path.exists(self.cancel_file):
            self.request_stop("cancel-file")
            return True
        return False

    def _stdin_watcher(self) -> None:
        # os.read on the raw descriptor: a daemon thread blocked in a buffered read would hold the
        # buffer's lock and abort the interpreter at shutdown
        try:
            fd = sys.stdin.fileno()
            pending = b""
            while True:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip().lower() == b"cancel":
                        self.request_stop("cancel-file")
        except (OSError, ValueError, AttributeError):
            pass
        # end of file: the caller closed our stdin or died
        self.request_stop("parent-exited")
        time.sleep(PARENT_GONE_GRACE_S)
        os._exit(EXIT_CANCELLED)  # the pipeline did not stop at a progress report in time

    # -- progress ------------------------------------------------------------------------------
    def progress(self, ev) -> None:
        """The pipeline's progress callback: events out, Cancelled in."""
        from .errors import Cancelled
        if self.cancelled():
            raise Cancelled(f"cancelled ({self.stop_reason}) during {ev.stage}")
        now = time.monotonic()
        data = dict(ev.data or {})
        overall = data.pop("overall", None)
        if ev.stage != self._stage:
            self._stage = ev.stage
            self.events.emit("stage", stage=ev.stage, message=ev.message)
            self._last_progress = 0.0
        if now - self._last_progress >= PROGRESS_MIN_INTERVAL_S or ev.fraction >= 1.0:
            self._last_progress = now
            fields: dict[str, Any] = {"stage": ev.stage, "fraction": round(float(ev.fraction), 4), "message": ev.message}
            if overall is not None:
                fields["overall"] = round(float(overall), 4)
            if data:
                fields["data"] = data
            self.events.emit("progress", **fields)

    # -- run -----------------------------------------------------------------------------------
    def _missing(self, names: list[str]) -> int:
        """The ``missing-dependency`` error event for ``names`` (the first one's install hint); exit code 2."""
        self.events.emit("error", kind="missing-dependency",
                         message=f"missing Python package {names[0]}: {install_hint(names[0])}", missing=names)
        return EXIT_INVALID

    def run(self) -> int:
        """Read, check and run the job file (see the module doc)."""
        from .errors import MASRefineError
        from .protocol.jobs import read_job, validate_job

        try:
            job = read_job(self.job_path)
        except MASRefineError as e:
            self.events.emit("error", kind="invalid-job", message=str(e))
            return EXIT_INVALID
        try:
            problems = validate_job(job)
        except (RecursionError, ValueError, TypeError) as e:  # values no check foresaw: still an invalid job
            problems = [f"cannot be checked ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
        if problems:
            self.events.emit("error", kind="invalid-job", message=f"{self.job_path}: {problems[0]}", problems=problems)
            return EXIT_INVALID
        missing = missing_dependencies()
        if missing:
            return self._missing(missing)
        name = job.get("pipeline", "segment")
        try:
            fn = load_pipeline(name)
        except ModuleNotFoundError as e:
            return self._missing([e.name])
        except (ImportError, ValueError) as e:
            self.events.emit("error", kind="invalid-job", message=f"{self.job_path}: pipeline {name!r}: {e}")
            return EXIT_INVALID
        return self.execute(fn, job, name)

    def execute(self, fn: Callable[..., dict], job: dict[str, Any], name: str) -> int:
        """Run ``fn(job, progress)`` with the protocol's ``started``/``progress``/``result``/``error``/``cancelled``
        events, cancellation (``job["cancel_file"]`` when given, stdin, SIGTERM) and exit codes; ``job`` holds at
        least ``output_dir``. :meth:`run` calls it for a job file; :func:`run_function` for an in-library caller."""
        from .errors import Cancelled, MASRefineError
        from . import __version__

        self.cancel_file = job.get("cancel_file")
        if self.watch_stdin:
            threading.Thread(target=self._stdin_watcher, name="stdin-watcher", daemon=True).start()
        self.events.emit("started", pid=os.getpid(), job=str(self.job_path.resolve()) if self.job_path else None,
                         pipeline=name, output_dir=job["output_dir"], version=__version__)
        try:
            if self.cancelled():
                raise Cancelled("cancelled before the job started")
            result = fn(job, progress=self.progress) or {}
            self.events.emit("result", **{"output_dir": job["output_dir"], **result})
            return EXIT_DONE
        except (Cancelled, KeyboardInterrupt) as e:
            reason = self.stop_reason or ("signal" if isinstance(e, KeyboardInterrupt) else "cancel-file")
            self.events.emit("cancelled", reason=reason, message=str(e) or "cancelled")
            return EXIT_CANCELLED
        except MASRefineError as e:
            self.events.emit("error", kind="input", message=str(e))
            return EXIT_ERROR
        except ModuleNotFoundError as e:
            return self._missing([e.name])
        except MemoryError:
            self.events.emit("error", kind="internal", message="out of memory (try a smaller preset, fewer atlases "
                             "or --device cpu)", traceback=traceback.format_exc())
            return EXIT_ERROR
        except Exception as e:  # noqa: BLE001 -- everything else is an internal error with its traceback
            msg = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
            self.events.emit("error", kind="internal", message=msg, traceback=traceback.format_exc())
            return EXIT_ERROR


def _stdin_is_pipe() -> bool:
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m MASRefineLib.worker",
                                 description="Run a MASRefine job.json, printing JSON-lines events on stdout.")
    ap.add_argument("job", help="path of job.json")
    ap.add_argument("--watch-stdin", choices=("auto", "yes", "no"), default="auto",
                    help="exit when stdin reaches end of file (auto: when stdin is a pipe, as the runner starts it)")
    args = ap.parse_args(argv)
    return _serve(args.job, args.watch_stdin, lambda worker: worker.run())


def run_function(fn: Callable[..., dict], job: dict[str, Any], name: str, watch_stdin: str = "auto") -> int:
    """This process as a worker for ``fn(job, progress)`` without a job file: the same events on stdout, cancel
    (stdin ``cancel`` line or end of file, SIGTERM, ``job["cancel_file"]``), errors and exit codes as
    :func:`main` (``python -m MASRefineLib.sampledata --events``, which the Slicer module runs)."""
    return _serve(None, watch_stdin, lambda worker: worker.execute(fn, job, name))


def _serve(job_path: str | None, watch_stdin: str, action: Callable[[Worker], int]) -> int:
    """The worker process around ``action``: private event stdout, log records as events, SIGTERM as cancel."""
    events = EventWriter(_private_stdout())
    watch = watch_stdin == "yes" or (watch_stdin == "auto" and _stdin_is_pipe())
    worker = Worker(job_path, events, watch_stdin=watch)

    handler = _EventLogHandler(events)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    if hasattr(signal, "SIGTERM"):
        try:
            signal.signal(signal.SIGTERM, lambda *_: worker.request_stop("signal"))
        except ValueError:  # pragma: no cover - not the main thread
            pass
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return action(worker)
    except KeyboardInterrupt:  # Ctrl-C while the job is read or checked, before the pipeline's own handler
        events.emit("cancelled", reason="signal", message="cancelled before the job started")
        return EXIT_CANCELLED
    finally:
        root.removeHandler(handler)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    sys.exit(code)
