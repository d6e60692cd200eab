"""Run-directory handling around the loop: the lock, the config check, the final printout."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from .config import NON_RESULT_FIELDS
from .errors import ClbenchError
from .loop import run
from .planning import Plan
from .files import remove_unfinished_writes, write_failed
from .results import RESULT_FILES, set_run_info, write_json, write_yaml



class RunDirError(ClbenchError):
    pass


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


def comparable_config(cfg: dict) -> dict:
    """A config as compared between runs: JSON values, without the fields that do not change results."""
    cfg = json.loads(json.dumps(cfg))
    for ignore in NON_RESULT_FIELDS:
        cfg.pop(ignore, None)
    return cfg


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
    try:
        return _execute(pl, out, fresh, allow_changes, allow_data_change)
    finally:
        set_run_info(out / "results.json", None)  # later writes of that file (another command) add nothing


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


# --- results never trusted blindly: matrix.csv and summary.csv checked against results.json ---------


def load_results_json(out: Path) -> dict | None:
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


def _expected_rows(res: dict, pl: Plan, metric_of: dict) -> list[dict]:
    """The matrix.csv rows results.json vouches for (stream matrix, held-out matrix, merged and
    multitask rows), as the recorder writes them."""
    tasks = res["run"]["tasks"]
    rows = []

    def add(method, seed, stage, trained, task, value, group):
        rows.append({"method": method, "seed": int(seed), "stage": stage, "trained_task": trained or "",
                     "eval_task": task, "metric": metric_of(method, seed, task), "value": float(value), "eval_group": group})

    for m, entry in res.get("methods", {}).items():
        mode = entry.get("mode", "sequential")
        for s, se in entry.get("seeds", {}).items():
            R = se.get("matrix") or []
            if mode == "multitask":
                for i, row in enumerate(R[:2]):
                    for task, v in zip(tasks, row):
                        add(m, s, 0 if i == 0 else "multitask", "" if i == 0 else "multitask", task, v, "stream")
                continue
            for i, row in enumerate(R):
                for task, v in zip(tasks, row):
                    add(m, s, i, tasks[i - 1] if i else "", task, v, "stream")
            for group in ("heldout", "other_kind"):  # held-out probes; eval.other_kind's twins of the stream
                for i, row in enumerate(se.get(f"{group}_matrix") or []):
                    for task, v in zip(se.get(f"{group}_tasks") or [], row):
                        add(m, s, i, tasks[i - 1] if 0 < i <= len(tasks) else "", task, v, group)
            twins = set(se.get("other_kind_tasks") or [])
            for label, scores in (se.get("merged") or {}).items():
                for task, v in (scores or {}).items():
                    add(m, s, label, "", task, v, "stream" if task in tasks else "other_kind" if task in twins else "heldout")
    return rows


def _expected_summary(res: dict) -> list[dict]:
    out = []
    for m, entry in res.get("methods", {}).items():
        for s, se in entry.get("seeds", {}).items():
            summ = se.get("metrics") or {}
            if not summ:
                continue
            row = {"method": m, "seed": int(s), "mode": entry.get("mode", "sequential"), **summ,
                   "trainable_params": se.get("trainable_params"), "train_seconds": se.get("train_seconds"),
                   "eval_seconds": se.get("eval_seconds"), "peak_mem_mb": se.get("peak_mem_mb")}
            intr = (se.get("intransigence") or {}).get("mean")
            if intr is not None:
                row["intransigence"] = intr
            out.append(row)
    return out


def _read_csv_tolerant(path: Path, columns: list[str], required: list[str]) -> tuple[list[dict], int]:
    """The well-formed rows of a CSV file written by clbench.results.write_csv and the number of
    damaged lines (a line cut short, a missing field, a value that is not a number)."""
    import csv

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return [], 1
    lines = text.split("\n")
    if not lines or lines[0].split(",") != columns:
        return [], -1  # not this version's header (an older clbench's, or damaged): rebuilt whole
    good, damaged = [], 0
    body = lines[1:]
    if body and body[-1] == "":
        body = body[:-1]
    else:
        damaged += 1 if body else 0  # a file that does not end with a newline was cut short
        body = body[:-1] if body else body
    for fields in csv.reader(body):
        if len(fields) != len(columns) or any(not fields[columns.index(c)] for c in required):
            damaged += 1
            continue
        good.append(dict(zip(columns, fields)))
    return good, damaged


def _fmt_cell(v) -> str:
    from .results import _fmt

    return str(_fmt(v))


def _row_key(r) -> tuple:
    return (str(r["method"]), str(r["seed"]), str(r["stage"]), str(r["eval_task"]))


def verify_results(out: Path, pl: Plan | None, res: dict | None = None, repair: bool = True) -> list[str]:
    """Check matrix.csv and summary.csv against results.json, the record the run resumes from: a
    missing file, a damaged line, a row results.json has and the file lacks or gives another value
    is repaired by writing the file again from results.json (rows results.json does not hold, e.g.
    a stage recorded in matrix.csv just before a crash, are kept when they are well formed).
    Returns one message per repaired file; with repair=False (pl may then be None) only says what
    it would repair."""
    from .recorder import ordered_rows
    from .results import MATRIX_COLUMNS, SUMMARY_COLUMNS, write_csv

    res = res if res is not None else load_results_json(out)
    if res is None:
        return []
    said = []
    mat_file, sum_file = out / "matrix.csv", out / "summary.csv"
    have, damaged = _read_csv_tolerant(mat_file, MATRIX_COLUMNS, ["method", "seed", "stage", "eval_task", "value"]) \
        if mat_file.is_file() else ([], 0)
    metric_by = {(r["method"], r["seed"], r["eval_task"]): r["metric"] for r in have}

    def metric_of(method, seed, task):
        if (method, str(seed), task) in metric_by:
            return metric_by[(method, str(seed), task)]
        return pl.task_defs[task].metric_name if pl is not None and task in pl.task_defs else "acc"

    want = _expected_rows(res, pl, metric_of)
    have_by = {_row_key(r): r for r in have}
    wrong = [r for r in want if _row_key(r) not in have_by or have_by[_row_key(r)]["value"] != _fmt_cell(r["value"])]
    mat_existed = mat_file.is_file()
    if not mat_existed or damaged or wrong:
        want_keys = {_row_key(r) for r in want}
        rows = [{**r, "value": float(r["value"]) if _is_number(r["value"]) else r["value"]}
                for r in have if _row_key(r) not in want_keys and _is_number(r["value"])] + want
        if repair:
            write_csv(mat_file, MATRIX_COLUMNS, ordered_rows(rows, pl))
        why = ("it was missing" if not mat_existed else "its header is not this version's" if damaged < 0 else f"{damaged} damaged line(s), {len(wrong)} of results.json's {len(want)} score(s) missing or different")
        said.append(f"rebuilt matrix.csv from results.json ({why})")
    summ_want = _expected_summary(res)
    existed = sum_file.is_file()
    shave, sdamaged = _read_csv_tolerant(sum_file, SUMMARY_COLUMNS, ["method", "seed"]) if existed else ([], 0)
    sby = {(r["method"], r["seed"]): r for r in shave}
    swrong = [r for r in summ_want
              if {c: _fmt_cell(r.get(c)) for c in SUMMARY_COLUMNS} != sby.get((r["method"], str(r["seed"])))]
    if not existed or sdamaged or swrong:
        keys = {(r["method"], str(r["seed"])) for r in summ_want}
        rows = summ_want + [r for r in shave if (r["method"], r["seed"]) not in keys and r["seed"].isdigit()]
        m_ix = {s.run_name: i for i, s in enumerate(pl.method_specs)} if pl is not None else {}
        rows.sort(key=lambda r: (m_ix.get(r["method"], len(m_ix)), int(r["seed"])))
        if repair:
            write_csv(sum_file, SUMMARY_COLUMNS, rows)
        said.append("rebuilt summary.csv from results.json (" + ("it was missing" if not existed else
                    "its header is not this version's" if sdamaged < 0 else
                    f"{sdamaged} damaged line(s), {len(swrong)} of its {len(summ_want)} row(s) missing or different") + ")")
    return said


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


# --- the data a run's numbers were computed on ------------------------------------------------------


def data_fingerprint(pl: Plan) -> dict:
    """{task: {"sha256": ..., "files": {what: sha256}}} of every task the run trains or evaluates:
    its task YAML, its prepared data's manifest.json and its data files. A resume compares it with
    the one in results.json, so results never mix numbers computed on different data."""
    from . import paths
    from .files import sha256_file

    from . import method as M

    needed = []  # tasks a method reads besides the ones it is scored on (replay's general data, ...)
    for spec in pl.method_specs:
        try:
            needed += M.make(spec.name, spec.options).needs_tasks()
        except Exception:  # validated at plan time; a method that cannot be made here adds nothing
            pass
    out = {}
    for name in dict.fromkeys(pl.eval_names + needed):
        t = pl.task_defs.get(name)
        if t is None:
            continue
        files: dict[str, Path] = {}
        if t.path is not None:
            files["yaml"] = Path(t.path)
        if t.prepared:
            files["manifest"] = paths.data_dir(pl.cache) / name / "manifest.json"
        try:
            files.update({f"data:{k}": Path(v) for k, v in sorted(t.data_files(pl.cache).items())})
        except Exception:  # a hub task's data lives in lm-eval's cache: nothing here to fingerprint
            pass
        shas = {k: (_manifest_sha(f) if k == "manifest" else sha256_file(f)) for k, f in files.items() if f.is_file()}
        whole = hashlib.sha256(json.dumps(shas, sort_keys=True).encode()).hexdigest()
        out[name] = {"sha256": whole, "files": shas}
    return out


def _manifest_sha(path: Path) -> str:
    """A prepared task's manifest without its time stamp: preparing the same data again is no change."""
    from .files import sha256_file

    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return sha256_file(path)
    if isinstance(m, dict):
        m.pop("prepared_at", None)
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def check_data(out: Path, res: dict | None, fp: dict, allow_change: bool) -> tuple[list, list[str]]:
    """(the data changes results.json records, after this run's; the changed tasks) or a
    RunDirError naming the tasks whose data changed since results.json's numbers were computed."""
    if res is None:
        return [], []
    run_info = res["run"]
    before = run_info.get("data_fingerprint")
    history = list(run_info.get("data_changes") or [])
    if not isinstance(before, dict):
        return history, []  # results from before fingerprints: nothing to compare with
    changed = []
    for name, now in fp.items():
        old = before.get(name)
        if isinstance(old, dict) and old.get("sha256") != now["sha256"]:
            files = sorted(k for k in set(old.get("files") or {}) | set(now["files"])
                           if (old.get("files") or {}).get(k) != now["files"].get(k))
            changed.append(f"{name} ({', '.join(files)})")
    if changed and not allow_change:
        raise RunDirError(f"run directory {out}: the data of task(s) {'; '.join(changed)} changed since its results "
                          "were computed; its numbers would mix the two: use --fresh to start over, another "
                          "--output-dir, or --allow-data-change to continue (recorded in results.json)")
    if changed:
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "tasks": changed,
                        "before": {n: before.get(n) for n in fp if before.get(n) != fp[n]}})
    return history, changed
