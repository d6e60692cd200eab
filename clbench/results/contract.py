"""The results contract: what a run directory holds. Reports and outside tools read only this.

  config.yaml   the resolved config (every default filled in)
  matrix.csv    long format: method,seed,stage,trained_task,eval_task,metric,value,eval_group
                stage 0 = base model (trained_task empty); stage t = after training trained_task;
                extra rows carry a label as stage: `multitask` (the joint reference of a method
                run with mode multitask) and `merged:<how>` (a merge of the per-stage task vectors);
                eval_group = stream (a task of R), heldout (a general-ability probe) or other_kind (a stream
                task scored its other way, eval.other_kind: never trained)
  summary.csv   one row per (method, seed): method,seed,mode,acc,bwt,fwt,forgetting,la,aia,
                general_delta,intransigence,did_not_learn,trainable_params,train_seconds,eval_seconds,
                peak_mem_mb
                mode sequential: every metric of R; single: la only (mean single-task score);
                multitask: acc only (mean score of the joint model); intransigence: a sequential
                method against the run's multitask reference of the same seed
  results.json  run info, meta info and each method's matrix and metrics
  samples/      lm-eval's per-example records, samples/<method>/seed<k>/stage<t>/<task>.jsonl
                (the base model's under samples/base/stage0/)

Every file is written atomically (temp file + rename): a crash never leaves half a file, only
the temp file `.clbench-tmp-<pid>-<8 random characters>-<name>` beside it, which the next run of
the directory deletes (clbench.files.remove_unfinished_writes). clbench.checkpoint writes its files the same way.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from clbench.files import WriteError, atomic_write, temp_file, write_failed  # noqa: F401  (the writers' errors, re-exported)

# The results contract: what a run directory holds, written by the loop (clbench.results.recorder) and
# read by everything else (clbench.results.rundir, clbench.report.build, outside tools) from these names only.
RESULT_FILES = ("config.yaml", "matrix.csv", "summary.csv", "results.json")
MATRIX_COLUMNS = ["method", "seed", "stage", "trained_task", "eval_task", "metric", "value", "eval_group"]
MATRIX_OPTIONAL = ("eval_group",)  # absent in files written before held-out probes existed: read as "stream"
METRIC_COLUMNS = ["acc", "bwt", "fwt", "forgetting", "la", "aia", "general_delta", "intransigence"]
COST_COLUMNS = ["trainable_params", "train_seconds", "eval_seconds", "peak_mem_mb"]
# did_not_learn: the tasks (";"-separated) whose learning gain R[i, i] - R[0, i] is not above
# clbench.results.stats.LEARN_MARGIN in this (method, seed); empty = learned every task
FLAG_COLUMNS = ["did_not_learn"]
SUMMARY_COLUMNS = ["method", "seed", "mode", *METRIC_COLUMNS, *FLAG_COLUMNS, *COST_COLUMNS]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: format_cell(r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def format_cell(v):
    """A value as matrix.csv and summary.csv write it: None empty, a float by repr (exact)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_yaml(path: Path, obj) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_samples(folder: Path, samples: dict[str, list]) -> None:
    for task, records in samples.items():
        lines = [json.dumps(r, default=_json_default) for r in records]
        atomic_write_text(folder / f"{task}.jsonl", "\n".join(lines) + ("\n" if lines else ""))
