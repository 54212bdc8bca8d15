"""Run a job in a background worker process and collect its events (pure Python, no Qt).

::

    runner = JobRunner(job_path).start()          # python -m MASRefineLib.worker job_path
    while runner.running:                          # e.g. from a qt.QTimer in Slicer
        for ev in runner.poll():                   # non-blocking; a list of event dicts
            ...
    runner.cancel(grace_s=10)                      # writes the cancel file; kills after the grace period
    rc = runner.wait()                             # 0 done, 1 error, 2 invalid job, 3 cancelled

Events are the worker's protocol events (see :mod:`MASRefineLib.worker`) plus these, made here:

- ``{"event": "output", "stream": "stdout"|"stderr", "line": str}``: any other line the process
  printed (a line on stdout that is not a well-formed event, or anything on stderr);
- ``{"event": "error", "kind": "crash", ...}``: the process ended with a failure code without
  reporting an error (killed, segfault, ...); ``message`` quotes the end of its stderr;
- ``{"event": "exit", "returncode": int, "status": "done"|"error"|"invalid"|"cancelled"}``: always the
  last event, after every line of output has been delivered.

The worker runs in a new process group (POSIX: a new session; Windows: ``CREATE_NEW_PROCESS_GROUP``)
so that :meth:`JobRunner.kill` ends it with every process it started. Its stdin is a pipe that stays
open while this runner lives: if the caller dies, the worker sees end-of-file and stops.
"""
from __future__ import annotations

import atexit
import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence

from .protocol.events import EVENT_PREFIX, EXIT_DONE, STATUS

_LIVE: "weakref.WeakSet[JobRunner]" = weakref.WeakSet()


def parse_line(line: str, stream: str = "stdout") -> dict[str, Any]:
    """One line of worker output as an event dict (anything that is not a valid event is ``output``)."""
    line = line.rstrip("\r\n")
    if stream == "stdout" and line.startswith(EVENT_PREFIX):
        from .errors import MASRefineError
        from .jsonio import parse_json
        try:
            ev = parse_json(line[len(EVENT_PREFIX):], "worker event")
        except MASRefineError:  # not JSON, nested too deeply, ...: an output line
            ev = None
        if isinstance(ev, dict) and isinstance(ev.get("event"), str):
            return ev
    return {"event": "output", "stream": stream, "line": line}


def worker_command(job_path: str | os.PathLike, python: str | None = None) -> list[str]:
    """The command line of a worker: ``[python, -m, MASRefineLib.worker, job_path]``
    (``python`` defaults to this interpreter; in Slicer pass the path of ``PythonSlicer``)."""
    return [python or sys.executable, "-m", f"{__package__}.worker", str(job_path)]


class JobRunner:
    """One background worker process and its event stream."""

    def __init__(self, job_path: str | os.PathLike | None = None, python: str | None = None,
                 env: dict[str, str] | None = None, command: Sequence[str] | None = None):
        """``job_path``: the job.json to run (its ``cancel_file`` is read from it, and used only
        when it lies inside the job's ``output_dir``: :func:`MASRefineLib.protocol.jobs.cancel_file_inside`; the worker
        refuses such a job as invalid). ``env``: extra environment variables for the worker. ``command``
        replaces the whole command line (tests, other front ends)."""
        if job_path is None and command is None:
            raise ValueError("job_path or command is required")
        self.job_path = Path(job_path) if job_path is not None else None
        self.command = list(command) if command is not None else worker_command(self.job_path, python)
        self.extra_env = dict(env or {})
        cancel_file = self._job_cancel_file(self.job_path) if self.job_path is not None else None
        self.cancel_file = Path(cancel_file) if cancel_file else None
        self.proc: Optional[subprocess.Popen] = None
        self.queue: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.returncode: Optional[int] = None
        self.status: Optional[str] = None
        self.result: Optional[dict[str, Any]] = None
        self.error: Optional[dict[str, Any]] = None
        self.cancel_requested = False
        self._readers: list[threading.Thread] = []
        self._finished = threading.Event()
        self._kill_timer: Optional[threading.Timer] = None
        self._saw_terminal = False

    @staticmethod
    def _job_cancel_file(job_path: Path) -> Optional[str]:
        """The job file's ``cancel_file`` when it lies inside its ``output_dir``, else None (an unreadable or
        invalid job: the worker answers it with ``invalid-job``; nothing outside the output folder is touched)."""
        from .errors import MASRefineError
        from .protocol.jobs import cancel_file_inside
        from .jsonio import read_json
        try:
            job = read_json(job_path, "job file")
        except MASRefineError:
            return None
        if not isinstance(job, dict) or not cancel_file_inside(job.get("cancel_file"), job.get("output_dir")):
            return None
        return job["cancel_file"]

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> "JobRunner":
        if self.proc is not None:
            raise RuntimeError("this runner was already started")
        if self.cancel_file is not None and self.cancel_file.exists():
            self.cancel_file.unlink()  # a stale cancel file would stop the new run at once
        env = dict(os.environ)
        pkg_parent = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", "TQDM_DISABLE": "1"})
        env.update(self.extra_env)
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, **kwargs)
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            t = threading.Thread(target=self._read, args=(stream, name), name=f"runner-{name}", daemon=True)
            t.start()
            self._readers.append(t)
        threading.Thread(target=self._reap, name="runner-reaper", daemon=True).start()
        _LIVE.add(self)
        return self

    def _read(self, stream, name: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            ev = parse_line(line, name)
            if name == "stderr":
                self.stderr_tail.append(ev["line"])
            et = ev["event"]
            if et == "result":
                self.result = ev
            elif et == "error":
                self.error = ev
            if et in ("result", "error", "cancelled"):
                self._saw_terminal = True
            self.queue.put(ev)
        stream.close()

    def _reap(self) -> None:
        rc = self.proc.wait()
        for t in self._readers:
            t.join()
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if self.cancel_requested and rc != EXIT_DONE:
            status = "cancelled"
        else:
            status = STATUS.get(rc, "error")
        if rc != EXIT_DONE and not self._saw_terminal:
            if status == "cancelled":
                ev = {"event": "cancelled", "reason": "killed", "message": "the worker was stopped"}
            else:
                tail = " | ".join(l for l in list(self.stderr_tail)[-3:] if l.strip())
                how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                ev = {"event": "error", "kind": "crash", "message": f"the worker {how} without reporting an error"
                      + (f"; last output: {tail}" if tail else "")}
                self.error = ev
            ev["time"] = round(time.time(), 3)
            self.queue.put(ev)
        self.returncode, self.status = rc, status
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        self.queue.put({"event": "exit", "returncode": rc, "status": status, "time": round(time.time(), 3)})
        self._finished.set()
        _LIVE.discard(self)

    # -- use -------------------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        """True from start until the ``exit`` event has been queued."""
        return self.proc is not None and not self._finished.is_set()

    def poll(self) -> list[dict[str, Any]]:
        """Every event that arrived since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def events(self, timeout: float | None = None):
        """Iterate over events as they arrive, until ``exit`` (or ``timeout`` seconds, then TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("the worker did not finish in time")
            try:
                ev = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            yield ev
            if ev.get("event") == "exit":
                return

    def wait(self, timeout: float | None = None) -> Optional[int]:
        """Wait until the process has exited and all its output is read; the return code (``None``
        on timeout). Events stay queued for :meth:`poll`."""
        if self.proc is None:
            raise RuntimeError("not started")
        self._finished.wait(timeout)
        return self.returncode if self._finished.is_set() else None

    def cancel(self, grace_s: float = 10.0) -> None:
        """Ask the worker to stop (writes the cancel file); kill its process group if it is still
        running after ``grace_s`` seconds. Returns at once."""
        if self.proc is None or self._finished.is_set():
            return
        self.cancel_requested = True
        if self.cancel_file is not None:
            try:
                self.cancel_file.parent.mkdir(parents=True, exist_ok=True)
                self.cancel_file.write_text("cancel\n")
            except OSError:
                pass
        try:
            if self.proc.stdin:
                self.proc.stdin.write(b"cancel\n")
                self.proc.stdin.flush()
        except (OSError, ValueError):
            pass
        if self._kill_timer is None:
            self._kill_timer = threading.Timer(max(0.0, grace_s), self.kill)
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def kill(self) -> None:
        """End the worker and every process in its group now."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True)
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
        try:
            self.proc.kill()
        except OSError:
            pass

    def close(self) -> None:
        """Kill the worker if it still runs and wait for it (use on scene close / application exit)."""
        if self.running:
            self.kill()
            self.wait(10)


@atexit.register
def _kill_live_workers() -> None:  # pragma: no cover - exercised at interpreter exit
    for r in list(_LIVE):
        try:
            r.kill()
        except Exception:
            pass
