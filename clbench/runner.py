"""Run-directory handling around the loop: the lock, the config check, the final printout."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from .config import comparable_config
from .errors import ClbenchError, RunDirError
from .loop import run
from .planning import Plan
from .files import remove_unfinished_writes, write_failed
from .results import RESULT_FILES, set_run_info, write_json, write_yaml
from .resultcheck import check_data, data_fingerprint, load_results_json, verify_results



class RunLock:
    """One process per run directory: an exclusive flock on `<out>/.lock`, which holds the
    holder's pid for the message others get. The OS releases the lock when its process ends
    (a SIGKILL included), so a lock left by a dead process is never mistaken for a live one.

    fcntl.flock rather than the filelock package: filelock opens its file with O_TRUNC, so every
    process that merely tries the lock would erase the holder's pid."""

    def __init__(self, out: Path, what: str = "run directory"):
        self.path = out / ".lock"
        self.what = what
        self._fd: int | None = None

    def __enter__(self):
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunDirError(f"output directory {self.path.parent} is not a directory") from None
        except OSError as e:
            raise RunDirError(f"cannot create the output directory {self.path.parent}: {e.strerror}") from None
        try:  # a lock file holds a pid (or nothing, for an instant): anything else is someone else's file
            text = self.path.read_bytes()[:64]
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            text = b""
        if self.path.is_dir() or (text.strip() and not text.strip().isdigit()):
            raise RunDirError(f"{self.what} {self.path.parent} holds {self.path}, which clbench did not write (a "
                              "clbench lock file holds a process id); choose another directory") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"cannot write in the output directory {self.path.parent}: {e.strerror} "
                                  f"({self.path})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirError(f"{self.what} {self.path.parent} is in use by process {self._holder()} "
                                  f"(lock file {self.path}); wait for it or stop it") from None
            # The holder before us may have deleted the file after we opened it (__exit__): then we
            # hold a lock on a file nobody else sees, and must lock the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            os.close(fd)
            raise write_failed(self.path, e) from None
        self._fd = fd
        return self

    def _holder(self) -> str:
        """The holder's pid; it writes it right after taking the lock, so an empty file is read again."""
        for _ in range(200):
            try:
                pid = self.path.read_text().strip()
            except FileNotFoundError:
                pid = ""
            if pid:
                return pid
            time.sleep(0.005)
        return "(pid not known)"

    def __exit__(self, *exc):
        # Deleted while still locked, so no other process can have taken it meanwhile; one that
        # opened the old file before the delete notices the inode change above.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _diff(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def results_config(out: Path) -> tuple[dict, dict] | None:
    """(the config that the directory's numbers were computed with, results.json's methods), or
    None when the directory holds no results: a config.yaml alone (a run that failed before its
    first result) binds nothing. results.json is the record: the recorder writes it last after
    each stage, so a directory holding it holds results, whatever became of matrix.csv and
    summary.csv (verify_results rebuilds them from it)."""
    res = load_results_json(out)  # a damaged one: one line naming it
    if res is None:
        return None
    return res["run"]["config"], res.get("methods", {})


def _complete_entries(methods: dict) -> dict[str, list[str]]:
    return {name: [s for s, e in m.get("seeds", {}).items() if e.get("complete")] for name, m in methods.items()}


def _affected(old: dict, new: dict, methods: dict) -> list[str]:
    """The results the config change would leave disagreeing with the config: a complete
    (method, seed) is never run again, so any change that bears on it. Changes outside `methods`
    bear on every method; a method's own entry only on that method (by result name); a method
    dropped from the config leaves its results behind."""
    done = _complete_entries(methods)
    spec = {m.get("label") or m["name"]: m for m in old.get("methods", [])}
    new_spec = {m.get("label") or m["name"]: m for m in new.get("methods", [])}
    shared = {k: v for k, v in old.items() if k != "methods"} != {k: v for k, v in new.items() if k != "methods"}
    out = []
    for name in methods:
        if name not in new_spec:
            out.append(f"{name} (not in the new config, its results stay in the directory)")
        elif (shared or spec.get(name) != new_spec[name]) and done.get(name):
            out.append(f"{name} seed {', '.join(done[name])} (complete: it would not be run again)")
    return out


def _written_by_clbench(out: Path) -> bool:
    """Whether `out` is a run directory clbench wrote: its results.json or config.yaml is one of
    ours (a damaged results.json still has config.yaml beside it)."""
    import yaml

    try:
        res = json.loads((out / "results.json").read_text())
        if isinstance(res, dict) and isinstance(res.get("run"), dict) and "methods" in res:
            return True
    except (OSError, ValueError):
        pass
    try:
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        return isinstance(cfg, dict) and {"name", "model", "methods", "seeds", "train", "eval"} <= set(cfg)
    except (OSError, yaml.YAMLError):
        return False


def check_ownership(out: Path) -> None:
    """A directory holding a file with a results name (config.yaml, matrix.csv, ...) that clbench
    did not write is not a run directory: writing into it would overwrite the user's files."""
    foreign = [f for f in RESULT_FILES if (out / f).exists()]
    if foreign and not _written_by_clbench(out):
        raise RunDirError(f"output directory {out} holds {', '.join(str(out / f) for f in foreign)}, which clbench "
                          "did not write (no clbench results.json or config.yaml there); a run would overwrite "
                          "it: choose another --output-dir")


def check_run_dir(pl: Plan, out: Path, fresh: bool, allow_changes: bool = False) -> list[str]:
    check_ownership(out)
    if fresh:  # only what a run writes, and only in a directory a run wrote
        if _written_by_clbench(out):
            for f in RESULT_FILES:
                (out / f).unlink(missing_ok=True)
            for d in ("samples", "checkpoints"):
                if (out / d).is_symlink():
                    (out / d).unlink()
                else:
                    shutil.rmtree(out / d, ignore_errors=True)
            if (out / "report" / "report.md").is_file() and not (out / "report").is_symlink():
                shutil.rmtree(out / "report", ignore_errors=True)  # `clbench report`'s, of the old results
        return []
    prev = results_config(out)
    if prev is None:
        return []
    old, new = comparable_config(prev[0]), comparable_config(pl.cfg.model_dump(mode="json"))
    diffs = _diff(old, new)
    if diffs and not allow_changes:
        raise RunDirError(f"run directory {out} holds results of a different config; differences:\n  "
                          + "\n  ".join(diffs[:20]) + "\nuse --fresh to start over, --allow-config-change to continue "
                          "from the last completed stage with the new config (e.g. after a non-finite loss), "
                          "or another --output-dir")
    if diffs:
        affected = _affected(old, new, prev[1])
        if affected:
            raise RunDirError(f"run directory {out}: --allow-config-change only continues unfinished methods, but "
                              f"these results would disagree with the new config: {'; '.join(affected)}; "
                              "differences:\n  " + "\n  ".join(diffs[:20])
                              + "\nuse --fresh to start over or another --output-dir")
    return diffs


def record_config_change(out: Path, cfg, diffs: list[str]) -> None:
    """Write an accepted config change into results.json before anything runs: from now on the
    directory's config (config.yaml, results.json) is the new one, and the change is on record
    even if the run stops before its next stage."""
    res_file = out / "results.json"
    res = json.loads(res_file.read_text())
    run_info = res.setdefault("run", {})
    run_info["config_changes"] = list(run_info.get("config_changes") or []) + [diffs]
    run_info["config"] = cfg.model_dump(mode="json")
    run_info["config_hash"] = cfg.hash()
    write_json(res_file, res)
    write_yaml(out / "config.yaml", cfg.model_dump(mode="json"))


def record_data_change(out: Path, fp: dict, history: list) -> None:
    """An accepted data change goes into results.json before anything runs (as a config change does)."""
    res_file = out / "results.json"
    res = json.loads(res_file.read_text())
    res["run"].update(data_fingerprint=fp, data_changes=history)
    write_json(res_file, res)


def execute(pl: Plan, out: Path, fresh: bool = False, allow_changes: bool = False, allow_data_change: bool = False):
    from . import distributed as D

    try:
        rec = _execute(pl, out, fresh, allow_changes, allow_data_change)
    finally:
        set_run_info(out / "results.json", None)  # later writes of that file (another command) add nothing
    D.finish()
    return rec


def _execute(pl: Plan, out: Path, fresh: bool, allow_changes: bool, allow_data_change: bool):
    from rich.console import Console

    from . import distributed as D
    from .runtime import select_device

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
                res = load_results_json(out)
                fp = data_fingerprint(pl)
                history, data_changed = check_data(out, res, fp, allow_data_change)
                for line in verify_results(out, pl, res):
                    console.print(line, soft_wrap=True)
                # every results.json this run writes carries the fingerprint (clbench.results.run_info)
                set_run_info(out / "results.json", {"data_fingerprint": fp, "data_changes": history})
                if data_changed:
                    record_data_change(out, fp, history)
                    console.print("data changed (--allow-data-change, recorded in results.json data_changes): "
                                  + "; ".join(data_changed), soft_wrap=True)
            except ClbenchError as e:
                if not D.enabled():
                    raise
                err = str(e)
        changes, err = D.broadcast((changes, err))
        if err:  # every rank stops, not only rank 0
            raise RunDirError(err)
        if changes and D.is_main():
            record_config_change(out, pl.cfg, changes)
            console.print(f"config changed ({len(changes)} difference(s), recorded in results.json config_changes): "
                          + "; ".join(changes[:5]), soft_wrap=True)
        rec = run(pl, out, console)
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
    cols = ["method", "seed", "mode", "acc", "bwt", "fwt", "forgetting", "la", "intransigence", "did_not_learn",
            "trainable_params", "train_seconds", "eval_seconds", "peak_mem_mb"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rec.summary:
        t.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else ("–" if r.get(c) is None else str(r.get(c)))
                    for c in cols])
    console.print(t)
    console.print(f"results in {rec.out}")
