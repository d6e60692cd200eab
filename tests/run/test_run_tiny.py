"""A full 3-stage run of configs/tiny.yaml through real lm-eval, checked against the results contract."""

import csv
import json

import pytest
import yaml

from conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from clbench.cli import main

    out = tmp_path_factory.mktemp("tiny-run")
    assert main(["run", str(TINY_CONFIG), "--output-dir", str(out)]) == 0
    return out


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_contract_files_and_columns(tiny_run):
    for f in ("config.yaml", "matrix.csv", "summary.csv", "results.json"):
        assert (tiny_run / f).is_file(), f
    rows = read(tiny_run / "matrix.csv")
    assert list(rows[0]) == ["method", "seed", "stage", "trained_task", "eval_task", "metric", "value", "eval_group"]
    assert {r["eval_group"] for r in rows} == {"stream"}
    summary = read(tiny_run / "summary.csv")
    for col in ("method", "seed", "acc", "bwt", "fwt", "forgetting", "la", "trainable_params", "train_seconds", "eval_seconds"):
        assert col in summary[0]
    assert {r["method"] for r in summary} == {"full_ft", "lora"}


def test_matrix_shape_and_base_row(tiny_run):
    rows = read(tiny_run / "matrix.csv")
    tasks = ["tiny_parity", "tiny_compare", "tiny_copy"]
    for method in ("full_ft", "lora"):
        mine = [r for r in rows if r["method"] == method and r["seed"] == "0"]
        assert len(mine) == 4 * 3  # (T+1) x T cells
        cells = {(int(r["stage"]), r["eval_task"]) for r in mine}
        assert cells == {(s, t) for s in range(4) for t in tasks}
        base = [r for r in mine if r["stage"] == "0"]
        assert sorted(r["eval_task"] for r in base) == sorted(tasks) and all(r["trained_task"] == "" for r in base)
        trained = {int(r["stage"]): r["trained_task"] for r in mine if r["stage"] != "0"}
        assert trained == {1: "tiny_parity", 2: "tiny_compare", 3: "tiny_copy"}
        assert {r["metric"] for r in mine if r["eval_task"] == "tiny_copy"} == {"exact_match"}
        assert all(0.0 <= float(r["value"]) <= 1.0 for r in mine)


def test_matrix_csv_equals_the_per_example_samples(tiny_run):
    """Each cell of matrix.csv is the mean of its per-example metric in lm-eval's own records."""
    n = 0
    for r in read(tiny_run / "matrix.csv"):
        folder = ("base/stage0" if r["stage"] == "0" else f"{r['method']}/seed{r['seed']}/stage{r['stage']}")
        recs = [json.loads(line) for line in (tiny_run / "samples" / folder / f"{r['eval_task']}.jsonl").read_text().splitlines()]
        assert len(recs) == 20 and float(r["value"]) == pytest.approx(sum(x[r["metric"]] for x in recs) / len(recs))
        n += 1
    assert n == 2 * 4 * 3


def test_summary_equals_metrics_of_matrix(tiny_run):
    from clbench.results import metrics

    res = json.loads((tiny_run / "results.json").read_text())
    tasks = res["run"]["tasks"]
    cells = {(r["method"], r["seed"], int(r["stage"]), r["eval_task"]): float(r["value"])
             for r in read(tiny_run / "matrix.csv")}
    for r in read(tiny_run / "summary.csv"):
        # R rebuilt from matrix.csv, not taken from the same in-memory matrix the summary came from
        R = [[cells[(r["method"], r["seed"], s, t)] for t in tasks] for s in range(len(tasks) + 1)]
        assert R == res["methods"][r["method"]]["seeds"][r["seed"]]["matrix"]
        assert float(r["acc"]) == pytest.approx(metrics.acc(R))
        assert float(r["bwt"]) == pytest.approx(metrics.bwt(R))
        assert float(r["forgetting"]) == pytest.approx(metrics.forgetting(R))
        assert int(r["trainable_params"]) > 0
    # LoRA trains far fewer parameters than full fine-tuning
    s = {r["method"]: int(r["trainable_params"]) for r in read(tiny_run / "summary.csv")}
    assert s["lora"] < s["full_ft"] / 5


def test_results_json_and_config(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    assert res["run"]["tasks"] == ["tiny_parity", "tiny_compare", "tiny_copy"]
    assert res["run"]["stream"] == "tiny3" and res["run"]["seeds"] == [0]
    assert res["meta"]["versions"]["lm_eval"] and res["meta"]["versions"]["torch"]
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["train"]["max_grad_norm"] == 1.0  # defaults are filled in
    stages = res["methods"]["full_ft"]["seeds"]["0"]["stages"]
    assert [s["steps"] for s in stages] == [cfg["train"]["steps"]] * 3


def test_samples_written_per_stage(tiny_run):
    base = tiny_run / "samples" / "base" / "stage0" / "tiny_parity.jsonl"
    assert base.is_file()
    for method in ("full_ft", "lora"):
        for t in (1, 2, 3):
            f = tiny_run / "samples" / method / "seed0" / f"stage{t}" / "tiny_copy.jsonl"
            recs = [json.loads(line) for line in f.read_text().splitlines()]
            assert len(recs) == 20 and "resps" in recs[0] and "doc" in recs[0]


def test_training_reduces_loss(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    for stage in res["methods"]["full_ft"]["seeds"]["0"]["stages"]:
        assert stage["last_loss"] < stage["first_loss"]
