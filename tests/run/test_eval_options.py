"""eval.offdiag_limit: off-diagonal cells on a subset; the diagonal and the final row exact."""

import json

from conftest import TINY_CONFIG


def test_offdiag_limit_keeps_diagonal_and_final_row_exact(tmp_path, run_cli):
    out = tmp_path / "out"
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, "--set", "methods=[{name: full_ft}]",
                           "--set", "train.steps=2", "--set", "eval.offdiag_limit=5")
    assert code == 0, err
    tasks = ["tiny_parity", "tiny_compare", "tiny_copy"]

    def n(stage, task):
        f = out / "samples" / "full_ft" / "seed0" / f"stage{stage}" / f"{task}.jsonl"
        return len(f.read_text().splitlines())

    for t in (1, 2):
        for i, task in enumerate(tasks, 1):
            assert n(t, task) == (20 if i == t else 5), (t, task)
    assert all(n(3, task) == 20 for task in tasks)
    assert len((out / "samples" / "base" / "stage0" / "tiny_copy.jsonl").read_text().splitlines()) == 20
    cfg = json.loads((out / "results.json").read_text())["run"]["config"]
    assert cfg["eval"]["offdiag_limit"] == 5


def test_heldout_tasks_evaluated_every_stage_never_trained(tmp_path, run_cli):
    import csv

    from clbench.results import metrics

    out = tmp_path / "out"
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, "--set", "methods=[{name: full_ft}]",
                           "--set", "train.steps=3", "--set", "stream=null",
                           "--set", "tasks=[tiny_parity, tiny_compare]", "--set", "heldout=[tiny_copy]")
    assert code == 0, err
    with open(out / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    held = [r for r in rows if r["eval_group"] == "heldout"]
    assert [(r["stage"], r["eval_task"]) for r in held] == [("0", "tiny_copy"), ("1", "tiny_copy"), ("2", "tiny_copy")]
    assert {r["trained_task"] for r in rows} == {"", "tiny_parity", "tiny_compare"}
    res = json.loads((out / "results.json").read_text())["methods"]["full_ft"]["seeds"]["0"]
    assert len(res["matrix"]) == 3 and len(res["matrix"][0]) == 2  # R holds only the stream's tasks
    G = res["heldout_matrix"]
    with open(out / "summary.csv") as f:
        (s,) = list(csv.DictReader(f))
    assert float(s["general_delta"]) == metrics.general_ability_delta(G)[-1]
    code, _, err = run_cli("report", out)
    assert code == 0, err
    assert "held" in (out / "report" / "report.md").read_text().lower()


def test_heldout_task_in_stream_is_refused(tmp_path, run_cli):
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", tmp_path / "o", "--set", "heldout=[tiny_copy]")
    assert code == 2 and "both in the stream and held out" in err
