"""Run directories read through the results contract (clbench/results/contract.py): one run's matrices,
summary and provenance validated and collected, several runs grouped by (model, stream) and
aggregated by method with confidence intervals. Every metric is recomputed from matrix.csv."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from clbench.config import comparable_config
from clbench.errors import ClbenchError
from clbench.results import metrics
from clbench.results.contract import COST_COLUMNS, MATRIX_COLUMNS, MATRIX_OPTIONAL
from clbench.results.contract import RESULT_FILES as CONTRACT

METRICS = ["acc", "bwt", "fwt", "forgetting", "la", "aia", "intransigence"]
HIGHER_IS_BETTER = {"acc": True, "bwt": True, "fwt": True, "forgetting": False, "la": True, "aia": True,
                    "intransigence": False}
LABELS = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "Forgetting", "la": "LA", "aia": "AIA",
          "intransigence": "Intransigence"}
MULTITASK = "multitask"  # the stage label of a multitask reference's row (clbench.results.recorder.MULTITASK)
COST_LABELS = {"trainable_params": "trainable params", "train_seconds": "train time (s)",
               "eval_seconds": "eval time (s)", "peak_mem_mb": "peak memory (MB)"}
CI_LEVEL = 0.95
DECIMALS = 3  # tables print 3 decimals; "best" is decided on the printed value so ties are all bold


class ReportError(ClbenchError):
    """A run directory does not satisfy the results contract (the message names the file)."""


# --- loading and validating one run ---------------------------------------------------------------


@dataclass
class RunResults:
    """One run directory, validated. `matrix` and `summary` are the tidy CSV contents; `R` holds
    the (T+1) x T accuracy matrix of every complete (method, seed), columns in training order."""

    path: Path
    name: str
    model: str  # the config's model name: part of the grouping key
    model_desc: str  # the longer description from results.json meta, for the page
    stream: str
    order: str
    tasks: list[str]
    seeds: list
    git_sha: str | None
    meta: dict
    matrix: pd.DataFrame
    summary: pd.DataFrame
    R: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    extra: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)  # merged:* rows
    heldout: dict[tuple[str, str], tuple[list[str], np.ndarray]] = field(default_factory=dict)
    # eval.other_kind: stream task i's twin of the other kind (results.json), and each pair's (T+1, T)
    # matrix of the twins' scores; complete pairs only
    other_kind_tasks: list[str] = field(default_factory=list)
    other_kind: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was left out and why
    modes: dict[str, str] = field(default_factory=dict)  # method -> sequential | single | multitask
    joint: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # multitask references' rows

    def mode(self, method: str) -> str:
        return self.modes.get(method, "sequential")

    def joint_for(self, method: str, seed: str) -> tuple[str, np.ndarray] | None:
        """The multitask reference a sequential (method, seed) is compared with: the run's multitask
        row of the same seed; with several, the one results.json names (else none)."""
        cands = [m for (m, s) in self.joint if s == seed]
        if len(cands) > 1:
            named = self.named_refs.get((method, seed))
            cands = [named] if named in cands else []
        return (cands[0], self.joint[(cands[0], seed)]) if len(cands) == 1 else None

    named_refs: dict[tuple[str, str], str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # config.yaml as written by the run
    # each (method, seed)'s per-stage diagnostics (results.json stages[i].method_stats): {stage: {name: value}}
    method_stats: dict[tuple[str, str], dict[int, dict[str, float]]] = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.R)


def seed_key(seed: str):
    return (0, int(seed), "") if str(seed).lstrip("-").isdigit() else (1, 0, str(seed))


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a readable CSV file ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    return df


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
        raise ReportError(f"{path}: expected an object with a \"run\" object")
    if not isinstance(data.get("meta", {}), dict):
        raise ReportError(f"{path}: \"meta\" must be an object")
    return data


def _read_matrix(path: Path) -> pd.DataFrame:
    df = _read_csv(path)
    missing = [c for c in MATRIX_COLUMNS if c not in df.columns and c not in MATRIX_OPTIONAL]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(MATRIX_COLUMNS)})")
    if df.empty:
        raise ReportError(f"{path}: no rows")
    for c in ("method", "seed", "stage", "eval_task"):
        df[c] = df[c].str.strip()
        empty = df.index[df[c] == ""]
        if len(empty):
            raise ReportError(f"{path}: line {empty[0] + 2}: empty {c}")
    df["trained_task"] = df["trained_task"].str.strip()
    raw = df["value"]
    df["value"] = pd.to_numeric(raw, errors="coerce").astype(float)
    bad = df.index[~np.isfinite(df["value"].to_numpy())]
    if len(bad):
        raise ReportError(f"{path}: line {bad[0] + 2}: value {raw[bad[0]]!r} is not a finite number")
    # Integer stages are the stream's stages; other stages (e.g. "merged:ties") are extra rows.
    is_int = df["stage"].str.fullmatch(r"\d+")
    df["stage_idx"] = pd.to_numeric(df["stage"].where(is_int), errors="coerce")
    if "eval_group" in df.columns:
        df["group"] = df["eval_group"].str.strip().str.lower().replace("", "stream")
    else:
        df["group"] = "stream"
    dup = df.index[df.duplicated(["method", "seed", "stage", "eval_task", "group"])]
    if len(dup):
        r = df.loc[dup[0]]
        raise ReportError(f"{path}: line {dup[0] + 2}: second score for method {r.method} seed {r.seed} "
                          f"stage {r.stage} task {r.eval_task}")
    return df


def _read_summary(path: Path) -> pd.DataFrame:
    df = _read_csv(path)
    missing = [c for c in ["method", "seed", *COST_COLUMNS] if c not in df.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    df["method"], df["seed"] = df["method"].str.strip(), df["seed"].str.strip()
    for c in COST_COLUMNS + [m for m in METRICS if m in df.columns]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)  # empty -> NaN, shown as "–"
    dup = df.index[df.duplicated(["method", "seed"])]
    if len(dup):
        r = df.loc[dup[0]]
        raise ReportError(f"{path}: line {dup[0] + 2}: second row for method {r.method} seed {r.seed}")
    return df


def _training_order(path: Path, df: pd.DataFrame, listed: list[str] | None) -> list[str]:
    """R's columns: trained_task by stage 1..T, identical for every (method, seed) of the run and
    consistent with results.json's run.tasks (when present)."""
    trained = df[(df["group"] == "stream") & (df["stage_idx"] >= 1)]
    by_stage: dict[int, str] = {}
    for (stage, method, seed), g in trained.groupby(["stage_idx", "method", "seed"]):
        names = set(g["trained_task"])
        if len(names) != 1 or "" in names:
            raise ReportError(f"{path}: method {method} seed {seed} stage {int(stage)}: trained_task must be one "
                              f"non-empty name, got {sorted(names)}")
        name, stage = names.pop(), int(stage)
        if by_stage.setdefault(stage, name) != name:
            raise ReportError(f"{path}: stage {stage} trains {by_stage[stage]!r} for one method/seed and {name!r} "
                              "for another; one run directory holds one task order")
    if listed:
        for stage, name in sorted(by_stage.items()):
            if stage > len(listed) or listed[stage - 1] != name:
                raise ReportError(f"{path}: stage {stage} trains {name!r}, but results.json run.tasks is {listed}")
        return list(listed)
    holes = [s for s in range(1, max(by_stage, default=0) + 1) if s not in by_stage]
    if holes or not by_stage:
        raise ReportError(f"{path}: no trained_task for stage(s) {holes or [1]}; cannot tell the task order")
    return [by_stage[s] for s in sorted(by_stage)]


def load_run(run_dir: str | Path) -> RunResults:
    """Validate one run directory against the results contract; raises ReportError naming the file."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ReportError(f"{d}: not a directory")
    missing = [f for f in CONTRACT if not (d / f).is_file()]
    if missing:
        raise ReportError(f"{d}: missing results file(s) {', '.join(str(d / f) for f in missing)} "
                          f"(a run directory holds {', '.join(CONTRACT)})")
    cfg = _read_yaml(d / "config.yaml")
    res = _read_json(d / "results.json")
    mat = _read_matrix(d / "matrix.csv")
    summ = _read_summary(d / "summary.csv")
    run, meta = res["run"], res.get("meta") or {}

    listed = run.get("tasks")
    if listed is not None and not (isinstance(listed, list) and all(isinstance(t, str) for t in listed)):
        raise ReportError(f"{d / 'results.json'}: run.tasks must be a list of task names")
    tasks = _training_order(d / "matrix.csv", mat, listed)
    model = cfg.get("model") or (run.get("config") or {}).get("model") or meta.get("model") or "unknown-model"
    out = RunResults(
        path=d, name=str(run.get("name") or cfg.get("name") or d.name), model=str(model),
        model_desc=str(meta.get("model") or model), stream=str(run.get("stream") or cfg.get("stream") or "custom"),
        order=str(run.get("order") or cfg.get("order") or "?"), tasks=tasks,
        seeds=list(run.get("seeds") or cfg.get("seeds") or []), git_sha=run.get("git_sha"), meta=meta,
        matrix=mat, summary=summ, config=cfg if isinstance(cfg, dict) else {})
    for m, entry in (res.get("methods") or {}).items():
        if isinstance(entry, dict):
            out.modes[str(m)] = str(entry.get("mode") or "sequential")
            for seed, se in (entry.get("seeds") or {}).items():
                ref = (se.get("intransigence") or {}).get("reference") if isinstance(se, dict) else None
                if ref:
                    out.named_refs[(str(m), str(seed))] = str(ref)
                stats = {}
                for st in (se.get("stages") or []) if isinstance(se, dict) else []:
                    ms = st.get("method_stats") if isinstance(st, dict) else None
                    if isinstance(ms, dict) and isinstance(st.get("stage"), int):
                        stats[st["stage"]] = {str(k): float(v) for k, v in ms.items() if isinstance(v, (int, float))}
                if stats:
                    out.method_stats[(str(m), str(seed))] = stats
                twins = se.get("other_kind_tasks") if isinstance(se, dict) else None
                if isinstance(twins, list) and len(twins) == len(tasks) and not out.other_kind_tasks:
                    out.other_kind_tasks = [str(t) for t in twins]
    _collect_matrices(out)
    _check_summary_metrics(out)
    return out


def _collect_matrices(run: RunResults) -> None:
    """Fill run.R / extra / heldout from the tidy matrix; truncated (unfinished) pairs are left out
    with a note, holes in the middle of a matrix are an error (the file is damaged)."""
    path, df, tasks, T = run.path / "matrix.csv", run.matrix, run.tasks, len(run.tasks)
    # Tasks never trained are held-out tasks; without an eval_group column that is the only way to tell.
    if "eval_group" in df.columns:
        heldout_rows = df["group"] == "heldout"
    else:
        heldout_rows = ~df["eval_task"].isin(tasks)
    stream_rows = (df["group"] == "stream") & df["eval_task"].isin(tasks)
    too_late = df.index[stream_rows & (df["stage_idx"] > T)]
    if len(too_late):
        raise ReportError(f"{path}: line {too_late[0] + 2}: stage {df.stage[too_late[0]]} but the run has {T} tasks")
    pairs = sorted(set(zip(df["method"], df["seed"])), key=lambda p: (p[0], seed_key(p[1])))
    for method, seed in pairs:
        mine = (df["method"] == method) & (df["seed"] == seed)
        if run.mode(method) == MULTITASK:  # a reference: one joint row, no matrix
            j = df[mine & stream_rows & (df["stage"] == MULTITASK)]
            if set(j["eval_task"]) >= set(tasks):
                run.joint[(method, seed)] = j.set_index("eval_task")["value"].reindex(tasks).to_numpy(dtype=float)
            else:
                run.notes.append(f"{path.parent}: multitask reference {method} seed {seed} left out: no complete "
                                 "`multitask` row (unfinished run?)")
            continue
        g = df[mine & stream_rows & df["stage_idx"].notna()]
        grid = g.pivot(index="stage_idx", columns="eval_task", values="value")
        grid = grid.reindex(index=range(T + 1), columns=tasks)
        filled = grid.notna().all(axis=1).to_numpy()
        if not filled.all():
            k = int(np.argmin(filled)) - 1  # last complete stage before the first gap
            if filled[: k + 1].all() and not grid.iloc[k + 1:].notna().any().any():
                done = f"stages 0..{k} of {T} only" if k >= 0 else "no stream scores"
                run.notes.append(f"{path.parent}: {method} seed {seed} left out: {done} (unfinished run?)")
                continue
            gaps = [(int(s), t) for s in range(T + 1) for t in tasks if pd.isna(grid.at[s, t])]
            raise ReportError(f"{path}: method {method} seed {seed} lacks scores for (stage, task) {gaps[:4]}")
        run.R[(method, seed)] = grid.to_numpy(dtype=float)
        extra = df[mine & stream_rows & df["stage_idx"].isna()]
        run.extra[(method, seed)] = {
            st: e.set_index("eval_task")["value"].reindex(tasks).to_numpy(dtype=float)
            for st, e in extra.groupby("stage", sort=False)}
        h = df[mine & heldout_rows & df["stage_idx"].notna()]
        if not h.empty:
            G = h.pivot(index="stage_idx", columns="eval_task", values="value").reindex(index=range(T + 1))
            G = G.dropna(axis=1)  # a held-out task must be scored at every stage to give a delta
            if G.shape[1]:
                run.heldout[(method, seed)] = (list(G.columns), G.to_numpy(dtype=float))
        if run.other_kind_tasks and "eval_group" in df.columns:
            o = df[mine & (df["group"] == "other_kind") & df["stage_idx"].notna()]
            if not o.empty:
                O = o.pivot(index="stage_idx", columns="eval_task", values="value").reindex(
                    index=range(T + 1), columns=run.other_kind_tasks)
                if O.notna().all().all():
                    run.other_kind[(method, seed)] = O.to_numpy(dtype=float)


def _check_summary_metrics(run: RunResults) -> None:
    """summary.csv's metric columns are not used, but a disagreement with matrix.csv is worth a note
    (an empty cell is no claim and is not compared)."""
    s = run.summary.set_index(["method", "seed"])
    for (method, seed), R in run.R.items():
        if (method, seed) not in s.index:
            run.notes.append(f"{run.path / 'summary.csv'}: no row for {method} seed {seed} (its cost shows as –)")
            continue
        diffs = []
        for m, v in metrics.summary(R).items():
            w = s.at[(method, seed), m] if m in s.columns else math.nan
            if not math.isnan(w) and (math.isnan(v) or abs(v - w) > 1e-6):
                diffs.append(f"{m}={w:.4g} (matrix.csv: {v:.4g})")
        if diffs:
            run.notes.append(f"{run.path / 'summary.csv'}: {method} seed {seed} says {', '.join(diffs)}; "
                             "the report uses the values recomputed from matrix.csv")


def discover_runs(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Run directories named by `paths`: a directory holding results.json is a run; one without it
    but with runs below it (any depth) is a sweep; anything else is treated as a (broken) run so
    that load_run names the missing file. Returns the runs and notes on skipped sub-directories."""
    runs, notes = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such directory")
        if p.is_file():
            raise ReportError(f"{p}: expected a run directory (holding {', '.join(CONTRACT)}), got a file")
        if (p / "results.json").is_file():
            runs.append(p)
            continue
        below = sorted(r.parent for r in p.rglob("results.json"))
        if not below:
            runs.append(p)  # load_run raises, naming results.json and whatever else is missing
            continue
        runs += below
        data_dirs = {f.parent for pat in ("matrix.csv", "summary.csv") for f in p.rglob(pat)}
        notes += [f"{d}: skipped, it has no results.json (unfinished run?)" for d in sorted(data_dirs - set(below))]
    unique = list({r.resolve(): r for r in runs}.values())  # a run named twice counts once
    return unique, notes


def _unit_key(run: RunResults, method: str) -> str | None:
    """What decides a (method, seed)'s numbers, seed aside: the run's config without its name, its
    other methods and the fields that never change results (config.NON_RESULT_FIELDS), and this
    method's own entry. None when config.yaml does not name the method (it is then never merged)."""
    specs = [m for m in run.config.get("methods") or [] if isinstance(m, dict)
             and (m.get("label") or m.get("name")) == method]
    if len(specs) != 1:
        return None
    rest = {k: v for k, v in comparable_config(run.config).items() if k not in ("name", "methods", "seeds")}
    return json.dumps([rest, specs[0]], sort_keys=True, default=str)


def drop_repeats(runs: list[RunResults]) -> list[str]:
    """A (method, seed) that two run directories computed from the same config (a sweep folder that
    still holds an earlier sweep's runs, the same run copied) counts once: the first run (in the
    order given) keeps it, the others lose it from every table, with a note naming both. This is
    clbench's own bookkeeping (no library knows what a clbench config decides)."""
    seen: dict[tuple[str, str], Path] = {}
    notes = []
    for r in runs:
        for method, seed in sorted({(str(m), str(s)) for m, s in zip(r.matrix["method"], r.matrix["seed"])}):
            key = _unit_key(r, method)
            if key is None:
                continue
            first = seen.setdefault((key, seed), r.path)
            if first == r.path:
                continue
            for d in (r.R, r.extra, r.heldout, r.other_kind, r.joint, r.method_stats, r.named_refs):
                d.pop((method, seed), None)
            r.matrix = r.matrix[~((r.matrix["method"] == method) & (r.matrix["seed"] == seed))]
            r.summary = r.summary[~((r.summary["method"] == method) & (r.summary["seed"].astype(str) == seed))]
            notes.append(f"{r.path}: {method} seed {seed} counted once: {first} holds the same result "
                         "(the same config and seed)")
    return notes


# --- grouping and aggregation ---------------------------------------------------------------------


@dataclass
class Group:
    """Runs of one (model, stream): the unit that is aggregated and drawn together."""

    model: str
    stream: str
    runs: list[RunResults]
    label: str = ""
    slug: str = ""
    samples: pd.DataFrame | None = None  # one row per (run, method, seed): recomputed metrics + cost

    @property
    def methods(self) -> list[str]:
        return sorted(self.samples["method"].unique())

    def orders(self) -> list[tuple[str, list[str], list[RunResults]]]:
        """(label, task order, runs) per distinct order; a name reused for another order gets #k."""
        out: dict[tuple[str, tuple], list] = {}
        for r in self.runs:
            if r.R:
                out.setdefault((r.order, tuple(r.tasks)), []).append(r)
        labels, result = {}, []
        for (name, tasks), runs in out.items():
            labels[name] = labels.get(name, 0) + 1
            result.append((name if labels[name] == 1 else f"{name}#{labels[name]}", list(tasks), runs))
        return result


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def group_runs(runs: list[RunResults]) -> list[Group]:
    """Group by (model, stream). Two custom task lists both called e.g. "custom" but over different
    task sets are different streams, so the task set is part of the key."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        if r.R:
            key = (r.model, r.stream, frozenset(r.tasks))
            groups.setdefault(key, Group(r.model, r.stream, [])).runs.append(r)
    seen: dict[str, int] = {}
    for g in groups.values():
        base = f"{g.model} · {g.stream}"
        seen[base] = seen.get(base, 0) + 1
        g.label = base if seen[base] == 1 else f"{base} #{seen[base]}"
        g.slug = slug(f"{g.model}__{g.stream}") + ("" if seen[base] == 1 else f"__{seen[base]}")
        g.samples = _samples(g.runs)
    return sorted(groups.values(), key=lambda g: g.label)


def _samples(runs: list[RunResults]) -> pd.DataFrame:
    rows = []
    for r in runs:
        cost = r.summary.set_index(["method", "seed"])
        for (method, seed), R in r.R.items():
            if r.mode(method) != "sequential":  # references are reported beside the methods, not as one
                continue
            row = {"run": str(r.path), "order": r.order, "method": method, "seed": seed, **metrics.summary(R)}
            ref = r.joint_for(method, seed)
            row["intransigence"] = float(np.mean(metrics.intransigence(R, ref[1]))) if ref else math.nan
            for c in COST_COLUMNS:
                row[c] = float(cost.at[(method, seed), c]) if (method, seed) in cost.index else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def mean_ci(values, level: float = CI_LEVEL) -> dict:
    """Mean, sample std (ddof 1) and the half-width of the t-distribution confidence interval,
    t_{(1+level)/2, n-1} * std / sqrt(n). NaN values (e.g. BWT of a one-task stream) are dropped;
    with n = 1 std and the interval are NaN: one sample says nothing about spread."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci95": math.nan, "n": 0}
    if n == 1:
        return {"mean": float(x[0]), "std": math.nan, "ci95": math.nan, "n": 1}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))
    return {"mean": float(x.mean()), "std": std, "ci95": half, "n": n}


def aggregate(samples: pd.DataFrame, columns=tuple(METRICS) + tuple(COST_COLUMNS)) -> pd.DataFrame:
    """Long table: one row per (method, metric) with mean, std, ci95, n."""
    rows = []
    for method, g in samples.groupby("method", sort=True):
        for c in columns:
            rows.append({"method": method, "metric": c, **mean_ci(g[c].to_numpy(dtype=float)), "samples": len(g)})
    return pd.DataFrame(rows)


