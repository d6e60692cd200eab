"""The run-directory lock (clbench.results.rundir.RunLock) under contention: several processes at once,
exactly one holds a directory, the others fail naming the holder; a dead holder frees it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO

TINY_TASKS = REPO / "configs" / "tiny_tasks"

# Imports everything first, says so, and waits for the go file, then runs the CLI: the processes
# reach the lock within milliseconds of each other.
AT = "import os, sys, time; from pathlib import Path; import clbench.cli, clbench.results.rundir, clbench.run.runner, clbench.run.loop\n" \
     "sync = Path(sys.argv[1]); (sync / f'ready{os.getpid()}').touch()\n" \
     "while not (sync / 'go').exists(): time.sleep(0.001)\n" \
     "sys.exit(clbench.cli.main(sys.argv[2:]))"


def start_together(cmds, sync, **kw):
    """Popen each command (each touches sync/ready<pid> when set up, then waits for sync/go)."""
    sync.mkdir()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **kw) for c in cmds]
    deadline = time.time() + 120
    while len(list(sync.glob("ready*"))) < len(procs) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    (sync / "go").touch()
    return procs


# Each process takes and releases the lock until every process has held it 50 times and been refused
# at least once (each says so with a done<pid> file and keeps contending until all have: none is ever
# left alone uncontended), with 120 s as a safety stop only (a loaded machine slows it, it does not
# change what it sees); inside, it creates a marker file with O_EXCL: finding it there means another
# process holds the lock at the same time.
STRESS = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from clbench.results.rundir import RunDirError, RunLock
    out, sync, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    (sync / f"ready{os.getpid()}").touch()
    while not (sync / "go").exists():  # imports done: all start together
        time.sleep(0.001)
    stop = time.time() + 120
    held = overlaps = refused = 0
    bad_messages = []
    while time.time() < stop:
        if held >= 50 and refused >= 1:
            (sync / f"done{os.getpid()}").touch()
            if len(list(sync.glob("done*"))) == n:
                break
        try:
            with RunLock(out):
                held += 1
                try:
                    fd = os.open(out / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    overlaps += 1
                    continue
                os.close(fd)
                os.unlink(out / "inside")
        except RunDirError as e:
            refused += 1
            if "in use by process" not in str(e):
                bad_messages.append(str(e))
    print(json.dumps({"held": held, "overlaps": overlaps, "refused": refused, "bad": bad_messages[:3]}))
""")


def test_lock_is_exclusive_under_contention(tmp_path):
    out = tmp_path / "run"
    procs = start_together([[sys.executable, "-c", STRESS, str(out), str(tmp_path / "sync"), "4"]] * 4, tmp_path / "sync")
    stats = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(s["overlaps"] for s in stats) == 0, stats
    assert all(s["held"] >= 50 for s in stats), stats  # every process got the lock, many times
    assert all(s["refused"] > 0 for s in stats), stats  # and each contended
    assert not any(s["bad"] for s in stats), stats
    assert not (out / ".lock").exists()


HOLD = "import sys, time; from pathlib import Path; from clbench.results.rundir import RunLock\n" \
       "with RunLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"


def test_holder_is_named_and_a_killed_holder_frees_the_directory(tmp_path):
    from clbench.results.rundir import RunDirError, RunLock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid} "):
            with RunLock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text() == str(holder.pid)  # SIGKILL leaves the file, but not the lock
    with RunLock(out):
        assert (out / ".lock").read_text() == str(os.getpid())
    assert not (out / ".lock").exists()


SMALL = f"""
model: tiny
tasks: [tiny_parity]
task_dirs: [{TINY_TASKS}]
methods: [{{name: full_ft}}]
train: {{steps: 2, max_length: 64}}
eval: {{limit: 4}}
precision: fp32
"""

def test_simultaneous_clbench_runs_on_one_directory(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SMALL)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for round_ in range(2):
        out = tmp_path / f"run{round_}"
        cmd = [sys.executable, "-c", AT, str(tmp_path / f"sync{round_}"), "run", str(cfg), "--output-dir", str(out)]
        procs = start_together([cmd] * 3, tmp_path / f"sync{round_}", env=env)
        done = [(p.pid, *p.communicate(timeout=180), p.returncode) for p in procs]
        winners = [d for d in done if d[3] == 0]
        losers = [d for d in done if d[3] != 0]
        assert len(winners) == 1, [(d[0], d[3], d[2][-300:]) for d in done]
        for pid, _, err, code in losers:
            assert code == 2 and "Traceback" not in err, err
            assert f"run directory {out} is in use by process {winners[0][0]} " in err, err
        assert (out / "matrix.csv").is_file() and not (out / ".lock").exists()
