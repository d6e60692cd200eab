"""`clbench report`: figures, tables and a one-page report.md from run directories.

Reads only the results contract (config.yaml, matrix.csv, summary.csv, results.json; see
clbench/results.py). Every metric is recomputed from matrix.csv with clbench.metrics, so a report
never repeats a stale or buggy number from summary.csv; summary.csv is read for cost columns only.

Aggregation: runs of the same (model, stream) form one group; inside a group every
(run directory, method, seed) is one sample, so different seeds and different task orders (which
are different run directories) pool into one mean per method. Different models or streams are
never averaged together: each group gets its own section, figures and tables, named after it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from . import metrics, plotstyle
from .errors import ClbenchError

CONTRACT = ("config.yaml", "matrix.csv", "summary.csv", "results.json")
MATRIX_COLUMNS = ["method", "seed", "stage", "trained_task", "eval_task", "metric", "value"]
COST_COLUMNS = ["trainable_params", "train_seconds", "eval_seconds", "peak_mem_mb"]
METRICS = ["acc", "bwt", "fwt", "forgetting", "la", "aia", "intransigence"]
HIGHER_IS_BETTER = {"acc": True, "bwt": True, "fwt": True, "forgetting": False, "la": True, "aia": True,
                    "intransigence": False}
LABELS = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "Forgetting", "la": "LA", "aia": "AIA",
          "intransigence": "Intransigence"}
MULTITASK = "multitask"  # the stage label of a multitask reference's row (clbench.recorder.MULTITASK)
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

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.R)


def _seed_key(seed: str):
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
    missing = [c for c in MATRIX_COLUMNS if c not in df.columns]
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
        matrix=mat, summary=summ)
    for m, entry in (res.get("methods") or {}).items():
        if isinstance(entry, dict):
            out.modes[str(m)] = str(entry.get("mode") or "sequential")
            for seed, se in (entry.get("seeds") or {}).items():
                ref = (se.get("intransigence") or {}).get("reference") if isinstance(se, dict) else None
                if ref:
                    out.named_refs[(str(m), str(seed))] = str(ref)
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
    pairs = sorted(set(zip(df["method"], df["seed"])), key=lambda p: (p[0], _seed_key(p[1])))
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


def _slug(text: str) -> str:
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
        g.slug = _slug(f"{g.model}__{g.stream}") + ("" if seen[base] == 1 else f"__{seen[base]}")
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


# --- tables -----------------------------------------------------------------------------------------


def _num(v: float, decimals: int = DECIMALS) -> str:
    s = f"{v:.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def _printed(v: float) -> float:
    return float(_num(v))


def _best(agg: pd.DataFrame, metric: str) -> float | None:
    """Best printed mean of a column (so printed ties are all bold), or None when fewer than two
    methods can be compared."""
    means = [_printed(v) for v in agg.loc[agg["metric"] == metric, "mean"] if not math.isnan(v)]
    if len(means) < 2:
        return None
    return max(means) if HIGHER_IS_BETTER[metric] else min(means)


def metrics_table(agg: pd.DataFrame, fmt: str) -> str:
    """Summary metrics as Markdown (fmt="md") or LaTeX booktabs (fmt="tex"): mean ± std, the best
    mean per column in bold, n = samples per method. With n = 1 the cell holds the mean alone."""
    methods = sorted(agg["method"].unique())
    cols = _shown_metrics(agg)
    best = {m: _best(agg, m) for m in cols}
    arrow = {True: ("↑", r"$\uparrow$"), False: ("↓", r"$\downarrow$")}
    head, body = [], []
    for m in cols:
        a = arrow[HIGHER_IS_BETTER[m]][0 if fmt == "md" else 1]
        head.append(f"{LABELS[m]} {a}")
    for method in methods:
        cells = []
        for m in cols:
            r = agg[(agg["method"] == method) & (agg["metric"] == m)].iloc[0]
            bold = best[m] is not None and not math.isnan(r["mean"]) and _printed(r["mean"]) == best[m]
            cells.append(_cell(r["mean"], r["std"], bold=bold, fmt=fmt))
        n = int(agg.loc[agg["method"] == method, "samples"].iloc[0])
        body.append([_esc(method, fmt), *cells, str(n)])
    n_head = "n" if fmt == "md" else "$n$"
    return _render(["method", *head, n_head], body, fmt, align="l" + "r" * (len(cols) + 1))


def _shown_metrics(agg: pd.DataFrame) -> list[str]:
    """Every metric, but intransigence only when a multitask reference gave it a value."""
    has = agg.loc[agg["metric"] == "intransigence", "mean"].notna().any()
    return [m for m in METRICS if m != "intransigence" or has]


def reference_table(g: "Group") -> tuple[pd.DataFrame, str] | None:
    """Per-task scores of the reference runs (multitask joint model, single-task models) and each
    sequential method's per-task intransigence, means over seeds and runs, as a frame and Markdown."""
    rows = []
    for lab, tasks, runs in g.orders():
        for r in runs:
            for (m, s), v in r.joint.items():
                rows += [{"order": lab, "row": f"{m} (multitask)", "task": t, "value": v[i]} for i, t in enumerate(tasks)]
            for (m, s), R in r.R.items():
                if r.mode(m) == "single":
                    rows += [{"order": lab, "row": f"{m} (single-task)", "task": t, "value": R[i + 1, i]}
                             for i, t in enumerate(tasks)]
                elif r.mode(m) == "sequential" and (ref := r.joint_for(m, s)) is not None:
                    per = metrics.intransigence(R, ref[1])
                    rows += [{"order": lab, "row": f"{m}: intransigence vs {ref[0]}", "task": t, "value": per[i]}
                             for i, t in enumerate(tasks)]
                    rows += [{"order": lab, "row": f"{m}: R[k, k]", "task": t, "value": R[i + 1, i]}
                             for i, t in enumerate(tasks)]
    if not rows:
        return None
    df = pd.DataFrame(rows).groupby(["order", "row", "task"], sort=False)["value"].agg(["mean", "count"]).reset_index()
    lines = []
    for lab, tasks, _ in g.orders():
        d = df[df["order"] == lab]
        if d.empty:
            continue
        wide = d.pivot(index="row", columns="task", values="mean").reindex(columns=tasks)
        body = [[_esc(str(row), "md"), *[_num(v) if not pd.isna(v) else "–" for v in vals], _num(np.nanmean(vals))]
                for row, vals in zip(wide.index, wide.to_numpy())]
        lines.append(f"Order {lab}:\n\n" + _render(["row", *tasks, "mean"], body, "md", align="l" + "r" * (len(tasks) + 1)))
    return df, "\n".join(lines)


def cost_table(agg: pd.DataFrame, fmt: str) -> str:
    decimals = {"trainable_params": 0, "train_seconds": 1, "eval_seconds": 1, "peak_mem_mb": 0}
    body = []
    for method in sorted(agg["method"].unique()):
        cells = []
        for c in COST_COLUMNS:
            r = agg[(agg["method"] == method) & (agg["metric"] == c)].iloc[0]
            std = math.nan if c == "trainable_params" else r["std"]  # a count, fixed by the method
            cells.append(_cell(r["mean"], std, fmt=fmt, decimals=decimals[c], thousands=True))
        n = int(agg.loc[agg["method"] == method, "samples"].iloc[0])
        body.append([_esc(method, fmt), *cells, str(n)])
    return _render(["method", *(COST_LABELS[c] for c in COST_COLUMNS), "n" if fmt == "md" else "$n$"], body, fmt,
                   align="lrrrrr")


def _cell(mean, std, fmt, bold=False, decimals=DECIMALS, thousands=False) -> str:
    if mean is None or math.isnan(mean):
        return "–" if fmt == "md" else "--"
    num = (lambda v: f"{v:,.{decimals}f}") if thousands else (lambda v: _num(v, decimals))
    text = num(mean)
    has_std = std is not None and not math.isnan(std)
    if fmt == "md":
        text += f" ± {num(std)}" if has_std else ""
        return f"**{text}**" if bold else text
    text = text.replace(",", "{,}") + (rf" \pm {num(std).replace(',', '{,}')}" if has_std else "")
    return rf"$\mathbf{{{text}}}$" if bold else f"${text}$"


def _esc(text: str, fmt: str) -> str:
    return text if fmt == "md" else re.sub(r"([_&%#${}])", r"\\\1", text)


def _render(head: list[str], body: list[list[str]], fmt: str, align: str) -> str:
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"
    lines = [r"% requires \usepackage{booktabs}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in body]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def heldout_table(group: Group) -> tuple[pd.DataFrame, str] | None:
    """Per-stage general-ability delta (TRACE), mean over samples, as a frame and Markdown."""
    rows = []
    for r in group.runs:
        for (method, seed), (_, G) in r.heldout.items():
            if r.mode(method) != "sequential":  # a single-task reference's rows are not a stream's stages
                continue
            for stage, delta in enumerate(metrics.general_ability_delta(G)):
                rows.append({"method": method, "stage": stage, "delta": delta})
    if not rows:
        return None
    df = pd.DataFrame(rows).groupby(["method", "stage"])["delta"].agg(["mean", "count"]).reset_index()
    wide = df.pivot(index="method", columns="stage", values="mean")
    head = ["method"] + [f"stage {s}" for s in wide.columns]
    body = [[m] + [_num(v) for v in wide.loc[m]] for m in wide.index]
    return df, _render(head, body, "md", align="l" + "r" * len(wide.columns))


# --- figures: turn a group into the plain numbers plotstyle draws ----------------------------------


def value_range(runs: list[RunResults]) -> tuple[float, float]:
    """One colour scale for every heatmap of the report: [0, 1] when all scores are in it."""
    vals = np.concatenate([R.ravel() for r in runs for R in r.R.values()]
                          + [v for r in runs for e in r.extra.values() for v in e.values()])
    vals = vals[np.isfinite(vals)]
    lo, hi = float(vals.min()), float(vals.max())
    return (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi if hi > lo else lo + 1)


def _metric_label(runs: list[RunResults]) -> str:
    names = set()
    for r in runs:
        stream = r.matrix[(r.matrix["group"] == "stream") & r.matrix["eval_task"].isin(r.tasks)]
        names |= set(stream["metric"])
    return f"score ({names.pop()})" if len(names) == 1 else "score (primary metric)"


def _by_method(runs: list[RunResults], references: bool = False) -> dict[str, list[tuple[RunResults, str]]]:
    """(run, seed) items per method with a matrix; single-task references only with references=True."""
    out: dict[str, list] = {}
    for r in runs:
        for method, seed in r.pairs:
            if references or r.mode(method) == "sequential":
                out.setdefault(method, []).append((r, seed))
    return dict(sorted(out.items()))


def _reference_rows(r: RunResults, method: str, seed: str, T: int) -> dict[str, np.ndarray]:
    """Rows drawn below a sequential method's matrix: its multitask reference (the joint model's
    scores) and the single-task upper bounds (each task trained alone: the diagonal of a single run)."""
    out = {}
    ref = r.joint_for(method, seed)
    if ref is not None:
        out[f"joint ({ref[0]})"] = ref[1]
    for (m, s), R in r.R.items():
        if r.mode(m) == "single" and s == seed:
            out[f"alone ({m})"] = np.array([R[i, i - 1] for i in range(1, T + 1)])
    return out


def _heatmap_fig(g: Group, lab: str, tasks: list[str], runs: list[RunResults], vrange):
    panels = []
    for method, items in _by_method(runs, references=True).items():
        R = np.mean([r.R[(method, s)] for r, s in items], axis=0)
        rows_of = {(id(r), s): {**r.extra[(method, s)], **(_reference_rows(r, method, s, len(tasks))
                                                            if r.mode(method) == "sequential" else {})}
                   for r, s in items}
        extra_names = list(dict.fromkeys(k for v in rows_of.values() for k in v))
        nan_row = np.full(len(tasks), np.nan)
        with warnings.catch_warnings():  # a task missing from every merged row is NaN (a blank cell), by design
            warnings.simplefilter("ignore", RuntimeWarning)
            extra = [np.nanmean([rows_of[(id(r), s)].get(k, nan_row) for r, s in items], axis=0) for k in extra_names]
        rows = np.vstack([R, *extra])
        labels = ["0 base"] + [f"{t} {name}" for t, name in enumerate(tasks, 1)] + extra_names
        kind = "" if items[0][0].mode(method) == "sequential" else " [single-task ref]"
        if kind:
            labels = ["0 base"] + [f"{t} only {name}" for t, name in enumerate(tasks, 1)] + extra_names
        panels.append((f"{method}{kind} (n={len(items)})", rows, labels, len(tasks) + 1))
    return plotstyle.heatmaps(f"{g.label} · order {lab}", tasks, panels, vrange, _metric_label(runs))


def _curves_fig(g: Group, lab: str, tasks: list[str], runs: list[RunResults], styles):
    series = {}
    for method, items in _by_method(runs).items():
        Rs = np.stack([r.R[(method, s)] for r, s in items])
        n = len(items)
        half = (stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1) * Rs.std(axis=0, ddof=1) / math.sqrt(n)) if n > 1 else None
        series[method] = (Rs.mean(axis=0), half, n)
    unit = value_range(runs) == (0.0, 1.0)
    return plotstyle.curves(f"{g.label} · order {lab}", tasks, series, styles, _metric_label(runs),
                            ylim=(-0.03, 1.03) if unit else None)


def _values(g: Group, agg: pd.DataFrame, metric: str) -> dict:
    out = {}
    for method, s in g.samples.groupby("method"):
        r = agg[(agg["method"] == method) & (agg["metric"] == metric)].iloc[0]
        out[method] = (r["mean"], r["ci95"], list(s[metric]))
    return out


def _n_note(g: Group) -> tuple[dict, str]:
    n = g.samples.groupby("method").size().to_dict()
    return n, ("n = 1: no error bars" if max(n.values()) == 1 else "mean ± 95% CI (t)")


def _final_fig(g: Group, agg: pd.DataFrame, styles):
    n, note = _n_note(g)
    panels = [{"label": f"{LABELS[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓'}", "values": _values(g, agg, m),
               "zero": m != "acc"} for m in ("acc", "bwt", "forgetting")]
    return plotstyle.bar_panels(g.label, panels, styles, n, ncols=3, height=2.4, note=note)


def _stability_fig(g: Group, agg: pd.DataFrame, styles):
    n, note = _n_note(g)
    la, fg = _values(g, agg, "la"), _values(g, agg, "forgetting")
    points = {m: {"x": la[m][0], "xci": la[m][1], "xs": la[m][2], "y": fg[m][0], "yci": fg[m][1],
                  "ys": fg[m][2], "n": n[m]} for m in la}
    return plotstyle.stability(g.label, points, styles, note=note)


def _cost_fig(g: Group, agg: pd.DataFrame, styles):
    n, note = _n_note(g)
    panels = []
    for c in COST_COLUMNS:
        vals = _values(g, agg, c)
        means = [v[0] for v in vals.values() if np.isfinite(v[0]) and v[0] > 0]
        # trainable parameters span orders of magnitude (LoRA vs full fine-tuning)
        log = bool(means) and max(means) / min(means) > 50
        # costs barely vary over seeds: sample dots would only smudge the bar tops
        panels.append({"label": COST_LABELS[c] + (" (log)" if log else ""), "values": vals, "log": log, "dots": False})
    return plotstyle.bar_panels(g.label, panels, styles, n, ncols=2, height=3.0, note=note)


def _heldout_fig(g: Group, df: pd.DataFrame, styles):
    series = {m: (d.sort_values("stage")["mean"].to_numpy(), int(d["count"].max())) for m, d in df.groupby("method")}
    x = sorted(df["stage"].unique())
    return plotstyle.lines(g.label, x, series, styles, "stage", "Δ held-out score vs. base")


# --- the report -------------------------------------------------------------------------------------

DEFINITIONS = """\
R[t, i] is the score on the i-th task of the training order (i = 1..T) after training stage t;
row t = 0 is the base model before any training. Scores are each task's primary metric in its natural
scale (e.g. acc, exact_match in [0, 1]); higher is better. All metrics are recomputed from matrix.csv
with `clbench.metrics`.

| metric | definition | sign convention |
|---|---|---|
| ACC | (1/T) Σ_i R[T, i] — final average accuracy (Lopez-Paz & Ranzato 2017) | higher is better |
| BWT | 1/(T−1) Σ_{i<T} (R[T, i] − R[i, i]) — backward transfer (GEM) | negative = forgetting; higher is better |
| FWT | 1/(T−1) Σ_{i≥2} (R[i−1, i] − R[0, i]) — forward transfer vs. the base model | positive = earlier tasks helped; higher is better |
| Forgetting | mean_{i<T} (max_{l∈1..T−1} R[l, i] − R[T, i]) — max-based (Chaudhry et al. 2018) | positive = forgetting; lower is better |
| LA | (1/T) Σ_i R[i, i] — learning accuracy / plasticity (Riemer et al. 2019) | higher is better |
| AIA | (1/T) Σ_k A_k, A_k = (1/k) Σ_{i≤k} R[k, i] — average incremental accuracy (Rebuffi et al. 2017) | higher is better |
| Δ general | mean over held-out tasks of G[t] − G[0] (TRACE) | negative = lost general ability |
| Intransigence | (1/T) Σ_k (a*_k − R[k, k]), a*_k = the multitask reference's score on task k (Chaudhry et al. 2018 define a*_k by a joint model on tasks 1..k; here the one joint model on all T tasks) | positive = learns new tasks worse than joint training; lower is better |

BWT, FWT and forgetting are undefined (–) for a one-task stream. Rows of the heatmaps below the last
stage (e.g. `merged:ties`; `joint (m)`: the multitask reference m's scores; `alone (m)`: single-task
upper bounds, each task trained alone by the reference run m)
are shown for reference and never enter a metric. Reference runs (mode multitask or single) are not
methods of the stream: they appear in the heatmaps and the reference table, not in the metric tables.

Aggregation: within one model and stream, each (run directory, method, seed) is one sample, so seeds
and task orders pool. Tables give mean ± sample standard deviation (ddof 1) and n, the number of
samples; the best mean per column is bold (decided on the printed value). Error bars in figures are
95% confidence intervals of the mean from the t-distribution, mean ± t(0.975, n−1)·s/√n. With n = 1
there is no spread: tables show the mean alone and figures draw no error bars. Different models or
streams are never averaged together.
"""


def build_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Writes the report, returns the report directory. Every run is loaded and validated before
    anything is drawn, so a bad file raises ReportError (naming it) without leaving half a report."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ReportError("no run directory given")
    found, notes = discover_runs(run_dirs)
    runs = [load_run(d) for d in found]
    for r in runs:
        notes += r.notes
    groups = group_runs(runs)
    if not groups:
        raise ReportError(f"no complete (method, seed) results in {', '.join(map(str, run_dirs))}: "
                          + "; ".join(notes))
    for n in notes:
        warnings.warn(n, stacklevel=2)

    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    _check_writable(out)
    try:
        return _write_report(out, runs, groups, notes)
    except OSError as e:  # e.g. the disk filled up while drawing
        raise ReportError(f"writing the report into {out} failed: {e.strerror or e}"
                          + (f" ({e.filename})" if e.filename else "")) from None


def _check_writable(out: Path) -> None:
    """Before anything is drawn: the report folder can be created and written."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ReportError(f"cannot write the report into {out}: {e.strerror or e}; choose another folder "
                          "with --out") from None


def _write_report(out: Path, runs, groups, notes) -> Path:
    fig_dir, tab_dir = out / "figures", out / "tables"
    _clear_previous(out)
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)

    styles = plotstyle.MethodStyle(m for g in groups for m in g.methods)
    vrange = value_range(runs)
    page = ["# clbench report", "",
            f"{len(runs)} run(s), {len(groups)} model/stream group(s). Metrics are recomputed from "
            "`matrix.csv`; `summary.csv` is used for cost columns only. Figures as PDF (vector) and PNG "
            "in `figures/`, tables as Markdown and LaTeX (booktabs) in `tables/`.", "",
            "## Runs", "", _runs_table(runs), ""]
    with plotstyle.styled():
        for g in groups:
            page += _group_section(g, styles, vrange, fig_dir, tab_dir)
    page += ["## Metric definitions", "", DEFINITIONS]
    if notes:
        page += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    (out / "report.md").write_text("\n".join(page))
    return out


def _clear_previous(out: Path) -> None:
    """A re-run must not leave figures of groups that are gone; only our own file types in our own
    sub-folders of a previous report are removed."""
    if not (out / "report.md").is_file():
        return
    for sub, exts in (("figures", (".png", ".pdf")), ("tables", (".md", ".tex", ".csv"))):
        for f in (out / sub).glob("*"):
            if f.is_file() and f.suffix in exts:
                f.unlink()


def _runs_table(runs: list[RunResults]) -> str:
    body = []
    for r in runs:
        methods = sorted({m for m, _ in r.pairs})
        seeds = sorted({s for _, s in r.pairs}, key=_seed_key)
        body.append([f"`{r.path}`", r.name, r.model, r.stream, r.order, " → ".join(r.tasks),
                     ", ".join(methods) or "–", ", ".join(seeds) or "–", (r.git_sha or "–")[:10]])
    return _render(["run dir", "name", "model", "stream", "order", "tasks (training order)", "methods", "seeds",
                    "git"], body, "md", align="lllllllll")


def _group_section(g: Group, styles, vrange, fig_dir: Path, tab_dir: Path) -> list[str]:
    agg = aggregate(g.samples)
    n_by_method = g.samples.groupby("method").size()
    n_text = ", ".join(f"{m} n = {n}" for m, n in n_by_method.items())
    descs = sorted({r.model_desc for r in g.runs})
    seeds = sorted({str(s) for s in g.samples["seed"]}, key=_seed_key)
    lines = [f"## {g.label}", "",
             f"- model: `{g.model}`" + (f" ({'; '.join(descs)})" if descs != [g.model] else ""),
             f"- stream: `{g.stream}`",
             *[f"- order {lab}: {' → '.join(tasks)} ({len(runs)} run(s))" for lab, tasks, runs in g.orders()],
             f"- seeds: {', '.join(seeds)}",
             f"- samples per method (run × seed): {n_text}", ""]

    def fig(stem: str, fig_obj, caption: str):
        plotstyle.save(fig_obj, fig_dir / stem)
        lines.extend([f"![{stem}](figures/{stem}.png)", "", f"*{caption}* ([PDF](figures/{stem}.pdf))", ""])

    def table(stem: str, md: str, tex: str | None = None, extra_csv: pd.DataFrame | None = None):
        (tab_dir / f"{stem}.md").write_text(md)
        if tex is not None:
            (tab_dir / f"{stem}.tex").write_text(tex)
        if extra_csv is not None:
            extra_csv.to_csv(tab_dir / f"{stem}.csv", index=False)
        lines.extend([md, f"(`tables/{stem}.md`" + (f", `tables/{stem}.tex`" if tex else "") + ")", ""])

    n_note = _n_note(g)[1]
    lines += ["### Summary metrics", "",
              "Mean ± sample std over n samples (run × seed); bold = best per column (↑ higher is better, "
              "↓ lower is better); – = undefined (one-task stream).", ""]
    table(f"summary__{g.slug}", metrics_table(agg, "md"), metrics_table(agg, "tex"),
          agg[agg["metric"].isin(METRICS)])
    g.samples.to_csv(tab_dir / f"samples__{g.slug}.csv", index=False)
    lines += [f"Per-sample recomputed metrics: `tables/samples__{g.slug}.csv`.", ""]

    lines += ["### Accuracy matrices", ""]
    for lab, tasks, runs in g.orders():
        fig(f"heatmap__{g.slug}__order-{_slug(lab)}", _heatmap_fig(g, lab, tasks, runs, vrange),
            f"{g.label}, order {lab}: accuracy matrix R[stage, task] per method, mean over seeds; row 0 is the "
            "base model, rows below the line are extra (not in metrics); one colour scale for all panels")
    lines += ["### Per-task score by stage", ""]
    for lab, tasks, runs in g.orders():
        fig(f"curves__{g.slug}__order-{_slug(lab)}", _curves_fig(g, lab, tasks, runs, styles),
            f"{g.label}, order {lab}: score of each task after each stage, mean over seeds (band: 95% CI "
            "when n > 1); the grey band marks the stage that trains the task")
    lines += ["### Final ACC, BWT and forgetting", ""]
    fig(f"final__{g.slug}", _final_fig(g, agg, styles), f"{g.label}: final ACC, BWT and forgetting per method, "
        f"mean over seeds and orders ({n_text}); {n_note}; dots are single samples")
    lines += ["### Stability–plasticity", ""]
    fig(f"stability__{g.slug}", _stability_fig(g, agg, styles), f"{g.label}: learning accuracy (plasticity) against "
        f"forgetting; large marker = mean ({n_text}), faint markers = single samples; lower right is better")
    lines += ["### Cost", ""]
    table(f"cost__{g.slug}", cost_table(agg, "md"), cost_table(agg, "tex"))
    fig(f"cost__{g.slug}", _cost_fig(g, agg, styles), f"{g.label}: cost per method (mean; {n_note})")
    refs = reference_table(g)
    if refs is not None:
        lines += ["### Reference runs", "",
                  "Multitask (one joint model on all tasks, the stream's total budget) and single-task (each task "
                  "trained alone from the base model) references, and each sequential method's intransigence "
                  "I_k = a*_k − R[k, k] against the multitask reference (positive = the method learns task k worse "
                  "than joint training). Means over seeds.", ""]
        table(f"references__{g.slug}", refs[1], extra_csv=refs[0])
    held = heldout_table(g)
    if held is not None:
        lines += ["### General-ability retention (held-out tasks)", ""]
        table(f"heldout__{g.slug}", held[1], extra_csv=held[0])
        fig(f"heldout__{g.slug}", _heldout_fig(g, held[0], styles), f"{g.label}: mean change of held-out task scores "
            "vs. the base model after each stage (negative = lost general ability)")
    return lines
