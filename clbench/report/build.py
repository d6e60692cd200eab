"""`clbench report`: figures, tables and a one-page report.md from run directories.

Reads only the results contract (config.yaml, matrix.csv, summary.csv, results.json; see
clbench/results/contract.py). Every metric is recomputed from matrix.csv with clbench.results.metrics, so a report
never repeats a stale or buggy number from summary.csv; summary.csv is read for cost columns only.

Aggregation: runs of the same (model, stream) form one group; inside a group every
(run directory, method, seed) is one sample, so different seeds and different task orders (which
are different run directories) pool into one mean per method. Different models or streams are
never averaged together: each group gets its own section, figures and tables, named after it.
"""

from __future__ import annotations

import json

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from clbench.report import plotstyle
from clbench.report.tables import (cost_table, heldout_table, method_stats_table, metrics_table, other_kind_matrices,
                                   paired_table, reference_table, render_table)
from clbench.results import stats
from clbench.results.rundir import RunDir
from clbench.results.rundirs import (CI_LEVEL, COST_COLUMNS, COST_LABELS, HIGHER_IS_BETTER, LABELS, METRICS, Group,
                                     ReportError, RunResults, aggregate, discover_runs, drop_repeats, group_runs,
                                     load_run, seed_key, slug)

# --- figures: turn a group into the plain numbers plotstyle draws ----------------------------------


def value_range(runs: list[RunResults]) -> tuple[float, float]:
    """One colour scale for every heatmap of the report: [0, 1] when all scores are in it, except
    for a stream scored by per-byte likelihood only (raw-text domains), whose values differ by a few
    hundredths: there the range of the values."""
    vals = np.concatenate([R.ravel() for r in runs for R in r.R.values()]
                          + [v for r in runs for e in r.extra.values() for v in e.values()])
    vals = vals[np.isfinite(vals)]
    lo, hi = float(vals.min()), float(vals.max())
    unit = lo >= 0 and hi <= 1 and _stream_metrics(runs) != {"per_byte_likelihood"}
    return (0.0, 1.0) if unit else (lo, hi if hi > lo else lo + 1)


def _stream_metrics(runs: list[RunResults]) -> set[str]:
    names = set()
    for r in runs:
        stream = r.matrix[(r.matrix["group"] == "stream") & r.matrix["eval_task"].isin(r.tasks)]
        names |= set(stream["metric"])
    return names


def _metric_label(runs: list[RunResults], brief: bool = False) -> str:
    """The score's name: `score (acc)`, `score (per_byte_likelihood = 2^-bpb)` in titles, the short
    names (`score (2^-bpb)`) on axes (brief) and for a mixed (text and instruction) stream:
    `score (acc | 2^-bpb)`."""
    names = sorted(_stream_metrics(runs))
    if len(names) == 1:
        return f"score ({plotstyle.metric_name(names[0], brief)})"
    if len(names) <= 3:
        return "score (" + " | ".join(plotstyle.metric_name(n, brief=True) for n in names) + ")"
    return "score (primary metric)"


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
    return plotstyle.heatmaps(f"{g.label} · order {lab}\n{_metric_label(runs)}", tasks, panels, vrange,
                              _metric_label(runs, brief=True))


def _curves_fig(g: Group, lab: str, tasks: list[str], runs: list[RunResults], styles):
    series = {}
    for method, items in _by_method(runs).items():
        Rs = np.stack([r.R[(method, s)] for r, s in items])
        n = len(items)
        half = (scipy.stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1) * Rs.std(axis=0, ddof=1) / math.sqrt(n)) if n > 1 else None
        series[method] = (Rs.mean(axis=0), half, n)
    unit = value_range(runs) == (0.0, 1.0)
    return plotstyle.curves(f"{g.label} · order {lab}\n{_metric_label(runs)}", tasks, series, styles,
                            _metric_label(runs, brief=True),
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


def _paired_fig(g: Group, paired: list[dict], reference: str, styles, flags: dict[str, str]):
    """Forest plot: per metric, each method's paired difference to the reference with its 95% CI; a
    method that did not learn some task is marked ✗."""
    methods = sorted({p["method"] for p in paired})
    by = {(p["method"], p["metric"]): p for p in paired}
    fig = plotstyle.new_figure(plotstyle.SINGLE_COLUMN_IN, 0.9 + 0.22 * len(methods) * 2)
    axes = fig.subplots(2, 2, squeeze=False).flat
    for ax, metric in zip(axes, stats.COMPARED):
        for k, m in enumerate(methods):
            p = by.get((m, metric))
            if p is None or not np.isfinite(p["diff"]):
                continue
            y = len(methods) - 1 - k
            if np.isfinite(p["lo"]):
                ax.plot([p["lo"], p["hi"]], [y, y], color=styles.color(m), lw=1.2)
            ax.plot([p["diff"]], [y], marker=styles.marker(m), color=styles.color(m), ms=4,
                    mfc=styles.color(m) if p["significant"] else "white")
        ax.axvline(0, color="0.3", lw=0.6)
        ax.set_yticks(range(len(methods)), [plotstyle.short(m) + (" ✗" if flags.get(m) else "") for m in reversed(methods)])
        ax.set_title(f"Δ {LABELS[metric]} {'↑' if HIGHER_IS_BETTER[metric] else '↓'}")
    over = sorted({p["over"] for p in paired})
    fig.suptitle(f"{g.label}\nΔ vs {plotstyle.short(paired[0]['reference'], 20)}, 95% CI over {', '.join(over)}")
    return fig


def _other_kind_section(g: Group, lines: list[str], table) -> None:
    """eval.other_kind: the stream's tasks scored the other way after every stage (generation tasks
    by log-likelihood over the label words, or the reverse), never trained: is what a method lost
    the task's knowledge or only its answer format?"""
    rows = stats.method_intervals(g, "other_kind") if any(r.other_kind for r in g.runs) else []
    if not rows:
        return
    run = next(r for r in g.runs if r.other_kind)
    own, other = stats.metric_name(run), stats.metric_name(run, "other_kind")
    lines += [f"### The same tasks scored the other way ({other or 'the twin tasks'})", "",
              f"Every stream task was also scored its other way after every stage (eval.other_kind): the twin "
              f"task has the same test documents and prompt; the stream is scored by {own or 'its own metric'}, "
              f"the twins by {other or 'theirs'}. Where generation forgets and log-likelihood "
              "does not, the model lost the answer's form (the label word it generates) more than its ranking "
              "of the answers. Each method's metrics on the twins, with 95% CIs as above:", ""]
    table(f"other_kind__{g.slug}", paired_table(rows, "md", delta=False), paired_table(rows, "tex", delta=False),
          pd.DataFrame(rows))
    mats = other_kind_matrices(g)
    if mats:
        lines += ["The twins' matrices (mean over seeds; bold: the stage that trained the task):", ""]
        table(f"other_kind_matrices__{g.slug}", mats)


def _learning_section(g: Group, checks: dict, lines: list[str], table) -> None:
    """The learning check: per method and task the learning gain R[i, i] − R[0, i] and whether it
    counts as learned (clbench.results.stats)."""
    tasks = next(iter(checks.values()))["tasks"]  # the first run's training order
    body = [[m + (f" ({stats.flag_text(c)})" if c["not_learned"] else ""),
             *[f"{c['gains'][t]:.3f}" + (" ✗" if t in c["not_learned"] else "") for t in tasks], c["over"]]
            for m, c in checks.items()]
    frame = pd.DataFrame([{"method": m, "task": t, "gain": c["gains"][t], "learned": t not in c["not_learned"],
                           "decided_by": c["over"]} for m, c in checks.items() for t in c["tasks"]])
    lines += ["### Learning check", "",
             "Learning gain R[i, i] − R[0, i] per task (the score right after training task i minus the base "
             "model's; mean over samples). ✗ = not learned: the gain's 95% bootstrap CI does not lie above 0 "
             f"(over runs, or over test examples with one run), or, without a CI (`margin`), the gain is not above "
             f"{stats.LEARN_MARGIN}. A method that did not learn a task is flagged \"did not learn\" and never bold "
             "for BWT or forgetting: it cannot forget what it never learned.", ""]
    md = render_table(["method", *tasks, "decided by"], body, "md", align="l" + "r" * len(tasks) + "l")
    table(f"learning__{g.slug}", md, extra_csv=frame)


def _paired_section(g: Group, paired: list[dict], reference: str, styles, flags: dict[str, str], lines: list[str],
                    table, fig) -> None:
    lines += [f"### Paired differences vs {reference}", ""]
    if not paired:
        lines += [f"No comparison: the group has no sequential method {reference!r} (`clbench report "
                        "--reference METHOD` chooses another).", ""]
        return
    lines += [f"Each method minus {paired[0]['reference']}, paired by task order and seed; 95% percentile-bootstrap "
              "CI over the (order, seed) pairs, or over test examples (the same examples for both methods and "
              "every stage) when there is one pair and its per-example records are in `samples/`; no CI with one "
              "pair and no records. † = the CI excludes 0.", ""]
    table(f"paired__{g.slug}", paired_table(paired, "md"), paired_table(paired, "tex"), pd.DataFrame(paired))
    if any(np.isfinite(p["lo"]) for p in paired):
        fig(f"paired__{g.slug}", _paired_fig(g, paired, reference, styles, flags),
            f"{g.label}: paired difference of each method to {paired[0]['reference']} with its 95% bootstrap CI; "
            "a filled marker = the CI excludes 0; ✗ = did not learn some task (learning check)")


# --- the report -------------------------------------------------------------------------------------

DEFINITIONS = """\
R[t, i] is the score on the i-th task of the training order (i = 1..T) after training stage t;
row t = 0 is the base model before any training. Scores are each task's primary metric in its natural
scale (e.g. acc, exact_match in [0, 1]); higher is better. All metrics are recomputed from matrix.csv
with `clbench.results.metrics`.

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


def build_report(run_dirs: list[str | Path], out: str | Path | None = None, reference: str = "full_ft") -> Path:
    """Writes the report, returns the report directory; `reference` is the method every other is
    compared with (paired differences with bootstrap CIs, clbench.results.stats). Every run is loaded and validated before
    anything is drawn, so a bad file raises ReportError (naming it) without leaving half a report."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ReportError("no run directory given")

    tunes = [RunDir(d).tune_record() for d in run_dirs if RunDir(d).is_tune()]
    # a tune directory is reported by its final (test) runs; its selection runs scored validation only
    found, notes = discover_runs([Path(d) / "final" if RunDir(d).is_tune() else d for d in run_dirs])
    runs = [load_run(d) for d in found]
    for r in runs:
        notes += r.notes
    notes += drop_repeats(runs)
    groups = group_runs(runs)
    if not groups:
        raise ReportError(f"no complete (method, seed) results in {', '.join(map(str, run_dirs))}: "
                          + "; ".join(notes))
    for n in notes:
        warnings.warn(n, stacklevel=2)

    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    _check_writable(out)
    try:
        return _write_report(out, runs, groups, notes, reference, tunes)
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


def _write_report(out: Path, runs, groups, notes, reference: str, tunes: list[dict]) -> Path:
    fig_dir, tab_dir = out / "figures", out / "tables"
    _clear_previous(out)
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)
    before = _listing(out)

    styles = plotstyle.MethodStyle(m for g in groups for m in g.methods)
    vrange = value_range(runs)
    page = ["# clbench report", "",
            f"{len(runs)} run(s), {len(groups)} model/stream group(s). Metrics are recomputed from "
            "`matrix.csv`; `summary.csv` is used for cost columns only. Figures as PDF (vector) and PNG "
            "in `figures/`, tables as Markdown and LaTeX (booktabs) in `tables/`.", "",
            "## Runs", "", _runs_table(runs), "", *_tuning_section(tunes)]
    with plotstyle.styled():
        for g in groups:
            page += _group_section(g, styles, vrange, fig_dir, tab_dir, reference)
    page += ["## Metric definitions", "", DEFINITIONS]
    if notes:
        page += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    (out / "report.md").write_text("\n".join(page))
    after = _listing(out)
    written = sorted(k for k, v in after.items() if before.get(k) != v)
    (out / REPORT_RECORD).write_text(json.dumps({"files": written}, indent=0))
    return out


REPORT_RECORD = ".clbench-report.json"  # the files the last report wrote into its folder


def _listing(out: Path) -> dict[str, tuple[int, int]]:
    """{path relative to out: (size, mtime_ns)} of report.md and the files in figures/ and tables/."""
    files = [out / "report.md", *[f for sub in ("figures", "tables") for f in (out / sub).glob("*")]]
    return {str(f.relative_to(out)): (st.st_size, st.st_mtime_ns) for f in files if f.is_file() and (st := f.stat())}


def _clear_previous(out: Path) -> None:
    """A re-run must not leave figures of groups that are gone: the files the previous report
    recorded as its own (REPORT_RECORD) are removed, nothing else. A report.md that clbench did not
    write is refused; a report from before the record keeps its files (they are overwritten where
    the new report writes the same names)."""
    rec = out / REPORT_RECORD
    if rec.is_file():
        try:
            names = json.loads(rec.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ReportError(f"{rec}: unreadable record of the previous report's files ({e}); delete it, or "
                              "choose another --out") from None
        for name in names:
            f = (out / name)
            if f.parent.resolve() in {out.resolve(), (out / "figures").resolve(), (out / "tables").resolve()} and f.is_file():
                f.unlink()
        return
    md = out / "report.md"
    if md.is_file():
        with open(md, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().strip()
        if first != "# clbench report":
            raise ReportError(f"{md} exists and clbench did not write it; choose another --out")


def _tuning_section(tunes: list[dict]) -> list[str]:
    """Every candidate of a `clbench tune` with its validation score, and the winner each method ran
    with on test (tune.json)."""
    lines = []
    for t in tunes:
        sel = t["select"]
        what = (f"after the first {sel['k']} tasks ({', '.join(sel['tasks'])}), trained on those only"
                if sel["protocol"] == "first_k" else "after the whole stream")
        lines += [f"## Tuning: {t['name']}", "",
                  f"Settings chosen on the validation splits only (never a test file): validation ACC {what}, "
                  f"seed {sel['seed']}, order {sel['order']}; the winner of each method (bold; a tie goes to the "
                  f"candidate listed first) ran on test over seeds {', '.join(map(str, t['final']['seeds']))} x "
                  f"orders {', '.join(map(str, t['final']['orders']))}.", ""]
        body = []
        for m, c in t["methods"].items():
            win = (c.get("winner") or {}).get("label")
            for cand in c["candidates"]:
                setting = ", ".join(f"{k}={v}" for k, v in cand["setting"].items())
                score = "–" if cand["score"] is None or math.isnan(cand["score"]) else f"{cand['score']:.3f}"
                cells = [m, cand["label"], setting, score]
                body.append([f"**{x}**" for x in cells] if cand["label"] == win else cells)
        lines += [render_table(["method", "candidate", "setting", "validation ACC"], body, "md", align="lllr"), ""]
    return lines


def _runs_table(runs: list[RunResults]) -> str:
    body = []
    for r in runs:
        methods = sorted({m for m, _ in r.pairs})
        seeds = sorted({s for _, s in r.pairs}, key=seed_key)
        body.append([f"`{r.path}`", r.name, r.model, r.stream, r.order, " → ".join(r.tasks),
                     ", ".join(methods) or "–", ", ".join(seeds) or "–", (r.git_sha or "–")[:10]])
    return render_table(["run dir", "name", "model", "stream", "order", "tasks (training order)", "methods", "seeds",
                    "git"], body, "md", align="lllllllll")


def _group_section(g: Group, styles, vrange, fig_dir: Path, tab_dir: Path, reference: str) -> list[str]:
    agg = aggregate(g.samples)
    checks = stats.learning_check(g)
    flags = {m: stats.flag_text(c) for m, c in checks.items()}
    paired = stats.paired_differences(g, reference)
    n_by_method = g.samples.groupby("method").size()
    n_text = ", ".join(f"{m} n = {n}" for m, n in n_by_method.items())
    descs = sorted({r.model_desc for r in g.runs})
    seeds = sorted({str(s) for s in g.samples["seed"]}, key=seed_key)
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
              "↓ lower is better); – = undefined (one-task stream); † = the paired difference to "
              f"{reference} has a 95% bootstrap CI that excludes 0 (section below); \"did not learn\": see "
              "the learning check below and the last column (such a method is never bold for BWT or forgetting).", ""]
    table(f"summary__{g.slug}", metrics_table(agg, "md", flags, paired), metrics_table(agg, "tex", flags, paired),
          agg[agg["metric"].isin(METRICS)])
    g.samples.to_csv(tab_dir / f"samples__{g.slug}.csv", index=False)
    lines += [f"Per-sample recomputed metrics: `tables/samples__{g.slug}.csv`.", ""]

    intervals = stats.method_intervals(g)
    if any(not math.isnan(r["lo"]) for r in intervals):
        lines += ["### Metrics with 95% CIs", "",
                  "Each method's own ACC, BWT, forgetting and LA with a 95% percentile-bootstrap CI: over its "
                  "seeds × orders when it has several, else over the test examples (each task's examples "
                  "resampled, the same ones in every stage, and the matrix rebuilt). † = the CI excludes 0; a BWT "
                  "whose CI lies below 0 is forgetting beyond the test-set noise.", ""]
        table(f"intervals__{g.slug}", paired_table(intervals, "md", delta=False), paired_table(intervals, "tex", delta=False),
              pd.DataFrame(intervals))
    _other_kind_section(g, lines, table)
    acting = method_stats_table(g)
    if acting is not None:
        lines += ["### What each method's mechanism did", "",
                  "Each method's own per-stage diagnostics (results.json `method_stats`; docs/methods.md says "
                  "what each means), mean over seeds: a regulariser's share of the task loss, the share of "
                  "the gradient a projection removed, the pseudo-examples a generative method kept. A "
                  "penalty near 0 means the method trained as full fine-tuning there.", ""]
        table(f"method_stats__{g.slug}", acting[1], extra_csv=acting[0])
    _learning_section(g, checks, lines, table)
    _paired_section(g, paired, reference, styles, flags, lines, table, fig)
    accuracy = "per_byte_likelihood" not in _stream_metrics(g.runs)  # raw-text domains: a likelihood
    lines += ["### Accuracy matrices" if accuracy else f"### Score matrices: {_metric_label(g.runs)}", ""]
    for lab, tasks, runs in g.orders():
        fig(f"heatmap__{g.slug}__order-{slug(lab)}", _heatmap_fig(g, lab, tasks, runs, vrange),
            f"{g.label}, order {lab}: {'accuracy' if accuracy else 'score'} matrix R[stage, task] per method, mean "
            "over seeds; row 0 is the "
            "base model, rows below the line are extra (not in metrics); one colour scale for all panels")
    lines += ["### Per-task score by stage", ""]
    for lab, tasks, runs in g.orders():
        fig(f"curves__{g.slug}__order-{slug(lab)}", _curves_fig(g, lab, tasks, runs, styles),
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
