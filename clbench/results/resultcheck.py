"""A run directory's results never trusted blindly: results.json is the record a run resumes from;
matrix.csv and summary.csv are checked against it on every run of the directory and rebuilt from it
when missing, cut or different; and the data behind the numbers is fingerprinted (each task's YAML,
manifest and data files), so a resume over changed data is refused. Written by hand: the results
contract is clbench's own (clbench/results/contract.py)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clbench.method import make_method
from clbench import paths
from clbench.errors import RunDirError
from clbench.files import sha256_file
from clbench.results.contract import MATRIX_COLUMNS, SUMMARY_COLUMNS, write_csv
from clbench.results.contract import format_cell
from clbench.results.recorder import ordered_rows

if TYPE_CHECKING:
    from clbench.run.planning import Plan


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
            if mode == "multitask":  # two rows: the base model's (stage 0) and the joint model's
                label = lambda i: 0 if i == 0 else "multitask"  # noqa: E731
                trained = lambda i: "" if i == 0 else "multitask"  # noqa: E731
                R = R[:2]
            else:
                label = lambda i: i  # noqa: E731
                trained = lambda i: tasks[i - 1] if 0 < i <= len(tasks) else ""  # noqa: E731
            for i, row in enumerate(R):
                for task, v in zip(tasks, row):
                    add(m, s, label(i), trained(i), task, v, "stream")
            for group in ("heldout", "other_kind"):  # held-out probes; eval.other_kind's twins of the stream
                for i, row in enumerate((se.get(f"{group}_matrix") or [])[:len(R)]):
                    for task, v in zip(se.get(f"{group}_tasks") or [], row):
                        add(m, s, label(i), trained(i), task, v, group)
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
    """The well-formed rows of a CSV file written by clbench.results.contract.write_csv and the number of
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
    return str(format_cell(v))


def _row_key(r) -> tuple:
    return (str(r["method"]), str(r["seed"]), str(r["stage"]), str(r["eval_task"]))


def verify_results(out: Path, pl: Plan | None, res: dict | None, repair: bool = True) -> list[str]:
    """Check matrix.csv and summary.csv against `res` (results.json, read by clbench.results.rundir.RunDir), the record the run resumes from: a
    missing file, a damaged line, a row results.json has and the file lacks or gives another value
    is repaired by writing the file again from results.json (rows results.json does not hold, e.g.
    a stage recorded in matrix.csv just before a crash, are kept when they are well formed).
    Returns one message per repaired file; with repair=False (pl may then be None) only says what
    it would repair."""
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
    needed = []  # tasks a method reads besides the ones it is scored on (replay's general data, ...)
    for spec in pl.method_specs:
        try:
            needed += make_method(spec.name, spec.options).needs_tasks()
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
