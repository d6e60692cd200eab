"""`clbench report` on hand-written results directories.

Every matrix below is written out by hand; expected metrics are worked out by hand (or, for the
aggregation test, with the t quantile written out) rather than by calling the code under test.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from clbench.report.build import ReportError, build_report, load_run
from clbench.results import metrics
from clbench.results.rundirs import mean_ci

FIXTURES = Path(__file__).parents[1] / "fixtures" / "report"
COST = {"trainable_params": 1000, "train_seconds": 2.0, "eval_seconds": 1.0, "peak_mem_mb": 100.0}


def write_run(d: Path, matrices: dict, tasks=("a", "b", "c"), model="tiny", stream="s3", order="1",
              cost: dict | None = None, summary_metrics: dict | None = None) -> Path:
    """A run directory in the results-contract format. matrices: {method: {seed: R}} with R a
    (T+1) x T list (row 0 = base model, columns in the training order `tasks`)."""
    d.mkdir(parents=True, exist_ok=True)
    seeds = sorted({s for per in matrices.values() for s in per})
    (d / "config.yaml").write_text(yaml.safe_dump({"name": d.name, "model": model, "stream": stream,
                                                   "order": order, "seeds": seeds}))
    rows, summary, methods = [], [], {}
    for method, per in matrices.items():
        for seed, R in per.items():
            for stage, row in enumerate(R):
                for task, v in zip(tasks, row):
                    rows.append([method, seed, stage, tasks[stage - 1] if stage else "", task, "acc", repr(v)])
            c = (cost or {}).get(method, COST)
            m = (summary_metrics or {}).get((method, seed), metrics.summary(R))  # what the runner writes
            summary.append({"method": method, "seed": seed, **m, **c})
            methods.setdefault(method, {"seeds": {}})["seeds"][str(seed)] = {"matrix": R, "metrics": {}, **c}
    with open(d / "matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "stage", "trained_task", "eval_task", "metric", "value"])
        w.writerows(rows)
    with open(d / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "acc", "bwt", "fwt", "forgetting", "la", "aia",
                                          "trainable_params", "train_seconds", "eval_seconds", "peak_mem_mb"])
        w.writeheader()
        w.writerows(summary)
    (d / "results.json").write_text(json.dumps({
        "run": {"name": d.name, "stream": stream, "order": order, "tasks": list(tasks), "seeds": seeds,
                "git_sha": None, "config": {"model": model}},
        "meta": {"versions": {}, "model": f"{model} (test model)", "hardware": {}},
        "methods": methods}))
    return d


# Hand-written matrices: base row, then stages 1..3; columns = tasks a, b, c in training order.
R_FT = {
    0: [[0.2, 0.3, 0.1], [0.8, 0.4, 0.2], [0.6, 0.9, 0.3], [0.5, 0.7, 0.7]],
    1: [[0.2, 0.3, 0.1], [0.7, 0.3, 0.2], [0.5, 0.8, 0.2], [0.4, 0.6, 0.9]],
    2: [[0.2, 0.3, 0.1], [0.9, 0.5, 0.1], [0.7, 0.9, 0.4], [0.6, 0.8, 0.8]],
}
R_LORA = {
    0: [[0.2, 0.3, 0.1], [0.6, 0.3, 0.1], [0.6, 0.7, 0.1], [0.6, 0.7, 0.6]],
    1: [[0.2, 0.3, 0.1], [0.5, 0.3, 0.2], [0.5, 0.6, 0.2], [0.5, 0.6, 0.5]],
    2: [[0.2, 0.3, 0.1], [0.7, 0.3, 0.1], [0.7, 0.8, 0.1], [0.6, 0.8, 0.7]],
}
# ACC of R_FT per seed, by hand: (0.5+0.7+0.7)/3, (0.4+0.6+0.9)/3, (0.6+0.8+0.8)/3
ACC_FT = [1.9 / 3, 1.9 / 3, 2.2 / 3]
# Forgetting of R_FT per seed, by hand (max over stages 1..2 minus final, tasks a and b):
# seed 0: (0.8-0.5, 0.9-0.7) -> 0.25 ; seed 1: (0.7-0.4, 0.8-0.6) -> 0.25 ; seed 2: (0.9-0.6, 0.9-0.8) -> 0.2
FORG_FT = [0.25, 0.25, 0.2]
# BWT of R_LORA seed 0: ((0.6-0.6) + (0.7-0.7)) / 2 = 0 ; LA of R_LORA seed 0: (0.6+0.7+0.6)/3
METRIC_ORDER = ["acc", "bwt", "fwt", "forgetting", "la", "aia"]


def parse_md_table(text: str) -> dict[str, list[str]]:
    """First Markdown table in text -> {first cell: remaining cells}."""
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows[2:])}


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", cell)]


# Drawing a report costs about half a second per figure (mostly PDF font embedding), so three
# reports are built once per module and shared by the tests that read them.
WRONG = {"acc": 0.99, "bwt": 0.99, "fwt": 0.99, "forgetting": 0.99, "la": 0.99, "aia": 0.99}


@pytest.fixture(scope="module")
def seeds3(tmp_path_factory):
    """A sweep dir holding one run: two methods, three seeds; summary.csv carries deliberately
    wrong metrics for full_ft seed 1. The report goes to the default place."""
    sweep = tmp_path_factory.mktemp("seeds3") / "sweep"
    write_run(sweep / "order1", {"full_ft": R_FT, "lora": R_LORA}, summary_metrics={("full_ft", 1): WRONG})
    with pytest.warns(UserWarning, match="the report uses the values recomputed"):
        out = build_report([sweep])
    return sweep, out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The hand-written fixture: one method, one seed (n = 1), with merged and held-out rows."""
    return FIXTURES / "merged_heldout", build_report([FIXTURES / "merged_heldout"], tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A sweep with two orders of stream s3, a second stream, and an unfinished sub-directory;
    one run is also named a second time."""
    sw = tmp_path_factory.mktemp("mixed") / "sw"
    write_run(sw / "o1", {"full_ft": {0: R_FT[0]}}, order="1")
    write_run(sw / "nested" / "o2", {"full_ft": {0: R_FT[1]}}, order="2", tasks=("c", "a", "b"))
    write_run(sw / "other", {"full_ft": {0: R_FT[1]}}, stream="other", tasks=("x", "y", "z"))
    (sw / "partial").mkdir()
    (sw / "partial" / "matrix.csv").write_text("method\n")
    with pytest.warns(UserWarning, match="partial: skipped"):
        out = build_report([sw, sw / "o1"])
    return sw, out


def md(out: Path, stem: str) -> dict[str, list[str]]:
    return parse_md_table((out / "tables" / f"{stem}.md").read_text())


def test_every_output_file_exists(seeds3):
    sweep, out = seeds3
    assert out == sweep / "report"  # default: RUN_DIR/report of the first (here: sweep) dir
    page = (out / "report.md").read_text()
    for kind in ("heatmap__tiny__s3__order-1", "curves__tiny__s3__order-1", "final__tiny__s3",
                 "stability__tiny__s3", "cost__tiny__s3"):
        for ext in (".pdf", ".png"):
            f = out / "figures" / f"{kind}{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
        assert f"(figures/{kind}.png)" in page
    assert (out / "figures" / "final__tiny__s3.pdf").read_bytes().startswith(b"%PDF")
    assert (out / "figures" / "final__tiny__s3.png").read_bytes().startswith(b"\x89PNG")
    for t in ("summary__tiny__s3", "cost__tiny__s3"):
        assert (out / "tables" / f"{t}.md").is_file() and (out / "tables" / f"{t}.tex").is_file()
        assert (out / "tables" / f"{t}.md").read_text() in page  # tables are embedded in the page
    for must in ("model: `tiny`", "stream: `s3`", "order 1: a → b → c", "seeds: 0, 1, 2", "BWT",
                 "negative = forgetting", "positive = forgetting; lower is better", "t(0.975, n−1)"):
        assert must in page, must


def test_tables_equal_metrics_recomputed_from_matrix(seeds3):
    sweep, out = seeds3
    samples = {(r["method"], r["seed"]): r for r in csv.DictReader(open(out / "tables" / "samples__tiny__s3.csv"))}
    assert len(samples) == 6
    for method, per in (("full_ft", R_FT), ("lora", R_LORA)):
        for seed, R in per.items():
            expect = metrics.summary(R)
            assert [float(samples[(method, str(seed))][m]) for m in METRIC_ORDER] == pytest.approx(
                [expect[m] for m in METRIC_ORDER])
    table = md(out, "summary__tiny__s3")
    for method, per in (("full_ft", R_FT), ("lora", R_LORA)):
        for i, m in enumerate(METRIC_ORDER):
            mean = np.mean([metrics.summary(R)[m] for R in per.values()])
            assert numbers(table[method][i])[0] == pytest.approx(mean, abs=5e-4), (method, m)
    # by hand (summary.csv claims 0.99 for full_ft seed 1): ACC and forgetting of full_ft
    assert numbers(table["full_ft"][0])[0] == pytest.approx(sum(ACC_FT) / 3, abs=5e-4)
    assert numbers(table["full_ft"][3])[0] == pytest.approx(sum(FORG_FT) / 3, abs=5e-4)
    page = (out / "report.md").read_text()
    assert "full_ft seed 1 says acc=0.99 (matrix.csv: 0.6333)" in page  # the disagreement is noted
    assert "full_ft seed 0 says" not in page  # a correct summary.csv row is not flagged
    tex = (out / "tables" / "summary__tiny__s3.tex").read_text()
    assert r"$-0.233 \pm 0.029$" in tex  # BWT of full_ft: -0.25, -0.25, -0.2


def test_best_value_bold_and_direction(seeds3):
    _, out = seeds3
    table = md(out, "summary__tiny__s3")
    bold = {m: [c.startswith("**") for c in cells[:6]] for m, cells in table.items()}
    # means over seeds, by hand: ACC full_ft 0.667 > lora 0.622; BWT full_ft -0.233 < lora -0.017;
    # FWT full_ft ((0.1+0.2)/2, (0+0.1)/2, (0.2+0.3)/2) -> 0.15 > lora (0, 0.05, 0) -> 0.017;
    # forgetting (lower is better) full_ft 0.233 > lora 0.017; LA full_ft (0.8+0.8+0.867)/3 = 0.822 >
    # lora (0.633+0.533+0.733)/3 = 0.633; AIA full_ft 0.733 > lora 0.624
    assert bold["full_ft"] == [True, False, True, False, True, True]
    assert bold["lora"] == [False, True, False, True, False, False]
    tex = (out / "tables" / "summary__tiny__s3.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"full\_ft" in tex and r"$\mathbf{0.667 \pm 0.058}$" in tex and r"$\downarrow$" in tex


def test_three_seeds_mean_and_t_interval(seeds3):
    _, out = seeds3
    agg = {(r["method"], r["metric"]): r for r in csv.DictReader(open(out / "tables" / "summary__tiny__s3.csv"))}
    # by hand: mean, sample std (ddof 1), half-width t_{0.975, 2} * s / sqrt(3), t_{0.975, 2} = 4.30265...
    t975 = 4.302652729911275
    assert stats.t.ppf(0.975, 2) == pytest.approx(t975)
    for metric, xs in (("acc", ACC_FT), ("forgetting", FORG_FT)):
        mean = sum(xs) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
        row = agg[("full_ft", metric)]
        assert float(row["mean"]) == pytest.approx(mean)
        assert float(row["std"]) == pytest.approx(sd)
        assert float(row["ci95"]) == pytest.approx(t975 * sd / math.sqrt(3))
        assert int(row["n"]) == 3
    # ACC: mean 2/3, std sqrt(((1.9/3-2/3)^2*2 + (2.2/3-2/3)^2)/2) = 0.057735; printed mean ± std, n = 3
    table = md(out, "summary__tiny__s3")
    assert numbers(table["full_ft"][0]) == pytest.approx([2 / 3, 0.057735], abs=5e-4)
    assert table["full_ft"][6] == "3"
    page = (out / "report.md").read_text()
    assert "mean ± 95% CI (t)" in page and "n = 1: no error bars" not in page


def test_mean_ci_single_sample_and_nan():
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and one["n"] == 1 and math.isnan(one["std"]) and math.isnan(one["ci95"])
    two = mean_ci([0.1, 0.3, math.nan])  # NaN (an undefined metric) is dropped
    assert two["n"] == 2 and two["mean"] == pytest.approx(0.2)
    assert two["ci95"] == pytest.approx(12.706204736174698 * math.sqrt(0.02) / math.sqrt(2))


def test_single_seed_says_n_1(single):
    run, out = single
    table = md(out, "summary__fx-model__fx-stream")
    assert table["full_ft"][6] == "1"
    assert all(len(numbers(c)) == 1 for c in table["full_ft"][:6])  # the mean alone, no "± std"
    page = (out / "report.md").read_text()
    assert "n = 1: no error bars" in page and "full_ft n = 1" in page
    from matplotlib.collections import LineCollection

    from clbench.report import build as report

    g = report.group_runs([load_run(run)])[0]
    fig = report._final_fig(g, report.aggregate(g.samples), report.plotstyle.MethodStyle(g.methods))
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    assert any("n = 1: no error bars" in t for t in texts) and "full_ft (n=1)" in texts
    assert not [c for ax in fig.axes for c in ax.collections if isinstance(c, LineCollection)]  # no error bars


def test_static_fixture_extra_rows_columns_and_heldout(single):
    """The fixture has an extra CSV column, an eval_group column, a merged:ties stage and held-out
    rows: merged and held-out rows must not change R."""
    run_dir, out = single
    run = load_run(run_dir)
    assert run.tasks == ["t1", "t2"]
    assert run.R[("full_ft", "0")].tolist() == [[0.25, 0.5], [0.75, 0.5], [0.5, 1.0]]
    assert list(run.extra[("full_ft", "0")]) == ["merged:ties"]
    tasks, G = run.heldout[("full_ft", "0")]
    assert tasks == ["gen"] and G[:, 0].tolist() == [0.5, 0.25, 0.125]
    assert not run.notes  # its summary.csv agrees with the matrix
    held = md(out, "heldout__fx-model__fx-stream")
    assert [numbers(c)[0] for c in held["full_ft"]] == pytest.approx([0.0, -0.25, -0.375])
    table = md(out, "summary__fx-model__fx-stream")
    # ACC (0.5+1.0)/2, BWT 0.5-0.75, forgetting 0.75-0.5, LA (0.75+1.0)/2: the merged row is not a stage
    assert [numbers(table["full_ft"][i])[0] for i in (0, 1, 3, 4)] == pytest.approx([0.75, -0.25, 0.25, 0.875])
    cost = md(out, "cost__fx-model__fx-stream")
    assert cost["full_ft"][:4] == ["1,234,567", "12.5", "3.0", "512"]
    assert (out / "figures" / "heldout__fx-model__fx-stream.png").is_file()
    assert "fx-model (hand-written fixture)" in (out / "report.md").read_text()


@pytest.mark.parametrize("missing", ["matrix.csv", "summary.csv", "config.yaml", "results.json"])
def test_missing_results_file_names_it(tmp_path, missing):
    run = write_run(tmp_path / "r", {"full_ft": {0: R_FT[0]}})
    (run / missing).unlink()
    with pytest.raises(ReportError, match=re.escape(str(run / missing))):
        build_report([run], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()  # nothing drawn before the check


def test_bad_files_name_file_and_line(tmp_path):
    run = write_run(tmp_path / "r", {"full_ft": {0: R_FT[0]}})
    good = (run / "matrix.csv").read_text()
    lines = good.splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",oops"
    (run / "matrix.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"matrix\.csv: line 4: value 'oops'"):
        load_run(run)
    (run / "matrix.csv").write_text(good.replace("eval_task,", "task,", 1))
    with pytest.raises(ReportError, match=r"matrix\.csv: missing column\(s\) eval_task"):
        load_run(run)
    (run / "matrix.csv").write_text(good)
    (run / "results.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"results\.json: not valid JSON"):
        load_run(run)


def test_hole_in_matrix_is_an_error_but_unfinished_pair_is_left_out(tmp_path):
    run = write_run(tmp_path / "r", {"full_ft": {0: R_FT[0]}, "lora": {0: R_LORA[0]}})
    lines = (run / "matrix.csv").read_text().splitlines()
    # lora seed 0 stopped after stage 1: no stage 2 and 3 rows -> left out with a note
    (run / "matrix.csv").write_text("\n".join(ln for ln in lines if not re.match(r"lora,0,[23],", ln)) + "\n")
    res = load_run(run)
    assert res.pairs == [("full_ft", "0")] and "stages 0..1 of 3" in res.notes[0]
    # a hole in the middle (stage 1, task b) is damage, not progress
    (run / "matrix.csv").write_text("\n".join(ln for ln in lines if not ln.startswith("full_ft,0,1,a,b,")) + "\n")
    with pytest.raises(ReportError, match=r"matrix\.csv: method full_ft seed 0 lacks scores.*\(1, 'b'\)"):
        load_run(run)


def test_task_order_must_match_results_json(tmp_path):
    run = write_run(tmp_path / "r", {"full_ft": {0: R_FT[0]}})
    res = json.loads((run / "results.json").read_text())
    res["run"]["tasks"] = ["b", "a", "c"]
    (run / "results.json").write_text(json.dumps(res))
    with pytest.raises(ReportError, match=r"matrix\.csv: stage 1 trains 'a', but results\.json run\.tasks"):
        load_run(run)


def test_two_streams_reported_separately(mixed):
    sw, out = mixed
    assert out == sw / "report"
    s3, other = md(out, "summary__tiny__s3"), md(out, "summary__tiny__other")
    # "other" holds R_FT[1] alone (n = 1): ACC 1.9/3, LA (0.7+0.8+0.9)/3 = 0.8, not pooled with s3
    assert other["full_ft"][6] == "1"
    assert numbers(other["full_ft"][0])[0] == pytest.approx(1.9 / 3, abs=5e-4)
    assert numbers(other["full_ft"][4])[0] == pytest.approx(0.8, abs=5e-4)
    # s3 pools its two orders (R_FT[0], R_FT[1]): forgetting (0.25 + 0.25)/2, n = 2
    assert s3["full_ft"][6] == "2"
    assert numbers(s3["full_ft"][3])[0] == pytest.approx(0.25, abs=5e-4)
    page = (out / "report.md").read_text()
    assert "## tiny · other" in page and "## tiny · s3" in page
    for f in ("final__tiny__other.png", "final__tiny__s3.pdf", "heatmap__tiny__other__order-1.pdf"):
        assert (out / "figures" / f).is_file(), f


def test_orders_pool_into_one_group_and_sweep_discovery(mixed):
    sw, out = mixed
    s3 = md(out, "summary__tiny__s3")
    # o1 is named twice (inside the sweep and on its own) but counts once: n = 2, not 3
    assert s3["full_ft"][6] == "2"
    acc = numbers(s3["full_ft"][0])
    assert acc == pytest.approx([(ACC_FT[0] + ACC_FT[1]) / 2, 0.0], abs=5e-4)  # both 1.9/3: std 0
    assert (out / "figures" / "heatmap__tiny__s3__order-2.png").is_file()
    page = (out / "report.md").read_text()
    assert "order 2: c → a → b" in page and "order 1: a → b → c" in page
    assert "partial: skipped" in page
    with pytest.raises(ReportError, match="results.json"):
        build_report([sw / "partial"])


def test_two_models_same_stream_not_averaged(tmp_path):
    from clbench.report.build import group_runs

    a = load_run(write_run(tmp_path / "m1", {"full_ft": {0: R_FT[0]}}, model="m1"))
    b = load_run(write_run(tmp_path / "m2", {"full_ft": {0: R_FT[2]}}, model="m2"))
    groups = group_runs([a, b])
    assert [g.label for g in groups] == ["m1 · s3", "m2 · s3"]
    assert [g.samples["acc"].tolist() for g in groups] == [pytest.approx([ACC_FT[0]]), pytest.approx([ACC_FT[2]])]


def test_method_colour_is_stable_across_figures():
    from clbench.report.plotstyle import OKABE_ITO, MethodStyle

    a, b = MethodStyle(["lora", "full_ft"]), MethodStyle(["ewc", "lora", "full_ft", "replay"])
    assert a.color("full_ft") == OKABE_ITO[0] and a.color("lora") == OKABE_ITO[1]
    assert b.color("full_ft") == OKABE_ITO[1]  # sorted names: ewc, full_ft, lora, replay
    assert len({b.color(m) for m in b.order}) == 4


def test_did_not_learn_is_flagged_never_best_and_paired_differences_marked(tmp_path):
    from clbench.results import stats as cistats
    from clbench.results.rundirs import aggregate, group_runs
    from clbench.report.tables import metrics_table, paired_table

    # 'stuck' keeps the base model's scores at every stage: BWT 0 and forgetting 0, better than lora's
    # (-0.017, 0.017 on average), but it learned nothing, so lora is bold for both
    stuck = {s: [[0.2, 0.3, 0.1]] * 4 for s in (0, 1, 2)}
    d = write_run(tmp_path / "r", {"full_ft": R_FT, "lora": R_LORA, "stuck": stuck})
    g = group_runs([load_run(d)])[0]
    flags = {m: cistats.flag_text(c) for m, c in cistats.learning_check(g).items()}
    assert flags == {"full_ft": "", "lora": "", "stuck": "did not learn 3/3 tasks"}
    paired = cistats.paired_differences(g, "full_ft")
    table = parse_md_table(metrics_table(aggregate(g.samples), "md", flags, paired))
    assert table["stuck"][-1] == "did not learn 3/3 tasks" and table["lora"][-1] == ""
    bwt, forgetting = METRIC_ORDER.index("bwt"), METRIC_ORDER.index("forgetting")
    assert table["lora"][bwt].startswith("**") and table["lora"][forgetting].startswith("**")
    assert not table["stuck"][bwt].startswith("**")
    # BWT lora - full_ft by seed, by hand: 0 - (-0.25), 0 - (-0.25), -0.05 - (-0.2) -> all > 0: †
    assert table["lora"][bwt].endswith("†")
    assert not table["full_ft"][bwt].endswith("†")  # the reference is not compared with itself
    pt = parse_md_table(paired_table(paired, "md"))
    assert numbers(pt["lora"][1])[0] == pytest.approx((0.25 + 0.25 + 0.15) / 3, abs=5e-4) and pt["lora"][1].endswith("†")
    assert pt["lora"][-1] == "runs" and pt["lora"][-2] == "3"


def test_a_new_report_removes_only_the_files_the_last_one_wrote(tmp_path):
    """A report into a folder that holds an earlier one removes the figures and tables the earlier
    one recorded (a group that is gone leaves nothing behind) and nothing the user put there; a
    report.md that clbench did not write is refused before anything is written."""
    a = write_run(tmp_path / "a", {"full_ft": {0: R_FT[0]}})
    b = write_run(tmp_path / "b", {"full_ft": {0: R_FT[0]}}, stream="other", tasks=("x", "y", "z"))
    out = tmp_path / "rep"
    build_report([a, b], out)
    gone = out / "figures" / "heatmap__tiny__other__order-1.png"
    assert gone.is_file()
    mine = [out / "figures" / "my_plot.png", out / "tables" / "my_notes.md", out / "tables" / "my.csv"]
    for f in mine:
        f.write_text("the user's")
    build_report([a], out)  # stream `other` is no longer reported
    assert not gone.exists() and (out / "figures" / "heatmap__tiny__s3__order-1.png").is_file()
    assert all(f.read_text() == "the user's" for f in mine)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.md").write_text("# my own notes\n")
    with pytest.raises(ReportError, match="report.md exists and clbench did not write it"):
        build_report([a], theirs)
    assert (theirs / "report.md").read_text() == "# my own notes\n" and not (theirs / "figures").exists()
