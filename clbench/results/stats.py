"""Paired comparisons of methods and the "did not learn" check, with percentile-bootstrap CIs.

Two resampling units:

- over runs: each (task order, seed) is one sample, a method is paired with the reference method
  of the same order and seed, and the bootstrap resamples those pairs (the mean of the paired
  differences in each resample);
- over test examples, for a group with a single (order, seed): the per-example records of
  lm-eval in the run's `samples/` files; each resample draws, per task, test examples with
  replacement, the SAME examples for every stage and for both methods (paired by example), and
  rebuilds both accuracy matrices from them.

The interval is the percentile interval (Efron & Tibshirani 1993, "An Introduction to the
Bootstrap", ch. 13): the (1 - level)/2 and (1 + level)/2 quantiles of the resampled statistic,
numpy's default linear interpolation (Hyndman & Fan type 7). Written here rather than with
scipy.stats.bootstrap because one set of resample indices is shared by every metric, by both
methods and, at the example level, by every cell of the matrices (a resample is a set of test
examples per task, and the statistic is a metric of whole rebuilt matrices), which scipy's
bootstrap, resampling its statistic's own arguments, does not express.

"Did not learn": task i counts as learned when its learning gain R[i, i] - R[0, i] (the score
after training it minus the base model's) is above 0 beyond the CI (its lower bound > 0), where a
CI exists; where none does (one seed and no per-example records), when the gain exceeds
LEARN_MARGIN = 0.05, about one binomial standard error of an accuracy near 0.5 on 100 test
examples (the default eval.limit). A method that did not learn some task is flagged: its BWT and
forgetting on such a task measure nothing learned, so they are never marked best.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from clbench.results import metrics

LEVEL = 0.95
N_RESAMPLES = 10_000  # over runs: a resample is a mean of a few numbers
N_EXAMPLE_RESAMPLES = 1_000  # over examples: a resample rebuilds two matrices
COMPARED = ("acc", "bwt", "forgetting", "la")
LEARN_MARGIN = 0.05
SEED = 0  # the bootstrap's own generator: the same report twice gives the same intervals

_FUNCS = {"acc": metrics.acc, "bwt": metrics.bwt, "forgetting": metrics.forgetting, "la": metrics.learning_accuracy}


def percentile_interval(resampled, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of resampled statistics (NaN resamples dropped)."""
    x = np.asarray(resampled, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return math.nan, math.nan
    lo, hi = np.quantile(x, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def resample_indices(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) indices drawn with replacement from 0..n-1."""
    return rng.integers(0, n, size=(n_resamples, n))


ZERO_TOL = 1e-9  # scores are fractions of examples: a bound within float noise of 0 (e.g. -2e-17) is 0


def excludes_zero(lo: float, hi: float) -> bool:
    """The interval lies strictly on one side of 0; a bound within ZERO_TOL of 0 touches it."""
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > ZERO_TOL or hi < -ZERO_TOL))


def mean_interval(values, n_resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict:
    """Mean of paired differences (or of any per-sample values) with its bootstrap interval over
    samples; with fewer than two samples the interval is NaN (one sample says nothing of spread)."""
    d = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(d) == 0:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "over": "runs"}
    if len(d) < 2:
        return {"diff": float(d[0]), "lo": math.nan, "hi": math.nan, "n": 1, "over": "none"}
    idx = resample_indices(len(d), n_resamples, np.random.default_rng(seed))
    lo, hi = percentile_interval(d[idx].mean(axis=1), level)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "n": len(d), "over": "runs"}


# --- per-example records ----------------------------------------------------------------------------


def read_example_scores(path: Path, metric: str) -> dict[int, float] | None:
    """{doc_id: score} of one lm-eval samples file (the record's `metric` field), or None when the
    file is absent or its records do not carry that metric."""
    if not path.is_file():
        return None
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        v = rec.get(metric)
        if not isinstance(v, (int, float)) or "doc_id" not in rec:
            return None
        out[int(rec["doc_id"])] = float(v)
    return out


def example_cells(run_dir: Path, method: str, seed: str, tasks: list[str], metric: str):
    """{(stage, task index): {doc_id: score}} of a (method, seed) from its samples files (stage 0 from
    the base model's), or None when any cell is missing."""
    T = len(tasks)
    cells = {}
    for t in range(T + 1):
        folder = run_dir / "samples" / ("base" if t == 0 else method) / ("" if t == 0 else f"seed{seed}") / f"stage{t}"
        for i, task in enumerate(tasks):
            s = read_example_scores(folder / f"{task}.jsonl", metric)
            if not s:
                return None
            cells[(t, i)] = s
    return cells


def _rebuild(cells: dict, docs: list[list[int]], counts: list[np.ndarray], T: int) -> np.ndarray:
    """(B, T+1, T) matrices: cell (t, i) = the mean score over the resampled examples of task i that
    the cell scored. `counts[i]` (B, len(docs[i])) says how often each example of task i was drawn in
    each resample; a cell that scored only some of them (eval.offdiag_limit) averages those, with
    their counts as weights, so every cell keeps its own examples and all cells one draw."""
    B = counts[0].shape[0]
    R = np.empty((B, T + 1, T))
    for i in range(T):
        for t in range(T + 1):
            c = cells[(t, i)]
            have = np.array([d in c for d in docs[i]], dtype=float)
            v = np.array([c.get(d, 0.0) for d in docs[i]])
            n = counts[i] @ have
            if not n.all():
                raise ValueError(f"a resample drew none of the examples of cell ({t}, {i})")
            R[:, t, i] = (counts[i] @ v) / n
    return R


def example_resamples(cell_sets: list[dict], T: int, n_resamples: int = N_EXAMPLE_RESAMPLES,
                      seed: int = SEED) -> list[np.ndarray]:
    """Resampled matrices of several (method, seed)s over the same test examples. Per task, the
    examples scored in any cell of any set are resampled once (one draw for every cell and every set,
    so paired differences stay paired); each cell averages the drawn examples it scored. Cells with
    the same examples (the usual case) get exactly the plain bootstrap mean; an off-diagonal cell on
    the first N examples (eval.offdiag_limit) keeps its N, while the diagonal keeps all of its own
    (resampling only the examples every cell shares would shrink every interval to N examples).
    Returns one (B, T+1, T) array per set."""
    rng = np.random.default_rng(seed)
    docs, counts = [], []
    for i in range(T):
        union = sorted(set().union(*[set(c[(t, i)]) for c in cell_sets for t in range(T + 1)]))
        if not union:
            raise ValueError(f"no test example of task {i} is scored")
        idx = resample_indices(len(union), n_resamples, rng)
        cnt = np.zeros((n_resamples, len(union)))
        np.add.at(cnt, (np.arange(n_resamples)[:, None], idx), 1.0)
        docs.append(union)
        counts.append(cnt)
    return [_rebuild(c, docs, counts, T) for c in cell_sets]


def metric_of(R_batch: np.ndarray, name: str) -> np.ndarray:
    return np.array([_FUNCS[name](R) for R in R_batch])


# --- comparisons over a report group ----------------------------------------------------------------


def _pair_key(run, seed) -> tuple[str, str]:
    return (run.order, str(seed))


# Which matrices a comparison reads: "stream" (R, the stream's own scoring) or "other_kind" (the
# same tasks scored the other way, eval.other_kind: columns are the stream tasks' twins).
def _matrices(run, kind: str) -> dict:
    return run.R if kind == "stream" else run.other_kind


def _columns(run, kind: str) -> list[str]:
    return list(run.tasks) if kind == "stream" else list(run.other_kind_tasks)


def _items(group, method: str, kind: str = "stream") -> dict:
    """{(order, seed): (run, seed)} of a sequential method in the group."""
    out = {}
    for r in group.runs:
        for (m, s) in _matrices(r, kind):
            if m == method and r.mode(m) == "sequential":
                out[_pair_key(r, s)] = (r, s)
    return out


def metric_name(run, kind: str = "stream") -> str:
    rows = run.matrix[(run.matrix["group"] == kind) & run.matrix["eval_task"].isin(_columns(run, kind))]
    names = sorted(set(rows["metric"]))
    return names[0] if len(names) == 1 else ""


def resolve_reference(methods: list[str], reference: str) -> str | None:
    """The reference method's result name in a group: the exact name, else the one method whose
    name before '@' (a sweep's or tuning's setting suffix) is the reference."""
    if reference in methods:
        return reference
    hits = [m for m in methods if m.split("@")[0] == reference]
    return hits[0] if len(hits) == 1 else None


def _examples(group, key, methods: list[str], kind: str = "stream"):
    """Resampled matrices of methods at one (order, seed) from their samples files, or None."""
    sets = []
    for m in methods:
        r, s = _items(group, m, kind)[key]
        tasks = _columns(r, kind)
        cells = example_cells(Path(r.path), m, s, tasks, metric_name(r, kind))
        if cells is None:
            return None
        sets.append(cells)
    try:
        return example_resamples(sets, len(tasks))
    except ValueError:
        return None


def paired_differences(group, reference: str) -> list[dict]:
    """Rows {method, reference, metric, diff, lo, hi, n, over, significant}: each sequential method
    against the reference over the (order, seed) pairs both have; a single pair falls back to the
    example-level bootstrap when the samples files are there (over = "examples"), else no CI."""
    methods = sorted({m for r in group.runs for (m, _) in r.R if r.mode(m) == "sequential"})
    ref = resolve_reference(methods, reference)
    if ref is None:
        return []
    ref_items = _items(group, ref)
    rows = []
    for m in methods:
        if m == ref:
            continue
        mine = _items(group, m)
        keys = sorted(set(mine) & set(ref_items))
        if not keys:
            continue
        boot = _examples(group, keys[0], [m, ref]) if len(keys) == 1 else None
        for name in COMPARED:
            d = [_FUNCS[name](mine[k][0].R[(m, mine[k][1])]) - _FUNCS[name](ref_items[k][0].R[(ref, ref_items[k][1])])
                 for k in keys]
            res = mean_interval(d)
            if boot is not None:
                res["lo"], res["hi"] = percentile_interval(metric_of(boot[0], name) - metric_of(boot[1], name))
                res["over"] = "examples"
            rows.append({"method": m, "reference": ref, "metric": name, **res,
                         "significant": excludes_zero(res["lo"], res["hi"])})
    return rows


def method_intervals(group, kind: str = "stream") -> list[dict]:
    """Rows {method, metric, diff (the metric's value), lo, hi, n, over, significant}: each sequential
    method's ACC, BWT, forgetting and LA with a 95% bootstrap CI, over its (order, seed) samples when it
    has several, else over test examples (its own matrix rebuilt from resampled examples, as the
    paired comparison does) when the samples files are there, else no CI. `significant`: the CI
    excludes 0 (for BWT: forgetting, or backward transfer, beyond the test-set noise).
    kind="other_kind": the same for the stream's tasks scored the other way (eval.other_kind)."""
    methods = sorted({m for r in group.runs for (m, _) in _matrices(r, kind) if r.mode(m) == "sequential"})
    rows = []
    for m in methods:
        items = _items(group, m, kind)
        keys = sorted(items)
        boot = _examples(group, keys[0], [m], kind) if len(keys) == 1 else None
        for name in COMPARED:
            v = [_FUNCS[name](_matrices(items[k][0], kind)[(m, items[k][1])]) for k in keys]
            res = mean_interval(v)
            if boot is not None:
                res["lo"], res["hi"] = percentile_interval(metric_of(boot[0], name))
                res["over"] = "examples"
            rows.append({"method": m, "metric": name, **res, "significant": excludes_zero(res["lo"], res["hi"])})
    return rows


def not_learned_by_margin(R, margin: float = LEARN_MARGIN) -> list[int]:
    """0-based indices of tasks whose learning gain R[i, i] - R[0, i] is not above `margin`."""
    R = np.asarray(R, dtype=float)
    return [i for i in range(R.shape[1]) if not R[i + 1, i] - R[0, i] > margin]


def learning_check(group) -> dict[str, dict]:
    """{method: {tasks, not_learned, gains, over}} for every sequential method of the group: which
    tasks it did not learn (module docstring: CI lower bound of the gain > 0, else gain > margin)."""
    out = {}
    methods = sorted({m for r in group.runs for (m, _) in r.R if r.mode(m) == "sequential"})
    for m in methods:
        items = _items(group, m)
        runs = [r for r, _ in items.values()]
        tasks = list(runs[0].tasks)  # one group holds one task set; an order permutes it
        gains: dict[str, list[float]] = {t: [] for t in sorted(tasks)}
        for r, s in items.values():
            R = r.R[(m, s)]
            for i, t in enumerate(r.tasks):
                gains[t].append(float(R[i + 1, i] - R[0, i]))
        boot = _examples(group, next(iter(items)), [m]) if len(items) == 1 else None
        if boot is not None:
            over = "examples"
            r0 = runs[0]
            lows = {t: percentile_interval(boot[0][:, i + 1, i] - boot[0][:, 0, i])[0] for i, t in enumerate(r0.tasks)}
        elif len(items) > 1:
            over = "runs"
            lows = {t: mean_interval(v)["lo"] for t, v in gains.items()}
        else:
            over = "margin"
            lows = {t: v[0] - LEARN_MARGIN for t, v in gains.items()}
        bad = [t for t in tasks if not lows[t] > 0]
        out[m] = {"tasks": tasks, "not_learned": bad, "gains": {t: float(np.mean(v)) for t, v in gains.items()},
                  "over": over}
    return out


def flag_text(check: dict) -> str:
    """'' for a method that learned every task, else e.g. 'did not learn 3/4 tasks'."""
    bad = check["not_learned"]
    return f"did not learn {len(bad)}/{len(check['tasks'])} tasks" if bad else ""
