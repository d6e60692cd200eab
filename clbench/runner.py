"""Run-directory handling around the loop: the lock, the config check, the final printout."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import yaml

from .config import NON_RESULT_FIELDS
from .errors import ClbenchError
from .loop import Plan, run
from .results import remove_unfinished_writes

RESULT_FILES = ("config.yaml", "matrix.csv", "summary.csv", "results.json")


class RunDirError(ClbenchError):
    pass


class RunLock:
    """One process per run directory. A lock whose process is gone is stale and taken over."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid) and pid != os.getpid():
                    raise RunDirError(f"run directory {self.path.parent} is in use by process {pid} "
                                      f"(lock file {self.path}); wait for it or stop it") from None
                self.path.unlink(missing_ok=True)  # stale lock: its process is gone

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _diff(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_run_dir(pl: Plan, out: Path, fresh: bool, allow_changes: bool = False) -> list[str]:
    old_cfg = out / "config.yaml"
    if fresh:
        for f in RESULT_FILES:
            (out / f).unlink(missing_ok=True)
        for d in ("samples", "checkpoints", "report"):
            shutil.rmtree(out / d, ignore_errors=True)
        return []
    if old_cfg.is_file():
        old = yaml.safe_load(old_cfg.read_text()) or {}
        new = json.loads(json.dumps(pl.cfg.model_dump(mode="json")))
        for ignore in NON_RESULT_FIELDS:
            old.pop(ignore, None)
            new.pop(ignore, None)
        diffs = _diff(old, new)
        if diffs and not allow_changes:
            raise RunDirError(f"run directory {out} holds results of a different config; differences:\n  "
                              + "\n  ".join(diffs[:20]) + "\nuse --fresh to start over, --allow-config-change to continue "
                              "from the last completed stage with the new config (e.g. after a non-finite loss), "
                              "or another --output-dir")
        return diffs
    return []


def execute(pl: Plan, out: Path, fresh: bool = False, allow_changes: bool = False):
    from rich.console import Console

    from . import distributed as D
    from .loop import select_device

    D.init(cpu=select_device(pl.cfg)[0].type == "cpu")
    console = Console(stderr=True, quiet=not D.is_main())
    # One process owns the run directory; with several (accelerate launch / torchrun) that is rank 0.
    with RunLock(out) if D.is_main() else contextlib.nullcontext():
        changes = err = None
        if D.is_main():
            try:
                changes = check_run_dir(pl, out, fresh, allow_changes)
                for f in remove_unfinished_writes(out):
                    console.print(f"removed {f.relative_to(out)}: the temp file of a write that was interrupted", soft_wrap=True)
            except ClbenchError as e:
                if not D.enabled():
                    raise
                err = str(e)
        changes, err = D.broadcast((changes, err))
        if err:  # every rank stops, not only rank 0
            raise RunDirError(err)
        rec = run(pl, out, console, config_changes=changes)
    if D.is_main():
        print_results(rec, Console(width=max(120, Console().width)))
    return rec


def print_results(rec, console) -> None:
    from rich.table import Table

    names = rec.plan.task_names
    for name, m in rec.methods.items():
        mode = m.get("mode", "sequential")
        for seed, s in m["seeds"].items():
            what = {"sequential": "accuracy matrix R[stage, task]", "single": "single-task reference (row t: task t alone)",
                    "multitask": "multitask reference (one joint model)"}[mode]
            t = Table(title=f"{name} (seed {seed}): {what}")
            t.add_column("stage")
            for task in names:
                t.add_column(task, justify="right")
            trained = ["base"] + (["multitask"] if mode == "multitask" else names)
            for i, row in enumerate(s["matrix"]):
                t.add_row(f"{i} {trained[i]}" if mode != "multitask" or i == 0 else "multitask", *[f"{v:.3f}" for v in row])
            for label, scores in (s.get("merged") or {}).items():
                t.add_row(label, *[f"{scores[task]:.3f}" for task in names])
            console.print(t)
    t = Table(title="summary")
    cols = ["method", "seed", "mode", "acc", "bwt", "fwt", "forgetting", "la", "intransigence", "trainable_params",
            "train_seconds", "eval_seconds", "peak_mem_mb"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rec.summary:
        t.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else ("–" if r.get(c) is None else str(r.get(c)))
                    for c in cols])
    console.print(t)
    console.print(f"results in {rec.out}")
