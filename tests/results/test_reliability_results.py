"""Reliability: a run directory's results files are never trusted blindly. matrix.csv and
summary.csv are checked against results.json and rebuilt from it; a damaged results.json is named;
a resume over changed task data is refused unless --allow-data-change (recorded)."""

import json
import shutil

import pytest
import yaml

from conftest import REPO, TINY_CONFIG

RUN = ("--set", "threads=1")


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    from clbench.cli import main

    out = tmp_path_factory.mktemp("complete") / "run"
    assert main(["run", str(TINY_CONFIG), "--output-dir", str(out), *RUN]) == 0
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _cut(f):
    t = f.read_text()
    f.write_text(t[: len(t) // 2])  # mid-line


def _drop_rows(f):
    lines = f.read_text().splitlines(True)
    f.write_text("".join(lines[:5] + lines[9:]))


DAMAGE = {
    "summary_deleted": lambda d: (d / "summary.csv").unlink(),
    "matrix_deleted": lambda d: (d / "matrix.csv").unlink(),
    "matrix_rows_dropped": lambda d: _drop_rows(d / "matrix.csv"),
    "matrix_cut_mid_line": lambda d: _cut(d / "matrix.csv"),
    "summary_value_changed": lambda d: (d / "summary.csv").write_text(
        (d / "summary.csv").read_text().replace(",sequential,", ",sequential,0.123", 1)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_already_complete_rebuilds_damaged_derived_files(complete_run, tmp_path, run_cli, damage):
    """A re-run of a complete directory whose matrix.csv or summary.csv is missing, short of rows,
    cut mid-line or disagrees with results.json says so and writes them again from results.json:
    the files equal the uninterrupted run's, and the run is still "already complete"."""
    out = _copy(complete_run, tmp_path)
    DAMAGE[damage](out)
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *RUN)
    assert code == 0, err
    assert "rebuilt" in err and "from results.json" in err and "already complete" in err, err
    for f in ("matrix.csv", "summary.csv", "results.json"):
        assert (out / f).read_text() == (complete_run / f).read_text(), f


def test_intact_results_are_not_rewritten(complete_run, tmp_path):
    from clbench.config import load_config
    from clbench.run.planning import plan
    from clbench.results.resultcheck import verify_results
    from clbench.results.rundir import RunDir

    cfg, cdir = load_config(TINY_CONFIG, ["threads=1"])
    out = _copy(complete_run, tmp_path)
    assert verify_results(out, plan(cfg, cdir), RunDir(out).results()) == []


@pytest.mark.parametrize("how", ["not_json", "matrix_not_rows", "methods_not_object"])
def test_damaged_results_json_is_named_in_one_line(complete_run, tmp_path, run_cli, how):
    out = _copy(complete_run, tmp_path)
    f = out / "results.json"
    res = json.loads(f.read_text())
    if how == "not_json":
        f.write_text(f.read_text()[:100])
    elif how == "matrix_not_rows":
        res["methods"]["full_ft"]["seeds"]["0"]["matrix"] = [[0.1, "x"]]
        f.write_text(json.dumps(res))
    else:
        res["methods"] = []
        f.write_text(json.dumps(res))
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *RUN)
    assert code == 2 and "Traceback" not in err and str(f) in err, err
    assert len(err.strip().splitlines()) == 1, err


def _own_tasks(tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "configs" / "tiny_tasks", tasks)
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg.update(task_dirs=[str(tasks)], methods=[{"name": "full_ft"}], threads=1)
    cfg["train"]["steps"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tasks


def test_resume_over_changed_data_is_refused_naming_the_task(tmp_path, run_cli):
    """results.json holds a fingerprint of every task's YAML and data files; a re-run over changed
    data is refused naming the task and the file, and --allow-data-change continues and records it."""
    cfg, tasks = _own_tasks(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 0, err
    fp = json.loads((out / "results.json").read_text())["run"]["data_fingerprint"]
    assert set(fp) == {"tiny_parity", "tiny_compare", "tiny_copy"}
    assert {"yaml", "data:train", "data:test"} <= set(fp["tiny_compare"]["files"])
    train = tasks / "tiny_compare.train.jsonl"
    lines = train.read_text().splitlines(True)
    train.write_text("".join(lines[1:] + lines[:1]))  # the same documents in another order
    before = {f: (out / f).read_bytes() for f in ("matrix.csv", "summary.csv", "results.json")}
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 2 and "tiny_compare (data:train)" in err and "--allow-data-change" in err, err
    assert "tiny_parity" not in err.split("changed since")[0].split("task(s)")[1]
    assert {f: (out / f).read_bytes() for f in before} == before
    code, _, err = run_cli("run", cfg, "--output-dir", out, "--allow-data-change")
    assert code == 0 and "data changed" in err, err
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["data_changes"][-1]["tasks"] == ["tiny_compare (data:train)"]
    assert run["data_fingerprint"]["tiny_compare"] != fp["tiny_compare"]
    code, _, err = run_cli("run", cfg, "--output-dir", out)  # the new data is now the directory's
    assert code == 0 and "already complete" in err, err


def test_rebuilt_matrix_keeps_the_other_kind_rows(tmp_path, run_cli, one_thread):
    """eval.other_kind's twin rows are in results.json too (other_kind_matrix): a deleted matrix.csv
    comes back with them, equal to the file the run wrote."""
    from test_other_kind import config, twin_folder

    cfg = config(tmp_path, twin_folder(tmp_path), ["tiny_parity", "tiny_compare"])
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 0, err
    before = (out / "matrix.csv").read_text()
    assert ",other_kind" in before
    (out / "matrix.csv").unlink()
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 0 and "rebuilt matrix.csv" in err and "already complete" in err, err
    assert (out / "matrix.csv").read_text() == before


def test_rebuilt_matrix_keeps_the_references_heldout_rows(tmp_path, run_cli):
    """A multitask and a single-task reference are scored on the held-out probes too; their rows
    are in results.json, so a deleted matrix.csv comes back with every one of them, equal to the
    file the run wrote."""
    out = tmp_path / "out"
    args = ("--output-dir", out, *RUN, "--set", "train.steps=2", "--set", "stream=null",
            "--set", "tasks=[tiny_parity, tiny_compare]", "--set", "heldout=[tiny_copy]",
            "--set", "methods=[{name: full_ft}, {name: full_ft, label: mtl, mode: multitask},"
                     " {name: full_ft, label: single, mode: single}]")
    code, _, err = run_cli("run", TINY_CONFIG, *args)
    assert code == 0, err
    before = (out / "matrix.csv").read_text()
    held = {tuple(line.split(",")[:3]) for line in before.splitlines() if line.endswith(",heldout")}
    # every method's every row: full_ft and single at stages 0-2, mtl at 0 and multitask
    assert held == {(m, "0", str(s)) for m in ("full_ft", "single") for s in (0, 1, 2)} | {
        ("mtl", "0", "0"), ("mtl", "0", "multitask")}, held
    (out / "matrix.csv").unlink()
    code, _, err = run_cli("run", TINY_CONFIG, *args)
    assert code == 0 and "rebuilt matrix.csv" in err and "already complete" in err, err
    assert (out / "matrix.csv").read_text() == before
