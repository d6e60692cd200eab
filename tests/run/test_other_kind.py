"""eval.other_kind: every stream task is also scored its other way (a multiple-choice task by
generation through its `<task>_gen` twin, or the reverse) after every stage; the twins are never
trained, land in matrix.csv as eval_group other_kind and in results.json as their own matrix, and the
report shows them with CIs. Tiny model, tiny tasks: tiny_parity/tiny_compare and generation twins
written here over the same data files."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import yaml

from conftest import REPO
from clbench.cli import main

TINY = REPO / "configs" / "tiny_tasks"


def twin_folder(tmp_path, with_twins=("tiny_parity", "tiny_compare")):
    """A task folder with tiny_parity and tiny_compare (multiple choice) and generation twins of the
    named ones: the same documents and prompt, the label word generated and scored by exact match."""
    d = tmp_path / "tasks"
    d.mkdir()
    for name in ("tiny_parity", "tiny_compare"):
        for f in TINY.glob(f"{name}.*"):
            shutil.copy(f, d / f.name)
    for name in with_twins:
        y = yaml.safe_load((d / f"{name}.yaml").read_text())
        words = y.pop("doc_to_choice")
        y.update(task=f"{name}_gen", output_type="generate_until", doc_to_target="{{" + repr(words) + "[label]}}",
                 generation_kwargs={"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
                 metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                               "ignore_case": True, "ignore_punctuation": True}])
        (d / f"{name}_gen.yaml").write_text(yaml.safe_dump(y))
    return d


def config(tmp_path, folder, tasks, **eval_kw) -> str:
    cfg = {"name": "twins", "model": "tiny", "tasks": list(tasks), "task_dirs": [str(folder)],
           "methods": [{"name": "full_ft"}], "seeds": [0], "threads": 1, "precision": "fp32",
           "train": {"steps": 2, "lr": 3e-3, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 8, "batch_size": 16, "other_kind": True, **eval_kw}}
    p = tmp_path / "twins.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_stream_scored_both_ways_in_results_and_report(tmp_path, one_thread):
    folder = twin_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["run", config(tmp_path, folder, ["tiny_parity", "tiny_compare"]), "--output-dir", str(out)]) == 0

    mat = pd.read_csv(out / "matrix.csv")
    twin_rows = mat[mat["eval_group"] == "other_kind"]
    # the twins at every stage (0, 1, 2) for both tasks, by exact match; never a trained task
    assert sorted(set(twin_rows["eval_task"])) == ["tiny_compare_gen", "tiny_parity_gen"]
    assert sorted(set(twin_rows["stage"].astype(str))) == ["0", "1", "2"]
    assert set(twin_rows["metric"]) == {"exact_match"}
    assert not set(mat["trained_task"].dropna()) & {"tiny_parity_gen", "tiny_compare_gen"}

    seed = json.loads((out / "results.json").read_text())["methods"]["full_ft"]["seeds"]["0"]
    assert seed["other_kind_tasks"] == ["tiny_parity_gen", "tiny_compare_gen"]
    O = seed["other_kind_matrix"]
    assert len(O) == 3 and all(len(row) == 2 for row in O)
    # the matrix is the matrix.csv rows, column i = stream task i's twin
    for st in range(3):
        for i, twin in enumerate(seed["other_kind_tasks"]):
            v = twin_rows[(twin_rows["stage"].astype(str) == str(st)) & (twin_rows["eval_task"] == twin)]["value"]
            assert O[st][i] == pytest.approx(float(v.iloc[0]))
    assert set(seed["other_kind_metrics"]) >= {"acc", "bwt", "forgetting"}
    # the stream's own matrix is unchanged in shape: the twins are not columns of R
    assert all(len(row) == 2 for row in seed["matrix"])

    # a re-run of the finished directory checks matrix.csv against results.json and keeps the twins' rows
    assert main(["run", config(tmp_path, folder, ["tiny_parity", "tiny_compare"]), "--output-dir", str(out)]) == 0
    assert pd.read_csv(out / "matrix.csv").equals(mat)

    rep = tmp_path / "rep"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    assert "The same tasks scored the other way (exact_match)" in md
    assert list((rep / "tables").glob("other_kind__*.md"))
    mats = next((rep / "tables").glob("other_kind_matrices__*.md")).read_text()
    assert "full_ft: tiny_parity_gen" in mats and "tiny_compare_gen" in mats


@pytest.mark.parametrize("twins, tasks, msg", [
    ((), ["tiny_parity"], r"task 'tiny_parity' has no task of the other kind \(looked for 'tiny_parity_gen'"),
    (("tiny_parity",), ["tiny_parity", "tiny_parity_gen"], r"'tiny_parity_gen', the other kind of 'tiny_parity', is itself in the stream"),
])
def test_other_kind_refused_before_any_training(tmp_path, run_cli, twins, tasks, msg):
    folder = twin_folder(tmp_path, twins)
    code, _, err = run_cli("run", config(tmp_path, folder, tasks), "--output-dir", tmp_path / "out")
    assert code == 2
    assert re.search(msg, err), err
    assert not (tmp_path / "out" / "matrix.csv").exists()
