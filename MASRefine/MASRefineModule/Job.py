"""Background runs: the job handle the logic returns, and the guards that stop workers with the scene."""
import logging
import os
import time
from typing import Callable, Optional

import qt

import slicer
from slicer.i18n import tr as _

POLL_INTERVAL_MS = 200

# Kept across Slicer's Reload, which re-executes this file (MASRefineWidget.onReload reloads the package)
# before calling the old widget's cleanup(): fresh values would orphan running workers, forget the run
# folders to remove, and install the scene-close guard a second time.
activeJobs = globals().get("activeJobs", [])
jobGuardsInstalled = globals().get("jobGuardsInstalled", False)
# run folders ("delete when the scene closes") removed at scene close or application exit
runsToRemove = globals().get("runsToRemove", [])


def stopJobs(sceneOnly: bool = False) -> None:
    """Stop running workers at once: every one, or (``sceneOnly``) those of the scene (``job.stopWithScene``:
    runs with a run folder, not the installer or the sample)."""
    for job in list(activeJobs):
        if job.stopWithScene or not sceneOnly:
            job.stop()


def stopSceneJobs(*args) -> None:
    """At scene close (StartCloseEvent): stop the runs' workers, then remove the run folders marked "delete
    when the scene closes" (:func:`removeRunsOnClose`). An installation or the sample goes on: killing pip
    midway could leave Slicer's Python half-installed."""
    stopJobs(sceneOnly=True)
    removeRunsOnClose()


def stopAllJobs(*args) -> None:
    """At application exit (aboutToQuit): stop every running worker, then remove the run folders marked
    "delete when the scene closes"."""
    stopJobs()
    removeRunsOnClose()


def removeOnClose(runDir: str) -> None:
    """Remove this run folder when the scene closes or the application quits."""
    installJobGuards()
    runsToRemove.append(str(runDir))


def removeRunsOnClose() -> None:
    """Remove the run folders marked by :func:`removeOnClose`, after ending a worker still writing there.
    A folder that cannot be removed stays listed (tried again at the next close) and is logged."""
    if not runsToRemove:
        return
    from MASRefineLib import runs

    for job in list(activeJobs):
        if job.outDir in runsToRemove:
            job.stop()
            job.runner.close()  # kills its process group and waits for it
    for folder in list(runsToRemove):
        try:
            runs.remove_run(folder)
            runsToRemove.remove(folder)
        except Exception as e:
            logging.warning(f"MASRefine: {e}")


def installJobGuards() -> None:
    """Kill the runs' workers when the scene is closed, every worker when the application exits, then remove
    the run folders marked for it (installed once)."""
    global jobGuardsInstalled
    if jobGuardsInstalled:
        return
    slicer.app.connect("aboutToQuit()", stopAllJobs)
    slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, stopSceneJobs)
    jobGuardsInstalled = True


class MASRefineJob:
    """One background run, as returned by :meth:`MASRefineLogic.start`.

    ``state`` is "running", then "completed", "failed" or "cancelled" once the worker process has
    ended. ``poll()`` reads the runner's events (a ``qt.QTimer`` calls it every 200 ms); ``cancel()`` asks
    the worker to stop (the runner kills its process group after ``grace_s``); ``stop()`` kills it now
    and discards its results; ``wait()`` blocks until the end and returns the created
    nodes (a dict ``{role: node}``, e.g. ``"fused-labels"``) or raises. After completion ``nodes`` are the
    nodes loaded at once (fused segmentation, QA table), ``atlasNodes`` the atlases loaded on demand,
    ``qaHeader``/``qaRows`` the per-atlas QA numbers (``qaIdColumn``: the atlas id). ``stopWithScene``: the
    worker is killed when the scene closes (runs; not the installer or the sample, stopped only at exit).
    """

    def __init__(self, runner, outDir: str, outputDir: str, targetNode=None,
                 loadResults: Optional[Callable] = None,
                 onEvent: Optional[Callable] = None, onFinished: Optional[Callable] = None,
                 stopWithScene: bool = True):
        self.runner = runner
        self.stopWithScene = stopWithScene
        self.outDir = outDir  # the run folder: job.json, exported target, output/
        self.outputDir = outputDir  # the worker's output folder (manifest.json)
        self.targetNode = targetNode
        self.state = "running"
        self.stage = ""
        self.message = ""
        self.stageFraction = 0.0  # 0..1 within the current stage
        self.overall = None  # 0..1 of the whole job, once the worker reports it
        self.error = None
        self.manifestPath = None
        self.result = None  # the worker's result event (a sample's or an installation's paths and versions)
        self.nodes = {}
        self.atlasNodes = {}
        self.folders = {}  # load-plan folder path (tuple) -> subject-hierarchy item
        self.qaHeader, self.qaRows, self.qaIdColumn = [], [], ""
        self.timer = None
        self._loadResults = loadResults
        self._onEvent = onEvent
        self._onFinished = onFinished
        self._polling = False
        self._outcome = None  # the worker's result/error/cancelled event
        self._stopRequested = False

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        """Progress 0..1: of the whole job when the worker reports it, else of the current stage."""
        return self.overall if self.overall is not None else self.stageFraction

    def poll(self) -> bool:
        """Handle the events that arrived; returns True while the job runs."""
        if self._polling or not self.running:
            return self.running
        self._polling = True
        try:
            for ev in self.runner.poll():
                self._handle(ev)
                if not self.running:
                    break
        finally:
            self._polling = False
        return self.running

    def _handle(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind in ("stage", "progress"):
            if ev.get("stage") and ev.get("stage") != self.stage:
                self.stage, self.stageFraction = str(ev["stage"]), 0.0
            self.message = str(ev.get("message") or "")
            for key, attr in (("fraction", "stageFraction"), ("overall", "overall")):
                if kind == "progress" and ev.get(key) is not None:
                    try:
                        setattr(self, attr, min(max(float(ev[key]), 0.0), 1.0))
                    except (TypeError, ValueError):
                        pass
        elif kind == "warning":
            logging.warning(f"MASRefine: {ev.get('message', '')}")
        elif kind == "error" and ev.get("traceback"):
            logging.error(f"MASRefine worker error:\n{ev['traceback']}")
        if self._onEvent:
            self._onEvent(self, ev)
        # The worker's outcome (result, error or cancelled) is kept until the runner's "exit" event,
        # which comes last, once the process has ended: finishing then never blocks the GUI.
        if kind in ("result", "error", "cancelled") and self._outcome is None:
            self._outcome = ev
        elif kind == "exit":
            self._finish(ev)

    def _finish(self, exitEvent: dict) -> None:
        outcome = self._outcome or {}
        if outcome.get("event") == "result" and not self._stopRequested:
            state = "completed"
            self.result = outcome
            self.manifestPath = outcome.get("manifest") or os.path.join(self.outputDir, "manifest.json")
            self.overall = 1.0
        elif outcome.get("event") == "error":
            state = "failed"
            self.error = str(outcome.get("message") or _("the worker stopped with an error"))
        elif outcome.get("event") in ("cancelled", "result") or exitEvent.get("status") == "cancelled":
            state = "cancelled"
        else:
            state = "failed"
            self.error = _("the worker exited with code {code} without a result").format(code=exitEvent.get("returncode"))
        if self.timer is not None:
            self.timer.stop()
        if self in activeJobs:
            activeJobs.remove(self)
        if state == "completed" and self._loadResults is not None:
            try:
                self._loadResults(self)
            except Exception as e:
                logging.exception("MASRefine: loading the results failed")
                state = "failed"
                self.error = _("loading the results of {path} failed: {error}").format(path=self.manifestPath, error=e)
        self.state = state
        if self._onFinished:
            self._onFinished(self)

    def cancel(self, grace_s: float = 5.0) -> None:
        """Ask the worker to stop; the job becomes "cancelled" when the worker has ended."""
        if self.running:
            self.runner.cancel(grace_s)

    def stop(self) -> None:
        """Kill the worker now and load nothing, even a result already on its way (scene close, exit)."""
        self._stopRequested = True
        self.cancel(grace_s=0.0)

    def wait(self, timeout: Optional[float] = None, processEvents: Optional[Callable] = None) -> dict:
        """Block until the job ends; return ``nodes`` or raise RuntimeError (failed/cancelled) or TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        timedOut = False
        while self.poll():
            if deadline is not None and not timedOut and time.monotonic() > deadline:
                timedOut = True
                self.cancel(grace_s=0.0)
            if processEvents:
                processEvents()
            time.sleep(0.05)
        if timedOut:
            raise TimeoutError(_("MASRefine did not finish within {s} s; the run was stopped").format(s=timeout))
        if self.state == "failed":
            raise RuntimeError(_("MASRefine failed: {error}").format(error=self.error))
        if self.state == "cancelled":
            raise RuntimeError(_("MASRefine was cancelled"))
        return self.nodes



def launch(job: MASRefineJob) -> MASRefineJob:
    """Start the job's runner, stop it with the scene or the application, and pump its events from a
    ``qt.QTimer`` (so finishing never blocks the GUI)."""
    installJobGuards()
    job.runner.start()
    activeJobs.append(job)
    job.timer = qt.QTimer()
    job.timer.setInterval(POLL_INTERVAL_MS)
    job.timer.connect("timeout()", job.poll)
    job.timer.start()
    return job


def launchCommand(command: list, folder: str, **kw) -> MASRefineJob:
    """Start ``command`` (``PythonSlicer -m MASRefineLib.<module> --events``, no job file: the installer, the sample)
    as a job whose run and output folder is ``folder`` (``kw``: :class:`MASRefineJob`'s); stopped only at exit."""
    from MASRefineLib.runner import JobRunner

    return launch(MASRefineJob(JobRunner(command=command), folder, folder, stopWithScene=False, **kw))
