"""A run directory's one owner. `RunDir` is the folder `clbench run` writes (config.yaml,
matrix.csv, summary.csv, results.json, samples/, checkpoints/): its lock, the checks before a run
writes there (the folder is clbench's; its results are this config's, or the change is allowed and
recorded), every read and write of config.yaml and results.json, the status a sweep sees, the
validation score a tune reads, and telling a tune's folder (tune.json) from a run's. The runner,
the loop's recorder, sweep, tune and report all go through it.

What the files hold is the results contract (clbench.results.contract); checking matrix.csv and
summary.csv against results.json and fingerprinting the data is clbench.results.resultcheck. Written by
hand: the run directory is clbench's own format.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from clbench.config import comparable_config
from clbench.errors import RunDirError
from clbench.files import write_failed
from clbench.results.contract import RESULT_FILES, read_csv, write_csv, write_json, write_yaml
from clbench.results.resultcheck import verify_results

TUNE_RECORD = "tune.json"  # what makes a folder a `clbench tune` directory (clbench.experiments.tune writes it)


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


def _read_results(out: Path) -> dict | None:
    """results.json of a run directory, its shape checked (None when there is none). A file that is
    not JSON, or does not have the shape a run writes, is one line naming it and the key."""
    f = out / "results.json"
    if not f.is_file():
        return None
    again = "; use --fresh to start over or another --output-dir"
    try:
        res = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"run directory {out}: {f} cannot be read ({e}){again}") from None

    def bad(where: str, what: str):
        return RunDirError(f"run directory {out}: {f} is damaged: {where} is not {what}{again}")

    if not isinstance(res, dict):
        raise bad("the file", "an object")
    if not isinstance(res.get("run"), dict) or not isinstance(res["run"].get("config"), dict):
        raise bad("run.config", "an object")
    tasks = res["run"].get("tasks")
    if not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
        raise bad("run.tasks", "a list of task names")
    if not isinstance(res.get("methods", {}), dict):
        raise bad("methods", "an object")
    num = (int, float)
    for m, entry in res.get("methods", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("seeds", {}), dict):
            raise bad(f"methods.{m}", "an object with seeds")
        for s, se in entry.get("seeds", {}).items():
            w = f"methods.{m}.seeds.{s}"
            if not isinstance(se, dict) or not str(s).lstrip("-").isdigit():
                raise bad(w, "an object under a seed number")
            for key, width in (("matrix", len(tasks)), ("heldout_matrix", len(se.get("heldout_tasks") or [])),
                               ("other_kind_matrix", len(se.get("other_kind_tasks") or []))):
                rows = se.get(key)
                if key != "matrix" and rows is None:
                    continue
                if not (isinstance(rows, list) and all(isinstance(r, list) and len(r) == width and
                                                       all(isinstance(v, num) and not isinstance(v, bool) for v in r)
                                                       for r in rows)):
                    raise bad(f"{w}.{key}", f"a list of rows of {width} numbers")
            if not isinstance(se.get("metrics", {}), dict) or not isinstance(se.get("merged", {}), dict):
                raise bad(w, "an object with metrics")
            if not isinstance(se.get("stages", []), list):
                raise bad(f"{w}.stages", "a list")
    return res


def _diff(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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


class RunDir:
    """One run directory. Reads of results.json go through `results()` (shape-checked, read once
    and kept: the runner's checks and the recorder's resume see the same record) and writes through
    `write_results`, which adds `run_info` (the data fingerprint the runner sets while it holds the
    lock) to the file's `run` object."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_info: dict | None = None
        self._results: dict | None = None
        self._read = False

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def results_file(self) -> Path:
        return self.path / "results.json"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def matrix_file(self) -> Path:
        return self.path / "matrix.csv"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.csv"

    # --- the lock -------------------------------------------------------------------------------

    def lock(self, what: str = "run directory") -> RunLock:
        return RunLock(self.path, what)

    def wait_unlocked(self) -> None:
        """Block until no process holds this directory's lock: take it and give it back at once,
        writing nothing; no lock file means no run there."""
        import fcntl

        try:
            fd = os.open(self.path / ".lock", os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- reading --------------------------------------------------------------------------------

    def results(self) -> dict | None:
        """results.json, its shape checked (None when there is none); a damaged file is one line
        naming it and the key. Read once; this object's writes keep it current."""
        if not self._read:
            self._results, self._read = _read_results(self.path), True
        return self._results

    def results_config(self) -> tuple[dict, dict] | None:
        """(the config that the directory's numbers were computed with, results.json's methods), or
        None when the directory holds no results: a config.yaml alone (a run that failed before its
        first result) binds nothing. results.json is the record: the recorder writes it last after
        each stage, so a directory holding it holds results, whatever became of matrix.csv and
        summary.csv (clbench.results.resultcheck.verify_results rebuilds them from it)."""
        res = self.results()
        if res is None:
            return None
        return res["run"]["config"], res.get("methods", {})

    def seed_result(self, method: str, seed: int) -> dict | None:
        """results.json's entry of one (method, seed), None when the file or the entry is missing or
        unreadable (a selection run that failed)."""
        try:
            entry = json.loads(self.results_file.read_text())["methods"][method]["seeds"][str(seed)]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return entry if isinstance(entry, dict) else None

    def read_rows(self) -> tuple[list[dict], list[dict]] | None:
        """(matrix.csv's rows, summary.csv's rows) as text, None when results.json or matrix.csv is
        missing (nothing to resume from)."""
        if not (self.results_file.is_file() and self.matrix_file.is_file()):
            return None
        return read_csv(self.matrix_file), read_csv(self.summary_file) if self.summary_file.is_file() else []

    def written_by_clbench(self) -> bool:
        """Whether this is a run directory clbench wrote: its results.json or config.yaml is one of
        ours (a damaged results.json still has config.yaml beside it)."""
        import yaml

        try:
            res = json.loads(self.results_file.read_text())
            if isinstance(res, dict) and isinstance(res.get("run"), dict) and "methods" in res:
                return True
        except (OSError, ValueError):
            pass
        try:
            cfg = yaml.safe_load(self.config_file.read_text())
            return isinstance(cfg, dict) and {"name", "model", "methods", "seeds", "train", "eval"} <= set(cfg)
        except (OSError, yaml.YAMLError):
            return False

    def is_tune(self) -> bool:
        """A `clbench tune` directory (its record, tune.json), not a run directory: a report reads
        its final runs."""
        return (self.path / TUNE_RECORD).is_file()

    def tune_record(self) -> dict:
        return json.loads((self.path / TUNE_RECORD).read_text())

    def status(self, cfg) -> str:
        """For a sweep: complete (results.json says every (method, seed) of `cfg` is complete,
        matrix.csv and summary.csv agree with it, and the config its numbers were computed with
        equals `cfg` but for the non-result fields: the same check as `clbench run`'s); changed
        (another config's results); partial (results or a started run to resume); new (nothing)."""
        try:
            prev = self.results_config()
            damaged = prev is not None and verify_results(self.path, None, self.results(), repair=False)
        except RunDirError:
            return "partial"
        if prev is None:
            return "partial" if self.config_file.is_file() else "new"
        if comparable_config(prev[0]) != comparable_config(cfg.model_dump(mode="json")):
            return "changed"
        for spec in cfg.methods:
            seeds = (prev[1].get(spec.run_name) or {}).get("seeds") or {}
            if not all((seeds.get(str(s)) or {}).get("complete") for s in cfg.seeds):
                return "partial"
        # matrix.csv or summary.csv missing or disagreeing with results.json: `clbench run` rebuilds them
        return "partial" if damaged else "complete"

    # --- the checks before a run writes ---------------------------------------------------------

    def check_ownership(self) -> None:
        """A directory holding a file with a results name (config.yaml, matrix.csv, ...) that clbench
        did not write is not a run directory: writing into it would overwrite the user's files."""
        foreign = [f for f in RESULT_FILES if (self.path / f).exists()]
        if foreign and not self.written_by_clbench():
            raise RunDirError(f"output directory {self.path} holds {', '.join(str(self.path / f) for f in foreign)}, "
                              "which clbench did not write (no clbench results.json or config.yaml there); a run "
                              "would overwrite it: choose another --output-dir")

    def clear(self) -> None:
        """--fresh: delete only what a run writes, and only in a directory a run wrote."""
        if self.written_by_clbench():
            for f in RESULT_FILES:
                (self.path / f).unlink(missing_ok=True)
            for d in ("samples", "checkpoints"):
                if (self.path / d).is_symlink():
                    (self.path / d).unlink()
                else:
                    shutil.rmtree(self.path / d, ignore_errors=True)
            if (self.path / "report" / "report.md").is_file() and not (self.path / "report").is_symlink():
                shutil.rmtree(self.path / "report", ignore_errors=True)  # `clbench report`'s, of the old results
        self._results, self._read = None, False

    def check_config(self, cfg, fresh: bool, allow_changes: bool = False) -> list[str]:
        """Before a run of `cfg` writes here: the directory is ours, and its results are of `cfg`
        (or the differences, when allow_changes and no complete result would disagree with them).
        fresh: clear the old results instead. Returns the differences to record."""
        self.check_ownership()
        if fresh:
            self.clear()
            return []
        prev = self.results_config()
        if prev is None:
            return []
        old, new = comparable_config(prev[0]), comparable_config(cfg.model_dump(mode="json"))
        diffs = _diff(old, new)
        if diffs and not allow_changes:
            raise RunDirError(f"run directory {self.path} holds results of a different config; differences:\n  "
                              + "\n  ".join(diffs[:20]) + "\nuse --fresh to start over, --allow-config-change to "
                              "continue from the last completed stage with the new config (e.g. after a non-finite "
                              "loss), or another --output-dir")
        if diffs:
            affected = _affected(old, new, prev[1])
            if affected:
                raise RunDirError(f"run directory {self.path}: --allow-config-change only continues unfinished methods, "
                                  f"but these results would disagree with the new config: {'; '.join(affected)}; "
                                  "differences:\n  " + "\n  ".join(diffs[:20])
                                  + "\nuse --fresh to start over or another --output-dir")
        return diffs

    # --- writing --------------------------------------------------------------------------------

    def write_config(self, cfg) -> None:
        """config.yaml: the resolved config (every default filled in), once per start of a run."""
        write_yaml(self.config_file, cfg.model_dump(mode="json"))

    def write_results(self, res: dict) -> None:
        if self.run_info and isinstance(res.get("run"), dict):
            res = {**res, "run": {**res["run"], **self.run_info}}
        write_json(self.results_file, res)
        self._results, self._read = res, True

    def write_rows(self, matrix_columns: list[str], matrix: list[dict], summary_columns: list[str],
                   summary: list[dict]) -> None:
        write_csv(self.matrix_file, matrix_columns, matrix)
        write_csv(self.summary_file, summary_columns, summary)

    def record_config_change(self, cfg, diffs: list[str]) -> None:
        """An accepted config change goes into results.json before anything runs: from now on the
        directory's config is the new one, and the change is on record even if the run stops
        before its next stage."""
        res = dict(self.results())
        run_info = dict(res.get("run") or {})
        run_info["config_changes"] = list(run_info.get("config_changes") or []) + [diffs]
        run_info["config"] = cfg.model_dump(mode="json")
        run_info["config_hash"] = cfg.hash()
        self.write_results({**res, "run": run_info})

    def record_data_change(self, fp: dict, history: list) -> None:
        """An accepted data change goes into results.json before anything runs (as a config change does)."""
        res = dict(self.results())
        self.write_results({**res, "run": {**res["run"], "data_fingerprint": fp, "data_changes": history}})
