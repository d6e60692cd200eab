"""Launching a sweep's runs (`clbench sweep`, `clbench tune`): each run a `clbench run` subprocess,
locally (a thread pool of `parallel` at a time), on Ray or on Slurm (submitit); the runs this
process started are tracked so that a Ctrl-C or SIGTERM of the sweep is forwarded to each of them
and waited for, and no run starts after it."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clbench import interrupt
from clbench.errors import SweepError
from clbench.interrupt import PARENT_ENV
from clbench.results.rundir import RunDir

if TYPE_CHECKING:
    from clbench.experiments.sweep import RayOptions, SlurmOptions


# The runs this process has started and not yet seen end, and whether it is stopping: a Ctrl-C or
# SIGTERM of the sweep is forwarded to each of them and waited for (stop_children), and no run
# starts after it.
_CHILDREN: set = set()
_CHILDREN_LOCK = __import__("threading").Lock()
_STOPPING = False


class _Stopped(Exception):
    pass


def run_unit(cmd: list[str], log: str, cwd: str, env: dict) -> dict:
    """One run: `python -m clbench run ...` as a subprocess, output appended to its log file.
    Module-level so that Ray and submitit ship it by reference."""
    t0 = time.time()

    full_env = {**os.environ, **env, PARENT_ENV: str(os.getpid())}  # the run stops if this process dies
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}   # {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.uname().nodename}\n")
        f.flush()
        with _CHILDREN_LOCK:
            if _STOPPING:
                raise _Stopped()
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=full_env)
            _CHILDREN.add(proc)
        try:
            rc = proc.wait()
        except BaseException:  # a Ctrl-C or SIGTERM of this process while it waits (parallel 1)
            stop_children()
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    return {"rc": rc, "seconds": time.time() - t0}


def stop_children(signum: int | None = None) -> list[int]:
    """Send the signal that stopped this process (SIGTERM unless it was Ctrl-C) to every run it
    started, and wait for each to end: they record what they finished and release their locks.
    No run starts after this. Returns the pids stopped."""
    import signal

    global _STOPPING
    sig = signum or interrupt.requested() or signal.SIGTERM
    with _CHILDREN_LOCK:
        _STOPPING = True
        procs = list(_CHILDREN)
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    for p in procs:
        _wait_through_signals(p.wait)
    return [p.pid for p in procs]


def _wait_through_signals(wait) -> None:
    """Call `wait` until it returns: a repeated Ctrl-C or SIGTERM does not stop the wait, the runs
    are ending."""
    while True:
        try:
            wait()
            return
        except KeyboardInterrupt:
            continue


@__import__("contextlib").contextmanager
def forwarding():
    """Around launching the runs: a fresh start (no stop requested), and on a Ctrl-C or SIGTERM
    the runs get it too and are waited for before it goes on up."""
    global _STOPPING
    with _CHILDREN_LOCK:
        _STOPPING = False
    try:
        yield
    except KeyboardInterrupt:
        stop_children()
        raise


def last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errs = [ln for ln in lines if ln.startswith("clbench: error:") or "Error" in ln]
    return (errs or lines or ["empty log"])[-1][:300]


def launch_local(units, parallel: int, done):
    if parallel == 1:
        for run, args in units:
            done(run, run_unit(*args))
        return
    pool = cf.ThreadPoolExecutor(max_workers=parallel)
    try:
        futs = {pool.submit(run_unit, *args): run for run, args in units}
        for f in cf.as_completed(futs):
            done(futs[f], f.result())
    except KeyboardInterrupt:  # the runs under way get the signal and are waited for; none starts after
        stop_children()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def launch_ray(units, opts: RayOptions, done):
    try:
        import ray
    except ImportError:
        raise SweepError("launcher ray needs the 'ray' package: pip install 'clbench[sweep]'") from None
    started = False
    if not ray.is_initialized():
        kw = {"address": opts.address} if opts.address else {"num_cpus": opts.num_cpus}
        ray.init(include_dashboard=False, log_to_driver=False, **kw)
        started = True
    try:
        task = ray.remote(num_cpus=opts.cpus_per_run, num_gpus=opts.gpus_per_run, max_retries=0)(run_unit)
        refs = {task.remote(*args): run for run, args in units}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                done(refs[ref], ray.get(ref))
    finally:
        if started:
            ray.shutdown()


def launch_slurm(units, opts: SlurmOptions, folder: Path, name: str, done):
    try:
        import submitit
    except ImportError:
        raise SweepError("launcher slurm needs the 'submitit' package: pip install 'clbench[sweep]'") from None
    ex = submitit.AutoExecutor(folder=str(folder), cluster=opts.cluster)
    params = dict(name=f"clbench-{name}", timeout_min=opts.timeout_min, cpus_per_task=opts.cpus_per_task,
                  gpus_per_node=opts.gpus_per_node, mem_gb=opts.mem_gb, slurm_partition=opts.partition,
                  slurm_array_parallelism=opts.array_parallelism,
                  slurm_additional_parameters=opts.additional or None)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    cols = list(zip(*[args for _, args in units]))
    jobs = ex.map_array(run_unit, *cols)
    print(f"submitted {len(jobs)} job(s) via submitit ({ex.cluster}): {', '.join(str(j.job_id) for j in jobs[:8])}"
          + (" ..." if len(jobs) > 8 else ""), flush=True)
    try:
        for (run, _), job in zip(units, jobs):
            try:
                res = job.result()
            except Exception as e:  # the job itself failed (killed, timed out): name it, keep the others
                res = {"rc": -1, "seconds": 0.0, "error": f"submitit job {job.job_id}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__}"}
            done(run, res)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM of the sweep: its jobs are cancelled and waited for
        cancel_jobs(jobs, [run.dir for run, _ in units])
        raise


def cancel_jobs(jobs, run_dirs: list[Path]) -> list:
    """Cancel every job of a Slurm sweep that has not ended and wait until each one's run has
    ended, so that every run records what it finished and releases its lock before the sweep goes.
    `job.cancel` is scancel on Slurm, which sends every process of the job SIGTERM; submitit's local
    executor sends its worker SIGINT, which stops the run with SIGTERM through run_unit. The job can
    be over before its run (the local executor SIGKILLs its worker a second later), so the wait is
    on the run's own lock, which the OS releases when the run's process ends. A repeated signal
    does not stop the wait. Returns the jobs cancelled."""
    live = [(j, d) for j, d in zip(jobs, run_dirs) if not j.done()]
    for j, _ in live:
        j.cancel(check=False)
    print(f"stopping: cancelled {len(live)} submitit job(s) still under way; waiting for their runs to end", flush=True)
    for j, d in live:
        for wait in (j.wait, RunDir(d).wait_unlocked):
            try:
                _wait_through_signals(wait)
            except Exception:  # noqa: BLE001 - a cancelled job's state may be unreadable; it has ended
                pass
    return [j for j, _ in live]


# --- the sweep ---------------------------------------------------------------------------------


