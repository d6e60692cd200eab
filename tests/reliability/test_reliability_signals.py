"""Reliability: SIGTERM stops `clbench run` as Ctrl-C does (recorded, one line, resumable); a
sweep or tune holds a lock on its directory, forwards SIGTERM/SIGINT to its runs and waits for
them; a tune candidate that fails is recorded with its error and selection goes on without it.

No test waits on time: a run blocks at the start of its stage 2 (a method file) after writing a
marker, and the signal is sent once the marker is there."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from conftest import REPO

TINY_TASKS = REPO / "configs" / "tiny_tasks"

BLOCK_METHOD = '''
import os, time
from pathlib import Path
from pydantic import BaseModel
from clbench.method import Method, register

class Opts(BaseModel):
    block_at_stage: int = 2

@register("blocks")
class Blocks(Method):
    Options = Opts
    def setup(self, model, run):
        return model
    def stage_start(self, model, stage):
        markers = os.environ.get("CLBENCH_TEST_MARKERS")
        if markers and stage.stage == self.options.block_at_stage:
            d = Path(markers)
            (d / f"{os.getpid()}.blocked").write_text("")
            while not (d / "release").exists():  # until the test releases it, or a signal stops it
                time.sleep(0.02)
        return model
'''

NAN_METHOD = '''
import torch
from pydantic import BaseModel
from clbench.method import Method, register

class Opts(BaseModel):
    nan_at_stage: int = 99

@register("nan_after")
class NanAfter(Method):
    Options = Opts
    def setup(self, model, run):
        return model
    def extra_loss(self, model, batch, stage, out):
        return torch.tensor(float("nan")) if stage.stage == self.options.nan_at_stage else None
'''


def _config(tmp_path, **extra):
    (tmp_path / "blocks.py").write_text(BLOCK_METHOD)
    cfg = {"name": "sig", "model": "tiny", "stream": "tiny3", "task_dirs": [str(TINY_TASKS)],
           "method_files": [str(tmp_path / "blocks.py")], "methods": [{"name": "blocks"}], "threads": 1,
           "train": {"steps": 3, "max_length": 64}, "eval": {"limit": 8, "log_samples": False},
           "precision": "fp32", "checkpoint_interval": 0, **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _clbench(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clbench", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def _start(args, markers, **kw):
    markers.mkdir(exist_ok=True)
    env = dict(os.environ, CLBENCH_TEST_MARKERS=str(markers))
    return subprocess.Popen([sys.executable, "-m", "clbench", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for_markers(proc, markers, n):
    """Wait until n runs have written their marker (they then block), or the process has ended."""
    deadline = time.time() + 300
    while len(list(markers.glob("*.blocked"))) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert len(list(markers.glob("*.blocked"))) == n, proc.communicate(timeout=60)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _lock_held(run_dir):
    import fcntl

    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _wait_gone(pids):
    """Wait until none of these processes (not this test's children) is alive: on the exit event of
    each (a pidfd turns readable when its process ends, Linux >= 5.3); the 120 s bound only fails
    a run that never ends."""
    import select

    gone = True
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # already gone
        try:
            ready, _, _ = select.select([fd], [], [], 120)  # readable once it has exited, reaped or not
            gone = gone and bool(ready)
        finally:
            os.close(fd)
    return gone


def _cleanup(markers):
    """Whatever happens, no run stays blocked after the test."""
    (markers / "release").write_text("")
    for f in markers.glob("*.blocked"):
        pid = int(f.name.split(".")[0])
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_is_recorded_like_ctrl_c_and_the_run_resumes(tmp_path):
    """SIGTERM mid-stage: exit 143 with one line saying so, the completed stage recorded, the lock
    released, and the same command finishes with the uninterrupted matrix."""
    cfg, markers = _config(tmp_path), tmp_path / "markers"
    ref = _clbench("run", cfg, "--output-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = _start(["run", cfg, "--output-dir", out], markers)
    try:
        _wait_for_markers(proc, markers, 1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        _cleanup(markers)
    assert proc.returncode == 143, err
    assert "clbench: terminated (SIGTERM); results of completed stages are in the run directory" in err
    assert "Traceback" not in err and not (out / ".lock").exists()
    res = json.loads((out / "results.json").read_text())
    assert len(res["methods"]["blocks"]["seeds"]["0"]["stages"]) == 1
    r = _clbench("run", cfg, "--output-dir", out)
    assert r.returncode == 0 and "resumed after stage 1" in r.stderr, r.stderr
    assert (out / "matrix.csv").read_text() == (tmp_path / "ref" / "matrix.csv").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_sweep_is_forwarded_to_its_runs_and_waited_for(tmp_path, sig):
    """The sweep alone gets the signal (its runs are not in a terminal's process group here): each
    run gets it too and records what it finished, the sweep waits for them, writes sweep.json and
    says so in one line; no run is left behind."""
    base = _config(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": str(base), "grid": {"seeds": [0, 1]}, "parallel": 2}))
    out, markers = tmp_path / "out", tmp_path / "markers"
    proc = _start(["sweep", sweep, "--output-dir", out], markers, start_new_session=True)
    try:
        _wait_for_markers(proc, markers, 2)
        pids = [int(f.name.split(".")[0]) for f in markers.glob("*.blocked")]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        left = [p for p in pids if _alive(p)]
    finally:
        _cleanup(markers)
    code, what = (143, "terminated (SIGTERM)") if sig == signal.SIGTERM else (130, "interrupted")
    assert proc.returncode == code, err
    assert f"clbench: {what}; its runs were stopped and waited for" in err and "Traceback" not in err, err
    assert left == []  # the sweep waited for its runs
    for run in ("seed=0", "seed=1"):
        log = (out / "logs" / f"{run}.log").read_text()
        assert f"clbench: {what}; results of completed stages are in the run directory" in log, log
        assert not (out / run / ".lock").exists()
        assert len(json.loads((out / run / "results.json").read_text())["methods"]["blocks"]["seeds"][run[-1]]["stages"]) == 1
    assert not (out / ".lock").exists()
    assert {r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]} == {"partial"}


def test_a_signal_to_a_slurm_sweep_cancels_its_jobs_and_waits_for_them(tmp_path):
    """launcher slurm, with submitit's local executor in Slurm's place (the same submitit jobs, run
    as processes on this machine; no Slurm here): SIGTERM to the sweep cancels every job under way
    (scancel on Slurm), each job's run gets SIGTERM and records what it finished, and the sweep
    waits for them and says so; no run is left behind, no lock held."""
    pytest.importorskip("submitit")
    base = _config(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": str(base), "grid": {"seeds": [0, 1]},
                                     "launcher": "slurm", "slurm": {"cluster": "local"}}))
    out, markers = tmp_path / "out", tmp_path / "markers"
    proc = _start(["sweep", sweep, "--output-dir", out], markers, start_new_session=True)
    try:
        _wait_for_markers(proc, markers, 2)
        pids = [int(f.name.split(".")[0]) for f in markers.glob("*.blocked")]
        proc.send_signal(signal.SIGTERM)
        text, err = proc.communicate(timeout=120)
        # when the sweep is back, no run holds its lock any more: each has recorded what it finished
        held = [run for run in ("seed=0", "seed=1") if _lock_held(out / run)]
        # and then each run's process ends (the sweep waited on the lock, which the run gives back
        # just before it exits; the local executor has already killed the job's worker)
        gone = _wait_gone(pids)
    finally:
        _cleanup(markers)
    assert proc.returncode == 143, err
    assert held == [] and gone, (held, gone)
    assert "cancelled 2 submitit job(s) still under way; waiting for their runs to end" in text, text
    # clbench's last word is its one line; the only tracebacks are those submitit's local controller
    # prints on the SIGINT its cancel sends it (the local executor's, not Slurm's), none from clbench
    assert err.strip().splitlines()[-1].startswith("clbench: terminated (SIGTERM); its runs were stopped and waited for"), err
    assert "/clbench/" not in err, err
    for run in ("seed=0", "seed=1"):
        log = (out / "logs" / f"{run}.log").read_text()
        assert "clbench: terminated (SIGTERM); results of completed stages are in the run directory" in log, log
        assert not (out / run / ".lock").exists()
        assert len(json.loads((out / run / "results.json").read_text())["methods"]["blocks"]["seeds"][run[-1]]["stages"]) == 1
    assert not (out / ".lock").exists()


def test_a_run_whose_launcher_dies_stops_as_on_sigterm(tmp_path):
    """A sweep's run (started with CLBENCH_STOP_WITH_PARENT, as run_unit does) whose launcher is
    SIGKILLed gets SIGTERM from the OS (Linux's parent-death signal): it records its finished
    stage, releases its lock and ends, rather than training on as an orphan."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    cfg, markers, out = _config(tmp_path), tmp_path / "markers", tmp_path / "out"
    log = tmp_path / "run.log"
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys
        env = dict(os.environ, CLBENCH_STOP_WITH_PARENT=str(os.getpid()))
        with open({str(log)!r}, "w") as f:
            subprocess.Popen([sys.executable, "-m", "clbench", "run", {str(cfg)!r}, "--output-dir", {str(out)!r}],
                             stdout=f, stderr=subprocess.STDOUT, env=env).wait()
    """)
    markers.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=dict(os.environ, CLBENCH_TEST_MARKERS=str(markers)))
    try:
        _wait_for_markers(parent, markers, 1)
        (pid,) = [int(f.name.split(".")[0]) for f in markers.glob("*.blocked")]
        parent.kill()
        parent.wait()
        gone = _wait_gone([pid])
    finally:
        _cleanup(markers)
    assert gone
    text = log.read_text()
    assert "clbench: terminated (SIGTERM); results of completed stages are in the run directory" in text, text
    assert not (out / ".lock").exists()
    assert len(json.loads((out / "results.json").read_text())["methods"]["blocks"]["seeds"]["0"]["stages"]) == 1


def _tune(tmp_path, methods, method_file):
    from test_tune import make_tasks

    make_tasks(tmp_path / "tasks")
    (tmp_path / "m.py").write_text(method_file)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "name": "t", "model": "tiny", "stream": "tiny2", "task_dirs": ["tasks"], "threads": 1,
        "method_files": ["m.py"], "methods": [{"name": "nan_after"}], "seeds": [0],
        "train": {"lr": 3e-3, "steps": 3, "batch_size": 8, "max_length": 64},
        "eval": {"limit": 8, "batch_size": 16, "log_samples": False}, "precision": "fp32"}))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({"name": "tt", "base": "base.yaml", "methods": methods,
                                                        "final": {"seeds": [0]}, "parallel": 1}))
    return tmp_path / "tune.yaml"


def test_a_failed_tune_candidate_is_recorded_and_selection_goes_on(tmp_path, run_cli):
    path = _tune(tmp_path, {"nan_after": {"options.nan_at_stage": [1, 99]}}, NAN_METHOD)
    out = tmp_path / "out"
    code, text, err = run_cli("tune", path, "--output-dir", out, "--select-only")
    assert code == 0, text + err
    cands = json.loads((out / "tune.json").read_text())["methods"]["nan_after"]["candidates"]
    failed, ok = cands
    assert failed["status"] == "failed" and "non-finite loss" in failed["error"], failed
    assert ok["status"] == "complete" and ok["score"] == ok["score"]  # not NaN
    winner = json.loads((out / "tune.json").read_text())["methods"]["nan_after"]["winner"]
    assert winner["label"] == ok["label"]
    assert "FAILED (" in text and "selection goes on without the failed candidate(s)" in text


@pytest.mark.parametrize("cmd", ["sweep", "tune"])
def test_a_second_sweep_or_tune_on_the_same_directory_is_refused(tmp_path, run_cli, cmd):
    from clbench.results.rundir import RunLock

    if cmd == "tune":
        path = _tune(tmp_path, {"nan_after": None}, NAN_METHOD)
    else:
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"name": "s", "base": str(_config(tmp_path)), "grid": {"seeds": [0, 1]}}))
    out = tmp_path / "out"
    with RunLock(out):  # as another process would hold it (an flock conflicts across open files)
        code, _, err = run_cli(cmd, path, "--output-dir", out)
    assert code == 2 and f"{cmd} directory {out} is in use by process {os.getpid()}" in err, err
    assert not (out / "configs").exists() and not (out / "select").exists()  # nothing written
