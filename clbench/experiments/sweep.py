"""`clbench sweep SWEEP.yaml`: a grid of runs over one base run config, in one sweep directory.

    name: lr-sweep                    # sweep directory runs/<name>/ (or --output-dir)
    base: tiny.yaml                   # the base run config (relative to this file)
    set: {train.steps: 10}            # fixed overrides for every run (like `clbench run --set`)
    grid:                             # the product of these axes is the sweep
      methods: [full_ft, lora]        # one method per run: a result name of the base config's
                                      # methods, another method's name, or a full method spec
      seeds: [0, 1]                   # one seed per run
      orders: ["1", "2"]              # one task order per run
      train.lr: [1.0e-4, 3.0e-4]      # any key path of the run config
      methods.lora.options.r: [4, 8]  # a method's option: applies to the runs holding that method
    launcher: local                   # local | ray | slurm
    parallel: 1                       # local: concurrent runs (subprocesses)
    ray: {address: null, num_cpus: null, cpus_per_run: 1, gpus_per_run: 0}
    slurm: {cluster: null, partition: null, timeout_min: 60, cpus_per_task: 2, ...}

Each grid point becomes one run directory `<sweep dir>/<run id>/`. The run id is readable and
stable: the point's values in a fixed order (method, hyperparameters as listed, order, seed),
e.g. `lora__r=8__lr=0.0003__seed=0`. A hyperparameter axis also goes into the method's result
name (`lora@r=8,lr=0.0003`), so `clbench report <sweep dir>` keeps different settings apart
while it pools seeds and orders of the same method and setting, as it does for any runs.

The expanded run configs are written to `<sweep dir>/configs/<run id>.yaml` and every one is
validated exactly as `clbench run` validates (the config, then methods and their options, tasks
and data) before the first run starts. Each run is one `python -m clbench run <config>
--output-dir <run dir>` subprocess (logs in `<sweep dir>/logs/`), launched by the local launcher
(in order, or `parallel` at a time), as Ray tasks, or as Slurm jobs through submitit.

Re-running a sweep skips the runs whose contract.json says every (method, seed) is complete under
the same config, and resumes the others from their last stage checkpoint (the run command's own
resume; the expanded configs are identical on every expansion, so the config check passes).
`clbench sweep SWEEP.yaml --fresh` runs every grid point again from scratch (`clbench run --fresh`).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from clbench.config import RunConfig, Strict, format_validation_error, load_yaml, method_index, set_path
from clbench.config import comparable_config
from clbench.errors import ClbenchError, ConfigError, SweepError
from clbench.experiments import launch
from clbench.results import contract
from clbench.results.rundir import RunDir
from clbench.run.planning import plan

AXES = ("methods", "seeds", "orders")  # grid keys that are not key paths of the run config
# Passed from the sweep's environment to every run, whatever the launcher's workers inherit.
PASS_ENV = re.compile(r"^(CLBENCH_|HF_|TRANSFORMERS_|TOKENIZERS_|WANDB_|OMP_NUM_THREADS$|MKL_NUM_THREADS$|PYTHONPATH$)")


# --- the sweep file ------------------------------------------------------------------------


class RayOptions(Strict):
    address: Optional[str] = Field(None, description="an existing Ray cluster ('auto' or host:port); default: start a local one")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs of the local cluster started here (default: all)")
    cpus_per_run: float = Field(1, gt=0, description="CPUs Ray reserves for each run")
    gpus_per_run: float = Field(0, ge=0, description="GPUs Ray reserves for each run")


class SlurmOptions(Strict):
    cluster: Optional[Literal["slurm", "local", "debug"]] = Field(
        None, description="submitit's executor: slurm, local (subprocesses on this machine), debug; default: slurm if available")
    partition: Optional[str] = None
    timeout_min: int = Field(60, gt=0)
    cpus_per_task: int = Field(2, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    mem_gb: Optional[int] = Field(None, gt=0)
    array_parallelism: int = Field(256, gt=0, description="at most this many runs at once")
    additional: dict[str, Any] = Field(default_factory=dict, description="extra sbatch options (submitit's slurm_additional_parameters)")


class SweepConfig(Strict):
    name: Optional[str] = Field(None, description="sweep directory name (default: the sweep file's stem)")
    base: str = Field(description="the base run config, relative to the sweep file")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides applied to every run (key.path: value)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axes: methods, seeds, orders or run-config key paths")
    launcher: Literal["local", "ray", "slurm"] = "local"
    parallel: int = Field(1, gt=0, description="local launcher: runs at the same time")
    output_dir: Optional[str] = Field(None, description="sweep directory (default runs/<name>; relative to the working directory)")
    ray: RayOptions = Field(default_factory=RayOptions)
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a directory)")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid):
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
            seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
            dup = sorted({s for s in seen if seen.count(s) > 1})
            if dup:
                raise ValueError(f"grid axis {key!r} lists {', '.join(dup)} twice")
        for v in grid.get("seeds", []):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"grid axis 'seeds': {v!r} is not an integer")
        for v in grid.get("orders", []):
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise ValueError(f"grid axis 'orders': {v!r} is not an order name")
        for v in grid.get("methods", []):
            if not isinstance(v, (str, dict)):
                raise ValueError(f"grid axis 'methods': {v!r} is neither a method name nor a method spec")
        return grid


# --- key paths into the run config -----------------------------------------------------------


def _strip_optional(ann):
    if typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return ann


def check_key_path(path: str, where: str) -> None:
    """A key path (`train.lr`, `methods.lora.options.r`, `stages.2.lr`) must name a field of the
    run config; a method is addressed by its result name (or list index), a method's options are free."""
    parts = path.split(".")
    if any(p == "" for p in parts):
        raise ConfigError(f"{where}: {path!r} is not a key path (empty part)")
    ann: Any = RunConfig
    done: list[str] = []
    for part in parts:
        ann = _strip_optional(ann)
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if part not in ann.model_fields:
                at = f"'{'.'.join(done)}'" if done else "the run config"
                raise ConfigError(f"{where}: {path!r}: {part!r} is not a key of {at}; allowed: {', '.join(sorted(ann.model_fields))}")
            ann = ann.model_fields[part].annotation
        elif origin is list:
            (ann,) = typing.get_args(ann) or (Any,)
        elif origin is dict:
            ann = typing.get_args(ann)[1] if typing.get_args(ann) else Any
        elif ann is Any:
            return  # free-form (a method's options): the method validates them
        else:
            raise ConfigError(f"{where}: {path!r}: '{'.'.join(done)}' is a value, it has no key {part!r}")
        done.append(part)


# --- expansion -----------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-") or "x"


class Run:
    """One grid point: its id, the values it took, and the validated run config."""

    def __init__(self, run_id: str, point: dict, raw: dict, cfg: RunConfig):
        self.id, self.point, self.raw, self.cfg = run_id, point, raw, cfg
        self.config_path: Path | None = None
        self.dir: Path | None = None
        self.log: Path | None = None
        self.status = "new"


class Sweep:
    def __init__(self, cfg: SweepConfig, path: Path, out: Path, runs: list[Run]):
        self.cfg, self.path, self.out, self.runs = cfg, path, out, runs

    @property
    def name(self) -> str:
        return self.cfg.name or self.path.stem


def load_sweep(path: str | Path, output_dir: str | Path | None = None, launcher: str | None = None,
               parallel: int | None = None) -> Sweep:
    """Read and validate the sweep file and expand and validate every run config. Writes nothing."""
    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the sweep file must be a YAML mapping, got {type(raw).__name__}")
    if launcher is not None:
        raw["launcher"] = launcher
    if parallel is not None:
        raw["parallel"] = parallel
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), SweepConfig).replace("invalid config", "invalid sweep", 1)) from None
    for key in cfg.set:
        check_key_path(key, f"{path}: set")
    for key in cfg.grid:
        if key not in AXES:
            if key in ("seed", "method"):
                raise ConfigError(f"{path}: grid: {key!r} is not an axis; did you mean {key + 's'!r}?")
            check_key_path(key, f"{path}: grid")
    base_path = (path.resolve().parent / cfg.base)
    base = load_yaml(base_path)
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: the base config must be a YAML mapping")
    name = cfg.name or path.stem
    out = Path(output_dir or cfg.output_dir or Path("runs") / name)
    runs = expand(cfg, base, base_path.parent, out, name, str(path))
    return Sweep(cfg, path, out, runs)


def with_set(base: dict, overrides: dict, where: str) -> dict:
    """A copy of the base run config with a sweep's (or tune's) `set:` overrides applied."""
    base = copy.deepcopy(base)
    for k, v in overrides.items():
        if not set_path(base, k, v, where=f"{where}: set:", missing_method="skip"):
            raise ConfigError(f"{where}: set: {k!r} names a method the base config does not hold")
    return base


def expand(cfg: SweepConfig, base: dict, base_dir: Path, out: Path, name: str, where: str) -> list[Run]:
    base = with_set(base, cfg.set, where)
    hyper = [k for k in cfg.grid if k not in AXES]
    short = {k: k.rsplit(".", 1)[-1] for k in hyper}
    for k in hyper:  # two axes ending in the same key (train.lr, methods.lora.train.lr): use the whole path
        if list(short.values()).count(short[k]) > 1:
            short[k] = k
    order = (["methods"] if "methods" in cfg.grid else []) + hyper + [a for a in ("orders", "seeds") if a in cfg.grid]
    # relative task_dirs/method_files as seen from the folder of the expanded configs
    cdir = (out / "configs").resolve()

    runs: dict[str, Run] = {}
    unit_owner: dict[tuple, str] = {}  # (the run's shared settings, a method's spec) -> the run that holds it
    applied_any: set[str] = set()
    for values in itertools.product(*[cfg.grid[k] for k in order]):
        point = dict(zip(order, values))
        raw = copy.deepcopy(base)
        if "methods" in point:
            m = point["methods"]
            if isinstance(m, str):
                i = method_index(raw.get("methods") or [], m) if not m.isdigit() else None
                m = copy.deepcopy(raw["methods"][i]) if i is not None else {"name": m}
            raw["methods"] = [m]
        applied: dict[str, Any] = {}
        labels: dict[int, list[str]] = {}
        for k in hyper:
            parts = k.split(".")
            methods = raw.get("methods") or []
            if parts[0] == "train" and len(parts) == 2:
                # a method's own train.<key> wins over the run's: the axis moves only the others
                targets = [i for i, m in enumerate(methods) if not (isinstance(m, dict) and (m.get("train") or {}).get(parts[1]) is not None)]
                if not targets:
                    continue
            elif parts[0] == "methods":
                targets = [method_index(methods, parts[1])]
            elif k in ("model", "stream", "order", "tasks"):
                targets = []  # the report groups by these anyway
            else:
                targets = range(len(methods))
            if set_path(raw, k, point[k], where=f"{where}: grid:", missing_method="skip"):
                applied[k] = point[k]
                applied_any.add(k)
                for i in targets:
                    labels.setdefault(i, []).append(f"{short[k]}={_fmt(point[k])}")
        for i, parts in labels.items():
            m = raw["methods"][i]
            if isinstance(m, dict):
                m["label"] = f"{m.get('label') or m.get('name')}@{','.join(parts)}"
        if "seeds" in point:
            raw["seeds"] = [point["seeds"]]
        if "orders" in point:
            raw["order"] = str(point["orders"])
        bits = []
        if "methods" in point:
            m = raw["methods"][0]
            bits.append(str(point["methods"]) if isinstance(point["methods"], str) else (m.get("label") or m.get("name") or "method").split("@")[0])
        bits += [f"{short[k]}={_fmt(v)}" for k, v in applied.items()]
        if "orders" in point:
            bits.append(f"order={point['orders']}")
        if "seeds" in point:
            bits.append(f"seed={point['seeds']}")
        run_id = "__".join(_safe(b) for b in bits) or "base"
        raw["name"] = f"{name}/{run_id}"
        for key in ("task_dirs", "method_files"):
            if raw.get(key):
                raw[key] = [os.path.relpath((base_dir / d).resolve(), cdir) for d in raw[key]]
        try:
            rc = RunConfig.model_validate(raw)
        except ValidationError as e:
            msg = format_validation_error(e, f"{where}: run {run_id}", RunConfig)
            raise ConfigError(msg.replace("invalid config", f"invalid run config (grid point {_point_str(point)})", 1)) from None
        if run_id in runs:
            if runs[run_id].cfg != rc:
                raise ConfigError(f"{where}: two grid points give run id {run_id!r} with different configs")
            continue
        # A method that an axis leaves alone would run again, identically, in every run of that axis
        # (full_ft beside methods.lora.options.r: [4, 8]) and the report would count it once per run:
        # it runs in the first run that holds it only.
        shared = _shared_key(rc)
        units = [(spec, (shared, json.dumps(spec.model_dump(mode="json"), sort_keys=True))) for spec in rc.methods]
        fresh = [i for i, (spec, key) in enumerate(units) if spec.mode != "sequential" or key not in unit_owner]
        if len(fresh) < len(units):
            if not fresh or all(rc.methods[i].mode != "sequential" for i in fresh):
                continue  # nothing of its own left: every sequential method runs in an earlier run
            raw["methods"] = [raw["methods"][i] for i in fresh]
            rc = RunConfig.model_validate(raw)
        for spec, key in units:
            unit_owner.setdefault(key, run_id)
        runs[run_id] = Run(run_id, {k: v for k, v in point.items() if k not in hyper or k in applied}, raw, rc)
    for k in hyper:
        if k not in applied_any:
            held = sorted({m.run_name for r in runs.values() for m in r.cfg.methods})
            why = (f"every method sets its own {k}" if k.startswith("train.") else
                   f"it names a method no run holds (methods: {', '.join(held)})")
            raise ConfigError(f"{where}: grid: {k!r} changes no run: {why}")
    return list(runs.values())


def _shared_key(rc: RunConfig) -> str:
    """What a run's methods share that bears on their results: its config without its name, its
    methods and the fields that never change results."""
    d = comparable_config(rc.model_dump(mode="json"))
    for k in ("name", "methods"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def _point_str(point: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in point.items())


# --- status of a run directory ----------------------------------------------------------------


def prepare(sweep: Sweep, validate_plans: bool = True) -> None:
    """Validate every run as `clbench run` would (methods, options, tasks, data, model) before
    anything runs, then write the expanded configs and note each run's status."""
    if validate_plans:
        cdir = (sweep.out / "configs").resolve()
        for run in sweep.runs:
            try:  # (planning also checks that a preset's release is on disk or prepared)
                plan(run.cfg, cdir)
            except ClbenchError as e:
                raise type(e)(f"sweep {sweep.path}: run {run.id}: {e}") from None

    for run in sweep.runs:
        run.config_path = sweep.out / "configs" / f"{run.id}.yaml"
        run.dir = sweep.out / run.id
        run.log = sweep.out / "logs" / f"{run.id}.log"
        text = yaml.safe_dump(run.raw, sort_keys=False)
        if not run.config_path.is_file() or run.config_path.read_text() != text:
            contract.atomic_write_text(run.config_path, text)
        run.status = RunDir(run.dir).status(run.cfg)
    contract.atomic_write_text(sweep.out / "sweep.yaml", yaml.safe_dump(
        {"source": str(sweep.path.resolve()), **sweep.cfg.model_dump(mode="json")}, sort_keys=False))


def _write_index(sweep: Sweep, outcome: dict) -> None:
    contract.write_json(sweep.out / "sweep.json", {"name": sweep.name, "launcher": sweep.cfg.launcher, "runs": [
        {"id": r.id, "point": r.point, "status": r.status, "dir": r.id, "config": f"configs/{r.id}.yaml",
         "log": f"logs/{r.id}.log", **outcome.get(r.id, {})} for r in sweep.runs]})


def run_sweep(sweep: Sweep, dry_run: bool = False, out=None, fresh: bool = False) -> dict:
    """Run what is not complete (fresh: every run, each started over as `clbench run --fresh`);
    returns {run id: status}. Raises SweepError naming failed runs."""

    out = out or sys.stdout
    with RunDir(sweep.out).lock("sweep directory"):  # one sweep (or tune) process per directory
        return _run_sweep(sweep, dry_run, out, fresh)


def _run_sweep(sweep: Sweep, dry_run: bool, out, fresh: bool) -> dict:
    prepare(sweep)
    todo = list(sweep.runs) if fresh else [r for r in sweep.runs if r.status != "complete"]
    print(f"sweep {sweep.name}: {len(sweep.runs)} run(s) in {sweep.out}; {len(sweep.runs) - len(todo)} complete, "
          f"{len(todo)} to run{' from scratch (--fresh)' if fresh else ''} (launcher {sweep.cfg.launcher})",
          file=out, flush=True)
    for r in sweep.runs:
        state = "complete, skipped" if r not in todo else f"{r.status}, starts over" if fresh else r.status
        print(f"  {r.id:48s} {state}", file=out, flush=True)
    if dry_run or not todo:
        if not dry_run:
            _write_index(sweep, {})
            print(f"nothing to run; report: clbench report {sweep.out}", file=out, flush=True)
        return {r.id: r.status for r in sweep.runs}

    cwd = os.getcwd()
    env = {k: v for k, v in os.environ.items() if PASS_ENV.match(k)}
    units = [(r, ([sys.executable, "-m", "clbench", "run", str(r.config_path.resolve()), "--output-dir", str(r.dir.resolve()),
                   *(["--fresh"] if fresh else [])], str(r.log.resolve()), cwd, env)) for r in todo]
    outcome: dict[str, dict] = {}

    def done(run: Run, res: dict):
        ok = res.get("rc") == 0
        run.status = RunDir(run.dir).status(run.cfg) if ok else "failed"
        if ok and run.status != "complete":
            run.status, ok = "failed", False
            res.setdefault("error", "the run ended without complete results")
        outcome[run.id] = {"rc": res.get("rc"), "seconds": round(res.get("seconds", 0.0), 1)}
        err = "" if ok else f": {res.get('error') or launch.last_error(run.log)} (log {run.log})"
        print(f"  {run.id:48s} {'done' if ok else 'FAILED'} in {res.get('seconds', 0.0):.1f}s{err}", file=out, flush=True)

    t0 = time.time()
    launcher = sweep.cfg.launcher
    try:
        with launch.forwarding():
            if launcher == "local":
                launch.launch_local(units, sweep.cfg.parallel, done)
            elif launcher == "ray":
                launch.launch_ray(units, sweep.cfg.ray, done)
            else:
                launch.launch_slurm(units, sweep.cfg.slurm, sweep.out / "submitit", sweep.name, done)
    except KeyboardInterrupt:
        for r in todo:
            if r.id not in outcome:
                r.status = RunDir(r.dir).status(r.cfg)
        _write_index(sweep, outcome)
        raise
    _write_index(sweep, outcome)
    failed = [r for r in todo if r.status != "complete"]
    print(f"sweep {sweep.name}: ran {len(todo)} run(s) in {time.time() - t0:.1f}s, {len(failed)} failed; "
          f"report: clbench report {sweep.out}", file=out, flush=True)
    if failed:
        raise SweepError(f"sweep {sweep.name}: {len(failed)} of {len(todo)} run(s) failed: "
                         + "; ".join(f"{r.id} ({launch.last_error(r.log)}; log {r.log})" for r in failed[:5])
                         + ("" if len(failed) <= 5 else f"; and {len(failed) - 5} more")
                         + ". Re-running the sweep resumes them.")
    return {r.id: r.status for r in sweep.runs}
