"""`clbench tune TUNE.yaml`: choose each method's setting on validation data, then run the winners on test.

    name: cls4-tuned                  # tune directory runs/<name>/ (or --output-dir)
    base: ../demo.yaml                # the base run config (relative to this file)
    set: {eval.limit: 100}            # overrides for every run (key.path: value)
    methods:                          # result names of the base config's methods (or method names)
      full_ft: {}                     # {} or null: the default grid, train.lr over lr_grid
      lora: {train.lr: [1.0e-4, 3.0e-4, 1.0e-3], options.r: [8, 16]}   # any method key path
    lr_grid: [1.0e-5, 3.0e-5, 1.0e-4]
    select:
      protocol: final                 # final: validation ACC after the whole stream
                                      # first_k: validation ACC after the first k tasks, trained on those
                                      # k only (Chaudhry et al. 2019, A-GEM, arXiv 1812.00420)
      k: 2
      seed: 0                         # the selection runs' seed
      order: null                     # the selection runs' order (default: the base config's)
    final: {seeds: [0, 1, 2], orders: null}   # the winners' test runs (orders default: the base config's)
    launcher: local                   # local | ray | slurm, parallel, ray, slurm: as in clbench sweep

Two phases, each a sweep (clbench.experiments.sweep: the same expansion, validation, launching and resume):

1. selection, `<tune dir>/select/`: every candidate (the product of a method's candidate axes) runs on
   the stream's *validation variants*: for each task a generated task YAML, the same lm-eval YAML
   with its validation file as the test split (`<tune dir>/validation_tasks/`, task `<name>__validation`),
   so validation scores go through lm-eval exactly as test scores do, and no run of this phase names a
   test file (tested: it succeeds with the test files gone). The score is the mean of the last row of
   the validation matrix (ACC on validation; with first_k the run has only the first k tasks).
2. final, `<tune dir>/final/`: each method's winner (the highest score; a tie goes to the candidate
   listed first) runs on the test splits over the final seeds x orders, under its result name with
   the setting (`lora@lr=0.001`).

`<tune dir>/tune.json` holds every candidate, its validation score and the winner of each method;
`clbench report <tune dir>` reports the final runs with a tuning section. Re-running the command
skips complete runs and resumes the others, as sweeps do; `--dry-run` lists both phases' runs.
Where the winner has changed since a final run ran (a grid widened afterwards), that run's
directory is moved to `<tune dir>/superseded/` (listed in tune.json) and the winner runs afresh.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from clbench.method import available, load_builtin_methods
from clbench import paths
from clbench.config import RunConfig, Seed, Strict, format_validation_error, load_yaml, method_index
from clbench.data.tasks import load_streams, load_tasks, resolve_stream
from clbench.data.prepare import validation_file
from clbench.errors import ConfigError
from clbench.experiments.launch import last_error
from clbench.experiments.sweep import (RayOptions, SlurmOptions, Sweep, SweepConfig, SweepError, check_key_path, expand,
                                       run_sweep, with_set)
from clbench.results import contract
from clbench.results.rundir import RunDir

VARIANT = "__validation"  # a task's validation variant is named <task>__validation


class SelectOptions(Strict):
    protocol: Literal["final", "first_k"] = Field(
        "final", description="final: validation ACC after the whole stream; first_k: after the first k tasks")
    k: Optional[int] = Field(None, gt=0, description="first_k: how many tasks of the stream (required)")
    seed: Seed = Field(0, description="the seed of every selection run")
    order: Optional[str] = Field(None, description="the selection runs' task order (default: the base config's)")


class FinalOptions(Strict):
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    orders: Optional[list[str]] = Field(None, description="default: the base config's order")


class TuneConfig(Strict):
    name: Optional[str] = None
    base: str = Field(description="the base run config, relative to the tune file")
    set: dict[str, Any] = Field(default_factory=dict)
    methods: dict[str, Optional[dict[str, list[Any]]]] = Field(
        description="method result name -> {key path inside the method (train.lr, options.r): candidate values}")
    lr_grid: list[float] = Field(default_factory=lambda: [1.0e-5, 3.0e-5, 1.0e-4, 3.0e-4], min_length=1)
    select: SelectOptions = Field(default_factory=SelectOptions)
    final: FinalOptions = Field(default_factory=FinalOptions)
    launcher: Literal["local", "ray", "slurm"] = "local"
    parallel: int = Field(1, gt=0)
    output_dir: Optional[str] = None
    ray: RayOptions = Field(default_factory=RayOptions)
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        if not v:
            raise ValueError("name at least one method to tune")
        for m, axes in v.items():
            for key, values in (axes or {}).items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{m}: {key!r} needs a non-empty list of candidate values")
        return v


class Tune:
    def __init__(self, cfg: TuneConfig, path: Path, out: Path, base: dict, base_dir: Path, tasks: list[str],
                 orders: list[str], select_order: str):
        self.cfg, self.path, self.out, self.base, self.base_dir = cfg, path, out, base, base_dir
        self.tasks, self.orders, self.select_order = tasks, orders, select_order

    @property
    def name(self) -> str:
        return self.cfg.name or self.path.stem


# --- loading ---------------------------------------------------------------------------------------


def load_tune(path: str | Path, output_dir: str | Path | None = None) -> Tune:
    """Read and validate the tune file and its base config; resolve the stream's tasks. Writes nothing."""
    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the tune file must be a YAML mapping, got {type(raw).__name__}")
    try:
        cfg = TuneConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), TuneConfig).replace("invalid config", "invalid tune file", 1)) from None
    if cfg.select.protocol == "first_k" and cfg.select.k is None:
        raise ConfigError(f"{path}: select.k: protocol first_k needs k, the number of tasks to tune on")
    for key in cfg.set:
        check_key_path(key, f"{path}: set")
    base_path = path.resolve().parent / cfg.base
    base = load_yaml(base_path)
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: the base config must be a YAML mapping")
    for m, axes in cfg.methods.items():
        if method_index(base.get("methods") or [], m) is None and not _known_method(m):
            raise ConfigError(f"{path}: methods: {m!r} is neither a result name of {base_path} nor a method")
        for key in (axes or {}):
            check_key_path(f"methods.0.{key}", f"{path}: methods.{m}")
    # the stream, order and task dirs every run will see: the base with `set:` applied (a `set: {stream: ...}`
    # over a base of another stream must tune on the set stream's tasks)
    eff = with_set(base, cfg.set, str(path))
    rc = RunConfig.model_validate({**eff, **({} if "methods" in eff else {"methods": [{"name": "full_ft"}]})})
    dirs = [(base_path.parent / d).resolve() for d in rc.task_dirs]
    defs = load_tasks(dirs)
    streams = load_streams(dirs, defs)
    order = cfg.select.order or rc.order
    tasks = resolve_stream(rc.model_copy(update={"order": order}), defs, streams)
    if cfg.select.protocol == "first_k" and cfg.select.k > len(tasks):
        raise ConfigError(f"{path}: select.k = {cfg.select.k} but the stream has {len(tasks)} tasks")
    orders = cfg.final.orders or [rc.order]
    name = cfg.name or path.stem
    out = Path(output_dir or cfg.output_dir or Path("runs") / name)
    return Tune(cfg, path, out, base, base_path.parent, tasks, orders, order)


def _known_method(name: str) -> bool:
    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    return name in available()


# --- validation variants ---------------------------------------------------------------------------


class _Function(str):
    """An lm-eval `!function module.name` tag, kept as written when a task YAML is copied."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, v: dumper.represent_scalar("!function", str(v)))


def write_validation_tasks(tune: Tune, cache: Path) -> list[Path]:
    """The validation variant of every stream task, one folder per source folder (the modules its
    `!function` tags name linked beside it). Returns the folders (task_dirs of the selection runs)."""
    rc = RunConfig.model_validate({**tune.base, "methods": [{"name": "full_ft"}]})
    defs = load_tasks([(tune.base_dir / d).resolve() for d in rc.task_dirs])
    root = tune.out / "validation_tasks"
    folders: dict[Path, Path] = {}
    for name in tune.tasks:
        td = defs[name]
        src = td.path.parent
        dest = folders.setdefault(src, root / str(len(folders)))
        dest.mkdir(parents=True, exist_ok=True)
        raw = yaml.load(td.path.read_text(encoding="utf-8"), Loader=_Loader)
        cl = dict(raw.get("clbench") or {})
        data = {"test": str(validation_file(td, cache))}
        if "train" in td.data_files(cache):
            data["train"] = str(td.data_files(cache)["train"])
        cl["data"] = data
        cl["description"] = f"validation split of {name}: {cl.get('description', '')}".strip()
        raw.update(task=name + VARIANT, clbench=cl)
        text = yaml.dump(raw, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        target = dest / f"{name}{VARIANT}.yaml"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
        for mod in src.glob("*.py"):
            link = dest / mod.name
            if mod.name != "__init__.py" and not link.exists():
                link.symlink_to(mod.resolve())
    return list(folders.values())


# --- the two phases -------------------------------------------------------------------------------


def _sweep_cfg(tune: Tune, name: str) -> SweepConfig:
    c = tune.cfg
    return SweepConfig(name=name, base=str(tune.path), set=c.set, launcher=c.launcher, parallel=c.parallel,
                       ray=c.ray, slurm=c.slurm)


def _candidate_axes(tune: Tune, m: str) -> dict[str, list]:
    axes = tune.cfg.methods[m] or {"train.lr": tune.cfg.lr_grid}
    return {f"methods.{m}.{k}": v for k, v in axes.items()}


def selection_sweep(tune: Tune, task_dirs: list[Path]) -> Sweep:
    """The candidates of every method on the validation variants (one seed, one order)."""
    base = copy.deepcopy(tune.base)
    tasks = tune.tasks[: tune.cfg.select.k] if tune.cfg.select.protocol == "first_k" else tune.tasks
    base.pop("stream", None)
    base["tasks"] = [t + VARIANT for t in tasks]
    base["order"] = "1"
    base["heldout"] = []  # general-ability probes say nothing about the choice
    base["stages"] = {(k + VARIANT if k in tasks else k): v for k, v in (base.get("stages") or {}).items()
                      if not k.isdigit() or int(k) <= len(tasks)}
    base["task_dirs"] = [str((tune.base_dir / d).resolve()) for d in base.get("task_dirs") or []] + \
                        [str(d.resolve()) for d in task_dirs]
    out = tune.out / "select"
    runs = []
    for m in tune.cfg.methods:
        grid = {"methods": [m], **_candidate_axes(tune, m), "seeds": [tune.cfg.select.seed]}
        sc = _sweep_cfg(tune, f"{tune.name}-select").model_copy(update={"grid": grid})
        runs += expand(sc, base, tune.base_dir, out, f"{tune.name}/select", f"{tune.path}: methods.{m}")
    return Sweep(_sweep_cfg(tune, f"{tune.name}-select"), tune.path, out, runs)


def validation_score(run_dir: Path, label: str, seed: int) -> float:
    """The mean of the last row of a selection run's matrix (validation ACC), NaN when not complete."""
    entry = RunDir(run_dir).seed_result(label, seed)
    if not (entry and entry.get("complete")):
        return math.nan
    last = entry["matrix"][-1]
    return float(sum(last) / len(last))


def choose(tune: Tune, select: Sweep) -> dict:
    """tune.json's `methods`: every candidate with its setting and validation score, and the winner."""
    out = {}
    for m in tune.cfg.methods:
        cands = []
        for r in select.runs:
            spec = r.raw["methods"][0]
            if (spec.get("label") or spec["name"]).split("@")[0] != m:
                continue
            label = spec.get("label") or spec["name"]
            setting = {k.split(".", 2)[2]: v for k, v in r.point.items() if k.startswith("methods.")}
            score = validation_score(select.out / r.id, label, tune.cfg.select.seed)
            cand = {"run": r.id, "label": label, "setting": setting, "method": spec, "score": score,
                    "status": "complete" if not math.isnan(score) else r.status or "not complete"}
            if r.status == "failed" and math.isnan(score):
                cand["error"] = last_error(select.out / "logs" / f"{r.id}.log")
            cands.append(cand)
        # a failed candidate is left out (recorded with its error); any other unfinished one leaves no winner
        scored = [c for c in cands if not math.isnan(c["score"])]
        pending = [c for c in cands if math.isnan(c["score"]) and c["status"] != "failed"]
        winner = max(scored, key=lambda c: c["score"]) if scored and not pending else None  # first on a tie
        out[m] = {"candidates": [{k: v for k, v in c.items() if k != "method"} for c in cands],
                  "winner": winner}
    return out


def final_sweep(tune: Tune, chosen: dict) -> Sweep:
    """Each winner on the test splits over the final seeds x orders."""
    base = copy.deepcopy(tune.base)
    out = tune.out / "final"
    runs = []
    for m, c in chosen.items():
        grid = {"methods": [c["winner"]["method"]], "seeds": tune.cfg.final.seeds, "orders": tune.orders}
        sc = _sweep_cfg(tune, f"{tune.name}-final").model_copy(update={"grid": grid})
        runs += expand(sc, base, tune.base_dir, out, f"{tune.name}/final", f"{tune.path}: final {m}")
    return Sweep(_sweep_cfg(tune, f"{tune.name}-final"), tune.path, out, runs)


SUPERSEDED = "superseded"  # <tune dir>/superseded/<run id>.<n>: final runs of an earlier winner


def set_aside_changed(tune: Tune, final: Sweep, out) -> list[str]:
    """Final runs whose directory holds the results of another config (the winner changed since
    they ran: a widened grid, a candidate completed later) are moved to <tune dir>/superseded/
    (kept, not deleted) so that the winner's runs start there afresh; each is said, and returned
    (paths relative to the tune directory) for tune.json. A run directory in use is refused."""
    moved = []
    for run in final.runs:
        rd = RunDir(final.out / run.id)  # where the final sweep keeps the run (clbench.experiments.sweep.prepare)
        if rd.status(run.cfg) != "changed":
            continue
        with rd.lock("final run directory"):
            n = 1
            while (tune.out / SUPERSEDED / f"{run.id}.{n}").exists():
                n += 1
            dest = tune.out / SUPERSEDED / f"{run.id}.{n}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(rd.path, dest)
        (dest / ".lock").unlink(missing_ok=True)
        moved.append(str(dest.relative_to(tune.out)))
        print(f"  {run.id}: its results are of another config (an earlier winner); moved to {moved[-1]}, "
              "the winner's run starts afresh", file=out, flush=True)
    return moved


def _write_record(tune: Tune, chosen: dict, final: Sweep | None, moved: list[str] = ()) -> None:
    earlier = []
    if RunDir(tune.out).is_tune():
        earlier = list((RunDir(tune.out).tune_record().get("final") or {}).get("superseded") or [])
    c = tune.cfg
    contract.write_json(tune.out / "tune.json", {
        "name": tune.name, "source": str(tune.path.resolve()),
        "select": {"protocol": c.select.protocol, "k": c.select.k, "seed": c.select.seed,
                   "order": tune.select_order, "score": "validation ACC: mean of the last row of the validation matrix",
                   "tasks": tune.tasks[: c.select.k] if c.select.protocol == "first_k" else tune.tasks},
        "methods": chosen,
        "final": {"dir": "final", "seeds": c.final.seeds, "orders": tune.orders,
                  "runs": [r.id for r in final.runs] if final else [], "superseded": earlier + list(moved)}})


def run_tune(tune: Tune, dry_run: bool = False, fresh: bool = False, select_only: bool = False, out=None) -> dict:
    """Selection, then the winners' final runs (unless select_only). Returns tune.json's content.
    One tune process per tune directory (a lock on it, as `clbench run` holds one on a run's)."""

    with RunDir(tune.out).lock("tune directory"):
        return _run_tune(tune, dry_run, fresh, select_only, out or sys.stdout)


def _run_tune(tune: Tune, dry_run: bool, fresh: bool, select_only: bool, out) -> dict:
    rc = RunConfig.model_validate({**tune.base, "methods": [{"name": "full_ft"}]})
    dirs = write_validation_tasks(tune, paths.cache_dir(rc.cache_dir))
    select = selection_sweep(tune, dirs)
    print(f"tune {tune.name}: selection on validation ({tune.cfg.select.protocol}), "
          f"{len(select.runs)} candidate run(s)", file=out, flush=True)
    try:
        run_sweep(select, dry_run=dry_run, out=out, fresh=fresh)
    except SweepError as e:  # a candidate failed: it is recorded as failed, the others are chosen from
        print(f"tune {tune.name}: {e}; selection goes on without the failed candidate(s)", file=out, flush=True)
    if dry_run:
        n = len(tune.cfg.methods) * len(tune.cfg.final.seeds) * len(tune.orders)
        print(f"tune {tune.name}: then {n} final run(s) on test: {len(tune.cfg.methods)} winner(s) x "
              f"{len(tune.cfg.final.seeds)} seed(s) x {len(tune.orders)} order(s)", file=out, flush=True)
        return {}
    chosen = choose(tune, select)
    for m, c in chosen.items():
        w = c["winner"]
        print(f"  {m}: " + ", ".join(f"{x['label']} " + (f"{x['score']:.3f}" if x["status"] == "complete" else
                                                          f"FAILED ({x.get('error', 'no result')})")
                                     for x in c["candidates"])
              + f" -> {w['label'] if w else 'no winner (a candidate did not complete)'}", file=out, flush=True)
    missing = [m for m, c in chosen.items() if c["winner"] is None]
    if missing:
        _write_record(tune, chosen, None)
        raise SweepError(f"tune {tune.name}: no winner for {', '.join(missing)}: no candidate completed, or one is "
                         "not complete (tune.json lists each with its status)")
    if select_only:
        _write_record(tune, chosen, None)
        return json.loads((tune.out / "tune.json").read_text())
    final = final_sweep(tune, chosen)
    moved = set_aside_changed(tune, final, out)
    _write_record(tune, chosen, final, moved)
    print(f"tune {tune.name}: final runs of the winners on test", file=out, flush=True)
    run_sweep(final, out=out, fresh=fresh)
    return json.loads((tune.out / "tune.json").read_text())
