"""`clbench tune`: candidates scored on validation variants that never name a test file, the winner of
each method run on test, tune.json and the report's tuning section.

One real tune (the tiny model, one method, two candidates, one final seed: three tiny runs) is shared
by the tests that read it; the selection phase runs with every test file of the stream deleted."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from clbench.errors import ConfigError
from clbench.experiments.tune import load_tune, run_tune, selection_sweep, write_validation_tasks
from clbench.report.build import build_report

TINY = Path(__file__).parents[2] / "configs" / "tiny_tasks"
TASKS = ("tiny_parity", "tiny_compare")


def make_tasks(d: Path) -> Path:
    """The tiny tasks with a validation file: the last 40 of each train file (the first 160 stay train)."""
    d.mkdir(parents=True)
    for t in TASKS:
        train = (TINY / f"{t}.train.jsonl").read_text().splitlines(keepends=True)
        (d / f"{t}.train.jsonl").write_text("".join(train[:160]))
        (d / f"{t}.validation.jsonl").write_text("".join(train[160:]))
        shutil.copy(TINY / f"{t}.test.jsonl", d / f"{t}.test.jsonl")
        y = yaml.safe_load((TINY / f"{t}.yaml").read_text())
        y["clbench"]["data"]["validation"] = f"{t}.validation.jsonl"
        (d / f"{t}.yaml").write_text(yaml.safe_dump(y, sort_keys=False))
    (d / "streams.yaml").write_text(yaml.safe_dump(
        {"tiny2": {"description": "two tiny tasks", "orders": {"1": list(TASKS), "2": list(reversed(TASKS))}}}))
    return d


def make_tune(tmp: Path, **tune) -> Path:
    make_tasks(tmp / "tasks")
    (tmp / "base.yaml").write_text(yaml.safe_dump({
        "name": "t", "model": "tiny", "stream": "tiny2", "task_dirs": ["tasks"], "threads": 1,
        "methods": [{"name": "full_ft"}, {"name": "lora", "options": {"r": 4, "alpha": 8}, "train": {"lr": 1e-2}}],
        "seeds": [0], "train": {"lr": 3e-3, "steps": 4, "batch_size": 8, "max_length": 64},
        "eval": {"limit": 10, "batch_size": 16}, "precision": "fp32"}))
    body = {"name": "tt", "base": "base.yaml", "methods": {"full_ft": None}, "lr_grid": [1e-3, 1e-2],
            "final": {"seeds": [0]}, "parallel": 2, **tune}
    (tmp / "tune.yaml").write_text(yaml.safe_dump(body))
    return tmp / "tune.yaml"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    path = make_tune(tmp)
    out = tmp / "out"
    tests = {p: p.read_bytes() for p in (tmp / "tasks").glob("*.test.jsonl")}
    for p in tests:  # selection must not need a test file: none is there
        p.unlink()
    record = run_tune(load_tune(path, out), select_only=True)
    for p, body in tests.items():
        p.write_bytes(body)
    final = run_tune(load_tune(path, out))  # selection complete: skipped; the winner runs on test
    return out, record, final


def test_selection_scores_validation_and_the_winner_runs_on_test(tuned):
    out, record, final = tuned
    cands = record["methods"]["full_ft"]["candidates"]
    assert [c["setting"] for c in cands] == [{"train.lr": 0.001}, {"train.lr": 0.01}]
    for c in cands:
        rows = list(csv.DictReader(open(out / "select" / c["run"] / "matrix.csv")))
        # the selection runs evaluated the validation variants only, read from the validation files
        assert {r["eval_task"] for r in rows} == {t + "__validation" for t in TASKS}
        last = [float(r["value"]) for r in rows if r["stage"] == "2"]
        assert c["score"] == pytest.approx(sum(last) / 2)  # validation ACC: mean of the final row
    variant = yaml.safe_load((out / "validation_tasks" / "0" / "tiny_parity__validation.yaml").read_text())
    assert variant["clbench"]["data"]["test"].endswith("tasks/tiny_parity.validation.jsonl")
    assert variant["doc_to_text"] == yaml.safe_load((TINY / "tiny_parity.yaml").read_text())["doc_to_text"]
    best = max(c["score"] for c in cands)
    winner = next(c for c in cands if c["score"] == best)  # a tie goes to the candidate listed first
    assert final["methods"]["full_ft"]["winner"]["label"] == winner["label"]
    (run,) = final["final"]["runs"]
    res = json.loads((out / "final" / run / "results.json").read_text())
    assert list(res["methods"]) == [winner["label"]] and res["run"]["tasks"] == list(TASKS)
    assert res["run"]["config"]["methods"][0]["train"]["lr"] == winner["setting"]["train.lr"]
    summary = list(csv.DictReader(open(out / "final" / run / "summary.csv")))
    assert "did_not_learn" in summary[0]  # the learning flag column
    # the second `run_tune` resumed: the complete selection runs were not started again
    for c in cands:
        assert (out / "select" / "logs" / f"{c['run']}.log").read_text().count("\n$ ") == 1



def test_a_final_run_of_an_earlier_winner_is_set_aside_and_rerun(tuned, tmp_path):
    """A final run whose results are of another config (the winner changed after it ran) is moved to
    superseded/ with its results intact, tune.json lists it, and the winner's run is done afresh."""
    out, _, final = tuned
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (run,) = final["final"]["runs"]
    res_file = copy / "final" / run / "results.json"
    res = json.loads(res_file.read_text())
    res["run"]["config"]["methods"][0]["train"]["lr"] = 0.5  # as an earlier winner's setting would read
    res_file.write_text(json.dumps(res))
    old = res_file.read_bytes()
    again = run_tune(load_tune(out.parent / "tune.yaml", copy))
    assert again["final"]["superseded"] == [f"superseded/{run}.1"]
    assert (copy / "superseded" / f"{run}.1" / "results.json").read_bytes() == old
    now = json.loads((copy / "final" / run / "results.json").read_text())
    assert now["run"]["config"]["methods"][0]["train"]["lr"] == final["methods"]["full_ft"]["winner"]["setting"]["train.lr"]
    assert all(s["complete"] for m in now["methods"].values() for s in m["seeds"].values())

def test_report_of_a_tune_dir_has_the_tuning_section(tuned, tmp_path):
    out, record, _ = tuned
    page = (build_report([out], tmp_path / "rep") / "report.md").read_text()
    win = record["methods"]["full_ft"]["winner"]["label"]
    assert "## Tuning: tt" in page and f"**{win}**" in page
    assert "__validation" not in page.split("## Tuning")[0]  # the selection runs are not reported as runs


def test_dry_run_plans_options_and_first_k(tmp_path, capsys):
    path = make_tune(tmp_path, methods={"full_ft": None, "lora": {"options.r": [2, 4], "train.lr": [1e-3]}},
                     select={"protocol": "first_k", "k": 1}, final={"seeds": [0, 1, 2], "orders": ["1", "2"]})
    tune = load_tune(path, tmp_path / "out")
    run_tune(tune, dry_run=True)
    printed = capsys.readouterr().out
    assert "4 candidate run(s)" in printed and "12 final run(s) on test: 2 winner(s) x 3 seed(s) x 2 order(s)" in printed
    sweep = selection_sweep(tune, write_validation_tasks(tune, tmp_path / "cache"))
    ids = sorted(r.id for r in sweep.runs)
    assert ids == ["full_ft__lr=0.001__seed=0", "full_ft__lr=0.01__seed=0",
                   "lora__r=2__lr=0.001__seed=0", "lora__r=4__lr=0.001__seed=0"]
    assert all(r.cfg.tasks == ["tiny_parity__validation"] for r in sweep.runs)  # first_k: the first task only
    assert not list((tmp_path / "out").rglob("results.json"))  # nothing ran


def test_bad_tune_files_fail_naming_the_key(tmp_path):
    path = make_tune(tmp_path, select={"protocol": "first_k"})
    with pytest.raises(ConfigError, match="select.k"):
        load_tune(path)
    path.write_text(yaml.safe_dump({"base": "base.yaml", "methods": {"full_ft": {"train.lrr": [1]}}}))
    with pytest.raises(ConfigError, match="lrr"):
        load_tune(path)
    path.write_text(yaml.safe_dump({"base": "base.yaml", "methods": {"nosuch": None}}))
    with pytest.raises(ConfigError, match="nosuch"):
        load_tune(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs" / "tune").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_tune_files_validate(path):
    tune = load_tune(path)
    assert tune.tasks and all(axes for axes in tune.cfg.methods.values()) and len(tune.cfg.final.seeds) >= 3


def test_set_stream_overrides_the_base_stream(tmp_path):
    # the base runs stream tiny2 (tiny_parity first); `set: {stream: one}` must tune on stream one's task
    path = make_tune(tmp_path, set={"stream": "one"})
    streams = tmp_path / "tasks" / "streams.yaml"
    body = yaml.safe_load(streams.read_text())
    body["one"] = {"description": "one task", "orders": {"1": ["tiny_compare"]}}
    streams.write_text(yaml.safe_dump(body))
    assert load_tune(path).tasks == ["tiny_compare"]
    assert load_tune(make_tune(tmp_path / "plain")).tasks == ["tiny_parity", "tiny_compare"]
