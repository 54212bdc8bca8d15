"""The background job protocol with real subprocesses: job.json, worker events and exit codes, the
runner (poll, cancel, kill, wait), manifest (nothing half-written listed) and the load plan."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from MASRefineLib import sampledata
from MASRefineLib.protocol import jobs
from MASRefineLib.protocol.loadplan import load_plan, qa_rows
from MASRefineLib.protocol.manifest import MANIFEST_NAME, read_manifest
from MASRefineLib.errors import MASRefineError
from MASRefineLib.runner import JobRunner, parse_line
from MASRefineLib.worker import EVENT_PREFIX

import worker_launcher

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the protocol tests' small pipelines run in the real worker started through Testing/worker_launcher.py, which adds
# them to jobs.PIPELINES in the worker's process (the library itself runs only its own pipelines)
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}


def _runner(job_path: Path) -> JobRunner:
    return JobRunner(job_path, env=ENV, command=worker_launcher.command(job_path))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sampledata.make_sample(tmp_path_factory.mktemp("jobs-sample"), n_atlases=2, size=(32, 32, 32), spacing=2.8)


def _job(sample, out: Path, pipeline: str, **params) -> Path:
    job = jobs.make_job(sample["target"], sample["atlas_dir"], out, pipeline=pipeline, **params)
    return jobs.write_job(job, out.parent / f"{out.name}-job.json")


def _run(job_path: Path, timeout: float = 60) -> tuple[JobRunner, list[dict]]:
    r = _runner(job_path).start()
    evs = list(r.events(timeout))
    return r, evs


def _kinds(evs):
    return [e["event"] for e in evs]


# ----------------------------------------------------------------------------------- job.json
def test_make_validate_write_read(sample, tmp_path):
    job = jobs.make_job(sample["target"], sample["atlas_dir"], tmp_path / "out", refine="I", alpha=2.5)
    assert jobs.validate_job(job) == []
    assert job["parameters"]["refine"] == "I" and job["parameters"]["fusion"] == "jlf"
    assert os.path.isabs(job["output_dir"]) and job["cancel_file"].startswith(job["output_dir"])
    p = jobs.write_job(job, tmp_path / "job.json")
    assert jobs.read_job(p) == job

    def problems(**change):
        j = json.loads(json.dumps(job))
        for k, v in change.items():
            if k in jobs.PARAMETERS:
                j["parameters"][k] = v
            elif k in ("target", "atlas_dir"):
                j["inputs"][k] = v
            else:
                j[k] = v
        return jobs.validate_job(j)

    assert any("refine" in p and "I, IS" in p for p in problems(refine="XYZ"))
    assert any("alpha" in p for p in problems(alpha="three"))
    assert any("iterations" in p and "integer" in p for p in problems(iterations=2.5))
    assert any("train_missing" in p for p in problems(train_missing="yes"))
    assert any("not found" in p for p in problems(target=str(tmp_path / "nope.nii.gz")))
    assert any("absolute" in p for p in problems(target="relative.nii.gz"))
    assert any("atlas.json" in p for p in problems(atlas_dir=str(tmp_path)))
    assert any("schema_version" in p for p in problems(schema_version=99))
    assert any("unknown job field" in p for p in problems(extra=1))
    j = json.loads(json.dumps(job))
    j["parameters"]["bogus"] = 1
    assert any("unknown parameter 'bogus'" in p for p in jobs.validate_job(j))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MASRefineError, match="bad.json"):
        jobs.read_job(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------- protocol
def test_full_small_job(sample, tmp_path):
    out = tmp_path / "run"
    r, evs = _run(_job(sample, out, "worker_pipelines:slow", steps=6, sleep=0.02))
    assert r.returncode == 0 and r.status == "done"
    kinds = [k for k in _kinds(evs) if k != "output"]
    assert kinds[0] == "started" and kinds[-2:] == ["result", "exit"]
    assert evs[0]["pid"] == r.pid
    stages = [e["stage"] for e in evs if e["event"] == "stage"]
    assert stages == ["work", "write"]
    prog = [e for e in evs if e["event"] == "progress"]
    assert all(0.0 <= e["fraction"] <= 1.0 for e in prog)
    overall = [e["overall"] for e in prog]
    assert overall == sorted(overall) and overall[-1] == 1.0
    # the result names the manifest; everything it lists exists and is a finished output
    res = r.result
    assert Path(res["manifest"]) == out / MANIFEST_NAME and res["summary"] == {"steps": 6}
    m = read_manifest(res["manifest"])
    listed = {e["path"] for e in m["outputs"]}
    assert listed == {"smooth.nii.gz", "qa.csv"}
    assert [s["name"] for s in m["stages"]] == ["work", "write"] and all(s["seconds"] >= 0 for s in m["stages"])
    plan = load_plan(res["manifest"], atlases="all")
    assert [(i["kind"], i["role"], i["atlas_id"]) for i in plan] == [("table", "qa-table", None),
                                                                     ("volume", "atlas-image", "a1")]
    assert all(os.path.isabs(i["path"]) and os.path.isfile(i["path"]) for i in plan)
    assert qa_rows(res["manifest"])[0]["id"] == "a1"


def test_cancel_mid_run(sample, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{}")  # a stale manifest of an earlier run must not survive
    job = _job(sample, out, "worker_pipelines:slow", steps=400, sleep=0.05)
    cancel_file = Path(jobs.read_job(job)["cancel_file"])
    cancel_file.write_text("stale")  # a stale cancel file must not stop the new run
    r = _runner(job).start()
    t_cancel = None
    for ev in r.events(60):
        if ev["event"] == "progress" and ev["fraction"] > 0.02 and t_cancel is None:
            t_cancel = time.monotonic()
            r.cancel(grace_s=20)
        if ev["event"] == "exit":
            break
    assert t_cancel is not None
    assert r.returncode == 3 and r.status == "cancelled"
    assert time.monotonic() - t_cancel < 5  # stopped at the next progress report, not by the kill
    assert not (out / MANIFEST_NAME).exists()
    assert list(out.glob("partial_*.txt"))  # partial outputs exist but nothing lists them


def test_cancel_kills_unresponsive_worker(sample, tmp_path):
    r = _runner(_job(sample, tmp_path / "run", "worker_pipelines:slow", steps=3, sleep=60)).start()
    for ev in r.events(30):
        if ev["event"] == "progress":  # the pipeline now sleeps 60 s before its next progress report
            break
    t = time.monotonic()
    r.cancel(grace_s=0.5)
    rc = r.wait(30)
    assert rc is not None and rc < 0 and r.status == "cancelled"
    assert time.monotonic() - t < 10
    evs = r.poll()
    assert _kinds(evs)[-2:] == ["cancelled", "exit"]


def test_crash_mid_run(sample, tmp_path):
    out = tmp_path / "run"
    r, evs = _run(_job(sample, out, "worker_pipelines:crash"))
    assert r.status == "error" and r.returncode not in (0, 1, 2, 3)
    err = [e for e in evs if e["event"] == "error"]
    assert len(err) == 1 and err[0]["kind"] == "crash" and "about to crash hard" in err[0]["message"]
    assert (out / "half.nii.gz").exists() and not (out / MANIFEST_NAME).exists()


def test_exception_mid_run(sample, tmp_path):
    r, evs = _run(_job(sample, tmp_path / "run", "worker_pipelines:crash", mode="raise"))
    assert r.returncode == 1 and r.status == "error"
    err = r.error
    assert err["kind"] == "internal" and err["message"] == "RuntimeError: simulated failure in the middle of the job"
    assert "worker_pipelines.py" in err["traceback"]


def test_invalid_jobs(sample, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r, evs = _run(bad)
    assert r.returncode == 2 and r.error["kind"] == "invalid-job" and "bad.json" in r.error["message"]

    job = jobs.make_job(str(tmp_path / "missing.nii.gz"), sample["atlas_dir"], tmp_path / "o", fusion="magic")
    p = jobs.write_job(job, tmp_path / "j1.json")
    r, evs = _run(p)
    assert r.returncode == 2 and len(r.error["problems"]) == 2
    assert "missing.nii.gz: target image not found" in r.error["message"]
    assert "started" not in _kinds(evs)

    r, _ = _run(_job(sample, tmp_path / "o2", "no_such_module_xyz:run"))
    assert r.returncode == 2 and "no_such_module_xyz" in r.error["message"]
    r, _ = _run(_job(sample, tmp_path / "o3", "worker_pipelines:needs_missing_package"))
    assert r.returncode == 2 and r.error["kind"] == "missing-dependency"
    assert "pip install masrefine_no_such_package" in r.error["message"]


def test_junk_on_stdout_is_tolerated(tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        P = {EVENT_PREFIX!r}
        print("plain junk")
        print(P + json.dumps({{"event": "started", "pid": 1}}))
        print(P + "{{broken json")
        print(P + json.dumps([1, 2]))
        sys.stdout.write("no newline at the end, then an event" + "\\n")
        print(P + json.dumps({{"event": "progress", "stage": "s", "fraction": 0.5}}))
        sys.stderr.write("to stderr\\n")
        sys.stdout.buffer.write(b"\\xff\\xfe invalid utf-8\\n")
        print(P + json.dumps({{"event": "result", "manifest": "m"}}))
        """)
    r = JobRunner(command=[sys.executable, "-c", script]).start()
    evs = list(r.events(30))
    assert [e["event"] for e in evs if e["event"] != "output"] == ["started", "progress", "result", "exit"]
    junk = [e["line"] for e in evs if e["event"] == "output" and e["stream"] == "stdout"]
    assert junk[0] == "plain junk" and len(junk) == 5
    assert any(e["event"] == "output" and e["stream"] == "stderr" and e["line"] == "to stderr" for e in evs)
    assert r.returncode == 0 and r.result["manifest"] == "m"
    assert parse_line(EVENT_PREFIX + '{"event": 3}')["event"] == "output"


def test_worker_keeps_stdout_clean(sample, tmp_path):
    r, evs = _run(_job(sample, tmp_path / "run", "worker_pipelines:noisy"))
    assert r.returncode == 0
    # every line the worker wrote on stdout is a protocol event; the junk went to stderr
    assert not [e for e in evs if e["event"] == "output" and e["stream"] == "stdout"]
    err_lines = [e["line"] for e in evs if e["event"] == "output" and e["stream"] == "stderr"]
    assert "junk from print()" in err_lines and "junk written to fd 1" in err_lines
    assert any(e["event"] == "log" and e["message"] == "an informative message" for e in evs)
    warns = [e["message"] for e in evs if e["event"] == "warning"]
    assert any("a warning from a library" in w for w in warns) and "a logged warning" in warns
    prog = next(e for e in evs if e["event"] == "progress")
    assert prog["data"] == {"nan_value": None, "array": [0, 1, 2]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that nobody reaped yet is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_worker_exits_when_parent_dies(sample, tmp_path):
    job = _job(sample, tmp_path / "run", "worker_pipelines:slow", steps=600, sleep=0.05)
    parent = textwrap.dedent(f"""
        import sys, time
        from MASRefineLib.runner import JobRunner
        r = JobRunner({str(job)!r}, env={ENV!r}, command={worker_launcher.command(job)!r}).start()
        for ev in r.events(60):
            if ev["event"] == "progress":
                print(r.pid, flush=True)
                break
        time.sleep(120)
        """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, env=env, text=True)
    try:
        pid = int(p.stdout.readline())
        assert _alive(pid)
        p.kill()  # SIGKILL: no cleanup, no atexit in the parent
        p.wait()
        t = time.monotonic()
        while _alive(pid) and time.monotonic() - t < 10:
            time.sleep(0.1)
        assert not _alive(pid), "worker outlived its parent"
        assert not (tmp_path / "run" / MANIFEST_NAME).exists()
    finally:
        if p.poll() is None:
            p.kill()


def test_protocol_modules_stay_light():
    """What the Slicer process imports (jobs, runner, manifest, loadplan) never pulls in torch or MONAI."""
    code = ("import sys; import MASRefineLib.protocol.jobs, MASRefineLib.runner, MASRefineLib.protocol.manifest, MASRefineLib.protocol.loadplan; "
            "print(sorted(m for m in ('torch', 'monai', 'matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]"


def test_openmp_waits_passively_unless_chosen():
    code = "import os, MASRefineLib, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert out.stdout.strip() == "ACTIVE"


def test_a_cancel_file_outside_the_output_folder_is_refused_and_never_touched(sample, tmp_path):
    """The runner deletes the cancel file at start and writes it on cancel: a job naming a file outside its
    output folder is an invalid job, and the runner neither deletes nor writes that file."""
    from MASRefineLib.worker import EXIT_INVALID
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    job = jobs.make_job(sample["target"], sample["atlas_dir"], tmp_path / "run", cancel_file=victim)
    assert any(p == f"{victim}: cancel_file must lie inside output_dir {tmp_path / 'run'}" for p in jobs.validate_job(job))
    for bad in (str(tmp_path / "run" / ".." / "notes.txt"), str(tmp_path / "run")):
        assert any("cancel_file must lie inside output_dir" in p for p in jobs.validate_job({**job, "cancel_file": bad}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".cancel").symlink_to(victim)  # a link out of the folder is outside too
    assert any("cancel_file must lie inside" in p
               for p in jobs.validate_job({**job, "cancel_file": str(tmp_path / "run" / ".cancel")}))
    path = jobs.write_job(job, tmp_path / "job.json")
    r, evs = _run(path)
    assert r.returncode == EXIT_INVALID and r.error["kind"] == "invalid-job"
    assert "cancel_file must lie inside output_dir" in r.error["message"]
    assert victim.read_text() == "mine"
    # a runner of such a job (whatever its command) does not delete the file at start nor write it on cancel
    r = JobRunner(path, command=[sys.executable, "-c", "import time; time.sleep(30)"]).start()
    assert r.cancel_file is None and victim.read_text() == "mine"
    r.cancel(grace_s=0.5)
    assert r.wait(20) is not None and victim.read_text() == "mine"
    ok = jobs.make_job(sample["target"], sample["atlas_dir"], tmp_path / "run2")
    assert jobs.validate_job(ok) == [] and jobs.cancel_file_inside(ok["cancel_file"], ok["output_dir"])


def test_a_pathological_event_line_is_output_not_a_crash_of_the_reader():
    deep = EVENT_PREFIX + "[" * 100000 + "]" * 100000
    assert parse_line(deep) == {"event": "output", "stream": "stdout", "line": deep}
    assert parse_line(EVENT_PREFIX + '{"event": "progress", "fraction": NaN}')["event"] == "output"


def test_scaled_maps_a_subtask_onto_its_share_of_the_parent():
    """progress.scaled, the one rescaler of a sub-task's 0..1 (VoteNet+ training after its registrations): the
    fraction start + (end - start) * f, stage, message and data unchanged; None stays None."""
    from MASRefineLib.progress import ProgressEvent, report, scaled
    got: list[ProgressEvent] = []
    cb = scaled(got.append, 0.3, 1.0)
    for f in (0.0, 0.5, 1.0, 1.7):
        report(cb, "train-votenet", f, f"at {f}", loss=f)
    assert [e.fraction for e in got] == pytest.approx([0.3, 0.65, 1.0, 1.0])
    assert [(e.stage, e.message, e.data) for e in got][1] == ("train-votenet", "at 0.5", {"loss": 0.5})
    assert scaled(None, 0.3, 1.0) is None
