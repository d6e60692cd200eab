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
