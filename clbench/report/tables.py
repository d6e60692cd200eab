"""The report's tables: metrics (mean ± std, best bold, n), references, costs, held-out probes, as
Markdown and booktabs LaTeX."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from clbench.results import metrics
from clbench.results.rundirs import COST_COLUMNS, COST_LABELS, DECIMALS, HIGHER_IS_BETTER, LABELS, METRICS, Group
from clbench.results.stats import COMPARED



def _num(v: float, decimals: int = DECIMALS) -> str:
    s = f"{v:.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def _printed(v: float) -> float:
    return float(_num(v))


# A method that did not learn some task forgets nothing of it: its BWT and forgetting are never best.
NEEDS_LEARNING = ("bwt", "forgetting")


def _best(agg: pd.DataFrame, metric: str, flagged: set[str] = frozenset()) -> float | None:
    """Best printed mean of a column (so printed ties are all bold), or None when fewer than two
    methods can be compared; flagged methods ("did not learn") are left out of BWT and forgetting."""
    rows = agg[agg["metric"] == metric]
    if metric in NEEDS_LEARNING:
        rows = rows[~rows["method"].isin(flagged)]
    means = [_printed(v) for v in rows["mean"] if not math.isnan(v)]
    if len(means) < 2:
        return None
    return max(means) if HIGHER_IS_BETTER[metric] else min(means)


def metrics_table(agg: pd.DataFrame, fmt: str, flags: dict[str, str] | None = None,
                  paired: list[dict] | None = None) -> str:
    """Summary metrics as Markdown (fmt="md") or LaTeX booktabs (fmt="tex"): mean ± std, the best
    mean per column in bold, n = samples per method. With n = 1 the cell holds the mean alone.
    flags: {method: "did not learn ..."} (a last column, when a method has one; never best for BWT or
    forgetting);
    paired: clbench.results.stats.paired_differences rows, a † on a cell whose difference to the reference
    method has a 95% CI that excludes 0."""
    flags = {m: f for m, f in (flags or {}).items() if f}
    sig = {(p["method"], p["metric"]) for p in paired or [] if p["significant"]}
    methods = sorted(agg["method"].unique())
    cols = _shown_metrics(agg)
    best = {m: _best(agg, m, set(flags)) for m in cols}
    arrow = {True: ("↑", r"$\uparrow$"), False: ("↓", r"$\downarrow$")}
    head, body = [], []
    for m in cols:
        a = arrow[HIGHER_IS_BETTER[m]][0 if fmt == "md" else 1]
        head.append(f"{LABELS[m]} {a}")
    for method in methods:
        cells = []
        for m in cols:
            r = agg[(agg["method"] == method) & (agg["metric"] == m)].iloc[0]
            bold = (best[m] is not None and not math.isnan(r["mean"]) and _printed(r["mean"]) == best[m]
                    and not (m in NEEDS_LEARNING and method in flags))
            mark = ("†" if fmt == "md" else r"$^\dagger$") if (method, m) in sig else ""
            cells.append(_cell(r["mean"], r["std"], bold=bold, fmt=fmt) + mark)
        n = int(agg.loc[agg["method"] == method, "samples"].iloc[0])
        body.append([_esc(method, fmt), *cells, str(n), *([flags.get(method, "")] if flags else [])])
    n_head = "n" if fmt == "md" else "$n$"
    return render_table(["method", *head, n_head, *(["learning"] if flags else [])], body, fmt,
                   align="l" + "r" * (len(cols) + 1) + ("l" if flags else ""))


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
        lines.append(f"Order {lab}:\n\n" + render_table(["row", *tasks, "mean"], body, "md", align="l" + "r" * (len(tasks) + 1)))
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
    return render_table(["method", *(COST_LABELS[c] for c in COST_COLUMNS), "n" if fmt == "md" else "$n$"], body, fmt,
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


def render_table(head: list[str], body: list[list[str]], fmt: str, align: str) -> str:
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
    return df, render_table(head, body, "md", align="l" + "r" * len(wide.columns))




def other_kind_matrices(group: Group) -> str | None:
    """eval.other_kind: per order, the matrix of the stream's tasks scored the other way (columns:
    each stream task's twin), mean over a method's seeds, methods side by side like R; bold: the
    task the stage trained."""
    out = []
    for r_order, tasks, runs in group.orders():
        by_method: dict[str, list[np.ndarray]] = {}
        twins: list[str] = []
        for r in runs:
            for (m, _), O in r.other_kind.items():
                if r.mode(m) == "sequential":
                    by_method.setdefault(m, []).append(O)
                    twins = twins or list(r.other_kind_tasks)
        if not by_method:
            continue
        methods = sorted(by_method)
        T = len(tasks)
        head = ["stage"] + [f"{m}: {t}" if j == 0 else t for m in methods for j, t in enumerate(twins)]
        body = []
        for st in range(T + 1):
            row = [f"{st} " + ("base" if st == 0 else tasks[st - 1])]
            for m in methods:
                mean = np.mean(by_method[m], axis=0)
                row += [(f"**{_num(mean[st, i], 2)}**" if st == i + 1 else _num(mean[st, i], 2)) for i in range(T)]
            body.append(row)
        out.append(f"Order {r_order}:\n\n" + render_table(head, body, "md", align="l" + "r" * (len(head) - 1)))
    return "\n".join(out) if out else None


def method_stats_table(group: Group) -> tuple[pd.DataFrame, str] | None:
    """Each method's own per-stage diagnostics (a regulariser's share of the loss, the share of the
    gradient a projection removed, ...: results.json stages[i].method_stats), mean over its seeds
    and orders, one row per (method, diagnostic), one column per stage."""
    rows = []
    for r in group.runs:
        for (method, seed), per in r.method_stats.items():
            if r.mode(method) != "sequential":
                continue
            for stage, stats in per.items():
                for name, v in stats.items():
                    rows.append({"method": method, "stat": name, "stage": stage, "value": v})
    if not rows:
        return None
    df = pd.DataFrame(rows).groupby(["method", "stat", "stage"])["value"].agg(["mean", "count"]).reset_index()
    T = max(len(r.tasks) for r in group.runs)
    wide = df.pivot(index=["method", "stat"], columns="stage", values="mean").reindex(columns=range(1, T + 1))
    head = ["method", "diagnostic"] + [f"stage {s}" for s in wide.columns]
    body = [[m, stat] + [("–" if pd.isna(v) else f"{v:.3g}") for v in wide.loc[(m, stat)]] for m, stat in wide.index]
    return df, render_table(head, body, "md", align="ll" + "r" * len(wide.columns))


def paired_table(rows: list[dict], fmt: str, delta: bool = True) -> str:
    """Paired differences against the reference method (clbench.results.stats.paired_differences): the mean
    difference and its 95% bootstrap CI per metric, † where the CI excludes 0. delta=False: each
    method's own metrics with their CIs (clbench.results.stats.method_intervals), the same layout."""
    by = {(r["method"], r["metric"]): r for r in rows}
    body = []
    for method in sorted({r["method"] for r in rows}):
        cells, n, over = [], "", ""
        for m in COMPARED:
            r = by.get((method, m))
            if r is None or math.isnan(r["diff"]):
                cells.append("–" if fmt == "md" else "--")
                continue
            n, over = str(r["n"]), r["over"]
            text = _num(r["diff"]) + (f" [{_num(r['lo'])}, {_num(r['hi'])}]" if not math.isnan(r["lo"]) else "")
            mark = ("†" if fmt == "md" else r"$^\dagger$") if r["significant"] else ""
            cells.append((text if fmt == "md" else f"${text}$") + mark)
        body.append([_esc(method, fmt), *cells, n, over])
    pre = ("Δ", r"$\Delta$ ") if delta else ("", "")
    head = ["method", *(f"{pre[0]}{LABELS[m]}" if fmt == "md" else rf"{pre[1]}{LABELS[m]}" for m in COMPARED),
            "n" if fmt == "md" else "$n$", "CI over"]
    return render_table(head, body, fmt, align="l" + "r" * (len(COMPARED) + 1) + "l")
